/*
 * Fuzz target: the resumable head scanner (bw_http_head_scan) that the traffic path uses for
 * request and response heads.
 *
 * Properties: the answer is never past the input; a non-zero answer ends in "\n\n" or
 * "\r\n\r\n" and no shorter prefix is complete; feeding the input in two parts (the split) gives
 * the same answer as one call; and a head the scanner calls complete goes through the strict
 * request and response parsers without a memory error.
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "breakwater/http.h"
#include "fuzz.h"

static bw_http_head head;

static size_t scan_once(const char *p, size_t n)
{
    size_t scanned = 0;
    return bw_http_head_scan(p, n, &scanned);
}

void bw_fuzz_split(const uint8_t *data, size_t size, size_t split)
{
    const char *p = (const char *)data;
    size_t whole = scan_once(p, size);
    if (whole > size)
        abort();
    if (whole != 0) {
        bool crlf = whole >= 4 && memcmp(p + whole - 4, "\r\n\r\n", 4) == 0;
        bool lf = whole >= 2 && memcmp(p + whole - 2, "\n\n", 2) == 0;
        if (!crlf && !lf)
            abort();
        if (scan_once(p, whole - 1) != 0)
            abort(); /* the first blank line is the one found */
        (void)bw_http_parse_request(p, whole, BW_HTTP_MAX_HEADERS_HARD, &head);
        (void)bw_http_parse_response(p, whole, BW_HTTP_MAX_HEADERS_HARD, BW_METHOD_GET, &head);
    }
    if (split > size)
        split = size;
    size_t scanned = 0;
    size_t first = bw_http_head_scan(p, split, &scanned);
    if (first != 0) {
        if (first != whole)
            abort();
        return;
    }
    if (scanned > split)
        abort();
    if (bw_http_head_scan(p, size, &scanned) != whole)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    bw_fuzz_split(data, size, size > 0 ? data[0] % (size + 1) : 0);
    return 0;
}
