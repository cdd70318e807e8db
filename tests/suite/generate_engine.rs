//! The rollout engine: batched greedy decoding equals one-at-a-time decoding and
//! transformers; group sampling is reproducible, diverse, and its log-probabilities equal a
//! separate teacher-forced pass; stop tokens and length limits end sequences correctly.

use crate::common::*;
use candle_core::{DType, Device};
use medvlm::generate::{score, Engine, FinishReason, Request, SamplingParams};
use medvlm::model::Qwen2Vl;
use medvlm::processor::{Processor, ProcessorOptions, Prompt};

struct Fixture {
    model: Qwen2Vl,
    proc: Processor,
    cases: Cases,
    prompts: Vec<Prompt>,
}

fn fixture(name: &str) -> Fixture {
    fixture_in(name, DType::F32)
}

fn fixture_in(name: &str, dtype: DType) -> Fixture {
    let dir = fixtures().join(name);
    let model = Qwen2Vl::load(&dir, dtype, &Device::Cpu).unwrap();
    let proc = Processor::from_dir(&dir, &ProcessorOptions::default()).unwrap();
    let cases = load_cases(name);
    let prompts = cases.list().iter().map(|c| case_prompt(&proc, c)).collect();
    Fixture {
        model,
        proc,
        cases,
        prompts,
    }
}

fn stop(f: &Fixture) -> Vec<u32> {
    f.proc.tokenizer.stop_tokens().to_vec()
}

fn greedy(p: &Prompt, max_new_tokens: usize) -> Request<'_> {
    Request {
        prompt: p,
        sampling: SamplingParams::default(),
        max_new_tokens,
        num_samples: 1,
    }
}

#[test]
fn batched_greedy_equals_one_at_a_time_and_transformers() {
    for name in ["tiny-a", "tiny-b"] {
        let f = fixture(name);
        // Nothing banned, to compare with transformers, which does emit vision tokens here.
        let engine = Engine::new(&f.model, stop(&f), vec![]);
        let reqs: Vec<Request> = f.prompts.iter().map(|p| greedy(p, 24)).collect();
        let batched = engine.generate(&reqs, |_, _, _| {}).unwrap();
        for (i, p) in f.prompts.iter().enumerate() {
            let alone = engine.generate(&[greedy(p, 24)], |_, _, _| {}).unwrap();
            assert_eq!(batched[i][0].tokens, alone[0][0].tokens, "{name} case {i}");
            let want = u32s(&f.cases.list()[i]["greedy_new_tokens"]);
            assert_eq!(
                batched[i][0].tokens, want,
                "{name} case {i} vs transformers"
            );
        }
    }
}

fn sample_req(p: &Prompt, g: usize, seed: u64) -> Request<'_> {
    Request {
        prompt: p,
        sampling: SamplingParams::with_temperature(1.0, seed),
        max_new_tokens: 16,
        num_samples: g,
    }
}

