//! The request phase ([spec: key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)):
//! our request waiting for `ready`, their request waiting for our user, and both sides ready to
//! start a method.

use serde_json::Value;

use super::qr::{self, ShownQr};
use super::sas::{self, Sas};
use super::state::{Incoming, Ready, Requested, State};
use super::step::{Ctx, Next, Peer, Pinned, Refused, Step, check_no_clash, map};
use crate::cancel::{CancelCode, LocalCause};
use crate::qr::QrPayload;
use crate::types::{ActionError, DropReason, Event};
use crate::wire::{self, Method, Msg, MsgKind, StartMethod};

/// A transition of the request phase, to any state.
type Transition = super::step::Transition<State>;
/// A user action in the request phase.
type Acted = super::step::Acted<State>;

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
        let mut ready = Ready { device: ready.from_device, methods: ready.methods.into(), shown: None };
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
        if let Some((shown, event)) = ShownQr::make(ctx, &self.device) {
            self.shown = Some(Box::new(shown));
            step.events.push(event);
        }
        Ok(())
    }

    /// Their start (ST-01): SAS, or the reciprocation of our QR code.
    pub(crate) fn on_start(self, start: wire::Start, raw: &Value, ctx: &mut Ctx<'_>) -> Transition {
        let offer = match start.method {
            StartMethod::Reciprocate { secret } if self.shown.is_some() => {
                return map(qr::on_reciprocate(self.device, self.shown, &secret, ctx), State::Qr);
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
        let (next, more) = map(Sas::from_their_start(self.device, offer, content, pinned, ctx), State::Sas);
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
        let (sas, msg) = Sas::start(self.device, pinned, ctx);
        let mut step = Step::default();
        step.events.push(Event::Started { flow: ctx.key.clone(), method: Method::SasV1, by_us: true });
        step.send(msg, Peer::Device(sas.device().to_owned()));
        Ok((Next::Go(State::Sas(Box::new(sas))), step))
    }

    /// Our user scanned the other device's code (QR-03, QR-04): bytes that are not a verification
    /// code are an error the user can retry; a code is checked by the QR flow.
    pub(crate) fn scan_qr(self, scanned: &[u8], ctx: &mut Ctx<'_>) -> Acted {
        if !ctx.common_methods(&self.methods).contains(&Method::QrScanV1) {
            let err = ActionError::NoCommonMethod("the other device cannot show a QR code");
            return Err(Refused::new(State::Ready(self), err));
        }
        let payload = match QrPayload::decode(scanned) {
            Ok(p) => p,
            Err(e) => return Err(Refused::new(State::Ready(self), ActionError::InvalidQr(e))),
        };
        Ok(map(qr::scan(self.device, self.shown, payload, ctx), State::Qr))
    }
}

/// The event the user sees when both sides are ready.
pub(crate) fn ready_event(ctx: &Ctx<'_>, ready: &Ready) -> Event {
    Event::Ready {
        flow: ctx.key.clone(),
        other_device: ready.device.clone(),
        methods: ctx.common_methods(&ready.methods),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::step::{How, Out};
    use crate::flow::testing::*;
    use crate::types::{Action, FlowPhase};

    fn ready_from(device: &str) -> wire::Ready {
        wire::Ready { from_device: device.into(), methods: all_methods() }
    }

    #[test]
    fn requested_adopts_the_first_ready_and_tells_the_other_devices() {
        let (mut alice, _) = alice_and_bob();
        let requested = Requested { devices: vec!["B1".into(), "B2".into()] };
        let (state, step) = going(requested.on_ready(ready_from("B1"), &mut alice.ctx()));
        let State::Ready(ready) = &state else { panic!("{}", state.name()) };
        assert_eq!(ready.device, "B1");
        assert!(ready.shown.is_some(), "a QR code is shown at once");
        assert!(matches!(&step.out[..], [Out { msg: Msg::Cancel(c), to: Peer::Devices(d) }]
            if c.code == CancelCode::Accepted && *d == ["B2"]));
        assert!(matches!(&step.events[..], [Event::Ready { .. }, Event::QrCode { mode: 0, .. }]));
        assert!(!step.ask_keys, "Bob's keys are known");
        let (phase, actions) = state.project(&alice.config);
        assert!(matches!(phase, FlowPhase::Ready { qr_code: Some(_), .. }));
        assert_eq!(actions, [Action::StartSas, Action::ScanQr, Action::Cancel]);
    }

    #[test]
    fn requested_ignores_a_device_it_did_not_ask() {
        let (mut alice, _) = alice_and_bob();
        let requested = Requested { devices: vec!["B1".into()] };
        let (state, step) = going(requested.on_ready(ready_from("B9"), &mut alice.ctx()));
        assert!(matches!(state, State::Requested(_)));
        assert!(step.out.is_empty());
        assert!(matches!(&step.events[..], [Event::Dropped { reason: DropReason::OtherDevice, .. }]));
    }

    #[test]
    fn requested_with_no_method_in_common_fails() {
        let (mut alice, _) = alice_and_bob();
        let ready = wire::Ready { from_device: "B1".into(), methods: vec![Method::Custom("org.example.x".into())] };
        let (how, _) = ending(Requested { devices: vec!["B1".into()] }.on_ready(ready, &mut alice.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::UnknownMethod, LocalCause::NoCommonMethod(_))));
    }

    #[test]
    fn requested_refuses_to_show_a_code_to_a_user_with_a_clashing_device_id() {
        let (mut alice, _) = alice_and_bob();
        let keys = alice.their_keys.as_mut().unwrap();
        let msk = keys.master_key.clone().unwrap().to_string();
        keys.devices.insert(msk.clone(), key(99));
        let (how, _) = ending(Requested { devices: vec!["B1".into()] }.on_ready(ready_from("B1"), &mut alice.ctx()));
        assert!(
            matches!(how, How::Failed(CancelCode::KeyMismatch, LocalCause::DeviceIdClashesWithCrossSigningKey(d)) if d == msk)
        );
    }

    #[test]
    fn incoming_accept_answers_with_our_methods_that_fit_theirs() {
        let (_, mut bob) = alice_and_bob();
        let incoming = Incoming { device: "A1".into(), methods: vec![Method::SasV1, Method::QrScanV1].into() };
        let (state, step) = going(incoming.accept(&mut bob.ctx()).unwrap());
        // Without m.reciprocate.v1 on their side, QR is not common.
        assert!(matches!(&sent(&step)[..], [Msg::Ready(r)] if r.methods == [Method::SasV1]));
        assert!(matches!(state, State::Ready(Ready { shown: None, .. })));
        let nothing = Incoming { device: "A1".into(), methods: vec![Method::Custom("x".into())].into() };
        let refused = nothing.accept(&mut bob.ctx()).unwrap_err();
        assert!(matches!(refused.error, ActionError::NoCommonMethod(_)));
        assert!(matches!(refused.state, State::Incoming(_)), "the state is given back untouched");
    }

    fn bob_ready() -> Ready {
        Ready { device: "A1".into(), methods: all_methods().into(), shown: None }
    }

    fn sas_start(from: &str) -> (wire::Start, Value) {
        let offer = wire::SasOffer {
            key_agreement_protocols: vec!["curve25519-hkdf-sha256".into()],
            hashes: vec!["sha256".into()],
            message_authentication_codes: vec!["hkdf-hmac-sha256.v2".into()],
            short_authentication_string: vec!["decimal".into(), "emoji".into()],
        };
        let start = wire::Start { from_device: from.into(), method: StartMethod::Sas(offer) };
        let raw = raw(&Msg::Start(start.clone()));
        (start, raw)
    }

    #[test]
    fn ready_accepts_their_sas_start_at_once() {
        let (_, mut bob) = alice_and_bob();
        let (start, raw) = sas_start("A1");
        let (state, step) = going(bob_ready().on_start(start, &raw, &mut bob.ctx()));
        assert!(matches!(state, State::Sas(_)));
        assert!(matches!(&sent(&step)[..], [Msg::Accept(_)]));
        assert!(matches!(&step.events[..], [Event::Started { by_us: false, .. }]));
    }

    #[test]
    fn ready_holds_a_start_while_the_keys_are_unknown() {
        let (_, mut bob) = alice_and_bob();
        bob.their_keys = None;
        let (start, raw) = sas_start("A1");
        let (state, step) = going(bob_ready().on_start(start.clone(), &raw, &mut bob.ctx()));
        assert!(step.hold && matches!(state, State::Ready(_)));
        // Given again once the keys never came, it fails with a precise cause.
        bob.retry = true;
        let (how, _) = ending(bob_ready().on_start(start, &raw, &mut bob.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::KeyMismatch, LocalCause::DeviceKeysUnknown(_))));
    }

    #[test]
    fn ready_refuses_starts_it_cannot_handle() {
        let (_, mut bob) = alice_and_bob();
        let recip =
            wire::Start { from_device: "A1".into(), method: StartMethod::Reciprocate { secret: "AAAA".into() } };
        let (how, _) = ending(bob_ready().on_start(recip, &Value::Null, &mut bob.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::UnknownMethod, _)), "no code shown, nothing to reciprocate");
        let other = wire::Start { from_device: "A1".into(), method: StartMethod::Other("org.example.x".into()) };
        let (how, _) = ending(bob_ready().on_start(other, &Value::Null, &mut bob.ctx()));
        assert!(
            matches!(how, How::Failed(CancelCode::UnknownMethod, LocalCause::UnsupportedMethod(m)) if m == "org.example.x")
        );
    }

    #[test]
    fn start_sas_needs_the_method_and_the_keys() {
        let (mut alice, _) = alice_and_bob();
        let ready = || Ready { device: "B1".into(), methods: all_methods().into(), shown: None };
        let (state, step) = going(ready().start_sas(&mut alice.ctx()).unwrap());
        assert!(matches!(state, State::Sas(_)) && matches!(&sent(&step)[..], [Msg::Start(_)]));
        alice.their_keys = None;
        let refused = ready().start_sas(&mut alice.ctx()).unwrap_err();
        assert!(matches!(refused.error, ActionError::KeysUnknown { .. }));
        let qr_only = Ready { device: "B1".into(), methods: vec![Method::QrScanV1].into(), shown: None };
        assert!(matches!(qr_only.start_sas(&mut alice.ctx()).unwrap_err().error, ActionError::NoCommonMethod(_)));
    }

    #[test]
    fn their_cancel_ends_the_flow_and_a_refusal_of_a_request_to_several_devices_is_told_to_all() {
        let cancel = || wire::Cancel { code: CancelCode::User, reason: "no".into() };
        let state = State::Requested(Requested { devices: vec!["B1".into(), "B2".into()] });
        let (how, step) = ending(state.on_cancel(cancel()));
        assert!(matches!(how, How::CancelledByThem { code: CancelCode::User, .. }));
        assert!(matches!(&step.out[..], [Out { to: Peer::Devices(d), .. }] if d.len() == 2));
        let (_, step) = ending(State::Ready(bob_ready()).on_cancel(cancel()));
        assert!(step.out.is_empty(), "never answer a cancel");
    }
}
