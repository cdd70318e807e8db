//! `config.json` of a Hugging Face Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint.
//!
//! Two layouts exist in the wild: the released Qwen2(.5)-VL checkpoints keep the text model's
//! fields at the top level; transformers >= 4.52 (and every Qwen3-VL release) writes them under
//! `text_config`. When `text_config` is present it wins, as in transformers. Fields the
//! architecture cannot do without are required and reported by name; everything else takes
//! transformers' defaults for the family's config class.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// The text decoder (Qwen2, or Qwen3 for Qwen3-VL, with multimodal rotary embeddings).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Width of one attention head: `hidden_size / num_attention_heads` in Qwen2; its own
    /// field in Qwen3 (128 in every release, so `heads x head_dim` need not be the hidden size).
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// How the rotary frequencies are split between the (temporal, height, width) axes.
    /// Sums to `head_dim / 2`.
    pub mrope_section: [usize; 3],
    /// Qwen3-VL: frequency `i` follows the height axis when `i % 3 == 1` and the width axis when
    /// `i % 3 == 2` (within `3 x` their sections), the temporal axis otherwise; Qwen2(.5)-VL give
    /// each axis a contiguous run of frequencies.
    pub mrope_interleaved: bool,
    /// Qwen3: q and k are RMS-normed per head (`q_norm`, `k_norm`) before the rotary embedding,
    /// and q/k/v have no bias; Qwen2: q/k/v biases, no norms.
    pub qk_norm: bool,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
}

/// Which model family a checkpoint is: Qwen2(.5)-VL share the Qwen2 decoder with M-RoPE and
/// differ in the vision tower; Qwen3-VL has its own of both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `qwen2_vl`: LayerNorm blocks, a quick-GELU MLP, full attention within each image.
    Qwen2Vl,
    /// `qwen2_5_vl`: RMSNorm blocks, a gated SiLU MLP, window attention except in the
    /// blocks listed in `fullatt_block_indexes`, a merger with RMSNorm.
    Qwen25Vl,
    /// `qwen3_vl` (dense): a patch embedding with bias plus learned position embeddings
    /// resampled to each image's grid, LayerNorm blocks with a tanh-GELU MLP, DeepStack
    /// mergers whose features are added after the first decoder layers; a Qwen3 decoder
    /// (per-head q/k RMSNorm, no q/k/v bias) with interleaved M-RoPE.
    Qwen3Vl,
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Qwen2Vl => "qwen2_vl",
            Self::Qwen25Vl => "qwen2_5_vl",
            Self::Qwen3Vl => "qwen3_vl",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Qwen2Vl => "Qwen2-VL",
            Self::Qwen25Vl => "Qwen2.5-VL",
            Self::Qwen3Vl => "Qwen3-VL",
        }
    }
    /// transformers' model class (`architectures` in config.json).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Qwen2Vl => "Qwen2VLForConditionalGeneration",
            Self::Qwen25Vl => "Qwen2_5_VLForConditionalGeneration",
            Self::Qwen3Vl => "Qwen3VLForConditionalGeneration",
        }
    }
    /// How the family's released checkpoints name their tensors: `model.*` / `visual.*` for
    /// Qwen2(.5)-VL, `model.language_model.*` / `model.visual.*` for Qwen3-VL.
    pub fn released_layout(self) -> super::WeightLayout {
        match self {
            Self::Qwen2Vl | Self::Qwen25Vl => super::WeightLayout::Legacy,
            Self::Qwen3Vl => super::WeightLayout::Nested,
        }
    }
}

/// Qwen2.5-VL's window attention: most blocks attend within windows of `window_size`
/// pixels (tokens reordered window by window), a few over the whole image.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowAttention {
    pub window_size: usize,
    pub full_attention_blocks: Vec<usize>,
}

/// The vision tower (ViT with 2D rotary embeddings and a 2x2 patch merger).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub arch: Arch,
    pub depth: usize,
    /// The tower's width (`embed_dim` in Qwen2-VL's config, `hidden_size` in Qwen2.5-VL's).
    pub embed_dim: usize,
    pub num_heads: usize,
    /// The MLP's hidden width (`embed_dim x mlp_ratio` in Qwen2-VL, `intermediate_size` in
    /// Qwen2.5-VL).
    pub intermediate_size: usize,
    /// Output width of the merger: the text model's hidden size (`hidden_size` in Qwen2-VL's
    /// config, `out_hidden_size` in Qwen2.5-VL's).
    pub hidden_size: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub hidden_act: Activation,
    /// Base of the 2D rotary frequencies.
    pub rope_theta: f64,
    /// Qwen2.5-VL only.
    pub window: Option<WindowAttention>,
    /// Qwen3-VL only: the learned absolute position embeddings are a `side x side` table
    /// (`num_position_embeddings = side²`), resampled bilinearly to each image's patch grid.
    pub position_grid: Option<usize>,
    /// Qwen3-VL's `deepstack_visual_indexes`: the blocks whose outputs go, each through its own
    /// merger (the `j`-th listed block through `deepstack_merger_list.j`), to the decoder; the
    /// features are taken in block order and the `k`-th is added after decoder layer `k`.
    pub deepstack: Vec<usize>,
    /// M-RoPE temporal step between a video's temporal patches: 1 for Qwen2-VL; for
    /// Qwen2.5-VL `tokens_per_second x temporal_patch_size / fps` with fps 2, the frame
    /// rate transformers 4.57's processor (and qwen-vl-utils) assume for a list of frames.
    /// The slices of a volume have no frame rate; this keeps them as far apart as the
    /// model's own videos at that rate.
    pub video_time_interval: f64,
}

/// The frame rate assumed for videos given as frames (see
/// [`VisionConfig::video_time_interval`]).
pub const VIDEO_FPS: f64 = 2.0;

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
    pub fn mlp_hidden(&self) -> usize {
        self.intermediate_size
    }
    /// Length of one flattened input patch: channels x temporal x patch x patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    QuickGelu,
    /// The exact (erf) GELU, `nn.GELU()` / "gelu".
    Gelu,
    GeluTanh,
}

impl Activation {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "silu" | "swish" => Self::Silu,
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" => Self::GeluTanh,
            _ => return None,
        })
    }
}

/// The whole of `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlConfig {
    pub arch: Arch,
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    /// The dtype the weights were saved in, as written (`torch_dtype` or `dtype`), if any.
    pub saved_dtype: Option<String>,
    /// Settings the file does not hold, filled with transformers' defaults for its config
    /// class: `field = value`, for `medvlm inspect`.
    pub defaults: Vec<String>,
}

