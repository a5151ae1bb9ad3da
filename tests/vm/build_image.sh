#!/usr/bin/env bash
# Build (or reuse) the QEMU test image for the kprobe-tier harness, as root.
#   tests/vm/build_image.sh [CACHE_DIR]        default /var/cache/edr-vm (or $EDR_VM_CACHE)
# Produces in CACHE_DIR: rootfs.img (ext4, Debian 12 made by debootstrap), boot/ (each kernel's
# vmlinuz and initrd, for qemu -kernel/-initrd), kernels.txt (one release per line) and
# wheels/ (the project's Python dependencies, fetched on the host so the VM needs no network).
# Kernels: Debian 12's own linux-image-amd64 (6.1) and the bookworm-backports one (6.12), each
# with its matching linux-headers package, so BCC compiles against the running kernel's structs.
# A stamp holds a hash of this script and of pyproject.toml: an unchanged pair reuses the image.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${1:-${EDR_VM_CACHE:-/var/cache/edr-vm}}
mirror=${EDR_VM_MIRROR:-http://deb.debian.org/debian}
size=${EDR_VM_IMAGE_SIZE:-6G}

log() { printf 'vm-image: %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "vm-image: run as root (debootstrap, chroot)" >&2; exit 1; }
for tool in debootstrap mkfs.ext4 qemu-system-x86_64; do
    command -v "$tool" >/dev/null || { echo "vm-image: $tool missing (apt-get install debootstrap qemu-system-x86 e2fsprogs)" >&2; exit 1; }
done

mkdir -p "$cache"
want=$(cat "$here/build_image.sh" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ -f "$cache/stamp" ] && [ "$(cat "$cache/stamp")" = "$want" ] && [ -f "$cache/rootfs.img" ]; then
    log "cached image is current ($cache)"
    exit 0
fi

# Wheels for the project's dependencies (and pytest: the guest check reuses the e2e test helpers),
# fetched with the host's pip so that the guest never needs a package index.
log "downloading wheels"
rm -rf "$cache/wheels.tmp"
"$repo/.venv/bin/pip" download -q --disable-pip-version-check -d "$cache/wheels.tmp" \
    "$repo" "pytest==9.2.0" "pytest-timeout==2.4.0" "setuptools>=69" wheel
rm -f "$cache/wheels.tmp"/edr-*
rm -rf "$cache/wheels" && mv "$cache/wheels.tmp" "$cache/wheels"

root="$cache/rootfs.tmp"
cleanup() {
    for m in proc sys dev/pts dev var/cache/apt/archives; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m" || true
    done
}
trap cleanup EXIT
cleanup
rm -rf "$root"
mkdir -p "$cache/debs"
log "debootstrap bookworm"
debootstrap --variant=minbase --cache-dir="$cache/debs" bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }

cat >"$root/etc/apt/sources.list" <<SRC
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $mirror bookworm-backports main
SRC
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"  # no daemons start in the chroot
chmod 755 "$root/usr/sbin/policy-rc.d"
echo edr-vm >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 edr-vm\n::1 localhost ip6-localhost\n' >"$root/etc/hosts"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"

in_root() { chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
# downloaded .debs are kept in the cache (bind-mounted) so that a rebuild fetches nothing twice
mkdir -p "$cache/apt-archives/partial"
mount --bind "$cache/apt-archives" "$root/var/cache/apt/archives"
in_root apt-get update -qq
# The backports kernel is named by version, found through its metapackage's dependency.
bp_image=$(in_root apt-cache depends linux-image-amd64/bookworm-backports | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
bp_headers=$(in_root apt-cache depends linux-headers-amd64/bookworm-backports | awk '/Depends: linux-headers-[0-9]/ {print $2; exit}')
[ -n "$bp_image" ] && [ -n "$bp_headers" ] || { echo "vm-image: no bookworm-backports kernel found" >&2; exit 1; }
log "installing kernels (linux-image-amd64, $bp_image) and packages"
in_root apt-get install -y -qq --no-install-recommends \
    linux-image-amd64 linux-headers-amd64 "$bp_image" "$bp_headers" \
    initramfs-tools kmod udev python3 python3-venv python3-pip python3-bpfcc bpfcc-tools \
    nftables iproute2 util-linux ca-certificates procps >"$cache/apt.log" 2>&1 \
    || { tail -30 "$cache/apt.log" >&2; exit 1; }

# The project's venv, laid out as scripts/setup.sh makes it (the guest re-runs setup.sh, which
# then finds everything in place); the repo itself is copied in fresh at every boot.
mkdir -p "$root/opt/edr" "$root/opt/wheels"
tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude='*.egg-info' --exclude=__pycache__ -cf - . \
    | tar -C "$root/opt/edr" -xf -
cp -a "$cache/wheels/." "$root/opt/wheels/"
in_root /usr/bin/python3 -m venv /opt/edr/.venv
in_root /opt/edr/.venv/bin/pip install -q --disable-pip-version-check --no-index --find-links /opt/wheels \
    -e /opt/edr pytest==9.2.0 pytest-timeout==2.4.0
sha=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
echo "$sha" >"$root/opt/edr/.venv/.installed"

# PID 1 of the guest: mount the repo share and hand over to the repo's tests/vm/guest_init.sh,
# so that changing the guest script never needs a rebuilt image.
cat >"$root/sbin/edr-vm-init" <<'INIT'
#!/bin/sh
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
modprobe 9pnet_virtio && modprobe 9p
mkdir -p /mnt/repo
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 edrrepo /mnt/repo; then
    echo "EDR-VM-FATAL cannot mount the repo share"
    echo o >/proc/sysrq-trigger
fi
exec /bin/sh /mnt/repo/tests/vm/guest_init.sh
INIT
chmod 755 "$root/sbin/edr-vm-init"
# Kernels and initrds are booted directly by qemu.
rm -rf "$cache/boot" && mkdir -p "$cache/boot"
: >"$cache/kernels.txt.tmp"
for k in "$root"/boot/vmlinuz-*; do
    rel=${k#"$root"/boot/vmlinuz-}
    [ -f "$root/boot/initrd.img-$rel" ] || { echo "vm-image: no initrd for $rel" >&2; exit 1; }
    # build/ is an absolute link into the guest's /usr/src: check its target inside the root
    [ -f "$root/usr/src/linux-headers-$rel/include/generated/utsrelease.h" ] || { echo "vm-image: no headers for $rel" >&2; exit 1; }
    cp "$k" "$root/boot/initrd.img-$rel" "$cache/boot/"
    echo "$rel" >>"$cache/kernels.txt.tmp"
done
sort -V "$cache/kernels.txt.tmp" >"$cache/kernels.txt" && rm "$cache/kernels.txt.tmp"
cleanup
log "writing rootfs.img ($size)"
rm -f "$cache/rootfs.img.tmp"
mkfs.ext4 -q -L edr-root -d "$root" "$cache/rootfs.img.tmp" "$size"
mv "$cache/rootfs.img.tmp" "$cache/rootfs.img"
rm -rf "$root"
echo "$want" >"$cache/stamp"
log "ready: $(tr '\n' ' ' <"$cache/kernels.txt")"
