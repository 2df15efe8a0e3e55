/*
 * The request path: client connections (sessions), one exchange at a time on each, streamed to
 * and from upstream connections with backpressure.
 *
 * Nothing of a request reaches an upstream before its whole head has been read and judged by the
 * strict parser in http.c: ambiguous framing is refused with 400 and the connection closed. The
 * request body is then streamed as it arrives (Content-Length counted, chunked validated byte by
 * byte); a chunked body found malformed after forwarding began aborts the upstream connection.
 * Responses are judged the same way and re-framed for the client when needed (a close-delimited
 * upstream response becomes chunked for an HTTP/1.1 client; a chunked one is decoded for an
 * HTTP/1.0 client).
 *
 * Memory per connection is bounded: reading from one side stops while the other side's output
 * buffer is above BW_HIGH_WATER and resumes when it drains below BW_LOW_WATER.
 *
 * Retries: a request whose connect failed is sent to another server (nothing reached an
 * upstream). A request that was written to a pooled connection the upstream had already closed
 * is sent again on a fresh connection when it is idempotent, or when not one byte of it left the
 * proxy. An idempotent request is retried once on another server after a reset or timeout, as
 * long as nothing was sent to the client and its body is still held for replay.
 */
#include "breakwater/proxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <openssl/err.h>

#include "breakwater/breaker.h"
#include "breakwater/clientip.h"
#include "breakwater/http.h"
#include "breakwater/path.h"
#include "breakwater/log.h"
#include "breakwater/probes.h"
#include "breakwater/ratelimit.h"
#include "breakwater/shm.h"
#include "breakwater/upstream.h"
#include "breakwater/upstream_tls.h"

/* -Dinstrumentation=false builds (for measuring their cost only) skip breakers and metrics. */
#ifdef BW_NO_INSTRUMENTATION
#define BW_INSTRUMENTED 0
#else
#define BW_INSTRUMENTED 1
#endif

#define BW_HIGH_WATER (256 * 1024)
#define BW_LOW_WATER (64 * 1024)
#define BW_REPLAY_MAX (64 * 1024)
#define BW_RESPONSE_HEAD_MAX (64 * 1024)

typedef enum session_state {
    SS_HEAD,     /* waiting for (the rest of) a request head */
    SS_EXCHANGE, /* a request is being proxied or answered */
    SS_CLOSING,  /* flushing the last response, then close */
} session_state;

typedef enum resp_state {
    RS_WAIT_HEAD,
    RS_BODY,
    RS_DONE,
} resp_state;

/* Why an upstream exchange failed; decides the status (502/504) and whether to retry. */
typedef enum up_failure {
    UF_CONNECT,         /* refused, unreachable, or the socket could not be created */
    UF_CONNECT_TIMEOUT, /* connect did not complete in connect_timeout_ms */
    UF_RESET,           /* closed or reset before a complete response */
    UF_TIMEOUT,         /* no response (or no progress) within response_timeout_ms */
    UF_INVALID,         /* the response was not valid HTTP/1.x */
} up_failure;

typedef struct bw_exchange {
    struct bw_session *s;
    const bw_route_conf *route;
    bw_upstream_pool *pool;
    /* request */
    bw_body_framing req_framing;
    uint64_t req_left;
    bw_chunked req_chunk;
    bool req_done;           /* the whole request body has been read from the client */
    bool buffering;          /* reading a small body whole before an upstream is taken */
    bool req_started;        /* body bytes have been forwarded */
    uint64_t bytes_in;       /* request body bytes read from the client */
    uint64_t req_decoded;    /* decoded bytes of a chunked request body (for max_body_bytes) */
    struct evbuffer *replay; /* head + body sent so far, while it fits in BW_REPLAY_MAX;
                              * the session's buffer, NULL once the request outgrew it */
    bool replayable;
    bool idempotent;
    /* upstream */
    bw_upconn *uc;
    bw_server *server;
    int attempts;
    bool fresh_retry_used;
    size_t out_added;   /* bytes queued on the current upstream connection */
    bool up_paused;     /* upstream reading stopped for client backpressure */
    bool client_paused; /* client reading stopped for upstream backpressure */
    /* response */
    resp_state rstate;
    size_t resp_scanned;
    int status;
    bw_body_framing resp_framing;
    uint64_t resp_left;
    bw_chunked resp_chunk;
    bool resp_chunk_encode; /* close-delimited upstream body -> chunked to the client */
    bool resp_dechunk;      /* chunked upstream body -> plain to an HTTP/1.0 client */
    bool resp_started;      /* response bytes have been queued for the client */
    bool up_keepalive;      /* the upstream connection may be reused after this response */
    uint64_t bytes_out;
    /* timing, access log */
    struct timespec t_start;
    double connect_ms;
    double response_ms;
    struct timespec t_attempt;
    int64_t wall_start_ms;
    char reqid[72];
    size_t reqid_len;
    const char *error;
    /* admission and outcome */
    bool quiet;    /* a probe: neither logged nor counted */
    bool ticketed; /* the breaker admitted it: an outcome is owed */
    bool failed;   /* the upstream exchange ended in failure (final) */
    up_failure failure;
    bw_breaker_ticket ticket;
    char extra[192]; /* RateLimit-* and Retry-After lines added to the response head */
    size_t extra_len;
    uint64_t rl_hash; /* rate-limit key, from ratelimit_prepare() */
    const char *rl_key;
    size_t rl_key_len;
    bool rl_digest;
    bool rl_exempt; /* the client is in the policy's exempt networks */
    char rl_keytext[BW_CLIENTIP_TEXT_LEN];
} bw_exchange;

typedef struct bw_session {
    bw_worker *w;
    struct bufferevent *bev;
    struct bw_session *next, *prev;
    int listener;
    bool tls;
    struct sockaddr_storage peer_sa;
    char peer_ip[INET6_ADDRSTRLEN];
    char peer[INET6_ADDRSTRLEN + 8];
    session_state state;
    struct event *timer;
    bool head_timer; /* the header-read deadline is running for the current request */
    size_t scanned;  /* bytes of the input already searched for the end of the head */
    uint32_t served;
    bool close_after;
    bool clean_close; /* the last response was complete: a TLS close_notify may be sent */
    bool output_held; /* the next request waits until the client reads what is queued */
    char *head;       /* copy of the current request head; the parsed head points into it */
    struct evbuffer *replay_buf; /* lent to each exchange as ex->replay, drained in between */
    size_t head_cap;
    bw_exchange ex;
    bw_http_head req; /* kept out of ex so that resetting ex stays cheap */
} bw_session;

static void session_free(bw_session *s);
static void session_next(bw_session *s);
static void session_try_head(bw_session *s);
static void exchange_finish(bw_exchange *ex);
static void start_attempt(bw_exchange *ex, bw_server *same, bool allow_reuse);
static void forward_request_body(bw_exchange *ex);
static void forward_response_body(bw_exchange *ex);
static void exchange_start_upstream(bw_session *s, bw_exchange *ex);
static bool request_body_buffered(bw_session *s, bw_exchange *ex);
static void upstream_failed(bw_exchange *ex, up_failure why);
static void client_read_cb(struct bufferevent *bev, void *arg);
static void client_write_cb(struct bufferevent *bev, void *arg);
static void client_event_cb(struct bufferevent *bev, short what, void *arg);

