//! The memory a training run will need, estimated from the model's shape and the run's
//! settings before anything is loaded: weights, gradients, optimizer state, the reference
//! model, activations per micro-batch, the generation KV cache, against what the device
//! has. `medvlm train … --plan` prints it; every run prints it and refuses to start when it
//! cannot fit, naming settings that would.
//!
//! The activation terms count the tensors this implementation keeps for the backward pass
//! (see `train::logps` and the fused ops in `kernels`), per token and layer; the README
//! gives the estimate against measured peaks.

use anyhow::Result;
use candle_core::DType;

use super::config::{LoraConfig, RunConfig};
use crate::model::lora;
use crate::model::Qwen2VlConfig;

/// Which objective the run trains (shapes the passes it makes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// B prompts x G completions, generation and (with beta) a reference pass.
    Grpo {
        prompts: usize,
        group: usize,
        beta: bool,
    },
    /// `items` sequences per step, each its own prompt.
    Sft { items: usize },
}

/// Everything the estimate depends on.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub config: Qwen2VlConfig,
    pub objective: Objective,
    /// Tokens per prompt (images included), the longest expected.
    pub prompt_tokens: usize,
    /// Vision patches per prompt (4 per image token).
    pub image_patches: usize,
    /// Tokens per completion (or SFT target).
    pub completion_tokens: usize,
    pub micro_batch: usize,
    pub compute: DType,
    pub lora: Option<LoraConfig>,
    pub checkpointing: bool,
    pub freeze_vision: bool,
    /// The fused CPU kernels keep one f32 softmax for the LM head; other devices keep more.
    pub cpu: bool,
}

/// One line of the plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanLine {
    pub what: String,
    pub bytes: u64,
}

/// The estimate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub lines: Vec<PlanLine>,
    /// The largest phase's total.
    pub peak: u64,
    /// Which phase it is.
    pub peak_phase: String,
    /// What the device has free, when known.
    pub available: Option<u64>,
    pub device: String,
}

fn bytes_of(d: DType) -> u64 {
    d.size_in_bytes() as u64
}

/// Parameter counts: (total, embedding table incl. an untied head, linear weights of the
/// layers LoRA could adapt by module path with (in, out)).
struct Shape {
    total: u64,
    embed: u64,
    linears: Vec<(String, u64, u64)>,
}

fn shape(c: &Qwen2VlConfig) -> Result<Shape> {
    let t = &c.text;
    let linears = crate::model::linear_shapes(c)?
        .into_iter()
        .map(|(name, inp, out)| (name, inp as u64, out as u64))
        .collect();
    let embed =
        t.vocab_size as u64 * t.hidden_size as u64 * if t.tie_word_embeddings { 1 } else { 2 };
    Ok(Shape {
        total: crate::model::num_parameters(c)? as u64,
        embed,
        linears,
    })
}

