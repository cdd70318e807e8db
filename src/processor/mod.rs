//! Everything between a user's files and the model's input tensors: images to pixel patches,
//! conversation to chat-templated text, text to token ids with one `<|image_pad|>` per merged
//! image patch.

pub mod chat_template;
pub mod image;
pub mod image_processor;
pub mod input;
pub mod resize;
pub mod tokenizer;

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

pub use chat_template::{ChatTemplate, Content, Message};
pub use image_processor::{ImageProcessor, ImageProcessorConfig, PixelPatches, Visual};
pub use tokenizer::{Limited, QwenTokenizer, SpecialTokens};

/// Longest prompt accepted, in tokens, whatever the checkpoint or the user says (and the limit
/// when neither says one): 2^20, eight times the longest context of the Qwen2-VL family
/// (128K). It bounds the work spent counting a prompt's tokens.
pub const MAX_PROMPT_TOKENS: usize = 1 << 20;

/// User-facing overrides of what the checkpoint's files say.
#[derive(Debug, Clone, Default)]
pub struct ProcessorOptions {
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
    /// Longest prompt accepted, in tokens (text plus image tokens); at most
    /// [`MAX_PROMPT_TOKENS`].
    pub max_prompt_tokens: Option<usize>,
    /// Slice and window for DICOM and NIfTI images (ignored for other images).
    pub medical: image::MedicalOptions,
}

/// A conversation turned into model input: ids with image placeholders expanded, and the
/// pixel patches of its images in order.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// The chat-templated text, before image-token expansion.
    pub text: String,
    pub input_ids: Vec<u32>,
    pub images: Vec<PixelPatches>,
}

impl Prompt {
    pub fn grids(&self) -> Vec<[usize; 3]> {
        self.images.iter().map(|p| p.grid_thw).collect()
    }

    /// All images' patches stacked, (total_patches, patch_dim), or `None` without images.
    pub fn pixel_values(&self, device: &Device) -> Result<Option<Tensor>> {
        pixel_tensor(&self.images, device)
    }
}

/// Stacks the patches of several images into one (total_patches, patch_dim) tensor.
pub fn pixel_tensor(images: &[PixelPatches], device: &Device) -> Result<Option<Tensor>> {
    let Some(first) = images.first() else {
        return Ok(None);
    };
    let dim = first.patch_dim;
    let mut data = Vec::with_capacity(images.iter().map(|p| p.data.len()).sum());
    let mut rows = 0;
    for p in images {
        if p.patch_dim != dim {
            bail!(
                "images have different patch sizes ({} vs {dim})",
                p.patch_dim
            );
        }
        data.extend_from_slice(&p.data);
        rows += p.num_patches;
    }
    Ok(Some(Tensor::from_vec(data, (rows, dim), device)?))
}

/// The files beside a checkpoint's weights that say how to talk to the model: tokenizer
/// (fast and slow forms), chat template, image processor and generation settings. Copied as
/// they are into every checkpoint medvlm writes (training, `merge`), so each one loads by
/// itself here and in transformers.
pub const SIDE_FILES: [&str; 11] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
];

/// Copies the [`SIDE_FILES`] that `from` has into `to`.
pub fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for f in SIDE_FILES {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f))
                .with_context(|| format!("{}: cannot copy", src.display()))?;
        }
    }
    Ok(())
}

/// Tokenizer, chat template and image processor of one checkpoint.
#[derive(Debug)]
pub struct Processor {
    pub tokenizer: QwenTokenizer,
    pub template: ChatTemplate,
    pub images: ImageProcessor,
    /// How the slices of a volume become one video: video_preprocessor_config.json, else
    /// the image settings with transformers' video pixel bounds.
    pub video: ImageProcessor,
    /// The prompt limit in tokens: `--max-prompt-tokens`, else tokenizer_config.json's
    /// `model_max_length`, capped at [`MAX_PROMPT_TOKENS`] (which applies when neither says
    /// one). `None` only for a processor built by hand; [`Self::prompt_limit`] then gives the
    /// cap.
    pub max_prompt_tokens: Option<usize>,
    /// How DICOM and NIfTI files become pictures (slice, window).
    pub medical: image::MedicalOptions,
}

