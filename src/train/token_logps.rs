//! The log-probability of each target token under the output projection (the LM head), and
//! its gradient, computed by hand rather than through candle's autograd.
//!
//! Through autograd, `log_softmax(h · Wᵀ)` gathered at the targets keeps the logits, the
//! log-softmax and its backward intermediates (several tokens x vocabulary tensors: 311 MB
//! each for 512 tokens of Qwen2-VL's 151,936-word vocabulary), scatters the gathered
//! gradient into a zero tensor of that size, and spends longer on those element-wise passes
//! than on the matmuls. Here the forward pass keeps only the softmax (when a backward pass
//! will follow), and the backward pass turns it in place into `∂L/∂logits = g (onehot - p)
//! / T` and runs the two matmuls: `∂L/∂h = G · W` and `∂L/∂W += Gᵀ · h`, the latter added
//! straight into the accumulated gradient. On CPU the matmuls call gemm and the softmax runs
//! in [`crate::kernels::softmax`]; elsewhere the same formulas run as tensor ops. Each
//! token's entropy (GRPO's `entropy` metric and high-entropy mask) comes, when asked for, from
//! the same pass over the logits.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor, D};

use crate::kernels::gemm::{matmul, matmul_strided, Mat};
use crate::kernels::{
    bf16dot, cpu_kernels, is_cpu_f32_contiguous, softmax, with_bf16, with_f32, workspace,
};

/// Logit rows computed at once when no backward pass follows. The matmul packs the whole
/// weight once per call, so fewer, larger chunks cost less: 320 MB holds ~512 rows of
/// Qwen2-VL's vocabulary, where packing is ~5% of the multiply.
const ROWS_PER_CHUNK_BYTES: usize = 320 << 20;

/// Rows of a bf16 head widened to f32 at a time in the backward pass (8 MB).
const WIDENED_BLOCK_BYTES: usize = 8 << 20;

/// What the backward pass needs from the forward pass.
pub struct Saved {
    /// softmax(h · Wᵀ / T), (tokens x vocab).
    probs: Probs,
    hidden: Tensor,
    targets: Vec<u32>,
    inv_temp: f32,
}

enum Probs {
    Cpu(Vec<f32>),
    Tensor(Tensor),
}

fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// What [`forward`] returns.
pub struct Forward {
    /// `log_softmax(hidden · weightᵀ / temperature)[t, targets[t]]` for every row `t`.
    pub logp: Vec<f32>,
    /// When asked for: each row's entropy `-Σ p log p` of `softmax(hidden · weightᵀ /
    /// temperature)`, in nats (no gradient).
    pub entropy: Option<Vec<f32>>,
    /// What [`Saved::backward`] needs, when `keep` was set.
    pub saved: Option<Saved>,
}

