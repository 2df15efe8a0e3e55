/*
 * Master process: supervision, reloads and shutdown.
 *
 * Workers belong to a generation: one configuration, its TLS contexts, and `workers` slots.
 * A worker of the current generation that dies is forked again (at once, or after 500 ms when
 * it lived less than a second, so a crash loop cannot spin the CPU; either way within 1 s).
 * SIGHUP loads the file again; an invalid file is logged line by line and changes nothing.
 * A valid one becomes a new generation whose workers start on the same listening sockets (the
 * master keeps every socket open across reloads, so no connection is refused in between),
 * after which the old generation is sent SIGTERM and drains. A generation is freed when its
 * last worker has exited.
 *
 * The master receives its signals through a signalfd read by its event loop, with the signals
 * blocked, rather than through libevent's signal events: libevent allows signal events in only
 * one event base per process, and a forked worker must own its own. The child closes the
 * signalfd and restores the signal mask it needs before it builds its loop.
 */
#include "breakwater/master.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "breakwater/admin.h"
#include "breakwater/fdlimit.h"
#include "breakwater/notify.h"
#include "breakwater/breaker.h"
#include "breakwater/health.h"
#include "breakwater/resolver.h"
#include "breakwater/probes.h"
#include "breakwater/redis_sync.h"
#include "breakwater/shm.h"
#include "breakwater/tls.h"
#include "breakwater/worker.h"

#define RESPAWN_FAST_DEATH_MS 1000
#define RESPAWN_DELAY_MS 500
#define KILL_GRACE_MS 2000
#define READY_POLL_MS 10

typedef struct bw_generation {
    int id;
    bw_config *cfg;
    int *fds;       /* per listener; owned by the master's socket table */
    SSL_CTX **tls;  /* per listener */
    pid_t *pids;    /* per worker slot, 0 when not running */
    int *shm_slots; /* per worker slot: its counters in the shared region */
    int64_t *started_ms;
    uint32_t n_workers;
    uint32_t alive;
    bool retiring;
    uint64_t tls_files; /* bw_tls_files_stamp() taken before the certificates were read */
    struct bw_generation *next;
} bw_generation;

typedef struct bw_lsock {
    char key[80];
    int fd;
    bool in_use;
} bw_lsock;

typedef struct bw_master {
    struct event_base *base;
    bw_log log;
    const char *config_path;
    bw_generation *current;
    bw_generation *retired;
    int next_gen_id;
    bw_tls_keys keys;
    bw_lsock *socks;
    size_t n_socks;
    bw_admin *admin;
    char admin_key[80];
    uint64_t started_wall_ms;
    bw_shm shm;
    bw_redis_sync *redis; /* NULL without a redis section */
    uint64_t worker_restarts, reloads_ok, reloads_failed;
    bool stopping;
    int sigfd;
    sigset_t sigs;      /* the signals the master takes through sigfd */
    sigset_t orig_mask; /* the mask workers get back */
    struct event *ev_sig, *respawn_timer, *kill_timer;
    bw_notify notify;          /* sd_notify to the service manager; off without NOTIFY_SOCKET */
    struct event *ready_timer; /* polls until the current generation accepts, then READY=1 */
    struct event *tls_timer;   /* certificate files on disk, ticket key ratchet */
    uint64_t tls_seen;         /* files stamp last loaded or last tried */
    bw_health *health;         /* breaker ticks and active checks */
    bw_resolver *resolver;     /* DNS names of upstream servers; NULL when there is none */
} bw_master;

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------------------------------- */
/* Listening sockets, kept open across reloads                                                */

