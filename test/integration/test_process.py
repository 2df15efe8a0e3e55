"""Black-box tests of the process model: one master, N workers, and the signals an operator sends.

Every test starts a real master with real workers and talks to it over sockets; processes are
observed through /proc. What must happen gets a generous deadline (the suite also runs under
AddressSanitizer on a loaded two-core machine); what must not happen gets a tight one.
"""

import json
import os
import re
import signal
import socket
import threading
import time

import pytest

import harness

# Deadlines for what must happen are scaled for the sanitizer build; see harness.SLOW.
SLOW = harness.SLOW

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def wait_for(predicate, timeout, interval=0.02):
    """Polls predicate until it returns something truthy; returns (value, seconds) or (None, t)."""
    start = time.monotonic()
    while True:
        value = predicate()
        elapsed = time.monotonic() - start
        if value:
            return value, elapsed
        if elapsed >= timeout:
            return None, elapsed
        time.sleep(interval)


def proc_state(pid):
    """The one-letter state of a process from /proc, or None when it no longer exists."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may contain spaces: the state follows the last ')'.
    return stat[stat.rindex(")") + 2]


def assert_stays_up(bw, when, grace=0.5):
    """The master is still running, and does not exit within a short grace period either."""
    exited, _ = wait_for(lambda: bw.proc.poll() is not None, grace)
    assert not exited, "master exited (code %s) %s:\n%s" % (
        bw.proc.returncode, when, tail(bw.error_log_path))


def parent_pid(pid):
    with open("/proc/%d/stat" % pid) as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def running_workers(bw):
    return bw.live_worker_pids()


def wait_workers(bw, count, timeout=10.0 * SLOW, exclude=()):
    """Waits until exactly `count` live workers exist, none of them in `exclude`."""
    excluded = set(exclude)

    def ready():
        pids = running_workers(bw)
        if len(pids) == count and not excluded.intersection(pids):
            return pids
        return None

    pids, elapsed = wait_for(ready, timeout)
    assert pids, "expected %d live workers (not %s) within %.1f s, have %s" % (
        count, sorted(excluded), timeout, running_workers(bw))
    return pids, elapsed


def request_bytes(path, host="breakwater.test"):
    return ("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, host)).encode()


def get(port, path, timeout=10):
    """One GET on a new connection; returns (status, headers, body). status is None when the
    connection ended without a response."""
    status, headers, body, _closed = harness.http_request(
        port, request_bytes(path), timeout=timeout * SLOW, close_wait=0)
    return status, headers, body


def start_request(port, path):
    """A GET running in a background thread; .outcome() gives (status, headers, body, closed)."""
    thread = Background(lambda: harness.http_request(port, request_bytes(path),
                                                     timeout=30 * SLOW, close_wait=0))
    thread.start()
    return thread


def read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def count_log(bw, regex):
    return len(re.findall(regex, read_text(bw.error_log_path), re.MULTILINE))


def wait_log_count(bw, regex, more_than, timeout=10.0 * SLOW):
    """Waits until the error log holds more than `more_than` matches of regex; returns the count."""
    count, _ = wait_for(lambda: max(count_log(bw, regex) - more_than, 0), timeout)
    assert count, "error log never showed %r (%d match(es) before, no new one) within %.0f s:" \
        "\n%s" % (regex, more_than, timeout, tail(bw.error_log_path))
    return count + more_than


def tail(path, lines=40):
    text = read_text(path)
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def upstream_targets(upstream):
    return [r.target for r in list(upstream.requests)]


def wait_upstream_saw(upstream, prefix, timeout=10.0 * SLOW):
    found, _ = wait_for(lambda: any(t.startswith(prefix) for t in upstream_targets(upstream)),
                        timeout)
    assert found, "upstream never received a request for %s within %.0f s (saw %s)" % (
        prefix, timeout, upstream_targets(upstream)[-10:])


def point_api_at(bw, upstream):
    """Rewrites the configuration file (atomically) with the api upstream moved to `upstream`."""
    config = json.loads(json.dumps(bw.config))
    config["upstreams"]["api"]["servers"] = [upstream.address]
    bw.write_config(config)


def write_file_atomically(path, text):
    tmp = str(path) + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, str(path))


class Background(threading.Thread):
    """Runs fn() once in a thread and keeps its result or exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = None
        self.error = None

    def run(self):
        try:
            self.result = self.fn()
        except Exception as e:  # reported by the test that owns the thread
            self.error = e

    def outcome(self, timeout):
        self.join(timeout * SLOW)
        assert not self.is_alive(), "background request still running after %.0f s" % (
            timeout * SLOW)
        return self.result, self.error


