//! What people and programs see: the `--json` event lines (a stable interface, documented in the
//! README) and the human-mode rendering of SAS and cancellations.

use mxverify_proto::emoji::Emoji;
use mxverify_proto::{Event, FlowKey, KeyKind};
use serde_json::{Value, json};

/// How a run ended, as the process exit code says it (documented in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Every verification finished and was verified (or the command succeeded).
    Verified = 0,
    /// An error outside the protocol (I/O, a damaged store, an unexpected answer).
    Error = 1,
    /// The command line (or what it asks) cannot be carried out as given.
    Usage = 2,
    /// A verification was cancelled (by either side, any code but `m.timeout`).
    Cancelled = 3,
    /// A verification timed out.
    TimedOut = 4,
    /// The homeserver refused the user name or password.
    LoginFailed = 5,
    /// The homeserver could not be reached.
    Unreachable = 6,
    /// The user or device does not exist, or has no valid keys.
    UnknownUserOrDevice = 7,
    /// There is no session in the state directory (or the server forgot it).
    NotLoggedIn = 8,
}

fn flow_json(flow: &FlowKey) -> Value {
    match flow {
        FlowKey::ToDevice { user_id, transaction_id } => {
            json!({"flow_id": transaction_id, "transport": "to_device", "user": user_id})
        }
        FlowKey::Room { room_id, event_id } => {
            json!({"flow_id": event_id, "transport": "room", "room": room_id})
        }
        other => json!({"flow_id": other.flow_id()}),
    }
}

fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

/// The `--json` line for an event, or `None` for internal events that have no line.
/// `device` names which local device saw it (the demo runs two).
/// With a `lang`, each emoji also has `name_local`, its name in that language.
pub fn event_json(device: Option<&str>, event: &Event, lang: Option<&str>) -> Option<Value> {
    let (name, flow, body) = match event {
        Event::IncomingRequest { flow, from_device, methods, common_methods, legacy, deadline } => (
            "request",
            flow,
            json!({"direction": "incoming", "device": from_device, "methods": methods,
                   "common_methods": common_methods, "legacy": legacy, "deadline_ms": deadline}),
        ),
        Event::RequestSent { flow } => ("request", flow, json!({"direction": "outgoing"})),
        Event::Ready { flow, other_device, methods } => {
            ("ready", flow, json!({"device": other_device, "methods": methods}))
        }
        Event::Started { flow, method, by_us } => {
            ("started", flow, json!({"method": method, "by": if *by_us { "us" } else { "them" }}))
        }
        Event::Sas { flow, emoji, decimals } => (
            "sas",
            flow,
            json!({
                "emoji": emoji.as_ref().map(|e| e.iter().map(|e| {
                    let mut v = json!({"symbol": e.symbol, "name": e.description, "index": e.index});
                    if let Some(l) = lang {
                        v["name_local"] = json!(e.name_or_english(l));
                    }
                    v
                }).collect::<Vec<_>>()),
                "decimals": decimals,
            }),
        ),
        Event::QrCode { flow, payload, mode } => {
            ("qr", flow, json!({"payload": mxverify_proto::b64::encode(payload), "mode": mode}))
        }
        Event::QrScanned { flow } => ("qr_scanned", flow, json!({})),
        Event::Done { flow, user_id, device_id, keys } => {
            ("done", flow, json!({"verified_user": user_id, "verified_device": device_id, "keys": keys_json(keys)}))
        }
        Event::DoneSent { flow, user_id, device_id, keys } => (
            "done_sent",
            flow,
            json!({"verified_user": user_id, "verified_device": device_id, "keys": keys_json(keys)}),
        ),
        Event::Cancelled { flow, info } => (
            "cancelled",
            flow,
            json!({"by": if info.by_us { "us" } else { "them" }, "code": info.code.as_str(), "reason": info.reason,
                   "cause": info.cause.as_ref().map(ToString::to_string), "sent": info.sent, "explanation": info.explain()}),
        ),
        Event::KeysNeeded { user_id } => {
            return Some(with_device(device, json!({"event": "keys_needed", "user": user_id})));
        }
        Event::IdentityChanged { user_id, old_master_key, new_master_key } => {
            let line = json!({"event": "identity_changed", "user": user_id, "old_master_key": old_master_key.to_string(),
                              "new_master_key": new_master_key.as_ref().map(ToString::to_string)});
            return Some(with_device(device, line));
        }
        _ => return None,
    };
    Some(with_device(device, merge(merge(json!({"event": name}), flow_json(flow)), body)))
}

fn keys_json(keys: &[mxverify_proto::VerifiedKey]) -> Vec<Value> {
    keys.iter()
        .map(|k| {
            let kind = match k.kind {
                KeyKind::Device => "device",
                _ => "master_key",
            };
            json!({"key_id": k.key_id, "key": k.key.to_string(), "kind": kind})
        })
        .collect()
}

fn with_device(device: Option<&str>, v: Value) -> Value {
    match device {
        Some(d) => merge(json!({"local_device": d}), v),
        None => v,
    }
}

/// The language to show emoji names in: `--lang`, else `LC_ALL`, `LC_MESSAGES` or `LANG` (as
/// POSIX sets them, e.g. `de_DE.UTF-8`); `None` for English (and for `C`/`POSIX`). The names come
/// from the spec's translations; an emoji without a translation keeps its English name.
pub fn language(arg: Option<&str>) -> Option<String> {
    let raw = match arg {
        Some(a) => a.to_owned(),
        None => {
            ["LC_ALL", "LC_MESSAGES", "LANG"].iter().filter_map(|v| std::env::var(v).ok()).find(|v| !v.is_empty())?
        }
    };
    // `de_DE.UTF-8@euro` → `de_DE`.
    let tag = raw.split(['.', '@']).next().unwrap_or_default().trim();
    let english = tag.is_empty()
        || tag == "C"
        || tag == "POSIX"
        || tag == "en"
        || tag.starts_with("en_")
        || tag.starts_with("en-");
    (!english).then(|| tag.to_owned())
}

/// An emoji's name in `lang` (English without a language or a translation).
pub fn emoji_name(e: &Emoji, lang: Option<&str>) -> &'static str {
    lang.map_or(e.description, |l| e.name_or_english(l))
}

/// The seven emoji (or the numbers) as two aligned columns, one per device, for human mode.
pub fn sas_side_by_side(left: (&str, &[Emoji]), right: (&str, &[Emoji]), lang: Option<&str>) -> String {
    let mut out = format!("      {:<26}{}\n", left.0, right.0);
    for (i, (l, r)) in left.1.iter().zip(right.1).enumerate() {
        let (ln, rn) = (emoji_name(l, lang), emoji_name(r, lang));
        out.push_str(&format!("  {}   {}  {:<22}{}  {}\n", i + 1, l.symbol, ln, r.symbol, rn));
    }
    out
}

/// Decimals as the spec suggests: three groups with dashes.
pub fn decimals(d: &[u16; 3]) -> String {
    format!("{}-{}-{}", d[0], d[1], d[2])
}
