/*
 * Busiest keys of a rate-limit policy (see include/breakwater/topkeys.h for the scheme).
 *
 * Writers never wait: a hit is a handful of relaxed adds; a miss is one compare-and-swap on a
 * score, or, when the score is spent, one compare-and-swap on the slot's sequence number that
 * makes the caller its only writer until it publishes the new key with a release store. Readers
 * copy a slot between two acquire loads of the sequence number and discard copies during which
 * it moved, so a reader never reports a key with another key's text.
 */
#include "breakwater/topkeys.h"

#include <stdlib.h>
#include <string.h>

#define TEXT_WORDS ((BW_TOPKEYS_TEXT_MAX + 1 + 7) / 8)

void bw_topkeys_init(bw_topkeys *t)
{
    memset(t, 0, sizeof(*t));
}

static uint64_t nonzero(uint64_t hash)
{
    return hash ? hash : 1;
}

static void store_text(bw_topkeys_slot *s, const char *text)
{
    char buf[TEXT_WORDS * 8] = {0};
    size_t n = strnlen(text, BW_TOPKEYS_TEXT_MAX);
    memcpy(buf, text, n);
    for (size_t i = 0; i < TEXT_WORDS; i++) {
        uint64_t w;
        memcpy(&w, buf + i * 8, 8);
        atomic_store_explicit(&s->text[i], w, memory_order_relaxed);
    }
}

static void load_text(const bw_topkeys_slot *s, char out[BW_TOPKEYS_TEXT_MAX + 1])
{
    char buf[TEXT_WORDS * 8];
    for (size_t i = 0; i < TEXT_WORDS; i++) {
        uint64_t w = atomic_load_explicit(&s->text[i], memory_order_relaxed);
        memcpy(buf + i * 8, &w, 8);
    }
    memcpy(out, buf, BW_TOPKEYS_TEXT_MAX);
    out[BW_TOPKEYS_TEXT_MAX] = '\0';
}

static void hit(bw_topkeys_slot *s, bool rejected, uint32_t remaining, uint64_t now_ns)
{
    atomic_fetch_add_explicit(rejected ? &s->rejected : &s->consumed, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->score, 1, memory_order_relaxed);
    atomic_store_explicit(&s->remaining, remaining, memory_order_relaxed);
    atomic_store_explicit(&s->seen_ns, now_ns, memory_order_relaxed);
}

/* Takes slot s for a new key when its score is spent (or its writer died). */
static void claim(bw_topkeys_slot *s, uint64_t seq, uint64_t hash, bool rejected,
                  uint32_t remaining, uint64_t now_ns, bw_topkeys_text_fn text, void *text_arg)
{
    uint64_t mine = (seq & 1) ? seq + 2 : seq + 1; /* odd: ours while we write */
    if (!atomic_compare_exchange_strong_explicit(&s->seq, &seq, mine, memory_order_acquire,
                                                 memory_order_relaxed))
        return;
    atomic_store_explicit(&s->claimed_ns, now_ns, memory_order_relaxed);
    char buf[BW_TOPKEYS_TEXT_MAX + 1] = {0};
    if (text)
        text(text_arg, buf);
    buf[BW_TOPKEYS_TEXT_MAX] = '\0';
    store_text(s, buf);
    atomic_store_explicit(&s->hash, hash, memory_order_relaxed);
    atomic_store_explicit(&s->consumed, rejected ? 0 : 1, memory_order_relaxed);
    atomic_store_explicit(&s->rejected, rejected ? 1 : 0, memory_order_relaxed);
    atomic_store_explicit(&s->score, 1, memory_order_relaxed);
    atomic_store_explicit(&s->remaining, remaining, memory_order_relaxed);
    atomic_store_explicit(&s->seen_ns, now_ns, memory_order_relaxed);
    /* Publish; fails only if a writer took the slot over from us (we stalled past STALE). */
    uint64_t expect = mine;
    atomic_compare_exchange_strong_explicit(&s->seq, &expect, mine + 1, memory_order_release,
                                            memory_order_relaxed);
}

