//! `config.json` of a Hugging Face Qwen2-VL checkpoint.
//!
//! Two layouts exist in the wild: the released checkpoints keep the text model's fields at the
//! top level; transformers >= 4.52 writes them again under `text_config`. When `text_config` is
//! present it wins, as in transformers. Fields the architecture cannot do without are required
//! and reported by name; everything else takes transformers' defaults.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// The text decoder (Qwen2 with multimodal rotary embeddings).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// How the rotary frequencies are split between the (temporal, height, width) axes.
    /// Sums to `head_dim / 2`.
    pub mrope_section: [usize; 3],
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The vision tower (ViT with 2D rotary embeddings and a 2x2 patch merger).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    /// Output width of the merger: the text model's hidden size.
    pub hidden_size: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub hidden_act: Activation,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
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
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    /// The dtype the weights were saved in, as written (`torch_dtype` or `dtype`), if any.
    pub saved_dtype: Option<String>,
}

/// Reads fields out of one JSON object, naming the file and the field in every error.
struct Fields<'a> {
    file: &'a str,
    prefix: &'a str,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
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
    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.with_context(|| {
            format!(
                "{}: required field `{}` is missing",
                self.file,
                self.name(key)
            )
        })
    }
    fn positive(&self, key: &str, default: Option<usize>) -> Result<usize> {
        let v = match default {
            Some(d) => self.usize_opt(key)?.unwrap_or(d),
            None => self.usize_req(key)?,
        };
        if v == 0 {
            bail!("{}: field `{}` must be positive", self.file, self.name(key));
        }
        Ok(v)
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().with_context(|| {
                format!(
                    "{}: field `{}` must be a number, found {v}",
                    self.file,
                    self.name(key)
                )
            }),
        }
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
    fn activation(&self, key: &str, default: Activation) -> Result<Activation> {
        match self.str_opt(key)? {
            None => Ok(default),
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
    fn token_id(&self, key: &str, default: u32) -> Result<u32> {
        Ok(self.usize_opt(key)?.map(|v| v as u32).unwrap_or(default))
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
    pub fn from_json_str(text: &str, file: &str) -> Result<Self> {
        let root: Value =
            serde_json::from_str(text).with_context(|| format!("{file}: not valid JSON"))?;
        let root = root
            .as_object()
            .with_context(|| format!("{file}: expected a JSON object at the top level"))?;
        let top = Fields {
            file,
            prefix: "",
            obj: root,
        };
        match top.str_opt("model_type")? {
            Some("qwen2_vl") => {}
            Some(other) => bail!(
                "{file}: model_type is {other:?}, but medvlm runs Qwen2-VL checkpoints \
                 (model_type \"qwen2_vl\")"
            ),
            None => bail!("{file}: required field `model_type` is missing (expected \"qwen2_vl\")"),
        }

        let text_obj = match root.get("text_config") {
            Some(Value::Object(o)) => Some(o),
            Some(Value::Null) | None => None,
            Some(v) => bail!("{file}: field `text_config` must be an object, found {v}"),
        };
        let tf = match text_obj {
            Some(obj) => Fields {
                file,
                prefix: "text_config.",
                obj,
            },
            None => Fields {
                file,
                prefix: "",
                obj: root,
            },
        };
        let text = parse_text(&tf, &top)?;

        let vobj = match root.get("vision_config") {
            Some(Value::Object(o)) => o,
            Some(v) => bail!("{file}: field `vision_config` must be an object, found {v}"),
            None => bail!("{file}: required field `vision_config` is missing"),
        };
        let vf = Fields {
            file,
            prefix: "vision_config.",
            obj: vobj,
        };
        let vision = parse_vision(&vf)?;
        if vision.hidden_size != text.hidden_size {
            bail!(
                "{file}: vision_config.hidden_size ({}) must equal the text hidden_size ({}): \
                 the patch merger projects image features into the text model",
                vision.hidden_size,
                text.hidden_size
            );
        }

        let ids = |key: &str, default: u32| -> Result<u32> {
            match tf.usize_opt(key)? {
                Some(v) => Ok(v as u32),
                None => top.token_id(key, default),
            }
        };
        let cfg = Qwen2VlConfig {
            image_token_id: ids("image_token_id", 151655)?,
            video_token_id: ids("video_token_id", 151656)?,
            vision_start_token_id: ids("vision_start_token_id", 151652)?,
            vision_end_token_id: ids("vision_end_token_id", 151653)?,
            saved_dtype: top
                .str_opt("torch_dtype")?
                .or(top.str_opt("dtype")?)
                .map(str::to_string),
            text,
            vision,
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

fn parse_text(tf: &Fields, top: &Fields) -> Result<TextConfig> {
    let file = tf.file;
    let hidden_size = tf.positive("hidden_size", None)?;
    let num_attention_heads = tf.positive("num_attention_heads", None)?;
    let num_key_value_heads = tf.positive("num_key_value_heads", Some(num_attention_heads))?;
    if hidden_size % num_attention_heads != 0 {
        bail!(
            "{file}: hidden_size ({hidden_size}) must be divisible by num_attention_heads \
             ({num_attention_heads})"
        );
    }
    if num_attention_heads % num_key_value_heads != 0 {
        bail!(
            "{file}: num_attention_heads ({num_attention_heads}) must be a multiple of \
             num_key_value_heads ({num_key_value_heads})"
        );
    }
    let head_dim = hidden_size / num_attention_heads;
    if head_dim % 2 != 0 {
        bail!("{file}: the attention head size ({head_dim}) must be even for rotary embeddings");
    }

    // rope_scaling: {"type": "mrope" | "default", "mrope_section": [t, h, w]}
    let rope = tf.get("rope_scaling").or(top.get("rope_scaling"));
    let mrope_section = match rope {
        None => bail!(
            "{file}: required field `rope_scaling.mrope_section` is missing \
             (Qwen2-VL splits rotary frequencies between time, height and width)"
        ),
        Some(Value::Object(o)) => {
            let kind = o
                .get("rope_type")
                .or(o.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if !matches!(kind, "mrope" | "default") {
                bail!(
                    "{file}: rope_scaling type {kind:?} is not supported \
                     (only the plain multimodal rope, \"mrope\"/\"default\")"
                );
            }
            let sec = o.get("mrope_section").with_context(|| {
                format!("{file}: required field `rope_scaling.mrope_section` is missing")
            })?;
            let arr: Vec<usize> = sec
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64().map(|n| n as usize))
                        .collect()
                })
                .unwrap_or_default();
            if arr.len() != 3 || sec.as_array().map(|a| a.len()) != Some(3) {
                bail!("{file}: rope_scaling.mrope_section must be three integers, found {sec}");
            }
            [arr[0], arr[1], arr[2]]
        }
        Some(v) => bail!("{file}: field `rope_scaling` must be an object, found {v}"),
    };
    if mrope_section.iter().sum::<usize>() != head_dim / 2 {
        bail!(
            "{file}: rope_scaling.mrope_section {mrope_section:?} must sum to half the head size \
             ({})",
            head_dim / 2
        );
    }
    if tf.bool_opt("use_sliding_window")?.unwrap_or(false) {
        bail!(
            "{file}: use_sliding_window = true is not supported (no released Qwen2-VL checkpoint \
             uses it)"
        );
    }
    // transformers' text config defaults to untied; the top-level PretrainedConfig to tied.
    // Whichever file level says it explicitly decides.
    let tie = match tf.bool_opt("tie_word_embeddings")? {
        Some(b) => b,
        None => top.bool_opt("tie_word_embeddings")?.unwrap_or(false),
    };
    Ok(TextConfig {
        vocab_size: tf.positive("vocab_size", None)?,
        hidden_size,
        intermediate_size: tf.positive("intermediate_size", None)?,
        num_hidden_layers: tf.positive("num_hidden_layers", None)?,
        num_attention_heads,
        num_key_value_heads,
        rms_norm_eps: tf.f64_or("rms_norm_eps", 1e-5)?,
        rope_theta: tf.f64_or("rope_theta", 1_000_000.0)?,
        mrope_section,
        tie_word_embeddings: tie,
        max_position_embeddings: tf.positive("max_position_embeddings", Some(32768))?,
        hidden_act: tf.activation("hidden_act", Activation::Silu)?,
    })
}

fn parse_vision(vf: &Fields) -> Result<VisionConfig> {
    let file = vf.file;
    let embed_dim = vf.positive("embed_dim", None)?;
    let num_heads = vf.positive("num_heads", None)?;
    if embed_dim % num_heads != 0 {
        bail!(
            "{file}: vision_config.embed_dim ({embed_dim}) must be divisible by \
             vision_config.num_heads ({num_heads})"
        );
    }
    if (embed_dim / num_heads) % 4 != 0 {
        bail!(
            "{file}: the vision head size ({}) must be a multiple of 4 for 2D rotary embeddings",
            embed_dim / num_heads
        );
    }
    let in_channels = match vf.usize_opt("in_channels")? {
        Some(c) => c,
        None => vf.usize_opt("in_chans")?.unwrap_or(3),
    };
    let patch_size = match vf.usize_opt("patch_size")? {
        Some(p) => p,
        None => vf.usize_opt("spatial_patch_size")?.unwrap_or(14),
    };
    let mlp_ratio = vf.f64_or("mlp_ratio", 4.0)?;
    if mlp_ratio <= 0.0 {
        bail!("{file}: vision_config.mlp_ratio must be positive");
    }
    if patch_size == 0 || in_channels == 0 {
        bail!("{file}: vision_config.patch_size and in_channels must be positive");
    }
    Ok(VisionConfig {
        depth: vf.positive("depth", None)?,
        embed_dim,
        num_heads,
        mlp_ratio,
        hidden_size: vf.positive("hidden_size", None)?,
        in_channels,
        patch_size,
        spatial_merge_size: vf.positive("spatial_merge_size", Some(2))?,
        temporal_patch_size: vf.positive("temporal_patch_size", Some(2))?,
        hidden_act: vf.activation("hidden_act", Activation::QuickGelu)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The released Qwen/Qwen2-VL-2B-Instruct config.json (all text fields at the top level).
    const QWEN2_VL_2B: &str = crate::init::QWEN2_VL_2B_CONFIG;

    #[test]
    fn parses_the_released_2b_config() {
        let c = Qwen2VlConfig::from_json_str(QWEN2_VL_2B, "config.json").unwrap();
        assert_eq!(c.text.hidden_size, 1536);
        assert_eq!(c.text.head_dim(), 128);
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
        let e = err_of(|v| {
            v.as_object_mut().unwrap().remove("hidden_size");
        });
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
}
