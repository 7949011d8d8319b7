//! Drawing and reading verification QR codes: terminal text, PNG files, and decoding a
//! photo or screenshot (PNG or JPEG) back to the raw payload bytes.
//!
//! The payload itself (what the bytes mean) is [`mxverify_proto::qr::QrPayload`]. The spec
//! requires the QR code to hold the payload as **one byte-mode segment** (ISO/IEC
//! 18004:2015); this module never lets an encoder optimiser split it into numeric or
//! alphanumeric runs, and decoding returns the segment's bytes as they are (no text
//! conversion, which would corrupt the binary keys).
//! Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).

use std::io;
use std::path::{Path, PathBuf};

use image::{GrayImage, ImageFormat, Luma};
use qrcode::bits::Bits;
use qrcode::{Color, EcLevel, QrCode, Version};

/// Width of the light border drawn around the code, in modules (ISO/IEC 18004 asks for 4).
pub const QUIET_ZONE: usize = 4;

/// Pixels per module in [`write_png`].
pub const PNG_SCALE: u32 = 8;

/// The largest payload one byte-mode segment can carry (version 40, error correction L).
pub const MAX_PAYLOAD_LEN: usize = 2953;

/// Why a QR code could not be drawn, written or read.
#[derive(Debug, thiserror::Error)]
pub enum QrImageError {
    /// The payload does not fit a QR code, even at version 40 with the lowest error
    /// correction.
    #[error(
        "the payload is {len} bytes, too big for a QR code (at most {MAX_PAYLOAD_LEN} bytes in one byte-mode segment)"
    )]
    PayloadTooBig {
        /// Payload length in bytes.
        len: usize,
    },
    /// The QR encoder failed for another reason.
    #[error("could not build the QR code: {0}")]
    Encode(#[source] qrcode::types::QrError),
    /// The picture file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The PNG file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The encoder or I/O error.
        source: image::ImageError,
    },
    /// The file is not a PNG or JPEG picture this program can decode.
    #[error("unreadable image (only PNG and JPEG are supported): {0}")]
    UnreadableImage(#[source] image::ImageError),
    /// The picture contains nothing that looks like a QR code.
    #[error("no QR code found in the picture; make sure the whole code, with its white border, is in the frame")]
    NoQrCode,
    /// Something like a QR code was found but its content could not be read.
    #[error("a QR code was found but could not be read ({0}); try a sharper, straighter, evenly lit picture")]
    Undecodable(#[source] rqrr::DeQRError),
}

/// Which terminal background [`render_terminal_for`] draws for.
///
/// A terminal can only draw "ink" (the foreground colour, with the block characters)
/// on its background. A QR code must be dark modules on a light field, so the light
/// modules and the quiet zone are drawn as ink on a dark terminal, and the dark modules
/// on a light one. A code drawn for the wrong background comes out inverted (light on
/// dark), which many phone scanners cannot read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TerminalBackground {
    /// Light text on a dark background (the default of most terminals): light modules
    /// and the quiet zone are drawn as blocks, dark modules are left blank.
    #[default]
    Dark,
    /// Dark text on a light background: dark modules are drawn as blocks, light modules
    /// and the quiet zone are left blank.
    Light,
}

/// The QR code as Unicode half blocks (`▀ ▄ █` and space), two module rows per text line,
/// with a [`QUIET_ZONE`]-module border, for a terminal with a dark background (see
/// [`TerminalBackground`]; use [`render_terminal_for`] for light terminals).
///
/// Every line (ending in `\n`) is as wide as the code plus its border, `N + 8`
/// characters; there are `ceil((N + 8) / 2)` lines, `N` being the module count of a side.
pub fn render_terminal(payload: &[u8]) -> Result<String, QrImageError> {
    render_terminal_for(payload, TerminalBackground::Dark)
}

/// [`render_terminal`] for a chosen terminal background.
pub fn render_terminal_for(payload: &[u8], background: TerminalBackground) -> Result<String, QrImageError> {
    let grid = ModuleGrid::new(payload)?;
    let size = grid.size();
    // Ink is what the terminal draws in its foreground colour.
    let ink = |x: usize, y: usize| -> bool {
        if y >= size {
            // Below the last module row: the terminal's own background.
            return false;
        }
        match background {
            TerminalBackground::Dark => !grid.is_dark(x, y),
            TerminalBackground::Light => grid.is_dark(x, y),
        }
    };
    let mut out = String::with_capacity(size.div_ceil(2) * (size * 3 + 1));
    for y in (0..size).step_by(2) {
        for x in 0..size {
            out.push(match (ink(x, y), ink(x, y + 1)) {
                (true, true) => '█',
                (true, false) => '▀',
                (false, true) => '▄',
                (false, false) => ' ',
            });
        }
        out.push('\n');
    }
    Ok(out)
}

