// A headless matrix-js-sdk device that speaks JSON lines, for interoperability tests.
//
//   NODE22 interop/driver.mjs --homeserver URL --user USER --password PASSWORD
//                             [--device-id ID] [--cross-signing] [--poll-timeout MS]
//                             [--encrypt-verification] [--auto-join]
//
// stdout carries only JSON objects, one per line, each with an `event` field; commands arrive on stdin, one JSON
// object per line, each with a `command` field. Everything else (js-sdk's and the crypto library's logging) goes to
// stderr, filtered by MXV_DRIVER_LOG = debug | info | warn (default) | error | none.
//
// Commands are executed one after another, in the order received; a verification's `verify()` runs in the
// background, so the events of a flow (`sas`, `done`, `cancelled`, ...) arrive whenever js-sdk produces them.
//
// Events:   ready_to_go, request, ready, started, sas, qr, qr_scanned, done, cancelled, room, status, synced, error,
//           settings, invited, members, room_events, account_data, sent, secret_storage, restored,
//           cross_signing_status, secrets
// Commands: request {user, device | room | (own user)}, accept, start_sas, confirm, mismatch, cancel, scan_qr
//           {flow_id, payload}, create_room {invite, encrypted, direct}, join {room}, status {user, device},
//           sync, quit, set, create_dm, joined_members, room_events, account_data, send_text, bootstrap_secret_storage,
//           restore_secret_storage, cross_signing_status, export_secrets (below)
// A flow is named by flow_id: the transaction ID of a to-device verification, the event ID of the request event
// of an in-room one (js-sdk's request.transactionId in both cases).
//
// Options:
//   --cross-signing          create new cross-signing keys at start-up (replacing any the user has) and sign this
//                            device. Without it nothing about cross-signing is changed: a new device of a user who
//                            already has cross-signing keys leaves them alone (it can then self-verify and receive
//                            the private keys by secret sharing, or restore them from secret storage).
//   --encrypt-verification   send in-room verification events (the m.room.message request with msgtype
//                            m.key.verification.request, and every m.key.verification.* room event) through
//                            client.sendEvent, like Element X (matrix-rust-sdk) does: in an encrypted room they are
//                            Megolm-encrypted (type m.room.encrypted, m.relates_to left in the cleartext wrapper).
//                            Without it js-sdk sends them in the clear even in an encrypted room (its own
//                            behaviour). js-sdk's Rust crypto sends them as raw PUT /rooms/{room}/send/{type}/{txn}
//                            through client.http.authedRequest; the driver intercepts exactly those calls.
//   --auto-join              join every room this user is invited to (then emit `room` with auto_joined: true); an
//                            invite marked is_direct is also added to `m.direct` under the inviter, as Element does.
//
// Commands added for encrypted DMs and secret storage (each answered by one event, or by `error`):
//   {"command":"set","encrypt_verification":BOOL,"auto_join":BOOL}   either field may be left out
//       -> {"event":"settings","encrypt_verification":BOOL,"auto_join":BOOL,"sent_through_send_event":N} (N: how
//       many verification events the driver has sent through client.sendEvent so far)
//   {"command":"create_dm","user":U}   an Element-style encrypted DM: createRoom {preset trusted_private_chat,
//       is_direct true, invite [U], initial_state m.room.encryption {m.megolm.v1.aes-sha2, rotation_period_ms
//       604800000, rotation_period_msgs 100}}, then the room is added to account data m.direct under U
//       (read-modify-write); waits until the room is in the client's store   -> {"event":"room","room_id":R}
//   {"command":"joined_members","room":R}   -> {"event":"members","room_id":R,"joined":[USER...]}
//   {"command":"room_events","room":R,"limit":N}   GET /rooms/R/messages?dir=b&limit=N (default 100) with this
//       device's access token, as the server has them (no decryption)   -> {"event":"room_events","room_id":R,
//       "events":[{"event_id","type","sender","algorithm","relates_to","msgtype"}...]} oldest first; algorithm =
//       content.algorithm, relates_to = the cleartext content["m.relates_to"], msgtype = content.msgtype (each
//       null when absent)
//   {"command":"account_data","type":T}   this user's global account data of that type, read from the server
//       -> {"event":"account_data","type":T,"content":OBJECT | null}
//   {"command":"send_text","room":R,"body":TEXT}   an m.text message through client.sendEvent (encrypted in an
//       encrypted room)   -> {"event":"sent","room_id":R,"event_id":E}
//   {"command":"bootstrap_secret_storage","passphrase":P,"key_backup":BOOL}   (both optional) a new default
//       secret-storage key the way Element makes one (createRecoveryKeyFromPassphrase, then bootstrapSecretStorage
//       with setupNewSecretStorage: true), storing this device's cross-signing private keys (and, with key_backup,
//       a new key backup and its m.megolm_backup.v1 key); refused if this device does not hold all three
//       cross-signing private keys   -> {"event":"secret_storage","recovery_key":"EsT... (js-sdk's formatting)",
//       "key_id":ID,"passphrase":null | {algorithm,salt,iterations[,bits]},"key_backup":BOOL}
//   {"command":"restore_secret_storage","recovery_key":K}  or  {..., "passphrase":P}   reads the three
//       cross-signing private keys from secret storage with that key (checked against the default key's
//       iv/mac first), imports them (they must match the published public keys) and signs this device
//       -> {"event":"restored","key_id":ID,"master":BOOL,"self_signing":BOOL,"user_signing":BOOL,
//       "master_key":PUB}
//   {"command":"cross_signing_status"}   -> {"event":"cross_signing_status","master":BOOL,"self_signing":BOOL,
//       "user_signing":BOOL (private keys cached locally), "public_keys_on_device":BOOL,
//       "keys_in_secret_storage":BOOL, "secret_storage_ready":BOOL, "master_key":PUB | null (the published one)}
//   {"command":"export_secrets"}   -> {"event":"secrets","cross_signing":{master_key,self_signing_key,
//       user_signing_key} (unpadded base64 private keys, or null each),"backup":{algorithm,key,backup_version}
//       | null} (js-sdk's exportSecretsBundle(); refused unless all three cross-signing keys are cached)
//
// Events that arrive by themselves:
//   {"event":"invited","room_id":R,"inviter":U,"is_direct":BOOL}   whenever this user is invited to a room (also
//       for invites already pending at start-up)
//   {"event":"room","room_id":R,"auto_joined":true}   with --auto-join, once an invite has been joined
// Because the reply to create_room/create_dm/join is also `room`, a test that uses --auto-join should tell the two
// apart by the auto_joined field.

