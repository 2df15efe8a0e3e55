"""Hop-by-hop handling an attacker can lean on: Connection naming Host, Connection naming more
headers than any fixed table holds, and framing headers on responses that cannot have a body."""

import harness
from harness import Client, build_request


def one(bw, raw):
    with Client(bw.port) as c:
        c.send(raw)
        return c.read_response()


def test_connection_cannot_remove_host(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], workers=1))
    r = one(bw, build_request("GET", "/", [("Host", "app.example.test"), ("Connection", "host"),
                                           ("Connection", "close")], host=None))
    assert r.status == 200, r
    assert upstream.requests[-1].headers.get_all("host") == ["app.example.test"]


def test_every_connection_token_is_removed(upstream_factory, breakwater_factory):
    names = ["X-Hop-%02d" % i for i in range(40)]

    def handler(req, conn):
        hs = [(n, "resp") for n in names] + [("Connection", ", ".join(names)),
                                             ("X-Kept", "yes")]
        return harness.respond(200, b"ok", hs)

    up = upstream_factory(handler)
    bw = breakwater_factory(harness.base_config([up], workers=1))
    hs = [(n, "req") for n in names] + [("Connection", ", ".join(names[:20])),
                                        ("Connection", ", ".join(names[20:]) + ", close"),
                                        ("X-Kept", "yes")]
    r = one(bw, build_request("GET", "/", hs))
    assert r.status == 200, r
    got = up.requests[-1].headers
    assert [n for n in names if got.get(n) is not None] == []
    assert got.get("x-kept") == "yes"
    assert [n for n in names if r.header(n) is not None] == []
    assert r.header("x-kept") == "yes"


def test_204_loses_content_length(upstream_factory, breakwater_factory):
    up = upstream_factory(harness.raw_response(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-A: 1\r\n\r\n"))
    bw = breakwater_factory(harness.base_config([up], workers=1))
    with Client(bw.port) as c:
        c.send(build_request("GET", "/a"))
        r = c.read_response()
        assert r.status == 204 and r.body == b""
        assert r.header("content-length") is None and r.header("transfer-encoding") is None
        assert r.header("x-a") == "1"
        # The connection is still in step: the next response is read correctly.
        c.send(build_request("GET", "/b"))
        assert c.read_response().status == 204
