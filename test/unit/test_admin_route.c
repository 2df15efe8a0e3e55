/*
 * Admin routing and access rules (src/admin_route.c): which endpoint a method and path reach,
 * what needs the token, how ?top=N and percent-escapes read, and the token comparison.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "breakwater/admin.h"

static bw_admin_route route(bw_admin_method m, const char *path, bool *found)
{
    bw_admin_route r;
    *found = bw_admin_route_match(m, path, strlen(path), &r);
    return r;
}

static void test_fixed_paths(void **state)
{
    (void)state;
    bool f;
    struct {
        const char *path;
        bw_admin_route_id id;
    } cases[] = {{"/", BW_ADMIN_R_PAGE},
                 {"/healthz", BW_ADMIN_R_HEALTHZ},
                 {"/readyz", BW_ADMIN_R_READYZ},
                 {"/metrics", BW_ADMIN_R_METRICS},
                 {"/status", BW_ADMIN_R_STATUS},
                 {"/upstreams", BW_ADMIN_R_UPSTREAMS},
                 {"/ratelimits", BW_ADMIN_R_RATELIMITS}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bw_admin_route r = route(BW_ADMIN_GET, cases[i].path, &f);
        assert_true(f);
        assert_int_equal(r.id, cases[i].id);
        assert_true(r.method_ok);
        r = route(BW_ADMIN_POST, cases[i].path, &f);
        assert_true(f);
        assert_false(r.method_ok);
    }
    route(BW_ADMIN_GET, "/healthz/", &f);
    assert_false(f);
    route(BW_ADMIN_GET, "/nope", &f);
    assert_false(f);
    route(BW_ADMIN_GET, "", &f);
    assert_false(f);
}

static void test_upstream_actions(void **state)
{
    (void)state;
    bool f;
    bw_admin_route r = route(BW_ADMIN_POST, "/upstreams/api/open", &f);
    assert_true(f);
    assert_int_equal(r.id, BW_ADMIN_R_UPSTREAM_OPEN);
    assert_true(r.method_ok);
    assert_int_equal(r.name_len, 3);
    assert_memory_equal(r.name, "api", 3);
    r = route(BW_ADMIN_POST, "/upstreams/api/reset", &f);
    assert_int_equal(r.id, BW_ADMIN_R_UPSTREAM_RESET);
    r = route(BW_ADMIN_GET, "/upstreams/api/reset", &f);
    assert_true(f);
    assert_false(r.method_ok);
    route(BW_ADMIN_POST, "/upstreams/api/close", &f);
    assert_false(f);
    route(BW_ADMIN_POST, "/upstreams//open", &f);
    assert_false(f);
    route(BW_ADMIN_POST, "/upstreams/api/open/x", &f);
    assert_false(f);
    route(BW_ADMIN_POST, "/upstreams/api", &f);
    assert_false(f);
}

static void test_ratelimit_paths(void **state)
{
    (void)state;
    bool f;
    bw_admin_route r = route(BW_ADMIN_GET, "/ratelimits/per-client", &f);
    assert_true(f);
    assert_int_equal(r.id, BW_ADMIN_R_RATELIMIT_TOP);
    assert_int_equal(r.name_len, strlen("per-client"));
    r = route(BW_ADMIN_DELETE, "/ratelimits/per-client/203.0.113.7", &f);
    assert_true(f);
    assert_int_equal(r.id, BW_ADMIN_R_RATELIMIT_KEY);
    assert_true(r.method_ok);
    assert_int_equal(r.arg_len, strlen("203.0.113.7"));
    r = route(BW_ADMIN_GET, "/ratelimits/per-client/203.0.113.7", &f);
    assert_true(f);
    assert_false(r.method_ok);
    r = route(BW_ADMIN_DELETE, "/ratelimits/per-client", &f);
    assert_false(r.method_ok);
    route(BW_ADMIN_DELETE, "/ratelimits/p/a/b", &f);
    assert_false(f);
    route(BW_ADMIN_DELETE, "/ratelimits/p/", &f);
    assert_false(f);
}

static void test_public_endpoints(void **state)
{
    (void)state;
    bool f;
    bw_admin_route r = route(BW_ADMIN_GET, "/healthz", &f);
    assert_true(bw_admin_route_public(&r));
    r = route(BW_ADMIN_HEAD, "/readyz", &f);
    assert_true(bw_admin_route_public(&r));
    r = route(BW_ADMIN_GET, "/", &f);
    assert_true(bw_admin_route_public(&r));
    r = route(BW_ADMIN_POST, "/", &f);
    assert_false(bw_admin_route_public(&r));
    const char *private_paths[] = {"/metrics", "/status", "/upstreams", "/ratelimits",
                                   "/ratelimits/x"};
    for (size_t i = 0; i < sizeof(private_paths) / sizeof(private_paths[0]); i++) {
        r = route(BW_ADMIN_GET, private_paths[i], &f);
        assert_false(bw_admin_route_public(&r));
    }
    r = route(BW_ADMIN_POST, "/upstreams/a/open", &f);
    assert_false(bw_admin_route_public(&r));
}

static void test_top(void **state)
{
    (void)state;
    uint32_t n;
    assert_int_equal(bw_admin_parse_top("", 0, &n), 0);
    assert_int_equal(n, BW_ADMIN_TOP_DEFAULT);
    assert_int_equal(bw_admin_parse_top(NULL, 0, &n), 0);
    assert_int_equal(bw_admin_parse_top("top=3", 5, &n), 0);
    assert_int_equal(n, 3);
    assert_int_equal(bw_admin_parse_top("x=1&top=64", 10, &n), 0);
    assert_int_equal(n, 64);
    const char *bad[] = {"top=0", "top=65", "top=", "top=-1", "top=1x", "top=99999999", "top=a"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(bw_admin_parse_top(bad[i], strlen(bad[i]), &n), -1);
}

static void test_token(void **state)
{
    (void)state;
    assert_true(bw_admin_token_matches("s3cret", "Bearer s3cret"));
    assert_true(bw_admin_token_matches("s3cret", "bearer s3cret"));
    assert_false(bw_admin_token_matches("s3cret", "Bearer s3cre"));
    assert_false(bw_admin_token_matches("s3cret", "Bearer s3cretx"));
    assert_false(bw_admin_token_matches("s3cret", "Basic s3cret"));
    assert_false(bw_admin_token_matches("s3cret", NULL));
    assert_false(bw_admin_token_matches("s3cret", ""));
}

static void test_unescape(void **state)
{
    (void)state;
    char out[16];
    assert_int_equal(bw_admin_unescape("a%2Fb", 5, out, sizeof(out)), 3);
    assert_string_equal(out, "a/b");
    assert_int_equal(bw_admin_unescape("2001%3Adb8%3A%3A", 16, out, sizeof(out)), 10);
    assert_string_equal(out, "2001:db8::");
    assert_int_equal(bw_admin_unescape("%", 1, out, sizeof(out)), -1);
    assert_int_equal(bw_admin_unescape("%4", 2, out, sizeof(out)), -1);
    assert_int_equal(bw_admin_unescape("%zz", 3, out, sizeof(out)), -1);
    assert_int_equal(bw_admin_unescape("a%00", 4, out, sizeof(out)), -1);
    assert_int_equal(bw_admin_unescape("0123456789abcdefg", 17, out, sizeof(out)), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixed_paths),
        cmocka_unit_test(test_upstream_actions),
        cmocka_unit_test(test_ratelimit_paths),
        cmocka_unit_test(test_public_endpoints),
        cmocka_unit_test(test_top),
        cmocka_unit_test(test_token),
        cmocka_unit_test(test_unescape),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
