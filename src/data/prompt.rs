//! The question templates of MedVLM-R1: one builder feeds training, evaluation and `ask`.

use serde::{Deserialize, Serialize};

use super::VqaItem;
use crate::processor::Message;

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

    /// The conversation for an item: its images, then the templated problem.
    pub fn messages(self, item: &VqaItem) -> Vec<Message> {
        vec![Message::user_with_images(
            item.images.len(),
            self.render(&item.problem),
        )]
    }

    /// The model's input for an item: its images read and preprocessed, the conversation
    /// rendered with the chat template (generation prompt added) and tokenized. Training,
    /// evaluation and the memory plan all build prompts here.
    pub fn prompt(
        self,
        processor: &crate::processor::Processor,
        item: &VqaItem,
    ) -> anyhow::Result<crate::processor::Prompt> {
        let images = item
            .images
            .iter()
            .map(|p| processor.load_image(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
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
