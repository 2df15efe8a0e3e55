/*
 * Unit tests for src/log.c: the error-log line format and level filter, the access-log JSON
 * (field order, nulls, numbers, and escaping of hostile client bytes, checked with cJSON and a
 * strict UTF-8 validator), and reopening after logrotate renamed the files.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "breakwater/log.h"

static char tmpdir[256];

static int make_tmpdir(void **state)
{
    (void)state;
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof(tmpdir), "%s/bw-test-log-XXXXXX", base ? base : "/tmp");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int remove_tmpdir(void **state)
{
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static char *path_in_tmp(const char *name)
{
    static char buf[4][512];
    static int next;
    char *p = buf[next++ % 4];
    snprintf(p, 512, "%s/%s", tmpdir, name);
    return p;
}

/* Whole file into a NUL-terminated heap buffer (NULL if it cannot be read). */
static char *slurp(const char *path, size_t *len_out)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    size_t cap = 1 << 16, len = 0, n;
    if (f == NULL)
        return NULL;
    buf = malloc(cap + 1);
    while ((n = fread(buf + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
        }
    }
    fclose(f);
    buf[len] = '\0';
    if (len_out)
        *len_out = len;
    return buf;
}

static size_t count_lines(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        if (*s == '\n')
            n++;
    return n;
}

/* Strict RFC 3629 check, written independently of the one in log.c. */
static bool valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        size_t len;
        if (s[i] < 0x80) {
            i++;
            continue;
        } else if ((s[i] & 0xe0) == 0xc0) {
            len = 2;
            cp = s[i] & 0x1f;
        } else if ((s[i] & 0xf0) == 0xe0) {
            len = 3;
            cp = s[i] & 0x0f;
        } else if ((s[i] & 0xf8) == 0xf0) {
            len = 4;
            cp = s[i] & 0x07;
        } else {
            return false;
        }
        if (i + len > n)
            return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000))
            return false;
        if (cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += len;
    }
    return true;
}

/* The line must be one JSON object ending in exactly one newline, in valid UTF-8. */
static cJSON *parse_line(const char *line, size_t len)
{
    assert_true(len > 2);
    assert_int_equal(line[len - 1], '\n');
    assert_int_equal(strlen(line), len);
    assert_null(memchr(line, '\n', len - 1));
    assert_true(valid_utf8((const unsigned char *)line, len));
    cJSON *j = cJSON_ParseWithOpts(line, NULL, 1);
    assert_non_null(j);
    assert_true(cJSON_IsObject(j));
    return j;
}

static bw_access_record sample_record(void)
{
    bw_access_record r;
    memset(&r, 0, sizeof(r));
    r.time_ms = 1795575538123LL; /* 2026-11-25T02:58:58.123Z */
    r.client = "127.0.0.1:54321";
    r.method = "GET";
    r.method_len = 3;
    r.path = "/api/v1/items?x=1";
    r.path_len = strlen(r.path);
    r.status = 200;
    r.bytes_in = 12;
    r.bytes_out = 345;
    r.upstream = "api";
    r.server = "127.0.0.1:9001";
    r.route = "/";
    r.request_id = "abc-123";
    r.request_id_len = 7;
    r.duration_ms = 12.3456;
    r.upstream_connect_ms = 0.5;
    r.upstream_response_ms = 10;
    r.attempts = 1;
    r.error = NULL;
    r.tls = true;
    return r;
}

static void test_level_parse(void **state)
{
    (void)state;
    bw_log_level l;
    assert_int_equal(bw_log_level_parse("debug", &l), 0);
    assert_int_equal(l, BW_LOG_DEBUG);
    assert_int_equal(bw_log_level_parse("info", &l), 0);
    assert_int_equal(l, BW_LOG_INFO);
    assert_int_equal(bw_log_level_parse("WARN", &l), 0);
    assert_int_equal(l, BW_LOG_WARN);
    assert_int_equal(bw_log_level_parse("warning", &l), 0);
    assert_int_equal(l, BW_LOG_WARN);
    assert_int_equal(bw_log_level_parse("error", &l), 0);
    assert_int_equal(l, BW_LOG_ERROR);
    assert_int_equal(bw_log_level_parse("verbose", &l), -1);
    assert_int_equal(bw_log_level_parse("", &l), -1);
    assert_int_equal(bw_log_level_parse(NULL, &l), -1);
}