class Hammer(threading.Thread):
    """Sequential requests, each on a new connection, until stopped; records every outcome."""

    def __init__(self, port, prefix="/hammer"):
        super().__init__(daemon=True)
        self.port = port
        self.prefix = prefix
        self.stopping = threading.Event()
        # (monotonic start, status or None, what went wrong or None)
        self.outcomes = []

    def run(self):
        n = 0
        while not self.stopping.is_set():
            n += 1
            path = "%s/%d" % (self.prefix, n)
            started = time.monotonic()
            try:
                status, _, _ = get(self.port, path, timeout=15)
                problem = None if status == 200 else (
                    "%s: status %s" % (path, status) if status else "%s: no response" % path)
            except Exception as e:
                status, problem = None, "%s: %r" % (path, e)
            self.outcomes.append((started, status, problem))

    def stop(self):
        self.stopping.set()
        self.join(20 * SLOW)
        assert not self.is_alive(), "client thread did not stop"

    def failures(self, since=None):
        """What went wrong with each failed request started at or after `since`."""
        return [o[2] for o in self.outcomes
                if (since is None or o[0] >= since) and o[1] != 200]


def kill_leftovers(pids):
    """Last resort after a failed test: no worker of ours may outlive it."""
    for pid in pids:
        if harness.pid_running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def probe_listener(port, timeout=3.0 * SLOW):
    """What a new client sees: 'refused', 'closed' (accepted, closed with no response),
    'served' (a response came back) or 'hang' (accepted, no answer, no close)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        # The handshake was under way when the listener closed: the kernel resets it.
        return "closed"
    except socket.timeout:
        return "hang"
    try:
        s.settimeout(timeout)
        try:
            s.sendall(request_bytes("/probe"))
            data = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return "closed"
        except socket.timeout:
            return "hang"
        return "served" if data else "closed"
    finally:
        s.close()


def tcp_listen_inodes(port):
    """Inodes of the IPv4 sockets listening on 127.0.0.1:port (from /proc/net/tcp)."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                inodes.add(inode)
    return inodes


def socket_inodes(pid):
    inodes = set()
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    return inodes

SLOW_BODY = b"".join(b"slow-%06d\n" % i for i in range(6000))  # 66 kB, compared byte for byte


def slow_handler(delay):
    """Upstream answering /slow* after `delay` seconds, everything else at once."""

    def handler(req, conn):
        if req.target.startswith("/slow"):
            if not conn.sleep(delay):
                return None  # the upstream is being stopped at teardown
            return harness.respond(200, SLOW_BODY, [("Content-Type", "text/plain")])
        return harness.respond(200, b"fast", [("Content-Type", "text/plain")])

    return handler


# ---------------------------------------------------------------------------------------------
# Workers

