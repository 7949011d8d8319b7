//! `mxverify demo`: every scenario ends the way it says, in both transports and both output modes.

use std::process::Command;

use mxverify::demo::{self, DemoOptions, Scenario, Transport};
use mxverify::output::Ending;
use serde_json::Value;

fn run(scenario: Scenario, transport: Transport, json: bool) -> (Ending, String) {
    let mut out = Vec::new();
    let ending = demo::run(
        DemoOptions {
            scenario,
            transport,
            json,
            seed: Some(11),
        },
        &mut out,
    )
    .unwrap();
    (ending, String::from_utf8(out).unwrap())
}

const CASES: [(Scenario, Ending, Option<&str>); 8] = [
    (Scenario::Verify, Ending::Verified, None),
    (
        Scenario::Mismatch,
        Ending::Cancelled,
        Some("m.mismatched_sas"),
    ),
    (Scenario::Timeout, Ending::TimedOut, Some("m.timeout")),
    (
        Scenario::WrongCommitment,
        Ending::Cancelled,
        Some("m.mismatched_commitment"),
    ),
    (
        Scenario::WrongMac,
        Ending::Cancelled,
        Some("m.key_mismatch"),
    ),
    (
        Scenario::UnknownMethod,
        Ending::Cancelled,
        Some("m.unknown_method"),
    ),
    (Scenario::Cancel, Ending::Cancelled, Some("m.user")),
    (Scenario::Reject, Ending::Cancelled, Some("m.user")),
];

#[test]
fn every_scenario_ends_with_its_cancel_on_both_sides() {
    for transport in [Transport::ToDevice, Transport::Room] {
        for (scenario, ending, code) in CASES {
            let (got, out) = run(scenario, transport, true);
            assert_eq!(got, ending, "{scenario:?} {transport:?}\n{out}");
            let lines: Vec<Value> = out
                .lines()
                .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
                .collect();
            let of = |event: &str| {
                lines
                    .iter()
                    .filter(|l| l["event"] == event)
                    .collect::<Vec<_>>()
            };
            match code {
                None => {
                    let done = of("done");
                    assert_eq!(done.len(), 2, "{scenario:?}");
                    assert!(of("cancelled").is_empty());
                    for d in done {
                        assert_eq!(
                            d["keys"].as_array().unwrap().len(),
                            2,
                            "device and master key"
                        );
                    }
                }
                Some(code) => {
                    let cancelled = of("cancelled");
                    assert_eq!(
                        cancelled.len(),
                        2,
                        "{scenario:?}: both sides see the end\n{out}"
                    );
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
            l.starts_with("  ")
                && l.trim_start()
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
                && l.len() > 30
        })
        .collect();
    assert!(rows.len() >= 7, "{out}");
    assert!(out.contains("✔ Alice: verified @bob:example.org's device BOBPHONE"));
    assert!(out.contains("✔ Bob: verified @alice:example.org's device ALICELAPTOP"));
    let (_, out) = run(Scenario::WrongCommitment, Transport::ToDevice, false);
    assert!(out.contains("⚠ altered in transit"));
    assert!(
        out.contains("✘ Alice: This device cancelled the verification (m.mismatched_commitment)"),
        "{out}"
    );
    assert!(
        out.contains("✘ Bob: The other side cancelled the verification (m.mismatched_commitment)"),
        "{out}"
    );
}

#[test]
fn the_program_exit_code_says_how_it_ended() {
    let exe = env!("CARGO_BIN_EXE_mxverify");
    for (args, code) in [
        (vec!["demo"], 0),
        (vec!["demo", "--scenario", "mismatch"], 3),
        (
            vec!["demo", "--scenario", "timeout", "--transport", "room"],
            4,
        ),
        (vec!["--json", "demo", "--scenario", "reject"], 3),
        (vec!["demo", "--scenario", "no-such-thing"], 2),
    ] {
        let out = Command::new(exe).args(&args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
    };
    demo::run(opts.clone(), &mut a).unwrap();
    demo::run(opts, &mut b).unwrap();
    assert_ne!(a, b, "two runs without --seed use different keys");
}