/// The log-probabilities of `targets` under `hidden · weightᵀ / temperature` for every row of
/// `hidden` (tokens x h, no gradient tracked), with each row's entropy when `entropy` is set
/// (from the same pass over the logits on the CPU) and what [`Saved::backward`] needs when
/// `keep` is set. `weight` is (vocab x h).
pub fn forward(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    temperature: f64,
    keep: bool,
    entropy: bool,
) -> Result<Forward> {
    let (t, h) = hidden.dims2()?;
    let (vocab, hw) = weight.dims2()?;
    if hw != h || targets.len() != t {
        bail!(
            "token log-probs: hidden states ({t}, {h}), weight ({vocab}, {hw}), {} targets",
            targets.len()
        );
    }
    if let Some(&bad) = targets.iter().find(|&&x| x as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary ({vocab})");
    }
    let inv_temp = (1.0 / temperature) as f32;
    // bf16 runs on the CPU take the kernels too: the tensor ops below hold several tokens x
    // vocabulary f32 tensors at once and (for a bf16 weight) an f32 copy of the weight,
    // which made the LM head the largest part of a bf16 step's memory and time. bf16 hidden
    // states (bf16 compute) multiply on bf16 dot products, as PyTorch's autocast multiplies
    // them: an f32 weight and the logits' gradient rounded to bf16, sums in f32 (the
    // logits and the weight's gradient stay f32, where autocast rounds them too). Against a
    // bf16 weight f32 hidden states are rounded to bf16, as bf16 inference's LM head does.
    let hidden_cpu = if cpu_kernels() && hidden.device().is_cpu() {
        match (hidden.dtype(), weight.dtype()) {
            (DType::F32, _) => Some(hidden.contiguous()?),
            (DType::BF16, DType::F32 | DType::BF16) if bf16dot::available() => {
                Some(hidden.contiguous()?)
            }
            // Without bf16 dot products the product runs in f32 (a bf16 weight widened
            // exactly), as the tensor ops below would run it.
            (DType::BF16, DType::F32 | DType::BF16) => Some(hidden.to_dtype(DType::F32)?),
            _ => None,
        }
    } else {
        None
    };
    if let Some(hc) = hidden_cpu {
        let out = head_weight(weight, |w| {
            with_hidden(&hc, |hs| {
                cpu_forward(hs, w, (t, h, vocab), targets, inv_temp, keep, entropy)
            })
        })
        .flatten()
        .flatten();
        if let Some(out) = out {
            let saved = out.probs.map(|p| Saved {
                probs: Probs::Cpu(p),
                hidden: hc,
                targets: targets.to_vec(),
                inv_temp,
            });
            return Ok(Forward {
                logp: out.logp,
                entropy: out.entropy,
                saved,
            });
        }
    }
    // Any device: the same formulas as tensor ops, in f32 (the entropy as TRL's
    // `entropy_from_logits` writes it).
    let hf = hidden.to_dtype(DType::F32)?;
    let logits = (hf.matmul(&weight.to_dtype(DType::F32)?.t()?)? * inv_temp as f64)?;
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let idx = Tensor::from_vec(targets.to_vec(), (t, 1), hidden.device())?;
    let logp: Vec<f32> = lp.gather(&idx, 1)?.squeeze(1)?.to_vec1()?;
    let probs = if keep || entropy {
        Some(lp.exp()?)
    } else {
        None
    };
    let entropy = match (&probs, entropy) {
        (Some(p), true) => Some((p * &lp)?.sum(D::Minus1)?.neg()?.to_vec1()?),
        _ => None,
    };
    let saved = match probs {
        Some(p) if keep => Some(Saved {
            probs: Probs::Tensor(p),
            hidden: hf,
            targets: targets.to_vec(),
            inv_temp,
        }),
        _ => None,
    };
    Ok(Forward {
        logp,
        entropy,
        saved,
    })
}

/// The CPU kernels' results: log-probs, entropies when asked, the kept softmax.
struct CpuOut {
    logp: Vec<f32>,
    entropy: Option<Vec<f32>>,
    probs: Option<Vec<f32>>,
}

/// `log_softmax` picked at the targets (and the entropies) of one block of logit rows, in
/// place.
fn pick(
    logits: &mut [f32],
    vocab: usize,
    targets: &[u32],
    inv_temp: f32,
    keep: bool,
    entropy: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    if entropy {
        let (lp, h) = softmax::pick_log_softmax_entropy(logits, vocab, targets, inv_temp, keep);
        (lp, Some(h))
    } else {
        (
            softmax::pick_log_softmax(logits, vocab, targets, inv_temp, keep),
            None,
        )
    }
}

/// [`forward`]'s log-probabilities (no entropy, nothing kept) under a quantized LM head
/// (inference only: a quantized model, GRPO's `reference_quantize`): the logits are the
/// head's quantized product, exactly as [`crate::model::TextModel::logits`] computes them
/// (activations quantized per row, so a row's logits do not depend on its chunk), taken in
/// the chunks `forward` takes and picked by the same log-softmax. The head's dense weight
/// is then a placeholder of zeros, which `forward` would read.
pub fn forward_quantized(
    hidden: &Tensor,
    weight: &crate::kernels::quant::QWeight,
    targets: &[u32],
    temperature: f64,
) -> Result<Vec<f32>> {
    let (t, h) = hidden.dims2()?;
    let (vocab, k) = weight.dims();
    if k != h || targets.len() != t {
        bail!(
            "token log-probs: hidden states ({t}, {h}), quantized weight ({vocab}, {k}), {} \
             targets",
            targets.len()
        );
    }
    if let Some(&bad) = targets.iter().find(|&&x| x as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary ({vocab})");
    }
    let hs = hidden
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .contiguous()?;
    let inv_temp = (1.0 / temperature) as f32;
    let rows = (ROWS_PER_CHUNK_BYTES / (4 * vocab)).clamp(1, t.max(1));
    let logp = with_f32(&hs, |hs| {
        let mut buf = workspace::take(rows * vocab);
        let mut logp = Vec::with_capacity(t);
        for start in (0..t).step_by(rows) {
            let r = rows.min(t - start);
            let chunk = &mut buf[..r * vocab];
            weight.matmul(&hs[start * h..(start + r) * h], r, None, chunk);
            logp.extend(softmax::pick_log_softmax(
                chunk,
                vocab,
                &targets[start..start + r],
                inv_temp,
                false,
            ));
        }
        workspace::give(buf);
        logp
    });
    logp.ok_or_else(|| anyhow::anyhow!("token log-probs: hidden states not readable as f32"))
}

