"""Redis misbehaving under steady traffic through two instances (A and B), one fault per test:
stopped (SIGSTOP/SIGCONT), slow (DEBUG SLEEP), killed and started again empty, shut down without
saving and started again, client connections killed, and a wrong password.

During the fault every client request is answered by the upstream or by the local rate limit
(200 or 429, never a 5xx, never slowed down by Redis), /readyz stays 200 with the `redis` check
unhealthy, breakwater_redis_up is 0 and breakwater_redis_errors_total grows. After Redis is back:
both instances reconnect, a breaker opened on A during the fault reaches B, and the fleet hash of
the rate-limited key holds exactly the number of requests each instance accepted for it (the
per-instance fields of {prefix}:rate-limit:{policy}:{key}, see docs/redis.md).

With redis.required true, /readyz is 503 while Redis is down and 200 again after.

Deadlines after recovery allow for the reconnect backoff (capped at 5 s, see redis_sync.h).
"""

import threading
import time

import pytest

import harness
from harness import Client, build_request, metric_sum
from test_redis_fleet import INTERVAL_MS, PREFIX, rate_limit_fields, wait_fleet

SLOW = harness.SLOW
KEY = "steady-client"
THRESHOLD = 3
# How long a reconnection may take once Redis is reachable again: the longest backoff delay
# (5 s) plus a handshake and a few sync rounds.
RECOVERY = 8.0


def fault_config(upstream, redis_url, required=False):
    """One worker; "/" -> api, limited per X-Api-Key (capacity 20, 20/s); "/bad" -> upstream
    "bad" on a dead port (no retries, opens after THRESHOLD failures for a minute)."""
    cfg = harness.base_config([upstream], workers=1)
    cfg["upstreams"]["bad"] = {
        "servers": [harness.dead_address()], "retries": 0,
        "connect_timeout_ms": int(1000 * SLOW),
        "circuit_breaker": {"failure_threshold": THRESHOLD, "reset_timeout_ms": 60000}}
    cfg["rate_limits"] = {"per_key": {"key": "header:X-Api-Key", "capacity": 20,
                                      "refill_per_sec": 20}}
    cfg["routes"] = [{"path_prefix": "/bad", "upstream": "bad"},
                     {"path_prefix": "/", "upstream": "api", "rate_limit": "per_key"}]
    cfg["redis"] = {"url": redis_url, "key_prefix": PREFIX, "sync_interval_ms": INTERVAL_MS,
                    "required": required, "connect_timeout_ms": int(300 * SLOW),
                    "command_timeout_ms": int(300 * SLOW)}
    return cfg


class Traffic(threading.Thread):
    """Sequential GETs with one client key on a keep-alive connection to one instance, paced
    at a few hundred per second, until stop(). Counts statuses, keeps the slowest answer and
    every transport error."""

    def __init__(self, bw):
        super().__init__(daemon=True)
        self.bw = bw
        self.lock = threading.Lock()
        self.statuses = {}
        self.errors = []
        self.bad = []
        self.slowest = 0.0
        self._halt = threading.Event()

    def accepted(self):
        with self.lock:
            return self.statuses.get(200, 0)

    def total(self):
        with self.lock:
            return sum(self.statuses.values())

    def run(self):
        c = None
        raw = build_request("GET", "/", [("X-Api-Key", KEY)])
        while not self._halt.is_set():
            try:
                if c is None:
                    c = Client(self.bw.port)
                t0 = time.monotonic()
                c.send(raw)
                r = c.read_response()
                took = time.monotonic() - t0
            except (harness.NoResponse, OSError, ValueError) as e:
                with self.lock:
                    self.errors.append(repr(e))
                if c is not None:
                    c.close()
                c = None
                continue
            with self.lock:
                self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
                self.slowest = max(self.slowest, took)
                if r.status not in (200, 429) and len(self.bad) < 5:
                    self.bad.append(r)
            if "close" in (r.header("connection") or "").lower():
                c.close()
                c = None
            self._halt.wait(0.003)
        if c is not None:
            c.close()

    def stop(self):
        self._halt.set()
        self.join(10 * SLOW)


