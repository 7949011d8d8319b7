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
        Value::Null | Value::Bool(_) | Value::String(_) => {
            // serde_json's string escaping is the shortest form the appendix asks for.
            out.push_str(&value.to_string());
        }
        Value::Number(n) => match n.as_i64() {
            Some(i) if (-MAX_SAFE..=MAX_SAFE).contains(&i) => out.push_str(&i.to_string()),
            Some(_) => return Err(CanonicalError::OutOfRange(n.to_string())),
            None if n.is_u64() => return Err(CanonicalError::OutOfRange(n.to_string())),
            None => return Err(CanonicalError::Float(n.to_string())),
        },
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Sorting UTF-8 strings bytewise is sorting by code point.
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write(&map[key], out)?;
            }
            out.push('}');
        }
    }
    Ok(())
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

    #[test]
    fn rejects_floats_and_big_integers() {
        assert!(matches!(to_string(&json!({"a": 1.5})), Err(CanonicalError::Float(_))));
        assert!(matches!(to_string(&json!(9_007_199_254_740_992_i64)), Err(CanonicalError::OutOfRange(_))));
        assert!(to_string(&json!(-9_007_199_254_740_991_i64)).is_ok());
        assert!(matches!(to_string(&json!(u64::MAX)), Err(CanonicalError::OutOfRange(_))));
    }
}
