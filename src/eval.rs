//! Evaluation: greedy answers read with the same strict rule as the GRPO accuracy reward
//! (one definition, [`crate::data::answer::extract_answer`]) for multiple choice, and with
//! named scoring protocols ([`crate::data::score`]) for closed and open questions; or the
//! likelihood baseline (the option letter the model finds most probable). Per-modality and
//! per-kind reports with confidence intervals, naming every protocol that ran.

pub mod suite;

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use crate::data::answer::{extract_answer, format_reward, Extraction};
use crate::data::score::{answer_block, score_completion, Protocol};
use crate::data::{Answer, PromptTemplate, Skipped, VqaItem};
use crate::generate::{Engine, Request, SamplingParams};
use crate::model::Qwen2Vl;
use crate::processor::{Processor, Prompt};
use crate::train::logps::SeqRef;

/// One item's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ItemResult {
    /// Row index in the data file.
    pub row: usize,
    /// The benchmark's id of the row (else the row index).
    pub id: String,
    pub modality: String,
    /// `choice`, `closed` or `open`.
    pub kind: &'static str,
    /// The image file(s) the item shows.
    pub images: Vec<String>,
    pub prompt: String,
    pub output: String,
    /// The letter read from the output, if one could be read (multiple choice).
    pub letter: Option<char>,
    /// The correct letter (multiple choice).
    pub solution: Option<char>,
    /// The gold answer as text.
    pub answer: String,
    /// Right by the item's first protocol (the letter for multiple choice).
    pub correct: bool,
    /// Each protocol's score of the output, by protocol name.
    pub scores: BTreeMap<&'static str, f64>,
    /// An answer could be read: a letter for multiple choice, a non-empty answer otherwise.
    pub answered: bool,
    /// The output has the `<think>…</think><answer>…</answer>` shape.
    pub format_ok: bool,
    /// How the answer was read (`letter`, `no_answer_block`, `ambiguous`, `answer_block`,
    /// `whole_output`, …).
    pub extraction: &'static str,
    /// Likelihood mode: the log-probability of each option's letter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub option_logprobs: Option<Vec<f32>>,
}

/// The protocols an evaluation scores closed and open questions with (multiple choice is
/// always `mc-letter`, the reward's rule). The first open protocol decides `correct`; every
/// one is reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scoring {
    pub closed: Protocol,
    pub open: Vec<Protocol>,
}

impl Default for Scoring {
    /// Closed: MedEvalKit's rule with its case quirk corrected (SLAKE's "Yes" is judged as a
    /// yes/no answer). Open: exact match after lmms-eval's normaliser, LLaVA-Med's recall (the
    /// number its paper tables quote) and LLaVA-Med's token F1.
    fn default() -> Self {
        Self {
            closed: Protocol::Closed,
            open: vec![
                Protocol::OpenExact,
                Protocol::OpenRecallLlavaMed,
                Protocol::OpenF1,
            ],
        }
    }
}

impl Scoring {
    /// The scores of `output` for a closed or open item with gold `answer`, whether it was
    /// answered, and how the answer was read.
    fn score(
        &self,
        kind: &Answer,
        output: &str,
        answer: &str,
    ) -> (BTreeMap<&'static str, f64>, bool, &'static str) {
        let block = answer_block(output);
        let (text, how) = match block {
            Some(b) => (b, "answer_block"),
            None => (output.trim(), "whole_output"),
        };
        let protocols: Vec<Protocol> = match kind {
            Answer::Closed { .. } => vec![self.closed],
            _ => self.open.clone(),
        };
        let scores = protocols
            .into_iter()
            .map(|p| (p.name(), score_completion(p, output, answer)))
            .collect();
        (scores, !text.is_empty(), how)
    }

    /// Refuses a closed protocol among the open ones and the other way round, naming the
    /// flag.
    pub fn check(&self) -> Result<()> {
        if !self.closed.is_closed() {
            anyhow::bail!(
                "--closed-protocol {} is not a closed-question protocol; one of {}",
                self.closed,
                Protocol::names_where(Protocol::is_closed)
            );
        }
        if let Some(p) = self.open.iter().find(|p| !p.is_open()) {
            anyhow::bail!(
                "--open-protocol {p} is not an open-question protocol; one of {}",
                Protocol::names_where(Protocol::is_open)
            );
        }
        Ok(())
    }

    /// The protocol deciding `correct` for an item of `kind`.
    pub fn primary(&self, kind: &Answer) -> Protocol {
        match kind {
            Answer::Choice { .. } => Protocol::McLetter,
            Answer::Closed { .. } => self.closed,
            Answer::Open { .. } => self.open.first().copied().unwrap_or(Protocol::OpenExact),
        }
    }
}

