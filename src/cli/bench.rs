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

pub(super) fn run_bench_train(a: BenchTrainArgs) -> Result<()> {
    set_threads(a.threads)?;
    let device = parse_device(a.device.as_deref())?;
    let w = crate::bench::train::TrainWorkload {
        prompts: a.prompts,
        group: a.group,
        completion_len: a.completion_len,
        micro_batch: a.micro_batch,
        beta: a.beta,
        steps: a.steps.max(1),
        image_size: a.image_size,
        prompt_tokens: a.prompt_tokens,
        freeze_vision: a.freeze_vision,
        phase_memory: a.phase_memory,
        sft: a.sft,
        gradient_checkpointing: a.gradient_checkpointing,
        model: a.model,
        lora_r: a.lora_r,
        dtype: match a.dtype {
            DTypeArg::F32 => "f32".into(),
            DTypeArg::Bf16 => "bf16".into(),
            DTypeArg::F16 => bail!("--dtype: training computes in f32 or bf16"),
        },
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
    let dtype = a.dtype.map(DType::from).unwrap_or(if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    });
    let shape = match (&a.config, a.preset) {
        (Some(p), _) => crate::bench::Shape::from_path(p)?,
        (None, p) => crate::bench::Shape::preset(p),
    };
    let report = crate::bench::run(&shape, &device, dtype, a.new_tokens, a.group)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
