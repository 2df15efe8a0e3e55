/*
 * Fuzz target: chunked bodies. Decodes the input in one piece, then split in two at a position
 * derived from the first byte, then byte by byte: the bytes consumed, the final state, the error
 * and the decoded data must be the same every time. Each piece is an exact-size allocation, so
 * AddressSanitizer catches a read past the piece being fed.
 */
#include <stdlib.h>
#include <string.h>

#include "breakwater/http.h"
#include "fuzz.h"

struct run {
    size_t consumed;
    bw_chunked_state state;
    const char *error;
    char *data;
    size_t data_len;
    size_t data_cap;
};

static void on_data(void *arg, const char *data, size_t len)
{
    struct run *r = arg;
    if (len == 0 || r->data_len + len > r->data_cap)
        abort(); /* decoded data can never be longer than the input */
    memcpy(r->data + r->data_len, data, len);
    r->data_len += len;
}

static void feed(bw_chunked *c, struct run *r, const uint8_t *p, size_t len)
{
    if (c->state == BW_CHUNK_DONE || c->state == BW_CHUNK_ERROR)
        return;
    char *copy = calloc(len ? len : 1, 1);
    if (copy == NULL)
        abort();
    if (len > 0)
        memcpy(copy, p, len);
    size_t used = bw_chunked_feed(c, copy, len, on_data, r);
    free(copy);
    if (used > len)
        abort();
    if (used < len && c->state != BW_CHUNK_DONE && c->state != BW_CHUNK_ERROR)
        abort();
    r->consumed += used;
}

static void run_init(struct run *r, size_t size, bw_chunked *c)
{
    memset(r, 0, sizeof(*r));
    r->data = malloc(size ? size : 1);
    if (r->data == NULL)
        abort();
    r->data_cap = size;
    bw_chunked_init(c);
}

static void run_end(struct run *r, const bw_chunked *c)
{
    r->state = c->state;
    r->error = c->error;
    if ((r->state == BW_CHUNK_ERROR) != (r->error != NULL))
        abort();
    if (r->state == BW_CHUNK_DONE && r->consumed < 5)
        abort(); /* "0\r\n\r\n" is the shortest body */
}

static void compare(const struct run *a, const struct run *b)
{
    if (a->consumed != b->consumed || a->state != b->state || a->error != b->error ||
        a->data_len != b->data_len || memcmp(a->data, b->data, a->data_len) != 0)
        abort();
}

static void one_shot(const uint8_t *data, size_t size, struct run *r)
{
    bw_chunked c;
    run_init(r, size, &c);
    feed(&c, r, data, size);
    run_end(r, &c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct run whole, bytes;
    bw_chunked c;
    one_shot(data, size, &whole);
    run_init(&bytes, size, &c);
    for (size_t i = 0; i < size; i++)
        feed(&c, &bytes, data + i, 1);
    run_end(&bytes, &c);
    compare(&whole, &bytes);
    free(whole.data);
    free(bytes.data);
    if (size > 0)
        bw_fuzz_split(data, size, (size_t)data[0] * 7919 % (size + 1));
    return 0;
}

void bw_fuzz_split(const uint8_t *data, size_t size, size_t split)
{
    struct run whole, parts;
    bw_chunked c;
    if (split > size)
        return;
    one_shot(data, size, &whole);
    run_init(&parts, size, &c);
    feed(&c, &parts, data, split);
    feed(&c, &parts, data + split, size - split);
    run_end(&parts, &c);
    compare(&whole, &parts);
    free(whole.data);
    free(parts.data);
}