/// transformers 5.24's `Qwen3VLTextConfig` / `Qwen3VLVisionConfig` defaults
/// (models/qwen3_vl/configuration_qwen3_vl.py), for fields a Qwen3-VL file leaves out.
mod qwen3_defaults {
    pub const VOCAB: usize = 151_936;
    pub const HIDDEN: usize = 4096;
    pub const INTERMEDIATE: usize = 22_016;
    pub const LAYERS: usize = 32;
    pub const HEADS: usize = 32;
    pub const KV_HEADS: usize = 32;
    pub const HEAD_DIM: usize = 128;
    pub const MAX_POSITIONS: usize = 128_000;
    pub const RMS_EPS: f64 = 1e-6;
    /// What the modeling code falls back to (`rope_parameters.get("mrope_section", [24, 20,
    /// 20])`).
    pub const MROPE_SECTION: [usize; 3] = [24, 20, 20];
    pub const VISION_DEPTH: usize = 27;
    pub const VISION_WIDTH: usize = 1152;
    pub const VISION_INTERMEDIATE: usize = 4304;
    pub const VISION_HEADS: usize = 16;
    pub const VISION_OUT: usize = 3584;
    pub const PATCH: usize = 16;
    pub const POSITION_EMBEDDINGS: usize = 2304;
    pub const DEEPSTACK: [usize; 3] = [8, 16, 24];
}

/// transformers' config-class defaults (5.x; equal in 4.5x), for fields a file leaves out.
mod defaults {
    pub const VOCAB: usize = 152_064;
    pub const HIDDEN: usize = 8192;
    pub const INTERMEDIATE: usize = 29_568;
    pub const LAYERS: usize = 80;
    pub const HEADS: usize = 64;
    pub const KV_HEADS: usize = 8;
    pub const MAX_POSITIONS: usize = 32_768;
    pub const RMS_EPS: f64 = 1e-5;
    pub const ROPE_THETA: f64 = 1_000_000.0;
    pub const MROPE_SECTION: [usize; 3] = [16, 24, 24];
    pub const VISION_ROPE_THETA: f64 = 10_000.0;
    pub const VISION_DEPTH: usize = 32;
    pub const VISION_HEADS: usize = 16;
    pub const VISION_OUT: usize = 3584;
    /// Qwen2-VL's tower width and MLP ratio.
    pub const QWEN2_EMBED: usize = 1280;
    pub const QWEN2_MLP_RATIO: f64 = 4.0;
    /// Qwen2.5-VL's tower width, MLP width, full-attention blocks.
    pub const QWEN25_WIDTH: usize = 3584;
    pub const QWEN25_INTERMEDIATE: usize = 3420;
    /// transformers 5.24's `Qwen2_5_VLVisionConfig.tokens_per_second` (the released
    /// checkpoints say 2).
    pub const QWEN25_TOKENS_PER_SECOND: f64 = 4.0;
    pub const QWEN25_FULL_BLOCKS: [usize; 4] = [7, 15, 23, 31];
}

type Defaults = std::cell::RefCell<Vec<String>>;

/// Reads fields out of one JSON object, naming the file and the field in every error and
/// recording every default it applies.
struct Fields<'a> {
    file: &'a str,
    prefix: &'a str,
    obj: &'a Map<String, Value>,
    /// Where the text settings also may be (the top level, under a `text_config`): a field
    /// missing here is looked up there before a default applies.
    fallback: Option<&'a Map<String, Value>>,
    defaults: &'a Defaults,
}

impl<'a> Fields<'a> {
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null()).or_else(|| {
            self.fallback
                .and_then(|f| f.get(key))
                .filter(|v| !v.is_null())
        })
    }
    fn defaulted(&self, key: &str, value: impl std::fmt::Display) {
        self.defaults
            .borrow_mut()
            .push(format!("{} = {value}", self.name(key)));
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None => bail!(
                    "{}: field `{}` must be a non-negative integer, found {v}",
                    self.file,
                    self.name(key)
                ),
            },
        }
    }
    /// A positive integer, else transformers' default (recorded).
    fn positive(&self, key: &str, default: usize) -> Result<usize> {
        let v = match self.usize_opt(key)? {
            Some(v) => v,
            None => {
                self.defaulted(key, default);
                default
            }
        };
        if v == 0 {
            bail!("{}: field `{}` must be positive", self.file, self.name(key));
        }
        Ok(v)
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).with_context(|| {
                format!(
                    "{}: field `{}` must be a number, found {v}",
                    self.file,
                    self.name(key)
                )
            }),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(match self.f64_opt(key)? {
            Some(v) => v,
            None => {
                self.defaulted(key, default);
                default
            }
        })
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).with_context(|| {
                format!(
                    "{}: field `{}` must be true or false, found {v}",
                    self.file,
                    self.name(key)
                )
            }),
        }
    }
    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).with_context(|| {
                format!(
                    "{}: field `{}` must be a string, found {v}",
                    self.file,
                    self.name(key)
                )
            }),
        }
    }
    fn object_opt(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(v) => bail!(
                "{}: field `{}` must be an object, found {v}",
                self.file,
                self.name(key)
            ),
        }
    }
    fn activation(&self, key: &str, default: Activation, default_name: &str) -> Result<Activation> {
        match self.str_opt(key)? {
            None => {
                self.defaulted(key, default_name);
                Ok(default)
            }
            Some(s) => Activation::parse(s).with_context(|| {
                format!(
                    "{}: field `{}` = {s:?} is not a supported activation \
                     (silu, quick_gelu, gelu, gelu_pytorch_tanh)",
                    self.file,
                    self.name(key)
                )
            }),
        }
    }
}

