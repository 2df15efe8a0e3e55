"""Breaker records that survive Redis losing its data, and the breaker index operators read.

Two breakwater instances (A and B) share a real redis-server started by the test.

- The index hash {prefix}:circuit-breaker has one field per upstream holding its state, with
  every upstream present (closed ones too) and kept up to date as breakers move.
- `DEL {prefix}:circuit-breaker` resets every breaker on every instance, as `DEL` of one
  upstream's record resets that one.
- The fleet epoch {prefix}:epoch tells such a reset from Redis losing its data: after FLUSHALL
  or a restart of Redis without persistence, an open breaker stays open on every instance and
  its record is written back.
"""

import pytest

import harness
import test_redis_fleet as fleet
from test_redis_fleet import redis_server  # noqa: F401  (the fixture)

SLOW = harness.SLOW


def two_upstream_config(servers_api, servers_other, redis, prefix=fleet.PREFIX):
    cfg = fleet.fleet_config(servers_api, redis, upstreams={"other": {
        "servers": [u.address for u in servers_other], "retries": 0,
        "circuit_breaker": {"failure_threshold": 3, "reset_timeout_ms": 60000}}})
    cfg["redis"]["key_prefix"] = prefix
    cfg["routes"] = [{"path_prefix": "/other", "upstream": "other"},
                     {"path_prefix": "/", "upstream": "api"}]
    return cfg


def start_pair(redis, upstream_factory, breakwater_factory, prefix=fleet.PREFIX):
    """A and B, each with upstreams api and other (A's behind switches the test flips)."""
    sw_api, sw_other = fleet.Switch("ok"), fleet.Switch("ok")
    a_api, a_other = upstream_factory(sw_api), upstream_factory(sw_other)
    b_api, b_other = upstream_factory(fleet.Switch("ok")), upstream_factory(fleet.Switch("ok"))
    a = breakwater_factory(two_upstream_config([a_api], [a_other], redis, prefix))
    b = breakwater_factory(two_upstream_config([b_api], [b_other], redis, prefix))
    for bw in (a, b):
        harness.wait_until(lambda: fleet.redis_up(bw) == 1, 10 * SLOW, interval=0.05,
                           message="breakwater_redis_up 1 on instance %d" % bw.n)
    harness.wait_until(lambda: redis.call("ZCARD", "%s:instances" % prefix) >= 2, 10 * SLOW,
                       interval=0.02, message="both instances in %s:instances" % prefix)
    fleet.wait_rounds(a, b)
    return a, b, sw_api, sw_other


def fail_until_open(bw, switch, target, upstream, threshold=3):
    switch.mode = "fail"
    for _ in range(threshold):
        r = fleet.fresh(bw, target)
        assert r.status == 503 and r.body == b"upstream says unavailable", r
    assert harness.breaker_state(bw, upstream) == "open"
    switch.mode = "ok"


def wait_states(instances, upstream, state, timeout):
    for bw in instances:
        harness.wait_until(lambda: harness.breaker_state(bw, upstream) == state, timeout,
                           interval=0.02,
                           message="breaker %s %s on instance %d" % (upstream, state, bw.n))


def index(redis, prefix=fleet.PREFIX):
    return harness.redis_hash(redis, "%s:circuit-breaker" % prefix)


def wait_index(redis, want, prefix=fleet.PREFIX, timeout=5.0):
    harness.wait_until(lambda: index(redis, prefix) == want, timeout * SLOW, interval=0.02,
                       message="index %r (now %r)" % (want, index(redis, prefix)))


