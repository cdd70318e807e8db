//! The settings every training run shares, GRPO and SFT alike: model and data, optimizer
//! and schedule, precision and memory savers (LoRA, gradient checkpointing), checkpoints.
//! One struct, [`RunConfig`], so a new training setting is written once; each method adds
//! its own keys ([`Method`]) in the same flat TOML file, plus a `[lora]` section.
//!
//! Unknown keys are errors naming the closest known key (a typo must not silently train
//! with a default), and everything that can be checked before loading a model is.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::data::{DataFormat, Language, PromptTemplate};

/// The shared keys' commented example (top-level keys).
pub const RUN_EXAMPLE: &str = include_str!("run.example.toml");
/// The `[lora]` section's commented example.
pub const LORA_EXAMPLE: &str = include_str!("lora.example.toml");

/// LoRA adapters (PEFT's formulation): `y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ` for
/// every linear layer named in `target_modules`, with W frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Adapter rank; 0 trains the full model instead.
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names as PEFT matches them: a name matches a layer whose path is the name or
    /// ends with `.name` (q_proj, ..., down_proj in the language model; qkv, proj, fc1,
    /// fc2 in the vision tower; mlp.0, mlp.2 in the merger).
    pub target_modules: Vec<String>,
    /// Storage of the frozen base weights: "bf16" or "f32".
    pub base_dtype: String,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 0,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            base_dtype: "bf16".into(),
        }
    }
}

impl LoraConfig {
    pub fn enabled(&self) -> bool {
        self.r > 0
    }

    /// PEFT's scaling, alpha / r.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r.max(1) as f64
    }

    pub fn base_dtype(&self) -> Result<DType> {
        parse_dtype(&self.base_dtype, "lora.base_dtype")
    }
}

/// What every training run is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Checkpoint directory to start from (Hugging Face layout). Required.
    pub model: PathBuf,
    /// Training data: the MedVLM-R1 JSON format or JSON lines, or a benchmark as downloaded
    /// (a folder or file [`crate::data::load_data`] reads). Required.
    pub train_data: PathBuf,
    /// The data's format: `medvlm` or a benchmark's name (`slake`, `vqa-rad`, ...); unset =
    /// found from what is there. Applies to GRPO's eval_data too.
    pub format: Option<String>,
    /// Benchmarks: the splits of train_data to read (all when empty).
    pub split: Vec<String>,
    /// Benchmarks: only questions in this language (`en`, `zh`); applies to eval_data too.
    pub language: Option<String>,
    /// Root for the rows' relative image paths (default: the data file's directory).
    pub image_root: Option<PathBuf>,
    /// Keep only these modalities (e.g. ["MRI"]); empty keeps all.
    pub modalities: Vec<String>,
    /// Run directory: config, metrics, samples, checkpoints.
    pub output_dir: PathBuf,
    /// "paper" (think/answer, the default) or "simple".
    pub template: PromptTemplate,
    pub min_pixels: Option<usize>,
    /// MedVLM-R1 trains with 401408.
    pub max_pixels: Option<usize>,
    /// Sequences per forward/backward pass (gradient accumulation splits the step).
    pub micro_batch: usize,

    pub learning_rate: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Passes over the training data (used when max_steps is 0).
    pub epochs: f64,
    /// Optimizer steps (0 = from epochs).
    pub max_steps: u64,

    /// Compute dtype: "f32" or "bf16" (weights' f32 masters and AdamW state stay f32).
    pub dtype: String,
    /// Keep only each layer's input in the forward pass and recompute the layer in the
    /// backward pass.
    pub gradient_checkpointing: bool,
    /// Train only the language model and the merger.
    pub freeze_vision: bool,

    /// Save a checkpoint every this many optimizer steps (0 = only at the end).
    pub save_steps: u64,
    /// Keep only the newest this many checkpoints (0 = keep all); the newest, which a resume
    /// continues from, is never deleted.
    pub save_total_limit: u64,
    /// dtype of the final exported model: "f32" or "bf16" (checkpoints stay f32 so
    /// resuming is exact).
    pub final_dtype: String,
    pub seed: u64,
    /// "cpu", "cuda" or "cuda:N" (default: CUDA when available).
    pub device: Option<String>,
    /// Refuse to start when the memory plan says the run will not fit.
    pub memory_check: bool,
    pub lora: LoraConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            train_data: PathBuf::new(),
            format: None,
            split: vec![],
            language: None,
            image_root: None,
            modalities: vec![],
            output_dir: PathBuf::from("runs/run"),
            template: PromptTemplate::Paper,
            min_pixels: None,
            max_pixels: Some(401_408),
            micro_batch: 4,
            learning_rate: 1e-6,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            epochs: 1.0,
            max_steps: 0,
            dtype: "f32".into(),
            gradient_checkpointing: false,
            freeze_vision: false,
            save_steps: 50,
            save_total_limit: 0,
            final_dtype: "f32".into(),
            seed: 42,
            device: None,
            memory_check: true,
            lora: LoraConfig::default(),
        }
    }
}