static int open_listener(const bw_sockaddr *a, char *err, size_t errlen)
{
    int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (a->ss.ss_family == AF_INET6)
        (void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&a->ss, a->len) < 0) {
        snprintf(err, errlen, "bind: %s", strerror(errno));
        close(fd);
        return -1;
    }
    if (listen(fd, 4096) < 0) {
        snprintf(err, errlen, "listen: %s", strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* Returns the socket for an address, reusing the one already open for it. */
static int lsock_get(bw_master *m, const bw_sockaddr *a, char *err, size_t errlen)
{
    char key[80];
    bw_sockaddr_format(a, key, sizeof(key));
    for (size_t i = 0; i < m->n_socks; i++) {
        if (strcmp(m->socks[i].key, key) == 0) {
            m->socks[i].in_use = true;
            return m->socks[i].fd;
        }
    }
    int fd = open_listener(a, err, errlen);
    if (fd < 0)
        return -1;
    bw_lsock *ns = realloc(m->socks, (m->n_socks + 1) * sizeof(*ns));
    if (!ns) {
        close(fd);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    m->socks = ns;
    snprintf(m->socks[m->n_socks].key, sizeof(m->socks[m->n_socks].key), "%s", key);
    m->socks[m->n_socks].fd = fd;
    m->socks[m->n_socks].in_use = true;
    m->n_socks++;
    return fd;
}

/* Closes the sockets no configuration uses any more (after a reload). */
static void lsock_sweep(bw_master *m)
{
    size_t j = 0;
    for (size_t i = 0; i < m->n_socks; i++) {
        if (m->socks[i].in_use)
            m->socks[j++] = m->socks[i];
        else
            close(m->socks[i].fd);
    }
    m->n_socks = j;
}

static void lsock_close_all(bw_master *m)
{
    for (size_t i = 0; i < m->n_socks; i++)
        close(m->socks[i].fd);
    m->n_socks = 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Generations                                                                                */

static void generation_free(bw_generation *g)
{
    if (!g)
        return;
    if (g->tls) {
        for (size_t i = 0; i < g->cfg->n_listeners; i++)
            bw_tls_ctx_free(g->tls[i]);
        free(g->tls);
    }
    free(g->fds);
    free(g->pids);
    free(g->shm_slots);
    free(g->started_ms);
    bw_config_free(g->cfg);
    free(g);
}

/* Builds sockets and TLS contexts for a configuration. On failure adds lines to diag. */
static bw_generation *generation_new(bw_master *m, bw_config *cfg, bw_diag *diag)
{
    bw_generation *g = calloc(1, sizeof(*g));
    if (!g) {
        bw_diag_add(diag, "out of memory");
        bw_config_free(cfg);
        return NULL;
    }
    g->cfg = cfg;
    g->n_workers = cfg->workers;
    (void)bw_fdlimit_apply(cfg, &m->log); /* a shortfall is logged; accept() copes with it */
    g->fds = calloc(cfg->n_listeners, sizeof(int));
    g->tls = calloc(cfg->n_listeners, sizeof(SSL_CTX *));
    g->pids = calloc(g->n_workers, sizeof(pid_t));
    g->shm_slots = calloc(g->n_workers, sizeof(int));
    g->started_ms = calloc(g->n_workers, sizeof(int64_t));
    if (!g->fds || !g->tls || !g->pids || !g->shm_slots || !g->started_ms) {
        bw_diag_add(diag, "out of memory");
        generation_free(g);
        return NULL;
    }
    for (size_t i = 0; i < m->n_socks; i++)
        m->socks[i].in_use = false;
    bool ok = true;
    bw_diag warn;
    bw_diag_init(&warn);
    g->tls_files = bw_tls_files_stamp(cfg);
    for (size_t i = 0; i < cfg->n_listeners; i++) {
        char err[160];
        g->fds[i] = lsock_get(m, &cfg->listeners[i].addr, err, sizeof(err));
        if (g->fds[i] < 0) {
            bw_diag_add(diag, "%s: listeners[%zu]: cannot listen on %s: %s", cfg->path, i,
                        cfg->listeners[i].address, err);
            ok = false;
        }
        if (cfg->listeners[i].tls_enabled) {
            g->tls[i] = bw_tls_ctx_new(&cfg->listeners[i], i, cfg->path, &m->keys, diag, &warn);
            if (!g->tls[i])
                ok = false;
        }
    }
    for (size_t i = 0; i < warn.count; i++)
        bw_log_warn(&m->log, "%s", warn.lines[i]);
    bw_diag_free(&warn);
    char err[200];
    if (ok && bw_shm_bind(&m->shm, cfg, (uint64_t)m->next_gen_id + 1, bw_breaker_now_ms(), err,
                          sizeof(err)) < 0) {
        bw_diag_add(diag, "%s: %s", cfg->path, err);
        ok = false;
    }
    if (!ok) {
        /* Keep the sockets the running generation still uses. */
        if (m->current) {
            for (size_t i = 0; i < m->n_socks; i++)
                m->socks[i].in_use = false;
            for (size_t i = 0; i < m->current->cfg->n_listeners; i++)
                for (size_t k = 0; k < m->n_socks; k++)
                    if (m->socks[k].fd == m->current->fds[i])
                        m->socks[k].in_use = true;
        }
        lsock_sweep(m);
        generation_free(g);
        return NULL;
    }
    g->id = ++m->next_gen_id;
    return g;
}

static void spawn_worker(bw_master *m, bw_generation *g, uint32_t slot)
{
    pid_t master_pid = getpid();
    /* The slot is taken before fork so the child knows it; the child's pid is set after. */
    int shm_slot = bw_shm_worker_acquire(&m->shm, master_pid, (uint64_t)mono_ms());
    pid_t pid = fork();
    if (pid == 0) {
        close(m->sigfd);
        sigprocmask(SIG_SETMASK, &m->orig_mask, NULL);
        /* The child must not touch the master's event base (it shares its epoll descriptor);
         * it builds its own. Sockets the worker does not serve are closed. */
        for (size_t i = 0; i < m->n_socks; i++) {
            bool mine = false;
            for (size_t k = 0; k < g->cfg->n_listeners; k++)
                mine |= g->fds[k] == m->socks[i].fd;
            if (!mine)
                close(m->socks[i].fd);
        }
        if (bw_admin_fd(m->admin) >= 0)
            close(bw_admin_fd(m->admin));
        if (bw_redis_sync_fd(m->redis) >= 0)
            close(bw_redis_sync_fd(m->redis));
        bw_notify_close(&m->notify);
        char tag[32];
        snprintf(tag, sizeof(tag), "worker %u", slot + 1);
        bw_log_set_tag(&m->log, tag);
        bw_worker_args args = {
            .cfg = g->cfg,
            .log = &m->log,
            .index = (int)slot + 1,
            .master_pid = master_pid,
            .listen_fds = g->fds,
            .tls = g->tls,
            .shm = &m->shm,
            .worker_slot = shm_slot,
        };
        _exit(bw_worker_run(&args));
    }
    if (pid < 0) {
        if (shm_slot >= 0)
            bw_shm_worker_release(&m->shm, shm_slot);
        bw_log_error(&m->log, "fork failed: %s; will retry", strerror(errno));
        struct timeval tv = {0, RESPAWN_DELAY_MS * 1000};
        evtimer_add(m->respawn_timer, &tv);
        return;
    }
    g->pids[slot] = pid;
    g->shm_slots[slot] = shm_slot;
    if (shm_slot >= 0)
        atomic_store(&bw_shm_worker(&m->shm, shm_slot)->pid, (int32_t)pid);
    g->started_ms[slot] = mono_ms();
    g->alive++;
}

static void spawn_missing(bw_master *m)
{
    bw_generation *g = m->current;
    if (!g || m->stopping)
        return;
    for (uint32_t i = 0; i < g->n_workers; i++)
        if (g->pids[i] == 0)
            spawn_worker(m, g, i);
}

static void signal_generation(bw_generation *g, int sig)
{
    for (uint32_t i = 0; i < g->n_workers; i++)
        if (g->pids[i] > 0)
            kill(g->pids[i], sig);
}

static void maybe_finish(bw_master *m)
{
    if (!m->stopping)
        return;
    bool any = m->current && m->current->alive > 0;
    for (bw_generation *g = m->retired; g; g = g->next)
        any |= g->alive > 0;
    if (!any)
        event_base_loopexit(m->base, NULL);
}

/* ---------------------------------------------------------------------------------------- */
/* Signals                                                                                    */

static void describe_exit(int status, char *buf, size_t len)
{
    if (WIFEXITED(status))
        snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, len, "killed by signal %d (%s)", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
    else
        snprintf(buf, len, "stopped (status %d)", status);
}

static void reap(bw_master *m)
{
    int status;
    pid_t pid;
    bool need_delay = false;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        char how[96];
        describe_exit(status, how, sizeof(how));
        bw_generation *cur = m->current;
        bool found = false;
        if (cur) {
            for (uint32_t i = 0; i < cur->n_workers; i++) {
                if (cur->pids[i] != pid)
                    continue;
                found = true;
                cur->pids[i] = 0;
                cur->alive--;
                if (cur->shm_slots[i] >= 0)
                    bw_shm_worker_release(&m->shm, cur->shm_slots[i]);
                if (m->stopping) {
                    bw_log_info(&m->log, "worker %u (pid %d) %s", i + 1, (int)pid, how);
                    break;
                }
                m->worker_restarts++;
                bool fast = mono_ms() - cur->started_ms[i] < RESPAWN_FAST_DEATH_MS;
                bw_log_error(&m->log, "worker %u (pid %d) died: %s; respawning%s", i + 1, (int)pid,
                             how, fast ? " in 500 ms (it died right after start)" : "");
                if (fast)
                    need_delay = true;
                else
                    spawn_worker(m, cur, i);
                break;
            }
        }
        bw_generation **pp = &m->retired;
        while (!found && *pp) {
            bw_generation *g = *pp;
            for (uint32_t i = 0; i < g->n_workers; i++) {
                if (g->pids[i] == pid) {
                    found = true;
                    g->pids[i] = 0;
                    g->alive--;
                    if (g->shm_slots[i] >= 0)
                        bw_shm_worker_release(&m->shm, g->shm_slots[i]);
                    bw_log_info(&m->log, "old worker (generation %d, pid %d) %s", g->id, (int)pid,
                                how);
                }
            }
            if (found && g->alive == 0) {
                *pp = g->next;
                generation_free(g);
                break;
            }
            pp = &g->next;
        }
    }
    if (need_delay && !evtimer_pending(m->respawn_timer, NULL)) {
        struct timeval tv = {0, RESPAWN_DELAY_MS * 1000};
        evtimer_add(m->respawn_timer, &tv);
    }
    maybe_finish(m);
}

static void respawn_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    spawn_missing(arg);
}

static void kill_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bw_master *m = arg;
    bw_log_warn(&m->log, "workers still running after the shutdown timeout; killing them");
    if (m->current)
        signal_generation(m->current, SIGKILL);
    for (bw_generation *g = m->retired; g; g = g->next)
        signal_generation(g, SIGKILL);
}

static void master_status(void *arg, bw_master_status *out)
{
    bw_master *m = arg;
    memset(out, 0, sizeof(*out));
    if (m->current) {
        out->workers_expected = m->current->n_workers;
        out->workers_alive = m->current->alive;
    }
    out->draining = m->stopping;
    out->started_wall_ms = m->started_wall_ms;
    out->worker_restarts = m->worker_restarts;
    out->reloads_ok = m->reloads_ok;
    out->reloads_failed = m->reloads_failed;
    if (m->redis) {
        bw_redis_stats rs;
        bw_redis_sync_stats(m->redis, &rs);
        out->redis_pending_deltas = rs.pending_deltas;
    }
}

static void admin_reset_cb(void *arg, const char *upstream)
{
    bw_master *m = arg;
    if (m->redis)
        (void)bw_redis_sync_reset_breaker(m->redis, upstream);
}

static void admin_open_cb(void *arg, const char *upstream)
{
    bw_master *m = arg;
    if (m->redis)
        (void)bw_redis_sync_force_open(m->redis, upstream);
}

static void admin_ratelimit_delete_cb(void *arg, const char *policy, const char *key)
{
    bw_master *m = arg;
    if (m->redis)
        (void)bw_redis_sync_delete_ratelimit(m->redis, policy, key);
}

/* Starts, reconfigures or stops the Redis synchronisation for a newly bound configuration. */
static void redis_apply(bw_master *m, const bw_config *cfg)
{
    if (!cfg->redis.enabled) {
        if (m->redis) {
            bw_redis_sync_free(m->redis);
            m->redis = NULL;
            atomic_store(&m->shm.hdr->status.redis_configured, 0u);
            bw_log_info(&m->log, "redis: no longer configured; using local state only");
        }
        return;
    }
    if (m->redis) {
        bw_redis_sync_set_config(m->redis, cfg);
    } else {
        m->redis = bw_redis_sync_new(m->base, &m->shm, cfg, &m->log, NULL);
        if (!m->redis) {
            bw_log_error(&m->log, "redis: cannot start the synchronisation; using local state");
            return;
        }
    }
    bw_redis_sync_set_share_when_down(m->redis, cfg->redis.share_when_down);
}

/* (Re)starts name resolution for a newly bound configuration. The servers last published stay in
 * shared memory meanwhile, so workers keep a set while the new resolver's first round runs. */
static void resolver_apply(bw_master *m, const bw_config *cfg)
{
    bw_resolver_free(m->resolver);
    int failed = 0;
    m->resolver = bw_resolver_new(m->base, &m->shm, cfg, &m->log, &failed);
    if (failed)
        bw_log_error(&m->log, "dns: name resolution is not running; named servers get no address");
}

/* Opens the admin listener for cfg, reusing the running one when the address is unchanged. */
static int admin_apply(bw_master *m, const bw_config *cfg, char *err, size_t errlen)
{
    char key[80] = "";
    if (cfg->admin.enabled)
        bw_sockaddr_format(&cfg->admin.addr, key, sizeof(key));
    if (m->admin && strcmp(key, m->admin_key) == 0) {
        bw_admin_set_config(m->admin, cfg);
        return 0;
    }
    int fd = -1;
    if (cfg->admin.enabled) {
        fd = open_listener(&cfg->admin.addr, err, errlen);
        if (fd < 0)
            return -1;
    }
    bw_admin *a = bw_admin_new(m->base, fd, &m->log, &m->shm, master_status, m);
    if (!a) {
        if (fd >= 0)
            close(fd);
        snprintf(err, errlen, "cannot start the admin listener");
        return -1;
    }
    bw_admin_hooks hooks = {.reset = admin_reset_cb,
                            .open = admin_open_cb,
                            .ratelimit_delete = admin_ratelimit_delete_cb,
                            .arg = m};
    bw_admin_set_hooks(a, &hooks);
    bw_admin_free(m->admin);
    m->admin = a;
    snprintf(m->admin_key, sizeof(m->admin_key), "%s", key);
    bw_admin_set_config(a, cfg);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Service-manager notifications                                                              */

static void notify(bw_master *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void notify(bw_master *m, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    if (m->notify.fd < 0)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (bw_notify_send(&m->notify, msg) < 0)
        bw_log_warn(&m->log, "sd_notify: cannot send to NOTIFY_SOCKET: %s", strerror(errno));
}

/* True once every worker of g has started watching its listeners. */
static bool generation_accepting(bw_master *m, const bw_generation *g)
{
    if (!g || g->alive < g->n_workers)
        return false;
    for (uint32_t i = 0; i < g->n_workers; i++) {
        bw_worker_slot *slot = bw_shm_worker(&m->shm, g->shm_slots[i]);
        if (slot && !atomic_load(&slot->accepting))
            return false;
    }
    return true;
}

static void ready_check_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bw_master *m = arg;
    if (m->stopping)
        return;
    if (!generation_accepting(m, m->current)) {
        struct timeval tv = {0, READY_POLL_MS * 1000};
        evtimer_add(m->ready_timer, &tv);
        return;
    }
    notify(m, "READY=1\nSTATUS=serving: generation %d, %u worker(s), %zu listener(s)\n",
           m->current->id, m->current->n_workers, m->current->cfg->n_listeners);
}

/* READY=1 follows as soon as the current generation accepts connections. */
static void await_ready(bw_master *m)
{
    struct timeval tv = {0, 0};
    if (m->notify.fd >= 0 && m->ready_timer)
        evtimer_add(m->ready_timer, &tv);
}

/* Says which environment overrides are in effect (at start and after every reload). */
static void log_overrides(bw_master *m, const bw_config *cfg)
{
    for (size_t i = 0; i < cfg->n_notes; i++)
        bw_log_msg(&m->log, cfg->notes_warn[i] ? BW_LOG_WARN : BW_LOG_INFO, "%s", cfg->notes[i]);
}

static void tls_timer_arm(bw_master *m);

static void reload(bw_master *m, const char *why)
{
    bw_log_info(&m->log, "%s: reloading %s", why, m->config_path);
    if (m->notify.fd >= 0) {
        struct timespec ts;
        char msg[512], status[400];
        clock_gettime(CLOCK_MONOTONIC, &ts);
        snprintf(status, sizeof(status), "reloading %s", m->config_path);
        if (bw_notify_format_reloading((uint64_t)ts.tv_sec * 1000000u +
                                           (uint64_t)ts.tv_nsec / 1000u,
                                       status, msg, sizeof(msg)) > 0)
            notify(m, "%s", msg);
    }
    bw_diag diag;
    bw_diag_init(&diag);
    bw_config *cfg = bw_config_load(m->config_path, NULL, &diag);
    bw_generation *g = cfg ? generation_new(m, cfg, &diag) : NULL;
    char err[200] = "";
    if (g && admin_apply(m, g->cfg, err, sizeof(err)) < 0) {
        bw_diag_add(&diag, "%s: admin: cannot listen on %s: %s", g->cfg->path,
                    g->cfg->admin.address, err);
        generation_free(g);
        g = NULL;
    }
    if (!g) {
        m->reloads_failed++;
        for (size_t i = 0; i < diag.count; i++)
            bw_log_error(&m->log, "%s", diag.lines[i]);
        bw_log_error(&m->log, "reload failed: keeping the running configuration");
        /* The old generation still serves: the manager must not wait for a reload that will
         * not come. */
        notify(m,
               "READY=1\nSTATUS=reload rejected (%zu problem(s), first: %.300s); still serving "
               "generation %d\n",
               diag.count, diag.count ? diag.lines[0] : "?", m->current ? m->current->id : 0);
        bw_diag_free(&diag);
        return;
    }
    bw_diag_free(&diag);
    m->log.json = g->cfg->log.error_json; /* before the fork: new workers copy the log */
    m->log.query = g->cfg->log.query;
    log_overrides(m, g->cfg);
    redis_apply(m, g->cfg);
    bw_health_set_config(m->health, g->cfg);
    resolver_apply(m, g->cfg);
    bw_generation *old = m->current;
    m->current = g;
    spawn_missing(m);
    lsock_sweep(m);
    if (old) {
        old->retiring = true;
        signal_generation(old, SIGTERM);
        if (old->alive == 0) {
            generation_free(old);
        } else {
            old->next = m->retired;
            m->retired = old;
        }
    }
    m->reloads_ok++;
    m->tls_seen = g->tls_files;
    tls_timer_arm(m);
    /* The log destinations may have changed too. */
    bw_log_level lvl = g->cfg->log.level;
    m->log.level = lvl;
    bw_log_info(&m->log, "configuration reloaded (generation %d, %u workers)", g->id, g->n_workers);
    await_ready(m);
}

/*
 * Certificate renewal without a signal: every reload_check_ms the master compares the identity of
 * the certificate, key and OCSP files with what it last loaded and, when one changed, reloads
 * exactly as on SIGHUP. A broken new file fails that reload (the running workers keep the old
 * certificate, the reason is logged) and is not tried again until a file changes once more.
 * The same timer steps the master's ticket key ratchet, so forgotten keys leave its memory too.
 */
static void tls_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bw_master *m = arg;
    bw_tls_keys_advance(&m->keys, mono_ms());
    if (!m->stopping && m->current) {
        uint64_t now = bw_tls_files_stamp(m->current->cfg);
        if (now != m->tls_seen) {
            m->tls_seen = now;
            reload(m, "certificate files changed on disk");
        }
    }
    tls_timer_arm(m);
}

static void tls_timer_arm(bw_master *m)
{
    uint32_t ms = m->current ? bw_tls_reload_check_ms(m->current->cfg) : 0;
    if (!m->tls_timer)
        return;
    evtimer_del(m->tls_timer);
    if (ms == 0 || m->stopping)
        return;
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    evtimer_add(m->tls_timer, &tv);
}

static void start_stop(bw_master *m, const char *why)
{
    if (m->stopping)
        return;
    m->stopping = true;
    atomic_store(&m->shm.hdr->status.draining, 1u);
    bw_log_info(&m->log, "%s: draining workers (up to %u ms)", why,
                m->current ? m->current->cfg->shutdown_timeout_ms : 0);
    /* The admin listener stays up while the workers drain, so that /readyz can say 503
     * (draining) to a load balancer instead of just refusing connections. */
    lsock_close_all(m);
    uint32_t timeout = m->current ? m->current->cfg->shutdown_timeout_ms : 0;
    notify(m, "STOPPING=1\nSTATUS=draining (%s), up to %u ms\n", why, timeout);
    if (m->current)
        signal_generation(m->current, SIGTERM);
    for (bw_generation *g = m->retired; g; g = g->next)
        signal_generation(g, SIGTERM);
    struct timeval tv = {.tv_sec = (timeout + KILL_GRACE_MS) / 1000,
                         .tv_usec = ((timeout + KILL_GRACE_MS) % 1000) * 1000};
    evtimer_add(m->kill_timer, &tv);
    maybe_finish(m);
}

static void handle_signal(bw_master *m, int sig)
{
    switch (sig) {
    case SIGCHLD:
        reap(m);
        break;
    case SIGHUP:
        if (!m->stopping)
            reload(m, "SIGHUP");
        break;
    case SIGUSR1:
        bw_log_reopen(&m->log);
        if (m->current)
            signal_generation(m->current, SIGUSR1);
        for (bw_generation *g = m->retired; g; g = g->next)
            signal_generation(g, SIGUSR1);
        break;
    case SIGTERM:
        start_stop(m, "SIGTERM");
        break;
    case SIGINT:
        start_stop(m, "SIGINT");
        break;
    }
}

static void signalfd_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    bw_master *m = arg;
    struct signalfd_siginfo si;
    while (read(fd, &si, sizeof(si)) == (ssize_t)sizeof(si))
        handle_signal(m, (int)si.ssi_signo);
}

