//! `mxverify qr decode|show`: verification QR codes by hand — what a code says, and drawing one.

use std::io::{self, Write};
use std::path::Path;

use mxverify_proto::b64;
use mxverify_proto::qr::{QrMode, QrPayload};
use serde_json::json;

use crate::output::Ending;
use crate::qr_image;

fn bad(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// The payload bytes from a picture or from base64.
pub fn payload_from(picture: Option<&Path>, base64: Option<&str>) -> io::Result<Vec<u8>> {
    match (picture, base64) {
        (_, Some(text)) => b64::decode(text.trim()).ok_or_else(|| bad("the payload is not valid base64")),
        (Some(path), None) => qr_image::decode_image(path).map_err(bad),
        (None, None) => Err(bad("give a picture or --base64")),
    }
}

/// Prints the fields of a code, checked as strictly as a scan is.
pub fn decode(picture: Option<&Path>, base64: Option<&str>, json: bool, out: &mut dyn Write) -> io::Result<Ending> {
    let bytes = payload_from(picture, base64)?;
    let p = QrPayload::decode(&bytes).map_err(|e| bad(format!("not a verification QR code: {e}")))?;
    let (mode, first, second) = match p.mode() {
        QrMode::OtherUser => {
            ("0x00: verifying another user", "the displaying user's master key", "the other user's master key")
        }
        QrMode::SelfTrusted => (
            "0x01: self-verification, the displaying device trusts the master key",
            "the master key",
            "the other device's key",
        ),
        _ => (
            "0x02: self-verification, the displaying device does not trust the master key yet",
            "the displaying device's key",
            "the master key",
        ),
    };
    if json {
        writeln!(
            out,
            "{}",
            json!({"event": "qr_decoded", "mode": p.mode().as_byte(), "flow_id": p.flow_id(),
            "key1": b64::encode(p.key1()), "key2": b64::encode(p.key2()), "secret": p.secret().to_base64(),
            "payload": b64::encode(&bytes)})
        )?;
    } else {
        writeln!(
            out,
            "mode:    {mode}\nflow id: {}\nkey 1:   {} ({first})\nkey 2:   {} ({second})\nsecret:  {} bytes",
            p.flow_id(),
            b64::encode(p.key1()),
            b64::encode(p.key2()),
            p.secret().len()
        )?;
    }
    Ok(Ending::Verified)
}

/// Draws a payload in the terminal (and as a PNG if asked).
pub fn show(base64: &str, png: Option<&Path>, out: &mut dyn Write) -> io::Result<Ending> {
    let bytes = payload_from(None, Some(base64))?;
    QrPayload::decode(&bytes).map_err(|e| bad(format!("not a verification QR code: {e}")))?;
    write!(out, "{}", qr_image::render_terminal(&bytes).map_err(bad)?)?;
    if let Some(path) = png {
        qr_image::write_png(&bytes, path).map_err(bad)?;
    }
    Ok(Ending::Verified)
}
