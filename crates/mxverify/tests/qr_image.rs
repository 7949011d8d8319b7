//! Round trips of real verification payloads through terminal text, PNG and JPEG.

use std::path::PathBuf;

use image::{GrayImage, Luma};
use mxverify::qr_image::{
    MAX_PAYLOAD_LEN, QUIET_ZONE, QrImageError, TerminalBackground, decode_image, decode_image_bytes, render_image,
    render_terminal, render_terminal_for, write_png,
};
use mxverify_proto::qr::{QrMode, QrPayload, QrSecret};

/// Two valid Ed25519 public keys (RFC 8032 test vectors 1 and 2), as raw bytes.
const KEY_A: [u8; 32] = [
    0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64, 0x07, 0x3a, 0x0e, 0xe1, 0x72,
    0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68, 0xf7, 0x07, 0x51, 0x1a,
];
const KEY_B: [u8; 32] = [
    0x3d, 0x40, 0x17, 0xc3, 0xe8, 0x43, 0x89, 0x5a, 0x92, 0xb7, 0x0a, 0xa7, 0x4d, 0x1b, 0x7e, 0xbc, 0x9c, 0x98, 0x2c,
    0xcf, 0x2e, 0xc4, 0x96, 0x8c, 0xc0, 0xcd, 0x55, 0xf1, 0x2a, 0xf4, 0x66, 0x0c,
];

/// A fresh path in the system temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        TempFile(std::env::temp_dir().join(format!("mxverify-qr-image-{}-{name}", std::process::id())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A secret with many high bytes, so that any text re-encoding would corrupt it.
fn secret() -> QrSecret {
    QrSecret::generate(|buf| {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = 0x80 | (i as u8).wrapping_mul(37);
        }
    })
}

/// Real payloads: every mode, to-device and in-room flow ids.
fn payloads() -> Vec<(String, Vec<u8>)> {
    let in_room = "$Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kTL4v8Ks1bvY";
    let long_in_room = format!("${}:some.rather.long.homeserver.example.org", "x".repeat(80));
    let flows = ["S0meUniqueAndOpaqueString", in_room, long_in_room.as_str()];
    let mut out = Vec::new();
    for mode in [QrMode::OtherUser, QrMode::SelfTrusted, QrMode::SelfUntrusted] {
        for flow in flows {
            let p = QrPayload::new(mode, flow, KEY_A, KEY_B, secret()).expect("valid payload");
            out.push((format!("{mode:?} {flow}"), p.encode()));
        }
    }
    out
}

#[cfg(unix)]
#[test]
fn a_png_with_a_secret_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let (_, bytes) = payloads().remove(0);
    let file = TempFile::new("secret.png");
    // Also when a world-readable file was there before.
    std::fs::write(&file.0, b"old").unwrap();
    std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(0o644)).unwrap();
    write_png(&bytes, &file.0).unwrap();
    assert_eq!(std::fs::metadata(&file.0).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(decode_image(&file.0).unwrap(), bytes);
}

#[test]
fn png_round_trip_every_mode() {
    for (i, (label, bytes)) in payloads().into_iter().enumerate() {
        let file = TempFile::new(&format!("rt{i}.png"));
        write_png(&bytes, &file.0).expect("write png");
        let png = std::fs::read(&file.0).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{label}: a PNG file");
        let decoded = decode_image(&file.0).expect("decode png");
        assert_eq!(decoded, bytes, "{label}");
        // And the bytes are a valid payload again.
        assert_eq!(QrPayload::decode(&decoded).unwrap().encode(), bytes);
    }
}

#[test]
fn png_has_scale_and_quiet_zone() {
    let (_, bytes) = &payloads()[1];
    let img = render_image(bytes, 8).unwrap();
    assert_eq!(img.width(), img.height());
    let side_modules = img.width() / 8;
    assert_eq!(img.width() % 8, 0);
    assert_eq!((side_modules as usize - 2 * QUIET_ZONE - 17) % 4, 0);
    // The quiet zone is white; the finder pattern's corner module right after it black.
    let q = (QUIET_ZONE * 8) as u32;
    for x in 0..img.width() {
        for y in 0..q {
            assert_eq!(img.get_pixel(x, y).0[0], 255);
            assert_eq!(img.get_pixel(y, x).0[0], 255);
        }
    }
    assert_eq!(img.get_pixel(q, q).0[0], 0);
    assert_eq!(img.get_pixel(q + 7, q + 7).0[0], 0);
}

#[test]
fn jpeg_round_trip() {
    for (i, (label, bytes)) in payloads().into_iter().enumerate().step_by(2) {
        let img = render_image(&bytes, 6).unwrap();
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&img).expect("encode jpeg");
        assert_eq!(&jpeg[..2], &[0xff, 0xd8], "a JPEG file");
        let file = TempFile::new(&format!("rt{i}.jpg"));
        std::fs::write(&file.0, &jpeg).unwrap();
        assert_eq!(decode_image(&file.0).expect("decode jpeg"), bytes, "{label}");
    }
}

/// A picture of the code that is not the exact rendering: embedded off-centre in a
/// larger grey frame, scaled by a non-integer factor.
#[test]
fn decodes_code_inside_a_larger_picture() {
    let (_, bytes) = &payloads()[4];
    let code = render_image(bytes, 5).unwrap();
    let (w, h) = (code.width() * 3 / 2 + 123, code.height() * 3 / 2 + 77);
    let picture = GrayImage::from_fn(w, h, |x, y| {
        let (cx, cy) = (x as i64 - 100, y as i64 - 50);
        let (sx, sy) = (cx * 2 / 3, cy * 2 / 3);
        if (0..code.width() as i64).contains(&sx) && (0..code.height() as i64).contains(&sy) {
            *code.get_pixel(sx as u32, sy as u32)
        } else {
            Luma([128])
        }
    });
    let mut png = Vec::new();
    picture.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    assert_eq!(decode_image_bytes(&png).unwrap(), *bytes);
}

