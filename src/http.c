/*
 * HTTP/1.x message heads and chunked bodies, parsed strictly (RFC 9110, RFC 9112).
 *
 * This file is the proxy's defence against request smuggling and response splitting: anything
 * two HTTP implementations could read differently is refused here, before a byte is forwarded.
 * The rules are deliberately narrower than what some servers tolerate: exactly one Content-Length
 * of plain digits (no lists, even of equal values), Transfer-Encoding only as exactly "chunked",
 * never both, CRLF as the only line ending, no obs-fold, field names of tchar only, field values
 * without control bytes. Every rejection carries a short static reason for the error log.
 *
 * It sits on the hot path of every request and response, so it never allocates, walks each head
 * once, classifies bytes through one 256-entry table, and leaves name/value pointers inside the
 * caller's buffer. The chunked decoder is a byte-level state machine whose result does not depend
 * on how the input is split across reads.
 */
#include "breakwater/http.h"

#include <string.h>

/* Byte classes, combined as bits in one table so each test is a load and a mask. */
enum {
    CT = 0x01, /* tchar: methods, field names, tokens */
    CV = 0x02, /* field-value byte: HTAB, SP, VCHAR, obs-text */
    CX = 0x04, /* HEXDIG */
    CR = 0x08, /* reg-name byte besides pct-encoding: unreserved, sub-delims */
    CQ = 0x10, /* qdtext of a quoted-string */
    CU = 0x20, /* request-target byte: visible ASCII */
    CA = CT | CV | CR | CQ | CU,
    CD = CA | CX,
    CO = CV | CQ,
};

/* clang-format off */
static const uint8_t byte_class[256] = {
    /* 0x00 */ 0, 0, 0, 0, 0, 0, 0, 0,
    /* 0x08 */ 0, CO, 0, 0, 0, 0, 0, 0,
    /* 0x10 */ 0, 0, 0, 0, 0, 0, 0, 0,
    /* 0x18 */ 0, 0, 0, 0, 0, 0, 0, 0,
    /* 0x20 */ CO, CA, CV|CU, CT|CV|CQ|CU, CA, CT|CV|CQ|CU, CA, CA,
    /* 0x28 */ CV|CR|CQ|CU, CV|CR|CQ|CU, CA, CA, CV|CR|CQ|CU, CA, CA, CV|CQ|CU,
    /* 0x30 */ CD, CD, CD, CD, CD, CD, CD, CD,
    /* 0x38 */ CD, CD, CV|CQ|CU, CV|CR|CQ|CU, CV|CQ|CU, CV|CR|CQ|CU, CV|CQ|CU, CV|CQ|CU,
    /* 0x40 */ CV|CQ|CU, CD, CD, CD, CD, CD, CD, CA,
    /* 0x48 */ CA, CA, CA, CA, CA, CA, CA, CA,
    /* 0x50 */ CA, CA, CA, CA, CA, CA, CA, CA,
    /* 0x58 */ CA, CA, CA, CV|CQ|CU, CV|CU, CV|CQ|CU, CT|CV|CQ|CU, CA,
    /* 0x60 */ CT|CV|CQ|CU, CD, CD, CD, CD, CD, CD, CA,
    /* 0x68 */ CA, CA, CA, CA, CA, CA, CA, CA,
    /* 0x70 */ CA, CA, CA, CA, CA, CA, CA, CA,
    /* 0x78 */ CA, CA, CA, CV|CQ|CU, CT|CV|CQ|CU, CV|CQ|CU, CA, 0,
    /* 0x80 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0x88 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0x90 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0x98 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xa0 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xa8 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xb0 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xb8 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xc0 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xc8 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xd0 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xd8 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xe0 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xe8 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xf0 */ CO, CO, CO, CO, CO, CO, CO, CO,
    /* 0xf8 */ CO, CO, CO, CO, CO, CO, CO, CO,
};
/* clang-format on */

static inline bool is_class(unsigned char c, unsigned mask)
{
    return (byte_class[c] & mask) != 0;
}

static inline bool is_ows(unsigned char c)
{
    return c == ' ' || c == '\t';
}

static inline unsigned char to_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + ('a' - 'A')) : c;
}

static inline unsigned hex_value(unsigned char c)
{
    return c <= '9' ? (unsigned)(c - '0') : (unsigned)(to_lower(c) - 'a' + 10);
}

/* Case-insensitive comparison against a lower-case literal of the same length. */
static bool lower_eq(const unsigned char *s, const char *lit, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (to_lower(s[i]) != (unsigned char)lit[i])
            return false;
    }
    return true;
}

