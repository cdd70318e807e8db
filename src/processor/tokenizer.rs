//! `tokenizer.json` through the `tokenizers` crate, plus the special tokens Qwen2-VL needs
//! and the tokens that end a completion.
//!
//! # What ends a completion
//!
//! One set of stop tokens, built here from the checkpoint's files, serves every command
//! (`generate`, `ask`, `eval`, `score`, `serve`, the demo) and GRPO's rollouts, so a checkpoint
//! stops at the same tokens whatever runs it. A completion ends at the first of:
//!
//! - `<|im_end|>`, the end of an assistant turn in the chat template (the token SFT teaches
//!   the model to write);
//! - `<|endoftext|>`, the end of a document (Qwen's pad token, and its base models' eos);
//! - tokenizer_config.json's `eos_token`: what TRL's GRPOTrainer generates up to and masks a
//!   completion after (`processing_class.eos_token_id`);
//! - every id of generation_config.json's `eos_token_id`: what transformers' `generate`
//!   stops at.
//!
//! The union, not one source: the reference implementations disagree (transformers reads the
//! generation config, TRL the tokenizer), and a token either calls an end is an end. The stop
//! token stays in the completion's tokens, so training scores it (TRL's completion mask also
//! keeps the first eos) and a policy learns to stop.
//!
//! # Long texts
//!
//! Tokenizing takes about 200 bytes of memory per byte of text (the `tokenizers` crate keeps
//! offsets for every byte through each stage), so a 30 MB prompt costs 6 GB before its length
//! can be refused. [`QwenTokenizer::encode_limited`] refuses a text over a token limit after
//! tokenizing about the limit's worth of it: it cuts the text into pieces where Qwen2's
//! pre-tokenizer splits whatever comes around the cut (see `Cutter`), tokenizes the pieces in
//! order, counts, and stops once over the limit. A text within the limit gets exactly the ids
//! [`QwenTokenizer::encode`] gives. Tokenizers whose pipeline is not Qwen2's (a different
//! normalizer, pre-tokenizer or model, added tokens that strip whitespace, truncation or padding)
//! are tokenized whole, as before.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value as Json;

use super::input::{is_regular_file, read_bounded, read_bounded_string, MAX_SIDE_FILE_BYTES};

/// Qwen2's pre-tokenizer split (tokenizer.json's `pre_tokenizer.pretokenizers[0].pattern`), the
/// one whose cut points `Cutter` knows.
pub const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Bytes of text tokenized at a time by [`QwenTokenizer::encode_limited`] (a piece ends at the
/// first cut point after this many bytes): small against the tokenizer's memory per byte, large
/// against its cost per call.
pub const PIECE_BYTES: usize = 16 << 10;

/// Longest stretch of text without a cut point that [`QwenTokenizer::encode_limited`] tokenizes
/// (1 MiB, some 200 MB of tokenizer memory). Text has cut points after every word and digit;
/// a megabyte without one is a single "word" of a megabyte, refused rather than tokenized.
pub const MAX_UNCUT_BYTES: usize = 1 << 20;

/// The result of [`QwenTokenizer::encode_limited`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limited {
    /// The text's ids, exactly those [`QwenTokenizer::encode`] gives.
    Ids(Vec<u32>),
    /// The text is longer than the limit: at least `at_least` tokens (a lower bound, not the
    /// count); `tokenized` bytes of it were tokenized to find out.
    Over { at_least: usize, tokenized: usize },
}

/// The vision and turn-structure tokens, resolved to ids of this tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub image_pad: u32,
    pub video_pad: u32,
    pub vision_start: u32,
    pub vision_end: u32,
    pub im_start: Option<u32>,
    pub im_end: Option<u32>,
    pub endoftext: Option<u32>,
}

impl SpecialTokens {
    /// Tokens a user's text may not contain: they would desynchronise images and placeholders.
    pub fn vision_ids(&self) -> [u32; 4] {
        [
            self.image_pad,
            self.video_pad,
            self.vision_start,
            self.vision_end,
        ]
    }
}

