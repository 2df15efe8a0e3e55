/*
 * Rate limits: token buckets for every (policy, client key) pair, kept in a fixed-size table in
 * the shared-memory region so that all workers limit a client together.
 *
 * A bucket is stored the GCRA way ("generic cell rate algorithm"): one 64-bit word holding the
 * theoretical arrival time (TAT) of the next request, the instant at which the bucket would be
 * full again if nothing else arrived. A decision reads that word, computes the new one and
 * publishes it with a single compare-and-swap, so a worker killed at any instruction has either
 * taken its token or not, and nobody ever waits for anybody. Policies that never refill
 * (refill_per_sec 0) store a count of tokens taken in the same word instead.
 *
 * Everything here is a pure function over memory the caller provides and a clock the caller
 * passes in (nanoseconds of CLOCK_MONOTONIC in production, anything in tests). docs/rate-limits.md
 * describes the semantics operators see.
 */
#ifndef BREAKWATER_RATELIMIT_H
#define BREAKWATER_RATELIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "breakwater/config.h"

/* A duration that never ends: reset/retry times of buckets that never refill. */
#define BW_RATELIMIT_NEVER UINT64_MAX
/* Largest number of seconds bw_ratelimit_ceil_seconds() returns (one year): what Retry-After and
 * RateLimit-Reset say for a bucket that will never refill. */
#define BW_RATELIMIT_MAX_SECONDS UINT64_C(31536000)
/* Slots examined per key: a key lives in one of the PROBE slots starting at its home slot. */
#define BW_RATELIMIT_PROBE 16
/* Policy ids are 0 .. BW_RATELIMIT_MAX_POLICIES-1 (the index of the policy in the config). */
#define BW_RATELIMIT_MAX_POLICIES 65535u

/* The table lives in shared memory; its layout is private to ratelimit.c. */
typedef struct bw_ratelimit_table bw_ratelimit_table;

/* Key for the seeded hash: chosen at random by the master once, inherited by every worker, kept
 * across reloads (the table outlives a reload and is indexed by these hashes). */
typedef struct bw_ratelimit_seed {
    uint64_t k0, k1;
} bw_ratelimit_seed;

/* A policy reduced to the integers a decision needs; computed once when the config is loaded. */
typedef struct bw_ratelimit_params {
    uint32_t limit;       /* configured capacity, for RateLimit-Limit */
    uint32_t capacity;    /* effective capacity (equal to limit unless the window was capped) */
    uint64_t interval_ns; /* emission interval 1/refill, rounded up; 0 = the bucket never refills */
    uint64_t window_ns; /* capacity * interval_ns: a TAT this far ahead of now is an empty bucket */
    bool dry_run;
} bw_ratelimit_params;

typedef enum bw_ratelimit_decision {
    BW_RATELIMIT_ALLOW = 0,   /* a token was taken */
    BW_RATELIMIT_REFUSE = 1,  /* no token: answer 429 */
    BW_RATELIMIT_DRY_RUN = 2, /* no token, but the policy is dry_run: count, log, let it through */
} bw_ratelimit_decision;

typedef struct bw_ratelimit_result {
    bool allowed;            /* a token was taken */
    bool evicted;            /* making room for this key forced a busy key out of the table */
    uint32_t limit;          /* RateLimit-Limit */
    uint32_t remaining;      /* whole tokens left after this request (RateLimit-Remaining) */
    uint64_t reset_after_ns; /* until the bucket is full again, or BW_RATELIMIT_NEVER */
    uint64_t retry_after_ns; /* until one token is available (0 when one is), or NEVER */
} bw_ratelimit_result;

typedef struct bw_ratelimit_stats {
    uint32_t entries;
    size_t bytes;
    uint64_t evictions;        /* busy keys forced out because their probe window was full */
    uint64_t reclaims;         /* idle entries (full buckets) reused for another key */
    uint64_t owed_evictions;   /* fleet tables: keys dropped while tokens were owed to the fleet
                                * (forced out with tokens not yet collected, or given up by the
                                * master's bounded list of undelivered keys) */
    uint64_t owed_tokens_lost; /* the tokens those keys still owed */
} bw_ratelimit_stats;

