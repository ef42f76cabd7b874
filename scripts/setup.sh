#!/usr/bin/env bash
# Set up a fresh machine for mergekit-ext: Debian data packages for the text zoo, a
# virtual environment in .venv with the CPU build of PyTorch, the package and its test
# and peer extras. Safe to run again: every step skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(wordnet-base fortunes wamerican wfrench wngerman witalian wspanish wportuguese wdutch wswedish)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test,peer}

missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[${EXTRAS}]"
# steering-vectors is the reference the extraction tests compare against. It pins
# transformers < 5 but works with 5.x for what the tests use, so it goes in without
# its dependency pins.
"$VENV/bin/python" -m pip install -q --no-deps "steering-vectors==0.12.2"
echo "Ready: $VENV/bin/merge"
