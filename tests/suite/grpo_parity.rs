//! The GRPO loss and its gradient against an independent PyTorch reference of TRL's
//! formulas (tools/make_grpo_fixture.py): a perturbed tiny Qwen2-VL policy, the unperturbed
//! model as reference, 3 prompts with an image each, 3 completions per prompt, fixed
//! rewards, and for two iterations fixed old log-probs that make PPO clipping bite.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use medvlm::model::Qwen2Vl;
use medvlm::processor::{Message, Processor, ProcessorOptions, Prompt};
use medvlm::rl::grpo::{self, ImportanceSamplingLevel, LossConfig, LossType, ScaleRewards};
use medvlm::rl::step::{self, StepBatch};
use medvlm::selftest::GrpoFixture;
use medvlm::train::logps::{self, SeqRef};
use medvlm::train::{GradAccumulator, TrainableModel};
use serde_json::Value;

fn f32s2(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(f32s).collect()
}

#[test]
fn grpo_loss_and_gradient_match_pytorch() {
    check_grpo_cases("grpo", "tiny-a");
}

/// The same on Qwen2.5-VL (tiny-25a, window attention in two of the three images), from
/// transformers 5.24.
#[test]
fn grpo_loss_and_gradient_match_pytorch_on_qwen25_vl() {
    check_grpo_cases("grpo25", "tiny-25a");
}

/// The same on Qwen3-VL (tiny-3a: DeepStack from three blocks into the first three of four
/// decoder layers, learned position embeddings, q/k norms; its own chat template and the
/// torchvision image backend), from transformers 5.24. Checkpointing replays the DeepStack
/// additions and sends their gradients back into the tapped blocks.
#[test]
fn grpo_loss_and_gradient_match_pytorch_on_qwen3_vl() {
    check_grpo_cases("grpo3", "tiny-3a");
}

