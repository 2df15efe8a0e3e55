"""The admin listener (libevhtp on the master's loop): every endpoint, the token rules and the
refusal counter, Content-Length: 0, forced-open breakers (also across a reload and fleet-wide
through a real redis-server), the busiest rate-limit keys and their refill, exempt networks,
and the defences around libevhtp: malformed requests, header deadline, connection cap, accept
errors, pipelined floods."""

import json
import re
import signal
import socket
import subprocess
import time

import pytest

import harness
from harness import Client, build_request, metric_sum

SLOW = harness.SLOW
TOKEN = "adm1n-t0ken-for-tests"


def req(bw, method, path, token=None, headers=None, body=b""):
    hs = list(headers or [])
    if token:
        hs.append(("Authorization", "Bearer " + token))
    hs.append(("Connection", "close"))
    with Client(bw.admin_port) as c:
        c.send(build_request(method, path, hs, body=body, host="localhost"))
        return c.read_response(method)


def traffic(bw, path="/", headers=None):
    with Client(bw.port) as c:
        c.send(build_request("GET", path, list(headers or []) + [("Connection", "close")]))
        return c.read_response()


def upstream_doc(bw, name="api", token=None):
    return harness.upstream_state(bw, name, token=token)


# -- endpoints ---------------------------------------------------------------------------------

def test_every_endpoint_answers(upstream, breakwater_factory):
    cfg = harness.base_config([upstream], rate_limits={"per_client": {"capacity": 5}})
    cfg["routes"][0]["rate_limit"] = "per_client"
    bw = breakwater_factory(cfg)
    assert traffic(bw).status == 200
    r = req(bw, "GET", "/")
    assert r.status == 200 and r.header("content-type").startswith("text/html"), r
    assert b"<html" in r.body and b"/upstreams" in r.body
    assert not re.search(rb"(src|href)\s*=\s*[\"']?(https?:)?//", r.body), "external resource"
    st = req(bw, "GET", "/status").json()
    assert st["version"] and st["uptime_seconds"] >= 0
    assert st["workers"] == {"expected": 1, "alive": 1, "restarts": 0}
    assert st["redis"]["configured"] is False
    assert st["totals"]["requests"] >= 1
    doc = req(bw, "GET", "/ratelimits").json()
    assert [p["policy"] for p in doc["policies"]] == ["per_client"]
    assert doc["policies"][0]["top"][0]["key"] == "127.0.0.1"
    for path in ("/healthz", "/readyz", "/metrics", "/upstreams"):
        assert req(bw, "GET", path).status == 200, path
    assert req(bw, "GET", "/nope").status == 404
    assert req(bw, "GET", "/upstreams/api/open").status == 405
    assert req(bw, "DELETE", "/upstreams").status == 405
    assert req(bw, "POST", "/upstreams/nope/open").status == 404
    assert req(bw, "HEAD", "/healthz").status == 200


def test_auth_rules_log_and_counter(upstream, breakwater_factory):
    cfg = harness.base_config([upstream], rate_limits={"p": {"capacity": 5}})
    cfg["admin"]["token_env"] = "BW_TEST_ADMIN_TOKEN"
    bw = breakwater_factory(cfg, env={"BW_TEST_ADMIN_TOKEN": TOKEN})
    # Public: probes and the page's HTML, whatever the Authorization header says.
    for path in ("/healthz", "/readyz", "/"):
        for hs in ([], [("Authorization", "Bearer nope")]):
            assert req(bw, "GET", path, headers=hs).status == 200, path
    page = req(bw, "GET", "/").body
    assert b"api" not in page.replace(b"/api", b""), "the page must hold no data"
    private = [("GET", "/metrics"), ("GET", "/status"), ("GET", "/upstreams"),
               ("GET", "/ratelimits"), ("GET", "/ratelimits/p"), ("POST", "/upstreams/api/open"),
               ("POST", "/upstreams/api/reset"), ("DELETE", "/ratelimits/p/1.2.3.4"),
               ("GET", "/nope")]
    refused = 0
    for method, path in private:
        for hs in ([], [("Authorization", "Bearer wrong")], [("Authorization", TOKEN)]):
            r = req(bw, method, path, headers=hs)
            assert r.status == 401, (method, path, hs, r)
            assert r.header("www-authenticate", "").lower().startswith("bearer")
            refused += 1
    assert harness.upstream_state(bw, "api", token=TOKEN)["circuit_breaker"]["forced"] is False
    bw.wait_log(r"warn .*admin: refused POST /upstreams/api/open from 127\.0\.0\.1:\d+: no token")
    bw.wait_log(r"warn .*admin: refused GET /metrics from 127\.0\.0\.1:\d+: wrong token")
    samples = harness.scrape(bw, token=TOKEN)
    assert metric_sum(samples, "breakwater_admin_auth_failures_total") == refused
    for method, path in private[:-1]:
        assert req(bw, method, path, token=TOKEN).status == 200, (method, path)
    assert TOKEN not in bw.read_error_log()


