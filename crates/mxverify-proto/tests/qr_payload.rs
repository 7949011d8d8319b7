//! Known-answer and property tests of the QR payload codec
//! (spec v1.19 "QR code format"; vectors V7–V10 of `shared/spec/VECTORS.md`).

use base64::Engine as _;
use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::CompressedEdwardsY;
use curve25519_dalek::scalar::Scalar;
use mxverify_proto::qr::{QR_MIN_SECRET_LEN, QrDecodeError, QrKeyPosition, QrKeys, QrMode, QrPayload, QrSecret};
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit")).collect()
}

fn key(s: &str) -> [u8; 32] {
    hex(s).try_into().expect("32-byte key")
}

fn secret(bytes: &[u8]) -> QrSecret {
    QrSecret::from_bytes(bytes.to_vec())
}

fn b64_std(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).expect("vector base64")
}

fn is_point(k: &[u8; 32]) -> bool {
    CompressedEdwardsY(*k).decompress().is_some()
}

/// Decodes with the strict decoder and checks that re-encoding gives the same bytes.
fn decode_round_trip(bytes: &[u8]) -> QrPayload {
    let payload = QrPayload::decode(bytes).expect("vector decodes");
    assert_eq!(payload.encode(), bytes, "re-encoding differs");
    payload
}

// ---------------------------------------------------------------- V7: Element Android

const V7_KTE: &str = "92d1307143fab2ed7187e1ae13e098910dc7e96fc3225fb26c715d6843aba255";
const V7_TLX: &str = "4d796e64a4d92ef49158e4cf94ea8bab9df86c0fbf2b8ccb14a4aef5c18b41a5";
const V7_MODE0: &str = "4d41545249580200000d4d615472616e73616374696f6e92d1307143fab2ed7187e1ae13e098910dc7e96fc3225fb26c715d6843aba2554d796e64a4d92ef49158e4cf94ea8bab9df86c0fbf2b8ccb14a4aef5c18b41a53132333435363738";
const V7_MODE1: &str = "4d41545249580201000d4d615472616e73616374696f6e92d1307143fab2ed7187e1ae13e098910dc7e96fc3225fb26c715d6843aba2554d796e64a4d92ef49158e4cf94ea8bab9df86c0fbf2b8ccb14a4aef5c18b41a53132333435363738";
const V7_MODE2: &str = "4d41545249580202000d4d615472616e73616374696f6e4d796e64a4d92ef49158e4cf94ea8bab9df86c0fbf2b8ccb14a4aef5c18b41a592d1307143fab2ed7187e1ae13e098910dc7e96fc3225fb26c715d6843aba2553132333435363738";

#[test]
fn v7_keys_are_valid_ed25519_points() {
    // The V7 keys are real keys, so the strict decoder applies to all V7 vectors.
    assert!(is_point(&key(V7_KTE)));
    assert!(is_point(&key(V7_TLX)));
}

#[test]
fn v7_encode_all_modes() {
    let (kte, tlx) = (key(V7_KTE), key(V7_TLX));
    let s = || secret(b"12345678");
    let cases = [
        (QrPayload::other_user("MaTransaction", kte, tlx, s()).unwrap(), V7_MODE0),
        (QrPayload::self_trusted("MaTransaction", kte, tlx, s()).unwrap(), V7_MODE1),
        (QrPayload::self_untrusted("MaTransaction", tlx, kte, s()).unwrap(), V7_MODE2),
    ];
    for (payload, expected) in cases {
        let bytes = payload.encode();
        assert_eq!(bytes.len(), 95);
        assert_eq!(bytes, hex(expected), "{:?}", payload.mode());
    }
}

