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
use crate::kernels::quant::QuantKind;
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
        /// Optimizer steps per rollout: above 1, the sampling policy's log-probs are kept.
        iterations: u64,
        /// The reference model's weights quantized (`reference_quantize`), with beta and
        /// without LoRA.
        reference_quantize: Option<QuantKind>,
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

/// The model's sizes the activation terms are counted in.
struct Dims {
    layers: u64,
    h: u64,
    /// Query width (heads x head_dim) and key/value width (kv_heads x head_dim).
    q: u64,
    kv: u64,
    i: u64,
    heads: u64,
    vocab: u64,
    /// Vision tower: blocks, width, MLP width, heads, values per input patch.
    v_depth: u64,
    v_d: u64,
    v_m: u64,
    v_heads: u64,
    patch_dim: u64,
}

impl Dims {
    fn of(c: &Qwen2VlConfig) -> Self {
        let (t, v) = (&c.text, &c.vision);
        Self {
            layers: t.num_hidden_layers as u64,
            h: t.hidden_size as u64,
            q: (t.num_attention_heads * t.head_dim) as u64,
            kv: (t.num_key_value_heads * t.head_dim) as u64,
            i: t.intermediate_size as u64,
            heads: t.num_attention_heads as u64,
            vocab: t.vocab_size as u64,
            v_depth: v.depth as u64,
            v_d: v.embed_dim as u64,
            v_m: v.mlp_hidden() as u64,
            v_heads: v.num_heads as u64,
            patch_dim: v.patch_dim() as u64,
        }
    }
}

/// How the training passes run, which decides what they keep. `fused`: the CPU kernels
/// (attention, norms, rotary, SwiGLU, log-softmax as single ops that keep little; bf16
/// tensors run through them widened, keeping only their bf16 inputs and outputs);
/// otherwise (any GPU, or `MEDVLM_PLAIN_OPS`) they are composed of tensor ops, every
/// intermediate of which candle's graph holds until the backward pass.
#[derive(Clone, Copy)]
struct Regime {
    fused: bool,
    /// Bytes per element in the compute dtype.
    b: u64,
}

impl Regime {
    /// A cast to f32 and back costs nothing when the compute dtype is f32 already.
    fn upcast(&self) -> u64 {
        if self.b == 4 {
            0
        } else {
            4
        }
    }

    /// Bytes one decoder layer keeps per token for the backward pass, attention scores and
    /// the prompt's keys aside (see [`Regime::scores`]).
    fn layer_token(&self, d: &Dims, lora_extra: u64) -> u64 {
        let (h, q, kv, i, b) = (d.h, d.q, d.kv, d.i, self.b);
        let kept = if self.fused {
            // Norm, o_proj, residual, norm, down_proj, residual (6h); q: matmul, bias,
            // rotated, the segment's copy, attention output, concatenation, transposed copy
            // (7q); k: matmul, bias, rotated, v: matmul, bias, transposed copy (6kv); gate,
            // up, SwiGLU (3i).
            b * (6 * h + 7 * q + 6 * kv + 3 * i)
        } else {
            // Each RMSNorm: f32 input, square, division, cast back, weight (in f32 the casts
            // are the input itself); q and k rotated by composed ops (5.5 each: products,
            // negated half, concatenation, sum, copy); SiLU and product beside gate and up.
            let norm = 12 * h + 2 * self.upcast() / 4 * b * h;
            2 * norm + b * (4 * h) + (b * 23 * q) / 2 + (b * 21 * kv) / 2 + b * 4 * i
        };
        kept + lora_extra
    }

    /// Bytes composed attention keeps for `queries` x `keys` scores per head (the fused
    /// op keeps none): the product, scaled, in f32, masked, the softmax's difference,
    /// exponential and quotient, cast back.
    fn scores(&self, heads: u64, queries: u64, keys: u64, masked: bool) -> u64 {
        if self.fused {
            return 0;
        }
        let casts = if self.b == 4 { 0 } else { 4 + self.b };
        let per = 2 * self.b + casts + 12 + if masked { 4 } else { 0 };
        heads * queries * keys * per
    }

    /// Bytes of the gradients composed attention's backward pass holds at once for one
    /// layer's scores (three f32 tensors of them); none for the fused op.
    fn score_grads(&self, heads: u64, queries: u64, keys: u64) -> u64 {
        if self.fused {
            0
        } else {
            12 * heads * queries * keys
        }
    }