def test_post_with_content_length_zero_has_no_body(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream]))
    for action in ("open", "reset"):
        r = req(bw, "POST", "/upstreams/api/" + action, headers=[("Content-Length", "0")])
        assert r.status == 200, r
        assert r.json()["name"] == "api"
    got, _ = harness.raw_exchange(
        bw.admin_port, b"POST /upstreams/api/reset HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 5\r\n\r\nhello")
    assert got.startswith(b"HTTP/1.1 413 "), got


# -- forced open -------------------------------------------------------------------------------

def test_force_open_holds_until_reset(upstream, breakwater_factory):
    cfg = harness.base_config([upstream], upstreams={"api": {
        "critical": True, "circuit_breaker": {"reset_timeout_ms": 100}}})
    bw = breakwater_factory(cfg)
    assert traffic(bw).status == 200
    seen = len(upstream.all_requests)
    r = req(bw, "POST", "/upstreams/api/open")
    assert r.status == 200
    cb = r.json()["circuit_breaker"]
    assert (cb["state"], cb["forced"]) == ("open", True), cb
    # Far longer than reset_timeout_ms: a forced breaker never goes half open by itself.
    deadline = time.monotonic() + 1.0 * SLOW
    while time.monotonic() < deadline:
        assert traffic(bw).status == 503
    assert len(upstream.all_requests) == seen, "a request reached a forced-open upstream"
    assert upstream_doc(bw)["circuit_breaker"]["forced"] is True
    ready = harness.readyz(bw)
    assert ready[0] == 503, ready
    check = harness.readyz_check(ready[1], "upstream:api")
    assert (check["circuit_state"], check["forced"]) == ("open", True), check
    bw.wait_log(r"breaker api: forced open by the operator from 127\.0\.0\.1")
    r = req(bw, "POST", "/upstreams/api/reset")
    assert (r.json()["circuit_breaker"]["state"], r.json()["circuit_breaker"]["forced"]) == \
        ("closed", False)
    assert traffic(bw).status == 200
    assert harness.readyz(bw)[0] == 200


def test_forced_open_survives_a_reload(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], workers=2))
    assert req(bw, "POST", "/upstreams/api/open").status == 200
    cfg = json.loads(json.dumps(bw.config))
    cfg["upstreams"]["api"]["response_timeout_ms"] = int(9000 * SLOW)
    bw.write_config(cfg)
    old = set(bw.worker_pids())
    bw.signal(signal.SIGHUP)
    harness.wait_until(
        lambda: metric_sum(harness.scrape(bw), "breakwater_config_reloads_total",
                           result="success") == 1, 10 * SLOW, message="the reload")
    harness.wait_until(lambda: not old & set(bw.live_worker_pids()), 10 * SLOW,
                       message="old workers gone")
    assert upstream_doc(bw)["circuit_breaker"]["forced"] is True
    assert traffic(bw).status == 503
    assert upstream.all_requests == []
    assert req(bw, "POST", "/upstreams/api/reset").status == 200
    assert traffic(bw).status == 200


@pytest.fixture
def redis_server(tmp_path):
    r = harness.RedisServer(tmp_path)
    yield r
    r.kill()


