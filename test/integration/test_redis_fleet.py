"""Fleet state through Redis, with two breakwater instances (A and B: separate processes and
configurations, the same Redis and key prefix) and a real redis-server started by the test.

- A breaker opened by failures behind A opens on B within three sync intervals, without B's
  upstream seeing a request; `redis-cli DEL` of the breaker's record, or POST
  /upstreams/NAME/reset on either instance, closes it on both.
- One client key driven hard through both instances for 10 s is limited as if there were one
  instance: about C + R x 10 accepted in total, not twice that.
- The redis_* metrics exist exactly when a redis section is configured.

docs/redis.md describes the key layout the assertions read: the hash
{prefix}:circuit-breaker:{upstream} (state, failures, opened_at_ms, updated_by, ...) and the hash
{prefix}:rate-limit:{policy}:{key}, where each instance keeps one field "<incarnation>:<tokens>"
holding the cumulative number of tokens it has delivered for that key ({key} of a header:NAME
policy is "h-" and the first 32 hex digits of the SHA-256 of the header value).
"""

import hashlib
import json
import re
import threading
import time

import pytest

import harness
from harness import Client, build_request, metric_sum, respond

SLOW = harness.SLOW
INTERVAL_MS = 100
PREFIX = "bwfleet"


class Switch:
    """Upstream handler the test flips between "ok" (200) and "fail" (503 from the upstream)."""

    def __init__(self, mode="ok"):
        self.mode = mode

    def __call__(self, req, conn):
        if self.mode == "fail":
            return respond(503, b"upstream says unavailable", [("Content-Type", "text/plain")])
        return respond(200, b"upstream ok", [("Content-Type", "text/plain"),
                                             ("X-Upstream-Port", str(conn.upstream.port))])


@pytest.fixture
def redis_server(tmp_path):
    r = harness.RedisServer(tmp_path)
    yield r
    r.kill()


def fleet_config(servers, redis, threshold=3, rate_limit=None, **overrides):
    """One worker, upstream "api" (no retries, breaker opening after `threshold` failures and
    staying open for a minute), route "/" -> api, redis at `redis` with a short interval."""
    cfg = harness.base_config(servers, workers=1, upstreams={"api": {
        "retries": 0,
        "circuit_breaker": {"failure_threshold": threshold, "reset_timeout_ms": 60000}}})
    cfg["redis"] = {"url": redis.url, "key_prefix": PREFIX, "sync_interval_ms": INTERVAL_MS,
                    "connect_timeout_ms": int(500 * SLOW), "command_timeout_ms": int(500 * SLOW)}
    if rate_limit is not None:
        cfg["rate_limits"] = {"per_key": rate_limit}
        cfg["routes"] = [{"path_prefix": "/", "upstream": "api", "rate_limit": "per_key"}]
        cfg["trusted_proxies"] = ["127.0.0.1/32"]
    return harness._merge(cfg, overrides)


def redis_up(bw):
    return metric_sum(harness.scrape(bw), "breakwater_redis_up")


def wait_fleet(redis, *instances, timeout=10.0):
    """Waits until every instance is connected and has completed a sync round after all of them
    had announced themselves in {prefix}:instances (so each knows the size of the fleet)."""
    for bw in instances:
        harness.wait_until(lambda: redis_up(bw) == 1, timeout * SLOW, interval=0.05,
                           message="breakwater_redis_up 1 on instance %d" % bw.n)
    key = "%s:instances" % PREFIX
    harness.wait_until(lambda: redis.call("ZCARD", key) >= len(instances), timeout * SLOW,
                       interval=0.02, message="%d instances in %s" % (len(instances), key))
    wait_rounds(*instances, timeout=timeout)


def wait_rounds(*instances, timeout=10.0):
    """Waits until every instance has completed a sync round that began after this call (the
    end of its last successful round, now - breakwater_redis_sync_age_seconds, is later)."""
    since = time.time()

    def synced(bw):
        age = metric_sum(harness.scrape(bw), "breakwater_redis_sync_age_seconds")
        return age is not None and time.time() - age > since + INTERVAL_MS / 1000.0
    for bw in instances:
        harness.wait_until(lambda: synced(bw), timeout * SLOW, interval=0.02,
                           message="a full sync round of instance %d" % bw.n)


def fresh(bw, target="/", headers=None):
    with Client(bw.port) as c:
        c.send(build_request("GET", target, list(headers or []) + [("Connection", "close")]))
        return c.read_response()


