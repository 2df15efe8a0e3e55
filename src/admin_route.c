/*
 * Admin request routing and access rules, kept apart from the HTTP server so that they are
 * plain functions of strings: which endpoint a method and path name (with the upstream, policy
 * or key they carry), which endpoints need the bearer token, how ?top=N reads, and the token
 * comparison itself. src/admin.c does the I/O around them.
 */
#include "breakwater/admin.h"
#include "breakwater/path.h"

#include <string.h>
#include <strings.h>

static bool eq(const char *p, size_t n, const char *lit)
{
    return strlen(lit) == n && memcmp(p, lit, n) == 0;
}

/* Splits "/prefix/{a}" or "/prefix/{a}/{b}": a must be non-empty, b may be absent. */
static bool segments(const char *p, size_t n, size_t prefix, bw_admin_route *out)
{
    const char *a = p + prefix, *end = p + n;
    if (a >= end)
        return false;
    const char *slash = memchr(a, '/', (size_t)(end - a));
    out->name = a;
    out->name_len = slash ? (size_t)(slash - a) : (size_t)(end - a);
    if (out->name_len == 0)
        return false;
    if (slash) {
        out->arg = slash + 1;
        out->arg_len = (size_t)(end - slash - 1);
        if (out->arg_len == 0 || memchr(out->arg, '/', out->arg_len))
            return false;
    }
    return true;
}

static bool allow(bw_admin_route *out, bw_admin_method m, bool get, bool post, bool del)
{
    bool ok = (get && (m == BW_ADMIN_GET || m == BW_ADMIN_HEAD)) || (post && m == BW_ADMIN_POST) ||
              (del && m == BW_ADMIN_DELETE);
    out->method_ok = ok;
    return true;
}

bool bw_admin_route_match(bw_admin_method method, const char *path, size_t len, bw_admin_route *out)
{
    memset(out, 0, sizeof(*out));
    out->id = BW_ADMIN_R_NOT_FOUND;
    if (eq(path, len, "/")) {
        out->id = BW_ADMIN_R_PAGE;
    } else if (eq(path, len, "/healthz")) {
        out->id = BW_ADMIN_R_HEALTHZ;
    } else if (eq(path, len, "/readyz")) {
        out->id = BW_ADMIN_R_READYZ;
    } else if (eq(path, len, "/metrics")) {
        out->id = BW_ADMIN_R_METRICS;
    } else if (eq(path, len, "/status")) {
        out->id = BW_ADMIN_R_STATUS;
    } else if (eq(path, len, "/upstreams")) {
        out->id = BW_ADMIN_R_UPSTREAMS;
    } else if (eq(path, len, "/ratelimits")) {
        out->id = BW_ADMIN_R_RATELIMITS;
    } else if (len > 11 && memcmp(path, "/upstreams/", 11) == 0) {
        if (!segments(path, len, 11, out) || out->arg == NULL)
            return false;
        if (eq(out->arg, out->arg_len, "reset"))
            out->id = BW_ADMIN_R_UPSTREAM_RESET;
        else if (eq(out->arg, out->arg_len, "open"))
            out->id = BW_ADMIN_R_UPSTREAM_OPEN;
        else
            return false;
        return allow(out, method, false, true, false);
    } else if (len > 12 && memcmp(path, "/ratelimits/", 12) == 0) {
        if (!segments(path, len, 12, out))
            return false;
        if (out->arg == NULL) {
            out->id = BW_ADMIN_R_RATELIMIT_TOP;
            return allow(out, method, true, false, false);
        }
        out->id = BW_ADMIN_R_RATELIMIT_KEY;
        return allow(out, method, false, false, true);
    } else {
        return false;
    }
    return allow(out, method, true, false, false);
}

bool bw_admin_route_public(const bw_admin_route *r)
{
    /* Probes come from kubelets and load balancers, which send no token; the page's HTML holds
     * no data (it fetches everything with the token the operator types in). */
    return r->method_ok &&
           (r->id == BW_ADMIN_R_HEALTHZ || r->id == BW_ADMIN_R_READYZ || r->id == BW_ADMIN_R_PAGE);
}

int bw_admin_parse_top(const char *query, size_t len, uint32_t *top)
{
    *top = BW_ADMIN_TOP_DEFAULT;
    const char *p = query, *end = query ? query + len : NULL;
    while (p && p < end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *stop = amp ? amp : end;
        if (stop - p >= 4 && memcmp(p, "top=", 4) == 0) {
            const char *v = p + 4;
            if (v == stop || stop - v > 6)
                return -1;
            uint32_t n = 0;
            for (const char *c = v; c < stop; c++) {
                if (*c < '0' || *c > '9')
                    return -1;
                n = n * 10 + (uint32_t)(*c - '0');
            }
            if (n < 1 || n > BW_ADMIN_TOP_MAX)
                return -1;
            *top = n;
        }
        p = amp ? amp + 1 : NULL;
    }
    return 0;
}

bool bw_admin_token_matches(const char *token, const char *authorization)
{
    if (!authorization)
        return false;
    size_t tlen = strlen(token), alen = strlen(authorization);
    if (alen != 7 + tlen || strncasecmp(authorization, "Bearer ", 7) != 0)
        return false;
    unsigned char diff = 0;
    for (size_t k = 0; k < tlen; k++)
        diff |= (unsigned char)(authorization[7 + k] ^ token[k]);
    return diff == 0;
}

int bw_admin_unescape(const char *in, size_t len, char *out, size_t cap)
{
    return bw_percent_decode(in, len, out, cap);
}
