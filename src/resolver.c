/*
 * Resolution of upstream server names in the master (evdns), published to the workers.
 *
 * Why the master and not each worker: one resolver per instance sends one query per name and
 * interval instead of one per worker, and every worker sees the same server set, so per-server
 * health records (bound by address in shared memory) describe the servers the workers actually
 * use. The set reaches the workers through the upstream's shared table with a sequence number
 * (bw_outlier_publish / bw_outlier_members): a worker compares one word before each pick and
 * copies the set only when it changed.
 *
 * The libevent 2.1.12 quirks of shared/KNOWN-DEFECTS.md shape the code: configured "resolvers"
 * replace /etc/resolv.conf's nameservers (the base is created without them), timeout and
 * attempts come from the configuration, TTLs come from evdns_base_resolve_ipv4/ipv6 (A and AAAA
 * are asked separately), and a round's completion is counted so that a callback running before
 * its request call returns cannot end the round early. Answers are parsed by evdns itself; this
 * file only copies the addresses it hands over, and /etc/hosts is read by a pure parser of our
 * own (bw_resolver_hosts_lookup, fuzzed by its unit tests with arbitrary bytes).
 */
#include "breakwater/resolver.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <event2/dns.h>

#include "breakwater/outlier.h"
#include "breakwater/probes.h"

#define RS_MAX BW_OUTLIER_MAX_SERVERS

typedef union rs_addr {
    struct sockaddr sa;
    struct sockaddr_in in4;
    struct sockaddr_in6 in6;
} rs_addr;

/* One "name:port" entry of an upstream's servers. */
typedef struct rs_name {
    size_t server; /* index in the upstream's servers */
    rs_addr good[RS_MAX];
    size_t n_good;
    bool have_good;
    rs_addr got[RS_MAX]; /* this round */
    size_t n_got;
    int err;         /* first failure of this round (DNS_ERR_*), 0 for none */
    int64_t min_ttl; /* shortest TTL seen this round, -1 for none */
} rs_name;

typedef struct rs_upstream {
    bw_resolver *r;
    size_t up;
    rs_name *names;
    size_t n_names;
    struct event *timer;
    int pending; /* queries of this round not answered yet */
    uint32_t generation;
    char (*published)[BW_OUTLIER_KEY_MAX]; /* keys of the last published set */
    size_t n_published;
    bool ever_published;
} rs_upstream;

typedef struct rs_query {
    rs_upstream *u;
    size_t name;
} rs_query;

struct bw_resolver {
    struct event_base *base;
    struct evdns_base *dns;
    bw_shm *shm;
    const bw_config *cfg;
    bw_log *log;
    rs_upstream *ups;
    size_t n_ups;
    bool closing;
    /* scratch for building a set */
    char (*keys)[BW_OUTLIER_KEY_MAX];
    const char **keyp;
    struct sockaddr_storage *addrs;
    uint32_t *lens;
    char *hosts; /* /etc/hosts of the current round */
    size_t hosts_len;
};

static size_t addr_len(const rs_addr *a)
{
    return a->sa.sa_family == AF_INET6 ? sizeof(a->in6) : sizeof(a->in4);
}

static void addr_key(const rs_addr *a, char *buf, size_t len)
{
    bw_sockaddr s;
    memset(&s, 0, sizeof(s));
    memcpy(&s.ss, a, addr_len(a));
    s.len = (socklen_t)addr_len(a);
    bw_sockaddr_format(&s, buf, len);
}

/* ---------------------------------------------------------------------------------------- */
/* /etc/hosts                                                                                */

static bool hosts_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\r';
}