/// "f32" / "bf16" as a dtype; `key` names the setting in errors.
pub fn parse_dtype(s: &str, key: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => bail!("config: {key} must be \"f32\" or \"bf16\", got {other:?}"),
    }
}

impl RunConfig {
    /// The compute dtype.
    pub fn compute_dtype(&self) -> Result<DType> {
        parse_dtype(&self.dtype, "dtype")
    }

    /// Checks that the model and data the settings name exist.
    pub fn validate_files(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() {
            bail!("config: `model` (the checkpoint directory to train) is required");
        }
        if !self.model.is_dir() {
            bail!(
                "config: model {}: no such checkpoint directory",
                self.model.display()
            );
        }
        if self.train_data.as_os_str().is_empty() {
            bail!("config: `train_data` is required");
        }
        // A benchmark as downloaded is a folder; a device (/dev/zero) or a FIFO is named as
        // what it is.
        if !self.train_data.is_dir()
            && !crate::processor::input::is_regular_file(&self.train_data, "train_data")?
        {
            bail!(
                "config: train_data {}: no such file or folder",
                self.train_data.display()
            );
        }
        Ok(())
    }

    /// The data format setting, parsed (`None`: found from what is there).
    pub fn data_format(&self) -> std::result::Result<Option<DataFormat>, SettingError> {
        self.format
            .as_deref()
            .map(|f| {
                f.parse::<DataFormat>().map_err(|_| {
                    let names: Vec<&str> = crate::data::bench::Format::ALL
                        .iter()
                        .map(|f| f.name())
                        .collect();
                    SettingError::new(
                        "format",
                        &format!(
                            "must be medvlm (the MedVLM-R1 JSON) or a benchmark: {}; got {f:?}",
                            names.join(", ")
                        ),
                        &[],
                    )
                })
            })
            .transpose()
    }

    /// The language setting, parsed.
    pub fn data_language(&self) -> std::result::Result<Option<Language>, SettingError> {
        self.language
            .as_deref()
            .map(|l| {
                l.parse::<Language>().map_err(|_| {
                    SettingError::new("language", &format!("must be en or zh, got {l:?}"), &[])
                })
            })
            .transpose()
    }

