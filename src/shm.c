/*
 * The process-shared region: layout, creation, binding configuration names to slots, worker
 * slots, and the hot-path metric counters.
 *
 * Layout. One anonymous shared mapping, every section starting on a 64-byte boundary so that no
 * two sections share a cache line:
 *   header | upstream slots (name + breaker) | route slots | policy slots | listener slots |
 *   worker slots (fixed fields + counters) | rate-limit table
 * Slot counts are fixed at creation with headroom (max(16, 2n + 8) named slots of each kind,
 * 2 * workers + 4 worker slots), because the mapping cannot grow once workers share it.
 *
 * Names. State and counters belong to a name, not to a position in the configuration, so that
 * a reload which reorders or renames things moves nothing under a running counter. Binding is
 * planned completely before anything is written: a reload that does not fit fails without
 * touching the region. A name that no longer appears keeps its slot (and its series) until a new
 * name needs the room; then the free slots go first, and after them the one unused for longest.
 * A route's identity is its name together with its upstream's name, since both are labels of its
 * series. Names longer than a slot holds are stored as a prefix plus a hash of the whole name, so
 * two long names never share a slot by accident.
 *
 * Counters. Each worker process adds to its own slot with relaxed atomic adds: no contention
 * between workers and nothing a killed process can leave half done. The scrape sums the slots.
 */
#include "breakwater/shm.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

const uint64_t bw_metrics_bucket_us[BW_METRICS_BUCKETS] = {
    5000,   10000,   25000,   50000,   100000,   250000,
    500000, 1000000, 2500000, 5000000, 10000000, 30000000,
};

#define ALIGN 64u
/* Far beyond any sane configuration; keeps the size arithmetic away from overflow. */
#define MAX_NAMED_SLOTS 65535u
#define MAX_WORKER_SLOTS 4096u

static size_t align_up(size_t n)
{
    return (n + ALIGN - 1) & ~(size_t)(ALIGN - 1);
}

static uint32_t named_slots_for(size_t n)
{
    size_t want = 2 * n + 8;
    if (want < 16)
        want = 16;
    if (want > MAX_NAMED_SLOTS)
        want = MAX_NAMED_SLOTS;
    return (uint32_t)want;
}

/* Offsets inside one worker slot, derived from the header's counts. */
typedef struct worker_layout {
    size_t requests, upstream, rate_limited, connections, accept_errors, size;
} worker_layout;

static void worker_layout_of(uint32_t n_route, uint32_t n_up, uint32_t n_pol, uint32_t n_lis,
                             worker_layout *l)
{
    l->requests = align_up(sizeof(bw_worker_slot));
    l->upstream =
        align_up(l->requests + (size_t)(n_route + 1) * BW_METRICS_CODES * sizeof(uint64_t));
    l->rate_limited = align_up(l->upstream + (size_t)n_up * sizeof(bw_upstream_counters));
    l->connections = align_up(l->rate_limited + (size_t)n_pol * sizeof(uint64_t));
    l->accept_errors = align_up(l->connections + (size_t)n_lis * sizeof(int64_t));
    l->size = align_up(l->accept_errors + (size_t)n_lis * sizeof(uint64_t));
}

static void header_worker_layout(const bw_shm_header *h, worker_layout *l)
{
    worker_layout_of(h->n_route_slots, h->n_upstream_slots, h->n_policy_slots, h->n_listener_slots,
                     l);
}

static unsigned char *worker_base(const bw_shm *shm, uint32_t slot)
{
    return (unsigned char *)shm->base + shm->hdr->off_workers +
           (size_t)slot * shm->hdr->worker_slot_size;
}

/* The hot path never fails: a process without a slot of its own counts into slot 0. */
static uint32_t worker_index(const bw_shm *shm, int worker_slot)
{
    if (worker_slot < 0 || (uint32_t)worker_slot >= shm->hdr->n_worker_slots)
        return 0;
    return (uint32_t)worker_slot;
}

