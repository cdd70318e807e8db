//! medvlm: teach vision-language models to reason about medical images with GRPO
//! (MedVLM-R1), and serve that reasoning.
//!
//! # Layers
//!
//! The modules form layers: a module uses only modules of lower layers, so there is no
//! import circle and each layer can be read, tested and changed knowing only those below
//! it. `tests/suite/layers.rs` reads this table and checks every `crate::` path in `src/`
//! against it.
//!
//! | layer | modules | what they are |
//! |---|---|---|
//! | 0 | [`seed`], [`files`], [`memory`], [`device`], [`kernels`] | foundations: derived seeds, writing files, the allocator, device choice and memory, CPU fast paths |
//! | 1 | [`model`], [`processor`] | Qwen2-VL, Qwen2.5-VL and Qwen3-VL (numerically equal to transformers, presets, parameter counts, quantized inference); images, tokenizer, chat template, stop tokens, DICOM/NIfTI |
//! | 2 | [`data`], [`generate`], [`infer`] | VQA rows, prompts and THE answer rule; the rollout engine and sampling; loading a checkpoint to run it |
//! | 3 | [`train`] | what GRPO and SFT share: forward and backward passes, LoRA parameters, AdamW, checkpoints, the run session, the memory plan |
//! | 4 | [`eval`] | greedy and likelihood evaluation, per-modality reports |
//! | 5 | [`rl`], [`sft`] | GRPO (rewards, loss, loop) and supervised fine-tuning |
//! | 6 | [`bench`], [`init`], [`synth`], [`merge`], [`quantize`], [`import`], [`plot`], [`serve`] | tools built on them: benchmarks, random checkpoints, synthetic scans, adapter merging, quantized checkpoints, GGUF import, curves, the OpenAI-compatible server |
//! | 7 | [`selftest`], [`demo`] | the device check and the offline MedVLM-R1 demo |
//! | 8 | [`cli`] | argument parsing and one file per command |
//!
//! The crate root holds only what every layer may use: [`panic_message`].

pub mod bench;
pub mod cli;
pub mod data;
pub mod demo;
pub mod device;
pub mod eval;
pub mod files;
pub mod generate;
pub mod import;
pub mod infer;
pub mod init;
pub mod kernels;
pub mod memory;
pub mod merge;
pub mod model;
pub mod plot;
pub mod processor;
pub mod quantize;
pub mod rl;
pub mod seed;
pub mod selftest;
pub mod serve;
pub mod sft;
pub mod synth;
pub mod train;

/// The text a panic carried (`panic!("...")` gives a `&str` or a `String`), for the places
/// that turn a caught panic into an error message.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}