size_t bw_resolver_hosts_lookup(const char *text, size_t len, const char *name, uint16_t port,
                                struct sockaddr_storage *out, uint32_t *out_len, size_t max)
{
    size_t found = 0, name_len = strlen(name), pos = 0;
    while (pos < len && found < max) {
        size_t end = pos;
        while (end < len && text[end] != '\n')
            end++;
        size_t line_end = end;
        for (size_t k = pos; k < end; k++) {
            if (text[k] == '#') {
                line_end = k;
                break;
            }
        }
        /* First token: the address. */
        size_t p = pos;
        while (p < line_end && hosts_space(text[p]))
            p++;
        size_t a0 = p;
        while (p < line_end && !hosts_space(text[p]))
            p++;
        char ip[INET6_ADDRSTRLEN + 1];
        size_t alen = p - a0;
        bool have_ip = alen > 0 && alen < sizeof(ip);
        if (have_ip) {
            memcpy(ip, text + a0, alen);
            ip[alen] = '\0';
        }
        /* Then the names. */
        bool match = false;
        while (have_ip && p < line_end && !match) {
            while (p < line_end && hosts_space(text[p]))
                p++;
            size_t n0 = p;
            while (p < line_end && !hosts_space(text[p]))
                p++;
            if (p - n0 == name_len && name_len > 0 && strncasecmp(text + n0, name, name_len) == 0)
                match = true;
        }
        if (match) {
            struct sockaddr_storage ss;
            memset(&ss, 0, sizeof(ss));
            struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
            struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
            if (inet_pton(AF_INET, ip, &s4->sin_addr) == 1) {
                s4->sin_family = AF_INET;
                s4->sin_port = htons(port);
                out[found] = ss;
                out_len[found++] = sizeof(*s4);
            } else if (inet_pton(AF_INET6, ip, &s6->sin6_addr) == 1) {
                s6->sin6_family = AF_INET6;
                s6->sin6_port = htons(port);
                out[found] = ss;
                out_len[found++] = sizeof(*s6);
            }
        }
        pos = end + 1;
    }
    return found;
}

static void hosts_load(bw_resolver *r)
{
    free(r->hosts);
    r->hosts = NULL;
    r->hosts_len = 0;
    FILE *f = fopen("/etc/hosts", "rb");
    if (f == NULL)
        return;
    struct stat st;
    size_t cap = BW_RESOLVER_HOSTS_MAX;
    if (fstat(fileno(f), &st) == 0 && st.st_size >= 0 && (uint64_t)st.st_size < cap)
        cap = (size_t)st.st_size + 1; /* usually a few hundred bytes */
    r->hosts = malloc(cap);
    if (r->hosts != NULL)
        r->hosts_len = fread(r->hosts, 1, cap, f);
    fclose(f);
}

/* ---------------------------------------------------------------------------------------- */
/* Rounds                                                                                    */

static void rs_schedule(rs_upstream *u, uint64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
    evtimer_add(u->timer, &tv);
}

/* Builds the upstream's set from its literal servers and every name's good addresses, and
 * publishes it when it changed. */