fn check_grpo_cases(prefix: &str, reference_name: &str) {
    let policy_dir = fixtures().join(format!("{prefix}-policy"));
    let policy = TrainableModel::load(&policy_dir, &Device::Cpu).unwrap();
    let reference =
        Qwen2Vl::load(&fixtures().join(reference_name), DType::F32, &Device::Cpu).unwrap();
    let proc = Processor::from_dir(&policy_dir, &ProcessorOptions::default()).unwrap();
    // The prompts, built by our processor, are checked to be the reference's token for token.
    let fixture = GrpoFixture::load(&fixtures(), prefix, &proc).unwrap();
    let (meta, rewards) = (&fixture.meta, &fixture.rewards);
    let seqs = fixture.seqs();
    let truncated = fixture.truncated();
    let g = meta["num_generations"].as_u64().unwrap() as usize;

    // Reference log-probs and advantages are inputs of the loss; check them on their own.
    // Micro-batches of 2 split the groups of 3 (prompt passes shared across micro-batches).
    let want_ref = f32s2(&meta["ref_logps"]);
    for mb in [9, 2] {
        let ref_lp = logps::logps(&reference, &seqs, mb, 1.0).unwrap();
        let mut d = 0f32;
        for (a, b) in ref_lp.iter().zip(&want_ref) {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                d = d.max((x - y).abs());
            }
        }
        println!("reference log-probs (micro-batch {mb}): max diff {d:.2e}");
        assert!(d < 1e-4, "reference log-probs differ by {d}");
    }
    let ref_lp = logps::logps(&reference, &seqs, 9, 1.0).unwrap();
    for (scale, key) in [
        (ScaleRewards::Group, "group"),
        (ScaleRewards::Batch, "batch"),
        (ScaleRewards::None, "none"),
    ] {
        let a = grpo::advantages(rewards, g, scale).unwrap();
        for (x, y) in a.iter().zip(f32s(&meta["advantages"][key])) {
            assert!((x - y).abs() < 1e-6, "{key}: {x} vs {y}");
        }
    }
    // The policy's own log-probs (no gradient) plus the fixture's offsets: the old log-probs
    // of the two-iteration cases.
    let sampler = policy.detached().unwrap();
    let old_lp: Vec<Vec<f32>> = logps::logps(&sampler, &seqs, 9, 1.0)
        .unwrap()
        .into_iter()
        .zip(f32s2(&meta["old_logp_offsets"]))
        .map(|(lp, off)| lp.iter().zip(&off).map(|(a, b)| a + b).collect())
        .collect();

    // The step does not depend on the order completions come in: interleaved prompts (each
    // prompt's pass open across several micro-batches) give the first case's loss and
    // gradient norm.
    {
        let cfg = LossConfig::default();
        let adv = grpo::advantages(rewards, g, cfg.scale_rewards).unwrap();
        let order = [0usize, 3, 6, 1, 4, 7, 2, 5, 8];
        let batch = StepBatch {
            seqs: order.iter().map(|&i| seqs[i]).collect(),
            advantages: &order.iter().map(|&i| adv[i]).collect::<Vec<_>>(),
            truncated: &order.iter().map(|&i| truncated[i]).collect::<Vec<_>>(),
        };
        let refs: Vec<Vec<f32>> = order.iter().map(|&i| ref_lp[i].clone()).collect();
        let (grads, stats) = step::policy_gradients(
            &policy,
            &batch,
            &cfg,
            2,
            None,
            Some(&refs),
            Default::default(),
        )
        .unwrap();
        let case = &meta["cases"][0];
        assert_eq!(case["name"], "grpo_beta0.04_iter1");
        let (want_loss, want_norm) = (
            case["loss"].as_f64().unwrap(),
            case["grad_norm"].as_f64().unwrap(),
        );
        let norm = grads.norm().unwrap();
        println!(
            "interleaved prompts: loss {} vs {want_loss}, grad norm {norm} vs {want_norm}",
            stats.loss
        );
        assert!((stats.loss - want_loss).abs() <= 1e-5);
        assert!(((norm - want_norm) / want_norm).abs() <= 1e-4);
    }

    // Gradient checkpointing (every decoder layer and vision block run again in the
    // backward pass) gives the same gradients, parameter by parameter.
    {
        let cfg = LossConfig::default();
        let adv = grpo::advantages(rewards, g, cfg.scale_rewards).unwrap();
        let batch = StepBatch {
            seqs: seqs.clone(),
            advantages: &adv,
            truncated: &truncated,
        };
        for mb in [9, 2] {
            let run = |checkpointing| {
                let opts = logps::TrainOptions {
                    dropout_seed: None,
                    checkpointing,
                    ..Default::default()
                };
                step::policy_gradients(&policy, &batch, &cfg, mb, None, Some(&ref_lp), opts)
                    .unwrap()
            };
            let ((plain, s1), (ckpt, s2)) = (run(false), run(true));
            assert!(
                (s1.loss - s2.loss).abs() <= 1e-7,
                "loss {} vs {}",
                s1.loss,
                s2.loss
            );
            let mut worst = 0f64;
            for (i, p) in policy.params.iter().enumerate() {
                let (a, b) = (plain.get(i).unwrap(), ckpt.get(i).expect(&p.name));
                let d = (a - b)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt() as f64;
                let n = a
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt() as f64;
                worst = worst.max(d / n.max(1e-30));
            }
            println!(
                "checkpointing (micro-batch {mb}): worst relative gradient difference {worst:.1e}"
            );
            assert!(worst <= 1e-6, "checkpointed gradients differ by {worst}");
        }
    }

    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let cfg = LossConfig {
            loss_type: match case["loss_type"].as_str().unwrap() {
                "grpo" => LossType::Grpo,
                "bnpo" => LossType::Bnpo,
                "dr_grpo" => LossType::DrGrpo,
                "dapo" => LossType::Dapo,
                other => panic!("{other}"),
            },
            beta: case["beta"].as_f64().unwrap(),
            epsilon_low: case["epsilon_low"].as_f64().unwrap(),
            epsilon_high: case["epsilon_high"].as_f64().unwrap(),
            scale_rewards: match case["scale_rewards"].as_str().unwrap() {
                "group" => ScaleRewards::Group,
                "batch" => ScaleRewards::Batch,
                _ => ScaleRewards::None,
            },
            mask_truncated_completions: case["mask_truncated_completions"].as_bool().unwrap(),
            max_completion_length: case["max_completion_length"].as_u64().unwrap() as usize,
            temperature: 1.0,
            ..Default::default()
        };
        let old = (case["num_iterations"].as_u64().unwrap() > 1).then_some(old_lp.as_slice());
        let adv = grpo::advantages(rewards, g, cfg.scale_rewards).unwrap();
        let batch = StepBatch {
            seqs: seqs.clone(),
            advantages: &adv,
            truncated: &truncated,
        };
        let want_loss = case["loss"].as_f64().unwrap();
        let want_norm = case["grad_norm"].as_f64().unwrap();
        // One micro-batch (the fixture's TRL setting); for the losses whose value does not
        // depend on the split (grpo, dapo), micro-batches of 2 and 4 too: prompt passes then
        // carry key/value gradients from micro-batch to micro-batch.
        let splits: &[usize] = match cfg.loss_type {
            LossType::Grpo | LossType::Dapo => &[9, 2, 4],
            _ => &[9],
        };
        for &mb in splits {
            let (grads, stats) = step::policy_gradients(
                &policy,
                &batch,
                &cfg,
                mb,
                old,
                Some(&ref_lp),
                Default::default(),
            )
            .unwrap();
            let got = stats.loss;
            let norm = grads.norm().unwrap();
            // Every parameter receives a gradient: no op on the path silently cuts the graph
            // (candle's fused norms and rope do; see CANDLE-TRAINING-NOTES).
            for (i, p) in policy.params.iter().enumerate() {
                let g = grads
                    .get(i)
                    .unwrap_or_else(|| panic!("{name}: no gradient for {}", p.name));
                let n = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(n > 0.0, "{name}: zero gradient for {}", p.name);
            }
            println!(
                "{name} (micro-batch {mb}): loss {got:.8} vs {want_loss:.8} (diff {:.1e}); grad \
                 norm {norm:.6} vs {want_norm:.6} (rel {:.1e})",
                (got - want_loss).abs(),
                ((norm - want_norm) / want_norm).abs()
            );
            for (pname, want) in case["param_grad_norms"].as_object().unwrap() {
                let i = policy.params.iter().position(|p| &p.name == pname).unwrap();
                let gn = grads
                    .get(i)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt() as f64;
                let want = want.as_f64().unwrap();
                println!("    {pname}: {gn:.6} vs {want:.6}");
                assert!(
                    ((gn - want) / want).abs() < 1e-3,
                    "{name}: {pname} grad norm {gn} vs {want}"
                );
            }
            assert!(
                (got - want_loss).abs() <= 1e-5,
                "{name}: loss {got} vs {want_loss}"
            );
            assert!(
                ((norm - want_norm) / want_norm).abs() <= 1e-4,
                "{name}: grad norm {norm} vs {want_norm}"
            );
        }
    }
}

