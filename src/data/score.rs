//! How the medical VQA harnesses score an answer: one [`Protocol`] per rule, each re-implemented
//! here from the harness's Python (read to understand, written anew) and checked against the
//! original on a shared set of cases (`tests/fixtures/score/reference.json`, produced by
//! `tools/score_reference.py` from the harnesses' own source files).
//!
//! | name | rule | mirrors |
//! |---|---|---|
//! | `mc-letter` | our Strict option-letter rule | [`crate::data::answer::extract_answer`] |
//! | `closed-medevalkit` | MedEvalKit's SLAKE closed rule, case quirk kept | MedEvalKit `utils/SLAKE/SLAKE.py::cal_metrics` @ 9b12e3b |
//! | `closed` | the same, gold tested case-insensitively | MedEvalKit `utils/VQA_RAD/VQA_RAD.py::cal_metrics` @ 9b12e3b |
//! | `open-medevalkit` | MedEvalKit's open-ended exact match (+ BLEU, token P/R/F1) | MedEvalKit `utils/utils.py::judge_open_end_vqa` @ 9b12e3b |
//! | `open-exact` | exact match after lmms-eval's SLAKE normaliser | lmms-eval `lmms_eval/tasks/slake/utils.py::normalize_answer` @ 75571cf |
//! | `open-recall-llavamed` | normalised gold is a substring of the normalised prediction | LLaVA-Med v1.0.0 `llava/eval/run_eval_batch.py::evaluate` |
//! | `open-f1` | LLaVA-Med's token F1 (counts) after its normaliser | LLaVA-Med v1.0.0 `llava/eval/eval_metrics/evaluate_metrics.py::calculate_f1score` |
//! | `mc-mmmu` | MMMU's option parser (`(B)`, ` B `, option text), no-answer counted wrong | MMMU `mmmu/utils/eval_utils.py::parse_multi_choice_response` + `eval_multi_choice` @ bb0b95a |
//! | `open-mmmu` | MMMU's open parser (key phrases, numbers rounded to 2 places) | MMMU `mmmu/utils/eval_utils.py::parse_open_response` + `eval_open` @ bb0b95a |
//!
//! **Where the answer is pulled out of a reasoning completion.** [`Protocol::score`] takes the
//! model's raw output. A protocol that mirrors a harness applies exactly the extraction that
//! harness applies, because it is part of its rule: MedEvalKit's protocols read the last complete
//! `\boxed{…}`, else the concatenated `<answer>…</answer>` blocks, then cut at answer phrases
//! ("answer:", "the answer is" …); lmms-eval's SLAKE and LLaVA-Med extract nothing, so a
//! `<think>…</think><answer>…</answer>` completion is scored as the whole string there, as it
//! would be by those harnesses (the think text counts toward recall, against exact match).
//! `mc-letter` needs exactly one `<answer>` block (our Strict rule). An evaluation that wants the
//! answer block alone scored by LLaVA-Med's or lmms-eval's rule calls [`answer_block`] first
//! and says so in its report; [`Protocol::score`] never does it silently. [`score_completion`]
//! is medvlm's reading ([`Protocol::reads_answer_block`]), which `medvlm eval` and GRPO's
//! accuracy reward share.
//!
//! Python semantics reproduced: `str.lower()` (Rust's `to_lowercase`, the same full Unicode
//! mapping including the final sigma), `str.strip()`/`str.split()` (Unicode whitespace plus
//! U+001C..U+001F, [`py_isspace`]), `re`'s `\d` (Unicode decimal digits, as the regex crate's
//! `\d`), and `str.split(sep)` (non-overlapping, left to right, as Rust's `split`).

use std::sync::LazyLock;

use regex::Regex;

use crate::data::answer::{extract_answer, ground_truth, py_isspace};

/// A scoring rule, named as reports name it ([`Protocol::name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// Multiple choice: the completion's single `<answer>` block holds one option letter equal
    /// to the gold letter ([`crate::data::answer::extract_answer`], the rule `medvlm eval`
    /// uses; the gold is read with [`crate::data::answer::ground_truth`]). Our own rule: no
    /// harness original.
    McLetter,
    /// MedEvalKit's closed-question rule as SLAKE runs it (faithful, quirk kept):
    /// `utils/SLAKE/SLAKE.py::cal_metrics` @ `9b12e3b`. The gold is tested with
    /// `answer in ["yes","no"]` **before** lowercasing, so SLAKE's `"Yes"`/`"No"` (and every
    /// Chinese answer) go to `judge_close_end_vqa` (exact equality after [`medevalkit_parse`]
    /// and deleting `.` and newlines), never to the yes/no judge. Lowercase `yes`/`no` golds go
    /// to `judge_judgement`: exactly one of the substrings `yes`/`no` occurs and the gold occurs.
    ClosedMedEvalKit,
    /// Corrected closed rule: as [`Protocol::ClosedMedEvalKit`] but the gold is lowercased and
    /// stripped before the yes/no test, which is what MedEvalKit's own
    /// `utils/VQA_RAD/VQA_RAD.py` / `utils/PATH_VQA/PATH_VQA.py::cal_metrics` do (@ `9b12e3b`).
    /// Its substring quirks stay (`"no"` inside `"not"`, `"nodule"`, `"know"`; `"yes"` inside
    /// `"eyes"`); non-yes/no golds still need exact equality.
    Closed,
    /// MedEvalKit's open-question rule, `utils/utils.py::judge_open_end_vqa` as
    /// `SLAKE.py::cal_metrics` calls it (@ `9b12e3b`): the score is its `em`, plain equality of
    /// [`medevalkit_parse`]'s output with the lowercased gold (no strip, no punctuation removal:
    /// `"lung."` and `" lung"` miss `"lung"`). [`medevalkit_open`] gives its other metrics.
    OpenMedEvalKit,
    /// Exact match after lmms-eval's SLAKE normaliser ([`lmms_slake_normalize`]):
    /// `lmms_eval/tasks/slake/utils.py::slake_process_results` @ `75571cf`.
    OpenExact,
    /// LLaVA-Med's open "recall" (the number its paper tables quote): the normalised gold is a
    /// substring of the normalised prediction ([`llavamed_normalize`] of the lowercased text).
    /// `llava/eval/run_eval_batch.py::evaluate` @ v1.0.0 (`b9a98a7`). The same test is its
    /// closed accuracy there.
    OpenRecallLlavaMed,
    /// LLaVA-Med's token F1: `llava/eval/eval_metrics/evaluate_metrics.py::calculate_f1score`
    /// on the normalised texts, as `run_eval_batch.py` calls it (@ v1.0.0). [`llavamed_f1`]
    /// gives precision and recall too.
    OpenF1,
    /// MMMU's multiple-choice rule, `mmmu/utils/eval_utils.py::parse_multi_choice_response`
    /// then `eval_multi_choice` @ `bb0b95a` ([`mmmu_parse_choice`]). It needs the option texts:
    /// [`mmmu_choice_correct`] is the rule; [`Protocol::score`] without options knows only the
    /// letters `A`..=`max(D, gold)` and no option text (see there). One divergence: where the
    /// original finds no candidate it answers `random.choice(all_choices)` (module seeded once
    /// with 42, so an item's draw depends on every item parsed before it); medvlm counts such
    /// an output as unanswered and wrong, deterministically (the original's expectation there is
    /// 1/n right).
    McMmmu,
    /// MMMU's open-question rule, `mmmu/utils/eval_utils.py::parse_open_response` then
    /// `eval_open` @ `bb0b95a` ([`mmmu_parse_open`], [`mmmu_eval_open`]): the tails after key
    /// phrases ("is ", "so ", "answer " …, `=` in the last line) and every number in them; a
    /// number matches a numeric gold after rounding both to 2 places, a text matches when the
    /// lowercased gold is a substring.
    OpenMmmu,
}