/* Compares a name with a lower-case literal, reading '_' as '-'. Gateways that map header
 * names to variables (CGI, WSGI, some frameworks) fold both to the same name, so
 * "Content_Length" could frame a body for the upstream that the proxy never saw. */
static bool underscore_lookalike(const unsigned char *s, const char *lit, size_t len)
{
    bool underscore = false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = to_lower(s[i]);
        if (c == '_') {
            underscore = true;
            c = '-';
        }
        if (c != (unsigned char)lit[i])
            return false;
    }
    return underscore;
}

bool bw_http_name_eq(const char *name, size_t len, const char *lit)
{
    if (name == NULL || lit == NULL)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (lit[i] == '\0' || to_lower((unsigned char)name[i]) != to_lower((unsigned char)lit[i]))
            return false;
    }
    return lit[len] == '\0';
}

bool bw_http_list_has(const char *value, size_t len, const char *token)
{
    if (value == NULL || token == NULL)
        return false;
    size_t tlen = strlen(token);
    size_t i = 0;
    while (i < len) {
        size_t start = i;
        while (i < len && value[i] != ',')
            i++;
        size_t end = i;
        while (start < end && is_ows((unsigned char)value[start]))
            start++;
        while (end > start && is_ows((unsigned char)value[end - 1]))
            end--;
        if (end - start == tlen && bw_http_name_eq(value + start, tlen, token))
            return true;
        i++; /* skip the comma */
    }
    return false;
}

bool bw_http_method_idempotent(bw_http_method m)
{
    switch (m) {
    case BW_METHOD_GET:
    case BW_METHOD_HEAD:
    case BW_METHOD_OPTIONS:
    case BW_METHOD_TRACE:
    case BW_METHOD_PUT:
    case BW_METHOD_DELETE:
        return true;
    default:
        return false;
    }
}

const char *bw_http_reason(int status)
{
    /* clang-format off */
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 203: return "Non-Authoritative Information";
    case 204: return "No Content";
    case 205: return "Reset Content";
    case 206: return "Partial Content";
    case 300: return "Multiple Choices";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 407: return "Proxy Authentication Required";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 421: return "Misdirected Request";
    case 422: return "Unprocessable Content";
    case 425: return "Too Early";
    case 426: return "Upgrade Required";
    case 428: return "Precondition Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
    /* clang-format on */
}

/*
 * Finds CRLF CRLF. Empty lines before the start line are skipped first so that a CRLF left over
 * from a previous message is not taken for the end of an empty head. Only CRLF CRLF ends a head:
 * a head with bare LF line ends is never complete here, and the parser rejects it once the
 * caller's size limit or an eventual CRLF CRLF hands it over.
 */
size_t bw_http_head_length(const char *buf, size_t len)
{
    if (buf == NULL)
        return 0;
    size_t start = 0;
    while (start + 1 < len && buf[start] == '\r' && buf[start + 1] == '\n')
        start += 2;
    size_t i = start + 3;
    while (i < len) {
        const char *lf = memchr(buf + i, '\n', len - i);
        if (lf == NULL)
            return 0;
        i = (size_t)(lf - buf);
        if (buf[i - 1] == '\r' && buf[i - 2] == '\n' && buf[i - 3] == '\r')
            return i + 1;
        i += 2; /* the next candidate LF is at least two bytes further */
    }
    return 0;
}

size_t bw_http_head_scan(const char *buf, size_t len, size_t *scanned)
{
    if (buf == NULL)
        return 0;
    /* A blank line ends in its LF: restart three bytes back so a CR LF CR LF cut anywhere by the
     * previous call is still seen whole. */
    size_t i = *scanned > 3 ? *scanned - 3 : 0;
    while (i < len) {
        const char *nl = memchr(buf + i, '\n', len - i);
        if (nl == NULL)
            break;
        i = (size_t)(nl - buf);
        if (i >= 1 && buf[i - 1] == '\n')
            return i + 1;
        if (i >= 3 && buf[i - 1] == '\r' && buf[i - 2] == '\n' && buf[i - 3] == '\r')
            return i + 1;
        i++;
    }
    *scanned = len;
    return 0;
}

static bw_http_status fail(bw_http_head *out, bw_http_status status, const char *why)
{
    out->error = why;
    return status;
}

static void head_init(bw_http_head *out)
{
    /* Not memset: the header array is 8 KiB and only n_headers entries are ever read. */
    out->method = BW_METHOD_OTHER;
    out->method_str = NULL;
    out->method_len = 0;
    out->target = NULL;
    out->target_len = 0;
    out->status = 0;
    out->reason = NULL;
    out->reason_len = 0;
    out->version_minor = 0;
    out->n_headers = 0;
    out->framing = BW_BODY_NONE;
    out->content_length = 0;
    out->host_index = -1;
    out->conn_close = false;
    out->conn_keep_alive = false;
    out->expect_continue = false;
    out->expect_other = false;
    out->has_upgrade = false;
    out->error = NULL;
}