/// The LM head's weight (vocab x h) as the CPU kernels read it.
#[derive(Clone, Copy)]
enum HeadWeight<'a> {
    F32(&'a [f32]),
    /// (vocab x h), as checkpoints store it.
    Bf16(&'a [half::bf16]),
    /// Stored input-major, (h x vocab): a tied bf16 table readied for inference on a CPU
    /// without AVX-512 BF16 (`TextModel::pack_head_for_inference`), as GRPO's reference
    /// model holds it there.
    Bf16InputMajor(&'a [half::bf16]),
}

/// Runs `f` on the f32 or bf16 data of a CPU weight stored either way round; `None`
/// otherwise.
fn head_weight<R>(w: &Tensor, f: impl FnOnce(HeadWeight) -> R) -> Option<R> {
    match w.dtype() {
        DType::F32 if w.is_contiguous() => with_f32(w, |ws| f(HeadWeight::F32(ws))),
        DType::BF16 if w.is_contiguous() => with_bf16(w, |ws| f(HeadWeight::Bf16(ws))),
        DType::BF16 => {
            let wt = w.t().ok().filter(Tensor::is_contiguous)?;
            with_bf16(&wt, |ws| f(HeadWeight::Bf16InputMajor(ws)))
        }
        _ => None,
    }
}

/// Columns c0..c0 + cb of a bf16 head's `Wᵀ` (h x vocab), widened (exactly) into `dst`
/// (h x cb, row-major), on the pool's threads.
fn widen_head_block(
    w: HeadWeight,
    (h, vocab): (usize, usize),
    c0: usize,
    cb: usize,
    dst: &mut [f32],
) {
    use crate::kernels::skinny::WeightElem;
    use rayon::prelude::*;
    match w {
        // Rows c0.. of W are columns of Wᵀ: widened as they lie, (cb x h), read transposed.
        HeadWeight::Bf16(ws) => dst[..cb * h]
            .par_chunks_mut(4096)
            .zip(ws[c0 * h..(c0 + cb) * h].par_chunks(4096))
            .for_each(|(d, s)| half::bf16::widen(s, d)),
        HeadWeight::Bf16InputMajor(ws) => dst[..h * cb]
            .par_chunks_mut(cb)
            .enumerate()
            .for_each(|(p, d)| half::bf16::widen(&ws[p * vocab + c0..p * vocab + c0 + cb], d)),
        HeadWeight::F32(_) => unreachable!("an f32 head is read as it is"),
    }
}

/// The block of a widened head's columns as gemm reads it: (h x cb).
fn widened_block<'a>(w: HeadWeight, h: usize, cb: usize, wide: &'a [f32]) -> Mat<'a> {
    match w {
        HeadWeight::Bf16InputMajor(_) => Mat::rows(&wide[..h * cb], h, cb),
        _ => Mat::rows(&wide[..cb * h], cb, h).t(),
    }
}

/// `out (rows x vocab) = hs · Wᵀ` for a bf16 head widened `block` columns of `Wᵀ` at a
/// time, each block's product written in place into its columns of `out`.
fn widened_logits(
    hs: &[f32],
    w: HeadWeight,
    (rows, h, vocab): (usize, usize, usize),
    block: usize,
    out: &mut [f32],
) {
    let mut wide = vec![0f32; block * h];
    for c0 in (0..vocab).step_by(block) {
        let cb = block.min(vocab - c0);
        widen_head_block(w, (h, vocab), c0, cb, &mut wide);
        matmul_strided(
            &mut out[c0..],
            vocab,
            Mat::rows(hs, rows, h),
            widened_block(w, h, cb, &wide),
            1.0,
            false,
            threads(),
        );
    }
}

