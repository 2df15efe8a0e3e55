/*
 * Unit tests for src/path.c: the canonical path and host that routing and rate-limit policies
 * match on. The bypass spellings an attacker would try against a `/login` route are each shown
 * to reach `/login`, and a seeded random property test checks that the result never holds a
 * spelling routing could miss and that normalising twice changes nothing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "breakwater/path.h"

static bw_path_status norm(const char *in, char *out, size_t cap)
{
    size_t n = 0;
    bw_path_status s = bw_path_normalize(in, strlen(in), out, cap, &n);
    if (s == BW_PATH_OK)
        out[n] = '\0';
    else
        out[0] = '\0';
    return s;
}

static void expect(const char *in, const char *want)
{
    char out[512];
    bw_path_status s = norm(in, out, sizeof(out) - 1);
    if (s != BW_PATH_OK)
        fail_msg("%s: %s", in, bw_path_status_text(s));
    assert_string_equal(out, want);
}

static void expect_refused(const char *in, bw_path_status want)
{
    char out[512];
    assert_int_equal(norm(in, out, sizeof(out) - 1), want);
}

static void test_login_bypasses(void **state)
{
    (void)state;
    expect("/login", "/login");
    expect("//login", "/login");
    expect("/./login", "/login");
    expect("/x/../login", "/login");
    expect("/%6cogin", "/login");
    expect("/%6Cogin", "/login");
    expect("/x/%2e%2e/login", "/login");
    expect("/x/%2E./login", "/login");
    expect("///.//x//..//login", "/login");
}

static void test_segments(void **state)
{
    (void)state;
    expect("/", "/");
    expect("//", "/");
    expect("/.", "/");
    expect("/a/.", "/a/");
    expect("/a/..", "/");
    expect("/a/b/..", "/a/");
    expect("/a/b/../", "/a/");
    expect("/a/./b/", "/a/b/");
    expect("/a//b///c", "/a/b/c");
    expect("/a/b/../../c", "/c");
    expect("/a/...", "/a/...");
    expect("/a/..b/.c", "/a/..b/.c");
}

static void test_escapes(void **state)
{
    (void)state;
    /* unreserved decoded, others kept with upper-case hex */
    expect("/%7euser/%41%5a%30%2D%5F", "/~user/AZ0-_");
    expect("/a%3ab%3Fc%20d", "/a%3Ab%3Fc%20d");
    expect("/%25", "/%25");
    expect("/%252e%252e/", "/%252e%252e/"); /* a literal "%2e" is not decoded twice */
    expect_refused("/a%2fb", BW_PATH_ENCODED_SLASH);
    expect_refused("/a%2Fb", BW_PATH_ENCODED_SLASH);
    expect_refused("/a%5cb", BW_PATH_ENCODED_SLASH);
    expect_refused("/a%00", BW_PATH_ENCODED_NUL);
    expect_refused("/a\\b", BW_PATH_BACKSLASH);
    expect_refused("/a%", BW_PATH_BAD_ESCAPE);
    expect_refused("/a%4", BW_PATH_BAD_ESCAPE);
    expect_refused("/a%g1", BW_PATH_BAD_ESCAPE);
}

static void test_refusals(void **state)
{
    (void)state;
    expect_refused("/..", BW_PATH_ABOVE_ROOT);
    expect_refused("/../x", BW_PATH_ABOVE_ROOT);
    expect_refused("/a/../..", BW_PATH_ABOVE_ROOT);
    expect_refused("/%2e%2e/x", BW_PATH_ABOVE_ROOT);
    expect_refused("", BW_PATH_NOT_ORIGIN);
    expect_refused("login", BW_PATH_NOT_ORIGIN);
    expect_refused("*", BW_PATH_NOT_ORIGIN);
    char out[4];
    size_t n;
    assert_int_equal(bw_path_normalize("/abcdef", 7, out, sizeof(out), &n), BW_PATH_TOO_LONG);
    for (int s = BW_PATH_OK; s <= BW_PATH_TOO_LONG; s++)
        assert_true(strlen(bw_path_status_text((bw_path_status)s)) > 1);
}

static void host(const char *in, const char *want)
{
    char out[64];
    size_t n = bw_host_normalize(in, strlen(in), out, sizeof(out));
    assert_int_equal(n, strlen(want));
    assert_memory_equal(out, want, n);
}

