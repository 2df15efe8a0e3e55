"""Black-box tests of the command line: -V, -h, -t, -c, exit codes, and the LOG_LEVEL override.

Exit codes: 0 success, 1 a problem with the configuration or the environment, 2 a usage error.
The thorough catalogue of invalid configurations lives in test_config_check.py; here only enough
of them to pin down the -t contract (messages on stderr, "FILE:..." prefixes, exit status).
"""

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

import harness

SLOW = harness.SLOW


def run(bw_bin, args, env=None, timeout=10.0):
    """Runs the binary to completion; returns (exit code, stdout, stderr).

    It runs in a process group of its own so that, should it start serving instead of exiting,
    the master and any workers it forked are all killed before the test fails."""
    full_env = dict(os.environ)
    full_env.pop("LOG_LEVEL", None)
    full_env.update(env or {})
    proc = subprocess.Popen([bw_bin] + list(args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout * SLOW)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail("breakwater %s still running after %.0f s; stderr:\n%s" % (
            " ".join(args), timeout * SLOW, err.decode("utf-8", "replace")[-2000:]))
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def write_config(tmp_path, config, name="breakwater.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config, indent=2))
    return str(path)


def accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def project_version():
    text = (harness.REPO / "meson.build").read_text()
    m = re.search(r"project\([^)]*?version\s*:\s*'([^']+)'", text, re.S)
    assert m, "no version in meson.build"
    return m.group(1)


# ---------------------------------------------------------------------------------------------
# -V, -h and usage errors

def test_version_names_breakwater_and_linked_libraries(bw_bin):
    code, out, err = run(bw_bin, ["-V"])
    assert code == 0, "-V exited %s; stderr: %s" % (code, err)
    lines = out.splitlines()
    assert lines, "-V printed nothing on stdout (stderr: %r)" % err
    assert re.match(r"^breakwater \d+\.\d+\.\d+\S*\s*$", lines[0]), (
        "first line of -V should be 'breakwater <version>', got %r" % lines[0])
    assert lines[0].split()[1] == project_version(), (
        "-V reports %r, meson.build says %r" % (lines[0], project_version()))
    for lib in ("libevent", "OpenSSL", "cJSON", "hiredis"):
        assert re.search(r"(?im)^.*\b%s\b.*\d+\.\d+" % re.escape(lib), out), (
            "-V output has no line naming %s with a version:\n%s" % (lib, out))


def test_help_prints_usage_and_exits_0(bw_bin):
    code, out, err = run(bw_bin, ["-h"])
    assert code == 0, "-h exited %s; stderr: %s" % (code, err)
    assert "usage" in out.lower(), "-h printed no usage on stdout:\n%s" % out
    for option in ("-c", "-t", "-V", "-h"):
        assert re.search(r"(^|[\s\[|])%s\b" % re.escape(option), out), (
            "usage does not mention %s:\n%s" % (option, out))


def test_no_arguments_is_a_usage_error(bw_bin):
    code, out, err = run(bw_bin, [])
    assert code == 2, "no arguments: exit %s, expected 2 (usage error)" % code
    assert "usage" in err.lower(), "no usage on stderr:\n%s" % err
    assert "-c" in err, "usage on stderr does not mention -c:\n%s" % err


@pytest.mark.parametrize("args", [["-Z"], ["--no-such-option"], ["-c"]],
                         ids=["unknown-short", "unknown-long", "c-without-file"])
def test_bad_usage_exits_2(bw_bin, args):
    code, out, err = run(bw_bin, args)
    assert code == 2, "breakwater %s: exit %s, expected 2 (usage error); stderr:\n%s" % (
        " ".join(args), code, err)
    assert err.strip(), "breakwater %s: exit 2 without saying why on stderr" % " ".join(args)
    assert "configuration ok" not in out


# ---------------------------------------------------------------------------------------------
# -c and -t

def test_missing_config_file_exits_1_naming_it(bw_bin, tmp_path):
    missing = str(tmp_path / "does-not-exist.json")
    code, out, err = run(bw_bin, ["-c", missing])
    assert code == 1, "-c with a missing file: exit %s, expected 1; stderr:\n%s" % (code, err)
    assert missing in err, "the error does not name the missing file %s:\n%s" % (missing, err)


def test_check_accepts_good_config(bw_bin, tmp_path, upstream):
    config = harness.base_config([upstream.address])
    path = write_config(tmp_path, config)
    code, out, err = run(bw_bin, ["-t", "-c", path])
    assert code == 0, "-t on a valid file: exit %s; stderr:\n%s" % (code, err)
    assert "configuration ok" in out, "-t did not print 'configuration ok' on stdout:\n%s" % out
    # -t checks and exits: it must not have bound the listener.
    port = int(config["listeners"][0]["address"].rsplit(":", 1)[1])
    assert not accepts(port), "-t left something listening on port %d" % port


def test_check_accepts_config_with_options_in_any_order(bw_bin, tmp_path, upstream):
    path = write_config(tmp_path, harness.base_config([upstream.address]))
    code, out, err = run(bw_bin, ["-c", path, "-t"])
    assert code == 0 and "configuration ok" in out, (
        "-c FILE -t: exit %s, stdout %r, stderr %r" % (code, out, err))


def test_check_reports_json_syntax_error_with_line(bw_bin, tmp_path, upstream):
    text = json.dumps(harness.base_config([upstream.address]), indent=2)
    # Cut inside the routes array: the error is on a known line, after the listeners.
    cut = text.index('"routes"')
    path = tmp_path / "broken.json"
    path.write_text(text[:cut] + '"routes": [ {"path_prefix": "/", ,} ]\n}\n')
    bad_line = text[:cut].count("\n") + 1
    code, out, err = run(bw_bin, ["-t", "-c", str(path)])
    assert code == 1, "-t on a JSON syntax error: exit %s, expected 1; stderr:\n%s" % (code, err)
    assert "configuration ok" not in out
    m = re.search(r"(?m)^%s:(\d+):(\d+): \S" % re.escape(str(path)), err)
    assert m, "no 'FILE:LINE:COL: message' line on stderr:\n%s" % err
    assert int(m.group(1)) == bad_line, "syntax error reported on line %s, it is on line %d" % (
        m.group(1), bad_line)


def test_check_reports_every_semantic_problem(bw_bin, tmp_path, upstream):
    config = harness.base_config([upstream.address])
    config["routes"][0]["upstream"] = "no_such_upstream"
    config["workers"] = "two"
    path = write_config(tmp_path, config)
    code, out, err = run(bw_bin, ["-t", "-c", path])
    assert code == 1, "-t on an invalid file: exit %s, expected 1; stderr:\n%s" % (code, err)
    assert "configuration ok" not in out
    lines = [line for line in err.splitlines() if line.startswith(path + ":")]
    assert any("no_such_upstream" in line or "routes" in line for line in lines), (
        "no 'FILE: routes...' line for the unknown upstream on stderr:\n%s" % err)
    assert any("workers" in line for line in lines), (
        "no 'FILE: workers...' line for the wrong type (all problems, not just the first):\n%s"
        % err)


def test_check_missing_file_exits_1(bw_bin, tmp_path):
    missing = str(tmp_path / "nope.json")
    code, out, err = run(bw_bin, ["-t", "-c", missing])
    assert code == 1, "-t -c on a missing file: exit %s, expected 1" % code
    assert missing in err, "the error does not name %s:\n%s" % (missing, err)
    assert "configuration ok" not in out


# ---------------------------------------------------------------------------------------------
# LOG_LEVEL

LEVEL_LINE = r"(?im)^\S+\s+%s\b"  # "<timestamp> <level> <tag>: message"


def test_log_level_debug_is_accepted(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream.address]), env={"LOG_LEVEL": "debug"})
    status, _, _, _ = harness.http_request(
        bw.listener_port(), b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        timeout=10 * SLOW)
    assert status == 200, "LOG_LEVEL=debug: request got %s" % status
    assert "LOG_LEVEL" not in bw.read_error_log() + bw.read_stderr(), (
        "LOG_LEVEL=debug was complained about:\n%s" % bw.output_excerpt())


