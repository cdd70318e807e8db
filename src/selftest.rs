//! `medvlm selftest`: the numbers that say a device computes what transformers computes,
//! and how fast, in one command. It runs on the committed fixtures (`tests/fixtures`: tiny
//! random checkpoints and what transformers / a PyTorch copy of TRL's GRPO loss computed on
//! them) through the same code paths as `generate`, `eval` and `train`, on whichever device
//! it is given: `--device cpu` in CI, `--device cuda:0` on the first GPU machine.
//!
//! Bounds are the integration tests' (tests/suite/model_parity.rs, tests/suite/grpo_parity.rs): logits
//! within 1e-4 of the logit scale, greedy continuations token for token, teacher-forced
//! log-probs within 1e-4, bf16 logits at most twice as far from the f32 reference as
//! transformers' own bf16 logits with the same argmax, the GRPO loss within 1e-5 and its
//! gradient norm within 1e-4 relative (also with TRL's GSPO ratio and high-entropy mask, whose
//! `entropy` metric is held within 1e-5).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Value;

use crate::generate::{self, Engine, Request, SamplingParams};
use crate::model::Qwen2Vl;
use crate::processor::{Content, Message, Processor, ProcessorOptions, Prompt};
use crate::rl::grpo::{self, LossConfig};
use crate::rl::step::{self, StepBatch};
use crate::train::logps::{self, SeqRef};
use crate::train::TrainableModel;

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    /// What was measured, in words and numbers.
    pub measured: String,
    /// The bound it is held to ("" for a measurement with no bound).
    pub bound: String,
    pub pass: bool,
}

impl Check {
    fn new(name: impl Into<String>, measured: String, bound: &str, pass: bool) -> Self {
        Self {
            name: name.into(),
            measured,
            bound: bound.to_string(),
            pass,
        }
    }
}

pub struct Options {
    pub fixtures: PathBuf,
    pub device: Device,
    /// Also time rollouts and a training step on the 119.7M benchmark model.
    pub bench: bool,
}

/// Runs every check, calling `report` as each finishes; an error means a check could not
/// run at all (a missing fixture, an op the device lacks), not that a bound failed.
pub fn run(opts: &Options, mut report: impl FnMut(&Check)) -> Result<Vec<Check>> {
    if !opts.fixtures.join("tiny-a").is_dir() {
        bail!(
            "{}: the test fixtures are not there (run from the repository root, or pass \
             --fixtures DIR pointing at tests/fixtures)",
            opts.fixtures.display()
        );
    }
    let mut checks = Vec::new();
    let mut push = |c: Check| {
        report(&c);
        checks.push(c);
    };
    for name in ["tiny-a", "tiny-25a"] {
        for c in model_checks(opts, name)? {
            push(c);
        }
    }
    push(bf16_check(opts)?);
    for c in grpo_checks(opts)? {
        push(c);
    }
    if opts.bench {
        for c in bench_checks(&opts.device)? {
            push(c);
        }
    }
    Ok(checks)
}

/// Reference outputs of one tiny checkpoint (tools/make_fixtures.py).
struct Cases {
    meta: Value,
    tensors: HashMap<String, Tensor>,
}

impl Cases {
    fn load(fixtures: &Path, model: &str) -> Result<Self> {
        let json = fixtures.join(format!("cases-{model}.json"));
        let meta = serde_json::from_str(
            &std::fs::read_to_string(&json)
                .with_context(|| format!("{}: cannot read", json.display()))?,
        )
        .with_context(|| format!("{}: not valid JSON", json.display()))?;
        let st = fixtures.join(format!("cases-{model}.safetensors"));
        let tensors = candle_core::safetensors::load(&st, &Device::Cpu)
            .with_context(|| format!("{}: cannot read", st.display()))?;
        Ok(Self { meta, tensors })
    }
    fn list(&self) -> &[Value] {
        self.meta["cases"].as_array().map_or(&[], |v| v.as_slice())
    }
    fn tensor(&self, key: &str) -> Result<&Tensor> {
        self.tensors
            .get(key)
            .with_context(|| format!("fixture tensor {key} missing"))
    }
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_f64())
                .map(|x| x as f32)
                .collect()
        })
        .unwrap_or_default()
}