impl Processor {
    /// Loads tokenizer.json, the chat template and preprocessor_config.json from `dir`, and
    /// checks the image settings against the prompt limit: a `min_pixels` that makes even a
    /// 1x1 image longer than the limit is refused here, not at the first image.
    pub fn from_dir(dir: &Path, opts: &ProcessorOptions) -> Result<Self> {
        if let Some(n) = opts.max_prompt_tokens {
            if !(1..=MAX_PROMPT_TOKENS).contains(&n) {
                bail!(
                    "--max-prompt-tokens {n}: must be between 1 and {MAX_PROMPT_TOKENS} (eight \
                     times the longest context of any Qwen2-VL model)"
                );
            }
        }
        let tokenizer = QwenTokenizer::from_dir(dir)?;
        let template = ChatTemplate::from_dir(dir)?;
        let pp = dir.join("preprocessor_config.json");
        let config = if input::is_regular_file(&pp, "image processor config")? {
            ImageProcessorConfig::from_file(&pp)?
        } else {
            bail!(
                "{}: preprocessor_config.json not found (it sets the image resolution the \
                 model was trained with)",
                pp.display()
            );
        };
        let vp = dir.join("video_preprocessor_config.json");
        let video = if input::is_regular_file(&vp, "video processor config")? {
            ImageProcessorConfig::video_from_file(&vp, &config)?
        } else {
            config.video_defaults()
        };
        let config = config.with_pixel_limits(opts.min_pixels, opts.max_pixels)?;
        // The user's pixel bounds hold for each frame of a video too; a bound the user
        // gives alone moves the video's other bound where they would cross.
        let (vmin, vmax) = (video.min_pixels, video.max_pixels);
        let video = video.with_pixel_limits(
            opts.min_pixels.or(opts.max_pixels.map(|max| vmin.min(max))),
            opts.max_pixels.or(opts.min_pixels.map(|min| vmax.max(min))),
        )?;
        let limit = opts
            .max_prompt_tokens
            .or(tokenizer.model_max_length)
            .unwrap_or(MAX_PROMPT_TOKENS)
            .min(MAX_PROMPT_TOKENS);
        let proc = Self {
            max_prompt_tokens: Some(limit),
            tokenizer,
            template,
            images: ImageProcessor { config },
            video: ImageProcessor { config: video },
            medical: opts.medical.clone(),
        };
        // The smallest image there is: resizing makes it min_pixels; without resizing the
        // smallest accepted is one merge window.
        let c = &proc.images.config;
        let smallest = if c.do_resize { 1 } else { c.factor() as u32 };
        if let Err(e) = proc.check_image_size(smallest, smallest) {
            let source = match opts.min_pixels {
                Some(_) => "--min-pixels".to_string(),
                None => format!("{}: min_pixels", pp.display()),
            };
            bail!(
                "{source} {} cannot be used with a prompt limit of {limit} tokens: {e:#}",
                proc.images.config.min_pixels
            );
        }
        Ok(proc)
    }

    /// A completion as everything that reads one sees it: the part of the reasoning block the
    /// chat template's generation prompt already wrote ([`ChatTemplate::reasoning_opening`]),
    /// then the generated text. For the Qwen2-VL and Qwen3-VL Instruct templates that is the
    /// generated text; under a Thinking template, which opens `<think>` for the model, the
    /// model writes `…</think><answer>B</answer>` and the format reward, the answer reader,
    /// `ask` and `serve` read `<think>\n…</think><answer>B</answer>`, the paper's shape.
    pub fn completion_text(&self, generated: &str) -> String {
        format!("{}{generated}", self.template.reasoning_opening())
    }

    /// [`Self::completion_text`] of generated token ids (special tokens left out).
    pub fn decode_completion(&self, ids: &[u32]) -> Result<String> {
        Ok(self.completion_text(&self.tokenizer.decode(ids, true)?))
    }

    /// What a target written in the paper's shape (`<think>r</think><answer>a</answer>`, or
    /// `<answer>a</answer>` without reasoning) leaves for the model to write after this
    /// template's generation prompt: under a template that opens the block, the reasoning
    /// (possibly empty) and `</think>`, then the answer; under one that writes an empty
    /// closed block, the answer alone (the block is already there).
    pub fn target_after_prompt(&self, reasoning: Option<&str>, answer_block: &str) -> String {
        use chat_template::{END_THINK, THINK};
        let t = &self.template;
        if t.opens_reasoning() {
            format!("{}{END_THINK}{answer_block}", reasoning.unwrap_or(""))
        } else if let (Some(r), "") = (reasoning, t.reasoning_opening()) {
            format!("{THINK}{r}{END_THINK}{answer_block}")
        } else {
            answer_block.to_string()
        }
    }

    /// The prompt limit in force (see [`Self::max_prompt_tokens`]).
    pub fn prompt_limit(&self) -> usize {
        self.max_prompt_tokens
            .unwrap_or(MAX_PROMPT_TOKENS)
            .min(MAX_PROMPT_TOKENS)
    }

