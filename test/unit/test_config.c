/*
 * Unit tests of the configuration module: defaults, every validation rule, the FILE:LINE:COL
 * positions of syntax and semantic errors, environment overrides (through an injected getenv),
 * CIDR ranges and socket-address parsing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <sys/socket.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "breakwater/config.h"

#define LISTEN "\"listeners\":[{\"address\":\"127.0.0.1:8080\"}]"
#define UPS "\"upstreams\":{\"api\":{\"servers\":[\"127.0.0.1:9001\"]}}"
#define ROUTES "\"routes\":[{\"upstream\":\"api\"}]"
#define MINIMAL "{" LISTEN "," UPS "," ROUTES "}"

/* The environment seen by the module: NULL-terminated name/value pairs set by each test. */
static const char *const *fake_env;

static const char *fake_getenv(const char *name)
{
    for (size_t i = 0; fake_env != NULL && fake_env[i] != NULL; i += 2)
        if (strcmp(fake_env[i], name) == 0)
            return fake_env[i + 1];
    return NULL;
}

static int reset_env(void **state)
{
    (void)state;
    fake_env = NULL;
    return 0;
}

static bw_config *parse(const char *text, bw_diag *d)
{
    bw_diag_init(d);
    return bw_config_parse(text, strlen(text), "test.json", fake_getenv, d);
}

static bw_config *parse_ok(const char *text)
{
    bw_diag d;
    bw_config *cfg = parse(text, &d);
    for (size_t i = 0; i < d.count; i++)
        fprintf(stderr, "unexpected diag: %s\n", d.lines[i]);
    assert_non_null(cfg);
    assert_int_equal(d.count, 0);
    bw_diag_free(&d);
    return cfg;
}

static bool diag_has(const bw_diag *d, const char *needle)
{
    for (size_t i = 0; i < d->count; i++)
        if (strstr(d->lines[i], needle) != NULL)
            return true;
    return false;
}

/* Asserts that the text is refused and that one diagnostic line contains each needle. */
static void expect_errors(const char *text, size_t n, const char *const *needles)
{
    bw_diag d;
    bw_config *cfg = parse(text, &d);
    assert_null(cfg);
    assert_true(d.count > 0);
    for (size_t k = 0; k < n; k++) {
        if (!diag_has(&d, needles[k])) {
            fprintf(stderr, "expected a diagnostic containing: %s\ngot:\n", needles[k]);
            for (size_t i = 0; i < d.count; i++)
                fprintf(stderr, "  %s\n", d.lines[i]);
            fail();
        }
    }
    bw_diag_free(&d);
}

static void expect_error(const char *text, const char *needle)
{
    expect_errors(text, 1, &needle);
}

/* ------------------------------------------------------------------------------------------ */

static void test_minimal_defaults(void **state)
{
    (void)state;
    bw_config *cfg = parse_ok(MINIMAL);
    assert_string_equal(cfg->path, "test.json");
    assert_int_equal(cfg->workers, 1);
    assert_int_equal(cfg->n_listeners, 1);
    assert_string_equal(cfg->listeners[0].address, "127.0.0.1:8080");
    assert_false(cfg->listeners[0].tls_enabled);
    assert_false(cfg->admin.enabled);
    assert_int_equal(cfg->n_upstreams, 1);
    const bw_upstream_conf *u = &cfg->upstreams[0];
    assert_string_equal(u->name, "api");
    assert_int_equal(u->n_servers, 1);
    assert_int_equal(u->servers[0].weight, 1);
    assert_false(u->critical);
    assert_int_equal(u->balance, BW_BALANCE_ROUND_ROBIN);
    assert_int_equal(u->connect_timeout_ms, 1000);
    assert_int_equal(u->response_timeout_ms, 30000);
    assert_int_equal(u->keepalive_max_idle, 32);
    assert_int_equal(u->keepalive_timeout_ms, 60000);
    assert_int_equal(u->retries, 1);
    const bw_breaker_conf *b = &u->breaker;
    assert_int_equal(b->failure_threshold, 5);
    assert_int_equal(b->reset_timeout_ms, 30000);
    assert_int_equal(b->max_reset_timeout_ms, 300000);
    assert_int_equal(b->half_open_success_threshold, 1);
    assert_int_equal(b->half_open_max_requests, 1);
    assert_int_equal(b->failure_rate_percent, 0);
    assert_int_equal(b->window_ms, 10000);
    assert_int_equal(b->min_requests, 20);
    assert_int_equal(b->slow_call_ms, 0);
    assert_int_equal(b->n_failure_statuses, 3);
    assert_int_equal(b->failure_statuses[0], 502);
    assert_int_equal(b->failure_statuses[2], 504);
    assert_false(b->set_failure_threshold);
    assert_int_equal(cfg->n_routes, 1);
    assert_null(cfg->routes[0].host);
    assert_string_equal(cfg->routes[0].path_prefix, "/");
    assert_int_equal(cfg->routes[0].path_prefix_len, 1);
    assert_string_equal(cfg->routes[0].name, "/");
    assert_int_equal(cfg->routes[0].upstream, 0);
    assert_int_equal(cfg->routes[0].rate_limit, -1);
    assert_int_equal(cfg->n_rate_limits, 0);
    assert_int_equal(cfg->default_rate_limit, -1);
    assert_int_equal(cfg->rate_limit_table_size, 65536);
    assert_int_equal(cfg->n_trusted_proxies, 0);
    assert_false(cfg->redis.enabled);
    assert_null(cfg->log.error_log);
    assert_string_equal(cfg->log.access_log, "stdout");
    assert_int_equal(cfg->log.level, BW_LOG_INFO);
    assert_int_equal(cfg->limits.max_header_bytes, 32768);
    assert_int_equal(cfg->limits.max_headers, 100);
    assert_int_equal(cfg->limits.max_body_bytes, 0);
    assert_int_equal(cfg->limits.header_timeout_ms, 10000);
    assert_int_equal(cfg->limits.client_idle_timeout_ms, 60000);
    assert_int_equal(cfg->limits.max_connections, 10000);
    assert_int_equal(cfg->shutdown_timeout_ms, 10000);
    assert_true(cfg->probes_on_listeners);
    bw_config_free(cfg);
}

static void test_full_config(void **state)
{
    (void)state;
    const char *text =
        "{\"workers\": 3,\n"
        " \"listeners\": [{\"address\": \"*:8080\"}, {\"address\": \"[::1]:8081\"}],\n"
        " \"admin\": {\"address\": \"127.0.0.1:9901\"},\n"
        " \"upstreams\": {\n"
        "   \"api\": {\"servers\": [\"127.0.0.1:9001\", \"localhost:9002\", \"[::1]:9003\"],\n"
        "           \"critical\": true, \"balance\": \"least_conn\",\n"
        "           \"connect_timeout_ms\": 250, \"response_timeout_ms\": 5000,\n"
        "           \"keepalive_max_idle\": 0, \"keepalive_timeout_ms\": 1000, \"retries\": 0,\n"
        "           \"circuit_breaker\": {\"failure_threshold\": 3, \"reset_timeout_ms\": 2000,\n"
        "              \"max_reset_timeout_ms\": 8000, \"half_open_success_threshold\": 2,\n"
        "              \"half_open_max_requests\": 4, \"failure_rate_percent\": 50,\n"
        "              \"window_ms\": 5000, \"min_requests\": 10, \"slow_call_ms\": 800,\n"
        "              \"failure_statuses\": [500, 503]}},\n"
        "   \"static\": {\"servers\": [\"10.0.0.5:80\"]}},\n"
        " \"routes\": [\n"
        "   {\"host\": \"API.Example.com\", \"path_prefix\": \"/v1\", \"upstream\": \"api\",\n"
        "    \"rate_limit\": \"per_key\"},\n"
        "   {\"name\": \"assets\", \"path_prefix\": \"/\", \"upstream\": \"static\"}],\n"
        " \"rate_limits\": {\n"
        "   \"per_client\": {\"key\": \"client_ip\", \"capacity\": 5, \"refill_per_sec\": 0.5,\n"
        "                  \"ipv6_prefix\": 56},\n"
        "   \"per_key\": {\"key\": \"header:X-Api-Key\", \"dry_run\": true}},\n"
        " \"rate_limit_table_size\": 1024,\n"
        " \"trusted_proxies\": [\"10.0.0.0/8\", \"::1\"],\n"
        " \"redis\": {\"url\": \"redis://:pw@127.0.0.1:6379/2\", \"key_prefix\": \"bw\",\n"
        "            \"sync_interval_ms\": 50, \"required\": true, \"connect_timeout_ms\": 200,\n"
        "            \"command_timeout_ms\": 300},\n"
        " \"log\": {\"error_log\": \"stderr\", \"access_log\": \"off\", \"level\": \"debug\"},\n"
        " \"limits\": {\"max_header_bytes\": 4096, \"max_headers\": 50,\n"
        "            \"max_body_bytes\": 1048576, \"header_timeout_ms\": 5000,\n"
        "            \"client_idle_timeout_ms\": 30000, \"max_connections\": 500},\n"
        " \"shutdown_timeout_ms\": 0,\n"
        " \"probes_on_listeners\": false}\n";
    bw_config *cfg = parse_ok(text);
    char buf[64];
    assert_int_equal(cfg->workers, 3);
    assert_string_equal(bw_sockaddr_format(&cfg->listeners[0].addr, buf, sizeof buf),
                        "0.0.0.0:8080");
    assert_string_equal(bw_sockaddr_format(&cfg->listeners[1].addr, buf, sizeof buf), "[::1]:8081");
    assert_true(cfg->admin.enabled);
    assert_null(cfg->admin.token_env);
    const bw_upstream_conf *u = &cfg->upstreams[0];
    assert_int_equal(u->n_servers, 3);
    assert_string_equal(bw_sockaddr_format(&u->servers[1].addr, buf, sizeof buf), "127.0.0.1:9002");
    assert_string_equal(u->servers[1].address, "localhost:9002");
    assert_true(u->critical);
    assert_int_equal(u->balance, BW_BALANCE_LEAST_CONN);
    assert_int_equal(u->connect_timeout_ms, 250);
    assert_int_equal(u->response_timeout_ms, 5000);
    assert_int_equal(u->keepalive_max_idle, 0);
    assert_int_equal(u->retries, 0);
    assert_int_equal(u->breaker.failure_threshold, 3);
    assert_true(u->breaker.set_failure_threshold);
    assert_int_equal(u->breaker.max_reset_timeout_ms, 8000);
    assert_int_equal(u->breaker.half_open_max_requests, 4);
    assert_int_equal(u->breaker.failure_rate_percent, 50);
    assert_int_equal(u->breaker.slow_call_ms, 800);
    assert_int_equal(u->breaker.n_failure_statuses, 2);
    assert_int_equal(u->breaker.failure_statuses[0], 500);
    assert_int_equal(cfg->routes[0].upstream, 0);
    assert_string_equal(cfg->routes[0].host, "api.example.com");
    assert_string_equal(cfg->routes[0].name, "api.example.com/v1");
    assert_int_equal(cfg->routes[0].rate_limit, 1);
    assert_int_equal(cfg->routes[1].upstream, 1);
    assert_string_equal(cfg->routes[1].name, "assets");
    assert_int_equal(bw_config_find_upstream(cfg, "static"), 1);
    assert_int_equal(bw_config_find_upstream(cfg, "nope"), -1);
    assert_int_equal(cfg->n_rate_limits, 2);
    assert_int_equal(cfg->default_rate_limit, -1); /* two policies, none named "default" */
    assert_int_equal(cfg->rate_limits[0].capacity, 5);
    assert_true(cfg->rate_limits[0].refill_per_sec == 0.5);
    assert_int_equal(cfg->rate_limits[0].ipv6_prefix, 56);
    assert_int_equal(cfg->rate_limits[1].key_kind, BW_RL_KEY_HEADER);
    assert_string_equal(cfg->rate_limits[1].key_header, "X-Api-Key");
    assert_true(cfg->rate_limits[1].dry_run);
    assert_int_equal(cfg->rate_limits[1].capacity, 100);
    assert_true(cfg->rate_limits[1].refill_per_sec == 10.0);
    assert_false(cfg->rate_limits[1].set_capacity);
    assert_int_equal(cfg->rate_limit_table_size, 1024);
    assert_int_equal(cfg->n_trusted_proxies, 2);
    assert_true(cfg->redis.enabled);
    assert_string_equal(cfg->redis.url, "redis://:pw@127.0.0.1:6379/2");
    assert_string_equal(cfg->redis.key_prefix, "bw");
    assert_int_equal(cfg->redis.sync_interval_ms, 50);
    assert_true(cfg->redis.required);
    assert_int_equal(cfg->redis.command_timeout_ms, 300);
    assert_string_equal(cfg->log.error_log, "stderr");
    assert_string_equal(cfg->log.access_log, "off");
    assert_int_equal(cfg->log.level, BW_LOG_DEBUG);
    assert_int_equal(cfg->limits.max_header_bytes, 4096);
    assert_int_equal(cfg->limits.max_body_bytes, 1048576);
    assert_int_equal(cfg->limits.max_connections, 500);
    assert_int_equal(cfg->shutdown_timeout_ms, 0);
    assert_false(cfg->probes_on_listeners);
    bw_config_free(cfg);
}

