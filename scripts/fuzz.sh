#!/usr/bin/env bash
# Builds every fuzz target of fuzz/ (cargo-fuzz, libFuzzer) and runs each for a bounded time,
# one after the other, starting from the committed seeds (fuzz/corpus-seed/<target>/).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 20)
#
# Prints one line per target (runs executed, corpus size) and exits non-zero if any target
# crashed (a panic, a broken invariant, a timeout or running out of memory); the input that
# did it is kept under fuzz/artifacts/<target>/ and the line says how to replay it.
#
# Works on a stable toolchain: cargo-fuzz passes -Z flags, allowed by RUSTC_BOOTSTRAP=1 (set
# here). Installs cargo-fuzz if it is missing. Builds with `--dev` (fuzz/Cargo.toml gives the
# dev profile opt-level 1 for the code under test) and without a sanitizer: everything fuzzed
# is safe Rust, and a release build with AddressSanitizer takes several times as long to
# build. Debug assertions and overflow checks are on, as in every cargo-fuzz build.
#
# Environment: FUZZ_TARGETS="a b" runs only those; FUZZ_ARGS adds libFuzzer options;
# RUSTUP_TOOLCHAIN picks the toolchain (e.g. stable).
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${1:-20}
case "$SECS" in
  ''|*[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2 ;;
esac
export RUSTC_BOOTSTRAP=1
BUILD_FLAGS=(--dev --sanitizer none)
T0=$(date +%s)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
echo "fuzz: $(cargo fuzz --version), $(rustc --version)"

cargo fuzz build "${BUILD_FLAGS[@]}"
T_BUILD=$(( $(date +%s) - T0 ))
echo "fuzz: built in ${T_BUILD} s"

TARGETS=${FUZZ_TARGETS:-$(cargo fuzz list)}
failed=()
summary=()
for t in $TARGETS; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  seeds=()
  [ -d "fuzz/corpus-seed/$t" ] && seeds=("fuzz/corpus-seed/$t")
  log="fuzz/artifacts/$t/last-run.log"
  t1=$(date +%s)
  set +e
  # shellcheck disable=SC2086
  cargo fuzz run "${BUILD_FLAGS[@]}" "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    ${FUZZ_ARGS:-} >"$log" 2>&1
  rc=$?
  set -e
  took=$(( $(date +%s) - t1 ))
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  if [ "$rc" -eq 0 ]; then
    line="fuzz: $t: ${runs:-?} runs in ${took} s, corpus $corpus, ok"
  else
    failed+=("$t")
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    why=$(grep -m1 -E "panicked at|ERROR: libFuzzer|^error" "$log" || true)
    line="fuzz: $t: CRASH after ${runs:-?} runs in ${took} s: ${why:-exit $rc}"
    if [ -n "$artifact" ]; then
      line+=$'\n'"      input: $artifact (replay: RUSTC_BOOTSTRAP=1 cargo fuzz run ${BUILD_FLAGS[*]} $t $artifact)"
    fi
    line+=$'\n'"      log: $log"
    sed -n '/panicked at/,/^stack backtrace/p' "$log" | head -n 20 | sed 's/^/      | /' >&2 || true
  fi
  echo "$line"
  summary+=("$line")
done

echo
echo "fuzz: summary (${SECS} s per target, build ${T_BUILD} s, total $(( $(date +%s) - T0 )) s)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
