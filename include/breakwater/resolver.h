/*
 * DNS names of upstream servers, resolved by the master with libevent's evdns and published to
 * the workers through shared memory.
 *
 * Every upstream with a server written as "name:port" is re-resolved every resolve_interval_ms
 * (sooner when the records' TTL is shorter). Each A and AAAA address becomes one server; literal
 * addresses of the same upstream stay in the set. The set is published into the upstream's
 * shared server table (bw_outlier_publish), which every worker reads lock-free before it picks a
 * server; a server that leaves the set is drained by the workers (its idle connections closed,
 * requests in flight finished). A lookup that fails (timeout, refused, garbage, truncated, no
 * such name) keeps that name's last good addresses, is logged, and is counted in the group's
 * dns_errors. /etc/hosts is honoured before DNS, and top-level "resolvers" replace the
 * nameservers of /etc/resolv.conf. Nothing here blocks the master's loop.
 */
#ifndef BREAKWATER_RESOLVER_H
#define BREAKWATER_RESOLVER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <event2/event.h>

#include "breakwater/config.h"
#include "breakwater/log.h"
#include "breakwater/shm.h"

/* Shortest wait between two resolutions of a name, whatever its TTL says. */
#define BW_RESOLVER_MIN_INTERVAL_MS 1000
/* The largest /etc/hosts read. */
#define BW_RESOLVER_HOSTS_MAX (1u << 20)

typedef struct bw_resolver bw_resolver;

/* Starts resolving every DNS-named upstream of cfg. NULL when there is none (nothing to do) or
 * on error (logged); *failed tells which. */
bw_resolver *bw_resolver_new(struct event_base *base, bw_shm *shm, const bw_config *cfg,
                             bw_log *log, int *failed);

/* Stops every lookup (their callbacks run before this returns) and frees the resolver. */
void bw_resolver_free(bw_resolver *r);

/*
 * Looks name up in hosts-file text (the /etc/hosts format: address, then names, '#' comments).
 * Writes up to max addresses with the port into out and returns how many were found. Pure: no
 * I/O, any bytes accepted.
 */
size_t bw_resolver_hosts_lookup(const char *text, size_t len, const char *name, uint16_t port,
                                struct sockaddr_storage *out, uint32_t *out_len, size_t max);

#endif
