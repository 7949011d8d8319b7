//! The request phase ([spec: key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)):
//! our request waiting for `ready`, their request waiting for our user, and both sides ready to
//! start a method.

use serde_json::Value;

use super::{Acted, Ctx, Next, Peer, Pinned, Refused, State, Step, Transition, check_no_clash, qr, ready_event, sas};
use crate::cancel::{CancelCode, LocalCause};
use crate::types::{ActionError, DropReason, Event};
use crate::wire::{self, Method, Msg, MsgKind, StartMethod};

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
    pub(crate) methods: Vec<Method>,
}

/// Both sides are ready.
#[derive(Debug)]
pub(crate) struct Ready {
    /// The other device.
    pub(crate) device: String,
    /// The methods the other device offered.
    pub(crate) methods: Vec<Method>,
    /// The QR code we show, if any.
    pub(crate) shown: Option<Box<qr::ShownQr>>,
}

impl Requested {
    /// A device answered our request (RQ-07, RQ-09).
    pub(crate) fn on_ready(self, ready: wire::Ready, ctx: &mut Ctx<'_>) -> Transition {
        if ctx.is_to_device() && !self.devices.contains(&ready.from_device) {
            // A device we did not ask cannot adopt the request.
            return (Next::Go(State::Requested(self)), Step::dropped(ctx, MsgKind::Ready, DropReason::OtherDevice));
        }
        let mut step = Step::default();
        // RQ-09: the other devices that got our request learn that it was accepted elsewhere.
        let others: Vec<String> = self.devices.into_iter().filter(|d| *d != ready.from_device).collect();
        if !others.is_empty() {
            let code = CancelCode::Accepted;
            let cancel = Msg::Cancel(wire::Cancel { reason: code.default_reason().to_owned(), code });
            step.send(cancel, Peer::Devices(others));
        }
        let mut ready = Ready { device: ready.from_device, methods: ready.methods, shown: None };
        if ctx.common_methods(&ready.methods).is_empty() {
            let cause = LocalCause::NoCommonMethod("verification method");
            return (Next::fail(Peer::Device(ready.device), CancelCode::UnknownMethod, cause), step);
        }
        step.events.push(ready_event(ctx, &ready));
        step.ask_keys = !ctx.has_device_key(&ready.device);
        if let Err(cause) = ready.offer_qr(ctx, &mut step) {
            return (Next::fail(Peer::Device(ready.device), CancelCode::KeyMismatch, cause), step);
        }
        (Next::Go(State::Ready(ready)), step)
    }
}

impl Incoming {
    /// Our user accepts: `ready` with our methods that correspond to theirs (RQ-07, EV-RD-02).
    pub(crate) fn accept(self, ctx: &mut Ctx<'_>) -> Acted {
        let common = ctx.common_methods(&self.methods);
        if common.is_empty() {
            let err = ActionError::NoCommonMethod("none of the requester's methods is supported here");
            return Err(Refused::new(State::Incoming(self), err));
        }
        let mut step = Step::default();
        let msg = Msg::Ready(wire::Ready { from_device: ctx.own.device_id.clone(), methods: common });
        step.send(msg, Peer::Device(self.device.clone()));
        let mut ready = Ready { device: self.device, methods: self.methods, shown: None };
        step.events.push(ready_event(ctx, &ready));
        if let Err(cause) = ready.offer_qr(ctx, &mut step) {
            return Ok((Next::fail(Peer::Device(ready.device), CancelCode::KeyMismatch, cause), step));
        }
        Ok((Next::Go(State::Ready(ready)), step))
    }
}