/* Explains why the byte at p does not continue a line: NULL when it is a proper CRLF. */
static const char *line_end_error(const unsigned char *b, size_t n, size_t p, const char *other)
{
    if (p >= n)
        return "incomplete head";
    if (b[p] == '\r')
        return (p + 1 < n && b[p + 1] == '\n') ? NULL : "bare CR";
    if (b[p] == '\n')
        return "bare LF";
    return other;
}

/*
 * Reads "HTTP/" DIGIT "." DIGIT at p. Returns the minor version (0 or 1) for HTTP/1.0 and
 * HTTP/1.1, -2 for any other well-formed version, -1 when the bytes are not a version at all.
 */
static int parse_version(const unsigned char *b, size_t n, size_t p)
{
    if (n - p < 8 || memcmp(b + p, "HTTP/", 5) != 0)
        return -1;
    unsigned char major = b[p + 5], dot = b[p + 6], minor = b[p + 7];
    if (major < '0' || major > '9' || dot != '.' || minor < '0' || minor > '9')
        return -1;
    if (major == '1' && (minor == '0' || minor == '1'))
        return minor - '0';
    return -2;
}

static bw_http_method method_from(const unsigned char *m, size_t len)
{
    /* Methods are case-sensitive (RFC 9110 9.1): "get" is not GET. */
    switch (len) {
    case 3:
        if (memcmp(m, "GET", 3) == 0)
            return BW_METHOD_GET;
        if (memcmp(m, "PUT", 3) == 0)
            return BW_METHOD_PUT;
        break;
    case 4:
        if (memcmp(m, "HEAD", 4) == 0)
            return BW_METHOD_HEAD;
        if (memcmp(m, "POST", 4) == 0)
            return BW_METHOD_POST;
        break;
    case 5:
        if (memcmp(m, "TRACE", 5) == 0)
            return BW_METHOD_TRACE;
        if (memcmp(m, "PATCH", 5) == 0)
            return BW_METHOD_PATCH;
        break;
    case 6:
        if (memcmp(m, "DELETE", 6) == 0)
            return BW_METHOD_DELETE;
        break;
    case 7:
        if (memcmp(m, "OPTIONS", 7) == 0)
            return BW_METHOD_OPTIONS;
        if (memcmp(m, "CONNECT", 7) == 0)
            return BW_METHOD_CONNECT;
        break;
    default:
        break;
    }
    return BW_METHOD_OTHER;
}

/*
 * uri-host [":" port] (RFC 3986): an IP literal in brackets, or a reg-name (which covers IPv4).
 * An empty value is allowed unless a port is required (RFC 9110 7.2 lets a client send an empty
 * Host); a non-empty one needs a non-empty host, and a port, when present, is 1 to 5 digits no
 * larger than 65535. userinfo ("@") is refused: it is deprecated for http and a classic way to
 * make two parsers disagree about the host.
 */
static bool valid_authority(const unsigned char *h, size_t n, bool need_port)
{
    size_t p = 0;
    if (n == 0)
        return !need_port;
    if (h[0] == '[') {
        p = 1;
        while (p < n && (is_class(h[p], CX) || h[p] == ':' || h[p] == '.'))
            p++;
        if (p == 1 || p >= n || h[p] != ']')
            return false;
        p++;
    } else {
        while (p < n) {
            if (is_class(h[p], CR))
                p++;
            else if (h[p] == '%' && p + 2 < n && is_class(h[p + 1], CX) && is_class(h[p + 2], CX))
                p += 3;
            else
                break;
        }
        if (p == 0)
            return false;
    }
    if (p == n)
        return !need_port;
    if (h[p] != ':')
        return false;
    p++;
    size_t digits = n - p;
    if (digits == 0 || digits > 5)
        return false;
    unsigned port = 0;
    for (; p < n; p++) {
        if (h[p] < '0' || h[p] > '9')
            return false;
        port = port * 10 + (unsigned)(h[p] - '0');
    }
    return port <= 65535;
}

/* absolute-form for http and https only: scheme "://" authority [path-abempty] ["?" query]. */
static bool valid_absolute_form(const unsigned char *t, size_t n)
{
    size_t p;
    if (n >= 7 && lower_eq(t, "http://", 7))
        p = 7;
    else if (n >= 8 && lower_eq(t, "https://", 8))
        p = 8;
    else
        return false;
    size_t host = p;
    while (p < n && t[p] != '/' && t[p] != '?')
        p++;
    return p > host && valid_authority(t + host, p - host, false);
}

