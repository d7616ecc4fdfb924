#!/usr/bin/env bash
# Installs the Debian packages the test suite needs, when they are missing:
#   chromium            the web UI tests (headless, driven by playwright-core)
#   openmpi-bin, libopenmpi-dev   tensor parallelism (mpirun, and mpicxx so the addon builds with MPI)
# Needs root (or sudo) and Debian's apt; otherwise it says what is missing and exits 0, and the
# tests that need those packages report themselves skipped with the reason.
set -u
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
command -v mpicxx >/dev/null 2>&1 || missing+=(libopenmpi-dev)
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-system-deps: no apt-get; install ${missing[*]} yourself for the web UI and tensor-parallel tests" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "ensure-system-deps: not root and no passwordless sudo; install ${missing[*]} yourself" >&2
    exit 0
  fi
fi
echo "ensure-system-deps: installing ${missing[*]} through apt" >&2
export DEBIAN_FRONTEND=noninteractive
install() { $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/blossom-apt.log 2>&1; }
if ! install; then
  $sudo apt-get update >>/tmp/blossom-apt.log 2>&1
  install || { echo "ensure-system-deps: apt-get failed (see /tmp/blossom-apt.log)" >&2; exit 0; }
fi
exit 0
