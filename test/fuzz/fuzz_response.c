/*
 * Fuzz target: response heads. The first byte picks the method of the request the response
 * answers (it decides whether a body may follow); the rest is the response. Checks bounds under
 * AddressSanitizer, prefix consistency of bw_http_head_length(), and the framing rules of
 * RFC 9112 6.3 on every accepted head.
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "breakwater/http.h"
#include "fuzz.h"

static bw_http_head head;

static const bw_http_method methods[] = {
    BW_METHOD_GET, BW_METHOD_HEAD, BW_METHOD_POST, BW_METHOD_CONNECT, BW_METHOD_OTHER,
};

static char *dup_exact(const uint8_t *data, size_t size)
{
    char *p = malloc(size ? size : 1);
    if (p == NULL)
        abort();
    if (size > 0)
        memcpy(p, data, size);
    return p;
}

static void check_response(const char *buf, size_t len, bw_http_method m)
{
    bw_http_status st = bw_http_parse_response(buf, len, 64, m, &head);
    if (st != BW_HTTP_OK) {
        if (st != BW_HTTP_BAD_REQUEST || head.error == NULL)
            abort();
        return;
    }
    if (head.error != NULL || head.status < 100 || head.status > 599 || head.n_headers > 64)
        abort();
    if (head.reason < buf || (size_t)(head.reason - buf) + head.reason_len > len)
        abort();
    bool no_body = head.status < 200 || head.status == 204 || head.status == 304 ||
                   m == BW_METHOD_HEAD || (m == BW_METHOD_CONNECT && head.status < 300);
    if (no_body && head.framing != BW_BODY_NONE)
        abort();
    if (!no_body && head.framing == BW_BODY_NONE)
        abort();
    if (head.framing == BW_BODY_CHUNKED && head.version_minor != 1)
        abort();
    if (head.framing == BW_BODY_LENGTH && head.content_length > BW_HTTP_MAX_CONTENT_LENGTH)
        abort();
    for (size_t i = 0; i < head.n_headers; i++) {
        const bw_http_header *h = &head.headers[i];
        if (h->name < buf || (size_t)(h->name - buf) + h->name_len > len)
            abort();
        if (h->value < buf || (size_t)(h->value - buf) + h->value_len > len)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    bw_http_method m = methods[data[0] % (sizeof(methods) / sizeof(methods[0]))];
    char *buf = dup_exact(data + 1, size - 1);
    size_t hl = bw_http_head_length(buf, size - 1);
    if (hl > size - 1)
        abort();
    if (hl > 0)
        check_response(buf, hl, m);
    check_response(buf, size - 1, m);
    free(buf);
    bw_fuzz_split(data, size, (size_t)data[0] * 7919 % (size + 1));
    return 0;
}

void bw_fuzz_split(const uint8_t *data, size_t size, size_t split)
{
    if (size == 0 || split == 0 || split > size)
        return;
    bw_http_method m = methods[data[0] % (sizeof(methods) / sizeof(methods[0]))];
    size_t full = bw_http_head_length((const char *)data + 1, size - 1);
    char *prefix = dup_exact(data + 1, split - 1);
    size_t hl = bw_http_head_length(prefix, split - 1);
    if (hl != ((full > 0 && split - 1 >= full) ? full : 0))
        abort();
    check_response(prefix, split - 1, m);
    free(prefix);
}
