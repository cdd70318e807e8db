//! Scaled dot-product attention as one candle op with a hand-written backward pass.
//!
//! Composed from tensor ops, attention keeps the scores, the scaled scores, the masked
//! scores and the softmax's intermediates (each queries x keys per head) alive for the
//! backward pass: most of a training micro-batch's activation memory. This op keeps nothing
//! but its inputs and output: the backward pass recomputes the probabilities (two small
//! matmuls) and applies the softmax's Jacobian row by row. Grouped-query attention is native:
//! the `rep` query heads sharing a key/value head are the rows of one block.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, Mat};
use super::softmax::softmax_prefix;
use super::storage_f32;

/// Which keys a query sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Visibility {
    /// Every key.
    All,
    /// Query `i` (of this pass) sees keys `0..=past + i`: `past` cached or prefix keys come
    /// first.
    Causal { past: usize },
}

/// `softmax(q kᵀ · scale + mask) v` for q (blocks, rows, d) where the rows of a block are
/// `rows / queries` heads of `queries` queries each, and k, v (blocks, keys, d).
#[derive(Debug, Clone, Copy)]
pub struct Attention {
    pub scale: f32,
    /// Queries per head (rows of a block are head-major: row r is query r % queries).
    pub queries: usize,
    pub visibility: Visibility,
}

/// Checked geometry of one call.
struct Dims {
    blocks: usize,
    rows: usize,
    keys: usize,
    d: usize,
}

fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

impl Attention {
    fn dims(&self, q: &Shape, k: &Shape, v: &Shape) -> Result<Dims> {
        let (q, k, v) = (q.dims(), k.dims(), v.dims());
        if q.len() < 2 || k.len() != q.len() || v.len() != q.len() {
            candle_core::bail!("attention: shapes {q:?}, {k:?}, {v:?}");
        }
        let n = q.len();
        let blocks: usize = q[..n - 2].iter().product();
        let (rows, d) = (q[n - 2], q[n - 1]);
        let keys = k[n - 2];
        if k[..n - 2] != q[..n - 2]
            || v[..n - 2] != q[..n - 2]
            || k[n - 1] != d
            || v[n - 1] != d
            || v[n - 2] != keys
        {
            candle_core::bail!("attention: shapes {q:?}, {k:?}, {v:?} do not fit");
        }
        if self.queries == 0 || rows % self.queries != 0 {
            candle_core::bail!(
                "attention: {rows} rows are not whole heads of {} queries",
                self.queries
            );
        }
        if let Visibility::Causal { past } = self.visibility {
            if past + self.queries != keys {
                candle_core::bail!(
                    "attention: {} queries after {past} past keys need {} keys, got {keys}",
                    self.queries,
                    past + self.queries
                );
            }
        }
        Ok(Dims {
            blocks,
            rows,
            keys,
            d,
        })
    }

    /// Keys visible to row `r`.
    fn visible(&self, r: usize, keys: usize) -> usize {
        match self.visibility {
            Visibility::All => keys,
            Visibility::Causal { past } => (past + r % self.queries + 1).min(keys),
        }
    }

    /// Probabilities of the block's rows `first..first + q.len() / d` (n x keys) into `p`,
    /// on `threads` threads.
    fn probs_rows(
        &self,
        q: &[f32],
        k: &[f32],
        first: usize,
        dm: &Dims,
        p: &mut [f32],
        threads: usize,
    ) {
        let (keys, d) = (dm.keys, dm.d);
        let n = q.len() / d;
        matmul(
            p,
            Mat::rows(q, n, d),
            Mat::rows(k, keys, d).t(),
            1.0,
            false,
            threads,
        );
        for (r, row) in p.chunks_mut(keys).enumerate() {
            softmax_prefix(row, self.visible(first + r, keys), self.scale);
        }
    }