/// transformers' message JSON (content a string or typed parts) as ours.
fn messages(v: &Value) -> Result<Vec<Message>> {
    let mut out = Vec::new();
    for m in v.as_array().context("messages: not a list")? {
        let role = m["role"]
            .as_str()
            .context("message without a role")?
            .to_string();
        let content = match &m["content"] {
            Value::String(s) => vec![Content::text(s.clone())],
            Value::Array(parts) => parts
                .iter()
                .map(|p| match p["type"].as_str() {
                    Some("image") => Ok(Content::Image),
                    Some("text") => Ok(Content::text(p["text"].as_str().unwrap_or_default())),
                    other => bail!("unexpected message part {other:?}"),
                })
                .collect::<Result<_>>()?,
            other => bail!("unexpected message content {other}"),
        };
        out.push(Message { role, content });
    }
    Ok(out)
}

/// Largest |a - b| and largest |b|, both moved to the CPU as f32.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
    if a.dims() != b.dims() {
        bail!("shape {:?} vs reference {:?}", a.dims(), b.dims());
    }
    let a: Vec<f32> = a
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let b: Vec<f32> = b
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let (mut d, mut m) = (0f32, 0f32);
    for (x, y) in a.iter().zip(&b) {
        d = d.max((x - y).abs());
        m = m.max(y.abs());
    }
    Ok((d, m))
}

fn prompt_for(fixtures: &Path, proc: &Processor, case: &Value) -> Result<Prompt> {
    let images = case["images"]
        .as_array()
        .map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|n| proc.load_image(&fixtures.join("images").join(n.as_str().unwrap_or_default())))
        .collect::<Result<Vec<_>>>()?;
    proc.prepare(&messages(&case["messages"])?, images, true)
}

/// Logits, greedy continuations and teacher-forced log-probs of one checkpoint.
fn model_checks(opts: &Options, name: &str) -> Result<Vec<Check>> {
    let dir = opts.fixtures.join(name);
    let model = Qwen2Vl::load(&dir, DType::F32, &opts.device)?;
    let proc = Processor::from_dir(&dir, &ProcessorOptions::default())?;
    let cases = Cases::load(&opts.fixtures, name)?;
    let stop = proc.tokenizer.stop_tokens().to_vec();
    let (mut worst_rel, mut worst_abs, mut scale_at) = (0f32, 0f32, 0f32);
    let (mut greedy_same, mut greedy_n) = (0, 0);
    let (mut lp_worst, mut lp_n) = (0f32, 0);
    let mut first_mismatch = String::new();
    for case in cases.list() {
        let cname = case["name"].as_str().unwrap_or("?");
        let prompt = prompt_for(&opts.fixtures, &proc, case)?;
        if prompt.input_ids != u32s(&case["input_ids"]) {
            bail!("{name}/{cname}: the prompt's token ids differ from the fixture's");
        }
        let pixels = prompt.pixel_values(&opts.device)?;
        let logits = model.forward_logits(&prompt.input_ids, pixels.as_ref(), &prompt.grids())?;
        let (d, scale) = max_abs_diff(&logits, cases.tensor(&format!("{cname}.logits"))?)?;
        let rel = d / scale.max(1.0);
        if rel > worst_rel {
            (worst_rel, worst_abs, scale_at) = (rel, d, scale);
        }

        let engine = Engine::new(&model, stop.clone(), vec![]);
        let req = Request {
            prompt: &prompt,
            sampling: SamplingParams::default(),
            max_new_tokens: 24,
            num_samples: 1,
        };
        let out = engine.generate(&[req], |_, _, _| {})?;
        let got = out
            .first()
            .and_then(|g| g.first())
            .map(|c| c.tokens.clone());
        greedy_n += 1;
        if got.as_deref() == Some(u32s(&case["greedy_new_tokens"]).as_slice()) {
            greedy_same += 1;
        } else if first_mismatch.is_empty() {
            first_mismatch = format!(" (first mismatch: {cname})");
        }

        if let Some(c) = case.get("completion").and_then(|c| c.as_str()) {
            let ids = proc.tokenizer.encode(c)?;
            let lps = generate::score(&model, &prompt, &ids)?;
            for (a, b) in lps.iter().zip(f32s(&case["completion_logprobs"])) {
                lp_worst = lp_worst.max((a - b).abs());
            }
            lp_n += 1;
        }
    }
    let n = cases.list().len();
    Ok(vec![
        Check::new(
            format!("{name}: logits, f32, {n} prompts"),
            format!("max abs diff {worst_abs:.2e} at logit scale {scale_at:.1}"),
            "1e-4 x scale",
            worst_rel <= 1e-4,
        ),
        Check::new(
            format!("{name}: greedy, 24 tokens"),
            format!("{greedy_same} of {greedy_n} identical{first_mismatch}"),
            "all identical",
            greedy_same == greedy_n && greedy_n > 0,
        ),
        Check::new(
            format!("{name}: teacher-forced log-probs, {lp_n} completions"),
            format!("max abs diff {lp_worst:.2e}"),
            "1e-4",
            lp_worst <= 1e-4 && lp_n > 0,
        ),
    ])
}

