"""Several certificates per TLS listener, certificate renewal, OCSP stapling and session-ticket
key rotation, end to end with openssl s_client against real processes.

A throwaway CA made for each test issues RSA and ECDSA certificates with chosen SAN names, so
that SNI selection (exact names, one-label wildcards, the default for unknown names and for
clients that send none), RSA/ECDSA selection by what the client supports, and OCSP responses
made with `openssl ocsp` against the CA can all be checked with real clients. Also: renewal on
disk and on SIGHUP, broken renewals kept out, expired certificates served with a warning,
session-ticket key rotation across workers and reloads, and flat worker memory under random SNI
names. Renewal on disk is awaited through what s_client sees, never by sleeping.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

import harness

SLOW = harness.SLOW
OPENSSL = shutil.which("openssl")
FAKETIME = shutil.which("faketime")

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")

REQUEST = b"GET /tls-cert HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def run(*args, cwd=None, prefix=()):
    subprocess.run(list(prefix) + [OPENSSL] + list(args), check=True, cwd=cwd,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60 * SLOW)


class CA:
    """A test certificate authority in a directory, with an OCSP index."""

    def __init__(self, directory):
        self.dir = str(directory)
        self.cert = os.path.join(self.dir, "ca.crt")
        self.key = os.path.join(self.dir, "ca.key")
        self.serial = 0x1000
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key, "-out",
            self.cert, "-days", "3", "-subj", "/CN=breakwater test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        open(os.path.join(self.dir, "index.txt"), "w").close()

    def issue(self, name, cn, sans, kind="rsa", past=False):
        """Issues a certificate; returns dict(cert=fullchain path, key=path, leaf=path, serial)."""
        self.serial += 1
        base = os.path.join(self.dir, name)
        key = base + ".key"
        if kind == "rsa":
            run("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key)
        else:
            run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        run("req", "-new", "-key", key, "-subj", "/CN=" + cn, "-out", base + ".csr")
        with open(base + ".ext", "w") as f:
            f.write("subjectAltName=" + ",".join("DNS:" + s for s in sans) + "\n")
        run("x509", "-req", "-in", base + ".csr", "-CA", self.cert, "-CAkey", self.key,
            "-set_serial", str(self.serial), "-days", "1" if past else "2",
            "-extfile", base + ".ext", "-out", base + ".leaf",
            prefix=(FAKETIME, "-f", "-3d") if past else ())
        with open(base + ".crt", "w") as out:
            out.write(open(base + ".leaf").read() + open(self.cert).read())
        with open(os.path.join(self.dir, "index.txt"), "a") as idx:
            idx.write("V\t%s\t\t%X\tunknown\t/CN=%s\n"
                      % (time.strftime("%y%m%d%H%M%SZ", time.gmtime(time.time() + 2 * 86400)),
                         self.serial, cn))
        return {"cert": base + ".crt", "key": key, "leaf": base + ".leaf", "serial": self.serial,
                "cn": cn}

    def ocsp(self, issued, out, past=False, digest=None):
        """A real OCSP response (DER) for an issued certificate, signed by the CA."""
        req = out + ".req"
        # A digest option applies to the -cert options after it.
        run("ocsp", "-issuer", self.cert, *(["-" + digest] if digest else []),
            "-cert", issued["leaf"], "-reqout", req, "-no_nonce")
        prefix = (FAKETIME, "-f", "-3d") if past else ()
        run("ocsp", "-index", os.path.join(self.dir, "index.txt"), "-rsigner", self.cert,
            "-rkey", self.key, "-CA", self.cert, "-reqin", req, "-respout", out, "-ndays", "1",
            prefix=prefix)
        return out


@pytest.fixture
def ca(tmp_path):
    d = tmp_path / "ca"
    d.mkdir()
    return CA(d)


def cert_config(upstream, certs, workers=1, **tls):
    cfg = harness.base_config([upstream.address], workers=workers)
    t = {"certificates": [{k: v for k, v in c.items() if k in ("cert", "key", "ocsp")}
                          for c in certs]}
    t.update(tls)
    cfg["listeners"].append({"address": "127.0.0.1:%d" % harness.free_port(), "tls": t})
    return cfg


def s_client(port, ca_file, *args, servername="localhost", timeout=20):
    cmd = [OPENSSL, "s_client", "-connect", "127.0.0.1:%d" % port, "-CAfile", ca_file,
           "-ign_eof"]
    cmd += ["-noservername"] if servername is None else ["-servername", servername]
    p = subprocess.run(cmd + list(args), input=REQUEST, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout * SLOW)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def served_cn(port, ca_file, *args, servername="localhost"):
    rc, out = s_client(port, ca_file, *args, servername=servername)
    m = re.search(r"^subject=.*CN\s*=\s*([\w.*-]+)", out, re.M)
    assert rc == 0 and m, out[-3000:]
    assert "hello from upstream" in out, out[-3000:]
    return m.group(1)


def session_kind(out):
    m = re.search(r"^(New|Reused), ", out, re.M)
    assert m, out[-3000:]
    return m.group(1)


def test_sni_selects_certificate(breakwater_factory, upstream, ca):
    default = ca.issue("default", "default-cert", ["localhost", "default.test"])
    exact = ca.issue("exact", "exact-cert", ["a.example.test", "b.example.test"])
    wild = ca.issue("wild", "wild-cert", ["*.wild.test"])
    special = ca.issue("special", "special-cert", ["www.wild.test"])
    bw = breakwater_factory(cert_config(upstream, [default, exact, wild, special]))
    port = bw.listener_port(1)

    cases = [
        ("a.example.test", "exact-cert"),
        ("B.Example.Test", "exact-cert"),       # names compare case-insensitively
        ("x.wild.test", "wild-cert"),
        ("www.wild.test", "special-cert"),      # an exact name wins over a wildcard
        ("y.x.wild.test", "default-cert"),      # a wildcard covers one label only
        ("wild.test", "default-cert"),
        ("unknown.test", "default-cert"),
        ("default.test", "default-cert"),
    ]
    for name, want in cases:
        got = served_cn(port, ca.cert, "-verify_return_error",
                        *(["-verify_hostname", name] if want != "default-cert" else []),
                        servername=name)
        assert got == want, "SNI %s: got %s, want %s" % (name, got, want)
    # No SNI at all: the default, in both versions.
    assert served_cn(port, ca.cert, "-tls1_3", servername=None) == "default-cert"
    assert served_cn(port, ca.cert, "-tls1_2", servername=None) == "default-cert"


def test_rsa_and_ecdsa_for_the_same_name(breakwater_factory, upstream, ca):
    default = ca.issue("default", "default-cert", ["localhost"])
    rsa = ca.issue("dual-rsa", "dual-rsa", ["dual.test"], kind="rsa")
    ec = ca.issue("dual-ec", "dual-ec", ["dual.test"], kind="ec")
    bw = breakwater_factory(cert_config(upstream, [default, rsa, ec]))
    port = bw.listener_port(1)

    def cn(*args):
        return served_cn(port, ca.cert, "-verify_return_error", "-verify_hostname", "dual.test",
                         *args, servername="dual.test")

    assert cn("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256") == "dual-ec"
    assert cn("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256") == "dual-rsa"
    assert cn("-tls1_3", "-sigalgs", "ecdsa_secp256r1_sha256") == "dual-ec"
    assert cn("-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256") == "dual-rsa"
    # A client that can do both gets one of them, and the handshake verifies.
    assert cn("-tls1_3") in ("dual-ec", "dual-rsa")
    # An RSA-only default still serves an ECDSA-preferring client without SNI.
    assert served_cn(port, ca.cert, "-tls1_2", "-cipher",
                     "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
                     servername=None) == "default-cert"


def replace_files(issued, target):
    """Writes a renewed certificate and key over target's paths, each by an atomic rename."""
    for src, dst in ((issued["key"], target["key"]), (issued["cert"], target["cert"])):
        tmp = dst + ".new"
        shutil.copy(src, tmp)
        os.replace(tmp, dst)


