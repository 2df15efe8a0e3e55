/*
 * Unit tests of the circuit breaker: the state machine driven by an injected clock and random
 * values, several callers on one record standing in for workers, and a stress test where forked
 * processes hammer one record in shared memory while one of them is killed with SIGKILL.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "breakwater/breaker.h"

/* connect_timeout + response_timeout of the default upstream */
#define PROBE_TIMEOUT 31000

static bw_breaker_conf conf_default(void)
{
    bw_breaker_conf c;
    memset(&c, 0, sizeof(c));
    c.failure_threshold = 5;
    c.reset_timeout_ms = 30000;
    c.max_reset_timeout_ms = 300000;
    c.half_open_success_threshold = 1;
    c.half_open_max_requests = 1;
    c.failure_rate_percent = 0;
    c.window_ms = 10000;
    c.min_requests = 20;
    c.slow_call_ms = 0;
    c.failure_statuses[0] = 502;
    c.failure_statuses[1] = 503;
    c.failure_statuses[2] = 504;
    c.n_failure_statuses = 3;
    return c;
}

static bw_breaker_decision allow(bw_breaker *b, const bw_breaker_conf *c, uint64_t now,
                                 bw_breaker_ticket *tk)
{
    return bw_breaker_allow(b, c, now, PROBE_TIMEOUT, tk, NULL, NULL);
}

/* n requests admitted and answered with outcome at time now; returns the last transition. */
static bw_breaker_transition run(bw_breaker *b, const bw_breaker_conf *c, uint64_t now, int n,
                                 bw_breaker_outcome outcome)
{
    bw_breaker_transition t = {0}, last = {0};
    for (int i = 0; i < n; i++) {
        bw_breaker_ticket tk;
        if (allow(b, c, now, &tk) == BW_BREAKER_REJECT)
            continue;
        bw_breaker_report(b, c, now, &tk, outcome, 0, &t);
        if (t.happened)
            last = t;
    }
    return last;
}

static bw_breaker_state state_of(const bw_breaker *b, const bw_breaker_conf *c, uint64_t now)
{
    bw_breaker_view v;
    bw_breaker_snapshot(b, c, now, &v);
    return v.state;
}

/* Opens a fresh breaker at time now with the consecutive-failure trigger. */
static void open_at(bw_breaker *b, const bw_breaker_conf *c, uint64_t now)
{
    bw_breaker_init(b, now);
    run(b, c, now, (int)c->failure_threshold, BW_BREAKER_FAILURE);
    assert_int_equal(state_of(b, c, now), BW_BREAKER_OPEN);
}

static void test_atomics_lock_free(void **state)
{
    (void)state;
    bw_breaker b;
    assert_true(atomic_is_lock_free(&b.word));
    assert_int_equal(sizeof(b) % 64, 0);
}

static void test_init_closed_allows(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    bw_breaker_init(&b, 1000);
    bw_breaker_ticket tk;
    uint64_t ra = 99;
    assert_int_equal(bw_breaker_allow(&b, &c, 1000, PROBE_TIMEOUT, &tk, &ra, NULL),
                     BW_BREAKER_ALLOW);
    assert_false(tk.probe);
    assert_int_equal(ra, 0);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 1000, &v);
    assert_int_equal(v.state, BW_BREAKER_CLOSED);
    assert_int_equal(v.since_ms, 1000);
    assert_int_equal(v.generation, 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(v.transitions[i], 0);
}

static void test_state_names_and_metric(void **state)
{
    (void)state;
    assert_string_equal(bw_breaker_state_name(BW_BREAKER_CLOSED), "closed");
    assert_string_equal(bw_breaker_state_name(BW_BREAKER_OPEN), "open");
    assert_string_equal(bw_breaker_state_name(BW_BREAKER_HALF_OPEN), "half_open");
    assert_string_equal(bw_breaker_state_name((bw_breaker_state)7), "unknown");
    assert_int_equal(bw_breaker_state_metric(BW_BREAKER_CLOSED), 1);
    assert_int_equal(bw_breaker_state_metric(BW_BREAKER_OPEN), 2);
    assert_int_equal(bw_breaker_state_metric(BW_BREAKER_HALF_OPEN), 3);
    assert_int_equal(bw_breaker_state_metric((bw_breaker_state)7), 0);
    assert_string_equal(bw_breaker_cause_name(BW_BREAKER_CAUSE_CONSECUTIVE),
                        "consecutive_failures");
}

static void test_threshold_minus_one_stays_closed(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    bw_breaker_init(&b, 0);
    bw_breaker_transition t = run(&b, &c, 10, 4, BW_BREAKER_FAILURE);
    assert_false(t.happened);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 10, &v);
    assert_int_equal(v.state, BW_BREAKER_CLOSED);
    assert_int_equal(v.failures, 4);
    assert_int_equal(v.failures_total, 4);
}

static void test_threshold_opens(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    bw_breaker_init(&b, 0);
    run(&b, &c, 10, 4, BW_BREAKER_FAILURE);
    bw_breaker_transition t = run(&b, &c, 20, 1, BW_BREAKER_FAILURE);
    assert_true(t.happened);
    assert_int_equal(t.from, BW_BREAKER_CLOSED);
    assert_int_equal(t.to, BW_BREAKER_OPEN);
    assert_int_equal(t.cause, BW_BREAKER_CAUSE_CONSECUTIVE);
    assert_int_equal(t.failures, 5);
    assert_int_equal(t.wait_ms, 30000);
    assert_int_equal(t.generation, 1);
    char buf[128];
    bw_breaker_describe(&t, buf, sizeof(buf));
    assert_string_equal(buf, "closed -> open after 5 consecutive failures");
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 20, &v);
    assert_int_equal(v.state, BW_BREAKER_OPEN);
    assert_int_equal(v.opened_at_ms, 20);
    assert_int_equal(v.since_ms, 20);
    assert_int_equal(v.transitions[BW_BREAKER_OPEN], 1);
}

static void test_threshold_one(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    c.failure_threshold = 1;
    bw_breaker_init(&b, 0);
    bw_breaker_transition t = run(&b, &c, 10, 1, BW_BREAKER_FAILURE);
    assert_true(t.happened);
    assert_int_equal(state_of(&b, &c, 10), BW_BREAKER_OPEN);
}

static void test_success_resets_consecutive(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    bw_breaker_init(&b, 0);
    run(&b, &c, 10, 4, BW_BREAKER_FAILURE);
    run(&b, &c, 11, 1, BW_BREAKER_SUCCESS);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 11, &v);
    assert_int_equal(v.failures, 0);
    run(&b, &c, 12, 4, BW_BREAKER_FAILURE);
    assert_int_equal(state_of(&b, &c, 12), BW_BREAKER_CLOSED);
    run(&b, &c, 13, 1, BW_BREAKER_FAILURE);
    assert_int_equal(state_of(&b, &c, 13), BW_BREAKER_OPEN);
}

static void test_open_rejects_with_retry_after(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 1000);
    uint64_t ra = 0;
    bw_breaker_ticket tk;
    assert_int_equal(bw_breaker_allow(&b, &c, 1000, PROBE_TIMEOUT, &tk, &ra, NULL),
                     BW_BREAKER_REJECT);
    assert_int_equal(ra, 30000);
    assert_int_equal(bw_breaker_allow(&b, &c, 30999, PROBE_TIMEOUT, &tk, &ra, NULL),
                     BW_BREAKER_REJECT);
    assert_int_equal(ra, 1);
    assert_int_equal(bw_breaker_retry_after_s(ra), 1);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 21000, &v);
    assert_int_equal(v.rejected, 2);
    assert_int_equal(v.retry_after_ms, 10000);
}

static void test_retry_after_seconds(void **state)
{
    (void)state;
    assert_int_equal(bw_breaker_retry_after_s(0), 1);
    assert_int_equal(bw_breaker_retry_after_s(1), 1);
    assert_int_equal(bw_breaker_retry_after_s(1000), 1);
    assert_int_equal(bw_breaker_retry_after_s(1001), 2);
    assert_int_equal(bw_breaker_retry_after_s(30000), 30);
}

