/*
 * Upstream pools: which server gets the next request, and the per-worker keep-alive pool.
 *
 * Each worker has its own pools (nothing here is shared between processes), so least_conn counts
 * the connections this worker has open, as nginx does without a shared zone. Idle connections
 * sit in a most-recently-used list per server: reusing the warmest one keeps the set of live
 * connections small and lets the cold ones reach their idle timeout. Before an idle connection
 * is handed out it is checked with a non-blocking MSG_PEEK, because an upstream that closed it
 * while it sat in the pool would otherwise swallow the next request.
 */
#include "breakwater/upstream.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent_ssl.h>
#include <openssl/ssl.h>

#include "breakwater/upstream_tls.h"

static void idle_unlink(bw_upconn *c)
{
    bw_server *s = c->server;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->idle_head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->next = c->prev = NULL;
    s->n_idle--;
}

static void upconn_free(bw_upconn *c)
{
    if (c->bev)
        bufferevent_free(c->bev);
    free(c);
}

/* While idle, any event means the connection is no longer usable: the upstream closed it, sent
 * bytes nobody asked for, or the keep-alive timeout passed. */
static void idle_read_cb(struct bufferevent *bev, void *arg)
{
    (void)bev;
    bw_upconn *c = arg;
    idle_unlink(c);
    upconn_free(c);
}

static void idle_event_cb(struct bufferevent *bev, short what, void *arg)
{
    (void)bev;
    (void)what;
    bw_upconn *c = arg;
    idle_unlink(c);
    upconn_free(c);
}

static void server_close_idle(bw_server *s)
{
    while (s->idle_head) {
        bw_upconn *c = s->idle_head;
        idle_unlink(c);
        upconn_free(c);
    }
}

bw_upstream_pool *bw_upstream_pools_new(struct event_base *base, const bw_config *cfg,
                                        const bw_shm *shm)
{
    bw_upstream_pool *pools = calloc(cfg->n_upstreams ? cfg->n_upstreams : 1, sizeof(*pools));
    if (!pools)
        return NULL;
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        bw_upstream_pool *p = &pools[i];
        p->conf = &cfg->upstreams[i];
        p->base = base;
        p->group = shm && p->conf->shm_slot >= 0 ? bw_shm_servers(shm, p->conf->shm_slot) : NULL;
        size_t cap = p->conf->dynamic ? BW_OUTLIER_MAX_SERVERS : p->conf->n_servers;
        p->list = calloc(cap ? cap : 1, sizeof(*p->list));
        p->health = calloc(cap ? cap : 1, sizeof(*p->health));
        if (p->conf->dynamic)
            p->by_record = calloc(BW_OUTLIER_MAX_SERVERS, sizeof(*p->by_record));
        else
            p->servers = calloc(cap ? cap : 1, sizeof(bw_server));
        if (!p->list || !p->health || !(p->by_record || p->servers)) {
            bw_upstream_pools_free(pools, i + 1);
            return NULL;
        }
        if (p->conf->tls.enabled)
            p->tls_ctx = bw_upstream_tls_ctx_new(p->conf, p->tls_error, sizeof(p->tls_error));
        if (!p->conf->dynamic) {
            p->n_servers = p->conf->n_servers;
            for (size_t j = 0; j < p->n_servers; j++) {
                bw_server *sv = &p->servers[j];
                sv->conf = &p->conf->servers[j];
                sv->pool = p;
                sv->member = true;
                int k = p->conf->servers[j].shm_index;
                if (p->group && k >= 0 && k < BW_OUTLIER_MAX_SERVERS)
                    sv->health = &p->group->servers[k];
                p->list[j] = sv;
                p->health[j] = sv->health;
            }
            if (!p->group || (p->n_servers && !p->health[0]))
                p->group = NULL; /* all or nothing: the cap must see every server */
        }
        uint32_t ms[3] = {p->conf->connect_timeout_ms, p->conf->response_timeout_ms,
                          p->conf->keepalive_timeout_ms};
        const struct timeval **dst[3] = {&p->tv_connect, &p->tv_response, &p->tv_keepalive};
        for (int k = 0; k < 3; k++) {
            p->tv_plain[k].tv_sec = ms[k] / 1000;
            p->tv_plain[k].tv_usec = (ms[k] % 1000) * 1000;
            *dst[k] = event_base_init_common_timeout(base, &p->tv_plain[k]);
            if (!*dst[k])
                *dst[k] = &p->tv_plain[k];
        }
    }
    return pools;
}

/* Every server the pool has, members or draining, for f. */
static void pool_each(bw_upstream_pool *p, void (*f)(bw_server *))
{
    if (p->by_record) {
        for (size_t k = 0; k < BW_OUTLIER_MAX_SERVERS; k++)
            if (p->by_record[k])
                f(p->by_record[k]);
    } else if (p->servers) {
        for (size_t j = 0; j < p->n_servers; j++)
            f(&p->servers[j]);
    }
}

void bw_upstream_pools_close_idle(bw_upstream_pool *pools, size_t n)
{
    for (size_t i = 0; i < n; i++)
        pool_each(&pools[i], server_close_idle);
}

