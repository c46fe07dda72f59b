#!/usr/bin/env bash
# Installs nats-server >= 2.10 into the repo's local tools folder
# (.tools/bin, or $FLOTILLA_TOOLS/bin), without changing the system.
#
# Debian 12's nats-server package is 2.9, too old for the JetStream API
# flotilla uses; Debian 13 (trixie) ships 2.10, which runs on Debian 12. The
# package is fetched with a private apt configuration in a temporary folder
# and unpacked with dpkg -x; nothing is installed system-wide.
#
# Elsewhere: put any nats-server >= 2.10 on PATH (release binaries from the
# NATS project, or your distribution's package) and this script uses it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
tools=${FLOTILLA_TOOLS:-$repo/.tools}
target=$tools/bin/nats-server

version_ok() {
    # nats-server --version prints "nats-server: v2.10.27".
    local version
    version=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    [ -n "$version" ] || return 1
    set -- $version
    [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

if [ -x "$target" ] && version_ok "$target"; then
    echo "install-nats-server: $("$target" --version) already at $target"
    exit 0
fi
if command -v nats-server >/dev/null 2>&1 && version_ok "$(command -v nats-server)"; then
    mkdir -p "$tools/bin"
    ln -sf "$(command -v nats-server)" "$target"
    echo "install-nats-server: using $(command -v nats-server) ($(nats-server --version))"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || {
    echo "install-nats-server: apt-get not found; install nats-server >= 2.10 and put it on PATH" >&2
    exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/unpacked"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" > "$work/sources.list"
# apt drops to the _apt user for downloads, who cannot write to this
# private temporary folder: download as the current user.
apt_options=(
    -o "APT::Sandbox::User=$(id -un)"
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "APT::Get::List-Cleanup=0"
)
echo "install-nats-server: fetching the nats-server package index (Debian trixie)"
apt-get "${apt_options[@]}" -qq update
(cd "$work" && apt-get "${apt_options[@]}" -qq download nats-server)
dpkg -x "$work"/nats-server_*.deb "$work/unpacked"
mkdir -p "$tools/bin"
install -m 0755 "$work"/unpacked/usr/*bin/nats-server "$target"
version_ok "$target" || {
    echo "install-nats-server: $target is not a usable nats-server >= 2.10" >&2
    exit 1
}
echo "install-nats-server: $("$target" --version) installed at $target"