impl Qwen2VlConfig {
    /// Reads `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read model config", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses the text of a `config.json`; `file` names it in errors.
    ///
    /// Four layouts load: Qwen2-VL and Qwen2.5-VL, each as released (text settings at the
    /// top level, `rope_scaling`, `torch_dtype`) or as transformers 5 writes them
    /// (`text_config`, `rope_parameters`, `dtype`, `layer_types`). Both places are read; a
    /// field the file holds is never replaced by a default, and values medvlm does not
    /// implement are refused by name.
    pub fn from_json_str(text: &str, file: &str) -> Result<Self> {
        let root: Value =
            serde_json::from_str(text).with_context(|| format!("{file}: not valid JSON"))?;
        let root = root
            .as_object()
            .with_context(|| format!("{file}: expected a JSON object at the top level"))?;
        let defaults = Defaults::default();
        let top = Fields {
            file,
            prefix: "",
            obj: root,
            fallback: None,
            defaults: &defaults,
        };
        let arch = match top.str_opt("model_type")? {
            Some("qwen2_vl") => Arch::Qwen2Vl,
            Some("qwen2_5_vl") => Arch::Qwen25Vl,
            Some("qwen3_vl") => Arch::Qwen3Vl,
            Some("qwen3_vl_moe") => bail!(
                "{file}: model_type \"qwen3_vl_moe\" is Qwen3-VL's mixture-of-experts family \
                 (Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B), which medvlm does not run; the dense \
                 Qwen3-VL checkpoints (model_type \"qwen3_vl\") load"
            ),
            Some(other) => bail!(
                "{file}: model_type is {other:?}, but medvlm runs Qwen2-VL, Qwen2.5-VL and \
                 Qwen3-VL checkpoints (model_type \"qwen2_vl\", \"qwen2_5_vl\" or \"qwen3_vl\")"
            ),
            None => bail!(
                "{file}: required field `model_type` is missing (expected \"qwen2_vl\", \
                 \"qwen2_5_vl\" or \"qwen3_vl\")"
            ),
        };

        // transformers 5 reads the text settings from `text_config` when it exists; medvlm
        // also looks at the top level for what `text_config` leaves out, so nothing the file
        // holds is lost.
        let tf = match top.object_opt("text_config")? {
            Some(obj) => Fields {
                file,
                prefix: "text_config.",
                obj,
                fallback: Some(root),
                defaults: &defaults,
            },
            None => Fields {
                file,
                prefix: "",
                obj: root,
                fallback: None,
                defaults: &defaults,
            },
        };
        if arch == Arch::Qwen3Vl {
            // A mixture-of-experts config under the dense model_type is still one medvlm
            // cannot run: its experts' weights would be missing or ignored.
            for key in ["num_experts", "moe_intermediate_size"] {
                if tf.get(key).is_some() {
                    bail!(
                        "{file}: `{}` is a mixture-of-experts setting (Qwen3-VL-MoE), which \
                         medvlm does not run",
                        tf.name(key)
                    );
                }
            }
        }
        let text = parse_text(&tf, &top, arch)?;

        let empty = Map::new();
        let vobj = match top.object_opt("vision_config")? {
            Some(o) => o,
            None => {
                top.defaulted("vision_config", "{} (every field its default)");
                &empty
            }
        };
        let vf = Fields {
            file,
            prefix: "vision_config.",
            obj: vobj,
            fallback: None,
            defaults: &defaults,
        };
        let vision = parse_vision(&vf, arch)?;
        if vision.hidden_size != text.hidden_size {
            let out = match arch {
                Arch::Qwen2Vl => "vision_config.hidden_size",
                Arch::Qwen25Vl | Arch::Qwen3Vl => "vision_config.out_hidden_size",
            };
            bail!(
                "{file}: {out} ({}) must equal the text hidden_size ({}): the patch merger \
                 projects image features into the text model",
                vision.hidden_size,
                text.hidden_size
            );
        }

        // Token ids sit at the top level; older files may repeat them in text_config.
        let ids = |key: &str, default: u32| -> Result<u32> {
            match top.usize_opt(key)?.or(tf.usize_opt(key)?) {
                Some(v) => Ok(v as u32),
                None => {
                    top.defaulted(key, default);
                    Ok(default)
                }
            }
        };
        let cfg = Qwen2VlConfig {
            arch,
            image_token_id: ids("image_token_id", 151655)?,
            video_token_id: ids("video_token_id", 151656)?,
            vision_start_token_id: ids("vision_start_token_id", 151652)?,
            vision_end_token_id: ids("vision_end_token_id", 151653)?,
            saved_dtype: top
                .str_opt("torch_dtype")?
                .or(top.str_opt("dtype")?)
                .or(tf.str_opt("dtype")?)
                .map(str::to_string),
            text,
            vision,
            defaults: defaults.take(),
        };
        for (name, id) in [
            ("image_token_id", cfg.image_token_id),
            ("video_token_id", cfg.video_token_id),
            ("vision_start_token_id", cfg.vision_start_token_id),
            ("vision_end_token_id", cfg.vision_end_token_id),
        ] {
            if id as usize >= cfg.text.vocab_size {
                bail!(
                    "{file}: {name} = {id} is outside the vocabulary (vocab_size {})",
                    cfg.text.vocab_size
                );
            }
        }
        Ok(cfg)
    }
}

/// One value that may be written in several places (e.g. `rope_theta` at the text level,
/// inside `rope_parameters` and inside `rope_scaling`): the places that hold it must agree.
fn agreeing<T: PartialEq + std::fmt::Debug + Clone>(
    file: &str,
    what: &str,
    found: Vec<(String, T)>,
) -> Result<Option<T>> {
    let Some((first_at, first)) = found.first().cloned() else {
        return Ok(None);
    };
    for (at, v) in &found[1..] {
        if *v != first {
            bail!(
                "{file}: {what} is {first:?} in `{first_at}` but {v:?} in `{at}`; make them \
                 agree (medvlm will not guess which one the checkpoint was trained with)"
            );
        }
    }
    Ok(Some(first))
}

/// The rotary blocks of a config level: `rope_parameters` (transformers 5) and
/// `rope_scaling` (released), with their field-name prefixes.
fn rope_blocks<'a>(f: &Fields<'a>) -> Result<Vec<(String, &'a Map<String, Value>)>> {
    let mut out = Vec::new();
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(o) = f.object_opt(key)? {
            out.push((f.name(key), o));
        }
    }
    Ok(out)
}

