// Known-answer fixtures for secret storage (m.secret_storage.v1.aes-hmac-sha2) and recovery keys, made by
// matrix-js-sdk 43 itself against the local Synapse.
//
//   NODE22 interop/make-ssss-fixture.mjs --homeserver URL [--out-dir DIR]
//
// (NODE22: the last line of scripts/interop-setup; URL: scripts/synapse url, with Synapse started.) For each of two
// fresh users (registered through scripts/synapse register) a js-sdk client, the way Element sets up recovery:
//   bootstrapCrossSigning({setupNewCrossSigning: true}), then bootstrapSecretStorage({setupNewSecretStorage: true,
//   setupNewKeyBackup: true, createSecretStorageKey: () => createRecoveryKeyFromPassphrase(passphrase?)})
// then writes what it left on the server and what it knows:
//   DIR/js-sdk-secret-storage.json              a random secret-storage key (shown as a recovery key)
//   DIR/js-sdk-secret-storage-passphrase.json   a key made from a passphrase (m.pbkdf2)
// DIR defaults to testdata/ of this repository. Each file has the fields described in its own "fields" entry.
// Before writing, the script checks every secret independently of js-sdk with node:crypto (HKDF-SHA-256 with 32 zero
// bytes of salt, HMAC-SHA-256 over the ciphertext, AES-256-CTR; the key check over 32 zero bytes; PBKDF2-SHA-512 for
// the passphrase; the recovery key's base58 encoding and parity; each private key's Ed25519 public key against the
// published one) and refuses to write a fixture that fails. The output is random (new keys every run); the tests
// read the committed JSON, this script only shows how it was made.
//
// Progress goes to stderr (js-sdk's logging only with MXV_DRIVER_LOG=debug|info|warn); the paths written to stdout.

import {
    createDecipheriv,
    createHash,
    createHmac,
    createPrivateKey,
    createPublicKey,
    hkdfSync,
    pbkdf2Sync,
} from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { register } from "./jsonl.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "..");

const args = process.argv.slice(2);
const argValue = (name, dflt) => {
    const i = args.indexOf(name);
    return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
};
const HOMESERVER = argValue("--homeserver", "http://127.0.0.1:18448");
const OUT_DIR = resolve(argValue("--out-dir", join(ROOT, "testdata")));
const PASSPHRASE = "correct horse battery staple (js-sdk fixture)";

// js-sdk logs a lot through console.*: keep stdout for the result, and stderr quiet unless asked.
const LOG_LEVELS = { debug: 0, info: 1, warn: 2, error: 3, none: 4 };
const logLevel = LOG_LEVELS[process.env.MXV_DRIVER_LOG ?? "error"] ?? LOG_LEVELS.error;
const quiet = (level) => (...a) => {
    if (LOG_LEVELS[level] >= logLevel) process.stderr.write(`[js-sdk ${level}] ${a.map(String).join(" ")}\n`);
};
console.log = quiet("debug");
console.debug = quiet("debug");
console.trace = quiet("debug");
console.info = quiet("info");
console.warn = quiet("warn");
console.error = quiet("error");
const say = (s) => process.stderr.write(`make-ssss-fixture: ${s}\n`);

const sdk = await import("matrix-js-sdk");
const cryptoApi = await import("matrix-js-sdk/lib/crypto-api/index.js");
const versionOf = (pkg) =>
    JSON.parse(readFileSync(join(HERE, "node_modules", pkg, "package.json"), "utf8")).version;

const b64 = (bytes) => Buffer.from(bytes).toString("base64");
const unb64 = (s) => Buffer.from(s, "base64");

// ---------------------------------------------------------------------------------------------------------------
// Independent checks (node:crypto only)

const BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

function base58Decode(s) {
    let n = 0n;
    for (const ch of s) {
        const v = BASE58.indexOf(ch);
        if (v < 0) throw new Error(`not base58: ${ch}`);
        n = n * 58n + BigInt(v);
    }
    const bytes = [];
    while (n > 0n) {
        bytes.unshift(Number(n % 256n));
        n /= 256n;
    }
    for (const ch of s) {
        if (ch !== "1") break;
        bytes.unshift(0);
    }
    return Buffer.from(bytes);
}

