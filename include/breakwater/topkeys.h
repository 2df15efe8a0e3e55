/*
 * Busiest keys of a rate-limit policy: a small fixed table in shared memory that remembers which
 * client keys consume and are refused the most right now, with their text, so that the admin
 * endpoint GET /ratelimits/{policy}?top=N can name them (the rate-limit table itself keeps only
 * seeded hashes).
 *
 * Each policy has BW_TOPKEYS_SLOTS slots. A key may live in one of BW_TOPKEYS_WAYS slots chosen by
 * its hash. Workers call bw_topkeys_record() after every decision: a key already present bumps its
 * counters with relaxed atomic adds; a key that is not present takes one point off the weakest of
 * its candidate slots, and replaces that slot's key once its score reaches zero (the "frequent
 * items" counting scheme: a key seen more often than its competitors stays). Replacing a slot is
 * guarded by a sequence number (odd while the slot is rewritten) that readers check before and
 * after copying; a worker killed while the number is odd leaves a slot that the next writer
 * takes over once it has been odd for longer than BW_TOPKEYS_STALE_NS. No locks, no pointers:
 * every state the memory can be left in is one the others can move on from.
 */
#ifndef BREAKWATER_TOPKEYS_H
#define BREAKWATER_TOPKEYS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BW_TOPKEYS_SLOTS 64 /* a power of two */
/* Slots a key may live in. */
#define BW_TOPKEYS_WAYS 4
/* Longest key text kept (longer texts are cut); the rate-limit fleet names fit. */
#define BW_TOPKEYS_TEXT_MAX 47
/* A slot left half-written for this long belongs to a process that died: it may be taken. */
#define BW_TOPKEYS_STALE_NS UINT64_C(1000000000)

typedef struct bw_topkeys_slot {
    _Atomic uint64_t seq;        /* even: stable; odd: being rewritten */
    _Atomic uint64_t claimed_ns; /* when the current writer took it */
    _Atomic uint64_t hash;       /* the key's rate-limit hash; 0 = empty */
    _Atomic uint64_t score;      /* hits minus competing misses */
    _Atomic uint64_t consumed;   /* tokens taken since the key took the slot */
    _Atomic uint64_t rejected;   /* refusals (and dry-run refusals) since then */
    _Atomic uint32_t remaining;  /* whole tokens left after its last decision */
    _Atomic uint64_t seen_ns;    /* time of its last decision */
    _Atomic uint64_t text[(BW_TOPKEYS_TEXT_MAX + 1 + 7) / 8]; /* NUL-terminated, in words */
} bw_topkeys_slot;

typedef struct bw_topkeys {
    bw_topkeys_slot slot[BW_TOPKEYS_SLOTS];
} bw_topkeys;

/* One key as the admin endpoint reports it. */
typedef struct bw_topkeys_entry {
    uint64_t hash;
    uint64_t consumed;
    uint64_t rejected;
    uint32_t remaining;
    uint64_t seen_ns;
    char text[BW_TOPKEYS_TEXT_MAX + 1];
} bw_topkeys_entry;

/* Writes a key's text into buf (at most BW_TOPKEYS_TEXT_MAX bytes and a NUL). Called only when
 * the key takes a slot, so that an expensive text (a digest) is not computed per request. */
typedef void (*bw_topkeys_text_fn)(void *arg, char buf[BW_TOPKEYS_TEXT_MAX + 1]);

/* Empties the table. Not concurrent: for a table no worker is using yet. */
void bw_topkeys_init(bw_topkeys *t);

/*
 * Counts one decision for a key: rejected true for a refusal, false for a token taken.
 * remaining is what the bucket has left; now_ns any monotonic clock shared by the processes.
 * Lock-free; at most a few atomic operations on two slots.
 */
void bw_topkeys_record(bw_topkeys *t, uint64_t hash, bool rejected, uint32_t remaining,
                       uint64_t now_ns, bw_topkeys_text_fn text, void *text_arg);

/*
 * Copies the busiest keys into out (at most max), most rejected first, then most consumed;
 * returns how many. A slot being rewritten at that instant is skipped.
 */
size_t bw_topkeys_top(const bw_topkeys *t, bw_topkeys_entry *out, size_t max);

/* The entry whose text is exactly text (true) or nothing (false). */
bool bw_topkeys_find_text(const bw_topkeys *t, const char *text, bw_topkeys_entry *out);

/* After an operator refilled a key: its counters start again from zero. */
void bw_topkeys_forget(bw_topkeys *t, uint64_t hash);

#endif