/*
 * Content-Length = 1*DIGIT. The value is refused beyond BW_HTTP_MAX_CONTENT_LENGTH; checking the
 * bound after every digit keeps the accumulator below 2^57, so no digit count can overflow it.
 */
static const char *parse_content_length(const unsigned char *v, size_t n, uint64_t *out)
{
    if (n == 0)
        return "empty Content-Length";
    uint64_t x = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9')
            return memchr(v, ',', n) != NULL ? "Content-Length list" : "invalid Content-Length";
        x = x * 10 + (uint64_t)(v[i] - '0');
        if (x > BW_HTTP_MAX_CONTENT_LENGTH)
            return "Content-Length too large";
    }
    *out = x;
    return NULL;
}

/* What the header pass learns for the framing decision. */
struct field_scan {
    unsigned n_cl;
    unsigned n_te;
    unsigned n_host;
};

/* Looks at one field the proxy cares about. Returns an error reason or NULL. */
static const char *note_field(bw_http_head *out, struct field_scan *s, bool request,
                              const unsigned char *name, size_t name_len, const unsigned char *v,
                              size_t vlen)
{
    const char *value = (const char *)v;
    switch (name_len) {
    case 4:
        if (request && lower_eq(name, "host", 4)) {
            if (++s->n_host > 1)
                return "duplicate Host";
            if (!valid_authority(v, vlen, false))
                return "invalid Host";
            out->host_index = (int)out->n_headers;
        }
        break;
    case 6:
        if (request && lower_eq(name, "expect", 6)) {
            if (vlen == 12 && lower_eq(v, "100-continue", 12))
                out->expect_continue = true;
            else
                out->expect_other = true;
        }
        break;
    case 7:
        if (lower_eq(name, "upgrade", 7))
            out->has_upgrade = true;
        break;
    case 10:
        if (lower_eq(name, "connection", 10)) {
            if (bw_http_list_has(value, vlen, "close"))
                out->conn_close = true;
            if (bw_http_list_has(value, vlen, "keep-alive"))
                out->conn_keep_alive = true;
        }
        break;
    case 14:
        if (underscore_lookalike(name, "content-length", 14))
            return "Content-Length spelled with an underscore";
        if (lower_eq(name, "content-length", 14)) {
            /* Even equal duplicates are refused: RFC 9112 6.3 allows merging them, but a
             * recipient that does not would frame differently, and no honest client sends two. */
            if (++s->n_cl > 1)
                return "duplicate Content-Length";
            return parse_content_length(v, vlen, &out->content_length);
        }
        break;
    case 17:
        if (underscore_lookalike(name, "transfer-encoding", 17))
            return "Transfer-Encoding spelled with an underscore";
        if (lower_eq(name, "transfer-encoding", 17)) {
            if (++s->n_te > 1)
                return "duplicate Transfer-Encoding";
            if (vlen == 0)
                return "empty Transfer-Encoding";
            if (vlen != 7 || !lower_eq(v, "chunked", 7))
                return "Transfer-Encoding not chunked";
        }
        break;
    default:
        break;
    }
    return NULL;
}

/*
 * Parses field lines from p up to the empty line that must end the head exactly at n. Fills
 * out->headers and the flags; the framing decision is left to the caller.
 */
