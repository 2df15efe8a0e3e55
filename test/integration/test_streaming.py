"""Large bodies stream through the proxy in both directions with bounded memory.

Bodies are a repeating pattern with a prime period, verified byte for byte on receipt, so a
lost, duplicated or reordered piece is caught without storing anything. With workers: 1 the
single worker carries every byte, and its peak resident set (VmHWM) must stay small.

BREAKWATER_SANITIZED=1 shrinks the large transfers to 128 MiB and skips the memory bound:
AddressSanitizer keeps freed memory in quarantine, so RSS says nothing there.
"""

import socket
import threading
import time

import pytest

import harness
from harness import Client, Pattern, PatternChecker, respond

MiB = 1 << 20
BIG = (128 if harness.SANITIZED else 1024) * MiB
RSS_LIMIT_KB = 64 * 1024
TRANSFER_DEADLINE = 120.0 * (2 if harness.SANITIZED else 1)


def start(factory, servers, **overrides):
    cfg = harness.base_config(
        servers, upstreams={"api": {"response_timeout_ms": 60000}},
        limits={"client_idle_timeout_ms": 60000}, **overrides)
    bw = factory(cfg)
    bw.wait_workers(1)
    return bw


def worker_peak_rss_kb(bw):
    pids = bw.worker_pids()
    assert len(pids) == 1, "expected one worker, found %r" % pids
    return harness.Breakwater.proc_status(pids[0], "VmHWM")


def assert_memory_bounded(bw):
    if harness.SANITIZED:
        return
    peak = worker_peak_rss_kb(bw)
    assert peak < RSS_LIMIT_KB, "worker peak RSS %d KiB (limit %d KiB)" % (peak, RSS_LIMIT_KB)


def counting_handler(results):
    """Upstream handler (read_body=False) that reads the body by its framing, checks the
    pattern and answers with the count."""

    def handler(req, conn):
        checker = PatternChecker()
        _, _, complete = conn.read_body(req, timeout=TRANSFER_DEADLINE, sink=checker)
        results.append((checker.count, checker.ok, complete))
        body = ("%d %s" % (checker.count, "ok" if checker.ok else "bad")).encode()
        conn.sendall(respond(200, body))
        conn.keep_alive = True
    return handler


def send_pattern(client, total, deadline, chunk_framing=False):
    """Writes `total` pattern bytes, optionally as chunks of an odd size."""
    pattern = Pattern()
    client.sock.settimeout(60 * harness.SLOW)
    for piece in pattern.generate(total):
        if time.monotonic() > deadline:
            pytest.fail("upload did not finish within %.0f s" % TRANSFER_DEADLINE)
        if chunk_framing:
            client.sock.sendall(b"%x\r\n" % len(piece))
            client.sock.sendall(piece)
            client.sock.sendall(b"\r\n")
        else:
            client.sock.sendall(piece)
    if chunk_framing:
        client.sock.sendall(b"0\r\n\r\n")


@pytest.mark.slow
def test_large_upload_streams_with_bounded_memory(upstream_factory, breakwater_factory):
    results = []
    up = upstream_factory(counting_handler(results), read_body=False)
    bw = start(breakwater_factory, [up])
    deadline = time.monotonic() + TRANSFER_DEADLINE
    with Client(bw.port, timeout=TRANSFER_DEADLINE) as c:
        c.send(b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % BIG)
        send_pattern(c, BIG, deadline)
        r = c.read_response(timeout=TRANSFER_DEADLINE)
    assert time.monotonic() < deadline, "upload took longer than %.0f s" % TRANSFER_DEADLINE
    assert (r.status, r.body) == (200, b"%d ok" % BIG)
    assert results == [(BIG, True, True)]
    assert_memory_bounded(bw)


@pytest.mark.slow
def test_large_download_streams_with_bounded_memory(upstream_factory, breakwater_factory):
    def handler(req, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
        for piece in Pattern().generate(BIG):
            conn.sendall(piece)

    up = upstream_factory(handler)
    bw = start(breakwater_factory, [up])
    deadline = time.monotonic() + TRANSFER_DEADLINE
    checker = PatternChecker()
    with Client(bw.port, timeout=TRANSFER_DEADLINE) as c:
        c.send(harness.build_request("GET", "/download"))
        r = c.read_response(timeout=TRANSFER_DEADLINE, sink=checker)
    assert time.monotonic() < deadline, "download took longer than %.0f s" % TRANSFER_DEADLINE
    assert r.status == 200 and r.complete
    assert checker.count == BIG
    assert checker.ok, "pattern mismatch at offset %d" % checker.bad_offset
    assert_memory_bounded(bw)


def test_chunked_upload(upstream_factory, breakwater_factory):
    total = 64 * MiB + 12345
    results = []
    up = upstream_factory(counting_handler(results), read_body=False)
    bw = start(breakwater_factory, [up])
    deadline = time.monotonic() + TRANSFER_DEADLINE
    with Client(bw.port, timeout=TRANSFER_DEADLINE) as c:
        c.send(b"POST /chunked HTTP/1.1\r\nHost: example.test\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
        send_pattern(c, total, deadline, chunk_framing=True)
        r = c.read_response(timeout=TRANSFER_DEADLINE)
        assert (r.status, r.body) == (200, b"%d ok" % total)
        # The connection is still in a clean state for another request.
        c.send(harness.build_request("POST", "/after", body=b"x" * 251))
        r2 = c.read_response()
        assert r2.status == 200
    assert results[0] == (total, True, True)
    assert_memory_bounded(bw)


def test_chunked_download(upstream_factory, breakwater_factory):
    total = 64 * MiB + 999

    def handler(req, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in Pattern(piece=MiB - 3).generate(total):
            conn.sendall(b"%x\r\n" % len(piece))
            conn.sendall(piece)
            conn.sendall(b"\r\n")
        conn.sendall(b"0\r\n\r\n")

    up = upstream_factory(handler)
    bw = start(breakwater_factory, [up])
    checker = PatternChecker()
    with Client(bw.port, timeout=TRANSFER_DEADLINE) as c:
        c.send(harness.build_request("GET", "/chunked"))
        r = c.read_response(timeout=TRANSFER_DEADLINE, sink=checker)
        assert r.status == 200 and r.framing == "chunked" and r.complete
        assert c.request("GET", "/again").status == 200
    assert checker.count == total and checker.ok
    assert_memory_bounded(bw)


@pytest.mark.slow
def test_slow_reader_applies_backpressure(upstream_factory, breakwater_factory):
    """A client that stops reading must not make the worker buffer the whole response."""
    total = 256 * MiB
    sent = [0]
    done = threading.Event()

    def handler(req, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        try:
            for piece in Pattern().generate(total):
                conn.sendall(piece)
                sent[0] += len(piece)
        finally:
            done.set()

    up = upstream_factory(handler)
    bw = start(breakwater_factory, [up])
    with Client(bw.port, timeout=TRANSFER_DEADLINE) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        c.send(harness.build_request("GET", "/stalled"))
        # Let the pipeline fill while nobody reads, until the upstream can send no more.
        last = -1
        for i in range(100):
            time.sleep(0.1)
            if i >= 10 and sent[0] == last:
                break
            last = sent[0]
        assert sent[0] < 64 * MiB, "the proxy kept reading %d bytes from the upstream for a " \
            "client that reads nothing" % sent[0]
        if not harness.SANITIZED:
            assert_memory_bounded(bw)
        checker = PatternChecker()
        r = c.read_response(timeout=TRANSFER_DEADLINE, sink=checker)
    assert r.status == 200 and checker.count == total and checker.ok
    assert done.wait(10)
