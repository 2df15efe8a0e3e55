/*
 * Passive outlier ejection and per-server health records in shared memory.
 *
 * Each upstream server has one record that every worker updates with plain atomics. A failure
 * adds one to the server's consecutive-failure count; the failure that reaches the threshold
 * ejects the server by moving ejected_until into the future, and balancers skip a server whose
 * ejected_until has not passed. Nothing has to end an ejection: time does, so a worker dying at
 * any point cannot leave a server out for ever.
 *
 * The max_ejection_percent cap is checked, then the ejection made with a compare-and-swap, then
 * the cap checked again. Two workers ejecting two servers at once may both see the other's
 * ejection on the second check; each then undoes its own, so the cap holds at the price of an
 * ejection that comes one failure later. The failure count is not cleared by a refused
 * ejection, so the next failure of that server tries again.
 *
 * The backoff level (ejections in a row) grows with each ejection and is forgotten after a
 * success that comes a whole base period after the last ejection ended, so a server that keeps
 * failing right after it returns stays out longer each time, as with Envoy's outlier detection.
 */
#include "breakwater/outlier.h"

#include <string.h>

void bw_outlier_group_init(bw_outlier_group *g)
{
    memset(g, 0, sizeof(*g));
}

static void server_clear(bw_outlier_server *s)
{
    memset(s, 0, sizeof(*s));
}

