/*
 * Configuration: the JSON file an operator writes, parsed and validated completely at load.
 *
 * bw_config_load() turns a file into a bw_config with every default filled in and every
 * reference (route -> upstream, route -> rate-limit policy) resolved to an index. It never
 * exits: each problem becomes one line in a bw_diag, "FILE:LINE:COL: invalid JSON: message" for
 * syntax errors, "FILE:LINE:COL: json.path: message" for a value in the file (LINE:COL of the
 * value, or of the object lacking a required field), "FILE: environment NAME: message" for a bad
 * override and "FILE: message" when there is no place to point at; the caller decides what to do.
 * The struct is plain data: the master parses it, workers inherit it through fork().
 */
#ifndef BREAKWATER_CONFIG_H
#define BREAKWATER_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define BW_CONFIG_MAX_SERVERS 256
#define BW_CONFIG_MAX_FAILURE_STATUSES 32

/* Collected problems; messages are complete lines without the trailing newline. */
typedef struct bw_diag {
    char **lines;
    size_t count;
    size_t cap;
} bw_diag;

void bw_diag_init(bw_diag *d);
void bw_diag_add(bw_diag *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void bw_diag_free(bw_diag *d);

/* A resolved socket address ("127.0.0.1:8080", "[::1]:8080", "*:8080" is 0.0.0.0). */
typedef struct bw_sockaddr {
    struct sockaddr_storage ss;
    socklen_t len;
} bw_sockaddr;

/* Parses "host:port" where host is an IPv4 literal, "[IPv6]", "*" or "localhost".
 * Returns 0 or -1 with a reason in err. No DNS: an edge proxy must not block on resolution. */
int bw_sockaddr_parse(const char *text, bw_sockaddr *out, char *err, size_t errlen);
/* Writes "ip:port" / "[ip]:port" into buf; returns buf. */
const char *bw_sockaddr_format(const bw_sockaddr *a, char *buf, size_t len);

/* One certificate of a TLS listener: chain, key and an optional DER OCSP response to staple. */
typedef struct bw_tls_cert_conf {
    char *cert; /* PEM chain path, resolved relative to the config file's directory */
    char *key;  /* PEM key path, same */
    char *ocsp; /* DER OCSP response path, same; NULL when not stapling */
} bw_tls_cert_conf;

typedef struct bw_tls_conf {
    char *cert;              /* alias of certs[0].cert (not owned), the default certificate */
    char *key;               /* alias of certs[0].key (not owned) */
    bw_tls_cert_conf *certs; /* owned; one element for the "cert"/"key" form */
    size_t n_certs;
    bool list;                 /* written as "certificates": error paths name the element */
    uint32_t reload_check_ms;  /* how often the master looks for changed files; default 60000 */
    uint32_t ticket_rotate_ms; /* session-ticket key lifetime; default 3600000 */
} bw_tls_conf;

typedef struct bw_listener_conf {
    char *address; /* as written, used as the listener label in metrics and logs */
    bw_sockaddr addr;
    bool tls_enabled;
    bw_tls_conf tls;
    int shm_slot; /* assigned by bw_shm_bind(); metrics label slot */
} bw_listener_conf;

typedef struct bw_admin_conf {
    bool enabled;
    char *address;
    bw_sockaddr addr;
    char *token_env; /* name of the environment variable holding the bearer token, or NULL */
    uint32_t max_connections; /* open admin connections at once; default 64 */
} bw_admin_conf;

typedef struct bw_breaker_conf {
    uint32_t failure_threshold;           /* consecutive failures to open; default 5 */
    uint32_t reset_timeout_ms;            /* open -> half_open wait; default 30000 */
    uint32_t max_reset_timeout_ms;        /* cap of the growing wait; default 300000 */
    uint32_t half_open_success_threshold; /* successes to close; default 1 */
    uint32_t half_open_max_requests;      /* probes admitted in half_open; default 1 */
    uint32_t failure_rate_percent;        /* 0 = off; 1..100 */
    uint32_t window_ms;                   /* failure-rate window; default 10000 */
    uint32_t min_requests;                /* minimum volume for the rate; default 20 */
    uint32_t slow_call_ms;                /* 0 = off; a response slower than this is a failure */
    uint16_t failure_statuses[BW_CONFIG_MAX_FAILURE_STATUSES]; /* default 502, 503, 504 */
    size_t n_failure_statuses;
    /* Which fields the file set explicitly, so that environment overrides only touch the rest. */
    bool set_failure_threshold, set_reset_timeout_ms, set_half_open_success_threshold;
} bw_breaker_conf;

typedef enum bw_balance {
    BW_BALANCE_ROUND_ROBIN = 0,
    BW_BALANCE_LEAST_CONN = 1,
} bw_balance;

typedef struct bw_server_conf {
    char *address; /* as written; used as the server label */
    bw_sockaddr addr;
    uint32_t weight; /* reserved for weighted balancing; default 1 */
    int shm_index;   /* assigned by bw_shm_bind(): its per-server health record */
    char *host;      /* a DNS name to resolve (addr unset), or NULL for an IP literal */
    uint16_t port;   /* with host: the port every resolved address gets */
} bw_server_conf;

/* Passive outlier detection ("outlier_detection"); consecutive_failures 0 turns it off. */
typedef struct bw_outlier_conf {
    uint32_t consecutive_failures; /* default 5 */
    uint32_t base_ejection_ms;     /* default 30000; grows with ejections in a row */
    uint32_t max_ejection_ms;      /* default 300000 */
    uint32_t max_ejection_percent; /* default 50; at least one server always stays in */
} bw_outlier_conf;

/* TLS to an upstream ("tls" on an upstream); absent = plain TCP. */
typedef struct bw_upstream_tls_conf {
    bool enabled;
    bool verify;       /* default true: the certificate must chain to ca and match server_name */
    char *ca;          /* PEM bundle; NULL = the system's default trust store */
    char *server_name; /* SNI and the name verified; NULL = the host of each server */
    char *cert, *key;  /* client certificate for mutual TLS (both or neither) */
} bw_upstream_tls_conf;

/* Active health checks ("health_check"); absent = enabled false. */
typedef struct bw_health_check_conf {
    bool enabled;
    char *path;                      /* default "/healthz" */
    char *host;                      /* Host header; NULL = the server's address */
    uint32_t interval_ms;            /* default 5000 */
    uint32_t timeout_ms;             /* default 1000: connect, request and whole response */
    uint32_t healthy_threshold;      /* passes in a row to become healthy; default 2 */
    uint32_t unhealthy_threshold;    /* failures in a row to become unhealthy; default 3 */
    uint16_t expect_min, expect_max; /* inclusive status range; default 200..399 */
} bw_health_check_conf;

typedef struct bw_upstream_conf {
    char *name;
    bw_server_conf *servers;
    size_t n_servers;
    bool critical;                 /* readiness turns 503 when its breaker is open; default false */
    bw_balance balance;            /* "round_robin" (default) or "least_conn" */
    uint32_t connect_timeout_ms;   /* default 1000 */
    uint32_t response_timeout_ms;  /* default 30000: wait for the head, and max gap in the body */
    uint32_t keepalive_max_idle;   /* idle pooled connections per server per worker; default 32 */
    uint32_t keepalive_timeout_ms; /* idle pooled connection lifetime; default 60000 */
    uint32_t retries;              /* extra attempts on another server; default 1 */
    uint32_t resolve_interval_ms;  /* re-resolution of server names; default 5000 */
    bool dynamic;                  /* some server is a DNS name: the set comes from the resolver */
    bw_breaker_conf breaker;
    bw_outlier_conf outlier;
    bw_health_check_conf health_check;
    bw_upstream_tls_conf tls;
    int shm_slot; /* assigned by bw_shm_bind(): breaker and counters slot */
} bw_upstream_conf;

typedef enum bw_rl_key_kind {
    BW_RL_KEY_CLIENT_IP = 0,
    BW_RL_KEY_HEADER = 1,
} bw_rl_key_kind;

typedef struct bw_ratelimit_conf {
    char *name;
    bw_rl_key_kind key_kind;
    char *key_header;      /* header name for BW_RL_KEY_HEADER */
    uint32_t capacity;     /* >= 1 */
    double refill_per_sec; /* >= 0 */
    bool dry_run;
    uint32_t ipv6_prefix;   /* IPv6 clients grouped by this prefix length; default 64 */
    struct bw_cidr *exempt; /* clients in these networks take no token and get no headers */
    size_t n_exempt;
    bool set_capacity, set_refill; /* explicit in the file (env overrides apply otherwise) */
    int shm_slot; /* assigned by bw_shm_bind(): the policy id in the rate-limit table */
} bw_ratelimit_conf;

typedef struct bw_route_conf {
    char *host;        /* NULL = any host; compared case-insensitively, without port */
    char *path_prefix; /* default "/" */
    size_t path_prefix_len;
    bool case_sensitive; /* path_prefix compared byte for byte (default) or ignoring ASCII case */
    bool request_buffering; /* small bodies read whole before an upstream is taken (default) */
    char *name;             /* label in metrics; default "<host><path_prefix>" */
    int upstream;           /* index into bw_config.upstreams */
    int rate_limit;         /* index into bw_config.rate_limits, or -1 */
    int shm_slot;           /* assigned by bw_shm_bind(): counters slot */
} bw_route_conf;

typedef struct bw_cidr {
    int family; /* AF_INET or AF_INET6 */
    uint8_t addr[16];
    uint8_t prefix;
} bw_cidr;

typedef struct bw_redis_conf {
    bool enabled;
    char *url;                   /* redis://[:password@]host:port[/db] or unix:///path */
    char *key_prefix;            /* default "breakwater" */
    uint32_t sync_interval_ms;   /* default 100 */
    bool required;               /* readiness fails while Redis is down; default false */
    uint32_t connect_timeout_ms; /* default 1000 */
    uint32_t command_timeout_ms; /* default 1000 */
    bool share_when_down;        /* while Redis is unreachable, limit each key to capacity / live
                                  * instances; default true */
    /* Redis Sentinel, instead of url: the master named master_name is asked of these sentinels
     * ("HOST:PORT", IP literals or localhost) and followed across failovers. */
    char **sentinels;
    size_t n_sentinels;
    char *master_name;
    char *password; /* from password_env: AUTH for the master (with url, the URL's wins) */
} bw_redis_conf;

typedef enum bw_log_level {
    BW_LOG_DEBUG = 0,
    BW_LOG_INFO = 1,
    BW_LOG_WARN = 2,
    BW_LOG_ERROR = 3,
} bw_log_level;

typedef enum bw_log_query {
    BW_LOG_QUERY_REDACT = 0, /* query values replaced by "-" (default) */
    BW_LOG_QUERY_KEEP = 1,   /* the request target as received */
    BW_LOG_QUERY_DROP = 2,   /* no query at all */
} bw_log_query;

typedef struct bw_log_conf {
    char *error_log;    /* path, or NULL/"stderr" for stderr */
    char *access_log;   /* path, "stdout", or "off"; default "stdout" */
    bw_log_level level; /* default info */
    bool error_json;    /* error_format "json" (default "text") */
    bw_log_query query; /* what the access log keeps of a query string */
} bw_log_conf;

typedef struct bw_limits_conf {
    uint32_t max_header_bytes;     /* request head size; default 32768 -> 431 */
    uint32_t max_headers;          /* header count; default 100 -> 431 */
    uint64_t max_body_bytes;       /* request body; 0 = unlimited; default 0 -> 413 */
    uint32_t request_buffer_bytes; /* bodies up to this are read before connecting; 65536 */
    uint32_t header_timeout_ms;    /* whole request head must arrive within; default 10000 -> 408 */
    uint32_t client_idle_timeout_ms; /* keep-alive idle and body read gap; default 60000 */
    uint32_t max_connections;        /* per worker; default 10000 */
} bw_limits_conf;

typedef struct bw_config {
    char *path;       /* the file it came from */
    uint32_t workers; /* resolved: 0 in the file becomes the CPU count */
    bw_listener_conf *listeners;
    size_t n_listeners;
    bw_admin_conf admin;
    bw_upstream_conf *upstreams;
    size_t n_upstreams;
    bw_route_conf *routes;
    size_t n_routes;
    bw_ratelimit_conf *rate_limits;
    size_t n_rate_limits;
    int default_rate_limit;         /* index of the policy env overrides apply to, or -1 */
    uint32_t rate_limit_table_size; /* default 65536 */
    bw_cidr *trusted_proxies;
    size_t n_trusted_proxies;
    bw_redis_conf redis;
    bw_log_conf log;
    bw_limits_conf limits;
    uint32_t shutdown_timeout_ms; /* default 10000 */
    uint32_t drain_idle_grace_ms; /* idle keep-alive connections of a draining worker live this
                                   * long before they are closed; default 1000 */
    bool probes_on_listeners;     /* default true */
    /* One line per environment override in effect ("environment X=V replaces FIELD (was W)"),
     * for the master to log at start and on every reload. notes_warn[i] is true when the value
     * replaced was written in the file (not a default). */
    char **notes;
    bool *notes_warn;
    size_t n_notes;
    bw_sockaddr *resolvers; /* "resolvers": replace /etc/resolv.conf's nameservers */
    size_t n_resolvers;
    uint32_t resolver_timeout_ms; /* per DNS attempt; default 2000 */
    uint32_t resolver_attempts;   /* per query; default 2 */
} bw_config;

/* Environment lookup, injectable for tests (NULL means getenv). */
typedef const char *(*bw_getenv_fn)(const char *name);

/*
 * Loads and validates a configuration file. On success returns a config and leaves diag empty.
 * On failure returns NULL and diag holds one line per problem (all problems, not just the first).
 * Certificate and key files are checked for readability here; whether they match is checked by
 * the TLS module, which reports through the same diag.
 */
bw_config *bw_config_load(const char *path, bw_getenv_fn getenv_fn, bw_diag *diag);

/* Same, from text in memory; path is only used in messages and to resolve relative paths. */
bw_config *bw_config_parse(const char *text, size_t len, const char *path, bw_getenv_fn getenv_fn,
                           bw_diag *diag);

void bw_config_free(bw_config *cfg);

/*
 * Parses "name:port" where name is a DNS host name (letters, digits, '-', '_', dots; labels of
 * 1..63, at most 253 in all). Writes the name (NUL-terminated, at most hostlen - 1) and the port.
 * Returns 0, or -1 with a reason in err.
 */
int bw_server_name_parse(const char *text, char *host, size_t hostlen, uint16_t *port, char *err,
                         size_t errlen);

/* Index of the upstream with this name, or -1. */
int bw_config_find_upstream(const bw_config *cfg, const char *name);

/* Parses a CIDR ("10.0.0.0/8", "::1/128", or a bare address). Returns 0 or -1. */
int bw_cidr_parse(const char *text, bw_cidr *out);
/* True when the address (AF_INET/AF_INET6 sockaddr) lies inside one of the ranges. */
bool bw_cidr_list_match(const bw_cidr *list, size_t n, const struct sockaddr *sa);

#endif
