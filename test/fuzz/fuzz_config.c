/*
 * Fuzz target: the configuration parser and validator.
 *
 * A configuration file comes from an operator, but a broken one must still give a clear message
 * and never crash or leak. The input is parsed as a whole document; the split variant parses
 * the prefix that ends at the split position, the way a file truncated by a full disk or a
 * half-finished edit reads. The properties: parsing either yields a configuration and no
 * problem, or no configuration and at least one problem, each a non-empty line; and the same
 * input always gives the same verdict. The environment is empty, so overrides play no part.
 */
#include <stdlib.h>
#include <string.h>

#include "breakwater/config.h"
#include "fuzz.h"

static const char *no_env(const char *name)
{
    (void)name;
    return NULL;
}

static int parse_once(const char *text, size_t len)
{
    bw_diag diag;
    bw_diag_init(&diag);
    bw_config *cfg = bw_config_parse(text, len, "fuzz.json", no_env, &diag);
    int verdict = cfg != NULL;
    if (cfg != NULL) {
        if (diag.count != 0)
            abort();
        bw_config_free(cfg);
    } else {
        if (diag.count == 0)
            abort();
        for (size_t i = 0; i < diag.count; i++)
            if (diag.lines[i] == NULL || diag.lines[i][0] == '\0')
                abort();
    }
    bw_diag_free(&diag);
    return verdict;
}

static void parse(const uint8_t *data, size_t size)
{
    char *text = malloc(size ? size : 1);
    if (text == NULL)
        abort();
    if (size > 0)
        memcpy(text, data, size);
    if (parse_once(text, size) != parse_once(text, size))
        abort();
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    parse(data, size);
    return 0;
}

void bw_fuzz_split(const uint8_t *data, size_t size, size_t split)
{
    (void)size;
    parse(data, split);
}
