/*
 * Unit tests for src/http.c: the strict HTTP/1.x head parser and the chunked-body decoder.
 *
 * Rejections are table-driven: each row is one message with the status and the error reason the
 * parser must give, and runs as its own named test. The rows include one for each request-parser
 * defect of libevhtp 1.2.18 listed in KNOWN-DEFECTS.md, which breakwater's parser replaces.
 * Chunked samples are checked once in one piece, then split at every byte and byte by byte: the
 * outcome must never depend on how the body arrives.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "breakwater/http.h"

/* A sample with an explicit length, so messages may contain NUL bytes. */
#define RAW(s) s, sizeof(s) - 1

static bw_http_head head; /* 8 KiB: kept off the test's stack */

/* Parses a request exactly as the proxy does: head_length first, then the parser. */
static bw_http_status parse_req(const char *raw, size_t len)
{
    size_t hl = bw_http_head_length(raw, len);
    assert_int_equal(hl, len);
    return bw_http_parse_request(raw, hl, 100, &head);
}

static bw_http_status parse_resp(const char *raw, size_t len, bw_http_method m)
{
    size_t hl = bw_http_head_length(raw, len);
    assert_int_equal(hl, len);
    return bw_http_parse_response(raw, hl, 100, m, &head);
}

static void assert_span(const char *p, size_t len, const char *expected)
{
    assert_int_equal(len, strlen(expected));
    assert_memory_equal(p, expected, len);
}

/* ---- valid requests ---- */

static void test_request_origin_form(void **state)
{
    (void)state;
    static const char raw[] = "GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\n"
                              "Accept:  text/html \t\r\nX-Empty:\r\n\r\n";
    assert_int_equal(parse_req(RAW(raw)), BW_HTTP_OK);
    assert_null(head.error);
    assert_int_equal(head.method, BW_METHOD_GET);
    assert_span(head.method_str, head.method_len, "GET");
    assert_span(head.target, head.target_len, "/a/b?c=d");
    assert_int_equal(head.version_minor, 1);
    assert_int_equal(head.n_headers, 3);
    assert_int_equal(head.host_index, 0);
    assert_span(head.headers[0].name, head.headers[0].name_len, "Host");
    assert_span(head.headers[0].value, head.headers[0].value_len, "example.com");
    assert_span(head.headers[1].value, head.headers[1].value_len, "text/html");
    assert_int_equal(head.headers[2].value_len, 0);
    assert_int_equal(head.framing, BW_BODY_NONE);
    assert_false(head.conn_close);
    assert_false(head.conn_keep_alive);
    assert_false(head.expect_continue);
    assert_false(head.has_upgrade);
    /* pointers point into the caller's buffer */
    assert_ptr_equal(head.target, raw + 4);
}

static void test_request_leading_empty_lines(void **state)
{
    (void)state;
    static const char raw[] = "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
    assert_int_equal(parse_req(RAW(raw)), BW_HTTP_OK);
    assert_int_equal(head.method, BW_METHOD_GET);
    assert_ptr_equal(head.method_str, raw + 4);
}

static void test_request_absolute_form(void **state)
{
    (void)state;
    assert_int_equal(parse_req(RAW("GET http://example.com:8080/x?y HTTP/1.1\r\n"
                                   "Host: example.com:8080\r\n\r\n")),
                     BW_HTTP_OK);
    assert_span(head.target, head.target_len, "http://example.com:8080/x?y");
    assert_int_equal(parse_req(RAW("GET HTTPS://[::1] HTTP/1.1\r\nHost: [::1]\r\n\r\n")),
                     BW_HTTP_OK);
}

static void test_request_asterisk_form(void **state)
{
    (void)state;
    assert_int_equal(parse_req(RAW("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")), BW_HTTP_OK);
    assert_int_equal(head.method, BW_METHOD_OPTIONS);
    assert_span(head.target, head.target_len, "*");
}

static void test_request_authority_form(void **state)
{
    (void)state;
    assert_int_equal(parse_req(RAW("CONNECT example.com:443 HTTP/1.1\r\n"
                                   "Host: example.com:443\r\n\r\n")),
                     BW_HTTP_OK);
    assert_int_equal(head.method, BW_METHOD_CONNECT);
    assert_int_equal(parse_req(RAW("CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n")),
                     BW_HTTP_OK);
}

static void test_request_content_length(void **state)
{
    (void)state;
    assert_int_equal(parse_req(RAW("POST /f HTTP/1.1\r\nHost: a\r\nContent-Length: 42\r\n\r\n")),
                     BW_HTTP_OK);
    assert_int_equal(head.method, BW_METHOD_POST);
    assert_int_equal(head.framing, BW_BODY_LENGTH);
    assert_int_equal(head.content_length, 42);
    assert_int_equal(parse_req(RAW("POST /f HTTP/1.1\r\nHost: a\r\ncontent-length: 0\r\n\r\n")),
                     BW_HTTP_OK);
    assert_int_equal(head.framing, BW_BODY_LENGTH);
    assert_int_equal(head.content_length, 0);
    assert_int_equal(parse_req(RAW("PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\n")),
                     BW_HTTP_OK);
    assert_int_equal(head.content_length, 7);
}

static void test_request_content_length_limit(void **state)
{
    (void)state;
    assert_int_equal(parse_req(RAW("POST / HTTP/1.1\r\nHost: a\r\n"
                                   "Content-Length: 9007199254740992\r\n\r\n")),
                     BW_HTTP_OK);
    assert_true(head.content_length == BW_HTTP_MAX_CONTENT_LENGTH);
    /* leading zeros never count towards the bound */
    assert_int_equal(parse_req(RAW("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: "
                                   "000000000000000000000000000001\r\n\r\n")),
                     BW_HTTP_OK);
    assert_int_equal(head.content_length, 1);
}

static void test_request_chunked(void **state)
{
    (void)state;
    assert_int_equal(parse_req(RAW("POST / HTTP/1.1\r\nHost: a\r\n"
                                   "Transfer-Encoding:  ChunKed  \r\n\r\n")),
                     BW_HTTP_OK);
    assert_int_equal(head.framing, BW_BODY_CHUNKED);
}

