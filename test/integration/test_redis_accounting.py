"""Rate-limit accounting through Redis outages, slot reuse, idleness and clock skew.

- Tokens taken while Redis is down are kept by the master (even when the table reuses their
  slots for other keys) and charged to the fleet once Redis is back: each key's fleet hash ends
  up holding exactly the requests the instance accepted for it.
- A key of a policy with `refill_per_sec: 0` never expires in Redis and stays exhausted on every
  instance that has seen it.
- Heartbeats use Redis' clock: an instance whose clock is far ahead is not taken for stale by
  the others (nor they by it), so the live count stays right.
"""

import glob
import socket
import threading
import os
import time

import pytest

import harness
import test_redis_fleet as fleet
from harness import Client, build_request, metric_sum
from test_redis_fleet import redis_server  # noqa: F401  (the fixture)

SLOW = harness.SLOW


def limited_config(upstream, redis, capacity, refill, table_size=None, workers=1):
    cfg = fleet.fleet_config([upstream], redis, rate_limit={
        "key": "header:X-Api-Key", "capacity": capacity, "refill_per_sec": refill})
    cfg["workers"] = workers
    if table_size is not None:
        cfg["rate_limit_table_size"] = table_size
    return cfg


def one(bw, key):
    with Client(bw.port) as c:
        c.send(build_request("GET", "/", [("X-Api-Key", key), ("Connection", "close")]))
        return c.read_response().status


def delivered(redis, key):
    return fleet.rate_limit_fields(redis, "per_key", key)


def test_tokens_taken_while_redis_is_down_are_charged_after_even_when_slots_are_reused(
        redis_server, upstream, breakwater_factory):
    # A 16-entry table and 60 keys: most slots change hands while Redis is away.
    bw = breakwater_factory(limited_config(upstream, redis_server, capacity=2, refill=50,
                                           table_size=16))
    fleet.wait_fleet(redis_server, bw)
    redis_server.stop()
    harness.wait_until(lambda: fleet.redis_up(bw) == 0, 5 * SLOW, message="redis down")
    keys = ["outage-%d" % i for i in range(60)]
    t0 = time.monotonic()
    for i, k in enumerate(keys):
        # At most a few keys per sync interval, so that each slot is idle again (its bucket
        # full, its tokens collected by the master) before the table needs it: only reuse, no
        # forced eviction, is exercised here.
        while time.monotonic() < t0 + i * 0.04 * SLOW:
            time.sleep(0.005)
        assert one(bw, k) == 200
    harness.wait_until(
        lambda: metric_sum(harness.scrape(bw), "breakwater_redis_pending_deltas") == len(keys),
        5 * SLOW, message="every token held for delivery")
    assert metric_sum(harness.scrape(bw), "breakwater_rate_limit_evictions_total") == 0

    redis_server.start()
    harness.wait_until(lambda: fleet.redis_up(bw) == 1, 10 * SLOW, message="redis back")
    harness.wait_until(
        lambda: metric_sum(harness.scrape(bw), "breakwater_redis_pending_deltas") == 0,
        10 * SLOW, message="every token acknowledged")
    for k in keys:
        got = delivered(redis_server, k)
        assert list(got.values()) == [1], (k, got)


def test_refill_zero_key_never_expires_and_stays_exhausted_on_every_instance(
        redis_server, upstream_factory, breakwater_factory):
    up = upstream_factory(fleet.Switch("ok"))
    a = breakwater_factory(limited_config(up, redis_server, capacity=3, refill=0))
    b = breakwater_factory(limited_config(up, redis_server, capacity=3, refill=0))
    fleet.wait_fleet(redis_server, a, b)
    assert [one(a, "once") for _ in range(4)] == [200, 200, 200, 429]
    assert one(b, "once") in (200, 429)  # B may admit before it has heard of the key
    fleet.wait_rounds(a, b)
    fleet.wait_rounds(a, b)
    key = "%s:rate-limit:per_key:%s" % (fleet.PREFIX, fleet.header_key_name("once"))
    h = harness.redis_hash(redis_server, key)
    assert int(h["taken"]) == sum(delivered(redis_server, "once").values()) >= 3, h
    # No expiry at all: "never refills" must not become "refills after a minute of idleness".
    assert redis_server.call("PTTL", key) == -1
    for bw in (a, b):
        for _ in range(3):
            assert one(bw, "once") == 429


LIBFAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))


@pytest.mark.skipif(not LIBFAKETIME or harness.SANITIZED,
                    reason="needs libfaketime (and no sanitizer runtime to preload first)")
