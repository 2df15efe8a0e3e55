/*
 * Unit tests for src/shm.c: the layout of the shared region, binding configuration names to
 * slots across reloads (state follows the name), worker slots, and counters updated by real
 * forked processes over the MAP_SHARED mapping, including one killed with SIGKILL mid-update.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <signal.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "breakwater/shm.h"

#include "support.h"

#define NOW 1000000u

/* A configuration with upstreams named by names[0..n-1], one route to the first of them. */
static bw_config *config_with_upstreams(const char *const *names, size_t n)
{
    char text[8192];
    size_t off = (size_t)snprintf(text, sizeof text,
                                  "{\"workers\": 2, \"rate_limit_table_size\": 1024,"
                                  " \"listeners\": [{\"address\": \"127.0.0.1:8080\"}],"
                                  " \"upstreams\": {");
    for (size_t i = 0; i < n; i++)
        off += (size_t)snprintf(text + off, sizeof text - off,
                                "%s\"%s\": {\"servers\": [\"127.0.0.1:9001\"]}", i ? ", " : "",
                                names[i]);
    snprintf(text + off, sizeof text - off,
             "}, \"routes\": [{\"path_prefix\": \"/\", \"name\": \"main\", \"upstream\": \"%s\"}]}",
             names[0]);
    return bw_test_parse_config(text);
}

static const char BASE[] =
    "{\"workers\": 3, \"rate_limit_table_size\": 4096,"
    " \"listeners\": [{\"address\": \"127.0.0.1:8080\"}, {\"address\": \"127.0.0.1:8081\"}],"
    " \"upstreams\": {\"api\": {\"servers\": [\"127.0.0.1:9001\"]},"
    "                 \"web\": {\"servers\": [\"127.0.0.1:9002\"]}},"
    " \"routes\": [{\"path_prefix\": \"/api\", \"name\": \"r-api\", \"upstream\": \"api\","
    "               \"rate_limit\": \"pc\"},"
    "              {\"path_prefix\": \"/\", \"name\": \"r-web\", \"upstream\": \"web\"}],"
    " \"rate_limits\": {\"pc\": {\"key\": \"client_ip\", \"capacity\": 5, \"refill_per_sec\": 1}}}";

static bw_shm make_region(bw_config *cfg)
{
    bw_shm shm;
    char err[256] = "";
    assert_int_equal(bw_shm_create(&shm, cfg, err, sizeof err), 0);
    assert_int_equal(bw_shm_bind(&shm, cfg, 1, NOW, err, sizeof err), 0);
    return shm;
}

static void open_breaker(bw_breaker *b, const bw_breaker_conf *c, uint64_t now)
{
    for (uint32_t i = 0; i < c->failure_threshold; i++) {
        bw_breaker_ticket tk;
        assert_int_not_equal(bw_breaker_allow(b, c, now, 1000, &tk, NULL, NULL), BW_BREAKER_REJECT);
        bw_breaker_report(b, c, now, &tk, BW_BREAKER_FAILURE, 0, NULL);
    }
}

static bw_breaker_state breaker_state(const bw_breaker *b, const bw_breaker_conf *c, uint64_t now)
{
    bw_breaker_view v;
    bw_breaker_snapshot(b, c, now, &v);
    return v.state;
}

static uint64_t sum_requests(const bw_shm *shm, int route_slot, int status)
{
    uint64_t sum = 0;
    for (uint32_t w = 0; w < shm->hdr->n_worker_slots; w++)
        sum += atomic_load(&bw_shm_requests_row(shm, (int)w, route_slot)[status - 100]);
    return sum;
}

