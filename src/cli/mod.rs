//! The `medvlm` command line: argument definitions and what each command does.

pub mod config_flags;

mod ask;
mod bench;
mod eval;
mod generate;
mod inspect;
mod selftest;
mod serve;
mod train;

use ask::*;
use bench::*;
use eval::*;
use generate::*;
use inspect::*;
use selftest::*;
use serve::*;
use train::*;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::generate::settings;
use crate::generate::{Engine, GenerationConfig, Request, TextStream, UserSampling};
use crate::kernels::quant::QuantKind;
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
    after_help = "Examples:\n  medvlm inspect --model ./Qwen2-VL-2B-Instruct\n  medvlm generate --model ./Qwen2-VL-2B-Instruct --image scan.png --prompt \"Which organ is shown?\"\n  medvlm score --model ./Qwen2-VL-2B-Instruct --image scan.png \\\n      --prompt \"Which organ? A) liver B) kidney\" --completion \"<answer>A</answer>\" --json"
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
    /// Accuracy on a multiple-choice dataset, per modality, with every answer logged.
    #[command(
        long_about = "Accuracy on a multiple-choice dataset (the MedVLM-R1 / OmniMedVQA JSON \
                      format or JSON lines), per modality with 95% confidence intervals, \
                      format compliance and no-answer rates. Answers are generated greedily \
                      and read with the same strict rule as the GRPO accuracy reward; \
                      --likelihood instead picks the option letter the model finds most \
                      probable, without generating. Writes report.md, report.json and \
                      items.jsonl (every prompt, output, extracted letter and verdict).\n\n\
                      --suite FILE evaluates every model a TOML file lists on every benchmark it \
                      lists (one table of models by benchmarks, each pair's report below it), \
                      resuming an interrupted run from the items already written (see --suite).",
        after_help = "Examples:\n  medvlm eval --model runs/grpo/final --data MRI_CT_XRAY_300each_dataset.json --image-root data/\n  medvlm eval --model ./Qwen2-VL-2B-Instruct --data test.json --modality CT \\\n      --limit 100 --likelihood --out runs/eval-ct\n  medvlm eval --suite suite.toml --out runs/suite   # rerun the same line to resume"
    )]
    Eval(EvalArgs),
    /// Ask a model a multiple-choice question about a scan and read its reasoning.
    #[command(
        after_help = "Examples:\n  medvlm ask --model runs/grpo/final --image scan.dcm \\\n      --question \"Which organ is abnormal?\" --options \"Liver;Kidney;Spleen\""
    )]
    Ask(AskArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (chat completions, streaming).
    #[command(
        long_about = "Serve a model over an OpenAI-compatible HTTP API: POST /v1/chat/completions \
                      (streaming or not, images as base64 data URLs: PNG, JPEG, DICOM), \
                      GET /v1/models, GET /health, GET /metrics (Prometheus). Concurrent \
                      requests are decoded together (continuous batching): a request joins the \
                      running batch at the next step and leaves when it is done. For reasoning \
                      models the <think> block is returned in message.reasoning_content (and \
                      message.reasoning) and the rest in message.content; under a template \
                      that opens <think> in the prompt (Qwen3-VL Thinking) the generated text \
                      is reasoning until </think>. Listens on 127.0.0.1 unless --host says \
                      otherwise; stops on SIGTERM or Ctrl-C after finishing the requests in \
                      flight.\n\nRequest extras beyond OpenAI's fields: \"window\" (DICOM/NIfTI \
                      intensity window: a CT preset such as \"lung\", \"CENTER,WIDTH\" or \
                      [CENTER, WIDTH]), \"slice\" (slice of a 3-D volume), \"top_k\", \"min_p\", \
                      \"repetition_penalty\", \"ignore_eos\" (generate exactly max_tokens).",
        after_help = "Examples:\n  medvlm serve --model runs/grpo/final --port 8000\n  medvlm serve --model runs/grpo/final --host 0.0.0.0 --api-key secret \\\n      --allowed-local-media-path runs/demo/data-test/images --max-batch 16"
    )]
    Serve(ServeArgs),
    /// Train a model: GRPO (MedVLM-R1) or the supervised baseline.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Datasets: generate the built-in synthetic medical VQA set.
    #[command(subcommand)]
    Data(DataCommand),
    /// Write a small random Qwen2-VL checkpoint (with its own tokenizer) to train offline.
    Init(InitArgs),
    /// Fold a LoRA adapter (PEFT format, e.g. a `train --lora-r` run's final/) into its base
    /// model: a full checkpoint in the base's layout and dtype.
    #[command(
        after_help = "Example:\n  medvlm merge --model ./Qwen2-VL-2B-Instruct --adapter runs/grpo-lora/final \\\n      --out ./medvlm-r1-merged"
    )]
    Merge(MergeArgs),
    /// Write a quantized copy of a checkpoint (8-bit q8_0, 6-bit q6_k, 4-bit q4_1 or q4_k) that every
    /// inference command loads as it is: no dense weights in memory, no quantizing at each
    /// start. Tensor by tensor, so the memory peak is one weight, not the model.
    #[command(
        after_help = "Example:\n  medvlm quantize --model ./medvlm-r1-merged --to q8_0 --out ./medvlm-r1-q8_0\n  medvlm ask --model ./medvlm-r1-q8_0 --image scan.dcm --question q.txt"
    )]
    Quantize(QuantizeArgs),
    /// Turn a llama.cpp GGUF pair (the text model and its mmproj vision file) into a
    /// checkpoint directory every command loads with --model. Qwen2-VL and Qwen2.5-VL; F32,
    /// F16, BF16, Q8_0, Q4_1, Q4_K and Q6_K tensors, kept exactly (a Q4_K_M file runs as its
    /// Q4_K/Q6_K mix, nothing is re-quantized).
    #[command(
        name = "import-gguf",
        after_help = "Example:\n  medvlm import-gguf --model Qwen2-VL-2B-Instruct-Q4_K_M.gguf \\\n      --mmproj mmproj-Qwen2-VL-2B-Instruct-f16.gguf --out ./qwen2-vl-2b-q4_k_m\n  medvlm ask --model ./qwen2-vl-2b-q4_k_m --image scan.dcm --question q.txt"
    )]
    ImportGguf(ImportGgufArgs),
    /// The whole MedVLM-R1 story on this machine: synthetic scans, a tiny model, SFT warm
    /// start, GRPO, the SFT baseline, and accuracy before and after, in and out of domain.
    Demo(DemoArgs),
    /// Draw a run's reward, KL, length and accuracy curves to a PNG.
    Plot(PlotArgs),
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Check a device against transformers' numbers on the committed fixtures, and time it.
    #[command(
        long_about = "Check that a device computes what transformers computes, and how fast: \
                      on the tiny checkpoints in tests/fixtures, logits (f32 and bf16), greedy \
                      continuations and teacher-forced log-probs against transformers' \
                      recorded outputs, and one GRPO step's loss and gradient norm against a \
                      PyTorch copy of TRL's loss; then rollouts at batch 1 and 1 x G=8 and one \
                      training step on the 119.7M benchmark model. Prints a table; exits \
                      non-zero if any check is out of bounds. Run this first on a new GPU.",
        after_help = "Examples:\n  medvlm selftest --device cpu --no-bench"
    )]
    Selftest(SelftestArgs),
}

