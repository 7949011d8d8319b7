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
//                            alice's first device accepts, SAS
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
const ONLY = argValue("--only", "abcdef"); // which scenarios to run, e.g. --only ac
const WAIT_MS = Number(process.env.SMOKE_WAIT_MS ?? 30000);

const RUN_ID = `${Date.now().toString(36)}${process.pid.toString(36)}`;
const LOG_DIR = join(ROOT, ".state", "interop-smoke", RUN_ID);
mkdirSync(LOG_DIR, { recursive: true });

// ---------------------------------------------------------------------------------------------------------------
// A driver process

class Driver extends DriverProcess {
    constructor(name, localpart, password, crossSigning = true) {
        super(name, {
            homeserver: HOMESERVER,
            user: localpart,
            password,
            args: crossSigning ? ["--cross-signing"] : [],
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

// A fresh alice/bob pair sharing an encrypted room, each knowing the other's device.
async function pair(tag) {
    const names = { alice: `alice-${RUN_ID}-${tag}`, bob: `bob-${RUN_ID}-${tag}` };
    const password = `pw-${RUN_ID}`;
    register(names.alice, password);
    register(names.bob, password);
    const alice = new Driver(`${tag}-alice`, names.alice, password);
    const bob = new Driver(`${tag}-bob`, names.bob, password);
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
async function withPair(tag, fn) {
    const p = await pair(tag);
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
        } finally {
            await alice2.stop();
        }
    }),
);

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
