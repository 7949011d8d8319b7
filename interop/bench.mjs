// Wall time of one complete to-device SAS verification, js-sdk <-> js-sdk against js-sdk <-> mxverify, on the
// local Synapse in the same run (run through scripts/interop-bench).
//
//   NODE22 interop/bench.mjs --homeserver URL [--mxverify BIN] [--runs N] [--warmup W] [--poll-timeout MS]
//                            [--no-reverse] [--settle MS] [--encrypted-dm [--js-cleartext]]
//
// (--encrypted-dm: the in-room mode described at the end of this comment.)
//
// Pairs, each with fresh users that have cross-signing set up, sharing an encrypted room so that js-sdk knows the
// other side's device (js-sdk only tracks the devices of users it shares an encrypted room with):
//   js-sdk<->js-sdk     driver A requests driver B's device; B responds
//   js-sdk<->mxverify   driver A requests the device of one long-running `mxverify --json listen` (no --once: it
//                       stays up for all runs, so the steady state is measured, as with the long-running drivers)
//   mxverify->js-sdk    (unless --no-reverse) a fresh `mxverify --json request USER --device D` process per run
//                       requests driver B's device; B responds. Timed from the moment mxverify prints its outgoing
//                       `request` event (so its start-up — opening the store, two key queries — is left out and
//                       reported separately). mxverify prints that line once the request has been sent, whereas
//                       the js pairs' clock starts when the request command is written: a few ms in its favour.
// The roles are the same in every pair: the responder accepts on `request`, the requester starts SAS on `ready`,
// the bench checks that both sides show the same emoji and decimals and then confirms on both; a run is the time
// from the requester's request (command sent, or mxverify's outgoing `request` line) until both sides have printed
// `done`. Both sides must end with the other device and user verified, with no `error` and no `cancelled` event.
//
// W warm-up rounds (default 2) then N measured rounds (default 10); each round runs every pair once, the order
// rotating from round to round so that load and drift affect all pairs alike. Between two runs every js driver
// completes a sync (js-sdk needs one between two verifications of the same user) and the bench waits --settle ms
// (default 300) so that the tail of one run (signature uploads, key queries) does not land in the next.
//
// --poll-timeout MS is handed to both drivers: their /sync long-poll timeout. The default, 30000, is js-sdk's own
// default and mxverify's (fixed) long poll, so both implementations sync the same way (driver.mjs defaults to 1000
// for quick tests). Synapse answers a waiting /sync as soon as a to-device message for that device arrives, so the
// timeout does not hold back delivery; it decides how often an idle client re-polls (and processes an empty
// answer). The bench's own between-run `sync` does not wait for a poll to time out: a "waker" user sends the
// driver an empty to-device message of a private type, which ends the waiting poll.
//
// Output: per pair, median / min / max and every sample in ms, a median per phase, then one summary line
// "median to-device SAS: js-sdk<->js-sdk X ms, js-sdk<->mxverify Y ms (ratio Y/X)" and, with the reverse pair,
// one more line for it. Exit status non-zero if any run failed. Logs (stderr of every process, every JSON line
// in and out) go to .state/interop-bench/<run>/.
//
// --encrypted-dm: instead, one in-room SAS verification inside an Element-style encrypted DM (driver create_dm:
// trusted_private_chat, is_direct, m.room.encryption Megolm with Element's rotation settings), request to both
// `done`, in three pairs:
//   js-sdk<->js-sdk     driver A requests in its DM with driver B; B responds
//   js-sdk->mxverify    driver A requests in its DM with mxverify user M (joined with `mxverify join` at set-up); a
//                       fresh `mxverify --json listen --once` per run answers (timed from A's request command, after
//                       `listening`, so its start-up is left out)
//   mxverify->js-sdk    (unless --no-reverse) a fresh `mxverify --json request @B` per run, in the DM mxverify picks
//                       (its m.direct, or a new encrypted DM it creates on the first run, which B joins: B runs with
//                       --auto-join); timed from its outgoing `request` line. At least one warm-up round is run in
//                       this mode, so that a DM created by mxverify is not timed.
// Both js drivers run with --encrypt-verification (js-sdk then sends its verification events Megolm-encrypted, as
// Element X does; --js-cleartext leaves js-sdk's own behaviour, cleartext events in the encrypted room). After
// every run (not timed) the bench reads the DM from the js side (`room_events`) and fails the run unless every
// verification event of the flow from an encrypting side is m.room.encrypted (Megolm) on the wire — mxverify is
// always expected to encrypt — and the js side's are in the clear with --js-cleartext.
// The mxverify half needs an mxverify that decrypts and sends Megolm room events. Without one it fails with a
// message saying which step did not happen (no binary; set-up refused; the request never reached mxverify within
// BENCH_REQUEST_WAIT_MS, 20 s; mxverify's own `error` line) instead of hanging; a failed mxverify pair is not run
// again, the js-sdk<->js-sdk pair is still measured and reported, and the exit status is non-zero.
// Summary line: "median in-room SAS in an encrypted DM: js-sdk<->js-sdk X ms, js-sdk->mxverify Y ms (ratio Y/X),
// mxverify->js-sdk Z ms (ratio Z/X)", "not measured (reason)" for a pair that failed.