static void test_request_http10(void **state)
{
    (void)state;
    assert_int_equal(parse_req(RAW("GET / HTTP/1.0\r\n\r\n")), BW_HTTP_OK);
    assert_int_equal(head.version_minor, 0);
    assert_int_equal(head.host_index, -1);
    assert_true(head.conn_close);
    assert_int_equal(parse_req(RAW("GET / HTTP/1.0\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n")),
                     BW_HTTP_OK);
    assert_false(head.conn_close);
    assert_true(head.conn_keep_alive);
    assert_int_equal(head.host_index, 0);
}

static void test_request_connection_tokens(void **state)
{
    (void)state;
    assert_int_equal(parse_req(RAW("GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, CLOSE\r\n\r\n")),
                     BW_HTTP_OK);
    assert_true(head.conn_close);
    assert_int_equal(parse_req(RAW("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                                   "Upgrade: websocket\r\n\r\n")),
                     BW_HTTP_OK);
    assert_false(head.conn_close);
    assert_true(head.has_upgrade);
}

static void test_request_expect(void **state)
{
    (void)state;
    assert_int_equal(parse_req(RAW("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\n"
                                   "Content-Length: 3\r\n\r\n")),
                     BW_HTTP_OK);
    assert_true(head.expect_continue);
    assert_false(head.expect_other);
    assert_int_equal(parse_req(RAW("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n")),
                     BW_HTTP_OK);
    assert_false(head.expect_continue);
    assert_true(head.expect_other);
    assert_int_equal(parse_req(RAW("PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n")), BW_HTTP_OK);
    assert_false(head.expect_continue);
    assert_false(head.expect_other);
}

static void test_request_methods(void **state)
{
    (void)state;
    static const struct {
        const char *raw;
        bw_http_method m;
    } cases[] = {
        {"GET / HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_GET},
        {"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_HEAD},
        {"POST / HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_POST},
        {"PUT / HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_PUT},
        {"DELETE / HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_DELETE},
        {"OPTIONS / HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_OPTIONS},
        {"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_TRACE},
        {"PATCH / HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_PATCH},
        {"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_CONNECT},
        {"PROPFIND / HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_OTHER},
        {"get / HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_OTHER},
        {"M-SEARCH! / HTTP/1.1\r\nHost: a\r\n\r\n", BW_METHOD_OTHER},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(parse_req(cases[i].raw, strlen(cases[i].raw)), BW_HTTP_OK);
        assert_int_equal(head.method, cases[i].m);
    }
}

static void test_request_hosts(void **state)
{
    (void)state;
    static const char *const ok[] = {
        "Host: example.com",           "Host: example.com:80",
        "Host: 10.0.0.1:65535",        "Host: [::1]",
        "Host: [::ffff:1.2.3.4]:8080", "Host: a%2Db.example",
        "Host: xn--bcher-kva.ch",      "Host:",
    };
    char buf[256];
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        int n = snprintf(buf, sizeof(buf), "GET / HTTP/1.1\r\n%s\r\n\r\n", ok[i]);
        assert_int_equal(parse_req(buf, (size_t)n), BW_HTTP_OK);
        assert_int_equal(head.host_index, 0);
    }
}

static void test_request_obs_text_value(void **state)
{
    (void)state;
    assert_int_equal(parse_req(RAW("GET / HTTP/1.1\r\nHost: a\r\nX-Name: caf\xc3\xa9\t!\r\n\r\n")),
                     BW_HTTP_OK);
    assert_span(head.headers[1].value, head.headers[1].value_len, "caf\xc3\xa9\t!");
}

static void test_request_max_headers_exact(void **state)
{
    (void)state;
    static const char raw[] = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
    assert_int_equal(bw_http_parse_request(RAW(raw), 4, &head), BW_HTTP_OK);
    assert_int_equal(head.n_headers, 4);
    assert_int_equal(bw_http_parse_request(RAW(raw), 3, &head), BW_HTTP_HEADERS_TOO_LARGE);
    assert_string_equal(head.error, "too many header fields");
}

/* libevhtp accepts any number of headers; here the hard cap holds even if asked for more. */
static void test_request_header_hard_cap(void **state)
{
    (void)state;
    static char buf[16384];
    size_t n = (size_t)snprintf(buf, sizeof(buf), "GET / HTTP/1.1\r\nHost: a\r\n");
    for (int i = 0; i < BW_HTTP_MAX_HEADERS_HARD; i++)
        n += (size_t)snprintf(buf + n, sizeof(buf) - n, "X-%d: v\r\n", i);
    n += (size_t)snprintf(buf + n, sizeof(buf) - n, "\r\n");
    assert_int_equal(bw_http_head_length(buf, n), n);
    assert_int_equal(bw_http_parse_request(buf, n, 100000, &head), BW_HTTP_HEADERS_TOO_LARGE);
    assert_int_equal(head.n_headers, BW_HTTP_MAX_HEADERS_HARD);
}

/* ---- rejected requests, one named test per row ---- */

struct reject_case {
    const char *name;
    const char *raw;
    size_t len;
    size_t max_headers;
    bw_http_status status;
    const char *error;
};

/* clang-format off */
#define REJECT(name, raw, status, error) {name, RAW(raw), 100, status, error}
/* clang-format on */
#define H "GET / HTTP/1.1\r\nHost: a\r\n"
#define P "POST / HTTP/1.1\r\nHost: a\r\n"
#define BAD BW_HTTP_BAD_REQUEST

static const struct reject_case request_rejects[] = {
    /* the libevhtp 1.2.18 parser defects */
    REJECT("Content_Length lookalike", P "Content_Length: 5\r\n\r\n", BAD,
           "Content-Length spelled with an underscore"),
    REJECT("Transfer_Encoding lookalike", P "TRANSFER_ENCODING: chunked\r\n\r\n", BAD,
           "Transfer-Encoding spelled with an underscore"),
    REJECT("evhtp duplicate Content-Length", P "Content-Length: 5\r\nContent-Length: 50\r\n\r\n",
           BAD, "duplicate Content-Length"),
    REJECT("duplicate equal Content-Length", P "Content-Length: 5\r\nContent-Length: 5\r\n\r\n",
           BAD, "duplicate Content-Length"),
    REJECT("Content-Length list", P "Content-Length: 5, 5\r\n\r\n", BAD, "Content-Length list"),
    REJECT("evhtp TE gzip, chunked", P "Transfer-Encoding: gzip, chunked\r\n\r\n", BAD,
           "Transfer-Encoding not chunked"),
    REJECT("evhtp TE gzip, chunked with CL",
           P "Transfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n", BAD,
           "Transfer-Encoding not chunked"),
    REJECT("evhtp CL with TE", P "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", BAD,
           "Content-Length with Transfer-Encoding"),
    REJECT("TE with CL", P "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", BAD,
           "Content-Length with Transfer-Encoding"),
    REJECT("evhtp space before colon", P "Transfer-Encoding : chunked\r\n\r\n", BAD,
           "whitespace before colon"),
    REJECT("tab before colon", P "Content-Length\t: 1\r\n\r\n", BAD, "whitespace before colon"),
    REJECT("evhtp non-numeric Content-Length", P "Content-Length: abc\r\n\r\n", BAD,
           "invalid Content-Length"),
    REJECT("evhtp header count", H "A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n",
           BW_HTTP_HEADERS_TOO_LARGE, "too many header fields"),
    /* Content-Length values */
    REJECT("Content-Length sign", P "Content-Length: +5\r\n\r\n", BAD, "invalid Content-Length"),
    REJECT("Content-Length negative", P "Content-Length: -1\r\n\r\n", BAD,
           "invalid Content-Length"),
    REJECT("Content-Length inner space", P "Content-Length: 1 2\r\n\r\n", BAD,
           "invalid Content-Length"),
    REJECT("Content-Length hex", P "Content-Length: 0x10\r\n\r\n", BAD, "invalid Content-Length"),
    REJECT("Content-Length empty", P "Content-Length:  \r\n\r\n", BAD, "empty Content-Length"),
    REJECT("Content-Length 2^53+1", P "Content-Length: 9007199254740993\r\n\r\n", BAD,
           "Content-Length too large"),
    REJECT("Content-Length 2^64", P "Content-Length: 18446744073709551616\r\n\r\n", BAD,
           "Content-Length too large"),
    REJECT("Content-Length huge", P "Content-Length: 999999999999999999999999999999\r\n\r\n", BAD,
           "Content-Length too large"),
    /* Transfer-Encoding values */
    REJECT("TE chunked, chunked", P "Transfer-Encoding: chunked, chunked\r\n\r\n", BAD,
           "Transfer-Encoding not chunked"),
    REJECT("TE xchunked", P "Transfer-Encoding: xchunked\r\n\r\n", BAD,
           "Transfer-Encoding not chunked"),
    REJECT("TE chunked with parameter", P "Transfer-Encoding: chunked;q=1\r\n\r\n", BAD,
           "Transfer-Encoding not chunked"),
    REJECT("TE identity", P "Transfer-Encoding: identity\r\n\r\n", BAD,
           "Transfer-Encoding not chunked"),
    REJECT("TE empty", P "Transfer-Encoding:\r\n\r\n", BAD, "empty Transfer-Encoding"),
    REJECT("TE twice", P "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", BAD,
           "duplicate Transfer-Encoding"),
    REJECT("TE in HTTP/1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", BAD,
           "Transfer-Encoding in HTTP/1.0"),
    /* field syntax */
    REJECT("empty field name", H ": v\r\n\r\n", BAD, "empty field name"),
    REJECT("invalid field name", H "X(y): v\r\n\r\n", BAD, "invalid field name"),
    REJECT("field name with obs-text", H "X\xc3\xa9: v\r\n\r\n", BAD, "invalid field name"),
    REJECT("field line without colon", H "NoColon\r\n\r\n", BAD, "field line without colon"),
    REJECT("NUL in value", H "X: a\0b\r\n\r\n", BAD, "invalid byte in field value"),
    REJECT("DEL in value", H "X: a\x7f\r\n\r\n", BAD, "invalid byte in field value"),
    REJECT("vertical tab in value", H "X: a\vb\r\n\r\n", BAD, "invalid byte in field value"),
    REJECT("bare CR in value", H "X: a\rb\r\n\r\n", BAD, "bare CR"),
    REJECT("bare LF line end", H "X: a\nY: b\r\n\r\n", BAD, "bare LF"),
    REJECT("bare LF request line", "GET / HTTP/1.1\nHost: a\r\n\r\n", BAD, "bare LF"),
    REJECT("bare CR request line", "GET / HTTP/1.1\rHost: a\r\n\r\n", BAD, "bare CR"),
    REJECT("obs-fold", H "X: a\r\n b\r\n\r\n", BAD, "obs-fold"),
    REJECT("obs-fold tab", H "X: a\r\n\tb\r\n\r\n", BAD, "obs-fold"),
    REJECT("whitespace before first field", "GET / HTTP/1.1\r\n Host: a\r\n\r\n", BAD,
           "whitespace before first field"),
    REJECT("incomplete head", H, BAD, "incomplete head"),
    REJECT("bytes after head", H "\r\nX", BAD, "bytes after head"),
    /* Host */
    REJECT("missing Host", "GET / HTTP/1.1\r\nX: a\r\n\r\n", BAD, "missing Host"),
    REJECT("duplicate Host", H "Host: b\r\n\r\n", BAD, "duplicate Host"),
    REJECT("duplicate Host 1.0", "GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n", BAD,
           "duplicate Host"),
    REJECT("Host with space", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", BAD, "invalid Host"),
    REJECT("Host with slash", "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", BAD, "invalid Host"),
    REJECT("Host with userinfo", "GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", BAD, "invalid Host"),
    REJECT("Host empty port", "GET / HTTP/1.1\r\nHost: a:\r\n\r\n", BAD, "invalid Host"),
    REJECT("Host big port", "GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n", BAD, "invalid Host"),
    REJECT("Host port letters", "GET / HTTP/1.1\r\nHost: a:8o\r\n\r\n", BAD, "invalid Host"),
    REJECT("Host unclosed IPv6", "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", BAD, "invalid Host"),
    REJECT("Host only port", "GET / HTTP/1.1\r\nHost: :80\r\n\r\n", BAD, "invalid Host"),
    REJECT("Host bad pct", "GET / HTTP/1.1\r\nHost: a%zz\r\n\r\n", BAD, "invalid Host"),
    /* request line */
    REJECT("empty method", " / HTTP/1.1\r\nHost: a\r\n\r\n", BAD, "invalid method"),
    REJECT("method with separator", "GE(T / HTTP/1.1\r\nHost: a\r\n\r\n", BAD, "invalid method"),
    REJECT("tab after method", "GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", BAD, "invalid method"),
    REJECT("two spaces", "GET  / HTTP/1.1\r\nHost: a\r\n\r\n", BAD, "invalid request-target"),
    REJECT("HTTP/0.9 line", "GET /\r\nHost: a\r\n\r\n", BAD, "invalid request-target"),
    REJECT("target with DEL", "GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", BAD,
           "invalid request-target"),
    REJECT("target with obs-text", "GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", BAD,
           "invalid request-target"),
    REJECT("relative target", "GET a/b HTTP/1.1\r\nHost: a\r\n\r\n", BAD, "invalid request-target"),
    REJECT("authority-form without CONNECT", "GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n", BAD,
           "invalid request-target"),
    REJECT("absolute-form other scheme", "GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", BAD,
           "invalid request-target"),
    REJECT("absolute-form empty authority", "GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", BAD,
           "invalid request-target"),
    REJECT("absolute-form userinfo", "GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", BAD,
           "invalid request-target"),
    REJECT("asterisk without OPTIONS", "GET * HTTP/1.1\r\nHost: a\r\n\r\n", BAD,
           "asterisk-form without OPTIONS"),
    REJECT("CONNECT origin-form", "CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n", BAD,
           "CONNECT without authority-form"),
    REJECT("CONNECT without port", "CONNECT a HTTP/1.1\r\nHost: a\r\n\r\n", BAD,
           "CONNECT without authority-form"),
    REJECT("lower-case version", "GET / http/1.1\r\nHost: a\r\n\r\n", BAD, "invalid HTTP version"),
    REJECT("version garbage", "GET / HTTP/1.1x\r\nHost: a\r\n\r\n", BAD, "invalid HTTP version"),
    REJECT("version short", "GET / HTTP/1\r\nHost: a\r\n\r\n", BAD, "invalid HTTP version"),
    REJECT("space after version", "GET / HTTP/1.1 \r\nHost: a\r\n\r\n", BAD,
           "invalid HTTP version"),
    REJECT("space before version", "GET /  HTTP/1.1\r\nHost: a\r\n\r\n", BAD,
           "invalid HTTP version"),
    REJECT("HTTP/2.0", "GET / HTTP/2.0\r\nHost: a\r\n\r\n", BW_HTTP_VERSION_NOT_SUPPORTED,
           "unsupported HTTP version"),
    REJECT("HTTP/1.2", "GET / HTTP/1.2\r\nHost: a\r\n\r\n", BW_HTTP_VERSION_NOT_SUPPORTED,
           "unsupported HTTP version"),
    REJECT("HTTP/10.0", "GET / HTTP/10.0\r\nHost: a\r\n\r\n", BAD, "invalid HTTP version"),
};

static void run_request_reject(void **state)
{
    const struct reject_case *rc = *state;
    size_t max = rc->max_headers;
    if (strncmp(rc->name, "evhtp header count", 18) == 0)
        max = 4; /* Host + A..C fit; D is one too many */
    assert_int_equal(bw_http_parse_request(rc->raw, rc->len, max, &head), rc->status);
    assert_non_null(head.error);
    assert_string_equal(head.error, rc->error);
}

static void test_request_lf_only_head(void **state)
{
    (void)state;
    /* LF LF is not a head end: head_length keeps waiting, and the parser refuses bare LF. */
    static const char raw[] = "GET / HTTP/1.1\nHost: a\n\n";
    assert_int_equal(bw_http_head_length(RAW(raw)), 0);
    assert_int_equal(bw_http_parse_request(RAW(raw), 100, &head), BW_HTTP_BAD_REQUEST);
    assert_string_equal(head.error, "bare LF");
}

static void test_request_null_and_empty(void **state)
{
    (void)state;
    assert_int_equal(bw_http_parse_request(NULL, 0, 100, &head), BW_HTTP_BAD_REQUEST);
    assert_int_equal(bw_http_parse_request("", 0, 100, &head), BW_HTTP_BAD_REQUEST);
    assert_int_equal(bw_http_parse_request("\r\n\r\n", 4, 100, &head), BW_HTTP_BAD_REQUEST);
    assert_int_equal(bw_http_head_length(NULL, 0), 0);
}

/* ---- responses ---- */

static void test_response_content_length(void **state)
{
    (void)state;
    assert_int_equal(
        parse_resp(RAW("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"), BW_METHOD_GET),
        BW_HTTP_OK);
    assert_int_equal(head.status, 200);
    assert_span(head.reason, head.reason_len, "OK");
    assert_int_equal(head.framing, BW_BODY_LENGTH);
    assert_int_equal(head.content_length, 12);
    assert_false(head.conn_close);
}

static void test_response_close_delimited(void **state)
{
    (void)state;
    assert_int_equal(parse_resp(RAW("HTTP/1.1 200 OK\r\nX: y\r\n\r\n"), BW_METHOD_GET), BW_HTTP_OK);
    assert_int_equal(head.framing, BW_BODY_CLOSE);
    assert_int_equal(parse_resp(RAW("HTTP/1.0 200 OK\r\n\r\n"), BW_METHOD_GET), BW_HTTP_OK);
    assert_int_equal(head.framing, BW_BODY_CLOSE);
    assert_true(head.conn_close);
    assert_int_equal(head.version_minor, 0);
}

static void test_response_chunked(void **state)
{
    (void)state;
    assert_int_equal(parse_resp(RAW("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                    "Connection: keep-alive\r\n\r\n"),
                                BW_METHOD_POST),
                     BW_HTTP_OK);
    assert_int_equal(head.framing, BW_BODY_CHUNKED);
    assert_true(head.conn_keep_alive);
}

static void test_response_no_body_statuses(void **state)
{
    (void)state;
    static const char *const raws[] = {
        "HTTP/1.1 100 Continue\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n",
        "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n",
        "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof(raws) / sizeof(raws[0]); i++) {
        assert_int_equal(parse_resp(raws[i], strlen(raws[i]), BW_METHOD_GET), BW_HTTP_OK);
        assert_int_equal(head.framing, BW_BODY_NONE);
    }
}

static void test_response_to_head(void **state)
{
    (void)state;
    assert_int_equal(
        parse_resp(RAW("HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"), BW_METHOD_HEAD),
        BW_HTTP_OK);
    assert_int_equal(head.framing, BW_BODY_NONE);
    assert_int_equal(
        parse_resp(RAW("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), BW_METHOD_HEAD),
        BW_HTTP_OK);
    assert_int_equal(head.framing, BW_BODY_NONE);
}

static void test_response_to_connect(void **state)
{
    (void)state;
    assert_int_equal(
        parse_resp(RAW("HTTP/1.1 200 Connection established\r\n\r\n"), BW_METHOD_CONNECT),
        BW_HTTP_OK);
    assert_int_equal(head.framing, BW_BODY_NONE);
    assert_int_equal(
        parse_resp(RAW("HTTP/1.1 407 Auth\r\nContent-Length: 2\r\n\r\n"), BW_METHOD_CONNECT),
        BW_HTTP_OK);
    assert_int_equal(head.framing, BW_BODY_LENGTH);
}

static void test_response_reason_forms(void **state)
{
    (void)state;
    assert_int_equal(parse_resp(RAW("HTTP/1.1 200\r\n\r\n"), BW_METHOD_GET), BW_HTTP_OK);
    assert_int_equal(head.reason_len, 0);
    assert_int_equal(parse_resp(RAW("HTTP/1.1 404 \r\n\r\n"), BW_METHOD_GET), BW_HTTP_OK);
    assert_int_equal(head.status, 404);
    assert_int_equal(head.reason_len, 0);
    assert_int_equal(parse_resp(RAW("HTTP/1.1 500 Fa\xc3\xafl \tnow\r\n\r\n"), BW_METHOD_GET),
                     BW_HTTP_OK);
    assert_span(head.reason, head.reason_len, "Fa\xc3\xafl \tnow");
}

static const struct reject_case response_rejects[] = {
    REJECT("resp duplicate CL", "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
           BAD, "duplicate Content-Length"),
    REJECT("resp duplicate CL on 204",
           "HTTP/1.1 204 OK\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n", BAD,
           "duplicate Content-Length"),
    REJECT("resp CL with TE",
           "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", BAD,
           "Content-Length with Transfer-Encoding"),
    REJECT("resp TE gzip", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", BAD,
           "Transfer-Encoding not chunked"),
    REJECT("resp TE on 1.0", "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", BAD,
           "Transfer-Encoding in HTTP/1.0"),
    REJECT("resp bad CL", "HTTP/1.1 200 OK\r\nContent-Length: 1a\r\n\r\n", BAD,
           "invalid Content-Length"),
    REJECT("resp two-digit status", "HTTP/1.1 20 OK\r\n\r\n", BAD, "invalid status code"),
    REJECT("resp four-digit status", "HTTP/1.1 2000 OK\r\n\r\n", BAD, "invalid status line"),
    REJECT("resp status 099", "HTTP/1.1 099 OK\r\n\r\n", BAD, "invalid status code"),
    REJECT("resp status 600", "HTTP/1.1 600 OK\r\n\r\n", BAD, "invalid status code"),
    REJECT("resp HTTP/2", "HTTP/2 200 OK\r\n\r\n", BAD, "invalid HTTP version"),
    REJECT("resp HTTP/1.2", "HTTP/1.2 200 OK\r\n\r\n", BAD, "invalid HTTP version"),
    REJECT("resp lower-case", "http/1.1 200 OK\r\n\r\n", BAD, "invalid HTTP version"),
    REJECT("resp two spaces", "HTTP/1.1  200 OK\r\n\r\n", BAD, "invalid status code"),
    REJECT("resp bare LF", "HTTP/1.1 200 OK\nX: y\r\n\r\n", BAD, "bare LF"),
    REJECT("resp NUL in reason", "HTTP/1.1 200 O\0K\r\n\r\n", BAD, "invalid status line"),
    REJECT("resp obs-fold", "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", BAD, "obs-fold"),
    REJECT("resp space before colon", "HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\n", BAD,
           "whitespace before colon"),
    REJECT("resp leading empty line", "\r\nHTTP/1.1 200 OK\r\n\r\n", BAD, "invalid HTTP version"),
    REJECT("resp too many headers",
           "HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n", BAD,
           "too many header fields"),
};

static void run_response_reject(void **state)
{
    const struct reject_case *rc = *state;
    size_t max = strcmp(rc->name, "resp too many headers") == 0 ? 4 : rc->max_headers;
    assert_int_equal(bw_http_parse_response(rc->raw, rc->len, max, BW_METHOD_GET, &head),
                     rc->status);
    assert_non_null(head.error);
    assert_string_equal(head.error, rc->error);
}

/* ---- head_length ---- */

static void test_head_length_basic(void **state)
{
    (void)state;
    assert_int_equal(bw_http_head_length(RAW("")), 0);
    assert_int_equal(bw_http_head_length(RAW("GET / HTTP/1.0\r\n\r\n")), 18);
    assert_int_equal(bw_http_head_length(RAW("GET / HTTP/1.0\r\n\r")), 0);
    assert_int_equal(bw_http_head_length(RAW("GET / HTTP/1.0\r\n\n")), 0);
    assert_int_equal(bw_http_head_length(RAW("GET / HTTP/1.0\n\r\n")), 0);
    /* pipelined: only the first head */
    assert_int_equal(bw_http_head_length(RAW("GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n")), 18);
}

static void test_head_length_empty_lines(void **state)
{
    (void)state;
    /* empty lines alone are not a head, whatever their number */
    assert_int_equal(bw_http_head_length(RAW("\r\n")), 0);
    assert_int_equal(bw_http_head_length(RAW("\r\n\r\n")), 0);
    assert_int_equal(bw_http_head_length(RAW("\r\n\r\n\r\n\r")), 0);
    assert_int_equal(bw_http_head_length(RAW("\r\n\r\nGET / HTTP/1.0\r\n\r\n")), 22);
    /* a stray CR is not an empty line: the head starts there and the parser refuses it */
    assert_int_equal(bw_http_head_length(RAW("\rGET / HTTP/1.0\r\n\r\n")), 19);
    assert_int_equal(bw_http_parse_request(RAW("\rGET / HTTP/1.0\r\n\r\n"), 100, &head),
                     BW_HTTP_BAD_REQUEST);
}

static void test_head_length_prefixes(void **state)
{
    (void)state;
    static const char raw[] = "\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
    size_t full = bw_http_head_length(RAW(raw));
    assert_int_equal(full, sizeof(raw) - 1 - 3);
    for (size_t k = 0; k <= sizeof(raw) - 1; k++) {
        char *copy = malloc(k + 1);
        assert_non_null(copy);
        memcpy(copy, raw, k);
        assert_int_equal(bw_http_head_length(copy, k), k >= full ? full : 0);
        free(copy);
    }
}

/* ---- helpers ---- */

static void test_name_eq(void **state)
{
    (void)state;
    assert_true(bw_http_name_eq("Content-Length", 14, "content-length"));
    assert_true(bw_http_name_eq("HOST", 4, "host"));
    assert_false(bw_http_name_eq("Host", 4, "hos"));
    assert_false(bw_http_name_eq("Hos", 3, "host"));
    assert_false(bw_http_name_eq("Hosu", 4, "host"));
    assert_true(bw_http_name_eq("", 0, ""));
}

static void test_list_has(void **state)
{
    (void)state;
    static const char v[] = "keep-alive ,\tUpgrade, , close";
    assert_true(bw_http_list_has(RAW(v), "close"));
    assert_true(bw_http_list_has(RAW(v), "upgrade"));
    assert_true(bw_http_list_has(RAW(v), "Keep-Alive"));
    assert_false(bw_http_list_has(RAW(v), "clos"));
    assert_false(bw_http_list_has(RAW("closed"), "close"));
    assert_false(bw_http_list_has(RAW(""), "close"));
}

static void test_method_idempotent(void **state)
{
    (void)state;
    assert_true(bw_http_method_idempotent(BW_METHOD_GET));
    assert_true(bw_http_method_idempotent(BW_METHOD_HEAD));
    assert_true(bw_http_method_idempotent(BW_METHOD_OPTIONS));
    assert_true(bw_http_method_idempotent(BW_METHOD_TRACE));
    assert_true(bw_http_method_idempotent(BW_METHOD_PUT));
    assert_true(bw_http_method_idempotent(BW_METHOD_DELETE));
    assert_false(bw_http_method_idempotent(BW_METHOD_POST));
    assert_false(bw_http_method_idempotent(BW_METHOD_PATCH));
    assert_false(bw_http_method_idempotent(BW_METHOD_CONNECT));
    assert_false(bw_http_method_idempotent(BW_METHOD_OTHER));
}

static void test_reason(void **state)
{
    (void)state;
    assert_string_equal(bw_http_reason(200), "OK");
    assert_string_equal(bw_http_reason(429), "Too Many Requests");
    assert_string_equal(bw_http_reason(431), "Request Header Fields Too Large");
    assert_string_equal(bw_http_reason(502), "Bad Gateway");
    assert_string_equal(bw_http_reason(503), "Service Unavailable");
    assert_string_equal(bw_http_reason(504), "Gateway Timeout");
    assert_string_equal(bw_http_reason(299), "Unknown");
    assert_string_equal(bw_http_reason(-1), "Unknown");
}

/* ---- chunked bodies ---- */

struct chunk_result {
    size_t consumed;
    bw_chunked_state state;
    const char *error;
    char data[32768];
    size_t data_len;
};

static void collect(void *arg, const char *data, size_t len)
{
    struct chunk_result *r = arg;
    assert_true(len > 0);
    assert_true(r->data_len + len <= sizeof(r->data));
    memcpy(r->data + r->data_len, data, len);
    r->data_len += len;
}

/* Feeds one piece from its own exact-size allocation, so a read past it is caught by ASan. */
static void feed_piece(bw_chunked *c, struct chunk_result *r, const char *p, size_t len)
{
    if (c->state == BW_CHUNK_DONE || c->state == BW_CHUNK_ERROR)
        return;
    char *copy = malloc(len ? len : 1);
    assert_non_null(copy);
    memcpy(copy, p, len);
    size_t used = bw_chunked_feed(c, copy, len, collect, r);
    assert_true(used <= len);
    if (c->state != BW_CHUNK_DONE && c->state != BW_CHUNK_ERROR)
        assert_int_equal(used, len); /* an unfinished body takes every byte */
    r->consumed += used;
    free(copy);
}

static void finish(bw_chunked *c, struct chunk_result *r)
{
    r->state = c->state;
    r->error = c->error;
}

static struct chunk_result one, other;

/* Runs a sample in one piece, at every two-piece split and byte by byte; all must agree. */
static void run_chunked(const char *raw, size_t len)
{
    bw_chunked c;
    memset(&one, 0, sizeof(one));
    bw_chunked_init(&c);
    feed_piece(&c, &one, raw, len);
    finish(&c, &one);

    for (size_t split = 0; split <= len + 1; split++) {
        memset(&other, 0, offsetof(struct chunk_result, data));
        other.data_len = 0;
        bw_chunked_init(&c);
        if (split <= len) {
            feed_piece(&c, &other, raw, split);
            feed_piece(&c, &other, raw + split, len - split);
        } else {
            for (size_t i = 0; i < len; i++)
                feed_piece(&c, &other, raw + i, 1);
        }
        finish(&c, &other);
        assert_int_equal(other.consumed, one.consumed);
        assert_int_equal(other.state, one.state);
        assert_ptr_equal(other.error, one.error);
        assert_int_equal(other.data_len, one.data_len);
        assert_memory_equal(other.data, one.data, one.data_len);
    }
}

static void expect_chunked_ok(const char *raw, size_t len, size_t body_len, const char *data)
{
    run_chunked(raw, len);
    assert_int_equal(one.state, BW_CHUNK_DONE);
    assert_null(one.error);
    assert_int_equal(one.consumed, body_len);
    assert_int_equal(one.data_len, strlen(data));
    assert_memory_equal(one.data, data, one.data_len);
}

static void expect_chunked_error(const char *raw, size_t len, const char *error)
{
    run_chunked(raw, len);
    assert_int_equal(one.state, BW_CHUNK_ERROR);
    assert_non_null(one.error);
    assert_string_equal(one.error, error);
}

static void test_chunked_simple(void **state)
{
    (void)state;
    expect_chunked_ok(RAW("5\r\nhello\r\n0\r\n\r\n"), 15, "hello");
    expect_chunked_ok(RAW("0\r\n\r\n"), 5, "");
}

static void test_chunked_multi(void **state)
{
    (void)state;
    expect_chunked_ok(RAW("3\r\nabc\r\nA\r\n0123456789\r\n1\r\n!\r\n0\r\n\r\n"), 34,
                      "abc0123456789!");
    expect_chunked_ok(RAW("0005\r\nhello\r\n000\r\n\r\n"), 20, "hello");
    expect_chunked_ok(RAW("a\r\n\r\n\r\n\r\n\r\n\r\n\r\n0\r\n\r\n"), 20, "\r\n\r\n\r\n\r\n\r\n");
}

static void test_chunked_extensions(void **state)
{
    (void)state;
    static const char raw[] = "5;foo=bar;baz ; q=\"a\\\"b; c\"\r\nhello\r\n"
                              "2 ;x = \"\"\t;y\r\nhi\r\n0;last\r\n\r\n";
    expect_chunked_ok(RAW(raw), sizeof(raw) - 1, "hellohi");
}

static void test_chunked_trailers(void **state)
{
    (void)state;
    static const char raw[] = "2\r\nok\r\n0\r\nX-Checksum: abc \t\r\nY:\r\nZ: caf\xc3\xa9\r\n\r\n";
    expect_chunked_ok(RAW(raw), sizeof(raw) - 1, "ok");
}

static void test_chunked_stops_at_end(void **state)
{
    (void)state;
    /* pipelined bytes after the body are not consumed */
    static const char raw[] = "1\r\nx\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
    expect_chunked_ok(RAW(raw), 11, "x");
    /* a finished decoder takes nothing more */
    bw_chunked c;
    bw_chunked_init(&c);
    assert_int_equal(bw_chunked_feed(&c, RAW("0\r\n\r\n"), NULL, NULL), 5);
    assert_int_equal(c.state, BW_CHUNK_DONE);
    assert_int_equal(bw_chunked_feed(&c, RAW("0\r\n\r\n"), NULL, NULL), 0);
}

static void test_chunked_limits_accepted(void **state)
{
    (void)state;
    /* exactly 2^62 and 16 digits are still accepted */
    bw_chunked c;
    bw_chunked_init(&c);
    assert_int_equal(bw_chunked_feed(&c, RAW("4000000000000000\r\nab"), NULL, NULL), 20);
    assert_int_equal(c.state, BW_CHUNK_DATA);
    assert_true(c.remaining == BW_CHUNK_MAX_SIZE - 2);
    bw_chunked_init(&c);
    assert_int_equal(bw_chunked_feed(&c, RAW("000000000000000f\r\n"), NULL, NULL), 18);
    assert_int_equal(c.state, BW_CHUNK_DATA);
}

static void test_chunked_size_errors(void **state)
{
    (void)state;
    expect_chunked_error(RAW("-5\r\n"), "invalid chunk size");
    expect_chunked_error(RAW("\r\n"), "invalid chunk size");
    expect_chunked_error(RAW("0x5\r\n"), "invalid chunk size");
    expect_chunked_error(RAW("5g\r\n"), "invalid chunk size");
    expect_chunked_error(RAW(" 5\r\n"), "invalid chunk size");
    /* libevhtp accumulates chunk sizes without an overflow check */
    expect_chunked_error(RAW("10000000000000005\r\nhello\r\n0\r\n\r\n"), "chunk size too long");
    expect_chunked_error(RAW("FFFFFFFFFFFFFFFF\r\n"), "chunk size too large");
    expect_chunked_error(RAW("4000000000000001\r\n"), "chunk size too large");
    expect_chunked_error(RAW("00000000000000001\r\n"), "chunk size too long");
}

static void test_chunked_line_errors(void **state)
{
    (void)state;
    expect_chunked_error(RAW("5\nhello\r\n"), "bare LF in chunk size line");
    expect_chunked_error(RAW("5\rhello\r\n"), "bare CR in chunk size line");
    expect_chunked_error(RAW("5 \r\nhello\r\n"), "invalid chunk extension");
    expect_chunked_error(RAW("5;\r\nhello\r\n"), "invalid chunk extension");
    expect_chunked_error(RAW("5;a=\r\nhello\r\n"), "invalid chunk extension");
    expect_chunked_error(RAW("5;a b\r\nhello\r\n"), "invalid chunk extension");
    expect_chunked_error(RAW("5;a=\"x\ny\"\r\n"), "bare LF in chunk size line");
    expect_chunked_error(RAW("5;a=\"x\0y\"\r\n"), "invalid chunk extension");
    expect_chunked_error(RAW("5;a=\"x\"y\r\n"), "invalid chunk extension");
    expect_chunked_error(RAW("5;a=(b)\r\n"), "invalid chunk extension");
    expect_chunked_error(RAW("5;a\r\r\n"), "bare CR in chunk size line");
}

static void test_chunked_data_errors(void **state)
{
    (void)state;
    expect_chunked_error(RAW("5\r\nhelloX\r\n0\r\n\r\n"), "missing CRLF after chunk data");
    expect_chunked_error(RAW("5\r\nhello\n0\r\n\r\n"), "missing CRLF after chunk data");
    expect_chunked_error(RAW("5\r\nhello\r0\r\n\r\n"), "bare CR after chunk data");
    expect_chunked_error(RAW("3\r\nhello\r\n0\r\n\r\n"), "missing CRLF after chunk data");
}

static void test_chunked_trailer_errors(void **state)
{
    (void)state;
    expect_chunked_error(RAW("0\r\nX: a\r\n b\r\n\r\n"), "obs-fold in trailer");
    expect_chunked_error(RAW("0\r\nX: a\n\r\n"), "bare LF in trailer");
    expect_chunked_error(RAW("0\r\n\n"), "bare LF in trailer");
    expect_chunked_error(RAW("0\r\nBad Name: a\r\n\r\n"), "invalid trailer field name");
    expect_chunked_error(RAW("0\r\n: a\r\n\r\n"), "invalid trailer field name");
    expect_chunked_error(RAW("0\r\nNoColon\r\n\r\n"), "invalid trailer field name");
    expect_chunked_error(RAW("0\r\nX: a\0\r\n\r\n"), "invalid byte in trailer field");
    expect_chunked_error(RAW("0\r\nX: a\rb\r\n\r\n"), "bare CR in trailer");
    expect_chunked_error(RAW("0\r\n\rX"), "bare CR in trailer");
}

static void test_chunked_bounds(void **state)
{
    (void)state;
    static char raw[24000];
    /* a size line with a 5000-byte extension */
    size_t n = (size_t)snprintf(raw, sizeof(raw), "1;x=");
    memset(raw + n, 'a', 5000);
    n += 5000;
    n += (size_t)snprintf(raw + n, sizeof(raw) - n, "\r\nz\r\n0\r\n\r\n");
    bw_chunked c;
    bw_chunked_init(&c);
    size_t used = bw_chunked_feed(&c, raw, n, NULL, NULL);
    assert_int_equal(c.state, BW_CHUNK_ERROR);
    assert_string_equal(c.error, "chunk size line too long");
    assert_int_equal(used, BW_CHUNK_MAX_LINE);

    /* a trailer section above 16 KiB */
    n = (size_t)snprintf(raw, sizeof(raw), "0\r\n");
    while (n < 20000)
        n += (size_t)snprintf(raw + n, sizeof(raw) - n, "X-Trailer: 0123456789abcdef\r\n");
    n += (size_t)snprintf(raw + n, sizeof(raw) - n, "\r\n");
    expect_chunked_error(raw, n, "trailer section too large");
}

static void test_chunked_error_is_sticky(void **state)
{
    (void)state;
    bw_chunked c;
    bw_chunked_init(&c);
    assert_int_equal(bw_chunked_feed(&c, RAW("5\r\nhelloXX"), NULL, NULL), 8);
    assert_int_equal(c.state, BW_CHUNK_ERROR);
    assert_int_equal(bw_chunked_feed(&c, RAW("\r\n0\r\n\r\n"), NULL, NULL), 0);
    assert_int_equal(c.state, BW_CHUNK_ERROR);
}

/* The resumable scanner: every way of feeding a head in two calls gives the one-call answer. */
static void expect_scan(const char *raw, size_t len, size_t want)
{
    size_t scanned = 0;
    assert_int_equal(bw_http_head_scan(raw, len, &scanned), want);
    for (size_t cut = 0; cut <= len; cut++) {
        scanned = 0;
        size_t first = bw_http_head_scan(raw, cut, &scanned);
        if (first != 0) {
            assert_int_equal(first, want); /* complete within the first part already */
            continue;
        }
        assert_true(scanned <= cut);
        assert_int_equal(bw_http_head_scan(raw, len, &scanned), want);
    }
}

static void test_head_scan(void **state)
{
    (void)state;
    const char *get = "GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
    expect_scan(get, strlen(get), strlen(get) - 4);
    const char *resp = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    expect_scan(resp, strlen(resp), strlen(resp));
    /* a bare LF blank line ends the search too: the parser refuses it at once */
    const char *lf = "GET / HTTP/1.1\nHost: a\n\nX";
    expect_scan(lf, strlen(lf), strlen(lf) - 1);
    /* no blank line yet */
    const char *part = "GET / HTTP/1.1\r\nHost: a\r\n";
    expect_scan(part, strlen(part), 0);
    const char *crs = "\r\r\r\r\r\r";
    expect_scan(crs, strlen(crs), 0);
    size_t scanned = 0;
    assert_int_equal(bw_http_head_scan(NULL, 0, &scanned), 0);
    assert_int_equal(scanned, 0);
    /* a long line is searched once: scanned advances to the end */
    char big[70000];
    memset(big, 'a', sizeof(big));
    assert_int_equal(bw_http_head_scan(big, sizeof(big), &scanned), 0);
    assert_int_equal(scanned, sizeof(big));
    /* and a blank line cut across calls ("\r\n" | "\r\n") is still found */
    char split[] = "GET / HTTP/1.1\r\nA: b\r\n\r\n";
    size_t n = strlen(split);
    scanned = 0;
    assert_int_equal(bw_http_head_scan(split, n - 2, &scanned), 0);
    assert_int_equal(bw_http_head_scan(split, n, &scanned), n);
}

#define T(f) cmocka_unit_test(f)

int main(void)
{
    static const struct CMUnitTest fixed[] = {
        T(test_request_origin_form),
        T(test_head_scan),
        T(test_request_leading_empty_lines),
        T(test_request_absolute_form),
        T(test_request_asterisk_form),
        T(test_request_authority_form),
        T(test_request_content_length),
        T(test_request_content_length_limit),
        T(test_request_chunked),
        T(test_request_http10),
        T(test_request_connection_tokens),
        T(test_request_expect),
        T(test_request_methods),
        T(test_request_hosts),
        T(test_request_obs_text_value),
        T(test_request_max_headers_exact),
        T(test_request_header_hard_cap),
        T(test_request_lf_only_head),
        T(test_request_null_and_empty),
        T(test_response_content_length),
        T(test_response_close_delimited),
        T(test_response_chunked),
        T(test_response_no_body_statuses),
        T(test_response_to_head),
        T(test_response_to_connect),
        T(test_response_reason_forms),
        T(test_head_length_basic),
        T(test_head_length_empty_lines),
        T(test_head_length_prefixes),
        T(test_name_eq),
        T(test_list_has),
        T(test_method_idempotent),
        T(test_reason),
        T(test_chunked_simple),
        T(test_chunked_multi),
        T(test_chunked_extensions),
        T(test_chunked_trailers),
        T(test_chunked_stops_at_end),
        T(test_chunked_limits_accepted),
        T(test_chunked_size_errors),
        T(test_chunked_line_errors),
        T(test_chunked_data_errors),
        T(test_chunked_trailer_errors),
        T(test_chunked_bounds),
        T(test_chunked_error_is_sticky),
    };
    enum {
        N_FIXED = sizeof(fixed) / sizeof(fixed[0]),
        N_REQ = sizeof(request_rejects) / sizeof(request_rejects[0]),
        N_RESP = sizeof(response_rejects) / sizeof(response_rejects[0]),
    };
    static struct CMUnitTest all[N_FIXED + N_REQ + N_RESP];
    size_t n = 0;
    for (size_t i = 0; i < N_FIXED; i++)
        all[n++] = fixed[i];
    for (size_t i = 0; i < N_REQ; i++) {
        struct CMUnitTest t = {request_rejects[i].name, run_request_reject, NULL, NULL,
                               (void *)&request_rejects[i]};
        all[n++] = t;
    }
    for (size_t i = 0; i < N_RESP; i++) {
        struct CMUnitTest t = {response_rejects[i].name, run_response_reject, NULL, NULL,
                               (void *)&response_rejects[i]};
        all[n++] = t;
    }
    return _cmocka_run_group_tests("http", all, n, NULL, NULL);
}
