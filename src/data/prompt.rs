//! The question templates of MedVLM-R1: one builder feeds training, evaluation and `ask`.

use serde::{Deserialize, Serialize};

use super::{Answer, ImageRef, VqaItem};
use crate::processor::{Content, Message};

/// The file medvlm writes into every checkpoint it trains: how it was trained (the prompt
/// template), so `ask` and `eval` put questions the same way.
pub const RUN_INFO_FILE: &str = "medvlm.json";

/// How a question is put to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PromptTemplate {
    /// The paper's reasoning prompt: think in `<think>`, answer one letter in `<answer>`.
    #[default]
    Paper,
    /// The paper's "simple" evaluation prompt: just the letter, no reasoning tags.
    Simple,
}

impl PromptTemplate {
    /// The user text for a problem (question plus `A) option` lines). The whitespace is the
    /// paper's own (its templates are indented Python triple-quoted strings), so prompts are
    /// token-for-token those the released checkpoints were trained and evaluated with.
    pub fn render(self, problem: &str) -> String {
        match self {
            PromptTemplate::Paper => format!(
                "\n        {problem} \n        Your task: \n        1. Think through the question \
                 step by step, enclose your reasoning process in <think>...</think> tags. \n        \
                 2. Then provide the correct single-letter choice (A, B, C, D,...) inside \
                 <answer>...</answer> tags.\n        3. No extra information or text outside of \
                 these tags.\n        "
            ),
            PromptTemplate::Simple => format!(
                "\n    {problem} \n    Your task: provide the correct single-letter choice (A, B, \
                 C, D,...).\n    "
            ),
        }
    }

    /// The user text for a closed or open question: as [`Self::render`], asking for a word or
    /// short phrase instead of a letter (the answer still inside `<answer>` tags for the
    /// paper's template, so that the scoring reads the same block the reward does).
    pub fn render_open(self, question: &str) -> String {
        match self {
            PromptTemplate::Paper => format!(
                "\n        {question} \n        Your task: \n        1. Think through the question \
                 step by step, enclose your reasoning process in <think>...</think> tags. \n        \
                 2. Then provide the answer, a single word or a short phrase, inside \
                 <answer>...</answer> tags.\n        3. No extra information or text outside of \
                 these tags.\n        "
            ),
            PromptTemplate::Simple => format!(
                "\n    {question} \n    Your task: answer with a single word or a short phrase.\n    "
            ),
        }
    }

    /// The user text for an item: [`Self::render`] of its problem for multiple choice,
    /// [`Self::render_open`] of its question otherwise.
    pub fn text(self, item: &VqaItem) -> String {
        match item.answer {
            Answer::Choice { .. } => self.render(&item.problem),
            Answer::Closed { .. } | Answer::Open { .. } => self.render_open(&item.problem),
        }
    }

    /// The conversation for an item: its images, then the templated problem. A question
    /// that places its images itself (MMMU's `<image 1>` ... `<image N>`, each once and in
    /// order) gets each image where its placeholder is.
    pub fn messages(self, item: &VqaItem) -> Vec<Message> {
        let text = self.text(item);
        let n = item.images.len();
        let marks: Vec<String> = (1..=n).map(|k| format!("<image {k}>")).collect();
        let positions: Vec<Option<usize>> = marks.iter().map(|m| text.find(m.as_str())).collect();
        let in_order = n > 0
            && positions.iter().all(Option::is_some)
            && positions.windows(2).all(|w| w[0] < w[1])
            && marks.iter().all(|m| text.matches(m.as_str()).count() == 1);
        if !in_order {
            return vec![Message::user_with_images(n, text)];
        }
        let mut content = Vec::with_capacity(2 * n + 1);
        let mut rest = text.as_str();
        for m in &marks {
            let at = rest.find(m.as_str()).unwrap_or(0);
            if at > 0 {
                content.push(Content::text(&rest[..at]));
            }
            content.push(Content::Image);
            rest = &rest[at + m.len()..];
        }
        if !rest.is_empty() {
            content.push(Content::text(rest));
        }
        vec![Message {
            role: "user".into(),
            content,
        }]
    }

    /// The images of an item, read and preprocessed in order: files, or bytes embedded in
    /// the data (parquet benchmarks).
    pub fn images(
        processor: &crate::processor::Processor,
        item: &VqaItem,
    ) -> anyhow::Result<Vec<crate::processor::PixelPatches>> {
        use anyhow::Context;
        item.images
            .iter()
            .map(|r| match r {
                ImageRef::Path(p) => processor.load_image(p),
                ImageRef::Bytes { bytes, .. } => processor
                    .decode_image(bytes, &processor.medical)
                    .with_context(|| r.label()),
            })
            .collect()
    }

    /// The model's input for an item: its images read and preprocessed, the conversation
    /// rendered with the chat template (generation prompt added) and tokenized. Training,
    /// evaluation and the memory plan all build prompts here.
    pub fn prompt(
        self,
        processor: &crate::processor::Processor,
        item: &VqaItem,
    ) -> anyhow::Result<crate::processor::Prompt> {
        let images = Self::images(processor, item)?;
        processor.prepare(&self.messages(item), images, true)
    }

    /// The template a checkpoint was trained with, from the `medvlm.json` medvlm writes
    /// into it (checked in `dirs` in order: an adapter before its base model).
    pub fn of_checkpoint(
        dirs: &[&std::path::Path],
    ) -> anyhow::Result<Option<(Self, std::path::PathBuf)>> {
        use crate::processor::input::{is_regular_file, read_bounded_string, MAX_SIDE_FILE_BYTES};
        use anyhow::Context;
        for d in dirs {
            let p = d.join(RUN_INFO_FILE);
            if !is_regular_file(&p, "run info")? {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(&read_bounded_string(&p, MAX_SIDE_FILE_BYTES, "run info")?)
                    .with_context(|| format!("{}: not valid JSON", p.display()))?;
            if let Some(t) = v.get("template").and_then(|t| t.as_str()) {
                let t = Self::parse(t).with_context(|| {
                    format!(
                        "{}: template {t:?} is not \"paper\" or \"simple\"",
                        p.display()
                    )
                })?;
                return Ok(Some((t, p)));
            }
        }
        Ok(None)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Paper => "paper",
            Self::Simple => "simple",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "paper" | "complex" | "reasoning" => Some(Self::Paper),
            "simple" => Some(Self::Simple),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MedVLM-R1's training template (grpo.py), verbatim.
    const PAPER: &str = "\n        {Question} \n        Your task: \n        1. Think through the question step by step, enclose your reasoning process in <think>...</think> tags. \n        2. Then provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags.\n        3. No extra information or text outside of these tags.\n        ";

    #[test]
    fn paper_template_is_verbatim() {
        assert_eq!(
            PromptTemplate::Paper.render("Q?\nA) x"),
            PAPER.replace("{Question}", "Q?\nA) x")
        );
    }
}
