//! Starting a training run, the same for GRPO and SFT: check the config, read the data,
//! load the policy (from the starting model, or the checkpoint being resumed), open the run
//! directory's session.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::Device;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::checkpoint::InputIdentity;
use super::config::{Method, RunConfig, SettingError, TrainConfig};
use super::optim::AdamWConfig;
use super::params::TrainableModel;
use super::session::{ResumeCheck, Session, SessionSpec};
use crate::data::{self, DataFormat, DataOptions, VqaItem};
use crate::processor::{Processor, ProcessorOptions};

/// The order items are visited in: a fresh seeded shuffle per epoch.
pub struct DataOrder {
    n: usize,
    seed: u64,
}

impl DataOrder {
    pub fn new(n: usize, seed: u64) -> Self {
        Self { n, seed }
    }
    /// The item index visited at global position `k` (k-th item drawn since the start).
    pub fn at(&self, k: u64) -> usize {
        let epoch = k / self.n as u64;
        let mut idx: Vec<usize> = (0..self.n).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(crate::seed::mix(
            self.seed, epoch,
        )));
        idx[(k % self.n as u64) as usize]
    }
}

/// What a run starts from, loaded and checked before any model is.
pub struct RunInputs {
    pub device: Device,
    /// The checkpoint being resumed, if any.
    pub resume_from: Option<PathBuf>,
    pub processor: Processor,
    /// The training rows (skipped rows reported, modalities filtered).
    pub train: Vec<VqaItem>,
}

impl RunInputs {
    /// Validates the whole config, then reads the tokenizer, processor and training data.
    pub fn prepare<M: Method>(config: &TrainConfig<M>, resume: bool) -> Result<Self> {
        config.validate()?;
        let run = &config.run;
        let device = crate::device::parse(run.device.as_deref())?;
        config.method.check_device(&device)?;
        let resume_from = Session::resume_point(&run.output_dir, resume, M::NAME)?;
        if let Some(c) = &resume_from {
            // Everything the checkpoint recorded is checked now, before any model is loaded.
            let inputs = InputIdentity::of(&run.model, &run.train_data)?;
            let state = Session::check_resume(
                c,
                &ResumeCheck {
                    kind: M::NAME,
                    config_hash: &config.fingerprint()?,
                    settings: &config.fingerprint_text()?,
                    inputs: &inputs,
                },
            )?;
            if state.inputs.is_none() {
                eprintln!(
                    "note: {} predates medvlm's record of the base model and data, so they \
                     cannot be checked against the ones the run started from",
                    c.display()
                );
            }
        }
        let processor = Processor::from_dir(&run.model, &processor_options(run))?;
        let ds = load_rows(run, &run.train_data, &run.split, "split")?;
        for s in ds.skipped.iter().take(5) {
            eprintln!("warning: skipped {s}");
        }
        if ds.skipped.len() > 5 {
            eprintln!("warning: {} rows skipped in all", ds.skipped.len());
        }
        let train = data::filter_modalities(ds.items, &run.modalities);
        if train.is_empty() {
            bail!(
                "{}: no usable training rows{}",
                run.train_data.display(),
                if run.modalities.is_empty() {
                    String::new()
                } else {
                    format!(" for modalities {:?}", run.modalities)
                }
            );
        }
        Ok(Self {
            device,
            resume_from,
            processor,
            train,
        })
    }
}

/// Reads the rows of `path` (train_data, or GRPO's eval_data) with the run's data settings
/// (`format`, `language`, `image_root`) and `splits` (the setting `split_key`). A setting that
/// does not apply to the data found is an error naming it.
pub fn load_rows(
    run: &RunConfig,
    path: &Path,
    splits: &[String],
    split_key: &str,
) -> Result<data::Dataset> {
    let format = match run.data_format()? {
        Some(f) => f,
        None => data::detect_format(path)?,
    };
    let language = run.data_language()?;
    let refuse = |key: &str, problem: String| -> Result<()> {
        Err(SettingError::new(key, &problem, &[]).into())
    };
    match format {
        DataFormat::MedVlm => {
            let what = format!(
                "applies to benchmarks; {} is MedVLM-R1 data",
                path.display()
            );
            if !splits.is_empty() {
                refuse(split_key, what.clone())?;
            }
            if language.is_some() {
                refuse("language", what)?;
            }
        }
        DataFormat::Bench(f) => {
            if run.image_root.is_some() {
                refuse(
                    "image_root",
                    format!(
                        "applies to MedVLM-R1 data; {} is {} data, whose images are found in \
                         its own folder",
                        path.display(),
                        f.name()
                    ),
                )?;
            }
        }
    }
    let (ds, _) = data::load_data(
        path,
        &DataOptions {
            format: Some(format),
            image_root: run.image_root.clone(),
            splits: splits.to_vec(),
            language,
        },
    )?;
    Ok(ds)
}

