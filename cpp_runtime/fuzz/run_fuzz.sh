#!/usr/bin/env bash
# Replay every regression input (fuzz/regressions/<target>/), then fuzz each target for SECONDS from its seed corpus
# (fuzz/corpus/<target>, never written) plus what earlier runs in BUILD found (BUILD/corpus/<target>).
# Usage: run_fuzz.sh BUILD SECONDS [TARGET...]   (BUILD: the -DSD_FUZZ=ON build folder; default: every target)
# Exit status 1 when any target fails a regression input or finds a crash, leak, timeout or sanitizer report (the
# input is kept in BUILD/artifacts/<target>/); the other targets still run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: run_fuzz.sh BUILD SECONDS [TARGET...]"
build=${1:?$usage}
seconds=${2:?$usage}
shift 2
targets=("$@")
if (( ! ${#targets[@]} )); then
  targets=(manifest onnx_initializer tokenizer tokenizer_json t5_tokenizer requests)
  [[ -x $build/fuzz/fuzz_api_compat ]] && targets+=(api_compat)  # built when the test bundles were given
fi
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export LSAN_OPTIONS=suppressions=$here/../tests/lsan.supp
# -timeout: an input taking 10 s is a hang; -rss_limit_mb (and with it the malloc limit): 2 GiB is a leak or an
# unbounded allocation. -max_len: room for deep nesting, which the JSON readers must refuse rather than recurse.
limits=(-timeout=10 -rss_limit_mb=2048)
# The targets' scratch folders (fuzz_common.hpp) under one folder of this run: a crash aborts before a target can
# remove its own, so the run removes them all.
shm=/tmp; [[ -d /dev/shm && -w /dev/shm ]] && shm=/dev/shm
SD_FUZZ_TMP=$(mktemp -d "$shm/sdcpp-fuzz-run-XXXXXX")
export SD_FUZZ_TMP
trap 'rm -rf "$SD_FUZZ_TMP"' EXIT
failed=()

# The log's sanitizer report without libFuzzer's progress lines.
report() { grep -v -E '^#[0-9]+|^INFO:|NEW_FUNC' "$1" | tail -n 40 >&2; }

replay() {  # target binary: every regression input must run clean
  local t=$1 bin=$2 inputs=()
  [[ -d $here/regressions/$t ]] && mapfile -t inputs < <(find "$here/regressions/$t" -type f | sort)
  (( ${#inputs[@]} )) || return 0
  echo "== $t: replaying ${#inputs[@]} regression input(s)"
  "$bin" "${limits[@]}" "${inputs[@]}" >"$build/artifacts/$t/replay.log" 2>&1 && return 0
  report "$build/artifacts/$t/replay.log"
  echo "run_fuzz: $t fails on a regression input (log: $build/artifacts/$t/replay.log)" >&2
  return 1
}

fuzz() {  # target binary
  local t=$1 bin=$2 dict=()
  [[ $t == manifest || $t == requests || $t == tokenizer_json || $t == api_compat ]] && dict=(-dict="$here/json.dict")
  echo "== $t: fuzzing for ${seconds}s"
  if "$bin" "${limits[@]}" -max_len=16384 -print_final_stats=1 "${dict[@]}" -max_total_time="$seconds" \
      -artifact_prefix="$build/artifacts/$t/" "$build/corpus/$t" "$here/corpus/$t" >"$build/artifacts/$t/fuzz.log" 2>&1; then
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added)' "$build/artifacts/$t/fuzz.log" |
      tr '\n' ' '
    echo
    return 0
  fi
  report "$build/artifacts/$t/fuzz.log"
  echo "run_fuzz: $t found a crash: $build/artifacts/$t/ (triage it, then add it under fuzz/regressions/$t/)" >&2
  return 1
}

for t in "${targets[@]}"; do
  bin="$build/fuzz/fuzz_$t"
  [[ -x $bin ]] || { echo "run_fuzz: no $bin (configure with -DSD_FUZZ=ON and build first)" >&2; exit 2; }
  mkdir -p "$build/corpus/$t" "$build/artifacts/$t"
  replay "$t" "$bin" || { failed+=("$t (regression)"); continue; }
  fuzz "$t" "$bin" || failed+=("$t")
done
(( ${#failed[@]} == 0 )) || { echo "run_fuzz: failed: ${failed[*]}" >&2; exit 1; }
