"""DNS-named upstream servers, against a DNS server of the test's own (dnsserver.py) on a
loopback port behind top-level "resolvers".

Every A/AAAA address is a server (upstreams listen on 127.0.0.2, 127.0.0.3, ... with one port),
the set follows the answers at run time, a server that leaves is drained (its request in flight
finishes), failed lookups (no answer, garbage, truncated, NXDOMAIN) keep the last good set and
are logged, counted and shown, short TTLs are respected, and an upstream with no address yet
answers 503 "no servers".
"""

import json
import subprocess
import threading
import time

import harness
from dnsserver import DnsServer
from harness import Client, build_request, respond

SLOW = harness.SLOW


class Tagged:
    """Upstream handler answering with its own address; hold() makes the next request wait."""

    def __init__(self, name):
        self.name = name
        self.served = 0
        self.gate = None
        self.arrived = threading.Event()

    def __call__(self, req, conn):
        self.served += 1
        gate = self.gate
        if gate is not None:
            self.arrived.set()
            while not gate.is_set():
                if not conn.sleep(0.05):
                    return None
        return respond(200, self.name.encode(), [("Content-Type", "text/plain")])


def dns_config(dns, servers, **up):
    u = {"servers": servers, "retries": 1, "resolve_interval_ms": int(300 * SLOW)}
    u.update(up)
    cfg = harness.base_config(["127.0.0.1:1"], workers=2, upstreams={"api": u},
                              resolvers=[dns.address],
                              resolver_timeout_ms=int(200 * SLOW), resolver_attempts=1)
    cfg["upstreams"]["api"]["servers"] = servers
    return cfg


def one(bw, target="/"):
    with Client(bw.port) as c:
        c.send(build_request("GET", target, [("Connection", "close")]))
        return c.read_response()


def addresses(bw):
    return sorted(s["address"] for s in harness.upstream_state(bw, "api")["servers"])


def dns_doc(bw):
    return harness.upstream_state(bw, "api")["dns"]


def two_servers():
    a = harness.upstream_on("127.0.0.2", Tagged("a"))
    b = harness.upstream_on("127.0.0.3", Tagged("b"), port=a.port)
    return a, b


def test_every_address_is_a_server_and_the_set_follows_dns(breakwater_factory):
    a, b = two_servers()
    with DnsServer().start() as dns:
        dns.set("api.test", ["127.0.0.2", "127.0.0.3"], ttl=30)
        bw = breakwater_factory(dns_config(dns, ["api.test:%d" % a.port]))
        harness.wait_until(lambda: addresses(bw) == [a.address, b.address], 10 * SLOW,
                           message="both resolved servers in /upstreams")
        bodies = {one(bw).body for _ in range(8)}
        assert bodies == {b"a", b"b"}, bodies
        d = dns_doc(bw)
        assert d["resolved_at"] is not None and d["last_error"] is None, d
        # The record loses an address: that server leaves the set, with a request in flight.
        a.handler.gate = threading.Event()
        results = []
        in_flight = []

        def send_until_a():
            # Round robin over two: one of two requests lands on a.
            for _ in range(4):
                c = Client(bw.port)
                c.send(build_request("GET", "/slow", [("Connection", "close")]))
                in_flight.append(c)
                if a.handler.arrived.wait(1.0 * SLOW):
                    return
        send_until_a()
        assert a.handler.arrived.is_set(), "no request reached server a"
        dns.set("api.test", ["127.0.0.3"], ttl=30)
        harness.wait_until(lambda: addresses(bw) == [b.address], 10 * SLOW,
                           message="server a to leave the set")
        bw.wait_log(r"upstream api: 1 server\(s\) after resolution: -127\.0\.0\.2:%d" % a.port)
        a.handler.gate.set()
        for c in in_flight:
            results.append(c.read_response(timeout=10 * SLOW))
            c.close()
        assert all(r.status == 200 for r in results), results
        assert b"a" in {r.body for r in results}, "the drained server's request did not finish"
        served_a = a.handler.served
        assert {one(bw).body for _ in range(6)} == {b"b"}
        assert a.handler.served == served_a
        harness.wait_until(lambda: a.active_connections == 0, 5 * SLOW,
                           message="connections to the removed server to close")
    a.stop()
    b.stop()


def test_failed_lookups_keep_the_last_good_set(breakwater_factory):
    a, b = two_servers()
    with DnsServer().start() as dns:
        dns.set("api.test", ["127.0.0.2", "127.0.0.3"], ttl=1)
        bw = breakwater_factory(dns_config(dns, ["api.test:%d" % a.port]))
        harness.wait_until(lambda: len(addresses(bw)) == 2, 10 * SLOW, message="resolution")
        errors = 0
        for mode, message in (("silent", "request timed out"), ("garbage", None),
                              ("truncated", "reply truncated or ill-formed"),
                              ("nxdomain", "name does not exist"),
                              ("servfail", None)):
            dns.mode = mode
            harness.wait_until(lambda: dns_doc(bw)["errors"] > errors, 10 * SLOW,
                               message="a failed lookup in mode %s" % mode)
            d = dns_doc(bw)
            errors = d["errors"]
            assert d["last_error"]["server"] == "api.test:%d" % a.port, d
            if message:
                assert d["last_error"]["message"] == message, d
            assert addresses(bw) == [a.address, b.address], mode
            assert one(bw).status == 200
        samples = harness.scrape(bw)
        assert harness.metric_sum(samples, "breakwater_dns_errors_total", upstream="api") >= 5
        bw.wait_log(r"upstream api: cannot resolve api\.test:%d: .*; keeping its last 2 "
                    r"address\(es\)" % a.port)
        dns.mode = "normal"
        harness.wait_until(lambda: dns_doc(bw)["last_error"] is None, 10 * SLOW,
                           message="a good lookup again")
        assert bw.running()
    a.stop()
    b.stop()