int bw_master_run(const char *config_path, bw_config *cfg)
{
    bw_master m;
    memset(&m, 0, sizeof(m));
    m.config_path = config_path;
    m.started_wall_ms = bw_probes_wall_ms();
    char err[256];
    if (bw_log_open(&m.log, &cfg->log, err, sizeof(err)) < 0) {
        fprintf(stderr, "breakwater: %s\n", err);
        bw_config_free(cfg);
        return 1;
    }
    bw_log_set_tag(&m.log, "master");
    signal(SIGPIPE, SIG_IGN);
    /* A bad NOTIFY_SOCKET is said and ignored: the proxy still serves. It is removed from the
     * environment so that nothing started later speaks for the master. */
    if (bw_notify_open(&m.notify, getenv("NOTIFY_SOCKET"), err, sizeof(err)) < 0)
        bw_log_error(&m.log, "sd_notify disabled: %s", err);
    unsetenv("NOTIFY_SOCKET");
    int rc = 1;
    sigemptyset(&m.sigs);
    sigaddset(&m.sigs, SIGTERM);
    sigaddset(&m.sigs, SIGINT);
    sigaddset(&m.sigs, SIGHUP);
    sigaddset(&m.sigs, SIGUSR1);
    sigaddset(&m.sigs, SIGCHLD);
    sigprocmask(SIG_BLOCK, &m.sigs, &m.orig_mask);
    m.sigfd = signalfd(-1, &m.sigs, SFD_NONBLOCK | SFD_CLOEXEC);
    if (m.sigfd < 0) {
        bw_log_error(&m.log, "signalfd: %s", strerror(errno));
        bw_config_free(cfg);
        goto out;
    }
    if (bw_tls_keys_generate(&m.keys) < 0) {
        bw_log_error(&m.log, "cannot generate TLS session ticket keys: %s", strerror(errno));
        bw_config_free(cfg);
        goto out;
    }
    m.base = event_base_new();
    if (!m.base) {
        bw_log_error(&m.log, "cannot create the event loop");
        bw_config_free(cfg);
        goto out;
    }
    if (bw_shm_create(&m.shm, cfg, err, sizeof(err)) < 0) {
        bw_log_error(&m.log, "cannot create the shared memory region: %s", err);
        bw_config_free(cfg);
        goto out;
    }
    bw_log_info(&m.log, "shared memory region: %zu bytes (rate-limit table: %u entries, %zu bytes)",
                m.shm.size, m.shm.hdr->rl_entries,
                bw_ratelimit_table_size_bytes(m.shm.hdr->rl_entries));
    bw_diag diag;
    bw_diag_init(&diag);
    m.current = generation_new(&m, cfg, &diag);
    if (!m.current) {
        for (size_t i = 0; i < diag.count; i++)
            bw_log_error(&m.log, "%s", diag.lines[i]);
        bw_diag_free(&diag);
        goto out;
    }
    bw_diag_free(&diag);
    log_overrides(&m, m.current->cfg);
    if (admin_apply(&m, m.current->cfg, err, sizeof(err)) < 0) {
        bw_log_error(&m.log, "%s: admin: cannot listen on %s: %s", m.current->cfg->path,
                     m.current->cfg->admin.address, err);
        goto out;
    }
    redis_apply(&m, m.current->cfg);
    m.health = bw_health_new(m.base, &m.shm, m.current->cfg, &m.log);
    if (!m.health) {
        bw_log_error(&m.log, "cannot start the upstream health timer");
        goto out;
    }
    resolver_apply(&m, m.current->cfg);
    m.ev_sig = event_new(m.base, m.sigfd, EV_READ | EV_PERSIST, signalfd_cb, &m);
    m.respawn_timer = evtimer_new(m.base, respawn_cb, &m);
    m.kill_timer = evtimer_new(m.base, kill_cb, &m);
    m.ready_timer = evtimer_new(m.base, ready_check_cb, &m);
    m.tls_timer = evtimer_new(m.base, tls_timer_cb, &m);
    if (!m.ev_sig || !m.respawn_timer || !m.kill_timer || !m.ready_timer || !m.tls_timer) {
        bw_log_error(&m.log, "cannot set up signal handling");
        goto out;
    }
    event_add(m.ev_sig, NULL);
    m.tls_seen = m.current->tls_files;
    tls_timer_arm(&m);

    spawn_missing(&m);
    await_ready(&m);
    bw_log_info(&m.log, "breakwater %s started: %u worker(s), %zu listener(s)", BW_VERSION,
                m.current->n_workers, m.current->cfg->n_listeners);
    event_base_dispatch(m.base);
    bw_log_info(&m.log, "stopped");
    rc = 0;

out:
    bw_resolver_free(m.resolver);
    bw_health_free(m.health);
    if (m.redis)
        bw_redis_sync_free(m.redis);
    bw_admin_free(m.admin);
    lsock_close_all(&m);
    free(m.socks);
    generation_free(m.current);
    while (m.retired) {
        bw_generation *g = m.retired;
        m.retired = g->next;
        generation_free(g);
    }
    struct event *evs[] = {m.ev_sig, m.respawn_timer, m.kill_timer, m.ready_timer, m.tls_timer};
    for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++)
        if (evs[i])
            event_free(evs[i]);
    if (m.base)
        event_base_free(m.base);
    if (m.sigfd > 0)
        close(m.sigfd);
    if (m.shm.hdr)
        bw_shm_destroy(&m.shm);
    bw_notify_close(&m.notify);
    bw_tls_keys_free(&m.keys);
    bw_log_close(&m.log);
    return rc;
}
