/*
 * Configuration: loading and validating the operator's JSON file.
 *
 * The text is parsed with cJSON and then checked field by field against the schema described in
 * docs/configuration.md. Validation never stops at the first problem: every unknown field, wrong
 * type, out-of-range value and dangling reference becomes one diagnostic line, so that a single
 * `breakwater -t` run shows everything there is to fix. cJSON keeps no source positions, so a small
 * scanner walks the same text and records where each value starts, keyed by its JSON path
 * ("routes[0].upstream"); diagnostics use it to print FILE:LINE:COL. Environment overrides are
 * read first and applied while the sections are built, only to fields the file leaves unset.
 */
#include "breakwater/config.h"

#include <arpa/inet.h>
#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#define PATH_LEN 512
#define MAX_FILE_BYTES (16u * 1024u * 1024u)
#define MAX_MS 86400000u /* one day: the upper bound of every *_ms field */
#define MAX_COUNT 1000000000u
#define MAX_NAME_LEN 64

/* ---------------------------------------------------------------------------------------------
 * Diagnostics
 */

void bw_diag_init(bw_diag *d)
{
    d->lines = NULL;
    d->count = 0;
    d->cap = 0;
}

void bw_diag_add(bw_diag *d, const char *fmt, ...)
{
    char *line = NULL;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (d->count == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 8;
        char **lines = realloc(d->lines, cap * sizeof *lines);
        if (lines == NULL) {
            free(line);
            return;
        }
        d->lines = lines;
        d->cap = cap;
    }
    d->lines[d->count++] = line;
}

void bw_diag_free(bw_diag *d)
{
    for (size_t i = 0; i < d->count; i++)
        free(d->lines[i]);
    free(d->lines);
    bw_diag_init(d);
}

/* ---------------------------------------------------------------------------------------------
 * Socket addresses and CIDR ranges
 */

static bool all_digits(const char *s)
{
    if (*s == '\0')
        return false;
    for (; *s; s++)
        if (!isdigit((unsigned char)*s))
            return false;
    return true;
}

int bw_sockaddr_parse(const char *text, bw_sockaddr *out, char *err, size_t errlen)
{
    char host[64];
    const char *port;
    size_t hlen;

    memset(out, 0, sizeof *out);
    if (text == NULL || *text == '\0') {
        snprintf(err, errlen, "empty address (expected host:port, e.g. 127.0.0.1:8080)");
        return -1;
    }
    if (text[0] == '[') {
        const char *close = strchr(text, ']');
        if (close == NULL) {
            snprintf(err, errlen, "missing ']' after the IPv6 address (expected [IPv6]:port)");
            return -1;
        }
        if (close[1] != ':') {
            snprintf(err, errlen, "missing port after ']' (expected [IPv6]:port, e.g. [::1]:8080)");
            return -1;
        }
        hlen = (size_t)(close - text - 1);
        if (hlen >= sizeof host) {
            snprintf(err, errlen, "IPv6 address too long");
            return -1;
        }
        memcpy(host, text + 1, hlen);
        host[hlen] = '\0';
        port = close + 2;
    } else {
        const char *colon = strrchr(text, ':');
        if (colon == NULL) {
            snprintf(err, errlen, "missing port (expected host:port, e.g. 127.0.0.1:8080)");
            return -1;
        }
        hlen = (size_t)(colon - text);
        if (memchr(text, ':', hlen) != NULL) {
            snprintf(err, errlen, "IPv6 addresses must be written in brackets, e.g. [::1]:8080");
            return -1;
        }
        if (hlen == 0) {
            snprintf(err, errlen, "missing host (use * for all interfaces, e.g. *:8080)");
            return -1;
        }
        if (hlen >= sizeof host) {
            snprintf(err, errlen, "host too long (expected an IP address)");
            return -1;
        }
        memcpy(host, text, hlen);
        host[hlen] = '\0';
        port = colon + 1;
    }

    unsigned long pnum = 0;
    if (!all_digits(port) || strlen(port) > 5 || (pnum = strtoul(port, NULL, 10)) < 1 ||
        pnum > 65535) {
        snprintf(err, errlen, "invalid port \"%.16s\" (expected a number from 1 to 65535)", port);
        return -1;
    }

    if (text[0] == '[') {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&out->ss;
        if (inet_pton(AF_INET6, host, &s6->sin6_addr) != 1) {
            snprintf(err, errlen, "\"%s\" is not a valid IPv6 address", host);
            return -1;
        }
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)pnum);
        out->len = sizeof *s6;
        return 0;
    }

    struct sockaddr_in *s4 = (struct sockaddr_in *)&out->ss;
    if (strcmp(host, "*") == 0) {
        s4->sin_addr.s_addr = htonl(INADDR_ANY);
    } else if (strcasecmp(host, "localhost") == 0) {
        s4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else if (inet_pton(AF_INET, host, &s4->sin_addr) != 1) {
        if (strspn(host, "0123456789.") == hlen)
            snprintf(err, errlen, "\"%s\" is not a valid IPv4 address", host);
        else
            snprintf(err, errlen,
                     "\"%s\" is not an IP address; host names are not resolved (use an IPv4 "
                     "address, [IPv6] or localhost)",
                     host);
        return -1;
    }
    s4->sin_family = AF_INET;
    s4->sin_port = htons((uint16_t)pnum);
    out->len = sizeof *s4;
    return 0;
}

int bw_server_name_parse(const char *text, char *host, size_t hostlen, uint16_t *port, char *err,
                         size_t errlen)
{
    const char *colon = text ? strrchr(text, ':') : NULL;
    if (colon == NULL || colon == text) {
        snprintf(err, errlen, "expected name:port");
        return -1;
    }
    size_t n = (size_t)(colon - text);
    if (n > 253 || n + 1 > hostlen) {
        snprintf(err, errlen, "host name longer than 253 characters");
        return -1;
    }
    size_t label = 0;
    bool alpha = false;
    for (size_t i = 0; i < n; i++) {
        char ch = text[i];
        if (ch == '.') {
            if (label == 0) {
                snprintf(err, errlen, "empty label in host name");
                return -1;
            }
            label = 0;
            continue;
        }
        if (!isalnum((unsigned char)ch) && ch != '-' && ch != '_') {
            snprintf(err, errlen, "'%c' is not allowed in a host name", ch);
            return -1;
        }
        if (isalpha((unsigned char)ch))
            alpha = true;
        if (++label > 63) {
            snprintf(err, errlen, "a label of the host name is longer than 63 characters");
            return -1;
        }
    }
    if (!alpha) {
        snprintf(err, errlen, "not a host name");
        return -1;
    }
    const char *p = colon + 1;
    unsigned long pnum = 0;
    if (!all_digits(p) || strlen(p) > 5 || (pnum = strtoul(p, NULL, 10)) < 1 || pnum > 65535) {
        snprintf(err, errlen, "invalid port \"%.16s\" (expected a number from 1 to 65535)", p);
        return -1;
    }
    memcpy(host, text, n);
    host[n] = '\0';
    *port = (uint16_t)pnum;
    return 0;
}

const char *bw_sockaddr_format(const bw_sockaddr *a, char *buf, size_t len)
{
    char ip[INET6_ADDRSTRLEN];

    if (len == 0)
        return buf;
    if (a->ss.ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)&a->ss;
        inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof ip);
        snprintf(buf, len, "%s:%u", ip, (unsigned)ntohs(s4->sin_port));
    } else if (a->ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&a->ss;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof ip);
        snprintf(buf, len, "[%s]:%u", ip, (unsigned)ntohs(s6->sin6_port));
    } else {
        snprintf(buf, len, "(unknown address family %d)", (int)a->ss.ss_family);
    }
    return buf;
}

/* Parses a range and reports whether the written address had bits beyond the prefix, which the
 * result drops; the validator refuses such ranges because they usually hide a typo. */
static int cidr_parse(const char *text, bw_cidr *out, bool *host_bits)
{
    char ip[INET6_ADDRSTRLEN];
    const char *slash = strchr(text, '/');
    size_t alen = slash ? (size_t)(slash - text) : strlen(text);

    memset(out, 0, sizeof *out);
    *host_bits = false;
    if (alen == 0 || alen >= sizeof ip)
        return -1;
    memcpy(ip, text, alen);
    ip[alen] = '\0';

    unsigned max;
    if (inet_pton(AF_INET, ip, out->addr) == 1) {
        out->family = AF_INET;
        max = 32;
    } else if (inet_pton(AF_INET6, ip, out->addr) == 1) {
        out->family = AF_INET6;
        max = 128;
    } else {
        return -1;
    }

    unsigned prefix = max;
    if (slash != NULL) {
        const char *p = slash + 1;
        if (!all_digits(p) || strlen(p) > 3)
            return -1;
        prefix = (unsigned)strtoul(p, NULL, 10);
        if (prefix > max)
            return -1;
    }
    out->prefix = (uint8_t)prefix;

    for (unsigned bit = prefix; bit < max; bit++) {
        uint8_t mask = (uint8_t)(0x80u >> (bit % 8));
        if (out->addr[bit / 8] & mask) {
            *host_bits = true;
            out->addr[bit / 8] &= (uint8_t)~mask;
        }
    }
    return 0;
}

int bw_cidr_parse(const char *text, bw_cidr *out)
{
    bool host_bits;
    if (text == NULL)
        return -1;
    return cidr_parse(text, out, &host_bits);
}

static bool prefix_equal(const uint8_t *a, const uint8_t *b, unsigned prefix)
{
    unsigned full = prefix / 8, rest = prefix % 8;
    if (memcmp(a, b, full) != 0)
        return false;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xffu << (8 - rest));
    return (a[full] & mask) == (b[full] & mask);
}

