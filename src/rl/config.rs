//! `grpo.toml`: every setting of a GRPO run, MedVLM-R1's values as defaults. Unknown keys
//! are errors (a typo must not silently train with a default), and the whole config is
//! checked before any work starts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::grpo::{LossConfig, LossType, ScaleRewards};
use super::reward::AnswerMode;
use crate::data::PromptTemplate;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Checkpoint directory to start from (Hugging Face layout). Required.
    pub model: PathBuf,
    /// Training data: the MedVLM-R1 JSON format or JSON lines. Required.
    pub train_data: PathBuf,
    /// Root for the rows' relative image paths (default: the data file's directory).
    pub image_root: Option<PathBuf>,
    /// Keep only these modalities (e.g. ["MRI"]); empty keeps all.
    pub modalities: Vec<String>,
    /// Held-out data evaluated with greedy decoding every `eval_steps` (optional).
    pub eval_data: Option<PathBuf>,
    pub eval_steps: u64,
    /// Evaluate at most this many held-out items (0 = all).
    pub eval_limit: usize,
    /// Run directory: config, metrics, completions, checkpoints.
    pub output_dir: PathBuf,
    /// "paper" (think/answer, the default) or "simple".
    pub template: PromptTemplate,
    pub min_pixels: Option<usize>,
    /// MedVLM-R1 trains with 401408.
    pub max_pixels: Option<usize>,

    /// Completions sampled per prompt (G).
    pub num_generations: usize,
    /// Prompts per optimizer step (B).
    pub batch_prompts: usize,
    /// Completions per forward/backward pass (gradient accumulation splits the step).
    pub micro_batch: usize,
    pub max_completion_length: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,

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
    /// Optimizer steps per generated batch (mu in the GRPO paper); >1 activates clipping.
    pub num_iterations: u64,

    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    pub mask_truncated_completions: bool,

    /// Reward functions, summed: "accuracy", "format".
    pub rewards: Vec<String>,
    /// One weight per reward (default all 1).
    pub reward_weights: Vec<f32>,
    /// "strict" (default) or "paper" accuracy rule.
    pub answer_mode: AnswerMode,

    /// Train only the language model and the merger.
    pub freeze_vision: bool,
    /// Save a checkpoint every this many optimizer steps (0 = only at the end).
    pub save_steps: u64,
    /// dtype of the final exported model: "f32" or "bf16" (checkpoints stay f32 so
    /// resuming is exact).
    pub final_dtype: String,
    /// Completions per step written to completions.jsonl.
    pub log_completions: usize,
    pub seed: u64,
    /// "cpu", "cuda" or "cuda:N" (default: CUDA when available).
    pub device: Option<String>,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            train_data: PathBuf::new(),
            image_root: None,
            modalities: vec![],
            eval_data: None,
            eval_steps: 0,
            eval_limit: 0,
            output_dir: PathBuf::from("runs/grpo"),
            template: PromptTemplate::Paper,
            min_pixels: None,
            max_pixels: Some(401_408),
            num_generations: 4,
            batch_prompts: 1,
            micro_batch: 4,
            max_completion_length: 512,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            learning_rate: 1e-6,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            epochs: 1.0,
            max_steps: 0,
            num_iterations: 1,
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            loss_type: LossType::Grpo,
            scale_rewards: ScaleRewards::Group,
            mask_truncated_completions: false,
            rewards: vec!["accuracy".into(), "format".into()],
            reward_weights: vec![],
            answer_mode: AnswerMode::Strict,
            freeze_vision: false,
            save_steps: 50,
            final_dtype: "f32".into(),
            log_completions: 2,
            seed: 42,
            device: None,
        }
    }
}

impl GrpoConfig {
    /// Parses TOML text (`file` names it in errors) merged with `overrides` (a TOML table
    /// of flag values, which win).
    pub fn from_toml(text: &str, file: &str, overrides: Option<toml::Table>) -> Result<Self> {
        parse_toml(text, file, overrides)
    }