def assert_circuit_open(r):
    assert r.status == 503, r
    assert json.loads(r.body) == {"error": "circuit open", "upstream": "api"}, r.body
    assert r.header("retry-after", "").isdigit(), r.headers


def breaker_key(upstream="api"):
    return "%s:circuit-breaker:%s" % (PREFIX, upstream)


def open_on_a(a, up_a, sw_a, threshold=3):
    """Makes A's upstream fail `threshold` requests; returns the moment the last failure was
    answered (A's breaker is open from then on)."""
    sw_a.mode = "fail"
    for _ in range(threshold):
        r = fresh(a)
        assert r.status == 503 and r.body == b"upstream says unavailable", r
    t_open = time.monotonic()
    assert harness.breaker_state(a, "api") == "open"
    return t_open


def wait_state(bw, state, timeout):
    return harness.wait_until(lambda: harness.breaker_state(bw, "api") == state, timeout,
                              interval=0.01,
                              message="breaker api %s on instance %d" % (state, bw.n))


def two_instances(redis, upstream_factory, breakwater_factory):
    sw_a = Switch("ok")
    up_a = upstream_factory(sw_a)
    up_b = upstream_factory(Switch("ok"))
    a = breakwater_factory(fleet_config([up_a], redis))
    b = breakwater_factory(fleet_config([up_b], redis))
    wait_fleet(redis, a, b)
    return a, b, up_a, up_b, sw_a


# -- breakers ---------------------------------------------------------------------------------

def test_breaker_opened_behind_one_instance_opens_on_the_other_within_three_intervals(
        redis_server, upstream_factory, breakwater_factory):
    a, b, up_a, up_b, sw_a = two_instances(redis_server, upstream_factory, breakwater_factory)
    assert harness.breaker_state(b, "api") == "closed"
    t_open = open_on_a(a, up_a, sw_a)
    wait_state(b, "open", 5 * SLOW)
    took = time.monotonic() - t_open
    bound = 3 * INTERVAL_MS / 1000.0 * SLOW
    assert took <= bound, "B's breaker opened %.3f s after A's (bound %.3f s)" % (took, bound)

    # B refuses at once and its own (healthy) upstream sees nothing.
    n_req, n_conn = len(up_b.all_requests), up_b.connections
    for _ in range(3):
        assert_circuit_open(fresh(b))
    assert len(up_b.all_requests) == n_req and up_b.connections == n_conn
    assert harness.upstream_state(b, "api")["circuit_breaker"]["rejected"] >= 3

    # The record operators read with HGETALL.
    rec = harness.redis_hash(redis_server, breaker_key())
    assert rec.get("state") == "open", rec
    assert rec.get("failures", "").isdigit(), rec
    assert rec.get("opened_at_ms", "").isdigit() and int(rec["opened_at_ms"]) > 0, rec
    assert rec.get("updated_by"), rec
    opened_at = int(rec["opened_at_ms"]) / 1000.0
    assert abs(opened_at - time.time()) < 60, rec


def test_redis_cli_del_resets_the_breaker_on_every_instance(redis_server, upstream_factory,
                                                            breakwater_factory):
    a, b, up_a, up_b, sw_a = two_instances(redis_server, upstream_factory, breakwater_factory)
    open_on_a(a, up_a, sw_a)
    wait_state(b, "open", 5 * SLOW)
    sw_a.mode = "ok"
    assert redis_server.cli("DEL", breaker_key()) == "1"
    deadline = 5 * INTERVAL_MS / 1000.0 * SLOW + 1.0
    wait_state(a, "closed", deadline)
    wait_state(b, "closed", deadline)
    for bw, up in ((a, up_a), (b, up_b)):
        n = len(up.requests)
        r = fresh(bw, "/after-del")
        assert (r.status, r.body) == (200, b"upstream ok"), r
        assert len(up.requests) == n + 1
    # Nothing brings the old record back: the breakers stay closed on both.
    wait_rounds(a, b)
    rec = harness.redis_hash(redis_server, breaker_key())
    assert rec.get("state", "closed") == "closed", rec
    assert harness.breaker_state(a, "api") == harness.breaker_state(b, "api") == "closed"


