/*
 * Client identity: the peer address, or the right-most untrusted X-Forwarded-For address when
 * the peer is a trusted proxy.
 *
 * X-Forwarded-For is a list every proxy appends to, so only its right end is trustworthy: each
 * element was written by the hop to its right, and an element is believed only when that hop is
 * in trusted_proxies. The walk therefore goes right to left, starting from the peer, and stops at
 * the first untrusted address (the client), or at the first element it cannot read, in which case
 * the last trusted address is the identity (all clients behind a broken chain share one bucket
 * rather than letting one of them choose its own). If every element is trusted, the left-most
 * one is used. The walk reads at most BW_CLIENTIP_MAX_HOPS elements of at most
 * BW_CLIENTIP_ELEM_MAX bytes from the right end, so a huge header costs nothing extra.
 *
 * Accepted element forms, after trimming spaces and tabs: "192.0.2.1", "192.0.2.1:8080",
 * "2001:db8::1", "[2001:db8::1]", "[2001:db8::1]:8080" (ports are ignored; some load balancers
 * append them). Anything else - "unknown", obfuscated RFC 7239 identifiers, zone ids, empty
 * elements, stray bytes - is malformed.
 */
#include "breakwater/clientip.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

typedef struct ipaddr {
    int family;
    uint8_t a[16];
} ipaddr;

static const uint8_t v4_mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* ::ffff:a.b.c.d is how dual-stack sockets show IPv4 peers; it is the same client. */
static void unmap_v4(ipaddr *ip)
{
    if (ip->family == AF_INET6 && memcmp(ip->a, v4_mapped_prefix, 12) == 0) {
        memmove(ip->a, ip->a + 12, 4);
        memset(ip->a + 4, 0, 12);
        ip->family = AF_INET;
    }
}

static bool from_sockaddr(const struct sockaddr *sa, ipaddr *ip)
{
    memset(ip, 0, sizeof(*ip));
    if (sa == NULL)
        return false;
    if (sa->sa_family == AF_INET) {
        struct sockaddr_in sin;
        memcpy(&sin, sa, sizeof(sin));
        ip->family = AF_INET;
        memcpy(ip->a, &sin.sin_addr, 4);
        return true;
    }
    if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 sin6;
        memcpy(&sin6, sa, sizeof(sin6));
        ip->family = AF_INET6;
        memcpy(ip->a, &sin6.sin6_addr, 16);
        unmap_v4(ip);
        return true;
    }
    return false;
}

static bool is_trusted(const ipaddr *ip, const bw_cidr *trusted, size_t n_trusted)
{
    if (n_trusted == 0)
        return false;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (ip->family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        sin->sin_family = AF_INET;
        memcpy(&sin->sin_addr, ip->a, 4);
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
        sin6->sin6_family = AF_INET6;
        memcpy(&sin6->sin6_addr, ip->a, 16);
    }
    return bw_cidr_list_match(trusted, n_trusted, (const struct sockaddr *)&ss);
}

static bool is_ows(char c)
{
    return c == ' ' || c == '\t';
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* ":PORT" with 1..5 digits and a value a port can have. */
static bool valid_port(const char *p, size_t n)
{
    if (n < 2 || n > 6 || p[0] != ':')
        return false;
    unsigned v = 0;
    for (size_t i = 1; i < n; i++) {
        if (!is_digit(p[i]))
            return false;
        v = v * 10 + (unsigned)(p[i] - '0');
    }
    return v <= 65535;
}

static bool parse_literal(int family, const char *p, size_t n, ipaddr *ip)
{
    char buf[BW_CLIENTIP_ELEM_MAX + 1];
    if (n == 0 || n > BW_CLIENTIP_ELEM_MAX)
        return false;
    memcpy(buf, p, n);
    buf[n] = '\0';
    memset(ip, 0, sizeof(*ip));
    ip->family = family;
    return inet_pton(family, buf, ip->a) == 1;
}

/* One X-Forwarded-For element (untrimmed) to an address; false when it is not one of the
 * accepted forms. */
static bool parse_element(const char *p, size_t n, ipaddr *ip)
{
    while (n > 0 && is_ows(p[0])) {
        p++;
        n--;
    }
    while (n > 0 && is_ows(p[n - 1]))
        n--;
    if (n == 0 || n > BW_CLIENTIP_ELEM_MAX)
        return false;
    /* Only the bytes of the accepted forms; this also rejects NUL, '%' zone ids, letters. */
    size_t colons = 0, dots = 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c == ':')
            colons++;
        else if (c == '.')
            dots++;
        else if (!is_digit(c) && !(c >= 'a' && c <= 'f') && !(c >= 'A' && c <= 'F') && c != '[' &&
                 c != ']')
            return false;
    }
    bool ok;
    if (p[0] == '[') {
        const char *close = memchr(p, ']', n);
        if (close == NULL)
            return false;
        size_t inner = (size_t)(close - p) - 1;
        size_t rest = n - inner - 2;
        if (rest != 0 && !valid_port(close + 1, rest))
            return false;
        ok = parse_literal(AF_INET6, p + 1, inner, ip);
    } else if (colons == 1 && dots == 3) {
        const char *colon = memchr(p, ':', n);
        size_t host = (size_t)(colon - p);
        if (!valid_port(colon, n - host))
            return false;
        ok = parse_literal(AF_INET, p, host, ip);
    } else if (colons > 0) {
        ok = parse_literal(AF_INET6, p, n, ip);
    } else {
        ok = parse_literal(AF_INET, p, n, ip);
    }
    if (ok)
        unmap_v4(ip);
    return ok;
}