impl Protocol {
    /// Every protocol, in report order.
    pub const ALL: [Protocol; 9] = [
        Protocol::McLetter,
        Protocol::ClosedMedEvalKit,
        Protocol::Closed,
        Protocol::OpenMedEvalKit,
        Protocol::OpenExact,
        Protocol::OpenRecallLlavaMed,
        Protocol::OpenF1,
        Protocol::McMmmu,
        Protocol::OpenMmmu,
    ];

    /// The stable name used in reports and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::McLetter => "mc-letter",
            Protocol::ClosedMedEvalKit => "closed-medevalkit",
            Protocol::Closed => "closed",
            Protocol::OpenMedEvalKit => "open-medevalkit",
            Protocol::OpenExact => "open-exact",
            Protocol::OpenRecallLlavaMed => "open-recall-llavamed",
            Protocol::OpenF1 => "open-f1",
            Protocol::McMmmu => "mc-mmmu",
            Protocol::OpenMmmu => "open-mmmu",
        }
    }

    /// The protocol of a [`Protocol::name`].
    pub fn from_name(name: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether the protocol reproduces a harness as it is, quirks included (`false`: our own
    /// rule or a corrected one).
    pub fn faithful(&self) -> bool {
        !matches!(self, Protocol::McLetter | Protocol::Closed)
    }

    /// The score of one raw model output against the dataset's gold answer: 0.0 or 1.0, except
    /// [`Protocol::OpenF1`] (a fraction). Where the harness itself crashes
    /// ([`medevalkit_open`] returns `None`), 0.0. [`Protocol::McMmmu`] here has no options: the
    /// gold is a letter (read as [`ground_truth`] reads it), the choices are the letters `A` to
    /// the later of `D` and the gold, with no option texts (so MMMU's option-text fallback never
    /// fires); call [`mmmu_choice_correct`] with the options for the full rule.
    pub fn score(&self, prediction: &str, answer: &str) -> f64 {
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        match self {
            Protocol::McLetter => b(mc_letter(prediction, answer, None)),
            Protocol::ClosedMedEvalKit => b(closed_medevalkit(prediction, answer)),
            Protocol::Closed => b(closed_corrected(prediction, answer)),
            Protocol::OpenMedEvalKit => {
                b(medevalkit_open(prediction, answer).is_some_and(|m| m.em))
            }
            Protocol::OpenExact => {
                b(lmms_slake_normalize(prediction) == lmms_slake_normalize(answer))
            }
            Protocol::OpenRecallLlavaMed => b(llavamed_recall(prediction, answer)),
            Protocol::OpenF1 => llavamed_f1(prediction, answer).f1,
            Protocol::McMmmu => {
                let gold = ground_truth(answer);
                let mut g = gold.chars();
                let (Some(gold), None) = (g.next(), g.next()) else {
                    return 0.0;
                };
                if !gold.is_ascii_uppercase() {
                    return 0.0;
                }
                let n = (gold.max('D') as u8 - b'A' + 1) as usize;
                let options = vec![None; n];
                b(mmmu_parse_choice_opt(prediction, &options) == Some(gold))
            }
            Protocol::OpenMmmu => b(mmmu_eval_open(answer, &mmmu_parse_open(prediction))),
        }
    }
}

impl Protocol {
    /// A rule for closed questions (`closed`, `closed-medevalkit`).
    pub fn is_closed(&self) -> bool {
        matches!(self, Protocol::Closed | Protocol::ClosedMedEvalKit)
    }

    /// The names of the protocols `keep` accepts, for an error that lists them: derived from
    /// [`Protocol::ALL`], so a new protocol appears in every such message.
    pub fn names_where(keep: impl Fn(&Protocol) -> bool) -> String {
        let names: Vec<&str> = Protocol::ALL
            .iter()
            .filter(|p| keep(p))
            .map(|p| p.name())
            .collect();
        names.join(", ")
    }

    /// A rule for open questions (`open-exact`, `open-recall-llavamed`, `open-f1`,
    /// `open-medevalkit`, `open-mmmu`).
    pub fn is_open(&self) -> bool {
        matches!(
            self,
            Protocol::OpenMedEvalKit
                | Protocol::OpenExact
                | Protocol::OpenRecallLlavaMed
                | Protocol::OpenF1
                | Protocol::OpenMmmu
        )
    }

    /// A rule for multiple-choice questions (`mc-letter`, `mc-mmmu`).
    pub fn is_choice(&self) -> bool {
        matches!(self, Protocol::McLetter | Protocol::McMmmu)
    }

    /// Whether medvlm gives this protocol the `<answer>` block of a reasoning output rather
    /// than the whole text: the harnesses these protocols come from extract nothing (their
    /// models answer bare), and a whole reasoning text would let words of the reasoning count
    /// (LLaVA-Med's recall finds "no" in "no nodule"). MedEvalKit's rules extract `<answer>`
    /// blocks themselves and get the raw output. MMMU's parsers extract nothing either (its
    /// models answer bare), so `mc-mmmu` and `open-mmmu` get the block too. Evaluation
    /// ([`crate::eval`]) and the GRPO accuracy reward both score completions this way
    /// ([`score_completion`]).
    pub fn reads_answer_block(&self) -> bool {
        matches!(
            self,
            Protocol::OpenExact
                | Protocol::OpenRecallLlavaMed
                | Protocol::OpenF1
                | Protocol::McMmmu
                | Protocol::OpenMmmu
        )
    }
}

/// The text of `completion` that `p` scores: its [`answer_block`] (else the whole output,
/// trimmed) where [`Protocol::reads_answer_block`], the raw output otherwise.
pub fn scored_text(p: Protocol, completion: &str) -> &str {
    if p.reads_answer_block() {
        answer_block(completion).unwrap_or_else(|| completion.trim())
    } else {
        completion
    }
}

/// The score of a (reasoning) completion against the gold `answer` by `p`, the answer read
/// as [`scored_text`] says: what `medvlm eval` reports and what GRPO's accuracy reward gives
/// a closed or open item.
pub fn score_completion(p: Protocol, completion: &str, answer: &str) -> f64 {
    p.score(scored_text(p, completion), answer)
}

/// The first number written in `s` (`-3`, `2.5`, `1,200`, `4e-3`, `.5`), thousands commas
/// dropped.
pub fn first_number(s: &str) -> Option<f64> {
    static NUMBER: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
            .expect("number regex is valid")
    });
    NUMBER
        .find_iter(s)
        .map(|m| m.as_str())
        .filter(|t| t.bytes().any(|b| b.is_ascii_digit()))
        .find_map(|t| t.replace(',', "").parse::<f64>().ok())
}