static void test_open_to_half_open_at_reset_timeout(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 1000);
    bw_breaker_ticket tk;
    bw_breaker_transition t;
    assert_int_equal(bw_breaker_allow(&b, &c, 30999, PROBE_TIMEOUT, &tk, NULL, &t),
                     BW_BREAKER_REJECT);
    assert_false(t.happened);
    assert_int_equal(bw_breaker_allow(&b, &c, 31000, PROBE_TIMEOUT, &tk, NULL, &t),
                     BW_BREAKER_ALLOW_PROBE);
    assert_true(tk.probe);
    assert_true(t.happened);
    assert_int_equal(t.from, BW_BREAKER_OPEN);
    assert_int_equal(t.to, BW_BREAKER_HALF_OPEN);
    assert_int_equal(t.cause, BW_BREAKER_CAUSE_TIMEOUT);
    assert_int_equal(t.wait_ms, 30000);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 31000, &v);
    assert_int_equal(v.state, BW_BREAKER_HALF_OPEN);
    assert_int_equal(v.half_open_permits, 1);
    assert_int_equal(v.transitions[BW_BREAKER_HALF_OPEN], 1);
}

static void test_single_half_open_transition_when_racing(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 0);
    int transitions = 0, probes = 0;
    for (int worker = 0; worker < 8; worker++) {
        bw_breaker_ticket tk;
        bw_breaker_transition t;
        bw_breaker_decision d = bw_breaker_allow(&b, &c, 30000, PROBE_TIMEOUT, &tk, NULL, &t);
        transitions += t.happened;
        probes += d == BW_BREAKER_ALLOW_PROBE;
    }
    assert_int_equal(transitions, 1);
    assert_int_equal(probes, 1);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 30000, &v);
    assert_int_equal(v.transitions[BW_BREAKER_HALF_OPEN], 1);
    assert_int_equal(v.rejected, 7);
}

static void test_half_open_permits_across_workers(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    c.half_open_max_requests = 3;
    c.half_open_success_threshold = 3;
    open_at(&b, &c, 0);
    bw_breaker_ticket tk[4];
    for (int i = 0; i < 3; i++)
        assert_int_equal(allow(&b, &c, 30000 + (uint64_t)i, &tk[i]), BW_BREAKER_ALLOW_PROBE);
    uint64_t ra = 0;
    assert_int_equal(bw_breaker_allow(&b, &c, 30005, PROBE_TIMEOUT, &tk[3], &ra, NULL),
                     BW_BREAKER_REJECT);
    assert_true(ra >= 1);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 30005, &v);
    assert_int_equal(v.half_open_permits, 3);
    assert_int_equal(v.probes, 3);
}

static void test_half_open_closes_after_successes(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    c.half_open_max_requests = 2;
    c.half_open_success_threshold = 2;
    open_at(&b, &c, 0);
    bw_breaker_ticket a, d;
    bw_breaker_transition t;
    assert_int_equal(allow(&b, &c, 30000, &a), BW_BREAKER_ALLOW_PROBE);
    assert_int_equal(allow(&b, &c, 30001, &d), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_report(&b, &c, 30010, &a, BW_BREAKER_SUCCESS, 0, &t);
    assert_false(t.happened);
    assert_int_equal(state_of(&b, &c, 30010), BW_BREAKER_HALF_OPEN);
    bw_breaker_report(&b, &c, 30011, &d, BW_BREAKER_SUCCESS, 0, &t);
    assert_true(t.happened);
    assert_int_equal(t.from, BW_BREAKER_HALF_OPEN);
    assert_int_equal(t.to, BW_BREAKER_CLOSED);
    assert_int_equal(t.cause, BW_BREAKER_CAUSE_PROBE_OK);
    assert_int_equal(t.successes, 2);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 30011, &v);
    assert_int_equal(v.state, BW_BREAKER_CLOSED);
    assert_int_equal(v.failures, 0);
    assert_int_equal(v.openings, 0);
    assert_int_equal(v.transitions[BW_BREAKER_CLOSED], 1);
    assert_int_equal(allow(&b, &c, 30012, &a), BW_BREAKER_ALLOW);
}

/* One permit, three successes needed: each answered probe frees its permit for the next. */
static void test_success_frees_permit(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    c.half_open_success_threshold = 3;
    open_at(&b, &c, 0);
    for (int i = 0; i < 3; i++) {
        bw_breaker_ticket tk, other;
        assert_int_equal(allow(&b, &c, 30000 + (uint64_t)i, &tk), BW_BREAKER_ALLOW_PROBE);
        assert_int_equal(allow(&b, &c, 30000 + (uint64_t)i, &other), BW_BREAKER_REJECT);
        bw_breaker_report(&b, &c, 30000 + (uint64_t)i, &tk, BW_BREAKER_SUCCESS, 0, NULL);
    }
    assert_int_equal(state_of(&b, &c, 30003), BW_BREAKER_CLOSED);
}

static void test_probe_failure_reopens_doubled(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 0);
    bw_breaker_ticket tk;
    bw_breaker_transition t;
    assert_int_equal(allow(&b, &c, 30000, &tk), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_report(&b, &c, 30100, &tk, BW_BREAKER_FAILURE, 0, &t);
    assert_true(t.happened);
    assert_int_equal(t.from, BW_BREAKER_HALF_OPEN);
    assert_int_equal(t.to, BW_BREAKER_OPEN);
    assert_int_equal(t.cause, BW_BREAKER_CAUSE_PROBE_FAIL);
    assert_int_equal(t.wait_ms, 60000);
    uint64_t ra = 0;
    assert_int_equal(bw_breaker_allow(&b, &c, 30100, PROBE_TIMEOUT, &tk, &ra, NULL),
                     BW_BREAKER_REJECT);
    assert_int_equal(ra, 60000);
    assert_int_equal(allow(&b, &c, 90099, &tk), BW_BREAKER_REJECT);
    assert_int_equal(allow(&b, &c, 90100, &tk), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 90100, &v);
    assert_int_equal(v.openings, 2);
    assert_int_equal(v.transitions[BW_BREAKER_OPEN], 2);
    assert_int_equal(v.transitions[BW_BREAKER_HALF_OPEN], 2);
}

/* Fails every probe from now on; returns the open period of each re-opening. */
static void reopen_waits(bw_breaker *b, const bw_breaker_conf *c, uint64_t *now, uint32_t rnd,
                         uint64_t *waits, int n)
{
    for (int i = 0; i < n; i++) {
        bw_breaker_view v;
        bw_breaker_snapshot(b, c, *now, &v);
        *now += v.retry_after_ms;
        bw_breaker_ticket tk;
        assert_int_equal(allow(b, c, *now, &tk), BW_BREAKER_ALLOW_PROBE);
        bw_breaker_transition t;
        bw_breaker_report(b, c, *now, &tk, BW_BREAKER_FAILURE, rnd, &t);
        assert_true(t.happened);
        waits[i] = t.wait_ms;
    }
}

static void test_backoff_caps_at_max(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 0);
    uint64_t now = 0, waits[6];
    reopen_waits(&b, &c, &now, 0, waits, 6);
    assert_int_equal(waits[0], 60000);
    assert_int_equal(waits[1], 120000);
    assert_int_equal(waits[2], 240000);
    assert_int_equal(waits[3], 300000);
    assert_int_equal(waits[4], 300000);
    assert_int_equal(waits[5], 300000);
}

static void test_backoff_many_openings_stays_capped(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    c.reset_timeout_ms = 1000;
    c.max_reset_timeout_ms = 5000;
    open_at(&b, &c, 0);
    uint64_t now = 0, waits[80];
    reopen_waits(&b, &c, &now, 77, waits, 80);
    for (int i = 0; i < 80; i++) {
        assert_true(waits[i] >= 2000);
        assert_true(waits[i] <= 5000);
    }
    assert_int_equal(waits[79], 5000);
}

static void test_close_resets_backoff(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 0);
    uint64_t now = 0, waits[2];
    reopen_waits(&b, &c, &now, 0, waits, 2);
    now += 120000;
    bw_breaker_ticket tk;
    assert_int_equal(allow(&b, &c, now, &tk), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_report(&b, &c, now, &tk, BW_BREAKER_SUCCESS, 0, NULL);
    assert_int_equal(state_of(&b, &c, now), BW_BREAKER_CLOSED);
    bw_breaker_transition t = run(&b, &c, now, 5, BW_BREAKER_FAILURE);
    assert_true(t.happened);
    assert_int_equal(t.wait_ms, 30000);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, now, &v);
    assert_int_equal(v.openings, 1);
    assert_int_equal(v.retry_after_ms, 30000);
}

