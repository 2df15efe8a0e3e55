"""The admin status page (GET /) in a real browser: headless Chromium loads it, runs its
script against the live JSON endpoints, and the rendered DOM must show every upstream with its
breaker state (one forced open first), the rate-limit policy with its busiest key, and the
header facts; a screenshot is saved. With admin.token_env set, the page is served without the
token, shows the token form, and works once the token is given in the URL fragment (which the
browser never sends to the server)."""

import re
import shutil
import subprocess

import pytest

import harness
from harness import Client, build_request, metric_sum

SLOW = harness.SLOW
TOKEN = "page-t0ken"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


def chromium(tmp_path, url, *args, timeout=60, budget_ms=4000):
    """Runs headless Chromium on url with `budget_ms` of virtual time (timers run that far
    ahead; network waits do not count), returning its standard output."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--user-data-dir=%s" % (tmp_path / "chromium-profile"),
           "--virtual-time-budget=%d" % int(budget_ms * SLOW)] + list(args) + [url]
    p = subprocess.run(cmd, capture_output=True, timeout=timeout * SLOW)
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")[-2000:]
    return p.stdout.decode("utf-8", "replace")


def rendered(tmp_path, url):
    """The DOM once the page has loaded its data (retried: a loaded machine may need longer
    than the virtual-time budget)."""
    seen = []

    def loaded():
        dom = chromium(tmp_path, url, "--dump-dom")
        seen[:] = [dom]
        return dom if 'data-loaded="true"' in dom else None
    try:
        return harness.wait_until(loaded, 90 * SLOW, interval=0.2, message="the page's data")
    except AssertionError:
        raise AssertionError("page never loaded its data:\n%s" % (seen[0][-3000:] if seen
                                                                 else "(no output)"))


def rows(dom):
    """{upstream: (state, forced)} from the rendered upstream table."""
    return {m.group(1): (m.group(2), m.group(3) == "true") for m in re.finditer(
        r'<tr data-upstream="([^"]+)" data-state="([^"]+)" data-forced="(true|false)"', dom)}


def page_config(upstream_factory):
    a, b = upstream_factory(), upstream_factory()
    cfg = harness.base_config([a], workers=2, rate_limits={"per_client": {"capacity": 2,
                                                                        "refill_per_sec": 0}})
    cfg["upstreams"]["static"] = {"servers": [b.address]}
    cfg["routes"] = [{"path_prefix": "/static", "upstream": "static",
                      "rate_limit": "per_client"},
                     {"path_prefix": "/", "upstream": "api"}]
    return cfg


def post(bw, path, token=None):
    hs = [("Connection", "close"), ("Content-Length", "0")]
    if token:
        hs.append(("Authorization", "Bearer " + token))
    with Client(bw.admin_port) as c:
        c.send(build_request("POST", path, hs, host="localhost"))
        return c.read_response("POST")


def traffic(bw, path):
    with Client(bw.port) as c:
        c.send(build_request("GET", path, [("Connection", "close")]))
        return c.read_response().status


def test_status_page_in_chromium(upstream_factory, breakwater_factory, tmp_path):
    bw = breakwater_factory(page_config(upstream_factory))
    assert post(bw, "/upstreams/api/open").status == 200
    assert [traffic(bw, "/static/x") for _ in range(4)] == [200, 200, 429, 429]
    url = "http://127.0.0.1:%d/" % bw.admin_port
    dom = rendered(tmp_path, url)
    assert rows(dom) == {"api": ("open", True), "static": ("closed", False)}, rows(dom)
    assert "FORCED (maintenance)" in dom
    # Each server, the policy and its busiest key, version, workers, Redis.
    for u in ("api", "static"):
        assert bw.config["upstreams"][u]["servers"][0] in dom, u
    assert 'data-policy="per_client"' in dom
    assert re.search(r"key <b>127\.0\.0\.1</b>.*?rejected <b>2</b>", dom), dom[-2000:]
    assert re.search(r'id="version">version \d+\.\d+\.\d+', dom)
    assert 'id="workers">workers 2/2' in dom
    assert "redis not configured" in dom
    assert 'id="rate-requests"' in dom and 'id="rate-responses_5xx"' in dom

    shot = tmp_path / "status-page.png"
    chromium(tmp_path, url, "--window-size=1280,900", "--screenshot=%s" % shot)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, len(data)

    # It refreshes itself: over 7 s of (virtual) time it has loaded its data several times, and
    # the rates need two loads, so they show numbers.
    dom = chromium(tmp_path, url, "--dump-dom", budget_ms=7000)
    m = re.search(r'data-refreshes="(\d+)"', dom)
    assert m and int(m.group(1)) >= 3, m and m.group(0)
    assert re.search(r'id="rate-requests"><b>\d+\.\d</b>', dom), dom[-3000:]

    # The page follows the state: after a reset the next load shows it closed.
    assert post(bw, "/upstreams/api/reset").status == 200
    assert rows(rendered(tmp_path, url))["api"] == ("closed", False)


def test_status_page_with_the_token(upstream_factory, breakwater_factory, tmp_path):
    cfg = page_config(upstream_factory)
    cfg["admin"]["token_env"] = "BW_PAGE_TOKEN"
    bw = breakwater_factory(cfg, env={"BW_PAGE_TOKEN": TOKEN})
    assert post(bw, "/upstreams/static/open", token=TOKEN).status == 200
    url = "http://127.0.0.1:%d/" % bw.admin_port

    # Without the token: the HTML loads, asks for the token, and shows no data.
    dom = chromium(tmp_path, url, "--dump-dom")
    assert 'id="login" style="display: block;"' in dom, dom[-2000:]
    assert rows(dom) == {}
    refused = metric_sum(harness.scrape(bw, token=TOKEN), "breakwater_admin_auth_failures_total")
    assert refused >= 1

    # With the token in the fragment: moved to sessionStorage, sent as a header, data shown.
    dom = rendered(tmp_path, url + "#token=" + TOKEN)
    assert rows(dom) == {"api": ("closed", False), "static": ("open", True)}, rows(dom)
    assert TOKEN not in dom
    after = metric_sum(harness.scrape(bw, token=TOKEN), "breakwater_admin_auth_failures_total")
    assert after == refused, "the page's requests with the token were refused"
