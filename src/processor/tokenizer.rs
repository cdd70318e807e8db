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

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value as Json;

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
    if !path.is_file() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
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
        if !path.is_file() {
            bail!(
                "{}: tokenizer.json not found (medvlm needs the fast-tokenizer file that \
                 Hugging Face checkpoints ship)",
                path.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
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
        if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("{}: cannot read", cfg_path.display()))?;
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