static _Atomic uint64_t *requests_row(const bw_shm *shm, uint32_t w, uint32_t row)
{
    worker_layout l;
    header_worker_layout(shm->hdr, &l);
    return (_Atomic uint64_t *)(worker_base(shm, w) + l.requests) + (size_t)row * BW_METRICS_CODES;
}

static bw_upstream_counters *upstream_counters(const bw_shm *shm, uint32_t w, uint32_t u)
{
    worker_layout l;
    header_worker_layout(shm->hdr, &l);
    return (bw_upstream_counters *)(worker_base(shm, w) + l.upstream) + u;
}

static _Atomic uint64_t *rate_limited_cell(const bw_shm *shm, uint32_t w, uint32_t p)
{
    worker_layout l;
    header_worker_layout(shm->hdr, &l);
    return (_Atomic uint64_t *)(worker_base(shm, w) + l.rate_limited) + p;
}

static _Atomic int64_t *connections_cell(const bw_shm *shm, uint32_t w, uint32_t lis)
{
    worker_layout l;
    header_worker_layout(shm->hdr, &l);
    return (_Atomic int64_t *)(worker_base(shm, w) + l.connections) + lis;
}

static _Atomic uint64_t *accept_errors_cell(const bw_shm *shm, uint32_t w, uint32_t lis)
{
    worker_layout l;
    header_worker_layout(shm->hdr, &l);
    return (_Atomic uint64_t *)(worker_base(shm, w) + l.accept_errors) + lis;
}

int bw_shm_create(bw_shm *shm, const bw_config *cfg, char *err, size_t errlen)
{
    memset(shm, 0, sizeof(*shm));
    uint32_t n_up = named_slots_for(cfg->n_upstreams);
    uint32_t n_route = named_slots_for(cfg->n_routes);
    uint32_t n_pol = named_slots_for(cfg->n_rate_limits);
    uint32_t n_lis = named_slots_for(cfg->n_listeners);
    uint32_t workers = cfg->workers == 0 ? 1 : cfg->workers;
    if (workers > (MAX_WORKER_SLOTS - 4) / 2)
        workers = (MAX_WORKER_SLOTS - 4) / 2;
    uint32_t n_workers = 2 * workers + 4;
    uint32_t rl_entries = cfg->rate_limit_table_size == 0 ? 1 : cfg->rate_limit_table_size;

    worker_layout wl;
    worker_layout_of(n_route, n_up, n_pol, n_lis, &wl);

    size_t off = align_up(sizeof(bw_shm_header));
    size_t off_up = off;
    off = align_up(off + (size_t)n_up * sizeof(bw_shm_upstream));
    size_t off_route = off;
    off = align_up(off + (size_t)n_route * sizeof(bw_shm_route));
    size_t off_pol = off;
    off = align_up(off + (size_t)n_pol * sizeof(bw_shm_named));
    size_t off_lis = off;
    off = align_up(off + (size_t)n_lis * sizeof(bw_shm_named));
    size_t off_workers = off;
    off = align_up(off + (size_t)n_workers * wl.size);
    /* With Redis configured the table carries its fleet area (pending counts and key names),
     * which the master's sync reads; it cannot be added later, so a reload that turns Redis on
     * needs a restart for fleet-wide limits. */
    bool fleet = cfg->redis.enabled;
    size_t off_rl = off;
    off = align_up(off + (fleet ? bw_ratelimit_table_size_bytes_fleet(rl_entries)
                                : bw_ratelimit_table_size_bytes(rl_entries)));
    size_t off_top = off;
    off = align_up(off + (size_t)n_pol * sizeof(bw_topkeys));
    size_t size = off;

    bw_ratelimit_seed seed;
    if (bw_ratelimit_seed_random(&seed) != 0) {
        snprintf(err, errlen, "shared memory: cannot read random seed: %s", strerror(errno));
        return -1;
    }

    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        snprintf(err, errlen, "shared memory: cannot map %zu bytes: %s", size, strerror(errno));
        return -1;
    }
    /* The rate-limit table is read at random, one entry per request: with huge pages the
     * lookups stop missing the TLB. Honoured where shared-memory THP is "advise" or "always";
     * elsewhere a harmless no-op. */
    (void)madvise(base, size, MADV_HUGEPAGE);

    /* A fresh anonymous mapping is zero-filled: free slots, zero counters, idle status. */
    bw_shm_header *h = base;
    h->magic = BW_SHM_MAGIC;
    h->version = BW_SHM_VERSION;
    h->size = size;
    h->n_upstream_slots = n_up;
    h->n_route_slots = n_route;
    h->n_policy_slots = n_pol;
    h->n_listener_slots = n_lis;
    h->n_worker_slots = n_workers;
    h->rl_entries = rl_entries;
    h->off_upstreams = off_up;
    h->off_routes = off_route;
    h->off_policies = off_pol;
    h->off_listeners = off_lis;
    h->off_workers = off_workers;
    h->off_ratelimit = off_rl;
    h->off_topkeys = off_top;
    h->worker_slot_size = wl.size;
    h->rl_seed = seed;

    shm->hdr = h;
    shm->base = base;
    shm->size = size;

    for (uint32_t i = 0; i < n_up; i++)
        bw_breaker_init(&bw_shm_upstream_at(shm, (int)i)->breaker, 0);
    if (fleet)
        bw_ratelimit_table_init_fleet((unsigned char *)base + off_rl, rl_entries);
    else
        bw_ratelimit_table_init((unsigned char *)base + off_rl, rl_entries);
    return 0;
}

