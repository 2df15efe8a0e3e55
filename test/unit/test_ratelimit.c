/*
 * Unit tests for src/ratelimit.c: GCRA buckets and the shared table, driven by an injected
 * clock (nanoseconds) so every expectation is exact. The last tests fork real processes over a
 * MAP_SHARED mapping, as the master and workers do, including one killed with SIGKILL mid-run.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <signal.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "breakwater/ratelimit.h"

#define SEC UINT64_C(1000000000)
#define MS UINT64_C(1000000)
/* A clock origin well away from 0, as CLOCK_MONOTONIC is on a running machine. */
#define T0 (UINT64_C(1000) * SEC)

typedef struct fixture {
    void *mem;
    bw_ratelimit_table *t;
} fixture;

static bw_ratelimit_table *new_table(fixture *f, uint32_t entries)
{
    f->mem = calloc(1, bw_ratelimit_table_size_bytes(entries));
    assert_non_null(f->mem);
    f->t = bw_ratelimit_table_init(f->mem, entries);
    return f->t;
}

static bool take(bw_ratelimit_table *t, uint32_t policy, uint64_t key, const bw_ratelimit_params *p,
                 uint64_t now, bw_ratelimit_result *r)
{
    bw_ratelimit_result dummy;
    bw_ratelimit_decision d = bw_ratelimit_take(t, policy, key, p, now, r ? r : &dummy);
    return d == BW_RATELIMIT_ALLOW;
}

static void test_hash_vectors(void **state)
{
    (void)state;
    /* The reference vectors of the SipHash paper: key 00..0f, messages 00..(n-1). */
    bw_ratelimit_seed seed = {UINT64_C(0x0706050403020100), UINT64_C(0x0f0e0d0c0b0a0908)};
    uint8_t msg[15];
    for (int i = 0; i < 15; i++)
        msg[i] = (uint8_t)i;
    assert_true(bw_ratelimit_hash(&seed, msg, 0) == UINT64_C(0x726fdb47dd0e0e31));
    assert_true(bw_ratelimit_hash(&seed, msg, 15) == UINT64_C(0xa129ca6149be45e5));
    /* Another seed, another hash: collisions cannot be precomputed without the seed. */
    bw_ratelimit_seed other = {1, 2};
    assert_true(bw_ratelimit_hash(&other, msg, 15) != bw_ratelimit_hash(&seed, msg, 15));
    bw_ratelimit_seed rnd;
    assert_int_equal(bw_ratelimit_seed_random(&rnd), 0);
}

static void test_params(void **state)
{
    (void)state;
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 100, 10, false);
    assert_int_equal(p.limit, 100);
    assert_int_equal(p.capacity, 100);
    assert_true(p.interval_ns == 100 * MS);
    assert_true(p.window_ns == 100 * 100 * MS);

    /* Rounded up: the limit may only ever come out stricter. */
    bw_ratelimit_params_init(&p, 1, 3, false);
    assert_true(p.interval_ns == UINT64_C(333333334));

    bw_ratelimit_params_init(&p, 5, 0, false);
    assert_true(p.interval_ns == 0);
    bw_ratelimit_params_init(&p, 5, -1, false);
    assert_true(p.interval_ns == 0);

    /* Absurd windows are capped instead of overflowing. */
    bw_ratelimit_params_init(&p, UINT32_MAX, 0.001, false);
    assert_true(p.window_ns <= (UINT64_C(1) << 61));
    assert_int_equal(p.limit, UINT32_MAX);
    assert_true(p.capacity >= 1 && p.capacity < UINT32_MAX);

    bw_ratelimit_conf conf = {.capacity = 7, .refill_per_sec = 0.5, .dry_run = true};
    bw_ratelimit_params_from_conf(&conf, &p);
    assert_int_equal(p.capacity, 7);
    assert_true(p.interval_ns == 2 * SEC);
    assert_true(p.dry_run);
}

static void test_burst_then_refuse(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 64);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 5, 1, false);
    bw_ratelimit_result r;
    for (uint32_t i = 0; i < 5; i++) {
        assert_true(take(t, 0, 99, &p, T0, &r));
        assert_int_equal(r.limit, 5);
        assert_int_equal(r.remaining, 4 - i);
        assert_true(r.reset_after_ns == (i + 1) * SEC);
    }
    assert_true(r.retry_after_ns == SEC); /* the bucket is empty: next token in 1 s */
    assert_int_equal(bw_ratelimit_take(t, 0, 99, &p, T0, &r), BW_RATELIMIT_REFUSE);
    assert_false(r.allowed);
    assert_int_equal(r.remaining, 0);
    assert_true(r.retry_after_ns == SEC);
    assert_true(r.reset_after_ns == 5 * SEC);
    /* Half a second later: half the wait. */
    assert_false(take(t, 0, 99, &p, T0 + 500 * MS, &r));
    assert_true(r.retry_after_ns == 500 * MS);
    assert_true(take(t, 0, 99, &p, T0 + SEC, &r));
    assert_int_equal(r.remaining, 0);
    free(f.mem);
}

