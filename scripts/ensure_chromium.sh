#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver for the browser test when they are missing.
# Needs root (or passwordless sudo) and apt; otherwise it says so and the browser test reports it.
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: no apt-get here; install chromium and chromedriver yourself for the browser test" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "ensure_chromium: not root; install chromium and chromium-driver for the browser test" >&2
    exit 0
  fi
fi
echo "ensure_chromium: installing Debian packages chromium and chromium-driver"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
  || echo "ensure_chromium: apt-get failed; the browser test will report it" >&2
