//! `grpo.toml`: every setting of a GRPO run, MedVLM-R1's values as defaults: the shared
//! run settings ([`RunConfig`]) and GRPO's own ([`GrpoMethod`]).

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::external::{check_url, JudgeSpec, DEFAULT_TIMEOUT_S};
use super::grpo::{ImportanceSamplingLevel, LossConfig, LossType, ScaleRewards};
use super::reward::{
    builtin_names, AccuracyReward, AnswerMode, BUILTIN, DEFAULT_CLOSED_PROTOCOL,
    DEFAULT_OPEN_PROTOCOL,
};
use crate::data::score::Protocol;
use crate::kernels::quant::QuantKind;
use crate::train::config::{
    at_least_one, batch_count, non_negative, positive, unit_interval, Method, RunConfig,
    SettingError, TrainConfig, MAX_SEQUENCES_PER_STEP,
};

/// A GRPO run's whole configuration.
pub type GrpoConfig = TrainConfig<GrpoMethod>;

/// GRPO's own settings: held-out evaluation, sampling, the objective, rewards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoMethod {
    /// Held-out data evaluated with greedy decoding every `eval_steps` (optional).
    pub eval_data: Option<PathBuf>,
    pub eval_steps: u64,
    /// Evaluate at most this many held-out items (0 = all).
    pub eval_limit: usize,
    /// Benchmarks: the splits of eval_data to read (all when empty); `format` and `language`
    /// apply to it as to train_data.
    pub eval_split: Vec<String>,

    /// Completions sampled per prompt (G).
    pub num_generations: usize,
    /// Prompts per optimizer step (B).
    pub batch_prompts: usize,
    pub max_completion_length: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    /// Optimizer steps per generated batch (mu in the GRPO paper); >1 activates clipping.
    pub num_iterations: u64,

    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    pub mask_truncated_completions: bool,
    /// "token" (GRPO's per-token ratio) or "sequence" (GSPO's per-completion ratio), TRL's
    /// `importance_sampling_level`.
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// TRL's `top_entropy_quantile` (ρ): the policy-gradient term only for tokens whose
    /// entropy is in the top ρ of the micro-batch's; 1.0 = all tokens.
    pub top_entropy_quantile: f64,

    /// Reward functions, summed: built-in names ("accuracy", "format", ...) or tables for a
    /// command, an HTTP endpoint or an LLM judge ([`RewardEntry`]).
    pub rewards: Vec<RewardEntry>,
    /// One weight per reward (default all 1, or each table's `weight`).
    pub reward_weights: Vec<f32>,
    /// The `numeric` reward's relative tolerance.
    pub numeric_tolerance: f64,
    /// DAPO's dynamic sampling: groups whose rewards all agree carry no signal; drop them and
    /// sample more prompts until `batch_prompts` groups remain.
    pub dynamic_sampling: bool,
    /// Dynamic sampling: at most this many generation batches per step (the first one
    /// included) before the run stops, as verl's `max_num_gen_batches`.
    pub max_generation_batches: u64,
    /// "strict" (default) or "paper" accuracy rule (multiple choice).
    pub answer_mode: AnswerMode,
    /// The accuracy reward's protocol for closed questions.
    pub closed_reward_protocol: Protocol,
    /// The accuracy reward's protocol for open questions.
    pub open_reward_protocol: Protocol,
    /// Completions per step written to completions.jsonl.
    pub log_completions: usize,
    /// Full fine-tuning with a KL term (beta > 0, no LoRA): keep the reference model
    /// weight-quantized in this format (`q8_0`, `q4_1`, `q4_k`, `q6_k`; `none` or unset: as the policy's
    /// dtype), built as `--quantize` builds an inference model. CPU only. Not written when
    /// unset, so the settings of runs from before it existed read the same on resume.
    #[serde(with = "quant_setting", skip_serializing_if = "Option::is_none")]
    pub reference_quantize: Option<QuantKind>,
}