static void test_jitter_bounds(void **state)
{
    (void)state;
    uint32_t rnds[] = {0, 1, 50, 100, 101, 12345, 0x7FFFFFFFu, UINT32_MAX};
    uint64_t seen_min = UINT64_MAX, seen_max = 0;
    for (size_t i = 0; i < sizeof(rnds) / sizeof(rnds[0]); i++) {
        bw_breaker b;
        bw_breaker_conf c = conf_default();
        open_at(&b, &c, 0);
        uint64_t now = 0, w;
        reopen_waits(&b, &c, &now, rnds[i], &w, 1);
        assert_true(w >= 60000);
        assert_true(w <= 66000);
        assert_int_equal(w, 60000 + 60000 * (rnds[i] % 101) / 1000);
        seen_min = w < seen_min ? w : seen_min;
        seen_max = w > seen_max ? w : seen_max;
    }
    assert_int_equal(seen_min, 60000);
    assert_int_equal(seen_max, 66000);
}

static void test_first_open_has_no_jitter(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    bw_breaker_init(&b, 0);
    for (int i = 0; i < 5; i++) {
        bw_breaker_ticket tk;
        allow(&b, &c, 0, &tk);
        bw_breaker_report(&b, &c, 0, &tk, BW_BREAKER_FAILURE, UINT32_MAX, NULL);
    }
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 0, &v);
    assert_int_equal(v.wait_ms, 30000);
}

/* A worker takes the only permit and is killed: after the lease, another probe goes out. */
static void test_lease_expiry_frees_leaked_permit(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 0);
    bw_breaker_ticket dead, tk;
    assert_int_equal(allow(&b, &c, 30000, &dead), BW_BREAKER_ALLOW_PROBE);
    assert_int_equal(allow(&b, &c, 30000 + PROBE_TIMEOUT - 1, &tk), BW_BREAKER_REJECT);
    assert_int_equal(allow(&b, &c, 30000 + PROBE_TIMEOUT, &tk), BW_BREAKER_ALLOW_PROBE);
    assert_int_equal(allow(&b, &c, 30000 + PROBE_TIMEOUT, &tk), BW_BREAKER_REJECT);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 30000 + PROBE_TIMEOUT, &v);
    assert_int_equal(v.state, BW_BREAKER_HALF_OPEN);
    assert_int_equal(v.half_open_permits, 1);
    assert_int_equal(v.lease_expiries, 1);
    assert_int_equal(v.transitions[BW_BREAKER_HALF_OPEN], 1);
}

/* Activity in the round (an answered probe) extends the lease of the permits still out. */
static void test_lease_extended_by_activity(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    c.half_open_max_requests = 2;
    c.half_open_success_threshold = 5;
    open_at(&b, &c, 0);
    bw_breaker_ticket p1, p2, p3, tk;
    assert_int_equal(allow(&b, &c, 30000, &p1), BW_BREAKER_ALLOW_PROBE);
    assert_int_equal(allow(&b, &c, 30000, &p2), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_report(&b, &c, 40000, &p2, BW_BREAKER_SUCCESS, 0, NULL);
    assert_int_equal(allow(&b, &c, 40000, &p3), BW_BREAKER_ALLOW_PROBE);
    assert_int_equal(allow(&b, &c, 40000 + PROBE_TIMEOUT - 1, &tk), BW_BREAKER_REJECT);
    assert_int_equal(allow(&b, &c, 40000 + PROBE_TIMEOUT, &tk), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 40000 + PROBE_TIMEOUT, &v);
    assert_int_equal(v.half_open_successes, 1);
    assert_int_equal(v.half_open_permits, 1);
}

/* The answer of a probe whose permit was taken back is ignored, success or failure. */
static void test_stale_probe_after_lease_ignored(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 0);
    bw_breaker_ticket slow, fresh;
    assert_int_equal(allow(&b, &c, 30000, &slow), BW_BREAKER_ALLOW_PROBE);
    assert_int_equal(allow(&b, &c, 30000 + PROBE_TIMEOUT, &fresh), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_transition t;
    bw_breaker_report(&b, &c, 62000, &slow, BW_BREAKER_FAILURE, 0, &t);
    assert_false(t.happened);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 62000, &v);
    assert_int_equal(v.state, BW_BREAKER_HALF_OPEN);
    assert_int_equal(v.half_open_permits, 1);
    assert_int_equal(v.stale_outcomes, 1);
    bw_breaker_report(&b, &c, 62001, &fresh, BW_BREAKER_SUCCESS, 0, &t);
    assert_true(t.happened);
    assert_int_equal(state_of(&b, &c, 62001), BW_BREAKER_CLOSED);
}

/* Requests admitted while closed and answered after it opened change nothing. */
static void test_stale_outcomes_while_open_ignored(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    bw_breaker_init(&b, 0);
    bw_breaker_ticket inflight[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(allow(&b, &c, 0, &inflight[i]), BW_BREAKER_ALLOW);
    run(&b, &c, 1, 5, BW_BREAKER_FAILURE);
    assert_int_equal(state_of(&b, &c, 1), BW_BREAKER_OPEN);
    bw_breaker_view before, after;
    bw_breaker_snapshot(&b, &c, 2, &before);
    bw_breaker_report(&b, &c, 2, &inflight[0], BW_BREAKER_FAILURE, 0, NULL);
    bw_breaker_report(&b, &c, 2, &inflight[1], BW_BREAKER_SUCCESS, 0, NULL);
    bw_breaker_snapshot(&b, &c, 2, &after);
    assert_int_equal(after.state, BW_BREAKER_OPEN);
    assert_int_equal(after.generation, before.generation);
    assert_int_equal(after.since_ms, before.since_ms);
    assert_int_equal(after.stale_outcomes, 2);

    /* Half open: a stale success must not count as a probe success, nor free the permit. */
    bw_breaker_ticket probe;
    assert_int_equal(allow(&b, &c, 30001, &probe), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_report(&b, &c, 30002, &inflight[2], BW_BREAKER_SUCCESS, 0, NULL);
    bw_breaker_snapshot(&b, &c, 30002, &after);
    assert_int_equal(after.state, BW_BREAKER_HALF_OPEN);
    assert_int_equal(after.half_open_permits, 1);
    assert_int_equal(after.half_open_successes, 0);
}

/* A failure admitted before the last opening and answered after the close starts no count. */
static void test_stale_failure_after_close_ignored(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    c.failure_threshold = 1;
    bw_breaker_init(&b, 0);
    bw_breaker_ticket old;
    allow(&b, &c, 0, &old);
    run(&b, &c, 0, 1, BW_BREAKER_FAILURE);
    bw_breaker_ticket tk;
    assert_int_equal(allow(&b, &c, 30000, &tk), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_report(&b, &c, 30000, &tk, BW_BREAKER_SUCCESS, 0, NULL);
    assert_int_equal(state_of(&b, &c, 30000), BW_BREAKER_CLOSED);
    bw_breaker_report(&b, &c, 30001, &old, BW_BREAKER_FAILURE, 0, NULL);
    assert_int_equal(state_of(&b, &c, 30001), BW_BREAKER_CLOSED);
}

static bw_breaker_conf conf_rate(void)
{
    bw_breaker_conf c = conf_default();
    c.failure_threshold = 0; /* rate only */
    c.failure_rate_percent = 50;
    c.min_requests = 10;
    c.window_ms = 10000;
    return c;
}

static void test_failure_rate_opens_with_volume(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_rate();
    bw_breaker_init(&b, 0);
    /* alternate so that consecutive failures never build up */
    bw_breaker_transition t = {0};
    for (int i = 0; i < 10 && !t.happened; i++)
        t = run(&b, &c, 100 + (uint64_t)i, 1, i % 2 ? BW_BREAKER_FAILURE : BW_BREAKER_SUCCESS);
    assert_true(t.happened);
    assert_int_equal(t.cause, BW_BREAKER_CAUSE_RATE);
    assert_int_equal(t.requests, 10);
    assert_int_equal(t.failures, 5);
    char buf[128];
    bw_breaker_describe(&t, buf, sizeof(buf));
    assert_string_equal(buf, "closed -> open after 5 failures in 10 requests (50%)");
}

static void test_failure_rate_below_min_never_opens(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_rate();
    bw_breaker_init(&b, 0);
    run(&b, &c, 100, 9, BW_BREAKER_FAILURE);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 100, &v);
    assert_int_equal(v.state, BW_BREAKER_CLOSED);
    assert_int_equal(v.window_requests, 9);
    assert_int_equal(v.window_failures, 9);
    run(&b, &c, 101, 1, BW_BREAKER_FAILURE);
    assert_int_equal(state_of(&b, &c, 101), BW_BREAKER_OPEN);
}

static void test_failure_rate_below_percent(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_rate();
    bw_breaker_init(&b, 0);
    run(&b, &c, 100, 60, BW_BREAKER_SUCCESS);
    run(&b, &c, 200, 40, BW_BREAKER_FAILURE); /* 40% */
    assert_int_equal(state_of(&b, &c, 200), BW_BREAKER_CLOSED);
    run(&b, &c, 300, 1, BW_BREAKER_SUCCESS);
    run(&b, &c, 300, 21, BW_BREAKER_FAILURE); /* 61 of 122: 50% */
    assert_int_equal(state_of(&b, &c, 300), BW_BREAKER_OPEN);
}

static void test_failure_rate_off_when_zero(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_rate();
    c.failure_rate_percent = 0;
    c.failure_threshold = 1000;
    bw_breaker_init(&b, 0);
    for (int i = 0; i < 100; i++) {
        run(&b, &c, (uint64_t)i, 1, BW_BREAKER_FAILURE);
        run(&b, &c, (uint64_t)i, 1, BW_BREAKER_SUCCESS);
    }
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 100, &v);
    assert_int_equal(v.state, BW_BREAKER_CLOSED);
    assert_int_equal(v.window_requests, 0);
}

static void test_failure_rate_window_slides(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_rate();
    bw_breaker_init(&b, 0);
    run(&b, &c, 500, 9, BW_BREAKER_FAILURE); /* bucket 0 */
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 9999, &v);
    assert_int_equal(v.window_requests, 9);
    /* At 10000 bucket 0 has left the window: 9 + 1 would open, 1 alone does not. */
    run(&b, &c, 10000, 1, BW_BREAKER_FAILURE);
    bw_breaker_snapshot(&b, &c, 10000, &v);
    assert_int_equal(v.state, BW_BREAKER_CLOSED);
    assert_int_equal(v.window_requests, 1);
    run(&b, &c, 15000, 9, BW_BREAKER_FAILURE);
    assert_int_equal(state_of(&b, &c, 15000), BW_BREAKER_OPEN);
}