    /// The ranges of the shared settings: everything that needs neither files nor a model.
    pub fn validate_settings(&self) -> std::result::Result<(), SettingError> {
        self.data_format()?;
        self.data_language()?;
        if let Some(s) = self.split.iter().find(|s| s.trim().is_empty()) {
            return Err(SettingError::new(
                "split",
                &format!("names an empty split {s:?}"),
                &[],
            ));
        }
        batch_count("micro_batch", self.micro_batch as u64)?;
        positive("learning_rate", self.learning_rate)?;
        unit_interval("adam_beta1", self.adam_beta1)?;
        unit_interval("adam_beta2", self.adam_beta2)?;
        positive("adam_epsilon", self.adam_epsilon)?;
        non_negative("weight_decay", self.weight_decay)?;
        non_negative("max_grad_norm", self.max_grad_norm)?;
        non_negative("epochs", self.epochs)?;
        if self.epochs == 0.0 && self.max_steps == 0 {
            return Err(SettingError::new(
                "epochs",
                "is 0 and so is {0}: set epochs > 0 or max_steps > 0",
                &["max_steps"],
            ));
        }
        for (key, v) in [
            ("min_pixels", self.min_pixels),
            ("max_pixels", self.max_pixels),
        ] {
            if v == Some(0) {
                return Err(SettingError::new(
                    key,
                    "must be at least 1 pixel, got 0 (leave it unset for the model's own)",
                    &[],
                ));
            }
        }
        if let (Some(lo), Some(hi)) = (self.min_pixels, self.max_pixels) {
            if lo > hi {
                return Err(SettingError::new(
                    "min_pixels",
                    &format!("({lo}) is larger than {{0}} ({hi})"),
                    &["max_pixels"],
                ));
            }
        }
        setting(parse_dtype(&self.final_dtype, "final_dtype"), "final_dtype")?;
        setting(self.compute_dtype(), "dtype")?;
        if self.lora.enabled() {
            setting(self.lora.base_dtype(), "lora.base_dtype")?;
            if self.lora.target_modules.is_empty() {
                return Err(SettingError::new(
                    "lora.target_modules",
                    "is empty: name the layers to adapt",
                    &[],
                ));
            }
            if !(0.0..1.0).contains(&self.lora.dropout) {
                return Err(SettingError::new(
                    "lora.dropout",
                    &format!("must be in [0, 1), got {}", self.lora.dropout),
                    &[],
                ));
            }
            positive("lora.alpha", self.lora.alpha)?;
        }
        Ok(())
    }
}

/// A setting out of its range, by config key: the front end that knows whether the user
/// wrote the key as a flag or in a file names it as they wrote it (`--learning-rate`,
/// `grpo.toml: learning_rate`); [`Origins::render`].
#[derive(Debug, Clone, PartialEq)]
pub struct SettingError {
    /// The config key (`learning_rate`, `lora.alpha`).
    pub key: String,
    /// What is wrong, after the key's name; `{0}`, `{1}` stand for the `related` keys.
    pub problem: String,
    /// Other keys the problem names.
    pub related: Vec<String>,
}

impl SettingError {
    pub fn new(key: &str, problem: &str, related: &[&str]) -> Self {
        Self {
            key: key.to_string(),
            problem: problem.to_string(),
            related: related.iter().map(|r| r.to_string()).collect(),
        }
    }

    /// The problem with its related keys named by `name`.
    fn problem_with(&self, name: impl Fn(&str) -> String) -> String {
        let mut p = self.problem.clone();
        for (i, r) in self.related.iter().enumerate() {
            p = p.replace(&format!("{{{i}}}"), &name(r));
        }
        p
    }
}

impl std::fmt::Display for SettingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "config: {} {}",
            self.key,
            self.problem_with(|k| k.to_string())
        )
    }
}

impl std::error::Error for SettingError {}

type Checked = std::result::Result<(), SettingError>;

/// A finite number above 0 (a learning rate, an epsilon).
pub fn positive(key: &str, v: f64) -> Checked {
    if v.is_finite() && v > 0.0 {
        return Ok(());
    }
    Err(SettingError::new(
        key,
        &format!("must be a finite number above 0, got {v}"),
        &[],
    ))
}

/// A finite number of at least 0 (a weight, a clipping norm).
pub fn non_negative(key: &str, v: f64) -> Checked {
    if v.is_finite() && v >= 0.0 {
        return Ok(());
    }
    Err(SettingError::new(
        key,
        &format!("must be a finite number of at least 0, got {v}"),
        &[],
    ))
}

/// In [0, 1): a decay rate (Adam's betas), a dropout, a clipping range below 1.
pub fn unit_interval(key: &str, v: f64) -> Checked {
    if (0.0..1.0).contains(&v) {
        return Ok(());
    }
    Err(SettingError::new(
        key,
        &format!("must be in [0, 1), got {v}"),
        &[],
    ))
}