// The 32 key bytes of a recovery key: 0x8B 0x01, key, parity (XOR of everything before it); base58; spaces.
function recoveryKeyBytes(recoveryKey) {
    if (!/^([1-9A-HJ-NP-Za-km-z]{4} ){11}[1-9A-HJ-NP-Za-km-z]{4}$/.test(recoveryKey))
        throw new Error(`recovery key ${recoveryKey} is not 12 groups of 4 base58 characters`);
    const raw = base58Decode(recoveryKey.replaceAll(" ", ""));
    if (raw.length !== 35 || raw[0] !== 0x8b || raw[1] !== 0x01)
        throw new Error("recovery key: bad length or prefix");
    if (raw.reduce((x, b) => x ^ b, 0) !== 0) throw new Error("recovery key: bad parity");
    return raw.subarray(2, 34);
}

function subKeys(key, name) {
    const okm = Buffer.from(hkdfSync("sha256", key, Buffer.alloc(32), Buffer.from(name, "utf8"), 64));
    return { aes: okm.subarray(0, 32), hmac: okm.subarray(32, 64) };
}

function aesCtr(key, iv, data) {
    const d = createDecipheriv("aes-256-ctr", key, iv);
    return Buffer.concat([d.update(data), d.final()]);
}

const trimEq = (s) => s.replace(/=+$/, "");

// The key check of a key description {iv, mac}: HMAC of AES-CTR(32 zero bytes) under the sub-keys for "".
function keyCheckPasses(key, info) {
    const { aes, hmac } = subKeys(key, "");
    const ct = aesCtr(aes, unb64(info.iv), Buffer.alloc(32));
    return trimEq(createHmac("sha256", hmac).update(ct).digest("base64")) === trimEq(info.mac);
}

// One secret {iv, ciphertext, mac} under `key` for `name`: the plaintext string, after the MAC check.
function decryptSecret(key, name, enc) {
    const { aes, hmac } = subKeys(key, name);
    const ct = unb64(enc.ciphertext);
    if (trimEq(createHmac("sha256", hmac).update(ct).digest("base64")) !== trimEq(enc.mac))
        throw new Error(`${name}: MAC mismatch`);
    const iv = unb64(enc.iv);
    if (iv.length !== 16) throw new Error(`${name}: iv of ${iv.length} bytes`);
    return aesCtr(aes, iv, ct).toString("utf8");
}

// The Ed25519 public key (unpadded base64) of a 32-byte seed given in base64.
function ed25519Public(seedB64) {
    const der = Buffer.concat([Buffer.from("302e020100300506032b657004220420", "hex"), unb64(seedB64)]);
    const priv = createPrivateKey({ key: der, format: "der", type: "pkcs8" });
    const jwk = createPublicKey(priv).export({ format: "jwk" });
    return Buffer.from(jwk.x, "base64url").toString("base64").replace(/=+$/, "");
}

// ---------------------------------------------------------------------------------------------------------------
// One js-sdk client

async function makeClient(localpart, password) {
    const loginClient = sdk.createClient({ baseUrl: HOMESERVER });
    const login = await loginClient.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: localpart },
        password,
        initial_device_display_name: "mxverify secret-storage fixture (matrix-js-sdk)",
    });
    const keys = new Map();
    const client = sdk.createClient({
        baseUrl: HOMESERVER,
        accessToken: login.access_token,
        userId: login.user_id,
        deviceId: login.device_id,
        cryptoCallbacks: {
            getSecretStorageKey: async ({ keys: wanted }) => {
                for (const id of Object.keys(wanted)) if (keys.has(id)) return [id, keys.get(id)];
                return null;
            },
            cacheSecretStorageKey: (id, _info, key) => keys.set(id, key),
        },
    });
    await client.initRustCrypto({ useIndexedDB: false });
    const synced = new Promise((resolve) =>
        client.on(sdk.ClientEvent.Sync, (state) => {
            if (state === sdk.SyncState.Prepared || state === sdk.SyncState.Syncing) resolve();
        }),
    );
    await client.startClient({ initialSyncLimit: 1, pollTimeout: 1000 });
    await synced;
    const authWithPassword = async (makeRequest) => {
        try {
            await makeRequest(null);
        } catch (e) {
            if (e?.httpStatus !== 401 || !e?.data?.flows) throw e;
            await makeRequest({
                type: "m.login.password",
                identifier: { type: "m.id.user", user: login.user_id },
                password,
                session: e.data.session,
            });
        }
    };
    return { client, login, authWithPassword };
}

// The account data of `type` exactly as the server returns it (null if there is none).
async function rawAccountData(client, userId, type) {
    try {
        return await client.http.authedRequest(
            "GET",
            `/user/${encodeURIComponent(userId)}/account_data/${encodeURIComponent(type)}`,
        );
    } catch (e) {
        if (e?.httpStatus === 404) return null;
        throw e;
    }
}

