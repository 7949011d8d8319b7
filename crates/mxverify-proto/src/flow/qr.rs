//! The QR flow inside a request ([spec: QR codes](https://spec.matrix.org/v1.19/client-server-api/#qr-codes)):
//! the displayer shows a code after `ready`; the scanner checks it and answers with an
//! `m.reciprocate.v1` start; the displayer checks the secret and asks its user to confirm; both
//! send `done`.

use subtle::ConstantTimeEq;

use crate::b64;
use crate::cancel::{CancelCode, LocalCause};
use crate::machine::{Flow, Machine, State};
use crate::qr::{QrDecodeError, QrMode, QrPayload, QrSecret};
use crate::types::*;
use crate::wire::{Method, Msg, MsgKind, Start, StartMethod};

/// The keys a QR flow will trust once it completes, fixed by value (TR-01, QR-07).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QrTrust {
    keys: Vec<VerifiedKey>,
    we_show: bool,
}

/// The code we show, and what we will trust once it was scanned and our user confirmed.
#[derive(Debug)]
pub(crate) struct ShownQr {
    payload: QrPayload,
    trust: QrTrust,
}

fn master(key: &str) -> VerifiedKey {
    VerifiedKey { key_id: format!("ed25519:{key}"), key: key.to_owned(), kind: KeyKind::MasterKey }
}

fn device(id: &str, key: &str) -> VerifiedKey {
    VerifiedKey { key_id: format!("ed25519:{id}"), key: key.to_owned(), kind: KeyKind::Device }
}

type Refusal = (CancelCode, LocalCause);

fn key_mismatch(what: &str) -> Refusal {
    (CancelCode::KeyMismatch, LocalCause::QrMismatch(what.to_owned()))
}

impl Machine {
    /// Shows a QR code in a ready flow when we may (QR-01) and know the keys it needs, choosing
    /// the mode from the relationship (QR-02). Emits [`Event::QrCode`].
    pub(crate) fn offer_qr(&mut self, flow: &mut Flow) {
        if !matches!(flow.state, State::Ready(None))
            || !self.common_methods(&flow.their_methods).contains(&Method::QrShowV1)
        {
            return;
        }
        let Some((mode, key1, key2, trusted)) = self.qr_keys_to_show(flow) else {
            return;
        };
        let (Some(k1), Some(k2)) = (b64::decode32(&key1), b64::decode32(&key2)) else {
            return;
        };
        let bytes: [u8; 16] = self.random_bytes();
        let secret = QrSecret::generate(|buf| buf.copy_from_slice(&bytes));
        // Keys that are not Ed25519 points cannot be put in a code (QF-10): show none.
        let Ok(payload) = QrPayload::new(mode, flow.key.flow_id(), k1, k2, secret) else {
            return;
        };
        self.events.push_back(Event::QrCode {
            flow: flow.key.clone(),
            payload: payload.encode(),
            mode: mode.as_byte(),
        });
        let trust = QrTrust { keys: vec![trusted], we_show: true };
        flow.state = State::Ready(Some(Box::new(ShownQr { payload, trust })));
    }

    /// The mode and keys of our code (QF-04, QF-06, QF-07), and what the displayer trusts once the
    /// scan is confirmed: always the second key (QR-07).
    fn qr_keys_to_show(&self, flow: &Flow) -> Option<(QrMode, String, String, VerifiedKey)> {
        let own_msk = self.own.master_key.clone()?;
        let theirs = self.keys.get(&flow.other_user);
        if flow.other_user != self.own.user_id {
            let their_msk = theirs?.master_key.clone()?;
            let trusted = master(&their_msk);
            Some((QrMode::OtherUser, own_msk, their_msk, trusted))
        } else if self.own.trusts_master_key {
            let dev = flow.other_device.as_deref()?;
            let dev_key = theirs?.devices.get(dev)?.clone();
            let trusted = device(dev, &dev_key);
            Some((QrMode::SelfTrusted, own_msk, dev_key, trusted))
        } else {
            let trusted = master(&own_msk);
            Some((QrMode::SelfUntrusted, self.own.ed25519.clone(), own_msk, trusted))
        }
    }