/// The QR code as a greyscale picture: black modules on white, `scale` pixels per
/// module, with a [`QUIET_ZONE`]-module white border.
pub fn render_image(payload: &[u8], scale: u32) -> Result<GrayImage, QrImageError> {
    let grid = ModuleGrid::new(payload)?;
    let scale = scale.max(1);
    let side = u32::try_from(grid.size()).expect("a QR code is at most 185 modules wide") * scale;
    Ok(GrayImage::from_fn(side, side, |x, y| {
        let dark = grid.is_dark((x / scale) as usize, (y / scale) as usize);
        Luma([if dark { 0 } else { 255 }])
    }))
}

/// Writes the QR code as a PNG file, [`PNG_SCALE`] pixels per module, with a
/// [`QUIET_ZONE`]-module white border.
///
/// A verification code holds a secret for the length of the flow, so the file is created
/// owner-only (0600 on Unix) before anything is written to it, and an existing file's
/// permissions are narrowed the same way.
pub fn write_png(payload: &[u8], path: &Path) -> Result<(), QrImageError> {
    let picture = render_image(payload, PNG_SCALE)?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    picture
        .write_to(&mut bytes, ImageFormat::Png)
        .map_err(|source| QrImageError::Write { path: path.to_owned(), source })?;
    let io = |e: std::io::Error| QrImageError::Write { path: path.to_owned(), source: image::ImageError::IoError(e) };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let mut file = options.open(path).map_err(io)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        std::io::Write::write_all(&mut file, bytes.get_ref()).map_err(io)?;
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path).map_err(io)?;
        std::io::Write::write_all(&mut file, bytes.get_ref()).map_err(io)?;
    }
    Ok(())
}

/// Reads a PNG or JPEG file and returns the raw bytes of the first readable QR code in
/// it (feed them to [`mxverify_proto::qr::QrPayload::decode`]).
pub fn decode_image(path: &Path) -> Result<Vec<u8>, QrImageError> {
    let data = std::fs::read(path).map_err(|source| QrImageError::Read { path: path.to_owned(), source })?;
    decode_image_bytes(&data)
}

/// [`decode_image`] for a picture already in memory (PNG or JPEG file contents).
pub fn decode_image_bytes(data: &[u8]) -> Result<Vec<u8>, QrImageError> {
    let picture = image::load_from_memory(data).map_err(QrImageError::UnreadableImage)?;
    decode_luma(&picture.to_luma8())
}

/// Finds and reads the first QR code in a greyscale picture; returns its raw bytes.
pub fn decode_luma(picture: &GrayImage) -> Result<Vec<u8>, QrImageError> {
    let (w, h) = (picture.width() as usize, picture.height() as usize);
    let mut prepared =
        rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| picture.get_pixel(x as u32, y as u32).0[0]);
    let mut last_error = None;
    for grid in prepared.detect_grids() {
        // `decode_to` hands out the segment bytes untouched; `decode` would insist on
        // UTF-8, which a binary payload is not.
        let mut bytes = Vec::new();
        match grid.decode_to(&mut bytes) {
            Ok(_) => return Ok(bytes),
            Err(e) => last_error = Some(e),
        }
    }
    Err(match last_error {
        Some(e) => QrImageError::Undecodable(e),
        None => QrImageError::NoQrCode,
    })
}

/// The modules of a code plus its quiet zone.
struct ModuleGrid {
    code: QrCode,
}

impl ModuleGrid {
    fn new(payload: &[u8]) -> Result<ModuleGrid, QrImageError> {
        Ok(ModuleGrid { code: encode_byte_mode(payload)? })
    }

    /// Side length including the quiet zone on both sides.
    fn size(&self) -> usize {
        self.code.width() + 2 * QUIET_ZONE
    }