void bw_shm_destroy(bw_shm *shm)
{
    if (shm == NULL || shm->base == NULL)
        return;
    munmap(shm->base, shm->size);
    memset(shm, 0, sizeof(*shm));
}

/* ---- binding names to slots ---- */

enum slot_kind { KIND_UPSTREAM, KIND_ROUTE, KIND_POLICY, KIND_LISTENER, KIND_COUNT };

static const char *const kind_names[KIND_COUNT] = {"upstream", "route", "rate-limit policy",
                                                   "listener"};

static uint32_t kind_slots(const bw_shm *shm, enum slot_kind k)
{
    switch (k) {
    case KIND_UPSTREAM:
        return shm->hdr->n_upstream_slots;
    case KIND_ROUTE:
        return shm->hdr->n_route_slots;
    case KIND_POLICY:
        return shm->hdr->n_policy_slots;
    default:
        return shm->hdr->n_listener_slots;
    }
}

static bw_shm_named *kind_named(const bw_shm *shm, enum slot_kind k, uint32_t i)
{
    switch (k) {
    case KIND_UPSTREAM:
        return &bw_shm_upstream_at(shm, (int)i)->id;
    case KIND_ROUTE:
        return &bw_shm_route_at(shm, (int)i)->id;
    case KIND_POLICY:
        return bw_shm_policy_at(shm, (int)i);
    default:
        return bw_shm_listener_at(shm, (int)i);
    }
}

/* FNV-1a: a fixed (unseeded) hash, so every process and every restart agrees on the stored key. */
static uint64_t name_hash(const char *s)
{
    uint64_t h = UINT64_C(14695981039346656037);
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= UINT64_C(1099511628211);
    }
    return h;
}

/* The form of a name stored in a slot: the name itself, or a prefix and "~hash" when too long. */
static void name_key(const char *name, char out[BW_SHM_NAME_MAX])
{
    if (name == NULL)
        name = "";
    size_t n = strlen(name);
    if (n < BW_SHM_NAME_MAX) {
        memcpy(out, name, n + 1);
        return;
    }
    size_t keep = BW_SHM_NAME_MAX - 1 - 17;
    memcpy(out, name, keep);
    snprintf(out + keep, BW_SHM_NAME_MAX - keep, "~%016llx", (unsigned long long)name_hash(name));
}

/* One configuration item to place: its stored name, and for routes its upstream's. */
typedef struct bind_item {
    char key[BW_SHM_NAME_MAX];
    char extra[BW_SHM_NAME_MAX];
    int slot;
    bool fresh; /* the slot is (re)assigned to this name now */
} bind_item;