import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { DriverProcess, JsonLinesProcess, register } from "./jsonl.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..");

const args = process.argv.slice(2);
const KNOWN = new Set(["--homeserver", "--mxverify", "--runs", "--warmup", "--poll-timeout", "--settle"]);
const FLAGS = new Set(["--no-reverse", "--encrypted-dm", "--js-cleartext"]);
for (let i = 0; i < args.length; i++) {
    if (FLAGS.has(args[i])) continue;
    if (KNOWN.has(args[i]) && i + 1 < args.length) {
        i++;
        continue;
    }
    process.stderr.write(
        `bench: unknown or incomplete argument ${args[i]}\nusage: bench.mjs --homeserver URL [--mxverify BIN] ` +
            `[--runs N] [--warmup W] [--poll-timeout MS] [--no-reverse] [--settle MS] ` +
            `[--encrypted-dm [--js-cleartext]]\n`,
    );
    process.exit(2);
}
const argValue = (name, dflt) => {
    const i = args.indexOf(name);
    return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
};
const intArg = (name, dflt, min) => {
    const v = Number(argValue(name, String(dflt)));
    if (!Number.isInteger(v) || v < min) {
        process.stderr.write(`bench: ${name} must be an integer >= ${min}\n`);
        process.exit(2);
    }
    return v;
};
const HOMESERVER = argValue("--homeserver", "http://127.0.0.1:18448");
const MXVERIFY = resolve(argValue("--mxverify", join(ROOT, "target", "release", "mxverify")));
const RUNS = intArg("--runs", 10, 1);
const WARMUP = intArg("--warmup", 2, 0);
const POLL_TIMEOUT = intArg("--poll-timeout", 30000, 0);
const SETTLE_MS = intArg("--settle", 300, 0);
const REVERSE = !args.includes("--no-reverse");
const ENCRYPTED_DM = args.includes("--encrypted-dm");
const JS_CLEARTEXT = args.includes("--js-cleartext");
if (JS_CLEARTEXT && !ENCRYPTED_DM) {
    process.stderr.write("bench: --js-cleartext only goes with --encrypted-dm\n");
    process.exit(2);
}
const REQUEST_WAIT_MS = Number(process.env.BENCH_REQUEST_WAIT_MS ?? 20000);
const WAIT_MS = Number(process.env.BENCH_WAIT_MS ?? 30000);

const RUN_ID = `${Date.now().toString(36)}${process.pid.toString(36)}`;
const LOG_DIR = join(ROOT, ".state", "interop-bench", RUN_ID);
mkdirSync(LOG_DIR, { recursive: true });

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const say = (s) => process.stderr.write(`bench: ${s}\n`);

// ---------------------------------------------------------------------------------------------------------------
// Child processes speaking JSON lines (drivers, mxverify --json): see jsonl.mjs. Each logs to <run>/<name>.log.

function driver(name, user, password, extraArgs = []) {
    const p = new DriverProcess(name, {
        homeserver: HOMESERVER,
        user,
        password,
        args: ["--cross-signing", "--poll-timeout", String(POLL_TIMEOUT), ...extraArgs],
        log: join(LOG_DIR, `${name}.log`),
        waitMs: WAIT_MS,
    });
    p.js = true;
    return p;
}

function mxverify(name, stateDir, argv) {
    const p = new JsonLinesProcess(name, MXVERIFY, ["--json", "--state-dir", stateDir, ...argv], {
        log: join(LOG_DIR, `${name}.log`),
        waitMs: WAIT_MS,
    });
    p.js = false;
    return p;
}

// Events of `p` since index `from` that mean trouble.
function troubles(p, from = 0) {
    return p.events
        .slice(from)
        .filter((e) => e.event === "error" || e.event === "__not_json__" || e.event === "cancelled");
}

// A one-shot mxverify command (login, bootstrap, join): its JSON lines, or an exception with its stderr.
function mxverifyOnce(stateDir, argv) {
    try {
        const out = execFileSync(MXVERIFY, ["--json", "--state-dir", stateDir, ...argv], {
            encoding: "utf8",
            stdio: ["ignore", "pipe", "pipe"],
        });
        return out
            .trim()
            .split("\n")
            .filter(Boolean)
            .map((l) => JSON.parse(l));
    } catch (e) {
        throw new Error(`mxverify ${argv[0]} failed: ${e.stderr || e.stdout || e.message}`);
    }
}

