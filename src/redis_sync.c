/*
 * Fleet state through Redis, in the master's event loop (hiredis 0.14 async + libevent adapter).
 *
 * Connection. One redisAsyncContext is one connection: it is created by connect_now(), goes
 * through a handshake (AUTH, SELECT, SCRIPT LOAD of both scripts, pipelined), and is given up
 * by drop_connection() on any failure, after which a backoff timer makes a new one. hiredis
 * frees a context itself after a failed connect callback and after the disconnect callback, so
 * those callbacks only forget it; a context is freed by us only from a timer or event callback
 * of ours, never from inside a hiredis callback (drop_later() defers to an event for that).
 * There is one command timer: whenever commands are out, the oldest must be answered within
 * command_timeout_ms, or the connection is dropped (which answers every callback with NULL).
 *
 * Rounds. Every sync_interval_ms one pipelined round is sent, and the next one only when every
 * reply of the previous one is in, so at most one round is ever in flight and a slow Redis
 * slows the rounds down instead of piling commands up. A round is: the heartbeat, one command
 * per upstream (the conditional-write script when the breaker changed here, HGETALL otherwise),
 * and one script call per rate-limit key with tokens not yet acknowledged.
 *
 * Rate limits. Each (policy, key) has one Redis hash holding the fleet's GCRA state ("tat", the
 * fleet's theoretical arrival time in microseconds of Redis' clock, or "taken" for buckets that
 * never refill) and one field per instance recording the cumulative number of tokens that
 * instance has delivered. A flush sends the absolute cumulative number, so sending it again
 * after a lost reply changes nothing; the script adds only the growth to the fleet state and
 * answers how far ahead of Redis' now the fleet's TAT is, which the master then imposes on the
 * local bucket (never giving tokens back). Tokens collected from shared memory live in the
 * master's record of the slot until Redis acknowledges them, across any number of failures.
 *
 * Breakers. Last writer wins by (updated_at_ms, updated_by). A local transition is written by
 * a script that writes only when it is newer than the stored record and returns the record; a
 * record newer than what this instance last wrote or applied is forced onto the local breaker;
 * a record that disappeared (redis-cli DEL) resets the local breaker.
 */
#include "breakwater/redis_sync.h"

#include "breakwater/path.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "breakwater/breaker.h"
#include "breakwater/ratelimit.h"

#define ID_MAX 96
/* Instances whose heartbeat is older than this many sync intervals (at least STALE_MIN_MS) are
 * no longer counted as live. */
#define STALE_INTERVALS 10
#define STALE_MIN_MS 3000
/* A rate-limit hash outlives the moment its bucket is full again by this long, so that an
 * instance retrying a flush still finds its own field and is not counted twice. */
#define RL_LINGER_MS 60000
/* An error of one kind is logged at most once per this many ms; the rest are counted. */
#define LOG_EVERY_MS 10000
/* Rate-limit records whose slot was taken by another key while they still had tokens to
 * deliver wait in a list that grows as needed up to this many, or the number of table entries
 * if larger (so master memory stays bounded whatever the outage); beyond it the oldest are
 * given up, and their tokens counted. */
#define ORPHANS_MIN 1024
/* Keys refreshed from the fleet per round without having taken anything here since the last
 * round: the bounded refresh that keeps Redis work proportional to activity. */
#define RL_REFRESH_PER_ROUND 256
/* A key used here keeps being refreshed from the fleet (a flush of nothing new) for this many
 * sync intervals after its last local token, at least PULL_MIN_MS: the fleet's consumption
 * reaches a bucket even in rounds where this instance took nothing for the key. */
#define PULL_INTERVALS 20
#define PULL_MIN_MS 2000

typedef enum err_kind {
    ERR_CONNECT = 0,
    ERR_AUTH,
    ERR_TIMEOUT,
    ERR_REPLY,    /* an error reply or a reply of the wrong shape */
    ERR_OVERLOAD, /* a round skipped for the in-flight bound */
    ERR_KINDS
} err_kind;

static const char *const err_names[ERR_KINDS] = {"connect", "auth", "timeout", "reply", "overload"};

typedef enum conn_state {
    CONN_IDLE = 0,   /* no context; a reconnect may be scheduled */
    CONN_CONNECTING, /* TCP/unix connect in progress */
    CONN_HANDSHAKE,  /* AUTH / SELECT / SCRIPT LOAD out */
    CONN_READY,
} conn_state;

typedef enum cmd_kind {
    CMD_HANDSHAKE = 0,
    CMD_SCRIPT_RL,
    CMD_SCRIPT_BR,
    CMD_BREAKER, /* conditional write or HGETALL: both answer the record */
    CMD_DEL,
    CMD_HEARTBEAT,
    CMD_LIVE,
    CMD_RL,
    CMD_OPERATOR,   /* force-open and rate-limit refills: the reply says nothing we need */
    CMD_EPOCH_SET,  /* SET {prefix}:epoch NX: creates the epoch after a data loss */
    CMD_EPOCH_HEAD, /* GET of the epoch before the round's breaker reads */
    CMD_EPOCH_TAIL, /* GET of the epoch after them: confirms what they saw */
    CMD_INDEX,      /* HGETALL {prefix}:circuit-breaker */
    CMD_INDEX_SET,  /* copies one record's state into the index */
    CMD_ROLE,       /* with Sentinel: the server found must say it is the master */
} cmd_kind;

/* What this instance knows about one upstream's fleet record (indexed by the shm slot). */
typedef struct br_rec {
    char name[BW_SHM_NAME_MAX];
    bool used;
    uint32_t gen;        /* breaker generation last written, applied or adopted */
    bool dirty;          /* a local transition not yet settled with Redis */
    uint64_t local_at;   /* wall ms stamp of that transition */
    bool known;          /* the record existed the last time it was read */
    bool pending_del;    /* an operator reset whose DEL has not been acknowledged */
    bool pending_force;  /* an operator force-open not yet written to the record */
    bool forced_seen;    /* the record carried forced_at_ms when last read */
    uint64_t applied_at; /* stamp of the newest record written or applied */
    char applied_by[ID_MAX];
    bool del_seen;         /* this round read no record where one was known: a reset, once the
                            * round's closing epoch read confirms Redis kept its data */
    bool republish;        /* Redis lost its data: write the last known record back as it was */
    int8_t in_index;       /* the index field read this round: a bw_breaker_state, or -1 */
    uint8_t bad;           /* consecutive error replies or malformed records for this upstream */
    uint64_t bad_until_ms; /* monotonic: not asked again before (backoff after bad replies) */
} br_rec;

/* What this instance has collected and delivered for one rate-limit slot's key. */
typedef struct rl_rec {
    uint64_t tag; /* the slot owner this record is for; 0 = none */
    uint64_t inc; /* incarnation: a fresh record never reuses a field value of an older one */
    uint64_t cum; /* tokens collected from shared memory, in total */
    uint64_t acked;
    uint64_t sent;         /* largest cumulative sent; above acked: those tokens' fate is unknown */
    uint64_t sent_ms;      /* monotonic ms of the first send of that unknown amount */
    uint64_t active_ms;    /* monotonic ms of the last tokens collected here */
    uint64_t bad_until_ms; /* monotonic: the key held something else; not sent before */
    uint8_t bad;           /* consecutive such answers */
    uint32_t policy_id;
    char key[BW_RATELIMIT_FLEET_KEY_MAX + 1]; /* the policy is named through policy_id */
} rl_rec;

typedef struct policy_ent {
    bool used;
    char name[BW_SHM_NAME_MAX];
    bw_ratelimit_params params;
} policy_ent;

/* One key of a rate-limit flush: which record it settles, and what was sent. */
typedef struct rl_item {
    uint32_t idx;
    bool orphan;
    uint64_t inc, cum;
} rl_item;

typedef struct cmd {
    struct bw_redis_sync *r;
    cmd_kind kind;
    uint32_t idx;
    bool orphan;
    uint64_t inc, cum, local_at;
    bool republish; /* CMD_BREAKER: a record written back after a data loss */
    rl_item *items; /* CMD_RL: the keys of the batch */
    uint32_t n_items;
} cmd;

static void cmd_free(cmd *c)
{
    free(c->items);
    free(c);
}

struct bw_redis_sync {
    struct event_base *base;
    const bw_shm *shm;
    const bw_config *cfg;
    bw_log *log;
    char id[ID_MAX];

    bool enabled;
    bool share_when_down;
    char *url;
    char *prefix;
    uint32_t interval_ms, connect_timeout_ms, command_timeout_ms;
    bw_redis_target target;
    bool target_ok;

    redisAsyncContext *ctx;
    conn_state state;
    bool closing; /* a drop is scheduled: send nothing more on this context */
    struct event *tick, *timeout, *retry, *drop_ev;
    unsigned attempt;
    uint32_t in_flight;
    bool round_active, round_failed, handshake_failed;
    bool scripts_needed;
    char sha_rl[41], sha_br[41];

    br_rec *br;
    uint32_t n_br;
    policy_ent *pol;
    uint32_t n_pol;
    rl_rec *rl;
    uint32_t n_rl, cursor;
    rl_rec *orphans; /* see ORPHANS_MIN; compacted only between rounds */
    uint32_t n_orphans, cap_orphans, max_orphans;
    uint64_t orphan_tokens_lost;
    uint32_t refresh_from; /* where the next round's bounded refresh starts */
    uint64_t next_inc;

    bool up;
    uint64_t errors, rounds, skipped, connects, last_sync_wall_ms, pending;
    uint32_t live;
    uint64_t last_log_ms[ERR_KINDS], suppressed[ERR_KINDS];
    struct rl_batch *batch; /* reused by every rate-limit round */
    /* Per entry: its record needs a visit even with nothing pending (tokens not yet acknowledged,
     * or used recently enough to keep pulling). The round's scan reads only this and the shared
     * pending counts, not the records themselves (over 150 bytes each). */
    uint8_t *rl_busy;

    /* Fleet epoch: a random value in {prefix}:epoch, created by the first instance to find it
     * missing. A record that vanishes while the epoch stays is an operator's reset; a changed
     * or missing epoch means Redis lost its data, and every instance re-publishes instead. */
    char epoch[40];
    bool epoch_known;
    bool round_lost;  /* this round found the epoch changed: nothing missing is a reset */
    bool index_known; /* the index hash existed the last time it was read */
    bool index_read;  /* this round's index read succeeded (in_index is valid) */
    bool index_del_seen;
    uint64_t data_losses, fleet_resets, wrong_type;
    /* Sentinel (redis.sentinels): the master's address is asked of one sentinel at a time, on
     * a connection of its own, before each connect and every SENTINEL_CHECK_MS while
     * connected; a different answer moves the connection to the new master. */
    bool sentinel;
    char *master_name;
    char **sentinels;
    uint32_t n_sentinels, s_next, s_tried;
    redisAsyncContext *sctx;
    bool s_checking; /* the query in progress is a check while connected */
    bool s_ok;       /* the last query's outcome, for on_sentinel_next */
    struct event *s_timeout, *s_next_ev, *s_check;
    uint64_t sentinel_queries, failovers;
    unsigned err_streak;    /* consecutive rounds with an error reply */
    uint64_t hold_until_ms; /* monotonic: no round before (backoff after failed rounds) */
};

/* The rate-limit flush, for one key or a batch of them. KEYS: the keys. ARGV: instance, then
 * RL_ARGS values per key, then linger in ms. Per key: incarnation, cumulative, acknowledged
 * base, emission interval in us (0: never refills), largest allowed lead in us, the largest
 * cumulative sent before whose fate is unknown ("unsure"), how long ago (us) the first of those
 * sends was, and how long ago (us) the newest tokens were collected.
 *
 * The tokens between the base and "unsure" may already have been counted by a flush whose reply
 * was lost: they are charged as of the moment of that send. If the flush did land and the key
 * has since expired (its bucket full again, plus the linger), charging them again as of then
 * adds nothing, because they were already paid back; if it never landed, that is when they
 * were due anyway. Newer tokens are charged as of their collection. So a flush is idempotent
 * even after expiry. Keys of policies that never refill ("taken") get no expiry at all.
 * A key holding something other than a hash answers -1 and is left alone. One key answers an
 * integer (the fleet's lead in us, or the count taken), several an array of them. */