def test_renewal_on_disk_picked_up_without_signal(breakwater_factory, upstream, ca):
    live = ca.issue("live", "first", ["localhost"])
    bw = breakwater_factory(cert_config(upstream, [live], workers=2, reload_check_ms=200))
    port = bw.listener_port(1)
    assert served_cn(port, ca.cert) == "first"

    replace_files(ca.issue("renewed", "second", ["localhost"]), live)
    harness.wait_until(lambda: served_cn(port, ca.cert) == "second", 20 * SLOW,
                       message="the renewed certificate to be served")
    bw.wait_log(r"certificate files changed on disk: reloading")
    # Once renewed it stays: every worker serves the new one.
    assert [served_cn(port, ca.cert) for _ in range(6)] == ["second"] * 6


def test_broken_new_file_keeps_old_certificate(breakwater_factory, upstream, ca):
    live = ca.issue("live", "first", ["localhost"])
    bw = breakwater_factory(cert_config(upstream, [live], reload_check_ms=200))
    port = bw.listener_port(1)
    assert served_cn(port, ca.cert) == "first"

    with open(live["cert"], "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    m = bw.wait_log(r"listeners\[1\]\.tls\.certificates\[0\]\.cert: cannot load certificate "
                    r"chain from .*live\.crt: ")
    bw.wait_log(r"reload failed: keeping the running configuration")
    assert served_cn(port, ca.cert) == "first", m.string

    # A key that belongs to another certificate: refused too, and said so.
    other = ca.issue("other", "other", ["localhost"])
    shutil.copy(live["cert"] + "", live["cert"] + ".broken")
    shutil.copy(ca.issue("good", "first-again", ["localhost"])["cert"], live["cert"])
    shutil.copy(other["key"], live["key"])
    bw.wait_log(r"listeners\[1\]\.tls\.certificates\[0\]: certificate and private key do not "
                r"match")
    assert served_cn(port, ca.cert) == "first"

    # The fixed pair is picked up; the broken files were each tried once, not in a loop.
    fixed = ca.issue("fixed", "fixed", ["localhost"])
    replace_files(fixed, live)
    harness.wait_until(lambda: served_cn(port, ca.cert) == "fixed", 20 * SLOW,
                       message="the repaired certificate to be served")
    failures = bw.read_error_log().count("reload failed: keeping the running configuration")
    assert 2 <= failures <= 4, bw.read_error_log()[-4000:]
    assert bw.running()