/// `dh (t x h) = g (t x vocab) · W` for a bf16 head widened `block` rows of `W` at a time.
fn widened_grad_hidden(
    g: &[f32],
    w: HeadWeight,
    (t, h, vocab): (usize, usize, usize),
    block: usize,
    dh: &mut [f32],
) {
    let mut wide = vec![0f32; block * h];
    for c0 in (0..vocab).step_by(block) {
        let cb = block.min(vocab - c0);
        widen_head_block(w, (h, vocab), c0, cb, &mut wide);
        let gb = Mat {
            data: &g[c0..],
            rows: t,
            cols: cb,
            row_stride: vocab,
            col_stride: 1,
        };
        // Rows c0.. of W are the block's columns of Wᵀ.
        let wblock = widened_block(w, h, cb, &wide).t();
        matmul(dh, gb, wblock, 1.0, c0 > 0, threads());
    }
}

/// Columns of a bf16 head widened per block (8 MB of f32 at a time).
fn widened_columns(h: usize, vocab: usize) -> usize {
    (WIDENED_BLOCK_BYTES / (4 * h.max(1))).clamp(1, vocab.max(1))
}

/// Hidden states on the CPU, f32 or bf16.
#[derive(Clone, Copy)]
enum Hidden<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

fn with_hidden<R>(h: &Tensor, f: impl FnOnce(Hidden) -> R) -> Option<R> {
    match h.dtype() {
        DType::F32 => with_f32(h, |hs| f(Hidden::F32(hs))),
        DType::BF16 => with_bf16(h, |hs| f(Hidden::Bf16(hs))),
        _ => None,
    }
}

/// `out (rows x vocab) = hidden rows · Wᵀ`: f32 gemm for an f32 weight (hidden states f32),
/// bf16 dot products for a bf16 weight, or without them (AVX2) f32 gemm on blocks of the
/// bf16 weight widened exactly (the tensor ops' values, without their f32 copy of the
/// whole head and the log-softmax's tokens x vocabulary tensors).
fn logits(hs: Hidden, w: HeadWeight, (rows, h, vocab): (usize, usize, usize), out: &mut [f32]) {
    let bf16_weight = !matches!(w, HeadWeight::F32(_));
    if bf16_weight && !bf16dot::available() {
        let widened: Vec<f32>;
        let hs = match hs {
            Hidden::F32(v) => v,
            // `forward` widens bf16 hidden states here; exact either way.
            Hidden::Bf16(v) => {
                widened = v.iter().map(|x| x.to_f32()).collect();
                &widened
            }
        };
        widened_logits(hs, w, (rows, h, vocab), widened_columns(h, vocab), out);
        return;
    }
    match (w, hs) {
        (HeadWeight::F32(ws), Hidden::F32(hs)) => matmul(
            out,
            Mat::rows(hs, rows, h),
            Mat::rows(ws, vocab, h).t(),
            1.0,
            false,
            threads(),
        ),
        (w, hs) => {
            use bf16dot::{Elems, Operand};
            let a = match hs {
                Hidden::F32(v) => Elems::F32(v),
                Hidden::Bf16(v) => Elems::Bf16(v),
            };
            let b = match w {
                HeadWeight::F32(ws) => Operand::rows(Elems::F32(ws)).t(),
                HeadWeight::Bf16(ws) => Operand::rows(Elems::Bf16(ws)).t(),
                HeadWeight::Bf16InputMajor(ws) => Operand::rows(Elems::Bf16(ws)),
            };
            let done = bf16dot::matmul(Operand::rows(a), b, (rows, h, vocab), out);
            // Only with AVX-512 BF16: without it a bf16 weight took the widened blocks above
            // and `forward` widened bf16 hidden states.
            debug_assert!(done);
        }
    }
}

fn hidden_rows<'a>(hs: Hidden<'a>, start: usize, end: usize, h: usize) -> Hidden<'a> {
    match hs {
        Hidden::F32(v) => Hidden::F32(&v[start * h..end * h]),
        Hidden::Bf16(v) => Hidden::Bf16(&v[start * h..end * h]),
    }
}

