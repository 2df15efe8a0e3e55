/*
 * Micro-benchmark of the shared rate-limit table (src/ratelimit.c): nanoseconds per decision
 * for 1,000,000 distinct client keys at table sizes 65536 and 1048576, and for one hot key,
 * plus the shared memory each table takes. Not part of any test suite; numbers go to
 * docs/performance.md. Build and run from the repository root:
 *
 *   mkdir -p build-bench && cc -O2 -std=c11 -D_GNU_SOURCE -Iinclude test/bench/ratelimit_table.c \
 *      src/ratelimit.c -lm -o build-bench/ratelimit_table && build-bench/ratelimit_table
 *
 * The table is mapped MAP_SHARED exactly as the master maps it. The clock is synthetic (1 us per
 * request) so that the figures are the table's cost alone; "with hash" adds SipHash of the
 * 17-byte client-address key, which is what a request really pays.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "breakwater/ratelimit.h"

#define KEYS 1000000u
#define ROUNDS 3u

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static bw_ratelimit_table *map_table(uint32_t entries, void **mem, size_t *len)
{
    *len = bw_ratelimit_table_size_bytes(entries);
    *mem = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (*mem == MAP_FAILED) {
        perror("mmap");
        return NULL;
    }
    return bw_ratelimit_table_init(*mem, entries);
}

/* A client key as clientip.c builds it: family byte then 16 address bytes. */
static void client_key(uint32_t i, uint8_t key[17])
{
    memset(key, 0, 17);
    key[0] = 4;
    key[1] = (uint8_t)(i >> 24);
    key[2] = (uint8_t)(i >> 16);
    key[3] = (uint8_t)(i >> 8);
    key[4] = (uint8_t)i;
}

static int bench_distinct(uint32_t entries, const bw_ratelimit_params *p,
                          const bw_ratelimit_seed *seed, bool with_hash)
{
    void *mem;
    size_t len;
    bw_ratelimit_table *t = map_table(entries, &mem, &len);
    if (t == NULL)
        return -1;
    uint64_t now = UINT64_C(1000000000000), allowed = 0;
    uint64_t start = mono_ns();
    for (uint32_t round = 0; round < ROUNDS; round++) {
        for (uint32_t i = 0; i < KEYS; i++) {
            uint64_t h;
            if (with_hash) {
                uint8_t key[17];
                client_key(i, key);
                h = bw_ratelimit_hash(seed, key, sizeof(key));
            } else {
                h = (uint64_t)i * UINT64_C(0x9e3779b97f4a7c15);
            }
            bw_ratelimit_result r;
            allowed += bw_ratelimit_take(t, 0, h, p, now, &r) == BW_RATELIMIT_ALLOW;
            now += 1000;
        }
    }
    uint64_t elapsed = mono_ns() - start;
    bw_ratelimit_stats st;
    bw_ratelimit_table_stats(t, &st);
    printf("%u distinct keys x%u, table %8u entries (%9zu bytes)%s: %6.1f ns/decision, "
           "allowed %llu, evictions %llu, reclaims %llu\n",
           KEYS, ROUNDS, entries, st.bytes, with_hash ? " with hash" : "          ",
           (double)elapsed / ((double)KEYS * ROUNDS), (unsigned long long)allowed,
           (unsigned long long)st.evictions, (unsigned long long)st.reclaims);
    munmap(mem, len);
    return 0;
}

static int bench_hot(const bw_ratelimit_params *p)
{
    void *mem;
    size_t len;
    bw_ratelimit_table *t = map_table(65536, &mem, &len);
    if (t == NULL)
        return -1;
    uint64_t now = UINT64_C(1000000000000), allowed = 0;
    uint64_t start = mono_ns();
    for (uint32_t i = 0; i < KEYS * ROUNDS; i++) {
        bw_ratelimit_result r;
        allowed += bw_ratelimit_take(t, 0, 42, p, now, &r) == BW_RATELIMIT_ALLOW;
        now += 1000;
    }
    uint64_t elapsed = mono_ns() - start;
    printf("one hot key, %u decisions: %6.1f ns/decision, allowed %llu\n", KEYS * ROUNDS,
           (double)elapsed / ((double)KEYS * ROUNDS), (unsigned long long)allowed);
    munmap(mem, len);
    return 0;
}

int main(void)
{
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 100, 10, false);
    bw_ratelimit_seed seed = {UINT64_C(0x0123456789abcdef), UINT64_C(0xfedcba9876543210)};
    printf("table memory: %zu bytes per entry, 65536 entries = %zu bytes, 1048576 = %zu bytes\n",
           bw_ratelimit_table_size_bytes(2) - bw_ratelimit_table_size_bytes(1),
           bw_ratelimit_table_size_bytes(65536), bw_ratelimit_table_size_bytes(1048576));
    if (bench_distinct(65536, &p, &seed, false) || bench_distinct(65536, &p, &seed, true) ||
        bench_distinct(1048576, &p, &seed, false) || bench_distinct(1048576, &p, &seed, true) ||
        bench_hot(&p))
        return 1;
    return 0;
}