static void test_workers_zero_means_cpus(void **state)
{
    (void)state;
    bw_config *cfg = parse_ok("{\"workers\": 0," LISTEN "," UPS "," ROUTES "}");
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    assert_int_equal(cfg->workers, cpus < 1 ? 1 : cpus);
    assert_true(cfg->workers >= 1);
    bw_config_free(cfg);
}

static void test_default_policy_named_default(void **state)
{
    (void)state;
    bw_config *cfg = parse_ok("{" LISTEN "," UPS "," ROUTES ",\"rate_limits\":{\"a\":{},"
                              "\"default\":{},\"z\":{}}}");
    assert_int_equal(cfg->default_rate_limit, 1);
    bw_config_free(cfg);
}

/* ---- syntax errors ---- */

static void test_syntax_error_position(void **state)
{
    (void)state;
    const char *text =
        "{\n  \"workers\": 1,\n  \"listeners\": [\n    {\"address\" \"x\"}\n  ]\n}\n";
    expect_error(text,
                 "test.json:4:16: invalid JSON: unexpected '\"', expected ':' after the field "
                 "name");
}

static void test_syntax_trailing_comma(void **state)
{
    (void)state;
    const char *text = "{\n  \"workers\": 1,\n}\n";
    expect_error(text, "test.json:3:1: invalid JSON: trailing comma before '}' is not allowed");
}

static void test_syntax_unterminated(void **state)
{
    (void)state;
    expect_errors("{\"workers\": 1,\n \"listeners\": [", 2,
                  (const char *[]){"test.json:2:16: invalid JSON: unexpected end of file",
                                   "the array opened at 2:15 is not closed"});
}

static void test_syntax_empty_and_garbage(void **state)
{
    (void)state;
    expect_error("", "test.json:1:1: invalid JSON: the file is empty");
    expect_error(" \n ", "test.json:2:2: invalid JSON: the file is empty");
    expect_error("{} x", "test.json:1:4: invalid JSON: unexpected content after the end");
    expect_errors("{\n // note\n}", 2,
                  (const char *[]){"test.json:2:2:", "comments are not allowed"});
}

static void test_syntax_column_counts_characters(void **state)
{
    (void)state;
    /* "é" is two bytes but one column. */
    expect_error("{\"é\": 1 2}", "test.json:1:9:");
}