def metric(bw, name):
    return metric_sum(harness.scrape(bw), name)


def redis_check(bw):
    status, doc = harness.readyz(bw)
    return status, doc, harness.readyz_check(doc, "redis")


def wait_down(instances, within):
    """Polls until every instance reports Redis down (metric 0, readiness check unhealthy) while
    /readyz stays 200 and "degraded"."""
    for bw in instances:
        def down():
            status, doc, check = redis_check(bw)
            if check["healthy"]:
                return False
            assert status == 200 and doc["ready"] is True, doc
            assert doc["status"] == "degraded", doc
            assert check["required"] is False, check
            return metric(bw, "breakwater_redis_up") == 0
        harness.wait_until(down, within, interval=0.02,
                           message="instance %d to report Redis down" % bw.n)


def wait_up(instances, within):
    for bw in instances:
        def up():
            status, doc, check = redis_check(bw)
            return (check["healthy"] and status == 200
                    and metric(bw, "breakwater_redis_up") == 1)
        harness.wait_until(up, within, interval=0.02,
                           message="instance %d to report Redis up" % bw.n)


def open_bad_on(bw):
    for _ in range(THRESHOLD):
        with Client(bw.port) as c:
            r = c.request("GET", "/bad", [("Connection", "close")])
        assert r.status == 502, r
    assert harness.breaker_state(bw, "bad") == "open"