    /// The block's probabilities (rows x keys) into `p`.
    fn probs(&self, q: &[f32], k: &[f32], dm: &Dims, p: &mut [f32]) {
        let (rows, keys, d) = (dm.rows, dm.keys, dm.d);
        matmul(
            p,
            Mat::rows(q, rows, d),
            Mat::rows(k, keys, d).t(),
            1.0,
            false,
            threads(),
        );
        p.par_chunks_mut(keys).enumerate().for_each(|(r, row)| {
            softmax_prefix(row, self.visible(r, keys), self.scale);
        });
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = self.dims(ql.shape(), kl.shape(), vl.shape())?;
        let (q, k, v) = (
            storage_f32(qs, ql, "q")?,
            storage_f32(ks, kl, "k")?,
            storage_f32(vs, vl, "v")?,
        );
        let (rows, keys, d) = (dm.rows, dm.keys, dm.d);
        let mut out = vec![0f32; dm.blocks * rows * d];
        if rows == 0 || d == 0 {
            return Ok((CpuStorage::F32(out), ql.shape().clone()));
        }
        // Every (block, chunk of rows) is one single-threaded task: its scores, softmax and
        // product with v stay in that core's cache (about 512 KB of probabilities), and the
        // tasks spread over the cores with no synchronisation inside a head. Splitting each
        // head's two products over the cores instead (one parallel gemm after the other,
        // the whole queries x keys matrix through L3 in between) ran a 1,024-patch vision
        // head at 141 GFLOPS on 2 cores.
        let chunk = ((128 << 10) / keys.max(1)).clamp(16, 256).min(rows);
        out.par_chunks_mut(rows * d)
            .enumerate()
            .for_each(|(b, ob)| {
                let qb = &q[b * rows * d..(b + 1) * rows * d];
                let kb = &k[b * keys * d..(b + 1) * keys * d];
                let vb = &v[b * keys * d..(b + 1) * keys * d];
                ob.par_chunks_mut(chunk * d).enumerate().for_each_init(
                    || vec![0f32; chunk * keys],
                    |p, (c, oc)| {
                        let r0 = c * chunk;
                        let n = oc.len() / d;
                        let pc = &mut p[..n * keys];
                        self.probs_rows(&qb[r0 * d..(r0 + n) * d], kb, r0, &dm, pc, 1);
                        matmul(
                            oc,
                            Mat::rows(pc, n, keys),
                            Mat::rows(vb, keys, d),
                            1.0,
                            false,
                            1,
                        );
                    },
                );
            });
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = self.dims(q.shape(), k.shape(), v.shape())?;
        let (q, k, v, g) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            grad.contiguous()?,
        );
        let (rows, keys, d) = (dm.rows, dm.keys, dm.d);
        let mut dq = vec![0f32; dm.blocks * rows * d];
        let mut dk = vec![0f32; dm.blocks * keys * d];
        let mut dv = vec![0f32; dm.blocks * keys * d];
        let ok = super::with_f32(&q, |q| {
            super::with_f32(&k, |k| {
                super::with_f32(&v, |v| {
                    super::with_f32(&g, |g| {
                        let mut p = vec![0f32; rows * keys];
                        let mut dp = vec![0f32; rows * keys];
                        for b in 0..dm.blocks {
                            let rq = b * rows * d..(b + 1) * rows * d;
                            let rk = b * keys * d..(b + 1) * keys * d;
                            let (qb, kb, vb, gb) = (
                                &q[rq.clone()],
                                &k[rk.clone()],
                                &v[rk.clone()],
                                &g[rq.clone()],
                            );
                            self.probs(qb, kb, &dm, &mut p);
                            // dP = dO vᵀ; dV = Pᵀ dO
                            let t = threads();
                            matmul(
                                &mut dp,
                                Mat::rows(gb, rows, d),
                                Mat::rows(vb, keys, d).t(),
                                1.0,
                                false,
                                t,
                            );
                            matmul(
                                &mut dv[rk.clone()],
                                Mat::rows(&p, rows, keys).t(),
                                Mat::rows(gb, rows, d),
                                1.0,
                                false,
                                t,
                            );
                            // dS = P ∘ (dP - rowsum(dP ∘ P)) · scale, in place over dP.
                            let scale = self.scale;
                            dp.par_chunks_mut(keys)
                                .zip(p.par_chunks(keys))
                                .for_each(|(dr, pr)| {
                                    let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                                    for (x, &pv) in dr.iter_mut().zip(pr) {
                                        *x = pv * (*x - dot) * scale;
                                    }
                                });
                            // dQ = dS k; dK = dSᵀ q
                            matmul(
                                &mut dq[rq.clone()],
                                Mat::rows(&dp, rows, keys),
                                Mat::rows(kb, keys, d),
                                1.0,
                                false,
                                t,
                            );
                            matmul(
                                &mut dk[rk],
                                Mat::rows(&dp, rows, keys).t(),
                                Mat::rows(qb, rows, d),
                                1.0,
                                false,
                                t,
                            );
                        }
                    })
                })
            })
        })
        .flatten()
        .flatten()
        .flatten();
        if ok.is_none() {
            candle_core::bail!("attention backward: inputs are not f32 on the CPU");
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Whether [`attention`] can run these tensors (f32, on the CPU).
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    super::elementwise::applies(&[q, k, v])
}

/// Attention of q (.., rows, d) over k, v (.., keys, d): see [`Attention`]. bf16 inputs run
/// widened to f32, the output rounded to bf16 once ([`super::elementwise::Widened`]).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, op: Attention) -> Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        super::elementwise::Widened { op },
    )
}

