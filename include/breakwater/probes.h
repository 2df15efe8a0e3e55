/*
 * Readiness and upstream-state documents, built from the shared region: GET /readyz (admin and
 * traffic listeners) and GET /upstreams, POST /upstreams/{name}/reset (admin). Pure functions of
 * the region, the configuration and the clocks, so the master and the workers answer alike.
 */
#ifndef BREAKWATER_PROBES_H
#define BREAKWATER_PROBES_H

#include <stdbool.h>
#include <stdint.h>

#include <event2/buffer.h>

#include "breakwater/config.h"
#include "breakwater/shm.h"

/*
 * Wall-clock milliseconds, for display only: the now_ms the functions below take is this clock.
 * Breaker timing is read from bw_breaker_now_ms() (monotonic) inside, and breaker times are
 * shown converted to wall time.
 */
uint64_t bw_probes_wall_ms(void);

/*
 * Writes the /readyz JSON and returns its status: 503 when draining, when a critical upstream's
 * breaker is open, or when a required dependency (Redis with redis.required) is down; else 200.
 * "status" is unhealthy (503), degraded (a breaker not closed, or an optional dependency down),
 * or healthy.
 */
int bw_probes_readyz(const bw_shm *shm, const bw_config *cfg, bool draining, uint64_t now_ms,
                     struct evbuffer *out);

/* One upstream's JSON object (as an element of /upstreams). */
void bw_probes_upstream_json(const bw_shm *shm, const bw_upstream_conf *u, uint64_t now_ms,
                             struct evbuffer *out);

/* {"upstreams":[...]} */
void bw_probes_upstreams_json(const bw_shm *shm, const bw_config *cfg, uint64_t now_ms,
                              struct evbuffer *out);

/* Formats wall-clock ms as ISO-8601 UTC with milliseconds. */
void bw_probes_iso8601(uint64_t wall_ms, char *buf, size_t len);

#endif
