#!/usr/bin/env bash
# js <-> js smoke test of interop/driver.mjs against the local Synapse (see interop/smoke.mjs).
# Installs the interop peer if needed (scripts/interop-setup) and starts Synapse if it is not running.
# Extra arguments go to smoke.mjs (e.g. --runs 5). The last line of output is "N passed, M failed".
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
NODE22="$("$ROOT/scripts/interop-setup" | tail -n 1)"
"$ROOT/scripts/synapse" start >&2
URL="$("$ROOT/scripts/synapse" url)"
exec "$NODE22" "$ROOT/interop/smoke.mjs" --homeserver "$URL" "$@"
