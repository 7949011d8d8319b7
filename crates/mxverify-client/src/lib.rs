#![warn(missing_docs)]
//! A Matrix device for mxverify: the Client-Server API calls verification needs (with retries),
//! a SQLite store, signed device keys, cross-signing, and the glue that drives
//! [`mxverify_proto::Machine`] from `/sync`.
//!
//! Spec: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption),
//! [Device verification](https://spec.matrix.org/v1.19/client-server-api/#device-verification),
//! [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing),
//! [Secrets](https://spec.matrix.org/v1.19/client-server-api/#secrets),
//! [Syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing); the verification messages themselves
//! ([Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)) are
//! [`mxverify_proto`]'s.

pub mod cross_signing;
pub mod device;
pub mod http;
pub mod keys;
pub mod megolm;
pub mod olm;
pub mod secret_storage;
pub mod secrets;
pub mod store;
pub mod store_cipher;
pub mod sync;

pub use device::{
    Bootstrap, Connection, Credentials, Device, DeviceError, DeviceEvent, DirectRoom, Notice, Options, StateLock,
    now_ms,
};
pub use http::{Homeserver, HttpError};
pub use store::{Store, StoreError, TrustRecord};
