/*
 * Admin listener, served by libevhtp on the master's event loop.
 *
 * libevhtp parses the admin requests and writes the replies; everything it does not defend
 * against by itself (shared/KNOWN-DEFECTS.md, docs/architecture.md) is handled here, around it:
 *   - a header deadline: a connection must deliver a complete request head within
 *     limits.header_timeout_ms of being accepted or of its previous response, else it gets a
 *     408 and is closed (libevhtp has only idle timeouts, which a slow drip keeps resetting);
 *   - header count and size limits (limits.max_headers, limits.max_header_bytes), checked per
 *     header as libevhtp parses them, since it has none;
 *   - the head gate: libevhtp only ever parses complete heads (it misreads one split across two
 *     reads), and the input it may see is bounded;
 *   - a connection cap (admin.max_connections): at the cap the listener is disabled, so further
 *     connections wait in the kernel's accept queue instead of being accepted and dropped;
 *   - one request at a time: once a request is complete the connection is paused (nothing more
 *     is read or parsed) and resumed only after the reply has left the output buffer, so a
 *     pipelined flood costs at most one response of memory per connection;
 *   - bodies are refused from the declared framing before any is read: Content-Length above 0
 *     or any Transfer-Encoding is a 413, several Content-Length fields a 400, an Expect other
 *     than 100-continue a 417; 100 Continue is never sent (no endpoint takes a body);
 *   - accept errors (EMFILE, ENFILE, ENOBUFS) pause accepting for 100 ms instead of spinning,
 *     are counted (breakwater_accept_errors_total{listener="admin"}) and logged at most once a
 *     second.
 * Refusals decided from the head are written straight to the socket (the output buffer is
 * empty then, by the one-request rule) and the connection is closed.
 * With admin.token_env set, every endpoint but /healthz, /readyz and the status page's HTML
 * needs "Authorization: Bearer <token>"; refusals are logged at warn with the peer and counted.
 */
#include "breakwater/admin.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/bufferevent.h>
#include <event2/listener.h>
/* evhtp.h declares a hook type with an empty parameter list. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <evhtp.h>
#pragma GCC diagnostic pop

#include "breakwater/breaker.h"
#include "breakwater/clientip.h"
#include "breakwater/http.h"
#include "breakwater/metrics.h"
#include "breakwater/probes.h"
#include "breakwater/ratelimit.h"
#include "breakwater/topkeys.h"

/* The status page, embedded at build time from src/admin_page.html (scripts/embed.py). */
extern const unsigned char bw_admin_page[];
extern const size_t bw_admin_page_len;

#define ADMIN_IO_TIMEOUT_S 30
#define ACCEPT_PAUSE_MS 100
#define ADMIN_KEY_MAX 256

typedef struct admin_conn admin_conn;

struct bw_admin {
    struct event_base *base;
    bw_log *log;
    const bw_config *cfg;
    bw_admin_status_fn status;
    void *status_arg;
    const bw_shm *shm;
    bw_admin_hooks hooks;
    evhtp_t *htp;
    struct evconnlistener *lev;
    struct event *resume_ev; /* re-enables accepting after an accept error */
    bool accept_paused;
    bool at_cap;
    uint32_t n_conns;
    uint64_t accept_errors;
    uint64_t auth_failures;
    uint64_t last_accept_log_ms;
    admin_conn *conns;
};

struct admin_conn {
    bw_admin *a;
    evhtp_connection_t *conn;
    struct event *deadline; /* header deadline */
    struct event *reply_ev; /* sends the deferred reply */
    evhtp_request_t *req;   /* the request whose reply is pending */
    uint32_t n_headers;
    size_t header_bytes;
    int status;
    const char *ctype;
    bool www_auth;
    bool served; /* a response was sent: the connection is a kept-alive one */
    /* libevhtp's own bufferevent callbacks, called through the head gate (head_gate_read). */
    bufferevent_data_cb lib_read, lib_write;
    bufferevent_event_cb lib_event;
    void *lib_arg;
    char peer[64];
    admin_conn *next, *prev;
};

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint32_t max_conns(const bw_admin *a)
{
    return a->cfg && a->cfg->admin.max_connections ? a->cfg->admin.max_connections : 64;
}

/* Accepting is on unless paused after an error or at the connection cap. */
static void update_listener(bw_admin *a)
{
    if (!a->lev)
        return;
    a->at_cap = a->n_conns >= max_conns(a);
    if (a->accept_paused || a->at_cap)
        evconnlistener_disable(a->lev);
    else
        evconnlistener_enable(a->lev);
}

