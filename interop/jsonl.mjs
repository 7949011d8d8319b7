// Child processes that speak JSON lines, for the interop scripts (interop/smoke.mjs, interop/bench.mjs).
//
// JsonLinesProcess spawns a program that prints one JSON object a line on stdout and reads commands the same way
// on stdin (interop/driver.mjs, `mxverify --json`):
//   events                 every line it has printed, in order, parsed, with `__t` = performance.now() when the
//                          line was read; a line that is not JSON is kept as { event: "__not_json__", line }
//   take(pred, what, ms)   the first event not yet taken that matches `pred`, waiting for it if need be; rejects
//                          ("<name>: timed out waiting for <what>") after `ms`, or as soon as the process exits
//   event(name, flowId, ms)   take the next event called `name` (of flow `flowId`, if given)
//   command(cmd, reply, ms)   send `cmd`, then take the first `reply` event (or `error` event: it throws) printed
//                          after it
//   send(cmd)              write one command line (logged, but not written once the process has exited)
//   stop()                 ask the process to exit (the `quit` command if there is one, else SIGTERM), kill it
//                          after 5 s
//   exited, exitCode, exitPromise   whether, how and when it exited (a program that cannot be started at all, e.g. a
//                          missing binary, counts as exited with exitCode = the spawn error's code, e.g. "ENOENT",
//                          and spawnError = the error)
//   lastError()            the message of the last `error` event it printed, or null
// Its stderr and every line in (">>> ") and out ("<<< ") go to a log file.
//
// Options, the constructor's last argument:
//   log                    the log file (appended to; required)
//   env                    environment variables on top of this process's
//   waitMs                 how long take, event and command wait by default (30000)
//   exitedText             how a rejected take words the exit: "<name>: <exitedText> (<code>) while waiting …"
//                          ("exited")
//   flowInWhat             whether event()'s timeout and exit messages name the flow id (true)
//   endLogWithStderr       the log ends when the child's stderr does (false: stop() ends it)
//   quit                   the command that asks the process to exit (none: stop() sends SIGTERM)
//
// DriverProcess is one interop/driver.mjs (a js-sdk peer) on top of that: spawned with Node for a user of a
// homeserver, its stderr at MXV_DRIVER_LOG (default "info"), stopped with its `quit` command; `ready()` waits for
// its `ready_to_go` line and notes its user, device and master key, `sync()` waits for its next completed /sync
// and `waitUntilKnown()` until its js-sdk has another device in its store.
//
// register() registers a user on the local Synapse (scripts/synapse register).

import { spawn, execFileSync } from "node:child_process";
import { createWriteStream } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import readline from "node:readline";