/* Precomputes a policy. refill_per_sec <= 0 (or NaN) means the bucket never refills. */
void bw_ratelimit_params_from_conf(const bw_ratelimit_conf *conf, bw_ratelimit_params *out);
/* Same from plain numbers (tests, benchmarks, environment overrides). */
void bw_ratelimit_params_init(bw_ratelimit_params *out, uint32_t capacity, double refill_per_sec,
                              bool dry_run);

/* Bytes of shared memory a table of this many entries needs (16 bytes per entry plus a header). */
size_t bw_ratelimit_table_size_bytes(uint32_t entries);
/* Formats a table in mem (zeroed or not; at least 8-byte aligned, size_bytes(entries) long).
 * Done by the master before fork. entries 0 is taken as 1. Returns mem as a table. */
bw_ratelimit_table *bw_ratelimit_table_init(void *mem, uint32_t entries);
/* The table formatted in mem, or NULL when mem does not hold one. */
bw_ratelimit_table *bw_ratelimit_table_attach(void *mem);

/*
 * Takes one token for key_hash under policy_id at time now (nanoseconds, monotonic). Never fails
 * and never blocks: a key that is not in the table is added, evicting another when needed.
 * The returned decision already accounts for dry_run; out->allowed says whether a token was taken.
 */
bw_ratelimit_decision bw_ratelimit_take(bw_ratelimit_table *t, uint32_t policy_id,
                                        uint64_t key_hash, const bw_ratelimit_params *p,
                                        uint64_t now, bw_ratelimit_result *out);

/* Operator refill (DELETE /ratelimits/{policy}/{key}): the key's bucket becomes full. Returns
 * false when the key has no entry (its bucket is full already). Lock-free, like a decision. */
bool bw_ratelimit_refill(bw_ratelimit_table *t, uint32_t policy_id, uint64_t key_hash);

/* Whole seconds, rounded up, for Retry-After and RateLimit-Reset; NEVER and anything beyond a
 * year become BW_RATELIMIT_MAX_SECONDS. */
uint64_t bw_ratelimit_ceil_seconds(uint64_t ns);

/* Starts loading a key's probe window into the cache. A table far larger than the cache costs
 * a miss per request; issued early, other work of the request hides most of it. */
void bw_ratelimit_prefetch(bw_ratelimit_table *t, uint32_t policy_id, uint64_t key_hash);

/* Seeded SipHash-2-4 of the key bytes: clients cannot choose keys that collide in the table. */
uint64_t bw_ratelimit_hash(const bw_ratelimit_seed *seed, const void *data, size_t len);
/* Fills a seed from the kernel's random source. Returns 0, or -1 (errno set). */
int bw_ratelimit_seed_random(bw_ratelimit_seed *out);

/*
 * Counts the keys each policy is currently limiting (entries whose bucket is not full), into
 * counts[0 .. n_policies-1] (overwritten). A scan of the whole table: meant for the metrics
 * scrape, never for the request path. Exact for a quiet table, a snapshot otherwise.
 */
void bw_ratelimit_table_count_keys(const bw_ratelimit_table *t, uint64_t now, uint64_t *counts,
                                   uint32_t n_policies);
void bw_ratelimit_table_stats(const bw_ratelimit_table *t, bw_ratelimit_stats *out);

/* Verifies the table's structural invariants (for tests and diagnostics). Returns the number of
 * slots that break one (0 for a sound table). */
size_t bw_ratelimit_table_check(const bw_ratelimit_table *t);

/* First slot of a key's probe window: lets tests build collisions on purpose. */
uint32_t bw_ratelimit_table_home(const bw_ratelimit_table *t, uint32_t policy_id,
                                 uint64_t key_hash);

/*
 * Fleet support (Redis synchronisation, see docs/redis.md). A table made with
 * bw_ratelimit_table_init_fleet() carries, per slot, a count of tokens taken and not yet
 * collected by the master, and the key's fleet-wide name: the same text on every instance
 * (the table's own hashes are seeded per instance). Tables made with bw_ratelimit_table_init()
 * have none of it, and the functions below then do nothing.
 */

/* Longest fleet key name; longer or unprintable keys are named "h-" + 32 hex digits of their
 * SHA-256. */
#define BW_RATELIMIT_FLEET_KEY_MAX 47