static void arm_deadline(admin_conn *c)
{
    uint32_t ms = c->a->cfg ? c->a->cfg->limits.header_timeout_ms : 10000;
    if (ms == 0)
        ms = 10000;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    c->n_headers = 0;
    c->header_bytes = 0;
    evtimer_add(c->deadline, &tv);
}

/* Writes a short refusal directly to the socket (nothing else is queued: one request at a
 * time), before the connection is closed. */
static void raw_refusal(admin_conn *c, int status, const char *msg)
{
    char buf[256];
    char body[128];
    int bl = snprintf(body, sizeof(body), "{\"error\":\"%s\"}\n", msg);
    int n = snprintf(buf, sizeof(buf),
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     "Connection: close\r\n\r\n%s",
                     status, bw_http_reason(status), bl, body);
    if (n > 0 && c->conn->sock >= 0)
        (void)send(c->conn->sock, buf, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
    bw_log_debug(c->a->log, "admin: %s: %d %s", c->peer, status, msg);
}

static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    admin_conn *c = arg;
    /* A kept-alive connection that went quiet is closed without a word (a 408 could cross the
     * client's next request); a first request that is too slow learns why. */
    if (!c->served)
        raw_refusal(c, 408, "request header timeout");
    evhtp_connection_free(c->conn); /* runs conn_fini, which frees c */
}

/*
 * The head gate. libevhtp 1.2.18 misreads a request line or header that is split across two
 * reads (upstream issue #128: a path cut in two routes as its first half). Its read callback is
 * therefore only called once the input holds a complete head (a blank line), or more bytes than
 * a head may have (then refused with 431 here). The input is bounded by a read high-water mark,
 * so bytes that arrive meanwhile wait in the kernel.
 */
static void head_gate_read(struct bufferevent *bev, void *arg)
{
    admin_conn *c = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    size_t len = evbuffer_get_length(in);
    size_t max = c->a->cfg ? c->a->cfg->limits.max_header_bytes : 32768;
    bool complete = evbuffer_search(in, "\n\r\n", 3, NULL).pos >= 0 ||
                    evbuffer_search(in, "\n\n", 2, NULL).pos >= 0;
    if (!complete && len > max) {
        raw_refusal(c, 431, "request header fields too large");
        evhtp_connection_free(c->conn); /* runs conn_fini, which frees c */
        return;
    }
    if (complete)
        c->lib_read(bev, c->lib_arg);
}

static void head_gate_write(struct bufferevent *bev, void *arg)
{
    admin_conn *c = arg;
    if (c->lib_write)
        c->lib_write(bev, c->lib_arg);
}

static void head_gate_event(struct bufferevent *bev, short what, void *arg)
{
    admin_conn *c = arg;
    if (c->lib_event)
        c->lib_event(bev, what, c->lib_arg);
}

static evhtp_res conn_fini(evhtp_connection_t *conn, void *arg)
{
    admin_conn *c = arg;
    /* libevhtp frees the connection's last request after this hook: it must not reach c. */
    evhtp_connection_unset_hook(conn, evhtp_hook_on_request_fini);
    if (conn->request)
        evhtp_request_unset_hook(conn->request, evhtp_hook_on_request_fini);
    bw_admin *a = c->a;
    if (c->prev)
        c->prev->next = c->next;
    else
        a->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    event_free(c->deadline);
    event_free(c->reply_ev);
    free(c);
    if (a->n_conns > 0)
        a->n_conns--;
    update_listener(a);
    return EVHTP_RES_OK;
}

static evhtp_res on_header(evhtp_request_t *req, evhtp_header_t *h, void *arg)
{
    (void)req;
    admin_conn *c = arg;
    const bw_config *cfg = c->a->cfg;
    uint32_t max_headers = cfg ? cfg->limits.max_headers : 100;
    uint32_t max_bytes = cfg ? cfg->limits.max_header_bytes : 32768;
    c->n_headers++;
    c->header_bytes += h->klen + h->vlen + 4;
    /* libevhtp drops a connection with an unparsable Content-Length without a word. */
    if (h->klen == 14 && strncasecmp(h->key, "content-length", 14) == 0) {
        bool digits = h->vlen > 0 && h->vlen <= 18;
        for (size_t i = 0; digits && i < h->vlen; i++)
            digits = h->val[i] >= '0' && h->val[i] <= '9';
        if (!digits) {
            raw_refusal(c, 400, "invalid Content-Length");
            return EVHTP_RES_ERROR;
        }
    }
    if (c->n_headers > max_headers || c->header_bytes > max_bytes) {
        raw_refusal(c, 431, "request header fields too large");
        return EVHTP_RES_ERROR;
    }
    return EVHTP_RES_OK;
}

