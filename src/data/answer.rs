//! How a model's answer is read: THE answer-extraction rule evaluation uses
//! ([`extract_answer`]), the Strict accuracy built on it, the paper's format rule and the
//! paper's released accuracy rule ([`paper_accuracy`]).
//!
//! They live with the data, below both evaluation and training, because the two must never
//! drift apart: the default (Strict) GRPO accuracy reward is defined *through*
//! [`extract_answer`], so a policy cannot learn to please the trainer with answers the
//! evaluator would mark wrong (or the reverse). `crate::rl::reward` wraps them as rewards.
//!
//! [`paper_accuracy`] reproduces MedVLM-R1's released accuracy reward character for character
//! (it is needed to reproduce the paper's training run), loopholes included: a lowercase `a` is
//! read as option A, letters inside words count ("Brain" holds B, A and I, so scores 0), only the
//! first `<answer>` block is read and anything after it is ignored, and the tags are matched
//! case-insensitively. The paper's Python is quoted on [`paper_accuracy`].
//!
//! Python's `str.strip()`, `str.upper()` and `re`'s `\s` / `IGNORECASE` are Unicode-aware; the
//! paper-rule code here reproduces them exactly, including their non-ASCII corners (see
//! [`py_isspace`] and [`py_ignorecase_eq`]). The one remaining difference: Python 3.11's
//! `upper()` uses Unicode 14.0 and Rust's `to_uppercase` a newer version, so characters added
//! to Unicode after 14.0 may uppercase differently. None of them uppercases to an ASCII letter,
//! so no reward can change because of it.

use std::sync::LazyLock;

use regex::Regex;

// ---------------------------------------------------------------------------------------------
// Format reward
// ---------------------------------------------------------------------------------------------

/// `re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", content, re.DOTALL)`.
///
/// Whether a *full* match exists does not depend on laziness, so anchoring with `\A`/`\z` gives
/// Python's fullmatch exactly (Python backtracks through every way `.*?` can expand; the regex
/// crate decides the same existence question). `\z`, not `$`: Python's fullmatch does not accept
/// a trailing newline, while `$` would in Python. Python's `\s` is `str.isspace`, which is
/// Unicode White_Space (Rust's `\s`) plus the separators U+001C..U+001F, hence the extra range.
static FORMAT_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\A(?s:<think>.*?</think>[\s\x1C-\x1F]*<answer>.*?</answer>)\z")
        .expect("format regex is valid")
});

/// The paper's format reward: 1.0 if the WHOLE completion is `<think>…</think>`, optional
/// whitespace, `<answer>…</answer>` (tags case-sensitive, blocks may span lines), else 0.0.
///
/// Because `.*?` may run across a closing tag, `<think>a</think><think>b</think><answer>C</answer>`
/// and `<think>x</think><answer>A</answer><answer>B</answer>` both score 1.0, as in Python.
/// Leading whitespace or any text after the last `</answer>` scores 0.0.
pub fn format_reward(completion: &str) -> f32 {
    layout_reward(Layout::ThinkThenAnswer, completion)
}

/// The completion layouts a format reward can ask for: the paper's reasoning then answer,
/// answer then reasoning, or the answer alone (Med-R1 found the last two generalise better
/// on some modalities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `<think>…</think><answer>…</answer>` (MedVLM-R1).
    ThinkThenAnswer,
    /// `<answer>…</answer><think>…</think>`.
    AnswerThenThink,
    /// `<answer>…</answer>` and nothing else.
    AnswerOnly,
}

/// The other layouts, matched with the paper regex's conventions (whole completion, tags
/// case-sensitive, blocks may span lines, Python's whitespace between the blocks).
static ANSWER_FIRST_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\A(?s:<answer>.*?</answer>[\s\x1C-\x1F]*<think>.*?</think>)\z")
        .expect("format regex is valid")
});
static ANSWER_ONLY_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\A(?s:<answer>.*?</answer>)\z").expect("format regex is valid"));

