//! Reward functions for GRPO: the paper's format reward, the accuracy reward and the other
//! built-in rewards ([`BUILTIN`]), and rewards outside the binary ([`super::external`]:
//! a command, an HTTP endpoint, an LLM judge), combined by a weighted [`RewardSet`].
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

use anyhow::{bail, Result};

use crate::data::answer::{layout_reward, paper_accuracy, strict_accuracy, Layout};
use crate::data::score::{numeric_match, score_completion, scored_text, Protocol};
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

/// A format reward: 1.0 when the whole completion has its layout, else 0.0 (see
/// [`layout_reward`]). `FormatReward::default()` is the paper's.
#[derive(Clone, Copy, Debug)]
pub struct FormatReward {
    pub layout: Layout,
}

impl Default for FormatReward {
    fn default() -> Self {
        Self {
            layout: Layout::ThinkThenAnswer,
        }
    }
}

impl Reward for FormatReward {
    fn name(&self) -> &str {
        match self.layout {
            Layout::ThinkThenAnswer => "format",
            Layout::AnswerThenThink => "format_answer_first",
            Layout::AnswerOnly => "format_answer_only",
        }
    }

    fn score(&self, completion: &str, _ctx: &RewardContext) -> f32 {
        layout_reward(self.layout, completion)
    }
}

/// One rule for every row's answer text: a closed or open question's gold answer is scored
/// by `rule`; a multiple-choice row (whose answer is a letter) by the strict letter rule, so
/// that one run can mix kinds of rows under any of these rewards.
#[derive(Clone, Copy, Debug)]
pub struct AnswerReward {
    pub rule: AnswerRule,
}

/// The answer rules of [`AnswerReward`]. All read the answer as `medvlm eval` does: the
/// completion's `<answer>` block, else the whole completion.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AnswerRule {
    /// A scoring protocol of [`crate::data::score`] (exact match, token F1, recall, yes/no).
    Protocol(&'static str, Protocol),
    /// The first number of the answer within a relative tolerance of the gold's first number
    /// ([`numeric_match`]).
    Numeric { tolerance: f64 },
}

impl Reward for AnswerReward {
    fn name(&self) -> &str {
        match self.rule {
            AnswerRule::Protocol(name, _) => name,
            AnswerRule::Numeric { .. } => "numeric",
        }
    }

    fn score(&self, completion: &str, ctx: &RewardContext) -> f32 {
        match (ctx.gold, self.rule) {
            (
                Gold::Choice {
                    solution,
                    num_options,
                },
                _,
            ) => strict_accuracy(completion, solution, num_options),
            (Gold::Closed { answer } | Gold::Open { answer }, AnswerRule::Protocol(_, p)) => {
                score_completion(p, completion, answer) as f32
            }
            (
                Gold::Closed { answer } | Gold::Open { answer },
                AnswerRule::Numeric { tolerance },
            ) => {
                let text = scored_text(Protocol::OpenExact, completion);
                f32::from(u8::from(numeric_match(text, answer, tolerance)))
            }
        }
    }
}

/// A built-in reward under another name (two format rewards with different weights, say).
pub struct Renamed(pub String, pub Box<dyn Reward>);

impl Reward for Renamed {
    fn name(&self) -> &str {
        &self.0
    }
    fn score(&self, completion: &str, ctx: &RewardContext) -> f32 {
        self.1.score(completion, ctx)
    }
}

/// The built-in rewards a config can name, with what each scores.
pub const BUILTIN: [(&str, &str); 9] = [
    (
        "accuracy",
        "the answer, by the row's kind: option letter, closed or open protocol",
    ),
    (
        "format",
        "<think>...</think><answer>...</answer> (the paper's)",
    ),
    (
        "format_answer_first",
        "<answer>...</answer><think>...</think>",
    ),
    ("format_answer_only", "<answer>...</answer> alone"),
    ("exact_match", "normalised exact match (open-exact)"),
    ("token_f1", "token F1 (open-f1, LLaVA-Med's)"),
    ("token_recall", "gold in the answer (open-recall-llavamed)"),
    ("yes_no", "closed yes/no rule (closed)"),
    (
        "numeric",
        "first number within numeric_tolerance of the gold's",
    ),
];

/// The names of [`BUILTIN`], comma-separated, for messages.
pub fn builtin_names() -> String {
    BUILTIN.map(|(n, _)| n).join(", ")
}

/// The built-in reward `name`, with the run's accuracy settings and numeric tolerance.
pub fn builtin(name: &str, accuracy: AccuracyReward, tolerance: f64) -> Result<Box<dyn Reward>> {
    let answer = |rule| -> Box<dyn Reward> { Box::new(AnswerReward { rule }) };
    Ok(match name {
        "accuracy" => Box::new(accuracy),
        "format" => Box::new(FormatReward::default()),
        "format_answer_first" => Box::new(FormatReward {
            layout: Layout::AnswerThenThink,
        }),
        "format_answer_only" => Box::new(FormatReward {
            layout: Layout::AnswerOnly,
        }),
        "exact_match" => answer(AnswerRule::Protocol("exact_match", Protocol::OpenExact)),
        "token_f1" => answer(AnswerRule::Protocol("token_f1", Protocol::OpenF1)),
        "token_recall" => answer(AnswerRule::Protocol(
            "token_recall",
            Protocol::OpenRecallLlavaMed,
        )),
        "yes_no" => answer(AnswerRule::Protocol("yes_no", Protocol::Closed)),
        "numeric" => answer(AnswerRule::Numeric { tolerance }),
        other => bail!("unknown reward {other:?} (built in: {})", builtin_names()),
    })
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

/// One completion to score, with what a reward may look at.
#[derive(Clone, Copy, Debug)]
pub struct Sample<'a> {
    /// The chat-templated prompt text (image placeholders not expanded).
    pub prompt: &'a str,
    /// The completion, special tokens removed.
    pub completion: &'a str,
    pub item: &'a VqaItem,
    /// Which prompt of the step it answers (completions of one prompt share it).
    pub group: usize,
}

