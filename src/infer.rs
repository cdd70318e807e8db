//! What every command that runs a trained model needs (ask, eval, generate, score, the
//! demo, and the server): a checkpoint loaded with its processor (whose tokenizer holds the
//! tokens that end an answer: `QwenTokenizer::stop_tokens`), and the reasoning split from
//! the answer.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

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
    /// Quantize the weights after loading (CPU only); a quantized checkpoint is loaded as
    /// it is either way.
    pub quantize: Option<crate::kernels::quant::QuantKind>,
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
    let dtype = load_dtype(&m.model, m.dtype, m.quantize, &device)?;
    let processor = Processor::from_dir(&m.model, opts)?;
    let model = inference_model(
        &m.model,
        dtype,
        &device,
        m.adapter.as_deref(),
        m.quantize,
        "--quantize",
    )?;
    let vocab = model.config.text.vocab_size;
    if processor.tokenizer.vocab_size() > vocab {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocabulary is {vocab}",
            m.model.display(),
            processor.tokenizer.vocab_size()
        );
    }
    let special = &processor.tokenizer.special;
    for (field, id, token, tok_id) in [
        (
            "image_token_id",
            model.config.image_token_id,
            "<|image_pad|>",
            special.image_pad,
        ),
        (
            "video_token_id",
            model.config.video_token_id,
            "<|video_pad|>",
            special.video_pad,
        ),
    ] {
        if id != tok_id {
            bail!(
                "{}: config.json's {field} ({id}) is not the tokenizer's {token} ({tok_id})",
                m.model.display()
            );
        }
    }
    Ok(Loaded { model, processor })
}

/// The dtype a checkpoint is loaded in for inference: `asked`, else for weights about to be
/// quantized the narrowest dtype that holds them exactly (bf16 for a bf16 checkpoint: half
/// the memory of f32 while loading), so that the result is what `medvlm quantize` writes;
/// else f32 on the CPU and bf16 on a GPU.
pub fn load_dtype(
    dir: &Path,
    asked: Option<DType>,
    quantize: Option<crate::kernels::quant::QuantKind>,
    device: &Device,
) -> Result<DType> {
    Ok(match (asked, quantize) {
        (Some(d), _) => d,
        (None, Some(_)) => crate::model::CheckpointWeights::open(dir)?.exact_float_dtype(),
        (None, None) if device.is_cpu() => DType::F32,
        (None, None) => DType::BF16,
    })
}

/// The model part of [`load`]: the checkpoint in `dtype` on `device`, its adapter merged,
/// quantized to `quantize` (the dense weights freed and handed back to the system), prepared
/// for inference. GRPO's quantized KL reference is built here too, so that its log-probs
/// are exactly those of `score --quantize` (`setting` names the option in errors).
pub fn inference_model(
    dir: &Path,
    dtype: DType,
    device: &Device,
    adapter: Option<&Path>,
    quantize: Option<crate::kernels::quant::QuantKind>,
    setting: &str,
) -> Result<Qwen2Vl> {
    let mut model = Qwen2Vl::load_for_inference(dir, dtype, device)?;
    if let Some(a) = adapter {
        model
            .merge_adapter(a)
            .with_context(|| format!("applying adapter {}", a.display()))?;
    }
    ready_for_inference(&mut model, quantize).with_context(|| match quantize {
        Some(kind) => format!("{}: {setting} {}", dir.display(), kind.name()),
        None => dir.display().to_string(),
    })?;
    Ok(model)
}

/// Readies a loaded model for inference as every inference command does: quantized to
/// `quantize` (the dense weights freed and handed back to the system), then prepared
/// ([`Qwen2Vl::prepare_for_inference`]).
pub fn ready_for_inference(
    model: &mut Qwen2Vl,
    quantize: Option<crate::kernels::quant::QuantKind>,
) -> Result<()> {
    if let Some(kind) = quantize {
        model.quantize(kind)?;
        // The dense weights were dropped layer by layer; without this the allocator keeps
        // their pages (`memory::keep_freed_memory`) and the resident size stays that of the
        // dense model.
        crate::memory::release_freed();
    }
    model.prepare_for_inference()?;
    Ok(())
}