static void test_syntax_error_table(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        {"{\"a\": 1\n \"b\": 2}",
         "test.json:2:2: invalid JSON: unexpected '\"', expected ',' or '}'"},
        {"{\"a\": [1 2]}", "test.json:1:10: invalid JSON: unexpected '2', expected ',' or ']'"},
        {"{'a': 1}", "test.json:1:2: invalid JSON: strings must use double quotes"},
        {"{\"a\": 'x'}", "test.json:1:7: invalid JSON: strings must use double quotes"},
        {"{\"a\": 01}", "test.json:1:7: invalid JSON: invalid number"},
        {"{\"a\": +1}", "test.json:1:7: invalid JSON: unexpected '+', expected a value"},
        {"{\"a\": 1.}", "test.json:1:7: invalid JSON: invalid number"},
        {"{\"a\": 10ms}", "test.json:1:7: invalid JSON: invalid number"},
        {"{\"a\": True}", "test.json:1:7: invalid JSON: unexpected word"},
        {"{\"a\": nul}", "test.json:1:7: invalid JSON: unexpected word"},
        {"{\"a\":\n \"abc}", "test.json:2:2: invalid JSON: string not closed on the same line"},
        {"{\"a\": \"x\ty\"}", "test.json:1:9: invalid JSON: control character 0x09"},
        {"{\"a\": \"\\q\"}", "test.json:1:9: invalid JSON: invalid escape '\\q'"},
        {"{\"a\": \"\\u12g4\"}", "test.json:1:12: invalid JSON: \\u must be followed"},
        {"{\"a\" 1}", "test.json:1:6: invalid JSON: unexpected '1', expected ':'"},
        {"{1: 2}", "test.json:1:2: invalid JSON: unexpected '1', expected a field name"},
        {"[1,]", "test.json:1:4: invalid JSON: trailing comma before ']'"},
        {"{\"a\":\n", "test.json:2:1: invalid JSON: unexpected end of file, expected a value"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_error(cases[i][0], cases[i][1]);
}

static void test_nul_byte(void **state)
{
    (void)state;
    bw_diag d;
    bw_diag_init(&d);
    const char text[] = "{\n\"a\0\": 1}";
    assert_null(bw_config_parse(text, sizeof text - 1, "n.json", fake_getenv, &d));
    assert_true(diag_has(&d, "n.json:2:3: invalid JSON: NUL byte"));
    bw_diag_free(&d);
}

static void test_top_level_not_object(void **state)
{
    (void)state;
    expect_error("[1, 2]", "test.json:1:1: (top level): the configuration must be a JSON object");
}

/* ---- semantic errors with positions ---- */

static void test_semantic_error_positions(void **state)
{
    (void)state;
    const char *text = "{\n"
                       "  \"listeners\": [{\"address\": \"127.0.0.1:8080\"}],\n"
                       "  \"upstreams\": {\n"
                       "    \"api\": {\n"
                       "      \"servers\": [\"127.0.0.1:9001\", \"127.0.0.1:99999\"],\n"
                       "      \"connect_timeout_ms\": -5\n"
                       "    }\n"
                       "  },\n"
                       "  \"routes\": [{\"upstream\": \"apii\"}]\n"
                       "}\n";
    expect_errors(
        text, 3,
        (const char *[]){
            "test.json:5:37: upstreams.api.servers[1]: invalid server address "
            "\"127.0.0.1:99999\": invalid port",
            "test.json:6:29: upstreams.api.connect_timeout_ms: must be an integer between 1 and "
            "86400000, got -5",
            "test.json:9:27: routes[0].upstream: unknown upstream \"apii\" (known: api)"});
}

static void test_missing_required_sections(void **state)
{
    (void)state;
    expect_errors("\n  {\"workers\": 1}", 3,
                  (const char *[]){"test.json:2:3: listeners: required field is missing",
                                   "test.json:2:3: upstreams: required field is missing",
                                   "test.json:2:3: routes: required field is missing"});
}

static void test_missing_field_points_at_object(void **state)
{
    (void)state;
    expect_error("{\"listeners\": [\n   {\"tls\": null}]," UPS "," ROUTES "}",
                 "test.json:2:4: listeners[0].address: required field is missing");
}

static void test_reports_all_problems(void **state)
{
    (void)state;
    bw_diag d;
    bw_config *cfg = parse("{\"workers\": 2000, \"bogus\": 1, \"listeners\": [],"
                           "\"upstreams\": {\"api\": {\"servers\": []}},"
                           "\"routes\": [{\"upstream\": \"x\"}], \"log\": {\"level\": \"loud\"}}",
                           &d);
    assert_null(cfg);
    assert_int_equal(d.count, 6);
    assert_true(diag_has(&d, "workers: must be an integer between 0 and 1024, got 2000"));
    assert_true(diag_has(&d, "bogus: unknown field \"bogus\""));
    assert_true(diag_has(&d, "listeners: must contain at least one listener"));
    assert_true(diag_has(&d, "upstreams.api.servers: must contain at least one server"));
    assert_true(diag_has(&d, "routes[0].upstream: unknown upstream \"x\""));
    assert_true(diag_has(&d, "log.level: must be one of debug, info, warn, error, got \"loud\""));
    bw_diag_free(&d);
}

static void test_unknown_fields_every_level(void **state)
{
    (void)state;
    const char *text = "{\"listeners\": [{\"address\": \"127.0.0.1:1\", \"adress\": 1,"
                       "  \"tls\": {\"cert\": \"c\", \"key\": \"k\", \"ca\": 1}}],"
                       " \"admin\": {\"address\": \"127.0.0.1:2\", \"tokn\": 1},"
                       " \"upstreams\": {\"api\": {\"servers\": [\"127.0.0.1:9\"], \"timeout\": 1,"
                       "   \"circuit_breaker\": {\"threshold\": 1}}},"
                       " \"routes\": [{\"upstream\": \"api\", \"prefix\": \"/\"}],"
                       " \"rate_limits\": {\"p\": {\"burst\": 1}},"
                       " \"redis\": {\"url\": \"redis://127.0.0.1:6379\", \"db\": 1},"
                       " \"log\": {\"file\": 1}, \"limits\": {\"max_body\": 1}}";
    expect_errors(text, 10,
                  (const char *[]){"listeners[0].adress: unknown field \"adress\" (allowed here: "
                                   "address, tls)",
                                   "listeners[0].tls.ca: unknown field", "admin.tokn: unknown",
                                   "upstreams.api.timeout: unknown",
                                   "upstreams.api.circuit_breaker.threshold: unknown",
                                   "routes[0].prefix: unknown", "rate_limits.p.burst: unknown",
                                   "redis.db: unknown", "log.file: unknown",
                                   "limits.max_body: unknown"});
}

static void test_duplicate_key(void **state)
{
    (void)state;
    expect_error("{\"workers\": 1,\n \"workers\": 2," LISTEN "," UPS "," ROUTES "}",
                 "test.json:2:13: workers: field \"workers\" appears more than once");
}

static void test_wrong_types(void **state)
{
    (void)state;
    expect_errors("{\"workers\": \"2\", \"listeners\": {}, \"upstreams\": [], \"routes\": \"/\","
                  " \"probes_on_listeners\": 1, \"trusted_proxies\": \"10.0.0.0/8\", \"log\": []}",
                  7,
                  (const char *[]){"workers: must be an integer between 0 and 1024, got \"2\"",
                                   "listeners: must be an array of listener objects, got an object",
                                   "upstreams: must be an object mapping upstream names",
                                   "routes: must be an array of route objects, got \"/\"",
                                   "probes_on_listeners: must be true or false, got 1",
                                   "trusted_proxies: must be an array of CIDR strings",
                                   "log: must be an object, got an array"});
    expect_error("{\"workers\": 1.5," LISTEN "," UPS "," ROUTES "}",
                 "workers: must be an integer between 0 and 1024, got 1.5");
}

static void test_listener_addresses(void **state)
{
    (void)state;
    expect_errors("{\"listeners\": [{\"address\": \"example.com:80\"}, {\"address\": \"::1:80\"},"
                  " {\"address\": \"127.0.0.1\"}, {\"address\": \"127.0.0.1:0\"},"
                  " {\"address\": \"300.1.1.1:80\"}, {\"address\": 8080}]," UPS "," ROUTES "}",
                  6,
                  (const char *[]){"listeners[0].address: invalid address \"example.com:80\": "
                                   "\"example.com\" is not an IP address",
                                   "listeners[1].address: invalid address \"::1:80\": IPv6 "
                                   "addresses must be written in brackets",
                                   "listeners[2].address: invalid address \"127.0.0.1\": missing "
                                   "port",
                                   "listeners[3].address: invalid address \"127.0.0.1:0\": "
                                   "invalid port \"0\"",
                                   "listeners[4].address: invalid address \"300.1.1.1:80\": "
                                   "\"300.1.1.1\" is not a valid IPv4 address",
                                   "listeners[5].address: must be a string, got 8080"});
}

static void test_duplicate_listeners_and_admin(void **state)
{
    (void)state;
    expect_errors(
        "{\"listeners\": [{\"address\": \"127.0.0.1:8080\"},"
        " {\"address\": \"localhost:8080\"}, {\"address\": \"*:9000\"},"
        " {\"address\": \"10.1.1.1:9000\"}],"
        " \"admin\": {\"address\": \"127.0.0.1:8080\"}," UPS "," ROUTES "}",
        3,
        (const char *[]){"listeners[1].address: \"localhost:8080\" conflicts with "
                         "listeners[0] (\"127.0.0.1:8080\")",
                         "listeners[3].address: \"10.1.1.1:9000\" conflicts with "
                         "listeners[2] (\"*:9000\")",
                         "admin.address: \"127.0.0.1:8080\" conflicts with listeners[0]"});
}

static void test_admin_rules(void **state)
{
    (void)state;
    expect_errors("{" LISTEN ", \"admin\": {\"token_env\": \"1BAD\"}," UPS "," ROUTES "}", 2,
                  (const char *[]){"admin.address: required field is missing",
                                   "admin.token_env: \"1BAD\" is not a valid environment "
                                   "variable name"});
    expect_error("{" LISTEN ", \"admin\": {\"address\": \"127.0.0.1:9901\", \"token_env\": "
                 "\"BW_TOKEN\"}," UPS "," ROUTES "}",
                 "admin.token_env: environment variable BW_TOKEN is not set");

    static const char *const env[] = {"BW_TOKEN", "s3cret", NULL};
    fake_env = env;
    bw_config *cfg = parse_ok("{" LISTEN ", \"admin\": {\"address\": \"127.0.0.1:9901\", "
                              "\"token_env\": \"BW_TOKEN\"}," UPS "," ROUTES "}");
    assert_string_equal(cfg->admin.token_env, "BW_TOKEN");
    assert_true(cfg->admin.enabled);
    bw_config_free(cfg);
}

static void test_admin_max_connections(void **state)
{
    (void)state;
    bw_config *cfg =
        parse_ok("{" LISTEN ", \"admin\": {\"address\": \"127.0.0.1:9901\"}," UPS "," ROUTES "}");
    assert_int_equal(cfg->admin.max_connections, 64);
    bw_config_free(cfg);
    cfg = parse_ok("{" LISTEN ", \"admin\": {\"address\": \"127.0.0.1:9901\", "
                   "\"max_connections\": 8}," UPS "," ROUTES "}");
    assert_int_equal(cfg->admin.max_connections, 8);
    bw_config_free(cfg);
    expect_error("{" LISTEN ", \"admin\": {\"address\": \"127.0.0.1:9901\", "
                 "\"max_connections\": 0}," UPS "," ROUTES "}",
                 "test.json:1:104: admin.max_connections: must be an integer between 1 and 100000");
    expect_error("{" LISTEN ", \"admin\": {\"address\": \"127.0.0.1:9901\", "
                 "\"max_connections\": \"many\"}," UPS "," ROUTES "}",
                 "admin.max_connections:");
}

static void test_rate_limit_exempt(void **state)
{
    (void)state;
    bw_config *cfg = parse_ok("{" LISTEN "," UPS ",\"rate_limits\": {\"p\": {\"exempt\": "
                              "[\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.1\"]}},"
                              "\"routes\":[{\"upstream\":\"api\",\"rate_limit\":\"p\"}]}");
    assert_int_equal(cfg->rate_limits[0].n_exempt, 3);
    assert_int_equal(cfg->rate_limits[0].exempt[0].family, AF_INET);
    assert_int_equal(cfg->rate_limits[0].exempt[0].prefix, 8);
    assert_int_equal(cfg->rate_limits[0].exempt[1].family, AF_INET6);
    assert_int_equal(cfg->rate_limits[0].exempt[2].prefix, 32);
    bw_config_free(cfg);
    expect_errors("{" LISTEN "," UPS ",\"rate_limits\": {\"p\": {\"exempt\": "
                  "[\"10.0.0.1/8\", \"nonsense\", 7]}},"
                  "\"routes\":[{\"upstream\":\"api\",\"rate_limit\":\"p\"}]}",
                  3,
                  (const char *[]){"rate_limits.p.exempt[0]: \"10.0.0.1/8\" has bits set beyond "
                                   "the /8 prefix; did you mean \"10.0.0.0/8\"?",
                                   "rate_limits.p.exempt[1]: invalid CIDR \"nonsense\"",
                                   "rate_limits.p.exempt[2]: must be a CIDR string"});
    expect_error("{" LISTEN "," UPS ",\"rate_limits\": {\"p\": {\"exempt\": \"10.0.0.0/8\"}},"
                 "\"routes\":[{\"upstream\":\"api\",\"rate_limit\":\"p\"}]}",
                 "test.json:1:128: rate_limits.p.exempt: must be an array of CIDR strings");
}

static void test_upstream_rules(void **state)
{
    (void)state;
    expect_errors(
        "{" LISTEN ", \"upstreams\": {"
        "\"a b\": {\"servers\": [\"127.0.0.1:1\"]},"
        "\"nosrv\": {},"
        "\"x\": {\"servers\": [\"127.0.0.1:1\", \"127.0.0.1:1\", \"*:5\", 7], \"balance\": "
        "\"random\", \"retries\": 11, \"critical\": \"yes\", \"keepalive_max_idle\": -1},"
        "\"y\": [], \"z\": {\"servers\": \"127.0.0.1:1\"}},"
        " \"routes\": [{\"upstream\": \"x\"}]}",
        11,
        (const char *[]){"upstreams.a b: invalid upstream name \"a b\"",
                         "upstreams.nosrv.servers: required field is missing",
                         "upstreams.x.servers[1]: \"127.0.0.1:1\" is listed twice",
                         "upstreams.x.servers[2]: \"*:5\" is a wildcard address",
                         "upstreams.x.servers[3]: must be a \"host:port\" string, got 7",
                         "upstreams.x.balance: must be \"round_robin\" or \"least_conn\", got "
                         "\"random\"",
                         "upstreams.x.retries: must be an integer between 0 and 10, got 11",
                         "upstreams.x.critical: must be true or false, got \"yes\"",
                         "upstreams.x.keepalive_max_idle: must be an integer between 0",
                         "upstreams.y: must be an object",
                         "upstreams.z.servers: must be an array of \"host:port\" strings"});
    expect_error("{" LISTEN ", \"upstreams\": {}," ROUTES "}",
                 "upstreams: must define at least one upstream");
    expect_error("{" LISTEN ", \"upstreams\": {\"api\": {\"servers\": [\"127.0.0.1:1\"]},\n"
                 " \"api\": {\"servers\": [\"127.0.0.1:2\"]}}," ROUTES "}",
                 "test.json:2:9: upstreams.api: upstream \"api\" is defined more than once");
}

static void test_breaker_rules(void **state)
{
    (void)state;
    expect_errors(
        "{" LISTEN ", \"upstreams\": {\"api\": {\"servers\": [\"127.0.0.1:1\"],"
        " \"circuit_breaker\": {\"failure_threshold\": -1, \"failure_rate_percent\": 101,"
        " \"half_open_success_threshold\": 0, \"half_open_max_requests\": 0, \"window_ms\": 0,"
        " \"min_requests\": 0, \"slow_call_ms\": -1, \"failure_statuses\": [502, 99, 600, "
        "\"503\"]}}}," ROUTES "}",
        10,
        (const char *[]){"circuit_breaker.failure_threshold: must be an integer between 0",
                         "circuit_breaker.failure_rate_percent: must be an integer between 0 and "
                         "100, got 101",
                         "circuit_breaker.half_open_success_threshold: must be an integer",
                         "circuit_breaker.half_open_max_requests: must be an integer",
                         "circuit_breaker.window_ms: must be an integer between 1",
                         "circuit_breaker.min_requests: must be an integer between 1",
                         "circuit_breaker.slow_call_ms: must be an integer between 0",
                         "circuit_breaker.failure_statuses[1]: must be an HTTP status between 100 "
                         "and 599, got 99",
                         "circuit_breaker.failure_statuses[2]: must be an HTTP status between "
                         "100 and 599, got 600",
                         "circuit_breaker.failure_statuses[3]: must be an HTTP status"});
    expect_error("{" LISTEN ", \"upstreams\": {\"api\": {\"servers\": [\"127.0.0.1:1\"],"
                 " \"circuit_breaker\": {\"reset_timeout_ms\": 5000, \"max_reset_timeout_ms\": "
                 "1000}}}," ROUTES "}",
                 "upstreams.api.circuit_breaker.max_reset_timeout_ms: must be at least "
                 "reset_timeout_ms (5000), got 1000");
    expect_error("{" LISTEN ", \"upstreams\": {\"api\": {\"servers\": [\"127.0.0.1:1\"],"
                 " \"circuit_breaker\": {\"failure_statuses\": 502}}}," ROUTES "}",
                 "circuit_breaker.failure_statuses: must be an array of HTTP status codes");
}

static void test_breaker_max_follows_reset(void **state)
{
    (void)state;
    bw_config *cfg = parse_ok("{" LISTEN ", \"upstreams\": {\"api\": {\"servers\": "
                              "[\"127.0.0.1:1\"], \"circuit_breaker\": {\"reset_timeout_ms\": "
                              "600000, \"failure_statuses\": []}}}," ROUTES "}");
    assert_int_equal(cfg->upstreams[0].breaker.max_reset_timeout_ms, 600000);
    assert_int_equal(cfg->upstreams[0].breaker.n_failure_statuses, 0);
    bw_config_free(cfg);
}

static void test_route_rules(void **state)
{
    (void)state;
    expect_errors(
        "{" LISTEN "," UPS ", \"rate_limits\": {\"per_client\": {}},"
        " \"routes\": [{\"path_prefix\": \"v1\", \"upstream\": \"api\"},"
        " {\"host\": \"example.com:8080\", \"upstream\": \"api\"},"
        " {\"upstream\": \"api\", \"rate_limit\": \"per_ip\"},"
        " {\"path_prefix\": \"/a\"}, {\"upstream\": \"api\", \"name\": \"\"}, 5]}",
        6,
        (const char *[]){"routes[0].path_prefix: must start with '/'",
                         "routes[1].host: \"example.com:8080\" is not a host name",
                         "routes[2].rate_limit: unknown rate-limit policy \"per_ip\" (known: "
                         "per_client)",
                         "routes[3].upstream: required field is missing",
                         "routes[4].name: must not be empty", "routes[5]: must be an object"});
    expect_error("{" LISTEN "," UPS ", \"routes\": []}", "routes: must contain at least one route");
    expect_error("{" LISTEN "," UPS ", \"routes\": [{\"upstream\": \"api\", \"rate_limit\": "
                 "\"x\"}]}",
                 "routes[0].rate_limit: unknown rate-limit policy \"x\" (known: none defined)");
}

static void test_route_shadowing(void **state)
{
    (void)state;
    expect_errors("{" LISTEN "," UPS ", \"routes\": [{\"upstream\": \"api\"},"
                  " {\"path_prefix\": \"/api\", \"upstream\": \"api\"}]}",
                  1, (const char *[]){"routes[1]: never matches: routes[0] (host any"});
    expect_error("{" LISTEN "," UPS ", \"routes\": [{\"path_prefix\": \"/api\", \"upstream\": "
                 "\"api\"}, {\"path_prefix\": \"/api/v2\", \"upstream\": \"api\"}]}",
                 "routes[1]: never matches: routes[0]");
    expect_error("{" LISTEN "," UPS ", \"routes\": [{\"host\": \"a.com\", \"upstream\": \"api\"},"
                 " {\"host\": \"A.com\", \"upstream\": \"api\"}]}",
                 "routes[1]: never matches");
    /* Specific first, general later, or a different host: all reachable. */
    bw_config *cfg = parse_ok("{" LISTEN "," UPS ", \"routes\": ["
                              "{\"path_prefix\": \"/api/v2\", \"upstream\": \"api\"},"
                              "{\"path_prefix\": \"/api\", \"upstream\": \"api\"},"
                              "{\"path_prefix\": \"/apix\", \"upstream\": \"api\"},"
                              "{\"host\": \"a.com\", \"upstream\": \"api\"},"
                              "{\"host\": \"b.com\", \"upstream\": \"api\"},"
                              "{\"upstream\": \"api\"}]}");
    assert_int_equal(cfg->n_routes, 6);
    assert_string_equal(cfg->routes[3].name, "a.com/");
    bw_config_free(cfg);
}

static void test_rate_limit_rules(void **state)
{
    (void)state;
    expect_errors("{" LISTEN "," UPS "," ROUTES ", \"rate_limits\": {"
                  "\"a\": {\"key\": \"ip\", \"capacity\": 0, \"refill_per_sec\": -1,"
                  " \"ipv6_prefix\": 129, \"dry_run\": 1},"
                  "\"b\": {\"key\": \"header:X Bad\", \"capacity\": 1.5, \"ipv6_prefix\": 0},"
                  "\"c\": {\"key\": \"header:\"}, \"d!\": {}, \"e\": 3}}",
                  10,
                  (const char *[]){"rate_limits.a.key: must be \"client_ip\" or \"header:NAME\", "
                                   "got \"ip\"",
                                   "rate_limits.a.capacity: must be an integer between 1",
                                   "rate_limits.a.refill_per_sec: must be a number between 0",
                                   "rate_limits.a.ipv6_prefix: must be an integer between 1 and "
                                   "128, got 129",
                                   "rate_limits.a.dry_run: must be true or false",
                                   "rate_limits.b.key: \"header:X Bad\": the header name",
                                   "rate_limits.b.capacity: must be an integer between 1",
                                   "rate_limits.b.ipv6_prefix: must be an integer between 1",
                                   "rate_limits.c.key: \"header:\"",
                                   "rate_limits.d!: invalid policy name \"d!\""});
    expect_error("{" LISTEN "," UPS "," ROUTES ", \"rate_limits\": {\"e\": 3}}",
                 "rate_limits.e: must be an object");
    expect_error("{" LISTEN "," UPS "," ROUTES ", \"rate_limit_table_size\": 8}",
                 "rate_limit_table_size: must be an integer between 16 and 67108864, got 8");
}

static void test_trusted_proxies_rules(void **state)
{
    (void)state;
    expect_errors("{" LISTEN "," UPS "," ROUTES ", \"trusted_proxies\": [\"10.0.0.0/33\","
                  " \"fd00::/129\", \"bogus\", 5, \"10.1.2.3/8\"]}",
                  5,
                  (const char *[]){"trusted_proxies[0]: invalid CIDR \"10.0.0.0/33\"",
                                   "trusted_proxies[1]: invalid CIDR \"fd00::/129\"",
                                   "trusted_proxies[2]: invalid CIDR \"bogus\"",
                                   "trusted_proxies[3]: must be a CIDR string",
                                   "trusted_proxies[4]: \"10.1.2.3/8\" has bits set beyond the /8 "
                                   "prefix; did you mean \"10.0.0.0/8\"?"});
}

static void test_redis_rules(void **state)
{
    (void)state;
    static const char *const bad[][2] = {
        {"http://127.0.0.1:6379", "must start with redis:// or unix://"},
        {"redis://127.0.0.1", "missing port"},
        {"redis://redis.internal:6379", "host names are not resolved"},
        {"redis://pw@127.0.0.1:6379", "the credentials must be written :password@"},
        {"redis://127.0.0.1:6379/x", "the database after '/' must be a number"},
        {"rediss://127.0.0.1:6379", "rediss://"},
        {"unix://relative.sock", "absolute path"},
        {"redis://*:6379", "invalid host"},
    };
    char text[512];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(text, sizeof text, "{" LISTEN "," UPS "," ROUTES ", \"redis\": {\"url\": \"%s\"}}",
                 bad[i][0]);
        const char *needles[] = {"redis.url: invalid URL:", bad[i][1]};
        expect_errors(text, 2, needles);
    }
    expect_errors("{" LISTEN "," UPS "," ROUTES ", \"redis\": {\"sync_interval_ms\": 0,"
                  " \"key_prefix\": \"a b\", \"required\": \"no\"}}",
                  4,
                  (const char *[]){"redis.url: required field is missing",
                                   "redis.sync_interval_ms: must be an integer between 1 and 60000",
                                   "redis.key_prefix: must not contain spaces",
                                   "redis.required: must be true or false"});

    /* The password never appears in a message. */
    bw_diag d;
    assert_null(parse("{" LISTEN "," UPS "," ROUTES ", \"redis\": {\"url\": "
                      "\"redis://:hunter2@127.0.0.1/0\"}}",
                      &d));
    assert_false(diag_has(&d, "hunter2"));
    bw_diag_free(&d);

    bw_config *cfg = parse_ok("{" LISTEN "," UPS "," ROUTES
                              ", \"redis\": {\"url\": \"unix:///run/redis.sock\"}}");
    assert_true(cfg->redis.enabled);
    assert_string_equal(cfg->redis.key_prefix, "breakwater");
    assert_int_equal(cfg->redis.sync_interval_ms, 100);
    assert_false(cfg->redis.required);
    assert_int_equal(cfg->redis.connect_timeout_ms, 1000);
    bw_config_free(cfg);
}