def test_heartbeats_use_redis_time_so_a_skewed_clock_does_not_prune_instances(
        redis_server, upstream_factory, breakwater_factory):
    up = upstream_factory(fleet.Switch("ok"))
    a = breakwater_factory(limited_config(up, redis_server, capacity=5, refill=1))
    skew = {"LD_PRELOAD": LIBFAKETIME[0], "FAKETIME": "+30s", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_NO_CACHE": "1"}
    b = breakwater_factory(limited_config(up, redis_server, capacity=5, refill=1),
                           env=dict(os.environ, **skew))
    fleet.wait_fleet(redis_server, a, b)
    members = redis_server.call("ZRANGE", "%s:instances" % fleet.PREFIX, "0", "-1", "WITHSCORES")
    secs, micros = redis_server.call("TIME")
    now_ms = int(secs) * 1000 + int(micros) // 1000
    scores = [float(s) for s in members[1::2]]
    assert len(scores) == 2 and all(abs(s - now_ms) < 5000 for s in scores), (members, now_ms)
    for _ in range(3):
        fleet.wait_rounds(a, b)
        assert redis_server.call("ZCARD", "%s:instances" % fleet.PREFIX) == 2


def test_tokens_of_busy_keys_forced_out_of_a_full_table_are_counted_not_hidden(
        redis_server, upstream, breakwater_factory):
    # Buckets that never get idle (slow refill) in a 16-entry table: new keys force busy ones
    # out, some before the master has collected their token. Every token is then either
    # delivered to the fleet or counted as lost.
    bw = breakwater_factory(limited_config(upstream, redis_server, capacity=5, refill=0.001,
                                           table_size=16))
    fleet.wait_fleet(redis_server, bw)
    redis_server.stop()
    harness.wait_until(lambda: fleet.redis_up(bw) == 0, 5 * SLOW, message="redis down")
    keys = ["busy-%d" % i for i in range(200)]
    with harness.KeepAliveGets(bw.port) as ka:
        for k in keys:
            r = ka.get("/", [("X-Api-Key", k)])
            assert r.status == 200, r
    redis_server.start()
    harness.wait_until(lambda: fleet.redis_up(bw) == 1, 10 * SLOW, message="redis back")
    # The pending figure can be 0 before the master's first round after the outage has even
    # collected what is still in the table, so wait for the accounting itself to add up.
    seen = {}

    def accounted():
        samples = harness.scrape(bw)
        seen["samples"] = samples
        seen["lost"] = metric_sum(samples, "breakwater_rate_limit_owed_tokens_lost_total")
        seen["got"] = sum(sum(delivered(redis_server, k).values()) for k in keys)
        pending = metric_sum(samples, "breakwater_redis_pending_deltas")
        return (seen["lost"] is not None and pending == 0 and
                seen["got"] + seen["lost"] == len(keys))
    try:
        harness.wait_until(accounted, 10 * SLOW, message="every token delivered or counted lost")
    except AssertionError:
        raise AssertionError("delivered %r, lost %r of %d" % (seen.get("got"), seen.get("lost"),
                                                                len(keys)))
    samples = seen["samples"]
    evicted = metric_sum(samples, "breakwater_rate_limit_evictions_total")
    owed = metric_sum(samples, "breakwater_rate_limit_owed_evictions_total")
    assert evicted > 0 and owed is not None, samples
    assert owed <= evicted


def test_an_outage_of_any_length_keeps_the_master_bounded_and_counts_what_it_gives_up(
        redis_server, upstream, breakwater_factory):
    # Keys that go idle quickly in a 1,024-entry table: slots are reused over and over while
    # Redis is down, and each record with undelivered tokens moves to the master's list of
    # undelivered keys, which holds at most max(1,024, table entries). 3,000 keys overflow it:
    # the oldest are given up and counted; everything else is delivered once Redis is back.
    bw = breakwater_factory(limited_config(upstream, redis_server, capacity=2, refill=50,
                                           table_size=1024))
    fleet.wait_fleet(redis_server, bw)
    redis_server.stop()
    harness.wait_until(lambda: fleet.redis_up(bw) == 0, 5 * SLOW, message="redis down")
    rss0 = bw.proc_status(bw.proc.pid, "VmRSS")
    keys = ["long-outage-%d" % i for i in range(3000)]
    with harness.KeepAliveGets(bw.port) as ka:
        for k in keys:
            r = ka.get("/", [("X-Api-Key", k)])
            assert r.status == 200, r
    harness.wait_until(
        lambda: metric_sum(harness.scrape(bw), "breakwater_rate_limit_owed_evictions_total") > 0,
        5 * SLOW, message="undelivered keys given up")
    rss1 = bw.proc_status(bw.proc.pid, "VmRSS")
    assert rss1 - rss0 < 4096, "master RSS grew by %d kB during the outage" % (rss1 - rss0)
    redis_server.start()
    harness.wait_until(lambda: fleet.redis_up(bw) == 1, 10 * SLOW, message="redis back")
    harness.wait_until(
        lambda: metric_sum(harness.scrape(bw), "breakwater_redis_pending_deltas") == 0,
        20 * SLOW, message="every held token acknowledged")
    lost = metric_sum(harness.scrape(bw), "breakwater_rate_limit_owed_tokens_lost_total")
    with redis_server.client(timeout=30) as c:
        got = 0
        for k in keys:
            flat = c.call("HGETALL", "%s:rate-limit:per_key:%s" % (fleet.PREFIX,
                                                                   fleet.header_key_name(k)))
            got += sum(int(v.split(":")[1]) for f, v in zip(flat[0::2], flat[1::2])
                       if f not in ("tat", "taken"))
    assert got + lost == len(keys), (got, lost)
    assert lost > 0 and got >= 1024, (got, lost)


class ReplyEater:
    """A TCP relay in front of Redis that, from the first command mentioning `trigger` on,
    swallows every reply while still passing commands on: that command lands in Redis but its
    reply is lost. Switching back closes the relayed connections (their reply streams have
    holes), so the instance reconnects cleanly."""

    def __init__(self, redis_port):
        self.redis_port = redis_port
        self.eat = False
        self.trigger = None
        self.conns = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                r = socket.create_connection(("127.0.0.1", self.redis_port), timeout=5)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, r]
            threading.Thread(target=self._pump, args=(c, r, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(r, c, True), daemon=True).start()

    def _pump(self, src, dst, replies):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not replies and self.trigger is not None and self.trigger in data:
                    self.eat = True
                if not (replies and self.eat):
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def pass_replies(self):
        self.trigger = None
        self.eat = False
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.closed = True
        self.sock.close()
        self.pass_replies()


def test_a_flush_whose_reply_was_lost_is_not_charged_again_after_the_key_expired(
        redis_server, upstream, breakwater_factory, tmp_path):
    relay = ReplyEater(redis_server.port)
    try:
        cfg = limited_config(upstream, redis_server, capacity=10, refill=5)
        cfg["redis"]["url"] = "redis://127.0.0.1:%d" % relay.port
        bw = breakwater_factory(cfg)
        fleet.wait_fleet(redis_server, bw)
        key = "%s:rate-limit:per_key:%s" % (fleet.PREFIX, fleet.header_key_name("lost-reply"))
        relay.trigger = key.encode()
        for _ in range(5):
            assert one(bw, "lost-reply") == 200
        # The flush lands (5 tokens: a second of refill), its reply never arrives.
        harness.wait_until(lambda: list(delivered(redis_server, "lost-reply").values()) == [5],
                           5 * SLOW, message="the flush landed in Redis")
        t_landed = time.monotonic()
        harness.wait_until(lambda: fleet.redis_up(bw) == 0, 5 * SLOW,
                           message="the instance gave the silent connection up")
        # The key expires (deleted here: expiry is just that), and the tokens are long paid back
        # by the time the instance can retry: what is tested depends on elapsed time itself.
        redis_server.call("DEL", key)
        harness.wait_until(lambda: time.monotonic() > t_landed + 2.0, 10, interval=0.05,
                           message="two seconds after the flush")
        # Two more tokens meanwhile: they are new, and are charged (0.4 s of refill).
        for _ in range(2):
            assert one(bw, "lost-reply") == 200
        relay.pass_replies()
        harness.wait_until(lambda: fleet.redis_up(bw) == 1, 15 * SLOW, message="reconnected")
        harness.wait_until(
            lambda: metric_sum(harness.scrape(bw), "breakwater_redis_pending_deltas") == 0,
            10 * SLOW, message="the retry acknowledged")
        assert list(delivered(redis_server, "lost-reply").values()) == [7]
        secs, micros = redis_server.call("TIME")
        now_us = int(secs) * 1000000 + int(micros)
        tat = int(redis_server.call("HGET", key, "tat") or 0)
        # Only the 2 new tokens count (at most 0.4 s ahead); the 5 lost-reply ones charged
        # again would put the fleet's bucket 1.4 s ahead.
        assert tat - now_us <= 450000, "the retried flush was charged again: %d us ahead" % (
            tat - now_us)
    finally:
        relay.close()
