/*
 * Worker process: one single-threaded libevent loop that accepts client connections on the
 * listening sockets inherited from the master and proxies their requests. A worker exits when
 * told to drain (SIGTERM/SIGINT, or the master dying) once its connections are finished or
 * shutdown_timeout_ms has passed.
 */
#ifndef BREAKWATER_WORKER_H
#define BREAKWATER_WORKER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <event2/event.h>
#include <event2/listener.h>
#include <openssl/ssl.h>

#include "breakwater/config.h"
#include "breakwater/log.h"
#include "breakwater/ratelimit.h"
#include "breakwater/shm.h"
#include "breakwater/upstream.h"

struct bw_session;
struct bw_http_head;

typedef struct bw_worker {
    struct event_base *base;
    const bw_config *cfg;
    bw_log *log;
    int index; /* 1-based worker number, for logs */
    pid_t master_pid;
    const int *listen_fds; /* one per configured listener */
    SSL_CTX *const *tls;   /* one per listener, NULL for plain ones */
    struct evconnlistener **listeners;
    bool listeners_paused; /* max_connections reached */
    bool accept_backoff;   /* accept() ran out of descriptors: paused for BW_ACCEPT_BACKOFF_MS */
    struct event *accept_timer;
    uint64_t accept_log_ms;   /* when an accept failure was last logged (monotonic ms) */
    uint64_t accept_unlogged; /* failures since then, reported with the next log line */
    bw_upstream_pool *pools;
    const bw_shm *shm;
    int worker_slot;                /* this process's counters in the shared region */
    bw_ratelimit_table *rl;         /* the shared rate-limit table */
    bw_ratelimit_params *rl_params; /* per configured policy, computed once at start */
    struct bw_http_head *resp_head; /* scratch for parsing upstream response heads */
    char *path_buf;                 /* scratch for the normalised request target */
    size_t path_buf_cap;            /* limits.max_header_bytes: a target never exceeds it */
    /* Client timeouts as libevent "common timeouts": every connection uses the same durations,
     * so they are kept in O(1) queues instead of the timer heap. */
    const struct timeval *tv_header, *tv_idle;
    struct timeval tv_header_plain, tv_idle_plain;
    struct bw_session *sessions; /* every open client connection */
    size_t n_sessions;
    bool draining;
    struct event *ev_term, *ev_int, *ev_usr1, *ev_hup, *drain_timer, *parent_timer;
    struct event *idle_grace_timer; /* drain_idle_grace_ms after a drain began */
    uint64_t reqid_state;           /* request-id generator state, seeded from the kernel */
} bw_worker;

/* What the master hands a freshly forked worker. */
typedef struct bw_worker_args {
    const bw_config *cfg;
    bw_log *log;
    int index;
    pid_t master_pid;
    const int *listen_fds;
    SSL_CTX *const *tls;
    const bw_shm *shm;
    int worker_slot;
} bw_worker_args;

/* Runs the worker until it has drained; returns the process exit status. */
int bw_worker_run(const bw_worker_args *args);

/* Called by the proxy when a session ends, so a draining worker can notice it is idle. */
void bw_worker_session_closed(bw_worker *w);

#endif
