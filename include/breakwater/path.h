/*
 * Request paths and hosts as routing sees them: one canonical form for each.
 *
 * Routes and rate-limit policies match on a prefix of the path and on the host, so two spellings
 * of the same resource must not take two routes: `/login`, `//login`, `/./login`, `/x/../login`
 * and `/%6cogin` all name `/login`. bw_path_normalize() computes that canonical form, which is
 * also what is forwarded upstream (so the upstream cannot read a path the routing did not see),
 * and refuses what has no safe canonical form: an encoded slash, backslash or NUL, a backslash,
 * a malformed escape, and `..` that climbs above the root. bw_host_normalize() lower-cases a
 * Host value and drops a trailing dot and the port. Pure functions, no allocation.
 */
#ifndef BREAKWATER_PATH_H
#define BREAKWATER_PATH_H

#include <stdbool.h>
#include <stddef.h>

typedef enum bw_path_status {
    BW_PATH_OK = 0,
    BW_PATH_NOT_ORIGIN,    /* does not start with '/' */
    BW_PATH_BAD_ESCAPE,    /* '%' not followed by two hex digits */
    BW_PATH_ENCODED_SLASH, /* %2F or %5C: a separator the upstream might decode */
    BW_PATH_ENCODED_NUL,   /* %00 */
    BW_PATH_BACKSLASH,     /* a literal '\' (some servers take it for '/') */
    BW_PATH_ABOVE_ROOT,    /* a ".." segment with nothing left to remove */
    BW_PATH_TOO_LONG,      /* the output buffer is too small */
} bw_path_status;

/*
 * Canonical form of an origin-form path (the request target up to, not including, '?'):
 *   1. escapes of unreserved characters (ALPHA DIGIT - . _ ~) are decoded, the hex digits of the
 *      other escapes are upper-cased (RFC 3986 6.2.2.1 and 6.2.2.2);
 *   2. runs of '/' become one '/';
 *   3. "." and ".." segments are resolved (RFC 3986 5.2.4); a trailing "." or ".." leaves the
 *      path ending in '/'.
 * The result is never longer than the input; out may not overlap in. On BW_PATH_OK, *out_len is
 * its length (out is not NUL-terminated). Applying it to its own output changes nothing.
 */
bw_path_status bw_path_normalize(const char *in, size_t in_len, char *out, size_t out_cap,
                                 size_t *out_len);

/* A short English reason for a status, for logs and error bodies. */
const char *bw_path_status_text(bw_path_status s);

/*
 * Canonical form of a Host header value for matching: ASCII lower-cased, without the port
 * (":80"; for an IPv6 literal "[::1]:80" the brackets stay) and without trailing dots.
 * Writes at most out_cap bytes; returns the length, or 0 when the value is empty or does not
 * fit (then nothing matches it).
 */
size_t bw_host_normalize(const char *in, size_t in_len, char *out, size_t out_cap);

/* The value of a hexadecimal digit, or -1. */
int bw_hex_digit(char c);

/*
 * Decodes every %XX escape of in[0..len) into out, NUL-terminated (for names that arrive
 * escaped: a rate-limit key in an admin URL, a Redis password in redis.url). Returns the decoded
 * length, or -1 for a malformed escape, an escaped NUL, or a result that does not fit in cap.
 */
int bw_percent_decode(const char *in, size_t len, char *out, size_t cap);

#endif
