//! `medvlm import-gguf`: a Qwen2-VL or Qwen2.5-VL as llama.cpp and LM Studio users have it
//! (a text model GGUF plus the `mmproj` GGUF of its vision tower) becomes a medvlm
//! checkpoint directory that every command loads with `--model`. Ollama's own single-file
//! models are another layout (architecture "qwen25vl") and are refused by name.
//!
//! Exact for what it reads: f32, f16 and bf16 tensors are written as they are; Q8_0, Q4_1,
//! Q4_K and Q6_K matrices become medvlm's q8_0, q4_1, q4_k and q6_k weights of the same
//! values ([`QWeight::from_ggml`] moves bits, it does not re-quantize), so a Q4_K_M file runs
//! as the Q4_K/Q6_K mix it is. Other ggml types (Q5_K, Q4_0, the IQ types, ...) are refused
//! by name. What llama.cpp's converter changed is undone without arithmetic: the vision
//! tower's fused qkv, split into q, k and v, is joined again (rows in order, blocks as they
//! are), and its Conv3d patch embedding, split into one 2-D kernel per frame, is stacked back.
//!
//! The checkpoint's side files come from the metadata: config.json (the family from the
//! mmproj's projector type, sizes from the keys and the tensors' shapes), tokenizer.json
//! (the GGUF's vocabulary and merges in Qwen2's tokenizer pipeline, which its
//! `tokenizer.ggml.pre = "qwen2"` names), the chat template, preprocessor_config.json (mean,
//! std, patch and merge sizes from the mmproj; the pixel bounds, which a GGUF does not
//! carry, Qwen2-VL's released ones unless given) and generation_config.json (from
//! `general.sampling.*` when present). Float keys are stored as f32 in a GGUF; each is
//! written as the shortest decimal that reads back as that f32 (1e-6, not 9.99999997e-7).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value as Json};

use crate::kernels::quant::{QWeight, QuantKind};
use crate::model::config::Arch;
use crate::model::gguf::{GgmlType, Gguf, Value};
use crate::model::{quantized, Qwen2VlConfig, WeightLayout};

/// The attention window of a Qwen2.5-VL whose mmproj does not say one: the released models'
/// 112 pixels, which llama.cpp also takes then.
const DEFAULT_WINDOW: usize = 112;

/// Qwen2.5-VL's released `vision_config.tokens_per_second` (video positions; not in a GGUF).
const QWEN25_TOKENS_PER_SECOND: usize = 2;

/// gguf-py's token types (`gguf.TokenType`).
const NORMAL: i128 = 1;
const CONTROL: i128 = 3;
const USER_DEFINED: i128 = 4;
const UNUSED: i128 = 5;

/// What `import-gguf` may be told besides the two files.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
}

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct Imported {
    pub arch: Arch,
    /// Tensors written per ggml type, e.g. {"Q4_K": 140, "Q6_K": 29, "F32": 170}.
    pub types: BTreeMap<String, usize>,
}

/// Writes `out` (which must not exist) from a text model GGUF and its mmproj GGUF.
pub fn import_gguf(
    model: &Path,
    mmproj: &Path,
    out: &Path,
    opts: &ImportOptions,
) -> Result<Imported> {
    if out.exists() {
        bail!(
            "--out {}: already exists; choose a new directory",
            out.display()
        );
    }
    let text = Gguf::open(model)?;
    let vision = Gguf::open(mmproj)?;
    let arch = check_pair(&text, &vision)?;
    let tokenizer = Vocabulary::read(&text)?;
    let config = config_json(&text, &vision, arch, &tokenizer)?;
    let config_text = serde_json::to_string_pretty(&config)?;
    let parsed = Qwen2VlConfig::from_json_str(&config_text, "the config made from the GGUF files")
        .with_context(|| format!("{} + {}", model.display(), mmproj.display()))?;

    // Convert every tensor, then check the set against what a model of this config asks for.
    let mut weights = Weights::default();
    convert_text(&text, &mut weights)?;
    convert_vision(&vision, arch, &mut weights)?;
    weights.check(&parsed, &text, &vision)?;

    let staging = crate::files::Staging::beside(out, "import")?;
    let dir = staging.path();
    let write = |name: &str, v: &Json| -> Result<()> {
        crate::files::write_atomic(&dir.join(name), serde_json::to_string_pretty(v)?.as_bytes())
    };
    crate::files::write_atomic(&dir.join("config.json"), config_text.as_bytes())?;
    crate::files::write_atomic(&dir.join("tokenizer.json"), tokenizer.json()?.as_bytes())?;
    write(
        "tokenizer_config.json",
        &tokenizer_config(&text, &tokenizer)?,
    )?;
    write("preprocessor_config.json", &preprocessor(&vision, opts)?)?;
    if let Some(g) = generation_config(&text, &tokenizer)? {
        write("generation_config.json", &g)?;
    }
    weights.write(&dir.join("model.safetensors"))?;
    if !weights.manifest.is_empty() {
        let manifest = quantized::Manifest {
            format: weights.main_format().name().into(),
            tensors: weights
                .manifest
                .iter()
                .map(|(n, k)| (n.clone(), k.name().to_string()))
                .collect(),
        };
        crate::files::write_atomic(
            &dir.join(quantized::MANIFEST),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )?;
    }
    staging.commit(out)?;
    Ok(Imported {
        arch,
        types: weights.types,
    })
}