bool bw_cidr_list_match(const bw_cidr *list, size_t n, const struct sockaddr *sa)
{
    static const uint8_t mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    uint8_t v4[4], v6[16];
    bool has4 = false, has6 = false;

    if (sa == NULL)
        return false;
    if (sa->sa_family == AF_INET) {
        memcpy(v4, &((const struct sockaddr_in *)sa)->sin_addr, 4);
        has4 = true;
        memcpy(v6, mapped_prefix, 12);
        memcpy(v6 + 12, v4, 4);
        has6 = true;
    } else if (sa->sa_family == AF_INET6) {
        memcpy(v6, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
        has6 = true;
        if (memcmp(v6, mapped_prefix, 12) == 0) {
            memcpy(v4, v6 + 12, 4);
            has4 = true;
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (list[i].family == AF_INET && has4 && prefix_equal(list[i].addr, v4, list[i].prefix))
            return true;
        if (list[i].family == AF_INET6 && has6 && prefix_equal(list[i].addr, v6, list[i].prefix))
            return true;
    }
    return false;
}

/* ---------------------------------------------------------------------------------------------
 * Source positions: JSON path -> line:col of the value, from a scan of the original text.
 */

typedef struct pos_entry {
    char *path;
    unsigned line, col;
} pos_entry;

typedef struct pos_map {
    pos_entry *v;
    size_t n, cap;
} pos_map;

typedef struct scanner {
    const char *s;
    size_t len, i;
    unsigned line, col;
    char path[PATH_LEN];
    size_t plen;
    pos_map *map; /* NULL when only checking syntax */
    int depth;
    bool failed;
    unsigned err_line, err_col;
    char err[192];
} scanner;

/* Columns count characters, not bytes, so UTF-8 continuation bytes do not advance them. */
static void sc_adv(scanner *sc)
{
    if (sc->i >= sc->len)
        return;
    char ch = sc->s[sc->i++];
    if (ch == '\n') {
        sc->line++;
        sc->col = 1;
    } else if (sc->i >= sc->len || ((unsigned char)sc->s[sc->i] & 0xC0) != 0x80) {
        sc->col++;
    }
}

static bool sc_eof(const scanner *sc)
{
    return sc->i >= sc->len;
}

static char sc_peek(const scanner *sc)
{
    return sc->i < sc->len ? sc->s[sc->i] : '\0';
}

static void sc_ws(scanner *sc)
{
    while (!sc_eof(sc) && (sc_peek(sc) == ' ' || sc_peek(sc) == '\t' || sc_peek(sc) == '\r' ||
                           sc_peek(sc) == '\n'))
        sc_adv(sc);
}

/* Records the first syntax error at the current position; later ones are consequences. */
__attribute__((format(printf, 2, 3))) static int sc_fail(scanner *sc, const char *fmt, ...)
{
    if (!sc->failed) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(sc->err, sizeof sc->err, fmt, ap);
        va_end(ap);
        sc->failed = true;
        sc->err_line = sc->line;
        sc->err_col = sc->col;
    }
    return -1;
}

/* Explains an unexpected character where a value or a field name had to start. */
static int sc_unexpected(scanner *sc, const char *wanted)
{
    if (sc_eof(sc))
        return sc_fail(sc, "unexpected end of file, expected %s", wanted);
    char ch = sc_peek(sc);
    size_t back = sc->i;
    while (back > 0 && strchr(" \t\r\n", sc->s[back - 1]) != NULL)
        back--;
    if ((ch == '}' || ch == ']') && back > 0 && sc->s[back - 1] == ',')
        return sc_fail(sc, "trailing comma before '%c' is not allowed in JSON", ch);
    if (ch == '/')
        return sc_fail(sc, "comments are not allowed in JSON");
    if (ch == '\'')
        return sc_fail(sc, "strings must use double quotes, not single quotes");
    if ((unsigned char)ch < 0x20 || (unsigned char)ch >= 0x7f)
        return sc_fail(sc, "unexpected byte 0x%02x, expected %s", (unsigned char)ch, wanted);
    return sc_fail(sc, "unexpected '%c', expected %s", ch, wanted);
}

static void pos_record(scanner *sc)
{
    pos_map *m = sc->map;
    if (m == NULL)
        return;
    if (m->n == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 64;
        pos_entry *v = realloc(m->v, cap * sizeof *v);
        if (v == NULL)
            return;
        m->v = v;
        m->cap = cap;
    }
    char *p = strdup(sc->path);
    if (p == NULL)
        return;
    m->v[m->n++] = (pos_entry){p, sc->line, sc->col};
}

static void pos_free(pos_map *m)
{
    for (size_t i = 0; i < m->n; i++)
        free(m->v[i].path);
    free(m->v);
    m->v = NULL;
    m->n = m->cap = 0;
}

/* The nth (0-based) value recorded at this path; duplicate keys make n > 0 meaningful. */
static bool pos_find(const pos_map *m, const char *path, int nth, unsigned *line, unsigned *col)
{
    for (size_t i = 0; i < m->n; i++) {
        if (strcmp(m->v[i].path, path) == 0 && nth-- == 0) {
            *line = m->v[i].line;
            *col = m->v[i].col;
            return true;
        }
    }
    return false;
}

static void sc_put_utf8(char *out, size_t *o, size_t cap, unsigned long cp)
{
    char tmp[4];
    size_t n;
    if (cp < 0x80) {
        tmp[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        tmp[0] = (char)(0xC0 | (cp >> 6));
        tmp[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        tmp[0] = (char)(0xE0 | (cp >> 12));
        tmp[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        tmp[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        tmp[0] = (char)(0xF0 | (cp >> 18));
        tmp[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        tmp[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        tmp[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    for (size_t k = 0; k < n && *o + 1 < cap; k++)
        out[(*o)++] = tmp[k];
}

static int sc_hex4(scanner *sc, unsigned long *v)
{
    *v = 0;
    for (int k = 0; k < 4; k++) {
        char h = sc_peek(sc);
        *v <<= 4;
        if (h >= '0' && h <= '9')
            *v |= (unsigned long)(h - '0');
        else if (h >= 'a' && h <= 'f')
            *v |= (unsigned long)(h - 'a' + 10);
        else if (h >= 'A' && h <= 'F')
            *v |= (unsigned long)(h - 'A' + 10);
        else
            return sc_fail(sc, "\\u must be followed by four hexadecimal digits");
        sc_adv(sc);
    }
    return 0;
}

/* Reads a string token, decoding it into out (when given) the way cJSON decodes object keys. */
static int sc_string(scanner *sc, char *out, size_t cap)
{
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    unsigned line = sc->line, col = sc->col;
    size_t o = 0;

    sc_adv(sc); /* opening quote */
    while (!sc_eof(sc) && sc_peek(sc) != '"') {
        char ch = sc_peek(sc);
        if (ch == '\n')
            break;
        if ((unsigned char)ch < 0x20)
            return sc_fail(sc,
                           "control character 0x%02x inside a string (write it as an escape "
                           "such as \\t)",
                           (unsigned char)ch);
        if (ch != '\\') {
            if (out && o + 1 < cap)
                out[o++] = ch;
            sc_adv(sc);
            continue;
        }
        sc_adv(sc);
        char e = sc_peek(sc);
        const char *k = e != '\0' ? strchr(from, e) : NULL;
        if (e == 'u') {
            unsigned long cp, lo;
            sc_adv(sc);
            if (sc_hex4(sc, &cp) < 0)
                return -1;
            if (cp >= 0xD800 && cp < 0xDC00 && sc->i + 1 < sc->len && sc->s[sc->i] == '\\' &&
                sc->s[sc->i + 1] == 'u') {
                sc_adv(sc);
                sc_adv(sc);
                if (sc_hex4(sc, &lo) < 0)
                    return -1;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (out)
                sc_put_utf8(out, &o, cap, cp);
        } else if (k != NULL) {
            sc_adv(sc);
            if (out && o + 1 < cap)
                out[o++] = to[k - from];
        } else {
            return sc_fail(sc, "invalid escape '\\%c' in a string", e ? e : ' ');
        }
    }
    if (sc_peek(sc) != '"') {
        sc->line = line;
        sc->col = col;
        return sc_fail(sc, "string not closed on the same line (missing '\"')");
    }
    sc_adv(sc); /* closing quote */
    if (out)
        out[o] = '\0';
    return 0;
}

static int sc_value(scanner *sc);

static void sc_push(scanner *sc, bool dot, const char *key, size_t idx)
{
    size_t room = sizeof sc->path - sc->plen;
    int n;
    if (key == NULL)
        n = snprintf(sc->path + sc->plen, room, "[%zu]", idx);
    else if (dot)
        n = snprintf(sc->path + sc->plen, room, ".%s", key);
    else
        n = snprintf(sc->path + sc->plen, room, "%s", key);
    if (n > 0)
        sc->plen = (size_t)n < room ? sc->plen + (size_t)n : sizeof sc->path - 1;
}

static void sc_pop(scanner *sc, size_t to)
{
    sc->plen = to;
    sc->path[to] = '\0';
}

static int sc_object(scanner *sc)
{
    char key[PATH_LEN];
    size_t base = sc->plen;
    unsigned line = sc->line, col = sc->col;

    sc_adv(sc);
    sc_ws(sc);
    if (sc_peek(sc) == '}') {
        sc_adv(sc);
        return 0;
    }
    for (;;) {
        sc_ws(sc);
        if (sc_eof(sc))
            return sc_fail(sc, "unexpected end of file: the object opened at %u:%u is not closed",
                           line, col);
        if (sc_peek(sc) != '"')
            return sc_unexpected(sc, "a field name in double quotes");
        if (sc_string(sc, key, sizeof key) < 0)
            return -1;
        sc_ws(sc);
        if (sc_peek(sc) != ':')
            return sc_unexpected(sc, "':' after the field name");
        sc_adv(sc);
        sc_push(sc, base != 0, key, 0);
        int rc = sc_value(sc);
        sc_pop(sc, base);
        if (rc < 0)
            return -1;
        sc_ws(sc);
        if (sc_peek(sc) == ',') {
            sc_adv(sc);
            continue;
        }
        if (sc_peek(sc) == '}') {
            sc_adv(sc);
            return 0;
        }
        if (sc_eof(sc))
            return sc_fail(sc, "unexpected end of file: the object opened at %u:%u is not closed",
                           line, col);
        return sc_unexpected(sc, "',' or '}' after a field (a missing comma?)");
    }
}

static int sc_array(scanner *sc)
{
    size_t base = sc->plen;
    unsigned line = sc->line, col = sc->col;

    sc_adv(sc);
    sc_ws(sc);
    if (sc_peek(sc) == ']') {
        sc_adv(sc);
        return 0;
    }
    for (size_t idx = 0;; idx++) {
        sc_ws(sc);
        if (sc_eof(sc))
            return sc_fail(sc, "unexpected end of file: the array opened at %u:%u is not closed",
                           line, col);
        sc_push(sc, false, NULL, idx);
        int rc = sc_value(sc);
        sc_pop(sc, base);
        if (rc < 0)
            return -1;
        sc_ws(sc);
        if (sc_peek(sc) == ',') {
            sc_adv(sc);
            continue;
        }
        if (sc_peek(sc) == ']') {
            sc_adv(sc);
            return 0;
        }
        if (sc_eof(sc))
            return sc_fail(sc, "unexpected end of file: the array opened at %u:%u is not closed",
                           line, col);
        return sc_unexpected(sc, "',' or ']' after an array element (a missing comma?)");
    }
}

static int sc_digits(scanner *sc)
{
    if (!isdigit((unsigned char)sc_peek(sc)))
        return -1;
    while (isdigit((unsigned char)sc_peek(sc)))
        sc_adv(sc);
    return 0;
}

/* JSON numbers: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
static int sc_number(scanner *sc)
{
    unsigned line = sc->line, col = sc->col;
    if (sc_peek(sc) == '-')
        sc_adv(sc);
    if (sc_peek(sc) == '0') {
        sc_adv(sc);
        if (isdigit((unsigned char)sc_peek(sc)))
            goto bad;
    } else if (sc_digits(sc) < 0) {
        goto bad;
    }
    if (sc_peek(sc) == '.') {
        sc_adv(sc);
        if (sc_digits(sc) < 0)
            goto bad;
    }
    if (sc_peek(sc) == 'e' || sc_peek(sc) == 'E') {
        sc_adv(sc);
        if (sc_peek(sc) == '+' || sc_peek(sc) == '-')
            sc_adv(sc);
        if (sc_digits(sc) < 0)
            goto bad;
    }
    if (!sc_eof(sc) && strchr(",]} \t\r\n", sc_peek(sc)) == NULL)
        goto bad;
    return 0;
bad:
    sc->line = line;
    sc->col = col;
    return sc_fail(sc, "invalid number (JSON numbers are like 10, -2, 0.5 or 1e3; no leading "
                       "zeros, '+', hex or quotes)");
}

static int sc_literal(scanner *sc)
{
    static const char *const words[] = {"true", "false", "null"};
    for (size_t k = 0; k < 3; k++) {
        size_t n = strlen(words[k]);
        if (sc->len - sc->i >= n && memcmp(sc->s + sc->i, words[k], n) == 0 &&
            (sc->i + n == sc->len || strchr(",]} \t\r\n", sc->s[sc->i + n]) != NULL)) {
            for (size_t j = 0; j < n; j++)
                sc_adv(sc);
            return 0;
        }
    }
    if (isalpha((unsigned char)sc_peek(sc)))
        return sc_fail(sc, "unexpected word; strings need double quotes and the only bare words "
                           "are true, false and null");
    return sc_unexpected(sc, "a value (string, number, object, array, true, false or null)");
}

static int sc_value(scanner *sc)
{
    sc_ws(sc);
    if (sc_eof(sc))
        return sc_unexpected(sc, "a value");
    if (++sc->depth > 1000)
        return sc_fail(sc, "nested more than 1000 levels deep");
    pos_record(sc);
    int rc;
    char ch = sc_peek(sc);
    if (ch == '{')
        rc = sc_object(sc);
    else if (ch == '[')
        rc = sc_array(sc);
    else if (ch == '"')
        rc = sc_string(sc, NULL, 0);
    else if (ch == '-' || isdigit((unsigned char)ch))
        rc = sc_number(sc);
    else
        rc = sc_literal(sc);
    sc->depth--;
    return rc;
}

/* Walks the whole document: fills map (when given) and returns 0, or -1 with sc->err set. */
static int pos_scan(const char *text, size_t len, pos_map *map, scanner *sc)
{
    *sc = (scanner){.s = text, .len = len, .line = 1, .col = 1, .map = map};
    sc->path[0] = '\0';
    sc_ws(sc);
    if (sc_eof(sc))
        return sc_fail(sc, "the file is empty");
    if (sc_value(sc) < 0)
        return -1;
    sc_ws(sc);
    if (!sc_eof(sc))
        return sc_fail(sc, "unexpected content after the end of the JSON document");
    return 0;
}

static void line_col_at(const char *text, size_t len, size_t off, unsigned *line, unsigned *col)
{
    scanner sc = {.s = text, .len = len, .line = 1, .col = 1};
    while (sc.i < off && sc.i < len)
        sc_adv(&sc);
    *line = sc.line;
    *col = sc.col;
}

/* ---------------------------------------------------------------------------------------------
 * Validation context and typed field readers
 */

typedef struct env_over {
    bool has_capacity, has_refill, has_threshold, has_reset, has_half_open, has_level;
    uint32_t capacity, threshold, reset_ms, half_open;
    double refill;
    bw_log_level level;
    const char *redis_url;
} env_over;

typedef struct vctx {
    const char *file;
    const pos_map *pos;
    bw_diag *diag;
    size_t errors;
    bool oom;
    char *dir; /* absolute directory of the configuration file */
    bw_getenv_fn getenv_fn;
    env_over env;
    bw_diag notes;    /* environment overrides in effect, handed to the config at the end */
    bool *notes_warn; /* per note: the value replaced was written in the file */
} vctx;

/* Records an override in effect; warn says it replaced a value the file sets. */
static void vnote(vctx *c, bool warn, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void vnote(vctx *c, bool warn, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    size_t n = c->notes.count;
    bool *nw = realloc(c->notes_warn, (n + 1) * sizeof *nw);
    if (nw == NULL) {
        c->oom = true;
        return;
    }
    c->notes_warn = nw;
    bw_diag_add(&c->notes, "%s", line);
    if (c->notes.count == n + 1)
        nw[n] = warn;
    else
        c->oom = true;
}

/* Bounded concatenation: a path cut short only costs the position lookup, never memory safety. */
static void path_cat(char *out, size_t n, const char *a, const char *b, const char *c)
{
    size_t used = 0;
    const char *parts[3] = {a, b, c};
    for (int k = 0; k < 3; k++) {
        size_t len = strlen(parts[k]);
        if (len > n - 1 - used)
            len = n - 1 - used;
        memmove(out + used, parts[k], len);
        used += len;
    }
    out[used] = '\0';
}

static void path_key(char *out, size_t n, const char *parent, const char *key)
{
    path_cat(out, n, parent, parent[0] ? "." : "", key);
}

static void path_idx(char *out, size_t n, const char *parent, size_t i)
{
    char idx[32];
    sprintf(idx, "[%zu]", i);
    path_cat(out, n, parent, idx, "");
}

__attribute__((format(printf, 5, 0))) static void
vreport(vctx *c, const char *pos_path, int nth, const char *path, const char *fmt, va_list ap)
{
    char msg[1024];
    unsigned line, col;
    vsnprintf(msg, sizeof msg, fmt, ap);
    const char *shown = path[0] ? path : "(top level)";
    if (pos_path != NULL && c->pos != NULL && pos_find(c->pos, pos_path, nth, &line, &col))
        bw_diag_add(c->diag, "%s:%u:%u: %s: %s", c->file, line, col, shown, msg);
    else
        bw_diag_add(c->diag, "%s: %s: %s", c->file, shown, msg);
    c->errors++;
}

/* An error about the value found at path. */
__attribute__((format(printf, 3, 4))) static void verr(vctx *c, const char *path, const char *fmt,
                                                       ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(c, path, 0, path, fmt, ap);
    va_end(ap);
}

/* An error about path, positioned at another value (the object lacking a field, a duplicate). */
__attribute__((format(printf, 5, 6))) static void verr_at(vctx *c, const char *pos_path, int nth,
                                                          const char *path, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(c, pos_path, nth, path, fmt, ap);
    va_end(ap);
}

static char *vstrdup(vctx *c, const char *s)
{
    if (s == NULL)
        return NULL;
    char *d = strdup(s);
    if (d == NULL)
        c->oom = true;
    return d;
}

static void *vcalloc(vctx *c, size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (p == NULL)
        c->oom = true;
    return p;
}

/* A short rendering of a JSON value for "got ..." in messages. */
static const char *describe(const cJSON *v, char *buf, size_t n)
{
    if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        if (d == floor(d) && fabs(d) < 1e15)
            snprintf(buf, n, "%.0f", d);
        else
            snprintf(buf, n, "%g", d);
    } else if (cJSON_IsString(v)) {
        char tmp[64];
        size_t k = 0;
        const char *s = v->valuestring;
        for (; s[k] && k < sizeof tmp - 1; k++)
            tmp[k] = (unsigned char)s[k] < 0x20 ? '?' : s[k];
        tmp[k] = '\0';
        snprintf(buf, n, "\"%s%s\"", tmp, s[k] ? "..." : "");
    } else if (cJSON_IsBool(v)) {
        snprintf(buf, n, "%s", cJSON_IsTrue(v) ? "true" : "false");
    } else if (cJSON_IsNull(v)) {
        snprintf(buf, n, "null");
    } else if (cJSON_IsArray(v)) {
        snprintf(buf, n, "an array");
    } else if (cJSON_IsObject(v)) {
        snprintf(buf, n, "an object");
    } else {
        snprintf(buf, n, "an unknown value");
    }
    return buf;
}

static const cJSON *field(const cJSON *obj, const char *key)
{
    return obj != NULL ? cJSON_GetObjectItemCaseSensitive(obj, key) : NULL;
}

/* Reports unknown and repeated members; a repeated key is an error because cJSON keeps only
 * one of the values and the operator cannot know which. */
static void check_fields(vctx *c, const cJSON *obj, const char *path, const char *const *allowed)
{
    char p[PATH_LEN], list[512];
    size_t used = 0;
    list[0] = '\0';
    for (size_t k = 0; allowed[k] != NULL; k++) {
        int w = snprintf(list + used, sizeof list - used, "%s%s", k ? ", " : "", allowed[k]);
        if (w > 0 && (size_t)w < sizeof list - used)
            used += (size_t)w;
    }

    const cJSON *el;
    cJSON_ArrayForEach(el, obj)
    {
        const char *key = el->string ? el->string : "";
        path_key(p, sizeof p, path, key);
        int seen = 0;
        for (const cJSON *prev = obj->child; prev != el; prev = prev->next)
            if (prev->string && strcmp(prev->string, key) == 0)
                seen++;
        if (seen > 0) {
            verr_at(c, p, seen, p, "field \"%s\" appears more than once in the same object", key);
            continue;
        }
        bool known = false;
        for (size_t k = 0; allowed[k] != NULL && !known; k++)
            known = strcmp(allowed[k], key) == 0;
        if (!known)
            verr(c, p, "unknown field \"%s\" (allowed here: %s)", key, list);
    }
}

/* Returns the member as an object, NULL when absent or of the wrong type (reported). */
static const cJSON *get_object(vctx *c, const cJSON *obj, const char *opath, const char *key,
                               bool required)
{
    char p[PATH_LEN], got[96];
    const cJSON *v = field(obj, key);
    path_key(p, sizeof p, opath, key);
    if (v == NULL) {
        if (required)
            verr_at(c, opath, 0, p, "required field is missing");
        return NULL;
    }
    if (!cJSON_IsObject(v)) {
        verr(c, p, "must be an object, got %s", describe(v, got, sizeof got));
        return NULL;
    }
    return v;
}

static bool get_uint(vctx *c, const cJSON *obj, const char *opath, const char *key, uint64_t min,
                     uint64_t max, uint64_t *out)
{
    char p[PATH_LEN], got[96];
    const cJSON *v = field(obj, key);
    if (v == NULL)
        return false;
    path_key(p, sizeof p, opath, key);
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
        v->valuedouble < (double)min || v->valuedouble > (double)max) {
        verr(c, p, "must be an integer between %" PRIu64 " and %" PRIu64 ", got %s", min, max,
             describe(v, got, sizeof got));
        return false;
    }
    *out = (uint64_t)v->valuedouble;
    return true;
}

/* Optional integer field; true when present and valid, false when absent or invalid. */
static bool get_u32(vctx *c, const cJSON *obj, const char *opath, const char *key, uint32_t min,
                    uint32_t max, uint32_t *out)
{
    uint64_t v;
    if (!get_uint(c, obj, opath, key, min, max, &v))
        return false;
    *out = (uint32_t)v;
    return true;
}

static bool get_number(vctx *c, const cJSON *obj, const char *opath, const char *key, double min,
                       double max, double *out)
{
    char p[PATH_LEN], got[96];
    const cJSON *v = field(obj, key);
    if (v == NULL)
        return false;
    path_key(p, sizeof p, opath, key);
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= min) || !(v->valuedouble <= max)) {
        verr(c, p, "must be a number between %g and %g, got %s", min, max,
             describe(v, got, sizeof got));
        return false;
    }
    *out = v->valuedouble;
    return true;
}

static bool get_bool(vctx *c, const cJSON *obj, const char *opath, const char *key, bool *out)
{
    char p[PATH_LEN], got[96];
    const cJSON *v = field(obj, key);
    if (v == NULL)
        return false;
    path_key(p, sizeof p, opath, key);
    if (!cJSON_IsBool(v)) {
        verr(c, p, "must be true or false, got %s", describe(v, got, sizeof got));
        return false;
    }
    *out = cJSON_IsTrue(v);
    return true;
}

/* A non-empty string member; NULL when absent (reported if required) or invalid (reported). */
static const char *get_string(vctx *c, const cJSON *obj, const char *opath, const char *key,
                              bool required)
{
    char p[PATH_LEN], got[96];
    const cJSON *v = field(obj, key);
    path_key(p, sizeof p, opath, key);
    if (v == NULL) {
        if (required)
            verr_at(c, opath, 0, p, "required field is missing");
        return NULL;
    }
    if (!cJSON_IsString(v)) {
        verr(c, p, "must be a string, got %s", describe(v, got, sizeof got));
        return NULL;
    }
    if (v->valuestring[0] == '\0') {
        verr(c, p, "must not be empty");
        return NULL;
    }
    return v->valuestring;
}

/* Names of upstreams and policies appear in URLs, metric labels and Redis keys. */
static bool valid_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > MAX_NAME_LEN)
        return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && strchr("_-.", *s) == NULL)
            return false;
    return true;
}

static bool valid_token(const char *s)
{
    if (*s == '\0')
        return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && strchr("!#$%&'*+-.^_`|~", *s) == NULL)
            return false;
    return true;
}

/* Visible ASCII only: what may go into a request line or a Host header we write ourselves. */
static bool valid_check_text(const char *s)
{
    for (; *s; s++) {
        if (*s <= 0x20 || *s >= 0x7f)
            return false;
    }
    return true;
}

static bool valid_env_name(const char *s)
{
    if (!isalpha((unsigned char)*s) && *s != '_')
        return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '_')
            return false;
    return true;
}

static char *resolve_path(vctx *c, const char *p)
{
    if (p[0] == '/')
        return vstrdup(c, p);
    char *out = NULL;
    if (asprintf(&out, "%s/%s", c->dir, p) < 0) {
        c->oom = true;
        return NULL;
    }
    return out;
}

static char *config_dir(const char *path)
{
    const char *slash = path ? strrchr(path, '/') : NULL;
    char *dir;
    if (slash == NULL)
        dir = strdup(".");
    else if (slash == path)
        dir = strdup("/");
    else
        dir = strndup(path, (size_t)(slash - path));
    if (dir == NULL)
        return NULL;
    char *abs = realpath(dir, NULL);
    if (abs != NULL) {
        free(dir);
        return abs;
    }
    return dir;
}

static void known_names(char *buf, size_t n, const char *const *names, size_t count)
{
    size_t used = 0;
    buf[0] = '\0';
    if (count == 0) {
        snprintf(buf, n, "none defined");
        return;
    }
    for (size_t i = 0; i < count; i++) {
        const char *name = names[i] ? names[i] : "?";
        if (used + strlen(name) + 8 >= n) {
            snprintf(buf + used, n - used, ", ...");
            return;
        }
        used += (size_t)snprintf(buf + used, n - used, "%s%s", i ? ", " : "", name);
    }
}

static int log_level_from(const char *s, bw_log_level *out)
{
    static const struct {
        const char *name;
        bw_log_level level;
    } levels[] = {{"debug", BW_LOG_DEBUG},
                  {"info", BW_LOG_INFO},
                  {"warn", BW_LOG_WARN},
                  {"warning", BW_LOG_WARN},
                  {"error", BW_LOG_ERROR}};
    for (size_t i = 0; i < sizeof levels / sizeof levels[0]; i++) {
        if (strcasecmp(s, levels[i].name) == 0) {
            *out = levels[i].level;
            return 0;
        }
    }
    return -1;
}

/* Checks redis://[:password@]host:port[/db] and unix:///path. The reason never repeats the URL,
 * which may carry a password. */
static int redis_url_check(const char *url, char *err, size_t errlen)
{
    if (strncmp(url, "unix://", 7) == 0) {
        const char *path = url + 7;
        if (path[0] != '/' || path[1] == '\0') {
            snprintf(err, errlen, "a unix socket URL needs an absolute path: unix:///path/to/sock");
            return -1;
        }
        return 0;
    }
    if (strncmp(url, "rediss://", 9) == 0) {
        snprintf(err, errlen, "TLS to Redis (rediss://) is not supported; use redis://");
        return -1;
    }
    if (strncmp(url, "redis://", 8) != 0) {
        snprintf(err, errlen,
                 "must start with redis:// or unix:// (redis://[:password@]host:port[/db] or "
                 "unix:///path)");
        return -1;
    }
    const char *rest = url + 8;
    const char *at = strrchr(rest, '@');
    if (at != NULL) {
        if (rest[0] != ':' || at == rest + 1) {
            snprintf(err, errlen,
                     "the credentials must be written :password@ (redis://:secret@host:port)");
            return -1;
        }
        rest = at + 1;
    }
    const char *slash = strchr(rest, '/');
    size_t hlen = slash ? (size_t)(slash - rest) : strlen(rest);
    char hostport[128];
    if (hlen >= sizeof hostport) {
        snprintf(err, errlen, "host:port is too long");
        return -1;
    }
    memcpy(hostport, rest, hlen);
    hostport[hlen] = '\0';
    bw_sockaddr sa;
    char why[192];
    if (bw_sockaddr_parse(hostport, &sa, why, sizeof why) < 0) {
        snprintf(err, errlen, "invalid host:port: %s", why);
        return -1;
    }
    if (strncmp(hostport, "*:", 2) == 0) {
        snprintf(err, errlen, "invalid host: * is only meaningful for listeners");
        return -1;
    }
    if (slash != NULL) {
        const char *db = slash + 1;
        if (!all_digits(db) || strlen(db) > 9) {
            snprintf(err, errlen, "the database after '/' must be a number (e.g. /0)");
            return -1;
        }
    }
    return 0;
}

static bool sockaddr_equal(const bw_sockaddr *a, const bw_sockaddr *b)
{
    if (a->ss.ss_family != b->ss.ss_family)
        return false;
    if (a->ss.ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)&a->ss, *y = (const void *)&b->ss;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const void *)&a->ss, *y = (const void *)&b->ss;
    return x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, 16) == 0;
}

