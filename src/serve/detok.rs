//! Incremental detokenization on the engine thread.
//!
//! Decoding every token of a sequence again for each new token (as a simple text stream
//! does) makes a long generation cost O(length) per step on the one thread that serves every
//! request: a 4,000-token stream slowed each step of its neighbours. Here only a window is
//! decoded: the tokens since the text last advanced, after those of the step before (the
//! approach of text-generation-inference). Byte-level BPE decodes a window to the same text
//! as that window of the whole sequence, so the pieces join to the full decode; a window
//! that ends inside a UTF-8 character (U+FFFD at its end) waits for the next token.

use anyhow::Result;

use crate::processor::QwenTokenizer;

pub struct Detok<'t> {
    tokenizer: &'t QwenTokenizer,
    tokens: Vec<u32>,
    /// The window starts here; `tokens[prefix..read]` were shown as of the last advance.
    prefix: usize,
    read: usize,
}

impl<'t> Detok<'t> {
    pub fn new(tokenizer: &'t QwenTokenizer) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// The text of the window so far and of its shown part.
    fn texts(&self) -> Result<(String, String)> {
        let shown = self
            .tokenizer
            .decode(&self.tokens[self.prefix..self.read], true)?;
        let all = self.tokenizer.decode(&self.tokens[self.prefix..], true)?;
        Ok((shown, all))
    }

    /// Adds a token; returns the new text that is safe to show, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>> {
        self.tokens.push(token);
        let (shown, all) = self.texts()?;
        if all.len() <= shown.len() || all.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(new) = all.get(shown.len()..) else {
            return Ok(None);
        };
        let new = new.to_string();
        self.prefix = self.read;
        self.read = self.tokens.len();
        Ok(Some(new))
    }

    /// Whatever is left at the end (an incomplete character shows as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let (shown, all) = self.texts()?;
        let new = all
            .get(shown.len()..)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        self.prefix = self.read;
        self.read = self.tokens.len();
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Pieces join to the full decode, for random token sequences (partial UTF-8 bytes and
    /// special tokens included), and nothing ends in half a character before the end.
    #[test]
    fn pieces_join_to_the_full_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a");
        let tok = QwenTokenizer::from_dir(&dir).expect("the tiny tokenizer");
        // Ids past the vocabulary too: they decode to nothing.
        let vocab = tok.vocab_size() as u32 + 8;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for len in [0usize, 1, 2, 5, 40, 300] {
            for _ in 0..20 {
                let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..vocab)).collect();
                let mut d = Detok::new(&tok);
                let mut text = String::new();
                for &t in &ids {
                    if let Some(p) = d.push(t).unwrap() {
                        assert!(!p.ends_with('\u{FFFD}'), "{p:?}");
                        text.push_str(&p);
                    }
                }
                if let Some(p) = d.finish().unwrap() {
                    text.push_str(&p);
                }
                assert_eq!(text, tok.decode(&ids, true).unwrap(), "{ids:?}");
            }
        }
    }
}