@pytest.mark.parametrize("where", ["A", "B"])
def test_admin_reset_on_one_instance_resets_every_instance(where, redis_server,
                                                           upstream_factory,
                                                           breakwater_factory):
    a, b, up_a, up_b, sw_a = two_instances(redis_server, upstream_factory, breakwater_factory)
    open_on_a(a, up_a, sw_a)
    wait_state(b, "open", 5 * SLOW)
    sw_a.mode = "ok"
    target = a if where == "A" else b
    r = harness.admin_request(target, "POST", "/upstreams/api/reset")
    assert r.status == 200, r
    assert r.json()["circuit_breaker"]["state"] == "closed", r.body
    deadline = 5 * INTERVAL_MS / 1000.0 * SLOW + 1.0
    wait_state(a, "closed", deadline)
    wait_state(b, "closed", deadline)
    # And it stays so once the fleet has exchanged state again (no instance re-imposes "open").
    wait_rounds(a, b)
    assert harness.breaker_state(a, "api") == "closed"
    assert harness.breaker_state(b, "api") == "closed"
    rec = harness.redis_hash(redis_server, breaker_key())
    assert rec.get("state", "closed") == "closed", rec
    for bw in (a, b):
        r = fresh(bw, "/after-reset")
        assert (r.status, r.body) == (200, b"upstream ok"), r


# -- rate limits ------------------------------------------------------------------------------

def header_key_name(value):
    """The fleet name of a header:NAME client key: "h-" and 32 hex digits of its SHA-256."""
    return "h-" + hashlib.sha256(value.encode()).hexdigest()[:32]


def rate_limit_fields(redis, policy, header_value):
    """{instance: tokens delivered} from the fleet hash of one header-keyed client."""
    key = "%s:rate-limit:%s:%s" % (PREFIX, policy, header_key_name(header_value))
    h = harness.redis_hash(redis, key)
    out = {}
    for field, value in h.items():
        m = re.fullmatch(r"(\d+):(\d+)", value)
        if field not in ("tat", "taken") and m:
            out[field] = int(m.group(2))
    return out


class Driver(threading.Thread):
    """Sequential GETs with one client key on keep-alive connections to one instance, from
    `start` (a barrier) until `until` (monotonic); counts answers by status."""

    def __init__(self, bw, key, barrier, duration):
        super().__init__(daemon=True)
        self.bw, self.key, self.barrier, self.duration = bw, key, barrier, duration
        self.statuses = {}
        self.errors = []
        self.t0 = self.t1 = None

    def run(self):
        c = None
        raw = build_request("GET", "/", [("X-Api-Key", self.key)])
        try:
            self.barrier.wait(10 * SLOW)
            self.t0 = time.monotonic()
            end = self.t0 + self.duration
            while time.monotonic() < end:
                if c is None:
                    c = Client(self.bw.port)
                try:
                    c.send(raw)
                    r = c.read_response()
                except (harness.NoResponse, OSError) as e:
                    self.errors.append(repr(e))
                    c.close()
                    c = None
                    continue
                self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
                if "close" in (r.header("connection") or "").lower():
                    c.close()
                    c = None
            self.t1 = time.monotonic()
        except Exception as e:  # reported by the test
            self.errors.append(repr(e))
        finally:
            if c is not None:
                c.close()


