//! `medvlm bench generate`: the rollout workload on a ~120M-parameter random Qwen2-VL
//! (src/model/presets/qwen2-vl-bench.json: Qwen2-VL's architecture and 151,936-token vocabulary, scaled
//! down) with one 448x448 image. tools/bench_transformers.py runs the same workload with
//! transformers so the two can be compared side by side.

pub mod train;

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde::Serialize;

use crate::generate::{Engine, Request, SamplingParams};
use crate::model::random::random_var_builder;
use crate::model::{Preset, Qwen2Vl, Qwen2VlConfig};
use crate::processor::{ImageProcessor, ImageProcessorConfig, PixelPatches, Prompt};

/// Text tokens before and after the image in the benchmark prompt (the chat template's
/// system turn and a MedVLM-R1-length question are about this long).
pub const TEXT_BEFORE: usize = 20;
pub const TEXT_AFTER: usize = 80;

/// The model shape a benchmark runs (random weights).
#[derive(Debug, Clone, Serialize)]
pub struct Shape {
    /// A Qwen2-VL / Qwen2.5-VL config.json (reports name it, not repeat it).
    #[serde(skip)]
    pub config_json: String,
    /// Where it came from, for the report.
    pub name: String,
}

impl Shape {
    /// A released architecture; the default is [`Preset::Qwen2VlBench`].
    pub fn preset(p: Preset) -> Self {
        Self {
            config_json: p.config_json().to_string(),
            name: p.label().into(),
        }
    }

    /// The default: the benchmark shape.
    pub fn bench() -> Self {
        Self::preset(Preset::Qwen2VlBench)
    }

    /// Its parsed config.
    pub fn config(&self) -> Result<Qwen2VlConfig> {
        Qwen2VlConfig::from_json_str(&self.config_json, &self.name)
    }

