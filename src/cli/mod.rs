//! The `medvlm` command line: argument definitions and what each command does.

pub mod config_flags;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::generate::settings;
use crate::generate::{self, Engine, GenerationConfig, Request, TextStream, UserSampling};
use crate::model::{CheckpointWeights, Qwen2Vl, Qwen2VlConfig};
use crate::processor::{Message, Processor, ProcessorOptions, Prompt};

#[derive(Parser, Debug)]
#[command(
    name = "medvlm",
    version,
    about = "Teach vision-language models to reason about medical images (MedVLM-R1), and ask them.",
    long_about = "Teach vision-language models to reason about medical images with GRPO \
                  (MedVLM-R1), and ask them.\n\nEvery command that takes --model reads a local \
                  Hugging Face Qwen2-VL checkpoint directory: config.json, *.safetensors, \
                  tokenizer.json, tokenizer_config.json (or chat_template.json), \
                  preprocessor_config.json.",
    after_help = "Examples:\n  medvlm inspect --model ./Qwen2-VL-2B-Instruct\n  medvlm generate --model ./Qwen2-VL-2B-Instruct --image scan.png --prompt \"Which organ is shown?\"\n  medvlm score --model ./Qwen2-VL-2B-Instruct --image scan.png --prompt \"Which organ? A) liver B) kidney\" --completion \"<answer>A</answer>\" --json"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Answer a prompt about one or more images (greedy by default).
    Generate(GenerateArgs),
    /// Per-token log-probabilities of a given completion (teacher forcing).
    #[command(
        long_about = "Per-token log-probabilities of a given completion under teacher forcing: \
                      the completion is the assistant turn that follows the chat-templated \
                      prompt. Summing them scores an answer, which is how likelihood-based \
                      multiple-choice evaluation works. The completion is tokenized on its own \
                      (as generated tokens would be); write <|im_end|> at its end to score the \
                      end of the turn too."
    )]
    Score(ScoreArgs),
    /// Print a checkpoint's architecture, parameter count and dtype.
    Inspect(InspectArgs),
    /// Train a model: GRPO (MedVLM-R1) or the supervised baseline.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Draw a run's reward, KL, length and accuracy curves to a PNG.
    Plot(PlotArgs),
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Group Relative Policy Optimization with format and accuracy rewards (MedVLM-R1).
    #[command(
        long_about = "Group Relative Policy Optimization as in MedVLM-R1: per step, sample G \
                      completions for each of B prompts, reward them (answer format and \
                      correct letter), compute group-relative advantages, and take an AdamW \
                      step on the clipped objective with a KL penalty against the starting \
                      model.\n\nSettings come from --config (see --print-config for every key \
                      with its default and meaning), and any key can be set as a flag, which \
                      wins. The run directory receives config.toml, metrics.jsonl, \
                      completions.jsonl, checkpoint-N/ (Hugging Face layout plus optimizer \
                      state) and final/.",
        after_help = "Examples:\n  medvlm train grpo --print-config > grpo.toml\n  medvlm train grpo --config grpo.toml --model ./Qwen2-VL-2B-Instruct --train-data mri_train.json\n  medvlm train grpo --resume runs/grpo"
    )]
    Grpo(TrainArgs<GrpoKeys>),
    /// Supervised fine-tuning on the same data (the paper's baseline).
    #[command(
        after_help = "Examples:\n  medvlm train sft --print-config > sft.toml\n  medvlm train sft --config sft.toml --resume runs/sft"
    )]
    Sft(TrainArgs<SftKeys>),
}

/// Marker types tying a training command to its config's example file.
#[derive(Debug, Clone)]
pub struct GrpoKeys;
#[derive(Debug, Clone)]
pub struct SftKeys;

impl config_flags::ConfigKind for GrpoKeys {
    fn example() -> &'static str {
        crate::rl::config::EXAMPLE_CONFIG
    }
    fn keys() -> &'static [(String, String)] {
        static K: std::sync::LazyLock<Vec<(String, String)>> = std::sync::LazyLock::new(|| {
            config_flags::parse_example_keys(crate::rl::config::EXAMPLE_CONFIG)
        });
        &K
    }
}

