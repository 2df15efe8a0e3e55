/*
 * Rate limits: GCRA token buckets in a lock-free open-addressing table in shared memory.
 *
 * Bucket. A policy with capacity C and refill R tokens/s has an emission interval T = 1/R
 * (nanoseconds, rounded up so that rounding can only ever make the limit stricter) and a window
 * C*T. A key's state is one word, its theoretical arrival time TAT: the bucket is full when
 * TAT <= now and holds floor((now + C*T - TAT) / T) tokens otherwise. Taking a token moves TAT to
 * max(TAT, now) + T and is allowed when that stays within the window. So a decision is one load,
 * a little arithmetic and one compare-and-swap; a worker killed anywhere in it has either
 * published its new TAT or not. A clock that goes backwards only makes TAT look further away,
 * i.e. it can refuse a request but never grant an extra token.
 * Policies that never refill (R == 0) cannot use time; their word counts tokens taken instead
 * (bit 63 set tells the two encodings apart, see "value word" below), so exactly C requests
 * are accepted for as long as the key stays in the table.
 *
 * Table. Slots of two 64-bit atomics {tag, value}, 16 bytes, four per cache line. The tag is the
 * client key's seeded hash mixed with the policy id, with the policy id also kept in its top 16
 * bits (so a metrics scrape can count keys per policy) and never 0, because 0 marks a slot
 * that was never used. A key lives in one of BW_RATELIMIT_PROBE consecutive slots from its home
 * slot. Claimers always take the first claimable slot of the window and slots are never emptied
 * again, so a lookup can stop at the first empty slot. A slot is claimable when it is empty or
 * idle (its bucket is full again: forgetting it changes nothing). When the whole window is busy,
 * the entry closest to full is evicted (and counted): the request is never refused for lack of
 * room, and the key that loses its entry loses at most the debt it still had.
 *
 * Claiming is two CASes, each leaving a valid table if the worker dies right after it:
 * first the victim's value is reset to 0 (a full bucket: for an idle victim that is no change,
 * for a busy one it is the eviction), then the tag is swapped to the new key, whose bucket is
 * then full, as a new key's should be. Value 0 is deliberately not "idle", so a slot just claimed
 * is not taken away again by another claimer before its first decision lands.
 * Known, bounded races (documented in docs/rate-limits.md): two workers claiming the same new key
 * at the same instant in a window without an empty slot may create a duplicate whose first token
 * is lost (lookups use the first match); a worker whose slot is evicted between its load and its
 * CAS charges one token to the key that replaced it.
 */
#include "breakwater/ratelimit.h"

#include <endian.h>
#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/random.h>
#include <sys/types.h>

#include <openssl/evp.h>

/* The table is shared between processes: only lock-free atomics are address-free and safe
 * against a holder being killed (a lock-based fallback would deadlock the survivors). */
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free");
_Static_assert(sizeof(unsigned long long) == sizeof(uint64_t), "uint64_t is 64 bits");

#define RL_MAGIC UINT64_C(0x62777261746531) /* "bwrate1" */
#define NS_PER_SEC UINT64_C(1000000000)

/* Value word. Time mode (bit 63 clear): the TAT in ns; 0 is "claimed, full, no decision yet".
 * Count mode (bit 63 set): bits 32..62 last-seen second, bits 0..31 tokens taken. A word of the
 * other mode (left by a reload that changed refill to or from 0) reads as a full bucket. */
#define COUNT_FLAG (UINT64_C(1) << 63)
#define COUNT_MASK UINT64_C(0xffffffff)
#define SEEN_MAX UINT64_C(0x7fffffff)

/* Clock values are capped at 2^62 ns (146 years of uptime) and windows at 2^61 ns (73 years),
 * so a TAT never exceeds 2^63 - 1 and never collides with COUNT_FLAG or overflows. */
#define NOW_MAX (UINT64_C(1) << 62)
#define WINDOW_MAX (UINT64_C(1) << 61)

#define TAG_POLICY_SHIFT 48
#define TAG_HASH_MASK ((UINT64_C(1) << TAG_POLICY_SHIFT) - 1)

typedef struct bw_rl_slot {
    _Atomic uint64_t tag;
    _Atomic uint64_t value;
} bw_rl_slot;

struct bw_ratelimit_table {
    uint64_t magic;
    uint32_t entries;
    uint32_t probe;
    _Atomic uint64_t evictions;
    _Atomic uint64_t reclaims;
    uint64_t fleet_off;              /* bytes from the table to its fleet area; 0 = none */
    _Atomic uint64_t fleet_share;    /* > 1: Redis is down, limit each key to 1/share of it */
    _Atomic uint64_t fleet_lost;     /* unsent tokens of busy keys forced out of the table */
    _Atomic uint64_t owed_evictions; /* such evictions, counted apart from idle reclaims */
    bw_rl_slot slots[];
};

