#!/bin/sh
# PID 1 of the test VM (exec'd by /sbin/edr-vm-init from the read-only repo share).
# Copies the repo into the guest, lets scripts/setup.sh check the install (it finds packages,
# matching headers and the venv in place, so it needs no network), runs tests/vm/guest_check.py
# once per tier named by edr.tiers= on the kernel command line, and powers off. Every result
# is one "EDR-VM-RESULT {json}" line on the serial console; the host harness parses them.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LC_ALL=C.UTF-8 PYTHONDONTWRITEBYTECODE=1

finish() {
    echo "EDR-VM-DONE"
    sync
    echo o >/proc/sysrq-trigger  # power off; PID 1 must not exit (that panics the kernel)
    sleep 30
}

mount -o remount,rw / 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
mount -t debugfs nodev /sys/kernel/debug 2>/dev/null
hostname edr-vm
ip link set lo up  # the network checks use loopback only; the VM has no other interface

tiers=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^edr\.tiers=//p' | tr ',' ' ')
[ -n "$tiers" ] || tiers="kprobe tracepoint"

echo "EDR-VM-BOOTED $(uname -r)"
# a fresh copy of the repo, keeping only the venv that the image was built with
find /opt/edr -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
tar -C /mnt/repo --exclude=./.venv --exclude=./.git --exclude='*.egg-info' --exclude=__pycache__ \
    -cf - . | tar -C /opt/edr -xf -
cd /opt/edr || finish
if ! PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/wheels scripts/setup.sh; then
    echo 'EDR-VM-RESULT {"error": "scripts/setup.sh failed in the guest"}'
    finish
fi
for tier in $tiers; do
    timeout 600 .venv/bin/python tests/vm/guest_check.py --tier "$tier"
    rc=$?
    # 1: the checks ran and some failed (the result line already says which; an uncaught
    # exception also exits 1 and leaves no result, which the harness reports as missing)
    if [ "$rc" -gt 1 ]; then
        echo "EDR-VM-RESULT {\"tier\": \"$tier\", \"error\": \"guest_check exited $rc\"}"
    fi
done
finish