/// `reference_quantize` as written: `"none"` or a format's name ([`QuantKind::name`]).
mod quant_setting {
    use super::QuantKind;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<QuantKind>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.map_or("none", QuantKind::name))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<QuantKind>, D::Error> {
        let text = String::deserialize(d)?;
        if text == "none" {
            return Ok(None);
        }
        QuantKind::from_name(&text).map(Some).ok_or_else(|| {
            let names: Vec<String> = QuantKind::ALL
                .iter()
                .map(|k| format!("`{}`", k.name()))
                .collect();
            let (last, rest) = names.split_last().expect("formats");
            D::Error::custom(format!(
                "unknown variant `{text}`, expected `none`, {} or {last}",
                rest.join(", ")
            ))
        })
    }
}

impl Default for GrpoMethod {
    fn default() -> Self {
        Self {
            eval_data: None,
            eval_steps: 0,
            eval_limit: 0,
            eval_split: vec![],
            num_generations: 4,
            batch_prompts: 1,
            max_completion_length: 512,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            num_iterations: 1,
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            loss_type: LossType::Grpo,
            scale_rewards: ScaleRewards::Group,
            mask_truncated_completions: false,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            top_entropy_quantile: 1.0,
            rewards: vec![
                RewardEntry::Builtin("accuracy".into()),
                RewardEntry::Builtin("format".into()),
            ],
            reward_weights: vec![],
            numeric_tolerance: 0.01,
            dynamic_sampling: false,
            max_generation_batches: 10,
            answer_mode: AnswerMode::Strict,
            closed_reward_protocol: DEFAULT_CLOSED_PROTOCOL,
            open_reward_protocol: DEFAULT_OPEN_PROTOCOL,
            log_completions: 2,
            reference_quantize: None,
        }
    }
}

impl Method for GrpoMethod {
    const NAME: &'static str = "grpo";
    const HEADER: &'static str =
        "# medvlm GRPO run configuration. Every key can also be given as a flag\n\
        # (`--learning-rate 1e-5`, `--lora-r 16`), which wins over this file. Defaults are\n\
        # MedVLM-R1's settings.";
    const EXAMPLE: &'static str = include_str!("grpo.example.toml");

    fn validate_files(&self) -> Result<()> {
        if let Some(e) = &self.eval_data {
            // A benchmark as downloaded is a folder.
            if !e.is_dir() && !crate::processor::input::is_regular_file(e, "eval_data")? {
                bail!("config: eval_data {}: no such file or folder", e.display());
            }
        }
        Ok(())
    }

