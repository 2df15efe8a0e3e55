"""A small authoritative DNS responder for tests: UDP on a free loopback port, answers that the
test changes while it runs.

    dns = DnsServer().start()
    dns.set("api.test", ["127.0.0.2", "127.0.0.3"], ttl=30)   # A records (AAAA: "::1" style)
    dns.mode = "silent"      # "normal", "silent" (no answer), "garbage", "truncated",
                             # "nxdomain", "servfail"
    dns.queries("api.test")  # how many questions for that name were asked so far
    dns.generator = fn       # fn(name) -> IPv4 addresses, computed afresh for every query

Names are matched case-insensitively (resolvers randomise the case of the question, 0x20) and the
question is echoed exactly as asked. Unknown names get NXDOMAIN; known names without records of
the asked type get an empty answer (NODATA).
"""

import ipaddress
import os
import socket
import struct
import threading

TYPE_A, TYPE_AAAA = 1, 28


class DnsServer:
    def __init__(self, host="127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.address = "%s:%d" % (host, self.port)
        self.mode = "normal"
        self.generator = None  # optional fn(name) -> list of IPv4 texts, asked on every query
        self._records = {}
        self._queries = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def set(self, name, addresses, ttl=30):
        """Replaces the records of name with these addresses (IPv4 or IPv6 text)."""
        recs = []
        for a in addresses:
            ip = ipaddress.ip_address(a)
            recs.append((TYPE_A if ip.version == 4 else TYPE_AAAA, ip.packed, int(ttl)))
        with self._lock:
            self._records[name.lower().rstrip(".")] = recs

    def remove(self, name):
        with self._lock:
            self._records.pop(name.lower().rstrip("."), None)

    def queries(self, name):
        with self._lock:
            return self._queries.get(name.lower().rstrip("."), 0)

    # -- wire format ------------------------------------------------------------------------

    def _serve(self):
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            reply = self._answer(data)
            if reply is not None:
                try:
                    self.sock.sendto(reply, peer)
                except OSError:
                    pass

    @staticmethod
    def _parse_question(data):
        if len(data) < 12:
            return None
        qid, flags, qd = struct.unpack("!HHH", data[:6])
        if qd != 1:
            return None
        pos, labels = 12, []
        while pos < len(data):
            n = data[pos]
            pos += 1
            if n == 0:
                break
            if n > 63 or pos + n > len(data):
                return None
            labels.append(data[pos:pos + n])
            pos += n
        if pos + 4 > len(data):
            return None
        qtype, qclass = struct.unpack("!HH", data[pos:pos + 4])
        question = data[12:pos + 4]
        name = b".".join(labels).decode("ascii", "replace")
        return qid, flags, name, qtype, question

    def _answer(self, data):
        q = self._parse_question(data)
        if q is None:
            return None
        qid, flags, name, qtype, question = q
        key = name.lower().rstrip(".")
        with self._lock:
            self._queries[key] = self._queries.get(key, 0) + 1
            recs = self._records.get(key)
            mode = self.mode
            gen = self.generator
        if gen is not None:
            recs = [(TYPE_A, ipaddress.ip_address(a).packed, 1) for a in gen(key)]
        rd = flags & 0x0100
        if mode == "silent":
            return None
        if mode == "garbage":
            return struct.pack("!H", qid) + os.urandom(40)
        if mode == "truncated":
            return struct.pack("!HHHHHH", qid, 0x8000 | 0x0200 | rd | 0x0080, 1, 0, 0, 0) + question
        if mode == "servfail":
            return struct.pack("!HHHHHH", qid, 0x8000 | rd | 0x0080 | 2, 1, 0, 0, 0) + question
        if recs is None or mode == "nxdomain":
            return struct.pack("!HHHHHH", qid, 0x8400 | rd | 0x0080 | 3, 1, 0, 0, 0) + question
        answers = [r for r in recs if r[0] == qtype]
        out = struct.pack("!HHHHHH", qid, 0x8400 | rd | 0x0080, 1, len(answers), 0, 0) + question
        for rtype, rdata, ttl in answers:
            out += struct.pack("!HHHIH", 0xC00C, rtype, 1, ttl, len(rdata)) + rdata
        return out