    /// The code we are showing in a flow, if any.
    pub fn qr_code(&self, key: &FlowKey) -> Option<Vec<u8>> {
        match &self.flow_state(key)? {
            State::Ready(Some(shown)) => Some(shown.payload.encode()),
            _ => None,
        }
    }

    /// The user scanned the other device's code (QR-03, QR-04): check it and, if it holds, send
    /// the `m.reciprocate.v1` start. A code that does not hold cancels the flow (`m.key_mismatch`,
    /// or `m.user_mismatch` for a code about the wrong user); bytes that are not a verification
    /// code at all are an error, so the user can try again.
    pub fn scan_qr(&mut self, key: &FlowKey, scanned: &[u8], now: Millis) -> Result<(), ActionError> {
        self.with_flow(key, |m, flow| {
            if !matches!(flow.state, State::Ready(_)) {
                return Err(ActionError::WrongState { action: "scan a QR code", state: flow.state.name() });
            }
            if !m.common_methods(&flow.their_methods).contains(&Method::QrScanV1) {
                return Err(ActionError::NoCommonMethod("the other device cannot show a QR code"));
            }
            let payload = QrPayload::decode(scanned).map_err(ActionError::InvalidQr)?;
            match m.qr_check_scanned(flow, &payload) {
                Err((code, cause)) => m.fail(flow, None, code, cause, now),
                Ok(trusted) => {
                    let start = Start {
                        from_device: m.own.device_id.clone(),
                        method: StartMethod::Reciprocate { secret: payload.secret().to_base64() },
                    };
                    m.send(flow, Msg::Start(start), now);
                    m.events.push_back(Event::Started {
                        flow: flow.key.clone(),
                        method: Method::ReciprocateV1.as_str().into(),
                        by_us: true,
                    });
                    flow.state = State::QrWaitingForDone(QrTrust { keys: vec![trusted], we_show: false });
                }
            }
            Ok(())
        })
    }

    /// QR-03: the scanned keys must be what we know; returns what the scanner trusts (the first
    /// key, QR-07).
    fn qr_check_scanned(&self, flow: &Flow, p: &QrPayload) -> Result<VerifiedKey, Refusal> {
        if p.flow_id() != flow.key.flow_id() {
            return Err(key_mismatch("the code belongs to another verification"));
        }
        let same_user = flow.other_user == self.own.user_id;
        let wrong_user = |what: &str| (CancelCode::UserMismatch, LocalCause::QrMismatch(what.to_owned()));
        match (p.mode(), same_user) {
            (QrMode::OtherUser, true) => {
                return Err(wrong_user("the code is for verifying another user, not our own devices"));
            }
            (QrMode::SelfTrusted | QrMode::SelfUntrusted, false) => {
                return Err(wrong_user("the code is for a self-verification, not for verifying another user"));
            }
            _ => {}
        }
        let own_msk = self
            .own
            .master_key
            .as_deref()
            .ok_or_else(|| key_mismatch("we have no master key to check the code against"))?;
        let (key1, key2) = (b64::encode(p.key1()), b64::encode(p.key2()));
        let theirs = self.keys.get(&flow.other_user);
        match p.mode() {
            QrMode::OtherUser => {
                let their_msk = theirs
                    .and_then(|k| k.master_key.as_deref())
                    .ok_or_else(|| key_mismatch("we do not know the other user's master key"))?;
                if key1 != their_msk {
                    return Err(key_mismatch("the first key is not the other user's master key"));
                }
                if key2 != own_msk {
                    return Err(key_mismatch("the second key is not our master key"));
                }
                Ok(master(their_msk))
            }
            QrMode::SelfTrusted => {
                if key1 != own_msk {
                    return Err(key_mismatch("the first key is not our master key"));
                }
                if key2 != self.own.ed25519 {
                    return Err(key_mismatch("the second key is not this device's key"));
                }
                Ok(master(own_msk))
            }
            QrMode::SelfUntrusted => {
                // The displayer asks us to vouch for the master key: only worth anything if we trust it.
                if !self.own.trusts_master_key {
                    return Err(key_mismatch(
                        "this device does not trust the master key itself, so the code proves nothing",
                    ));
                }
                let dev = flow.other_device.as_deref().unwrap_or_default();
                let dev_key = theirs
                    .and_then(|k| k.devices.get(dev))
                    .ok_or_else(|| key_mismatch("we do not know the other device's key"))?;
                if key1 != *dev_key {
                    return Err(key_mismatch("the first key is not the other device's key"));
                }
                if key2 != own_msk {
                    return Err(key_mismatch("the second key is not our master key"));
                }
                Ok(device(dev, dev_key))
            }
        }
    }