fn cpu_forward(
    hs: Hidden,
    w: HeadWeight,
    (t, h, vocab): (usize, usize, usize),
    targets: &[u32],
    inv_temp: f32,
    keep: bool,
    entropy: bool,
) -> Option<CpuOut> {
    if keep {
        let mut probs = workspace::take(t * vocab);
        logits(hs, w, (t, h, vocab), &mut probs);
        let (logp, entropy) = pick(&mut probs, vocab, targets, inv_temp, true, entropy);
        return Some(CpuOut {
            logp,
            entropy,
            probs: Some(probs),
        });
    }
    let rows = (ROWS_PER_CHUNK_BYTES / (4 * vocab)).clamp(1, t.max(1));
    let mut buf = workspace::take(rows * vocab);
    let mut logp = Vec::with_capacity(t);
    let mut ent = entropy.then(|| Vec::with_capacity(t));
    for start in (0..t).step_by(rows) {
        let r = rows.min(t - start);
        let chunk = &mut buf[..r * vocab];
        logits(
            hidden_rows(hs, start, start + r, h),
            w,
            (r, h, vocab),
            chunk,
        );
        let (lp, h) = pick(
            chunk,
            vocab,
            &targets[start..start + r],
            inv_temp,
            false,
            entropy,
        );
        logp.extend(lp);
        if let (Some(all), Some(h)) = (ent.as_mut(), h) {
            all.extend(h);
        }
    }
    workspace::give(buf);
    Some(CpuOut {
        logp,
        entropy: ent,
        probs: None,
    })
}

/// `dst += scale * lhsᵀ · rhs` into a gradient buffer, in place.
struct AddTransposedProduct<'a> {
    /// (k x m) row-major: its transpose is the left factor.
    lhs: &'a [f32],
    rhs: &'a Tensor,
    k: usize,
    m: usize,
}

impl InplaceOp1 for AddTransposedProduct<'_> {
    fn name(&self) -> &'static str {
        "add-transposed-product"
    }
    fn cpu_fwd(&self, dst: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let d = crate::kernels::storage_f32_mut(dst, l, "LM head gradient")?;
        let n = self.rhs.dim(1)?;
        let (k, m) = (self.k, self.m);
        with_f32(self.rhs, |r| {
            matmul(
                d,
                Mat::rows(self.lhs, k, m).t(),
                Mat::rows(r, k, n),
                1.0,
                true,
                threads(),
            )
        })
        .ok_or_else(|| candle_core::Error::Msg("hidden states are not on the CPU".into()))
    }
}

