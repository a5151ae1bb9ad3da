# Shared by scripts/setup.sh and scripts/install.sh (sourced; the caller defines log and die).
# apt installs and the kernel headers BCC needs.

apt_updated=0

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

apt_install() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Install every named package that is missing.
ensure_packages() {
    local missing=() p
    for p in "$@"; do installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

# Kernel headers for BCC. The running kernel's own are best (Ubuntu ships them for every
# kernel). Where there are none (as on the CI machines), Debian's generic headers are merged
# into one folder that the sensor passes to BCC as BCC_KERNEL_SOURCE: safe for tracepoint
# programs, which read no kernel struct; the sensor refuses the kprobe tier with them.
install_headers() {
    local kver arch generic common specific
    kver=$(uname -r)
    generic=/usr/src/edr-bcc-headers
    if [ -e "/lib/modules/$kver/build" ] || [ -d "$generic/include" ]; then
        return 0
    fi
    if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
    if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
        apt_install "linux-headers-$kver"
        return 0
    fi
    arch=$(dpkg --print-architecture)
    installed "linux-headers-$arch" || apt_install "linux-headers-$arch"
    common=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-common' | sort -V | tail -1)
    specific=${common%-common}-$arch
    [ -n "$common" ] && [ -d "$specific" ] \
        || die "no kernel headers under /usr/src after installing linux-headers-$arch"
    log "merging $common and $specific into $generic (generic headers for BCC)"
    rm -rf "$generic.tmp"
    mkdir -p "$generic.tmp"
    cp -as "$common/." "$generic.tmp/"
    cp -asf "$specific/." "$generic.tmp/"
    mv "$generic.tmp" "$generic"
}
