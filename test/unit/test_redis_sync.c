/*
 * Tests for src/redis_sync.c against real redis-server processes (the Debian package), each
 * started by the test on a free 127.0.0.1 port or a unix socket in a temporary directory,
 * without persistence, and stopped at the end. Two bw_redis_sync instances, each with its own
 * shared-memory region (bw_shm_create/bw_shm_bind) but one event loop, play two breakwater
 * instances of a fleet. Waits poll the loop (event_base_loop EVLOOP_ONCE) until a condition
 * holds or a deadline passes; nothing sleeps for a fixed time.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <event2/event.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "breakwater/breaker.h"
#include "breakwater/config.h"
#include "breakwater/log.h"
#include "breakwater/ratelimit.h"
#include "breakwater/redis_sync.h"
#include "breakwater/shm.h"

#include "support.h"

#define CLIENT "198.51.100.7"

/* ---- a redis-server of our own ---- */

typedef struct server {
    pid_t pid;
    int port;
    char dir[64];
    char sock[128];
} server;

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) < 0)
        return -1;
    int port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * UINT64_C(1000000000) + (uint64_t)ts.tv_nsec;
}

static redisContext *sync_client(const server *s)
{
    struct timeval tv = {1, 0};
    redisContext *c = s->port > 0 ? redisConnectWithTimeout("127.0.0.1", s->port, tv)
                                  : redisConnectUnixWithTimeout(s->sock, tv);
    if (c != NULL && c->err) {
        redisFree(c);
        return NULL;
    }
    return c;
}

/* Every server started, so that a failed test (cmocka jumps out of it) still stops them. */
#define MAX_SERVERS 8
static server *servers[MAX_SERVERS];

static void track(server *s)
{
    for (int i = 0; i < MAX_SERVERS; i++)
        if (servers[i] == s || servers[i] == NULL) {
            servers[i] = s;
            return;
        }
}

/* Starts redis-server (on s->port when set, else a fresh port; or only a unix socket) and waits
 * until it answers PING. extra: one more "--name value" pair or NULL. */
static void server_start(server *s, bool unix_only, const char *extra_name, const char *extra_val)
{
    track(s);
    if (s->dir[0] == '\0') {
        snprintf(s->dir, sizeof(s->dir), "/tmp/bwredis.XXXXXX");
        assert_non_null(mkdtemp(s->dir));
        snprintf(s->sock, sizeof(s->sock), "%s/redis.sock", s->dir);
    }
    if (!unix_only && s->port == 0)
        s->port = free_port();
    if (unix_only)
        s->port = 0;
    char port[16];
    snprintf(port, sizeof(port), "%d", s->port);
    s->pid = fork();
    assert_true(s->pid >= 0);
    if (s->pid == 0) {
        /* Dies with the test, whatever happens to the test. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        const char *argv[24] = {"redis-server",
                                "--port",
                                port,
                                "--bind",
                                "127.0.0.1",
                                "--save",
                                "",
                                "--appendonly",
                                "no",
                                "--dir",
                                s->dir,
                                "--unixsocket",
                                s->sock,
                                "--enable-debug-command",
                                "local"};
        int n = 15;
        if (extra_name != NULL) {
            argv[n++] = extra_name;
            argv[n++] = extra_val;
        }
        argv[n] = NULL;
        execvp("redis-server", (char *const *)argv);
        _exit(127);
    }
    uint64_t deadline = now_ms() + 10000;
    for (;;) {
        redisContext *c = sync_client(s);
        if (c != NULL) {
            redisReply *rep = redisCommand(c, "PING");
            bool ok = rep != NULL && (rep->type == REDIS_REPLY_STATUS ||
                                      rep->type == REDIS_REPLY_ERROR); /* NOAUTH counts */
            freeReplyObject(rep);
            redisFree(c);
            if (ok)
                return;
        }
        assert_true(now_ms() < deadline);
        int st;
        assert_int_equal(waitpid(s->pid, &st, WNOHANG), 0); /* still running */
        struct timespec ts = {0, 5 * 1000000};
        nanosleep(&ts, NULL); /* polling for a process we do not control */
    }
}

static void server_stop(server *s)
{
    if (s->pid > 0) {
        kill(s->pid, SIGCONT);
        kill(s->pid, SIGKILL);
        waitpid(s->pid, NULL, 0);
        s->pid = 0;
    }
}