    /// Refuses an image of `width` x `height` pixels that the image processor would refuse, or
    /// whose tokens alone exceed the prompt limit; cheap, so images are checked from their
    /// header before being decoded.
    pub fn check_image_size(&self, width: u32, height: u32) -> Result<()> {
        let (w, h) = self.images.config.output_size(width, height)?;
        let c = &self.images.config;
        let tokens = (w as usize / c.patch_size) * (h as usize / c.patch_size)
            / (c.merge_size * c.merge_size);
        let limit = self.prompt_limit();
        if tokens > limit {
            bail!(
                "the image would be {tokens} tokens after resizing to {w}x{h}, but the limit is \
                 {limit} tokens for the whole prompt; image tokens are never truncated, so lower \
                 --max-pixels"
            );
        }
        Ok(())
    }

    /// Preprocesses an image file (anything [`image::load_rgb`] reads; DICOM and NIfTI with
    /// this processor's slice and window). Raster images are refused from their header when
    /// [`Self::check_image_size`] refuses their size.
    pub fn load_image(&self, path: &Path) -> Result<PixelPatches> {
        let check = |w, h| self.check_image_size(w, h);
        let rgb = image::load_rgb_checked(
            path,
            &self.medical,
            self.images.config.backend.alpha(),
            &check,
        )?;
        self.images
            .preprocess(&rgb)
            .with_context(|| format!("{}: cannot preprocess image", path.display()))
    }

    /// Several slices of a volume (a NIfTI file, a multi-frame DICOM file, a DICOM series
    /// directory) preprocessed as separate images, each with its slice index, windowed as
    /// this processor's medical options say.
    pub fn load_slices(
        &self,
        path: &Path,
        spec: &image::medical::Slices,
    ) -> Result<Vec<(usize, PixelPatches)>> {
        image::medical::load_slices(path, &self.medical, spec)?
            .into_iter()
            .map(|(k, rgb)| {
                self.check_image_size(rgb.width(), rgb.height())?;
                let patches = self
                    .images
                    .preprocess(&rgb)
                    .with_context(|| format!("{}: cannot preprocess slice {k}", path.display()))?;
                Ok((k, patches))
            })
            .collect()
    }

    /// The slices of a volume (as [`Self::load_slices`] picks them) as the frames of one
    /// video, with their slice indices.
    pub fn load_video(
        &self,
        path: &Path,
        spec: &image::medical::Slices,
    ) -> Result<(Vec<usize>, PixelPatches)> {
        let slices = image::medical::load_slices(path, &self.medical, spec)?;
        let (indices, frames): (Vec<usize>, Vec<_>) = slices.into_iter().unzip();
        let patches = self.preprocess_video(&frames).with_context(|| {
            format!(
                "{}: cannot preprocess the slices as a video",
                path.display()
            )
        })?;
        Ok((indices, patches))
    }

    /// Frames as one video, refused when its tokens alone exceed the prompt limit.
    pub fn preprocess_video(&self, frames: &[::image::RgbImage]) -> Result<PixelPatches> {
        let patches = self.video.preprocess_video(frames)?;
        let limit = self.prompt_limit();
        if patches.num_tokens() > limit {
            bail!(
                "the video would be {} tokens ({} frames at {}x{} patches), but the limit is \
                 {limit} tokens for the whole prompt; use fewer slices or lower --max-pixels",
                patches.num_tokens(),
                frames.len(),
                patches.grid_thw[2],
                patches.grid_thw[1]
            );
        }
        Ok(patches)
    }

    /// [`Self::load_image`] for an image held in memory (a file's bytes, as the server gets
    /// them), with the slice and window `medical` for DICOM and NIfTI data.
    pub fn decode_image(
        &self,
        bytes: &[u8],
        medical: &image::MedicalOptions,
    ) -> Result<PixelPatches> {
        let check = |w, h| self.check_image_size(w, h);
        let rgb =
            image::decode_rgb_checked(bytes, medical, self.images.config.backend.alpha(), &check)?;
        self.images
            .preprocess(&rgb)
            .context("cannot preprocess the image")
    }

