#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 / Ubuntu 24.04 machine, as root.
#   scripts/setup.sh          what the sensor and controller need to run
#   scripts/setup.sh --test   plus what the tests and benchmarks need
# Installs Debian packages (BCC from the distribution, never PyPI's unrelated "bcc"), kernel
# headers for BCC, and a venv in .venv with the project installed editable.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (sudo $0): BPF, apt and nftables need it" >&2
    exit 1
fi

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }
. scripts/lib/packages.sh

# gcc, python3-dev and libssl-dev build the sensor's compiled record path (sensor/_hotpath.c)
packages=(python3 python3-venv python3-pip python3-bpfcc bpfcc-tools nftables iproute2
          util-linux ca-certificates gcc python3-dev libssl-dev)
if [ "$want_test" = 1 ]; then
    packages+=(bpftrace auditd chromium chromium-driver procps)
fi
ensure_packages "${packages[@]}"

# auditd starts itself on install; the benchmark starts it when it needs it.
if [ "$want_test" = 1 ] && systemctl is-active --quiet auditd 2>/dev/null; then
    systemctl stop auditd 2>/dev/null || true
fi

install_headers

# The venv, on the distribution's Python so that its BCC bindings match.
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    /usr/bin/python3 -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
bcc_dir=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))')
ln -sfn "$bcc_dir" "$site/bcc"

stamp="$venv/.installed"
extras=""
[ "$want_test" = 1 ] && extras="[dev]"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)$extras"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
    log "pip install -e .$extras"
    "$venv/bin/pip" install -q --disable-pip-version-check -e ".$extras"
    echo "$want" > "$stamp"
fi
# The compiled fork/exec/exit path; rebuilt when its source changed. A failure stops here: the
# sensor would run, but slower, and the tests would not cover the path the sensor uses.
"$venv/bin/python" -m sensor.build_hotpath
# The unprivileged fallback tests run the sensor as 'nobody' from this venv.
chmod -R a+rX "$venv" sensor backplane 2>/dev/null || true
log "ready"