def test_two_workers_are_children_of_the_master(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream.address], workers=2))
    master = bw.proc.pid
    pids, _ = wait_workers(bw, 2)
    for pid in pids:
        assert parent_pid(pid) == master, "worker %d has parent %d, not the master %d" % (
            pid, parent_pid(pid), master)
    # Stays at two: no extra worker shows up a moment later.
    time.sleep(0.3)
    assert running_workers(bw) == pids, "worker set changed without a reason: %s -> %s" % (
        pids, running_workers(bw))

    for pid in pids:
        wait_log_count(bw, r"worker \d+.*started.*\bpid\D{0,3}%d\b" % pid, 0)

    statuses = [get(bw.listener_port(), "/many/%d" % i)[0] for i in range(50)]
    assert statuses == [200] * 50, "non-200 answers among 50 requests: %s" % statuses
    assert len(upstream.requests) >= 50, "upstream saw %d of 50 requests" % len(upstream.requests)


def test_listener_is_one_socket_shared_by_all_workers(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream.address], workers=2))
    pids, _ = wait_workers(bw, 2)
    port = bw.listener_port()
    listening = tcp_listen_inodes(port)
    assert len(listening) == 1, (
        "expected one listening socket on port %d, created by the master before fork; found %d "
        "(one per worker?)" % (port, len(listening)))
    for pid in pids:
        assert listening <= socket_inodes(pid), (
            "worker %d does not hold the shared listening socket %s" % (pid, listening))


def test_shared_listener_accepts_200_parallel_connections(upstream, breakwater_factory):
    # A burst of 200 upstream connects may overflow the test upstream's accept queue and wait
    # for a SYN retransmission (1 s): that must not turn into a connect timeout here.
    config = harness.base_config([upstream.address], workers=2,
                                 upstreams={"api": {"connect_timeout_ms": int(5000 * SLOW)}})
    bw = breakwater_factory(config)
    wait_workers(bw, 2)
    port = bw.listener_port()
    n = 200
    barrier = threading.Barrier(n)
    results = [None] * n

    def client(i):
        try:
            barrier.wait(timeout=30 * SLOW)
            results[i] = get(port, "/parallel/%d" % i, timeout=60)[0]
        except Exception as e:
            results[i] = repr(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90 * SLOW
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "some clients still waiting after the deadline"
    bad = [(i, r) for i, r in enumerate(results) if r != 200]
    assert not bad, "%d of %d parallel requests failed, e.g. %s" % (len(bad), n, bad[:5])
    assert len(upstream.requests) >= n, "upstream saw %d of %d requests" % (
        len(upstream.requests), n)


def test_killed_worker_is_respawned_and_traffic_continues(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream.address], workers=2))
    before, _ = wait_workers(bw, 2)
    victim = before[0]
    hammer = Hammer(bw.listener_port())
    hammer.start()
    new_pids = []
    try:
        ok, _ = wait_for(lambda: len(hammer.outcomes) >= 5, 15 * SLOW)
        assert ok, "client made no progress before the kill"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        pids, elapsed = wait_workers(bw, 2, exclude=[victim])
        respawned_at = time.monotonic()
        new_pids = [p for p in pids if p not in before]
        # Contract: a replacement within 1 s; allow scheduling slack on a loaded machine.
        limit = 1.0 + 1.0 * SLOW
        assert elapsed <= limit, (
            "replacement worker appeared %.2f s after kill -9 of worker %d (contract: within "
            "1 s; allowed %.1f s)" % (elapsed, victim, limit))
        assert len(new_pids) == 1 and parent_pid(new_pids[0]) == bw.proc.pid, (
            "expected one new child of the master, workers now %s (before %s)" % (pids, before))

        # The dead worker is reaped, not left as a zombie.
        gone, _ = wait_for(lambda: proc_state(victim) is None, 5 * SLOW)
        assert gone, "killed worker %d was not reaped by the master (state %s)" % (
            victim, proc_state(victim))

        # Requests keep flowing for a while after the respawn.
        wait_for(lambda: sum(1 for o in hammer.outcomes if o[0] >= respawned_at) >= 20,
                 30 * SLOW)
    finally:
        hammer.stop()
        kill_leftovers(new_pids)

    after = [o for o in hammer.outcomes if o[0] >= respawned_at]
    assert len(after) >= 20, "only %d requests completed after the respawn" % len(after)
    failed = hammer.failures(since=respawned_at)
    assert not failed, "%d requests on new connections failed after the respawn: %s" % (
        len(failed), failed[:5])
    # A request started after the kill can only be accepted by a live worker.
    during = [o for o in hammer.outcomes if killed_at <= o[0] < respawned_at]
    assert all(o[1] == 200 for o in during[1:]), (
        "requests started after the kill, while one worker was left, failed: %s" % [
            o[2] for o in during[1:] if o[1] != 200][:5])

    wait_log_count(bw, r"(?i)worker .*(exited|killed|died)", 0)
    wait_log_count(bw, r"(?i)respawn", 0)
    statuses = [get(bw.listener_port(), "/after/%d" % i)[0] for i in range(20)]
    assert statuses == [200] * 20, "after the respawn: %s" % statuses