// A plain Matrix user that wakes a driver's waiting /sync with an empty to-device message of its own type (js-sdk
// ignores it), so that the driver's `sync` command returns at once whatever its poll timeout.
const waker = {
    async login(user, password) {
        const r = await this.call("POST", "/_matrix/client/v3/login", {
            type: "m.login.password",
            identifier: { type: "m.id.user", user },
            password,
        });
        this.token = r.access_token;
        this.txn = 0;
    },
    async wake(driver) {
        const txn = `wake-${RUN_ID}-${this.txn++}`;
        await this.call("PUT", `/_matrix/client/v3/sendToDevice/org.mxverify.bench.wake/${txn}`, {
            messages: { [driver.user]: { [driver.device]: {} } },
        });
    },
    async call(method, path, body) {
        const res = await fetch(`${HOMESERVER}${path}`, {
            method,
            headers: {
                "content-type": "application/json",
                ...(this.token ? { authorization: `Bearer ${this.token}` } : {}),
            },
            body: JSON.stringify(body),
        });
        const json = await res.json().catch(() => ({}));
        if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
        return json;
    },
};

// The driver's `sync` command, its /sync woken by the waker (again every second, in case the first wake-up
// completed a sync before the driver took the command).
async function syncNow(d) {
    let synced = false;
    const reply = d.sync(POLL_TIMEOUT + WAIT_MS).finally(() => (synced = true));
    const wakes = (async () => {
        for (let i = 0; i < 30 && !synced; i++) {
            await waker.wake(d);
            for (let j = 0; j < 10 && !synced; j++) await sleep(100);
        }
    })();
    await reply;
    await wakes;
}

// Wait until driver `a` has device `device` of `user` in its store.
const knows = (a, user, device) => a.waitUntilKnown(user, device, { tries: 60, sync: () => syncNow(a) });

// ---------------------------------------------------------------------------------------------------------------
// One verification

const emojiKey = (list) =>
    JSON.stringify((list ?? []).map((e) => [e.symbol, String(e.name ?? "").toLowerCase()]));

// Both sides verified the other (device and user), in each side's vocabulary.
function checkDone(peer, done, otherUser, otherDevice) {
    if (peer.js) {
        if (!(done.device_verified && done.user_verified))
            throw new Error(`${peer.name}: done without trust: ${JSON.stringify(done)}`);
    } else {
        const kinds = (done.keys ?? []).map((k) => k.kind);
        if (done.verified_user !== otherUser || done.verified_device !== otherDevice)
            throw new Error(`${peer.name}: verified ${done.verified_user}/${done.verified_device}`);
        if (!kinds.includes("device") || !kinds.includes("master_key"))
            throw new Error(`${peer.name}: verified keys ${JSON.stringify(done.keys)}`);
    }
}

// requester: a Peer whose outgoing `request` event starts the clock (`begin` sends the request, returns the
// time to count from and the flow id); responder: a Peer. Returns phase timings in ms from the start.
// `requestWaitMs`: how long the responder may take to report the request (default: the processes' wait).
async function verification(requester, responder, begin, requestWaitMs) {
    const marks = [requester.events.length, responder.events.length];
    const { t0, flow } = await begin();
    const inc = await responder.event("request", flow, requestWaitMs);
    if (inc.direction !== "incoming") throw new Error(`${responder.name}: request is ${inc.direction}`);
    responder.send({ command: "accept", flow_id: flow });
    const [ra, rb] = await Promise.all([requester.event("ready", flow), responder.event("ready", flow)]);
    const tStart = performance.now();
    requester.send({ command: "start_sas", flow_id: flow });
    const [sa, sb] = await Promise.all([requester.event("sas", flow), responder.event("sas", flow)]);
    if (!Array.isArray(sa.emoji) || sa.emoji.length !== 7) throw new Error(`emoji ${JSON.stringify(sa.emoji)}`);
    if (emojiKey(sa.emoji) !== emojiKey(sb.emoji))
        throw new Error(`different emoji: ${emojiKey(sa.emoji)} / ${emojiKey(sb.emoji)}`);
    if (JSON.stringify(sa.decimals) !== JSON.stringify(sb.decimals))
        throw new Error(`different decimals: ${JSON.stringify(sa.decimals)} / ${JSON.stringify(sb.decimals)}`);
    const tConfirm = performance.now();
    requester.send({ command: "confirm", flow_id: flow });
    responder.send({ command: "confirm", flow_id: flow });
    const [da, db] = await Promise.all([requester.event("done", flow), responder.event("done", flow)]);
    checkDone(requester, da, responder.user, responder.device);
    checkDone(responder, db, requester.user, requester.device);
    for (const [p, from] of [
        [requester, marks[0]],
        [responder, marks[1]],
    ]) {
        const t = troubles(p, from);
        if (t.length > 0) throw new Error(`${p.name}: ${JSON.stringify(t)}`);
    }
    const end = Math.max(da.__t, db.__t);
    return {
        flow,
        total: end - t0,
        // the request reaches the responder
        delivery: inc.__t - t0,
        // accept (sent on the responder's `request` line) -> both ready
        ready: Math.max(ra.__t, rb.__t) - inc.__t,
        // start_sas -> both show the SAS (start, accept, key, key)
        sas: Math.max(sa.__t, sb.__t) - tStart,
        // both confirm -> both done (mac, mac, done, done, signature uploads, trust)
        done: end - tConfirm,
        requesterDone: da.__t - t0,
        responderDone: db.__t - t0,
        trustWait: [da.trust_wait_ms, db.trust_wait_ms],
    };
}