/// Most sequences one step may hold (a batch, prompts x completions): far beyond any
/// device's memory (the paper's steps hold a few dozen), and low enough that the memory
/// plan's byte counts cannot overflow even at a 32k context and a 152k vocabulary.
pub const MAX_SEQUENCES_PER_STEP: u64 = 1 << 16;

/// A count of sequences per step: from 1 to [`MAX_SEQUENCES_PER_STEP`].
pub fn batch_count(key: &str, v: u64) -> Checked {
    at_least_one(key, v)?;
    if v > MAX_SEQUENCES_PER_STEP {
        return Err(SettingError::new(
            key,
            &format!("({v}) exceeds {MAX_SEQUENCES_PER_STEP} sequences per step"),
            &[],
        ));
    }
    Ok(())
}

/// A count that must be at least 1.
pub fn at_least_one(key: &str, v: u64) -> Checked {
    if v >= 1 {
        return Ok(());
    }
    Err(SettingError::new(key, "must be at least 1, got 0", &[]))
}

/// A check that already names its key in its message, as a [`SettingError`] for `key`.
fn setting<T>(r: Result<T>, key: &str) -> Checked {
    r.map(|_| ()).map_err(|e| {
        let text = e.to_string();
        let problem = text
            .strip_prefix(&format!("config: {key} "))
            .unwrap_or(&text)
            .to_string();
        SettingError::new(key, &problem, &[])
    })
}

/// A training method's own settings (GRPO's sampling and objective, SFT's batch size).
pub trait Method:
    Serialize + DeserializeOwned + Default + Clone + PartialEq + std::fmt::Debug
{
    /// "grpo" or "sft": the run directory's kind.
    const NAME: &'static str;
    /// The example config's header comment.
    const HEADER: &'static str;
    /// The commented example of the method's own keys.
    const EXAMPLE: &'static str;
    /// The shared keys' defaults for this method.
    fn run_defaults() -> RunConfig {
        RunConfig {
            output_dir: PathBuf::from(format!("runs/{}", Self::NAME)),
            ..RunConfig::default()
        }
    }
    /// The ranges of the method's settings (with the shared ones at hand).
    fn validate_settings(&self, run: &RunConfig) -> std::result::Result<(), SettingError>;
    /// Checks that the files the method's settings name exist.
    fn validate_files(&self) -> Result<()> {
        Ok(())
    }
    /// Clears what does not change a run's trajectory (how often to log), for the resume
    /// fingerprint.
    fn without_logging(&mut self) {}
    /// The shape of the run's passes, for the memory plan.
    fn objective(&self) -> super::plan::Objective;
    /// Settings the run's device cannot honour (checked once the device is known, before
    /// any model is loaded).
    fn check_device(&self, _device: &candle_core::Device) -> std::result::Result<(), SettingError> {
        Ok(())
    }
    /// The longest completion (GRPO) or target (SFT) the run will train on, in tokens.
    fn completion_tokens(
        &self,
        processor: &crate::processor::Processor,
        items: &[crate::data::VqaItem],
    ) -> Result<usize>;
}

/// A whole training config: the shared settings and the method's.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig<M> {
    pub run: RunConfig,
    pub method: M,
}

impl<M: Method> Default for TrainConfig<M> {
    fn default() -> Self {
        Self {
            run: M::run_defaults(),
            method: M::default(),
        }
    }
}