fn parse_text(tf: &Fields, top: &Fields, arch: Arch) -> Result<TextConfig> {
    use defaults as d;
    use qwen3_defaults as d3;
    let file = tf.file;
    let q3 = arch == Arch::Qwen3Vl;
    let pick = |qwen2: usize, qwen3: usize| if q3 { qwen3 } else { qwen2 };
    let hidden_size = tf.positive("hidden_size", pick(d::HIDDEN, d3::HIDDEN))?;
    let num_attention_heads = tf.positive("num_attention_heads", pick(d::HEADS, d3::HEADS))?;
    let kv_default = pick(d::KV_HEADS, d3::KV_HEADS);
    let num_key_value_heads = match tf.usize_opt("num_key_value_heads")? {
        Some(0) => bail!(
            "{file}: field `{}` must be positive",
            tf.name("num_key_value_heads")
        ),
        Some(v) => v,
        None if tf.obj.contains_key("num_key_value_heads") => num_attention_heads,
        None => {
            tf.defaulted("num_key_value_heads", kv_default);
            kv_default
        }
    };
    if num_attention_heads % num_key_value_heads != 0 {
        bail!(
            "{file}: num_attention_heads ({num_attention_heads}) must be a multiple of \
             num_key_value_heads ({num_key_value_heads})"
        );
    }
    let head_dim = if q3 {
        // Qwen3VLTextConfig has its own head_dim (default 128): q_proj is heads x head_dim
        // wide whatever the hidden size.
        tf.positive("head_dim", d3::HEAD_DIM)?
    } else {
        if hidden_size % num_attention_heads != 0 {
            bail!(
                "{file}: hidden_size ({hidden_size}) must be divisible by num_attention_heads \
                 ({num_attention_heads})"
            );
        }
        hidden_size / num_attention_heads
    };
    if head_dim % 2 != 0 {
        bail!("{file}: the attention head size ({head_dim}) must be even for rotary embeddings");
    }
    if q3 && tf.bool_opt("attention_bias")?.unwrap_or(false) {
        bail!(
            "{file}: {} = true is not supported (no released Qwen3-VL checkpoint has biases on \
             its attention projections)",
            tf.name("attention_bias")
        );
    }

    // Rotary settings: `rope_parameters` / `rope_scaling` blocks and a plain `rope_theta`,
    // read in every place they may be (text_config first, then the top level).
    let mut blocks = rope_blocks(tf)?;
    if tf.fallback.is_some() && blocks.is_empty() {
        blocks = rope_blocks(top)?;
    }
    for (at, o) in &blocks {
        for key in ["rope_type", "type"] {
            if let Some(v) = o.get(key).filter(|v| !v.is_null()) {
                let kind = v.as_str().unwrap_or("");
                if !matches!(kind, "mrope" | "default") {
                    bail!(
                        "{file}: {at}.{key} = {v} is not supported (medvlm implements the plain \
                         multimodal rotary embedding, \"default\"/\"mrope\"; scaled variants \
                         such as yarn, linear or dynamic are not)"
                    );
                }
            }
        }
    }
    let mut thetas = Vec::new();
    for (at, o) in &blocks {
        if let Some(v) = o.get("rope_theta").filter(|v| !v.is_null()) {
            let t = v.as_f64().with_context(|| {
                format!("{file}: `{at}.rope_theta` must be a number, found {v}")
            })?;
            thetas.push((format!("{at}.rope_theta"), t));
        }
    }
    if let Some(t) = tf.obj.get("rope_theta").filter(|v| !v.is_null()) {
        let t = t.as_f64().with_context(|| {
            format!(
                "{file}: `{}` must be a number, found {t}",
                tf.name("rope_theta")
            )
        })?;
        thetas.push((tf.name("rope_theta"), t));
    }
    if thetas.is_empty() {
        if let Some(t) = top.f64_opt("rope_theta")? {
            thetas.push(("rope_theta".into(), t));
        }
    }
    let rope_theta = match agreeing(file, "rope_theta", thetas)? {
        Some(t) if t > 0.0 => t,
        Some(t) => bail!("{file}: rope_theta must be positive, found {t}"),
        // transformers 5.24 would take 500000 here and 4.57 took 5000000 (the released
        // value): no default is safe.
        None if q3 => bail!(
            "{file}: required field `{}` is missing (Qwen3-VL's rotary base; the released \
             checkpoints use 5000000, and transformers 4.57 and 5.24 default to different values)",
            tf.name("rope_parameters.rope_theta")
        ),
        None => {
            tf.defaulted("rope_parameters.rope_theta", d::ROPE_THETA);
            d::ROPE_THETA
        }
    };
    let mut sections = Vec::new();
    for (at, o) in &blocks {
        if let Some(sec) = o.get("mrope_section").filter(|v| !v.is_null()) {
            let arr: Vec<usize> = sec
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64().map(|n| n as usize))
                        .collect()
                })
                .unwrap_or_default();
            if arr.len() != 3 || sec.as_array().map(|a| a.len()) != Some(3) {
                bail!("{file}: {at}.mrope_section must be three integers, found {sec}");
            }
            sections.push((format!("{at}.mrope_section"), [arr[0], arr[1], arr[2]]));
        }
    }
    let mrope_section = match agreeing(file, "mrope_section", sections)? {
        Some(s) => s,
        None if q3 => {
            tf.defaulted("rope_parameters.mrope_section", "[24, 20, 20]");
            d3::MROPE_SECTION
        }
        None => {
            tf.defaulted("rope_parameters.mrope_section", "[16, 24, 24]");
            d::MROPE_SECTION
        }
    };
    // transformers never reads `mrope_interleaved`: Qwen3-VL's rotary embedding is always
    // interleaved (modeling_qwen3_vl.py 5.24, Qwen3VLTextRotaryEmbedding). A file saying
    // otherwise describes a model transformers does not run.
    if q3 {
        for (at, o) in &blocks {
            if let Some(v) = o.get("mrope_interleaved").filter(|v| !v.is_null()) {
                if v.as_bool() != Some(true) {
                    bail!(
                        "{file}: {at}.mrope_interleaved = {v} is not supported (Qwen3-VL's \
                         multimodal rotary embedding is interleaved; transformers ignores the \
                         field and interleaves)"
                    );
                }
            }
        }
    }
    if mrope_section.iter().sum::<usize>() != head_dim / 2 {
        bail!(
            "{file}: mrope_section {mrope_section:?} must sum to half the attention head size \
             ({})",
            head_dim / 2
        );
    }
    if tf.bool_opt("use_sliding_window")?.unwrap_or(false) {
        bail!(
            "{file}: {} = true is not supported (sliding-window attention; no released \
             Qwen2-VL or Qwen2.5-VL checkpoint uses it)",
            tf.name("use_sliding_window")
        );
    }
    let num_hidden_layers = tf.positive("num_hidden_layers", pick(d::LAYERS, d3::LAYERS))?;
    if let Some(v) = tf.get("layer_types") {
        let kinds = v.as_array().with_context(|| {
            format!(
                "{file}: `{}` must be a list, found {v}",
                tf.name("layer_types")
            )
        })?;
        if kinds.len() != num_hidden_layers {
            bail!(
                "{file}: `{}` lists {} layers but num_hidden_layers is {num_hidden_layers}",
                tf.name("layer_types"),
                kinds.len()
            );
        }
        for (i, k) in kinds.iter().enumerate() {
            if k.as_str() != Some("full_attention") {
                bail!(
                    "{file}: {}[{i}] = {k} is not supported (medvlm implements full attention \
                     in every decoder layer)",
                    tf.name("layer_types")
                );
            }
        }
    }
    let tie = if q3 {
        qwen3_tie(tf, top)?
    } else {
        // transformers 5: the top-level flag (default false), or true inside text_config (older
        // saves put it there).
        let tie = top.bool_opt("tie_word_embeddings")?.unwrap_or(false)
            || tf
                .obj
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        if top.get("tie_word_embeddings").is_none() && !tf.obj.contains_key("tie_word_embeddings") {
            top.defaulted("tie_word_embeddings", false);
        }
        tie
    };
    Ok(TextConfig {
        vocab_size: tf.positive("vocab_size", pick(d::VOCAB, d3::VOCAB))?,
        hidden_size,
        intermediate_size: tf
            .positive("intermediate_size", pick(d::INTERMEDIATE, d3::INTERMEDIATE))?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: tf.f64_or("rms_norm_eps", if q3 { d3::RMS_EPS } else { d::RMS_EPS })?,
        rope_theta,
        mrope_section,
        mrope_interleaved: q3,
        qk_norm: q3,
        tie_word_embeddings: tie,
        max_position_embeddings: tf.positive(
            "max_position_embeddings",
            pick(d::MAX_POSITIONS, d3::MAX_POSITIONS),
        )?,
        hidden_act: tf.activation("hidden_act", Activation::Silu, "silu")?,
    })
}