/*
 * Fleet area (only in tables made by bw_ratelimit_table_init_fleet), parallel to the slots:
 * first one 32-bit counter per slot of tokens taken and not yet handed to the master (dense, so
 * the master's scan reads 4 bytes per slot), then one key record per slot: the key's
 * fleet-wide name, published like a sequence lock. The owner word is 0 while the text is being
 * written and the slot's tag once it is complete; a reader that sees the same owner before and
 * after copying the text, equal to the slot's current tag, has a consistent copy.
 */
#define FLEET_TEXT_WORDS 6
typedef struct bw_rl_fleet_key {
    _Atomic uint64_t owner;
    _Atomic uint64_t text[FLEET_TEXT_WORDS]; /* byte 0: length, then the characters */
} bw_rl_fleet_key;

_Static_assert(BW_RATELIMIT_FLEET_KEY_MAX + 1 <= FLEET_TEXT_WORDS * 8, "key text fits");

_Static_assert(sizeof(bw_rl_slot) == 16, "slot is two words");
_Static_assert(sizeof(struct bw_ratelimit_table) == 64, "header is one cache line");

void bw_ratelimit_params_init(bw_ratelimit_params *out, uint32_t capacity, double refill_per_sec,
                              bool dry_run)
{
    memset(out, 0, sizeof(*out));
    if (capacity == 0)
        capacity = 1;
    out->limit = capacity;
    out->capacity = capacity;
    out->dry_run = dry_run;
    if (!(refill_per_sec > 0))
        return; /* 0, negative or NaN: never refills */
    double interval = ceil(1e9 / refill_per_sec);
    if (interval < 1)
        interval = 1;
    if (interval > (double)WINDOW_MAX)
        return; /* one token per 73 years or slower: indistinguishable from never */
    out->interval_ns = (uint64_t)interval;
    /* A window beyond 73 years cannot be represented; no real policy gets near it. */
    if (out->capacity > WINDOW_MAX / out->interval_ns)
        out->capacity = (uint32_t)(WINDOW_MAX / out->interval_ns);
    out->window_ns = (uint64_t)out->capacity * out->interval_ns;
}

void bw_ratelimit_params_from_conf(const bw_ratelimit_conf *conf, bw_ratelimit_params *out)
{
    bw_ratelimit_params_init(out, conf->capacity, conf->refill_per_sec, conf->dry_run);
}

size_t bw_ratelimit_table_size_bytes(uint32_t entries)
{
    if (entries == 0)
        entries = 1;
    return sizeof(struct bw_ratelimit_table) + (size_t)entries * sizeof(bw_rl_slot);
}

bw_ratelimit_table *bw_ratelimit_table_init(void *mem, uint32_t entries)
{
    bw_ratelimit_table *t = mem;
    if (entries == 0)
        entries = 1;
    t->magic = RL_MAGIC;
    t->entries = entries;
    t->probe = entries < BW_RATELIMIT_PROBE ? entries : BW_RATELIMIT_PROBE;
    atomic_init(&t->evictions, 0);
    atomic_init(&t->reclaims, 0);
    t->fleet_off = 0;
    atomic_init(&t->fleet_share, 0);
    atomic_init(&t->fleet_lost, 0);
    atomic_init(&t->owed_evictions, 0);
    for (uint32_t i = 0; i < entries; i++) {
        atomic_init(&t->slots[i].tag, 0);
        atomic_init(&t->slots[i].value, 0);
    }
    return t;
}

bw_ratelimit_table *bw_ratelimit_table_attach(void *mem)
{
    bw_ratelimit_table *t = mem;
    if (t == NULL || t->magic != RL_MAGIC || t->entries == 0)
        return NULL;
    return t;
}

/* A bijective 64-bit mixer (splitmix64's finaliser): spreads policy id and hash over all bits. */
static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= UINT64_C(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x *= UINT64_C(0x94d049bb133111eb);
    x ^= x >> 31;
    return x;
}

static uint64_t policy_bits(uint32_t policy_id)
{
    return (uint64_t)(policy_id % BW_RATELIMIT_MAX_POLICIES) + 1;
}

/* Tag and home slot of a key; the policy id rides in the top bits, never zero. */
static uint64_t key_tag(const bw_ratelimit_table *t, uint32_t policy_id, uint64_t key_hash,
                        uint32_t *home)
{
    uint64_t pid = policy_bits(policy_id);
    uint64_t h = mix64(key_hash ^ (pid * UINT64_C(0x9e3779b97f4a7c15)));
    /* Multiply-shift maps 32 hash bits onto any table size without a division. */
    *home = (uint32_t)(((h & UINT64_C(0xffffffff)) * t->entries) >> 32);
    return (pid << TAG_POLICY_SHIFT) | ((h >> 16) & TAG_HASH_MASK);
}