/// Splits a completion into its reasoning (the `<think>` block) and the rest. A block opened
/// at the start and never closed (a Thinking template's completion cut off by the token
/// limit) is all reasoning, as [`ReasoningStream`] shows it.
pub fn split_reasoning(text: &str) -> (Option<String>, String) {
    match (text.find(THINK), text.find(END_THINK)) {
        (Some(a), Some(b)) if b > a => (
            Some(text[a + THINK.len()..b].trim().to_string()),
            text[b + END_THINK.len()..].trim().to_string(),
        ),
        (Some(a), None) if text[..a].trim().is_empty() => (
            Some(text[a + THINK.len()..].trim().to_string()),
            String::new(),
        ),
        _ => (None, text.trim().to_string()),
    }
}

/// [`split_reasoning`] for text that arrives in pieces (a streamed completion): each
/// [`ReasoningStream::push`] returns the new reasoning and the new answer text that are
/// certain, holding back what the next piece could still change (a partly written
/// `</think>`, whitespace that may turn out to be trailing). Concatenated, the pieces equal
/// [`ReasoningStream::parts`] of the whole text, which is `split_reasoning` of it when the
/// text starts with a `<think>` block or has none.
///
/// A `<think>` block is recognised only at the start of the text (after whitespace): that is
/// where reasoning models write it, and it is the only place a stream can recognise it
/// without holding back all the text.
#[derive(Debug, Default, Clone)]
pub struct ReasoningStream {
    text: String,
    sent_reasoning: usize,
    sent_content: usize,
}

/// New text for each of the two parts.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Parts {
    pub reasoning: String,
    pub content: String,
}

use crate::processor::chat_template::{END_THINK, THINK};

impl ReasoningStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// A stream whose text starts with `opening`, what the chat template's generation prompt
    /// wrote of the reasoning block ([`crate::processor::Processor::completion_text`]): under
    /// a Thinking template the generated text is reasoning until `</think>`.
    pub fn opened(opening: &str) -> Self {
        Self {
            text: opening.to_string(),
            ..Self::default()
        }
    }

    /// Adds a piece of the text; returns what can be shown now.
    pub fn push(&mut self, piece: &str) -> Parts {
        self.text.push_str(piece);
        self.emit(false)
    }

    /// The text is complete: returns the rest.
    pub fn finish(&mut self) -> Parts {
        self.emit(true)
    }

    /// (reasoning, content) of the text so far, as final text; `None` reasoning when the
    /// text has no `<think>` block.
    pub fn parts(&self) -> (Option<String>, String) {
        let (r, c, think) = view(&self.text, true);
        (think.then(|| r.to_string()), c.to_string())
    }

    fn emit(&mut self, done: bool) -> Parts {
        let (r, c, _) = view(&self.text, done);
        let out = Parts {
            reasoning: r.get(self.sent_reasoning..).unwrap_or("").to_string(),
            content: c.get(self.sent_content..).unwrap_or("").to_string(),
        };
        self.sent_reasoning = self.sent_reasoning.max(r.len());
        self.sent_content = self.sent_content.max(c.len());
        out
    }
}