static void server_cleanup(server *s)
{
    server_stop(s);
    if (s->dir[0] != '\0') {
        unlink(s->sock);
        rmdir(s->dir);
        s->dir[0] = '\0';
    }
}

/* ---- instances ---- */

typedef struct instance {
    bw_config *cfg;
    bw_shm shm;
    bw_log log;
    bw_redis_sync *r;
    bw_breaker *breaker;
    const bw_upstream_conf *up;
    bw_ratelimit_table *rl;
    bw_ratelimit_params params, once_params;
    uint32_t policy, once_policy;
} instance;

static struct event_base *base;

static bw_config *make_config(const char *url)
{
    char text[2048];
    snprintf(text, sizeof(text),
             "{\"workers\": 1, \"listeners\": [{\"address\": \"127.0.0.1:1\"}],"
             " \"upstreams\": {\"api\": {\"servers\": [\"127.0.0.1:9\"],"
             "   \"circuit_breaker\": {\"failure_threshold\": 3, \"reset_timeout_ms\": 600000}}},"
             " \"routes\": [{\"path_prefix\": \"/\", \"upstream\": \"api\","
             "   \"rate_limit\": \"per_client\"}],"
             " \"rate_limits\": {\"per_client\": {\"key\": \"client_ip\", \"capacity\": 10,"
             "   \"refill_per_sec\": 0.5},"
             "   \"once\": {\"key\": \"header:X-Key\", \"capacity\": 5, \"refill_per_sec\": 0}},"
             " \"rate_limit_table_size\": 2048,"
             " \"redis\": {\"url\": \"%s\", \"key_prefix\": \"bwtest\", \"sync_interval_ms\": 50,"
             "   \"connect_timeout_ms\": 300, \"command_timeout_ms\": 300}}",
             url);
    return bw_test_parse_config(text);
}

static void instance_start(instance *in, const char *url, const char *id)
{
    memset(in, 0, sizeof(*in));
    in->cfg = make_config(url);
    char err[256];
    assert_int_equal(bw_shm_create(&in->shm, in->cfg, err, sizeof(err)), 0);
    assert_int_equal(bw_shm_bind(&in->shm, in->cfg, 1, now_ms(), err, sizeof(err)), 0);
    in->rl = bw_shm_ratelimit(&in->shm);
    if (!bw_ratelimit_fleet_enabled(in->rl)) {
        /* Until the region reserves a fleet area itself, format the rate-limit area as a
         * (smaller) fleet table within the bytes the region gave it. */
        uint32_t entries = in->shm.hdr->rl_entries;
        size_t have = bw_ratelimit_table_size_bytes(entries);
        uint32_t k = entries;
        while (k > 1 && bw_ratelimit_table_size_bytes_fleet(k) > have)
            k--;
        in->rl = bw_ratelimit_table_init_fleet(in->rl, k);
    }
    bw_log_conf lc = {.error_log = NULL, .access_log = "off", .level = BW_LOG_WARN};
    assert_int_equal(bw_log_open(&in->log, &lc, err, sizeof(err)), 0);
    in->r = bw_redis_sync_new(base, &in->shm, in->cfg, &in->log, id);
    assert_non_null(in->r);
    in->up = &in->cfg->upstreams[0];
    in->breaker = bw_shm_breaker(&in->shm, in->up->shm_slot);
    for (size_t i = 0; i < in->cfg->n_rate_limits; i++) {
        const bw_ratelimit_conf *pc = &in->cfg->rate_limits[i];
        if (strcmp(pc->name, "per_client") == 0) {
            in->policy = (uint32_t)pc->shm_slot;
            bw_ratelimit_params_from_conf(pc, &in->params);
        } else {
            in->once_policy = (uint32_t)pc->shm_slot;
            bw_ratelimit_params_from_conf(pc, &in->once_params);
        }
    }
}

static void instance_stop(instance *in)
{
    bw_redis_sync_free(in->r);
    bw_log_close(&in->log);
    bw_shm_destroy(&in->shm);
    bw_config_free(in->cfg);
}

static bool take(instance *in, const char *client)
{
    uint64_t h = bw_ratelimit_hash(&in->shm.hdr->rl_seed, client, strlen(client));
    bw_ratelimit_result res;
    return bw_ratelimit_take_fleet(in->rl, in->policy, h, client, strlen(client), false,
                                   &in->params, now_ns(), &res) == BW_RATELIMIT_ALLOW;
}

