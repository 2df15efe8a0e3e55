/*
 * Unit tests for src/metrics.c: the exposition rendered from a region with known counter values
 * must contain exact sample lines (sums over worker slots, cumulative histogram buckets, escaped
 * labels, series of names dropped by a reload), and must pass `promtool check metrics` when
 * promtool is installed.
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
#include <unistd.h>

#include <event2/buffer.h>

#include "breakwater/metrics.h"

#include "support.h"

#define NOW_MS UINT64_C(5000000)
#define WALL_MS UINT64_C(1700000000000)

static const char BASE[] =
    "{\"workers\": 2, \"rate_limit_table_size\": 1024,"
    " \"listeners\": [{\"address\": \"127.0.0.1:8080\"}],"
    " \"upstreams\": {\"api\": {\"servers\": [\"127.0.0.1:9001\"], \"critical\": true},"
    "                 \"web\": {\"servers\": [\"127.0.0.1:9002\"]}},"
    " \"routes\": [{\"path_prefix\": \"/api\", \"name\": \"r\", \"upstream\": \"api\","
    "               \"rate_limit\": \"pc\"},"
    "              {\"path_prefix\": \"/\", \"name\": \"we\\\"ird\\\\na\\nme\","
    "               \"upstream\": \"web\"}],"
    " \"rate_limits\": {\"pc\": {\"key\": \"client_ip\", \"capacity\": 5, \"refill_per_sec\": 1}}}";

typedef struct fixture {
    bw_config *cfg;
    bw_shm shm;
    bw_metrics_master m;
    char *text;
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    f->cfg = bw_test_parse_config(BASE);
    char err[256];
    if (bw_shm_create(&f->shm, f->cfg, err, sizeof err) != 0 ||
        bw_shm_bind(&f->shm, f->cfg, 1, NOW_MS, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    f->m.worker_restarts = 2;
    f->m.reloads_success = 3;
    f->m.reloads_failure = 1;
    f->m.redis_pending_deltas = 7;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    bw_shm_destroy(&f->shm);
    bw_config_free(f->cfg);
    free(f->text);
    free(f);
    return 0;
}

/* Renders into f->text (NUL-terminated). */
static const char *render(fixture *f)
{
    struct evbuffer *out = evbuffer_new();
    assert_non_null(out);
    bw_metrics_render(&f->shm, f->cfg, &f->m, NOW_MS, WALL_MS, out);
    size_t n = evbuffer_get_length(out);
    free(f->text);
    f->text = malloc(n + 1);
    assert_non_null(f->text);
    evbuffer_remove(out, f->text, n);
    f->text[n] = '\0';
    evbuffer_free(out);
    return f->text;
}

/* True when the text holds this exact line. */
static bool has_line(const char *text, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)) != NULL; p++)
        if ((p == text || p[-1] == '\n') && p[n] == '\n')
            return true;
    return false;
}

static void expect_line(const char *text, const char *line)
{
    if (!has_line(text, line))
        fail_msg("missing line: %s\n--- exposition ---\n%s", line, text);
}

static void expect_no_line(const char *text, const char *line)
{
    if (has_line(text, line))
        fail_msg("unexpected line: %s", line);
}

static int count_substr(const char *text, const char *s)
{
    int n = 0;
    for (const char *p = text; (p = strstr(p, s)) != NULL; p += strlen(s))
        n++;
    return n;
}

static int slot_of_upstream(const bw_config *cfg, const char *name)
{
    return cfg->upstreams[bw_config_find_upstream(cfg, name)].shm_slot;
}

static void test_requests_summed_over_workers(void **state)
{
    fixture *f = *state;
    int r = f->cfg->routes[0].shm_slot;
    bw_metrics_count_request(&f->shm, 0, r, 200);
    bw_metrics_count_request(&f->shm, 1, r, 200);
    bw_metrics_count_request(&f->shm, 7, r, 200);
    bw_metrics_count_request(&f->shm, 1, r, 503);
    bw_metrics_count_request(&f->shm, 0, -1, 404);
    bw_metrics_count_request(&f->shm, 3, -1, 404);
    const char *t = render(f);
    expect_line(t, "breakwater_requests_total{route=\"r\",upstream=\"api\",code=\"200\"} 3");
    expect_line(t, "breakwater_requests_total{route=\"r\",upstream=\"api\",code=\"503\"} 1");
    expect_line(t, "breakwater_requests_total{route=\"\",upstream=\"\",code=\"404\"} 2");
    /* Only non-zero series. */
    expect_no_line(t, "breakwater_requests_total{route=\"r\",upstream=\"api\",code=\"404\"} 0");
    assert_int_equal(count_substr(t, "\nbreakwater_requests_total{"), 3);
    /* HELP and TYPE once per family. */
    assert_int_equal(count_substr(t, "# TYPE breakwater_requests_total counter\n"), 1);
    assert_int_equal(count_substr(t, "# HELP breakwater_requests_total "), 1);
}