/// Whether the first number of `prediction` is within `tolerance` (relative to the gold's
/// magnitude, absolute when the gold is 0) of the first number of `answer`. False when
/// either has no number.
pub fn numeric_match(prediction: &str, answer: &str, tolerance: f64) -> bool {
    match (first_number(prediction), first_number(answer)) {
        (Some(p), Some(g)) => {
            let scale = if g == 0.0 { 1.0 } else { g.abs() };
            (p - g).abs() <= tolerance * scale
        }
        _ => false,
    }
}

impl<'de> serde::Deserialize<'de> for Protocol {
    /// A [`Protocol::name`] (config files).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::from_name(s).ok_or_else(|| {
            let names: Vec<&str> = Protocol::ALL.iter().map(|p| p.name()).collect();
            format!(
                "unknown scoring protocol {s:?}; known: {}",
                names.join(", ")
            )
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Python string helpers
// ---------------------------------------------------------------------------------------------

/// Python's `str.strip()`.
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Python's `str.split()` with no argument: runs of whitespace separate, no empty pieces.
fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_isspace).filter(|w| !w.is_empty())
}

/// Python's `str.lower()`.
fn py_lower(s: &str) -> String {
    s.to_lowercase()
}

// ---------------------------------------------------------------------------------------------
// Our answer block, and mc-letter
// ---------------------------------------------------------------------------------------------

/// The text of the completion's one `<answer>…</answer>` block, trimmed; `None` when there is
/// no complete block or more than one tag of either kind (the same reading as
/// [`crate::data::answer::extract_answer`]). For evaluations that score the answer block of a
/// reasoning completion with a rule whose harness extracts nothing (see the module comment).
pub fn answer_block(completion: &str) -> Option<&str> {
    const OPEN: &str = "<answer>";
    const CLOSE: &str = "</answer>";
    if completion.matches(OPEN).count() != 1 || completion.matches(CLOSE).count() != 1 {
        return None;
    }
    let start = completion.find(OPEN)? + OPEN.len();
    let end = completion.find(CLOSE)?;
    (end >= start).then(|| completion[start..end].trim())
}

/// `mc-letter`: one option letter read by [`extract_answer`] equals the gold letter (`answer`
/// as [`ground_truth`] reads it: `"B"`, `" b "`, `"<answer>B</answer>"`). `num_options`, when
/// known, makes a letter beyond the options wrong, as in `medvlm eval`.
pub fn mc_letter(prediction: &str, answer: &str, num_options: Option<usize>) -> bool {
    let gold = ground_truth(answer);
    let mut g = gold.chars();
    let (Some(gold), None) = (g.next(), g.next()) else {
        return false;
    };
    extract_answer(prediction, num_options).letter() == Some(gold)
}

// ---------------------------------------------------------------------------------------------
// MedEvalKit (alibaba-damo-academy/MedEvalKit @ 9b12e3b34232a8779cc1275417bf4f72f03d28e0)
// ---------------------------------------------------------------------------------------------

/// MedEvalKit's `\boxed{}` reader, `mathruler.grader.extract_boxed_content` (hiyouga/MathRuler):
/// the LAST `\boxed{`, its braces balanced, content stripped. Absent or unclosed gives the
/// literal string `"None"`, which MedEvalKit then compares as if the model had written it.
fn boxed_content(text: &str) -> String {
    const OPEN: &str = "\\boxed{";
    let Some(start) = text.rfind(OPEN) else {
        return "None".into();
    };
    let content = &text[start + OPEN.len()..];
    let mut depth = 0i32;
    for (i, c) in content.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if depth == -1 {
            return py_strip(&content[..i]).to_string();
        }
    }
    "None".into()
}

/// MedEvalKit `utils/utils.py::extract(text, "answer")`: the contents of EVERY complete
/// `<answer>…</answer>` pair, each followed by a space, stripped; the whole text when that is
/// empty (no pair, or only empty pairs); `""` for an empty text.
fn medevalkit_extract_answer(text: &str) -> String {
    const OPEN: &str = "<answer>";
    const CLOSE: &str = "</answer>";
    if text.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    let mut from = text.find(OPEN);
    while let Some(start) = from {
        let inner = start + OPEN.len();
        let Some(rel) = text[inner..].find(CLOSE) else {
            break;
        };
        let end = inner + rel;
        out.push_str(&text[inner..end]);
        out.push(' ');
        let next = end + CLOSE.len();
        from = text[next..].find(OPEN).map(|i| next + i);
    }
    let s = py_strip(&out);
    if s.is_empty() {
        text.to_string()
    } else {
        s.to_string()
    }
}

/// The step MedEvalKit's dataset files run before any judge (`SLAKE.py`, `VQA_RAD.py`,
/// `PATH_VQA.py::cal_metrics`): the last `\boxed{}` if there is a complete one (and it is not
/// literally `None`), else the `<answer>` blocks if the text holds `<answer>`, else the text.
fn medevalkit_preextract(response: &str) -> String {
    let boxed = boxed_content(response);
    if boxed != "None" {
        boxed
    } else if response.contains("<answer>") {
        medevalkit_extract_answer(response)
    } else {
        response.to_string()
    }
}

/// MedEvalKit's answer phrases, in the order `parse_response` tries them.
const MEDEVALKIT_PATTERNS: [&str; 9] = [
    "**answer**:",
    "**answer**",
    "*answer*:",
    "**answer:**",
    "answer is",
    "answer:",
    "答案:",
    "final answer",
    "final answer is",
];

/// MedEvalKit `utils/utils.py::parse_response`: lowercase; if the text contains `boxed`
/// anywhere, replace it by [`boxed_content`] (possibly the literal `"None"`); else if it holds
/// `<answer>`, by the answer blocks; then, for each answer phrase in order, keep what follows
/// its last occurrence. Nothing is stripped: `"answer: lung"` gives `" lung"`.
pub fn medevalkit_parse(response: &str) -> String {
    let mut r = py_lower(response);
    if r.contains("boxed") {
        r = boxed_content(&r);
    } else if r.contains("<answer>") {
        r = medevalkit_extract_answer(&r);
    }
    for p in MEDEVALKIT_PATTERNS {
        if r.contains(p) {
            // Python's `split(p)[-1]`: after the last of the non-overlapping occurrences found
            // left to right (not `rfind`, which can find an overlapping later one).
            r = r.split(p).last().unwrap_or_default().to_string();
        }
    }
    r
}