    pub fn from_file(path: &Path, overrides: Option<toml::Table>) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read config", path.display()))?;
        Self::from_toml(&text, &path.display().to_string(), overrides)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Everything that can be checked before loading a model.
    pub fn validate(&self) -> Result<()> {
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
        if !self.train_data.is_file() {
            bail!(
                "config: train_data {}: no such file",
                self.train_data.display()
            );
        }
        if let Some(e) = &self.eval_data {
            if !e.is_file() {
                bail!("config: eval_data {}: no such file", e.display());
            }
        }
        if self.num_generations < 2 {
            bail!(
                "config: num_generations must be at least 2 (GRPO compares completions of the \
                 same prompt), got {}",
                self.num_generations
            );
        }
        if self.batch_prompts == 0 || self.micro_batch == 0 || self.max_completion_length == 0 {
            bail!("config: batch_prompts, micro_batch and max_completion_length must be positive");
        }
        if self.num_iterations == 0 {
            bail!("config: num_iterations must be at least 1");
        }
        if !self.save_steps.is_multiple_of(self.num_iterations) {
            bail!(
                "config: save_steps ({}) must be a multiple of num_iterations ({}): checkpoints \
                 are taken between generated batches so a resumed run is exact",
                self.save_steps,
                self.num_iterations
            );
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            bail!("config: temperature must be positive for GRPO sampling");
        }
        if self.learning_rate < 0.0
            || self.beta < 0.0
            || self.epsilon_low < 0.0
            || self.epsilon_high < 0.0
        {
            bail!("config: learning_rate, beta and epsilons must be non-negative");
        }
        if self.epochs <= 0.0 && self.max_steps == 0 {
            bail!("config: set epochs > 0 or max_steps > 0");
        }
        if self.rewards.is_empty() {
            bail!("config: at least one reward is needed");
        }
        for r in &self.rewards {
            if !matches!(r.as_str(), "accuracy" | "format") {
                bail!("config: unknown reward {r:?} (built in: \"accuracy\", \"format\")");
            }
        }
        if !self.reward_weights.is_empty() && self.reward_weights.len() != self.rewards.len() {
            bail!(
                "config: {} reward weights for {} rewards",
                self.reward_weights.len(),
                self.rewards.len()
            );
        }
        if !matches!(self.final_dtype.as_str(), "f32" | "bf16") {
            bail!(
                "config: final_dtype must be \"f32\" or \"bf16\", got {:?}",
                self.final_dtype
            );
        }
        Ok(())
    }

    pub fn loss(&self) -> LossConfig {
        LossConfig {
            loss_type: self.loss_type,
            beta: self.beta,
            epsilon_low: self.epsilon_low,
            epsilon_high: self.epsilon_high,
            scale_rewards: self.scale_rewards,
            mask_truncated_completions: self.mask_truncated_completions,
            max_completion_length: self.max_completion_length,
            temperature: self.temperature as f64,
        }
    }

    /// A stable fingerprint of the settings that determine the run's trajectory.
    pub fn fingerprint(&self) -> Result<String> {
        let mut c = self.clone();
        // Where files live and how often to log or save do not change the trajectory.
        c.output_dir = PathBuf::new();
        c.save_steps = 0;
        c.log_completions = 0;
        c.device = None;
        fingerprint_of(&c.to_toml()?)
    }
}

/// Parses a TOML config (`file` names it in errors) with `overrides` (a table of flag
/// values) merged over it; unknown keys and wrong types are errors.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
    overrides: Option<toml::Table>,
) -> Result<T> {
    let mut table: toml::Table =
        toml::from_str(text).with_context(|| format!("{file}: invalid TOML"))?;
    if let Some(o) = overrides {
        for (k, v) in o {
            table.insert(k, v);
        }
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("{file}: {}", e.message().trim()))
}

/// FNV-1a of a config's text: a stable fingerprint to refuse resuming changed settings.
pub fn fingerprint_of(text: &str) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(format!("{h:016x}"))
}

/// The commented default config written by `medvlm train grpo --print-config`.
pub const EXAMPLE_CONFIG: &str = include_str!("grpo.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_to_the_defaults() {
        let c = GrpoConfig::from_toml(EXAMPLE_CONFIG, "example", None).unwrap();
        let d = GrpoConfig {
            model: c.model.clone(),
            train_data: c.train_data.clone(),
            ..GrpoConfig::default()
        };
        assert_eq!(c, d);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = GrpoConfig::from_toml("lerning_rate = 1e-5", "x.toml", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("lerning_rate"), "{e}");
        let e = GrpoConfig::from_toml("loss_type = \"ppo\"", "x.toml", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ppo"), "{e}");
        let mut o = toml::Table::new();
        o.insert("num_generations".into(), toml::Value::Integer(8));
        let c = GrpoConfig::from_toml("num_generations = 2", "x.toml", Some(o)).unwrap();
        assert_eq!(c.num_generations, 8, "flags win over the file");
    }
}