/// The estimate for `p`, against `available` bytes on `device` (a description).
pub fn estimate(p: &PlanInput, device: &str, available: Option<u64>) -> Result<Plan> {
    let c = &p.config;
    let t = &c.text;
    let sh = shape(c)?;
    let b = bytes_of(p.compute);
    let (h, kv, i, layers) = (
        t.hidden_size as u64,
        (t.num_key_value_heads * t.head_dim()) as u64,
        t.intermediate_size as u64,
        t.num_hidden_layers as u64,
    );
    let vocab = t.vocab_size as u64;
    let lora = p.lora.as_ref().filter(|l| l.enabled());

    // Weights, gradients, optimizer state.
    let (weights, trainable, adapted): (u64, u64, Vec<(String, u64, u64)>) = match lora {
        None => {
            let frozen_vision = if p.freeze_vision {
                sh.linears
                    .iter()
                    .filter(|(n, _, _)| n.contains("visual.blocks."))
                    .map(|(_, i, o)| i * o)
                    .sum::<u64>()
            } else {
                0
            };
            (4 * sh.total, sh.total - frozen_vision, vec![])
        }
        Some(l) => {
            let base_b = l.base_dtype().map(bytes_of).unwrap_or(2);
            let adapted: Vec<(String, u64, u64)> = sh
                .linears
                .iter()
                .filter(|(n, _, _)| lora::targets(n, &l.target_modules))
                .cloned()
                .collect();
            let adapters: u64 = adapted.iter().map(|(_, i, o)| l.r as u64 * (i + o)).sum();
            let weights = sh.embed * b + (sh.total - sh.embed) * base_b + 4 * adapters;
            (weights, adapters, adapted)
        }
    };
    let grads = 4 * trainable;
    let optimizer = 8 * trainable;
    let reference = match (p.objective, lora) {
        (Objective::Grpo { beta: true, .. }, None) => sh.total * b,
        _ => 0,
    };

    // Activations kept per token and decoder layer (compute dtype): the layer's input and
    // norm output, q/k/v before and after bias and rotation, the attention output and its
    // reshaped copy, o_proj's output, the residual, the second norm, gate and up, SwiGLU's
    // output, down's output. LoRA with dropout keeps each adapted input's mask and masked
    // copy too.
    let mut per_token_layer = 11 * h + 7 * kv + 3 * i;
    let v = &c.vision;
    let (d, m) = (v.embed_dim as u64, v.mlp_hidden() as u64);
    // Per patch and vision block: inputs, norms, qkv (before and after bias), rotated q/k,
    // attention output and copy, projections, the MLP's two layers and activation.
    let mut per_patch_block = 18 * d + 3 * m;
    if let Some(l) = lora {
        // Per adapted layer and row: x·Aᵀ, and with dropout the mask and the masked input.
        let kept = |inp: u64| if l.dropout > 0.0 { 2 * inp } else { 0 } + l.r as u64;
        let text: u64 = adapted
            .iter()
            .filter(|(n, _, _)| n.contains("language_model"))
            .map(|(_, inp, _)| kept(*inp))
            .sum();
        let vision: u64 = adapted
            .iter()
            .filter(|(n, _, _)| n.contains("visual.blocks"))
            .map(|(_, inp, _)| kept(*inp))
            .sum();
        per_token_layer += text / layers.max(1);
        per_patch_block += vision / (v.depth as u64).max(1);
    }
    let (prompts_open, rows) = match p.objective {
        Objective::Grpo { prompts, .. } => (prompts.min(2) as u64, p.micro_batch as u64),
        Objective::Sft { .. } => (p.micro_batch as u64, p.micro_batch as u64),
    };
    let tokens = rows * p.completion_tokens as u64;
    let prompt_tokens = p.prompt_tokens as u64;
    let patches = p.image_patches as u64;
    let (rows_act, prompt_act, vision_act) = if p.checkpointing {
        (
            // Layer inputs, plus one layer's activations while it runs.
            tokens * (layers + 1) * h * b + tokens * per_token_layer * b,
            prompts_open * prompt_tokens * layers * (h + 2 * kv) * b
                + prompt_tokens * per_token_layer * b,
            prompts_open * patches * (v.depth as u64 + 1) * d * b + patches * per_patch_block * b,
        )
    } else {
        (
            tokens * layers * per_token_layer * b,
            prompts_open * prompt_tokens * layers * per_token_layer * b,
            prompts_open * patches * v.depth as u64 * per_patch_block * b,
        )
    };
    // The LM head's softmax over the micro-batch's tokens (f32): kept once by the fused CPU
    // kernel, logits + log-softmax + probabilities on other devices.
    let lm_head = tokens
        * vocab
        * 4
        * if p.cpu && p.compute == DType::F32 {
            1
        } else {
            3
        };
    let kv_cache = match p.objective {
        Objective::Grpo { prompts, group, .. } => {
            (prompts * group) as u64
                * (prompt_tokens + p.completion_tokens as u64)
                * layers
                * 2
                * kv
                * b
        }
        Objective::Sft { .. } => 0,
    };
    // Weights cast to the compute dtype are kept by the graph until the backward pass when
    // the weights are trained (full fine-tuning in bf16: the f32 masters' bf16 copies, as
    // PyTorch's autocast keeps them) or, off the CPU, for a frozen base in another dtype
    // (on the CPU a custom op casts the frozen base again in the backward pass instead).
    // Checkpointing keeps one layer's (and one vision block's) copies at a time.
    let base_dtype = lora.and_then(|l| l.base_dtype().ok());
    let kept_casts = match (lora, base_dtype) {
        (None, _) => p.compute != DType::F32,
        (Some(_), Some(bd)) => !p.cpu && bd != p.compute,
        (Some(_), None) => false,
    };
    let weight_casts = if !kept_casts {
        0
    } else if p.checkpointing {
        let layer0 = |prefix: &str| {
            sh.linears
                .iter()
                .filter(|(n, _, _)| n.starts_with(prefix))
                .map(|(_, i, o)| i * o)
                .sum::<u64>()
        };
        (layer0("model.language_model.layers.0.") + layer0("model.visual.blocks.0.")) * b
    } else {
        (sh.total - sh.embed) * b
    };
    let runtime: u64 = 200 << 20;
    let activations = rows_act + prompt_act + vision_act + lm_head + weight_casts;
    // Allocator slack: freed activations are not all reused at once.
    let slack = activations / 10;
    let base = weights + reference + optimizer + runtime;
    let mut phases = vec![
        (
            "policy forward/backward",
            base + grads + activations + slack,
        ),
        ("optimizer", base + grads),
    ];
    if let Objective::Grpo { beta, .. } = p.objective {
        phases.push(("generation", base + kv_cache));
        if beta {
            phases.push(("reference forward", base + lm_head));
        }
    }
    let (peak_phase, peak) = phases
        .iter()
        .max_by_key(|(_, v)| *v)
        .map(|(n, v)| (n.to_string(), *v))
        .unwrap_or_default();
    let line = |what: &str, bytes: u64| PlanLine {
        what: what.into(),
        bytes,
    };
    let lines = vec![
        line(
            &match lora {
                None => "weights (f32 masters)".to_string(),
                Some(l) => format!("weights (frozen {} base, f32 adapters)", l.base_dtype),
            },
            weights,
        ),
        line("gradients", grads),
        line("optimizer state (AdamW)", optimizer),
        line("reference model", reference),
        line("activations: completions, one micro-batch", rows_act),
        line("activations: prompt passes", prompt_act),
        line("activations: vision tower", vision_act),
        line("LM-head softmax, one micro-batch", lm_head),
        line(
            "weights cast to the compute dtype, kept for backward",
            weight_casts,
        ),
        line("generation KV cache", kv_cache),
        line("runtime and allocator slack", runtime + slack),
    ];
    Ok(Plan {
        lines,
        peak,
        peak_phase,
        available,
        device: device.into(),
    })
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

impl Plan {
    pub fn fits(&self) -> bool {
        self.available.is_none_or(|a| self.peak <= a)
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "memory plan")?;
        for l in &self.lines {
            if l.bytes > 0 {
                writeln!(f, "  {:<46} {:>12}", l.what, gib(l.bytes))?;
            }
        }
        writeln!(
            f,
            "  {:<46} {:>12}",
            format!("peak ({})", self.peak_phase),
            gib(self.peak)
        )?;
        match self.available {
            Some(a) => write!(f, "  {:<46} {:>12}", self.device, gib(a)),
            None => write!(f, "  {:<46} {:>12}", self.device, "unknown"),
        }
    }
}