uint32_t bw_ratelimit_table_home(const bw_ratelimit_table *t, uint32_t policy_id, uint64_t key_hash)
{
    uint32_t home;
    key_tag(t, policy_id, key_hash, &home);
    return home;
}

static bw_rl_slot *slot_at(bw_ratelimit_table *t, uint32_t home, uint32_t i)
{
    uint32_t idx = home + i;
    if (idx >= t->entries || idx < home)
        idx -= t->entries;
    return &t->slots[idx];
}

void bw_ratelimit_prefetch(bw_ratelimit_table *t, uint32_t policy_id, uint64_t key_hash)
{
    uint32_t home;
    (void)key_tag(t, policy_id, key_hash, &home);
    /* The probe window is a few consecutive cache lines (four 16-byte slots each). */
    for (uint32_t i = 0; i < t->probe; i += 4)
        __builtin_prefetch(slot_at(t, home, i), 1, 1);
}

/* Idle: a time-mode bucket that is full again. 0 (just claimed) and count mode never are. */
static bool value_idle(uint64_t v, uint64_t now)
{
    return !(v & COUNT_FLAG) && v != 0 && v <= now;
}

/* Eviction preference among busy entries, smaller first: time-mode entries by TAT (the one
 * closest to full loses least), then count-mode entries, least recently seen first. */
static bool victim_better(uint64_t a, uint64_t b)
{
    bool ca = (a & COUNT_FLAG) != 0, cb = (b & COUNT_FLAG) != 0;
    if (ca != cb)
        return !ca;
    return a < b; /* count mode: the last-seen second is the high field, so this is LRU */
}

/* One GCRA decision on a slot known to hold tag. Returns false when the slot changed owner
 * under us (the caller looks the key up again). */
