//! Element-wise updates written into an existing buffer: accumulating gradients over
//! micro-batches and AdamW's moment and weight updates. candle's tensor ops allocate a new
//! tensor per op; for the 120M-480M floats of a model's gradients and moments that is several
//! passes of page faults per step. On CPU these run in place (in parallel chunks); on other
//! devices [`add_assign`] and friends fall back to tensor ops and rebind the handle, which
//! computes the same values.

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

use super::{storage_f32, storage_f32_mut};

/// Elements per parallel task: large enough that task overhead vanishes.
const CHUNK: usize = 1 << 16;

fn both_in_place(dst: &Tensor, srcs: &[&Tensor]) -> bool {
    super::is_cpu_f32_contiguous(dst)
        && srcs
            .iter()
            .all(|s| super::is_cpu_f32_contiguous(s) && s.shape() == dst.shape())
}

/// `dst = a * dst + b * src` (or `b * src²` when `square`).
struct Axpby {
    a: f32,
    b: f32,
    square: bool,
}

impl InplaceOp2 for Axpby {
    fn name(&self) -> &'static str {
        "axpby"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let d = storage_f32_mut(dst, dl, "axpby")?;
        let s = storage_f32(s, sl, "axpby")?;
        let (a, b, sq) = (self.a, self.b, self.square);
        d.par_chunks_mut(CHUNK)
            .zip(s.par_chunks(CHUNK))
            .for_each(|(d, s)| {
                for (x, &y) in d.iter_mut().zip(s) {
                    let y = if sq { y * y } else { y };
                    *x = a * *x + b * y;
                }
            });
        Ok(())
    }
}

/// `dst *= s`.
struct Scale(f32);

impl InplaceOp1 for Scale {
    fn name(&self) -> &'static str {
        "scale"
    }
    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout) -> Result<()> {
        let s = self.0;
        storage_f32_mut(dst, dl, "scale")?
            .par_chunks_mut(CHUNK)
            .for_each(|d| d.iter_mut().for_each(|x| *x *= s));
        Ok(())
    }
}

/// `dst = a * dst + b * src` (`b * src²` when `square`), in place where possible.
pub fn axpby(dst: &mut Tensor, a: f64, src: &Tensor, b: f64, square: bool) -> Result<()> {
    if both_in_place(dst, &[src]) {
        return dst.inplace_op2(
            src,
            &Axpby {
                a: a as f32,
                b: b as f32,
                square,
            },
        );
    }
    let s = if square { src.sqr()? } else { src.clone() };
    *dst = ((&*dst * a)? + (s * b)?)?;
    Ok(())
}

/// `dst += src`.
pub fn add_assign(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    axpby(dst, 1.0, src, 1.0, false)
}

/// `dst *= s`, in place where possible.
pub fn scale(dst: &mut Tensor, s: f64) -> Result<()> {
    if both_in_place(dst, &[]) {
        return dst.inplace_op1(&Scale(s as f32));
    }
    *dst = (&*dst * s)?;
    Ok(())
}

/// Sum of squares in f64 (the gradient norm), read in place on CPU.
pub fn sum_sq(t: &Tensor) -> Result<f64> {
    if super::is_cpu_f32_contiguous(t) {
        // Partial sums per fixed chunk, added in order: the same bits whatever the threads do
        // (a resumed run must repeat the uninterrupted one exactly).
        if let Some(s) = super::with_f32(t, |d| {
            let parts: Vec<f64> = d
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            parts.iter().sum::<f64>()
        }) {
            return Ok(s);
        }
    }
    t.to_dtype(candle_core::DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()
}

/// AdamW's weight update from already-updated moments `m` and `v`:
/// `w = w * (1 - lr * wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)` (PyTorch's order).
pub struct AdamUpdate {
    pub lr: f64,
    pub weight_decay: f64,
    pub bias_correction1: f64,
    pub bias_correction2: f64,
    pub eps: f64,
}

impl InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "adamw"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let w = storage_f32_mut(dst, dl, "adamw")?;
        let m = storage_f32(m, ml, "adamw")?;
        let v = storage_f32(v, vl, "adamw")?;
        let decay = (1.0 - self.lr * self.weight_decay) as f32;
        let step = (self.lr / self.bias_correction1) as f32;
        let bc2 = self.bias_correction2.sqrt() as f32;
        let eps = self.eps as f32;
        let wd = self.weight_decay != 0.0;
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(w, (m, v))| {
                for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                    let decayed = if wd { *w * decay } else { *w };
                    *w = decayed - (m / (v.sqrt() / bc2 + eps)) * step;
                }
            });
        Ok(())
    }
}