static void test_layout(void **state)
{
    (void)state;
    bw_config *cfg = bw_test_parse_config(BASE);
    bw_shm shm = make_region(cfg);
    const bw_shm_header *h = shm.hdr;

    assert_int_equal(h->magic, BW_SHM_MAGIC);
    assert_int_equal(h->version, BW_SHM_VERSION);
    assert_int_equal(h->size, shm.size);
    assert_int_equal(h->n_upstream_slots, 16); /* max(16, 2 * 2 + 8) */
    assert_int_equal(h->n_route_slots, 16);
    assert_int_equal(h->n_policy_slots, 16);
    assert_int_equal(h->n_listener_slots, 16);
    assert_int_equal(h->n_worker_slots, 2 * 3 + 4);
    assert_int_equal(h->rl_entries, 4096);
    assert_int_equal(h->worker_slot_size % 64, 0);

    const uint64_t offs[] = {h->off_upstreams, h->off_routes,  h->off_policies,
                             h->off_listeners, h->off_workers, h->off_ratelimit};
    const uint64_t ends[] = {
        h->off_upstreams + h->n_upstream_slots * sizeof(bw_shm_upstream),
        h->off_routes + h->n_route_slots * sizeof(bw_shm_route),
        h->off_policies + h->n_policy_slots * sizeof(bw_shm_named),
        h->off_listeners + h->n_listener_slots * sizeof(bw_shm_named),
        h->off_workers + h->n_worker_slots * h->worker_slot_size,
        h->off_ratelimit + bw_ratelimit_table_size_bytes(h->rl_entries),
    };
    assert_true(offs[0] >= sizeof(bw_shm_header));
    for (size_t i = 0; i < 6; i++) {
        assert_int_equal(offs[i] % 64, 0);
        assert_true(ends[i] <= h->size);
        if (i > 0)
            assert_true(offs[i] >= ends[i - 1]); /* sections do not overlap */
    }
    assert_int_equal((uintptr_t)shm.base % 64, 0);
    assert_non_null(bw_ratelimit_table_attach(bw_shm_ratelimit(&shm)));
    assert_int_equal(bw_ratelimit_table_check(bw_shm_ratelimit(&shm)), 0);

    /* Every counter cell of the last worker slot lies inside the region. */
    int last = (int)h->n_worker_slots - 1;
    char *end = (char *)shm.base + h->size;
    assert_true((char *)(bw_shm_requests_row(&shm, last, -1) + BW_METRICS_CODES) <= end);
    assert_true((char *)(bw_shm_connections_cell(&shm, last, 15) + 1) <= end);
    assert_true((char *)(bw_shm_upstream_counters(&shm, last, 15) + 1) <= end);
    assert_null(bw_shm_requests_row(&shm, last + 1, 0));
    assert_null(bw_shm_requests_row(&shm, 0, 16));
    assert_null(bw_shm_breaker(&shm, 16));
    assert_null(bw_shm_breaker(&shm, -1));
    assert_null(bw_shm_worker(&shm, last + 1));

    /* A fresh region has a non-zero seed for the rate-limit hash. */
    assert_true(h->rl_seed.k0 != 0 || h->rl_seed.k1 != 0);

    bw_shm_destroy(&shm);
    assert_null(shm.base);
    bw_config_free(cfg);
}

static void test_fleet_table_with_redis(void **state)
{
    (void)state;
    bw_config *plain = bw_test_parse_config(BASE);
    bw_shm a = make_region(plain);
    assert_false(bw_ratelimit_fleet_enabled(bw_shm_ratelimit(&a)));

    /* With Redis the table carries its fleet area, and it still fits in the region. */
    char text[sizeof BASE + 128];
    snprintf(text, sizeof text, "%.*s, \"redis\": {\"url\": \"redis://127.0.0.1:6379/0\"}}",
             (int)strlen(BASE) - 1, BASE);
    bw_config *cfg = bw_test_parse_config(text);
    bw_shm b = make_region(cfg);
    const bw_shm_header *h = b.hdr;
    assert_true(bw_ratelimit_fleet_enabled(bw_shm_ratelimit(&b)));
    assert_int_equal(bw_ratelimit_table_entries(bw_shm_ratelimit(&b)), 4096);
    assert_true(h->off_ratelimit + bw_ratelimit_table_size_bytes_fleet(h->rl_entries) <= h->size);
    assert_true(b.size > a.size);
    assert_int_equal(bw_ratelimit_table_check(bw_shm_ratelimit(&b)), 0);

    bw_shm_destroy(&a);
    bw_shm_destroy(&b);
    bw_config_free(plain);
    bw_config_free(cfg);
}

