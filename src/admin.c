/*
 * Admin listener, served by the master.
 *
 * Kept deliberately small: one request at a time per connection, bodies ignored, the whole
 * response built in memory (the endpoints answer in kilobytes). Requests are parsed by the same
 * strict parser as traffic, so a malformed probe gets a 400 rather than a guess. When
 * admin.token_env names a non-empty environment variable, every request must carry
 * "Authorization: Bearer <token>" or gets 401; the comparison takes constant time.
 */
#include "breakwater/admin.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <event2/bufferevent.h>
#include <event2/listener.h>

#include "breakwater/breaker.h"
#include "breakwater/metrics.h"
#include "breakwater/probes.h"

#define ADMIN_HEAD_MAX 16384
#define ADMIN_IDLE_SECONDS 30

struct bw_admin {
    struct event_base *base;
    struct evconnlistener *listener;
    bw_log *log;
    const bw_config *cfg;
    bw_admin_status_fn status;
    void *status_arg;
    const bw_shm *shm;
    bw_admin_reset_fn on_reset;
    void *on_reset_arg;
    struct admin_conn *conns;
};

typedef struct admin_conn {
    bw_admin *a;
    struct bufferevent *bev;
    struct admin_conn *next, *prev;
    bool closing;
} admin_conn;

static void conn_free(admin_conn *c)
{
    bw_admin *a = c->a;
    if (c->prev)
        c->prev->next = c->next;
    else
        a->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    bufferevent_free(c->bev);
    free(c);
}

static bool token_ok(const bw_admin *a, const bw_http_head *req)
{
    if (!a->cfg || !a->cfg->admin.token_env)
        return true;
    const char *token = getenv(a->cfg->admin.token_env);
    if (!token || !*token)
        return true;
    size_t tlen = strlen(token);
    for (size_t i = 0; i < req->n_headers; i++) {
        const bw_http_header *h = &req->headers[i];
        if (!bw_http_name_eq(h->name, h->name_len, "authorization"))
            continue;
        if (h->value_len != 7 + tlen || strncasecmp(h->value, "Bearer ", 7) != 0)
            return false;
        unsigned char diff = 0;
        for (size_t k = 0; k < tlen; k++)
            diff |= (unsigned char)(h->value[7 + k] ^ token[k]);
        return diff == 0;
    }
    return false;
}

static bool path_is(const bw_http_head *req, const char *path)
{
    size_t n = strlen(path);
    size_t tl = req->target_len;
    const char *q = memchr(req->target, '?', tl);
    if (q)
        tl = (size_t)(q - req->target);
    return tl == n && memcmp(req->target, path, n) == 0;
}

int bw_admin_respond(bw_admin *a, const bw_http_head *req, struct evbuffer *body,
                     const char **content_type)
{
    *content_type = "application/json";
    if (!token_ok(a, req)) {
        evbuffer_add_printf(body, "{\"error\":\"unauthorized\"}\n");
        return 401;
    }
    bw_master_status st = {0};
    if (a->status)
        a->status(a->status_arg, &st);
    bool get = req->method == BW_METHOD_GET || req->method == BW_METHOD_HEAD;

    if (path_is(req, "/healthz")) {
        if (!get)
            goto method;
        *content_type = "text/plain";
        if (st.workers_alive == 0) {
            evbuffer_add_printf(body, "no worker running\n");
            return 503;
        }
        evbuffer_add_printf(body, "ok\n");
        return 200;
    }
    if (!a->cfg || !a->shm) {
        evbuffer_add_printf(body, "{\"error\":\"not configured\"}\n");
        return 503;
    }
    if (path_is(req, "/readyz")) {
        if (!get)
            goto method;
        return bw_probes_readyz(a->shm, a->cfg, st.draining, bw_probes_wall_ms(), body);
    }
    if (path_is(req, "/metrics")) {
        if (!get)
            goto method;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        bw_metrics_master mm = {
            .worker_restarts = st.worker_restarts,
            .reloads_success = st.reloads_ok,
            .reloads_failure = st.reloads_failed,
            .redis_pending_deltas = st.redis_pending_deltas,
        };
        *content_type = "text/plain; version=0.0.4; charset=utf-8";
        bw_metrics_render(a->shm, a->cfg, &mm,
                          (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u,
                          bw_probes_wall_ms(), body);
        return 200;
    }
    if (path_is(req, "/upstreams")) {
        if (!get)
            goto method;
        bw_probes_upstreams_json(a->shm, a->cfg, bw_probes_wall_ms(), body);
        return 200;
    }
    if (req->target_len > 11 && memcmp(req->target, "/upstreams/", 11) == 0) {
        const char *name = req->target + 11;
        const char *end = req->target + req->target_len;
        const char *slash = memchr(name, '/', (size_t)(end - name));
        if (!slash || (size_t)(end - slash) != 6 || memcmp(slash, "/reset", 6) != 0)
            goto not_found;
        const bw_upstream_conf *u = NULL;
        for (size_t i = 0; i < a->cfg->n_upstreams; i++) {
            const bw_upstream_conf *c = &a->cfg->upstreams[i];
            if (strlen(c->name) == (size_t)(slash - name) &&
                memcmp(c->name, name, (size_t)(slash - name)) == 0)
                u = c;
        }
        if (!u) {
            evbuffer_add_printf(body, "{\"error\":\"unknown upstream\"}\n");
            return 404;
        }
        if (req->method != BW_METHOD_POST)
            goto method;
        uint64_t now = bw_probes_wall_ms();
        bw_breaker_transition t = {0};
        bw_breaker_reset(bw_shm_breaker(a->shm, u->shm_slot), now, &t);
        if (t.happened)
            bw_log_info(a->log, "breaker %s: reset by the operator (%s -> closed)", u->name,
                        bw_breaker_state_name(t.from));
        else
            bw_log_info(a->log, "breaker %s: reset by the operator (was closed)", u->name);
        if (a->on_reset)
            a->on_reset(a->on_reset_arg, u->name);
        bw_probes_upstream_json(a->shm, u, now, body);
        evbuffer_add(body, "\n", 1);
        return 200;
    }
not_found:
    evbuffer_add_printf(body, "{\"error\":\"not found\"}\n");
    return 404;
method:
    evbuffer_add_printf(body, "{\"error\":\"method not allowed\"}\n");
    return 405;
}

static void send_response(admin_conn *c, const bw_http_head *req, int status,
                          const char *content_type, struct evbuffer *body, bool close_conn)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    evbuffer_add_printf(out,
                        "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                        "Cache-Control: no-store\r\n%s%s\r\n",
                        status, bw_http_reason(status), content_type,
                        evbuffer_get_length(body),
                        status == 401 ? "WWW-Authenticate: Bearer\r\n" : "",
                        close_conn ? "Connection: close\r\n" : "");
    if (!(req && req->method == BW_METHOD_HEAD))
        evbuffer_add_buffer(out, body);
    if (close_conn) {
        c->closing = true;
        bufferevent_disable(c->bev, EV_READ);
    }
}

