/*
 * Unit tests of the resolver's pure part: the /etc/hosts lookup. Exact matches (any case,
 * several names per line, IPv4 and IPv6, comments), no match for prefixes or commented lines,
 * the bound on results, and arbitrary bytes (a fuzz loop with a fixed seed) that must never
 * read out of bounds or crash.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "breakwater/resolver.h"

static const char hosts[] = "127.0.0.1\tlocalhost\n"
                            "# 10.9.9.9 api.internal\n"
                            "10.0.0.1   api.internal  api   # the API\n"
                            "10.0.0.2 API.Internal\r\n"
                            "fd00::5 api.internal\n"
                            "10.0.0.3 api.internal.example\n"
                            "not-an-ip api.internal\n"
                            "   \n"
                            "10.0.0.4 other";

static void test_hosts_lookup_matches_exact_names(void **state)
{
    (void)state;
    struct sockaddr_storage out[8];
    uint32_t lens[8];
    size_t n = bw_resolver_hosts_lookup(hosts, strlen(hosts), "api.internal", 8080, out, lens, 8);
    assert_int_equal(n, 3);
    const struct sockaddr_in *a = (const struct sockaddr_in *)&out[0];
    assert_int_equal(a->sin_family, AF_INET);
    assert_int_equal(ntohs(a->sin_port), 8080);
    assert_int_equal(ntohl(a->sin_addr.s_addr), 0x0A000001);
    assert_int_equal(lens[0], sizeof(struct sockaddr_in));
    const struct sockaddr_in *b = (const struct sockaddr_in *)&out[1];
    assert_int_equal(ntohl(b->sin_addr.s_addr), 0x0A000002);
    const struct sockaddr_in6 *c = (const struct sockaddr_in6 *)&out[2];
    assert_int_equal(c->sin6_family, AF_INET6);
    assert_int_equal(lens[2], sizeof(struct sockaddr_in6));
    assert_int_equal(ntohs(c->sin6_port), 8080);
    assert_int_equal(bw_resolver_hosts_lookup(hosts, strlen(hosts), "api", 1, out, lens, 8), 1);
    assert_int_equal(bw_resolver_hosts_lookup(hosts, strlen(hosts), "other", 1, out, lens, 8), 1);
    assert_int_equal(bw_resolver_hosts_lookup(hosts, strlen(hosts), "api.int", 1, out, lens, 8), 0);
    assert_int_equal(bw_resolver_hosts_lookup(hosts, strlen(hosts), "", 1, out, lens, 8), 0);
    /* The bound on results holds. */
    assert_int_equal(
        bw_resolver_hosts_lookup(hosts, strlen(hosts), "api.internal", 1, out, lens, 2), 2);
    /* A length shorter than the text: the tail is not looked at. */
    assert_int_equal(bw_resolver_hosts_lookup(hosts, 20, "localhost", 1, out, lens, 8), 1);
    assert_int_equal(bw_resolver_hosts_lookup(hosts, 9, "localhost", 1, out, lens, 8), 0);
}

static void test_hosts_lookup_survives_arbitrary_bytes(void **state)
{
    (void)state;
    uint64_t x = 0x9E3779B97F4A7C15ull;
    struct sockaddr_storage out[4];
    uint32_t lens[4];
    for (int round = 0; round < 20000; round++) {
        size_t len = (size_t)(x % 200);
        char *buf = malloc(len ? len : 1);
        assert_non_null(buf);
        for (size_t i = 0; i < len; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            /* Mostly hosts-file alphabet, sometimes anything. */
            static const char alpha[] = "0123456789.:abcdef \t\n#xapi";
            buf[i] = (x & 7) ? alpha[x % (sizeof(alpha) - 1)] : (char)(x >> 8);
        }
        size_t n = bw_resolver_hosts_lookup(buf, len, "api", 80, out, lens, 4);
        assert_true(n <= 4);
        free(buf);
        x = x * 6364136223846793005ull + 1442695040888963407ull;
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hosts_lookup_matches_exact_names),
        cmocka_unit_test(test_hosts_lookup_survives_arbitrary_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
