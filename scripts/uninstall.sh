#!/usr/bin/env bash
# Remove what scripts/install.sh installed. Non-interactive and idempotent.
#
#   sudo scripts/uninstall.sh            stop and remove the units, the venv and code in /opt/edr,
#                                        the sensor's nftables table; keep config and state
#   sudo scripts/uninstall.sh --purge    also remove /etc/edr, /var/lib/edr, /var/log/edr and the
#                                        edr-controller user
#
# Options: --root DIR removes from a staging root made by install.sh --root (no systemctl, no
# nftables, no users); --nftables with --root still deletes the table in the current network
# namespace (the tests run it inside a namespace they made).
set -euo pipefail

root=""
purge=0
nftables=1
die() { printf 'uninstall: %s\n' "$*" >&2; exit 1; }
log() { printf 'uninstall: %s\n' "$*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --purge) purge=1 ;;
        --nftables) nftables=2 ;;
        --root)
            [ $# -ge 2 ] || die "--root needs a directory"
            root=$2; shift ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
if [ -n "$root" ]; then
    [ -d "$root" ] || die "--root $root: no such directory"
    root=$(cd "$root" && pwd)
    [ "$root" != / ] || root=""
fi
staging=0
[ -n "$root" ] && staging=1
[ "$staging" = 1 ] && [ "$nftables" = 1 ] && nftables=0
if [ "$staging" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0)"
fi

units=(edr-sensor.service edr-controller.service)
unit_dir=$root/etc/systemd/system

if [ "$staging" = 1 ]; then
    for unit in "${units[@]}"; do
        [ -e "$unit_dir/$unit" ] && systemctl --root="$root" disable "$unit" >/dev/null 2>&1 || true
    done
elif [ -d /run/systemd/system ]; then
    for unit in "${units[@]}"; do
        if [ -e "$unit_dir/$unit" ]; then
            log "stopping and disabling $unit"
            systemctl disable --now "$unit" >/dev/null 2>&1 || true
        fi
    done
else
    for unit in "${units[@]}"; do
        [ -e "$unit_dir/$unit" ] && systemctl disable "$unit" >/dev/null 2>&1 || true
    done
fi
for unit in "${units[@]}"; do
    rm -f "$unit_dir/$unit"
    rm -rf "$unit_dir/$unit.d"
done
[ "$staging" = 0 ] && [ -d /run/systemd/system ] && systemctl daemon-reload

# The sensor's network actions (block, isolate) live in one nftables table it owns: removing it
# lifts every block and an isolation even when the sensor is gone.
if [ "$nftables" != 0 ] && command -v nft >/dev/null; then
    if nft list table inet edr >/dev/null 2>&1; then
        log "deleting the nftables table inet edr"
        nft delete table inet edr
    fi
fi

for tool in edr-sensor edr-controller edr-certs; do
    link=$root/usr/local/bin/$tool
    if [ -L "$link" ] && [ "$(readlink "$link")" = "/opt/edr/venv/bin/$tool" ]; then
        rm -f "$link"
    fi
done
if [ -d "$root/opt/edr" ]; then
    log "removing $root/opt/edr"
    rm -rf "$root/opt/edr"
fi

if [ "$purge" = 1 ]; then
    for dir in "$root/etc/edr" "$root/var/lib/edr" "$root/var/log/edr"; do
        if [ -e "$dir" ]; then
            log "purging $dir"
            rm -rf "$dir"
        fi
    done
    # StateDirectory= of a unit with DynamicUser= or a changed owner may leave a private copy.
    rm -rf "$root/var/lib/private/edr"
    if [ "$staging" = 0 ] && getent passwd edr-controller >/dev/null; then
        log "removing the user edr-controller"
        userdel edr-controller
    fi
else
    log "kept /etc/edr and /var/lib/edr (use --purge to remove them)"
fi
log "done"