/* Bytes for a table with its fleet area (about 60 more per entry than without). */
size_t bw_ratelimit_table_size_bytes_fleet(uint32_t entries);
/* bw_ratelimit_table_init() plus the fleet area; mem must be size_bytes_fleet(entries) long. */
bw_ratelimit_table *bw_ratelimit_table_init_fleet(void *mem, uint32_t entries);
bool bw_ratelimit_fleet_enabled(const bw_ratelimit_table *t);
uint32_t bw_ratelimit_table_entries(const bw_ratelimit_table *t);

/* The fleet name of a key: the bytes themselves when digest is false and they are 1..47
 * printable ASCII characters (a client address), else "h-" + hex of an unkeyed SHA-256 (header
 * values). Returns the length written into out (NUL-terminated). */
size_t bw_ratelimit_fleet_key_text(const void *data, size_t len, bool digest,
                                   char out[BW_RATELIMIT_FLEET_KEY_MAX + 1]);

/*
 * bw_ratelimit_take() for workers of an instance in a fleet: the same decision, plus, when a
 * token is taken, one relaxed increment of the slot's pending count, and the key's fleet name
 * (from key/key_len/digest, as bw_ratelimit_fleet_key_text) written when the slot was just
 * claimed. On a table without fleet area it is exactly bw_ratelimit_take().
 */
bw_ratelimit_decision bw_ratelimit_take_fleet(bw_ratelimit_table *t, uint32_t policy_id,
                                              uint64_t key_hash, const void *key, size_t key_len,
                                              bool digest, const bw_ratelimit_params *p,
                                              uint64_t now, bw_ratelimit_result *out);

/* A slot's owner as the master sees it. */
typedef struct bw_ratelimit_fleet_entry {
    uint64_t tag;       /* identifies the (policy, key) owning the slot now */
    uint32_t policy_id; /* the policy's shm slot */
    size_t key_len;
    char key[BW_RATELIMIT_FLEET_KEY_MAX + 1];
} bw_ratelimit_fleet_entry;

/* Master: the owner of slot idx, when the slot is in use and its name is complete. */
bool bw_ratelimit_fleet_read(const bw_ratelimit_table *t, uint32_t idx,
                             bw_ratelimit_fleet_entry *out);
/* Master: tokens taken in slot idx not yet collected (a cheap relaxed load, for the scan). */
uint32_t bw_ratelimit_fleet_pending(const bw_ratelimit_table *t, uint32_t idx);
/* Master: takes the pending count of slot idx if the slot still belongs to tag, leaving 0.
 * What it returns is the caller's to deliver; nothing else will ever count it again. */
uint32_t bw_ratelimit_fleet_collect(bw_ratelimit_table *t, uint32_t idx, uint64_t tag);
/*
 * Master: brings slot idx (if still owned by tag) up to the fleet's consumption. For refilling
 * policies fleet is how far ahead of now the fleet's theoretical arrival time is (ns): the
 * bucket's TAT becomes at least now + fleet. For policies that never refill it is the fleet's
 * count of tokens taken: the local count becomes at least that. Never gives tokens back.
 * Returns false when the slot changed hands.
 */
bool bw_ratelimit_fleet_absorb(bw_ratelimit_table *t, uint32_t idx, uint64_t tag,
                               const bw_ratelimit_params *p, uint64_t now, uint64_t fleet);

/* Degraded sharing while Redis is unreachable: the master publishes the number of instances to
 * share each key with (0 or 1: no sharing); workers then decide with bw_ratelimit_params_share. */
void bw_ratelimit_fleet_set_share(bw_ratelimit_table *t, uint32_t n);
uint32_t bw_ratelimit_fleet_share(const bw_ratelimit_table *t);
/* A policy's share for one of n instances: capacity / n (at least 1) refilled n times slower. */
void bw_ratelimit_params_share(const bw_ratelimit_params *in, uint32_t n, bw_ratelimit_params *out);
/* Tokens that were pending on busy keys forced out of a full table (never sent to the fleet). */
uint64_t bw_ratelimit_fleet_lost(const bw_ratelimit_table *t);
/* Master: counts tokens it had to give up (one key) in the table's owed-eviction counters. */
void bw_ratelimit_fleet_count_lost(bw_ratelimit_table *t, uint64_t tokens);

#endif
