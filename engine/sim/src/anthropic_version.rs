//! What the Anthropic side of the simulator accepts per `anthropic-version`, and where a key may
//! arrive.
//!
//! 2023-06-01 is answered as before. 2026-10-21 removes the sampling parameters (`temperature`,
//! `top_p`, `top_k`: any of them is a 400, even at its default value) and refuses two kinds of
//! content: a `document` block in an `assistant` message, and a `text` block with a non-empty
//! `citations` array in a `user` message (directly or inside a `search_result` block). The events
//! of a stream are the same on both. Any other version is a 400, so a client that moves to a
//! version the simulator does not know fails here first.
//!
//! The sampling message is the API's own ("temperature: Extra inputs are not permitted", as
//! reported by users of the 2026-10-21 SDKs); the documentation does not quote the messages of
//! the two content rules, so those are worded here in the API's `path: problem` style.

use axum::http::HeaderMap;
use serde_json::Value;

use keyvex_engine::provider::anthropic_version::AnthropicVersion;

/// The request parameters 2026-10-21 removed.
pub(crate) const SAMPLING_PARAMETERS: [&str; 3] = ["temperature", "top_p", "top_k"];

/// Which header carried a non-empty key: `x-api-key` (what 2023-06-01 clients send) or
/// `authorization` with the Bearer scheme (what the 2026-10-21 SDKs send). With both present,
/// `x-api-key` is the one reported, as the API reads that one first.
pub(crate) fn key_header(headers: &HeaderMap) -> Option<&'static str> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if text("x-api-key").is_some_and(|v| !v.trim().is_empty()) {
        return Some("x-api-key");
    }
    let bearer = text("authorization").and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then_some(())
    });
    bearer.map(|()| "authorization")
}

/// The version a request asks for. Without the header it is an error when `required` (the API
/// requires it), else 2023-06-01 (`keyvex sim --no-auth` stays lenient).
pub(crate) fn requested(headers: &HeaderMap, required: bool) -> Result<AnthropicVersion, String> {
    let Some(value) = headers.get("anthropic-version") else {
        return if required {
            Err("anthropic-version: header is required".to_owned())
        } else {
            Ok(AnthropicVersion::V2023_06_01)
        };
    };
    let text = value.to_str().unwrap_or_default();
    text.parse().map_err(|_| {
        format!(
            "anthropic-version: {text:?} is not a version this simulator speaks; send one of {}",
            AnthropicVersion::known_list()
        )
    })
}

/// The sampling parameters present in a request body, in [`SAMPLING_PARAMETERS`] order.
pub(crate) fn sampling_parameters(body: &Value) -> Vec<String> {
    SAMPLING_PARAMETERS
        .iter()
        .filter(|name| body.get(**name).is_some())
        .map(|name| (*name).to_owned())
        .collect()
}

/// The first rule of `version` that `body` breaks, as the 400's message.
pub(crate) fn check(version: AnthropicVersion, body: &Value) -> Result<(), String> {
    match version {
        AnthropicVersion::V2023_06_01 => Ok(()),
        AnthropicVersion::V2026_10_21 => {
            // Present at all is the error, whatever the value (null and defaults included).
            if let Some(name) = sampling_parameters(body).first() {
                return Err(format!("{name}: Extra inputs are not permitted"));
            }
            check_content(body)
        }
    }
}

