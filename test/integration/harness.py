"""Black-box test harness for breakwater's integration tests.

Everything here talks raw sockets on 127.0.0.1 so that tests control every byte: a threaded
HTTP/1.1 upstream (Upstream) that can answer with any framing, including broken framing; a
client (Client, http_request) that parses exactly one response at a time with the framing rules
of RFC 9112 and reports how the connection ended; and a process wrapper (Breakwater) that writes
a JSON configuration, starts the proxy, waits until it serves, and collects its logs so that
sanitizer reports fail the test that caused them.

Standard library only. Every blocking operation has a deadline.
"""

import copy
import errno
import itertools
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO / "build" / "breakwater"

# The sanitizer build is several times slower; scale the "should succeed" deadlines.
SANITIZED = os.environ.get("BREAKWATER_SANITIZED") == "1"
SLOW = 3.0 if SANITIZED else 1.0

SANITIZER_MARKERS = (
    "AddressSanitizer",
    "runtime error:",
    "LeakSanitizer",
    "ThreadSanitizer",
    "MemorySanitizer",
)


class HarnessError(Exception):
    """Something in the test environment itself went wrong (not a proxy verdict)."""


class NoResponse(Exception):
    """The peer closed (or reset) the connection before sending a complete response head."""

    def __init__(self, msg, partial=b""):
        super().__init__(msg)
        self.partial = partial


def deadline_after(seconds):
    return time.monotonic() + seconds


def wait_until(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Polls predicate() until it returns a truthy value; returns that value or raises."""
    end = deadline_after(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Ports

def _ephemeral_range():
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


_free_port_rng = random.Random(os.getpid())


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server to listen on.

    It is drawn below the kernel's ephemeral range when there is room: a port the kernel handed
    out with bind(0) is one it may hand again to any outgoing connection (every test makes
    thousands) before the server binds it, and the server then fails to start."""
    lo, _ = _ephemeral_range()
    if lo > 11000:
        for _ in range(200):
            port = _free_port_rng.randrange(10000, lo)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
            finally:
                s.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


_dead_sockets = []
_dead_lock = threading.Lock()


def dead_port():
    """A port where nothing listens, kept bound (not listening) for the life of the test run so
    that no other socket can take it: a connect there is refused at once."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    with _dead_lock:
        _dead_sockets.append(s)
    return s.getsockname()[1]


def dead_address():
    return "127.0.0.1:%d" % dead_port()


class Blackhole:
    """A listening socket whose accept queue is full, so that further SYNs are dropped and a
    connect to it hangs until the connecting side gives up (emulates an unreachable server).
    Use as a context manager; .address is "127.0.0.1:PORT"."""

    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.address = "127.0.0.1:%d" % self.port
        self.fillers = []
        # Fill the accept queue until a connect no longer completes promptly.
        for _ in range(16):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            rc = c.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(c)
            if rc not in (0, errno.EINPROGRESS):
                continue
            _, w, _ = select.select([], [c], [], 0.3)
            if not w:
                break
        else:
            self.close()
            raise HarnessError("could not fill the accept queue of a blackhole listener")

    def close(self):
        for c in self.fillers:
            c.close()
        self.fillers = []
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# Headers and messages

class Headers(list):
    """A list of (name, value) string pairs in wire order, with case-insensitive lookups.
    `"name" in headers` checks names case-insensitively."""

    def get(self, name, default=None):
        n = name.lower()
        for k, v in self:
            if k.lower() == n:
                return v
        return default

    def get_all(self, name):
        n = name.lower()
        return [v for k, v in self if k.lower() == n]

    def count(self, name):  # noqa: A003 - deliberately mirrors list.count for names
        if isinstance(name, str):
            return len(self.get_all(name))
        return list.count(self, name)

    def names(self):
        return [k.lower() for k, _ in self]

    def __contains__(self, item):
        if isinstance(item, str):
            return self.get(item) is not None
        return list.__contains__(self, item)


def _decode(b):
    return b.decode("latin-1")


def _parse_header_lines(lines):
    hs = Headers()
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError("header line without colon: %r" % line)
        hs.append((_decode(name), _decode(value.strip(b" \t"))))
    return hs


def _connection_tokens(headers):
    toks = set()
    for v in headers.get_all("connection"):
        for t in v.split(","):
            t = t.strip().lower()
            if t:
                toks.add(t)
    return toks


def build_request(method="GET", target="/", headers=None, body=b"", version="HTTP/1.1",
                  host="example.test", content_length=True):
    """Raw request bytes. headers: list of (name, value) or dict. A Host header is added unless
    headers contain one or host is None; Content-Length is added for a non-empty body unless
    the headers already frame it or content_length is False."""
    hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = [k.lower() for k, _ in hs]
    if isinstance(body, str):
        body = body.encode()
    if host is not None and "host" not in names:
        hs.insert(0, ("Host", host))
    if (content_length and body and "content-length" not in names
            and "transfer-encoding" not in names):
        hs.append(("Content-Length", str(len(body))))
    head = "%s %s %s\r\n" % (method, target, version)
    head += "".join("%s: %s\r\n" % (k, v) for k, v in hs)
    return head.encode("latin-1") + b"\r\n" + body


def chunked_body(chunks, trailers=None):
    """Encodes a sequence of byte strings as a chunked body (empty chunks are skipped)."""
    out = bytearray()
    for c in chunks:
        if isinstance(c, str):
            c = c.encode()
        if c:
            out += b"%x\r\n" % len(c) + c + b"\r\n"
    out += b"0\r\n"
    for k, v in (trailers or []):
        out += ("%s: %s\r\n" % (k, v)).encode("latin-1")
    out += b"\r\n"
    return bytes(out)


class Response:
    """One parsed HTTP response. framing is "length", "chunked", "close" or "none".
    complete is False when the connection ended before the framing said the body was done."""

    def __init__(self):
        self.version = None
        self.status = None
        self.reason = None
        self.headers = Headers()
        self.body = b""
        self.body_len = 0
        self.trailers = Headers()
        self.framing = None
        self.complete = False
        self.raw_head = b""
        self.interim = []  # 1xx responses that preceded this one

    def header(self, name, default=None):
        return self.headers.get(name, default)

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<Response %s %s framing=%s complete=%s body=%r>" % (
            self.status, self.reason, self.framing, self.complete, self.body[:200])


# ---------------------------------------------------------------------------------------------
# Buffered reading with deadlines

class _Reader:
    """Buffered reads from a socket; every call is bounded by a deadline."""

    def __init__(self, sock, buf=b""):
        self.sock = sock
        self.buf = bytearray(buf)
        self.eof = False
        self.reset = False

    def _fill(self, deadline, size=262144):
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline passed")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(size)
        except ConnectionResetError:
            self.eof = True
            self.reset = True
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_line(self, deadline, limit=1 << 20):
        """A line including its LF, or whatever was left at EOF (possibly b"")."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > limit:
                raise ValueError("line longer than %d bytes" % limit)
            start = len(self.buf)
            if not self._fill(deadline):
                line = bytes(self.buf)
                self.buf.clear()
                return line

    def read_exact(self, n, deadline, sink=None):
        """Reads n bytes; returns (data_or_None, count). With a sink, data goes to sink(bytes)
        and nothing is kept. Stops early at EOF."""
        got = 0
        parts = None if sink else []
        while got < n:
            if not self.buf and not self._fill(deadline, min(max(n - got, 4096), 1 << 20)):
                break
            take = min(len(self.buf), n - got)
            piece = bytes(self.buf[:take])
            del self.buf[:take]
            got += take
            if sink:
                sink(piece)
            else:
                parts.append(piece)
        return (None if sink else b"".join(parts)), got

    def read_to_eof(self, deadline, sink=None):
        parts = None if sink else []
        total = 0
        while True:
            if self.buf:
                piece = bytes(self.buf)
                self.buf.clear()
                total += len(piece)
                if sink:
                    sink(piece)
                else:
                    parts.append(piece)
            if not self._fill(deadline, 1 << 20):
                break
        return (None if sink else b"".join(parts)), total


def _read_head_lines(reader, deadline, max_bytes=1 << 20):
    """Reads header lines up to the empty line; returns (first_line, [lines], raw) or raises
    NoResponse when EOF comes first."""
    raw = bytearray()
    first = reader.read_line(deadline)
    # Tolerate stray empty lines before a message, as RFC 9112 allows.
    while first in (b"\r\n", b"\n"):
        raw += first
        first = reader.read_line(deadline)
    raw += first
    if not first.endswith(b"\n"):
        raise NoResponse("connection closed before a complete head", bytes(raw))
    lines = []
    while True:
        line = reader.read_line(deadline)
        raw += line
        if not line.endswith(b"\n"):
            raise NoResponse("connection closed inside the head", bytes(raw))
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line.rstrip(b"\r\n"))
        if len(raw) > max_bytes:
            raise ValueError("head too large")
    return first.rstrip(b"\r\n"), lines, bytes(raw)