static void test_failure_rate_window_fresh_after_close(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_rate();
    c.reset_timeout_ms = 100; /* close again within the same window */
    bw_breaker_init(&b, 0);
    run(&b, &c, 0, 10, BW_BREAKER_FAILURE);
    assert_int_equal(state_of(&b, &c, 0), BW_BREAKER_OPEN);
    bw_breaker_ticket tk;
    assert_int_equal(allow(&b, &c, 100, &tk), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_report(&b, &c, 100, &tk, BW_BREAKER_SUCCESS, 0, NULL);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 100, &v);
    assert_int_equal(v.state, BW_BREAKER_CLOSED);
    assert_int_equal(v.window_requests, 0);
    run(&b, &c, 100, 9, BW_BREAKER_FAILURE);
    assert_int_equal(state_of(&b, &c, 100), BW_BREAKER_CLOSED);
}

static void test_slow_call_classification(void **state)
{
    (void)state;
    bw_breaker_conf c = conf_default();
    assert_false(bw_breaker_is_slow(&c, 1000000)); /* off */
    assert_int_equal(bw_breaker_classify(&c, 200, 1000000), BW_BREAKER_SUCCESS);
    c.slow_call_ms = 2000;
    assert_false(bw_breaker_is_slow(&c, 2000));
    assert_true(bw_breaker_is_slow(&c, 2001));
    assert_int_equal(bw_breaker_classify(&c, 200, 2000), BW_BREAKER_SUCCESS);
    assert_int_equal(bw_breaker_classify(&c, 200, 2001), BW_BREAKER_SLOW);
    assert_int_equal(bw_breaker_classify(&c, 503, 2001), BW_BREAKER_FAILURE);
}

static void test_slow_calls_open(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    c.slow_call_ms = 500;
    bw_breaker_init(&b, 0);
    for (int i = 0; i < 5; i++)
        run(&b, &c, 10, 1, bw_breaker_classify(&c, 200, 800));
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 10, &v);
    assert_int_equal(v.state, BW_BREAKER_OPEN);
    assert_int_equal(v.slow_calls, 5);
    assert_int_equal(v.failures_total, 5);
}

static void test_failure_statuses(void **state)
{
    (void)state;
    bw_breaker_conf c = conf_default();
    assert_true(bw_breaker_is_failure_status(&c, 502));
    assert_true(bw_breaker_is_failure_status(&c, 503));
    assert_true(bw_breaker_is_failure_status(&c, 504));
    assert_false(bw_breaker_is_failure_status(&c, 500));
    assert_false(bw_breaker_is_failure_status(&c, 200));
    assert_false(bw_breaker_is_failure_status(&c, 404));
    assert_false(bw_breaker_is_failure_status(&c, 429));
    c.failure_statuses[3] = 500;
    c.n_failure_statuses = 4;
    assert_true(bw_breaker_is_failure_status(&c, 500));
    c.n_failure_statuses = 0;
    assert_false(bw_breaker_is_failure_status(&c, 502));
    /* no complete response is always a failure */
    assert_int_equal(bw_breaker_classify(&c, 0, 0), BW_BREAKER_FAILURE);
}

static void test_manual_reset_from_open(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 0);
    bw_breaker_transition t;
    assert_true(bw_breaker_reset(&b, 500, &t));
    assert_true(t.happened);
    assert_int_equal(t.from, BW_BREAKER_OPEN);
    assert_int_equal(t.to, BW_BREAKER_CLOSED);
    assert_int_equal(t.cause, BW_BREAKER_CAUSE_RESET);
    char buf[64];
    bw_breaker_describe(&t, buf, sizeof(buf));
    assert_string_equal(buf, "open -> closed by operator reset");
    bw_breaker_ticket tk;
    assert_int_equal(allow(&b, &c, 501, &tk), BW_BREAKER_ALLOW);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 501, &v);
    assert_int_equal(v.since_ms, 500);
    assert_int_equal(v.openings, 0);
    assert_int_equal(v.transitions[BW_BREAKER_CLOSED], 1);
    /* and it counts from zero again */
    run(&b, &c, 502, 4, BW_BREAKER_FAILURE);
    assert_int_equal(state_of(&b, &c, 502), BW_BREAKER_CLOSED);
}

static void test_manual_reset_half_open_and_closed(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 0);
    bw_breaker_ticket probe;
    assert_int_equal(allow(&b, &c, 30000, &probe), BW_BREAKER_ALLOW_PROBE);
    assert_true(bw_breaker_reset(&b, 30001, NULL));
    assert_int_equal(state_of(&b, &c, 30001), BW_BREAKER_CLOSED);
    /* the probe's late failure belongs to the old state */
    bw_breaker_report(&b, &c, 30002, &probe, BW_BREAKER_FAILURE, 0, NULL);
    assert_int_equal(state_of(&b, &c, 30002), BW_BREAKER_CLOSED);

    run(&b, &c, 30003, 4, BW_BREAKER_FAILURE);
    bw_breaker_transition t;
    assert_false(bw_breaker_reset(&b, 30004, &t));
    assert_false(t.happened);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 30004, &v);
    assert_int_equal(v.failures, 0);
}

static void test_reset_closed_clears_window(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_rate();
    bw_breaker_init(&b, 0);
    run(&b, &c, 10, 9, BW_BREAKER_FAILURE);
    bw_breaker_reset(&b, 11, NULL);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 11, &v);
    assert_int_equal(v.window_requests, 0);
    run(&b, &c, 12, 1, BW_BREAKER_FAILURE);
    assert_int_equal(state_of(&b, &c, 12), BW_BREAKER_CLOSED);
}

