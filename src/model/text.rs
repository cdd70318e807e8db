//! The decoder: Qwen2 for Qwen2(.5)-VL (RMSNorm, grouped-query attention with q/k/v biases
//! and multimodal rotary embeddings, SwiGLU MLP, optional tied lm_head, a KV cache) and Qwen3
//! for Qwen3-VL (no q/k/v biases, per-head RMSNorm of q and k, interleaved M-RoPE, and
//! DeepStack: vision features added to the hidden states after the first layers).

use candle_core::{Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::{Activation, TextConfig};
use super::layers::{
    gated, linear, rotary_heads_first, softmax_upcast, upcast, Linear, Mode, RmsNorm,
};
use super::rope::{MRope, Pos3};
use crate::kernels::attention::{self, Visibility};

/// One layer's keys and values, (rows, kv_heads, capacity, hd) buffers of which the first
/// `len` positions are filled. Appends write in place and grow the buffer geometrically, so
/// decoding does not copy the whole cache at every step.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    fn with_capacity(k: &Tensor, v: &Tensor, cap: usize) -> Result<Self> {
        let (b, h, l, d) = k.dims4()?;
        let cap = cap.max(l);
        let kb = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
        let vb = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
        kb.slice_set(&k.contiguous()?, 2, 0)?;
        vb.slice_set(&v.contiguous()?, 2, 0)?;
        Ok(Self {
            k: kb,
            v: vb,
            len: l,
        })
    }

    /// Appends (rows, kv_heads, l, hd) and returns views of everything cached so far.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let l = k.dim(2)?;
        let cap = self.k.dim(2)?;
        if self.len + l > cap {
            let grown = Self::with_capacity(
                &self.k.narrow(2, 0, self.len)?,
                &self.v.narrow(2, 0, self.len)?,
                (2 * cap).max(self.len + l),
            )?;
            *self = grown;
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += l;
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }
}

/// Keys and values of every layer for the tokens seen so far by a set of sequences that all
/// have the same length (one prompt, or one prompt's group of samples).
///
/// Not `Clone`: the buffers are written in place, so a copy must own fresh storage; use
/// [`KvCache::select_rows`].
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Initial buffer length, in positions.
    reserve: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_reserve(num_layers, 0)
    }

    /// A cache whose buffers start with room for `reserve` positions (prompt plus expected
    /// completion), avoiding regrowth during decoding.
    pub fn with_reserve(num_layers: usize, reserve: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            reserve,
        }
    }

    /// Number of cached positions (0 when empty).
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }

    /// Number of sequences (rows) held.
    pub fn batch_size(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.k.dim(0).unwrap_or(0))
    }

    /// A new cache holding the rows named by `rows`, in that order, in fresh storage: how
    /// finished sequences leave a batch, and how one prompt's cache is forked into a group of
    /// samples (`rows = [0; G]`).
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(match l {
                Some(l) => {
                    let idx = Tensor::new(rows, l.k.device())?;
                    Some(LayerKv {
                        k: l.k.index_select(&idx, 0)?,
                        v: l.v.index_select(&idx, 0)?,
                        len: l.len,
                    })
                }
                None => None,
            });
        }
        Ok(Self {
            layers,
            reserve: self.reserve,
        })
    }

    /// Positions cached by one layer (during a forward pass, earlier layers are ahead).
    fn layer_len(&self, layer: usize) -> usize {
        self.layers[layer].as_ref().map_or(0, |l| l.len)
    }

    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        match &mut self.layers[layer] {
            Some(l) => l.append(k, v),
            slot @ None => {
                let l = LayerKv::with_capacity(k, v, self.reserve)?;
                let out = (l.k.narrow(2, 0, l.len)?, l.v.narrow(2, 0, l.len)?);
                *slot = Some(l);
                Ok(out)
            }
        }
    }
}

/// How the rows of a forward pass relate to KV caches.
pub enum Caching<'a> {
    /// No cache: every key is in this pass (scoring), attended causally.
    None,
    /// Consecutive runs of rows (`rows[i]` of them) each extending its own cache; the row
    /// counts add up to the batch. Within a run all rows have the same length, so no padding
    /// is needed; queries see their cache plus the new tokens causally.
    Groups {
        rows: &'a [usize],
        caches: &'a mut [&'a mut KvCache],
    },
    /// Causal attention over this pass's tokens, recording every layer's keys and values
    /// (after rotary embedding) as graph tensors: the prompt pass of training, whose keys
    /// the completions of the prompt then attend to (see [`Caching::Packed`]).
    Capture(&'a mut Vec<(Tensor, Tensor)>),
    /// Batch 1 holding several sequences back to back: segment `i` is `segments[i].len`
    /// tokens that attend causally to themselves after their prefix's keys and values (one
    /// `(k, v)` per layer, each (1, kv_heads, prefix_len, head_dim), from
    /// [`Caching::Capture`]). Nothing is padded; gradients flow into the prefix tensors.
    Packed(&'a [PackedSegment<'a>]),
}