_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\r\n]*)?\r\n\Z")


def _chunk_size(line):
    """Strict chunk-size line: hex digits, optional extension, CRLF; anything else is an error
    (both peers of the proxy must only ever see well-formed chunked framing)."""
    m = _CHUNK_LINE.match(line)
    if not m or (m.group(2) and b"\r" in m.group(2)):
        raise ValueError("bad chunk size line %r" % line)
    return int(m.group(1), 16)


def _read_chunked(reader, deadline, sink=None):
    """Decodes a chunked body. Returns (body_or_None, length, trailers, complete)."""
    parts = None if sink else []
    total = 0
    while True:
        line = reader.read_line(deadline)
        if not line.endswith(b"\n"):
            return (None if sink else b"".join(parts)), total, Headers(), False
        size = _chunk_size(line)
        if size == 0:
            break
        data, got = reader.read_exact(size, deadline, sink)
        total += got
        if not sink:
            parts.append(data)
        if got < size:
            return (None if sink else b"".join(parts)), total, Headers(), False
        crlf = reader.read_line(deadline)
        if crlf != b"\r\n":
            if not crlf.endswith(b"\n"):
                return (None if sink else b"".join(parts)), total, Headers(), False
            raise ValueError("missing CRLF after chunk data: %r" % crlf)
    trailer_lines = []
    while True:
        line = reader.read_line(deadline)
        if not line.endswith(b"\n"):
            return (None if sink else b"".join(parts)), total, Headers(), False
        if line == b"\r\n":
            break
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise ValueError("bad trailer line %r" % line)
        trailer_lines.append(line[:-2])
    return (None if sink else b"".join(parts)), total, _parse_header_lines(trailer_lines), True


def _read_response(reader, deadline, method="GET", skip_interim=True, sink=None):
    interim = []
    while True:
        first, lines, raw = _read_head_lines(reader, deadline)
        resp = Response()
        resp.raw_head = raw
        parts = first.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ValueError("bad status line %r" % first)
        resp.version = _decode(parts[0])
        resp.status = int(parts[1])
        resp.reason = _decode(parts[2]) if len(parts) > 2 else ""
        resp.headers = _parse_header_lines(lines)
        if 100 <= resp.status < 200 and resp.status != 101:
            interim.append(resp)
            if skip_interim:
                continue
            resp.framing = "none"
            resp.complete = True
            return resp
        break
    resp.interim = interim
    te = resp.headers.get_all("transfer-encoding")
    cl = resp.headers.get_all("content-length")
    if method.upper() == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
        resp.framing = "none"
        resp.complete = True
    elif te:
        codings = [c.strip().lower() for v in te for c in v.split(",") if c.strip()]
        if codings and codings[-1] == "chunked":
            resp.framing = "chunked"
            body, n, trailers, complete = _read_chunked(reader, deadline, sink)
            resp.body, resp.body_len = body or b"", n
            resp.trailers, resp.complete = trailers, complete
        else:
            resp.framing = "close"
            body, n = reader.read_to_eof(deadline, sink)
            resp.body, resp.body_len, resp.complete = body or b"", n, True
    elif cl:
        values = {v.strip() for v in cl}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise ValueError("invalid Content-Length in response: %r" % cl)
        length = int(next(iter(values)))
        resp.framing = "length"
        body, n = reader.read_exact(length, deadline, sink)
        resp.body, resp.body_len, resp.complete = body or b"", n, n == length
    else:
        resp.framing = "close"
        body, n = reader.read_to_eof(deadline, sink)
        resp.body, resp.body_len, resp.complete = body or b"", n, True
    return resp


# ---------------------------------------------------------------------------------------------
# Client side