const CROSS_SIGNING = {
    "m.cross_signing.master": "master_key",
    "m.cross_signing.self_signing": "self_signing_key",
    "m.cross_signing.user_signing": "user_signing_key",
};

async function fixture(kind) {
    const localpart = `ssss-fixture-${kind}-${Date.now().toString(36)}${process.pid.toString(36)}`;
    const password = `pw-${localpart}`;
    register(localpart, password);
    say(`${kind}: user ${localpart}`);
    const { client, login, authWithPassword } = await makeClient(localpart, password);
    const userId = login.user_id;
    const crypto = client.getCrypto();
    try {
        await crypto.bootstrapCrossSigning({
            setupNewCrossSigning: true,
            authUploadDeviceSigningKeys: authWithPassword,
        });
        let made;
        await crypto.bootstrapSecretStorage({
            setupNewSecretStorage: true,
            setupNewKeyBackup: true,
            createSecretStorageKey: async () => {
                made = await crypto.createRecoveryKeyFromPassphrase(kind === "passphrase" ? PASSPHRASE : undefined);
                return made;
            },
        });
        if (!made) throw new Error("bootstrapSecretStorage did not ask for a key");

        const defaultKey = await rawAccountData(client, userId, "m.secret_storage.default_key");
        const keyId = defaultKey?.key;
        if (!keyId) throw new Error(`no default key: ${JSON.stringify(defaultKey)}`);
        const accountData = { "m.secret_storage.default_key": defaultKey };
        const keyType = `m.secret_storage.key.${keyId}`;
        accountData[keyType] = await rawAccountData(client, userId, keyType);
        for (const name of [...Object.keys(CROSS_SIGNING), "m.megolm_backup.v1"]) {
            accountData[name] = await rawAccountData(client, userId, name);
            if (!accountData[name]?.encrypted?.[keyId]) throw new Error(`${name} is not stored under ${keyId}`);
        }

        // The public cross-signing keys as /keys/query gives them, and the key backup version.
        const query = await client.http.authedRequest("POST", "/keys/query", undefined, {
            device_keys: { [userId]: [] },
        });
        const published = {
            master_key: query.master_keys?.[userId] ?? null,
            self_signing_key: query.self_signing_keys?.[userId] ?? null,
            user_signing_key: query.user_signing_keys?.[userId] ?? null,
        };
        const backupVersion = await client.http.authedRequest("GET", "/room_keys/version");

        const bundle = await crypto.exportSecretsBundle();
        const decryptedByJsSdk = {};
        for (const name of Object.keys(accountData)) {
            if (accountData[name]?.encrypted) decryptedByJsSdk[name] = await client.secretStorage.get(name);
        }

        // ---- independent checks
        const key = Buffer.from(made.privateKey);
        const recoveryKey = made.encodedPrivateKey;
        if (!key.equals(recoveryKeyBytes(recoveryKey))) throw new Error("the recovery key does not encode the key");
        if (!Buffer.from(cryptoApi.decodeRecoveryKey(recoveryKey)).equals(key))
            throw new Error("js-sdk decodes its recovery key to another key");
        const keyInfo = accountData[keyType];
        if (keyInfo.algorithm !== "m.secret_storage.v1.aes-hmac-sha2")
            throw new Error(`algorithm ${keyInfo.algorithm}`);
        if (!keyCheckPasses(key, keyInfo)) throw new Error("the key check of the key description fails");
        const ivs = [keyInfo.iv];
        for (const c of Object.values(accountData)) if (c?.encrypted) ivs.push(c.encrypted[keyId].iv);
        for (const iv of ivs) if (unb64(iv)[8] & 0x80) throw new Error(`iv ${iv} has bit 63 set`);
        if (kind === "passphrase") {
            const pp = keyInfo.passphrase;
            if (pp?.algorithm !== "m.pbkdf2") throw new Error(`passphrase ${JSON.stringify(pp)}`);
            const derived = pbkdf2Sync(PASSPHRASE, pp.salt, pp.iterations, (pp.bits ?? 256) / 8, "sha512");
            if (!derived.equals(key)) throw new Error("PBKDF2 of the passphrase is not the key");
        } else if (keyInfo.passphrase) {
            throw new Error("a random key with a passphrase description");
        }
        const decrypted = {};
        for (const name of Object.keys(decryptedByJsSdk)) {
            decrypted[name] = decryptSecret(key, name, accountData[name].encrypted[keyId]);
            if (decrypted[name] !== decryptedByJsSdk[name])
                throw new Error(`${name}: js-sdk decrypts it differently`);
            if (name !== "m.cross_signing.master") {
                let failed = false;
                try {
                    decryptSecret(key, "m.cross_signing.master", accountData[name].encrypted[keyId]);
                } catch {
                    failed = true;
                }
                if (!failed) throw new Error(`${name} decrypts under the wrong name`);
            }
        }
        const privateKeys = {};
        for (const [name, field] of Object.entries(CROSS_SIGNING)) {
            const fromBundle = bundle.cross_signing?.[field];
            if (!fromBundle) throw new Error(`exportSecretsBundle has no ${field}`);
            if (!unb64(fromBundle).equals(unb64(decrypted[name])) || unb64(fromBundle).length !== 32)
                throw new Error(`${field}: exportSecretsBundle and secret storage disagree`);
            const pub = ed25519Public(fromBundle);
            const publishedKey = Object.values(published[field]?.keys ?? {})[0];
            if (pub !== publishedKey) throw new Error(`${field}: private key gives ${pub}, published ${publishedKey}`);
            privateKeys[field] = fromBundle;
        }
        if (!bundle.backup?.key || !unb64(bundle.backup.key).equals(unb64(decrypted["m.megolm_backup.v1"])))
            throw new Error("the backup key in secret storage is not the one js-sdk holds");

        return {
            fields: {
                recovery_key: "the secret-storage key as js-sdk's encodeRecoveryKey formats it (what Element shows)",
                secret_storage_key: "the same 32 bytes, base64",
                key_id: "the default key's ID",
                passphrase:
                    "(passphrase fixture) the passphrase; passphrase_info is the key description's passphrase " +
                    "object as written",
                account_data:
                    "each account-data event's content exactly as GET /user/{u}/account_data/{type} returns it",
                published_keys: "the user's public cross-signing keys as POST /keys/query returns them",
                private_keys:
                    "the cross-signing private keys (Ed25519 seeds, base64 as exportSecretsBundle() gives them)",
                decrypted_secrets: "the plaintext of each stored secret, byte for byte (secretStorage.get)",
                backup:
                    "m.megolm_backup.v1: the backup decryption key from exportSecretsBundle() and the backup " +
                    "version from GET /room_keys/version",
            },
            generated_by: "interop/make-ssss-fixture.mjs",
            matrix_js_sdk: versionOf("matrix-js-sdk"),
            matrix_sdk_crypto_wasm: versionOf("@matrix-org/matrix-sdk-crypto-wasm"),
            user_id: userId,
            device_id: login.device_id,
            recovery_key: recoveryKey,
            secret_storage_key: b64(key),
            key_id: keyId,
            ...(kind === "passphrase"
                ? {
                      passphrase: PASSPHRASE,
                      passphrase_info: keyInfo.passphrase,
                      salt: keyInfo.passphrase.salt,
                      iterations: keyInfo.passphrase.iterations,
                  }
                : {}),
            account_data: accountData,
            published_keys: published,
            private_keys: privateKeys,
            decrypted_secrets: decrypted,
            backup: { ...bundle.backup, version_info: backupVersion },
            checks_passed: [
                "recovery key: base58, prefix 8B 01, parity; decodes to secret_storage_key",
                "key check (iv/mac of the key description) with HKDF info ''",
                ...(kind === "passphrase"
                    ? ["PBKDF2-HMAC-SHA-512(passphrase, salt, iterations) = secret_storage_key"]
                    : []),
                "every secret: HMAC, then AES-256-CTR under HKDF(secret name), gives js-sdk's plaintext",
                "every secret's MAC fails under another secret's name",
                "every IV (key check and secrets) has bit 63 (the top bit of byte 8) clear",
                "every cross-signing private key's Ed25519 public key equals the published one",
            ],
        };
    } finally {
        client.stopClient();
    }
}

const digest = (obj) => createHash("sha256").update(JSON.stringify(obj)).digest("hex").slice(0, 12);
for (const [kind, file] of [
    ["random", "js-sdk-secret-storage.json"],
    ["passphrase", "js-sdk-secret-storage-passphrase.json"],
]) {
    const data = await fixture(kind);
    const path = join(OUT_DIR, file);
    writeFileSync(path, JSON.stringify(data, null, 2) + "\n");
    say(`${kind}: wrote ${path} (${digest(data)})`);
    process.stdout.write(`${path}\n`);
}
process.exit(0);