#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// Device to check: cpu, cuda or cuda:N (default: cuda:0 in a CUDA build, else cpu).
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// The fixtures directory (the repository's tests/fixtures).
    #[arg(long, value_name = "DIR", default_value = "tests/fixtures")]
    pub fixtures: PathBuf,
    /// Skip the timings (rollouts and a training step on the benchmark model).
    #[arg(long)]
    pub no_bench: bool,
    /// Print the checks as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Group Relative Policy Optimization with format and accuracy rewards (MedVLM-R1).
    #[command(
        long_about = "Group Relative Policy Optimization as in MedVLM-R1: per step, sample G \
                      completions for each of B prompts, reward them (answer format, and the \
                      correct letter, or a closed or open question's answer scored by \
                      closed_reward_protocol / open_reward_protocol), compute \
                      group-relative advantages, and take an AdamW step on the clipped \
                      objective with a KL penalty against the starting model. Training data \
                      is MedVLM-R1's JSON or a benchmark as downloaded (--format, --split, \
                      --language).\n\nSettings come from --config (see --print-config for every key \
                      with its default and meaning), and any key can be set as a flag, which \
                      wins; list keys take one value, comma-separated values or a TOML array \
                      (--modalities MRI, --rewards accuracy,format). The run directory \
                      (output_dir: new, empty, or an earlier grpo run without checkpoints) \
                      receives config.toml, metrics.jsonl, completions.jsonl, checkpoint-N/ \
                      (Hugging Face layout plus optimizer state; save_total_limit keeps the \
                      newest N) and final/.",
        after_help = "Examples:\n  medvlm train grpo --print-config > grpo.toml\n  medvlm train grpo --config grpo.toml --model ./Qwen2-VL-2B-Instruct --train-data mri_train.json\n  medvlm train grpo --config grpo.toml --model ./Qwen2-VL-2B-Instruct \\\n      --train-data mri_train.json --lora-r 16 --output-dir runs/grpo-lora\n  medvlm train grpo --resume runs/grpo"
    )]
    Grpo(TrainArgs<GrpoKeys>),
    /// Supervised fine-tuning on the same data (the paper's baseline).
    #[command(
        after_help = "Examples:\n  medvlm train sft --print-config > sft.toml\n  medvlm train sft --config sft.toml --model ./Qwen2-VL-2B-Instruct --train-data mri_train.json\n  medvlm train sft --resume runs/sft\n  medvlm train sft --resume runs/sft --epochs 3   # extend a finished run to 3 epochs"
    )]
    Sft(TrainArgs<SftKeys>),
}

/// Marker types tying a training command to its config's example file.
#[derive(Debug, Clone)]
pub struct GrpoKeys;
#[derive(Debug, Clone)]
pub struct SftKeys;

impl config_flags::ConfigKind for GrpoKeys {
    const NAME: &'static str = "grpo";
    fn list_keys() -> Vec<String> {
        crate::rl::config::GrpoConfig::list_keys()
    }
    fn example() -> &'static str {
        crate::rl::config::GrpoConfig::example()
    }
    fn keys() -> &'static [(String, String)] {
        static K: std::sync::LazyLock<Vec<(String, String)>> =
            std::sync::LazyLock::new(|| config_flags::parse_example_keys(GrpoKeys::example()));
        &K
    }
}

