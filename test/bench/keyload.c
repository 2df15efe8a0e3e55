/*
 * A small, paced HTTP/1.1 load generator for the fleet benchmarks (test/bench/fleet_scale.sh):
 * GET / with "X-Api-Key: <prefix><n>" to one or more loopback targets, keys taken in turn from
 * a key space of --keys, at a fixed total rate, for a fixed time. Keep-alive connections, one
 * request outstanding per connection, spread over the targets in turn. Prints one line:
 * "sent N ok N limited N other N errors N elapsed S" (and with --per-key FILE, the accepted
 * count of every key, one "key count" a line). Not a test; build and run it from the scripts:
 *
 *   cc -O2 -std=c11 -D_GNU_SOURCE test/bench/keyload.c -o build-bench/keyload
 *   build-bench/keyload --rate 20000 --keys 100000 --seconds 20 --conns 8 127.0.0.1:8080 ...
 *
 * Pacing: a request is started only when the schedule (start + sent / rate) says so, so the
 * rate holds when the proxies keep up and falls behind (reported) when they do not.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 4096
#define BUF 8192

typedef struct conn {
    int fd;
    struct sockaddr_in to;
    bool busy;
    long key;
    size_t got;
    char in[BUF];
} conn;

typedef struct run {
    double rate, seconds;
    long keys, next_key;
    const char *prefix;
    uint64_t sent, ok, limited, other, errors;
    uint32_t *accepted; /* per key, with --per-key */
} run;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int conn_open(conn *c, int ep)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0)
        return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(c->fd, (struct sockaddr *)&c->to, sizeof(c->to)) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    c->busy = false;
    c->got = 0;
    return 0;
}

