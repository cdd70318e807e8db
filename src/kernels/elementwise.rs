//! The element-wise pieces of a transformer layer as single candle ops with hand-written
//! backward passes: RMSNorm, LayerNorm, rotary embedding, SwiGLU and quick-GELU.
//!
//! Composed from tensor ops each of these keeps three to six activation-sized tensors alive
//! for the backward pass and makes as many passes over memory; as one op each keeps only its
//! inputs and makes one pass (two for the norms' backward). They run for f32 tensors on the
//! CPU, and for bf16 ones widened to f32 inside the op ([`Widened`]); the model's layers use
//! the composed form everywhere else (see `model::layers`), and the tests below hold the two
//! to the same values and gradients.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::softmax::exp_in_place;
use super::storage_f32;

/// Rows per parallel task for the row-wise ops; also the unit of the fixed-order reduction
/// of weight gradients (so the result does not depend on thread scheduling).
const ROWS: usize = 64;
/// Elements per parallel task for the element-wise ops.
const CHUNK: usize = 1 << 14;

/// Runs `f` on the f32 data of CPU tensors made contiguous.
fn with2<R>(a: &Tensor, b: &Tensor, f: impl FnOnce(&[f32], &[f32]) -> R) -> Result<R> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    super::with_f32(&a, |x| super::with_f32(&b, |y| f(x, y)))
        .flatten()
        .ok_or_else(|| candle_core::Error::Msg("fused op: inputs are not f32 on the CPU".into()))
}

fn with3<R>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    f: impl FnOnce(&[f32], &[f32], &[f32]) -> R,
) -> Result<R> {
    let c = c.contiguous()?;
    with2(a, b, |x, y| super::with_f32(&c, |z| f(x, y, z)))?
        .ok_or_else(|| candle_core::Error::Msg("fused op: inputs are not f32 on the CPU".into()))
}

/// Sums per-chunk partial vectors in chunk order.
fn sum_parts(parts: Vec<Vec<f32>>, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    for p in parts {
        for (o, x) in out.iter_mut().zip(p) {
            *o += x;
        }
    }
    out
}

fn width(shape: &Shape) -> Result<usize> {
    shape
        .dims()
        .last()
        .copied()
        .filter(|&w| w > 0)
        .ok_or_else(|| candle_core::Error::Msg(format!("fused op: bad shape {shape:?}")))
}

// ---------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x²) + eps) * w

/// Qwen2's RMSNorm over the last axis; `x` (.., h), `w` (h).
pub struct RmsNorm {
    pub eps: f32,
}