/// Whether a Qwen3-VL ties its LM head to the embeddings. transformers 5.24 reads the top-level
/// `tie_word_embeddings` (Qwen3VLConfig, default false); 4.57 read `text_config`'s (default
/// false). The released files that tie say so in both places. Where the two would disagree,
/// medvlm refuses rather than pick one.
fn qwen3_tie(tf: &Fields, top: &Fields) -> Result<bool> {
    let file = tf.file;
    let at_top = top.obj.get("tie_word_embeddings").filter(|v| !v.is_null());
    let at_top = match at_top {
        Some(v) => Some(v.as_bool().with_context(|| {
            format!("{file}: field `tie_word_embeddings` must be true or false, found {v}")
        })?),
        None => None,
    };
    let in_text = if tf.fallback.is_some() {
        tf.obj.get("tie_word_embeddings").filter(|v| !v.is_null())
    } else {
        None
    };
    let in_text = match in_text {
        Some(v) => Some(v.as_bool().with_context(|| {
            format!(
                "{file}: field `{}` must be true or false, found {v}",
                tf.name("tie_word_embeddings")
            )
        })?),
        None => None,
    };
    match (at_top, in_text) {
        (Some(a), Some(b)) if a != b => bail!(
            "{file}: tie_word_embeddings is {a} but {} is {b}; transformers 5.24 reads the \
             first and 4.57 the second, so make them agree",
            tf.name("tie_word_embeddings")
        ),
        (Some(a), _) => Ok(a),
        (None, Some(true)) => bail!(
            "{file}: {} is true but the top-level tie_word_embeddings is missing; transformers \
             5.24 reads only the top-level flag (default false) and 4.57 only this one, so add \
             the top-level flag",
            tf.name("tie_word_embeddings")
        ),
        (None, Some(false)) => Ok(false),
        (None, None) => {
            top.defaulted("tie_word_embeddings", false);
            Ok(false)
        }
    }
}

fn parse_vision(vf: &Fields, arch: Arch) -> Result<VisionConfig> {
    use defaults as d;
    use qwen3_defaults as d3;
    let file = vf.file;
    // The tower's width and its output width are named differently in the two families.
    let (embed_dim, hidden_size, intermediate_size, hidden_act, window) = match arch {
        Arch::Qwen2Vl => {
            let embed_dim = vf.positive("embed_dim", d::QWEN2_EMBED)?;
            let ratio = vf.f64_or("mlp_ratio", d::QWEN2_MLP_RATIO)?;
            if ratio <= 0.0 {
                bail!("{file}: vision_config.mlp_ratio must be positive");
            }
            (
                embed_dim,
                vf.positive("hidden_size", d::VISION_OUT)?,
                (embed_dim as f64 * ratio) as usize,
                vf.activation("hidden_act", Activation::QuickGelu, "quick_gelu")?,
                None,
            )
        }
        Arch::Qwen25Vl => {
            let depth = vf.usize_opt("depth")?.unwrap_or(d::VISION_DEPTH);
            // No default here, although transformers has one (112): a guessed window
            // silently changes which patches attend to which.
            let window_size = match vf.usize_opt("window_size")? {
                Some(w) if w > 0 => w,
                Some(_) => bail!("{file}: field `vision_config.window_size` must be positive"),
                None => bail!(
                    "{file}: required field `vision_config.window_size` is missing (Qwen2.5-VL's \
                     window attention needs it; the released checkpoints use 112)"
                ),
            };
            let full = match vf.get("fullatt_block_indexes") {
                None => {
                    vf.defaulted("fullatt_block_indexes", "[7, 15, 23, 31]");
                    d::QWEN25_FULL_BLOCKS.to_vec()
                }
                Some(v) => {
                    let arr = v.as_array().with_context(|| {
                        format!(
                            "{file}: `vision_config.fullatt_block_indexes` must be a list of \
                             block numbers, found {v}"
                        )
                    })?;
                    let mut out = Vec::new();
                    for b in arr {
                        match b.as_u64() {
                            Some(b) if (b as usize) < depth => out.push(b as usize),
                            _ => bail!(
                                "{file}: vision_config.fullatt_block_indexes holds {b}, not a \
                                 block of the {depth}-block tower (0..{})",
                                depth.saturating_sub(1)
                            ),
                        }
                    }
                    out
                }
            };
            (
                vf.positive("hidden_size", d::QWEN25_WIDTH)?,
                vf.positive("out_hidden_size", d::VISION_OUT)?,
                vf.positive("intermediate_size", d::QWEN25_INTERMEDIATE)?,
                vf.activation("hidden_act", Activation::Silu, "silu")?,
                Some(WindowAttention {
                    window_size,
                    full_attention_blocks: full,
                }),
            )
        }
        Arch::Qwen3Vl => (
            vf.positive("hidden_size", d3::VISION_WIDTH)?,
            vf.positive("out_hidden_size", d3::VISION_OUT)?,
            vf.positive("intermediate_size", d3::VISION_INTERMEDIATE)?,
            vf.activation("hidden_act", Activation::GeluTanh, "gelu_pytorch_tanh")?,
            None,
        ),
    };
    let q3 = arch == Arch::Qwen3Vl;
    let num_heads = vf.positive(
        "num_heads",
        if q3 {
            d3::VISION_HEADS
        } else {
            d::VISION_HEADS
        },
    )?;
    if embed_dim % num_heads != 0 {
        bail!(
            "{file}: the vision tower's width ({embed_dim}) must be divisible by \
             vision_config.num_heads ({num_heads})"
        );
    }
    if (embed_dim / num_heads) % 4 != 0 {
        bail!(
            "{file}: the vision head size ({}) must be a multiple of 4 for 2D rotary embeddings",
            embed_dim / num_heads
        );
    }
    // Older files spell these `in_chans` and `spatial_patch_size`.
    let in_channels = match vf.usize_opt("in_channels")? {
        Some(c) => c,
        None => match vf.usize_opt("in_chans")? {
            Some(c) => c,
            None => {
                vf.defaulted("in_channels", 3);
                3
            }
        },
    };
    let patch_size = match vf.usize_opt("patch_size")? {
        Some(p) => p,
        None => match vf.usize_opt("spatial_patch_size")? {
            Some(p) => p,
            None => {
                let p = if q3 { d3::PATCH } else { 14 };
                vf.defaulted("patch_size", p);
                p
            }
        },
    };
    if patch_size == 0 || in_channels == 0 {
        bail!("{file}: vision_config.patch_size and in_channels must be positive");
    }
    let spatial_merge_size = vf.positive("spatial_merge_size", 2)?;
    if let Some(w) = &window {
        let unit = spatial_merge_size * patch_size;
        // transformers floors window_size / (merge x patch) to whole merged tokens; below
        // one it divides by zero.
        if w.window_size < unit {
            bail!(
                "{file}: vision_config.window_size ({}) must be at least patch_size x \
                 spatial_merge_size ({unit} pixels)",
                w.window_size
            );
        }
    }
    let rope_theta = match vf.object_opt("rope_parameters")? {
        Some(o) => {
            if let Some(k) = o.get("rope_type").and_then(Value::as_str) {
                if !matches!(k, "axial" | "default") {
                    bail!(
                        "{file}: vision_config.rope_parameters.rope_type = {k:?} is not \
                         supported (the vision tower's rotary embedding is \"axial\")"
                    );
                }
            }
            match o.get("rope_theta").filter(|v| !v.is_null()) {
                Some(v) => v.as_f64().filter(|t| *t > 0.0).with_context(|| {
                    format!(
                        "{file}: vision_config.rope_parameters.rope_theta must be a positive \
                         number, found {v}"
                    )
                })?,
                None => {
                    vf.defaulted("rope_parameters.rope_theta", d::VISION_ROPE_THETA);
                    d::VISION_ROPE_THETA
                }
            }
        }
        None => {
            vf.defaulted("rope_parameters.rope_theta", d::VISION_ROPE_THETA);
            d::VISION_ROPE_THETA
        }
    };
    let temporal_patch_size = vf.positive("temporal_patch_size", 2)?;
    let depth = vf.positive(
        "depth",
        if q3 {
            d3::VISION_DEPTH
        } else {
            d::VISION_DEPTH
        },
    )?;
    let (position_grid, deepstack) = if q3 {
        qwen3_vision_extras(vf, depth)?
    } else {
        (None, Vec::new())
    };
    let video_time_interval = match arch {
        // Qwen3-VL numbers a video's temporal patches like separate images, with timestamps in
        // the text between them (not supported yet: see `Qwen2Vl::positions`).
        Arch::Qwen2Vl | Arch::Qwen3Vl => 1.0,
        Arch::Qwen25Vl => {
            let tps = vf.f64_or("tokens_per_second", d::QWEN25_TOKENS_PER_SECOND)?;
            if !(tps.is_finite() && tps > 0.0) {
                bail!("{file}: vision_config.tokens_per_second must be a positive number");
            }
            tps * temporal_patch_size as f64 / VIDEO_FPS
        }
    };
    Ok(VisionConfig {
        arch,
        depth,
        embed_dim,
        num_heads,
        intermediate_size,
        hidden_size,
        in_channels,
        patch_size,
        spatial_merge_size,
        temporal_patch_size,
        hidden_act,
        rope_theta,
        window,
        position_grid,
        deepstack,
        video_time_interval,
    })
}