static void test_steady_refill(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 64);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 1, 10, false); /* one token every 100 ms */
    bw_ratelimit_result r;
    uint64_t now = T0;
    for (int i = 0; i < 100; i++) {
        assert_true(take(t, 0, 1, &p, now, &r));
        assert_false(take(t, 0, 1, &p, now + 99 * MS, &r));
        assert_true(r.retry_after_ns == 1 * MS);
        now += 100 * MS;
    }
    /* Many refills accumulate only up to the capacity. */
    now += 10 * SEC;
    assert_true(take(t, 0, 1, &p, now, &r));
    assert_false(take(t, 0, 1, &p, now, &r));
    free(f.mem);
}

static void test_remaining_and_reset(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 64);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 10, 2, false); /* T = 500 ms */
    bw_ratelimit_result r;
    for (int i = 0; i < 3; i++)
        assert_true(take(t, 0, 5, &p, T0, &r));
    assert_int_equal(r.remaining, 7);
    assert_true(r.reset_after_ns == 1500 * MS);
    assert_int_equal(bw_ratelimit_ceil_seconds(r.reset_after_ns), 2);
    /* One second later two tokens came back; this request takes one. */
    assert_true(take(t, 0, 5, &p, T0 + SEC, &r));
    assert_int_equal(r.remaining, 8);
    assert_true(r.reset_after_ns == SEC);
    assert_true(r.retry_after_ns == 0);
    free(f.mem);
}

static void test_ceil_seconds(void **state)
{
    (void)state;
    assert_int_equal(bw_ratelimit_ceil_seconds(0), 0);
    assert_int_equal(bw_ratelimit_ceil_seconds(1), 1);
    assert_int_equal(bw_ratelimit_ceil_seconds(SEC), 1);
    assert_int_equal(bw_ratelimit_ceil_seconds(SEC + 1), 2);
    assert_int_equal(bw_ratelimit_ceil_seconds(59 * SEC + 999999999), 60);
    assert_int_equal(bw_ratelimit_ceil_seconds(BW_RATELIMIT_NEVER), BW_RATELIMIT_MAX_SECONDS);
    assert_int_equal(bw_ratelimit_ceil_seconds(UINT64_C(1) << 62), BW_RATELIMIT_MAX_SECONDS);

    /* A refused request is never told to retry after 0 seconds. */
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 64);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 1, 3, false);
    bw_ratelimit_result r;
    assert_true(take(t, 0, 8, &p, T0, &r));
    assert_false(take(t, 0, 8, &p, T0 + 333333333, &r));
    assert_true(r.retry_after_ns == 1);
    assert_int_equal(bw_ratelimit_ceil_seconds(r.retry_after_ns), 1);
    assert_false(take(t, 0, 8, &p, T0 + 1, &r));
    assert_int_equal(bw_ratelimit_ceil_seconds(r.retry_after_ns), 1);
    free(f.mem);
}

static void test_refill_zero(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 64);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 3, 0, false);
    bw_ratelimit_result r;
    uint64_t now = T0;
    for (uint32_t i = 0; i < 3; i++) {
        assert_true(take(t, 0, 77, &p, now, &r));
        assert_int_equal(r.remaining, 2 - i);
        assert_true(r.reset_after_ns == BW_RATELIMIT_NEVER);
        now += 1000 * SEC;
    }
    assert_true(r.retry_after_ns == BW_RATELIMIT_NEVER);
    for (int i = 0; i < 100; i++) {
        assert_false(take(t, 0, 77, &p, now, &r));
        assert_true(r.retry_after_ns == BW_RATELIMIT_NEVER);
        now += 100000 * SEC;
    }
    assert_int_equal(bw_ratelimit_ceil_seconds(r.retry_after_ns), BW_RATELIMIT_MAX_SECONDS);
    free(f.mem);
}

