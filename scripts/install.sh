#!/usr/bin/env bash
# Install the EDR sensor and/or controller as systemd services on Ubuntu 24.04 or Debian 12.
# Non-interactive and idempotent: a second run updates the code and units, keeps the config.
#
#   sudo scripts/install.sh                       both daemons
#   sudo scripts/install.sh --sensor --controller-address edr.example.org:7443
#   sudo scripts/install.sh --controller
#
# Options:
#   --sensor / --controller       what to install (default: both)
#   --controller-address H[:P]    the backplane address the sensor streams to (sensor.env)
#   --root DIR                    install into DIR as a staging root (no apt, no users, no
#                                 service start; units are enabled offline with systemctl --root)
#   --no-packages                 skip apt (the packages are already there)
#   --no-start                    enable the units but do not start the controller now
#
# Layout: code and venv under /opt/edr, config under /etc/edr, state under /var/lib/edr, units
# in /etc/systemd/system. The one manual step, printed at the end, is `edr-sensor enroll`.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
root=""
want_sensor=0
want_controller=0
controller_address=""
packages=1
start=1

die() { printf 'install: %s\n' "$*" >&2; exit 1; }
log() { printf 'install: %s\n' "$*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --sensor) want_sensor=1 ;;
        --controller) want_controller=1 ;;
        --controller-address)
            [ $# -ge 2 ] || die "--controller-address needs HOST[:PORT]"
            controller_address=$2; shift ;;
        --root)
            [ $# -ge 2 ] || die "--root needs a directory"
            root=$2; shift ;;
        --no-packages) packages=0 ;;
        --no-start) start=0 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
if [ "$want_sensor" = 0 ] && [ "$want_controller" = 0 ]; then
    want_sensor=1
    want_controller=1
fi
# Only characters of host names, IPv4/IPv6 literals and a port: the value is written into an
# EnvironmentFile and must not be able to add lines or shell syntax.
if [ -n "$controller_address" ] \
        && ! [[ "$controller_address" =~ ^[A-Za-z0-9._:-]+$|^\[[0-9A-Fa-f:.]+\](:[0-9]+)?$ ]]; then
    die "--controller-address $controller_address: expected HOST[:PORT]"
fi

if [ -n "$root" ]; then
    mkdir -p "$root"
    root=$(cd "$root" && pwd)
    [ "$root" != / ] || root=""
fi
staging=0
[ -n "$root" ] && staging=1
if [ "$staging" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0): apt, users and systemd units need it"
fi

opt=$root/opt/edr
etc=$root/etc/edr
units=$root/etc/systemd/system
systemd_running=0
[ "$staging" = 0 ] && [ -d /run/systemd/system ] && systemd_running=1

# -- packages ----------------------------------------------------------------------------------
. "$src/scripts/lib/packages.sh"

if [ "$staging" = 0 ] && [ "$packages" = 1 ]; then
    command -v apt-get >/dev/null || die "apt-get not found: only Debian and Ubuntu are supported"
    wanted=(python3 python3-venv ca-certificates)
    [ "$want_sensor" = 1 ] && wanted+=(python3-bpfcc nftables iproute2 gcc python3-dev libssl-dev)
    ensure_packages "${wanted[@]}"
    [ "$want_sensor" = 1 ] && install_headers
fi

# -- code and venv -----------------------------------------------------------------------------
# The source is copied to /opt/edr/src and installed editable from there: the controller serves
# webui/ from next to its package, and nothing is built inside the caller's checkout.
log "copying the source to $opt/src"
mkdir -p "$opt/src"
tar -C "$src" --exclude=__pycache__ --exclude='*.pyc' --exclude=node_modules \
    --exclude='_hotpath*.so' -cf - \
    pyproject.toml README.md sensor backplane controller certs webui systemd packaging \
    | tar -C "$opt/src" -xf -
venv=$opt/venv
if [ ! -x "$venv/bin/python" ]; then
    log "creating the venv $venv"
    /usr/bin/python3 -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# BCC comes from the distribution (python3-bpfcc), never from PyPI's unrelated "bcc".
if bcc_dir=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))' \
        2>/dev/null); then
    ln -sfn "$bcc_dir" "$site/bcc"
elif [ "$want_sensor" = 1 ]; then
    log "warning: BCC is not importable; the sensor will use its fallback tier"
fi
log "pip install -e $opt/src"
"$venv/bin/pip" install -q --disable-pip-version-check -e "$opt/src"
# The sensor's compiled record path, for this machine's Python; without it the sensor runs the
# same capture in Python, at about twice the CPU.
if [ "$want_sensor" = 1 ] && ! "$venv/bin/python" -m sensor.build_hotpath; then
    log "warning: the compiled record path did not build; the sensor uses the Python one"
