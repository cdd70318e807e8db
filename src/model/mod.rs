//! Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the vision tower, the M-RoPE decoder, and loading a
//! local Hugging Face checkpoint directory into them.

pub mod config;
pub mod gguf;
pub mod layers;
pub mod lora;
pub mod presets;
pub mod quantized;
pub mod random;
pub mod rope;
pub mod text;
pub mod vision;
pub mod vision_qwen2;
pub mod vision_qwen25;
pub mod vision_qwen3;
pub mod weights;

use std::path::Path;

/// An adapter's A (r, in) and B (out, r) must fit the layer (out, in) it is for.
pub fn check_adapter_shapes(
    path: &str,
    lin: &layers::Linear,
    a: &Tensor,
    b: &Tensor,
    r: usize,
) -> Result<()> {
    let (out, inp) = lin.weight().dims2()?;
    if a.dims() != [r, inp] || b.dims() != [out, r] {
        bail!(
            "adapter for {path}: lora_A {:?} and lora_B {:?} do not fit a ({out}, {inp}) layer \
             with rank {r}",
            a.dims(),
            b.dims()
        );
    }
    Ok(())
}

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use config::{Qwen2VlConfig, TextConfig, VisionConfig};
pub use layers::Mode;
pub use presets::Preset;
pub use rope::{mrope_positions, Pos3, VisionTokens};
pub use text::{
    attention_mask, log_softmax_f32, Caching, DeepStack, KvCache, PackedSegment, TextModel,
};
pub use vision::{VisionFeatures, VisionTower};
pub use weights::{CheckpointWeights, WeightLayout};

/// Number of parameters of a model of `config` (tied embeddings counted once), from the
/// tensors the model itself asks for: no formula to keep in step with the layers.
pub fn num_parameters(config: &Qwen2VlConfig) -> Result<usize> {
    Ok(random::tensor_shapes(config)?
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum())
}

/// Every linear layer of a model of `config` as (module path, in, out), from a model built
/// without weight memory: what LoRA could adapt, for memory plans.
pub fn linear_shapes(config: &Qwen2VlConfig) -> Result<Vec<(String, usize, usize)>> {
    let (mut model, _) = random::shape_only(config)?;
    model
        .linears_mut()
        .into_iter()
        .map(|(name, l)| {
            let (out, inp) = l.weight().dims2()?;
            Ok((name, inp, out))
        })
        .collect()
}

/// A loaded Qwen2-VL model.
#[derive(Debug, Clone)]
pub struct Qwen2Vl {
    pub vision: VisionTower,
    pub text: TextModel,
    pub config: Qwen2VlConfig,
    pub dtype: DType,
    pub device: Device,
}