/// What an evaluation produced: a result per usable item, and the items skipped because
/// their image could not be read or their prompt built (with the reason, counted in
/// reports like the rows skipped when the data was loaded).
#[derive(Debug, Clone, Default)]
pub struct Evaluated {
    pub results: Vec<ItemResult>,
    pub skipped: Vec<Skipped>,
}

/// An item's prompt, or why the item cannot be asked: one unreadable image (a file that is
/// not an image, a damaged one) skips its row, it does not end the whole evaluation.
fn item_prompt(
    processor: &Processor,
    it: &VqaItem,
    template: PromptTemplate,
) -> std::result::Result<Prompt, Skipped> {
    let skip = |kind: &'static str, e: anyhow::Error| Skipped {
        file: String::new(),
        row: it.index,
        reason: format!("{e:#}"),
        modality: it.modality.name().to_string(),
        kind,
    };
    let images = PromptTemplate::images(processor, it).map_err(|e| skip("unreadable image", e))?;
    processor
        .prepare(&template.messages(it), images, true)
        .map_err(|e| skip("unusable prompt", e))
}

/// Greedy-decodes every item (batched) and reads each answer; items whose prompt cannot be
/// built are skipped, each reported on stderr.
pub fn run_greedy(
    model: &Qwen2Vl,
    processor: &Processor,
    items: &[VqaItem],
    template: PromptTemplate,
    max_new_tokens: usize,
    batch_size: usize,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<ItemResult>> {
    let e = greedy(
        model,
        processor,
        items,
        template,
        &Scoring::default(),
        max_new_tokens,
        batch_size,
        progress,
    )?;
    warn_skipped(&e.skipped);
    Ok(e.results)
}

fn warn_skipped(skipped: &[Skipped]) {
    for s in skipped {
        eprintln!("warning: skipped row {}: {}", s.row, s.reason);
    }
}

/// Greedy-decodes every item (batched) and reads each answer (closed and open ones scored
/// by `scoring`), skipping (and returning) the items whose prompt cannot be built.
#[allow(clippy::too_many_arguments)]
pub fn greedy(
    model: &Qwen2Vl,
    processor: &Processor,
    items: &[VqaItem],
    template: PromptTemplate,
    scoring: &Scoring,
    max_new_tokens: usize,
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Evaluated> {
    let stop = processor.tokenizer.stop_tokens().to_vec();
    let vision = processor.tokenizer.special.vision_ids().to_vec();
    let engine = Engine::new(model, stop, vision);
    let mut out = Evaluated {
        results: Vec::with_capacity(items.len()),
        skipped: Vec::new(),
    };
    let mut done = 0;
    for chunk in items.chunks(batch_size.max(1)) {
        let mut usable = Vec::with_capacity(chunk.len());
        let mut prompts = Vec::with_capacity(chunk.len());
        for it in chunk {
            match item_prompt(processor, it, template) {
                Ok(p) => {
                    usable.push(it);
                    prompts.push(p);
                }
                Err(s) => out.skipped.push(s),
            }
        }
        let reqs: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                prompt: p,
                sampling: SamplingParams::default(),
                max_new_tokens,
                num_samples: 1,
            })
            .collect();
        let gens = if reqs.is_empty() {
            Vec::new()
        } else {
            engine.generate(&reqs, |_, _, _| {})?
        };
        for ((it, group), p) in usable.iter().zip(&gens).zip(&prompts) {
            let text = processor.decode_completion(group[0].content_tokens())?;
            out.results.push(judge(it, p.text.clone(), text, scoring));
        }
        done += chunk.len();
        progress(done, items.len());
    }
    Ok(out)
}

/// An item's result from its greedy output: the letter for multiple choice, `scoring`'s
/// protocols for closed and open questions.
fn judge(it: &VqaItem, prompt: String, output: String, scoring: &Scoring) -> ItemResult {
    let format_ok = format_reward(&output) == 1.0;
    let base = ItemResult {
        row: it.index,
        id: it.id.clone(),
        modality: it.modality.name().to_string(),
        kind: it.answer.kind(),
        images: it.images.iter().map(|r| r.label()).collect(),
        prompt,
        output: String::new(),
        letter: None,
        solution: it.letter(),
        answer: it.answer.text().to_string(),
        correct: false,
        scores: BTreeMap::new(),
        answered: false,
        format_ok,
        extraction: "",
        option_logprobs: None,
    };
    match &it.answer {
        Answer::Choice { options, .. } => {
            let ex = extract_answer(&output, Some(options.len()));
            let letter = match ex {
                Extraction::Letter { letter, .. } => Some(letter),
                _ => None,
            };
            let correct = letter.is_some() && letter == it.letter();
            ItemResult {
                letter,
                correct,
                scores: BTreeMap::from([(
                    Protocol::McLetter.name(),
                    if correct { 1.0 } else { 0.0 },
                )]),
                answered: letter.is_some(),
                extraction: ex.kind(),
                output,
                ..base
            }
        }
        kind => {
            let (scores, answered, how) = scoring.score(kind, &output, it.answer.text());
            let primary = scoring.primary(kind).name();
            ItemResult {
                correct: scores.get(primary).is_some_and(|s| *s >= 1.0),
                scores,
                answered,
                extraction: how,
                output,
                ..base
            }
        }
    }
}

