/*
 * Fleet state through Redis: the master's synchronisation loop.
 *
 * Runs only in the master's libevent loop (workers never talk to Redis). Every sync interval it
 * sends one pipelined round to Redis: a heartbeat for this instance, each upstream's breaker
 * record (written when the breaker changed here, read always, and applied when another instance
 * changed it), and the rate-limit tokens the workers took since the last round, which come back
 * as the fleet's consumption of the same keys. Redis being down, slow or refusing never affects
 * a request: workers read only shared memory, and what could not be sent is sent later.
 * hiredis 0.14 has no timeouts, no reconnect and an unbounded output buffer; this module brings
 * its own (see docs/redis.md for the behaviour, the key layout and the conflict rules).
 */
#ifndef BREAKWATER_REDIS_SYNC_H
#define BREAKWATER_REDIS_SYNC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "breakwater/config.h"
#include "breakwater/log.h"
#include "breakwater/shm.h"

struct event_base;

/* Most commands waiting for a reply; a round that would exceed it is skipped (and counted). */
#define BW_REDIS_MAX_IN_FLIGHT 1000
/* Reconnection backoff: first delay and cap, in ms (each delay gets up to 50% jitter off). */
#define BW_REDIS_BACKOFF_MIN_MS 100
#define BW_REDIS_BACKOFF_MAX_MS 5000

typedef struct bw_redis_sync bw_redis_sync;

/* Where to connect, from redis.url. */
typedef struct bw_redis_target {
    bool unix_socket;
    char host[64]; /* an IP literal; "localhost" is 127.0.0.1 */
    int port;
    char path[108];
    char password[256]; /* empty: no AUTH */
    int db;             /* 0: no SELECT */
} bw_redis_target;

typedef struct bw_redis_stats {
    bool configured;
    bool up;                    /* connected, authenticated, scripts loaded */
    uint64_t last_sync_wall_ms; /* end of the last round that fully succeeded; 0 = never */
    uint64_t errors;            /* every failure: connect, auth, timeout, error reply, ... */
    uint64_t pending_deltas;    /* rate-limit tokens taken here and not yet acknowledged */
    uint64_t rounds;            /* rounds completed */
    uint64_t rounds_skipped;    /* rounds not sent: previous one still out, or too many in flight */
    uint64_t connects;          /* successful connections (the first one included) */
    uint32_t live_instances;    /* from the heartbeats; 0 = not known yet */
    uint64_t data_losses;       /* times the fleet epoch changed: Redis lost its data */
    uint64_t fleet_resets;      /* deletions of the breaker index seen (every breaker reset) */
    uint64_t failovers;         /* with Sentinel: moves to a master at another address */
} bw_redis_stats;

/*
 * Parses redis://[:password@]host[:port][/db] (host an IPv4 literal, [IPv6] or localhost; no
 * DNS, since hiredis 0.14 would resolve it synchronously) or unix:///path. The password may be
 * percent-encoded. Returns 0, or -1 with a reason (never containing the password) in err.
 */
int bw_redis_url_parse(const char *url, bw_redis_target *out, char *err, size_t errlen);

/*
 * Creates the loop for cfg (whose upstreams and policies bw_shm_bind() has placed in shm) and,
 * when cfg->redis.enabled, starts connecting. instance_id names this instance in Redis (NULL:
 * "<hostname>-<pid>-<random>"); it must differ between instances. Publishes Redis health into
 * shm->hdr->status. Returns NULL only when out of memory.
 */
bw_redis_sync *bw_redis_sync_new(struct event_base *base, const bw_shm *shm, const bw_config *cfg,
                                 bw_log *log, const char *instance_id);

/* After a reload (cfg bound to shm): new upstreams, policies, URL or interval take effect.
 * cfg must stay valid until the next call or bw_redis_sync_free(). */
void bw_redis_sync_set_config(bw_redis_sync *r, const bw_config *cfg);

/* While Redis is unreachable, whether workers limit each key to its share (capacity divided by
 * the last known number of live instances). Default true. */
void bw_redis_sync_set_share_when_down(bw_redis_sync *r, bool on);

/*
 * Operator reset (POST /upstreams/{name}/reset): closes the local breaker and deletes its Redis
 * record, which every other instance takes as a reset. Returns 0 when the DEL was sent, 1 when
 * Redis is unavailable (the local breaker is reset; the DEL is sent once Redis is back), -1 for
 * an unknown upstream.
 */
int bw_redis_sync_reset_breaker(bw_redis_sync *r, const char *upstream);
/*
 * Operator force-open (POST /upstreams/{name}/open), after the local breaker was forced: writes
 * the record with forced_at_ms, which every instance honours until the record is deleted by a
 * reset. Returns 0 when sent, 1 when it will be sent once Redis is back, -1 for an unknown name.
 */
int bw_redis_sync_force_open(bw_redis_sync *r, const char *upstream);
/* Operator refill (DELETE /ratelimits/{policy}/{key}): deletes {prefix}:rate-limit:{policy}:{key}.
 * Returns 0 when sent, 1 when Redis is unavailable (not retried: the local bucket is full). */
int bw_redis_sync_delete_ratelimit(bw_redis_sync *r, const char *policy, const char *key);

void bw_redis_sync_stats(const bw_redis_sync *r, bw_redis_stats *out);
const char *bw_redis_sync_instance_id(const bw_redis_sync *r);
/* The Lua text of the rate-limit flush (docs/redis.md describes its arguments), for tests and
 * for operators who want to replay a flush with redis-cli EVAL. */
const char *bw_redis_sync_ratelimit_script(void);

/* Disconnects and frees; safe with NULL. */
/* The socket of the current connection, or -1: a forked worker closes its inherited copy, so
 * that the master's reconnects are not kept half-alive by children. */
int bw_redis_sync_fd(const bw_redis_sync *r);

void bw_redis_sync_free(bw_redis_sync *r);

#endif
