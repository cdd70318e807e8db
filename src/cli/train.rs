//! `medvlm train grpo | sft`: the run configuration from file, saved run and flags; the memory plan.

use super::*;

/// The layers of a run's settings, later ones winning: a resumed run's saved config.toml,
/// the --config file, the flags (with --resume's directory as output_dir).
pub(super) fn config_layers<
    K: config_flags::ConfigKind + Send + Sync + Clone + std::fmt::Debug + 'static,
>(
    a: &TrainArgs<K>,
) -> Result<Vec<crate::train::config::Layer>> {
    use crate::train::config::Layer;
    let mut layers = Vec::new();
    let mut flags = a.keys.table.clone();
    if let Some(dir) = &a.resume {
        // Another method's run: say so, not "unknown key" for its first method setting.
        let command = format!("train {}", K::NAME);
        if let Some(other) = crate::train::checkpoint::output_command(dir).filter(|c| *c != command)
        {
            bail!(
                "--resume {}: holds the output of `medvlm {other}`, not a {} run; resume it with \
                 `medvlm {other} --resume {}`",
                dir.display(),
                K::NAME,
                dir.display()
            );
        }
        let p = dir.join("config.toml");
        let text = std::fs::read_to_string(&p).map_err(|e| {
            if dir.is_dir() {
                crate::files::io_error(&p, "cannot read", e)
            } else {
                anyhow::anyhow!("--resume {}: no such run directory", dir.display())
            }
        })?;
        layers.push(Layer::file(&p.display().to_string(), &text)?);
        flags.insert(
            "output_dir".into(),
            toml::Value::String(dir.display().to_string()),
        );
    }
    // A config file given with --resume counts like flags: what it sets is checked against
    // the run's settings (flags win over the file).
    if let Some(c) = &a.config {
        let text = std::fs::read_to_string(c).map_err(|e| {
            anyhow::anyhow!("--config {}", crate::files::io_error(c, "cannot read", e))
        })?;
        layers.push(Layer::file(&c.display().to_string(), &text)?);
    }
    layers.push(Layer::flags(flags));
    Ok(layers)
}

/// A new run writes its resolved config to OUTPUT_DIR/config.toml: refuse when that is the
/// --config file itself (the user's commented file would become the resolved one).
fn refuse_config_overwrite<
    K: config_flags::ConfigKind + Send + Sync + Clone + std::fmt::Debug + 'static,
>(
    a: &TrainArgs<K>,
    output_dir: &Path,
) -> Result<()> {
    let (Some(c), None) = (&a.config, &a.resume) else {
        return Ok(());
    };
    let written = output_dir.join("config.toml");
    let same = match (c.canonicalize(), written.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if same {
        bail!(
            "--config {}: is the config.toml a run in {} writes its resolved settings to; copy \
             it elsewhere and pass the copy, or choose another --output-dir",
            c.display(),
            output_dir.display()
        );
    }
    Ok(())
}

pub(super) fn run_train_grpo(a: TrainArgs<GrpoKeys>) -> Result<()> {
    if a.print_config {
        print!("{}", crate::rl::config::GrpoConfig::example());
        return Ok(());
    }
    let (cfg, origins) = crate::rl::config::GrpoConfig::from_layers(config_layers(&a)?)?;
    refuse_config_overwrite(&a, &cfg.run.output_dir)?;
    if a.plan {
        return print_plan(&cfg, a.resume.is_some(), a.plan_gpu_gib)
            .map_err(|e| origins.name_settings(e));
    }
    let out = crate::rl::trainer::train(cfg, a.resume.is_some(), a.stop_after)
        .map_err(|e| origins.name_settings(e))?;
    println!("{}", out.display());
    Ok(())
}

pub(super) fn run_train_sft(a: TrainArgs<SftKeys>) -> Result<()> {
    if a.print_config {
        print!("{}", crate::sft::SftConfig::example());
        return Ok(());
    }
    let (cfg, origins) = crate::sft::SftConfig::from_layers(config_layers(&a)?)?;
    refuse_config_overwrite(&a, &cfg.run.output_dir)?;
    if a.plan {
        return print_plan(&cfg, a.resume.is_some(), a.plan_gpu_gib)
            .map_err(|e| origins.name_settings(e));
    }
    let out = crate::sft::train(cfg, a.resume.is_some(), a.stop_after)
        .map_err(|e| origins.name_settings(e))?;
    println!("{}", out.display());
    Ok(())
}

/// `train … --plan`: the memory plan, computed without loading the model.
pub(super) fn print_plan<M: crate::train::config::Method>(
    cfg: &crate::train::config::TrainConfig<M>,
    resume: bool,
    gpu_gib: Option<f64>,
) -> Result<()> {
    if let Some(g) = gpu_gib {
        if !(g.is_finite() && g > 0.0) {
            bail!("--plan-gpu-gib must be a finite number of GiB above 0, got {g}");
        }
    }
    let inputs = crate::train::run::RunInputs::prepare(cfg, resume)?;
    let (mut plan, mut input) = crate::train::run::memory_plan(cfg, &inputs)?;
    if let Some(g) = gpu_gib {
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
