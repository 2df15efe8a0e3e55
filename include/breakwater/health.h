/*
 * Upstream health, driven by the master: the time-based side of every breaker (open -> half_open
 * when the open period is over, whether or not a request arrives) and, where configured, the
 * active health checks of each upstream server. It runs on the master's event loop, once per
 * instance however many workers there are, and never blocks that loop: every check is a
 * non-blocking connection with its own deadline. Results reach the workers through the shared
 * region only.
 */
#ifndef BREAKWATER_HEALTH_H
#define BREAKWATER_HEALTH_H

#include <event2/event.h>

#include "breakwater/config.h"
#include "breakwater/log.h"
#include "breakwater/shm.h"

/* How often the master looks at every breaker for an open period that is over. */
#define BW_HEALTH_TICK_MS 100
/* The largest response head a health check reads; the body is never read. */
#define BW_HEALTH_MAX_HEAD 16384

typedef struct bw_health bw_health;

/* Starts the periodic work for cfg on base. NULL when out of memory. */
bw_health *bw_health_new(struct event_base *base, bw_shm *shm, const bw_config *cfg, bw_log *log);

/* Follows a reloaded configuration (cfg must outlive the next call or bw_health_free). */
void bw_health_set_config(bw_health *h, const bw_config *cfg);

void bw_health_free(bw_health *h);

#endif