static void test_dry_run(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 64);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 1, 1, true);
    bw_ratelimit_result r;
    assert_int_equal(bw_ratelimit_take(t, 0, 3, &p, T0, &r), BW_RATELIMIT_ALLOW);
    assert_int_equal(bw_ratelimit_take(t, 0, 3, &p, T0, &r), BW_RATELIMIT_DRY_RUN);
    assert_false(r.allowed);
    assert_true(r.retry_after_ns == SEC);
    free(f.mem);
}

/* An 8-entry table is one probe window, so which entry goes is fully determined. */
static void test_eviction_idle_then_closest_to_full(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 8);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 10, 1, false); /* T = 1 s */
    bw_ratelimit_result r;
    bw_ratelimit_stats st;

    /* Key k takes k tokens: its bucket is full again at T0 + k s. */
    for (uint64_t k = 1; k <= 8; k++)
        for (uint64_t i = 0; i < k; i++)
            assert_true(take(t, 0, k, &p, T0, &r));
    bw_ratelimit_table_stats(t, &st);
    assert_true(st.evictions == 0 && st.reclaims == 0);

    /* At T0 + 2.5 s keys 1 and 2 are idle: a new key reuses one, nobody busy is evicted. */
    assert_true(take(t, 0, 100, &p, T0 + 2500 * MS, &r));
    assert_false(r.evicted);
    bw_ratelimit_table_stats(t, &st);
    assert_true(st.evictions == 0 && st.reclaims == 1);
    assert_true(take(t, 0, 101, &p, T0 + 2500 * MS, &r));
    bw_ratelimit_table_stats(t, &st);
    assert_true(st.evictions == 0 && st.reclaims == 2);

    /* Now every entry is busy. Key 3 (full again at T0 + 3 s) is the closest to full, ahead of
     * keys 100 and 101 (T0 + 3.5 s): the next new key evicts it, and is not refused. */
    assert_true(take(t, 0, 102, &p, T0 + 2500 * MS, &r));
    assert_true(r.evicted);
    bw_ratelimit_table_stats(t, &st);
    assert_true(st.evictions == 1);
    /* Key 8 kept its state: 8 taken at T0, 2.5 refilled, one more taken leaves 3 whole. */
    assert_true(take(t, 0, 8, &p, T0 + 2500 * MS, &r));
    assert_int_equal(r.remaining, 3);
    /* Key 3 was the one forgotten: it comes back with a full bucket (evicting in turn). */
    assert_true(take(t, 0, 3, &p, T0 + 2500 * MS, &r));
    assert_true(r.evicted);
    assert_int_equal(r.remaining, 9);
    assert_true(take(t, 0, 8, &p, T0 + 2500 * MS, &r));
    assert_int_equal(r.remaining, 2);
    assert_int_equal(bw_ratelimit_table_check(t), 0);
    free(f.mem);
}

/* A table that is far too small still answers every request. */
static void test_table_full_never_fails(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 1);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 2, 1, false);
    bw_ratelimit_result r;
    for (uint64_t k = 0; k < 1000; k++) {
        /* Each new key evicts the previous one, so each starts with a full bucket. */
        assert_true(take(t, 0, k, &p, T0, &r));
        assert_int_equal(r.remaining, 1);
    }
    bw_ratelimit_stats st;
    bw_ratelimit_table_stats(t, &st);
    assert_true(st.evictions == 999);
    assert_int_equal(st.entries, 1);
    assert_true(st.bytes == bw_ratelimit_table_size_bytes(1));
    free(f.mem);
}

/* Keys whose home slot is the same share one window of BW_RATELIMIT_PROBE slots, wherever it
 * lies, including across the end of the table. */
static void check_window(uint32_t home_wanted)
{
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 1024);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 5, 1, false);
    bw_ratelimit_result r;
    uint64_t keys[BW_RATELIMIT_PROBE + 1];
    size_t n = 0;
    for (uint64_t k = 0; n < BW_RATELIMIT_PROBE + 1; k++)
        if (bw_ratelimit_table_home(t, 0, k) == home_wanted)
            keys[n++] = k;

    for (size_t i = 0; i < BW_RATELIMIT_PROBE; i++) {
        assert_true(take(t, 0, keys[i], &p, T0, &r));
        assert_false(r.evicted);
    }
    /* Each is found again in its slot, state intact. */
    for (size_t i = 0; i < BW_RATELIMIT_PROBE; i++) {
        assert_true(take(t, 0, keys[i], &p, T0, &r));
        assert_int_equal(r.remaining, 3);
    }
    uint64_t counts[1];
    bw_ratelimit_table_count_keys(t, T0, counts, 1);
    assert_true(counts[0] == BW_RATELIMIT_PROBE);
    /* A key from elsewhere does not disturb the window. */
    uint64_t other = 0;
    while (bw_ratelimit_table_home(t, 0, other) != (home_wanted + 512) % 1024)
        other++;
    assert_true(take(t, 0, other, &p, T0, &r));
    assert_false(r.evicted);
    /* One more key for the same window: the table is nearly empty but the window is full. */
    assert_true(take(t, 0, keys[BW_RATELIMIT_PROBE], &p, T0, &r));
    assert_true(r.evicted);
    assert_int_equal(r.remaining, 4);
    bw_ratelimit_table_count_keys(t, T0, counts, 1);
    assert_true(counts[0] == BW_RATELIMIT_PROBE + 1);
    assert_int_equal(bw_ratelimit_table_check(t), 0);
    free(f.mem);
}