/// The likelihood baseline (see [`likelihood`]); items whose prompt cannot be built are
/// skipped, each reported on stderr.
pub fn run_likelihood(
    model: &Qwen2Vl,
    processor: &Processor,
    items: &[VqaItem],
    template: PromptTemplate,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<ItemResult>> {
    let e = likelihood(model, processor, items, template, progress)?;
    warn_skipped(&e.skipped);
    Ok(e.results)
}

/// The likelihood baseline: for each item, the log-probability of answering with each
/// option's letter (the completion is just the letter, as the "simple" template asks; after
/// a template that opens `<think>`, `</think>` and the letter), and
/// the most probable one as the answer. One forward pass per item scores all its options
/// (the image is encoded once).
pub fn likelihood(
    model: &Qwen2Vl,
    processor: &Processor,
    items: &[VqaItem],
    template: PromptTemplate,
    mut progress: impl FnMut(usize, usize),
) -> Result<Evaluated> {
    let mut out = Evaluated::default();
    for (done, it) in items.iter().enumerate() {
        let prompt = match item_prompt(processor, it, template) {
            Ok(p) => p,
            Err(s) => {
                out.skipped.push(s);
                progress(done + 1, items.len());
                continue;
            }
        };
        let Answer::Choice { options, .. } = &it.answer else {
            out.skipped.push(Skipped {
                file: String::new(),
                row: it.index,
                reason: format!(
                    "a {} question has no options to score by likelihood",
                    it.answer.kind()
                ),
                modality: it.modality.name().to_string(),
                kind: "not multiple choice",
            });
            progress(done + 1, items.len());
            continue;
        };
        let letters: Vec<char> = crate::data::LETTERS[..options.len()].to_vec();
        // Under a Thinking template the prompt opened the reasoning block, so each option's
        // continuation closes it (empty) before the letter.
        let toks: Vec<Vec<u32>> = letters
            .iter()
            .map(|l| {
                let text = processor.target_after_prompt(None, &l.to_string());
                processor.tokenizer.encode(&text)
            })
            .collect::<Result<_>>()?;
        let seqs: Vec<SeqRef> = toks
            .iter()
            .map(|t| SeqRef {
                prompt: &prompt,
                prompt_index: 0,
                tokens: t,
            })
            .collect();
        // One prompt pass shared by every option.
        let sums: Vec<f32> = crate::train::logps::logps(model, &seqs, seqs.len(), 1.0)?
            .iter()
            .map(|lp| lp.iter().sum())
            .collect();
        let best = sums
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| letters[i]);
        let correct = best.is_some() && best == it.letter();
        out.results.push(ItemResult {
            row: it.index,
            id: it.id.clone(),
            modality: it.modality.name().to_string(),
            kind: it.answer.kind(),
            images: it.images.iter().map(|r| r.label()).collect(),
            prompt: prompt.text.clone(),
            output: String::new(),
            letter: best,
            solution: it.letter(),
            answer: it.answer.text().to_string(),
            correct,
            scores: BTreeMap::from([(Protocol::McLetter.name(), if correct { 1.0 } else { 0.0 })]),
            answered: best.is_some(),
            format_ok: false,
            extraction: "likelihood",
            option_logprobs: Some(sums),
        });
        progress(done + 1, items.len());
    }
    Ok(out)
}