    /// Bytes one vision block keeps per patch, attention scores aside.
    fn vision_patch(&self, d: &Dims) -> u64 {
        let (dd, m, b) = (d.v_d, d.v_m, self.b);
        if self.fused {
            // Norm, qkv (matmul and bias), rotated q and k, v's copy, attention output,
            // concatenation, transposed copy, proj (2), residual, norm, fc2 (2),
            // residual (20d); fc1 (2) and QuickGELU (3m).
            b * (20 * dd + 3 * m)
        } else {
            // LayerNorms composed in f32 (about 6 tensors each), rotary in f32 and back,
            // QuickGELU as product, sigmoid and scale.
            2 * 6 * 4 * dd + 2 * (4 * 5 + b) * dd + b * (16 * dd + 5 * m)
        }
    }
}

/// Parameter counts by role.
struct Params {
    total: u64,
    /// The embedding table (and an untied LM head): their gradients are added by hand.
    embed: u64,
    /// The vision tower without the merger: what `freeze_vision` stops training.
    vision: u64,
    /// Linear layers LoRA could adapt, by module path, with (in, out).
    linears: Vec<(String, u64, u64)>,
}

fn params(c: &Qwen2VlConfig) -> Result<Params> {
    let t = &c.text;
    let linears = crate::model::linear_shapes(c)?
        .into_iter()
        .map(|(name, inp, out)| (name, inp as u64, out as u64))
        .collect();
    let embed =
        t.vocab_size as u64 * t.hidden_size as u64 * if t.tie_word_embeddings { 1 } else { 2 };
    let vision = crate::model::random::tensor_shapes(c)?
        .iter()
        .filter(|(n, _)| {
            (n.starts_with("visual.") || n.contains(".visual.")) && !n.contains("merger")
        })
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    Ok(Params {
        total: crate::model::num_parameters(c)? as u64,
        embed,
        vision,
        linears,
    })
}

/// The most prompts whose passes are open at once: completions go through in order,
/// `mb` at a time, and a prompt's pass stays open from its first completion's micro-batch
/// to its last one's.
fn prompts_open(prompts: u64, group: u64, mb: u64) -> u64 {
    let n = prompts * group;
    let windows = n.div_ceil(mb.max(1));
    if windows > 1 << 20 {
        return (mb.div_ceil(group) + 1).min(prompts);
    }
    (0..windows)
        .map(|k| {
            let first = k * mb / group;
            let last = ((k + 1) * mb).min(n).saturating_sub(1) / group;
            last - first + 1
        })
        .max()
        .unwrap_or(1)
}

/// Memory the process has before the model: the binary, its libraries, thread stacks and
/// the heap's first allocations (measured 19-20 MiB resident on the CPU with 1 to 16
/// threads). On a GPU, the CUDA context and the kernels loaded on the device.
fn runtime(cpu: bool) -> u64 {
    if cpu {
        20 << 20
    } else {
        200 << 20
    }
}