def fleet_cfg(up, redis):
    cfg = harness.base_config([up], rate_limits={"per_client": {"capacity": 2,
                                                               "refill_per_sec": 0.01}})
    cfg["routes"][0]["rate_limit"] = "per_client"
    cfg["redis"] = {"url": redis.url, "key_prefix": "bwadm", "sync_interval_ms": 50}
    return cfg


def test_force_open_and_refill_are_fleet_wide(redis_server, upstream_factory,
                                              breakwater_factory):
    up_a, up_b = upstream_factory(), upstream_factory()
    a = breakwater_factory(fleet_cfg(up_a, redis_server))
    b = breakwater_factory(fleet_cfg(up_b, redis_server))
    for bw in (a, b):
        harness.wait_until(lambda: metric_sum(harness.scrape(bw), "breakwater_redis_up") == 1,
                           10 * SLOW, message="redis up")
    assert req(a, "POST", "/upstreams/api/open").status == 200
    rec = harness.redis_hash(redis_server, "bwadm:circuit-breaker:api")
    assert rec.get("state") == "open" and int(rec.get("forced_at_ms", "0")) > 0, rec
    harness.wait_until(lambda: upstream_doc(b)["circuit_breaker"]["forced"], 10 * SLOW,
                       message="instance b to follow the forced open")
    n = len(up_b.all_requests)
    assert traffic(b).status == 503
    assert len(up_b.all_requests) == n
    assert req(a, "POST", "/upstreams/api/reset").status == 200
    harness.wait_until(lambda: not upstream_doc(b)["circuit_breaker"]["forced"], 10 * SLOW,
                       message="instance b to follow the reset")
    harness.wait_until(lambda: traffic(b).status == 200, 10 * SLOW, message="b serving")

    # Rate-limit refill: the fleet's record of the key goes too.
    statuses = [traffic(a).status for _ in range(4)]
    assert statuses.count(429) >= 1, statuses
    key = "bwadm:rate-limit:per_client:127.0.0.1"
    harness.wait_until(lambda: redis_server.call("EXISTS", key) == 1, 10 * SLOW,
                       message="the fleet record of the key")
    r = req(a, "DELETE", "/ratelimits/per_client/127.0.0.1")
    assert r.status == 200 and r.json()["refilled"] is True, r
    harness.wait_until(lambda: redis_server.call("EXISTS", key) == 0, 5 * SLOW,
                       message="the fleet record deleted")
    assert traffic(a).status == 200


# -- rate limits -------------------------------------------------------------------------------

def rl_cfg(upstream, **policy):
    pol = {"capacity": 3, "refill_per_sec": 0}
    pol.update(policy)
    cfg = harness.base_config([upstream], rate_limits={"per_client": pol},
                              trusted_proxies=["127.0.0.1/32"])
    cfg["routes"][0]["rate_limit"] = "per_client"
    return cfg


def test_ratelimit_top_and_delete(upstream, breakwater_factory):
    bw = breakwater_factory(rl_cfg(upstream))
    xff = lambda ip: [("X-Forwarded-For", ip)]  # noqa: E731
    for i in range(8):
        traffic(bw, headers=xff("198.51.100.7"))
    for i in range(4):
        traffic(bw, headers=xff("198.51.100.8"))
    traffic(bw, headers=xff("198.51.100.9"))
    doc = req(bw, "GET", "/ratelimits/per_client?top=2").json()
    assert doc["policy"] == "per_client" and len(doc["top"]) == 2, doc
    first, second = doc["top"]
    assert (first["key"], first["rejected"], first["consumed"], first["tokens"]) == \
        ("198.51.100.7", 5, 3, 0), first
    assert (second["key"], second["rejected"], second["tokens"]) == ("198.51.100.8", 1, 0)
    assert len(req(bw, "GET", "/ratelimits/per_client").json()["top"]) == 3
    for bad in ("0", "65", "x", "-1", ""):
        assert req(bw, "GET", "/ratelimits/per_client?top=" + bad).status == 400, bad
    assert req(bw, "GET", "/ratelimits/nope").status == 404
    assert req(bw, "DELETE", "/ratelimits/nope/198.51.100.7").status == 404
    assert req(bw, "DELETE", "/ratelimits/per_client/not-an-address").status == 400
    assert traffic(bw, headers=xff("198.51.100.7")).status == 429
    r = req(bw, "DELETE", "/ratelimits/per_client/198.51.100.7")
    assert r.status == 200, r
    assert r.json() == {"policy": "per_client", "key": "198.51.100.7", "refilled": True,
                        "was_tracked": True}
    assert [traffic(bw, headers=xff("198.51.100.7")).status for _ in range(4)] == \
        [200, 200, 200, 429]
    # Others were not refilled.
    assert traffic(bw, headers=xff("198.51.100.8")).status == 429
    bw.wait_log(r"rate limit per_client: key 198\.51\.100\.7 refilled by the operator")


