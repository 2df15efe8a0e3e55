/*
 * Worker process: the event loop that runs the proxy.
 *
 * A worker is forked by the master with the configuration, the listening sockets and the TLS
 * contexts already built; it only adds its own event base, its upstream pools and its sessions.
 * It watches for three ways to end: SIGTERM/SIGINT from the master (drain), the master dying
 * (PR_SET_PDEATHSIG turns that into SIGTERM, and a periodic getppid() check covers the instant
 * between fork and prctl), and the drain deadline shutdown_timeout_ms.
 */
#include "breakwater/worker.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "breakwater/http.h"
#include "breakwater/proxy.h"

/* How long accepting pauses after accept() found no descriptor (or memory) to spare. */
#define BW_ACCEPT_BACKOFF_MS 100

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Listeners accept while neither max_connections nor an accept backoff holds them, and not
 * once draining has freed them. */
static void listeners_update(bw_worker *w)
{
    bool on = !w->listeners_paused && !w->accept_backoff && !w->draining;
    for (size_t i = 0; i < w->cfg->n_listeners; i++) {
        if (!w->listeners[i])
            continue;
        if (on)
            evconnlistener_enable(w->listeners[i]);
        else
            evconnlistener_disable(w->listeners[i]);
    }
}

static void drain_done_check(bw_worker *w)
{
    if (w->draining && w->n_sessions == 0)
        event_base_loopexit(w->base, NULL);
}

void bw_worker_session_closed(bw_worker *w)
{
    if (w->listeners_paused && !w->draining && w->n_sessions < w->cfg->limits.max_connections) {
        w->listeners_paused = false;
        listeners_update(w);
    }
    drain_done_check(w);
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int salen,
                      void *arg)
{
    bw_worker *w = arg;
    int index = -1;
    for (size_t i = 0; i < w->cfg->n_listeners; i++)
        if (w->listeners[i] == l)
            index = (int)i;
    if (index < 0 || w->draining) {
        evutil_closesocket(fd);
        return;
    }
    bw_proxy_accept(w, index, fd, sa, salen);
    if (w->n_sessions >= w->cfg->limits.max_connections && !w->listeners_paused) {
        /* Leave further connections in the kernel's backlog for the other workers. */
        w->listeners_paused = true;
        listeners_update(w);
        bw_log_warn(w->log, "max_connections (%u) reached, pausing accept",
                    w->cfg->limits.max_connections);
    }
}

static void accept_resume_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bw_worker *w = arg;
    w->accept_backoff = false;
    listeners_update(w);
}

/*
 * accept() failed. Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) the pending
 * connection stays in the kernel's queue and the listener stays readable, so retrying at once
 * would spin: accepting pauses for BW_ACCEPT_BACKOFF_MS instead, each failure is counted in
 * breakwater_accept_errors_total, and the log gets at most one line a second. Other errors
 * (a connection reset before it was accepted) concern one connection only.
 */
static void accept_error_cb(struct evconnlistener *l, void *arg)
{
    bw_worker *w = arg;
    int err = EVUTIL_SOCKET_ERROR();
    bool exhausted = err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
    if (!exhausted) {
        bw_log_debug(w->log, "accept failed: %s", evutil_socket_error_to_string(err));
        return;
    }
    for (size_t i = 0; i < w->cfg->n_listeners; i++)
        if (w->listeners[i] == l)
            bw_metrics_accept_error(w->shm, w->worker_slot, w->cfg->listeners[i].shm_slot);
    uint64_t now = mono_ms();
    if (w->accept_log_ms == 0 || now - w->accept_log_ms >= 1000) {
        if (w->accept_unlogged > 0)
            bw_log_warn(w->log,
                        "accept failed: %s (and %" PRIu64 " more since the last report); "
                        "pausing accept for %d ms with %zu connection(s) open",
                        evutil_socket_error_to_string(err), w->accept_unlogged,
                        BW_ACCEPT_BACKOFF_MS, w->n_sessions);
        else
            bw_log_warn(w->log,
                        "accept failed: %s; pausing accept for %d ms with %zu "
                        "connection(s) open",
                        evutil_socket_error_to_string(err), BW_ACCEPT_BACKOFF_MS, w->n_sessions);
        w->accept_log_ms = now;
        w->accept_unlogged = 0;
    } else {
        w->accept_unlogged++;
    }
    if (!w->accept_backoff) {
        w->accept_backoff = true;
        listeners_update(w);
        struct timeval tv = {0, BW_ACCEPT_BACKOFF_MS * 1000};
        evtimer_add(w->accept_timer, &tv);
    }
}

