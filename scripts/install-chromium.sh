#!/usr/bin/env bash
# Installs Debian's Chromium and ChromeDriver (packages chromium and
# chromium-driver, as /usr/bin/chromium and /usr/bin/chromedriver) for the
# dashboard's end-to-end test (tests/ui.rs). Unlike the other tools, a
# browser cannot live in .tools: it needs the system's libraries, so this
# is a system-wide install and needs root. Never a downloaded browser.
#
# Elsewhere: install any Chromium or Chrome with its matching chromedriver
# and point the test at them with FLOTILLA_CHROMIUM and
# FLOTILLA_CHROMEDRIVER.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "install-chromium: already installed: $(chromium --version 2>/dev/null | head -1)"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || {
    echo "install-chromium: apt-get not found; install Chromium and chromedriver yourself" >&2
    exit 1
}
if [ "$(id -u)" -ne 0 ]; then
    echo "install-chromium: needs root for apt-get; run: sudo $0" >&2
    exit 1
fi
echo "install-chromium: installing Debian's chromium and chromium-driver"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
fi
echo "install-chromium: $(chromium --version 2>/dev/null | head -1)"