static void admin_read_cb(struct bufferevent *bev, void *arg)
{
    admin_conn *c = arg;
    bw_admin *a = c->a;
    struct evbuffer *in = bufferevent_get_input(bev);
    while (!c->closing) {
        size_t len = evbuffer_get_length(in);
        if (len == 0)
            return;
        size_t window = len < ADMIN_HEAD_MAX ? len : ADMIN_HEAD_MAX;
        const char *p = (const char *)evbuffer_pullup(in, (ev_ssize_t)window);
        size_t head_len = bw_http_head_length(p, window);
        struct evbuffer *body = evbuffer_new();
        if (!body) {
            conn_free(c);
            return;
        }
        if (head_len == 0) {
            if (len >= ADMIN_HEAD_MAX) {
                evbuffer_add_printf(body, "{\"error\":\"request header fields too large\"}\n");
                send_response(c, NULL, 431, "application/json", body, true);
            }
            evbuffer_free(body);
            return;
        }
        bw_http_head *req = malloc(sizeof(*req));
        if (!req) {
            evbuffer_free(body);
            conn_free(c);
            return;
        }
        bw_http_status st = bw_http_parse_request(p, head_len, 64, req);
        if (st != BW_HTTP_OK) {
            evbuffer_add_printf(body, "{\"error\":\"bad request\"}\n");
            send_response(c, NULL, (int)st, "application/json", body, true);
        } else if (req->framing != BW_BODY_NONE) {
            /* No admin endpoint takes a body; refusing keeps the framing trivially safe. */
            evbuffer_add_printf(body, "{\"error\":\"request body not accepted\"}\n");
            send_response(c, req, 413, "application/json", body, true);
        } else {
            const char *ct;
            int status = bw_admin_respond(a, req, body, &ct);
            send_response(c, req, status, ct, body, req->conn_close);
        }
        free(req);
        evbuffer_free(body);
        evbuffer_drain(in, head_len);
    }
}

static void admin_write_cb(struct bufferevent *bev, void *arg)
{
    admin_conn *c = arg;
    if (c->closing && evbuffer_get_length(bufferevent_get_output(bev)) == 0)
        conn_free(c);
}

static void admin_event_cb(struct bufferevent *bev, short what, void *arg)
{
    (void)bev;
    (void)what;
    conn_free(arg);
}

static void admin_accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
                            int salen, void *arg)
{
    (void)l;
    (void)sa;
    (void)salen;
    bw_admin *a = arg;
    admin_conn *c = calloc(1, sizeof(*c));
    if (!c) {
        evutil_closesocket(fd);
        return;
    }
    c->a = a;
    c->bev = bufferevent_socket_new(a->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (!c->bev) {
        evutil_closesocket(fd);
        free(c);
        return;
    }
    c->next = a->conns;
    if (a->conns)
        a->conns->prev = c;
    a->conns = c;
    struct timeval idle = {ADMIN_IDLE_SECONDS, 0};
    bufferevent_set_timeouts(c->bev, &idle, &idle);
    bufferevent_setwatermark(c->bev, EV_READ, 0, ADMIN_HEAD_MAX + 1024);
    bufferevent_setcb(c->bev, admin_read_cb, admin_write_cb, admin_event_cb, c);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
}

void bw_admin_on_reset(bw_admin *a, bw_admin_reset_fn fn, void *arg)
{
    a->on_reset = fn;
    a->on_reset_arg = arg;
}

bw_admin *bw_admin_new(struct event_base *base, int fd, bw_log *log, const bw_shm *shm,
                       bw_admin_status_fn status, void *status_arg)
{
    bw_admin *a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    a->base = base;
    a->log = log;
    a->status = status;
    a->status_arg = status_arg;
    a->shm = shm;
    if (fd >= 0) {
        a->listener = evconnlistener_new(base, admin_accept_cb, a, LEV_OPT_CLOSE_ON_FREE, -1, fd);
        if (!a->listener) {
            free(a);
            return NULL;
        }
    }
    return a;
}

void bw_admin_set_config(bw_admin *a, const bw_config *cfg)
{
    a->cfg = cfg;
}

int bw_admin_fd(const bw_admin *a)
{
    return a && a->listener ? (int)evconnlistener_get_fd(a->listener) : -1;
}

void bw_admin_free(bw_admin *a)
{
    if (!a)
        return;
    if (a->listener)
        evconnlistener_free(a->listener);
    while (a->conns)
        conn_free(a->conns);
    free(a);
}
