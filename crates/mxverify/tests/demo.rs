//! `mxverify demo`: every scenario ends the way it says, in both transports and both output modes.

use std::process::Command;

use mxverify::demo::{self, DemoMethod, DemoOptions, Scenario, Transport};
use mxverify::output::Ending;
use serde_json::Value;

fn run(scenario: Scenario, transport: Transport, json: bool) -> (Ending, String) {
    run_with(DemoOptions {
        scenario,
        transport,
        json,
        seed: Some(11),
        method: DemoMethod::Sas,
        qr_png: None,
        lang: None,
    })
}

fn run_with(opts: DemoOptions) -> (Ending, String) {
    let mut out = Vec::new();
    let ending = demo::run(opts, &mut out).unwrap();
    (ending, String::from_utf8(out).unwrap())
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect()
}

const CASES: [(Scenario, Ending, Option<&str>); 8] = [
    (Scenario::Verify, Ending::Verified, None),
    (Scenario::Mismatch, Ending::Cancelled, Some("m.mismatched_sas")),
    (Scenario::Timeout, Ending::TimedOut, Some("m.timeout")),
    (Scenario::WrongCommitment, Ending::Cancelled, Some("m.mismatched_commitment")),
    (Scenario::WrongMac, Ending::Cancelled, Some("m.key_mismatch")),
    (Scenario::UnknownMethod, Ending::Cancelled, Some("m.unknown_method")),
    (Scenario::Cancel, Ending::Cancelled, Some("m.user")),
    (Scenario::Reject, Ending::Cancelled, Some("m.user")),
];

#[test]
fn every_scenario_ends_with_its_cancel_on_both_sides() {
    for transport in [Transport::ToDevice, Transport::Room] {
        for (scenario, ending, code) in CASES {
            let (got, out) = run(scenario, transport, true);
            assert_eq!(got, ending, "{scenario:?} {transport:?}\n{out}");
            let lines: Vec<Value> =
                out.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
            let of = |event: &str| lines.iter().filter(|l| l["event"] == event).collect::<Vec<_>>();
            match code {
                None => {
                    let done = of("done");
                    assert_eq!(done.len(), 2, "{scenario:?}");
                    assert!(of("cancelled").is_empty());
                    for d in done {
                        assert_eq!(d["keys"].as_array().unwrap().len(), 2, "device and master key");
                    }
                }
                Some(code) => {
                    let cancelled = of("cancelled");
                    assert_eq!(cancelled.len(), 2, "{scenario:?}: both sides see the end\n{out}");
                    for c in &cancelled {
                        assert_eq!(c["code"], code, "{scenario:?}");
                        assert!(c["explanation"].as_str().unwrap().contains(code));
                    }
                    assert!(of("done").is_empty(), "nothing trusted");
                }
            }
            // Where both saw a SAS, they saw the same one (the demo's channel is honest).
            let sas = of("sas");
            if sas.len() == 2 {
                assert_eq!(sas[0]["emoji"], sas[1]["emoji"]);
                assert_eq!(sas[0]["decimals"], sas[1]["decimals"]);
            }
            assert_eq!(lines.last().unwrap()["event"], "exit");
            assert_eq!(lines.last().unwrap()["code"], ending as i32);
        }
    }
}

#[test]
fn human_output_shows_emoji_side_by_side_and_a_sentence_at_the_end() {
    let (_, out) = run(Scenario::Verify, Transport::Room, false);
    assert!(out.contains("Compare — both screens now show:"), "{out}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.starts_with("  ") && l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit()) && l.len() > 30
        })
        .collect();
    assert!(rows.len() >= 7, "{out}");
    assert!(out.contains("✔ Alice: verified @bob:example.org — the key of device BOBPHONE"), "{out}");
    assert!(out.contains("✔ Bob: verified @alice:example.org — the key of device ALICELAPTOP"), "{out}");
    let (_, out) = run(Scenario::WrongCommitment, Transport::ToDevice, false);
    assert!(out.contains("⚠ altered in transit"));
    assert!(out.contains("✘ Alice: This device cancelled the verification (m.mismatched_commitment)"), "{out}");
    assert!(out.contains("✘ Bob: The other side cancelled the verification (m.mismatched_commitment)"), "{out}");
}