/// A reward scored a whole step at a time and allowed to fail: a process, a server, a
/// judge ([`super::external`]).
pub trait BatchReward: Send {
    fn name(&self) -> &str;
    /// One score per sample, in order, and any named extra metrics (one value per sample).
    fn score_batch(&mut self, step: u64, samples: &[Sample]) -> Result<Scores>;
}

/// What a [`BatchReward`] answers for a step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scores {
    pub scores: Vec<f32>,
    /// Extra metrics by name, one value per sample where the reward gave one.
    pub metrics: Vec<(String, Vec<f64>)>,
}

/// A reward of a [`RewardSet`].
pub enum RewardFn {
    /// Scored one completion at a time, in process.
    Local(Box<dyn Reward>),
    /// Scored a step at a time, and fallible.
    Batch(Box<dyn BatchReward>),
}

impl RewardFn {
    pub fn name(&self) -> &str {
        match self {
            RewardFn::Local(r) => r.name(),
            RewardFn::Batch(r) => r.name(),
        }
    }
}

/// A step's scores: each completion's weighted total, each reward's own scores, and the
/// extra metrics rewards reported (named `{reward}/{metric}`).
#[derive(Clone, Debug, Default)]
pub struct StepScores {
    pub totals: Vec<f32>,
    pub per_reward: Vec<Vec<f32>>,
    pub metrics: Vec<(String, Vec<f64>)>,
}

/// Several rewards combined by a weighted sum, like TRL's `reward_funcs` + `reward_weights`.
pub struct RewardSet {
    rewards: Vec<(RewardFn, f32)>,
}

impl RewardSet {
    /// A set of in-process `(reward, weight)` pairs.
    pub fn new(rewards: Vec<(Box<dyn Reward>, f32)>) -> Self {
        Self::of(
            rewards
                .into_iter()
                .map(|(r, w)| (RewardFn::Local(r), w))
                .collect(),
        )
    }

    /// A set of any rewards with their weights.
    pub fn of(rewards: Vec<(RewardFn, f32)>) -> Self {
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
            Box::new(FormatReward::default()),
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

    /// Scores one completion with in-process rewards: the weighted total, and each
    /// function's own (unweighted) score, which is what is worth logging per function. A set
    /// holding a [`BatchReward`] is scored with [`Self::score_step`].
    pub fn score(&self, completion: &str, ctx: &RewardContext) -> Result<(f32, Vec<f32>)> {
        let mut scores = Vec::with_capacity(self.rewards.len());
        for (r, _) in &self.rewards {
            match r {
                RewardFn::Local(r) => scores.push(r.score(completion, ctx)),
                RewardFn::Batch(r) => bail!(
                    "reward {:?} scores whole steps (RewardSet::score_step)",
                    r.name()
                ),
            }
        }
        Ok((self.total(&scores), scores))
    }

    fn total(&self, scores: &[f32]) -> f32 {
        self.rewards
            .iter()
            .zip(scores)
            .map(|((_, w), s)| w * s)
            .sum()
    }

    /// Scores a step's completions with every reward. A batch reward's failure is an error
    /// that names the reward and the step.
    pub fn score_step(&mut self, step: u64, samples: &[Sample]) -> Result<StepScores> {
        let mut per_reward = Vec::with_capacity(self.rewards.len());
        let mut metrics = Vec::new();
        for (r, _) in &mut self.rewards {
            match r {
                RewardFn::Local(r) => per_reward.push(
                    samples
                        .iter()
                        .map(|s| r.score(s.completion, &RewardContext::of(s.item)))
                        .collect(),
                ),
                RewardFn::Batch(r) => {
                    let name = r.name().to_string();
                    let out = r.score_batch(step, samples).map_err(|e| {
                        anyhow::anyhow!("reward {name:?} failed at step {step}: {e:#}")
                    })?;
                    if out.scores.len() != samples.len() {
                        bail!(
                            "reward {name:?} failed at step {step}: {} scores for {} completions",
                            out.scores.len(),
                            samples.len()
                        );
                    }
                    per_reward.push(out.scores);
                    metrics.extend(
                        out.metrics
                            .into_iter()
                            .map(|(m, v)| (format!("{name}/{m}"), v)),
                    );
                }
            }
        }
        let totals = (0..samples.len())
            .map(|k| {
                let scores: Vec<f32> = per_reward.iter().map(|v: &Vec<f32>| v[k]).collect();
                self.total(&scores)
            })
            .collect();
        Ok(StepScores {
            totals,
            per_reward,
            metrics,
        })
    }
}