/// The longest prompt among (a sample of) the items, images included: (tokens, vision
/// patches). Prepared in full: the 16 items with the longest text (question and options, if
/// any) and the 16 with the most images (benchmark rows have none, one or several), the
/// longest text first among equals.
pub fn longest_prompt(
    processor: &Processor,
    items: &[VqaItem],
    template: crate::data::PromptTemplate,
) -> Result<(usize, usize)> {
    // A multiple-choice problem holds its options.
    let text = |it: &VqaItem| it.problem.len();
    let mut by_text: Vec<usize> = (0..items.len()).collect();
    by_text.sort_by_key(|&i| std::cmp::Reverse(text(&items[i])));
    let mut by_images = by_text.clone();
    // Stable: among rows with as many images, the longest text comes first.
    by_images.sort_by_key(|&i| std::cmp::Reverse(items[i].images.len()));
    let mut chosen: Vec<usize> = by_text.into_iter().take(16).collect();
    chosen.extend(by_images.into_iter().take(16));
    chosen.sort_unstable();
    chosen.dedup();
    let mut best = (1, 0);
    for i in chosen {
        let p = template.prompt(processor, &items[i])?;
        let patches: usize = p.images.iter().map(|i| i.num_patches).sum();
        if p.input_ids.len() > best.0 {
            best = (p.input_ids.len(), patches);
        }
    }
    Ok(best)
}

/// The memory plan of `config`'s run on `inputs`' device, data and model shape (only the
/// model's config.json is read).
pub fn memory_plan<M: Method>(
    config: &TrainConfig<M>,
    inputs: &RunInputs,
) -> Result<(super::plan::Plan, super::plan::PlanInput)> {
    let run = &config.run;
    let model_config = crate::model::Qwen2VlConfig::from_file(&run.model.join("config.json"))?;
    // Before any image is decoded: a huge min_pixels would upscale every image to it.
    check_model_limits(config, &model_config)?;
    let (prompt_tokens, image_patches) =
        longest_prompt(&inputs.processor, &inputs.train, run.template)?;
    let completion = config
        .method
        .completion_tokens(&inputs.processor, &inputs.train)?;
    check_context(config, &model_config, prompt_tokens, completion)?;
    let input = super::plan::input_for(
        run,
        model_config,
        config.method.objective(),
        prompt_tokens,
        image_patches,
        completion,
        &inputs.device,
    )?;
    let (device, available) = crate::device::available_memory(&inputs.device);
    Ok((super::plan::estimate(&input, &device, available)?, input))
}

/// Refuses a completion that does not fit the model's context after the longest prompt.
fn check_context<M: Method>(
    config: &TrainConfig<M>,
    model: &crate::model::Qwen2VlConfig,
    prompt_tokens: usize,
    completion: usize,
) -> Result<()> {
    let context = model.text.max_position_embeddings;
    if prompt_tokens.saturating_add(completion) <= context {
        return Ok(());
    }
    let whose = format!(
        "{}'s context of {context} tokens (max_position_embeddings)",
        config.run.model.display()
    );
    if M::NAME == "grpo" {
        return Err(SettingError::new(
            "max_completion_length",
            &format!(
                "({completion}) plus the longest prompt ({prompt_tokens} tokens, images \
                 included) exceeds {whose}; use at most {}",
                context.saturating_sub(prompt_tokens)
            ),
            &[],
        )
        .into());
    }
    bail!(
        "the longest prompt ({prompt_tokens} tokens, images included) plus the longest target \
         ({completion} tokens) exceeds {whose}; lower max_pixels or shorten the rows"
    )
}

