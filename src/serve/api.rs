//! The chat-completions request: OpenAI's JSON read into checked types, with errors that
//! name the field (`messages[1].content[0].image_url`) and say what is accepted.

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::generate::UserSampling;
use crate::processor::image::MedicalOptions;
use crate::processor::{Content, Message};

/// Most `stop` strings per request (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes. Matching is incremental (a token costs the same whatever
/// their length), but a stream holds back up to this many bytes that could begin one.
pub const MAX_STOP_BYTES: usize = 1024;
/// Most `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Lowest temperature above 0 (0 is greedy). The sampler divides the f32 logits by it; well
/// above the ~1e-30 where that overflows, and below it sampling is greedy in all but name.
pub const MIN_TEMPERATURE: f64 = 1e-3;
/// Highest temperature, OpenAI's.
pub const MAX_TEMPERATURE: f64 = 2.0;
/// Range of repetition_penalty: the sampler divides positive logits by it and multiplies
/// negative ones; 1 is off.
pub const REPETITION_PENALTY: (f64, f64) = (0.01, 10.0);

/// The fields this server reads; others (`user`, `metadata`, ...) are accepted and ignored,
/// as OpenAI-compatible servers do, so existing clients work unchanged. Numbers are read as
/// f64 and checked before they become the sampler's f32: a JSON number f32 cannot hold
/// (1e-45 is subnormal, 1e-50 rounds to 0, 1e39 to infinity) must not change meaning on
/// the way.
#[derive(Deserialize)]
struct Raw {
    model: Option<String>,
    messages: Vec<Value>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// vLLM's convention: -1 (or 0) keeps every token.
    top_k: Option<i64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    /// An integer; OpenAI's is int64, so negative ones are accepted too.
    seed: Option<serde_json::Number>,
    n: Option<u64>,
    stop: Option<Stop>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    /// Extra: DICOM/NIfTI window, "lung" or "C,W" or [C, W].
    window: Option<Value>,
    /// Extra: slice of a 3-D volume.
    slice: Option<usize>,
    /// Extra (vLLM's): keep generating past the end-of-turn token, up to max_tokens.
    ignore_eos: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// An image a message refers to, before it is read.
#[derive(Debug, Clone)]
pub struct ImageRef {
    /// Where in the request it is, for error messages.
    pub param: String,
    pub url: String,
}

/// A checked chat-completions request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    /// In the order the messages mention them.
    pub images: Vec<ImageRef>,
    pub sampling: UserSampling,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `Some(k)`: report each token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    pub medical: MedicalOptions,
    pub ignore_eos: bool,
}

/// A float field as the sampler's f32, if `ok` accepts it (`range` says what that is).
/// Nonzero values that f32 cannot hold as a normal number are refused rather than rounded
/// to 0 or infinity, or kept subnormal.
fn float(
    name: &str,
    v: Option<f64>,
    range: &str,
    ok: impl Fn(f64) -> bool,
) -> Result<Option<f32>, ApiError> {
    let Some(x) = v else { return Ok(None) };
    let normal =
        x == 0.0 || (x.abs() >= f64::from(f32::MIN_POSITIVE) && x.abs() <= f64::from(f32::MAX));
    if normal && ok(x) {
        return Ok(Some(x as f32));
    }
    Err(ApiError::param(
        name,
        format!("{name} must be {range}, got {}", number(x)),
    ))
}

/// A number as people write it: 0.5, 1e-45, 3e39 (JSON's 1e-45 reads as 1.0000000000000001e-45).
fn number(x: f64) -> String {
    if x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
        let s = format!("{x:.6e}");
        match s.split_once('e') {
            Some((m, e)) => format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.')),
            None => s,
        }
    } else {
        format!("{}", (x * 1e6).round() / 1e6)
    }
}