/// The family, after checking that `text` is a Qwen2-VL text model and `vision` its mmproj.
fn check_pair(text: &Gguf, vision: &Gguf) -> Result<Arch> {
    let t_arch = text.str("general.architecture")?;
    let v_arch = vision.str("general.architecture")?;
    if t_arch == "clip" && v_arch != "clip" {
        bail!(
            "{} is a vision (mmproj) file and {} is not: pass the text model as --model and \
             the mmproj as --mmproj",
            text.path().display(),
            vision.path().display()
        );
    }
    if t_arch != "qwen2vl" {
        bail!(
            "{}: general.architecture is {t_arch:?}; medvlm imports Qwen2-VL and Qwen2.5-VL \
             GGUFs (\"qwen2vl\")",
            text.path().display()
        );
    }
    if v_arch != "clip" {
        bail!(
            "{}: general.architecture is {v_arch:?}, not an mmproj (\"clip\") file",
            vision.path().display()
        );
    }
    let projector = vision
        .str("clip.projector_type")
        .or_else(|_| vision.str("clip.vision.projector_type"))?;
    match projector {
        "qwen2vl_merger" => Ok(Arch::Qwen2Vl),
        "qwen2.5vl_merger" => Ok(Arch::Qwen25Vl),
        p => bail!(
            "{}: projector type {p:?}; medvlm imports Qwen2-VL's (\"qwen2vl_merger\") and \
             Qwen2.5-VL's (\"qwen2.5vl_merger\") vision towers",
            vision.path().display()
        ),
    }
}

/// An f32 metadata value as the shortest decimal that reads back as the same f32: GGUF keeps
/// floats in f32, and the original config said 1e-6, not 9.999999974752427e-7.
fn short(x: f64) -> f64 {
    format!("{}", x as f32).parse().unwrap_or(x)
}

/// The tokenizer a GGUF carries.
struct Vocabulary {
    /// Regular tokens (byte-level strings) with their ids.
    normal: Vec<(String, u32)>,
    /// Added tokens: (id, text, special).
    added: Vec<(u32, String, bool)>,
    merges: Vec<(String, String)>,
    /// Every token by id, for the special ids (unused ids are `None`).
    by_id: Vec<Option<String>>,
    path: std::path::PathBuf,
}

impl Vocabulary {
    fn read(g: &Gguf) -> Result<Self> {
        let p = g.path().display();
        let model = g.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            bail!("{p}: tokenizer.ggml.model is {model:?}; Qwen2's tokenizer is \"gpt2\" (byte-level BPE)");
        }
        let pre = g.str("tokenizer.ggml.pre")?;
        if pre != "qwen2" {
            bail!(
                "{p}: tokenizer.ggml.pre is {pre:?}; medvlm rebuilds Qwen2's pre-tokenizer \
                 (\"qwen2\") only"
            );
        }
        let tokens = g.strs("tokenizer.ggml.tokens")?;
        let types = g.array("tokenizer.ggml.token_type")?;
        if types.len() != tokens.len() {
            bail!(
                "{p}: {} tokens but {} token types",
                tokens.len(),
                types.len()
            );
        }
        let mut v = Self {
            normal: Vec::new(),
            added: Vec::new(),
            merges: Vec::new(),
            by_id: Vec::with_capacity(tokens.len()),
            path: g.path().to_path_buf(),
        };
        for (i, (tok, ty)) in tokens.iter().zip(types).enumerate() {
            let id = u32::try_from(i).context("too many tokens")?;
            let ty = match ty {
                Value::Int(t) => *t,
                _ => bail!("{p}: tokenizer.ggml.token_type holds a non-integer"),
            };
            match ty {
                NORMAL => v.normal.push((tok.to_string(), id)),
                CONTROL => v.added.push((id, tok.to_string(), true)),
                USER_DEFINED => v.added.push((id, tok.to_string(), false)),
                // The converter pads the vocabulary to the embedding's rows with these.
                UNUSED => {
                    v.by_id.push(None);
                    continue;
                }
                t => bail!(
                    "{p}: token {id} ({tok:?}) has type {t}, which a Qwen2 vocabulary does not use"
                ),
            }
            v.by_id.push(Some(tok.to_string()));
        }
        for m in g.strs("tokenizer.ggml.merges")? {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| anyhow!("{p}: merge {m:?} is not two tokens"))?;
            v.merges.push((a.to_string(), b.to_string()));
        }
        Ok(v)
    }

    /// The id of the token `text`, which the model needs.
    fn id(&self, text: &str) -> Result<u32> {
        self.by_id
            .iter()
            .position(|t| t.as_deref() == Some(text))
            .map(|i| i as u32)
            .ok_or_else(|| {
                anyhow!(
                    "{}: the vocabulary has no {text} token",
                    self.path.display()
                )
            })
    }

    /// The token of metadata key `key` (an id), if the key is there.
    fn token_of(&self, g: &Gguf, key: &str) -> Result<Option<String>> {
        if g.get(key).is_none() {
            return Ok(None);
        }
        let id = g.usize(key)?;
        match self.by_id.get(id) {
            Some(Some(t)) => Ok(Some(t.clone())),
            _ => bail!(
                "{}: {key} is {id}, not a token of the vocabulary",
                g.path().display()
            ),
        }
    }

    /// tokenizer.json in the layout of Qwen2's released one (NFC, Qwen2's split regex, byte
    /// level, BPE without unknown token), checked by loading it: every token must get the id
    /// the GGUF gives it.
    fn json(&self) -> Result<String> {
        let vocab: serde_json::Map<String, Json> = self
            .normal
            .iter()
            .map(|(t, id)| (t.clone(), json!(id)))
            .collect();
        let added: Vec<Json> = self
            .added
            .iter()
            .map(|(id, t, special)| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": special})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": false, "use_regex": false});
        let tok = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": crate::processor::tokenizer::QWEN2_SPLIT},
                 "behavior": "Isolated", "invert": false},
                byte_level,
            ]},
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": self.merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()},
        });
        let text = serde_json::to_string(&tok)?;
        let loaded: tokenizers::Tokenizer = text.parse().map_err(|e| {
            anyhow!(
                "{}: the vocabulary does not make a tokenizer: {e}",
                self.path.display()
            )
        })?;
        for (id, t) in self.by_id.iter().enumerate() {
            if let Some(t) = t {
                if loaded.token_to_id(t) != Some(id as u32) {
                    bail!(
                        "{}: token {t:?} is id {id} in the GGUF but {:?} in the rebuilt \
                         tokenizer (its merges or added tokens are out of order)",
                        self.path.display(),
                        loaded.token_to_id(t)
                    );
                }
            }
        }
        Ok(text)
    }
}