/// 1.0 when the whole completion has `layout`, else 0.0 ([`format_reward`] for the paper's).
/// An answer-only completion must not reason in a `<think>` block.
pub fn layout_reward(layout: Layout, completion: &str) -> f32 {
    let ok = match layout {
        Layout::ThinkThenAnswer => FORMAT_RE.is_match(completion),
        Layout::AnswerThenThink => ANSWER_FIRST_RE.is_match(completion),
        Layout::AnswerOnly => {
            ANSWER_ONLY_RE.is_match(completion) && !completion.contains("<think>")
        }
    };
    if ok {
        1.0
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------------
// Python string semantics (for the Paper rule)
// ---------------------------------------------------------------------------------------------

/// Python's `str.isspace()` (and `re`'s `\s` on str patterns, which is the same set): Unicode
/// White_Space plus U+001C..U+001F, which Python counts as whitespace because their
/// bidirectional class is B or S.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1C}'..='\u{1F}').contains(&c)
}

/// Python's `str.strip()` with no argument.
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Whether Python's `re.search("(?i)" + letter, c)` matches the single character `c`, for an
/// uppercase ASCII `letter`. Besides the two ASCII cases, Python's IGNORECASE also matches `I`
/// against U+0130 (İ) and U+0131 (ı); the regex crate's case folding does not, so this is spelt
/// out (measured over every code point in Python 3.11 for A-J).
pub fn py_ignorecase_eq(letter: char, c: char) -> bool {
    c == letter
        || c == letter.to_ascii_lowercase()
        || (letter == 'I' && (c == '\u{130}' || c == '\u{131}'))
}

/// `re.search(r"<answer>(.*?)</answer>", s, flags=re.DOTALL | re.IGNORECASE)`.
///
/// The tag letters are spelt as explicit classes rather than `(?i)` because Python's and the
/// regex crate's case-insensitive sets could differ; these are Python's, measured over every
/// code point: only `s` has a non-ASCII partner (U+017F, long s). Leftmost-first semantics make
/// the capture the same as Python's: the first `<answer>` and the nearest `</answer>` after it.
static PAPER_ANSWER_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?s)<[aA][nN][sS\x{17F}][wW][eE][rR]>(.*?)</[aA][nN][sS\x{17F}][wW][eE][rR]>")
        .expect("paper answer regex is valid")
});

/// The ground truth as the paper reads `solution`: the content of its first `<answer>` block if
/// it has one (tags case-insensitive), else the whole string; stripped, uppercased, with every
/// whitespace character removed. `"B"`, `" b "` and `"<answer> B </answer>"` all give `"B"`;
/// a solution such as `"B. Brain"` gives `"B.BRAIN"`, which no answer can equal.
pub fn ground_truth(solution: &str) -> String {
    let inner = match PAPER_ANSWER_RE.captures(solution).and_then(|c| c.get(1)) {
        Some(m) => py_strip(m.as_str()),
        None => py_strip(solution),
    };
    inner
        .to_uppercase()
        .chars()
        .filter(|c| !py_isspace(*c))
        .collect()
}

/// Whether `s` is exactly the one character `c` (Python's `found_letter == gt_letter`).
fn is_single(s: &str, c: char) -> bool {
    let mut chars = s.chars();
    chars.next() == Some(c) && chars.next().is_none()
}

// ---------------------------------------------------------------------------------------------
// Paper accuracy
// ---------------------------------------------------------------------------------------------