/// Refuses, from the model's config.json alone, settings it cannot hold: an image floor
/// (`min_pixels`) that alone exceeds the context, a LoRA rank above the layers' width.
fn check_model_limits<M: Method>(
    config: &TrainConfig<M>,
    model: &crate::model::Qwen2VlConfig,
) -> Result<()> {
    let run = &config.run;
    let context = model.text.max_position_embeddings;
    // One image token covers a 28x28-pixel cell (14-pixel patches merged 2x2).
    if let Some(min) = run.min_pixels {
        let tokens = min / (28 * 28);
        if tokens >= context {
            return Err(SettingError::new(
                "min_pixels",
                &format!(
                    "({min}) makes every image at least {tokens} tokens but {}'s context is \
                     {context} tokens",
                    run.model.display()
                ),
                &[],
            )
            .into());
        }
    }
    let width = model.text.hidden_size;
    if run.lora.enabled() && run.lora.r > width {
        return Err(SettingError::new(
            "lora.r",
            &format!(
                "({}) exceeds the width of the layers it adapts ({width} in {}): a higher rank \
                 adds parameters and no capacity",
                run.lora.r,
                run.model.display()
            ),
            &[],
        )
        .into());
    }
    Ok(())
}

/// Prints the run's memory plan and, when it does not fit (and `memory_check` is on),
/// stops with the plan and the settings that would fit.
pub fn check_memory<M: Method>(config: &TrainConfig<M>, inputs: &RunInputs) -> Result<()> {
    let (plan, input) = memory_plan(config, inputs)?;
    eprintln!("{plan}");
    if plan.fits() || !config.run.memory_check {
        return Ok(());
    }
    let available = plan.available.unwrap_or(u64::MAX);
    let fixes = super::plan::suggestions(&input, available)?;
    let advice = if fixes.is_empty() {
        "no setting medvlm knows brings it under what is available; use a device with more \
         memory, or shorter prompts/completions"
            .to_string()
    } else {
        fixes
            .iter()
            .map(|(flags, peak)| format!("{flags} ({:.2} GiB)", *peak as f64 / (1u64 << 30) as f64))
            .collect::<Vec<_>>()
            .join("; ")
    };
    bail!(
        "the run needs about {:.2} GiB at its peak ({}) but {} has {:.2} GiB; settings that \
         would fit: {advice} (memory_check = false starts anyway)",
        plan.peak as f64 / (1u64 << 30) as f64,
        plan.peak_phase,
        plan.device,
        available as f64 / (1u64 << 30) as f64
    )
}

/// The image-size settings of a run.
pub fn processor_options(run: &RunConfig) -> ProcessorOptions {
    ProcessorOptions {
        min_pixels: run.min_pixels,
        max_pixels: run.max_pixels,
        ..Default::default()
    }
}

/// The policy to train: the checkpoint being resumed, else the starting model; with LoRA,
/// the starting model frozen with the resumed (or fresh) adapters.
pub fn load_policy(
    run: &RunConfig,
    resume_from: Option<&Path>,
    device: &Device,
) -> Result<TrainableModel> {
    let mut policy = if run.lora.enabled() {
        TrainableModel::load_lora(
            &run.model,
            &run.lora,
            run.compute_dtype()?,
            resume_from,
            run.seed,
            device,
        )?
    } else {
        let mut m = TrainableModel::load(resume_from.unwrap_or(&run.model), device)?;
        // f32 master weights; activations in the compute dtype.
        m.model.set_compute_dtype(run.compute_dtype()?);
        m
    };
    // Tokenizer and processor files always come from the starting checkpoint.
    policy.source_dir = run.model.clone();
    policy.template = Some(run.template);
    if run.freeze_vision {
        policy.freeze_vision();
    }
    Ok(policy)
}

/// Opens (or resumes) the run directory's session for `config`.
pub fn open_session<M: Method>(
    config: &TrainConfig<M>,
    total_steps: u64,
    resume: bool,
    device: &Device,
) -> Result<Session> {
    let run = &config.run;
    Session::open(
        SessionSpec {
            inputs: InputIdentity::of(&run.model, &run.train_data)?,
            save_total_limit: run.save_total_limit,
            kind: M::NAME,
            dir: &run.output_dir,
            config_toml: config.to_toml()?,
            config_hash: config.fingerprint()?,
            settings: config.fingerprint_text()?,
            adam: AdamWConfig {
                lr: run.learning_rate,
                beta1: run.adam_beta1,
                beta2: run.adam_beta2,
                eps: run.adam_epsilon,
                weight_decay: run.weight_decay,
            },
            max_grad_norm: run.max_grad_norm,
            total_steps,
            seed: run.seed,
            resume,
        },
        device,
    )
}
