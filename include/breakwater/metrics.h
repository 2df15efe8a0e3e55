/*
 * Prometheus exposition (text format 0.0.4) of everything the shared region knows: per-worker
 * counters summed, breaker states and transitions, rate-limit key counts, plus the master-only
 * figures (worker restarts, reloads, Redis). Rendered by the master for GET /metrics.
 */
#ifndef BREAKWATER_METRICS_H
#define BREAKWATER_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <event2/buffer.h>

#include "breakwater/config.h"
#include "breakwater/shm.h"

/* Figures only the master has. */
typedef struct bw_metrics_master {
    uint64_t worker_restarts;
    uint64_t reloads_success;
    uint64_t reloads_failure;
    uint64_t redis_pending_deltas; /* rate-limit deltas not yet written to Redis */
    uint64_t admin_accept_errors;  /* accept() failures on the admin listener */
    uint64_t admin_auth_failures;  /* admin requests refused for a missing or wrong token */
} bw_metrics_master;

/*
 * Appends the whole exposition to out. cfg is the running configuration (breaker parameters,
 * which upstreams exist now); counter series come from every named slot of the region, so
 * series of a route or upstream removed by a reload keep their last values instead of
 * disappearing mid-rate(). now_ms is CLOCK_MONOTONIC, wall_ms the wall clock.
 */
void bw_metrics_render(const bw_shm *shm, const bw_config *cfg, const bw_metrics_master *m,
                       uint64_t now_ms, uint64_t wall_ms, struct evbuffer *out);

/*
 * The Prometheus process set, read from /proc: process_cpu_seconds_total,
 * process_resident_memory_bytes and process_open_fds summed over the master and the workers;
 * process_max_fds and process_start_time_seconds of the master. A worker that exits while it
 * is read is left out of the sums. bw_metrics_render appends this for its own process (the
 * master) and every worker slot of the region that holds a pid, so callers of the admin need
 * not call it themselves.
 */
void bw_metrics_render_process(pid_t master, const pid_t *workers, size_t n_workers,
                               struct evbuffer *out);

/* What one process's /proc entries say (the parsers below are pure, for tests). */
typedef struct bw_proc_sample {
    double cpu_seconds; /* user + system */
    uint64_t rss_bytes;
    double start_time_seconds; /* Unix time */
    uint64_t open_fds;
    uint64_t max_fds; /* soft RLIMIT_NOFILE; 0 when unlimited or unknown */
} bw_proc_sample;

/* Parses the text of /proc/PID/stat: CPU time, resident set and start time (seconds since
 * boot_time). Returns 0, or -1 when the text is not a stat line. */
int bw_metrics_parse_proc_stat(const char *text, long ticks_per_sec, long page_size,
                               double boot_time, bw_proc_sample *out);
/* The soft "Max open files" of /proc/PID/limits; 0 for "unlimited" or when absent. */
uint64_t bw_metrics_parse_max_fds(const char *limits_text);
/* "btime" of /proc/stat (boot time, Unix seconds); 0 when absent. */
double bw_metrics_parse_boot_time(const char *proc_stat_text);

#endif
