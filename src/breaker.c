/*
 * Circuit breaker state machine over a record in shared memory.
 *
 * Every worker process updates the same bw_breaker, and any of them may be killed at any
 * instruction, so nothing here takes a lock: a lock held by a dead process would stop the others.
 * The design rests on two rules.
 *
 * 1. Everything a transition must change at once lives in one 64-bit word, changed with one
 *    compare-and-swap: the state (2 bits), the half-open permits out (10 bits) and probe successes
 *    (10 bits), the backoff level, i.e. openings since the last close (6 bits), the jitter of the
 *    current open period in thousandths (7 bits), the half-open lease round (4 bits) and a
 *    generation (25 bits) that grows by one on every transition. A process dies either before its
 *    CAS (nothing happened) or after it (the transition is complete); there is no in-between.
 *    Exactly one of many racing callers wins a transition, and only the winner reports it.
 *
 * 2. Everything else a transition touches is stamped with the generation (or generation and
 *    round) it belongs to: the time of the transition, the half-open lease, the consecutive
 *    failure count, the failure-rate buckets, and the marker of the per-state transition counter.
 *    The winner writes them after its CAS. If it dies first, readers find a stamp from another
 *    generation and treat the field as fresh: a count of zero, an empty bucket, or a time of
 *    "now" (which only makes the open period a little longer than planned). A new state needs no
 *    cleanup of the old one: stale stamps simply stop matching. Writers re-read the word before
 *    stamping, so a delayed process never puts an old generation's stamp over a newer one.
 *
 * Counting transitions exactly needs one more step. Before any caller tries to move the word
 * away from generation G it makes sure G was counted in tally[state], a word holding the last
 * generation counted and the count, advanced by a single CAS. Since G cannot be left before it is
 * counted, and a count for G cannot succeed once a later generation exists, every transition is
 * counted once, even when its winner died right after its CAS.
 *
 * Half-open permits are a lease. A worker that took a permit and died never reports, so while
 * every permit is out and the half-open state saw no activity (no permit granted, no outcome) for
 * probe_timeout_ms, the next caller starts a new round: permits back to one (its own), successes
 * kept. The round is part of each probe's ticket, so a late answer from an expired round changes
 * nothing. Likewise every outcome carries the generation that admitted it: answers to requests
 * admitted before the breaker opened, or before it closed again, are ignored.
 *
 * Time comes from the caller, and every caller passes the monotonic clock (bw_breaker_now_ms), so
 * a step of the wall clock changes no open period and no lease. Time passing with no request is
 * handled by bw_breaker_tick(), which the master calls periodically: it ends an open period that
 * is over (open -> half_open, no permit taken), so a breaker recovers without traffic. A probe
 * whose client went away gives its permit back with bw_breaker_release() (the same round check
 * as for outcomes), and bw_breaker_check_passed() counts a passing active health check as a
 * probe success that needed no permit.
 *
 * The lock-free 64-bit atomics used here are address-free, which is what makes them valid in
 * memory shared between processes.
 */
#include "breakwater/breaker.h"

#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#if UINT64_MAX == ULONG_MAX
_Static_assert(ATOMIC_LONG_LOCK_FREE == 2, "64-bit atomics must be lock-free for shared memory");
#else
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free for shared memory");
#endif

/* Layout of the state word. */
#define W_STATE_SHIFT 0
#define W_STATE_MASK 0x3u
#define W_PERMITS_SHIFT 2
#define W_PERMITS_MASK 0x3FFu
#define W_SUCC_SHIFT 12
#define W_SUCC_MASK 0x3FFu
#define W_LEVEL_SHIFT 22
#define W_LEVEL_MASK 0x3Fu
#define W_JITTER_SHIFT 28
#define W_JITTER_MASK 0x7Fu
#define W_ROUND_SHIFT 35
#define W_ROUND_MASK 0xFu
#define W_GEN_SHIFT 39
#define W_GEN_MASK 0x1FFFFFFu

/* A stamped time: a 22-bit tag above 42 bits of milliseconds (enough until the year 2109). */
#define STAMP_MS_BITS 42
#define STAMP_MS_MASK ((UINT64_C(1) << STAMP_MS_BITS) - 1)
#define STAMP_TAG_MASK 0x3FFFFFu

/* A transition counter: the last generation counted (25 bits) above the count (39 bits). */
#define TALLY_COUNT_BITS 39
#define TALLY_COUNT_MASK ((UINT64_C(1) << TALLY_COUNT_BITS) - 1)

/* A window bucket: generation (8 bits), bucket number (20 bits), requests and failures (18 each).
 */
#define BK_GEN_SHIFT 56
#define BK_GEN_MASK 0xFFu
#define BK_ID_SHIFT 36
#define BK_ID_MASK 0xFFFFFu
#define BK_REQ_SHIFT 18
#define BK_COUNT_MASK 0x3FFFFu

typedef struct word {
    unsigned state, permits, successes, level, jitter, round;
    uint32_t gen;
} word;

static word unpack(uint64_t v)
{
    word w;
    w.state = (unsigned)(v >> W_STATE_SHIFT) & W_STATE_MASK;
    w.permits = (unsigned)(v >> W_PERMITS_SHIFT) & W_PERMITS_MASK;
    w.successes = (unsigned)(v >> W_SUCC_SHIFT) & W_SUCC_MASK;
    w.level = (unsigned)(v >> W_LEVEL_SHIFT) & W_LEVEL_MASK;
    w.jitter = (unsigned)(v >> W_JITTER_SHIFT) & W_JITTER_MASK;
    w.round = (unsigned)(v >> W_ROUND_SHIFT) & W_ROUND_MASK;
    w.gen = (uint32_t)(v >> W_GEN_SHIFT) & W_GEN_MASK;
    return w;
}