static bw_http_status parse_fields(const unsigned char *b, size_t n, size_t p, size_t max_headers,
                                   bool request, bw_http_head *out, struct field_scan *s)
{
    bw_http_status too_bad = BW_HTTP_BAD_REQUEST;
    if (max_headers > BW_HTTP_MAX_HEADERS_HARD)
        max_headers = BW_HTTP_MAX_HEADERS_HARD;
    for (;;) {
        if (p >= n)
            return fail(out, too_bad, "incomplete head");
        unsigned char c = b[p];
        if (c == '\r' || c == '\n') {
            const char *e = line_end_error(b, n, p, NULL);
            if (e != NULL)
                return fail(out, too_bad, e);
            p += 2;
            break;
        }
        if (is_ows(c))
            return fail(out, too_bad,
                        out->n_headers > 0 ? "obs-fold" : "whitespace before first field");

        size_t name = p;
        while (p < n && is_class(b[p], CT))
            p++;
        size_t name_len = p - name;
        if (p >= n)
            return fail(out, too_bad, "incomplete head");
        if (b[p] != ':') {
            if (is_ows(b[p]) && name_len > 0)
                return fail(out, too_bad, "whitespace before colon");
            if (b[p] == '\r' || b[p] == '\n')
                return fail(out, too_bad, "field line without colon");
            return fail(out, too_bad, "invalid field name");
        }
        if (name_len == 0)
            return fail(out, too_bad, "empty field name");
        p++;

        while (p < n && is_ows(b[p]))
            p++;
        size_t value = p;
        while (p < n && is_class(b[p], CV))
            p++;
        size_t value_end = p;
        while (value_end > value && is_ows(b[value_end - 1]))
            value_end--;
        const char *e = line_end_error(b, n, p, "invalid byte in field value");
        if (e != NULL)
            return fail(out, too_bad, e);
        p += 2;

        if (out->n_headers >= max_headers)
            return fail(out, BW_HTTP_HEADERS_TOO_LARGE, "too many header fields");
        e = note_field(out, s, request, b + name, name_len, b + value, value_end - value);
        if (e != NULL)
            return fail(out, too_bad, e);
        bw_http_header *h = &out->headers[out->n_headers++];
        h->name = (const char *)b + name;
        h->name_len = name_len;
        h->value = (const char *)b + value;
        h->value_len = value_end - value;
    }
    if (p != n)
        return fail(out, too_bad, "bytes after head");
    return BW_HTTP_OK;
}

/*
 * Request-line = method SP request-target SP HTTP-version CRLF, single spaces only. The target's
 * form must fit the method: "*" only for OPTIONS, authority-form only (and always) for CONNECT.
 *
 * Framing: several Content-Length fields, or one with a list, are refused rather than merged
 * when equal; Transfer-Encoding must be a single field of exactly "chunked". Anything else gets
 * 400, not 501, even for a well-formed coding we merely do not support: the product contract
 * treats all such framing as ambiguous, and the client's recourse is the same either way.
 */
bw_http_status bw_http_parse_request(const char *buf, size_t head_len, size_t max_headers,
                                     bw_http_head *out)
{
    const unsigned char *b = (const unsigned char *)buf;
    size_t n = head_len, p = 0;
    head_init(out);
    if (b == NULL || n == 0)
        return fail(out, BW_HTTP_BAD_REQUEST, "incomplete head");

    while (p + 1 < n && b[p] == '\r' && b[p + 1] == '\n')
        p += 2;

    size_t m = p;
    while (p < n && is_class(b[p], CT))
        p++;
    if (p == m || p >= n || b[p] != ' ')
        return fail(out, BW_HTTP_BAD_REQUEST, "invalid method");
    out->method_str = buf + m;
    out->method_len = p - m;
    out->method = method_from(b + m, p - m);
    p++;

    size_t t = p;
    while (p < n && is_class(b[p], CU))
        p++;
    if (p == t || p >= n || b[p] != ' ')
        return fail(out, BW_HTTP_BAD_REQUEST, "invalid request-target");
    out->target = buf + t;
    out->target_len = p - t;
    p++;

    int minor = parse_version(b, n, p);
    if (minor == -1)
        return fail(out, BW_HTTP_BAD_REQUEST, "invalid HTTP version");
    p += 8;
    const char *e = line_end_error(b, n, p, "invalid HTTP version");
    if (e != NULL)
        return fail(out, BW_HTTP_BAD_REQUEST, e);
    p += 2;
    if (minor < 0)
        return fail(out, BW_HTTP_VERSION_NOT_SUPPORTED, "unsupported HTTP version");
    out->version_minor = minor;

    const unsigned char *tg = b + t;
    size_t tlen = out->target_len;
    if (tlen == 1 && tg[0] == '*') {
        if (out->method != BW_METHOD_OPTIONS)
            return fail(out, BW_HTTP_BAD_REQUEST, "asterisk-form without OPTIONS");
    } else if (out->method == BW_METHOD_CONNECT) {
        if (!valid_authority(tg, tlen, true))
            return fail(out, BW_HTTP_BAD_REQUEST, "CONNECT without authority-form");
    } else if (tg[0] != '/' && !valid_absolute_form(tg, tlen)) {
        return fail(out, BW_HTTP_BAD_REQUEST, "invalid request-target");
    }

    struct field_scan s = {0, 0, 0};
    bw_http_status st = parse_fields(b, n, p, max_headers, true, out, &s);
    if (st != BW_HTTP_OK)
        return st;

    if (minor == 1 && s.n_host == 0)
        return fail(out, BW_HTTP_BAD_REQUEST, "missing Host");
    if (s.n_te > 0 && minor == 0)
        return fail(out, BW_HTTP_BAD_REQUEST, "Transfer-Encoding in HTTP/1.0");
    if (s.n_te > 0 && s.n_cl > 0)
        return fail(out, BW_HTTP_BAD_REQUEST, "Content-Length with Transfer-Encoding");
    if (minor == 0 && !out->conn_keep_alive)
        out->conn_close = true;
    /* RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored. */
    if (minor == 0)
        out->expect_continue = false;
    if (s.n_te > 0)
        out->framing = BW_BODY_CHUNKED;
    else if (s.n_cl > 0)
        out->framing = BW_BODY_LENGTH;
    else
        out->framing = BW_BODY_NONE;
    return BW_HTTP_OK;
}