static int count_header(evhtp_headers_t *hs, const char *name, const char **first)
{
    int n = 0;
    evhtp_header_t *h;
    *first = NULL;
    TAILQ_FOREACH(h, hs, next)
    {
        if (h->klen == strlen(name) && strncasecmp(h->key, name, h->klen) == 0) {
            if (!*first)
                *first = h->val;
            n++;
        }
    }
    return n;
}

/* The head is complete: the deadline is met, and the framing decides whether to go on. */
static evhtp_res on_headers(evhtp_request_t *req, evhtp_headers_t *hs, void *arg)
{
    admin_conn *c = arg;
    evtimer_del(c->deadline);
    const char *cl, *te, *expect;
    int ncl = count_header(hs, "content-length", &cl);
    int nte = count_header(hs, "transfer-encoding", &te);
    int nexp = count_header(hs, "expect", &expect);
    htparser *hp = req->conn->parser;
    if (htparser_get_major(hp) != 1 || htparser_get_minor(hp) > 1) {
        raw_refusal(c, 505, "HTTP version not supported");
        return EVHTP_RES_ERROR;
    }
    if (ncl > 1) {
        raw_refusal(c, 400, "several Content-Length fields");
        return EVHTP_RES_ERROR;
    }
    if (nte > 0) {
        raw_refusal(c, 413, "request body not accepted");
        return EVHTP_RES_ERROR;
    }
    if (ncl == 1) {
        const char *p = cl;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p < '0' || *p > '9') {
            raw_refusal(c, 400, "invalid Content-Length");
            return EVHTP_RES_ERROR;
        }
        bool zero = true;
        for (; *p >= '0' && *p <= '9'; p++)
            zero = zero && *p == '0';
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p != '\0') {
            raw_refusal(c, 400, "invalid Content-Length");
            return EVHTP_RES_ERROR;
        }
        if (!zero) {
            raw_refusal(c, 413, "request body not accepted");
            return EVHTP_RES_ERROR;
        }
    }
    if (nexp > 0 && strcasecmp(expect, "100-continue") != 0) {
        raw_refusal(c, 417, "expectation not supported");
        return EVHTP_RES_ERROR;
    }
    return EVHTP_RES_OK;
}

/* ---- endpoints ---- */

static bw_admin_method method_of(evhtp_request_t *req)
{
    switch (evhtp_request_get_method(req)) {
    case htp_method_GET:
        return BW_ADMIN_GET;
    case htp_method_HEAD:
        return BW_ADMIN_HEAD;
    case htp_method_POST:
        return BW_ADMIN_POST;
    case htp_method_DELETE:
        return BW_ADMIN_DELETE;
    default:
        return BW_ADMIN_OTHER;
    }
}

static void json_string(struct evbuffer *out, const char *s)
{
    evbuffer_add(out, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            evbuffer_add_printf(out, "\\%c", *p);
        else if (*p < 0x20 || *p >= 0x7f)
            evbuffer_add_printf(out, "\\u%04x", *p);
        else
            evbuffer_add(out, p, 1);
    }
    evbuffer_add(out, "\"", 1);
}

static const bw_upstream_conf *find_upstream(const bw_admin *a, const char *name)
{
    int i = bw_config_find_upstream(a->cfg, name);
    return i < 0 ? NULL : &a->cfg->upstreams[i];
}

static const bw_ratelimit_conf *find_policy(const bw_admin *a, const char *name)
{
    for (size_t i = 0; i < a->cfg->n_rate_limits; i++)
        if (strcmp(a->cfg->rate_limits[i].name, name) == 0)
            return &a->cfg->rate_limits[i];
    return NULL;
}

static uint64_t policy_rejected(const bw_admin *a, int slot)
{
    uint64_t sum = 0;
    for (uint32_t w = 0; w < a->shm->hdr->n_worker_slots; w++) {
        _Atomic uint64_t *cell = bw_shm_rate_limited_cell(a->shm, (int)w, slot);
        if (cell)
            sum += atomic_load_explicit(cell, memory_order_relaxed);
    }
    return sum;
}

/* Tokens a key has now: what it had at its last decision plus the refill since. */
static uint32_t tokens_now(const bw_ratelimit_conf *pc, const bw_topkeys_entry *e, uint64_t now)
{
    double t = e->remaining;
    if (pc->refill_per_sec > 0 && now > e->seen_ns)
        t += (double)(now - e->seen_ns) / 1e9 * pc->refill_per_sec;
    if (t > pc->capacity)
        t = pc->capacity;
    return (uint32_t)floor(t);
}