static void test_histogram_cumulative(void **state)
{
    fixture *f = *state;
    int api = slot_of_upstream(f->cfg, "api");
    bw_metrics_observe_duration(&f->shm, 0, api, 3000);
    bw_metrics_observe_duration(&f->shm, 1, api, 5000);
    bw_metrics_observe_duration(&f->shm, 0, api, 7000);
    bw_metrics_observe_duration(&f->shm, 1, api, 2000000);
    bw_metrics_observe_duration(&f->shm, 0, api, 40000000);
    const char *t = render(f);
    expect_line(t, "# TYPE breakwater_request_duration_seconds histogram");
    const char *p = "breakwater_request_duration_seconds_bucket{upstream=\"api\",le=";
    char line[256];
    static const char *const le[] = {"0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
                                     "1",     "2.5",  "5",     "10",   "30",  "+Inf"};
    static const int want[] = {2, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 5};
    for (size_t i = 0; i < 13; i++) {
        snprintf(line, sizeof line, "%s\"%s\"} %d", p, le[i], want[i]);
        expect_line(t, line);
    }
    expect_line(t, "breakwater_request_duration_seconds_sum{upstream=\"api\"} 42.015");
    expect_line(t, "breakwater_request_duration_seconds_count{upstream=\"api\"} 5");
    /* Every upstream in the region has its histogram, empty or not. */
    expect_line(t, "breakwater_request_duration_seconds_count{upstream=\"web\"} 0");
    expect_line(t, "breakwater_request_duration_seconds_sum{upstream=\"web\"} 0");
}

static void test_label_escaping(void **state)
{
    fixture *f = *state;
    bw_metrics_count_request(&f->shm, 0, f->cfg->routes[1].shm_slot, 201);
    const char *t = render(f);
    expect_line(t, "breakwater_requests_total{route=\"we\\\"ird\\\\na\\nme\",upstream=\"web\",code="
                   "\"201\"} 1");
}

static void test_upstream_and_breaker_families(void **state)
{
    fixture *f = *state;
    int api = slot_of_upstream(f->cfg, "api");
    bw_metrics_upstream_error(&f->shm, 0, api, BW_UPERR_CONNECT);
    bw_metrics_upstream_error(&f->shm, 1, api, BW_UPERR_CONNECT);
    bw_metrics_upstream_error(&f->shm, 1, api, BW_UPERR_INVALID);

    /* Open api's breaker, then let one request be refused. */
    const bw_breaker_conf *bc = &f->cfg->upstreams[bw_config_find_upstream(f->cfg, "api")].breaker;
    bw_breaker *b = bw_shm_breaker(&f->shm, api);
    for (uint32_t i = 0; i < bc->failure_threshold; i++) {
        bw_breaker_ticket tk;
        bw_breaker_allow(b, bc, NOW_MS, 1000, &tk, NULL, NULL);
        bw_breaker_report(b, bc, NOW_MS, &tk, BW_BREAKER_FAILURE, 0, NULL);
    }
    assert_int_equal(bw_breaker_allow(b, bc, NOW_MS, 1000, NULL, NULL, NULL), BW_BREAKER_REJECT);

    const char *t = render(f);
    expect_line(t, "breakwater_upstream_errors_total{upstream=\"api\",kind=\"connect\"} 2");
    expect_line(t, "breakwater_upstream_errors_total{upstream=\"api\",kind=\"invalid\"} 1");
    expect_line(t, "breakwater_upstream_errors_total{upstream=\"api\",kind=\"timeout\"} 0");
    expect_line(t, "breakwater_upstream_errors_total{upstream=\"web\",kind=\"reset\"} 0");
    expect_line(t, "breakwater_upstream_errors_total{upstream=\"web\",kind=\"status\"} 0");
    expect_line(t, "breakwater_circuit_breaker_state{upstream=\"api\"} 2");
    expect_line(t, "breakwater_circuit_breaker_state{upstream=\"web\"} 1");
    expect_line(t, "breakwater_circuit_breaker_transitions_total{upstream=\"api\",to=\"open\"} 1");
    expect_line(t,
                "breakwater_circuit_breaker_transitions_total{upstream=\"api\",to=\"closed\"} 0");
    expect_line(
        t, "breakwater_circuit_breaker_transitions_total{upstream=\"web\",to=\"half_open\"} 0");
    expect_line(t, "breakwater_circuit_breaker_rejected_total{upstream=\"api\"} 1");
    expect_line(t, "breakwater_circuit_breaker_rejected_total{upstream=\"web\"} 0");
    expect_line(t, "# TYPE breakwater_upstream_critical gauge");
    expect_line(t, "breakwater_upstream_critical{upstream=\"api\"} 1");
    expect_line(t, "breakwater_upstream_critical{upstream=\"web\"} 0");
}