/*
 * status-line = HTTP-version SP 3DIGIT SP [reason] CRLF; a missing SP and reason after the code
 * is tolerated, as many servers send it. Leading empty lines are refused: they are only
 * tolerated before requests (RFC 9112 2.2), and an upstream sending them is out of sync.
 *
 * Framing follows RFC 9112 6.3, except that a Transfer-Encoding other than exactly "chunked" is
 * treated as an invalid response instead of a close-delimited body: forwarding a body whose end
 * we cannot see to a client that may read it differently is the risk this parser exists to stop.
 * Conflicting framing fields are refused even when the status means there is no body.
 */
bw_http_status bw_http_parse_response(const char *buf, size_t head_len, size_t max_headers,
                                      bw_http_method request_method, bw_http_head *out)
{
    const unsigned char *b = (const unsigned char *)buf;
    size_t n = head_len, p = 0;
    head_init(out);
    if (b == NULL || n == 0)
        return fail(out, BW_HTTP_BAD_REQUEST, "incomplete head");

    int minor = parse_version(b, n, p);
    if (minor < 0)
        return fail(out, BW_HTTP_BAD_REQUEST, "invalid HTTP version");
    out->version_minor = minor;
    p += 8;
    if (n - p < 4 || b[p] != ' ')
        return fail(out, BW_HTTP_BAD_REQUEST, "invalid status line");
    p++;
    int code = 0;
    for (int i = 0; i < 3; i++, p++) {
        if (b[p] < '0' || b[p] > '9')
            return fail(out, BW_HTTP_BAD_REQUEST, "invalid status code");
        code = code * 10 + (b[p] - '0');
    }
    if (code < 100 || code > 599)
        return fail(out, BW_HTTP_BAD_REQUEST, "invalid status code");
    out->status = code;
    out->reason = buf + p;
    if (p < n && b[p] == ' ') {
        p++;
        out->reason = buf + p;
        while (p < n && is_class(b[p], CV))
            p++;
    }
    out->reason_len = (size_t)(buf + p - out->reason);
    const char *e = line_end_error(b, n, p, "invalid status line");
    if (e != NULL)
        return fail(out, BW_HTTP_BAD_REQUEST, e);
    p += 2;

    struct field_scan s = {0, 0, 0};
    bw_http_status st = parse_fields(b, n, p, max_headers, false, out, &s);
    if (st != BW_HTTP_OK)
        return fail(out, BW_HTTP_BAD_REQUEST, out->error);

    /* RFC 9112 6.1: TE in an HTTP/1.0 message means the framing is faulty. */
    if (s.n_te > 0 && minor == 0)
        return fail(out, BW_HTTP_BAD_REQUEST, "Transfer-Encoding in HTTP/1.0");
    if (s.n_te > 0 && s.n_cl > 0)
        return fail(out, BW_HTTP_BAD_REQUEST, "Content-Length with Transfer-Encoding");
    if (minor == 0 && !out->conn_keep_alive)
        out->conn_close = true;

    if (code < 200 || code == 204 || code == 304 || request_method == BW_METHOD_HEAD ||
        (request_method == BW_METHOD_CONNECT && code < 300))
        out->framing = BW_BODY_NONE;
    else if (s.n_te > 0)
        out->framing = BW_BODY_CHUNKED;
    else if (s.n_cl > 0)
        out->framing = BW_BODY_LENGTH;
    else
        out->framing = BW_BODY_CLOSE;
    return BW_HTTP_OK;
}

/* Where the decoder is inside a chunk extension or a trailer line (bw_chunked.phase). */
enum {
    EXT_BEFORE_SEMI = 0, /* after BWS following the size or a value: only ';' may come */
    EXT_BEFORE_NAME,     /* after ';' */
    EXT_NAME,
    EXT_AFTER_NAME,   /* BWS after a name: '=' or ';' */
    EXT_BEFORE_VALUE, /* after '=' */
    EXT_VALUE,        /* token value */
    EXT_AFTER_QUOTED, /* right after the closing quote */
    TRAILER_NAME = 0,
    TRAILER_VALUE,
};