/// bf16 compute: as close to the f32 reference as transformers' own bf16, same argmax.
fn bf16_check(opts: &Options) -> Result<Check> {
    let dir = opts.fixtures.join("tiny-b");
    let model = Qwen2Vl::load(&dir, DType::BF16, &opts.device)?;
    let proc = Processor::from_dir(&dir, &ProcessorOptions::default())?;
    let cases = Cases::load(&opts.fixtures, "tiny-b")?;
    let case = cases
        .list()
        .get(1)
        .context("tiny-b: fixture case 1 missing")?;
    let prompt = prompt_for(&opts.fixtures, &proc, case)?;
    let pixels = prompt.pixel_values(&opts.device)?;
    let logits = model.forward_logits(&prompt.input_ids, pixels.as_ref(), &prompt.grids())?;
    let n = prompt.input_ids.len();
    let last = logits
        .narrow(0, n - 1, 1)?
        .squeeze(0)?
        .to_dtype(DType::F32)?;
    let f32_ref = cases
        .tensor("one_image.logits")?
        .narrow(0, n - 1, 1)?
        .squeeze(0)?;
    let (ours, _) = max_abs_diff(&last, &f32_ref)?;
    let (theirs, _) = max_abs_diff(cases.tensor("one_image.logits_last_bf16")?, &f32_ref)?;
    let a: u32 = last.to_device(&Device::Cpu)?.argmax(0)?.to_scalar()?;
    let b: u32 = f32_ref.argmax(0)?.to_scalar()?;
    Ok(Check::new(
        "tiny-b: logits, bf16 compute",
        format!(
            "error vs f32 reference {ours:.3} (transformers' bf16: {theirs:.3}); argmax {}",
            if a == b { "same" } else { "differs" }
        ),
        "<= 2x transformers', same argmax",
        ours <= 2.0 * theirs && a == b,
    ))
}

/// The inputs of tools/make_grpo_fixture.py's GRPO cases: prompts built by our processor
/// (checked token for token against the reference's), completions with their group and
/// truncation flag, rewards, and the whole JSON (expected log-probs, advantages, losses).
pub struct GrpoFixture {
    pub meta: Value,
    pub prompts: Vec<Prompt>,
    /// (prompt index, token ids, truncated), group after group.
    pub completions: Vec<(usize, Vec<u32>, bool)>,
    pub rewards: Vec<f32>,
}

impl GrpoFixture {
    /// Reads `<prefix>-cases.json` from `fixtures` (images from `fixtures/images`).
    pub fn load(fixtures: &Path, prefix: &str, proc: &Processor) -> Result<Self> {
        let path = fixtures.join(format!("{prefix}-cases.json"));
        let meta: Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("{}: cannot read", path.display()))?,
        )
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
        let groups = meta["groups"].as_array().context("grpo cases: no groups")?;
        let mut prompts = Vec::new();
        let mut completions = Vec::new();
        let mut rewards = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            let images = g["images"]
                .as_array()
                .map(|v| v.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|n| {
                    proc.load_image(&fixtures.join("images").join(n.as_str().unwrap_or_default()))
                })
                .collect::<Result<Vec<_>>>()?;
            let text = g["text"].as_str().unwrap_or_default();
            let p = proc.prepare(&[Message::user_with_images(1, text)], images, true)?;
            if p.input_ids != u32s(&g["input_ids"]) {
                bail!(
                    "{}: group {gi}: the prompt's token ids differ",
                    path.display()
                );
            }
            prompts.push(p);
            for c in g["completions"]
                .as_array()
                .map_or(&[][..], |v| v.as_slice())
            {
                completions.push((gi, u32s(&c["ids"]), c["truncated"].as_bool() == Some(true)));
            }
            rewards.extend(f32s(&g["rewards"]));
        }
        Ok(Self {
            meta,
            prompts,
            completions,
            rewards,
        })
    }

    /// Every completion as the trainer's step functions take it.
    pub fn seqs(&self) -> Vec<SeqRef<'_>> {
        self.completions
            .iter()
            .map(|(gi, toks, _)| SeqRef {
                prompt: &self.prompts[*gi],
                prompt_index: *gi,
                tokens: toks,
            })
            .collect()
    }

    /// One flag per completion: whether it hit the length limit.
    pub fn truncated(&self) -> Vec<bool> {
        self.completions.iter().map(|c| c.2).collect()
    }
}

