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

#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <event2/dns.h>
#include <openssl/x509.h>

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

/* Breakers run on the monotonic clock (bw_breaker_now_ms); callers pass wall time for display. */
static void snapshot(const bw_shm *shm, const bw_upstream_conf *u, uint64_t mono_ms,
                     bw_breaker_view *v)
{
    bw_breaker_snapshot(bw_shm_breaker(shm, u->shm_slot), &u->breaker, mono_ms, v);
}

/*
 * A breaker time (monotonic ms) as wall-clock ms, for display; 0 stays 0 ("never"). A value far
 * beyond the monotonic clock's present (more than a day ahead) can only have been written with
 * wall-clock time by a caller that passed the wrong clock (a reset stamps the time it is given):
 * it is shown as it is rather than decades in the future.
 */
static uint64_t mono_to_wall(uint64_t t, int64_t offset_ms)
{
    if (t == 0)
        return 0;
    if (t > bw_breaker_now_ms() + 86400000u)
        return t;
    int64_t w = (int64_t)t + offset_ms;
    return w > 0 ? (uint64_t)w : 0;
}

int bw_probes_readyz(const bw_shm *shm, const bw_config *cfg, bool draining, uint64_t now_ms,
                     struct evbuffer *out)
{
    (void)now_ms; /* the timestamp is read below; the breakers need the monotonic clock */
    uint64_t mono = bw_breaker_now_ms();
    const bw_shm_status *st = &shm->hdr->status;
    draining = draining || atomic_load_explicit(&st->draining, memory_order_relaxed);
    bool ready = !draining, degraded = false;
    struct evbuffer *checks = evbuffer_new();
    if (!checks)
        return 503;

    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const bw_upstream_conf *u = &cfg->upstreams[i];
        bw_breaker_view v;
        snapshot(shm, u, mono, &v);
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
                        ready ? "true" : "false", status, ts, draining ? "\"draining\":true," : "");
    evbuffer_add_buffer(out, checks);
    evbuffer_add_printf(out, "]}\n");
    evbuffer_free(checks);
    return ready ? 200 : 503;
}

/* One server of /upstreams: its address and what its shared health record says. */
static void server_json(const bw_outlier_server *rec, const char *address, uint64_t mono,
                        int64_t offset, const char *sep, struct evbuffer *out)
{
    bw_outlier_view v;
    memset(&v, 0, sizeof(v));
    v.healthy = true;
    if (rec != NULL)
        bw_outlier_snapshot(rec, mono, &v);
    char until[112] = "null", check[200] = "null";
    if (v.ejected) {
        char iso[96];
        bw_probes_iso8601(mono_to_wall(v.ejected_until, offset), iso, sizeof(iso));
        snprintf(until, sizeof(until), "\"%s\"", iso);
    }
    if (v.check_result != BW_CHECK_NONE) {
        char iso[96], status[16] = "null";
        bw_probes_iso8601(v.check_wall_ms, iso, sizeof(iso));
        if (v.check_status > 0)
            snprintf(status, sizeof(status), "%d", v.check_status);
        snprintf(check, sizeof(check), "{\"result\":\"%s\",\"status\":%s,\"time\":\"%s\"}",
                 bw_check_result_name(v.check_result), status, iso);
    }
    char tls[300] = "null";
    int te = rec ? atomic_load_explicit(&rec->tls_error, memory_order_relaxed) : 0;
    if (te != 0) {
        char iso[96];
        bw_probes_iso8601(atomic_load(&rec->tls_error_wall_ms), iso, sizeof(iso));
        snprintf(tls, sizeof(tls), "{\"message\":\"%s%s\",\"time\":\"%s\"}",
                 te > 0 ? "certificate verify failed: " : "TLS handshake failed",
                 te > 0 ? X509_verify_cert_error_string(te) : "", iso);
    }
    evbuffer_add_printf(out,
                        "%s{\"address\":\"%s\",\"healthy\":%s,\"ejected\":%s,\"ejected_until\":%s,"
                        "\"active_requests\":%d,\"consecutive_failures\":%u,\"ejections\":%u,"
                        "\"last_check\":%s,\"tls_error\":%s}",
                        sep, address, v.healthy ? "true" : "false", v.ejected ? "true" : "false",
                        until, (int)v.active_requests, v.consecutive_failures, v.ejections, check,
                        tls);
}

/* Server keys are "IP:port" written by the master; anything else is not shown as is. */
static bool safe_key(const char *k)
{
    if (k[0] == '\0')
        return false;
    for (; *k; k++)
        if (!isxdigit((unsigned char)*k) && *k != '.' && *k != ':' && *k != '[' && *k != ']')
            return false;
    return true;
}

