#!/bin/sh
# Installs the Debian packages some tests need, when they are missing:
#   chromium  - the web UI test drives the page in headless Chromium (through playwright-core).
# Safe to run repeatedly: it installs only what is missing. Where it cannot install (not Debian/Ubuntu,
# not root and no sudo, no network), it says so and exits 0, so the other tests can still run; the
# tests that need a package then skip with a reason.
set -u

# Each entry: a Debian package and a command that shows it is installed.
packages="chromium:chromium"

missing=""
for entry in $packages; do
  package=${entry%%:*}
  command=${entry#*:}
  if ! command -v "$command" >/dev/null 2>&1 && ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $package"
  fi
done

if [ -z "$missing" ]; then
  echo "ensure-system-deps: all present ($(echo "$packages" | sed 's/:[^ ]*//g'))"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-system-deps: missing:$missing, but apt-get is not available on this system; install them by hand (tests that need them will skip)"
  exit 0
fi

if [ "$(id -u)" = "0" ]; then
  run=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  run="sudo"
else
  echo "ensure-system-deps: missing:$missing; run as root (or with passwordless sudo) to install: apt-get install -y --no-install-recommends$missing"
  exit 0
fi

echo "ensure-system-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086 # $run and $missing are meant to split into words
if $run apt-get update && $run apt-get install -y --no-install-recommends $missing; then
  echo "ensure-system-deps: installed$missing"
else
  echo "ensure-system-deps: could not install$missing (see the apt-get output above); tests that need them will skip"
fi
exit 0