impl Ready {
    /// Shows a QR code when we may (QR-01) and know the keys it needs. A user with a device ID
    /// equal to one of their cross-signing keys is refused (TR-02): the error is the cause.
    pub(crate) fn offer_qr(&mut self, ctx: &mut Ctx<'_>, step: &mut Step) -> Result<(), LocalCause> {
        if self.shown.is_some() || !ctx.common_methods(&self.methods).contains(&Method::QrShowV1) {
            return Ok(());
        }
        if let Some(keys) = ctx.their_keys {
            check_no_clash(keys)?;
        }
        if let Some((shown, event)) = qr::ShownQr::make(ctx, &self.device) {
            self.shown = Some(Box::new(shown));
            step.events.push(event);
        }
        Ok(())
    }

    /// Their start (ST-01): SAS, or the reciprocation of our QR code.
    pub(crate) fn on_start(self, start: wire::Start, raw: &Value, ctx: &mut Ctx<'_>) -> Transition {
        let offer = match start.method {
            StartMethod::Reciprocate { secret } if self.shown.is_some() => {
                return qr::on_reciprocate(self, &secret, ctx);
            }
            StartMethod::Reciprocate { .. } => return self.unsupported(Method::ReciprocateV1.as_str()),
            StartMethod::Other(m) => return self.unsupported(&m),
            StartMethod::Sas(offer) => offer,
        };
        if ctx.origin.began_with_request() && !ctx.common_methods(&self.methods).contains(&Method::SasV1) {
            return self.unsupported(Method::SasV1.as_str());
        }
        if !ctx.has_device_key(&start.from_device) && !ctx.retry {
            // Principle 7: hold the start until the keys arrive.
            return (Next::Go(State::Ready(self)), Step { hold: true, ..Step::default() });
        }
        let pinned = match Pinned::pin(ctx.their_keys, &self.device) {
            Ok(p) => p,
            Err(cause) => {
                return (Next::fail(Peer::Device(self.device), CancelCode::KeyMismatch, cause), Step::default());
            }
        };
        let content = sas::start_content_for_commitment(raw, ctx.key);
        let mut step = Step::default();
        step.events.push(Event::Started { flow: ctx.key.clone(), method: Method::SasV1, by_us: false });
        if !ctx.origin.began_with_request() {
            step.events.push(Event::IncomingRequest {
                flow: ctx.key.clone(),
                from_device: start.from_device.clone(),
                methods: vec![Method::SasV1],
                common_methods: vec![Method::SasV1],
                legacy: true,
                deadline: ctx.deadline,
            });
        }
        let (next, more) = sas::Sas::from_their_start(self.device, offer, content, pinned, ctx);
        step.append(more);
        (next, step)
    }

    fn unsupported(self, method: &str) -> Transition {
        let cause = LocalCause::UnsupportedMethod(method.to_owned());
        (Next::fail(Peer::Device(self.device), CancelCode::UnknownMethod, cause), Step::default())
    }

    /// Our user starts SAS (ST-01, SQ-01).
    pub(crate) fn start_sas(self, ctx: &mut Ctx<'_>) -> Acted {
        if !ctx.common_methods(&self.methods).contains(&Method::SasV1) {
            let err = ActionError::NoCommonMethod("the other device does not offer m.sas.v1");
            return Err(Refused::new(State::Ready(self), err));
        }
        if !ctx.has_device_key(&self.device) {
            let err = ActionError::KeysUnknown { user_id: ctx.other_user.to_owned(), device_id: self.device.clone() };
            return Err(Refused::new(State::Ready(self), err));
        }
        let pinned = match Pinned::pin(ctx.their_keys, &self.device) {
            Ok(p) => p,
            Err(cause) => {
                return Ok((Next::fail(Peer::Device(self.device), CancelCode::KeyMismatch, cause), Step::default()));
            }
        };
        let (sas, msg) = sas::Sas::start(self.device, pinned, ctx);
        let mut step = Step::default();
        step.events.push(Event::Started { flow: ctx.key.clone(), method: Method::SasV1, by_us: true });
        step.send(msg, Peer::Device(sas.device().to_owned()));
        Ok((Next::Go(State::Sas(Box::new(sas))), step))
    }
}