static void test_headroom_scales(void **state)
{
    (void)state;
    const char *names[12] = {"u0", "u1", "u2", "u3", "u4",  "u5",
                             "u6", "u7", "u8", "u9", "u10", "u11"};
    bw_config *cfg = config_with_upstreams(names, 12);
    bw_shm shm = make_region(cfg);
    assert_int_equal(shm.hdr->n_upstream_slots, 2 * 12 + 8);
    assert_int_equal(shm.hdr->n_worker_slots, 2 * 2 + 4);
    for (size_t i = 0; i < 12; i++) {
        int s = cfg->upstreams[i].shm_slot;
        assert_true(s >= 0 && s < 32);
        assert_string_equal(bw_shm_upstream_at(&shm, s)->id.name, cfg->upstreams[i].name);
        for (size_t j = 0; j < i; j++)
            assert_int_not_equal(s, cfg->upstreams[j].shm_slot);
    }
    bw_shm_destroy(&shm);
    bw_config_free(cfg);
}

static void test_bind_records_names(void **state)
{
    (void)state;
    bw_config *cfg = bw_test_parse_config(BASE);
    bw_shm shm = make_region(cfg);

    int api = cfg->upstreams[bw_config_find_upstream(cfg, "api")].shm_slot;
    assert_string_equal(bw_shm_upstream_at(&shm, api)->id.name, "api");
    assert_int_equal(atomic_load(&bw_shm_upstream_at(&shm, api)->id.generation), 1);
    for (size_t i = 0; i < cfg->n_routes; i++) {
        bw_shm_route *r = bw_shm_route_at(&shm, cfg->routes[i].shm_slot);
        assert_string_equal(r->id.name, cfg->routes[i].name);
        assert_string_equal(r->upstream, cfg->upstreams[cfg->routes[i].upstream].name);
    }
    assert_string_equal(bw_shm_policy_at(&shm, cfg->rate_limits[0].shm_slot)->name, "pc");
    assert_string_equal(bw_shm_listener_at(&shm, cfg->listeners[1].shm_slot)->name,
                        "127.0.0.1:8081");
    assert_int_equal(atomic_load(&shm.hdr->status.config_generation), 1);

    /* Binding the same configuration again changes no slot. */
    int before[2] = {cfg->routes[0].shm_slot, cfg->routes[1].shm_slot};
    char err[256];
    assert_int_equal(bw_shm_bind(&shm, cfg, 2, NOW, err, sizeof err), 0);
    assert_int_equal(cfg->routes[0].shm_slot, before[0]);
    assert_int_equal(cfg->routes[1].shm_slot, before[1]);
    assert_int_equal(atomic_load(&bw_shm_route_at(&shm, before[0])->id.generation), 2);

    bw_shm_destroy(&shm);
    bw_config_free(cfg);
}

static void test_rebind_keeps_state_by_name(void **state)
{
    (void)state;
    const char *first[] = {"api", "web"};
    bw_config *c1 = config_with_upstreams(first, 2);
    bw_shm shm = make_region(c1);
    int api = c1->upstreams[0].shm_slot, web = c1->upstreams[1].shm_slot;
    const bw_breaker_conf *bc = &c1->upstreams[0].breaker;
    open_breaker(bw_shm_breaker(&shm, api), bc, NOW);
    assert_int_equal(breaker_state(bw_shm_breaker(&shm, api), bc, NOW), BW_BREAKER_OPEN);
    bw_metrics_upstream_error(&shm, 0, api, BW_UPERR_CONNECT);

    /* Reordered, with a new name: api keeps slot and open breaker, new gets a closed one. */
    const char *second[] = {"new", "web", "api"};
    bw_config *c2 = config_with_upstreams(second, 3);
    char err[256];
    assert_int_equal(bw_shm_bind(&shm, c2, 2, NOW + 10, err, sizeof err), 0);
    assert_int_equal(c2->upstreams[bw_config_find_upstream(c2, "api")].shm_slot, api);
    assert_int_equal(c2->upstreams[bw_config_find_upstream(c2, "web")].shm_slot, web);
    int fresh = c2->upstreams[bw_config_find_upstream(c2, "new")].shm_slot;
    assert_true(fresh != api && fresh != web && fresh >= 0);
    assert_int_equal(breaker_state(bw_shm_breaker(&shm, api), bc, NOW + 10), BW_BREAKER_OPEN);
    assert_int_equal(breaker_state(bw_shm_breaker(&shm, fresh), bc, NOW + 10), BW_BREAKER_CLOSED);
    assert_int_equal(atomic_load(&bw_shm_upstream_counters(&shm, 0, api)->errors[0]), 1);
    /* Generation stamps: api and new were used by generation 2; the route now points at new. */
    assert_int_equal(atomic_load(&bw_shm_upstream_at(&shm, api)->id.generation), 2);
    assert_int_equal(atomic_load(&bw_shm_upstream_at(&shm, fresh)->id.generation), 2);
    bw_shm_route *r = bw_shm_route_at(&shm, c2->routes[0].shm_slot);
    assert_string_equal(r->id.name, "main");
    assert_string_equal(r->upstream, "new");
    /* Same route name, other upstream: another series, so another slot. */
    assert_int_not_equal(c2->routes[0].shm_slot, c1->routes[0].shm_slot);

    bw_shm_destroy(&shm);
    bw_config_free(c1);
    bw_config_free(c2);
}