/// One query per head against a KV cache (decoding): `softmax(q kᵀ · scale) v` for q
/// (b, heads, 1, d) contiguous and k, v (b, kv_heads, keys, d) whose rows of d are
/// contiguous but whose heads may sit further apart (views of the first `keys` positions of
/// a larger cache buffer, read in place). The `heads / kv_heads` query heads sharing a KV
/// head are one task, which reads its keys and values once. `None` when the tensors are not
/// f32 CPU tensors of that shape outside any gradient graph: the caller then composes the
/// plain ops. Why: through candle's matmuls, the two small products per head (one row of
/// scores, one weighted sum) were about 9% of 4-bit decoding at the 2B shape (2 threads,
/// AMD EPYC Zen 4), mostly gemm's fixed cost per call.
pub fn decode(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Option<Tensor>> {
    if !applies(q, k, v) || [q, k, v].iter().any(|t| t.track_op()) {
        return Ok(None);
    }
    let (b, heads, l, d) = q.dims4()?;
    let (kb, kv_heads, keys, kd) = k.dims4()?;
    if l != 1 || kb != b || kd != d || v.dims4()? != (b, kv_heads, keys, d) {
        return Ok(None);
    }
    if kv_heads == 0 || heads % kv_heads != 0 || keys == 0 || !q.is_contiguous() {
        return Ok(None);
    }
    let rep = heads / kv_heads;
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (qs, ql) = q.storage_and_layout();
    let (
        candle_core::Storage::Cpu(CpuStorage::F32(kd_)),
        candle_core::Storage::Cpu(CpuStorage::F32(vd_)),
        candle_core::Storage::Cpu(CpuStorage::F32(qd_)),
    ) = (&*ks, &*vs, &*qs)
    else {
        return Ok(None);
    };
    // Rows of d contiguous and consecutive positions d apart; (batch, head) blocks
    // anywhere (the strides say where).
    let head_offsets = |l: &Layout| -> Option<(usize, usize, usize)> {
        let st = l.stride();
        (st[3] == 1 && st[2] == d).then_some((l.start_offset(), st[0], st[1]))
    };
    let (Some(ko), Some(vo)) = (head_offsets(kl), head_offsets(vl)) else {
        return Ok(None);
    };
    let qd = &qd_[ql.start_offset()..ql.start_offset() + b * heads * d];
    let mut out = vec![0f32; b * heads * d];
    let work = |t: usize, out: &mut [f32]| {
        let (bi, h) = (t / kv_heads, t % kv_heads);
        let kbase = ko.0 + bi * ko.1 + h * ko.2;
        let vbase = vo.0 + bi * vo.1 + h * vo.2;
        let kh = &kd_[kbase..kbase + keys * d];
        let vh = &vd_[vbase..vbase + keys * d];
        let qh = &qd[t * rep * d..(t + 1) * rep * d];
        let mut p = vec![0f32; rep * keys];
        head(qh, kh, vh, d, scale, &mut p, out);
    };
    // A short cache is less work than handing it to the pool.
    if b * heads * keys * d < 1 << 16 {
        out.chunks_mut(rep * d)
            .enumerate()
            .for_each(|(t, o)| work(t, o));
    } else {
        super::team::for_each_chunk(&mut out, rep * d, &|t, o| work(t, o));
    }
    Ok(Some(Tensor::from_vec(out, (b, heads, 1, d), q.device())?))
}

/// One KV head of [`decode`]: `out (rep x d) = softmax(q kᵀ · scale) v` for the rep query
/// rows sharing it, k and v (keys x d); `p` (rep x keys) is scratch. The query rows go
/// through the cache together, up to four at a time, so each key and value row is loaded
/// once per group and the rows' sums are independent chains: one row at a time, a dot
/// product of 128 was one chain of dependent adds, and the cache (1-2% of the weight bytes
/// per token) took ~3.7% of a 2B bf16 decode (AMD EPYC Zen 4, 2 threads, perf cpu-clock).
fn head(q: &[f32], k: &[f32], v: &[f32], d: usize, scale: f32, p: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the features each path is compiled for are present.
        if super::has_avx512() {
            return unsafe { simd::head_avx512(q, k, v, d, scale, p, out) };
        }
        if super::has_avx2() {
            return unsafe { simd::head_avx2(q, k, v, d, scale, p, out) };
        }
    }
    head_body::<false, false>(q, k, v, d, scale, p, out)
}