impl Qwen2Vl {
    /// Loads `config.json` and the safetensors weights of a checkpoint directory, computing
    /// in `dtype` (weights saved in another dtype are converted on load, but for a quantized
    /// checkpoint's f16 linear layers: see [`Self::load_for_inference`]).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(dir, dtype, device, false)
    }

    /// [`Self::load`] for a model that will only run inference: on the CPU in f32, linear
    /// layers stored in f16 keep their f16 weights (half the memory; the products widen them
    /// as they read, so the values are the f32 model's: see [`crate::kernels::packed`]).
    /// An f16 vision tower (an imported GGUF's mmproj, an f16 checkpoint) would otherwise
    /// take twice its size. Quantized checkpoints, which only run inference, always load so.
    pub fn load_for_inference(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(dir, dtype, device, true)
    }

    fn load_with(dir: &Path, dtype: DType, device: &Device, inference: bool) -> Result<Self> {
        let config = Qwen2VlConfig::from_file(&dir.join("config.json"))?;
        let weights = CheckpointWeights::open(dir)?;
        let is_quantized = !weights.quantized().is_empty();
        if is_quantized && !device.is_cpu() {
            bail!(
                "{}: a quantized checkpoint runs on the CPU only",
                dir.display()
            );
        }
        if is_quantized || inference {
            // Found once here and handed on: it builds the model over the headers.
            let keep = quantized::kept_f16(&weights, &config, dtype, device)?;
            if is_quantized || !keep.is_empty() {
                return Self::load_quantized(dir, config, &weights, dtype, keep);
            }
        }
        let vb = weights.var_builder(dtype, device)?;
        let layout = weights.layout(&config)?;
        Self::from_var_builder(vb, layout, config, dtype, device).map_err(|e| weights.explain(e))
    }

    /// Builds the model from any variable source: memory-mapped checkpoint files for
    /// inference, or a `VarMap` when training.
    pub fn from_var_builder(
        vb: VarBuilder,
        layout: WeightLayout,
        config: Qwen2VlConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vision = VisionTower::load(vb.pp(layout.vision_prefix()), &config.vision)?;
        let lm_head = if config.text.tie_word_embeddings {
            None
        } else {
            Some(vb.pp("lm_head"))
        };
        let text = TextModel::load(vb.pp(layout.text_prefix()), lm_head, &config.text)?;
        Ok(Self {
            vision,
            text,
            config,
            dtype,
            device: device.clone(),
        })
    }

    /// Every linear layer with its module path (transformers >= 4.52 names, whatever the
    /// checkpoint's layout): where LoRA adapters go. The names are the ones the layers were
    /// loaded under, so they cannot drift from the weights.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut layers::Linear)> {
        let mut out = self.text.linears_mut();
        out.extend(self.vision.linears_mut());
        out.into_iter()
            .map(|l| (WeightLayout::current_name(l.name()), l))
            .collect()
    }

    /// Readies a model that will only run inference (ask, eval, generate, serve, bench).
    /// On the CPU every f32 linear layer's weight is stored input-major so that each product
    /// is gemm's fast, contiguous case (see [`crate::kernels::packed`]): same memory, same
    /// results up to summation order. A bf16 model on the CPU keeps its bf16 weights (half
    /// the memory and half the bytes to read per decoded token) but its activations in f32:
    /// the products run on AVX-512 BF16 dot products against the weights as stored
    /// (activations rounded to bf16, f32 sums; [`layers::Linear::pack_for_inference`]) or,
    /// on CPUs without them, widen input-major weights as they read them, while candle's
    /// bf16 CPU arithmetic runs several times slower than its f32. Merge adapters first; a model being trained must
    /// not be prepared (its optimizer updates the checkpoint layout in place). Returns how
    /// many layers were repacked.
    pub fn prepare_for_inference(&mut self) -> Result<usize> {
        if !crate::kernels::cpu_kernels() || !self.device.is_cpu() {
            return Ok(0);
        }
        if matches!(self.dtype, DType::BF16 | DType::F16) {
            // The embedding table stays bf16 (f16) too: lookups are cast row by row, and
            // the LM head reads it through the few-rows kernels, which take it as it is.
            // f16 as bf16: candle's f16 CPU arithmetic is its slow generic path too (a 2B
            // vision tower took 30 s in f16 activations, 10 s in f32 ones).
            self.set_compute_dtype(DType::F32);
        }
        let mut packed = 0;
        for (_, lin) in self.linears_mut() {
            packed += usize::from(lin.pack_for_inference()?);
        }
        self.vision.pack_patch_embed()?;
        packed += usize::from(self.text.pack_head_for_inference()?);
        Ok(packed)
    }

    /// Readies a model that only scores completions, never trained (GRPO's KL reference): a
    /// bf16 model on the CPU is prepared for inference ([`Self::prepare_for_inference`]),
    /// so its pass runs on the bf16 inference kernels (bf16 weights, f32 activations rounded
    /// to bf16 inside the products, `vdpbf16ps`) instead of candle's generic bf16 ops: the
    /// reference pass of a bf16 step took twice the f32 one's time (issue #29). Its
    /// log-probs are then those `--dtype bf16` inference gives. Other models are left as
    /// they are (f32 keeps the numbers of the policy's own pass). Returns how many layers
    /// were repacked.
    pub fn prepare_for_scoring(&mut self) -> Result<usize> {
        if self.dtype != DType::BF16 {
            return Ok(0);
        }
        self.prepare_for_inference()
    }

    /// The same model with every LoRA adapter switched off (sharing the base weights): GRPO's
    /// KL reference under LoRA.
    pub fn without_adapters(&self) -> Self {
        let mut m = self.clone();
        for (_, lin) in m.linears_mut() {
            lin.set_lora(None);
        }
        m
    }

    /// Applies a PEFT adapter directory for inference: each adapted weight becomes
    /// `W + s B A` (in the weight's dtype). Every adapter tensor must find its layer.
    pub fn merge_adapter(&mut self, dir: &Path) -> Result<lora::AdapterConfig> {
        let mut file = lora::AdapterFile::read(dir)?;
        let scaling = file.config.scaling();
        for (path, lin) in self.linears_mut() {
            if let Some((a, b)) = file.take(&path)? {
                check_adapter_shapes(&path, lin, &a, &b, file.config.r)?;
                lin.set_lora(Some(lora::Lora {
                    a,
                    b,
                    scaling,
                    dropout: 0.0,
                    stream: lora::stream_of(&path),
                }));
                lin.merge_lora()?;
            }
        }
        file.finish()?;
        Ok(file.config)
    }

    /// Image embeddings, (total image tokens, hidden), and Qwen3-VL's DeepStack features, for
    /// stacked pixel patches.
    pub fn encode_images(
        &self,
        pixels: &Tensor,
        grids: &[[usize; 3]],
        mode: layers::Mode,
    ) -> Result<VisionFeatures> {
        Ok(self.vision.forward(pixels, grids, mode)?)
    }

    /// The DeepStack of a pass over equal-length rows `ids` whose vision features are
    /// `deepstack` (one tensor per level, as [`VisionFeatures::deepstack`]): the features go
    /// to the image and video pad tokens in reading order, as the tokens' embeddings do.
    /// `None` without levels (every family but Qwen3-VL, or a prompt without images).
    pub fn deepstack(&self, ids: &[Vec<u32>], deepstack: &[Tensor]) -> Result<Option<DeepStack>> {
        if deepstack.is_empty() {
            return Ok(None);
        }
        let (image, video) = (self.config.image_token_id, self.config.video_token_id);
        let rows: Vec<u32> = ids
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, &t)| t == image || t == video)
            .map(|(i, _)| i as u32)
            .collect();
        Ok(Some(DeepStack::new(rows, deepstack.to_vec())?))
    }

    /// Input embeddings for equal-length rows of token ids, with the image (and video)
    /// embeddings written over the `<|image_pad|>` (and `<|video_pad|>`) positions in reading
    /// order.
    pub fn input_embeds(&self, ids: &[Vec<u32>], image_embeds: Option<&Tensor>) -> Result<Tensor> {
        let tokens = self.token_embeds(ids)?;
        self.merge_images(&tokens, ids, image_embeds)
    }

    /// Token embeddings (batch, seq, hidden) of equal-length rows of ids.
    pub fn token_embeds(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let b = ids.len();
        let l = ids.first().map_or(0, Vec::len);
        if ids.iter().any(|r| r.len() != l) {
            bail!("input rows must have equal length (pad them first)");
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let vocab = self.config.text.vocab_size as u32;
        if let Some(&bad) = flat.iter().find(|&&t| t >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary ({vocab})");
        }
        let e = self
            .text
            .embed(&Tensor::from_vec(flat, (b, l), &self.device)?)?;
        // The compute dtype, whatever the table is stored in.
        Ok(lora::cast(&e, self.dtype)?)
    }

    /// Runs activations in `dtype` whatever the weights are stored in (bf16 compute over
    /// f32 master weights, f32 compute over a bf16 base): embeddings, the vision tower and,
    /// through them, every layer (linear layers cast their weights per use).
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.dtype = dtype;
        self.vision.set_compute_dtype(dtype);
    }

    /// `token_embeds` (batch, seq, hidden) of `ids` with the image and video embeddings
    /// written over the `<|image_pad|>` and `<|video_pad|>` positions in reading order (the
    /// tower ran over them in that order); differentiable through both.
    pub fn merge_images(
        &self,
        token_embeds: &Tensor,
        ids: &[Vec<u32>],
        image_embeds: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l, h) = token_embeds.dims3()?;
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        if flat.len() != b * l {
            bail!("{} ids for {b} x {l} embeddings", flat.len());
        }
        let (image_tok, video_tok) = (self.config.image_token_id, self.config.video_token_id);
        let is_slot = |t: u32| t == image_tok || t == video_tok;
        let n_slots = flat.iter().filter(|&&t| is_slot(t)).count();
        let Some(img) = image_embeds else {
            if n_slots > 0 {
                bail!("the input has {n_slots} image tokens but no image was given");
            }
            return Ok(token_embeds.clone());
        };
        let (n_feat, _) = img.dims2()?;
        if n_feat != n_slots {
            bail!(
                "image features and image tokens do not match: {n_slots} tokens, {n_feat} features"
            );
        }
        // Gather rows from [text embeddings; image embeddings].
        let table = Tensor::cat(
            &[
                &token_embeds.reshape((b * l, h))?,
                &img.to_dtype(token_embeds.dtype())?,
            ],
            0,
        )?;
        let mut next_img = (b * l) as u32;
        let index: Vec<u32> = flat
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if is_slot(t) {
                    next_img += 1;
                    next_img - 1
                } else {
                    i as u32
                }
            })
            .collect();
        let index = Tensor::from_vec(index, b * l, &self.device)?;
        Ok(table.index_select(&index, 0)?.reshape((b, l, h))?)
    }

    /// The prompt tokens vision features fill, and the spacing of a video's frames.
    pub fn vision_tokens(&self) -> VisionTokens {
        VisionTokens {
            image: self.config.image_token_id,
            video: self.config.video_token_id,
            video_time_interval: self.config.vision.video_time_interval,
        }
    }

    /// M-RoPE positions of one unpadded sequence and its rope delta.
    pub fn positions(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<(Vec<Pos3>, i64)> {
        if self.config.arch == config::Arch::Qwen3Vl && ids.contains(&self.config.video_token_id) {
            // Qwen3-VL's processor writes each temporal patch of a video as its own
            // `<t seconds><|vision_start|>...<|vision_end|>` group, numbered like an image;
            // medvlm does not build those prompts yet.
            bail!(
                "videos are not supported for Qwen3-VL yet (its prompts carry per-frame \
                 timestamps); send the slices as images"
            );
        }
        mrope_positions(
            ids,
            grids,
            self.vision_tokens(),
            self.config.vision.spatial_merge_size,
        )
    }

    /// Full forward pass over one sequence (no cache, inference): logits for every
    /// position, (seq, vocab), in f32 (f64 for an f64 model).
    pub fn forward_logits(
        &self,
        ids: &[u32],
        pixels: Option<&Tensor>,
        grids: &[[usize; 3]],
    ) -> Result<Tensor> {
        let (pos, _) = self.positions(ids, grids)?;
        let img = match pixels {
            Some(p) => Some(self.encode_images(p, grids, layers::Mode::Infer)?),
            None => None,
        };
        let rows = [ids.to_vec()];
        let embeds = self.input_embeds(&rows, img.as_ref().map(|f| &f.tokens))?;
        let deepstack = match &img {
            Some(f) => self.deepstack(&rows, &f.deepstack)?,
            None => None,
        };
        let hidden = self.text.forward(
            &embeds,
            &[pos],
            Caching::None,
            deepstack.as_ref(),
            layers::Mode::Infer,
        )?;
        Ok(self
            .text
            .logits(&hidden)?
            .squeeze(0)?
            .to_dtype(DType::F32)?)
    }

    /// Casts the token embeddings (and an untied LM head) to `dtype`.
    pub fn cast_embeddings(&mut self, dtype: DType) -> Result<()> {
        Ok(self.text.cast_embeddings(dtype)?)
    }

    /// Number of parameters, for `inspect`.
    pub fn config_summary(&self) -> String {
        let t = &self.config.text;
        let v = &self.config.vision;
        format!(
            "{}: decoder {} layers x {} hidden ({} heads, {} kv heads, head {}), \
             mlp {}, vocab {}, mrope {:?}, {} lm_head; vision {} blocks x {} dim ({} heads), \
             patch {}x{}x{}, merge {}x{}{}",
            self.config.arch.name(),
            t.num_hidden_layers,
            t.hidden_size,
            t.num_attention_heads,
            t.num_key_value_heads,
            t.head_dim,
            t.intermediate_size,
            t.vocab_size,
            t.mrope_section,
            if t.tie_word_embeddings {
                "tied"
            } else {
                "untied"
            },
            v.depth,
            v.embed_dim,
            v.num_heads,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
            v.spatial_merge_size,
            v.spatial_merge_size,
            match (&v.window, v.position_grid) {
                (Some(w), _) => format!(
                    ", window attention ({} px windows, full attention in blocks {:?})",
                    w.window_size, w.full_attention_blocks
                ),
                (None, Some(side)) => format!(
                    ", {side}x{side} learned positions, DeepStack from blocks {:?}",
                    v.deepstack
                ),
                (None, None) => String::new(),
            },
        )
    }
}
