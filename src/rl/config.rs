//! `grpo.toml`: every setting of a GRPO run, MedVLM-R1's values as defaults: the shared
//! run settings ([`RunConfig`]) and GRPO's own ([`GrpoMethod`]).

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::grpo::{LossConfig, LossType, ScaleRewards};
use super::reward::AnswerMode;
use crate::train::config::{Method, RunConfig, TrainConfig};

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

    /// Reward functions, summed: "accuracy", "format".
    pub rewards: Vec<String>,
    /// One weight per reward (default all 1).
    pub reward_weights: Vec<f32>,
    /// "strict" (default) or "paper" accuracy rule.
    pub answer_mode: AnswerMode,
    /// Completions per step written to completions.jsonl.
    pub log_completions: usize,
}

impl Default for GrpoMethod {
    fn default() -> Self {
        Self {
            eval_data: None,
            eval_steps: 0,
            eval_limit: 0,
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
            rewards: vec!["accuracy".into(), "format".into()],
            reward_weights: vec![],
            answer_mode: AnswerMode::Strict,
            log_completions: 2,
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

    fn validate(&self, run: &RunConfig) -> Result<()> {
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
        if self.batch_prompts == 0 || self.max_completion_length == 0 {
            bail!("config: batch_prompts and max_completion_length must be positive");
        }
        if self.num_iterations == 0 {
            bail!("config: num_iterations must be at least 1");
        }
        if !run.save_steps.is_multiple_of(self.num_iterations) {
            bail!(
                "config: save_steps ({}) must be a multiple of num_iterations ({}): checkpoints \
                 are taken between generated batches so a resumed run is exact",
                run.save_steps,
                self.num_iterations
            );
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            bail!("config: temperature must be positive for GRPO sampling");
        }
        if self.beta < 0.0 || self.epsilon_low < 0.0 || self.epsilon_high < 0.0 {
            bail!("config: beta and epsilons must be non-negative");
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

impl GrpoConfig {
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
}
