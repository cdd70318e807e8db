//! Table tests for the rewards and the answer-extraction rule (`medvlm::rl::reward`, `medvlm::data::answer`).
//!
//! The `paper` and `format` columns are not hand-written: they are what Python 3.11 computes
//! when MedVLM-R1's accuracy code (quoted on `paper_accuracy`) and
//! `re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", content, re.DOTALL)` are run on
//! each row. The `strict` columns are the Strict rule's specification.

use medvlm::data::answer::Extraction::{self, *};
use medvlm::data::answer::{extract_answer, format_reward, ground_truth, paper_accuracy};
use medvlm::rl::reward::{
    AccuracyReward, AnswerMode, FormatReward, Reward, RewardContext, RewardSet,
};

struct Row {
    note: &'static str,
    completion: &'static str,
    solution: &'static str,
    num_options: Option<usize>,
    /// Python's value for the paper's accuracy reward.
    paper: f32,
    strict: f32,
    extraction: Extraction,
    /// Python's value for the paper's format reward.
    format: f32,
}

#[allow(clippy::too_many_arguments)]
const fn row(
    note: &'static str,
    completion: &'static str,
    solution: &'static str,
    num_options: Option<usize>,
    paper: f32,
    strict: f32,
    extraction: Extraction,
    format: f32,
) -> Row {
    Row {
        note,
        completion,
        solution,
        num_options,
        paper,
        strict,
        extraction,
        format,
    }
}

