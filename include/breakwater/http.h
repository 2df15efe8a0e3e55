/*
 * HTTP/1.x message heads and body framing: strict, allocation-free parsing.
 *
 * Everything here is a pure function over bytes. The proxy hands a complete head (request line
 * or status line, header lines, empty line) to bw_http_parse_request()/bw_http_parse_response();
 * the parser validates it against RFC 9110/9112 strictly and decides the body framing, refusing
 * anything a smuggling attack could exploit (conflicting Content-Length, Transfer-Encoding other
 * than exactly "chunked", CL with TE, TE on HTTP/1.0, invalid names or bytes, bare CR, obs-fold,
 * missing or repeated Host). Header name/value pointers point into the caller's buffer.
 * bw_chunked_* validates a chunked body incrementally, byte by byte, across any split.
 */
#ifndef BREAKWATER_HTTP_H
#define BREAKWATER_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BW_HTTP_MAX_HEADERS_HARD 256

/* Largest Content-Length accepted (2^53, 8 PiB): exact in a double, so logs, JSON and metrics
 * show it unchanged, and far enough below 2^64 that no sum of lengths can wrap. */
#define BW_HTTP_MAX_CONTENT_LENGTH (UINT64_C(1) << 53)
/* Largest chunk-size accepted (2^62), and at most 16 hex digits, so the decoder cannot overflow. */
#define BW_CHUNK_MAX_SIZE (UINT64_C(1) << 62)
#define BW_CHUNK_MAX_SIZE_DIGITS 16
/* Bound on one chunk-size line including its extensions, and on the whole trailer section. */
#define BW_CHUNK_MAX_LINE 4096
#define BW_CHUNK_MAX_TRAILER 16384

typedef struct bw_http_header {
    const char *name;
    size_t name_len;
    const char *value; /* leading and trailing OWS removed */
    size_t value_len;
} bw_http_header;

typedef enum bw_http_method {
    BW_METHOD_OTHER = 0,
    BW_METHOD_GET,
    BW_METHOD_HEAD,
    BW_METHOD_POST,
    BW_METHOD_PUT,
    BW_METHOD_DELETE,
    BW_METHOD_OPTIONS,
    BW_METHOD_TRACE,
    BW_METHOD_PATCH,
    BW_METHOD_CONNECT,
} bw_http_method;

typedef enum bw_body_framing {
    BW_BODY_NONE = 0,   /* no body at all */
    BW_BODY_LENGTH = 1, /* exactly content_length bytes */
    BW_BODY_CHUNKED = 2,
    BW_BODY_CLOSE = 3, /* responses only: until the connection closes */
} bw_body_framing;

/* Result of parsing a head. Positive codes are the HTTP status the proxy should answer with. */
typedef enum bw_http_status {
    BW_HTTP_OK = 0,
    BW_HTTP_BAD_REQUEST = 400,
    BW_HTTP_HEADERS_TOO_LARGE = 431,
    BW_HTTP_NOT_IMPLEMENTED = 501, /* unknown transfer coding we can't forward safely */
    BW_HTTP_VERSION_NOT_SUPPORTED = 505,
} bw_http_status;

typedef struct bw_http_head {
    /* request */
    bw_http_method method;
    const char *method_str;
    size_t method_len;
    const char *target; /* request-target as sent */
    size_t target_len;
    /* response */
    int status;
    const char *reason;
    size_t reason_len;
    /* both */
    int version_minor; /* 0 or 1 (HTTP/1.x only) */
    bw_http_header headers[BW_HTTP_MAX_HEADERS_HARD];
    size_t n_headers;
    bw_body_framing framing;
    uint64_t content_length; /* when framing == BW_BODY_LENGTH */
    int host_index;          /* index of the Host header, or -1 */
    bool conn_close;         /* "Connection: close" present (or HTTP/1.0 without keep-alive) */
    bool conn_keep_alive;    /* "Connection: keep-alive" present */
    bool expect_continue;    /* "Expect: 100-continue" */
    bool expect_other;       /* an Expect value other than 100-continue (answer 417) */
    bool has_upgrade;        /* Upgrade header present */
    const char *error;       /* on failure, a short static reason for the error log */
} bw_http_head;