static void test_probe_window_collisions(void **state)
{
    (void)state;
    check_window(100);
    check_window(1020); /* wraps to slots 0..11 */
}

static void test_clock_backwards(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 64);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 2, 1, false);
    bw_ratelimit_result r;
    assert_true(take(t, 0, 1, &p, T0 + 10 * SEC, &r));
    assert_true(take(t, 0, 1, &p, T0 + 10 * SEC, &r));
    /* Back by five seconds, or to zero: still empty, and no nonsense in the result. */
    assert_false(take(t, 0, 1, &p, T0 + 5 * SEC, &r));
    assert_true(r.retry_after_ns == 6 * SEC);
    assert_false(take(t, 0, 1, &p, 0, &r));
    assert_true(r.reset_after_ns == T0 + 12 * SEC);
    assert_false(take(t, 0, 1, &p, T0 + 10 * SEC + 999 * MS, &r));
    assert_true(take(t, 0, 1, &p, T0 + 11 * SEC, &r));
    /* A request stamped a little earlier than the last one is refused, not given a token. */
    assert_false(take(t, 0, 1, &p, T0 + 11 * SEC - 1, &r));

    /* Extremes neither crash nor wrap. */
    assert_true(take(t, 0, 2, &p, UINT64_MAX, &r));
    assert_false(take(t, 0, 2, &p, 0, &r));
    assert_true(take(t, 0, 3, &p, 0, &r));
    assert_true(take(t, 0, 3, &p, 0, &r));
    assert_false(take(t, 0, 3, &p, 0, &r));
    assert_int_equal(bw_ratelimit_table_check(t), 0);

    /* Never-refilling buckets do not care about the clock at all. */
    bw_ratelimit_params z;
    bw_ratelimit_params_init(&z, 2, 0, false);
    assert_true(take(t, 1, 9, &z, T0, &r));
    assert_true(take(t, 1, 9, &z, 0, &r));
    assert_false(take(t, 1, 9, &z, T0 * 2, &r));
    free(f.mem);
}

static void test_policies_independent(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 64);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 1, 0, false);
    bw_ratelimit_result r;
    assert_true(take(t, 0, 42, &p, T0, &r));
    assert_true(take(t, 1, 42, &p, T0, &r));
    assert_true(take(t, 2, 42, &p, T0, &r));
    assert_false(take(t, 0, 42, &p, T0, &r));
    assert_false(take(t, 1, 42, &p, T0, &r));
    assert_true(take(t, 0, 43, &p, T0, &r));
    free(f.mem);
}

static void test_key_counts(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 4096);
    bw_ratelimit_params p, z;
    bw_ratelimit_params_init(&p, 5, 10, false);
    bw_ratelimit_params_init(&z, 5, 0, false);
    for (uint64_t k = 0; k < 30; k++)
        take(t, 0, k, &p, T0, NULL);
    for (uint64_t k = 0; k < 20; k++)
        take(t, 1, k, &p, T0, NULL);
    for (uint64_t k = 0; k < 7; k++)
        take(t, 3, k, &z, T0, NULL);
    uint64_t counts[4];
    bw_ratelimit_table_count_keys(t, T0, counts, 4);
    assert_true(counts[0] == 30 && counts[1] == 20 && counts[2] == 0 && counts[3] == 7);
    /* Full buckets are forgotten keys: once refilled they no longer count. */
    bw_ratelimit_table_count_keys(t, T0 + SEC, counts, 4);
    assert_true(counts[0] == 0 && counts[1] == 0 && counts[2] == 0 && counts[3] == 7);
    /* A policy beyond the array is ignored, not written. */
    bw_ratelimit_table_count_keys(t, T0, counts, 2);
    assert_true(counts[0] == 30 && counts[1] == 20);
    free(f.mem);
}