class Client:
    """One client connection for keep-alive and pipelining tests.

        c = Client(port)
        c.send(build_request(...) * 3)
        r1 = c.read_response(); r2 = ...
        assert c.wait_closed(5)
    """

    def __init__(self, port, host="127.0.0.1", timeout=10.0):
        self.port = port
        self.timeout = timeout * SLOW
        self.sock = socket.create_connection((host, port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = _Reader(self.sock)

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)

    def send_slowly(self, data, step=1, delay=0.0):
        """Sends data in pieces of `step` bytes, each in its own segment."""
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.settimeout(self.timeout)
        for i in range(0, len(data), step):
            self.sock.sendall(data[i:i + step])
            if delay:
                time.sleep(delay)

    def try_send(self, data):
        """Sends and returns False instead of raising when the peer has closed or reset."""
        try:
            self.send(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def read_response(self, method="GET", timeout=None, skip_interim=True, sink=None):
        """Reads one response; raises NoResponse if the connection ends before its head."""
        deadline = deadline_after(timeout * SLOW if timeout else self.timeout)
        return _read_response(self.reader, deadline, method, skip_interim, sink)

    def request(self, method="GET", target="/", headers=None, body=b"", **kw):
        self.send(build_request(method, target, headers, body, **kw))
        return self.read_response(method)

    def wait_closed(self, timeout=5.0):
        """True when the peer closes (FIN or RST) within timeout; bytes that arrive meanwhile
        stay in self.pending(). Use a tight timeout to assert that the connection stays open."""
        end = deadline_after(timeout)
        try:
            while not self.reader.eof:
                if time.monotonic() >= end:
                    return False
                self.reader._fill(end)
        except (socket.timeout, TimeoutError):
            return False
        return True

    def pending(self):
        return bytes(self.reader.buf)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def http_request(port, raw, timeout=10, method=None, close_wait=0.5, host="127.0.0.1"):
    """Sends raw bytes on a fresh connection and reads one response.

    Returns (status, headers, body, closed): status is None when the connection ended without
    a response head; closed tells whether the server closed the connection after the response.
    When the response announces the close (Connection: close, or HTTP/1.0 without keep-alive)
    the wait for it is generous (timeout); otherwise it is close_wait seconds, so a keep-alive
    response costs little. The method used for framing is the raw request's first word unless
    given."""
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    if method is None:
        method = raw.split(b" ", 1)[0].decode("latin-1", "replace") or "GET"
    c = Client(port, host=host, timeout=timeout)
    try:
        if not c.try_send(raw):
            # The proxy may close early (e.g. on an oversized head) while we are still sending;
            # a response may still be readable.
            pass
        try:
            resp = c.read_response(method)
        except NoResponse:
            return None, Headers(), b"", True
        tokens = _connection_tokens(resp.headers)
        announced = "close" in tokens or (resp.version == "HTTP/1.0"
                                          and "keep-alive" not in tokens)
        if resp.framing == "close" or c.reader.eof:
            closed = True
        else:
            closed = c.wait_closed(timeout * SLOW if announced else close_wait)
        return resp.status, resp.headers, resp.body, closed
    finally:
        c.close()


def get(port, target="/", headers=None, host="example.test", **kw):
    """Convenience: one GET with Connection: close semantics left to the caller."""
    return http_request(port, build_request("GET", target, headers, host=host), **kw)


def error_json(body):
    """Parses a proxy error body; fails with a readable message if it is not JSON."""
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AssertionError("expected a JSON error body, got %r (%s)" % (body[:300], e))


# ---------------------------------------------------------------------------------------------
# Upstream server

class Request:
    """A request as the upstream received it. complete is True when the whole body arrived with
    valid framing, False when the connection ended or the framing broke first, None when the
    handler reads the body itself (read_body=False)."""

    def __init__(self):
        self.method = None
        self.target = None
        self.version = None
        self.headers = Headers()
        self.body = b""
        self.raw = b""
        self.complete = None
        self.error = None
        self.trailers = Headers()
        self.connection_index = None  # which accepted connection (0-based) carried it
        self.port = None              # upstream port that received it

    def header(self, name, default=None):
        return self.headers.get(name, default)

    def wants_close(self):
        toks = _connection_tokens(self.headers)
        if self.version == "HTTP/1.0":
            return "keep-alive" not in toks
        return "close" in toks

    def __repr__(self):
        return "<Request %s %s %s complete=%s body=%d bytes>" % (
            self.method, self.target, self.version, self.complete, len(self.body))


class UpstreamConn:
    """The socket-like object a handler gets: sendall/send/recv/close plus body readers. recv first
    returns bytes the harness had already buffered past the head. Set keep_alive=False to make
    the harness close after the handler returns."""

    def __init__(self, sock, upstream, index):
        self.sock = sock
        self.upstream = upstream
        self.index = index
        self.reader = _Reader(sock)
        self.closed = False
        self.keep_alive = True

    def sendall(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.settimeout(60 * SLOW)
        self.sock.sendall(data)

    send = sendall

    def recv(self, n=65536, timeout=30.0):
        if self.reader.buf:
            piece = bytes(self.reader.buf[:n])
            del self.reader.buf[:n]
            return piece
        self.sock.settimeout(timeout * SLOW)
        try:
            return self.sock.recv(n)
        except ConnectionResetError:
            return b""

    def read_exact(self, n, timeout=60.0, sink=None):
        data, got = self.reader.read_exact(n, deadline_after(timeout * SLOW), sink)
        return data if sink is None else got

    def read_body(self, req, timeout=60.0, sink=None):
        """Reads the request body using its framing (for read_body=False handlers).
        Returns (body_or_None, length, complete)."""
        return _read_request_body(self.reader, req, deadline_after(timeout * SLOW), sink)

    def sleep(self, seconds):
        """Sleeps, but returns early (False) when the upstream is being stopped."""
        return not self.upstream._stopping.wait(seconds)

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def reset(self):
        """Closes with an RST (SO_LINGER 0)."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.sock.close()


def _read_request_body(reader, req, deadline, sink=None):
    te = req.headers.get_all("transfer-encoding")
    cl = req.headers.get_all("content-length")
    if te:
        if [t.strip().lower() for t in ",".join(te).split(",")] != ["chunked"]:
            raise ValueError("upstream got a Transfer-Encoding other than chunked: %r" % te)
        body, n, trailers, complete = _read_chunked(reader, deadline, sink)
        req.trailers = trailers
        return body, n, complete
    if cl:
        if len(cl) != 1 or not cl[0].strip().isdigit():
            raise ValueError("upstream got a bad Content-Length: %r" % cl)
        length = int(cl[0])
        body, n = reader.read_exact(length, deadline, sink)
        return body, n, n == length
    return (None if sink else b""), 0, True


def respond(status=200, body=b"", headers=None, reason=None, version="HTTP/1.1",
            content_length=True):
    """Raw response bytes. Content-Length is added unless the headers already frame the
    message or content_length is False."""
    if isinstance(body, str):
        body = body.encode()
    hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = [k.lower() for k, _ in hs]
    if content_length and "content-length" not in names and "transfer-encoding" not in names:
        hs.append(("Content-Length", str(len(body))))
    if reason is None:
        reason = _REASONS.get(status, "Status")
    head = "%s %d %s\r\n" % (version, status, reason)
    head += "".join("%s: %s\r\n" % (k, v) for k, v in hs)
    return head.encode("latin-1") + b"\r\n" + body


_REASONS = {100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 301: "Moved",
            304: "Not Modified", 400: "Bad Request", 404: "Not Found", 500: "Internal Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def _no_body_for_head(req, data):
    """Drops the body of a response to HEAD (keeping its Content-Length), as a server should."""
    if req.method == "HEAD":
        return data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return data


def default_handler(req, conn):
    return _no_body_for_head(req, respond(
        200, b"hello from upstream",
        [("Content-Type", "text/plain"), ("X-Upstream-Port", str(conn.upstream.port))]))


def static(status=200, body=b"", headers=None):
    """Handler answering every request with the same response (plus X-Upstream-Port)."""
    def handler(req, conn):
        hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        hs.append(("X-Upstream-Port", str(conn.upstream.port)))
        return _no_body_for_head(req, respond(status, body, hs))
    return handler


def raw_response(data):
    """Handler answering with these exact bytes (and keeping the connection if it can)."""
    def handler(req, conn):
        return data
    return handler


def raw_then_close(data):
    """Handler writing these exact bytes and then closing the connection."""
    def handler(req, conn):
        conn.sendall(data)
        conn.close()
    return handler


def chunked(chunks, status=200, headers=None, trailers=None):
    """Handler answering with a chunked body made of these chunks."""
    def handler(req, conn):
        hs = list(headers or []) + [("Transfer-Encoding", "chunked"),
                                    ("X-Upstream-Port", str(conn.upstream.port))]
        return respond(status, chunked_body(chunks, trailers), hs)
    return handler


def close_delimited(body, status=200, headers=None):
    """Handler answering without Content-Length or Transfer-Encoding, ending the body by
    closing the connection."""
    def handler(req, conn):
        hs = list(headers or []) + [("X-Upstream-Port", str(conn.upstream.port))]
        conn.sendall(respond(status, body, hs, content_length=False))
        conn.close()
    return handler


def slow(delay, inner=None):
    """Handler waiting `delay` seconds before answering with inner (default handler)."""
    inner = inner or default_handler

    def handler(req, conn):
        if not conn.sleep(delay):
            return None
        return inner(req, conn)
    return handler


def close_without_answer(req, conn):
    """Handler that closes the connection (FIN) without answering."""
    conn.close()


def reset_connection(req, conn):
    """Handler that resets the connection (RST) without answering."""
    conn.reset()


def never_answer(req, conn):
    """Handler that keeps the connection open and silent until the peer or the test ends."""
    while not conn.upstream._stopping.is_set():
        try:
            conn.sock.settimeout(0.2)
            data = conn.sock.recv(65536)
            if not data:
                break
        except (socket.timeout, TimeoutError):
            continue
        except OSError:
            break
    conn.close()


def close_after_response(inner=None):
    """Handler answering normally (no Connection: close) and then closing the connection, so
    that a pool believes the connection reusable while it is gone."""
    inner = inner or default_handler

    def handler(req, conn):
        data = inner(req, conn)
        if data is not None:
            conn.sendall(data)
        conn.close()
    return handler


class FailNext:
    """Handler switch: the next `n` requests get `failure` (a handler, default reset), the rest
    go to `inner`. Call .arm(n) to fail more later; .failed counts failures served."""

    def __init__(self, n=1, failure=None, inner=None):
        self.remaining = n
        self.failure = failure or reset_connection
        self.inner = inner or default_handler
        self.failed = 0
        self.lock = threading.Lock()

    def arm(self, n=1):
        with self.lock:
            self.remaining = n

    def __call__(self, req, conn):
        with self.lock:
            fail = self.remaining > 0
            if fail:
                self.remaining -= 1
                self.failed += 1
        return (self.failure if fail else self.inner)(req, conn)


_all_upstreams = []


class Upstream:
    """A threaded HTTP/1.1 server on 127.0.0.1 built on raw sockets.

    handler(req, conn) returns a complete raw response (bytes, written as-is) or writes to conn
    itself and returns None. With read_body=True (default) the harness reads the request body
    by its framing before calling the handler; with read_body=False the handler is called right
    after the head and must read the body itself (conn.read_body / conn.recv)."""

    def __init__(self, handler=None, read_body=True, port=0):
        self.handler = handler or default_handler
        self.read_body = read_body
        self._lock = threading.Lock()
        self._requests = []
        self._all = []
        self._errors = []
        self._connections = 0
        self._closed_indices = set()
        self._active = 0
        self._peak_active = 0
        self._socks = set()
        self._threads = []
        self._stopping = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.address = "127.0.0.1:%d" % self.port
        self._accept_thread = None
        _all_upstreams.append(self)

    # -- observations --------------------------------------------------------------------------
    @property
    def requests(self):
        """Requests received completely (or whose head arrived, with read_body=False)."""
        with self._lock:
            return list(self._requests)

    @property
    def all_requests(self):
        """Every request whose head arrived, including aborted ones (complete False)."""
        with self._lock:
            return list(self._all)

    @property
    def incomplete(self):
        with self._lock:
            return [r for r in self._all if r.complete is False]

    @property
    def connections(self):
        with self._lock:
            return self._connections

    @property
    def active_connections(self):
        with self._lock:
            return self._active

    @property
    def errors(self):
        with self._lock:
            return list(self._errors)

    def wait_requests(self, n, timeout=10.0):
        """Waits until at least n requests were received; returns the list."""
        wait_until(lambda: len(self.requests) >= n, timeout * SLOW,
                   message="%d request(s) at upstream %s (have %d)"
                   % (n, self.address, len(self.requests)))
        return self.requests

    def wait_all_requests(self, n, timeout=10.0):
        wait_until(lambda: len(self.all_requests) >= n, timeout * SLOW,
                   message="%d request head(s) at upstream %s" % (n, self.address))
        return self.all_requests

    def connection_closed(self, index):
        """True once the harness has closed accepted connection number `index` (0-based)."""
        with self._lock:
            return index in self._closed_indices

    def wait_connection_closed(self, index, timeout=10.0):
        wait_until(lambda: self.connection_closed(index), timeout * SLOW,
                   message="upstream connection %d to be closed" % index)

    def wait_idle(self, timeout=10.0):
        """Waits until no connection is open (e.g. the proxy aborted its upstream connection)."""
        wait_until(lambda: self.active_connections == 0, timeout * SLOW,
                   message="upstream %s to have no open connection" % self.address)

    def clear(self):
        with self._lock:
            self._requests.clear()
            self._all.clear()
            self._errors.clear()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self):
        if self._accept_thread is None:
            self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                                   name="upstream-%d" % self.port)
            self._accept_thread.start()
        return self

    def stop(self):
        self._stopping.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._accept_thread is not None:
            self._accept_thread.join(5)
        for t in list(self._threads):
            t.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- internals -----------------------------------------------------------------------------
    def _accept_loop(self):
        self._listener.settimeout(0.1)
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                index = self._connections
                self._connections += 1
                self._active += 1
                self._peak_active = max(self._peak_active, self._active)
                self._socks.add(sock)
            t = threading.Thread(target=self._serve, args=(sock, index), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
            t.start()

    def _serve(self, sock, index):
        conn = UpstreamConn(sock, self, index)
        try:
            while not self._stopping.is_set() and not conn.closed:
                if not self._serve_one(conn, index):
                    break
        except Exception as e:  # recorded for tests that care; a proxy abort is normal
            with self._lock:
                self._errors.append(e)
        finally:
            conn.close()
            with self._lock:
                self._active -= 1
                self._closed_indices.add(index)
                self._socks.discard(sock)

    def _serve_one(self, conn, index):
        reader = conn.reader
        # Wait for the next head without a hard deadline but stay responsive to stop().
        while not reader.buf:
            try:
                if not reader._fill(deadline_after(0.25)):
                    return False
            except (socket.timeout, TimeoutError):
                if self._stopping.is_set():
                    return False
        raw_start = bytes(reader.buf)
        try:
            first, lines, raw_head = _read_head_lines(reader, deadline_after(30 * SLOW))
        except NoResponse as e:
            req = Request()
            req.raw = e.partial
            req.complete = False
            req.error = "connection ended inside the head"
            req.connection_index = index
            req.port = self.port
            with self._lock:
                self._all.append(req)
            return False
        del raw_start
        req = Request()
        req.connection_index = index
        req.port = self.port
        parts = first.split(b" ")
        if len(parts) != 3:
            req.error = "bad request line %r" % first
        else:
            req.method, req.target, req.version = (_decode(p) for p in parts)
        req.headers = _parse_header_lines(lines)
        req.raw = raw_head
        if not self.read_body:
            req.complete = None
            with self._lock:
                self._all.append(req)
                self._requests.append(req)
            conn.keep_alive = False
            return self._respond(conn, req)
        with self._lock:
            self._all.append(req)  # visible (complete None) while the body is still arriving
        try:
            body, _, complete = _read_request_body(reader, req, deadline_after(60 * SLOW))
        except (ValueError, socket.timeout, TimeoutError) as e:
            body, complete = b"", False
            req.error = str(e)
        req.body = body or b""
        req.raw = raw_head + req.body
        with self._lock:
            req.complete = bool(complete and req.error is None)
            if req.complete:
                self._requests.append(req)
        if not req.complete:
            return False
        return self._respond(conn, req)

    def _respond(self, conn, req):
        out = self.handler(req, conn)
        if conn.closed:
            return False
        if out is not None:
            if isinstance(out, str):
                out = out.encode("latin-1")
            conn.sendall(out)
            head = out.split(b"\r\n\r\n", 1)[0]
            if re.search(rb"(?im)^connection:[ \t]*[^\r\n]*\bclose\b", head):
                return False
        if req.wants_close() or not conn.keep_alive:
            return False
        return True


# ---------------------------------------------------------------------------------------------
# The proxy process

def _merge(base, overrides):
    """Recursive dict merge; a None value removes the key."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _addr(x):
    return x.address if isinstance(x, Upstream) else str(x)


def base_config(upstream_addresses, **overrides):
    """A minimal valid configuration: one worker, one listener and an admin listener on free
    ports, upstream "api" with these servers (addresses or Upstream objects), route "/" -> api,
    and short timeouts. Overrides are merged recursively (a dict merges into a dict, None
    removes a key): base_config(ups, limits={"max_headers": 10},
    upstreams={"api": {"response_timeout_ms": 300}})."""
    if isinstance(upstream_addresses, (str, Upstream)):
        upstream_addresses = [upstream_addresses]
    cfg = {
        "workers": 1,
        "listeners": [{"address": "127.0.0.1:%d" % free_port()}],
        "admin": {"address": "127.0.0.1:%d" % free_port()},
        "upstreams": {
            "api": {
                "servers": [_addr(a) for a in upstream_addresses],
                "connect_timeout_ms": int(1000 * SLOW),
                "response_timeout_ms": int(10000 * SLOW),
            }
        },
        "routes": [{"path_prefix": "/", "upstream": "api"}],
        "shutdown_timeout_ms": 1000,
    }
    return _merge(cfg, overrides)


def _port_of(address):
    return int(address.rsplit(":", 1)[1])


def _tcp_accepts(port, timeout=0.5):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return False
    s.close()
    return True


def binary_path():
    """The proxy binary under test: $BREAKWATER_BIN or <repo>/build/breakwater."""
    return Path(os.environ.get("BREAKWATER_BIN") or DEFAULT_BIN)


_all_breakwaters = []
_instance_counter = itertools.count(1)


def pid_running(pid):
    """True while the process exists and is not a zombie (a zombie has already exited)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    # The command name is in parentheses and may contain spaces: the state follows the last ')'.
    return stat[stat.rindex(")") + 2] not in ("Z", "X")


class Breakwater:
    """Runs the proxy with a configuration dict. Use as a context manager or call start()/stop().
    stderr and stdout of the master go to files in tmp_path; unless the configuration sets
    them, log.error_log and log.access_log also point to files there."""

    def __init__(self, config, tmp_path, env=None, binary=None, start=True, ready_timeout=15.0):
        self.tmp_path = Path(tmp_path)
        self.n = next(_instance_counter)
        self.config = copy.deepcopy(config)
        log = self.config.setdefault("log", {})
        log.setdefault("error_log", str(self.tmp_path / ("bw%d-error.log" % self.n)))
        log.setdefault("access_log", str(self.tmp_path / ("bw%d-access.log" % self.n)))
        self.config_path = self.tmp_path / ("bw%d.json" % self.n)
        self.stderr_path = self.tmp_path / ("bw%d.stderr" % self.n)
        self.stdout_path = self.tmp_path / ("bw%d.stdout" % self.n)
        el, al = log.get("error_log"), log.get("access_log")
        self.error_log_path = Path(el) if el and el not in ("stderr",) else self.stderr_path
        self.access_log_path = (Path(al) if al and al not in ("stdout", "off")
                                else self.stdout_path)
        self.binary = Path(binary) if binary else binary_path()
        self.env = dict(os.environ)
        for k, v in (env or {}).items():
            if v is None:
                self.env.pop(k, None)
            else:
                self.env[k] = str(v)
        self.ready_timeout = ready_timeout * SLOW
        self.proc = None
        self.returncode = None
        self.write_config()
        _all_breakwaters.append(self)
        if start:
            self.start()

    # -- config --------------------------------------------------------------------------------
    def write_config(self, config=None):
        """(Re)writes the configuration file, e.g. before a SIGHUP reload."""
        if config is not None:
            log = config.setdefault("log", {})
            for k, v in self.config.get("log", {}).items():
                log.setdefault(k, v)
            self.config = copy.deepcopy(config)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.config, indent=2))
        os.replace(tmp, self.config_path)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self):
        if not self.binary.exists():
            raise HarnessError("breakwater binary not found at %s (build it, or set "
                               "BREAKWATER_BIN)" % self.binary)
        self.stderr_file = open(self.stderr_path, "ab")
        self.stdout_file = open(self.stdout_path, "ab")
        self.proc = subprocess.Popen([str(self.binary), "-c", str(self.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=self.stdout_file,
                                     stderr=self.stderr_file, env=self.env,
                                     cwd=str(self.tmp_path))
        try:
            self.wait_ready(self.ready_timeout)
        except Exception:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout=15.0):
        """Waits until every listener accepts and the admin /healthz answers 200."""
        end = deadline_after(timeout)
        ports = [self.listener_port(i) for i in range(len(self.config.get("listeners", [])))]
        pending = list(ports)
        while True:
            if self.proc.poll() is not None:
                raise HarnessError("breakwater exited with %s during startup:\n%s"
                                   % (self.proc.returncode, self.output_excerpt()))
            pending = [p for p in pending if not _tcp_accepts(p)]
            if not pending and self._healthy():
                return
            if time.monotonic() >= end:
                raise HarnessError("breakwater not ready after %.0fs (listeners not accepting: "
                                   "%s):\n%s" % (timeout, pending, self.output_excerpt()))
            time.sleep(0.05)

    def _healthy(self):
        if self.admin_port is None:
            return True
        try:
            status, _, body, _ = http_request(
                self.admin_port,
                b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                timeout=2, close_wait=0)
        except OSError:
            return False
        return status == 200

    def stop(self, timeout=None):
        """SIGTERM, wait (drain time plus a margin), then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if timeout is None:
                timeout = self.config.get("shutdown_timeout_ms", 10000) / 1000.0 + 10 * SLOW
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_all()
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self.returncode = self.proc.returncode
        for f in (getattr(self, "stderr_file", None), getattr(self, "stdout_file", None)):
            if f:
                f.close()
        return self.returncode

    def _kill_all(self):
        for pid in self.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass

    def signal(self, sig):
        self.proc.send_signal(sig)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        self.stop()
        if exc_type is None:
            self.check_sanitizers()

    # -- addresses -----------------------------------------------------------------------------
    def listener_port(self, i=0):
        return _port_of(self.config["listeners"][i]["address"])

    @property
    def port(self):
        return self.listener_port(0)

    @property
    def admin_port(self):
        admin = self.config.get("admin")
        if not admin or admin.get("enabled") is False:
            return None
        return _port_of(admin["address"])

    def url(self, path="/", listener=0):
        return "http://127.0.0.1:%d%s" % (self.listener_port(listener), path)

    # -- processes -----------------------------------------------------------------------------
    def live_worker_pids(self):
        """PIDs of the master's children that are running (not exited zombies), sorted."""
        return sorted(p for p in self.worker_pids() if pid_running(p))

    def worker_pids(self):
        """PIDs of the master's child processes."""
        if self.proc is None:
            return []
        pid = self.proc.pid
        kids = set()
        try:
            for task in os.listdir("/proc/%d/task" % pid):
                try:
                    text = Path("/proc/%d/task/%s/children" % (pid, task)).read_text()
                    kids.update(int(x) for x in text.split())
                except OSError:
                    pass
        except OSError:
            return []
        if not kids:
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    stat = Path("/proc/%s/stat" % entry).read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    kids.add(int(entry))
        return sorted(kids)

    def wait_workers(self, n, timeout=10.0):
        return wait_until(lambda: len(self.worker_pids()) >= n and self.worker_pids(),
                          timeout * SLOW, message="%d worker process(es)" % n)

    @staticmethod
    def proc_status(pid, field):
        """A field of /proc/<pid>/status, e.g. VmHWM in kB as int."""
        for line in Path("/proc/%d/status" % pid).read_text().splitlines():
            if line.startswith(field + ":"):
                value = line.split(":", 1)[1].split()
                return int(value[0]) if value and value[0].isdigit() else " ".join(value)
        return None

    # -- logs ----------------------------------------------------------------------------------
    def read_error_log(self):
        return _read_text(self.error_log_path)

    def read_access_log(self):
        return _read_text(self.access_log_path)

    def read_stderr(self):
        return _read_text(self.stderr_path)

    def wait_log(self, regex, timeout=10.0, access=False):
        """Polls the error log (or the access log) until a line matches; returns the match."""
        pat = re.compile(regex)
        reader = self.read_access_log if access else self.read_error_log

        def check():
            for line in reader().splitlines():
                m = pat.search(line)
                if m:
                    return m
            return None
        return wait_until(check, timeout * SLOW, message="log line matching %r" % regex)

    def output_excerpt(self, limit=4000):
        parts = []
        for label, path in (("stderr", self.stderr_path), ("error log", self.error_log_path)):
            text = _read_text(path)
            if text:
                parts.append("--- %s (%s) ---\n%s" % (label, path.name, text[-limit:]))
        return "\n".join(parts) or "(no output)"

    def sanitizer_report(self):
        """An excerpt of the first sanitizer report in stderr or the error log, or None."""
        paths = [self.stderr_path]
        if self.error_log_path != self.stderr_path:
            paths.append(self.error_log_path)
        for path in paths:
            text = _read_text(path)
            for marker in SANITIZER_MARKERS:
                i = text.find(marker)
                if i >= 0:
                    start = text.rfind("\n", 0, max(0, i - 200)) + 1
                    return "%s:\n%s" % (path.name, text[start:start + 6000])
        return None

    def check_sanitizers(self):
        report = self.sanitizer_report()
        if report:
            raise AssertionError("sanitizer report from breakwater:\n" + report)


def _read_text(path):
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Byte patterns for large transfers: a period of 251 bytes (prime) catches lost, duplicated or
# reordered pieces that a power-of-two period would hide.

PATTERN_PERIOD = 251
_PATTERN_BLOCK = bytes((i * 7 + 3) % 256 for i in range(PATTERN_PERIOD))


class Pattern:
    """Generates and verifies the repeating test pattern at any stream offset."""

    def __init__(self, piece=1 << 20):
        self.piece = piece
        self.buf = _PATTERN_BLOCK * (piece // PATTERN_PERIOD + 2)

    def slice(self, offset, n):
        start = offset % PATTERN_PERIOD
        return memoryview(self.buf)[start:start + n]

    def generate(self, total):
        """Yields memoryviews covering `total` bytes of pattern."""
        off = 0
        while off < total:
            n = min(self.piece, total - off)
            yield self.slice(off, n)
            off += n


class PatternChecker:
    """Sink that counts bytes and checks them against the pattern."""

    def __init__(self):
        self.pattern = Pattern()
        self.count = 0
        self.bad_offset = None

    def __call__(self, data):
        mv = memoryview(data)
        pos = 0
        while pos < len(mv):
            n = min(len(mv) - pos, self.pattern.piece)
            if self.bad_offset is None and mv[pos:pos + n] != self.pattern.slice(self.count, n):
                self.bad_offset = self.count
            self.count += n
            pos += n

    @property
    def ok(self):
        return self.bad_offset is None


# ---------------------------------------------------------------------------------------------
# Which worker serves a connection (breakers, rate limits and metrics live in shared memory;
# tests prove it by spreading requests over known workers)

def _hex_endpoint(port):
    """The /proc/net/tcp spelling of 127.0.0.1:port."""
    return "0100007F:%04X" % port


def _server_side_inode(listen_port, client_port):
    """Inode of the proxy's accepted socket for a client connection, or None."""
    local, remote = _hex_endpoint(listen_port), _hex_endpoint(client_port)
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) > 9 and f[1] == local and f[2] == remote:
            return f[9]
    return None


def _pids_holding(inode, pids):
    target = "socket:[%s]" % inode
    owners = []
    for pid in pids:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == target:
                    owners.append(pid)
                    break
            except OSError:
                continue
    return owners


def connection_owner(bw, client, listener=0, timeout=5.0):
    """PID of the worker that accepted this Client's connection (polls until one has it)."""
    lport = bw.listener_port(listener)
    cport = client.sock.getsockname()[1]

    def owner():
        inode = _server_side_inode(lport, cport)
        if inode is None or inode == "0":
            return None
        owners = _pids_holding(inode, bw.worker_pids())
        return owners[0] if len(owners) == 1 else None
    return wait_until(owner, timeout * SLOW, interval=0.005,
                      message="a worker to accept the connection from port %d" % cport)


def spread_connections(bw, per_worker, workers=2, listener=0, max_attempts=400, timeout=10.0):
    """Opens client connections until each of `workers` worker processes has accepted at least
    `per_worker` of them (connections beyond that are closed). Returns {pid: [Client, ...]}.
    Requests sent on these connections are known to be served by that worker."""
    groups = {}
    extra = []
    end = deadline_after(timeout * SLOW)
    try:
        for _ in range(max_attempts):
            if (len(groups) >= workers
                    and all(len(v) >= per_worker for v in groups.values())):
                break
            if time.monotonic() >= end:
                break
            c = Client(bw.listener_port(listener))
            try:
                pid = connection_owner(bw, c, listener)
            except AssertionError:
                c.close()
                continue
            lst = groups.setdefault(pid, [])
            if len(lst) < per_worker:
                lst.append(c)
            else:
                extra.append(c)
    finally:
        for c in extra:
            c.close()
    if len(groups) < workers or any(len(v) < per_worker for v in groups.values()):
        for v in groups.values():
            for c in v:
                c.close()
        raise HarnessError("could not get %d connection(s) on each of %d workers (got %s)"
                           % (per_worker, workers, {p: len(v) for p, v in groups.items()}))
    return groups


def interleave(groups):
    """[a1, b1, a2, b2, ...] from {pid: [a1, a2], pid2: [b1, b2]}: alternates workers."""
    lists = [list(v) for _, v in sorted(groups.items())]
    out = []
    for i in range(max(len(v) for v in lists)):
        for v in lists:
            if i < len(v):
                out.append(v[i])
    return out


# ---------------------------------------------------------------------------------------------
# Admin listener and metrics

def admin_request(bw, method="GET", path="/", token=None, headers=None, port=None, timeout=10.0):
    """One request on a fresh admin connection; returns the Response."""
    hs = list(headers or [])
    if token is not None:
        hs.append(("Authorization", "Bearer %s" % token))
    hs.append(("Connection", "close"))
    with Client(port or bw.admin_port, timeout=timeout) as c:
        c.send(build_request(method, path, hs, host="localhost"))
        return c.read_response(method)


def admin_json(bw, path, token=None, expect=200):
    r = admin_request(bw, "GET", path, token=token)
    assert r.status == expect, (path, r)
    return r.json()


def upstream_state(bw, name, token=None):
    """The element of GET /upstreams for this upstream."""
    doc = admin_json(bw, "/upstreams", token=token)
    for u in doc["upstreams"]:
        if u["name"] == name:
            return u
    raise AssertionError("upstream %r not in /upstreams: %r" % (name, doc))


def breaker_state(bw, name, token=None):
    return upstream_state(bw, name, token)["circuit_breaker"]["state"]


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+-?\d+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def parse_metrics(text):
    """Samples of a Prometheus text exposition: [(name, {label: value}, float)]."""
    samples = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise AssertionError("unparsable metrics line: %r" % line)
        labels = {}
        rest = m.group(3) or ""
        pos = 0
        while pos < len(rest):
            lm = _LABEL.match(rest, pos)
            if not lm:
                raise AssertionError("unparsable labels in line: %r" % line)
            labels[lm.group(1)] = re.sub(r'\\(.)', lambda x: {"n": "\n"}.get(x.group(1),
                                                                        x.group(1)), lm.group(2))
            pos = lm.end()
        samples.append((m.group(1), labels, float(m.group(4))))
    return samples


def scrape(bw, token=None):
    r = admin_request(bw, "GET", "/metrics", token=token)
    assert r.status == 200, r
    return parse_metrics(r.body.decode("utf-8"))


def metric_sum(samples, name, **labels):
    """Sum of the samples of `name` whose labels include these; None when there is none."""
    values = [v for n, ls, v in samples
              if n == name and all(ls.get(k) == str(want) for k, want in labels.items())]
    return sum(values) if values else None


def wait_metric(bw, name, expected, timeout=5.0, token=None, **labels):
    """Polls /metrics until the sum of `name` with these labels equals `expected` (a request's
    counters may be updated just after its response went out); returns the samples. Fails with
    the last value seen."""
    seen = []

    def check():
        samples = scrape(bw, token)
        seen[:] = [metric_sum(samples, name, **labels)]
        return samples if seen[0] == expected else None
    try:
        return wait_until(check, timeout * SLOW, interval=0.05,
                          message="%s%s == %s" % (name, labels or "", expected))
    except AssertionError:
        raise AssertionError("%s%s is %s, expected %s" % (name, labels or "", seen[0] if seen
                                                         else None, expected))


# ---------------------------------------------------------------------------------------------
# Redis (fleet state): a real redis-server on a free loopback port, and a small RESP client

class RedisError(Exception):
    """An error reply from Redis (the text after the '-')."""


class RedisClient:
    """A minimal RESP2 client over one TCP connection; every call is bounded by a timeout.
    call() returns str for simple and bulk strings, int, list, or None; raises RedisError on
    an error reply."""

    def __init__(self, port, password=None, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout * SLOW)
        self.timeout = timeout * SLOW
        self.reader = _Reader(self.sock)
        if password is not None:
            self.call("AUTH", password)

    def call(self, *args, timeout=None):
        out = bytearray(b"*%d\r\n" % len(args))
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(b), b)
        self.sock.settimeout(self.timeout)
        self.sock.sendall(out)
        return self._reply(deadline_after(timeout * SLOW if timeout else self.timeout))

    def _reply(self, deadline):
        line = self.reader.read_line(deadline)
        if not line.endswith(b"\r\n"):
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2].decode("utf-8", "replace")
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RedisError(rest)
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data, got = self.reader.read_exact(n + 2, deadline)
            if got < n + 2:
                raise ConnectionError("Redis closed the connection inside a reply")
            return data[:-2].decode("utf-8", "replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply(deadline) for _ in range(n)]
        raise ValueError("unexpected RESP line %r" % line)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RedisServer:
    """Debian's redis-server on a free 127.0.0.1 port, without persistence (every start is
    empty) and with DEBUG allowed from loopback. Faults for tests: pause()/resume() (SIGSTOP,
    SIGCONT), kill() (SIGKILL), stop() (SHUTDOWN NOSAVE), restart() (stop and start empty on
    the same port). call() uses a fresh connection; cli() runs redis-cli as an operator would."""

    def __init__(self, tmp_path, password=None, port=None, start=True):
        self.tmp_path = Path(tmp_path)
        self.password = password
        self.port = port or free_port()
        self.n = next(_instance_counter)
        self.log_path = self.tmp_path / ("redis%d.log" % self.n)
        self.proc = None
        self.paused = False
        _all_redis.append(self)
        if start:
            self.start()

    @property
    def url(self):
        auth = ":%s@" % self.password if self.password else ""
        return "redis://%s127.0.0.1:%d" % (auth, self.port)

    def start(self, timeout=10.0):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--enable-debug-command", "local",
                "--dir", str(self.tmp_path), "--dbfilename", "redis%d.rdb" % self.n,
                "--logfile", str(self.log_path), "--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=str(self.tmp_path))
        self.paused = False

        def answers():
            if self.proc.poll() is not None:
                raise HarnessError("redis-server exited with %s at start:\n%s"
                                   % (self.proc.returncode, _read_text(self.log_path)[-2000:]))
            try:
                return self.call("PING", timeout=1) == "PONG"
            except (OSError, RedisError, ValueError):
                return False
        wait_until(answers, timeout * SLOW, interval=0.02,
                   message="redis-server to answer on port %d" % self.port)
        return self

    def client(self, timeout=5.0):
        return RedisClient(self.port, self.password, timeout)

    def call(self, *args, timeout=5.0):
        with self.client(timeout) as c:
            return c.call(*args)

    def cli(self, *args, timeout=10.0):
        """redis-cli with these arguments; returns its stdout (stripped)."""
        cmd = ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port)]
        if self.password:
            cmd += ["-a", self.password, "--no-auth-warning"]
        out = subprocess.run(cmd + [str(a) for a in args], stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=timeout * SLOW, check=True)
        return out.stdout.decode("utf-8", "replace").strip()

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        if self.running():
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self):
        if self.proc is None:
            return
        if self.running():
            self.proc.kill()
        self.proc.wait(10)
        self.paused = False

    def stop(self):
        """SHUTDOWN NOSAVE (the data is dropped), falling back to SIGKILL."""
        if not self.running():
            return
        if self.paused:
            self.resume()
        try:
            self.call("SHUTDOWN", "NOSAVE", timeout=2)
        except (OSError, RedisError, ValueError, ConnectionError):
            pass  # the connection ends with the server: no reply is the normal outcome
        try:
            self.proc.wait(5 * SLOW)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self):
        """Stops and starts an empty server on the same port."""
        self.stop()
        return self.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


