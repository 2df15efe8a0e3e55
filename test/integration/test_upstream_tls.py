"""TLS and mutual TLS from the proxy to upstreams, verification on by default.

The test makes its own PKI with the openssl command (a CA, a server certificate for
upstream.test and 127.0.0.1, a self-signed impostor, a client certificate) and runs a small TLS
HTTP server with Python's ssl module. A certificate that does not verify gives 502, one clear log
line, the reason in /upstreams, and a breaker failure.
"""

import json
import socket
import ssl
import subprocess
import threading

import pytest

import harness
from harness import Client, build_request

SLOW = harness.SLOW


def _run(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
         "-days", "2", "-subj", "/CN=test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:upstream.test,IP:127.0.0.1\n")
    _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=upstream.test", cwd=d)
    _run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out",
         "rogue.crt", "-days", "2", "-subj", "/CN=upstream.test",
         "-addext", "subjectAltName=DNS:upstream.test,IP:127.0.0.1", cwd=d)
    _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
         "-subj", "/CN=breakwater", cwd=d)
    _run("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "client.crt", "-days", "2", cwd=d)
    return d


class TlsUpstream:
    """A TLS HTTP/1.1 server on 127.0.0.1 answering 200 "tls ok" (and the client certificate's
    CN in X-Client-CN when one was presented)."""

    def __init__(self, cert, key, client_ca=None):
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        if client_ca:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(client_ca)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.address = "127.0.0.1:%d" % self.port
        self.served = 0
        self.handshake_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw):
        raw.settimeout(5)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshake_errors += 1
            raw.close()
            return
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(4096)
                if not piece:
                    return
                data += piece
            cn = ""
            peer = conn.getpeercert()
            if peer:
                cn = dict(x[0] for x in peer.get("subject", ()))["commonName"]
            body = b"tls ok"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Client-CN: %s\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), cn.encode(), body))
            self.served += 1
        except (ssl.SSLError, OSError):
            pass
        finally:
            conn.close()

    def stop(self):
        self._stop.set()
        self.sock.close()
        self._thread.join(5)


def tls_config(up, tls, **extra):
    u = {"retries": 0, "tls": tls, "circuit_breaker": {"failure_threshold": 2}}
    u.update(extra)
    return harness.base_config([up.address], workers=2, upstreams={"api": u})


def one(bw):
    with Client(bw.port) as c:
        c.send(build_request("GET", "/", [("Connection", "close")]))
        return c.read_response()


def test_verified_tls_upstream(pki, breakwater_factory):
    up = TlsUpstream(str(pki / "server.crt"), str(pki / "server.key"))
    try:
        bw = breakwater_factory(tls_config(up, {"ca": str(pki / "ca.crt"),
                                                "server_name": "upstream.test"}))
        for _ in range(3):
            r = one(bw)
            assert r.status == 200 and r.body == b"tls ok", r
        # Without server_name the IP address is what the certificate must name (it does).
        bw2 = breakwater_factory(tls_config(up, {"ca": str(pki / "ca.crt")}))
        assert one(bw2).status == 200
        doc = harness.upstream_state(bw, "api")["servers"][0]
        assert doc["tls_error"] is None, doc
    finally:
        up.stop()


