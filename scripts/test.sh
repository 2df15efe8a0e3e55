#!/usr/bin/env bash
# Installs what the tests need, then builds and runs the whole suite twice: in a normal build
# and in an AddressSanitizer + UndefinedBehaviorSanitizer build. Unit and fuzz-replay tests run
# under meson (cmocka), integration tests under pytest against real processes. Last, the libFuzzer
# targets are built with clang and each runs for FUZZ_TIME seconds (default 20), and every C file
# is checked against .clang-format.
#
#   scripts/test.sh                 everything
#   scripts/test.sh -k reload       pass extra arguments to pytest
#   BW_SKIP_ASAN=1 scripts/test.sh  normal build only (quicker, while developing)
#   BW_SKIP_FUZZ=1 scripts/test.sh  without the clang fuzzer build and its smoke run
#
# Ends with one line "N passed, N failed" and exits non-zero on any failure.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/deps.sh test || { echo "dependency installation failed"; echo "0 passed, 1 failed"; exit 1; }

results=$root/build-results
rm -rf "$results"
mkdir -p "$results"
status=0

build() { # dir, extra meson options...
    local dir=$1
    shift
    if [ ! -f "$dir/build.ninja" ]; then
        meson setup "$dir" "$@" >"$results/setup-$dir.log" 2>&1 ||
            { cat "$results/setup-$dir.log"; return 1; }
    fi
    ninja -C "$dir" >"$results/ninja-$dir.log" 2>&1 || { cat "$results/ninja-$dir.log"; return 1; }
}

run_suite() { # dir, label, sanitized(0/1), pytest args...
    local dir=$1 label=$2 sanitized=$3
    shift 3
    echo "=== $label: unit and fuzz-replay tests"
    meson test -C "$dir" --print-errorlogs --num-processes 2 || status=1
    cp "$dir/meson-logs/testlog.junit.xml" "$results/meson-$label.xml" 2>/dev/null || true
    echo "=== $label: integration tests"
    BREAKWATER_BIN="$root/$dir/breakwater" BREAKWATER_SANITIZED=$sanitized \
        pytest-3 -q -p no:cacheprovider --junitxml="$results/pytest-$label.xml" \
        test/integration "$@"
    local rc=$?
    # 5 = no tests collected: that is a failure of the suite, not a pass.
    [ $rc -ne 0 ] && status=1
}

# Records one shell step as a JUnit test case, so it counts in the closing line.
record_step() { # name, command...
    local name=$1 log="$results/step-$1.log" rc
    shift
    "$@" >"$log" 2>&1
    rc=$?
    python3 - "$results/step-$name.xml" "$name" "$rc" "$log" <<'PY'
import sys
from xml.sax.saxutils import escape
out, name, rc, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
body = ""
if rc != 0:
    text = open(log, errors="replace").read()[-20000:]
    body = '<failure message="exit %d">%s</failure>' % (rc, escape(text))
open(out, "w").write('<testsuite name="steps"><testcase classname="steps" name="%s">%s</testcase>'
                     '</testsuite>\n' % (escape(name), body))
PY
    if [ $rc -ne 0 ]; then
        echo "step $name failed:"
        tail -n 40 "$log"
        status=1
    fi
}

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:halt_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

if build build; then
    run_suite build normal 0 "$@"
else
    echo "normal build failed"
    status=1
fi
if [ -z "${BW_SKIP_ASAN:-}" ]; then
    if build build-asan -Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug; then
        run_suite build-asan sanitizer 1 "$@"
    else
        echo "sanitizer build failed"
        status=1
    fi
fi

# Formatting: every C file as .clang-format says (a dry run; the step fails on any drift).
# Fix with: clang-format -i $(find src include test -name '*.[ch]')
record_step clang-format sh -c "find src include test -name '*.[ch]' -print0 |
    xargs -0 clang-format --dry-run --Werror"

if [ -z "${BW_SKIP_FUZZ:-}" ]; then
    # The fuzzers keep compiling with clang, and each runs briefly from its seed corpus.
    echo "=== clang build and fuzz smoke run"
    record_step fuzz-smoke env FUZZ_TIME="${FUZZ_TIME:-20}" scripts/fuzz.sh
fi

python3 - "$results" "$status" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for path in sorted(glob.glob(sys.argv[1] + "/*.xml")):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        failed += 1
        continue
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        if "failure" in tags or "error" in tags:
            failed += 1
        elif "skipped" in tags:
            skipped += 1
        else:
            passed += 1
if int(sys.argv[2]) != 0 and failed == 0:
    failed = 1  # a build or runner failure that produced no test report
print(f"{passed} passed, {failed} failed, {skipped} skipped")
PY
exit $status