impl config_flags::ConfigKind for SftKeys {
    const NAME: &'static str = "sft";
    fn list_keys() -> Vec<String> {
        crate::sft::SftConfig::list_keys()
    }
    fn example() -> &'static str {
        crate::sft::SftConfig::example()
    }
    fn keys() -> &'static [(String, String)] {
        static K: std::sync::LazyLock<Vec<(String, String)>> =
            std::sync::LazyLock::new(|| config_flags::parse_example_keys(SftKeys::example()));
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
    /// config.toml; the result equals an uninterrupted run. Only --max-steps / --epochs
    /// may change (to extend a run); other changed settings (from flags or a --config
    /// file) are named and refused, and so are a base model or training data replaced
    /// under the same path (each checkpoint records their sizes and content hashes).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Print the commented default config and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Print the run's memory plan (weights, gradients, optimizer state, reference model,
    /// activations, KV cache against what the device has) and exit without loading the
    /// model. Every run prints it too, and stops before loading when it does not fit.
    #[arg(long)]
    pub plan: bool,
    /// With --plan: plan for an NVIDIA GPU with this many GiB free instead of this machine
    /// (no GPU needed), e.g. 80 or 24.
    #[arg(long, value_name = "GIB", requires = "plan")]
    pub plan_gpu_gib: Option<f64>,
    /// Stop after this many optimizer steps, as if interrupted (for testing resumption).
    #[arg(long, hide = true, value_name = "N")]
    pub stop_after: Option<u64>,
    #[command(flatten)]
    pub keys: config_flags::ConfigOverrides<K>,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory (Hugging Face layout). With --suite the file names the models.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "suite",
        conflicts_with = "suite"
    )]
    pub model: Option<PathBuf>,
    /// A LoRA adapter directory (PEFT format: adapter_config.json,
    /// adapter_model.safetensors), e.g. a LoRA run's final/: merged into the model's
    /// weights on load. With --suite, a model's `adapter` key.
    #[arg(long, value_name = "DIR", conflicts_with = "suite")]
    pub adapter: Option<PathBuf>,
    /// Model dtype (every model of a --suite). Weights stored in another dtype are
    /// converted on load. Default: f32 on CPU, bf16 on CUDA.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// `cpu`, `cuda` or `cuda:N`. Default: CUDA when built with it and present, else CPU.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// Quantize the weights on load (every model of a --suite) for CPU inference: q8_0 (8-bit, about half of bf16's
    /// memory, a few times bf16's error), q4_1 (4-bit, about a third; larger error), q4_k
    /// (4.5 bits per weight, the densest; error about q4_1's) or q6_k (6.56 bits; error
    /// between q8_0's and q4_1's): every linear layer of the decoder and the vision tower
    /// (ggml's Q8_0 / Q4_1 / Q4_K / Q6_K numbers), the LM head at 8 bits (6 beside q4_k and
    /// q6_k). Products run on the
    /// CPU's integer dot products (AVX-512 VNNI; a portable path elsewhere). A checkpoint
    /// written by `medvlm quantize` is already quantized and needs no flag. The README's
    /// quantization table gives the error and speed of each.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub quantize: Option<QuantArg>,
    /// Evaluate every model on every benchmark a suite file (TOML) lists, into --out:
    /// <model>/<benchmark>/items.jsonl per pair, appended batch by batch, and report.md /
    /// report.json, a table of models by benchmarks (accuracy, 95% Wilson interval, n) with
    /// each pair's per-modality and per-kind report below. Rerunning the same command
    /// resumes: items already in a pair's items.jsonl are not scored again. A pair whose
    /// settings changed since (settings.json beside its items) is refused; --force scores
    /// it again from the start. The file's keys: template, max_new_tokens, batch_size,
    /// min_pixels, max_pixels; [[model]] tables with path, adapter, name; [[benchmark]]
    /// tables with path, format, splits, language, limit, closed_protocol, open_protocol,
    /// name (relative paths from the file's folder; names default to the model's folder
    /// and the benchmark's format). Greedy decoding only. Takes the place of --model, --data
    /// and the flags the file sets; --dtype, --device, --window, --slice apply to every
    /// model.
    #[arg(long, value_name = "FILE")]
    pub suite: Option<PathBuf>,
    /// The data: a MedVLM-R1 JSON file (a list or JSON lines), or a benchmark as
    /// downloaded, its folder or one of its files: VQA-RAD, PathVQA, SLAKE, PMC-VQA,
    /// OmniMedVQA, MMMU (Health & Medicine), MedXpertQA (MM). The format is found from what
    /// is there unless --format names it.
    #[arg(
        long,
        value_name = "FILE|DIR",
        required_unless_present = "suite",
        conflicts_with = "suite"
    )]
    pub data: Option<PathBuf>,
    /// The data's layout: medvlm, vqa-rad, path-vqa, slake, pmc-vqa, omnimedvqa, mmmu,
    /// medxpertqa (default: found from the files).
    #[arg(long, value_name = "NAME", conflicts_with = "suite")]
    pub format: Option<crate::data::DataFormat>,
    /// Benchmarks: only these splits (test, validation, test_clean, ...; comma-separated).
    /// Default: every split there is.
    #[arg(
        long = "split",
        value_name = "NAME",
        value_delimiter = ',',
        conflicts_with = "suite"
    )]
    pub splits: Vec<String>,
    /// Benchmarks: only questions in this language (en or zh; SLAKE has both).
    #[arg(long, value_name = "en|zh", conflicts_with = "suite")]
    pub language: Option<crate::data::Language>,
    /// Scoring protocol of closed (yes/no) questions: closed (MedEvalKit's rule, its case
    /// quirk corrected) or closed-medevalkit (as MedEvalKit scores SLAKE, quirk kept).
    #[arg(
        long,
        default_value = "closed",
        value_name = "NAME",
        conflicts_with = "suite"
    )]
    pub closed_protocol: crate::data::score::Protocol,
    /// Scoring protocols of open questions, comma-separated; the first decides "correct",
    /// all are reported: open-exact (lmms-eval's normalised exact match),
    /// open-recall-llavamed (LLaVA-Med's recall), open-f1 (LLaVA-Med's token F1),
    /// open-medevalkit (MedEvalKit's exact match), open-mmmu (MMMU's open parser).
    #[arg(
        long,
        value_name = "NAME,...",
        value_delimiter = ',',
        default_value = "open-exact,open-recall-llavamed,open-f1",
        conflicts_with = "suite"
    )]
    pub open_protocol: Vec<crate::data::score::Protocol>,
    /// Root of the rows' relative image paths (MedVLM-R1 data; default: the data file's
    /// folder).
    #[arg(long, value_name = "DIR", conflicts_with = "suite")]
    pub image_root: Option<PathBuf>,
    /// Keep only these modalities (MRI, CT, X-Ray, OCT, Ultrasound, ...); repeatable or
    /// comma-separated (--modality MRI,CT).
    #[arg(
        long = "modality",
        value_name = "NAME",
        value_delimiter = ',',
        conflicts_with = "suite"
    )]
    pub modalities: Vec<String>,
    /// Evaluate the test part of a seeded, modality-stratified split of this fraction.
    #[arg(long, value_name = "FRACTION", conflicts_with = "suite")]
    pub test_split: Option<f64>,
    /// Seed of the split.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// At most this many items (after filtering and splitting).
    #[arg(long, value_name = "N", conflicts_with = "suite")]
    pub limit: Option<usize>,
    /// Question template: "paper" (reasoning in <think>, letter in <answer>) or "simple".
    #[arg(long, value_name = "NAME", conflicts_with = "suite")]
    pub template: Option<String>,
    /// Score each option's letter instead of generating (default template: simple).
    #[arg(long, conflicts_with = "suite")]
    pub likelihood: bool,
    /// Items decoded together.
    #[arg(long, default_value_t = 16, value_name = "N", conflicts_with = "suite")]
    pub batch_size: usize,
    /// New tokens per answer at most (a longer answer is cut and counts as unanswered).
    #[arg(
        long,
        default_value_t = 512,
        value_name = "N",
        conflicts_with = "suite"
    )]
    pub max_new_tokens: usize,
    /// Image area limit after resizing, in pixels (default: preprocessor_config.json's).
    #[arg(long, value_name = "N", conflicts_with = "suite")]
    pub max_pixels: Option<usize>,
    /// Smallest image area after resizing, in pixels (default: preprocessor_config.json's).
    #[arg(long, value_name = "N", conflicts_with = "suite")]
    pub min_pixels: Option<usize>,
    #[command(flatten)]
    pub medical: MedicalArgs,
    /// Directory for report.md, report.json, items.jsonl (default: eval-<model>/, with
    /// --suite eval-<suite file name>/): new or empty, or an earlier evaluation's with
    /// --force; with --suite, an earlier run of the suite is resumed.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Replace an earlier evaluation's report in --out (refused otherwise; a directory
    /// holding anything else is always refused). With --suite: score again from the start
    /// the pairs whose settings changed (refused otherwise).
    #[arg(long)]
    pub force: bool,
}