    /// Renders `messages` with the chat template, tokenizes, and expands each image
    /// placeholder to its image's token count. `images` are in the order the messages
    /// mention them.
    ///
    /// A prompt over the limit is refused with as little work as its length allows: before
    /// rendering when its texts alone are certainly too long, else after tokenizing about the
    /// limit's worth of it ([`QwenTokenizer::encode_limited`]).
    pub fn prepare(
        &self,
        messages: &[Message],
        images: Vec<PixelPatches>,
        add_generation_prompt: bool,
    ) -> Result<Prompt> {
        let mentioned: Vec<Visual> = messages.iter().flat_map(Message::visuals).collect();
        let given: Vec<Visual> = images.iter().map(|p| p.kind).collect();
        if mentioned.len() != given.len() {
            bail!(
                "the conversation refers to {} image(s) but {} were given",
                mentioned.len(),
                images.len()
            );
        }
        if mentioned != given {
            bail!(
                "the conversation's images and videos ({mentioned:?}) are not those given \
                 ({given:?})"
            );
        }
        let texts = || {
            messages
                .iter()
                .flat_map(|m| &m.content)
                .filter_map(|c| match c {
                    Content::Text { text } => Some(text.as_str()),
                    Content::Image | Content::Video => None,
                })
        };
        for text in texts() {
            self.check_user_text(text)?;
        }
        let limit = self.prompt_limit();
        let image_tokens: usize = images.iter().map(|p| p.num_tokens()).sum();
        // The rendered text holds the messages' texts, each token of which stands for a
        // bounded number of bytes, besides one placeholder per image.
        // One bound for all texts: a token may span two adjacent ones.
        let text_bytes: usize = texts().map(str::len).sum();
        let text_min = self
            .tokenizer
            .min_tokens(text_bytes, texts().all(str::is_ascii));
        if image_tokens + text_min > limit {
            return Err(self.too_long(image_tokens + text_min, false, &images));
        }
        let text = self.template.render(messages, add_generation_prompt)?;
        // Each placeholder is one id of the text, replaced by its image's tokens.
        let budget = (limit + images.len()).saturating_sub(image_tokens);
        let ids = match self.tokenizer.encode_limited(&text, budget)? {
            Limited::Ids(ids) => ids,
            Limited::Over { at_least, .. } => {
                let at_least = (at_least + image_tokens).saturating_sub(images.len());
                return Err(self.too_long(at_least, false, &images));
            }
        };
        let input_ids = self.expand_image_tokens(&ids, &images)?;
        if input_ids.len() > limit {
            return Err(self.too_long(input_ids.len(), true, &images));
        }
        Ok(Prompt {
            text,
            input_ids,
            images,
        })
    }

    /// The error for a prompt of `len` tokens (`exact`), or at least `len`, over the limit.
    fn too_long(&self, len: usize, exact: bool, images: &[PixelPatches]) -> anyhow::Error {
        let img: usize = images.iter().map(|p| p.num_tokens()).sum();
        anyhow::anyhow!(
            "the prompt is {}{len} tokens ({img} of them for {} image(s)) but the limit is \
             {}; image tokens are never truncated, so lower --max-pixels or shorten the text",
            if exact { "" } else { "at least " },
            images.len(),
            self.prompt_limit()
        )
    }

    /// Vision tokens typed into a prompt would pair with no image and break every forward
    /// pass after them, so they are refused.
    pub fn check_user_text(&self, text: &str) -> Result<()> {
        for id in self.tokenizer.special.vision_ids() {
            if let Some(tok) = self.tokenizer.id_to_token(id) {
                if text.contains(&tok) {
                    bail!("the prompt text contains {tok}, a token reserved for images");
                }
            }
        }
        Ok(())
    }

    /// Replaces each `<|image_pad|>` and `<|video_pad|>` of the rendered ids by as many
    /// copies as its image or video has tokens, in order.
    fn expand_image_tokens(&self, ids: &[u32], images: &[PixelPatches]) -> Result<Vec<u32>> {
        let special = &self.tokenizer.special;
        let pad_of = |kind: Visual| match kind {
            Visual::Image => special.image_pad,
            Visual::Video => special.video_pad,
        };
        let placeholders: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| i == special.image_pad || i == special.video_pad)
            .collect();
        let expected: Vec<u32> = images.iter().map(|p| pad_of(p.kind)).collect();
        if placeholders != expected {
            bail!(
                "the chat template produced {} image/video placeholder(s) for {} image(s) and \
                 video(s), or in another order",
                placeholders.len(),
                images.len()
            );
        }
        let extra: usize = images.iter().map(|p| p.num_tokens()).sum();
        let mut out = Vec::with_capacity(ids.len() + extra);
        let mut next = images.iter();
        for &id in ids {
            if id == special.image_pad || id == special.video_pad {
                let n = next.next().map(|p| p.num_tokens()).unwrap_or(0);
                out.extend(std::iter::repeat_n(id, n));
            } else {
                out.push(id);
            }
        }
        Ok(out)
    }
}
