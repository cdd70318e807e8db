//! One training run's bookkeeping, shared by GRPO and SFT: the run directory and its
//! resolved config, resuming from the newest checkpoint, the optimizer step with clipping
//! and the learning-rate schedule, metrics and sample logs, the progress bar, checkpoints.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use super::checkpoint::{self, InputIdentity, TrainerState};
use super::metrics::{JsonlWriter, MetricsWriter, Record};
use super::optim::{linear_lr, AdamW, AdamWConfig, GradAccumulator};
use super::params::TrainableModel;

/// What a session is started with.
pub struct SessionSpec<'a> {
    /// "grpo" or "sft".
    pub kind: &'static str,
    pub dir: &'a Path,
    /// The resolved config, written to `dir/config.toml`.
    pub config_toml: String,
    /// Fingerprint of the settings that determine the trajectory.
    pub config_hash: String,
    /// The settings behind it (kept in checkpoints to name what changed on resume).
    pub settings: String,
    pub adam: AdamWConfig,
    pub max_grad_norm: f64,
    pub total_steps: u64,
    pub seed: u64,
    /// Continue from the newest checkpoint in `dir` instead of starting fresh.
    pub resume: bool,
    /// What the run started from, recorded in every checkpoint and checked on resume.
    pub inputs: InputIdentity,
    /// Keep only the newest this many checkpoints (0 = all).
    pub save_total_limit: u64,
}

/// The names a training run writes in its directory.
pub const RUN_ENTRIES: &[&str] = &[
    "config.toml",
    "metrics.jsonl",
    "completions.jsonl",
    "checkpoint-*",
    "final",
    "curves.png",
    "tensorboard",
];

/// The output-directory rules of a `kind` ("grpo", "sft") run in `output_dir`.
fn run_output(command: &str) -> crate::files::OutputSpec<'_> {
    crate::files::OutputSpec {
        command,
        flag: "--output-dir",
        entries: RUN_ENTRIES,
        legacy: Some(checkpoint::output_command),
    }
}

/// What the newest checkpoint of a run recorded, checked against the run about to resume.
pub struct ResumeCheck<'a> {
    pub kind: &'a str,
    pub config_hash: &'a str,
    pub settings: &'a str,
    pub inputs: &'a InputIdentity,
}

pub struct Session {
    pub kind: &'static str,
    pub dir: PathBuf,
    pub step: u64,
    pub total_steps: u64,
    pub seed: u64,
    optimizer: AdamW,
    max_grad_norm: f64,
    config_hash: String,
    settings: String,
    inputs: InputIdentity,
    save_total_limit: u64,
    metrics: MetricsWriter,
    samples: JsonlWriter,
    pb: ProgressBar,
}

impl Session {
    /// The checkpoint a session would resume from (checked before models are loaded). A
    /// fresh run's directory must be absent, empty, or an earlier `kind` run without
    /// checkpoints: anything else there would be overwritten.
    pub fn resume_point(dir: &Path, resume: bool, kind: &str) -> Result<Option<PathBuf>> {
        let command = format!("train {kind}");
        if resume {
            if let Some(other) = checkpoint::output_command(dir).filter(|c| *c != command) {
                bail!(
                    "{}: holds the output of `medvlm {other}`, not a {kind} run; resume it with \
                     `medvlm {other} --resume {}`",
                    dir.display(),
                    dir.display()
                );
            }
            let c = checkpoint::latest(dir)?
                .with_context(|| format!("{}: no checkpoint to resume from", dir.display()))?;
            if let Err(e) = checkpoint::verify(&c) {
                // Point at the newest checkpoint that is intact.
                let older = checkpoint::all(dir)?;
                let intact = older
                    .iter()
                    .rev()
                    .filter(|p| **p != c)
                    .find(|p| checkpoint::verify(p).is_ok());
                let advice = match intact {
                    Some(ok) => format!(
                        "the newest intact checkpoint is {}: move {} out of the run directory \
                         and run --resume again to continue from it",
                        ok.display(),
                        c.display()
                    ),
                    None => "no earlier checkpoint is intact; start the run again".into(),
                };
                bail!(
                    "{}: the newest checkpoint is damaged ({e:#}); {advice}",
                    c.display()
                );
            }
            return Ok(Some(c));
        }
        crate::files::check_output_dir(dir, &run_output(&command), crate::files::Earlier::Reuse)?;
        if dir.is_dir() {
            if let Some(c) = checkpoint::latest(dir)? {
                bail!(
                    "{}: the run directory already has checkpoints ({}); resume it with --resume \
                     {} or choose another output directory",
                    dir.display(),
                    c.display(),
                    dir.display()
                );
            }
        }
        Ok(None)
    }

