//! `mxverify demo`: two devices verify each other through an in-memory homeserver, showing what a
//! person sees on each side; `--scenario` walks through the ways it can fail.

use std::io::{self, Write};

use mxverify_proto::loopback::{InFlight, Loopback, Side};
use mxverify_proto::wire::Method;
use mxverify_proto::{
    CancelCode, Config, Ed25519PublicKey, Entropy, Event, FlowKey, KeyKind, Machine, OwnIdentity, SeededEntropy,
};
use serde_json::{Value, json};

use crate::output::{self, Ending};
use mxverify_client::device::OsEntropy;

/// The stories the demo can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Both people see the same emoji and confirm: verified.
    Verify,
    /// Bob says the emoji differ: `m.mismatched_sas`.
    Mismatch,
    /// Bob never compares; ten minutes pass: `m.timeout`.
    Timeout,
    /// The accept's commitment is altered in transit: `m.mismatched_commitment`.
    WrongCommitment,
    /// A MAC is altered in transit: `m.key_mismatch`.
    WrongMac,
    /// The start names a method Bob's device does not know: `m.unknown_method`.
    UnknownMethod,
    /// Bob cancels while the emoji are shown: `m.user`.
    Cancel,
    /// Bob declines the request: `m.user`.
    Reject,
}

/// Which verification method the demo shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoMethod {
    /// Compare emoji (or numbers).
    Sas,
    /// Bob's phone scans a QR code on Alice's laptop.
    Qr,
}

/// How the two devices talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// To-device messages.
    ToDevice,
    /// Events in a room both users are in.
    Room,
}

/// Options of `mxverify demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Which story.
    pub scenario: Scenario,
    /// Which transport.
    pub transport: Transport,
    /// One JSON object per line instead of text.
    pub json: bool,
    /// Deterministic keys (for reproducible output); random otherwise.
    pub seed: Option<u64>,
    /// SAS or QR.
    pub method: DemoMethod,
    /// Also write the QR code shown to this PNG file.
    pub qr_png: Option<std::path::PathBuf>,
    /// The language of the emoji names (see [`output::language`]); English if `None`.
    pub lang: Option<String>,
}

impl DemoOptions {
    /// Whether this scenario can be told with this method.
    pub fn check(&self) -> Result<(), String> {
        let sas_only =
            matches!(self.scenario, Scenario::WrongCommitment | Scenario::WrongMac | Scenario::UnknownMethod);
        if self.method == DemoMethod::Qr && sas_only {
            return Err(format!("the scenario {:?} is about SAS; use it without --method qr", self.scenario));
        }
        Ok(())
    }
}

const ROOM: &str = "!demo:example.org";
const START_MS: u64 = 1_800_000_000_000;

struct Person {
    name: &'static str,
    user: &'static str,
    device: &'static str,
}

const PEOPLE: [Person; 2] = [
    Person { name: "Alice", user: "@alice:example.org", device: "ALICELAPTOP" },
    Person { name: "Bob", user: "@bob:example.org", device: "BOBPHONE" },
];

fn person(side: Side) -> &'static Person {
    &PEOPLE[side as usize]
}

fn identity(p: &Person, entropy: &mut dyn Entropy) -> OwnIdentity {
    let key = |e: &mut dyn Entropy| {
        let mut seed = [0u8; 32];
        e.fill(&mut seed);
        Ed25519PublicKey::from_bytes(*vodozemac::Ed25519SecretKey::from_slice(&seed).public_key().as_bytes())
    };
    OwnIdentity {
        user_id: p.user.into(),
        device_id: p.device.into(),
        ed25519: key(entropy),
        master_key: Some(key(entropy)),
        trusts_master_key: true,
    }
}

fn entropy(seed: Option<u64>, n: u64) -> Box<dyn Entropy + Send> {
    match seed {
        Some(s) => Box::new(SeededEntropy::new(s.wrapping_mul(2).wrapping_add(n))),
        None => Box::new(OsEntropy),
    }
}

struct Demo<'a> {
    opts: DemoOptions,
    out: &'a mut dyn Write,
    net: Loopback,
    seen: usize,
    flows: [Option<FlowKey>; 2],
    sas_shown: [Option<Event>; 2],
    compared: bool,
    scanned: bool,
    ended: [Option<Event>; 2],
}