/// Row statistics in f64: one rounding to f32 at the end instead of one per term.
fn rstd_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f64 = row.iter().map(|&x| (x as f64) * (x as f64)).sum();
    (1.0 / (ss / row.len() as f64 + eps as f64).sqrt()) as f32
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = width(xl.shape())?;
        let (x, w) = (
            storage_f32(xs, xl, "rms-norm")?,
            storage_f32(ws, wl, "rms-norm")?,
        );
        if w.len() != h {
            candle_core::bail!("rms-norm: weight of {} for rows of {h}", w.len());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h * ROWS)
            .zip(x.par_chunks(h * ROWS))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(h).zip(xc.chunks(h)) {
                    let r = rstd_rms(xr, self.eps);
                    for ((o, &a), &b) in yr.iter_mut().zip(xr).zip(w) {
                        *o = a * r * b;
                    }
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = width(x.shape())?;
        let (dx, dw) = with3(x, w, g, |x, w, g| {
            let mut dx = vec![0f32; x.len()];
            let parts: Vec<Vec<f32>> = dx
                .par_chunks_mut(h * ROWS)
                .zip(x.par_chunks(h * ROWS).zip(g.par_chunks(h * ROWS)))
                .map(|(dxc, (xc, gc))| {
                    let mut dw = vec![0f32; h];
                    for ((dr, xr), gr) in dxc.chunks_mut(h).zip(xc.chunks(h)).zip(gc.chunks(h)) {
                        let r = rstd_rms(xr, self.eps);
                        // c = mean(g w x̂)
                        let mut c = 0f32;
                        for i in 0..h {
                            let xh = xr[i] * r;
                            c += gr[i] * w[i] * xh;
                            dw[i] += gr[i] * xh;
                        }
                        c /= h as f32;
                        for i in 0..h {
                            dr[i] = r * (gr[i] * w[i] - xr[i] * r * c);
                        }
                    }
                    dw
                })
                .collect();
            (dx, sum_parts(parts, h))
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

// ---------------------------------------------------------------------------------------
// LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b

/// `torch.nn.LayerNorm` over the last axis with affine weight and bias.
pub struct LayerNorm {
    pub eps: f32,
}

fn mean_rstd(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = width(xl.shape())?;
        let (x, w, b) = (
            storage_f32(xs, xl, "layer-norm")?,
            storage_f32(ws, wl, "layer-norm")?,
            storage_f32(bs, bl, "layer-norm")?,
        );
        if w.len() != h || b.len() != h {
            candle_core::bail!(
                "layer-norm: weight {} and bias {} for rows of {h}",
                w.len(),
                b.len()
            );
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h * ROWS)
            .zip(x.par_chunks(h * ROWS))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(h).zip(xc.chunks(h)) {
                    let (m, r) = mean_rstd(xr, self.eps);
                    for i in 0..h {
                        yr[i] = (xr[i] - m) * r * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = width(x.shape())?;
        let (dx, dw, db) = with3(x, w, g, |x, w, g| {
            let mut dx = vec![0f32; x.len()];
            let parts: Vec<(Vec<f32>, Vec<f32>)> = dx
                .par_chunks_mut(h * ROWS)
                .zip(x.par_chunks(h * ROWS).zip(g.par_chunks(h * ROWS)))
                .map(|(dxc, (xc, gc))| {
                    let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
                    for ((dr, xr), gr) in dxc.chunks_mut(h).zip(xc.chunks(h)).zip(gc.chunks(h)) {
                        let (m, r) = mean_rstd(xr, self.eps);
                        let (mut c1, mut c2) = (0f32, 0f32);
                        for i in 0..h {
                            let xh = (xr[i] - m) * r;
                            let gw = gr[i] * w[i];
                            c1 += gw;
                            c2 += gw * xh;
                            dw[i] += gr[i] * xh;
                            db[i] += gr[i];
                        }
                        let (c1, c2) = (c1 / h as f32, c2 / h as f32);
                        for i in 0..h {
                            let xh = (xr[i] - m) * r;
                            dr[i] = r * (gr[i] * w[i] - c1 - xh * c2);
                        }
                    }
                    (dw, db)
                })
                .collect();
            let (dws, dbs): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
            (dx, sum_parts(dws, h), sum_parts(dbs, h))
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Rotary embedding, transposing (b, l, heads, d) to (b, heads, l, d) on the way

/// `x · cos + rotate_half(x) · sin` for x (b, l, heads, d) with cos, sin (b, l, d) shared by
/// the heads; the result is laid out (b, heads, l, d), as attention wants it.
pub struct Rotary;

/// Rotates one (d) vector: `out = x cos + rotate_half(x) sin`, or with `transpose` the
/// adjoint `g cos + rotate_halfᵀ(g sin)` (the backward pass).
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32], transpose: bool) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        if transpose {
            out[i] = a * cos[i] + b * sin[i + half];
            out[i + half] = b * cos[i + half] - a * sin[i];
        } else {
            out[i] = a * cos[i] - b * sin[i];
            out[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

fn rotary_dims(x: &Shape, cos: &Shape, sin: &Shape) -> Result<(usize, usize, usize, usize)> {
    let (b, l, n, d) = x.dims4()?;
    if cos.dims() != [b, l, d] || sin.dims() != [b, l, d] || d % 2 != 0 {
        candle_core::bail!("rotary: x {x:?}, cos {cos:?}, sin {sin:?}");
    }
    Ok((b, l, n, d))
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, l, n, d) = rotary_dims(xl.shape(), cl.shape(), sl.shape())?;
        let (x, cos, sin) = (
            storage_f32(xs, xl, "rotary")?,
            storage_f32(cs, cl, "rotary")?,
            storage_f32(ss, sl, "rotary")?,
        );
        let mut out = vec![0f32; x.len()];
        let plane = |(bh, plane): (usize, &mut [f32])| {
            let (bi, h) = (bh / n, bh % n);
            for t in 0..l {
                let src = ((bi * l + t) * n + h) * d;
                let cs = (bi * l + t) * d;
                rotate(
                    &x[src..src + d],
                    &cos[cs..cs + d],
                    &sin[cs..cs + d],
                    &mut plane[t * d..(t + 1) * d],
                    false,
                );
            }
        };
        // Parallel over (batch, head) planes of the output, each (l, d); a decoding step's
        // few heads of one position (a microsecond) in place: handing them to the pool
        // would wake a sleeping worker for nothing.
        if x.len() < CHUNK {
            out.chunks_mut(l * d).enumerate().for_each(plane);
        } else {
            out.par_chunks_mut(l * d).enumerate().for_each(plane);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, n, l, d))))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, l, n, d) = rotary_dims(x.shape(), cos.shape(), sin.shape())?;
        let dx = with3(g, cos, sin, |g, cos, sin| {
            let mut dx = vec![0f32; g.len()];
            // Parallel over (batch, position) slabs of dx, each (heads, d).
            dx.par_chunks_mut(n * d).enumerate().for_each(|(bt, slab)| {
                let (bi, t) = (bt / l, bt % l);
                let cs = bt * d;
                for h in 0..n {
                    let src = ((bi * n + h) * l + t) * d;
                    rotate(
                        &g[src..src + d],
                        &cos[cs..cs + d],
                        &sin[cs..cs + d],
                        &mut slab[h * d..(h + 1) * d],
                        true,
                    );
                }
            });
            dx
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None,
            None,
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Gated activations

/// `silu(gate) · up`, the SwiGLU of Qwen2's MLP.
pub struct SwiGlu;

/// The GELU approximations of the vision MLPs, both `x · sigmoid(g(x))`: one kernel, forward
/// and gradient, over both cores through the vectorised exp.
#[derive(Clone, Copy)]
pub enum XSigmoid {
    /// CLIP's quick-GELU (Qwen2-VL's vision MLP): g(x) = 1.702 x.
    Quick,
    /// `gelu_pytorch_tanh` (Qwen3-VL's vision MLP): `0.5 x (1 + tanh(u))` with
    /// u = √(2/π) (x + 0.044715 x³) equals `x · sigmoid(2u)`, so g(x) = 2u. Through the exp
    /// rather than libm's scalar tanhf (14% of a bf16 vision-tower profile as candle's gelu).
    Tanh,
}

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044715;

impl XSigmoid {
    /// g(x).
    fn arg(self, v: f32) -> f32 {
        match self {
            Self::Quick => 1.702 * v,
            Self::Tanh => 2.0 * SQRT_TWO_OVER_PI * v * (1.0 + GELU_CUBIC * v * v),
        }
    }

    /// g'(x).
    fn darg(self, v: f32) -> f32 {
        match self {
            Self::Quick => 1.702,
            Self::Tanh => 2.0 * SQRT_TWO_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * v * v),
        }
    }

    /// sigmoid(g(x)) of each x of a chunk.
    fn gate_into(self, x: &[f32], s: &mut [f32]) {
        for (o, &v) in s.iter_mut().zip(x) {
            *o = -self.arg(v);
        }
        exp_in_place(s);
        for o in s.iter_mut() {
            *o = 1.0 / (1.0 + *o);
        }
    }
}

/// sigmoid(k x) for a chunk, through the vectorised exp.
fn sigmoid_into(x: &[f32], k: f32, s: &mut [f32]) {
    for (o, &v) in s.iter_mut().zip(x) {
        *o = -k * v;
    }
    exp_in_place(s);
    for o in s.iter_mut() {
        *o = 1.0 / (1.0 + *o);
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?}", gl.shape(), ul.shape());
        }
        let (g, u) = (
            storage_f32(gs, gl, "swiglu")?,
            storage_f32(us, ul, "swiglu")?,
        );
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(yc, (gc, uc))| {
                sigmoid_into(gc, 1.0, yc);
                for ((o, &a), &b) in yc.iter_mut().zip(gc).zip(uc) {
                    *o = a * *o * b;
                }
            });
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with3(gate, up, grad, |g, u, d| {
            let mut dg = vec![0f32; g.len()];
            let mut du = vec![0f32; g.len()];
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(
                    g.par_chunks(CHUNK)
                        .zip(u.par_chunks(CHUNK).zip(d.par_chunks(CHUNK))),
                )
                .for_each(|((dgc, duc), (gc, (uc, dc)))| {
                    sigmoid_into(gc, 1.0, dgc);
                    for i in 0..gc.len() {
                        let s = dgc[i];
                        let silu = gc[i] * s;
                        duc[i] = dc[i] * silu;
                        dgc[i] = dc[i] * uc[i] * s * (1.0 + gc[i] * (1.0 - s));
                    }
                });
            (dg, du)
        })?;
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

impl CustomOp1 for XSigmoid {
    fn name(&self) -> &'static str {
        match self {
            Self::Quick => "quick-gelu",
            Self::Tanh => "gelu-tanh",
        }
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = storage_f32(xs, xl, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(yc, xc)| {
                self.gate_into(xc, yc);
                for (o, &v) in yc.iter_mut().zip(xc) {
                    *o *= v;
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    /// d/dx x·σ(g) = σ + x σ (1 - σ) g'.
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with2(x, grad, |x, d| {
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(d.par_chunks(CHUNK)))
                .for_each(|(o, (xc, dc))| {
                    self.gate_into(xc, o);
                    for i in 0..xc.len() {
                        let (s, v) = (o[i], xc[i]);
                        o[i] = dc[i] * (s + v * s * (1.0 - s) * self.darg(v));
                    }
                });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Whether the fused ops can run on these tensors: on the CPU, each f32 or bf16 (bf16 ones
/// run widened, see [`widened`]).
pub fn applies(ts: &[&Tensor]) -> bool {
    super::cpu_kernels()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::BF16))
}

/// A fused f32 op run on bf16 tensors (any f32 ones pass as they are): the inputs are
/// widened (exactly) into temporaries, the f32 kernel runs, and its output is rounded to
/// the dtype of the first input once; the backward pass widens the same way and rounds each
/// gradient to its input's dtype. Why: a bf16 run on the CPU composed these ops from
/// candle's generic bf16 ops, several passes each (through candle's spinning thread pool)
/// that keep their f32 intermediates for the backward pass; wrapped, an op makes one pass
/// and the graph keeps only its bf16 inputs and output (widening at the tensor level would
/// keep f32 copies of both). It rounds once where the composed ops rounded after every
/// step: closer to f32, as PyTorch's autocast, which runs norms, rotary embeddings and
/// attention's softmax in f32.
pub(crate) struct Widened<Op> {
    pub op: Op,
}

/// `s` as f32, with the layout the copy has (the same one when it is f32 already).
fn widen<'a>(s: &'a CpuStorage, l: &Layout) -> Result<(std::borrow::Cow<'a, CpuStorage>, Layout)> {
    use std::borrow::Cow;
    match s {
        CpuStorage::BF16(v) => {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("fused op: input is not contiguous");
            };
            let wide = v[start..end].iter().map(|x| x.to_f32()).collect();
            Ok((
                Cow::Owned(CpuStorage::F32(wide)),
                Layout::contiguous(l.shape().clone()),
            ))
        }
        _ => Ok((Cow::Borrowed(s), l.clone())),
    }
}

/// An f32 output rounded to `dtype` (f32 or bf16).
fn narrow(out: (CpuStorage, Shape), dtype: DType) -> Result<(CpuStorage, Shape)> {
    match (out, dtype) {
        ((CpuStorage::F32(v), shape), DType::BF16) => Ok((
            CpuStorage::BF16(v.iter().map(|&x| half::bf16::from_f32(x)).collect()),
            shape,
        )),
        (out, _) => Ok(out),
    }
}

fn dtype_of(s: &CpuStorage) -> DType {
    match s {
        CpuStorage::BF16(_) => DType::BF16,
        _ => DType::F32,
    }
}

/// A tensor of the backward pass as f32 (outside any graph).
fn wide(t: &Tensor) -> Result<Tensor> {
    t.detach().to_dtype(DType::F32)
}

/// A gradient in the dtype of the input it belongs to.
fn back(g: Option<Tensor>, like: &Tensor) -> Result<Option<Tensor>> {
    g.map(|g| g.to_dtype(like.dtype())).transpose()
}

impl<Op: CustomOp1> CustomOp1 for Widened<Op> {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let (w1, k1) = widen(s1, l1)?;
        narrow(self.op.cpu_fwd(&w1, &k1)?, dtype_of(s1))
    }

    fn bwd(&self, a1: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        back(self.op.bwd(&wide(a1)?, &wide(res)?, &wide(g)?)?, a1)
    }
}

impl<Op: CustomOp2> CustomOp2 for Widened<Op> {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((w1, k1), (w2, k2)) = (widen(s1, l1)?, widen(s2, l2)?);
        narrow(self.op.cpu_fwd(&w1, &k1, &w2, &k2)?, dtype_of(s1))
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g1, g2) = self
            .op
            .bwd(&wide(a1)?, &wide(a2)?, &wide(res)?, &wide(g)?)?;
        Ok((back(g1, a1)?, back(g2, a2)?))
    }
}

impl<Op: CustomOp3> CustomOp3 for Widened<Op> {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((w1, k1), (w2, k2), (w3, k3)) = (widen(s1, l1)?, widen(s2, l2)?, widen(s3, l3)?);
        narrow(self.op.cpu_fwd(&w1, &k1, &w2, &k2, &w3, &k3)?, dtype_of(s1))
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (g1, g2, g3) =
            self.op
                .bwd(&wide(a1)?, &wide(a2)?, &wide(a3)?, &wide(res)?, &wide(g)?)?;
        Ok((back(g1, a1)?, back(g2, a2)?, back(g3, a3)?))
    }
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        Widened {
            op: RmsNorm { eps: eps as f32 },
        },
    )
}

pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        Widened {
            op: LayerNorm { eps: eps as f32 },
        },
    )
}