static bool take_once(instance *in, const char *value)
{
    uint64_t h = bw_ratelimit_hash(&in->shm.hdr->rl_seed, value, strlen(value));
    bw_ratelimit_result res;
    return bw_ratelimit_take_fleet(in->rl, in->once_policy, h, value, strlen(value), true,
                                   &in->once_params, now_ns(), &res) == BW_RATELIMIT_ALLOW;
}

static bw_breaker_state state_of(instance *in)
{
    bw_breaker_view v;
    bw_breaker_snapshot(in->breaker, &in->up->breaker, now_ms(), &v);
    return v.state;
}

static bw_redis_stats stats_of(instance *in)
{
    bw_redis_stats st;
    bw_redis_sync_stats(in->r, &st);
    return st;
}

typedef bool (*cond_fn)(void *arg);

static bool wait_for(cond_fn cond, void *arg, uint64_t timeout_ms)
{
    uint64_t deadline = now_ms() + timeout_ms;
    while (!cond(arg)) {
        if (now_ms() > deadline)
            return false;
        event_base_loop(base, EVLOOP_ONCE);
    }
    return true;
}

static bool is_up(void *arg)
{
    return stats_of(arg).up;
}
static bool is_down(void *arg)
{
    return !stats_of(arg).up && atomic_load(&((instance *)arg)->shm.hdr->status.redis_up) == 0;
}
static bool is_open(void *arg)
{
    return state_of(arg) == BW_BREAKER_OPEN;
}
static bool is_closed(void *arg)
{
    return state_of(arg) == BW_BREAKER_CLOSED;
}
static bool no_pending(void *arg)
{
    bw_redis_stats st = stats_of(arg);
    return st.up && st.pending_deltas == 0 && st.rounds > 0;
}

static bool two_pending(void *arg)
{
    return stats_of(arg).pending_deltas >= 2;
}

static bool two_live(void *arg)
{
    return stats_of(arg).live_instances == 2;
}

typedef struct rounds_arg {
    instance *in;
    uint64_t target;
} rounds_arg;

static bool rounds_reached(void *arg)
{
    rounds_arg *a = arg;
    return stats_of(a->in).rounds >= a->target;
}

static void run_rounds(instance *in, uint64_t n)
{
    rounds_arg a = {in, stats_of(in).rounds + n};
    assert_true(wait_for(rounds_reached, &a, 5000));
}

static redisReply *cmd(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = redisvCommand(c, fmt, ap);
    va_end(ap);
    assert_non_null(rep);
    return rep;
}

/* Reads field of hash key as an integer (-1 when absent). For instance fields "inc:cum",
 * returns cum. */
static long long hash_field(redisContext *c, const char *key, const char *field)
{
    redisReply *rep = cmd(c, "HGET %s %s", key, field);
    long long v = -1;
    if (rep->type == REDIS_REPLY_STRING) {
        const char *colon = strchr(rep->str, ':');
        v = atoll(colon != NULL ? colon + 1 : rep->str);
    }
    freeReplyObject(rep);
    return v;
}

static char url_buf[256];

static const char *tcp_url(const server *s)
{
    snprintf(url_buf, sizeof(url_buf), "redis://127.0.0.1:%d/0", s->port);
    return url_buf;
}

/* ---- tests ---- */

static void test_url_parse(void **state)
{
    (void)state;
    bw_redis_target t;
    char err[128];
    assert_int_equal(bw_redis_url_parse("redis://:s%40cret@127.0.0.1:6380/3", &t, err, 128), 0);
    assert_string_equal(t.host, "127.0.0.1");
    assert_int_equal(t.port, 6380);
    assert_int_equal(t.db, 3);
    assert_string_equal(t.password, "s@cret");
    assert_int_equal(bw_redis_url_parse("redis://localhost", &t, err, 128), 0);
    assert_string_equal(t.host, "127.0.0.1");
    assert_int_equal(t.port, 6379);
    assert_int_equal(bw_redis_url_parse("redis://[::1]:7000/1", &t, err, 128), 0);
    assert_string_equal(t.host, "::1");
    assert_int_equal(t.port, 7000);
    assert_int_equal(bw_redis_url_parse("unix:///run/redis.sock", &t, err, 128), 0);
    assert_true(t.unix_socket);
    assert_string_equal(t.path, "/run/redis.sock");
    assert_int_equal(bw_redis_url_parse("redis://cache.example:6379", &t, err, 128), -1);
    assert_int_equal(bw_redis_url_parse("redis://127.0.0.1:0", &t, err, 128), -1);
    assert_int_equal(bw_redis_url_parse("redis://127.0.0.1:99999", &t, err, 128), -1);
    assert_int_equal(bw_redis_url_parse("redis://:bad%4@127.0.0.1", &t, err, 128), -1);
    assert_null(strstr(err, "bad"));
    assert_int_equal(bw_redis_url_parse("http://127.0.0.1", &t, err, 128), -1);
    assert_int_equal(bw_redis_url_parse("redis://127.0.0.1/x", &t, err, 128), -1);
}

