//! Chat templates: the checkpoint's own Jinja template rendered with minijinja, configured
//! like transformers' sandbox (`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`,
//! Python string methods), so the default system turn and every special token come from the
//! template itself rather than from code here.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;
use serde_json::Value as Json;

use super::input::{is_regular_file, read_bounded_string, MAX_SIDE_FILE_BYTES};

/// The tags reasoning models write their reasoning between.
pub const THINK: &str = "<think>";
pub const END_THINK: &str = "</think>";

/// One piece of a message: text, or a placeholder for the next image or video.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Content {
    Image,
    Video,
    Text { text: String },
}

impl Content {
    pub fn text(s: impl Into<String>) -> Self {
        Content::Text { text: s.into() }
    }
}

/// A chat message in transformers' format (`content` a list of typed parts).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: Vec<Content>,
}

impl Message {
    pub fn system(text: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: vec![Content::text(text)],
        }
    }
    /// A user turn: the images first (as Qwen2-VL's examples and MedVLM-R1 do), then the text.
    pub fn user_with_images(num_images: usize, text: impl Into<String>) -> Self {
        let mut content = vec![Content::Image; num_images];
        content.push(Content::text(text));
        Self {
            role: "user".into(),
            content,
        }
    }
    pub fn assistant(text: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            content: vec![Content::text(text)],
        }
    }
    /// A user turn: the images and videos first, in the order of `kinds`, then the text.
    pub fn user_with_visuals(kinds: &[super::Visual], text: impl Into<String>) -> Self {
        let mut content: Vec<Content> = kinds
            .iter()
            .map(|k| match k {
                super::Visual::Image => Content::Image,
                super::Visual::Video => Content::Video,
            })
            .collect();
        content.push(Content::text(text));
        Self {
            role: "user".into(),
            content,
        }
    }
    pub fn num_images(&self) -> usize {
        self.visuals().count()
    }
    /// The images and videos the message refers to, in order.
    pub fn visuals(&self) -> impl Iterator<Item = super::Visual> + '_ {
        self.content.iter().filter_map(|c| match c {
            Content::Image => Some(super::Visual::Image),
            Content::Video => Some(super::Visual::Video),
            Content::Text { .. } => None,
        })
    }
}