#[test]
fn v7_decode_all_modes_with_roles() {
    let (kte, tlx) = (key(V7_KTE), key(V7_TLX));

    let p0 = decode_round_trip(&hex(V7_MODE0));
    assert_eq!(p0.mode(), QrMode::OtherUser);
    assert_eq!(p0.flow_id(), "MaTransaction");
    assert_eq!((p0.key1(), p0.key2()), (&kte, &tlx));
    assert_eq!(p0.keys(), QrKeys::OtherUser { displayer_master_key: &kte, scanner_master_key: &tlx });
    assert_eq!(p0.displayer_master_key(), &kte);
    assert_eq!(p0.scanner_master_key(), Some(&tlx));
    assert_eq!(p0.scanner_device_key(), None);
    assert_eq!(p0.displayer_device_key(), None);
    assert_eq!(p0.secret().as_bytes(), b"12345678");
    assert_eq!(p0.secret().to_base64(), "MTIzNDU2Nzg");

    let p1 = decode_round_trip(&hex(V7_MODE1));
    assert_eq!(p1.mode(), QrMode::SelfTrusted);
    assert_eq!(p1.keys(), QrKeys::SelfTrusted { master_key: &kte, scanner_device_key: &tlx });
    assert_eq!(p1.displayer_master_key(), &kte);
    assert_eq!(p1.scanner_device_key(), Some(&tlx));
    assert_eq!(p1.scanner_master_key(), None);
    assert_eq!(p1.displayer_device_key(), None);

    let p2 = decode_round_trip(&hex(V7_MODE2));
    assert_eq!(p2.mode(), QrMode::SelfUntrusted);
    assert_eq!(p2.keys(), QrKeys::SelfUntrusted { displayer_device_key: &tlx, master_key: &kte });
    // In mode 0x02 the master key is the *second* key.
    assert_eq!(p2.displayer_master_key(), &kte);
    assert_eq!(p2.displayer_device_key(), Some(&tlx));
    assert_eq!(p2.scanner_master_key(), None);
    assert_eq!(p2.scanner_device_key(), None);
}

#[test]
fn v7_long_transaction_id_2000_bytes() {
    let flow_id = "PatternId_".repeat(200);
    assert_eq!(flow_id.len(), 2000);
    let payload = QrPayload::other_user(&*flow_id, key(V7_KTE), key(V7_TLX), secret(b"12345678")).unwrap();
    let bytes = payload.encode();
    assert_eq!(&bytes[8..10], &[0x07, 0xd0]);
    assert_eq!(&bytes[10..2010], flow_id.as_bytes());
    assert_eq!(bytes.len(), 10 + 2000 + 64 + 8);
    let decoded = decode_round_trip(&bytes);
    assert_eq!(decoded, payload);
    assert_eq!(decoded.flow_id(), flow_id);
}

#[test]
fn v7_rejects() {
    let good = hex(V7_MODE0);
    let with = |start: usize, end: usize, replacement: &[u8]| {
        let mut v = good[..start].to_vec();
        v.extend_from_slice(replacement);
        v.extend_from_slice(&good[end..]);
        v
    };

    // Prefix "MOTRIX", "MATRI", and no prefix at all.
    assert_eq!(QrPayload::decode(&with(0, 6, b"MOTRIX")), Err(QrDecodeError::WrongPrefix));
    assert_eq!(QrPayload::decode(&with(0, 6, b"MATRI")), Err(QrDecodeError::WrongPrefix));
    assert_eq!(QrPayload::decode(&with(0, 6, b"")), Err(QrDecodeError::WrongPrefix));

    // Version byte 00, 01, 03, or missing (the mode byte 00 then stands in its place).
    for version in [0x00, 0x01, 0x03] {
        assert_eq!(QrPayload::decode(&with(6, 7, &[version])), Err(QrDecodeError::UnsupportedVersion(version)));
    }
    assert_eq!(QrPayload::decode(&with(6, 7, b"")), Err(QrDecodeError::UnsupportedVersion(0x00)));

    // Secret "1234567" (7 bytes).
    assert_eq!(QrPayload::decode(&with(87, 95, b"1234567")), Err(QrDecodeError::SecretTooShort { len: 7 }));

    // Header alone, then header + flow id with no keys.
    assert_eq!(QrPayload::decode(&good[..10]), Err(QrDecodeError::TruncatedFlowId { declared: 13, available: 0 }));
    assert_eq!(QrPayload::decode(&good[..23]), Err(QrDecodeError::TruncatedKeys { available: 0 }));

    // Length 0x0e instead of 0x0d: the flow id swallows the first key byte (0x92, which
    // is not UTF-8 on its own) and the secret shrinks to 7 bytes. Element rejects it for
    // the secret; this decoder meets the non-UTF-8 flow id first.
    let long_len = with(9, 10, &[0x0e]);
    assert_eq!(QrPayload::decode(&long_len), Err(QrDecodeError::FlowIdNotUtf8));
    assert_eq!(QrPayload::decode_unchecked(&long_len), Err(QrDecodeError::FlowIdNotUtf8));
}