static void test_too_many_names(void **state)
{
    (void)state;
    const char *one[] = {"keep"};
    bw_config *c1 = config_with_upstreams(one, 1);
    bw_shm shm = make_region(c1);
    assert_int_equal(shm.hdr->n_upstream_slots, 16);
    int keep = c1->upstreams[0].shm_slot;
    open_breaker(bw_shm_breaker(&shm, keep), &c1->upstreams[0].breaker, NOW);

    /* "keep" plus 16 new names: 17 > 16 slots. */
    char names_buf[17][16];
    const char *names[17];
    names[0] = "keep";
    for (int i = 1; i < 17; i++) {
        snprintf(names_buf[i], sizeof names_buf[i], "n%d", i);
        names[i] = names_buf[i];
    }
    bw_config *c2 = config_with_upstreams(names, 17);
    for (size_t i = 0; i < c2->n_upstreams; i++)
        c2->upstreams[i].shm_slot = -7;
    char err[256] = "";
    assert_int_equal(bw_shm_bind(&shm, c2, 2, NOW, err, sizeof err), -1);
    assert_non_null(strstr(err, "restart"));
    /* Nothing changed: no slot written to the config, no name written to the region. */
    for (size_t i = 0; i < c2->n_upstreams; i++)
        assert_int_equal(c2->upstreams[i].shm_slot, -7);
    for (int i = 0; i < 16; i++)
        assert_true(i == keep || bw_shm_upstream_at(&shm, i)->id.name[0] == '\0');
    assert_int_equal(breaker_state(bw_shm_breaker(&shm, keep), &c1->upstreams[0].breaker, NOW),
                     BW_BREAKER_OPEN);

    /* 16 new names without "keep" fit: the unused slot is given up, with a fresh breaker. */
    bw_config *c3 = config_with_upstreams(names + 1, 16);
    assert_int_equal(bw_shm_bind(&shm, c3, 3, NOW, err, sizeof err), 0);
    bool reused = false;
    for (size_t i = 0; i < c3->n_upstreams; i++) {
        if (c3->upstreams[i].shm_slot != keep)
            continue;
        reused = true;
        assert_string_equal(bw_shm_upstream_at(&shm, keep)->id.name, c3->upstreams[i].name);
        assert_int_equal(breaker_state(bw_shm_breaker(&shm, keep), &c3->upstreams[i].breaker, NOW),
                         BW_BREAKER_CLOSED);
    }
    assert_true(reused);

    bw_shm_destroy(&shm);
    bw_config_free(c1);
    bw_config_free(c2);
    bw_config_free(c3);
}

static void keytext(void *arg, char buf[BW_TOPKEYS_TEXT_MAX + 1])
{
    snprintf(buf, BW_TOPKEYS_TEXT_MAX + 1, "%s", (const char *)arg);
}

/* Every policy slot has its own busiest-keys table inside the region; a forced breaker and the
 * keys of a policy follow their names across a rebind. */
