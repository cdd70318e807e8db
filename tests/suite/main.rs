//! The integration tests, as one test binary: each module was a file of its own under
//! tests/, and so a binary of its own that linked the whole crate again (18 links of
//! medvlm and its dependencies per build). `cargo test NAME` still selects tests by name
//! (`cargo test serve::` runs one module).

mod common;

mod bench_data;
mod cli;
mod cpu_isa;
mod demo;
mod eval;
mod eval_suite;
mod external_rewards;
mod generate_engine;
mod gguf;
mod grpo_parity;
mod grpo_train;
mod help;
mod hostile;
mod image_processor;
mod layers;
mod lora;
mod medical;
mod medical_hostile;
mod memory_plan;
mod model_parity;
mod plot;
mod quantized;
mod qwen3_parity;
mod readme;
mod rewards;
mod score;
mod selftest;
mod serve;
mod serve_limits;
mod stop_tokens;
mod tensorboard;
mod train_bench;
mod video;
