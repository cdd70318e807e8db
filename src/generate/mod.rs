//! Decoding: sampling settings and the sampler, the batched rollout engine (group sampling
//! with a shared prefill), and teacher-forced scoring.

pub mod engine;
pub mod sampling;
pub mod score;
pub mod settings;
pub mod stream;

pub use engine::{
    Completion, Engine, FinishReason, RawLogprobs, Request, Running, SeqOptions, Token,
};
pub use sampling::{Draw, Sampler, SamplingParams};
pub use score::score;
pub use settings::{Effective, GenerationConfig, UserSampling};
pub use stream::TextStream;