_all_redis = []


def redis_keys(redis, pattern="*"):
    return sorted(redis.call("KEYS", pattern))


def redis_hash(redis, key):
    """HGETALL as a dict."""
    flat = redis.call("HGETALL", key) or []
    return dict(zip(flat[0::2], flat[1::2]))


def readyz(bw, port=None):
    """(status, document) of GET /readyz on the admin listener."""
    r = admin_request(bw, "GET", "/readyz", port=port)
    return r.status, r.json()


def readyz_check(doc, name):
    for c in doc.get("checks", []):
        if c.get("name") == name:
            return c
    raise AssertionError("no check %r in /readyz: %r" % (name, doc))


# ---------------------------------------------------------------------------------------------
# Admin listener (test_admin.py, test_status_page.py)

def cpu_seconds(pid):
    """User + system CPU time a process has used so far, from /proc/<pid>/stat."""
    stat = Path("/proc/%d/stat" % pid).read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def raw_exchange(port, data, timeout=10.0):
    """Sends raw bytes on a fresh connection and reads until the peer closes (or timeout).
    Returns (bytes received, how it ended: "closed", "reset" or "timeout")."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = b""
    end = deadline_after(timeout)
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return got, "timeout"
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return got, "timeout"
            except ConnectionResetError:
                return got, "reset"
            if not chunk:
                return got, "closed"
            got += chunk
    finally:
        s.close()


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket: pass .env_value as
    NOTIFY_SOCKET. Each received message is (sender pid, {KEY: VALUE}); the sender's pid comes
    from the kernel (SCM_CREDENTIALS), so a test can tell who sent it."""

    def __init__(self, tmp_path, abstract=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = "bw-notify-%d-%d" % (os.getpid(), next(_instance_counter))
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = str(Path(tmp_path) / ("notify-%d.sock" % next(_instance_counter)))
            self.sock.bind(path)
            self.env_value = path
        self.messages = []

    def recv(self, timeout):
        """The next message, or None when none arrives within timeout seconds."""
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return None
        creds = struct.calcsize("3i")
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
        pid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:creds])[0]
        fields = {}
        for line in data.decode("utf-8", "replace").split("\n"):
            if "=" in line:
                k, v = line.split("=", 1)
                fields[k] = v
        msg = (pid, fields)
        self.messages.append(msg)
        return msg

    def wait_for(self, key, timeout=10.0):
        """Reads messages until one carries key; returns it (HarnessError on timeout)."""
        end = deadline_after(timeout)
        while True:
            msg = self.recv(end - time.monotonic())
            if msg is not None and key in msg[1]:
                return msg
            if time.monotonic() >= end:
                raise HarnessError("no %s notification within %.1f s (got %r)"
                                   % (key, timeout, self.messages))

    def close(self):
        self.sock.close()