#[rustfmt::skip]
const ROWS: &[Row] = &[
    row("bare letter", "<think>x</think><answer>A</answer>", "A", Some(4), 1.0, 1.0, Letter { letter: 'A', exact: true }, 1.0),
    row("letter + paren", "<think>x</think><answer>A)</answer>", "A", Some(4), 0.5, 1.0, Letter { letter: 'A', exact: true }, 1.0),
    row("letter in parens", "<think>x</think><answer>(A)</answer>", "A", Some(4), 0.5, 1.0, Letter { letter: 'A', exact: true }, 1.0),
    row("letter + dot", "<think>x</think><answer>A.</answer>", "A", Some(4), 0.5, 1.0, Letter { letter: 'A', exact: true }, 1.0),
    row("letter + colon", "<think>x</think><answer>A:</answer>", "A", Some(4), 0.5, 1.0, Letter { letter: 'A', exact: true }, 1.0),
    row("letter in brackets", "<think>x</think><answer>[D]</answer>", "D", Some(4), 0.5, 1.0, Letter { letter: 'D', exact: true }, 1.0),
    row("spaces around", "<think>x</think><answer> A </answer>", "A", Some(4), 1.0, 1.0, Letter { letter: 'A', exact: true }, 1.0),
    row("markdown bold", "<think>x</think><answer>**C**</answer>", "C", Some(4), 0.5, 1.0, Letter { letter: 'C', exact: true }, 1.0),
    row("wrong letter", "<think>x</think><answer>B</answer>", "A", Some(4), 0.0, 0.0, Letter { letter: 'B', exact: true }, 1.0),
    row("lowercase a", "<think>x</think><answer>a</answer>", "A", Some(4), 1.0, 0.0, NoLetter, 1.0),
    row("lowercase b vs wrapped solution", "<think>x</think><answer>b</answer>", "<answer> B </answer>", Some(4), 1.0, 0.0, NoLetter, 1.0),
    row("lowercase solution", "<think>x</think><answer>C</answer>", "c", Some(4), 1.0, 1.0, Letter { letter: 'C', exact: true }, 1.0),
    row("wrapped solution", "<think>x</think><answer>C</answer>", "<answer> C </answer>", Some(4), 1.0, 1.0, Letter { letter: 'C', exact: true }, 1.0),
    row("Option A", "<think>x</think><answer>Option A</answer>", "A", Some(4), 0.0, 0.5, Letter { letter: 'A', exact: false }, 1.0),
    row("A. Brain", "<think>x</think><answer>A. Brain</answer>", "A", Some(4), 0.0, 0.5, Letter { letter: 'A', exact: false }, 1.0),
    row("Brain (B)", "<think>x</think><answer>Brain (B)</answer>", "B", Some(4), 0.0, 0.5, Letter { letter: 'B', exact: false }, 1.0),
    row("Brain alone", "<think>x</think><answer>Brain</answer>", "B", Some(4), 0.0, 0.0, NoLetter, 1.0),
    row("The answer is B.", "<think>x</think><answer>The answer is B.</answer>", "B", Some(4), 0.0, 0.5, Letter { letter: 'B', exact: false }, 1.0),
    row("Answer: B", "<think>x</think><answer>Answer: B</answer>", "B", Some(4), 0.0, 0.5, Letter { letter: 'B', exact: false }, 1.0),
    row("I think B", "<think>x</think><answer>I think B</answer>", "B", Some(4), 0.0, 0.0, Ambiguous, 1.0),
    row("two blocks, first right", "<think>x</think><answer>A</answer><answer>B</answer>", "A", Some(4), 1.0, 0.0, MultipleAnswerBlocks, 1.0),
    row("two blocks, second right", "<think>x</think><answer>A</answer><answer>B</answer>", "B", Some(4), 0.0, 0.0, MultipleAnswerBlocks, 1.0),
    row("tags quoted in think", "<think>I will write <answer>X</answer></think><answer>B</answer>", "B", Some(4), 0.0, 0.0, MultipleAnswerBlocks, 1.0),
    row("empty answer", "<think>x</think><answer></answer>", "A", Some(4), 0.0, 0.0, Empty, 1.0),
    row("whitespace answer", "<think>x</think><answer>  \n\u{9} </answer>", "A", Some(4), 0.0, 0.0, Empty, 1.0),
    row("no think block", "<answer>B</answer>", "B", Some(4), 1.0, 1.0, Letter { letter: 'B', exact: true }, 0.0),
    row("no answer block", "<think>B</think> B", "B", Some(4), 0.0, 0.0, NoAnswerBlock, 0.0),
    row("truncated answer block", "<think>x</think><answer>A", "A", Some(4), 0.0, 0.0, NoAnswerBlock, 0.0),
    row("tags reversed", "</answer>A<answer>", "A", Some(4), 0.0, 0.0, NoAnswerBlock, 0.0),
    row("uppercase tags", "<think>x</think><ANSWER>A</ANSWER>", "A", Some(4), 1.0, 0.0, NoAnswerBlock, 0.0),
    row("long-s tags", "<think>x</think><anſwer>A</anſwer>", "A", Some(4), 1.0, 0.0, NoAnswerBlock, 0.0),
    row("multiline letter", "<think>x</think><answer>\nC\n</answer>", "C", Some(4), 1.0, 1.0, Letter { letter: 'C', exact: true }, 1.0),
    row("multiline sentence", "<think>x</think><answer>The answer is\nC</answer>", "C", Some(4), 0.0, 0.5, Letter { letter: 'C', exact: false }, 1.0),
    row("E of 4 options, E correct", "<think>x</think><answer>E</answer>", "E", Some(4), 1.0, 0.0, OutOfRange('E'), 1.0),
    row("E of 4 options, A correct", "<think>x</think><answer>E</answer>", "A", Some(4), 0.0, 0.0, OutOfRange('E'), 1.0),
    row("E of 5 options", "<think>x</think><answer>E</answer>", "E", Some(5), 1.0, 1.0, Letter { letter: 'E', exact: true }, 1.0),
    row("J, options unknown", "<think>x</think><answer>J</answer>", "J", None, 1.0, 1.0, Letter { letter: 'J', exact: true }, 1.0),
    row("K is never an option", "<think>x</think><answer>K</answer>", "K", None, 0.0, 0.0, NoLetter, 1.0),
    row("A or B", "<think>x</think><answer>A or B</answer>", "A", Some(4), 0.0, 0.0, Ambiguous, 1.0),
    row("A, B", "<think>x</think><answer>A, B</answer>", "A", Some(4), 0.0, 0.0, Ambiguous, 1.0),
    row("A A", "<think>x</think><answer>A A</answer>", "A", Some(4), 0.0, 0.0, Ambiguous, 1.0),
    row("AB", "<think>x</think><answer>AB</answer>", "A", Some(4), 0.0, 0.0, NoLetter, 1.0),
    row("B1", "<think>x</think><answer>B1</answer>", "B", Some(4), 0.5, 0.0, NoLetter, 1.0),
    row("trailing text after answer", "<think>x</think><answer>A</answer> Hope this helps", "A", Some(4), 1.0, 1.0, Letter { letter: 'A', exact: true }, 0.0),
    row("bare letter, no tags", "A", "A", Some(4), 0.0, 0.0, NoAnswerBlock, 0.0),
    row("solution with option text", "<think>x</think><answer>B</answer>", "B. Brain", Some(4), 0.0, 0.0, Letter { letter: 'B', exact: true }, 1.0),
    row("uppercase tags then lowercase tags", "<think>x</think><ANSWER>A</ANSWER><answer>B</answer>", "B", Some(4), 0.0, 1.0, Letter { letter: 'B', exact: true }, 0.0),
    row("unicode: German words", "<think>x</think><answer>A — Gehirn (脑)</answer>", "A", Some(4), 0.0, 0.5, Letter { letter: 'A', exact: false }, 1.0),
    row("unicode: CJK brackets", "<think>x</think><answer>（B）</answer>", "B", Some(4), 0.5, 1.0, Letter { letter: 'B', exact: true }, 1.0),
    row("unicode: full-width A", "<think>x</think><answer>Ａ</answer>", "A", Some(4), 0.0, 0.0, NoLetter, 1.0),
    row("unicode: precomposed A acute", "<think>x</think><answer>Á</answer>", "A", Some(4), 0.0, 0.0, NoLetter, 1.0),
    row("unicode: A + combining acute", "<think>x</think><answer>A\u{301}</answer>", "A", Some(4), 0.5, 0.0, NoLetter, 1.0),
    row("unicode: dotless i", "<think>x</think><answer>ı</answer>", "I", Some(10), 1.0, 0.0, NoLetter, 1.0),
    row("unicode: dotted capital I", "<think>x</think><answer>İ</answer>", "I", Some(10), 0.0, 0.0, NoLetter, 1.0),
    row("unicode: fi ligature", "<think>x</think><answer>ﬁ</answer>", "F", Some(10), 0.0, 0.0, NoLetter, 1.0),
    row("unicode: nbsp around", "<think>x</think><answer>\u{a0}A\u{a0}</answer>", "A", Some(4), 1.0, 1.0, Letter { letter: 'A', exact: true }, 1.0),
    row("unicode: zero-width space", "<think>x</think><answer>B\u{200b}</answer>", "B", Some(4), 0.5, 0.5, Letter { letter: 'B', exact: false }, 1.0),
    row("unicode: info separator", "<think>x</think><answer>\u{1c}A\u{1c}</answer>", "A", Some(4), 1.0, 0.5, Letter { letter: 'A', exact: false }, 1.0),
];