impl AdamUpdate {
    /// Applies the update to `w` in place (a `Var`'s tensor: the model sees it at once) and
    /// returns `None`, or returns the updated weights where it cannot work in place.
    pub fn apply(&self, w: &Tensor, m: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
        if both_in_place(w, &[m, v]) {
            w.inplace_op3(m, v, self)?;
            return Ok(None);
        }
        let denom = ((v.sqrt()? / self.bias_correction2.sqrt())? + self.eps)?;
        let decayed = if self.weight_decay != 0.0 {
            (w * (1.0 - self.lr * self.weight_decay))?
        } else {
            w.clone()
        };
        Ok(Some(
            (decayed - ((m / &denom)? * (self.lr / self.bias_correction1))?)?,
        ))
    }
}

/// `dst[ids[k], :] += rows[k, :]` for every k (repeated ids add up).
struct AddRows<'a>(&'a [u32]);

impl InplaceOp2 for AddRows<'_> {
    fn name(&self) -> &'static str {
        "add-rows"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let width = *dl.dims().last().unwrap_or(&1);
        let d = storage_f32_mut(dst, dl, "add-rows")?;
        let s = storage_f32(s, sl, "add-rows")?;
        for (k, &id) in self.0.iter().enumerate() {
            let row = &mut d[id as usize * width..(id as usize + 1) * width];
            for (x, &y) in row.iter_mut().zip(&s[k * width..(k + 1) * width]) {
                *x += y;
            }
        }
        Ok(())
    }
}

/// `dst[ids[k], :] += rows[k, :]`: the gradient of an embedding lookup, added in place
/// where possible. `dst` is (vocab, width), `rows` (ids.len(), width).
pub fn add_rows(dst: &mut Tensor, ids: &[u32], rows: &Tensor) -> Result<()> {
    let (vocab, width) = dst.dims2()?;
    if rows.dims2()? != (ids.len(), width) {
        candle_core::bail!(
            "add-rows: {} ids for rows of shape {:?}",
            ids.len(),
            rows.dims()
        );
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        candle_core::bail!("add-rows: id {bad} outside {vocab} rows");
    }
    if super::is_cpu_f32_contiguous(dst) && super::is_cpu_f32_contiguous(rows) {
        return dst.inplace_op2(rows, &AddRows(ids));
    }
    let idx = Tensor::from_vec(ids.to_vec(), ids.len(), rows.device())?;
    *dst = dst.index_add(&idx, rows, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn in_place_updates_equal_the_tensor_formulas() {
        let d = Device::Cpu;
        let a = Tensor::new(&[1.0f32, -2.0, 3.0], &d).unwrap();
        let b = Tensor::new(&[0.5f32, 0.25, -1.0], &d).unwrap();
        let mut x = a.copy().unwrap();
        axpby(&mut x, 0.9, &b, 0.1, true).unwrap();
        let want = ((&a * 0.9).unwrap() + (b.sqr().unwrap() * 0.1).unwrap()).unwrap();
        assert_eq!(x.to_vec1::<f32>().unwrap(), want.to_vec1::<f32>().unwrap());
        scale(&mut x, 2.0).unwrap();
        assert_eq!(
            x.to_vec1::<f32>().unwrap(),
            (want * 2.0).unwrap().to_vec1::<f32>().unwrap()
        );
        assert!((sum_sq(&b).unwrap() - 1.3125).abs() < 1e-12);
        // A strided source takes the tensor path and gives the same values.
        let mut y = a.copy().unwrap();
        let bt = Tensor::new(&[[0.5f32], [0.25], [-1.0]], &d)
            .unwrap()
            .t()
            .unwrap()
            .squeeze(0)
            .unwrap();
        add_assign(&mut y, &bt).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![1.5, -1.75, 2.0]);
        // Embedding-gradient rows, repeated ids summed, in place and through index_add.
        let rows = Tensor::new(&[[1f32, 2.0], [10.0, 20.0], [100.0, 200.0]], &d).unwrap();
        let want = vec![vec![0f32, 0.0], vec![101.0, 202.0], vec![10.0, 20.0]];
        let mut table = Tensor::zeros((3, 2), candle_core::DType::F32, &d).unwrap();
        add_rows(&mut table, &[1, 2, 1], &rows).unwrap();
        assert_eq!(table.to_vec2::<f32>().unwrap(), want);
        let mut strided = Tensor::zeros((2, 3), candle_core::DType::F32, &d)
            .unwrap()
            .t()
            .unwrap();
        add_rows(&mut strided, &[1, 2, 1], &rows).unwrap();
        assert_eq!(strided.to_vec2::<f32>().unwrap(), want);
        assert!(add_rows(&mut table, &[3, 0, 0], &rows).is_err());
    }
}