const HERE = dirname(fileURLToPath(import.meta.url));
export const DRIVER = join(HERE, "driver.mjs");
const SYNAPSE = join(resolve(HERE, ".."), "scripts", "synapse");

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export class JsonLinesProcess {
    constructor(
        name,
        argv0,
        argv,
        {
            log,
            env = {},
            waitMs = 30000,
            exitedText = "exited",
            flowInWhat = true,
            endLogWithStderr = false,
            quit,
        } = {},
    ) {
        if (!log) throw new Error(`${name}: no log file`);
        this.name = name;
        this.events = []; // every event received, in order
        this.consumed = new Set();
        this.waiters = [];
        this.exited = false;
        Object.assign(this, { waitMs, exitedText, flowInWhat, endLogWithStderr, quit });
        this.log = createWriteStream(log, { flags: "a" });
        this.proc = spawn(argv0, argv, { stdio: ["pipe", "pipe", "pipe"], env: { ...process.env, ...env } });
        this.exitPromise = new Promise((r) => {
            this.proc.on("exit", r);
            this.proc.on("error", r);
        });
        // spawn failures (ENOENT, EACCES): reported as an exit instead of an uncaught exception
        this.proc.on("error", (e) => {
            this.log.write(`${name}: could not run ${argv0}: ${e.message}\n`);
            if (this.exited) return;
            this.spawnError = e;
            this.exited = true;
            this.exitCode = e.code ?? e.message;
            this.wake();
        });
        this.proc.stderr.pipe(this.log, { end: endLogWithStderr });
        readline.createInterface({ input: this.proc.stdout }).on("line", (line) => {
            const t = performance.now();
            let ev;
            try {
                ev = JSON.parse(line);
            } catch {
                ev = { event: "__not_json__", line };
            }
            ev.__t = t;
            this.log.write(`<<< ${line}\n`);
            this.events.push(ev);
            this.wake();
        });
        this.proc.on("exit", (code, signal) => {
            this.exited = true;
            this.exitCode = code ?? signal;
            this.wake();
        });
        this.proc.stdin.on("error", () => {}); // a process that exits before reading everything
    }

    wake() {
        const waiters = this.waiters;
        this.waiters = [];
        for (const w of waiters) w();
    }

    lastError() {
        const errors = this.events.filter((e) => e.event === "error");
        return errors.length > 0 ? (errors[errors.length - 1].message ?? null) : null;
    }

    send(cmd) {
        this.log.write(`>>> ${JSON.stringify(cmd)}\n`);
        if (!this.exited) this.proc.stdin.write(JSON.stringify(cmd) + "\n");
    }

    // The first event not yet taken that matches `pred`; rejects after `ms` or when the process exits.
    async take(pred, what, ms = this.waitMs) {
        const deadline = performance.now() + ms;
        for (;;) {
            for (let i = 0; i < this.events.length; i++) {
                if (!this.consumed.has(i) && pred(this.events[i])) {
                    this.consumed.add(i);
                    return this.events[i];
                }
            }
            if (this.exited)
                throw new Error(`${this.name}: ${this.exitedText} (${this.exitCode}) while waiting for ${what}`);
            const left = deadline - performance.now();
            if (left <= 0) throw new Error(`${this.name}: timed out waiting for ${what}`);
            await new Promise((r) => {
                const t = setTimeout(r, left);
                this.waiters.push(() => {
                    clearTimeout(t);
                    r();
                });
            });
        }
    }

    event(name, flowId, ms) {
        return this.take(
            (e) => e.event === name && (flowId === undefined || e.flow_id === flowId),
            `${name}${this.flowInWhat && flowId ? ` of ${flowId}` : ""}`,
            ms,
        );
    }

    // Send a command and wait for the reply event (or an error) that arrives after it.
    async command(cmd, reply, ms = this.waitMs) {
        const before = this.events.length;
        this.send(cmd);
        const e = await this.take(
            (e) => this.events.indexOf(e) >= before && (e.event === reply || e.event === "error"),
            `${reply} after ${cmd.command}`,
            ms,
        );
        if (e.event === "error") throw new Error(`${this.name}: ${cmd.command} failed: ${e.message}`);
        return e;
    }

    async stop() {
        if (!this.exited) {
            if (this.quit) this.send(this.quit);
            else this.proc.kill("SIGTERM");
            await Promise.race([this.exitPromise, sleep(5000)]);
            if (!this.exited) this.proc.kill("SIGKILL");
        }
        if (!this.endLogWithStderr) this.log.end();
    }
}

// interop/driver.mjs for `user` (a localpart) of `homeserver`; `args`: more driver arguments (--cross-signing, …).
export class DriverProcess extends JsonLinesProcess {
    constructor(name, { homeserver, user, password, args = [], ...options }) {
        super(
            name,
            process.execPath,
            [DRIVER, ...["--homeserver", homeserver, "--user", user, "--password", password], ...args],
            {
                quit: { command: "quit" },
                ...options,
                env: { MXV_DRIVER_LOG: process.env.MXV_DRIVER_LOG ?? "info", ...options.env },
            },
        );
    }

    // Its `ready_to_go` event; notes its user, device and master key.
    async ready(ms) {
        const r = await this.event("ready_to_go", undefined, ms);
        Object.assign(this, { user: r.user, device: r.device, masterKey: r.master_key });
        return r;
    }

    // The `sync` command: returns once the driver has completed a /sync after taking it.
    sync(ms) {
        return this.command({ command: "sync" }, "synced", ms);
    }

    // Wait until this driver's js-sdk has `user`'s device `device` in its store (it tracks the users of shared
    // encrypted rooms), calling `sync` between two looks; returns the `status` event that says so.
    async waitUntilKnown(user, device, { tries = 40, sync = () => this.sync() } = {}) {
        for (let i = 0; i < tries; i++) {
            const st = await this.command({ command: "status", user, device }, "status");
            if (st.known) return st;
            await sync();
        }
        throw new Error(`${this.name} never learnt ${user}'s device ${device}`);
    }
}

// Register `localpart` on the local Synapse; returns the last line scripts/synapse prints.
export function register(localpart, password) {
    return execFileSync(SYNAPSE, ["register", localpart, password], { encoding: "utf8" }).trim().split("\n").pop();
}
