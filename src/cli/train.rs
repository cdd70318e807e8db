//! `medvlm train grpo | sft`: the run configuration from file, saved run and flags; the memory plan.

use super::*;

/// The config file (or a resumed run's saved config) with flags merged over it.
pub(super) fn resolve_config_text<
    K: config_flags::ConfigKind + Send + Sync + Clone + std::fmt::Debug + 'static,
>(
    a: &TrainArgs<K>,
) -> Result<(String, String, toml::Table)> {
    let mut over = a.keys.table.clone();
    let (text, file) = match (&a.resume, &a.config) {
        (Some(dir), config) => {
            let p = dir.join("config.toml");
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("{}: cannot read the run's config", p.display()))?;
            // A config file given with --resume counts like flags: what it sets is checked
            // against the run's settings (flags win over the file).
            if let Some(c) = config {
                let file_text = std::fs::read_to_string(c)
                    .with_context(|| format!("{}: cannot read config", c.display()))?;
                let table: toml::Table = file_text
                    .parse()
                    .with_context(|| format!("{}: not valid TOML", c.display()))?;
                merge_missing(&mut over, table);
            }
            over.insert(
                "output_dir".into(),
                toml::Value::String(dir.display().to_string()),
            );
            (text, p.display().to_string())
        }
        (None, Some(p)) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read config", p.display()))?,
            p.display().to_string(),
        ),
        (None, None) => (String::new(), "command line".to_string()),
    };
    Ok((text, file, over))
}

/// Adds to `into` what `from` sets and `into` does not (tables merged key by key).
pub(super) fn merge_missing(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_missing(a, b),
            (Some(_), _) => {}
            (None, v) => {
                into.insert(k, v);
            }
        }
    }
}

pub(super) fn run_train_grpo(a: TrainArgs<GrpoKeys>) -> Result<()> {
    if a.print_config {
        print!("{}", crate::rl::config::GrpoConfig::example());
        return Ok(());
    }
    let (text, file, over) = resolve_config_text(&a)?;
    let cfg = crate::rl::config::GrpoConfig::from_toml(&text, &file, Some(over))?;
    if a.plan {
        return print_plan(&cfg, a.resume.is_some(), a.plan_gpu_gib);
    }
    let out = crate::rl::trainer::train(cfg, a.resume.is_some(), a.stop_after)?;
    println!("{}", out.display());
    Ok(())
}

pub(super) fn run_train_sft(a: TrainArgs<SftKeys>) -> Result<()> {
    if a.print_config {
        print!("{}", crate::sft::SftConfig::example());
        return Ok(());
    }
    let (text, file, over) = resolve_config_text(&a)?;
    let cfg = crate::sft::SftConfig::from_toml(&text, &file, Some(over))?;
    if a.plan {
        return print_plan(&cfg, a.resume.is_some(), a.plan_gpu_gib);
    }
    let out = crate::sft::train(cfg, a.resume.is_some(), a.stop_after)?;
    println!("{}", out.display());
    Ok(())
}

/// `train … --plan`: the memory plan, computed without loading the model.
pub(super) fn print_plan<M: crate::train::config::Method>(
    cfg: &crate::train::config::TrainConfig<M>,
    resume: bool,
    gpu_gib: Option<f64>,
) -> Result<()> {
    let inputs = crate::train::run::RunInputs::prepare(cfg, resume)?;
    let (mut plan, mut input) = crate::train::run::memory_plan(cfg, &inputs)?;
    if let Some(g) = gpu_gib {
        if g.is_nan() || g <= 0.0 {
            bail!("--plan-gpu-gib must be positive, got {g}");
        }
        input.cpu = false;
        plan = crate::train::plan::estimate(
            &input,
            &format!("a GPU with {g} GiB free"),
            Some((g * (1u64 << 30) as f64) as u64),
        )?;
    }
    println!("{plan}");
    if !plan.fits() {
        let fixes = crate::train::plan::suggestions(&input, plan.available.unwrap_or(u64::MAX))?;
        println!("  does not fit; settings that would:");
        if fixes.is_empty() {
            println!("    none that medvlm knows: a device with more memory, or shorter prompts and completions");
        }
        for (flags, peak) in fixes {
            println!(
                "    {flags}  ({:.2} GiB)",
                peak as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}