// ---------------------------------------------------------------------------------------------------------------
// Set-up

const password = `pw-${RUN_ID}`;
const peers = [];
let failed = 0;

async function cleanup() {
    await Promise.all(peers.map((p) => p.stop().catch(() => {})));
}

process.on("SIGINT", async () => {
    await cleanup();
    process.exit(130);
});

const names = {
    a: `bench-a-${RUN_ID}`,
    b: `bench-b-${RUN_ID}`,
    m: `bench-m-${RUN_ID}`,
    r: `bench-r-${RUN_ID}`,
    w: `bench-w-${RUN_ID}`,
};

// ---------------------------------------------------------------------------------------------------------------
// --encrypted-dm: in-room SAS inside Element-style encrypted DMs (see the top of this file)

const stats = {
    median(xs) {
        const s = [...xs].sort((x, y) => x - y);
        if (s.length === 0) return NaN;
        const m = s.length >> 1;
        return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
    },
    ms: (x) => x.toFixed(0),
};

// The verification events of flow `flow` in `room` as the server has them, read by driver `reader`: for each
// sender, {clear: [types], encrypted: n, megolm: n, relatesToFlow: n}. An m.room.encrypted event counts as part of
// the flow when it is the request itself or its cleartext m.relates_to points at the request; a cleartext one when
// it is the request or an m.key.verification.* event relating to it.
async function wireOfFlow(reader, room, flow) {
    const r = await reader.command({ command: "room_events", room }, "room_events");
    const by = {};
    for (const e of r.events) {
        const related = e.event_id === flow || e.relates_to?.event_id === flow;
        if (!related) continue;
        const s = (by[e.sender] ??= { clear: [], encrypted: 0, megolm: 0 });
        if (e.type === "m.room.encrypted") {
            s.encrypted++;
            if (e.algorithm === "m.megolm.v1.aes-sha2") s.megolm++;
        } else if (e.type.startsWith("m.key.verification.") || e.msgtype === "m.key.verification.request") {
            s.clear.push(e.type === "m.room.message" ? "request" : e.type.slice("m.key.verification.".length));
        }
    }
    return by;
}

// Throws unless `user`'s part of the flow on the wire is all Megolm (`encrypted`) or all in the clear.
function checkWireSide(wire, user, encrypted, label) {
    const s = wire[user] ?? { clear: [], encrypted: 0, megolm: 0 };
    if (s.clear.length + s.encrypted === 0)
        throw new Error(
            `${label}: none of its events in the room belong to the flow (an encrypted event needs m.relates_to ` +
                `in its cleartext wrapper)`,
        );
    if (encrypted && s.clear.length > 0)
        throw new Error(
            `${label} sent ${s.clear.length} verification event(s) in the clear in the encrypted DM ` +
                `(${s.clear.join(", ")}); expected m.room.encrypted`,
        );
    if (encrypted && s.megolm !== s.encrypted) throw new Error(`${label}: encrypted events that are not Megolm`);
    if (!encrypted && s.encrypted > 0)
        throw new Error(`${label} sent ${s.encrypted} encrypted event(s), expected cleartext (--js-cleartext)`);
}