static void test_breakers_across_fleet(void **state)
{
    (void)state;
    static server s;
    memset(&s, 0, sizeof(s));
    server_start(&s, false, NULL, NULL);
    instance a, b;
    instance_start(&a, tcp_url(&s), "inst-a");
    instance_start(&b, tcp_url(&s), "inst-b");
    assert_true(wait_for(is_up, &a, 3000));
    assert_true(wait_for(is_up, &b, 3000));
    assert_int_equal(atomic_load(&a.shm.hdr->status.redis_up), 1);
    assert_int_equal(atomic_load(&a.shm.hdr->status.redis_configured), 1);
    run_rounds(&b, 1);

    /* Opened in A: open in B within 3 of B's rounds. */
    uint64_t before = stats_of(&b).rounds;
    bw_breaker_force(a.breaker, &a.up->breaker, BW_BREAKER_OPEN, 0, now_ms(), NULL);
    assert_true(wait_for(is_open, &b, 3000));
    assert_true(stats_of(&b).rounds - before <= 3);

    redisContext *c = sync_client(&s);
    assert_non_null(c);
    redisReply *rep = cmd(c, "HGET bwtest:circuit-breaker:api state");
    assert_int_equal(rep->type, REDIS_REPLY_STRING);
    assert_string_equal(rep->str, "open");
    freeReplyObject(rep);
    rep = cmd(c, "HGET bwtest:circuit-breaker:api updated_by");
    assert_string_equal(rep->str, "inst-a");
    freeReplyObject(rep);
    assert_true(hash_field(c, "bwtest:circuit-breaker:api", "opened_at_ms") > 0);

    /* redis-cli DEL: both reset. */
    freeReplyObject(cmd(c, "DEL bwtest:circuit-breaker:api"));
    assert_true(wait_for(is_closed, &a, 3000));
    assert_true(wait_for(is_closed, &b, 3000));
    run_rounds(&a, 2);
    assert_int_equal(state_of(&a), BW_BREAKER_CLOSED);

    /* Opened again in B; reset through the API of A: both closed, record gone. */
    bw_breaker_force(b.breaker, &b.up->breaker, BW_BREAKER_OPEN, 0, now_ms(), NULL);
    assert_true(wait_for(is_open, &a, 3000));
    assert_int_equal(bw_redis_sync_reset_breaker(a.r, "api"), 0);
    assert_int_equal(bw_redis_sync_reset_breaker(a.r, "nope"), -1);
    assert_int_equal(state_of(&a), BW_BREAKER_CLOSED);
    assert_true(wait_for(is_closed, &b, 3000));
    run_rounds(&b, 2);
    assert_int_equal(state_of(&a), BW_BREAKER_CLOSED);
    assert_int_equal(state_of(&b), BW_BREAKER_CLOSED);
    rep = cmd(c, "EXISTS bwtest:circuit-breaker:api");
    assert_int_equal(rep->integer, 0);
    freeReplyObject(rep);

    /* Heartbeats: two live instances. */
    rep = cmd(c, "ZCARD bwtest:instances");
    assert_int_equal(rep->integer, 2);
    freeReplyObject(rep);
    assert_int_equal(stats_of(&a).live_instances, 2);

    redisFree(c);
    instance_stop(&a);
    instance_stop(&b);
    server_cleanup(&s);
}

static bool is_forced(void *arg)
{
    return bw_breaker_is_forced(((instance *)arg)->breaker);
}
static bool not_forced(void *arg)
{
    return !is_forced(arg);
}

/* Operator maintenance across the fleet: a force-open written by A holds B open (the record's
 * forced_at_ms), a reset through B lifts it on A, and a record rewritten without the field after
 * it was seen (deleted and written again in between) lifts it too. */