/// Parses `key = value  # help` lines (optionally commented out) of an example config;
/// keys under a `[section]` header are named `section.key`.
pub fn parse_example_keys(example: &str) -> Vec<(String, String)> {
    static LINE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"^#?\s*([a-z][a-z0-9_]*)\s*=\s*[^#]*?(?:#\s*(.*))?$")
            .expect("valid regex")
    });
    static SECTION: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"^\[([a-z][a-z0-9_]*)\]$").expect("valid regex")
    });
    let mut out: Vec<(String, String)> = Vec::new();
    let mut pending_help = String::new();
    let mut section = String::new();
    for line in example.lines() {
        let t = line.trim();
        if let Some(c) = SECTION.captures(t) {
            section = format!("{}.", &c[1]);
            pending_help.clear();
        } else if let Some(c) = LINE.captures(t) {
            let key = format!("{section}{}", &c[1]);
            let help = c
                .get(2)
                .map(|m| m.as_str().trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| std::mem::take(&mut pending_help));
            pending_help.clear();
            if !out.iter().any(|(k, _)| *k == key) {
                out.push((key, help));
            }
        } else if let Some(comment) = t.strip_prefix('#') {
            // The comment lines right above a key document it.
            if !pending_help.is_empty() {
                pending_help.push(' ');
            }
            pending_help.push_str(comment.trim());
        } else {
            pending_help.clear();
        }
    }
    out
}

/// Keys of a commented example (section keys as `section.key`).
fn keys_of(example: &str) -> Vec<String> {
    parse_example_keys(example)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + (ca != cb) as usize)
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The error for an unknown key: its name and the closest known one.
fn unknown_key(file: &str, key: &str, known: &[String]) -> anyhow::Error {
    let best = known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .min_by_key(|(d, _)| *d)
        .filter(|(d, k)| *d <= 3.max(k.len() / 3));
    match best {
        Some((_, k)) => anyhow::anyhow!("{file}: unknown key `{key}` (did you mean `{k}`?)"),
        None => anyhow::anyhow!("{file}: unknown key `{key}`"),
    }
}

/// Fills the keys `table` lacks from `defaults`, recursing into sections.
fn fill_missing(table: &mut toml::Table, defaults: toml::Table) {
    for (k, v) in defaults {
        match (table.get_mut(&k), v) {
            (Some(toml::Value::Table(t)), toml::Value::Table(d)) => fill_missing(t, d),
            (Some(_), _) => {}
            (None, v) => {
                table.insert(k, v);
            }
        }
    }
}

/// Where a layer of settings came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A config file (its path as given), or a resumed run's config.toml.
    File(String),
    /// Flags on the command line.
    Flags,
}

/// One layer of settings: a config file's table, or the flags' (keys as `key` or
/// `section.key`).
#[derive(Debug, Clone)]
pub struct Layer {
    pub origin: Origin,
    pub table: toml::Table,
}

impl Layer {
    /// A config file's text; `name` names it in errors.
    pub fn file(name: &str, text: &str) -> Result<Self> {
        let table: toml::Table = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{name}: invalid TOML: {}", e.message().trim()))?;
        Ok(Self {
            origin: Origin::File(name.to_string()),
            table,
        })
    }

    pub fn flags(table: toml::Table) -> Self {
        Self {
            origin: Origin::Flags,
            table,
        }
    }
}

/// A key's flag: `lora.target_modules` is `--lora-target-modules`.
pub fn flag_of(key: &str) -> String {
    format!("--{}", key.replace(['_', '.'], "-"))
}

/// Where each key of a config came from, to name it as the user wrote it.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    layers: Vec<Origin>,
    /// Key (`section.key` in sections) -> the index of the layer that set it last.
    set_by: std::collections::BTreeMap<String, usize>,
    /// Key -> its value after merging.
    values: std::collections::BTreeMap<String, toml::Value>,
}

impl Origins {
    pub fn origin(&self, key: &str) -> Option<&Origin> {
        self.set_by.get(key).and_then(|&i| self.layers.get(i))
    }

    /// A key as the user wrote it: its flag when set by one, else the key.
    pub fn name(&self, key: &str) -> String {
        match self.origin(key) {
            Some(Origin::Flags) => flag_of(key),
            _ => key.to_string(),
        }
    }

