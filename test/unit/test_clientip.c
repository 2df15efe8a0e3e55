/*
 * Unit tests for src/clientip.c: who a request is charged to, from the peer address, the
 * trusted_proxies list and X-Forwarded-For, including everything a hostile client can put in
 * that header.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/un.h>

#include "breakwater/clientip.h"

typedef struct peer {
    struct sockaddr_storage ss;
} peer;

static const struct sockaddr *mkpeer(peer *p, const char *text)
{
    memset(p, 0, sizeof(*p));
    if (strchr(text, ':') == NULL) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&p->ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons(40000);
        assert_int_equal(inet_pton(AF_INET, text, &sin->sin_addr), 1);
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&p->ss;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(40000);
        assert_int_equal(inet_pton(AF_INET6, text, &sin6->sin6_addr), 1);
    }
    return (const struct sockaddr *)&p->ss;
}

/* trusted_proxies of every test: loopback, 10/8 and an IPv6 range. */
static bw_cidr trusted[4];
static const size_t n_trusted = 4;

static int setup(void **state)
{
    (void)state;
    const char *ranges[4] = {"127.0.0.1/32", "10.0.0.0/8", "::1/128", "2001:db8:ffff::/48"};
    for (size_t i = 0; i < 4; i++)
        if (bw_cidr_parse(ranges[i], &trusted[i]) != 0)
            return -1;
    return 0;
}

/* The identity's printable form for a peer and an X-Forwarded-For value (NULL: absent). */
static const char *ident(const char *peer_text, const char *xff, uint32_t prefix, bw_clientip *out)
{
    peer p;
    const struct sockaddr *sa = mkpeer(&p, peer_text);
    assert_int_equal(
        bw_clientip_key(sa, xff, xff ? strlen(xff) : 0, trusted, n_trusted, prefix, out), 0);
    return out->text;
}

/* Exempt networks match the client found by the walk, on its whole address. */
static void test_exempt_matching(void **state)
{
    (void)state;
    bw_cidr ex[3];
    assert_int_equal(bw_cidr_parse("198.51.100.0/24", &ex[0]), 0);
    assert_int_equal(bw_cidr_parse("2001:db8:1:2::5/128", &ex[1]), 0);
    assert_int_equal(bw_cidr_parse("192.0.2.7", &ex[2]), 0);
    bw_clientip c;
    ident("198.51.100.200", NULL, 128, &c);
    assert_true(bw_clientip_in(&c, ex, 3));
    ident("198.51.101.1", NULL, 128, &c);
    assert_false(bw_clientip_in(&c, ex, 3));
    ident("192.0.2.7", NULL, 128, &c);
    assert_true(bw_clientip_in(&c, ex, 3));
    ident("192.0.2.8", NULL, 128, &c);
    assert_false(bw_clientip_in(&c, ex, 3));
    ident("2001:db8:1:2::5", NULL, 128, &c);
    assert_true(bw_clientip_in(&c, ex, 3));
    ident("2001:db8:1:2::6", NULL, 128, &c);
    assert_false(bw_clientip_in(&c, ex, 3));
    /* A mapped IPv4 peer is that IPv4 client. */
    ident("::ffff:198.51.100.9", NULL, 128, &c);
    assert_true(bw_clientip_in(&c, ex, 3));
    /* Through a trusted proxy: the right-most untrusted element decides. */
    ident("127.0.0.1", "198.51.100.1", 128, &c);
    assert_true(bw_clientip_in(&c, ex, 3));
    ident("127.0.0.1", "198.51.100.1, 203.0.113.1", 128, &c);
    assert_false(bw_clientip_in(&c, ex, 3));
    ident("192.0.2.99", "198.51.100.1", 128, &c); /* untrusted peer: X-Forwarded-For ignored */
    assert_false(bw_clientip_in(&c, ex, 3));
    assert_false(bw_clientip_in(&c, ex, 0));
}

static void test_untrusted_peer_ignores_xff(void **state)
{
    (void)state;
    bw_clientip c;
    assert_string_equal(ident("192.0.2.10", NULL, 64, &c), "192.0.2.10");
    assert_int_equal(c.source, BW_CLIENTIP_PEER);
    assert_string_equal(ident("192.0.2.10", "203.0.113.9", 64, &c), "192.0.2.10");
    assert_string_equal(ident("192.0.2.10", "127.0.0.1", 64, &c), "192.0.2.10");
    assert_string_equal(ident("192.0.2.10", "garbage", 64, &c), "192.0.2.10");
    assert_int_equal(c.source, BW_CLIENTIP_PEER);
    assert_int_equal(c.family, AF_INET);
    assert_int_equal(c.key[0], 4);
    assert_memory_equal(c.key + 1, "\xc0\x00\x02\x0a", 4);
    for (int i = 5; i < BW_CLIENTIP_KEY_LEN; i++)
        assert_int_equal(c.key[i], 0);
    /* No trusted proxies at all: the peer, always. */
    peer p;
    assert_int_equal(bw_clientip_key(mkpeer(&p, "127.0.0.1"), "203.0.113.9", 11, NULL, 0, 64, &c),
                     0);
    assert_string_equal(c.text, "127.0.0.1");
}

