"""Liveness and readiness probes, on the admin listener and on traffic listeners, and the admin
listener's bearer token. (Readiness as breakers open and close is in test_breaker.py.)"""

import re
import signal
import threading
from datetime import datetime

import harness
from harness import Client, build_request

SLOW = harness.SLOW
ISO_8601 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)$")
TOKEN = "t0k3n-for-the-admin-listener"


def probe(port, path, token=None):
    hs = [("Connection", "close")]
    if token:
        hs.append(("Authorization", "Bearer " + token))
    with Client(port) as c:
        c.send(build_request("GET", path, hs, host="localhost"))
        return c.read_response()


def check_readyz_doc(doc):
    assert set(doc) >= {"ready", "status", "timestamp", "checks"}, doc
    assert isinstance(doc["ready"], bool)
    assert doc["status"] in ("healthy", "degraded", "unhealthy"), doc
    assert ISO_8601.match(doc["timestamp"]), doc["timestamp"]
    datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00"))
    assert isinstance(doc["checks"], list) and doc["checks"], doc
    for c in doc["checks"]:
        assert isinstance(c["name"], str) and isinstance(c["healthy"], bool), c
        assert isinstance(c["required"], bool) and isinstance(c["message"], str), c
        if c["name"].startswith("upstream:"):
            assert c["circuit_state"] in ("closed", "open", "half_open"), c


def test_healthz_on_admin_and_traffic_listeners(upstream, breakwater_factory):
    cfg = harness.base_config([upstream], workers=2)
    cfg["listeners"].append({"address": "127.0.0.1:%d" % harness.free_port()})
    bw = breakwater_factory(cfg)
    for port in (bw.admin_port, bw.listener_port(0), bw.listener_port(1)):
        r = probe(port, "/healthz")
        assert (r.status, r.body) == (200, b"ok\n"), (port, r)
    assert upstream.all_requests == [], "a probe was proxied"


def test_readyz_document_when_healthy(upstream_factory, breakwater_factory):
    a, b = upstream_factory(), upstream_factory()
    cfg = harness.base_config([a], workers=2)
    cfg["upstreams"]["api"]["critical"] = True
    cfg["upstreams"]["static"] = {"servers": [b.address]}
    cfg["routes"] = [{"path_prefix": "/static", "upstream": "static"},
                     {"path_prefix": "/", "upstream": "api"}]
    bw = breakwater_factory(cfg)
    for port in (bw.admin_port, bw.port):
        r = probe(port, "/readyz")
        assert r.status == 200, r
        assert r.header("content-type", "").startswith("application/json"), r.headers
        doc = r.json()
        check_readyz_doc(doc)
        assert (doc["ready"], doc["status"]) == (True, "healthy"), doc
        checks = {c["name"]: c for c in doc["checks"]}
        assert set(checks) == {"upstream:api", "upstream:static"}, checks  # no redis configured
        assert (checks["upstream:api"]["required"], checks["upstream:static"]["required"]) == \
            (True, False)
        for c in checks.values():
            assert (c["healthy"], c["circuit_state"]) == (True, "closed"), c
    assert a.all_requests == [] and b.all_requests == []


def test_probes_can_be_left_to_the_upstream(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], probes_on_listeners=False))
    for path in ("/healthz", "/readyz"):
        r = probe(bw.port, path)
        assert (r.status, r.body) == (200, b"hello from upstream"), r
    assert [r.target for r in upstream.wait_requests(2)] == ["/healthz", "/readyz"]
    # Still answered on the admin listener.
    assert probe(bw.admin_port, "/healthz").status == 200
    assert probe(bw.admin_port, "/readyz").status == 200


def test_readyz_fails_while_draining(upstream_factory, breakwater_factory):
    release = threading.Event()

    def hold(req, conn):
        release.wait(20 * SLOW)
        return harness.respond(200, b"held")

    up = upstream_factory(hold)
    bw = breakwater_factory(harness.base_config([up], shutdown_timeout_ms=int(15000 * SLOW)))
    admin = Client(bw.admin_port)
    holder = Client(bw.port)
    try:
        r = admin.request("GET", "/readyz", host="localhost")
        assert r.status == 200 and r.json()["ready"] is True, r
        holder.send(build_request("GET", "/slow"))
        up.wait_all_requests(1)
        bw.signal(signal.SIGTERM)
        # The drain lasts as long as the held request: readiness must say so meanwhile, on the
        # admin connection that was already open or, failing that, on a new one.
        try:
            r = admin.request("GET", "/readyz", host="localhost")
        except (harness.NoResponse, OSError):
            try:
                r = harness.admin_request(bw, "GET", "/readyz")
            except OSError as e:
                raise AssertionError("while draining, the admin listener closed its open "
                                     "connection and refuses new ones (%s): /readyz cannot "
                                     "answer 503" % e)
        assert r.status == 503, r
        doc = r.json()
        check_readyz_doc(doc)
        assert (doc["ready"], doc["status"]) == (False, "unhealthy"), doc
        release.set()
        assert holder.read_response().status == 200
    finally:
        release.set()
        admin.close()
        holder.close()


# -- admin bearer token ----------------------------------------------------------------------

class TokenBreakwater(harness.Breakwater):
    """A proxy whose admin listener needs a token: readiness is judged with the token."""

    def _healthy(self):
        try:
            return probe(self.admin_port, "/healthz", TOKEN).status == 200
        except (OSError, harness.NoResponse, ValueError):
            return False


def test_admin_token(upstream, bw_bin, tmp_path):
    cfg = harness.base_config([upstream], workers=2)
    cfg["admin"]["token_env"] = "BW_TEST_ADMIN_TOKEN"
    bw = TokenBreakwater(cfg, tmp_path, env={"BW_TEST_ADMIN_TOKEN": TOKEN}, binary=bw_bin)
    try:
        # Probes never need the token (kubelets send none); test_admin.py covers the rest.
        for path in ("/healthz", "/readyz"):
            for auth in (None, "Bearer wrong-token"):
                hs = [] if auth is None else [("Authorization", auth)]
                assert harness.admin_request(bw, "GET", path, headers=hs).status == 200, path
        admin_paths = [("GET", "/metrics"), ("GET", "/upstreams"),
                       ("POST", "/upstreams/api/reset")]
        for method, path in admin_paths:
            for auth in (None, "Bearer wrong-token", "Basic " + TOKEN, TOKEN,
                         "Bearer " + TOKEN + "x"):
                hs = [] if auth is None else [("Authorization", auth)]
                r = harness.admin_request(bw, method, path, headers=hs)
                assert r.status == 401, (method, path, auth, r)
                assert r.header("www-authenticate", "").lower().startswith("bearer"), r.headers
                assert TOKEN not in r.body.decode("latin-1")
            r = harness.admin_request(bw, method, path, token=TOKEN)
            assert r.status == 200, (method, path, r)
        # Traffic-listener probes do not need the token.
        assert probe(bw.port, "/healthz").status == 200
        assert probe(bw.port, "/readyz").status == 200
        # And the token never shows up in the logs.
        assert TOKEN not in bw.read_error_log()
        assert TOKEN not in bw.read_access_log()
    finally:
        bw.stop()