def test_sighup_reloads_a_certificate_of_the_list(breakwater_factory, upstream, ca):
    default = ca.issue("default", "default-cert", ["localhost"])
    second = ca.issue("second", "second-v1", ["second.test"])
    bw = breakwater_factory(cert_config(upstream, [default, second]))  # checks every 60 s
    port = bw.listener_port(1)
    assert served_cn(port, ca.cert, servername="second.test") == "second-v1"
    replace_files(ca.issue("second-new", "second-v2", ["second.test"]), second)
    os.kill(bw.proc.pid, signal.SIGHUP)
    harness.wait_until(lambda: served_cn(port, ca.cert, servername="second.test") ==
                       "second-v2", 20 * SLOW, message="the reloaded certificate")
    assert served_cn(port, ca.cert, servername="other.test") == "default-cert"


def ocsp_status(port, ca_file, servername):
    rc, out = s_client(port, ca_file, "-status", servername=servername)
    assert rc == 0, out[-3000:]
    if "OCSP response: no response sent" in out:
        return None, out
    m = re.search(r"Cert Status: (\w+)", out)
    assert "OCSP Response Status: successful" in out and m, out[-3000:]
    return m.group(1), out


def test_ocsp_stapling(breakwater_factory, upstream, ca, tmp_path):
    good = ca.issue("stapled", "stapled", ["localhost", "stapled.test"])
    good["ocsp"] = ca.ocsp(good, str(tmp_path / "stapled.der"))
    wrong = ca.issue("wrong", "wrong", ["wrong.test"])
    # A genuine response, but for the first certificate.
    wrong["ocsp"] = ca.ocsp(good, str(tmp_path / "for-another.der"))
    junk = ca.issue("junk", "junk", ["junk.test"])
    junk["ocsp"] = str(tmp_path / "junk.der")
    with open(junk["ocsp"], "wb") as f:
        f.write(b"\x30\x03\x0a\x01")  # truncated DER
    plain = ca.issue("plain", "plain", ["plain.test"])
    certs = [good, wrong, junk, plain]
    if FAKETIME is not None:
        old = ca.issue("old", "old", ["old.test"])
        old["ocsp"] = ca.ocsp(old, str(tmp_path / "old.der"), past=True)
        certs.append(old)
    # The responder identifies the certificate with SHA-256 instead of SHA-1.
    sha = ca.issue("sha", "sha", ["sha.test"])
    sha["ocsp"] = ca.ocsp(sha, str(tmp_path / "sha.der"), digest="sha256")
    certs.append(sha)
    bw = breakwater_factory(cert_config(upstream, certs))
    port = bw.listener_port(1)

    status, out = ocsp_status(port, ca.cert, "stapled.test")
    assert status == "good", out[-3000:]
    assert "Serial Number: %X" % good["serial"] in out, out[-3000:]
    assert ocsp_status(port, ca.cert, "wrong.test")[0] is None
    assert ocsp_status(port, ca.cert, "junk.test")[0] is None
    assert ocsp_status(port, ca.cert, "plain.test")[0] is None
    status, out = ocsp_status(port, ca.cert, "sha.test")
    assert status == "good" and "Hash Algorithm: sha256" in out, out[-3000:]
    bw.wait_log(r"certificates\[1\]\.ocsp: not stapling .*for-another\.der: it is for another "
                r"certificate")
    bw.wait_log(r"certificates\[2\]\.ocsp: not stapling .*junk\.der: not a DER OCSP response")
    if FAKETIME is not None:
        assert ocsp_status(port, ca.cert, "old.test")[0] is None
        bw.wait_log(r"certificates\[4\]\.ocsp: not stapling .*old\.der: it has expired")


