//! Reinforcement learning: rewards, the GRPO objective, and the training loop.

pub mod config;
pub mod grpo;
pub mod reward;
pub mod step;
pub mod trainer;

use anyhow::{bail, Result};

use reward::{AccuracyReward, FormatReward, Reward, RewardSet};

/// The reward set named in a config (`"accuracy"`, `"format"`), weighted; `accuracy` is the
/// accuracy reward to use (its letter rule and closed/open protocols).
pub fn rewards_from_names(
    names: &[String],
    weights: &[f32],
    accuracy: AccuracyReward,
) -> Result<RewardSet> {
    let mut v: Vec<(Box<dyn Reward>, f32)> = Vec::new();
    for (name, &w) in names.iter().zip(weights) {
        let r: Box<dyn Reward> = match name.as_str() {
            "accuracy" => Box::new(accuracy),
            "format" => Box::new(FormatReward),
            other => bail!("unknown reward {other:?} (built in: \"accuracy\", \"format\")"),
        };
        v.push((r, w));
    }
    Ok(RewardSet::new(v))
}