fn tokenizer_config(g: &Gguf, v: &Vocabulary) -> Result<Json> {
    let template = match g.get("tokenizer.chat_template") {
        Some(_) => g.str("tokenizer.chat_template")?.to_string(),
        None => {
            eprintln!(
                "note: {} has no chat template; writing Qwen2-VL-2B-Instruct's",
                g.path().display()
            );
            crate::model::presets::QWEN2_VL_CHAT_TEMPLATE.to_string()
        }
    };
    let context = g.usize("qwen2vl.context_length")?;
    let added: serde_json::Map<String, Json> = v
        .added
        .iter()
        .map(|(id, t, special)| {
            (
                id.to_string(),
                json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": special}),
            )
        })
        .collect();
    Ok(json!({
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "chat_template": template,
        "eos_token": v.token_of(g, "tokenizer.ggml.eos_token_id")?,
        "pad_token": v.token_of(g, "tokenizer.ggml.padding_token_id")?,
        "bos_token": null,
        "unk_token": null,
        "model_max_length": context,
        "padding_side": "left",
        "errors": "replace",
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
    }))
}

/// generation_config.json from `general.sampling.*` (what the converter took from the
/// original generation_config.json), `None` without them.
fn generation_config(g: &Gguf, v: &Vocabulary) -> Result<Option<Json>> {
    let mut out = serde_json::Map::new();
    for (key, field) in [
        ("general.sampling.temp", "temperature"),
        ("general.sampling.top_p", "top_p"),
        ("general.sampling.min_p", "min_p"),
        ("general.sampling.penalty_repeat", "repetition_penalty"),
    ] {
        if g.get(key).is_some() {
            out.insert(field.into(), json!(short(g.f64(key)?)));
        }
    }
    if g.get("general.sampling.top_k").is_some() {
        out.insert("top_k".into(), json!(g.usize("general.sampling.top_k")?));
    }
    if out.is_empty() {
        return Ok(None);
    }
    out.insert("do_sample".into(), json!(true));
    for (key, field) in [
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if v.token_of(g, key)?.is_some() {
            out.insert(field.into(), json!(g.usize(key)?));
        }
    }
    Ok(Some(Json::Object(out)))
}

/// preprocessor_config.json: mean, std, patch and merge from the mmproj; the pixel bounds,
/// which a GGUF does not carry, Qwen2-VL's released ones unless the user gives them.
fn preprocessor(vision: &Gguf, opts: &ImportOptions) -> Result<Json> {
    let three = |key: &str| -> Result<[f64; 3]> {
        let v = vision.f64s(key)?;
        let v: [f64; 3] = v.as_slice().try_into().map_err(|_| {
            anyhow!(
                "{}: {key} has {} values, not 3",
                vision.path().display(),
                v.len()
            )
        })?;
        Ok(v.map(short))
    };
    let min = opts
        .min_pixels
        .unwrap_or(crate::processor::ImageProcessorConfig::default().min_pixels);
    let max = opts
        .max_pixels
        .unwrap_or(crate::processor::image_processor::QWEN2_VL_MAX_PIXELS);
    if min > max {
        bail!("--min-pixels {min} is above --max-pixels {max}");
    }
    Ok(
        crate::processor::image_processor::qwen2_vl_preprocessor_json(
            three("clip.vision.image_mean")?,
            three("clip.vision.image_std")?,
            (min, max),
            vision.usize("clip.vision.patch_size")?,
            merge_size(vision)?,
        ),
    )
}