impl EvalArgs {
    /// The one model of an evaluation without --suite.
    pub fn model_args(&self) -> Result<ModelArgs> {
        Ok(ModelArgs {
            model: self
                .model
                .clone()
                .context("--model is required without --suite")?,
            adapter: self.adapter.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
            quantize: self.quantize,
        })
    }
}

/// How `ask --slices` sends a volume's slices.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlicesAs {
    Images,
    Video,
}

#[derive(Args, Debug)]
pub struct AskArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The scan (PNG, JPEG, DICOM, NIfTI, ...), or a directory holding one DICOM series
    /// (its slices ordered by Instance Number).
    #[arg(long, value_name = "FILE|DIR")]
    pub image: PathBuf,
    /// Show a 3-D scan (NIfTI, multi-frame DICOM, a DICOM series directory) as several
    /// images: N slices evenly spaced through the volume (the middle of each of N equal
    /// parts), or a comma-separated list of slice indices (10,20,30). At most 64; every
    /// slice costs its own image tokens. Without it one slice is shown (--slice, or the
    /// middle one).
    #[arg(long, value_name = "N|I,J,K", conflicts_with = "slice", value_parser = parse_slices)]
    pub slices: Option<crate::processor::image::medical::Slices>,
    /// How --slices reach the model: `images` (one image each, the form the model sees
    /// most in training) or `video` (the frames of one video: Qwen2-VL's 3-D patches join
    /// each two consecutive slices, so N slices cost about half the tokens of N images).
    #[arg(long, value_enum, default_value_t = SlicesAs::Images, requires = "slices")]
    pub slices_as: SlicesAs,
    /// The question about the scan (without the options; see --options).
    #[arg(long, value_name = "TEXT")]
    pub question: String,
    /// The options, separated by ';' (lettered A, B, C, ... in this order). Without
    /// options the question is asked as is.
    #[arg(long, value_name = "A;B;C")]
    pub options: Option<String>,
    /// Question template: "paper" (reasoning in <think>, letter in <answer>) or "simple".
    /// Default: the one the checkpoint was trained with (its medvlm.json), else paper.
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,
    /// New tokens of reasoning and answer at most.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_new_tokens: usize,
    /// Image area limit after resizing, in pixels (default: preprocessor_config.json's).
    #[arg(long, value_name = "N")]
    pub max_pixels: Option<usize>,
    #[command(flatten)]
    pub medical: MedicalArgs,
    /// Print JSON (reasoning, answer letter, option, raw output).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on; 0.0.0.0 exposes the server to the network (use --api-key).
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (printed at start).
    #[arg(long, default_value_t = 8000, value_name = "PORT")]
    pub port: u16,
    /// Most sequences decoded together (a request with n choices counts n). More raise
    /// throughput and each stream's step time.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_batch: usize,
    /// Most requests waiting for room in the batch; beyond it requests get 429 with
    /// Retry-After.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_queue: usize,
    /// The model name clients use (default: the checkpoint directory's name).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1/ endpoints (/health and /metrics stay
    /// open). Default: no key (a warning when listening beyond loopback). An empty key is
    /// refused, not taken as "no key".
    #[arg(
        long,
        value_name = "KEY",
        env = "MEDVLM_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Let requests name local image files (paths or file:// URLs), but only inside this
    /// directory. Without it every local path is refused.
    #[arg(long, value_name = "DIR")]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Largest request body (and image) in MiB.
    #[arg(long, default_value_t = 32, value_name = "MB")]
    pub max_body_mb: usize,
    /// Seconds a request may take, queueing included; then 504 (or an error event when
    /// streaming) and its sequences are dropped.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub request_timeout: f64,
    /// Seconds to let in-flight requests finish after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub shutdown_timeout: f64,
    /// "parsed": a <think> block goes to message.reasoning_content, the rest to
    /// message.content; "raw": the generated text in content, as the model wrote it.
    #[arg(long, value_enum, default_value = "parsed", value_name = "FORMAT")]
    pub reasoning_format: crate::serve::ReasoningFormat,
    /// Prompt tokens prefilled between two decoding steps while other requests are
    /// decoding: bounds how long a new request stalls the running streams.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub prefill_chunk: usize,
    /// Most open connections. A new one beyond them closes the connection that has gone
    /// longest without a request in progress; if every one is busy, it waits for one to
    /// end. Lowered to what `ulimit -n` allows.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections: usize,
    /// Seconds from the first byte of a request's headers to the last; then the
    /// connection is closed.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub header_timeout: f64,
    /// Seconds a connection may stay open with no request in progress and no byte
    /// arriving (keep-alive); then it is closed.
    #[arg(long, default_value_t = 75.0, value_name = "SECS")]
    pub idle_timeout: f64,
    /// Seconds from a request's headers to the last byte of its body; then 408.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub body_timeout: f64,
    /// MiB of memory image decoding may take at once, by each image's declared size; an
    /// image needing more is refused (400), others wait for room. Default: a quarter of
    /// the memory available after the model is loaded.
    #[arg(long, value_name = "MB")]
    pub decode_budget_mb: Option<u64>,
    #[command(flatten)]
    pub limits: PromptLimits,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Procedurally drawn MRI-, CT- and X-ray-like scans with lesions, and multiple-choice
    /// questions whose answers are in the pixels (presence, side, count, modality), written
    /// as DIR/data.json (the MedVLM-R1 format) and DIR/images/.
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Directory to write data.json and images/ into: new or empty, or an earlier `data
    /// synth` output with --force.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Number of rows.
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// Seed of the drawings and questions: the same seed writes the same files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Modality styles to draw (MRI, CT, X-Ray); repeatable or comma-separated. Default:
    /// all three.
    #[arg(long = "modality", value_name = "NAME", value_delimiter = ',')]
    pub modalities: Vec<String>,
    /// Question kinds (presence, side, count, modality); repeatable or comma-separated.
    /// Default: all.
    #[arg(long = "task", value_name = "KIND", value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Replace an earlier `data synth` output in --out (refused otherwise; a directory
    /// holding anything else is always refused).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory to create (must not exist).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Write a real architecture with random bf16 weights instead of the tiny demo model:
    /// qwen2-vl-2b (Qwen2-VL-2B-Instruct's config.json, 2.2B parameters, two shards, 4.4 GB),
    /// qwen3-vl-2b (Qwen3-VL-2B-Instruct's, 2.1B parameters, 4.3 GB) or qwen2-vl-bench (the
    /// benchmark shape, 120M parameters).
    #[arg(long, value_enum, value_name = "NAME")]
    pub preset: Option<crate::model::Preset>,
    /// Seed of the random weights (and of the tokenizer's corpus).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Decoder width: a multiple of 8 from 32 to 16384.
    #[arg(long, default_value_t = 64)]
    pub hidden_size: usize,
    /// Decoder layers: 1 to 256.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where everything is written: a new or empty directory, or an earlier demo's with
    /// --force.
    #[arg(long, value_name = "DIR", default_value = "runs/demo")]
    pub out: PathBuf,
    /// A reduced run (fewer items and steps), for a first look or a test.
    #[arg(long)]
    pub quick: bool,
    /// Replace an earlier demo's results in --out (refused otherwise; a directory holding
    /// anything else is always refused).
    #[arg(long)]
    pub force: bool,
    /// Seed of the whole demo (data, model, sampling): the same seed gives the same run. At
    /// most 9223372036854775807: the training runs record it in TOML, whose integers are
    /// signed 64-bit.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=i64::MAX as u64))]
    pub seed: u64,
    /// Question kinds to train and test on (presence, side, count, modality); repeatable or
    /// comma-separated.
    #[arg(long = "task", value_name = "KIND", value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Training items (default 512, quick 256).
    #[arg(long, value_name = "N")]
    pub train_items: Option<usize>,
    /// Held-out items per in-domain set (default 96, quick 48); the out-of-domain set has half.
    #[arg(long, value_name = "N")]
    pub test_items: Option<usize>,
    /// SFT warm-start steps (default 200).
    #[arg(long, value_name = "N")]
    pub warm_steps: Option<u64>,
    /// GRPO steps; the SFT baseline gets the same number (default 200, quick 100).
    #[arg(long, value_name = "N")]
    pub rl_steps: Option<u64>,
    /// GRPO learning rate (also the SFT baseline's; default 6e-4).
    #[arg(long, value_name = "LR")]
    pub rl_lr: Option<f64>,
    /// Prompts per GRPO step (each sampled --group times).
    #[arg(long, value_name = "B")]
    pub rl_batch: Option<usize>,
    /// Completions per prompt (GRPO's group size G).
    #[arg(long, value_name = "G")]
    pub group: Option<usize>,
    /// GRPO sampling temperature.
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directory (with metrics.jsonl).
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// Output PNG (default: RUN_DIR/curves.png): a .png path that is new or holds an
    /// earlier plot (any other file there is refused, not replaced).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1600)]
    pub width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 1000)]
    pub height: u32,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Rollout speed on a ~120M-parameter random Qwen2-VL with one 448x448 image: prefill
    /// time, decode tokens/s at batch 1 and for one prompt x G samples, peak memory.
    /// tools/bench_transformers.py runs the same workload with transformers.
    Generate(BenchGenerateArgs),
    /// Training steps on the benchmark model (src/model/presets/qwen2-vl-bench.json: 119.7M parameters,
    /// random weights), timed phase by phase: generation, reference forward, policy
    /// forward+backward, optimizer; peak memory. GRPO by default (1 prompt x 8 completions
    /// of 256 tokens, a 261-token prompt with a 224x224 image, micro-batch 2, beta 0.04),
    /// the SFT baseline with --sft. tools/bench_train_pytorch.py runs the same steps in
    /// PyTorch, as TRL does.
    Train(BenchTrainArgs),
}

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Prompts per step (B).
    #[arg(long, default_value_t = 1, value_name = "B")]
    pub prompts: usize,
    /// Completions per prompt (G).
    #[arg(long, default_value_t = 8, value_name = "G")]
    pub group: usize,
    /// Tokens in every completion.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub completion_len: usize,
    /// Completions per forward/backward pass.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub micro_batch: usize,
    /// KL weight (0 skips the reference model).
    #[arg(long, default_value_t = 0.04)]
    pub beta: f64,
    /// Optimizer steps to time.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub steps: usize,
    /// Side of the square test image (224 gives 64 image tokens).
    #[arg(long, default_value_t = 224, value_name = "PIXELS")]
    pub image_size: u32,
    /// Prompt length in tokens, image tokens included.
    #[arg(long, default_value_t = 261, value_name = "N")]
    pub prompt_tokens: usize,
    /// Train only the language model and the merger.
    #[arg(long)]
    pub freeze_vision: bool,
    /// Report each phase's peak memory too. Resets the kernel's peak-memory counter at
    /// every phase boundary, so `/usr/bin/time` then sees only the last phase's peak.
    #[arg(long)]
    pub phase_memory: bool,
    /// Time an SFT step instead: PROMPTS x G items with COMPLETION_LEN-token targets, each
    /// its own prompt and image; no generation, no reference model.
    #[arg(long)]
    pub sft: bool,
    /// Keep only each layer's input and recompute the layers in the backward pass.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Skip the per-token entropies `train grpo` computes for its `entropy` metric (to time
    /// what they cost).
    #[arg(long)]
    pub no_entropy: bool,
    /// Train this checkpoint instead of the random benchmark model (e.g. one written by
    /// `medvlm init --preset qwen2-vl-2b`).
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub model: Option<PathBuf>,
    /// LoRA rank (alpha = 2 x rank, frozen bf16 base, the language model's projections);
    /// needs --model.
    #[arg(long, default_value_t = 0, value_name = "R")]
    pub lora_r: usize,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Keep the KL reference weight-quantized, as `train grpo`'s `reference_quantize` does
    /// (GRPO with --beta above 0, no --lora-r; CPU only).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub reference_quantize: Option<QuantArg>,
    /// CPU threads (default: all cores, or RAYON_NUM_THREADS).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The model shape a benchmark builds, with random weights.