def test_workers_exit_when_master_is_killed(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream.address], workers=2))
    workers, _ = wait_workers(bw, 2)
    try:
        os.kill(bw.proc.pid, signal.SIGKILL)
        bw.proc.wait(timeout=10)
        gone, elapsed = wait_for(lambda: not any(harness.pid_running(p) for p in workers), 5.0 * SLOW)
        assert gone, "workers still running %.1f s after the master died: %s" % (
            elapsed, [p for p in workers if harness.pid_running(p)])
        assert probe_listener(bw.listener_port()) == "refused", (
            "listener still accepts after master and workers are gone")
    finally:
        kill_leftovers(workers)


# ---------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: drain

@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_proxy_exits_promptly_with_code_0(upstream, breakwater_factory, signo):
    config = harness.base_config([upstream.address], workers=2, shutdown_timeout_ms=30000)
    bw = breakwater_factory(config)
    workers, _ = wait_workers(bw, 2)
    assert get(bw.listener_port(), "/")[0] == 200
    start = time.monotonic()
    os.kill(bw.proc.pid, signo)
    try:
        try:
            code = bw.proc.wait(timeout=20 * SLOW)
        except Exception:
            pytest.fail("master still running %.0f s after %s with nothing in flight" % (
                20 * SLOW, signo.name))
        elapsed = time.monotonic() - start
        assert code == 0, "master exited with %s after %s" % (code, signo.name)
        assert elapsed < 5.0 * SLOW, (
            "with nothing in flight the master took %.1f s to exit; it must not wait out "
            "shutdown_timeout_ms (30 s)" % elapsed)
        gone, _ = wait_for(lambda: not any(harness.pid_running(p) for p in workers), 5 * SLOW)
        assert gone, "workers outlived the master: %s" % [p for p in workers if harness.pid_running(p)]
    finally:
        kill_leftovers(workers)