    fn validate_settings(&self, run: &RunConfig) -> std::result::Result<(), SettingError> {
        if self.num_generations < 2 {
            return Err(SettingError::new(
                "num_generations",
                &format!(
                    "must be at least 2 (GRPO compares completions of the same prompt), got {}",
                    self.num_generations
                ),
                &[],
            ));
        }
        batch_count("batch_prompts", self.batch_prompts as u64)?;
        let sequences = (self.batch_prompts as u64).saturating_mul(self.num_generations as u64);
        if sequences > MAX_SEQUENCES_PER_STEP {
            return Err(SettingError::new(
                "num_generations",
                &format!(
                    "({}) x {{0}} ({}) is {sequences} sequences per step; at most \
                     {MAX_SEQUENCES_PER_STEP}",
                    self.num_generations, self.batch_prompts
                ),
                &["batch_prompts"],
            ));
        }
        at_least_one("max_completion_length", self.max_completion_length as u64)?;
        at_least_one("num_iterations", self.num_iterations)?;
        if !run.save_steps.is_multiple_of(self.num_iterations) {
            return Err(SettingError::new(
                "save_steps",
                &format!(
                    "({}) must be a multiple of {{0}} ({}): checkpoints are taken between \
                     generated batches so a resumed run is exact",
                    run.save_steps, self.num_iterations
                ),
                &["num_iterations"],
            ));
        }
        positive("temperature", self.temperature as f64)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SettingError::new(
                "top_p",
                &format!("must be in (0, 1], got {}", self.top_p),
                &[],
            ));
        }
        non_negative("beta", self.beta)?;
        // The clipped ratio's floor is 1 - epsilon_low: at 1 or above it is not positive.
        unit_interval("epsilon_low", self.epsilon_low)?;
        non_negative("epsilon_high", self.epsilon_high)?;
        if !(self.top_entropy_quantile > 0.0 && self.top_entropy_quantile <= 1.0) {
            return Err(SettingError::new(
                "top_entropy_quantile",
                &format!(
                    "must be in (0, 1] (1 = every token), got {}",
                    self.top_entropy_quantile
                ),
                &[],
            ));
        }
        if self.rewards.is_empty() {
            return Err(SettingError::new(
                "rewards",
                &format!(
                    "is empty: at least one reward is needed (built in: {})",
                    builtin_names()
                ),
                &[],
            ));
        }
        let mut names: Vec<String> = Vec::new();
        for (k, r) in self.rewards.iter().enumerate() {
            let name = r
                .check()
                .map_err(|e| SettingError::new("rewards", &format!("entry {}: {e}", k + 1), &[]))?;
            if names.contains(&name) {
                return Err(SettingError::new(
                    "rewards",
                    &format!(
                        "names {name:?} twice; give each reward its own `name` (metrics are \
                         logged by name)"
                    ),
                    &[],
                ));
            }
            names.push(name);
        }
        if !self.reward_weights.is_empty() {
            if self.reward_weights.len() != self.rewards.len() {
                return Err(SettingError::new(
                    "reward_weights",
                    &format!(
                        "has {} weights for {} rewards ({{0}})",
                        self.reward_weights.len(),
                        self.rewards.len()
                    ),
                    &["rewards"],
                ));
            }
            if self.rewards.iter().any(|r| r.weight().is_some()) {
                return Err(SettingError::new(
                    "reward_weights",
                    "is given and so is a `weight` in {0}; say the weights in one place",
                    &["rewards"],
                ));
            }
        }
        if !(self.numeric_tolerance.is_finite() && self.numeric_tolerance >= 0.0) {
            return Err(SettingError::new(
                "numeric_tolerance",
                &format!(
                    "must be a non-negative number, got {}",
                    self.numeric_tolerance
                ),
                &[],
            ));
        }
        if !(1..=1000).contains(&self.max_generation_batches) {
            return Err(SettingError::new(
                "max_generation_batches",
                &format!(
                    "must be between 1 and 1000, got {}",
                    self.max_generation_batches
                ),
                &[],
            ));
        }
        if !self.eval_split.is_empty() && self.eval_data.is_none() {
            return Err(SettingError::new(
                "eval_split",
                "is set but {0} is not",
                &["eval_data"],
            ));
        }
        if !self.closed_reward_protocol.is_closed() {
            return Err(SettingError::new(
                "closed_reward_protocol",
                &format!(
                    "{} is not a closed-question protocol; one of {}",
                    self.closed_reward_protocol,
                    Protocol::names_where(Protocol::is_closed)
                ),
                &[],
            ));
        }
        if !self.open_reward_protocol.is_open() {
            return Err(SettingError::new(
                "open_reward_protocol",
                &format!(
                    "{} is not an open-question protocol; one of {}",
                    self.open_reward_protocol,
                    Protocol::names_where(Protocol::is_open)
                ),
                &[],
            ));
        }
        if let Some(kind) = self.reference_quantize {
            // A setting that would do nothing is refused, as a typo would be: the user
            // expects the memory it saves.
            if self.beta == 0.0 {
                return Err(SettingError::new(
                    "reference_quantize",
                    &format!(
                        "({}) is set but {{0}} is 0: the run keeps no reference model to \
                         quantize; drop it or set beta above 0",
                        kind.name()
                    ),
                    &["beta"],
                ));
            }
            if run.lora.enabled() {
                return Err(SettingError::new(
                    "reference_quantize",
                    &format!(
                        "({}) is set but so is {{0}}: under LoRA the reference is the frozen \
                         base with the adapters off, shared with the policy, not a copy to \
                         quantize; drop it (lora.base_dtype sets the base's storage)",
                        kind.name()
                    ),
                    &["lora.r"],
                ));
            }
        }
        if let Some(w) = self
            .reward_weights
            .iter()
            .copied()
            .chain(self.rewards.iter().filter_map(RewardEntry::weight))
            .find(|w| !w.is_finite())
        {
            return Err(SettingError::new(
                "reward_weights",
                &format!("must be finite numbers, got {w}"),
                &[],
            ));
        }
        Ok(())
    }

    fn without_logging(&mut self) {
        self.log_completions = 0;
    }

    fn objective(&self) -> crate::train::plan::Objective {
        crate::train::plan::Objective::Grpo {
            prompts: self.batch_prompts,
            group: self.num_generations,
            beta: self.beta != 0.0,
            iterations: self.num_iterations,
            reference_quantize: self.reference_quantize,
        }
    }

    fn check_device(&self, device: &candle_core::Device) -> std::result::Result<(), SettingError> {
        match self.reference_quantize {
            Some(kind) if !device.is_cpu() => Err(SettingError::new(
                "reference_quantize",
                &format!(
                    "({}): quantized models run on the CPU only and this run's device is {}; \
                     drop it on a GPU",
                    kind.name(),
                    crate::device::name(device)
                ),
                &[],
            )),
            _ => Ok(()),
        }
    }

    fn completion_tokens(
        &self,
        _processor: &crate::processor::Processor,
        _items: &[crate::data::VqaItem],
    ) -> Result<usize> {
        Ok(self.max_completion_length)
    }
}