/// Settings that would bring `input` under `available`, cheapest change first: gradient
/// checkpointing, a micro-batch of 1, LoRA (rank 16, bf16 base), bf16 compute, and their
/// combinations. Each as the flags to add and the peak it would give.
pub fn suggestions(input: &PlanInput, available: u64) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let lora16 = LoraConfig {
        r: 16,
        alpha: 32.0,
        ..LoraConfig::default()
    };
    let mut tries: Vec<(String, PlanInput)> = Vec::new();
    let mut with = |flags: &str, f: &dyn Fn(&mut PlanInput)| {
        let mut p = input.clone();
        f(&mut p);
        tries.push((flags.to_string(), p));
    };
    with("--gradient-checkpointing true", &|p| p.checkpointing = true);
    with("--micro-batch 1", &|p| p.micro_batch = 1);
    with("--gradient-checkpointing true --micro-batch 1", &|p| {
        p.checkpointing = true;
        p.micro_batch = 1;
    });
    with("--lora-r 16 --lora-alpha 32", &|p| {
        p.lora = Some(lora16.clone())
    });
    with(
        "--lora-r 16 --lora-alpha 32 --gradient-checkpointing true",
        &|p| {
            p.lora = Some(lora16.clone());
            p.checkpointing = true;
        },
    );
    with(
        "--lora-r 16 --lora-alpha 32 --gradient-checkpointing true --micro-batch 1",
        &|p| {
            p.lora = Some(lora16.clone());
            p.checkpointing = true;
            p.micro_batch = 1;
        },
    );
    with(
        "--lora-r 16 --lora-alpha 32 --gradient-checkpointing true --micro-batch 1 --dtype bf16",
        &|p| {
            p.lora = Some(lora16.clone());
            p.checkpointing = true;
            p.micro_batch = 1;
            p.compute = DType::BF16;
        },
    );
    for (flags, p) in tries {
        let e = estimate(&p, "", None)?;
        if e.peak <= available
            && (input.lora.as_ref().is_none_or(|l| !l.enabled()) || !flags.contains("lora"))
        {
            out.push((flags, e.peak));
        }
    }
    Ok(out)
}