/* A reload that switches a policy between "refills" and "never refills" starts its keys afresh
 * instead of misreading the other encoding. */
static void test_refill_mode_change(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 64);
    bw_ratelimit_params p, z;
    bw_ratelimit_params_init(&p, 2, 1, false);
    bw_ratelimit_params_init(&z, 2, 0, false);
    bw_ratelimit_result r;
    assert_true(take(t, 0, 5, &z, T0, &r));
    assert_true(take(t, 0, 5, &z, T0, &r));
    assert_false(take(t, 0, 5, &z, T0, &r));
    assert_true(take(t, 0, 5, &p, T0, &r));
    assert_int_equal(r.remaining, 1);
    assert_true(take(t, 0, 5, &p, T0, &r));
    assert_true(take(t, 0, 5, &z, T0, &r));
    assert_int_equal(r.remaining, 1);
    free(f.mem);
}

static void test_attach(void **state)
{
    (void)state;
    uint64_t junk[16] = {0};
    assert_null(bw_ratelimit_table_attach(junk));
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 0); /* taken as 1 */
    assert_ptr_equal(bw_ratelimit_table_attach(f.mem), t);
    bw_ratelimit_stats st;
    bw_ratelimit_table_stats(t, &st);
    assert_int_equal(st.entries, 1);
    assert_true(bw_ratelimit_table_size_bytes(65536) == 64 + 65536 * 16);
    free(f.mem);
}

/* xorshift64*: a small deterministic generator for the property test. */
static uint64_t prng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * UINT64_C(2685821657736338717);
}

static uint64_t prng_range(uint64_t *s, uint64_t lo, uint64_t hi)
{
    return lo + prng_next(s) % (hi - lo + 1);
}

/*
 * For random arrival patterns: at every moment, accepted <= C + R * elapsed (elapsed from the
 * key's first request), exactly, in integers. Pattern 0 is a client whose demand exceeds the
 * supply throughout: it never lets its bucket fill up (it comes back before reset_after), so no
 * token is ever wasted, and at every refusal accepted >= C + R * elapsed - 1. The lower bound is
 * checked for rates whose interval is a whole number of nanoseconds (no rounding in the bucket).
 */
static void test_property_bounds(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 4096);
    uint64_t seed = UINT64_C(0x9e3779b97f4a7c15);
    int lower_checked = 0;
    for (uint64_t trial = 0; trial < 600; trial++) {
        uint32_t C = (uint32_t)prng_range(&seed, 1, 50);
        uint64_t R = prng_range(&seed, 0, 100);
        int pattern = (int)(trial % 3); /* 0 saturating, 1 random, 2 bursts and idle gaps */
        bw_ratelimit_params p;
        bw_ratelimit_params_init(&p, C, (double)R, false);
        uint64_t T = R ? (SEC + R - 1) / R : SEC;
        uint64_t n = prng_range(&seed, 200, 800);
        uint64_t now = T0 + prng_range(&seed, 0, 1000 * SEC), first = now;
        uint64_t accepted = 0;
        bool exact = R != 0 && SEC % R == 0;
        bw_ratelimit_result r = {0};
        for (uint64_t i = 0; i < n; i++) {
            if (i > 0) {
                uint64_t gap;
                if (pattern == 0) {
                    gap = prng_range(&seed, 0, T);
                    if (R != 0 && gap > r.reset_after_ns)
                        gap = r.reset_after_ns;
                } else if (pattern == 1) {
                    gap = prng_range(&seed, 0, 3 * T);
                } else {
                    gap = prng_range(&seed, 0, 9) == 0 ? prng_range(&seed, 0, 20 * T) : 0;
                }
                now += gap;
            }
            bool ok = take(t, 0, trial, &p, now, &r);
            if (ok)
                accepted++;
            uint64_t elapsed = now - first;
            /* accepted <= C + R * elapsed / 1e9, multiplied out. */
            assert_true(accepted * SEC <= (uint64_t)C * SEC + R * elapsed);
            if (R == 0)
                assert_true(accepted == (i + 1 < C ? i + 1 : C));
            if (pattern == 0 && !ok && exact) {
                assert_true((accepted + 1) * SEC >= (uint64_t)C * SEC + R * elapsed);
                lower_checked++;
            }
        }
    }
    print_message("lower bound checked at %d refusals\n", lower_checked);
    assert_true(lower_checked > 1000);
    free(f.mem);
}