static void test_trusted_peer_uses_rightmost_untrusted(void **state)
{
    (void)state;
    bw_clientip c;
    assert_string_equal(ident("127.0.0.1", "203.0.113.9", 64, &c), "203.0.113.9");
    assert_int_equal(c.source, BW_CLIENTIP_XFF);
    /* Whatever the client wrote on the left is not believed. */
    assert_string_equal(ident("127.0.0.1", "1.2.3.4, 203.0.113.9", 64, &c), "203.0.113.9");
    /* A chain of trusted proxies is skipped. */
    assert_string_equal(ident("127.0.0.1", "1.2.3.4, 203.0.113.9, 10.0.0.2, 10.1.1.1", 64, &c),
                        "203.0.113.9");
    assert_string_equal(ident("10.9.9.9", "198.51.100.7,10.0.0.3", 64, &c), "198.51.100.7");
    /* Every element trusted: the left-most. */
    assert_string_equal(ident("127.0.0.1", "10.0.0.5, 10.0.0.6", 64, &c), "10.0.0.5");
    assert_int_equal(c.source, BW_CLIENTIP_XFF);
    /* Absent or empty header: the peer. */
    assert_string_equal(ident("127.0.0.1", NULL, 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "", 64, &c), "127.0.0.1");
    assert_int_equal(c.source, BW_CLIENTIP_PEER);
    /* Two header lines joined by the caller. */
    assert_string_equal(ident("127.0.0.1", "198.51.100.1, 203.0.113.5, 10.0.0.1", 64, &c),
                        "203.0.113.5");
}

static void test_malformed_stops_at_last_trusted(void **state)
{
    (void)state;
    bw_clientip c;
    /* Right-most element unreadable: the peer (the last trusted hop). */
    assert_string_equal(ident("127.0.0.1", "203.0.113.9, garbage", 64, &c), "127.0.0.1");
    assert_int_equal(c.source, BW_CLIENTIP_PEER);
    assert_string_equal(ident("127.0.0.1", "203.0.113.9, unknown", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "203.0.113.9, ", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", ",", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "   ", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "1.2.3", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "1.2.3.4.5", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "256.1.1.1", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "0x7f.0.0.1", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "_hidden", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "fe80::1%eth0", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "1.2.3.4;5.6.7.8", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "\"1.2.3.4\"", 64, &c), "127.0.0.1");
    /* Unreadable after a trusted hop: that hop. */
    assert_string_equal(ident("127.0.0.1", "garbage, 10.0.0.3", 64, &c), "10.0.0.3");
    assert_int_equal(c.source, BW_CLIENTIP_XFF);
    /* An empty element in the middle stops the walk too. */
    assert_string_equal(ident("127.0.0.1", "1.2.3.4,,10.0.0.3", 64, &c), "10.0.0.3");
    /* But garbage left of the client is never looked at. */
    assert_string_equal(ident("127.0.0.1", "garbage,,, 203.0.113.9", 64, &c), "203.0.113.9");
    /* Whitespace around elements is fine. */
    assert_string_equal(ident("127.0.0.1", " \t203.0.113.9 \t", 64, &c), "203.0.113.9");

    /* A NUL byte inside the value. */
    peer p;
    const char nul[] = "203.0.113.9\0, 5.6.7.8";
    assert_int_equal(
        bw_clientip_key(mkpeer(&p, "127.0.0.1"), nul, sizeof(nul) - 1, trusted, n_trusted, 64, &c),
        0);
    assert_string_equal(c.text, "5.6.7.8");
    const char nul2[] = "5.6.7.8, 203.0.113.9\0";
    assert_int_equal(bw_clientip_key(mkpeer(&p, "127.0.0.1"), nul2, sizeof(nul2) - 1, trusted,
                                     n_trusted, 64, &c),
                     0);
    assert_string_equal(c.text, "127.0.0.1");
}