class KeepAliveLoad:
    """n threads, each with one keep-alive connection sending GET requests back to back. A
    response with Connection: close followed by the close is clean (the thread reconnects); a
    connection that ends with a request in flight, an error status or a truncated response is
    a failure. With refused_ok, a refused connect (the proxy has stopped listening) ends that
    thread instead of counting as a failure. Bounded: stop() ends every thread within the
    request timeout."""

    def __init__(self, port, n=16, target="/load", timeout=10.0, refused_ok=False):
        self.port, self.n, self.target = port, n, target
        self.timeout = timeout
        self.refused_ok = refused_ok
        self.lock = threading.Lock()
        self.ok = self.failed = self.clean_closes = self.refused = 0
        self.failures = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        self._req = ("GET %s HTTP/1.1\r\nHost: load.test\r\n\r\n" % target).encode()

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def _fail(self, why):
        with self.lock:
            self.failed += 1
            if len(self.failures) < 20:
                self.failures.append(why)

    def _run(self):
        c = None
        while not self._stop.is_set():
            if c is None:
                try:
                    c = Client(self.port, timeout=self.timeout)
                except ConnectionRefusedError:
                    if self.refused_ok:
                        with self.lock:
                            self.refused += 1
                        return
                    self._fail("connect refused")
                    time.sleep(0.01)
                    continue
                except OSError as e:
                    self._fail("connect: %r" % e)
                    time.sleep(0.01)
                    continue
            try:
                c.send(self._req)
                r = c.read_response(timeout=self.timeout)
            except (NoResponse, OSError, ValueError) as e:
                self._fail("request in flight: %r" % e)
                c.close()
                c = None
                continue
            if r.status != 200 or not r.complete:
                self._fail("response %r" % r)
            else:
                with self.lock:
                    self.ok += 1
            if "close" in _connection_tokens(r.headers):
                with self.lock:
                    self.clean_closes += 1
                c.close()
                c = None
        if c is not None:
            c.close()

    def total(self):
        with self.lock:
            return self.ok + self.failed

    def stop(self):
        self._stop.set()
        for t in self.threads:
            t.join(self.timeout * SLOW + 5)
        return self


