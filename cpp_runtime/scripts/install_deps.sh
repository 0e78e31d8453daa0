#!/usr/bin/env bash
# Install the Debian packages the C++ runtime builds against, when missing (needs root; prints the command
# otherwise). Never touches ONNX Runtime: scripts/assemble_ort_sdk.sh assembles that without installing anything.
set -euo pipefail
# clang + libclang-rt-dev: the fuzz targets (libFuzzer and the sanitizer runtimes; --no-install-recommends
# would leave the runtimes out of a bare `clang`). libeigen3-dev: SAFREE's projectors (src/safree.cpp).
# libsentencepiece-dev: the T5 tokenizer of SD3 and Flux (src/t5_tokenizer.cpp).
packages=(cmake ninja-build g++ pkg-config nlohmann-json3-dev zlib1g-dev libssl-dev libicu-dev libcli11-dev
          libcpp-httplib-dev libgtest-dev libeigen3-dev libsentencepiece-dev clang libclang-rt-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
(( ${#missing[@]} == 0 )) && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "missing Debian packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