/// One sequence of a [`Caching::Packed`] pass.
#[derive(Clone, Copy)]
pub struct PackedSegment<'a> {
    pub len: usize,
    /// Keys and values of the tokens before it, per layer; `None` when it starts the
    /// sequence.
    pub prefix: Option<&'a [(Tensor, Tensor)]>,
}

/// DeepStack (Qwen3-VL): for one pass, the vision features each of the first decoder layers
/// adds to its output at the visual positions. transformers 5.24
/// (`Qwen3VLTextModel._deepstack_process`): `hidden[visual_pos_masks] += deepstack[k]` after
/// layer `k`, in the hidden dtype, for `k < len(deepstack)`.
#[derive(Debug, Clone)]
pub struct DeepStack {
    /// The visual positions among the pass's flattened (batch x seq) rows, ascending.
    rows: Vec<u32>,
    /// Per level, (rows.len(), hidden): level `k` is added after decoder layer `k`.
    levels: Vec<Tensor>,
}

impl DeepStack {
    /// `rows`: the visual positions of the pass (flattened, ascending); `levels`: one
    /// (rows.len(), hidden) tensor per level.
    pub fn new(rows: Vec<u32>, levels: Vec<Tensor>) -> Result<Self> {
        for l in &levels {
            if l.dim(0)? != rows.len() {
                candle_core::bail!(
                    "deepstack: {} features for {} visual positions",
                    l.dim(0)?,
                    rows.len()
                );
            }
        }
        if rows.windows(2).any(|w| w[0] >= w[1]) {
            candle_core::bail!("deepstack: visual positions must ascend");
        }
        Ok(Self { rows, levels })
    }

    pub fn num_levels(&self) -> usize {
        self.levels.len()
    }

    /// The part of a batch-1 pass's DeepStack that falls in its positions `start..start +
    /// len` (a prefill chunk), renumbered from 0; `None` when no visual position does.
    pub fn window(&self, start: usize, len: usize) -> Result<Option<Self>> {
        let (lo, hi) = (start as u32, (start + len) as u32);
        let first = self.rows.partition_point(|&r| r < lo);
        let end = self.rows.partition_point(|&r| r < hi);
        if first == end {
            return Ok(None);
        }
        Ok(Some(Self {
            rows: self.rows[first..end].iter().map(|&r| r - lo).collect(),
            levels: self
                .levels
                .iter()
                .map(|l| l.narrow(0, first, end - first))
                .collect::<Result<_>>()?,
        }))
    }

