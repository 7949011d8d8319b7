//! The states of a flow, each holding exactly the data of its moment, and the public projection
//! of each. The transitions live beside the method they belong to: [`super::request`] for the
//! request phase, [`super::sas`] and [`super::qr`] for the methods.

use super::qr::{Qr, ShownQr};
use super::sas::Sas;
use super::step::{Peer, common_methods};
use crate::cancel::CancelInfo;
use crate::types::{Action, Config, FlowPhase, VerifiedKey};
use crate::wire::{Method, Methods};

/// Where in its life a flow is.
#[derive(Debug)]
pub(crate) enum State {
    /// Our request is out; waiting for `ready` (or `cancel`).
    Requested(Requested),
    /// Their request waits for our user, until the prompt closes (RQ-04).
    Incoming(Incoming),
    /// Both ready; either side may start a method (ST-01).
    Ready(Ready),
    /// SAS in progress.
    Sas(Box<Sas>),
    /// QR in progress (after a scan).
    Qr(Box<Qr>),
    /// Verified.
    Done(Finished),
    /// Ended without verification.
    Cancelled(Box<Ended>),
}

/// A verified flow.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) device: String,
    pub(crate) keys: Vec<VerifiedKey>,
}

/// A flow that ended without verification.
#[derive(Debug)]
pub(crate) struct Ended {
    pub(crate) device: Option<String>,
    pub(crate) info: CancelInfo,
}

/// Our request is out.
#[derive(Debug)]
pub(crate) struct Requested {
    /// To-device: every device it went to (RQ-09). Empty in rooms.
    pub(crate) devices: Vec<String>,
}

/// Their request waits for our user.
#[derive(Debug)]
pub(crate) struct Incoming {
    /// The requesting device.
    pub(crate) device: String,
    /// The methods they offered.
    pub(crate) methods: Methods,
}

/// Both sides are ready.
#[derive(Debug)]
pub(crate) struct Ready {
    /// The other device.
    pub(crate) device: String,
    /// The methods the other device offered.
    pub(crate) methods: Methods,
    /// The QR code we show, if any.
    pub(crate) shown: Option<Box<ShownQr>>,
}

impl State {
    /// A short description, for people.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            State::Requested(_) => "waiting for the other device to accept",
            State::Incoming(_) => "waiting for you to accept",
            State::Ready(_) => "ready to start a method",
            State::Sas(s) => s.name(),
            State::Qr(q) => q.name(),
            State::Done(_) => "done",
            State::Cancelled(_) => "cancelled",
        }
    }

    pub(crate) fn ended(&self) -> bool {
        matches!(self, State::Done(_) | State::Cancelled(_))
    }

    /// Whether our `done` went out and the flow waits for theirs: no cancel may follow.
    pub(crate) fn done_sent(&self) -> bool {
        match self {
            State::Sas(s) => s.done_sent(),
            State::Qr(q) => q.done_sent(),
            _ => false,
        }
    }

    /// The other device, once bound.
    pub(crate) fn device(&self) -> Option<&str> {
        match self {
            State::Requested(_) => None,
            State::Incoming(i) => Some(&i.device),
            State::Ready(r) => Some(&r.device),
            State::Sas(s) => Some(s.device()),
            State::Qr(q) => Some(&q.device),
            State::Done(d) => Some(&d.device),
            State::Cancelled(e) => e.device.as_deref(),
        }
    }

    /// Who a message of this flow goes to (to-device; in rooms everyone in the room sees it), for
    /// a flow that ends here: the device is taken out of the state, not copied.
    pub(crate) fn into_peer(self) -> Peer {
        match self {
            State::Requested(r) => Peer::Devices(r.devices),
            State::Incoming(i) => Peer::Device(i.device),
            State::Ready(r) => Peer::Device(r.device),
            State::Sas(s) => Peer::Device(s.into_device()),
            State::Qr(q) => Peer::Device(q.device),
            State::Done(d) => Peer::Device(d.device),
            State::Cancelled(e) => e.device.map_or(Peer::Devices(Vec::new()), Peer::Device),
        }
    }

    /// The public projection of this state, and the actions legal in it.
    pub(crate) fn project(&self, config: &Config) -> (FlowPhase, Vec<Action>) {
        use Action::{Accept, Cancel, ScanQr, StartSas};
        match self {
            State::Requested(_) => (FlowPhase::Requested, vec![Cancel]),
            State::Incoming(i) => {
                let common = common_methods(&config.methods, &i.methods);
                let actions = if common.is_empty() { vec![Cancel] } else { vec![Accept, Cancel] };
                (FlowPhase::Incoming { methods: i.methods.to_vec(), common_methods: common }, actions)
            }
            State::Ready(r) => {
                let methods = common_methods(&config.methods, &r.methods);
                let mut actions = Vec::new();
                if methods.contains(&Method::SasV1) {
                    actions.push(StartSas);
                }
                if methods.contains(&Method::QrScanV1) {
                    actions.push(ScanQr);
                }
                actions.push(Cancel);
                let qr_code = r.shown.as_ref().map(|s| s.payload().encode());
                (FlowPhase::Ready { methods, qr_code }, actions)
            }
            State::Sas(s) => s.project(),
            State::Qr(q) => q.project(),
            State::Done(d) => (FlowPhase::Done { keys: d.keys.clone() }, Vec::new()),
            State::Cancelled(e) => (FlowPhase::Cancelled(e.info.clone()), Vec::new()),
        }
    }
}