/// One reward of a run: a built-in name, or a table describing a reward (built-in,
/// command, HTTP endpoint or LLM judge) with its name and weight.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RewardEntry {
    Builtin(String),
    Spec(Box<RewardSpec>),
}

/// A reward described by a table (`{ name = "brevity", command = ["python3", "r.py"] }`).
/// Exactly one of `builtin`, `command`, `url` and `judge`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// How metrics and completions.jsonl name it (a built-in's own name by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub builtin: Option<String>,
    /// A program and its arguments (a list, or one string split at spaces), started once
    /// in the directory medvlm runs in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandLine>,
    /// A reward server's URL (http://).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<f32>,
    /// Seconds a command or server may take for a step, a judge for one completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
}

/// A command as a list of arguments or one string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    Args(Vec<String>),
    Line(String),
}

impl CommandLine {
    pub fn argv(&self) -> Vec<String> {
        match self {
            CommandLine::Args(a) => a.clone(),
            CommandLine::Line(l) => l.split_whitespace().map(str::to_string).collect(),
        }
    }
}

impl<'de> Deserialize<'de> for RewardEntry {
    /// A string, or a table read field by field so that a misspelt key is named (an untagged
    /// enum would only say that nothing matched).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(RewardEntry::Builtin(s)),
            v @ toml::Value::Table(_) => RewardSpec::deserialize(v)
                .map(|s| RewardEntry::Spec(Box::new(s)))
                .map_err(serde::de::Error::custom),
            other => Err(serde::de::Error::custom(format!(
                "a reward is a built-in name or a table, not {}",
                other.type_str()
            ))),
        }
    }
}

impl RewardEntry {
    /// Its table, a bare name being a built-in.
    pub fn spec(&self) -> RewardSpec {
        match self {
            RewardEntry::Builtin(n) => RewardSpec {
                builtin: Some(n.clone()),
                ..Default::default()
            },
            RewardEntry::Spec(s) => (**s).clone(),
        }
    }

    pub fn weight(&self) -> Option<f32> {
        match self {
            RewardEntry::Builtin(_) => None,
            RewardEntry::Spec(s) => s.weight,
        }
    }