    /// A setting error's message with its key named as the user wrote it: `--epsilon-low
    /// must be ...`, `grpo.toml: epsilon_low must be ...`.
    pub fn render(&self, e: &SettingError) -> String {
        let problem = e.problem_with(|k| self.name(k));
        match self.origin(&e.key) {
            Some(Origin::Flags) => format!("{} {problem}", flag_of(&e.key)),
            Some(Origin::File(f)) => format!("{f}: {} {problem}", e.key),
            None => format!("{} {problem}", e.key),
        }
    }

    /// `e`, with a [`SettingError`] it is rendered by [`Origins::render`].
    pub fn name_settings(&self, e: anyhow::Error) -> anyhow::Error {
        match e.downcast_ref::<SettingError>() {
            Some(s) => anyhow::anyhow!(self.render(s)),
            None => e,
        }
    }

    /// Deserializes a table of settings; a value of the wrong type is named by its key as
    /// the user wrote it.
    fn deserialize<T: DeserializeOwned>(&self, table: toml::Table) -> Result<T> {
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            let key = path.split('[').next().unwrap_or(&path).to_string();
            let message = e.inner().message().trim().to_string();
            let label = match self.origin(&key) {
                Some(Origin::Flags) => flag_of(&key),
                Some(Origin::File(f)) => format!("{f}: {key}"),
                None => format!("config: {key}"),
            };
            let digits = match self.values.get(&key) {
                Some(toml::Value::String(s)) if s.bytes().all(|b| b.is_ascii_digit()) => {
                    Some(s.clone())
                }
                _ => None,
            };
            match digits {
                // A number beyond TOML's integers reaches serde as a string.
                Some(d) if !d.is_empty() && message.contains("expected u") => anyhow::anyhow!(
                    "{label}: {d} is out of range: at most {} (a TOML integer is a signed \
                     64-bit number)",
                    i64::MAX
                ),
                _ => anyhow::anyhow!("{label}: {}", plain_type_error(&message)),
            }
        })
    }
}

/// serde's "invalid type: string \"abc\", expected f64" in a user's words: "expected a
/// number, got \"abc\"".
fn plain_type_error(message: &str) -> String {
    static RE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"^invalid (?:type|value): (.*), expected (.*)$").expect("valid regex")
    });
    let Some(c) = RE.captures(message) else {
        return message.to_string();
    };
    let got = c[1]
        .trim_start_matches("string ")
        .trim_start_matches("integer ")
        .trim_start_matches("floating point ")
        .trim_start_matches("boolean ")
        .replace('`', "");
    let expected = match &c[2] {
        "f64" | "f32" => "a number",
        "u64" | "usize" | "u32" => "a whole number of at least 0",
        "a boolean" => "true or false",
        "a sequence" => "a list",
        other => other,
    };
    format!("expected {expected}, got {got}")
}

/// A table's keys flattened to `key` and `section.key`; `name` names it in errors.
fn flatten(table: toml::Table, name: &str) -> Result<Vec<(String, toml::Value)>> {
    let mut out = Vec::new();
    for (k, v) in table {
        match v {
            toml::Value::Table(t) if !k.contains('.') => {
                for (k2, v2) in t {
                    out.push((format!("{k}.{k2}"), v2));
                }
            }
            _ if k == "lora" => bail!("{name}: `lora` must be a section ([lora])"),
            v => out.push((k, v)),
        }
    }
    Ok(out)
}

/// A list setting given as one value, as flags are written: `MRI` is `["MRI"]`,
/// `accuracy,format` is `["accuracy", "format"]`, `1,0.5` is `[1, 0.5]`; `""` is empty.
fn as_list(v: toml::Value) -> toml::Value {
    let s = match v {
        toml::Value::Array(_) => return v,
        toml::Value::String(s) => s,
        // One number (`--reward-weights 0.5`) is a list of one.
        other => return toml::Value::Array(vec![other]),
    };
    let items = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(
            |x| match toml::from_str::<toml::Table>(&format!("v = {x}")) {
                Ok(mut t) => match t.remove("v") {
                    Some(v @ (toml::Value::Integer(_) | toml::Value::Float(_))) => v,
                    _ => toml::Value::String(x.to_string()),
                },
                Err(_) => toml::Value::String(x.to_string()),
            },
        )
        .collect();
    toml::Value::Array(items)
}