static bool decide_time(bw_rl_slot *s, uint64_t tag, const bw_ratelimit_params *p, uint64_t now,
                        bw_ratelimit_result *out)
{
    uint64_t T = p->interval_ns, window = p->window_ns;
    uint64_t v = atomic_load_explicit(&s->value, memory_order_acquire);
    for (;;) {
        uint64_t tat = (v & COUNT_FLAG) ? 0 : v;
        uint64_t base = tat > now ? tat : now;
        uint64_t next = base + T;
        if (next - now > window) {
            /* Refused: nothing to write. base == tat > now here, since T <= window. */
            out->allowed = false;
            out->remaining = 0;
            out->reset_after_ns = tat - now;
            out->retry_after_ns = next - now - window;
            return true;
        }
        if (atomic_compare_exchange_weak_explicit(&s->value, &v, next, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            uint64_t ahead = next - now;
            out->allowed = true;
            out->remaining = (uint32_t)((window - ahead) / T);
            out->reset_after_ns = ahead;
            out->retry_after_ns = out->remaining > 0 ? 0 : ahead + T - window;
            return true;
        }
        if (atomic_load_explicit(&s->tag, memory_order_acquire) != tag)
            return false;
    }
}

/* The count-mode decision for buckets that never refill. Refused requests still refresh the
 * last-seen second (at most one write per second) so a client hammering an exhausted bucket
 * stays "recently used" and is not the first to be evicted, which would reset it. */
static bool decide_count(bw_rl_slot *s, uint64_t tag, const bw_ratelimit_params *p, uint64_t now,
                         bw_ratelimit_result *out)
{
    uint64_t sec = now / NS_PER_SEC;
    if (sec > SEEN_MAX)
        sec = SEEN_MAX;
    uint64_t v = atomic_load_explicit(&s->value, memory_order_acquire);
    for (;;) {
        uint64_t taken = 0, seen = 0;
        if (v & COUNT_FLAG) {
            taken = v & COUNT_MASK;
            seen = (v >> 32) & SEEN_MAX;
        }
        uint64_t newseen = seen > sec ? seen : sec;
        out->reset_after_ns = BW_RATELIMIT_NEVER;
        if (taken >= p->capacity) {
            out->allowed = false;
            out->remaining = 0;
            out->retry_after_ns = BW_RATELIMIT_NEVER;
            if (newseen != seen) {
                uint64_t nv = COUNT_FLAG | (newseen << 32) | taken;
                atomic_compare_exchange_strong_explicit(&s->value, &v, nv, memory_order_acq_rel,
                                                        memory_order_acquire);
            }
            return true;
        }
        uint64_t nv = COUNT_FLAG | (newseen << 32) | (taken + 1);
        if (atomic_compare_exchange_weak_explicit(&s->value, &v, nv, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            out->allowed = true;
            out->remaining = (uint32_t)(p->capacity - taken - 1);
            out->retry_after_ns = out->remaining > 0 ? 0 : BW_RATELIMIT_NEVER;
            return true;
        }
        if (atomic_load_explicit(&s->tag, memory_order_acquire) != tag)
            return false;
    }
}

static bool decide(bw_rl_slot *s, uint64_t tag, const bw_ratelimit_params *p, uint64_t now,
                   bw_ratelimit_result *out)
{
    if (p->interval_ns == 0)
        return decide_count(s, tag, p, now, out);
    return decide_time(s, tag, p, now, out);
}

static _Atomic uint32_t *fleet_pending(const bw_ratelimit_table *t)
{
    return (_Atomic uint32_t *)((unsigned char *)t + t->fleet_off);
}

/* The pending counters take entries * 4 bytes, rounded up to keep the key records aligned. */
static size_t fleet_pending_bytes(uint32_t entries)
{
    return ((size_t)entries * sizeof(uint32_t) + 63) & ~(size_t)63;
}

static bw_rl_fleet_key *fleet_key(const bw_ratelimit_table *t, uint32_t idx)
{
    unsigned char *base = (unsigned char *)t + t->fleet_off + fleet_pending_bytes(t->entries);
    return &((bw_rl_fleet_key *)base)[idx];
}

static uint32_t slot_index(const bw_ratelimit_table *t, const bw_rl_slot *s)
{
    return (uint32_t)(s - t->slots);
}

/* In a fleet table a slot whose tokens have not reached the master yet is never reclaimed as
 * idle: reusing it would lose them. Forced eviction still may (and counts what it loses). */
static bool fleet_busy(const bw_ratelimit_table *t, const bw_rl_slot *s)
{
    if (t->fleet_off == 0)
        return false;
    return atomic_load_explicit(&fleet_pending(t)[slot_index(t, s)], memory_order_relaxed) != 0;
}

/* A slot just changed hands: what is still pending belongs to the key that left, and the key
 * text no longer names the slot's key. */
static void fleet_claimed(bw_ratelimit_table *t, bw_rl_slot *s)
{
    if (t->fleet_off == 0)
        return;
    uint32_t idx = slot_index(t, s);
    uint32_t lost = atomic_exchange_explicit(&fleet_pending(t)[idx], 0, memory_order_relaxed);
    if (lost != 0) {
        atomic_fetch_add_explicit(&t->fleet_lost, lost, memory_order_relaxed);
        atomic_fetch_add_explicit(&t->owed_evictions, 1, memory_order_relaxed);
    }
    atomic_store_explicit(&fleet_key(t, idx)->owner, 0, memory_order_release);
}

/* The lookup-claim-decide loop shared by both take functions; *slot_out and *tag_out say which
 * slot decided, for the fleet bookkeeping. */
static bw_ratelimit_decision take_slot(bw_ratelimit_table *t, uint32_t policy_id, uint64_t key_hash,
                                       const bw_ratelimit_params *p, uint64_t now,
                                       bw_ratelimit_result *out, bw_rl_slot **slot_out,
                                       uint64_t *tag_out)
{
    uint32_t home;
    uint64_t tag = key_tag(t, policy_id, key_hash, &home);
    if (now > NOW_MAX)
        now = NOW_MAX;
    memset(out, 0, sizeof(*out));
    out->limit = p->limit;

    for (;;) {
        bw_rl_slot *found = NULL, *claim = NULL, *victim = NULL;
        uint64_t claim_tag = 0, claim_value = 0, victim_tag = 0, victim_value = 0;

        for (uint32_t i = 0; i < t->probe; i++) {
            bw_rl_slot *s = slot_at(t, home, i);
            uint64_t tg = atomic_load_explicit(&s->tag, memory_order_acquire);
            if (tg == tag) {
                found = s;
                break;
            }
            if (tg == 0) {
                /* Never used: nothing beyond it was ever placed for this window's keys. */
                if (claim == NULL) {
                    claim = s;
                    claim_tag = 0;
                }
                break;
            }
            uint64_t v = atomic_load_explicit(&s->value, memory_order_acquire);
            if (claim == NULL && value_idle(v, now) && !fleet_busy(t, s)) {
                claim = s;
                claim_tag = tg;
                claim_value = v;
            } else if (victim == NULL || victim_better(v, victim_value)) {
                victim = s;
                victim_tag = tg;
                victim_value = v;
            }
        }

        bool forced = false;
        if (found == NULL) {
            if (claim == NULL) {
                claim = victim;
                claim_tag = victim_tag;
                claim_value = victim_value;
                forced = true;
            }
            if (claim_tag != 0) {
                /* Reset first, then hand over: each step alone leaves a valid entry. */
                if (!atomic_compare_exchange_strong_explicit(
                        &claim->value, &claim_value, 0, memory_order_acq_rel, memory_order_acquire))
                    continue;
            }
            if (!atomic_compare_exchange_strong_explicit(
                    &claim->tag, &claim_tag, tag, memory_order_acq_rel, memory_order_acquire))
                continue;
            fleet_claimed(t, claim);
            if (forced)
                atomic_fetch_add_explicit(&t->evictions, 1, memory_order_relaxed);
            else if (claim_tag != 0)
                atomic_fetch_add_explicit(&t->reclaims, 1, memory_order_relaxed);
            found = claim;
        }

        if (decide(found, tag, p, now, out)) {
            *slot_out = found;
            *tag_out = tag;
            out->evicted = forced;
            out->limit = p->limit;
            if (out->allowed)
                return BW_RATELIMIT_ALLOW;
            return p->dry_run ? BW_RATELIMIT_DRY_RUN : BW_RATELIMIT_REFUSE;
        }
    }
}

bw_ratelimit_decision bw_ratelimit_take(bw_ratelimit_table *t, uint32_t policy_id,
                                        uint64_t key_hash, const bw_ratelimit_params *p,
                                        uint64_t now, bw_ratelimit_result *out)
{
    bw_rl_slot *slot;
    uint64_t tag;
    return take_slot(t, policy_id, key_hash, p, now, out, &slot, &tag);
}

uint64_t bw_ratelimit_ceil_seconds(uint64_t ns)
{
    if (ns >= BW_RATELIMIT_MAX_SECONDS * NS_PER_SEC)
        return BW_RATELIMIT_MAX_SECONDS;
    return (ns + NS_PER_SEC - 1) / NS_PER_SEC;
}

void bw_ratelimit_table_count_keys(const bw_ratelimit_table *t, uint64_t now, uint64_t *counts,
                                   uint32_t n_policies)
{
    memset(counts, 0, (size_t)n_policies * sizeof(*counts));
    bw_ratelimit_table *mt = (bw_ratelimit_table *)t; /* atomic loads take non-const pointers */
    for (uint32_t i = 0; i < t->entries; i++) {
        uint64_t tg = atomic_load_explicit(&mt->slots[i].tag, memory_order_relaxed);
        if (tg == 0)
            continue;
        uint64_t pid = (tg >> TAG_POLICY_SHIFT) - 1;
        if (pid >= n_policies)
            continue;
        uint64_t v = atomic_load_explicit(&mt->slots[i].value, memory_order_relaxed);
        if ((v & COUNT_FLAG) || v > now)
            counts[pid]++;
    }
}

void bw_ratelimit_table_stats(const bw_ratelimit_table *t, bw_ratelimit_stats *out)
{
    bw_ratelimit_table *mt = (bw_ratelimit_table *)t;
    out->entries = t->entries;
    out->bytes = bw_ratelimit_table_size_bytes(t->entries);
    out->evictions = atomic_load_explicit(&mt->evictions, memory_order_relaxed);
    out->reclaims = atomic_load_explicit(&mt->reclaims, memory_order_relaxed);
    out->owed_evictions =
        t->fleet_off != 0 ? atomic_load_explicit(&mt->owed_evictions, memory_order_relaxed) : 0;
    out->owed_tokens_lost =
        t->fleet_off != 0 ? atomic_load_explicit(&mt->fleet_lost, memory_order_relaxed) : 0;
}

void bw_ratelimit_fleet_count_lost(bw_ratelimit_table *t, uint64_t tokens)
{
    if (t->fleet_off == 0 || tokens == 0)
        return;
    atomic_fetch_add_explicit(&t->fleet_lost, tokens, memory_order_relaxed);
    atomic_fetch_add_explicit(&t->owed_evictions, 1, memory_order_relaxed);
}

size_t bw_ratelimit_table_check(const bw_ratelimit_table *t)
{
    bw_ratelimit_table *mt = (bw_ratelimit_table *)t;
    if (t->magic != RL_MAGIC || t->entries == 0 ||
        t->probe != (t->entries < BW_RATELIMIT_PROBE ? t->entries : BW_RATELIMIT_PROBE))
        return 1;
    size_t bad = 0;
    for (uint32_t i = 0; i < t->entries; i++) {
        uint64_t tg = atomic_load_explicit(&mt->slots[i].tag, memory_order_relaxed);
        uint64_t v = atomic_load_explicit(&mt->slots[i].value, memory_order_relaxed);
        if (tg == 0 && v != 0)
            bad++; /* values are only written after the tag */
        else if (tg != 0 && (tg >> TAG_POLICY_SHIFT) == 0)
            bad++;
        else if (!(v & COUNT_FLAG) && v > NOW_MAX + WINDOW_MAX)
            bad++;
    }
    return bad;
}

static uint64_t rotl64(uint64_t x, int b)
{
    return (x << b) | (x >> (64 - b));
}

/* SipHash reads its input as little-endian words, whatever the host. */
static uint64_t load_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return le64toh(v);
}

static void sip_round(uint64_t v[4])
{
    v[0] += v[1];
    v[1] = rotl64(v[1], 13);
    v[1] ^= v[0];
    v[0] = rotl64(v[0], 32);
    v[2] += v[3];
    v[3] = rotl64(v[3], 16);
    v[3] ^= v[2];
    v[0] += v[3];
    v[3] = rotl64(v[3], 21);
    v[3] ^= v[0];
    v[2] += v[1];
    v[1] = rotl64(v[1], 17);
    v[1] ^= v[2];
    v[2] = rotl64(v[2], 32);
}

/* SipHash-2-4 (Aumasson and Bernstein): a keyed hash built for exactly this job, hash tables
 * whose keys an attacker chooses. Short keys (an address is 17 bytes) cost a few dozen ns. */
uint64_t bw_ratelimit_hash(const bw_ratelimit_seed *seed, const void *data, size_t len)
{
    const uint8_t *in = data;
    uint64_t v[4] = {
        seed->k0 ^ UINT64_C(0x736f6d6570736575),
        seed->k1 ^ UINT64_C(0x646f72616e646f6d),
        seed->k0 ^ UINT64_C(0x6c7967656e657261),
        seed->k1 ^ UINT64_C(0x7465646279746573),
    };
    size_t whole = len - (len % 8);
    for (size_t off = 0; off < whole; off += 8) {
        uint64_t m = load_le64(in + off);
        v[3] ^= m;
        sip_round(v);
        sip_round(v);
        v[0] ^= m;
    }
    uint64_t last = (uint64_t)(len & 0xff) << 56;
    for (size_t i = 0; i < len % 8; i++)
        last |= (uint64_t)in[whole + i] << (8 * i);
    v[3] ^= last;
    sip_round(v);
    sip_round(v);
    v[0] ^= last;
    v[2] ^= 0xff;
    for (int i = 0; i < 4; i++)
        sip_round(v);
    return v[0] ^ v[1] ^ v[2] ^ v[3];
}

int bw_ratelimit_seed_random(bw_ratelimit_seed *out)
{
    uint64_t buf[2];
    size_t got = 0;
    while (got < sizeof(buf)) {
        ssize_t n = getrandom((uint8_t *)buf + got, sizeof(buf) - got, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)n;
    }
    out->k0 = buf[0];
    out->k1 = buf[1];
    return 0;
}

/*
 * Fleet support: what the master's Redis synchronisation needs from the table. Workers add one
 * relaxed increment per allowed request (bw_ratelimit_take_fleet) and write a key's fleet-wide
 * name once per slot claim; the master scans the dense pending counters, reads names, and pulls
 * the fleet's consumption back into a bucket with one compare-and-swap (absorb). Nothing here
 * blocks or allocates, and every step leaves a valid table if its process dies right after it.
 */

size_t bw_ratelimit_table_size_bytes_fleet(uint32_t entries)
{
    if (entries == 0)
        entries = 1;
    return bw_ratelimit_table_size_bytes(entries) + fleet_pending_bytes(entries) +
           (size_t)entries * sizeof(bw_rl_fleet_key);
}

bw_ratelimit_table *bw_ratelimit_table_init_fleet(void *mem, uint32_t entries)
{
    bw_ratelimit_table *t = bw_ratelimit_table_init(mem, entries);
    t->fleet_off = bw_ratelimit_table_size_bytes(t->entries);
    _Atomic uint32_t *pending = fleet_pending(t);
    for (uint32_t i = 0; i < t->entries; i++) {
        atomic_init(&pending[i], 0);
        bw_rl_fleet_key *k = fleet_key(t, i);
        atomic_init(&k->owner, 0);
        for (int w = 0; w < FLEET_TEXT_WORDS; w++)
            atomic_init(&k->text[w], 0);
    }
    return t;
}

bool bw_ratelimit_fleet_enabled(const bw_ratelimit_table *t)
{
    return t != NULL && t->fleet_off != 0;
}

uint32_t bw_ratelimit_table_entries(const bw_ratelimit_table *t)
{
    return t->entries;
}

static const char hex_digits[] = "0123456789abcdef";

size_t bw_ratelimit_fleet_key_text(const void *data, size_t len, bool digest,
                                   char out[BW_RATELIMIT_FLEET_KEY_MAX + 1])
{
    const uint8_t *in = data;
    bool plain = !digest && len > 0 && len <= BW_RATELIMIT_FLEET_KEY_MAX;
    for (size_t i = 0; plain && i < len; i++)
        plain = in[i] > 0x20 && in[i] < 0x7f;
    if (plain) {
        memcpy(out, in, len);
        out[len] = '\0';
        return len;
    }
    /* An unkeyed, collision-resistant digest: every instance must derive the same name, and a
     * client must not be able to make its name collide with another client's. */
    uint8_t md[32];
    unsigned int mdlen = 0;
    if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen < 16)
        memset(md, 0, sizeof(md));
    out[0] = 'h';
    out[1] = '-';
    for (size_t i = 0; i < 16; i++) {
        out[2 + 2 * i] = hex_digits[md[i] >> 4];
        out[3 + 2 * i] = hex_digits[md[i] & 15];
    }
    out[34] = '\0';
    return 34;
}