static void conn_reset(conn *c, int ep, run *r)
{
    if (c->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    if (c->busy)
        r->errors++;
    c->fd = -1;
    c->busy = false;
    conn_open(c, ep);
}

/* Sends the next request on an idle connection (blocking briefly on a fresh connect). */
static void conn_send(conn *c, int ep, run *r)
{
    char req[256];
    c->key = r->next_key;
    r->next_key = (r->next_key + 1) % r->keys;
    int n = snprintf(req, sizeof(req), "GET / HTTP/1.1\r\nHost: bench\r\nX-Api-Key: %s%ld\r\n\r\n",
                     r->prefix, c->key);
    for (int tries = 0; tries < 1000; tries++) {
        ssize_t w = send(c->fd, req, (size_t)n, MSG_NOSIGNAL);
        if (w == n) {
            c->busy = true;
            c->got = 0;
            r->sent++;
            return;
        }
        if (w < 0 && (errno == EAGAIN || errno == ENOTCONN)) {
            struct timespec ts = {0, 100000};
            nanosleep(&ts, NULL);
            continue;
        }
        break;
    }
    r->errors++;
    conn_reset(c, ep, r);
}

/* Reads a response; returns true when a whole one (headers plus Content-Length body) is in. */
static bool conn_read(conn *c, int ep, run *r)
{
    for (;;) {
        ssize_t n = recv(c->fd, c->in + c->got, sizeof(c->in) - 1 - c->got, 0);
        if (n > 0) {
            c->got += (size_t)n;
            c->in[c->got] = '\0';
            char *end = strstr(c->in, "\r\n\r\n");
            if (end == NULL) {
                if (c->got >= sizeof(c->in) - 1) {
                    conn_reset(c, ep, r);
                    return false;
                }
                continue;
            }
            long len = 0;
            char *cl = strcasestr(c->in, "\r\ncontent-length:");
            if (cl != NULL && cl < end)
                len = strtol(cl + 17, NULL, 10);
            size_t need = (size_t)(end + 4 - c->in) + (size_t)len;
            if (c->got < need)
                continue;
            int status = atoi(c->in + 9);
            if (status == 200) {
                r->ok++;
                if (r->accepted != NULL)
                    r->accepted[c->key]++;
            } else if (status == 429) {
                r->limited++;
            } else {
                r->other++;
            }
            c->busy = false;
            bool closing = strcasestr(c->in, "\r\nconnection: close") != NULL;
            c->got = 0;
            if (closing)
                conn_reset(c, ep, r);
            return true;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return false;
        conn_reset(c, ep, r);
        return false;
    }
}

int main(int argc, char **argv)
{
    run r = {.rate = 1000, .seconds = 10, .keys = 1000, .prefix = "bench-client-"};
    int per_target = 8, n_targets = 0;
    const char *per_key = NULL;
    struct sockaddr_in targets[64];
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--rate") == 0 && i + 1 < argc)
            r.rate = atof(argv[++i]);
        else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc)
            r.seconds = atof(argv[++i]);
        else if (strcmp(argv[i], "--keys") == 0 && i + 1 < argc)
            r.keys = atol(argv[++i]);
        else if (strcmp(argv[i], "--conns") == 0 && i + 1 < argc)
            per_target = atoi(argv[++i]);
        else if (strcmp(argv[i], "--prefix") == 0 && i + 1 < argc)
            r.prefix = argv[++i];
        else if (strcmp(argv[i], "--per-key") == 0 && i + 1 < argc)
            per_key = argv[++i];
        else if (n_targets < 64 && strchr(argv[i], ':') != NULL) {
            char host[64];
            int port;
            if (sscanf(argv[i], "%63[^:]:%d", host, &port) != 2)
                return 2;
            struct sockaddr_in *a = &targets[n_targets++];
            memset(a, 0, sizeof(*a));
            a->sin_family = AF_INET;
            a->sin_port = htons((uint16_t)port);
            if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
                return 2;
        } else {
            fprintf(stderr, "usage: keyload [--rate R] [--seconds S] [--keys N] [--conns C] "
                            "[--prefix P] [--per-key FILE] HOST:PORT...\n");
            return 2;
        }
    }
    if (n_targets == 0 || r.keys < 1 || r.rate <= 0 || r.seconds <= 0 || per_target < 1)
        return 2;
    int n = per_target * n_targets;
    if (n > MAX_CONNS)
        n = MAX_CONNS;
    if (per_key != NULL)
        r.accepted = calloc((size_t)r.keys, sizeof(*r.accepted));
    conn *cs = calloc((size_t)n, sizeof(*cs));
    int ep = epoll_create1(0);
    if (cs == NULL || ep < 0)
        return 1;
    for (int i = 0; i < n; i++) {
        cs[i].to = targets[i % n_targets];
        cs[i].fd = -1;
        if (conn_open(&cs[i], ep) < 0)
            r.errors++;
    }
    double t0 = now_s(), end = t0 + r.seconds;
    int rr = 0;
    struct epoll_event evs[256];
    for (;;) {
        double t = now_s();
        if (t >= end)
            break;
        /* Start what the schedule allows, on idle connections taken in turn. */
        uint64_t due = (uint64_t)((t - t0) * r.rate);
        for (int scanned = 0; r.sent < due && scanned < n; scanned++) {
            conn *c = &cs[rr];
            rr = (rr + 1) % n;
            if (c->fd >= 0 && !c->busy)
                conn_send(c, ep, &r);
        }
        int k = epoll_wait(ep, evs, 256, 1);
        for (int i = 0; i < k; i++)
            conn_read(evs[i].data.ptr, ep, &r);
    }
    /* Let the last answers in (bounded). */
    double drain = now_s() + 2;
    for (;;) {
        bool busy = false;
        for (int i = 0; i < n; i++)
            busy = busy || cs[i].busy;
        if (!busy || now_s() > drain)
            break;
        int k = epoll_wait(ep, evs, 256, 10);
        for (int i = 0; i < k; i++)
            conn_read(evs[i].data.ptr, ep, &r);
    }
    for (int i = 0; i < n; i++)
        if (cs[i].busy)
            r.errors++;
    printf("sent %llu ok %llu limited %llu other %llu errors %llu elapsed %.2f\n",
           (unsigned long long)r.sent, (unsigned long long)r.ok, (unsigned long long)r.limited,
           (unsigned long long)r.other, (unsigned long long)r.errors, now_s() - t0);
    if (per_key != NULL && r.accepted != NULL) {
        FILE *f = fopen(per_key, "w");
        if (f != NULL) {
            for (long i = 0; i < r.keys; i++)
                fprintf(f, "%s%ld %u\n", r.prefix, i, r.accepted[i]);
            fclose(f);
        }
    }
    for (int i = 0; i < n; i++)
        if (cs[i].fd >= 0)
            close(cs[i].fd);
    free(cs);
    free(r.accepted);
    return 0;
}