impl Saved {
    /// Given `g[t] = ∂L/∂logp[t]`, returns `∂L/∂hidden` (tokens x h) and, when `grad_w` is
    /// given (the head is trained), adds `∂L/∂W` to it (allocating it on first use).
    pub fn backward(
        self,
        g: &[f32],
        weight: &Tensor,
        grad_w: Option<&mut Option<Tensor>>,
    ) -> Result<Tensor> {
        let (t, h) = self.hidden.dims2()?;
        let vocab = weight.dim(0)?;
        if g.len() != t {
            bail!("{} gradients for {t} tokens", g.len());
        }
        match self.probs {
            Probs::Cpu(mut probs) => {
                // probs -> g_t / T * (onehot - p), row by row, in place.
                use rayon::prelude::*;
                probs
                    .par_chunks_mut(vocab)
                    .zip(g.par_iter().zip(self.targets.par_iter()))
                    .for_each(|(row, (&gt, &target))| {
                        let c = gt * self.inv_temp;
                        row.iter_mut().for_each(|p| *p *= -c);
                        row[target as usize] += c;
                    });
                let bf16_compute = self.hidden.dtype() == DType::BF16;
                let dh = head_weight(weight, |w| {
                    let mut dh = vec![0f32; t * h];
                    match w {
                        // bf16 compute: on bf16 dot products, as the forward pass.
                        HeadWeight::F32(ws) if bf16_compute => {
                            let done = bf16dot::matmul(
                                bf16dot::Operand::rows(bf16dot::Elems::F32(&probs)),
                                bf16dot::Operand::rows(bf16dot::Elems::F32(ws)),
                                (t, vocab, h),
                                &mut dh,
                            );
                            debug_assert!(done);
                        }
                        HeadWeight::F32(ws) => matmul(
                            &mut dh,
                            Mat::rows(&probs, t, vocab),
                            Mat::rows(ws, vocab, h),
                            1.0,
                            false,
                            threads(),
                        ),
                        // A frozen bf16 head (LoRA under bf16 compute): the f32 gradient
                        // times the weight widened (exactly) a block of rows at a time, as
                        // the tensor ops multiply it, without an f32 copy of the whole head.
                        HeadWeight::Bf16(_) | HeadWeight::Bf16InputMajor(_) => {
                            let block = widened_columns(h, vocab);
                            widened_grad_hidden(&probs, w, (t, h, vocab), block, &mut dh);
                        }
                    }
                    dh
                })
                .ok_or_else(|| anyhow::anyhow!("LM head weight is not on the CPU"))?;
                // ∂L/∂W from the hidden states widened (exactly), in f32.
                let hidden = self.hidden.to_dtype(DType::F32)?;
                match grad_w {
                    None => {}
                    Some(Some(acc)) if is_cpu_f32_contiguous(acc) => {
                        acc.inplace_op1(&AddTransposedProduct {
                            lhs: &probs,
                            rhs: &hidden,
                            k: t,
                            m: vocab,
                        })?;
                    }
                    Some(slot) => {
                        let dw = with_f32(&hidden, |hs| {
                            let mut dw = vec![0f32; vocab * h];
                            matmul(
                                &mut dw,
                                Mat::rows(&probs, t, vocab).t(),
                                Mat::rows(hs, t, h),
                                1.0,
                                false,
                                threads(),
                            );
                            dw
                        })
                        .ok_or_else(|| anyhow::anyhow!("hidden states are not on the CPU"))?;
                        let dw = Tensor::from_vec(dw, (vocab, h), weight.device())?;
                        add_into(slot, dw)?;
                    }
                }
                workspace::give(probs);
                Ok(Tensor::from_vec(dh, (t, h), weight.device())?)
            }
            Probs::Tensor(p) => {
                let dev = p.device().clone();
                let coef = Tensor::from_vec(
                    g.iter().map(|&x| x * self.inv_temp).collect::<Vec<_>>(),
                    (t, 1),
                    &dev,
                )?;
                let idx = Tensor::from_vec(self.targets.clone(), (t, 1), &dev)?;
                let grad_logits = p.broadcast_mul(&coef.neg()?)?.scatter_add(&idx, &coef, 1)?;
                let wf = weight.to_dtype(DType::F32)?;
                let dh = grad_logits.matmul(&wf)?;
                if let Some(slot) = grad_w {
                    let dw = grad_logits.t()?.matmul(&self.hidden)?;
                    add_into(slot, dw.to_dtype(DType::F32)?)?;
                }
                Ok(dh)
            }
        }
    }
}