def test_header_keys_show_digests_and_refill_by_them(upstream, breakwater_factory):
    cfg = rl_cfg(upstream, key="header:X-Api-Key", capacity=1)
    bw = breakwater_factory(cfg)
    for _ in range(3):
        traffic(bw, headers=[("X-Api-Key", "secret-key-1")])
    top = req(bw, "GET", "/ratelimits/per_client").json()["top"]
    assert len(top) == 1 and top[0]["key"].startswith("h-"), top
    assert "secret" not in json.dumps(top)
    assert req(bw, "DELETE", "/ratelimits/per_client/" + top[0]["key"]).status == 200
    assert traffic(bw, headers=[("X-Api-Key", "secret-key-1")]).status == 200
    # The raw value works too (an operator who knows the key).
    assert traffic(bw, headers=[("X-Api-Key", "secret-key-1")]).status == 429
    assert req(bw, "DELETE", "/ratelimits/per_client/secret-key-1").status == 200
    assert traffic(bw, headers=[("X-Api-Key", "secret-key-1")]).status == 200


def test_exempt_clients_take_no_token_and_get_no_headers(upstream, breakwater_factory):
    bw = breakwater_factory(rl_cfg(upstream, capacity=1, exempt=["10.1.0.0/16", "fd00::/8"]))
    for ip in ("10.1.2.3", "10.1.200.1", "fd00::1"):
        for _ in range(3):
            r = traffic(bw, headers=[("X-Forwarded-For", ip)])
            assert r.status == 200, (ip, r)
            assert r.header("ratelimit-limit") is None and r.header("ratelimit-remaining") is None
    # The right-most untrusted address decides: a spoofed exempt address on the left does not.
    r = traffic(bw, headers=[("X-Forwarded-For", "10.1.2.3, 203.0.113.5")])
    assert r.status == 200 and r.header("ratelimit-limit") == "1", r
    assert traffic(bw, headers=[("X-Forwarded-For", "10.1.2.3, 203.0.113.5")]).status == 429
    assert traffic(bw, headers=[("X-Forwarded-For", "10.2.0.1")]).status == 200
    assert traffic(bw, headers=[("X-Forwarded-For", "10.2.0.1")]).status == 429
    top = req(bw, "GET", "/ratelimits/per_client").json()["top"]
    assert sorted(k["key"] for k in top) == ["10.2.0.1", "203.0.113.5"], top


# -- defences ----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,want", [
    (b"GARBAGE\r\n\r\n", None),
    (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", b"505"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
     b"400"),
    # libevhtp's parser rejects this before any hook runs: closed without a reply.
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", None),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n", None),
    (b"POST /upstreams/api/reset HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", b"413"),
    (b"POST /upstreams/api/reset HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
     b"Content-Length: 100\r\n\r\n", b"413"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: something\r\n\r\n", b"417"),
    (b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", b"431"),
    (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", None),
])
def test_malformed_admin_requests_get_4xx_or_close(raw, want, upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream]))
    got, how = harness.raw_exchange(bw.admin_port, raw, timeout=10 * SLOW)
    assert how in ("closed", "reset"), (how, got)
    assert b"100 Continue" not in got
    if want is None:
        assert got == b"" or re.match(rb"HTTP/1\.1 4\d\d ", got), got
    else:
        assert got.startswith(b"HTTP/1.1 " + want + b" "), got
    assert req(bw, "GET", "/healthz").status == 200


