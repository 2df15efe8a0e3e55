/*
 * Fuzz target: path normalisation (src/path.c), with the properties routing relies on.
 *
 * For any input accepted by bw_path_normalize():
 *   - the result starts with '/', is no longer than the input, and contains no "//", no "/./",
 *     no "/../", does not end in "/." or "/..", and has no escape of an unreserved character,
 *     no escaped '/', '\' or NUL, and no lower-case hex digit in an escape;
 *   - normalising the result again gives the result unchanged.
 * The split variant normalises the part before the split position and the part after it on
 * its own (with a '/' in front), so prefixes and suffixes of odd inputs are covered too.
 * bw_host_normalize() is checked on the same bytes: lower-case only, no trailing dot, idempotent.
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "breakwater/path.h"
#include "fuzz.h"

static bool contains(const char *p, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(p + i, needle, k) == 0)
            return true;
    return false;
}

static bool ends_with(const char *p, size_t n, const char *tail)
{
    size_t k = strlen(tail);
    return n >= k && memcmp(p + n - k, tail, k) == 0;
}

static int hex(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1; /* lower-case hex is a failure too: escapes are upper-cased */
}

static void check_path(const char *in, size_t len)
{
    char *copy = malloc(len ? len : 1);
    char *out = malloc(len ? len : 1);
    char *again = malloc(len ? len : 1);
    if (copy == NULL || out == NULL || again == NULL)
        abort();
    if (len > 0)
        memcpy(copy, in, len);
    size_t n = 0;
    if (bw_path_normalize(copy, len, out, len, &n) == BW_PATH_OK) {
        if (n == 0 || n > len || out[0] != '/')
            abort();
        if (contains(out, n, "//") || contains(out, n, "/./") || contains(out, n, "/../") ||
            ends_with(out, n, "/.") || ends_with(out, n, "/..") || memchr(out, '\\', n) != NULL)
            abort();
        for (size_t i = 0; i < n; i++) {
            if (out[i] != '%')
                continue;
            if (i + 2 >= n)
                abort();
            int hi = hex(out[i + 1]), lo = hex(out[i + 2]);
            if (hi < 0 || lo < 0)
                abort();
            unsigned char v = (unsigned char)(hi * 16 + lo);
            bool unreserved = (v >= 'a' && v <= 'z') || (v >= 'A' && v <= 'Z') ||
                              (v >= '0' && v <= '9') || v == '-' || v == '.' || v == '_' ||
                              v == '~';
            if (unreserved || v == '/' || v == '\\' || v == 0)
                abort();
        }
        size_t m = 0;
        if (bw_path_normalize(out, n, again, n, &m) != BW_PATH_OK || m != n ||
            memcmp(out, again, n) != 0)
            abort();
    }
    free(copy);
    free(out);
    free(again);
}

static void check_host(const char *in, size_t len)
{
    char out[256], again[256];
    size_t n = bw_host_normalize(in, len, out, sizeof(out));
    if (n == 0)
        return;
    if (n > len)
        abort();
    for (size_t i = 0; i < n; i++)
        if (out[i] >= 'A' && out[i] <= 'Z')
            abort();
    if (out[0] != '[' && (out[n - 1] == '.' || memchr(out, ':', n) != NULL))
        abort();
    size_t m = bw_host_normalize(out, n, again, sizeof(again));
    if (m != n || memcmp(out, again, n) != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_path((const char *)data, size);
    check_host((const char *)data, size);
    return 0;
}

void bw_fuzz_split(const uint8_t *data, size_t size, size_t split)
{
    check_path((const char *)data, split);
    char *tail = malloc(size - split + 1);
    if (tail == NULL)
        abort();
    tail[0] = '/';
    memcpy(tail + 1, data + split, size - split);
    check_path(tail, size - split + 1);
    free(tail);
}