/* The servers of u: the configured ones, or for a DNS-named upstream the resolved set. */
static void servers_json(const bw_shm *shm, const bw_upstream_conf *u, uint64_t mono,
                         int64_t offset, struct evbuffer *out)
{
    bw_outlier_group *g = u->shm_slot >= 0 ? bw_shm_servers(shm, u->shm_slot) : NULL;
    if (!u->dynamic) {
        for (size_t i = 0; i < u->n_servers; i++) {
            int k = u->servers[i].shm_index;
            const bw_outlier_server *rec =
                g && k >= 0 && k < BW_OUTLIER_MAX_SERVERS ? &g->servers[k] : NULL;
            server_json(rec, u->servers[i].address, mono, offset, i ? "," : "", out);
        }
        return;
    }
    if (g == NULL)
        return;
    uint16_t idx[BW_OUTLIER_MAX_SERVERS];
    int n = -1;
    for (int attempt = 0; attempt < 100 && n < 0; attempt++) {
        uint64_t seq = UINT64_MAX; /* anything but a published value */
        n = bw_outlier_members(g, &seq, idx);
    }
    for (int i = 0, shown = 0; i < n; i++) {
        const bw_outlier_server *rec = &g->servers[idx[i]];
        char key[BW_OUTLIER_KEY_MAX];
        memcpy(key, rec->key, sizeof(key));
        key[sizeof(key) - 1] = '\0';
        if (!safe_key(key))
            continue;
        server_json(rec, key, mono, offset, shown++ ? "," : "", out);
    }
}

/* DNS state of a DNS-named upstream: ,"dns":{...} (nothing for a literal one). */
static void dns_json(const bw_shm *shm, const bw_upstream_conf *u, struct evbuffer *out)
{
    bw_outlier_group *g = u->shm_slot >= 0 ? bw_shm_servers(shm, u->shm_slot) : NULL;
    if (!u->dynamic || g == NULL)
        return;
    char ok[112] = "null", err[400] = "null";
    uint64_t ok_ms = atomic_load(&g->dns_ok_wall_ms);
    if (ok_ms) {
        char iso[96];
        bw_probes_iso8601(ok_ms, iso, sizeof(iso));
        snprintf(ok, sizeof(ok), "\"%s\"", iso);
    }
    int code = atomic_load(&g->dns_last_error);
    uint32_t si = atomic_load(&g->dns_error_server);
    if (code != 0 && si < u->n_servers) {
        char iso[96];
        bw_probes_iso8601(atomic_load(&g->dns_error_wall_ms), iso, sizeof(iso));
        snprintf(err, sizeof(err), "{\"server\":\"%s\",\"message\":\"%s\",\"time\":\"%s\"}",
                 u->servers[si].address, evdns_err_to_string(code), iso);
    }
    evbuffer_add_printf(out,
                        ",\"dns\":{\"resolve_interval_ms\":%u,\"resolved_at\":%s,\"errors\":%llu,"
                        "\"last_error\":%s}",
                        u->resolve_interval_ms, ok, (unsigned long long)atomic_load(&g->dns_errors),
                        err);
}

void bw_probes_upstream_json(const bw_shm *shm, const bw_upstream_conf *u, uint64_t now_ms,
                             struct evbuffer *out)
{
    uint64_t mono = bw_breaker_now_ms();
    bw_breaker_view v;
    snapshot(shm, u, mono, &v);
    char since[96], opened[112];
    int64_t offset = bw_breaker_wall_offset_ms();
    (void)now_ms;
    bw_probes_iso8601(mono_to_wall(v.since_ms, offset), since, sizeof(since));
    if (v.opened_at_ms) {
        char iso[96];
        bw_probes_iso8601(mono_to_wall(v.opened_at_ms, offset), iso, sizeof(iso));
        snprintf(opened, sizeof(opened), "\"%s\"", iso);
    } else {
        snprintf(opened, sizeof(opened), "null");
    }
    evbuffer_add_printf(out, "{\"name\":\"%s\",\"critical\":%s,\"balance\":\"%s\",\"servers\":[",
                        u->name, u->critical ? "true" : "false",
                        u->balance == BW_BALANCE_LEAST_CONN ? "least_conn" : "round_robin");
    bw_outlier_group *g = u->shm_slot >= 0 ? bw_shm_servers(shm, u->shm_slot) : NULL;
    servers_json(shm, u, mono, offset, out);
    evbuffer_add_printf(
        out,
        "],\"ejections_total\":%llu,"
        "\"circuit_breaker\":{\"state\":\"%s\",\"since\":\"%s\",\"failures\":%u,"
        "\"opened_at\":%s,\"retry_after_ms\":%llu,\"wait_ms\":%llu,\"half_open_permits\":%u,"
        "\"transitions\":{\"closed\":%llu,\"open\":%llu,\"half_open\":%llu},\"rejected\":%llu,"
        "\"forced\":%s}",
        (unsigned long long)(g ? atomic_load(&g->ejections_total) : 0),
        bw_breaker_state_name(v.state), since, v.failures, opened,
        (unsigned long long)v.retry_after_ms, (unsigned long long)v.wait_ms, v.half_open_permits,
        (unsigned long long)v.transitions[BW_BREAKER_CLOSED],
        (unsigned long long)v.transitions[BW_BREAKER_OPEN],
        (unsigned long long)v.transitions[BW_BREAKER_HALF_OPEN], (unsigned long long)v.rejected,
        v.forced ? "true" : "false");
    dns_json(shm, u, out);
    evbuffer_add(out, "}", 1);
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