/*
 * Takes the connections already completed in the kernel's accept queue before the listener is
 * closed: when the last copy of a listening socket closes, the kernel resets whatever is still
 * queued, and those clients may have sent a request already. They are served like the others
 * (Connection: close on their response). Bounded by max_connections.
 */
static void accept_pending(bw_worker *w, int index)
{
    evutil_socket_t lfd = evconnlistener_get_fd(w->listeners[index]);
    while (w->n_sessions < w->cfg->limits.max_connections) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        bw_proxy_accept(w, index, fd, (struct sockaddr *)&ss, (int)len);
    }
}

static void start_drain(bw_worker *w, const char *why)
{
    if (w->draining)
        return;
    w->draining = true;
    bw_log_info(w->log, "draining (%s), %zu connection(s) open", why, w->n_sessions);
    for (size_t i = 0; i < w->cfg->n_listeners; i++) {
        if (w->listeners[i]) {
            accept_pending(w, (int)i);
            evconnlistener_free(w->listeners[i]);
            w->listeners[i] = NULL;
        }
    }
    bw_upstream_pools_close_idle(w->pools, w->cfg->n_upstreams);
    struct timeval tv = {.tv_sec = w->cfg->shutdown_timeout_ms / 1000,
                         .tv_usec = (w->cfg->shutdown_timeout_ms % 1000) * 1000};
    evtimer_add(w->drain_timer, &tv);
    bw_proxy_drain(w);
    uint32_t grace = w->cfg->drain_idle_grace_ms;
    struct timeval gtv = {.tv_sec = grace / 1000, .tv_usec = (grace % 1000) * 1000};
    evtimer_add(w->idle_grace_timer, &gtv);
    drain_done_check(w);
}

/* The grace period of idle keep-alive connections is over: those still idle are closed. */
static void idle_grace_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bw_worker *w = arg;
    size_t n = bw_proxy_close_idle(w);
    if (n > 0)
        bw_log_debug(w->log, "drain: closed %zu idle connection(s) after %u ms", n,
                     w->cfg->drain_idle_grace_ms);
    drain_done_check(w);
}

static void signal_cb(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    bw_worker *w = arg;
    if (sig == SIGUSR1) {
        bw_log_reopen(w->log);
        return;
    }
    if (sig == SIGHUP)
        return; /* reloads are the master's business */
    start_drain(w, sig == SIGTERM ? "SIGTERM" : "SIGINT");
}

static void drain_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bw_worker *w = arg;
    bw_log_warn(w->log, "shutdown timeout: closing %zu connection(s) still open", w->n_sessions);
    event_base_loopexit(w->base, NULL);
}

static void parent_check_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bw_worker *w = arg;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    bw_worker_slot *slot = bw_shm_worker(w->shm, w->worker_slot);
    if (slot)
        atomic_store_explicit(&slot->heartbeat_ms,
                              (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u,
                              memory_order_relaxed);
    if (getppid() != w->master_pid)
        start_drain(w, "master exited");
}

