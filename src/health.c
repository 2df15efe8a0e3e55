/*
 * Upstream health in the master: breaker ticks and active health checks.
 *
 * A breaker only moved from open to half_open when a request asked for admission, so an upstream
 * that receives no traffic while it is out (a Kubernetes pod marked unready gets none) stayed open
 * for ever and kept /readyz at 503. The master fixes that with a timer: every BW_HEALTH_TICK_MS
 * it calls bw_breaker_tick() on each breaker, which makes the transition once the open period is
 * over. The breakers run on the monotonic clock, so a step of the wall clock changes nothing
 * here. The transition is made in the shared record, so workers, /readyz, /upstreams, the
 * metrics and the fleet synchronisation all see it as if a request had made it.
 *
 * Active checks run here too, once per instance rather than once per worker, each one a
 * non-blocking connection on the master's loop with its own deadline: a server that hangs costs
 * a timer, never a wait. A check sends "GET path" with Connection: close, reads the response head
 * (at most BW_HEALTH_MAX_HEAD bytes, parsed by the same strict parser as proxied responses) and
 * decides on its status; the body is never read, so a check endpoint answering megabytes costs
 * nothing but one socket buffer. Verdicts go to the server's shared record (bw_outlier_*), where
 * the workers' balancers read them; a passing check also counts as a successful probe for a
 * breaker that is not closed, so an upstream that came back closes with no client traffic.
 */
#include "breakwater/health.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "breakwater/breaker.h"
#include "breakwater/http.h"
#include "breakwater/outlier.h"
#include "breakwater/probes.h"
#include "breakwater/upstream_tls.h"

/* One server's active check. */
typedef struct hc_target {
    bw_health *h;
    size_t up;                      /* index into cfg->upstreams */
    int rec;                        /* the server's record in the upstream's shared table */
    char label[BW_OUTLIER_KEY_MAX]; /* its address as shown ("10.0.0.7:8080") */
    bw_sockaddr addr;               /* where to connect */
    struct event *every;            /* the interval timer */
    struct event *deadline;         /* timeout_ms of the check in flight */
    struct bufferevent *bev;        /* the check in flight, NULL between checks */
    bool connected;
} hc_target;

struct bw_health {
    struct event_base *base;
    bw_shm *shm;
    const bw_config *cfg;
    bw_log *log;
    struct event *tick;
    hc_target *targets;
    size_t n_targets;
    SSL_CTX **tls; /* per upstream index: the checks' client context for a "tls" upstream */
    size_t n_tls;
    bw_http_head *head; /* parser scratch (large: kept off the stack) */
};

static void health_tick_breakers(bw_health *h)
{
    uint64_t now = bw_breaker_now_ms();
    for (size_t i = 0; i < h->cfg->n_upstreams; i++) {
        const bw_upstream_conf *u = &h->cfg->upstreams[i];
        if (u->shm_slot < 0)
            continue;
        bw_breaker_transition t;
        if (!bw_breaker_tick(bw_shm_breaker(h->shm, u->shm_slot), &u->breaker, now, &t))
            continue;
        char what[160];
        bw_breaker_describe(&t, what, sizeof(what));
        bw_log_info(h->log, "breaker %s: %s (no request needed)", u->name, what);
    }
}

static void health_tick_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    health_tick_breakers(arg);
}

static const char *hc_result_text(bw_check_result r)
{
    switch (r) {
    case BW_CHECK_PASS:
        return "passed";
    case BW_CHECK_STATUS:
        return "unexpected status";
    case BW_CHECK_CONNECT:
        return "connect failed";
    case BW_CHECK_TIMEOUT:
        return "no answer within timeout_ms";
    case BW_CHECK_INVALID:
        return "invalid HTTP response";
    case BW_CHECK_TOO_LARGE:
        return "response head too large";
    case BW_CHECK_TLS:
        return "TLS failed";
    case BW_CHECK_NONE:
        break;
    }
    return "?";
}

/* The check is over: its verdict goes to the server's shared record and, when it passed, to
 * the upstream's breaker as a successful probe. */