static void test_topkeys_and_forced_follow_names(void **state)
{
    (void)state;
    bw_config *cfg = bw_test_parse_config(BASE);
    bw_shm shm = make_region(cfg);
    const unsigned char *end = (const unsigned char *)shm.base + shm.size;
    for (uint32_t i = 0; i < shm.hdr->n_policy_slots; i++) {
        bw_topkeys *t = bw_shm_topkeys(&shm, (int)i);
        assert_non_null(t);
        assert_true((const unsigned char *)(t + 1) <= end);
    }
    assert_null(bw_shm_topkeys(&shm, -1));
    assert_null(bw_shm_topkeys(&shm, (int)shm.hdr->n_policy_slots));
    int pol = cfg->rate_limits[0].shm_slot;
    bw_topkeys_record(bw_shm_topkeys(&shm, pol), 77, true, 0, 1, keytext, "198.51.100.1");
    bw_breaker *api = bw_shm_breaker(&shm, cfg->upstreams[0].shm_slot);
    assert_true(bw_breaker_force_open(api, &cfg->upstreams[0].breaker, 0, NOW, NULL));

    char err[256];
    bw_config *again = bw_test_parse_config(BASE);
    assert_int_equal(bw_shm_bind(&shm, again, 2, NOW + 1000, err, sizeof err), 0);
    bw_topkeys_entry e[2];
    assert_int_equal(bw_topkeys_top(bw_shm_topkeys(&shm, again->rate_limits[0].shm_slot), e, 2), 1);
    assert_string_equal(e[0].text, "198.51.100.1");
    assert_true(bw_breaker_is_forced(bw_shm_breaker(&shm, again->upstreams[0].shm_slot)));
    bw_shm_destroy(&shm);
    bw_config_free(cfg);
    bw_config_free(again);
}

static void test_stale_slot_kept_until_needed(void **state)
{
    (void)state;
    const char *ab[] = {"a", "b"};
    bw_config *c1 = config_with_upstreams(ab, 2);
    bw_shm shm = make_region(c1);
    int b = c1->upstreams[1].shm_slot;
    bw_metrics_upstream_error(&shm, 1, b, BW_UPERR_RESET);

    const char *ac[] = {"a", "c"};
    bw_config *c2 = config_with_upstreams(ac, 2);
    char err[256];
    assert_int_equal(bw_shm_bind(&shm, c2, 2, NOW, err, sizeof err), 0);
    /* "c" took a never-used slot; "b" still owns its slot and counters. */
    assert_int_not_equal(c2->upstreams[1].shm_slot, b);
    assert_string_equal(bw_shm_upstream_at(&shm, b)->id.name, "b");
    assert_int_equal(atomic_load(&bw_shm_upstream_counters(&shm, 1, b)->errors[BW_UPERR_RESET]), 1);

    /* "b" comes back: same slot, same counters. */
    assert_int_equal(bw_shm_bind(&shm, c1, 3, NOW, err, sizeof err), 0);
    assert_int_equal(c1->upstreams[1].shm_slot, b);
    assert_int_equal(atomic_load(&bw_shm_upstream_counters(&shm, 1, b)->errors[BW_UPERR_RESET]), 1);

    bw_shm_destroy(&shm);
    bw_config_free(c1);
    bw_config_free(c2);
}

static void test_long_names(void **state)
{
    (void)state;
    /* Two route names that only differ after the 63rd byte must not share a slot. */
    char text[2048], n1[101], n2[101];
    memset(n1, 'x', 100);
    n1[100] = '\0';
    memcpy(n2, n1, sizeof n2);
    n2[99] = 'y';
    snprintf(text, sizeof text,
             "{\"listeners\": [{\"address\": \"127.0.0.1:8080\"}],"
             " \"upstreams\": {\"api\": {\"servers\": [\"127.0.0.1:9001\"]}},"
             " \"routes\": [{\"path_prefix\": \"/a\", \"name\": \"%s\", \"upstream\": \"api\"},"
             "              {\"path_prefix\": \"/b\", \"name\": \"%s\", \"upstream\": \"api\"}]}",
             n1, n2);
    bw_config *cfg = bw_test_parse_config(text);
    bw_shm shm = make_region(cfg);
    assert_int_not_equal(cfg->routes[0].shm_slot, cfg->routes[1].shm_slot);
    const char *stored = bw_shm_route_at(&shm, cfg->routes[0].shm_slot)->id.name;
    assert_true(strlen(stored) < BW_SHM_NAME_MAX);
    assert_memory_equal(stored, n1, 40);
    /* And they find their slots again on the next bind. */
    int s0 = cfg->routes[0].shm_slot, s1 = cfg->routes[1].shm_slot;
    char err[256];
    assert_int_equal(bw_shm_bind(&shm, cfg, 2, NOW, err, sizeof err), 0);
    assert_int_equal(cfg->routes[0].shm_slot, s0);
    assert_int_equal(cfg->routes[1].shm_slot, s1);
    bw_shm_destroy(&shm);
    bw_config_free(cfg);
}