/// The estimate for `p`, against `available` bytes on `device` (a description).
pub fn estimate(p: &PlanInput, device: &str, available: Option<u64>) -> Result<Plan> {
    let c = &p.config;
    let d = Dims::of(c);
    let sh = params(c)?;
    let b = bytes_of(p.compute);
    let cpu_kernels = p.cpu && crate::kernels::cpu_kernels();
    // bf16 on a CPU with AVX-512 BF16: linear layers and the LM head run on bf16 dot
    // products; models that only score or decode (the reference, the rollout copy) are
    // prepared for inference, bf16 weights under f32 activations.
    let bf16_dot = cpu_kernels && p.compute == DType::BF16 && crate::kernels::bf16dot::available();
    let regime = Regime {
        fused: cpu_kernels && matches!(p.compute, DType::F32 | DType::BF16),
        b,
    };
    let lora = p.lora.as_ref().filter(|l| l.enabled());
    let (n_prompts, group, beta, iterations, reference_quantize) = match p.objective {
        Objective::Grpo {
            prompts,
            group,
            beta,
            iterations,
            reference_quantize,
        } => (
            prompts as u64,
            group as u64,
            beta,
            iterations.max(1),
            reference_quantize,
        ),
        Objective::Sft { items } => (items as u64, 1, false, 1, None),
    };
    let grpo = matches!(p.objective, Objective::Grpo { .. });
    let seqs = n_prompts * group;
    let mb = (p.micro_batch.max(1) as u64).min(seqs.max(1));
    let (pt, ct, patches) = (
        p.prompt_tokens.max(1) as u64,
        p.completion_tokens.max(1) as u64,
        p.image_patches as u64,
    );
    // The prompt pass covers all but the prompt's last token.
    let pp = pt - 1;
    let layers = d.layers;

    // Weights, gradients, optimizer state: 4 bytes per parameter each for the f32 masters,
    // their gradients and the two AdamW moments of what trains.
    let (weights, trainable, adapted): (u64, u64, Vec<(String, u64, u64)>) = match lora {
        None => {
            let frozen = if p.freeze_vision { sh.vision } else { 0 };
            (4 * sh.total, sh.total - frozen, vec![])
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
    // The reference is a copy of the starting weights in the compute dtype, or quantized
    // as `--quantize` quantizes an inference model (what stays dense in the compute dtype).
    let reference = match (beta && lora.is_none(), reference_quantize) {
        (false, _) => 0,
        (true, None) => sh.total * b,
        (true, Some(kind)) => crate::model::quantized::quantized_size(c, kind, p.compute)?,
    };
    // A backward pass's gradients of every weight in its graph, held by candle's store until
    // they are added into the accumulated ones (whether those weights train or not: frozen
    // vision weights are variables too). The embedding table's and the LM head's are added
    // by hand, row by row.
    let in_flight = match lora {
        None => 4 * (sh.total - sh.embed),
        Some(_) => 4 * trainable,
    };

    // What a step holds from start to end. A prompt: its ids and its images' pixels (f32).
    // A completion: its tokens, sampling log-probs and decoded text, and the fixed
    // log-probs (reference, and the sampling policy's when a rollout serves several steps).
    let prompt_bytes = 4 * pt + 4 * patches * d.patch_dim + 256;
    let fixed_logps = (beta as u64) + (iterations > 1) as u64;
    let per_completion = ct * (12 + 4 * fixed_logps) + 256;
    let step_data = n_prompts * prompt_bytes + seqs * per_completion;

    // LoRA: per token and adapted layer, the dropout mask (f32) and its product with the
    // input, x·Aᵀ, its product with Bᵀ, the scaled delta and the sum.
    let lora_extra = |text: bool| -> u64 {
        let Some(l) = lora else { return 0 };
        let kept = |inp: u64, out: u64| {
            let dropout = if l.dropout > 0.0 {
                inp * (4 + b + regime.upcast() / 4 * b)
            } else {
                0
            };
            dropout + b * (l.r as u64 + 3 * out)
        };
        let sum: u64 = adapted
            .iter()
            .filter(|(n, _, _)| {
                if text {
                    n.contains("language_model")
                } else {
                    n.contains("visual.blocks")
                }
            })
            .map(|(_, inp, out)| kept(*inp, *out))
            .sum();
        sum / if text { layers } else { d.v_depth }.max(1)
    };
    let per_token_layer = regime.layer_token(&d, lora_extra(true));
    let per_patch_block = regime.vision_patch(&d) + lora_extra(false);

    // Completions of one micro-batch, packed in one row: every layer's activations, and
    // per completion the prompt's keys and values joined to its own (and, composed, the
    // scores over them).
    let tokens = mb * ct;
    let segment_layer = 2 * d.kv * (pp + ct) * b + regime.scores(d.heads, ct, pp + ct, true);
    let rows_graph = tokens * layers * per_token_layer + mb * layers * segment_layer;
    let rows_act = if p.checkpointing {
        // Every layer's input, one layer's activations while it runs again, the gradient.
        (layers + 1) * tokens * d.h * b
            + tokens * per_token_layer
            + mb * segment_layer
            + 2 * tokens * d.h * 4
    } else {
        rows_graph + 3 * tokens * d.h * b
    };

    // A prompt's pass: its decoder layers (keys and values handed to the completions as
    // leaves, with their summed gradients) and its image through the vision tower.
    let open = if grpo {
        prompts_open(n_prompts, group, mb)
    } else {
        mb
    };
    let prompt_kv = layers * 2 * d.kv * pp * b;
    let vision_scores = regime.scores(d.v_heads, patches, patches, false);
    let merged = patches / 4;
    let vision_graph = if patches == 0 {
        0
    } else {
        patches * d.v_depth * per_patch_block
            + d.v_depth * vision_scores
            + patches * (d.v_d + d.patch_dim * regime.upcast() / 4) * b
            + merged * (3 * 4 * d.v_d + 2 * d.h) * b
    };
    let prompt_graph = pp * layers * per_token_layer
        + layers * regime.scores(d.heads, pp, pp, true)
        + 2 * pp * d.h * b;
    let pixels = 4 * patches * d.patch_dim;
    let prompt_act = if p.checkpointing {
        // Layer inputs, the keys and values (detached, leaves, gradients), the vision
        // tower's block inputs and features; one layer runs again at a time.
        let tape =
            layers * pp * d.h * b + 3 * prompt_kv + pixels + (d.v_depth + 2) * patches * d.v_d * b;
        let replay = (pp * per_token_layer + regime.scores(d.heads, pp, pp, true))
            .max(patches * per_patch_block + vision_scores);
        open * tape + replay
    } else {
        open * (prompt_graph + vision_graph + pixels + 2 * prompt_kv)
    };

    // The LM head over the micro-batch's tokens (f32): the fused kernel keeps one softmax;
    // as tensor ops the logits, log-softmax and its intermediates live at once, and the
    // weight is read in f32. bf16 compute on the CPU takes the kernel where AVX-512 BF16
    // multiplies it: through the tensor ops it had measured 1.2 GB over this plan at the
    // bench model's 151,936-word vocabulary (5.58 GB peak against 4.4 planned), memory
    // that grew with the vocabulary while the small-vocabulary sweep stayed within 10%.
    // Without AVX-512 BF16 the kernel still runs, in f32: bf16 hidden states widened, a bf16
    // weight (a LoRA base, the reference's) widened a block of 8 MB at a time
    // (`train::token_logps`). An f16 head (an f16 LoRA base) takes the tensor ops.
    let head_weight_read =
        lora.is_none_or(|l| matches!(l.base_dtype().ok(), Some(DType::F32 | DType::BF16)));
    let head_kernel = regime.fused && head_weight_read;
    let head_f32_copy = if head_kernel || (lora.is_none() && b == 4) {
        0
    } else {
        d.vocab * d.h * 4
    };
    // When the head is a trained variable (full fine-tuning) candle records the tensor ops
    // on it, and the saved softmax then holds the logits, the scaled logits, the
    // log-softmax's difference, exponential and result (backward adds two more).
    let lm_head = if head_kernel {
        tokens * d.vocab * 4
    } else if lora.is_none() {
        8 * tokens * d.vocab * 4
    } else {
        4 * tokens * d.vocab * 4 + head_f32_copy
    };

    // Weights cast to the compute dtype are kept by the graph until the backward pass when
    // the weights are trained (full fine-tuning in bf16: the f32 masters' bf16 copies, as
    // PyTorch's autocast keeps them) or, off the CPU, for a frozen base in another dtype (on
    // the CPU a custom op casts the frozen base again in the backward pass instead). Every
    // pass casts again: the completions' and each open prompt's.
    let base_dtype = lora.and_then(|l| l.base_dtype().ok());
    // (On the CPU with AVX-512 BF16, bf16 linear layers round the f32 masters again in the
    // backward pass instead: `kernels::bf16linear`.)
    let kept_casts = match (lora, base_dtype) {
        (None, _) => p.compute != DType::F32 && !bf16_dot,
        (Some(_), Some(bd)) => !p.cpu && bd != p.compute,
        (Some(_), None) => false,
    };
    let linear_sum = |prefix: &str| {
        sh.linears
            .iter()
            .filter(|(n, _, _)| n.contains(prefix))
            .map(|(_, i, o)| i * o)
            .sum::<u64>()
    };
    let (text_w, vision_w) = (linear_sum("language_model"), linear_sum("visual"));
    let weight_casts = if !kept_casts {
        0
    } else if p.checkpointing {
        (linear_sum("language_model.layers.0.") + linear_sum("visual.blocks.0.")) * b
    } else {
        (text_w * (1 + open) + vision_w * open) * b
    };

    // Generation: every prompt's cache forked into G rows with room for the whole
    // completion; per sequence its history and log-probs; per decoding step the logits of
    // every row (the previous step's are held until the new ones exist), one layer's
    // activations with its attention scores, and a group's logits copied out in f32 rows
    // to sample from (the heap keeps those rows' memory for the next step's copy).
    // A bf16 run with AVX-512 BF16 (not LoRA) decodes and scores the reference with
    // models prepared for inference: f32 activations, caches and logits; its rollouts with
    // a bf16 copy of the weights, built for each rollout (`TrainableModel::rollout_model`).
    // (Prepared on any CPU with the kernels: without AVX-512 BF16 the prepared layers widen
    // their bf16 weights instead; `Qwen2Vl::prepare_for_scoring`, `rollout_model`.)
    let prepared = cpu_kernels && p.compute == DType::BF16 && lora.is_none();
    let sb = if prepared { 4 } else { b };
    let rollout_copy = if prepared && grpo { 2 * sh.total } else { 0 };
    let kv_cache = if grpo {
        seqs * (pt + ct) * layers * 2 * d.kv * sb
    } else {
        0
    };
    let seq_state = seqs * (8 * (pt + ct) + 4 * ct + 512);
    let logits = seqs * d.vocab * sb;
    let sampled = group * d.vocab * 4 * (1 + regime.upcast() / 4);
    let decode_layer = seqs * ((3 * d.h + 3 * d.i) * sb + d.heads * (pt + ct) * 8);
    let decode = logits + logits.max(decode_layer) + sampled;
    let prefill = pt * (3 * d.h + 3 * d.i) * sb
        + if regime.fused || !p.cpu && b == 4 {
            0
        } else {
            d.heads * pt * pt * 12
        }
        + patches * (3 * d.v_d + 2 * d.v_m) * sb
        + regime.scores(d.v_heads, patches, patches, false) / 2;
    let generation = if grpo {
        decode.max(prefill) + rollout_copy
    } else {
        0
    };

    // The reference model's (and sampling policy's) log-probs: no graph; the open prompts'
    // keys and values, one layer's activations at a time, the LM head in chunks (kept as
    // the scratch buffer the policy pass reuses).
    let chunk_rows = ((320u64 << 20) / (4 * d.vocab)).clamp(1, tokens);
    let pass = |sb: u64, head_in_chunks: bool| {
        let infer_head = if head_in_chunks {
            chunk_rows * d.vocab * 4
        } else {
            4 * tokens * d.vocab * 4 + head_f32_copy
        };
        let infer_rows = tokens * (3 * d.h + 3 * d.i) * sb
            + if regime.fused {
                0
            } else {
                d.heads * ct * (pp + ct) * 12
            };
        open * prompt_kv / b * sb + infer_rows + infer_head
    };
    // A quantized reference is prepared for inference (f32 activations under the CPU
    // kernels) and scores through its quantized head in those chunks, whatever the dtype.
    let reference_pass = match reference_quantize {
        Some(_) if lora.is_none() => pass(if cpu_kernels { 4 } else { sb }, true),
        _ => pass(sb, head_kernel),
    };
    let fixed_pass = match (beta, iterations > 1) {
        (true, true) => reference_pass.max(pass(sb, head_kernel)),
        (true, false) => reference_pass,
        _ => pass(sb, head_kernel),
    };

    // candle's backward pass holds the gradients of the tensors whose consumers it has been
    // through and they not yet: measured at 22 bytes per token and unit of i + h (the MLP's
    // and the residual stream's) for the largest pass (the micro-batch's rows, a prompt, an
    // image's patches), and as composed ops three f32 gradients of every score of a layer.
    let grads_of = |n: u64, width: u64, heads: u64, queries: u64, keys: u64| {
        22 * n * width + regime.score_grads(heads, queries, keys)
    };
    let frontier = grads_of(tokens, d.i + d.h, mb * d.heads, ct, pp + ct)
        .max(grads_of(pp, d.i + d.h, d.heads, pp, pp))
        .max(grads_of(
            patches,
            d.v_m + d.v_d,
            d.v_heads,
            patches,
            patches,
        ));
    let activations = rows_act + prompt_act + lm_head + weight_casts + frontier;
    let runtime = runtime(p.cpu);
    // Allocator slack: what a phase frees and allocates is not all reused (the heap keeps
    // freed memory; buffers of different sizes and threads' arenas fragment it): measured
    // 3-20% over the live heap, 10% of each phase's transient memory here.
    let slack = |transient: u64| transient + transient / 10;
    let base = runtime + weights + reference + optimizer;
    let mut phases = vec![(
        "policy forward/backward",
        base + grads + in_flight + step_data + slack(activations),
    )];
    phases.push(("optimizer", base + step_data + grads));
    if grpo {
        // The previous rollout is held until the new one (with its fixed log-probs)
        // replaces it.
        phases.push((
            "generation",
            base + 2 * step_data + slack(kv_cache + seq_state + generation),
        ));
        if beta || iterations > 1 {
            phases.push((
                "reference/old log-probs forward",
                base + 2 * step_data + slack(fixed_pass),
            ));
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
        line(
            &match reference_quantize.filter(|_| reference > 0) {
                Some(kind) => format!("reference model ({} weights)", kind.name()),
                None => "reference model".to_string(),
            },
            reference,
        ),
        line(
            if grpo {
                "step data: prompts, completions, log-probs"
            } else {
                "step data: items with their images and targets"
            },
            step_data,
        ),
        line("activations: completions, one micro-batch", rows_act),
        line("activations: prompt passes and images", prompt_act),
        line("LM-head softmax, one micro-batch", lm_head),
        line(
            "weights cast to the compute dtype, kept for backward",
            weight_casts,
        ),
        line("gradients in flight (backward pass)", in_flight + frontier),
        line("generation KV cache", kv_cache),
        line(
            "generation: sequences, logits, one layer",
            if grpo { seq_state + generation } else { 0 },
        ),
        line(
            "reference/old log-probs pass",
            if grpo { fixed_pass } else { 0 },
        ),
        line(
            "runtime and allocator slack",
            runtime + slack(activations) - activations,
        ),
    ];
    Ok(Plan {
        lines,
        peak,
        peak_phase,
        available,
        device: device.into(),
    })
}

/// GiB, or MiB under one GiB (small models' terms would all read 0.00 GiB).
fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
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

/// Sets GRPO's `reference_quantize` in a plan's input (SFT has no reference).
fn set_reference_quantize(p: &mut PlanInput, kind: Option<QuantKind>) {
    if let Objective::Grpo {
        reference_quantize, ..
    } = &mut p.objective
    {
        *reference_quantize = kind;
    }
}

/// Settings that would bring `input` under `available`, cheapest change first: gradient
/// checkpointing, a micro-batch of 1, a q8_0 reference model (GRPO's full fine-tuning on the
/// CPU), LoRA (rank 16, bf16 base), bf16 compute, and their combinations; then the largest
/// batch (SFT's items, GRPO's prompts or group) that fits as the rest is. Each as the flags
/// to add and the peak it would give.
pub fn suggestions(input: &PlanInput, available: u64) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let lora16 = LoraConfig {
        r: 16,
        alpha: 32.0,
        ..LoraConfig::default()
    };
    let full = input.lora.as_ref().is_none_or(|l| !l.enabled());
    let (dense_reference, quantized_reference) = match input.objective {
        Objective::Grpo {
            beta: true,
            reference_quantize,
            ..
        } => (reference_quantize.is_none(), reference_quantize.is_some()),
        _ => (false, false),
    };
    // Under LoRA the reference is the base itself: a quantized one is refused.
    let lora = |flags: &str| {
        let mut f = format!("--lora-r 16 --lora-alpha 32{flags}");
        if quantized_reference {
            f.push_str(" --reference-quantize none");
        }
        f
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
    // The reference copy of full fine-tuning in 8.5 bits a weight instead of 32 or 16: its
    // KL term then carries q8_0's error, the policy's training does not change. Quantized
    // models run on the CPU only.
    if full && dense_reference && input.cpu {
        with("--reference-quantize q8_0", &|p| {
            set_reference_quantize(p, Some(QuantKind::Q8_0))
        });
        with(
            "--reference-quantize q8_0 --gradient-checkpointing true",
            &|p| {
                set_reference_quantize(p, Some(QuantKind::Q8_0));
                p.checkpointing = true;
            },
        );
    }
    with(&lora(""), &|p| p.lora = Some(lora16.clone()));
    with(&lora(" --gradient-checkpointing true"), &|p| {
        p.lora = Some(lora16.clone());
        p.checkpointing = true;
    });
    with(
        &lora(" --gradient-checkpointing true --micro-batch 1"),
        &|p| {
            p.lora = Some(lora16.clone());
            p.checkpointing = true;
            p.micro_batch = 1;
        },
    );
    with(
        &lora(" --gradient-checkpointing true --micro-batch 1 --dtype bf16"),
        &|p| {
            p.lora = Some(lora16.clone());
            p.checkpointing = true;
            p.micro_batch = 1;
            p.compute = DType::BF16;
        },
    );
    for (flags, p) in tries {
        let e = estimate(&p, "", None)?;
        if e.peak <= available && (full || !flags.contains("lora")) {
            out.push((flags, e.peak));
        }
    }
    // What a step holds grows with its batch, which no memory saver shrinks: the largest
    // batch that fits with the other settings as they are.
    // (flag, current value, smallest value, how to set it)
    type Size = (&'static str, usize, usize, fn(&mut PlanInput, usize));
    let sizes: Vec<Size> = match input.objective {
        Objective::Sft { items } => vec![("--batch-size", items, 1, |p, n| {
            if let Objective::Sft { items } = &mut p.objective {
                *items = n;
            }
        })],
        Objective::Grpo { prompts, group, .. } => vec![
            ("--batch-prompts", prompts, 1, |p, n| {
                if let Objective::Grpo { prompts, .. } = &mut p.objective {
                    *prompts = n;
                }
            }),
            ("--num-generations", group, 2, |p, n| {
                if let Objective::Grpo { group, .. } = &mut p.objective {
                    *group = n;
                }
            }),
        ],
    };
    for (flag, now, least, set) in sizes {
        let peak_at = |n: usize| -> Result<u64> {
            let mut p = input.clone();
            set(&mut p, n);
            Ok(estimate(&p, "", None)?.peak)
        };
        if now <= least || peak_at(least)? > available || peak_at(now)? <= available {
            continue;
        }
        // The peak grows with the batch: the largest size under `available` by bisection.
        let (mut lo, mut hi) = (least, now);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if peak_at(mid)? <= available {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        out.push((format!("{flag} {lo}"), peak_at(lo)?));
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
                iterations: 1,
                reference_quantize: None,
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
        // The reference is the base with the adapters switched off: no second copy.
        assert_eq!(line(&p, "reference model"), 0);
        // Tied embeddings stay in the compute dtype (f32 here), the rest of the base in bf16.
        let embed = 151_936 * 1536;
        assert_eq!(
            line(&p, "weights"),
            4 * embed + 2 * (PARAMS - embed) + 4 * ADAPTERS
        );
    }

    /// Checkpointing shrinks activations from O(layers) to O(1) layers; activations grow
    /// linearly with the completion length (each completion's rows, and its share of the
    /// prompt's keys, which it attends to, grow by the same amount per token); every
    /// suggested setting fits.
    #[test]
    fn activations_follow_the_settings_and_suggestions_fit() {
        let full = estimate(&input_2b(), "test", None).unwrap();
        let mut ck = input_2b();
        ck.checkpointing = true;
        let ckp = estimate(&ck, "test", None).unwrap();
        let act = |p: &Plan| line(p, "activations: completions");
        assert!(act(&ckp) * 5 < act(&full), "{ckp}\n{full}");
        assert!(ckp.peak < full.peak);
        let with_len = |k: usize| {
            let mut i = input_2b();
            i.completion_tokens *= k;
            act(&estimate(&i, "test", None).unwrap())
        };
        let (one, two, three) = (with_len(1), with_len(2), with_len(3));
        assert!(one < two, "{one} {two}");
        assert_eq!(three - two, two - one);

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

    /// The tiny fixture's shape (tests/fixtures/tiny-a): a 2-layer decoder of width 64
    /// (MLP 128, 4 query and 2 key/value heads of 16, 512 tied embeddings) and a 2-block
    /// vision tower of width 32 (MLP 64, 14-pixel patches over 2 frames).
    fn tiny_reference(quantize: Option<QuantKind>, compute: DType) -> u64 {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-a/config.json");
        let mut i = input_2b();
        i.config = Qwen2VlConfig::from_file(&path).unwrap();
        i.compute = compute;
        i.prompt_tokens = 40;
        i.image_patches = 16;
        i.completion_tokens = 16;
        if let Objective::Grpo {
            reference_quantize, ..
        } = &mut i.objective
        {
            *reference_quantize = quantize;
        }
        line(&estimate(&i, "test", None).unwrap(), "reference model")
    }

    /// A quantized reference counted by hand from tiny-a's shapes: every linear layer whose
    /// input width is a multiple of 32 in groups of 32 weights, 34 bytes a group in q8_0
    /// (ggml's block_q8_0: an f16 scale and 32 bytes) and 20 in q4_1 (block_q4_1: an f16
    /// scale, an f16 minimum and 16 bytes of nibbles), the tied LM head in q8_0 whatever the
    /// format (its dense table freed), and the rest in the compute dtype.
    #[test]
    fn a_quantized_reference_is_counted_at_its_stored_size() {
        // Quantized layers, weights: per decoder layer q 64x64, k and v 32x64, o 64x64, gate
        // and up 128x64, down 64x128 (36,864, twice); per vision block qkv 96x32, proj
        // 32x32, fc1 64x32, fc2 32x64 (8,192, twice); the merger's mlp.0 128x128 and mlp.2
        // 64x128.
        let layers: u64 = 2 * 36_864 + 2 * 8_192 + 128 * 128 + 64 * 128;
        assert_eq!(layers, 114_688);
        let head: u64 = 512 * 64;
        // Left dense: q/k/v biases (128) and two norms (128) per decoder layer, the final
        // norm (64); the patch embedding (32 x 3·2·14·14 = 37,632: 1,176 inputs, not a
        // whole number of groups); per vision block two LayerNorms (128) and the qkv, proj,
        // fc1 and fc2 biases (224); the merger's LayerNorm (64) and biases (128 + 64).
        let dense: u64 = 2 * 256 + 64 + 37_632 + 2 * 352 + 64 + 192;
        assert_eq!(dense, 39_168);
        // The parameter count these shapes add up to: the dense reference at 4 bytes each.
        assert_eq!(
            tiny_reference(None, DType::F32),
            4 * (layers + head + dense)
        );
        let q8 = |w: u64| w / 32 * 34;
        let q4 = |w: u64| w / 32 * 20;
        assert_eq!(
            tiny_reference(Some(QuantKind::Q8_0), DType::F32),
            q8(layers) + q8(head) + 4 * dense
        );
        assert_eq!(
            tiny_reference(Some(QuantKind::Q8_0), DType::F32),
            121_856 + 34_816 + 156_672
        );
        assert_eq!(
            tiny_reference(Some(QuantKind::Q4_1), DType::F32),
            q4(layers) + q8(head) + 4 * dense
        );
        assert_eq!(
            tiny_reference(Some(QuantKind::Q8_0), DType::BF16),
            q8(layers) + q8(head) + 2 * dense
        );
    }

    /// A full fine-tuning run on the CPU that misses its budget only by its reference
    /// model's size is told to quantize it, with the peak that gives; never under LoRA,
    /// without a reference or on a GPU (quantized models run on the CPU); and when it is
    /// already quantized, LoRA is offered with the setting switched off (LoRA refuses it).
    #[test]
    fn the_plan_offers_a_quantized_reference_where_it_fits() {
        let dense = estimate(&input_2b(), "test", None).unwrap();
        let mut q = input_2b();
        set_reference_quantize(&mut q, Some(QuantKind::Q8_0));
        let quantized = estimate(&q, "test", None).unwrap();
        // 8.5 bits a weight instead of 32 for the 2B's linear layers and head.
        assert!(
            line(&quantized, "reference model") * 3 < line(&dense, "reference model"),
            "{quantized}"
        );
        assert!(quantized
            .to_string()
            .contains("reference model (q8_0 weights)"));
        let saved = dense.peak - quantized.peak;
        assert_eq!(
            saved,
            line(&dense, "reference model") - line(&quantized, "reference model"),
            "the reference is held in every phase"
        );
        let available = quantized.peak;
        let fixes = suggestions(&input_2b(), available).unwrap();
        assert!(
            fixes.contains(&("--reference-quantize q8_0".to_string(), quantized.peak)),
            "{fixes:?}"
        );
        let mut gpu = input_2b();
        gpu.cpu = false;
        let on_gpu = estimate(&gpu, "test", None).unwrap().peak;
        let gpu_fixes = suggestions(&gpu, on_gpu - 1).unwrap();
        assert!(
            gpu_fixes
                .iter()
                .all(|(f, _)| !f.contains("reference-quantize")),
            "{gpu_fixes:?}"
        );
        let mut no_kl = input_2b();
        if let Objective::Grpo { beta, .. } = &mut no_kl.objective {
            *beta = false;
        }
        let peak = estimate(&no_kl, "test", None).unwrap().peak;
        assert!(suggestions(&no_kl, peak - 1)
            .unwrap()
            .iter()
            .all(|(f, _)| !f.contains("reference-quantize")));
        // Already quantized: LoRA's suggestions switch it off.
        let fixes = suggestions(&q, 12u64 << 30).unwrap();
        let lora: Vec<_> = fixes
            .iter()
            .filter(|(f, _)| f.contains("--lora-r"))
            .collect();
        assert!(!lora.is_empty(), "{fixes:?}");
        assert!(
            lora.iter()
                .all(|(f, _)| f.ends_with("--reference-quantize none")),
            "{fixes:?}"
        );
        assert!(fixes
            .iter()
            .all(|(f, _)| !f.contains("reference-quantize q8_0")));
    }
}