/// MedVLM-R1's accuracy reward, reproduced exactly:
///
/// ```python
/// sol_match = re.search(r"<answer>(.*?)</answer>", sol, flags=re.DOTALL|re.IGNORECASE)
/// ground_truth = sol_match.group(1).strip() if sol_match else sol.strip()
/// content_match = re.search(r"<answer>(.*?)</answer>", content, flags=re.DOTALL|re.IGNORECASE)
/// student_answer = content_match.group(1).strip() if content_match else ""
/// gt_letter = re.sub(r"\s+", "", ground_truth.upper())
/// sa_str = student_answer.strip(); sa_upper = sa_str.upper()
/// if not sa_upper: reward = 0.0
/// else:
///     letters_found = re.findall(r"[A-J]", sa_upper)
///     distinct_letters = set(letters_found)
///     if len(letters_found) == 1 and len(distinct_letters) == 1:
///         found_letter = distinct_letters.pop()
///         if found_letter == gt_letter:
///             leftover = re.sub(r"(?i)" + found_letter, "", sa_str, count=1)
///             reward = 0.5 if leftover.strip() else 1.0
///         else: reward = 0.0
///     else: reward = 0.0
/// ```
///
/// So: the first answer block (case-insensitive tags) must contain exactly one of A-J *after
/// uppercasing*, anywhere, even inside a word; 1.0 if that letter is all there is, 0.5 if there
/// is anything else. Uppercasing is Python's full Unicode mapping, which can create letters:
/// `ı` becomes `I`, the ligature `ﬁ` becomes `FI` (two letters, so 0).
pub fn paper_accuracy(completion: &str, solution: &str) -> f32 {
    let gt_letter = ground_truth(solution);
    let sa_str = match PAPER_ANSWER_RE.captures(completion).and_then(|c| c.get(1)) {
        Some(m) => py_strip(m.as_str()),
        None => "",
    };
    let sa_upper = sa_str.to_uppercase();
    if sa_upper.is_empty() {
        return 0.0;
    }
    let mut letters = sa_upper.chars().filter(|c| ('A'..='J').contains(c));
    let (Some(found), None) = (letters.next(), letters.next()) else {
        return 0.0;
    };
    if !is_single(&gt_letter, found) {
        return 0.0;
    }
    // `re.sub("(?i)" + found, "", sa_str, count=1)`: drop the first character that matches.
    let leftover: String = match sa_str
        .char_indices()
        .find(|(_, c)| py_ignorecase_eq(found, *c))
    {
        Some((i, c)) => {
            let mut s = String::with_capacity(sa_str.len());
            s.push_str(&sa_str[..i]);
            s.push_str(&sa_str[i + c.len_utf8()..]);
            s
        }
        None => sa_str.to_string(),
    };
    if py_strip(&leftover).is_empty() {
        1.0
    } else {
        0.5
    }
}

// ---------------------------------------------------------------------------------------------
// Strict extraction (evaluation) and strict accuracy
// ---------------------------------------------------------------------------------------------

/// Outcome of reading a completion's answer with the Strict rule ([`extract_answer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extraction {
    /// One option letter was read. `exact`: the answer block held nothing but the letter and
    /// punctuation/brackets/whitespace (`A`, `(A)`, `A.`, `**A**`).
    Letter { letter: char, exact: bool },
    /// No complete `<answer>…</answer>` block (including a truncated one with no closing tag).
    NoAnswerBlock,
    /// More than one `<answer>` or `</answer>` tag: the model hedged, or quoted the tags in its
    /// reasoning; either way there is no single answer to read.
    MultipleAnswerBlocks,
    /// The answer block is empty or whitespace.
    Empty,
    /// The answer block has no standalone uppercase A-J.
    NoLetter,
    /// More than one standalone option letter (`A or B`, `A, B`, `A A`, `I think B`).
    Ambiguous,
    /// One letter, but beyond the question's number of options (`E` with 4 options).
    OutOfRange(char),
}

impl Extraction {
    /// The letter read, if any (regardless of `exact`).
    pub fn letter(&self) -> Option<char> {
        match self {
            Extraction::Letter { letter, .. } => Some(*letter),
            _ => None,
        }
    }

    /// A stable snake_case label for counting outcomes in evaluation reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Extraction::Letter { exact: true, .. } => "letter_exact",
            Extraction::Letter { exact: false, .. } => "letter_inexact",
            Extraction::NoAnswerBlock => "no_answer_block",
            Extraction::MultipleAnswerBlocks => "multiple_answer_blocks",
            Extraction::Empty => "empty",
            Extraction::NoLetter => "no_letter",
            Extraction::Ambiguous => "ambiguous",
            Extraction::OutOfRange(_) => "out_of_range",
        }
    }
}

const OPEN_TAG: &str = "<answer>";
const CLOSE_TAG: &str = "</answer>";

/// A combining mark glued to a letter makes it part of a word (`A` + U+0301 is `Á`). Rust's std
/// has no general-category lookup, so this covers the combining-mark blocks; marks elsewhere
/// that are Alphabetic (most Indic vowel signs) are already caught by `is_alphanumeric`.
fn is_combining_mark(c: char) -> bool {
    matches!(c,
        '\u{0300}'..='\u{036F}'
        | '\u{1AB0}'..='\u{1AFF}'
        | '\u{1DC0}'..='\u{1DFF}'
        | '\u{20D0}'..='\u{20FF}'
        | '\u{FE20}'..='\u{FE2F}')
}