/// One GRPO step's loss and gradient norm against the PyTorch reference of TRL's loss
/// (tools/make_grpo_fixture.py, case grpo_beta0.04_iter1).
fn grpo_checks(opts: &Options) -> Result<Vec<Check>> {
    let fx = &opts.fixtures;
    let policy_dir = fx.join("grpo-policy");
    let policy = TrainableModel::load(&policy_dir, &opts.device)?;
    let reference = Qwen2Vl::load(&fx.join("tiny-a"), DType::F32, &opts.device)?;
    let proc = Processor::from_dir(&policy_dir, &ProcessorOptions::default())?;
    let fixture = GrpoFixture::load(fx, "grpo", &proc)?;
    let (meta, rewards) = (&fixture.meta, &fixture.rewards);
    let seqs = fixture.seqs();
    let truncated = fixture.truncated();
    let g = meta["num_generations"].as_u64().unwrap_or(0) as usize;
    let cfg = LossConfig::default();
    let adv = grpo::advantages(rewards, g, cfg.scale_rewards)?;
    let ref_lp = logps::logps(&reference, &seqs, seqs.len(), 1.0)?;
    let batch = StepBatch {
        seqs: seqs.clone(),
        advantages: &adv,
        truncated: &truncated,
    };
    let t = Instant::now();
    let (grads, stats) = step::policy_gradients(
        &policy,
        &batch,
        &cfg,
        2,
        None,
        Some(&ref_lp),
        Default::default(),
    )?;
    let seconds = t.elapsed().as_secs_f64();
    let norm = grads.norm()?;
    let case = &meta["cases"][0];
    if case["name"] != "grpo_beta0.04_iter1" {
        bail!("grpo-cases.json: expected case grpo_beta0.04_iter1 first");
    }
    let want_loss = case["loss"].as_f64().unwrap_or(f64::NAN);
    let want_norm = case["grad_norm"].as_f64().unwrap_or(f64::NAN);
    let dl = (stats.loss - want_loss).abs();
    let dn = ((norm - want_norm) / want_norm).abs();
    let options = grpo_option_check(fx, &policy, &fixture, &ref_lp, &adv)?;
    Ok(vec![
        Check::new(
            format!("GRPO step loss, {} completions", seqs.len()),
            format!(
                "{:.7} vs reference {want_loss:.7} (diff {dl:.1e})",
                stats.loss
            ),
            "1e-5",
            dl <= 1e-5,
        ),
        Check::new(
            "GRPO step gradient norm",
            format!("{norm:.5} vs reference {want_norm:.5} (relative {dn:.1e}; {seconds:.2}s)"),
            "1e-4 relative",
            dn <= 1e-4,
        ),
        options,
    ])
}