// ---------------------------------------------------------------------------------------------------------------
// stdout discipline: keep the real writer for our JSON lines, send everything else to stderr.

const writeStdout = process.stdout.write.bind(process.stdout);
process.stdout.write = (chunk, encoding, callback) => process.stderr.write(chunk, encoding, callback);

const LOG_LEVELS = { debug: 0, info: 1, warn: 2, error: 3, none: 4 };
const logLevel = LOG_LEVELS[process.env.MXV_DRIVER_LOG ?? "warn"] ?? LOG_LEVELS.warn;
const writeLog = (level, args) => {
    if (LOG_LEVELS[level] < logLevel) return;
    const text = args
        .map((a) => (typeof a === "string" ? a : a instanceof Error ? (a.stack ?? String(a)) : safeInspect(a)))
        .join(" ");
    process.stderr.write(`[driver ${new Date().toISOString()} ${level}] ${text}\n`);
};
const safeInspect = (v) => {
    try {
        return JSON.stringify(v);
    } catch {
        return String(v);
    }
};
console.log = (...a) => writeLog("debug", a);
console.debug = (...a) => writeLog("debug", a);
console.trace = (...a) => writeLog("debug", a);
console.info = (...a) => writeLog("info", a);
console.warn = (...a) => writeLog("warn", a);
console.error = (...a) => writeLog("error", a);

function emit(obj) {
    writeStdout(JSON.stringify(obj) + "\n");
}

// Imported after the console is redirected, so that nothing logged at module load time reaches stdout.
const sdk = await import("matrix-js-sdk");
const cryptoApi = await import("matrix-js-sdk/lib/crypto-api/index.js");
const { CryptoEvent, VerificationPhase, VerificationRequestEvent, VerifierEvent, CrossSigningKey } = cryptoApi;
const readline = await import("node:readline");

// ---------------------------------------------------------------------------------------------------------------
// Arguments

function parseArgs(argv) {
    const opts = {
        crossSigning: false,
        deviceId: undefined,
        pollTimeout: 1000,
        encryptVerification: false,
        autoJoin: false,
    };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        const value = () => {
            if (i + 1 >= argv.length) usage(`${a} needs a value`);
            return argv[++i];
        };
        switch (a) {
            case "--homeserver":
                opts.homeserver = value();
                break;
            case "--user":
                opts.user = value();
                break;
            case "--password":
                opts.password = value();
                break;
            case "--device-id":
                opts.deviceId = value();
                break;
            case "--cross-signing":
                opts.crossSigning = true;
                break;
            case "--encrypt-verification":
                opts.encryptVerification = true;
                break;
            case "--auto-join":
                opts.autoJoin = true;
                break;
            case "--poll-timeout":
                opts.pollTimeout = Number(value());
                if (!Number.isInteger(opts.pollTimeout) || opts.pollTimeout < 0) usage("--poll-timeout must be ms");
                break;
            default:
                usage(`unknown argument ${a}`);
        }
    }
    if (!opts.homeserver || !opts.user || !opts.password) usage("--homeserver, --user and --password are required");
    return opts;
}

function usage(msg) {
    process.stderr.write(
        `driver: ${msg}\nusage: driver.mjs --homeserver URL --user USER --password PASSWORD ` +
            `[--device-id ID] [--cross-signing] [--poll-timeout MS] [--encrypt-verification] [--auto-join]\n`,
    );
    process.exit(2);
}

const opts = parseArgs(process.argv.slice(2));

// The methods we offer (and accept) in every verification request, so that QR codes work in both directions.
const OUR_METHODS = ["m.sas.v1", "m.qr_code.show.v1", "m.qr_code.scan.v1", "m.reciprocate.v1"];

// How long `done` waits for js-sdk to report both the device and the user as verified (the user's trust lags
// verify() by a few tens of ms: the signature of their master key is made after the done message).
const TRUST_WAIT_MS = Number(process.env.MXV_DRIVER_TRUST_WAIT_MS ?? 3000);

// ---------------------------------------------------------------------------------------------------------------
// Verification flows

/** flow_id -> Flow */
const flows = new Map();