static bool sockaddr_is_any(const bw_sockaddr *a)
{
    if (a->ss.ss_family == AF_INET)
        return ((const struct sockaddr_in *)&a->ss)->sin_addr.s_addr == htonl(INADDR_ANY);
    if (a->ss.ss_family == AF_INET6)
        return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)&a->ss)->sin6_addr);
    return false;
}

/* Two listening sockets on the same port where one is the wildcard of the same family cannot
 * both bind, so they are reported as a conflict just like identical addresses. */
static bool sockaddr_conflict(const bw_sockaddr *a, const bw_sockaddr *b)
{
    if (a->len == 0 || b->len == 0 || a->ss.ss_family != b->ss.ss_family)
        return false;
    if (sockaddr_equal(a, b))
        return true;
    in_port_t pa, pb;
    if (a->ss.ss_family == AF_INET) {
        pa = ((const struct sockaddr_in *)&a->ss)->sin_port;
        pb = ((const struct sockaddr_in *)&b->ss)->sin_port;
    } else {
        pa = ((const struct sockaddr_in6 *)&a->ss)->sin6_port;
        pb = ((const struct sockaddr_in6 *)&b->ss)->sin6_port;
    }
    return pa == pb && (sockaddr_is_any(a) || sockaddr_is_any(b));
}

