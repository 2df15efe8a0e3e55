/*
 * Helpers shared by the unit tests that need a parsed configuration (shm, metrics).
 * Include after <cmocka.h>.
 */
#ifndef BREAKWATER_TEST_SUPPORT_H
#define BREAKWATER_TEST_SUPPORT_H

#include <stdio.h>
#include <string.h>

#include "breakwater/config.h"

static inline const char *bw_test_no_env(const char *name)
{
    (void)name;
    return NULL;
}

/* Parses a configuration without environment overrides; a refused one fails the test, after
 * printing every problem. */
static inline bw_config *bw_test_parse_config(const char *text)
{
    bw_diag d;
    bw_diag_init(&d);
    bw_config *cfg = bw_config_parse(text, strlen(text), "test.json", bw_test_no_env, &d);
    for (size_t i = 0; i < d.count; i++)
        fprintf(stderr, "%s\n", d.lines[i]);
    bw_diag_free(&d);
    assert_non_null(cfg);
    return cfg;
}

#endif
