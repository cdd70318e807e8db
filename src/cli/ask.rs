//! `medvlm ask`: one multiple-choice question about one scan, reasoning and answer apart.

use super::*;

pub(super) fn run_ask(a: AskArgs) -> Result<()> {
    use crate::data::answer::{extract_answer, Extraction};
    use crate::data::{build_problem, PromptTemplate, LETTERS};
    let options: Vec<String> = a
        .options
        .as_deref()
        .map(|o| {
            o.split(';')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1 (an answer needs a token)");
    }
    super::eval::check_pixels(None, a.max_pixels)?;
    super::eval::check_new_tokens(&a.model, a.max_new_tokens)?;
    if options.len() > LETTERS.len() {
        bail!(
            "--options: at most {} options are supported, got {}",
            LETTERS.len(),
            options.len()
        );
    }
    let loaded = load(
        &a.model,
        &ProcessorOptions {
            max_pixels: a.max_pixels,
            medical: a.medical.options(),
            ..Default::default()
        },
    )?;
    let proc = &loaded.processor;
    let template = resolve_template(a.template.as_deref(), &a.model, PromptTemplate::Paper)?;
    let text = if options.is_empty() {
        a.question.clone()
    } else {
        template.render(&build_problem(&a.question, &options))
    };
    // What the model sees: the pictures after decoding (medical files: slices and window)
    // and after resizing.
    let ps = proc.images.config.patch_size;
    let images = match &a.slices {
        Some(spec) if a.slices_as == SlicesAs::Video => {
            let (indices, video) = proc.load_video(&a.image, spec)?;
            let list: Vec<String> = indices.iter().map(usize::to_string).collect();
            eprintln!(
                "image: {}: {} slices ({}) as the frames of one video ({} temporal patches)",
                a.image.display(),
                indices.len(),
                list.join(", "),
                video.grid_thw[0]
            );
            vec![video]
        }
        Some(spec) => {
            let slices = proc.load_slices(&a.image, spec)?;
            let indices: Vec<String> = slices.iter().map(|(k, _)| k.to_string()).collect();
            eprintln!(
                "image: {}: {} slices ({}) as {} images",
                a.image.display(),
                slices.len(),
                indices.join(", "),
                slices.len()
            );
            slices.into_iter().map(|(_, p)| p).collect()
        }
        None => {
            if !a.image.is_dir() {
                let opts = a.medical.options();
                if let Some(d) = crate::processor::image::medical::describe(&a.image, &opts)? {
                    eprintln!("image: {}: {d}", a.image.display());
                }
            }
            vec![proc.load_image(&a.image)?]
        }
    };
    let tokens: usize = images.iter().map(|i| i.num_tokens()).sum();
    eprintln!(
        "image: resized to {}x{} pixels, {tokens} image tokens in all",
        images[0].grid_thw[2] * ps,
        images[0].grid_thw[1] * ps,
    );
    let kinds: Vec<_> = images.iter().map(|p| p.kind).collect();
    let prompt = proc.prepare(&[Message::user_with_visuals(&kinds, text)], images, true)?;
    let engine = Engine::new(
        &loaded.model,
        proc.tokenizer.stop_tokens().to_vec(),
        proc.tokenizer.special.vision_ids().to_vec(),
    );
    let req = Request {
        prompt: &prompt,
        sampling: crate::generate::SamplingParams::default(),
        max_new_tokens: a.max_new_tokens,
        num_samples: 1,
    };
    let out = engine.generate(std::slice::from_ref(&req), |_, _, _| {})?;
    let c = &out[0][0];
    let raw = proc.decode_completion(c.content_tokens())?;
    let (reasoning, rest) = split_reasoning(&raw);
    let letter = if options.is_empty() {
        None
    } else {
        match extract_answer(&raw, Some(options.len())) {
            Extraction::Letter { letter, .. } => Some(letter),
            _ => None,
        }
    };
    let chosen = letter
        .and_then(|l| LETTERS.iter().position(|&x| x == l))
        .map(|i| options[i].clone());
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&json!({
                "reasoning": reasoning,
                "answer_letter": letter.map(|l| l.to_string()),
                "answer": chosen,
                "output": raw,
                "finish_reason": c.finish,
            }))?
        );
        return Ok(());
    }
    println!(
        "Reasoning:\n  {}\n",
        reasoning
            .as_deref()
            .unwrap_or("(the model gave no <think> block)")
            .replace('\n', "\n  ")
    );
    match (letter, chosen) {
        (Some(l), Some(o)) => println!("Answer: {l}) {o}"),
        _ if options.is_empty() => println!("Answer:\n  {rest}"),
        _ => println!("Answer: (no option letter could be read)\n  raw output: {raw}"),
    }
    Ok(())
}