static void policy_json(const bw_admin *a, const bw_ratelimit_conf *pc, uint32_t top,
                        struct evbuffer *out)
{
    bw_topkeys_entry e[BW_ADMIN_TOP_MAX];
    size_t n = 0;
    bw_topkeys *tk = bw_shm_topkeys(a->shm, pc->shm_slot);
    if (tk)
        n = bw_topkeys_top(tk, e, top);
    uint64_t now = mono_ns();
    evbuffer_add_printf(out, "{\"policy\":");
    json_string(out, pc->name);
    evbuffer_add_printf(out,
                        ",\"key\":\"%s\",\"capacity\":%" PRIu32 ",\"refill_per_sec\":%g,"
                        "\"dry_run\":%s,\"rejected\":%" PRIu64 ",\"exempt\":%zu,\"top\":[",
                        pc->key_kind == BW_RL_KEY_CLIENT_IP ? "client_ip" : "header", pc->capacity,
                        pc->refill_per_sec, pc->dry_run ? "true" : "false",
                        policy_rejected(a, pc->shm_slot), pc->n_exempt);
    for (size_t i = 0; i < n; i++) {
        evbuffer_add_printf(out, "%s{\"key\":", i ? "," : "");
        json_string(out, e[i].text);
        evbuffer_add_printf(
            out, ",\"tokens\":%" PRIu32 ",\"rejected\":%" PRIu64 ",\"consumed\":%" PRIu64 "}",
            tokens_now(pc, &e[i], now), e[i].rejected, e[i].consumed);
    }
    evbuffer_add_printf(out, "]}");
}

/* The table hash of a key as the operator writes it: the text /ratelimits showed, an address
 * (client_ip policies; IPv6 with or without its /prefix), or a header value. */
static bool key_hash_of(const bw_admin *a, const bw_ratelimit_conf *pc, const char *key,
                        uint64_t *hash)
{
    bw_topkeys_entry e;
    bw_topkeys *tk = bw_shm_topkeys(a->shm, pc->shm_slot);
    if (tk && bw_topkeys_find_text(tk, key, &e)) {
        *hash = e.hash;
        return true;
    }
    const bw_ratelimit_seed *seed = &a->shm->hdr->rl_seed;
    if (pc->key_kind == BW_RL_KEY_HEADER) {
        *hash = bw_ratelimit_hash(seed, key, strlen(key));
        return true;
    }
    char addr[BW_CLIENTIP_TEXT_LEN];
    if (strlen(key) >= sizeof(addr))
        return false;
    memcpy(addr, key, strlen(key) + 1);
    char *slash = strchr(addr, '/');
    if (slash)
        *slash = '\0';
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, addr, &v4->sin_addr) == 1)
        v4->sin_family = AF_INET;
    else if (inet_pton(AF_INET6, addr, &v6->sin6_addr) == 1)
        v6->sin6_family = AF_INET6;
    else
        return false;
    bw_clientip ip;
    bw_clientip_key((const struct sockaddr *)&ss, NULL, 0, NULL, 0, pc->ipv6_prefix, &ip);
    *hash = bw_ratelimit_hash(seed, ip.key, sizeof(ip.key));
    return true;
}