/* Publishes the slot's fleet name, sequence-lock style (see bw_rl_fleet_key). Two workers
 * writing the same key's name concurrently write the same bytes. */
static void fleet_write_key(bw_ratelimit_table *t, bw_rl_slot *s, uint64_t tag, const void *key,
                            size_t key_len, bool digest)
{
    bw_rl_fleet_key *k = fleet_key(t, slot_index(t, s));
    if (atomic_load_explicit(&k->owner, memory_order_acquire) == tag)
        return;
    char text[BW_RATELIMIT_FLEET_KEY_MAX + 1];
    size_t n = bw_ratelimit_fleet_key_text(key, key_len, digest, text);
    uint8_t buf[FLEET_TEXT_WORDS * 8];
    memset(buf, 0, sizeof(buf));
    buf[0] = (uint8_t)n;
    memcpy(buf + 1, text, n);
    atomic_store_explicit(&k->owner, 0, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    for (int w = 0; w < FLEET_TEXT_WORDS; w++) {
        uint64_t v;
        memcpy(&v, buf + 8 * w, sizeof(v));
        atomic_store_explicit(&k->text[w], v, memory_order_relaxed);
    }
    /* Publish only if the slot still belongs to this key; otherwise its new owner writes. */
    if (atomic_load_explicit(&s->tag, memory_order_acquire) == tag)
        atomic_store_explicit(&k->owner, tag, memory_order_release);
}

bw_ratelimit_decision bw_ratelimit_take_fleet(bw_ratelimit_table *t, uint32_t policy_id,
                                              uint64_t key_hash, const void *key, size_t key_len,
                                              bool digest, const bw_ratelimit_params *p,
                                              uint64_t now, bw_ratelimit_result *out)
{
    bw_rl_slot *slot = NULL;
    uint64_t tag = 0;
    bw_ratelimit_decision d = take_slot(t, policy_id, key_hash, p, now, out, &slot, &tag);
    if (t->fleet_off == 0 || slot == NULL)
        return d;
    if (out->allowed)
        atomic_fetch_add_explicit(&fleet_pending(t)[slot_index(t, slot)], 1, memory_order_relaxed);
    fleet_write_key(t, slot, tag, key, key_len, digest);
    return d;
}

bool bw_ratelimit_fleet_read(const bw_ratelimit_table *t, uint32_t idx,
                             bw_ratelimit_fleet_entry *out)
{
    if (t->fleet_off == 0 || idx >= t->entries)
        return false;
    bw_ratelimit_table *mt = (bw_ratelimit_table *)t;
    bw_rl_fleet_key *k = fleet_key(t, idx);
    uint64_t o1 = atomic_load_explicit(&k->owner, memory_order_acquire);
    if (o1 == 0)
        return false;
    uint8_t buf[FLEET_TEXT_WORDS * 8];
    for (int w = 0; w < FLEET_TEXT_WORDS; w++) {
        uint64_t v = atomic_load_explicit(&k->text[w], memory_order_relaxed);
        memcpy(buf + 8 * w, &v, sizeof(v));
    }
    atomic_thread_fence(memory_order_acquire);
    uint64_t o2 = atomic_load_explicit(&k->owner, memory_order_relaxed);
    uint64_t tag = atomic_load_explicit(&mt->slots[idx].tag, memory_order_acquire);
    if (o1 != o2 || o1 != tag || buf[0] == 0 || buf[0] > BW_RATELIMIT_FLEET_KEY_MAX)
        return false;
    out->tag = tag;
    out->policy_id = (uint32_t)((tag >> TAG_POLICY_SHIFT) - 1);
    memcpy(out->key, buf + 1, buf[0]);
    out->key[buf[0]] = '\0';
    out->key_len = buf[0];
    return true;
}

uint32_t bw_ratelimit_fleet_pending(const bw_ratelimit_table *t, uint32_t idx)
{
    if (t->fleet_off == 0 || idx >= t->entries)
        return 0;
    return atomic_load_explicit(&fleet_pending(t)[idx], memory_order_relaxed);
}

uint32_t bw_ratelimit_fleet_collect(bw_ratelimit_table *t, uint32_t idx, uint64_t tag)
{
    if (t->fleet_off == 0 || idx >= t->entries)
        return 0;
    if (atomic_load_explicit(&t->slots[idx].tag, memory_order_acquire) != tag)
        return 0;
    _Atomic uint32_t *pc = &fleet_pending(t)[idx];
    uint32_t n = atomic_exchange_explicit(pc, 0, memory_order_acq_rel);
    if (n != 0 && atomic_load_explicit(&t->slots[idx].tag, memory_order_acquire) != tag) {
        /* The slot changed hands meanwhile: these tokens are its new key's. Put them back. */
        atomic_fetch_add_explicit(pc, n, memory_order_relaxed);
        return 0;
    }
    return n;
}

bool bw_ratelimit_fleet_absorb(bw_ratelimit_table *t, uint32_t idx, uint64_t tag,
                               const bw_ratelimit_params *p, uint64_t now, uint64_t fleet)
{
    if (idx >= t->entries)
        return false;
    if (now > NOW_MAX)
        now = NOW_MAX;
    bw_rl_slot *s = &t->slots[idx];
    uint64_t v = atomic_load_explicit(&s->value, memory_order_acquire);
    for (;;) {
        if (atomic_load_explicit(&s->tag, memory_order_acquire) != tag)
            return false;
        uint64_t nv;
        if (p->interval_ns != 0) {
            if (v & COUNT_FLAG)
                return false; /* left by another refill mode: a reload will reset it */
            uint64_t ahead = fleet < WINDOW_MAX ? fleet : WINDOW_MAX;
            uint64_t target = now + ahead;
            if (v >= target)
                return true;
            nv = target;
        } else {
            uint64_t sec = now / NS_PER_SEC;
            if (sec > SEEN_MAX)
                sec = SEEN_MAX;
            uint64_t taken = 0, seen = 0;
            if (v & COUNT_FLAG) {
                taken = v & COUNT_MASK;
                seen = (v >> 32) & SEEN_MAX;
            }
            uint64_t want = fleet < COUNT_MASK ? fleet : COUNT_MASK;
            if (taken >= want)
                return true;
            nv = COUNT_FLAG | ((seen > sec ? seen : sec) << 32) | want;
        }
        if (atomic_compare_exchange_weak_explicit(&s->value, &v, nv, memory_order_acq_rel,
                                                  memory_order_acquire))
            return true;
    }
}

void bw_ratelimit_fleet_set_share(bw_ratelimit_table *t, uint32_t n)
{
    atomic_store_explicit(&t->fleet_share, n, memory_order_relaxed);
}

uint32_t bw_ratelimit_fleet_share(const bw_ratelimit_table *t)
{
    bw_ratelimit_table *mt = (bw_ratelimit_table *)t;
    return (uint32_t)atomic_load_explicit(&mt->fleet_share, memory_order_relaxed);
}

uint64_t bw_ratelimit_fleet_lost(const bw_ratelimit_table *t)
{
    bw_ratelimit_table *mt = (bw_ratelimit_table *)t;
    return atomic_load_explicit(&mt->fleet_lost, memory_order_relaxed);
}

void bw_ratelimit_params_share(const bw_ratelimit_params *in, uint32_t n, bw_ratelimit_params *out)
{
    *out = *in;
    if (n <= 1)
        return;
    out->capacity = in->capacity / n > 0 ? in->capacity / n : 1;
    out->limit = out->capacity;
    if (in->interval_ns != 0) {
        uint64_t iv = in->interval_ns;
        out->interval_ns = iv > WINDOW_MAX / n ? WINDOW_MAX : iv * n;
        if (out->capacity > WINDOW_MAX / out->interval_ns)
            out->capacity = (uint32_t)(WINDOW_MAX / out->interval_ns);
        if (out->capacity == 0)
            out->capacity = 1;
        out->window_ns = (uint64_t)out->capacity * out->interval_ns;
    }
}

bool bw_ratelimit_refill(bw_ratelimit_table *t, uint32_t policy_id, uint64_t key_hash)
{
    uint32_t home;
    uint64_t tag = key_tag(t, policy_id, key_hash, &home);
    bool found = false;
    for (uint32_t i = 0; i < t->probe; i++) {
        bw_rl_slot *s = slot_at(t, home, i);
        uint64_t tg = atomic_load_explicit(&s->tag, memory_order_acquire);
        if (tg == 0)
            break;
        if (tg != tag)
            continue;
        /* 0 is a full bucket in either encoding; a duplicate entry (see the races above) is
         * refilled too. */
        atomic_store_explicit(&s->value, (uint64_t)0, memory_order_release);
        found = true;
    }
    return found;
}