/// The parts of `text` that are certain: all of them when `done`, else without what more
/// text could change (trailing whitespace is always left out: it may be the end).
/// Returns (reasoning, content, has_think_block).
fn view(text: &str, done: bool) -> (&str, &str, bool) {
    let ts = text.trim_start();
    if !done && THINK.starts_with(ts) && ts.len() < THINK.len() {
        return ("", "", false); // could still become "<think>"
    }
    let Some(after) = ts.strip_prefix(THINK) else {
        return ("", ts.trim_end(), false);
    };
    match after.find(END_THINK) {
        Some(i) => (after[..i].trim(), after[i + END_THINK.len()..].trim(), true),
        None => {
            let mut keep = after.len();
            if !done {
                // Hold back a suffix that may be the start of "</think>".
                for k in (1..END_THINK.len()).rev() {
                    if after.len() >= k
                        && after.is_char_boundary(after.len() - k)
                        && END_THINK.starts_with(&after[after.len() - k..])
                    {
                        keep = after.len() - k;
                        break;
                    }
                }
            }
            (after[..keep].trim(), "", true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way of cutting the text into pieces streams the same parts as the whole text,
    /// and those are `split_reasoning`'s.
    #[test]
    fn streamed_parts_equal_the_whole_texts_for_every_cut() {
        let texts = [
            "<think>The mass is in the liver.</think><answer>B</answer>",
            "  <think>\n a </think>\n\n<answer>C</answer>  \n",
            "<think>cut off mid reasoning </th",
            "<answer>A</answer>",
            "<thin",
            "",
            "   ",
            "<think></think>",
            "<think>é</think>ü x ",
            "plain answer with < and </think> inside",
        ];
        for t in texts {
            let whole = {
                let mut s = ReasoningStream::new();
                s.push(t);
                s.parts()
            };
            if t.trim_start().starts_with("<think>") || !t.contains("<think>") {
                assert_eq!(whole, split_reasoning(t), "{t:?}");
            }
            let chars: Vec<(usize, char)> = t.char_indices().collect();
            for step in 1..=3 {
                let mut s = ReasoningStream::new();
                let (mut r, mut c) = (String::new(), String::new());
                let mut i = 0;
                while i < chars.len() {
                    let a = chars[i].0;
                    let b = chars.get(i + step).map_or(t.len(), |x| x.0);
                    let p = s.push(&t[a..b]);
                    r += &p.reasoning;
                    c += &p.content;
                    i += step;
                }
                let p = s.finish();
                r += &p.reasoning;
                c += &p.content;
                assert_eq!(
                    (whole.0.clone().unwrap_or_default(), whole.1.clone()),
                    (r, c),
                    "{t:?} in pieces of {step}"
                );
            }
        }
        let mut s = ReasoningStream::new();
        s.push("<think>a</think><answer>B</answer>");
        assert_eq!(s.parts(), (Some("a".into()), "<answer>B</answer>".into()));
        let mut s = ReasoningStream::new();
        // Nothing of a possible "</think>" is shown early.
        assert_eq!(
            s.push("<think>abc </"),
            Parts {
                reasoning: "abc".into(),
                content: "".into()
            }
        );
        assert_eq!(s.push("think> x").content, "x");
    }

    /// Under a template that opened the block, generated text is reasoning until `</think>`,
    /// streamed or whole; the opening itself shows nothing.
    #[test]
    fn an_opened_block_makes_the_generated_text_reasoning() {
        for opening in ["<think>\n", "<think>"] {
            let mut s = ReasoningStream::opened(opening);
            assert_eq!(
                s.push("The lesion "),
                Parts {
                    reasoning: "The lesion".into(),
                    content: "".into()
                }
            );
            assert_eq!(s.push("is cystic.</thi").reasoning, " is cystic.");
            let p = s.push("nk>\n\n<answer>B</answer>");
            assert_eq!(
                (p.reasoning.as_str(), p.content.as_str()),
                ("", "<answer>B</answer>")
            );
            let whole = format!("{opening}The lesion is cystic.</think>\n\n<answer>B</answer>");
            assert_eq!(s.parts(), split_reasoning(&whole));
            // Cut off before `</think>`: all reasoning.
            let mut s = ReasoningStream::opened(opening);
            let shown = s.push("still thinking ").reasoning + &s.finish().reasoning;
            assert_eq!(shown, "still thinking");
            assert_eq!(
                split_reasoning(&format!("{opening}still thinking")),
                (Some("still thinking".into()), String::new())
            );
        }
    }
}