/* Same, fractional rates: 0.25/s .. 12.5/s, upper bound only. */
static void test_property_fractional(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 1024);
    uint64_t seed = 12345;
    for (uint64_t trial = 0; trial < 100; trial++) {
        uint32_t C = (uint32_t)prng_range(&seed, 1, 50);
        uint64_t quarters = prng_range(&seed, 1, 50); /* R = quarters / 4 */
        bw_ratelimit_params p;
        bw_ratelimit_params_init(&p, C, (double)quarters / 4.0, false);
        uint64_t now = T0, first = now, accepted = 0;
        for (int i = 0; i < 400; i++) {
            now += prng_range(&seed, 0, 4 * SEC / quarters);
            if (take(t, 0, trial, &p, now, NULL))
                accepted++;
            assert_true(accepted * 4 * SEC <= (uint64_t)C * 4 * SEC + quarters * (now - first));
        }
    }
    free(f.mem);
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * SEC + (uint64_t)ts.tv_nsec;
}

typedef struct shared_area {
    _Atomic uint64_t accepted[8];
    _Atomic uint64_t recorded;
    _Atomic int started;
} shared_area;

static void *map_shared(size_t len)
{
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(m != MAP_FAILED);
    return m;
}

/* Four processes, one key, C = 1000, no refill, 1000 attempts each: exactly 1000 accepted. */
static void test_multiprocess_exact(void **state)
{
    (void)state;
    size_t tbytes = bw_ratelimit_table_size_bytes(1024);
    void *mem = map_shared(tbytes);
    shared_area *sh = map_shared(sizeof(shared_area));
    bw_ratelimit_table *t = bw_ratelimit_table_init(mem, 1024);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 1000, 0, false);

    pid_t pids[4];
    for (int c = 0; c < 4; c++) {
        pids[c] = fork();
        assert_true(pids[c] >= 0);
        if (pids[c] == 0) {
            atomic_fetch_add(&sh->started, 1);
            while (atomic_load(&sh->started) < 4)
                ; /* start together, so the attempts really interleave */
            uint64_t ok = 0;
            for (int i = 0; i < 1000; i++) {
                bw_ratelimit_result r;
                if (bw_ratelimit_take(t, 0, 4242, &p, mono_ns(), &r) == BW_RATELIMIT_ALLOW)
                    ok++;
            }
            atomic_store(&sh->accepted[c], ok);
            _exit(0);
        }
    }
    uint64_t total = 0;
    for (int c = 0; c < 4; c++) {
        int status;
        assert_int_equal(waitpid(pids[c], &status, 0), pids[c]);
        assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        total += atomic_load(&sh->accepted[c]);
    }
    assert_true(total == 1000);
    bw_ratelimit_result r;
    assert_int_equal(bw_ratelimit_take(t, 0, 4242, &p, mono_ns(), &r), BW_RATELIMIT_REFUSE);
    assert_int_equal(bw_ratelimit_table_check(t), 0);
    munmap(mem, tbytes);
    munmap(sh, sizeof(shared_area));
}

/* A worker's loop: the shared key until it is exhausted, mixed with churn on many other keys in
 * a small table so that claims and evictions are under way when the kill lands. */
static void churn_worker(bw_ratelimit_table *t, shared_area *sh, uint64_t shared_key,
                         const bw_ratelimit_params *zero, const bw_ratelimit_params *fast,
                         uint64_t seed, bool forever)
{
    atomic_fetch_add(&sh->started, 1);
    for (;;) {
        bw_ratelimit_result r;
        uint64_t now = mono_ns();
        if (bw_ratelimit_take(t, 0, shared_key, zero, now, &r) == BW_RATELIMIT_ALLOW)
            atomic_fetch_add(&sh->recorded, 1);
        else if (!forever)
            return;
        for (int i = 0; i < 3; i++)
            bw_ratelimit_take(t, 1, prng_range(&seed, 0, 1000), fast, now, &r);
    }
}

/* A worker killed at an arbitrary instruction leaves a table the others keep using: no hang,
 * sound structure, and the shared key's count exact up to the one token the victim may have
 * taken without recording it. */
