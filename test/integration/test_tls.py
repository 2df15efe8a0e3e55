"""TLS termination, end to end: real clients (curl, openssl s_client, Python's ssl) against a real
proxy with a self-signed certificate made for the test.

What is checked: requests through a TLS listener reach the upstream with X-Forwarded-Proto:
https; TLS 1.2 and 1.3 are accepted and TLS 1.1 refused by the server; ALPN settles on
http/1.1; a session resumes on any worker and after a SIGHUP reload (the ticket keys survive
it); the certificate is re-read on reload, and a broken one is refused with the old one kept;
plaintext sent to a TLS port is dropped without hurting the worker.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest

import harness

SLOW = harness.SLOW
OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")

REQUEST = b"GET /tls-probe HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def make_cert(directory, name="server", cn="localhost", key_type="rsa:2048"):
    """Self-signed certificate for localhost and 127.0.0.1; returns (cert_path, key_path)."""
    cert = os.path.join(str(directory), name + ".crt")
    key = os.path.join(str(directory), name + ".key")
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", key_type, "-nodes", "-keyout", key, "-out", cert,
         "-days", "2", "-subj", "/CN=" + cn,
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return cert, key


@pytest.fixture
def cert(tmp_path):
    return make_cert(tmp_path)


def tls_config(upstream, cert_key, workers=1, **overrides):
    cfg = harness.base_config([upstream.address], workers=workers, **overrides)
    cfg["listeners"].append({
        "address": "127.0.0.1:%d" % harness.free_port(),
        "tls": {"cert": cert_key[0], "key": cert_key[1]},
    })
    return cfg


def s_client(port, cafile, *args, stdin=REQUEST, timeout=20):
    """Runs openssl s_client once; returns (returncode, combined output)."""
    cmd = [OPENSSL, "s_client", "-connect", "127.0.0.1:%d" % port, "-servername", "localhost",
           "-CAfile", cafile, "-ign_eof"] + list(args)
    p = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout * SLOW)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def session_line(output):
    """The "New, TLSv1.3, Cipher is ..." / "Reused, ..." line of the first handshake."""
    m = re.search(r"^(New|Reused), (\S+), Cipher is (\S+)", output, re.M)
    assert m, "no session line in s_client output:\n%s" % output[-3000:]
    return m.group(1), m.group(2).rstrip(","), m.group(3)


def https_get(port, cafile, path="/", headers=None, timeout=10):
    ctx = ssl.create_default_context(cafile=cafile)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout * SLOW)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def live_workers(bw):
    return bw.live_worker_pids()


def reload_and_wait(bw, workers):
    """SIGHUP, then wait until a complete new set of workers serves."""
    old = set(live_workers(bw))
    os.kill(bw.proc.pid, signal.SIGHUP)

    def replaced():
        pids = set(live_workers(bw))
        return len(pids) == workers and not (pids & old)

    harness.wait_until(replaced, 15 * SLOW, message="a new set of %d workers after SIGHUP"
                       % workers)


def test_curl_through_tls_listener(breakwater_factory, upstream, cert):
    if CURL is None:
        pytest.skip("needs curl")
    bw = breakwater_factory(tls_config(upstream, cert))
    port = bw.listener_port(1)
    p = subprocess.run(
        [CURL, "-sS", "--max-time", str(int(10 * SLOW)), "--cacert", cert[0],
         "--resolve", "localhost:%d:127.0.0.1" % port, "-o", "-",
         "-w", "\n%{http_code} %{http_version}",
         "https://localhost:%d/via-curl" % port],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30 * SLOW)
    assert p.returncode == 0, "curl failed: %s" % p.stderr.decode("utf-8", "replace")
    body, _, status_line = p.stdout.rpartition(b"\n")
    assert status_line.split()[0] == b"200", p.stdout
    assert status_line.split()[1] == b"1.1", "curl did not settle on HTTP/1.1: %s" % status_line
    assert body == b"hello from upstream"
    assert "/via-curl" in [r.target for r in upstream.requests]


def test_forwarded_proto_https(breakwater_factory, upstream, cert):
    bw = breakwater_factory(tls_config(upstream, cert))
    status, body = https_get(bw.listener_port(1), cert[0], "/proto-check")
    assert status == 200 and body == b"hello from upstream"
    req = [r for r in upstream.requests if r.target == "/proto-check"][0]
    assert req.headers.get_all("x-forwarded-proto") == ["https"], req.headers

    # And plain HTTP on the other listener says http, whatever the client claims.
    status, _, _, _ = harness.get(bw.listener_port(0), "/proto-plain",
                                  headers=[("X-Forwarded-Proto", "https")])
    assert status == 200
    req = [r for r in upstream.requests if r.target == "/proto-plain"][0]
    assert req.headers.get_all("x-forwarded-proto") == ["http"], req.headers


@pytest.mark.parametrize("flag,version", [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_supported_versions(breakwater_factory, upstream, cert, flag, version):
    bw = breakwater_factory(tls_config(upstream, cert))
    rc, out = s_client(bw.listener_port(1), cert[0], flag, "-verify_return_error")
    assert rc == 0, out[-3000:]
    kind, proto, cipher = session_line(out)
    assert proto == version
    if version == "TLSv1.2":
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
    assert "hello from upstream" in out


@pytest.mark.parametrize("flag", ["-tls1_1", "-tls1"])
def test_old_versions_refused(breakwater_factory, upstream, cert, flag):
    bw = breakwater_factory(tls_config(upstream, cert))
    # SECLEVEL=0 so that it is the server, not this client's own policy, that says no.
    rc, out = s_client(bw.listener_port(1), cert[0], flag, "-cipher", "DEFAULT:@SECLEVEL=0")
    assert rc != 0, out[-3000:]
    assert "alert protocol version" in out, out[-3000:]
    assert "hello from upstream" not in out
    # The worker is unharmed.
    assert https_get(bw.listener_port(1), cert[0])[0] == 200


def test_cbc_only_client_refused(breakwater_factory, upstream, cert):
    bw = breakwater_factory(tls_config(upstream, cert))
    rc, out = s_client(bw.listener_port(1), cert[0], "-tls1_2", "-cipher", "AES128-SHA")
    assert rc != 0
    assert "handshake failure" in out or "no shared cipher" in out, out[-3000:]


def test_alpn(breakwater_factory, upstream, cert):
    bw = breakwater_factory(tls_config(upstream, cert))
    port = bw.listener_port(1)
    rc, out = s_client(port, cert[0], "-alpn", "h2,http/1.1")
    assert rc == 0, out[-3000:]
    assert "ALPN protocol: http/1.1" in out, out[-3000:]
    # Only h2 offered: no ALPN, but the handshake (and HTTP/1.1) still work.
    rc, out = s_client(port, cert[0], "-alpn", "h2")
    assert rc == 0, out[-3000:]
    assert "No ALPN negotiated" in out, out[-3000:]
    assert "hello from upstream" in out


def resume_many(port, cafile, sess, n, proto):
    kinds = []
    for _ in range(n):
        rc, out = s_client(port, cafile, proto, "-sess_in", sess)
        assert rc == 0, out[-3000:]
        kinds.append(session_line(out)[0])
        assert "hello from upstream" in out
    return kinds


@pytest.mark.parametrize("proto", ["-tls1_3", "-tls1_2"])
def test_resumption_across_workers_and_reload(breakwater_factory, upstream, cert, tmp_path,
                                              proto):
    bw = breakwater_factory(tls_config(upstream, cert, workers=2))
    bw.wait_workers(2)
    port = bw.listener_port(1)
    sess = str(tmp_path / "session.pem")

    rc, out = s_client(port, cert[0], proto, "-sess_out", sess)
    assert rc == 0, out[-3000:]
    assert session_line(out)[0] == "New"
    assert os.path.getsize(sess) > 0

    # Ten connections: the kernel spreads them over both workers, and each must resume.
    kinds = resume_many(port, cert[0], sess, 10, proto)
    assert kinds == ["Reused"] * 10, kinds

    # A reload replaces every worker and rebuilds the TLS contexts; the keys stay.
    reload_and_wait(bw, 2)
    kinds = resume_many(port, cert[0], sess, 5, proto)
    assert kinds == ["Reused"] * 5, "after SIGHUP: %s" % kinds


def served_subject(port, cafile):
    rc, out = s_client(port, cafile, "-showcerts")
    m = re.search(r"subject=.*CN\s*=\s*([\w.-]+)", out)
    assert m, out[-3000:]
    return rc, m.group(1)


def test_certificate_reloaded_on_sighup(breakwater_factory, upstream, tmp_path):
    first = make_cert(tmp_path, "live", cn="localhost")
    bw = breakwater_factory(tls_config(upstream, first))
    port = bw.listener_port(1)
    assert served_subject(port, first[0]) == (0, "localhost")

    # Renewed certificate written over the same paths (what certbot or cert-manager does).
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    renewed = make_cert(fresh_dir, "live", cn="renewed.localhost")
    shutil.copy(renewed[0], first[0])
    shutil.copy(renewed[1], first[1])
    reload_and_wait(bw, 1)
    harness.wait_until(lambda: served_subject(port, first[0])[1] == "renewed.localhost",
                       10 * SLOW, message="the renewed certificate to be served")


def test_mismatched_key_on_reload_keeps_old_certificate(breakwater_factory, upstream, tmp_path):
    good = make_cert(tmp_path, "site")
    bw = breakwater_factory(tls_config(upstream, good))
    port = bw.listener_port(1)
    workers = live_workers(bw)

    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = make_cert(other_dir, "site")
    shutil.copy(other[1], good[1])  # key no longer matches the certificate
    os.kill(bw.proc.pid, signal.SIGHUP)
    m = bw.wait_log(r"listeners\[1\]\.tls: certificate and private key do not match")
    assert "OpenSSL:" in m.string
    # Logged once the master has decided to keep the running generation.
    bw.wait_log(r"reload failed: keeping the running configuration")
    assert bw.running()
    assert live_workers(bw) == workers, "workers were replaced by a failed reload"
    assert https_get(port, good[0])[0] == 200


def test_check_mode_reports_mismatched_key(bw_bin, upstream, tmp_path):
    good = make_cert(tmp_path, "a")
    other_dir = tmp_path / "b"
    other_dir.mkdir()
    other = make_cert(other_dir, "b")
    cfg = tls_config(upstream, (good[0], other[1]))
    path = tmp_path / "check.json"
    path.write_text(json.dumps(cfg))
    p = subprocess.run([bw_bin, "-t", "-c", str(path)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=30 * SLOW)
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode != 0, out
    assert "%s: listeners[1].tls: certificate and private key do not match" % path in out, out


def test_plaintext_on_tls_port_is_dropped(breakwater_factory, upstream, cert):
    bw = breakwater_factory(tls_config(upstream, cert))
    port = bw.listener_port(1)
    workers = live_workers(bw)

    s = socket.create_connection(("127.0.0.1", port), timeout=10 * SLOW)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        end = time.monotonic() + 10 * SLOW
        while time.monotonic() < end:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        else:
            pytest.fail("connection with plaintext on the TLS port still open after 10 s")
        assert b"HTTP/1.1" not in data
        assert b"hello from upstream" not in data
    finally:
        s.close()

    assert not [r for r in upstream.requests if r.target == "/"], "plaintext reached upstream"
    assert https_get(port, cert[0], "/after-plaintext")[0] == 200
    assert live_workers(bw) == workers, "the worker died"
