#!/bin/sh
# Builds the libFuzzer targets with clang and runs each for a bounded time over a working copy of
# its seed corpus (test/fuzz/corpus-<target>/, ignored by git; new inputs land there).
#
#   scripts/fuzz.sh                  every target, FUZZ_TIME seconds each (default 60)
#   scripts/fuzz.sh fuzz_chunked     only the targets named
#   FUZZ_TIME=600 FUZZ_JOBS=2 scripts/fuzz.sh
#
# A crash leaves crash-<hash> in the repository root; replay it with
# build-fuzz/test/fuzz/<target> crash-<hash>, then add it to test/fuzz/corpus/<target>/.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
build=${FUZZ_BUILD:-build-fuzz}
time_each=${FUZZ_TIME:-60}
jobs=${FUZZ_JOBS:-1}
cd "$root"

if [ ! -d "$build" ]; then
    CC=clang meson setup "$build" -Dfuzzers=true
fi

if [ $# -gt 0 ]; then
    targets="$*"
else
    targets="fuzz_request fuzz_response fuzz_chunked fuzz_xff fuzz_config fuzz_path fuzz_head"
fi

for t in $targets; do
    ninja -C "$build" "test/fuzz/$t"
done

for t in $targets; do
    work="test/fuzz/corpus-$t"
    mkdir -p "$work"
    cp -n test/fuzz/corpus/"$t"/* "$work"/ 2>/dev/null || true
    echo "== $t: ${time_each}s"
    dict=test/fuzz/$t.dict
    [ -f "$dict" ] || dict=test/fuzz/http.dict
    set -- -max_total_time="$time_each" -dict="$dict" -max_len=4096 \
        -print_final_stats=1
    if [ "$jobs" -gt 1 ]; then
        set -- "$@" -fork="$jobs"
    fi
    "$build/test/fuzz/$t" "$@" "$work"
done
