/*
 * Client identity for rate limiting: which address a request is charged to.
 *
 * The identity is the peer address of the connection, unless the peer is a trusted proxy
 * (trusted_proxies): then X-Forwarded-For is walked from the right, skipping trusted hops, and
 * the first untrusted address is the client. Only addresses written by trusted hops are ever
 * believed, so a client cannot choose its identity, and anything malformed ends the walk at
 * the last address that was vouched for. IPv4-mapped IPv6 addresses count as IPv4; IPv6
 * addresses are grouped by prefix (default /64), because one host usually owns a whole /64.
 * The result is a fixed-size binary key, ready to hash, plus a printable form for logs.
 * Pure functions, no allocation; docs/rate-limits.md has the rules for operators.
 */
#ifndef BREAKWATER_CLIENTIP_H
#define BREAKWATER_CLIENTIP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "breakwater/config.h"

/* Binary key: one family byte (4 or 6, 0 for an unknown peer) then 16 address bytes (IPv4 in
 * the first four, the rest zero; IPv6 with the bits past the prefix cleared). */
#define BW_CLIENTIP_KEY_LEN 17
/* "ffff:...:ffff/128" and a NUL. */
#define BW_CLIENTIP_TEXT_LEN 64
/* At most this many X-Forwarded-For elements are examined, each at most ELEM_MAX bytes with its
 * surrounding whitespace: the cost of a request does not grow with what a client sends. */
#define BW_CLIENTIP_MAX_HOPS 32
#define BW_CLIENTIP_ELEM_MAX 64

typedef enum bw_clientip_source {
    BW_CLIENTIP_PEER = 0, /* the connection's peer (untrusted, or X-Forwarded-For unusable) */
    BW_CLIENTIP_XFF = 1,  /* an element of X-Forwarded-For */
} bw_clientip_source;

typedef struct bw_clientip {
    int family;       /* AF_INET, AF_INET6, or AF_UNSPEC for a peer that is not IP */
    uint8_t addr[16]; /* IPv4 in addr[0..3]; IPv6 already masked to prefix */
    uint8_t prefix;   /* 32 for IPv4, the grouping prefix for IPv6 */
    bw_clientip_source source;
    uint8_t key[BW_CLIENTIP_KEY_LEN];
    char text[BW_CLIENTIP_TEXT_LEN]; /* "203.0.113.7", "2001:db8:1:2::/64", "unknown" */
} bw_clientip;

/*
 * Computes the identity of a request. peer is the connection's address. xff/xff_len is the
 * X-Forwarded-For value (NULL/0 when absent); several X-Forwarded-For header lines must be
 * joined by the caller, in order, with ", ". trusted/n_trusted is the trusted_proxies list.
 * ipv6_prefix (0..128, larger is taken as 128) groups IPv6 clients.
 * Returns 0, or -1 when the peer is not an IP address (out then holds the shared "unknown" key).
 */
int bw_clientip_key(const struct sockaddr *peer, const char *xff, size_t xff_len,
                    const bw_cidr *trusted, size_t n_trusted, uint32_t ipv6_prefix,
                    bw_clientip *out);

/* True when ip (with its prefix at 128 for IPv6, i.e. the whole address) is in one of the
 * networks of list. */
bool bw_clientip_in(const bw_clientip *ip, const bw_cidr *list, size_t n);

/* Writes the printable form of ip into buf (always NUL-terminated when len > 0); returns buf. */
const char *bw_clientip_format(const bw_clientip *ip, char *buf, size_t len);

#endif