static void test_rate_limit_and_process_families(void **state)
{
    fixture *f = *state;
    int pol = f->cfg->rate_limits[0].shm_slot;
    bw_ratelimit_params p;
    bw_ratelimit_params_from_conf(&f->cfg->rate_limits[0], &p);
    bw_ratelimit_result res;
    uint64_t now_ns = NOW_MS * UINT64_C(1000000);
    bw_ratelimit_take(bw_shm_ratelimit(&f->shm), (uint32_t)pol, 11, &p, now_ns, &res);
    bw_ratelimit_take(bw_shm_ratelimit(&f->shm), (uint32_t)pol, 12, &p, now_ns, &res);
    bw_metrics_rate_limited(&f->shm, 0, pol);
    bw_metrics_rate_limited(&f->shm, 1, pol);
    bw_metrics_connection(&f->shm, 0, f->cfg->listeners[0].shm_slot, 1);
    bw_metrics_connection(&f->shm, 1, f->cfg->listeners[0].shm_slot, 2);
    bw_shm_worker_acquire(&f->shm, 1234, NOW_MS);

    const char *t = render(f);
    expect_line(t, "breakwater_rate_limited_total{policy=\"pc\"} 2");
    expect_line(t, "breakwater_rate_limit_keys{policy=\"pc\"} 2");
    char line[128];
    snprintf(line, sizeof line, "breakwater_rate_limit_table_bytes %zu",
             bw_ratelimit_table_size_bytes(1024));
    expect_line(t, line);
    expect_line(t, "breakwater_rate_limit_evictions_total 0");
    expect_line(t, "breakwater_connections_active{listener=\"127.0.0.1:8080\"} 3");
    expect_line(t, "breakwater_worker_restarts_total 2");
    expect_line(t, "breakwater_config_reloads_total{result=\"success\"} 3");
    expect_line(t, "breakwater_config_reloads_total{result=\"failure\"} 1");
    expect_line(t, "breakwater_build_info{version=\"" BW_VERSION "\"} 1");
    expect_line(t, "breakwater_workers_alive 1");
    /* No redis section: no redis series. */
    assert_null(strstr(t, "breakwater_redis"));
}

static void test_redis_family(void **state)
{
    fixture *f = *state;
    bw_shm_status *st = &f->shm.hdr->status;
    atomic_store(&st->redis_configured, 1);
    const char *t = render(f);
    expect_line(t, "breakwater_redis_up 0");
    expect_line(t, "breakwater_redis_sync_age_seconds +Inf"); /* never synced */
    expect_line(t, "breakwater_redis_errors_total 0");
    expect_line(t, "breakwater_redis_pending_deltas 7");

    atomic_store(&st->redis_up, 1);
    atomic_store(&st->redis_last_sync_ms, WALL_MS - 1250);
    atomic_store(&st->redis_errors, 4);
    t = render(f);
    expect_line(t, "breakwater_redis_up 1");
    expect_line(t, "breakwater_redis_sync_age_seconds 1.25");
    expect_line(t, "breakwater_redis_errors_total 4");

    /* A wall clock stepped back never gives a negative age. */
    atomic_store(&st->redis_last_sync_ms, WALL_MS + 5000);
    t = render(f);
    expect_line(t, "breakwater_redis_sync_age_seconds 0");
}