static void test_error_line_format_and_filter(void **state)
{
    (void)state;
    bw_log log;
    bw_log_conf conf = {path_in_tmp("error.log"), "off", BW_LOG_WARN, false, BW_LOG_QUERY_REDACT};
    char err[256];
    regex_t re;

    assert_int_equal(bw_log_open(&log, &conf, err, sizeof(err)), 0);
    assert_int_equal(log.access_fd, -1);
    bw_log_set_tag(&log, "worker 3");
    bw_log_debug(&log, "not shown %d", 1);
    bw_log_info(&log, "not shown %d", 2);
    bw_log_warn(&log, "upstream %s is slow", "api");
    bw_log_error(&log, "two\nlines\r?");
    bw_log_close(&log);

    struct stat st;
    assert_int_equal(stat(conf.error_log, &st), 0);
    mode_t mask = umask(0);
    umask(mask);
    assert_int_equal(st.st_mode & 0777, 0640 & ~mask);

    char *text = slurp(conf.error_log, NULL);
    assert_non_null(text);
    assert_int_equal(count_lines(text), 2);
    assert_null(strstr(text, "not shown"));
    assert_int_equal(regcomp(&re,
                             "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z "
                             "warn worker 3: upstream api is slow\n"
                             "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z "
                             "error worker 3: two lines \\?\n$",
                             REG_EXTENDED | REG_NOSUB),
                     0);
    assert_int_equal(regexec(&re, text, 0, NULL, 0), 0);
    regfree(&re);
    free(text);
}

static void test_error_line_truncated(void **state)
{
    (void)state;
    bw_log log;
    bw_log_conf conf = {path_in_tmp("long.log"), "off", BW_LOG_DEBUG, false, BW_LOG_QUERY_REDACT};
    char err[256];
    char *big = malloc(20001);
    memset(big, 'x', 20000);
    big[20000] = '\0';

    assert_int_equal(bw_log_open(&log, &conf, err, sizeof(err)), 0);
    bw_log_info(&log, "%s", big);
    bw_log_info(&log, "after");
    bw_log_close(&log);
    free(big);

    size_t len;
    char *text = slurp(conf.error_log, &len);
    assert_int_equal(count_lines(text), 2);
    char *nl = strchr(text, '\n');
    assert_true(nl - text > 4000);
    assert_true(nl - text < 4300);
    assert_memory_equal(nl - 3, "...", 3);
    assert_non_null(strstr(nl + 1, "info master: after\n"));
    free(text);
}

static void test_open_failure_reports(void **state)
{
    (void)state;
    bw_log log;
    bw_log_conf conf = {path_in_tmp("no/such/dir/error.log"), "off", BW_LOG_INFO, false,
                        BW_LOG_QUERY_REDACT};
    char err[256] = "";
    assert_int_equal(bw_log_open(&log, &conf, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "no/such/dir/error.log"));
    assert_non_null(strstr(err, "No such file"));

    bw_log_conf conf2 = {NULL, path_in_tmp("missing/access.log"), BW_LOG_INFO, false,
                         BW_LOG_QUERY_REDACT};
    assert_int_equal(bw_log_open(&log, &conf2, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "access log"));
}

