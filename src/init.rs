//! `medvlm init`: a small random Qwen2-VL checkpoint in Hugging Face layout, with a
//! byte-level BPE tokenizer trained on the synthetic corpus and every Qwen2-VL special
//! token, Qwen2-VL-2B-Instruct's chat template, and a preprocessor for 112x112 images. The
//! whole pipeline (synth data, SFT, GRPO, eval, ask) then runs offline.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::data::PromptTemplate;
use crate::model::config::Arch;
use crate::model::{Preset, Qwen2VlConfig};
use crate::train::{checkpoint, TrainableModel};

/// Qwen2's special tokens, in Qwen2-VL's order.
pub const SPECIAL_TOKENS: [&str; 14] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

use crate::processor::tokenizer::QWEN2_SPLIT;

/// Size of the model `init` writes.
#[derive(Debug, Clone)]
pub struct InitSpec {
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate_size: usize,
    pub vision_depth: usize,
    pub vision_dim: usize,
    pub vision_heads: usize,
    /// Target tokenizer vocabulary (bytes + merges), before special tokens.
    pub vocab: usize,
    pub max_pixels: usize,
    pub seed: u64,
    /// Standard deviation of the random weights.
    pub init_std: f64,
}

impl Default for InitSpec {
    fn default() -> Self {
        Self {
            hidden_size: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate_size: 128,
            vision_depth: 2,
            vision_dim: 32,
            vision_heads: 2,
            vocab: 640,
            max_pixels: 112 * 112,
            seed: 0,
            init_std: 0.02,
        }
    }
}

/// Text the tokenizer is trained on: the question templates, the synthetic questions and
/// answers, the reasoning shape, the chat template's words.
fn corpus() -> Vec<String> {
    let mut v = vec![
        "You are a helpful assistant.".to_string(),
        "system user assistant".to_string(),
        "<think>This is a MRI image. I compare the regions that differ from the surrounding tissue.</think><answer>A</answer>".to_string(),
        "<think>This is a CT image.</think><answer>B</answer> <think>This is a X-Ray image.</think><answer>C</answer>".to_string(),
        "<answer>D</answer> <answer>E</answer> A) B) C) D) E) F) G) H) I) J)".to_string(),
        "Is there a lesion in this image? On which side of the image is the lesion? How many lesions are visible? What imaging modality is used to take this image?".to_string(),
        "yes no left right 1 2 3 MRI CT X-Ray Ultrasound lesion scan brain liver kidney lung chest abdomen".to_string(),
        "0123456789 .,;:!?()[]{}<>/-+*=\"' \n".to_string(),
    ];
    for t in [PromptTemplate::Paper, PromptTemplate::Simple] {
        v.push(t.render("Which side is brighter?\nA) left\nB) right"));
    }
    v
}

/// Trains the byte-level BPE tokenizer with Qwen2's pre-tokenizer and special tokens.
pub fn train_tokenizer(vocab: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_normalizer(Some(NFC));
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow!("tokenizer pre-tokenizer: {e}"))?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tok.with_decoder(Some(ByteLevel::new(false, false, false)));
    let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(1)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build()
        .into();
    let text = corpus();
    tok.train(&mut trainer, text.iter())
        .map_err(|e| anyhow!("tokenizer training failed: {e}"))?;
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
}

fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("{}: cannot write", p.display()))
}