def test_ocsp_response_reloaded_on_change(breakwater_factory, upstream, ca, tmp_path):
    cert = ca.issue("c", "c", ["localhost"])
    cert["ocsp"] = str(tmp_path / "c.der")
    with open(cert["ocsp"], "wb") as f:
        f.write(b"not yet")
    bw = breakwater_factory(cert_config(upstream, [cert], reload_check_ms=200))
    port = bw.listener_port(1)
    assert ocsp_status(port, ca.cert, "localhost")[0] is None
    tmp = ca.ocsp(cert, str(tmp_path / "fresh.der"))
    os.replace(tmp, cert["ocsp"])
    harness.wait_until(lambda: ocsp_status(port, ca.cert, "localhost")[0] == "good", 20 * SLOW,
                       message="the new OCSP response to be stapled")


def test_ticket_keys_rotate(breakwater_factory, upstream, ca, tmp_path):
    """A TLS 1.2 ticket resumes on both workers while the keys rotate (and is renewed under the
    new key), across a reload, and is refused after two rotation periods."""
    period = int(4000 * SLOW)
    cert = ca.issue("t", "t", ["localhost"])
    bw = breakwater_factory(cert_config(upstream, [cert], workers=2, ticket_rotate_ms=period))
    bw.wait_workers(2)
    port = bw.listener_port(1)
    first = str(tmp_path / "first.pem")

    rc, out = s_client(port, ca.cert, "-tls1_2", "-sess_out", first)
    t0 = time.monotonic()
    assert rc == 0 and session_kind(out) == "New", out[-3000:]

    kinds = []

    def renewed_ticket():
        rc, out = s_client(port, ca.cert, "-tls1_2", "-msg", "-sess_in", first)
        assert rc == 0, out[-3000:]
        kinds.append(session_kind(out))
        assert kinds[-1] == "Reused", "refused %.2f s after issue: %s" % (
            time.monotonic() - t0, kinds)
        # A ticket under the previous key resumes and comes back re-encrypted under the new one.
        return re.search(r"<<< TLS 1.2, Handshake \[length \w+\], NewSessionTicket", out)

    # Until the key rotates the ticket resumes as it is; after, it resumes and is renewed.
    harness.wait_until(renewed_ticket, 3 * period / 1000.0, interval=0.05,
                       message="a renewed ticket after a key rotation")
    assert len(kinds) >= 2, kinds
    renewed_at = time.monotonic() - t0

    # The keys are the same after a reload, and on both workers.
    os.kill(bw.proc.pid, signal.SIGHUP)
    bw.wait_log(r"configuration reloaded")
    for _ in range(4):
        rc, out = s_client(port, ca.cert, "-tls1_2", "-sess_in", first)
        assert rc == 0 and session_kind(out) == "Reused", out[-3000:]

    def refused():
        rc, out = s_client(port, ca.cert, "-tls1_2", "-sess_in", first)
        assert rc == 0, out[-3000:]
        return session_kind(out) == "New"

    harness.wait_until(refused, 4 * period / 1000.0 + 10 * SLOW, interval=0.1,
                       message="the ticket to be refused after two rotation periods")
    refused_at = time.monotonic() - t0
    # Sessions live two periods; their time is kept in whole seconds.
    assert refused_at >= 2 * period / 1000.0 - 1.5, (renewed_at, refused_at)
    assert renewed_at <= period / 1000.0 + 2 * SLOW, renewed_at


