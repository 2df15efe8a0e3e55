"""Request bodies that arrive while the upstream connection is still being made: however many
pieces the client sent them in, all of it reaches the upstream once the connection completes.

The upstream's connect is made slow the way a loaded server makes it slow: its accept queue is
full (listen backlog 0 with one connection already waiting), so the kernel drops the proxy's SYN
and the connection completes only when the SYN is retransmitted, about a second later."""

import socket
import threading
import time

import harness
from harness import Client, build_request, chunked_body

SLOW = harness.SLOW


class SlowConnectUpstream:
    """Accepts nothing until `delay` seconds have passed, then serves requests: reads a whole
    request (Content-Length or chunked), records its decoded body and answers with its length."""

    def __init__(self, delay=1.2):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.address = "127.0.0.1:%d" % self.port
        # Fills the accept queue: the next SYN is dropped until this one is accepted.
        self.filler = socket.create_connection(("127.0.0.1", self.port))
        self.delay = delay
        self.received = []
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        time.sleep(self.delay)
        filler, _ = self.sock.accept()
        filler.close()
        self.sock.settimeout(0.2)
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(30 * SLOW)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                data += self._recv(conn)
            head, rest = data.split(b"\r\n\r\n", 1)
            lower = head.lower()
            if b"transfer-encoding: chunked" in lower:
                body, rest = b"", rest
                while True:
                    while b"\r\n" not in rest:
                        rest += self._recv(conn)
                    size_line, rest = rest.split(b"\r\n", 1)
                    size = int(size_line.split(b";")[0], 16)
                    while len(rest) < size + 2:
                        rest += self._recv(conn)
                    if size == 0:
                        break
                    body += rest[:size]
                    rest = rest[size + 2:]
            else:
                length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                while len(rest) < length:
                    rest += self._recv(conn)
                body = rest[:length]
            self.received.append(body)
            out = str(len(body)).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(out), out))
        except Exception as e:  # noqa: BLE001 - recorded for the assertion message
            self.received.append(e)
        finally:
            conn.close()

    @staticmethod
    def _recv(conn):
        chunk = conn.recv(65536)
        if not chunk:
            raise EOFError("the proxy closed the upstream connection mid-request")
        return chunk

    def stop(self):
        self.stopped = True
        self.filler.close()
        self.sock.close()


def upload(bw, body_headers, body):
    with Client(bw.port, timeout=30) as c:
        c.send(build_request("POST", "/upload", body_headers + [("Connection", "close")],
                             body=body, content_length=False))
        return c.read_response(timeout=30)


def test_chunked_upload_completes_behind_a_slow_connect(breakwater_factory):
    up = SlowConnectUpstream()
    try:
        cfg = harness.base_config([up.address], workers=1)
        cfg["upstreams"]["api"]["connect_timeout_ms"] = 10000
        bw = breakwater_factory(cfg)
        chunks = [bytes([65 + i % 26]) * 4000 for i in range(40)]
        # Each chunk in its own write, so the proxy reads them as many separate pieces.
        with Client(bw.port, timeout=30) as c:
            c.send(build_request("POST", "/upload", [("Transfer-Encoding", "chunked"),
                                                     ("Connection", "close")],
                                 content_length=False))
            raw = chunked_body(chunks)
            step = 4008
            for i in range(0, len(raw), step):
                c.send(raw[i:i + step])
                time.sleep(0.002)
            r = c.read_response(timeout=30 * SLOW)
        assert r.status == 200, r
        assert r.body == b"160000", r.body
        assert up.received == [b"".join(chunks)], [len(x) if isinstance(x, bytes) else x
                                                   for x in up.received]
    finally:
        up.stop()


def test_length_upload_completes_behind_a_slow_connect(breakwater_factory):
    up = SlowConnectUpstream()
    try:
        cfg = harness.base_config([up.address], workers=1)
        cfg["upstreams"]["api"]["connect_timeout_ms"] = 10000
        bw = breakwater_factory(cfg)
        body = b"z" * 160000
        r = upload(bw, [("Content-Length", str(len(body)))], body)
        assert r.status == 200 and r.body == b"160000", r
    finally:
        up.stop()