/// The cleaning both closed judges apply after [`medevalkit_parse`]: newlines and periods
/// deleted (nothing else).
fn medevalkit_closed_clean(response: &str) -> String {
    medevalkit_parse(response).replace(['\n', '.'], "")
}

/// MedEvalKit `judge_close_end_vqa`: exact equality with the lowercased gold.
fn judge_close_end_vqa(answer: &str, response: &str) -> bool {
    medevalkit_closed_clean(response) == py_lower(answer)
}

/// MedEvalKit `judge_judgement`: exactly one of the substrings `yes` / `no` occurs, and the
/// lowercased gold occurs.
fn judge_judgement(answer: &str, response: &str) -> bool {
    let r = medevalkit_closed_clean(response);
    (r.contains("yes") ^ r.contains("no")) && r.contains(&py_lower(answer))
}

/// `closed-medevalkit`: see [`Protocol::ClosedMedEvalKit`].
pub fn closed_medevalkit(prediction: &str, answer: &str) -> bool {
    let response = medevalkit_preextract(prediction);
    if answer == "yes" || answer == "no" {
        judge_judgement(answer, &response)
    } else {
        judge_close_end_vqa(answer, &response)
    }
}

/// `closed`: see [`Protocol::Closed`].
pub fn closed_corrected(prediction: &str, answer: &str) -> bool {
    let response = medevalkit_preextract(prediction);
    let gold = py_lower(answer);
    let gold = py_strip(&gold);
    if gold == "yes" || gold == "no" {
        judge_judgement(gold, &response)
    } else {
        judge_close_end_vqa(answer, &response)
    }
}

/// What MedEvalKit's `judge_open_end_vqa` reports for one open question (ROUGE left out).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MedEvalKitOpen {
    /// The accuracy MedEvalKit counts: parsed response == lowercased gold.
    pub em: bool,
    /// nltk `sentence_bleu`, weights `1/n` for n = 1..4, no smoothing.
    pub bleu: [f64; 4],
    /// The set-of-tokens precision, recall and F1, correctly named.
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl MedEvalKitOpen {
    /// The values under the names MedEvalKit REPORTS them: `calculate_f1` returns
    /// `(f1, precision, recall)` and the caller unpacks `precision, recall, f1`, so its
    /// "precision" is the F1, its "recall" the precision and its "f1" the recall.
    /// Returns `(reported_precision, reported_recall, reported_f1)`.
    pub fn as_reported(&self) -> (f64, f64, f64) {
        (self.f1, self.precision, self.recall)
    }
}

/// MedEvalKit `tokenize` for BLEU: lowercase, `.` → ` .`, split on single spaces (empty
/// tokens kept).
fn medevalkit_bleu_tokens(text: &str) -> Vec<String> {
    py_lower(text)
        .replace('.', " .")
        .split(' ')
        .map(str::to_string)
        .collect()
}

/// nltk 3.10 `sentence_bleu([reference], hypothesis, weights=[1/n]*n)` with no smoothing:
/// clipped n-gram precisions, brevity penalty `exp(1 - r/c)` for `c <= r`; 0 when no unigram
/// matches; a zero higher-order precision is replaced by the smallest normal float (nltk's
/// `method0`), which makes the score tiny but not zero.
fn nltk_sentence_bleu(reference: &[String], hypothesis: &[String], n: usize) -> f64 {
    use std::collections::HashMap;
    fn counts(toks: &[String], k: usize) -> HashMap<&[String], usize> {
        let mut m: HashMap<&[String], usize> = HashMap::new();
        if toks.len() >= k {
            for w in toks.windows(k) {
                *m.entry(w).or_default() += 1;
            }
        }
        m
    }
    let mut precisions = Vec::with_capacity(n);
    for k in 1..=n {
        let hyp = counts(hypothesis, k);
        let rf = counts(reference, k);
        let num: usize = hyp
            .iter()
            .map(|(g, c)| (*c).min(rf.get(g).copied().unwrap_or(0)))
            .sum();
        let den = hyp.values().sum::<usize>().max(1);
        precisions.push((num, den));
    }
    if precisions[0].0 == 0 {
        return 0.0;
    }
    let (c, r) = (hypothesis.len(), reference.len());
    let bp = if c > r {
        1.0
    } else if c == 0 {
        0.0
    } else {
        (1.0 - r as f64 / c as f64).exp()
    };
    let w = 1.0 / n as f64;
    let s: f64 = precisions
        .iter()
        .map(|&(num, den)| {
            let p = if num == 0 {
                f64::MIN_POSITIVE
            } else {
                num as f64 / den as f64
            };
            w * p.ln()
        })
        .sum();
    bp * s.exp()
}

/// `rouge==1.0.1` splits each text into sentences at `.` and drops empty pieces; with no piece
/// left it raises "Hypothesis is empty." / "Reference is empty.", so MedEvalKit crashes.
fn rouge_would_raise(text: &str) -> bool {
    text.split('.').all(str::is_empty)
}

/// MedEvalKit's open-question metrics for one prediction (`judge_open_end_vqa` after
/// `cal_metrics`' pre-extraction). `None` where MedEvalKit raises instead of scoring: the
/// parsed response or the gold has no text between periods (ROUGE's ValueError), or no
/// whitespace-separated token (`calculate_f1` returns a bare `0`, which the caller cannot
/// unpack: TypeError). An empty or blank prediction is such a case.
pub fn medevalkit_open(prediction: &str, answer: &str) -> Option<MedEvalKitOpen> {
    let gold = py_lower(answer);
    let response = medevalkit_parse(&medevalkit_preextract(prediction));
    let (hyp, rf) = (
        medevalkit_bleu_tokens(&response),
        medevalkit_bleu_tokens(&gold),
    );
    let bleu = [1, 2, 3, 4].map(|n| nltk_sentence_bleu(&rf, &hyp, n));
    if rouge_would_raise(&py_lower(&response)) || rouge_would_raise(&gold) {
        return None;
    }
    // calculate_f1: sets of lowercased whitespace tokens.
    let pl = py_lower(&response);
    let p: std::collections::HashSet<&str> = py_split(&pl).collect();
    let g: std::collections::HashSet<&str> = py_split(&gold).collect();
    if p.is_empty() || g.is_empty() {
        return None;
    }
    let common = p.intersection(&g).count() as f64;
    let precision = common / p.len() as f64;
    let recall = common / g.len() as f64;
    let (precision, recall, f1) = if precision + recall == 0.0 {
        (0.0, 0.0, 0.0)
    } else {
        (
            precision,
            recall,
            2.0 * (precision * recall) / (precision + recall),
        )
    };
    Some(MedEvalKitOpen {
        em: response == gold,
        bleu,
        precision,
        recall,
        f1,
    })
}