static double ms_since(const struct timespec *t0)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - t0->tv_sec) * 1e3 + (double)(now.tv_nsec - t0->tv_nsec) / 1e6;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* splitmix64: a cheap, well-mixed generator for request ids (not a secret, only unique). */
static uint64_t next_random(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/*
 * Writes queued output at once on a plain socket instead of at the next loop iteration.
 * Left to itself, a socket bufferevent registers write interest for every batch of output and
 * drops it once written: two epoll_ctl calls per response and per request. Here write interest
 * is registered only while the kernel does not take everything (backlog), and dropped again by
 * the write callbacks once the buffer is empty. TLS bufferevents keep libevent's scheduling.
 */
static void out_kick(struct bufferevent *bev)
{
    if (bufferevent_get_enabled(bev) & EV_WRITE)
        return; /* backlog: libevent writes when the socket is writable */
    struct evbuffer *out = bufferevent_get_output(bev);
    if (evbuffer_get_length(out) == 0)
        return;
    int r = evbuffer_write(out, bufferevent_getfd(bev));
    /* On an error other than EAGAIN, letting libevent write reports it as an event. */
    if (r < 0 || evbuffer_get_length(out) > 0)
        bufferevent_enable(bev, EV_WRITE);
}

static void client_kick(bw_session *s)
{
    if (!s->tls) {
        out_kick(s->bev);
        return;
    }
    /* bufferevent_openssl writes one TLS record per buffer chunk: a response head and its body
     * sit in separate chunks, so a small response would cost two records (two encryptions,
     * two sends). Making small output contiguous keeps it to one. */
    struct evbuffer *out = bufferevent_get_output(s->bev);
    size_t len = evbuffer_get_length(out);
    if (len > 0 && len <= 16384)
        evbuffer_pullup(out, -1);
}

/* Drops write interest once a plain socket's output is empty again (see out_kick). */
static void out_idle(struct bufferevent *bev)
{
    if (evbuffer_get_length(bufferevent_get_output(bev)) == 0)
        bufferevent_disable(bev, EV_WRITE);
}

/* ---------------------------------------------------------------------------------------- */
/* Responses generated by the proxy itself                                                   */

static const char *error_reason(int status)
{
    switch (status) {
    case 400:
        return "bad request";
    case 404:
        return "no route";
    case 405:
        return "method not allowed";
    case 408:
        return "request timeout";
    case 413:
        return "payload too large";
    case 417:
        return "expectation failed";
    case 429:
        return "rate limited";
    case 431:
        return "request header fields too large";
    case 500:
        return "internal error";
    case 502:
        return "bad gateway";
    case 503:
        return "circuit open";
    case 504:
        return "gateway timeout";
    case 505:
        return "http version not supported";
    default:
        return bw_http_reason(status);
    }
}

static bw_upstream_error_kind error_kind(up_failure why)
{
    switch (why) {
    case UF_CONNECT:
    case UF_CONNECT_TIMEOUT:
        return BW_UPERR_CONNECT;
    case UF_TIMEOUT:
        return BW_UPERR_TIMEOUT;
    case UF_RESET:
        return BW_UPERR_RESET;
    case UF_INVALID:
        return BW_UPERR_INVALID;
    }
    return BW_UPERR_INVALID;
}

static void log_transition(bw_worker *w, const bw_upstream_conf *u, const bw_breaker_transition *t)
{
    if (!t->happened)
        return;
    char what[160];
    bw_breaker_describe(t, what, sizeof(what));
    if (t->to == BW_BREAKER_OPEN)
        bw_log_warn(w->log, "breaker %s: %s", u->name, what);
    else
        bw_log_info(w->log, "breaker %s: %s", u->name, what);
}

/* The outcome hook: tells the upstream's breaker how the exchange it admitted went. Called
 * once per admitted request (for a half-open probe as soon as the response head is in); a
 * request the client abandoned before any outcome reports nothing but gives its probe permit
 * back at once. */
static void report_outcome(bw_session *s, bw_exchange *ex)
{
    if (!BW_INSTRUMENTED || !ex->ticketed)
        return;
    ex->ticketed = false;
    bw_worker *w = s->w;
    const bw_upstream_conf *u = ex->pool->conf;
    bw_breaker_outcome outcome;
    if (ex->failed) {
        outcome = BW_BREAKER_FAILURE;
    } else if (ex->response_ms >= 0) {
        outcome = bw_breaker_classify(&u->breaker, ex->status, (uint64_t)ex->response_ms);
        if (outcome == BW_BREAKER_FAILURE)
            bw_metrics_upstream_error(w->shm, w->worker_slot, u->shm_slot, BW_UPERR_STATUS);
    } else {
        bw_breaker_release(bw_shm_breaker(w->shm, u->shm_slot), &ex->ticket, bw_breaker_now_ms());
        return;
    }
    bw_breaker_transition t = {0};
    bw_breaker_report(bw_shm_breaker(w->shm, u->shm_slot), &u->breaker, bw_breaker_now_ms(),
                      &ex->ticket, outcome, (uint32_t)next_random(&w->reqid_state), &t);
    log_transition(w, u, &t);
}

/* Passive outlier detection: one attempt's outcome on one server (the breaker's definition of
 * failure), shared by every worker through the server's record. */
static void server_outcome(bw_session *s, bw_exchange *ex, bw_server *server, bool failed)
{
    if (!BW_INSTRUMENTED || server == NULL || server->health == NULL)
        return;
    const bw_upstream_conf *u = ex->pool->conf;
    uint64_t now = bw_breaker_now_ms();
    if (!failed) {
        bw_outlier_success(server->health, &u->outlier, now);
        return;
    }
    uint64_t dur = 0;
    if (bw_outlier_failure(server->health, ex->pool->health, ex->pool->n_servers, &u->outlier, now,
                           &dur)) {
        atomic_fetch_add_explicit(&ex->pool->group->ejections_total, 1, memory_order_relaxed);
        bw_log_warn(s->w->log,
                    "upstream %s: server %s ejected for %llu ms after %u consecutive failures",
                    u->name, server->conf->address, (unsigned long long)dur,
                    u->outlier.consecutive_failures);
    }
}

/* Everything that happens once per exchange when it ends: breaker outcome, metrics, access log. */
static void exchange_record(bw_session *s, bw_exchange *ex)
{
    bw_worker *w = s->w;
    report_outcome(s, ex);
    if (ex->quiet)
        return;
    double duration_ms = ms_since(&ex->t_start);
    if (BW_INSTRUMENTED)
        bw_metrics_count_request(w->shm, w->worker_slot, ex->route ? ex->route->shm_slot : -1,
                                 ex->status);
    if (BW_INSTRUMENTED && ex->pool && ex->attempts > 0)
        bw_metrics_observe_duration(w->shm, w->worker_slot, ex->pool->conf->shm_slot,
                                    (uint64_t)(duration_ms * 1000.0));
    if (w->log->access_fd < 0)
        return;
    bw_access_record r = {0};
    r.time_ms = ex->wall_start_ms;
    r.client = s->peer;
    if (s->req.method_str) {
        r.method = s->req.method_str;
        r.method_len = s->req.method_len;
        r.path = s->req.target;
        r.path_len = s->req.target_len;
    }
    r.status = ex->status;
    r.bytes_in = ex->bytes_in;
    r.bytes_out = ex->bytes_out;
    r.upstream = ex->pool ? ex->pool->conf->name : NULL;
    r.server = ex->server ? ex->server->conf->address : NULL;
    r.route = ex->route ? ex->route->name : NULL;
    r.request_id = ex->reqid_len ? ex->reqid : NULL;
    r.request_id_len = ex->reqid_len;
    r.duration_ms = duration_ms;
    r.upstream_connect_ms = ex->connect_ms;
    r.upstream_response_ms = ex->response_ms;
    r.attempts = ex->attempts;
    r.error = ex->error;
    r.tls = s->tls;
    bw_log_access(w->log, &r);
}

/* Sends a small JSON error (or `body` as text when given) and ends the exchange. */
static void send_local(bw_session *s, int status, const char *body, const char *content_type,
                       bool close_conn)
{
    bw_exchange *ex = &s->ex;
    struct evbuffer *out = bufferevent_get_output(s->bev);
    char json[256];
    if (!body) {
        /* 503 means an open breaker, except for a DNS-named upstream with no address. */
        const char *reason = status == 503 && ex->error && strcmp(ex->error, "no servers") == 0
                                 ? ex->error
                                 : error_reason(status);
        if (ex->pool)
            snprintf(json, sizeof(json), "{\"error\":\"%s\",\"upstream\":\"%s\"}\n", reason,
                     ex->pool->conf->name);
        else
            snprintf(json, sizeof(json), "{\"error\":\"%s\"}\n", error_reason(status));
        body = json;
        content_type = "application/json";
    }
    if (close_conn || s->w->draining)
        s->close_after = true;
    size_t blen = strlen(body);
    bool head_only = s->req.method == BW_METHOD_HEAD && s->req.method_str;
    int n =
        evbuffer_add_printf(out,
                            "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                            "%.*s%s\r\n",
                            status, bw_http_reason(status), content_type, blen, (int)ex->extra_len,
                            ex->extra, s->close_after ? "Connection: close\r\n" : "");
    if (n > 0)
        ex->bytes_out += (uint64_t)n;
    if (!head_only) {
        evbuffer_add(out, body, blen);
        ex->bytes_out += blen;
    }
    ex->status = status;
    ex->resp_started = true;
    ex->rstate = RS_DONE;
    exchange_finish(ex);
}

static void send_error(bw_session *s, int status, const char *why)
{
    bw_exchange *ex = &s->ex;
    if (!ex->error)
        ex->error = why;
    /* After a refused request the rest of the connection's bytes cannot be trusted to be a
     * message boundary, and after a proxy-side upstream failure the body may be half read. */
    bool close_conn = status == 400 || status == 408 || status == 413 || status == 417 ||
                      status == 431 || status == 505 || status == 405 || !ex->req_done;
    send_local(s, status, NULL, NULL, close_conn);
}

/* ---------------------------------------------------------------------------------------- */
/* Sessions                                                                                  */

static void session_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bw_session *s = arg;
    if (s->state != SS_HEAD)
        return;
    if (s->head_timer && evbuffer_get_length(bufferevent_get_input(s->bev)) > 0) {
        bw_log_debug(s->w->log, "client %s: request head not complete in time", s->peer);
        s->ex.wall_start_ms = wall_ms();
        clock_gettime(CLOCK_MONOTONIC, &s->ex.t_start);
        s->ex.req_done = true;
        s->state = SS_EXCHANGE;
        send_error(s, 408, "header timeout");
        return;
    }
    /* Idle keep-alive connection (or a new one that never sent a byte): close quietly. */
    session_free(s);
}

static void arm_head_timer(bw_session *s, bool have_bytes)
{
    if (have_bytes || s->served == 0) {
        if (s->head_timer)
            return;
        s->head_timer = true;
        evtimer_add(s->timer, s->w->tv_header);
    } else {
        evtimer_add(s->timer, s->w->tv_idle);
    }
}

void bw_proxy_accept(bw_worker *w, int listener, evutil_socket_t fd, const struct sockaddr *sa,
                     int salen)
{
    (void)salen;
    bw_session *s = calloc(1, sizeof(*s));
    if (!s) {
        evutil_closesocket(fd);
        return;
    }
    s->w = w;
    s->ex.s = s;
    s->listener = listener;
    if ((size_t)salen <= sizeof(s->peer_sa))
        memcpy(&s->peer_sa, sa, (size_t)salen);
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    const void *ip = NULL;
    int family = sa->sa_family;
    unsigned port = 0;
    if (family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        ip = &in->sin_addr;
        port = ntohs(in->sin_port);
    } else if (family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        ip = &in6->sin6_addr;
        port = ntohs(in6->sin6_port);
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            ip = &in6->sin6_addr.s6_addr[12];
            family = AF_INET;
        }
    }
    if (ip && inet_ntop(family, ip, s->peer_ip, sizeof(s->peer_ip)))
        snprintf(s->peer, sizeof(s->peer), family == AF_INET6 ? "[%s]:%u" : "%s:%u", s->peer_ip,
                 port);
    else
        snprintf(s->peer_ip, sizeof(s->peer_ip), "unknown");

    SSL_CTX *ctx = w->tls[listener];
    if (ctx) {
        SSL *ssl = SSL_new(ctx);
        if (!ssl) {
            ERR_clear_error();
            evutil_closesocket(fd);
            free(s);
            return;
        }
        s->tls = true;
        s->bev = bufferevent_openssl_socket_new(w->base, fd, ssl, BUFFEREVENT_SSL_ACCEPTING,
                                                BEV_OPT_CLOSE_ON_FREE);
        if (s->bev)
            bufferevent_openssl_set_allow_dirty_shutdown(s->bev, 1);
        else
            SSL_free(ssl);
    } else {
        s->bev = bufferevent_socket_new(w->base, fd, BEV_OPT_CLOSE_ON_FREE);
    }
    s->timer = evtimer_new(w->base, session_timer_cb, s);
    s->replay_buf = evbuffer_new();
    if (!s->bev || !s->timer || !s->replay_buf) {
        if (s->bev)
            bufferevent_free(s->bev);
        else
            evutil_closesocket(fd);
        if (s->timer)
            event_free(s->timer);
        if (s->replay_buf)
            evbuffer_free(s->replay_buf);
        free(s);
        return;
    }
    bufferevent_set_max_single_read(s->bev, 65536);
    bufferevent_set_max_single_write(s->bev, 65536);

    s->next = w->sessions;
    if (w->sessions)
        w->sessions->prev = s;
    w->sessions = s;
    w->n_sessions++;
    if (BW_INSTRUMENTED)
        bw_metrics_connection(w->shm, w->worker_slot, w->cfg->listeners[listener].shm_slot, 1);

    s->state = SS_HEAD;
    bufferevent_setcb(s->bev, client_read_cb, client_write_cb, client_event_cb, s);
    if (!s->tls)
        bufferevent_disable(s->bev, EV_WRITE);
    /* Bound what an idle or pipelining client can make us buffer before we read its head. */
    bufferevent_setwatermark(s->bev, EV_READ, 0, w->cfg->limits.max_header_bytes + 4096);
    bufferevent_set_timeouts(s->bev, NULL, w->tv_idle);
    bufferevent_enable(s->bev, s->tls ? EV_READ | EV_WRITE : EV_READ);
    arm_head_timer(s, false);
}

