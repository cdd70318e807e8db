//! Evaluation: greedy answers to multiple-choice items, read with the same strict rule as
//! the GRPO accuracy reward (one definition, [`crate::rl::reward::extract_answer`]).

use anyhow::Result;
use serde::Serialize;

use crate::data::{PromptTemplate, VqaItem};
use crate::generate::{Engine, Request, SamplingParams};
use crate::model::Qwen2Vl;
use crate::processor::Processor;
use crate::rl::reward::{extract_answer, format_reward, Extraction};

/// One item's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ItemResult {
    /// Row index in the data file.
    pub row: usize,
    pub modality: String,
    pub prompt: String,
    pub output: String,
    /// The letter read from the output, if one could be read.
    pub letter: Option<char>,
    pub solution: char,
    pub correct: bool,
    /// The output has the `<think>…</think><answer>…</answer>` shape.
    pub format_ok: bool,
    /// Why no letter was read (`no_answer_block`, `ambiguous`, …), if none was.
    pub extraction: &'static str,
}

/// Greedy-decodes every item (batched) and reads each answer.
pub fn run_greedy(
    model: &Qwen2Vl,
    processor: &Processor,
    items: &[VqaItem],
    template: PromptTemplate,
    max_new_tokens: usize,
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<ItemResult>> {
    let s = &processor.tokenizer.special;
    let mut stop: Vec<u32> = [s.im_end, s.endoftext, processor.tokenizer.eos_token_id]
        .into_iter()
        .flatten()
        .collect();
    stop.sort_unstable();
    stop.dedup();
    let engine = Engine::new(model, stop, s.vision_ids().to_vec());
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch_size.max(1)) {
        let mut prompts = Vec::with_capacity(chunk.len());
        for it in chunk {
            let images = it
                .images
                .iter()
                .map(|p| processor.load_image(p))
                .collect::<Result<Vec<_>>>()?;
            prompts.push(processor.prepare(&template.messages(it), images, true)?);
        }
        let reqs: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                prompt: p,
                sampling: SamplingParams::default(),
                max_new_tokens,
                num_samples: 1,
            })
            .collect();
        let gens = engine.generate(&reqs, |_, _, _| {})?;
        for ((it, group), p) in chunk.iter().zip(&gens).zip(&prompts) {
            let text = processor
                .tokenizer
                .decode(group[0].content_tokens(), true)?;
            let ex = extract_answer(&text, Some(it.options.len()));
            let letter = match ex {
                Extraction::Letter { letter, .. } => Some(letter),
                _ => None,
            };
            out.push(ItemResult {
                row: it.index,
                modality: it.modality.name().to_string(),
                prompt: p.text.clone(),
                correct: letter == Some(it.solution),
                format_ok: format_reward(&text) == 1.0,
                extraction: ex.kind(),
                letter,
                solution: it.solution,
                output: text,
            });
        }
        progress(out.len(), items.len());
    }
    Ok(out)
}

/// Fraction correct (NaN for no items).
pub fn accuracy(results: &[ItemResult]) -> f64 {
    if results.is_empty() {
        return f64::NAN;
    }
    results.iter().filter(|r| r.correct).count() as f64 / results.len() as f64
}