typedef struct bind_plan {
    bind_item *items;
    size_t n;
} bind_plan;

static bool item_matches(const bw_shm *shm, enum slot_kind k, uint32_t i, const bind_item *it)
{
    const bw_shm_named *id = kind_named(shm, k, i);
    if (id->name[0] == '\0' || strncmp(id->name, it->key, BW_SHM_NAME_MAX) != 0)
        return false;
    if (k == KIND_ROUTE)
        return strncmp(bw_shm_route_at(shm, (int)i)->upstream, it->extra, BW_SHM_NAME_MAX) == 0;
    return true;
}

/*
 * Decides a slot for every item of one kind without writing to the region. Returns 0, or -1 with
 * err set when there are more new names than slots that can be given up.
 */
static int plan_kind(const bw_shm *shm, enum slot_kind k, bind_plan *p, char *err, size_t errlen)
{
    uint32_t n_slots = kind_slots(shm, k);
    bool *taken = calloc(n_slots ? n_slots : 1, sizeof(bool));
    if (taken == NULL) {
        snprintf(err, errlen, "shared memory: out of memory while binding names");
        return -1;
    }
    for (size_t j = 0; j < p->n; j++) {
        p->items[j].slot = -1;
        p->items[j].fresh = false;
        for (uint32_t i = 0; i < n_slots; i++) {
            if (item_matches(shm, k, i, &p->items[j])) {
                p->items[j].slot = (int)i;
                taken[i] = true;
                break;
            }
        }
    }
    size_t needed = 0;
    for (size_t j = 0; j < p->n; j++) {
        bind_item *it = &p->items[j];
        if (it->slot >= 0)
            continue;
        /* The same name twice in one configuration shares one slot (same series). */
        for (size_t q = 0; q < j; q++) {
            if (p->items[q].fresh && strcmp(p->items[q].key, it->key) == 0 &&
                strcmp(p->items[q].extra, it->extra) == 0) {
                it->slot = p->items[q].slot;
                break;
            }
        }
        if (it->slot >= 0)
            continue;
        needed++;
        /* A never-used slot first; otherwise the one whose name was used longest ago. */
        int best = -1;
        uint32_t best_gen = 0;
        bool best_free = false;
        for (uint32_t i = 0; i < n_slots; i++) {
            if (taken[i])
                continue;
            const bw_shm_named *id = kind_named(shm, k, i);
            bool is_free = id->name[0] == '\0';
            uint32_t gen = atomic_load_explicit(&id->generation, memory_order_relaxed);
            if (best < 0 || (is_free && !best_free) ||
                (is_free == best_free && !is_free && gen < best_gen)) {
                best = (int)i;
                best_gen = gen;
                best_free = is_free;
                if (is_free)
                    break;
            }
        }
        if (best < 0) {
            free(taken);
            snprintf(err, errlen,
                     "shared memory has room for %u %s names and this configuration needs at "
                     "least %zu more; a restart is needed to grow it",
                     n_slots, kind_names[k], needed);
            return -1;
        }
        taken[best] = true;
        it->slot = best;
        it->fresh = true;
    }
    free(taken);
    return 0;
}

/* A slot changes owner: the new name must not inherit the old one's counters. */
static void clear_slot_counters(const bw_shm *shm, enum slot_kind k, uint32_t i)
{
    for (uint32_t w = 0; w < shm->hdr->n_worker_slots; w++) {
        switch (k) {
        case KIND_UPSTREAM: {
            bw_upstream_counters *c = upstream_counters(shm, w, i);
            for (size_t b = 0; b <= BW_METRICS_BUCKETS; b++)
                atomic_store_explicit(&c->duration_buckets[b], 0, memory_order_relaxed);
            atomic_store_explicit(&c->duration_sum_us, 0, memory_order_relaxed);
            atomic_store_explicit(&c->duration_count, 0, memory_order_relaxed);
            for (size_t e = 0; e < BW_UPERR_KINDS; e++)
                atomic_store_explicit(&c->errors[e], 0, memory_order_relaxed);
            break;
        }
        case KIND_ROUTE: {
            _Atomic uint64_t *row = requests_row(shm, w, i);
            for (size_t c = 0; c < BW_METRICS_CODES; c++)
                atomic_store_explicit(&row[c], 0, memory_order_relaxed);
            break;
        }
        case KIND_POLICY:
            atomic_store_explicit(rate_limited_cell(shm, w, i), 0, memory_order_relaxed);
            break;
        default:
            atomic_store_explicit(connections_cell(shm, w, i), 0, memory_order_relaxed);
            break;
        }
    }
}