def test_log_level_error_silences_info(upstream, breakwater_factory):
    request = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    logs = {}
    for level in (None, "error"):
        env = {"LOG_LEVEL": level} if level else {"LOG_LEVEL": None}
        bw = breakwater_factory(harness.base_config([upstream.address]), env=env)
        status, _, _, _ = harness.http_request(bw.listener_port(), request, timeout=10 * SLOW)
        assert status == 200, "LOG_LEVEL=%s: request got %s" % (level, status)
        assert bw.stop() == 0, "LOG_LEVEL=%s: exit code on SIGTERM" % level
        logs[level] = bw.read_error_log()
    assert re.search(LEVEL_LINE % "info", logs[None]), (
        "the default level logged no info line at all (start, stop):\n%s" % logs[None][-2000:])
    assert not re.search(LEVEL_LINE % "(info|debug)", logs["error"]), (
        "LOG_LEVEL=error still logs info/debug lines:\n%s" % logs["error"][-2000:])


def test_log_level_bogus_exits_1_naming_the_variable(bw_bin, tmp_path, upstream):
    config = harness.base_config([upstream.address])
    error_log = tmp_path / "error.log"
    config["log"] = {"error_log": str(error_log), "access_log": "off"}
    path = write_config(tmp_path, config)
    code, out, err = run(bw_bin, ["-c", path], env={"LOG_LEVEL": "bogus"})
    text = err + (error_log.read_text() if error_log.exists() else "")
    assert code == 1, "LOG_LEVEL=bogus: exit %s, expected 1; output:\n%s" % (code, text)
    assert "LOG_LEVEL" in text, "the error does not name LOG_LEVEL:\n%s" % text


# ---------------------------------------------------------------------------------------------
# workers: 0

def test_workers_zero_means_one_per_cpu(upstream, breakwater_factory):
    bw = breakwater_factory(harness.base_config([upstream.address], workers=0))
    # "One per CPU": the online CPU count, or the CPUs this process may run on (containers).
    expected = {os.cpu_count(), len(os.sched_getaffinity(0))}
    end = time.monotonic() + 10 * SLOW
    while True:
        pids = bw.worker_pids()
        if len(pids) in expected or time.monotonic() >= end:
            break
        time.sleep(0.05)
    assert len(pids) in expected, "workers: 0 started %d workers %s; CPUs: %s" % (
        len(pids), pids, sorted(expected))
