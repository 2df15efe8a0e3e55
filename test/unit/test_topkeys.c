/*
 * Busiest-keys table (src/topkeys.c): heavy keys stay and are ranked by refusals then tokens,
 * one-off keys do not push them out, a slot left half-written by a dead writer is taken over
 * after the stale time and never before, and a refilled key's counters start again.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "breakwater/topkeys.h"

static bw_topkeys table;

static void name_of(void *arg, char buf[BW_TOPKEYS_TEXT_MAX + 1])
{
    snprintf(buf, BW_TOPKEYS_TEXT_MAX + 1, "key-%u", *(unsigned *)arg);
}

static void rec(unsigned key, bool rejected, uint64_t now)
{
    bw_topkeys_record(&table, (uint64_t)key * UINT64_C(0x9e3779b97f4a7c15) + 7, rejected, 3, now,
                      name_of, &key);
}

static void test_ranking(void **state)
{
    (void)state;
    bw_topkeys_init(&table);
    for (int i = 0; i < 50; i++)
        rec(1, false, 1);
    for (int i = 0; i < 20; i++)
        rec(2, true, 1);
    for (int i = 0; i < 30; i++)
        rec(3, false, 1);
    bw_topkeys_entry e[4];
    size_t n = bw_topkeys_top(&table, e, 4);
    assert_int_equal(n, 3);
    assert_string_equal(e[0].text, "key-2"); /* refusals first */
    assert_int_equal(e[0].rejected, 20);
    assert_string_equal(e[1].text, "key-1");
    assert_int_equal(e[1].consumed, 50);
    assert_string_equal(e[2].text, "key-3");
    assert_int_equal(e[2].remaining, 3);
    n = bw_topkeys_top(&table, e, 1);
    assert_int_equal(n, 1);
}

static void test_heavy_key_survives_churn(void **state)
{
    (void)state;
    bw_topkeys_init(&table);
    /* A heavy key interleaved with 10,000 keys seen once each. */
    for (unsigned i = 0; i < 10000; i++) {
        rec(42, true, 1);
        rec(1000 + i, false, 1);
    }
    bw_topkeys_entry e[BW_TOPKEYS_SLOTS];
    size_t n = bw_topkeys_top(&table, e, BW_TOPKEYS_SLOTS);
    assert_true(n >= 1 && n <= BW_TOPKEYS_SLOTS);
    assert_string_equal(e[0].text, "key-42");
    assert_true(e[0].rejected > 5000);
}

static void test_dead_writer(void **state)
{
    (void)state;
    bw_topkeys_init(&table);
    /* Leave every slot "being written" at t=100 as a killed worker would. */
    for (size_t i = 0; i < BW_TOPKEYS_SLOTS; i++) {
        atomic_store(&table.slot[i].seq, 1);
        atomic_store(&table.slot[i].claimed_ns, 100);
    }
    bw_topkeys_entry e[2];
    rec(5, true, 200);
    assert_int_equal(bw_topkeys_top(&table, e, 2), 0); /* not yet stale: left alone */
    rec(5, true, 100 + BW_TOPKEYS_STALE_NS + 1);
    assert_int_equal(bw_topkeys_top(&table, e, 2), 1);
    assert_string_equal(e[0].text, "key-5");
    assert_int_equal(e[0].rejected, 1);
    rec(5, true, 100 + BW_TOPKEYS_STALE_NS + 2);
    assert_int_equal(bw_topkeys_top(&table, e, 2), 1);
    assert_int_equal(e[0].rejected, 2);
}

static void test_find_and_forget(void **state)
{
    (void)state;
    bw_topkeys_init(&table);
    rec(7, true, 1);
    rec(8, false, 1);
    bw_topkeys_entry e;
    assert_true(bw_topkeys_find_text(&table, "key-7", &e));
    assert_false(bw_topkeys_find_text(&table, "key-9", &e));
    bw_topkeys_forget(&table, e.hash);
    bw_topkeys_entry all[4];
    size_t n = bw_topkeys_top(&table, all, 4);
    assert_int_equal(n, 1);
    assert_string_equal(all[0].text, "key-8");
}

static void long_name(void *arg, char buf[BW_TOPKEYS_TEXT_MAX + 1])
{
    (void)arg;
    memset(buf, 'x', BW_TOPKEYS_TEXT_MAX + 1); /* not terminated: the table must cut it */
}

static void test_text_is_bounded(void **state)
{
    (void)state;
    bw_topkeys_init(&table);
    bw_topkeys_record(&table, 99, false, 0, 1, long_name, NULL);
    bw_topkeys_entry e[1];
    assert_int_equal(bw_topkeys_top(&table, e, 1), 1);
    assert_int_equal(strlen(e[0].text), BW_TOPKEYS_TEXT_MAX);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ranking),         cmocka_unit_test(test_heavy_key_survives_churn),
        cmocka_unit_test(test_dead_writer),     cmocka_unit_test(test_find_and_forget),
        cmocka_unit_test(test_text_is_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