static uint64_t pack(word w)
{
    return ((uint64_t)(w.state & W_STATE_MASK) << W_STATE_SHIFT) |
           ((uint64_t)(w.permits & W_PERMITS_MASK) << W_PERMITS_SHIFT) |
           ((uint64_t)(w.successes & W_SUCC_MASK) << W_SUCC_SHIFT) |
           ((uint64_t)(w.level & W_LEVEL_MASK) << W_LEVEL_SHIFT) |
           ((uint64_t)(w.jitter & W_JITTER_MASK) << W_JITTER_SHIFT) |
           ((uint64_t)(w.round & W_ROUND_MASK) << W_ROUND_SHIFT) |
           ((uint64_t)(w.gen & W_GEN_MASK) << W_GEN_SHIFT);
}

/* The word after a transition into state: a new generation, no permits, a fresh round. */
static word next_state(word w, unsigned state)
{
    word n = w;
    n.state = state;
    n.gen = (w.gen + 1) & W_GEN_MASK;
    n.permits = 0;
    n.successes = 0;
    n.round = 0;
    return n;
}

static uint64_t stamp(uint32_t tag, uint64_t ms)
{
    return ((uint64_t)(tag & STAMP_TAG_MASK) << STAMP_MS_BITS) | (ms & STAMP_MS_MASK);
}

static uint32_t stamp_tag(uint64_t s)
{
    return (uint32_t)(s >> STAMP_MS_BITS) & STAMP_TAG_MASK;
}

static uint64_t stamp_ms(uint64_t s)
{
    return s & STAMP_MS_MASK;
}

static uint32_t since_tag(word w)
{
    return w.gen & STAMP_TAG_MASK;
}

static uint32_t lease_tag(word w)
{
    return ((w.gen << 4) | w.round) & STAMP_TAG_MASK;
}

static uint64_t tally_make(uint32_t gen, uint64_t count)
{
    return ((uint64_t)(gen & W_GEN_MASK) << TALLY_COUNT_BITS) | (count & TALLY_COUNT_MASK);
}

static uint32_t tally_gen(uint64_t v)
{
    return (uint32_t)(v >> TALLY_COUNT_BITS) & W_GEN_MASK;
}

static uint64_t tally_count(uint64_t v)
{
    return v & TALLY_COUNT_MASK;
}

static uint64_t sat_sub(uint64_t a, uint64_t b)
{
    return a > b ? a - b : 0;
}

static unsigned clamp_probes(uint32_t v)
{
    if (v == 0)
        return 1;
    return v > BW_BREAKER_MAX_PROBES ? BW_BREAKER_MAX_PROBES : (unsigned)v;
}

/* Length of the open period at a backoff level: doubling per re-opening, jitter added on top,
 * never more than max_reset_timeout_ms. The first opening (level 1, no jitter) is exact. */
static uint64_t wait_for(const bw_breaker_conf *c, unsigned level, unsigned jitter)
{
    uint64_t base = c->reset_timeout_ms;
    uint64_t cap = c->max_reset_timeout_ms > base ? c->max_reset_timeout_ms : base;
    uint64_t wait = base;
    for (unsigned i = 1; i < level && wait < cap; i++)
        wait *= 2;
    if (wait > cap)
        wait = cap;
    wait += wait * jitter / 1000;
    return wait > cap ? cap : wait;
}

/*
 * Counts the transition into w's generation G unless somebody already did. The word is read
 * again after the tally: if it has left G, whoever moved it counted G first. If it is still at G,
 * the tally was read while G was current, and one CAS from that value counts G exactly once: a
 * failure means another caller counted G (no later generation can be counted before G is left).
 * Without the second read, a caller delayed since it saw G could count it again much later.
 */
static void settle(bw_breaker *b, word w)
{
    _Atomic uint64_t *tally = &b->tally[w.state];
    uint64_t v = atomic_load(tally);
    if (tally_gen(v) == w.gen)
        return;
    if (unpack(atomic_load(&b->word)).gen != w.gen)
        return;
    atomic_compare_exchange_strong(tally, &v, tally_make(w.gen, tally_count(v) + 1));
}

/* True while the record is still at w's generation (and, for lease stamps, w's round). */
static bool still_at(bw_breaker *b, word w, bool with_round)
{
    word cur = unpack(atomic_load(&b->word));
    return cur.gen == w.gen && (!with_round || cur.round == w.round);
}

/*
 * Stamps field (since, or the lease when lease is true) with ms on behalf of w. A value already
 * carrying w's tag is kept (for the lease, unless older than ms). It gives up as soon as the
 * record has left w: a delayed caller must never put an old tag over a current one, which would
 * make the next reader take the field for lost and restart the period from its own clock.
 */
static void stamp_set(bw_breaker *b, _Atomic uint64_t *field, word w, bool lease, uint64_t ms)
{
    uint32_t tag = lease ? lease_tag(w) : since_tag(w);
    uint64_t v = atomic_load(field);
    for (;;) {
        if (stamp_tag(v) == tag && (!lease || stamp_ms(v) >= ms))
            return;
        if (!still_at(b, w, lease))
            return;
        if (atomic_compare_exchange_weak(field, &v, stamp(tag, ms)))
            return;
    }
}

/* Time of the transition into w, repaired to now when its writer died before writing it. */
static uint64_t since_of(bw_breaker *b, word w, uint64_t now_ms)
{
    uint64_t s = atomic_load(&b->since);
    if (stamp_tag(s) == since_tag(w))
        return stamp_ms(s);
    stamp_set(b, &b->since, w, false, now_ms);
    s = atomic_load(&b->since);
    return stamp_tag(s) == since_tag(w) ? stamp_ms(s) : now_ms;
}