#[derive(Args, Debug)]
pub struct ShapeArgs {
    /// The model shape (random weights): qwen2-vl-bench (src/model/presets/qwen2-vl-bench.json,
    /// 119.7M parameters, two thirds of them the 151,936-token embedding),
    /// qwen2-vl-bench-layers (16 layers x 768 with a 32,768-token vocabulary, 178.7M; the
    /// layers dominate), qwen2-vl-2b (Qwen2-VL-2B-Instruct's config, 2.2B; about 9 GB in f32)
    /// or qwen3-vl-2b (Qwen3-VL-2B-Instruct's, 2.1B).
    #[arg(
        long,
        value_enum,
        default_value = "qwen2-vl-bench",
        value_name = "NAME"
    )]
    pub preset: crate::model::Preset,
    /// Another shape: a config.json, or a checkpoint directory (only its config.json is
    /// read; the weights are random). Overrides --preset.
    #[arg(long, value_name = "FILE|DIR")]
    pub config: Option<PathBuf>,
}

impl ShapeArgs {
    /// The shape asked for: --config, else --preset.
    pub fn shape(&self) -> anyhow::Result<crate::bench::Shape> {
        Ok(match &self.config {
            Some(p) => crate::bench::Shape::from_path(p)?,
            None => crate::bench::Shape::preset(self.preset),
        })
    }
}

