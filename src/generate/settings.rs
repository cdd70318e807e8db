//! Effective decoding settings: what the user said, else the checkpoint's
//! `generation_config.json`, else built-in defaults, each value remembering where it came
//! from. transformers has silently changed its generation defaults between versions; here
//! the source of every value is printed, so a run is never decoded with settings nobody
//! chose knowingly.

use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use super::sampling::SamplingParams;

/// Where a setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    User,
    GenerationConfig,
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::User => "set by you",
            Source::GenerationConfig => "generation_config.json",
            Source::Default => "default",
        })
    }
}

/// The sampling-related fields of a `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; a checkpoint without one gets the empty config.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        let f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
        let u = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        Ok(Self {
            do_sample: v.get("do_sample").and_then(Value::as_bool),
            temperature: f("temperature"),
            top_k: u("top_k"),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            max_new_tokens: u("max_new_tokens"),
        })
    }
}

/// What the user asked for on the command line (`None` = not said).
#[derive(Debug, Clone, Default)]
pub struct UserSampling {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub max_new_tokens: Option<usize>,
}

/// The settings a generation will use, each with its source.
#[derive(Debug, Clone)]
pub struct Effective {
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    pub sources: Vec<(&'static str, String, Source)>,
}

impl fmt::Display for Effective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .sources
            .iter()
            .map(|(k, v, s)| format!("{k}={v} ({s})"))
            .collect();
        write!(f, "{}", parts.join(", "))
    }
}

/// Merges user settings over the generation config over defaults (greedy, 512 tokens).
/// A generation config with `do_sample: false` means greedy unless the user set a
/// temperature.
pub fn resolve(user: &UserSampling, gen: &GenerationConfig) -> Result<Effective> {
    let mut sources = Vec::new();
    let mut pick =
        |name: &'static str, u: Option<String>, g: Option<String>, d: String| -> String {
            let (v, s) = match (u, g) {
                (Some(u), _) => (u, Source::User),
                (None, Some(g)) => (g, Source::GenerationConfig),
                (None, None) => (d, Source::Default),
            };
            sources.push((name, v.clone(), s));
            v
        };
    let gen_temp = match gen.do_sample {
        Some(false) => Some(0.0),
        _ => gen.temperature,
    };
    let temperature: f32 = pick(
        "temperature",
        user.temperature.map(|x| x.to_string()),
        gen_temp.map(|x| x.to_string()),
        "0".into(),
    )
    .parse()?;
    let greedy = temperature == 0.0;
    // Filters only matter when sampling; when greedy they are reported as off.
    let top_k: usize = if greedy {
        0
    } else {
        pick(
            "top_k",
            user.top_k.map(|x| x.to_string()),
            gen.top_k.map(|x| x.to_string()),
            "0".into(),
        )
        .parse()?
    };
    let top_p: f32 = if greedy {
        1.0
    } else {
        pick(
            "top_p",
            user.top_p.map(|x| x.to_string()),
            gen.top_p.map(|x| x.to_string()),
            "1".into(),
        )
        .parse()?
    };
    let min_p: f32 = if greedy {
        0.0
    } else {
        pick(
            "min_p",
            user.min_p.map(|x| x.to_string()),
            gen.min_p.map(|x| x.to_string()),
            "0".into(),
        )
        .parse()?
    };
    let repetition_penalty: f32 = pick(
        "repetition_penalty",
        user.repetition_penalty.map(|x| x.to_string()),
        gen.repetition_penalty.map(|x| x.to_string()),
        "1".into(),
    )
    .parse()?;
    let seed: u64 = if greedy {
        0
    } else {
        pick("seed", user.seed.map(|x| x.to_string()), None, "0".into()).parse()?
    };
    let max_new_tokens: usize = pick(
        "max_new_tokens",
        user.max_new_tokens.map(|x| x.to_string()),
        gen.max_new_tokens.map(|x| x.to_string()),
        "512".into(),
    )
    .parse()?;
    let params = SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
        seed,
    };
    params.validate()?;
    Ok(Effective {
        params,
        max_new_tokens,
        sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2-VL-2B-Instruct's generation_config.json values.
    fn qwen_gen() -> GenerationConfig {
        GenerationConfig {
            do_sample: Some(true),
            temperature: Some(0.01),
            top_k: Some(1),
            top_p: Some(0.001),
            repetition_penalty: Some(1.0),
            ..Default::default()
        }
    }

    #[test]
    fn generation_config_fills_only_what_the_user_left_open() {
        let e = resolve(&UserSampling::default(), &qwen_gen()).unwrap();
        assert_eq!(e.params.temperature, 0.01);
        assert_eq!(e.params.top_k, 1);
        assert_eq!(e.params.top_p, 0.001);
        assert_eq!(e.max_new_tokens, 512);
        let user = UserSampling {
            temperature: Some(1.0),
            top_p: Some(0.9),
            ..Default::default()
        };
        let e = resolve(&user, &qwen_gen()).unwrap();
        assert_eq!(e.params.temperature, 1.0);
        assert_eq!(e.params.top_p, 0.9);
        assert_eq!(e.params.top_k, 1, "top_k still from the generation config");
        let shown = e.to_string();
        assert!(shown.contains("temperature=1 (set by you)"), "{shown}");
        assert!(
            shown.contains("top_k=1 (generation_config.json)"),
            "{shown}"
        );
        assert!(shown.contains("max_new_tokens=512 (default)"), "{shown}");
    }

    #[test]
    fn do_sample_false_means_greedy() {
        let g = GenerationConfig {
            do_sample: Some(false),
            temperature: Some(0.7),
            ..Default::default()
        };
        let e = resolve(&UserSampling::default(), &g).unwrap();
        assert!(e.params.is_greedy());
    }

    #[test]
    fn reads_the_fixture_generation_config() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a");
        let g = GenerationConfig::from_dir(&dir).unwrap();
        assert_eq!(g.do_sample, Some(true));
        assert_eq!(g.top_k, Some(1));
    }
}