// Why an mxverify run failed, in words: the error as thrown, mxverify's own last error line, and a hint when the
// request never arrived or mxverify stopped early.
function explainMxFailure(e, proc, role) {
    let msg = e.message;
    const own = proc?.lastError?.();
    if (own) msg += `; mxverify said: ${own}`;
    if (proc?.spawnError) msg += ` (could not run ${MXVERIFY}: ${proc.spawnError.message})`;
    if (/timed out waiting for request/.test(e.message)) {
        const mxSilent = proc && e.message.startsWith(`${proc.name}:`);
        if (role === "responder" && mxSilent)
            msg +=
                ` — mxverify never reported js-sdk's ${JS_CLEARTEXT ? "" : "Megolm-encrypted "}request in the ` +
                `encrypted DM within ${REQUEST_WAIT_MS} ms: this mxverify does not ` +
                `${JS_CLEARTEXT ? "answer in-room requests in an encrypted room" : "decrypt Megolm room events"} yet`;
        else if (role === "requester" && mxSilent) msg += " — mxverify printed no outgoing request";
        else if (role === "requester")
            msg +=
                ` — js-sdk never reported mxverify's request within ${REQUEST_WAIT_MS} ms (sent in a room js-sdk ` +
                `is not in, or encrypted so that js-sdk could not decrypt it?)`;
    }
    return msg;
}