def test_dripping_client_is_cut_at_the_header_deadline(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], limits={"header_timeout_ms": 1000}))
    s = socket.create_connection(("127.0.0.1", bw.admin_port))
    start = time.monotonic()
    got = b""
    s.settimeout(0.2)
    try:
        for ch in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100:
            try:
                s.send(bytes([ch]))
            except OSError:
                break
            try:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            except socket.timeout:
                pass
            except ConnectionResetError:
                break  # a byte sent after the server closed: the 408 was read before
            if time.monotonic() - start > 10 * SLOW:
                break
    finally:
        s.close()
    elapsed = time.monotonic() - start
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert 0.9 <= elapsed < 1.0 + 3 * SLOW, elapsed


def test_connection_flood_beyond_the_cap_does_not_spin(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], admin={"max_connections": 4}))
    master = bw.proc.pid
    held = [socket.create_connection(("127.0.0.1", bw.admin_port)) for _ in range(4)]
    harness.wait_until(lambda: len([l for l in open("/proc/%d/net/tcp" % master)
                                    if ":%04X" % bw.admin_port in l.split()[1]
                                    and l.split()[3] == "01"]) >= 4, 5 * SLOW,
                       message="4 established admin connections")
    extra = []
    for _ in range(40):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", bw.admin_port))
        extra.append(s)
    cpu0 = harness.cpu_seconds(master)
    time.sleep(1.0)  # measuring idle CPU over a fixed window: nothing to wait for
    cpu = harness.cpu_seconds(master) - cpu0
    assert cpu < 0.2, "master used %.2fs CPU in 1s while at the admin connection cap" % cpu
    # A waiting connection is not served while at the cap...
    with pytest.raises((socket.timeout, harness.NoResponse, OSError)):
        with Client(bw.admin_port, timeout=0.5) as c:
            c.send(build_request("GET", "/healthz", [("Connection", "close")]))
            c.read_response(timeout=0.5)
    # ...and is once the held connections go.
    for s in held + extra:
        s.close()
    harness.wait_until(lambda: req(bw, "GET", "/healthz").status == 200, 10 * SLOW,
                       message="admin served again")
    assert traffic(bw).status == 200


def test_accept_errors_pause_and_are_counted(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], admin={"max_connections": 1000}))
    master = bw.proc.pid
    nfd = len(list((__import__("pathlib").Path("/proc/%d/fd" % master)).iterdir()))
    limit = nfd + 3
    soft = int(subprocess.run(["prlimit", "--pid", str(master), "--nofile", "--raw",
                               "--noheadings", "-o", "SOFT"], check=True, capture_output=True,
                              text=True).stdout.split()[0])
    subprocess.run(["prlimit", "--pid", str(master), "--nofile=%d:" % limit], check=True)
    socks = []
    try:
        for _ in range(30):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", bw.admin_port))
            socks.append(s)
        bw.wait_log(r"admin: accept failed: .*pausing accepts for 100 ms")
        cpu0 = harness.cpu_seconds(master)
        time.sleep(1.0)  # idle CPU over a fixed window
        cpu = harness.cpu_seconds(master) - cpu0
        assert cpu < 0.3, "master used %.2fs CPU in 1s with descriptors exhausted" % cpu
        lines = [l for l in bw.read_error_log().splitlines() if "accept failed" in l]
        assert len(lines) <= 4, lines  # at most one a second
    finally:
        for s in socks:
            s.close()
        subprocess.run(["prlimit", "--pid", str(master), "--nofile=%d:" % soft], check=True)
    harness.wait_until(lambda: req(bw, "GET", "/healthz").status == 200, 10 * SLOW,
                       message="admin served again")
    errors = metric_sum(harness.scrape(bw), "breakwater_accept_errors_total", listener="admin")
    assert errors and errors >= 1, errors