#define RL_ARGS 8
static const char rl_script[] =
    "if redis.replicate_commands then redis.replicate_commands() end\n"
    "local me, linger = ARGV[1], tonumber(ARGV[#ARGV])\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local out = {}\n"
    "for k = 1, #KEYS do\n"
    "  local key, b = KEYS[k], 1 + (k - 1) * 8\n"
    "  local inc = ARGV[b + 1]\n"
    "  local cum, prev = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])\n"
    "  local interval, cap = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])\n"
    "  local unsure = tonumber(ARGV[b + 6])\n"
    "  local t1, t2 = now - tonumber(ARGV[b + 7]), now - tonumber(ARGV[b + 8])\n"
    "  local cur = redis.pcall('HMGET', key, me, 'tat', 'taken')\n"
    "  if cur.err then\n"
    "    out[k] = -1\n"
    "  else\n"
    "    if cur[1] then\n"
    "      local i, c = string.match(cur[1], '^(%d+):(%d+)$')\n"
    "      if i == inc then prev = tonumber(c) end\n"
    "    end\n"
    "    local delta = cum - prev\n"
    "    if interval > 0 then\n"
    "      local tat = tonumber(cur[2]) or 0\n"
    "      local old = tat\n"
    "      local s1 = math.min(cum, unsure) - prev\n"
    "      if s1 > 0 then\n"
    "        local v = math.min(math.max(tat, t1) + s1 * interval, t1 + cap)\n"
    "        if v > tat then tat = v end\n"
    "      end\n"
    "      local s2 = cum - math.max(prev, unsure)\n"
    "      if s2 > 0 then\n"
    "        local v = math.min(math.max(tat, t2) + s2 * interval, now + cap)\n"
    "        if v > tat then tat = v end\n"
    "      end\n"
    "      if delta > 0 and tat > old then\n"
    "        redis.call('HSET', key, 'tat', string.format('%.0f', tat), me, inc .. ':' .. ARGV[b + "
    "2])\n"
    "      elseif delta > 0 then\n"
    "        redis.call('HSET', key, me, inc .. ':' .. ARGV[b + 2])\n"
    "      end\n"
    "      local lead = tat - now\n"
    "      if lead < 0 then lead = 0 end\n"
    "      redis.call('PEXPIRE', key, math.ceil(lead / 1000) + linger)\n"
    "      out[k] = math.floor(lead)\n"
    "    else\n"
    "      local n = tonumber(cur[3]) or 0\n"
    "      if delta > 0 then\n"
    "        n = n + delta\n"
    "        redis.call('HSET', key, 'taken', string.format('%.0f', n), me,\n"
    "                   inc .. ':' .. ARGV[b + 2])\n"
    "        redis.call('PERSIST', key)\n"
    "      end\n"
    "      out[k] = math.floor(n)\n"
    "    end\n"
    "  end\n"
    "end\n"
    "if #KEYS == 1 then return out[1] end\n"
    "return out\n";

/* Answers the fields of a breaker record this code reads, as HGETALL would but never more than
 * those eight fields of at most 128 bytes each: whatever else is stored under the key, the reply
 * stays small (hiredis 0.14 buffers a reply of any size). */
#define BR_RETURN                                                                                  \
    "local names = {'state', 'failures', 'opened_at_ms', 'updated_by', 'updated_at_ms',\n"         \
    "               'backoff_level', 'jitter_permille', 'forced_at_ms'}\n"                         \
    "local v = redis.call('HMGET', KEYS[1], unpack(names))\n"                                      \
    "local out = {}\n"                                                                             \
    "for i, n in ipairs(names) do\n"                                                               \
    "  if v[i] then out[#out + 1] = n; out[#out + 1] = string.sub(v[i], 1, 128) end\n"             \
    "end\n"                                                                                        \
    "return out\n"

/* The breaker read: the record, bounded. KEYS: the record. */
static const char br_read_script[] = BR_RETURN;

/* The index read: the states of this configuration's upstreams (ARGV), bounded, after whether
 * the index exists at all. KEYS: the index. */
static const char index_read_script[] =
    "local out = {redis.call('EXISTS', KEYS[1])}\n"
    "if #ARGV > 0 then\n"
    "  local v = redis.call('HMGET', KEYS[1], unpack(ARGV))\n"
    "  for i = 1, #ARGV do out[i + 1] = v[i] and string.sub(v[i], 1, 16) or '' end\n"
    "end\n"
    "return out\n";

/* The epoch read, bounded. KEYS: the epoch key. */
static const char epoch_read_script[] = "local v = redis.call('GET', KEYS[1])\n"
                                        "if v then return string.sub(v, 1, 64) end\n"
                                        "return v\n";

/* The breaker write: only when newer than the stored record (by updated_at_ms, then
 * updated_by), announced on the events channel and copied into the index hash (KEYS[2], one
 * field per upstream holding its state); answers the record as it now stands.
 * ARGV: state, failures, opened_at_ms, updated_by, updated_at_ms, channel, upstream,
 * backoff_level, jitter_permille, forced_at_ms ("0": not forced; a forced record keeps the field
 * until it is deleted, so an instance that has not yet heard of the force cannot clear it). */
static const char br_script[] =
    "local cur = redis.call('HMGET', KEYS[1], 'updated_at_ms', 'updated_by')\n"
    "local at, cat = tonumber(ARGV[5]), tonumber(cur[1])\n"
    "local cby = cur[2] or ''\n"
    "if cat == nil or at > cat or (at == cat and ARGV[4] > cby) then\n"
    "  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'failures', ARGV[2], 'opened_at_ms',\n"
    "             ARGV[3], 'updated_by', ARGV[4], 'updated_at_ms', ARGV[5],\n"
    "             'backoff_level', ARGV[8], 'jitter_permille', ARGV[9])\n"
    "  if ARGV[10] ~= '0' then redis.call('HSET', KEYS[1], 'forced_at_ms', ARGV[10]) end\n"
    "  redis.call('HSET', KEYS[2], ARGV[7], ARGV[1])\n"
    "  redis.call('PUBLISH', ARGV[6], ARGV[7] .. ' ' .. ARGV[1] .. ' ' .. ARGV[4])\n"
    "end\n" BR_RETURN;

/* The heartbeat, on Redis' clock (instances' clocks may disagree by seconds): this instance's
 * score becomes Redis' now in ms, members older than the staleness limit go, and the number of
 * live instances is answered. KEYS: the instances set. ARGV: instance, staleness in ms. */
static const char hb_script[] =
    "if redis.replicate_commands then redis.replicate_commands() end\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "redis.call('ZADD', KEYS[1], now, ARGV[1])\n"
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))\n"
    "return redis.call('ZCARD', KEYS[1])\n";

/* Copies a record's state (closed when there is none) into the index: read and write in one
 * script, so the index never gets a state older than the record. KEYS: record, index.
 * ARGV: upstream. */
static const char index_script[] = "local s = redis.call('HGET', KEYS[1], 'state') or 'closed'\n"
                                   "redis.call('HSET', KEYS[2], ARGV[1], s)\n"
                                   "return s\n";