static void test_force_open_uses_fleet_time(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    bw_breaker_init(&b, 0);
    bw_breaker_transition t;
    assert_true(bw_breaker_force(&b, &c, BW_BREAKER_OPEN, 90000, 100000, &t));
    assert_true(t.happened);
    assert_int_equal(t.cause, BW_BREAKER_CAUSE_FORCED);
    assert_int_equal(t.to, BW_BREAKER_OPEN);
    uint64_t ra = 0;
    bw_breaker_ticket tk;
    assert_int_equal(bw_breaker_allow(&b, &c, 100000, PROBE_TIMEOUT, &tk, &ra, NULL),
                     BW_BREAKER_REJECT);
    assert_int_equal(ra, 20000);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 100000, &v);
    assert_int_equal(v.opened_at_ms, 90000);
    assert_int_equal(v.transitions[BW_BREAKER_OPEN], 1);
    /* same state again: nothing to do */
    assert_false(bw_breaker_force(&b, &c, BW_BREAKER_OPEN, 95000, 100001, &t));
    assert_false(t.happened);
    /* an opening time from a clock ahead of ours is taken as now */
    bw_breaker_init(&b, 0);
    assert_true(bw_breaker_force(&b, &c, BW_BREAKER_OPEN, 200000, 100000, NULL));
    bw_breaker_snapshot(&b, &c, 100000, &v);
    assert_int_equal(v.retry_after_ms, 30000);
}

static void test_force_closed_and_half_open(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 0);
    assert_true(bw_breaker_force(&b, &c, BW_BREAKER_CLOSED, 0, 10, NULL));
    assert_int_equal(state_of(&b, &c, 10), BW_BREAKER_CLOSED);
    assert_true(bw_breaker_force(&b, &c, BW_BREAKER_HALF_OPEN, 0, 20, NULL));
    bw_breaker_ticket tk, tk2;
    assert_int_equal(allow(&b, &c, 21, &tk), BW_BREAKER_ALLOW_PROBE);
    assert_int_equal(allow(&b, &c, 21, &tk2), BW_BREAKER_REJECT);
    assert_false(bw_breaker_force(&b, &c, (bw_breaker_state)9, 0, 22, NULL));
    bw_breaker_report(&b, &c, 22, &tk, BW_BREAKER_SUCCESS, 0, NULL);
    assert_int_equal(state_of(&b, &c, 22), BW_BREAKER_CLOSED);
}

static void test_snapshot_contents(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    c.half_open_max_requests = 2;
    c.half_open_success_threshold = 2;
    open_at(&b, &c, 1000);
    bw_breaker_ticket tk;
    allow(&b, &c, 2000, &tk); /* rejected */
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 11000, &v);
    assert_int_equal(v.state, BW_BREAKER_OPEN);
    assert_int_equal(v.generation, 1);
    assert_int_equal(v.since_ms, 1000);
    assert_int_equal(v.updated_at_ms, 1000);
    assert_int_equal(v.opened_at_ms, 1000);
    assert_int_equal(v.wait_ms, 30000);
    assert_int_equal(v.retry_after_ms, 20000);
    assert_int_equal(v.openings, 1);
    assert_int_equal(v.rejected, 1);
    assert_int_equal(v.failures_total, 5);
    assert_int_equal(v.successes, 0);
    assert_int_equal(v.transitions[BW_BREAKER_OPEN], 1);
    assert_int_equal(v.transitions[BW_BREAKER_HALF_OPEN], 0);
    assert_int_equal(v.transitions[BW_BREAKER_CLOSED], 0);

    allow(&b, &c, 31000, &tk);
    bw_breaker_report(&b, &c, 31005, &tk, BW_BREAKER_SUCCESS, 0, NULL);
    allow(&b, &c, 31006, &tk);
    bw_breaker_snapshot(&b, &c, 31010, &v);
    assert_int_equal(v.state, BW_BREAKER_HALF_OPEN);
    assert_int_equal(v.generation, 2);
    assert_int_equal(v.since_ms, 31000);
    assert_int_equal(v.half_open_permits, 1);
    assert_int_equal(v.half_open_successes, 1);
    assert_int_equal(v.retry_after_ms, 0);
    assert_int_equal(v.probes, 2);
    assert_int_equal(v.successes, 1);
}

static void test_generation_changes_on_every_transition(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    bw_breaker_init(&b, 0);
    bw_breaker_view v;
    uint32_t gens[8];
    int n = 0;
    bw_breaker_snapshot(&b, &c, 0, &v);
    gens[n++] = v.generation;
    run(&b, &c, 0, 5, BW_BREAKER_FAILURE); /* open */
    bw_breaker_snapshot(&b, &c, 0, &v);
    gens[n++] = v.generation;
    bw_breaker_ticket tk;
    allow(&b, &c, 30000, &tk); /* half_open */
    bw_breaker_snapshot(&b, &c, 30000, &v);
    gens[n++] = v.generation;
    run(&b, &c, 30000, 3, BW_BREAKER_SUCCESS); /* permits only: no transition */
    bw_breaker_snapshot(&b, &c, 30000, &v);
    assert_int_equal(v.state, BW_BREAKER_HALF_OPEN);
    assert_int_equal(v.generation, gens[n - 1]);
    bw_breaker_report(&b, &c, 30001, &tk, BW_BREAKER_SUCCESS, 0, NULL); /* closed */
    bw_breaker_snapshot(&b, &c, 30001, &v);
    gens[n++] = v.generation;
    for (int i = 1; i < n; i++)
        assert_int_equal(gens[i], gens[i - 1] + 1);
    assert_int_equal(v.transitions[0] + v.transitions[1] + v.transitions[2], v.generation);
}

/*
 * A worker killed right after the CAS of a transition, before it wrote anything else: simulated
 * by putting back the side fields as they were before the transition.
 */
static void test_killed_after_transition_cas(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    bw_breaker_init(&b, 0);
    run(&b, &c, 10, 4, BW_BREAKER_FAILURE);
    uint64_t since = atomic_load(&b.since);
    uint64_t tally[3];
    for (int i = 0; i < 3; i++)
        tally[i] = atomic_load(&b.tally[i]);
    run(&b, &c, 20, 1, BW_BREAKER_FAILURE);
    atomic_store(&b.since, since);
    for (int i = 0; i < 3; i++)
        atomic_store(&b.tally[i], tally[i]);

    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 500, &v);
    assert_int_equal(v.state, BW_BREAKER_OPEN);
    assert_int_equal(v.transitions[BW_BREAKER_OPEN], 1);
    /* The first caller after the crash starts the open period from its own clock. */
    uint64_t ra = 0;
    bw_breaker_ticket tk;
    assert_int_equal(bw_breaker_allow(&b, &c, 500, PROBE_TIMEOUT, &tk, &ra, NULL),
                     BW_BREAKER_REJECT);
    assert_int_equal(ra, 30000);
    assert_int_equal(allow(&b, &c, 30499, &tk), BW_BREAKER_REJECT);
    assert_int_equal(allow(&b, &c, 30500, &tk), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_snapshot(&b, &c, 30500, &v);
    assert_int_equal(v.transitions[BW_BREAKER_OPEN], 1);
    assert_int_equal(v.transitions[BW_BREAKER_HALF_OPEN], 1);
    bw_breaker_report(&b, &c, 30500, &tk, BW_BREAKER_SUCCESS, 0, NULL);
    bw_breaker_snapshot(&b, &c, 30500, &v);
    assert_int_equal(v.transitions[BW_BREAKER_CLOSED], 1);
    assert_int_equal(v.transitions[0] + v.transitions[1] + v.transitions[2], v.generation);
}