/// Reads a request body.
pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let raw: Raw = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("the request body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::bad_request(format!("invalid request: {inner}"))
        } else {
            ApiError::param(&path, format!("{path}: {inner}"))
        }
    })?;
    // One JSON value and nothing after it but whitespace: trailing bytes are a broken or
    // smuggled body, not something to ignore.
    de.end().map_err(|e| {
        ApiError::bad_request(format!(
            "the request body has data after its JSON value: {e}"
        ))
    })?;
    let (messages, images) = parse_messages(&raw.messages)?;
    let positive = |name: &str, v: Option<u64>| -> Result<Option<usize>, ApiError> {
        match v {
            Some(0) => Err(ApiError::param(name, format!("{name} must be at least 1"))),
            Some(x) => usize::try_from(x)
                .map(Some)
                .map_err(|_| ApiError::param(name, format!("{name} is too large, got {x}"))),
            None => Ok(None),
        }
    };
    let max_tokens = positive("max_completion_tokens", raw.max_completion_tokens)?
        .or(positive("max_tokens", raw.max_tokens)?);
    let n = positive("n", raw.n)?.unwrap_or(1);
    for (name, v) in [
        ("frequency_penalty", raw.frequency_penalty),
        ("presence_penalty", raw.presence_penalty),
    ] {
        if v.is_some_and(|x| x != 0.0) {
            return Err(ApiError::param(
                name,
                format!("{name} is not supported; use repetition_penalty (1.0 = off)"),
            ));
        }
    }
    let temperature = float(
        "temperature",
        raw.temperature,
        &format!("0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}"),
        |x| x == 0.0 || (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&x),
    )?;
    let top_p = float("top_p", raw.top_p, "in (0, 1]", |x| x > 0.0 && x <= 1.0)?;
    let min_p = float("min_p", raw.min_p, "in [0, 1]", |x| {
        (0.0..=1.0).contains(&x)
    })?;
    let (lo, hi) = REPETITION_PENALTY;
    let repetition_penalty = float(
        "repetition_penalty",
        raw.repetition_penalty,
        &format!("between {lo} and {hi} (1 is off)"),
        |x| (lo..=hi).contains(&x),
    )?;
    let top_k = match raw.top_k {
        None => None,
        Some(-1 | 0) => Some(0),
        Some(k) if k < 0 => {
            return Err(ApiError::param(
                "top_k",
                format!("top_k must be -1 or 0 (every token) or at least 1, got {k}"),
            ))
        }
        Some(k) => Some(usize::try_from(k).unwrap_or(usize::MAX)),
    };
    let seed =
        match raw.seed {
            None => None,
            // Negative seeds keep their bits: -1 and u64::MAX are the same stream.
            Some(s) => Some(s.as_u64().or(s.as_i64().map(|x| x as u64)).ok_or_else(|| {
                ApiError::param("seed", format!("seed must be an integer, got {s}"))
            })?),
        };
    let stop = match raw.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::param(
            "stop",
            format!("at most {MAX_STOP} stop strings, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "stop strings must not be empty"));
    }
    if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::param(
            "stop",
            format!(
                "stop strings must be at most {MAX_STOP_BYTES} bytes, got one of {}",
                s.len()
            ),
        ));
    }
    let logprobs = match (raw.logprobs.unwrap_or(false), raw.top_logprobs) {
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::param(
                "top_logprobs",
                "top_logprobs needs \"logprobs\": true",
            ))
        }
        (false, _) => None,
        (true, k) => {
            let k = k.unwrap_or(0);
            if k > MAX_TOP_LOGPROBS as u64 {
                return Err(ApiError::param(
                    "top_logprobs",
                    format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {k}"),
                ));
            }
            Some(k as usize)
        }
    };
    let window = match &raw.window {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            crate::processor::image::medical::window::parse_window(s)
                .map_err(|e| ApiError::param("window", format!("window: {e}")))?,
        ),
        Some(Value::Array(a)) if a.len() == 2 => {
            let s = format!("{},{}", a[0], a[1]);
            Some(
                crate::processor::image::medical::window::parse_window(&s)
                    .map_err(|e| ApiError::param("window", format!("window: {e}")))?,
            )
        }
        Some(_) => {
            return Err(ApiError::param(
                "window",
                "window must be a preset name (\"lung\"), \"CENTER,WIDTH\" or [CENTER, WIDTH]",
            ))
        }
    };
    Ok(ChatRequest {
        model: raw.model,
        messages,
        images,
        sampling: UserSampling {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
            max_new_tokens: max_tokens,
        },
        n,
        stop,
        stream: raw.stream.unwrap_or(false),
        include_usage: raw
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
        medical: MedicalOptions {
            window,
            slice: raw.slice,
        },
        ignore_eos: raw.ignore_eos.unwrap_or(false),
    })
}