    /// A config.json file, or a checkpoint directory's.
    pub fn from_path(path: &std::path::Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let config_json = std::fs::read_to_string(&file)
            .with_context(|| format!("{}: cannot read the config", file.display()))?;
        Ok(Self {
            config_json,
            name: file.display().to_string(),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The config the random model was built from, or the checkpoint directory.
    pub shape: String,
    /// Random weights (else the checkpoint's).
    pub random: bool,
    pub parameters: usize,
    pub threads: usize,
    /// The model's dtype as asked for (on the CPU, bf16 weights compute in f32).
    pub dtype: String,
    /// The weight quantization, if any (`q8_0`, `q4_1`).
    pub quantize: Option<String>,
    pub prompt_tokens: usize,
    pub image_tokens: usize,
    pub new_tokens: usize,
    pub preprocess_ms: f64,
    /// The vision tower alone on the image.
    pub vision_ms: f64,
    /// Vision tower and prompt prefill (the first token's latency).
    pub prefill_ms: f64,
    pub decode_tok_s_batch1: f64,
    pub group_size: usize,
    pub group_total_s: f64,
    pub group_decode_tok_s: f64,
    pub peak_rss_mib: f64,
}

/// Peak resident memory of this process (VmHWM), in MiB; 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Starts a new peak for [`peak_rss_mib`] at the current resident size (Linux'
/// `/proc/self/clear_refs`); returns false where that is unavailable.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A deterministic 448x448 test card with structure at several scales.
fn test_image() -> image::RgbImage {
    test_card(448)
}

/// The test card at `size` x `size` (tools/llamacpp_side_by_side.py draws the same one).
pub(crate) fn test_card(size: u32) -> image::RgbImage {
    image::RgbImage::from_fn(size, size, |x, y| {
        let r = ((x * 7 + y * 3) % 256) as u8;
        let g = (((x as f32 / 9.0).sin() * 120.0 + 128.0) as u8).wrapping_add((y % 17) as u8);
        let b = ((x ^ y) % 256) as u8;
        image::Rgb([r, g, b])
    })
}

/// Text ids that are ordinary tokens of `config`'s vocabulary (no special ids), varied so
/// nothing is degenerate.
pub(crate) fn text_ids(config: &Qwen2VlConfig, n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| in_vocab(config, 1000 + (i * 7919 + salt * 104_729) % 140_000))
        .collect()
}

/// A synthetic text id moved into `config`'s ordinary tokens (below the vision tokens and
/// the vocabulary's end): the ids of Qwen2-VL's 151,936-token vocabulary stay as they are,
/// and the tiny test checkpoints and small-vocabulary shapes run the same workloads.
fn in_vocab(config: &Qwen2VlConfig, id: u32) -> u32 {
    let limit = (config.text.vocab_size as u32)
        .min(config.vision_start_token_id)
        .min(config.image_token_id)
        .max(1);
    id % limit
}

/// The image processor of a benchmark shape: the default resolution limits (Qwen2-VL's),
/// patch, merge and temporal sizes from the config.
pub fn image_processor(config: &Qwen2VlConfig) -> ImageProcessor {
    ImageProcessor::new(ImageProcessorConfig {
        patch_size: config.vision.patch_size,
        merge_size: config.vision.spatial_merge_size,
        temporal_patch_size: config.vision.temporal_patch_size,
        ..ImageProcessorConfig::default()
    })
}

/// A prompt of `before` synthetic text tokens, the image, and `after` more.
pub fn prompt_with_image(
    config: &Qwen2VlConfig,
    patches: PixelPatches,
    before: usize,
    after: usize,
) -> Prompt {
    let mut ids = text_ids(config, before, 1);
    ids.push(config.vision_start_token_id);
    ids.extend(std::iter::repeat_n(
        config.image_token_id,
        patches.num_tokens(),
    ));
    ids.push(config.vision_end_token_id);
    ids.extend(text_ids(config, after, 2));
    Prompt {
        text: String::new(),
        input_ids: ids,
        images: vec![patches],
    }
}

/// The weights a benchmark runs.
pub enum Weights<'a> {
    /// Random weights of a shape (nothing to download: the default).
    Random(&'a Shape),
    /// A checkpoint's own, loaded as every inference command loads it (`--model DIR`).
    Checkpoint(&'a std::path::Path),
}

pub fn run(
    weights: Weights,
    device: &Device,
    dtype: DType,
    quantize: Option<crate::kernels::quant::QuantKind>,
    new_tokens: usize,
    group: usize,
) -> Result<BenchReport> {
    let (model, name, random) = match weights {
        Weights::Random(shape) => (
            random_model(shape, device, dtype, quantize)?,
            shape.name.clone(),
            true,
        ),
        Weights::Checkpoint(dir) => (
            crate::infer::inference_model(dir, dtype, device, None, quantize, "--quantize")?,
            dir.display().to_string(),
            false,
        ),
    };
    let config = model.config.clone();
    let parameters = crate::model::num_parameters(&config)?;

    let t = Instant::now();
    let patches = image_processor(&config).preprocess(&test_image())?;
    let preprocess_ms = t.elapsed().as_secs_f64() * 1e3;
    let image_tokens = patches.num_tokens();
    let prompt = prompt_with_image(&config, patches, TEXT_BEFORE, TEXT_AFTER);

    // No stop tokens: every sequence runs to `new_tokens`, as the reference script forces.
    let engine = Engine::new(&model, vec![], vec![]);
    let greedy = |max_new: usize| Request {
        prompt: &prompt,
        sampling: SamplingParams::default(),
        max_new_tokens: max_new,
        num_samples: 1,
    };
    // Warm-up (allocator, thread pool), then the vision tower alone, then prefill (1 new
    // token), then a full run.
    engine.generate(&[greedy(1)], |_, _, _| {})?;
    let pixels = prompt
        .pixel_values(device)?
        .context("the benchmark prompt has an image")?;
    let t = Instant::now();
    let v = model.encode_images(&pixels, &prompt.grids(), crate::model::Mode::Infer)?;
    candle_core::Device::synchronize(device)?;
    drop(v);
    let vision_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    engine.generate(&[greedy(1)], |_, _, _| {})?;
    let prefill_s = t.elapsed().as_secs_f64();
    let decode_tok_s_batch1 = decode_rate(&engine, greedy(new_tokens))?;

    let t = Instant::now();
    let sampled = Request {
        prompt: &prompt,
        sampling: SamplingParams::with_temperature(1.0, 0),
        max_new_tokens: new_tokens,
        num_samples: group,
    };
    let group_decode_tok_s = decode_rate(&engine, sampled)?;
    let group_total_s = t.elapsed().as_secs_f64();

    Ok(BenchReport {
        shape: name,
        random,
        parameters,
        threads: candle_core::utils::get_num_threads(),
        dtype: format!("{dtype:?}").to_lowercase(),
        quantize: model.quantization().map(|q| q.name().to_string()),
        prompt_tokens: prompt.input_ids.len(),
        image_tokens,
        new_tokens,
        preprocess_ms,
        vision_ms,
        prefill_ms: prefill_s * 1e3,
        decode_tok_s_batch1,
        group_size: group,
        group_total_s,
        group_decode_tok_s,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// A random model of `shape`, readied as every inference command readies its model
/// (`infer::load`): quantized to `quantize`, prepared for inference.
fn random_model(
    shape: &Shape,
    device: &Device,
    dtype: DType,
    quantize: Option<crate::kernels::quant::QuantKind>,
) -> Result<Qwen2Vl> {
    let config = shape.config()?;
    let vb = random_var_builder(0.02, 0, dtype, device);
    let mut model =
        Qwen2Vl::from_var_builder(vb, config.arch.released_layout(), config, dtype, device)
            .context("building the benchmark model")?;
    if let Some(kind) = quantize {
        model.quantize(kind)?;
        // The dense random weights are gone: the peak from here is the quantized model's,
        // as when it is loaded from a quantized checkpoint.
        crate::memory::release_freed();
        reset_peak_rss();
    }
    model.prepare_for_inference()?;
    Ok(model)
}

/// Decoded tokens per second of one request: the tokens after the first of each sample,
/// over the time from the first sampled token (prefill done) to the last. Timed inside
/// the run, so the prefill's own variation between runs does not leak into it.
fn decode_rate(engine: &Engine, request: Request) -> Result<f64> {
    let samples = request.num_samples;
    let (mut first, mut last, mut tokens) = (None, None, 0usize);
    engine.generate(&[request], |_, _, _| {
        let now = Instant::now();
        first.get_or_insert(now);
        last = Some(now);
        tokens += 1;
    })?;
    let (Some(first), Some(last)) = (first, last) else {
        anyhow::bail!("the benchmark run produced no tokens");
    };
    Ok(tokens.saturating_sub(samples) as f64 / (last - first).as_secs_f64().max(1e-9))
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "model            {}, {:.1}M parameters ({})",
            if self.random {
                "random Qwen2-VL"
            } else {
                "checkpoint"
            },
            self.parameters as f64 / 1e6,
            self.shape
        )?;
        writeln!(
            f,
            "prompt           {} tokens ({} for one 448x448 image), {} new tokens, {} threads, {}{}",
            self.prompt_tokens,
            self.image_tokens,
            self.new_tokens,
            self.threads,
            self.dtype,
            self.quantize
                .as_ref()
                .map_or(String::new(), |q| format!(", weights {q}"))
        )?;
        writeln!(f, "preprocess       {:.1} ms", self.preprocess_ms)?;
        writeln!(f, "vision tower     {:.0} ms", self.vision_ms)?;
        writeln!(
            f,
            "prefill          {:.0} ms (vision tower + prompt, batch 1; the prompt alone about {:.0} ms)",
            self.prefill_ms,
            self.prefill_ms - self.vision_ms
        )?;
        writeln!(
            f,
            "decode, batch 1  {:.1} tokens/s",
            self.decode_tok_s_batch1
        )?;
        writeln!(
            f,
            "1 prompt x G={}   {:.2} s end to end, decode {:.1} tokens/s",
            self.group_size, self.group_total_s, self.group_decode_tok_s
        )?;
        write!(f, "peak memory      {:.0} MiB resident", self.peak_rss_mib)
    }
}
