#!/usr/bin/env bash
# Assemble an ONNX Runtime C/C++ SDK folder without touching the system:
#   include/ + lib/cmake/ from Debian trixie's libonnxruntime-dev (apt-get download through a private apt
#   configuration, unpacked with dpkg -x: nothing is installed), lib/libonnxruntime.so.* from the onnxruntime
#   wheel that the Python side already installs, with the libonnxruntime.so.1 / .so names the linker and loader want.
# Usage: assemble_ort_sdk.sh OUT_DIR [PYTHON]     (PYTHON: the interpreter whose onnxruntime wheel to use)
# Prints the SDK folder; fails if the headers' ORT_API_VERSION is newer than what the wheel's library serves.
set -euo pipefail

out=${1:?usage: assemble_ort_sdk.sh OUT_DIR [PYTHON]}
python=${2:-python3}
suite=${ORT_SDK_SUITE:-trixie}
mirror=${ORT_SDK_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [[ -f $out/.complete ]]; then echo "$out"; exit 0; fi

work=$out/.apt
rm -rf "$work" "$out/include" "$out/lib"
mkdir -p "$work"/{etc/sources.list.d,etc/preferences.d,etc/apt.conf.d,state/lists/partial,cache/archives/partial,debs}
: >"$work/state/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" >"$work/etc/sources.list"
# A private apt: its own sources, state, cache and (empty) status; the host's apt.conf.d is not read.
cat >"$work/apt.conf" <<CONF
Dir::Etc "$work/etc";
Dir::Etc::sourcelist "$work/etc/sources.list";
Dir::Etc::sourceparts "$work/etc/sources.list.d";
Dir::Etc::preferencesparts "$work/etc/preferences.d";
Dir::Etc::parts "$work/etc/apt.conf.d";
Dir::Etc::trusted "$work/etc/trusted.gpg";
Dir::Etc::trustedparts "/etc/apt/trusted.gpg.d";
Dir::State "$work/state";
Dir::State::status "$work/state/status";
Dir::Cache "$work/cache";
Acquire::Languages "none";
Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";
APT::Architecture "$(dpkg --print-architecture)";
CONF
export APT_CONFIG=$work/apt.conf
apt-get -q update >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; echo "apt-get update ($suite) failed" >&2; exit 1; }
(cd "$work/debs" && apt-get -q download libonnxruntime-dev >"$work/download.log" 2>&1) \
  || { cat "$work/download.log" >&2; echo "apt-get download libonnxruntime-dev ($suite) failed" >&2; exit 1; }
deb=$(ls "$work"/debs/libonnxruntime-dev_*.deb)
dpkg -x "$deb" "$work/root"
header=$(find "$work/root" -name onnxruntime_c_api.h | head -1)
[[ -n $header ]] || { echo "no onnxruntime_c_api.h in $deb" >&2; exit 1; }
mkdir -p "$out/include" "$out/lib"
cp -a "$(dirname "$header")"/. "$out/include/"

wheel_lib=$("$python" - <<'PY'
import glob, os, onnxruntime
libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.*")))
print(libs[-1] if libs else "")
PY
)
[[ -n $wheel_lib ]] || { echo "$python has no onnxruntime wheel with capi/libonnxruntime.so.*" >&2; exit 1; }
cp "$wheel_lib" "$out/lib/"
name=$(basename "$wheel_lib")
ln -sf "$name" "$out/lib/libonnxruntime.so.1"
ln -sf libonnxruntime.so.1 "$out/lib/libonnxruntime.so"
providers=$(dirname "$wheel_lib")/libonnxruntime_providers_shared.so
[[ -f $providers ]] && cp "$providers" "$out/lib/"

header_api=$(sed -n 's/^#define ORT_API_VERSION \([0-9]*\).*/\1/p' "$out/include/onnxruntime_c_api.h")
lib_version=${name#libonnxruntime.so.}      # e.g. 1.32.0: the library serves API versions up to its minor
lib_api=$(echo "$lib_version" | cut -d. -f2)
if (( header_api > lib_api )); then
  echo "headers declare ORT_API_VERSION $header_api but $name serves at most API $lib_api" >&2; exit 1
fi
deb_version=$(dpkg-deb -f "$deb" Version)
printf 'headers: libonnxruntime-dev %s (%s), ORT_API_VERSION %s\nlibrary: %s (API <= %s)\n' \
  "$deb_version" "$suite" "$header_api" "$name" "$lib_api" >"$out/SDK_INFO"
rm -rf "$work"
touch "$out/.complete"
echo "$out"