/* ---------------------------------------------------------------------------------------------
 * Environment overrides
 */

static const char *env_get(vctx *c, const char *name)
{
    const char *v = c->getenv_fn ? c->getenv_fn(name) : getenv(name);
    return (v != NULL && v[0] != '\0') ? v : NULL;
}

static bool env_uint(vctx *c, const char *name, uint32_t min, uint32_t max, uint32_t *out)
{
    const char *v = env_get(c, name);
    if (v == NULL)
        return false;
    unsigned long long n = 0;
    if (!all_digits(v) || strlen(v) > 10 || (n = strtoull(v, NULL, 10)) < min || n > max) {
        bw_diag_add(c->diag, "%s: environment %s: must be an integer between %u and %u, got \"%s\"",
                    c->file, name, min, max, v);
        c->errors++;
        return false;
    }
    *out = (uint32_t)n;
    return true;
}

static bool env_number(vctx *c, const char *name, double min, double max, double *out)
{
    const char *v = env_get(c, name);
    if (v == NULL)
        return false;
    char *end = NULL;
    errno = 0;
    double d = strtod(v, &end);
    if (errno != 0 || end == v || *end != '\0' || !isfinite(d) || d < min || d > max ||
        strspn(v, "0123456789.") != strlen(v)) {
        bw_diag_add(c->diag, "%s: environment %s: must be a number between %g and %g, got \"%s\"",
                    c->file, name, min, max, v);
        c->errors++;
        return false;
    }
    *out = d;
    return true;
}

