/*
 * Fuzz target: request heads. Checks that bw_http_head_length() and bw_http_parse_request() never
 * read outside the bytes they are given, that a head found in a prefix of the input is the same
 * head found in the whole input (the proxy calls head_length on whatever it has read so far), and
 * that an accepted head is self-consistent. Every copy is an exact-size allocation so that
 * AddressSanitizer sees any over-read.
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "breakwater/http.h"
#include "fuzz.h"

static bw_http_head head;

static char *dup_exact(const uint8_t *data, size_t size)
{
    char *p = malloc(size ? size : 1);
    if (p == NULL)
        abort();
    if (size > 0)
        memcpy(p, data, size);
    return p;
}

static bool inside(const char *p, size_t len, const char *buf, size_t size)
{
    return p >= buf && len <= size && (size_t)(p - buf) <= size - len;
}

static void check_request(const char *buf, size_t len, size_t max_headers)
{
    bw_http_status st = bw_http_parse_request(buf, len, max_headers, &head);
    if (st != BW_HTTP_OK) {
        if (head.error == NULL)
            abort();
        if (st != BW_HTTP_BAD_REQUEST && st != BW_HTTP_HEADERS_TOO_LARGE &&
            st != BW_HTTP_VERSION_NOT_SUPPORTED)
            abort();
        return;
    }
    if (head.error != NULL || head.n_headers > max_headers)
        abort();
    if (!inside(head.method_str, head.method_len, buf, len) ||
        !inside(head.target, head.target_len, buf, len) || head.target_len == 0)
        abort();
    if (head.version_minor != 0 && head.version_minor != 1)
        abort();
    if (head.version_minor == 1 && head.host_index < 0)
        abort();
    if (head.host_index >= (int)head.n_headers)
        abort();
    if (head.framing == BW_BODY_CLOSE)
        abort();
    if (head.framing == BW_BODY_CHUNKED && head.version_minor != 1)
        abort();
    if (head.framing == BW_BODY_LENGTH && head.content_length > BW_HTTP_MAX_CONTENT_LENGTH)
        abort();
    int n_cl = 0, n_te = 0;
    for (size_t i = 0; i < head.n_headers; i++) {
        const bw_http_header *h = &head.headers[i];
        if (!inside(h->name, h->name_len, buf, len) || !inside(h->value, h->value_len, buf, len))
            abort();
        if (h->name_len == 0)
            abort();
        for (size_t j = 0; j < h->value_len; j++) {
            unsigned char c = (unsigned char)h->value[j];
            if (c == '\r' || c == '\n' || c == 0)
                abort();
        }
        n_cl += bw_http_name_eq(h->name, h->name_len, "content-length");
        n_te += bw_http_name_eq(h->name, h->name_len, "transfer-encoding");
    }
    /* the framing the parser chose is the only one a reader of these headers could choose */
    if (n_cl > 1 || n_te > 1 || (n_cl && n_te))
        abort();
    if ((head.framing == BW_BODY_CHUNKED) != (n_te == 1))
        abort();
    if ((head.framing == BW_BODY_LENGTH) != (n_cl == 1))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = dup_exact(data, size);
    size_t hl = bw_http_head_length(buf, size);
    if (hl > size || (hl > 0 && (hl < 4 || memcmp(buf + hl - 4, "\r\n\r\n", 4) != 0)))
        abort();
    if (hl > 0)
        check_request(buf, hl, 100);
    /* the parser must also survive being handed arbitrary bytes as a head */
    check_request(buf, size, size > 0 ? (size_t)(uint8_t)buf[0] : 0);
    free(buf);
    if (size > 0)
        bw_fuzz_split(data, size, (size_t)data[0] * 7919 % (size + 1));
    return 0;
}

void bw_fuzz_split(const uint8_t *data, size_t size, size_t split)
{
    if (split > size)
        return;
    size_t full = bw_http_head_length((const char *)data, size);
    char *prefix = dup_exact(data, split);
    size_t hl = bw_http_head_length(prefix, split);
    size_t expected = (full > 0 && split >= full) ? full : 0;
    if (hl != expected)
        abort();
    check_request(prefix, split, 100);
    free(prefix);
}