static void rs_publish(rs_upstream *u)
{
    bw_resolver *r = u->r;
    const bw_upstream_conf *uc = &r->cfg->upstreams[u->up];
    size_t n = 0;
    bool truncated = false;
    for (size_t i = 0; i < uc->n_servers; i++) {
        const bw_server_conf *sc = &uc->servers[i];
        const rs_addr *list;
        rs_addr lit;
        size_t count;
        if (sc->host == NULL) {
            memset(&lit, 0, sizeof(lit));
            memcpy(&lit, &sc->addr.ss, sc->addr.len <= sizeof(lit) ? sc->addr.len : sizeof(lit));
            list = &lit;
            count = 1;
        } else {
            rs_name *nm = NULL;
            for (size_t k = 0; k < u->n_names; k++)
                if (u->names[k].server == i)
                    nm = &u->names[k];
            if (nm == NULL || !nm->have_good)
                continue;
            list = nm->good;
            count = nm->n_good;
        }
        for (size_t k = 0; k < count; k++) {
            char key[BW_OUTLIER_KEY_MAX];
            addr_key(&list[k], key, sizeof(key));
            bool dup = false;
            for (size_t d = 0; d < n && !dup; d++)
                dup = strcmp(r->keys[d], key) == 0;
            if (dup)
                continue;
            if (n == RS_MAX) {
                truncated = true;
                break;
            }
            memcpy(r->keys[n], key, sizeof(key));
            memset(&r->addrs[n], 0, sizeof(r->addrs[n]));
            memcpy(&r->addrs[n], &list[k], addr_len(&list[k]));
            r->lens[n] = (uint32_t)addr_len(&list[k]);
            r->keyp[n] = r->keys[n];
            n++;
        }
    }
    if (truncated)
        bw_log_warn(r->log, "upstream %s: more than %d addresses; using the first %d", uc->name,
                    RS_MAX, RS_MAX);
    bool same = u->ever_published && n == u->n_published;
    for (size_t i = 0; same && i < n; i++)
        same = strcmp(u->published[i], r->keys[i]) == 0;
    if (same)
        return;
    bw_outlier_group *g = bw_shm_servers(r->shm, uc->shm_slot);
    if (g == NULL || bw_outlier_publish(g, r->keyp, r->addrs, r->lens, n, ++u->generation) < 0) {
        bw_log_error(r->log, "upstream %s: cannot publish its servers", uc->name);
        return;
    }
    /* One line for the change, with what came and what went. */
    char added[512] = "", removed[512] = "";
    size_t la = 0, lr = 0;
    for (size_t i = 0; i < n; i++) {
        bool was = false;
        for (size_t k = 0; k < u->n_published && !was; k++)
            was = strcmp(u->published[k], r->keys[i]) == 0;
        if (!was && la < sizeof(added) - 80)
            la += (size_t)snprintf(added + la, sizeof(added) - la, " +%s", r->keys[i]);
    }
    for (size_t k = 0; k < u->n_published; k++) {
        bool is = false;
        for (size_t i = 0; i < n && !is; i++)
            is = strcmp(u->published[k], r->keys[i]) == 0;
        if (!is && lr < sizeof(removed) - 80)
            lr += (size_t)snprintf(removed + lr, sizeof(removed) - lr, " -%s", u->published[k]);
    }
    bw_log_info(r->log, "upstream %s: %zu server(s) after resolution:%s%s", uc->name, n, added,
                removed);
    for (size_t i = 0; i < n; i++)
        memcpy(u->published[i], r->keys[i], BW_OUTLIER_KEY_MAX);
    u->n_published = n;
    u->ever_published = true;
}

static void rs_round_done(rs_upstream *u)
{
    bw_resolver *r = u->r;
    const bw_upstream_conf *uc = &r->cfg->upstreams[u->up];
    bw_outlier_group *g = bw_shm_servers(r->shm, uc->shm_slot);
    int64_t min_ttl = -1;
    bool failed = false;
    for (size_t k = 0; k < u->n_names; k++) {
        rs_name *nm = &u->names[k];
        const char *written = uc->servers[nm->server].address;
        if (nm->err == 0) {
            memcpy(nm->good, nm->got, nm->n_got * sizeof(nm->got[0]));
            nm->n_good = nm->n_got;
            nm->have_good = true;
            if (nm->min_ttl >= 0 && (min_ttl < 0 || nm->min_ttl < min_ttl))
                min_ttl = nm->min_ttl;
            if (nm->n_got == 0)
                bw_log_warn(r->log, "upstream %s: %s has no A or AAAA record", uc->name, written);
            continue;
        }
        failed = true;
        if (g != NULL) {
            atomic_fetch_add(&g->dns_errors, 1);
            atomic_store(&g->dns_last_error, nm->err);
            atomic_store(&g->dns_error_server, (uint32_t)nm->server);
            atomic_store(&g->dns_error_wall_ms, bw_probes_wall_ms());
        }
        bw_log_warn(r->log, "upstream %s: cannot resolve %s: %s; keeping its last %zu address(es)",
                    uc->name, written, evdns_err_to_string(nm->err), nm->n_good);
    }
    if (!failed && g != NULL) {
        atomic_store(&g->dns_ok_wall_ms, bw_probes_wall_ms());
        atomic_store(&g->dns_last_error, 0);
    }
    rs_publish(u);
    uint64_t next = uc->resolve_interval_ms;
    if (min_ttl >= 0 && (uint64_t)min_ttl * 1000 < next)
        next = (uint64_t)min_ttl * 1000;
    if (next < BW_RESOLVER_MIN_INTERVAL_MS)
        next = BW_RESOLVER_MIN_INTERVAL_MS;
    rs_schedule(u, next);
}