static void test_default_destinations(void **state)
{
    (void)state;
    bw_log log;
    char err[64];
    assert_int_equal(bw_log_open(&log, NULL, err, sizeof(err)), 0);
    assert_int_equal(log.error_fd, STDERR_FILENO);
    assert_int_equal(log.access_fd, STDOUT_FILENO);
    assert_null(log.error_path);
    assert_null(log.access_path);
    assert_string_equal(log.tag, "master");
    bw_log_close(&log);

    bw_log_conf conf = {"stderr", "stdout", BW_LOG_ERROR, false, BW_LOG_QUERY_REDACT};
    assert_int_equal(bw_log_open(&log, &conf, err, sizeof(err)), 0);
    assert_int_equal(log.error_fd, STDERR_FILENO);
    assert_int_equal(log.access_fd, STDOUT_FILENO);
    assert_int_equal(log.level, BW_LOG_ERROR);
    bw_log_close(&log);
}

static void test_access_format_fields(void **state)
{
    (void)state;
    static const char *const keys[] = {"time",
                                       "client",
                                       "method",
                                       "path",
                                       "status",
                                       "bytes_in",
                                       "bytes_out",
                                       "upstream",
                                       "server",
                                       "route",
                                       "request_id",
                                       "duration_ms",
                                       "upstream_connect_ms",
                                       "upstream_response_ms",
                                       "attempts",
                                       "error",
                                       "tls"};
    bw_access_record r = sample_record();
    char buf[8192];
    size_t n = bw_log_access_format(&r, buf, sizeof(buf));
    cJSON *j = parse_line(buf, n);

    size_t i = 0;
    for (cJSON *c = j->child; c; c = c->next, i++) {
        assert_true(i < sizeof(keys) / sizeof(keys[0]));
        assert_string_equal(c->string, keys[i]);
    }
    assert_int_equal(i, sizeof(keys) / sizeof(keys[0]));

    assert_string_equal(cJSON_GetObjectItem(j, "time")->valuestring, "2026-11-25T02:58:58.123Z");
    assert_string_equal(cJSON_GetObjectItem(j, "client")->valuestring, "127.0.0.1:54321");
    assert_string_equal(cJSON_GetObjectItem(j, "method")->valuestring, "GET");
    assert_string_equal(cJSON_GetObjectItem(j, "path")->valuestring, "/api/v1/items?x=1");
    assert_int_equal(cJSON_GetObjectItem(j, "status")->valueint, 200);
    assert_int_equal(cJSON_GetObjectItem(j, "bytes_out")->valueint, 345);
    assert_string_equal(cJSON_GetObjectItem(j, "request_id")->valuestring, "abc-123");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "error")));
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(j, "tls")));
    cJSON_Delete(j);

    /* Three decimals, exactly. */
    assert_non_null(strstr(buf, "\"duration_ms\":12.346,"));
    assert_non_null(strstr(buf, "\"upstream_connect_ms\":0.500,"));
    assert_non_null(strstr(buf, "\"upstream_response_ms\":10.000,"));
}

static void test_access_format_nulls(void **state)
{
    (void)state;
    bw_access_record r = sample_record();
    r.client = NULL;
    r.upstream = NULL;
    r.server = NULL;
    r.route = NULL;
    r.request_id = NULL;
    r.upstream_connect_ms = -1;
    r.upstream_response_ms = -1;
    r.error = "no_route";
    r.status = 404;
    r.attempts = 0;
    r.tls = false;
    char buf[8192];
    size_t n = bw_log_access_format(&r, buf, sizeof(buf));
    cJSON *j = parse_line(buf, n);
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "client")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "upstream")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "server")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "route")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "request_id")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "upstream_connect_ms")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "upstream_response_ms")));
    assert_string_equal(cJSON_GetObjectItem(j, "error")->valuestring, "no_route");
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(j, "tls")));
    cJSON_Delete(j);
}

