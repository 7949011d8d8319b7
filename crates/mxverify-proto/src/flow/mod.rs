//! The flows of a verification: the request phase ([`request`]), SAS ([`sas`]) and QR ([`qr`]).
//!
//! Each state is a type holding exactly the data of that moment ([`state`]). Each input is a
//! transition that consumes the state and returns what comes next (a new state, or the end of the
//! flow) with what to send and report ([`step::Step`]). Transitions never see the machine: they get
//! a [`Ctx`] (who we are, our configuration, what we know of the other side's keys, and the entropy
//! they may draw from). The machine routes inputs, applies steps, keeps the deadlines and decides,
//! through its cancel gate, whether an ending puts a cancel on the wire.
//!
//! The modules depend on each other in one direction only: [`step`] ← [`sas`], [`qr`] ←
//! [`state`] ← [`request`] ← this one, which dispatches an input to the transition of the
//! current state.

pub(crate) mod qr;
pub(crate) mod request;
pub(crate) mod sas;
pub(crate) mod state;
pub(crate) mod step;
#[cfg(test)]
pub(crate) mod testing;

use serde_json::Value;

use crate::cancel::{CancelCode, LocalCause};
use crate::types::{DropReason, FlowKey};
use crate::wire::{self, Method, Msg};

pub(crate) use state::{Ended, Finished, Incoming, Ready, Requested, State};
pub(crate) use step::{Ctx, End, How, Next, Origin, Peer, Refused, Step, common_methods, corresponds, map, map_acted};

/// A transition of a flow's state.
pub(crate) type Transition = step::Transition<State>;

/// A user action on a flow's state.
pub(crate) type Acted = step::Acted<State>;

/// One flow: who it is with, how it began, and its state.
#[derive(Debug)]
pub(crate) struct Flow {
    pub(crate) key: FlowKey,
    pub(crate) other_user: String,
    pub(crate) origin: Origin,
    pub(crate) state: State,
}

impl State {
    /// A message of the flow, other than a cancel (which the machine handles for every state).
    pub(crate) fn on_message(self, msg: Msg, raw: &Value, ctx: &mut Ctx<'_>) -> Transition {
        let kind = msg.kind();
        match (self, msg) {
            (State::Requested(r), Msg::Ready(ready)) => r.on_ready(ready, ctx),
            (State::Ready(r), Msg::Ready(_)) => {
                (Next::Go(State::Ready(r)), Step::dropped(ctx, kind, DropReason::Duplicate))
            }
            (State::Ready(r), Msg::Start(start)) => r.on_start(start, raw, ctx),
            (State::Sas(s), Msg::Start(start)) => map(s.on_start(start, raw, ctx), State::Sas),
            (State::Sas(s), msg @ (Msg::Accept(_) | Msg::Key(_) | Msg::Mac(_) | Msg::Done)) => {
                map(s.on_message(msg, ctx), State::Sas)
            }
            (State::Qr(q), Msg::Start(start)) => map(q.on_start(start, ctx), State::Qr),
            (State::Qr(q), Msg::Done) => map(q.on_done(ctx), State::Qr),
            (state, _) => {
                let cause = LocalCause::Unexpected { message: kind.event_type(), state: state.name() };
                (Next::fail(state.into_peer(), CancelCode::UnexpectedMessage, cause), Step::default())
            }
        }
    }

    /// Their cancel (CX-01): the flow ends. RQ-08: a device that refuses our request to several
    /// devices ends it for all, and the others are told with `m.user` (we cannot tell which device
    /// refused).
    pub(crate) fn on_cancel(self, cancel: wire::Cancel) -> Transition {
        let mut step = Step::default();
        if let State::Requested(r) = &self
            && r.devices.len() > 1
        {
            let code = CancelCode::User;
            let msg = Msg::Cancel(wire::Cancel { reason: code.default_reason().to_owned(), code });
            step.send(msg, Peer::Devices(r.devices.clone()));
        }
        let how = How::CancelledByThem { code: cancel.code, reason: cancel.reason };
        (Next::End(End { how, peer: self.into_peer() }), step)
    }

