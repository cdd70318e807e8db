//! Reward functions for GRPO: the paper's format reward and the accuracy reward, combined
//! by a weighted [`RewardSet`].
//!
//! The rules they apply (how an answer is read, what the format is) are defined once in
//! [`crate::data::answer`], where evaluation reads answers with the same functions: the
//! default ([`AnswerMode::Strict`]) accuracy reward is [`strict_accuracy`], built on the
//! evaluator's [`extract_answer`](crate::data::answer::extract_answer)(crate::data::answer::extract_answer), and
//! [`AnswerMode::Paper`] is MedVLM-R1's released rule, [`paper_accuracy`].

use crate::data::answer::{format_reward, paper_accuracy, strict_accuracy};

/// What a reward function knows about the item being answered.
#[derive(Clone, Copy, Debug)]
pub struct RewardContext<'a> {
    /// The correct option letter, e.g. `"B"` (the dataset's `solution`). It may be wrapped as
    /// `"<answer> B </answer>"`; see [`ground_truth`](crate::data::answer::ground_truth) for how it is read.
    pub solution: &'a str,
    /// Number of options of the question (letters beyond it are not valid answers); `None` =
    /// unknown, then A-J are allowed. Only the Strict rule uses it: the paper's code never knew
    /// how many options a question had.
    pub num_options: Option<usize>,
}

/// A reward function: scores one completion (decoded text, special tokens removed) for one item.
pub trait Reward: Send + Sync {
    /// Short name, used for logging per-function rewards (as TRL logs `rewards/{name}`).
    fn name(&self) -> &str;
    /// The reward of `completion` for the item described by `ctx`.
    fn score(&self, completion: &str, ctx: &RewardContext) -> f32;
}

/// How the accuracy reward reads an answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerMode {
    /// MedVLM-R1's released reward, exactly (see [`paper_accuracy`]). Use it to reproduce the
    /// paper; it can be gamed and disagrees with how evaluation reads answers.
    Paper,
    /// The evaluator's rule ([`extract_answer`](crate::data::answer::extract_answer)): exactly one answer block, one standalone
    /// uppercase option letter, in range. Correct and bare → 1.0, correct with extra words → 0.5.
    #[default]
    Strict,
}

/// The paper's format reward: 1.0 when the whole completion is a think block followed by an
/// answer block, else 0.0. See [`format_reward`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FormatReward;

impl Reward for FormatReward {
    fn name(&self) -> &str {
        "format"
    }

    fn score(&self, completion: &str, _ctx: &RewardContext) -> f32 {
        format_reward(completion)
    }
}

/// Accuracy reward: did the completion pick the right option? How it reads the answer depends
/// on `mode`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AccuracyReward {
    pub mode: AnswerMode,
}

impl Reward for AccuracyReward {
    fn name(&self) -> &str {
        "accuracy"
    }

    fn score(&self, completion: &str, ctx: &RewardContext) -> f32 {
        match self.mode {
            AnswerMode::Paper => paper_accuracy(completion, ctx.solution),
            AnswerMode::Strict => strict_accuracy(completion, ctx.solution, ctx.num_options),
        }
    }
}

/// Several rewards combined by a weighted sum, like TRL's `reward_funcs` + `reward_weights`.
pub struct RewardSet {
    rewards: Vec<(Box<dyn Reward>, f32)>,
}

impl RewardSet {
    /// A set of `(reward, weight)` pairs.
    pub fn new(rewards: Vec<(Box<dyn Reward>, f32)>) -> Self {
        Self { rewards }
    }

    /// A set with every weight 1.0 (TRL's default when `reward_weights` is not given).
    pub fn unweighted(rewards: Vec<Box<dyn Reward>>) -> Self {
        Self::new(rewards.into_iter().map(|r| (r, 1.0)).collect())
    }

    /// MedVLM-R1's setup: accuracy (in `mode`) + format, both weight 1, so a completion scores
    /// between 0 and 2.
    pub fn paper_default(mode: AnswerMode) -> Self {
        Self::unweighted(vec![
            Box::new(AccuracyReward { mode }),
            Box::new(FormatReward),
        ])
    }

    /// The names of the rewards, in order (the order of the scores [`RewardSet::score`] returns).
    pub fn names(&self) -> Vec<String> {
        self.rewards
            .iter()
            .map(|(r, _)| r.name().to_string())
            .collect()
    }

    /// The weights, in order.
    pub fn weights(&self) -> Vec<f32> {
        self.rewards.iter().map(|(_, w)| *w).collect()
    }

    /// Scores one completion: the weighted total, and each function's own (unweighted) score,
    /// which is what is worth logging per function.
    pub fn score(&self, completion: &str, ctx: &RewardContext) -> (f32, Vec<f32>) {
        let scores: Vec<f32> = self
            .rewards
            .iter()
            .map(|(r, _)| r.score(completion, ctx))
            .collect();
        let total = self
            .rewards
            .iter()
            .zip(&scores)
            .map(|((_, w), s)| w * s)
            .sum();
        (total, scores)
    }
}