static void test_series_survive_reload(void **state)
{
    fixture *f = *state;
    int r = f->cfg->routes[0].shm_slot;
    int web = slot_of_upstream(f->cfg, "web");
    bw_metrics_count_request(&f->shm, 0, r, 200);
    bw_metrics_upstream_error(&f->shm, 0, web, BW_UPERR_TIMEOUT);

    /* Reload: route "r" and upstream "web" are gone. */
    bw_config *next =
        bw_test_parse_config("{\"listeners\": [{\"address\": \"127.0.0.1:8080\"}],"
                             " \"upstreams\": {\"api\": {\"servers\": [\"127.0.0.1:9001\"]}},"
                             " \"routes\": [{\"path_prefix\": \"/\", \"upstream\": \"api\"}]}");
    char err[256];
    assert_int_equal(bw_shm_bind(&f->shm, next, 2, NOW_MS, err, sizeof err), 0);
    bw_config_free(f->cfg);
    f->cfg = next;

    const char *t = render(f);
    expect_line(t, "breakwater_requests_total{route=\"r\",upstream=\"api\",code=\"200\"} 1");
    expect_line(t, "breakwater_upstream_errors_total{upstream=\"web\",kind=\"timeout\"} 1");
    /* Stale names: counters only where non-zero, and no gauges. */
    expect_no_line(t, "breakwater_upstream_errors_total{upstream=\"web\",kind=\"connect\"} 0");
    assert_null(strstr(t, "breakwater_circuit_breaker_state{upstream=\"web\"}"));
    expect_line(t, "breakwater_circuit_breaker_state{upstream=\"api\"} 1");
    assert_null(strstr(t, "breakwater_rate_limit_keys{"));
}

static bool promtool_available(void)
{
    return system("command -v promtool >/dev/null 2>&1") == 0;
}

/* Runs `promtool check metrics` on text; returns its exit status and leaves output in buf. */
static int promtool_check(const char *text, char *buf, size_t len)
{
    char path[] = "/tmp/bw-metrics-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    size_t n = strlen(text);
    assert_int_equal(write(fd, text, n), (ssize_t)n);
    close(fd);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s 2>&1", path);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t got = fread(buf, 1, len - 1, p);
    buf[got] = '\0';
    int status = pclose(p);
    unlink(path);
    return status;
}

static void test_promtool_accepts(void **state)
{
    fixture *f = *state;
    if (!promtool_available())
        skip();
    /* Populate every family, including escaped labels, Redis and +Inf. */
    bw_metrics_count_request(&f->shm, 0, f->cfg->routes[0].shm_slot, 200);
    bw_metrics_count_request(&f->shm, 0, f->cfg->routes[1].shm_slot, 502);
    bw_metrics_count_request(&f->shm, 1, -1, 404);
    bw_metrics_observe_duration(&f->shm, 0, slot_of_upstream(f->cfg, "api"), 12345);
    bw_metrics_upstream_error(&f->shm, 0, slot_of_upstream(f->cfg, "web"), BW_UPERR_RESET);
    bw_metrics_rate_limited(&f->shm, 0, f->cfg->rate_limits[0].shm_slot);
    atomic_store(&f->shm.hdr->status.redis_configured, 1);
    char out[4096];
    int status = promtool_check(render(f), out, sizeof out);
    if (status != 0)
        fail_msg("promtool check metrics failed (%d):\n%s\n--- exposition ---\n%s", status, out,
                 f->text);
    atomic_store(&f->shm.hdr->status.redis_last_sync_ms, WALL_MS - 10);
    status = promtool_check(render(f), out, sizeof out);
    if (status != 0)
        fail_msg("promtool check metrics failed (%d):\n%s", status, out);
}

/* ---- the process set ---- */