static void apply_kind(const bw_shm *shm, enum slot_kind k, const bind_plan *p, uint32_t generation,
                       uint64_t now_ms)
{
    for (size_t j = 0; j < p->n; j++) {
        const bind_item *it = &p->items[j];
        uint32_t i = (uint32_t)it->slot;
        bw_shm_named *id = kind_named(shm, k, i);
        if (it->fresh) {
            clear_slot_counters(shm, k, i);
            memset(id->name, 0, sizeof(id->name));
            memcpy(id->name, it->key, strlen(it->key) + 1);
            if (k == KIND_ROUTE) {
                bw_shm_route *r = bw_shm_route_at(shm, (int)i);
                memset(r->upstream, 0, sizeof(r->upstream));
                memcpy(r->upstream, it->extra, strlen(it->extra) + 1);
            }
            if (k == KIND_UPSTREAM) {
                bw_breaker_init(&bw_shm_upstream_at(shm, (int)i)->breaker, now_ms);
                bw_outlier_group_init(&bw_shm_upstream_at(shm, (int)i)->servers);
            }
            if (k == KIND_POLICY)
                bw_topkeys_init(bw_shm_topkeys(shm, (int)i));
        }
        atomic_store_explicit(&id->generation, generation, memory_order_relaxed);
    }
}

/* Gives each server of u its per-server health record, by address. */
static int bind_servers(const bw_shm *shm, bw_upstream_conf *u, uint32_t generation)
{
    const char *keys[BW_OUTLIER_MAX_SERVERS];
    int idx[BW_OUTLIER_MAX_SERVERS];
    if (u->dynamic) {
        /* Its records follow the resolved set, published by the resolver (src/resolver.c). */
        for (size_t k = 0; k < u->n_servers; k++)
            u->servers[k].shm_index = -1;
        return 0;
    }
    if (u->n_servers > BW_OUTLIER_MAX_SERVERS)
        return -1;
    for (size_t k = 0; k < u->n_servers; k++)
        keys[k] = u->servers[k].address ? u->servers[k].address : "";
    if (bw_outlier_bind(bw_shm_servers(shm, u->shm_slot), keys, u->n_servers, generation, idx) < 0)
        return -1;
    for (size_t k = 0; k < u->n_servers; k++)
        u->servers[k].shm_index = idx[k];
    return 0;
}