static void test_overlong(void **state)
{
    (void)state;
    bw_clientip c;
    char buf[200000];
    /* An element longer than any address (here 100 digits). */
    memset(buf, '1', 100);
    buf[100] = '\0';
    assert_string_equal(ident("127.0.0.1", buf, 64, &c), "127.0.0.1");
    /* Padding with whitespace beyond the element bound is not an address either. */
    snprintf(buf, sizeof(buf), "%80s203.0.113.9", "");
    assert_string_equal(ident("127.0.0.1", buf, 64, &c), "127.0.0.1");
    /* A huge header: only its right end is read, and the client is found there. */
    memset(buf, 'x', 150000);
    snprintf(buf + 150000, sizeof(buf) - 150000, ", 203.0.113.9, 10.0.0.1");
    assert_string_equal(ident("127.0.0.1", buf, 64, &c), "203.0.113.9");
    /* 40 trusted hops: the walk gives up after 32 and keeps the last trusted one. */
    size_t off = 0;
    off += (size_t)snprintf(buf + off, sizeof(buf) - off, "198.51.100.1");
    for (int i = 1; i <= 40; i++)
        off += (size_t)snprintf(buf + off, sizeof(buf) - off, ", 10.0.0.%d", i);
    assert_string_equal(ident("127.0.0.1", buf, 64, &c), "10.0.0.9");
    assert_int_equal(c.source, BW_CLIENTIP_XFF);
}

static void test_ports_and_brackets(void **state)
{
    (void)state;
    bw_clientip c;
    assert_string_equal(ident("127.0.0.1", "203.0.113.9:51234", 64, &c), "203.0.113.9");
    assert_string_equal(ident("127.0.0.1", "[2001:db8::1]", 128, &c), "2001:db8::1");
    assert_string_equal(ident("127.0.0.1", "[2001:db8::1]:443", 128, &c), "2001:db8::1");
    assert_string_equal(ident("127.0.0.1", "2001:db8::1", 128, &c), "2001:db8::1");
    /* A trusted hop with a port is still trusted. */
    assert_string_equal(ident("127.0.0.1", "203.0.113.9, 10.0.0.1:8080", 64, &c), "203.0.113.9");
    /* Broken forms stop the walk. */
    assert_string_equal(ident("127.0.0.1", "[2001:db8::1", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "2001:db8::1]", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "[2001:db8::1]:", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "[2001:db8::1]x", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "203.0.113.9:", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "203.0.113.9:99999", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "203.0.113.9:123456", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "203.0.113.9:80:80", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "[203.0.113.9]", 64, &c), "127.0.0.1");
    assert_string_equal(ident("127.0.0.1", "[203.0.113.9]:80", 64, &c), "127.0.0.1");
}

static void test_ipv6_grouping(void **state)
{
    (void)state;
    bw_clientip a, b, x;
    assert_string_equal(ident("2001:db8:aa:bb:1:2:3:4", NULL, 64, &a), "2001:db8:aa:bb::/64");
    assert_int_equal(a.family, AF_INET6);
    assert_int_equal(a.key[0], 6);
    /* Another address of the same /64: the same client. */
    ident("2001:db8:aa:bb:ffff:ffff:ffff:ffff", NULL, 64, &b);
    assert_memory_equal(a.key, b.key, BW_CLIENTIP_KEY_LEN);
    ident("2001:db8:aa:bc::1", NULL, 64, &x);
    assert_memory_not_equal(a.key, x.key, BW_CLIENTIP_KEY_LEN);

    assert_string_equal(ident("2001:db8:aa:bb:1:2:3:4", NULL, 48, &a), "2001:db8:aa::/48");
    assert_string_equal(ident("2001:db8:aa:bb:1:2:3:4", NULL, 128, &a), "2001:db8:aa:bb:1:2:3:4");
    assert_string_equal(ident("2001:db8:aa:bb:1:2:3:4", NULL, 200, &a), "2001:db8:aa:bb:1:2:3:4");
    assert_int_equal(a.prefix, 128);
    assert_string_equal(ident("2001:db8:aa:bb:1:2:3:4", NULL, 0, &a), "::/0");
    /* A prefix that ends inside a byte: 56 + 1 bits keep the top bit of 0xff in byte 7. */
    assert_string_equal(ident("2001:db8:aa:bbff::1", NULL, 57, &a), "2001:db8:aa:bb80::/57");
    /* IPv4 is never grouped. */
    assert_string_equal(ident("192.0.2.77", NULL, 8, &a), "192.0.2.77");
    assert_int_equal(a.prefix, 32);

    /* From X-Forwarded-For, through a trusted IPv6 proxy. */
    assert_string_equal(ident("::1", "2001:db8:1:2:3::9, 2001:db8:ffff:1::5", 64, &a),
                        "2001:db8:1:2::/64");
    assert_int_equal(a.source, BW_CLIENTIP_XFF);
    /* The trust check uses the full address, not the grouped one. */
    assert_string_equal(ident("2001:db8:ffff:0:1::1", "203.0.113.9", 32, &a), "203.0.113.9");
}

