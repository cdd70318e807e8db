//! Reward functions for GRPO: the paper's format reward and the accuracy reward, combined
//! by a weighted [`RewardSet`].
//!
//! The rules they apply (how an answer is read, what the format is) are defined once in
//! [`crate::data::answer`], where evaluation reads answers with the same functions: the
//! default ([`AnswerMode::Strict`]) accuracy reward is [`strict_accuracy`], built on the
//! evaluator's [`extract_answer`](crate::data::answer::extract_answer)(crate::data::answer::extract_answer), and
//! [`AnswerMode::Paper`] is MedVLM-R1's released rule, [`paper_accuracy`].
//!
//! A closed or open item (the benchmarks' yes/no and free-text questions) has no letter: the
//! accuracy reward scores its completion with a named [`Protocol`] of [`crate::data::score`]
//! instead ([`AccuracyReward::closed`], [`AccuracyReward::open`]), reading the answer as
//! `medvlm eval` does ([`score_completion`]).

use crate::data::answer::{format_reward, paper_accuracy, strict_accuracy};
use crate::data::score::{score_completion, Protocol};
use crate::data::{Answer, VqaItem};

/// The gold answer a reward checks a completion against.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Gold<'a> {
    /// Multiple choice.
    Choice {
        /// The correct option letter, e.g. `"B"` (the dataset's `solution`). It may be
        /// wrapped as `"<answer> B </answer>"`; see
        /// [`ground_truth`](crate::data::answer::ground_truth) for how it is read.
        solution: &'a str,
        /// Number of options of the question (letters beyond it are not valid answers);
        /// `None` = unknown, then A-J are allowed. Only the Strict rule uses it: the paper's
        /// code never knew how many options a question had.
        num_options: Option<usize>,
    },
    /// A closed question (yes/no, or a closed set of words): the gold answer text.
    Closed { answer: &'a str },
    /// An open question: the gold answer text.
    Open { answer: &'a str },
}

/// What a reward function knows about the item being answered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RewardContext<'a> {
    pub gold: Gold<'a>,
}

impl<'a> RewardContext<'a> {
    /// A multiple-choice item whose correct letter is `solution`.
    pub fn choice(solution: &'a str, num_options: Option<usize>) -> Self {
        Self {
            gold: Gold::Choice {
                solution,
                num_options,
            },
        }
    }

    /// A closed question with gold answer `answer`.
    pub fn closed(answer: &'a str) -> Self {
        Self {
            gold: Gold::Closed { answer },
        }
    }

    /// An open question with gold answer `answer`.
    pub fn open(answer: &'a str) -> Self {
        Self {
            gold: Gold::Open { answer },
        }
    }

    /// The context of `item`: its letter and number of options, or its closed or open answer.
    pub fn of(item: &'a VqaItem) -> Self {
        match &item.answer {
            Answer::Choice { options, answer } => {
                // `data::LETTERS` as text. Loaders refuse more options than letters; an
                // index beyond them matches no letter.
                const NAMES: [&str; 10] = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"];
                Self::choice(
                    NAMES.get(*answer).copied().unwrap_or(""),
                    Some(options.len()),
                )
            }
            Answer::Closed { answer } => Self::closed(answer),
            Answer::Open { answer } => Self::open(answer),
        }
    }

    /// The gold answer as logged: the letter, or the answer text.
    pub fn solution(&self) -> &'a str {
        match self.gold {
            Gold::Choice { solution, .. } => solution,
            Gold::Closed { answer } | Gold::Open { answer } => answer,
        }
    }
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

/// The default protocol for closed questions' accuracy reward.
pub const DEFAULT_CLOSED_PROTOCOL: Protocol = Protocol::Closed;
/// The default protocol for open questions' accuracy reward: a graded score (token F1) gives
/// the group-relative advantage more to work with than exact match's 0 or 1.
pub const DEFAULT_OPEN_PROTOCOL: Protocol = Protocol::OpenF1;

/// Accuracy reward: is the completion's answer right? Multiple choice is read by `mode`'s
/// letter rule; closed and open questions are scored by `closed` and `open`, the protocols of
/// [`crate::data::score`] (`medvlm eval`'s), with the answer read as [`score_completion`]
/// reads it. This is the one place where an item's kind of answer picks the rule.
#[derive(Clone, Copy, Debug)]
pub struct AccuracyReward {
    pub mode: AnswerMode,
    /// The protocol for closed questions ([`Protocol::is_closed`]).
    pub closed: Protocol,
    /// The protocol for open questions ([`Protocol::is_open`]).
    pub open: Protocol,
}

impl Default for AccuracyReward {
    fn default() -> Self {
        Self::with_mode(AnswerMode::default())
    }
}

impl AccuracyReward {
    /// `mode`'s letter rule, the default closed and open protocols.
    pub fn with_mode(mode: AnswerMode) -> Self {
        Self {
            mode,
            closed: DEFAULT_CLOSED_PROTOCOL,
            open: DEFAULT_OPEN_PROTOCOL,
        }
    }
}

impl Reward for AccuracyReward {
    fn name(&self) -> &str {
        "accuracy"
    }

    fn score(&self, completion: &str, ctx: &RewardContext) -> f32 {
        match ctx.gold {
            Gold::Choice {
                solution,
                num_options,
            } => match self.mode {
                AnswerMode::Paper => paper_accuracy(completion, solution),
                AnswerMode::Strict => strict_accuracy(completion, solution, num_options),
            },
            Gold::Closed { answer } => score_completion(self.closed, completion, answer) as f32,
            Gold::Open { answer } => score_completion(self.open, completion, answer) as f32,
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
            Box::new(AccuracyReward::with_mode(mode)),
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