class Flow {
    constructor(request, direction) {
        this.request = request;
        this.direction = direction;
        this.flowId = request.transactionId;
        this.sent = new Set(); // events already emitted for this flow: ready, started, qr, qr_scanned, sas, done, cancelled
        this.verifier = undefined; // the Verifier we called verify() on
        this.cancelReason = null; // from verify()'s rejection, when there is one
        this.cancelBy = null;
        this.weCancelled = false; // we sent a cancel or mismatch
        this.qrGeneration = undefined; // the promise of our generateQRCode() call
        this.qrGenerated = false;
        this.scanning = false; // a scan_qr command arrived: no more QR codes to show
        this.onChange = () => this.update();
        this.cancelTimer = undefined;
        this.doneTimer = undefined;
        // js-sdk's request.otherDeviceId is only defined in some phases (an outgoing to-device request learns it
        // with the ready message, and it is gone again once the request is done): remember the last one seen.
        this.lastOtherDevice = request.otherDeviceId ?? null;
    }

    once(name, fn) {
        if (this.sent.has(name)) return;
        this.sent.add(name);
        fn();
    }

    otherUser() {
        return this.request.otherUserId;
    }

    otherDevice() {
        this.lastOtherDevice = this.request.otherDeviceId ?? this.lastOtherDevice;
        return this.lastOtherDevice;
    }

    // Called on every change of the request (and of its verifier, which js-sdk re-emits on the request).
    update() {
        const request = this.request;
        this.otherDevice();
        let phase;
        try {
            phase = request.phase;
        } catch (e) {
            console.warn(`flow ${this.flowId}: request.phase threw`, e);
            return;
        }
        if (phase === VerificationPhase.Cancelled) {
            this.scheduleCancelled();
            return;
        }
        if (phase >= VerificationPhase.Ready) {
            this.once("ready", () => emit({ event: "ready", flow_id: this.flowId }));
        }
        if (phase === VerificationPhase.Ready) this.maybeShowQr();
        const verifier = request.verifier; // only defined in phase Started
        if (verifier) this.attach(verifier);
        if (this.verifier) this.checkCallbacks(this.verifier);
        if (phase === VerificationPhase.Done && !this.sent.has("done")) {
            // verify() normally resolves at the same time; give it a moment before relying on the phase.
            this.doneTimer ??= setTimeout(() => void this.finish("phase"), 2000);
        }
    }

    maybeShowQr() {
        if (this.qrGeneration || this.scanning) return;
        if (!OUR_METHODS.includes("m.qr_code.show.v1")) return;
        if (!this.request.otherPartySupportsMethod("m.qr_code.scan.v1")) return;
        this.qrGeneration = this.request
            .generateQRCode()
            .then((bytes) => {
                if (!bytes) {
                    console.info(`flow ${this.flowId}: generateQRCode() gave no code`);
                    return;
                }
                this.qrGenerated = true;
                if (this.scanning || this.request.phase !== VerificationPhase.Ready) return;
                this.once("qr", () =>
                    emit({ event: "qr", flow_id: this.flowId, payload: Buffer.from(bytes).toString("base64") }),
                );
            })
            .catch((e) => console.warn(`flow ${this.flowId}: generateQRCode() failed`, e));
    }

    // js-sdk's request object keeps the verifier of the QR code it generated for us to show: if we then scan the
    // other side's code, scanQRCode() returns that stale verifier (whose verify() never completes) instead of the
    // one for the scanned code. A fresh request object for the same flow (from the crypto API's "in progress"
    // getters) has no verifier yet and picks up the right one, so switch to it before scanning.
    async requestForScanning() {
        this.scanning = true;
        await this.qrGeneration;
        if (!this.qrGenerated) return this.request;
        const r = this.request;
        const fresh = r.roomId
            ? e2ee.findVerificationRequestDMInProgress(r.roomId, r.otherUserId)
            : e2ee
                  .getVerificationRequestsToDeviceInProgress(r.otherUserId)
                  .find((x) => x.transactionId === this.flowId);
        if (!fresh || fresh.transactionId !== this.flowId) {
            console.warn(`flow ${this.flowId}: no fresh request object to scan with; using the old one`);
            return r;
        }
        r.off(VerificationRequestEvent.Change, this.onChange);
        this.request = fresh;
        fresh.on(VerificationRequestEvent.Change, this.onChange);
        return fresh;
    }

    // Take the verifier, tell the caller the method, and run verify() in the background.
    attach(verifier) {
        if (this.verifier === verifier) return;
        if (this.verifier) console.warn(`flow ${this.flowId}: the request's verifier changed`);
        this.verifier = verifier;
        this.once("started", () =>
            emit({ event: "started", flow_id: this.flowId, method: this.request.chosenMethod ?? null }),
        );
        verifier.on(VerifierEvent.ShowSas, () => this.checkCallbacks(verifier));
        verifier.on(VerifierEvent.ShowReciprocateQr, () => this.checkCallbacks(verifier));
        verifier.on(VerifierEvent.Cancel, () => this.update());
        verifier.verify().then(
            () => void this.finish("verify"),
            (e) => {
                const m = /cancelled by (us|them) with code ([^:]*): (.*)$/s.exec(e?.message ?? "");
                if (m) {
                    this.cancelBy = m[1];
                    this.cancelReason = m[3];
                } else {
                    this.cancelReason = e?.message ?? String(e);
                }
                this.scheduleCancelled(0);
            },
        );
        this.checkCallbacks(verifier);
    }

