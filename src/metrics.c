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

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    family(out, "breakwater_build_info", "gauge", "Always 1; the version is in the label.");
    put(out, "breakwater_build_info{version=\"");
    put_label(out, BW_VERSION);
    put(out, "\"} 1\n");
}

void bw_metrics_render(const bw_shm *shm, const bw_config *cfg, const bw_metrics_master *m,
                       uint64_t now_ms, uint64_t wall_ms, struct evbuffer *out)
{
    if (shm == NULL || shm->hdr == NULL || out == NULL)
        return;
    render_requests(shm, cfg, out);
    render_upstream_counters(shm, cfg, out);
    render_breakers(shm, cfg, now_ms, out);
    render_rate_limits(shm, cfg, now_ms, out);
    render_connections(shm, cfg, out);
    render_redis(shm, m, wall_ms, out);
    render_process(shm, m, out);
}