static void status_json(bw_admin *a, const bw_master_status *st, struct evbuffer *out)
{
    const bw_shm *shm = a->shm;
    uint64_t requests = 0, errors5xx = 0, upstream_errors = 0, rate_limited = 0, rejected = 0;
    for (uint32_t w = 0; w < shm->hdr->n_worker_slots; w++) {
        for (int r = -1; r < (int)shm->hdr->n_route_slots; r++) {
            _Atomic uint64_t *row = bw_shm_requests_row(shm, (int)w, r);
            if (!row)
                continue;
            for (int code = 0; code < BW_METRICS_CODES; code++) {
                uint64_t v = atomic_load_explicit(&row[code], memory_order_relaxed);
                requests += v;
                if (code + 100 >= 500)
                    errors5xx += v;
            }
        }
        for (uint32_t u = 0; u < shm->hdr->n_upstream_slots; u++) {
            bw_upstream_counters *uc = bw_shm_upstream_counters(shm, (int)w, (int)u);
            for (int k = 0; uc && k < BW_UPERR_KINDS; k++)
                upstream_errors += atomic_load_explicit(&uc->errors[k], memory_order_relaxed);
        }
        for (uint32_t p = 0; p < shm->hdr->n_policy_slots; p++) {
            _Atomic uint64_t *cell = bw_shm_rate_limited_cell(shm, (int)w, (int)p);
            if (cell)
                rate_limited += atomic_load_explicit(cell, memory_order_relaxed);
        }
    }
    for (uint32_t u = 0; u < shm->hdr->n_upstream_slots; u++)
        rejected +=
            atomic_load_explicit(&bw_shm_breaker(shm, (int)u)->rejected, memory_order_relaxed);
    uint64_t now = bw_probes_wall_ms();
    char started[96], ts[96], synced[112];
    bw_probes_iso8601(st->started_wall_ms, started, sizeof(started));
    bw_probes_iso8601(now, ts, sizeof(ts));
    const bw_shm_status *ss = &shm->hdr->status;
    uint64_t last = atomic_load_explicit(&ss->redis_last_sync_ms, memory_order_relaxed);
    if (last) {
        char iso[96];
        bw_probes_iso8601(last, iso, sizeof(iso));
        snprintf(synced, sizeof(synced), "\"%s\"", iso);
    } else {
        snprintf(synced, sizeof(synced), "null");
    }
    evbuffer_add_printf(
        out,
        "{\"version\":\"%s\",\"timestamp\":\"%s\",\"started_at\":\"%s\",\"uptime_seconds\":%" PRIu64
        ",\"workers\":{\"expected\":%" PRIu32 ",\"alive\":%" PRIu32 ",\"restarts\":%" PRIu64
        "},\"draining\":%s,\"reloads\":{\"success\":%" PRIu64 ",\"failure\":%" PRIu64
        "},\"redis\":{\"configured\":%s,\"up\":%s,\"required\":%s,\"last_sync\":%s,"
        "\"errors\":%" PRIu64 "},\"totals\":{\"requests\":%" PRIu64 ",\"responses_5xx\":%" PRIu64
        ",\"upstream_errors\":%" PRIu64 ",\"rate_limited\":%" PRIu64
        ",\"breaker_rejected\":%" PRIu64 "}}\n",
        BW_VERSION, ts, started, now > st->started_wall_ms ? (now - st->started_wall_ms) / 1000 : 0,
        st->workers_expected, st->workers_alive, st->worker_restarts,
        st->draining ? "true" : "false", st->reloads_ok, st->reloads_failed,
        atomic_load_explicit(&ss->redis_configured, memory_order_relaxed) ? "true" : "false",
        atomic_load_explicit(&ss->redis_up, memory_order_relaxed) ? "true" : "false",
        atomic_load_explicit(&ss->redis_required, memory_order_relaxed) ? "true" : "false", synced,
        atomic_load_explicit(&ss->redis_errors, memory_order_relaxed), requests, errors5xx,
        upstream_errors, rate_limited, rejected);
}

static int error_body(struct evbuffer *body, int status, const char *msg)
{
    evbuffer_add_printf(body, "{\"error\":\"%s\"}\n", msg);
    return status;
}