    /// `x` (batch, seq, hidden) after decoder layer `layer`: with level `layer`'s features
    /// added at the visual positions (cast to x's dtype), else unchanged. Differentiable in
    /// both (a gather from `[x; x[rows] + features]`).
    pub fn add_after(&self, layer: usize, x: &Tensor) -> Result<Tensor> {
        let Some(feat) = self.levels.get(layer) else {
            return Ok(x.clone());
        };
        let (b, l, h) = x.dims3()?;
        let n = b * l;
        if self.rows.last().is_some_and(|&r| r as usize >= n) {
            candle_core::bail!("deepstack: a visual position beyond the pass's {n} tokens");
        }
        let flat = x.reshape((n, h))?;
        let rows = Tensor::from_slice(&self.rows, self.rows.len(), x.device())?;
        let added = flat
            .index_select(&rows, 0)?
            .add(&feat.to_dtype(x.dtype())?)?;
        let table = Tensor::cat(&[&flat, &added], 0)?;
        let mut index: Vec<u32> = (0..n as u32).collect();
        for (k, &r) in self.rows.iter().enumerate() {
            index[r as usize] = (n + k) as u32;
        }
        let index = Tensor::from_vec(index, n, x.device())?;
        table.index_select(&index, 0)?.reshape((b, l, h))
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen3: RMSNorm over each head of q and of k, before the rotary embedding.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        // Qwen2 has q/k/v biases; Qwen3 (attention_bias false in every release) none, but
        // q/k norms.
        let bias = !cfg.qk_norm;
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            if cfg.qk_norm {
                Ok(Some(RmsNorm::load(&vb.pp(name), hd, cfg.rms_norm_eps)?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            q: linear(&vb.pp("q_proj"), h, cfg.num_attention_heads * hd, bias)?,
            k: linear(&vb.pp("k_proj"), h, cfg.num_key_value_heads * hd, bias)?,
            v: linear(&vb.pp("v_proj"), h, cfg.num_key_value_heads * hd, bias)?,
            o: linear(&vb.pp("o_proj"), cfg.num_attention_heads * hd, h, false)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
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
        layer: usize,
        caching: &mut Caching,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let hd = self.head_dim;
        // (b, l, heads * hd) -> (b, heads, l, hd), q and k (per-head normed in Qwen3) rotated
        // on the way.
        let split = |t: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let t = t.reshape((b, l, n, hd))?;
            match norm {
                Some(norm) => norm.forward(&t),
                None => Ok(t),
            }
        };
        let [q, k, v]: [Tensor; 3] = Linear::forward_shared(&[&self.q, &self.k, &self.v], x, mode)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("q/k/v: three products".into()))?;
        let q = rotary_heads_first(&split(q, self.num_heads, &self.q_norm)?, cos, sin)?;
        let k = rotary_heads_first(&split(k, self.num_kv_heads, &self.k_norm)?, cos, sin)?;
        let v = split(v, self.num_kv_heads, &None)?
            .transpose(1, 2)?
            .contiguous()?;
        let out = match caching {
            Caching::None => self.attend(&q, &k, &v, Visibility::Causal { past: 0 })?,
            Caching::Groups { rows, caches } => {
                if rows.len() != caches.len() {
                    candle_core::bail!("{} row counts for {} caches", rows.len(), caches.len());
                }
                let mut outs = Vec::with_capacity(caches.len());
                let mut row = 0;
                for (&n, cache) in rows.iter().zip(caches.iter_mut()) {
                    let filled = cache.batch_size();
                    let past = cache.layer_len(layer);
                    if past > 0 && filled != n {
                        candle_core::bail!("a cache of {filled} rows was given {n} rows");
                    }
                    let (qg, kg, vg) = (
                        q.narrow(0, row, n)?,
                        k.narrow(0, row, n)?,
                        v.narrow(0, row, n)?,
                    );
                    let (kall, vall) = cache.append(layer, &kg, &vg)?;
                    outs.push(self.attend(&qg, &kall, &vall, Visibility::Causal { past })?);
                    row += n;
                }
                if row != b {
                    candle_core::bail!("cache groups cover {row} rows of a batch of {b}");
                }
                Tensor::cat(&outs, 0)?
            }
            Caching::Capture(kv) => {
                kv.push((k.clone(), v.clone()));
                self.attend(&q, &k, &v, Visibility::Causal { past: 0 })?
            }
            Caching::Packed(segments) => {
                if b != 1 {
                    candle_core::bail!("a packed pass has batch 1, got {b}");
                }
                let mut outs = Vec::with_capacity(segments.len());
                let mut start = 0;
                for seg in segments.iter() {
                    let (qs, ks, vs) = (
                        q.narrow(2, start, seg.len)?,
                        k.narrow(2, start, seg.len)?,
                        v.narrow(2, start, seg.len)?,
                    );
                    let (ks, vs, past) = match seg.prefix {
                        Some(p) => {
                            let (kp, vp) = p.get(layer).ok_or_else(|| {
                                candle_core::Error::Msg(format!("no prefix keys for layer {layer}"))
                            })?;
                            (
                                Tensor::cat(&[kp, &ks], 2)?,
                                Tensor::cat(&[vp, &vs], 2)?,
                                kp.dim(2)?,
                            )
                        }
                        None => (ks.contiguous()?, vs.contiguous()?, 0),
                    };
                    outs.push(self.attend(
                        &qs.contiguous()?,
                        &ks,
                        &vs,
                        Visibility::Causal { past },
                    )?);
                    start += seg.len;
                }
                if start != l {
                    candle_core::bail!("packed segments cover {start} of {l} tokens");
                }
                Tensor::cat(&outs, 2)?
            }
        };
        let out = out.transpose(1, 2)?.reshape((b, l, self.num_heads * hd))?;
        self.o.forward(&out, mode)
    }

    /// Scaled dot-product attention of q (b, heads, l, hd) over k/v (b, kv_heads, t, hd);
    /// returns (b, heads, l, hd).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, vis: Visibility) -> Result<Tensor> {
        let (b, _, l, hd) = q.dims4()?;
        let t = k.dim(2)?;
        // Grouped-query attention without copying K/V: the `rep` query heads that share a KV
        // head are stacked along the sequence axis of one matmul.
        let rep = self.num_heads / self.num_kv_heads;
        let qg = q.reshape((b, self.num_kv_heads, rep * l, hd))?;
        let scale = (hd as f64).powf(-0.5);
        // Decoding's single query (which sees every cached key) reads the cache in place.
        if l == 1 {
            if let Some(out) = attention::decode(q, k, v, scale as f32)? {
                return Ok(out);
            }
        }
        // One fused op on CPU in f32 (little memory kept for training); otherwise (a
        // single query elsewhere, other devices) candle's small matmuls.
        if l > 1 && attention::applies(q, k, v) {
            let op = attention::Attention {
                scale: scale as f32,
                queries: l,
                visibility: vis,
            };
            return attention::attention(&qg, k, v, op)?.reshape((b, self.num_heads, l, hd));
        }
        let scores = (qg.matmul(&k.t()?)? * scale)?.reshape((b, self.num_heads, l, t))?;
        let mask = match vis {
            Visibility::All => None,
            Visibility::Causal { past } => attention_mask(l, past, q.device())?,
        };
        let scores = match mask {
            Some(m) => {
                let up = upcast(scores.dtype());
                scores.to_dtype(up)?.broadcast_add(&m.to_dtype(up)?)?
            }
            None => scores,
        };
        let probs = softmax_upcast(&scores)?.to_dtype(q.dtype())?;
        probs
            .reshape((b, self.num_kv_heads, rep * l, t))?
            .matmul(v)?
            .reshape((b, self.num_heads, l, hd))
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

impl Mlp {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = Linear::forward_shared(&[&self.gate, &self.up], x, mode)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("gate/up: two products".into()))?;
        let h = gated(&gate, &up, self.act)?;
        self.down.forward(&h, mode)
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
        layer: usize,
        caching: &mut Caching,
        mode: Mode,
    ) -> Result<Tensor> {
        let h = x.add(&self.attn.forward(
            &self.input_norm.forward(x)?,
            cos,
            sin,
            layer,
            caching,
            mode,
        )?)?;
        h.add(&self.mlp.forward(&self.post_norm.forward(&h)?, mode)?)
    }
}