pub struct QwenTokenizer {
    inner: tokenizers::Tokenizer,
    pub special: SpecialTokens,
    /// `model_max_length` from tokenizer_config.json, when it is a real limit.
    pub model_max_length: Option<usize>,
    /// `eos_token` of tokenizer_config.json, resolved to an id.
    pub eos_token_id: Option<u32>,
    /// The tokens that end a completion (see the module docs), sorted.
    stop_tokens: Vec<u32>,
    /// Tokens including added ones. Kept here because `tokenizers` computes it by building
    /// a map of the whole vocabulary (about 60 ms for Qwen's 151,646 tokens), which
    /// per-token streaming decodes would otherwise pay every step.
    vocab_size: usize,
    /// Where texts may be cut for [`Self::encode_limited`]; `None` when this tokenizer's
    /// pipeline is not Qwen2's.
    cutter: Option<Cutter>,
    /// The most bytes of text one token stands for, computed when first needed.
    longest_token: OnceLock<usize>,
}

impl std::fmt::Debug for QwenTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("special", &self.special)
            .finish()
    }
}

fn token_name(v: &Json) -> Option<&str> {
    // tokenizer_config.json writes special tokens as strings or as {"content": ...}
    v.as_str()
        .or_else(|| v.get("content").and_then(Json::as_str))
}

/// `eos_token_id` of `dir/generation_config.json` (a number or a list; none without the
/// file or the key).
fn generation_eos(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !is_regular_file(&path, "generation config")? {
        return Ok(vec![]);
    }
    let text = read_bounded_string(&path, MAX_SIDE_FILE_BYTES, "generation config")?;
    let v: Json = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let id = |x: &Json| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| {
                format!(
                    "{}: eos_token_id holds {x}, which is not a token id",
                    path.display()
                )
            })
    };
    match v.get("eos_token_id") {
        None | Some(Json::Null) => Ok(vec![]),
        Some(Json::Array(a)) => a.iter().map(id).collect(),
        Some(x) => Ok(vec![id(x)?]),
    }
}