    checkCallbacks(verifier) {
        const sas = verifier.getShowSasCallbacks();
        if (sas) {
            this.once("sas", () =>
                emit({
                    event: "sas",
                    flow_id: this.flowId,
                    emoji: sas.sas.emoji ? sas.sas.emoji.map(([symbol, name]) => ({ symbol, name })) : null,
                    decimals: sas.sas.decimal ? [...sas.sas.decimal] : null,
                }),
            );
        }
        if (verifier.getReciprocateQrCodeCallbacks()) {
            this.once("qr_scanned", () => emit({ event: "qr_scanned", flow_id: this.flowId }));
        }
    }

    // Emitted a little after the request turns Cancelled so that verify()'s rejection (which carries the reason)
    // can be reported with it.
    scheduleCancelled(delay = 50) {
        if (this.sent.has("cancelled") || this.sent.has("done")) return;
        if (this.cancelTimer !== undefined && delay !== 0) return;
        clearTimeout(this.cancelTimer);
        this.cancelTimer = setTimeout(() => {
            this.once("cancelled", () => {
                const request = this.request;
                let by = this.cancelBy;
                if (!by) {
                    const canceller = request.cancellingUserId;
                    if (canceller && request.otherUserId !== ownUserId) {
                        by = canceller === ownUserId ? "us" : "them";
                    } else {
                        // self-verification without a verifier: js-sdk names the same user either way
                        by = this.weCancelled ? "us" : "them";
                    }
                }
                emit({
                    event: "cancelled",
                    flow_id: this.flowId,
                    code: request.cancellationCode ?? null,
                    reason: this.cancelReason,
                    by,
                });
            });
        }, delay);
    }

    async finish(via) {
        if (this.sent.has("done") || this.sent.has("cancelled")) return;
        this.sent.add("done");
        clearTimeout(this.doneTimer);
        const user = this.otherUser();
        const device = this.otherDevice();
        // The trust js-sdk records (local device trust, the signature on the other user's master key) may lag
        // behind the end of the protocol while the signature upload and the next key query run: poll briefly.
        const waitStart = Date.now();
        const deadline = waitStart + TRUST_WAIT_MS;
        let st;
        for (let first = true; ; first = false) {
            st = await trustOf(user, device);
            if (first) console.info(`flow ${this.flowId}: trust when verify() resolved: ${JSON.stringify(st)}`);
            if ((st.device_verified && st.user_verified) || Date.now() >= deadline) break;
            await sleep(20);
        }
        emit({
            event: "done",
            flow_id: this.flowId,
            device_verified: st.device_verified,
            user_verified: st.user_verified,
            other_user: user,
            other_device: device,
            signed_by_owner: st.signed_by_owner,
            cross_signing_verified: st.cross_signing_verified,
            locally_verified: st.locally_verified,
            trust_wait_ms: Date.now() - waitStart,
            ...(via === "phase" ? { via: "phase" } : {}),
        });
    }
}

// `deviceHint`: the device an outgoing to-device request was sent to (js-sdk only reports it after the ready).
function track(request, direction, deviceHint = null) {
    const flowId = request.transactionId;
    if (!flowId) throw new Error("verification request without a transaction id");
    if (flows.has(flowId)) return flows.get(flowId);
    const flow = new Flow(request, direction);
    flow.lastOtherDevice ??= deviceHint;
    flows.set(flowId, flow);
    emit({
        event: "request",
        flow_id: flowId,
        direction,
        other_user: request.otherUserId,
        other_device: flow.otherDevice(),
        // js-sdk's request.methods throws "not implemented" with the Rust crypto backend: for an incoming request
        // report the methods the sender offered, for an outgoing one those we offered.
        methods:
            direction === "incoming" ? OUR_METHODS.filter((m) => request.otherPartySupportsMethod(m)) : OUR_METHODS,
        transport: request.roomId ? "room" : "to_device",
        room: request.roomId ?? null,
    });
    request.on(VerificationRequestEvent.Change, flow.onChange);
    flow.update();
    return flow;
}