static void exchange_release_upstream(bw_exchange *ex, bool reusable)
{
    if (!ex->uc)
        return;
    bw_upconn *uc = ex->uc;
    ex->uc = NULL;
    if (reusable)
        bw_upstream_release(uc);
    else
        bw_upstream_close(uc);
}

static void exchange_clear(bw_exchange *ex)
{
    exchange_release_upstream(ex, false);
    bw_session *s = ex->s;
    if (BW_INSTRUMENTED && ex->ticketed && ex->pool) /* ended with no outcome: free the permit */
        bw_breaker_release(bw_shm_breaker(s->w->shm, ex->pool->conf->shm_slot), &ex->ticket,
                           bw_breaker_now_ms());
    evbuffer_drain(s->replay_buf, evbuffer_get_length(s->replay_buf));
    memset(ex, 0, sizeof(*ex));
    ex->s = s;
}

static void session_free(bw_session *s)
{
    bw_worker *w = s->w;
    exchange_clear(&s->ex);
    if (s->prev)
        s->prev->next = s->next;
    else
        w->sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    w->n_sessions--;
    if (BW_INSTRUMENTED)
        bw_metrics_connection(w->shm, w->worker_slot, w->cfg->listeners[s->listener].shm_slot, -1);
    if (s->tls && s->clean_close && s->bev) {
        /* Tell the client the close is deliberate: without close_notify, TLS clients report an
         * unexpected EOF. Best effort, non-blocking; the output buffer is already empty. */
        SSL *ssl = bufferevent_openssl_get_ssl(s->bev);
        if (ssl && SSL_is_init_finished(ssl))
            (void)SSL_shutdown(ssl);
        ERR_clear_error();
    }
    if (s->bev)
        bufferevent_free(s->bev);
    event_free(s->timer);
    free(s->head);
    evbuffer_free(s->replay_buf);
    free(s);
    bw_worker_session_closed(w);
}

/* Ends the connection once everything queued has been written. */
static void session_close_after_flush(bw_session *s)
{
    client_kick(s);
    s->state = SS_CLOSING;
    evtimer_del(s->timer);
    bufferevent_disable(s->bev, EV_READ);
    bufferevent_setwatermark(s->bev, EV_WRITE, 0, 0);
    if (evbuffer_get_length(bufferevent_get_output(s->bev)) == 0)
        session_free(s);
    else if (!s->tls)
        bufferevent_enable(s->bev, EV_WRITE); /* so that client_write_cb sees it drain */
    /* else client_write_cb frees it when the output buffer is empty */
}

/* Ends an exchange whose response cannot be completed after part of it was queued: the bytes
 * already queued are flushed, then the connection closes without a terminating chunk and without
 * a TLS close_notify, so the client can tell the response is truncated. */
static void session_abort(bw_session *s)
{
    bw_exchange *ex = &s->ex;
    if (ex->pool)
        exchange_record(s, ex);
    exchange_clear(ex);
    s->clean_close = false;
    session_close_after_flush(s);
}

/* The exchange is over from the client's point of view: its response is fully queued. */
static void exchange_finish(bw_exchange *ex)
{
    bw_session *s = ex->s;
    client_kick(s);
    exchange_record(s, ex);
    s->served++;
    if (!ex->req_done)
        s->close_after = true;
    exchange_clear(ex);
    if (s->close_after || s->w->draining) {
        s->clean_close = true;
        session_close_after_flush(s);
        return;
    }
    session_next(s);
}

/* Prepares for the next request on a keep-alive connection and handles pipelined bytes. */
static void session_next(bw_session *s)
{
    s->state = SS_HEAD;
    s->head_timer = false;
    s->scanned = 0;
    memset(&s->req, 0, offsetof(bw_http_head, headers));
    s->req.n_headers = 0;
    bufferevent_set_timeouts(s->bev, NULL, s->w->tv_idle);
    bufferevent_setwatermark(s->bev, EV_READ, 0, s->w->cfg->limits.max_header_bytes + 4096);
    bufferevent_enable(s->bev, EV_READ);
    size_t pending = evbuffer_get_length(bufferevent_get_input(s->bev));
    evtimer_del(s->timer);
    arm_head_timer(s, pending > 0);
    if (pending > 0)
        bufferevent_trigger(s->bev, EV_READ, BEV_TRIG_IGNORE_WATERMARKS | BEV_TRIG_DEFER_CALLBACKS);
}

/* ---------------------------------------------------------------------------------------- */
/* Reading and judging a request head                                                        */

/* True while the bytes so far can still begin a request line: a method token then a space. */
static bool plausible_request_start(const char *p, size_t n)
{
    static const char tchar_extra[] = "!#$%&'*+-.^_`|~";
    if (!p)
        return true;
    for (size_t i = 0; i < n && i < 32; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == ' ')
            return i > 0;
        bool alnum = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
        if (!alnum && (c == 0 || !strchr(tchar_extra, c)))
            return false;
    }
    return true;
}

static const bw_route_conf *match_route(const bw_config *cfg, const char *host, size_t host_len,
                                        const char *path, size_t path_len)
{
    for (size_t i = 0; i < cfg->n_routes; i++) {
        const bw_route_conf *r = &cfg->routes[i];
        if (r->host) {
            size_t hl = strlen(r->host);
            if (hl != host_len || strncasecmp(r->host, host, hl) != 0)
                continue;
        }
        if (r->path_prefix_len > path_len)
            continue;
        if (r->case_sensitive ? memcmp(r->path_prefix, path, r->path_prefix_len) != 0
                              : strncasecmp(r->path_prefix, path, r->path_prefix_len) != 0)
            continue;
        return r;
    }
    return NULL;
}

/* Splits the target into the authority (absolute-form only) and the origin-form path. */
static void split_target(const bw_http_head *h, const char **auth, size_t *auth_len,
                         const char **path, size_t *path_len)
{
    const char *t = h->target;
    size_t n = h->target_len;
    *auth = NULL;
    *auth_len = 0;
    if (n > 0 && t[0] != '/' && t[0] != '*') {
        const char *sep = memchr(t, ':', n);
        if (sep && (size_t)(sep - t) + 3 <= n && sep[1] == '/' && sep[2] == '/') {
            const char *a = sep + 3;
            const char *end = t + n;
            const char *slash = memchr(a, '/', (size_t)(end - a));
            const char *q = memchr(a, '?', (size_t)(end - a));
            if (q && (!slash || q < slash))
                slash = q;
            *auth = a;
            *auth_len = (size_t)((slash ? slash : end) - a);
            *path = slash ? slash : "/";
            *path_len = slash ? (size_t)(end - slash) : 1;
            return;
        }
    }
    *path = t;
    *path_len = n;
}

/*
 * The canonical origin-form path (src/path.c) replaces the target's path for routing, rate-limit
 * policies and forwarding; the query is kept byte for byte. "*" and an empty path are left as
 * they are. Returns false after answering 400 for a path with no safe canonical form.
 */
static bool normalize_target(bw_session *s, const char **path, size_t *path_len)
{
    const char *p = *path;
    size_t n = *path_len;
    if (n == 0 || p[0] != '/')
        return true;
    const char *q = memchr(p, '?', n);
    size_t plen = q ? (size_t)(q - p) : n;
    size_t out = 0;
    if (n > s->w->path_buf_cap) {
        send_error(s, 414, "request target too long");
        return false;
    }
    bw_path_status st = bw_path_normalize(p, plen, s->w->path_buf, s->w->path_buf_cap, &out);
    if (st != BW_PATH_OK) {
        bw_log_debug(s->w->log, "client %s: refused path: %s", s->peer, bw_path_status_text(st));
        send_error(s, 400, bw_path_status_text(st));
        return false;
    }
    memcpy(s->w->path_buf + out, p + plen, n - plen);
    *path = s->w->path_buf;
    *path_len = out + (n - plen);
    return true;
}

static bool valid_request_id(const char *v, size_t n)
{
    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)v[i];
        if (c <= 0x20 || c >= 0x7f || c == '"' || c == '\\')
            return false;
    }
    return true;
}

static bool is_hop_by_hop(const char *name, size_t len)
{
    static const char *const hop[] = {
        "connection",        "keep-alive", "proxy-connection", "te",     "trailer",
        "transfer-encoding", "upgrade",    "content-length",   "expect",
    };
    for (size_t i = 0; i < sizeof(hop) / sizeof(hop[0]); i++)
        if (bw_http_name_eq(name, len, hop[i]))
            return true;
    return false;
}

/*
 * True when a Connection header of h lists this header name (RFC 9110 7.6.1): such a header is
 * hop-by-hop too. The values are scanned in place, so every name listed is honoured however many
 * there are; the cost is bounded by the head's size, which the parser already limits.
 */
static bool named_in_connection(const bw_http_head *h, const char *name, size_t len)
{
    for (size_t i = 0; i < h->n_headers; i++) {
        const bw_http_header *hd = &h->headers[i];
        if (!bw_http_name_eq(hd->name, hd->name_len, "connection"))
            continue;
        const char *p = hd->value, *end = hd->value + hd->value_len;
        while (p < end) {
            while (p < end && (*p == ',' || *p == ' ' || *p == '\t'))
                p++;
            const char *start = p;
            while (p < end && *p != ',' && *p != ' ' && *p != '\t')
                p++;
            if ((size_t)(p - start) == len && len > 0 && strncasecmp(start, name, len) == 0)
                return true;
        }
    }
    return false;
}

/* Head writer: heads are built in one reserved, contiguous stretch of the output buffer and
 * committed once, instead of one evbuffer_add (and its bookkeeping) per fragment. The caller
 * reserves an upper bound of what it writes. */
typedef struct head_writer {
    struct evbuffer *buf;
    struct evbuffer_iovec vec;
    char *p;
    size_t n;
} head_writer;

static bool hw_begin(head_writer *w, struct evbuffer *buf, size_t bound)
{
    w->buf = buf;
    w->n = 0;
    if (evbuffer_reserve_space(buf, (ev_ssize_t)bound, &w->vec, 1) < 1 || w->vec.iov_len < bound)
        return false;
    w->p = w->vec.iov_base;
    return true;
}