static void rs_answer(int result, char type, int count, int ttl, void *addresses, void *arg)
{
    rs_query *q = arg;
    rs_upstream *u = q->u;
    size_t idx = q->name;
    free(q);
    if (u->r->closing)
        return; /* evdns_base_free() is failing every request: nothing to record */
    rs_name *nm = &u->names[idx];
    uint16_t port = u->r->cfg->upstreams[u->up].servers[nm->server].port;
    if (result == DNS_ERR_NONE && count > 0 && (type == DNS_IPv4_A || type == DNS_IPv6_AAAA)) {
        for (int i = 0; i < count && nm->n_got < RS_MAX; i++) {
            rs_addr *a = &nm->got[nm->n_got++];
            memset(a, 0, sizeof(*a));
            if (type == DNS_IPv4_A) {
                a->in4.sin_family = AF_INET;
                a->in4.sin_port = htons(port);
                memcpy(&a->in4.sin_addr, (const uint8_t *)addresses + 4 * i, 4);
            } else {
                a->in6.sin6_family = AF_INET6;
                a->in6.sin6_port = htons(port);
                memcpy(&a->in6.sin6_addr, (const uint8_t *)addresses + 16 * i, 16);
            }
        }
        if (ttl >= 0 && (nm->min_ttl < 0 || ttl < nm->min_ttl))
            nm->min_ttl = ttl;
    } else if (result != DNS_ERR_NONE && result != DNS_ERR_NODATA && nm->err == 0) {
        nm->err = result;
    }
    if (--u->pending == 0)
        rs_round_done(u);
}

static void rs_round(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rs_upstream *u = arg;
    bw_resolver *r = u->r;
    const bw_upstream_conf *uc = &r->cfg->upstreams[u->up];
    if (u->pending > 0)
        return; /* the previous round is still waiting for answers */
    hosts_load(r);
    u->pending = 1; /* held until every query is sent */
    for (size_t k = 0; k < u->n_names; k++) {
        rs_name *nm = &u->names[k];
        const bw_server_conf *sc = &uc->servers[nm->server];
        nm->n_got = 0;
        nm->err = 0;
        nm->min_ttl = -1;
        struct sockaddr_storage hs[RS_MAX];
        uint32_t hl[RS_MAX];
        size_t nh = r->hosts ? bw_resolver_hosts_lookup(r->hosts, r->hosts_len, sc->host, sc->port,
                                                        hs, hl, RS_MAX)
                             : 0;
        if (nh > 0) {
            for (size_t i = 0; i < nh; i++) {
                memset(&nm->got[i], 0, sizeof(nm->got[i]));
                memcpy(&nm->got[i], &hs[i], hl[i] <= sizeof(rs_addr) ? hl[i] : sizeof(rs_addr));
            }
            nm->n_got = nh;
            continue;
        }
        for (int v6 = 0; v6 < 2; v6++) {
            rs_query *q = malloc(sizeof(*q));
            if (q == NULL) {
                nm->err = DNS_ERR_UNKNOWN;
                continue;
            }
            q->u = u;
            q->name = k;
            u->pending++;
            struct evdns_request *req =
                v6 ? evdns_base_resolve_ipv6(r->dns, sc->host, DNS_QUERY_NO_SEARCH, rs_answer, q)
                   : evdns_base_resolve_ipv4(r->dns, sc->host, DNS_QUERY_NO_SEARCH, rs_answer, q);
            if (req == NULL) {
                /* Not sent (out of memory): no callback will come. */
                free(q);
                u->pending--;
                if (nm->err == 0)
                    nm->err = DNS_ERR_UNKNOWN;
            }
        }
    }
    if (--u->pending == 0)
        rs_round_done(u);
}

/* ---------------------------------------------------------------------------------------- */

