/*
 * Per-server health, shared by every worker: passive outlier ejection and the verdict of the
 * active health checks, one record per upstream server in the shared region.
 *
 * Workers report each attempt's outcome on a server (bw_outlier_success, bw_outlier_failure);
 * after outlier_detection.consecutive_failures failures in a row the server is ejected and the
 * balancer skips it for base_ejection_ms x (ejections in a row), capped at max_ejection_ms,
 * never ejecting more than max_ejection_percent of the pool (at least one server stays in). The
 * master's health checks (src/health.c) write the check fields. Like the breaker, every function
 * is pure over the record, the configuration and the time the caller passes (the breaker clock,
 * bw_breaker_now_ms()), and every update is a lock-free atomic, so a worker killed at any
 * instruction leaves every record usable.
 */
#ifndef BREAKWATER_OUTLIER_H
#define BREAKWATER_OUTLIER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "breakwater/config.h"

/* Records per upstream: as many as an upstream may have servers. */
#define BW_OUTLIER_MAX_SERVERS BW_CONFIG_MAX_SERVERS
/* Longest server key ("[IPv6]:port" fits with room). */
#define BW_OUTLIER_KEY_MAX 64

/* What the last active check of a server found. */
typedef enum bw_check_result {
    BW_CHECK_NONE = 0,  /* no check has finished yet (or checks are off) */
    BW_CHECK_PASS,      /* status within expect_status */
    BW_CHECK_STATUS,    /* a complete response with a status outside expect_status */
    BW_CHECK_CONNECT,   /* connect refused or failed */
    BW_CHECK_TIMEOUT,   /* no complete answer within timeout_ms */
    BW_CHECK_INVALID,   /* not a valid HTTP response */
    BW_CHECK_TOO_LARGE, /* the response head or body exceeded what a check reads */
    BW_CHECK_TLS,       /* the TLS handshake or certificate verification failed */
} bw_check_result;

/* One server. `key` and `generation` are written by the master only, while binding. */
typedef struct bw_outlier_server {
    char key[BW_OUTLIER_KEY_MAX];   /* the server's address; "" = free record */
    _Atomic uint32_t generation;    /* the last binding that used it */
    _Atomic uint32_t failures;      /* consecutive failures */
    _Atomic uint32_t ejections;     /* ejections in a row: the backoff level */
    _Atomic int32_t active;         /* requests in flight on it, all workers together */
    _Atomic uint64_t ejected_until; /* breaker-clock ms; in the past or 0: not ejected */
    _Atomic uint64_t ejections_total;
    /* Active checks, written by the master. */
    _Atomic uint32_t check_unhealthy;           /* 1: the checks say skip it */
    _Atomic uint32_t check_result;              /* bw_check_result of the last finished check */
    _Atomic int32_t check_status;               /* its HTTP status, 0 when there was none */
    _Atomic uint64_t check_wall_ms;             /* when it finished, wall clock */
    _Atomic uint32_t check_passes, check_fails; /* in a row */
    /* The address to connect to, for upstreams whose servers come from DNS (written by the
     * master before the record becomes a member; read under the group's members_seq). */
    struct sockaddr_storage addr;
    uint32_t addr_len;
    /* Upstream TLS: the last handshake failure (X509 verification code, or -1 for another
     * TLS error; 0 once a handshake succeeds again) and when it happened (wall clock). */
    _Atomic int32_t tls_error;
    _Atomic uint64_t tls_error_wall_ms;
} bw_outlier_server;

/* An upstream's servers and their counters (part of its shared-memory slot). */
typedef struct bw_outlier_group {
    _Atomic uint64_t ejections_total;
    _Atomic uint64_t checks_pass, checks_fail;
    _Atomic uint64_t dns_errors;
    /* Resolution state of a DNS-named upstream, written by the master. */
    _Atomic int32_t dns_last_error;    /* evdns DNS_ERR_* of the last failed lookup, 0 none */
    _Atomic uint32_t dns_error_server; /* index in the upstream's "servers" of that name */
    _Atomic uint64_t dns_error_wall_ms;
    _Atomic uint64_t dns_ok_wall_ms; /* last resolution round that succeeded */
    /*
     * The current server set of a DNS-named upstream: record indices, published by the master
     * like a seqlock. members_seq is odd while the master rewrites the set; a reader copies
     * the set between two equal even values of it, and keeps its previous copy otherwise.
     */
    _Atomic uint64_t members_seq;
    _Atomic uint32_t n_members;
    _Atomic uint16_t members[BW_OUTLIER_MAX_SERVERS];
    bw_outlier_server servers[BW_OUTLIER_MAX_SERVERS];
} bw_outlier_group;