    /// Whether the module at (x, y), in quiet-zone coordinates, is dark.
    fn is_dark(&self, x: usize, y: usize) -> bool {
        let width = self.code.width();
        let (Some(x), Some(y)) = (x.checked_sub(QUIET_ZONE), y.checked_sub(QUIET_ZONE)) else {
            return false;
        };
        x < width && y < width && self.code[(x, y)] == Color::Dark
    }
}

/// Error correction used when the payload fits: M recovers about 15 % damage, which
/// helps with screen glare and terminal line gaps; larger payloads fall back to L.
const EC_LEVELS: [EcLevel; 2] = [EcLevel::M, EcLevel::L];

/// The smallest QR code holding `payload` as exactly one byte-mode segment.
fn encode_byte_mode(payload: &[u8]) -> Result<QrCode, QrImageError> {
    let (bits, ec) = byte_mode_bits(payload)?;
    QrCode::with_bits(bits, ec).map_err(QrImageError::Encode)
}

/// The data bit stream: mode indicator `0100`, character count, the payload bytes, then
/// terminator and padding. Building it by hand (instead of `QrCode::new`) keeps the
/// encoder's segment optimiser from switching to numeric or alphanumeric mode for runs
/// such as `MATRIX` or a digit-only secret.
fn byte_mode_bits(payload: &[u8]) -> Result<(Bits, EcLevel), QrImageError> {
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(QrImageError::PayloadTooBig { len: payload.len() });
    }
    for ec in EC_LEVELS {
        for version in 1..=40 {
            let mut bits = Bits::new(Version::Normal(version));
            let fits = bits.push_byte_data(payload).and_then(|()| bits.push_terminator(ec));
            match fits {
                Ok(()) => return Ok((bits, ec)),
                Err(qrcode::types::QrError::DataTooLong) => continue,
                Err(e) => return Err(QrImageError::Encode(e)),
            }
        }
    }
    Err(QrImageError::PayloadTooBig { len: payload.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `n` bits, most significant first, from a byte stream.
    struct BitReader<'a> {
        bytes: &'a [u8],
        pos: usize,
    }

    impl BitReader<'_> {
        fn take(&mut self, n: usize) -> usize {
            let mut v = 0;
            for _ in 0..n {
                let bit = (self.bytes[self.pos / 8] >> (7 - self.pos % 8)) & 1;
                v = (v << 1) | usize::from(bit);
                self.pos += 1;
            }
            v
        }
    }

    /// The bit stream is one byte segment holding the payload, then only the terminator
    /// and padding, even for inputs the optimiser would split (`MATRIX`, digit runs).
    #[test]
    fn bit_stream_is_one_byte_segment() {
        let mut payload = b"MATRIX\x02\x00\x00\x0dMaTransaction".to_vec();
        payload.extend_from_slice(&[0x41; 64]);
        payload.extend_from_slice(b"12345678901234567890");
        for p in [payload.clone(), vec![b'7'; 300], vec![0u8; 1000]] {
            let (bits, _ec) = byte_mode_bits(&p).unwrap();
            let Version::Normal(version) = bits.version() else { panic!("micro QR") };
            let bytes = bits.into_bytes();
            let mut r = BitReader { bytes: &bytes, pos: 0 };
            assert_eq!(r.take(4), 0b0100, "byte mode indicator");
            let count_bits = if version <= 9 { 8 } else { 16 };
            assert_eq!(r.take(count_bits), p.len(), "character count");
            for &b in &p {
                assert_eq!(r.take(8), usize::from(b));
            }
            // What follows is at most a 4-bit terminator, zero bits to the byte
            // boundary, then the pad bytes 0xEC 0x11 alternating: no second segment.
            let remaining = bytes.len() * 8 - r.pos;
            let term = remaining.min(4);
            assert_eq!(r.take(term), 0, "terminator");
            let to_boundary = (8 - r.pos % 8) % 8;
            assert_eq!(r.take(to_boundary), 0);
            let mut pad = [0xECu8, 0x11].iter().cycle();
            while r.pos < bytes.len() * 8 {
                assert_eq!(r.take(8), usize::from(*pad.next().unwrap()));
            }
        }
    }

    #[test]
    fn capacity_limit() {
        assert!(byte_mode_bits(&vec![0; MAX_PAYLOAD_LEN]).is_ok());
        assert!(matches!(
            byte_mode_bits(&vec![0; MAX_PAYLOAD_LEN + 1]),
            Err(QrImageError::PayloadTooBig { len: 2954 })
        ));
    }
}
