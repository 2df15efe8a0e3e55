/*
 * Circuit breakers: one record per upstream, shared by every worker process.
 *
 * A bw_breaker lives in the shared-memory region the master maps before fork(); all workers
 * update it at the same time with lock-free atomics only, so a worker killed at any instruction
 * can neither block the others nor leave the record in a state the others cannot move on from.
 * The functions are pure over the record, the configuration, and the time and random values the
 * caller passes in: the proxy calls bw_breaker_allow() before contacting an upstream and
 * bw_breaker_report() with the outcome, the metrics, probe and admin code read through
 * bw_breaker_snapshot(), and the fleet synchronisation applies remote state with
 * bw_breaker_force(). src/breaker.c explains the encoding; docs/breakers.md the behaviour.
 */
#ifndef BREAKWATER_BREAKER_H
#define BREAKWATER_BREAKER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "breakwater/config.h"

/* Time buckets of the failure-rate window; each covers window_ms / BW_BREAKER_WINDOW_BUCKETS. */
#define BW_BREAKER_WINDOW_BUCKETS 10
/* Largest half_open_max_requests and half_open_success_threshold honoured (larger is clamped). */
#define BW_BREAKER_MAX_PROBES 1023
/* Largest jitter added to a grown reset wait, in thousandths of the wait (10%). */
#define BW_BREAKER_JITTER_PERMILLE 100

typedef enum bw_breaker_state {
    BW_BREAKER_CLOSED = 0,
    BW_BREAKER_OPEN = 1,
    BW_BREAKER_HALF_OPEN = 2,
} bw_breaker_state;

typedef enum bw_breaker_decision {
    BW_BREAKER_ALLOW = 0,       /* closed: send the request */
    BW_BREAKER_ALLOW_PROBE = 1, /* half_open: send it; a probe permit was taken */
    BW_BREAKER_REJECT = 2,      /* open, or half_open with every permit out: answer 503 */
} bw_breaker_decision;

typedef enum bw_breaker_outcome {
    BW_BREAKER_SUCCESS = 0,
    BW_BREAKER_FAILURE = 1, /* connect error/timeout, response timeout, reset, failure status */
    BW_BREAKER_SLOW = 2,    /* a response slower than slow_call_ms: a failure, counted apart */
} bw_breaker_outcome;

/* Why a transition happened, for the log line and the fleet record. */
typedef enum bw_breaker_cause {
    BW_BREAKER_CAUSE_NONE = 0,
    BW_BREAKER_CAUSE_CONSECUTIVE, /* closed -> open: failure_threshold consecutive failures */
    BW_BREAKER_CAUSE_RATE,        /* closed -> open: failure rate over the window */
    BW_BREAKER_CAUSE_TIMEOUT,     /* open -> half_open: the reset wait elapsed */
    BW_BREAKER_CAUSE_PROBE_OK,    /* half_open -> closed: enough probes succeeded */
    BW_BREAKER_CAUSE_PROBE_FAIL,  /* half_open -> open: a probe failed */
    BW_BREAKER_CAUSE_RESET,       /* any -> closed: operator reset */
    BW_BREAKER_CAUSE_FORCED,      /* any -> any: state learned from the fleet */
} bw_breaker_cause;

/*
 * The shared record. Plain integers in atomics only (no pointers), so it means the same in every
 * process that maps it. Read it only through the functions below: most fields are packed words
 * whose layout is private to src/breaker.c. The hot word is on its own cache line, away from the
 * counters every request writes.
 */
typedef struct bw_breaker {
    _Alignas(64) _Atomic uint64_t word; /* state, permits, successes, backoff, round, generation */
    _Atomic uint64_t since;             /* generation-stamped time of the last transition */
    _Atomic uint64_t lease;             /* round-stamped time of the last half-open activity */
    _Atomic uint64_t tally[3];          /* transitions into each state, generation-marked */
    _Atomic uint64_t opened_at_ms;      /* last time it opened; 0 = never */
    _Atomic uint64_t updated_at_ms;     /* last time the state changed */
    _Atomic uint64_t forced_at_ms;      /* held open by the operator since; 0 = not forced */
    _Alignas(64) _Atomic uint64_t failures; /* generation-stamped consecutive failures */
    _Atomic uint64_t window[BW_BREAKER_WINDOW_BUCKETS]; /* stamped request/failure counts */
    _Alignas(64) _Atomic uint64_t rejected;
    _Atomic uint64_t probes;         /* half-open permits handed out */
    _Atomic uint64_t lease_expiries; /* permits reclaimed because nobody reported them */
    _Atomic uint64_t successes;      /* outcomes reported, by kind */
    _Atomic uint64_t failures_total;
    _Atomic uint64_t slow_calls;
    _Atomic uint64_t stale_outcomes; /* outcomes of requests admitted in an earlier state */
} bw_breaker;