/// tokenizer.json, tokenizer_config.json (with the family's chat template: Qwen2-VL-2B-
/// Instruct's, or Qwen3-VL's), preprocessor_config.json (the family's image settings) and
/// generation_config.json (`generation` replaces the greedy default).
fn write_side_files(
    dir: &Path,
    tok: &Tokenizer,
    arch: Arch,
    min_pixels: usize,
    max_pixels: usize,
    generation: Option<serde_json::Value>,
) -> Result<()> {
    tok.save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow!("cannot write tokenizer.json: {e}"))?;
    let id = |t: &str| tok.token_to_id(t).context("special token missing");
    let template = match arch {
        Arch::Qwen2Vl | Arch::Qwen25Vl => crate::model::presets::QWEN2_VL_CHAT_TEMPLATE,
        Arch::Qwen3Vl => crate::model::presets::QWEN3_VL_CHAT_TEMPLATE,
    };
    write_json(
        dir,
        "tokenizer_config.json",
        &json!({
            "tokenizer_class": "Qwen2Tokenizer",
            "chat_template": template,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": null,
            "bos_token": null,
            "model_max_length": 32768,
            "padding_side": "left",
            "errors": "replace",
            "add_prefix_space": false,
            "clean_up_tokenization_spaces": false,
        }),
    )?;
    let preprocessor = match arch {
        Arch::Qwen2Vl | Arch::Qwen25Vl => {
            use crate::processor::image_processor::{CLIP_MEAN, CLIP_STD};
            crate::processor::image_processor::qwen2_vl_preprocessor_json(
                CLIP_MEAN,
                CLIP_STD,
                (min_pixels, max_pixels),
                14,
                2,
            )
        }
        // Qwen3-VL's released preprocessor_config.json (notes/28-research.md §4.2): the
        // torchvision processor, 16-pixel patches, mean and std 0.5.
        Arch::Qwen3Vl => json!({
            "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "Qwen3VLProcessor",
            "image_processor_type": "Qwen2VLImageProcessorFast",
        }),
    };
    write_json(dir, "preprocessor_config.json", &preprocessor)?;
    let generation = match generation {
        Some(g) => g,
        None => json!({
            "bos_token_id": id("<|endoftext|>")?,
            "pad_token_id": id("<|endoftext|>")?,
            "eos_token_id": [id("<|im_end|>")?, id("<|endoftext|>")?],
            "do_sample": false,
        }),
    };
    write_json(dir, "generation_config.json", &generation)
}

/// Widest and deepest decoder `init` writes: Qwen2-VL-72B is 8192 wide and 80 layers deep,
/// and a tiny test model needs neither; beyond them `init` would build for minutes.
pub const MAX_HIDDEN_SIZE: usize = 16384;
pub const MAX_LAYERS: usize = 256;

impl InitSpec {
    /// The sizes' ranges, named by their flags (`--hidden-size`, `--layers`), before any
    /// work.
    pub fn validate(&self) -> Result<()> {
        let unit = 2 * self.heads;
        let min = 8 * self.heads;
        if self.hidden_size < min
            || self.hidden_size > MAX_HIDDEN_SIZE
            || !self.hidden_size.is_multiple_of(unit)
        {
            bail!(
                "--hidden-size must be a multiple of {unit} from {min} to {MAX_HIDDEN_SIZE} ({} \
                 attention heads, each of an even width of at least 8), got {}",
                self.heads,
                self.hidden_size
            );
        }
        if self.layers == 0 || self.layers > MAX_LAYERS {
            bail!(
                "--layers must be from 1 to {MAX_LAYERS} (Qwen2-VL-72B has 80), got {}",
                self.layers
            );
        }
        Ok(())
    }
}

/// Refuses a model whose weights (`bytes_per_param` each) do not fit on the disk holding
/// `out`, or whose build (`peak_per_param` bytes of memory each) not in the memory available.
fn check_fits(
    config: &Qwen2VlConfig,
    out: &Path,
    bytes_per_param: u128,
    peak_per_param: u128,
) -> Result<()> {
    let params = crate::model::num_parameters(config)? as u128;
    let (bytes, peak) = (params * bytes_per_param, params * peak_per_param);
    let sizes = format!(
        "a {}-wide, {}-layer decoder has {params} parameters",
        config.text.hidden_size, config.text.num_hidden_layers
    );
    let (what, available) = crate::device::available_memory(&Device::Cpu);
    if let Some(a) = available {
        if peak > a as u128 {
            bail!(
                "{sizes}: building it takes about {} of memory but {what} is {}; choose a \
                 smaller --hidden-size or fewer --layers",
                checkpoint::human_bytes(peak),
                checkpoint::human_bytes(a as u128)
            );
        }
    }
    if let Some(free) = checkpoint::free_disk_bytes(out) {
        if bytes > free {
            bail!(
                "{sizes}: its weights take {} but the disk holding {} has {} free",
                checkpoint::human_bytes(bytes),
                out.display(),
                checkpoint::human_bytes(free)
            );
        }
    }
    Ok(())
}