async function trustOf(user, device) {
    const ds = device ? await e2ee.getDeviceVerificationStatus(user, device) : null;
    const us = await e2ee.getUserVerificationStatus(user);
    return {
        known: ds !== null,
        device_verified: ds ? ds.isVerified() : false,
        signed_by_owner: ds ? ds.signedByOwner : false,
        cross_signing_verified: ds ? ds.crossSigningVerified : false,
        locally_verified: ds ? ds.localVerified : false,
        user_verified: us.isVerified(),
    };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------------------------
// Encrypted in-room verification, DMs, invites, secret storage

// Settings that the `set` command can change.
const settings = { encryptVerification: opts.encryptVerification, autoJoin: opts.autoJoin };

// A verification event as the room sees it: the request (an m.room.message with msgtype
// m.key.verification.request) or any m.key.verification.* event.
function isRoomVerificationEvent(type, content) {
    if (type.startsWith("m.key.verification.")) return true;
    return type === "m.room.message" && content?.msgtype === "m.key.verification.request";
}

// js-sdk's Rust crypto sends in-room verification events itself, bypassing client.sendEvent (so never encrypted):
// the request from RustCrypto.sendVerificationRequestContent (json response wanted), every later event from
// OutgoingRequestProcessor.makeOutgoingRequest for a RoomMessageRequest (json: false, the raw response text
// wanted). Both are `client.http.authedRequest("PUT", "/_matrix/client/v3/rooms/{room}/send/{type}/{txn}", …,
// {prefix: ""})` on the same MatrixHttpApi object. With encrypt_verification on, such a call for a verification
// event is answered by client.sendEvent instead, which encrypts in an encrypted room (client.sendEvent itself
// calls authedRequest with the path "/rooms/…" and the default prefix, so it is not caught again).
const SEND_PATH = /^\/_matrix\/client\/v3\/rooms\/([^/]+)\/send\/([^/]+)\/([^/]+)$/;
let interceptedSends = 0;

function installVerificationSendHook() {
    const http = client.http;
    const original = http.authedRequest.bind(http);
    http.authedRequest = async (method, path, queryParams, body, options = {}) => {
        const hooked = settings.encryptVerification && method === "PUT" && options?.prefix === "";
        const m = hooked && typeof path === "string" ? SEND_PATH.exec(path) : null;
        if (m) {
            const roomId = decodeURIComponent(m[1]);
            const type = decodeURIComponent(m[2]);
            let content;
            try {
                content = typeof body === "string" ? JSON.parse(body) : body;
            } catch {
                content = undefined;
            }
            if (content && typeof content === "object" && isRoomVerificationEvent(type, content)) {
                const res = await sendThroughClient(roomId, type, content);
                interceptedSends++;
                return options.json === false ? JSON.stringify(res) : res;
            }
        }
        return original(method, path, queryParams, body, options);
    };
}

// client.sendEvent only encrypts for a room it has in its store (it sends in the clear otherwise), so wait for
// the room first.
async function sendThroughClient(roomId, type, content) {
    const room = await waitForRoom(roomId, ["join"], 15000);
    if (!room) throw new Error(`room ${roomId} is not in the client's store: not sending ${type} in the clear`);
    const encrypted = room.hasEncryptionStateEvent();
    const res = await client.sendEvent(roomId, type, content);
    console.info(
        `sent ${type} in ${roomId} through client.sendEvent (${encrypted ? "encrypted" : "room not encrypted"}): ` +
            res.event_id,
    );
    return { event_id: res.event_id };
}

// The room once the client's store has it with our membership in `memberships`, or null after `ms`.
async function waitForRoom(roomId, memberships, ms) {
    const deadline = Date.now() + ms;
    for (;;) {
        const room = client.getRoom(roomId);
        if (room && memberships.includes(room.getMyMembership())) return room;
        if (Date.now() >= deadline) return null;
        await sleep(50);
    }
}

// Adds `roomId` to the account data m.direct under `userId` (read from the server, modified, written back).
async function addToDirect(userId, roomId) {
    let content = null;
    try {
        content = await client.getAccountDataFromServer("m.direct");
    } catch (e) {
        if (e?.httpStatus !== 404) throw e;
    }
    const direct = content && typeof content === "object" ? { ...content } : {};
    const rooms = Array.isArray(direct[userId]) ? [...direct[userId]] : [];
    if (rooms.includes(roomId)) return;
    rooms.push(roomId);
    direct[userId] = rooms;
    await client.setAccountData("m.direct", direct);
}

// Invites: `invited` for each, and with auto-join, a join (and for a DM invite, m.direct) in the background.
const invitesSeen = new Set();
function onMembership(event, member) {
    if (member.userId !== ownUserId || member.membership !== "invite") return;
    const key = `${member.roomId} ${event.getId() ?? event.getTs()}`;
    if (invitesSeen.has(key)) return;
    invitesSeen.add(key);
    const inviter = event.getSender() ?? null;
    const isDirect = event.getContent()?.is_direct === true;
    emit({ event: "invited", room_id: member.roomId, inviter, is_direct: isDirect });
    if (settings.autoJoin) void autoJoin(member.roomId, inviter, isDirect);
}

async function autoJoin(roomId, inviter, isDirect) {
    try {
        await client.joinRoom(roomId);
        if (isDirect && inviter) await addToDirect(inviter, roomId);
        await waitForRoom(roomId, ["join"], 15000);
        emit({ event: "room", room_id: roomId, auto_joined: true });
    } catch (e) {
        emit({ event: "error", message: `auto-join of ${roomId} failed: ${e?.message ?? e}`, command: null });
    }
}

// Secret-storage keys this device knows, by key ID (filled by js-sdk's cacheSecretStorageKey callback when we make
// a key, and by restore_secret_storage once a key passes the key check).
const secretStorageKeys = new Map();

const cryptoCallbacks = {
    // js-sdk asks for the key to one of `keys` (key ID -> key description) whenever it reads or writes a secret.
    getSecretStorageKey: async ({ keys }, name) => {
        for (const keyId of Object.keys(keys)) {
            const key = secretStorageKeys.get(keyId);
            if (key) return [keyId, key];
        }
        throw new Error(
            `no secret-storage key known for ${name} (key ${Object.keys(keys).join(", ")}): ` +
                `restore_secret_storage with its recovery key first`,
        );
    },
    cacheSecretStorageKey: (keyId, _keyInfo, key) => {
        secretStorageKeys.set(keyId, key);
    },
};

const CROSS_SIGNING_SECRETS = [
    "m.cross_signing.master",
    "m.cross_signing.self_signing",
    "m.cross_signing.user_signing",
];

async function crossSigningStatus() {
    const st = await e2ee.getCrossSigningStatus();
    const c = st.privateKeysCachedLocally;
    return {
        master: c.masterKey,
        self_signing: c.selfSigningKey,
        user_signing: c.userSigningKey,
        public_keys_on_device: st.publicKeysOnDevice,
        keys_in_secret_storage: st.privateKeysInSecretStorage,
    };
}

// The master key our user has published (as this device's js-sdk knows it), or null.
async function publishedMasterKey() {
    const keys = await e2ee.getUserCrossSigningKeys(ownUserId);
    const master = keys?.master_key?.keys;
    return master ? (Object.values(master)[0] ?? null) : null;
}

// js-sdk's authUploadDeviceSigningKeys callback: try without user-interactive auth, then with our password.
async function authWithPassword(makeRequest) {
    try {
        await makeRequest(null);
    } catch (e) {
        if (e?.httpStatus !== 401 || !e?.data?.flows) throw e;
        await makeRequest({
            type: "m.login.password",
            identifier: { type: "m.id.user", user: ownUserId },
            password: opts.password,
            session: e.data.session,
        });
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Commands

function flowOf(cmd) {
    if (typeof cmd.flow_id !== "string") throw new Error("flow_id (a string) is required");
    const flow = flows.get(cmd.flow_id);
    if (!flow) throw new Error(`unknown flow ${cmd.flow_id}`);
    return flow;
}

function str(cmd, field) {
    if (typeof cmd[field] !== "string" || cmd[field] === "") throw new Error(`${field} (a string) is required`);
    return cmd[field];
}

const commands = {
    async request(cmd) {
        const user = str(cmd, "user");
        let request;
        if (cmd.room !== undefined) {
            request = await e2ee.requestVerificationDM(user, str(cmd, "room"));
        } else if (cmd.device !== undefined) {
            request = await e2ee.requestDeviceVerification(user, str(cmd, "device"));
            track(request, "outgoing", cmd.device);
            return;
        } else if (user === ownUserId) {
            request = await e2ee.requestOwnUserVerification();
        } else {
            throw new Error("a request to another user needs a device or a room");
        }
        track(request, "outgoing");
    },

    async accept(cmd) {
        await flowOf(cmd).request.accept();
    },

    async start_sas(cmd) {
        const flow = flowOf(cmd);
        const verifier = await flow.request.startVerification("m.sas.v1");
        flow.attach(verifier);
    },

    async confirm(cmd) {
        const flow = flowOf(cmd);
        const v = flow.verifier;
        const sas = v?.getShowSasCallbacks();
        const qr = v?.getReciprocateQrCodeCallbacks();
        if (sas) await sas.confirm();
        else if (qr) qr.confirm();
        else throw new Error("nothing to confirm in this flow (no SAS shown, our QR code not scanned)");
    },

    async mismatch(cmd) {
        const flow = flowOf(cmd);
        const v = flow.verifier;
        const sas = v?.getShowSasCallbacks();
        const qr = v?.getReciprocateQrCodeCallbacks();
        flow.weCancelled = true;
        if (sas) sas.mismatch();
        else if (qr) qr.cancel();
        else throw new Error("nothing to reject in this flow (no SAS shown, our QR code not scanned)");
    },

    async cancel(cmd) {
        const flow = flowOf(cmd);
        flow.weCancelled = true;
        await flow.request.cancel();
    },

    async scan_qr(cmd) {
        const flow = flowOf(cmd);
        const bytes = Buffer.from(str(cmd, "payload"), "base64");
        const request = await flow.requestForScanning();
        const verifier = await request.scanQRCode(new Uint8ClampedArray(bytes));
        flow.attach(verifier);
    },

    async create_room(cmd) {
        const invite = cmd.invite ?? [];
        if (!Array.isArray(invite) || invite.some((u) => typeof u !== "string")) {
            throw new Error("invite must be a list of user IDs");
        }
        const { room_id } = await client.createRoom({
            invite,
            is_direct: cmd.direct === true,
            preset: cmd.direct === true ? "trusted_private_chat" : "private_chat",
            initial_state:
                cmd.encrypted === true
                    ? [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }]
                    : [],
        });
        emit({ event: "room", room_id });
    },

    async join(cmd) {
        const room = await client.joinRoom(str(cmd, "room"));
        emit({ event: "room", room_id: room.roomId });
    },

    async status(cmd) {
        const user = str(cmd, "user");
        const device = cmd.device === undefined ? null : str(cmd, "device");
        const st = await trustOf(user, device);
        emit({
            event: "status",
            user,
            device,
            device_verified: st.device_verified,
            user_verified: st.user_verified,
            // the device carries a valid signature of its owner's self-signing key
            cross_signed: st.signed_by_owner,
            known: st.known,
            cross_signing_verified: st.cross_signing_verified,
            locally_verified: st.locally_verified,
        });
    },

    async set(cmd) {
        for (const [field, key] of [
            ["encrypt_verification", "encryptVerification"],
            ["auto_join", "autoJoin"],
        ]) {
            if (cmd[field] === undefined) continue;
            if (typeof cmd[field] !== "boolean") throw new Error(`${field} must be true or false`);
            settings[key] = cmd[field];
        }
        emit({
            event: "settings",
            encrypt_verification: settings.encryptVerification,
            auto_join: settings.autoJoin,
            sent_through_send_event: interceptedSends,
        });
    },

    async create_dm(cmd) {
        const user = str(cmd, "user");
        const { room_id } = await client.createRoom({
            preset: "trusted_private_chat",
            is_direct: true,
            invite: [user],
            initial_state: [
                {
                    type: "m.room.encryption",
                    state_key: "",
                    content: {
                        algorithm: "m.megolm.v1.aes-sha2",
                        rotation_period_ms: 604800000,
                        rotation_period_msgs: 100,
                    },
                },
            ],
        });
        await addToDirect(user, room_id);
        if (!(await waitForRoom(room_id, ["join"], 15000))) console.warn(`room ${room_id} not in the store in 15 s`);
        emit({ event: "room", room_id });
    },

    async joined_members(cmd) {
        const room = str(cmd, "room");
        const { joined } = await client.getJoinedRoomMembers(room);
        emit({ event: "members", room_id: room, joined: Object.keys(joined ?? {}) });
    },

    async room_events(cmd) {
        const room = str(cmd, "room");
        const limit = cmd.limit === undefined ? 100 : cmd.limit;
        if (!Number.isInteger(limit) || limit < 1) throw new Error("limit must be a positive integer");
        const res = await client.http.authedRequest("GET", `/rooms/${encodeURIComponent(room)}/messages`, {
            dir: "b",
            limit: String(limit),
        });
        const field = (v) => (v === undefined ? null : v);
        const events = (res.chunk ?? [])
            .map((e) => ({
                event_id: e.event_id,
                type: e.type,
                sender: e.sender,
                algorithm: field(e.content?.algorithm),
                relates_to: field(e.content?.["m.relates_to"]),
                msgtype: field(e.content?.msgtype),
            }))
            .reverse();
        emit({ event: "room_events", room_id: room, events });
    },

    async account_data(cmd) {
        const type = str(cmd, "type");
        let content = null;
        try {
            content = await client.getAccountDataFromServer(type);
        } catch (e) {
            if (e?.httpStatus !== 404) throw e;
        }
        emit({ event: "account_data", type, content: content ?? null });
    },

    async send_text(cmd) {
        const room = str(cmd, "room");
        const body = typeof cmd.body === "string" ? cmd.body : "";
        if (!(await waitForRoom(room, ["join"], 15000))) throw new Error(`room ${room} is not in the client's store`);
        const res = await client.sendEvent(room, "m.room.message", { msgtype: "m.text", body });
        emit({ event: "sent", room_id: room, event_id: res.event_id });
    },

    async bootstrap_secret_storage(cmd) {
        if (cmd.passphrase !== undefined && (typeof cmd.passphrase !== "string" || cmd.passphrase === ""))
            throw new Error("passphrase must be a non-empty string");
        const cs = await crossSigningStatus();
        if (!(cs.master && cs.self_signing && cs.user_signing)) {
            throw new Error(
                "this device does not hold the cross-signing private keys (start it with --cross-signing, or " +
                    "get them by secret sharing or restore_secret_storage first)",
            );
        }
        let made;
        await e2ee.bootstrapSecretStorage({
            setupNewSecretStorage: true,
            setupNewKeyBackup: cmd.key_backup === true,
            createSecretStorageKey: async () => {
                made = await e2ee.createRecoveryKeyFromPassphrase(cmd.passphrase);
                return made;
            },
        });
        const keyId = await client.secretStorage.getDefaultKeyId();
        const info = keyId ? await client.getAccountDataFromServer(`m.secret_storage.key.${keyId}`) : null;
        emit({
            event: "secret_storage",
            recovery_key: made?.encodedPrivateKey ?? null,
            key_id: keyId,
            passphrase: info?.passphrase ?? null,
            key_backup: cmd.key_backup === true,
        });
    },

    async restore_secret_storage(cmd) {
        const def = await client.secretStorage.getKey();
        if (!def) throw new Error("this user has no default secret-storage key");
        const [keyId, info] = def;
        let key;
        if (cmd.recovery_key !== undefined) {
            key = cryptoApi.decodeRecoveryKey(str(cmd, "recovery_key"));
        } else if (cmd.passphrase !== undefined) {
            const pp = info.passphrase;
            if (!pp) throw new Error(`the default secret-storage key ${keyId} was not made from a passphrase`);
            key = await cryptoApi.deriveRecoveryKeyFromPassphrase(
                str(cmd, "passphrase"),
                pp.salt,
                pp.iterations,
                pp.bits ?? 256,
            );
        } else {
            throw new Error("recovery_key or passphrase (a string) is required");
        }
        if (!(await client.secretStorage.checkKey(key, info))) {
            throw new Error(`that key does not match the default secret-storage key ${keyId} (its iv/mac check fails)`);
        }
        secretStorageKeys.set(keyId, key);
        for (const name of CROSS_SIGNING_SECRETS) {
            const stored = await client.secretStorage.isStored(name);
            if (!stored || !(keyId in stored)) throw new Error(`secret storage has no ${name} under key ${keyId}`);
        }
        // With all three secrets in secret storage and not cached here, this imports them (refusing keys that do
        // not match the published public keys) and signs this device; it only creates new keys when neither
        // holds them, which the checks above rule out.
        await e2ee.bootstrapCrossSigning({});
        const cs = await crossSigningStatus();
        emit({
            event: "restored",
            key_id: keyId,
            master: cs.master,
            self_signing: cs.self_signing,
            user_signing: cs.user_signing,
            master_key: await publishedMasterKey(),
        });
    },

    async cross_signing_status() {
        const cs = await crossSigningStatus();
        emit({
            event: "cross_signing_status",
            ...cs,
            secret_storage_ready: await e2ee.isSecretStorageReady(),
            master_key: await publishedMasterKey(),
        });
    },

    async export_secrets() {
        const bundle = await e2ee.exportSecretsBundle();
        emit({ event: "secrets", cross_signing: bundle?.cross_signing ?? null, backup: bundle?.backup ?? null });
    },

    async sync() {
        await nextSync();
        emit({ event: "synced" });
    },

    async quit() {
        await shutdown(0);
    },
};

let shuttingDown = false;
async function shutdown(code) {
    if (shuttingDown) return;
    shuttingDown = true;
    try {
        client.stopClient();
    } catch (e) {
        console.warn("stopClient failed", e);
    }
    // flush stdout before leaving
    await new Promise((resolve) => writeStdout("", resolve));
    process.exit(code);
}

// ---------------------------------------------------------------------------------------------------------------
// Log in and start the client

let client, e2ee, ownUserId, ownDeviceId;

// Sync bookkeeping: `sync` waits for the next completed sync.
let syncWaiters = [];
const nextSync = () => new Promise((resolve) => syncWaiters.push(resolve));

async function startup() {
    const loginClient = sdk.createClient({ baseUrl: opts.homeserver });
    const passwordAuth = (session) => ({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: opts.user },
        password: opts.password,
        ...(session ? { session } : {}),
    });
    const logIn = () =>
        loginClient.loginRequest({
            ...passwordAuth(),
            ...(opts.deviceId ? { device_id: opts.deviceId } : {}),
            initial_device_display_name: "mxverify interop driver (matrix-js-sdk)",
        });
    let login = await logIn();
    if (opts.deviceId) {
        // Our crypto store lives in memory, so a device ID that already has keys on the server (from an earlier
        // run) cannot be reused as it is: Synapse refuses the new one-time keys. Delete that device, log in again.
        const probe = sdk.createClient({
            baseUrl: opts.homeserver,
            accessToken: login.access_token,
            userId: login.user_id,
            deviceId: login.device_id,
        });
        const keys = await probe.downloadKeysForUsers([login.user_id]);
        if (keys.device_keys?.[login.user_id]?.[login.device_id]) {
            console.warn(`device ${login.device_id} already has keys: deleting it and logging in again`);
            try {
                await probe.deleteDevice(login.device_id);
            } catch (e) {
                if (e?.httpStatus !== 401 || !e?.data?.flows) throw e;
                await probe.deleteDevice(login.device_id, passwordAuth(e.data.session));
            }
            login = await logIn();
        }
    }
    ownUserId = login.user_id;
    ownDeviceId = login.device_id;

    client = sdk.createClient({
        baseUrl: opts.homeserver,
        accessToken: login.access_token,
        userId: ownUserId,
        deviceId: ownDeviceId,
        verificationMethods: OUR_METHODS,
        cryptoCallbacks,
    });
    installVerificationSendHook();
    await client.initRustCrypto({ useIndexedDB: false });
    e2ee = client.getCrypto();
    e2ee.setSupportedVerificationMethods(OUR_METHODS);

    let firstSyncDone;
    const firstSync = new Promise((resolve) => (firstSyncDone = resolve));
    client.on(sdk.ClientEvent.Sync, (state) => {
        if (state === sdk.SyncState.Prepared || state === sdk.SyncState.Syncing) {
            firstSyncDone();
            const waiters = syncWaiters;
            syncWaiters = [];
            for (const w of waiters) w();
        }
    });
    client.on(sdk.RoomMemberEvent.Membership, (event, member) => {
        try {
            onMembership(event, member);
        } catch (e) {
            console.error("handling a membership change failed", e);
        }
    });
    client.on(CryptoEvent.VerificationRequestReceived, (request) => {
        try {
            track(request, "incoming");
        } catch (e) {
            console.error("tracking an incoming request failed", e);
        }
    });

    await client.startClient({ initialSyncLimit: 1, pollTimeout: opts.pollTimeout, lazyLoadMembers: false });
    await firstSync;

    if (opts.crossSigning) {
        await e2ee.bootstrapCrossSigning({ setupNewCrossSigning: true, authUploadDeviceSigningKeys: authWithPassword });
    }

    const ownKeys = await e2ee.getOwnDeviceKeys();
    emit({
        event: "ready_to_go",
        user: ownUserId,
        device: ownDeviceId,
        ed25519: ownKeys.ed25519,
        master_key: (await e2ee.getCrossSigningKeyId(CrossSigningKey.Master)) ?? null,
    });
}

process.on("unhandledRejection", (e) => console.error("unhandled rejection", e));

try {
    await startup();
} catch (e) {
    emit({ event: "error", message: `start-up failed: ${e?.message ?? e}`, command: null, fatal: true });
    try {
        client?.stopClient();
    } catch {}
    await new Promise((resolve) => writeStdout("", resolve));
    process.exit(1);
}

// ---------------------------------------------------------------------------------------------------------------
// The command loop

let queue = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on("line", (line) => {
    if (line.trim() === "") return;
    queue = queue.then(() => runLine(line));
});
rl.on("close", () => {
    queue = queue.then(() => shutdown(0));
});

async function runLine(line) {
    let cmd;
    try {
        cmd = JSON.parse(line);
    } catch (e) {
        emit({ event: "error", message: `not JSON: ${e.message}`, command: null });
        return;
    }
    const name = cmd && typeof cmd === "object" ? cmd.command : undefined;
    const handler = typeof name === "string" && Object.hasOwn(commands, name) ? commands[name] : undefined;
    if (!handler) {
        emit({ event: "error", message: `unknown command ${JSON.stringify(name ?? null)}`, command: name ?? null });
        return;
    }
    try {
        await handler(cmd);
    } catch (e) {
        emit({ event: "error", message: e?.message ?? String(e), command: name });
    }
}
