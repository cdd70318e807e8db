//! What every command that runs a trained model needs (ask, eval, generate, score, the
//! demo, and the server): a checkpoint loaded with its processor, the tokens that end an
//! answer, and the reasoning split from the answer.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;

use crate::model::Qwen2Vl;
use crate::processor::{Processor, ProcessorOptions};

/// A model and its processor, loaded from one checkpoint directory.
pub struct Loaded {
    pub model: Qwen2Vl,
    pub processor: Processor,
}

/// Where a model comes from and how it runs: `--model`, `--adapter`, `--dtype`, `--device`.
#[derive(Debug, Clone, Default)]
pub struct ModelSource {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    /// Compute dtype; default f32 on the CPU, bf16 on CUDA.
    pub dtype: Option<DType>,
    pub device: Option<String>,
}

/// Loads a checkpoint (with its adapter merged) and its processor, checking that the
/// tokenizer and the model agree.
pub fn load(m: &ModelSource, opts: &ProcessorOptions) -> Result<Loaded> {
    if !m.model.is_dir() {
        bail!(
            "{}: no such checkpoint directory (expected config.json, *.safetensors, \
             tokenizer.json, preprocessor_config.json)",
            m.model.display()
        );
    }
    let device = crate::device::parse(m.device.as_deref())?;
    let dtype = m.dtype.unwrap_or(if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    });
    let processor = Processor::from_dir(&m.model, opts)?;
    let mut model = Qwen2Vl::load(&m.model, dtype, &device)?;
    if let Some(a) = &m.adapter {
        model
            .merge_adapter(a)
            .with_context(|| format!("applying adapter {}", a.display()))?;
    }
    let vocab = model.config.text.vocab_size;
    if processor.tokenizer.vocab_size() > vocab {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocabulary is {vocab}",
            m.model.display(),
            processor.tokenizer.vocab_size()
        );
    }
    if processor.tokenizer.special.image_pad != model.config.image_token_id {
        bail!(
            "{}: config.json's image_token_id ({}) is not the tokenizer's <|image_pad|> ({})",
            m.model.display(),
            model.config.image_token_id,
            processor.tokenizer.special.image_pad
        );
    }
    Ok(Loaded { model, processor })
}

/// Token ids that end an assistant turn: `<|im_end|>`, `<|endoftext|>`, and the
/// tokenizer's eos token.
pub fn stop_tokens(proc: &Processor) -> Vec<u32> {
    let s = &proc.tokenizer.special;
    let mut v: Vec<u32> = [s.im_end, s.endoftext, proc.tokenizer.eos_token_id]
        .into_iter()
        .flatten()
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Splits a completion into its reasoning (the `<think>` block) and the rest.
pub fn split_reasoning(text: &str) -> (Option<String>, String) {
    match (text.find("<think>"), text.find("</think>")) {
        (Some(a), Some(b)) if b > a => (
            Some(text[a + 7..b].trim().to_string()),
            text[b + 8..].trim().to_string(),
        ),
        _ => (None, text.trim().to_string()),
    }
}