fn merge_size(vision: &Gguf) -> Result<usize> {
    // llama.cpp's default for Qwen2-VL and Qwen2.5-VL when the key is absent.
    match vision.get("clip.vision.spatial_merge_size") {
        Some(_) => vision.usize("clip.vision.spatial_merge_size"),
        None => Ok(2),
    }
}

/// (rows, columns) of a 2-D tensor as transformers has it, from its GGUF shape.
fn dims2(g: &Gguf, name: &str) -> Result<(usize, usize)> {
    match g.tensor(name).map(|t| t.shape.as_slice()) {
        Some(&[n, k]) => Ok((n, k)),
        Some(s) => bail!(
            "{}: tensor {name} has shape {s:?}, not a matrix",
            g.path().display()
        ),
        None => bail!("{}: no tensor {name}", g.path().display()),
    }
}

fn config_json(text: &Gguf, vision: &Gguf, arch: Arch, v: &Vocabulary) -> Result<Json> {
    let key = |k: &str| format!("qwen2vl.{k}");
    let sections = text.f64s(&key("rope.dimension_sections"))?;
    if sections.len() < 3 {
        bail!(
            "{}: rope.dimension_sections has {} values",
            text.path().display(),
            sections.len()
        );
    }
    let (vocab, hidden) = dims2(text, "token_embd.weight")?;
    let tied = text.tensor("output.weight").is_none();
    let depth = vision.usize("clip.vision.block_count")?;
    let embed = vision.usize("clip.vision.embedding_length")?;
    // The MLP width and the merger's output from the tensors: the converter writes Qwen2-VL's
    // `feed_forward_length` from a config field that is not the MLP's.
    let (ffn, _) = dims2(vision, "v.blk.0.ffn_up.weight")?;
    let (out_hidden, _) = dims2(vision, "mm.2.weight")?;
    if out_hidden != hidden {
        bail!(
            "{}: its projector writes {out_hidden}-wide vectors but {} is {hidden} wide: the \
             two files are not one model's",
            vision.path().display(),
            text.path().display()
        );
    }
    let heads = vision.usize("clip.vision.attention.head_count")?;
    let patch = vision.usize("clip.vision.patch_size")?;
    let merge = merge_size(vision)?;
    let (model_type, architectures, vision_config) = match arch {
        Arch::Qwen2Vl => (
            "qwen2_vl",
            "Qwen2VLForConditionalGeneration",
            json!({
                "depth": depth, "embed_dim": embed, "hidden_size": out_hidden,
                "mlp_ratio": ffn as f64 / embed as f64, "num_heads": heads,
                "in_channels": 3, "in_chans": 3, "patch_size": patch,
                "spatial_merge_size": merge, "temporal_patch_size": 2,
                "hidden_act": "quick_gelu",
            }),
        ),
        Arch::Qwen25Vl => {
            let n = vision.usize("clip.vision.n_wa_pattern")?;
            if n == 0 {
                bail!("{}: clip.vision.n_wa_pattern is 0", vision.path().display());
            }
            let full: Vec<usize> = (1..)
                .map(|i| i * n - 1)
                .take_while(|&b| b < depth)
                .collect();
            let window = match vision.get("clip.vision.window_size") {
                Some(_) => vision.usize("clip.vision.window_size")?,
                None => DEFAULT_WINDOW,
            };
            (
                "qwen2_5_vl",
                "Qwen2_5_VLForConditionalGeneration",
                json!({
                    "depth": depth, "hidden_size": embed, "intermediate_size": ffn,
                    "out_hidden_size": out_hidden, "num_heads": heads, "in_channels": 3,
                    "patch_size": patch, "spatial_merge_size": merge,
                    "temporal_patch_size": 2, "window_size": window,
                    "fullatt_block_indexes": full, "hidden_act": "silu",
                    "tokens_per_second": QWEN25_TOKENS_PER_SECOND,
                }),
            )
        }
        Arch::Qwen3Vl => unreachable!("check_pair admits Qwen2-VL and Qwen2.5-VL only"),
    };
    let dtype = if text.tensor("token_embd.weight").map(|t| t.dtype) == Some(GgmlType::BF16) {
        "bfloat16"
    } else {
        "float32"
    };
    let eos = text.usize("tokenizer.ggml.eos_token_id")?;
    let bos = match text.get("tokenizer.ggml.bos_token_id") {
        Some(_) => text.usize("tokenizer.ggml.bos_token_id")?,
        None => v.id("<|endoftext|>")? as usize,
    };
    Ok(json!({
        "architectures": [architectures],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": text.usize(&key("feed_forward_length"))?,
        "num_hidden_layers": text.usize(&key("block_count"))?,
        "num_attention_heads": text.usize(&key("attention.head_count"))?,
        "num_key_value_heads": text.usize(&key("attention.head_count_kv"))?,
        "rms_norm_eps": short(text.f64(&key("attention.layer_norm_rms_epsilon"))?),
        "rope_theta": short(text.f64(&key("rope.freq_base"))?),
        "max_position_embeddings": text.usize(&key("context_length"))?,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "rope_scaling": {"type": "mrope", "mrope_section": sections[..3].iter().map(|&s| s as usize).collect::<Vec<_>>()},
        "bos_token_id": bos,
        "eos_token_id": eos,
        "image_token_id": v.id("<|image_pad|>")?,
        "video_token_id": v.id("<|video_pad|>")?,
        "vision_start_token_id": v.id("<|vision_start|>")?,
        "vision_end_token_id": v.id("<|vision_end|>")?,
        "vision_token_id": v.id("<|vision_pad|>")?,
        "torch_dtype": dtype,
        "use_sliding_window": false,
        "vision_config": vision_config,
    }))
}