/// Rotary embedding of x (b, l, heads, d) with cos, sin (b, l, d); returns (b, heads, l, d).
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Widened { op: Rotary },
    )
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, Widened { op: SwiGlu })
}

pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Widened {
        op: XSigmoid::Quick,
    })
}

pub fn gelu_tanh_op(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Widened { op: XSigmoid::Tanh })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn var(shape: &[usize], seed: u64) -> Var {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0) * 1.7)
            .collect();
        Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Forward values and the gradients of `Σ out · g` with respect to `inputs` agree between
    /// the fused op and the composed formula (differentiated by candle's autograd).
    fn check(name: &str, inputs: &[&Var], fused: &Tensor, composed: &Tensor, tol: f32) {
        assert_eq!(fused.dims(), composed.dims(), "{name}: shapes");
        let d = max_diff(fused, composed);
        assert!(d < tol, "{name}: forward differs by {d}");
        let g = Tensor::from_vec(
            (0..fused.elem_count())
                .map(|i| (i as f32 * 0.61).sin())
                .collect::<Vec<_>>(),
            fused.shape(),
            &Device::Cpu,
        )
        .unwrap();
        let gf = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composed * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (a, b) = (
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
            );
            let d = max_diff(a, b);
            assert!(d < tol, "{name}: gradient of input {i} differs by {d}");
        }
    }

    #[test]
    fn fused_ops_equal_their_composed_formulas() {
        // 130 rows: more than one parallel chunk of ROWS, with a ragged last one.
        let (x, w, b) = (var(&[2, 65, 24], 1), var(&[24], 2), var(&[24], 3));
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());

        let rms = {
            let var = xt.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            xt.broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(wt)
                .unwrap()
        };
        check(
            "rms-norm",
            &[&x, &w],
            &rms_norm(xt, wt, 1e-6).unwrap(),
            &rms,
            2e-5,
        );

        let ln = {
            let c = xt
                .broadcast_sub(&xt.mean_keepdim(D::Minus1).unwrap())
                .unwrap();
            let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            c.broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(wt)
                .unwrap()
                .broadcast_add(bt)
                .unwrap()
        };
        check(
            "layer-norm",
            &[&x, &w, &b],
            &layer_norm(xt, wt, bt, 1e-6).unwrap(),
            &ln,
            2e-5,
        );

        // Rotary: x (b, l, heads, d), tables (b, l, d).
        let q = var(&[2, 5, 3, 8], 4);
        let angles: Vec<f32> = (0..2 * 5 * 8).map(|i| i as f32 * 0.37).collect();
        let ang = Tensor::from_vec(angles, (2, 5, 8), &Device::Cpu).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let qt = q.as_tensor().transpose(1, 2).unwrap();
        let (c, s) = (cos.unsqueeze(1).unwrap(), sin.unsqueeze(1).unwrap());
        let half = 4;
        let rot = Tensor::cat(
            &[
                &qt.narrow(D::Minus1, half, half).unwrap().neg().unwrap(),
                &qt.narrow(D::Minus1, 0, half).unwrap(),
            ],
            D::Minus1,
        )
        .unwrap();
        let composed = (qt.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap();
        check(
            "rotary",
            &[&q],
            &rotary(q.as_tensor(), &cos, &sin).unwrap(),
            &composed,
            1e-5,
        );

        let (g, u) = (var(&[3, 7000], 5), var(&[3, 7000], 6)); // several CHUNKs
        let composed = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        check(
            "swiglu",
            &[&g, &u],
            &swiglu(g.as_tensor(), u.as_tensor()).unwrap(),
            &composed,
            1e-5,
        );

        let composed = g
            .as_tensor()
            .mul(&candle_nn::ops::sigmoid(&(g.as_tensor() * 1.702).unwrap()).unwrap())
            .unwrap();
        check(
            "quick-gelu",
            &[&g],
            &quick_gelu(g.as_tensor()).unwrap(),
            &composed,
            1e-5,
        );

        // candle's own gelu (the tanh form, libm's tanhf) and its autograd.
        let composed = g.as_tensor().gelu().unwrap();
        check(
            "gelu-tanh",
            &[&g],
            &gelu_tanh_op(g.as_tensor()).unwrap(),
            &composed,
            1e-5,
        );
        // Far into both tails: x there, and -0 (no NaN from an overflowing exp).
        let tails = Tensor::new(&[-60f32, -12.0, 12.0, 60.0], &Device::Cpu).unwrap();
        let y = gelu_tanh_op(&tails).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(y, [-0.0, -0.0, 12.0, 60.0]);
    }
}