#[cfg(target_arch = "x86_64")]
mod simd {
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn head_avx512(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: usize,
        scale: f32,
        p: &mut [f32],
        out: &mut [f32],
    ) {
        super::head_body::<true, true>(q, k, v, d, scale, p, out)
    }

    /// # Safety
    /// AVX2 and FMA must be present.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn head_avx2(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: usize,
        scale: f32,
        p: &mut [f32],
        out: &mut [f32],
    ) {
        super::head_body::<true, false>(q, k, v, d, scale, p, out)
    }

    /// [`super::group`]'s scores with AVX-512: per key, the R rows' 16-lane sums, reduced
    /// together (a scalar tree per row is what the compiler made of the portable loop).
    ///
    /// # Safety
    /// AVX-512F must be present, R <= 4, `d` a multiple of 16, q R x d, k `keys` x d and p R
    /// x keys values.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn scores<const R: usize>(q: &[f32], k: &[f32], d: usize, p: &mut [f32]) {
        use std::arch::x86_64::*;
        let keys = k.len() / d;
        assert!(R <= 4 && d.is_multiple_of(16) && q.len() >= R * d && p.len() >= R * keys);
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        for j in 0..keys {
            let mut acc = [_mm512_setzero_ps(); 4];
            for c in (0..d).step_by(16) {
                let kv = _mm512_loadu_ps(kp.add(j * d + c));
                for (r, a) in acc.iter_mut().enumerate().take(R) {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(r * d + c)), kv, *a);
                }
            }
            let mut sums = [0f32; 4];
            // Lane r: row r's sum.
            _mm_storeu_ps(sums.as_mut_ptr(), crate::kernels::bf16dot::hsum4(&acc));
            for (r, &s) in sums.iter().enumerate().take(R) {
                *p.get_unchecked_mut(r * keys + j) = s;
            }
        }
    }
}