impl config_flags::ConfigKind for SftKeys {
    fn example() -> &'static str {
        crate::sft::EXAMPLE_CONFIG
    }
    fn keys() -> &'static [(String, String)] {
        static K: std::sync::LazyLock<Vec<(String, String)>> = std::sync::LazyLock::new(|| {
            config_flags::parse_example_keys(crate::sft::EXAMPLE_CONFIG)
        });
        &K
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs<K: config_flags::ConfigKind + Send + Sync + Clone + std::fmt::Debug + 'static>
{
    /// TOML config file (keys as in --print-config).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue the run in this directory from its newest checkpoint, with its saved
    /// config.toml; the result equals an uninterrupted run.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
    pub resume: Option<PathBuf>,
    /// Print the commented default config and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Stop after this many optimizer steps, as if interrupted (for testing resumption).
    #[arg(long, hide = true, value_name = "N")]
    pub stop_after: Option<u64>,
    #[command(flatten)]
    pub keys: config_flags::ConfigOverrides<K>,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directory (with metrics.jsonl).
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// Output PNG (default: RUN_DIR/curves.png).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 1600)]
    pub width: u32,
    #[arg(long, default_value_t = 1000)]
    pub height: u32,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Rollout speed on a ~120M-parameter random Qwen2-VL with one 448x448 image: prefill
    /// time, decode tokens/s at batch 1 and for one prompt x G samples, peak memory.
    /// tools/bench_transformers.py runs the same workload with transformers.
    Generate(BenchGenerateArgs),
}

#[derive(Args, Debug)]
pub struct BenchGenerateArgs {
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub new_tokens: usize,
    /// Samples for the one-prompt group run.
    #[arg(long, default_value_t = 8, value_name = "G")]
    pub group: usize,
    /// CPU threads (default: all cores, or RAYON_NUM_THREADS).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// Compute dtype (default: f32 on CPU, bf16 on CUDA).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint directory (Hugging Face layout).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Compute dtype. Weights stored in another dtype are converted on load.
    /// Default: f32 on CPU (bf16 is not faster there), bf16 on CUDA.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// `cpu`, `cuda` or `cuda:N`. Default: CUDA when built with it and present, else CPU.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct PromptArgs {
    /// Image file(s), in the order the prompt refers to them.
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// The user's question.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// A system turn. Without it the chat template's default applies.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Smallest image area in pixels after resizing (default: preprocessor_config.json).
    #[arg(long, value_name = "N")]
    pub min_pixels: Option<usize>,
    /// Largest image area in pixels after resizing (MedVLM-R1 trains with 401408).
    #[arg(long, value_name = "N")]
    pub max_pixels: Option<usize>,
    /// Longest prompt accepted in tokens, images included (default: tokenizer_config.json's
    /// model_max_length). Image tokens are never truncated: a longer prompt is an error.
    #[arg(long, value_name = "N")]
    pub max_prompt_tokens: Option<usize>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Completions to sample for the prompt (GRPO's group size). The images are encoded
    /// and the prompt prefilled once for all of them.
    #[arg(long, default_value_t = 1, value_name = "G")]
    pub num_samples: usize,
    /// Print tokens as they are generated (one sample only).
    #[arg(long, conflicts_with = "json")]
    pub stream: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print JSON: prompt token ids, completion token ids and text.
    #[arg(long)]
    pub json: bool,
}

/// Decoding settings. Each one not given here comes from the checkpoint's
/// generation_config.json when it has it, else from the default shown; the settings in
/// effect are printed to stderr.
#[derive(Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Most tokens to generate [default: 512].
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy [default: 0].
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this total probability [default: 1].
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens; 0 keeps all [default: 0].
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Drop tokens less likely than this fraction of the most likely one [default: 0].
    #[arg(long, value_name = "P")]
    pub min_p: Option<f32>,
    /// Penalise tokens already present (prompt included); 1 is off [default: 1].
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f32>,
    /// Random seed: the same seed gives the same samples [default: 0].
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn user(&self) -> UserSampling {
        UserSampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
        }
    }
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// The assistant's answer to score.
    #[arg(long, value_name = "TEXT")]
    pub completion: String,
    /// Print JSON (per-token ids, strings and log-probabilities, and their sum).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Checkpoint directory (Hugging Face layout).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Score(a) => run_score(a),
        Command::Inspect(a) => run_inspect(a),
        Command::Bench(BenchCommand::Generate(a)) => run_bench_generate(a),
        Command::Train(TrainCommand::Grpo(a)) => run_train_grpo(a),
        Command::Train(TrainCommand::Sft(a)) => run_train_sft(a),
        Command::Plot(a) => {
            let out = crate::plot::plot_run(
                &a.run_dir,
                &crate::plot::PlotOptions {
                    out: a.out,
                    width: a.width,
                    height: a.height,
                },
            )?;
            println!("{}", out.display());
            Ok(())
        }
    }
}

