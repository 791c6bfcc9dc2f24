//! Strict payload parsing that names the field at fault.

use std::fmt;

use serde::Deserialize;

/// A payload was refused at send time. Says which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidPayload {
    /// The path of the field at fault (`headers.X-Token`, `method`), empty for the whole payload.
    pub field: String,
    /// What is wrong and, where it helps, what would be right.
    pub message: String,
}

impl InvalidPayload {
    /// A problem with one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A problem with the payload as a whole.
    pub fn whole(message: impl Into<String>) -> Self {
        Self::field("", message)
    }

    /// The same problem, one level deeper: `payload` + `url` → `payload.url`.
    pub fn within(mut self, parent: &str) -> Self {
        if parent.is_empty() {
            return self;
        }
        self.field = if self.field.is_empty() {
            parent.to_owned()
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for InvalidPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid payload: {}", self.message)
        } else {
            write!(f, "`{}`: {}", self.field, self.message)
        }
    }
}

/// Parse a JSON object into `T`, naming the field at fault when it does not fit.
///
/// `T` should use `#[serde(deny_unknown_fields)]`: an unknown field is reported by its name.
/// Only an object is taken: serde would otherwise fill a struct positionally from an array,
/// reading `["http://x/", "POST"]` as a request nobody wrote.
pub fn parse_strict<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, InvalidPayload> {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(_) => {
            return Err(InvalidPayload::whole(format!(
                "must be a JSON object ({{...}}), not {}",
                json_kind(payload)
            )));
        }
        None => {
            return Err(InvalidPayload::whole(
                "is empty; send a JSON object ({...})",
            ));
        }
    }
    // Most payloads fit: parse them at full speed, and only a payload that does not is parsed
    // again with the field path tracked, for the message.
    if let Ok(value) = serde_json::from_slice(payload) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = strip_position(&inner.to_string());
        // serde_path_to_error names the field itself, unknown ones included; a missing one
        // is named by its parent, so it is named here.
        let parent = if path == "." { String::new() } else { path };
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.strip_suffix('`'))
        {
            return InvalidPayload::field(missing, "is required").within(&parent);
        }
        InvalidPayload::field(parent, message)
    })?;
    de.end()
        .map_err(|e| InvalidPayload::whole(strip_position(&e.to_string())))?;
    Ok(value)
}

/// What kind of JSON value `payload` starts with, for a message.
fn json_kind(payload: &[u8]) -> &'static str {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        Some(b'-' | b'0'..=b'9') => "a number",
        _ => "valid JSON",
    }
}

/// serde_json appends " at line 1 column 42"; the field path says more to a user.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

/// A value as JSON text, for a typed send's builder. A value that does not serialize (a map
/// with non-string keys, a failing `Serialize`) becomes a marker that
/// [`check_serialized`] reports, with the field named, when the send is checked.
pub fn raw_json<T: serde::Serialize + ?Sized>(value: &T) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| {
        serde_json::value::RawValue::from_string(UNSERIALIZABLE.to_owned())
            .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned())
    })
}

/// Refuse a value [`raw_json`] could not serialize.
pub fn check_serialized(
    field: &str,
    raw: &serde_json::value::RawValue,
) -> Result<(), InvalidPayload> {
    if raw.get() == UNSERIALIZABLE {
        return Err(InvalidPayload::field(
            field,
            "the value could not be serialized as JSON",
        ));
    }
    Ok(())
}

/// No serializer writes JSON with leading spaces, so this cannot be a real value.
const UNSERIALIZABLE: &str = "  null";

/// A name that fits on an SSE line, in a URL path segment and in logs: 1 to 200 characters of
/// letters, digits and `. _ - : ~ @ +`.
pub fn check_name(field: &str, name: &str) -> Result<(), InvalidPayload> {
    const MAX_NAME_CHARS: usize = 200;
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(InvalidPayload::field(
            field,
            format!("must be 1 to {MAX_NAME_CHARS} characters"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '~' | '@' | '+')))
    {
        return Err(InvalidPayload::field(
            field,
            format!("{c:?} is not allowed; use letters, digits and . _ - : ~ @ +"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        count: u32,
    }

    #[test]
    fn names_the_unknown_field() {
        let e = parse_strict::<Outer>(br#"{"name":"a","body":1}"#).unwrap_err();
        assert_eq!(e.field, "body");
        assert!(e.message.contains("unknown field `body`"), "{e}");
    }

    #[test]
    fn names_a_nested_field_of_the_wrong_type() {
        let e = parse_strict::<Outer>(br#"{"name":"a","inner":{"count":"x"}}"#).unwrap_err();
        assert_eq!(e.field, "inner.count");
        assert!(
            e.to_string().starts_with("`inner.count`: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn names_a_missing_field_and_rejects_trailing_garbage() {
        let e = parse_strict::<Outer>(br#"{}"#).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("name", "is required")
        );
        let e = parse_strict::<Outer>(br#"{"name":"a","inner":{}}"#).unwrap_err();
        assert_eq!(
            e.field, "inner.count",
            "a missing field is named at its depth"
        );
        for (not_an_object, kind) in [
            ("[\"a\"]", "an array"),
            ("\"a\"", "a string"),
            ("null", "null"),
            ("7", "a number"),
        ] {
            let e = parse_strict::<Outer>(not_an_object.as_bytes()).unwrap_err();
            assert_eq!(e.field, "");
            assert!(
                e.message
                    .contains(&format!("must be a JSON object ({{...}}), not {kind}")),
                "{e}"
            );
        }
        assert!(parse_strict::<Outer>(br#"{"name":"a"} x"#).is_err());
    }
}