/// The loss options of TRL 1.16 on the same fixture (tools/make_grpo_fixture.py
/// --options-only, checked against TRL 1.16.0's own `_compute_loss`): GSPO's sequence-level
/// importance ratio with old log-probs that move the ratios off 1, the high-entropy token
/// mask (`top_entropy_quantile`) over each micro-batch's tokens, and the `entropy` metric.
#[test]
fn loss_options_match_trl() {
    check_option_cases("grpo", "tiny-a");
}

#[test]
fn loss_options_match_trl_on_qwen25_vl() {
    check_option_cases("grpo25", "tiny-25a");
}

fn loss_type(name: &str) -> LossType {
    match name {
        "grpo" => LossType::Grpo,
        "bnpo" => LossType::Bnpo,
        "dr_grpo" => LossType::DrGrpo,
        "dapo" => LossType::Dapo,
        other => panic!("{other}"),
    }
}

/// TRL's `entropy` for a step split into micro-batches of `mb`: the mean over micro-batches
/// of each one's token mean (over the loss mask, its count clamped at 1).
fn trl_entropy_metric(entropies: &[Vec<f32>], keep: &[bool], mb: usize) -> f64 {
    let means: Vec<f64> = (0..entropies.len())
        .step_by(mb)
        .map(|start| {
            let end = (start + mb).min(entropies.len());
            let (mut sum, mut count) = (0f64, 0usize);
            for i in (start..end).filter(|&i| keep[i]) {
                sum += entropies[i].iter().map(|&x| x as f64).sum::<f64>();
                count += entropies[i].len();
            }
            sum / count.max(1) as f64
        })
        .collect();
    means.iter().sum::<f64>() / means.len() as f64
}