// ---------------------------------------------------------------------------------------------
// lmms-eval SLAKE (EvolvingLMMs-Lab/lmms-eval @ 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3)
// ---------------------------------------------------------------------------------------------

const LMMS_EN_YES: [&str; 4] = ["yes", "yeah", "yep", "true"];
const LMMS_EN_NO: [&str; 3] = ["no", "nope", "false"];
const LMMS_ZH_YES: [&str; 8] = ["是", "是的", "有", "包含", "可以", "能", "会", "正常"];
const LMMS_ZH_NO: [&str; 10] = [
    "否",
    "不是",
    "没有",
    "无",
    "不包含",
    "不能",
    "不会",
    "不可以",
    "不正常",
    "异常",
];
/// lmms-eval's `ZH_PUNCTUATION` (full-width and CJK punctuation), each mapped to a space.
const LMMS_ZH_PUNCT: &str =
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～、，。；：《》？【】（）";

static LMMS_PAREN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\([^)]*\)").expect("valid regex"));
static LMMS_ZH_PAREN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"（[^）]*）").expect("valid regex"));

/// lmms-eval `slake/utils.py::normalize_answer`: strip, lowercase, delete `(…)` and `（…）`
/// groups (each becomes a space), ASCII and CJK punctuation → space, whitespace runs → one
/// space, strip; then the whole string `x ray`/`xray` → `xray`, and the whole string in its
/// yes/no synonym sets → `yes`/`no` (English and Chinese; note `正常` counts as yes and `异常`
/// as no). No article removal, no number words.
pub fn lmms_slake_normalize(answer: &str) -> String {
    let text = py_lower(py_strip(answer));
    let text = LMMS_PAREN.replace_all(&text, " ");
    let text = LMMS_ZH_PAREN.replace_all(&text, " ");
    let text: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_punctuation() || LMMS_ZH_PUNCT.contains(c) {
                ' '
            } else {
                c
            }
        })
        .collect();
    let text = py_split(&text).collect::<Vec<_>>().join(" ");
    let text = if text == "x ray" || text == "xray" {
        "xray".to_string()
    } else {
        text
    };
    let t = text.as_str();
    if LMMS_EN_YES.contains(&t) || LMMS_ZH_YES.contains(&t) {
        "yes".into()
    } else if LMMS_EN_NO.contains(&t) || LMMS_ZH_NO.contains(&t) {
        "no".into()
    } else {
        text
    }
}

// ---------------------------------------------------------------------------------------------
// LLaVA-Med (microsoft/LLaVA-Med v1.0.0 = b9a98a736d2ef05bcf5ff345be6403fb3a664eaf)
// ---------------------------------------------------------------------------------------------

/// `glossary.py`'s `punct` list: note it lacks `.` `:` `'` `*` `#` `%` `&` `$`.
const LLAVA_PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];
/// `glossary.py`'s `manual_map`: number words to digits, and `none` to `0`.
const LLAVA_NUMBERS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];
const LLAVA_ARTICLES: [&str; 3] = ["a", "an", "the"];

static DIGIT_COMMA_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\d,\d").expect("valid regex"));
static DIGIT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\d").expect("valid regex"));

/// LLaVA-Med `glossary.py::normalize_word` (the VQA-v2 answer normaliser):
/// 1. each character of its punctuation list is deleted if it touches a space anywhere in the
///    ORIGINAL text (or if the text holds digit-comma-digit anywhere), else replaced by a space;
/// 2. periods not followed by a digit are deleted — at most 32 of them, because the original
///    passes `re.UNICODE` (32) as `re.sub`'s count; its look-behind is mistyped as a
///    look-ahead for `<=`, so only "not followed by a digit" matters (`2.5` keeps its point);
/// 3. lowercase, split on whitespace, number words → digits (`none` → `0`), articles
///    `a`/`an`/`the` dropped, the VQA contraction table applied (`dont` → `don't`), joined by
///    single spaces, commas deleted.
pub fn llavamed_normalize(token: &str) -> String {
    let digit_comma = DIGIT_COMMA_DIGIT.is_match(token);
    let mut t = token.to_string();
    for p in LLAVA_PUNCT {
        let touches = token.contains(&format!("{p} ")) || token.contains(&format!(" {p}"));
        t = t.replace(p, if touches || digit_comma { "" } else { " " });
    }
    let mut stripped = String::with_capacity(t.len());
    let mut removed = 0;
    for (i, c) in t.char_indices() {
        if c == '.' && removed < 32 && !DIGIT.is_match(&t[i + 1..]) {
            removed += 1;
            continue;
        }
        stripped.push(c);
    }
    let lower = py_lower(&stripped);
    let words: Vec<&str> = py_split(&lower)
        .map(|w| {
            LLAVA_NUMBERS
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, v)| *v)
        })
        .filter(|w| !LLAVA_ARTICLES.contains(w))
        .map(|w| {
            CONTRACTIONS
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, v)| *v)
        })
        .collect();
    words.join(" ").replace(',', "")
}

/// How `run_eval_batch.py` prepares both sides: `normalize_word(text.lower())`.
fn llavamed_prepare(text: &str) -> String {
    llavamed_normalize(&py_lower(text))
}

/// `open-recall-llavamed`: the prepared gold is a substring of the prepared prediction (an
/// empty gold is in everything).
pub fn llavamed_recall(prediction: &str, answer: &str) -> bool {
    llavamed_prepare(prediction).contains(&llavamed_prepare(answer))
}

/// LLaVA-Med's token scores for one item.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenF1 {
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
}

/// `calculate_f1score(pred, gold)` on the prepared texts. It normalises AGAIN inside (the
/// second pass can change text: a contraction's `'` survives, a freshly adjacent `.` goes), then
/// counts lowercased whitespace tokens: true positives are the prediction's counts of tokens
/// also in the gold, false positives the prediction's other tokens, false negatives the gold's
/// tokens absent from the prediction. All zero when either side has no token or nothing matches.
pub fn llavamed_f1(prediction: &str, answer: &str) -> TokenF1 {
    use std::collections::HashMap;
    let words = |s: &str| {
        let mut m: HashMap<String, usize> = HashMap::new();
        for w in py_split(&py_lower(&llavamed_normalize(s))) {
            *m.entry(w.to_string()).or_default() += 1;
        }
        m
    };
    let cand = words(&llavamed_prepare(prediction));
    let refw = words(&llavamed_prepare(answer));
    let zero = TokenF1 {
        f1: 0.0,
        precision: 0.0,
        recall: 0.0,
    };
    if cand.is_empty() || refw.is_empty() {
        return zero;
    }
    let tp: usize = cand
        .iter()
        .filter(|(w, _)| refw.contains_key(*w))
        .map(|(_, c)| c)
        .sum();
    let fp: usize = cand
        .iter()
        .filter(|(w, _)| !refw.contains_key(*w))
        .map(|(_, c)| c)
        .sum();
    let fn_: usize = refw
        .iter()
        .filter(|(w, _)| !cand.contains_key(*w))
        .map(|(_, c)| c)
        .sum();
    if tp == 0 {
        return zero;
    }
    let precision = tp as f64 / (tp + fp) as f64;
    let recall = tp as f64 / (tp + fn_) as f64;
    TokenF1 {
        f1: 2.0 * precision * recall / (precision + recall),
        precision,
        recall,
    }
}

