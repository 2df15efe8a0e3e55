/*
 * Path and host normalisation for routing (see include/breakwater/path.h for the rules).
 *
 * bw_path_normalize() works in two passes over small fixed state. The first decodes escapes of
 * unreserved characters and refuses separators in disguise, writing into the output buffer;
 * the second resolves segments in place, treating the output as a stack of segments: a ".."
 * pops back to the previous '/', a "." or an empty segment (from "//") is dropped. Decoding
 * comes first on purpose: "%2e%2e" is "..", and must be resolved, not forwarded as a segment an
 * upstream would decode and climb with.
 */
#include "breakwater/path.h"

#include <stdbool.h>
#include <string.h>

int bw_hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static bool is_unreserved(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_' || c == '~';
}

/* Pass 1: escapes. Writes the decoded path into out; returns its length through *len. */
static bw_path_status decode_escapes(const char *in, size_t in_len, char *out, size_t *len)
{
    static const char upper[] = "0123456789ABCDEF";
    size_t n = 0;
    for (size_t i = 0; i < in_len; i++) {
        char c = in[i];
        if (c == '\\')
            return BW_PATH_BACKSLASH;
        if (c != '%') {
            out[n++] = c;
            continue;
        }
        if (i + 2 >= in_len)
            return BW_PATH_BAD_ESCAPE;
        int hi = bw_hex_digit(in[i + 1]), lo = bw_hex_digit(in[i + 2]);
        if (hi < 0 || lo < 0)
            return BW_PATH_BAD_ESCAPE;
        unsigned char v = (unsigned char)(hi * 16 + lo);
        if (v == '/' || v == '\\')
            return BW_PATH_ENCODED_SLASH;
        if (v == 0)
            return BW_PATH_ENCODED_NUL;
        if (is_unreserved(v)) {
            out[n++] = (char)v;
        } else {
            out[n++] = '%';
            out[n++] = upper[hi];
            out[n++] = upper[lo];
        }
        i += 2;
    }
    *len = n;
    return BW_PATH_OK;
}

/* Pass 2: segments, in place. p[0] is '/'. */
static bw_path_status resolve_segments(char *p, size_t len, size_t *out_len)
{
    size_t w = 1; /* output so far is p[0..w), always ends in '/' */
    size_t r = 1;
    while (r <= len) {
        size_t end = r;
        while (end < len && p[end] != '/')
            end++;
        size_t seg = end - r;
        bool last = end >= len;
        if (seg == 0 || (seg == 1 && p[r] == '.')) {
            /* empty segment (a merged slash) or ".": nothing to write */
        } else if (seg == 2 && p[r] == '.' && p[r + 1] == '.') {
            if (w == 1)
                return BW_PATH_ABOVE_ROOT;
            w--; /* drop the '/' that ends the output, then the segment before it */
            while (w > 0 && p[w - 1] != '/')
                w--;
        } else {
            memmove(p + w, p + r, seg);
            w += seg;
            if (!last)
                p[w++] = '/';
        }
        if (last)
            break;
        r = end + 1;
    }
    *out_len = w;
    return BW_PATH_OK;
}

bw_path_status bw_path_normalize(const char *in, size_t in_len, char *out, size_t out_cap,
                                 size_t *out_len)
{
    if (in_len == 0 || in[0] != '/')
        return BW_PATH_NOT_ORIGIN;
    if (out_cap < in_len)
        return BW_PATH_TOO_LONG;
    size_t n;
    bw_path_status s = decode_escapes(in, in_len, out, &n);
    if (s != BW_PATH_OK)
        return s;
    return resolve_segments(out, n, out_len);
}

const char *bw_path_status_text(bw_path_status s)
{
    switch (s) {
    case BW_PATH_OK:
        return "ok";
    case BW_PATH_NOT_ORIGIN:
        return "path does not start with /";
    case BW_PATH_BAD_ESCAPE:
        return "malformed percent-encoding in path";
    case BW_PATH_ENCODED_SLASH:
        return "encoded slash or backslash in path";
    case BW_PATH_ENCODED_NUL:
        return "encoded NUL in path";
    case BW_PATH_BACKSLASH:
        return "backslash in path";
    case BW_PATH_ABOVE_ROOT:
        return "path climbs above the root";
    case BW_PATH_TOO_LONG:
        return "path too long";
    }
    return "invalid path";
}

size_t bw_host_normalize(const char *in, size_t in_len, char *out, size_t out_cap)
{
    size_t end = in_len;
    if (in_len > 0 && in[0] == '[') {
        /* IPv6 literal: keep up to the closing bracket, drop what follows it. */
        const char *close = memchr(in, ']', in_len);
        if (close == NULL)
            return 0;
        end = (size_t)(close - in) + 1;
    } else {
        const char *colon = memchr(in, ':', in_len);
        if (colon != NULL)
            end = (size_t)(colon - in);
        while (end > 0 && in[end - 1] == '.')
            end--;
    }
    if (end == 0 || end > out_cap)
        return 0;
    for (size_t i = 0; i < end; i++) {
        char c = in[i];
        out[i] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
    }
    return end;
}

int bw_percent_decode(const char *in, size_t len, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (c == '%') {
            if (i + 2 >= len)
                return -1;
            int h = bw_hex_digit(in[i + 1]), l = bw_hex_digit(in[i + 2]);
            if (h < 0 || l < 0)
                return -1;
            c = (char)(h * 16 + l);
            i += 2;
        }
        if (c == '\0' || o + 1 >= cap)
            return -1;
        out[o++] = c;
    }
    if (cap == 0)
        return -1;
    out[o] = '\0';
    return (int)o;
}