/// Writes a fresh checkpoint directory at `out` (which must not exist). Staged beside it and
/// renamed into place when complete: a failure leaves nothing behind.
pub fn write(out: &Path, spec: &InitSpec) -> Result<PathBuf> {
    if out.exists() {
        bail!(
            "--out {}: already exists; choose a new directory",
            out.display()
        );
    }
    spec.validate()?;
    let staging = crate::files::Staging::beside(out, "init")?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = out
        .file_name()
        .context("the output needs a directory name")?
        .to_string_lossy()
        .to_string();
    let tok = train_tokenizer(spec.vocab)?;
    let id = |t: &str| tok.token_to_id(t).context("special token missing");
    let n_tokens = tok.get_vocab_size(true);
    let vocab_size = n_tokens.div_ceil(64) * 64;
    let head_dim = spec.hidden_size / spec.heads;
    let half = head_dim / 2;
    // M-RoPE sections in Qwen2-VL's proportions (16:24:24 of 64).
    let t = half / 4;
    let h = (half - t) / 2;
    let mrope = [t, h, half - t - h];
    let config = json!({
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": true,
        "use_sliding_window": false,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "bos_token_id": id("<|endoftext|>")?,
        "eos_token_id": id("<|im_end|>")?,
        "vision_start_token_id": id("<|vision_start|>")?,
        "vision_end_token_id": id("<|vision_end|>")?,
        "vision_token_id": id("<|vision_pad|>")?,
        "image_token_id": id("<|image_pad|>")?,
        "video_token_id": id("<|video_pad|>")?,
        "torch_dtype": "float32",
        "vision_config": {
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_dim,
            "num_heads": spec.vision_heads,
            "mlp_ratio": 2,
            "hidden_size": spec.hidden_size,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "hidden_act": "quick_gelu",
        },
    });
    write_json(staging.path(), "config.json", &config)?;
    write_side_files(
        staging.path(),
        &tok,
        Arch::Qwen2Vl,
        56 * 56,
        spec.max_pixels,
        None,
    )?;
    let cfg = Qwen2VlConfig::from_file(&staging.path().join("config.json"))?;
    // f32 weights, held once plus a tensor's copy while it is written.
    check_fits(&cfg, out, 4, 8)?;
    let model =
        TrainableModel::random(cfg, spec.init_std, spec.seed, staging.path(), &Device::Cpu)?;
    // The checkpoint writer copies the staged side files and renames its own temporary
    // directory into place; the staging directory goes when `staging` is dropped.
    checkpoint::save(parent, &name, &model, DType::F32, None)
}

/// Where Qwen2's special tokens sit in its vocabulary: `<|endoftext|>` and the 13 after it.
const QWEN2_SPECIAL_BASE: u32 = 151_643;

/// The synthetic-corpus tokenizer with Qwen2's special tokens at Qwen2's ids, so the real
/// config.json's token ids hold. Added tokens take the ids after the BPE vocabulary, so the
/// vocabulary is padded to Qwen2's 151,643 entries with placeholders no merge produces.
fn tokenizer_with_qwen2_ids(vocab: usize) -> Result<Tokenizer> {
    let tok = train_tokenizer(vocab)?;
    let mut v: serde_json::Value = serde_json::from_str(
        &tok.to_string(false)
            .map_err(|e| anyhow!("tokenizer: {e}"))?,
    )?;
    let bpe = v["model"]["vocab"]
        .as_object_mut()
        .context("tokenizer JSON has no BPE vocabulary")?;
    let mut next = bpe.len() as u32;
    while next < QWEN2_SPECIAL_BASE {
        bpe.insert(format!("<|unused_{next}|>"), json!(next));
        next += 1;
    }
    for t in v["added_tokens"]
        .as_array_mut()
        .context("tokenizer JSON has no added_tokens")?
    {
        let content = t["content"].as_str().unwrap_or_default().to_string();
        if let Some(i) = SPECIAL_TOKENS.iter().position(|s| *s == content) {
            t["id"] = json!(QWEN2_SPECIAL_BASE + i as u32);
        }
    }
    let out: Tokenizer = v
        .to_string()
        .parse()
        .map_err(|e| anyhow!("tokenizer with Qwen2 ids: {e}"))?;
    for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
        if out.token_to_id(t) != Some(QWEN2_SPECIAL_BASE + i as u32) {
            bail!("internal error: {t} did not land on Qwen2's id");
        }
    }
    Ok(out)
}

/// N(0, std) values (unit norm scales, zero biases) for one tensor, as bf16, from a seed that
/// depends on the tensor's name only: each tensor is the same whatever else the model holds.
fn random_bf16(name: &str, shape: &[usize], std: f32, seed: u64) -> Vec<half::bf16> {
    use rayon::prelude::*;
    let n: usize = shape.iter().product();
    if name.ends_with("bias") {
        return vec![half::bf16::ZERO; n];
    }
    if shape.len() == 1 {
        return vec![half::bf16::ONE; n];
    }
    let key = crate::seed::mix(seed, crate::seed::of_name(name));
    const CHUNK: usize = 1 << 16;
    let mut out = vec![half::bf16::ZERO; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = StdRng::seed_from_u64(crate::seed::mix(key, c as u64));
            for pair in chunk.chunks_mut(2) {
                // Box-Muller: two uniforms, two normals.
                let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
                let u2: f32 = rng.random();
                let r = (-2.0 * u1.ln()).sqrt() * std;
                let (s, co) = (std::f32::consts::TAU * u2).sin_cos();
                pair[0] = half::bf16::from_f32(r * co);
                if let Some(x) = pair.get_mut(1) {
                    *x = half::bf16::from_f32(r * s);
                }
            }
        });
    out
}