static void read_env(vctx *c)
{
    env_over *e = &c->env;
    double secs;

    e->has_capacity = env_uint(c, "RATE_LIMIT_CAPACITY", 1, MAX_COUNT, &e->capacity);
    e->has_refill = env_number(c, "RATE_LIMIT_REFILL_RATE", 0, MAX_COUNT, &e->refill);
    e->has_threshold =
        env_uint(c, "CIRCUIT_BREAKER_FAILURE_THRESHOLD", 1, MAX_COUNT, &e->threshold);
    e->has_half_open =
        env_uint(c, "CIRCUIT_BREAKER_HALF_OPEN_SUCCESS_THRESHOLD", 1, MAX_COUNT, &e->half_open);
    if (env_number(c, "CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS", 0.001, MAX_MS / 1000.0, &secs)) {
        e->has_reset = true;
        e->reset_ms = (uint32_t)llround(secs * 1000.0);
    }

    const char *url = env_get(c, "REDIS_URL");
    if (url != NULL) {
        char why[256];
        if (redis_url_check(url, why, sizeof why) < 0) {
            bw_diag_add(c->diag, "%s: environment REDIS_URL: invalid URL: %s", c->file, why);
            c->errors++;
        } else {
            e->redis_url = url;
        }
    }

    const char *level = env_get(c, "LOG_LEVEL");
    if (level != NULL) {
        if (log_level_from(level, &e->level) == 0) {
            e->has_level = true;
        } else {
            bw_diag_add(c->diag,
                        "%s: environment LOG_LEVEL: must be one of debug, info, warn, error, got "
                        "\"%.64s\"",
                        c->file, level);
            c->errors++;
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Sections
 */

static void set_defaults(bw_config *cfg)
{
    cfg->workers = 1;
    cfg->default_rate_limit = -1;
    cfg->rate_limit_table_size = 65536;
    cfg->redis.sync_interval_ms = 100;
    cfg->redis.share_when_down = true;
    cfg->redis.connect_timeout_ms = 1000;
    cfg->redis.command_timeout_ms = 1000;
    cfg->log.level = BW_LOG_INFO;
    cfg->limits.max_header_bytes = 32768;
    cfg->limits.max_headers = 100;
    cfg->limits.max_body_bytes = 0;
    cfg->limits.request_buffer_bytes = 65536;
    cfg->limits.header_timeout_ms = 10000;
    cfg->limits.client_idle_timeout_ms = 60000;
    cfg->limits.max_connections = 10000;
    cfg->shutdown_timeout_ms = 10000;
    cfg->drain_idle_grace_ms = 1000;
    cfg->probes_on_listeners = true;
}

static void check_tls_file(vctx *c, const char *path, const char *file)
{
    struct stat st;
    FILE *f = fopen(file, "r");
    if (f == NULL) {
        verr(c, path, "cannot read \"%s\": %s", file, strerror(errno));
        return;
    }
    if (fstat(fileno(f), &st) == 0 && !S_ISREG(st.st_mode))
        verr(c, path, "\"%s\" is not a regular file (expected a PEM file)", file);
    fclose(f);
}

/* One element of "certificates" (or the "cert"/"key" pair itself when obj is the tls object). */
static void parse_tls_cert(vctx *c, const cJSON *obj, const char *p, bw_tls_cert_conf *out)
{
    char ap[PATH_LEN];
    const char *cert = get_string(c, obj, p, "cert", true);
    const char *key = get_string(c, obj, p, "key", true);
    const char *ocsp = get_string(c, obj, p, "ocsp", false);
    if (cert != NULL) {
        out->cert = resolve_path(c, cert);
        path_key(ap, sizeof ap, p, "cert");
        if (out->cert != NULL)
            check_tls_file(c, ap, out->cert);
    }
    if (key != NULL) {
        out->key = resolve_path(c, key);
        path_key(ap, sizeof ap, p, "key");
        if (out->key != NULL)
            check_tls_file(c, ap, out->key);
    }
    if (ocsp != NULL) {
        out->ocsp = resolve_path(c, ocsp);
        path_key(ap, sizeof ap, p, "ocsp");
        if (out->ocsp != NULL)
            check_tls_file(c, ap, out->ocsp);
    }
}

static void parse_listener(vctx *c, const cJSON *item, const char *p, bw_listener_conf *l)
{
    static const char *const fields[] = {"address", "tls", NULL};
    static const char *const tls_fields[] = {
        "cert", "key", "ocsp", "certificates", "reload_check_ms", "ticket_rotate_ms", NULL};
    static const char *const cert_fields[] = {"cert", "key", "ocsp", NULL};
    char ap[PATH_LEN], tp[PATH_LEN], why[256], got[96];

    check_fields(c, item, p, fields);
    const char *addr = get_string(c, item, p, "address", true);
    if (addr != NULL) {
        l->address = vstrdup(c, addr);
        path_key(ap, sizeof ap, p, "address");
        if (bw_sockaddr_parse(addr, &l->addr, why, sizeof why) < 0)
            verr(c, ap, "invalid address \"%s\": %s", addr, why);
    }

    const cJSON *tls = get_object(c, item, p, "tls", false);
    if (tls == NULL)
        return;
    path_key(tp, sizeof tp, p, "tls");
    check_fields(c, tls, tp, tls_fields);
    l->tls_enabled = true;
    l->tls.reload_check_ms = 60000;
    l->tls.ticket_rotate_ms = 3600000;
    (void)get_u32(c, tls, tp, "reload_check_ms", 100, MAX_MS, &l->tls.reload_check_ms);
    (void)get_u32(c, tls, tp, "ticket_rotate_ms", 1000, MAX_MS, &l->tls.ticket_rotate_ms);

    const cJSON *list = field(tls, "certificates");
    if (list == NULL) {
        l->tls.certs = vcalloc(c, 1, sizeof *l->tls.certs);
        if (l->tls.certs == NULL)
            return;
        l->tls.n_certs = 1;
        parse_tls_cert(c, tls, tp, &l->tls.certs[0]);
    } else {
        path_key(ap, sizeof ap, tp, "certificates");
        l->tls.list = true;
        if (field(tls, "cert") != NULL || field(tls, "key") != NULL || field(tls, "ocsp") != NULL) {
            verr(c, ap,
                 "\"certificates\" and \"cert\"/\"key\"/\"ocsp\" are mutually exclusive: "
                 "move the single certificate into the list");
            return;
        }
        if (!cJSON_IsArray(list)) {
            verr(c, ap, "must be an array of {\"cert\": PATH, \"key\": PATH} objects, got %s",
                 describe(list, got, sizeof got));
            return;
        }
        size_t n = (size_t)cJSON_GetArraySize(list);
        if (n == 0) {
            verr(c, ap, "must contain at least one certificate (the first is the default)");
            return;
        }
        l->tls.certs = vcalloc(c, n, sizeof *l->tls.certs);
        if (l->tls.certs == NULL)
            return;
        l->tls.n_certs = n;
        size_t i = 0;
        const cJSON *el;
        cJSON_ArrayForEach(el, list)
        {
            char ep[PATH_LEN];
            path_idx(ep, sizeof ep, ap, i);
            if (!cJSON_IsObject(el))
                verr(c, ep, "must be an object like {\"cert\": PATH, \"key\": PATH}, got %s",
                     describe(el, got, sizeof got));
            else {
                check_fields(c, el, ep, cert_fields);
                parse_tls_cert(c, el, ep, &l->tls.certs[i]);
            }
            i++;
        }
    }
    l->tls.cert = l->tls.certs[0].cert;
    l->tls.key = l->tls.certs[0].key;
}

/* A required, non-empty array (object == false) or object field of parent. Returns it with its
 * size in *n, or NULL after reporting what is wrong: missing (with `example`, placed at the
 * parent), of another type (`expected` names the right one), or empty (`empty`). */
static const cJSON *required_collection(vctx *c, const cJSON *parent, const char *parent_path,
                                        const char *name, const char *path, bool object,
                                        const char *example, const char *expected,
                                        const char *empty, size_t *n)
{
    char got[96];
    const cJSON *v = field(parent, name);
    if (v == NULL) {
        verr_at(c, parent_path, 0, path, "required field is missing; %s", example);
        return NULL;
    }
    if (object ? !cJSON_IsObject(v) : !cJSON_IsArray(v)) {
        verr(c, path, "must be %s, got %s", expected, describe(v, got, sizeof got));
        return NULL;
    }
    *n = (size_t)cJSON_GetArraySize(v);
    if (*n == 0) {
        verr(c, path, "%s", empty);
        return NULL;
    }
    return v;
}

static void parse_listeners(vctx *c, const cJSON *root, bw_config *cfg)
{
    char p[PATH_LEN], q[PATH_LEN], got[96];
    size_t n;
    const cJSON *arr = required_collection(
        c, root, "", "listeners", "listeners", false,
        "add at least one listener, e.g. [{\"address\": \"0.0.0.0:8080\"}]",
        "an array of listener objects", "must contain at least one listener", &n);
    if (arr == NULL)
        return;
    cfg->listeners = vcalloc(c, n, sizeof *cfg->listeners);
    if (cfg->listeners == NULL)
        return;
    cfg->n_listeners = n;

    size_t i = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, arr)
    {
        path_idx(p, sizeof p, "listeners", i);
        if (!cJSON_IsObject(item))
            verr(c, p, "must be an object like {\"address\": \"0.0.0.0:8080\"}, got %s",
                 describe(item, got, sizeof got));
        else
            parse_listener(c, item, p, &cfg->listeners[i]);
        i++;
    }

    for (size_t j = 1; j < n; j++) {
        for (size_t k = 0; k < j; k++) {
            if (!sockaddr_conflict(&cfg->listeners[k].addr, &cfg->listeners[j].addr))
                continue;
            path_idx(q, sizeof q, "listeners", j);
            path_key(p, sizeof p, q, "address");
            verr(c, p,
                 "\"%s\" conflicts with listeners[%zu] (\"%s\"); each listener needs its "
                 "own address",
                 cfg->listeners[j].address, k, cfg->listeners[k].address);
            break;
        }
    }
}

static void parse_admin(vctx *c, const cJSON *root, bw_config *cfg)
{
    static const char *const fields[] = {"address", "token_env", "max_connections", NULL};
    char why[256];
    const cJSON *admin = get_object(c, root, "", "admin", false);
    if (admin == NULL)
        return;
    check_fields(c, admin, "admin", fields);
    cfg->admin.enabled = true;
    cfg->admin.max_connections = 64;
    get_u32(c, admin, "admin", "max_connections", 1, 100000, &cfg->admin.max_connections);
    const char *addr = get_string(c, admin, "admin", "address", true);
    if (addr != NULL) {
        cfg->admin.address = vstrdup(c, addr);
        if (bw_sockaddr_parse(addr, &cfg->admin.addr, why, sizeof why) < 0) {
            verr(c, "admin.address", "invalid address \"%s\": %s", addr, why);
        } else {
            for (size_t i = 0; i < cfg->n_listeners; i++) {
                if (sockaddr_conflict(&cfg->listeners[i].addr, &cfg->admin.addr)) {
                    verr(c, "admin.address",
                         "\"%s\" conflicts with listeners[%zu] (\"%s\"); the admin listener "
                         "needs its own address",
                         addr, i, cfg->listeners[i].address);
                    break;
                }
            }
        }
    }
    const char *tok = get_string(c, admin, "admin", "token_env", false);
    if (tok == NULL)
        return;
    if (!valid_env_name(tok)) {
        verr(c, "admin.token_env",
             "\"%s\" is not a valid environment variable name (letters, digits and '_', not "
             "starting with a digit)",
             tok);
        return;
    }
    if (env_get(c, tok) == NULL)
        verr(c, "admin.token_env",
             "environment variable %s is not set or empty; set it to the admin bearer token or "
             "remove token_env",
             tok);
    cfg->admin.token_env = vstrdup(c, tok);
}

static void parse_breaker(vctx *c, const cJSON *ub, const char *up, bw_breaker_conf *b)
{
    static const char *const fields[] = {"failure_threshold",
                                         "reset_timeout_ms",
                                         "max_reset_timeout_ms",
                                         "half_open_success_threshold",
                                         "half_open_max_requests",
                                         "failure_rate_percent",
                                         "window_ms",
                                         "min_requests",
                                         "slow_call_ms",
                                         "failure_statuses",
                                         NULL};
    char p[PATH_LEN], sp[PATH_LEN], ip[PATH_LEN], got[96];
    bool max_set = false;

    b->failure_threshold = 5;
    b->reset_timeout_ms = 30000;
    b->max_reset_timeout_ms = 300000;
    b->half_open_success_threshold = 1;
    b->half_open_max_requests = 1;
    b->failure_rate_percent = 0;
    b->window_ms = 10000;
    b->min_requests = 20;
    b->slow_call_ms = 0;
    b->failure_statuses[0] = 502;
    b->failure_statuses[1] = 503;
    b->failure_statuses[2] = 504;
    b->n_failure_statuses = 3;

    path_key(p, sizeof p, up, "circuit_breaker");
    const cJSON *o = get_object(c, ub, up, "circuit_breaker", false);
    if (o != NULL) {
        check_fields(c, o, p, fields);
        b->set_failure_threshold =
            get_u32(c, o, p, "failure_threshold", 0, MAX_COUNT, &b->failure_threshold);
        b->set_reset_timeout_ms =
            get_u32(c, o, p, "reset_timeout_ms", 1, MAX_MS, &b->reset_timeout_ms);
        max_set = get_u32(c, o, p, "max_reset_timeout_ms", 1, MAX_MS, &b->max_reset_timeout_ms);
        b->set_half_open_success_threshold = get_u32(c, o, p, "half_open_success_threshold", 1,
                                                     MAX_COUNT, &b->half_open_success_threshold);
        get_u32(c, o, p, "half_open_max_requests", 1, MAX_COUNT, &b->half_open_max_requests);
        get_u32(c, o, p, "failure_rate_percent", 0, 100, &b->failure_rate_percent);
        get_u32(c, o, p, "window_ms", 1, MAX_MS, &b->window_ms);
        get_u32(c, o, p, "min_requests", 1, MAX_COUNT, &b->min_requests);
        get_u32(c, o, p, "slow_call_ms", 0, MAX_MS, &b->slow_call_ms);

        const cJSON *st = field(o, "failure_statuses");
        path_key(sp, sizeof sp, p, "failure_statuses");
        if (st != NULL && !cJSON_IsArray(st)) {
            verr(c, sp, "must be an array of HTTP status codes, got %s",
                 describe(st, got, sizeof got));
        } else if (st != NULL && cJSON_GetArraySize(st) > BW_CONFIG_MAX_FAILURE_STATUSES) {
            verr(c, sp, "at most %d statuses are allowed, got %d", BW_CONFIG_MAX_FAILURE_STATUSES,
                 cJSON_GetArraySize(st));
        } else if (st != NULL) {
            size_t i = 0;
            const cJSON *el;
            b->n_failure_statuses = 0;
            cJSON_ArrayForEach(el, st)
            {
                path_idx(ip, sizeof ip, sp, i++);
                if (!cJSON_IsNumber(el) || el->valuedouble != floor(el->valuedouble) ||
                    el->valuedouble < 100 || el->valuedouble > 599) {
                    verr(c, ip, "must be an HTTP status between 100 and 599, got %s",
                         describe(el, got, sizeof got));
                    continue;
                }
                b->failure_statuses[b->n_failure_statuses++] = (uint16_t)el->valuedouble;
            }
        }
    }

    /* The environment wins over the file: an operator's "set it and restart" must work
     * whatever the file says, and the log says what was replaced. */
    const env_over *e = &c->env;
    if (e->has_threshold) {
        vnote(c, b->set_failure_threshold,
              "environment CIRCUIT_BREAKER_FAILURE_THRESHOLD=%" PRIu32
              " replaces %s.failure_threshold"
              " (was %" PRIu32 "%s)",
              e->threshold, p, b->failure_threshold,
              b->set_failure_threshold ? "" : ", the default");
        b->failure_threshold = e->threshold;
    }
    if (e->has_reset) {
        vnote(c, b->set_reset_timeout_ms,
              "environment CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS=%g replaces %s.reset_timeout_ms"
              " (was %" PRIu32 "%s)",
              e->reset_ms / 1000.0, p, b->reset_timeout_ms,
              b->set_reset_timeout_ms ? "" : ", the default");
        b->reset_timeout_ms = e->reset_ms;
    }
    if (e->has_half_open) {
        vnote(c, b->set_half_open_success_threshold,
              "environment CIRCUIT_BREAKER_HALF_OPEN_SUCCESS_THRESHOLD=%" PRIu32
              " replaces %s.half_open_success_threshold (was %" PRIu32 "%s)",
              e->half_open, p, b->half_open_success_threshold,
              b->set_half_open_success_threshold ? "" : ", the default");
        b->half_open_success_threshold = e->half_open;
    }

    if (!max_set && b->max_reset_timeout_ms < b->reset_timeout_ms) {
        b->max_reset_timeout_ms = b->reset_timeout_ms;
    } else if (max_set && b->max_reset_timeout_ms < b->reset_timeout_ms) {
        path_key(sp, sizeof sp, p, "max_reset_timeout_ms");
        verr(c, sp, "must be at least reset_timeout_ms (%" PRIu32 "%s), got %" PRIu32,
             b->reset_timeout_ms,
             e->has_reset              ? " from CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS"
             : b->set_reset_timeout_ms ? ""
                                       : " (the default)",
             b->max_reset_timeout_ms);
    }
}

static void parse_outlier(vctx *c, const cJSON *ub, const char *up, bw_outlier_conf *o)
{
    static const char *const fields[] = {"consecutive_failures", "base_ejection_ms",
                                         "max_ejection_ms", "max_ejection_percent", NULL};
    char p[PATH_LEN], sp[PATH_LEN];
    o->consecutive_failures = 5;
    o->base_ejection_ms = 30000;
    o->max_ejection_ms = 300000;
    o->max_ejection_percent = 50;
    path_key(p, sizeof p, up, "outlier_detection");
    const cJSON *obj = get_object(c, ub, up, "outlier_detection", false);
    if (obj == NULL)
        return;
    check_fields(c, obj, p, fields);
    get_u32(c, obj, p, "consecutive_failures", 0, 1000000, &o->consecutive_failures);
    get_u32(c, obj, p, "base_ejection_ms", 1, MAX_MS, &o->base_ejection_ms);
    bool max_set = get_u32(c, obj, p, "max_ejection_ms", 1, MAX_MS, &o->max_ejection_ms);
    get_u32(c, obj, p, "max_ejection_percent", 0, 100, &o->max_ejection_percent);
    if (o->max_ejection_ms < o->base_ejection_ms) {
        if (max_set) {
            path_key(sp, sizeof sp, p, "max_ejection_ms");
            verr(c, sp, "must be at least base_ejection_ms (%" PRIu32 "), got %" PRIu32,
                 o->base_ejection_ms, o->max_ejection_ms);
        } else {
            o->max_ejection_ms = o->base_ejection_ms;
        }
    }
}

static void parse_health_check(vctx *c, const cJSON *ub, const char *up, bw_health_check_conf *h)
{
    static const char *const fields[] = {"path",
                                         "host",
                                         "interval_ms",
                                         "timeout_ms",
                                         "healthy_threshold",
                                         "unhealthy_threshold",
                                         "expect_status",
                                         NULL};
    char p[PATH_LEN], sp[PATH_LEN], got[96];
    memset(h, 0, sizeof(*h));
    h->interval_ms = 5000;
    h->timeout_ms = 1000;
    h->healthy_threshold = 2;
    h->unhealthy_threshold = 3;
    h->expect_min = 200;
    h->expect_max = 399;
    path_key(p, sizeof p, up, "health_check");
    const cJSON *obj = get_object(c, ub, up, "health_check", false);
    if (obj == NULL)
        return;
    h->enabled = true;
    check_fields(c, obj, p, fields);
    const char *path = get_string(c, obj, p, "path", false);
    path_key(sp, sizeof sp, p, "path");
    if (path != NULL && (path[0] != '/' || !valid_check_text(path)))
        verr(c, sp, "must start with \"/\" and hold only visible ASCII characters, got \"%s\"",
             path);
    h->path = vstrdup(c, path != NULL ? path : "/healthz");
    const char *host = get_string(c, obj, p, "host", false);
    path_key(sp, sizeof sp, p, "host");
    if (host != NULL && (host[0] == '\0' || !valid_check_text(host)))
        verr(c, sp, "must be a non-empty host name of visible ASCII characters, got \"%s\"", host);
    if (host != NULL)
        h->host = vstrdup(c, host);
    get_u32(c, obj, p, "interval_ms", 10, MAX_MS, &h->interval_ms);
    get_u32(c, obj, p, "timeout_ms", 1, MAX_MS, &h->timeout_ms);
    get_u32(c, obj, p, "healthy_threshold", 1, 1000, &h->healthy_threshold);
    get_u32(c, obj, p, "unhealthy_threshold", 1, 1000, &h->unhealthy_threshold);
    const cJSON *es = field(obj, "expect_status");
    path_key(sp, sizeof sp, p, "expect_status");
    if (es != NULL) {
        const cJSON *lo = cJSON_IsArray(es) && cJSON_GetArraySize(es) == 2 ? es->child : NULL;
        const cJSON *hi = lo ? lo->next : NULL;
        bool ok = lo && hi && cJSON_IsNumber(lo) && cJSON_IsNumber(hi) &&
                  lo->valuedouble == floor(lo->valuedouble) &&
                  hi->valuedouble == floor(hi->valuedouble) && lo->valuedouble >= 100 &&
                  hi->valuedouble <= 599 && lo->valuedouble <= hi->valuedouble;
        if (!ok) {
            verr(c, sp,
                 "must be an inclusive range [LOW, HIGH] of HTTP statuses (100..599), got %s",
                 describe(es, got, sizeof got));
        } else {
            h->expect_min = (uint16_t)lo->valuedouble;
            h->expect_max = (uint16_t)hi->valuedouble;
        }
    }
}

static void parse_upstream_tls(vctx *c, const cJSON *ub, const char *up, bw_upstream_tls_conf *t)
{
    static const char *const fields[] = {"verify", "ca", "server_name", "cert", "key", NULL};
    char p[PATH_LEN], ap[PATH_LEN];
    memset(t, 0, sizeof(*t));
    t->verify = true;
    path_key(p, sizeof p, up, "tls");
    const cJSON *o = get_object(c, ub, up, "tls", false);
    if (o == NULL)
        return;
    t->enabled = true;
    check_fields(c, o, p, fields);
    get_bool(c, o, p, "verify", &t->verify);
    const char *names[3] = {"ca", "cert", "key"};
    char **dst[3] = {&t->ca, &t->cert, &t->key};
    for (int i = 0; i < 3; i++) {
        const char *v = get_string(c, o, p, names[i], false);
        if (v == NULL)
            continue;
        *dst[i] = resolve_path(c, v);
        path_key(ap, sizeof ap, p, names[i]);
        if (*dst[i] != NULL)
            check_tls_file(c, ap, *dst[i]);
    }
    if ((t->cert == NULL) != (t->key == NULL)) {
        path_key(ap, sizeof ap, p, t->cert ? "key" : "cert");
        verr(c, t->cert ? p : p, "mutual TLS needs both \"cert\" and \"key\"");
    }
    const char *sn = get_string(c, o, p, "server_name", false);
    if (sn != NULL) {
        char host[256], why[128];
        uint16_t port;
        char probe[300];
        snprintf(probe, sizeof probe, "%s:1", sn);
        path_key(ap, sizeof ap, p, "server_name");
        if (bw_server_name_parse(probe, host, sizeof host, &port, why, sizeof why) < 0)
            verr(c, ap, "must be a host name, got \"%s\": %s", sn, why);
        else
            t->server_name = vstrdup(c, sn);
    }
}

static void parse_upstream(vctx *c, const cJSON *u, const char *up, bw_upstream_conf *uc)
{
    static const char *const fields[] = {"servers",
                                         "critical",
                                         "balance",
                                         "connect_timeout_ms",
                                         "response_timeout_ms",
                                         "keepalive_max_idle",
                                         "keepalive_timeout_ms",
                                         "retries",
                                         "circuit_breaker",
                                         "outlier_detection",
                                         "health_check",
                                         "resolve_interval_ms",
                                         "tls",
                                         NULL};
    char sp[PATH_LEN], ip[PATH_LEN], got[96], why[256];

    uc->balance = BW_BALANCE_ROUND_ROBIN;
    uc->connect_timeout_ms = 1000;
    uc->response_timeout_ms = 30000;
    uc->keepalive_max_idle = 32;
    uc->keepalive_timeout_ms = 60000;
    uc->retries = 1;

    check_fields(c, u, up, fields);
    get_bool(c, u, up, "critical", &uc->critical);
    get_u32(c, u, up, "connect_timeout_ms", 1, MAX_MS, &uc->connect_timeout_ms);
    get_u32(c, u, up, "response_timeout_ms", 1, MAX_MS, &uc->response_timeout_ms);
    get_u32(c, u, up, "keepalive_max_idle", 0, 100000, &uc->keepalive_max_idle);
    get_u32(c, u, up, "keepalive_timeout_ms", 1, MAX_MS, &uc->keepalive_timeout_ms);
    get_u32(c, u, up, "retries", 0, 10, &uc->retries);
    uc->resolve_interval_ms = 5000;
    get_u32(c, u, up, "resolve_interval_ms", 100, MAX_MS, &uc->resolve_interval_ms);

    const char *bal = get_string(c, u, up, "balance", false);
    if (bal != NULL) {
        if (strcmp(bal, "round_robin") == 0) {
            uc->balance = BW_BALANCE_ROUND_ROBIN;
        } else if (strcmp(bal, "least_conn") == 0) {
            uc->balance = BW_BALANCE_LEAST_CONN;
        } else {
            path_key(sp, sizeof sp, up, "balance");
            verr(c, sp, "must be \"round_robin\" or \"least_conn\", got \"%s\"", bal);
        }
    }

    parse_breaker(c, u, up, &uc->breaker);
    parse_outlier(c, u, up, &uc->outlier);
    parse_health_check(c, u, up, &uc->health_check);
    parse_upstream_tls(c, u, up, &uc->tls);

    const cJSON *servers = field(u, "servers");
    path_key(sp, sizeof sp, up, "servers");
    size_t n;
    if (required_collection(c, u, up, "servers", sp, false, "list at least one \"host:port\"",
                            "an array of \"host:port\" strings", "must contain at least one server",
                            &n) == NULL)
        return;
    if (n > BW_CONFIG_MAX_SERVERS) {
        verr(c, sp, "at most %d servers are allowed, got %zu", BW_CONFIG_MAX_SERVERS, n);
        return;
    }
    uc->servers = vcalloc(c, n, sizeof *uc->servers);
    if (uc->servers == NULL)
        return;
    uc->n_servers = n;
    size_t i = 0;
    const cJSON *el;
    cJSON_ArrayForEach(el, servers)
    {
        bw_server_conf *s = &uc->servers[i];
        path_idx(ip, sizeof ip, sp, i);
        s->weight = 1;
        char name[256], why2[128];
        uint16_t port = 0;
        if (!cJSON_IsString(el)) {
            verr(c, ip, "must be a \"host:port\" string, got %s", describe(el, got, sizeof got));
        } else if (bw_sockaddr_parse(el->valuestring, &s->addr, why, sizeof why) < 0 &&
                   bw_server_name_parse(el->valuestring, name, sizeof name, &port, why2,
                                        sizeof why2) == 0) {
            /* A DNS name: resolved at run time by the master (src/resolver.c). */
            s->addr.len = 0;
            s->host = vstrdup(c, name);
            s->port = port;
            s->address = vstrdup(c, el->valuestring);
            uc->dynamic = true;
            for (size_t k = 0; k < i; k++) {
                if (uc->servers[k].address && strcmp(uc->servers[k].address, s->address) == 0) {
                    verr(c, ip, "\"%s\" is listed twice (also %s[%zu])", el->valuestring, sp, k);
                    break;
                }
            }
        } else if (s->addr.len == 0) {
            verr(c, ip, "invalid server address \"%s\": %s", el->valuestring, why);
        } else if (sockaddr_is_any(&s->addr)) {
            verr(c, ip, "\"%s\" is a wildcard address; a server needs a concrete IP address",
                 el->valuestring);
            s->addr.len = 0;
        } else {
            s->address = vstrdup(c, el->valuestring);
            for (size_t k = 0; k < i; k++) {
                if (uc->servers[k].addr.len && sockaddr_equal(&uc->servers[k].addr, &s->addr)) {
                    verr(c, ip, "\"%s\" is listed twice (also %s[%zu])", el->valuestring, sp, k);
                    break;
                }
            }
        }
        i++;
    }
}

static void parse_upstreams(vctx *c, const cJSON *root, bw_config *cfg)
{
    char up[PATH_LEN], got[96];
    size_t n;
    const cJSON *obj = required_collection(
        c, root, "", "upstreams", "upstreams", true,
        "define at least one upstream, e.g. {\"api\": {\"servers\": [\"127.0.0.1:9001\"]}}",
        "an object mapping upstream names to upstreams", "must define at least one upstream", &n);
    if (obj == NULL)
        return;
    cfg->upstreams = vcalloc(c, n, sizeof *cfg->upstreams);
    if (cfg->upstreams == NULL)
        return;
    cfg->n_upstreams = n;

    size_t i = 0;
    const cJSON *u;
    cJSON_ArrayForEach(u, obj)
    {
        const char *name = u->string ? u->string : "";
        bw_upstream_conf *uc = &cfg->upstreams[i];
        path_key(up, sizeof up, "upstreams", name);
        uc->name = vstrdup(c, name);
        int seen = 0;
        for (size_t k = 0; k < i; k++)
            if (cfg->upstreams[k].name && strcmp(cfg->upstreams[k].name, name) == 0)
                seen++;
        i++;
        if (seen > 0) {
            verr_at(c, up, seen, up, "upstream \"%s\" is defined more than once", name);
            continue;
        }
        if (!valid_name(name))
            verr(c, up,
                 "invalid upstream name \"%s\": use 1 to %d letters, digits, '_', '-' or '.'", name,
                 MAX_NAME_LEN);
        if (!cJSON_IsObject(u)) {
            verr(c, up, "must be an object like {\"servers\": [\"127.0.0.1:9001\"]}, got %s",
                 describe(u, got, sizeof got));
            continue;
        }
        parse_upstream(c, u, up, uc);
    }
}

static void parse_cidr_list(vctx *c, const cJSON *arr, const char *path, bw_cidr **list,
                            size_t *count);

static void parse_rate_limit(vctx *c, const cJSON *o, const char *pp, bw_ratelimit_conf *rl)
{
    static const char *const fields[] = {
        "key", "capacity", "refill_per_sec", "dry_run", "ipv6_prefix", "exempt", NULL};
    char kp[PATH_LEN];

    rl->key_kind = BW_RL_KEY_CLIENT_IP;
    rl->capacity = 100;
    rl->refill_per_sec = 10;
    rl->ipv6_prefix = 64;

    check_fields(c, o, pp, fields);
    rl->set_capacity = get_u32(c, o, pp, "capacity", 1, MAX_COUNT, &rl->capacity);
    rl->set_refill = get_number(c, o, pp, "refill_per_sec", 0, MAX_COUNT, &rl->refill_per_sec);
    get_bool(c, o, pp, "dry_run", &rl->dry_run);
    get_u32(c, o, pp, "ipv6_prefix", 1, 128, &rl->ipv6_prefix);
    path_key(kp, sizeof kp, pp, "exempt");
    parse_cidr_list(c, field(o, "exempt"), kp, &rl->exempt, &rl->n_exempt);

    const char *key = get_string(c, o, pp, "key", false);
    if (key == NULL)
        return;
    path_key(kp, sizeof kp, pp, "key");
    if (strcmp(key, "client_ip") == 0) {
        rl->key_kind = BW_RL_KEY_CLIENT_IP;
    } else if (strncmp(key, "header:", 7) == 0) {
        if (!valid_token(key + 7)) {
            verr(c, kp, "\"%s\": the header name after \"header:\" must be a valid HTTP field name",
                 key);
            return;
        }
        rl->key_kind = BW_RL_KEY_HEADER;
        rl->key_header = vstrdup(c, key + 7);
    } else {
        verr(c, kp, "must be \"client_ip\" or \"header:NAME\", got \"%s\"", key);
    }
}

/* Applies RATE_LIMIT_* to the default policy (or says that nothing takes them). */
static void rate_limit_env(vctx *c, bw_config *cfg)
{
    const env_over *e = &c->env;
    if (!e->has_capacity && !e->has_refill)
        return;
    if (cfg->default_rate_limit < 0) {
        vnote(c, true,
              "environment RATE_LIMIT_CAPACITY/RATE_LIMIT_REFILL_RATE %s: no default rate-limit "
              "policy (set top-level default_rate_limit, or name a policy \"default\")",
              cfg->n_rate_limits ? "apply to no policy" : "ignored: there are no rate_limits");
        return;
    }
    bw_ratelimit_conf *d = &cfg->rate_limits[cfg->default_rate_limit];
    if (e->has_capacity) {
        vnote(c, d->set_capacity,
              "environment RATE_LIMIT_CAPACITY=%" PRIu32
              " replaces rate_limits.%s.capacity (was %" PRIu32 "%s)",
              e->capacity, d->name, d->capacity, d->set_capacity ? "" : ", the default");
        d->capacity = e->capacity;
    }
    if (e->has_refill) {
        vnote(c, d->set_refill,
              "environment RATE_LIMIT_REFILL_RATE=%g replaces rate_limits.%s.refill_per_sec (was "
              "%g%s)",
              e->refill, d->name, d->refill_per_sec, d->set_refill ? "" : ", the default");
        d->refill_per_sec = e->refill;
    }
}

/* The policy RATE_LIMIT_* apply to: top-level default_rate_limit, else the only policy, else
 * the one named "default"; -1 when none. */
static void pick_default_rate_limit(vctx *c, const cJSON *root, bw_config *cfg)
{
    const char *name = get_string(c, root, "", "default_rate_limit", false);
    cfg->default_rate_limit = -1;
    if (name != NULL) {
        for (size_t k = 0; k < cfg->n_rate_limits; k++)
            if (cfg->rate_limits[k].name && strcmp(cfg->rate_limits[k].name, name) == 0)
                cfg->default_rate_limit = (int)k;
        if (cfg->default_rate_limit < 0)
            verr(c, "default_rate_limit", "names no policy of rate_limits: \"%s\"", name);
        return;
    }
    if (cfg->n_rate_limits == 1) {
        cfg->default_rate_limit = 0;
        return;
    }
    for (size_t k = 0; k < cfg->n_rate_limits; k++)
        if (cfg->rate_limits[k].name && strcmp(cfg->rate_limits[k].name, "default") == 0)
            cfg->default_rate_limit = (int)k;
}

static void parse_rate_limits(vctx *c, const cJSON *root, bw_config *cfg)
{
    char pp[PATH_LEN], got[96];
    const cJSON *obj = get_object(c, root, "", "rate_limits", false);
    if (obj == NULL)
        return;
    size_t n = (size_t)cJSON_GetArraySize(obj);
    if (n == 0)
        return;
    cfg->rate_limits = vcalloc(c, n, sizeof *cfg->rate_limits);
    if (cfg->rate_limits == NULL)
        return;
    cfg->n_rate_limits = n;

    size_t i = 0;
    const cJSON *o;
    cJSON_ArrayForEach(o, obj)
    {
        const char *name = o->string ? o->string : "";
        bw_ratelimit_conf *rl = &cfg->rate_limits[i];
        path_key(pp, sizeof pp, "rate_limits", name);
        rl->name = vstrdup(c, name);
        int seen = 0;
        for (size_t k = 0; k < i; k++)
            if (cfg->rate_limits[k].name && strcmp(cfg->rate_limits[k].name, name) == 0)
                seen++;
        i++;
        if (seen > 0) {
            verr_at(c, pp, seen, pp, "policy \"%s\" is defined more than once", name);
            continue;
        }
        if (!valid_name(name))
            verr(c, pp, "invalid policy name \"%s\": use 1 to %d letters, digits, '_', '-' or '.'",
                 name, MAX_NAME_LEN);
        if (!cJSON_IsObject(o)) {
            verr(c, pp,
                 "must be an object like {\"key\": \"client_ip\", \"capacity\": 100}, got %s",
                 describe(o, got, sizeof got));
            continue;
        }
        parse_rate_limit(c, o, pp, rl);
    }
}

static bool valid_route_host(const char *h)
{
    if (h[0] == '[') {
        size_t n = strlen(h);
        return n > 2 && h[n - 1] == ']';
    }
    for (; *h; h++)
        if (!isalnum((unsigned char)*h) && strchr("-._", *h) == NULL)
            return false;
    return true;
}

static bool valid_path_prefix(const char *p)
{
    if (p[0] != '/')
        return false;
    for (; *p; p++)
        if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f || *p == '?' || *p == '#')
            return false;
    return true;
}

/* True when every request that route b could match is already taken by an earlier route a. */
static bool route_shadows(const bw_route_conf *a, const bw_route_conf *b)
{
    if (a->path_prefix == NULL || b->path_prefix == NULL)
        return false;
    if (a->host != NULL && (b->host == NULL || strcasecmp(a->host, b->host) != 0))
        return false;
    size_t n = a->path_prefix_len;
    if (strncmp(a->path_prefix, b->path_prefix, n) != 0)
        return false;
    return b->path_prefix[n] == '\0' || a->path_prefix[n - 1] == '/' || b->path_prefix[n] == '/';
}

static void parse_route(vctx *c, const cJSON *o, const char *rp, bw_config *cfg, bw_route_conf *r)
{
    static const char *const fields[] = {
        "host",           "path_prefix",       "name", "upstream", "rate_limit",
        "case_sensitive", "request_buffering", NULL};
    char fp[PATH_LEN], known[512];
    const char *names[64];

    r->upstream = -1;
    r->rate_limit = -1;
    check_fields(c, o, rp, fields);

    const char *host = get_string(c, o, rp, "host", false);
    if (host != NULL) {
        path_key(fp, sizeof fp, rp, "host");
        if (!valid_route_host(host)) {
            verr(c, fp,
                 "\"%s\" is not a host name (no port, scheme or path; e.g. \"api.example.com\")",
                 host);
        } else {
            r->host = vstrdup(c, host);
            for (char *h = r->host; h && *h; h++)
                *h = (char)tolower((unsigned char)*h);
        }
    }

    const char *prefix = get_string(c, o, rp, "path_prefix", false);
    path_key(fp, sizeof fp, rp, "path_prefix");
    if (prefix != NULL && !valid_path_prefix(prefix))
        verr(c, fp,
             "must start with '/' and contain no spaces, control characters, '?' or '#', "
             "got \"%s\"",
             prefix);
    else
        r->path_prefix = vstrdup(c, prefix ? prefix : "/");
    if (r->path_prefix)
        r->path_prefix_len = strlen(r->path_prefix);
    r->case_sensitive = true;
    get_bool(c, o, rp, "case_sensitive", &r->case_sensitive);
    r->request_buffering = true;
    get_bool(c, o, rp, "request_buffering", &r->request_buffering);

    const char *name = get_string(c, o, rp, "name", false);
    if (name != NULL) {
        r->name = vstrdup(c, name);
    } else if (asprintf(&r->name, "%s%s", r->host ? r->host : "",
                        r->path_prefix ? r->path_prefix : "/") < 0) {
        r->name = NULL;
        c->oom = true;
    }

    const char *up = get_string(c, o, rp, "upstream", true);
    if (up != NULL) {
        r->upstream = bw_config_find_upstream(cfg, up);
        if (r->upstream < 0) {
            size_t k;
            for (k = 0; k < cfg->n_upstreams && k < 64; k++)
                names[k] = cfg->upstreams[k].name;
            known_names(known, sizeof known, names, k);
            path_key(fp, sizeof fp, rp, "upstream");
            verr(c, fp, "unknown upstream \"%s\" (known: %s)", up, known);
        }
    }

    const char *rl = get_string(c, o, rp, "rate_limit", false);
    if (rl != NULL) {
        for (size_t k = 0; k < cfg->n_rate_limits && r->rate_limit < 0; k++)
            if (cfg->rate_limits[k].name && strcmp(cfg->rate_limits[k].name, rl) == 0)
                r->rate_limit = (int)k;
        if (r->rate_limit < 0) {
            size_t k;
            for (k = 0; k < cfg->n_rate_limits && k < 64; k++)
                names[k] = cfg->rate_limits[k].name;
            known_names(known, sizeof known, names, k);
            path_key(fp, sizeof fp, rp, "rate_limit");
            verr(c, fp, "unknown rate-limit policy \"%s\" (known: %s)", rl, known);
        }
    }
}

static void parse_routes(vctx *c, const cJSON *root, bw_config *cfg)
{
    char rp[PATH_LEN], got[96];
    size_t n;
    const cJSON *arr = required_collection(
        c, root, "", "routes", "routes", false,
        "add at least one route, e.g. [{\"path_prefix\": \"/\", \"upstream\": \"api\"}]",
        "an array of route objects", "must contain at least one route", &n);
    if (arr == NULL)
        return;
    cfg->routes = vcalloc(c, n, sizeof *cfg->routes);
    if (cfg->routes == NULL)
        return;
    cfg->n_routes = n;

    size_t i = 0;
    const cJSON *o;
    cJSON_ArrayForEach(o, arr)
    {
        path_idx(rp, sizeof rp, "routes", i);
        cfg->routes[i].upstream = -1;
        cfg->routes[i].rate_limit = -1;
        if (!cJSON_IsObject(o))
            verr(c, rp,
                 "must be an object like {\"path_prefix\": \"/\", \"upstream\": \"api\"}, "
                 "got %s",
                 describe(o, got, sizeof got));
        else
            parse_route(c, o, rp, cfg, &cfg->routes[i]);
        i++;
    }

    for (size_t j = 1; j < n; j++) {
        for (size_t k = 0; k < j; k++) {
            const bw_route_conf *a = &cfg->routes[k];
            if (!route_shadows(a, &cfg->routes[j]))
                continue;
            path_idx(rp, sizeof rp, "routes", j);
            verr(c, rp,
                 "never matches: routes[%zu] (host %s, path_prefix \"%s\") comes first and takes "
                 "every request this route would; routes match in order, so put the more "
                 "specific route first",
                 k, a->host ? a->host : "any", a->path_prefix);
            break;
        }
    }
}

/* "resolvers": ["IP:PORT", ...], the nameservers used instead of /etc/resolv.conf's. */
static void parse_resolvers(vctx *c, const cJSON *root, bw_config *cfg)
{
    const cJSON *arr = field(root, "resolvers");
    char ip[PATH_LEN], got[96], why[160];
    if (arr == NULL)
        return;
    if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) == 0 || cJSON_GetArraySize(arr) > 16) {
        verr(c, "resolvers", "must be an array of 1 to 16 \"IP:PORT\" strings, got %s",
             describe(arr, got, sizeof got));
        return;
    }
    size_t n = (size_t)cJSON_GetArraySize(arr), i = 0;
    cfg->resolvers = vcalloc(c, n, sizeof *cfg->resolvers);
    if (cfg->resolvers == NULL)
        return;
    const cJSON *el;
    cJSON_ArrayForEach(el, arr)
    {
        path_idx(ip, sizeof ip, "resolvers", i++);
        if (!cJSON_IsString(el)) {
            verr(c, ip, "must be an \"IP:PORT\" string, got %s", describe(el, got, sizeof got));
            continue;
        }
        bw_sockaddr a;
        if (bw_sockaddr_parse(el->valuestring, &a, why, sizeof why) < 0) {
            verr(c, ip, "invalid nameserver address \"%s\": %s", el->valuestring, why);
            continue;
        }
        cfg->resolvers[cfg->n_resolvers++] = a;
    }
}