impl QwenTokenizer {
    /// Loads `tokenizer.json` (and, when present, `tokenizer_config.json`) from a checkpoint.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !is_regular_file(&path, "tokenizer")? {
            bail!(
                "{}: tokenizer.json not found (medvlm needs the fast-tokenizer file that \
                 Hugging Face checkpoints ship)",
                path.display()
            );
        }
        let bytes = read_bounded(&path, MAX_SIDE_FILE_BYTES, "tokenizer")?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        drop(bytes);
        let id = |tok: &str| inner.token_to_id(tok);
        let need = |tok: &str| {
            id(tok).with_context(|| {
                format!(
                    "{}: the tokenizer has no {tok} token, which Qwen2-VL needs",
                    path.display()
                )
            })
        };
        let special = SpecialTokens {
            image_pad: need("<|image_pad|>")?,
            video_pad: need("<|video_pad|>")?,
            vision_start: need("<|vision_start|>")?,
            vision_end: need("<|vision_end|>")?,
            im_start: id("<|im_start|>"),
            im_end: id("<|im_end|>"),
            endoftext: id("<|endoftext|>"),
        };
        let mut model_max_length = None;
        let mut eos_token_id = None;
        let cfg_path = dir.join("tokenizer_config.json");
        if is_regular_file(&cfg_path, "tokenizer config")? {
            let text = read_bounded_string(&cfg_path, MAX_SIDE_FILE_BYTES, "tokenizer config")?;
            let cfg: Json = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
            // transformers writes a huge sentinel (1e30) when there is no limit.
            model_max_length = cfg
                .get("model_max_length")
                .and_then(Json::as_f64)
                .filter(|&v| v > 0.0 && v < 1e12)
                .map(|v| v as usize);
            eos_token_id = cfg.get("eos_token").and_then(token_name).and_then(id);
        }
        let mut stop_tokens: Vec<u32> = [special.im_end, special.endoftext, eos_token_id]
            .into_iter()
            .flatten()
            .collect();
        stop_tokens.extend(generation_eos(dir)?);
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        Ok(Self {
            vocab_size: inner.get_vocab_size(true),
            cutter: Cutter::for_tokenizer(&inner),
            longest_token: OnceLock::new(),
            inner,
            special,
            model_max_length,
            eos_token_id,
            stop_tokens,
        })
    }

    /// The token ids that end a completion, sorted: the one set every command and GRPO's
    /// rollouts stop at (see the module docs).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// Token ids of `text` with special tokens in it recognised (as transformers does with
    /// `add_special_tokens=False`: Qwen2 adds no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Self::encode`] for a text that may be longer than `max_tokens`: its ids when it has at
    /// most `max_tokens` tokens (exactly those `encode` gives), else [`Limited::Over`] after
    /// tokenizing about `max_tokens` tokens' worth of it (see the module docs). An error for a
    /// stretch of more than [`MAX_UNCUT_BYTES`] without a cut point.
    pub fn encode_limited(&self, text: &str, max_tokens: usize) -> Result<Limited> {
        self.encode_in_pieces(text, max_tokens, PIECE_BYTES)
    }

    /// [`Self::encode_limited`] with pieces of `piece` bytes (tests use tiny ones).
    pub fn encode_in_pieces(&self, text: &str, max_tokens: usize, piece: usize) -> Result<Limited> {
        let Some(cutter) = &self.cutter else {
            let ids = self.encode(text)?;
            return Ok(if ids.len() > max_tokens {
                Limited::Over {
                    at_least: ids.len(),
                    tokenized: text.len(),
                }
            } else {
                Limited::Ids(ids)
            });
        };
        let over = |at_least, tokenized| {
            Ok(Limited::Over {
                at_least,
                tokenized,
            })
        };
        // Everything from the last non-ASCII byte on is ASCII, which bounds a suffix's tokens
        // more tightly (see `min_tokens`) in constant time.
        let ascii_from = text
            .bytes()
            .rposition(|b| !b.is_ascii())
            .map_or(0, |i| i + 1);
        let rest_min = |from: usize| self.min_tokens(text.len() - from, from >= ascii_from);
        let all = rest_min(0);
        if all > max_tokens {
            return over(all, 0);
        }
        let mut ids = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let end = cutter.next_cut(text, start + piece.max(1));
            let part = &text[start..end];
            let floor = ids.len() + self.min_tokens(part.len(), part.is_ascii()) + rest_min(end);
            if floor > max_tokens {
                return over(floor, start);
            }
            if part.len() > MAX_UNCUT_BYTES {
                bail!(
                    "the text has {} bytes without a place to split it for tokenizing (a \
                     space, punctuation or a digit after a word); at most {MAX_UNCUT_BYTES} \
                     are tokenized in one piece",
                    part.len()
                );
            }
            ids.extend(self.encode(part)?);
            let floor = ids.len() + rest_min(end);
            if floor > max_tokens {
                return over(floor, end);
            }
            start = end;
        }
        Ok(Limited::Ids(ids))
    }

    /// A lower bound of the tokens in `bytes` bytes of text (`ascii`: all ASCII), for a
    /// tokenizer with a [`Cutter`]: every token stands for at most [`Self::longest_token`]
    /// bytes of normalised text, and NFC shrinks text at most threefold (three conjoining
    /// Hangul jamo, 9 bytes, compose to one 3-byte syllable; NFC leaves ASCII alone).
    /// Text before the chat template renders it and text the template adds only add tokens.
    pub fn min_tokens(&self, bytes: usize, ascii: bool) -> usize {
        if self.cutter.is_none() {
            return 0;
        }
        let per_token = self.longest_token() * if ascii { 1 } else { 3 };
        bytes.div_ceil(per_token.max(1))
    }

    /// The most bytes of text one token stands for: the longest vocabulary entry (in the
    /// byte-level alphabet one character per byte) or added token.
    fn longest_token(&self) -> usize {
        *self.longest_token.get_or_init(|| {
            let added = self.inner.get_added_tokens_decoder();
            let longest_added = added.values().map(|t| t.content.len()).max().unwrap_or(0);
            let longest_vocab = (0..self.vocab_size as u32)
                .filter(|id| !added.contains_key(id))
                .filter_map(|id| self.inner.id_to_token(id))
                .map(|t| t.chars().count())
                .max()
                .unwrap_or(0);
            longest_added.max(longest_vocab)
        })
    }

    /// Text of `ids`; ids beyond the tokenizer's vocabulary (the embedding matrix is padded
    /// past it) are dropped rather than failing.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let size = self.vocab_size as u32;
        let known: Vec<u32> = ids.iter().copied().filter(|&i| i < size).collect();
        self.inner
            .decode(&known, skip_special_tokens)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// Where a text can be cut so that tokenizing the pieces gives the ids of the whole: the