/* A copy for /upstreams and /metrics. */
typedef struct bw_outlier_view {
    bool healthy;           /* neither ejected nor failed by the checks */
    bool ejected;           /* skipped by passive outlier detection now */
    uint64_t ejected_until; /* breaker-clock ms (0 when not ejected) */
    uint32_t consecutive_failures;
    uint32_t ejections; /* in a row */
    int32_t active_requests;
    bool check_unhealthy;
    bw_check_result check_result;
    int check_status;
    uint64_t check_wall_ms;
} bw_outlier_view;

/* Empties every record. Not concurrent: for a fresh slot before workers use it. */
void bw_outlier_group_init(bw_outlier_group *g);

/*
 * Master: gives each of the n servers a record, found by key (its state carries on across
 * reloads and re-resolutions) or taken free. keys[i] names server i; out_index[i] receives its
 * record. Records not named by this binding keep their state until a new server needs room; the
 * free one used longest ago is taken then. Returns 0, or -1 when n exceeds the table.
 */
int bw_outlier_bind(bw_outlier_group *g, const char *const *keys, size_t n, uint32_t generation,
                    int *out_index);

/* True when the balancer may pick the server now. */
bool bw_outlier_available(const bw_outlier_server *s, uint64_t now_ms);

/* An attempt on the server succeeded: its failure count starts again. After a whole base
 * ejection period with no new ejection, the backoff level is forgotten too. */
void bw_outlier_success(bw_outlier_server *s, const bw_outlier_conf *c, uint64_t now_ms);

/*
 * An attempt on the server failed (the breaker's definition of failure). pool holds the records
 * of the upstream's servers (s among them) for the max_ejection_percent cap. Returns true when
 * this failure ejected the server, with *ejected_ms how long (may be NULL).
 */
bool bw_outlier_failure(bw_outlier_server *s, bw_outlier_server *const *pool, size_t n_pool,
                        const bw_outlier_conf *c, uint64_t now_ms, uint64_t *ejected_ms);

/* Requests in flight on the server (all workers): +1 when an attempt starts, -1 when it ends. */
void bw_outlier_active(bw_outlier_server *s, int delta);

/*
 * Master: records a finished active check. passed is the verdict of this one check; the server
 * turns unhealthy after unhealthy_threshold failures in a row and healthy again after
 * healthy_threshold passes in a row. Returns true when the server's checked health changed.
 */
bool bw_outlier_check_done(bw_outlier_server *s, const bw_health_check_conf *c, bool passed,
                           bw_check_result result, int status, uint64_t wall_ms);

void bw_outlier_snapshot(const bw_outlier_server *s, uint64_t now_ms, bw_outlier_view *out);

/*
 * Master: publishes a DNS-named upstream's server set: n addresses with their keys ("IP:port").
 * Records are bound by key as bw_outlier_bind() does, so a server that stays keeps its state.
 * Returns 0, or -1 when n exceeds the table.
 */
int bw_outlier_publish(bw_outlier_group *g, const char *const *keys,
                       const struct sockaddr_storage *addrs, const uint32_t *addr_lens, size_t n,
                       uint32_t generation);

/*
 * Reader: copies the published set into out (record indices, at most BW_OUTLIER_MAX_SERVERS)
 * when it is stable and differs from *seq. Returns the number of members copied and updates
 * *seq, or -1 when there is nothing new (or the master is writing: try again later).
 */
int bw_outlier_members(const bw_outlier_group *g, uint64_t *seq, uint16_t *out);

/* "pass", "status", "connect", "timeout", "invalid", "too_large", "tls", "none". */
const char *bw_check_result_name(bw_check_result r);

#endif
