/*
 * Upstream pools, per worker: server selection (round robin or least connections) and the
 * keep-alive pool of idle connections to each server.
 *
 * A bw_upconn is one TCP connection to one server, wrapped in a libevent bufferevent. The proxy
 * takes one with bw_upstream_acquire() (an idle pooled one when a live one exists, otherwise a
 * new non-blocking connect), owns it for one exchange, then hands it back with
 * bw_upstream_release() (pooled when reusable) or bw_upstream_close(). Idle pooled connections
 * keep reading enabled so that an upstream closing one is noticed and the connection dropped.
 */
#ifndef BREAKWATER_UPSTREAM_H
#define BREAKWATER_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/bufferevent.h>
#include <event2/event.h>

#include "breakwater/config.h"
#include "breakwater/shm.h"

typedef struct bw_server bw_server;
typedef struct bw_upstream_pool bw_upstream_pool;

typedef struct bw_upconn {
    struct bufferevent *bev;
    bw_server *server;
    struct bw_upconn *next, *prev; /* idle list links */
    void *owner;                   /* the exchange using it, NULL while idle */
    bool reused;                   /* taken from the idle pool (may have gone stale) */
    bool connected;                /* the TCP handshake completed */
    uint32_t requests;             /* exchanges carried so far */
} bw_upconn;

struct bw_server {
    const bw_server_conf *conf;
    bw_upstream_pool *pool;
    bw_upconn *idle_head; /* most recently used first */
    uint32_t n_idle;
    uint32_t active;           /* connections in use by this worker (least_conn) */
    bw_outlier_server *health; /* its shared health record; NULL without a shared region */
    bool member;               /* in the pool's current set; false: draining, never pooled */
    /* DNS-named upstreams: the resolved address this server stands for (conf points here). */
    bw_server_conf dyn_conf;
    char dyn_address[BW_OUTLIER_KEY_MAX];
};

struct bw_upstream_pool {
    const bw_upstream_conf *conf;
    struct event_base *base;
    bw_server *servers; /* literal servers, in configuration order */
    bw_server **list;   /* the current set, in balancing order (n_servers of them) */
    size_t n_servers;
    bw_server **by_record;      /* DNS-named: one server per shared record, made on first use */
    uint64_t members_seq;       /* DNS-named: the published set last copied */
    struct ssl_ctx_st *tls_ctx; /* "tls": the client context; NULL for plain TCP or on error */
    char tls_error[256];        /* why tls_ctx could not be built ("" when it was) */
    uint32_t rr_next;
    bw_outlier_group *group;    /* the upstream's shared server records (NULL: none) */
    bw_outlier_server **health; /* servers[i].health, as the array the ejection cap reads */
    /* This upstream's timeouts as libevent common timeouts (O(1) queues, not the heap). */
    const struct timeval *tv_connect, *tv_response, *tv_keepalive;
    struct timeval tv_plain[3];
};

/* Builds one pool per configured upstream, its servers tied to their health records in shm (which
 * may be NULL: no ejection then). Returns an array of cfg->n_upstreams pools or NULL. */
bw_upstream_pool *bw_upstream_pools_new(struct event_base *base, const bw_config *cfg,
                                        const bw_shm *shm);
/* Closes every idle connection and frees the pools (connections in use must be closed first). */
void bw_upstream_pools_free(bw_upstream_pool *pools, size_t n);
/* Closes idle connections only (used when a worker starts draining). */
void bw_upstream_pools_close_idle(bw_upstream_pool *pools, size_t n);

/*
 * Picks a server by the pool's balancing rule, skipping `avoid` when another one exists, and
 * skipping servers that are ejected or failed by the active checks (now_ms: breaker clock). When
 * every server is out, the rule applies to all of them: a guess beats refusing everything.
 */
bw_server *bw_upstream_pick(bw_upstream_pool *pool, const bw_server *avoid, uint64_t now_ms);

/*
 * Returns a connection to the server: a live idle one, or a new one whose connect is under way
 * (connected == false; the caller's event callback sees BEV_EVENT_CONNECTED or an error).
 * Callbacks are not set: the caller sets them. Returns NULL when a socket cannot even be created
 * (errno says why); that counts as a connect failure.
 */
bw_upconn *bw_upstream_acquire(bw_server *server, bool allow_reuse);

/* Gives the connection back: pooled when the pool has room, closed otherwise. */
void bw_upstream_release(bw_upconn *c);

/* Closes and frees a connection that is not reusable. */
void bw_upstream_close(bw_upconn *c);

#endif
