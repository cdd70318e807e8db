//! `medvlm generate` and `medvlm score`, and the prompt they build from the flags.

use super::*;

pub(super) fn processor_options(p: &PromptArgs) -> ProcessorOptions {
    p.limits.options(p.medical.options())
}

pub(super) fn build_messages(p: &PromptArgs) -> Vec<Message> {
    let mut msgs = Vec::new();
    if let Some(s) = &p.system {
        msgs.push(Message::system(s.clone()));
    }
    msgs.push(Message::user_with_images(p.images.len(), p.prompt.clone()));
    msgs
}

pub(super) fn prepare_prompt(proc: &Processor, p: &PromptArgs) -> Result<Prompt> {
    let images = p
        .images
        .iter()
        .map(|path| proc.load_image(path))
        .collect::<Result<Vec<_>>>()?;
    proc.prepare(&build_messages(p), images, true)
}

pub(super) fn run_generate(a: GenerateArgs) -> Result<()> {
    a.sampling.validate()?;
    super::eval::check_pixels(a.prompt.limits.min_pixels, a.prompt.limits.max_pixels)?;
    if a.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    if a.stream && a.num_samples > 1 {
        bail!("--stream prints one sequence; use it with --num-samples 1");
    }
    let gen_cfg = GenerationConfig::from_dir(&a.model.model)?;
    let settings = settings::resolve(&a.sampling.user(), &gen_cfg)?;
    let loaded = load(&a.model, &processor_options(&a.prompt))?;
    let proc = &loaded.processor;
    let prompt = prepare_prompt(proc, &a.prompt)?;
    eprintln!("sampling: {settings}");
    let engine = Engine::new(
        &loaded.model,
        proc.tokenizer.stop_tokens().to_vec(),
        proc.tokenizer.special.vision_ids().to_vec(),
    );
    let request = Request {
        prompt: &prompt,
        sampling: settings.params.clone(),
        max_new_tokens: settings.max_new_tokens,
        num_samples: a.num_samples,
    };
    let mut stream = TextStream::new(&proc.tokenizer);
    let mut stdout = std::io::stdout();
    let mut stream_err = None;
    let out = engine.generate(std::slice::from_ref(&request), |_, _, tok| {
        // A stop token ends the text without being part of it (`Completion::content_tokens`).
        let stop = proc.tokenizer.stop_tokens().contains(&tok);
        if a.stream && stream_err.is_none() && !stop {
            let r = stream.push(tok).and_then(|t| {
                if let Some(t) = t {
                    write!(stdout, "{t}")?;
                    stdout.flush()?;
                }
                Ok(())
            });
            stream_err = r.err();
        }
    })?;
    if let Some(e) = stream_err {
        return Err(e);
    }
    let completions = out.into_iter().next().unwrap_or_default();
    if a.stream {
        if let Some(t) = stream.finish()? {
            write!(stdout, "{t}")?;
        }
        writeln!(stdout)?;
        return Ok(());
    }
    if a.json {
        let samples: Vec<_> = completions
            .iter()
            .map(|c| {
                Ok(json!({
                    "completion_token_ids": c.tokens,
                    "text": proc.tokenizer.decode(c.content_tokens(), true)?,
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        let j = if samples.len() == 1 {
            let mut j = samples[0].clone();
            j["prompt_token_ids"] = json!(prompt.input_ids);
            j
        } else {
            json!({"prompt_token_ids": prompt.input_ids, "samples": samples})
        };
        println!("{}", serde_json::to_string(&j)?);
    } else {
        for (i, c) in completions.iter().enumerate() {
            let text = proc.tokenizer.decode(c.content_tokens(), true)?;
            if completions.len() > 1 {
                println!(
                    "--- sample {} ({} tokens, {:?})",
                    i + 1,
                    c.tokens.len(),
                    c.finish
                );
            }
            println!("{text}");
        }
    }
    Ok(())
}

pub(super) fn run_score(a: ScoreArgs) -> Result<()> {
    super::eval::check_pixels(a.prompt.limits.min_pixels, a.prompt.limits.max_pixels)?;
    let loaded = load(&a.model, &processor_options(&a.prompt))?;
    let proc = &loaded.processor;
    proc.check_user_text(&a.completion)?;
    let prompt = prepare_prompt(proc, &a.prompt)?;
    let completion = proc.tokenizer.encode(&a.completion)?;
    if let Some(limit) = proc.max_prompt_tokens {
        let total = prompt.input_ids.len() + completion.len();
        if total > limit {
            bail!("prompt plus completion is {total} tokens but the limit is {limit}");
        }
    }
    let lps = crate::generate::score(&loaded.model, &prompt, &completion)?;
    let sum: f64 = lps.iter().map(|&x| x as f64).sum();
    if a.json {
        let tokens: Vec<_> = completion
            .iter()
            .zip(&lps)
            .map(|(&id, &lp)| {
                json!({"id": id, "token": proc.tokenizer.decode(&[id], false).unwrap_or_default(), "logprob": lp})
            })
            .collect();
        let j = json!({
            "prompt_token_ids": prompt.input_ids,
            "completion_token_ids": completion,
            "tokens": tokens,
            "logprob_sum": sum,
        });
        println!("{}", serde_json::to_string(&j)?);
    } else {
        let mut out = std::io::stdout().lock();
        for (&id, &lp) in completion.iter().zip(&lps) {
            let tok = proc.tokenizer.decode(&[id], false).unwrap_or_default();
            writeln!(out, "{lp:>10.4}  {id:>7}  {tok:?}")?;
        }
        writeln!(out, "{sum:>10.4}  total over {} tokens", lps.len())?;
    }
    Ok(())
}
