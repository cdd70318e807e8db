//! The chat-completions request: OpenAI's JSON read into checked types, with errors that
//! name the field (`messages[1].content[0].image_url`) and say what is accepted.

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::generate::UserSampling;
use crate::processor::image::MedicalOptions;
use crate::processor::{Content, Message};

/// Most `stop` strings per request (OpenAI's limit).
const MAX_STOP: usize = 4;
/// Most `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The fields this server reads; others (`user`, `metadata`, ...) are accepted and ignored,
/// as OpenAI-compatible servers do, so existing clients work unchanged.
#[derive(Deserialize)]
struct Raw {
    model: Option<String>,
    messages: Vec<Value>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// vLLM's convention: -1 (or 0) keeps every token.
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    n: Option<u64>,
    stop: Option<Stop>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
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

/// Reads a request body.
pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let raw: Raw = serde_path_to_error::deserialize(de).map_err(|e| {
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
    let (messages, images) = parse_messages(&raw.messages)?;
    let positive = |name: &str, v: Option<u64>| -> Result<Option<usize>, ApiError> {
        match v {
            Some(0) => Err(ApiError::param(name, format!("{name} must be at least 1"))),
            v => Ok(v.map(|x| x as usize)),
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
    let top_k = match raw.top_k {
        None => None,
        Some(k) if k <= 0 => Some(0),
        Some(k) => Some(k as usize),
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
    let logprobs = match (raw.logprobs.unwrap_or(false), raw.top_logprobs) {
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::param(
                "top_logprobs",
                "top_logprobs needs \"logprobs\": true",
            ))
        }
        (false, _) => None,
        (true, k) => {
            let k = k.unwrap_or(0) as usize;
            if k > MAX_TOP_LOGPROBS {
                return Err(ApiError::param(
                    "top_logprobs",
                    format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {k}"),
                ));
            }
            Some(k)
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
            temperature: raw.temperature,
            top_k,
            top_p: raw.top_p,
            min_p: raw.min_p,
            repetition_penalty: raw.repetition_penalty,
            seed: raw.seed,
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
}