/// `a * b + c`, fused where the caller is compiled for FMA (else `mul_add` would be a
/// library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`head`]'s work, written so the compiler vectorises it for the features of its caller.
#[inline(always)]
fn head_body<const FMA: bool, const AVX512: bool>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    scale: f32,
    p: &mut [f32],
    out: &mut [f32],
) {
    let keys = k.len() / d;
    let mut r = 0;
    let rep = q.len() / d;
    while r < rep {
        let n = (rep - r).min(4);
        let (qg, pg, og) = (
            &q[r * d..(r + n) * d],
            &mut p[r * keys..(r + n) * keys],
            &mut out[r * d..(r + n) * d],
        );
        match n {
            4 => group::<4, FMA, AVX512>(qg, k, v, d, scale, pg, og),
            3 => group::<3, FMA, AVX512>(qg, k, v, d, scale, pg, og),
            2 => group::<2, FMA, AVX512>(qg, k, v, d, scale, pg, og),
            _ => group::<1, FMA, AVX512>(qg, k, v, d, scale, pg, og),
        }
        r += n;
    }
}

/// `p (R x keys) = q (R x d) kᵀ`, portable: per key, R sums of 16 lanes, each summed as a
/// tree, then the tail of d.
#[inline(always)]
fn scores<const R: usize, const FMA: bool>(q: &[f32], k: &[f32], d: usize, p: &mut [f32]) {
    let keys = k.len() / d;
    let whole = d / 16 * 16;
    for (j, kj) in k.chunks_exact(d).enumerate() {
        let mut acc = [[0f32; 16]; R];
        for c in (0..whole).step_by(16) {
            let kc: &[f32; 16] = kj[c..c + 16].try_into().unwrap();
            for (r, a) in acc.iter_mut().enumerate() {
                let qc: &[f32; 16] = q[r * d + c..r * d + c + 16].try_into().unwrap();
                for l in 0..16 {
                    a[l] = madd::<FMA>(qc[l], kc[l], a[l]);
                }
            }
        }
        for (r, a) in acc.iter_mut().enumerate() {
            for w in [8, 4, 2, 1] {
                for l in 0..w {
                    a[l] += a[l + w];
                }
            }
            let mut s = a[0];
            for c in whole..d {
                s = madd::<FMA>(q[r * d + c], kj[c], s);
            }
            p[r * keys + j] = s;
        }
    }
}