int bw_shm_bind(bw_shm *shm, bw_config *cfg, uint64_t generation, uint64_t now_ms, char *err,
                size_t errlen)
{
    size_t counts[KIND_COUNT] = {cfg->n_upstreams, cfg->n_routes, cfg->n_rate_limits,
                                 cfg->n_listeners};
    bind_plan plans[KIND_COUNT];
    memset(plans, 0, sizeof(plans));
    int rc = 0;

    for (int k = 0; k < KIND_COUNT && rc == 0; k++) {
        plans[k].n = counts[k];
        plans[k].items = calloc(counts[k] ? counts[k] : 1, sizeof(bind_item));
        if (plans[k].items == NULL) {
            snprintf(err, errlen, "shared memory: out of memory while binding names");
            rc = -1;
            break;
        }
        for (size_t j = 0; j < counts[k]; j++) {
            bind_item *it = &plans[k].items[j];
            switch ((enum slot_kind)k) {
            case KIND_UPSTREAM:
                name_key(cfg->upstreams[j].name, it->key);
                break;
            case KIND_ROUTE: {
                const bw_route_conf *r = &cfg->routes[j];
                name_key(r->name, it->key);
                bool has_up = r->upstream >= 0 && (size_t)r->upstream < cfg->n_upstreams;
                name_key(has_up ? cfg->upstreams[r->upstream].name : "", it->extra);
                break;
            }
            case KIND_POLICY:
                name_key(cfg->rate_limits[j].name, it->key);
                break;
            default:
                name_key(cfg->listeners[j].address, it->key);
                break;
            }
            if (it->key[0] == '\0') {
                snprintf(err, errlen, "shared memory: %s %zu has no name", kind_names[k], j);
                rc = -1;
                break;
            }
        }
        if (rc == 0)
            rc = plan_kind(shm, (enum slot_kind)k, &plans[k], err, errlen);
    }

    if (rc == 0) {
        for (int k = 0; k < KIND_COUNT; k++)
            apply_kind(shm, (enum slot_kind)k, &plans[k], (uint32_t)generation, now_ms);
        for (size_t j = 0; j < cfg->n_upstreams; j++) {
            cfg->upstreams[j].shm_slot = plans[KIND_UPSTREAM].items[j].slot;
            if (bind_servers(shm, &cfg->upstreams[j], (uint32_t)generation) < 0) {
                snprintf(err, errlen, "shared memory: upstream %s: too many servers",
                         cfg->upstreams[j].name);
                rc = -1;
            }
        }
        for (size_t j = 0; j < cfg->n_routes; j++)
            cfg->routes[j].shm_slot = plans[KIND_ROUTE].items[j].slot;
        for (size_t j = 0; j < cfg->n_rate_limits; j++)
            cfg->rate_limits[j].shm_slot = plans[KIND_POLICY].items[j].slot;
        for (size_t j = 0; j < cfg->n_listeners; j++)
            cfg->listeners[j].shm_slot = plans[KIND_LISTENER].items[j].slot;
        atomic_store_explicit(&shm->hdr->status.config_generation, generation,
                              memory_order_release);
    }
    for (int k = 0; k < KIND_COUNT; k++)
        free(plans[k].items);
    return rc;
}

/* ---- worker slots ---- */

int bw_shm_worker_acquire(bw_shm *shm, pid_t pid, uint64_t now_ms)
{
    if (pid <= 0)
        return -1;
    for (uint32_t i = 0; i < shm->hdr->n_worker_slots; i++) {
        bw_worker_slot *w = bw_shm_worker(shm, (int)i);
        int32_t expected = 0;
        if (atomic_compare_exchange_strong(&w->pid, &expected, (int32_t)pid)) {
            atomic_store(&w->started_ms, now_ms);
            atomic_store(&w->heartbeat_ms, now_ms);
            atomic_store(&w->accepting, 0u);
            return (int)i;
        }
    }
    return -1;
}

void bw_shm_worker_release(bw_shm *shm, int slot)
{
    if (slot < 0 || (uint32_t)slot >= shm->hdr->n_worker_slots)
        return;
    /* The process is gone, so its open connections are too; its counters stay in the sums. */
    for (uint32_t i = 0; i < shm->hdr->n_listener_slots; i++)
        atomic_store_explicit(connections_cell(shm, (uint32_t)slot, i), 0, memory_order_relaxed);
    bw_worker_slot *w = bw_shm_worker(shm, slot);
    atomic_store(&w->heartbeat_ms, 0);
    atomic_store(&w->accepting, 0u);
    atomic_store(&w->pid, 0);
}

/* ---- accessors ---- */

bw_breaker *bw_shm_breaker(const bw_shm *shm, int upstream_slot)
{
    bw_shm_upstream *u = bw_shm_upstream_at(shm, upstream_slot);
    return u ? &u->breaker : NULL;
}