/*
 * What allow() hands out and report() takes back: which state and half-open round admitted the
 * request. An outcome whose ticket no longer matches the record (the breaker moved on meanwhile)
 * is counted as stale and changes nothing, so late answers cannot corrupt the half-open count.
 */
typedef struct bw_breaker_ticket {
    uint32_t generation;
    uint8_t round;
    bool probe;
} bw_breaker_ticket;

/* Filled by the call that made a transition (exactly one caller per transition), for logging. */
typedef struct bw_breaker_transition {
    bool happened;
    bw_breaker_state from, to;
    bw_breaker_cause cause;
    uint32_t failures;   /* CONSECUTIVE: consecutive failures; RATE: failures in the window */
    uint32_t requests;   /* RATE: requests in the window */
    uint32_t successes;  /* PROBE_OK: probe successes */
    uint64_t wait_ms;    /* to open: how long it stays open; TIMEOUT: the wait that elapsed */
    uint32_t generation; /* the new generation */
} bw_breaker_transition;

/* A consistent-enough copy for /upstreams, /readyz, /metrics and the fleet sync. */
typedef struct bw_breaker_view {
    bw_breaker_state state;
    uint32_t generation; /* changes on every transition */
    uint64_t since_ms;   /* time of the last transition */
    uint64_t updated_at_ms;
    uint32_t failures;       /* consecutive failures (closed) */
    uint64_t opened_at_ms;   /* last opening; 0 = never */
    uint64_t wait_ms;        /* open period: the current one, or the next one when closed */
    uint64_t retry_after_ms; /* open: time left until half_open; else 0 */
    uint32_t openings;       /* consecutive openings since the last close (backoff level) */
    uint32_t half_open_permits;
    uint32_t half_open_successes;
    uint32_t window_requests; /* closed: the failure-rate window's contents */
    uint32_t window_failures;
    uint64_t transitions[3]; /* into closed, open, half_open, indexed by bw_breaker_state */
    uint64_t rejected;
    uint64_t probes;
    uint64_t lease_expiries;
    uint64_t successes;
    uint64_t failures_total;
    uint64_t slow_calls;
    uint64_t stale_outcomes;
    bool forced;           /* held open by the operator (state then reads open) */
    uint64_t forced_at_ms; /* since when; 0 when not forced */
} bw_breaker_view;

/* Sets up a closed breaker. Not concurrent: call it once, before any worker sees the record. */
void bw_breaker_init(bw_breaker *b, uint64_t now_ms);

/*
 * Admission. Closed: ALLOW. Open: REJECT with *retry_after_ms the time left in the open period,
 * until it has elapsed; then exactly one caller moves it to half_open and gets the first
 * permit. Half_open: ALLOW_PROBE while fewer than half_open_max_requests probes are out, else
 * REJECT. probe_timeout_ms is the longest a probe can take (connect + response timeout): permits
 * with no half-open activity for that long are taken back, since their holder may have died.
 * ticket receives what report() needs; retry_after_ms and t may be NULL. All times are
 * milliseconds below 2^42 from one clock shared by the processes.
 */
bw_breaker_decision bw_breaker_allow(bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms,
                                     uint32_t probe_timeout_ms, bw_breaker_ticket *ticket,
                                     uint64_t *retry_after_ms, bw_breaker_transition *t);

/*
 * Outcome of a request that allow() admitted. rnd is any random value; it picks the jitter when
 * a failed probe re-opens the breaker. t may be NULL.
 */
void bw_breaker_report(bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms,
                       const bw_breaker_ticket *ticket, bw_breaker_outcome outcome, uint32_t rnd,
                       bw_breaker_transition *t);

/*
 * Operator maintenance (POST /upstreams/{name}/open): the breaker opens and stays open, refusing
 * every request, until bw_breaker_reset(); the reset timeout does not apply. forced_at_ms is when
 * the operator asked (0 = now), so that a fleet that learns it later shows the same time.
 * True when it was not forced before.
 */
bool bw_breaker_force_open(bw_breaker *b, const bw_breaker_conf *c, uint64_t forced_at_ms,
                           uint64_t now_ms, bw_breaker_transition *t);
bool bw_breaker_is_forced(const bw_breaker *b);