    /// The displayer gets the reciprocation (QR-05): the secret must be the one in our code
    /// (compared in constant time); then our user confirms.
    pub(crate) fn qr_on_reciprocate(&mut self, flow: &mut Flow, secret: &str, now: Millis) {
        let State::Ready(Some(shown)) = std::mem::replace(&mut flow.state, State::Moving) else {
            unreachable!("only called while showing a code")
        };
        let matches = QrSecret::from_base64(secret).is_ok_and(|s| bool::from(s.ct_eq(shown.payload.secret())));
        flow.state = State::Ready(Some(shown));
        if !matches {
            let cause = LocalCause::QrMismatch(
                "the secret does not match our code — someone may be attempting an attack".into(),
            );
            return self.fail(flow, Some(MsgKind::Start), CancelCode::KeyMismatch, cause, now);
        }
        let State::Ready(Some(shown)) = std::mem::replace(&mut flow.state, State::Moving) else { unreachable!() };
        flow.state = State::QrScanned(shown);
        self.events.push_back(Event::Started {
            flow: flow.key.clone(),
            method: Method::ReciprocateV1.as_str().into(),
            by_us: false,
        });
        self.events.push_back(Event::QrScanned { flow: flow.key.clone() });
    }

    /// Our user confirmed that the other device shows success: send `done` (QR-05, QR-06).
    pub(crate) fn qr_confirm_scanned(&mut self, flow: &mut Flow, now: Millis) {
        let State::QrScanned(shown) = std::mem::replace(&mut flow.state, State::Moving) else {
            unreachable!("only called once scanned")
        };
        if !self.qr_trust_holds(flow, &shown.trust) {
            flow.state = State::QrScanned(shown);
            return self.fail(flow, None, CancelCode::KeyMismatch, LocalCause::KeysChanged, now);
        }
        self.send(flow, Msg::Done, now);
        flow.state = State::QrWaitingForDone(shown.trust);
    }

    /// The other side's `done`: the scanner answers with its own (QR-06); both now trust.
    pub(crate) fn qr_on_done(&mut self, flow: &mut Flow, now: Millis) {
        let State::QrWaitingForDone(trust) = std::mem::replace(&mut flow.state, State::Moving) else {
            unreachable!("only called while waiting for done")
        };
        if !trust.we_show {
            if !self.qr_trust_holds(flow, &trust) {
                flow.state = State::QrWaitingForDone(trust);
                return self.fail(flow, Some(MsgKind::Done), CancelCode::KeyMismatch, LocalCause::KeysChanged, now);
            }
            self.send(flow, Msg::Done, now);
        }
        flow.state = State::Done;
        self.events.push_back(Event::Done {
            flow: flow.key.clone(),
            user_id: flow.other_user.clone(),
            device_id: flow.other_device.clone().unwrap_or_default(),
            keys: trust.keys,
        });
    }

    /// TR-01: the keys about to be trusted are still the keys we know.
    fn qr_trust_holds(&self, flow: &Flow, trust: &QrTrust) -> bool {
        let theirs = self.keys.get(&flow.other_user);
        trust.keys.iter().all(|k| match k.kind {
            KeyKind::MasterKey if flow.other_user == self.own.user_id => self.own.master_key.as_deref() == Some(&k.key),
            KeyKind::MasterKey => theirs.and_then(|t| t.master_key.as_deref()) == Some(&k.key),
            KeyKind::Device => {
                let dev = flow.other_device.as_deref().unwrap_or_default();
                theirs.and_then(|t| t.devices.get(dev)) == Some(&k.key)
            }
        })
    }
}

impl From<QrDecodeError> for ActionError {
    fn from(e: QrDecodeError) -> Self {
        ActionError::InvalidQr(e)
    }
}