/* A JSON array of CIDR strings at path (trusted_proxies, a policy's exempt list). */
static void parse_cidr_list(vctx *c, const cJSON *arr, const char *path, bw_cidr **list,
                            size_t *count)
{
    char p[PATH_LEN], got[96], fixed[INET6_ADDRSTRLEN];
    if (arr == NULL)
        return;
    if (!cJSON_IsArray(arr)) {
        verr(c, path,
             "must be an array of CIDR strings (e.g. [\"10.0.0.0/8\"]), "
             "got %s",
             describe(arr, got, sizeof got));
        return;
    }
    size_t n = (size_t)cJSON_GetArraySize(arr);
    if (n == 0)
        return;
    *list = vcalloc(c, n, sizeof **list);
    if (*list == NULL)
        return;
    size_t i = 0;
    const cJSON *el;
    cJSON_ArrayForEach(el, arr)
    {
        bool host_bits;
        bw_cidr *r = &(*list)[*count];
        path_idx(p, sizeof p, path, i++);
        if (!cJSON_IsString(el)) {
            verr(c, p, "must be a CIDR string like \"10.0.0.0/8\", got %s",
                 describe(el, got, sizeof got));
        } else if (cidr_parse(el->valuestring, r, &host_bits) < 0) {
            verr(c, p,
                 "invalid CIDR \"%s\" (expected an IPv4 or IPv6 address with an optional /prefix, "
                 "e.g. \"10.0.0.0/8\" or \"fd00::/8\")",
                 el->valuestring);
        } else if (host_bits) {
            inet_ntop(r->family, r->addr, fixed, sizeof fixed);
            verr(c, p, "\"%s\" has bits set beyond the /%u prefix; did you mean \"%s/%u\"?",
                 el->valuestring, (unsigned)r->prefix, fixed, (unsigned)r->prefix);
        } else {
            (*count)++;
        }
    }
}