void bw_upstream_pools_free(bw_upstream_pool *pools, size_t n)
{
    if (!pools)
        return;
    bw_upstream_pools_close_idle(pools, n);
    for (size_t i = 0; i < n; i++) {
        if (pools[i].by_record) {
            for (size_t k = 0; k < BW_OUTLIER_MAX_SERVERS; k++)
                free(pools[i].by_record[k]);
        }
        free(pools[i].by_record);
        free(pools[i].servers);
        free(pools[i].list);
        free(pools[i].health);
        if (pools[i].tls_ctx)
            SSL_CTX_free(pools[i].tls_ctx);
    }
    free(pools);
}

/*
 * DNS-named upstreams: copies the set the master published when it changed. A server keeps its
 * bw_server (and idle connections) while its record keeps its address; one that left the set is
 * drained: its idle connections close now, connections in use close when their exchange ends.
 * The bw_server objects are one per shared record and live as long as the pool, so exchanges
 * and connections never point at freed memory, and churn in DNS costs no memory.
 */
static void pool_refresh(bw_upstream_pool *p)
{
    bw_outlier_group *g = p->group;
    if (g == NULL || atomic_load_explicit(&g->members_seq, memory_order_relaxed) == p->members_seq)
        return;
    uint16_t idx[BW_OUTLIER_MAX_SERVERS];
    uint64_t seq = p->members_seq;
    int n = bw_outlier_members(g, &seq, idx);
    if (n < 0)
        return;
    struct sockaddr_storage addrs[BW_OUTLIER_MAX_SERVERS];
    uint32_t lens[BW_OUTLIER_MAX_SERVERS];
    char keys[BW_OUTLIER_MAX_SERVERS][BW_OUTLIER_KEY_MAX];
    for (int i = 0; i < n; i++) {
        const bw_outlier_server *rec = &g->servers[idx[i]];
        lens[i] = rec->addr_len <= sizeof(addrs[i]) ? rec->addr_len : 0;
        memcpy(&addrs[i], &rec->addr, lens[i]);
        memcpy(keys[i], rec->key, BW_OUTLIER_KEY_MAX);
        keys[i][BW_OUTLIER_KEY_MAX - 1] = '\0';
    }
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load(&g->members_seq) != seq)
        return; /* rewritten while copying: next pick tries again */
    for (size_t i = 0; i < p->n_servers; i++)
        p->list[i]->member = false;
    size_t m = 0;
    for (int i = 0; i < n; i++) {
        if (lens[i] == 0)
            continue;
        bw_server *sv = p->by_record[idx[i]];
        if (sv == NULL) {
            sv = calloc(1, sizeof(*sv));
            if (sv == NULL)
                continue;
            sv->pool = p;
            sv->conf = &sv->dyn_conf;
            sv->dyn_conf.address = sv->dyn_address;
            sv->dyn_conf.shm_index = idx[i];
            sv->health = &g->servers[idx[i]];
            p->by_record[idx[i]] = sv;
        }
        if (strcmp(sv->dyn_address, keys[i]) != 0 || sv->dyn_conf.addr.len != lens[i] ||
            memcmp(&sv->dyn_conf.addr.ss, &addrs[i], lens[i]) != 0) {
            /* The record now stands for another address: its idle connections go elsewhere. */
            server_close_idle(sv);
            memcpy(sv->dyn_address, keys[i], BW_OUTLIER_KEY_MAX);
            memset(&sv->dyn_conf.addr, 0, sizeof(sv->dyn_conf.addr));
            memcpy(&sv->dyn_conf.addr.ss, &addrs[i], lens[i]);
            sv->dyn_conf.addr.len = (socklen_t)lens[i];
        }
        sv->member = true;
        p->list[m] = sv;
        p->health[m] = sv->health;
        m++;
    }
    for (size_t k = 0; k < BW_OUTLIER_MAX_SERVERS; k++) {
        bw_server *sv = p->by_record[k];
        if (sv && !sv->member)
            server_close_idle(sv); /* left the set: drained */
    }
    p->n_servers = m;
    p->members_seq = seq;
}

static bool server_usable(const bw_server *s, uint64_t now_ms)
{
    return s->health == NULL || bw_outlier_available(s->health, now_ms);
}

/* The balancing rule over the servers `ok` accepts; NULL when it accepts none. */
static bw_server *pick_among(bw_upstream_pool *pool, const bw_server *avoid, uint64_t now_ms,
                             bool healthy_only)
{
    size_t n = pool->n_servers;
    size_t start = pool->rr_next++ % n;
    bw_server *best = NULL, *avoided = NULL;
    for (size_t k = 0; k < n; k++) {
        bw_server *s = pool->list[(start + k) % n];
        if (healthy_only && !server_usable(s, now_ms))
            continue;
        if (s == avoid) {
            avoided = s;
            continue;
        }
        if (pool->conf->balance != BW_BALANCE_LEAST_CONN)
            return s; /* round robin: the first acceptable one from the rotating start */
        /* Least connections: the scan starts at a rotating offset so that ties spread. */
        if (!best || s->active < best->active)
            best = s;
    }
    return best ? best : avoided;
}