// ---------------------------------------------------------------------------------------------
// MMMU (MMMU-Benchmark/MMMU @ bb0b95a945998d91dfef37e969e07d49d1139438, mmmu/utils/eval_utils.py)
// ---------------------------------------------------------------------------------------------

/// The letter of option `i` as MMMU's `get_multi_choice_info` names it (`A`, `B`, …).
fn mmmu_letter(i: usize) -> char {
    char::from_u32('A' as u32 + i as u32).unwrap_or('?')
}

/// MMMU `mmmu/utils/eval_utils.py::parse_multi_choice_response` @ `bb0b95a`, the choices being
/// the letters `A`, `B`, … of `options` (as `get_multi_choice_info` makes them):
/// 1. strip `, . ! ? ; : '` from both ends, one character kind after the other, then pad with a
///    space on each side;
/// 2. candidates: every letter written `(X)`; if none, every letter standing alone (` X `); if
///    none and the padded response has more than 5 whitespace tokens, every option whose
///    lowercased text occurs in the lowercased response (an empty option text always does);
/// 3. one candidate is the answer; of several, the one whose last occurrence (of the form that
///    found it) starts latest, the first such in option order on a tie (`np.argmax`).
///
/// `None` where nothing is found: the original then returns `random.choice(all_choices)`;
/// medvlm counts it as no answer (see [`Protocol::McMmmu`]).
pub fn mmmu_parse_choice(response: &str, options: &[&str]) -> Option<char> {
    let options: Vec<Option<&str>> = options.iter().map(|o| Some(*o)).collect();
    mmmu_parse_choice_opt(response, &options)
}

/// [`mmmu_parse_choice`] where an option's text may be unknown (`None`: never matched by text).
fn mmmu_parse_choice_opt(response: &str, options: &[Option<&str>]) -> Option<char> {
    let mut r = response;
    for c in [',', '.', '!', '?', ';', ':', '\''] {
        r = r.trim_matches(c);
    }
    let padded = format!(" {r} ");
    let letters: Vec<char> = (0..options.len()).map(mmmu_letter).collect();
    // (candidate index, where its deciding occurrence starts)
    let bracket: Vec<(usize, usize)> = letters
        .iter()
        .enumerate()
        .filter_map(|(i, l)| padded.rfind(&format!("({l})")).map(|at| (i, at)))
        .collect();
    let cands = if !bracket.is_empty() {
        bracket
    } else {
        let alone: Vec<(usize, usize)> = letters
            .iter()
            .enumerate()
            .filter_map(|(i, l)| padded.rfind(&format!(" {l} ")).map(|at| (i, at)))
            .collect();
        if !alone.is_empty() || py_split(&padded).count() <= 5 {
            alone
        } else {
            let lower = py_lower(&padded);
            options
                .iter()
                .enumerate()
                .filter_map(|(i, o)| o.and_then(|o| lower.rfind(&py_lower(o)).map(|at| (i, at))))
                .collect()
        }
    };
    // np.argmax: the first of the maxima. (Byte offsets order like Python's code-point ones.)
    let mut best: Option<(usize, usize)> = None;
    for (i, at) in cands {
        if best.is_none_or(|(_, b)| at > b) {
            best = Some((i, at));
        }
    }
    best.map(|(i, _)| letters[i])
}

/// `mc-mmmu` with the options: MMMU's `eval_multi_choice(gold, parsed)` for the letter of
/// `options[gold_index]`, the response parsed by [`mmmu_parse_choice`] (no answer is wrong).
pub fn mmmu_choice_correct(response: &str, options: &[&str], gold_index: usize) -> bool {
    gold_index < options.len()
        && mmmu_parse_choice(response, options) == Some(mmmu_letter(gold_index))
}

/// One normalised MMMU value (`normalize_str`): a number rounded to 2 places, or lowercased text.
#[derive(Clone, Debug, PartialEq)]
pub enum MmmuValue {
    Number(f64),
    Text(String),
}

/// Python's `float(s)` on a `str`: surrounding whitespace ignored, Unicode decimal digits read
/// as digits, `_` allowed between digits, `inf`/`infinity`/`nan` in any case, with a sign.
fn py_float(s: &str) -> Option<f64> {
    static ND: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\d$").expect("valid regex"));
    let is_nd = |c: char| ND.is_match(c.encode_utf8(&mut [0; 4]));
    let chars: Vec<char> = py_strip(s).chars().collect();
    let mut out = String::with_capacity(chars.len());
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii() {
            if c == '_' {
                let digit = |j: Option<&char>| j.is_some_and(|&d| is_nd(d));
                if !(i > 0 && digit(chars.get(i - 1)) && digit(chars.get(i + 1))) {
                    return None;
                }
                continue;
            }
            out.push(c);
        } else if is_nd(c) {
            // Unicode's decimal digits come in runs of ten from zero.
            let mut start = c as u32;
            while start > 0 && char::from_u32(start - 1).is_some_and(is_nd) {
                start -= 1;
            }
            out.push(char::from(b'0' + ((c as u32 - start) % 10) as u8));
        } else {
            return None;
        }
    }
    out.parse::<f64>().ok()
}

/// Python's `round(x, 2)` on a float: correctly rounded to 2 decimals (half to even on the
/// exact binary value, as Rust's `{:.2}` formats), read back.
fn py_round2(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.2}").parse().unwrap_or(x)
}

/// MMMU `eval_utils.py::normalize_str` @ `bb0b95a`: stripped; a number (Python `float` of the
/// text without commas) becomes that number rounded to 2 places; other text is lowercased, and a
/// one-character text becomes the two padded forms `" x"`, `"x "`.
pub fn mmmu_normalize(s: &str) -> Vec<MmmuValue> {
    let s = py_strip(s);
    if let Some(x) = py_float(&s.replace(',', "")) {
        return vec![MmmuValue::Number(py_round2(x))];
    }
    let lower = py_lower(s);
    if lower.chars().count() == 1 {
        return vec![
            MmmuValue::Text(format!(" {lower}")),
            MmmuValue::Text(format!("{lower} ")),
        ];
    }
    vec![MmmuValue::Text(lower)]
}

static MMMU_NUM_COMMAS: LazyLock<fancy_regex::Regex> =
    LazyLock::new(|| fancy_regex::Regex::new(r"-?\b\d{1,3}(?:,\d{3})+\b").expect("valid regex"));
