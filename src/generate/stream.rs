//! Incremental detokenization for `--stream`: byte-level BPE tokens can end in the middle of
//! a UTF-8 character, so text is released only once it decodes cleanly.

use anyhow::Result;

use crate::processor::QwenTokenizer;

pub struct TextStream<'t> {
    tokenizer: &'t QwenTokenizer,
    tokens: Vec<u32>,
    printed: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t QwenTokenizer) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            printed: 0,
        }
    }

    /// Adds a token; returns the new text that is safe to show, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>> {
        self.tokens.push(token);
        let text = self.tokenizer.decode(&self.tokens, true)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.printed {
            return Ok(None);
        }
        let new = text.get(self.printed..).map(str::to_string);
        self.printed = text.len();
        Ok(new)
    }

    /// Whatever is left at the end (an incomplete character shows as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.tokenizer.decode(&self.tokens, true)?;
        if text.len() <= self.printed {
            return Ok(None);
        }
        let new = text.get(self.printed..).map(str::to_string);
        self.printed = text.len();
        Ok(new)
    }
}