/// Where a checkpoint tensor's bytes come from. Nothing is read or converted before the
/// file is written, one tensor at a time, so an import holds one tensor in memory (the
/// GGUFs stay mapped), not the model.
enum Bytes<'a> {
    /// A float tensor: the GGUF's little-endian values, already in the checkpoint's order
    /// (the parts are consecutive rows).
    Slices(Vec<&'a [u8]>),
    /// A block-quantized matrix: ggml's blocks (the parts are consecutive rows), rearranged
    /// into medvlm's records as it is written.
    Blocks {
        kind: QuantKind,
        n: usize,
        k: usize,
        parts: Vec<&'a [u8]>,
    },
    /// A block-quantized matrix that is not a linear layer's (an untied embedding table),
    /// dequantized to f32 as it is written.
    Dequantized {
        kind: QuantKind,
        n: usize,
        k: usize,
        parts: Vec<&'a [u8]>,
    },
    /// Made here: the stacked patch embedding.
    Owned(Vec<u8>),
}

struct Entry<'a> {
    /// safetensors' name of the stored dtype.
    dtype: &'static str,
    /// The stored shape (a quantized weight's bytes are 1-D).
    stored: Vec<usize>,
    len: usize,
    bytes: Bytes<'a>,
}

/// The checkpoint's tensors, planned.
#[derive(Default)]
struct Weights<'a> {
    entries: BTreeMap<String, Entry<'a>>,
    /// Quantized tensors (by checkpoint name) and their formats.
    manifest: BTreeMap<String, QuantKind>,
    /// Where each checkpoint tensor came from (file, GGUF names), for messages.
    source: HashMap<String, String>,
    /// Each tensor's shape as transformers has it.
    shapes: HashMap<String, Vec<usize>>,
    types: BTreeMap<String, usize>,
}

/// The medvlm format of a ggml block type medvlm computes with.
fn quant_kind(t: GgmlType) -> Option<QuantKind> {
    Some(match t {
        GgmlType::Q8_0 => QuantKind::Q8_0,
        GgmlType::Q4_1 => QuantKind::Q4_1,
        GgmlType::Q4_K => QuantKind::Q4K,
        GgmlType::Q6_K => QuantKind::Q6K,
        _ => return None,
    })
}

/// safetensors' name of a float type (`None` for block types).
fn float_dtype(t: GgmlType) -> Option<&'static str> {
    match t {
        GgmlType::F32 => Some("F32"),
        GgmlType::F16 => Some("F16"),
        GgmlType::BF16 => Some("BF16"),
        _ => None,
    }
}

fn unsupported(g: &Gguf, name: &str, t: GgmlType) -> anyhow::Error {
    anyhow!(
        "{}: tensor {name} is {}; medvlm reads F32, F16, BF16, Q8_0, Q4_1, Q4_K and Q6_K \
         (a Q8_0 or Q4_K_M file of the model, or `medvlm quantize` on its Hugging Face \
         checkpoint, gives one it reads)",
        g.path().display(),
        t.name()
    )
}

fn blocks_to_weight(kind: QuantKind, n: usize, k: usize, parts: &[&[u8]]) -> Result<QWeight> {
    // One part (every tensor but the vision qkv) is converted where it is mapped.
    let joined;
    let bytes = match parts {
        [one] => *one,
        _ => {
            joined = parts.concat();
            &joined
        }
    };
    QWeight::from_ggml(kind, n, k, bytes)
        .ok_or_else(|| anyhow!("{} blocks of the wrong length for ({n}, {k})", kind.name()))
}