    /// Refuses to resume from `ckpt` a run that is not the one it was written by: another
    /// method, other settings (only `max_steps` and `epochs` may change), or another base
    /// model or training data under the same paths. Reads only the trainer state.
    pub fn check_resume(ckpt: &Path, now: &ResumeCheck) -> Result<TrainerState> {
        let p = ckpt.join("trainer_state.json");
        let state: TrainerState = serde_json::from_str(
            &std::fs::read_to_string(&p)
                .with_context(|| format!("{}: cannot read", p.display()))?,
        )
        .with_context(|| format!("{}: not a trainer state", p.display()))?;
        if state.kind != now.kind {
            bail!(
                "{}: a {} checkpoint cannot resume a {} run; resume it with `medvlm train {} \
                 --resume`",
                ckpt.display(),
                state.kind,
                now.kind,
                state.kind
            );
        }
        if state.config_hash != now.config_hash {
            let changed = state
                .settings
                .as_deref()
                .map(|old| crate::train::config::changed_settings(old, now.settings))
                .unwrap_or_default();
            let what = if changed.is_empty() {
                "the run's settings changed since this checkpoint was written".to_string()
            } else {
                format!(
                    "settings changed since this checkpoint was written: {}",
                    changed.join(", ")
                )
            };
            bail!(
                "{}: {what}; resume with the run's own settings (only max_steps and epochs \
                 may change, to extend a run)",
                ckpt.display()
            );
        }
        // Checkpoints written before medvlm recorded its inputs are resumed unchecked (the
        // caller says so).
        if let Some(then) = &state.inputs {
            let changed = then.differences(now.inputs);
            if !changed.is_empty() {
                bail!(
                    "{}: the run's inputs changed since this checkpoint was written: {}; put \
                     back the model and data the run started from, or start a new run",
                    ckpt.display(),
                    changed.join("; ")
                );
            }
        }
        Ok(state)
    }