static void test_log_and_limits_rules(void **state)
{
    (void)state;
    expect_errors("{" LISTEN "," UPS "," ROUTES ", \"log\": {\"error_log\": \"\"},"
                  " \"limits\": {\"max_header_bytes\": 1023, \"max_headers\": 257,"
                  " \"max_body_bytes\": -1, \"header_timeout_ms\": 0,"
                  " \"client_idle_timeout_ms\": 0, \"max_connections\": 0},"
                  " \"shutdown_timeout_ms\": -1}",
                  8,
                  (const char *[]){"log.error_log: must not be empty",
                                   "limits.max_header_bytes: must be an integer between 1024 and "
                                   "1048576, got 1023",
                                   "limits.max_headers: must be an integer between 8 and 256",
                                   "limits.max_body_bytes: must be an integer between 0",
                                   "limits.header_timeout_ms: must be an integer between 1",
                                   "limits.client_idle_timeout_ms: must be an integer between 1",
                                   "limits.max_connections: must be an integer between 1",
                                   "shutdown_timeout_ms: must be an integer between 0"});
    bw_config *cfg = parse_ok("{" LISTEN "," UPS "," ROUTES ", \"log\": {\"level\": \"WARNING\","
                              " \"access_log\": \"/var/log/bw/access.log\"}}");
    assert_int_equal(cfg->log.level, BW_LOG_WARN);
    assert_string_equal(cfg->log.access_log, "/var/log/bw/access.log");
    bw_config_free(cfg);
}