void bw_topkeys_record(bw_topkeys *t, uint64_t hash, bool rejected, uint32_t remaining,
                       uint64_t now_ns, bw_topkeys_text_fn text, void *text_arg)
{
    hash = nonzero(hash);
    /* BW_TOPKEYS_WAYS candidate slots, stepping by an odd stride (all distinct: the slot
     * count is a power of two). */
    uint32_t first = (uint32_t)(hash % BW_TOPKEYS_SLOTS);
    uint32_t stride = (uint32_t)((hash >> 32) | 1);
    bw_topkeys_slot *cand[BW_TOPKEYS_WAYS];
    uint64_t seq[BW_TOPKEYS_WAYS], score[BW_TOPKEYS_WAYS];
    for (int k = 0; k < BW_TOPKEYS_WAYS; k++) {
        bw_topkeys_slot *s = &t->slot[(first + (uint32_t)k * stride) % BW_TOPKEYS_SLOTS];
        cand[k] = s;
        seq[k] = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (!(seq[k] & 1) && atomic_load_explicit(&s->hash, memory_order_relaxed) == hash) {
            hit(s, rejected, remaining, now_ns);
            return;
        }
        score[k] = atomic_load_explicit(&s->score, memory_order_relaxed);
    }
    /* A miss: the weakest candidate loses a point, or is replaced once it has none left. */
    int v = -1;
    for (int k = 0; k < BW_TOPKEYS_WAYS; k++) {
        if (seq[k] & 1) {
            uint64_t since = atomic_load_explicit(&cand[k]->claimed_ns, memory_order_relaxed);
            if (now_ns > since && now_ns - since > BW_TOPKEYS_STALE_NS) {
                claim(cand[k], seq[k], hash, rejected, remaining, now_ns, text, text_arg);
                return;
            }
            continue;
        }
        if (v < 0 || score[k] < score[v])
            v = k;
    }
    if (v < 0)
        return;
    bw_topkeys_slot *s = cand[v];
    uint64_t sc = score[v];
    while (sc > 0) {
        if (atomic_compare_exchange_weak_explicit(&s->score, &sc, sc - 1, memory_order_relaxed,
                                                  memory_order_relaxed))
            return;
    }
    claim(s, seq[v], hash, rejected, remaining, now_ns, text, text_arg);
}

/* A consistent copy of one slot, or false (empty, or rewritten while we copied). */
static bool read_slot(const bw_topkeys_slot *s, bw_topkeys_entry *e)
{
    for (int attempt = 0; attempt < 4; attempt++) {
        uint64_t q1 = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (q1 & 1)
            return false;
        e->hash = atomic_load_explicit(&s->hash, memory_order_relaxed);
        e->consumed = atomic_load_explicit(&s->consumed, memory_order_relaxed);
        e->rejected = atomic_load_explicit(&s->rejected, memory_order_relaxed);
        e->remaining = atomic_load_explicit(&s->remaining, memory_order_relaxed);
        e->seen_ns = atomic_load_explicit(&s->seen_ns, memory_order_relaxed);
        load_text(s, e->text);
        atomic_thread_fence(memory_order_acquire);
        uint64_t q2 = atomic_load_explicit(&s->seq, memory_order_relaxed);
        if (q1 == q2)
            return e->hash != 0;
    }
    return false;
}

static int busier(const void *a, const void *b)
{
    const bw_topkeys_entry *x = a, *y = b;
    if (x->rejected != y->rejected)
        return x->rejected > y->rejected ? -1 : 1;
    if (x->consumed != y->consumed)
        return x->consumed > y->consumed ? -1 : 1;
    return strcmp(x->text, y->text);
}

size_t bw_topkeys_top(const bw_topkeys *t, bw_topkeys_entry *out, size_t max)
{
    bw_topkeys_entry all[BW_TOPKEYS_SLOTS];
    size_t n = 0;
    for (size_t i = 0; i < BW_TOPKEYS_SLOTS; i++)
        if (read_slot(&t->slot[i], &all[n]) && (all[n].consumed || all[n].rejected))
            n++;
    qsort(all, n, sizeof(all[0]), busier);
    if (n > max)
        n = max;
    memcpy(out, all, n * sizeof(all[0]));
    return n;
}

bool bw_topkeys_find_text(const bw_topkeys *t, const char *text, bw_topkeys_entry *out)
{
    for (size_t i = 0; i < BW_TOPKEYS_SLOTS; i++) {
        bw_topkeys_entry e;
        if (read_slot(&t->slot[i], &e) && strcmp(e.text, text) == 0) {
            *out = e;
            return true;
        }
    }
    return false;
}

void bw_topkeys_forget(bw_topkeys *t, uint64_t hash)
{
    hash = nonzero(hash);
    for (size_t i = 0; i < BW_TOPKEYS_SLOTS; i++) {
        bw_topkeys_slot *s = &t->slot[i];
        if (atomic_load_explicit(&s->hash, memory_order_relaxed) != hash)
            continue;
        atomic_store_explicit(&s->consumed, 0, memory_order_relaxed);
        atomic_store_explicit(&s->rejected, 0, memory_order_relaxed);
        atomic_store_explicit(&s->score, 0, memory_order_relaxed);
    }
}
