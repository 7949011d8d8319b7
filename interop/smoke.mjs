// js <-> js check of interop/driver.mjs against the local Synapse (run through interop/smoke.sh).
//
//   NODE22 interop/smoke.mjs --homeserver URL [--runs N] [--only abcdef]
//
// Each scenario uses a fresh pair of users (alice-*, bob-*), each with a driver started with --cross-signing,
// sharing an encrypted room so that js-sdk knows the other side's devices:
//   (a) to-device SAS        alice requests bob's device, bob accepts, alice starts SAS, both confirm
//   (b) in-room SAS          the same in an unencrypted DM room
//   (c) QR                   bob shows a QR code, alice scans it, bob confirms, both done
//   (d) cancel               bob cancels alice's request before accepting: both see m.user
//   (e) mismatch             bob says the emoji differ: both see m.mismatched_sas
//   (f) self-verification    a second device of alice (no --cross-signing) asks for verification of its own user;
//                            alice's first device accepts, SAS; the new device leaves alice's cross-signing keys
//                            alone and then receives the private keys by secret sharing
//   (g) encrypted DM         alice makes an Element-style encrypted DM (create_dm), bob (auto_join) joins it; in-room
//                            SAS with js-sdk's own behaviour: its verification events are in the clear on the wire
//   (h) one side encrypts    the same with alice switched to encrypt_verification (set): alice's verification events
//                            are m.room.encrypted on the wire (m.relates_to in the clear), bob's are not
//   (i) both encrypt         both started with --encrypt-verification: every verification event is m.room.encrypted
//   (j) secret storage       alice bootstraps secret storage (recovery key), a second device restores the
//                            cross-signing keys with it (a wrong key is refused); then a passphrase key, restored
//                            on a third device with the passphrase
//   (k) pending invite       alice invites dave to a DM while dave's driver is not running; dave, started with
//                            --auto-join, reports the invite and joins; alice and dave verify in that DM, dave
//                            requesting, both encrypting
// then times N to-device SAS verifications (request command -> both `done`) on one pair and prints the median.
// The last line of stdout is "N passed, M failed"; the exit status is non-zero on failure.
// Driver logs (stderr) go to .state/interop-smoke/<run>/.

import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { DriverProcess, register } from "./jsonl.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..");

const args = process.argv.slice(2);
const argValue = (name, dflt) => {
    const i = args.indexOf(name);
    return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
};
const HOMESERVER = argValue("--homeserver", "http://127.0.0.1:18448");
const RUNS = Number(argValue("--runs", "5"));
const ONLY = argValue("--only", "abcdefghijk"); // which scenarios to run, e.g. --only ac
const WAIT_MS = Number(process.env.SMOKE_WAIT_MS ?? 30000);

const RUN_ID = `${Date.now().toString(36)}${process.pid.toString(36)}`;
const LOG_DIR = join(ROOT, ".state", "interop-smoke", RUN_ID);
mkdirSync(LOG_DIR, { recursive: true });

// ---------------------------------------------------------------------------------------------------------------
// A driver process

class Driver extends DriverProcess {
    constructor(name, localpart, password, crossSigning = true, extraArgs = []) {
        super(name, {
            homeserver: HOMESERVER,
            user: localpart,
            password,
            args: [...(crossSigning ? ["--cross-signing"] : []), ...extraArgs],
            log: join(LOG_DIR, `${name}.log`),
            waitMs: WAIT_MS,
            exitedText: "driver exited",
            flowInWhat: false,
            endLogWithStderr: true,
        });
    }

    // Events of this flow seen so far (taken or not).
    flowEvents(flowId) {
        return this.events.filter((e) => e.flow_id === flowId).map((e) => e.event);
    }

    errors() {
        return this.events.filter((e) => e.event === "error" || e.event === "__not_json__");
    }
}