/// The decoder stack with its embeddings and output head.
#[derive(Debug, Clone)]
pub struct TextModel {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: MRope,
    cfg: TextConfig,
}

impl TextModel {
    /// Every linear layer of the decoder (not the LM head), in order; each knows its name
    /// ([`Linear::name`]).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for l in &mut self.layers {
            let (a, m) = (&mut l.attn, &mut l.mlp);
            out.extend([&mut a.q, &mut a.k, &mut a.v, &mut a.o]);
            out.extend([&mut m.gate, &mut m.up, &mut m.down]);
        }
        out
    }

    /// Casts the embedding table (and an untied LM head) to `dtype`: they feed the fused
    /// log-softmax and the lookups in the compute dtype, while other frozen weights may stay
    /// in a smaller storage dtype.
    pub fn cast_embeddings(&mut self, dtype: candle_core::DType) -> Result<()> {
        let tied = self.lm_head.weight().id() == self.embed_tokens.id();
        self.embed_tokens = super::lora::cast(&self.embed_tokens, dtype)?;
        if tied {
            let e = self.embed_tokens.clone();
            self.lm_head.map_weight(|_| Ok(e))?;
        } else {
            self.lm_head.map_weight(|w| super::lora::cast(w, dtype))?;
        }
        Ok(())
    }

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
            lm_head: Linear::new(lm_head, None),
            rope: MRope::new(
                cfg.head_dim,
                cfg.rope_theta,
                cfg.mrope_section,
                cfg.mrope_interleaved,
            ),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// An empty cache with room for `reserve` positions.
    pub fn new_cache(&self, reserve: usize) -> KvCache {
        KvCache::with_reserve(self.layers.len(), reserve)
    }

    /// Quantizes the LM head in `kind` for inference. When the embeddings are tied, the
    /// lookups then read their rows from the quantized head (as llama.cpp does with a tied
    /// `token_embd`) and the dense table is freed: for a 2B model that table is a fifth of
    /// the weights. Returns whether the head was quantized.
    pub fn quantize_head(&mut self, kind: crate::kernels::quant::QuantKind) -> Result<bool> {
        if !self.lm_head.quantize(kind)? {
            return Ok(false);
        }
        self.tie_embeddings_to_quantized_head()?;
        Ok(true)
    }

    /// The format of the decoder's linear layers, when they are quantized.
    pub fn quantization(&self) -> Option<crate::kernels::quant::QuantKind> {
        let l = self.layers.first()?;
        l.attn.q.quantized().map(|q| q.kind())
    }

    /// The head, to install a saved quantized weight ([`Linear::set_quantized`]); call
    /// [`Self::tie_embeddings_to_quantized_head`] after.
    pub fn lm_head_mut(&mut self) -> &mut Linear {
        &mut self.lm_head
    }

    /// With tied embeddings and a quantized head, frees the dense table (lookups read the
    /// head's rows).
    pub fn tie_embeddings_to_quantized_head(&mut self) -> Result<()> {
        if self.cfg.tie_word_embeddings && self.lm_head.quantized().is_some() {
            let (n, k) = self.embed_tokens.dims2()?;
            self.embed_tokens = super::layers::placeholder(n, k, self.embed_tokens.dtype())?;
        }
        Ok(())
    }

    /// Token embeddings, (batch, seq, hidden).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if let (true, Some(q)) = (self.cfg.tie_word_embeddings, self.lm_head.quantized()) {
            let hidden = self.cfg.hidden_size;
            let ids = ids.flatten_all()?.to_vec1::<u32>()?;
            let mut rows = vec![0f32; ids.len() * hidden];
            for (row, &id) in rows.chunks_exact_mut(hidden).zip(&ids) {
                q.dequantize_row(id as usize, row);
            }
            return Tensor::from_vec(rows, (b, l, hidden), &Device::Cpu);
        }
        let ids = ids.flatten_all()?;
        let rows = if self.embed_tokens.is_contiguous() {
            self.embed_tokens.index_select(&ids, 0)?
        } else {
            // Stored input-major for the LM head (`pack_head_for_inference`): gather columns.
            self.embed_tokens
                .t()?
                .index_select(&ids, 1)?
                .t()?
                .contiguous()?
        };
        rows.reshape((b, l, self.cfg.hidden_size))
    }

    /// Readies a bf16 LM head for inference on the CPU. With AVX-512 BF16 it is marked for
    /// the bf16 kernels as it is ([`Linear::pack_for_inference`]): a tied head keeps sharing
    /// the (vocab, hidden) table with the lookups, and decoding reads it row after row, as
    /// fast as any other layer. Without, a tied table is stored input-major, (hidden, vocab),
    /// shared by the lookups (which then gather a few columns) and the head, which the
    /// widening streaming kernel reads front to back. f32 heads keep the row-wise kernel: it
    /// also serves 3-32 rows (G samples), where the input-major layout would go to gemm.
    /// Returns whether the head was readied.
    pub fn pack_head_for_inference(&mut self) -> Result<bool> {
        let e = &self.embed_tokens;
        let bf16 = self.lm_head.weight().dtype() == candle_core::DType::BF16;
        if bf16 && crate::kernels::bf16dot::available() {
            return self.lm_head.pack_for_inference();
        }
        let tied = self.lm_head.weight().id() == e.id();
        if !tied
            || !bf16
            || self.lm_head.quantized().is_some()
            || !crate::kernels::cpu_kernels()
            || !e.device().is_cpu()
            || !e.is_contiguous()
            || e.is_variable()
        {
            return Ok(false);
        }
        self.embed_tokens = super::layers::input_major(e)?;
        let packed = self.embed_tokens.clone();
        self.lm_head.map_weight(|_| Ok(packed))?;
        Ok(true)
    }

    /// Runs the decoder over `embeds` (batch, seq, hidden) whose tokens sit at `positions`
    /// (one row per batch entry), with or without KV caches (see [`Caching`]), adding the
    /// pass's DeepStack features after the first layers (Qwen3-VL with images). Returns the
    /// final-normed hidden states.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &[Vec<Pos3>],
        mut caching: Caching,
        deepstack: Option<&DeepStack>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rope_tables(positions, embeds.dtype(), embeds.device())?;
        let mut x = embeds.clone();
        for i in 0..self.layers.len() {
            x = self.layer(i, &x, &cos, &sin, &mut caching, mode)?;
            if let Some(ds) = deepstack {
                x = ds.add_after(i, &x)?;
            }
        }
        self.final_norm(&x)
    }

    /// The rotary tables of a pass at `positions` (one row per batch entry).
    pub fn rope_tables(
        &self,
        positions: &[Vec<Pos3>],
        dtype: candle_core::DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        self.rope.tables(positions, dtype, device)
    }

    /// Decoder layer `i` alone (gradient checkpointing runs the layers one at a time). With
    /// [`Caching::Capture`] the layer's keys and values are pushed to the list.
    pub fn layer(
        &self,
        i: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caching: &mut Caching,
        mode: Mode,
    ) -> Result<Tensor> {
        let layer = self
            .layers
            .get(i)
            .ok_or_else(|| candle_core::Error::Msg(format!("no decoder layer {i}")))?;
        layer.forward(x, cos, sin, i, caching, mode)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The RMSNorm after the last layer.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// Prefill or decode for one cache (one prompt, or one group of samples of it), for
    /// inference.
    pub fn forward_cached(
        &self,
        embeds: &Tensor,
        positions: &[Vec<Pos3>],
        cache: &mut KvCache,
        deepstack: Option<&DeepStack>,
    ) -> Result<Tensor> {
        let rows = [embeds.dim(0)?];
        let mut caches = [cache];
        self.forward(
            embeds,
            positions,
            Caching::Groups {
                rows: &rows,
                caches: &mut caches,
            },
            deepstack,
            Mode::Infer,
        )
    }

    /// The output projection's weight, (vocab, hidden): the embedding table when tied. A
    /// placeholder of zeros when the head is quantized ([`Self::lm_head_quantized`]).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.weight()
    }

    /// The output projection's quantized weight, when the model is quantized.
    pub fn lm_head_quantized(&self) -> Option<&crate::kernels::quant::QWeight> {
        self.lm_head.quantized()
    }

    /// The token embedding table, (vocab, hidden).
    pub fn embed_weight(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// Logits over the vocabulary for hidden states (.., hidden), for inference (training
    /// takes log-probabilities outside autograd: `crate::train::token_logps`).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden, Mode::Infer)
    }
}

