"""Routing on the canonical path and host: the spellings an attacker would use to slip past a
rate-limited `/login` route all reach that route, the upstream receives the canonical path, and
paths with no safe canonical form are refused before anything is forwarded."""

import json

import harness
from harness import Client, build_request


def login_config(up, **route_extra):
    cfg = harness.base_config([up], workers=1)
    cfg["upstreams"]["other"] = {"servers": [up.address]}
    cfg["rate_limits"] = {"login": {"capacity": 2, "refill_per_sec": 0}}
    login = {"path_prefix": "/login", "upstream": "api", "rate_limit": "login"}
    login.update(route_extra)
    cfg["routes"] = [login, {"path_prefix": "/", "upstream": "other"}]
    return cfg


def send(bw, target, host="example.test"):
    with Client(bw.port) as c:
        c.send(build_request("GET", target, [("Host", host), ("Connection", "close")]))
        return c.read_response()


def test_bypass_spellings_share_the_login_limit(upstream, breakwater_factory):
    bw = breakwater_factory(login_config(upstream))
    spellings = ["//login", "/./login", "/x/../login", "/%6cogin", "/%6Cogin", "/x/%2e%2e/login",
                 "///login/./"]
    statuses = []
    for target in spellings:
        r = send(bw, target)
        statuses.append(r.status)
        if r.status == 200:
            assert r.header("ratelimit-limit") == "2", (target, r.headers)
        else:
            assert r.status == 429, (target, r)
    # Capacity 2, refill 0: the first two spellings pass, every other is refused by the limit.
    assert statuses == [200, 200] + [429] * (len(spellings) - 2), list(zip(spellings, statuses))
    assert [req.target for req in upstream.requests] == ["/login", "/login"]


def test_forwarded_path_is_canonical_and_query_kept(upstream, breakwater_factory):
    cfg = harness.base_config([upstream], workers=1)
    bw = breakwater_factory(cfg)
    r = send(bw, "/a//b/./c/../%7Euser/%3a?x=%2F&y=../..&z")
    assert r.status == 200, r
    assert upstream.requests[-1].target == "/a/b/~user/%3A?x=%2F&y=../..&z"


def test_unsafe_paths_are_refused(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], workers=1))
    cases = {
        "/a%2fb": "encoded slash or backslash in path",
        "/a%5Cb": "encoded slash or backslash in path",
        "/a%00b": "encoded NUL in path",
        "/a\\b": "backslash in path",
        "/../etc/passwd": "path climbs above the root",
        "/%2e%2e/etc": "path climbs above the root",
        "/a%zz": "malformed percent-encoding in path",
    }
    for target, why in cases.items():
        r = send(bw, target)
        assert r.status == 400, (target, r)
        assert json.loads(r.body) == {"error": "bad request"}, (target, r.body)
    assert upstream.requests == []
    # The access log says why, one line per refused request, in order.
    lines = harness.wait_until(
        lambda: [json.loads(x) for x in bw.read_access_log().splitlines() if x.strip()]
        if len(bw.read_access_log().splitlines()) >= len(cases) else None,
        message="an access-log line per refused request")
    assert [(x["status"], x["error"]) for x in lines] == [(400, why) for why in cases.values()]


def test_case_insensitive_route(upstream, breakwater_factory):
    bw = breakwater_factory(login_config(upstream, case_sensitive=False))
    assert [send(bw, t).status for t in ("/LOGIN", "/Login/x", "/login")] == [200, 200, 429]
    # The default is case-sensitive, as in nginx and Envoy: /LOGIN is another resource.
    bw2 = breakwater_factory(login_config(upstream))
    assert [send(bw2, t).status for t in ("/LOGIN", "/LOGIN", "/LOGIN")] == [200, 200, 200]


def test_host_matched_without_case_port_or_trailing_dot(upstream_factory, breakwater_factory):
    a, b = upstream_factory(), upstream_factory()
    cfg = harness.base_config([a], workers=1)
    cfg["upstreams"] = {"a": {"servers": [a.address]}, "b": {"servers": [b.address]}}
    cfg["routes"] = [{"host": "api.example.com", "upstream": "a"},
                     {"path_prefix": "/", "upstream": "b"}]
    bw = breakwater_factory(cfg)
    for host in ("api.example.com", "API.Example.COM", "api.example.com.",
                 "api.example.com.:80", "api.example.com:8080"):
        assert send(bw, "/x", host=host).status == 200
    assert len(a.requests) == 5 and b.requests == []
    send(bw, "/x", host="api.example.com.evil.test")
    assert len(b.requests) == 1