impl<M: Method> TrainConfig<M> {
    /// The commented default config (`--print-config`): header, shared keys, the method's
    /// keys, the `[lora]` section last (TOML sections end the top-level keys).
    pub fn example() -> &'static str {
        // One leaked string per method type, built on first use.
        static CACHE: OnceLock<std::sync::Mutex<Vec<(&'static str, &'static str)>>> =
            OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = cache.iter().find(|(n, _)| *n == M::NAME) {
            return s;
        }
        let run = RUN_EXAMPLE.replace("runs/run", &format!("runs/{}", M::NAME));
        let text: &'static str = Box::leak(
            format!("{}\n{run}\n{}{LORA_EXAMPLE}", M::HEADER, M::EXAMPLE).into_boxed_str(),
        );
        cache.push((M::NAME, text));
        text
    }

    /// Parses TOML text (`file` names it in errors) with `overrides` (a table of flag
    /// values, keys as `key` or `section.key`, which win) merged over it, and checks every
    /// setting's range.
    pub fn from_toml(text: &str, file: &str, overrides: Option<toml::Table>) -> Result<Self> {
        let mut layers = vec![Layer::file(file, text)?];
        if let Some(o) = overrides {
            layers.push(Layer::flags(o));
        }
        Ok(Self::from_layers(layers)?.0)
    }

    pub fn from_file(path: &Path, overrides: Option<toml::Table>) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read config", path.display()))?;
        Self::from_toml(&text, &path.display().to_string(), overrides)
    }

    /// The keys whose value is a list (`modalities`, `rewards`, `lora.target_modules`, ...).
    pub fn list_keys() -> Vec<String> {
        let mut out = Vec::new();
        let tables = [
            toml::Table::try_from(M::run_defaults()).unwrap_or_default(),
            toml::Table::try_from(M::default()).unwrap_or_default(),
        ];
        for t in tables {
            for (k, v) in t {
                match v {
                    toml::Value::Array(_) => out.push(k),
                    toml::Value::Table(inner) => out.extend(
                        inner
                            .into_iter()
                            .filter(|(_, v)| v.is_array())
                            .map(|(k2, _)| format!("{k}.{k2}")),
                    ),
                    _ => {}
                }
            }
        }
        out
    }

    /// The config from `layers` (config files, flags), later layers winning, with every
    /// setting's range checked; and where each key came from, to name it as the user wrote
    /// it in later errors ([`Origins::name_settings`]).
    pub fn from_layers(layers: Vec<Layer>) -> Result<(Self, Origins)> {
        let run_keys = keys_of(RUN_EXAMPLE);
        let method_keys = keys_of(M::EXAMPLE);
        let lora_keys = keys_of(LORA_EXAMPLE);
        let lists = Self::list_keys();
        let mut origins = Origins::default();
        for (i, layer) in layers.into_iter().enumerate() {
            let name = match &layer.origin {
                Origin::File(f) => f.clone(),
                Origin::Flags => "command line".to_string(),
            };
            origins.layers.push(layer.origin);
            for (key, value) in flatten(layer.table, &name)? {
                let known = if key.starts_with("lora.") {
                    lora_keys.contains(&key)
                } else {
                    run_keys.contains(&key) || method_keys.contains(&key)
                };
                if !known {
                    let all: Vec<String> = run_keys
                        .iter()
                        .chain(&method_keys)
                        .chain(&lora_keys)
                        .cloned()
                        .collect();
                    return Err(unknown_key(&name, &key, &all));
                }
                let value = if lists.contains(&key) {
                    as_list(value)
                } else {
                    value
                };
                origins.set_by.insert(key.clone(), i);
                origins.values.insert(key, value);
            }
        }
        let mut run = toml::Table::new();
        let mut method = toml::Table::new();
        for (key, value) in &origins.values {
            match key.split_once('.') {
                Some((section, k)) => {
                    let entry = run
                        .entry(section.to_string())
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    if let toml::Value::Table(t) = entry {
                        t.insert(k.to_string(), value.clone());
                    }
                }
                None if run_keys.contains(key) => {
                    run.insert(key.clone(), value.clone());
                }
                None => {
                    method.insert(key.clone(), value.clone());
                }
            }
        }
        fill_missing(&mut run, toml::Table::try_from(M::run_defaults())?);
        let run: RunConfig = origins.deserialize(run)?;
        let method: M = origins.deserialize(method)?;
        let config = Self { run, method };
        config
            .validate_settings()
            .map_err(|e| anyhow::anyhow!(origins.render(&e)))?;
        Ok((config, origins))
    }

    /// The config as TOML: the method's keys, the shared keys, the `[lora]` section.
    pub fn to_toml(&self) -> Result<String> {
        let mut t = toml::Table::try_from(&self.method)?;
        let run = toml::Table::try_from(&self.run)?;
        let mut lora = None;
        for (k, v) in run {
            if k == "lora" {
                lora = Some(v);
            } else {
                t.insert(k, v);
            }
        }
        if let Some(l) = lora {
            t.insert("lora".into(), l);
        }
        Ok(toml::to_string_pretty(&t)?)
    }

    /// Everything that can be checked before loading a model.
    pub fn validate(&self) -> Result<()> {
        self.validate_settings()?;
        self.run.validate_files()?;
        self.method.validate_files()
    }

    /// The ranges of every setting (no files read).
    pub fn validate_settings(&self) -> std::result::Result<(), SettingError> {
        self.run.validate_settings()?;
        self.method.validate_settings(&self.run)
    }

    /// A stable fingerprint of the settings that determine the run's trajectory (where
    /// files go, how often to save or log and the device do not).
    pub fn fingerprint(&self) -> Result<String> {
        Ok(fingerprint_of(&self.fingerprint_text()?))
    }

    /// The settings the fingerprint covers, as TOML: kept in each checkpoint so a resume
    /// with other settings can name them. The length of the run (`max_steps`, `epochs`) is
    /// left out: a finished run may be extended.
    pub fn fingerprint_text(&self) -> Result<String> {
        let mut c = self.clone();
        c.run.output_dir = PathBuf::new();
        c.run.save_steps = 0;
        c.run.save_total_limit = 0;
        c.run.device = None;
        c.run.memory_check = true;
        c.run.max_steps = 0;
        c.run.epochs = 1.0;
        c.method.without_logging();
        c.to_toml()
    }
}