def test_check_mode_reports_broken_certificate_of_the_list(bw_bin, upstream, ca, tmp_path):
    good = ca.issue("good", "good", ["localhost"])
    broken = ca.issue("broken", "broken", ["broken.test"])
    with open(broken["cert"], "w") as f:
        f.write("this is not PEM\n")
    cfg = cert_config(upstream, [good, broken])
    path = tmp_path / "check.json"
    path.write_text(json.dumps(cfg))
    p = subprocess.run([bw_bin, "-t", "-c", str(path)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=30 * SLOW)
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode != 0, out
    assert ("%s: listeners[1].tls.certificates[1].cert: cannot load certificate chain from %s: "
            % (path, broken["cert"])) in out, out


def test_random_sni_names_keep_worker_memory_flat(breakwater_factory, upstream, ca):
    """Thousands of handshakes with random, long SNI names (some under a wildcard), half of them
    resuming while the ticket keys rotate every second: the worker's memory stays flat."""
    import random
    import socket
    import ssl

    env = {}
    if harness.SANITIZED:
        env["ASAN_OPTIONS"] = ":".join(o for o in (os.environ.get("ASAN_OPTIONS", ""),
                                                   "quarantine_size_mb=0",
                                                   "thread_local_quarantine_size_kb=0") if o)
    certs = [ca.issue("d", "default-cert", ["localhost"], kind="ec"),
             ca.issue("w", "wild-cert", ["*.wild.test"], kind="ec"),
             ca.issue("r", "rsa-cert", ["*.wild.test"], kind="rsa")]
    bw = breakwater_factory(cert_config(upstream, certs, ticket_rotate_ms=1000), env=env)
    port = bw.listener_port(1)
    worker = bw.wait_workers(1)[0]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    rng = random.Random(13)

    def handshakes(n):
        session = None
        for i in range(n):
            labels = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-")
                              for _ in range(rng.randint(1, 63))) for _ in range(3)]
            name = ".".join(labels) + (".wild.test" if i % 3 == 0 else ".test")
            with socket.create_connection(("127.0.0.1", port), timeout=10 * SLOW) as raw:
                with ctx.wrap_socket(raw, server_hostname=name, session=session) as tls:
                    assert tls.version() == "TLSv1.2"
                    session = tls.session if i % 2 == 0 else None

    handshakes(300)
    base = bw.proc_status(worker, "VmRSS")
    handshakes(int(2000 / SLOW))
    grown = bw.proc_status(worker, "VmRSS") - base
    assert grown < 2048, "worker VmRSS grew by %d kB over the handshakes" % grown
    assert served_cn(port, ca.cert, servername="x.wild.test") in ("wild-cert", "rsa-cert")
    assert bw.sanitizer_report() is None


@pytest.mark.skipif(FAKETIME is None, reason="needs faketime to make an expired certificate")
def test_expired_certificate_is_served_with_a_warning(breakwater_factory, bw_bin, upstream, ca,
                                                      tmp_path):
    fresh = ca.issue("fresh", "fresh", ["localhost"])
    old = ca.issue("old", "expired-cert", ["old.test"], past=True)
    cfg = cert_config(upstream, [fresh, old])
    path = tmp_path / "check.json"
    path.write_text(json.dumps(cfg))
    p = subprocess.run([bw_bin, "-t", "-c", str(path)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=30 * SLOW)
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode == 0, out
    assert "warning: %s: listeners[1].tls.certificates[1].cert: %s expired on " % (
        path, old["cert"]) in out, out

    bw = breakwater_factory(cfg)
    bw.wait_log(r"certificates\[1\]\.cert: .*old\.crt expired on \d{4}-\d\d-\d\d")
    # Served all the same (the client's verification is what fails).
    rc, out = s_client(bw.listener_port(1), ca.cert, servername="old.test")
    assert "CN = expired-cert" in out and "certificate has expired" in out, out[-3000:]
    assert served_cn(bw.listener_port(1), ca.cert, servername="localhost") == "fresh"


def test_default_rsa_and_ecdsa_pair_without_sni(breakwater_factory, upstream, ca):
    """The default certificate's ECDSA (or RSA) partner for the same name is offered too, so a
    client without SNI also gets the key type it supports."""
    rsa = ca.issue("def-rsa", "default-rsa", ["localhost"], kind="rsa")
    other = ca.issue("other", "other", ["other.test"], kind="ec")
    ec = ca.issue("def-ec", "default-ec", ["localhost"], kind="ec")
    bw = breakwater_factory(cert_config(upstream, [rsa, other, ec]))
    port = bw.listener_port(1)
    for servername in (None, "unknown.test"):
        assert served_cn(port, ca.cert, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256",
                         servername=servername) == "default-ec"
        assert served_cn(port, ca.cert, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256",
                         servername=servername) == "default-rsa"
        assert served_cn(port, ca.cert, "-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256",
                         servername=servername) == "default-rsa"
    assert served_cn(port, ca.cert, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256",
                     servername="other.test") == "other"