static void test_ipv4_mapped(void **state)
{
    (void)state;
    bw_clientip a, b;
    /* A dual-stack socket's view of an IPv4 peer is that IPv4 peer. */
    ident("::ffff:192.0.2.1", NULL, 64, &a);
    ident("192.0.2.1", NULL, 64, &b);
    assert_int_equal(a.family, AF_INET);
    assert_string_equal(a.text, "192.0.2.1");
    assert_memory_equal(a.key, b.key, BW_CLIENTIP_KEY_LEN);
    /* ... and it is trusted as such. */
    assert_string_equal(ident("::ffff:127.0.0.1", "203.0.113.9", 64, &a), "203.0.113.9");
    /* Mapped addresses inside X-Forwarded-For too. */
    assert_string_equal(ident("127.0.0.1", "::ffff:203.0.113.9", 64, &a), "203.0.113.9");
    assert_int_equal(a.family, AF_INET);
    assert_string_equal(ident("127.0.0.1", "203.0.113.9, ::ffff:10.0.0.1", 64, &a), "203.0.113.9");
}

static void test_non_ip_peer(void **state)
{
    (void)state;
    bw_clientip c;
    struct sockaddr_un un;
    memset(&un, 0, sizeof(un));
    un.sun_family = AF_UNIX;
    assert_int_equal(bw_clientip_key((const struct sockaddr *)&un, "203.0.113.9", 11, trusted,
                                     n_trusted, 64, &c),
                     -1);
    assert_int_equal(c.family, AF_UNSPEC);
    assert_string_equal(c.text, "unknown");
    assert_int_equal(c.key[0], 0);
    assert_int_equal(bw_clientip_key(NULL, NULL, 0, trusted, n_trusted, 64, &c), -1);
    assert_string_equal(c.text, "unknown");
}

static void test_format(void **state)
{
    (void)state;
    bw_clientip c;
    ident("2001:db8:aa:bb:1:2:3:4", NULL, 64, &c);
    char buf[64];
    assert_string_equal(bw_clientip_format(&c, buf, sizeof(buf)), "2001:db8:aa:bb::/64");
    char small[5];
    assert_string_equal(bw_clientip_format(&c, small, sizeof(small)), "2001");
    char none[1] = {'z'};
    bw_clientip_format(&c, none, 0);
    assert_int_equal(none[0], 'z');
}

/* xorshift64* for the random-input test. */
static uint64_t prng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * UINT64_C(2685821657736338717);
}

/* Random bytes drawn mostly from the address alphabet: never a crash, always a valid identity,
 * and never one taken from the header when the peer is not trusted. */
static void test_random_input(void **state)
{
    (void)state;
    static const char alphabet[] = "0123456789abcdef.:[], \t10.0.0.1,:::ffff:xyz\0\xff";
    uint64_t s = 42;
    char buf[300];
    peer tp, up;
    const struct sockaddr *tsa = mkpeer(&tp, "127.0.0.1");
    const struct sockaddr *usa = mkpeer(&up, "192.0.2.200");
    for (int iter = 0; iter < 200000; iter++) {
        size_t len = (size_t)(prng_next(&s) % sizeof(buf));
        for (size_t i = 0; i < len; i++)
            buf[i] = alphabet[prng_next(&s) % (sizeof(alphabet) - 1)];
        bw_clientip c;
        assert_int_equal(bw_clientip_key(tsa, buf, len, trusted, n_trusted, 64, &c), 0);
        assert_true(c.family == AF_INET || c.family == AF_INET6);
        assert_true(strlen(c.text) < sizeof(c.text));
        assert_int_equal(bw_clientip_key(usa, buf, len, trusted, n_trusted, 64, &c), 0);
        assert_string_equal(c.text, "192.0.2.200");
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_untrusted_peer_ignores_xff),
        cmocka_unit_test(test_trusted_peer_uses_rightmost_untrusted),
        cmocka_unit_test(test_malformed_stops_at_last_trusted),
        cmocka_unit_test(test_overlong),
        cmocka_unit_test(test_ports_and_brackets),
        cmocka_unit_test(test_ipv6_grouping),
        cmocka_unit_test(test_ipv4_mapped),
        cmocka_unit_test(test_non_ip_peer),
        cmocka_unit_test(test_format),
        cmocka_unit_test_setup(test_exempt_matching, setup),
        cmocka_unit_test(test_random_input),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