/* Everything a transition does besides its CAS: each step is optional for correctness. */
static void after_transition(bw_breaker *b, word to, uint64_t since_ms, uint64_t now_ms)
{
    stamp_set(b, &b->since, to, false, since_ms);
    if (to.state == BW_BREAKER_HALF_OPEN)
        stamp_set(b, &b->lease, to, true, now_ms);
    if (to.state == BW_BREAKER_OPEN)
        atomic_store_explicit(&b->opened_at_ms, since_ms, memory_order_relaxed);
    atomic_store_explicit(&b->updated_at_ms, now_ms, memory_order_relaxed);
    /* Counting the new generation now saves the next transition the work; it is idempotent. */
    settle(b, to);
}

/*
 * Moves the word from *cur to next. On success the side fields follow and t describes it; on
 * failure *cur holds the fresh word and the caller decides again.
 */
static bool transition(bw_breaker *b, uint64_t *cur, word next, uint64_t since_ms, uint64_t now_ms)
{
    settle(b, unpack(*cur));
    if (!atomic_compare_exchange_strong(&b->word, cur, pack(next)))
        return false;
    after_transition(b, next, since_ms, now_ms);
    return true;
}

static void note(bw_breaker_transition *t, word from, word to, bw_breaker_cause cause)
{
    if (t == NULL)
        return;
    memset(t, 0, sizeof(*t));
    t->happened = true;
    t->from = (bw_breaker_state)from.state;
    t->to = (bw_breaker_state)to.state;
    t->cause = cause;
    t->generation = to.gen;
}

static void clear_transition(bw_breaker_transition *t)
{
    if (t != NULL)
        memset(t, 0, sizeof(*t));
}

void bw_breaker_init(bw_breaker *b, uint64_t now_ms)
{
    memset(b, 0, sizeof(*b));
    word w = {0};
    w.state = BW_BREAKER_CLOSED;
    atomic_init(&b->word, pack(w));
    atomic_init(&b->since, stamp(since_tag(w), now_ms));
    atomic_init(&b->lease, stamp(lease_tag(w), now_ms));
    /* The initial closed state is not a transition: mark generation 0 as counted there, and the
     * other states with a generation they will not reach for 2^25 transitions. */
    atomic_init(&b->tally[BW_BREAKER_CLOSED], tally_make(0, 0));
    atomic_init(&b->tally[BW_BREAKER_OPEN], tally_make(W_GEN_MASK, 0));
    atomic_init(&b->tally[BW_BREAKER_HALF_OPEN], tally_make(W_GEN_MASK, 0));
    atomic_init(&b->failures, (uint64_t)0);
    for (size_t i = 0; i < BW_BREAKER_WINDOW_BUCKETS; i++)
        atomic_init(&b->window[i], (uint64_t)0);
    atomic_init(&b->opened_at_ms, (uint64_t)0);
    atomic_init(&b->updated_at_ms, now_ms);
}

static void set_ticket(bw_breaker_ticket *ticket, word w, bool probe)
{
    if (ticket == NULL)
        return;
    ticket->generation = w.gen;
    ticket->round = (uint8_t)w.round;
    ticket->probe = probe;
}

bw_breaker_decision bw_breaker_allow(bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms,
                                     uint32_t probe_timeout_ms, bw_breaker_ticket *ticket,
                                     uint64_t *retry_after_ms, bw_breaker_transition *t)
{
    clear_transition(t);
    if (retry_after_ms != NULL)
        *retry_after_ms = 0;
    if (atomic_load_explicit(&b->forced_at_ms, memory_order_relaxed) != 0) {
        /* Held open for maintenance: nothing reaches the upstream, no probe either. */
        atomic_fetch_add_explicit(&b->rejected, 1, memory_order_relaxed);
        if (retry_after_ms != NULL)
            *retry_after_ms = c->reset_timeout_ms;
        return BW_BREAKER_REJECT;
    }
    uint64_t lease_ms = probe_timeout_ms ? probe_timeout_ms : 1;
    unsigned max_permits = clamp_probes(c->half_open_max_requests);
    uint64_t cur = atomic_load(&b->word);
    for (;;) {
        word w = unpack(cur);
        set_ticket(ticket, w, false);
        if (w.state == BW_BREAKER_CLOSED)
            return BW_BREAKER_ALLOW;

        if (w.state == BW_BREAKER_OPEN) {
            uint64_t wait = wait_for(c, w.level, w.jitter);
            uint64_t until = since_of(b, w, now_ms) + wait;
            if (now_ms < until) {
                if (retry_after_ms != NULL)
                    *retry_after_ms = until - now_ms;
                atomic_fetch_add_explicit(&b->rejected, 1, memory_order_relaxed);
                return BW_BREAKER_REJECT;
            }
            /* The wait is over: the caller that wins this CAS is the first probe. */
            word n = next_state(w, BW_BREAKER_HALF_OPEN);
            n.permits = 1;
            if (transition(b, &cur, n, now_ms, now_ms)) {
                note(t, w, n, BW_BREAKER_CAUSE_TIMEOUT);
                if (t != NULL)
                    t->wait_ms = wait;
                atomic_fetch_add_explicit(&b->probes, 1, memory_order_relaxed);
                set_ticket(ticket, n, true);
                return BW_BREAKER_ALLOW_PROBE;
            }
            continue;
        }

        if (w.state != BW_BREAKER_HALF_OPEN) {
            /* Unreachable with a record written by this code; refuse rather than guess. */
            atomic_fetch_add_explicit(&b->rejected, 1, memory_order_relaxed);
            if (retry_after_ms != NULL)
                *retry_after_ms = 1000;
            return BW_BREAKER_REJECT;
        }

        if (w.permits < max_permits) {
            word n = w;
            n.permits++;
            if (atomic_compare_exchange_strong(&b->word, &cur, pack(n))) {
                stamp_set(b, &b->lease, n, true, now_ms);
                atomic_fetch_add_explicit(&b->probes, 1, memory_order_relaxed);
                set_ticket(ticket, n, true);
                return BW_BREAKER_ALLOW_PROBE;
            }
            continue;
        }

        /* Every permit is out. Take them back if the round has been silent for a whole probe
         * timeout: their holders are dead or will be ignored when they answer. */
        uint64_t l = atomic_load(&b->lease);
        if (stamp_tag(l) != lease_tag(w)) {
            /* The lease writer died before writing: start the lease from now. */
            stamp_set(b, &b->lease, w, true, now_ms);
        } else if (sat_sub(now_ms, stamp_ms(l)) >= lease_ms) {
            word n = w;
            n.round = (w.round + 1) & W_ROUND_MASK;
            n.permits = 1;
            if (atomic_compare_exchange_strong(&b->word, &cur, pack(n))) {
                stamp_set(b, &b->lease, n, true, now_ms);
                atomic_fetch_add_explicit(&b->lease_expiries, 1, memory_order_relaxed);
                atomic_fetch_add_explicit(&b->probes, 1, memory_order_relaxed);
                set_ticket(ticket, n, true);
                return BW_BREAKER_ALLOW_PROBE;
            }
            continue;
        }
        /* Probes usually answer within a second; tell clients to come back then. */
        if (retry_after_ms != NULL)
            *retry_after_ms = 1000;
        atomic_fetch_add_explicit(&b->rejected, 1, memory_order_relaxed);
        return BW_BREAKER_REJECT;
    }
}