/* ---- files: TLS paths are resolved against the configuration's directory ---- */

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_tls_paths_relative_to_config(void **state)
{
    (void)state;
    char dir[] = "/tmp/bw_config_test_XXXXXX";
    char sub[128], cfgpath[160], cert[192], key[192], expect[256];
    assert_non_null(mkdtemp(dir));
    snprintf(sub, sizeof sub, "%s/conf", dir);
    assert_int_equal(mkdir(sub, 0700), 0);
    snprintf(cfgpath, sizeof cfgpath, "%s/bw.json", sub);
    snprintf(cert, sizeof cert, "%s/server.crt", sub);
    snprintf(key, sizeof key, "%s/server.key", sub);
    write_file(cert, "not really a PEM; the TLS module judges content\n");
    write_file(key, "same\n");
    write_file(cfgpath, "{\"listeners\": [{\"address\": \"127.0.0.1:8443\",\n"
                        "  \"tls\": {\"cert\": \"server.crt\", \"key\": \"server.key\"}}],\n"
                        " \"log\": {\"access_log\": \"access.log\"}," UPS "," ROUTES "}\n");

    bw_diag d;
    bw_diag_init(&d);
    bw_config *cfg = bw_config_load(cfgpath, fake_getenv, &d);
    for (size_t i = 0; i < d.count; i++)
        fprintf(stderr, "unexpected diag: %s\n", d.lines[i]);
    assert_non_null(cfg);
    assert_true(cfg->listeners[0].tls_enabled);
    char *real = realpath(sub, NULL);
    assert_non_null(real);
    snprintf(expect, sizeof expect, "%s/server.crt", real);
    assert_string_equal(cfg->listeners[0].tls.cert, expect);
    snprintf(expect, sizeof expect, "%s/server.key", real);
    assert_string_equal(cfg->listeners[0].tls.key, expect);
    snprintf(expect, sizeof expect, "%s/access.log", real);
    assert_string_equal(cfg->log.access_log, expect);
    assert_string_equal(cfg->path, cfgpath);
    bw_config_free(cfg);

    /* A missing key file is named with its resolved path and the system's reason. */
    unlink(key);
    cfg = bw_config_load(cfgpath, fake_getenv, &d);
    assert_null(cfg);
    snprintf(expect, sizeof expect,
             "%s:2:40: listeners[0].tls.key: cannot read \"%s/server.key\": No such file or "
             "directory",
             cfgpath, real);
    assert_true(diag_has(&d, expect));
    assert_int_equal(d.count, 1);
    bw_diag_free(&d);

    /* A directory where a file is expected. */
    assert_int_equal(mkdir(key, 0700), 0);
    cfg = bw_config_load(cfgpath, fake_getenv, &d);
    assert_null(cfg);
    assert_true(diag_has(&d, "is not a regular file"));
    bw_diag_free(&d);

    rmdir(key);
    unlink(cert);
    unlink(cfgpath);
    rmdir(sub);
    rmdir(dir);
    free(real);
}

/* "certificates": a list of {cert, key, ocsp}, exclusive with the single cert/key form, plus
 * the reload and rotation periods; every problem is placed at FILE:LINE:COL. */
static void test_tls_certificates_list(void **state)
{
    (void)state;
    char dir[] = "/tmp/bw_config_certs_XXXXXX";
    char a[128], b[128], o[128], text[2048];
    assert_non_null(mkdtemp(dir));
    snprintf(a, sizeof a, "%s/a.pem", dir);
    snprintf(b, sizeof b, "%s/b.pem", dir);
    snprintf(o, sizeof o, "%s/a.ocsp", dir);
    write_file(a, "x\n");
    write_file(b, "x\n");
    write_file(o, "x\n");

    snprintf(text, sizeof text,
             "{\"listeners\": [{\"address\": \"127.0.0.1:8443\", \"tls\": {\"certificates\": ["
             "{\"cert\": \"%s\", \"key\": \"%s\", \"ocsp\": \"%s\"},"
             "{\"cert\": \"%s\", \"key\": \"%s\"}],"
             "\"reload_check_ms\": 500, \"ticket_rotate_ms\": 60000}}]," UPS "," ROUTES "}",
             a, a, o, b, b);
    bw_config *cfg = parse_ok(text);
    const bw_tls_conf *t = &cfg->listeners[0].tls;
    assert_true(t->list);
    assert_int_equal(t->n_certs, 2);
    assert_string_equal(t->certs[0].ocsp, o);
    assert_null(t->certs[1].ocsp);
    assert_string_equal(t->certs[1].cert, b);
    assert_ptr_equal(t->cert, t->certs[0].cert); /* the first is the default */
    assert_int_equal(t->reload_check_ms, 500);
    assert_int_equal(t->ticket_rotate_ms, 60000);
    bw_config_free(cfg);

    /* The single form: one certificate, default periods. */
    snprintf(text, sizeof text,
             "{\"listeners\": [{\"address\": \"127.0.0.1:8443\", \"tls\": {\"cert\": \"%s\", "
             "\"key\": \"%s\", \"ocsp\": \"%s\"}}]," UPS "," ROUTES "}",
             a, a, o);
    cfg = parse_ok(text);
    t = &cfg->listeners[0].tls;
    assert_false(t->list);
    assert_int_equal(t->n_certs, 1);
    assert_string_equal(t->certs[0].ocsp, o);
    assert_int_equal(t->reload_check_ms, 60000);
    assert_int_equal(t->ticket_rotate_ms, 3600000);
    bw_config_free(cfg);

    /* Both forms at once. */
    snprintf(text, sizeof text,
             "{\"listeners\": [{\"address\": \"127.0.0.1:8443\",\n \"tls\": {\"cert\": \"%s\", "
             "\"key\": \"%s\",\n  \"certificates\": [{\"cert\": \"%s\", \"key\": \"%s\"}]}}]," UPS
             "," ROUTES "}",
             a, a, b, b);
    expect_error(text, "test.json:3:19: listeners[0].tls.certificates: \"certificates\" and "
                       "\"cert\"/\"key\"/\"ocsp\" are mutually exclusive");

    /* Empty, wrong type, bad element, unknown field, missing key, unreadable file. */
    expect_error("{\"listeners\": [{\"address\": \"127.0.0.1:8443\", \"tls\": {\"certificates\": "
                 "[]}}]," UPS "," ROUTES "}",
                 "test.json:1:70: listeners[0].tls.certificates: must contain at least one "
                 "certificate");
    expect_error("{\"listeners\": [{\"address\": \"127.0.0.1:8443\", \"tls\": {\"certificates\": "
                 "{}}}]," UPS "," ROUTES "}",
                 "listeners[0].tls.certificates: must be an array");
    expect_error("{\"listeners\": [{\"address\": \"127.0.0.1:8443\", \"tls\": {\"certificates\": "
                 "[7]}}]," UPS "," ROUTES "}",
                 "listeners[0].tls.certificates[0]: must be an object");
    snprintf(text, sizeof text,
             "{\"listeners\": [{\"address\": \"127.0.0.1:8443\", \"tls\": {\"certificates\": ["
             "{\"cert\": \"%s\", \"key\": \"%s\"}, {\"cert\": \"%s\", \"kee\": \"%s\"}]}}]," UPS
             "," ROUTES "}",
             a, a, b, b);
    expect_errors(text, 2,
                  (const char *[]){"listeners[0].tls.certificates[1].kee: unknown field \"kee\"",
                                   "listeners[0].tls.certificates[1].key: required field is "
                                   "missing"});
    snprintf(text, sizeof text,
             "{\"listeners\": [{\"address\": \"127.0.0.1:8443\", \"tls\": {\"certificates\": ["
             "{\"cert\": \"%s\", \"key\": \"%s\", \"ocsp\": \"%s/none.der\"}]}}]," UPS "," ROUTES
             "}",
             a, a, dir);
    expect_error(text, "listeners[0].tls.certificates[0].ocsp: cannot read");
    snprintf(text, sizeof text,
             "{\"listeners\": [{\"address\": \"127.0.0.1:8443\", \"tls\": {\"cert\": \"%s\", "
             "\"key\": \"%s\", \"reload_check_ms\": 10, \"ticket_rotate_ms\": 999}}]," UPS
             "," ROUTES "}",
             a, a);
    expect_errors(text, 2,
                  (const char *[]){"listeners[0].tls.reload_check_ms: must be an integer between "
                                   "100 and 86400000, got 10",
                                   "listeners[0].tls.ticket_rotate_ms: must be an integer "
                                   "between 1000 and 86400000, got 999"});
    unlink(a);
    unlink(b);
    unlink(o);
    rmdir(dir);
}