    /// Opens the run directory (restoring optimizer state and step when resuming).
    pub fn open(spec: SessionSpec, device: &Device) -> Result<Self> {
        let dir = spec.dir.to_path_buf();
        let resume_from = Self::resume_point(&dir, spec.resume, spec.kind)?;
        let mut optimizer = AdamW::new(spec.adam);
        let mut step = 0;
        if let Some(c) = &resume_from {
            let state = Self::check_resume(
                c,
                &ResumeCheck {
                    kind: spec.kind,
                    config_hash: &spec.config_hash,
                    settings: &spec.settings,
                    inputs: &spec.inputs,
                },
            )?;
            let (_, moments) = checkpoint::load_trainer_state(c)?;
            if state.total_steps != spec.total_steps {
                eprintln!(
                    "note: the run was planned for {} steps and now for {}: the learning-rate \
                     decay is re-planned over {} steps from step {}",
                    state.total_steps, spec.total_steps, spec.total_steps, state.step
                );
            }
            if state.step >= spec.total_steps {
                eprintln!(
                    "note: the run is already at step {} of {}; raise --max-steps to train further",
                    state.step, spec.total_steps
                );
            }
            let moments = moments
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_device(device)?)))
                .collect::<Result<_>>()?;
            optimizer.load_state(state.step, moments)?;
            step = state.step;
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create run directory", dir.display()))?;
        crate::files::mark_output(&dir, &format!("train {}", spec.kind))?;
        crate::files::write_atomic(&dir.join("config.toml"), spec.config_toml.as_bytes())?;
        let metrics = MetricsWriter::open(&dir, step)?;
        let samples = JsonlWriter::open(&dir.join("completions.jsonl"), Some(step))?;
        let pb = ProgressBar::new(spec.total_steps);
        pb.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_prefix(spec.kind);
        pb.set_position(step);
        Ok(Self {
            kind: spec.kind,
            dir,
            step,
            total_steps: spec.total_steps,
            seed: spec.seed,
            optimizer,
            max_grad_norm: spec.max_grad_norm,
            config_hash: spec.config_hash,
            settings: spec.settings,
            inputs: spec.inputs,
            save_total_limit: spec.save_total_limit,
            metrics,
            samples,
            pb,
        })
    }

    pub fn done(&self) -> bool {
        self.step >= self.total_steps
    }

    /// The learning rate of the next update.
    pub fn lr(&self) -> f64 {
        linear_lr(self.optimizer.config.lr, self.step, self.total_steps)
    }

    /// Clips the accumulated gradients, applies one AdamW update at the scheduled learning
    /// rate and advances the step. Returns (gradient norm before clipping, learning rate).
    pub fn apply(
        &mut self,
        model: &TrainableModel,
        grads: &mut GradAccumulator,
    ) -> Result<(f64, f64)> {
        let norm = grads.clip(self.max_grad_norm)?;
        let lr = self.lr();
        self.optimizer.update(&model.params, grads, lr)?;
        self.step += 1;
        Ok((norm, lr))
    }

    /// Records a step's metrics and shows `summary` on the progress bar (or as a line when
    /// there is no terminal to draw on).
    pub fn log(&mut self, rec: Record, summary: &str) -> Result<()> {
        if let Some(warning) = self.metrics.write(&rec.into_value())? {
            self.note(&warning);
        }
        self.pb.set_position(self.step);
        self.pb.set_message(summary.to_string());
        if self.pb.is_hidden() {
            eprintln!(
                "{} step {}/{}: {summary}",
                self.kind, self.step, self.total_steps
            );
        }
        Ok(())
    }

    /// A line above the progress bar.
    pub fn note(&self, msg: &str) {
        if self.pb.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.pb.println(msg);
        }
    }

    pub fn log_sample(&mut self, v: &Value) -> Result<()> {
        self.samples.write(v)
    }

    /// Writes `checkpoint-<step>` with the optimizer and trainer state (always f32, so a
    /// resumed run is exact), then deletes the oldest checkpoints beyond `save_total_limit`.
    pub fn checkpoint(&self, model: &TrainableModel, items_seen: u64) -> Result<PathBuf> {
        let state = TrainerState {
            kind: self.kind.into(),
            step: self.step,
            total_steps: self.total_steps,
            seed: self.seed,
            items_seen,
            config_hash: self.config_hash.clone(),
            settings: Some(self.settings.clone()),
            inputs: Some(self.inputs.clone()),
        };
        let saved = checkpoint::save(
            &self.dir,
            &checkpoint::checkpoint_name(self.step),
            model,
            DType::F32,
            Some((&self.optimizer, &state)),
        )?;
        for old in checkpoint::rotate(&self.dir, self.save_total_limit)? {
            self.note(&format!(
                "removed {} (save_total_limit = {})",
                old.display(),
                self.save_total_limit
            ));
        }
        Ok(saved)
    }

    /// Final checkpoint plus the exported model in `final/`; returns the latter.
    pub fn finish(
        &self,
        model: &TrainableModel,
        items_seen: u64,
        final_dtype: DType,
    ) -> Result<PathBuf> {
        self.pb.finish_with_message("done");
        self.checkpoint(model, items_seen)?;
        checkpoint::save(&self.dir, "final", model, final_dtype, None)
    }

    pub fn abandon(&self, msg: &str) {
        self.pb.abandon_with_message(msg.to_string());
    }
}

/// Parses "f32"/"bf16" for exports.
pub fn export_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => bail!("export dtype must be \"f32\" or \"bf16\", got {other:?}"),
    }
}