static int rs_setup_dns(bw_resolver *r)
{
    const bw_config *cfg = r->cfg;
    int flags = EVDNS_BASE_DISABLE_WHEN_INACTIVE;
    if (cfg->n_resolvers == 0)
        flags |= EVDNS_BASE_INITIALIZE_NAMESERVERS;
    r->dns = evdns_base_new(r->base, flags);
    if (r->dns == NULL) {
        bw_log_error(r->log, "dns: cannot set up the resolver (is /etc/resolv.conf readable?)");
        return -1;
    }
    for (size_t i = 0; i < cfg->n_resolvers; i++) {
        const bw_sockaddr *a = &cfg->resolvers[i];
        if (evdns_base_nameserver_sockaddr_add(r->dns, (const struct sockaddr *)&a->ss, a->len,
                                               0) != 0) {
            char buf[80];
            bw_log_error(r->log, "dns: cannot use nameserver %s",
                         bw_sockaddr_format(a, buf, sizeof(buf)));
            return -1;
        }
    }
    char v[32];
    snprintf(v, sizeof(v), "%" PRIu32 ".%03" PRIu32, cfg->resolver_timeout_ms / 1000,
             cfg->resolver_timeout_ms % 1000);
    evdns_base_set_option(r->dns, "timeout:", v);
    snprintf(v, sizeof(v), "%" PRIu32, cfg->resolver_attempts);
    evdns_base_set_option(r->dns, "attempts:", v);
    return 0;
}

bw_resolver *bw_resolver_new(struct event_base *base, bw_shm *shm, const bw_config *cfg,
                             bw_log *log, int *failed)
{
    *failed = 0;
    size_t n_ups = 0;
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        if (cfg->upstreams[i].dynamic)
            n_ups++;
    if (n_ups == 0)
        return NULL;
    bw_resolver *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        *failed = 1;
        return NULL;
    }
    r->base = base;
    r->shm = shm;
    r->cfg = cfg;
    r->log = log;
    r->ups = calloc(n_ups, sizeof(*r->ups));
    r->keys = calloc(RS_MAX, sizeof(*r->keys));
    r->keyp = calloc(RS_MAX, sizeof(*r->keyp));
    r->addrs = calloc(RS_MAX, sizeof(*r->addrs));
    r->lens = calloc(RS_MAX, sizeof(*r->lens));
    if (!r->ups || !r->keys || !r->keyp || !r->addrs || !r->lens || rs_setup_dns(r) < 0) {
        bw_resolver_free(r);
        *failed = 1;
        return NULL;
    }
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const bw_upstream_conf *uc = &cfg->upstreams[i];
        if (!uc->dynamic)
            continue;
        rs_upstream *u = &r->ups[r->n_ups++];
        u->r = r;
        u->up = i;
        size_t n = 0;
        for (size_t k = 0; k < uc->n_servers; k++)
            if (uc->servers[k].host)
                n++;
        u->names = calloc(n ? n : 1, sizeof(*u->names));
        u->published = calloc(RS_MAX, sizeof(*u->published));
        u->timer = evtimer_new(base, rs_round, u);
        if (!u->names || !u->published || !u->timer) {
            bw_resolver_free(r);
            *failed = 1;
            return NULL;
        }
        for (size_t k = 0; k < uc->n_servers; k++)
            if (uc->servers[k].host)
                u->names[u->n_names++].server = k;
        event_active(u->timer, EV_TIMEOUT, 0); /* the first round at once */
    }
    return r;
}

void bw_resolver_free(bw_resolver *r)
{
    if (r == NULL)
        return;
    r->closing = true;
    if (r->dns)
        evdns_base_free(r->dns, 1); /* runs every pending callback with DNS_ERR_SHUTDOWN */
    for (size_t i = 0; i < r->n_ups; i++) {
        if (r->ups[i].timer)
            event_free(r->ups[i].timer);
        free(r->ups[i].names);
        free(r->ups[i].published);
    }
    free(r->ups);
    free(r->keys);
    free(r->keyp);
    free(r->addrs);
    free(r->lens);
    free(r->hosts);
    free(r);
}