static void test_forced_open_across_fleet(void **state)
{
    (void)state;
    static server s;
    memset(&s, 0, sizeof(s));
    server_start(&s, false, NULL, NULL);
    instance a, b;
    instance_start(&a, tcp_url(&s), "inst-a");
    instance_start(&b, tcp_url(&s), "inst-b");
    assert_true(wait_for(is_up, &a, 3000));
    assert_true(wait_for(is_up, &b, 3000));

    assert_true(bw_breaker_force_open(a.breaker, &a.up->breaker, 0, now_ms(), NULL));
    assert_int_equal(bw_redis_sync_force_open(a.r, "api"), 0);
    assert_int_equal(bw_redis_sync_force_open(a.r, "nope"), -1);
    assert_true(wait_for(is_forced, &b, 3000));
    assert_int_equal(state_of(&b), BW_BREAKER_OPEN);
    redisContext *c = sync_client(&s);
    assert_non_null(c);
    assert_true(hash_field(c, "bwtest:circuit-breaker:api", "forced_at_ms") > 0);
    /* Later rounds (state writes, reads) keep it forced everywhere. */
    run_rounds(&a, 3);
    run_rounds(&b, 3);
    assert_true(is_forced(&a) && is_forced(&b));

    assert_int_equal(bw_redis_sync_reset_breaker(b.r, "api"), 0);
    assert_false(is_forced(&b));
    assert_true(wait_for(not_forced, &a, 3000));
    assert_true(wait_for(is_closed, &a, 3000));

    /* Seen forced, then a record without the field: lifted. */
    assert_true(bw_breaker_force_open(a.breaker, &a.up->breaker, 0, now_ms(), NULL));
    assert_int_equal(bw_redis_sync_force_open(a.r, "api"), 0);
    assert_true(wait_for(is_forced, &b, 3000));
    run_rounds(&a, 2);
    freeReplyObject(cmd(c, "HDEL bwtest:circuit-breaker:api forced_at_ms"));
    assert_true(wait_for(not_forced, &a, 3000));
    assert_true(wait_for(not_forced, &b, 3000));

    /* DELETE /ratelimits/...: the fleet record of the key goes. */
    freeReplyObject(cmd(c, "HSET bwtest:rate-limit:pc:198.51.100.1 tat 1"));
    assert_int_equal(bw_redis_sync_delete_ratelimit(a.r, "pc", "198.51.100.1"), 0);
    run_rounds(&a, 2);
    redisReply *rep = cmd(c, "EXISTS bwtest:rate-limit:pc:198.51.100.1");
    assert_int_equal(rep->integer, 0);
    freeReplyObject(rep);

    redisFree(c);
    instance_stop(&a);
    instance_stop(&b);
    server_cleanup(&s);
}

static void test_ratelimit_across_fleet(void **state)
{
    (void)state;
    static server s;
    memset(&s, 0, sizeof(s));
    server_start(&s, false, NULL, NULL);
    instance a, b;
    instance_start(&a, tcp_url(&s), "inst-a");
    instance_start(&b, tcp_url(&s), "inst-b");
    assert_true(wait_for(is_up, &a, 3000));
    assert_true(wait_for(is_up, &b, 3000));

    /* B serves the client once, then A serves it nine times: capacity 10 used fleet-wide. */
    assert_true(take(&b, CLIENT));
    assert_true(wait_for(no_pending, &b, 3000));
    for (int i = 0; i < 9; i++)
        assert_true(take(&a, CLIENT));
    assert_true(wait_for(no_pending, &a, 3000));
    run_rounds(&b, 3);
    run_rounds(&a, 1);
    assert_false(take(&b, CLIENT)); /* B knows the fleet has used it all */
    assert_false(take(&a, CLIENT));

    redisContext *c = sync_client(&s);
    const char *key = "bwtest:rate-limit:per_client:" CLIENT;
    assert_int_equal(hash_field(c, key, "inst-a"), 9);
    assert_int_equal(hash_field(c, key, "inst-b"), 1);
    assert_true(hash_field(c, key, "tat") > 0);
    redisReply *rep = cmd(c, "PTTL %s", key);
    assert_true(rep->integer > 0);
    freeReplyObject(rep);

    /* A bucket that never refills, keyed by a header value (hashed into the name). */
    for (int i = 0; i < 3; i++)
        assert_true(take_once(&a, "tenant-1"));
    assert_true(take_once(&b, "tenant-1"));
    assert_true(wait_for(no_pending, &a, 3000));
    assert_true(wait_for(no_pending, &b, 3000));
    run_rounds(&a, 3);
    run_rounds(&b, 3);
    assert_true(take_once(&a, "tenant-1")); /* 5th token fleet-wide */
    assert_true(wait_for(no_pending, &a, 3000));
    run_rounds(&b, 3);
    assert_false(take_once(&b, "tenant-1"));
    char name[BW_RATELIMIT_FLEET_KEY_MAX + 1];
    bw_ratelimit_fleet_key_text("tenant-1", 8, true, name);
    char okey[128];
    snprintf(okey, sizeof(okey), "bwtest:rate-limit:once:%s", name);
    assert_int_equal(hash_field(c, okey, "taken"), 5);

    redisFree(c);
    instance_stop(&a);
    instance_stop(&b);
    server_cleanup(&s);
}