/* Builds the reply of a complete request into body; returns its status. */
static int respond(admin_conn *c, evhtp_request_t *req, struct evbuffer *body)
{
    bw_admin *a = c->a;
    c->ctype = "application/json";
    c->www_auth = false;
    const char *path =
        req->uri && req->uri->path && req->uri->path->full ? req->uri->path->full : "/";
    const char *query = req->uri && req->uri->query_raw ? (const char *)req->uri->query_raw : "";
    bw_admin_method m = method_of(req);
    bw_admin_route r;
    bool found = bw_admin_route_match(m, path, strlen(path), &r);

    const char *token_env = a->cfg ? a->cfg->admin.token_env : NULL;
    const char *token = token_env ? getenv(token_env) : NULL;
    if (token && *token && !(found && bw_admin_route_public(&r))) {
        const char *auth = evhtp_header_find(req->headers_in, "authorization");
        if (!bw_admin_token_matches(token, auth)) {
            a->auth_failures++;
            static const char *const names[] = {"GET", "HEAD", "POST", "DELETE", "request"};
            bw_log_warn(a->log, "admin: refused %s %s from %s: %s", names[m], path, c->peer,
                        auth ? "wrong token" : "no token");
            c->www_auth = true;
            return error_body(body, 401, "unauthorized");
        }
    }
    if (!found)
        return error_body(body, 404, "not found");
    if (!r.method_ok)
        return error_body(body, 405, "method not allowed");

    bw_master_status st = {0};
    if (a->status)
        a->status(a->status_arg, &st);
    if (r.id == BW_ADMIN_R_HEALTHZ) {
        c->ctype = "text/plain";
        if (st.workers_alive == 0) {
            evbuffer_add_printf(body, "no worker running\n");
            return 503;
        }
        evbuffer_add_printf(body, "ok\n");
        return 200;
    }
    if (r.id == BW_ADMIN_R_PAGE) {
        c->ctype = "text/html; charset=utf-8";
        evbuffer_add(body, bw_admin_page, bw_admin_page_len);
        return 200;
    }
    if (!a->cfg || !a->shm)
        return error_body(body, 503, "not configured");

    char name[BW_SHM_NAME_MAX], key[ADMIN_KEY_MAX];
    if (r.name && bw_admin_unescape(r.name, r.name_len, name, sizeof(name)) < 0)
        return error_body(body, 404, "not found");
    uint64_t now = bw_probes_wall_ms();
    switch (r.id) {
    case BW_ADMIN_R_READYZ:
        return bw_probes_readyz(a->shm, a->cfg, st.draining, now, body);
    case BW_ADMIN_R_METRICS: {
        bw_metrics_master mm = {
            .worker_restarts = st.worker_restarts,
            .reloads_success = st.reloads_ok,
            .reloads_failure = st.reloads_failed,
            .redis_pending_deltas = st.redis_pending_deltas,
            .admin_accept_errors = a->accept_errors,
            .admin_auth_failures = a->auth_failures,
        };
        c->ctype = "text/plain; version=0.0.4; charset=utf-8";
        bw_metrics_render(a->shm, a->cfg, &mm, mono_ms(), now, body);
        return 200;
    }
    case BW_ADMIN_R_STATUS:
        status_json(a, &st, body);
        return 200;
    case BW_ADMIN_R_UPSTREAMS:
        bw_probes_upstreams_json(a->shm, a->cfg, now, body);
        return 200;
    case BW_ADMIN_R_UPSTREAM_RESET:
    case BW_ADMIN_R_UPSTREAM_OPEN: {
        const bw_upstream_conf *u = find_upstream(a, name);
        if (!u)
            return error_body(body, 404, "unknown upstream");
        bw_breaker *b = bw_shm_breaker(a->shm, u->shm_slot);
        bw_breaker_transition t = {0};
        if (r.id == BW_ADMIN_R_UPSTREAM_OPEN) {
            uint64_t mono = bw_breaker_now_ms(); /* breakers run on the monotonic clock */
            bool first = bw_breaker_force_open(b, &u->breaker, mono, mono, &t);
            bw_log_info(a->log, "breaker %s: forced open by the operator from %s%s", u->name,
                        c->peer, first ? "" : " (already forced)");
            if (a->hooks.open)
                a->hooks.open(a->hooks.arg, u->name);
        } else {
            bool was_forced = bw_breaker_is_forced(b);
            bw_breaker_reset(b, bw_breaker_now_ms(), &t);
            bw_log_info(a->log, "breaker %s: reset by the operator from %s (%s -> closed)%s",
                        u->name, c->peer, t.happened ? bw_breaker_state_name(t.from) : "closed",
                        was_forced ? ", no longer forced" : "");
            if (a->hooks.reset)
                a->hooks.reset(a->hooks.arg, u->name);
        }
        bw_probes_upstream_json(a->shm, u, now, body);
        evbuffer_add(body, "\n", 1);
        return 200;
    }
    case BW_ADMIN_R_RATELIMITS: {
        evbuffer_add_printf(body, "{\"policies\":[");
        for (size_t i = 0; i < a->cfg->n_rate_limits; i++) {
            if (i)
                evbuffer_add(body, ",", 1);
            policy_json(a, &a->cfg->rate_limits[i], 5, body);
        }
        evbuffer_add_printf(body, "]}\n");
        return 200;
    }
    case BW_ADMIN_R_RATELIMIT_TOP: {
        const bw_ratelimit_conf *pc = find_policy(a, name);
        if (!pc)
            return error_body(body, 404, "unknown rate-limit policy");
        uint32_t top;
        if (bw_admin_parse_top(query, strlen(query), &top) < 0)
            return error_body(body, 400, "top must be an integer from 1 to 64");
        policy_json(a, pc, top, body);
        evbuffer_add(body, "\n", 1);
        return 200;
    }
    case BW_ADMIN_R_RATELIMIT_KEY: {
        const bw_ratelimit_conf *pc = find_policy(a, name);
        if (!pc)
            return error_body(body, 404, "unknown rate-limit policy");
        uint64_t hash;
        if (bw_admin_unescape(r.arg, r.arg_len, key, sizeof(key)) < 0 ||
            !key_hash_of(a, pc, key, &hash))
            return error_body(body, 400, "not a key of this policy");
        bool had = bw_ratelimit_refill(bw_shm_ratelimit(a->shm), (uint32_t)pc->shm_slot, hash);
        bw_topkeys *tk = bw_shm_topkeys(a->shm, pc->shm_slot);
        bw_topkeys_entry e;
        char fleet_key[BW_TOPKEYS_TEXT_MAX + 1];
        snprintf(fleet_key, sizeof(fleet_key), "%.*s", BW_TOPKEYS_TEXT_MAX, key);
        if (tk && bw_topkeys_find_text(tk, key, &e))
            snprintf(fleet_key, sizeof(fleet_key), "%s", e.text);
        else if (pc->key_kind == BW_RL_KEY_HEADER)
            bw_ratelimit_fleet_key_text(key, strlen(key), true, fleet_key);
        if (tk)
            bw_topkeys_forget(tk, hash);
        bw_log_info(a->log, "rate limit %s: key %s refilled by the operator from %s", pc->name,
                    fleet_key, c->peer);
        if (a->hooks.ratelimit_delete)
            a->hooks.ratelimit_delete(a->hooks.arg, pc->name, fleet_key);
        evbuffer_add_printf(body, "{\"policy\":");
        json_string(body, pc->name);
        evbuffer_add_printf(body, ",\"key\":");
        json_string(body, fleet_key);
        evbuffer_add_printf(body, ",\"refilled\":true,\"was_tracked\":%s}\n",
                            had ? "true" : "false");
        return 200;
    }
    default:
        return error_body(body, 404, "not found");
    }
}