int bw_outlier_bind(bw_outlier_group *g, const char *const *keys, size_t n, uint32_t generation,
                    int *out_index)
{
    if (n > BW_OUTLIER_MAX_SERVERS)
        return -1;
    bool taken[BW_OUTLIER_MAX_SERVERS] = {false};
    /* Known keys first, so that a new server never takes the record of one still present. */
    for (size_t i = 0; i < n; i++) {
        out_index[i] = -1;
        for (size_t k = 0; k < BW_OUTLIER_MAX_SERVERS; k++) {
            if (!taken[k] && g->servers[k].key[0] != '\0' &&
                strncmp(g->servers[k].key, keys[i], BW_OUTLIER_KEY_MAX) == 0) {
                out_index[i] = (int)k;
                taken[k] = true;
                break;
            }
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (out_index[i] >= 0)
            continue;
        int best = -1;
        for (size_t k = 0; k < BW_OUTLIER_MAX_SERVERS; k++) {
            if (taken[k])
                continue;
            if (g->servers[k].key[0] == '\0') {
                best = (int)k;
                break;
            }
            if (best < 0 ||
                atomic_load(&g->servers[k].generation) < atomic_load(&g->servers[best].generation))
                best = (int)k;
        }
        if (best < 0)
            return -1;
        bw_outlier_server *s = &g->servers[best];
        server_clear(s);
        size_t len = strlen(keys[i]);
        if (len >= BW_OUTLIER_KEY_MAX)
            len = BW_OUTLIER_KEY_MAX - 1;
        memcpy(s->key, keys[i], len);
        s->key[len] = '\0';
        taken[best] = true;
        out_index[i] = best;
    }
    for (size_t i = 0; i < n; i++)
        atomic_store(&g->servers[out_index[i]].generation, generation);
    return 0;
}

static bool ejected_at(const bw_outlier_server *s, uint64_t now_ms)
{
    return now_ms < atomic_load_explicit(&s->ejected_until, memory_order_relaxed);
}

bool bw_outlier_available(const bw_outlier_server *s, uint64_t now_ms)
{
    return !ejected_at(s, now_ms) &&
           atomic_load_explicit(&s->check_unhealthy, memory_order_relaxed) == 0;
}

void bw_outlier_success(bw_outlier_server *s, const bw_outlier_conf *c, uint64_t now_ms)
{
    /* Stores only when something changes: a healthy server's record stays read-only on the hot
     * path, so the workers do not bounce its cache line. */
    if (atomic_load_explicit(&s->failures, memory_order_relaxed) != 0)
        atomic_store_explicit(&s->failures, 0, memory_order_relaxed);
    if (atomic_load_explicit(&s->ejections, memory_order_relaxed) != 0) {
        uint64_t until = atomic_load_explicit(&s->ejected_until, memory_order_relaxed);
        if (now_ms >= until + c->base_ejection_ms)
            atomic_store_explicit(&s->ejections, 0, memory_order_relaxed);
    }
}

/* Servers of the pool other than s ejected at now. */
static size_t others_ejected(const bw_outlier_server *s, bw_outlier_server *const *pool,
                             size_t n_pool, uint64_t now_ms)
{
    size_t n = 0;
    for (size_t i = 0; i < n_pool; i++) {
        if (pool[i] != s && ejected_at(pool[i], now_ms))
            n++;
    }
    return n;
}

bool bw_outlier_failure(bw_outlier_server *s, bw_outlier_server *const *pool, size_t n_pool,
                        const bw_outlier_conf *c, uint64_t now_ms, uint64_t *ejected_ms)
{
    if (ejected_ms != NULL)
        *ejected_ms = 0;
    if (ejected_at(s, now_ms))
        return false;
    /* Counted even with detection off (consecutive_failures 0), for /upstreams. */
    uint32_t f = atomic_fetch_add_explicit(&s->failures, 1, memory_order_relaxed) + 1;
    if (c->consecutive_failures == 0 || f < c->consecutive_failures)
        return false;
    size_t allowed = n_pool * c->max_ejection_percent / 100;
    if (n_pool == 0 || allowed > n_pool - 1)
        allowed = n_pool ? n_pool - 1 : 0;
    if (others_ejected(s, pool, n_pool, now_ms) + 1 > allowed)
        return false;
    uint64_t old = atomic_load(&s->ejected_until);
    if (now_ms < old)
        return false; /* another worker ejected it meanwhile */
    uint32_t level = atomic_load(&s->ejections) + 1;
    uint64_t dur = (uint64_t)c->base_ejection_ms * level;
    if (dur > c->max_ejection_ms)
        dur = c->max_ejection_ms;
    uint64_t until = now_ms + (dur ? dur : 1);
    if (!atomic_compare_exchange_strong(&s->ejected_until, &old, until))
        return false;
    if (others_ejected(s, pool, n_pool, now_ms) + 1 > allowed) {
        uint64_t mine = until;
        atomic_compare_exchange_strong(&s->ejected_until, &mine, old);
        return false;
    }
    atomic_store(&s->ejections, level);
    atomic_store(&s->failures, 0);
    atomic_fetch_add_explicit(&s->ejections_total, 1, memory_order_relaxed);
    if (ejected_ms != NULL)
        *ejected_ms = dur;
    return true;
}

void bw_outlier_active(bw_outlier_server *s, int delta)
{
    atomic_fetch_add_explicit(&s->active, delta, memory_order_relaxed);
}

bool bw_outlier_check_done(bw_outlier_server *s, const bw_health_check_conf *c, bool passed,
                           bw_check_result result, int status, uint64_t wall_ms)
{
    bool changed = false;
    bool unhealthy = atomic_load(&s->check_unhealthy) != 0;
    if (passed) {
        uint32_t p = atomic_load(&s->check_passes) + 1;
        atomic_store(&s->check_passes, p);
        atomic_store(&s->check_fails, 0);
        if (unhealthy && p >= c->healthy_threshold) {
            atomic_store(&s->check_unhealthy, 0);
            changed = true;
        }
    } else {
        uint32_t f = atomic_load(&s->check_fails) + 1;
        atomic_store(&s->check_fails, f);
        atomic_store(&s->check_passes, 0);
        if (!unhealthy && f >= c->unhealthy_threshold) {
            atomic_store(&s->check_unhealthy, 1);
            changed = true;
        }
    }
    atomic_store(&s->check_result, (uint32_t)result);
    atomic_store(&s->check_status, status);
    atomic_store(&s->check_wall_ms, wall_ms);
    return changed;
}

void bw_outlier_snapshot(const bw_outlier_server *s, uint64_t now_ms, bw_outlier_view *out)
{
    memset(out, 0, sizeof(*out));
    uint64_t until = atomic_load_explicit(&s->ejected_until, memory_order_relaxed);
    out->ejected = now_ms < until;
    out->ejected_until = out->ejected ? until : 0;
    out->check_unhealthy = atomic_load_explicit(&s->check_unhealthy, memory_order_relaxed) != 0;
    out->healthy = !out->ejected && !out->check_unhealthy;
    out->consecutive_failures = atomic_load_explicit(&s->failures, memory_order_relaxed);
    out->ejections = atomic_load_explicit(&s->ejections, memory_order_relaxed);
    int32_t active = atomic_load_explicit(&s->active, memory_order_relaxed);
    out->active_requests = active > 0 ? active : 0;
    uint32_t r = atomic_load_explicit(&s->check_result, memory_order_relaxed);
    out->check_result = r <= BW_CHECK_TLS ? (bw_check_result)r : BW_CHECK_NONE;
    out->check_status = atomic_load_explicit(&s->check_status, memory_order_relaxed);
    out->check_wall_ms = atomic_load_explicit(&s->check_wall_ms, memory_order_relaxed);
}

int bw_outlier_publish(bw_outlier_group *g, const char *const *keys,
                       const struct sockaddr_storage *addrs, const uint32_t *addr_lens, size_t n,
                       uint32_t generation)
{
    int idx[BW_OUTLIER_MAX_SERVERS];
    if (n > BW_OUTLIER_MAX_SERVERS)
        return -1;
    uint64_t seq = atomic_load(&g->members_seq);
    atomic_store(&g->members_seq, seq | 1); /* odd: being written */
    atomic_thread_fence(memory_order_seq_cst);
    if (bw_outlier_bind(g, keys, n, generation, idx) < 0) {
        atomic_store(&g->members_seq, (seq | 1) + 1);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        bw_outlier_server *s = &g->servers[idx[i]];
        uint32_t len = addr_lens[i] <= sizeof(s->addr) ? addr_lens[i] : 0;
        memcpy(&s->addr, &addrs[i], len);
        s->addr_len = len;
        atomic_store_explicit(&g->members[i], (uint16_t)idx[i], memory_order_relaxed);
    }
    atomic_store_explicit(&g->n_members, (uint32_t)n, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    atomic_store(&g->members_seq, (seq | 1) + 1); /* even again, and different */
    return 0;
}

int bw_outlier_members(const bw_outlier_group *g, uint64_t *seq, uint16_t *out)
{
    uint64_t s1 = atomic_load(&g->members_seq);
    if ((s1 & 1) || s1 == *seq)
        return -1;
    uint32_t n = atomic_load_explicit(&g->n_members, memory_order_relaxed);
    if (n > BW_OUTLIER_MAX_SERVERS)
        return -1;
    for (uint32_t i = 0; i < n; i++)
        out[i] = atomic_load_explicit(&g->members[i], memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load(&g->members_seq) != s1)
        return -1;
    *seq = s1;
    return (int)n;
}

const char *bw_check_result_name(bw_check_result r)
{
    switch (r) {
    case BW_CHECK_NONE:
        return "none";
    case BW_CHECK_PASS:
        return "pass";
    case BW_CHECK_STATUS:
        return "status";
    case BW_CHECK_CONNECT:
        return "connect";
    case BW_CHECK_TIMEOUT:
        return "timeout";
    case BW_CHECK_INVALID:
        return "invalid";
    case BW_CHECK_TOO_LARGE:
        return "too_large";
    case BW_CHECK_TLS:
        return "tls";
    }
    return "none";
}