/// The config file (or a resumed run's saved config) with flags merged over it.
fn resolve_config_text<
    K: config_flags::ConfigKind + Send + Sync + Clone + std::fmt::Debug + 'static,
>(
    a: &TrainArgs<K>,
) -> Result<(String, String, toml::Table)> {
    let mut over = a.keys.table.clone();
    let (text, file) = match (&a.resume, &a.config) {
        (Some(dir), _) => {
            let p = dir.join("config.toml");
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("{}: cannot read the run's config", p.display()))?;
            over.insert(
                "output_dir".into(),
                toml::Value::String(dir.display().to_string()),
            );
            (text, p.display().to_string())
        }
        (None, Some(p)) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read config", p.display()))?,
            p.display().to_string(),
        ),
        (None, None) => (String::new(), "command line".to_string()),
    };
    Ok((text, file, over))
}

fn run_train_grpo(a: TrainArgs<GrpoKeys>) -> Result<()> {
    if a.print_config {
        print!("{}", crate::rl::config::EXAMPLE_CONFIG);
        return Ok(());
    }
    let (text, file, over) = resolve_config_text(&a)?;
    let cfg = crate::rl::config::GrpoConfig::from_toml(&text, &file, Some(over))?;
    let out = crate::rl::trainer::train(cfg, a.resume.is_some(), a.stop_after)?;
    println!("{}", out.display());
    Ok(())
}

fn run_train_sft(a: TrainArgs<SftKeys>) -> Result<()> {
    if a.print_config {
        print!("{}", crate::sft::EXAMPLE_CONFIG);
        return Ok(());
    }
    let (text, file, over) = resolve_config_text(&a)?;
    let cfg = crate::sft::SftConfig::from_toml(&text, &file, Some(over))?;
    let out = crate::sft::train(cfg, a.resume.is_some(), a.stop_after)?;
    println!("{}", out.display());
    Ok(())
}

fn run_bench_generate(a: BenchGenerateArgs) -> Result<()> {
    if let Some(n) = a.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // Read by rayon and candle when their thread pools start, which is after this.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if a.new_tokens < 2 || a.group == 0 {
        bail!("--new-tokens must be at least 2 and --group at least 1");
    }
    let device = parse_device(a.device.as_deref())?;
    let dtype = a.dtype.map(DType::from).unwrap_or(if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    });
    let report = crate::bench::run(&device, dtype, a.new_tokens, a.group)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

pub fn parse_device(spec: Option<&str>) -> Result<Device> {
    match spec {
        None => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(0)?
        } else {
            Device::Cpu
        }),
        Some("cpu") => Ok(Device::Cpu),
        Some(s) if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {s}: this build has no CUDA support (rebuild with --features cuda)"
                );
            }
            let n = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("--device {s}: expected cuda:N"))?,
                None => 0,
            };
            Ok(Device::new_cuda(n)?)
        }
        Some(s) => bail!("--device {s}: expected cpu, cuda or cuda:N"),
    }
}

/// A model and its processor, loaded from one checkpoint directory.
pub struct Loaded {
    pub model: Qwen2Vl,
    pub processor: Processor,
}

pub fn load(m: &ModelArgs, opts: &ProcessorOptions) -> Result<Loaded> {
    if !m.model.is_dir() {
        bail!(
            "{}: no such checkpoint directory (expected config.json, *.safetensors, \
             tokenizer.json, preprocessor_config.json)",
            m.model.display()
        );
    }
    let device = parse_device(m.device.as_deref())?;
    let dtype = m.dtype.map(DType::from).unwrap_or(if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    });
    let processor = Processor::from_dir(&m.model, opts)?;
    let model = Qwen2Vl::load(&m.model, dtype, &device)?;
    let vocab = model.config.text.vocab_size;
    if processor.tokenizer.vocab_size() > vocab {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocabulary is {vocab}",
            m.model.display(),
            processor.tokenizer.vocab_size()
        );
    }
    if processor.tokenizer.special.image_pad != model.config.image_token_id {
        bail!(
            "{}: config.json's image_token_id ({}) is not the tokenizer's <|image_pad|> ({})",
            m.model.display(),
            model.config.image_token_id,
            processor.tokenizer.special.image_pad
        );
    }
    Ok(Loaded { model, processor })
}

fn processor_options(p: &PromptArgs) -> ProcessorOptions {
    ProcessorOptions {
        min_pixels: p.min_pixels,
        max_pixels: p.max_pixels,
        max_prompt_tokens: p.max_prompt_tokens,
    }
}