static void test_worker_acquire_release(void **state)
{
    (void)state;
    bw_config *cfg = bw_test_parse_config(BASE);
    bw_shm shm = make_region(cfg);
    uint32_t n = shm.hdr->n_worker_slots;
    int lis = cfg->listeners[0].shm_slot;
    int route = cfg->routes[0].shm_slot;

    for (uint32_t i = 0; i < n; i++) {
        int s = bw_shm_worker_acquire(&shm, (pid_t)(100 + i), NOW + i);
        assert_int_equal(s, (int)i);
        assert_int_equal(atomic_load(&bw_shm_worker(&shm, s)->pid), 100 + (int)i);
        assert_int_equal(atomic_load(&bw_shm_worker(&shm, s)->started_ms), NOW + i);
    }
    assert_int_equal(bw_shm_worker_acquire(&shm, 999, NOW), -1);
    assert_int_equal(bw_shm_worker_acquire(&shm, 0, NOW), -1);

    bw_metrics_connection(&shm, 2, lis, 1);
    bw_metrics_connection(&shm, 2, lis, 1);
    bw_metrics_connection(&shm, 3, lis, 1);
    bw_metrics_count_request(&shm, 2, route, 200);
    bw_shm_worker_release(&shm, 2);
    assert_int_equal(atomic_load(&bw_shm_worker(&shm, 2)->pid), 0);
    assert_int_equal(atomic_load(bw_shm_connections_cell(&shm, 2, lis)), 0); /* gauge zeroed */
    assert_int_equal(atomic_load(bw_shm_connections_cell(&shm, 3, lis)), 1); /* others kept */
    assert_int_equal(sum_requests(&shm, route, 200), 1);                     /* counters kept */

    assert_int_equal(bw_shm_worker_acquire(&shm, 555, NOW), 2);
    bw_shm_worker_release(&shm, -1); /* out of range: ignored */
    bw_shm_worker_release(&shm, (int)n);

    bw_shm_destroy(&shm);
    bw_config_free(cfg);
}