/// A loaded chat template, ready to render.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    /// Where it came from, for error messages.
    origin: String,
    /// See [`Self::reasoning_opening`].
    opening: String,
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>, origin: impl Into<String>) -> Result<Self> {
        let mut t = Self {
            source: source.into(),
            origin: origin.into(),
            opening: String::new(),
        };
        // Compile once up front so a broken template is reported at load time.
        t.environment()?;
        t.opening = t.find_reasoning_opening();
        Ok(t)
    }

    /// What the template's generation prompt writes of the answer's reasoning block: `""` for
    /// most templates, `"<think>\n"` for one that opens the block for the model (Qwen3-VL
    /// Thinking, QwQ, Qwen3 Thinking-2507), `"<think>\n\n</think>\n\n"` for one that
    /// writes an empty block (Qwen3 with thinking switched off). The model then generates the
    /// rest, so whatever reads a completion (the format and accuracy rewards, evaluation,
    /// `ask`, `serve`'s reasoning split) reads this opening followed by the generated text:
    /// [`super::Processor::completion_text`].
    pub fn reasoning_opening(&self) -> &str {
        &self.opening
    }

    /// The generation prompt is what rendering with `add_generation_prompt` adds; its part
    /// from the first `<think>` on belongs to the completion. Found by rendering a one-turn
    /// conversation both ways, so it follows the template itself rather than a list of known
    /// templates. A template that cannot render that conversation opens nothing here (the
    /// real prompt reports its error).
    fn find_reasoning_opening(&self) -> String {
        let turn = [Message::user_with_images(0, "?")];
        let (Ok(with), Ok(without)) = (self.render(&turn, true), self.render(&turn, false)) else {
            return String::new();
        };
        with.strip_prefix(without.as_str())
            .and_then(|added| added.find(THINK).map(|i| added[i..].to_string()))
            .unwrap_or_default()
    }

    /// Whether [`Self::reasoning_opening`] leaves the reasoning block open (the model writes
    /// the reasoning and then `</think>`), rather than writing a closed, empty one.
    pub fn opens_reasoning(&self) -> bool {
        !self.opening.is_empty() && !self.opening.contains(END_THINK)
    }

    /// Finds the template of a checkpoint directory, in transformers' order of preference:
    /// `chat_template.jinja`, `chat_template.json`, then `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of named templates of which "default" is used).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let jinja = dir.join("chat_template.jinja");
        if is_regular_file(&jinja, "chat template")? {
            let s = read_bounded_string(&jinja, MAX_SIDE_FILE_BYTES, "chat template")?;
            return Self::new(s, jinja.display().to_string());
        }
        for name in ["chat_template.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if !is_regular_file(&path, "chat template")? {
                continue;
            }
            let text = read_bounded_string(&path, MAX_SIDE_FILE_BYTES, "chat template")?;
            let json: Json = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", path.display()))?;
            match json.get("chat_template") {
                None | Some(Json::Null) => continue,
                Some(Json::String(s)) => return Self::new(s.clone(), path.display().to_string()),
                Some(Json::Array(list)) => {
                    let found = list
                        .iter()
                        .find(|t| t.get("name") == Some(&"default".into()));
                    let tpl = found
                        .and_then(|t| t.get("template"))
                        .and_then(Json::as_str)
                        .with_context(|| {
                            format!(
                                "{}: chat_template is a list without a \"default\" template",
                                path.display()
                            )
                        })?;
                    return Self::new(tpl, path.display().to_string());
                }
                Some(other) => bail!(
                    "{}: chat_template must be a string, found {}",
                    path.display(),
                    other
                ),
            }
        }
        bail!(
            "{}: no chat template found (looked for chat_template.jinja, chat_template.json and \
             tokenizer_config.json's \"chat_template\")",
            dir.display()
        )
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    fn environment(&self) -> Result<Environment<'_>> {
        let mut env = Environment::new();
        // transformers renders with jinja2's trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Reproducible prompts matter more than the date: templates only use it for
            // "Today is ..." lines, which the Qwen2-VL template does not have.
            String::from("26 Jul 2024")
        });
        env.add_template("chat", &self.source)
            .map_err(|e| anyhow!("{}: invalid chat template: {e}", self.origin))?;
        Ok(env)
    }

    /// Renders `messages` as transformers' `apply_chat_template(tokenize=False)` would.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment()?;
        let tpl = env.get_template("chat")?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            add_vision_id => false,
        };
        tpl.render(ctx)
            .map_err(|e| anyhow!("{}: rendering the chat template failed: {e}", self.origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen/Qwen2-VL-2B-Instruct's template, verbatim.
    pub const QWEN2_VL: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn default_system_turn_comes_from_the_template() {
        let t = ChatTemplate::new(QWEN2_VL, "test").unwrap();
        let s = t
            .render(&[Message::user_with_images(1, "What is shown?")], true)
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn custom_system_and_two_images() {
        let t = ChatTemplate::new(QWEN2_VL, "test").unwrap();
        let s = t
            .render(
                &[
                    Message::system("Be brief."),
                    Message::user_with_images(2, "Compare."),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>\
             Compare.<|im_end|>\n"
        );
    }

    /// The opening is found from the rendered prompt, whatever the template's wording: the
    /// generation prompt's part from `<think>` on, open or closed; a `<think>` elsewhere (a
    /// system prompt that names the tags, as the paper's prompt does) is not one.
    #[test]
    fn reasoning_opening_is_what_the_generation_prompt_writes_of_the_think_block() {
        let with_prompt = |gen: &str| QWEN2_VL.replace("<|im_start|>assistant\n{% endif %}", gen);
        let cases = [
            (QWEN2_VL.to_string(), "", false),
            // Qwen3-VL Thinking / QwQ: the block is opened for the model.
            (
                with_prompt("<|im_start|>assistant\n<think>\n{% endif %}"),
                "<think>\n",
                true,
            ),
            // Written as a Jinja expression, without the newline.
            (
                with_prompt("{{ '<|im_start|>assistant\\n' + '<think>' }}{% endif %}"),
                "<think>",
                true,
            ),
            // Qwen3 with thinking switched off: an empty, closed block.
            (
                with_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"),
                "<think>\n\n</think>\n\n",
                false,
            ),
            // The tags named in the default system turn are not part of the generation prompt.
            (
                QWEN2_VL.replace(
                    "You are a helpful assistant.",
                    "Reason in <think>...</think>, answer in <answer>...</answer>.",
                ),
                "",
                false,
            ),
            // A template that cannot render a plain turn opens nothing.
            (
                "{{ raise_exception('system turn required') }}".to_string(),
                "",
                false,
            ),
        ];
        for (src, opening, open) in cases {
            let t = ChatTemplate::new(src.clone(), "test").unwrap();
            assert_eq!(t.reasoning_opening(), opening, "{src}");
            assert_eq!(t.opens_reasoning(), open, "{src}");
        }
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_reported() {
        let t = ChatTemplate::new("{{ raise_exception('no images allowed') }}", "x.jinja").unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(
            e.contains("no images allowed") && e.contains("x.jinja"),
            "{e}"
        );
        let e = ChatTemplate::new("{% for %}", "bad.jinja")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.jinja"), "{e}");
    }
}