    /// The user accepts: an incoming request (sends `ready`, RQ-07), or a legacy start.
    pub(crate) fn accept(self, ctx: &mut Ctx<'_>) -> Acted {
        match self {
            State::Incoming(i) => i.accept(ctx),
            State::Sas(s) => map_acted(s.user_accepts(ctx), State::Sas),
            other => Err(wrong_state(other, "accept")),
        }
    }

    /// The user starts SAS in a ready flow (ST-01).
    pub(crate) fn start_sas(self, ctx: &mut Ctx<'_>) -> Acted {
        match self {
            State::Ready(r) => r.start_sas(ctx),
            other => Err(wrong_state(other, "start SAS")),
        }
    }

    /// The user says the emoji match (SQ-09), or that the other device showed success (QR-05).
    pub(crate) fn confirm(self, ctx: &mut Ctx<'_>) -> Acted {
        match self {
            State::Qr(q) => map_acted(q.confirm(ctx), State::Qr),
            State::Sas(s) => map_acted(s.confirm(ctx), State::Sas),
            other => Err(wrong_state(other, "confirm")),
        }
    }

    /// The user says the emoji differ (SQ-08), or that the other device did not show success.
    pub(crate) fn mismatch(self) -> Acted {
        match self {
            State::Sas(s) if s.can_confirm() => {
                let peer = Peer::Device(s.device().to_owned());
                Ok((Next::fail(peer, CancelCode::MismatchedSas, LocalCause::UserSaidMismatch), Step::default()))
            }
            State::Qr(q) if q.awaits_confirmation() => {
                let cause = LocalCause::QrMismatch("you said the other device did not show success".into());
                Ok((Next::fail(Peer::Device(q.device.clone()), CancelCode::KeyMismatch, cause), Step::default()))
            }
            other => Err(wrong_state(other, "report a mismatch")),
        }
    }

    /// The user scanned the other device's code (QR-03, QR-04).
    pub(crate) fn scan_qr(self, scanned: &[u8], ctx: &mut Ctx<'_>) -> Acted {
        match self {
            State::Ready(r) => r.scan_qr(scanned, ctx),
            other => Err(wrong_state(other, "scan a QR code")),
        }
    }

    /// Whether keys arriving may move this flow on ([`State::keys_arrived`]): a ready flow that
    /// may show a QR code (QR-01) and shows none yet, or a scan waiting for the keys to check it.
    /// `ours` are our methods.
    pub(crate) fn awaits_keys(&self, ours: &[Method]) -> bool {
        match self {
            State::Ready(r) => {
                r.shown.is_none()
                    && ours.contains(&Method::QrShowV1)
                    && corresponds(ours, &r.methods, &Method::QrShowV1)
            }
            State::Qr(q) => q.scan_pending(),
            _ => false,
        }
    }

    /// Keys arrived: the other user's (`theirs`; ours too for a self-verification), or only ours
    /// (our code shows our master key). A ready flow may now show its code; a scan that waited for
    /// the other user's keys is checked when theirs arrive, and keeps waiting otherwise.
    pub(crate) fn keys_arrived(self, theirs: bool, ctx: &mut Ctx<'_>) -> Transition {
        match self {
            State::Ready(mut ready) if ready.shown.is_none() => {
                let mut step = Step::default();
                if let Err(cause) = ready.offer_qr(ctx, &mut step) {
                    return (Next::fail(Peer::Device(ready.device), CancelCode::KeyMismatch, cause), step);
                }
                (Next::Go(State::Ready(ready)), step)
            }
            State::Qr(q) => map(q.keys_arrived(theirs, ctx), State::Qr),
            other => (Next::Go(other), Step::default()),
        }
    }

    /// The user cancels or rejects (CX-01, RQ-08); `cause` says why. A flow whose `done` we sent
    /// is not cancelled: the other side may already trust us.
    pub(crate) fn cancel(self, cause: LocalCause) -> Acted {
        if self.ended() || self.done_sent() {
            return Err(wrong_state(self, "cancel"));
        }
        Ok((Next::fail(self.into_peer(), CancelCode::User, cause), Step::default()))
    }
}

fn wrong_state(state: State, action: &'static str) -> Box<Refused<State>> {
    let name = state.name();
    Refused::wrong_state(state, name, action)
}
