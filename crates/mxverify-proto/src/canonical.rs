//! Canonical JSON ([spec appendix](https://spec.matrix.org/v1.19/appendices/#canonical-json)),
//! as the SAS commitment needs it: the accepter commits to the canonical JSON of the start's
//! content ([spec: `m.key.verification.accept`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationaccept)).
//!
//! ```
//! let v = serde_json::json!({"b": 1, "a": [true, null]});
//! assert_eq!(mxverify_proto::canonical::to_string(&v).unwrap(), r#"{"a":[true,null],"b":1}"#);
//! ```

use serde_json::Value;

/// Why a value has no canonical JSON form.
///
/// Spec: [canonical JSON](https://spec.matrix.org/v1.19/appendices/#canonical-json).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CanonicalError {
    /// Canonical JSON forbids non-integer numbers.
    #[error("canonical JSON does not allow the non-integer number {0}")]
    Float(String),
    /// Integers must lie in the interoperable range ±(2^53 − 1).
    #[error("integer {0} is outside the canonical JSON range ±(2^53 - 1)")]
    OutOfRange(String),
}

const MAX_SAFE: i64 = (1 << 53) - 1;

/// Writes `value` as canonical JSON: object keys sorted by code point, no insignificant
/// whitespace, integers only, shortest escapes.
///
/// Spec: [canonical JSON](https://spec.matrix.org/v1.19/appendices/#canonical-json).
pub fn to_string(value: &Value) -> Result<String, CanonicalError> {
    let mut out = String::with_capacity(256);
    write(value, &mut out)?;
    Ok(out)
}

fn write(value: &Value, out: &mut String) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::String(s) => write_string(s, out),
        Value::Number(n) => match n.as_i64() {
            Some(i) if (-MAX_SAFE..=MAX_SAFE).contains(&i) => {
                use std::fmt::Write;
                let _ = write!(out, "{i}");
            }
            Some(_) => return Err(CanonicalError::OutOfRange(n.to_string())),
            None if n.is_u64() => return Err(CanonicalError::OutOfRange(n.to_string())),
            None => return Err(CanonicalError::Float(n.to_string())),
        },
        Value::Array(items) => write_seq(out, '[', ']', items, write)?,
        Value::Object(map) => {
            // Sorting UTF-8 strings bytewise is sorting by code point. (serde_json's map is
            // already sorted unless a dependency turns on `preserve_order`.)
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if !entries.is_sorted_by(|a, b| a.0 <= b.0) {
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            }
            write_seq(out, '{', '}', entries, |(key, value), out| {
                write_key(key, out);
                write(value, out)
            })?;
        }
    }
    Ok(())
}

/// Writes `items` between `open` and `close`, separated by commas, each with `each`: a JSON array,
/// or an object whose members `each` writes (see [`write_key`]).
pub(crate) fn write_seq<T, E>(
    out: &mut String,
    open: char,
    close: char,
    items: impl IntoIterator<Item = T>,
    mut each: impl FnMut(T, &mut String) -> Result<(), E>,
) -> Result<(), E> {
    out.push(open);
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        each(item, out)?;
    }
    out.push(close);
    Ok(())
}

/// An object member's key and its colon.
pub(crate) fn write_key(key: &str, out: &mut String) {
    write_string(key, out);
    out.push(':');
}

/// A JSON string with the shortest escapes the appendix asks for: `"` and `\`, the two-character
/// forms of backspace, form feed, newline, carriage return and tab, `\u00xx` for the other
/// control characters, and everything else as it is.
pub(crate) fn write_string(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push('"');
    // A byte scan, not a `char` one: every message sent is written through here, and only ASCII
    // bytes need escaping, so each cut falls on a character boundary.
    let bytes = s.as_bytes();
    let mut done = 0;
    while let Some(i) = bytes[done..].iter().position(|&b| b < b' ' || b == b'"' || b == b'\\') {
        let i = done + i;
        out.push_str(&s[done..i]);
        let c = bytes[i];
        match c {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            _ => {
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(c >> 4)]));
                out.push(char::from(HEX[usize::from(c & 15)]));
            }
        }
        done = i + 1;
    }
    out.push_str(&s[done..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_and_compacts() {
        let v = json!({"b": [1, {"z": null, "a": true}], "a": "é\n\"", "日": 1});
        assert_eq!(to_string(&v).unwrap(), r#"{"a":"é\n\"","b":[1,{"a":true,"z":null}],"日":1}"#);
    }

    /// Strings come out exactly as serde_json escapes them (its escaping is the shortest form).
    #[test]
    fn strings_are_escaped_like_serde_json() {
        let all_ascii: String = (0u8..128).map(char::from).collect();
        for s in [all_ascii.as_str(), "", "plain", "é日😀", "a\"b\\c\u{7f}\u{2028}"] {
            let mut out = String::new();
            write_string(s, &mut out);
            assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    proptest::proptest! {
        /// Any string at all, escapes wherever they fall, comes out as serde_json writes it.
        #[test]
        fn any_string_is_escaped_like_serde_json(s in "(\\PC|[\\x00-\\x1f\"\\\\])*") {
            let mut out = String::new();
            write_string(&s, &mut out);
            proptest::prop_assert_eq!(out, serde_json::to_string(&s).unwrap());
        }
    }

    #[test]
    fn rejects_floats_and_big_integers() {
        assert!(matches!(to_string(&json!({"a": 1.5})), Err(CanonicalError::Float(_))));
        assert!(matches!(to_string(&json!(9_007_199_254_740_992_i64)), Err(CanonicalError::OutOfRange(_))));
        assert!(to_string(&json!(-9_007_199_254_740_991_i64)).is_ok());
        assert!(matches!(to_string(&json!(u64::MAX)), Err(CanonicalError::OutOfRange(_))));
    }
}
