"""Bad input from Redis: keys of the wrong type under our names, a script error, huge values, a
read-only replica. Each is logged, counted in breakwater_redis_errors_total and retried with
backoff; requests keep flowing on local state; nothing crashes; and once the bad data is gone
the fleet state converges again (tokens held meanwhile are delivered).
"""

import time

import harness
import test_redis_fleet as fleet
from harness import metric_sum
from test_redis_fleet import redis_server  # noqa: F401  (the fixture)

SLOW = harness.SLOW
P = fleet.PREFIX


def errors(bw):
    return metric_sum(harness.scrape(bw), "breakwater_redis_errors_total")


def one(bw, key):
    r = fleet.fresh(bw, "/", [("X-Api-Key", key)])
    return r.status


def plain(bw):
    """A request of a client of its own, so that the rate limit never answers first."""
    plain.n = getattr(plain, "n", 0) + 1
    return fleet.fresh(bw, "/", [("X-Api-Key", "breaker-driver-%d" % plain.n)])


def limited(up, redis):
    return fleet.fleet_config([up], redis, threshold=2, rate_limit={
        "key": "header:X-Api-Key", "capacity": 100, "refill_per_sec": 1})


def test_keys_of_the_wrong_type_and_a_script_error(redis_server, upstream_factory,
                                                   breakwater_factory):
    sw = fleet.Switch("ok")
    up = upstream_factory(sw)
    bw = breakwater_factory(limited(up, redis_server))
    fleet.wait_fleet(redis_server, bw)
    rl_key = "%s:rate-limit:per_key:%s" % (P, fleet.header_key_name("typed"))
    redis_server.call("SET", fleet.breaker_key(), "not a hash")
    redis_server.call("DEL", "%s:circuit-breaker" % P)
    redis_server.call("RPUSH", "%s:circuit-breaker" % P, "not", "a", "hash")
    redis_server.call("SET", rl_key, "not a hash either")
    e0 = errors(bw)

    # Requests flow on local state; the breaker opens locally and its write (the script) fails.
    for _ in range(5):
        assert one(bw, "typed") == 200
    sw.mode = "fail"
    for _ in range(2):
        assert plain(bw).status == 503
    sw.mode = "ok"
    fleet.assert_circuit_open(plain(bw))
    harness.wait_until(lambda: errors(bw) >= e0 + 3, 5 * SLOW, message="errors counted")
    # Logged (one line per kind of error and 10 s, with a count of the ones not logged).
    bw.wait_log(r"redis: .*(WRONGTYPE|not a hash|circuit-breaker)", timeout=5 * SLOW)
    assert bw.proc.poll() is None
    # Backoff: over two seconds the instance asks about the bad keys a few times, not at
    # every 100 ms round.
    # (a rate over a fixed span is what is measured: requests keep flowing meanwhile)
    n0 = errors(bw)
    t0 = time.monotonic()
    with harness.KeepAliveGets(bw.port) as ka:
        while time.monotonic() < t0 + 2.0:
            r = ka.get("/", [("X-Api-Key", "during-backoff-%d" % int(time.monotonic() * 1000))])
            assert r.status in (200, 503), r
    assert errors(bw) - n0 <= 12, "errors at every round: no backoff"

    # The operator removes the bad keys: the record is written, the index rebuilt, and the
    # tokens taken meanwhile are delivered.
    redis_server.call("DEL", fleet.breaker_key(), "%s:circuit-breaker" % P, rl_key)
    harness.wait_until(
        lambda: harness.redis_hash(redis_server, fleet.breaker_key()).get("state") == "open",
        10 * SLOW, interval=0.05, message="the breaker record written")
    harness.wait_until(
        lambda: harness.redis_hash(redis_server, "%s:circuit-breaker" % P).get("api") == "open",
        10 * SLOW, interval=0.05, message="the index rebuilt")
    harness.wait_until(lambda: sum(fleet.rate_limit_fields(
        redis_server, "per_key", "typed").values()) == 5, 10 * SLOW, interval=0.05,
        message="the 5 tokens delivered")


