#!/usr/bin/env bash
# The main job: set up, then run the controller (embedded SQLite) and a local sensor enrolled
# to it over the mutual-TLS backplane. Ctrl-C stops both. State lives in $EDR_STATE
# (default /var/lib/edr); a second run reuses it (same CA, users and enrollment).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

state=${EDR_STATE:-/var/lib/edr}
ctl_state=$state/controller
sensor_state=$state/sensor
https_port=${EDR_HTTPS_PORT:-8443}
backplane_port=${EDR_BACKPLANE_PORT:-7443}
bin=.venv/bin
mkdir -p "$ctl_state" "$sensor_state"
chmod 700 "$state" "$ctl_state" "$sensor_state"

log() { printf 'run: %s\n' "$*" >&2; }

EDR_CONTROLLER_HTTP_PORT=$https_port EDR_CONTROLLER_BACKPLANE="tcp://0.0.0.0:$backplane_port" \
    "$bin/edr-controller" serve --state-dir "$ctl_state" &
controller=$!
sensor=""
stop() {
    [ -n "$sensor" ] && kill -INT "$sensor" 2>/dev/null && wait "$sensor" 2>/dev/null
    kill -TERM "$controller" 2>/dev/null && wait "$controller" 2>/dev/null
}
trap stop EXIT
trap 'exit 130' INT TERM

# Wait until the controller answers on its HTTPS port (it creates its PKI on the first run).
"$bin/python" - "$https_port" "$controller" <<'PY'
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("run: the controller exited during start-up (see its messages above)")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.3)
sys.exit("run: the controller did not start within 60 s")
PY

if ! "$bin/edr-controller" user list --state-dir "$ctl_state" 2>/dev/null | grep -q .; then
    password=$("$bin/python" -c 'import secrets; print(secrets.token_urlsafe(18))')
    printf '%s\n' "$password" | "$bin/edr-controller" user add admin --role admin \
        --state-dir "$ctl_state" >/dev/null
    umask 077
    printf 'admin %s\n' "$password" > "$state/initial-admin-password"
    log "created console user 'admin'; its password is in $state/initial-admin-password"
fi

if [ ! -e "$sensor_state/credentials.pem" ] && [ ! -e "$sensor_state/sensor.pem" ]; then
    pki=(--state-dir "$ctl_state/pki")
    token=$("$bin/edr-certs" "${pki[@]}" token create --ttl 10m --uses 1 | tail -1)
    fingerprint=$("$bin/edr-certs" "${pki[@]}" fingerprint | tail -1)
    "$bin/edr-sensor" enroll --controller "127.0.0.1:$https_port" --token "$token" \
        --ca-sha256 "$fingerprint" --state-dir "$sensor_state"
fi

log "console: https://localhost:$https_port/ (API at /api/v1, metrics at /metrics)"
"$bin/edr-sensor" run --state-dir "$sensor_state" --controller "localhost:$backplane_port" \
    --output - "$@" &
sensor=$!
wait "$sensor"