static uint64_t bucket_width(const bw_breaker_conf *c)
{
    uint64_t w = c->window_ms / BW_BREAKER_WINDOW_BUCKETS;
    return w ? w : 1;
}

static uint64_t bucket_make(uint32_t gen, uint64_t id, uint64_t req, uint64_t fail)
{
    return ((uint64_t)(gen & BK_GEN_MASK) << BK_GEN_SHIFT) | ((id & BK_ID_MASK) << BK_ID_SHIFT) |
           ((req & BK_COUNT_MASK) << BK_REQ_SHIFT) | (fail & BK_COUNT_MASK);
}

/* Adds one outcome to the current bucket, emptying it first when it holds an older period. */
static void window_record(bw_breaker *b, const bw_breaker_conf *c, word w, uint64_t now_ms,
                          bool failed)
{
    uint32_t gen = w.gen;
    uint64_t id = now_ms / bucket_width(c);
    _Atomic uint64_t *slot = &b->window[id % BW_BREAKER_WINDOW_BUCKETS];
    uint64_t fresh = bucket_make(gen, id, 0, 0);
    uint64_t tag_mask = ~((UINT64_C(1) << BK_ID_SHIFT) - 1);
    uint64_t v = atomic_load(slot);
    for (;;) {
        uint64_t req = 0, fail = 0;
        if ((v & tag_mask) == fresh) {
            req = (v >> BK_REQ_SHIFT) & BK_COUNT_MASK;
            fail = v & BK_COUNT_MASK;
        } else if (!still_at(b, w, false)) {
            return; /* do not empty a bucket of a newer period for an outcome of an older one */
        }
        /* A full bucket stops counting: the rate of what it holds is sample enough. */
        if (req == BK_COUNT_MASK)
            return;
        uint64_t next = bucket_make(gen, id, req + 1, fail + (failed ? 1 : 0));
        if (atomic_compare_exchange_weak(slot, &v, next))
            return;
    }
}

/* Requests and failures in the window of generation gen (older generations do not count). */
static void window_sum(const bw_breaker *b, const bw_breaker_conf *c, uint32_t gen, uint64_t now_ms,
                       uint32_t *req_out, uint32_t *fail_out)
{
    uint64_t cur = (now_ms / bucket_width(c)) & BK_ID_MASK;
    uint64_t req = 0, fail = 0;
    for (size_t i = 0; i < BW_BREAKER_WINDOW_BUCKETS; i++) {
        uint64_t v = atomic_load_explicit(&b->window[i], memory_order_relaxed);
        if (((v >> BK_GEN_SHIFT) & BK_GEN_MASK) != (gen & BK_GEN_MASK))
            continue;
        uint64_t id = (v >> BK_ID_SHIFT) & BK_ID_MASK;
        if (((cur - id) & BK_ID_MASK) >= BW_BREAKER_WINDOW_BUCKETS)
            continue;
        req += (v >> BK_REQ_SHIFT) & BK_COUNT_MASK;
        fail += v & BK_COUNT_MASK;
    }
    *req_out = (uint32_t)req;
    *fail_out = (uint32_t)fail;
}

static bool rate_tripped(const bw_breaker *b, const bw_breaker_conf *c, uint32_t gen,
                         uint64_t now_ms, uint32_t *req, uint32_t *fail)
{
    *req = *fail = 0;
    if (c->failure_rate_percent == 0)
        return false;
    window_sum(b, c, gen, now_ms, req, fail);
    uint32_t min = c->min_requests ? c->min_requests : 1;
    return *req >= min && (uint64_t)*fail * 100 >= (uint64_t)c->failure_rate_percent * *req;
}

/*
 * One successful probe while half_open (w, read from *cur): closes the breaker once `need`
 * successes are in, otherwise counts it, giving the probe's permit back when frees_permit.
 * Returns 1 when it closed, 0 when it counted, -1 when the word changed first (*cur holds the
 * new value: the caller looks again).
 */