static void hw_put(head_writer *w, const void *data, size_t len)
{
    memcpy(w->p + w->n, data, len);
    w->n += len;
}

#define hw_lit(w, lit) hw_put((w), (lit), sizeof(lit) - 1)

static void hw_u64(head_writer *w, uint64_t v)
{
    char digits[20];
    size_t k = sizeof(digits);
    do {
        digits[--k] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    hw_put(w, digits + k, sizeof(digits) - k);
}

static void hw_end(head_writer *w)
{
    w->vec.iov_len = w->n;
    evbuffer_commit_space(w->buf, &w->vec, 1);
}

/* Writes the request head the upstream will see into ex->replay. */
static bool build_upstream_head(bw_session *s, bw_exchange *ex, const char *auth, size_t auth_len,
                                const char *path, size_t path_len)
{
    const bw_http_head *h = &s->req;
    const char *server = ex->pool->conf->servers[0].address;
    size_t server_len = strlen(server);

    size_t bound = h->method_len + path_len + 16 + auth_len + server_len + 256 + ex->reqid_len;
    for (size_t i = 0; i < h->n_headers; i++)
        bound += h->headers[i].name_len + h->headers[i].value_len + 6;
    head_writer w;
    if (!hw_begin(&w, ex->replay, bound))
        return false;

    hw_put(&w, h->method_str, h->method_len);
    hw_lit(&w, " ");
    hw_put(&w, path, path_len);
    hw_lit(&w, " HTTP/1.1\r\n");

    const char *xff[16];
    size_t xff_len[16], n_xff = 0;
    bool have_host = false;
    for (size_t i = 0; i < h->n_headers; i++) {
        const bw_http_header *hd = &h->headers[i];
        /* Connection cannot remove Host: the upstream must see the name the client asked for. */
        if (is_hop_by_hop(hd->name, hd->name_len) ||
            (named_in_connection(h, hd->name, hd->name_len) &&
             !bw_http_name_eq(hd->name, hd->name_len, "host")))
            continue;
        if (bw_http_name_eq(hd->name, hd->name_len, "x-forwarded-for")) {
            if (n_xff < 16 && hd->value_len > 0) {
                xff[n_xff] = hd->value;
                xff_len[n_xff++] = hd->value_len;
            }
            continue;
        }
        if (bw_http_name_eq(hd->name, hd->name_len, "x-forwarded-proto") ||
            bw_http_name_eq(hd->name, hd->name_len, "x-request-id"))
            continue;
        if (bw_http_name_eq(hd->name, hd->name_len, "host")) {
            have_host = true;
            if (auth) {
                /* RFC 9112 3.2.2: the authority of an absolute-form target replaces Host. */
                hw_lit(&w, "Host: ");
                hw_put(&w, auth, auth_len);
                hw_lit(&w, "\r\n");
                continue;
            }
        }
        hw_put(&w, hd->name, hd->name_len);
        hw_lit(&w, ": ");
        hw_put(&w, hd->value, hd->value_len);
        hw_lit(&w, "\r\n");
    }
    if (!have_host) {
        hw_lit(&w, "Host: ");
        if (auth)
            hw_put(&w, auth, auth_len);
        else
            hw_put(&w, server, server_len);
        hw_lit(&w, "\r\n");
    }
    hw_lit(&w, "X-Forwarded-For: ");
    for (size_t i = 0; i < n_xff; i++) {
        hw_put(&w, xff[i], xff_len[i]);
        hw_lit(&w, ", ");
    }
    hw_put(&w, s->peer_ip, strlen(s->peer_ip));
    if (s->tls)
        hw_lit(&w, "\r\nX-Forwarded-Proto: https\r\nX-Request-Id: ");
    else
        hw_lit(&w, "\r\nX-Forwarded-Proto: http\r\nX-Request-Id: ");
    hw_put(&w, ex->reqid, ex->reqid_len);
    hw_lit(&w, "\r\n");
    if (ex->req_framing == BW_BODY_LENGTH) {
        hw_lit(&w, "Content-Length: ");
        hw_u64(&w, ex->req_left);
        hw_lit(&w, "\r\n");
    } else if (ex->req_framing == BW_BODY_CHUNKED) {
        hw_lit(&w, "Transfer-Encoding: chunked\r\n");
    }
    hw_lit(&w, "\r\n");
    hw_end(&w);
    return true;
}

static void set_request_id(bw_session *s, bw_exchange *ex)
{
    const bw_http_head *h = &s->req;
    for (size_t i = 0; i < h->n_headers; i++) {
        const bw_http_header *hd = &h->headers[i];
        if (bw_http_name_eq(hd->name, hd->name_len, "x-request-id") &&
            valid_request_id(hd->value, hd->value_len)) {
            memcpy(ex->reqid, hd->value, hd->value_len);
            ex->reqid_len = hd->value_len;
            return;
        }
    }
    static const char hex[] = "0123456789abcdef";
    uint64_t words[2] = {next_random(&s->w->reqid_state), next_random(&s->w->reqid_state)};
    for (int i = 0; i < 32; i++)
        ex->reqid[i] = hex[(words[i / 16] >> (60 - 4 * (i % 16))) & 0xf];
    ex->reqid_len = 32;
}

/* Appends "Name: value" to the exchange's extra response headers. */
static void add_extra(bw_exchange *ex, const char *name, unsigned long long v)
{
    char digits[20];
    size_t k = sizeof(digits), nl = strlen(name);
    do {
        digits[--k] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    size_t len = nl + 2 + (sizeof(digits) - k) + 2;
    if (ex->extra_len + len > sizeof(ex->extra))
        return;
    char *p = ex->extra + ex->extra_len;
    memcpy(p, name, nl);
    memcpy(p + nl, ": ", 2);
    memcpy(p + nl + 2, digits + k, sizeof(digits) - k);
    memcpy(p + len - 2, "\r\n", 2);
    ex->extra_len += len;
}

/* Joins every X-Forwarded-For field, in order, with ", "; keeps the right-most part when the
 * total does not fit, since the client identity is read from the right. */
static size_t joined_xff(const bw_http_head *h, char *buf, size_t cap)
{
    size_t len = 0;
    for (size_t i = 0; i < h->n_headers; i++) {
        const bw_http_header *hd = &h->headers[i];
        if (!bw_http_name_eq(hd->name, hd->name_len, "x-forwarded-for"))
            continue;
        const char *v = hd->value;
        size_t vl = hd->value_len;
        if (len + 2 + vl > cap) {
            len = 0;
            if (vl > cap)
                v += vl - cap, vl = cap;
        } else if (len > 0) {
            buf[len++] = ',';
            buf[len++] = ' ';
        }
        memcpy(buf + len, v, vl);
        len += vl;
    }
    return len;
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Rate-limit key of a request, computed before admission so that the table entry can be
 * prefetched while the upstream head is built. */
static void ratelimit_prepare(bw_session *s, bw_exchange *ex)
{
    bw_worker *w = s->w;
    const bw_config *cfg = w->cfg;
    const bw_ratelimit_conf *pc = &cfg->rate_limits[ex->route->rate_limit];
    const bw_http_head *h = &s->req;
    ex->rl_exempt = false;
    if (pc->n_exempt > 0) {
        /* Matched on the whole client address (no IPv6 grouping), found as for client_ip. */
        char xff[2048];
        size_t xl = joined_xff(h, xff, sizeof(xff));
        bw_clientip ip;
        bw_clientip_key((const struct sockaddr *)&s->peer_sa, xl ? xff : NULL, xl,
                        cfg->trusted_proxies, cfg->n_trusted_proxies, 128, &ip);
        if (bw_clientip_in(&ip, pc->exempt, pc->n_exempt)) {
            ex->rl_exempt = true;
            return;
        }
    }
    if (pc->key_kind == BW_RL_KEY_CLIENT_IP) {
        char xff[2048];
        size_t xl = joined_xff(h, xff, sizeof(xff));
        bw_clientip ip;
        bw_clientip_key((const struct sockaddr *)&s->peer_sa, xl ? xff : NULL, xl,
                        cfg->trusted_proxies, cfg->n_trusted_proxies, pc->ipv6_prefix, &ip);
        ex->rl_hash = bw_ratelimit_hash(&w->shm->hdr->rl_seed, ip.key, sizeof(ip.key));
        /* the fleet-wide name of the bucket in Redis */
        size_t n = strlen(ip.text);
        memcpy(ex->rl_keytext, ip.text, n + 1);
        ex->rl_key = ex->rl_keytext;
        ex->rl_key_len = n;
        ex->rl_digest = false;
    } else {
        /* Requests without the header share one bucket (the empty key). */
        ex->rl_key = "";
        ex->rl_key_len = 0;
        for (size_t i = 0; i < h->n_headers; i++) {
            if (bw_http_name_eq(h->headers[i].name, h->headers[i].name_len, pc->key_header)) {
                ex->rl_key = h->headers[i].value;
                ex->rl_key_len = h->headers[i].value_len;
                break;
            }
        }
        ex->rl_hash = bw_ratelimit_hash(&w->shm->hdr->rl_seed, ex->rl_key, ex->rl_key_len);
        ex->rl_digest = true; /* header values may be secrets: only a digest goes to Redis */
    }
    bw_ratelimit_prefetch(w->rl, (uint32_t)pc->shm_slot, ex->rl_hash);
}

/* The text a busiest-keys slot shows: the address, or the digest of a header value (a value
 * may be a secret; the digest is the key's name in Redis too). */
static void topkey_text(void *arg, char buf[BW_TOPKEYS_TEXT_MAX + 1])
{
    const bw_exchange *ex = arg;
    if (!ex->rl_digest) {
        snprintf(buf, BW_TOPKEYS_TEXT_MAX + 1, "%.*s", (int)ex->rl_key_len, ex->rl_key);
        return;
    }
    char name[BW_RATELIMIT_FLEET_KEY_MAX + 1];
    bw_ratelimit_fleet_key_text(ex->rl_key, ex->rl_key_len, true, name);
    snprintf(buf, BW_TOPKEYS_TEXT_MAX + 1, "%s", name);
}

/* Rate-limit admission: takes a token for the client's key or answers 429. */
static bool admit_rate_limit(bw_session *s, bw_exchange *ex)
{
    bw_worker *w = s->w;
    const bw_ratelimit_conf *pc = &w->cfg->rate_limits[ex->route->rate_limit];
    const bw_ratelimit_params *pp = &w->rl_params[ex->route->rate_limit];
    /* While Redis is unreachable, each instance may limit a key to its share of the fleet. */
    bw_ratelimit_params shared;
    uint32_t n = bw_ratelimit_fleet_share(w->rl);
    if (n > 1) {
        bw_ratelimit_params_share(pp, n, &shared);
        pp = &shared;
    }
    bw_ratelimit_result res;
    bw_ratelimit_decision d =
        bw_ratelimit_take_fleet(w->rl, (uint32_t)pc->shm_slot, ex->rl_hash, ex->rl_key,
                                ex->rl_key_len, ex->rl_digest, pp, mono_ns(), &res);
    bw_topkeys *tk = bw_shm_topkeys(w->shm, pc->shm_slot);
    if (tk)
        bw_topkeys_record(tk, ex->rl_hash, d != BW_RATELIMIT_ALLOW, res.remaining, mono_ns(),
                          topkey_text, ex);
    add_extra(ex, "RateLimit-Limit", res.limit);
    add_extra(ex, "RateLimit-Remaining", res.remaining);
    add_extra(ex, "RateLimit-Reset", bw_ratelimit_ceil_seconds(res.reset_after_ns));
    if (d == BW_RATELIMIT_ALLOW)
        return true;
    bw_metrics_rate_limited(w->shm, w->worker_slot, pc->shm_slot);
    if (d == BW_RATELIMIT_DRY_RUN) {
        bw_log_debug(w->log, "rate limit %s (dry run): would refuse client %s", pc->name,
                     s->peer_ip);
        return true;
    }
    uint64_t retry = bw_ratelimit_ceil_seconds(res.retry_after_ns);
    add_extra(ex, "Retry-After", retry ? retry : 1);
    send_error(s, 429, "rate limited");
    return false;
}

/* Breaker admission: while the upstream's breaker is open the request is answered here and the
 * upstream is not contacted at all. */
static bool admit_breaker(bw_session *s, bw_exchange *ex)
{
    bw_worker *w = s->w;
    const bw_upstream_conf *u = ex->pool->conf;
    uint64_t retry_ms = 0;
    bw_breaker_transition t = {0};
    bw_breaker_decision d = bw_breaker_allow(
        bw_shm_breaker(w->shm, u->shm_slot), &u->breaker, bw_breaker_now_ms(),
        u->connect_timeout_ms + u->response_timeout_ms, &ex->ticket, &retry_ms, &t);
    log_transition(w, u, &t);
    if (d != BW_BREAKER_REJECT) {
        ex->ticketed = true;
        return true;
    }
    add_extra(ex, "Retry-After", bw_breaker_retry_after_s(retry_ms));
    send_error(s, 503, "circuit open");
    return false;
}

/* /healthz and /readyz answered on a traffic listener. */
static bool answer_probe(bw_session *s, const char *path, size_t path_len)
{
    bw_exchange *ex = &s->ex;
    bw_worker *w = s->w;
    bool healthz = path_len == 8 && memcmp(path, "/healthz", 8) == 0;
    bool readyz = path_len == 7 && memcmp(path, "/readyz", 7) == 0;
    if (!healthz && !readyz)
        return false;
    ex->quiet = true;
    if (!ex->req_done)
        s->close_after = true;
    if (healthz) {
        send_local(s, 200, "ok\n", "text/plain", false);
        return true;
    }
    struct evbuffer *body = evbuffer_new();
    if (!body) {
        send_error(s, 500, "out of memory");
        return true;
    }
    int status = bw_probes_readyz(w->shm, w->cfg, w->draining, bw_probes_wall_ms(), body);
    size_t n = evbuffer_get_length(body);
    char *text = malloc(n + 1);
    if (text) {
        evbuffer_remove(body, text, n);
        text[n] = 0;
        send_local(s, status, text, "application/json", false);
        free(text);
    } else {
        send_error(s, 500, "out of memory");
    }
    evbuffer_free(body);
    return true;
}

/* A complete, valid head is in s->req: decide what to do with the request. */
static void dispatch_request(bw_session *s)
{
    bw_exchange *ex = &s->ex;
    const bw_config *cfg = s->w->cfg;
    const bw_http_head *h = &s->req;

    ex->req_framing = h->framing;
    ex->req_left = h->framing == BW_BODY_LENGTH ? h->content_length : 0;
    ex->req_done =
        h->framing == BW_BODY_NONE || (h->framing == BW_BODY_LENGTH && h->content_length == 0);
    if (h->framing == BW_BODY_CHUNKED)
        bw_chunked_init(&ex->req_chunk);
    if (h->conn_close)
        s->close_after = true;
    set_request_id(s, ex);

    if (h->expect_other) {
        send_error(s, 417, "unsupported expectation");
        return;
    }
    if (h->method == BW_METHOD_CONNECT) {
        send_error(s, 405, "CONNECT not supported");
        return;
    }
    if (cfg->limits.max_body_bytes && h->framing == BW_BODY_LENGTH &&
        h->content_length > cfg->limits.max_body_bytes) {
        send_error(s, 413, "body too large");
        return;
    }

    const char *auth, *path;
    size_t auth_len, path_len;
    split_target(h, &auth, &auth_len, &path, &path_len);
    if (!normalize_target(s, &path, &path_len))
        return;
    const char *host = auth;
    size_t host_len = auth_len;
    if (!host && h->host_index >= 0) {
        host = h->headers[h->host_index].value;
        host_len = h->headers[h->host_index].value_len;
    }
    /* Lower-cased, without the port and trailing dots: "API.example.com.:80" is
     * "api.example.com". A host too long to hold matches no host route. */
    char hn[256];
    size_t hn_len = host ? bw_host_normalize(host, host_len, hn, sizeof(hn)) : 0;

    if (cfg->probes_on_listeners && (h->method == BW_METHOD_GET || h->method == BW_METHOD_HEAD) &&
        answer_probe(s, path, path_len))
        return;

    const bw_route_conf *r = match_route(cfg, hn, hn_len, path, path_len);
    if (!r) {
        send_error(s, 404, "no route");
        return;
    }
    ex->route = r;
    ex->pool = &s->w->pools[r->upstream];
    ex->idempotent = bw_http_method_idempotent(h->method);
    if (r->rate_limit >= 0)
        ratelimit_prepare(s, ex);

    ex->replay = s->replay_buf;
    ex->replayable = true;
    if (!build_upstream_head(s, ex, auth, auth_len, path, path_len)) {
        send_error(s, 500, "out of memory");
        return;
    }
    /* Admission comes after the head is built only so that the rate-limit entry's cache miss
     * overlaps that work; nothing has been sent anywhere yet. */
    if (ex->route->rate_limit >= 0 && !ex->rl_exempt && !admit_rate_limit(s, ex))
        return;

    if (h->expect_continue && !ex->req_done && h->version_minor == 1) {
        /* We answer the expectation ourselves and strip it: the body is streamed anyway. */
        evbuffer_add(bufferevent_get_output(s->bev), "HTTP/1.1 100 Continue\r\n\r\n", 25);
        client_kick(s);
    }
    /* While the body waits for the upstream connection, buffer at most BW_HIGH_WATER of it. */
    bufferevent_setwatermark(s->bev, EV_READ, 0, BW_HIGH_WATER);
    if (!ex->req_done) {
        bufferevent_set_timeouts(s->bev, s->w->tv_idle, s->w->tv_idle);
    }
    uint32_t buffer_max = cfg->limits.request_buffer_bytes;
    if (!ex->req_done && r->request_buffering && buffer_max > 0 &&
        (h->framing == BW_BODY_CHUNKED || h->content_length <= buffer_max)) {
        /* A slow client must not pin an upstream connection while it dribbles a small body:
         * read it whole first (HAProxy's option http-buffer-request). Larger bodies stream. */
        ex->buffering = true;
        if (!request_body_buffered(s, ex))
            return;
        ex->buffering = false;
    }
    exchange_start_upstream(s, ex);
}

/* Breaker admission, then the first upstream attempt; after the body was buffered, if it was. */
static void exchange_start_upstream(bw_session *s, bw_exchange *ex)
{
    if (BW_INSTRUMENTED && !admit_breaker(s, ex))
        return;
    start_attempt(ex, NULL, true);
}

/*
 * True once the body being buffered is all in the client input buffer, or once more than
 * limits.request_buffer_bytes of it are there (a chunked body that turns out larger: from then
 * on it streams). Only looks at the input; forward_request_body() consumes it later.
 */
static bool request_body_buffered(bw_session *s, bw_exchange *ex)
{
    struct evbuffer *in = bufferevent_get_input(s->bev);
    size_t have = evbuffer_get_length(in);
    size_t max = s->w->cfg->limits.request_buffer_bytes;
    if (ex->req_framing == BW_BODY_LENGTH)
        return have >= ex->req_left;
    if (have > max)
        return true;
    /* Chunked: scan what is there with a scratch decoder (at most `max` bytes, so the rescans
     * on each read cost O(max) each). */
    bw_chunked c;
    bw_chunked_init(&c);
    struct evbuffer_iovec vec[64];
    int n = evbuffer_peek(in, -1, NULL, vec, 64);
    if (n > 64)
        return true; /* too fragmented to judge cheaply: stream it */
    for (int i = 0; i < n; i++) {
        size_t used = bw_chunked_feed(&c, vec[i].iov_base, vec[i].iov_len, NULL, NULL);
        if (c.state == BW_CHUNK_DONE || c.state == BW_CHUNK_ERROR)
            return true; /* complete, or malformed: forward_request_body() answers that */
        if (used < vec[i].iov_len)
            break;
    }
    return false;
}

static void session_try_head(bw_session *s)
{
    bw_worker *w = s->w;
    struct evbuffer *in = bufferevent_get_input(s->bev);
    size_t len = evbuffer_get_length(in);

    /* A client that pipelines requests but does not read the responses must not make the
     * proxy queue them without end: while more than one response's worth of output waits, the
     * next request is not parsed and nothing more is read (the kernel's buffers then fill and
     * TCP flow control stops the client). client_write_cb resumes once the output drains. */
    if (len > 0 && evbuffer_get_length(bufferevent_get_output(s->bev)) > BW_HIGH_WATER) {
        s->output_held = true;
        /* The client is slow to read, not slow to send: no header deadline while held; the
         * write timeout (idle_timeout_ms) bounds how long it may take. */
        evtimer_del(s->timer);
        s->head_timer = false;
        bufferevent_disable(s->bev, EV_READ);
        if (!s->tls)
            bufferevent_enable(s->bev, EV_WRITE);
        return;
    }

    /* RFC 9112 2.2: ignore empty lines before a request line. */
    while (len >= 2 && s->scanned == 0) {
        unsigned char two[2];
        evbuffer_copyout(in, two, 2);
        if (two[0] != '\r' || two[1] != '\n')
            break;
        evbuffer_drain(in, 2);
        len -= 2;
    }
    if (len == 0)
        return;
    arm_head_timer(s, true);

    size_t limit = w->cfg->limits.max_header_bytes;
    size_t window = len < limit + 4 ? len : limit + 4;
    const char *p = (const char *)evbuffer_pullup(in, (ev_ssize_t)window);
    size_t head_len = bw_http_head_scan(p, window, &s->scanned);
    bw_exchange *ex = &s->ex;
    if (head_len == 0 && !plausible_request_start(p, window)) {
        /* Not HTTP at all (a TLS ClientHello on a plain port, say): no need to wait for a
         * blank line that will never come. */
        head_len = window;
        evtimer_del(s->timer);
        s->state = SS_EXCHANGE;
        ex->wall_start_ms = wall_ms();
        clock_gettime(CLOCK_MONOTONIC, &ex->t_start);
        ex->req_done = true;
        evbuffer_drain(in, len);
        send_error(s, 400, "not an HTTP request");
        return;
    }
    if (head_len == 0) {
        if (len > limit) {
            s->state = SS_EXCHANGE;
            ex->wall_start_ms = wall_ms();
            clock_gettime(CLOCK_MONOTONIC, &ex->t_start);
            ex->req_done = true;
            evbuffer_drain(in, len);
            send_error(s, 431, "request head too large");
        }
        return;
    }
    evtimer_del(s->timer);
    s->state = SS_EXCHANGE;
    ex->wall_start_ms = wall_ms();
    clock_gettime(CLOCK_MONOTONIC, &ex->t_start);
    ex->connect_ms = -1;
    ex->response_ms = -1;
    if (head_len > limit) {
        ex->req_done = true;
        send_error(s, 431, "request head too large");
        return;
    }
    if (s->head_cap < head_len) {
        size_t cap = head_len < 4096 ? 4096 : head_len;
        char *nh = realloc(s->head, cap);
        if (!nh) {
            ex->req_done = true;
            send_error(s, 500, "out of memory");
            return;
        }
        s->head = nh;
        s->head_cap = cap;
    }
    memcpy(s->head, p, head_len);
    evbuffer_drain(in, head_len);

    bw_http_status st =
        bw_http_parse_request(s->head, head_len, w->cfg->limits.max_headers, &s->req);
    if (st != BW_HTTP_OK) {
        bw_log_debug(w->log, "client %s: refused request: %s", s->peer,
                     s->req.error ? s->req.error : "invalid");
        ex->req_done = true;
        s->req.method_str = NULL; /* nothing of it is trustworthy enough to log as fields */
        send_error(s, (int)st, s->req.error ? s->req.error : "invalid request");
        return;
    }
    dispatch_request(s);
}

/* ---------------------------------------------------------------------------------------- */
/* Request body: client -> upstream                                                          */

static void add_upstream(bw_exchange *ex, struct evbuffer *out, struct evbuffer *src, size_t n)
{
    if (ex->replayable) {
        if (evbuffer_get_length(ex->replay) + n <= BW_REPLAY_MAX) {
            /* keep a copy for a possible retry */
            struct evbuffer_ptr pos;
            evbuffer_ptr_set(src, &pos, 0, EVBUFFER_PTR_SET);
            char tmp[16384];
            size_t done = 0;
            while (done < n) {
                size_t k = n - done < sizeof(tmp) ? n - done : sizeof(tmp);
                evbuffer_ptr_set(src, &pos, done, EVBUFFER_PTR_SET);
                ev_ssize_t got = evbuffer_copyout_from(src, &pos, tmp, k);
                if (got <= 0)
                    break;
                evbuffer_add(ex->replay, tmp, (size_t)got);
                done += (size_t)got;
            }
        } else {
            ex->replayable = false;
            evbuffer_drain(ex->replay, evbuffer_get_length(ex->replay));
            ex->replay = NULL;
        }
    }
    evbuffer_remove_buffer(src, out, n);
    ex->out_added += n;
    ex->bytes_in += n;
    ex->req_started = true;
}

static void request_body_done(bw_exchange *ex)
{
    ex->req_done = true;
    if (ex->uc && ex->uc->connected && ex->rstate == RS_WAIT_HEAD) {
        bufferevent_set_timeouts(ex->uc->bev, ex->pool->tv_response, ex->pool->tv_response);
    }
    /* Pipelined bytes may follow; keep them bounded until this exchange ends. */
    bw_session *s = ex->s;
    bufferevent_setwatermark(s->bev, EV_READ, 0, s->w->cfg->limits.max_header_bytes + 4096);
    bufferevent_set_timeouts(s->bev, NULL, s->w->tv_idle);
}

/* Bytes of a chunked body that form a prefix of valid encoding, fed across evbuffer segments. */
static size_t chunked_scan(bw_chunked *c, struct evbuffer *in, bw_chunk_data_fn fn, void *arg)
{
    size_t total = 0;
    struct evbuffer_iovec vec[16];
    int n = evbuffer_peek(in, -1, NULL, vec, 16);
    if (n > 16)
        n = 16;
    for (int i = 0; i < n; i++) {
        size_t used = bw_chunked_feed(c, vec[i].iov_base, vec[i].iov_len, fn, arg);
        total += used;
        if (c->state == BW_CHUNK_DONE || c->state == BW_CHUNK_ERROR || used < vec[i].iov_len)
            break;
    }
    return total;
}

static void count_decoded(void *arg, const char *data, size_t len)
{
    (void)data;
    bw_exchange *ex = arg;
    ex->req_decoded += len;
}

static void forward_request_body(bw_exchange *ex)
{
    bw_session *s = ex->s;
    if (!ex->uc || !ex->uc->connected)
        return;
    if (ex->req_done) {
        out_kick(ex->uc->bev);
        return;
    }
    struct evbuffer *in = bufferevent_get_input(s->bev);
    struct evbuffer *out = bufferevent_get_output(ex->uc->bev);
    const bw_config *cfg = s->w->cfg;
    size_t avail = evbuffer_get_length(in);

    if (ex->req_framing == BW_BODY_LENGTH) {
        size_t n = avail < ex->req_left ? avail : (size_t)ex->req_left;
        if (n > 0) {
            add_upstream(ex, out, in, n);
            ex->req_left -= n;
        }
        if (ex->req_left == 0)
            request_body_done(ex);
    } else if (ex->req_framing == BW_BODY_CHUNKED && avail > 0) {
        /* chunked_scan() looks at a bounded number of buffer segments per call; what the
         * client sent while the upstream connection was being made can span many more, and no
         * further read event will come for bytes already read: scan until all is taken. */
        size_t n;
        do {
            n = chunked_scan(&ex->req_chunk, in, count_decoded, ex);
            if (cfg->limits.max_body_bytes && ex->req_decoded > cfg->limits.max_body_bytes)
                break;
            if (n > 0)
                add_upstream(ex, out, in, n);
        } while (n > 0 && ex->req_chunk.state != BW_CHUNK_DONE &&
                 ex->req_chunk.state != BW_CHUNK_ERROR && evbuffer_get_length(in) > 0);
        if (cfg->limits.max_body_bytes && ex->req_decoded > cfg->limits.max_body_bytes) {
            ex->error = "body too large";
            exchange_release_upstream(ex, false);
            if (!ex->resp_started)
                send_error(s, 413, "body too large");
            else
                session_abort(s);
            return;
        }
        if (ex->req_chunk.state == BW_CHUNK_ERROR) {
            bw_log_debug(s->w->log, "client %s: malformed chunked body: %s", s->peer,
                         ex->req_chunk.error ? ex->req_chunk.error : "?");
            /* The upstream has a partial request: it must never see it completed. */
            exchange_release_upstream(ex, false);
            ex->req_done = true;
            if (!ex->resp_started)
                send_error(s, 400, "malformed chunked body");
            else
                session_abort(s);
            return;
        }
        if (ex->req_chunk.state == BW_CHUNK_DONE)
            request_body_done(ex);
    }

    out_kick(ex->uc->bev);
    if (!ex->req_done && evbuffer_get_length(out) > BW_HIGH_WATER) {
        bufferevent_disable(s->bev, EV_READ);
        ex->client_paused = true;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Upstream connection                                                                       */

static void up_read_cb(struct bufferevent *bev, void *arg);
static void up_write_cb(struct bufferevent *bev, void *arg);
static void up_event_cb(struct bufferevent *bev, short what, void *arg);

/* A TLS upstream refused or failed the handshake: one clear line, and the reason kept in the
 * server's record for /upstreams. */
static void upstream_tls_failed(bw_exchange *ex, unsigned long e)
{
    bw_upconn *uc = ex->uc;
    SSL *ssl = bufferevent_openssl_get_ssl(uc->bev);
    if (ssl == NULL ||
        (e == 0 && SSL_get_verify_result(ssl) == X509_V_OK && SSL_get_state(ssl) == TLS_ST_BEFORE))
        return; /* the TCP connect itself failed: nothing TLS to say */
    char why[300];
    int code = bw_upstream_tls_failure(ssl, e, why, sizeof(why));
    bw_log_warn(ex->s->w->log, "upstream %s: server %s: %s", ex->pool->conf->name,
                ex->server->conf->address, why);
    if (ex->server->health) {
        atomic_store(&ex->server->health->tls_error, code > 0 ? code : -1);
        atomic_store(&ex->server->health->tls_error_wall_ms, (uint64_t)wall_ms());
    }
}

static void upstream_connected(bw_exchange *ex)
{
    bw_upconn *uc = ex->uc;
    uc->connected = true;
    if (ex->pool->tls_ctx && ex->server->health &&
        atomic_load_explicit(&ex->server->health->tls_error, memory_order_relaxed) != 0)
        atomic_store(&ex->server->health->tls_error, 0);
    if (ex->connect_ms < 0)
        ex->connect_ms = ms_since(&ex->t_attempt);
    const struct timeval *rt = ex->pool->tv_response;
    bufferevent_set_timeouts(uc->bev, ex->req_done ? rt : NULL, rt);
    bufferevent_setwatermark(uc->bev, EV_WRITE, BW_LOW_WATER, 0);
    bufferevent_disable(uc->bev, EV_WRITE);
    bufferevent_enable(uc->bev, EV_READ);
    /* Body bytes already here are judged before anything is written, so that a malformed
     * chunked body arriving with its head never reaches the upstream at all. */
    forward_request_body(ex);
}

/* Sends the request (head and the body held for replay) on a connection to `same`, or to a
 * server the balancer picks. A server whose connect fails at once is skipped while the retry
 * budget lasts. */
static void start_attempt(bw_exchange *ex, bw_server *same, bool allow_reuse)
{
    bw_session *s = ex->s;
    bw_upconn *uc;
    for (;;) {
        bw_server *server =
            same ? same : bw_upstream_pick(ex->pool, ex->server, bw_breaker_now_ms());
        same = NULL;
        if (server == NULL) {
            /* A DNS-named upstream with no address yet (or none left). */
            ex->error = "no servers";
            send_error(s, 503, "no servers");
            return;
        }
        ex->server = server;
        ex->attempts++;
        clock_gettime(CLOCK_MONOTONIC, &ex->t_attempt);
        errno = 0;
        uc = bw_upstream_acquire(server, allow_reuse);
        if (uc)
            break;
        bw_log_warn(s->w->log, "upstream %s: cannot connect to %s: %s", ex->pool->conf->name,
                    server->conf->address,
                    ex->pool->tls_error[0] ? ex->pool->tls_error
                                           : strerror(errno ? errno : ECONNREFUSED));
        /* A connect that fails at once (EMFILE, EADDRNOTAVAIL, ENETUNREACH) is a connect
         * failure like a refused one: counted, and owed to the breaker if it is the last. */
        if (BW_INSTRUMENTED)
            bw_metrics_upstream_error(s->w->shm, s->w->worker_slot, ex->pool->conf->shm_slot,
                                      BW_UPERR_CONNECT);
        server_outcome(s, ex, server, true);
        if (ex->attempts > (int)ex->pool->conf->retries || !ex->replayable) {
            ex->error = "connect";
            ex->failed = true;
            ex->failure = UF_CONNECT;
            send_error(s, 502, "upstream connect failed");
            return;
        }
        allow_reuse = false;
    }
    ex->uc = uc;
    uc->owner = ex;
    ex->rstate = RS_WAIT_HEAD;
    ex->resp_scanned = 0;
    bufferevent_setcb(uc->bev, up_read_cb, up_write_cb, up_event_cb, ex);
    size_t rlen = evbuffer_get_length(ex->replay);
    evbuffer_add(bufferevent_get_output(uc->bev), evbuffer_pullup(ex->replay, -1), rlen);
    ex->out_added = rlen;
    if (uc->connected)
        upstream_connected(ex);
    else
        bufferevent_enable(uc->bev, EV_READ | EV_WRITE);
}

typedef enum retry_kind {
    RETRY_NONE,
    RETRY_SAME_FRESH, /* the pooled connection was stale: same server, new connection */
    RETRY_OTHER,      /* next server by the balancing rule */
} retry_kind;

/* Decides whether a failed attempt may be repeated, per the rules at the top of the file. */
static retry_kind may_retry(bw_exchange *ex, up_failure why, bool nothing_written, bool was_reused)
{
    if (ex->resp_started || !ex->replayable || !ex->replay)
        return RETRY_NONE;
    if (was_reused && why == UF_RESET && !ex->fresh_retry_used &&
        (ex->idempotent || nothing_written)) {
        ex->fresh_retry_used = true;
        return RETRY_SAME_FRESH;
    }
    if (ex->attempts > (int)ex->pool->conf->retries)
        return RETRY_NONE;
    if (why == UF_CONNECT || why == UF_CONNECT_TIMEOUT)
        return RETRY_OTHER;
    if (why == UF_INVALID || !ex->idempotent || ex->pool->n_servers < 2)
        return RETRY_NONE;
    return RETRY_OTHER;
}

static const char *failure_name(up_failure why)
{
    switch (why) {
    case UF_CONNECT:
        return "connect";
    case UF_CONNECT_TIMEOUT:
        return "connect timeout";
    case UF_RESET:
        return "reset";
    case UF_TIMEOUT:
        return "timeout";
    case UF_INVALID:
        return "invalid response";
    }
    return "?";
}

static void upstream_failed(bw_exchange *ex, up_failure why)
{
    bw_session *s = ex->s;
    bw_upconn *uc = ex->uc;
    bool was_reused = uc && uc->reused;
    size_t unsent = uc ? evbuffer_get_length(bufferevent_get_output(uc->bev)) : 0;
    bool nothing_written = uc && unsent >= ex->out_added;
    const char *addr = ex->server ? ex->server->conf->address : "?";
    exchange_release_upstream(ex, false);

    if (BW_INSTRUMENTED && !(was_reused && why == UF_RESET))
        bw_metrics_upstream_error(s->w->shm, s->w->worker_slot, ex->pool->conf->shm_slot,
                                  error_kind(why));
    if (!(was_reused && why == UF_RESET)) {
        bw_log_warn(s->w->log, "upstream %s: server %s: %s (attempt %d)", ex->pool->conf->name,
                    addr, failure_name(why), ex->attempts);
        server_outcome(s, ex, ex->server, true);
    }
    switch (may_retry(ex, why, nothing_written, was_reused)) {
    case RETRY_SAME_FRESH:
        ex->attempts--; /* a stale pooled connection does not use up the retry budget */
        start_attempt(ex, ex->server, false);
        return;
    case RETRY_OTHER:
        start_attempt(ex, NULL, true);
        return;
    case RETRY_NONE:
        break;
    }
    ex->error = failure_name(why);
    ex->failed = true;
    ex->failure = why;
    if (ex->resp_started) {
        /* The client already has part of the response: cutting the connection is the only
         * honest signal left. */
        session_abort(s);
        return;
    }
    int status = (why == UF_TIMEOUT || why == UF_CONNECT_TIMEOUT) ? 504 : 502;
    send_error(s, status, ex->error);
}

static void up_event_cb(struct bufferevent *bev, short what, void *arg)
{
    (void)bev;
    bw_exchange *ex = arg;
    bw_upconn *uc = ex->uc;
    if (what & BEV_EVENT_CONNECTED) {
        upstream_connected(ex);
        return;
    }
    if (what & BEV_EVENT_TIMEOUT) {
        upstream_failed(ex, uc->connected ? UF_TIMEOUT : UF_CONNECT_TIMEOUT);
        return;
    }
    if (!uc->connected) {
        if (ex->pool->tls_ctx)
            upstream_tls_failed(ex, bufferevent_get_openssl_error(uc->bev));
        upstream_failed(ex, UF_CONNECT);
        return;
    }
    if (ex->pool->tls_ctx && (what & BEV_EVENT_ERROR)) {
        /* TLS 1.3 finishes the client's handshake before the server judges the client
         * certificate: its refusal arrives as an alert on the first read. */
        unsigned long e = bufferevent_get_openssl_error(uc->bev);
        if (e != 0)
            upstream_tls_failed(ex, e);
    }
    if ((what & BEV_EVENT_EOF) && ex->rstate == RS_BODY && ex->resp_framing == BW_BODY_CLOSE) {
        /* Let the read path take what is buffered, then end the body. */
        forward_response_body(ex);
        if (ex->rstate != RS_BODY)
            return;
        struct evbuffer *out = bufferevent_get_output(ex->s->bev);
        if (ex->resp_chunk_encode) {
            evbuffer_add(out, "0\r\n\r\n", 5);
            ex->bytes_out += 5;
        }
        ex->up_keepalive = false;
        ex->rstate = RS_DONE;
        exchange_finish(ex);
        return;
    }
    upstream_failed(ex, UF_RESET);
}

static void up_write_cb(struct bufferevent *bev, void *arg)
{
    bw_exchange *ex = arg;
    if (ex->client_paused && !ex->req_done) {
        ex->client_paused = false;
        bufferevent_enable(ex->s->bev, EV_READ);
        forward_request_body(ex);
        return;
    }
    out_idle(bev);
}

static void dechunk_cb(void *arg, const char *data, size_t len)
{
    bw_exchange *ex = arg;
    evbuffer_add(bufferevent_get_output(ex->s->bev), data, len);
    ex->bytes_out += len;
}

static void response_complete(bw_exchange *ex)
{
    ex->rstate = RS_DONE;
    bool reusable = ex->up_keepalive && ex->req_done && ex->uc &&
                    evbuffer_get_length(bufferevent_get_input(ex->uc->bev)) == 0;
    exchange_release_upstream(ex, reusable);
    exchange_finish(ex);
}

static void forward_response_body(bw_exchange *ex)
{
    bw_session *s = ex->s;
    struct evbuffer *in = bufferevent_get_input(ex->uc->bev);
    struct evbuffer *out = bufferevent_get_output(s->bev);
    size_t avail = evbuffer_get_length(in);

    switch (ex->resp_framing) {
    case BW_BODY_LENGTH: {
        size_t n = avail < ex->resp_left ? avail : (size_t)ex->resp_left;
        if (n) {
            evbuffer_remove_buffer(in, out, n);
            ex->resp_left -= n;
            ex->bytes_out += n;
        }
        if (ex->resp_left == 0) {
            response_complete(ex);
            return;
        }
        break;
    }
    case BW_BODY_CHUNKED: {
        if (avail == 0)
            break;
        size_t n = chunked_scan(&ex->resp_chunk, in, ex->resp_dechunk ? dechunk_cb : NULL, ex);
        if (ex->resp_dechunk) {
            evbuffer_drain(in, n);
        } else {
            evbuffer_remove_buffer(in, out, n);
            ex->bytes_out += n;
        }
        if (ex->resp_chunk.state == BW_CHUNK_ERROR) {
            bw_log_warn(s->w->log, "upstream %s: server %s: malformed chunked response: %s",
                        ex->pool->conf->name, ex->server->conf->address,
                        ex->resp_chunk.error ? ex->resp_chunk.error : "?");
            ex->error = "invalid response body";
            session_abort(s);
            return;
        }
        if (ex->resp_chunk.state == BW_CHUNK_DONE) {
            response_complete(ex);
            return;
        }
        break;
    }
    case BW_BODY_CLOSE:
        if (avail == 0)
            break;
        if (ex->resp_chunk_encode) {
            char hdr[24];
            int k = snprintf(hdr, sizeof(hdr), "%zx\r\n", avail);
            evbuffer_add(out, hdr, (size_t)k);
            evbuffer_remove_buffer(in, out, avail);
            evbuffer_add(out, "\r\n", 2);
            ex->bytes_out += avail + (size_t)k + 2;
        } else {
            evbuffer_remove_buffer(in, out, avail);
            ex->bytes_out += avail;
        }
        break;
    case BW_BODY_NONE:
        response_complete(ex);
        return;
    }
    client_kick(s);
    if (evbuffer_get_length(out) > BW_HIGH_WATER && ex->uc) {
        bufferevent_disable(ex->uc->bev, EV_READ);
        ex->up_paused = true;
    }
}

/* Writes the client-facing response head for a parsed upstream head. */
static bool write_response_head(bw_exchange *ex, const bw_http_head *r)
{
    bw_session *s = ex->s;
    struct evbuffer *out = bufferevent_get_output(s->bev);
    bool client11 = s->req.version_minor == 1;

    size_t bound = 128 + r->reason_len + ex->extra_len;
    for (size_t i = 0; i < r->n_headers; i++)
        bound += r->headers[i].name_len + r->headers[i].value_len + 6;
    head_writer w;
    if (!hw_begin(&w, out, bound))
        return false;
    hw_lit(&w, "HTTP/1.1 ");
    hw_u64(&w, (uint64_t)r->status);
    hw_lit(&w, " ");
    hw_put(&w, r->reason, r->reason_len);
    hw_lit(&w, "\r\n");
    /* Content-Length is meaningful on HEAD and 304 responses too: keep it as sent there. A 1xx
     * or 204 never carries Content-Length or Transfer-Encoding (RFC 9110 8.6, RFC 9112 6.1). */
    bool no_body = ex->resp_framing == BW_BODY_NONE && r->status >= 200 && r->status != 204;
    for (size_t i = 0; i < r->n_headers; i++) {
        const bw_http_header *hd = &r->headers[i];
        bool keep_cl = no_body && bw_http_name_eq(hd->name, hd->name_len, "content-length");
        if (!keep_cl && (is_hop_by_hop(hd->name, hd->name_len) ||
                         named_in_connection(r, hd->name, hd->name_len)))
            continue;
        hw_put(&w, hd->name, hd->name_len);
        hw_lit(&w, ": ");
        hw_put(&w, hd->value, hd->value_len);
        hw_lit(&w, "\r\n");
    }
    if (ex->resp_framing == BW_BODY_LENGTH) {
        hw_lit(&w, "Content-Length: ");
        hw_u64(&w, r->content_length);
        hw_lit(&w, "\r\n");
    } else if (ex->resp_framing == BW_BODY_CHUNKED || ex->resp_framing == BW_BODY_CLOSE) {
        if (client11) {
            hw_lit(&w, "Transfer-Encoding: chunked\r\n");
            ex->resp_chunk_encode = ex->resp_framing == BW_BODY_CLOSE;
        } else {
            ex->resp_dechunk = ex->resp_framing == BW_BODY_CHUNKED;
            s->close_after = true; /* an HTTP/1.0 client learns the end from the close */
        }
    }
    if (ex->extra_len)
        hw_put(&w, ex->extra, ex->extra_len);
    if (s->w->draining)
        s->close_after = true;
    if (s->close_after)
        hw_lit(&w, "Connection: close\r\n");
    else if (!client11)
        hw_lit(&w, "Connection: keep-alive\r\n");
    hw_lit(&w, "\r\n");
    ex->bytes_out += w.n;
    hw_end(&w);
    ex->resp_started = true;
    return true;
}

static void read_response_head(bw_exchange *ex)
{
    bw_session *s = ex->s;
    struct evbuffer *in = bufferevent_get_input(ex->uc->bev);
    for (;;) {
        size_t len = evbuffer_get_length(in);
        if (len == 0)
            return;
        size_t window = len < BW_RESPONSE_HEAD_MAX ? len : BW_RESPONSE_HEAD_MAX;
        const char *p = (const char *)evbuffer_pullup(in, (ev_ssize_t)window);
        size_t head_len = bw_http_head_scan(p, window, &ex->resp_scanned);
        if (head_len == 0) {
            if (len >= BW_RESPONSE_HEAD_MAX)
                upstream_failed(ex, UF_INVALID);
            return;
        }
        /* The parsed head only lives until the client's head is written, within this call:
         * one scratch struct per worker serves every response. */
        bw_http_head *r = s->w->resp_head;
        bw_http_status st =
            bw_http_parse_response(p, head_len, BW_HTTP_MAX_HEADERS_HARD, s->req.method, r);
        if (st != BW_HTTP_OK) {
            bw_log_warn(s->w->log, "upstream %s: server %s: invalid response head: %s",
                        ex->pool->conf->name, ex->server->conf->address, r->error ? r->error : "?");
            upstream_failed(ex, UF_INVALID);
            return;
        }
        if (r->status >= 100 && r->status < 200) {
            /* Interim responses: 100 is ours to send (we handled Expect), others are dropped;
             * 101 cannot happen since Upgrade is never forwarded, so treat it as invalid. */
            int code = r->status;
            evbuffer_drain(in, head_len);
            ex->resp_scanned = 0;
            if (code == 101) {
                upstream_failed(ex, UF_INVALID);
                return;
            }
            continue;
        }
        ex->response_ms = ms_since(&ex->t_attempt);
        ex->status = r->status;
        ex->resp_framing = r->framing;
        ex->resp_left = r->framing == BW_BODY_LENGTH ? r->content_length : 0;
        if (r->framing == BW_BODY_CHUNKED)
            bw_chunked_init(&ex->resp_chunk);
        ex->up_keepalive = r->version_minor == 1 ? !r->conn_close : r->conn_keep_alive;
        if (r->framing == BW_BODY_CLOSE)
            ex->up_keepalive = false;
        bool written = write_response_head(ex, r);
        if (!written) {
            upstream_failed(ex, UF_INVALID);
            return;
        }
        server_outcome(s, ex, ex->server,
                       bw_breaker_is_failure_status(&ex->pool->conf->breaker, ex->status));
        /* A probe is decided by its head: a long or streaming body must not hold the permit
         * past its lease, nor have its answer discarded as stale when it finally ends. */
        if (ex->ticketed && ex->ticket.probe)
            report_outcome(s, ex);
        evbuffer_drain(in, head_len);
        ex->rstate = RS_BODY;
        /* From here on the read timeout is the gap allowed between body reads. */
        forward_response_body(ex);
        return;
    }
}

static void up_read_cb(struct bufferevent *bev, void *arg)
{
    (void)bev;
    bw_exchange *ex = arg;
    if (ex->rstate == RS_WAIT_HEAD)
        read_response_head(ex);
    else if (ex->rstate == RS_BODY)
        forward_response_body(ex);
}

/* ---------------------------------------------------------------------------------------- */
/* Client connection callbacks                                                               */

static void client_read_cb(struct bufferevent *bev, void *arg)
{
    bw_session *s = arg;
    switch (s->state) {
    case SS_HEAD:
        session_try_head(s);
        break;
    case SS_EXCHANGE:
        if (s->ex.buffering) {
            if (request_body_buffered(s, &s->ex)) {
                s->ex.buffering = false;
                exchange_start_upstream(s, &s->ex);
            }
        } else if (!s->ex.req_done) {
            forward_request_body(&s->ex);
        }
        break;
    case SS_CLOSING:
        evbuffer_drain(bufferevent_get_input(bev), evbuffer_get_length(bufferevent_get_input(bev)));
        break;
    }
}

static void client_write_cb(struct bufferevent *bev, void *arg)
{
    bw_session *s = arg;
    if (s->state == SS_CLOSING) {
        if (evbuffer_get_length(bufferevent_get_output(bev)) == 0)
            session_free(s);
        return;
    }
    bw_exchange *ex = &s->ex;
    if (s->state == SS_HEAD && s->output_held &&
        evbuffer_get_length(bufferevent_get_output(bev)) <= BW_LOW_WATER) {
        s->output_held = false;
        if (!s->tls)
            out_idle(bev);
        session_next(s); /* reads again and parses what was held back */
        return;
    }
    if (s->state == SS_EXCHANGE && ex->up_paused && ex->uc &&
        evbuffer_get_length(bufferevent_get_output(bev)) <= BW_LOW_WATER) {
        ex->up_paused = false;
        bufferevent_enable(ex->uc->bev, EV_READ);
        forward_response_body(ex);
        return; /* the session may be gone; forward_response_body kicked the output */
    }
    if (!s->tls)
        out_idle(bev);
}

static void client_event_cb(struct bufferevent *bev, short what, void *arg)
{
    (void)bev;
    bw_session *s = arg;
    if (what & BEV_EVENT_CONNECTED)
        return; /* TLS handshake finished */
    if (what & BEV_EVENT_ERROR)
        ERR_clear_error();
    if ((what & BEV_EVENT_EOF) && s->state == SS_EXCHANGE && s->ex.req_done &&
        !(what & BEV_EVENT_ERROR)) {
        /* A client may half-close after sending its request: answer it, then close. */
        s->close_after = true;
        return;
    }
    if (s->state == SS_EXCHANGE && !s->ex.error)
        s->ex.error = (what & BEV_EVENT_TIMEOUT) ? "client timeout" : "client closed";
    if (s->state == SS_EXCHANGE && s->ex.pool) {
        if (!s->ex.resp_started)
            s->ex.status = 499; /* nginx's code for "client closed request" */
        exchange_record(s, &s->ex);
    }
    session_free(s);
}

/* ---------------------------------------------------------------------------------------- */

/*
 * Draining. Closing an idle keep-alive connection races with a request the client may already
 * have sent (or is sending): the request would be lost with the connection. So every connection
 * is only marked: its next response says `Connection: close` and the connection ends after it.
 * Connections with nothing received are closed by bw_proxy_close_idle once drain_idle_grace_ms
 * has passed, which leaves a busy client time to see the close on a response.
 */
void bw_proxy_drain(bw_worker *w)
{
    for (bw_session *s = w->sessions; s; s = s->next)
        s->close_after = true;
}

/* True when nothing of a next request has arrived: not in the input buffer, not in the kernel's
 * receive queue (read events of this loop iteration may not have run yet). */
static bool session_idle(bw_session *s)
{
    if (s->state != SS_HEAD || evbuffer_get_length(bufferevent_get_input(s->bev)) > 0)
        return false;
    int queued = 0;
    if (ioctl(bufferevent_getfd(s->bev), FIONREAD, &queued) == 0 && queued > 0)
        return false;
    return true;
}

size_t bw_proxy_close_idle(bw_worker *w)
{
    size_t closed = 0;
    bw_session *s = w->sessions;
    while (s) {
        bw_session *next = s->next;
        if (session_idle(s)) {
            session_free(s);
            closed++;
        }
        s = next;
    }
    return closed;
}

void bw_proxy_close_all(bw_worker *w)
{
    while (w->sessions)
        session_free(w->sessions);
}