/* Same, for the half-open lease: the permit holder died before writing it. */
static void test_killed_before_lease_written(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    open_at(&b, &c, 0);
    uint64_t lease = atomic_load(&b.lease);
    bw_breaker_ticket dead, tk;
    assert_int_equal(allow(&b, &c, 30000, &dead), BW_BREAKER_ALLOW_PROBE);
    atomic_store(&b.lease, lease);
    /* The first caller to find every permit out and no lease starts one. */
    assert_int_equal(allow(&b, &c, 40000, &tk), BW_BREAKER_REJECT);
    assert_int_equal(allow(&b, &c, 40000 + PROBE_TIMEOUT - 1, &tk), BW_BREAKER_REJECT);
    assert_int_equal(allow(&b, &c, 40000 + PROBE_TIMEOUT, &tk), BW_BREAKER_ALLOW_PROBE);
}

static void test_zero_limits_are_clamped(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    c.half_open_max_requests = 0;
    c.half_open_success_threshold = 0;
    open_at(&b, &c, 0);
    bw_breaker_ticket tk, tk2;
    assert_int_equal(allow(&b, &c, 30000, &tk), BW_BREAKER_ALLOW_PROBE);
    assert_int_equal(allow(&b, &c, 30000, &tk2), BW_BREAKER_REJECT);
    bw_breaker_report(&b, &c, 30000, &tk, BW_BREAKER_SUCCESS, 0, NULL);
    assert_int_equal(state_of(&b, &c, 30000), BW_BREAKER_CLOSED);
}

static void test_describe_all_causes(void **state)
{
    (void)state;
    bw_breaker_transition t = {0};
    char buf[128];
    t.happened = true;
    t.from = BW_BREAKER_OPEN;
    t.to = BW_BREAKER_HALF_OPEN;
    t.cause = BW_BREAKER_CAUSE_TIMEOUT;
    t.wait_ms = 30000;
    bw_breaker_describe(&t, buf, sizeof(buf));
    assert_string_equal(buf, "open -> half_open after 30000 ms open");
    t.from = BW_BREAKER_HALF_OPEN;
    t.to = BW_BREAKER_CLOSED;
    t.cause = BW_BREAKER_CAUSE_PROBE_OK;
    t.successes = 1;
    bw_breaker_describe(&t, buf, sizeof(buf));
    assert_string_equal(buf, "half_open -> closed after 1 successful probes");
    t.to = BW_BREAKER_OPEN;
    t.cause = BW_BREAKER_CAUSE_PROBE_FAIL;
    t.wait_ms = 60000;
    bw_breaker_describe(&t, buf, sizeof(buf));
    assert_string_equal(buf, "half_open -> open after a failed probe, open for 60000 ms");
    t.cause = BW_BREAKER_CAUSE_FORCED;
    bw_breaker_describe(&t, buf, sizeof(buf));
    assert_string_equal(buf, "half_open -> open as seen by the fleet");
}

/* Stress: processes sharing one record, one killed mid-run. */

#define STRESS_WORKERS 4
#define STRESS_MS 500

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static bw_breaker_conf conf_stress(void)
{
    bw_breaker_conf c = conf_default();
    c.failure_threshold = 4;
    c.reset_timeout_ms = 1;
    c.max_reset_timeout_ms = 8;
    c.half_open_max_requests = 3;
    c.half_open_success_threshold = 2;
    c.failure_rate_percent = 30;
    c.window_ms = 50;
    c.min_requests = 20;
    return c;
}

#define STRESS_PROBE_TIMEOUT 3

static void stress_worker(bw_breaker *b, unsigned seed)
{
    bw_breaker_conf c = conf_stress();
    uint64_t end = mono_ms() + STRESS_MS;
    uint64_t now;
    while ((now = mono_ms()) < end) {
        bw_breaker_ticket tk;
        bw_breaker_decision d = bw_breaker_allow(b, &c, now, STRESS_PROBE_TIMEOUT, &tk, NULL, NULL);
        if (d == BW_BREAKER_REJECT)
            continue;
        unsigned r = (unsigned)rand_r(&seed);
        bw_breaker_outcome o = r % 100 < 25 ? BW_BREAKER_FAILURE : BW_BREAKER_SUCCESS;
        if (r % 1000 == 0)
            o = BW_BREAKER_SLOW;
        /* Some probes are simply never answered, like a worker dying with its permit. */
        if (d == BW_BREAKER_ALLOW_PROBE && r % 3 == 1)
            continue;
        bw_breaker_report(b, &c, mono_ms(), &tk, o, (uint32_t)rand_r(&seed), NULL);
    }
}

static void check_invariants(const bw_breaker *b, const bw_breaker_conf *c, uint64_t now)
{
    bw_breaker_view v;
    bw_breaker_snapshot(b, c, now, &v);
    assert_true(v.state <= BW_BREAKER_HALF_OPEN);
    assert_true(v.half_open_permits <= c->half_open_max_requests);
    assert_true(v.half_open_successes < c->half_open_success_threshold);
    uint64_t to_closed = v.transitions[BW_BREAKER_CLOSED];
    uint64_t to_open = v.transitions[BW_BREAKER_OPEN];
    uint64_t to_half = v.transitions[BW_BREAKER_HALF_OPEN];
    /* Every half_open came from an open, every close (no resets here) from a half_open, and
     * every open from the initial closed state or a later close or half_open. */
    assert_true(to_half <= to_open);
    assert_true(to_closed <= to_half);
    assert_true(to_open <= to_closed + to_half + 1);
    /* Each transition counted exactly once, whatever the kill interrupted. */
    assert_int_equal((to_closed + to_open + to_half) & 0x1FFFFFF, v.generation);
    assert_true(v.wait_ms <= c->max_reset_timeout_ms);
}

static void test_stress_processes_with_kill(void **state)
{
    (void)state;
    bw_breaker_conf c = conf_stress();
    bw_breaker *b =
        mmap(NULL, sizeof(*b), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(b != MAP_FAILED);
    bw_breaker_init(b, mono_ms());

    pid_t pids[STRESS_WORKERS];
    for (int i = 0; i < STRESS_WORKERS; i++) {
        pids[i] = fork();
        assert_true(pids[i] >= 0);
        if (pids[i] == 0) {
            stress_worker(b, (unsigned)(i + 1) * 7919u);
            _exit(0);
        }
    }
    usleep(STRESS_MS * 1000 / 2);
    assert_int_equal(kill(pids[0], SIGKILL), 0);
    for (int i = 0; i < STRESS_WORKERS; i++) {
        int status = 0;
        assert_int_equal(waitpid(pids[i], &status, 0), pids[i]);
        if (i == 0)
            assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
        else
            assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }

    uint64_t now = mono_ms();
    check_invariants(b, &c, now);
    bw_breaker_view v;
    bw_breaker_snapshot(b, &c, now, &v);
    assert_true(v.transitions[BW_BREAKER_OPEN] > 0);
    assert_true(v.transitions[BW_BREAKER_CLOSED] > 0);

    /* Not stuck: after the longest open period and a lease, a survivor gets a probe, and
     * successful probes close the breaker. */
    now += c.max_reset_timeout_ms + STRESS_PROBE_TIMEOUT + 1;
    for (int i = 0; i < 10 && state_of(b, &c, now) != BW_BREAKER_CLOSED; i++) {
        bw_breaker_ticket tk;
        bw_breaker_decision d = bw_breaker_allow(b, &c, now, STRESS_PROBE_TIMEOUT, &tk, NULL, NULL);
        assert_int_not_equal(d, BW_BREAKER_REJECT);
        bw_breaker_report(b, &c, now, &tk, BW_BREAKER_SUCCESS, 0, NULL);
    }
    assert_int_equal(state_of(b, &c, now), BW_BREAKER_CLOSED);
    check_invariants(b, &c, now);
    munmap(b, sizeof(*b));
}

/* Operator maintenance: held open whatever the timers and late outcomes do, until reset. */
static void test_forced_open(void **state)
{
    (void)state;
    bw_breaker b;
    bw_breaker_conf c = conf_default();
    bw_breaker_init(&b, 1000);
    bw_breaker_ticket early;
    assert_int_equal(allow(&b, &c, 1000, &early), BW_BREAKER_ALLOW);
    bw_breaker_transition t = {0};
    assert_true(bw_breaker_force_open(&b, &c, 0, 2000, &t));
    assert_true(t.happened);
    assert_int_equal(t.to, BW_BREAKER_OPEN);
    assert_false(bw_breaker_force_open(&b, &c, 0, 2100, NULL)); /* already forced */
    assert_true(bw_breaker_is_forced(&b));
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 2000, &v);
    assert_true(v.forced);
    assert_int_equal(v.forced_at_ms, 2000);
    assert_int_equal(v.state, BW_BREAKER_OPEN);
    /* Far past the reset timeout: no half-open probe, every request refused. */
    uint64_t retry = 0;
    bw_breaker_ticket tk;
    for (uint64_t now = 2000; now < 2000 + 10 * 300000; now += 30000)
        assert_int_equal(bw_breaker_allow(&b, &c, now, PROBE_TIMEOUT, &tk, &retry, NULL),
                         BW_BREAKER_REJECT);
    assert_int_equal(retry, c.reset_timeout_ms);
    /* Time passing with no traffic (the master's tick) and passing health checks leave it
     * open too: only a reset ends maintenance. */
    for (uint64_t now = 2000; now < 2000 + 10 * 300000; now += 30000) {
        assert_false(bw_breaker_tick(&b, &c, now, NULL));
        assert_false(bw_breaker_check_passed(&b, &c, now, NULL));
    }
    bw_breaker_snapshot(&b, &c, 2000 + 10 * 300000, &v);
    assert_int_equal(v.state, BW_BREAKER_OPEN);
    /* A late success of a request admitted before cannot close it either. */
    bw_breaker_report(&b, &c, 5000, &early, BW_BREAKER_SUCCESS, 0, NULL);
    bw_breaker_snapshot(&b, &c, 5000, &v);
    assert_true(v.forced);
    assert_int_equal(v.state, BW_BREAKER_OPEN);
    assert_true(v.rejected >= 100);
    /* The fleet telling it "closed" does not lift maintenance; only a reset does. */
    bw_breaker_force(&b, &c, BW_BREAKER_CLOSED, 0, 6000, NULL);
    assert_int_equal(allow(&b, &c, 6000, &tk), BW_BREAKER_REJECT);
    bw_breaker_reset(&b, 7000, NULL);
    assert_false(bw_breaker_is_forced(&b));
    assert_int_equal(allow(&b, &c, 7000, &tk), BW_BREAKER_ALLOW);
    bw_breaker_snapshot(&b, &c, 7000, &v);
    assert_false(v.forced);
    assert_int_equal(v.state, BW_BREAKER_CLOSED);
    /* A forced time from the fleet is kept as given. */
    assert_true(bw_breaker_force_open(&b, &c, 6500, 8000, NULL));
    bw_breaker_snapshot(&b, &c, 8000, &v);
    assert_int_equal(v.forced_at_ms, 6500);
}