def server_rx_queue(port, client_port):
    """Bytes the server side of a loopback TCP connection (local port `port`, peer port
    `client_port`) has received but not read yet, from /proc/net/tcp; None when not found."""
    want_local, want_peer = ":%04X" % port, ":%04X" % client_port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[1].endswith(want_local) and f[2].endswith(want_peer):
                return int(f[4].split(":")[1], 16)
    return None


# Upstream servers on other loopback addresses (DNS tests give several servers one port)

def upstream_on(host, handler=None, port=0):
    """A started Upstream listening on host (for example 127.0.0.2) instead of 127.0.0.1."""
    up = Upstream(handler)
    up._listener.close()
    up._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    up._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    up._listener.bind((host, port))
    up._listener.listen(128)
    up.port = up._listener.getsockname()[1]
    up.address = "%s:%d" % (host, up.port)
    return up.start()


class RedisSentinel:
    """Debian's redis-sentinel on a free 127.0.0.1 port, monitoring one master (quorum 1) with
    short detection and failover times, so that a test sees a failover within seconds.
    master_port may name a port where nothing listens (a sentinel naming an unreachable
    master). call() talks to the sentinel itself."""

    def __init__(self, tmp_path, master_port, name="mymaster", down_after_ms=1000):
        self.tmp_path = Path(tmp_path)
        self.port = free_port()
        self.n = next(_instance_counter)
        self.name = name
        self.conf = self.tmp_path / ("sentinel%d.conf" % self.n)
        self.log_path = self.tmp_path / ("sentinel%d.log" % self.n)
        self.conf.write_text(
            "port %d\nbind 127.0.0.1\ndaemonize no\nlogfile %s\ndir %s\n"
            "sentinel monitor %s 127.0.0.1 %d 1\n"
            "sentinel down-after-milliseconds %s %d\n"
            "sentinel failover-timeout %s %d\n"
            "sentinel parallel-syncs %s 1\n"
            % (self.port, self.log_path, self.tmp_path, name, master_port, name,
               int(down_after_ms * SLOW), name, int(3000 * SLOW), name))
        self.proc = subprocess.Popen(["redis-sentinel", str(self.conf)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=str(self.tmp_path))
        _all_redis.append(self)

        def answers():
            if self.proc.poll() is not None:
                raise HarnessError("redis-sentinel exited at start:\n%s"
                                   % _read_text(self.log_path)[-2000:])
            try:
                return self.call("PING", timeout=1) == "PONG"
            except (OSError, RedisError, ValueError):
                return False
        wait_until(answers, 10 * SLOW, interval=0.02,
                   message="redis-sentinel to answer on port %d" % self.port)

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def call(self, *args, timeout=5.0):
        with RedisClient(self.port, None, timeout) as c:
            return c.call(*args)

    def master_port(self):
        addr = self.call("SENTINEL", "get-master-addr-by-name", self.name)
        return int(addr[1]) if addr else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        if self.proc is not None and self.running():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    # RedisServer's teardown protocol
    paused = False

    def resume(self):
        pass


class KeepAliveGets:
    """GETs on one keep-alive connection, reopened only when the proxy closes it: for tests
    that send many requests in a loop without leaving thousands of TIME_WAIT sockets behind
    (which slow every later reader of /proc/net/tcp)."""

    def __init__(self, port):
        self.port = port
        self.client = None

    def get(self, target="/", headers=None):
        if self.client is None:
            self.client = Client(self.port)
        self.client.send(build_request("GET", target, list(headers or [])))
        r = self.client.read_response()
        if "close" in (r.header("connection") or "").lower():
            self.close()
        return r

    def close(self):
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def unquarantined_env():
    """Environment for a proxy whose memory a test measures: AddressSanitizer keeps freed
    blocks in a quarantine (up to 256 MB) that RSS and VmHWM would count as growth, so sanitized
    runs turn it off; other runs need nothing."""
    if not SANITIZED:
        return {}
    return {"ASAN_OPTIONS": ":".join(o for o in (os.environ.get("ASAN_OPTIONS", ""),
                                                 "quarantine_size_mb=0",
                                                 "thread_local_quarantine_size_kb=0") if o)}
