/*
 * Prometheus exposition (text format 0.0.4) of everything the shared region knows: per-worker
 * counters summed, breaker states and transitions, rate-limit key counts, plus the master-only
 * figures (worker restarts, reloads, Redis). Rendered by the master for GET /metrics.
 */
#ifndef BREAKWATER_METRICS_H
#define BREAKWATER_METRICS_H

#include <stdint.h>

#include <event2/buffer.h>

#include "breakwater/config.h"
#include "breakwater/shm.h"

/* Figures only the master has. */
typedef struct bw_metrics_master {
    uint64_t worker_restarts;
    uint64_t reloads_success;
    uint64_t reloads_failure;
    uint64_t redis_pending_deltas; /* rate-limit deltas not yet written to Redis */
    uint64_t admin_accept_errors;  /* accept() failures on the admin listener */
    uint64_t admin_auth_failures;  /* admin requests refused for a missing or wrong token */
} bw_metrics_master;

/*
 * Appends the whole exposition to out. cfg is the running configuration (breaker parameters,
 * which upstreams exist now); counter series come from every named slot of the region, so
 * series of a route or upstream removed by a reload keep their last values instead of
 * disappearing mid-rate(). now_ms is CLOCK_MONOTONIC, wall_ms the wall clock.
 */
void bw_metrics_render(const bw_shm *shm, const bw_config *cfg, const bw_metrics_master *m,
                       uint64_t now_ms, uint64_t wall_ms, struct evbuffer *out);

#endif