/* Recovery without traffic: tick() moves open to half_open once the wait is over, taking no
 * permit, and exactly once however many callers race; before the wait it does nothing. */
static void test_tick_moves_to_half_open_without_requests(void **state)
{
    (void)state;
    bw_breaker_conf c = conf_default();
    bw_breaker b;
    open_at(&b, &c, 1000);
    bw_breaker_transition t;
    assert_false(bw_breaker_tick(&b, &c, 1000 + 29999, &t));
    assert_false(t.happened);
    assert_int_equal(state_of(&b, &c, 1000 + 29999), BW_BREAKER_OPEN);
    assert_true(bw_breaker_tick(&b, &c, 1000 + 30000, &t));
    assert_true(t.happened);
    assert_int_equal(t.from, BW_BREAKER_OPEN);
    assert_int_equal(t.to, BW_BREAKER_HALF_OPEN);
    assert_int_equal(t.cause, BW_BREAKER_CAUSE_TIMEOUT);
    assert_false(bw_breaker_tick(&b, &c, 1000 + 30001, &t));
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 31001, &v);
    assert_int_equal(v.state, BW_BREAKER_HALF_OPEN);
    assert_int_equal(v.half_open_permits, 0);
    assert_int_equal(v.transitions[BW_BREAKER_HALF_OPEN], 1);
    /* The first request after the tick is the probe, and its success closes the breaker. */
    bw_breaker_ticket tk;
    assert_int_equal(allow(&b, &c, 31002, &tk), BW_BREAKER_ALLOW_PROBE);
    bw_breaker_report(&b, &c, 31003, &tk, BW_BREAKER_SUCCESS, 0, &t);
    assert_int_equal(t.to, BW_BREAKER_CLOSED);
    /* tick() leaves closed and half_open breakers alone. */
    assert_false(bw_breaker_tick(&b, &c, 99999, NULL));
    assert_int_equal(state_of(&b, &c, 99999), BW_BREAKER_CLOSED);
}

/* A probe whose client went away gives its permit back: the next request probes at once
 * instead of waiting a whole lease (probe_timeout_ms). A stale or non-probe ticket is a no-op. */
static void test_release_returns_the_probe_permit(void **state)
{
    (void)state;
    bw_breaker_conf c = conf_default();
    bw_breaker b;
    open_at(&b, &c, 0);
    bw_breaker_ticket tk, tk2;
    assert_int_equal(allow(&b, &c, 30000, &tk), BW_BREAKER_ALLOW_PROBE);
    assert_int_equal(allow(&b, &c, 30001, &tk2), BW_BREAKER_REJECT);
    bw_breaker_release(&b, &tk, 30002);
    assert_int_equal(allow(&b, &c, 30003, &tk2), BW_BREAKER_ALLOW_PROBE);
    /* (Permits are counted, not named: the caller releases a ticket at most once.) */
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 30004, &v);
    assert_int_equal(v.half_open_permits, 1);
    bw_breaker_ticket closed_tk = {
        .generation = tk2.generation, .round = tk2.round, .probe = false};
    bw_breaker_release(&b, &closed_tk, 30005);
    bw_breaker_snapshot(&b, &c, 30005, &v);
    assert_int_equal(v.half_open_permits, 1);
    bw_breaker_transition t;
    bw_breaker_report(&b, &c, 30006, &tk2, BW_BREAKER_SUCCESS, 0, &t);
    assert_int_equal(t.to, BW_BREAKER_CLOSED);
    /* A ticket of the half-open period that is over changes nothing in the closed one. */
    bw_breaker_release(&b, &tk2, 30007);
    assert_int_equal(state_of(&b, &c, 30007), BW_BREAKER_CLOSED);
}

/* Passing active checks count as probe successes: with a threshold of 2, the check that finds
 * the wait over moves to half_open, and two more passing checks close it, with no request. */
static void test_check_passed_counts_as_probe(void **state)
{
    (void)state;
    bw_breaker_conf c = conf_default();
    c.half_open_success_threshold = 2;
    bw_breaker b;
    open_at(&b, &c, 0);
    bw_breaker_transition t;
    assert_false(bw_breaker_check_passed(&b, &c, 100, &t)); /* still inside the open period */
    assert_int_equal(state_of(&b, &c, 100), BW_BREAKER_OPEN);
    assert_true(bw_breaker_check_passed(&b, &c, 30000, &t));
    assert_int_equal(t.to, BW_BREAKER_HALF_OPEN);
    assert_false(bw_breaker_check_passed(&b, &c, 30100, &t));
    assert_int_equal(state_of(&b, &c, 30100), BW_BREAKER_HALF_OPEN);
    assert_true(bw_breaker_check_passed(&b, &c, 30200, &t));
    assert_int_equal(t.to, BW_BREAKER_CLOSED);
    assert_int_equal(t.cause, BW_BREAKER_CAUSE_PROBE_OK);
    assert_false(bw_breaker_check_passed(&b, &c, 30300, &t));
    assert_int_equal(state_of(&b, &c, 30300), BW_BREAKER_CLOSED);
}

/* The clock the proxy passes is monotonic and starts wherever the host's uptime is; nothing in
 * the record depends on the wall clock, so an open period lasts reset_timeout_ms of the clock
 * it was opened with, and the lease of a dead probe holder expires after probe_timeout_ms. */
