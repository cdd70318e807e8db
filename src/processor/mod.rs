//! Everything between a user's files and the model's input tensors: images to pixel patches,
//! conversation to chat-templated text, text to token ids with one `<|image_pad|>` per merged
//! image patch.

pub mod chat_template;
pub mod image;
pub mod image_processor;
pub mod resize;
pub mod tokenizer;

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

pub use chat_template::{ChatTemplate, Content, Message};
pub use image_processor::{ImageProcessor, ImageProcessorConfig, PixelPatches};
pub use tokenizer::{QwenTokenizer, SpecialTokens};

/// User-facing overrides of what the checkpoint's files say.
#[derive(Debug, Clone, Default)]
pub struct ProcessorOptions {
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
    /// Longest prompt accepted, in tokens (text plus image tokens).
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
    pub max_prompt_tokens: Option<usize>,
    /// How DICOM and NIfTI files become pictures (slice, window).
    pub medical: image::MedicalOptions,
}

impl Processor {
    /// Loads tokenizer.json, the chat template and preprocessor_config.json from `dir`.
    pub fn from_dir(dir: &Path, opts: &ProcessorOptions) -> Result<Self> {
        let tokenizer = QwenTokenizer::from_dir(dir)?;
        let template = ChatTemplate::from_dir(dir)?;
        let pp = dir.join("preprocessor_config.json");
        let config = if pp.is_file() {
            ImageProcessorConfig::from_file(&pp)?
        } else {
            bail!(
                "{}: preprocessor_config.json not found (it sets the image resolution the \
                 model was trained with)",
                pp.display()
            );
        };
        let config = config.with_pixel_limits(opts.min_pixels, opts.max_pixels)?;
        Ok(Self {
            max_prompt_tokens: opts.max_prompt_tokens.or(tokenizer.model_max_length),
            tokenizer,
            template,
            images: ImageProcessor { config },
            medical: opts.medical.clone(),
        })
    }

    /// Preprocesses an image file (anything [`image::load_rgb`] reads; DICOM and NIfTI with
    /// this processor's slice and window).
    pub fn load_image(&self, path: &Path) -> Result<PixelPatches> {
        let rgb = image::load_rgb_with(path, &self.medical)?;
        self.images
            .preprocess(&rgb)
            .with_context(|| format!("{}: cannot preprocess image", path.display()))
    }

    /// Renders `messages` with the chat template, tokenizes, and expands each image
    /// placeholder to its image's token count. `images` are in the order the messages
    /// mention them.
    pub fn prepare(
        &self,
        messages: &[Message],
        images: Vec<PixelPatches>,
        add_generation_prompt: bool,
    ) -> Result<Prompt> {
        let mentioned: usize = messages.iter().map(Message::num_images).sum();
        if mentioned != images.len() {
            bail!(
                "the conversation refers to {mentioned} image(s) but {} were given",
                images.len()
            );
        }
        for m in messages {
            for c in &m.content {
                if let Content::Text { text } = c {
                    self.check_user_text(text)?;
                }
            }
        }
        let text = self.template.render(messages, add_generation_prompt)?;
        let ids = self.tokenizer.encode(&text)?;
        let input_ids = self.expand_image_tokens(&ids, &images)?;
        self.check_length(input_ids.len(), &images)?;
        Ok(Prompt {
            text,
            input_ids,
            images,
        })
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

    fn expand_image_tokens(&self, ids: &[u32], images: &[PixelPatches]) -> Result<Vec<u32>> {
        let pad = self.tokenizer.special.image_pad;
        let found = ids.iter().filter(|&&i| i == pad).count();
        if found != images.len() {
            bail!(
                "the chat template produced {found} image placeholder(s) for {} image(s)",
                images.len()
            );
        }
        let extra: usize = images.iter().map(|p| p.num_tokens()).sum();
        let mut out = Vec::with_capacity(ids.len() + extra);
        let mut next = images.iter();
        for &id in ids {
            if id == pad {
                let n = next.next().map(|p| p.num_tokens()).unwrap_or(0);
                out.extend(std::iter::repeat_n(pad, n));
            } else {
                out.push(id);
            }
        }
        Ok(out)
    }

    fn check_length(&self, len: usize, images: &[PixelPatches]) -> Result<()> {
        let Some(limit) = self.max_prompt_tokens else {
            return Ok(());
        };
        if len > limit {
            let img: usize = images.iter().map(|p| p.num_tokens()).sum();
            bail!(
                "the prompt is {len} tokens ({img} of them for {} image(s)) but the limit is \
                 {limit}; image tokens are never truncated, so lower --max-pixels or shorten \
                 the text",
                images.len()
            );
        }
        Ok(())
    }
}
