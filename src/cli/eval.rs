//! `medvlm eval`: the per-modality accuracy report of a checkpoint on a dataset.

use super::*;

/// The question template: `--template`, else the one the checkpoint (or its adapter) was
/// trained with, else `fallback`; says on stderr which and why.
pub(super) fn resolve_template(
    flag: Option<&str>,
    model: &ModelArgs,
    fallback: crate::data::PromptTemplate,
) -> Result<crate::data::PromptTemplate> {
    use crate::data::PromptTemplate;
    if let Some(t) = flag {
        return PromptTemplate::parse(t)
            .with_context(|| format!("--template {t}: expected \"paper\" or \"simple\""));
    }
    let mut dirs: Vec<&Path> = Vec::new();
    if let Some(a) = &model.adapter {
        dirs.push(a);
    }
    dirs.push(&model.model);
    Ok(match PromptTemplate::of_checkpoint(&dirs)? {
        Some((t, from)) => {
            eprintln!(
                "template: {} (the checkpoint was trained with it: {}; --template overrides)",
                t.name(),
                from.display()
            );
            t
        }
        None => fallback,
    })
}

/// The names `eval` writes in its output directory.
const EVAL_OUTPUT: crate::files::OutputSpec = crate::files::OutputSpec {
    command: "eval",
    flag: "--out",
    entries: &["report.md", "report.json", "items.jsonl"],
    legacy: None,
};

/// `--max-new-tokens` against the model's context (its config.json alone): refused now
/// rather than at the first item, after the model is loaded.
pub(super) fn check_new_tokens(model: &ModelArgs, n: usize) -> Result<()> {
    let config = Qwen2VlConfig::from_file(&model.model.join("config.json"))?;
    let context = config.text.max_position_embeddings;
    if n >= context {
        bail!(
            "--max-new-tokens {n} leaves no room for the prompt in {}'s context of {context} \
             tokens (max_position_embeddings)",
            model.model.display()
        );
    }
    Ok(())
}

/// `--min-pixels` / `--max-pixels`: at least 1, and the floor not above the ceiling.
pub(super) fn check_pixels(min: Option<usize>, max: Option<usize>) -> Result<()> {
    for (flag, v) in [("--min-pixels", min), ("--max-pixels", max)] {
        if v == Some(0) {
            bail!("{flag} must be at least 1 pixel, got 0 (leave it out for the model's own)");
        }
    }
    if let (Some(lo), Some(hi)) = (min, max) {
        if lo > hi {
            bail!("--min-pixels ({lo}) is larger than --max-pixels ({hi})");
        }
    }
    Ok(())
}

