/*
 * How many busy keys the shared rate-limit table holds before it evicts busy ones: the sizing
 * figure of docs/rate-limits.md. Keys are added one at a time, each taking one token from a
 * bucket that does not refill within the run (so no entry ever becomes idle, the worst case);
 * the program reports the load (keys / entries) at the first forced eviction and, at several
 * loads, the share of keys added so far that have lost their entry. Keys are SipHash-distributed
 * like real client keys. Not part of any test suite; build and run from the repository root:
 *
 *   mkdir -p build-bench && cc -O2 -std=c11 -D_GNU_SOURCE -Iinclude test/bench/table_fill.c \
 *      src/ratelimit.c -lm -lcrypto -o build-bench/table_fill && build-bench/table_fill
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "breakwater/ratelimit.h"

static void run(uint32_t entries, const bw_ratelimit_seed *seed)
{
    size_t len = bw_ratelimit_table_size_bytes(entries);
    void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return;
    }
    bw_ratelimit_table *t = bw_ratelimit_table_init(mem, entries);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 10, 0.000001, false);
    static const double marks[] = {0.25, 0.5, 0.75, 0.9, 1.0};
    size_t next_mark = 0;
    uint64_t now = UINT64_C(1000000000000);
    double first = -1;
    printf("entries %u:", entries);
    for (uint32_t i = 1; i <= entries; i++) {
        char key[16];
        int n = snprintf(key, sizeof(key), "k%u", i);
        bw_ratelimit_result r;
        (void)bw_ratelimit_take(t, 0, bw_ratelimit_hash(seed, key, (size_t)n), &p, now, &r);
        now += 1000;
        bw_ratelimit_stats st;
        bw_ratelimit_table_stats(t, &st);
        if (first < 0 && st.evictions > 0)
            first = (double)i / entries;
        while (next_mark < sizeof(marks) / sizeof(marks[0]) &&
               i == (uint32_t)(marks[next_mark] * entries)) {
            printf(" at %.0f%% load %.2f%% evicted;", marks[next_mark] * 100,
                   100.0 * (double)st.evictions / i);
            next_mark++;
        }
    }
    printf(" first eviction at %.1f%% load\n", first * 100);
    munmap(mem, len);
}

int main(void)
{
    bw_ratelimit_seed seed;
    if (bw_ratelimit_seed_random(&seed) < 0)
        memset(&seed, 7, sizeof(seed));
    run(65536, &seed);
    run(1048576, &seed);
    return 0;
}