fn build_messages(p: &PromptArgs) -> Vec<Message> {
    let mut msgs = Vec::new();
    if let Some(s) = &p.system {
        msgs.push(Message::system(s.clone()));
    }
    msgs.push(Message::user_with_images(p.images.len(), p.prompt.clone()));
    msgs
}

fn prepare_prompt(proc: &Processor, p: &PromptArgs) -> Result<Prompt> {
    let images = p
        .images
        .iter()
        .map(|path| proc.load_image(path))
        .collect::<Result<Vec<_>>>()?;
    proc.prepare(&build_messages(p), images, true)
}

/// Token ids that end an assistant turn: `<|im_end|>`, `<|endoftext|>`, and the
/// tokenizer's eos token.
pub fn stop_tokens(proc: &Processor) -> Vec<u32> {
    let s = &proc.tokenizer.special;
    let mut v: Vec<u32> = [s.im_end, s.endoftext, proc.tokenizer.eos_token_id]
        .into_iter()
        .flatten()
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    if a.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    if a.stream && a.num_samples > 1 {
        bail!("--stream prints one sequence; use it with --num-samples 1");
    }
    let gen_cfg = GenerationConfig::from_dir(&a.model.model)?;
    let settings = settings::resolve(&a.sampling.user(), &gen_cfg)?;
    let loaded = load(&a.model, &processor_options(&a.prompt))?;
    let proc = &loaded.processor;
    let prompt = prepare_prompt(proc, &a.prompt)?;
    eprintln!("sampling: {settings}");
    let mut stop = stop_tokens(proc);
    stop.extend(&gen_cfg.eos_token_id);
    stop.sort_unstable();
    stop.dedup();
    let engine = Engine::new(
        &loaded.model,
        stop,
        proc.tokenizer.special.vision_ids().to_vec(),
    );
    let request = Request {
        prompt: &prompt,
        sampling: settings.params.clone(),
        max_new_tokens: settings.max_new_tokens,
        num_samples: a.num_samples,
    };
    let mut stream = TextStream::new(&proc.tokenizer);
    let mut stdout = std::io::stdout();
    let mut stream_err = None;
    let out = engine.generate(std::slice::from_ref(&request), |_, _, tok| {
        if a.stream && stream_err.is_none() {
            let r = stream.push(tok).and_then(|t| {
                if let Some(t) = t {
                    write!(stdout, "{t}")?;
                    stdout.flush()?;
                }
                Ok(())
            });
            stream_err = r.err();
        }
    })?;
    if let Some(e) = stream_err {
        return Err(e);
    }
    let completions = out.into_iter().next().unwrap_or_default();
    if a.stream {
        if let Some(t) = stream.finish()? {
            write!(stdout, "{t}")?;
        }
        writeln!(stdout)?;
        return Ok(());
    }
    if a.json {
        let samples: Vec<_> = completions
            .iter()
            .map(|c| {
                Ok(json!({
                    "completion_token_ids": c.tokens,
                    "text": proc.tokenizer.decode(c.content_tokens(), true)?,
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        let j = if samples.len() == 1 {
            let mut j = samples[0].clone();
            j["prompt_token_ids"] = json!(prompt.input_ids);
            j
        } else {
            json!({"prompt_token_ids": prompt.input_ids, "samples": samples})
        };
        println!("{}", serde_json::to_string(&j)?);
    } else {
        for (i, c) in completions.iter().enumerate() {
            let text = proc.tokenizer.decode(c.content_tokens(), true)?;
            if completions.len() > 1 {
                println!(
                    "--- sample {} ({} tokens, {:?})",
                    i + 1,
                    c.tokens.len(),
                    c.finish
                );
            }
            println!("{text}");
        }
    }
    Ok(())
}

fn run_score(a: ScoreArgs) -> Result<()> {
    let loaded = load(&a.model, &processor_options(&a.prompt))?;
    let proc = &loaded.processor;
    proc.check_user_text(&a.completion)?;
    let prompt = prepare_prompt(proc, &a.prompt)?;
    let completion = proc.tokenizer.encode(&a.completion)?;
    if let Some(limit) = proc.max_prompt_tokens {
        let total = prompt.input_ids.len() + completion.len();
        if total > limit {
            bail!("prompt plus completion is {total} tokens but the limit is {limit}");
        }
    }
    let lps = generate::score(&loaded.model, &prompt, &completion)?;
    let sum: f64 = lps.iter().map(|&x| x as f64).sum();
    if a.json {
        let tokens: Vec<_> = completion
            .iter()
            .zip(&lps)
            .map(|(&id, &lp)| {
                json!({"id": id, "token": proc.tokenizer.decode(&[id], false).unwrap_or_default(), "logprob": lp})
            })
            .collect();
        let j = json!({
            "prompt_token_ids": prompt.input_ids,
            "completion_token_ids": completion,
            "tokens": tokens,
            "logprob_sum": sum,
        });
        println!("{}", serde_json::to_string(&j)?);
    } else {
        let mut out = std::io::stdout().lock();
        for (&id, &lp) in completion.iter().zip(&lps) {
            let tok = proc.tokenizer.decode(&[id], false).unwrap_or_default();
            writeln!(out, "{lp:>10.4}  {id:>7}  {tok:?}")?;
        }
        writeln!(out, "{sum:>10.4}  total over {} tokens", lps.len())?;
    }
    Ok(())
}

fn run_inspect(a: InspectArgs) -> Result<()> {
    let dir: &Path = &a.model;
    let config = Qwen2VlConfig::from_file(&dir.join("config.json"))?;
    let weights = CheckpointWeights::open(dir)?;
    let layout = weights.layout(&config)?;
    // Build the model against the file headers alone, so a checkpoint that does not match its
    // config is reported here rather than at first use, without reading gigabytes.
    Qwen2Vl::from_var_builder(
        weights.shape_checker(),
        layout,
        config.clone(),
        DType::F32,
        &Device::Cpu,
    )
    .map_err(|e| weights.explain(e))?;
    let params = weights.num_parameters();
    let dtypes = weights.dtype_counts();
    let proc = Processor::from_dir(dir, &ProcessorOptions::default())?;
    let ipc = &proc.images.config;
    if a.json {
        let j = json!({
            "model_type": "qwen2_vl",
            "parameters": params,
            "stored_dtypes": dtypes,
            "config_dtype": config.saved_dtype,
            "text": {
                "layers": config.text.num_hidden_layers,
                "hidden_size": config.text.hidden_size,
                "heads": config.text.num_attention_heads,
                "kv_heads": config.text.num_key_value_heads,
                "intermediate_size": config.text.intermediate_size,
                "vocab_size": config.text.vocab_size,
                "mrope_section": config.text.mrope_section,
                "tie_word_embeddings": config.text.tie_word_embeddings,
            },
            "vision": {
                "depth": config.vision.depth,
                "embed_dim": config.vision.embed_dim,
                "heads": config.vision.num_heads,
                "patch_size": config.vision.patch_size,
                "spatial_merge_size": config.vision.spatial_merge_size,
            },
            "image_processor": {"min_pixels": ipc.min_pixels, "max_pixels": ipc.max_pixels},
            "tokenizer_vocab": proc.tokenizer.vocab_size(),
            "weight_layout": format!("{layout:?}").to_lowercase(),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    let t = &config.text;
    let v = &config.vision;
    println!("checkpoint   {}", dir.display());
    println!("architecture Qwen2-VL (Qwen2VLForConditionalGeneration)");
    println!("parameters   {} ({:.1}M)", params, params as f64 / 1e6);
    let stored: Vec<String> = dtypes.iter().map(|(k, n)| format!("{k} ({n})")).collect();
    println!(
        "dtype        stored as {}; config says {}",
        stored.join(", "),
        config.saved_dtype.as_deref().unwrap_or("nothing")
    );
    println!(
        "decoder      {} layers, hidden {}, {} heads / {} kv heads (head {}), mlp {}, vocab {}, \
         rope theta {}, mrope_section {:?}, lm_head {}",
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim(),
        t.intermediate_size,
        t.vocab_size,
        t.rope_theta,
        t.mrope_section,
        if t.tie_word_embeddings {
            "tied to embeddings"
        } else {
            "separate"
        }
    );
    println!(
        "vision       {} blocks, dim {}, {} heads, mlp {}, patch {}x{} over {} frames, merge {}x{} -> hidden {}",
        v.depth,
        v.embed_dim,
        v.num_heads,
        v.mlp_hidden(),
        v.patch_size,
        v.patch_size,
        v.temporal_patch_size,
        v.spatial_merge_size,
        v.spatial_merge_size,
        v.hidden_size
    );
    println!(
        "images       {}..{} pixels after resizing, one token per {}x{} pixels",
        ipc.min_pixels,
        ipc.max_pixels,
        ipc.patch_size * ipc.merge_size,
        ipc.patch_size * ipc.merge_size
    );
    println!(
        "tokenizer    {} tokens; weights in {} file(s), {} layout",
        proc.tokenizer.vocab_size(),
        weights.files().len(),
        format!("{layout:?}").to_lowercase()
    );
    Ok(())
}