bw_shm_upstream *bw_shm_upstream_at(const bw_shm *shm, int upstream_slot)
{
    if (upstream_slot < 0 || (uint32_t)upstream_slot >= shm->hdr->n_upstream_slots)
        return NULL;
    return (bw_shm_upstream *)((unsigned char *)shm->base + shm->hdr->off_upstreams) +
           upstream_slot;
}

bw_shm_route *bw_shm_route_at(const bw_shm *shm, int route_slot)
{
    if (route_slot < 0 || (uint32_t)route_slot >= shm->hdr->n_route_slots)
        return NULL;
    return (bw_shm_route *)((unsigned char *)shm->base + shm->hdr->off_routes) + route_slot;
}

bw_shm_named *bw_shm_policy_at(const bw_shm *shm, int policy_slot)
{
    if (policy_slot < 0 || (uint32_t)policy_slot >= shm->hdr->n_policy_slots)
        return NULL;
    return (bw_shm_named *)((unsigned char *)shm->base + shm->hdr->off_policies) + policy_slot;
}

bw_shm_named *bw_shm_listener_at(const bw_shm *shm, int listener_slot)
{
    if (listener_slot < 0 || (uint32_t)listener_slot >= shm->hdr->n_listener_slots)
        return NULL;
    return (bw_shm_named *)((unsigned char *)shm->base + shm->hdr->off_listeners) + listener_slot;
}

bw_worker_slot *bw_shm_worker(const bw_shm *shm, int worker_slot)
{
    if (worker_slot < 0 || (uint32_t)worker_slot >= shm->hdr->n_worker_slots)
        return NULL;
    return (bw_worker_slot *)worker_base(shm, (uint32_t)worker_slot);
}

bw_ratelimit_table *bw_shm_ratelimit(const bw_shm *shm)
{
    return (bw_ratelimit_table *)((unsigned char *)shm->base + shm->hdr->off_ratelimit);
}

/* ---- hot-path counters ---- */

void bw_metrics_count_request(const bw_shm *shm, int worker_slot, int route_slot, int status)
{
    if (status < 100 || status > 599)
        return;
    uint32_t row;
    if (route_slot == -1)
        row = shm->hdr->n_route_slots; /* the extra "no route" row */
    else if (route_slot >= 0 && (uint32_t)route_slot < shm->hdr->n_route_slots)
        row = (uint32_t)route_slot;
    else
        return;
    _Atomic uint64_t *r = requests_row(shm, worker_index(shm, worker_slot), row);
    atomic_fetch_add_explicit(&r[status - 100], 1, memory_order_relaxed);
}