static void test_tls_requires_cert_and_key(void **state)
{
    (void)state;
    expect_errors(
        "{\"listeners\": [{\"address\": \"127.0.0.1:8443\", \"tls\": {}}]," UPS "," ROUTES "}", 2,
        (const char *[]){"listeners[0].tls.cert: required field is missing",
                         "listeners[0].tls.key: required field is missing"});
    expect_error("{\"listeners\": [{\"address\": \"127.0.0.1:8443\", \"tls\": true}]," UPS
                 "," ROUTES "}",
                 "listeners[0].tls: must be an object, got true");
}

static void test_load_missing_file(void **state)
{
    (void)state;
    bw_diag d;
    bw_diag_init(&d);
    assert_null(bw_config_load("/nonexistent/bw.json", fake_getenv, &d));
    assert_int_equal(d.count, 1);
    assert_string_equal(d.lines[0], "/nonexistent/bw.json: cannot open the configuration file: "
                                    "No such file or directory");
    bw_diag_free(&d);
}

/* ---- environment overrides ---- */

static const char *const BREAKER_UPS =
    "\"upstreams\": {\"set\": {\"servers\": [\"127.0.0.1:1\"], \"circuit_breaker\": "
    "{\"failure_threshold\": 9, \"reset_timeout_ms\": 1000, \"half_open_success_threshold\": 4}},"
    " \"unset\": {\"servers\": [\"127.0.0.1:2\"]}}";

static void test_env_breaker_overrides(void **state)
{
    (void)state;
    static const char *const env[] = {"CIRCUIT_BREAKER_FAILURE_THRESHOLD",
                                      "7",
                                      "CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS",
                                      "2.5",
                                      "CIRCUIT_BREAKER_HALF_OPEN_SUCCESS_THRESHOLD",
                                      "3",
                                      NULL};
    fake_env = env;
    char text[1024];
    snprintf(text, sizeof text, "{" LISTEN ", %s, \"routes\": [{\"upstream\": \"set\"}]}",
             BREAKER_UPS);
    bw_config *cfg = parse_ok(text);
    const bw_breaker_conf *set = &cfg->upstreams[0].breaker, *unset = &cfg->upstreams[1].breaker;
    /* The environment wins over the file, for every breaker. */
    assert_int_equal(set->failure_threshold, 7);
    assert_int_equal(set->reset_timeout_ms, 2500);
    assert_int_equal(set->half_open_success_threshold, 3);
    assert_int_equal(unset->failure_threshold, 7);
    assert_int_equal(unset->reset_timeout_ms, 2500);
    assert_int_equal(unset->half_open_success_threshold, 3);
    assert_false(unset->set_failure_threshold);
    /* Each override is noted with the field and the value it replaced; a value from the file
     * is a warning, a default is not. */
    assert_int_equal(cfg->n_notes, 6);
    assert_string_equal(cfg->notes[0], "environment CIRCUIT_BREAKER_FAILURE_THRESHOLD=7 replaces "
                                       "upstreams.set.circuit_breaker.failure_threshold (was 9)");
    assert_true(cfg->notes_warn[0]);
    assert_string_equal(cfg->notes[1],
                        "environment CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS=2.5 replaces "
                        "upstreams.set.circuit_breaker.reset_timeout_ms (was 1000)");
    assert_string_equal(cfg->notes[2],
                        "environment CIRCUIT_BREAKER_HALF_OPEN_SUCCESS_THRESHOLD=3 replaces "
                        "upstreams.set.circuit_breaker.half_open_success_threshold (was 4)");
    assert_string_equal(cfg->notes[3],
                        "environment CIRCUIT_BREAKER_FAILURE_THRESHOLD=7 replaces "
                        "upstreams.unset.circuit_breaker.failure_threshold (was 5, the default)");
    assert_false(cfg->notes_warn[3]);
    bw_config_free(cfg);
}

static void test_env_none_no_notes(void **state)
{
    (void)state;
    bw_config *cfg = parse_ok(MINIMAL);
    assert_int_equal(cfg->n_notes, 0);
    assert_int_equal(cfg->drain_idle_grace_ms, 1000);
    assert_int_equal(cfg->log.query, BW_LOG_QUERY_REDACT);
    assert_false(cfg->log.error_json);
    bw_config_free(cfg);
}

static void test_env_reset_raises_default_max(void **state)
{
    (void)state;
    static const char *const env[] = {"CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS", "600", NULL};
    fake_env = env;
    bw_config *cfg = parse_ok(MINIMAL);
    assert_int_equal(cfg->upstreams[0].breaker.reset_timeout_ms, 600000);
    assert_int_equal(cfg->upstreams[0].breaker.max_reset_timeout_ms, 600000);
    bw_config_free(cfg);
}

static void test_env_rate_limit_overrides(void **state)
{
    (void)state;
    static const char *const env[] = {"RATE_LIMIT_CAPACITY", "42", "RATE_LIMIT_REFILL_RATE", "0.25",
                                      NULL};
    fake_env = env;
    bw_config *cfg = parse_ok("{" LISTEN "," UPS "," ROUTES ", \"rate_limits\": {\"first\": {},"
                              " \"default\": {\"capacity\": 7}, \"other\": {}}}");
    /* The policy named "default" takes them, and they win over what the file says. */
    assert_int_equal(cfg->default_rate_limit, 1);
    assert_int_equal(cfg->rate_limits[1].capacity, 42);
    assert_true(cfg->rate_limits[1].refill_per_sec == 0.25);
    assert_int_equal(cfg->rate_limits[0].capacity, 100);
    assert_int_equal(cfg->rate_limits[2].capacity, 100);
    assert_int_equal(cfg->n_notes, 2);
    assert_string_equal(cfg->notes[0], "environment RATE_LIMIT_CAPACITY=42 replaces "
                                       "rate_limits.default.capacity (was 7)");
    assert_true(cfg->notes_warn[0]);
    assert_string_equal(cfg->notes[1], "environment RATE_LIMIT_REFILL_RATE=0.25 replaces "
                                       "rate_limits.default.refill_per_sec (was 10, the default)");
    assert_false(cfg->notes_warn[1]);
    bw_config_free(cfg);

    /* Two policies, none named "default" and no default_rate_limit: nothing takes them, and
     * that is said. */
    cfg = parse_ok("{" LISTEN "," UPS "," ROUTES ", \"rate_limits\": {\"first\": {},"
                   " \"second\": {}}}");
    assert_int_equal(cfg->default_rate_limit, -1);
    assert_int_equal(cfg->rate_limits[0].capacity, 100);
    assert_int_equal(cfg->rate_limits[1].capacity, 100);
    assert_int_equal(cfg->n_notes, 1);
    assert_non_null(strstr(cfg->notes[0], "apply to no policy"));
    assert_true(cfg->notes_warn[0]);
    bw_config_free(cfg);

    /* The only policy, whatever its name. */
    cfg = parse_ok("{" LISTEN "," UPS "," ROUTES ", \"rate_limits\": {\"api\": "
                   "{\"capacity\": 100}}}");
    assert_int_equal(cfg->default_rate_limit, 0);
    assert_int_equal(cfg->rate_limits[0].capacity, 42);
    bw_config_free(cfg);

    /* default_rate_limit names it explicitly, over a policy called "default". */
    cfg = parse_ok("{" LISTEN "," UPS "," ROUTES ", \"default_rate_limit\": \"other\", "
                   "\"rate_limits\": {\"default\": {}, \"other\": {\"capacity\": 5}}}");
    assert_int_equal(cfg->default_rate_limit, 1);
    assert_int_equal(cfg->rate_limits[1].capacity, 42);
    assert_int_equal(cfg->rate_limits[0].capacity, 100);
    bw_config_free(cfg);
}

static void test_default_rate_limit_unknown(void **state)
{
    (void)state;
    bw_diag d;
    assert_null(parse("{" LISTEN "," UPS "," ROUTES ",\n \"default_rate_limit\": \"nope\", "
                      "\"rate_limits\": {\"a\": {}}}",
                      &d));
    assert_true(diag_has(&d, "test.json:2:24: default_rate_limit: names no policy of rate_limits: "
                             "\"nope\""));
    bw_diag_free(&d);
    assert_null(parse("{" LISTEN "," UPS "," ROUTES ", \"default_rate_limit\": 3}", &d));
    assert_true(diag_has(&d, "default_rate_limit"));
    bw_diag_free(&d);
}