static void test_counter_updates(void **state)
{
    (void)state;
    bw_config *cfg = bw_test_parse_config(BASE);
    bw_shm shm = make_region(cfg);
    int route = cfg->routes[0].shm_slot, up = cfg->upstreams[0].shm_slot;
    int pol = cfg->rate_limits[0].shm_slot;

    bw_metrics_count_request(&shm, 0, route, 200);
    bw_metrics_count_request(&shm, 1, route, 200);
    bw_metrics_count_request(&shm, -5, route, 599); /* bad worker slot: slot 0 */
    bw_metrics_count_request(&shm, 1000, route, 100);
    bw_metrics_count_request(&shm, 0, route, 99);  /* ignored */
    bw_metrics_count_request(&shm, 0, route, 600); /* ignored */
    bw_metrics_count_request(&shm, 0, -1, 404);    /* no route */
    bw_metrics_count_request(&shm, 0, 9999, 404);  /* nonsense slot: ignored */
    assert_int_equal(sum_requests(&shm, route, 200), 2);
    assert_int_equal(sum_requests(&shm, route, 599), 1);
    assert_int_equal(atomic_load(&bw_shm_requests_row(&shm, 0, route)[0]), 1);
    assert_int_equal(sum_requests(&shm, -1, 404), 1);
    uint64_t total = 0;
    for (int s = -1; s < 16; s++)
        for (int c = 100; c < 600; c++)
            total += sum_requests(&shm, s, c);
    assert_int_equal(total, 5);

    /* Bucket index: the first bound >= the value; beyond the last bound: +Inf. */
    bw_metrics_observe_duration(&shm, 0, up, 0);
    bw_metrics_observe_duration(&shm, 0, up, 5000);
    bw_metrics_observe_duration(&shm, 0, up, 5001);
    bw_metrics_observe_duration(&shm, 0, up, 30000000);
    bw_metrics_observe_duration(&shm, 0, up, 30000001);
    bw_upstream_counters *c = bw_shm_upstream_counters(&shm, 0, up);
    assert_int_equal(atomic_load(&c->duration_buckets[0]), 2);
    assert_int_equal(atomic_load(&c->duration_buckets[1]), 1);
    assert_int_equal(atomic_load(&c->duration_buckets[BW_METRICS_BUCKETS - 1]), 1);
    assert_int_equal(atomic_load(&c->duration_buckets[BW_METRICS_BUCKETS]), 1);
    assert_int_equal(atomic_load(&c->duration_count), 5);
    assert_int_equal(atomic_load(&c->duration_sum_us), 5000 + 5001 + 30000000 + 30000001);

    bw_metrics_upstream_error(&shm, 0, up, BW_UPERR_TIMEOUT);
    bw_metrics_upstream_error(&shm, 0, up, (bw_upstream_error_kind)17); /* ignored */
    bw_metrics_upstream_error(&shm, 0, -3, BW_UPERR_TIMEOUT);           /* ignored */
    assert_int_equal(atomic_load(&c->errors[BW_UPERR_TIMEOUT]), 1);

    bw_metrics_rate_limited(&shm, 4, pol);
    bw_metrics_rate_limited(&shm, 4, 77); /* ignored */
    assert_int_equal(atomic_load(bw_shm_rate_limited_cell(&shm, 4, pol)), 1);

    bw_metrics_connection(&shm, 1, cfg->listeners[1].shm_slot, 1);
    bw_metrics_connection(&shm, 1, cfg->listeners[1].shm_slot, -1);
    bw_metrics_connection(&shm, 1, cfg->listeners[1].shm_slot, -1);
    assert_int_equal(atomic_load(bw_shm_connections_cell(&shm, 1, cfg->listeners[1].shm_slot)), -1);

    bw_shm_destroy(&shm);
    bw_config_free(cfg);
}

#define PER_CHILD 200000

/* Child body: take a worker slot of its own and count n requests into it. */
static void child_count(bw_shm *shm, int route, int up, int n)
{
    int slot = bw_shm_worker_acquire(shm, getpid(), NOW);
    if (slot < 0)
        _exit(2);
    for (int i = 0; i < n; i++) {
        bw_metrics_count_request(shm, slot, route, 200);
        bw_metrics_observe_duration(shm, slot, up, (uint64_t)i % 40000);
    }
    _exit(0);
}

