/*
 * File descriptors a worker may need, against the process's RLIMIT_NOFILE.
 *
 * limits.max_connections promises a number of client connections per worker; each of them may
 * hold an upstream connection too, and the keep-alive pools keep more. A limit below that is
 * found at start and at every reload instead of as accept() failures under load: the soft limit
 * is raised as far as the hard limit allows, and when that is not enough the shortfall is logged
 * with the numbers an operator needs (the accept path still copes: see worker.c).
 */
#ifndef BREAKWATER_FDLIMIT_H
#define BREAKWATER_FDLIMIT_H

#include <stdint.h>

#include "breakwater/config.h"
#include "breakwater/log.h"

/* Descriptors one worker can need with this configuration: two per client connection (client
 * and upstream), the idle keep-alive pools, the listeners, and a fixed reserve for the event
 * loop, signals, logs and TLS. Pure. */
uint64_t bw_fdlimit_needed(const bw_config *cfg);

/* Raises the soft RLIMIT_NOFILE towards bw_fdlimit_needed() (workers forked afterwards inherit
 * it). Logs what it did, or a warning with the numbers when the hard limit is too low.
 * Returns 0 when the limit now covers the need, -1 otherwise. */
int bw_fdlimit_apply(const bw_config *cfg, bw_log *log);

#endif