/// Writes a checkpoint with `preset`'s architecture and random weights (N(0, 0.02), norms 1,
/// biases 0) in bf16, sharded in two files with model.safetensors.index.json as released
/// (named as the family's releases name them), the synthetic-corpus tokenizer with Qwen2's
/// special-token ids, and the family's chat template, processor and generation settings.
/// `out` must not exist.
pub fn write_preset(out: &Path, preset: Preset, seed: u64) -> Result<PathBuf> {
    if out.exists() {
        bail!(
            "--out {}: already exists; choose a new directory",
            out.display()
        );
    }
    let mut v: serde_json::Value = serde_json::from_str(preset.config_json())?;
    v["torch_dtype"] = json!("bfloat16");
    let config_text = serde_json::to_string_pretty(&v)?;
    let config = Qwen2VlConfig::from_json_str(&config_text, "preset config.json")?;
    // bf16 weights, built a shard at a time.
    check_fits(&config, out, 2, 2)?;
    let stage = crate::files::Staging::beside(out, "init")?;
    let staging = stage.path();
    std::fs::write(staging.join("config.json"), &config_text)
        .map_err(|e| crate::files::io_error(&staging.join("config.json"), "cannot write", e))?;
    let tok = tokenizer_with_qwen2_ids(640)?;
    let (min_pixels, max_pixels, generation) = match config.arch {
        // Qwen2-VL-2B-Instruct's generation_config.json.
        Arch::Qwen2Vl | Arch::Qwen25Vl => (
            crate::processor::ImageProcessorConfig::default().min_pixels,
            crate::processor::image_processor::QWEN2_VL_MAX_PIXELS,
            json!({
                "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": true,
                "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,
                "temperature": 0.1, "top_k": 1, "top_p": 0.001,
            }),
        ),
        // Qwen3-VL's pixel bounds; of its generation_config.json only the token ids are
        // known (notes/28-research.md §1.5), so decoding stays greedy unless asked.
        Arch::Qwen3Vl => (
            65_536,
            16_777_216,
            json!({
                "bos_token_id": 151643, "pad_token_id": 151643,
                "eos_token_id": [151645, 151643], "do_sample": false,
            }),
        ),
    };
    write_side_files(
        staging,
        &tok,
        config.arch,
        min_pixels,
        max_pixels,
        Some(generation),
    )?;

    // Two shards, as the 2B was released: the first ends where half the bytes are written.
    let shapes = crate::model::random::tensor_shapes(&config)?;
    let total: usize = shapes
        .iter()
        .map(|(_, s)| 2 * s.iter().product::<usize>())
        .sum();
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![vec![], vec![]];
    let mut written = 0usize;
    for (n, s) in shapes {
        let i = usize::from(written >= total / 2);
        written += 2 * s.iter().product::<usize>();
        shards[i].push((n, s));
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        let mut tensors = std::collections::HashMap::new();
        for (n, s) in shard {
            let data = random_bf16(&n, &s, 0.02, seed);
            tensors.insert(
                n.clone(),
                candle_core::Tensor::from_vec(data, s.as_slice(), &Device::Cpu)?,
            );
            weight_map.insert(n, json!(file));
        }
        let p = staging.join(&file);
        crate::files::save_safetensors(&tensors, &p)?;
    }
    write_json(
        staging,
        "model.safetensors.index.json",
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )?;
    // The directory loads as a checkpoint before it is put in place.
    crate::model::CheckpointWeights::open(staging)?.layout(&config)?;
    stage.commit(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_round_trips_the_answer_format() {
        let tok = train_tokenizer(400).unwrap();
        let text = "<think>This is a CT image.</think><answer>B</answer><|im_end|>";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        assert_eq!(
            *enc.get_ids().last().unwrap(),
            im_end,
            "special tokens stay whole"
        );
        // Unseen text still encodes: the byte alphabet covers everything.
        let e = tok.encode("Größe 42 µm", false).unwrap();
        assert_eq!(tok.decode(e.get_ids(), false).unwrap(), "Größe 42 µm");
    }
}