static void test_access_escaping(void **state)
{
    (void)state;
    /* Quotes, backslash, CR/LF, a NUL inside the length, DEL, an invalid lead byte, an overlong
     * slash, a UTF-16 surrogate, a truncated sequence at the end; and one valid "é". */
    static const char path[] = "/a\"b\\c\r\nd\0e\x7f\xff/\xc0\xaf/\xed\xa0\x80/\xc3\xa9/\xe2\x82";
    static const char method[] = "G\"E\nT";
    bw_access_record r = sample_record();
    r.path = path;
    r.path_len = sizeof(path) - 1;
    r.method = method;
    r.method_len = sizeof(method) - 1;
    r.request_id = "id\x01\x80";
    r.request_id_len = 4;
    char buf[8192];
    size_t n = bw_log_access_format(&r, buf, sizeof(buf));
    cJSON *j = parse_line(buf, n);
    cJSON_Delete(j);

    assert_non_null(strstr(buf, "\"path\":\"/a\\\"b\\\\c\\r\\nd\\u0000e\\u007f\\u00ff/"
                                "\\u00c0\\u00af/\\u00ed\\u00a0\\u0080/\xc3\xa9/\\u00e2\\u0082\""));
    assert_non_null(strstr(buf, "\"method\":\"G\\\"E\\nT\""));
    assert_non_null(strstr(buf, "\"request_id\":\"id\\u0001\\u0080\""));
}

/* Paths far longer than a line: shortened at a character boundary, line still valid. */
static void test_access_long_values(void **state)
{
    (void)state;
    static const char *const units[] = {"a", "\xc3\xa9", "\xf0\x9f\x98\x80", "\xff", "\"", "\n"};
    size_t big = 20000;
    char *path = malloc(big * 4);
    char *rid = malloc(4000);
    memset(rid, 'r', 4000);

    for (size_t u = 0; u < sizeof(units) / sizeof(units[0]); u++) {
        size_t ul = strlen(units[u]), len = 0;
        while (len + ul <= big) {
            memcpy(path + len, units[u], ul);
            len += ul;
        }
        bw_access_record r = sample_record();
        r.path = path;
        r.path_len = len;
        r.method = path;
        r.method_len = len;
        r.request_id = rid;
        r.request_id_len = 4000;
        char buf[8192];
        size_t n = bw_log_access_format(&r, buf, sizeof(buf));
        assert_true(n > 0 && n < sizeof(buf));
        cJSON *j = parse_line(buf, n);
        const char *p = cJSON_GetObjectItem(j, "path")->valuestring;
        assert_true(strlen(p) > 3);
        assert_string_equal(p + strlen(p) - 3, "...");
        assert_true(strlen(cJSON_GetObjectItem(j, "method")->valuestring) <= 128);
        assert_true(strlen(cJSON_GetObjectItem(j, "request_id")->valuestring) <= 512);
        assert_int_equal(cJSON_GetObjectItem(j, "status")->valueint, 200);
        cJSON_Delete(j);
    }

    /* A buffer too small for the fixed fields: nothing, not a broken line. */
    bw_access_record r = sample_record();
    char small[64];
    assert_int_equal(bw_log_access_format(&r, small, sizeof(small)), 0);
    /* Exactly enough room: the line fits with a shortened path. */
    char full[8192];
    size_t need = bw_log_access_format(&r, full, sizeof(full));
    char *tight = malloc(need);
    size_t got = bw_log_access_format(&r, tight, need);
    assert_true(got > 0 && got < need);
    cJSON_Delete(parse_line(tight, got));
    free(tight);
    free(path);
    free(rid);
}

/* Random bytes in every client-supplied field never produce invalid JSON. */
static void test_access_random_bytes(void **state)
{
    (void)state;
    unsigned seed = 12345;
    char path[300], method[40], rid[80];
    for (int iter = 0; iter < 3000; iter++) {
        size_t pl = (size_t)rand_r(&seed) % sizeof(path);
        size_t ml = (size_t)rand_r(&seed) % sizeof(method);
        size_t rl = (size_t)rand_r(&seed) % sizeof(rid);
        for (size_t i = 0; i < pl; i++)
            path[i] = (char)(rand_r(&seed) & 0xff);
        for (size_t i = 0; i < ml; i++)
            method[i] = (char)(rand_r(&seed) & 0xff);
        for (size_t i = 0; i < rl; i++)
            rid[i] = (char)(rand_r(&seed) & 0xff);
        bw_access_record r = sample_record();
        r.path = path;
        r.path_len = pl;
        r.method = method;
        r.method_len = ml;
        r.request_id = rid;
        r.request_id_len = rl;
        char buf[8192];
        size_t n = bw_log_access_format(&r, buf, sizeof(buf));
        cJSON_Delete(parse_line(buf, n));
    }
}

