#!/usr/bin/env bash
# Installs promtool (Prometheus' rule checker) into the repo's local tools
# folder (.tools/bin, or $FLOTILLA_TOOLS/bin), without changing the system:
# Debian's prometheus package is downloaded and only promtool is unpacked
# from it (dpkg -x). The alert rule tests (tests/deploy.rs) use it.
#
# Elsewhere: put promtool on PATH (it ships with every Prometheus release)
# and this script uses it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
tools=${FLOTILLA_TOOLS:-$repo/.tools}
target=$tools/bin/promtool

if [ -x "$target" ] && "$target" --version >/dev/null 2>&1; then
    echo "install-promtool: already at $target"
    exit 0
fi
if command -v promtool >/dev/null 2>&1; then
    mkdir -p "$tools/bin"
    ln -sf "$(command -v promtool)" "$target"
    echo "install-promtool: using $(command -v promtool)"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || {
    echo "install-promtool: apt-get not found; put promtool on PATH" >&2
    exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/unpacked"
# apt drops to the _apt user for downloads, who cannot write to this
# private temporary folder: download as the current user.
echo "install-promtool: downloading Debian's prometheus package"
if ! (cd "$work" && apt-get -o "APT::Sandbox::User=$(id -un)" -qq download prometheus 2>/dev/null); then
    apt-get -qq update
    (cd "$work" && apt-get -o "APT::Sandbox::User=$(id -un)" -qq download prometheus)
fi
dpkg -x "$work"/prometheus_*.deb "$work/unpacked"
mkdir -p "$tools/bin"
install -m 0755 "$work/unpacked/usr/bin/promtool" "$target"
echo "install-promtool: $("$target" --version 2>&1 | head -1) installed at $target"