def test_pipelined_metrics_flood_keeps_master_memory_bounded(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream]), env=harness.unquarantined_env())
    master = bw.proc.pid
    for _ in range(3):
        assert req(bw, "GET", "/metrics").status == 200
    hwm0 = bw.proc_status(master, "VmHWM")
    one = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    flood = one * 2000
    s = socket.create_connection(("127.0.0.1", bw.admin_port))
    s.setblocking(False)
    sent = 0
    end = time.monotonic() + 10 * SLOW
    stalled_since = None
    while sent < 8 << 20 and time.monotonic() < end:
        try:
            sent += s.send(flood)
            stalled_since = None
        except BlockingIOError:
            # The master reads no more while its reply is unread: the kernel buffers fill.
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 1.0:
                break
            time.sleep(0.01)
    assert sent >= 1 << 20, "could only send %d bytes" % sent
    assert traffic(bw).status == 200
    assert req(bw, "GET", "/healthz").status == 200
    hwm = bw.proc_status(master, "VmHWM")
    rss = bw.proc_status(master, "VmRSS")
    s.close()
    assert hwm - hwm0 < 4096, "master VmHWM grew by %d kB after %d bytes of pipelined " \
        "requests (VmRSS %d kB)" % (hwm - hwm0, sent, rss)


def test_keepalive_connection_idle_past_the_deadline_is_closed(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], limits={"header_timeout_ms": 500}))
    with Client(bw.admin_port) as c:
        c.send(build_request("GET", "/healthz", host="localhost"))
        assert c.read_response().status == 200
        start = time.monotonic()
        assert c.wait_closed(timeout=5 * SLOW), "idle connection not closed"
        assert time.monotonic() - start >= 0.4
        assert c.pending() == b"", "an idle kept-alive connection got a reply it did not ask for"


def test_version_lists_libevhtp(bw_bin):
    out = subprocess.run([str(bw_bin), "-V"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^libevhtp 1\.2\.\d+$", out, re.M), out


def test_pipelined_requests_are_answered_in_order(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream]))
    with Client(bw.admin_port) as c:
        c.send(build_request("GET", "/healthz", host="localhost")
               + build_request("GET", "/nope", host="localhost")
               + build_request("GET", "/readyz", host="localhost")
               + build_request("GET", "/healthz", [("Connection", "close")], host="localhost"))
        statuses = [c.read_response().status for _ in range(4)]
        assert statuses == [200, 404, 200, 200], statuses
        assert c.wait_closed(timeout=5 * SLOW)


SPLIT_REQUESTS = [
    b"GET /ratelimits/p?top=3 HTTP/1.1\r\nHost: localhost\r\nX-Long-Header: abcdefgh\r\n"
    b"Connection: close\r\n\r\n",
    b"POST /upstreams/api/open HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n",
]


@pytest.mark.parametrize("raw", SPLIT_REQUESTS, ids=["get", "post"])
def test_requests_split_at_every_byte(raw, upstream, breakwater_factory):
    """libevhtp 1.2.18 could read out of bounds when a URI or header is split across two reads
    (upstream issue #128): every split point, each part read by the server before the next is
    sent, must give the same answer (and no sanitizer report in the ASan build)."""
    bw = breakwater_factory(harness.base_config([upstream], rate_limits={"p": {}}))
    want = None
    for k in range(1, len(raw)):
        s = socket.create_connection(("127.0.0.1", bw.admin_port), timeout=10 * SLOW)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client_port = s.getsockname()[1]
            s.sendall(raw[:k])
            harness.wait_until(lambda: harness.server_rx_queue(bw.admin_port, client_port) == 0,
                               10 * SLOW, interval=0.001, message="the first part read")
            s.sendall(raw[k:])
            got = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        finally:
            s.close()
        status = got.split(b"\r\n", 1)[0]
        if want is None:
            want = status
        assert status == want and status.startswith(b"HTTP/1.1 200"), (k, got[:200])
    assert req(bw, "GET", "/healthz").status == 200