static int half_open_success(bw_breaker *b, uint64_t *cur, word w, unsigned need, bool frees_permit,
                             uint64_t now_ms, bw_breaker_transition *t)
{
    unsigned successes = w.successes + 1;
    if (successes >= need) {
        word n = next_state(w, BW_BREAKER_CLOSED);
        n.level = 0;
        n.jitter = 0;
        if (!transition(b, cur, n, now_ms, now_ms))
            return -1;
        note(t, w, n, BW_BREAKER_CAUSE_PROBE_OK);
        if (t != NULL)
            t->successes = successes;
        return 1;
    }
    word n = w;
    n.successes = successes;
    if (frees_permit)
        n.permits = w.permits ? w.permits - 1 : 0; /* the permit is free for the next probe */
    if (!atomic_compare_exchange_strong(&b->word, cur, pack(n)))
        return -1;
    stamp_set(b, &b->lease, n, true, now_ms);
    return 0;
}

/* One more consecutive failure in closed generation gen; returns the new count. */
static uint32_t failures_add(bw_breaker *b, word w)
{
    uint32_t gen = w.gen;
    uint64_t v = atomic_load(&b->failures);
    for (;;) {
        uint32_t n = (uint32_t)(v >> 32) == gen ? (uint32_t)v : 0;
        /* A late caller must not restart the count of a newer closed period. */
        if ((uint32_t)(v >> 32) != gen && !still_at(b, w, false))
            return 0;
        if (n < UINT32_MAX)
            n++;
        if (atomic_compare_exchange_weak(&b->failures, &v, ((uint64_t)gen << 32) | n))
            return n;
    }
}

static void failures_clear(bw_breaker *b, uint32_t gen)
{
    uint64_t v = atomic_load(&b->failures);
    while ((uint32_t)(v >> 32) == gen && (uint32_t)v != 0) {
        if (atomic_compare_exchange_weak(&b->failures, &v, (uint64_t)gen << 32))
            return;
    }
}

static void report_closed(bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms, word w,
                          bool failed, bw_breaker_transition *t)
{
    if (c->failure_rate_percent > 0)
        window_record(b, c, w, now_ms, failed);
    if (!failed) {
        failures_clear(b, w.gen);
        return;
    }
    uint32_t n = failures_add(b, w);
    uint32_t req = 0, fail = 0;
    bw_breaker_cause cause = BW_BREAKER_CAUSE_NONE;
    if (c->failure_threshold > 0 && n >= c->failure_threshold)
        cause = BW_BREAKER_CAUSE_CONSECUTIVE;
    else if (rate_tripped(b, c, w.gen, now_ms, &req, &fail))
        cause = BW_BREAKER_CAUSE_RATE;
    if (cause == BW_BREAKER_CAUSE_NONE)
        return;

    uint64_t cur = pack(w);
    word from = w;
    word n_w = next_state(w, BW_BREAKER_OPEN);
    n_w.level = 1;
    n_w.jitter = 0;
    while (!transition(b, &cur, n_w, now_ms, now_ms)) {
        from = unpack(cur);
        if (from.state != BW_BREAKER_CLOSED || from.gen != w.gen)
            return; /* somebody else opened it (or reset it): theirs to report */
        n_w = next_state(from, BW_BREAKER_OPEN);
        n_w.level = 1;
        n_w.jitter = 0;
    }
    note(t, from, n_w, cause);
    if (t != NULL) {
        t->failures = cause == BW_BREAKER_CAUSE_CONSECUTIVE ? n : fail;
        t->requests = req;
        t->wait_ms = wait_for(c, n_w.level, n_w.jitter);
    }
}

static void report_probe(bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms,
                         const bw_breaker_ticket *ticket, bool failed, uint32_t rnd,
                         bw_breaker_transition *t)
{
    unsigned need = clamp_probes(c->half_open_success_threshold);
    uint64_t cur = atomic_load(&b->word);
    for (;;) {
        word w = unpack(cur);
        if (w.state != BW_BREAKER_HALF_OPEN || w.gen != ticket->generation ||
            w.round != ticket->round) {
            atomic_fetch_add_explicit(&b->stale_outcomes, 1, memory_order_relaxed);
            return;
        }
        if (failed) {
            word n = next_state(w, BW_BREAKER_OPEN);
            n.level = w.level < W_LEVEL_MASK ? w.level + 1 : w.level;
            n.jitter = rnd % (BW_BREAKER_JITTER_PERMILLE + 1);
            if (!transition(b, &cur, n, now_ms, now_ms))
                continue;
            note(t, w, n, BW_BREAKER_CAUSE_PROBE_FAIL);
            if (t != NULL)
                t->wait_ms = wait_for(c, n.level, n.jitter);
            return;
        }
        if (half_open_success(b, &cur, w, need, true, now_ms, t) >= 0)
            return;
    }
}