pub(super) fn run_eval(a: EvalArgs) -> Result<()> {
    use crate::data::{self, PromptTemplate};
    let model = a.model_args()?;
    let data_path = a
        .data
        .clone()
        .context("--data is required without --suite")?;
    let fallback = if a.likelihood {
        PromptTemplate::Simple
    } else {
        PromptTemplate::Paper
    };
    let template = resolve_template(a.template.as_deref(), &model, fallback)?;
    if let Some(f) = a.test_split {
        if !(0.0..=1.0).contains(&f) || f == 0.0 {
            bail!("--test-split must be in (0, 1], got {f}");
        }
    }
    if a.limit == Some(0) {
        bail!("--limit must be at least 1 (it caps the number of items evaluated)");
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1 (items decoded together)");
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1 (an answer needs a token)");
    }
    check_pixels(a.min_pixels, a.max_pixels)?;
    if !a.likelihood {
        check_new_tokens(&model, a.max_new_tokens)?;
    }
    let started = std::time::Instant::now();
    if a.open_protocol.is_empty() {
        bail!("--open-protocol needs at least one protocol");
    }
    let scoring = crate::eval::Scoring {
        closed: a.closed_protocol,
        open: a.open_protocol.clone(),
    };
    scoring.check()?;
    let (ds, format) = data::load_data(
        &data_path,
        &data::DataOptions {
            format: a.format,
            image_root: a.image_root.clone(),
            splits: a.splits.clone(),
            language: a.language,
        },
    )?;
    // Only the selected modalities count, skipped rows included.
    let wanted =
        |m: &str| a.modalities.is_empty() || a.modalities.iter().any(|k| k.eq_ignore_ascii_case(m));
    let skipped: Vec<data::Skipped> = ds
        .skipped
        .iter()
        .filter(|s| wanted(&s.modality))
        .cloned()
        .collect();
    for s in skipped.iter().take(5) {
        eprintln!("skipped {s}");
    }
    if skipped.len() > 5 {
        eprintln!(
            "skipped {} rows in all (see the report's skipped column)",
            skipped.len()
        );
    }
    let mut file_rows: std::collections::BTreeMap<String, usize> = Default::default();
    for m in ds
        .items
        .iter()
        .map(|it| it.modality.name().to_string())
        .chain(skipped.iter().map(|s| s.modality.clone()))
        .filter(|m| wanted(m))
    {
        *file_rows.entry(m).or_default() += 1;
    }
    let mut items = data::filter_modalities(ds.items, &a.modalities);
    if items.is_empty() {
        if skipped.is_empty() {
            bail!(
                "{}: no rows for modalities {:?}",
                data_path.display(),
                a.modalities
            );
        }
        let mut why: std::collections::BTreeMap<&str, usize> = Default::default();
        for s in &skipped {
            *why.entry(s.kind).or_default() += 1;
        }
        let why: Vec<String> = why.iter().map(|(k, v)| format!("{v} {k}")).collect();
        bail!(
            "{}: all {} rows{} were skipped ({}); check --image-root",
            data_path.display(),
            skipped.len(),
            if a.modalities.is_empty() {
                String::new()
            } else {
                format!(" of {}", a.modalities.join(", "))
            },
            why.join(", ")
        );
    }
    if let Some(f) = a.test_split {
        items = data::split(items, f, a.seed).1;
    }
    if let Some(n) = a.limit {
        items.truncate(n);
    }
    // Where the report goes is checked now, before the model is loaded, not after the
    // evaluation's hours.
    let out = a.out.clone().unwrap_or_else(|| {
        let name = model
            .model
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into());
        PathBuf::from(format!("eval-{name}"))
    });
    crate::files::check_output_dir(
        &out,
        &EVAL_OUTPUT,
        crate::files::Earlier::Replace { force: a.force },
    )?;
    let loaded = load(
        &model,
        &ProcessorOptions {
            min_pixels: a.min_pixels,
            max_pixels: a.max_pixels,
            max_prompt_tokens: None,
            medical: a.medical.options(),
        },
    )?;
    let pb = indicatif::ProgressBar::new(items.len() as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("eval [{bar:30}] {pos}/{len} items  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let progress = |done: usize, _total: usize| pb.set_position(done as u64);
    let (evaluated, mode) = if a.likelihood {
        (
            crate::eval::likelihood(&loaded.model, &loaded.processor, &items, template, progress)?,
            "likelihood",
        )
    } else {
        (
            crate::eval::greedy(
                &loaded.model,
                &loaded.processor,
                &items,
                template,
                &scoring,
                a.max_new_tokens,
                a.batch_size,
                progress,
            )?,
            "greedy",
        )
    };
    pb.finish_and_clear();
    let results = evaluated.results;
    // Rows whose image could not be read count as skipped, like rows whose image is missing.
    let mut skipped = skipped;
    for mut s in evaluated.skipped {
        s.file = data_path.display().to_string();
        eprintln!("skipped {s}");
        skipped.push(s);
    }
    // Results come in the items' order, less the skipped ones (rows of different files of a
    // benchmark can share a row number, so they are matched in order, not by number).
    let evaluated_items: Vec<&crate::data::VqaItem> = {
        let mut rest = items.iter();
        results
            .iter()
            .filter_map(|r| rest.find(|it| it.index == r.row && it.id == r.id))
            .collect()
    };
    let settings = json!({
        "model": model.model.display().to_string(),
        "adapter": model.adapter.as_ref().map(|p| p.display().to_string()),
        "data": data_path.display().to_string(),
        "format": match format {
            data::DataFormat::MedVlm => "medvlm",
            data::DataFormat::Bench(f) => f.name(),
        },
        "splits": a.splits,
        "language": a.language.map(|l| l.code()),
        "image_root": a.image_root.as_ref().map(|p| p.display().to_string()),
        "modalities": a.modalities,
        "template": template.name(),
        "dtype": a.dtype.map(|d| format!("{:?}", DType::from(d)).to_lowercase()),
        "quantize": loaded.model.quantization().map(|q| q.name()),
        "mode": mode,
        "max_new_tokens": (!a.likelihood).then_some(a.max_new_tokens),
        "min_pixels": loaded.processor.images.config.min_pixels,
        "max_pixels": loaded.processor.images.config.max_pixels,
        "test_split": a.test_split,
        "seed": a.seed,
        "limit": a.limit,
        "medvlm_version": env!("CARGO_PKG_VERSION"),
        "elapsed_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    let report = crate::eval::Report::new(
        &results,
        &model.model.display().to_string(),
        &data_path.display().to_string(),
        mode,
        template,
        &skipped,
        &file_rows,
        &scoring,
        settings,
    );
    std::fs::create_dir_all(&out).map_err(|e| crate::files::io_error(&out, "cannot create", e))?;
    crate::files::mark_output(&out, "eval")?;
    let md = report.markdown();
    let write = crate::files::write_atomic;
    write(&out.join("report.md"), md.as_bytes())?;
    write(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let mut lines = String::new();
    for (r, it) in results.iter().zip(&evaluated_items) {
        let mut v = serde_json::to_value(r)?;
        v["question"] = json!(it.question);
        v["options"] = json!(it.options());
        v["subset"] = json!(it.subset);
        lines.push_str(&serde_json::to_string(&v)?);
        lines.push('\n');
    }
    write(&out.join("items.jsonl"), lines.as_bytes())?;
    println!("{md}");
    println!(
        "written to {}/ (report.md, report.json, items.jsonl)",
        out.display()
    );
    Ok(())
}

/// The names `eval --suite` writes in its output directory (models' folders besides).
const SUITE_OUTPUT: crate::files::OutputSpec = crate::files::OutputSpec {
    command: "eval --suite",
    flag: "--out",
    entries: &crate::eval::suite::SUITE_FILES,
    legacy: None,
};

/// `medvlm eval --suite FILE`: every model of the file on every benchmark of it, resumed
/// where an earlier run into the same --out stopped.
pub(super) fn run_suite(a: EvalArgs) -> Result<()> {
    use crate::eval::suite;
    let file = a.suite.clone().context("--suite names the suite file")?;
    let s = suite::Suite::load(&file)?;
    let out = a.out.clone().unwrap_or_else(|| {
        let stem = file
            .file_stem()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "suite".into());
        PathBuf::from(format!("eval-{stem}"))
    });
    crate::files::check_output_dir(&out, &SUITE_OUTPUT, crate::files::Earlier::Reuse)?;
    std::fs::create_dir_all(&out).map_err(|e| crate::files::io_error(&out, "cannot create", e))?;
    crate::files::mark_output(&out, SUITE_OUTPUT.command)?;
    let text = std::fs::read(&file).map_err(|e| crate::files::io_error(&file, "cannot read", e))?;
    crate::files::write_atomic(&out.join("suite.toml"), &text)?;
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "eval --suite [{bar:30}] {pos}/{len} items  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let report = suite::run(
        &s,
        &suite::RunOptions {
            out: out.clone(),
            force: a.force,
            dtype: a.dtype.map(DType::from),
            device: a.device.clone(),
            medical: a.medical.options(),
            quantize: a.quantize.map(Into::into),
        },
        &pb,
    )?;
    pb.finish_and_clear();
    let write = crate::files::write_atomic;
    write(&out.join("report.md"), report.markdown().as_bytes())?;
    write(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    println!("{}", report.table_markdown());
    let (reused, scored): (usize, usize) = report
        .pairs
        .iter()
        .fold((0, 0), |(r, s), p| (r + p.reused, s + p.scored));
    println!(
        "{} models x {} benchmarks: {scored} items scored, {reused} reused from an earlier run",
        s.models.len(),
        s.benchmarks.len()
    );
    println!(
        "written to {}/ (report.md, report.json, <model>/<benchmark>/items.jsonl)",
        out.display()
    );
    Ok(())
}
