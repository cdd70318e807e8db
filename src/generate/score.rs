//! Teacher-forced scoring: the log-probability of each token of a given completion.

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::model::{log_softmax_f32, Qwen2Vl};
use crate::processor::Prompt;

/// Log-probability of each completion token given the prompt and the tokens before it, in
/// f32 (at temperature 1, no filters).
pub fn score(model: &Qwen2Vl, prompt: &Prompt, completion: &[u32]) -> Result<Vec<f32>> {
    if completion.is_empty() {
        bail!("the completion is empty: nothing to score");
    }
    super::engine::check_context(model, prompt.input_ids.len(), completion.len(), 1)?;
    let dev = &model.device;
    let grids = prompt.grids();
    let mut ids = prompt.input_ids.clone();
    ids.extend_from_slice(completion);
    let pixels = prompt.pixel_values(dev)?;
    let logits = model.forward_logits(&ids, pixels.as_ref(), &grids)?;
    let n = prompt.input_ids.len();
    // logits at position i predict token i + 1
    let lp = log_softmax_f32(&logits.narrow(0, n - 1, completion.len())?)?;
    let idx = Tensor::new(completion, dev)?.unsqueeze(1)?;
    Ok(lp
        .gather(&idx, 1)?
        .squeeze(1)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}
