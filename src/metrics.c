/*
 * GET /metrics: the Prometheus text exposition (format 0.0.4) of the shared region.
 *
 * Runs in the master at scrape time, never on the request path, so it favours plain loops over
 * cleverness: every counter is the sum of the per-worker cells in the region, read with relaxed
 * loads (a scrape racing an update sees it or not; sums never go backwards because cells are
 * never reset while their name owns the slot).
 *
 * Which series appear:
 *   - counters keyed by a name come from every named slot of the region, so a route or upstream
 *     removed by a reload keeps its last values instead of vanishing in the middle of a rate();
 *     names in the running configuration show even at zero, stale ones only when non-zero;
 *   - gauges (breaker state, keys, connections) describe the running configuration only;
 *   - requests that matched no route carry route="" and upstream="": the configuration refuses
 *     empty names, so this can never collide with a real route or upstream (a placeholder such as
 *     "none" could), and PromQL treats an empty label as an absent one;
 *   - breakwater_redis_sync_age_seconds is +Inf until the first successful sync: the state is
 *     infinitely stale, so an alert on "age > N" fires for an instance that never synced, and
 *     promtool accepts the value.
 * Labels of names in the running configuration come from the configuration, not from the slot,
 * because a slot holds at most BW_SHM_NAME_MAX - 1 bytes of a name.
 */
#include "breakwater/metrics.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef BW_VERSION
#define BW_VERSION "unknown"
#endif

static const char *const error_kind_names[BW_UPERR_KINDS] = {"connect", "timeout", "reset",
                                                             "status", "invalid"};

static void put(struct evbuffer *out, const char *s)
{
    evbuffer_add(out, s, strlen(s));
}