/* A flush whose reply was lost is sent again with the same absolute value: no change. */
static void test_flush_idempotent(void **state)
{
    (void)state;
    static server s;
    memset(&s, 0, sizeof(s));
    server_start(&s, false, NULL, NULL);
    redisContext *c = sync_client(&s);
    const char *script = bw_redis_sync_ratelimit_script();
    const char *key = "bwtest:rate-limit:p:k";
    /* instance, incarnation, cumulative, base, interval us, cap us, unsure cumulative, its age
     * in us, age of the newest tokens in us, linger ms */
    redisReply *rep =
        cmd(c, "EVAL %s 1 %s inst-a 1 5 0 1000000 100000000 0 0 0 60000", script, key);
    assert_int_equal(rep->type, REDIS_REPLY_INTEGER);
    long long ahead1 = rep->integer;
    assert_true(ahead1 > 4000000 && ahead1 <= 5000000);
    freeReplyObject(rep);
    long long tat1 = hash_field(c, key, "tat");
    rep = cmd(c, "EVAL %s 1 %s inst-a 1 5 0 1000000 100000000 0 0 0 60000", script, key);
    freeReplyObject(rep);
    assert_int_equal(hash_field(c, key, "tat"), tat1);
    assert_int_equal(hash_field(c, key, "inst-a"), 5);
    /* Growth adds only the difference. */
    rep = cmd(c, "EVAL %s 1 %s inst-a 1 7 5 1000000 100000000 0 0 0 60000", script, key);
    freeReplyObject(rep);
    assert_int_equal(hash_field(c, key, "tat"), tat1 + 2000000);
    /* A new incarnation starts from its own base, not from the old field. */
    rep = cmd(c, "EVAL %s 1 %s inst-a 2 1 0 1000000 100000000 0 0 0 60000", script, key);
    freeReplyObject(rep);
    assert_int_equal(hash_field(c, key, "tat"), tat1 + 3000000);
    /* Key expired or Redis emptied: the base (acknowledged amount) is not sent again. */
    freeReplyObject(cmd(c, "DEL %s", key));
    rep = cmd(c, "EVAL %s 1 %s inst-a 2 4 1 1000000 100000000 0 0 0 60000", script, key);
    assert_true(rep->integer > 2000000 && rep->integer <= 3000000);
    freeReplyObject(rep);
    /* Never-refilling buckets count. */
    rep = cmd(c, "EVAL %s 1 bwtest:rate-limit:q:k inst-b 1 3 0 0 0 0 0 0 60000", script);
    assert_int_equal(rep->integer, 3);
    freeReplyObject(rep);
    rep = cmd(c, "EVAL %s 1 bwtest:rate-limit:q:k inst-b 1 3 0 0 0 0 0 0 60000", script);
    assert_int_equal(rep->integer, 3);
    freeReplyObject(rep);
    /* ... and never expire: "never refills" holds however long the key stays idle. */
    rep = cmd(c, "PTTL bwtest:rate-limit:q:k");
    assert_int_equal(rep->integer, -1);
    freeReplyObject(rep);

    /* A flush that landed, whose reply was lost, and whose key then expired: sent again (base 0,
     * those 5 tokens "unsure" since 20 s, longer than they take to refill), it adds nothing. */
    const char *lost = "bwtest:rate-limit:p:lost";
    rep = cmd(c, "EVAL %s 1 %s inst-a 3 5 0 1000000 100000000 0 0 0 60000", script, lost);
    assert_true(rep->integer > 4000000);
    freeReplyObject(rep);
    freeReplyObject(cmd(c, "DEL %s", lost));
    rep = cmd(c, "EVAL %s 1 %s inst-a 3 5 0 1000000 100000000 5 20000000 20000000 60000", script,
              lost);
    assert_int_equal(rep->type, REDIS_REPLY_INTEGER);
    assert_int_equal(rep->integer, 0);
    freeReplyObject(rep);
    /* The same with 2 newer tokens on top: only those are charged, as of now. */
    rep = cmd(c, "EVAL %s 1 %s inst-a 3 7 0 1000000 100000000 5 20000000 0 60000", script, lost);
    assert_true(rep->integer > 1000000 && rep->integer <= 2000000);
    freeReplyObject(rep);

    /* Something that is not a hash under our key: -1 for that key, the others are settled. */
    freeReplyObject(cmd(c, "SET bwtest:rate-limit:p:str hello"));
    rep = cmd(c,
              "EVAL %s 2 bwtest:rate-limit:p:str bwtest:rate-limit:p:ok inst-a "
              "1 1 0 1000000 100000000 0 0 0 1 1 0 1000000 100000000 0 0 0 60000",
              script);
    assert_int_equal(rep->type, REDIS_REPLY_ARRAY);
    assert_int_equal(rep->elements, 2);
    assert_int_equal(rep->element[0]->integer, -1);
    assert_true(rep->element[1]->integer > 0);
    freeReplyObject(rep);
    redisFree(c);
    server_cleanup(&s);
}

