/*
 * Readiness and upstream state as JSON.
 *
 * Readiness answers one question for a load balancer: should traffic be sent here now? Only
 * three things say no: the proxy is draining, a *critical* upstream's breaker is open (the
 * instance cannot serve what it exists for), or a dependency marked required is down. Everything
 * else that is not perfect (a non-critical breaker open, any breaker half open, an optional Redis
 * down) is reported as "degraded" with 200, so that a partial outage of one backend does not take
 * the whole fleet out of rotation.
 *
 * Upstream names and server addresses are validated by the configuration loader to a safe
 * character set, so they are written without JSON escaping.
 */
#include "breakwater/probes.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#include "breakwater/breaker.h"

uint64_t bw_probes_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void bw_probes_iso8601(uint64_t wall_ms, char *buf, size_t len)
{
    time_t secs = (time_t)(wall_ms / 1000u);
    struct tm tm;
    gmtime_r(&secs, &tm);
    snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03uZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (unsigned)(wall_ms % 1000u));
}

static void snapshot(const bw_shm *shm, const bw_upstream_conf *u, uint64_t now_ms,
                     bw_breaker_view *v)
{
    bw_breaker_snapshot(bw_shm_breaker(shm, u->shm_slot), &u->breaker, now_ms, v);
}

int bw_probes_readyz(const bw_shm *shm, const bw_config *cfg, bool draining, uint64_t now_ms,
                     struct evbuffer *out)
{
    const bw_shm_status *st = &shm->hdr->status;
    draining = draining || atomic_load_explicit(&st->draining, memory_order_relaxed);
    bool ready = !draining, degraded = false;
    struct evbuffer *checks = evbuffer_new();
    if (!checks)
        return 503;

    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const bw_upstream_conf *u = &cfg->upstreams[i];
        bw_breaker_view v;
        snapshot(shm, u, now_ms, &v);
        bool healthy = v.state == BW_BREAKER_CLOSED;
        if (v.state == BW_BREAKER_OPEN && u->critical)
            ready = false;
        if (!healthy)
            degraded = true;
        char msg[128];
        if (v.forced)
            snprintf(msg, sizeof(msg), "circuit held open by the operator");
        else if (v.state == BW_BREAKER_CLOSED)
            snprintf(msg, sizeof(msg), "circuit closed");
        else if (v.state == BW_BREAKER_OPEN)
            snprintf(msg, sizeof(msg), "circuit open, next probe in %llu ms",
                     (unsigned long long)v.retry_after_ms);
        else
            snprintf(msg, sizeof(msg), "circuit half open, probing");
        evbuffer_add_printf(checks,
                            "%s{\"name\":\"upstream:%s\",\"healthy\":%s,\"required\":%s,"
                            "\"circuit_state\":\"%s\",\"forced\":%s,\"message\":\"%s\"}",
                            i ? "," : "", u->name, healthy ? "true" : "false",
                            u->critical ? "true" : "false", bw_breaker_state_name(v.state),
                            v.forced ? "true" : "false", msg);
    }
    if (atomic_load_explicit(&st->redis_configured, memory_order_relaxed)) {
        bool up = atomic_load_explicit(&st->redis_up, memory_order_relaxed);
        bool required = atomic_load_explicit(&st->redis_required, memory_order_relaxed);
        if (!up) {
            degraded = true;
            if (required)
                ready = false;
        }
        evbuffer_add_printf(checks,
                            "%s{\"name\":\"redis\",\"healthy\":%s,\"required\":%s,"
                            "\"message\":\"%s\"}",
                            cfg->n_upstreams ? "," : "", up ? "true" : "false",
                            required ? "true" : "false",
                            up ? "connected" : "unreachable: serving from local state");
    }
    const char *status = !ready ? "unhealthy" : degraded ? "degraded" : "healthy";
    char ts[96];
    bw_probes_iso8601(bw_probes_wall_ms(), ts, sizeof(ts));
    evbuffer_add_printf(out, "{\"ready\":%s,\"status\":\"%s\",\"timestamp\":\"%s\",%s\"checks\":[",
                        ready ? "true" : "false", status, ts,
                        draining ? "\"draining\":true," : "");
    evbuffer_add_buffer(out, checks);
    evbuffer_add_printf(out, "]}\n");
    evbuffer_free(checks);
    return ready ? 200 : 503;
}

void bw_probes_upstream_json(const bw_shm *shm, const bw_upstream_conf *u, uint64_t now_ms,
                             struct evbuffer *out)
{
    bw_breaker_view v;
    snapshot(shm, u, now_ms, &v);
    char since[96], opened[112];
    bw_probes_iso8601(v.since_ms, since, sizeof(since));
    if (v.opened_at_ms) {
        char iso[96];
        bw_probes_iso8601(v.opened_at_ms, iso, sizeof(iso));
        snprintf(opened, sizeof(opened), "\"%s\"", iso);
    } else {
        snprintf(opened, sizeof(opened), "null");
    }
    evbuffer_add_printf(out, "{\"name\":\"%s\",\"critical\":%s,\"balance\":\"%s\",\"servers\":[",
                        u->name, u->critical ? "true" : "false",
                        u->balance == BW_BALANCE_LEAST_CONN ? "least_conn" : "round_robin");
    for (size_t i = 0; i < u->n_servers; i++)
        evbuffer_add_printf(out, "%s{\"address\":\"%s\"}", i ? "," : "", u->servers[i].address);
    evbuffer_add_printf(
        out,
        "],\"circuit_breaker\":{\"state\":\"%s\",\"since\":\"%s\",\"failures\":%u,"
        "\"opened_at\":%s,\"retry_after_ms\":%llu,\"wait_ms\":%llu,\"half_open_permits\":%u,"
        "\"transitions\":{\"closed\":%llu,\"open\":%llu,\"half_open\":%llu},\"rejected\":%llu,"
        "\"forced\":%s}}",
        bw_breaker_state_name(v.state), since, v.failures, opened,
        (unsigned long long)v.retry_after_ms, (unsigned long long)v.wait_ms, v.half_open_permits,
        (unsigned long long)v.transitions[BW_BREAKER_CLOSED],
        (unsigned long long)v.transitions[BW_BREAKER_OPEN],
        (unsigned long long)v.transitions[BW_BREAKER_HALF_OPEN], (unsigned long long)v.rejected,
        v.forced ? "true" : "false");
}

void bw_probes_upstreams_json(const bw_shm *shm, const bw_config *cfg, uint64_t now_ms,
                              struct evbuffer *out)
{
    evbuffer_add_printf(out, "{\"upstreams\":[");
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        if (i)
            evbuffer_add(out, ",", 1);
        bw_probes_upstream_json(shm, &cfg->upstreams[i], now_ms, out);
    }
    evbuffer_add_printf(out, "]}\n");
}
