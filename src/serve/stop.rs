//! Stop strings, matched incrementally.
//!
//! Each new token adds a few bytes of text; the only stop strings it can complete are those
//! that end inside those bytes. A Knuth-Morris-Pratt automaton per stop string keeps, between
//! tokens, the length of the longest prefix of the stop string that the text ends with, so a
//! token costs O(its bytes x stop strings) however long the text or the stop strings are.
//! (Rescanning the text per token made four long stop strings cost a neighbouring stream
//! seconds: the engine thread serves every request.) That same length is what a stream must
//! hold back: those bytes may yet turn out to start a stop string, which removes them.

use std::sync::Arc;

/// One stop string and its failure function.
#[derive(Debug)]
struct Pattern {
    bytes: Vec<u8>,
    /// `fail[i]`: length of the longest proper prefix of `bytes[..=i]` that is also its
    /// suffix.
    fail: Vec<usize>,
}

impl Pattern {
    fn new(s: &str) -> Self {
        let bytes = s.as_bytes().to_vec();
        let mut fail = vec![0; bytes.len()];
        let mut k = 0;
        for i in 1..bytes.len() {
            while k > 0 && bytes[i] != bytes[k] {
                k = fail[k - 1];
            }
            if bytes[i] == bytes[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Self { bytes, fail }
    }
}

/// A request's stop strings, prepared once and shared by its samples.
#[derive(Debug, Clone, Default)]
pub struct StopSet(Arc<Vec<Pattern>>);

impl StopSet {
    /// Empty strings are skipped (they would match everywhere; the API refuses them).
    pub fn new(stops: &[String]) -> Self {
        Self(Arc::new(
            stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Pattern::new(s))
                .collect(),
        ))
    }

    /// A matcher for one sample's text, which starts empty.
    pub fn matcher(&self) -> StopMatcher {
        StopMatcher {
            states: vec![0; self.0.len()],
            set: self.clone(),
        }
    }
}

/// Where one sample's text stands against each stop string.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    set: StopSet,
    /// Per stop string: how many of its first bytes the text ends with.
    states: Vec<usize>,
}

impl StopMatcher {
    /// Feeds the bytes appended to the text, which began at byte `offset` of it. Returns the
    /// earliest start of a stop string that ends inside them, if any (the text is cut there).
    pub fn feed(&mut self, new: &[u8], offset: usize) -> Option<usize> {
        let mut found: Option<usize> = None;
        for (p, state) in self.set.0.iter().zip(&mut self.states) {
            for (i, &b) in new.iter().enumerate() {
                while *state > 0 && p.bytes[*state] != b {
                    *state = p.fail[*state - 1];
                }
                if p.bytes[*state] == b {
                    *state += 1;
                }
                if *state == p.bytes.len() {
                    let start = offset + i + 1 - p.bytes.len();
                    found = Some(found.map_or(start, |f| f.min(start)));
                    // Later matches of this string start later still.
                    *state = p.fail[*state - 1];
                    break;
                }
            }
        }
        found
    }

    /// Bytes at the end of the text that may be the start of a stop string: not sent yet,
    /// since the stop string would remove them. Always a character boundary from the end
    /// (a stop string starts with a character's first byte).
    pub fn held(&self) -> usize {
        self.states.iter().copied().max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one by one; returns the cut position and the bytes held back after
    /// the last piece.
    fn run(stops: &[&str], pieces: &[&str]) -> (Option<usize>, usize) {
        let set = StopSet::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut m = set.matcher();
        let mut len = 0;
        for p in pieces {
            if let Some(at) = m.feed(p.as_bytes(), len) {
                return (Some(at), 0);
            }
            len += p.len();
        }
        (None, m.held())
    }

    #[test]
    fn stop_strings_are_found_across_pieces_and_their_starts_held_back() {
        assert_eq!(
            run(&["</answer>", "XY"], &["<answer>A</answer> more"]).0,
            Some(9)
        );
        assert_eq!(
            run(&["</answer>"], &["<answer>A", "</an", "swer>"]).0,
            Some(9)
        );
        assert_eq!(run(&["</answer>", "XY"], &["<answer>A</ans"]), (None, 5));
        assert_eq!(run(&["</answer>", "XY"], &["aXYb</answer>"]).0, Some(1));
        assert_eq!(run(&["</answer>", "XY"], &["abcX"]), (None, 1));
        assert_eq!(run(&["</answer>", "XY"], &["abc"]), (None, 0));
        assert_eq!(run(&["éa"], &["é"]), (None, 2));
        assert_eq!(run(&[], &["anything"]), (None, 0));
        // Overlapping self-similar stop strings (the failure function at work).
        assert_eq!(run(&["aab"], &["a", "a", "a", "b"]).0, Some(1));
        assert_eq!(run(&["abab"], &["aba", "bab"]).0, Some(0));
        assert_eq!(run(&["abac"], &["ababac"]).0, Some(2));
        assert_eq!(run(&["aaa"], &["aa"]), (None, 2));
        // Two stop strings ending in the same piece: the one starting first wins, as the
        // text is cut before it.
        assert_eq!(run(&["bc", "abcd"], &["xabcd"]).0, Some(1));
        // Completed by an earlier piece: the cut is where it started, not in the new bytes.
        assert_eq!(run(&["bc", "abcd"], &["xab", "c"]).0, Some(2));
    }

    /// The matcher agrees with a plain search of the whole text after every piece, on
    /// random texts over a small alphabet (where prefixes overlap often).
    #[test]
    fn incremental_matching_equals_a_rescan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let word = |rng: &mut rand::rngs::StdRng, n: usize| -> String {
            (0..n)
                .map(|_| ['a', 'b', 'é'][rng.random_range(0..3)])
                .collect()
        };
        for _ in 0..2000 {
            let stops: Vec<String> = (0..rng.random_range(1..4))
                .map(|_| {
                    let n = rng.random_range(1..5);
                    word(&mut rng, n)
                })
                .collect();
            let set = StopSet::new(&stops);
            let mut m = set.matcher();
            let mut text = String::new();
            for _ in 0..12 {
                let n = rng.random_range(0..4);
                let piece = word(&mut rng, n);
                let before = text.len();
                text.push_str(&piece);
                let want = stops.iter().filter_map(|s| text.find(s.as_str())).min();
                let got = m.feed(piece.as_bytes(), before);
                assert_eq!(got, want, "{stops:?} in {text:?}");
                if got.is_some() {
                    break;
                }
                let hold = stops
                    .iter()
                    .flat_map(|s| {
                        (1..s.len()).filter(|&k| {
                            k <= text.len()
                                && text.is_char_boundary(text.len() - k)
                                && s.as_bytes().starts_with(&text.as_bytes()[text.len() - k..])
                        })
                    })
                    .max()
                    .unwrap_or(0);
                assert_eq!(m.held(), hold, "{stops:?} after {text:?}");
            }
        }
    }
}