#[test]
fn v7_short_length_parses_structurally_but_keys_are_shifted() {
    // Length 0x0c instead of 0x0d: Element Android parses it (and the keys mismatch later).
    // Structurally it is fine here too; the strict decoder rejects it already, because
    // the shifted second key is not an Ed25519 point.
    let mut bytes = hex(V7_MODE0);
    bytes[9] = 0x0c;
    let p = QrPayload::decode_unchecked(&bytes).expect("structure is valid");
    assert_eq!(p.flow_id(), "MaTransactio");
    assert_ne!(p.key1(), &key(V7_KTE));
    assert_eq!(p.key1()[0], b'n');
    assert_eq!(p.secret().len(), 9);
    assert_eq!(p.encode(), bytes);
    assert_eq!(QrPayload::decode(&bytes), Err(QrDecodeError::InvalidKey(QrKeyPosition::Second)));
}

// ----------------------------------------------------------- V8: matrix-sdk-qrcode

const V8_KEY1: &str = "6b53202f92691e36cd2767f92311d88aa2f631051b36effca425801a0cd2e804";
const V8_KEY2: &str = "bd527cf86e07a41fb4cc330e4254e75b7efd87d03642df6f5676259b86aebc4d";

#[test]
fn v8_decode_then_reencode() {
    let cases = [
        (
            QrMode::SelfUntrusted,
            "FLOW_ID",
            "4d415452495802020007464c4f575f49446b53202f92691e36cd2767f92311d88aa2f631051b36effca425801a0cd2e804bd527cf86e07a41fb4cc330e4254e75b7efd87d03642df6f5676259b86aebc4d5348415245445f534543524554",
        ),
        (
            QrMode::OtherUser,
            "$test:localhost",
            "4d41545249580200000f24746573743a6c6f63616c686f73746b53202f92691e36cd2767f92311d88aa2f631051b36effca425801a0cd2e804bd527cf86e07a41fb4cc330e4254e75b7efd87d03642df6f5676259b86aebc4d5348415245445f534543524554",
        ),
        (
            QrMode::SelfTrusted,
            "FLOWID",
            "4d415452495802010006464c4f5749446b53202f92691e36cd2767f92311d88aa2f631051b36effca425801a0cd2e804bd527cf86e07a41fb4cc330e4254e75b7efd87d03642df6f5676259b86aebc4d5348415245445f534543524554",
        ),
        (
            QrMode::SelfUntrusted,
            "FLOWID",
            "4d415452495802020006464c4f5749446b53202f92691e36cd2767f92311d88aa2f631051b36effca425801a0cd2e804bd527cf86e07a41fb4cc330e4254e75b7efd87d03642df6f5676259b86aebc4d5348415245445f534543524554",
        ),
    ];
    for (mode, flow_id, payload_hex) in cases {
        let bytes = hex(payload_hex);
        let p = decode_round_trip(&bytes);
        assert_eq!(p.mode(), mode);
        assert_eq!(p.flow_id(), flow_id);
        assert_eq!(p.key1(), &key(V8_KEY1));
        assert_eq!(p.key2(), &key(V8_KEY2));
        assert_eq!(p.secret().as_bytes(), b"SHARED_SECRET");
        // And building the same fields gives the same bytes.
        let built = QrPayload::new(mode, flow_id, key(V8_KEY1), key(V8_KEY2), secret(b"SHARED_SECRET")).unwrap();
        assert_eq!(built, p);
        assert_eq!(built.encode(), bytes);
    }
}

