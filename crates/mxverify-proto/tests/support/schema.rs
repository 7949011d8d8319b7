//! Test support: validate Matrix events against the spec's own JSON schemas.
//!
//! The schemas live in `testdata/spec-data/data/event-schemas/schema/` as YAML
//! files that point at each other with relative `$ref`s
//! (`core-event-schema/event.yaml`, `m.key.verification.m.relates_to.yaml`, …).
//! They are loaded with `serde_norway`, every file `$ref` is inlined
//! recursively (relative to the directory of the file that contains it), and
//! the result is compiled once per schema file with the `jsonschema` crate
//! (draft 2020-12, no reference resolving at all, so no file or network access
//! from inside the validator).
//!
//! Broken schema data (unreadable YAML, a `$ref` that cannot be inlined, a
//! schema that does not compile) panics: that is a test-setup error, not an
//! invalid event, and must never make a negative test pass by accident.

// Each integration test crate that includes this module uses a subset of it.
#![allow(dead_code)]

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Map, Value};

/// `testdata/spec-data/data/event-schemas` of this workspace.
pub fn event_schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/spec-data/data/event-schemas")
}

/// Directory holding the schema YAML files.
pub fn schema_dir() -> PathBuf {
    event_schemas_dir().join("schema")
}

/// Directory holding the spec's example events (JSON written as `.yaml`).
pub fn examples_dir() -> PathBuf {
    event_schemas_dir().join("examples")
}

/// Name of the schema file (inside [`schema_dir`]) that describes an event of
/// type `event_type` with the given `content`.
///
/// * `m.key.verification.start` picks the variant for its `method`
///   (`m.sas.v1`, `m.reciprocate.v1`), else the generic start schema.
/// * `m.room.message` with msgtype `m.key.verification.request` picks the
///   in-room request schema.
/// * Everything else maps to `<event_type>.yaml`, which may not exist.
pub fn schema_for(event_type: &str, content: &Value) -> Cow<'static, str> {
    let field = |name: &str| content.get(name).and_then(Value::as_str);
    match event_type {
        "m.key.verification.start" => match field("method") {
            Some("m.sas.v1") => "m.key.verification.start$m.sas.v1.yaml".into(),
            Some("m.reciprocate.v1") => "m.key.verification.start$m.reciprocate.v1.yaml".into(),
            _ => "m.key.verification.start.yaml".into(),
        },
        "m.room.message" if field("msgtype") == Some("m.key.verification.request") => {
            "m.room.message$m.key.verification.request.yaml".into()
        }
        other => format!("{other}.yaml").into(),
    }
}

/// Validate a full event (`{"type", "content", …}`) against the schema chosen
/// by [`schema_for`].
///
/// Errors are `"<instance path>: <message>"`, e.g.
/// `/content: "from_device" is a required property`.
pub fn validate_event(event: &Value) -> Result<(), Vec<String>> {
    let Some(event_type) = event.get("type").and_then(Value::as_str) else {
        return Err(vec!["/: event has no string \"type\", cannot pick a schema".to_owned()]);
    };
    let content = event.get("content").unwrap_or(&Value::Null);
    validate_against(&schema_for(event_type, content), event)
}

/// Validate `event` against one named schema file in [`schema_dir`].
///
/// A schema file that does not exist is reported as an error; one that exists
/// but cannot be loaded or compiled panics.
pub fn validate_against(schema_file: &str, event: &Value) -> Result<(), Vec<String>> {
    let Some(validator) = validator(schema_file) else {
        return Err(vec![format!("/: no schema file {schema_file:?} in {}", schema_dir().display())]);
    };
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|error| {
            let path = error.instance_path().to_string();
            let path = if path.is_empty() { "/".to_owned() } else { path };
            format!("{path}: {error}")
        })
        .collect();
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

/// The schema file with every file `$ref` inlined, as compiled by
/// [`validate_against`]. Panics if the file is missing or broken.
pub fn load_schema(schema_file: &str) -> Value {
    let path = schema_path(schema_file)
        .unwrap_or_else(|| panic!("no schema file {schema_file:?} in {}", schema_dir().display()));
    let mut stack = Vec::new();
    resolve_file(&path, &mut stack).unwrap_or_else(|e| panic!("loading schema {schema_file}: {e}"))
}

type Cache = Mutex<HashMap<String, Arc<jsonschema::Validator>>>;