#[derive(Args, Debug)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Benchmark a checkpoint's own weights instead of a random model (any checkpoint
    /// `ask` loads: quantized, imported from GGUF, ...); the peak memory then includes
    /// loading it.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["preset", "config"])]
    pub model: Option<PathBuf>,
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
    /// Model dtype (default: f32 on CPU, bf16 on CUDA). On the CPU, bf16 (f16) means bf16
    /// (f16) weights with f32 activations, as `ask`/`eval`/`serve` run it;
    /// tools/bench_transformers.py --dtype bf16 runs torch's all-bf16 path.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Quantize the random model's weights (as `generate --quantize` does) before
    /// measuring; the peak memory is then the one after quantizing.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub quantize: Option<QuantArg>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base checkpoint directory the adapter was trained on.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// Where to write the merged checkpoint (must not exist).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The checkpoint directory to quantize (Hugging Face layout, any dtype).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The format of the linear layers (the LM head: q6_k beside q4_k and q6_k, q8_0 otherwise).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub to: QuantArg,
    /// Where to write the quantized checkpoint (must not exist).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct ImportGgufArgs {
    /// The text model GGUF (general.architecture "qwen2vl"), e.g. Qwen2-VL-2B-Instruct-Q4_K_M.gguf.
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// Its vision tower GGUF (llama.cpp's mmproj-*.gguf).
    #[arg(long, value_name = "FILE")]
    pub mmproj: PathBuf,
    /// Where to write the checkpoint directory (must not exist).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Smallest image, in pixels, written to preprocessor_config.json (default 3136, Qwen2-VL's).
    #[arg(long, value_name = "PIXELS")]
    pub min_pixels: Option<usize>,
    /// Largest image, in pixels, written to preprocessor_config.json (default 12845056, Qwen2-VL's).
    #[arg(long, value_name = "PIXELS")]
    pub max_pixels: Option<usize>,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint directory (Hugging Face layout).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A LoRA adapter directory (PEFT format: adapter_config.json,
    /// adapter_model.safetensors), e.g. a LoRA run's final/: merged into the model's
    /// weights on load.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Model dtype. Weights stored in another dtype are converted on load.
    /// Default: f32 on CPU, bf16 on CUDA. On the CPU, bf16 keeps the weights in bf16 (half
    /// the memory, faster decoding) while activations stay f32.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// `cpu`, `cuda` or `cuda:N`. Default: CUDA when built with it and present, else CPU.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// Quantize the weights on load for CPU inference: q8_0 (8-bit, about half of bf16's
    /// memory, a few times bf16's error), q4_1 (4-bit, about a third; larger error), q4_k
    /// (4.5 bits per weight, the densest; error about q4_1's) or q6_k (6.56 bits; error
    /// between q8_0's and q4_1's): every linear layer of the decoder and the vision tower
    /// (ggml's Q8_0 / Q4_1 / Q4_K / Q6_K numbers), the LM head at 8 bits (6 beside q4_k and
    /// q6_k). Products run on the
    /// CPU's integer dot products (AVX-512 VNNI; a portable path elsewhere). A checkpoint
    /// written by `medvlm quantize` is already quantized and needs no flag. The README's
    /// quantization table gives the error and speed of each.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub quantize: Option<QuantArg>,
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
    #[command(flatten)]
    pub limits: PromptLimits,
    #[command(flatten)]
    pub medical: MedicalArgs,
}

/// Image sizes and prompt length: `generate`, `score` and `serve`.
#[derive(Args, Debug, Clone)]
pub struct PromptLimits {
    /// Smallest image area in pixels after resizing (default: preprocessor_config.json).
    #[arg(long, value_name = "N")]
    pub min_pixels: Option<usize>,
    /// Largest image area in pixels after resizing (MedVLM-R1 trains with 401408).
    #[arg(long, value_name = "N")]
    pub max_pixels: Option<usize>,
    /// Longest prompt accepted in tokens, images included (default: tokenizer_config.json's
    /// model_max_length). Image tokens are never truncated: a longer prompt is an error
    /// (for the server, a 400).
    #[arg(long, value_name = "N")]
    pub max_prompt_tokens: Option<usize>,
}

impl PromptLimits {
    pub fn options(&self, medical: crate::processor::image::MedicalOptions) -> ProcessorOptions {
        ProcessorOptions {
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
            max_prompt_tokens: self.max_prompt_tokens,
            medical,
        }
    }
}