static void test_monotonic_clock_is_what_counts(void **state)
{
    (void)state;
    uint64_t a = bw_breaker_now_ms();
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
    uint64_t b_ms = bw_breaker_now_ms();
    assert_true(b_ms >= a + 1);
    struct timespec mono;
    clock_gettime(CLOCK_MONOTONIC, &mono);
    uint64_t m = (uint64_t)mono.tv_sec * 1000u + (uint64_t)mono.tv_nsec / 1000000u;
    assert_true(m >= b_ms && m - b_ms < 1000);

    bw_breaker_conf c = conf_default();
    bw_breaker b;
    open_at(&b, &c, 5000);
    bw_breaker_ticket tk;
    uint64_t ra = 0;
    assert_int_equal(bw_breaker_allow(&b, &c, 5000 + 29000, PROBE_TIMEOUT, &tk, &ra, NULL),
                     BW_BREAKER_REJECT);
    assert_int_equal(ra, 1000);
    assert_int_equal(bw_breaker_retry_after_s(ra), 1);
    assert_int_equal(allow(&b, &c, 35000, &tk), BW_BREAKER_ALLOW_PROBE);
    /* The holder dies: the permit comes back after exactly one probe timeout. */
    assert_int_equal(allow(&b, &c, 35000 + PROBE_TIMEOUT - 1, &tk), BW_BREAKER_REJECT);
    assert_int_equal(allow(&b, &c, 35000 + PROBE_TIMEOUT, &tk), BW_BREAKER_ALLOW_PROBE);
}

/* Following a fleet record: the fleet's level and jitter decide the open period, a remote
 * half_open leaves this record open, and the follower's own period starts delay_ms later. */
static void test_follow_keeps_fleet_backoff(void **state)
{
    (void)state;
    bw_breaker_conf c = conf_default();
    c.reset_timeout_ms = 1000;
    c.max_reset_timeout_ms = 60000;
    bw_breaker b;
    bw_breaker_init(&b, 1000);
    bw_breaker_transition t;
    /* The fleet is at level 3 (4 s) with 50 permille of jitter (200 ms), opened at 5000. */
    assert_true(bw_breaker_follow(&b, &c, BW_BREAKER_OPEN, 5000, 300, 3, 50, 6000, &t));
    assert_true(t.happened);
    assert_int_equal(t.to, BW_BREAKER_OPEN);
    bw_breaker_view v;
    bw_breaker_snapshot(&b, &c, 6000, &v);
    assert_int_equal(v.state, BW_BREAKER_OPEN);
    assert_int_equal(v.openings, 3);
    assert_int_equal(v.opened_at_ms, 5000);
    assert_int_equal(v.wait_ms, 4200);
    assert_int_equal(v.retry_after_ms, 5000 + 300 + 4200 - 6000);
    unsigned level, jitter;
    bw_breaker_backoff(&b, &level, &jitter);
    assert_int_equal(level, 3);
    assert_int_equal(jitter, 50);
    /* The same record again: nothing. */
    assert_false(bw_breaker_follow(&b, &c, BW_BREAKER_OPEN, 5000, 200, 3, 50, 6100, &t));
    /* Another instance went half_open: this one keeps waiting out its own period. */
    assert_false(bw_breaker_follow(&b, &c, BW_BREAKER_HALF_OPEN, 5000, 200, 3, 50, 9000, &t));
    bw_breaker_ticket tk;
    assert_int_equal(allow(&b, &c, 9400, &tk), BW_BREAKER_REJECT);
    assert_int_equal(allow(&b, &c, 9500, &tk), BW_BREAKER_ALLOW_PROBE);
    /* Half-open here too: a remote half_open changes nothing, a remote re-opening wins. */
    assert_false(bw_breaker_follow(&b, &c, BW_BREAKER_HALF_OPEN, 5000, 200, 3, 50, 9600, &t));
    assert_true(bw_breaker_follow(&b, &c, BW_BREAKER_OPEN, 9550, 0, 4, 10, 9600, &t));
    bw_breaker_snapshot(&b, &c, 9600, &v);
    assert_int_equal(v.state, BW_BREAKER_OPEN);
    assert_int_equal(v.openings, 4);
    assert_int_equal(v.wait_ms, 8080);
    /* A probe outcome of the old round is stale. */
    bw_breaker_report(&b, &c, 9700, &tk, BW_BREAKER_SUCCESS, 0, &t);
    assert_false(t.happened);
    /* Closed in the fleet: closed here, backoff cleared. */
    assert_true(bw_breaker_follow(&b, &c, BW_BREAKER_CLOSED, 0, 0, 0, 0, 9800, &t));
    bw_breaker_backoff(&b, &level, &jitter);
    assert_int_equal(level, 0);
    /* A record without a level (older writers): level 1, as a fresh opening. */
    assert_true(bw_breaker_follow(&b, &c, BW_BREAKER_HALF_OPEN, 9900, 0, 0, 0, 10000, &t));
    bw_breaker_snapshot(&b, &c, 10000, &v);
    assert_int_equal(v.state, BW_BREAKER_OPEN);
    assert_int_equal(v.openings, 1);
    /* An opening time in the future (a clock ahead) counts from now. */
    assert_true(bw_breaker_follow(&b, &c, BW_BREAKER_OPEN, 99999, 0, 2, 0, 10100, &t));
    bw_breaker_snapshot(&b, &c, 10100, &v);
    assert_int_equal(v.opened_at_ms, 10100);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_atomics_lock_free),
        cmocka_unit_test(test_init_closed_allows),
        cmocka_unit_test(test_state_names_and_metric),
        cmocka_unit_test(test_threshold_minus_one_stays_closed),
        cmocka_unit_test(test_threshold_opens),
        cmocka_unit_test(test_threshold_one),
        cmocka_unit_test(test_success_resets_consecutive),
        cmocka_unit_test(test_open_rejects_with_retry_after),
        cmocka_unit_test(test_retry_after_seconds),
        cmocka_unit_test(test_open_to_half_open_at_reset_timeout),
        cmocka_unit_test(test_single_half_open_transition_when_racing),
        cmocka_unit_test(test_half_open_permits_across_workers),
        cmocka_unit_test(test_half_open_closes_after_successes),
        cmocka_unit_test(test_success_frees_permit),
        cmocka_unit_test(test_probe_failure_reopens_doubled),
        cmocka_unit_test(test_backoff_caps_at_max),
        cmocka_unit_test(test_backoff_many_openings_stays_capped),
        cmocka_unit_test(test_close_resets_backoff),
        cmocka_unit_test(test_jitter_bounds),
        cmocka_unit_test(test_first_open_has_no_jitter),
        cmocka_unit_test(test_lease_expiry_frees_leaked_permit),
        cmocka_unit_test(test_lease_extended_by_activity),
        cmocka_unit_test(test_stale_probe_after_lease_ignored),
        cmocka_unit_test(test_stale_outcomes_while_open_ignored),
        cmocka_unit_test(test_stale_failure_after_close_ignored),
        cmocka_unit_test(test_failure_rate_opens_with_volume),
        cmocka_unit_test(test_failure_rate_below_min_never_opens),
        cmocka_unit_test(test_failure_rate_below_percent),
        cmocka_unit_test(test_failure_rate_off_when_zero),
        cmocka_unit_test(test_failure_rate_window_slides),
        cmocka_unit_test(test_failure_rate_window_fresh_after_close),
        cmocka_unit_test(test_slow_call_classification),
        cmocka_unit_test(test_slow_calls_open),
        cmocka_unit_test(test_failure_statuses),
        cmocka_unit_test(test_manual_reset_from_open),
        cmocka_unit_test(test_manual_reset_half_open_and_closed),
        cmocka_unit_test(test_reset_closed_clears_window),
        cmocka_unit_test(test_force_open_uses_fleet_time),
        cmocka_unit_test(test_force_closed_and_half_open),
        cmocka_unit_test(test_snapshot_contents),
        cmocka_unit_test(test_generation_changes_on_every_transition),
        cmocka_unit_test(test_killed_after_transition_cas),
        cmocka_unit_test(test_killed_before_lease_written),
        cmocka_unit_test(test_zero_limits_are_clamped),
        cmocka_unit_test(test_describe_all_causes),
        cmocka_unit_test(test_forced_open),
        cmocka_unit_test(test_follow_keeps_fleet_backoff),
        cmocka_unit_test(test_stress_processes_with_kill),
        cmocka_unit_test(test_tick_moves_to_half_open_without_requests),
        cmocka_unit_test(test_release_returns_the_probe_permit),
        cmocka_unit_test(test_check_passed_counts_as_probe),
        cmocka_unit_test(test_monotonic_clock_is_what_counts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
