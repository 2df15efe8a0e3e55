/*
 * Admin listener: the operator-facing HTTP endpoints (health, readiness, metrics, upstream and
 * breaker control, rate-limit inspection, the status page), served by libevhtp on the master's
 * event loop. libevhtp only ever parses admin requests; forwarded traffic keeps the proxy's own
 * strict parser. src/admin.c wraps the library with the defences docs/architecture.md lists
 * (header deadline, connection cap, one request at a time with bounded output, body refusal
 * before it is read, accept-error back-off). Routing and access rules are pure functions
 * (src/admin_route.c) so that they can be tested without sockets.
 */
#ifndef BREAKWATER_ADMIN_H
#define BREAKWATER_ADMIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "breakwater/config.h"
#include "breakwater/log.h"
#include "breakwater/master.h"
#include "breakwater/shm.h"

typedef struct bw_admin bw_admin;

/* Supplies the master's view when an endpoint needs it. */
typedef void (*bw_admin_status_fn)(void *arg, bw_master_status *out);

/* Starts serving on an already listening socket (the admin takes ownership of fd). */
bw_admin *bw_admin_new(struct event_base *base, int fd, bw_log *log, const bw_shm *shm,
                       bw_admin_status_fn status, void *status_arg);

/* What the master does beyond the local state when an operator acts (fleet-wide via Redis). */
typedef struct bw_admin_hooks {
    void (*reset)(void *arg, const char *upstream); /* after POST .../reset */
    void (*open)(void *arg, const char *upstream);  /* after POST .../open */
    void (*ratelimit_delete)(void *arg, const char *policy, const char *key); /* after DELETE */
    void *arg;
} bw_admin_hooks;
void bw_admin_set_hooks(bw_admin *a, const bw_admin_hooks *hooks);
/* Points the endpoints at a new configuration after a reload. */
void bw_admin_set_config(bw_admin *a, const bw_config *cfg);
/* The listening descriptor (-1 when disabled); forked workers close their copy. */
int bw_admin_fd(const bw_admin *a);
/* Stops accepting and closes every admin connection. */
void bw_admin_free(bw_admin *a);

/* ---- Routing (pure, src/admin_route.c) ---- */

typedef enum bw_admin_method {
    BW_ADMIN_GET = 0,
    BW_ADMIN_HEAD,
    BW_ADMIN_POST,
    BW_ADMIN_DELETE,
    BW_ADMIN_OTHER,
} bw_admin_method;

typedef enum bw_admin_route_id {
    BW_ADMIN_R_NOT_FOUND = 0,
    BW_ADMIN_R_PAGE,           /* GET / */
    BW_ADMIN_R_HEALTHZ,        /* GET /healthz */
    BW_ADMIN_R_READYZ,         /* GET /readyz */
    BW_ADMIN_R_METRICS,        /* GET /metrics */
    BW_ADMIN_R_STATUS,         /* GET /status */
    BW_ADMIN_R_UPSTREAMS,      /* GET /upstreams */
    BW_ADMIN_R_UPSTREAM_RESET, /* POST /upstreams/{name}/reset */
    BW_ADMIN_R_UPSTREAM_OPEN,  /* POST /upstreams/{name}/open */
    BW_ADMIN_R_RATELIMITS,     /* GET /ratelimits */
    BW_ADMIN_R_RATELIMIT_TOP,  /* GET /ratelimits/{policy}?top=N */
    BW_ADMIN_R_RATELIMIT_KEY,  /* DELETE /ratelimits/{policy}/{key} */
} bw_admin_route_id;

typedef struct bw_admin_route {
    bw_admin_route_id id;
    bool method_ok;   /* false: the path exists but not with this method (405) */
    const char *name; /* upstream or policy, as in the path (still percent-encoded) */
    size_t name_len;
    const char *arg; /* the segment after it: "reset"/"open", or the rate-limit key */
    size_t arg_len;
} bw_admin_route;

#define BW_ADMIN_TOP_DEFAULT 10
#define BW_ADMIN_TOP_MAX 64

/* Matches a path (without the query). False when no endpoint has that path (404); true with
 * method_ok false when the method is wrong (405). */
bool bw_admin_route_match(bw_admin_method method, const char *path, size_t len,
                          bw_admin_route *out);
/* Endpoints served without the token even when admin.token_env is set. */
bool bw_admin_route_public(const bw_admin_route *r);
/* Reads top=N (1..BW_ADMIN_TOP_MAX) from a query string; absent = BW_ADMIN_TOP_DEFAULT.
 * Returns 0, or -1 for a malformed or out-of-range N. */
int bw_admin_parse_top(const char *query, size_t len, uint32_t *top);
/* Constant-time check of an Authorization value against "Bearer <token>". */
bool bw_admin_token_matches(const char *token, const char *authorization);
/* Percent-decodes in[0..len) into out (NUL-terminated). Returns the length, or -1 for a bad
 * escape, an embedded NUL, or an output longer than cap - 1. */
int bw_admin_unescape(const char *in, size_t len, char *out, size_t cap);

#endif