/* ---- query strings: redact, keep, drop ---- */

static char *apply(bw_log_query mode, const char *in, size_t cap)
{
    static char out[1024];
    size_t n = bw_log_query_apply(mode, in, strlen(in), out, cap);
    assert_true(n <= cap);
    out[n] = '\0';
    return out;
}

static void test_query_redact_cases(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        {"/p?token=abc&a=1", "/p?token=-&a=-"},
        {"/p", "/p"},
        {"/p?", "/p?"},
        {"/p?a", "/p?-"},
        {"/p?=x", "/p?=-"},
        {"/p?a=b=c", "/p?a=-"},
        {"/p?&&", "/p?&&"},
        {"/p?a=&b=", "/p?a=&b="},
        {"/p?a=1&&b=2&", "/p?a=-&&b=-&"},
        {"/p?%74oken=%61%62c", "/p?%74oken=-"},
        {"/p?a=x?y=z", "/p?a=-"},
        {"/p?secret", "/p?-"},
        {"/p?a=1;b=secret", "/p?a=-"},
        {"?x=1", "?x=-"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        assert_string_equal(apply(BW_LOG_QUERY_REDACT, cases[i][0], 1000), cases[i][1]);
    assert_string_equal(apply(BW_LOG_QUERY_KEEP, "/p?token=abc", 1000), "/p?token=abc");
    assert_string_equal(apply(BW_LOG_QUERY_DROP, "/p?token=abc&a=1", 1000), "/p");
    assert_string_equal(apply(BW_LOG_QUERY_DROP, "/p", 1000), "/p");
    /* Cut short by the output's size: a prefix, never part of a value. */
    assert_string_equal(apply(BW_LOG_QUERY_REDACT, "/p?token=abcdef", 5), "/p?");
    assert_string_equal(apply(BW_LOG_QUERY_REDACT, "/p?token=abcdef", 9), "/p?");
    assert_string_equal(apply(BW_LOG_QUERY_REDACT, "/p?token=abcdef", 10), "/p?token=-");
    assert_string_equal(apply(BW_LOG_QUERY_REDACT, "/p?token=abcdef", 0), "");
}

/* The reference the property test compares with: split on '&', then on the first '='. */
static void reference_redact(const char *in, char *out)
{
    const char *q = strchr(in, '?');
    if (q == NULL) {
        strcpy(out, in);
        return;
    }
    size_t o = (size_t)(q - in) + 1;
    memcpy(out, in, o);
    const char *c = q + 1;
    for (;;) {
        const char *amp = strchr(c, '&');
        size_t clen = amp ? (size_t)(amp - c) : strlen(c);
        const char *eq = memchr(c, '=', clen);
        if (eq) {
            memcpy(out + o, c, (size_t)(eq - c) + 1);
            o += (size_t)(eq - c) + 1;
            if ((size_t)(eq - c) + 1 < clen)
                out[o++] = '-';
        } else if (clen > 0) {
            out[o++] = '-';
        }
        if (!amp)
            break;
        out[o++] = '&';
        c = amp + 1;
    }
    out[o] = '\0';
}

/* Random targets whose values (and bare parameters) hold the marker "SECRET" among separators
 * and percent-escapes: redaction matches the reference, never shows the marker, and any cut
 * of the output is a prefix of the whole. */
static void test_query_redact_property(void **state)
{
    (void)state;
    static const char *const name_parts[] = {"a", "tok", "%41", "", "x_y", "%3D"};
    static const char *const value_parts[] = {"SECRET",        "=", "?", "%26", "%",
                                              "SECRET=SECRET", ";", "+", "#",   " "};
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    for (int iter = 0; iter < 20000; iter++) {
        char in[512], ref[1024], full[1024], cut[1024];
        size_t n = (size_t)snprintf(in, sizeof(in), "/path");
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t r = seed;
        in[n++] = '?';
        int params = (int)((r >> 1) % 6);
        for (int k = 0; k < params && n < 400; k++) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            if (k > 0)
                in[n++] = '&';
            unsigned kind = (unsigned)(r >> 60) % 4; /* name=value, bare, empty, name= */
            const char *nm = name_parts[(r >> 8) % 6];
            if (kind != 2 && kind != 1)
                n += (size_t)sprintf(in + n, "%s=", nm);
            if (kind == 0) {
                int parts = 1 + (int)((r >> 16) % 3);
                for (int v = 0; v < parts; v++)
                    n += (size_t)sprintf(in + n, "%s", value_parts[(r >> (20 + 4 * v)) % 10]);
            } else if (kind == 1) {
                /* A bare parameter: no '=' (that would make its start a name). */
                n += (size_t)sprintf(in + n, "%s", (r >> 40) % 2 ? "SECRET%41" : "SECRET");
            }
        }
        in[n] = '\0';
        reference_redact(in, ref);
        size_t fl = bw_log_query_apply(BW_LOG_QUERY_REDACT, in, n, full, sizeof(full));
        full[fl] = '\0';
        assert_string_equal(full, ref);
        assert_true(fl <= n);
        if (strstr(strchr(full, '?'), "SECRET"))
            fail_msg("leak: \"%s\" -> \"%s\"", in, full);
        size_t cap = (size_t)(r >> 48) % (fl + 2);
        size_t cl = bw_log_query_apply(BW_LOG_QUERY_REDACT, in, n, cut, cap);
        assert_true(cl <= cap);
        if (memcmp(cut, full, cl) != 0)
            fail_msg("cut at %zu of \"%s\": \"%.*s\" is not a prefix of \"%s\"", cap, in, (int)cl,
                     cut, full);
        size_t dl = bw_log_query_apply(BW_LOG_QUERY_DROP, in, n, cut, sizeof(cut));
        assert_int_equal(dl, (size_t)(strchr(in, '?') - in));
    }
}