// A fresh alice/bob pair sharing an encrypted room, each knowing the other's device. `args`: more driver arguments
// for both.
async function pair(tag, args = []) {
    const names = { alice: `alice-${RUN_ID}-${tag}`, bob: `bob-${RUN_ID}-${tag}` };
    const password = `pw-${RUN_ID}`;
    register(names.alice, password);
    register(names.bob, password);
    const alice = new Driver(`${tag}-alice`, names.alice, password, true, args);
    const bob = new Driver(`${tag}-bob`, names.bob, password, true, args);
    await Promise.all([alice.ready(), bob.ready()]);
    const room = await alice.command({ command: "create_room", invite: [bob.user], encrypted: true }, "room");
    await bob.command({ command: "join", room: room.room_id }, "room");
    await Promise.all([alice.waitUntilKnown(bob.user, bob.device), bob.waitUntilKnown(alice.user, alice.device)]);
    return { alice, bob, names, password };
}

async function syncBoth(x, y) {
    await Promise.all([x.sync(), y.sync()]);
}

// ---------------------------------------------------------------------------------------------------------------
// Checks

let passed = 0;
let failed = 0;
const notes = [];

function check(cond, msg) {
    if (!cond) throw new Error(msg);
}

async function scenario(name, fn) {
    if (!ONLY.includes(name[1])) return;
    const t0 = performance.now();
    try {
        await fn();
        passed++;
        console.log(`PASS ${name} (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
    } catch (e) {
        failed++;
        console.log(`FAIL ${name}: ${e.message}`);
    }
}

// A SAS verification between alice (requester, starter) and bob, to-device or in a room. Returns the time from the
// request command to both `done` events, in ms.
async function sas(alice, bob, room) {
    const t0 = performance.now();
    const req = room
        ? { command: "request", user: bob.user, room }
        : { command: "request", user: bob.user, device: bob.device };
    const out = await alice.command(req, "request");
    const flow = out.flow_id;
    check(out.direction === "outgoing", `alice's request is ${out.direction}`);
    check(out.transport === (room ? "room" : "to_device"), `alice's transport is ${out.transport}`);
    const inc = await bob.event("request", flow);
    check(inc.direction === "incoming", `bob's request is ${inc.direction}`);
    check(inc.other_user === alice.user, `bob sees the request from ${inc.other_user}`);
    check(inc.methods.includes("m.sas.v1"), `bob's request offers ${JSON.stringify(inc.methods)}`);
    if (room) check(inc.room === room, `bob's request is in room ${inc.room}`);
    else check(inc.other_device === alice.device, `bob sees the request from device ${inc.other_device}`);
    bob.send({ command: "accept", flow_id: flow });
    await Promise.all([alice.event("ready", flow), bob.event("ready", flow)]);
    alice.send({ command: "start_sas", flow_id: flow });
    const [sa, sb] = await Promise.all([alice.event("sas", flow), bob.event("sas", flow)]);
    const [sta, stb] = await Promise.all([alice.event("started", flow), bob.event("started", flow)]);
    check(sta.method === "m.sas.v1" && stb.method === "m.sas.v1", `started with ${sta.method} / ${stb.method}`);
    check(Array.isArray(sa.emoji) && sa.emoji.length === 7, `alice's emoji: ${JSON.stringify(sa.emoji)}`);
    check(JSON.stringify(sa.emoji) === JSON.stringify(sb.emoji), "alice and bob see different emoji");
    check(JSON.stringify(sa.decimals) === JSON.stringify(sb.decimals), "alice and bob see different decimals");
    alice.send({ command: "confirm", flow_id: flow });
    bob.send({ command: "confirm", flow_id: flow });
    const [da, db] = await Promise.all([alice.event("done", flow), bob.event("done", flow)]);
    const elapsed = Math.max(da.__t, db.__t) - t0;
    check(
        da.device_verified && db.device_verified,
        `device_verified alice=${da.device_verified} bob=${db.device_verified}`,
    );
    check(da.user_verified && db.user_verified, `user_verified alice=${da.user_verified} bob=${db.user_verified}`);
    for (const d of [alice, bob]) {
        const errs = d.errors();
        check(errs.length === 0, `${d.name} reported errors: ${JSON.stringify(errs)}`);
        check(!d.flowEvents(flow).includes("cancelled"), `${d.name} saw the flow cancelled`);
    }
    return { flow, elapsed, aliceDone: da.__t - t0, bobDone: db.__t - t0 };
}

const pairs = [];
async function withPair(tag, fn, args = []) {
    const p = await pair(tag, args);
    pairs.push(p);
    try {
        await fn(p);
    } finally {
        await Promise.all([p.alice.stop(), p.bob.stop()]);
    }
}

const timings = [];

await scenario("(a) to-device SAS", () =>
    withPair("a", async ({ alice, bob }) => {
        const before = await alice.command({ command: "status", user: bob.user, device: bob.device }, "status");
        check(!before.device_verified && !before.user_verified, "bob is already verified before the verification");
        const r = await sas(alice, bob);
        timings.push(r.elapsed);
        const after = await alice.command({ command: "status", user: bob.user, device: bob.device }, "status");
        check(
            after.device_verified && after.user_verified,
            `alice's status of bob afterwards: ${JSON.stringify(after)}`,
        );
        const back = await bob.command({ command: "status", user: alice.user, device: alice.device }, "status");
        check(back.device_verified && back.user_verified, `bob's status of alice afterwards: ${JSON.stringify(back)}`);
        // more runs on the same pair, for the timing (js-sdk needs a sync between two verifications of one user)
        for (let i = 1; i < RUNS; i++) {
            await syncBoth(alice, bob);
            timings.push((await sas(alice, bob)).elapsed);
        }
    }),
);

await scenario("(b) in-room SAS (unencrypted DM)", () =>
    withPair("b", async ({ alice, bob }) => {
        const dm = await alice.command(
            { command: "create_room", invite: [bob.user], encrypted: false, direct: true },
            "room",
        );
        await bob.command({ command: "join", room: dm.room_id }, "room");
        await syncBoth(alice, bob);
        const r = await sas(alice, bob, dm.room_id);
        check(r.flow.startsWith("$"), `in-room flow id ${r.flow} is not an event ID`);
        notes.push(`in-room SAS took ${r.elapsed.toFixed(0)} ms`);
    }),
);

await scenario("(c) QR: bob shows, alice scans", () =>
    withPair("c", async ({ alice, bob }) => {
        const out = await alice.command({ command: "request", user: bob.user, device: bob.device }, "request");
        const flow = out.flow_id;
        await bob.event("request", flow);
        bob.send({ command: "accept", flow_id: flow });
        await Promise.all([alice.event("ready", flow), bob.event("ready", flow)]);
        const qr = await bob.event("qr", flow);
        check(
            typeof qr.payload === "string" && Buffer.from(qr.payload, "base64").subarray(0, 6).toString() === "MATRIX",
            `bob's QR payload ${qr.payload}`,
        );
        alice.send({ command: "scan_qr", flow_id: flow, payload: qr.payload });
        const sa = await alice.event("started", flow);
        check(sa.method === "m.reciprocate.v1", `alice started ${sa.method}`);
        await bob.event("qr_scanned", flow);
        const sb = await bob.event("started", flow);
        check(sb.method === "m.reciprocate.v1", `bob started ${sb.method}`);
        bob.send({ command: "confirm", flow_id: flow });
        const [da, db] = await Promise.all([alice.event("done", flow), bob.event("done", flow)]);
        check(
            da.device_verified && db.device_verified,
            `device_verified alice=${da.device_verified} bob=${db.device_verified}`,
        );
        check(da.user_verified && db.user_verified, `user_verified alice=${da.user_verified} bob=${db.user_verified}`);
        for (const d of [alice, bob]) check(d.errors().length === 0, `${d.name} errors: ${JSON.stringify(d.errors())}`);
    }),
);

await scenario("(d) bob cancels the request", () =>
    withPair("d", async ({ alice, bob }) => {
        const out = await alice.command({ command: "request", user: bob.user, device: bob.device }, "request");
        const flow = out.flow_id;
        await bob.event("request", flow);
        bob.send({ command: "cancel", flow_id: flow });
        const [ca, cb] = await Promise.all([alice.event("cancelled", flow), bob.event("cancelled", flow)]);
        check(ca.code === "m.user" && cb.code === "m.user", `codes alice=${ca.code} bob=${cb.code}`);
        check(ca.by === "them" && cb.by === "us", `by alice=${ca.by} bob=${cb.by}`);
        notes.push(`cancel reasons: alice=${JSON.stringify(ca.reason)} bob=${JSON.stringify(cb.reason)}`);
        for (const d of [alice, bob]) check(d.errors().length === 0, `${d.name} errors: ${JSON.stringify(d.errors())}`);
    }),
);

await scenario("(e) bob reports a SAS mismatch", () =>
    withPair("e", async ({ alice, bob }) => {
        const out = await alice.command({ command: "request", user: bob.user, device: bob.device }, "request");
        const flow = out.flow_id;
        await bob.event("request", flow);
        bob.send({ command: "accept", flow_id: flow });
        await Promise.all([alice.event("ready", flow), bob.event("ready", flow)]);
        alice.send({ command: "start_sas", flow_id: flow });
        await Promise.all([alice.event("sas", flow), bob.event("sas", flow)]);
        bob.send({ command: "mismatch", flow_id: flow });
        const [ca, cb] = await Promise.all([alice.event("cancelled", flow), bob.event("cancelled", flow)]);
        check(
            ca.code === "m.mismatched_sas" && cb.code === "m.mismatched_sas",
            `codes alice=${ca.code} bob=${cb.code}`,
        );
        check(ca.by === "them" && cb.by === "us", `by alice=${ca.by} bob=${cb.by}`);
        notes.push(`mismatch reasons: alice=${JSON.stringify(ca.reason)} bob=${JSON.stringify(cb.reason)}`);
        const st = await alice.command({ command: "status", user: bob.user, device: bob.device }, "status");
        check(!st.device_verified && !st.user_verified, `alice trusts bob after a mismatch: ${JSON.stringify(st)}`);
        for (const d of [alice, bob]) check(!d.flowEvents(flow).includes("done"), `${d.name} saw done`);
    }),
);

await scenario("(f) self-verification (request to own user)", () =>
    withPair("f", async ({ alice, bob, names, password }) => {
        const alice2 = new Driver("f-alice2", names.alice, password, false);
        try {
            const r = await alice2.event("ready_to_go");
            check(r.master_key === null, `a device without --cross-signing has master key ${r.master_key}`);
            await alice.waitUntilKnown(alice.user, r.device);
            const out = await alice2.command({ command: "request", user: alice.user }, "request");
            const flow = out.flow_id;
            const inc = await alice.event("request", flow);
            check(inc.other_user === alice.user && inc.other_device === r.device, `alice sees ${JSON.stringify(inc)}`);
            alice.send({ command: "accept", flow_id: flow });
            await Promise.all([alice.event("ready", flow), alice2.event("ready", flow)]);
            alice2.send({ command: "start_sas", flow_id: flow });
            const [s1, s2] = await Promise.all([alice.event("sas", flow), alice2.event("sas", flow)]);
            check(JSON.stringify(s1.emoji) === JSON.stringify(s2.emoji), "the two devices see different emoji");
            alice.send({ command: "confirm", flow_id: flow });
            alice2.send({ command: "confirm", flow_id: flow });
            const [d1, d2] = await Promise.all([alice.event("done", flow), alice2.event("done", flow)]);
            check(
                d1.device_verified && d2.device_verified,
                `device_verified ${d1.device_verified} ${d2.device_verified}`,
            );
            notes.push(
                `self-verification user_verified: first device ${d1.user_verified}, new device ${d2.user_verified}`,
            );
            // the new device (started without --cross-signing) did not replace alice's cross-signing keys ...
            const cs1 = await alice.command({ command: "cross_signing_status" }, "cross_signing_status");
            check(cs1.master_key === alice.masterKey, `alice's master key changed: ${JSON.stringify(cs1)}`);
            // ... and receives the private keys from alice's first device (m.secret.request / m.secret.send)
            const cs2 = await waitForCrossSigningKeys(alice2);
            check(cs2.master_key === alice.masterKey, `the new device sees master key ${cs2.master_key}`);
        } finally {
            await alice2.stop();
        }
    }),
);

// The DM: alice makes it, bob (auto_join on) joins; checks the invite and the members.
async function encryptedDm(alice, bob) {
    const settings = await bob.command({ command: "set", auto_join: true }, "settings");
    check(settings.auto_join === true, `bob's settings ${JSON.stringify(settings)}`);
    const dm = await alice.command({ command: "create_dm", user: bob.user }, "room");
    const room = dm.room_id;
    const inv = await bob.take((e) => e.event === "invited" && e.room_id === room, "invited");
    check(inv.inviter === alice.user && inv.is_direct === true, `bob's invite ${JSON.stringify(inv)}`);
    await bob.take((e) => e.event === "room" && e.room_id === room && e.auto_joined === true, "auto-join");
    const direct = await alice.command({ command: "account_data", type: "m.direct" }, "account_data");
    check(direct.content?.[bob.user]?.includes(room), `alice's m.direct ${JSON.stringify(direct.content)}`);
    const bobDirect = await bob.command({ command: "account_data", type: "m.direct" }, "account_data");
    check(bobDirect.content?.[alice.user]?.includes(room), `bob's m.direct ${JSON.stringify(bobDirect.content)}`);
    const m = await alice.command({ command: "joined_members", room }, "members");
    check(
        m.joined.length === 2 && m.joined.includes(alice.user) && m.joined.includes(bob.user),
        `members ${JSON.stringify(m.joined)}`,
    );
    await syncBoth(alice, bob);
    return room;
}

// The verification events of `sender` in `room` as the server has them: [{event_id, type, algorithm, relates_to,
// msgtype}], encrypted ones included (everything m.room.encrypted by that sender counts, as nothing else is sent).
async function wireEvents(reader, room, sender) {
    const r = await reader.command({ command: "room_events", room }, "room_events");
    return r.events.filter(
        (e) =>
            e.sender === sender &&
            (e.type === "m.room.encrypted" ||
                e.type.startsWith("m.key.verification.") ||
                (e.type === "m.room.message" && e.msgtype === "m.key.verification.request")),
    );
}

function checkWire(events, encrypted, who, ...flows) {
    check(events.length >= 3, `${who}: only ${events.length} verification events on the wire`);
    for (const e of events) {
        if (encrypted) {
            check(
                e.type === "m.room.encrypted" && e.algorithm === "m.megolm.v1.aes-sha2",
                `${who}: ${e.type} (${e.algorithm}) on the wire, not Megolm`,
            );
            if (!flows.includes(e.event_id))
                check(
                    e.relates_to?.rel_type === "m.reference" && flows.includes(e.relates_to?.event_id),
                    `${who}: encrypted event ${e.event_id} has cleartext m.relates_to ${JSON.stringify(e.relates_to)}`,
                );
        } else {
            check(e.type !== "m.room.encrypted", `${who}: an m.room.encrypted event on the wire`);
        }
    }
}

// Polls `cross_signing_status` until the device holds all three private keys (10 s).
async function waitForCrossSigningKeys(d, ms = 10000) {
    const deadline = performance.now() + ms;
    for (;;) {
        const st = await d.command({ command: "cross_signing_status" }, "cross_signing_status");
        if (st.master && st.self_signing && st.user_signing) return st;
        if (performance.now() > deadline) throw new Error(`${d.name} never got the keys: ${JSON.stringify(st)}`);
        await new Promise((r) => setTimeout(r, 200));
    }
}

await scenario("(g) encrypted DM, js-sdk's own (cleartext) verification events", () =>
    withPair("g", async ({ alice, bob }) => {
        const room = await encryptedDm(alice, bob);
        const r = await sas(alice, bob, room);
        checkWire(await wireEvents(alice, room, alice.user), false, "alice", r.flow);
        checkWire(await wireEvents(alice, room, bob.user), false, "bob", r.flow);
        notes.push(`in-room SAS in an encrypted DM, cleartext: ${r.elapsed.toFixed(0)} ms`);
    }),
);

await scenario("(h) encrypted DM, alice encrypts her verification events", () =>
    withPair("h", async ({ alice, bob }) => {
        const room = await encryptedDm(alice, bob);
        const s = await alice.command({ command: "set", encrypt_verification: true }, "settings");
        check(s.encrypt_verification === true, `alice's settings ${JSON.stringify(s)}`);
        const r = await sas(alice, bob, room);
        checkWire(await wireEvents(bob, room, alice.user), true, "alice", r.flow);
        checkWire(await wireEvents(bob, room, bob.user), false, "bob", r.flow);
        notes.push(`in-room SAS in an encrypted DM, requester encrypts: ${r.elapsed.toFixed(0)} ms`);
        // and bob requests, so that an encrypted event answers his cleartext request
        await syncBoth(alice, bob);
        const r2 = await sas(bob, alice, room);
        checkWire(await wireEvents(bob, room, alice.user), true, "alice (both flows)", r.flow, r2.flow);
    }),
);

await scenario("(i) encrypted DM, both sides encrypt", () =>
    withPair(
        "i",
        async ({ alice, bob }) => {
            const room = await encryptedDm(alice, bob);
            const r = await sas(alice, bob, room);
            checkWire(await wireEvents(alice, room, alice.user), true, "alice", r.flow);
            checkWire(await wireEvents(alice, room, bob.user), true, "bob", r.flow);
            const text = await alice.command({ command: "send_text", room, body: "hello" }, "sent");
            const after = await bob.command({ command: "room_events", room }, "room_events");
            const sent = after.events.find((e) => e.event_id === text.event_id);
            check(sent?.type === "m.room.encrypted", `send_text went out as ${JSON.stringify(sent)}`);
            notes.push(`in-room SAS in an encrypted DM, both encrypt: ${r.elapsed.toFixed(0)} ms`);
        },
        ["--encrypt-verification"],
    ),
);

await scenario("(j) secret storage: bootstrap, restore on another device, passphrase", async () => {
    const name = `carol-${RUN_ID}-j`;
    const password = `pw-${RUN_ID}`;
    register(name, password);
    const carol = new Driver("j-carol", name, password, true);
    const devices = [carol];
    try {
        await carol.ready();
        const ss = await carol.command({ command: "bootstrap_secret_storage" }, "secret_storage", 60000);
        const shape = /^Es[STU][1-9A-Za-z]( [1-9A-Za-z]{4}){11}$/;
        check(shape.test(ss.recovery_key ?? ""), `recovery key ${ss.recovery_key}`);
        check(typeof ss.key_id === "string" && ss.passphrase === null, `secret_storage ${JSON.stringify(ss)}`);
        const st = await carol.command({ command: "cross_signing_status" }, "cross_signing_status");
        check(st.secret_storage_ready && st.keys_in_secret_storage, `carol's status ${JSON.stringify(st)}`);
        const exported = await carol.command({ command: "export_secrets" }, "secrets");
        check(typeof exported.cross_signing?.master_key === "string", `export_secrets ${JSON.stringify(exported)}`);

        const carol2 = new Driver("j-carol2", name, password, false);
        devices.push(carol2);
        await carol2.ready();
        const before = await carol2.command({ command: "cross_signing_status" }, "cross_signing_status");
        check(!before.master && !before.self_signing && !before.user_signing, `carol2 ${JSON.stringify(before)}`);
        check(before.master_key === carol.masterKey, `carol2 sees master ${before.master_key}, not ${carol.masterKey}`);
        // a wrong recovery key: a valid encoding of another key (all zero bytes)
        const wrong = "EsSz ygLv VP1b xF1C v7kE eBQx MxDP buG5 w25T L3b6 hfyG Kkrd";
        let refused = null;
        try {
            await carol2.command({ command: "restore_secret_storage", recovery_key: wrong }, "restored");
        } catch (e) {
            refused = e.message;
        }
        check(refused !== null && /does not match/.test(refused), `a wrong recovery key: ${refused}`);
        const restored = await carol2.command(
            { command: "restore_secret_storage", recovery_key: ss.recovery_key },
            "restored",
        );
        check(
            restored.master && restored.self_signing && restored.user_signing && restored.key_id === ss.key_id,
            `restored ${JSON.stringify(restored)}`,
        );
        check(restored.master_key === carol.masterKey, `restored master ${restored.master_key}`);
        const ex2 = await carol2.command({ command: "export_secrets" }, "secrets");
        check(
            JSON.stringify(ex2.cross_signing) === JSON.stringify(exported.cross_signing),
            "carol2's private keys differ from carol's",
        );
        // carol2 is now cross-signed by the restored self-signing key, as carol sees it
        await carol.waitUntilKnown(carol.user, carol2.device);
        let signed = false;
        for (let i = 0; i < 20 && !signed; i++) {
            const s = await carol.command({ command: "status", user: carol.user, device: carol2.device }, "status");
            signed = s.cross_signed;
            if (!signed) await carol.sync();
        }
        check(signed, "carol does not see carol2 cross-signed after the restore");

        // a key made from a passphrase, restored with the passphrase on a third device
        const pp = await carol.command(
            { command: "bootstrap_secret_storage", passphrase: "correct horse battery staple" },
            "secret_storage",
            120000,
        );
        check(
            pp.passphrase?.algorithm === "m.pbkdf2" && Number.isInteger(pp.passphrase?.iterations),
            `passphrase ${JSON.stringify(pp.passphrase)}`,
        );
        check(pp.key_id !== ss.key_id, "the passphrase key has the same ID as the first");
        const carol3 = new Driver("j-carol3", name, password, false);
        devices.push(carol3);
        await carol3.ready();
        const r3 = await carol3.command(
            { command: "restore_secret_storage", passphrase: "correct horse battery staple" },
            "restored",
            120000,
        );
        check(r3.master && r3.self_signing && r3.user_signing && r3.key_id === pp.key_id, `r3 ${JSON.stringify(r3)}`);
        notes.push(`secret storage: passphrase ${JSON.stringify(pp.passphrase)}`);
        const expected = (e) => e.command === "restore_secret_storage" && /does not match/.test(e.message);
        for (const d of devices) {
            const errs = d.errors().filter((e) => !expected(e));
            check(errs.length === 0, `${d.name} errors: ${JSON.stringify(errs)}`);
        }
    } finally {
        await Promise.all(devices.map((d) => d.stop()));
    }
});

await scenario("(k) invite pending at start-up, --auto-join", async () => {
    const names = { alice: `alice-${RUN_ID}-k`, dave: `dave-${RUN_ID}-k` };
    const password = `pw-${RUN_ID}`;
    register(names.alice, password);
    const daveId = register(names.dave, password);
    const alice = new Driver("k-alice", names.alice, password, true, ["--encrypt-verification"]);
    const devices = [alice];
    try {
        await alice.ready();
        const dm = await alice.command({ command: "create_dm", user: daveId }, "room");
        const dave = new Driver("k-dave", names.dave, password, true, ["--encrypt-verification", "--auto-join"]);
        devices.push(dave);
        await dave.ready();
        const inv = await dave.take((e) => e.event === "invited" && e.room_id === dm.room_id, "invited");
        check(inv.inviter === alice.user && inv.is_direct === true, `dave's invite ${JSON.stringify(inv)}`);
        await dave.take((e) => e.event === "room" && e.room_id === dm.room_id && e.auto_joined, "auto-join");
        const direct = await dave.command({ command: "account_data", type: "m.direct" }, "account_data");
        check(direct.content?.[alice.user]?.includes(dm.room_id), `dave's m.direct ${JSON.stringify(direct.content)}`);
        await syncBoth(alice, dave);
        const r = await sas(dave, alice, dm.room_id);
        checkWire(await wireEvents(alice, dm.room_id, alice.user), true, "alice", r.flow);
        checkWire(await wireEvents(alice, dm.room_id, dave.user), true, "dave", r.flow);
    } finally {
        await Promise.all(devices.map((d) => d.stop()));
    }
});

if (timings.length > 0) {
    const sorted = [...timings].sort((x, y) => x - y);
    const median = sorted[Math.floor(sorted.length / 2)];
    console.log(
        `to-device SAS, request -> both done, ${timings.length} runs: ` +
            `${timings.map((t) => t.toFixed(0)).join(", ")} ms; median ${median.toFixed(0)} ms`,
    );
}
for (const n of notes) console.log(`note: ${n}`);
if (failed > 0) console.log(`driver logs: ${LOG_DIR}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 ? 1 : 0);