/// concatenation of `encode(text[..q])` and `encode(text[q..])` is `encode(text)`.
///
/// That holds, for Qwen2's pipeline (added tokens split out, NFC, the [`QWEN2_SPLIT`] regex,
/// byte-level BPE per pre-token), at a position `q` whose previous character `a` and next
/// character `b` satisfy:
///
/// - `a` is a number (`\p{N}`), or a letter (`\p{L}`) and `b` is not. Then the pre-token that
///   holds `a` ends at `q` in the whole text and in `text[..q]` alike: only `\p{N}` (one
///   character) matches a number, and a letter is matched by `\p{L}+`, which stops before a
///   non-letter as at the end of the text, or by a contraction, which ends in a letter. The
///   regex has no look-behind, so the pre-tokens from `q` on depend on `text[q..]` only.
/// - `b` is ASCII or CJK punctuation: neither combines under NFC with what precedes it, so
///   NFC of the whole is NFC of the pieces.
/// - No added token occurs across `q` (the added-token split finds the same tokens in the
///   pieces as in the whole); added tokens that strip neighbouring whitespace or match
///   normalised text would not be seen by that test, so a tokenizer with them gets no cutter.
///
/// BPE works within a pre-token, so equal pre-tokens give equal ids.
#[derive(Debug)]
struct Cutter {
    /// The added tokens' contents.
    added: Vec<Vec<u8>>,
    letter: regex::Regex,
    number: regex::Regex,
}

impl Cutter {
    /// A cutter for `tok` when its pipeline is Qwen2's, else `None`. Checked on the loaded
    /// tokenizer's own parts, so that no file layout can make the cuts wrong.
    fn for_tokenizer(tok: &tokenizers::Tokenizer) -> Option<Self> {
        let normalizer = serde_json::to_value(tok.get_normalizer()).ok()?;
        if !(normalizer.is_null() || normalizer == serde_json::json!({"type": "NFC"})) {
            return None;
        }
        let pre = serde_json::to_value(tok.get_pre_tokenizer()).ok()?;
        let [split, bytes] = pre
            .get("pretokenizers")
            .and_then(Json::as_array)?
            .as_slice()
        else {
            return None;
        };
        let qwen2 = pre["type"] == "Sequence"
            && split["type"] == "Split"
            && split["pattern"]["Regex"] == QWEN2_SPLIT
            && split["behavior"] == "Isolated"
            && split["invert"] == false
            && bytes["type"] == "ByteLevel"
            && bytes["add_prefix_space"] == false
            && bytes["use_regex"] == false;
        let bpe = matches!(
            tok.get_model(),
            tokenizers::ModelWrapper::BPE(b) if b.dropout.is_none_or(|d| d == 0.0)
        );
        if !qwen2 || !bpe || tok.get_truncation().is_some() || tok.get_padding().is_some() {
            return None;
        }
        let added = tok.get_added_tokens_decoder();
        if added
            .values()
            .any(|t| t.lstrip || t.rstrip || t.single_word || t.normalized || t.content.is_empty())
        {
            return None;
        }
        Some(Self {
            added: added
                .values()
                .map(|t| t.content.as_bytes().to_vec())
                .collect(),
            letter: regex::Regex::new(r"\A\p{L}\z").ok()?,
            number: regex::Regex::new(r"\A\p{N}\z").ok()?,
        })
    }

