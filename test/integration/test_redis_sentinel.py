"""Redis Sentinel: `"redis": {"sentinels": ["HOST:PORT", ...], "master_name": "mymaster"}`
instead of `url`. The master is found through the sentinels and followed across a failover
without a restart and without a failed request; a sentinel that names an unreachable master is
retried with backoff while requests flow; configuration mistakes are reported by `-t`.

Real redis-server (master and replica) and redis-sentinel processes on free loopback ports.
"""

import json
import re
import subprocess
import threading
import time

import harness
import test_redis_fleet as fleet
from harness import Client, build_request

SLOW = harness.SLOW


def sentinel_config(up, sentinels, name="mymaster"):
    cfg = harness.base_config([up], workers=1)
    cfg["rate_limits"] = {"per_key": {"key": "header:X-Api-Key", "capacity": 1000000,
                                      "refill_per_sec": 1000000}}
    cfg["routes"] = [{"path_prefix": "/", "upstream": "api", "rate_limit": "per_key"}]
    cfg["redis"] = {"sentinels": [s.address for s in sentinels], "master_name": name,
                    "key_prefix": fleet.PREFIX, "sync_interval_ms": fleet.INTERVAL_MS,
                    "connect_timeout_ms": int(500 * SLOW), "command_timeout_ms": int(500 * SLOW)}
    return cfg


class Traffic(threading.Thread):
    """Sequential keep-alive GETs with one client key until stop(); counts non-200 answers."""

    def __init__(self, bw, key):
        super().__init__(daemon=True)
        self.bw, self.key = bw, key
        self.ok, self.bad = 0, []
        self._halt = threading.Event()

    def run(self):
        raw = build_request("GET", "/", [("X-Api-Key", self.key)])
        c = None
        while not self._halt.is_set():
            try:
                if c is None:
                    c = Client(self.bw.port)
                c.send(raw)
                r = c.read_response()
            except (harness.NoResponse, OSError) as e:
                self.bad.append(repr(e))
                c = None
                continue
            if r.status == 200:
                self.ok += 1
            else:
                self.bad.append(r.status)
            self._halt.wait(0.005)
        if c is not None:
            c.close()

    def stop(self):
        self._halt.set()
        self.join(10 * SLOW)


def delivered(redis, key):
    try:
        return sum(fleet.rate_limit_fields(redis, "per_key", key).values())
    except (OSError, harness.RedisError, ValueError):
        return None


def test_a_sentinel_failover_is_followed_without_a_restart_or_a_failed_request(
        tmp_path, upstream, breakwater_factory):
    master = harness.RedisServer(tmp_path)
    replica = harness.RedisServer(tmp_path)
    sentinel = None
    traffic = []
    try:
        assert replica.call("REPLICAOF", "127.0.0.1", str(master.port)) == "OK"
        harness.wait_until(lambda: "master_link_status:up" in replica.call("INFO", "replication"),
                           10 * SLOW, message="replica linked")
        sentinel = harness.RedisSentinel(tmp_path, master.port)
        harness.wait_until(
            lambda: len(sentinel.call("SENTINEL", "replicas", "mymaster") or []) >= 1,
            20 * SLOW, interval=0.1, message="the sentinel to know the replica")
        a = breakwater_factory(sentinel_config(upstream, [sentinel]))
        b = breakwater_factory(sentinel_config(upstream, [sentinel]))
        fleet.wait_fleet(master, a, b)
        traffic = [Traffic(a, "failover-a"), Traffic(b, "failover-b")]
        for t in traffic:
            t.start()
        harness.wait_until(lambda: (delivered(master, "failover-a") or 0) > 0, 5 * SLOW,
                           message="tokens on the first master")

        master.kill()
        t_kill = time.monotonic()
        harness.wait_until(lambda: sentinel.master_port() == replica.port, 30 * SLOW,
                           interval=0.1, message="the sentinel's failover to the replica")
        for bw in (a, b):
            bw.wait_log(r"redis: connected to 127\.0\.0\.1:%d" % replica.port, timeout=15 * SLOW)
            harness.wait_until(lambda: fleet.redis_up(bw) == 1, 10 * SLOW,
                               message="instance %d up on the new master" % bw.n)
        followed = time.monotonic() - t_kill
        # The fleet state now grows on the new master.
        base = delivered(replica, "failover-a") or 0
        harness.wait_until(lambda: (delivered(replica, "failover-a") or 0) > base, 5 * SLOW,
                           message="tokens delivered to the new master")
        harness.wait_until(lambda: (delivered(replica, "failover-b") or 0) > 0, 5 * SLOW,
                           message="B's tokens on the new master")
        for t in traffic:
            t.stop()
        for t in traffic:
            assert t.bad == [], t.bad[:5]
            assert t.ok > 0
        # Sentinel needs its down-after time (1 s) and an election; then one reconnection.
        assert followed < 15 * SLOW, "followed the failover after %.1f s" % followed
        assert a.proc.poll() is None and b.proc.poll() is None
    finally:
        for t in traffic:
            t.stop()
        if sentinel is not None:
            sentinel.kill()
        replica.kill()
        master.kill()