/// The 2026-10-21 content rules over `messages[].content[]`.
fn check_content(body: &Value) -> Result<(), String> {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return Ok(());
    };
    for (i, message) in messages.iter().enumerate() {
        let Some(blocks) = message.get("content").and_then(Value::as_array) else {
            continue;
        };
        let role = message.get("role").and_then(Value::as_str);
        for (j, block) in blocks.iter().enumerate() {
            let path = format!("messages.{i}.content.{j}");
            match (role, block_type(block)) {
                (Some("assistant"), Some("document")) => {
                    return Err(format!(
                        "{path}: document blocks are not allowed in assistant messages; send the document in a user message"
                    ));
                }
                (Some("user"), Some("text")) if has_citations(block) => {
                    return Err(format!(
                        "{path}.citations: text blocks in user messages cannot carry citations; remove the citations"
                    ));
                }
                (Some("user"), Some("search_result")) => {
                    let inner = block.get("content").and_then(Value::as_array);
                    for (k, text) in inner.into_iter().flatten().enumerate() {
                        if block_type(text) == Some("text") && has_citations(text) {
                            return Err(format!(
                                "{path}.content.{k}.citations: text blocks in user messages cannot carry citations; remove the citations"
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn block_type(block: &Value) -> Option<&str> {
    block.get("type").and_then(Value::as_str)
}

fn has_citations(block: &Value) -> bool {
    block
        .get("citations")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use serde_json::json;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn a_key_arrives_as_x_api_key_or_bearer() {
        assert_eq!(
            key_header(&headers(&[("x-api-key", "k")])),
            Some("x-api-key")
        );
        assert_eq!(
            key_header(&headers(&[("authorization", "Bearer k")])),
            Some("authorization")
        );
        assert_eq!(
            key_header(&headers(&[("authorization", "bearer k")])),
            Some("authorization")
        );
        assert_eq!(
            key_header(&headers(&[
                ("x-api-key", "k"),
                ("authorization", "Bearer j")
            ])),
            Some("x-api-key")
        );
        for missing in [
            headers(&[]),
            headers(&[("x-api-key", " ")]),
            headers(&[("authorization", "Bearer ")]),
            headers(&[("authorization", "Basic abc")]),
        ] {
            assert_eq!(key_header(&missing), None, "{missing:?}");
        }
    }

    #[test]
    fn the_version_header_is_required_known_or_refused() {
        assert_eq!(
            requested(&headers(&[("anthropic-version", "2026-10-21")]), true),
            Ok(AnthropicVersion::V2026_10_21)
        );
        assert_eq!(
            requested(&headers(&[]), false),
            Ok(AnthropicVersion::V2023_06_01)
        );
        assert!(
            requested(&headers(&[]), true)
                .unwrap_err()
                .contains("header is required")
        );
        let e = requested(&headers(&[("anthropic-version", "2023-01-01")]), false).unwrap_err();
        assert!(
            e.contains("\"2023-01-01\"") && e.contains("2023-06-01, 2026-10-21"),
            "{e}"
        );
    }

    #[test]
    fn sampling_parameters_are_refused_on_2026_10_21_even_at_their_defaults() {
        let new = AnthropicVersion::V2026_10_21;
        let old = AnthropicVersion::V2023_06_01;
        let plain =
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(check(new, &plain), Ok(()));
        for (name, value) in [
            ("temperature", json!(1.0)),
            ("top_p", json!(0.99)),
            ("top_k", json!(5)),
            ("temperature", Value::Null),
        ] {
            let mut body = plain.clone();
            body[name] = value;
            assert_eq!(
                check(new, &body),
                Err(format!("{name}: Extra inputs are not permitted"))
            );
            assert_eq!(check(old, &body), Ok(()));
            assert_eq!(sampling_parameters(&body), vec![name.to_owned()]);
        }
    }

    #[test]
    fn the_content_rules_of_2026_10_21() {
        let new = AnthropicVersion::V2026_10_21;
        let document = json!({"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "d"}});
        let cited = json!({"type": "text", "text": "t", "citations": [{"type": "char_location", "cited_text": "d",
            "document_index": 0, "start_char_index": 0, "end_char_index": 1}]});
        let body = |role: &str, block: &Value| {
            json!({"model": "m", "max_tokens": 5, "messages": [
                {"role": "user", "content": "hi"},
                {"role": role, "content": [{"type": "text", "text": "x"}, block]}]})
        };
        let e = check(new, &body("assistant", &document)).unwrap_err();
        assert!(
            e.starts_with("messages.1.content.1: document blocks"),
            "{e}"
        );
        assert_eq!(check(new, &body("user", &document)), Ok(()));

        let e = check(new, &body("user", &cited)).unwrap_err();
        assert!(e.starts_with("messages.1.content.1.citations:"), "{e}");
        assert_eq!(check(new, &body("assistant", &cited)), Ok(()));
        let uncited = json!({"type": "text", "text": "t", "citations": []});
        assert_eq!(check(new, &body("user", &uncited)), Ok(()));

        let search =
            json!({"type": "search_result", "source": "s", "title": "t", "content": [cited]});
        let e = check(new, &body("user", &search)).unwrap_err();
        assert!(
            e.starts_with("messages.1.content.1.content.0.citations:"),
            "{e}"
        );

        let old = AnthropicVersion::V2023_06_01;
        for block in [&document, &cited, &search] {
            assert_eq!(check(old, &body("assistant", block)), Ok(()));
            assert_eq!(check(old, &body("user", block)), Ok(()));
        }
    }
}
