/*
 * Admin listener: a small HTTP/1.1 server on the master's event loop for the operator-facing
 * endpoints (health, readiness, metrics, upstream state). It uses the same strict parser as the
 * proxy and answers one request at a time per connection.
 */
#ifndef BREAKWATER_ADMIN_H
#define BREAKWATER_ADMIN_H

#include <event2/buffer.h>
#include <event2/event.h>

#include "breakwater/config.h"
#include "breakwater/http.h"
#include "breakwater/log.h"
#include "breakwater/master.h"
#include "breakwater/shm.h"

typedef struct bw_admin bw_admin;

/* Supplies the master's view when an endpoint needs it. */
typedef void (*bw_admin_status_fn)(void *arg, bw_master_status *out);

/* Starts serving on an already listening socket (the admin takes ownership of fd). */
bw_admin *bw_admin_new(struct event_base *base, int fd, bw_log *log, const bw_shm *shm,
                       bw_admin_status_fn status, void *status_arg);

/* Called after a breaker was reset through POST /upstreams/{name}/reset (fleet-wide reset). */
typedef void (*bw_admin_reset_fn)(void *arg, const char *upstream);
void bw_admin_on_reset(bw_admin *a, bw_admin_reset_fn fn, void *arg);
/* Points the endpoints at a new configuration after a reload. */
void bw_admin_set_config(bw_admin *a, const bw_config *cfg);
/* The listening descriptor (-1 when disabled); forked workers close their copy. */
int bw_admin_fd(const bw_admin *a);
/* Stops accepting and closes every admin connection. */
void bw_admin_free(bw_admin *a);

/* Builds the response for one request (exposed for unit tests). Writes the body to `body`,
 * returns the status code and sets *content_type. */
int bw_admin_respond(bw_admin *a, const bw_http_head *req, struct evbuffer *body,
                     const char **content_type);

#endif