#[test]
fn v8_negative_cases() {
    let ab_keys = |flow: &[u8], head: &[u8], secret: &[u8]| {
        let mut v = head.to_vec();
        v.extend_from_slice(flow);
        v.extend_from_slice(&[b'A'; 32]);
        v.extend_from_slice(&[b'B'; 32]);
        v.extend_from_slice(secret);
        v
    };

    assert_eq!(QrPayload::decode(b"NonMatrixCode"), Err(QrDecodeError::WrongPrefix));
    assert_eq!(QrPayload::decode(b"MATRIX\x02\x03"), Err(QrDecodeError::LoginMode(0x03)));
    assert_eq!(
        QrPayload::decode(b"MATRIX\x01\x03"),
        Err(QrDecodeError::UnsupportedVersion(0x01)),
        "version is checked before mode"
    );
    assert_eq!(QrPayload::decode(b"MATRIX\x02\x02"), Err(QrDecodeError::TruncatedHeader { len: 8 }));
    assert_eq!(
        QrPayload::decode(&ab_keys(b"FLOW_ID", b"MATRIX\x02\x02\x00\x07", b"SECRET")),
        Err(QrDecodeError::SecretTooShort { len: 6 })
    );
    // 32 x 'A' is not a curve point, so the first key is the one reported.
    assert!(!is_point(&[b'A'; 32]));
    assert_eq!(
        QrPayload::decode(&ab_keys(b"!test:localhost", b"MATRIX\x02\x00\x00\x0f", b"SECRETISLONGENOUGH")),
        Err(QrDecodeError::InvalidKey(QrKeyPosition::First))
    );
}

#[test]
fn modes_beyond_verification() {
    let base = hex(V7_MODE0);
    for mode in 0x03..=0xffu8 {
        let mut bytes = base.clone();
        bytes[7] = mode;
        let expected =
            if matches!(mode, 0x03 | 0x04) { QrDecodeError::LoginMode(mode) } else { QrDecodeError::UnknownMode(mode) };
        assert_eq!(QrPayload::decode(&bytes), Err(expected.clone()));
        assert_eq!(QrPayload::decode_unchecked(&bytes), Err(expected));
    }
}

#[test]
fn every_truncation_of_a_valid_payload_is_rejected_precisely() {
    let full = hex(V7_MODE0); // flow id 13 bytes, secret 8 bytes: 95 bytes.
    for n in 0..full.len() {
        let got = QrPayload::decode(&full[..n]);
        let expected = match n {
            0..=9 => QrDecodeError::TruncatedHeader { len: n },
            10..=22 => QrDecodeError::TruncatedFlowId { declared: 13, available: n - 10 },
            23..=86 => QrDecodeError::TruncatedKeys { available: n - 23 },
            _ => QrDecodeError::SecretTooShort { len: n - 87 },
        };
        assert_eq!(got, Err(expected), "prefix of {n} bytes");
    }
    assert!(QrPayload::decode(&full).is_ok());
}

#[test]
fn flow_id_not_utf8() {
    let mut bytes = hex(V7_MODE0);
    bytes[10] = 0xff;
    assert_eq!(QrPayload::decode(&bytes), Err(QrDecodeError::FlowIdNotUtf8));
}

#[test]
fn second_key_invalid_is_reported_as_second() {
    let mut bytes = hex(V7_MODE0);
    bytes[55..87].copy_from_slice(&[b'B'; 32]);
    assert!(!is_point(&[b'B'; 32]));
    assert_eq!(QrPayload::decode(&bytes), Err(QrDecodeError::InvalidKey(QrKeyPosition::Second)));
}

#[test]
fn constructors_apply_the_decoder_checks() {
    let (k1, k2) = (key(V8_KEY1), key(V8_KEY2));
    assert_eq!(QrPayload::other_user("f", k1, k2, secret(b"1234567")), Err(QrDecodeError::SecretTooShort { len: 7 }));
    assert_eq!(
        QrPayload::self_trusted("f", [b'A'; 32], k2, secret(b"12345678")),
        Err(QrDecodeError::InvalidKey(QrKeyPosition::First))
    );
    assert_eq!(
        QrPayload::self_untrusted("f", k1, [b'B'; 32], secret(b"12345678")),
        Err(QrDecodeError::InvalidKey(QrKeyPosition::Second))
    );

    // The largest flow id the u16 length can carry, and one byte more.
    let max = "x".repeat(usize::from(u16::MAX));
    let p = QrPayload::other_user(&*max, k1, k2, secret(b"12345678")).unwrap();
    let bytes = p.encode();
    assert_eq!(&bytes[8..10], &[0xff, 0xff]);
    assert_eq!(QrPayload::decode(&bytes).unwrap(), p);
    let too_long = "x".repeat(usize::from(u16::MAX) + 1);
    assert_eq!(
        QrPayload::other_user(too_long, k1, k2, secret(b"12345678")),
        Err(QrDecodeError::FlowIdTooLong { len: 65536 })
    );
}