    /// The first cut point at or after byte `from`, or the text's end.
    fn next_cut(&self, text: &str, from: usize) -> usize {
        let mut q = from;
        while q < text.len() && !text.is_char_boundary(q) {
            q += 1;
        }
        while q < text.len() {
            if self.is_cut(text, q) {
                return q;
            }
            q += text[q..].chars().next().map_or(1, char::len_utf8);
        }
        text.len()
    }

    /// Whether `q` (a character boundary) is a cut point (see the type's docs).
    fn is_cut(&self, text: &str, q: usize) -> bool {
        let (Some(a), Some(b)) = (text[..q].chars().next_back(), text[q..].chars().next()) else {
            return false;
        };
        if !(b.is_ascii() || is_cjk_punctuation(b)) {
            return false;
        }
        let a_ends = if a.is_ascii() {
            a.is_ascii_digit() || (a.is_ascii_alphabetic() && !b.is_ascii_alphabetic())
        } else {
            let mut buf = [0u8; 4];
            let a = a.encode_utf8(&mut buf);
            // `b` is never a letter outside ASCII: CJK punctuation is not.
            self.number.is_match(a) || (self.letter.is_match(a) && !b.is_ascii_alphabetic())
        };
        a_ends && !self.added_across(text.as_bytes(), q)
    }

    /// Whether an added token occurs across `q`: any occurrence of a token of `n` bytes in
    /// `q - n + 1 .. q + n - 1` holds byte `q - 1` and byte `q`.
    fn added_across(&self, bytes: &[u8], q: usize) -> bool {
        self.added.iter().any(|t| {
            let n = t.len();
            let window = &bytes[q.saturating_sub(n - 1)..(q + n - 1).min(bytes.len())];
            window.len() >= n && window.windows(n).any(|w| w == t.as_slice())
        })
    }
}