static void hc_finish(hc_target *t, bw_check_result r, int status)
{
    bw_health *h = t->h;
    if (t->bev) {
        bufferevent_free(t->bev);
        t->bev = NULL;
    }
    evtimer_del(t->deadline);
    const bw_upstream_conf *u = &h->cfg->upstreams[t->up];
    bw_outlier_group *g = bw_shm_servers(h->shm, u->shm_slot);
    if (g == NULL || t->rec < 0 || t->rec >= BW_OUTLIER_MAX_SERVERS)
        return;
    bool passed = r == BW_CHECK_PASS;
    atomic_fetch_add_explicit(passed ? &g->checks_pass : &g->checks_fail, 1, memory_order_relaxed);
    bw_outlier_server *rec = &g->servers[t->rec];
    char st[24] = "";
    if (status > 0)
        snprintf(st, sizeof(st), " (status %d)", status);
    if (bw_outlier_check_done(rec, &u->health_check, passed, r, status, bw_probes_wall_ms())) {
        if (passed)
            bw_log_info(h->log, "upstream %s: server %s is healthy again: %u health checks passed",
                        u->name, t->label, u->health_check.healthy_threshold);
        else
            bw_log_warn(h->log,
                        "upstream %s: server %s is unhealthy: health check %s %s%s, %u in a row",
                        u->name, t->label, u->health_check.path, hc_result_text(r), st,
                        u->health_check.unhealthy_threshold);
    } else if (!passed) {
        bw_log_debug(h->log, "upstream %s: server %s: health check %s %s%s", u->name, t->label,
                     u->health_check.path, hc_result_text(r), st);
    }
    if (!passed)
        return;
    bw_breaker_transition tr;
    if (bw_breaker_check_passed(bw_shm_breaker(h->shm, u->shm_slot), &u->breaker,
                                bw_breaker_now_ms(), &tr)) {
        char what[160];
        bw_breaker_describe(&tr, what, sizeof(what));
        bw_log_info(h->log, "breaker %s: %s (health check of %s)", u->name, what, t->label);
    }
}

static void hc_read_cb(struct bufferevent *bev, void *arg)
{
    hc_target *t = arg;
    bw_health *h = t->h;
    const bw_health_check_conf *c = &h->cfg->upstreams[t->up].health_check;
    struct evbuffer *in = bufferevent_get_input(bev);
    for (;;) {
        size_t len = evbuffer_get_length(in);
        struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
        if (end.pos < 0) {
            if (len > BW_HEALTH_MAX_HEAD)
                hc_finish(t, BW_CHECK_TOO_LARGE, 0);
            return;
        }
        size_t head_len = (size_t)end.pos + 4;
        if (head_len > BW_HEALTH_MAX_HEAD) {
            hc_finish(t, BW_CHECK_TOO_LARGE, 0);
            return;
        }
        const char *p = (const char *)evbuffer_pullup(in, (ev_ssize_t)head_len);
        if (p == NULL || bw_http_parse_response(p, head_len, BW_HTTP_MAX_HEADERS_HARD,
                                                BW_METHOD_GET, h->head) != BW_HTTP_OK) {
            hc_finish(t, BW_CHECK_INVALID, 0);
            return;
        }
        int status = h->head->status;
        if (status >= 100 && status < 200 && status != 101) {
            evbuffer_drain(in, head_len); /* interim: the final head follows */
            continue;
        }
        bool ok = status >= c->expect_min && status <= c->expect_max;
        hc_finish(t, ok ? BW_CHECK_PASS : BW_CHECK_STATUS, status);
        return;
    }
}

static void hc_event_cb(struct bufferevent *bev, short what, void *arg)
{
    hc_target *t = arg;
    if (what & BEV_EVENT_CONNECTED) {
        t->connected = true;
        return;
    }
    /* EOF or error before a complete head. On a TLS upstream, a handshake that began and failed
     * (or an alert after it) is a TLS failure, not a refused connect. */
    SSL *ssl = bufferevent_openssl_get_ssl(bev);
    if (ssl != NULL) {
        unsigned long e = bufferevent_get_openssl_error(bev);
        bool began = SSL_get_state(ssl) != TLS_ST_BEFORE;
        if (e != 0 || (!t->connected && began) || SSL_get_verify_result(ssl) != X509_V_OK) {
            char why[300];
            bw_upstream_tls_failure(ssl, e, why, sizeof(why));
            bw_log_debug(t->h->log, "upstream %s: server %s: health check: %s",
                         t->h->cfg->upstreams[t->up].name, t->label, why);
            hc_finish(t, BW_CHECK_TLS, 0);
            return;
        }
    }
    hc_finish(t, t->connected ? BW_CHECK_INVALID : BW_CHECK_CONNECT, 0);
}