/// Merges flag values over the file's table; `section.key` flags go into their section.
pub fn merge_overrides(table: &mut toml::Table, overrides: toml::Table) {
    for (k, v) in overrides {
        match k.split_once('.') {
            Some((section, key)) => {
                let entry = table
                    .entry(section.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(t) = entry {
                    t.insert(key.to_string(), v);
                }
            }
            None => {
                table.insert(k, v);
            }
        }
    }
}

/// FNV-1a of a config's text: a stable fingerprint to refuse resuming changed settings.
pub fn fingerprint_of(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The settings that differ between two fingerprint texts, as `key (A in the checkpoint, B
/// now)`, section keys as `section.key`.
pub fn changed_settings(checkpoint: &str, now: &str) -> Vec<String> {
    fn flat(text: &str) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(t) = text.parse::<toml::Table>() {
            for (k, v) in t {
                match v {
                    toml::Value::Table(inner) => {
                        for (k2, v2) in inner {
                            out.insert(format!("{k}.{k2}"), v2.to_string());
                        }
                    }
                    v => {
                        out.insert(k, v.to_string());
                    }
                }
            }
        }
        out
    }
    let (a, b) = (flat(checkpoint), flat(now));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "unset".into());
            format!(
                "{k} ({} in the checkpoint, {} now)",
                show(a.get(k)),
                show(b.get(k))
            )
        })
        .collect()
}