@pytest.fixture
def redis_factory(tmp_path):
    made = []

    def make(**kw):
        r = harness.RedisServer(tmp_path, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.kill()


FAULTS = ["stopped", "slow", "killed", "restarted_empty", "connections_killed",
          "wrong_password"]


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_during_steady_traffic(fault, redis_factory, upstream, breakwater_factory):
    if fault == "wrong_password":
        redis = redis_factory(password="right-secret")
        url = "redis://:wrong-secret@127.0.0.1:%d" % redis.port
    else:
        redis = redis_factory()
        url = redis.url
    a = breakwater_factory(fault_config(upstream, url))
    b = breakwater_factory(fault_config(upstream, url))
    fleet = (a, b)
    if fault != "wrong_password":
        wait_fleet(redis, a, b)
        errors_before = [metric(bw, "breakwater_redis_errors_total") for bw in fleet]
    else:
        errors_before = [0, 0]  # refused since the start

    traffic = [Traffic(bw) for bw in fleet]
    for t in traffic:
        t.start()
    try:
        harness.wait_until(lambda: all(t.total() >= 20 for t in traffic), 10 * SLOW,
                           message="steady traffic on both instances")
        down_within = 5 * SLOW
        sleeper = None
        if fault == "stopped":
            redis.pause()
            wait_down(fleet, down_within)
            open_bad_on(a)
            redis.resume()
        elif fault == "slow":
            seconds = 2 if SLOW == 1 else int(2 * SLOW)
            sleeper = threading.Thread(
                target=lambda: redis.call("DEBUG", "SLEEP", seconds, timeout=seconds + 10),
                daemon=True)
            sleeper.start()
            wait_down(fleet, seconds)
            open_bad_on(a)
            sleeper.join(seconds + 15 * SLOW)
            assert not sleeper.is_alive()
        elif fault == "killed":
            redis.kill()
            wait_down(fleet, down_within)
            open_bad_on(a)
            redis.start()
        elif fault == "restarted_empty":
            redis.stop()
            wait_down(fleet, down_within)
            open_bad_on(a)
            redis.start()
        elif fault == "connections_killed":
            killed = int(redis.call("CLIENT", "KILL", "TYPE", "normal"))
            assert killed >= 2, "expected the connections of both instances, killed %d" % killed
            for bw, before in zip(fleet, errors_before):
                harness.wait_until(
                    lambda: metric(bw, "breakwater_redis_errors_total") > before, 5 * SLOW,
                    message="the lost connection counted on instance %d" % bw.n)
            open_bad_on(a)
        elif fault == "wrong_password":
            wait_down(fleet, down_within)
            for bw in fleet:
                harness.wait_until(
                    lambda: metric(bw, "breakwater_redis_errors_total") >= 2, 5 * SLOW,
                    message="refused AUTH counted on instance %d" % bw.n)
            open_bad_on(a)
            # The server's password becomes the one the proxies use.
            redis.call("CONFIG", "SET", "requirepass", "wrong-secret")
            redis.password = "wrong-secret"

        # -- recovery ----------------------------------------------------------------------
        wait_up(fleet, RECOVERY * SLOW)
        t_up = time.monotonic()
        harness.wait_until(lambda: harness.breaker_state(b, "bad") == "open",
                           RECOVERY * SLOW, interval=0.01,
                           message="A's breaker for 'bad' to reach B")
        took = time.monotonic() - t_up
        assert took <= 5 * INTERVAL_MS / 1000.0 * SLOW + 0.2, \
            "B applied A's breaker %.3f s after both were connected" % took
        # Each instance accepts more for the key once Redis is back, so both write it again.
        marks = [t.accepted() for t in traffic]
        harness.wait_until(lambda: all(t.accepted() > m for t, m in zip(traffic, marks)),
                           10 * SLOW, message="accepted requests on both after recovery")
    finally:
        for t in traffic:
            t.stop()
        if redis.paused:
            redis.resume()

    for t in traffic:
        assert not t.errors, (t.bw.n, t.errors[:5])
        assert set(t.statuses) <= {200, 429}, (t.statuses, t.bad)
        assert t.slowest < 1.0 * SLOW, "a request took %.3f s during the fault" % t.slowest
    accepted = [t.accepted() for t in traffic]
    for bw, before in zip(fleet, errors_before):
        assert metric(bw, "breakwater_redis_errors_total") > before, bw.n

    # After recovery the fleet's counters hold exactly what each instance accepted.
    def settled():
        pending = [metric(bw, "breakwater_redis_pending_deltas") for bw in fleet]
        got = rate_limit_fields(redis, "per_key", KEY)
        return pending == [0, 0] and sorted(got.values()) == sorted(accepted)
    try:
        harness.wait_until(settled, 10 * SLOW, interval=0.05, message="fleet counters")
    except AssertionError:
        raise AssertionError("fleet counters %r (pending %r), accepted per instance %r" % (
            rate_limit_fields(redis, "per_key", KEY),
            [metric(bw, "breakwater_redis_pending_deltas") for bw in fleet], accepted))
    for bw in fleet:
        assert harness.breaker_state(bw, "bad") == "open"
        assert metric(bw, "breakwater_redis_sync_age_seconds") < 2.0 * SLOW


def test_required_redis_fails_readiness_while_down(redis_factory, upstream,
                                                    breakwater_factory):
    redis = redis_factory()
    bw = breakwater_factory(fault_config(upstream, redis.url, required=True))
    wait_fleet(redis, bw)
    status, doc, check = redis_check(bw)
    assert status == 200 and doc["status"] == "healthy", doc
    assert check["healthy"] is True and check["required"] is True, check

    redis.kill()

    def unready():
        status, doc, check = redis_check(bw)
        return status == 503 and (doc, check)
    doc, check = harness.wait_until(unready, 5 * SLOW, interval=0.02,
                                    message="/readyz 503 while a required Redis is down")
    assert doc["ready"] is False and doc["status"] == "unhealthy", doc
    assert check["healthy"] is False and check["required"] is True, check
    assert metric(bw, "breakwater_redis_up") == 0
    # Traffic is still served from local state.
    for _ in range(3):
        with Client(bw.port) as c:
            r = c.request("GET", "/", [("X-Api-Key", KEY), ("Connection", "close")])
        assert r.status == 200, r

    redis.start()
    wait_up([bw], RECOVERY * SLOW)
    status, doc, check = redis_check(bw)
    assert status == 200 and doc["ready"] is True, doc
    assert check["healthy"] is True and check["required"] is True, check