/// Wilson score interval for k successes in n trials at 95% confidence: unlike the normal
/// approximation it stays inside [0, 1] and is sensible at small n and at 0% or 100%.
pub fn wilson_interval(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let z = 1.959_963_984_540_054_f64;
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// One line of a report: a modality, or all items.
#[derive(Debug, Clone, Serialize)]
pub struct ReportRow {
    pub modality: String,
    /// Rows of this modality in the data file (after --modality, before split and limit).
    pub rows: usize,
    /// Rows skipped (missing image, answer not among the options, ...), by reason.
    pub skipped: usize,
    pub skipped_by_reason: BTreeMap<String, usize>,
    /// Items evaluated.
    pub n: usize,
    pub correct: usize,
    /// `None` when nothing was evaluated.
    pub accuracy: Option<f64>,
    pub ci95_low: Option<f64>,
    pub ci95_high: Option<f64>,
    /// Share of outputs in the `<think>…</think><answer>…</answer>` shape (generation only).
    pub format_rate: Option<f64>,
    /// Share of outputs from which no answer could be read (generation only).
    pub no_answer_rate: Option<f64>,
    /// The mean score of each protocol over the items it scored.
    pub scores: BTreeMap<String, f64>,
}

/// Per-modality accuracy table.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub data: String,
    /// "greedy" or "likelihood".
    pub mode: String,
    pub template: String,
    pub skipped_rows: usize,
    pub rows: Vec<ReportRow>,
    /// The same, by kind of question (choice, closed, open), where there is more than one.
    pub by_kind: Vec<ReportRow>,
    /// The protocols that scored each kind: choice `mc-letter`; closed and open as given.
    pub scoring: Scoring,
    /// How the run was made (model, template, decoding, pixel limits, split, seed, limit,
    /// medvlm version, elapsed time), for reproducing it.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub settings: serde_json::Value,
}

