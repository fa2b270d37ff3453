//! The OpenAI API's request shapes (what the official SDKs send; unknown fields are ignored as
//! OpenAI's server does) and its error shape.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// OpenAI's `code`.
    pub code: Option<&'static str>,
    /// The request field at fault.
    pub param: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param,
        }
    }

    /// 404 `model_not_found`.
    pub fn unknown_model(model: &str, known: &[&str]) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model {model:?} does not exist on this gateway (it serves: {})",
                known.join(", ")
            ),
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
        }
    }

    /// 500 `server_error`: the gateway itself failed.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            message,
        )
    }

    /// An error with this status, type and code.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            code,
            param: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Message content: a string, or a list of parts of which the text parts are used.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": ...}`); other part types are refused.
    Parts(Vec<ContentPart>),
    /// `null` (an assistant message that only called tools).
    Null(()),
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `"text"` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

impl Content {
    /// The text, or why there is none.
    pub fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Null(()) => Ok(String::new()),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::bad_request(
                                format!(
                                    "content parts of type {kind:?} are not supported: send text"
                                ),
                                Some("messages"),
                            ));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (others the template may or may not know).
    pub role: String,
    /// Its content.
    #[serde(default = "null_content")]
    pub content: Content,
}

fn null_content() -> Content {
    Content::Null(())
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One sequence.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// The sequences, at most 4 and none empty (OpenAI's rule).
    pub fn sequences(self) -> Result<Vec<String>, ApiError> {
        let v = match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        };
        if v.len() > 4 || v.iter().any(String::is_empty) {
            return Err(ApiError::bad_request(
                "stop: at most 4 sequences, none empty",
                Some("stop"),
            ));
        }
        Ok(v)
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and length fields chat and completions share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Knobs {
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// 0 to 2 (default 1); 0 is greedy.
    pub temperature: Option<f32>,
    /// 0 (exclusive) to 1 (default 1).
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (not in OpenAI's API; llama.cpp's servers take it).
    pub top_k: Option<u32>,
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// Stop sequences (not part of the text returned).
    pub stop: Option<Stop>,
    /// Seed of the sampler (same seed, same request: same answer).
    pub seed: Option<i64>,
    /// Choices wanted (only 1).
    pub n: Option<u32>,
    /// `include_usage`.
    pub stream_options: Option<StreamOptions>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The model id.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling and length.
    #[serde(flatten)]
    pub knobs: Knobs,
}

/// `prompt`: one string (a list of one string is accepted too).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// The text.
    One(String),
    /// A list (only one prompt per request).
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The model id.
    pub model: String,
    /// The text to continue.
    pub prompt: Prompt,
    /// Sampling and length.
    #[serde(flatten)]
    pub knobs: Knobs,
}

/// `input` of an embeddings request.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbedInput {
    /// One text.
    One(String),
    /// Several texts.
    Many(Vec<String>),
    /// Token ids (refused: the gateway tokenizes itself).
    Tokens(serde_json::Value),
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    /// The model id.
    pub model: String,
    /// The texts.
    pub input: EmbedInput,
    /// `float` (default) or `base64` (little-endian f32s, what the Python SDK asks for).
    pub encoding_format: Option<String>,
    /// Must be the model's own size when given.
    pub dimensions: Option<u32>,
}

/// Parses a JSON body into `T`, as a 400 in OpenAI's shape when it does not fit.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            format!("the request body is not a valid request: {e}"),
            None,
        )
    })
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }

    #[test]
    fn requests_parse_as_the_sdks_send_them() {
        let r: ChatRequest = parse(
            br#"{"model":"m","messages":[{"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hi"}]},
            {"role":"assistant","content":null}],
            "stream":true,"stop":"\n","temperature":0,"seed":7,"logprobs":false}"#,
        )
        .unwrap();
        assert!(r.knobs.stream);
        assert_eq!(r.messages[1].content.text().unwrap(), "hi");
        assert_eq!(r.messages[2].content.text().unwrap(), "");
        assert_eq!(r.knobs.stop.unwrap().sequences().unwrap(), vec!["\n"]);
        let e = parse::<ChatRequest>(br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("messages"), "{}", e.message);
        let img: ChatRequest = parse(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
        )
        .unwrap();
        assert!(img.messages[0].content.text().is_err());
    }
}
