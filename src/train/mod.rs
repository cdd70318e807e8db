//! The training machinery GRPO and SFT share: trainable parameters, the teacher-forced
//! forward and backward passes over completions ([`logps`], [`token_logps`]), AdamW with
//! checkpointable state, atomic checkpoints in Hugging Face layout, metrics files (JSON
//! lines and TensorBoard event files).

pub mod checkpoint;
pub mod config;
pub mod logps;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod plan;
pub mod run;
pub mod session;
pub mod tensorboard;
pub mod token_logps;

pub use checkpoint::TrainerState;
pub use optim::{AdamW, AdamWConfig, GradAccumulator};
pub use params::{Param, TrainableModel};