/// Compiled validator for `schema_file`, cached for the whole test binary.
/// `None` if there is no such file.
fn validator(schema_file: &str) -> Option<Arc<jsonschema::Validator>> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(found) = lock(cache).get(schema_file) {
        return Some(Arc::clone(found));
    }
    schema_path(schema_file)?;
    // Compile outside the lock; a racing thread may compile the same file
    // too, which is harmless.
    let schema = load_schema(schema_file);
    let compiled = jsonschema::draft202012::options()
        .build(&schema)
        .unwrap_or_else(|e| panic!("compiling schema {schema_file}: {e}"));
    let compiled = Arc::new(compiled);
    lock(cache).entry(schema_file.to_owned()).or_insert_with(|| Arc::clone(&compiled));
    Some(compiled)
}

fn lock(cache: &Cache) -> std::sync::MutexGuard<'_, HashMap<String, Arc<jsonschema::Validator>>> {
    // A panic while holding the lock cannot leave the map inconsistent.
    cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Path of a schema file, refusing names that would leave [`schema_dir`].
fn schema_path(schema_file: &str) -> Option<PathBuf> {
    let escapes = Path::new(schema_file).components().any(|c| !matches!(c, std::path::Component::Normal(_)));
    if escapes {
        return None;
    }
    let path = schema_dir().join(schema_file);
    path.is_file().then_some(path)
}

/// Read a YAML (or JSON) file into a JSON value.
pub fn read_yaml(path: &Path) -> Result<Value, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_norway::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))
}

/// Load `path` and inline all its file `$ref`s. `stack` holds the files being
/// resolved, to report reference cycles instead of recursing forever.
fn resolve_file(path: &Path, stack: &mut Vec<PathBuf>) -> Result<Value, String> {
    let path = path.canonicalize().map_err(|e| format!("resolving {}: {e}", path.display()))?;
    if stack.contains(&path) {
        return Err(format!("$ref cycle through {}", path.display()));
    }
    let mut doc = read_yaml(&path)?;
    let base = path.parent().ok_or_else(|| format!("{} has no parent directory", path.display()))?.to_path_buf();
    stack.push(path);
    let inlined = inline_refs(&mut doc, &base, stack);
    stack.pop();
    inlined.map(|()| doc)
}

/// Replace every `{"$ref": "<file>[#<pointer>]"}` below `node` by the
/// referenced (recursively resolved) document. `base` is the directory of the
/// file `node` comes from.
fn inline_refs(node: &mut Value, base: &Path, stack: &mut Vec<PathBuf>) -> Result<(), String> {
    match node {
        Value::Array(items) => items.iter_mut().try_for_each(|item| inline_refs(item, base, stack)),
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if key != "$ref" {
                    inline_refs(value, base, stack)?;
                }
            }
            let Some(Value::String(reference)) = map.remove("$ref") else {
                return Ok(());
            };
            let target = load_ref(&reference, base, stack)?;
            if map.is_empty() {
                *node = target;
            } else {
                // `$ref` next to other keywords: keep them and apply the
                // target through `allOf`, which is what `$ref` means in 2020-12.
                match map.entry("allOf").or_insert_with(|| Value::Array(Vec::new())) {
                    Value::Array(all_of) => all_of.push(target),
                    _ => return Err(format!("non-array allOf next to $ref {reference:?}")),
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The resolved document a relative `$ref` points at, without the keywords
/// that only make sense at a document root.
fn load_ref(reference: &str, base: &Path, stack: &mut Vec<PathBuf>) -> Result<Value, String> {
    let (file, fragment) = reference.split_once('#').unwrap_or((reference, ""));
    if file.is_empty() {
        return Err(format!("local $ref {reference:?} is not supported by the inliner"));
    }
    if file.contains("://") {
        return Err(format!("remote $ref {reference:?} is not supported"));
    }
    let doc = resolve_file(&base.join(file), stack)?;
    let mut target = if fragment.is_empty() {
        doc
    } else {
        doc.pointer(fragment).cloned().ok_or_else(|| format!("$ref {reference:?}: no such pointer in the target"))?
    };
    if let Value::Object(map) = &mut target {
        strip_root_keywords(map);
    }
    Ok(target)
}

/// `$schema` and `$id` are only meaningful on a schema resource root; once a
/// document is inlined as a subschema they would start a new resource.
fn strip_root_keywords(map: &mut Map<String, Value>) {
    map.remove("$schema");
    map.remove("$id");
}