static uint64_t clock_ms(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Breakers run on the monotonic clock (bw_breaker_now_ms); what goes to Redis is converted to
 * wall-clock milliseconds (to_wall/to_mono) so that opened_at/updated_at compare across hosts. */
static uint64_t wall_ms(void);
static uint64_t breaker_ms(void)
{
    return bw_breaker_now_ms();
}

static uint64_t mono_ms(void)
{
    return clock_ms(CLOCK_MONOTONIC);
}

static uint64_t wall_ms(void)
{
    return clock_ms(CLOCK_REALTIME);
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * UINT64_C(1000000000) + (uint64_t)ts.tv_nsec;
}

static uint32_t random_u32(void)
{
    uint32_t v = 0;
    if (getrandom(&v, sizeof(v), GRND_NONBLOCK) != (ssize_t)sizeof(v))
        v = (uint32_t)mono_ns() ^ (uint32_t)getpid();
    return v;
}

static void copy_str(char *dst, size_t len, const char *src)
{
    snprintf(dst, len, "%s", src != NULL ? src : "");
}

/* ---------------------------------------------------------------------------------------- */
/* URL                                                                                       */

static int parse_uint(const char *s, size_t len, long max, long *out)
{
    if (len == 0 || len > 9)
        return -1;
    long v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    if (v > max)
        return -1;
    *out = v;
    return 0;
}

int bw_redis_url_parse(const char *url, bw_redis_target *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    out->port = 6379;
    if (url == NULL) {
        snprintf(err, errlen, "no URL");
        return -1;
    }
    if (strncmp(url, "unix://", 7) == 0) {
        const char *path = url + 7;
        if (path[0] != '/' || strlen(path) >= sizeof(out->path)) {
            snprintf(err, errlen, "unix:// needs an absolute socket path shorter than %zu bytes",
                     sizeof(out->path));
            return -1;
        }
        out->unix_socket = true;
        copy_str(out->path, sizeof(out->path), path);
        return 0;
    }
    if (strncmp(url, "redis://", 8) != 0) {
        snprintf(err, errlen, "must start with redis:// or unix://");
        return -1;
    }
    const char *p = url + 8;
    const char *at = strrchr(p, '@');
    if (at != NULL) {
        /* Only the password form (":password@"); Redis 5 ACL users are not supported. */
        if (p[0] != ':') {
            snprintf(err, errlen, "credentials must be written :password@");
            return -1;
        }
        if (bw_percent_decode(p + 1, (size_t)(at - p - 1), out->password, sizeof(out->password)) <
            0) {
            snprintf(err, errlen, "the password is malformed or too long");
            return -1;
        }
        p = at + 1;
    }
    const char *slash = strchr(p, '/');
    const char *hostend = slash != NULL ? slash : p + strlen(p);
    const char *portsep = NULL;
    const char *h = p, *he;
    if (*p == '[') {
        const char *rb = memchr(p, ']', (size_t)(hostend - p));
        if (rb == NULL) {
            snprintf(err, errlen, "unterminated [IPv6] address");
            return -1;
        }
        h = p + 1;
        he = rb;
        if (rb + 1 < hostend) {
            if (rb[1] != ':') {
                snprintf(err, errlen, "unexpected text after ]");
                return -1;
            }
            portsep = rb + 1;
        }
    } else {
        portsep = memchr(p, ':', (size_t)(hostend - p));
        he = portsep != NULL ? portsep : hostend;
    }
    size_t hl = (size_t)(he - h);
    if (hl == 0 || hl >= sizeof(out->host)) {
        snprintf(err, errlen, "missing or too long host");
        return -1;
    }
    memcpy(out->host, h, hl);
    out->host[hl] = '\0';
    if (strcmp(out->host, "localhost") == 0)
        copy_str(out->host, sizeof(out->host), "127.0.0.1");
    unsigned char buf[16];
    if (inet_pton(AF_INET, out->host, buf) != 1 && inet_pton(AF_INET6, out->host, buf) != 1) {
        snprintf(err, errlen, "host must be an IP address or localhost (no DNS lookups)");
        return -1;
    }
    if (portsep != NULL) {
        long port;
        if (parse_uint(portsep + 1, (size_t)(hostend - portsep - 1), 65535, &port) < 0 ||
            port == 0) {
            snprintf(err, errlen, "invalid port");
            return -1;
        }
        out->port = (int)port;
    }
    if (slash != NULL && slash[1] != '\0') {
        long db;
        if (parse_uint(slash + 1, strlen(slash + 1), 1000000, &db) < 0) {
            snprintf(err, errlen, "invalid database number");
            return -1;
        }
        out->db = (int)db;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Health, errors, logging                                                                   */

static bw_ratelimit_table *rl_table(const bw_redis_sync *r)
{
    if (r->shm == NULL || r->shm->hdr == NULL || r->shm->hdr->rl_entries == 0)
        return NULL;
    bw_ratelimit_table *t = bw_shm_ratelimit(r->shm);
    return bw_ratelimit_fleet_enabled(t) ? t : NULL;
}

static void publish(bw_redis_sync *r)
{
    bw_shm_status *st = &r->shm->hdr->status;
    atomic_store_explicit(&st->redis_configured, r->enabled ? 1u : 0u, memory_order_relaxed);
    atomic_store_explicit(&st->redis_required, r->enabled && r->cfg->redis.required ? 1u : 0u,
                          memory_order_relaxed);
    atomic_store_explicit(&st->redis_up, r->up ? 1u : 0u, memory_order_relaxed);
    atomic_store_explicit(&st->redis_last_sync_ms, r->last_sync_wall_ms, memory_order_relaxed);
    atomic_store_explicit(&st->redis_errors, r->errors, memory_order_relaxed);
    bw_ratelimit_table *t = rl_table(r);
    if (t != NULL) {
        uint32_t share = 0;
        if (r->enabled && !r->up && r->share_when_down && r->live > 1)
            share = r->live;
        bw_ratelimit_fleet_set_share(t, share);
    }
}

static void set_up(bw_redis_sync *r, bool up)
{
    if (r->up != up) {
        r->up = up;
        publish(r);
    }
}

/* Counts an error and logs it unless one of the same kind was logged in the last
 * LOG_EVERY_MS; the next line then says how many were not. */
__attribute__((format(printf, 3, 4))) static void fail(bw_redis_sync *r, err_kind kind,
                                                       const char *fmt, ...)
{
    r->errors++;
    atomic_store_explicit(&r->shm->hdr->status.redis_errors, r->errors, memory_order_relaxed);
    uint64_t now = mono_ms();
    if (r->last_log_ms[kind] != 0 && now - r->last_log_ms[kind] < LOG_EVERY_MS) {
        r->suppressed[kind]++;
        return;
    }
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (r->suppressed[kind] > 0)
        bw_log_warn(r->log, "redis: %s (%" PRIu64 " more %s errors since the last report)", msg,
                    r->suppressed[kind], err_names[kind]);
    else
        bw_log_warn(r->log, "redis: %s", msg);
    r->last_log_ms[kind] = now;
    r->suppressed[kind] = 0;
}

/* How long to leave something alone after n consecutive bad answers: the sync interval
 * doubling per answer, up to the reconnection cap. */
static uint64_t backoff_ms(const bw_redis_sync *r, unsigned n)
{
    uint64_t d = r->interval_ms ? r->interval_ms : 100;
    for (unsigned i = 1; i < n && d < BW_REDIS_BACKOFF_MAX_MS; i++)
        d *= 2;
    return d < BW_REDIS_BACKOFF_MAX_MS ? d : BW_REDIS_BACKOFF_MAX_MS;
}

/* ---------------------------------------------------------------------------------------- */
/* Connection                                                                                */

static void connect_now(bw_redis_sync *r);
static void on_reply(redisAsyncContext *ac, void *reply, void *privdata);

static void schedule_reconnect(bw_redis_sync *r)
{
    if (!r->enabled || evtimer_pending(r->retry, NULL))
        return;
    unsigned shift = r->attempt < 16 ? r->attempt : 16;
    uint64_t delay = (uint64_t)BW_REDIS_BACKOFF_MIN_MS << shift;
    if (delay > BW_REDIS_BACKOFF_MAX_MS)
        delay = BW_REDIS_BACKOFF_MAX_MS;
    /* Jitter: somewhere in [delay/2, delay], so a fleet does not reconnect in lockstep. */
    delay = delay / 2 + random_u32() % (delay / 2 + 1);
    r->attempt++;
    struct timeval tv = {(time_t)(delay / 1000), (suseconds_t)((delay % 1000) * 1000)};
    evtimer_add(r->retry, &tv);
}

static void arm_timeout(bw_redis_sync *r, uint32_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
    evtimer_add(r->timeout, &tv);
}

/* Gives the connection up now. Called only from our own timer/event callbacks (or the public
 * API), never from inside a hiredis callback: redisAsyncFree() answers every outstanding
 * callback with a NULL reply and then forgets the context. */
static void drop_connection(bw_redis_sync *r)
{
    redisAsyncContext *ac = r->ctx;
    r->ctx = NULL;
    r->state = CONN_IDLE;
    r->closing = false;
    evtimer_del(r->timeout);
    set_up(r, false);
    if (ac != NULL)
        redisAsyncFree(ac);
    r->round_active = false;
    r->in_flight = 0;
    schedule_reconnect(r);
}

/* From inside hiredis callbacks: stop using the context now, free it from the event loop. */
static void drop_later(bw_redis_sync *r)
{
    if (r->ctx == NULL || r->closing)
        return;
    r->closing = true;
    set_up(r, false);
    event_active(r->drop_ev, 0, 0);
}

static void on_drop_event(evutil_socket_t fd, short what, void *arg)
{
    bw_redis_sync *r = arg;
    if (r->closing)
        drop_connection(r);
}

static void sentinel_start(bw_redis_sync *r, bool check);

static void on_retry(evutil_socket_t fd, short what, void *arg)
{
    bw_redis_sync *r = arg;
    if (r->sentinel)
        sentinel_start(r, false);
    else
        connect_now(r);
}

static void on_timeout(evutil_socket_t fd, short what, void *arg)
{
    bw_redis_sync *r = arg;
    if (r->state == CONN_CONNECTING) {
        fail(r, ERR_TIMEOUT, "connect timed out after %" PRIu32 " ms", r->connect_timeout_ms);
        drop_connection(r);
    } else if (r->in_flight > 0) {
        fail(r, ERR_TIMEOUT, "no reply within %" PRIu32 " ms; reconnecting", r->command_timeout_ms);
        drop_connection(r);
    }
}

/* hiredis: the connect finished. On failure hiredis frees the context right after this
 * returns, so it is only forgotten here. */
static void on_connect(const redisAsyncContext *ac, int status);
/* hiredis: the connection is gone and the context is about to be freed by hiredis. */
static void on_disconnect(const redisAsyncContext *ac, int status)
{
    bw_redis_sync *r = ac->data;
    if (r == NULL || r->ctx != ac)
        return; /* we dropped it ourselves */
    r->ctx = NULL;
    r->state = CONN_IDLE;
    r->closing = false;
    evtimer_del(r->timeout);
    r->round_active = false;
    r->in_flight = 0;
    set_up(r, false);
    if (status != REDIS_OK)
        fail(r, ERR_CONNECT, "connection lost: %s", ac->errstr[0] ? ac->errstr : "closed");
    schedule_reconnect(r);
}

/* Sends one command; returns false (and frees c) when hiredis refused it. */
static bool send_argv(bw_redis_sync *r, cmd *c, int argc, const char **argv, const size_t *lens)
{
    if (r->ctx == NULL || r->closing ||
        redisAsyncCommandArgv(r->ctx, on_reply, c, argc, argv, lens) != REDIS_OK) {
        cmd_free(c);
        return false;
    }
    if (r->in_flight == 0)
        arm_timeout(r, r->command_timeout_ms);
    r->in_flight++;
    return true;
}

static cmd *new_cmd(bw_redis_sync *r, cmd_kind kind, uint32_t idx)
{
    cmd *c = calloc(1, sizeof(*c));
    if (c != NULL) {
        c->r = r;
        c->kind = kind;
        c->idx = idx;
    }
    return c;
}

/* Sends a command of plain NUL-terminated words. */
static bool send_words(bw_redis_sync *r, cmd_kind kind, uint32_t idx, int argc, const char **argv)
{
    size_t lens[16];
    for (int i = 0; i < argc && i < 16; i++)
        lens[i] = strlen(argv[i]);
    cmd *c = new_cmd(r, kind, idx);
    return c != NULL && send_argv(r, c, argc, argv, lens);
}

static void send_script_loads(bw_redis_sync *r)
{
    const char *a[] = {"SCRIPT", "LOAD", rl_script};
    send_words(r, CMD_SCRIPT_RL, 0, 3, a);
    const char *b[] = {"SCRIPT", "LOAD", br_script};
    send_words(r, CMD_SCRIPT_BR, 0, 3, b);
    r->scripts_needed = false;
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    bw_redis_sync *r = ac->data;
    if (r == NULL || r->ctx != ac)
        return;
    if (status != REDIS_OK) {
        r->ctx = NULL; /* hiredis frees it */
        r->state = CONN_IDLE;
        evtimer_del(r->timeout);
        fail(r, ERR_CONNECT, "cannot connect: %s", ac->errstr[0] ? ac->errstr : "failed");
        schedule_reconnect(r);
        return;
    }
    evtimer_del(r->timeout);
    r->state = CONN_HANDSHAKE;
    r->handshake_failed = false;
    if (r->target.password[0] != '\0') {
        const char *a[] = {"AUTH", r->target.password};
        send_words(r, CMD_HANDSHAKE, 0, 2, a);
    }
    if (r->target.db != 0) {
        char db[16];
        snprintf(db, sizeof(db), "%d", r->target.db);
        const char *a[] = {"SELECT", db};
        send_words(r, CMD_HANDSHAKE, 0, 2, a);
    }
    if (r->sentinel) {
        const char *a[] = {"ROLE"};
        send_words(r, CMD_ROLE, 0, 1, a);
    }
    send_script_loads(r);
}

static void connect_now(bw_redis_sync *r)
{
    if (!r->enabled || r->ctx != NULL)
        return;
    if (!r->target_ok) {
        fail(r, ERR_CONNECT, "redis.url is not usable; not connecting");
        return;
    }
    redisAsyncContext *ac;
    if (r->target.unix_socket)
        ac = redisAsyncConnectUnix(r->target.path);
    else
        ac = redisAsyncConnect(r->target.host, r->target.port);
    if (ac == NULL) {
        fail(r, ERR_CONNECT, "cannot create a connection (out of memory)");
        schedule_reconnect(r);
        return;
    }
    if (ac->err) {
        /* Failed before anything was registered: ours to free, no callback will run. */
        fail(r, ERR_CONNECT, "cannot connect: %s", ac->errstr);
        redisAsyncFree(ac);
        schedule_reconnect(r);
        return;
    }
    ac->data = r;
    if (redisLibeventAttach(ac, r->base) != REDIS_OK) {
        fail(r, ERR_CONNECT, "cannot attach the connection to the event loop");
        redisAsyncFree(ac);
        schedule_reconnect(r);
        return;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    r->ctx = ac;
    r->state = CONN_CONNECTING;
    r->closing = false;
    r->in_flight = 0;
    r->round_active = false;
    arm_timeout(r, r->connect_timeout_ms);
}

/* ---------------------------------------------------------------------------------------- */
/* Sentinel                                                                                  */

/* How often a connected instance asks a sentinel whether the master is still where it is
 * connected (a failover whose old master stays reachable, as a replica, shows up here). */
#define SENTINEL_CHECK_MS 2000

/* Ends the query in progress from a hiredis callback: forget the context (hiredis frees it, or
 * we asked it to) and decide what next from the event loop. */
static void sentinel_done(bw_redis_sync *r, bool ok)
{
    r->sctx = NULL;
    r->s_ok = ok;
    evtimer_del(r->s_timeout);
    event_active(r->s_next_ev, 0, 0);
}

static void on_sentinel_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    bw_redis_sync *r = privdata;
    if (r == NULL || ac != r->sctx)
        return; /* a context given up already */
    const redisReply *rep = reply;
    if (rep == NULL) {
        sentinel_done(r, false);
        return;
    }
    bool ok = false;
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
        rep->element[0]->type == REDIS_REPLY_STRING &&
        rep->element[1]->type == REDIS_REPLY_STRING && rep->element[0]->len < 60 &&
        rep->element[1]->len < 8) {
        char url[96], err[160];
        bw_redis_target t;
        bool v6 = strchr(rep->element[0]->str, ':') != NULL;
        snprintf(url, sizeof(url), "redis://%s%s%s:%s", v6 ? "[" : "", rep->element[0]->str,
                 v6 ? "]" : "", rep->element[1]->str);
        if (bw_redis_url_parse(url, &t, err, sizeof(err)) == 0) {
            ok = true;
            if (strcmp(t.host, r->target.host) != 0 || t.port != r->target.port) {
                if (r->target_ok)
                    bw_log_info(r->log, "redis: sentinel names %s:%d as master %s (was %s:%d)",
                                t.host, t.port, r->master_name, r->target.host, r->target.port);
                if (r->ctx != NULL && r->target_ok) {
                    r->failovers++;
                    drop_later(r); /* moves to the new master after the drop */
                }
                copy_str(r->target.host, sizeof(r->target.host), t.host);
                r->target.port = t.port;
            }
            r->target_ok = true;
        } else {
            fail(r, ERR_REPLY, "sentinel answered an unusable address for %s: %s", r->master_name,
                 err);
        }
    } else if (rep->type == REDIS_REPLY_NIL) {
        fail(r, ERR_REPLY, "a sentinel does not know master %s", r->master_name);
    } else {
        fail(r, ERR_REPLY, "unexpected sentinel reply for master %s%s%.200s", r->master_name,
             rep->type == REDIS_REPLY_ERROR ? ": " : "",
             rep->type == REDIS_REPLY_ERROR ? rep->str : "");
    }
    sentinel_done(r, ok);
    redisAsyncDisconnect(ac);
}

static void on_sentinel_connect(const redisAsyncContext *ac, int status)
{
    bw_redis_sync *r = ac->data;
    if (r == NULL || ac != r->sctx || status == REDIS_OK)
        return;
    fail(r, ERR_CONNECT, "cannot reach sentinel %s: %s", r->sentinels[r->s_next],
         ac->errstr[0] ? ac->errstr : "failed");
    sentinel_done(r, false); /* hiredis frees the context */
}

static void on_sentinel_disconnect(const redisAsyncContext *ac, int status)
{
    bw_redis_sync *r = ac->data;
    if (r == NULL || ac != r->sctx)
        return;
    sentinel_done(r, false);
}

/* Asks the next sentinel in turn; after every one failed, a discovery gives way to the
 * reconnection backoff (a check simply waits for the next one). */
static void sentinel_try(bw_redis_sync *r)
{
    while (r->s_tried < r->n_sentinels) {
        r->s_next = (r->s_next + 1) % r->n_sentinels;
        r->s_tried++;
        char url[128], err[160];
        bw_redis_target t;
        snprintf(url, sizeof(url), "redis://%s", r->sentinels[r->s_next]);
        if (bw_redis_url_parse(url, &t, err, sizeof(err)) < 0)
            continue;
        redisAsyncContext *ac = redisAsyncConnect(t.host, t.port);
        if (ac == NULL || ac->err) {
            if (ac != NULL)
                redisAsyncFree(ac);
            continue;
        }
        ac->data = r;
        if (redisLibeventAttach(ac, r->base) != REDIS_OK) {
            redisAsyncFree(ac);
            continue;
        }
        redisAsyncSetConnectCallback(ac, on_sentinel_connect);
        redisAsyncSetDisconnectCallback(ac, on_sentinel_disconnect);
        const char *a[] = {"SENTINEL", "get-master-addr-by-name", r->master_name};
        size_t lens[] = {8, 23, strlen(r->master_name)};
        if (redisAsyncCommandArgv(ac, on_sentinel_reply, r, 3, a, lens) != REDIS_OK) {
            redisAsyncFree(ac);
            continue;
        }
        r->sctx = ac;
        r->sentinel_queries++;
        uint64_t ms = (uint64_t)r->connect_timeout_ms + r->command_timeout_ms;
        struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
        evtimer_add(r->s_timeout, &tv);
        return;
    }
    if (!r->s_checking) {
        fail(r, ERR_CONNECT, "no sentinel answered for master %s; retrying", r->master_name);
        schedule_reconnect(r);
    }
}

static void sentinel_start(bw_redis_sync *r, bool check)
{
    if (!r->enabled || !r->sentinel || r->sctx != NULL)
        return;
    r->s_checking = check;
    r->s_tried = 0;
    sentinel_try(r);
}

/* From the event loop, after a query ended: connect to what was found, or try the next. */
static void on_sentinel_next(evutil_socket_t fd, short what, void *arg)
{
    bw_redis_sync *r = arg;
    if (!r->enabled || !r->sentinel)
        return;
    if (r->s_ok) {
        if (!r->s_checking)
            connect_now(r);
        return;
    }
    sentinel_try(r);
}

static void on_sentinel_timeout(evutil_socket_t fd, short what, void *arg)
{
    bw_redis_sync *r = arg;
    redisAsyncContext *ac = r->sctx;
    if (ac == NULL)
        return;
    fail(r, ERR_TIMEOUT, "sentinel %s did not answer in time", r->sentinels[r->s_next]);
    r->sctx = NULL;
    redisAsyncFree(ac); /* our timer: freeing here is safe; its callbacks now see a stranger */
    r->s_ok = false;
    event_active(r->s_next_ev, 0, 0);
}

static void on_sentinel_check(evutil_socket_t fd, short what, void *arg)
{
    bw_redis_sync *r = arg;
    if (r->state == CONN_READY && !r->closing)
        sentinel_start(r, true);
}

static void sentinel_drop(bw_redis_sync *r)
{
    if (r->s_timeout != NULL)
        evtimer_del(r->s_timeout);
    if (r->sctx != NULL) {
        redisAsyncContext *ac = r->sctx;
        r->sctx = NULL;
        redisAsyncFree(ac);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Breakers                                                                                  */

static const bw_upstream_conf *upstream_of_slot(const bw_redis_sync *r, uint32_t slot)
{
    for (size_t i = 0; i < r->cfg->n_upstreams; i++)
        if (r->cfg->upstreams[i].shm_slot == (int)slot)
            return &r->cfg->upstreams[i];
    return NULL;
}

static bool stamp_newer(uint64_t a_at, const char *a_by, uint64_t b_at, const char *b_by)
{
    return a_at > b_at || (a_at == b_at && strcmp(a_by, b_by) > 0);
}

static void breaker_key(const bw_redis_sync *r, const char *upstream, char *buf, size_t len)
{
    snprintf(buf, len, "%s:circuit-breaker:%s", r->prefix, upstream);
}

/* Converts a time of the breaker's clock (monotonic ms) into wall ms, and back, through the
 * clocks' offset (bw_breaker_wall_offset_ms), so that a record written back after Redis lost its
 * data carries exactly the times it had. A time ahead of now is taken as now. */
static uint64_t to_wall(uint64_t mono, uint64_t now_mono, uint64_t now_wall)
{
    if (mono == 0)
        return 0;
    if (mono > now_mono)
        return now_wall;
    int64_t w = (int64_t)mono + bw_breaker_wall_offset_ms();
    return w > 0 ? (uint64_t)w : 0;
}

static uint64_t to_mono(uint64_t wall, uint64_t now_mono, uint64_t now_wall)
{
    if (wall == 0)
        return 0;
    if (wall > now_wall)
        return now_mono;
    int64_t m = (int64_t)wall - bw_breaker_wall_offset_ms();
    if (m > (int64_t)now_mono)
        return now_mono;
    return m > 0 ? (uint64_t)m : 1;
}

static bool parse_u64(const char *s, size_t len, uint64_t *out)
{
    if (len == 0 || len > 19)
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return true;
}

typedef struct br_record {
    bool has_state;
    bw_breaker_state state;
    uint64_t opened_at, updated_at;
    uint64_t forced_at;     /* held open by an operator since (wall ms); 0 = not forced */
    uint64_t level, jitter; /* backoff of the open period; 0 when not recorded */
    char by[ID_MAX];
} br_record;

/* Reads an HGETALL-shaped reply. Returns 1 for a record, 0 for no record, -1 if malformed. */
static int parse_record(const redisReply *rep, br_record *out)
{
    memset(out, 0, sizeof(*out));
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements % 2 != 0)
        return -1;
    if (rep->elements == 0)
        return 0;
    bool have_at = false;
    for (size_t i = 0; i < rep->elements; i += 2) {
        const redisReply *k = rep->element[i], *v = rep->element[i + 1];
        if (k == NULL || v == NULL || k->type != REDIS_REPLY_STRING ||
            v->type != REDIS_REPLY_STRING)
            return -1;
        const char *name = k->str;
        if (strcmp(name, "state") == 0) {
            out->has_state = true;
            if (strcmp(v->str, "closed") == 0)
                out->state = BW_BREAKER_CLOSED;
            else if (strcmp(v->str, "open") == 0)
                out->state = BW_BREAKER_OPEN;
            else if (strcmp(v->str, "half_open") == 0)
                out->state = BW_BREAKER_HALF_OPEN;
            else
                return -1;
        } else if (strcmp(name, "opened_at_ms") == 0) {
            if (!parse_u64(v->str, v->len, &out->opened_at))
                return -1;
        } else if (strcmp(name, "updated_at_ms") == 0) {
            if (!parse_u64(v->str, v->len, &out->updated_at))
                return -1;
            have_at = true;
        } else if (strcmp(name, "backoff_level") == 0) {
            if (!parse_u64(v->str, v->len, &out->level) || out->level > 63)
                return -1;
        } else if (strcmp(name, "jitter_permille") == 0) {
            if (!parse_u64(v->str, v->len, &out->jitter) || out->jitter > 127)
                return -1;
        } else if (strcmp(name, "forced_at_ms") == 0) {
            if (!parse_u64(v->str, v->len, &out->forced_at))
                return -1;
        } else if (strcmp(name, "updated_by") == 0) {
            if (v->len == 0 || v->len >= ID_MAX)
                return -1;
            copy_str(out->by, sizeof(out->by), v->str);
        }
    }
    return out->has_state && have_at ? 1 : -1;
}

static void index_key(const bw_redis_sync *r, char *buf, size_t len)
{
    snprintf(buf, len, "%s:circuit-breaker", r->prefix);
}

static cmd *new_cmd(bw_redis_sync *r, cmd_kind kind, uint32_t idx);
static bool send_words(bw_redis_sync *r, cmd_kind kind, uint32_t idx, int argc, const char **argv);

/* Brings the index field of one upstream to the state of its record (state, or closed when
 * there is none), when this round's index read shows something else. Not while a reset or a
 * data loss is being settled: the records themselves are about to change. */
static void index_sync(bw_redis_sync *r, uint32_t slot, const bw_upstream_conf *u,
                       bw_breaker_state state)
{
    br_rec *rec = &r->br[slot];
    if (!r->index_read || r->round_lost || r->index_del_seen || rec->pending_del || rec->del_seen ||
        rec->in_index == (int8_t)state)
        return;
    char key[BW_SHM_NAME_MAX + 128], idx[160];
    breaker_key(r, u->name, key, sizeof(key));
    index_key(r, idx, sizeof(idx));
    const char *a[] = {"EVAL", index_script, "2", key, idx, u->name};
    if (send_words(r, CMD_INDEX_SET, slot, 6, a))
        rec->in_index = (int8_t)state;
}

/* Closes the local breaker as an operator's reset does, so that no record stamped before now
 * is applied again; with del, the record is deleted from Redis too (in the next round). */
static void reset_local(bw_redis_sync *r, const bw_upstream_conf *u, bool del)
{
    bw_breaker *b = bw_shm_breaker(r->shm, u->shm_slot);
    uint64_t nm = breaker_ms();
    bw_breaker_reset(b, nm, NULL);
    bw_breaker_view v;
    bw_breaker_snapshot(b, &u->breaker, nm, &v);
    br_rec *rec = &r->br[u->shm_slot];
    rec->gen = v.generation;
    rec->dirty = false;
    rec->republish = false;
    rec->applied_at = wall_ms();
    rec->applied_by[0] = '\0';
    if (del)
        rec->pending_del = true;
}

/* A record this instance knew is gone while the epoch stayed: an operator's DEL, taken as a
 * fleet-wide reset of that breaker. */
static void apply_deleted(bw_redis_sync *r, const bw_upstream_conf *u)
{
    bw_breaker *b = bw_shm_breaker(r->shm, u->shm_slot);
    uint64_t nm = breaker_ms();
    bw_breaker_view v;
    bw_breaker_snapshot(b, &u->breaker, nm, &v);
    if (v.state != BW_BREAKER_CLOSED) {
        bw_breaker_reset(b, nm, NULL);
        bw_log_info(r->log, "upstream %s: breaker reset (its Redis record was deleted)", u->name);
    }
    bw_breaker_snapshot(b, &u->breaker, nm, &v);
    br_rec *rec = &r->br[u->shm_slot];
    rec->gen = v.generation;
    rec->dirty = false;
    rec->republish = false;
    rec->applied_at = 0;
    rec->applied_by[0] = '\0';
}

/* Redis lost its data (restart without persistence, FLUSHALL, failover to an empty replica):
 * nothing missing is a reset. Each breaker's last known record is written back as it was (same
 * stamp and author, so every instance writes the same thing and nobody re-applies it); local
 * transitions not yet written go as usual; rate-limit flushes carry on from their
 * acknowledged totals. */
static void data_loss(bw_redis_sync *r, const char *epoch)
{
    r->data_losses++;
    r->round_lost = true;
    r->index_known = false;
    r->index_del_seen = false;
    for (uint32_t i = 0; i < r->n_br; i++) {
        br_rec *rec = &r->br[i];
        rec->del_seen = false;
        rec->known = false;
        if (rec->used && rec->applied_at != 0 && rec->applied_by[0] != '\0')
            rec->republish = true;
    }
    bw_log_warn(r->log, "redis: the fleet epoch changed (Redis lost its data); re-publishing this "
                        "instance's breaker states, open breakers stay open");
    if (epoch != NULL) {
        copy_str(r->epoch, sizeof(r->epoch), epoch);
        r->epoch_known = true;
    } else {
        r->epoch_known = false;
    }
}

static bool reply_is_epoch(const redisReply *rep)
{
    return rep->type == REDIS_REPLY_STRING && rep->len > 0 && rep->len < 40;
}

static void epoch_head_reply(bw_redis_sync *r, const redisReply *rep)
{
    if (!reply_is_epoch(rep)) {
        if (rep->type != REDIS_REPLY_NIL) {
            r->round_failed = true;
            fail(r, ERR_REPLY, "%s:epoch is not a short string; breaker resets are not applied",
                 r->prefix);
            r->round_lost = true; /* nothing can be told apart this round */
        } else if (r->epoch_known) {
            data_loss(r, NULL);
        } else {
            r->round_lost = true;
        }
        return;
    }
    if (!r->epoch_known) {
        copy_str(r->epoch, sizeof(r->epoch), rep->str);
        r->epoch_known = true;
    } else if (strcmp(r->epoch, rep->str) != 0) {
        data_loss(r, rep->str);
    }
}

/* The round's closing epoch read: when it still shows the epoch the round began with, records
 * found missing were deleted by an operator, and so was the index. */
static void epoch_tail_reply(bw_redis_sync *r, const redisReply *rep)
{
    bool same =
        !r->round_lost && r->epoch_known && reply_is_epoch(rep) && strcmp(r->epoch, rep->str) == 0;
    if (!same && !r->round_lost) {
        if (reply_is_epoch(rep) || rep->type == REDIS_REPLY_NIL)
            data_loss(r, reply_is_epoch(rep) ? rep->str : NULL);
        else
            r->round_lost = true;
    }
    if (same && r->index_del_seen) {
        r->fleet_resets++;
        bw_log_info(r->log, "redis: every breaker reset (%s:circuit-breaker was deleted)",
                    r->prefix);
        for (size_t i = 0; i < r->cfg->n_upstreams; i++) {
            const bw_upstream_conf *u = &r->cfg->upstreams[i];
            if (u->shm_slot >= 0 && (uint32_t)u->shm_slot < r->n_br)
                reset_local(r, u, true);
        }
    }
    for (size_t i = 0; i < r->cfg->n_upstreams; i++) {
        const bw_upstream_conf *u = &r->cfg->upstreams[i];
        if (u->shm_slot < 0 || (uint32_t)u->shm_slot >= r->n_br)
            continue;
        br_rec *rec = &r->br[u->shm_slot];
        if (same && rec->del_seen && !r->index_del_seen)
            apply_deleted(r, u);
        rec->del_seen = false;
    }
    r->index_del_seen = false;
}

static int state_of_name(const char *s, bw_breaker_state *out)
{
    if (strcmp(s, "closed") == 0)
        *out = BW_BREAKER_CLOSED;
    else if (strcmp(s, "open") == 0)
        *out = BW_BREAKER_OPEN;
    else if (strcmp(s, "half_open") == 0)
        *out = BW_BREAKER_HALF_OPEN;
    else
        return -1;
    return 0;
}

/* The index read: which state it holds for each of our upstreams (the order of the
 * configuration), and whether it vanished. */
static void index_reply(bw_redis_sync *r, const redisReply *rep)
{
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 1 + r->cfg->n_upstreams ||
        rep->element[0]->type != REDIS_REPLY_INTEGER) {
        r->round_failed = true;
        fail(r, ERR_REPLY, "unexpected reply reading %s:circuit-breaker", r->prefix);
        return;
    }
    for (uint32_t i = 0; i < r->n_br; i++)
        r->br[i].in_index = -1;
    for (size_t i = 0; i < r->cfg->n_upstreams; i++) {
        const redisReply *v = rep->element[i + 1];
        int slot = r->cfg->upstreams[i].shm_slot;
        bw_breaker_state st;
        if (v->type != REDIS_REPLY_STRING || state_of_name(v->str, &st) < 0)
            continue; /* missing, or a value to be rewritten */
        if (slot >= 0 && (uint32_t)slot < r->n_br)
            r->br[slot].in_index = (int8_t)st;
    }
    bool exists = rep->element[0]->integer == 1;
    if (!exists && r->index_known && !r->round_lost)
        r->index_del_seen = true;
    r->index_known = exists;
    r->index_read = true;
}

static void send_index_read(bw_redis_sync *r)
{
    size_t n = r->cfg->n_upstreams;
    const char **a = calloc(4 + n, sizeof(*a));
    size_t *lens = calloc(4 + n, sizeof(*lens));
    cmd *c = new_cmd(r, CMD_INDEX, 0);
    char ikey[160];
    index_key(r, ikey, sizeof(ikey));
    if (a != NULL && lens != NULL && c != NULL) {
        a[0] = "EVAL";
        a[1] = index_read_script;
        a[2] = "1";
        a[3] = ikey;
        for (size_t i = 0; i < n; i++)
            a[4 + i] = r->cfg->upstreams[i].name;
        for (size_t i = 0; i < 4 + n; i++)
            lens[i] = strlen(a[i]);
        send_argv(r, c, (int)(4 + n), a, lens);
    } else if (c != NULL) {
        cmd_free(c);
    }
    free(a);
    free(lens);
}

/* How much later than the fleet's open period this instance's own starts, when it follows a
 * record: 2 to 4 sync intervals (at most half the reset timeout), chosen at random each time,
 * so that the instance that opened probes first and the others hear of its outcome before
 * their own timers release their permits. */
static uint64_t desync_ms(const bw_redis_sync *r, const bw_upstream_conf *u)
{
    uint64_t d = (uint64_t)r->interval_ms * (2 + random_u32() % 3);
    uint64_t cap = u->breaker.reset_timeout_ms / 2;
    return d < cap ? d : cap;
}

static void breaker_reply(bw_redis_sync *r, const cmd *c, const redisReply *rep)
{
    if (c->idx >= r->n_br)
        return;
    br_rec *rec = &r->br[c->idx];
    const bw_upstream_conf *u = upstream_of_slot(r, c->idx);
    if (u == NULL || !rec->used)
        return;
    br_record h;
    int got = parse_record(rep, &h);
    if (got < 0) {
        rec->bad = rec->bad < 32 ? rec->bad + 1 : rec->bad;
        rec->bad_until_ms = mono_ms() + backoff_ms(r, rec->bad);
        fail(r, ERR_REPLY, "malformed record for upstream %s; ignored, read again later", u->name);
        return;
    }
    bw_breaker *b = bw_shm_breaker(r->shm, (int)c->idx);
    uint64_t nm = breaker_ms(), nw = wall_ms();
    bw_breaker_view v;
    rec->bad = 0;
    if (c->republish)
        rec->republish = false;
    if (got == 0) {
        /* Deleted by an operator, or lost with Redis' data: which one is decided when the
         * round's closing epoch read is in (epoch_tail_reply). */
        if (rec->known && !r->round_lost)
            rec->del_seen = true;
        rec->known = false;
        rec->forced_seen = false;
        index_sync(r, c->idx, u, BW_BREAKER_CLOSED);
        return;
    }
    rec->known = true;
    index_sync(r, c->idx, u, h.state);
    /* Maintenance: forced_at_ms holds every instance open until the record is deleted (an
     * operator reset); a record seen forced and then not is one that was deleted and written
     * again in between. */
    if (h.forced_at != 0) {
        rec->forced_seen = true;
        if (!bw_breaker_is_forced(b) && !rec->pending_force) {
            bw_breaker_force_open(b, &u->breaker, to_mono(h.forced_at, nm, nw), nm, NULL);
            bw_log_info(r->log, "upstream %s: breaker forced open, as set in the fleet", u->name);
        }
    } else if (rec->forced_seen && !rec->pending_force) {
        rec->forced_seen = false;
        if (bw_breaker_is_forced(b)) {
            bw_breaker_reset(b, nm, NULL);
            bw_log_info(r->log, "upstream %s: breaker no longer forced open (reset in the fleet)",
                        u->name);
        }
    }
    if (strcmp(h.by, r->id) == 0) {
        /* Our own write (this one or an earlier one whose reply was lost). */
        if (c->local_at != 0 && h.updated_at == c->local_at && rec->local_at == c->local_at)
            rec->dirty = false;
        if (stamp_newer(h.updated_at, h.by, rec->applied_at, rec->applied_by)) {
            rec->applied_at = h.updated_at;
            copy_str(rec->applied_by, sizeof(rec->applied_by), h.by);
        }
        return;
    }
    if (!stamp_newer(h.updated_at, h.by, rec->applied_at, rec->applied_by))
        return;
    if (rec->dirty && rec->local_at != c->local_at &&
        stamp_newer(rec->local_at, r->id, h.updated_at, h.by))
        return; /* a newer local change is on its way; it will win the next write */
    bw_breaker_transition t;
    uint64_t opened = h.state != BW_BREAKER_CLOSED ? to_mono(h.opened_at, nm, nw) : 0;
    if (bw_breaker_follow(b, &u->breaker, h.state, opened, desync_ms(r, u), (unsigned)h.level,
                          (unsigned)h.jitter, nm, &t))
        bw_log_info(r->log, "upstream %s: breaker %s, as set by instance %s (%s there)", u->name,
                    bw_breaker_state_name(t.to), h.by, bw_breaker_state_name(h.state));
    bw_breaker_snapshot(b, &u->breaker, nm, &v);
    rec->gen = v.generation;
    rec->dirty = false;
    rec->applied_at = h.updated_at;
    copy_str(rec->applied_by, sizeof(rec->applied_by), h.by);
}

/* Writes an operator's force-open as the whole record (an operator's action is the newest
 * state by definition, so it is not conditional). */
static void send_force(bw_redis_sync *r, const bw_upstream_conf *u, uint32_t slot, const char *key,
                       uint64_t nm, uint64_t nw)
{
    br_rec *rec = &r->br[slot];
    bw_breaker_view v;
    bw_breaker_snapshot(bw_shm_breaker(r->shm, u->shm_slot), &u->breaker, nm, &v);
    char opened[24], at[24], forced[24];
    snprintf(opened, sizeof(opened), "%" PRIu64, to_wall(v.opened_at_ms, nm, nw));
    snprintf(at, sizeof(at), "%" PRIu64, nw);
    snprintf(forced, sizeof(forced), "%" PRIu64, to_wall(v.forced_at_ms, nm, nw));
    const char *a[] = {"HSET",         key,    "state",      "open", "failures",      "0",
                       "opened_at_ms", opened, "updated_by", r->id,  "updated_at_ms", at,
                       "forced_at_ms", forced};
    if (!send_words(r, CMD_OPERATOR, slot, 14, a))
        return;
    rec->pending_force = false;
    rec->gen = v.generation;
    rec->dirty = false;
    rec->applied_at = nw;
    copy_str(rec->applied_by, sizeof(rec->applied_by), r->id);
}

/* Notices local transitions and sends one command per upstream. */
static void breakers_round(bw_redis_sync *r)
{
    uint64_t nm = breaker_ms(), nw = wall_ms();
    char key[BW_SHM_NAME_MAX + 128], chan[160], idx[160];
    snprintf(chan, sizeof(chan), "%s:circuit-breaker-events", r->prefix);
    index_key(r, idx, sizeof(idx));
    for (size_t i = 0; i < r->cfg->n_upstreams; i++) {
        const bw_upstream_conf *u = &r->cfg->upstreams[i];
        if (u->shm_slot < 0 || (uint32_t)u->shm_slot >= r->n_br)
            continue;
        uint32_t slot = (uint32_t)u->shm_slot;
        br_rec *rec = &r->br[slot];
        bw_breaker_view v;
        bw_breaker_snapshot(bw_shm_breaker(r->shm, u->shm_slot), &u->breaker, nm, &v);
        if (v.generation != rec->gen) {
            rec->gen = v.generation;
            rec->dirty = true;
            rec->local_at = to_wall(v.since_ms, nm, nw);
            if (rec->local_at <= rec->applied_at)
                rec->local_at = rec->applied_at + 1; /* it happened after what we applied */
        }
        breaker_key(r, u->name, key, sizeof(key));
        if (rec->bad_until_ms != 0 && mono_ms() < rec->bad_until_ms)
            continue; /* its last answers were errors: left alone for a while */
        if (rec->pending_del) {
            const char *a[] = {"DEL", key};
            send_words(r, CMD_DEL, slot, 2, a);
            continue;
        }
        if (rec->pending_force) {
            send_force(r, u, slot, key, nm, nw);
            continue;
        }
        bool republish = !rec->dirty && rec->republish;
        if (!rec->dirty && !republish) {
            const char *a[] = {"EVAL", br_read_script, "1", key};
            send_words(r, CMD_BREAKER, slot, 4, a);
            continue;
        }
        char failures[24], opened[24], at[24], lvl[8], jit[8], forced[24];
        unsigned level, jitter;
        bw_breaker_backoff(bw_shm_breaker(r->shm, u->shm_slot), &level, &jitter);
        snprintf(lvl, sizeof(lvl), "%u", level);
        snprintf(jit, sizeof(jit), "%u", jitter);
        snprintf(failures, sizeof(failures), "%" PRIu32, v.failures);
        snprintf(opened, sizeof(opened), "%" PRIu64, to_wall(v.opened_at_ms, nm, nw));
        snprintf(at, sizeof(at), "%" PRIu64, republish ? rec->applied_at : rec->local_at);
        snprintf(forced, sizeof(forced), "%" PRIu64,
                 v.forced ? to_wall(v.forced_at_ms, nm, nw) : 0);
        const char *a[] = {"EVALSHA", r->sha_br, "2",
                           key,       idx,       bw_breaker_state_name(v.state),
                           failures,  opened,    republish ? rec->applied_by : r->id,
                           at,        chan,      u->name,
                           lvl,       jit,       forced};
        cmd *c = new_cmd(r, CMD_BREAKER, slot);
        if (c == NULL)
            continue;
        c->local_at = republish ? 0 : rec->local_at;
        c->republish = republish;
        size_t lens[15];
        for (int k = 0; k < 15; k++)
            lens[k] = strlen(a[k]);
        send_argv(r, c, 15, a, lens);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Rate limits                                                                               */

static const policy_ent *policy_at(const bw_redis_sync *r, uint32_t id)
{
    return id < r->n_pol && r->pol[id].used ? &r->pol[id] : NULL;
}

/* A record whose slot went to another key while tokens were still undelivered keeps
 * delivering them from the orphan list. */
static void retire(bw_redis_sync *r, rl_rec *rec)
{
    if (rec->tag != 0 && rec->cum > rec->acked) {
        if (r->n_orphans == r->cap_orphans && r->cap_orphans < r->max_orphans) {
            uint32_t cap = r->cap_orphans ? r->cap_orphans * 2 : 64;
            if (cap > r->max_orphans)
                cap = r->max_orphans;
            rl_rec *o = realloc(r->orphans, (size_t)cap * sizeof(*o));
            if (o != NULL) {
                r->orphans = o;
                r->cap_orphans = cap;
            }
        }
        uint32_t at = r->n_orphans;
        if (at == r->cap_orphans) {
            uint32_t oldest = 0;
            for (uint32_t i = 1; i < r->n_orphans; i++)
                if (r->orphans[i].inc < r->orphans[oldest].inc)
                    oldest = i;
            if (r->n_orphans == 0) {
                r->orphan_tokens_lost += rec->cum - rec->acked;
                if (rl_table(r) != NULL)
                    bw_ratelimit_fleet_count_lost(rl_table(r), rec->cum - rec->acked);
                memset(rec, 0, sizeof(*rec));
                return;
            }
            uint64_t lost = r->orphans[oldest].cum - r->orphans[oldest].acked;
            r->orphan_tokens_lost += lost;
            if (rl_table(r) != NULL)
                bw_ratelimit_fleet_count_lost(rl_table(r), lost);
            fail(r, ERR_OVERLOAD,
                 "too many undelivered rate-limit keys; %" PRIu64 " tokens of one given up", lost);
            at = oldest;
        } else {
            r->n_orphans++;
        }
        r->orphans[at] = *rec;
    }
    memset(rec, 0, sizeof(*rec));
}

/* Drops delivered orphans. Only between rounds: replies find orphans by index. */
static void orphans_compact(bw_redis_sync *r)
{
    uint32_t o = 0;
    for (uint32_t i = 0; i < r->n_orphans; i++)
        if (r->orphans[i].tag != 0)
            r->orphans[o++] = r->orphans[i];
    r->n_orphans = o;
}

/* Moves what the workers took from slot i's pending count into the master's record (giving a
 * slot that changed hands a fresh record, its predecessor's undelivered tokens going to the
 * orphan list). Runs every round, and also while Redis is away, so that pending counts never
 * keep a slot from being reclaimed and nothing waits in shared memory. */
static void collect_slot(bw_redis_sync *r, bw_ratelimit_table *t, uint32_t i, uint64_t nm)
{
    rl_rec *rec = &r->rl[i];
    bw_ratelimit_fleet_entry fe;
    if (!bw_ratelimit_fleet_read(t, i, &fe) || policy_at(r, fe.policy_id) == NULL)
        return;
    if (fe.tag != rec->tag) {
        retire(r, rec);
        rec->tag = fe.tag;
        rec->inc = ++r->next_inc;
        rec->policy_id = fe.policy_id;
        copy_str(rec->key, sizeof(rec->key), fe.key);
    }
    uint32_t got = bw_ratelimit_fleet_collect(t, i, rec->tag);
    rec->cum += got;
    if (got > 0)
        rec->active_ms = nm;
    if (rec->cum != rec->acked)
        r->rl_busy[i] = 1;
}

/* While Redis is away: collect everything, and recompute the pending figure. */
static void ratelimits_collect_only(bw_redis_sync *r)
{
    bw_ratelimit_table *t = rl_table(r);
    uint64_t p = 0, nm = mono_ms();
    if (t != NULL && r->rl != NULL) {
        orphans_compact(r);
        for (uint32_t i = 0; i < r->n_rl; i++) {
            if (bw_ratelimit_fleet_pending(t, i) != 0) {
                collect_slot(r, t, i, nm);
                p += bw_ratelimit_fleet_pending(t, i);
            }
            if (r->rl_busy[i])
                p += r->rl[i].cum - r->rl[i].acked;
        }
    }
    for (uint32_t i = 0; i < r->n_orphans; i++)
        p += r->orphans[i].cum - r->orphans[i].acked;
    r->pending = p;
}

/* Keys per rate-limit script call: one call settles many keys, which keeps the per-command cost
 * (formatting, a round trip through hiredis, script dispatch in Redis) off every key. */
#define RL_BATCH_MAX 64

typedef struct rl_batch {
    uint32_t n;
    rl_item items[RL_BATCH_MAX];
    char keys[RL_BATCH_MAX][512];
    char nums[RL_BATCH_MAX][RL_ARGS][40];
} rl_batch;

/* Sends the batch as one EVALSHA; returns false when nothing could be sent. */
static bool batch_send(bw_redis_sync *r, rl_batch *b)
{
    if (b->n == 0)
        return false;
    enum { ARGC_MAX = 3 + RL_BATCH_MAX + 1 + RL_ARGS * RL_BATCH_MAX + 1 };
    const char *a[ARGC_MAX];
    size_t lens[ARGC_MAX];
    char nkeys[16], linger[16];
    snprintf(nkeys, sizeof(nkeys), "%u", b->n);
    snprintf(linger, sizeof(linger), "%d", RL_LINGER_MS);
    int argc = 0;
    a[argc++] = "EVALSHA";
    a[argc++] = r->sha_rl;
    a[argc++] = nkeys;
    for (uint32_t k = 0; k < b->n; k++)
        a[argc++] = b->keys[k];
    a[argc++] = r->id;
    for (uint32_t k = 0; k < b->n; k++)
        for (int f = 0; f < RL_ARGS; f++)
            a[argc++] = b->nums[k][f];
    a[argc++] = linger;
    for (int k = 0; k < argc; k++)
        lens[k] = strlen(a[k]);
    cmd *c = new_cmd(r, CMD_RL, 0);
    if (c != NULL)
        c->items = malloc(b->n * sizeof(*c->items));
    if (c == NULL || c->items == NULL) {
        if (c != NULL)
            cmd_free(c);
        b->n = 0;
        return false;
    }
    memcpy(c->items, b->items, b->n * sizeof(*c->items));
    c->n_items = b->n;
    b->n = 0;
    return send_argv(r, c, argc, a, lens);
}

/* Adds one key's flush to the batch. Returns true when a full batch was sent (one command). */
static bool batch_add(bw_redis_sync *r, rl_batch *b, rl_rec *rec, uint32_t idx, bool orphan)
{
    uint64_t nm = mono_ms();
    /* What earlier sends (replies lost) may have delivered already, and since when. */
    uint64_t unsure = rec->sent > rec->acked ? rec->sent : rec->acked;
    uint64_t first_ms = rec->sent > rec->acked && rec->sent_ms <= nm ? rec->sent_ms : nm;
    if (rec->cum > rec->acked) {
        if (rec->sent <= rec->acked)
            rec->sent_ms = nm; /* this is the first send of what is now unacknowledged */
        if (rec->cum > rec->sent)
            rec->sent = rec->cum;
    }
    uint64_t active = rec->active_ms != 0 && rec->active_ms <= nm ? rec->active_ms : nm;
    const policy_ent *pe = policy_at(r, rec->policy_id);
    if (pe == NULL) {
        /* The policy went away with a reload: nothing is limited by it any more. */
        memset(rec, 0, sizeof(*rec));
        return false;
    }
    uint32_t k = b->n++;
    snprintf(b->keys[k], sizeof(b->keys[k]), "%s:rate-limit:%s:%s", r->prefix, pe->name, rec->key);
    uint64_t iv_ns = pe->params.interval_ns;
    uint32_t capn = pe->params.capacity;
    /* The fleet's lead is bounded: by one full window per live instance, enough to carry a
     * burst that every instance admitted before hearing of the others, and no more, so tokens
     * delivered late (after a partition) cannot lock a client out for long. */
    uint32_t live = r->live > 0 ? r->live : 1;
    snprintf(b->nums[k][0], sizeof(b->nums[k][0]), "%" PRIu64, rec->inc);
    snprintf(b->nums[k][1], sizeof(b->nums[k][1]), "%" PRIu64, rec->cum);
    snprintf(b->nums[k][2], sizeof(b->nums[k][2]), "%" PRIu64, rec->acked);
    snprintf(b->nums[k][3], sizeof(b->nums[k][3]), "%.3f", (double)iv_ns / 1000.0);
    snprintf(b->nums[k][4], sizeof(b->nums[k][4]), "%.0f", (double)iv_ns / 1000.0 * capn * live);
    snprintf(b->nums[k][5], sizeof(b->nums[k][5]), "%" PRIu64, unsure);
    snprintf(b->nums[k][6], sizeof(b->nums[k][6]), "%" PRIu64, (nm - first_ms) * 1000);
    snprintf(b->nums[k][7], sizeof(b->nums[k][7]), "%" PRIu64, (nm - active) * 1000);
    b->items[k] = (rl_item){.idx = idx, .orphan = orphan, .inc = rec->inc, .cum = rec->cum};
    if (b->n < RL_BATCH_MAX)
        return false;
    return batch_send(r, b);
}

/* Collects what the workers took and sends every undelivered amount, within budget commands,
 * plus a bounded refresh (RL_REFRESH_PER_ROUND) of keys used here recently but not since the
 * last round. Also recomputes the pending total for the stats. */
static void ratelimits_round(bw_redis_sync *r, uint32_t budget)
{
    bw_ratelimit_table *t = rl_table(r);
    uint64_t pending = 0;
    rl_batch *b = r->batch;
    if (b == NULL) {
        b = r->batch = calloc(1, sizeof(*b));
        if (b == NULL) {
            fail(r, ERR_OVERLOAD, "out of memory for a rate-limit batch");
            return;
        }
    }
    b->n = 0;
    orphans_compact(r);
    if (t != NULL && r->rl != NULL) {
        uint32_t n = r->n_rl, start = r->cursor;
        uint64_t nm = mono_ms();
        uint64_t pull_ms = (uint64_t)r->interval_ms * PULL_INTERVALS;
        if (pull_ms < PULL_MIN_MS)
            pull_ms = PULL_MIN_MS;
        uint32_t refresh = RL_REFRESH_PER_ROUND, refresh_from = r->refresh_from;
        bool refresh_wrapped = false, stopped = false;
        for (uint32_t k = 0; k < n; k++) {
            uint32_t i = start + k < n ? start + k : start + k - n;
            uint32_t p = bw_ratelimit_fleet_pending(t, i);
            if (p == 0 && !r->rl_busy[i])
                continue;
            rl_rec *rec = &r->rl[i];
            if (p == 0 && rec->cum == rec->acked &&
                (rec->active_ms == 0 || nm - rec->active_ms >= pull_ms)) {
                r->rl_busy[i] = 0;
                continue;
            }
            if (stopped || budget == 0) {
                if (!stopped)
                    r->cursor = i; /* the next round starts here, so every key gets its turn */
                stopped = true;
                pending += p + (rec->cum - rec->acked);
                continue;
            }
            if (p > 0) {
                collect_slot(r, t, i, nm);
                pending += bw_ratelimit_fleet_pending(t, i);
            }
            if (rec->bad_until_ms != 0 && nm < rec->bad_until_ms) {
                pending += rec->cum - rec->acked;
                continue; /* its key held something else: left alone for a while */
            }
            bool owed = rec->tag != 0 && rec->cum > rec->acked;
            bool pull = rec->tag != 0 && rec->active_ms != 0 && nm - rec->active_ms < pull_ms;
            r->rl_busy[i] = rec->tag != 0 && (rec->cum != rec->acked || pull);
            if (!owed && !pull)
                continue;
            /* A key that owes nothing is only a refresh: a bounded number per round, in turn. */
            if (!owed) {
                if (refresh == 0 || i < refresh_from)
                    continue;
                if (--refresh == 0) {
                    r->refresh_from = i + 1;
                    refresh_wrapped = true;
                }
            }
            pending += rec->cum - rec->acked;
            if (batch_add(r, b, rec, i, false))
                budget--;
        }
        if (!stopped)
            r->cursor = 0;
        if (!refresh_wrapped)
            r->refresh_from = 0;
    }
    for (uint32_t i = 0; i < r->n_orphans; i++) {
        rl_rec *o = &r->orphans[i];
        if (o->tag == 0)
            continue;
        pending += o->cum - o->acked;
        if (o->bad_until_ms != 0 && mono_ms() < o->bad_until_ms)
            continue;
        if (budget > 0 && batch_add(r, b, o, i, true))
            budget--;
    }
    /* Keys already placed in the batch go now, even past the budget: one more command is
     * harmless, and leaving them would delay them by a whole cycle of the table. */
    (void)batch_send(r, b);
    b->n = 0;
    r->pending = pending;
}

/* Settles one key of a flush with the fleet's answer for it. */
static void ratelimit_apply(bw_redis_sync *r, const rl_item *it, long long value)
{
    rl_rec *rec = it->orphan ? (it->idx < r->n_orphans ? &r->orphans[it->idx] : NULL)
                             : (it->idx < r->n_rl ? &r->rl[it->idx] : NULL);
    if (rec == NULL || rec->tag == 0 || rec->inc != it->inc)
        return;
    if (it->cum > rec->acked) {
        r->pending -= r->pending >= it->cum - rec->acked ? it->cum - rec->acked : r->pending;
        rec->acked = it->cum;
    }
    rec->bad = 0;
    if (it->orphan) {
        if (rec->acked >= rec->cum)
            memset(rec, 0, sizeof(*rec));
        return;
    }
    bw_ratelimit_table *t = rl_table(r);
    const policy_ent *pe = policy_at(r, rec->policy_id);
    if (t == NULL || pe == NULL)
        return;
    uint64_t fleet = (uint64_t)value;
    if (pe->params.interval_ns != 0)
        fleet = fleet > UINT64_MAX / 1000 ? UINT64_MAX : fleet * 1000;
    bw_ratelimit_fleet_absorb(t, it->idx, rec->tag, &pe->params, mono_ns(), fleet);
}

static void ratelimit_bad(bw_redis_sync *r, const rl_item *it)
{
    rl_rec *rec = it->orphan ? (it->idx < r->n_orphans ? &r->orphans[it->idx] : NULL)
                             : (it->idx < r->n_rl ? &r->rl[it->idx] : NULL);
    if (rec == NULL || rec->tag == 0 || rec->inc != it->inc)
        return;
    rec->bad = rec->bad < 32 ? rec->bad + 1 : rec->bad;
    rec->bad_until_ms = mono_ms() + backoff_ms(r, rec->bad);
}

static void ratelimit_reply(bw_redis_sync *r, const cmd *c, const redisReply *rep)
{
    bool ok = c->n_items == 1 ? rep->type == REDIS_REPLY_INTEGER
                              : rep->type == REDIS_REPLY_ARRAY && rep->elements == c->n_items;
    for (size_t k = 0; ok && c->n_items > 1 && k < rep->elements; k++)
        ok = rep->element[k]->type == REDIS_REPLY_INTEGER && rep->element[k]->integer >= -1;
    if (!ok || (c->n_items == 1 && rep->integer < -1)) {
        r->round_failed = true;
        fail(r, ERR_REPLY, "unexpected reply to the rate-limit script");
        return;
    }
    for (uint32_t k = 0; k < c->n_items; k++) {
        long long v = c->n_items == 1 ? rep->integer : rep->element[k]->integer;
        if (v < 0) {
            /* Something else lives under our key: its tokens stay here and are retried later;
             * the bucket runs on local state meanwhile. */
            ratelimit_bad(r, &c->items[k]);
            r->wrong_type++;
            fail(r, ERR_REPLY,
                 "a rate-limit key holds a value that is not a hash; its tokens "
                 "are kept and retried");
            continue;
        }
        ratelimit_apply(r, &c->items[k], v);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Replies and rounds                                                                        */

static void round_done(bw_redis_sync *r)
{
    r->round_active = false;
    evtimer_del(r->timeout);
    if (!r->round_failed) {
        r->rounds++;
        r->last_sync_wall_ms = wall_ms();
        r->err_streak = 0;
        r->attempt = 0; /* the reconnection backoff restarts only after a round that worked */
    } else if (r->ctx != NULL && !r->closing) {
        /* Redis answered, with errors: back off before the next round. */
        r->err_streak = r->err_streak < 32 ? r->err_streak + 1 : r->err_streak;
        r->hold_until_ms = mono_ms() + backoff_ms(r, r->err_streak + 1);
    }
    publish(r);
}

static void handle_reply(bw_redis_sync *r, const cmd *c, const redisReply *rep)
{
    if (rep->type == REDIS_REPLY_ERROR) {
        if (strncmp(rep->str, "NOSCRIPT", 8) == 0)
            r->scripts_needed = true;
        if (c->kind == CMD_HANDSHAKE || c->kind == CMD_SCRIPT_RL || c->kind == CMD_SCRIPT_BR) {
            r->handshake_failed = true;
            fail(r, ERR_AUTH, "connection setup refused: %s", rep->str);
            drop_later(r);
            return;
        }
        if (strncmp(rep->str, "READONLY", 8) == 0 || strncmp(rep->str, "MASTERDOWN", 10) == 0) {
            /* A replica (a failover happened, or the URL names one): find the master again. */
            fail(r, ERR_REPLY, "%.200s; reconnecting", rep->str);
            r->round_failed = true;
            drop_later(r);
            return;
        }
        if (c->kind == CMD_BREAKER && c->idx < r->n_br) {
            /* That record alone is unusable (a key of another type, say): ask again later. */
            br_rec *rec = &r->br[c->idx];
            rec->bad = rec->bad < 32 ? rec->bad + 1 : rec->bad;
            rec->bad_until_ms = mono_ms() + backoff_ms(r, rec->bad);
            fail(r, ERR_REPLY, "reading the breaker record of %s: %.200s", rec->name, rep->str);
            return;
        }
        r->round_failed = true;
        if (c->kind == CMD_EPOCH_HEAD || c->kind == CMD_EPOCH_TAIL)
            r->round_lost = true; /* no verdict on missing records this round */
        fail(r, ERR_REPLY, "error reply: %.200s", rep->str);
        return;
    }
    switch (c->kind) {
    case CMD_HANDSHAKE:
        break;
    case CMD_SCRIPT_RL:
    case CMD_SCRIPT_BR:
        if (rep->type != REDIS_REPLY_STRING || rep->len != 40) {
            r->handshake_failed = true;
            fail(r, ERR_REPLY, "unexpected reply to SCRIPT LOAD");
            drop_later(r);
            return;
        }
        memcpy(c->kind == CMD_SCRIPT_RL ? r->sha_rl : r->sha_br, rep->str, 40);
        break;
    case CMD_BREAKER:
        breaker_reply(r, c, rep);
        break;
    case CMD_DEL:
        if (rep->type == REDIS_REPLY_INTEGER && c->idx < r->n_br) {
            r->br[c->idx].pending_del = false;
            r->br[c->idx].known = false;
        }
        break;
    case CMD_HEARTBEAT:
    case CMD_OPERATOR:
        break;
    case CMD_LIVE:
        if (rep->type == REDIS_REPLY_INTEGER && rep->integer >= 0 && rep->integer < (1 << 20))
            r->live = (uint32_t)rep->integer;
        break;
    case CMD_RL:
        ratelimit_reply(r, c, rep);
        break;
    case CMD_EPOCH_SET:
    case CMD_INDEX_SET:
        break;
    case CMD_ROLE:
        if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 1 ||
            rep->element[0]->type != REDIS_REPLY_STRING ||
            strcmp(rep->element[0]->str, "master") != 0) {
            r->handshake_failed = true;
            fail(r, ERR_CONNECT,
                 "%s:%d is not the master (the sentinels' view is stale); "
                 "asking again",
                 r->target.host, r->target.port);
            drop_later(r);
        }
        break;
    case CMD_EPOCH_HEAD:
        epoch_head_reply(r, rep);
        break;
    case CMD_EPOCH_TAIL:
        epoch_tail_reply(r, rep);
        break;
    case CMD_INDEX:
        index_reply(r, rep);
        break;
    }
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    cmd *c = privdata;
    bw_redis_sync *r = c->r;
    if (r->in_flight > 0)
        r->in_flight--;
    if (reply == NULL) {
        /* The connection is going away; whatever this command carried is retried later. */
        r->round_failed = true;
        if (c->kind == CMD_DEL && c->idx < r->n_br)
            r->br[c->idx].pending_del = true;
        cmd_free(c);
        return;
    }
    if (r->ctx == ac && !r->closing)
        handle_reply(r, c, reply);
    cmd_free(c);
    if (r->ctx != ac || r->closing || r->in_flight > 0)
        return;
    if (r->state == CONN_HANDSHAKE) {
        evtimer_del(r->timeout);
        if (r->handshake_failed || r->sha_rl[0] == '\0' || r->sha_br[0] == '\0') {
            drop_later(r);
            return;
        }
        r->state = CONN_READY;
        r->connects++;
        if (r->target.unix_socket)
            bw_log_info(r->log, "redis: connected to unix:%s", r->target.path);
        else
            bw_log_info(r->log, "redis: connected to %s:%d", r->target.host, r->target.port);
        set_up(r, true);
    } else if (r->round_active) {
        round_done(r);
    } else {
        evtimer_del(r->timeout);
    }
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    bw_redis_sync *r = arg;
    if (r->state != CONN_READY || r->ctx == NULL || r->closing) {
        /* Redis is away: take the tokens out of shared memory all the same (so their slots can
         * be reclaimed and nothing is lost to eviction), and keep the pending figure current. */
        ratelimits_collect_only(r);
        publish(r);
        return;
    }
    if (r->round_active) {
        r->skipped++; /* the previous round is still out; the command timer watches it */
        return;
    }
    if (r->hold_until_ms != 0 && mono_ms() < r->hold_until_ms) {
        ratelimits_collect_only(r); /* backing off after error replies: keep collecting */
        return;
    }
    uint32_t fixed = 5 + 2 * (uint32_t)r->cfg->n_upstreams + (r->scripts_needed ? 2u : 0u);
    if (r->in_flight + fixed > BW_REDIS_MAX_IN_FLIGHT) {
        r->skipped++;
        fail(r, ERR_OVERLOAD, "%" PRIu32 " commands in flight; round skipped", r->in_flight);
        return;
    }
    r->round_active = true;
    r->round_failed = false;
    r->round_lost = false;
    r->index_read = false;
    r->index_del_seen = false;
    for (uint32_t i = 0; i < r->n_br; i++) {
        r->br[i].del_seen = false;
        r->br[i].in_index = -1;
    }
    if (r->scripts_needed)
        send_script_loads(r);

    /* The epoch first (created when missing), so that this round's reads can be judged. */
    char ekey[160], eval[40];
    snprintf(ekey, sizeof(ekey), "%s:epoch", r->prefix);
    snprintf(eval, sizeof(eval), "%08" PRIx32 "%08" PRIx32, random_u32(), random_u32());
    const char *es[] = {"SET", ekey, eval, "NX"};
    send_words(r, CMD_EPOCH_SET, 0, 4, es);
    const char *eg[] = {"EVAL", epoch_read_script, "1", ekey};
    send_words(r, CMD_EPOCH_HEAD, 0, 4, eg);

    char key[160], stale[24];
    snprintf(key, sizeof(key), "%s:instances", r->prefix);
    uint64_t stale_ms = (uint64_t)r->interval_ms * STALE_INTERVALS;
    if (stale_ms < STALE_MIN_MS)
        stale_ms = STALE_MIN_MS;
    snprintf(stale, sizeof(stale), "%" PRIu64, stale_ms);
    const char *hb[] = {"EVAL", hb_script, "1", key, r->id, stale};
    send_words(r, CMD_LIVE, 0, 6, hb);

    send_index_read(r);
    breakers_round(r);
    send_words(r, CMD_EPOCH_TAIL, 0, 4, eg);
    uint32_t used = r->in_flight;
    ratelimits_round(r, used < BW_REDIS_MAX_IN_FLIGHT ? BW_REDIS_MAX_IN_FLIGHT - used : 0);
    if (r->in_flight == 0)
        round_done(r); /* everything was refused: the connection is going away */
}

/* ---------------------------------------------------------------------------------------- */
/* Configuration and lifecycle                                                               */

static bool str_differs(const char *a, const char *b)
{
    if (a == NULL || b == NULL)
        return a != b;
    return strcmp(a, b) != 0;
}

/* What identifies where to connect: the URL, or the sentinels and master name, and the
 * password. A change of it reconnects. */
static char *conn_signature(const bw_redis_conf *rc)
{
    size_t len = 64 + (rc->url ? strlen(rc->url) : 0) +
                 (rc->master_name ? strlen(rc->master_name) : 0) +
                 (rc->password ? strlen(rc->password) : 0);
    for (size_t i = 0; i < rc->n_sentinels; i++)
        len += strlen(rc->sentinels[i]) + 1;
    char *sig = malloc(len);
    if (sig == NULL)
        return NULL;
    int n = snprintf(sig, len, "%s|%s|%s|", rc->url ? rc->url : "",
                     rc->master_name ? rc->master_name : "", rc->password ? rc->password : "");
    for (size_t i = 0; i < rc->n_sentinels && n > 0 && (size_t)n < len; i++)
        n += snprintf(sig + n, len - (size_t)n, "%s,", rc->sentinels[i]);
    return sig;
}

static void sentinel_forget(bw_redis_sync *r)
{
    sentinel_drop(r);
    for (uint32_t i = 0; i < r->n_sentinels; i++)
        free(r->sentinels[i]);
    free(r->sentinels);
    free(r->master_name);
    r->sentinels = NULL;
    r->master_name = NULL;
    r->n_sentinels = 0;
    r->sentinel = false;
}

static void apply_config(bw_redis_sync *r, const bw_config *cfg)
{
    const bw_redis_conf *rc = &cfg->redis;
    bool was = r->enabled;
    char *sig = conn_signature(rc);
    bool conn_changed = was != rc->enabled || sig == NULL || str_differs(r->url, sig);
    bool prefix_changed = str_differs(r->prefix, rc->key_prefix);
    r->cfg = cfg;
    r->enabled = rc->enabled && (rc->url != NULL || rc->n_sentinels > 0);
    r->connect_timeout_ms = rc->connect_timeout_ms ? rc->connect_timeout_ms : 1000;
    r->command_timeout_ms = rc->command_timeout_ms ? rc->command_timeout_ms : 1000;
    if (conn_changed) {
        free(r->url);
        r->url = sig;
        sig = NULL;
        sentinel_forget(r);
        char err[160];
        if (rc->url != NULL) {
            r->target_ok = bw_redis_url_parse(rc->url, &r->target, err, sizeof(err)) == 0;
            if (r->enabled && !r->target_ok)
                fail(r, ERR_CONNECT, "redis.url: %s", err);
            if (r->target_ok && r->target.password[0] == '\0' && rc->password != NULL)
                copy_str(r->target.password, sizeof(r->target.password), rc->password);
        } else if (rc->n_sentinels > 0 && rc->master_name != NULL) {
            memset(&r->target, 0, sizeof(r->target));
            r->target_ok = false; /* until a sentinel names the master */
            if (rc->password != NULL)
                copy_str(r->target.password, sizeof(r->target.password), rc->password);
            r->sentinels = calloc(rc->n_sentinels, sizeof(*r->sentinels));
            r->master_name = strdup(rc->master_name);
            if (r->sentinels != NULL && r->master_name != NULL) {
                for (size_t i = 0; i < rc->n_sentinels; i++)
                    if ((r->sentinels[r->n_sentinels] = strdup(rc->sentinels[i])) != NULL)
                        r->n_sentinels++;
                r->sentinel = r->n_sentinels > 0;
                r->s_next = r->n_sentinels - 1; /* the first query goes to the first one */
            }
            if (!r->sentinel)
                fail(r, ERR_CONNECT, "out of memory for the sentinel list");
        } else {
            r->target_ok = false;
        }
    }
    free(sig);
    if (prefix_changed) {
        free(r->prefix);
        r->prefix = strdup(rc->key_prefix != NULL ? rc->key_prefix : "breakwater");
        for (uint32_t i = 0; i < r->n_br; i++)
            r->br[i].known = false; /* a new keyspace: nothing seen there yet */
        r->epoch_known = false;
        r->index_known = false;
    }

    /* Upstreams: a slot that now carries another name starts from its current breaker. */
    uint64_t nm = breaker_ms();
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const bw_upstream_conf *u = &cfg->upstreams[i];
        if (u->shm_slot < 0 || (uint32_t)u->shm_slot >= r->n_br)
            continue;
        br_rec *rec = &r->br[u->shm_slot];
        if (rec->used && strcmp(rec->name, u->name) == 0)
            continue;
        memset(rec, 0, sizeof(*rec));
        rec->used = true;
        copy_str(rec->name, sizeof(rec->name), u->name);
        bw_breaker_view v;
        bw_breaker_snapshot(bw_shm_breaker(r->shm, u->shm_slot), &u->breaker, nm, &v);
        rec->gen = v.generation;
    }
    /* Policies, by slot (the policy id in the table). */
    for (uint32_t i = 0; i < r->n_pol; i++)
        r->pol[i].used = false;
    for (size_t i = 0; i < cfg->n_rate_limits; i++) {
        const bw_ratelimit_conf *pc = &cfg->rate_limits[i];
        if (pc->shm_slot < 0 || (uint32_t)pc->shm_slot >= r->n_pol)
            continue;
        policy_ent *pe = &r->pol[pc->shm_slot];
        pe->used = true;
        copy_str(pe->name, sizeof(pe->name), pc->name);
        bw_ratelimit_params_from_conf(pc, &pe->params);
    }

    if (r->interval_ms != rc->sync_interval_ms || (r->enabled && !was)) {
        r->interval_ms = rc->sync_interval_ms ? rc->sync_interval_ms : 100;
        struct timeval tv = {(time_t)(r->interval_ms / 1000),
                             (suseconds_t)((r->interval_ms % 1000) * 1000)};
        evtimer_del(r->tick);
        event_add(r->tick, &tv);
    }
    if (conn_changed) {
        evtimer_del(r->retry);
        if (r->ctx != NULL || r->closing)
            drop_connection(r); /* schedules a reconnect to the new URL when still enabled */
        evtimer_del(r->retry);
        r->attempt = 0;
        if (r->sentinel) {
            struct timeval tv = {SENTINEL_CHECK_MS / 1000, (SENTINEL_CHECK_MS % 1000) * 1000};
            event_add(r->s_check, &tv);
            sentinel_start(r, false);
        } else {
            evtimer_del(r->s_check);
            connect_now(r);
        }
    }
    if (!r->enabled) {
        evtimer_del(r->tick);
        evtimer_del(r->s_check);
    }
    publish(r);
}

bw_redis_sync *bw_redis_sync_new(struct event_base *base, const bw_shm *shm, const bw_config *cfg,
                                 bw_log *log, const char *instance_id)
{
    bw_redis_sync *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return NULL;
    r->base = base;
    r->shm = shm;
    r->cfg = cfg;
    r->log = log;
    r->share_when_down = true;
    if (instance_id != NULL && instance_id[0] != '\0') {
        copy_str(r->id, sizeof(r->id), instance_id);
    } else {
        char host[64] = "host";
        gethostname(host, sizeof(host) - 1);
        host[sizeof(host) - 1] = '\0';
        snprintf(r->id, sizeof(r->id), "%s-%ld-%08" PRIx32, host, (long)getpid(), random_u32());
    }
    r->n_br = shm->hdr->n_upstream_slots;
    r->n_pol = shm->hdr->n_policy_slots;
    r->br = calloc(r->n_br ? r->n_br : 1, sizeof(*r->br));
    r->pol = calloc(r->n_pol ? r->n_pol : 1, sizeof(*r->pol));
    bw_ratelimit_table *t = rl_table(r);
    if (t != NULL) {
        r->n_rl = bw_ratelimit_table_entries(t);
        r->rl = calloc(r->n_rl, sizeof(*r->rl));
        r->rl_busy = calloc(r->n_rl, 1);
    }
    r->max_orphans = r->n_rl > ORPHANS_MIN ? r->n_rl : ORPHANS_MIN;
    r->tick = event_new(base, -1, EV_PERSIST, on_tick, r);
    r->timeout = evtimer_new(base, on_timeout, r);
    r->retry = evtimer_new(base, on_retry, r);
    r->drop_ev = event_new(base, -1, 0, on_drop_event, r);
    r->s_timeout = evtimer_new(base, on_sentinel_timeout, r);
    r->s_next_ev = event_new(base, -1, 0, on_sentinel_next, r);
    r->s_check = event_new(base, -1, EV_PERSIST, on_sentinel_check, r);
    if (r->br == NULL || r->pol == NULL || (t != NULL && (r->rl == NULL || r->rl_busy == NULL)) ||
        r->tick == NULL || r->timeout == NULL || r->retry == NULL || r->drop_ev == NULL ||
        r->s_timeout == NULL || r->s_next_ev == NULL || r->s_check == NULL) {
        bw_redis_sync_free(r);
        return NULL;
    }
    if (cfg->redis.enabled && t == NULL)
        bw_log_warn(log, "redis: the rate-limit table has no fleet area; rate limits stay local "
                         "to this instance");
    apply_config(r, cfg);
    return r;
}

void bw_redis_sync_set_config(bw_redis_sync *r, const bw_config *cfg)
{
    apply_config(r, cfg);
}

void bw_redis_sync_set_share_when_down(bw_redis_sync *r, bool on)
{
    r->share_when_down = on;
    publish(r);
}

int bw_redis_sync_reset_breaker(bw_redis_sync *r, const char *upstream)
{
    int i = bw_config_find_upstream(r->cfg, upstream);
    if (i < 0)
        return -1;
    const bw_upstream_conf *u = &r->cfg->upstreams[i];
    if (u->shm_slot < 0 || (uint32_t)u->shm_slot >= r->n_br)
        return -1;
    /* Records stamped before the reset are not applied here any more. */
    reset_local(r, u, false);
    br_rec *rec = &r->br[u->shm_slot];
    if (!r->enabled)
        return 1;
    rec->pending_del = true;
    rec->pending_force = false;
    rec->forced_seen = false;
    if (r->state != CONN_READY || r->ctx == NULL || r->closing)
        return 1;
    char key[BW_SHM_NAME_MAX + 128];
    breaker_key(r, u->name, key, sizeof(key));
    const char *a[] = {"DEL", key};
    return send_words(r, CMD_DEL, (uint32_t)u->shm_slot, 2, a) ? 0 : 1;
}

int bw_redis_sync_force_open(bw_redis_sync *r, const char *upstream)
{
    int i = bw_config_find_upstream(r->cfg, upstream);
    if (i < 0)
        return -1;
    const bw_upstream_conf *u = &r->cfg->upstreams[i];
    if (u->shm_slot < 0 || (uint32_t)u->shm_slot >= r->n_br)
        return -1;
    br_rec *rec = &r->br[u->shm_slot];
    rec->pending_del = false;
    rec->pending_force = true;
    if (!r->enabled || r->state != CONN_READY || r->ctx == NULL || r->closing)
        return 1; /* written by the next round once Redis is back */
    char key[BW_SHM_NAME_MAX + 128];
    breaker_key(r, u->name, key, sizeof(key));
    send_force(r, u, (uint32_t)u->shm_slot, key, breaker_ms(), wall_ms());
    return rec->pending_force ? 1 : 0;
}

int bw_redis_sync_delete_ratelimit(bw_redis_sync *r, const char *policy, const char *key)
{
    if (!r->enabled || r->state != CONN_READY || r->ctx == NULL || r->closing)
        return 1;
    char k[512];
    snprintf(k, sizeof(k), "%s:rate-limit:%s:%s", r->prefix, policy, key);
    const char *a[] = {"DEL", k};
    return send_words(r, CMD_OPERATOR, 0, 2, a) ? 0 : 1;
}

void bw_redis_sync_stats(const bw_redis_sync *r, bw_redis_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->configured = r->enabled;
    out->up = r->up;
    out->last_sync_wall_ms = r->last_sync_wall_ms;
    out->errors = r->errors;
    out->pending_deltas = r->pending;
    out->rounds = r->rounds;
    out->rounds_skipped = r->skipped;
    out->connects = r->connects;
    out->live_instances = r->live;
    out->data_losses = r->data_losses;
    out->fleet_resets = r->fleet_resets;
    out->failovers = r->failovers;
}

const char *bw_redis_sync_ratelimit_script(void)
{
    return rl_script;
}

const char *bw_redis_sync_instance_id(const bw_redis_sync *r)
{
    return r->id;
}

int bw_redis_sync_fd(const bw_redis_sync *r)
{
    return r && r->ctx ? r->ctx->c.fd : -1;
}

void bw_redis_sync_free(bw_redis_sync *r)
{
    if (r == NULL)
        return;
    r->enabled = false;
    if (r->ctx != NULL) {
        redisAsyncContext *ac = r->ctx;
        r->ctx = NULL;
        redisAsyncFree(ac); /* answers outstanding callbacks with NULL while r is still valid */
    }
    if (r->tick != NULL)
        event_free(r->tick);
    if (r->timeout != NULL)
        event_free(r->timeout);
    if (r->retry != NULL)
        event_free(r->retry);
    if (r->drop_ev != NULL)
        event_free(r->drop_ev);
    sentinel_forget(r);
    if (r->s_timeout != NULL)
        event_free(r->s_timeout);
    if (r->s_next_ev != NULL)
        event_free(r->s_next_ev);
    if (r->s_check != NULL)
        event_free(r->s_check);
    if (r->shm != NULL && r->shm->hdr != NULL) {
        r->up = false;
        atomic_store_explicit(&r->shm->hdr->status.redis_up, 0u, memory_order_relaxed);
    }
    free(r->br);
    free(r->pol);
    free(r->rl);
    free(r->rl_busy);
    free(r->url);
    free(r->prefix);
    free(r->batch);
    free(r->orphans);
    free(r);
}
