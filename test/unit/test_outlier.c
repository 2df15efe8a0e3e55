/*
 * Unit tests of per-server outlier ejection and health records: ejection at the threshold, the
 * growing and capped ejection time, the max_ejection_percent cap (one server always stays in),
 * the backoff forgotten after a healthy period, active-check thresholds, and binding records to
 * addresses across reloads. All on an injected clock.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "breakwater/outlier.h"

static bw_outlier_conf conf_default(void)
{
    bw_outlier_conf c = {.consecutive_failures = 5,
                         .base_ejection_ms = 30000,
                         .max_ejection_ms = 300000,
                         .max_ejection_percent = 50};
    return c;
}

typedef struct fixture {
    bw_outlier_group *g;
    bw_outlier_server *pool[4];
} fixture;

static fixture make(size_t n)
{
    fixture f;
    memset(&f, 0, sizeof(f));
    f.g = calloc(1, sizeof(*f.g));
    assert_non_null(f.g);
    bw_outlier_group_init(f.g);
    for (size_t i = 0; i < n; i++)
        f.pool[i] = &f.g->servers[i];
    return f;
}

/* n failures at time now; returns how many of them ejected the server. */
static int fail_n(fixture *f, size_t n_pool, size_t who, const bw_outlier_conf *c, uint64_t now,
                  int n, uint64_t *dur)
{
    int ejected = 0;
    for (int i = 0; i < n; i++)
        ejected += bw_outlier_failure(f->pool[who], f->pool, n_pool, c, now, dur) ? 1 : 0;
    return ejected;
}

static void test_ejected_at_threshold_for_base_then_back(void **state)
{
    (void)state;
    bw_outlier_conf c = conf_default();
    fixture f = make(2);
    uint64_t dur = 0;
    assert_int_equal(fail_n(&f, 2, 0, &c, 1000, 4, &dur), 0);
    assert_true(bw_outlier_available(f.pool[0], 1000));
    assert_int_equal(fail_n(&f, 2, 0, &c, 1000, 1, &dur), 1);
    assert_int_equal(dur, 30000);
    assert_false(bw_outlier_available(f.pool[0], 1000));
    assert_false(bw_outlier_available(f.pool[0], 30999));
    assert_true(bw_outlier_available(f.pool[0], 31000));
    assert_true(bw_outlier_available(f.pool[1], 1000));
    bw_outlier_view v;
    bw_outlier_snapshot(f.pool[0], 2000, &v);
    assert_true(v.ejected);
    assert_false(v.healthy);
    assert_int_equal(v.ejected_until, 31000);
    assert_int_equal(v.consecutive_failures, 0);
    assert_int_equal(atomic_load(&f.pool[0]->ejections_total), 1);
    /* Failures while ejected are not counted (they come from requests already in flight). */
    assert_int_equal(fail_n(&f, 2, 0, &c, 2000, 10, &dur), 0);
    bw_outlier_snapshot(f.pool[0], 2000, &v);
    assert_int_equal(v.consecutive_failures, 0);
    /* A success resets the count. */
    fail_n(&f, 2, 1, &c, 2000, 4, &dur);
    bw_outlier_success(f.pool[1], &c, 2000);
    assert_int_equal(fail_n(&f, 2, 1, &c, 2000, 4, &dur), 0);
    free(f.g);
}

static void test_ejection_grows_with_ejections_in_a_row_and_is_capped(void **state)
{
    (void)state;
    bw_outlier_conf c = conf_default();
    c.max_ejection_ms = 100000;
    fixture f = make(2);
    uint64_t now = 0, dur = 0;
    uint64_t want[] = {30000, 60000, 90000, 100000, 100000};
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        assert_int_equal(fail_n(&f, 2, 0, &c, now, 5, &dur), 1);
        assert_int_equal(dur, want[i]);
        now += dur; /* it comes back and fails again at once */
    }
    /* A success a whole base period after the ejection ended forgets the level. */
    bw_outlier_success(f.pool[0], &c, now + 29999);
    assert_int_equal(atomic_load(&f.pool[0]->ejections), 5);
    bw_outlier_success(f.pool[0], &c, now + 30000);
    assert_int_equal(atomic_load(&f.pool[0]->ejections), 0);
    assert_int_equal(fail_n(&f, 2, 0, &c, now + 30000, 5, &dur), 1);
    assert_int_equal(dur, 30000);
    free(f.g);
}