static void mask_prefix(uint8_t *a, uint32_t prefix)
{
    for (uint32_t bit = 0; bit < 128; bit += 8) {
        uint8_t *b = &a[bit / 8];
        if (bit >= prefix)
            *b = 0;
        else if (prefix - bit < 8)
            *b &= (uint8_t)(0xff << (8 - (prefix - bit)));
    }
}

static void finish(const ipaddr *ip, uint32_t ipv6_prefix, bw_clientip_source source,
                   bw_clientip *out)
{
    memset(out, 0, sizeof(*out));
    out->family = ip->family;
    out->source = source;
    memcpy(out->addr, ip->a, 16);
    if (ip->family == AF_INET) {
        out->prefix = 32;
        out->key[0] = 4;
    } else if (ip->family == AF_INET6) {
        if (ipv6_prefix > 128)
            ipv6_prefix = 128;
        out->prefix = (uint8_t)ipv6_prefix;
        mask_prefix(out->addr, ipv6_prefix);
        out->key[0] = 6;
    } else {
        out->family = AF_UNSPEC;
        memset(out->addr, 0, sizeof(out->addr));
    }
    memcpy(out->key + 1, out->addr, 16);
    bw_clientip_format(out, out->text, sizeof(out->text));
}

int bw_clientip_key(const struct sockaddr *peer, const char *xff, size_t xff_len,
                    const bw_cidr *trusted, size_t n_trusted, uint32_t ipv6_prefix,
                    bw_clientip *out)
{
    ipaddr cur;
    if (!from_sockaddr(peer, &cur)) {
        finish(&cur, ipv6_prefix, BW_CLIENTIP_PEER, out);
        return -1;
    }
    bw_clientip_source source = BW_CLIENTIP_PEER;
    if (xff == NULL || xff_len == 0 || !is_trusted(&cur, trusted, n_trusted)) {
        finish(&cur, ipv6_prefix, source, out);
        return 0;
    }

    /* cur is always an address a trusted hop gave us; each step either moves to the element on
     * its left or ends the walk. */
    size_t end = xff_len;
    for (unsigned hops = 0; hops < BW_CLIENTIP_MAX_HOPS; hops++) {
        size_t start = end;
        while (start > 0 && xff[start - 1] != ',' && end - start <= BW_CLIENTIP_ELEM_MAX)
            start--;
        if (end - start > BW_CLIENTIP_ELEM_MAX)
            break; /* over-long element: not an address */
        ipaddr elem;
        if (!parse_element(xff + start, end - start, &elem))
            break;
        cur = elem;
        source = BW_CLIENTIP_XFF;
        /* The client, or the left-most element of an all-trusted chain. */
        if (!is_trusted(&elem, trusted, n_trusted) || start == 0)
            break;
        end = start - 1; /* skip the comma */
    }
    finish(&cur, ipv6_prefix, source, out);
    return 0;
}

/* Dotted quad without printf: this runs for every rate-limited request (the text names the
 * bucket in Redis), and glibc's inet_ntop formats IPv4 through sprintf. */
static size_t format_ipv4(const uint8_t *a, char *out)
{
    size_t n = 0;
    for (int i = 0; i < 4; i++) {
        unsigned v = a[i];
        if (v >= 100)
            out[n++] = (char)('0' + v / 100);
        if (v >= 10)
            out[n++] = (char)('0' + (v / 10) % 10);
        out[n++] = (char)('0' + v % 10);
        out[n++] = i < 3 ? '.' : '\0';
    }
    return n - 1;
}

const char *bw_clientip_format(const bw_clientip *ip, char *buf, size_t len)
{
    char tmp[BW_CLIENTIP_TEXT_LEN];
    if (len == 0)
        return buf;
    if (ip->family == AF_INET) {
        format_ipv4(ip->addr, tmp);
    } else if (ip->family == AF_INET6) {
        char a[INET6_ADDRSTRLEN];
        if (inet_ntop(AF_INET6, ip->addr, a, sizeof(a)) == NULL)
            snprintf(tmp, sizeof(tmp), "unknown");
        else if (ip->prefix < 128)
            snprintf(tmp, sizeof(tmp), "%s/%u", a, (unsigned)ip->prefix);
        else
            snprintf(tmp, sizeof(tmp), "%s", a);
    } else {
        snprintf(tmp, sizeof(tmp), "unknown");
    }
    size_t n = strnlen(tmp, sizeof(tmp) - 1);
    if (n >= len)
        n = len - 1;
    memcpy(buf, tmp, n);
    buf[n] = '\0';
    return buf;
}

bool bw_clientip_in(const bw_clientip *ip, const bw_cidr *list, size_t n)
{
    if (ip->family != AF_INET && ip->family != AF_INET6)
        return false;
    ipaddr a;
    memset(&a, 0, sizeof(a));
    a.family = ip->family;
    memcpy(a.a, ip->addr, sizeof(a.a));
    return is_trusted(&a, list, n);
}