#[test]
fn picture_without_qr_code() {
    let file = TempFile::new("blank.png");
    GrayImage::from_fn(200, 150, |x, y| Luma([((x * 7 + y * 3) % 256) as u8])).save(&file.0).unwrap();
    let err = decode_image(&file.0).unwrap_err();
    assert!(matches!(err, QrImageError::NoQrCode), "{err:?}");
    assert!(err.to_string().starts_with("no QR code found in the picture"));
}

#[test]
fn unreadable_and_missing_files() {
    let file = TempFile::new("not-an-image.png");
    std::fs::write(&file.0, b"this is text, not a picture").unwrap();
    let err = decode_image(&file.0).unwrap_err();
    assert!(matches!(err, QrImageError::UnreadableImage(_)), "{err:?}");
    assert!(err.to_string().starts_with("unreadable image"), "{err}");

    let missing = TempFile::new("does-not-exist.png");
    let err = decode_image(&missing.0).unwrap_err();
    assert!(matches!(err, QrImageError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("does-not-exist.png"), "{err}");
}

#[test]
fn payload_too_big() {
    let err = render_terminal(&vec![0; MAX_PAYLOAD_LEN + 1]).unwrap_err();
    assert!(matches!(err, QrImageError::PayloadTooBig { len: 2954 }));
    assert!(err.to_string().contains("too big for a QR code"), "{err}");
    let file = TempFile::new("too-big.png");
    assert!(matches!(write_png(&vec![0; 5000], &file.0), Err(QrImageError::PayloadTooBig { len: 5000 })));
    assert!(!file.0.exists());
}

/// Turns terminal text back into module colours (`true` = ink) and checks its shape.
fn terminal_to_ink(text: &str) -> Vec<Vec<bool>> {
    let lines: Vec<&str> = text.lines().collect();
    assert!(text.ends_with('\n'));
    let width = lines[0].chars().count();
    // Odd side length (4v + 17 + 2 * 4): the last line carries one module row.
    assert_eq!(width % 2, 1);
    assert_eq!(lines.len(), width.div_ceil(2), "square: width {width}");
    let mut rows = Vec::new();
    for line in &lines {
        assert_eq!(line.chars().count(), width, "every line equally wide");
        let (mut top, mut bottom) = (Vec::new(), Vec::new());
        for c in line.chars() {
            let (t, b) = match c {
                '█' => (true, true),
                '▀' => (true, false),
                '▄' => (false, true),
                ' ' => (false, false),
                other => panic!("unexpected character {other:?}"),
            };
            top.push(t);
            bottom.push(b);
        }
        rows.push(top);
        rows.push(bottom);
    }
    // The half row below the code is left to the terminal background.
    assert!(rows.pop().unwrap().iter().all(|&ink| !ink));
    assert_eq!(rows.len(), width);
    rows
}

/// What a camera would see: each module `px` pixels, inside a border of the terminal's
/// background colour.
fn terminal_photo(modules: &[Vec<bool>], ink: u8, background: u8) -> GrayImage {
    let px = 6;
    let border = 20;
    let side = modules.len() as u32 * px + 2 * border;
    GrayImage::from_fn(side, side, |x, y| {
        let inside = (border..side - border).contains(&x) && (border..side - border).contains(&y);
        if !inside {
            return Luma([background]);
        }
        let (mx, my) = (((x - border) / px) as usize, ((y - border) / px) as usize);
        Luma([if modules[my][mx] { ink } else { background }])
    })
}

#[test]
fn terminal_rendering_shape_and_readability() {
    for (label, bytes) in payloads() {
        // Dark terminal: ink is light.
        let text = render_terminal(&bytes).unwrap();
        assert_eq!(text, render_terminal_for(&bytes, TerminalBackground::Dark).unwrap());
        let modules = terminal_to_ink(&text);
        let n = modules.len();
        // The quiet zone is ink (light) on a dark terminal...
        let in_quiet_zone = |i: usize| i < QUIET_ZONE || i >= n - QUIET_ZONE;
        for (y, row) in modules.iter().enumerate() {
            for (x, &ink) in row.iter().enumerate() {
                if in_quiet_zone(x) || in_quiet_zone(y) {
                    assert!(ink, "{label}: quiet zone at ({x}, {y})");
                }
            }
        }
        // ...and the finder pattern's corner is dark, i.e. blank.
        assert!(!modules[QUIET_ZONE][QUIET_ZONE]);
        let photo = terminal_photo(&modules, 230, 20);
        assert_eq!(mxverify::qr_image::decode_luma(&photo).expect("dark terminal photo"), bytes, "{label}");

        // Light terminal: ink is dark, and the same code comes out.
        let light = render_terminal_for(&bytes, TerminalBackground::Light).unwrap();
        let modules_light = terminal_to_ink(&light);
        for (row_dark, row_light) in modules.iter().zip(&modules_light) {
            for (a, b) in row_dark.iter().zip(row_light) {
                assert_ne!(a, b, "{label}: exact inverse");
            }
        }
        let photo = terminal_photo(&modules_light, 20, 235);
        assert_eq!(mxverify::qr_image::decode_luma(&photo).expect("light terminal photo"), bytes, "{label}");
    }
}
