//! `medvlm bench generate | train`.

use super::*;

/// `--threads N`: read by rayon and candle when their thread pools start, which is after this.
pub(super) fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    Ok(())
}

/// Most sequences a benchmark step may hold (prompts x group): far beyond what any device
/// holds, and low enough that the memory plan's arithmetic cannot overflow.
const MAX_SEQUENCES: usize = 1 << 16;
/// Largest benchmark image side: a 4096x4096 RGB image is 50 MB before resizing.
const MAX_IMAGE_SIDE: u32 = 4096;

/// The benchmark's workload checked before any model is built, each size named by its
/// flag: counts of at least 1, the prompt and completion within the model's context, the
/// image size.
fn check_train_workload(a: &BenchTrainArgs) -> Result<()> {
    for (flag, v) in [
        ("--prompts", a.prompts),
        ("--group", a.group),
        ("--completion-len", a.completion_len),
        ("--micro-batch", a.micro_batch),
        ("--steps", a.steps),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    let sequences = a.prompts.saturating_mul(a.group);
    if sequences > MAX_SEQUENCES {
        bail!(
            "--prompts {} x --group {} is {sequences} sequences per step; at most \
             {MAX_SEQUENCES}",
            a.prompts,
            a.group
        );
    }
    if !(a.beta.is_finite() && a.beta >= 0.0) {
        bail!(
            "--beta must be a finite number of at least 0, got {}",
            a.beta
        );
    }
    if !(28..=MAX_IMAGE_SIDE).contains(&a.image_size) {
        bail!(
            "--image-size must be from 28 (one image token) to {MAX_IMAGE_SIDE} pixels, got {}",
            a.image_size
        );
    }
    let config = train_shape(a)?.config()?;
    let context = config.text.max_position_embeddings;
    if a.prompt_tokens.saturating_add(a.completion_len) > context {
        bail!(
            "--prompt-tokens {} plus --completion-len {} exceeds the model's context of \
             {context} tokens",
            a.prompt_tokens,
            a.completion_len
        );
    }
    if a.lora_r > config.text.hidden_size {
        bail!(
            "--lora-r {} exceeds the width of the layers it adapts ({})",
            a.lora_r,
            config.text.hidden_size
        );
    }
    // The step's memory plan is checked by `bench::train::run`, before it builds a model.
    Ok(())
}

/// The shape `bench train` builds: --model's config, else --config, else --preset.
fn train_shape(a: &BenchTrainArgs) -> Result<crate::bench::Shape> {
    match &a.model {
        Some(dir) => crate::bench::Shape::from_path(dir),
        None => a.shape.shape(),
    }
}

pub(super) fn run_bench_train(a: BenchTrainArgs) -> Result<()> {
    set_threads(a.threads)?;
    let device = parse_device(a.device.as_deref())?;
    check_train_workload(&a)?;
    let w = crate::bench::train::TrainWorkload {
        prompts: a.prompts,
        group: a.group,
        completion_len: a.completion_len,
        micro_batch: a.micro_batch,
        beta: a.beta,
        steps: a.steps,
        image_size: a.image_size,
        prompt_tokens: a.prompt_tokens,
        freeze_vision: a.freeze_vision,
        phase_memory: a.phase_memory,
        sft: a.sft,
        gradient_checkpointing: a.gradient_checkpointing,
        entropy: !a.no_entropy,
        shape: train_shape(&a)?,
        model: a.model,
        lora_r: a.lora_r,
        dtype: match a.dtype {
            DTypeArg::F32 => "f32".into(),
            DTypeArg::Bf16 => "bf16".into(),
            DTypeArg::F16 => bail!("--dtype: training computes in f32 or bf16"),
        },
        reference_quantize: a
            .reference_quantize
            .map(|q| QuantKind::from(q).name().to_string()),
    };
    let report = crate::bench::train::run(&device, &w)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

pub(super) fn run_bench_generate(a: BenchGenerateArgs) -> Result<()> {
    set_threads(a.threads)?;
    if a.new_tokens < 2 || a.group == 0 {
        bail!("--new-tokens must be at least 2 and --group at least 1");
    }
    let device = parse_device(a.device.as_deref())?;
    let mut dtype =
        a.dtype
            .map(DType::from)
            .unwrap_or(if device.is_cpu() && a.quantize.is_none() {
                DType::F32
            } else {
                DType::BF16
            });
    let shape = a.shape.shape()?;
    let weights = match &a.model {
        Some(dir) => {
            // As the inference commands load it (not the random model's default).
            let asked = a.dtype.map(DType::from);
            dtype = crate::infer::load_dtype(dir, asked, a.quantize.map(Into::into), &device)?;
            crate::bench::Weights::Checkpoint(dir)
        }
        None => {
            // The random weights are built before anything else: they must fit.
            let config = shape.config()?;
            let bytes =
                crate::model::num_parameters(&config)? as u128 * dtype.size_in_bytes() as u128;
            if let (what, Some(available)) = crate::device::available_memory(&device) {
                if bytes > available as u128 {
                    bail!(
                        "{}: its {} weights take {:.2} GiB but {what} is {:.2} GiB; use a \
                         smaller --preset or --config, or --dtype bf16",
                        shape.name,
                        format!("{dtype:?}").to_lowercase(),
                        bytes as f64 / (1u64 << 30) as f64,
                        available as f64 / (1u64 << 30) as f64
                    );
                }
            }
            crate::bench::Weights::Random(&shape)
        }
    };
    let report = crate::bench::run(
        weights,
        &device,
        dtype,
        a.quantize.map(Into::into),
        a.new_tokens,
        a.group,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
