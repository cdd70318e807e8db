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

use crate::kernels::gemm::{matmul, Mat};
use crate::kernels::{is_cpu_f32_contiguous, softmax, with_f32, workspace};

/// Logit rows computed at once when no backward pass follows. The matmul packs the whole
/// weight once per call, so fewer, larger chunks cost less: 320 MB holds ~512 rows of
/// Qwen2-VL's vocabulary, where packing is ~5% of the multiply.
const ROWS_PER_CHUNK_BYTES: usize = 320 << 20;

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
    if is_cpu_f32_contiguous(hidden) && is_cpu_f32_contiguous(weight) {
        let out = with_f32(hidden, |hs| {
            with_f32(weight, |ws| {
                cpu_forward(hs, ws, (t, h, vocab), targets, inv_temp, keep, entropy)
            })
        })
        .flatten()
        .flatten();
        if let Some(out) = out {
            let saved = out.probs.map(|p| Saved {
                probs: Probs::Cpu(p),
                hidden: hidden.clone(),
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

fn cpu_forward(
    hs: &[f32],
    ws: &[f32],
    (t, h, vocab): (usize, usize, usize),
    targets: &[u32],
    inv_temp: f32,
    keep: bool,
    entropy: bool,
) -> Option<CpuOut> {
    let w_t = Mat::rows(ws, vocab, h).t();
    if keep {
        let mut probs = workspace::take(t * vocab);
        matmul(&mut probs, Mat::rows(hs, t, h), w_t, 1.0, false, threads());
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
        matmul(
            chunk,
            Mat::rows(&hs[start * h..(start + r) * h], r, h),
            w_t,
            1.0,
            false,
            threads(),
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
                let dh = with_f32(weight, |ws| {
                    let mut dh = vec![0f32; t * h];
                    matmul(
                        &mut dh,
                        Mat::rows(&probs, t, vocab),
                        Mat::rows(ws, vocab, h),
                        1.0,
                        false,
                        threads(),
                    );
                    dh
                })
                .ok_or_else(|| anyhow::anyhow!("LM head weight is not on the CPU"))?;
                match grad_w {
                    None => {}
                    Some(Some(acc)) if is_cpu_f32_contiguous(acc) => {
                        acc.inplace_op1(&AddTransposedProduct {
                            lhs: &probs,
                            rhs: &self.hidden,
                            k: t,
                            m: vocab,
                        })?;
                    }
                    Some(slot) => {
                        let dw = with_f32(&self.hidden, |hs| {
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
}
