/*
 * The request path of a worker: one bw_session per client connection, carrying one exchange at
 * a time (pipelined requests wait in the input buffer and are answered in order).
 *
 * A request goes: read the whole head (bounded in size and time) -> strict parse and framing
 * checks -> route -> admission (the place where breakers and rate limits refuse a request before
 * an upstream is chosen) -> pick a server and a pooled or new connection -> stream the body with
 * backpressure -> read the response head -> stream the response body -> report the outcome of the
 * upstream exchange -> next request or close.
 */
#ifndef BREAKWATER_PROXY_H
#define BREAKWATER_PROXY_H

#include <sys/socket.h>

#include <event2/util.h>

#include "breakwater/worker.h"

/* Takes ownership of an accepted client socket. */
void bw_proxy_accept(bw_worker *w, int listener, evutil_socket_t fd, const struct sockaddr *sa,
                     int salen);

/* Starts draining: every connection ends after its next response, which says
 * `Connection: close`; connections that stay idle are left for bw_proxy_close_idle. */
void bw_proxy_drain(bw_worker *w);

/* Closes the connections of a draining worker on which nothing of a request has arrived
 * (called once drain_idle_grace_ms has passed). Returns how many were closed. */
size_t bw_proxy_close_idle(bw_worker *w);

/* Closes every session at once (worker exit). */
void bw_proxy_close_all(bw_worker *w);

#endif