/// OpenAI messages to chat-template messages: `content` is a string or a list of `text` and
/// `image_url` parts, kept in their order.
fn parse_messages(raw: &[Value]) -> Result<(Vec<Message>, Vec<ImageRef>), ApiError> {
    if raw.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(raw.len());
    let mut images = Vec::new();
    for (i, m) in raw.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::param(
                &format!("{at}.role"),
                format!("{at}: a message needs a \"role\""),
            )
        })?;
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::param(
                    &format!("{at}.role"),
                    format!("{at}.role: {other:?} is not supported (system, user, assistant)"),
                ))
            }
        };
        let mut content = Vec::new();
        match m.get("content") {
            None | Some(Value::Null) if role == "assistant" => {}
            Some(Value::String(s)) => content.push(Content::text(s.clone())),
            Some(Value::Array(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    let pat = format!("{at}.content[{j}]");
                    let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                    match kind {
                        "text" => {
                            let t = p.get("text").and_then(Value::as_str).ok_or_else(|| {
                                ApiError::param(
                                    &format!("{pat}.text"),
                                    format!("{pat}: a text part needs a string \"text\""),
                                )
                            })?;
                            content.push(Content::text(t));
                        }
                        "image_url" => {
                            let url = match p.get("image_url") {
                                Some(Value::String(s)) => Some(s.clone()),
                                Some(o) => o.get("url").and_then(Value::as_str).map(str::to_string),
                                None => None,
                            }
                            .ok_or_else(|| {
                                ApiError::param(
                                    &format!("{pat}.image_url"),
                                    format!(
                                        "{pat}: an image_url part needs {{\"image_url\": \
                                         {{\"url\": \"data:image/png;base64,...\"}}}}"
                                    ),
                                )
                            })?;
                            content.push(Content::Image);
                            images.push(ImageRef {
                                param: format!("{pat}.image_url"),
                                url,
                            });
                        }
                        other => {
                            return Err(ApiError::param(
                                &format!("{pat}.type"),
                                format!(
                                    "{pat}: part type {other:?} is not supported (text, image_url)"
                                ),
                            ))
                        }
                    }
                }
            }
            _ => {
                return Err(ApiError::param(
                    &format!("{at}.content"),
                    format!("{at}: \"content\" must be a string or a list of parts"),
                ))
            }
        }
        messages.push(Message {
            role: role.to_string(),
            content,
        });
    }
    Ok((messages, images))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        parse(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn openai_requests_are_read_with_their_parts_in_order() {
        let r = parse(
            br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"Which?"},
              {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA","detail":"auto"}}]}],
            "max_tokens":7,"temperature":0.5,"top_k":-1,"n":2,"stop":"</answer>",
            "stream":true,"stream_options":{"include_usage":true},"logprobs":true,"top_logprobs":3,
            "window":"lung","user":"ignored"}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 2);
        assert_eq!(
            r.messages[1].content,
            vec![Content::text("Which?"), Content::Image]
        );
        assert_eq!(r.images[0].param, "messages[1].content[1].image_url");
        assert_eq!(r.sampling.max_new_tokens, Some(7));
        assert_eq!(r.sampling.top_k, Some(0));
        assert_eq!((r.n, r.stream, r.include_usage), (2, true, true));
        assert_eq!(r.stop, vec!["</answer>".to_string()]);
        assert_eq!(r.logprobs, Some(3));
        assert_eq!(r.medical.window, Some((-600.0, 1500.0)));
        // max_completion_tokens wins over the deprecated max_tokens.
        let r = parse(br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"max_completion_tokens":5}"#).unwrap();
        assert_eq!(r.sampling.max_new_tokens, Some(5));
    }

    #[test]
    fn bad_requests_name_the_field() {
        assert!(err("{not json").message.contains("not valid JSON"));
        let e = err(r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#);
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = err(r#"{"messages":[]}"#);
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = err(r#"{"messages":[{"role":"user","content":[{"type":"audio"}]}]}"#);
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
        let e = err(r#"{"messages":[{"role":"tool","content":"x"}]}"#);
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = err(r#"{"messages":[{"role":"user","content":"x"}],"n":0}"#);
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = err(r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#);
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        let e = err(r#"{"messages":[{"role":"user","content":"x"}],"window":"elbow"}"#);
        assert_eq!(e.param.as_deref(), Some("window"));
        let e = err(r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#);
        assert_eq!(e.param.as_deref(), Some("stop"));
        let e = err(r#"{"messages":[{"role":"user","content":"x"}],"presence_penalty":0.5}"#);
        assert_eq!(e.param.as_deref(), Some("presence_penalty"));
        for e in [err("[]"), err("{}")] {
            assert_eq!(e.status.as_u16(), 400);
        }
    }

    /// Every numeric field is checked against what it means and what the sampler can
    /// compute with, f32's subnormals and overflow included; the error names the field.
    #[test]
    fn numbers_out_of_range_name_their_field() {
        let with = |field: &str, v: &str| {
            format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"{field}":{v}}}"#)
        };
        for (field, v) in [
            ("temperature", "1e-45"),
            ("temperature", "1e-50"),
            ("temperature", "0.0001"),
            ("temperature", "-0.5"),
            ("temperature", "2.5"),
            ("temperature", "1e39"),
            ("top_p", "0"),
            ("top_p", "1e-45"),
            ("top_p", "1.5"),
            ("top_p", "-1"),
            ("min_p", "1e-40"),
            ("min_p", "2"),
            ("min_p", "-0.1"),
            ("repetition_penalty", "0"),
            ("repetition_penalty", "1e-45"),
            ("repetition_penalty", "-1"),
            ("repetition_penalty", "1e30"),
            ("top_k", "-2"),
            ("top_k", "1.5"),
            ("max_tokens", "0"),
            ("max_tokens", "-1"),
            ("max_tokens", "2.5"),
            ("max_tokens", "1e30"),
            ("max_completion_tokens", "0"),
            ("n", "0"),
            ("n", "-3"),
            ("seed", "1.5"),
            ("seed", "1e300"),
            ("seed", "\"7\""),
            ("top_logprobs", "-1"),
            ("frequency_penalty", "1e-45"),
            ("presence_penalty", "3"),
            ("slice", "-1"),
        ] {
            let body = with(field, v);
            let body = if field == "top_logprobs" {
                body.replace("\"top_logprobs\"", "\"logprobs\":true,\"top_logprobs\"")
            } else {
                body
            };
            let e = err(&body);
            assert_eq!(e.status.as_u16(), 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {}", e.message);
            assert!(!e.message.contains('\n'), "{}", e.message);
        }
        let e = err(&with("temperature", "1e-45"));
        assert!(e.message.contains("got 1e-45"), "{}", e.message);
        // The edges are accepted, and mean what they say.
        let ok = |field: &str, v: &str| parse(with(field, v).as_bytes()).expect(v).sampling;
        assert_eq!(ok("temperature", "0").temperature, Some(0.0));
        assert_eq!(ok("temperature", "0.001").temperature, Some(0.001));
        assert_eq!(ok("temperature", "2").temperature, Some(2.0));
        assert_eq!(ok("top_p", "1").top_p, Some(1.0));
        assert_eq!(ok("min_p", "0").min_p, Some(0.0));
        assert_eq!(ok("repetition_penalty", "1").repetition_penalty, Some(1.0));
        assert_eq!(ok("top_k", "-1").top_k, Some(0));
        assert_eq!(ok("top_k", "40").top_k, Some(40));
        // OpenAI's seed is an int64: a negative one is a seed, not an error.
        assert_eq!(ok("seed", "-1").seed, Some(u64::MAX));
        assert_eq!(ok("seed", "18446744073709551615").seed, Some(u64::MAX));
    }

    /// One JSON value and only whitespace after it.
    #[test]
    fn bytes_after_the_json_value_are_refused() {
        let good = r#"{"messages":[{"role":"user","content":"x"}]}"#;
        assert!(parse(good.as_bytes()).is_ok());
        assert!(parse(format!("{good} \r\n\t ").as_bytes()).is_ok());
        for tail in ["x", "{}", "\u{0}", " 1", "\n{\"messages\":[]}", "]"] {
            let e = err(&format!("{good}{tail}"));
            assert_eq!(e.status.as_u16(), 400);
            assert!(
                e.message.contains("after its JSON value"),
                "{tail:?}: {}",
                e.message
            );
        }
    }

    #[test]
    fn stop_strings_are_capped_in_number_and_length() {
        let with = |stop: Value| {
            serde_json::json!({"messages":[{"role":"user","content":"x"}],"stop":stop}).to_string()
        };
        let long = "a".repeat(MAX_STOP_BYTES + 1);
        for stop in [
            serde_json::json!(long),
            serde_json::json!(["ok", long]),
            serde_json::json!(["a", "b", "c", "d", "e"]),
            serde_json::json!([""]),
            // Bytes, not characters: 342 three-byte characters are 1026 bytes.
            serde_json::json!("€".repeat(342)),
        ] {
            let e = err(&with(stop));
            assert_eq!(e.param.as_deref(), Some("stop"), "{}", e.message);
        }
        let four = vec!["a".repeat(MAX_STOP_BYTES); 4];
        let r = parse(with(serde_json::json!(four)).as_bytes());
        assert_eq!(r.unwrap().stop.len(), 4);
    }
}