/// The plan of a run config: the model's config.json, the objective, and the longest prompt
/// expected (`prompt_tokens`, `image_patches`).
pub fn input_for(
    run: &RunConfig,
    config: Qwen2VlConfig,
    objective: Objective,
    prompt_tokens: usize,
    image_patches: usize,
    completion_tokens: usize,
    device: &candle_core::Device,
) -> Result<PlanInput> {
    Ok(PlanInput {
        config,
        objective,
        prompt_tokens,
        image_patches,
        completion_tokens,
        micro_batch: run.micro_batch,
        compute: run.compute_dtype()?,
        lora: run.lora.enabled().then(|| run.lora.clone()),
        checkpointing: run.gradient_checkpointing,
        freeze_vision: run.freeze_vision,
        cpu: device.is_cpu(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2-VL-2B-Instruct with the paper's GRPO shape (1 prompt x 4 completions, a 448x448
    /// image: 256 image tokens, 1024 patches).
    fn input_2b() -> PlanInput {
        PlanInput {
            config: crate::model::Preset::Qwen2Vl2b.config(),
            objective: Objective::Grpo {
                prompts: 1,
                group: 4,
                beta: true,
            },
            prompt_tokens: 300,
            image_patches: 1024,
            completion_tokens: 128,
            micro_batch: 4,
            compute: DType::F32,
            lora: None,
            checkpointing: false,
            freeze_vision: false,
            cpu: true,
        }
    }

    fn line(p: &Plan, starts: &str) -> u64 {
        p.lines
            .iter()
            .find(|l| l.what.starts_with(starts))
            .unwrap_or_else(|| panic!("no line {starts:?} in {p}"))
            .bytes
    }

    /// Full fine-tuning keeps f32 weights, gradients and two AdamW moments of every one of
    /// the 2,208,985,600 parameters transformers counts for Qwen2-VL-2B-Instruct, and a
    /// reference copy for the KL term.
    #[test]
    fn full_fine_tuning_state_is_sixteen_bytes_per_parameter_plus_the_reference() {
        const PARAMS: u64 = 2_208_985_600;
        let p = estimate(&input_2b(), "test", None).unwrap();
        assert_eq!(line(&p, "weights"), 4 * PARAMS);
        assert_eq!(line(&p, "gradients"), 4 * PARAMS);
        assert_eq!(line(&p, "optimizer"), 8 * PARAMS);
        assert_eq!(line(&p, "reference"), 4 * PARAMS);
        let mut bf16 = input_2b();
        bf16.compute = DType::BF16;
        assert_eq!(
            line(&estimate(&bf16, "test", None).unwrap(), "reference"),
            2 * PARAMS
        );
    }

    /// LoRA r=16 on the seven projections of the 28 decoder layers trains
    /// 28 x 16 x (2(1536+1536) + 2(1536+256) + 3(1536+8960)) = 18,464,768 parameters (by
    /// hand; PEFT's print_trainable_parameters says the same), with no reference copy and a
    /// bf16 base.
    #[test]
    fn lora_trains_only_the_adapters_over_a_bf16_base() {
        const ADAPTERS: u64 = 18_464_768;
        const PARAMS: u64 = 2_208_985_600;
        let mut i = input_2b();
        i.lora = Some(LoraConfig {
            r: 16,
            alpha: 32.0,
            ..LoraConfig::default()
        });
        let p = estimate(&i, "test", None).unwrap();
        assert_eq!(line(&p, "gradients"), 4 * ADAPTERS);
        assert_eq!(line(&p, "optimizer"), 8 * ADAPTERS);
        assert!(p
            .lines
            .iter()
            .all(|l| !l.what.starts_with("reference") || l.bytes == 0));
        // Tied embeddings stay in the compute dtype (f32 here), the rest of the base in bf16.
        let embed = 151_936 * 1536;
        assert_eq!(
            line(&p, "weights"),
            4 * embed + 2 * (PARAMS - embed) + 4 * ADAPTERS
        );
    }

    /// Checkpointing shrinks activations from O(layers) to O(1) layers; activations grow
    /// linearly with the completion length; every suggested setting fits.
    #[test]
    fn activations_follow_the_settings_and_suggestions_fit() {
        let full = estimate(&input_2b(), "test", None).unwrap();
        let mut ck = input_2b();
        ck.checkpointing = true;
        let ckp = estimate(&ck, "test", None).unwrap();
        let act = |p: &Plan| line(p, "activations: completions");
        assert!(act(&ckp) * 5 < act(&full), "{ckp}\n{full}");
        assert!(ckp.peak < full.peak);
        let mut long = input_2b();
        long.completion_tokens *= 2;
        assert_eq!(act(&estimate(&long, "test", None).unwrap()), 2 * act(&full));

        let available = 24u64 << 30;
        assert!(
            full.peak > available,
            "2B full fine-tuning cannot fit 24 GiB"
        );
        let fixes = suggestions(&input_2b(), available).unwrap();
        assert!(!fixes.is_empty());
        for (flags, peak) in &fixes {
            assert!(*peak <= available, "{flags}");
        }
        assert!(fixes.iter().any(|(f, _)| f.contains("--lora-r")));
        assert!(!Plan {
            available: Some(available),
            ..full.clone()
        }
        .fits());
    }
}