/// CJK punctuation that can follow a cut (see [`Cutter`]): ideographic and fullwidth
/// punctuation, none of them a letter, number or space, none combining under NFC.
fn is_cjk_punctuation(c: char) -> bool {
    matches!(
        u32::from(c),
        0x3001..=0x3003
            | 0x3008..=0x3011
            | 0x3014..=0x301F
            | 0xFF01..=0xFF0F
            | 0xFF1A..=0xFF20
            | 0xFF3B..=0xFF40
            | 0xFF5B..=0xFF65
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn tiny() -> QwenTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a");
        QwenTokenizer::from_dir(&dir).expect("tiny-a tokenizer")
    }

    #[test]
    fn qwen2_tokenizers_are_cut() {
        let tok = tiny();
        let cutter = tok.cutter.as_ref().expect("tiny-a has Qwen2's pipeline");
        let cuts = |text: &str| -> Vec<usize> {
            (1..text.len())
                .filter(|&q| text.is_char_boundary(q) && cutter.is_cut(text, q))
                .collect()
        };
        // After a word, before anything ASCII but a letter; after any digit.
        assert_eq!(cuts("ab cd"), [2]);
        assert_eq!(cuts("a1b2"), [1, 2, 3]);
        assert_eq!(cuts("it's"), [2]);
        assert_eq!(cuts("x.\ny"), [1]);
        // Never before a combining mark, nor after a space or punctuation.
        assert_eq!(cuts("e\u{301} x"), Vec::<usize>::new());
        assert_eq!(cuts("  x"), Vec::<usize>::new());
        // After a CJK word, before CJK punctuation; not between CJK letters.
        assert_eq!(cuts("中文，好"), [6]);
        // Never inside an added token, but on either side of it.
        assert_eq!(cuts("a<|im_end|>b"), [1]);
        assert_eq!(cutter.next_cut("hello world", 1), 5);
        assert_eq!(cutter.next_cut("中文中文", 1), "中文中文".len());
    }

    #[test]
    fn pieces_give_the_ids_of_the_whole_text() {
        let tok = tiny();
        // Fragments around every kind of cut: letters, digits, contractions, spaces and line
        // breaks, punctuation, decomposed and composed accents, CJK with its punctuation,
        // Hangul jamo (which NFC composes), numbers that are not digits, added tokens and
        // pieces of them.
        let fragments = [
            "a",
            "Zq",
            "hello",
            " ",
            "  ",
            "\n",
            "\r\n",
            "\t",
            "'s",
            "'T",
            "'re",
            "0",
            "7",
            "42",
            ".",
            ",",
            "!?",
            "(",
            ")",
            "-",
            "_",
            "é",
            "e\u{301}",
            "\u{301}",
            "ñ",
            "ß",
            "\u{2126}",
            "中",
            "文",
            "，",
            "。",
            "「",
            "」",
            "ー",
            "カ",
            "\u{3099}",
            "한",
            "\u{1100}",
            "\u{1161}",
            "\u{11A8}",
            "😀",
            "\u{200b}",
            "\u{FF21}",
            "\u{FF10}",
            "Ⅻ",
            "½",
            "<|im_end|>",
            "<|im_start|>",
            "<|",
            "|>",
            "im",
            "_end",
            "question",
            " answer",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(25);
        let mut refused = 0;
        for _ in 0..3000 {
            let n = rng.random_range(0..40);
            let text: String = (0..n)
                .map(|_| fragments[rng.random_range(0..fragments.len())])
                .collect();
            let full = tok.encode(&text).expect("encode");
            let piece = rng.random_range(1..8);
            assert_eq!(
                tok.encode_in_pieces(&text, usize::MAX, piece)
                    .expect("pieces"),
                Limited::Ids(full.clone()),
                "{text:?} in pieces of {piece}"
            );
            let limit = rng.random_range(0..full.len() + 2);
            match tok.encode_in_pieces(&text, limit, piece).expect("pieces") {
                Limited::Ids(ids) => assert!(full.len() <= limit && ids == full, "{text:?}"),
                Limited::Over { at_least, .. } => {
                    refused += 1;
                    assert!(full.len() > limit, "{text:?}: refused at {limit}");
                    assert!(
                        limit < at_least && at_least <= full.len(),
                        "{text:?}: at least {at_least}, is {}",
                        full.len()
                    );
                }
            }
        }
        assert!(refused > 1000, "{refused}");
    }

    #[test]
    fn limits_just_under_at_and_over() {
        let tok = tiny();
        let text = "What is shown in the image? 中文，好。 It's 42 mm.\n".repeat(50);
        let full = tok.encode(&text).expect("encode");
        let n = full.len();
        for piece in [1, 5, 64, PIECE_BYTES] {
            assert_eq!(
                tok.encode_in_pieces(&text, n, piece).expect("at"),
                Limited::Ids(full.clone())
            );
            assert_eq!(
                tok.encode_in_pieces(&text, n + 1, piece).expect("under"),
                Limited::Ids(full.clone())
            );
            match tok.encode_in_pieces(&text, n - 1, piece).expect("over") {
                Limited::Over { at_least, .. } => assert_eq!(at_least, n, "piece {piece}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn lower_bound_refuses_without_tokenizing() {
        let tok = tiny();
        // tiny-a's longest token is "<|object_ref_start|>", 20 bytes.
        assert_eq!(tok.longest_token(), 20);
        assert_eq!(tok.min_tokens(41, true), 3);
        assert_eq!(tok.min_tokens(41, false), 1);
        let text = "a".repeat(10_000);
        assert_eq!(
            tok.encode_limited(&text, 499).expect("refused"),
            Limited::Over {
                at_least: 500,
                tokenized: 0
            }
        );
        // A stretch without a cut point longer than the most tokenized at once.
        let err = tok
            .encode_limited(&"a".repeat(MAX_UNCUT_BYTES + 1), usize::MAX)
            .expect_err("uncut");
        assert!(
            err.to_string().contains("without a place to split it"),
            "{err}"
        );
    }
}
