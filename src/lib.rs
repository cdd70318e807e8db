//! medvlm: teach vision-language models to reason about medical images with GRPO
//! (MedVLM-R1), and serve that reasoning.
//!
//! The crate is organised by what each part does:
//! - [`model`]: Qwen2-VL (vision tower, M-RoPE decoder, KV cache) loaded from a local
//!   Hugging Face checkpoint directory, numerically equal to transformers.
//! - [`processor`]: images to pixel patches, tokenizer, chat template, image-token expansion.
//! - [`generate`]: sampling and teacher-forced scoring.
//! - [`train`]: what GRPO and SFT share: the teacher-forced forward and backward passes,
//!   AdamW, checkpoints; [`rl`] and [`sft`] build their objectives on it.
//! - [`kernels`]: CPU fast paths (fused ops with backward passes, the LM head's softmax,
//!   few-row matmuls, in-place updates), each with a tensor-op path for other devices.

pub mod bench;
pub mod cli;
pub mod data;
pub mod demo;
pub mod device;
pub mod eval;
pub mod files;
pub mod generate;
pub mod infer;
pub mod init;
pub mod kernels;
pub mod memory;
pub mod merge;
pub mod model;
pub mod plot;
pub mod processor;
pub mod rl;
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
