"""Breaker backoff across the fleet: an instance that follows another's opening also follows its
backoff level and jitter (fields backoff_level and jitter_permille of the breaker record), so a
re-opened breaker stays open on every instance for the grown period, instead of an instance at
a lower level probing (and closing the breaker for everyone) early.

A's upstream always fails; B's is healthy, so any probe B sent would succeed and show at once.
"""

import time

import harness
import test_redis_fleet as fleet
from test_redis_fleet import redis_server  # noqa: F401  (the fixture)

SLOW = harness.SLOW
RESET_MS = int(600 * SLOW)


def backoff_config(up, redis):
    cfg = fleet.fleet_config([up], redis, threshold=2)
    cfg["upstreams"]["api"]["circuit_breaker"] = {
        "failure_threshold": 2, "reset_timeout_ms": RESET_MS, "max_reset_timeout_ms": 60000}
    return cfg


def cb(bw):
    return harness.upstream_state(bw, "api")["circuit_breaker"]


def test_backoff_grows_fleet_wide_and_followers_wait_the_grown_period(
        redis_server, upstream_factory, breakwater_factory):
    sw_a = fleet.Switch("fail")
    up_a, up_b = upstream_factory(sw_a), upstream_factory(fleet.Switch("ok"))
    a = breakwater_factory(backoff_config(up_a, redis_server))
    b = breakwater_factory(backoff_config(up_b, redis_server))
    fleet.wait_fleet(redis_server, a, b)

    for _ in range(2):
        assert fleet.fresh(a).status == 503
    assert cb(a)["state"] == "open" and cb(a)["wait_ms"] == RESET_MS
    fleet.wait_state(b, "open", 5 * SLOW)

    # A probes when its period ends, the probe fails: level 2, about twice the wait.
    def a_reopened():
        fleet.fresh(a)
        return cb(a)["wait_ms"] >= 2 * RESET_MS
    harness.wait_until(a_reopened, 5 * RESET_MS / 1000.0 + 5 * SLOW, interval=0.02,
                       message="A re-opened at backoff level 2")
    t_level2 = time.monotonic()
    wait_a = cb(a)["wait_ms"]
    assert 2 * RESET_MS <= wait_a <= 2 * RESET_MS * 1.1 + 1, wait_a

    # B follows the level (and A's jitter), not only the state.
    harness.wait_until(lambda: cb(b)["wait_ms"] >= wait_a, 5 * SLOW, interval=0.02,
                       message="B at A's backoff (wait_ms %d)" % wait_a)
    rec = harness.redis_hash(redis_server, fleet.breaker_key())
    assert rec.get("backoff_level") == "2", rec
    assert rec.get("jitter_permille", "").isdigit(), rec

    # B keeps refusing for the grown period: its healthy upstream sees nothing until then.
    n_b = len(up_b.all_requests)
    until = t_level2 + wait_a / 1000.0 * 0.85
    with harness.KeepAliveGets(b.port) as ka:
        while time.monotonic() < until:
            fleet.assert_circuit_open(ka.get("/"))
    assert len(up_b.all_requests) == n_b, "B probed before the fleet's grown period ended"
    assert cb(b)["state"] == "open"
