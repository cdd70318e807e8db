//! The Qwen2 decoder of Qwen2-VL: RMSNorm, grouped-query attention with q/k/v biases and
//! multimodal rotary embeddings, SwiGLU MLP, optional tied lm_head, and a KV cache.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::config::{Activation, TextConfig};
use super::layers::{activate, apply_rotary, linear, softmax_f32, RmsNorm};
use super::rope::{MRope, Pos3};

/// Keys and values of every layer for the tokens seen so far, shape (batch, kv_heads, T, hd).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of cached positions (0 when empty).
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn batch_size(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(0).unwrap_or(0))
    }

    /// Keeps (and reorders, or repeats) the batch rows named by `rows`: how finished
    /// sequences leave a batch and how one prompt's cache is forked into a group.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        let Some(dev) = self
            .layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.device().clone())
        else {
            return Ok(self.clone());
        };
        let idx = Tensor::new(rows, &dev)?;
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        Ok(Self {
            q: linear(&vb.pp("q_proj"), h, cfg.num_attention_heads * hd, true)?,
            k: linear(&vb.pp("k_proj"), h, cfg.num_key_value_heads * hd, true)?,
            v: linear(&vb.pp("v_proj"), h, cfg.num_key_value_heads * hd, true)?,
            o: linear(&vb.pp("o_proj"), cfg.num_attention_heads * hd, h, false)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let hd = self.head_dim;
        let heads = |t: Tensor, n: usize| t.reshape((b, l, n, hd))?.transpose(1, 2);
        let q = heads(self.q.forward(x)?, self.num_heads)?;
        let k = heads(self.k.forward(x)?, self.num_kv_heads)?;
        let v = heads(self.v.forward(x)?, self.num_kv_heads)?;
        // cos/sin: (b, l, hd) -> broadcast over heads
        let (c, s) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
        let q = apply_rotary(&q, &c, &s)?;
        let k = apply_rotary(&k, &c, &s)?.contiguous()?;
        let v = v.contiguous()?;
        let (k, v) = match cache {
            Some(slot) => {
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some(kv.clone());
                kv
            }
            None => (k, v),
        };
        let t = k.dim(2)?;
        // Grouped-query attention without copying K/V: the `rep` query heads that share a KV
        // head are stacked along the sequence axis of one matmul.
        let rep = self.num_heads / self.num_kv_heads;
        let qg = q
            .contiguous()?
            .reshape((b, self.num_kv_heads, rep * l, hd))?;
        let scale = (hd as f64).powf(-0.5);
        let scores = (qg.matmul(&k.t()?)? * scale)?.reshape((b, self.num_heads, l, t))?;
        let scores = match mask {
            Some(m) => scores.to_dtype(DType::F32)?.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_f32(&scores)?.to_dtype(x.dtype())?;
        let out = probs
            .reshape((b, self.num_kv_heads, rep * l, t))?
            .matmul(&v)?
            .reshape((b, self.num_heads, l, hd))?
            .transpose(1, 2)?
            .reshape((b, l, self.num_heads * hd))?;
        self.o.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: linear(&vb.pp("gate_proj"), h, i, false)?,
            up: linear(&vb.pp("up_proj"), h, i, false)?,
            down: linear(&vb.pp("down_proj"), i, h, false)?,
            act: cfg.hidden_act,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = activate(&self.gate.forward(x)?, self.act)?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        Ok(Self {
            input_norm: RmsNorm::load(
                &vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_norm: RmsNorm::load(
                &vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let h =
            x.add(
                &self
                    .attn
                    .forward(&self.input_norm.forward(x)?, cos, sin, mask, cache)?,
            )?;
        h.add(&self.mlp.forward(&self.post_norm.forward(&h)?)?)
    }
}

/// The decoder stack with its embeddings and output head.
#[derive(Debug, Clone)]
pub struct TextModel {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope: MRope,
    cfg: TextConfig,
}

impl TextModel {
    /// `vb` points at the decoder (`model` or `model.language_model`); `lm_head` at the head,
    /// or `None` when the embeddings are tied.
    pub fn load(vb: VarBuilder, lm_head: Option<VarBuilder>, cfg: &TextConfig) -> Result<Self> {
        let embed_tokens = vb.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(vb.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = match lm_head {
            Some(vb) => vb.get((cfg.vocab_size, cfg.hidden_size), "weight")?,
            None => embed_tokens.clone(),
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(&vb.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            lm_head,
            rope: MRope::new(cfg.head_dim(), cfg.rope_theta, cfg.mrope_section),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Token embeddings, (batch, seq, hidden).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        self.embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, self.cfg.hidden_size))
    }

    /// Runs the decoder over `embeds` (batch, seq, hidden) whose tokens sit at `positions`
    /// (one row per batch entry). `mask` is additive, broadcastable to (batch, 1, seq, keys),
    /// or `None` when every query may see every key (one new token per sequence, no padding).
    /// Returns the final-normed hidden states.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &[Vec<Pos3>],
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (cos, sin) = self
            .rope
            .tables(positions, embeds.dtype(), embeds.device())?;
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &cos, &sin, mask, slot)?;
        }
        self.norm.forward(&x)
    }

    /// Logits over the vocabulary for hidden states (.., hidden).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        hidden.broadcast_matmul(&self.lm_head.t()?)
    }
}

/// The additive attention mask for `l` new queries after `past` cached keys: causal, plus
/// padding keys hidden when `key_valid` gives per-sequence validity of all `past + l` keys.
/// `None` when nothing needs masking.
pub fn attention_mask(
    l: usize,
    past: usize,
    key_valid: Option<&[Vec<bool>]>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let t = past + l;
    let any_pad = key_valid.is_some_and(|kv| kv.iter().any(|row| row.iter().any(|v| !v)));
    if l == 1 && !any_pad {
        return Ok(None);
    }
    let neg = f32::MIN;
    let rows: Vec<&[bool]> = match key_valid {
        Some(kv) if any_pad => kv.iter().map(|r| r.as_slice()).collect(),
        _ => vec![&[]],
    };
    let b = rows.len();
    let mut data = Vec::with_capacity(b * l * t);
    for valid in &rows {
        if !valid.is_empty() && valid.len() != t {
            candle_core::bail!("key validity row has {} entries, expected {t}", valid.len());
        }
        for qi in 0..l {
            for ki in 0..t {
                let causal_ok = ki <= past + qi;
                let pad_ok = valid.is_empty() || valid[ki];
                data.push(if causal_ok && pad_ok { 0.0 } else { neg });
            }
        }
    }
    Ok(Some(Tensor::from_vec(data, (b, 1, l, t), device)?))
}

/// Log-softmax over the last dim in f32 (GRPO and scoring need f32 even when the model
/// runs in bf16).
pub fn log_softmax_f32(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)
}