static void test_hosts(void **state)
{
    (void)state;
    host("api.example.com", "api.example.com");
    host("API.Example.Com", "api.example.com");
    host("api.example.com.", "api.example.com");
    host("api.example.com.:80", "api.example.com");
    host("api.example.com:8080", "api.example.com");
    host("[::1]:443", "[::1]");
    host("[2001:DB8::1]", "[2001:db8::1]");
    host("", "");
    host(":80", "");
    host("[::1", "");
    char tiny[3];
    assert_int_equal(bw_host_normalize("abcd", 4, tiny, sizeof(tiny)), 0);
}

static void test_percent_decode(void **state)
{
    (void)state;
    char out[16];
    assert_int_equal(bw_percent_decode("a%20b%2Fc", 9, out, sizeof(out)), 5);
    assert_string_equal(out, "a b/c");
    assert_int_equal(bw_percent_decode("%7e%7E", 6, out, sizeof(out)), 2);
    assert_string_equal(out, "~~");
    assert_int_equal(bw_percent_decode("", 0, out, sizeof(out)), 0);
    assert_string_equal(out, "");
    assert_int_equal(bw_percent_decode("%", 1, out, sizeof(out)), -1);
    assert_int_equal(bw_percent_decode("%4", 2, out, sizeof(out)), -1);
    assert_int_equal(bw_percent_decode("%zz", 3, out, sizeof(out)), -1);
    assert_int_equal(bw_percent_decode("a%00", 4, out, sizeof(out)), -1);
    assert_int_equal(bw_percent_decode("abcd", 4, out, 4), -1); /* no room for the NUL */
    assert_int_equal(bw_percent_decode("abc", 3, out, 4), 3);
    assert_int_equal(bw_percent_decode("a", 1, out, 0), -1);
    assert_int_equal(bw_hex_digit('f'), 15);
    assert_int_equal(bw_hex_digit('G'), -1);
}

static int contains(const char *p, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(p + i, needle, k) == 0)
            return 1;
    return 0;
}

/* Random paths over an alphabet rich in separators, dots and escapes: every accepted one must be
 * canonical and a fixed point. */
static void test_random_property(void **state)
{
    (void)state;
    static const char *atoms[] = {"/",   "//",  ".",   "..", "a", "b", "%2e", "%2E", "%41", "%7e",
                                  "%3a", "%2f", "%25", "%",  "x", "~", "%5c", "%00", "-"};
    const size_t n_atoms = sizeof(atoms) / sizeof(atoms[0]);
    unsigned seed = 12345;
    unsigned accepted = 0;
    for (int trial = 0; trial < 200000; trial++) {
        char in[128];
        size_t len = 0;
        in[len++] = '/';
        int parts = (int)(rand_r(&seed) % 12);
        for (int i = 0; i < parts; i++) {
            const char *a = atoms[(size_t)rand_r(&seed) % n_atoms];
            size_t k = strlen(a);
            if (len + k >= sizeof(in))
                break;
            memcpy(in + len, a, k);
            len += k;
        }
        char out[128], again[128];
        size_t n = 0, m = 0;
        if (bw_path_normalize(in, len, out, sizeof(out), &n) != BW_PATH_OK)
            continue;
        accepted++;
        assert_true(n >= 1 && n <= len && out[0] == '/');
        assert_false(contains(out, n, "//"));
        assert_false(contains(out, n, "/./"));
        assert_false(contains(out, n, "/../"));
        assert_false(n >= 2 && memcmp(out + n - 2, "/.", 2) == 0);
        assert_false(n >= 3 && memcmp(out + n - 3, "/..", 3) == 0);
        assert_false(contains(out, n, "%2E") || contains(out, n, "%41") ||
                     contains(out, n, "%7E") || contains(out, n, "%2e"));
        assert_int_equal(bw_path_normalize(out, n, again, sizeof(again), &m), BW_PATH_OK);
        assert_int_equal(m, n);
        assert_memory_equal(out, again, n);
    }
    assert_true(accepted > 10000); /* the generator reaches the interesting cases */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_login_bypasses), cmocka_unit_test(test_segments),
        cmocka_unit_test(test_escapes),        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_hosts),          cmocka_unit_test(test_random_property),
        cmocka_unit_test(test_percent_decode),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