static void test_max_ejection_percent_keeps_servers_in(void **state)
{
    (void)state;
    bw_outlier_conf c = conf_default();
    uint64_t dur;
    /* Two servers at 50%: one may go, the other stays whatever it does. */
    fixture f = make(2);
    assert_int_equal(fail_n(&f, 2, 0, &c, 0, 5, &dur), 1);
    assert_int_equal(fail_n(&f, 2, 1, &c, 0, 50, &dur), 0);
    assert_true(bw_outlier_available(f.pool[1], 0));
    /* Once the first is back, the second may be ejected (its count kept growing). */
    assert_int_equal(fail_n(&f, 2, 1, &c, 30000, 1, &dur), 1);
    free(f.g);

    /* One server: never ejected, even at 100%. */
    c.max_ejection_percent = 100;
    f = make(1);
    assert_int_equal(fail_n(&f, 1, 0, &c, 0, 100, &dur), 0);
    assert_true(bw_outlier_available(f.pool[0], 0));
    free(f.g);

    /* Four servers at 100%: three may go, the last stays. */
    f = make(4);
    for (size_t i = 0; i < 3; i++)
        assert_int_equal(fail_n(&f, 4, i, &c, 0, 5, &dur), 1);
    assert_int_equal(fail_n(&f, 4, 3, &c, 0, 50, &dur), 0);
    free(f.g);

    /* 0%: detection counts but never ejects. */
    c.max_ejection_percent = 0;
    f = make(4);
    assert_int_equal(fail_n(&f, 4, 0, &c, 0, 50, &dur), 0);
    free(f.g);

    /* consecutive_failures 0 turns it off. */
    c = conf_default();
    c.consecutive_failures = 0;
    f = make(2);
    assert_int_equal(fail_n(&f, 2, 0, &c, 0, 50, &dur), 0);
    assert_int_equal(atomic_load(&f.pool[0]->failures), 50); /* counted, never ejected */
    assert_true(bw_outlier_available(f.pool[0], 0));
    free(f.g);
}

static void test_active_checks_thresholds(void **state)
{
    (void)state;
    bw_health_check_conf c = {.enabled = true, .healthy_threshold = 2, .unhealthy_threshold = 3};
    fixture f = make(1);
    bw_outlier_server *s = f.pool[0];
    assert_false(bw_outlier_check_done(s, &c, false, BW_CHECK_STATUS, 500, 10));
    assert_false(bw_outlier_check_done(s, &c, false, BW_CHECK_TIMEOUT, 0, 20));
    assert_true(bw_outlier_available(s, 0));
    assert_true(bw_outlier_check_done(s, &c, false, BW_CHECK_STATUS, 500, 30));
    assert_false(bw_outlier_available(s, 0));
    bw_outlier_view v;
    bw_outlier_snapshot(s, 0, &v);
    assert_false(v.healthy);
    assert_false(v.ejected);
    assert_true(v.check_unhealthy);
    assert_int_equal(v.check_result, BW_CHECK_STATUS);
    assert_int_equal(v.check_status, 500);
    assert_int_equal(v.check_wall_ms, 30);
    assert_false(bw_outlier_check_done(s, &c, true, BW_CHECK_PASS, 200, 40));
    /* A failure in between starts the passes again. */
    assert_false(bw_outlier_check_done(s, &c, false, BW_CHECK_CONNECT, 0, 50));
    assert_false(bw_outlier_check_done(s, &c, true, BW_CHECK_PASS, 200, 60));
    assert_true(bw_outlier_check_done(s, &c, true, BW_CHECK_PASS, 200, 70));
    assert_true(bw_outlier_available(s, 0));
    assert_string_equal(bw_check_result_name(BW_CHECK_TOO_LARGE), "too_large");
    free(f.g);
}

static void test_bind_by_address_across_reloads(void **state)
{
    (void)state;
    bw_outlier_group *g = calloc(1, sizeof(*g));
    assert_non_null(g);
    bw_outlier_group_init(g);
    const char *a[] = {"10.0.0.1:80", "10.0.0.2:80"};
    int idx[BW_OUTLIER_MAX_SERVERS];
    assert_int_equal(bw_outlier_bind(g, a, 2, 1, idx), 0);
    assert_int_not_equal(idx[0], idx[1]);
    int first = idx[0], second = idx[1];
    atomic_store(&g->servers[second].failures, 3);
    /* Reload: order changes, one server leaves, one arrives. */
    const char *b[] = {"10.0.0.3:80", "10.0.0.2:80"};
    assert_int_equal(bw_outlier_bind(g, b, 2, 2, idx), 0);
    assert_int_equal(idx[1], second);
    assert_int_equal(atomic_load(&g->servers[second].failures), 3);
    assert_int_not_equal(idx[0], second);
    assert_int_equal(atomic_load(&g->servers[idx[0]].failures), 0);
    assert_string_equal(g->servers[idx[0]].key, "10.0.0.3:80");
    /* The record of the server that left is kept while there is room. */
    assert_string_equal(g->servers[first].key, "10.0.0.1:80");
    /* A full table reuses the record unused for longest. */
    const char *many[BW_OUTLIER_MAX_SERVERS];
    char names[BW_OUTLIER_MAX_SERVERS][32];
    for (size_t i = 0; i < BW_OUTLIER_MAX_SERVERS; i++) {
        snprintf(names[i], sizeof(names[i]), "10.1.%zu.%zu:80", i / 200, i % 200);
        many[i] = names[i];
    }
    assert_int_equal(bw_outlier_bind(g, many, BW_OUTLIER_MAX_SERVERS, 3, idx), 0);
    assert_int_equal(bw_outlier_bind(g, many, BW_OUTLIER_MAX_SERVERS + 1, 4, idx), -1);
    free(g);
}