static void test_multiprocess_sigkill(void **state)
{
    (void)state;
    size_t tbytes = bw_ratelimit_table_size_bytes(256);
    void *mem = map_shared(tbytes);
    shared_area *sh = map_shared(sizeof(shared_area));
    bw_ratelimit_table *t = bw_ratelimit_table_init(mem, 256);
    bw_ratelimit_params zero, fast;
    bw_ratelimit_params_init(&zero, 20000, 0, false);
    bw_ratelimit_params_init(&fast, 2, 1000, false);
    uint64_t seed = 777;

    for (int round = 0; round < 12; round++) {
        uint64_t key = 1000000 + (uint64_t)round;
        atomic_store(&sh->recorded, 0);
        atomic_store(&sh->started, 0);
        pid_t victim = fork();
        assert_true(victim >= 0);
        if (victim == 0) {
            churn_worker(t, sh, key, &zero, &fast, seed + 1, true);
            _exit(0);
        }
        pid_t survivor = fork();
        assert_true(survivor >= 0);
        if (survivor == 0) {
            churn_worker(t, sh, key, &zero, &fast, seed + 2, false);
            _exit(0);
        }
        while (atomic_load(&sh->started) < 2)
            usleep(100);
        usleep((useconds_t)prng_range(&seed, 0, 3000));
        assert_int_equal(kill(victim, SIGKILL), 0);
        int status;
        assert_int_equal(waitpid(victim, &status, 0), victim);
        assert_true(WIFSIGNALED(status));
        assert_int_equal(waitpid(survivor, &status, 0), survivor);
        assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);

        uint64_t rec = atomic_load(&sh->recorded);
        assert_true(rec == 20000 || rec == 19999);
        assert_int_equal(bw_ratelimit_table_check(t), 0);
        bw_ratelimit_result r;
        assert_int_equal(bw_ratelimit_take(t, 0, key, &zero, mono_ns(), &r), BW_RATELIMIT_REFUSE);
        /* A fresh key still gets exactly its capacity. */
        bw_ratelimit_params five;
        bw_ratelimit_params_init(&five, 5, 0, false);
        int ok = 0;
        for (int i = 0; i < 10; i++)
            ok += bw_ratelimit_take(t, 2, key, &five, mono_ns(), &r) == BW_RATELIMIT_ALLOW;
        assert_int_equal(ok, 5);
    }
    munmap(mem, tbytes);
    munmap(sh, sizeof(shared_area));
}

/* Fleet area: pending counts, key names, collect and absorb, without Redis. */
static void test_fleet_table(void **state)
{
    (void)state;
    uint32_t entries = 64;
    void *mem = calloc(1, bw_ratelimit_table_size_bytes_fleet(entries));
    assert_non_null(mem);
    bw_ratelimit_table *t = bw_ratelimit_table_init_fleet(mem, entries);
    assert_true(bw_ratelimit_fleet_enabled(t));
    assert_int_equal(bw_ratelimit_table_check(t), 0);
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 10, 1, false); /* 10 tokens, one per second */
    bw_ratelimit_result r;
    uint64_t key = 42;
    for (int i = 0; i < 3; i++)
        assert_int_equal(bw_ratelimit_take_fleet(t, 1, key, "192.0.2.1", 9, false, &p, T0, &r),
                         BW_RATELIMIT_ALLOW);
    uint32_t idx = UINT32_MAX;
    bw_ratelimit_fleet_entry fe;
    for (uint32_t i = 0; i < entries; i++)
        if (bw_ratelimit_fleet_pending(t, i) != 0)
            idx = i;
    assert_true(idx != UINT32_MAX);
    assert_int_equal(bw_ratelimit_fleet_pending(t, idx), 3);
    assert_true(bw_ratelimit_fleet_read(t, idx, &fe));
    assert_string_equal(fe.key, "192.0.2.1");
    assert_int_equal(fe.policy_id, 1);
    /* Collecting empties the counter, once. */
    assert_int_equal(bw_ratelimit_fleet_collect(t, idx, fe.tag), 3);
    assert_int_equal(bw_ratelimit_fleet_collect(t, idx, fe.tag), 0);
    assert_int_equal(bw_ratelimit_fleet_collect(t, idx, fe.tag + 1), 0);
    /* The fleet used 9 tokens: TAT 9 s ahead; only 1 token left here. */
    assert_true(bw_ratelimit_fleet_absorb(t, idx, fe.tag, &p, T0, 9 * SEC));
    assert_int_equal(bw_ratelimit_take_fleet(t, 1, key, "192.0.2.1", 9, false, &p, T0, &r),
                     BW_RATELIMIT_ALLOW);
    assert_int_equal(r.remaining, 0);
    assert_int_equal(bw_ratelimit_take_fleet(t, 1, key, "192.0.2.1", 9, false, &p, T0, &r),
                     BW_RATELIMIT_REFUSE);
    /* Absorb never gives tokens back. */
    assert_true(bw_ratelimit_fleet_absorb(t, idx, fe.tag, &p, T0, 1 * SEC));
    assert_int_equal(bw_ratelimit_take_fleet(t, 1, key, "192.0.2.1", 9, false, &p, T0, &r),
                     BW_RATELIMIT_REFUSE);
    /* Only allowed takes are pending. */
    assert_int_equal(bw_ratelimit_fleet_pending(t, idx), 1);
    /* A busy slot with pending tokens is not reclaimed as idle, even once its bucket is full. */
    assert_int_equal(bw_ratelimit_table_check(t), 0);
    assert_int_equal(bw_ratelimit_fleet_lost(t), 0);

    /* Header values are named by digest, the same on every instance. */
    char a[BW_RATELIMIT_FLEET_KEY_MAX + 1], b[BW_RATELIMIT_FLEET_KEY_MAX + 1];
    assert_int_equal(bw_ratelimit_fleet_key_text("tenant 1", 8, false, a), 34);
    assert_int_equal(bw_ratelimit_fleet_key_text("tenant 1", 8, true, b), 34);
    assert_string_equal(a, b);
    assert_memory_equal(a, "h-", 2);
    assert_int_equal(bw_ratelimit_fleet_key_text("2001:db8::/64", 13, false, a), 13);

    /* Never-refilling buckets absorb a count. */
    bw_ratelimit_params once;
    bw_ratelimit_params_init(&once, 5, 0, false);
    assert_int_equal(bw_ratelimit_take_fleet(t, 2, 7, "k", 1, true, &once, T0, &r),
                     BW_RATELIMIT_ALLOW);
    uint32_t j = UINT32_MAX;
    for (uint32_t i = 0; i < entries; i++)
        if (i != idx && bw_ratelimit_fleet_pending(t, i) != 0)
            j = i;
    assert_true(j != UINT32_MAX && bw_ratelimit_fleet_read(t, j, &fe));
    assert_true(bw_ratelimit_fleet_absorb(t, j, fe.tag, &once, T0, 5));
    assert_int_equal(bw_ratelimit_take_fleet(t, 2, 7, "k", 1, true, &once, T0, &r),
                     BW_RATELIMIT_REFUSE);

    /* Degraded share: a half of the capacity, refilled half as fast. */
    bw_ratelimit_params half;
    bw_ratelimit_params_share(&p, 2, &half);
    assert_int_equal(half.capacity, 5);
    assert_true(half.interval_ns == 2 * p.interval_ns);
    bw_ratelimit_fleet_set_share(t, 2);
    assert_int_equal(bw_ratelimit_fleet_share(t), 2);
    free(mem);
}