/// R query rows: scores, softmax, weighted sum of the values.
#[inline(always)]
fn group<const R: usize, const FMA: bool, const AVX512: bool>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    scale: f32,
    p: &mut [f32],
    out: &mut [f32],
) {
    let keys = k.len() / d;
    // Scores: per key, R sums of 16 lanes, each summed as a tree, then the tail of d.
    #[cfg(target_arch = "x86_64")]
    if AVX512 && d.is_multiple_of(16) {
        // SAFETY: AVX512 is true only on the AVX-512 path; d % 16 == 0, and q, k, p hold
        // R x d, keys x d and R x keys values.
        unsafe { simd::scores::<R>(q, k, d, p) };
    } else {
        scores::<R, FMA>(q, k, d, p);
    }
    #[cfg(not(target_arch = "x86_64"))]
    scores::<R, FMA>(q, k, d, p);
    for row in p.chunks_exact_mut(keys) {
        softmax_prefix(row, keys, scale);
    }
    // Weighted sum, 64 columns of the R rows at a time held in registers over all keys.
    let mut c0 = 0;
    while c0 < d {
        let w = (d - c0).min(64);
        if w == 64 {
            let mut acc = [[0f32; 64]; R];
            for (j, vj) in v.chunks_exact(d).enumerate() {
                let vc: &[f32; 64] = vj[c0..c0 + 64].try_into().unwrap();
                for (r, a) in acc.iter_mut().enumerate() {
                    let pj = p[r * keys + j];
                    for l in 0..64 {
                        a[l] = madd::<FMA>(pj, vc[l], a[l]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                out[r * d + c0..r * d + c0 + 64].copy_from_slice(a);
            }
        } else {
            for (j, vj) in v.chunks_exact(d).enumerate() {
                for r in 0..R {
                    let pj = p[r * keys + j];
                    for l in c0..d {
                        out[r * d + l] = madd::<FMA>(pj, vj[l], out[r * d + l]);
                    }
                }
            }
        }
        c0 += w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The same attention from tensor ops (scores, additive mask, softmax, matmul), whose
    /// gradients candle's autograd derives.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, op: Attention) -> Tensor {
        let (rows, keys) = (q.dim(2).unwrap(), k.dim(2).unwrap());
        let mut mask = vec![0f32; rows * keys];
        for r in 0..rows {
            for j in op.visible(r, keys)..keys {
                mask[r * keys + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(mask, (rows, keys), q.device()).unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() * op.scale as f64)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        candle_nn::ops::softmax(&s, D::Minus1)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    #[test]
    fn forward_and_gradients_equal_the_composed_ops() {
        let dev = Device::Cpu;
        // 2 blocks (batch x kv heads), 3 query heads per kv head, 5 queries, 4 past keys.
        for (vis, queries, keys) in [
            (Visibility::Causal { past: 4 }, 5, 9),
            (Visibility::Causal { past: 0 }, 7, 7),
            (Visibility::All, 6, 11),
        ] {
            let rows = 3 * queries;
            let mk = |r, seed: u64| {
                let n = 2 * r * 8;
                let data: Vec<f32> = (0..n)
                    .map(|i| ((i as u64 * 7919 + seed) % 1000) as f32 / 500.0 - 1.0)
                    .collect();
                Var::from_tensor(&Tensor::from_vec(data, (1, 2, r, 8), &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (mk(rows, 1), mk(keys, 2), mk(keys, 3));
            let op = Attention {
                scale: 0.35,
                queries,
                visibility: vis,
            };
            let g = Tensor::from_vec(
                (0..2 * rows * 8)
                    .map(|i| (i as f32 * 0.37).sin())
                    .collect::<Vec<_>>(),
                (1, 2, rows, 8),
                &dev,
            )
            .unwrap();
            let want = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), op);
            let got = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), op).unwrap();
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(diff(&got, &want) < 1e-5, "{vis:?} forward");
            let gw = (want * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = (got * &g).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (
                    gg.get(t.as_tensor()).unwrap(),
                    gw.get(t.as_tensor()).unwrap(),
                );
                assert!(diff(a, b) < 1e-5, "{vis:?} d{name}: {}", diff(a, b));
            }
        }
    }

    /// Each compiled path of the per-head kernel (portable, and AVX2 / AVX-512 where this
    /// CPU has them) gives the f64 definition for groups of 1-9 query rows and head widths
    /// with and without tails.
    #[test]
    fn every_path_of_the_head_kernel_matches_the_definition() {
        type Path = fn(&[f32], &[f32], &[f32], usize, f32, &mut [f32], &mut [f32]);
        let mut paths: Vec<(&str, Path)> = vec![("portable", head_body::<false, false>)];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::kernels::has_avx2() {
                paths.push(("avx2", |q, k, v, d, s, p, o| unsafe {
                    simd::head_avx2(q, k, v, d, s, p, o)
                }));
            }
            if crate::kernels::has_avx512() {
                paths.push(("avx512", |q, k, v, d, s, p, o| unsafe {
                    simd::head_avx512(q, k, v, d, s, p, o)
                }));
            }
        }
        for (name, path) in paths {
            for &(rep, keys, d) in &[
                (1, 5, 128),
                (4, 31, 64),
                (6, 200, 128),
                (9, 17, 80),
                (2, 3, 7),
            ] {
                let val = |n: usize, f: f32| -> Vec<f32> {
                    (0..n).map(|i| ((i as f32 + 1.0) * f).sin()).collect()
                };
                let (q, k, v) = (val(rep * d, 0.37), val(keys * d, 0.11), val(keys * d, 0.23));
                let scale = 0.3;
                let mut p = vec![f32::NAN; rep * keys];
                let mut out = vec![0f32; rep * d];
                path(&q, &k, &v, d, scale, &mut p, &mut out);
                for r in 0..rep {
                    let s: Vec<f64> = (0..keys)
                        .map(|j| {
                            (0..d)
                                .map(|c| q[r * d + c] as f64 * k[j * d + c] as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..keys).map(|j| e[j] / z * v[j * d + c] as f64).sum();
                        let got = out[r * d + c] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{name} ({rep},{keys},{d}) [{r},{c}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// One query per head against views of a larger cache buffer (read in place) gives the
    /// definition computed in f64: grouped heads, two batch rows, a head width that is not
    /// a whole number of 16-lane chunks, short caches (one thread) and long ones (the pool).
    /// Tensors it does not take (a gradient graph, two queries) are declined.
    #[test]
    fn decoding_attention_reads_the_cache_in_place_and_matches_the_definition() {
        let dev = Device::Cpu;
        // Groups of 1-8 query heads per KV head (whole groups of four and remainders),
        // head widths with and without a tail past 16 or 64 lanes.
        for &(b, heads, kv_heads, keys, d) in &[
            (1, 6, 2, 1, 20),
            (2, 6, 2, 7, 20),
            (1, 12, 2, 700, 128),
            (2, 4, 4, 300, 64),
            (1, 14, 2, 90, 80),
            (1, 16, 2, 33, 128),
            (2, 5, 1, 40, 72),
            (1, 3, 3, 300, 128),
            (1, 16, 8, 64, 16),
        ] {
            let cap = keys + 5;
            let val = |n: usize, f: f32| -> Vec<f32> {
                (0..n).map(|i| ((i as f32 + 1.0) * f).sin()).collect()
            };
            let q = Tensor::from_vec(val(b * heads * d, 0.37), (b, heads, 1, d), &dev).unwrap();
            let kbuf = Tensor::from_vec(
                val(b * kv_heads * cap * d, 0.11),
                (b, kv_heads, cap, d),
                &dev,
            )
            .unwrap();
            let vbuf = Tensor::from_vec(
                val(b * kv_heads * cap * d, 0.23),
                (b, kv_heads, cap, d),
                &dev,
            )
            .unwrap();
            let (k, v) = (
                kbuf.narrow(2, 0, keys).unwrap(),
                vbuf.narrow(2, 0, keys).unwrap(),
            );
            assert!(!k.is_contiguous() || keys == cap);
            let scale = (d as f32).powf(-0.5);
            let got = decode(&q, &k, &v, scale).unwrap().expect("decode declined");
            assert_eq!(got.dims(), &[b, heads, 1, d]);
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            let (qv, kv, vv) = (
                q.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                kbuf.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                vbuf.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let rep = heads / kv_heads;
            for bi in 0..b {
                for h in 0..heads {
                    let kh = h / rep;
                    let at = |buf: &[f32], j: usize, c: usize| {
                        buf[((bi * kv_heads + kh) * cap + j) * d + c] as f64
                    };
                    let qr = |c: usize| qv[(bi * heads + h) * d + c] as f64;
                    let s: Vec<f64> = (0..keys)
                        .map(|j| (0..d).map(|c| qr(c) * at(&kv, j, c)).sum::<f64>() * scale as f64)
                        .collect();
                    let max = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..keys).map(|j| e[j] / z * at(&vv, j, c)).sum();
                        let g = got[(bi * heads + h) * d + c] as f64;
                        assert!(
                            (g - want).abs() < 1e-5,
                            "({b},{heads},{kv_heads},{keys},{d}) [{bi},{h},{c}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
        // Declined: two queries, and a query in a gradient graph.
        let k = Tensor::zeros((1, 2, 4, 8), candle_core::DType::F32, &dev).unwrap();
        let q2 = Tensor::zeros((1, 2, 2, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(decode(&q2, &k, &k, 1.0).unwrap().is_none());
        let qv = Var::zeros((1, 2, 1, 8), candle_core::DType::F32, &dev).unwrap();
        let tracked = (qv.as_tensor() * 1.0).unwrap();
        assert!(decode(&tracked, &k, &k, 1.0).unwrap().is_none());
    }
}
