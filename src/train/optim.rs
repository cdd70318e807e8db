//! AdamW as PyTorch implements it, with its state exposed so a run can be checkpointed and
//! resumed exactly; gradient accumulation and global-norm clipping; the linear schedule.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Shape, Tensor};
use serde::{Deserialize, Serialize};

use super::params::Param;
use crate::kernels::inplace;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// MedVLM-R1's settings (TRL defaults with lr 1e-6).
    fn default() -> Self {
        Self {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Sums of gradients over micro-batches, per trainable parameter (by index). On CPU each
/// sum lives in one buffer updated in place (see [`crate::kernels::inplace`]).
pub struct GradAccumulator {
    grads: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(n: usize) -> Self {
        Self {
            grads: vec![None; n],
        }
    }

    /// Adds `g` to parameter `i`'s sum. The accumulator takes `g` over as the sum's buffer
    /// when it is the first: callers hand in tensors nothing else writes to.
    pub fn add_tensor(&mut self, i: usize, g: Tensor) -> Result<()> {
        let g = g.to_dtype(DType::F32)?;
        match &mut self.grads[i] {
            Some(acc) => inplace::add_assign(acc, &g)?,
            slot @ None => *slot = Some(g.contiguous()?),
        }
        Ok(())
    }

    /// Adds the gradients of one backward pass.
    pub fn add(&mut self, params: &[Param], store: &GradStore) -> Result<()> {
        for (i, p) in params.iter().enumerate() {
            if !p.trainable {
                continue;
            }
            if let Some(g) = store.get(p.var.as_tensor()) {
                self.add_tensor(i, g.clone())?;
            }
        }
        Ok(())
    }

    /// Parameter `i`'s sum, for code that adds to it directly (the LM head's hand-written
    /// gradient).
    pub fn slot_mut(&mut self, i: usize) -> &mut Option<Tensor> {
        &mut self.grads[i]
    }

    /// Adds row `k` of `rows` to row `ids[k]` of parameter `i`'s gradient (an embedding
    /// table's gradient from the embeddings it handed out), allocating it on first use.
    pub fn add_rows(&mut self, i: usize, shape: &Shape, ids: &[u32], rows: &Tensor) -> Result<()> {
        let rows = rows.to_dtype(DType::F32)?;
        let slot = &mut self.grads[i];
        if slot.is_none() {
            *slot = Some(Tensor::zeros(shape, DType::F32, rows.device())?);
        }
        let acc = slot.as_mut().context("gradient slot")?;
        inplace::add_rows(acc, ids, &rows)?;
        Ok(())
    }

    /// The accumulated gradient of parameter `i`, if it received any.
    pub fn get(&self, i: usize) -> Option<&Tensor> {
        self.grads[i].as_ref()
    }

    /// Global L2 norm over all gradients (f64 accumulation).
    pub fn norm(&self) -> Result<f64> {
        let mut sq = 0f64;
        for g in self.grads.iter().flatten() {
            sq += inplace::sum_sq(g)?;
        }
        Ok(sq.sqrt())
    }

    /// Scales every gradient so the global norm is at most `max_norm` (PyTorch's
    /// clip_grad_norm_: coefficient max_norm / (norm + 1e-6), capped at 1). Returns the norm
    /// before clipping.
    pub fn clip(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.norm()?;
        if !norm.is_finite() {
            bail!("the gradient norm is {norm}: training diverged");
        }
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in self.grads.iter_mut().flatten() {
                inplace::scale(g, coef)?;
            }
        }
        Ok(norm)
    }
}

/// AdamW with decoupled weight decay and bias correction, PyTorch's update rule:
/// `p -= lr * wd * p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
///  p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
/// Moments and weights are updated in place on CPU; the weights are the `Var`s the model
/// (and its detached sampling view) reads.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Number of updates applied so far.
    pub step: u64,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
        }
    }

    /// Applies one update at learning rate `lr` with the accumulated gradients.
    pub fn update(&mut self, params: &[Param], grads: &GradAccumulator, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let step = inplace::AdamUpdate {
            lr,
            weight_decay: c.weight_decay,
            bias_correction1: 1.0 - c.beta1.powi(t),
            bias_correction2: 1.0 - c.beta2.powi(t),
            eps: c.eps,
        };
        for (i, p) in params.iter().enumerate() {
            if !p.trainable {
                continue;
            }
            let Some(g) = grads.get(i) else { continue };
            // Moments start at zero (PyTorch's state init) and are updated in place.
            let moment = |map: &mut HashMap<String, Tensor>, beta: f64, square: bool| {
                if !map.contains_key(&p.name) {
                    map.insert(p.name.clone(), g.zeros_like()?);
                }
                let t = map.get_mut(&p.name).context("moment")?;
                inplace::axpby(t, beta, g, 1.0 - beta, square)?;
                anyhow::Ok(t.clone())
            };
            let m = moment(&mut self.m, c.beta1, false)?;
            let v = moment(&mut self.v, c.beta2, true)?;
            let w = p.var.as_tensor();
            if let Some(next) = step.apply(w, &m, &v)? {
                p.var.set(&next.detach())?;
            }
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<name>`, `v.<name>`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.m.len() * 2);
        for (k, t) in &self.m {
            out.push((format!("m.{k}"), t.clone()));
        }
        for (k, t) in &self.v {
            out.push((format!("v.{k}"), t.clone()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Restores the moments written by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, step: u64, tensors: HashMap<String, Tensor>) -> Result<()> {
        self.step = step;
        self.m.clear();
        self.v.clear();
        for (k, t) in tensors {
            if let Some(name) = k.strip_prefix("m.") {
                self.m.insert(name.to_string(), t);
            } else if let Some(name) = k.strip_prefix("v.") {
                self.v.insert(name.to_string(), t);
            } else {
                bail!("unexpected optimizer state tensor {k}");
            }
        }
        Ok(())
    }
}

/// transformers' linear schedule without warmup: lr * (total - step) / total for the
/// `step`-th update (0-based).
pub fn linear_lr(base: f64, step: u64, total: u64) -> f64 {
    if total == 0 {
        return base;
    }
    base * (total.saturating_sub(step)) as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Two AdamW steps on f(w) = sum(w^2 * c), checked against PyTorch's formula computed
    /// by hand in f64.
    #[test]
    fn adamw_matches_the_pytorch_update_rule() {
        let w0 = [0.5f32, -1.0];
        let var = Var::new(&w0, &Device::Cpu).unwrap();
        let params = vec![Param {
            name: "w".into(),
            var: var.clone(),
            trainable: true,
        }];
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(cfg);
        let c = [3.0f64, 0.5];
        let mut w = [0.5f64, -1.0];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for t in 1..=2 {
            let coef = Tensor::new(&[3.0f32, 0.5], &Device::Cpu).unwrap();
            let loss = (var.as_tensor().sqr().unwrap() * coef)
                .unwrap()
                .sum_all()
                .unwrap();
            let mut acc = GradAccumulator::new(1);
            acc.add(&params, &loss.backward().unwrap()).unwrap();
            opt.update(&params, &acc, 0.1).unwrap();
            for i in 0..2 {
                let g = 2.0 * c[i] * w[i];
                w[i] -= 0.1 * 0.01 * w[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let bc1 = 1.0 - 0.9f64.powi(t);
                let bc2 = 1.0 - 0.999f64.powi(t);
                w[i] -= 0.1 / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - w[i]).abs() < 1e-6, "{got:?} vs {w:?}");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let var = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let params = vec![Param {
            name: "w".into(),
            var: var.clone(),
            trainable: true,
        }];
        // d/dw sum(w^2 / 2) = w, norm 5
        let loss = (var.as_tensor().sqr().unwrap() * 0.5)
            .unwrap()
            .sum_all()
            .unwrap();
        let mut acc = GradAccumulator::new(1);
        acc.add(&params, &loss.backward().unwrap()).unwrap();
        let before = acc.clip(1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        assert!((acc.norm().unwrap() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn linear_schedule_decays_to_zero() {
        assert_eq!(linear_lr(1.0, 0, 4), 1.0);
        assert_eq!(linear_lr(1.0, 2, 4), 0.5);
        assert_eq!(linear_lr(1.0, 4, 4), 0.0);
    }
}
