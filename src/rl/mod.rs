//! Reinforcement learning: rewards, the GRPO objective, and the training loop.

pub mod config;
pub mod external;
pub mod grpo;
pub mod reward;
pub mod step;
pub mod trainer;

use std::path::Path;

use anyhow::Result;

use config::{GrpoConfig, RewardEntry};
use reward::{builtin, RewardFn, RewardSet};

/// The run's reward set: each entry of `rewards` built (a built-in with the run's accuracy
/// settings, or a command, server or judge) with its weight. A command's stderr goes to
/// `run_dir/rewards/{name}.stderr.log`.
pub fn rewards_of(config: &GrpoConfig, run_dir: &Path) -> Result<RewardSet> {
    let m = &config.method;
    let mut v: Vec<(RewardFn, f32)> = Vec::new();
    for (k, entry) in m.rewards.iter().enumerate() {
        let name = entry
            .check()
            .map_err(|e| anyhow::anyhow!("rewards: entry {}: {e}", k + 1))?;
        let weight = m
            .reward_weights
            .get(k)
            .copied()
            .or(entry.weight())
            .unwrap_or(1.0);
        v.push((build(entry, &name, config, run_dir)?, weight));
    }
    Ok(RewardSet::of(v))
}

fn build(entry: &RewardEntry, name: &str, config: &GrpoConfig, run_dir: &Path) -> Result<RewardFn> {
    let spec = entry.spec();
    let timeout = entry.timeout_s();
    if let Some(b) = &spec.builtin {
        let r = builtin(b, config.accuracy_reward(), config.method.numeric_tolerance)?;
        return Ok(match &spec.name {
            Some(n) if n != b => RewardFn::Local(Box::new(reward::Renamed(n.clone(), r))),
            _ => RewardFn::Local(r),
        });
    }
    if let Some(c) = &spec.command {
        let stderr = run_dir.join("rewards").join(format!("{name}.stderr.log"));
        return Ok(RewardFn::Batch(Box::new(external::CommandReward::new(
            name,
            c.argv(),
            timeout,
            stderr,
        ))));
    }
    if let Some(u) = &spec.url {
        return Ok(RewardFn::Batch(Box::new(external::HttpReward::new(
            name, u, timeout,
        )?)));
    }
    let judge = spec.judge.clone().expect("checked: one kind");
    Ok(RewardFn::Batch(Box::new(external::JudgeReward::new(
        name, judge, timeout,
    )?)))
}