/// A neighbour that makes an uppercase letter part of a word or code rather than an option.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || is_combining_mark(c)
}

/// Characters allowed around the letter in an exact answer: whitespace, ASCII punctuation
/// (brackets, `.`, `:`, `*` of Markdown bold, ...) and the full-width/CJK punctuation a
/// Qwen model may emit.
fn is_wrapper(c: char) -> bool {
    c.is_whitespace()
        || c.is_ascii_punctuation()
        || matches!(
            c,
            '（' | '）'
                | '【'
                | '】'
                | '［'
                | '］'
                | '「'
                | '」'
                | '《'
                | '》'
                | '。'
                | '．'
                | '：'
                | '，'
                | '、'
        )
}

/// Reads a completion's answer: THE rule evaluation uses, and the Strict accuracy reward.
///
/// 1. Exactly one `<answer>` and one `</answer>` tag (case-sensitive), in that order; the
///    content may span lines. No complete block → [`Extraction::NoAnswerBlock`]; any repeated
///    tag → [`Extraction::MultipleAnswerBlocks`]. A think block is not required.
/// 2. The content, trimmed, must be non-empty ([`Extraction::Empty`]).
/// 3. Option letters are UPPERCASE `A`-`J` standing alone: neither neighbour is a letter, a
///    digit or a combining mark. So the `A` of "Brain" or "Option" is not one, and lowercase
///    `a` never is. Note a pronoun "I" *is* one: "I think B" is ambiguous.
/// 4. None → [`Extraction::NoLetter`]; more than one occurrence, even of the same letter →
///    [`Extraction::Ambiguous`]; beyond `num_options` → [`Extraction::OutOfRange`].
/// 5. `exact` when everything else in the block is whitespace or punctuation.
pub fn extract_answer(completion: &str, num_options: Option<usize>) -> Extraction {
    let opens = completion.matches(OPEN_TAG).count();
    let closes = completion.matches(CLOSE_TAG).count();
    if opens > 1 || closes > 1 {
        return Extraction::MultipleAnswerBlocks;
    }
    let (Some(open), Some(close)) = (completion.find(OPEN_TAG), completion.find(CLOSE_TAG)) else {
        return Extraction::NoAnswerBlock;
    };
    let start = open + OPEN_TAG.len();
    if close < start {
        return Extraction::NoAnswerBlock;
    }
    let content = completion[start..close].trim();
    if content.is_empty() {
        return Extraction::Empty;
    }

    let chars: Vec<char> = content.chars().collect();
    let mut found: Option<(usize, char)> = None;
    for (i, &c) in chars.iter().enumerate() {
        if !('A'..='J').contains(&c) {
            continue;
        }
        let before_ok = i == 0 || !is_word_char(chars[i - 1]);
        let after_ok = chars.get(i + 1).is_none_or(|&n| !is_word_char(n));
        if before_ok && after_ok {
            if found.is_some() {
                return Extraction::Ambiguous;
            }
            found = Some((i, c));
        }
    }
    let Some((pos, letter)) = found else {
        return Extraction::NoLetter;
    };
    if let Some(n) = num_options {
        // 'A' + n is the first letter beyond the options.
        if (letter as usize - 'A' as usize) >= n {
            return Extraction::OutOfRange(letter);
        }
    }
    let exact = chars
        .iter()
        .enumerate()
        .all(|(i, &c)| i == pos || is_wrapper(c));
    Extraction::Letter { letter, exact }
}

/// The Strict accuracy reward: [`extract_answer`] against [`ground_truth`] of `solution`.
/// Correct and exact → 1.0; correct with other words in the block → 0.5; anything else → 0.0.
pub fn strict_accuracy(completion: &str, solution: &str, num_options: Option<usize>) -> f32 {
    let Extraction::Letter { letter, exact } = extract_answer(completion, num_options) else {
        return 0.0;
    };
    if !is_single(&ground_truth(solution), letter) {
        0.0
    } else if exact {
        1.0
    } else {
        0.5
    }
}