fn check_option_cases(prefix: &str, reference_name: &str) {
    let policy_dir = fixtures().join(format!("{prefix}-policy"));
    let policy = TrainableModel::load(&policy_dir, &Device::Cpu).unwrap();
    let reference =
        Qwen2Vl::load(&fixtures().join(reference_name), DType::F32, &Device::Cpu).unwrap();
    let proc = Processor::from_dir(&policy_dir, &ProcessorOptions::default()).unwrap();
    let fixture = GrpoFixture::load(&fixtures(), prefix, &proc).unwrap();
    let seqs = fixture.seqs();
    let truncated = fixture.truncated();
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("{prefix}-options-cases.json"))).unwrap(),
    )
    .unwrap();
    let g = meta["num_generations"].as_u64().unwrap() as usize;
    let adv = grpo::advantages(&fixture.rewards, g, ScaleRewards::Group).unwrap();
    for (x, y) in adv.iter().zip(f32s(&meta["advantages"])) {
        assert!((x - y).abs() < 1e-6, "advantages: {x} vs {y}");
    }

    // torch.quantile: to the bit as torch 2.15 computes it; torch 2.8 (the grpo fixture's
    // environment) rounds the rank q·(n-1) to f32 first, which moves some results by an ulp.
    let torch = meta["versions"]["torch"].as_str().unwrap();
    let exact = !torch.starts_with("2.8.");
    let mut off = 0;
    for (k, c) in meta["quantile_checks"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let got = grpo::quantile_linear(&f32s(&c["values"]), c["q"].as_f64().unwrap()).unwrap();
        let want = c["quantile"].as_f64().unwrap() as f32;
        if exact {
            assert_eq!(got, want, "quantile check {k} (q {})", c["q"]);
        } else if got != want {
            off += 1;
            let ulp = f32::from_bits(want.to_bits() + 1) - want;
            assert!(
                (got - want).abs() <= ulp,
                "quantile check {k}: {got} vs {want}"
            );
        }
    }
    println!("torch {torch}'s quantile: {off} of 100 one ulp off");

    // Per temperature: the reference's and the policy's log-probs, and the policy's
    // per-token entropies from the fused LM-head pass (micro-batches of 2 and 9).
    let sampler = policy.detached().unwrap();
    let mut per_t = std::collections::HashMap::new();
    for (t_key, stored) in meta["temperatures"].as_object().unwrap() {
        let t: f64 = t_key.parse().unwrap();
        let ref_lp = logps::logps(&reference, &seqs, 9, t).unwrap();
        let pol_lp = logps::logps(&sampler, &seqs, 9, t).unwrap();
        let (mut d_ref, mut d_pol) = (0f32, 0f32);
        for (rows, want, d) in [
            (&ref_lp, &stored["ref_logps"], &mut d_ref),
            (&pol_lp, &stored["policy_logps"], &mut d_pol),
        ] {
            for (a, b) in rows.iter().zip(f32s2(want)) {
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(&b) {
                    *d = d.max((x - y).abs());
                }
            }
        }
        let want_h = f32s2(&stored["entropies"]);
        let mut d_h = 0f32;
        for mb in [9, 2] {
            let mut got: Vec<Vec<f32>> = Vec::new();
            let mut grads = GradAccumulator::new(policy.params.len());
            let opts = logps::TrainOptions {
                entropy: true,
                ..Default::default()
            };
            logps::backward(&policy, &seqs, mb, t, opts, &mut grads, |m| {
                let h: Vec<Vec<f32>> = m.entropy.unwrap().to_vec2()?;
                for (row, s) in h.iter().zip(&seqs[m.range.clone()]) {
                    got.push(row[..s.tokens.len()].to_vec());
                }
                Ok((m.logp * m.mask)?.sum_all()?)
            })
            .unwrap();
            for (a, b) in got.iter().zip(&want_h) {
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(b) {
                    d_h = d_h.max((x - y).abs());
                }
            }
        }
        println!(
            "temperature {t}: reference log-probs max diff {d_ref:.1e}, policy {d_pol:.1e}, \
             entropies {d_h:.1e}"
        );
        assert!(
            d_ref < 1e-4 && d_pol < 1e-4,
            "log-probs differ by {d_ref}, {d_pol}"
        );
        assert!(d_h < 1e-4, "entropies differ by {d_h}");
        per_t.insert(t_key.clone(), (ref_lp, pol_lp, want_h));
    }

    let offsets = f32s2(&meta["old_logp_offsets"]);
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let temperature = case["temperature"].as_f64().unwrap();
        let cfg = LossConfig {
            loss_type: loss_type(case["loss_type"].as_str().unwrap()),
            beta: case["beta"].as_f64().unwrap(),
            epsilon_low: case["epsilon_low"].as_f64().unwrap(),
            epsilon_high: case["epsilon_high"].as_f64().unwrap(),
            scale_rewards: ScaleRewards::Group,
            mask_truncated_completions: case["mask_truncated_completions"].as_bool().unwrap(),
            max_completion_length: case["max_completion_length"].as_u64().unwrap() as usize,
            temperature,
            importance_sampling_level: match case["importance_sampling_level"].as_str().unwrap() {
                "token" => ImportanceSamplingLevel::Token,
                "sequence" => ImportanceSamplingLevel::Sequence,
                other => panic!("{other}"),
            },
            top_entropy_quantile: case["top_entropy_quantile"].as_f64().unwrap(),
        };
        let key = format!("{temperature:?}");
        let (ref_lp, pol_lp, entropies) = &per_t[&key];
        let old: Vec<Vec<f32>> = pol_lp
            .iter()
            .zip(&offsets)
            .map(|(lp, off)| lp.iter().zip(off).map(|(a, b)| a + b).collect())
            .collect();
        let old = (case["num_iterations"].as_u64().unwrap() > 1).then_some(old.as_slice());
        let batch = StepBatch {
            seqs: seqs.clone(),
            advantages: &adv,
            truncated: &truncated,
        };
        let keep: Vec<bool> = truncated
            .iter()
            .map(|&t| !(cfg.mask_truncated_completions && t))
            .collect();
        let want_loss = case["loss"].as_f64().unwrap();
        let want_norm = case["grad_norm"].as_f64().unwrap();
        let case_mb = case["micro_batch"].as_u64().unwrap() as usize;
        // The case's split (TRL's per-device batch); where neither the loss nor the mask
        // depends on the split (grpo and dapo without the entropy mask), 2 and 4 too.
        let mut splits = vec![case_mb];
        if cfg.top_entropy_quantile == 1.0
            && matches!(cfg.loss_type, LossType::Grpo | LossType::Dapo)
        {
            splits.extend([2, 4]);
        }
        for mb in splits {
            let opts = logps::TrainOptions {
                entropy: true,
                ..Default::default()
            };
            let (grads, stats) =
                step::policy_gradients(&policy, &batch, &cfg, mb, old, Some(ref_lp), opts).unwrap();
            let norm = grads.norm().unwrap();
            let entropy = stats.entropy.unwrap();
            let want_entropy = if mb == case_mb {
                case["entropy"].as_f64().unwrap()
            } else {
                trl_entropy_metric(entropies, &keep, mb)
            };
            let (dl, dn, dh) = (
                (stats.loss - want_loss).abs(),
                ((norm - want_norm) / want_norm).abs(),
                (entropy - want_entropy).abs(),
            );
            println!(
                "{name} (micro-batch {mb}): loss {:.8} vs {want_loss:.8} (diff {dl:.1e}); grad \
                 norm {norm:.6} vs {want_norm:.6} (rel {dn:.1e}); entropy {entropy:.6} vs \
                 {want_entropy:.6} (diff {dh:.1e})",
                stats.loss
            );
            for (pname, want) in case["param_grad_norms"].as_object().unwrap() {
                let i = policy.params.iter().position(|p| &p.name == pname).unwrap();
                let gn = grads
                    .get(i)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt() as f64;
                let want = want.as_f64().unwrap();
                assert!(
                    ((gn - want) / want).abs() < 1e-3,
                    "{name}: {pname} grad norm {gn} vs {want}"
                );
            }
            assert!(dl <= 1e-5, "{name}: loss {} vs {want_loss}", stats.loss);
            assert!(dn <= 1e-4, "{name}: grad norm {norm} vs {want_norm}");
            assert!(dh <= 1e-5, "{name}: entropy {entropy} vs {want_entropy}");
            if mb == case_mb {
                let want_clip = case["clip_ratio"].as_f64().unwrap();
                assert!(
                    (stats.clip_ratio - want_clip).abs() < 1e-6,
                    "{name}: clip ratio {} vs {want_clip}",
                    stats.clip_ratio
                );
            }
        }
    }
    // A sequence-level ratio at one iteration is 1 with the token level's gradient.
    let by_name = |n: &str| {
        meta["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap()
            .clone()
    };
    let seq1 = by_name("sequence_grpo_beta0.04_iter1");
    let base = &fixture.meta["cases"][0];
    assert_eq!(base["name"], "grpo_beta0.04_iter1");
    assert!((seq1["loss"].as_f64().unwrap() - base["loss"].as_f64().unwrap()).abs() < 1e-6);
    let (a, b) = (
        seq1["grad_norm"].as_f64().unwrap(),
        base["grad_norm"].as_f64().unwrap(),
    );
    assert!(((a - b) / b).abs() < 1e-5, "{a} vs {b}");
}

