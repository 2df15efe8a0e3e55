"""The access log, end to end: one JSON object per request, fields in the documented order,
values that match what happened, valid JSON whatever bytes a client puts in its request line,
and no credentials in either log.
"""

import json
import socket
import time

import harness

SLOW = harness.SLOW

FIELDS = ["time", "client", "method", "path", "status", "bytes_in", "bytes_out", "upstream",
          "server", "route", "request_id", "duration_ms", "upstream_connect_ms",
          "upstream_response_ms", "attempts", "error", "tls"]

SECRET = "Bearer s3cr3t-t0ken-that-must-never-be-logged"


def access_lines(bw):
    """Complete lines of the access log, as bytes (a line being written is left out)."""
    try:
        data = bw.access_log_path.read_bytes()
    except OSError:
        return []
    return data.split(b"\n")[:-1]


def wait_lines(bw, n, timeout=10.0):
    return harness.wait_until(lambda: len(access_lines(bw)) >= n and access_lines(bw),
                              timeout * SLOW, message="%d access-log line(s)" % n)


def parse_line(raw):
    """Strict: UTF-8, one JSON object, the documented keys in order, the documented types."""
    text = raw.decode("utf-8")  # raises on invalid UTF-8
    assert "\r" not in text
    obj = json.loads(text, object_pairs_hook=list)
    assert [k for k, _ in obj] == FIELDS, "keys: %s" % [k for k, _ in obj]
    rec = dict(obj)
    assert isinstance(rec["time"], str) and rec["time"].endswith("Z") and len(rec["time"]) == 24
    assert isinstance(rec["status"], int)
    for k in ("bytes_in", "bytes_out", "attempts"):
        assert isinstance(rec[k], int) and rec[k] >= 0, (k, rec[k])
    for k in ("duration_ms", "upstream_connect_ms", "upstream_response_ms"):
        assert rec[k] is None or (isinstance(rec[k], (int, float)) and rec[k] >= 0), (k, rec[k])
    assert isinstance(rec["tls"], bool)
    for k in ("client", "method", "path", "upstream", "server", "route", "request_id", "error"):
        assert rec[k] is None or isinstance(rec[k], str), (k, rec[k])
    return rec


def config(up, dead):
    return harness.base_config(
        [up.address],
        upstreams={"dead": {"servers": [dead], "connect_timeout_ms": int(1000 * SLOW)}},
        routes=[{"path_prefix": "/api", "upstream": "api"},
                {"path_prefix": "/dead", "upstream": "dead"}])


def test_records_match_requests(breakwater_factory, upstream):
    dead = harness.dead_address()
    bw = breakwater_factory(config(upstream, dead))
    port = bw.listener_port(0)

    status, _, body, _ = harness.get(port, "/api/ok?x=1", headers=[
        ("X-Request-Id", "req-from-client-1"), ("Authorization", SECRET),
        ("Cookie", "session=" + SECRET)])
    assert status == 200 and body == b"hello from upstream"
    status, _, _, _ = harness.get(port, "/api/generated-id")
    assert status == 200
    status, _, _, _ = harness.get(port, "/nowhere", headers=[("Authorization", SECRET)])
    assert status == 404
    status, _, _, _ = harness.get(port, "/dead/x")
    assert status == 502

    lines = wait_lines(bw, 4)
    recs = [parse_line(raw) for raw in lines]
    by_path = {r["path"]: r for r in recs}
    assert set(by_path) >= {"/api/ok?x=-", "/api/generated-id", "/nowhere", "/dead/x"}, by_path

    ok = by_path["/api/ok?x=-"]
    assert ok["status"] == 200
    assert ok["method"] == "GET"
    assert ok["upstream"] == "api"
    assert ok["server"] == upstream.address
    assert ok["request_id"] == "req-from-client-1"
    assert ok["attempts"] == 1
    assert ok["error"] is None
    assert ok["tls"] is False
    assert ok["client"].startswith("127.0.0.1:")
    assert ok["bytes_out"] > len(b"hello from upstream")
    assert ok["upstream_connect_ms"] is not None and ok["upstream_response_ms"] is not None
    assert ok["duration_ms"] >= ok["upstream_response_ms"]

    # The id the upstream saw is the one logged, also when the proxy generated it.
    seen = {r.target: r.headers.get("x-request-id") for r in upstream.requests}
    assert seen["/api/ok?x=1"] == "req-from-client-1"
    gen = by_path["/api/generated-id"]
    assert gen["request_id"] and seen["/api/generated-id"] == gen["request_id"]

    nf = by_path["/nowhere"]
    assert nf["status"] == 404
    assert nf["upstream"] is None and nf["server"] is None
    assert nf["upstream_connect_ms"] is None and nf["upstream_response_ms"] is None
    assert nf["attempts"] == 0

    bad = by_path["/dead/x"]
    assert bad["status"] == 502
    assert bad["upstream"] == "dead"
    assert bad["error"], "a 502 should say which proxy-side error it was"
    assert bad["upstream_response_ms"] is None

    # Credentials never reach a log, in any form.
    bw.stop()
    for text in (bw.read_access_log(), bw.read_error_log(), bw.read_stderr()):
        assert "s3cr3t-t0ken" not in text


def send_raw(port, data, timeout=10.0):
    """Sends bytes, reads until the server closes (or the timeout), returns what came back."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout * SLOW)
    out = b""
    try:
        s.sendall(data)
        end = time.monotonic() + timeout * SLOW
        while time.monotonic() < end:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    return out


def test_hostile_request_lines_stay_valid_json(breakwater_factory, upstream):
    dead = harness.dead_address()
    bw = breakwater_factory(config(upstream, dead))
    port = bw.listener_port(0)

    hostile = [
        # Quotes, backslash, a percent-encoded NUL and raw bytes >= 0x80 (invalid UTF-8).
        b'GET /api/"quoted"\\back%00\xff\xfe\xc3\x28 HTTP/1.1\r\nHost: x\r\nConnection: close'
        b'\r\n\r\n',
        # A JSON-looking path that tries to close the string and add a field.
        b'GET /api/","status":999,"x":" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
        # Control bytes in the method and target.
        b'G\x01T /api/\x1b[31mred HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
        # A very long target.
        b"GET /api/" + b"\xe2\x82\xac" * 3000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close"
        b"\r\n\r\n",
    ]
    for i, raw in enumerate(hostile):
        reply = send_raw(port, raw)
        assert reply.startswith(b"HTTP/1.1 "), "request %d got no HTTP answer: %r" % (i, reply)
        # Every request the proxy answers is logged, rejected ones included.
        lines = wait_lines(bw, i + 1)
        for line in lines:
            rec = parse_line(line)
            assert rec["status"] != 999
        assert len(lines[-1]) < 8192

    # The proxy is still fine and keeps logging normal requests.
    assert harness.get(port, "/api/after")[0] == 200
    recs = [parse_line(line) for line in wait_lines(bw, len(hostile) + 1)]
    assert any(r["path"] == "/api/after" and r["status"] == 200 for r in recs)