    /// Checks the entry and returns the name it goes by.
    pub fn check(&self) -> std::result::Result<String, String> {
        let s = self.spec();
        let kinds = [
            s.builtin.is_some(),
            s.command.is_some(),
            s.url.is_some(),
            s.judge.is_some(),
        ];
        if kinds.iter().filter(|&&k| k).count() != 1 {
            return Err("needs exactly one of `builtin`, `command`, `url`, `judge`".to_string());
        }
        if let Some(b) = &s.builtin {
            if !BUILTIN.iter().any(|(n, _)| n == b) {
                return Err(format!(
                    "unknown reward {b:?} (built in: {})",
                    builtin_names()
                ));
            }
            return Ok(s.name.clone().unwrap_or_else(|| b.clone()));
        }
        let Some(name) = s.name.clone().filter(|n| !n.trim().is_empty()) else {
            return Err("a command, url or judge reward needs a `name`".to_string());
        };
        if name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(format!(
                "name {name:?}: it names a file in the run directory, so no slashes or \
                 leading dot"
            ));
        }
        if let Some(c) = &s.command {
            if c.argv().is_empty() {
                return Err(format!("{name}: `command` is empty"));
            }
        }
        if let Some(u) = &s.url {
            check_url(u).map_err(|e| format!("{name}: {e}"))?;
        }
        if let Some(j) = &s.judge {
            j.validate().map_err(|e| format!("{name}: {e}"))?;
        }
        if let Some(t) = s.timeout_s {
            if !(t.is_finite() && t > 0.0) {
                return Err(format!("{name}: timeout_s must be a positive number"));
            }
        }
        Ok(name)
    }

    /// The timeout in seconds.
    pub fn timeout_s(&self) -> f64 {
        self.spec().timeout_s.unwrap_or(DEFAULT_TIMEOUT_S)
    }
}

impl GrpoConfig {
    /// The accuracy reward these settings describe.
    pub fn accuracy_reward(&self) -> AccuracyReward {
        AccuracyReward {
            mode: self.method.answer_mode,
            closed: self.method.closed_reward_protocol,
            open: self.method.open_reward_protocol,
        }
    }