/// TRL 1.16's loss options in one step (grpo-options-cases.json, case
/// sequence_grpo_beta0.04_iter2_rho0.4_masktrunc): GSPO's sequence-level ratio with old
/// log-probs off the policy's by the fixture's offsets, the high-entropy token mask over the
/// micro-batch and the `entropy` metric.
fn grpo_option_check(
    fx: &Path,
    policy: &TrainableModel,
    fixture: &GrpoFixture,
    ref_lp: &[Vec<f32>],
    adv: &[f32],
) -> Result<Check> {
    const CASE: &str = "sequence_grpo_beta0.04_iter2_rho0.4_masktrunc";
    let path = fx.join("grpo-options-cases.json");
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let case = meta["cases"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == CASE))
        .with_context(|| format!("{}: no case {CASE}", path.display()))?;
    let num = |k: &str| case[k].as_f64().unwrap_or(f64::NAN);
    let cfg = LossConfig {
        beta: num("beta"),
        epsilon_low: num("epsilon_low"),
        epsilon_high: num("epsilon_high"),
        mask_truncated_completions: true,
        importance_sampling_level: grpo::ImportanceSamplingLevel::Sequence,
        top_entropy_quantile: num("top_entropy_quantile"),
        ..Default::default()
    };
    let seqs = fixture.seqs();
    let truncated = fixture.truncated();
    let offsets: Vec<Vec<f32>> = meta["old_logp_offsets"]
        .as_array()
        .map_or(&[][..], |v| v.as_slice())
        .iter()
        .map(f32s)
        .collect();
    let old: Vec<Vec<f32>> = logps::logps(&policy.detached()?, &seqs, seqs.len(), 1.0)?
        .into_iter()
        .zip(&offsets)
        .map(|(lp, off)| lp.iter().zip(off).map(|(a, b)| a + b).collect())
        .collect();
    let batch = StepBatch {
        seqs: seqs.clone(),
        advantages: adv,
        truncated: &truncated,
    };
    let (grads, stats) = step::policy_gradients(
        policy,
        &batch,
        &cfg,
        case["micro_batch"].as_u64().unwrap_or(9) as usize,
        Some(&old),
        Some(ref_lp),
        logps::TrainOptions {
            entropy: true,
            ..Default::default()
        },
    )?;
    let norm = grads.norm()?;
    let entropy = stats.entropy.unwrap_or(f64::NAN);
    let (want_loss, want_norm, want_h) = (num("loss"), num("grad_norm"), num("entropy"));
    let dl = (stats.loss - want_loss).abs();
    let dn = ((norm - want_norm) / want_norm).abs();
    let dh = (entropy - want_h).abs();
    Ok(Check::new(
        "GRPO step, GSPO ratio + high-entropy mask",
        format!(
            "loss diff {dl:.1e}, gradient norm relative {dn:.1e}, entropy {entropy:.5} vs \
             {want_h:.5}"
        ),
        "1e-5, 1e-4 relative, 1e-5",
        dl <= 1e-5 && dn <= 1e-4 && dh <= 1e-5,
    ))
}

/// Memory in use on the device: resident memory of the process on the CPU, used device
/// memory (all processes) on a GPU.
pub fn device_memory_mib(device: &Device) -> Option<f64> {
    match device {
        Device::Cpu => Some(crate::bench::peak_rss_mib()),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| (total - free) as f64 / (1024.0 * 1024.0)),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Rollouts at batch 1 and 1 x G=8, and one GRPO training step, on the benchmark model.
fn bench_checks(device: &Device) -> Result<Vec<Check>> {
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let r = crate::bench::run(
        crate::bench::Weights::Random(&crate::bench::Shape::bench()),
        device,
        dtype,
        None,
        64,
        8,
    )?;
    let mut out = vec![Check::new(
        format!(
            "rollouts, {:.1}M bench model, {dtype:?}",
            r.parameters as f64 / 1e6
        ),
        format!(
            "prefill {:.0} ms; decode {:.1} tok/s at batch 1; 1 x G=8: {:.1} tok/s, {:.2}s",
            r.prefill_ms, r.decode_tok_s_batch1, r.group_decode_tok_s, r.group_total_s
        ),
        "",
        r.decode_tok_s_batch1.is_finite() && r.decode_tok_s_batch1 > 0.0,
    )];
    let w = crate::bench::train::TrainWorkload {
        steps: 1,
        completion_len: 64,
        ..Default::default()
    };
    let t = crate::bench::train::run(device, &w)?;
    let s = t.steps.last().context("no training step ran")?;
    let what = if device.is_cpu() {
        "peak resident memory"
    } else {
        "device memory in use"
    };
    let mem = device_memory_mib(device)
        .map(|m| format!("{what} {m:.0} MiB"))
        .unwrap_or_else(|| format!("{what} unknown"));
    out.push(Check::new(
        "GRPO training step, bench model",
        format!(
            "B=1 x G=8 x 64 tokens: {:.2}s (generation {:.2}s, reference {:.2}s, policy {:.2}s); \
             {mem}",
            s.total_s, s.generation_s, s.reference_s, s.policy_s
        ),
        "",
        s.loss.is_finite() && s.grad_norm.is_finite(),
    ));
    Ok(out)
}