/// How DICOM and NIfTI images become pictures. Other images ignore these.
#[derive(Args, Debug, Clone)]
pub struct MedicalArgs {
    /// Intensity window for DICOM/NIfTI images, as CENTER,WIDTH in the file's units after
    /// rescaling (Hounsfield units for CT), or a CT preset: brain (40,80), subdural (80,200),
    /// stroke (40,40), lung (-600,1500), mediastinum (50,350), abdomen (40,400), liver
    /// (60,160), bone (400,1800). Default: the file's own window, else the slice's min..max.
    #[arg(long, value_name = "C,W|PRESET", allow_hyphen_values = true, value_parser = parse_window)]
    pub window: Option<(f64, f64)>,
    /// Slice of a 3-D/4-D volume (NIfTI: index along the third axis of the first volume;
    /// multi-frame DICOM: the frame). Default: the middle one.
    #[arg(long, value_name = "N")]
    pub slice: Option<usize>,
}

impl MedicalArgs {
    pub fn options(&self) -> crate::processor::image::MedicalOptions {
        crate::processor::image::MedicalOptions {
            window: self.window,
            slice: self.slice,
        }
    }
}

pub use crate::processor::image::medical::window::parse_window;

fn parse_slices(s: &str) -> Result<crate::processor::image::medical::Slices, String> {
    crate::processor::image::medical::Slices::parse(s).map_err(|e| e.to_string())
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
    /// Every value the user gave, named by its flag, whatever the decoding: `--min-p 2`
    /// under greedy decoding is as wrong as under sampling (it would be ignored silently).
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t >= 0.0) {
                bail!("--temperature must be a finite number of at least 0 (0 is greedy), got {t}");
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("--top-p must be in (0, 1], got {p}");
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                bail!("--min-p must be in [0, 1], got {p}");
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                bail!("--repetition-penalty must be a finite number above 0 (1 is off), got {r}");
            }
        }
        if self.max_new_tokens == Some(0) {
            bail!("--max-new-tokens must be at least 1");
        }
        Ok(())
    }

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

/// A weight-only quantization format (`--quantize`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantArg {
    /// 8-bit weights, an f16 scale per 32 (8.5 bits per weight).
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit weights, an f16 scale and minimum per 32 (5 bits per weight).
    #[value(name = "q4_1")]
    Q4_1,
    /// 4-bit weights in super-blocks of 256, 6-bit scales and minima per 32 (ggml's Q4_K:
    /// 4.5 bits per weight; layers narrower than 256 inputs take q4_1).
    #[value(name = "q4_k")]
    Q4K,
    /// 6-bit weights in super-blocks of 256, an 8-bit scale per 16 (ggml's Q6_K: 6.5625
    /// bits per weight; layers narrower than 256 inputs take q8_0).
    #[value(name = "q6_k")]
    Q6K,
}

impl From<QuantArg> for QuantKind {
    fn from(q: QuantArg) -> Self {
        match q {
            QuantArg::Q8_0 => QuantKind::Q8_0,
            QuantArg::Q4_1 => QuantKind::Q4_1,
            QuantArg::Q4K => QuantKind::Q4K,
            QuantArg::Q6K => QuantKind::Q6K,
        }
    }
}

pub use crate::device::parse as parse_device;
pub use crate::infer::{split_reasoning, Loaded};

impl ModelArgs {
    pub fn source(&self) -> crate::infer::ModelSource {
        crate::infer::ModelSource {
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            dtype: self.dtype.map(DType::from),
            device: self.device.clone(),
            quantize: self.quantize.map(QuantKind::from),
        }
    }
}

/// Loads `--model` (with `--adapter`) on `--device` in `--dtype`.
pub fn load(m: &ModelArgs, opts: &ProcessorOptions) -> Result<Loaded> {
    crate::infer::load(&m.source(), opts)
}

/// How much of an error `main` prints, from RUST_BACKTRACE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorDetail {
    /// Unset or "0": the one line.
    Line,
    /// "1": then what a cause has beyond its first line (a library's backtrace, a shape
    /// mismatch's details), on lines of their own. A user's mistake stays one line, since
    /// many developers keep RUST_BACKTRACE=1 set.
    Causes,
    /// "full": then also the backtrace of where medvlm raised the error.
    Full,
}

impl ErrorDetail {
    pub fn from_env(v: Option<&std::ffi::OsStr>) -> Self {
        match v.and_then(|v| v.to_str()) {
            None | Some("0") | Some("") => Self::Line,
            Some("full") => Self::Full,
            Some(_) => Self::Causes,
        }
    }
}