/// Mixed precision: bf16 activations over f32 master weights (log-softmax and loss in
/// f32), the reference model in bf16. The step's errors against PyTorch's f32 reference are
/// bounded by PyTorch's own bf16 errors on the same fixture (`bf16_autocast` in the cases
/// JSON, `make_grpo_fixture.py --bf16-reference`), see [`bf16_step_check`].
#[test]
fn bf16_step_stays_close_to_the_f32_reference() {
    bf16_step_check("grpo", "tiny-a");
}

/// The same for Qwen3-VL (tiny-3a and its perturbed policy, `grpo3-cases.json`): DeepStack,
/// q/k norms and the LayerNorm vision tower in bf16.
#[test]
fn qwen3_bf16_step_stays_close_to_the_f32_reference() {
    bf16_step_check("grpo3", "tiny-3a");
}

/// Runs case 0 (`grpo_beta0.04_iter1`) with the policy in bf16 compute and the reference
/// model in bf16, and bounds each error by what PyTorch's own bf16 step gives on the same
/// fixture (`bf16_autocast`: the policy forward under `torch.autocast("cpu", bfloat16)` over
/// f32 weights, logits cast to f32 before the log-softmax as TRL does, the reference model
/// cast to bf16):
///
/// * reference log-probs, max |bf16 - f32| <= 2 x PyTorch's (PyTorch's reference is a plain
///   bf16 model; medvlm's, on the CPU, bf16 weights through the bf16 inference kernels, as
///   the trainer prepares it);
/// * |loss - f32 loss| and |grad norm - f32 grad norm| <= 2 x PyTorch's. This fixture's
///   policy is far from its reference (per-token KL ~4, exp(ref - logp) up to ~200), so a few
///   tokens' rounding dominates both: PyTorch's loss error is almost all its bf16 reference
///   log-probs' (0.8x / 1.0x of it remains with its f32 policy on Qwen2-VL / Qwen3-VL), a draw
///   of rounding noise that medvlm's bf16 reference draws differently (measured, medvlm over
///   PyTorch: loss 0.44x / 0.96x, grad norm 0.41x / 0.36x);
/// * 1 - cosine(bf16 gradient, f32 gradient) <= 3 x PyTorch's. This error comes from the
///   policy's own bf16 pass (with f32 reference log-probs it barely changes), where the
///   schemes differ: autocast lowers only linears/matmuls/convs and keeps the language
///   model's embeddings, residual stream and RMSNorm inputs in f32, while medvlm carries the
///   activations in bf16 between ops, like PyTorch's fully bf16 policy
///   (`bf16_autocast.bf16_model`, printed), whose 1 - cos is 3.8x autocast's on Qwen2-VL and
///   1.3x on Qwen3-VL. medvlm measured 2.0x and 0.9x while its norms, rotary embeddings,
///   SwiGLU and attention were composed bf16 ops (per-token policy log-prob RMS error 5.8e-2
///   vs autocast's 4.3e-2 and the bf16 model's 5.4e-2 on Qwen2-VL; 4.8e-2 vs 4.4e-2 and
///   5.1e-2 on Qwen3-VL), hence 3x here rather than 2x; since those run as fused f32 ops
///   over bf16 inputs (one rounding each, issue #29) it measures 0.89x and 0.92x.
///
/// Each PyTorch error is floored at bf16's resolution, so a lucky PyTorch draw cannot make a
/// bound stricter than bf16 can meet: 2^-8 (bf16's epsilon) relative for loss and grad norm,
/// 2^-8 x the largest |f32 reference log-prob| for the log-probs, 2^-16 for 1 - cos (a
/// vector with ~2^-8 relative error per element has 1 - cos ~ 2^-17).
fn bf16_step_check(prefix: &str, reference_model: &str) {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("{prefix}-cases.json"))).unwrap(),
    )
    .unwrap();
    let policy_dir = fixtures().join(format!("{prefix}-policy"));
    let dev = Device::Cpu;
    let mut policy = TrainableModel::load(&policy_dir, &dev).unwrap();
    let f32_policy = TrainableModel::load(&policy_dir, &dev).unwrap();
    policy.model.set_compute_dtype(DType::BF16);
    // The reference as the trainer builds it: on the CPU, prepared for the bf16 inference
    // kernels (issue #29), whose log-probs the first bound below holds to PyTorch's.
    let mut reference =
        Qwen2Vl::load(&fixtures().join(reference_model), DType::BF16, &dev).unwrap();
    let repacked = reference.prepare_for_scoring().unwrap();
    assert_eq!(repacked > 0, medvlm::kernels::cpu_kernels());
    let proc = Processor::from_dir(&policy_dir, &ProcessorOptions::default()).unwrap();
    let groups = meta["groups"].as_array().unwrap();
    let prompts: Vec<Prompt> = groups
        .iter()
        .map(|g| {
            proc.prepare(
                &[Message::user_with_images(1, g["text"].as_str().unwrap())],
                case_images(&proc, g),
                true,
            )
            .unwrap()
        })
        .collect();
    let mut completions = Vec::new();
    let mut rewards = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        for c in g["completions"].as_array().unwrap() {
            completions.push((gi, u32s(&c["ids"]), c["truncated"].as_bool().unwrap()));
        }
        rewards.extend(f32s(&g["rewards"]));
    }
    let seqs: Vec<SeqRef> = completions
        .iter()
        .map(|(gi, t, _)| SeqRef {
            prompt: &prompts[*gi],
            prompt_index: *gi,
            tokens: t,
        })
        .collect();
    let truncated: Vec<bool> = completions.iter().map(|c| c.2).collect();
    let cfg = LossConfig::default();
    let adv = grpo::advantages(&rewards, 3, cfg.scale_rewards).unwrap();
    let batch = StepBatch {
        seqs,
        advantages: &adv,
        truncated: &truncated,
    };
    let ref_lp = logps::logps(&reference, &batch.seqs, 9, 1.0).unwrap();
    let want_ref = f32s2(&meta["ref_logps"]);
    let mut d_ref = 0f32;
    for (a, b) in ref_lp.iter().zip(&want_ref) {
        for (x, y) in a.iter().zip(b) {
            d_ref = d_ref.max((x - y).abs());
        }
    }
    let (grads, stats) = step::policy_gradients(
        &policy,
        &batch,
        &cfg,
        3,
        None,
        Some(&ref_lp),
        Default::default(),
    )
    .unwrap();
    let want_ref_f32: Vec<Vec<f32>> = want_ref;
    let (f32_grads, _) = step::policy_gradients(
        &f32_policy,
        &batch,
        &cfg,
        3,
        None,
        Some(&want_ref_f32),
        Default::default(),
    )
    .unwrap();
    let case = &meta["cases"][0];
    let (want_loss, want_norm) = (
        case["loss"].as_f64().unwrap(),
        case["grad_norm"].as_f64().unwrap(),
    );
    let norm = grads.norm().unwrap();
    // Cosine between the bf16 and the f32 gradient, over all parameters.
    let (mut dot, mut n1, mut n2) = (0f64, 0f64, 0f64);
    for i in 0..policy.params.len() {
        let (a, b) = (grads.get(i).unwrap(), f32_grads.get(i).unwrap());
        dot += (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        n1 += a
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        n2 += b
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
    }
    let cosine = dot / (n1.sqrt() * n2.sqrt());
    // Our bf16 policy's own log-probs, for the printout.
    let pol_lp = logps::logps(&policy.model, &batch.seqs, 9, 1.0).unwrap();
    let mut d_pol = 0f32;
    for (a, b) in pol_lp.iter().zip(&f32s2(&meta["policy_logps"])) {
        for (x, y) in a.iter().zip(b) {
            d_pol = d_pol.max((x - y).abs());
        }
    }

    // PyTorch's own bf16 step on this fixture, and its errors.
    let torch = &meta["bf16_autocast"];
    assert_eq!(torch["case"], case["name"]);
    let tv = |k: &str| torch[k].as_f64().unwrap();
    let eps = 2f64.powi(-8);
    let max_ref = want_ref_f32
        .iter()
        .flatten()
        .fold(0f64, |m, &x| m.max(x.abs() as f64));
    let err_ref = d_ref as f64;
    let err_loss = (stats.loss - want_loss).abs();
    let err_norm = (norm - want_norm).abs();
    let err_cos = 1.0 - cosine;
    let t_ref = tv("ref_logps_max_diff");
    let t_loss = (tv("loss") - want_loss).abs();
    let t_norm = (tv("grad_norm") - want_norm).abs();
    let t_cos = 1.0 - tv("grad_cosine_vs_f32");
    let bound_ref = 2.0 * t_ref.max(eps * max_ref);
    let bound_loss = 2.0 * t_loss.max(eps * want_loss.abs());
    let bound_norm = 2.0 * t_norm.max(eps * want_norm);
    let bound_cos = 3.0 * t_cos.max(eps * eps);
    let bm = &torch["bf16_model"];
    println!(
        "{prefix} bf16 (medvlm | PyTorch autocast {} | bound):\n  \
         reference log-probs max diff {err_ref:.3} | {t_ref:.3} | {bound_ref:.3}\n  \
         loss {:.5} vs f32 {want_loss:.5}: |diff| {err_loss:.2e} | {t_loss:.2e} | {bound_loss:.2e}\n  \
         grad norm {norm:.4} vs f32 {want_norm:.4}: |diff| {err_norm:.2e} | {t_norm:.2e} | {bound_norm:.2e}\n  \
         1 - gradient cosine {err_cos:.3e} | {t_cos:.3e} | {bound_cos:.3e}\n  \
         policy log-probs max diff {d_pol:.3} | {:.3} (not bounded)\n  \
         PyTorch's fully bf16 policy: policy log-probs max diff {:.3}, |loss diff| {:.2e}, \
         |grad norm diff| {:.2e}, 1 - cos {:.3e}",
        torch["torch"].as_str().unwrap(),
        stats.loss,
        tv("policy_logps_max_diff"),
        bm["policy_logps_max_diff"].as_f64().unwrap(),
        (bm["loss"].as_f64().unwrap() - want_loss).abs(),
        (bm["grad_norm"].as_f64().unwrap() - want_norm).abs(),
        1.0 - bm["grad_cosine_vs_f32"].as_f64().unwrap(),
    );
    assert!(
        err_ref <= bound_ref,
        "bf16 reference log-probs off by {err_ref} (PyTorch's bf16: {t_ref})"
    );
    assert!(
        err_loss <= bound_loss,
        "bf16 loss off by {err_loss} (PyTorch's bf16: {t_loss})"
    );
    assert!(
        err_norm <= bound_norm,
        "bf16 gradient norm off by {err_norm} (PyTorch's bf16: {t_norm})"
    );
    assert!(
        err_cos <= bound_cos,
        "bf16 gradient direction: 1 - cosine {err_cos} (PyTorch's bf16: {t_cos})"
    );
}