static void set_addr(struct sockaddr_storage *ss, uint32_t *len, uint32_t ip, uint16_t port)
{
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
    s4->sin_family = AF_INET;
    s4->sin_addr.s_addr = htonl(ip);
    s4->sin_port = htons(port);
    *len = sizeof(*s4);
}

/* The published set of a DNS-named upstream: readers see each new set once, with its records'
 * addresses; a server that stays keeps its record (and its state); a set being written (odd
 * sequence) is not read. */
static void test_publish_and_read_members(void **state)
{
    (void)state;
    bw_outlier_group *g = calloc(1, sizeof(*g));
    assert_non_null(g);
    bw_outlier_group_init(g);
    uint64_t seq = 0;
    uint16_t idx[BW_OUTLIER_MAX_SERVERS];
    assert_int_equal(bw_outlier_members(g, &seq, idx), -1); /* nothing published yet */

    const char *keys[] = {"10.0.0.1:80", "10.0.0.2:80"};
    struct sockaddr_storage addrs[2];
    uint32_t lens[2];
    set_addr(&addrs[0], &lens[0], 0x0A000001, 80);
    set_addr(&addrs[1], &lens[1], 0x0A000002, 80);
    assert_int_equal(bw_outlier_publish(g, keys, addrs, lens, 2, 1), 0);
    assert_int_equal(bw_outlier_members(g, &seq, idx), 2);
    assert_int_equal(seq & 1, 0);
    assert_string_equal(g->servers[idx[0]].key, "10.0.0.1:80");
    const struct sockaddr_in *a = (const struct sockaddr_in *)&g->servers[idx[1]].addr;
    assert_int_equal(ntohl(a->sin_addr.s_addr), 0x0A000002);
    assert_int_equal(bw_outlier_members(g, &seq, idx), -1); /* unchanged since */
    int kept = idx[1];
    atomic_store(&g->servers[kept].failures, 4);

    /* 10.0.0.1 leaves, 10.0.0.3 arrives: 10.0.0.2 keeps its record and state. */
    const char *keys2[] = {"10.0.0.2:80", "10.0.0.3:80"};
    set_addr(&addrs[0], &lens[0], 0x0A000002, 80);
    set_addr(&addrs[1], &lens[1], 0x0A000003, 80);
    assert_int_equal(bw_outlier_publish(g, keys2, addrs, lens, 2, 2), 0);
    assert_int_equal(bw_outlier_members(g, &seq, idx), 2);
    assert_int_equal(idx[0], kept);
    assert_int_equal(atomic_load(&g->servers[kept].failures), 4);
    assert_string_equal(g->servers[idx[1]].key, "10.0.0.3:80");

    /* A writer that died mid-write leaves the sequence odd: readers keep what they have. */
    uint64_t s0 = atomic_load(&g->members_seq);
    atomic_store(&g->members_seq, s0 | 1);
    uint64_t reader = 0;
    assert_int_equal(bw_outlier_members(g, &reader, idx), -1);
    /* The next publish repairs it. */
    assert_int_equal(bw_outlier_publish(g, keys2, addrs, lens, 1, 3), 0);
    assert_int_equal(bw_outlier_members(g, &reader, idx), 1);
    /* An empty set is a set. */
    assert_int_equal(bw_outlier_publish(g, keys2, addrs, lens, 0, 4), 0);
    assert_int_equal(bw_outlier_members(g, &reader, idx), 0);
    assert_int_equal(bw_outlier_publish(g, keys2, addrs, lens, BW_OUTLIER_MAX_SERVERS + 1, 5), -1);
    free(g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ejected_at_threshold_for_base_then_back),
        cmocka_unit_test(test_ejection_grows_with_ejections_in_a_row_and_is_capped),
        cmocka_unit_test(test_max_ejection_percent_keeps_servers_in),
        cmocka_unit_test(test_active_checks_thresholds),
        cmocka_unit_test(test_bind_by_address_across_reloads),
        cmocka_unit_test(test_publish_and_read_members),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