/// The additive causal attention mask for `l` new queries after `past` cached keys,
/// broadcastable to (batch, 1, l, past + l); `None` when nothing needs masking (one query).
pub fn attention_mask(l: usize, past: usize, device: &Device) -> Result<Option<Tensor>> {
    let t = past + l;
    if l == 1 {
        return Ok(None);
    }
    let neg = f32::MIN;
    let mut data = Vec::with_capacity(l * t);
    for qi in 0..l {
        for ki in 0..t {
            data.push(if ki <= past + qi { 0.0 } else { neg });
        }
    }
    Ok(Some(Tensor::from_vec(data, (1, 1, l, t), device)?))
}

/// Log-softmax over the last dim in f32 (f64 for an f64 model): GRPO and scoring need f32
/// even when the model runs in bf16.
pub fn log_softmax_f32(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(&logits.to_dtype(upcast(logits.dtype()))?, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    /// transformers' `hidden[mask] += features` after layer k, by hand: rows 1 and 3 of a
    /// (1, 4, 2) pass get level k's rows; other layers and rows are untouched; a prefill
    /// window keeps only its own rows, renumbered.
    #[test]
    fn deepstack_adds_at_the_visual_rows() {
        let ds = DeepStack::new(
            vec![1, 3],
            vec![
                t(&[10., 20., 30., 40.], (2, 2)),
                t(&[1., 1., 2., 2.], (2, 2)),
            ],
        )
        .unwrap();
        let x = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((1, 4, 2))
            .unwrap();
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            flat(&ds.add_after(0, &x).unwrap()),
            vec![0., 1., 12., 23., 4., 5., 36., 47.]
        );
        assert_eq!(
            flat(&ds.add_after(1, &x).unwrap()),
            vec![0., 1., 3., 4., 4., 5., 8., 9.]
        );
        // No level 2: the layer's output as it is.
        assert_eq!(flat(&ds.add_after(2, &x).unwrap()), flat(&x));
        let w = ds.window(2, 2).unwrap().unwrap();
        assert_eq!(w.rows, vec![1]);
        assert_eq!(flat(&w.levels[0]), vec![30., 40.]);
        assert!(ds.window(0, 1).unwrap().is_none());
        assert!(DeepStack::new(vec![3, 1], vec![]).is_err());
        assert!(DeepStack::new(vec![1], vec![t(&[1., 2., 3., 4.], (2, 2))]).is_err());
    }
}