def test_sigterm_drains_in_flight_request(upstream_factory, breakwater_factory):
    slow = upstream_factory(slow_handler(1.5))
    config = harness.base_config([slow.address], workers=2, shutdown_timeout_ms=10000)
    bw = breakwater_factory(config)
    workers, _ = wait_workers(bw, 2)
    port = bw.listener_port()
    inflight = start_request(port, "/slow")
    wait_upstream_saw(slow, "/slow")

    os.kill(bw.proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    try:
        # New connections are turned away while the slow request is still being served.
        seen = []

        def turned_away():
            outcome = probe_listener(port)
            seen.append(outcome)
            assert outcome != "hang", (
                "a new connection was accepted after SIGTERM but neither answered nor closed "
                "(listening socket left open with nobody accepting?)")
            return outcome in ("refused", "closed")

        ok, elapsed = wait_for(turned_away, 5.0 * SLOW)
        assert ok, "new connections still served %.1f s after SIGTERM: %s" % (elapsed, seen[-5:])
        assert inflight.is_alive(), (
            "the listener closed only after the in-flight request finished (%.2f s after "
            "SIGTERM); it must stop accepting at once" % elapsed)

        result, error = inflight.outcome(30)
        assert error is None, "in-flight request failed during drain: %r" % error
        status, _headers, body, _closed = result
        assert status == 200, "in-flight request got %s during drain" % status
        assert body == SLOW_BODY, "in-flight response truncated: %d of %d bytes" % (
            len(body), len(SLOW_BODY))

        limit = 10 + 5 * SLOW  # shutdown_timeout_ms plus slack
        try:
            code = bw.proc.wait(timeout=limit)
        except Exception:
            pytest.fail("master still running %.0f s after SIGTERM (shutdown_timeout_ms 10 s)"
                        % limit)
        exited = time.monotonic() - sent
        assert code == 0, "master exit code after drain: %s" % code
        assert exited < limit, "master took %.1f s to exit" % exited
        gone, _ = wait_for(lambda: not any(harness.pid_running(p) for p in workers), 5 * SLOW)
        assert gone, "workers outlived the master: %s" % [p for p in workers if harness.pid_running(p)]
    finally:
        kill_leftovers(workers)


def test_sigterm_gives_up_after_shutdown_timeout(upstream_factory, breakwater_factory):
    slow = upstream_factory(slow_handler(10))
    config = harness.base_config([slow.address], workers=2, shutdown_timeout_ms=1000)
    bw = breakwater_factory(config)
    workers, _ = wait_workers(bw, 2)
    inflight = start_request(bw.listener_port(), "/slow")
    try:
        wait_upstream_saw(slow, "/slow")
        os.kill(bw.proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        try:
            code = bw.proc.wait(timeout=15 * SLOW)
        except Exception:
            pytest.fail("master still running %.0f s after SIGTERM with shutdown_timeout_ms "
                        "1000 and a 10 s request in flight" % (15 * SLOW))
        elapsed = time.monotonic() - sent
        assert code == 0, "master exit code after the drain timed out: %s" % code
        assert elapsed >= 0.9, (
            "master exited %.2f s after SIGTERM, before shutdown_timeout_ms (1 s), while a "
            "request was in flight" % elapsed)
        limit = 1.0 + 3.0 * SLOW
        assert elapsed <= limit, (
            "master exited %.1f s after SIGTERM; shutdown_timeout_ms is 1 s (allowed %.0f s)"
            % (elapsed, limit))
        gone, _ = wait_for(lambda: not any(harness.pid_running(p) for p in workers), 5 * SLOW)
        assert gone, "workers outlived the master: %s" % [p for p in workers if harness.pid_running(p)]
        # The abandoned client is not left hanging either: its connection ends.
        inflight.outcome(10)
    finally:
        kill_leftovers(workers)


# ---------------------------------------------------------------------------------------------
# SIGHUP: reload

def wait_traffic_reaches(port, target, timeout=5.0, tag="switch"):
    """Sends requests on new connections until one arrives at `target`; returns seconds taken.
    Every one of them must succeed: a reload drops nothing."""
    n = [0]

    def reached():
        n[0] += 1
        probe = "/%s/%d" % (tag, n[0])
        status, _, _ = get(port, probe)
        assert status == 200, "request %s during reload got %s" % (probe, status)
        return probe in upstream_targets(target)

    ok, elapsed = wait_for(reached, timeout * SLOW)
    assert ok, "requests did not reach %s within %.0f s of SIGHUP" % (
        target.address, timeout * SLOW)
    return elapsed


# The success line, not "reloading ..." nor "reload failed".
RELOADED = r"(?i)configuration reloaded"


def reload_config(upstream):
    """Two workers; a drain time well above the slow requests so that only the reload itself
    is judged (old workers may legitimately be cut off after shutdown_timeout_ms)."""
    return harness.base_config([upstream.address], workers=2, shutdown_timeout_ms=10000)


def reload_to(bw, target):
    """Points the api upstream at target, sends SIGHUP, waits for traffic to arrive there, for
    a whole new set of workers, and for the reload to be logged. Returns the old worker pids."""
    old = running_workers(bw)
    reloads = count_log(bw, RELOADED)
    point_api_at(bw, target)
    os.kill(bw.proc.pid, signal.SIGHUP)
    wait_traffic_reaches(bw.listener_port(), target)
    wait_workers(bw, len(old), exclude=old)
    gone, _ = wait_for(lambda: not any(proc_state(p) is not None for p in old), 10 * SLOW)
    assert gone, "old workers %s still present (or not reaped) after SIGHUP" % [
        p for p in old if proc_state(p) is not None]
    wait_log_count(bw, RELOADED, reloads)
    return old


def test_sighup_switches_upstream_and_replaces_workers(upstream_factory, breakwater_factory):
    first, second = upstream_factory(), upstream_factory()
    bw = breakwater_factory(reload_config(first))
    wait_workers(bw, 2)
    port = bw.listener_port()
    assert get(port, "/before")[0] == 200
    assert "/before" in upstream_targets(first)
    listening = tcp_listen_inodes(port)

    old = reload_to(bw, second)
    new = running_workers(bw)
    assert not set(old) & set(new), "workers not replaced: before %s, after %s" % (old, new)
    for pid in new:
        assert parent_pid(pid) == bw.proc.pid, "new worker %d is not a child of the master" % pid
        assert listening <= socket_inodes(pid), (
            "new worker %d does not hold the original listening socket: a reload must not "
            "rebind (connections would be refused meanwhile)" % pid)
    assert tcp_listen_inodes(port) == listening, "listening socket replaced by the reload"

    seen_first = len(first.requests)
    statuses = [get(port, "/after/%d" % i)[0] for i in range(10)]
    assert statuses == [200] * 10, "after reload: %s" % statuses
    assert len(first.requests) == seen_first, "old upstream still receives requests"
    assert_stays_up(bw, "after SIGHUP")


def test_sighup_lets_in_flight_request_finish(upstream_factory, breakwater_factory):
    first, second = upstream_factory(slow_handler(1.5)), upstream_factory()
    bw = breakwater_factory(reload_config(first))
    wait_workers(bw, 2)
    port = bw.listener_port()
    inflight = start_request(port, "/slow")
    wait_upstream_saw(first, "/slow")
    point_api_at(bw, second)
    os.kill(bw.proc.pid, signal.SIGHUP)

    result, error = inflight.outcome(30)
    assert error is None, "request in flight during reload failed: %r" % error
    status, _headers, body, _closed = result
    assert status == 200, "request in flight during reload got %s" % status
    assert body == SLOW_BODY, "response in flight during reload truncated: %d of %d bytes" % (
        len(body), len(SLOW_BODY))
    wait_traffic_reaches(port, second)


def test_no_request_fails_during_three_reloads(upstream_factory, breakwater_factory):
    first, second = upstream_factory(), upstream_factory()
    bw = breakwater_factory(reload_config(first))
    wait_workers(bw, 2)
    hammer = Hammer(bw.listener_port())
    hammer.start()
    try:
        for target in (second, first, second):
            done = len(hammer.outcomes)
            reload_to(bw, target)
            # Let the client run against the new workers before the next reload.
            ok, _ = wait_for(lambda: len(hammer.outcomes) >= done + 10, 20 * SLOW)
            assert ok, "client stalled after a reload (%d requests)" % len(hammer.outcomes)
    finally:
        hammer.stop()
    failed = hammer.failures()
    assert len(hammer.outcomes) >= 30, "too few requests to judge: %d" % len(hammer.outcomes)
    assert not failed, "%d of %d requests failed across 3 reloads: %s" % (
        len(failed), len(hammer.outcomes), failed[:5])


def test_invalid_config_on_sighup_keeps_the_old_one(upstream_factory, breakwater_factory):
    first, second = upstream_factory(), upstream_factory()
    bw = breakwater_factory(reload_config(first))
    workers, _ = wait_workers(bw, 2)
    port = bw.listener_port()
    path = bw.config_path
    name = re.escape(os.path.basename(str(path)))

    # A JSON syntax error: reported as FILE:LINE:COL.
    good = json.loads(json.dumps(bw.config))
    moved = json.loads(json.dumps(good))
    moved["upstreams"]["api"]["servers"] = [second.address]
    text = json.dumps(moved, indent=2)
    write_file_atomically(path, text[: len(text) // 2])
    os.kill(bw.proc.pid, signal.SIGHUP)
    wait_log_count(bw, r"%s:\d+:\d+: " % name, 0)
    assert_stays_up(bw, "after SIGHUP with a JSON syntax error")

    # A well-formed file with a dangling reference: reported as FILE: json.path: message.
    broken = json.loads(json.dumps(moved))
    broken["routes"][0]["upstream"] = "no_such_upstream"
    write_file_atomically(path, json.dumps(broken, indent=2))
    os.kill(bw.proc.pid, signal.SIGHUP)
    wait_log_count(bw, r"%s:(\d+:\d+:)? .*(no_such_upstream|routes)" % name, 0)

    assert_stays_up(bw, "after SIGHUP with an unknown upstream")
    assert running_workers(bw) == workers, (
        "workers were replaced although the new configuration was rejected: %s -> %s" % (
            workers, running_workers(bw)))
    statuses = [get(port, "/still-old/%02d" % i)[0] for i in range(10)]
    assert statuses == [200] * 10, "after a rejected reload: %s" % statuses
    targets = upstream_targets(first)
    assert all("/still-old/%02d" % i in targets for i in range(10)), (
        "requests did not reach the old upstream after a rejected reload")
    assert not upstream_targets(second), "the rejected configuration took effect"

    # A valid file again: the next SIGHUP applies it.
    reload_to(bw, second)


# ---------------------------------------------------------------------------------------------
# SIGUSR1: reopen logs

def test_sigusr1_reopens_logs(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream.address], workers=2))
    wait_workers(bw, 2)
    port = bw.listener_port()
    access = str(bw.access_log_path)
    error = str(bw.error_log_path)

    assert get(port, "/before-rotation")[0] == 200
    ok, _ = wait_for(lambda: "/before-rotation" in read_text(access), 10 * SLOW)
    assert ok, "access log %s never showed the request" % access

    os.rename(access, access + ".1")
    os.rename(error, error + ".1")
    os.kill(bw.proc.pid, signal.SIGUSR1)

    n = [0]

    def new_file_has_line():
        n[0] += 1
        assert get(port, "/after-rotation/%d" % n[0])[0] == 200
        return "/after-rotation/" in read_text(access)

    ok, _ = wait_for(new_file_has_line, 10 * SLOW, interval=0.1)
    assert ok, "no new access log at %s with the new request after SIGUSR1" % access
    assert "/before-rotation" in read_text(access + ".1"), "rotated access log lost its line"
    assert "/before-rotation" not in read_text(access), "old lines in the new access log"

    # Every worker reopened: once a line reached the new file, none goes to the rotated one.
    markers = ["/all-workers/%03d" % i for i in range(20)]
    for marker in markers:
        assert get(port, marker)[0] == 200
    ok, _ = wait_for(lambda: all(m in read_text(access) for m in markers), 10 * SLOW)
    assert ok, "not every request after the reopen was logged in the new access log"
    stale = [m for m in markers if m in read_text(access + ".1")]
    assert not stale, "%s logged to the rotated file after SIGUSR1: a worker did not reopen" % (
        stale)

    ok, _ = wait_for(lambda: os.path.exists(error), 10 * SLOW)
    assert ok, "error log %s was not recreated after SIGUSR1" % error
    assert_stays_up(bw, "after SIGUSR1")