static void test_forked_counters(void **state)
{
    (void)state;
    bw_config *cfg = bw_test_parse_config(BASE);
    bw_shm shm = make_region(cfg);
    int route = cfg->routes[1].shm_slot, up = cfg->upstreams[1].shm_slot;

    pid_t pids[2];
    for (int i = 0; i < 2; i++) {
        pids[i] = fork();
        assert_true(pids[i] >= 0);
        if (pids[i] == 0)
            child_count(&shm, route, up, PER_CHILD);
    }
    for (int i = 0; i < 2; i++) {
        int status;
        assert_int_equal(waitpid(pids[i], &status, 0), pids[i]);
        assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    assert_int_equal(sum_requests(&shm, route, 200), 2 * PER_CHILD);
    uint64_t count = 0;
    int used = 0;
    for (uint32_t w = 0; w < shm.hdr->n_worker_slots; w++) {
        count += atomic_load(&bw_shm_upstream_counters(&shm, (int)w, up)->duration_count);
        used += atomic_load(&bw_shm_worker(&shm, (int)w)->pid) != 0;
    }
    assert_int_equal(count, 2 * PER_CHILD);
    assert_int_equal(used, 2); /* each child had its own slot */

    bw_shm_destroy(&shm);
    bw_config_free(cfg);
}

static void test_killed_worker_leaves_region_usable(void **state)
{
    (void)state;
    bw_config *cfg = bw_test_parse_config(BASE);
    bw_shm shm = make_region(cfg);
    int route = cfg->routes[0].shm_slot, up = cfg->upstreams[0].shm_slot;
    int lis = cfg->listeners[0].shm_slot;
    const bw_breaker_conf *bc = &cfg->upstreams[0].breaker;

    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int slot = bw_shm_worker_acquire(&shm, getpid(), NOW);
        for (uint64_t i = 0;; i++) {
            bw_metrics_connection(&shm, slot, lis, 1);
            bw_metrics_count_request(&shm, slot, route, 200);
            bw_metrics_observe_duration(&shm, slot, up, i % 100000);
            bw_breaker_ticket tk;
            bw_breaker *b = bw_shm_breaker(&shm, up);
            if (bw_breaker_allow(b, bc, NOW + i / 1000, 1000, &tk, NULL, NULL) != BW_BREAKER_REJECT)
                bw_breaker_report(b, bc, NOW + i / 1000, &tk, BW_BREAKER_SUCCESS, 0, NULL);
        }
    }
    /* Let it run into the thick of it, then kill it at whatever instruction it is on. */
    struct timespec pause = {0, 1000000};
    for (int i = 0; i < 5000 && sum_requests(&shm, route, 200) < 50000; i++)
        nanosleep(&pause, NULL);
    kill(pid, SIGKILL);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));

    int slot = -1;
    for (uint32_t w = 0; w < shm.hdr->n_worker_slots; w++)
        if (atomic_load(&bw_shm_worker(&shm, (int)w)->pid) == pid)
            slot = (int)w;
    assert_true(slot >= 0);
    uint64_t before = sum_requests(&shm, route, 200);
    assert_true(before > 0);
    assert_true(atomic_load(bw_shm_connections_cell(&shm, slot, lis)) > 0);

    /* The master releases the slot: gauges zeroed, counters kept, slot reusable. */
    bw_shm_worker_release(&shm, slot);
    assert_int_equal(atomic_load(bw_shm_connections_cell(&shm, slot, lis)), 0);
    assert_int_equal(sum_requests(&shm, route, 200), before);
    int again = bw_shm_worker_acquire(&shm, 4242, NOW);
    assert_int_equal(again, slot);
    bw_metrics_count_request(&shm, again, route, 200);
    assert_int_equal(sum_requests(&shm, route, 200), before + 1);
    bw_upstream_counters *c = bw_shm_upstream_counters(&shm, slot, up);
    uint64_t buckets = 0;
    for (size_t b = 0; b <= BW_METRICS_BUCKETS; b++)
        buckets += atomic_load(&c->duration_buckets[b]);
    /* The kill may fall between the bucket add and the count add: off by one at most. */
    uint64_t count = atomic_load(&c->duration_count);
    assert_true(buckets == count || buckets == count + 1);

    /* The breaker still works: it opens and is seen open. */
    open_breaker(bw_shm_breaker(&shm, up), bc, NOW + 100000);
    assert_int_equal(breaker_state(bw_shm_breaker(&shm, up), bc, NOW + 100000), BW_BREAKER_OPEN);
    char err[256];
    assert_int_equal(bw_shm_bind(&shm, cfg, 2, NOW, err, sizeof err), 0);

    bw_shm_destroy(&shm);
    bw_config_free(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout),
        cmocka_unit_test(test_fleet_table_with_redis),
        cmocka_unit_test(test_headroom_scales),
        cmocka_unit_test(test_bind_records_names),
        cmocka_unit_test(test_rebind_keeps_state_by_name),
        cmocka_unit_test(test_too_many_names),
        cmocka_unit_test(test_stale_slot_kept_until_needed),
        cmocka_unit_test(test_topkeys_and_forced_follow_names),
        cmocka_unit_test(test_long_names),
        cmocka_unit_test(test_worker_acquire_release),
        cmocka_unit_test(test_counter_updates),
        cmocka_unit_test(test_forked_counters),
        cmocka_unit_test(test_killed_worker_leaves_region_usable),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
