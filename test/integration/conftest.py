"""Fixtures shared by breakwater's integration tests (see harness.py for the building blocks).

After every test, each proxy the test started is stopped and its stderr and error log are
searched for sanitizer reports; a report fails the test with an excerpt."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


@pytest.fixture
def bw_bin():
    path = os.environ.get("BREAKWATER_BIN") or str(harness.DEFAULT_BIN)
    if not os.path.exists(path):
        pytest.fail("breakwater binary not found at %s: build it first (meson setup build && "
                    "ninja -C build) or set BREAKWATER_BIN" % path)
    return path


@pytest.fixture
def upstream():
    """A started Upstream with the default handler."""
    up = harness.Upstream().start()
    yield up
    up.stop()


@pytest.fixture
def upstream_factory():
    """callable(handler=None, read_body=True) -> started Upstream, stopped at teardown."""
    made = []

    def make(handler=None, read_body=True):
        up = harness.Upstream(handler, read_body=read_body).start()
        made.append(up)
        return up

    yield make
    for up in made:
        up.stop()


@pytest.fixture
def breakwater_factory(bw_bin, tmp_path):
    """callable(config, env=None) -> started Breakwater, stopped at teardown."""
    made = []

    def make(config, env=None, **kw):
        bw = harness.Breakwater(config, tmp_path, env=env, binary=bw_bin, **kw)
        made.append(bw)
        return bw

    yield make
    for bw in made:
        bw.stop()


@pytest.fixture(autouse=True)
def _stop_everything_and_check_sanitizers():
    """Stops proxies and upstreams a test left running, then fails the test if any proxy it
    started wrote a sanitizer report."""
    n_bw = len(harness._all_breakwaters)
    n_up = len(harness._all_upstreams)
    yield
    started = harness._all_breakwaters[n_bw:]
    for bw in started:
        bw.stop()
    for up in harness._all_upstreams[n_up:]:
        up.stop()
    del harness._all_upstreams[n_up:]
    del harness._all_breakwaters[n_bw:]
    reports = [r for r in (bw.sanitizer_report() for bw in started) if r]
    if reports:
        pytest.fail("sanitizer report(s) from breakwater:\n" + "\n\n".join(reports),
                    pytrace=False)
