/*
 * Upstream health in the master.
 *
 * A breaker only moved from open to half_open when a request asked for admission, so an upstream
 * that receives no traffic while it is out (a Kubernetes pod marked unready gets none) stayed open
 * for ever and kept /readyz at 503. The master fixes that with a timer: every BW_HEALTH_TICK_MS
 * it calls bw_breaker_tick() on each breaker, which makes the transition once the open period is
 * over. The breakers run on the monotonic clock, so a step of the wall clock changes nothing
 * here. The transition is made in the shared record, so workers, /readyz, /upstreams, the
 * metrics and the fleet synchronisation all see it as if a request had made it.
 */
#include "breakwater/health.h"

#include <stdlib.h>

#include "breakwater/breaker.h"

struct bw_health {
    struct event_base *base;
    bw_shm *shm;
    const bw_config *cfg;
    bw_log *log;
    struct event *tick;
};

static void health_tick_breakers(bw_health *h)
{
    uint64_t now = bw_breaker_now_ms();
    for (size_t i = 0; i < h->cfg->n_upstreams; i++) {
        const bw_upstream_conf *u = &h->cfg->upstreams[i];
        if (u->shm_slot < 0)
            continue;
        bw_breaker_transition t;
        if (!bw_breaker_tick(bw_shm_breaker(h->shm, u->shm_slot), &u->breaker, now, &t))
            continue;
        char what[160];
        bw_breaker_describe(&t, what, sizeof(what));
        bw_log_info(h->log, "breaker %s: %s (no request needed)", u->name, what);
    }
}

static void health_tick_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    health_tick_breakers(arg);
}

bw_health *bw_health_new(struct event_base *base, bw_shm *shm, const bw_config *cfg, bw_log *log)
{
    bw_health *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return NULL;
    h->base = base;
    h->shm = shm;
    h->cfg = cfg;
    h->log = log;
    h->tick = event_new(base, -1, EV_PERSIST, health_tick_cb, h);
    if (h->tick == NULL) {
        free(h);
        return NULL;
    }
    struct timeval tv = {0, BW_HEALTH_TICK_MS * 1000};
    event_add(h->tick, &tv);
    return h;
}

void bw_health_set_config(bw_health *h, const bw_config *cfg)
{
    h->cfg = cfg;
}

void bw_health_free(bw_health *h)
{
    if (h == NULL)
        return;
    event_free(h->tick);
    free(h);
}