void bw_chunked_init(bw_chunked *c)
{
    memset(c, 0, sizeof(*c));
    c->state = BW_CHUNK_SIZE;
}

static size_t chunk_fail(bw_chunked *c, size_t consumed, const char *why)
{
    c->state = BW_CHUNK_ERROR;
    c->error = why;
    return consumed;
}

/* Handles a byte that may end a chunk-ext element (';', BWS, CR); false when it cannot. */
static bool ext_delimiter(bw_chunked *c, unsigned char ch)
{
    if (ch == ';') {
        c->phase = EXT_BEFORE_NAME;
    } else if (is_ows(ch)) {
        c->phase = EXT_BEFORE_SEMI;
    } else if (ch == '\r') {
        c->state = BW_CHUNK_SIZE_LF;
    } else {
        return false;
    }
    return true;
}

/*
 * chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF; last-chunk = 1*"0" [ chunk-ext ] CRLF;
 * then trailer field lines and a final CRLF (RFC 9112 7.1). chunk-ext is checked against its full
 * grammar (BWS, token names, token or quoted-string values) because extension bytes are where
 * lenient parsers have disagreed about where a chunk starts. Every state lives in *c, so any split
 * of the input gives the same result; data is reported as spans without copying.
 */
size_t bw_chunked_feed(bw_chunked *c, const char *buf, size_t len, bw_chunk_data_fn on_data,
                       void *arg)
{
    const unsigned char *b = (const unsigned char *)buf;
    size_t p = 0;
    if (buf == NULL)
        len = 0;
    while (p < len && c->state != BW_CHUNK_DONE && c->state != BW_CHUNK_ERROR) {
        if (c->state == BW_CHUNK_DATA) {
            size_t take = len - p;
            if (c->remaining < take)
                take = (size_t)c->remaining;
            if (on_data != NULL)
                on_data(arg, buf + p, take);
            p += take;
            c->remaining -= take;
            if (c->remaining == 0)
                c->state = BW_CHUNK_DATA_CR;
            continue;
        }

        unsigned char ch = b[p];
        if (c->state <= BW_CHUNK_SIZE_LF) {
            if (++c->line_bytes > BW_CHUNK_MAX_LINE)
                return chunk_fail(c, p, "chunk size line too long");
            if (ch == '\n' && c->state != BW_CHUNK_SIZE_LF)
                return chunk_fail(c, p, "bare LF in chunk size line");
        } else if (c->state >= BW_CHUNK_TRAILER_START) {
            if (++c->trailer_bytes > BW_CHUNK_MAX_TRAILER)
                return chunk_fail(c, p, "trailer section too large");
        }

        switch (c->state) {
        case BW_CHUNK_SIZE:
            if (!is_class(ch, CX))
                return chunk_fail(c, p, "invalid chunk size");
            c->remaining = hex_value(ch);
            c->hex_digits = 1;
            c->state = BW_CHUNK_SIZE_HEX;
            break;
        case BW_CHUNK_SIZE_HEX:
            if (is_class(ch, CX)) {
                unsigned d = hex_value(ch);
                if (++c->hex_digits > BW_CHUNK_MAX_SIZE_DIGITS)
                    return chunk_fail(c, p, "chunk size too long");
                /* Checked before shifting, so the value never exceeds BW_CHUNK_MAX_SIZE. */
                if (c->remaining > (BW_CHUNK_MAX_SIZE - d) / 16)
                    return chunk_fail(c, p, "chunk size too large");
                c->remaining = c->remaining * 16 + d;
            } else if (ch == ';') {
                c->state = BW_CHUNK_EXT;
                c->phase = EXT_BEFORE_NAME;
            } else if (is_ows(ch)) {
                c->state = BW_CHUNK_EXT;
                c->phase = EXT_BEFORE_SEMI;
            } else if (ch == '\r') {
                c->state = BW_CHUNK_SIZE_LF;
            } else {
                return chunk_fail(c, p, "invalid chunk size");
            }
            break;
        case BW_CHUNK_EXT:
            switch (c->phase) {
            case EXT_BEFORE_SEMI:
                if (ch == ';')
                    c->phase = EXT_BEFORE_NAME;
                else if (!is_ows(ch))
                    return chunk_fail(c, p, "invalid chunk extension");
                break;
            case EXT_BEFORE_NAME:
                if (is_class(ch, CT))
                    c->phase = EXT_NAME;
                else if (!is_ows(ch))
                    return chunk_fail(c, p, "invalid chunk extension");
                break;
            case EXT_NAME:
                if (is_class(ch, CT))
                    break;
                if (ch == '=')
                    c->phase = EXT_BEFORE_VALUE;
                else if (is_ows(ch))
                    c->phase = EXT_AFTER_NAME;
                else if (!ext_delimiter(c, ch))
                    return chunk_fail(c, p, "invalid chunk extension");
                break;
            case EXT_AFTER_NAME:
                if (ch == '=')
                    c->phase = EXT_BEFORE_VALUE;
                else if (ch == ';')
                    c->phase = EXT_BEFORE_NAME;
                else if (!is_ows(ch))
                    return chunk_fail(c, p, "invalid chunk extension");
                break;
            case EXT_BEFORE_VALUE:
                if (is_class(ch, CT))
                    c->phase = EXT_VALUE;
                else if (ch == '"')
                    c->state = BW_CHUNK_EXT_QUOTED;
                else if (!is_ows(ch))
                    return chunk_fail(c, p, "invalid chunk extension");
                break;
            case EXT_VALUE:
                if (!is_class(ch, CT) && !ext_delimiter(c, ch))
                    return chunk_fail(c, p, "invalid chunk extension");
                break;
            case EXT_AFTER_QUOTED:
                if (!ext_delimiter(c, ch))
                    return chunk_fail(c, p, "invalid chunk extension");
                break;
            default:
                return chunk_fail(c, p, "invalid chunk extension");
            }
            break;
        case BW_CHUNK_EXT_QUOTED:
            if (ch == '"') {
                c->state = BW_CHUNK_EXT;
                c->phase = EXT_AFTER_QUOTED;
            } else if (ch == '\\') {
                c->state = BW_CHUNK_EXT_QUOTED_ESC;
            } else if (!is_class(ch, CQ)) {
                return chunk_fail(c, p, "invalid chunk extension");
            }
            break;
        case BW_CHUNK_EXT_QUOTED_ESC:
            if (!is_class(ch, CV))
                return chunk_fail(c, p, "invalid chunk extension");
            c->state = BW_CHUNK_EXT_QUOTED;
            break;
        case BW_CHUNK_SIZE_LF:
            if (ch != '\n')
                return chunk_fail(c, p, "bare CR in chunk size line");
            c->line_bytes = 0;
            c->hex_digits = 0;
            if (c->remaining == 0) {
                c->state = BW_CHUNK_TRAILER_START;
                c->phase = TRAILER_NAME;
            } else {
                c->state = BW_CHUNK_DATA;
            }
            break;
        case BW_CHUNK_DATA_CR:
            if (ch != '\r')
                return chunk_fail(c, p, "missing CRLF after chunk data");
            c->state = BW_CHUNK_DATA_LF;
            break;
        case BW_CHUNK_DATA_LF:
            if (ch != '\n')
                return chunk_fail(c, p, "bare CR after chunk data");
            c->state = BW_CHUNK_SIZE;
            break;
        case BW_CHUNK_TRAILER_START:
            if (ch == '\r') {
                c->state = BW_CHUNK_FINAL_LF;
            } else if (is_class(ch, CT)) {
                c->state = BW_CHUNK_TRAILER_LINE;
                c->phase = TRAILER_NAME;
            } else if (is_ows(ch)) {
                return chunk_fail(c, p, "obs-fold in trailer");
            } else if (ch == '\n') {
                return chunk_fail(c, p, "bare LF in trailer");
            } else {
                return chunk_fail(c, p, "invalid trailer field name");
            }
            break;
        case BW_CHUNK_TRAILER_LINE:
            if (c->phase == TRAILER_NAME) {
                if (ch == ':')
                    c->phase = TRAILER_VALUE;
                else if (!is_class(ch, CT))
                    return chunk_fail(c, p, "invalid trailer field name");
            } else if (ch == '\r') {
                c->state = BW_CHUNK_TRAILER_LF;
            } else if (ch == '\n') {
                return chunk_fail(c, p, "bare LF in trailer");
            } else if (!is_class(ch, CV)) {
                return chunk_fail(c, p, "invalid byte in trailer field");
            }
            break;
        case BW_CHUNK_TRAILER_LF:
            if (ch != '\n')
                return chunk_fail(c, p, "bare CR in trailer");
            c->state = BW_CHUNK_TRAILER_START;
            break;
        case BW_CHUNK_FINAL_LF:
            if (ch != '\n')
                return chunk_fail(c, p, "bare CR in trailer");
            c->state = BW_CHUNK_DONE;
            break;
        default:
            return chunk_fail(c, p, "invalid chunked state");
        }
        p++;
    }
    return p;
}