static void hc_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    hc_finish(arg, BW_CHECK_TIMEOUT, 0);
}

static void hc_start(hc_target *t)
{
    bw_health *h = t->h;
    if (t->bev != NULL)
        return; /* the previous check is still running (timeout_ms > interval_ms) */
    const bw_upstream_conf *u = &h->cfg->upstreams[t->up];
    const bw_health_check_conf *c = &u->health_check;
    t->connected = false;
    struct timeval tv = {c->timeout_ms / 1000, (c->timeout_ms % 1000) * 1000};
    evtimer_add(t->deadline, &tv);
    t->bev = bufferevent_socket_new(h->base, -1, BEV_OPT_CLOSE_ON_FREE);
    if (t->bev == NULL) {
        hc_finish(t, BW_CHECK_CONNECT, 0);
        return;
    }
    if (t->addr.len == 0 || bufferevent_socket_connect(t->bev, (const struct sockaddr *)&t->addr.ss,
                                                       (int)t->addr.len) < 0) {
        hc_finish(t, BW_CHECK_CONNECT, 0); /* failed at once: EMFILE, ENETUNREACH, ... */
        return;
    }
    if (u->tls.enabled) {
        /* The same TLS as proxied requests: a filter whose handshake follows the connect. */
        SSL_CTX *ctx = t->up < h->n_tls ? h->tls[t->up] : NULL;
        bw_server_conf sc;
        memset(&sc, 0, sizeof(sc));
        sc.addr = t->addr;
        SSL *ssl = ctx ? bw_upstream_tls_ssl_new(ctx, u, &sc) : NULL;
        struct bufferevent *f =
            ssl ? bufferevent_openssl_filter_new(h->base, t->bev, ssl, BUFFEREVENT_SSL_CONNECTING,
                                                 BEV_OPT_CLOSE_ON_FREE)
                : NULL;
        if (f == NULL) {
            /* (Out of memory. The SSL is not freed here: with BEV_OPT_CLOSE_ON_FREE some
             * libevent versions free it on this error path themselves.) */
            hc_finish(t, BW_CHECK_TLS, 0);
            return;
        }
        t->bev = f;
    }
    bufferevent_setcb(t->bev, hc_read_cb, NULL, hc_event_cb, t);
    bufferevent_setwatermark(t->bev, EV_READ, 0, BW_HEALTH_MAX_HEAD + 1);
    evbuffer_add_printf(bufferevent_get_output(t->bev),
                        "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: breakwater-health-check\r\n"
                        "Connection: close\r\n\r\n",
                        c->path, c->host ? c->host : t->label);
    bufferevent_enable(t->bev, EV_READ | EV_WRITE);
}

static void hc_every_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    hc_start(arg);
}

/*
 * DNS-named upstreams: one target per shared record, and one timer for the upstream that checks
 * every server of the currently published set (copied under members_seq, like the workers do).
 */
static void hc_dynamic_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    hc_target *first = arg; /* targets[first..first + BW_OUTLIER_MAX_SERVERS) of one upstream */
    bw_health *h = first->h;
    const bw_upstream_conf *u = &h->cfg->upstreams[first->up];
    bw_outlier_group *g = bw_shm_servers(h->shm, u->shm_slot);
    if (g == NULL)
        return;
    uint16_t idx[BW_OUTLIER_MAX_SERVERS];
    uint64_t seq = UINT64_MAX;
    int n = bw_outlier_members(g, &seq, idx);
    for (int i = 0; i < n; i++) {
        hc_target *t = &first[idx[i]];
        if (t->bev != NULL)
            continue;
        const bw_outlier_server *rec = &g->servers[idx[i]];
        uint32_t len = rec->addr_len <= sizeof(t->addr.ss) ? rec->addr_len : 0;
        memset(&t->addr, 0, sizeof(t->addr));
        memcpy(&t->addr.ss, &rec->addr, len);
        t->addr.len = (socklen_t)len;
        memcpy(t->label, rec->key, sizeof(t->label));
        t->label[sizeof(t->label) - 1] = '\0';
        if (atomic_load(&g->members_seq) != seq)
            return; /* rewritten meanwhile: the next interval checks the new set */
        hc_start(t);
    }
}