async function encryptedDmBench() {
    say(`logs in ${LOG_DIR}`);
    for (const n of Object.values(names)) register(n, password);
    await waker.login(names.w, password);
    const jsArgs = JS_CLEARTEXT ? [] : ["--encrypt-verification"];
    const jsEncrypts = !JS_CLEARTEXT;

    const A = driver("A", names.a, password, jsArgs);
    const B = driver("B", names.b, password, [...jsArgs, "--auto-join"]);
    peers.push(A, B);
    await Promise.all([A, B].map((d) => d.ready(60000)));
    const dmAB = (await A.command({ command: "create_dm", user: B.user }, "room")).room_id;
    await B.take((e) => e.event === "room" && e.room_id === dmAB && e.auto_joined === true, "joining the DM", WAIT_MS);
    await Promise.all([knows(A, B.user, B.device), knows(B, A.user, A.device)]);

    const jsRoomRequest = (requester, responder, room) => async () => {
        const t0 = performance.now();
        const out = await requester.command({ command: "request", user: responder.user, room }, "request");
        if (out.direction !== "outgoing") throw new Error(`${requester.name}: request is ${out.direction}`);
        return { t0, flow: out.flow_id };
    };

    const pairs = [
        {
            label: "js-sdk<->js-sdk",
            run: async () => {
                const r = await verification(A, B, jsRoomRequest(A, B, dmAB));
                const wire = await wireOfFlow(A, dmAB, r.flow);
                checkWireSide(wire, A.user, jsEncrypts, "js-sdk A");
                checkWireSide(wire, B.user, jsEncrypts, "js-sdk B");
                return r;
            },
        },
    ];

    // The mxverify side: set up as far as it goes; a failure leaves the js-sdk pair to run alone.
    const mxPairs = [];
    let mxSetupFailure = null;
    try {
        if (!existsSync(MXVERIFY)) throw new Error(`no mxverify binary at ${MXVERIFY}`);
        const mDir = join(LOG_DIR, "m-state");
        const rDir = join(LOG_DIR, "r-state");
        const mx = {};
        for (const [key, dir] of [
            ["m", mDir],
            ["r", rDir],
        ]) {
            if (key === "r" && !REVERSE) continue;
            const login = ["login", "--homeserver", HOMESERVER, "--user", names[key], "--password", password];
            const li = mxverifyOnce(dir, login).find((e) => e.event === "logged_in");
            if (!li) throw new Error(`mxverify login of ${names[key]} printed no logged_in line`);
            mxverifyOnce(dir, ["cross-signing", "bootstrap", "--password", password]);
            mx[key] = { user: li.user, device: li.device, dir };
        }
        const dmAM = (await A.command({ command: "create_dm", user: mx.m.user }, "room")).room_id;
        mxverifyOnce(mDir, ["join", dmAM]);
        await knows(A, mx.m.user, mx.m.device);
        mxPairs.push({
            label: "js-sdk->mxverify",
            mx: true,
            run: async () => {
                const L = mxverify("M-listen", mDir, ["listen", "--once"]);
                Object.assign(L, mx.m);
                peers.push(L);
                try {
                    await L.event("listening", undefined, 60000);
                    const r = await verification(A, L, jsRoomRequest(A, L, dmAM), REQUEST_WAIT_MS);
                    await Promise.race([L.exitPromise, sleep(10000)]);
                    if (L.exitCode !== 0) throw new Error(`mxverify listen --once exited with ${L.exitCode}`);
                    const wire = await wireOfFlow(A, dmAM, r.flow);
                    checkWireSide(wire, mx.m.user, true, "mxverify (listen)");
                    checkWireSide(wire, A.user, jsEncrypts, "js-sdk A");
                    return r;
                } catch (e) {
                    throw new Error(explainMxFailure(e, L, "responder"));
                } finally {
                    await L.stop();
                    peers.splice(peers.indexOf(L), 1);
                }
            },
        });
        if (REVERSE) {
            // B shares an encrypted DM with R from the start, so that js-sdk tracks R's devices; which DM mxverify
            // verifies in is its own choice.
            const dmBR = (await B.command({ command: "create_dm", user: mx.r.user }, "room")).room_id;
            mxverifyOnce(rDir, ["join", dmBR]);
            await knows(B, mx.r.user, mx.r.device);
            mxPairs.push({
                label: "mxverify->js-sdk",
                mx: true,
                run: async () => {
                    const p = mxverify("R-request", rDir, ["request", B.user]);
                    Object.assign(p, mx.r);
                    peers.push(p);
                    let room = null;
                    try {
                        const r = await verification(
                            p,
                            B,
                            async () => {
                                const out = await p.event("request");
                                if (out.direction !== "outgoing") throw new Error(`R: request is ${out.direction}`);
                                if (out.transport !== "room") throw new Error(`R: request over ${out.transport}`);
                                room = out.room;
                                return { t0: out.__t, flow: out.flow_id };
                            },
                            REQUEST_WAIT_MS,
                        );
                        await Promise.race([p.exitPromise, sleep(10000)]);
                        if (p.exitCode !== 0) throw new Error(`mxverify request exited with ${p.exitCode}`);
                        const wire = await wireOfFlow(B, room, r.flow);
                        checkWireSide(wire, mx.r.user, true, "mxverify (request)");
                        checkWireSide(wire, B.user, jsEncrypts, "js-sdk B");
                        return r;
                    } catch (e) {
                        throw new Error(explainMxFailure(e, p, "requester"));
                    } finally {
                        await p.stop();
                        peers.splice(peers.indexOf(p), 1);
                    }
                },
            });
        }
    } catch (e) {
        mxSetupFailure = `mxverify set-up failed: ${e.message}`;
        failed++;
        say(mxSetupFailure);
    }
    pairs.push(...mxPairs);
    for (const p of pairs) p.samples = [];

    const between = async () => {
        await Promise.all([A, B].map((d) => syncNow(d)));
        await sleep(SETTLE_MS);
    };
    const warmup = Math.max(WARMUP, 1);
    say(
        `${warmup} warm-up + ${RUNS} measured rounds of ${pairs.map((p) => p.label).join(", ")} in encrypted DMs; ` +
            `js-sdk ${jsEncrypts ? "encrypts" : "does not encrypt"} its verification events; ` +
            `driver --poll-timeout ${POLL_TIMEOUT} ms, settle ${SETTLE_MS} ms`,
    );
    await between();
    for (let round = 0; round < warmup + RUNS; round++) {
        const warm = round < warmup;
        const order = pairs.map((_, i) => pairs[(i + round) % pairs.length]);
        for (const pair of order) {
            if (pair.disabled) continue;
            let r;
            try {
                r = await pair.run();
            } catch (e) {
                failed++;
                say(`${pair.label} round ${round + 1}: FAILED: ${e.message}`);
                if (pair.mx) {
                    pair.disabled = e.message;
                    say(`${pair.label}: not run again`);
                }
                await between();
                continue;
            }
            say(
                `${warm ? "warm-up" : "run"} ${warm ? round + 1 : round + 1 - warmup} ${pair.label}: ` +
                    `${r.total.toFixed(0)} ms (delivery ${r.delivery.toFixed(0)}, ready ${r.ready.toFixed(0)}, ` +
                    `sas ${r.sas.toFixed(0)}, done ${r.done.toFixed(0)})`,
            );
            if (!warm) pair.samples.push(r);
            await between();
        }
    }

    const { median, ms } = stats;
    console.log(
        `in-room SAS in an Element-style encrypted DM, request -> both done; ${warmup} warm-up + ${RUNS} measured ` +
            `runs per pair, pairs alternating; js-sdk's verification events ` +
            `${jsEncrypts ? "Megolm-encrypted" : "in the clear"}`,
    );
    for (const p of pairs) {
        const t = p.samples.map((s) => s.total);
        if (t.length === 0) {
            console.log(`${p.label}: no successful runs${p.disabled ? `: ${p.disabled}` : ""}`);
            continue;
        }
        console.log(
            `${p.label}: median ${ms(median(t))} ms, min ${ms(Math.min(...t))}, max ${ms(Math.max(...t))}; ` +
                `samples ${t.map(ms).join(", ")}`,
        );
        const ph = (k) => ms(median(p.samples.map((s) => s[k])));
        console.log(
            `  median phases: request delivered ${ph("delivery")}, accept -> both ready ${ph("ready")}, ` +
                `start -> both sas ${ph("sas")}, confirm -> both done ${ph("done")}`,
        );
    }
    if (mxSetupFailure) console.log(mxSetupFailure);
    const js = median((pairs[0].samples ?? []).map((s) => s.total));
    const part = (label) => {
        const p = pairs.find((x) => x.label === label);
        if (!p) return `${label} not measured (${mxSetupFailure ?? "not requested"})`;
        const m = median(p.samples.map((s) => s.total));
        if (p.samples.length === 0) return `${label} not measured (failed)`;
        return `${label} ${ms(m)} ms (ratio ${(m / js).toFixed(2)})`;
    };
    const parts = [`js-sdk<->js-sdk ${ms(js)} ms`, part("js-sdk->mxverify")];
    if (REVERSE) parts.push(part("mxverify->js-sdk"));
    console.log(`median in-room SAS in an encrypted DM: ${parts.join(", ")}`);
}