static void parse_trusted_proxies(vctx *c, const cJSON *root, bw_config *cfg)
{
    parse_cidr_list(c, field(root, "trusted_proxies"), "trusted_proxies", &cfg->trusted_proxies,
                    &cfg->n_trusted_proxies);
}

/* redis.sentinels, redis.master_name and redis.password_env. True when sentinels are
 * configured (and valid enough to connect through). */
static bool parse_redis_sentinels(vctx *c, const cJSON *o, bw_redis_conf *r)
{
    char p[PATH_LEN], got[96], why[256];
    const cJSON *arr = field(o, "sentinels");
    const char *name = get_string(c, o, "redis", "master_name", false);
    const char *penv = get_string(c, o, "redis", "password_env", false);
    if (penv != NULL) {
        const char *pw = valid_env_name(penv) ? env_get(c, penv) : NULL;
        if (!valid_env_name(penv))
            verr(c, "redis.password_env", "\"%s\" is not an environment variable name", penv);
        else if (pw == NULL)
            verr(c, "redis.password_env", "the environment variable %s is not set or empty", penv);
        else if (strlen(pw) >= 256)
            verr(c, "redis.password_env", "the password in %s is longer than 255 bytes", penv);
        else
            r->password = vstrdup(c, pw);
    }
    if (arr == NULL) {
        if (name != NULL)
            verr(c, "redis.master_name", "only meaningful with redis.sentinels");
        return false;
    }
    if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) == 0) {
        verr(c, "redis.sentinels", "must be a non-empty array of \"HOST:PORT\" strings, got %s",
             describe(arr, got, sizeof got));
        return false;
    }
    if (name == NULL) {
        verr_at(c, "redis", 0, "redis.master_name", "required with redis.sentinels");
        return false;
    }
    size_t n = (size_t)cJSON_GetArraySize(arr), i = 0;
    r->sentinels = vcalloc(c, n, sizeof *r->sentinels);
    if (r->sentinels == NULL)
        return false;
    const cJSON *el;
    bool ok = true;
    cJSON_ArrayForEach(el, arr)
    {
        path_idx(p, sizeof p, "redis.sentinels", i++);
        char url[128];
        if (!cJSON_IsString(el) || strlen(el->valuestring) > 100) {
            verr(c, p, "must be a \"HOST:PORT\" string, got %s", describe(el, got, sizeof got));
            ok = false;
            continue;
        }
        snprintf(url, sizeof url, "redis://%s", el->valuestring);
        if (strchr(el->valuestring, '/') != NULL || strchr(el->valuestring, '@') != NULL ||
            redis_url_check(url, why, sizeof why) < 0) {
            verr(c, p, "\"%s\" is not HOST:PORT (an IP address or localhost, and a port)",
                 el->valuestring);
            ok = false;
            continue;
        }
        r->sentinels[r->n_sentinels++] = vstrdup(c, el->valuestring);
    }
    r->master_name = vstrdup(c, name);
    return ok;
}

static void parse_redis(vctx *c, const cJSON *root, bw_config *cfg)
{
    static const char *const fields[] = {"url",
                                         "key_prefix",
                                         "sync_interval_ms",
                                         "required",
                                         "connect_timeout_ms",
                                         "command_timeout_ms",
                                         "share_when_down",
                                         "sentinels",
                                         "master_name",
                                         "password_env",
                                         NULL};
    bw_redis_conf *r = &cfg->redis;
    char why[256];
    const cJSON *o = get_object(c, root, "", "redis", false);
    const char *url = NULL, *prefix = NULL;
    bool sentinel = false;

    if (o == NULL && field(root, "redis") != NULL)
        return;
    if (o != NULL) {
        check_fields(c, o, "redis", fields);
        sentinel = parse_redis_sentinels(c, o, r);
        url = get_string(c, o, "redis", "url", c->env.redis_url == NULL && !sentinel);
        if (url != NULL && sentinel) {
            verr(c, "redis.url", "give either url or sentinels (with master_name), not both");
            url = NULL;
        }
        if (url != NULL && redis_url_check(url, why, sizeof why) < 0) {
            verr(c, "redis.url", "invalid URL: %s", why);
            url = NULL;
        }
        prefix = get_string(c, o, "redis", "key_prefix", false);
        if (prefix != NULL && strpbrk(prefix, " \t\r\n{}") != NULL) {
            verr(c, "redis.key_prefix", "must not contain spaces or braces, got \"%s\"", prefix);
            prefix = NULL;
        }
        get_u32(c, o, "redis", "sync_interval_ms", 1, 60000, &r->sync_interval_ms);
        get_bool(c, o, "redis", "required", &r->required);
        get_bool(c, o, "redis", "share_when_down", &r->share_when_down);
        get_u32(c, o, "redis", "connect_timeout_ms", 1, MAX_MS, &r->connect_timeout_ms);
        get_u32(c, o, "redis", "command_timeout_ms", 1, MAX_MS, &r->command_timeout_ms);
    }
    if (c->env.redis_url != NULL)
        url = c->env.redis_url;
    if (url == NULL && !sentinel)
        return;
    r->enabled = true;
    r->url = url != NULL ? vstrdup(c, url) : NULL;
    r->key_prefix = vstrdup(c, prefix ? prefix : "breakwater");
}