static void test_access_log_redacts_by_default(void **state)
{
    (void)state;
    bw_log log;
    bw_log_conf conf = {NULL, path_in_tmp("redact.log"), BW_LOG_INFO, false, BW_LOG_QUERY_REDACT};
    char err[256];
    bw_access_record r = sample_record();
    static const char target[] = "/login?token=abc123&user=bob";
    r.path = target;
    r.path_len = strlen(target);
    assert_int_equal(bw_log_open(&log, &conf, err, sizeof(err)), 0);
    bw_log_access(&log, &r);
    log.query = BW_LOG_QUERY_DROP;
    bw_log_access(&log, &r);
    log.query = BW_LOG_QUERY_KEEP;
    bw_log_access(&log, &r);
    bw_log_close(&log);
    char *text = slurp(conf.access_log, NULL);
    assert_non_null(text);
    assert_int_equal(count_lines(text), 3);
    const char *want[] = {"/login?token=-&user=-", "/login", target};
    char *line = text;
    for (int i = 0; i < 3; i++) {
        char *nl = strchr(line, '\n');
        char one[8192];
        memcpy(one, line, (size_t)(nl - line + 1));
        one[nl - line + 1] = '\0';
        cJSON *j = parse_line(one, (size_t)(nl - line + 1));
        assert_string_equal(cJSON_GetObjectItem(j, "path")->valuestring, want[i]);
        cJSON_Delete(j);
        line = nl + 1;
    }
    free(text);
}