static MMMU_NUM_SCI: LazyLock<fancy_regex::Regex> =
    LazyLock::new(|| fancy_regex::Regex::new(r"-?\d+(?:\.\d+)?[eE][+-]?\d+").expect("valid regex"));
static MMMU_NUM_SIMPLE: LazyLock<fancy_regex::Regex> = LazyLock::new(|| {
    fancy_regex::Regex::new(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
        .expect("valid regex")
});

/// MMMU `eval_utils.py::extract_numbers` @ `bb0b95a`: the matches of its three patterns (with
/// commas, scientific, simple; the last needs look-ahead with backtracking, hence
/// `fancy_regex`), in that order.
pub fn mmmu_extract_numbers(s: &str) -> Vec<String> {
    [&*MMMU_NUM_COMMAS, &*MMMU_NUM_SCI, &*MMMU_NUM_SIMPLE]
        .into_iter()
        .flat_map(|re| {
            re.find_iter(s)
                .filter_map(|m| m.ok().map(|m| m.as_str().to_string()))
        })
        .collect()
}

/// MMMU `eval_utils.py::parse_open_response` @ `bb0b95a` (with its `get_key_subresponses`):
/// 1. the response stripped, `.` stripped from both ends, lowercased, then split into lines
///    (its sentence split `\.\s(?=[A-Z])` runs on the lowercased text, so it never fires);
/// 2. per line, after each key phrase present (`could be `, `so `, `is `, `thus `,
///    `therefore `, `final `, `answer `, `result `; also `=` on the last line) the text after
///    its last occurrence, stripped; the shortest (in characters, the earliest on a tie; an
///    empty one is replaced by the next) is kept unless it is empty or one punctuation mark;
/// 3. no kept tail: the whole prepared response; then every number in each tail is added, all
///    go through [`mmmu_normalize`], and duplicates go (first kept).
pub fn mmmu_parse_open(response: &str) -> Vec<MmmuValue> {
    let prepared = py_lower(py_strip(response).trim_matches('.'));
    let lines: Vec<&str> = prepared.split('\n').collect();
    let mut keys: Vec<String> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let mut indicators = vec![
            "could be ",
            "so ",
            "is ",
            "thus ",
            "therefore ",
            "final ",
            "answer ",
            "result ",
        ];
        if i + 1 == lines.len() {
            indicators.push("=");
        }
        let mut shortest: Option<&str> = None;
        for ind in indicators {
            if !line.contains(ind) {
                continue;
            }
            let tail = py_strip(line.split(ind).last().unwrap_or(""));
            match shortest {
                Some(s) if !s.is_empty() && tail.chars().count() >= s.chars().count() => {}
                _ => shortest = Some(tail),
            }
        }
        if let Some(s) = shortest.filter(|s| !s.is_empty()) {
            if ![":", ",", ".", "!", "?", ";", "'"].contains(&py_strip(s)) {
                keys.push(s.to_string());
            }
        }
    }
    if keys.is_empty() {
        keys.push(prepared.clone());
    }
    let numbers: Vec<String> = keys.iter().flat_map(|k| mmmu_extract_numbers(k)).collect();
    let mut out: Vec<MmmuValue> = Vec::new();
    for v in keys.iter().chain(&numbers).flat_map(|s| mmmu_normalize(s)) {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// MMMU `eval_utils.py::eval_open` @ `bb0b95a` for one gold string: a parsed text is right when
/// a text form of the normalised gold is its substring; a parsed number when it equals a
/// numeric gold (both rounded to 2 places: `3.50` is `3.5`, NaN is nothing).
pub fn mmmu_eval_open(answer: &str, parsed: &[MmmuValue]) -> bool {
    let gold = mmmu_normalize(answer);
    parsed.iter().any(|p| match p {
        MmmuValue::Text(t) => gold
            .iter()
            .any(|g| matches!(g, MmmuValue::Text(g) if t.contains(g.as_str()))),
        MmmuValue::Number(x) => gold
            .iter()
            .any(|g| matches!(g, MmmuValue::Number(g) if g == x)),
    })
}

/// The VQA-v2 contraction table LLaVA-Med's `glossary.py` carries (`contractions`), as data: a
/// word equal to a key becomes the value. (Keys with capitals never match, since the text is
/// lowercased first; kept so the table is the harness's.)
const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_name(p.name()), Some(p));
            assert_eq!(p.name().parse::<Protocol>(), Ok(p));
        }
        assert!("closed-llava".parse::<Protocol>().is_err());
        assert!(!Protocol::Closed.faithful());
        assert!(Protocol::ClosedMedEvalKit.faithful());
    }

    #[test]
    fn mc_letter_uses_the_strict_rule() {
        let s = |p: &str, a: &str| Protocol::McLetter.score(p, a);
        assert_eq!(s("<think>x</think><answer>B</answer>", "B"), 1.0);
        assert_eq!(
            s("<answer>(b)</answer>", "B"),
            0.0,
            "lowercase is no letter"
        );
        assert_eq!(s("<answer>B. Brain</answer>", " b "), 1.0);
        assert_eq!(s("B", "B"), 0.0, "no answer block");
        assert_eq!(s("<answer>A or B</answer>", "B"), 0.0);
        assert!(!mc_letter("<answer>E</answer>", "E", Some(4)));
        assert!(mc_letter("<answer>E</answer>", "E", Some(5)));
    }

    #[test]
    fn medevalkit_closed_case_quirk() {
        // SLAKE's capitalised gold skips the yes/no judge: exact equality after parsing.
        assert!(closed_medevalkit("Yes.", "Yes"));
        assert!(!closed_medevalkit("Yes, it is.", "Yes"));
        assert!(!closed_medevalkit(" yes", "Yes"), "no strip");
        // Lowercase gold: substring judge, with its quirks.
        assert!(closed_medevalkit("Yes, it is.", "yes"));
        assert!(
            !closed_medevalkit("yes, there is no effusion", "yes"),
            "both yes and no"
        );
        assert!(
            closed_medevalkit("The image is normal.", "no"),
            "no inside normal"
        );
        assert!(
            closed_medevalkit("eyes are visible", "yes"),
            "yes inside eyes"
        );
        // The corrected rule routes "Yes" to the judge.
        assert!(closed_corrected("Yes, it is.", "Yes"));
        assert!(closed_corrected(" yes", "Yes"));
        assert!(
            !closed_corrected(" lung", "Lung"),
            "non-yes/no gold: still exact"
        );
        assert!(closed_corrected("lung.", "Lung"));
    }

    #[test]
    fn medevalkit_extraction() {
        assert_eq!(boxed_content(r"so \boxed{a} then \boxed{b{c}} x"), "b{c}");
        assert_eq!(boxed_content(r"\boxed{"), "None");
        assert_eq!(
            medevalkit_extract_answer("<answer>a</answer>x<answer> b </answer>"),
            "a  b"
        );
        assert_eq!(
            medevalkit_extract_answer("<answer></answer>z"),
            "<answer></answer>z"
        );
        assert_eq!(medevalkit_parse("The answer is: Lung"), ": lung");
        assert_eq!(medevalkit_parse("Answer: lung"), " lung");
        assert_eq!(medevalkit_parse("boxed lung"), "None");
        // Last piece of a left-to-right split, not after the last (overlapping) match.
        assert_eq!(medevalkit_parse("**answer**answer**"), "answer**");
    }

    #[test]
    fn medevalkit_open_by_hand() {
        let m = medevalkit_open("left lung", "lung").expect("scores");
        assert!(!m.em);
        // tokens {left, lung} vs {lung}: precision 1/2, recall 1, f1 2/3.
        assert_eq!((m.precision, m.recall), (0.5, 1.0));
        assert!((m.f1 - 2.0 / 3.0).abs() < 1e-15);
        assert_eq!(m.as_reported(), (m.f1, 0.5, 1.0));
        // BLEU-1: 1 of 2 unigrams match, no brevity penalty (c = 2 > r = 1).
        assert_eq!(m.bleu[0], 0.5);
        // BLEU-2: bigram precision 0 → smallest float: sqrt(0.5 * 2.2e-308).
        let want = (0.5f64.ln() / 2.0 + f64::MIN_POSITIVE.ln() / 2.0).exp();
        assert!((m.bleu[1] - want).abs() < 1e-300);
        let m = medevalkit_open("Lung", "lung").expect("scores");
        assert!(m.em);
        assert_eq!(m.bleu[0], 1.0);
        assert!(!medevalkit_open("lung.", "lung").expect("scores").em);
        // BLEU-1 with brevity penalty: hyp "lung" vs ref "left lung" → exp(1 - 2/1).
        let m = medevalkit_open("lung", "left lung").expect("scores");
        assert!((m.bleu[0] - (-1.0f64).exp()).abs() < 1e-15);
        assert_eq!(medevalkit_open("", "lung"), None);
        assert_eq!(medevalkit_open("  ", "lung"), None);
        assert_eq!(medevalkit_open("...", "lung"), None);
        assert_eq!(Protocol::OpenMedEvalKit.score("", "lung"), 0.0);
    }

    #[test]
    fn lmms_normaliser_by_hand() {
        assert_eq!(lmms_slake_normalize("Left Lung, Right"), "left lung right");
        assert_eq!(lmms_slake_normalize("CT (computed tomography)"), "ct");
        assert_eq!(
            lmms_slake_normalize(" X-Ray. "),
            "x ray".replace("x ray", "xray")
        );
        assert_eq!(lmms_slake_normalize("是的。"), "yes");
        assert_eq!(lmms_slake_normalize("异常"), "no");
        assert_eq!(
            lmms_slake_normalize("the lung"),
            "the lung",
            "articles stay"
        );
        assert_eq!(Protocol::OpenExact.score("Yes", "yeah"), 1.0);
        assert_eq!(Protocol::OpenExact.score("two", "2"), 0.0);
    }

    #[test]
    fn llavamed_normaliser_by_hand() {
        assert_eq!(llavamed_normalize("the left-lung"), "left lung");
        assert_eq!(
            llavamed_normalize("left - lung"),
            "left lung",
            "dash touches a space: deleted"
        );
        assert_eq!(llavamed_normalize("two nodules."), "2 nodules");
        assert_eq!(llavamed_normalize("none"), "0");
        assert_eq!(llavamed_normalize("2.5 cm"), "2.5 cm");
        assert_eq!(llavamed_normalize("dont"), "don't");
        assert_eq!(llavamed_normalize("1,000 (approx)"), "1000 approx");
        let many = ".".repeat(40);
        // re.sub's count is re.UNICODE = 32: eight of forty periods survive.
        assert_eq!(llavamed_normalize(&many), ".".repeat(8));
    }

    #[test]
    fn llavamed_scores_by_hand() {
        assert!(llavamed_recall(
            "The abnormality is in the left lung.",
            "Left Lung"
        ));
        assert!(llavamed_recall("lungs", "lung"), "substring, not word");
        assert!(!llavamed_recall("lung left", "left lung"));
        // pred tokens [left, lung, lung], gold [lung]: tp 2, fp 1, fn 0.
        let f = llavamed_f1("left lung lung", "lung");
        assert!((f.precision - 2.0 / 3.0).abs() < 1e-15);
        assert_eq!(f.recall, 1.0);
        assert!((f.f1 - 0.8).abs() < 1e-15);
        assert_eq!(llavamed_f1("", "lung").f1, 0.0);
        assert_eq!(llavamed_f1("heart", "lung").f1, 0.0);
    }

    #[test]
    fn mmmu_parsers_by_hand() {
        let opts = [
            "Pneumonia",
            "Pleural effusion",
            "Pneumothorax",
            "Atelectasis",
        ];
        assert_eq!(mmmu_parse_choice("The answer is (B).", &opts), Some('B'));
        assert_eq!(
            mmmu_parse_choice("(A) or (B)", &opts),
            Some('B'),
            "last wins"
        );
        assert_eq!(
            mmmu_parse_choice("no idea", &opts),
            None,
            "random fallback: none"
        );
        assert_eq!(
            mmmu_parse_choice("it is most likely a pleural effusion here", &opts),
            Some('B')
        );
        // "B." is no lone letter and 3 tokens are too few for the option text: unparsed.
        assert!(!mmmu_choice_correct("B. Pleural effusion", &opts, 1));
        assert!(mmmu_choice_correct("B", &opts, 1));
        assert_eq!(Protocol::McMmmu.score("The answer is (C)", "C"), 1.0);
        assert_eq!(Protocol::McMmmu.score("no idea", "A"), 0.0);
        assert!(mmmu_eval_open("3.5", &mmmu_parse_open("3.50")));
        assert!(mmmu_eval_open("42", &mmmu_parse_open("The dose is 42 mg.")));
        assert!(
            !mmmu_eval_open("b", &mmmu_parse_open("ab")),
            "one letter padded"
        );
        assert_eq!(mmmu_normalize("0.125"), vec![MmmuValue::Number(0.12)]);
        assert_eq!(mmmu_extract_numbers("1.23e5"), vec!["1.23e5", "1", "5"]);
        assert!(Protocol::OpenMmmu.is_open() && Protocol::McMmmu.is_choice());
    }

    #[test]
    fn answer_block_reads_one_block() {
        assert_eq!(
            answer_block("<think>a</think><answer> x </answer>"),
            Some("x")
        );
        assert_eq!(answer_block("<answer>x</answer><answer>y</answer>"), None);
        assert_eq!(answer_block("x"), None);
        assert_eq!(answer_block("</answer>x<answer>"), None);
    }
}