/* Sends the reply prepared by gencb, after the current read callback has returned. */
static void reply_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    admin_conn *c = arg;
    evhtp_request_t *req = c->req;
    c->req = NULL;
    if (!req)
        return;
    evhtp_headers_add_header(req->headers_out, evhtp_header_new("Content-Type", c->ctype, 0, 0));
    evhtp_headers_add_header(req->headers_out, evhtp_header_new("Cache-Control", "no-store", 0, 0));
    if (c->www_auth)
        evhtp_headers_add_header(req->headers_out,
                                 evhtp_header_new("WWW-Authenticate", "Bearer", 0, 0));
    evhtp_send_reply(req, (evhtp_res)c->status);
    evhtp_request_resume(req);
}

static void gencb(evhtp_request_t *req, void *arg)
{
    (void)arg;
    evhtp_connection_t *conn = evhtp_request_get_connection(req);
    admin_conn *c = conn->hooks ? conn->hooks->on_connection_fini_arg : NULL;
    if (!c) {
        evhtp_send_reply(req, EVHTP_RES_SERVERR);
        return;
    }
    c->status = respond(c, req, req->buffer_out);
    if (evhtp_request_get_method(req) == htp_method_HEAD)
        evbuffer_drain(req->buffer_out, evbuffer_get_length(req->buffer_out));
    /* One request at a time: nothing more is parsed until this reply has been written. */
    c->req = req;
    evhtp_request_pause(req);
    event_active(c->reply_ev, EV_TIMEOUT, 0);
}

static evhtp_res on_request_fini(evhtp_request_t *req, void *arg)
{
    (void)req;
    admin_conn *c = arg;
    if (c->req == req)
        c->req = NULL;
    c->served = true;
    /* The next request of a kept-alive connection has the same deadline. */
    arm_deadline(c);
    return EVHTP_RES_OK;
}