/// `slot += g` (or `slot = g` when empty).
fn add_into(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    match slot {
        Some(acc) => crate::kernels::inplace::add_assign(acc, &g)?,
        None => *slot = Some(g),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The hand-written gradient equals autograd's on the plain formula, on the CPU kernels
    /// and on the tensor-op path, with a temperature, accumulating into an existing gradient;
    /// the entropies equal TRL's formula on both paths.
    #[test]
    fn hand_gradient_equals_autograd() {
        let dev = Device::Cpu;
        let (t, h, v) = (5, 8, 37);
        let hs = Tensor::randn(0f32, 1.0, (t, h), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (v, h), &dev).unwrap();
        let targets = [3u32, 0, 36, 17, 3];
        let g = [0.5f32, -1.0, 2.0, 0.25, -0.75];
        let temp = 0.7;

        let hv = Var::from_tensor(&hs).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let logits = (hv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap() / temp).unwrap();
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let idx = Tensor::from_vec(targets.to_vec(), (t, 1), &dev).unwrap();
        let picked = lp.gather(&idx, 1).unwrap().squeeze(1).unwrap();
        let want_lp: Vec<f32> = picked.to_vec1().unwrap();
        // TRL's entropy_from_logits: -(exp(logp) * logp).sum(-1).
        let want_entropy: Vec<f32> = (lp.exp().unwrap() * &lp)
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .neg()
            .unwrap()
            .to_vec1()
            .unwrap();
        let gt = Tensor::new(&g, &dev).unwrap();
        let store = (picked * gt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want_dh = store.get(hv.as_tensor()).unwrap().clone();
        let want_dw = store.get(wv.as_tensor()).unwrap().clone();

        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "{what}: max diff {d}");
        };
        for cpu_kernels in [true, false] {
            // The tensor path is taken for a non-contiguous hidden-state view.
            let hin = if cpu_kernels {
                hs.clone()
            } else {
                Tensor::cat(&[&hs, &hs], 1)
                    .unwrap()
                    .narrow(1, 0, h)
                    .unwrap()
            };
            assert_eq!(is_cpu_f32_contiguous(&hin), cpu_kernels);
            let out = forward(&hin, &w, &targets, temp, true, false).unwrap();
            let (lp, saved) = (out.logp, out.saved);
            assert!(out.entropy.is_none());
            for (a, b) in lp.iter().zip(&want_lp) {
                assert!((a - b).abs() < 1e-5, "log-prob {a} vs {b}");
            }
            // The no-backward path gives the same log-probs; asked for, the entropies too.
            for keep in [false, true] {
                let out = forward(&hin, &w, &targets, temp, keep, true).unwrap();
                assert_eq!(out.saved.is_some(), keep);
                assert_eq!(out.logp, lp);
                for (a, b) in out.entropy.unwrap().iter().zip(&want_entropy) {
                    assert!((a - b).abs() < 1e-5, "entropy {a} vs {b}");
                }
            }
            let mut acc = Some(Tensor::ones((v, h), DType::F32, &dev).unwrap());
            let dh = saved.unwrap().backward(&g, &w, Some(&mut acc)).unwrap();
            close(&dh, &want_dh, "dL/dh");
            close(&(acc.unwrap() - 1.0).unwrap(), &want_dw, "dL/dW");
        }
    }

    /// The widened bf16 head (CPUs without AVX-512 BF16 run it; here it is called directly,
    /// whatever this CPU has) gives `hs · Wᵀ` and `g · W` by their definitions on the
    /// exactly widened weight, stored either way round, for blocks that divide the
    /// vocabulary and blocks that leave a ragged last one.
    #[test]
    fn widened_bf16_head_matches_the_definition() {
        let (rows, h, vocab) = (5, 24, 53);
        let hs: Vec<f32> = (0..rows * h).map(|i| (i as f32 * 0.37).sin()).collect();
        let wf: Vec<f32> = (0..vocab * h).map(|i| (i as f32 * 0.13).cos()).collect();
        let wb: Vec<half::bf16> = wf.iter().map(|&x| half::bf16::from_f32(x)).collect();
        // Wᵀ (h x vocab), as the inference layout keeps a tied table.
        let wt: Vec<half::bf16> = (0..h * vocab)
            .map(|i| wb[(i % vocab) * h + i / vocab])
            .collect();
        let g: Vec<f32> = (0..rows * vocab).map(|i| (i as f32 * 0.07).sin()).collect();
        let wv = |j: usize, p: usize| wb[j * h + p].to_f32();
        for w in [HeadWeight::Bf16(&wb), HeadWeight::Bf16InputMajor(&wt)] {
            for block in [1, 7, 53, 64] {
                let mut out = vec![f32::NAN; rows * vocab];
                widened_logits(&hs, w, (rows, h, vocab), block, &mut out);
                let mut dh = vec![f32::NAN; rows * h];
                widened_grad_hidden(&g, w, (rows, h, vocab), block, &mut dh);
                for i in 0..rows {
                    for j in 0..vocab {
                        let want: f32 = (0..h).map(|p| hs[i * h + p] * wv(j, p)).sum();
                        let got = out[i * vocab + j];
                        assert!((got - want).abs() < 1e-4, "logit [{i},{j}] block {block}");
                    }
                    for p in 0..h {
                        let want: f32 = (0..vocab).map(|j| g[i * vocab + j] * wv(j, p)).sum();
                        let got = dh[i * h + p];
                        assert!((got - want).abs() < 1e-4, "dh [{i},{p}] block {block}");
                    }
                }
            }
        }
    }
}