fn row_of(
    name: &str,
    rs: &[&ItemResult],
    skipped: &[&crate::data::Skipped],
    file_rows: usize,
    generated: bool,
) -> ReportRow {
    let n = rs.len();
    let correct = rs.iter().filter(|r| r.correct).count();
    let (lo, hi) = wilson_interval(correct, n);
    let frac = |f: &dyn Fn(&ItemResult) -> bool| {
        (n > 0).then(|| rs.iter().filter(|r| f(r)).count() as f64 / n as f64)
    };
    let mut by_reason = BTreeMap::new();
    for s in skipped {
        *by_reason.entry(s.kind.to_string()).or_insert(0) += 1;
    }
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for r in rs {
        for (p, v) in &r.scores {
            let e = sums.entry(p.to_string()).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    let scores = sums
        .into_iter()
        .map(|(p, (sum, n))| (p, sum / n as f64))
        .collect();
    ReportRow {
        modality: name.to_string(),
        rows: file_rows,
        skipped: skipped.len(),
        skipped_by_reason: by_reason,
        n,
        correct,
        accuracy: (n > 0).then(|| correct as f64 / n as f64),
        ci95_low: (n > 0).then_some(lo),
        ci95_high: (n > 0).then_some(hi),
        format_rate: if generated {
            frac(&|r| r.format_ok)
        } else {
            None
        },
        no_answer_rate: if generated {
            frac(&|r| !r.answered)
        } else {
            None
        },
        scores,
    }
}

impl Report {
    /// `skipped`: the rows of the selected modalities that could not be used; `file_rows`:
    /// rows per modality in the file (after the modality filter). Modalities with rows but
    /// nothing evaluated still get a line.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        results: &[ItemResult],
        model: &str,
        data: &str,
        mode: &str,
        template: PromptTemplate,
        skipped: &[crate::data::Skipped],
        file_rows: &BTreeMap<String, usize>,
        scoring: &Scoring,
        settings: serde_json::Value,
    ) -> Self {
        let generated = mode != "likelihood";
        let mut by: BTreeMap<String, Vec<&ItemResult>> = BTreeMap::new();
        for r in results {
            by.entry(r.modality.clone()).or_default().push(r);
        }
        let mut skipped_by: BTreeMap<String, Vec<&crate::data::Skipped>> = BTreeMap::new();
        for s in skipped {
            skipped_by.entry(s.modality.clone()).or_default().push(s);
        }
        let mut names: Vec<String> = by
            .keys()
            .chain(skipped_by.keys())
            .chain(file_rows.keys())
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        let empty: Vec<&ItemResult> = Vec::new();
        let none: Vec<&crate::data::Skipped> = Vec::new();
        let mut rows: Vec<ReportRow> = names
            .iter()
            .map(|m| {
                row_of(
                    m,
                    by.get(m).unwrap_or(&empty),
                    skipped_by.get(m).unwrap_or(&none),
                    file_rows.get(m).copied().unwrap_or(0),
                    generated,
                )
            })
            .collect();
        let all: Vec<&ItemResult> = results.iter().collect();
        let all_skipped: Vec<&crate::data::Skipped> = skipped.iter().collect();
        rows.push(row_of(
            "all",
            &all,
            &all_skipped,
            file_rows.values().sum(),
            generated,
        ));
        let mut kinds: BTreeMap<&'static str, Vec<&ItemResult>> = BTreeMap::new();
        for r in results {
            kinds.entry(r.kind).or_default().push(r);
        }
        let by_kind = if kinds.len() > 1 {
            kinds
                .iter()
                .map(|(k, rs)| row_of(k, rs, &[], 0, generated))
                .collect()
        } else {
            Vec::new()
        };
        Self {
            model: model.to_string(),
            data: data.to_string(),
            mode: mode.to_string(),
            template: format!("{template:?}").to_lowercase(),
            skipped_rows: skipped.len(),
            rows,
            by_kind,
            scoring: scoring.clone(),
            settings,
        }
    }

    /// The table as Markdown (also what the terminal shows).
    pub fn markdown(&self) -> String {
        let pct = |x: f64| format!("{:.1}%", 100.0 * x);
        let opt = |x: Option<f64>| x.map(pct).unwrap_or_else(|| "-".into());
        let mut s = format!(
            "Model `{}` on `{}` ({} decoding, {} template{})\n\n",
            self.model,
            self.data,
            self.mode,
            self.template,
            if self.skipped_rows > 0 {
                format!(", {} rows skipped", self.skipped_rows)
            } else {
                String::new()
            }
        );
        s.push_str("| modality | rows | skipped | n | accuracy | 95% CI | format | no answer |\n");
        s.push_str("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |\n");
        for r in &self.rows {
            let skipped = if r.skipped == 0 {
                "0".to_string()
            } else {
                let why: Vec<String> = r
                    .skipped_by_reason
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect();
                format!("{} ({})", r.skipped, why.join(", "))
            };
            let ci = match (r.ci95_low, r.ci95_high) {
                (Some(lo), Some(hi)) => format!("{}-{}", pct(lo), pct(hi)),
                _ => "-".into(),
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.modality,
                r.rows,
                skipped,
                r.n,
                opt(r.accuracy),
                ci,
                opt(r.format_rate),
                opt(r.no_answer_rate)
            ));
        }
        if !self.by_kind.is_empty() {
            s.push_str("\n| kind | n | protocol: accuracy | 95% CI | other protocols |\n");
            s.push_str("| --- | ---: | --- | --- | --- |\n");
            for r in &self.by_kind {
                let primary = match r.modality.as_str() {
                    "choice" => Protocol::McLetter,
                    "closed" => self.scoring.closed,
                    _ => self.scoring.open[0],
                };
                let ci = match (r.ci95_low, r.ci95_high) {
                    (Some(lo), Some(hi)) => format!("{}-{}", pct(lo), pct(hi)),
                    _ => "-".into(),
                };
                let others: Vec<String> = r
                    .scores
                    .iter()
                    .filter(|(p, _)| p.as_str() != primary.name())
                    .map(|(p, v)| format!("{p} {}", pct(*v)))
                    .collect();
                s.push_str(&format!(
                    "| {} | {} | {primary}: {} | {ci} | {} |\n",
                    r.modality,
                    r.n,
                    opt(r.accuracy),
                    if others.is_empty() {
                        "-".to_string()
                    } else {
                        others.join(", ")
                    }
                ));
            }
        }
        s.push_str(&format!(
            "\nScoring: multiple choice mc-letter; closed {}; open {} (the first decides \
             accuracy; open-exact, open-recall-llavamed and open-f1 read the <answer> block \
             when there is one)\n",
            self.scoring.closed,
            self.scoring
                .open
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if !self.settings.is_null() {
            s.push_str(&format!("\nSettings: `{}`\n", self.settings));
        }
        s
    }
}

/// Fraction correct (NaN for no items).
pub fn accuracy(results: &[ItemResult]) -> f64 {
    if results.is_empty() {
        return f64::NAN;
    }
    results.iter().filter(|r| r.correct).count() as f64 / results.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from the closed-form Wilson interval (e.g. statsmodels'
    /// proportion_confint(method="wilson")).
    #[test]
    fn wilson_by_hand() {
        let (lo, hi) = wilson_interval(5, 10);
        assert!(
            (lo - 0.236_593).abs() < 1e-5 && (hi - 0.763_407).abs() < 1e-5,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson_interval(0, 8);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.324_41).abs() < 1e-4, "{hi}");
        let (lo, hi) = wilson_interval(300, 300);
        assert!(
            (lo - 0.987_4).abs() < 1e-3 && (hi - 1.0).abs() < 1e-9,
            "{lo} {hi}"
        );
    }
}