    pub fn loss(&self) -> LossConfig {
        let m = &self.method;
        LossConfig {
            loss_type: m.loss_type,
            beta: m.beta,
            epsilon_low: m.epsilon_low,
            epsilon_high: m.epsilon_high,
            scale_rewards: m.scale_rewards,
            mask_truncated_completions: m.mask_truncated_completions,
            max_completion_length: m.max_completion_length,
            temperature: m.temperature as f64,
            importance_sampling_level: m.importance_sampling_level,
            top_entropy_quantile: m.top_entropy_quantile,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_to_the_defaults() {
        let c = GrpoConfig::from_toml(GrpoConfig::example(), "example", None).unwrap();
        let mut d = GrpoConfig::default();
        d.run.model = c.run.model.clone();
        d.run.train_data = c.run.train_data.clone();
        assert_eq!(c, d);
        // And the config a run writes reads back to itself.
        let again = GrpoConfig::from_toml(&c.to_toml().unwrap(), "written", None).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = GrpoConfig::from_toml("lerning_rate = 1e-5", "x.toml", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.toml") && e.contains("lerning_rate") && e.contains("`learning_rate`"),
            "{e}"
        );
        let e = GrpoConfig::from_toml("[lora]\nrank = 8", "x.toml", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora.rank"), "{e}");
        let e = GrpoConfig::from_toml("loss_type = \"ppo\"", "x.toml", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ppo"), "{e}");
        let mut o = toml::Table::new();
        o.insert("num_generations".into(), toml::Value::Integer(8));
        o.insert("lora.r".into(), toml::Value::Integer(16));
        let c =
            GrpoConfig::from_toml("num_generations = 2\n[lora]\nr = 4", "x.toml", Some(o)).unwrap();
        assert_eq!(c.method.num_generations, 8, "flags win over the file");
        assert_eq!(c.run.lora.r, 16, "section flags too");
        assert_eq!(
            c.run.lora.alpha, 16.0,
            "unset section keys keep their defaults"
        );
    }

    fn flags(pairs: &[(&str, &str)]) -> toml::Table {
        pairs
            .iter()
            .map(|(k, v)| {
                let value = match toml::from_str::<toml::Table>(&format!("v = {v}")) {
                    Ok(mut t) => t.remove("v").unwrap(),
                    Err(_) => toml::Value::String(v.to_string()),
                };
                (k.to_string(), value)
            })
            .collect()
    }

    fn err(file: &str, pairs: &[(&str, &str)]) -> String {
        GrpoConfig::from_toml(file, "run.toml", Some(flags(pairs)))
            .unwrap_err()
            .to_string()
    }

    /// Every numeric setting's range, named as the user wrote it: a flag as the flag, a
    /// file's key with the file.
    #[test]
    fn out_of_range_settings_are_named_as_written() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "learning_rate",
                "inf",
                "--learning-rate must be a finite number above 0, got inf",
            ),
            (
                "learning_rate",
                "nan",
                "--learning-rate must be a finite number above 0, got NaN",
            ),
            (
                "learning_rate",
                "0",
                "--learning-rate must be a finite number above 0, got 0",
            ),
            (
                "adam_beta1",
                "1.5",
                "--adam-beta1 must be in [0, 1), got 1.5",
            ),
            ("adam_beta2", "1.0", "--adam-beta2 must be in [0, 1), got 1"),
            (
                "adam_epsilon",
                "0",
                "--adam-epsilon must be a finite number above 0",
            ),
            (
                "weight_decay",
                "-0.1",
                "--weight-decay must be a finite number of at least 0",
            ),
            (
                "max_grad_norm",
                "inf",
                "--max-grad-norm must be a finite number of at least 0",
            ),
            (
                "epochs",
                "nan",
                "--epochs must be a finite number of at least 0",
            ),
            ("micro_batch", "0", "--micro-batch must be at least 1"),
            ("max_pixels", "0", "--max-pixels must be at least 1 pixel"),
            ("epsilon_low", "2", "--epsilon-low must be in [0, 1), got 2"),
            (
                "epsilon_high",
                "-1",
                "--epsilon-high must be a finite number of at least 0",
            ),
            (
                "beta",
                "-inf",
                "--beta must be a finite number of at least 0",
            ),
            (
                "temperature",
                "0",
                "--temperature must be a finite number above 0",
            ),
            ("top_p", "0", "--top-p must be in (0, 1], got 0"),
            (
                "top_entropy_quantile",
                "0",
                "--top-entropy-quantile must be in (0, 1] (1 = every token), got 0",
            ),
            (
                "top_entropy_quantile",
                "1.5",
                "--top-entropy-quantile must be in (0, 1] (1 = every token), got 1.5",
            ),
            (
                "top_entropy_quantile",
                "nan",
                "--top-entropy-quantile must be in (0, 1] (1 = every token), got NaN",
            ),
            (
                "importance_sampling_level",
                "seq",
                "--importance-sampling-level: unknown variant `seq`, expected `token` or \
                 `sequence`",
            ),
            ("top_p", "1.5", "--top-p must be in (0, 1], got 1.5"),
            ("num_iterations", "0", "--num-iterations must be at least 1"),
            (
                "batch_prompts",
                "100000000",
                "--batch-prompts (100000000) exceeds 65536",
            ),
            (
                "reward_weights",
                "nan",
                "--reward-weights must be finite numbers, got NaN",
            ),
            (
                "reward_weights",
                "1,2,3",
                "--reward-weights has 3 weights for 2 rewards (rewards)",
            ),
            (
                "save_steps",
                "3",
                "--save-steps (3) must be a multiple of --num-iterations (2)",
            ),
        ];
        for (key, value, want) in cases {
            let mut pairs = vec![(*key, *value)];
            if *key == "save_steps" {
                pairs.push(("num_iterations", "2"));
            }
            if *value == "nan" && *key == "reward_weights" {
                pairs.push(("rewards", "accuracy"));
            }
            let e = err("", &pairs);
            assert!(e.contains(want), "{key} = {value}: {e}");
        }
        // A related key set in the file is named as the file's key.
        let e = err("num_iterations = 2\n", &[("save_steps", "3")]);
        assert!(e.contains("multiple of num_iterations (2)"), "{e}");
        // The same key from a file: the file and the key.
        let e = err("epsilon_low = 2.0\n", &[]);
        assert_eq!(e, "run.toml: epsilon_low must be in [0, 1), got 2");
        let e = err("[lora]\nr = 4\ndropout = 1.0\n", &[]);
        assert_eq!(e, "run.toml: lora.dropout must be in [0, 1), got 1");
        let e = err("", &[("lora.r", "4"), ("lora.alpha", "0")]);
        assert!(e.starts_with("--lora-alpha must be"), "{e}");
    }

    #[test]
    fn wrong_types_and_huge_seeds_name_the_flag() {
        let e = err("", &[("learning_rate", "abc")]);
        assert_eq!(e, "--learning-rate: expected a number, got \"abc\"");
        let e = err("learning_rate = \"abc\"\n", &[]);
        assert_eq!(e, "run.toml: learning_rate: expected a number, got \"abc\"");
        let e = err("", &[("seed", "18446744073709551615")]);
        assert!(
            e.starts_with(
                "--seed: 18446744073709551615 is out of range: at most 9223372036854775807"
            ),
            "{e}"
        );
        let e = err("", &[("micro_batch", "-1")]);
        assert!(
            e.starts_with("--micro-batch: expected a whole number"),
            "{e}"
        );
        // The largest seed TOML holds round-trips through the config a run writes.
        let c = GrpoConfig::from_toml("", "x", Some(flags(&[("seed", "9223372036854775807")])))
            .unwrap();
        let again = GrpoConfig::from_toml(&c.to_toml().unwrap(), "written", None).unwrap();
        assert_eq!(again.run.seed, i64::MAX as u64);
    }

    /// List keys take one value, comma-separated values or a TOML array, from flags and
    /// files alike.
    #[test]
    fn lists_take_one_value_commas_or_arrays() {
        let c =
            |pairs: &[(&str, &str)]| GrpoConfig::from_toml("", "x", Some(flags(pairs))).unwrap();
        assert_eq!(c(&[("modalities", "MRI")]).run.modalities, vec!["MRI"]);
        assert_eq!(
            c(&[("modalities", "MRI, CT")]).run.modalities,
            vec!["MRI", "CT"]
        );
        assert_eq!(
            c(&[("modalities", "[\"X-Ray\"]")]).run.modalities,
            vec!["X-Ray"]
        );
        assert!(c(&[("modalities", "")]).run.modalities.is_empty());
        let g = c(&[("rewards", "accuracy,format"), ("reward_weights", "1,0.5")]);
        assert_eq!(
            g.method.rewards,
            ["accuracy", "format"].map(|n| RewardEntry::Builtin(n.into()))
        );
        assert_eq!(g.method.reward_weights, vec![1.0, 0.5]);
        assert_eq!(
            c(&[("lora.target_modules", "q_proj")])
                .run
                .lora
                .target_modules,
            vec!["q_proj"]
        );
        let f = GrpoConfig::from_toml("modalities = \"CT\"\n", "x", None).unwrap();
        assert_eq!(f.run.modalities, vec!["CT"]);
        let mut keys = GrpoConfig::list_keys();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                "eval_split",
                "lora.target_modules",
                "modalities",
                "reward_weights",
                "rewards",
                "split"
            ]
        );
    }

    /// The data settings and the reward protocols: parsed, checked, named as written.
    #[test]
    fn data_settings_and_reward_protocols() {
        let c = GrpoConfig::from_toml(
            "format = \"vqa-rad\"\nsplit = \"train\"\nlanguage = \"en\"\n\
             open_reward_protocol = \"open-exact\"\n",
            "x",
            None,
        )
        .unwrap();
        assert_eq!(
            c.run.data_format().unwrap(),
            Some(crate::data::DataFormat::Bench(
                crate::data::bench::Format::VqaRad
            ))
        );
        assert_eq!(c.run.split, vec!["train"]);
        assert_eq!(
            c.run.data_language().unwrap(),
            Some(crate::data::Language::En)
        );
        let r = c.accuracy_reward();
        assert_eq!((r.closed, r.open), (Protocol::Closed, Protocol::OpenExact));
        let again = GrpoConfig::from_toml(&c.to_toml().unwrap(), "written", None).unwrap();
        assert_eq!(again, c);
        let e = err("closed_reward_protocol = \"open-f1\"\n", &[]);
        assert!(
            e.starts_with("run.toml: closed_reward_protocol open-f1 is not a closed-question"),
            "{e}"
        );
        let e = err("", &[("open_reward_protocol", "f1")]);
        assert!(
            e.starts_with("--open-reward-protocol: unknown scoring protocol \"f1\"; known:"),
            "{e}"
        );
        let e = err("", &[("language", "de")]);
        assert_eq!(e, "--language must be en or zh, got \"de\"");
        let e = err("", &[("format", "vqa")]);
        assert!(e.starts_with("--format must be medvlm"), "{e}");
    }

    /// save_total_limit changes no trajectory: a resume may change it.
    #[test]
    fn save_total_limit_is_not_part_of_the_fingerprint() {
        let a = GrpoConfig::default();
        let mut b = a.clone();
        b.run.save_total_limit = 3;
        assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
        b.run.learning_rate = 2e-6;
        assert_ne!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
    }

    /// `reference_quantize`: a format's name or `none`; refused in one line where there is
    /// no reference copy to quantize (beta 0, LoRA); not written when unset, so a run from
    /// before the setting existed keeps its fingerprint.
    #[test]
    fn reference_quantize_parses_and_is_refused_where_it_would_do_nothing() {
        let c = |pairs: &[(&str, &str)]| GrpoConfig::from_toml("", "x", Some(flags(pairs)));
        let q = c(&[("reference_quantize", "q8_0")]).unwrap();
        assert_eq!(q.method.reference_quantize, Some(QuantKind::Q8_0));
        assert_eq!(
            c(&[("reference_quantize", "q4_1")])
                .unwrap()
                .method
                .reference_quantize,
            Some(QuantKind::Q4_1)
        );
        // `none` switches a file's setting off from the command line.
        let off = GrpoConfig::from_toml(
            "reference_quantize = \"q8_0\"\n",
            "x",
            Some(flags(&[("reference_quantize", "none")])),
        )
        .unwrap();
        assert_eq!(off.method.reference_quantize, None);
        assert_eq!(off, GrpoConfig::default());
        let again = GrpoConfig::from_toml(&q.to_toml().unwrap(), "written", None).unwrap();
        assert_eq!(again, q);
        assert!(q
            .to_toml()
            .unwrap()
            .contains("reference_quantize = \"q8_0\""));
        let d = GrpoConfig::default();
        assert!(!d.to_toml().unwrap().contains("reference_quantize"));
        assert_ne!(d.fingerprint().unwrap(), {
            let mut x = d.clone();
            x.method.reference_quantize = Some(QuantKind::Q8_0);
            x.fingerprint().unwrap()
        });

        let e = err("", &[("reference_quantize", "q8")]);
        assert_eq!(
            e,
            "--reference-quantize: unknown variant `q8`, expected `none`, `q8_0`, `q4_1`, `q4_k` or `q6_k`"
        );
        let e = err("", &[("reference_quantize", "q8_0"), ("beta", "0")]);
        assert!(
            e.starts_with("--reference-quantize (q8_0) is set but --beta is 0")
                && !e.contains('\n'),
            "{e}"
        );
        let e = err("", &[("reference_quantize", "q8_0"), ("lora.r", "8")]);
        assert!(
            e.starts_with("--reference-quantize (q8_0) is set but so is --lora-r: under LoRA")
                && !e.contains('\n'),
            "{e}"
        );
        let e = err("reference_quantize = \"q4_1\"\n[lora]\nr = 8\n", &[]);
        assert!(
            e.starts_with("run.toml: reference_quantize (q4_1) is set but so is lora.r"),
            "{e}"
        );
        // The device is known after the settings: a GPU is refused before any model loads.
        assert!(q.method.check_device(&candle_core::Device::Cpu).is_ok());
    }
}