static void test_log_format_and_query_fields(void **state)
{
    (void)state;
    bw_config *cfg = parse_ok("{" LISTEN "," UPS "," ROUTES ", \"drain_idle_grace_ms\": 250, "
                              "\"log\": {\"error_format\": \"json\", \"query\": \"drop\"}}");
    assert_true(cfg->log.error_json);
    assert_int_equal(cfg->log.query, BW_LOG_QUERY_DROP);
    assert_int_equal(cfg->drain_idle_grace_ms, 250);
    bw_config_free(cfg);
    cfg = parse_ok("{" LISTEN "," UPS "," ROUTES ", \"log\": {\"error_format\": \"text\", "
                   "\"query\": \"keep\"}}");
    assert_false(cfg->log.error_json);
    assert_int_equal(cfg->log.query, BW_LOG_QUERY_KEEP);
    bw_config_free(cfg);
    bw_diag d;
    assert_null(parse("{" LISTEN "," UPS "," ROUTES ", \"log\": {\"error_format\": \"xml\", "
                      "\"query\": \"hide\"}}",
                      &d));
    assert_true(diag_has(&d, "log.error_format: must be \"text\" or \"json\", got \"xml\""));
    assert_true(diag_has(&d, "log.query: must be \"redact\", \"keep\" or \"drop\", got \"hide\""));
    bw_diag_free(&d);
}

static void test_env_redis_url(void **state)
{
    (void)state;
    static const char *const env[] = {"REDIS_URL", "redis://10.0.0.9:6380/1", NULL};
    fake_env = env;
    bw_config *cfg = parse_ok(MINIMAL);
    assert_true(cfg->redis.enabled);
    assert_string_equal(cfg->redis.url, "redis://10.0.0.9:6380/1");
    assert_string_equal(cfg->redis.key_prefix, "breakwater");
    bw_config_free(cfg);

    cfg = parse_ok("{" LISTEN "," UPS "," ROUTES ", \"redis\": {\"key_prefix\": \"edge\"}}");
    assert_string_equal(cfg->redis.url, "redis://10.0.0.9:6380/1");
    assert_string_equal(cfg->redis.key_prefix, "edge");
    bw_config_free(cfg);

    cfg = parse_ok("{" LISTEN "," UPS "," ROUTES
                   ", \"redis\": {\"url\": \"redis://127.0.0.1:6379\"}}");
    assert_string_equal(cfg->redis.url, "redis://10.0.0.9:6380/1");
    bw_config_free(cfg);
}

static void test_env_log_level(void **state)
{
    (void)state;
    static const char *const env[] = {"LOG_LEVEL", "ERROR", NULL};
    fake_env = env;
    bw_config *cfg = parse_ok("{" LISTEN "," UPS "," ROUTES ", \"log\": {\"level\": \"debug\"}}");
    assert_int_equal(cfg->log.level, BW_LOG_ERROR);
    bw_config_free(cfg);
}

static void test_env_empty_is_unset(void **state)
{
    (void)state;
    static const char *const env[] = {"LOG_LEVEL", "", "REDIS_URL", "", NULL};
    fake_env = env;
    bw_config *cfg = parse_ok(MINIMAL);
    assert_int_equal(cfg->log.level, BW_LOG_INFO);
    assert_false(cfg->redis.enabled);
    bw_config_free(cfg);
}

static void test_env_invalid_values(void **state)
{
    (void)state;
    static const char *const env[] = {"RATE_LIMIT_CAPACITY",
                                      "abc",
                                      "RATE_LIMIT_REFILL_RATE",
                                      "-1",
                                      "CIRCUIT_BREAKER_FAILURE_THRESHOLD",
                                      "0",
                                      "CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS",
                                      "1e3",
                                      "CIRCUIT_BREAKER_HALF_OPEN_SUCCESS_THRESHOLD",
                                      "2x",
                                      "REDIS_URL",
                                      "redis://:topsecret@db:6379",
                                      "LOG_LEVEL",
                                      "verbose",
                                      NULL};
    fake_env = env;
    bw_diag d;
    assert_null(parse(MINIMAL, &d));
    assert_int_equal(d.count, 7);
    assert_true(diag_has(&d, "test.json: environment RATE_LIMIT_CAPACITY: must be an integer "
                             "between 1 and 1000000000, got \"abc\""));
    assert_true(diag_has(&d, "environment RATE_LIMIT_REFILL_RATE: must be a number between 0"));
    assert_true(diag_has(&d, "environment CIRCUIT_BREAKER_FAILURE_THRESHOLD: must be an integer "
                             "between 1"));
    assert_true(
        diag_has(&d, "environment CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS: must be a number"));
    assert_true(diag_has(&d, "environment CIRCUIT_BREAKER_HALF_OPEN_SUCCESS_THRESHOLD: must be an "
                             "integer between 1"));
    assert_true(diag_has(&d, "environment REDIS_URL: invalid URL: invalid host:port"));
    assert_false(diag_has(&d, "topsecret"));
    assert_true(diag_has(&d, "environment LOG_LEVEL: must be one of debug, info, warn, error, got "
                             "\"verbose\""));
    bw_diag_free(&d);
}

static void test_env_ignored_when_getenv_null(void **state)
{
    (void)state;
    /* NULL means the process environment; an unlikely name keeps this independent of it. */
    bw_diag d;
    bw_diag_init(&d);
    bw_config *cfg = bw_config_parse(MINIMAL, strlen(MINIMAL), "test.json", NULL, &d);
    assert_non_null(cfg);
    bw_config_free(cfg);
    bw_diag_free(&d);
}

/* ---- CIDR ---- */

static void sa4(struct sockaddr_in *s, const char *ip)
{
    memset(s, 0, sizeof *s);
    s->sin_family = AF_INET;
    assert_int_equal(inet_pton(AF_INET, ip, &s->sin_addr), 1);
}

static void sa6(struct sockaddr_in6 *s, const char *ip)
{
    memset(s, 0, sizeof *s);
    s->sin6_family = AF_INET6;
    assert_int_equal(inet_pton(AF_INET6, ip, &s->sin6_addr), 1);
}

static void test_cidr_parse(void **state)
{
    (void)state;
    bw_cidr c;
    assert_int_equal(bw_cidr_parse("10.0.0.0/8", &c), 0);
    assert_int_equal(c.family, AF_INET);
    assert_int_equal(c.prefix, 8);
    assert_int_equal(c.addr[0], 10);
    assert_int_equal(bw_cidr_parse("192.168.1.7", &c), 0);
    assert_int_equal(c.prefix, 32);
    assert_int_equal(bw_cidr_parse("::1", &c), 0);
    assert_int_equal(c.family, AF_INET6);
    assert_int_equal(c.prefix, 128);
    assert_int_equal(bw_cidr_parse("fd00::/8", &c), 0);
    assert_int_equal(c.prefix, 8);
    assert_int_equal(bw_cidr_parse("0.0.0.0/0", &c), 0);
    assert_int_equal(c.prefix, 0);
    assert_int_equal(bw_cidr_parse("10.1.2.3/8", &c), 0); /* host bits are dropped */
    assert_int_equal(c.addr[1], 0);
    assert_int_equal(bw_cidr_parse("10.0.0.0/33", &c), -1);
    assert_int_equal(bw_cidr_parse("::/129", &c), -1);
    assert_int_equal(bw_cidr_parse("10.0.0.0/", &c), -1);
    assert_int_equal(bw_cidr_parse("10.0.0.0/-1", &c), -1);
    assert_int_equal(bw_cidr_parse("/8", &c), -1);
    assert_int_equal(bw_cidr_parse("10.0.0/8", &c), -1);
    assert_int_equal(bw_cidr_parse("example.com", &c), -1);
    assert_int_equal(bw_cidr_parse("", &c), -1);
    assert_int_equal(bw_cidr_parse(NULL, &c), -1);
}

static void test_cidr_match(void **state)
{
    (void)state;
    bw_cidr list[3];
    assert_int_equal(bw_cidr_parse("10.0.0.0/8", &list[0]), 0);
    assert_int_equal(bw_cidr_parse("192.168.1.128/25", &list[1]), 0);
    assert_int_equal(bw_cidr_parse("2001:db8::/32", &list[2]), 0);
    struct sockaddr_in s4;
    struct sockaddr_in6 s6;

    sa4(&s4, "10.200.3.4");
    assert_true(bw_cidr_list_match(list, 3, (struct sockaddr *)&s4));
    sa4(&s4, "11.0.0.1");
    assert_false(bw_cidr_list_match(list, 3, (struct sockaddr *)&s4));
    sa4(&s4, "192.168.1.200");
    assert_true(bw_cidr_list_match(list, 3, (struct sockaddr *)&s4));
    sa4(&s4, "192.168.1.127");
    assert_false(bw_cidr_list_match(list, 3, (struct sockaddr *)&s4));
    sa6(&s6, "2001:db8:1::5");
    assert_true(bw_cidr_list_match(list, 3, (struct sockaddr *)&s6));
    sa6(&s6, "2001:db9::5");
    assert_false(bw_cidr_list_match(list, 3, (struct sockaddr *)&s6));
    /* IPv4-mapped IPv6 peers match IPv4 ranges. */
    sa6(&s6, "::ffff:10.1.2.3");
    assert_true(bw_cidr_list_match(list, 3, (struct sockaddr *)&s6));
    sa6(&s6, "::ffff:11.1.2.3");
    assert_false(bw_cidr_list_match(list, 3, (struct sockaddr *)&s6));
    /* ...but an IPv6 address with the same low bits does not. */
    sa6(&s6, "::10.1.2.3");
    assert_false(bw_cidr_list_match(list, 3, (struct sockaddr *)&s6));
    assert_false(bw_cidr_list_match(list, 0, (struct sockaddr *)&s6));
    assert_false(bw_cidr_list_match(list, 3, NULL));
}