/// Qwen3-VL's learned position table side and DeepStack blocks.
fn qwen3_vision_extras(vf: &Fields, depth: usize) -> Result<(Option<usize>, Vec<usize>)> {
    use qwen3_defaults as d3;
    let file = vf.file;
    let n = vf.positive("num_position_embeddings", d3::POSITION_EMBEDDINGS)?;
    // transformers takes int(sqrt(n)) as the side; a table that is not square would have rows
    // it never reads.
    let side = (n as f64).sqrt().round() as usize;
    if side * side != n {
        bail!(
            "{file}: vision_config.num_position_embeddings ({n}) must be a square (the learned \
             position embeddings are a side x side grid)"
        );
    }
    let deepstack = match vf.get("deepstack_visual_indexes") {
        None => {
            vf.defaulted("deepstack_visual_indexes", "[8, 16, 24]");
            d3::DEEPSTACK.to_vec()
        }
        Some(v) => {
            let arr = v.as_array().with_context(|| {
                format!(
                    "{file}: `vision_config.deepstack_visual_indexes` must be a list of block \
                     numbers, found {v}"
                )
            })?;
            let mut out: Vec<usize> = Vec::new();
            for b in arr {
                match b.as_u64() {
                    Some(b) if (b as usize) < depth && !out.contains(&(b as usize)) => {
                        out.push(b as usize)
                    }
                    _ => bail!(
                        "{file}: vision_config.deepstack_visual_indexes holds {b}, not a \
                         distinct block of the {depth}-block tower (0..{})",
                        depth.saturating_sub(1)
                    ),
                }
            }
            out
        }
    };
    Ok((Some(side), deepstack))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The released Qwen/Qwen2-VL-2B-Instruct config.json (all text fields at the top level).
    const QWEN2_VL_2B: &str = crate::model::presets::QWEN2_VL_2B;

    #[test]
    fn parses_the_released_2b_config() {
        let c = Qwen2VlConfig::from_json_str(QWEN2_VL_2B, "config.json").unwrap();
        assert_eq!(c.text.hidden_size, 1536);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.num_key_value_heads, 2);
        assert_eq!(c.text.mrope_section, [16, 24, 24]);
        assert!(c.text.tie_word_embeddings);
        assert_eq!(c.text.rms_norm_eps, 1e-6);
        assert_eq!(c.vision.in_channels, 3);
        assert_eq!(c.vision.mlp_hidden(), 5120);
        assert_eq!(c.vision.patch_dim(), 1176);
        assert_eq!(c.vision.hidden_act, Activation::QuickGelu);
        assert_eq!(c.image_token_id, 151655);
        assert_eq!(c.saved_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn text_config_wins_over_top_level() {
        let mut v: Value = serde_json::from_str(QWEN2_VL_2B).unwrap();
        let mut t = v.as_object().unwrap().clone();
        t.insert("num_hidden_layers".into(), 3.into());
        t.remove("vision_config");
        v["text_config"] = Value::Object(t);
        let c = Qwen2VlConfig::from_json_str(&v.to_string(), "config.json").unwrap();
        assert_eq!(c.text.num_hidden_layers, 3);
    }

    fn err_of(mutate: impl FnOnce(&mut Value)) -> String {
        let mut v: Value = serde_json::from_str(QWEN2_VL_2B).unwrap();
        mutate(&mut v);
        format!(
            "{:#}",
            Qwen2VlConfig::from_json_str(&v.to_string(), "ckpt/config.json").unwrap_err()
        )
    }

    #[test]
    fn errors_name_file_and_field() {
        let e = err_of(|v| v["hidden_size"] = "wide".into());
        assert!(
            e.contains("ckpt/config.json") && e.contains("`hidden_size`"),
            "{e}"
        );
        let e = err_of(|v| v["model_type"] = "llava".into());
        assert!(e.contains("llava") && e.contains("qwen2_vl"), "{e}");
        let e = err_of(|v| v["vision_config"]["depth"] = "deep".into());
        assert!(e.contains("vision_config.depth"), "{e}");
        let e = err_of(|v| v["rope_scaling"]["mrope_section"] = serde_json::json!([16, 24]));
        assert!(e.contains("mrope_section"), "{e}");
        let e = err_of(|v| v["rope_scaling"]["mrope_section"] = serde_json::json!([16, 24, 16]));
        assert!(e.contains("sum"), "{e}");
        let e = err_of(|v| v["image_token_id"] = 999_999.into());
        assert!(e.contains("image_token_id"), "{e}");
        let e = err_of(|v| v["hidden_act"] = "relu6".into());
        assert!(e.contains("hidden_act"), "{e}");
        let e = err_of(|v| {
            v.as_object_mut().unwrap().remove("vision_config");
        });
        assert!(e.contains("vision_config"), "{e}");
    }

    /// The tiny-c fixture: Qwen2-VL as transformers 5.24 saved it.
    const TINY_C: &str = include_str!("../../tests/fixtures/tiny-c/config.json");

    #[test]
    fn transformers5_layout_reads_text_config_and_rope_parameters() {
        let c = Qwen2VlConfig::from_json_str(TINY_C, "tiny-c/config.json").unwrap();
        assert_eq!(c.arch, Arch::Qwen2Vl);
        assert_eq!(c.text.rope_theta, 5000.0);
        assert_eq!(c.text.mrope_section, [2, 2, 4]);
        assert_eq!(c.text.num_key_value_heads, 1);
        assert!(!c.text.tie_word_embeddings);
        assert_eq!(c.saved_dtype.as_deref(), Some("float32"));
        assert!(
            !c.defaults
                .iter()
                .any(|d| d.contains("rope_theta") && d.starts_with("text")),
            "{:?}",
            c.defaults
        );
    }

    /// The family transformers itself gets wrong: a `rope_scaling` block without a theta
    /// next to `rope_parameters` with one (transformers 5.24 takes rope_scaling and then its
    /// 1e6 default). The file's value is used; disagreeing copies are refused.
    #[test]
    fn rope_theta_held_anywhere_in_the_file_is_never_defaulted() {
        let mut v: Value = serde_json::from_str(TINY_C).unwrap();
        v["text_config"]["rope_scaling"] =
            serde_json::json!({"type": "mrope", "mrope_section": [2, 2, 4]});
        let c = Qwen2VlConfig::from_json_str(&v.to_string(), "c.json").unwrap();
        assert_eq!(c.text.rope_theta, 5000.0);
        // Only at the text level, next to a rope_scaling block.
        let mut w = v.clone();
        w["text_config"]
            .as_object_mut()
            .unwrap()
            .remove("rope_parameters");
        w["text_config"]["rope_theta"] = 7000.0.into();
        let c = Qwen2VlConfig::from_json_str(&w.to_string(), "c.json").unwrap();
        assert_eq!(c.text.rope_theta, 7000.0);
        // Two places, two values.
        v["text_config"]["rope_theta"] = 7000.0.into();
        let e = format!(
            "{:#}",
            Qwen2VlConfig::from_json_str(&v.to_string(), "c.json").unwrap_err()
        );
        assert!(
            e.contains("c.json") && e.contains("rope_theta") && e.contains("7000"),
            "{e}"
        );
    }

    /// Some copies of Qwen2-VL-2B hold only these three vision fields; transformers 5.24
    /// fills the rest from Qwen2VLVisionConfig (depth 32, embed_dim 1280, 16 heads, mlp
    /// ratio 4), and so does medvlm, saying so.
    #[test]
    fn missing_fields_take_transformers_defaults_and_are_listed() {
        let mut v: Value = serde_json::from_str(QWEN2_VL_2B).unwrap();
        v["vision_config"] =
            serde_json::json!({"hidden_size": 1536, "in_chans": 3, "spatial_patch_size": 14});
        let c = Qwen2VlConfig::from_json_str(&v.to_string(), "c.json").unwrap();
        assert_eq!(c.vision.depth, 32);
        assert_eq!(c.vision.embed_dim, 1280);
        assert_eq!(c.vision.num_heads, 16);
        assert_eq!(c.vision.mlp_hidden(), 5120);
        assert_eq!(c.vision.rope_theta, 10_000.0);
        for d in [
            "vision_config.depth = 32",
            "vision_config.embed_dim = 1280",
            "vision_config.num_heads = 16",
        ] {
            assert!(
                c.defaults.iter().any(|x| x == d),
                "{d} not in {:?}",
                c.defaults
            );
        }
        // Held fields are not listed as defaults.
        assert!(!c.defaults.iter().any(|x| x.starts_with("hidden_size")));
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        let mut v: Value = serde_json::from_str(TINY_C).unwrap();
        v["text_config"]["rope_parameters"]["rope_type"] = "yarn".into();
        let e = format!(
            "{:#}",
            Qwen2VlConfig::from_json_str(&v.to_string(), "c.json").unwrap_err()
        );
        assert!(
            e.contains("c.json") && e.contains("rope_parameters.rope_type") && e.contains("yarn"),
            "{e}"
        );
        let mut v: Value = serde_json::from_str(TINY_C).unwrap();
        v["text_config"]["layer_types"][1] = "sliding_attention".into();
        let e = format!(
            "{:#}",
            Qwen2VlConfig::from_json_str(&v.to_string(), "c.json").unwrap_err()
        );
        assert!(e.contains("layer_types[1]"), "{e}");
        let mut v: Value = serde_json::from_str(TINY_C).unwrap();
        v["text_config"]["use_sliding_window"] = true.into();
        let e = format!(
            "{:#}",
            Qwen2VlConfig::from_json_str(&v.to_string(), "c.json").unwrap_err()
        );
        assert!(e.contains("use_sliding_window"), "{e}");
    }

    const TINY_25A: &str = include_str!("../../tests/fixtures/tiny-25a/config.json");
    const TINY_25B: &str = include_str!("../../tests/fixtures/tiny-25b/config.json");

    #[test]
    fn qwen25_configs_parse_in_both_layouts() {
        let a = Qwen2VlConfig::from_json_str(TINY_25A, "a.json").unwrap();
        assert_eq!(a.arch, Arch::Qwen25Vl);
        assert!(a.text.tie_word_embeddings);
        assert_eq!(a.vision.embed_dim, 32);
        assert_eq!(a.vision.hidden_size, 64);
        assert_eq!(a.vision.mlp_hidden(), 48);
        assert_eq!(
            a.vision.window,
            Some(WindowAttention {
                window_size: 56,
                full_attention_blocks: vec![1]
            })
        );
        let b = Qwen2VlConfig::from_json_str(TINY_25B, "b.json").unwrap();
        assert_eq!(b.text.rope_theta, 20_000.0);
        assert!(!b.text.tie_word_embeddings);
        assert_eq!(
            b.vision.window.as_ref().unwrap().full_attention_blocks,
            vec![0, 3]
        );

        let bad = |f: &dyn Fn(&mut Value)| {
            let mut v: Value = serde_json::from_str(TINY_25B).unwrap();
            f(&mut v);
            format!(
                "{:#}",
                Qwen2VlConfig::from_json_str(&v.to_string(), "b.json").unwrap_err()
            )
        };
        let e = bad(&|v| {
            v["vision_config"]
                .as_object_mut()
                .unwrap()
                .remove("window_size");
        });
        assert!(
            e.contains("b.json") && e.contains("vision_config.window_size"),
            "{e}"
        );
        let e = bad(&|v| v["vision_config"]["fullatt_block_indexes"] = serde_json::json!([0, 9]));
        assert!(
            e.contains("fullatt_block_indexes") && e.contains('9'),
            "{e}"
        );
        let e = bad(&|v| v["vision_config"]["window_size"] = 20.into());
        assert!(e.contains("window_size"), "{e}");
    }
    const TINY_3A: &str = include_str!("../../tests/fixtures/tiny-3a/config.json");
    const TINY_3B: &str = include_str!("../../tests/fixtures/tiny-3b/config.json");

    #[test]
    fn qwen3_configs_parse_in_both_layouts() {
        let a = Qwen2VlConfig::from_json_str(TINY_3A, "a.json").unwrap();
        assert_eq!(a.arch, Arch::Qwen3Vl);
        assert!(a.text.tie_word_embeddings);
        assert!(a.text.qk_norm && a.text.mrope_interleaved);
        assert_eq!(a.text.head_dim, 16);
        assert_eq!(a.text.rope_theta, 5_000_000.0);
        assert_eq!(a.text.mrope_section, [4, 2, 2]);
        assert_eq!(a.vision.embed_dim, 32);
        assert_eq!(a.vision.hidden_size, 64);
        assert_eq!(a.vision.patch_size, 16);
        assert_eq!(a.vision.hidden_act, Activation::GeluTanh);
        assert_eq!(a.vision.position_grid, Some(8));
        assert_eq!(a.vision.deepstack, vec![0, 1, 3]);
        assert_eq!(a.vision.rope_theta, 10_000.0);
        let b = Qwen2VlConfig::from_json_str(TINY_3B, "b.json").unwrap();
        assert!(!b.text.tie_word_embeddings);
        // An explicit head_dim: 4 heads x 32 over a hidden size of 96.
        assert_eq!((b.text.head_dim, b.text.hidden_size), (32, 96));
        assert_eq!(b.text.rope_theta, 20_000.0);
        assert_eq!(b.vision.deepstack, vec![2, 0]);
        assert_eq!(b.vision.position_grid, Some(10));
        assert_eq!(b.saved_dtype.as_deref(), Some("bfloat16"));
    }

    /// The released Qwen3-VL-2B-Instruct shape, written as the released files write it: what
    /// `init --preset qwen3-vl-2b` builds.
    #[test]
    fn qwen3_defaults_are_transformers_5_24s() {
        let v = serde_json::json!({
            "model_type": "qwen3_vl",
            "text_config": {"rope_theta": 5000000},
            "vision_config": {"out_hidden_size": 4096},
        });
        let c = Qwen2VlConfig::from_json_str(&v.to_string(), "c.json").unwrap();
        assert_eq!(c.text.vocab_size, 151_936);
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.num_key_value_heads, 32);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.mrope_section, [24, 20, 20]);
        assert_eq!(c.text.max_position_embeddings, 128_000);
        assert!(!c.text.tie_word_embeddings);
        assert_eq!(c.vision.depth, 27);
        assert_eq!(c.vision.embed_dim, 1152);
        assert_eq!(c.vision.mlp_hidden(), 4304);
        assert_eq!(c.vision.patch_size, 16);
        assert_eq!(c.vision.position_grid, Some(48));
        assert_eq!(c.vision.deepstack, vec![8, 16, 24]);
        for d in [
            "text_config.head_dim = 128",
            "vision_config.deepstack_visual_indexes = [8, 16, 24]",
            "tie_word_embeddings = false",
        ] {
            assert!(
                c.defaults.iter().any(|x| x == d),
                "{d} not in {:?}",
                c.defaults
            );
        }
    }

    #[test]
    fn qwen3_refusals_name_the_field() {
        let bad = |f: &dyn Fn(&mut Value)| {
            let mut v: Value = serde_json::from_str(TINY_3A).unwrap();
            f(&mut v);
            format!(
                "{:#}",
                Qwen2VlConfig::from_json_str(&v.to_string(), "q.json").unwrap_err()
            )
        };
        let e = bad(&|v| v["model_type"] = "qwen3_vl_moe".into());
        assert!(
            e.contains("q.json") && e.contains("mixture-of-experts"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
        let e = bad(&|v| v["text_config"]["num_experts"] = 128.into());
        assert!(e.contains("text_config.num_experts"), "{e}");
        let e = bad(&|v| {
            v["text_config"]
                .as_object_mut()
                .unwrap()
                .remove("rope_theta");
        });
        assert!(e.contains("rope_theta") && e.contains("5000000"), "{e}");
        let e = bad(&|v| v["text_config"]["rope_scaling"]["mrope_interleaved"] = false.into());
        assert!(
            e.contains("text_config.rope_scaling.mrope_interleaved"),
            "{e}"
        );
        let e = bad(&|v| v["text_config"]["tie_word_embeddings"] = false.into());
        assert!(
            e.contains("tie_word_embeddings is true")
                && e.contains("text_config.tie_word_embeddings is false"),
            "{e}"
        );
        let e = bad(&|v| {
            v.as_object_mut().unwrap().remove("tie_word_embeddings");
        });
        assert!(e.contains("top-level"), "{e}");
        let e = bad(&|v| v["text_config"]["attention_bias"] = true.into());
        assert!(e.contains("text_config.attention_bias"), "{e}");
        let e =
            bad(&|v| v["vision_config"]["deepstack_visual_indexes"] = serde_json::json!([0, 4]));
        assert!(
            e.contains("deepstack_visual_indexes") && e.contains('4'),
            "{e}"
        );
        let e =
            bad(&|v| v["vision_config"]["deepstack_visual_indexes"] = serde_json::json!([1, 1]));
        assert!(e.contains("distinct"), "{e}");
        let e = bad(&|v| v["vision_config"]["num_position_embeddings"] = 60.into());
        assert!(e.contains("vision_config.num_position_embeddings"), "{e}");
        // Both tie flags false, or only text_config's false: untied, as both versions read it.
        let mut v: Value = serde_json::from_str(TINY_3A).unwrap();
        v.as_object_mut().unwrap().remove("tie_word_embeddings");
        v["text_config"]["tie_word_embeddings"] = false.into();
        let c = Qwen2VlConfig::from_json_str(&v.to_string(), "q.json").unwrap();
        assert!(!c.text.tie_word_embeddings);
    }
}