def test_a_sentinel_naming_an_unreachable_master_is_retried_with_backoff(
        tmp_path, upstream, breakwater_factory):
    sentinel = harness.RedisSentinel(tmp_path, harness.dead_port())
    try:
        bw = breakwater_factory(sentinel_config(upstream, [sentinel]))
        bw.wait_log(r"redis: cannot connect", timeout=10 * SLOW)

        def queries():
            info = sentinel.call("INFO", "stats")
            return int(info.split("total_connections_received:")[1].split()[0])
        q0 = queries()
        t0 = time.monotonic()
        n = 0
        with harness.KeepAliveGets(bw.port) as ka:
            while time.monotonic() < t0 + 3.0:
                r = ka.get("/", [("X-Api-Key", "unreachable-%d" % n)])
                assert r.status == 200, r
                n += 1
        made = queries() - q0
        # One query before each connect attempt, with the reconnection backoff between them
        # (not one per 100 ms round); the periodic check does not run while disconnected.
        assert made <= 10, "%d sentinel connections in 3 s" % made
        assert fleet.redis_up(bw) == 0
        assert bw.proc.poll() is None
    finally:
        sentinel.kill()


def test_sentinel_configuration_mistakes_are_reported(tmp_path, upstream):
    cases = [
        ({"sentinels": ["127.0.0.1:26379"]}, r"redis.master_name: required with redis.sentinels"),
        ({"sentinels": ["not-an-address"], "master_name": "m"},
         r"redis.sentinels\[0\]: \"not-an-address\" is not HOST:PORT"),
        ({"sentinels": [], "master_name": "m"}, r"redis.sentinels: must be a non-empty array"),
        ({"sentinels": ["127.0.0.1:26379"], "master_name": "m", "url": "redis://127.0.0.1:1"},
         r"redis.url: give either url or sentinels"),
        ({"url": "redis://127.0.0.1:1", "master_name": "m"},
         r"redis.master_name: only meaningful with redis.sentinels"),
        ({"sentinels": ["127.0.0.1:26379"], "master_name": "m", "password_env": "BW_NO_SUCH_VAR"},
         r"redis.password_env: the environment variable BW_NO_SUCH_VAR is not set"),
    ]
    for i, (redis, want) in enumerate(cases):
        cfg = harness.base_config([upstream])
        cfg["redis"] = redis
        path = tmp_path / ("sentinel-check-%d.json" % i)
        path.write_text(json.dumps(cfg, indent=2))
        out = subprocess.run([str(harness.binary_path()), "-t", "-c", str(path)],
                             capture_output=True, timeout=30 * SLOW)
        text = out.stdout.decode() + out.stderr.decode()
        assert out.returncode != 0, (redis, text)
        assert re.search(r"%s:\d+:\d+: %s" % (re.escape(str(path)), want), text), (redis, text)
