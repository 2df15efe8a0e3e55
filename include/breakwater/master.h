/*
 * Master process: owns the configuration, the listening sockets, the TLS contexts and the
 * workers. It forks `workers` processes per configuration generation, respawns a current worker
 * that dies, replaces the whole generation on SIGHUP (new workers first, then the old ones
 * drain), drains everything on SIGTERM/SIGINT, and serves the admin listener.
 */
#ifndef BREAKWATER_MASTER_H
#define BREAKWATER_MASTER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <openssl/ssl.h>

#include "breakwater/config.h"
#include "breakwater/log.h"

/* Runs the master with a configuration already loaded and checked. Returns the exit status. */
int bw_master_run(const char *config_path, bw_config *cfg);

/* What the admin endpoints may ask of the master. */
typedef struct bw_master_status {
    uint32_t workers_expected;
    uint32_t workers_alive;
    bool draining;
    uint64_t worker_restarts;
    uint64_t reloads_ok;
    uint64_t reloads_failed;
    uint64_t redis_pending_deltas;
    uint64_t started_wall_ms; /* when the master started (wall clock) */
} bw_master_status;

#endif