void bw_breaker_report(bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms,
                       const bw_breaker_ticket *ticket, bw_breaker_outcome outcome, uint32_t rnd,
                       bw_breaker_transition *t)
{
    clear_transition(t);
    bool failed = outcome != BW_BREAKER_SUCCESS;
    if (outcome == BW_BREAKER_SLOW)
        atomic_fetch_add_explicit(&b->slow_calls, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(failed ? &b->failures_total : &b->successes, 1, memory_order_relaxed);

    if (ticket->probe) {
        report_probe(b, c, now_ms, ticket, failed, rnd, t);
        return;
    }
    word w = unpack(atomic_load(&b->word));
    if (w.state != BW_BREAKER_CLOSED || w.gen != ticket->generation) {
        /* Admitted before the breaker last changed state: says nothing about now. */
        atomic_fetch_add_explicit(&b->stale_outcomes, 1, memory_order_relaxed);
        return;
    }
    report_closed(b, c, now_ms, w, failed, t);
}

bool bw_breaker_force_open(bw_breaker *b, const bw_breaker_conf *c, uint64_t forced_at_ms,
                           uint64_t now_ms, bw_breaker_transition *t)
{
    uint64_t zero = 0;
    bool first = atomic_compare_exchange_strong(&b->forced_at_ms, &zero,
                                                forced_at_ms ? forced_at_ms : now_ms);
    bw_breaker_force(b, c, BW_BREAKER_OPEN, 0, now_ms, t);
    return first;
}

bool bw_breaker_is_forced(const bw_breaker *b)
{
    return atomic_load_explicit(&b->forced_at_ms, memory_order_relaxed) != 0;
}

/*
 * The wall clock minus the monotonic clock, in ms. Linux derives CLOCK_REALTIME from
 * CLOCK_MONOTONIC plus an offset that only a step of the clock changes (frequency slewing moves
 * both), so reading it between two monotonic reads gives the same value on every call, and a
 * breaker time shown twice, or written to the fleet twice, comes out alike.
 */
int64_t bw_breaker_wall_offset_ms(void)
{
    struct timespec m1, w, m2;
    clock_gettime(CLOCK_MONOTONIC, &m1);
    clock_gettime(CLOCK_REALTIME, &w);
    clock_gettime(CLOCK_MONOTONIC, &m2);
    int64_t mono_ns = ((int64_t)m1.tv_sec + (int64_t)m2.tv_sec) * 500000000 +
                      ((int64_t)m1.tv_nsec + (int64_t)m2.tv_nsec) / 2;
    int64_t wall_ns = (int64_t)w.tv_sec * 1000000000 + (int64_t)w.tv_nsec;
    return (wall_ns - mono_ns) / 1000000;
}

uint64_t bw_breaker_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* The end of w's open period, or 0 when w is not open. */
static uint64_t open_until(bw_breaker *b, const bw_breaker_conf *c, word w, uint64_t now_ms)
{
    if (w.state != BW_BREAKER_OPEN)
        return 0;
    return since_of(b, w, now_ms) + wait_for(c, w.level, w.jitter);
}

/* open -> half_open with no permit taken, once the period is over; shared by tick and checks. */
static bool open_expire(bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms, uint64_t *cur,
                        bw_breaker_transition *t)
{
    /* Held open for maintenance: no timer ends that, only bw_breaker_reset(). */
    if (atomic_load_explicit(&b->forced_at_ms, memory_order_relaxed) != 0)
        return false;
    for (;;) {
        word w = unpack(*cur);
        if (w.state != BW_BREAKER_OPEN || now_ms < open_until(b, c, w, now_ms))
            return false;
        word n = next_state(w, BW_BREAKER_HALF_OPEN);
        if (transition(b, cur, n, now_ms, now_ms)) {
            note(t, w, n, BW_BREAKER_CAUSE_TIMEOUT);
            if (t != NULL)
                t->wait_ms = wait_for(c, w.level, w.jitter);
            return true;
        }
    }
}

bool bw_breaker_tick(bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms,
                     bw_breaker_transition *t)
{
    clear_transition(t);
    uint64_t cur = atomic_load(&b->word);
    return open_expire(b, c, now_ms, &cur, t);
}

void bw_breaker_release(bw_breaker *b, const bw_breaker_ticket *ticket, uint64_t now_ms)
{
    if (!ticket->probe)
        return;
    uint64_t cur = atomic_load(&b->word);
    for (;;) {
        word w = unpack(cur);
        if (w.state != BW_BREAKER_HALF_OPEN || w.gen != ticket->generation ||
            w.round != ticket->round || w.permits == 0)
            return;
        word n = w;
        n.permits--;
        if (atomic_compare_exchange_strong(&b->word, &cur, pack(n))) {
            stamp_set(b, &b->lease, n, true, now_ms);
            return;
        }
    }
}

/*
 * A passing active check is a probe that needed no permit: it adds one success in half_open
 * (closing at half_open_success_threshold). The check that finds an open period over moves the
 * breaker to half_open; it does not also close it, so every close follows a half-open state
 * that readers and the fleet could see.
 */
bool bw_breaker_check_passed(bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms,
                             bw_breaker_transition *t)
{
    clear_transition(t);
    if (atomic_load_explicit(&b->forced_at_ms, memory_order_relaxed) != 0)
        return false; /* a passing check does not end maintenance */
    unsigned need = clamp_probes(c->half_open_success_threshold);
    uint64_t cur = atomic_load(&b->word);
    for (;;) {
        word w = unpack(cur);
        if (w.state == BW_BREAKER_OPEN)
            return open_expire(b, c, now_ms, &cur, t);
        if (w.state != BW_BREAKER_HALF_OPEN)
            return false;
        int done = half_open_success(b, &cur, w, need, false, now_ms, t);
        if (done >= 0)
            return done == 1;
    }
}

bool bw_breaker_reset(bw_breaker *b, uint64_t now_ms, bw_breaker_transition *t)
{
    clear_transition(t);
    atomic_store(&b->forced_at_ms, (uint64_t)0);
    uint64_t cur = atomic_load(&b->word);
    for (;;) {
        word w = unpack(cur);
        if (w.state == BW_BREAKER_CLOSED) {
            /* Nothing to transition; start counting afresh, as the operator asked. */
            failures_clear(b, w.gen);
            for (size_t i = 0; i < BW_BREAKER_WINDOW_BUCKETS; i++)
                atomic_store(&b->window[i], (uint64_t)0);
            atomic_store_explicit(&b->updated_at_ms, now_ms, memory_order_relaxed);
            return false;
        }
        word n = next_state(w, BW_BREAKER_CLOSED);
        n.level = 0;
        n.jitter = 0;
        if (transition(b, &cur, n, now_ms, now_ms)) {
            note(t, w, n, BW_BREAKER_CAUSE_RESET);
            return true;
        }
    }
}

bool bw_breaker_force(bw_breaker *b, const bw_breaker_conf *c, bw_breaker_state state,
                      uint64_t opened_at_ms, uint64_t now_ms, bw_breaker_transition *t)
{
    clear_transition(t);
    if ((unsigned)state > BW_BREAKER_HALF_OPEN)
        return false;
    uint64_t since = now_ms;
    /* The fleet's opening time, but never in the future: another host's clock may run ahead. */
    if (state == BW_BREAKER_OPEN && opened_at_ms != 0 && opened_at_ms < now_ms)
        since = opened_at_ms;
    uint64_t cur = atomic_load(&b->word);
    for (;;) {
        word w = unpack(cur);
        if (w.state == (unsigned)state)
            return false;
        word n = next_state(w, (unsigned)state);
        if (state == BW_BREAKER_CLOSED) {
            n.level = 0;
            n.jitter = 0;
        } else if (n.level == 0) {
            n.level = 1;
        }
        if (transition(b, &cur, n, since, now_ms)) {
            note(t, w, n, BW_BREAKER_CAUSE_FORCED);
            if (t != NULL && state == BW_BREAKER_OPEN)
                t->wait_ms = wait_for(c, n.level, n.jitter);
            return true;
        }
    }
}

/*
 * Following the fleet keeps its backoff: the open period is the fleet's (its start, level and
 * jitter), and half_open elsewhere is not copied here (see the header). A fleet opening that
 * differs from the local one (a later re-opening, another level) is a new open period here too.
 */
bool bw_breaker_follow(bw_breaker *b, const bw_breaker_conf *c, bw_breaker_state state,
                       uint64_t opened_at_ms, uint64_t delay_ms, unsigned level, unsigned jitter,
                       uint64_t now_ms, bw_breaker_transition *t)
{
    clear_transition(t);
    if ((unsigned)state > BW_BREAKER_HALF_OPEN)
        return false;
    if (state == BW_BREAKER_CLOSED)
        return bw_breaker_force(b, c, state, 0, now_ms, t);
    if (level > W_LEVEL_MASK)
        level = W_LEVEL_MASK;
    if (jitter > W_JITTER_MASK)
        jitter = W_JITTER_MASK;
    /* Never in the future: another host's clock may run ahead. */
    uint64_t opened = opened_at_ms != 0 && opened_at_ms < now_ms ? opened_at_ms : now_ms;
    uint64_t cur = atomic_load(&b->word);
    for (;;) {
        word w = unpack(cur);
        if (w.state == BW_BREAKER_HALF_OPEN && state == BW_BREAKER_HALF_OPEN)
            return false; /* probing here too, on its own timer */
        if (w.state == BW_BREAKER_OPEN &&
            (level == 0 || (w.level == level && w.jitter == jitter)) &&
            atomic_load_explicit(&b->opened_at_ms, memory_order_relaxed) >= opened)
            return false; /* the same open period, or a newer local one */
        word n = next_state(w, BW_BREAKER_OPEN);
        if (level != 0) {
            n.level = level;
            n.jitter = jitter;
        } else if (n.level == 0) {
            n.level = 1;
        }
        if (transition(b, &cur, n, opened + delay_ms, now_ms)) {
            /* The fleet's opening time, not this instance's de-synchronised start. */
            atomic_store_explicit(&b->opened_at_ms, opened, memory_order_relaxed);
            note(t, w, n, BW_BREAKER_CAUSE_FORCED);
            if (t != NULL)
                t->wait_ms = wait_for(c, n.level, n.jitter) + delay_ms;
            return true;
        }
    }
}

/* Backoff level and jitter of the current (or last) open period, for the fleet record. */
void bw_breaker_backoff(const bw_breaker *b, unsigned *level, unsigned *jitter)
{
    word w = unpack(atomic_load(&b->word));
    *level = w.level;
    *jitter = w.jitter;
}

void bw_breaker_snapshot(const bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms,
                         bw_breaker_view *out)
{
    memset(out, 0, sizeof(*out));
    word w = unpack(atomic_load(&b->word));
    out->state = (bw_breaker_state)w.state;
    out->generation = w.gen;
    out->updated_at_ms = atomic_load_explicit(&b->updated_at_ms, memory_order_relaxed);
    uint64_t s = atomic_load(&b->since);
    bool since_known = stamp_tag(s) == since_tag(w);
    /* An unwritten time is what the next allow() will repair it to: now. */
    out->since_ms = since_known ? stamp_ms(s) : now_ms;

    uint64_t f = atomic_load(&b->failures);
    if (w.state == BW_BREAKER_CLOSED && (uint32_t)(f >> 32) == w.gen)
        out->failures = (uint32_t)f;
    out->opened_at_ms = atomic_load_explicit(&b->opened_at_ms, memory_order_relaxed);
    out->openings = w.level;
    if (w.state == BW_BREAKER_CLOSED) {
        out->wait_ms = wait_for(c, 1, 0);
        if (c->failure_rate_percent > 0)
            window_sum(b, c, w.gen, now_ms, &out->window_requests, &out->window_failures);
    } else {
        out->wait_ms = wait_for(c, w.level, w.jitter);
    }
    if (w.state == BW_BREAKER_OPEN)
        out->retry_after_ms = sat_sub(out->since_ms + out->wait_ms, now_ms);
    if (w.state == BW_BREAKER_HALF_OPEN) {
        out->half_open_permits = w.permits;
        out->half_open_successes = w.successes;
    }
    for (unsigned i = 0; i < 3; i++) {
        uint64_t v = atomic_load(&b->tally[i]);
        out->transitions[i] = tally_count(v);
        /* A transition whose winner has not counted it yet (or died first) is still one. */
        if (i == w.state && tally_gen(v) != w.gen)
            out->transitions[i]++;
    }
    out->rejected = atomic_load_explicit(&b->rejected, memory_order_relaxed);
    out->probes = atomic_load_explicit(&b->probes, memory_order_relaxed);
    out->lease_expiries = atomic_load_explicit(&b->lease_expiries, memory_order_relaxed);
    out->successes = atomic_load_explicit(&b->successes, memory_order_relaxed);
    out->failures_total = atomic_load_explicit(&b->failures_total, memory_order_relaxed);
    out->slow_calls = atomic_load_explicit(&b->slow_calls, memory_order_relaxed);
    out->stale_outcomes = atomic_load_explicit(&b->stale_outcomes, memory_order_relaxed);
    out->forced_at_ms = atomic_load_explicit(&b->forced_at_ms, memory_order_relaxed);
    if (out->forced_at_ms != 0) {
        /* Held open: whatever late outcomes did to the word, nothing is let through. */
        out->forced = true;
        out->state = BW_BREAKER_OPEN;
        out->retry_after_ms = 0;
        out->half_open_permits = 0;
        out->half_open_successes = 0;
    }
}

bool bw_breaker_is_failure_status(const bw_breaker_conf *c, int status)
{
    size_t n = c->n_failure_statuses;
    if (n > BW_CONFIG_MAX_FAILURE_STATUSES)
        n = BW_CONFIG_MAX_FAILURE_STATUSES;
    for (size_t i = 0; i < n; i++) {
        if (c->failure_statuses[i] == status)
            return true;
    }
    return false;
}

bool bw_breaker_is_slow(const bw_breaker_conf *c, uint64_t duration_ms)
{
    return c->slow_call_ms > 0 && duration_ms > c->slow_call_ms;
}

bw_breaker_outcome bw_breaker_classify(const bw_breaker_conf *c, int status, uint64_t duration_ms)
{
    if (status <= 0 || bw_breaker_is_failure_status(c, status))
        return BW_BREAKER_FAILURE;
    if (bw_breaker_is_slow(c, duration_ms))
        return BW_BREAKER_SLOW;
    return BW_BREAKER_SUCCESS;
}

const char *bw_breaker_state_name(bw_breaker_state state)
{
    switch (state) {
    case BW_BREAKER_CLOSED:
        return "closed";
    case BW_BREAKER_OPEN:
        return "open";
    case BW_BREAKER_HALF_OPEN:
        return "half_open";
    }
    return "unknown";
}

int bw_breaker_state_metric(bw_breaker_state state)
{
    switch (state) {
    case BW_BREAKER_CLOSED:
        return 1;
    case BW_BREAKER_OPEN:
        return 2;
    case BW_BREAKER_HALF_OPEN:
        return 3;
    }
    return 0;
}

const char *bw_breaker_cause_name(bw_breaker_cause cause)
{
    switch (cause) {
    case BW_BREAKER_CAUSE_NONE:
        return "none";
    case BW_BREAKER_CAUSE_CONSECUTIVE:
        return "consecutive_failures";
    case BW_BREAKER_CAUSE_RATE:
        return "failure_rate";
    case BW_BREAKER_CAUSE_TIMEOUT:
        return "reset_timeout";
    case BW_BREAKER_CAUSE_PROBE_OK:
        return "probe_success";
    case BW_BREAKER_CAUSE_PROBE_FAIL:
        return "probe_failure";
    case BW_BREAKER_CAUSE_RESET:
        return "manual_reset";
    case BW_BREAKER_CAUSE_FORCED:
        return "fleet";
    }
    return "unknown";
}

uint64_t bw_breaker_retry_after_s(uint64_t retry_after_ms)
{
    uint64_t s = retry_after_ms / 1000 + (retry_after_ms % 1000 ? 1 : 0);
    return s ? s : 1;
}

int bw_breaker_describe(const bw_breaker_transition *t, char *buf, size_t len)
{
    const char *from = bw_breaker_state_name(t->from);
    const char *to = bw_breaker_state_name(t->to);
    switch (t->cause) {
    case BW_BREAKER_CAUSE_CONSECUTIVE:
        return snprintf(buf, len, "%s -> %s after %" PRIu32 " consecutive failures", from, to,
                        t->failures);
    case BW_BREAKER_CAUSE_RATE:
        return snprintf(
            buf, len, "%s -> %s after %" PRIu32 " failures in %" PRIu32 " requests (%" PRIu32 "%%)",
            from, to, t->failures, t->requests,
            t->requests ? (uint32_t)((uint64_t)t->failures * 100 / t->requests) : 0);
    case BW_BREAKER_CAUSE_TIMEOUT:
        return snprintf(buf, len, "%s -> %s after %" PRIu64 " ms open", from, to, t->wait_ms);
    case BW_BREAKER_CAUSE_PROBE_OK:
        return snprintf(buf, len, "%s -> %s after %" PRIu32 " successful probes", from, to,
                        t->successes);
    case BW_BREAKER_CAUSE_PROBE_FAIL:
        return snprintf(buf, len, "%s -> %s after a failed probe, open for %" PRIu64 " ms", from,
                        to, t->wait_ms);
    case BW_BREAKER_CAUSE_RESET:
        return snprintf(buf, len, "%s -> %s by operator reset", from, to);
    case BW_BREAKER_CAUSE_FORCED:
        return snprintf(buf, len, "%s -> %s as seen by the fleet", from, to);
    case BW_BREAKER_CAUSE_NONE:
        break;
    }
    return snprintf(buf, len, "%s -> %s", from, to);
}