fi
# The units set PYTHONDONTWRITEBYTECODE (the tree is read-only to them): compile now.
"$venv/bin/python" -m compileall -q "$opt/src" >/dev/null || true
chmod -R a+rX,go-w "$opt"

mkdir -p "$root/usr/local/bin"
for tool in edr-sensor edr-controller edr-certs; do
    ln -sfn "/opt/edr/venv/bin/$tool" "$root/usr/local/bin/$tool"
done

# -- users -------------------------------------------------------------------------------------
if [ "$want_controller" = 1 ] && [ "$staging" = 0 ] && ! getent passwd edr-controller >/dev/null; then
    log "creating the system user edr-controller"
    useradd --system --user-group --home-dir /var/lib/edr/controller --no-create-home \
        --shell /usr/sbin/nologin --comment "EDR controller" edr-controller
fi

# -- configuration (kept when present) ---------------------------------------------------------
install -d -m 0755 "$etc"
place() {  # place SOURCE TARGET MODE [GROUP]: copy only when TARGET does not exist yet
    if [ ! -e "$2" ]; then
        install -m "$3" "$1" "$2"
        log "wrote $2"
    fi
    if [ -n "${4:-}" ] && [ "$staging" = 0 ]; then
        chgrp "$4" "$2"
    fi
}
if [ "$want_sensor" = 1 ]; then
    place "$src/packaging/sensor.toml" "$etc/sensor.toml" 0600
    place "$src/packaging/sensor.env" "$etc/sensor.env" 0600
    if [ -n "$controller_address" ]; then
        tmp=$(mktemp "$etc/.sensor.env.XXXXXX")
        grep -v '^EDR_SENSOR_CONTROLLER=' "$etc/sensor.env" > "$tmp" || true
        printf 'EDR_SENSOR_CONTROLLER=%s\n' "$controller_address" >> "$tmp"
        chmod 0600 "$tmp"
        mv "$tmp" "$etc/sensor.env"
        log "sensor streams to $controller_address"
    fi
fi
if [ "$want_controller" = 1 ]; then
    # Readable by the service user through its group, writable by root only.
    place "$src/packaging/controller.toml" "$etc/controller.toml" 0640 edr-controller
    place "$src/packaging/controller.env" "$etc/controller.env" 0640 edr-controller
fi

# -- units -------------------------------------------------------------------------------------
install -d -m 0755 "$units"
names=()
[ "$want_controller" = 1 ] && names+=(edr-controller.service)
[ "$want_sensor" = 1 ] && names+=(edr-sensor.service)
for unit in "${names[@]}"; do
    install -m 0644 "$src/systemd/$unit" "$units/$unit"
done
if [ "$staging" = 1 ]; then
    systemctl --root="$root" enable "${names[@]}" >/dev/null 2>&1 \
        || die "systemctl --root=$root enable ${names[*]} failed"
elif [ "$systemd_running" = 1 ]; then
    systemctl daemon-reload
    systemctl enable "${names[@]}" >/dev/null 2>&1
    if [ "$want_controller" = 1 ] && [ "$start" = 1 ]; then
        systemctl restart edr-controller.service
    fi
    # The sensor starts by itself once enrolled (ConditionPathExists on its certificate);
    # restarting it here picks up new code when it already runs.
    if [ "$want_sensor" = 1 ] && [ "$start" = 1 ]; then
        systemctl try-restart edr-sensor.service
    fi
else
    systemctl enable "${names[@]}" >/dev/null 2>&1 \
        || log "warning: systemd is not running; enable the units when it is"
fi

# -- the manual step ---------------------------------------------------------------------------
pki=/var/lib/edr/controller/pki
as_ctl="runuser -u edr-controller --"
cat >&2 <<EOF
install: done. Code in /opt/edr, configuration in /etc/edr, units in /etc/systemd/system.
EOF
if [ "$want_controller" = 1 ]; then
    cat >&2 <<EOF

On the controller (its files belong to edr-controller, so run its tools as that user):
    $as_ctl /opt/edr/venv/bin/edr-controller user add admin --role admin
    $as_ctl /opt/edr/venv/bin/edr-certs --state-dir $pki token create --ttl 1h --uses 1
    $as_ctl /opt/edr/venv/bin/edr-certs --state-dir $pki fingerprint
EOF
fi
if [ "$want_sensor" = 1 ]; then
    cat >&2 <<EOF

The one manual step on each sensor host (token and fingerprint from the controller):
    edr-sensor enroll --controller CONTROLLER:8443 --token TOKEN --ca-sha256 FINGERPRINT
    systemctl start edr-sensor
EOF
    [ -n "$controller_address" ] || cat >&2 <<EOF
and set EDR_SENSOR_CONTROLLER=CONTROLLER:7443 in /etc/edr/sensor.env first (or rerun with
--controller-address CONTROLLER:7443).
EOF
fi