impl<'a> Weights<'a> {
    fn add(
        &mut self,
        g: &Gguf,
        gguf_names: &[&str],
        name: String,
        shape: Vec<usize>,
        entry: Entry<'a>,
    ) -> Result<()> {
        let from = format!("{} ({})", g.path().display(), gguf_names.join(", "));
        if let Some(earlier) = self.source.insert(name.clone(), from.clone()) {
            bail!("{from} and {earlier} both give {name}");
        }
        if let Bytes::Blocks { kind, .. } = entry.bytes {
            self.manifest.insert(name.clone(), kind);
        }
        self.shapes.insert(name.clone(), shape);
        self.entries.insert(name, entry);
        Ok(())
    }

    fn count(&mut self, t: GgmlType, n: usize) {
        *self.types.entry(t.name()).or_default() += n;
    }

    /// One GGUF tensor (or several joined along the rows) under its checkpoint `name`:
    /// block types kept as medvlm's weights of the same bits, float types as they are.
    fn convert(&mut self, g: &'a Gguf, parts: &[&str], name: String) -> Result<()> {
        let infos = parts
            .iter()
            .map(|p| {
                g.tensor(p).ok_or_else(|| {
                    anyhow!("{}: no tensor {p} (needed for {name})", g.path().display())
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ty = infos[0].dtype;
        if let Some(other) = infos.iter().find(|i| i.dtype != ty) {
            bail!(
                "{}: {} are stored in different types ({} and {}); medvlm joins them into \
                 {name} only when they agree",
                g.path().display(),
                parts.join(", "),
                ty.name(),
                other.dtype.name()
            );
        }
        let tail: Vec<usize> = infos[0].shape[1..].to_vec();
        if infos.iter().any(|i| i.shape[1..] != tail[..]) {
            bail!(
                "{}: {} do not have the same columns",
                g.path().display(),
                parts.join(", ")
            );
        }
        let rows: usize = infos.iter().map(|i| i.shape[0]).sum();
        let mut shape = vec![rows];
        shape.extend(&tail);
        self.count(ty, parts.len());
        // ggml rows are contiguous, so joining rows is joining bytes, blocks or values.
        let data = parts
            .iter()
            .map(|p| g.data(p))
            .collect::<Result<Vec<_>>>()?;
        let entry = if let Some(kind) = quant_kind(ty) {
            let [n, k] = shape[..] else {
                bail!(
                    "{}: tensor {} is {} but has shape {shape:?}",
                    g.path().display(),
                    parts[0],
                    ty.name()
                );
            };
            // The reader checked each part's length against its shape and type.
            let len = QWeight::stored_len(kind, n, k);
            Entry {
                dtype: "U8",
                stored: vec![len],
                len,
                bytes: Bytes::Blocks {
                    kind,
                    n,
                    k,
                    parts: data,
                },
            }
        } else {
            let dtype = float_dtype(ty).ok_or_else(|| unsupported(g, parts[0], ty))?;
            Entry {
                dtype,
                stored: shape.clone(),
                len: data.iter().map(|d| d.len()).sum(),
                bytes: Bytes::Slices(data),
            }
        };
        self.add(g, parts, name, shape, entry)
    }

    /// The linear layers' format: the most common among the quantized tensors.
    fn main_format(&self) -> QuantKind {
        let mut counts: BTreeMap<&str, (usize, QuantKind)> = BTreeMap::new();
        for k in self.manifest.values() {
            counts.entry(k.name()).or_insert((0, *k)).0 += 1;
        }
        counts
            .values()
            .max_by_key(|(n, _)| *n)
            .map(|(_, k)| *k)
            .unwrap_or(QuantKind::Q8_0)
    }

    /// Every tensor a model of `config` asks for is here with its shape, nothing else is; a
    /// quantized tensor that is not a linear layer's matrix (an untied embedding table) is
    /// dequantized, exactly, to f32.
    fn check(&mut self, config: &Qwen2VlConfig, text: &Gguf, vision: &Gguf) -> Result<()> {
        let (mut model, shapes) = crate::model::random::shape_only(config)?;
        let mut linear: HashSet<String> = model
            .linears_mut()
            .into_iter()
            .map(|(path, _)| format!("{}.weight", WeightLayout::Legacy.local_name(&path)))
            .collect();
        linear.insert(if config.text.tie_word_embeddings {
            format!("{}.embed_tokens.weight", WeightLayout::Legacy.text_prefix())
        } else {
            "lm_head.weight".into()
        });
        let files = format!("{} + {}", text.path().display(), vision.path().display());
        let mut wanted = HashSet::new();
        for (name, shape) in &shapes {
            wanted.insert(name.clone());
            let have = self.shapes.get(name).ok_or_else(|| {
                anyhow!("{files}: no tensor gives {name}, which a model of this config needs")
            })?;
            if have != shape {
                bail!(
                    "{}: gives {name} of shape {have:?}; the config asks for {shape:?}",
                    self.source[name]
                );
            }
        }
        if let Some(extra) = self.entries.keys().find(|n| !wanted.contains(*n)) {
            bail!(
                "{}: {extra} is not part of a {} model",
                self.source[extra],
                config.arch.name()
            );
        }
        let tables: Vec<String> = self
            .manifest
            .keys()
            .filter(|n| !linear.contains(*n))
            .cloned()
            .collect();
        for name in tables {
            self.manifest.remove(&name);
            let e = self.entries.get_mut(&name).expect("checked above");
            let Bytes::Blocks { kind, n, k, parts } =
                std::mem::replace(&mut e.bytes, Bytes::Owned(vec![]))
            else {
                unreachable!("the manifest names block tensors")
            };
            *e = Entry {
                dtype: "F32",
                stored: vec![n, k],
                len: n * k * 4,
                bytes: Bytes::Dequantized { kind, n, k, parts },
            };
        }
        Ok(())
    }

    /// Writes the safetensors file tensor by tensor (header, then each tensor's bytes in
    /// order), converting block tensors as they are reached.
    fn write(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, e) in &self.entries {
            header.insert(
                name.clone(),
                json!({"dtype": e.dtype, "shape": e.stored, "data_offsets": [offset, offset + e.len]}),
            );
            offset += e.len;
        }
        let mut head = serde_json::to_vec(&Json::Object(header))?;
        // The data starts 8-byte aligned, as safetensors' own writer leaves it.
        while (8 + head.len()) % 8 != 0 {
            head.push(b' ');
        }
        let bar = indicatif::ProgressBar::new(offset as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "import [{bar:30}] {bytes}/{total_bytes}  eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let io = |e| crate::files::io_error(path, "cannot write", e);
        let file = std::fs::File::create(path).map_err(io)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(head.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&head).map_err(io)?;
        for (name, e) in &self.entries {
            match &e.bytes {
                Bytes::Slices(parts) => {
                    for p in parts {
                        out.write_all(p).map_err(io)?;
                    }
                }
                Bytes::Blocks { kind, n, k, parts } => {
                    let w = blocks_to_weight(*kind, *n, *k, parts)
                        .with_context(|| self.source[name].clone())?;
                    out.write_all(w.bytes()).map_err(io)?;
                }
                Bytes::Dequantized { kind, n, k, parts } => {
                    let w = blocks_to_weight(*kind, *n, *k, parts)
                        .with_context(|| self.source[name].clone())?;
                    let values: Vec<u8> = w
                        .dequantize()
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect();
                    out.write_all(&values).map_err(io)?;
                }
                Bytes::Owned(v) => out.write_all(v).map_err(io)?,
            }
            bar.inc(e.len as u64);
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        bar.finish_and_clear();
        crate::files::set_default_mode(path)
    }
}

/// The text model's tensors under the released checkpoint names (`model.*`, `lm_head`).
fn convert_text<'a>(g: &'a Gguf, w: &mut Weights<'a>) -> Result<()> {
    let p = WeightLayout::Legacy.text_prefix();
    for name in g.tensor_names().map(String::from).collect::<Vec<_>>() {
        let hf = match name.as_str() {
            "token_embd.weight" => format!("{p}.embed_tokens.weight"),
            "output_norm.weight" => format!("{p}.norm.weight"),
            "output.weight" => "lm_head.weight".into(),
            n => {
                let Some((i, module, suffix)) = block_name(n, "blk.") else {
                    bail!(
                        "{}: tensor {n} is not part of a Qwen2-VL text model",
                        g.path().display()
                    );
                };
                let m = match module {
                    "attn_norm" => "input_layernorm",
                    "ffn_norm" => "post_attention_layernorm",
                    "attn_q" => "self_attn.q_proj",
                    "attn_k" => "self_attn.k_proj",
                    "attn_v" => "self_attn.v_proj",
                    "attn_output" => "self_attn.o_proj",
                    "ffn_gate" => "mlp.gate_proj",
                    "ffn_up" => "mlp.up_proj",
                    "ffn_down" => "mlp.down_proj",
                    _ => bail!(
                        "{}: tensor {n} is not part of a Qwen2-VL text model",
                        g.path().display()
                    ),
                };
                format!("{p}.layers.{i}.{m}.{suffix}")
            }
        };
        w.convert(g, &[&name], hf)?;
    }
    Ok(())
}

/// `PREFIX<i>.<module>.<suffix>` -> (i, module, suffix).
fn block_name<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (i, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.split_once('.')?;
    Some((i.parse().ok()?, module, suffix))
}

/// The vision tower's tensors under the released names (`visual.*`): q, k and v joined into
/// qkv, the two frames' patch kernels stacked into the Conv3d.
fn convert_vision<'a>(g: &'a Gguf, arch: Arch, w: &mut Weights<'a>) -> Result<()> {
    let v = WeightLayout::Legacy.vision_prefix();
    let mut done: HashSet<String> = HashSet::new();
    let names: Vec<String> = g.tensor_names().map(String::from).collect();
    for name in &names {
        if done.contains(name) {
            continue;
        }
        let not_ours = || {
            anyhow!(
                "{}: tensor {name} is not part of a {} vision tower",
                g.path().display(),
                arch.name()
            )
        };
        match name.as_str() {
            "v.patch_embd.weight" | "v.patch_embd.weight.1" => {
                patch_embed(g, w, &format!("{v}.patch_embed.proj.weight"))?;
                done.extend(["v.patch_embd.weight".into(), "v.patch_embd.weight.1".into()]);
            }
            "v.post_ln.weight" | "v.post_ln.bias" => {
                let s = name.rsplit('.').next().unwrap();
                w.convert(g, &[name], format!("{v}.merger.ln_q.{s}"))?;
            }
            "mm.0.weight" | "mm.0.bias" | "mm.2.weight" | "mm.2.bias" => {
                w.convert(g, &[name], format!("{v}.merger.mlp.{}", &name[3..]))?;
            }
            n => {
                let (i, module, suffix) = block_name(n, "v.blk.").ok_or_else(not_ours)?;
                let block = format!("{v}.blocks.{i}");
                if matches!(module, "attn_q" | "attn_k" | "attn_v") {
                    let parts: Vec<String> = ["attn_q", "attn_k", "attn_v"]
                        .iter()
                        .map(|m| format!("v.blk.{i}.{m}.{suffix}"))
                        .collect();
                    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                    w.convert(g, &refs, format!("{block}.attn.qkv.{suffix}"))?;
                    done.extend(parts);
                    continue;
                }
                let m = match (module, arch) {
                    ("ln1", _) => "norm1",
                    ("ln2", _) => "norm2",
                    ("attn_out", _) => "attn.proj",
                    ("ffn_up", Arch::Qwen2Vl) => "mlp.fc1",
                    ("ffn_down", Arch::Qwen2Vl) => "mlp.fc2",
                    ("ffn_gate", Arch::Qwen25Vl) => "mlp.gate_proj",
                    ("ffn_up", Arch::Qwen25Vl) => "mlp.up_proj",
                    ("ffn_down", Arch::Qwen25Vl) => "mlp.down_proj",
                    _ => return Err(not_ours()),
                };
                w.convert(g, &[n], format!("{block}.{m}.{suffix}"))?;
            }
        }
    }
    Ok(())
}

/// The Conv3d patch embedding (out, channels, 2, h, w) from the converter's two per-frame
/// kernels (out, channels, h, w): each (out, channel)'s two h x w kernels side by side.
fn patch_embed<'a>(g: &'a Gguf, w: &mut Weights<'a>, name: &str) -> Result<()> {
    let parts = ["v.patch_embd.weight", "v.patch_embd.weight.1"];
    let mut frames = Vec::new();
    for p in parts {
        let info = g.tensor(p).ok_or_else(|| {
            anyhow!(
                "{}: no tensor {p}; Qwen2-VL's patch embedding spans two frames, which \
                 llama.cpp's converter writes as v.patch_embd.weight and v.patch_embd.weight.1",
                g.path().display()
            )
        })?;
        if info.shape.len() != 4 {
            bail!(
                "{}: tensor {p} has shape {:?}, not a 2-D convolution kernel",
                g.path().display(),
                info.shape
            );
        }
        let dtype = float_dtype(info.dtype).ok_or_else(|| unsupported(g, p, info.dtype))?;
        frames.push((info.shape.clone(), info.dtype, dtype, g.data(p)?));
        w.count(info.dtype, 1);
    }
    let ((s0, t0, dtype, f0), (s1, t1, _, f1)) = (&frames[0], &frames[1]);
    if s0 != s1 || t0 != t1 {
        bail!(
            "{}: the two frames' patch kernels differ in shape or type",
            g.path().display()
        );
    }
    let [o, c, h, wd] = s0[..] else {
        unreachable!("4-D, checked above")
    };
    let kernel = f0.len() / (o * c);
    let mut bytes = Vec::with_capacity(2 * f0.len());
    for i in 0..o * c {
        bytes.extend_from_slice(&f0[i * kernel..(i + 1) * kernel]);
        bytes.extend_from_slice(&f1[i * kernel..(i + 1) * kernel]);
    }
    let shape = vec![o, c, 2, h, wd];
    let entry = Entry {
        dtype,
        stored: shape.clone(),
        len: bytes.len(),
        bytes: Bytes::Owned(bytes),
    };
    w.add(g, &parts, name.to_string(), shape, entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GGUF's f32 keys come back as the decimals the config said.
    #[test]
    fn f32_keys_read_back_as_written() {
        assert_eq!(short(1e-6f32 as f64), 1e-6);
        assert_eq!(short(0.48145466f32 as f64), 0.48145467);
        assert_eq!(short(1e6), 1e6);
        assert_eq!(short(0.001f32 as f64), 0.001);
    }

    #[test]
    fn block_names_split_into_index_module_suffix() {
        assert_eq!(
            block_name("v.blk.12.attn_q.bias", "v.blk."),
            Some((12, "attn_q", "bias"))
        );
        assert_eq!(block_name("blk.x.attn_q.weight", "blk."), None);
        assert_eq!(block_name("blk.3", "blk."), None);
    }
}