#[test]
fn error_messages_are_specific() {
    assert_eq!(
        QrDecodeError::LoginMode(3).to_string(),
        "this is a Matrix QR login code (mode 0x03), not a key verification code"
    );
    assert_eq!(
        QrDecodeError::UnsupportedVersion(1).to_string(),
        "unsupported Matrix QR code version 0x01 (only 0x02 is supported)"
    );
    assert_eq!(
        QrDecodeError::InvalidKey(QrKeyPosition::Second).to_string(),
        "the second key in the QR payload is not a valid Ed25519 public key"
    );
}

// -------------------------------------------------------------- V9: mautrix-go

#[test]
fn v9_case1_decodes_strictly() {
    let bytes = b64_std(
        "TUFUUklYAgEAIGM1YjljNzE3ZWIzYjRmYzBiZDhhZjA0MDQ4NDY5MDdle4oLkpUdO1cTu5M3K3B4BlnpxtAbVgXCuQKOIqMmt+xAjVvaEXF39X0z5waRY9UE0b5PKiWvOBSJHEGkxX28Y2OEDLIWP/kCVUlyXXENlj0=",
    );
    let p = decode_round_trip(&bytes);
    assert_eq!(p.mode(), QrMode::SelfTrusted);
    assert_eq!(p.flow_id(), "c5b9c717eb3b4fc0bd8af0404846907e");
    assert_eq!(p.key1(), &key("7b8a0b92951d3b5713bb93372b70780659e9c6d01b5605c2b9028e22a326b7ec"));
    assert_eq!(p.key2(), &key("408d5bda117177f57d33e7069163d504d1be4f2a25af3814891c41a4c57dbc63"));
    assert_eq!(p.secret().as_bytes(), hex("63840cb2163ff9025549725d710d963d"));
}

#[test]
fn v9_case2_utf8_mangled_capture_is_rejected_strictly() {
    let bytes = b64_std(
        "TUFUUklYAgEAIEduQWVDdnRXanpNT1ZXUVRrdDM1WVJVcnVqbVJQYzhhGDJ8w4zCpsK1wqdQV2cZXsOvwqDCmMKdNsOtehAuGD5Ow4TDgUUMwq4ZeMKZBsKSwpTCjsK3WcKWwq3DvXBqEcK6wqkpw48NwrjCiGdbw7MBwrBjLsKlw7Ngw4IEw6NyfXwdwrbCusKBHsKZwrh/Cg==",
    );
    let key1 = key("18327cc38cc2a6c2b5c2a7505767195ec3afc2a0c298c29d36c3ad7a102e183e");
    let key2 = key("4ec384c381450cc2ae1978c29906c292c294c28ec2b759c296c2adc3bd706a11");

    // Structure as mautrix reads it.
    let p = QrPayload::decode_unchecked(&bytes).expect("structure is valid");
    assert_eq!(p.mode(), QrMode::SelfTrusted);
    assert_eq!(p.flow_id(), "GnAeCvtWjzMOVWQTkt35YRUrujmRPc8a");
    assert_eq!((p.key1(), p.key2()), (&key1, &key2));
    assert_eq!(p.secret().len(), 48);
    assert_eq!(p.secret().as_bytes(), &bytes[10 + 32 + 64..]);
    assert_eq!(p.encode(), bytes);

    // The strict decoder rejects it: the mangled first key happens to decompress (about
    // half of all 32-byte strings do), the second does not.
    assert!(is_point(&key1));
    assert!(!is_point(&key2));
    assert_eq!(QrPayload::decode(&bytes), Err(QrDecodeError::InvalidKey(QrKeyPosition::Second)));
}

// ------------------------------------------------------------- V10: spec example

#[test]
fn v10_spec_example_fragments() {
    assert_eq!(secret(&hex("2021222324252627")).to_base64(), "ICEiIyQlJic");
    assert_eq!(secret(&hex("0001020304050607")).to_base64(), "AAECAwQFBgc");
    assert_eq!(secret(&hex("1011121314151617")).to_base64(), "EBESExQVFhc");
    // The example's ID bytes spell "!ABCD", not "$ABCD" (errata QF-09).
    assert_eq!(&hex("2141424344"), b"!ABCD");
}