void bw_metrics_observe_duration(const bw_shm *shm, int worker_slot, int upstream_slot,
                                 uint64_t duration_us)
{
    if (upstream_slot < 0 || (uint32_t)upstream_slot >= shm->hdr->n_upstream_slots)
        return;
    bw_upstream_counters *c =
        upstream_counters(shm, worker_index(shm, worker_slot), (uint32_t)upstream_slot);
    size_t b = 0;
    while (b < BW_METRICS_BUCKETS && duration_us > bw_metrics_bucket_us[b])
        b++;
    atomic_fetch_add_explicit(&c->duration_buckets[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->duration_sum_us, duration_us, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->duration_count, 1, memory_order_relaxed);
}

void bw_metrics_upstream_error(const bw_shm *shm, int worker_slot, int upstream_slot,
                               bw_upstream_error_kind kind)
{
    if (upstream_slot < 0 || (uint32_t)upstream_slot >= shm->hdr->n_upstream_slots)
        return;
    if ((int)kind < 0 || kind >= BW_UPERR_KINDS)
        return;
    bw_upstream_counters *c =
        upstream_counters(shm, worker_index(shm, worker_slot), (uint32_t)upstream_slot);
    atomic_fetch_add_explicit(&c->errors[kind], 1, memory_order_relaxed);
}

void bw_metrics_rate_limited(const bw_shm *shm, int worker_slot, int policy_slot)
{
    if (policy_slot < 0 || (uint32_t)policy_slot >= shm->hdr->n_policy_slots)
        return;
    atomic_fetch_add_explicit(
        rate_limited_cell(shm, worker_index(shm, worker_slot), (uint32_t)policy_slot), 1,
        memory_order_relaxed);
}

void bw_metrics_connection(const bw_shm *shm, int worker_slot, int listener_slot, int delta)
{
    if (listener_slot < 0 || (uint32_t)listener_slot >= shm->hdr->n_listener_slots)
        return;
    atomic_fetch_add_explicit(
        connections_cell(shm, worker_index(shm, worker_slot), (uint32_t)listener_slot),
        (int64_t)delta, memory_order_relaxed);
}

void bw_metrics_accept_error(const bw_shm *shm, int worker_slot, int listener_slot)
{
    if (listener_slot < 0 || (uint32_t)listener_slot >= shm->hdr->n_listener_slots)
        return;
    atomic_fetch_add_explicit(
        accept_errors_cell(shm, worker_index(shm, worker_slot), (uint32_t)listener_slot), 1,
        memory_order_relaxed);
}

/* ---- counter cells for the scrape ---- */

static bool worker_in_range(const bw_shm *shm, int worker_slot)
{
    return worker_slot >= 0 && (uint32_t)worker_slot < shm->hdr->n_worker_slots;
}

_Atomic uint64_t *bw_shm_requests_row(const bw_shm *shm, int worker_slot, int route_slot)
{
    if (!worker_in_range(shm, worker_slot))
        return NULL;
    uint32_t row;
    if (route_slot == -1)
        row = shm->hdr->n_route_slots;
    else if (route_slot >= 0 && (uint32_t)route_slot < shm->hdr->n_route_slots)
        row = (uint32_t)route_slot;
    else
        return NULL;
    return requests_row(shm, (uint32_t)worker_slot, row);
}

bw_upstream_counters *bw_shm_upstream_counters(const bw_shm *shm, int worker_slot,
                                               int upstream_slot)
{
    if (!worker_in_range(shm, worker_slot) || upstream_slot < 0 ||
        (uint32_t)upstream_slot >= shm->hdr->n_upstream_slots)
        return NULL;
    return upstream_counters(shm, (uint32_t)worker_slot, (uint32_t)upstream_slot);
}

_Atomic uint64_t *bw_shm_rate_limited_cell(const bw_shm *shm, int worker_slot, int policy_slot)
{
    if (!worker_in_range(shm, worker_slot) || policy_slot < 0 ||
        (uint32_t)policy_slot >= shm->hdr->n_policy_slots)
        return NULL;
    return rate_limited_cell(shm, (uint32_t)worker_slot, (uint32_t)policy_slot);
}

_Atomic int64_t *bw_shm_connections_cell(const bw_shm *shm, int worker_slot, int listener_slot)
{
    if (!worker_in_range(shm, worker_slot) || listener_slot < 0 ||
        (uint32_t)listener_slot >= shm->hdr->n_listener_slots)
        return NULL;
    return connections_cell(shm, (uint32_t)worker_slot, (uint32_t)listener_slot);
}

_Atomic uint64_t *bw_shm_accept_errors_cell(const bw_shm *shm, int worker_slot, int listener_slot)
{
    if (!worker_in_range(shm, worker_slot) || listener_slot < 0 ||
        (uint32_t)listener_slot >= shm->hdr->n_listener_slots)
        return NULL;
    return accept_errors_cell(shm, (uint32_t)worker_slot, (uint32_t)listener_slot);
}

bw_topkeys *bw_shm_topkeys(const bw_shm *shm, int policy_slot)
{
    if (policy_slot < 0 || (uint32_t)policy_slot >= shm->hdr->n_policy_slots)
        return NULL;
    return (bw_topkeys *)((unsigned char *)shm->base + shm->hdr->off_topkeys) + policy_slot;
}

bw_outlier_group *bw_shm_servers(const bw_shm *shm, int upstream_slot)
{
    bw_shm_upstream *u = bw_shm_upstream_at(shm, upstream_slot);
    return u ? &u->servers : NULL;
}