def test_one_client_through_two_instances_is_limited_as_one(redis_server, upstream,
                                                           breakwater_factory):
    C, R, SECONDS = 20, 10, 10.0
    policy = {"key": "header:X-Api-Key", "capacity": C, "refill_per_sec": R}
    a = breakwater_factory(fleet_config([upstream], redis_server, rate_limit=policy))
    b = breakwater_factory(fleet_config([upstream], redis_server, rate_limit=policy))
    wait_fleet(redis_server, a, b)

    barrier = threading.Barrier(2)
    drivers = [Driver(bw, "fleet-client-1", barrier, SECONDS) for bw in (a, b)]
    for d in drivers:
        d.start()
    for d in drivers:
        d.join(SECONDS + 30 * SLOW)
        assert not d.is_alive(), "a traffic thread did not finish"
    for d in drivers:
        assert not d.errors, d.errors[:5]
        assert set(d.statuses) <= {200, 429}, d.statuses
        # Both instances were asked far more often than they could accept.
        assert d.statuses.get(429, 0) > 2 * C, d.statuses
    elapsed = max(d.t1 for d in drivers) - min(d.t0 for d in drivers)
    accepted = sum(d.statuses.get(200, 0) for d in drivers)
    expected = C + R * elapsed
    # Tolerance: 5 % of the expectation, plus what can refill during one sync interval on each
    # of the two instances (both may hand out the same newly refilled token before either hears
    # of the other). Independent instances would accept about 2 x expected.
    tolerance = 0.05 * expected + 2 * R * INTERVAL_MS / 1000.0
    per = [d.statuses.get(200, 0) for d in drivers]
    assert abs(accepted - expected) <= tolerance, \
        "accepted %d (A %d, B %d) in %.2f s; expected %.1f +- %.1f" % (
            accepted, per[0], per[1], elapsed, expected, tolerance)
    assert accepted < 1.5 * expected, (accepted, expected)

    # The fleet's counters hold exactly what each instance accepted.
    def settled():
        pending = [metric_sum(harness.scrape(bw), "breakwater_redis_pending_deltas")
                   for bw in (a, b)]
        got = rate_limit_fields(redis_server, "per_key", "fleet-client-1")
        return pending == [0, 0] and sorted(got.values()) == sorted(per) and got
    try:
        harness.wait_until(settled, 10 * SLOW, interval=0.05, message="fleet counters")
    except AssertionError:
        raise AssertionError("fleet counters %r, accepted per instance %r" % (
            rate_limit_fields(redis_server, "per_key", "fleet-client-1"), per))


# -- metrics ----------------------------------------------------------------------------------

REDIS_METRICS = {
    "breakwater_redis_up": "gauge",
    "breakwater_redis_sync_age_seconds": "gauge",
    "breakwater_redis_errors_total": "counter",
    "breakwater_redis_pending_deltas": "gauge",
}


def metric_types(text):
    return dict(re.findall(r"(?m)^# TYPE (\S+) (\S+)$", text))


def test_redis_metrics_present_with_a_redis_section(redis_server, upstream, breakwater_factory):
    bw = breakwater_factory(fleet_config([upstream], redis_server))
    wait_fleet(redis_server, bw)
    r = harness.admin_request(bw, "GET", "/metrics")
    assert r.status == 200, r
    text = r.body.decode()
    types = metric_types(text)
    for name, kind in REDIS_METRICS.items():
        assert types.get(name) == kind, (name, types.get(name))
    samples = harness.parse_metrics(text)
    assert metric_sum(samples, "breakwater_redis_up") == 1
    assert 0 <= metric_sum(samples, "breakwater_redis_sync_age_seconds") < 2.0 * SLOW
    assert metric_sum(samples, "breakwater_redis_errors_total") == 0
    assert metric_sum(samples, "breakwater_redis_pending_deltas") == 0
    status, doc = harness.readyz(bw)
    assert status == 200, doc
    check = harness.readyz_check(doc, "redis")
    assert check["healthy"] is True and check["required"] is False, check


def test_redis_metrics_with_redis_configured_but_unreachable(upstream, breakwater_factory,
                                                             tmp_path):
    port = harness.dead_port()
    cfg = harness.base_config([upstream], redis={
        "url": "redis://127.0.0.1:%d" % port, "key_prefix": PREFIX,
        "sync_interval_ms": INTERVAL_MS, "connect_timeout_ms": 300})
    bw = breakwater_factory(cfg)
    harness.wait_until(
        lambda: (metric_sum(harness.scrape(bw), "breakwater_redis_errors_total") or 0) >= 1,
        5 * SLOW, message="a counted connection error")
    samples = harness.scrape(bw)
    assert metric_sum(samples, "breakwater_redis_up") == 0
    assert metric_sum(samples, "breakwater_redis_sync_age_seconds") == float("inf")
    assert metric_sum(samples, "breakwater_redis_pending_deltas") == 0
    status, doc = harness.readyz(bw)
    assert status == 200, doc
    check = harness.readyz_check(doc, "redis")
    assert check["healthy"] is False and check["required"] is False, check
    assert doc["status"] == "degraded", doc
    r = fresh(bw)
    assert r.status == 200, r


def test_no_redis_metrics_without_a_redis_section(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream]))
    r = harness.admin_request(bw, "GET", "/metrics")
    assert r.status == 200, r
    text = r.body.decode()
    for name in REDIS_METRICS:
        assert name not in text, name
    assert "breakwater_redis" not in text
    status, doc = harness.readyz(bw)
    assert status == 200, doc
    assert all(c["name"] != "redis" for c in doc["checks"]), doc