def test_index_hash_shows_every_upstream_and_follows_transitions(redis_server, upstream_factory,
                                                                 breakwater_factory):
    prefix = "api-gateway"
    a, b, sw_api, _ = start_pair(redis_server, upstream_factory, breakwater_factory, prefix)
    # Present before any transition: an operator sees every upstream at once.
    wait_index(redis_server, {"api": "closed", "other": "closed"}, prefix)
    out = redis_server.cli("HGETALL", "%s:circuit-breaker" % prefix).split("\n")
    assert sorted(zip(out[0::2], out[1::2])) == [("api", "closed"), ("other", "closed")], out

    fail_until_open(a, sw_api, "/", "api")
    wait_states([b], "api", "open", 5 * SLOW)
    wait_index(redis_server, {"api": "open", "other": "closed"}, prefix)

    # A field an operator overwrote with something else is put right again.
    redis_server.call("HSET", "%s:circuit-breaker" % prefix, "other", "bogus")
    wait_index(redis_server, {"api": "open", "other": "closed"}, prefix)
    assert harness.breaker_state(a, "other") == harness.breaker_state(b, "other") == "closed"


def test_del_of_the_index_resets_every_breaker_on_every_instance(redis_server, upstream_factory,
                                                                 breakwater_factory):
    a, b, sw_api, sw_other = start_pair(redis_server, upstream_factory, breakwater_factory)
    fail_until_open(a, sw_api, "/", "api")
    fail_until_open(a, sw_other, "/other", "other")
    wait_states([b], "api", "open", 5 * SLOW)
    wait_states([b], "other", "open", 5 * SLOW)
    wait_index(redis_server, {"api": "open", "other": "open"})

    assert redis_server.cli("DEL", "%s:circuit-breaker" % fleet.PREFIX) == "1"
    for up in ("api", "other"):
        wait_states([a, b], up, "closed", 5 * SLOW)
    # The per-upstream records go too (nobody re-applies them), and the index is rebuilt.
    wait_index(redis_server, {"api": "closed", "other": "closed"})
    fleet.wait_rounds(a, b)
    for up in ("api", "other"):
        rec = harness.redis_hash(redis_server, fleet.breaker_key(up))
        assert rec.get("state", "closed") == "closed", rec
        assert harness.breaker_state(a, up) == harness.breaker_state(b, up) == "closed"
        for bw in (a, b):
            r = fleet.fresh(bw, "/other" if up == "other" else "/")
            assert (r.status, r.body) == (200, b"upstream ok"), r


@pytest.mark.parametrize("loss", ["flushall", "restart"])
def test_redis_losing_its_data_keeps_an_open_breaker_open(loss, redis_server, upstream_factory,
                                                          breakwater_factory):
    a, b, sw_api, _ = start_pair(redis_server, upstream_factory, breakwater_factory)
    fail_until_open(a, sw_api, "/", "api")
    wait_states([b], "api", "open", 5 * SLOW)
    before = harness.redis_hash(redis_server, fleet.breaker_key())
    epoch = redis_server.call("GET", "%s:epoch" % fleet.PREFIX)
    assert before.get("state") == "open" and epoch, (before, epoch)

    if loss == "flushall":
        assert redis_server.cli("FLUSHALL") == "OK"
    else:
        redis_server.restart()
    for bw in (a, b):
        bw.wait_log(r"fleet epoch changed", timeout=10 * SLOW)
    # Written back as it was: same author and stamp, so nobody takes it as news.
    last = {}

    def written_back():
        last["record"] = harness.redis_hash(redis_server, fleet.breaker_key())
        return last["record"] == before
    try:
        harness.wait_until(written_back, 5 * SLOW, interval=0.02,
                           message="the breaker record written back")
    except AssertionError:
        raise AssertionError("record before the loss %r, now %r" % (before, last.get("record")))
    wait_index(redis_server, {"api": "open", "other": "closed"})
    assert redis_server.call("GET", "%s:epoch" % fleet.PREFIX) not in (None, epoch)
    fleet.wait_rounds(a, b)
    for bw in (a, b):
        assert harness.breaker_state(bw, "api") == "open"
        fleet.assert_circuit_open(fleet.fresh(bw, "/"))

    # DEL still means reset after the loss.
    assert redis_server.cli("DEL", fleet.breaker_key()) == "1"
    wait_states([a, b], "api", "closed", 5 * SLOW)
