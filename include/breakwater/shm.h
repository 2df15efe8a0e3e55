/*
 * The process-shared region: one mmap(MAP_SHARED | MAP_ANONYMOUS) mapping created by the master
 * before the first fork and inherited by every worker at the same address. It holds:
 *   - a versioned header (magic, layout version, size, slot counts, offsets);
 *   - named slots for upstreams (each with its circuit breaker), routes, rate-limit policies
 *     and listeners, so that state and counters follow a *name* across reloads;
 *   - worker slots: one per running worker process, holding that process's metric counters;
 *   - fleet/master state read by workers (draining flag, Redis health);
 *   - the rate-limit table.
 * The region has a fixed size computed from the first configuration with headroom; a reload that
 * needs more slots than exist is refused with a message saying a restart is needed.
 * Everything inside is plain data and C11 atomics: no pointers, no locks, so a process killed at
 * any instruction leaves nothing held and nothing half-linked.
 */
#ifndef BREAKWATER_SHM_H
#define BREAKWATER_SHM_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "breakwater/breaker.h"
#include "breakwater/config.h"
#include "breakwater/outlier.h"
#include "breakwater/ratelimit.h"
#include "breakwater/topkeys.h"

#define BW_SHM_MAGIC 0x42574d53u /* "BWMS" */
#define BW_SHM_VERSION 1u
#define BW_SHM_NAME_MAX 64

/* Request-duration histogram bucket upper bounds, in microseconds (+Inf is implicit). */
#define BW_METRICS_BUCKETS 12
extern const uint64_t bw_metrics_bucket_us[BW_METRICS_BUCKETS];

/* Upstream error kinds (label `kind` of breakwater_upstream_errors_total). */
typedef enum bw_upstream_error_kind {
    BW_UPERR_CONNECT = 0,
    BW_UPERR_TIMEOUT,
    BW_UPERR_RESET,
    BW_UPERR_STATUS,
    BW_UPERR_INVALID,
    BW_UPERR_KINDS
} bw_upstream_error_kind;

/* Status codes are counted exactly for 100..599. */
#define BW_METRICS_CODES 500

/* Per-upstream counters in a worker slot. */
typedef struct bw_upstream_counters {
    _Atomic uint64_t duration_buckets[BW_METRICS_BUCKETS + 1]; /* last one is +Inf */
    _Atomic uint64_t duration_sum_us;
    _Atomic uint64_t duration_count;
    _Atomic uint64_t errors[BW_UPERR_KINDS];
} bw_upstream_counters;

/*
 * One worker process's counters. Updated with relaxed atomic adds (a slot may briefly be shared by
 * an old draining worker and its successor); summed over all slots at scrape time. Counters are
 * never reset, so sums stay monotonic when a worker dies and another takes its slot; gauges
 * (connections_active) are zeroed by the master when the slot's process has exited.
 *
 * Layout of the variable part that follows the fixed fields (sizes from the header):
 *   _Atomic uint64_t requests[n_route_slots + 1][BW_METRICS_CODES]   (+1: "no route")
 *   bw_upstream_counters upstream[n_upstream_slots]
 *   _Atomic uint64_t rate_limited[n_policy_slots]
 *   _Atomic int64_t connections_active[n_listener_slots]
 *   _Atomic uint64_t accept_errors[n_listener_slots]
 */
typedef struct bw_worker_slot {
    _Atomic int32_t pid;           /* 0 = free */
    _Atomic uint64_t heartbeat_ms; /* CLOCK_MONOTONIC ms, written by the worker every second */
    _Atomic uint64_t started_ms;
    _Atomic uint32_t accepting; /* 1 once the worker watches its listeners (readiness) */
} bw_worker_slot;

typedef struct bw_shm_named {
    char name[BW_SHM_NAME_MAX];  /* NUL-terminated; empty = free */
    _Atomic uint32_t generation; /* last configuration generation that used this slot */
} bw_shm_named;

typedef struct bw_shm_upstream {
    bw_shm_named id;
    bw_breaker breaker;
    bw_outlier_group servers; /* per-server health, records bound by address */
} bw_shm_upstream;

typedef struct bw_shm_route {
    bw_shm_named id;
    char upstream[BW_SHM_NAME_MAX]; /* the `upstream` label of its requests_total series */
} bw_shm_route;

/* Fleet-wide status published by the master for workers (readiness on traffic listeners). */
typedef struct bw_shm_status {
    _Atomic uint32_t draining; /* the master is shutting down */
    _Atomic uint32_t redis_configured;
    _Atomic uint32_t redis_up;
    _Atomic uint32_t redis_required;
    _Atomic uint64_t redis_last_sync_ms; /* wall clock ms of the last successful sync, 0 = never */
    _Atomic uint64_t redis_errors;
    _Atomic uint64_t config_generation;
} bw_shm_status;