/*
 * The clock every breaker caller passes as now_ms: CLOCK_MONOTONIC in milliseconds, shared by all
 * processes of the host. A step of the wall clock (NTP, an operator) changes no open period and
 * no lease; wall time is derived from it only for display and for the fleet record.
 */
uint64_t bw_breaker_now_ms(void);

/* Wall-clock ms minus bw_breaker_now_ms(): constant between steps of the wall clock, so a
 * breaker time converted to wall time (for display and the fleet record) and back is unchanged. */
int64_t bw_breaker_wall_offset_ms(void);

/*
 * Time passing with no traffic: open -> half_open once the open period is over, taking no
 * permit, so that readiness, /upstreams and the metrics show half_open without a request. The
 * master calls it periodically for every breaker. True (and t filled) for the caller that made
 * the transition. t may be NULL.
 */
bool bw_breaker_tick(bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms,
                     bw_breaker_transition *t);

/*
 * Gives back the half-open permit of a probe that ends with no outcome (its client went away
 * before the upstream answered): the next request may probe at once instead of waiting for the
 * lease to expire. No-op for tickets that are not probes or belong to an earlier round.
 */
void bw_breaker_release(bw_breaker *b, const bw_breaker_ticket *ticket, uint64_t now_ms);

/*
 * An active health check passed while the breaker is not closed: it counts as one successful
 * probe (open past its wait moves to half_open first), so an upstream that came back closes its
 * breaker with no client traffic. Returns true when it made a transition (t filled; NULL ok).
 */
bool bw_breaker_check_passed(bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms,
                             bw_breaker_transition *t);

/* Operator reset: closed, with counters and backoff cleared, and no longer forced open. True
 * when the state changed. */
bool bw_breaker_reset(bw_breaker *b, uint64_t now_ms, bw_breaker_transition *t);

/*
 * Applies a state learned from the fleet. opened_at_ms (OPEN only; 0 = now) is when the fleet
 * opened it, so the open period ends at the same time everywhere. No-op, returning false, when
 * the breaker is already in that state.
 */
bool bw_breaker_force(bw_breaker *b, const bw_breaker_conf *c, bw_breaker_state state,
                      uint64_t opened_at_ms, uint64_t now_ms, bw_breaker_transition *t);

/*
 * Applies a fleet record without losing its backoff. CLOSED: as bw_breaker_force(). OPEN, and
 * HALF_OPEN (another instance is probing: this one stays open and waits out its own period
 * rather than releasing its permits at the same instant): the breaker opens at opened_at_ms
 * (0 or in the future: now) with the fleet's backoff level and jitter (level 0: unknown, keep
 * the local one), and its open period starts delay_ms later, so that instances following the
 * same record do not all probe at once. Nothing happens when it is already open with that
 * level and jitter since that opening or later. True when a transition happened.
 */
bool bw_breaker_follow(bw_breaker *b, const bw_breaker_conf *c, bw_breaker_state state,
                       uint64_t opened_at_ms, uint64_t delay_ms, unsigned level, unsigned jitter,
                       uint64_t now_ms, bw_breaker_transition *t);

/* The backoff level (openings since the last close) and jitter (permille) in the word. */
void bw_breaker_backoff(const bw_breaker *b, unsigned *level, unsigned *jitter);

void bw_breaker_snapshot(const bw_breaker *b, const bw_breaker_conf *c, uint64_t now_ms,
                         bw_breaker_view *out);

/* True when status is listed in failure_statuses. */
bool bw_breaker_is_failure_status(const bw_breaker_conf *c, int status);
/* True when slow_call_ms is set and the call took longer. */
bool bw_breaker_is_slow(const bw_breaker_conf *c, uint64_t duration_ms);
/* status 0 (no complete response: connect error, timeout, reset) is a failure. */
bw_breaker_outcome bw_breaker_classify(const bw_breaker_conf *c, int status, uint64_t duration_ms);

/* "closed", "open", "half_open" (the strings of DESIGN.md); "unknown" otherwise. */
const char *bw_breaker_state_name(bw_breaker_state state);
/* Prometheus encoding: 1 closed, 2 open, 3 half_open; 0 for anything else. */
int bw_breaker_state_metric(bw_breaker_state state);
const char *bw_breaker_cause_name(bw_breaker_cause cause);
/* Whole seconds for Retry-After: rounded up, at least 1. */
uint64_t bw_breaker_retry_after_s(uint64_t retry_after_ms);
/* "closed -> open after 5 consecutive failures"; returns what snprintf returns. */
int bw_breaker_describe(const bw_breaker_transition *t, char *buf, size_t len);

#endif