if (ENCRYPTED_DM) {
    try {
        await encryptedDmBench();
    } catch (e) {
        failed++;
        console.log(`bench failed: ${e.message}`);
    }
    if (failed > 0) console.log(`${failed} failure(s); logs in ${LOG_DIR}`);
    await cleanup();
    process.exit(failed > 0 ? 1 : 0);
}

try {
    say(`logs in ${LOG_DIR}`);
    for (const n of Object.values(names)) register(n, password);
    await waker.login(names.w, password);

    // mxverify devices: log in, set up cross-signing (both sides of every pair have it).
    const mDir = join(LOG_DIR, "m-state");
    const rDir = join(LOG_DIR, "r-state");
    const mxDevices = {};
    for (const [key, dir] of [
        ["m", mDir],
        ["r", rDir],
    ]) {
        if (key === "r" && !REVERSE) continue;
        const login = ["login", "--homeserver", HOMESERVER, "--user", names[key], "--password", password];
        const li = mxverifyOnce(dir, login).find((e) => e.event === "logged_in");
        if (!li) throw new Error(`mxverify login of ${names[key]} printed no logged_in line`);
        mxverifyOnce(dir, ["cross-signing", "bootstrap", "--password", password]);
        mxDevices[key] = { user: li.user, device: li.device };
    }

    const A = driver("A", names.a, password);
    const B = driver("B", names.b, password);
    peers.push(A, B);
    await Promise.all([A, B].map((d) => d.ready(60000)));

    const M = mxverify("M-listen", mDir, ["listen"]);
    peers.push(M);
    await M.event("listening", undefined, 60000);
    Object.assign(M, mxDevices.m);

    // A shares an encrypted room with B, and another with M (listen joins by itself).
    const roomAB = await A.command({ command: "create_room", invite: [B.user], encrypted: true }, "room");
    await B.command({ command: "join", room: roomAB.room_id }, "room");
    const roomAM = await A.command({ command: "create_room", invite: [M.user], encrypted: true }, "room");
    // (listen joins at once, but prints its `joined` notice only with the next batch that carries events: do not
    // wait for it; A learning M's device below is what matters.)
    await Promise.all([knows(A, B.user, B.device), knows(B, A.user, A.device)]);
    await knows(A, M.user, M.device);

    let R;
    if (REVERSE) {
        R = { name: "R", ...mxDevices.r, js: false };
        const roomBR = await B.command({ command: "create_room", invite: [R.user], encrypted: true }, "room");
        mxverifyOnce(rDir, ["join", roomBR.room_id]);
        await knows(B, R.user, R.device);
    }

    // ---------------------------------------------------------------------------------------------------------------
    // The runs

    const jsRequest = (requester, responder) => async () => {
        const t0 = performance.now();
        const out = await requester.command(
            { command: "request", user: responder.user, device: responder.device },
            "request",
        );
        if (out.direction !== "outgoing") throw new Error(`${requester.name}: request is ${out.direction}`);
        return { t0, flow: out.flow_id };
    };

    const startups = [];
    const pairs = [
        { label: "js-sdk<->js-sdk", run: () => verification(A, B, jsRequest(A, B)) },
        { label: "js-sdk<->mxverify", run: () => verification(A, M, jsRequest(A, M)) },
    ];
    if (REVERSE) {
        pairs.push({
            label: "mxverify->js-sdk",
            run: async () => {
                const p = mxverify("R-request", rDir, ["request", B.user, "--device", B.device]);
                Object.assign(p, { user: R.user, device: R.device });
                peers.push(p);
                try {
                    const tSpawn = performance.now();
                    const r = await verification(p, B, async () => {
                        const out = await p.event("request");
                        if (out.direction !== "outgoing") throw new Error(`R: request is ${out.direction}`);
                        startups.push(out.__t - tSpawn);
                        return { t0: out.__t, flow: out.flow_id };
                    });
                    await Promise.race([p.exitPromise, sleep(10000)]);
                    if (p.exitCode !== 0) throw new Error(`mxverify request exited with ${p.exitCode}`);
                    return r;
                } finally {
                    await p.stop();
                    peers.splice(peers.indexOf(p), 1);
                }
            },
        });
    }
    for (const p of pairs) p.samples = [];

    // A driver's `sync` waits for its next completed /sync, which with a long poll timeout could take that long:
    // a to-device message from the waker ends the waiting poll at once.
    const between = async () => {
        await Promise.all(
            [A, B].map((d) => syncNow(d)),
        );
        await sleep(SETTLE_MS);
    };

    say(
        `${WARMUP} warm-up + ${RUNS} measured rounds of ${pairs.map((p) => p.label).join(", ")}; ` +
            `driver --poll-timeout ${POLL_TIMEOUT} ms, mxverify long poll 30000 ms, settle ${SETTLE_MS} ms`,
    );
    await between();
    for (let round = 0; round < WARMUP + RUNS; round++) {
        const warm = round < WARMUP;
        const order = pairs.map((_, i) => pairs[(i + round) % pairs.length]);
        for (const pair of order) {
            let r;
            try {
                r = await pair.run();
            } catch (e) {
                failed++;
                say(`${pair.label} round ${round + 1}: FAILED: ${e.message}`);
                await between();
                continue;
            }
            say(
                `${warm ? "warm-up" : "run"} ${warm ? round + 1 : round + 1 - WARMUP} ${pair.label}: ` +
                    `${r.total.toFixed(0)} ms` +
                    ` (delivery ${r.delivery.toFixed(0)}, ready ${r.ready.toFixed(0)}, sas ${r.sas.toFixed(0)},` +
                    ` done ${r.done.toFixed(0)}; trust wait ${JSON.stringify(r.trustWait)})`,
            );
            if (!warm) pair.samples.push(r);
            await between();
        }
    }

    // ---------------------------------------------------------------------------------------------------------------
    // Report

    const median = (xs) => {
        const s = [...xs].sort((x, y) => x - y);
        if (s.length === 0) return NaN;
        const m = s.length >> 1;
        return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
    };
    const ms = (x) => x.toFixed(0);
    console.log(
        `to-device SAS, request -> both done; ${WARMUP} warm-up + ${RUNS} measured runs per pair, pairs alternating; ` +
            `js-sdk --poll-timeout ${POLL_TIMEOUT} ms, mxverify long poll 30000 ms (one listen for all runs)`,
    );
    for (const p of pairs) {
        const t = p.samples.map((s) => s.total);
        if (t.length === 0) {
            console.log(`${p.label}: no successful runs`);
            continue;
        }
        console.log(
            `${p.label}: median ${ms(median(t))} ms, min ${ms(Math.min(...t))}, max ${ms(Math.max(...t))}; ` +
                `samples ${t.map(ms).join(", ")}`,
        );
        const ph = (k) => ms(median(p.samples.map((s) => s[k])));
        console.log(
            `  median phases: request delivered ${ph("delivery")}, accept -> both ready ${ph("ready")}, ` +
                `start -> both sas ${ph("sas")}, confirm -> both done ${ph("done")}; ` +
                `requester done at ${ph("requesterDone")}, responder done at ${ph("responderDone")}`,
        );
        if (p.label === "mxverify->js-sdk" && startups.length > 0)
            console.log(
                `  mxverify request start-up (spawn -> request sent, not counted): median ${ms(median(startups))} ms`,
            );
    }
    const med = (label) => median((pairs.find((p) => p.label === label)?.samples ?? []).map((s) => s.total));
    const js = med("js-sdk<->js-sdk");
    const mx = med("js-sdk<->mxverify");
    console.log(
        `median to-device SAS: js-sdk<->js-sdk ${ms(js)} ms, js-sdk<->mxverify ${ms(mx)} ms ` +
            `(ratio ${(mx / js).toFixed(2)})`,
    );
    if (REVERSE) {
        const rv = med("mxverify->js-sdk");
        console.log(
            `median to-device SAS, mxverify requesting (fresh process per run, from its request line): ` +
                `mxverify->js-sdk ${ms(rv)} ms (ratio to js-sdk<->js-sdk ${(rv / js).toFixed(2)})`,
        );
    }
} catch (e) {
    failed++;
    console.log(`bench failed: ${e.message}`);
}
if (failed > 0) console.log(`${failed} failure(s); logs in ${LOG_DIR}`);
await cleanup();
process.exit(failed > 0 ? 1 : 0);
