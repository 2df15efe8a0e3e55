/*
 * Checks RLIMIT_NOFILE against what the configuration may use (see include/breakwater/fdlimit.h).
 * nginx leaves this to worker_rlimit_nofile and HAProxy computes it from maxconn; breakwater
 * does the latter, since max_connections already says what the operator expects to serve.
 */
#include "breakwater/fdlimit.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/resource.h>

/* The event loop, signalfd and signal pipes, log files, TLS and DNS sockets, and slack. */
#define BW_FDLIMIT_RESERVE 64

uint64_t bw_fdlimit_needed(const bw_config *cfg)
{
    uint64_t need =
        2 * (uint64_t)cfg->limits.max_connections + cfg->n_listeners + BW_FDLIMIT_RESERVE;
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        need += (uint64_t)cfg->upstreams[i].keepalive_max_idle * cfg->upstreams[i].n_servers;
    return need;
}

int bw_fdlimit_apply(const bw_config *cfg, bw_log *log)
{
    uint64_t need = bw_fdlimit_needed(cfg);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
        bw_log_warn(log, "cannot read RLIMIT_NOFILE: %s", strerror(errno));
        return -1;
    }
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur >= need)
        return 0;
    if (rl.rlim_cur == RLIM_INFINITY)
        return 0;
    uint64_t old = rl.rlim_cur;
    uint64_t target = need;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < target)
        target = rl.rlim_max;
    if (target > old) {
        struct rlimit raised = {.rlim_cur = (rlim_t)target, .rlim_max = rl.rlim_max};
        if (setrlimit(RLIMIT_NOFILE, &raised) == 0) {
            bw_log_info(log,
                        "raised the open-file limit from %" PRIu64 " to %" PRIu64
                        " (limits.max_connections %u needs about %" PRIu64 " per worker)",
                        old, target, cfg->limits.max_connections, need);
            rl.rlim_cur = raised.rlim_cur;
        } else {
            bw_log_warn(log, "cannot raise the open-file limit from %" PRIu64 " to %" PRIu64 ": %s",
                        old, target, strerror(errno));
        }
    }
    if (rl.rlim_cur >= need)
        return 0;
    bw_log_warn(log,
                "limits.max_connections %u needs about %" PRIu64 " open files per worker, but "
                "the limit is %" PRIu64 " (hard limit %" PRIu64 "): about %" PRIu64 " client "
                "connections fit; raise LimitNOFILE= (systemd) or ulimit -n, or lower "
                "limits.max_connections",
                cfg->limits.max_connections, need, (uint64_t)rl.rlim_cur,
                rl.rlim_max == RLIM_INFINITY ? UINT64_MAX : (uint64_t)rl.rlim_max,
                rl.rlim_cur > need - 2 * (uint64_t)cfg->limits.max_connections
                    ? ((uint64_t)rl.rlim_cur - (need - 2 * (uint64_t)cfg->limits.max_connections)) /
                          2
                    : 0);
    return -1;
}