/// Runs the demo, writing to `out`; returns how it ended.
pub fn run(opts: DemoOptions, out: &mut dyn Write) -> io::Result<Ending> {
    let mut e = entropy(opts.seed, 0);
    let (ia, ib) = (identity(&PEOPLE[0], e.as_mut()), identity(&PEOPLE[1], e.as_mut()));
    let config = match opts.method {
        DemoMethod::Sas => Config::default(),
        DemoMethod::Qr => Config {
            methods: vec![Method::SasV1, Method::QrShowV1, Method::QrScanV1, Method::ReciprocateV1],
            ..Config::default()
        },
    };
    let a = Machine::new(ia, config.clone(), entropy(opts.seed, 1));
    let b = Machine::new(ib, config, entropy(opts.seed, 2));
    let mut net = Loopback::new(a, b, START_MS);
    net.exchange_device_keys();
    let mut demo = Demo {
        opts,
        out,
        net,
        seen: 0,
        flows: [None, None],
        sas_shown: [None, None],
        compared: false,
        scanned: false,
        ended: [None, None],
    };
    demo.play()
}

impl Demo<'_> {
    fn say(&mut self, text: &str) -> io::Result<()> {
        if !self.opts.json {
            writeln!(self.out, "{text}")?;
        }
        Ok(())
    }

    fn line(&mut self, v: Value) -> io::Result<()> {
        writeln!(self.out, "{v}")
    }

    fn play(&mut self) -> io::Result<Ending> {
        let transport = match self.opts.transport {
            Transport::ToDevice => "to-device messages",
            Transport::Room => "events in a shared room",
        };
        self.say(&format!(
            "mxverify demo — two devices verify each other through an in-memory homeserver ({transport}).\n\
             \x20 Alice: {} on device {}\n  Bob:   {} on device {}\n",
            PEOPLE[0].user, PEOPLE[0].device, PEOPLE[1].user, PEOPLE[1].device
        ))?;
        if self.opts.json {
            let scenario = clap::ValueEnum::to_possible_value(&self.opts.scenario).map(|v| v.get_name().to_owned());
            self.line(json!({"event": "demo", "scenario": scenario, "devices": [
                {"user": PEOPLE[0].user, "device": PEOPLE[0].device},
                {"user": PEOPLE[1].user, "device": PEOPLE[1].device}]}))?;
        }
        let now = self.net.now;
        match self.opts.transport {
            Transport::ToDevice => {
                let flow = self
                    .net
                    .a
                    .request_to_device(PEOPLE[1].user, &[PEOPLE[1].device.into()], now)
                    .expect("a device is named");
                self.flows[0] = Some(flow);
            }
            Transport::Room => {
                self.net.a.request_in_room(ROOM, PEOPLE[1].user, now);
            }
        }
        self.say("Alice asks to verify Bob.")?;
        self.net.collect();
        loop {
            self.react()?;
            if self.ended.iter().all(Option::is_some) {
                break;
            }
            if self.net.queue.is_empty() {
                // Nothing in flight and nobody acting: only time can move things now.
                let Some(deadline) = self.net.a.next_deadline().into_iter().chain(self.net.b.next_deadline()).min()
                else {
                    break;
                };
                let wait = deadline.saturating_sub(self.net.now);
                self.say(&format!("\n… {} pass with nobody answering …", minutes(wait)))?;
                self.net.advance(wait);
                continue;
            }
            self.tamper();
            self.show_message(0)?;
            self.net.deliver(0);
        }
        self.finish()
    }

    /// Alters the next message in flight as the scenario's attacker or old client would.
    fn tamper(&mut self) {
        let m = &mut self.net.queue[0];
        let fault = match self.opts.scenario {
            Scenario::WrongCommitment => "commitment",
            // Only Bob's MAC, so that Alice is the one who notices.
            Scenario::WrongMac if m.from == Side::B => "mac",
            Scenario::UnknownMethod => "unknown_method",
            _ => return,
        };
        let event_type = m.out.event_type;
        m.out.content.edit(|content| {
            if mxverify_client::device::apply_fault(fault, event_type, content) {
                content["org.mxverify.demo.altered"] = json!(true);
            }
        });
    }

    fn show_message(&mut self, i: usize) -> io::Result<()> {
        let InFlight { from, out } = self.net.queue[i].clone();
        let mut content = out.content.to_value();
        let altered = content.get("org.mxverify.demo.altered").is_some();
        if self.opts.json {
            if let Some(o) = content.as_object_mut() {
                o.remove("org.mxverify.demo.altered");
            }
            return self
                .line(json!({"event": "message", "from": person(from).device, "to": person(from.other()).device,
                                     "type": out.event_type, "altered_in_transit": altered, "content": content}));
        }
        let c = &content;
        let list = |k: &str| {
            c[k].as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        };
        let summary = match out.event_type {
            "m.key.verification.request" | "m.room.message" | "m.key.verification.ready" => {
                format!("methods: {}", list("methods"))
            }
            "m.key.verification.start" => format!("method {}", c["method"].as_str().unwrap_or("?")),
            "m.key.verification.accept" => format!(
                "{}, {}, {}",
                c["key_agreement_protocol"].as_str().unwrap_or("?"),
                c["message_authentication_code"].as_str().unwrap_or("?"),
                list("short_authentication_string")
            ),
            "m.key.verification.key" => format!(
                "ephemeral key {}…",
                &c["key"].as_str().unwrap_or("")[..8.min(c["key"].as_str().unwrap_or("").len())]
            ),
            "m.key.verification.mac" => {
                format!(
                    "MACs of {}",
                    c["mac"].as_object().map(|m| m.keys().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default()
                )
            }
            "m.key.verification.cancel" => {
                format!("{}: {}", c["code"].as_str().unwrap_or("?"), c["reason"].as_str().unwrap_or(""))
            }
            _ => String::new(),
        };
        let arrow = if from == Side::A { "Alice → Bob  " } else { "Bob   → Alice" };
        let warn = if altered { "   ⚠ altered in transit" } else { "" };
        self.say(&format!("  {arrow}  {:<28} {summary}{warn}", out.event_type))
    }

    /// Handles new events: shows them and plays each person's part.
    fn react(&mut self) -> io::Result<()> {
        while self.seen < self.net.events.len() {
            let (side, event) = self.net.events[self.seen].clone();
            self.seen += 1;
            if self.opts.json
                && let Some(v) = output::event_json(Some(person(side).device), &event, self.opts.lang.as_deref())
            {
                self.line(v)?;
            }
            let now = self.net.now;
            let name = person(side).name;
            match &event {
                Event::IncomingRequest { flow, from_device, deadline, .. } => {
                    self.flows[side as usize] = Some(flow.clone());
                    self.say(&format!(
                        "  {name}'s screen: “{} wants to verify device {from_device}” (closes in {} unless answered)",
                        person(side.other()).user,
                        minutes(deadline.saturating_sub(now))
                    ))?;
                    if self.opts.scenario == Scenario::Reject {
                        self.say(&format!("  {name} declines."))?;
                        self.net.machine(side).cancel(flow, now).expect("a new request can be declined");
                    } else {
                        self.say(&format!("  {name} accepts."))?;
                        self.net.machine(side).accept(flow, now).expect("a new request can be accepted");
                    }
                }
                Event::RequestSent { flow } => self.flows[side as usize] = Some(flow.clone()),
                Event::Ready { .. } if side == Side::A && self.opts.method == DemoMethod::Qr => {
                    self.say("  Alice's laptop shows a QR code for Bob's phone to scan.")?;
                }
                Event::QrCode { payload, .. } if side == Side::A && !self.scanned => {
                    self.scanned = true;
                    self.scan(payload)?;
                }
                Event::QrScanned { flow } => {
                    self.say(&format!(
                        "  {name}'s screen: “The other device scanned your code. Does it show a green check?”"
                    ))?;
                    let flow = flow.clone();
                    match self.opts.scenario {
                        Scenario::Mismatch => {
                            self.say(&format!("  {name} sees no check mark and presses “No”."))?;
                            self.net.machine(side).mismatch(&flow, now).expect("scanned");
                        }
                        Scenario::Timeout => self.say(&format!("  {name} has walked away without answering."))?,
                        _ => {
                            self.say(&format!("  {name} presses “Yes”."))?;
                            self.net.machine(side).confirm(&flow, now).expect("scanned");
                        }
                    }
                }
                Event::Ready { flow, .. } if side == Side::A => {
                    self.say(&format!("  {name} chooses to compare emoji (SAS)."))?;
                    self.net.machine(side).start_sas(flow, now).expect("both offered m.sas.v1");
                }
                Event::Sas { .. } => {
                    self.sas_shown[side as usize] = Some(event.clone());
                    if self.sas_shown.iter().all(Option::is_some) && !self.compared {
                        self.compared = true;
                        self.compare()?;
                    }
                }
                Event::Done { .. } | Event::Cancelled { .. } => self.ended[side as usize] = Some(event.clone()),
                _ => {}
            }
        }
        self.net.collect();
        if self.seen < self.net.events.len() { self.react() } else { Ok(()) }
    }

    /// Alice's code: drawn for the terminal, made into a picture, and read back from the picture by
    /// Bob's "camera", which hands the bytes to Bob's device.
    fn scan(&mut self, payload: &[u8]) -> io::Result<()> {
        let other = |e: crate::qr_image::QrImageError| io::Error::other(e.to_string());
        if !self.opts.json {
            let drawn = crate::qr_image::render_terminal(payload).map_err(other)?;
            self.say(&drawn)?;
        }
        if let Some(path) = &self.opts.qr_png {
            crate::qr_image::write_png(payload, path).map_err(other)?;
            let text = format!("  (the code is also in {})", path.display());
            self.say(&text)?;
        }
        let now = self.net.now;
        let fb = self.flows[1].clone().expect("Bob has the flow");
        match self.opts.scenario {
            Scenario::Cancel => {
                self.say("  Bob changes his mind and presses “Cancel” instead of scanning.")?;
                self.net.b.cancel(&fb, now).expect("flow active");
            }
            _ => {
                let picture = crate::qr_image::render_image(payload, 4).map_err(other)?;
                let read = crate::qr_image::decode_luma(&picture).map_err(other)?;
                self.say("  Bob points his phone's camera at it; the phone checks the keys in the code.")?;
                self.net.b.scan_qr(&fb, &read, now).map_err(|e| io::Error::other(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Both screens show the SAS: show them side by side, then each person answers.
    fn compare(&mut self) -> io::Result<()> {
        let get = |e: &Option<Event>| match e {
            Some(Event::Sas { emoji, decimals, .. }) => (emoji.clone().unwrap_or_default(), *decimals),
            _ => unreachable!("both SAS shown"),
        };
        let ((ea, da), (eb, db)) = (get(&self.sas_shown[0]), get(&self.sas_shown[1]));
        let left = format!("Alice's {}", PEOPLE[0].device);
        let right = format!("Bob's {}", PEOPLE[1].device);
        self.say(&format!(
            "\nCompare — both screens now show:\n{}",
            output::sas_side_by_side((&left, &ea), (&right, &eb), self.opts.lang.as_deref())
        ))?;
        if let (Some(da), Some(db)) = (da, db) {
            self.say(&format!("      {:<26}{}\n", output::decimals(&da), output::decimals(&db)))?;
        }
        let now = self.net.now;
        let (fa, fb) = (self.flows[0].clone().expect("flow"), self.flows[1].clone().expect("flow"));
        match self.opts.scenario {
            Scenario::Mismatch => {
                self.say("  Bob sees different emoji and presses “They don't match”.")?;
                self.net.b.mismatch(&fb, now).expect("SAS shown");
            }
            Scenario::Cancel => {
                self.say("  Bob changes his mind and presses “Cancel”.")?;
                self.net.b.cancel(&fb, now).expect("flow active");
            }
            Scenario::Timeout => {
                self.say("  Alice confirms; Bob has walked away without looking.")?;
                self.net.a.confirm(&fa, now).expect("SAS shown");
            }
            _ => {
                self.say("  Alice and Bob both press “They match”.")?;
                self.net.a.confirm(&fa, now).expect("SAS shown");
                self.net.b.confirm(&fb, now).expect("SAS shown");
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<Ending> {
        let mut ending = Ending::Verified;
        self.say("")?;
        for side in [Side::A, Side::B] {
            let name = person(side).name;
            match &self.ended[side as usize] {
                Some(Event::Done { user_id, device_id, keys, .. }) => {
                    let keys = keys
                        .iter()
                        .map(|k| match k.kind {
                            KeyKind::Device => format!("the key of device {device_id}, {}", k.key),
                            _ => format!("the master key {}", k.key),
                        })
                        .collect::<Vec<_>>()
                        .join(" and ");
                    self.say(&format!("  ✔ {name}: verified {user_id} — {keys}"))?;
                }
                Some(Event::Cancelled { info, .. }) => {
                    if ending != Ending::TimedOut {
                        ending = if info.code == CancelCode::Timeout { Ending::TimedOut } else { Ending::Cancelled };
                    }
                    self.say(&format!("  ✘ {name}: {}", info.explain()))?;
                }
                _ => {
                    ending = Ending::Error;
                    self.say(&format!("  ? {name}: the verification did not end"))?;
                }
            }
        }
        if self.opts.json {
            self.line(json!({"event": "exit", "ending": format!("{ending:?}").to_lowercase(), "code": ending as i32}))?;
        }
        Ok(ending)
    }
}

fn minutes(ms: u64) -> String {
    let s = ms / 1000;
    format!("{}:{:02} min", s / 60, s % 60)
}