static void hc_stop_all(bw_health *h)
{
    for (size_t i = 0; i < h->n_targets; i++) {
        hc_target *t = &h->targets[i];
        if (t->bev)
            bufferevent_free(t->bev);
        if (t->every)
            event_free(t->every);
        if (t->deadline)
            event_free(t->deadline);
    }
    free(h->targets);
    h->targets = NULL;
    h->n_targets = 0;
    for (size_t i = 0; i < h->n_tls; i++)
        if (h->tls[i])
            SSL_CTX_free(h->tls[i]);
    free(h->tls);
    h->tls = NULL;
    h->n_tls = 0;
}

/* One target per server of every upstream with a health_check (per shared record for a
 * DNS-named one), each first checked at once, so that a server down at start is found within
 * one timeout, not one interval. */
static void hc_start_all(bw_health *h)
{
    size_t n = 0;
    for (size_t i = 0; i < h->cfg->n_upstreams; i++) {
        const bw_upstream_conf *u = &h->cfg->upstreams[i];
        if (u->health_check.enabled)
            n += u->dynamic ? BW_OUTLIER_MAX_SERVERS : u->n_servers;
    }
    if (n == 0)
        return;
    h->targets = calloc(n, sizeof(*h->targets));
    h->tls = calloc(h->cfg->n_upstreams, sizeof(*h->tls));
    if (h->targets == NULL || h->tls == NULL) {
        bw_log_error(h->log, "health checks: out of memory; no active checks");
        hc_stop_all(h);
        return;
    }
    h->n_tls = h->cfg->n_upstreams;
    for (size_t i = 0; i < h->cfg->n_upstreams; i++) {
        const bw_upstream_conf *u = &h->cfg->upstreams[i];
        char err[300];
        if (!u->health_check.enabled || !u->tls.enabled)
            continue;
        h->tls[i] = bw_upstream_tls_ctx_new(u, err, sizeof(err));
        if (h->tls[i] == NULL)
            bw_log_error(h->log, "upstream %s: health checks: %s", u->name, err);
    }
    size_t k = 0;
    for (size_t i = 0; i < h->cfg->n_upstreams; i++) {
        const bw_upstream_conf *u = &h->cfg->upstreams[i];
        if (!u->health_check.enabled)
            continue;
        size_t count = u->dynamic ? BW_OUTLIER_MAX_SERVERS : u->n_servers;
        for (size_t j = 0; j < count; j++) {
            hc_target *t = &h->targets[k++];
            h->n_targets = k;
            t->h = h;
            t->up = i;
            if (u->dynamic) {
                t->rec = (int)j;
            } else {
                t->rec = u->servers[j].shm_index;
                t->addr = u->servers[j].addr;
                snprintf(t->label, sizeof(t->label), "%s", u->servers[j].address);
            }
            t->deadline = evtimer_new(h->base, hc_deadline_cb, t);
            /* A literal server has its own timer; a DNS-named upstream one for all. */
            if (!u->dynamic || j == 0)
                t->every =
                    event_new(h->base, -1, EV_PERSIST, u->dynamic ? hc_dynamic_cb : hc_every_cb, t);
            if (t->deadline == NULL || ((!u->dynamic || j == 0) && t->every == NULL)) {
                bw_log_error(h->log, "health checks: out of memory; no active checks");
                hc_stop_all(h);
                return;
            }
            if (t->every) {
                uint32_t ms = u->health_check.interval_ms;
                struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
                event_add(t->every, &tv);
                event_active(t->every, EV_TIMEOUT, 0); /* the first check at once */
            }
        }
    }
}

bw_health *bw_health_new(struct event_base *base, bw_shm *shm, const bw_config *cfg, bw_log *log)
{
    bw_health *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return NULL;
    h->base = base;
    h->shm = shm;
    h->cfg = cfg;
    h->log = log;
    h->head = malloc(sizeof(*h->head));
    h->tick = event_new(base, -1, EV_PERSIST, health_tick_cb, h);
    if (h->tick == NULL || h->head == NULL) {
        bw_health_free(h);
        return NULL;
    }
    struct timeval tv = {0, BW_HEALTH_TICK_MS * 1000};
    event_add(h->tick, &tv);
    hc_start_all(h);
    return h;
}

void bw_health_set_config(bw_health *h, const bw_config *cfg)
{
    hc_stop_all(h);
    h->cfg = cfg;
    hc_start_all(h);
}

void bw_health_free(bw_health *h)
{
    if (h == NULL)
        return;
    hc_stop_all(h);
    if (h->tick)
        event_free(h->tick);
    free(h->head);
    free(h);
}