/* A table without fleet area: take_fleet is take, and the fleet functions do nothing. */
static void test_fleet_absent(void **state)
{
    (void)state;
    fixture f;
    bw_ratelimit_table *t = new_table(&f, 16);
    assert_false(bw_ratelimit_fleet_enabled(t));
    bw_ratelimit_params p;
    bw_ratelimit_params_init(&p, 2, 1, false);
    bw_ratelimit_result r;
    assert_int_equal(bw_ratelimit_take_fleet(t, 0, 1, "x", 1, false, &p, T0, &r),
                     BW_RATELIMIT_ALLOW);
    bw_ratelimit_fleet_entry fe;
    for (uint32_t i = 0; i < 16; i++) {
        assert_int_equal(bw_ratelimit_fleet_pending(t, i), 0);
        assert_false(bw_ratelimit_fleet_read(t, i, &fe));
    }
    free(f.mem);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hash_vectors),
        cmocka_unit_test(test_params),
        cmocka_unit_test(test_burst_then_refuse),
        cmocka_unit_test(test_steady_refill),
        cmocka_unit_test(test_remaining_and_reset),
        cmocka_unit_test(test_ceil_seconds),
        cmocka_unit_test(test_refill_zero),
        cmocka_unit_test(test_dry_run),
        cmocka_unit_test(test_eviction_idle_then_closest_to_full),
        cmocka_unit_test(test_table_full_never_fails),
        cmocka_unit_test(test_probe_window_collisions),
        cmocka_unit_test(test_clock_backwards),
        cmocka_unit_test(test_policies_independent),
        cmocka_unit_test(test_key_counts),
        cmocka_unit_test(test_refill_mode_change),
        cmocka_unit_test(test_attach),
        cmocka_unit_test(test_property_bounds),
        cmocka_unit_test(test_property_fractional),
        cmocka_unit_test(test_multiprocess_exact),
        cmocka_unit_test(test_multiprocess_sigkill),
        cmocka_unit_test(test_fleet_table),
        cmocka_unit_test(test_fleet_absent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