static void test_error_log_json(void **state)
{
    (void)state;
    bw_log log;
    bw_log_conf conf = {path_in_tmp("error.json"), "off", BW_LOG_INFO, true, BW_LOG_QUERY_REDACT};
    char err[256];
    assert_int_equal(bw_log_open(&log, &conf, err, sizeof(err)), 0);
    bw_log_set_tag(&log, "worker 2");
    bw_log_debug(&log, "filtered");
    bw_log_warn(&log, "upstream \"%s\" said\n\x01%s", "api", "\xff bad utf-8");
    char big[6000];
    memset(big, '"', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    bw_log_error(&log, "%s", big);
    bw_log_close(&log);
    char *text = slurp(conf.error_log, NULL);
    assert_non_null(text);
    assert_int_equal(count_lines(text), 2);
    char *nl = strchr(text, '\n');
    cJSON *j = cJSON_ParseWithLength(text, (size_t)(nl - text));
    assert_non_null(j);
    assert_string_equal(cJSON_GetObjectItem(j, "level")->valuestring, "warn");
    assert_string_equal(cJSON_GetObjectItem(j, "message")->valuestring,
                        "upstream \"api\" said\n\x01\xc3\xbf bad utf-8");
    assert_string_equal(cJSON_GetObjectItem(j, "process")->valuestring, "worker 2");
    assert_int_equal(cJSON_GetObjectItem(j, "pid")->valueint, (int)getpid());
    regex_t re;
    assert_int_equal(regcomp(&re, "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}\\.[0-9]{3}Z$",
                             REG_EXTENDED | REG_NOSUB),
                     0);
    assert_int_equal(regexec(&re, cJSON_GetObjectItem(j, "timestamp")->valuestring, 0, NULL, 0), 0);
    regfree(&re);
    cJSON_Delete(j);
    /* A message of only quotes escapes to twice its length and still makes one object. */
    j = cJSON_Parse(nl + 1);
    assert_non_null(j);
    const char *m = cJSON_GetObjectItem(j, "message")->valuestring;
    assert_true(strlen(m) > 1000 && strlen(m) <= 4096);
    assert_string_equal(cJSON_GetObjectItem(j, "level")->valuestring, "error");
    cJSON_Delete(j);
    free(text);
}

static void test_access_write_and_off(void **state)
{
    (void)state;
    bw_log log;
    bw_log_conf conf = {NULL, path_in_tmp("access.log"), BW_LOG_INFO, false, BW_LOG_QUERY_REDACT};
    char err[256];
    bw_access_record r = sample_record();

    assert_int_equal(bw_log_open(&log, &conf, err, sizeof(err)), 0);
    bw_log_access(&log, &r);
    r.status = 502;
    bw_log_access(&log, &r);
    bw_log_close(&log);

    char *text = slurp(conf.access_log, NULL);
    assert_int_equal(count_lines(text), 2);
    char *second = strchr(text, '\n') + 1;
    char first[8192];
    memcpy(first, text, (size_t)(second - text));
    first[second - text] = '\0';
    cJSON_Delete(parse_line(first, (size_t)(second - text)));
    cJSON *j = parse_line(second, strlen(second));
    assert_int_equal(cJSON_GetObjectItem(j, "status")->valueint, 502);
    cJSON_Delete(j);
    free(text);

    bw_log_conf off = {NULL, "off", BW_LOG_INFO, false, BW_LOG_QUERY_REDACT};
    assert_int_equal(bw_log_open(&log, &off, err, sizeof(err)), 0);
    bw_log_access(&log, &r); /* no destination: nothing happens */
    bw_log_close(&log);
}

/* logrotate's "rename, then SIGUSR1": writes after the reopen go to the new file. */
static void test_reopen_after_rename(void **state)
{
    (void)state;
    bw_log log;
    char elog[512], alog[512], elog1[600], alog1[600];
    snprintf(elog, sizeof(elog), "%s", path_in_tmp("rot-error.log"));
    snprintf(alog, sizeof(alog), "%s", path_in_tmp("rot-access.log"));
    snprintf(elog1, sizeof(elog1), "%s.1", elog);
    snprintf(alog1, sizeof(alog1), "%s.1", alog);
    bw_log_conf conf = {elog, alog, BW_LOG_INFO, false, BW_LOG_QUERY_REDACT};
    char err[256];
    bw_access_record r = sample_record();

    assert_int_equal(bw_log_open(&log, &conf, err, sizeof(err)), 0);
    int efd = log.error_fd, afd = log.access_fd;
    bw_log_info(&log, "before rotation");
    bw_log_access(&log, &r);
    assert_int_equal(rename(elog, elog1), 0);
    assert_int_equal(rename(alog, alog1), 0);
    bw_log_info(&log, "still old file");
    bw_log_reopen(&log);
    /* Same descriptor numbers: a copy of the struct (or a forked child) keeps working. */
    assert_int_equal(log.error_fd, efd);
    assert_int_equal(log.access_fd, afd);
    assert_true(fcntl(log.error_fd, F_GETFD) & FD_CLOEXEC);
    bw_log_info(&log, "after rotation");
    r.status = 201;
    bw_log_access(&log, &r);
    bw_log_close(&log);

    char *old_e = slurp(elog1, NULL), *new_e = slurp(elog, NULL);
    char *old_a = slurp(alog1, NULL), *new_a = slurp(alog, NULL);
    assert_non_null(new_e);
    assert_non_null(new_a);
    assert_non_null(strstr(old_e, "before rotation"));
    assert_non_null(strstr(old_e, "still old file"));
    assert_null(strstr(old_e, "after rotation"));
    assert_non_null(strstr(new_e, "after rotation"));
    assert_int_equal(count_lines(new_e), 1);
    assert_int_equal(count_lines(old_a), 1);
    assert_int_equal(count_lines(new_a), 1);
    assert_non_null(strstr(new_a, "\"status\":201"));
    free(old_e);
    free(new_e);
    free(old_a);
    free(new_a);
}

/* A reopen that fails keeps the old descriptor and says why in the (old) error log. */
static void test_reopen_failure_keeps_old(void **state)
{
    (void)state;
    bw_log log;
    char dir[512], dir2[512], elog[600], elog2[600];
    snprintf(dir, sizeof(dir), "%s", path_in_tmp("sub"));
    snprintf(dir2, sizeof(dir2), "%s", path_in_tmp("sub-moved"));
    assert_int_equal(mkdir(dir, 0700), 0);
    snprintf(elog, sizeof(elog), "%s/error.log", dir);
    snprintf(elog2, sizeof(elog2), "%s/error.log", dir2);
    bw_log_conf conf = {elog, "off", BW_LOG_INFO, false, BW_LOG_QUERY_REDACT};
    char err[256];

    assert_int_equal(bw_log_open(&log, &conf, err, sizeof(err)), 0);
    int efd = log.error_fd;
    assert_int_equal(rename(dir, dir2), 0);
    bw_log_reopen(&log);
    assert_int_equal(log.error_fd, efd);
    bw_log_info(&log, "still logging");
    bw_log_close(&log);

    char *text = slurp(elog2, NULL);
    assert_non_null(text);
    assert_non_null(strstr(text, "error master: cannot reopen error log"));
    assert_non_null(strstr(text, "still logging"));
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_level_parse),
        cmocka_unit_test(test_error_line_format_and_filter),
        cmocka_unit_test(test_error_line_truncated),
        cmocka_unit_test(test_open_failure_reports),
        cmocka_unit_test(test_default_destinations),
        cmocka_unit_test(test_access_format_fields),
        cmocka_unit_test(test_access_format_nulls),
        cmocka_unit_test(test_access_escaping),
        cmocka_unit_test(test_access_long_values),
        cmocka_unit_test(test_access_random_bytes),
        cmocka_unit_test(test_access_write_and_off),
        cmocka_unit_test(test_query_redact_cases),
        cmocka_unit_test(test_query_redact_property),
        cmocka_unit_test(test_access_log_redacts_by_default),
        cmocka_unit_test(test_error_log_json),
        cmocka_unit_test(test_reopen_after_rename),
        cmocka_unit_test(test_reopen_failure_keeps_old),
    };
    return cmocka_run_group_tests(tests, make_tmpdir, remove_tmpdir);
}