#[test]
fn group_sampling_is_reproducible_and_diverse() {
    let f = fixture("tiny-a");
    let engine = Engine::new(
        &f.model,
        stop(&f),
        f.proc.tokenizer.special.vision_ids().to_vec(),
    );
    let p = &f.prompts[1];
    let a = engine
        .generate(&[sample_req(p, 4, 42)], |_, _, _| {})
        .unwrap();
    let b = engine
        .generate(&[sample_req(p, 4, 42)], |_, _, _| {})
        .unwrap();
    assert_eq!(a, b, "same seed, same samples");
    let distinct: std::collections::BTreeSet<&Vec<u32>> = a[0].iter().map(|c| &c.tokens).collect();
    assert_eq!(distinct.len(), 4, "the 4 samples of a group differ");
    for (i, c) in a[0].iter().enumerate() {
        assert_eq!((c.request, c.sample), (0, i));
    }
    let c = engine
        .generate(&[sample_req(p, 4, 43)], |_, _, _| {})
        .unwrap();
    assert_ne!(a, c, "another seed, other samples");
    // A request's samples do not depend on what else is in the batch.
    let mixed = engine
        .generate(
            &[sample_req(&f.prompts[0], 3, 7), sample_req(p, 4, 42)],
            |_, _, _| {},
        )
        .unwrap();
    for (m, c) in mixed[1].iter().zip(&a[0]) {
        assert_eq!((m.request, m.sample), (1, c.sample));
        assert_eq!(m.tokens, c.tokens);
        for (x, y) in m.logprobs.iter().zip(&c.logprobs) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}

/// Log-probabilities of `completion` from one full forward pass over prompt + completion,
/// with `banned` tokens masked out of each distribution the way the sampler masks them.
fn teacher_forced(m: &Qwen2Vl, p: &Prompt, completion: &[u32], banned: &[u32]) -> Vec<f32> {
    let mut ids = p.input_ids.clone();
    ids.extend_from_slice(completion);
    let pixels = p.pixel_values(&Device::Cpu).unwrap();
    let logits: Vec<Vec<f64>> = m
        .forward_logits(&ids, pixels.as_ref(), &p.grids())
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap();
    let n = p.input_ids.len();
    completion
        .iter()
        .enumerate()
        .map(|(i, &tok)| {
            let mut row = logits[n - 1 + i].clone();
            for &b in banned {
                row[b as usize] = f64::NEG_INFINITY;
            }
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
            (row[tok as usize] - lse) as f32
        })
        .collect()
}

/// The shared prefill + forked cache + batched decode must give each sample the same
/// log-probabilities as a full forward pass over that sample alone. In f64 the two paths
/// differ only by the sampler's f32 arithmetic; in f32 also by matmul summation order, which
/// these random models (logits up to ~11) amplify to a few 1e-6.
#[test]
fn shared_prefill_logprobs_equal_separate_teacher_forcing() {
    for (name, dtype) in [
        ("tiny-a", DType::F64),
        ("tiny-b", DType::F64),
        ("tiny-a", DType::F32),
    ] {
        let f = fixture_in(name, dtype);
        let banned = f.proc.tokenizer.special.vision_ids().to_vec();
        let engine = Engine::new(&f.model, stop(&f), banned.clone());
        let reqs = vec![
            sample_req(&f.prompts[1], 4, 1),
            sample_req(&f.prompts[2], 3, 2),
        ];
        let out = engine.generate(&reqs, |_, _, _| {}).unwrap();
        let mut worst = 0f32;
        for (r, group) in out.iter().enumerate() {
            for c in group {
                let separate = teacher_forced(&f.model, reqs[r].prompt, &c.tokens, &banned);
                for (a, b) in c.logprobs.iter().zip(&separate) {
                    worst = worst.max((a - b).abs());
                }
            }
        }
        println!("{name} {dtype:?}: max |rollout logprob - teacher-forced| = {worst:.2e}");
        assert!(worst <= 1e-5, "{name}: {worst}");
    }
    // With nothing masked, the rollout's log-probs are the model's: `score` agrees.
    let f = fixture("tiny-a");
    let engine = Engine::new(&f.model, stop(&f), vec![]);
    let out = engine
        .generate(&[sample_req(&f.prompts[0], 2, 9)], |_, _, _| {})
        .unwrap();
    for c in &out[0] {
        let s = score(&f.model, &f.prompts[0], &c.tokens).unwrap();
        for (a, b) in c.logprobs.iter().zip(&s) {
            assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
        }
    }
}

#[test]
fn stop_tokens_end_a_sequence_and_length_truncates() {
    let f = fixture("tiny-a");
    let want = u32s(&f.cases.list()[0]["greedy_new_tokens"]);
    // A stop token that greedy decoding reaches at step k and not before.
    let k = (3..want.len())
        .find(|&k| !want[..k].contains(&want[k]))
        .unwrap();
    let engine = Engine::new(&f.model, vec![want[k]], vec![]);
    let p = &f.prompts[0];
    let out = engine
        .generate(&[greedy(p, 24), greedy(p, 2)], |_, _, _| {})
        .unwrap();
    let c = &out[0][0];
    assert_eq!(c.finish, FinishReason::Stop);
    assert_eq!(
        c.tokens,
        want[..=k].to_vec(),
        "stops at the stop token, nothing after"
    );
    assert_eq!(c.content_tokens(), &want[..k]);
    let t = &out[1][0];
    assert_eq!(t.finish, FinishReason::Length);
    assert_eq!(t.tokens, want[..2].to_vec());
}

#[test]
fn vision_tokens_are_never_sampled() {
    let f = fixture("tiny-b");
    let vision = f.proc.tokenizer.special.vision_ids().to_vec();
    let engine = Engine::new(&f.model, vec![], vision.clone());
    let out = engine
        .generate(&[sample_req(&f.prompts[1], 8, 0)], |_, _, _| {})
        .unwrap();
    for c in &out[0] {
        assert!(
            c.tokens.iter().all(|t| !vision.contains(t)),
            "{:?}",
            c.tokens
        );
    }
}

/// Continuous batching: requests that join a running batch at different steps, with their
/// prompts prefilled in small chunks between decoding steps, still decode exactly
/// transformers' greedy tokens; a cancelled request leaves the others untouched; the raw
/// log-probabilities reported with each token are a proper distribution's.
#[test]
fn staggered_joins_chunked_prefill_and_cancel_keep_greedy_tokens() {
    use medvlm::generate::{Running, SeqOptions};
    for name in ["tiny-a", "tiny-b"] {
        let f = fixture(name);
        let engine = Engine::new(&f.model, stop(&f), vec![]);
        let mut run = Running::default();
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); f.prompts.len()];
        let mut done = vec![false; f.prompts.len()];
        // A request that is cancelled after a few steps, id 1000.
        engine
            .admit(
                &mut run,
                1000,
                &greedy(&f.prompts[0], 24),
                Default::default(),
            )
            .unwrap();
        let mut next = 0;
        let mut step = 0;
        loop {
            // One new request every third step, each prefilled 5 tokens per step.
            if step % 3 == 0 && next < f.prompts.len() {
                engine
                    .admit(
                        &mut run,
                        next,
                        &greedy(&f.prompts[next], 24),
                        SeqOptions {
                            top_logprobs: Some(3),
                            ignore_stop: false,
                        },
                    )
                    .unwrap();
                next += 1;
            }
            if step == 4 {
                assert!(
                    run.cancel(1000),
                    "{name}: the cancelled request was running"
                );
                assert!(!run.requests().contains(&1000));
            }
            engine.prefill_chunk(&mut run, 5).unwrap();
            for t in engine.sample(&mut run).unwrap() {
                if t.request == 1000 {
                    continue;
                }
                let raw = t.raw.as_ref().expect("top logprobs were asked for");
                assert_eq!(raw.top.len(), 3);
                assert!(raw.top.windows(2).all(|w| w[0].1 >= w[1].1));
                // Greedy picks the most likely token: it heads the top list.
                assert_eq!(raw.top[0].0, t.token);
                assert!((raw.top[0].1 - raw.logprob).abs() < 1e-6);
                assert!(raw.logprob <= 0.0);
                got[t.request].push(t.token);
                if let Some(c) = t.finished {
                    assert_eq!(c.tokens, got[t.request]);
                    done[t.request] = true;
                }
            }
            if run.is_empty() && next == f.prompts.len() {
                break;
            }
            engine.decode(&mut run).unwrap();
            step += 1;
            assert!(step < 1000, "{name}: the batch never drained");
        }
        assert!(done.iter().all(|&d| d));
        for (i, g) in got.iter().enumerate() {
            let want = u32s(&f.cases.list()[i]["greedy_new_tokens"]);
            assert_eq!(g, &want, "{name} case {i}");
        }
    }
}