#[rustfmt::skip]
const FORMAT_ROWS: &[(&str, f32)] = &[
    ("<think>a</think><answer>B</answer>", 1.0),
    ("<think>a</think><answer>B</answer> trailing", 0.0),
    (" <think>a</think><answer>B</answer>", 0.0),
    ("<think>a</think><answer>B</answer>\n", 0.0),
    ("<think>a</think>\n\n<answer>B</answer>", 1.0),
    ("<think>a</think> \u{9}\n <answer>B</answer>", 1.0),
    ("<think>a</think>\u{a0}<answer>B</answer>", 1.0),
    ("<think>a</think>\u{1c}<answer>B</answer>", 1.0),
    ("<think>a</think>\u{200b}<answer>B</answer>", 0.0),
    ("<think>a</think> x <answer>B</answer>", 0.0),
    ("<think>a<answer>B</answer>", 0.0),
    ("<think>a</think>", 0.0),
    ("<answer>B</answer>", 0.0),
    ("<think>a</think><think>b</think><answer>C</answer>", 1.0),
    ("<think>a</think><answer>A</answer><answer>B</answer>", 1.0),
    ("<think>a</think><answer>A</answer> <answer>B</answer>", 1.0),
    ("<think>a</answer></think><answer>B</answer>", 1.0),
    ("<answer>B</answer><think>a</think>", 0.0),
    ("<think>line 1\nline 2</think>\n<answer>\nB\n</answer>", 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("<THINK>a</THINK><ANSWER>B</ANSWER>", 0.0),
    ("<think>a</think><answer>B", 0.0),
    ("", 0.0),
];

#[test]
fn accuracy_table() {
    let paper = AccuracyReward::with_mode(AnswerMode::Paper);
    let strict = AccuracyReward::with_mode(AnswerMode::Strict);
    let mut failures = Vec::new();
    for r in ROWS {
        let ctx = RewardContext::choice(r.solution, r.num_options);
        let got = (
            paper.score(r.completion, &ctx),
            strict.score(r.completion, &ctx),
            extract_answer(r.completion, r.num_options),
            FormatReward::default().score(r.completion, &ctx),
        );
        let want = (r.paper, r.strict, r.extraction, r.format);
        if got != want {
            failures.push(format!(
                "{}: {:?}\n  (paper, strict, extraction, format) got {got:?}, want {want:?}",
                r.note, r.completion
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn format_table() {
    let mut failures = Vec::new();
    for &(completion, want) in FORMAT_ROWS {
        let got = format_reward(completion);
        if got != want {
            failures.push(format!("{completion:?}: got {got}, want {want}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn paper_mode_ignores_num_options() {
    // The paper's code never saw the number of options: E is accepted on a 4-option question.
    let c = "<think>x</think><answer>E</answer>";
    assert_eq!(paper_accuracy(c, "E"), 1.0);
    let ctx = RewardContext::choice("E", Some(4));
    assert_eq!(
        AccuracyReward::with_mode(AnswerMode::Paper).score(c, &ctx),
        1.0
    );
    assert_eq!(
        AccuracyReward::with_mode(AnswerMode::Strict).score(c, &ctx),
        0.0
    );
}

#[test]
fn ground_truth_is_read_like_the_paper() {
    assert_eq!(ground_truth("B"), "B");
    assert_eq!(ground_truth(" b\n"), "B");
    assert_eq!(ground_truth("<answer> B </answer>"), "B");
    assert_eq!(ground_truth("<ANSWER>c</ANSWER>"), "C");
    assert_eq!(ground_truth("B. Brain"), "B.BRAIN");
}

#[test]
fn strict_letters_at_every_range_boundary() {
    let answer = |l: char| format!("<answer>{l}</answer>");
    for n in 0..=10usize {
        for (i, l) in ('A'..='J').enumerate() {
            let want = if i < n {
                Letter {
                    letter: l,
                    exact: true,
                }
            } else {
                OutOfRange(l)
            };
            assert_eq!(
                extract_answer(&answer(l), Some(n)),
                want,
                "{l} with {n} options"
            );
        }
    }
    for l in 'A'..='J' {
        assert_eq!(
            extract_answer(&answer(l), None),
            Letter {
                letter: l,
                exact: true
            }
        );
    }
    assert_eq!(
        extract_answer(&answer('J'), Some(26)),
        Letter {
            letter: 'J',
            exact: true
        }
    );
}

#[test]
fn extraction_helpers() {
    assert_eq!(
        Letter {
            letter: 'C',
            exact: false
        }
        .letter(),
        Some('C')
    );
    assert_eq!(Ambiguous.letter(), None);
    assert_eq!(OutOfRange('E').letter(), None);
    assert_eq!(
        Letter {
            letter: 'C',
            exact: true
        }
        .kind(),
        "letter_exact"
    );
    assert_eq!(NoAnswerBlock.kind(), "no_answer_block");
}

/// A reward with a fixed score, to check the weighting arithmetic on its own.
struct Constant(&'static str, f32);

impl Reward for Constant {
    fn name(&self) -> &str {
        self.0
    }
    fn score(&self, _: &str, _: &RewardContext) -> f32 {
        self.1
    }
}

#[test]
fn reward_set_weights_scores() {
    let set = RewardSet::new(vec![
        (Box::new(Constant("x", 1.0)), 2.0),
        (Box::new(Constant("y", 0.5)), -1.0),
        (Box::new(Constant("z", 0.25)), 0.0),
    ]);
    assert_eq!(set.names(), ["x", "y", "z"]);
    assert_eq!(set.weights(), [2.0, -1.0, 0.0]);
    let ctx = RewardContext::choice("A", Some(4));
    let (total, scores) = set.score("anything", &ctx).unwrap();
    // Per-function scores are reported unweighted; the total is the weighted sum.
    assert_eq!(scores, [1.0, 0.5, 0.25]);
    assert_eq!(total, 2.0 * 1.0 - 0.5);

    let empty = RewardSet::new(Vec::new());
    assert_eq!(empty.score("x", &ctx).unwrap(), (0.0, Vec::new()));
}

#[test]
fn paper_default_is_accuracy_plus_format() {
    let ctx = RewardContext::choice("A", Some(4));
    for mode in [AnswerMode::Paper, AnswerMode::Strict] {
        let set = RewardSet::paper_default(mode);
        assert_eq!(set.names(), ["accuracy", "format"]);
        assert_eq!(set.weights(), [1.0, 1.0]);
        assert_eq!(
            set.score("<think>x</think>\n<answer>A</answer>", &ctx)
                .unwrap(),
            (2.0, vec![1.0, 1.0])
        );
        assert_eq!(
            set.score("<answer>A</answer>", &ctx).unwrap(),
            (1.0, vec![1.0, 0.0])
        );
        assert_eq!(
            set.score("<think>x</think><answer>B</answer>", &ctx)
                .unwrap(),
            (1.0, vec![0.0, 1.0])
        );
    }
    // Where the modes differ: "Option A" is half right under Strict, wrong under Paper.
    let c = "<think>x</think><answer>Option A</answer>";
    assert_eq!(
        RewardSet::paper_default(AnswerMode::Paper)
            .score(c, &ctx)
            .unwrap(),
        (1.0, vec![0.0, 1.0])
    );
    assert_eq!(
        RewardSet::paper_default(AnswerMode::Strict)
            .score(c, &ctx)
            .unwrap(),
        (1.5, vec![0.5, 1.0])
    );
}

#[test]
fn answer_mode_defaults_to_strict_and_serialises_lowercase() {
    assert_eq!(AnswerMode::default(), AnswerMode::Strict);
    assert_eq!(AccuracyReward::default().mode, AnswerMode::Strict);
    assert_eq!(
        serde_json::to_string(&AnswerMode::Paper).unwrap(),
        "\"paper\""
    );
    assert_eq!(
        serde_json::from_str::<AnswerMode>("\"strict\"").unwrap(),
        AnswerMode::Strict
    );
}

/// Closed and open items: the accuracy reward is the named protocol's score of the
/// completion (its `<answer>` block where the protocol's harness extracts nothing), as
/// `medvlm eval` scores it. The expected values are worked out by hand.
#[test]
fn closed_and_open_items_are_scored_by_their_protocols() {
    use medvlm::data::score::{score_completion, Protocol};
    let reward = AccuracyReward::default();
    assert_eq!(
        (reward.closed, reward.open),
        (Protocol::Closed, Protocol::OpenF1)
    );
    let yes = RewardContext::closed("yes");
    // The answer block says Yes; the "no" of the reasoning is not read (the closed rule
    // extracts the <answer> block itself).
    let c = "<think>There is no lesion, the lung is normal.</think><answer>Yes</answer>";
    assert_eq!(reward.score(c, &yes), 1.0);
    assert_eq!(
        reward.score(c, &yes) as f64,
        score_completion(Protocol::Closed, c, "yes")
    );
    assert_eq!(
        reward.score("<think>x</think><answer>No</answer>", &yes),
        0.0
    );
    // Both substrings yes and no: the closed rule refuses the answer.
    assert_eq!(
        reward.score("<think>x</think><answer>yes or no</answer>", &yes),
        0.0
    );
    // SLAKE's capitalised gold is a yes/no answer too under `closed`.
    assert_eq!(reward.score(c, &RewardContext::closed("Yes")), 1.0);
    // The whole set: accuracy 1 + format 1.
    assert_eq!(
        RewardSet::paper_default(AnswerMode::Strict)
            .score(c, &yes)
            .unwrap(),
        (2.0, vec![1.0, 1.0])
    );

    // Open, token F1 (the default): "right lung" against "left lung" shares one token of
    // two on each side: precision 1/2, recall 1/2, F1 1/2.
    let lung = RewardContext::open("left lung");
    let c = "<think>The right side looks dense.</think><answer>right lung</answer>";
    assert_eq!(reward.score(c, &lung), 0.5);
    assert_eq!(Protocol::OpenF1.score("right lung", "left lung"), 0.5);
    assert_eq!(
        reward.score(c, &lung) as f64,
        score_completion(Protocol::OpenF1, c, "left lung")
    );
    // "the" is dropped by the normaliser: left lung and heart, 2 of 4 tokens right, both gold
    // tokens found: precision 1/2, recall 1, F1 2/3.
    let c = "<think>x</think><answer>the left lung and heart</answer>";
    assert!((reward.score(c, &lung) - 2.0 / 3.0).abs() < 1e-6);
    // Only the answer block is read: the reasoning's words do not dilute the F1.
    let c = "<think>The right side is clear.</think><answer>Left lung</answer>";
    assert_eq!(reward.score(c, &lung), 1.0);
    // No answer block: the whole output is scored, 2 of 5 tokens: F1 2 * (2/5) / (1 + 2/5).
    let c = "it is the left lung probably";
    let f1 = 2.0 * 0.4 * 1.0 / 1.4;
    assert!(
        (reward.score(c, &lung) as f64 - f1).abs() < 1e-6,
        "{}",
        reward.score(c, &lung)
    );

    // Exact match as the open protocol: all or nothing.
    let exact = AccuracyReward {
        open: Protocol::OpenExact,
        ..AccuracyReward::default()
    };
    assert_eq!(
        exact.score("<think>x</think><answer>right lung</answer>", &lung),
        0.0
    );
    assert_eq!(
        exact.score("<think>x</think><answer>Left lung.</answer>", &lung),
        1.0
    );

    // Multiple choice keeps its letter rule whatever the protocols are.
    let item = RewardContext::choice("B", Some(4));
    assert_eq!(
        exact.score("<think>x</think><answer>B</answer>", &item),
        1.0
    );
    assert_eq!(item.solution(), "B");
    assert_eq!(lung.solution(), "left lung");
}

/// The built-in rewards beyond accuracy and the paper's format, by hand.
#[test]
fn builtin_layout_and_answer_rewards_score_by_hand() {
    use medvlm::rl::reward::{builtin, BUILTIN};
    let acc = AccuracyReward::default();
    let r = |name: &str| builtin(name, acc, 0.01).unwrap();
    let open = RewardContext::open("12 mm");
    let closed = RewardContext::closed("yes");
    let choice = RewardContext::choice("B", Some(4));
    // Layouts: each accepts its own order only; answer-only refuses a think block.
    let think_answer = "<think>r</think>\n<answer>12 mm</answer>";
    let answer_think = "<answer>12 mm</answer> <think>r</think>";
    let answer_only = "<answer>12 mm</answer>";
    for (name, want) in [
        ("format", [1.0, 0.0, 0.0]),
        ("format_answer_first", [0.0, 1.0, 0.0]),
        ("format_answer_only", [0.0, 0.0, 1.0]),
    ] {
        let got = [think_answer, answer_think, answer_only].map(|c| r(name).score(c, &open));
        assert_eq!(got, want, "{name}");
    }
    assert_eq!(
        r("format_answer_only").score("<answer><think>x</think>a</answer>", &open),
        0.0
    );
    // Answer rules read the <answer> block, else the whole completion.
    assert_eq!(r("exact_match").score(think_answer, &open), 1.0);
    assert_eq!(r("exact_match").score("<answer>12mm</answer>", &open), 0.0);
    // token F1: "about 12 mm" vs "12 mm": precision 2/3, recall 1 -> 0.8.
    let f1 = r("token_f1").score("<answer>about 12 mm</answer>", &open);
    assert!((f1 - 0.8).abs() < 1e-6, "{f1}");
    assert_eq!(r("token_recall").score("it is 12 mm wide", &open), 1.0);
    assert_eq!(r("yes_no").score("<answer>Yes</answer>", &closed), 1.0);
    assert_eq!(r("yes_no").score("<answer>No</answer>", &closed), 0.0);
    // numeric: 12.1 is within 1% of 12; 12.2 is not; 1,200 reads as 1200.
    assert_eq!(
        r("numeric").score("<answer>12.1 millimetres</answer>", &open),
        1.0
    );
    assert_eq!(r("numeric").score("<answer>12.2</answer>", &open), 0.0);
    assert_eq!(r("numeric").score("<answer>no size</answer>", &open), 0.0);
    let big = RewardContext::open("1200 ml");
    assert_eq!(r("numeric").score("about 1,200", &big), 1.0);
    // A multiple-choice row under any answer reward is scored by its letter.
    for name in [
        "exact_match",
        "token_f1",
        "token_recall",
        "yes_no",
        "numeric",
    ] {
        assert_eq!(
            r(name).score("<think>x</think><answer>B</answer>", &choice),
            1.0,
            "{name}"
        );
        assert_eq!(
            r(name).score("<think>x</think><answer>C</answer>", &choice),
            0.0,
            "{name}"
        );
    }
    // Every listed built-in builds; an unknown one names them all.
    for (name, _) in BUILTIN {
        assert_eq!(r(name).name(), name);
    }
    let e = builtin("f1", acc, 0.01).err().unwrap().to_string();
    assert!(e.contains("token_f1") && e.contains("numeric"), "{e}");
}

/// Reward entries in a config: names, tables, one-line errors naming the entry.
#[test]
fn reward_entries_are_checked_with_one_line_errors() {
    use medvlm::rl::config::GrpoConfig;
    let err = |toml: &str| {
        GrpoConfig::from_toml(toml, "x.toml", None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(
        err(r#"rewards = ["accuracy", { name = "mine", command = "python3 r.py" }]"#).is_empty()
    );
    for (toml, want) in [
        (r#"rewards = ["acuracy"]"#, "unknown reward \"acuracy\""),
        (
            r#"rewards = [{ command = "python3 r.py" }]"#,
            "needs a `name`",
        ),
        (r#"rewards = [{ name = "a", comand = "x" }]"#, "comand"),
        (
            r#"rewards = [{ name = "a", command = "x", url = "http://h/s" }]"#,
            "exactly one of",
        ),
        (
            r#"rewards = [{ name = "a", url = "https://h/s" }]"#,
            "https is not supported",
        ),
        (
            r#"rewards = ["format", { builtin = "format" }]"#,
            "names \"format\" twice",
        ),
        (
            r#"rewards = [{ name = "j", judge = { url = "http://h/v1", prompt = "rate it" } }]"#,
            "never shows the completion",
        ),
        (
            r#"rewards = [{ name = "a/b", command = "x" }]"#,
            "no slashes",
        ),
        (
            r#"rewards = [{ name = "a", command = "x", weight = 2.0 }]
reward_weights = [1.0]"#,
            "say the weights in one place",
        ),
        ("max_generation_batches = 0", "max_generation_batches"),
    ] {
        let e = err(toml);
        assert!(e.contains(want), "{toml}: {e}");
        assert!(!e.trim().contains('\n'), "{toml}: {e}");
    }
}

/// Under a template that opens the think block in the prompt, a completion is read with the
/// opening in front, and supervised targets leave it out; under one that writes an empty,
/// closed block, the answer is all that is left to write; without one, nothing changes. The
/// format values are the paper's regex on the whole text, as in the table above.
#[test]
fn thinking_templates_read_completions_after_their_opening() {
    use medvlm::processor::Processor;
    let tmp = tempfile::tempdir().unwrap();
    let load = |dir: &std::path::Path| Processor::from_dir(dir, &Default::default()).unwrap();
    let plain = load(&crate::common::fixtures().join("tiny-a"));
    let open_dir = crate::common::thinking_copy("tiny-a", &tmp.path().join("open"));
    let open = load(&open_dir);
    // Qwen3 with thinking off: the generation prompt writes an empty, closed block.
    let closed_dir = tmp.path().join("closed");
    crate::common::thinking_copy("tiny-a", &closed_dir);
    let cfg = closed_dir.join("tokenizer_config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("<think>\\n{%", "<think>\\n\\n</think>\\n\\n{%");
    std::fs::write(&cfg, text).unwrap();
    let closed = load(&closed_dir);
    assert_eq!(plain.template.reasoning_opening(), "");
    assert_eq!(open.template.reasoning_opening(), "<think>\n");
    assert_eq!(
        closed.template.reasoning_opening(),
        "<think>\n\n</think>\n\n"
    );

    let answer = "<answer>B</answer>";
    for (p, rationale, target) in [
        (&plain, Some("r"), "<think>r</think><answer>B</answer>"),
        (&plain, None, "<answer>B</answer>"),
        (&open, Some("r"), "r</think><answer>B</answer>"),
        (&open, None, "</think><answer>B</answer>"),
        (&closed, Some("r"), "<answer>B</answer>"),
        (&closed, None, "<answer>B</answer>"),
    ] {
        assert_eq!(p.target_after_prompt(rationale, answer), target);
    }
    // (processor, generated text, format reward of what is read, accuracy for "B")
    for (p, generated, format, strict) in [
        (
            &plain,
            "The mass enhances.</think><answer>B</answer>",
            0.0,
            1.0,
        ),
        (
            &open,
            "The mass enhances.</think><answer>B</answer>",
            1.0,
            1.0,
        ),
        (
            &open,
            "The mass enhances.</think>\n\n<answer>C</answer>",
            1.0,
            0.0,
        ),
        (&open, "<answer>B</answer>", 0.0, 1.0),
        (&open, "still thinking about <answer>B</answer>", 0.0, 1.0),
        (&closed, "<answer>B</answer>", 1.0, 1.0),
        (&plain, "<think>x</think><answer>B</answer>", 1.0, 1.0),
    ] {
        let read = p.completion_text(generated);
        assert!(read.ends_with(generated));
        assert_eq!(format_reward(&read), format, "{read:?}");
        let got = medvlm::data::answer::strict_accuracy(&read, "B", Some(4));
        assert_eq!(got, strict, "{read:?}");
    }
}
