"""The README's first command on a machine without the test packages.

A machine that already ran the test suite has cmocka installed, which hides a build that needs it.
These tests run the build (and the Quick start itself) in a private mount namespace in which every
file of the test-only packages is covered by an empty file, so meson cannot find them, exactly as
on a fresh machine. A control case shows that the hiding works: asking for the unit tests
(-Dtests=enabled) must then fail.
"""

import os
import shutil
import subprocess
import urllib.request

import pytest

import harness

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# Packages the test command installs and the first command must not need.
TEST_ONLY_PACKAGES = ["libcmocka-dev", "libcmocka0"]

pytestmark = pytest.mark.skipif(os.environ.get("BREAKWATER_SANITIZED") == "1",
                                reason="builds from source; once per suite run is enough")


def package_files(pkg):
    out = subprocess.run(["dpkg-query", "-L", pkg], capture_output=True, text=True)
    if out.returncode != 0:
        return []
    return [p for p in out.stdout.splitlines() if os.path.isfile(p) and not os.path.islink(p)]


def hidden_shell(script, env=None, timeout=600):
    """Runs a shell script in a mount namespace where the test-only packages' files are empty."""
    files = []
    for pkg in TEST_ONLY_PACKAGES:
        files += package_files(pkg)
    if not files:
        pytest.fail("none of %s is installed: the test command installs them" % TEST_ONLY_PACKAGES)
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to hide packages")
    hide = "".join("mount --bind /dev/null '%s'\n" % f for f in files)
    full = "set -e\nmount --make-rprivate /\n" + hide + script
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(["unshare", "--mount", "sh", "-c", full], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout * harness.SLOW)


def test_build_without_test_packages(tmp_path):
    build = tmp_path / "build"
    r = hidden_shell("meson setup '%s' >/dev/null\nninja -C '%s' breakwater >/dev/null\n"
                     "'%s/breakwater' -t -c examples/breakwater.json\n" % (build, build, build))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "configuration ok" in (r.stdout + r.stderr)
    # Without cmocka the unit tests are simply not part of the build.
    tests = subprocess.run(["meson", "test", "-C", str(build), "--list"], capture_output=True,
                           text=True)
    assert tests.returncode == 0, tests.stderr
    assert "fuzz" in tests.stdout
    assert not [line for line in tests.stdout.splitlines() if "unit" in line]


def test_hiding_really_hides_cmocka(tmp_path):
    build = tmp_path / "build"
    r = hidden_shell("meson setup -Dtests=enabled '%s'\n" % build)
    assert r.returncode != 0
    assert "cmocka" in (r.stdout + r.stderr)


def test_quickstart_serves_without_test_packages(tmp_path):
    for port in (8080, 9001, 9901):
        if harness._tcp_accepts(port):
            pytest.skip("port %d is in use on this machine; the example config needs it" % port)
    build = tmp_path / "build"
    env = {"BW_QUICKSTART_BUILD": str(build)}
    try:
        r = hidden_shell("scripts/quickstart.sh\n", env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        with urllib.request.urlopen("http://127.0.0.1:8080/hello", timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers.get("Server", "").startswith("breakwater-demo")
    finally:
        subprocess.run(["scripts/quickstart.sh", "stop"], cwd=ROOT, env=dict(os.environ, **env),
                       capture_output=True, timeout=60)