#[test]
fn v10_derived_payload() {
    let device_key = key("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
    let master_key = key("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c");
    let expected = hex(
        "4d41545249580200001e24313433323733353832343433506872536e3a6578616d706c652e6f7267d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c2021222324252627",
    );
    let p = QrPayload::other_user(
        "$143273582443PhrSn:example.org",
        device_key,
        master_key,
        secret(&hex("2021222324252627")),
    )
    .unwrap();
    assert_eq!(p.encode(), expected);
    let decoded = decode_round_trip(&expected);
    assert_eq!(decoded, p);
    assert_eq!(decoded.secret().to_base64(), "ICEiIyQlJic");
    assert_eq!(QrSecret::from_base64("ICEiIyQlJic").unwrap(), *decoded.secret());
}

// ------------------------------------------------------------------ secrets

#[test]
fn secret_generation_and_reciprocate_round_trip() {
    let mut calls = 0;
    let s = QrSecret::generate(|buf| {
        calls += 1;
        buf.copy_from_slice(&[0xa5; 16]);
    });
    assert_eq!(calls, 1);
    assert_eq!(s.len(), 16);
    assert!(s.len() >= QR_MIN_SECRET_LEN);
    let wire = s.to_base64();
    assert!(!wire.ends_with('='));
    assert_eq!(QrSecret::from_base64(&wire).unwrap(), s);
    assert!(!format!("{s:?}").contains("165"));
}

// --------------------------------------------------------------- properties

/// Valid Ed25519 keys: multiples of the base point, plus random encodings that happen
/// to decompress (these include small-order and mixed-order points).
fn valid_key() -> impl Strategy<Value = [u8; 32]> {
    prop_oneof![
        any::<[u8; 32]>()
            .prop_map(|b| { (ED25519_BASEPOINT_POINT * Scalar::from_bytes_mod_order(b)).compress().to_bytes() }),
        any::<[u8; 32]>().prop_filter("not a curve point", is_point),
    ]
}

fn mode() -> impl Strategy<Value = QrMode> {
    prop_oneof![Just(QrMode::OtherUser), Just(QrMode::SelfTrusted), Just(QrMode::SelfUntrusted),]
}

fn flow_id() -> impl Strategy<Value = String> {
    prop_oneof!["\\PC{0,64}", "\\$[A-Za-z0-9_-]{43}", "[A-Za-z0-9]{0,32}", ".{200,400}",]
}

proptest! {
    #[test]
    fn encode_decode_round_trip(
        mode in mode(),
        flow_id in flow_id(),
        key1 in valid_key(),
        key2 in valid_key(),
        secret_bytes in proptest::collection::vec(any::<u8>(), QR_MIN_SECRET_LEN..64),
    ) {
        let payload = QrPayload::new(mode, flow_id.clone(), key1, key2, QrSecret::from_bytes(secret_bytes.clone()))
            .expect("valid fields");
        let bytes = payload.encode();
        prop_assert_eq!(bytes.len(), 10 + flow_id.len() + 64 + secret_bytes.len());
        prop_assert_eq!(&bytes[..6], b"MATRIX");
        prop_assert_eq!(bytes[6], 0x02);
        prop_assert_eq!(bytes[7], mode.as_byte());
        let decoded = QrPayload::decode(&bytes).expect("own encoding decodes");
        prop_assert_eq!(&decoded, &payload);
        prop_assert_eq!(decoded.flow_id(), flow_id.as_str());
        prop_assert_eq!(decoded.secret().as_bytes(), secret_bytes.as_slice());
        prop_assert_eq!(decoded.encode(), bytes);
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let strict = QrPayload::decode(&bytes);
        let loose = QrPayload::decode_unchecked(&bytes);
        // Whatever parses re-encodes to the input, and strict success implies loose success.
        if let Ok(p) = &loose {
            prop_assert_eq!(p.encode(), bytes.clone());
        }
        if let Ok(p) = &strict {
            prop_assert_eq!(Some(p), loose.as_ref().ok());
        }
    }

    #[test]
    fn decode_never_panics_behind_a_valid_header(
        mode_byte in 0u8..6,
        len in any::<u16>(),
        tail in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut bytes = b"MATRIX\x02".to_vec();
        bytes.push(mode_byte);
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&tail);
        if let Ok(p) = QrPayload::decode_unchecked(&bytes) {
            prop_assert_eq!(p.encode(), bytes.clone());
        }
        let _ = QrPayload::decode(&bytes);
    }
}