bw_server *bw_upstream_pick(bw_upstream_pool *pool, const bw_server *avoid, uint64_t now_ms)
{
    if (pool->by_record)
        pool_refresh(pool);
    if (pool->n_servers == 0)
        return NULL;
    bw_server *s = pick_among(pool, avoid, now_ms, true);
    return s ? s : pick_among(pool, avoid, now_ms, false);
}

/* True when an idle connection still looks usable: no EOF, no stray bytes, no pending error. */
static bool idle_alive(bw_upconn *c)
{
    if (evbuffer_get_length(bufferevent_get_input(c->bev)) > 0)
        return false;
    evutil_socket_t fd = bufferevent_getfd(c->bev);
    char byte;
    ssize_t r = recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r == 0 || r > 0)
        return false;
    return errno == EAGAIN || errno == EWOULDBLOCK;
}

static bw_upconn *connect_new(bw_server *server)
{
    bw_upstream_pool *pool = server->pool;
    const bw_sockaddr *a = &server->conf->addr;
    int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NULL;
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    bw_upconn *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return NULL;
    }
    c->server = server;
    c->bev = bufferevent_socket_new(pool->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (!c->bev) {
        close(fd);
        free(c);
        return NULL;
    }
    bufferevent_set_max_single_read(c->bev, 65536);
    bufferevent_set_max_single_write(c->bev, 65536);
    /* libevent applies the write timeout to a connect in progress. */
    bufferevent_set_timeouts(c->bev, NULL, pool->tv_connect);
    if (bufferevent_socket_connect(c->bev, (const struct sockaddr *)&a->ss, (int)a->len) < 0) {
        int saved = errno;
        upconn_free(c);
        errno = saved ? saved : ECONNREFUSED;
        return NULL;
    }
    if (pool->conf->tls.enabled) {
        /* TLS rides on the TCP bufferevent as a filter: the handshake starts once the connect
         * completes, and the caller sees BEV_EVENT_CONNECTED only after it. */
        SSL *ssl =
            pool->tls_ctx ? bw_upstream_tls_ssl_new(pool->tls_ctx, pool->conf, server->conf) : NULL;
        struct bufferevent *tls =
            ssl ? bufferevent_openssl_filter_new(pool->base, c->bev, ssl,
                                                 BUFFEREVENT_SSL_CONNECTING, BEV_OPT_CLOSE_ON_FREE)
                : NULL;
        if (tls == NULL) {
            /* (Out of memory. The SSL is not freed here: with BEV_OPT_CLOSE_ON_FREE some
             * libevent versions free it on this error path themselves.) */
            upconn_free(c);
            errno = EPROTO;
            return NULL;
        }
        c->bev = tls;
        bufferevent_set_max_single_read(c->bev, 65536);
        bufferevent_set_max_single_write(c->bev, 65536);
        bufferevent_set_timeouts(c->bev, NULL, pool->tv_connect);
    }
    return c;
}

bw_upconn *bw_upstream_acquire(bw_server *server, bool allow_reuse)
{
    while (allow_reuse && server->idle_head) {
        bw_upconn *c = server->idle_head;
        idle_unlink(c);
        if (!idle_alive(c)) {
            upconn_free(c);
            continue;
        }
        bufferevent_disable(c->bev, EV_READ);
        bufferevent_setcb(c->bev, NULL, NULL, NULL, NULL);
        bufferevent_set_timeouts(c->bev, NULL, NULL);
        c->reused = true;
        server->active++;
        if (server->health)
            bw_outlier_active(server->health, 1);
        return c;
    }
    bw_upconn *c = connect_new(server);
    if (c) {
        server->active++;
        if (server->health)
            bw_outlier_active(server->health, 1);
    }
    return c;
}

void bw_upstream_release(bw_upconn *c)
{
    bw_server *s = c->server;
    const bw_upstream_conf *uc = s->pool->conf;
    s->active--;
    if (s->health)
        bw_outlier_active(s->health, -1);
    c->owner = NULL;
    if (!s->member || s->n_idle >= uc->keepalive_max_idle ||
        evbuffer_get_length(bufferevent_get_input(c->bev)) > 0 ||
        evbuffer_get_length(bufferevent_get_output(c->bev)) > 0) {
        upconn_free(c);
        return;
    }
    c->prev = NULL;
    c->next = s->idle_head;
    if (s->idle_head)
        s->idle_head->prev = c;
    s->idle_head = c;
    s->n_idle++;
    const struct timeval *idle = s->pool->tv_keepalive;
    bufferevent_setwatermark(c->bev, EV_READ, 0, 0);
    bufferevent_setwatermark(c->bev, EV_WRITE, 0, 0);
    bufferevent_set_timeouts(c->bev, idle, NULL);
    bufferevent_setcb(c->bev, idle_read_cb, NULL, idle_event_cb, c);
    bufferevent_enable(c->bev, EV_READ);
}

void bw_upstream_close(bw_upconn *c)
{
    c->server->active--;
    if (c->server->health)
        bw_outlier_active(c->server->health, -1);
    upconn_free(c);
}