static void parse_log(vctx *c, const cJSON *root, bw_config *cfg)
{
    static const char *const fields[] = {"error_log",    "access_log", "level",
                                         "error_format", "query",      NULL};
    const cJSON *o = get_object(c, root, "", "log", false);
    const char *el = NULL, *al = NULL, *level = NULL, *ef = NULL, *q = NULL;

    if (o != NULL) {
        check_fields(c, o, "log", fields);
        el = get_string(c, o, "log", "error_log", false);
        al = get_string(c, o, "log", "access_log", false);
        level = get_string(c, o, "log", "level", false);
        ef = get_string(c, o, "log", "error_format", false);
        q = get_string(c, o, "log", "query", false);
        if (level != NULL && log_level_from(level, &cfg->log.level) < 0)
            verr(c, "log.level", "must be one of debug, info, warn, error, got \"%s\"", level);
        if (ef != NULL && strcmp(ef, "json") == 0)
            cfg->log.error_json = true;
        else if (ef != NULL && strcmp(ef, "text") != 0)
            verr(c, "log.error_format", "must be \"text\" or \"json\", got \"%s\"", ef);
        if (q != NULL && strcmp(q, "keep") == 0)
            cfg->log.query = BW_LOG_QUERY_KEEP;
        else if (q != NULL && strcmp(q, "drop") == 0)
            cfg->log.query = BW_LOG_QUERY_DROP;
        else if (q != NULL && strcmp(q, "redact") != 0)
            verr(c, "log.query", "must be \"redact\", \"keep\" or \"drop\", got \"%s\"", q);
    }
    if (el != NULL)
        cfg->log.error_log = strcmp(el, "stderr") == 0 ? vstrdup(c, el) : resolve_path(c, el);
    if (al == NULL)
        al = "stdout";
    if (strcmp(al, "stdout") == 0 || strcmp(al, "off") == 0)
        cfg->log.access_log = vstrdup(c, al);
    else
        cfg->log.access_log = resolve_path(c, al);
    if (c->env.has_level)
        cfg->log.level = c->env.level;
}

static void parse_limits(vctx *c, const cJSON *root, bw_config *cfg)
{
    static const char *const fields[] = {
        "max_header_bytes",       "max_headers",     "max_body_bytes",       "header_timeout_ms",
        "client_idle_timeout_ms", "max_connections", "request_buffer_bytes", NULL};
    bw_limits_conf *l = &cfg->limits;
    const cJSON *o = get_object(c, root, "", "limits", false);
    if (o == NULL)
        return;
    check_fields(c, o, "limits", fields);
    get_u32(c, o, "limits", "max_header_bytes", 1024, 1048576, &l->max_header_bytes);
    get_u32(c, o, "limits", "max_headers", 8, 256, &l->max_headers);
    get_uint(c, o, "limits", "max_body_bytes", 0, (uint64_t)1 << 53, &l->max_body_bytes);
    get_u32(c, o, "limits", "header_timeout_ms", 1, MAX_MS, &l->header_timeout_ms);
    get_u32(c, o, "limits", "client_idle_timeout_ms", 1, MAX_MS, &l->client_idle_timeout_ms);
    get_u32(c, o, "limits", "max_connections", 1, 1000000, &l->max_connections);
    get_u32(c, o, "limits", "request_buffer_bytes", 0, 16u << 20, &l->request_buffer_bytes);
}

static void parse_root(vctx *c, const cJSON *root, bw_config *cfg)
{
    static const char *const fields[] = {"workers",
                                         "listeners",
                                         "admin",
                                         "upstreams",
                                         "routes",
                                         "rate_limits",
                                         "rate_limit_table_size",
                                         "trusted_proxies",
                                         "redis",
                                         "log",
                                         "limits",
                                         "shutdown_timeout_ms",
                                         "probes_on_listeners",
                                         "default_rate_limit",
                                         "drain_idle_grace_ms",
                                         "resolvers",
                                         "resolver_timeout_ms",
                                         "resolver_attempts",
                                         NULL};
    char got[96];

    if (!cJSON_IsObject(root)) {
        verr(c, "", "the configuration must be a JSON object {...}, got %s",
             describe(root, got, sizeof got));
        return;
    }
    check_fields(c, root, "", fields);

    uint32_t workers = 1;
    if (get_u32(c, root, "", "workers", 0, 1024, &workers) && workers == 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        workers = cpus < 1 ? 1 : cpus > 1024 ? 1024 : (uint32_t)cpus;
    }
    cfg->workers = workers;
    get_u32(c, root, "", "rate_limit_table_size", 16, 1u << 26, &cfg->rate_limit_table_size);
    get_u32(c, root, "", "shutdown_timeout_ms", 0, MAX_MS, &cfg->shutdown_timeout_ms);
    get_u32(c, root, "", "drain_idle_grace_ms", 0, MAX_MS, &cfg->drain_idle_grace_ms);
    get_bool(c, root, "", "probes_on_listeners", &cfg->probes_on_listeners);
    cfg->resolver_timeout_ms = 2000;
    cfg->resolver_attempts = 2;
    get_u32(c, root, "", "resolver_timeout_ms", 10, 60000, &cfg->resolver_timeout_ms);
    get_u32(c, root, "", "resolver_attempts", 1, 10, &cfg->resolver_attempts);
    parse_resolvers(c, root, cfg);

    parse_listeners(c, root, cfg);
    parse_admin(c, root, cfg);
    parse_upstreams(c, root, cfg);
    parse_rate_limits(c, root, cfg);
    pick_default_rate_limit(c, root, cfg);
    rate_limit_env(c, cfg);
    parse_routes(c, root, cfg);
    parse_trusted_proxies(c, root, cfg);
    parse_redis(c, root, cfg);
    parse_log(c, root, cfg);
    parse_limits(c, root, cfg);
}

/* ---------------------------------------------------------------------------------------------
 * Entry points
 */

/* Used only when cJSON refuses text the scanner accepted: cJSON says where it stopped, and the
 * text around that point is what a person needs. */
static void cjson_error(vctx *c, const char *text, size_t len, size_t off)
{
    unsigned line, col;
    char near[24];
    size_t k = 0;
    if (off > len)
        off = len;
    line_col_at(text, len, off, &line, &col);
    for (; k < sizeof near - 1 && off + k < len && text[off + k] != '\n'; k++)
        near[k] = (unsigned char)text[off + k] < 0x20 ? ' ' : text[off + k];
    near[k] = '\0';
    bw_diag_add(c->diag, "%s:%u:%u: invalid JSON near '%s'", c->file, line, col, near);
    c->errors++;
}

bw_config *bw_config_parse(const char *text, size_t len, const char *path, bw_getenv_fn getenv_fn,
                           bw_diag *diag)
{
    vctx c = {.file = path ? path : "(configuration)", .diag = diag, .getenv_fn = getenv_fn};
    pos_map pos = {0};
    bw_config *cfg = NULL;
    cJSON *root = NULL;
    char *copy = NULL;

    if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0) {
        text += 3;
        len -= 3;
    }
    const char *nul = memchr(text, '\0', len);
    if (nul != NULL) {
        unsigned line, col;
        line_col_at(text, len, (size_t)(nul - text), &line, &col);
        bw_diag_add(diag, "%s:%u:%u: invalid JSON: NUL byte in the file", c.file, line, col);
        return NULL;
    }
    copy = malloc(len + 1);
    c.dir = config_dir(path);
    cfg = calloc(1, sizeof *cfg);
    if (copy == NULL || c.dir == NULL || cfg == NULL) {
        bw_diag_add(diag, "%s: out of memory while loading the configuration", c.file);
        goto fail;
    }
    memcpy(copy, text, len);
    copy[len] = '\0';

    scanner sc;
    if (pos_scan(copy, len, &pos, &sc) < 0) {
        bw_diag_add(diag, "%s:%u:%u: invalid JSON: %s", c.file, sc.err_line, sc.err_col, sc.err);
        goto fail;
    }
    const char *end = NULL;
    root = cJSON_ParseWithOpts(copy, &end, 1);
    if (root == NULL) {
        cjson_error(&c, copy, len, end ? (size_t)(end - copy) : 0);
        goto fail;
    }
    c.pos = &pos;

    set_defaults(cfg);
    cfg->path = vstrdup(&c, c.file);
    read_env(&c);
    parse_root(&c, root, cfg);
    if (c.oom)
        bw_diag_add(diag, "%s: out of memory while loading the configuration", c.file);
    if (c.errors == 0 && !c.oom) {
        cfg->notes = c.notes.lines;
        cfg->n_notes = c.notes.count;
        cfg->notes_warn = c.notes_warn;
        c.notes.lines = NULL;
        c.notes.count = 0;
        c.notes_warn = NULL;
        goto done;
    }

fail:
    bw_config_free(cfg);
    cfg = NULL;
done:
    bw_diag_free(&c.notes);
    free(c.notes_warn);
    cJSON_Delete(root);
    pos_free(&pos);
    free(copy);
    free(c.dir);
    return cfg;
}

bw_config *bw_config_load(const char *path, bw_getenv_fn getenv_fn, bw_diag *diag)
{
    struct stat st;
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        bw_diag_add(diag, "%s: cannot open the configuration file: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fileno(f), &st) < 0 || !S_ISREG(st.st_mode)) {
        bw_diag_add(diag, "%s: not a regular file", path);
        fclose(f);
        return NULL;
    }
    if ((uint64_t)st.st_size > MAX_FILE_BYTES) {
        bw_diag_add(diag, "%s: the file is larger than %u MiB; is it the right file?", path,
                    MAX_FILE_BYTES >> 20);
        fclose(f);
        return NULL;
    }
    size_t cap = (size_t)st.st_size + 1, len = 0;
    char *buf = malloc(cap);
    if (buf == NULL) {
        bw_diag_add(diag, "%s: out of memory while loading the configuration", path);
        fclose(f);
        return NULL;
    }
    size_t got;
    while ((got = fread(buf + len, 1, cap - len, f)) > 0) {
        len += got;
        if (len == cap)
            break;
    }
    if (ferror(f) || len == cap) {
        bw_diag_add(diag, "%s: cannot read the configuration file%s", path,
                    len == cap ? ": it changed while being read" : "");
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    bw_config *cfg = bw_config_parse(buf, len, path, getenv_fn, diag);
    free(buf);
    return cfg;
}

void bw_config_free(bw_config *cfg)
{
    if (cfg == NULL)
        return;
    free(cfg->path);
    for (size_t i = 0; i < cfg->n_notes; i++)
        free(cfg->notes[i]);
    free(cfg->notes);
    free(cfg->notes_warn);
    for (size_t i = 0; i < cfg->n_listeners; i++) {
        free(cfg->listeners[i].address);
        for (size_t k = 0; k < cfg->listeners[i].tls.n_certs; k++) {
            free(cfg->listeners[i].tls.certs[k].cert);
            free(cfg->listeners[i].tls.certs[k].key);
            free(cfg->listeners[i].tls.certs[k].ocsp);
        }
        free(cfg->listeners[i].tls.certs);
    }
    free(cfg->listeners);
    free(cfg->admin.address);
    free(cfg->admin.token_env);
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        bw_upstream_conf *u = &cfg->upstreams[i];
        free(u->name);
        for (size_t k = 0; k < u->n_servers; k++) {
            free(u->servers[k].address);
            free(u->servers[k].host);
        }
        free(u->servers);
        free(u->health_check.path);
        free(u->health_check.host);
        free(u->tls.ca);
        free(u->tls.server_name);
        free(u->tls.cert);
        free(u->tls.key);
    }
    free(cfg->upstreams);
    for (size_t i = 0; i < cfg->n_routes; i++) {
        free(cfg->routes[i].host);
        free(cfg->routes[i].path_prefix);
        free(cfg->routes[i].name);
    }
    free(cfg->routes);
    for (size_t i = 0; i < cfg->n_rate_limits; i++) {
        free(cfg->rate_limits[i].name);
        free(cfg->rate_limits[i].key_header);
        free(cfg->rate_limits[i].exempt);
    }
    free(cfg->rate_limits);
    free(cfg->trusted_proxies);
    free(cfg->resolvers);
    free(cfg->redis.url);
    free(cfg->redis.key_prefix);
    for (size_t i = 0; i < cfg->redis.n_sentinels; i++)
        free(cfg->redis.sentinels[i]);
    free(cfg->redis.sentinels);
    free(cfg->redis.master_name);
    free(cfg->redis.password);
    free(cfg->log.error_log);
    free(cfg->log.access_log);
    free(cfg);
}

int bw_config_find_upstream(const bw_config *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        if (cfg->upstreams[i].name != NULL && strcmp(cfg->upstreams[i].name, name) == 0)
            return (int)i;
    return -1;
}