static evhtp_res post_accept(evhtp_connection_t *conn, void *arg)
{
    bw_admin *a = arg;
    admin_conn *c = calloc(1, sizeof(*c));
    if (!c)
        return EVHTP_RES_ERROR;
    c->a = a;
    c->conn = conn;
    c->deadline = evtimer_new(a->base, deadline_cb, c);
    c->reply_ev = event_new(a->base, -1, 0, reply_cb, c);
    if (!c->deadline || !c->reply_ev) {
        if (c->deadline)
            event_free(c->deadline);
        if (c->reply_ev)
            event_free(c->reply_ev);
        free(c);
        return EVHTP_RES_ERROR;
    }
    snprintf(c->peer, sizeof(c->peer), "unknown");
    if (conn->saddr) {
        bw_sockaddr sa;
        memset(&sa, 0, sizeof(sa));
        size_t len = conn->saddr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                        : sizeof(struct sockaddr_in);
        memcpy(&sa.ss, conn->saddr, len);
        sa.len = (socklen_t)len;
        bw_sockaddr_format(&sa, c->peer, sizeof(c->peer));
    }
    c->next = a->conns;
    if (a->conns)
        a->conns->prev = c;
    a->conns = c;
    a->n_conns++;
    if (conn->bev) {
        bufferevent_getcb(conn->bev, &c->lib_read, &c->lib_write, &c->lib_event, &c->lib_arg);
        if (c->lib_read) {
            size_t max = a->cfg ? a->cfg->limits.max_header_bytes : 32768;
            bufferevent_setwatermark(conn->bev, EV_READ, 0, max + 1024);
            bufferevent_setcb(conn->bev, head_gate_read, head_gate_write, head_gate_event, c);
        }
    }
    evhtp_connection_set_hook(conn, evhtp_hook_on_connection_fini, (evhtp_hook)conn_fini, c);
    evhtp_connection_set_hook(conn, evhtp_hook_on_header, (evhtp_hook)on_header, c);
    evhtp_connection_set_hook(conn, evhtp_hook_on_headers, (evhtp_hook)on_headers, c);
    evhtp_connection_set_hook(conn, evhtp_hook_on_request_fini, (evhtp_hook)on_request_fini, c);
    arm_deadline(c);
    update_listener(a);
    return EVHTP_RES_OK;
}

static void accept_resume_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bw_admin *a = arg;
    a->accept_paused = false;
    update_listener(a);
}

/* accept() failed (descriptors exhausted, most often): back off instead of spinning on a
 * listener that stays readable. */
static void accept_error_cb(struct evconnlistener *l, void *arg)
{
    (void)l;
    bw_admin *a = ((evhtp_t *)arg)->arg; /* the listener's argument is libevhtp's context */
    int err = EVUTIL_SOCKET_ERROR();
    a->accept_errors++;
    uint64_t now = mono_ms();
    if (a->last_accept_log_ms == 0 || now - a->last_accept_log_ms >= 1000) {
        a->last_accept_log_ms = now;
        bw_log_warn(a->log, "admin: accept failed: %s; pausing accepts for %d ms",
                    evutil_socket_error_to_string(err), ACCEPT_PAUSE_MS);
    }
    a->accept_paused = true;
    update_listener(a);
    struct timeval tv = {0, ACCEPT_PAUSE_MS * 1000};
    evtimer_add(a->resume_ev, &tv);
}

void bw_admin_set_hooks(bw_admin *a, const bw_admin_hooks *hooks)
{
    a->hooks = *hooks;
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
    if (fd < 0)
        return a;
    a->htp = evhtp_new(base, a);
    a->resume_ev = evtimer_new(base, accept_resume_cb, a);
    if (!a->htp || !a->resume_ev)
        goto fail;
    /* No endpoint takes a body: never invite one with 100 Continue. */
    evhtp_disable_flag(a->htp, EVHTP_FLAG_ENABLE_100_CONT);
    /* The query is read by bw_admin_parse_top(); libevhtp's strict query parser would drop
     * the connection without a reply on "?top=" instead of letting us answer 400. */
    evhtp_set_parser_flags(a->htp, EVHTP_PARSE_QUERY_FLAG_LENIENT);
    a->htp->max_body_size = 0;
    a->htp->max_keepalive_requests = 0;
    struct timeval io = {ADMIN_IO_TIMEOUT_S, 0};
    evhtp_set_timeouts(a->htp, &io, &io);
    evhtp_set_gencb(a->htp, gencb, a);
    evhtp_set_post_accept_cb(a->htp, post_accept, a);
    if (evhtp_accept_socket(a->htp, fd, -1) != 0)
        goto fail;
    a->lev = a->htp->server;
    evconnlistener_set_error_cb(a->lev, accept_error_cb);
    return a;
fail:
    if (a->htp)
        evhtp_free(a->htp);
    if (a->resume_ev)
        event_free(a->resume_ev);
    free(a);
    return NULL;
}

void bw_admin_set_config(bw_admin *a, const bw_config *cfg)
{
    a->cfg = cfg;
    update_listener(a);
}

int bw_admin_fd(const bw_admin *a)
{
    return a && a->lev ? (int)evconnlistener_get_fd(a->lev) : -1;
}

void bw_admin_free(bw_admin *a)
{
    if (!a)
        return;
    while (a->conns)
        evhtp_connection_free(a->conns->conn);
    if (a->htp) {
        evhtp_unbind_socket(a->htp);
        evhtp_free(a->htp);
    }
    if (a->resume_ev)
        event_free(a->resume_ev);
    free(a);
}