def test_certificate_that_does_not_verify(pki, breakwater_factory):
    up = TlsUpstream(str(pki / "rogue.crt"), str(pki / "rogue.key"))
    try:
        bw = breakwater_factory(tls_config(up, {"ca": str(pki / "ca.crt"),
                                                "server_name": "upstream.test"}))
        for _ in range(2):
            r = one(bw)
            assert r.status == 502, r
            assert json.loads(r.body)["error"] == "upstream connect failed" or \
                json.loads(r.body)["upstream"] == "api", r.body
        assert up.served == 0
        bw.wait_log(r"upstream api: server %s: certificate verify failed: self.signed certificate"
                    % up.address.replace(".", r"\."))
        doc = harness.upstream_state(bw, "api")
        tls_error = doc["servers"][0]["tls_error"]
        assert tls_error and tls_error["message"].startswith("certificate verify failed"), doc
        harness.wait_until(lambda: harness.breaker_state(bw, "api") == "open", 5 * SLOW,
                           message="the breaker to count the TLS failures")
        # The wrong name fails too, with the CA's own certificate.
        up2 = TlsUpstream(str(pki / "server.crt"), str(pki / "server.key"))
        try:
            bw2 = breakwater_factory(tls_config(up2, {"ca": str(pki / "ca.crt"),
                                                      "server_name": "other.test"}))
            assert one(bw2).status == 502
            bw2.wait_log(r"certificate verify failed: [Hh]ostname mismatch")
            # verify: false is the operator's explicit choice: it connects.
            bw3 = breakwater_factory(tls_config(up, {"verify": False}))
            assert one(bw3).status == 200
        finally:
            up2.stop()
    finally:
        up.stop()


def test_mutual_tls(pki, breakwater_factory):
    up = TlsUpstream(str(pki / "server.crt"), str(pki / "server.key"),
                     client_ca=str(pki / "ca.crt"))
    try:
        tls = {"ca": str(pki / "ca.crt"), "server_name": "upstream.test",
               "cert": str(pki / "client.crt"), "key": str(pki / "client.key")}
        bw = breakwater_factory(tls_config(up, tls))
        r = one(bw)
        assert r.status == 200 and r.header("x-client-cn") == "breakwater", r
        # Without a client certificate the upstream refuses the handshake.
        bw2 = breakwater_factory(tls_config(up, {"ca": str(pki / "ca.crt"),
                                                 "server_name": "upstream.test"}))
        assert one(bw2).status == 502
        bw2.wait_log(r"upstream api: server .*: TLS handshake failed")
    finally:
        up.stop()


def test_tls_config_errors(pki, tmp_path, bw_bin):
    cfg = harness.base_config(["127.0.0.1:9"], upstreams={"api": {"tls": {
        "ca": str(tmp_path / "missing.crt"), "cert": str(pki / "client.crt"),
        "server_name": "bad name", "verify": "yes"}}})
    path = tmp_path / "tls.json"
    path.write_text(json.dumps(cfg, indent=2))
    p = subprocess.run([str(bw_bin), "-t", "-c", str(path)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode != 0
    for want in ("upstreams.api.tls.ca", "upstreams.api.tls.server_name",
                 "upstreams.api.tls.verify", "needs both \"cert\" and \"key\""):
        assert want in p.stderr, p.stderr


def test_health_checks_speak_tls_too(pki, breakwater_factory):
    good = TlsUpstream(str(pki / "server.crt"), str(pki / "server.key"))
    rogue = TlsUpstream(str(pki / "rogue.crt"), str(pki / "rogue.key"))
    try:
        cfg = tls_config(good, {"ca": str(pki / "ca.crt"), "server_name": "upstream.test"},
                         health_check={"interval_ms": int(200 * SLOW),
                                       "timeout_ms": int(1000 * SLOW),
                                       "unhealthy_threshold": 1, "healthy_threshold": 1})
        cfg["upstreams"]["api"]["servers"] = [good.address, rogue.address]
        bw = breakwater_factory(cfg)

        def checks():
            docs = {s["address"]: s for s in harness.upstream_state(bw, "api")["servers"]}
            g, r = docs[good.address]["last_check"], docs[rogue.address]["last_check"]
            return g and r and (g["result"], g["status"], r["result"]) == ("pass", 200, "tls")
        harness.wait_until(checks, 10 * SLOW, message="a TLS check passing and one failing")
        docs = {s["address"]: s for s in harness.upstream_state(bw, "api")["servers"]}
        assert docs[rogue.address]["healthy"] is False and docs[good.address]["healthy"] is True
        for _ in range(4):
            assert one(bw).status == 200  # the rogue server is skipped
        assert rogue.served == 0
    finally:
        good.stop()
        rogue.stop()