/*
 * Finds the end of a head in buf: returns the length including the final CRLF CRLF (or LF LF
 * is NOT accepted), or 0 when more bytes are needed. Leading empty lines before a request line
 * (RFC 9112 2.2) are counted in the returned length and skipped by the parser.
 */
size_t bw_http_head_length(const char *buf, size_t len);

/*
 * Resumable search for the end of a head in buf[0..len), used on the traffic path for request
 * and response heads. *scanned holds how many bytes earlier calls over the same (grown) buffer
 * already searched; start with 0. Returns the head length including its blank line (CRLF CRLF,
 * or a bare LF LF, which the strict parser then refuses at once instead of waiting for a timeout),
 * or 0 when more bytes are needed; *scanned is then advanced so the next call does not rescan.
 */
size_t bw_http_head_scan(const char *buf, size_t len, size_t *scanned);

/* Parses a complete request head of head_len bytes (as returned by bw_http_head_length).
 * max_headers (<= BW_HTTP_MAX_HEADERS_HARD) bounds the header count (431 beyond it). */
bw_http_status bw_http_parse_request(const char *buf, size_t head_len, size_t max_headers,
                                     bw_http_head *out);

/* Parses a complete response head. The request method decides bodies (HEAD has none; neither have
 * 1xx, 204 and 304). Returns BW_HTTP_OK or BW_HTTP_BAD_REQUEST (meaning: invalid response). */
bw_http_status bw_http_parse_response(const char *buf, size_t head_len, size_t max_headers,
                                      bw_http_method request_method, bw_http_head *out);

/* Case-insensitive token comparison helpers used by the proxy when rewriting heads. */
bool bw_http_name_eq(const char *name, size_t len, const char *lit);
/* True when the comma-separated list value contains token (case-insensitive). */
bool bw_http_list_has(const char *value, size_t len, const char *token);
/* Idempotent per RFC 9110 9.2.2. */
bool bw_http_method_idempotent(bw_http_method m);
const char *bw_http_reason(int status);

/* Incremental chunked-body validator. Feed it bytes as they arrive, in any split. */
typedef enum bw_chunked_state {
    BW_CHUNK_SIZE = 0,
    BW_CHUNK_SIZE_HEX,
    BW_CHUNK_EXT,
    BW_CHUNK_EXT_QUOTED,
    BW_CHUNK_EXT_QUOTED_ESC,
    BW_CHUNK_SIZE_LF,
    BW_CHUNK_DATA,
    BW_CHUNK_DATA_CR,
    BW_CHUNK_DATA_LF,
    BW_CHUNK_TRAILER_START,
    BW_CHUNK_TRAILER_LINE,
    BW_CHUNK_TRAILER_LF,
    BW_CHUNK_FINAL_LF,
    BW_CHUNK_DONE,
    BW_CHUNK_ERROR,
} bw_chunked_state;

typedef struct bw_chunked {
    bw_chunked_state state;
    uint64_t remaining;     /* data bytes left in the current chunk */
    uint32_t line_bytes;    /* bytes in the current size/ext/trailer line, bounded */
    uint32_t trailer_bytes; /* total trailer bytes, bounded */
    uint8_t hex_digits;
    const char *error;
    uint8_t phase; /* position inside a chunk extension or trailer line (private) */
} bw_chunked;

/* A span of decoded body data inside the buffer passed to bw_chunked_feed(). */
typedef void (*bw_chunk_data_fn)(void *arg, const char *data, size_t len);

void bw_chunked_init(bw_chunked *c);

/*
 * Consumes up to len bytes. Returns how many bytes belong to the chunked body (the rest, if the
 * body ended inside buf, belongs to the next message). Decoded data spans are reported through
 * on_data when it is not NULL. After the call: c->state == BW_CHUNK_DONE when the body ended,
 * BW_CHUNK_ERROR (with c->error) when the bytes are not valid chunked encoding.
 */
size_t bw_chunked_feed(bw_chunked *c, const char *buf, size_t len, bw_chunk_data_fn on_data,
                       void *arg);

#endif