static void test_proc_stat_parsing(void **state)
{
    (void)state;
    /* A command name with spaces and parentheses; utime 250, stime 50 ticks; starttime 1000;
     * rss 300 pages. */
    const char *stat = "4242 (bw (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 "
                       "1000 123456789 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
    bw_proc_sample ps;
    assert_int_equal(bw_metrics_parse_proc_stat(stat, 100, 4096, 1700000000.0, &ps), 0);
    assert_true(ps.cpu_seconds == 3.0);
    assert_int_equal(ps.rss_bytes, 300 * 4096);
    assert_true(ps.start_time_seconds == 1700000010.0);
    assert_int_equal(bw_metrics_parse_proc_stat("garbage", 100, 4096, 0, &ps), -1);
    assert_int_equal(bw_metrics_parse_proc_stat("1 (x) S 1 2 3", 100, 4096, 0, &ps), -1);
    assert_int_equal(bw_metrics_parse_proc_stat(NULL, 100, 4096, 0, &ps), -1);

    const char *limits =
        "Limit                     Soft Limit           Hard Limit           Units\n"
        "Max processes             63431                63431                processes\n"
        "Max open files            1024                 524288               files\n";
    assert_int_equal(bw_metrics_parse_max_fds(limits), 1024);
    assert_int_equal(
        bw_metrics_parse_max_fds("Max open files            unlimited  unlimited  files\n"), 0);
    assert_int_equal(bw_metrics_parse_max_fds("nothing"), 0);
    assert_true(bw_metrics_parse_boot_time("cpu  1 2 3\nintr 5\nbtime 1764800000\nprocesses 9\n") ==
                1764800000.0);
    assert_true(bw_metrics_parse_boot_time("cpu 1\n") == 0.0);
}

static double family_value(const char *text, const char *name)
{
    char needle[128];
    snprintf(needle, sizeof needle, "\n%s ", name);
    const char *p = strstr(text, needle);
    return p ? strtod(p + strlen(needle), NULL) : -1;
}

/* Sums over the master and a worker: a child that holds 64 more descriptors shows in
 * process_open_fds; one that is gone is left out. */
static void test_process_set_sums_workers(void **state)
{
    (void)state;
    int pipefd[2];
    assert_int_equal(pipe(pipefd), 0);
    pid_t child = fork();
    assert_true(child >= 0);
    if (child == 0) {
        close(pipefd[0]);
        for (int i = 0; i < 64; i++)
            if (dup(pipefd[1]) < 0)
                _exit(1);
        char c = 'x';
        if (write(pipefd[1], &c, 1) != 1)
            _exit(1);
        pause();
        _exit(0);
    }
    close(pipefd[1]);
    char c;
    assert_int_equal(read(pipefd[0], &c, 1), 1);

    struct evbuffer *alone = evbuffer_new(), *both = evbuffer_new();
    bw_metrics_render_process(getpid(), NULL, 0, alone);
    bw_metrics_render_process(getpid(), &child, 1, both);
    evbuffer_add(alone, "", 1);
    evbuffer_add(both, "", 1);
    const char *a = (const char *)evbuffer_pullup(alone, -1);
    const char *b = (const char *)evbuffer_pullup(both, -1);
    assert_non_null(strstr(a, "# TYPE process_cpu_seconds_total counter\n"));
    assert_non_null(strstr(a, "# TYPE process_start_time_seconds gauge\n"));
    assert_true(family_value(b, "process_open_fds") >= family_value(a, "process_open_fds") + 64);
    assert_true(family_value(b, "process_resident_memory_bytes") >
                family_value(a, "process_resident_memory_bytes"));
    assert_true(family_value(a, "process_max_fds") > 0);
    /* The master's start time, not the worker's, and in the recent past. */
    assert_true(family_value(a, "process_start_time_seconds") ==
                family_value(b, "process_start_time_seconds"));
    assert_true(family_value(a, "process_start_time_seconds") > 1.6e9);

    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    struct evbuffer *gone = evbuffer_new();
    bw_metrics_render_process(getpid(), &child, 1, gone);
    evbuffer_add(gone, "", 1);
    const char *g = (const char *)evbuffer_pullup(gone, -1);
    assert_true(family_value(g, "process_open_fds") < family_value(b, "process_open_fds") - 32);
    evbuffer_free(alone);
    evbuffer_free(both);
    evbuffer_free(gone);
    close(pipefd[0]);
}

int main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_requests_summed_over_workers),
        T(test_histogram_cumulative),
        T(test_label_escaping),
        T(test_upstream_and_breaker_families),
        T(test_rate_limit_and_process_families),
        T(test_redis_family),
        T(test_series_survive_reload),
        T(test_promtool_accepts),
        cmocka_unit_test(test_proc_stat_parsing),
        cmocka_unit_test(test_process_set_sums_workers),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