/* SIGSTOP: the command timeout fires, Redis is reported down, deltas are kept; SIGCONT: the
 * fleet converges and counts each side's tokens exactly once. Then a restart with no data. */
static void test_stopped_then_resumed_then_restarted(void **state)
{
    (void)state;
    static server s;
    memset(&s, 0, sizeof(s));
    server_start(&s, false, NULL, NULL);
    instance a, b;
    instance_start(&a, tcp_url(&s), "inst-a");
    instance_start(&b, tcp_url(&s), "inst-b");
    assert_true(wait_for(is_up, &a, 3000));
    assert_true(wait_for(is_up, &b, 3000));
    int taken_a = 0, taken_b = 0;
    taken_a += take(&a, "203.0.113.1");
    taken_b += take(&b, "203.0.113.1");
    assert_true(wait_for(no_pending, &a, 3000));
    assert_true(wait_for(two_live, &a, 3000));

    kill(s.pid, SIGSTOP);
    uint64_t errors = stats_of(&a).errors;
    assert_true(wait_for(is_down, &a, 3000));
    assert_true(wait_for(is_down, &b, 3000));
    assert_true(stats_of(&a).errors > errors);
    taken_a += take(&a, "203.0.113.1");
    taken_a += take(&a, "203.0.113.1");
    taken_b += take(&b, "203.0.113.1");
    assert_true(wait_for(two_pending, &a, 3000));
    /* Sharing while down: two instances were live, so each takes half. */
    assert_int_equal(bw_ratelimit_fleet_share(a.rl), 2);

    kill(s.pid, SIGCONT);
    assert_true(wait_for(no_pending, &a, 8000));
    assert_true(wait_for(no_pending, &b, 8000));
    assert_int_equal(bw_ratelimit_fleet_share(a.rl), 0);
    redisContext *c = sync_client(&s);
    const char *key = "bwtest:rate-limit:per_client:203.0.113.1";
    assert_int_equal(hash_field(c, key, "inst-a"), taken_a);
    assert_int_equal(hash_field(c, key, "inst-b"), taken_b);
    redisFree(c);

    /* Restarted empty on the same port: both reconnect and write their state again. */
    server_stop(&s);
    assert_true(wait_for(is_down, &a, 3000));
    server_start(&s, false, NULL, NULL);
    assert_true(wait_for(no_pending, &a, 8000));
    assert_true(wait_for(is_up, &b, 8000));
    taken_a += take(&a, "203.0.113.1");
    bw_breaker_force(a.breaker, &a.up->breaker, BW_BREAKER_OPEN, 0, now_ms(), NULL);
    assert_true(wait_for(is_open, &b, 3000));
    assert_true(wait_for(no_pending, &a, 3000));
    run_rounds(&a, 1);
    c = sync_client(&s);
    redisReply *rep = cmd(c, "ZCARD bwtest:instances");
    assert_int_equal(rep->integer, 2);
    freeReplyObject(rep);
    /* The field is the absolute total, but only what was taken since the restart reaches the
     * new, empty Redis' bucket: one token, i.e. at most one 2 s emission interval ahead. */
    assert_int_equal(hash_field(c, key, "inst-a"), taken_a);
    long long tat = hash_field(c, key, "tat");
    rep = cmd(c, "TIME");
    long long now_us = atoll(rep->element[0]->str) * 1000000LL + atoll(rep->element[1]->str);
    freeReplyObject(rep);
    assert_true(tat - now_us > 0 && tat - now_us <= 2000000);
    redisFree(c);

    instance_stop(&a);
    instance_stop(&b);
    server_cleanup(&s);
}