/// A bf16 run's rollouts decode through the bf16 inference kernels (issue #29): the rollout
/// model of a bf16 policy scores a completion exactly as `--dtype bf16` inference loading
/// the same weights does (whose accuracy against transformers `model_parity.rs` checks),
/// for Qwen2-VL and Qwen3-VL; f32 runs decode with the policy itself.
#[test]
fn bf16_rollouts_decode_as_bf16_inference_does() {
    let dev = Device::Cpu;
    for name in ["tiny-a", "tiny-3a"] {
        let dir = fixtures().join(name);
        let mut policy = TrainableModel::load(&dir, &dev).unwrap();
        assert!(
            policy.rollout_model().unwrap().is_none(),
            "{name}: f32 decodes as it trains"
        );
        policy.model.set_compute_dtype(DType::BF16);
        let Some(fast) = policy.rollout_model().unwrap() else {
            assert!(!medvlm::kernels::cpu_kernels());
            return;
        };
        let mut inference = Qwen2Vl::load(&dir, DType::BF16, &dev).unwrap();
        inference.prepare_for_inference().unwrap();
        let proc = Processor::from_dir(&dir, &ProcessorOptions::default()).unwrap();
        let image = proc.load_image(&fixture_image("wide.png")).unwrap();
        let prompt = proc
            .prepare(
                &[Message::user_with_images(1, "Which organ?")],
                vec![image],
                true,
            )
            .unwrap();
        let completion = proc
            .tokenizer
            .encode("<think>The liver.</think><answer>A</answer>")
            .unwrap();
        let a = medvlm::generate::score(&fast, &prompt, &completion).unwrap();
        let b = medvlm::generate::score(&inference, &prompt, &completion).unwrap();
        assert_eq!(a, b, "{name}");
        // Not the policy's own f32 numbers: the copy really is bf16.
        let f32_policy = TrainableModel::load(&dir, &dev).unwrap();
        let c =
            medvlm::generate::score(&f32_policy.detached().unwrap(), &prompt, &completion).unwrap();
        assert_ne!(a, c, "{name}");
    }
}