def test_no_address_yet_answers_503_and_recovers(breakwater_factory, bw_bin, tmp_path):
    up = harness.upstream_on("127.0.0.2", Tagged("a"))
    with DnsServer().start() as dns:
        cfg = dns_config(dns, ["late.test:%d" % up.port])
        bw = breakwater_factory(cfg)
        harness.wait_until(lambda: dns_doc(bw)["last_error"] is not None, 10 * SLOW,
                           message="the failed first lookup")
        r = one(bw)
        assert r.status == 503, r
        assert json.loads(r.body) == {"error": "no servers", "upstream": "api"}, r.body
        assert harness.upstream_state(bw, "api")["servers"] == []
        assert dns_doc(bw)["last_error"]["message"] == "name does not exist"
        assert harness.breaker_state(bw, "api") == "closed"  # not an upstream failure
        dns.set("late.test", ["127.0.0.2"])
        harness.wait_until(lambda: one(bw).status == 200, 10 * SLOW,
                           message="the name to resolve")
    up.stop()
    # -t warns about a name that does not resolve now, and still accepts the file.
    cfg2 = harness.base_config(["never-resolves.invalid:80"])
    path = tmp_path / "names.json"
    path.write_text(json.dumps(cfg2))
    p = subprocess.run([str(bw_bin), "-t", "-c", str(path)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    assert "configuration ok" in p.stdout
    assert "upstreams.api.servers[0]: warning: \"never-resolves.invalid\" does not resolve" \
        in p.stderr, p.stderr


def test_short_ttl_is_respected_and_long_ttl_waits(breakwater_factory):
    up = harness.upstream_on("127.0.0.2", Tagged("a"))
    with DnsServer().start() as dns:
        dns.set("short.test", ["127.0.0.2"], ttl=1)
        dns.set("long.test", ["127.0.0.2"], ttl=300)
        cfg = dns_config(dns, ["short.test:%d" % up.port, "long.test:%d" % up.port],
                         resolve_interval_ms=60000)
        bw = breakwater_factory(cfg)
        harness.wait_until(lambda: dns.queries("short.test") >= 2 * 3, 10 * SLOW,
                           message="short.test asked again within its TTL (A and AAAA)")
        # One upstream, one round per TTL: long.test is asked in the same rounds; without
        # the 1 s TTL neither would be asked again for 60 s.
        assert addresses(bw) == [up.address]
        assert one(bw).status == 200
    up.stop()


def test_health_checks_follow_the_resolved_set(breakwater_factory):
    class Check(Tagged):
        def __init__(self, name, ok):
            super().__init__(name)
            self.ok = ok

        def __call__(self, req, conn):
            if req.target == "/healthz":
                return respond(200 if self.ok else 500, b"")
            return super().__call__(req, conn)

    a = harness.upstream_on("127.0.0.2", Check("a", ok=True))
    b = harness.upstream_on("127.0.0.3", Check("b", ok=False), port=a.port)
    with DnsServer().start() as dns:
        dns.set("api.test", ["127.0.0.2", "127.0.0.3"], ttl=30)
        cfg = dns_config(dns, ["api.test:%d" % a.port], health_check={
            "interval_ms": int(200 * SLOW), "timeout_ms": int(500 * SLOW),
            "unhealthy_threshold": 1, "healthy_threshold": 1})
        bw = breakwater_factory(cfg)

        def b_unhealthy():
            for s in harness.upstream_state(bw, "api")["servers"]:
                if s["address"] == b.address:
                    return s["healthy"] is False and s["last_check"]["status"] == 500
            return False
        harness.wait_until(b_unhealthy, 10 * SLOW, message="b to fail its check")
        served = b.handler.served
        assert {one(bw).body for _ in range(6)} == {b"a"}
        assert b.handler.served == served
    a.stop()
    b.stop()


def _rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_address_churn_stays_bounded(breakwater_factory):
    """Every answer brings 20 new addresses for each of 5 names (TTL 1 s): the server table
    (256 records) is recycled, and neither the master nor a worker grows."""
    import random
    rnd = random.Random(7)

    def fresh_addresses(name):
        return ["127.1.%d.%d" % (rnd.randrange(256), rnd.randrange(1, 255)) for _ in range(20)]

    port = harness.dead_port()
    with DnsServer().start() as dns:
        dns.generator = fresh_addresses
        names = ["n%d.test:%d" % (i, port) for i in range(5)]
        cfg = dns_config(dns, names, retries=0, outlier_detection={"consecutive_failures": 0},
                         circuit_breaker={"failure_threshold": 0})
        bw = breakwater_factory(cfg)
        harness.wait_until(lambda: len(addresses(bw)) > 0, 10 * SLOW, message="a first set")
        pids = bw.wait_workers(2)

        def churn(seconds):
            end = time.monotonic() + seconds * SLOW
            while time.monotonic() < end:
                assert one(bw).status in (502, 503)
                assert len(addresses(bw)) <= 100
        churn(2)
        rss0 = [_rss_kb(bw.proc.pid)] + [_rss_kb(p) for p in pids]
        q0 = dns.queries("n0.test")
        churn(6)
        assert dns.queries("n0.test") >= q0 + 8  # 4+ rounds: 600+ addresses, 256 records
        rss1 = [_rss_kb(bw.proc.pid)] + [_rss_kb(p) for p in pids]
        # (Under AddressSanitizer freed memory sits in its quarantine, so RSS says nothing.)
        for before, after in zip(rss0, rss1):
            assert harness.SANITIZED or after - before < 2048, (rss0, rss1)
        assert bw.running()
