"""Request framing safety: malformed or ambiguous requests are refused and never forwarded.

Every case is sent on its own connection to one proxy shared by the module. Each asserts the
status (400, 431 or 505), that the proxy closed the connection, and that the upstream received
nothing from it: a good request sent afterwards on a new connection must be the only request the
upstream ever saw. Cases whose head is valid and only the chunked body is broken may reach the
upstream as a head, but never as a complete request; the upstream connection must be aborted.
"""

import pytest

import harness
from harness import Client, NoResponse, build_request, chunked_body

HOST = "Host: example.test\r\n"
MAX_HEADERS = 20
MAX_HEADER_BYTES = 4096


def _req(head, body=b""):
    if isinstance(head, str):
        head = head.encode("latin-1")
    return head + b"\r\n" + body


def _post(headers, body=b"hello", version="1.1"):
    """A POST with a Host header and these extra header lines (CRLF-terminated text)."""
    return _req("POST /bad HTTP/%s\r\n%s%s" % (version, HOST, headers), body)


CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"

# (id, raw request, expected status). Bodies are chosen so that a proxy misreading the framing
# would forward something the upstream can see.
CASES = [
    # Content-Length
    ("cl-duplicate-same", _post("Content-Length: 5\r\nContent-Length: 5\r\n"), 400),
    ("cl-duplicate-different", _post("Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), 400),
    ("cl-list", _post("Content-Length: 5, 5\r\n"), 400),
    ("cl-plus-sign", _post("Content-Length: +5\r\n"), 400),
    ("cl-minus-sign", _post("Content-Length: -5\r\n"), 400),
    ("cl-inner-space", _post("Content-Length: 1 5\r\n", b"x" * 15), 400),
    ("cl-hex", _post("Content-Length: 0x5\r\n"), 400),
    ("cl-overflow", _post("Content-Length: 99999999999999999999999\r\n"), 400),
    ("cl-empty", _post("Content-Length: \r\n"), 400),
    ("cl-space-before-colon", _post("Content-Length : 5\r\n"), 400),
    ("cl-underscore", _post("Content_Length: 5\r\n"), 400),
    # Transfer-Encoding
    ("cl-and-te", _post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", CHUNKED_HELLO), 400),
    ("te-and-cl", _post("Transfer-Encoding: chunked\r\nContent-Length: 19\r\n",
                        CHUNKED_HELLO), 400),
    ("te-gzip-chunked", _post("Transfer-Encoding: gzip, chunked\r\n", CHUNKED_HELLO), 400),
    ("te-chunked-chunked", _post("Transfer-Encoding: chunked, chunked\r\n", CHUNKED_HELLO), 400),
    ("te-two-headers", _post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                             CHUNKED_HELLO), 400),
    ("te-xchunked", _post("Transfer-Encoding: xchunked\r\n", CHUNKED_HELLO), 400),
    ("te-identity", _post("Transfer-Encoding: identity\r\n", b""), 400),
    ("te-space-before-colon", _post("Transfer-Encoding : chunked\r\n", CHUNKED_HELLO), 400),
    ("te-underscore", _post("Transfer_Encoding: chunked\r\n", CHUNKED_HELLO), 400),
    ("te-vertical-tab", _post("Transfer-Encoding: \x0bchunked\r\n", CHUNKED_HELLO), 400),
    ("te-nul", _post("Transfer-Encoding: chunked\x00\r\n", CHUNKED_HELLO), 400),
    ("te-on-http10", _post("Transfer-Encoding: chunked\r\n", CHUNKED_HELLO, version="1.0"), 400),
    # Header names and values
    ("name-with-space", _post("Bad Name: x\r\nContent-Length: 5\r\n"), 400),
    ("name-with-paren", _post("Bad(Name): x\r\nContent-Length: 5\r\n"), 400),
    ("name-with-del", _post("Bad\x7fName: x\r\nContent-Length: 5\r\n"), 400),
    ("name-non-ascii", _post("B\xe4d: x\r\nContent-Length: 5\r\n"), 400),
    ("name-empty", _post(": x\r\nContent-Length: 5\r\n"), 400),
    ("line-without-colon", _post("NoColonHere\r\nContent-Length: 5\r\n"), 400),
    ("value-with-nul", _post("X-A: a\x00b\r\nContent-Length: 5\r\n"), 400),
    ("value-with-bare-cr", _post("X-A: a\rb\r\nContent-Length: 5\r\n"), 400),
    ("line-with-bare-lf", _post("X-A: a\nX-B: b\r\nContent-Length: 5\r\n"), 400),
    ("obs-fold-space", _post("X-A: a\r\n b\r\nContent-Length: 5\r\n"), 400),
    ("obs-fold-tab", _post("X-A: a\r\n\tb\r\nContent-Length: 5\r\n"), 400),
    # Host
    ("host-missing", _req("GET /bad HTTP/1.1\r\nX-A: b\r\n"), 400),
    ("host-twice", _req("GET /bad HTTP/1.1\r\n%sHost: other.test\r\n" % HOST), 400),
    ("host-with-space", _req("GET /bad HTTP/1.1\r\nHost: a b\r\n"), 400),
    ("host-with-slash", _req("GET /bad HTTP/1.1\r\nHost: a/b\r\n"), 400),
    # Request line
    ("reqline-two-spaces", _req("GET  /bad HTTP/1.1\r\n" + HOST), 400),
    ("reqline-no-version", _req("GET /bad\r\n" + HOST), 400),
    ("reqline-lowercase-version", _req("GET /bad http/1.1\r\n" + HOST), 400),
    ("reqline-bad-version", _req("GET /bad HTTP/1.x\r\n" + HOST), 400),
    ("reqline-target-space", _req("GET /bad x HTTP/1.1\r\n" + HOST), 400),
    ("reqline-target-control", _req("GET /bad\x01x HTTP/1.1\r\n" + HOST), 400),
    ("reqline-target-del", _req("GET /bad\x7f HTTP/1.1\r\n" + HOST), 400),
    ("reqline-bad-method", _req("G(T /bad HTTP/1.1\r\n" + HOST), 400),
    ("reqline-other-scheme", _req("GET ftp://example.test/bad HTTP/1.1\r\n" + HOST), 400),
    ("binary-request-line", b"\x16\x03\x01\x00\xa5\x01\x00 \xa1\x03\x03\r\n\r\n", 400),
    ("version-2.0", _req("GET /bad HTTP/2.0\r\n" + HOST), 505),
    ("version-1.2", _req("GET /bad HTTP/1.2\r\n" + HOST), 505),
    ("version-3.0", _req("GET /bad HTTP/3.0\r\n" + HOST), 505),
    # Limits
    ("too-many-headers",
     _req("GET /bad HTTP/1.1\r\n" + HOST
          + "".join("X-H%d: v\r\n" % i for i in range(MAX_HEADERS * 2))), 431),
    ("head-too-large",
     _req("GET /bad HTTP/1.1\r\n" + HOST + "X-Big: " + "a" * (MAX_HEADER_BYTES * 2) + "\r\n"),
     431),
]

# Valid heads whose chunked body is malformed.
BODY_CASES = [
    ("chunk-size-not-hex", b"zz\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-negative", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-empty", b"\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-overflow", b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-bare-lf", b"5\nhello\r\n0\r\n\r\n"),
    ("chunk-data-missing-crlf", b"5\r\nhelloX0\r\n\r\n"),
    ("chunk-data-too-long", b"5\r\nhello, world\r\n0\r\n\r\n"),
    ("chunk-ext-bare-cr", b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
    ("chunk-last-bare-lf", b"5\r\nhello\r\n0\n\n"),
]

CHUNKED_HEAD = ("POST /bad HTTP/1.1\r\n" + HOST + "Transfer-Encoding: chunked\r\n\r\n").encode()


@pytest.fixture(scope="module")
def framing_env(tmp_path_factory):
    """One upstream and one proxy shared by every case of this module."""
    if not harness.binary_path().exists():
        pytest.fail("breakwater binary not found at %s" % harness.binary_path())
    up = harness.Upstream().start()
    config = harness.base_config(
        [up],
        limits={"max_headers": MAX_HEADERS, "max_header_bytes": MAX_HEADER_BYTES,
                "header_timeout_ms": int(10000 * harness.SLOW)},
        upstreams={"api": {"circuit_breaker": {"failure_threshold": 100000}}})
    bw = harness.Breakwater(config, tmp_path_factory.mktemp("framing"))
    yield up, bw
    bw.stop()
    up.stop()
    bw.check_sanitizers()


@pytest.fixture
def env(framing_env):
    """Per case: a clean upstream record; afterwards the proxy must be intact."""
    up, bw = framing_env
    up.clear()
    workers = bw.worker_pids()
    yield up, bw
    assert bw.running(), "the master exited:\n" + bw.output_excerpt()
    assert bw.worker_pids() == workers, "a worker died:\n" + bw.output_excerpt()
    bw.check_sanitizers()


def _assert_alive_and_only_good_request(up, bw, tag):
    """A good request on a new connection succeeds, and it is the only request that reached the
    upstream (the bad one never did, not even as a head)."""
    status, _, body, _ = harness.get(bw.port, "/good-" + tag, close_wait=0)
    assert status == 200 and body == b"hello from upstream"
    up.wait_requests(1)
    seen = [(r.method, r.target) for r in up.all_requests]
    assert seen == [("GET", "/good-" + tag)], "the upstream received %r" % seen


def _send_and_read(bw, raw, step=None):
    c = Client(bw.port)
    try:
        if step:
            for i in range(0, len(raw), step):
                if not c.try_send(raw[i:i + step]):
                    break
        else:
            c.try_send(raw)
        try:
            resp = c.read_response("POST" if raw.startswith(b"POST") else "GET")
        except NoResponse:
            resp = None
        closed = c.wait_closed(5 * harness.SLOW)
        return resp, closed
    finally:
        c.close()


def _assert_error(resp, closed, status):
    assert resp is not None, "the connection ended without a response"
    assert resp.status == status, resp
    assert closed, "the connection stayed open after %d" % status
    if status in (400, 431):
        assert resp.header("content-type", "").startswith("application/json"), resp.headers
        reason = {400: "bad request", 431: "request header fields too large"}[status]
        assert harness.error_json(resp.body)["error"] == reason
    if resp.framing != "close":
        assert "close" in resp.header("connection", "").lower(), resp.headers


def test_case_count():
    assert len(CASES) + len(BODY_CASES) >= 35
    assert len({c[0] for c in CASES + BODY_CASES}) == len(CASES) + len(BODY_CASES)


@pytest.mark.parametrize("name,raw,status", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_refused(env, name, raw, status):
    up, bw = env
    resp, closed = _send_and_read(bw, raw)
    _assert_error(resp, closed, status)
    _assert_alive_and_only_good_request(up, bw, name)


SPLIT_CASES = ["cl-duplicate-different", "cl-and-te", "te-gzip-chunked", "te-space-before-colon",
               "name-with-space", "value-with-bare-cr", "obs-fold-space", "host-twice",
               "too-many-headers"]


@pytest.mark.parametrize("name", SPLIT_CASES)
def test_malformed_request_in_single_bytes(env, name):
    up, bw = env
    _, raw, status = next(c for c in CASES if c[0] == name)
    resp, closed = _send_and_read(bw, raw, step=1)
    _assert_error(resp, closed, status)
    _assert_alive_and_only_good_request(up, bw, name + "-split")


@pytest.mark.parametrize("name", ["cl-duplicate-different", "te-xchunked", "host-missing",
                                  "reqline-lowercase-version"])
def test_bad_request_pipelined_after_good_one(env, name):
    up, bw = env
    _, raw, status = next(c for c in CASES if c[0] == name)
    c = Client(bw.port)
    try:
        c.send(build_request("GET", "/first") + raw)
        first = c.read_response()
        assert first.status == 200 and first.body == b"hello from upstream"
        second = c.read_response()
        _assert_error(second, c.wait_closed(5 * harness.SLOW), status)
    finally:
        c.close()
    _assert_alive_and_only_good_request_after(up, bw, ["/first"], name)


def _assert_alive_and_only_good_request_after(up, bw, before, tag):
    status, _, _, _ = harness.get(bw.port, "/good-" + tag, close_wait=0)
    assert status == 200
    up.wait_requests(len(before) + 1)
    assert [r.target for r in up.all_requests] == before + ["/good-" + tag]


def _assert_body_rejected(up, bw, resp, closed):
    # The proxy judges the body while streaming it: either it answered 400 itself, or (if a
    # response had already begun) it closed the connection.
    if resp is not None:
        assert resp.status == 400, resp
        assert harness.error_json(resp.body)["error"] == "bad request"
    assert closed, "the connection stayed open after a malformed chunked body"
    # Whatever reached the upstream was aborted: no complete request, and the connection that
    # carried the head was closed by the proxy.
    for r in up.all_requests:
        assert r.target == "/bad", r
        up.wait_connection_closed(r.connection_index)
        assert r.complete is False, r
    assert up.requests == [], "the upstream received a complete request: %r" % up.requests


@pytest.mark.parametrize("name,body", BODY_CASES, ids=[c[0] for c in BODY_CASES])
def test_malformed_chunked_body_never_completes_upstream(env, name, body):
    up, bw = env
    resp, closed = _send_and_read(bw, CHUNKED_HEAD + body)
    _assert_body_rejected(up, bw, resp, closed)
    aborted = len(up.all_requests)
    status, _, _, _ = harness.get(bw.port, "/good-" + name, close_wait=0)
    assert status == 200
    wait = up.wait_requests(1)
    assert [r.target for r in wait] == ["/good-" + name]
    assert len(up.all_requests) == aborted + 1


@pytest.mark.parametrize("name", ["chunk-size-not-hex", "chunk-data-missing-crlf",
                                  "chunk-ext-bare-cr"])
def test_malformed_chunked_body_in_single_bytes(env, name):
    up, bw = env
    body = dict(BODY_CASES)[name]
    resp, closed = _send_and_read(bw, CHUNKED_HEAD + body, step=1)
    _assert_body_rejected(up, bw, resp, closed)


def test_valid_obfuscation_lookalikes_are_accepted(env):
    """Guards against over-eager rejection: OWS around values (including a tab) and an empty
    custom header value are valid."""
    up, bw = env
    c = Client(bw.port)
    try:
        c.send(_post("Transfer-Encoding:\tchunked\r\n", CHUNKED_HELLO))
        r1 = c.read_response()
        c.send(_post("Transfer-Encoding: chunked \r\nX-Empty:\r\n", CHUNKED_HELLO))
        r2 = c.read_response()
        c.send(_post("Content-Length:  5 \r\n"))
        r3 = c.read_response()
    finally:
        c.close()
    assert [r1.status, r2.status, r3.status] == [200, 200, 200]
    got = up.wait_requests(3)
    assert [r.body for r in got] == [b"hello"] * 3


# -- body size limit -----------------------------------------------------------------------------

MAX_BODY = 1000


@pytest.fixture
def limited(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream], limits={"max_body_bytes": MAX_BODY}))
    return upstream, bw


def test_content_length_above_limit_is_413(limited):
    up, bw = limited
    raw = _post("Content-Length: %d\r\n" % (MAX_BODY + 1), b"x" * (MAX_BODY + 1))
    resp, closed = _send_and_read(bw, raw)
    assert resp is not None and resp.status == 413, resp
    assert harness.error_json(resp.body)["error"] == "payload too large"
    assert closed
    _assert_alive_and_only_good_request(up, bw, "413")


def test_content_length_at_limit_is_forwarded(limited):
    up, bw = limited
    status, _, _, _ = harness.http_request(
        bw.port, _post("Content-Length: %d\r\n" % MAX_BODY, b"y" * MAX_BODY), close_wait=0)
    assert status == 200
    assert up.wait_requests(1)[0].body == b"y" * MAX_BODY


def test_chunked_body_above_limit_is_refused(limited):
    up, bw = limited
    body = chunked_body([b"z" * 600, b"z" * 600])
    resp, closed = _send_and_read(bw, CHUNKED_HEAD + body)
    if resp is not None:
        assert resp.status == 413, resp
    assert closed
    for r in up.all_requests:
        up.wait_connection_closed(r.connection_index)
    assert up.requests == [], "a body above max_body_bytes reached the upstream completely"


# -- upstream responses with bad framing -----------------------------------------------------------

MARK = b"UPSTREAM-BYTES"

# (id, raw response). The head is invalid: the client must get the proxy's 502, not these bytes.
BAD_RESPONSES = [
    ("resp-cl-duplicate-different", b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n"
                                    b"Content-Length: 15\r\n\r\n" + MARK + b"!"),
    ("resp-cl-duplicate-same", b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n"
                               b"Content-Length: 14\r\n\r\n" + MARK),
    ("resp-cl-list", b"HTTP/1.1 200 OK\r\nContent-Length: 14, 14\r\n\r\n" + MARK),
    ("resp-cl-negative", b"HTTP/1.1 200 OK\r\nContent-Length: -14\r\n\r\n" + MARK),
    ("resp-cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\ne\r\n" + MARK + b"\r\n0\r\n\r\n"),
    ("resp-name-with-space", b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 14\r\n\r\n"
                             + MARK),
    ("resp-value-with-nul", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 14\r\n\r\n"
                            + MARK),
    ("resp-obs-fold", b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 14\r\n\r\n" + MARK),
    ("resp-bare-lf", b"HTTP/1.1 200 OK\r\nX-A: a\nContent-Length: 14\r\n\r\n" + MARK),
    ("resp-status-not-numeric", b"HTTP/1.1 2OO OK\r\nContent-Length: 14\r\n\r\n" + MARK),
    ("resp-status-two-digits", b"HTTP/1.1 20 OK\r\nContent-Length: 14\r\n\r\n" + MARK),
    ("resp-bad-protocol", b"HTTX/1.1 200 OK\r\nContent-Length: 14\r\n\r\n" + MARK),
    ("resp-garbage", b"\x00\x01\x02 " + MARK + b"\r\n\r\n"),
    ("resp-http09-style", MARK + b"\r\n"),
]

# Valid heads with a broken chunked body: either 502 before anything was sent, or a truncated
# body and a closed connection, never a clean end of the message.
BAD_RESPONSE_BODIES = [
    ("resp-chunk-size-not-hex", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"zz\r\n" + MARK + b"\r\n0\r\n\r\n"),
    ("resp-chunk-size-overflow", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"ffffffffffffffffffff\r\n" + MARK + b"\r\n0\r\n\r\n"),
    ("resp-chunk-late-bad-size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"e\r\n" + MARK + b"\r\nxyz\r\n" + MARK + b"\r\n0\r\n\r\n"),
    ("resp-chunk-missing-crlf", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"e\r\n" + MARK + b"XX0\r\n\r\n"),
]


@pytest.fixture(scope="module")
def response_env(tmp_path_factory):
    """One proxy in front of an upstream that answers /resp/<id> with that raw response."""
    if not harness.binary_path().exists():
        pytest.fail("breakwater binary not found at %s" % harness.binary_path())
    table = dict(BAD_RESPONSES + BAD_RESPONSE_BODIES)

    def handler(req, conn):
        name = req.target.rsplit("/", 1)[-1]
        if name in table:
            conn.sendall(table[name])
            conn.close()
            return None
        return harness.respond(200, b"fine")

    up = harness.Upstream(handler).start()
    config = harness.base_config([up])
    # Dozens of deliberate failures must not open the breaker (that would turn 502 into 503).
    config["upstreams"]["api"]["circuit_breaker"] = {"failure_threshold": 100000}
    bw = harness.Breakwater(config, tmp_path_factory.mktemp("responses"))
    yield up, bw
    bw.stop()
    up.stop()
    bw.check_sanitizers()


@pytest.fixture
def renv(response_env):
    up, bw = response_env
    workers = bw.worker_pids()
    yield up, bw
    assert bw.running(), "the master exited:\n" + bw.output_excerpt()
    assert bw.worker_pids() == workers, "a worker died:\n" + bw.output_excerpt()
    bw.check_sanitizers()


@pytest.mark.parametrize("name", [c[0] for c in BAD_RESPONSES])
def test_bad_upstream_response_becomes_502(renv, name):
    up, bw = renv
    with Client(bw.port) as c:
        r = c.request("GET", "/resp/" + name)
        assert r.status == 502, r
        assert MARK not in r.raw_head + r.body, "upstream bytes reached the client"
        doc = harness.error_json(r.body)
        assert doc == {"error": "bad gateway", "upstream": "api"}, doc
        # The client connection is still good (or was closed cleanly after the 502).
        if not c.wait_closed(0.1):
            r2 = c.request("GET", "/fine")
            assert (r2.status, r2.body) == (200, b"fine")


@pytest.mark.parametrize("name", [c[0] for c in BAD_RESPONSE_BODIES])
def test_bad_upstream_chunked_body_never_ends_cleanly(renv, name):
    up, bw = renv
    with Client(bw.port) as c:
        c.send(build_request("GET", "/resp/" + name))
        r = c.read_response()
        if r.status == 502:
            assert MARK not in r.body
            assert harness.error_json(r.body)["error"] == "bad gateway"
        else:
            assert r.status == 200 and r.framing == "chunked", r
            assert not r.complete, "a broken upstream body was passed on as a complete message"
            assert c.wait_closed(5 * harness.SLOW)
    status, _, body, _ = harness.get(bw.port, "/fine", close_wait=0)
    assert (status, body) == (200, b"fine")