def test_a_wrong_typed_epoch_blocks_no_request_and_no_reset_is_misread(
        redis_server, upstream_factory, breakwater_factory):
    sw = fleet.Switch("ok")
    bw = breakwater_factory(limited(upstream_factory(sw), redis_server))
    fleet.wait_fleet(redis_server, bw)
    sw.mode = "fail"
    for _ in range(2):
        assert plain(bw).status == 503
    sw.mode = "ok"
    harness.wait_until(
        lambda: harness.redis_hash(redis_server, fleet.breaker_key()).get("state") == "open",
        5 * SLOW, interval=0.02, message="record written")
    redis_server.call("DEL", "%s:epoch" % P)
    redis_server.call("HSET", "%s:epoch" % P, "a", "b")
    e0 = errors(bw)
    harness.wait_until(lambda: errors(bw) > e0, 5 * SLOW, message="epoch errors counted")
    # With the epoch unreadable, a vanished record is not taken for a reset.
    redis_server.call("DEL", fleet.breaker_key())
    deadline = time.monotonic() + 1.0 * SLOW
    with harness.KeepAliveGets(bw.port) as ka:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            fleet.assert_circuit_open(ka.get("/", [("X-Api-Key", "epoch-driver-%d" % n)]))
    # Once the epoch is readable again, DEL means reset again.
    redis_server.call("DEL", "%s:epoch" % P)
    fleet.wait_rounds(bw)
    fleet.wait_rounds(bw)
    redis_server.call("DEL", fleet.breaker_key())
    fleet.wait_state(bw, "closed", 5 * SLOW)
    assert bw.proc.poll() is None


def test_huge_values_under_our_keys_keep_master_memory_bounded(redis_server, upstream_factory,
                                                               breakwater_factory):
    bw = breakwater_factory(limited(upstream_factory(fleet.Switch("ok")), redis_server),
                            env=harness.unquarantined_env())
    fleet.wait_fleet(redis_server, bw)
    rss0 = bw.proc_status(bw.proc.pid, "VmRSS")
    big = "x" * (16 << 20)
    with redis_server.client(timeout=30) as c:
        c.call("HSET", fleet.breaker_key(), "state", "closed", "updated_at_ms", "1",
               "updated_by", big, "junk", big)
        fields = []
        for i in range(50000):
            fields += ["u%d" % i, "open"]
        c.call("HSET", "%s:circuit-breaker" % P, *fields)
        c.call("DEL", "%s:epoch" % P)
        c.call("SET", "%s:epoch" % P, big)
    e0 = errors(bw)
    harness.wait_until(lambda: errors(bw) >= e0 + 2, 10 * SLOW, message="malformed data counted")
    # Rounds keep going (and failing on the epoch): ten more errors is ten more rounds read.
    e1 = errors(bw)
    harness.wait_until(lambda: errors(bw) >= e1 + 5, 30 * SLOW, message="more rounds")
    assert one(bw, "huge") == 200
    rss1 = bw.proc_status(bw.proc.pid, "VmRSS")
    assert rss1 - rss0 < 8 * 1024, "master RSS grew by %d kB reading huge values" % (rss1 - rss0)
    # Once the epoch is sane again, the index gets our upstream right despite 50,000 others.
    redis_server.call("DEL", "%s:epoch" % P)
    harness.wait_until(
        lambda: redis_server.call("HGET", "%s:circuit-breaker" % P, "api") == "closed",
        10 * SLOW, message="index field of api")


def test_a_read_only_replica_is_left_with_backoff_and_requests_flow(tmp_path, upstream_factory,
                                                                    breakwater_factory):
    master = harness.RedisServer(tmp_path)
    replica = harness.RedisServer(tmp_path)
    try:
        assert replica.call("REPLICAOF", "127.0.0.1", str(master.port)) == "OK"
        harness.wait_until(lambda: "master_link_status:up" in replica.call("INFO", "replication"),
                           10 * SLOW, message="replica linked")
        bw = breakwater_factory(limited(upstream_factory(fleet.Switch("ok")), replica))
        bw.wait_log(r"READONLY", timeout=10 * SLOW)

        def conns():
            info = replica.call("INFO", "stats")
            return int(info.split("total_connections_received:")[1].split()[0])
        c0 = conns()
        t0 = time.monotonic()
        n = 0
        with harness.KeepAliveGets(bw.port) as ka:
            while time.monotonic() < t0 + 3.0:
                r = ka.get("/", [("X-Api-Key", "replica-client-%d" % n)])
                assert r.status == 200, r
                n += 1
        took = time.monotonic() - t0
        made = conns() - c0
        # Without backoff: a new connection every round (30 in 3 s).
        assert made <= 8, "%d connections to the replica in %.1f s" % (made, took)
        e0 = errors(bw)
        harness.wait_until(lambda: errors(bw) > e0, 10 * SLOW, message="errors counted")
        assert bw.proc.poll() is None
    finally:
        replica.kill()
        master.kill()