typedef struct bw_shm_header {
    uint32_t magic;
    uint32_t version;
    uint64_t size;
    uint32_t n_upstream_slots, n_route_slots, n_policy_slots, n_listener_slots, n_worker_slots;
    uint32_t rl_entries;
    uint64_t off_upstreams, off_routes, off_policies, off_listeners, off_workers, off_ratelimit;
    uint64_t off_topkeys;      /* one bw_topkeys per policy slot */
    uint64_t worker_slot_size; /* bytes per worker slot including its variable part */
    bw_ratelimit_seed rl_seed;
    bw_shm_status status;
} bw_shm_header;

/* Process-local handle (the mapping itself is shared). */
typedef struct bw_shm {
    bw_shm_header *hdr;
    void *base;
    size_t size;
} bw_shm;

/*
 * Creates the region for a first configuration, with headroom (each slot count is at least
 * twice what cfg needs plus a margin; worker slots: 2 * workers + 4). Initialises breakers, the
 * rate-limit table and the seed. Returns 0 or -1 with a reason in err.
 */
int bw_shm_create(bw_shm *shm, const bw_config *cfg, char *err, size_t errlen);
void bw_shm_destroy(bw_shm *shm);

/*
 * Assigns slots to every upstream, route, rate-limit policy and listener of cfg, by name:
 * a name seen before gets its old slot back (so its breaker and counters carry on), a new name
 * gets a free slot (its breaker freshly initialised), names no longer used keep their slot until
 * it is needed. Writes the slot numbers into cfg->upstreams[i].shm_slot, routes[i].shm_slot,
 * rate_limits[i].shm_slot and listeners[i].shm_slot, and gives every server of every upstream its
 * health record (cfg->upstreams[i].servers[k].shm_index, bound by address). Returns 0, or -1 with a
 * reason in err when the region is too small ("restart needed").
 */
int bw_shm_bind(bw_shm *shm, bw_config *cfg, uint64_t generation, uint64_t now_ms, char *err,
                size_t errlen);

/* Master: picks a free worker slot for a new process (-1 when none: the caller shares slot 0). */
int bw_shm_worker_acquire(bw_shm *shm, pid_t pid, uint64_t now_ms);
/* Master: the process in this slot has exited; its gauges are zeroed, counters kept. */
void bw_shm_worker_release(bw_shm *shm, int slot);

bw_breaker *bw_shm_breaker(const bw_shm *shm, int upstream_slot);
bw_outlier_group *bw_shm_servers(const bw_shm *shm, int upstream_slot);
bw_shm_upstream *bw_shm_upstream_at(const bw_shm *shm, int upstream_slot);
bw_shm_route *bw_shm_route_at(const bw_shm *shm, int route_slot);
bw_shm_named *bw_shm_policy_at(const bw_shm *shm, int policy_slot);
bw_shm_named *bw_shm_listener_at(const bw_shm *shm, int listener_slot);
bw_worker_slot *bw_shm_worker(const bw_shm *shm, int worker_slot);
bw_ratelimit_table *bw_shm_ratelimit(const bw_shm *shm);
/* The busiest-keys table of a policy slot (NULL when out of range). */
bw_topkeys *bw_shm_topkeys(const bw_shm *shm, int policy_slot);

/* Counter cells of one worker slot, for the scrape (NULL when a slot is out of range). The
 * requests row holds BW_METRICS_CODES cells, index status - 100; route_slot -1 = no route. */
_Atomic uint64_t *bw_shm_requests_row(const bw_shm *shm, int worker_slot, int route_slot);
bw_upstream_counters *bw_shm_upstream_counters(const bw_shm *shm, int worker_slot,
                                               int upstream_slot);
_Atomic uint64_t *bw_shm_rate_limited_cell(const bw_shm *shm, int worker_slot, int policy_slot);
_Atomic int64_t *bw_shm_connections_cell(const bw_shm *shm, int worker_slot, int listener_slot);
_Atomic uint64_t *bw_shm_accept_errors_cell(const bw_shm *shm, int worker_slot, int listener_slot);

/* Hot-path counter updates (relaxed atomics), used by workers. route_slot -1 = no route;
 * a status outside 100..599 is not counted. */
void bw_metrics_count_request(const bw_shm *shm, int worker_slot, int route_slot, int status);
void bw_metrics_observe_duration(const bw_shm *shm, int worker_slot, int upstream_slot,
                                 uint64_t duration_us);
void bw_metrics_upstream_error(const bw_shm *shm, int worker_slot, int upstream_slot,
                               bw_upstream_error_kind kind);
void bw_metrics_rate_limited(const bw_shm *shm, int worker_slot, int policy_slot);
void bw_metrics_connection(const bw_shm *shm, int worker_slot, int listener_slot, int delta);
/* An accept() that failed for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM). */
void bw_metrics_accept_error(const bw_shm *shm, int worker_slot, int listener_slot);

#endif