#[test]
fn the_program_exit_code_says_how_it_ended() {
    let exe = env!("CARGO_BIN_EXE_mxverify");
    for (args, code) in [
        (vec!["demo"], 0),
        (vec!["demo", "--scenario", "mismatch"], 3),
        (vec!["demo", "--scenario", "timeout", "--transport", "room"], 4),
        (vec!["--json", "demo", "--scenario", "reject"], 3),
        (vec!["demo", "--scenario", "no-such-thing"], 2),
    ] {
        let out = Command::new(exe).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn random_keys_without_a_seed() {
    let mut a = Vec::new();
    let mut b = Vec::new();
    let opts = DemoOptions {
        scenario: Scenario::Verify,
        transport: Transport::ToDevice,
        json: true,
        seed: None,
        method: DemoMethod::Sas,
        qr_png: None,
        lang: None,
    };
    demo::run(opts.clone(), &mut a).unwrap();
    demo::run(opts, &mut b).unwrap();
    assert_ne!(a, b, "two runs without --seed use different keys");
}

#[test]
fn qr_demo_scenarios() {
    let cases = [
        (Scenario::Verify, Ending::Verified, None),
        (Scenario::Mismatch, Ending::Cancelled, Some("m.key_mismatch")),
        (Scenario::Timeout, Ending::TimedOut, Some("m.timeout")),
        (Scenario::Cancel, Ending::Cancelled, Some("m.user")),
        (Scenario::Reject, Ending::Cancelled, Some("m.user")),
    ];
    for transport in [Transport::ToDevice, Transport::Room] {
        for (scenario, ending, code) in cases {
            let opts = DemoOptions {
                scenario,
                transport,
                json: true,
                seed: Some(3),
                method: DemoMethod::Qr,
                qr_png: None,
                lang: None,
            };
            let (got, out) = run_with(opts);
            assert_eq!(got, ending, "{scenario:?}\n{out}");
            let lines = json_lines(&out);
            let of = |e: &str| lines.iter().filter(|l| l["event"] == e).cloned().collect::<Vec<_>>();
            assert!(of("sas").is_empty(), "no emoji in a QR verification");
            match code {
                None => {
                    assert_eq!(of("qr_scanned").len(), 1);
                    let done = of("done");
                    assert_eq!(done.len(), 2);
                    for d in done {
                        assert_eq!(d["keys"][0]["kind"], "master_key", "mode 0x00 verifies master keys");
                    }
                }
                Some(code) => {
                    assert!(of("done").is_empty());
                    assert!(of("cancelled").iter().all(|c| c["code"] == code), "{out}");
                    assert_eq!(of("cancelled").len(), 2);
                }
            }
        }
    }
}

#[test]
fn qr_demo_draws_a_code_that_reads_back() {
    let dir = std::env::temp_dir().join(format!("mxverify-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("code.png");
    let opts = DemoOptions {
        scenario: Scenario::Verify,
        transport: Transport::Room,
        json: true,
        seed: Some(4),
        method: DemoMethod::Qr,
        qr_png: Some(png.clone()),
        lang: None,
    };
    let (_, out) = run_with(opts.clone());
    let shown = json_lines(&out)
        .into_iter()
        .find(|l| l["event"] == "qr" && l["local_device"] == "ALICELAPTOP")
        .expect("Alice shows a code");
    let from_picture = mxverify::qr_image::decode_image(&png).unwrap();
    assert_eq!(mxverify_proto::b64::encode(&from_picture), shown["payload"].as_str().unwrap());
    // Human mode draws it in the terminal with block characters.
    let (_, human) = run_with(DemoOptions { json: false, ..opts });
    assert!(human.lines().filter(|l| l.contains('█')).count() > 20, "{human}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn qr_tool_decodes_and_draws() {
    let exe = env!("CARGO_BIN_EXE_mxverify");
    // The V10 payload from VECTORS.md (mode 0x00, in-room flow id).
    let hex = "4d41545249580200001e24313433323733353832343433506872536e3a6578616d706c652e6f7267d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c2021222324252627";
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    let b64 = mxverify_proto::b64::encode(&bytes);
    let out = Command::new(exe).args(["--json", "qr", "decode", "--base64", &b64]).output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["flow_id"], "$143273582443PhrSn:example.org");
    assert_eq!(v["key1"], "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo");
    assert_eq!(v["secret"], "ICEiIyQlJic");
    // Drawn to a PNG, then read back from the picture.
    let dir = std::env::temp_dir().join(format!("mxverify-qrtool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("v10.png");
    let out = Command::new(exe).args(["qr", "show", &b64, "--png", png.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains('█'));
    let out = Command::new(exe).args(["qr", "decode", png.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0x00: verifying another user") && text.contains("$143273582443PhrSn:example.org"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
    // Bad input: a clear message and exit code 1, never a panic.
    for args in [
        vec!["qr", "decode", "--base64", "!!"],
        vec!["qr", "decode", "--base64", "TUFUUklY"],
        vec!["qr", "decode", "/no/such/file.png"],
    ] {
        let out = Command::new(exe).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("mxverify: ") && !err.contains("panicked"), "{err}");
    }
    let out = Command::new(exe).args(["demo", "--method", "qr", "--scenario", "wrong-mac"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn emoji_names_in_the_users_language() {
    let opts = |json| DemoOptions {
        scenario: Scenario::Verify,
        transport: Transport::ToDevice,
        json,
        seed: Some(11),
        method: DemoMethod::Sas,
        qr_png: None,
        lang: Some("de".into()),
    };
    let (_, out) = run_with(opts(true));
    let sas = json_lines(&out).into_iter().find(|l| l["event"] == "sas").unwrap();
    let emoji = sas["emoji"].as_array().unwrap();
    for e in emoji {
        let index = e["index"].as_u64().unwrap() as u8;
        let entry = mxverify_proto::emoji::emoji(index);
        assert_eq!(e["name"], entry.description, "the stable English name stays");
        assert_eq!(e["name_local"], entry.name_or_english("de"));
    }
    assert!(emoji.iter().any(|e| e["name"] != e["name_local"]), "at least one is translated: {sas}");
    // Human mode shows the German names.
    let (_, human) = run_with(opts(false));
    let first = emoji[0]["name_local"].as_str().unwrap();
    assert!(human.contains(first), "{human}");
    // The language comes from --lang, else the locale; English and C mean no translation.
    assert_eq!(mxverify::output::language(Some("de_DE.UTF-8")).as_deref(), Some("de_DE"));
    assert_eq!(mxverify::output::language(Some("pt_BR@x")).as_deref(), Some("pt_BR"));
    assert_eq!(mxverify::output::language(Some("C")), None);
    assert_eq!(mxverify::output::language(Some("en_GB.UTF-8")), None);
}