/// `--freeze-vision` trains the language model and the merger only: after an update the
/// vision blocks and patch embedding are bit-identical, everything else moved.
#[test]
fn freeze_vision_leaves_the_vision_blocks_untouched() {
    use medvlm::train::{AdamW, AdamWConfig};
    let mut policy = TrainableModel::load(&fixtures().join("grpo-policy"), &Device::Cpu).unwrap();
    policy.freeze_vision();
    let frozen: Vec<&str> = policy
        .params
        .iter()
        .filter(|p| !p.trainable)
        .map(|p| p.name.as_str())
        .collect();
    assert!(frozen.contains(&"visual.patch_embed.proj.weight"));
    assert!(frozen
        .iter()
        .all(|n| n.starts_with("visual.") && !n.starts_with("visual.merger.")));
    assert!(frozen.iter().any(|n| n.starts_with("visual.blocks.")));
    let before: Vec<Tensor> = policy
        .params
        .iter()
        .map(|p| p.var.as_tensor().copy().unwrap())
        .collect();

    let proc = Processor::from_dir(
        &fixtures().join("grpo-policy"),
        &ProcessorOptions::default(),
    )
    .unwrap();
    let img = proc.load_image(&fixture_image("square.png")).unwrap();
    let prompt = proc
        .prepare(
            &[Message::user_with_images(1, "Which side?")],
            vec![img],
            true,
        )
        .unwrap();
    let toks = proc.tokenizer.encode("<answer>A</answer>").unwrap();
    let seqs = [SeqRef {
        prompt: &prompt,
        prompt_index: 0,
        tokens: &toks,
    }];
    let mut grads = GradAccumulator::new(policy.params.len());
    logps::backward(
        &policy,
        &seqs,
        1,
        1.0,
        Default::default(),
        &mut grads,
        |mb| Ok((mb.logp * mb.mask)?.sum_all()?.neg()?),
    )
    .unwrap();
    let mut opt = AdamW::new(AdamWConfig {
        lr: 1e-3,
        ..Default::default()
    });
    opt.update(&policy.params, &grads, 1e-3).unwrap();
    for (p, b) in policy.params.iter().zip(&before) {
        let (d, _) = max_abs_diff(p.var.as_tensor(), b);
        if p.trainable {
            assert!(d > 0.0, "{} did not move", p.name);
        } else {
            assert_eq!(d, 0.0, "frozen {} moved", p.name);
        }
    }
}