/// How `main` prints an error: `error: ` and the chain of causes on one line (each cause's
/// first line), so that a script or a reader sees one line; with more `detail`, the rest on
/// lines of their own below it.
pub fn error_report(e: &anyhow::Error, detail: ErrorDetail) -> String {
    let line = e
        .chain()
        .map(|c| {
            c.to_string()
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|c| !c.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    let mut out = format!("error: {line}");
    if detail != ErrorDetail::Line {
        for c in e.chain() {
            let text = c.to_string();
            if text.trim().lines().count() > 1 {
                out.push_str(&format!("\n\n{}", text.trim_end()));
            }
        }
    }
    if detail == ErrorDetail::Full {
        let bt = e.backtrace();
        if bt.status() == std::backtrace::BacktraceStatus::Captured {
            out.push_str(&format!("\n\nbacktrace:\n{bt}"));
        }
    }
    out
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Score(a) => run_score(a),
        Command::Inspect(a) => run_inspect(a),
        Command::Merge(a) => {
            let n = crate::merge::merge(&a.model, &a.adapter, &a.out)?;
            eprintln!("merged {n} adapted weights");
            println!("{}", a.out.display());
            Ok(())
        }
        Command::Quantize(a) => {
            let n = crate::quantize::save(&a.model, a.to.into(), &a.out)?;
            eprintln!("quantized {n} weights to {}", QuantKind::from(a.to).name());
            println!("{}", a.out.display());
            Ok(())
        }
        Command::ImportGguf(a) => {
            let opts = crate::import::ImportOptions {
                min_pixels: a.min_pixels,
                max_pixels: a.max_pixels,
            };
            let done = crate::import::import_gguf(&a.model, &a.mmproj, &a.out, &opts)?;
            let types: Vec<String> = done.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
            eprintln!(
                "imported a {} ({} tensors)",
                done.arch.name(),
                types.join(", ")
            );
            println!("{}", a.out.display());
            Ok(())
        }
        Command::Selftest(a) => run_selftest(a),
        Command::Bench(BenchCommand::Generate(a)) => run_bench_generate(a),
        Command::Bench(BenchCommand::Train(a)) => run_bench_train(a),
        Command::Eval(a) if a.suite.is_some() => run_suite(a),
        Command::Eval(a) => run_eval(a),
        Command::Data(DataCommand::Synth(a)) => {
            let styles = a
                .modalities
                .iter()
                .map(|m| {
                    crate::synth::Style::parse(m)
                        .with_context(|| format!("--modality {m}: expected MRI, CT or X-Ray"))
                })
                .collect::<Result<Vec<_>>>()?;
            let kinds = a
                .tasks
                .iter()
                .map(|k| {
                    crate::synth::Kind::parse(k).with_context(|| {
                        format!("--task {k}: expected presence, side, count or modality")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let mut spec = crate::synth::SynthSpec {
                n: a.n,
                seed: a.seed,
                ..Default::default()
            };
            if !styles.is_empty() {
                spec.styles = styles;
            }
            if !kinds.is_empty() {
                spec.kinds = kinds;
            }
            // Written beside --out and moved into place when complete, so an earlier
            // output (--force) is replaced only by a finished one.
            crate::files::check_output_dir(
                &a.out,
                &crate::files::OutputSpec {
                    command: "data synth",
                    flag: "--out",
                    entries: crate::synth::ENTRIES,
                    legacy: None,
                },
                crate::files::Earlier::Replace { force: a.force },
            )?;
            let p = crate::synth::write(&a.out, &spec)?;
            println!("{}", p.display());
            Ok(())
        }
        Command::Init(a) => {
            if let Some(p) = a.preset {
                let out = crate::init::write_preset(&a.out, p, a.seed)?;
                println!("{}", out.display());
                return Ok(());
            }
            let spec = crate::init::InitSpec {
                seed: a.seed,
                hidden_size: a.hidden_size,
                layers: a.layers,
                ..Default::default()
            };
            let p = crate::init::write(&a.out, &spec)?;
            println!("{}", p.display());
            Ok(())
        }
        Command::Demo(a) => {
            let mut spec = crate::demo::DemoSpec::new(a.out, a.quick, a.seed);
            if !a.tasks.is_empty() {
                spec.kinds = a
                    .tasks
                    .iter()
                    .map(|k| {
                        crate::synth::Kind::parse(k).with_context(|| {
                            format!("--task {k}: expected presence, side, count or modality")
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
            }
            if let Some(n) = a.train_items {
                spec.n_train = n;
            }
            if let Some(n) = a.test_items {
                spec.n_test = n;
            }
            if let Some(n) = a.warm_steps {
                spec.warm_steps = n;
            }
            if let Some(n) = a.rl_steps {
                spec.rl_steps = n;
            }
            if let Some(lr) = a.rl_lr {
                spec.rl_lr = lr;
            }
            if let Some(b) = a.rl_batch {
                spec.batch_prompts = b;
            }
            if let Some(g) = a.group {
                spec.num_generations = g;
            }
            if let Some(t) = a.temperature {
                spec.temperature = t;
            }
            // Every flag is checked before any work, named as the user wrote it.
            spec.validate()?;
            crate::demo::prepare_output(&spec.out, a.force)?;
            crate::demo::run(&spec).map(|_| ())
        }
        Command::Ask(a) => run_ask(a),
        Command::Serve(a) => run_serve(a),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A cause with several lines (a library's error with its backtrace) stays one line
    /// unless details are asked for, and then they follow on lines of their own.
    #[test]
    fn errors_are_one_line_and_details_follow_only_when_asked() {
        let inner = anyhow::anyhow!("shape mismatch in matmul\n   0: candle::frame\n   1: main");
        let e = inner.context("model.safetensors: cannot load");
        let line = error_report(&e, ErrorDetail::Line);
        assert_eq!(
            line,
            "error: model.safetensors: cannot load: shape mismatch in matmul"
        );
        let more = error_report(&e, ErrorDetail::Causes);
        let mut lines = more.lines();
        assert_eq!(lines.next(), Some(line.as_str()));
        assert!(more.contains("\n   0: candle::frame\n   1: main"), "{more}");
        assert!(!more.contains("backtrace:"), "{more}");
        assert_eq!(
            ErrorDetail::from_env(Some(std::ffi::OsStr::new("1"))),
            ErrorDetail::Causes
        );
        assert_eq!(
            ErrorDetail::from_env(Some(std::ffi::OsStr::new("0"))),
            ErrorDetail::Line
        );
        assert_eq!(ErrorDetail::from_env(None), ErrorDetail::Line);
        assert_eq!(
            ErrorDetail::from_env(Some(std::ffi::OsStr::new("full"))),
            ErrorDetail::Full
        );
    }

    /// A sampling value the user gave is checked even when greedy decoding ignores it.
    #[test]
    fn sampling_flags_are_checked_whatever_the_decoding() {
        let bad = [
            (
                SamplingArgs {
                    min_p: Some(2.0),
                    ..Default::default()
                },
                "--min-p",
            ),
            (
                SamplingArgs {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "--top-p",
            ),
            (
                SamplingArgs {
                    temperature: Some(f32::NAN),
                    ..Default::default()
                },
                "--temperature",
            ),
            (
                SamplingArgs {
                    repetition_penalty: Some(f32::INFINITY),
                    ..Default::default()
                },
                "--repetition-penalty",
            ),
            (
                SamplingArgs {
                    max_new_tokens: Some(0),
                    ..Default::default()
                },
                "--max-new-tokens",
            ),
        ];
        for (args, flag) in bad {
            let e = args.validate().unwrap_err().to_string();
            assert!(e.starts_with(flag), "{e}");
        }
        assert!(SamplingArgs {
            temperature: Some(0.0),
            top_p: Some(1.0),
            min_p: Some(0.0),
            ..Default::default()
        }
        .validate()
        .is_ok());
    }
}