int bw_worker_run(const bw_worker_args *args)
{
    bw_worker w;
    memset(&w, 0, sizeof(w));
    w.cfg = args->cfg;
    w.log = args->log;
    w.index = args->index;
    w.master_pid = args->master_pid;
    w.listen_fds = args->listen_fds;
    w.tls = args->tls;
    w.shm = args->shm;
    w.worker_slot = args->worker_slot;
    w.rl = bw_shm_ratelimit(w.shm);

    (void)prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != w.master_pid)
        return 0; /* the master died before we could ask to be told */

    if (getrandom(&w.reqid_state, sizeof(w.reqid_state), 0) != sizeof(w.reqid_state))
        w.reqid_state = (uint64_t)getpid() * 0x9E3779B97F4A7C15ull ^ (uint64_t)time(NULL);

    struct event_config *ec = event_config_new();
    if (ec) {
        event_config_set_flag(ec, EVENT_BASE_FLAG_NOLOCK);
        /* Coalesce the epoll_ctl calls that bufferevents make as they toggle reading and
         * writing within one loop iteration. */
        event_config_set_flag(ec, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
        w.base = event_base_new_with_config(ec);
        event_config_free(ec);
    }
    if (!w.base) {
        bw_log_error(w.log, "cannot create the event loop");
        return 1;
    }
    int rc = 1;
    w.tv_header_plain.tv_sec = w.cfg->limits.header_timeout_ms / 1000;
    w.tv_header_plain.tv_usec = (w.cfg->limits.header_timeout_ms % 1000) * 1000;
    w.tv_idle_plain.tv_sec = w.cfg->limits.client_idle_timeout_ms / 1000;
    w.tv_idle_plain.tv_usec = (w.cfg->limits.client_idle_timeout_ms % 1000) * 1000;
    w.tv_header = event_base_init_common_timeout(w.base, &w.tv_header_plain);
    w.tv_idle = event_base_init_common_timeout(w.base, &w.tv_idle_plain);
    if (!w.tv_header)
        w.tv_header = &w.tv_header_plain;
    if (!w.tv_idle)
        w.tv_idle = &w.tv_idle_plain;
    w.listeners = calloc(w.cfg->n_listeners, sizeof(*w.listeners));
    w.pools = bw_upstream_pools_new(w.base, w.cfg, w.shm);
    w.rl_params = calloc(w.cfg->n_rate_limits ? w.cfg->n_rate_limits : 1, sizeof(*w.rl_params));
    w.resp_head = malloc(sizeof(*w.resp_head));
    w.path_buf_cap = w.cfg->limits.max_header_bytes ? w.cfg->limits.max_header_bytes : 65536;
    w.path_buf = malloc(w.path_buf_cap);
    if (w.rl_params)
        for (size_t i = 0; i < w.cfg->n_rate_limits; i++)
            bw_ratelimit_params_from_conf(&w.cfg->rate_limits[i], &w.rl_params[i]);
    if (!w.listeners || !w.pools || !w.rl_params || !w.resp_head || !w.path_buf) {
        bw_log_error(w.log, "out of memory at start");
        goto out;
    }
    for (size_t i = 0; i < w.cfg->n_listeners; i++) {
        w.listeners[i] =
            evconnlistener_new(w.base, accept_cb, &w, LEV_OPT_CLOSE_ON_FREE, -1, w.listen_fds[i]);
        if (!w.listeners[i]) {
            bw_log_error(w.log, "cannot watch listener %s", w.cfg->listeners[i].address);
            goto out;
        }
        evconnlistener_set_error_cb(w.listeners[i], accept_error_cb);
    }
    w.ev_term = evsignal_new(w.base, SIGTERM, signal_cb, &w);
    w.ev_int = evsignal_new(w.base, SIGINT, signal_cb, &w);
    w.ev_usr1 = evsignal_new(w.base, SIGUSR1, signal_cb, &w);
    w.ev_hup = evsignal_new(w.base, SIGHUP, signal_cb, &w);
    w.drain_timer = evtimer_new(w.base, drain_timeout_cb, &w);
    w.parent_timer = event_new(w.base, -1, EV_PERSIST, parent_check_cb, &w);
    w.accept_timer = evtimer_new(w.base, accept_resume_cb, &w);
    w.idle_grace_timer = evtimer_new(w.base, idle_grace_cb, &w);
    if (!w.ev_term || !w.ev_int || !w.ev_usr1 || !w.ev_hup || !w.drain_timer || !w.parent_timer ||
        !w.accept_timer || !w.idle_grace_timer)
        goto out;
    evsignal_add(w.ev_term, NULL);
    evsignal_add(w.ev_int, NULL);
    evsignal_add(w.ev_usr1, NULL);
    evsignal_add(w.ev_hup, NULL);
    struct timeval second = {1, 0};
    event_add(w.parent_timer, &second);

    bw_worker_slot *slot = bw_shm_worker(w.shm, w.worker_slot);
    if (slot) /* the master's readiness notification waits for this */
        atomic_store(&slot->accepting, 1u);
    bw_log_info(w.log, "worker %d started (pid %d)", w.index, (int)getpid());
    event_base_dispatch(w.base);
    rc = 0;

out:
    bw_proxy_close_all(&w);
    if (w.listeners) {
        for (size_t i = 0; i < w.cfg->n_listeners; i++)
            if (w.listeners[i])
                evconnlistener_free(w.listeners[i]);
        free(w.listeners);
    }
    bw_upstream_pools_free(w.pools, w.cfg->n_upstreams);
    free(w.rl_params);
    free(w.resp_head);
    free(w.path_buf);
    struct event *evs[] = {w.ev_term,     w.ev_int,       w.ev_usr1,      w.ev_hup,
                           w.drain_timer, w.parent_timer, w.accept_timer, w.idle_grace_timer};
    for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++)
        if (evs[i])
            event_free(evs[i]);
    event_base_free(w.base);
    if (rc == 0)
        bw_log_info(w.log, "worker %d exiting", w.index);
    return rc;
}