static void test_wrong_password(void **state)
{
    (void)state;
    static server s;
    memset(&s, 0, sizeof(s));
    server_start(&s, false, "--requirepass", "right");
    char url[128];
    snprintf(url, sizeof(url), "redis://:wrong@127.0.0.1:%d/0", s.port);
    instance a;
    instance_start(&a, url, "inst-a");
    uint64_t deadline = now_ms() + 1500;
    while (now_ms() < deadline)
        event_base_loop(base, EVLOOP_ONCE);
    bw_redis_stats st = stats_of(&a);
    assert_false(st.up);
    assert_true(st.errors >= 2); /* retried with backoff, refused each time */
    assert_true(st.errors < 40); /* ... but not in a tight loop */
    assert_true(atomic_load(&a.shm.hdr->status.redis_errors) == st.errors);
    instance_stop(&a);

    snprintf(url, sizeof(url), "redis://:right@127.0.0.1:%d/2", s.port);
    instance_start(&a, url, "inst-a");
    assert_true(wait_for(is_up, &a, 3000));
    run_rounds(&a, 1);
    redisContext *c = sync_client(&s);
    freeReplyObject(cmd(c, "AUTH right"));
    freeReplyObject(cmd(c, "SELECT 2"));
    redisReply *rep = cmd(c, "ZCARD bwtest:instances");
    assert_int_equal(rep->integer, 1);
    freeReplyObject(rep);
    redisFree(c);
    instance_stop(&a);
    server_cleanup(&s);
}

static void test_unix_socket(void **state)
{
    (void)state;
    static server s;
    memset(&s, 0, sizeof(s));
    server_start(&s, true, NULL, NULL);
    char url[160];
    snprintf(url, sizeof(url), "unix://%s", s.sock);
    instance a, b;
    instance_start(&a, url, "inst-a");
    instance_start(&b, url, "inst-b");
    assert_true(wait_for(is_up, &a, 3000));
    assert_true(wait_for(is_up, &b, 3000));
    bw_breaker_force(a.breaker, &a.up->breaker, BW_BREAKER_OPEN, 0, now_ms(), NULL);
    assert_true(wait_for(is_open, &b, 3000));
    instance_stop(&a);
    instance_stop(&b);
    server_cleanup(&s);
}

/* Nothing listening: connect errors are counted, backoff spaces the attempts. */
static void test_refused_connect(void **state)
{
    (void)state;
    char url[64];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", free_port());
    instance a;
    instance_start(&a, url, "inst-a");
    uint64_t deadline = now_ms() + 1000;
    while (now_ms() < deadline)
        event_base_loop(base, EVLOOP_ONCE);
    bw_redis_stats st = stats_of(&a);
    assert_false(st.up);
    assert_true(st.errors >= 2 && st.errors < 20);
    assert_true(take(&a, CLIENT)); /* local state keeps working */
    instance_stop(&a);
}

/* A fresh loop per test: a failed assertion leaves the previous one mid-loop. */
static int setup(void **state)
{
    (void)state;
    signal(SIGPIPE, SIG_IGN);
    memset(servers, 0, sizeof(servers));
    base = event_base_new();
    return base == NULL ? -1 : 0;
}

static int teardown(void **state)
{
    (void)state;
    for (int i = 0; i < MAX_SERVERS; i++)
        if (servers[i] != NULL && servers[i]->dir[0] != '\0')
            server_cleanup(servers[i]);
    event_base_free(base);
    base = NULL;
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_url_parse, setup, teardown),
        cmocka_unit_test_setup_teardown(test_breakers_across_fleet, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forced_open_across_fleet, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ratelimit_across_fleet, setup, teardown),
        cmocka_unit_test_setup_teardown(test_flush_idempotent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stopped_then_resumed_then_restarted, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_password, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unix_socket, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refused_connect, setup, teardown),
    };
    if (getenv("BW_TEST_FILTER") != NULL)
        cmocka_set_test_filter(getenv("BW_TEST_FILTER"));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