static void test_cidr_match_edges(void **state)
{
    (void)state;
    bw_cidr all4, all6, one, mapped;
    assert_int_equal(bw_cidr_parse("0.0.0.0/0", &all4), 0);
    assert_int_equal(bw_cidr_parse("::/0", &all6), 0);
    assert_int_equal(bw_cidr_parse("127.0.0.1", &one), 0);
    assert_int_equal(bw_cidr_parse("::ffff:10.0.0.0/104", &mapped), 0);
    struct sockaddr_in s4;
    struct sockaddr_in6 s6;
    sa4(&s4, "203.0.113.9");
    assert_true(bw_cidr_list_match(&all4, 1, (struct sockaddr *)&s4));
    sa6(&s6, "2001:db8::1");
    assert_false(bw_cidr_list_match(&all4, 1, (struct sockaddr *)&s6));
    assert_true(bw_cidr_list_match(&all6, 1, (struct sockaddr *)&s6));
    sa4(&s4, "127.0.0.1");
    assert_true(bw_cidr_list_match(&one, 1, (struct sockaddr *)&s4));
    sa4(&s4, "127.0.0.2");
    assert_false(bw_cidr_list_match(&one, 1, (struct sockaddr *)&s4));
    sa4(&s4, "10.9.9.9"); /* an IPv4 peer against an IPv4-mapped IPv6 range */
    assert_true(bw_cidr_list_match(&mapped, 1, (struct sockaddr *)&s4));
}

/* ---- socket addresses ---- */

static void test_sockaddr_parse_format(void **state)
{
    (void)state;
    static const char *const good[][2] = {
        {"127.0.0.1:8080", "127.0.0.1:8080"},   {"*:80", "0.0.0.0:80"},
        {"localhost:9001", "127.0.0.1:9001"},   {"LOCALHOST:1", "127.0.0.1:1"},
        {"[::1]:8443", "[::1]:8443"},           {"[::]:65535", "[::]:65535"},
        {"[2001:db8::1]:1", "[2001:db8::1]:1"},
    };
    bw_sockaddr a;
    char err[256], buf[64];
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        assert_int_equal(bw_sockaddr_parse(good[i][0], &a, err, sizeof err), 0);
        assert_string_equal(bw_sockaddr_format(&a, buf, sizeof buf), good[i][1]);
    }
    assert_int_equal(bw_sockaddr_parse("[::1]:1", &a, err, sizeof err), 0);
    assert_int_equal(a.len, sizeof(struct sockaddr_in6));
    assert_int_equal(bw_sockaddr_parse("1.2.3.4:1", &a, err, sizeof err), 0);
    assert_int_equal(a.len, sizeof(struct sockaddr_in));

    static const char *const bad[][2] = {
        {"", "empty address"},
        {"127.0.0.1", "missing port"},
        {"127.0.0.1:", "invalid port"},
        {"127.0.0.1:65536", "invalid port"},
        {"127.0.0.1:0", "invalid port"},
        {"127.0.0.1:+80", "invalid port"},
        {"127.0.0.1:80x", "invalid port"},
        {":80", "missing host"},
        {"[::1:80", "missing ']'"},
        {"[::1]", "missing port after ']'"},
        {"[::1]80", "missing port after ']'"},
        {"[::g]:80", "not a valid IPv6 address"},
        {"::1:80", "must be written in brackets"},
        {"1.2.3:80", "not a valid IPv4 address"},
        {"db.local:6379", "host names are not resolved"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        assert_int_equal(bw_sockaddr_parse(bad[i][0], &a, err, sizeof err), -1);
        if (strstr(err, bad[i][1]) == NULL) {
            fprintf(stderr, "%s: got \"%s\", expected \"%s\"\n", bad[i][0], err, bad[i][1]);
            fail();
        }
    }
    assert_int_equal(bw_sockaddr_parse(NULL, &a, err, sizeof err), -1);
}

static void test_sockaddr_format_small_buffer(void **state)
{
    (void)state;
    bw_sockaddr a;
    char err[128], buf[8];
    assert_int_equal(bw_sockaddr_parse("192.168.100.200:65000", &a, err, sizeof err), 0);
    assert_string_equal(bw_sockaddr_format(&a, buf, sizeof buf), "192.168");
    memset(&a, 0, sizeof a);
    char big[64];
    assert_non_null(strstr(bw_sockaddr_format(&a, big, sizeof big), "unknown address family"));
}

/* ---- diagnostics container ---- */

static void test_diag_grows(void **state)
{
    (void)state;
    bw_diag d;
    bw_diag_init(&d);
    for (int i = 0; i < 100; i++)
        bw_diag_add(&d, "line %d", i);
    assert_int_equal(d.count, 100);
    assert_string_equal(d.lines[0], "line 0");
    assert_string_equal(d.lines[99], "line 99");
    bw_diag_free(&d);
    assert_int_equal(d.count, 0);
    assert_null(d.lines);
    bw_diag_free(&d);
}

static void test_position_fallback_without_match(void **state)
{
    (void)state;
    /* Keys with escapes are still located: the scanner decodes them as cJSON does. */
    expect_error("{" LISTEN "," UPS "," ROUTES ",\n \"w\\u00e9\": 1}",
                 "test.json:2:13: wé: unknown field \"wé\"");
}

static void test_example_shape_passes(void **state)
{
    (void)state;
    const char *text =
        "{\n  \"workers\": 2,\n  \"listeners\": [{\"address\": \"127.0.0.1:8080\"}],\n"
        "  \"admin\": {\"address\": \"127.0.0.1:9901\"},\n"
        "  \"upstreams\": {\"demo\": {\"servers\": [\"127.0.0.1:9001\"]}},\n"
        "  \"routes\": [{\"path_prefix\": \"/\", \"upstream\": \"demo\", \"rate_limit\": "
        "\"per_client\"}],\n"
        "  \"rate_limits\": {\"per_client\": {\"key\": \"client_ip\", \"capacity\": 100, "
        "\"refill_per_sec\": 50}}\n}\n";
    bw_config *cfg = parse_ok(text);
    assert_int_equal(cfg->routes[0].rate_limit, 0);
    assert_int_equal(cfg->default_rate_limit, 0);
    bw_config_free(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_minimal_defaults, reset_env),
        cmocka_unit_test_setup(test_full_config, reset_env),
        cmocka_unit_test_setup(test_workers_zero_means_cpus, reset_env),
        cmocka_unit_test_setup(test_default_policy_named_default, reset_env),
        cmocka_unit_test_setup(test_syntax_error_position, reset_env),
        cmocka_unit_test_setup(test_syntax_trailing_comma, reset_env),
        cmocka_unit_test_setup(test_syntax_unterminated, reset_env),
        cmocka_unit_test_setup(test_syntax_empty_and_garbage, reset_env),
        cmocka_unit_test_setup(test_syntax_column_counts_characters, reset_env),
        cmocka_unit_test_setup(test_syntax_error_table, reset_env),
        cmocka_unit_test_setup(test_nul_byte, reset_env),
        cmocka_unit_test_setup(test_top_level_not_object, reset_env),
        cmocka_unit_test_setup(test_semantic_error_positions, reset_env),
        cmocka_unit_test_setup(test_missing_required_sections, reset_env),
        cmocka_unit_test_setup(test_missing_field_points_at_object, reset_env),
        cmocka_unit_test_setup(test_reports_all_problems, reset_env),
        cmocka_unit_test_setup(test_unknown_fields_every_level, reset_env),
        cmocka_unit_test_setup(test_duplicate_key, reset_env),
        cmocka_unit_test_setup(test_wrong_types, reset_env),
        cmocka_unit_test_setup(test_listener_addresses, reset_env),
        cmocka_unit_test_setup(test_duplicate_listeners_and_admin, reset_env),
        cmocka_unit_test_setup(test_admin_rules, reset_env),
        cmocka_unit_test_setup(test_upstream_rules, reset_env),
        cmocka_unit_test_setup(test_breaker_rules, reset_env),
        cmocka_unit_test_setup(test_breaker_max_follows_reset, reset_env),
        cmocka_unit_test_setup(test_route_rules, reset_env),
        cmocka_unit_test_setup(test_route_shadowing, reset_env),
        cmocka_unit_test_setup(test_rate_limit_rules, reset_env),
        cmocka_unit_test_setup(test_trusted_proxies_rules, reset_env),
        cmocka_unit_test_setup(test_redis_rules, reset_env),
        cmocka_unit_test_setup(test_log_and_limits_rules, reset_env),
        cmocka_unit_test_setup(test_tls_paths_relative_to_config, reset_env),
        cmocka_unit_test_setup(test_tls_certificates_list, reset_env),
        cmocka_unit_test_setup(test_tls_requires_cert_and_key, reset_env),
        cmocka_unit_test_setup(test_load_missing_file, reset_env),
        cmocka_unit_test_setup(test_env_breaker_overrides, reset_env),
        cmocka_unit_test_setup(test_env_reset_raises_default_max, reset_env),
        cmocka_unit_test_setup(test_env_rate_limit_overrides, reset_env),
        cmocka_unit_test_setup(test_env_none_no_notes, reset_env),
        cmocka_unit_test_setup(test_default_rate_limit_unknown, reset_env),
        cmocka_unit_test_setup(test_log_format_and_query_fields, reset_env),
        cmocka_unit_test_setup(test_env_redis_url, reset_env),
        cmocka_unit_test_setup(test_env_log_level, reset_env),
        cmocka_unit_test_setup(test_env_empty_is_unset, reset_env),
        cmocka_unit_test_setup(test_env_invalid_values, reset_env),
        cmocka_unit_test_setup(test_env_ignored_when_getenv_null, reset_env),
        cmocka_unit_test_setup(test_cidr_parse, reset_env),
        cmocka_unit_test_setup(test_cidr_match, reset_env),
        cmocka_unit_test_setup(test_cidr_match_edges, reset_env),
        cmocka_unit_test_setup(test_sockaddr_parse_format, reset_env),
        cmocka_unit_test_setup(test_sockaddr_format_small_buffer, reset_env),
        cmocka_unit_test_setup(test_diag_grows, reset_env),
        cmocka_unit_test_setup(test_position_fallback_without_match, reset_env),
        cmocka_unit_test_setup(test_example_shape_passes, reset_env),
        cmocka_unit_test_setup(test_admin_max_connections, reset_env),
        cmocka_unit_test_setup(test_rate_limit_exempt, reset_env),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