static void family(struct evbuffer *out, const char *name, const char *type, const char *help)
{
    evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Label values may hold anything a route name can: backslash, quote and newline are escaped. */
static void put_label(struct evbuffer *out, const char *s)
{
    const char *run = s;
    for (; *s; s++) {
        const char *esc = NULL;
        if (*s == '\\')
            esc = "\\\\";
        else if (*s == '"')
            esc = "\\\"";
        else if (*s == '\n')
            esc = "\\n";
        if (esc == NULL)
            continue;
        evbuffer_add(out, run, (size_t)(s - run));
        evbuffer_add(out, esc, 2);
        run = s + 1;
    }
    evbuffer_add(out, run, (size_t)(s - run));
}

/* `name{key="value"` without the closing brace, so more labels can follow. */
static void open_series(struct evbuffer *out, const char *name, const char *key, const char *value)
{
    evbuffer_add_printf(out, "%s{%s=\"", name, key);
    put_label(out, value);
    put(out, "\"");
}

static void add_label(struct evbuffer *out, const char *key, const char *value)
{
    evbuffer_add_printf(out, ",%s=\"", key);
    put_label(out, value);
    put(out, "\"");
}

/* Microseconds as exact decimal seconds ("0.005", "2.5", "30"), no floating-point rounding. */
static void put_seconds_us(struct evbuffer *out, uint64_t us)
{
    uint64_t whole = us / 1000000, frac = us % 1000000;
    if (frac == 0) {
        evbuffer_add_printf(out, "%" PRIu64, whole);
        return;
    }
    char digits[8];
    snprintf(digits, sizeof digits, "%06" PRIu64, frac);
    size_t n = 6;
    while (n > 0 && digits[n - 1] == '0')
        n--;
    digits[n] = '\0';
    evbuffer_add_printf(out, "%" PRIu64 ".%s", whole, digits);
}

static uint64_t load_u64(_Atomic uint64_t *p)
{
    return atomic_load_explicit(p, memory_order_relaxed);
}

/* The running configuration's item bound to a slot, or NULL. */
static const bw_upstream_conf *current_upstream(const bw_config *cfg, uint32_t slot)
{
    for (size_t i = 0; cfg && i < cfg->n_upstreams; i++)
        if (cfg->upstreams[i].shm_slot == (int)slot && cfg->upstreams[i].name)
            return &cfg->upstreams[i];
    return NULL;
}

static const bw_route_conf *current_route(const bw_config *cfg, uint32_t slot)
{
    for (size_t i = 0; cfg && i < cfg->n_routes; i++)
        if (cfg->routes[i].shm_slot == (int)slot && cfg->routes[i].name)
            return &cfg->routes[i];
    return NULL;
}

static const bw_ratelimit_conf *current_policy(const bw_config *cfg, uint32_t slot)
{
    for (size_t i = 0; cfg && i < cfg->n_rate_limits; i++)
        if (cfg->rate_limits[i].shm_slot == (int)slot && cfg->rate_limits[i].name)
            return &cfg->rate_limits[i];
    return NULL;
}

static const bw_listener_conf *current_listener(const bw_config *cfg, uint32_t slot)
{
    for (size_t i = 0; cfg && i < cfg->n_listeners; i++)
        if (cfg->listeners[i].shm_slot == (int)slot && cfg->listeners[i].address)
            return &cfg->listeners[i];
    return NULL;
}

/* Label for an upstream slot: the configured name when current, else the stored one. */
static const char *upstream_label(const bw_shm *shm, const bw_config *cfg, uint32_t slot)
{
    const bw_upstream_conf *u = current_upstream(cfg, slot);
    if (u)
        return u->name;
    const bw_shm_upstream *su = bw_shm_upstream_at(shm, (int)slot);
    return su->id.name[0] ? su->id.name : NULL;
}

static void render_requests(const bw_shm *shm, const bw_config *cfg, struct evbuffer *out)
{
    static const char name[] = "breakwater_requests_total";
    family(out, name, "counter", "Requests answered, by route, upstream and status code.");
    uint32_t n_routes = shm->hdr->n_route_slots;
    uint64_t sums[BW_METRICS_CODES];
    /* Rows 0..n_routes-1 are route slots; row n_routes (slot -1) is "no route". */
    for (uint32_t row = 0; row <= n_routes; row++) {
        int slot = row == n_routes ? -1 : (int)row;
        const char *route = "", *upstream = "";
        if (slot >= 0) {
            const bw_route_conf *rc = current_route(cfg, row);
            const bw_shm_route *sr = bw_shm_route_at(shm, slot);
            if (rc) {
                route = rc->name;
                if (rc->upstream >= 0 && (size_t)rc->upstream < cfg->n_upstreams)
                    upstream = cfg->upstreams[rc->upstream].name;
            } else if (sr->id.name[0]) {
                route = sr->id.name;
                upstream = sr->upstream;
            } else {
                continue;
            }
        }
        memset(sums, 0, sizeof sums);
        for (uint32_t w = 0; w < shm->hdr->n_worker_slots; w++) {
            _Atomic uint64_t *cells = bw_shm_requests_row(shm, (int)w, slot);
            for (size_t c = 0; c < BW_METRICS_CODES; c++)
                sums[c] += load_u64(&cells[c]);
        }
        for (size_t c = 0; c < BW_METRICS_CODES; c++) {
            if (sums[c] == 0)
                continue;
            open_series(out, name, "route", route);
            add_label(out, "upstream", upstream);
            evbuffer_add_printf(out, ",code=\"%zu\"} %" PRIu64 "\n", c + 100, sums[c]);
        }
    }
}

static void render_upstream_counters(const bw_shm *shm, const bw_config *cfg, struct evbuffer *out)
{
    static const char hist[] = "breakwater_request_duration_seconds";
    static const char errs[] = "breakwater_upstream_errors_total";
    uint32_t n_up = shm->hdr->n_upstream_slots;

    family(out, hist, "histogram", "Time from request start to the end of the upstream response.");
    for (uint32_t u = 0; u < n_up; u++) {
        const char *label = upstream_label(shm, cfg, u);
        if (label == NULL)
            continue;
        uint64_t buckets[BW_METRICS_BUCKETS + 1] = {0}, sum_us = 0;
        for (uint32_t w = 0; w < shm->hdr->n_worker_slots; w++) {
            bw_upstream_counters *c = bw_shm_upstream_counters(shm, (int)w, (int)u);
            for (size_t b = 0; b <= BW_METRICS_BUCKETS; b++)
                buckets[b] += load_u64(&c->duration_buckets[b]);
            sum_us += load_u64(&c->duration_sum_us);
        }
        uint64_t cumulative = 0;
        for (size_t b = 0; b <= BW_METRICS_BUCKETS; b++) {
            cumulative += buckets[b];
            evbuffer_add_printf(out, "%s_bucket{upstream=\"", hist);
            put_label(out, label);
            put(out, "\",le=\"");
            if (b == BW_METRICS_BUCKETS)
                put(out, "+Inf");
            else
                put_seconds_us(out, bw_metrics_bucket_us[b]);
            evbuffer_add_printf(out, "\"} %" PRIu64 "\n", cumulative);
        }
        evbuffer_add_printf(out, "%s_sum{upstream=\"", hist);
        put_label(out, label);
        put(out, "\"} ");
        put_seconds_us(out, sum_us);
        /* _count is the +Inf bucket rather than duration_count: the cells are read one by one
         * while workers keep counting, and the format requires the two to agree. */
        evbuffer_add_printf(out, "\n%s_count{upstream=\"", hist);
        put_label(out, label);
        evbuffer_add_printf(out, "\"} %" PRIu64 "\n", cumulative);
    }

    family(out, errs, "counter",
           "Failed upstream exchanges, by kind: connect, timeout, reset, status, invalid.");
    for (uint32_t u = 0; u < n_up; u++) {
        const char *label = upstream_label(shm, cfg, u);
        if (label == NULL)
            continue;
        bool current = current_upstream(cfg, u) != NULL;
        uint64_t sums[BW_UPERR_KINDS] = {0};
        for (uint32_t w = 0; w < shm->hdr->n_worker_slots; w++) {
            bw_upstream_counters *c = bw_shm_upstream_counters(shm, (int)w, (int)u);
            for (size_t k = 0; k < BW_UPERR_KINDS; k++)
                sums[k] += load_u64(&c->errors[k]);
        }
        for (size_t k = 0; k < BW_UPERR_KINDS; k++) {
            if (!current && sums[k] == 0)
                continue;
            open_series(out, errs, "upstream", label);
            evbuffer_add_printf(out, ",kind=\"%s\"} %" PRIu64 "\n", error_kind_names[k], sums[k]);
        }
    }
}

/* Which upstreams are critical (their open breaker fails readiness), so that alert rules can
 * join on it instead of naming upstreams. */
static void render_critical(const bw_config *cfg, struct evbuffer *out)
{
    static const char name[] = "breakwater_upstream_critical";
    family(out, name, "gauge",
           "1 when the upstream is critical (its open breaker makes /readyz answer 503), else 0.");
    for (size_t i = 0; cfg && i < cfg->n_upstreams; i++) {
        open_series(out, name, "upstream", cfg->upstreams[i].name);
        evbuffer_add_printf(out, "} %d\n", cfg->upstreams[i].critical ? 1 : 0);
    }
}

static void render_breakers(const bw_shm *shm, const bw_config *cfg, uint64_t now_ms,
                            struct evbuffer *out)
{
    static const char state[] = "breakwater_circuit_breaker_state";
    static const char trans[] = "breakwater_circuit_breaker_transitions_total";
    static const char rej[] = "breakwater_circuit_breaker_rejected_total";
    static const bw_breaker_state states[3] = {BW_BREAKER_CLOSED, BW_BREAKER_OPEN,
                                               BW_BREAKER_HALF_OPEN};
    size_t n = cfg ? cfg->n_upstreams : 0;
    bw_breaker_view *views = calloc(n ? n : 1, sizeof(*views));
    if (views == NULL)
        n = 0;
    for (size_t i = 0; i < n; i++) {
        const bw_breaker *b = bw_shm_breaker(shm, cfg->upstreams[i].shm_slot);
        if (b)
            bw_breaker_snapshot(b, &cfg->upstreams[i].breaker, now_ms, &views[i]);
    }

    family(out, state, "gauge", "Circuit breaker state: 1 closed, 2 open, 3 half_open.");
    for (size_t i = 0; i < n; i++) {
        if (bw_shm_breaker(shm, cfg->upstreams[i].shm_slot) == NULL)
            continue;
        open_series(out, state, "upstream", cfg->upstreams[i].name);
        evbuffer_add_printf(out, "} %d\n", bw_breaker_state_metric(views[i].state));
    }
    family(out, trans, "counter", "Circuit breaker transitions, by the state entered.");
    for (size_t i = 0; i < n; i++) {
        if (bw_shm_breaker(shm, cfg->upstreams[i].shm_slot) == NULL)
            continue;
        for (size_t s = 0; s < 3; s++) {
            open_series(out, trans, "upstream", cfg->upstreams[i].name);
            evbuffer_add_printf(out, ",to=\"%s\"} %" PRIu64 "\n", bw_breaker_state_name(states[s]),
                                views[i].transitions[s]);
        }
    }
    family(out, rej, "counter", "Requests refused with 503 because the circuit breaker was open.");
    for (size_t i = 0; i < n; i++) {
        if (bw_shm_breaker(shm, cfg->upstreams[i].shm_slot) == NULL)
            continue;
        open_series(out, rej, "upstream", cfg->upstreams[i].name);
        evbuffer_add_printf(out, "} %" PRIu64 "\n", views[i].rejected);
    }
    free(views);
}

/* Per-server health (passive ejection and active checks) and the counters behind it. */
static void render_servers(const bw_shm *shm, const bw_config *cfg, uint64_t now_ms,
                           struct evbuffer *out)
{
    static const char healthy[] = "breakwater_upstream_server_healthy";
    static const char ejections[] = "breakwater_upstream_ejections_total";
    static const char checks[] = "breakwater_health_checks_total";
    static const char dns[] = "breakwater_dns_errors_total";
    size_t n = cfg ? cfg->n_upstreams : 0;
    family(out, healthy, "gauge",
           "1 when the server may be picked (not ejected, not failed by health checks), else 0.");
    for (size_t i = 0; i < n; i++) {
        const bw_upstream_conf *u = &cfg->upstreams[i];
        const bw_outlier_group *g = bw_shm_servers(shm, u->shm_slot);
        if (g == NULL)
            continue;
        uint16_t members[BW_OUTLIER_MAX_SERVERS];
        int n_members = 0;
        if (u->dynamic) {
            n_members = -1;
            for (int attempt = 0; attempt < 100 && n_members < 0; attempt++) {
                uint64_t seq = UINT64_MAX;
                n_members = bw_outlier_members(g, &seq, members);
            }
        } else {
            for (size_t k = 0; k < u->n_servers; k++) {
                int idx = u->servers[k].shm_index;
                if (idx >= 0 && idx < BW_OUTLIER_MAX_SERVERS)
                    members[n_members++] = (uint16_t)idx;
            }
        }
        for (int k = 0; k < n_members; k++) {
            const bw_outlier_server *rec = &g->servers[members[k]];
            char key[BW_OUTLIER_KEY_MAX];
            memcpy(key, rec->key, sizeof(key));
            key[sizeof(key) - 1] = '\0';
            bw_outlier_view v;
            bw_outlier_snapshot(rec, now_ms, &v);
            open_series(out, healthy, "upstream", u->name);
            add_label(out, "server", key);
            evbuffer_add_printf(out, "} %d\n", v.healthy ? 1 : 0);
        }
    }
    family(out, ejections, "counter", "Servers ejected by passive outlier detection.");
    for (size_t i = 0; i < n; i++) {
        bw_outlier_group *g = bw_shm_servers(shm, cfg->upstreams[i].shm_slot);
        if (g == NULL)
            continue;
        open_series(out, ejections, "upstream", cfg->upstreams[i].name);
        evbuffer_add_printf(out, "} %" PRIu64 "\n", load_u64(&g->ejections_total));
    }
    family(out, checks, "counter", "Active health checks finished, by result (pass or fail).");
    for (size_t i = 0; i < n; i++) {
        bw_outlier_group *g = bw_shm_servers(shm, cfg->upstreams[i].shm_slot);
        if (g == NULL || !cfg->upstreams[i].health_check.enabled)
            continue;
        open_series(out, checks, "upstream", cfg->upstreams[i].name);
        evbuffer_add_printf(out, ",result=\"pass\"} %" PRIu64 "\n", load_u64(&g->checks_pass));
        open_series(out, checks, "upstream", cfg->upstreams[i].name);
        evbuffer_add_printf(out, ",result=\"fail\"} %" PRIu64 "\n", load_u64(&g->checks_fail));
    }
    family(out, dns, "counter", "Failed resolutions of upstream server names.");
    for (size_t i = 0; i < n; i++) {
        bw_outlier_group *g = bw_shm_servers(shm, cfg->upstreams[i].shm_slot);
        if (g == NULL)
            continue;
        open_series(out, dns, "upstream", cfg->upstreams[i].name);
        evbuffer_add_printf(out, "} %" PRIu64 "\n", load_u64(&g->dns_errors));
    }
}

static void render_rate_limits(const bw_shm *shm, const bw_config *cfg, uint64_t now_ms,
                               struct evbuffer *out)
{
    static const char limited[] = "breakwater_rate_limited_total";
    static const char keys[] = "breakwater_rate_limit_keys";
    static const char bytes[] = "breakwater_rate_limit_table_bytes";
    static const char evict[] = "breakwater_rate_limit_evictions_total";
    uint32_t n_pol = shm->hdr->n_policy_slots;

    family(out, limited, "counter",
           "Requests that found their rate-limit bucket empty (refused, or let through in "
           "dry_run).");
    for (uint32_t p = 0; p < n_pol; p++) {
        const bw_ratelimit_conf *pc = current_policy(cfg, p);
        const bw_shm_named *sp = bw_shm_policy_at(shm, (int)p);
        const char *label = pc ? pc->name : sp->name[0] ? sp->name : NULL;
        if (label == NULL)
            continue;
        uint64_t sum = 0;
        for (uint32_t w = 0; w < shm->hdr->n_worker_slots; w++)
            sum += load_u64(bw_shm_rate_limited_cell(shm, (int)w, (int)p));
        if (pc == NULL && sum == 0)
            continue;
        open_series(out, limited, "policy", label);
        evbuffer_add_printf(out, "} %" PRIu64 "\n", sum);
    }

    bw_ratelimit_table *t = bw_shm_ratelimit(shm);
    family(out, keys, "gauge", "Client keys currently limited (bucket not full), by policy.");
    uint64_t *counts = calloc(n_pol ? n_pol : 1, sizeof(*counts));
    if (counts != NULL && cfg != NULL) {
        /* The table runs on CLOCK_MONOTONIC nanoseconds, the same clock as now_ms. */
        bw_ratelimit_table_count_keys(t, now_ms * UINT64_C(1000000), counts, n_pol);
        for (size_t i = 0; i < cfg->n_rate_limits; i++) {
            int slot = cfg->rate_limits[i].shm_slot;
            if (slot < 0 || (uint32_t)slot >= n_pol)
                continue;
            open_series(out, keys, "policy", cfg->rate_limits[i].name);
            evbuffer_add_printf(out, "} %" PRIu64 "\n", counts[slot]);
        }
    }
    free(counts);

    bw_ratelimit_stats st;
    bw_ratelimit_table_stats(t, &st);
    family(out, bytes, "gauge", "Shared memory taken by the rate-limit table.");
    size_t table_bytes =
        bw_ratelimit_fleet_enabled(t) ? bw_ratelimit_table_size_bytes_fleet(st.entries) : st.bytes;
    evbuffer_add_printf(out, "%s %zu\n", bytes, table_bytes);
    family(out, evict, "counter",
           "Rate-limit entries still in use forced out of the table to make room for new keys.");
    evbuffer_add_printf(out, "%s %" PRIu64 "\n", evict, st.evictions);
    if (bw_ratelimit_fleet_enabled(t)) {
        static const char owed[] = "breakwater_rate_limit_owed_evictions_total";
        static const char lost[] = "breakwater_rate_limit_owed_tokens_lost_total";
        family(out, owed, "counter",
               "Rate-limit keys dropped while they still owed tokens to the fleet (Redis).");
        evbuffer_add_printf(out, "%s %" PRIu64 "\n", owed, st.owed_evictions);
        family(out, lost, "counter", "Tokens those keys owed, never counted fleet-wide.");
        evbuffer_add_printf(out, "%s %" PRIu64 "\n", lost, st.owed_tokens_lost);
    }
}

static void render_connections(const bw_shm *shm, const bw_config *cfg, struct evbuffer *out)
{
    static const char name[] = "breakwater_connections_active";
    family(out, name, "gauge", "Client connections open, by listener.");
    for (uint32_t l = 0; l < shm->hdr->n_listener_slots; l++) {
        const bw_listener_conf *lc = current_listener(cfg, l);
        const bw_shm_named *sl = bw_shm_listener_at(shm, (int)l);
        const char *label = lc ? lc->address : sl->name[0] ? sl->name : NULL;
        if (label == NULL)
            continue;
        int64_t sum = 0;
        for (uint32_t w = 0; w < shm->hdr->n_worker_slots; w++)
            sum += atomic_load_explicit(bw_shm_connections_cell(shm, (int)w, (int)l),
                                        memory_order_relaxed);
        /* A listener dropped by a reload is shown while old workers still serve it. */
        if (lc == NULL && sum == 0)
            continue;
        open_series(out, name, "listener", label);
        evbuffer_add_printf(out, "} %" PRId64 "\n", sum);
    }
}

static void render_accept_errors(const bw_shm *shm, const bw_config *cfg,
                                 const bw_metrics_master *m, struct evbuffer *out)
{
    static const char name[] = "breakwater_accept_errors_total";
    family(out, name, "counter",
           "Connections the kernel had but accept() could not take (descriptors or memory ran "
           "out), by listener.");
    for (uint32_t l = 0; l < shm->hdr->n_listener_slots; l++) {
        const bw_listener_conf *lc = current_listener(cfg, l);
        if (lc == NULL)
            continue;
        uint64_t sum = 0;
        for (uint32_t w = 0; w < shm->hdr->n_worker_slots; w++)
            sum += atomic_load_explicit(bw_shm_accept_errors_cell(shm, (int)w, (int)l),
                                        memory_order_relaxed);
        open_series(out, name, "listener", lc->address);
        evbuffer_add_printf(out, "} %" PRIu64 "\n", sum);
    }
    /* The admin listener is served by the master, which counts its own. */
    evbuffer_add_printf(out, "%s{listener=\"admin\"} %" PRIu64 "\n", name,
                        m ? m->admin_accept_errors : 0);
}

static void render_redis(const bw_shm *shm, const bw_metrics_master *m, uint64_t wall_ms,
                         struct evbuffer *out)
{
    bw_shm_status *st = &shm->hdr->status;
    if (!atomic_load(&st->redis_configured))
        return;
    family(out, "breakwater_redis_up", "gauge", "1 while the Redis connection is healthy.");
    evbuffer_add_printf(out, "breakwater_redis_up %u\n", atomic_load(&st->redis_up) ? 1u : 0u);

    family(out, "breakwater_redis_sync_age_seconds", "gauge",
           "Seconds since the last successful Redis sync (+Inf before the first).");
    uint64_t last = atomic_load(&st->redis_last_sync_ms);
    put(out, "breakwater_redis_sync_age_seconds ");
    if (last == 0)
        put(out, "+Inf");
    else
        put_seconds_us(out, (wall_ms > last ? wall_ms - last : 0) * 1000);
    put(out, "\n");

    family(out, "breakwater_redis_errors_total", "counter", "Redis connection and command errors.");
    evbuffer_add_printf(out, "breakwater_redis_errors_total %" PRIu64 "\n",
                        (uint64_t)atomic_load(&st->redis_errors));
    family(out, "breakwater_redis_pending_deltas", "gauge",
           "Rate-limit consumption not yet written to Redis.");
    evbuffer_add_printf(out, "breakwater_redis_pending_deltas %" PRIu64 "\n",
                        m ? m->redis_pending_deltas : 0);
}

static void render_process(const bw_shm *shm, const bw_metrics_master *m, struct evbuffer *out)
{
    uint32_t alive = 0;
    for (uint32_t w = 0; w < shm->hdr->n_worker_slots; w++)
        if (atomic_load(&bw_shm_worker(shm, (int)w)->pid) != 0)
            alive++;
    family(out, "breakwater_workers_alive", "gauge", "Worker processes running.");
    evbuffer_add_printf(out, "breakwater_workers_alive %u\n", alive);

    family(out, "breakwater_worker_restarts_total", "counter",
           "Worker processes that died and were started again.");
    evbuffer_add_printf(out, "breakwater_worker_restarts_total %" PRIu64 "\n",
                        m ? m->worker_restarts : 0);
    family(out, "breakwater_config_reloads_total", "counter", "Configuration reloads, by result.");
    evbuffer_add_printf(out,
                        "breakwater_config_reloads_total{result=\"success\"} %" PRIu64 "\n"
                        "breakwater_config_reloads_total{result=\"failure\"} %" PRIu64 "\n",
                        m ? m->reloads_success : 0, m ? m->reloads_failure : 0);
    family(out, "breakwater_admin_auth_failures_total", "counter",
           "Admin requests refused for a missing or wrong bearer token.");
    evbuffer_add_printf(out, "breakwater_admin_auth_failures_total %" PRIu64 "\n",
                        m ? m->admin_auth_failures : 0);
    family(out, "breakwater_build_info", "gauge", "Always 1; the version is in the label.");
    put(out, "breakwater_build_info{version=\"");
    put_label(out, BW_VERSION);
    put(out, "\"} 1\n");
}

/* ---- the Prometheus process set, from /proc ---- */

int bw_metrics_parse_proc_stat(const char *text, long ticks_per_sec, long page_size,
                               double boot_time, bw_proc_sample *out)
{
    /* The command name is in parentheses and may hold anything, ')' included: fields are
     * counted from the last ')'. Field 3 (state) is the first after it. */
    const char *p = text ? strrchr(text, ')') : NULL;
    if (p == NULL || ticks_per_sec <= 0)
        return -1;
    p++;
    unsigned long long v[22] = {0};
    int field = 3;
    while (*p && field <= 24) {
        while (*p == ' ')
            p++;
        if (!*p)
            break;
        char *end;
        errno = 0;
        unsigned long long x = strtoull(p, &end, 10);
        if (end == p) { /* the state letter */
            while (*p && *p != ' ')
                p++;
        } else {
            if (errno != 0)
                return -1;
            p = end;
        }
        if (field >= 3)
            v[field - 3] = x;
        field++;
    }
    if (field <= 24)
        return -1;
    out->cpu_seconds = (double)(v[14 - 3] + v[15 - 3]) / (double)ticks_per_sec;
    out->start_time_seconds = boot_time + (double)v[22 - 3] / (double)ticks_per_sec;
    out->rss_bytes = v[24 - 3] * (unsigned long long)(page_size > 0 ? page_size : 4096);
    return 0;
}

uint64_t bw_metrics_parse_max_fds(const char *text)
{
    const char *p = text ? strstr(text, "Max open files") : NULL;
    if (p == NULL)
        return 0;
    p += strlen("Max open files");
    while (*p == ' ')
        p++;
    char *end;
    unsigned long long n = strtoull(p, &end, 10);
    return end == p ? 0 : (uint64_t)n; /* "unlimited" parses as nothing */
}

double bw_metrics_parse_boot_time(const char *text)
{
    const char *p = text;
    while (p && *p) {
        if (strncmp(p, "btime ", 6) == 0)
            return strtod(p + 6, NULL);
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    return 0;
}

/* A small /proc file into buf; returns its length or -1. */
static ssize_t read_small(const char *path, char *buf, size_t len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t got = 0;
    while (got + 1 < len) {
        ssize_t n = read(fd, buf + got, len - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    return (ssize_t)got;
}

static uint64_t count_fds(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    if (d == NULL)
        return 0;
    uint64_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    /* opendir's own descriptor is in the list when a process counts itself. */
    return pid == getpid() && n > 0 ? n - 1 : n;
}

/* Reads one process; returns 0, or -1 when it is gone (or not readable). */
static int sample_process(pid_t pid, double boot_time, bool with_limits, bw_proc_sample *out)
{
    char path[64], buf[4096];
    memset(out, 0, sizeof(*out));
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    if (read_small(path, buf, sizeof(buf)) <= 0)
        return -1;
    if (bw_metrics_parse_proc_stat(buf, sysconf(_SC_CLK_TCK), sysconf(_SC_PAGESIZE), boot_time,
                                   out) < 0)
        return -1;
    out->open_fds = count_fds(pid);
    if (with_limits) {
        snprintf(path, sizeof(path), "/proc/%d/limits", (int)pid);
        if (read_small(path, buf, sizeof(buf)) > 0)
            out->max_fds = bw_metrics_parse_max_fds(buf);
    }
    return 0;
}

void bw_metrics_render_process(pid_t master, const pid_t *workers, size_t n_workers,
                               struct evbuffer *out)
{
    char buf[4096];
    double boot = 0;
    if (read_small("/proc/stat", buf, sizeof(buf)) > 0)
        boot = bw_metrics_parse_boot_time(buf);
    bw_proc_sample ms, sum, w;
    if (sample_process(master, boot, true, &ms) < 0)
        return; /* no /proc: the set is left out rather than reported as zeros */
    sum = ms;
    for (size_t i = 0; i < n_workers; i++) {
        if (workers[i] <= 0 || workers[i] == master ||
            sample_process(workers[i], boot, false, &w) < 0)
            continue;
        sum.cpu_seconds += w.cpu_seconds;
        sum.rss_bytes += w.rss_bytes;
        sum.open_fds += w.open_fds;
    }
    family(out, "process_cpu_seconds_total", "counter",
           "Total user and system CPU time spent in seconds (master and workers).");
    evbuffer_add_printf(out, "process_cpu_seconds_total %.2f\n", sum.cpu_seconds);
    family(out, "process_resident_memory_bytes", "gauge",
           "Resident memory size in bytes (master and workers).");
    evbuffer_add_printf(out, "process_resident_memory_bytes %" PRIu64 "\n", sum.rss_bytes);
    family(out, "process_open_fds", "gauge",
           "Number of open file descriptors (master and workers).");
    evbuffer_add_printf(out, "process_open_fds %" PRIu64 "\n", sum.open_fds);
    if (ms.max_fds > 0) {
        family(out, "process_max_fds", "gauge",
               "Maximum number of open file descriptors (of the master).");
        evbuffer_add_printf(out, "process_max_fds %" PRIu64 "\n", ms.max_fds);
    }
    family(out, "process_start_time_seconds", "gauge",
           "Start time of the master since unix epoch in seconds.");
    evbuffer_add_printf(out, "process_start_time_seconds %.2f\n", ms.start_time_seconds);
}

static void render_os_process(const bw_shm *shm, struct evbuffer *out)
{
    pid_t *pids = calloc(shm->hdr->n_worker_slots + 1u, sizeof(*pids));
    size_t n = 0;
    if (pids == NULL)
        return;
    for (uint32_t w = 0; w < shm->hdr->n_worker_slots; w++) {
        int32_t pid = atomic_load(&bw_shm_worker(shm, (int)w)->pid);
        if (pid > 0)
            pids[n++] = (pid_t)pid;
    }
    bw_metrics_render_process(getpid(), pids, n, out);
    free(pids);
}

void bw_metrics_render(const bw_shm *shm, const bw_config *cfg, const bw_metrics_master *m,
                       uint64_t now_ms, uint64_t wall_ms, struct evbuffer *out)
{
    if (shm == NULL || shm->hdr == NULL || out == NULL)
        return;
    render_requests(shm, cfg, out);
    render_upstream_counters(shm, cfg, out);
    render_breakers(shm, cfg, now_ms, out);
    render_critical(cfg, out);
    render_servers(shm, cfg, now_ms, out);
    render_rate_limits(shm, cfg, now_ms, out);
    render_connections(shm, cfg, out);
    render_accept_errors(shm, cfg, m, out);
    render_redis(shm, m, wall_ms, out);
    render_process(shm, m, out);
    render_os_process(shm, out);
}
