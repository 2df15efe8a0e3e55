"""Black-box tests of `breakwater -t -c FILE`, the configuration check.

Each bad configuration must exit 1 and name, on stderr, the file, the place (JSON path, and
line:col where the value can be located) and the problem. Good configurations exit 0 and print
"configuration ok". The binary is $BREAKWATER_BIN, or build/breakwater under the repository root.
"""

import copy
import json
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("BREAKWATER_BIN", REPO / "build" / "breakwater"))
TIMEOUT = 20

# Variables the configuration reads; removed so that the caller's shell cannot change results.
OVERRIDES = (
    "RATE_LIMIT_CAPACITY",
    "RATE_LIMIT_REFILL_RATE",
    "CIRCUIT_BREAKER_FAILURE_THRESHOLD",
    "CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS",
    "CIRCUIT_BREAKER_HALF_OPEN_SUCCESS_THRESHOLD",
    "REDIS_URL",
    "LOG_LEVEL",
)


def base():
    return {
        "workers": 1,
        "listeners": [{"address": "127.0.0.1:18080"}],
        "admin": {"address": "127.0.0.1:19901"},
        "upstreams": {
            "api": {"servers": ["127.0.0.1:19001"], "connect_timeout_ms": 1000},
            "static": {"servers": ["127.0.0.1:19002"]},
        },
        "routes": [
            {"path_prefix": "/api", "upstream": "api", "rate_limit": "per_client"},
            {"path_prefix": "/", "upstream": "static"},
        ],
        "rate_limits": {"per_client": {"key": "client_ip", "capacity": 10, "refill_per_sec": 5}},
        "trusted_proxies": ["10.0.0.0/8"],
    }


def run_check(cfg_path, extra_env=None, cwd=None):
    if not BIN.exists():
        pytest.fail(f"breakwater binary not found at {BIN}; build it or set BREAKWATER_BIN")
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    env.update(extra_env or {})
    return subprocess.run(
        [str(BIN), "-t", "-c", str(cfg_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO,
        timeout=TIMEOUT,
    )


def line_col(text, key, value):
    """Line and column (1-based, in characters) of `value` after the first `"key"` in text."""
    at = text.index(value, text.index(f'"{key}"'))
    line = text.count("\n", 0, at) + 1
    col = at - (text.rfind("\n", 0, at) + 1) + 1
    return f"{line}:{col}"


def mutate(fn):
    cfg = copy.deepcopy(base())
    fn(cfg)
    return json.dumps(cfg, indent=2)


def set_in(path, value):
    def fn(cfg):
        node = cfg
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return fn


def drop(key):
    return lambda cfg: cfg.pop(key)


# (id, text builder, json path, message fragment, (key, value) locating line:col or None)
BAD = [
    ("missing-listeners", lambda: mutate(drop("listeners")), "listeners",
     "required field is missing", None),
    ("missing-upstreams", lambda: mutate(drop("upstreams")), "upstreams",
     "required field is missing", None),
    ("missing-routes", lambda: mutate(drop("routes")), "routes", "required field is missing", None),
    ("empty-listeners", lambda: mutate(set_in(["listeners"], [])), "listeners",
     "must contain at least one listener", ("listeners", "[]")),
    ("unknown-top-field", lambda: mutate(set_in(["worker"], 2)), "worker",
     'unknown field "worker"', ("worker", "2")),
    ("unknown-nested-field",
     lambda: mutate(set_in(["listeners"], [{"address": "127.0.0.1:18080", "adress": "x"}])),
     "listeners[0].adress", 'unknown field "adress" (allowed here: address, tls)',
     ("adress", '"x"')),
    ("workers-range", lambda: mutate(set_in(["workers"], 2000)), "workers",
     "must be an integer between 0 and 1024, got 2000", ("workers", "2000")),
    ("workers-type", lambda: mutate(set_in(["workers"], "2")), "workers",
     'must be an integer between 0 and 1024, got "2"', ("workers", '"2"')),
    ("listener-hostname",
     lambda: mutate(set_in(["listeners"], [{"address": "example.com:80"}])),
     "listeners[0].address",
     'invalid address "example.com:80": "example.com" is not an IP address; host names are not '
     "resolved", ("address", '"example.com:80"')),
    ("listener-no-port", lambda: mutate(set_in(["listeners"], [{"address": "127.0.0.1"}])),
     "listeners[0].address", 'invalid address "127.0.0.1": missing port', ("address", '"127.0.0.1"')),
    ("listener-duplicate",
     lambda: mutate(set_in(["listeners"], [{"address": "127.0.0.1:18080"},
                                           {"address": "localhost:18080"}])),
     "listeners[1].address",
     '"localhost:18080" conflicts with listeners[0] ("127.0.0.1:18080")', ("listeners", '"localhost:18080"')),
    ("admin-equals-listener", lambda: mutate(set_in(["admin", "address"], "127.0.0.1:18080")),
     "admin.address", '"127.0.0.1:18080" conflicts with listeners[0]', ("admin", '"127.0.0.1:18080"')),
    ("servers-empty", lambda: mutate(set_in(["upstreams", "api", "servers"], [])),
     "upstreams.api.servers", "must contain at least one server", ("servers", "[]")),
    ("server-bad-port",
     lambda: mutate(set_in(["upstreams", "api", "servers"], ["127.0.0.1:19001", "127.0.0.1:99999"])),
     "upstreams.api.servers[1]",
     'invalid server address "127.0.0.1:99999": invalid port "99999"', ("servers", '"127.0.0.1:99999"')),
    ("connect-timeout-negative",
     lambda: mutate(set_in(["upstreams", "api", "connect_timeout_ms"], -5)),
     "upstreams.api.connect_timeout_ms", "must be an integer between 1 and 86400000, got -5",
     ("connect_timeout_ms", "-5")),
    ("balance-unknown", lambda: mutate(set_in(["upstreams", "api", "balance"], "random")),
     "upstreams.api.balance", 'must be "round_robin" or "least_conn", got "random"',
     ("balance", '"random"')),
    ("breaker-rate-range",
     lambda: mutate(set_in(["upstreams", "api", "circuit_breaker"], {"failure_rate_percent": 101})),
     "upstreams.api.circuit_breaker.failure_rate_percent",
     "must be an integer between 0 and 100, got 101", ("failure_rate_percent", "101")),
    ("breaker-status-range",
     lambda: mutate(set_in(["upstreams", "api", "circuit_breaker"], {"failure_statuses": [503, 600]})),
     "upstreams.api.circuit_breaker.failure_statuses[1]",
     "must be an HTTP status between 100 and 599, got 600", ("failure_statuses", "600")),
    ("route-unknown-upstream", lambda: mutate(set_in(["routes"], [{"upstream": "apii"}])),
     "routes[0].upstream", 'unknown upstream "apii" (known: api, static)', ("upstream", '"apii"')),
    ("route-unknown-policy",
     lambda: mutate(set_in(["routes"], [{"upstream": "api", "rate_limit": "per_ip"}])),
     "routes[0].rate_limit", 'unknown rate-limit policy "per_ip" (known: per_client)',
     ("rate_limit", '"per_ip"')),
    ("route-shadowed",
     lambda: mutate(set_in(["routes"], [{"upstream": "static"},
                                        {"path_prefix": "/api", "upstream": "api"}])),
     "routes[1]", "never matches: routes[0]", None),
    ("policy-capacity-zero",
     lambda: mutate(set_in(["rate_limits", "per_client", "capacity"], 0)),
     "rate_limits.per_client.capacity", "must be an integer between 1", ("capacity", "0")),
    ("policy-key-unknown", lambda: mutate(set_in(["rate_limits", "per_client", "key"], "ip")),
     "rate_limits.per_client.key", 'must be "client_ip" or "header:NAME", got "ip"',
     ("key", '"ip"')),
    ("policy-refill-negative",
     lambda: mutate(set_in(["rate_limits", "per_client", "refill_per_sec"], -1)),
     "rate_limits.per_client.refill_per_sec", "must be a number between 0", ("refill_per_sec", "-1")),
    ("policy-ipv6-prefix",
     lambda: mutate(set_in(["rate_limits", "per_client", "ipv6_prefix"], 129)),
     "rate_limits.per_client.ipv6_prefix", "must be an integer between 1 and 128, got 129",
     ("ipv6_prefix", "129")),
    ("trusted-proxy-invalid", lambda: mutate(set_in(["trusted_proxies"], ["10.0.0.0/33"])),
     "trusted_proxies[0]", 'invalid CIDR "10.0.0.0/33"', ("trusted_proxies", '"10.0.0.0/33"')),
    ("trusted-proxy-host-bits", lambda: mutate(set_in(["trusted_proxies"], ["10.1.2.3/8"])),
     "trusted_proxies[0]",
     '"10.1.2.3/8" has bits set beyond the /8 prefix; did you mean "10.0.0.0/8"?', ("trusted_proxies", '"10.1.2.3/8"')),
    ("redis-scheme", lambda: mutate(set_in(["redis"], {"url": "http://127.0.0.1:6379"})),
     "redis.url", "invalid URL: must start with redis:// or unix://", ("url", '"http://')),
    ("redis-missing-url", lambda: mutate(set_in(["redis"], {"key_prefix": "bw"})),
     "redis.url", "required field is missing", None),
    ("log-level", lambda: mutate(set_in(["log"], {"level": "loud"})), "log.level",
     'must be one of debug, info, warn, error, got "loud"', ("level", '"loud"')),
    ("limits-max-headers", lambda: mutate(set_in(["limits"], {"max_headers": 300})),
     "limits.max_headers", "must be an integer between 8 and 256, got 300", ("max_headers", "300")),
    ("limits-max-header-bytes", lambda: mutate(set_in(["limits"], {"max_header_bytes": 10})),
     "limits.max_header_bytes", "must be an integer between 1024 and 1048576, got 10",
     ("max_header_bytes", "10")),
    ("tls-missing-key",
     lambda: mutate(set_in(["listeners"], [{"address": "127.0.0.1:18443",
                                            "tls": {"cert": "server.crt"}}])),
     "listeners[0].tls.key", "required field is missing", None),
    ("admin-token-unset",
     lambda: mutate(set_in(["admin", "token_env"], "BW_TEST_TOKEN_THAT_IS_NOT_SET")),
     "admin.token_env", "environment variable BW_TEST_TOKEN_THAT_IS_NOT_SET is not set",
     ("token_env", '"BW_TEST')),
    ("duplicate-key", lambda: '{"workers": 1,\n "workers": 2}', "workers",
     'field "workers" appears more than once', ("workers", "2")),
]


@pytest.mark.parametrize("name,build,jpath,message,locate", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_refused(tmp_path, name, build, jpath, message, locate):
    text = build()
    cfg = tmp_path / "bw.json"
    cfg.write_text(text)
    r = run_check(cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "configuration ok" not in r.stdout
    if locate is not None:
        assert f"{cfg}:{line_col(text, *locate)}: {jpath}: {message}" in r.stderr, r.stderr
    else:
        assert any(line.startswith(f"{cfg}:") and f" {jpath}: {message}" in line
                   for line in r.stderr.splitlines()), r.stderr


SYNTAX = [
    ("trailing-comma", '{\n  "workers": 1,\n}\n', "3:1", "trailing comma"),
    ("missing-comma", '{\n  "workers": 1\n  "listeners": []\n}\n', "3:3", "expected ',' or '}'"),
    ("unclosed", '{\n  "listeners": [\n', "3:1", "unexpected end of file"),
    ("comment", '{\n  // workers\n  "workers": 1\n}\n', "2:3", "comments are not allowed"),
    ("single-quotes", "{'workers': 1}", "1:2", "double quotes"),
    ("empty", "", "1:1", "the file is empty"),
]


@pytest.mark.parametrize("name,text,pos,message", SYNTAX, ids=[s[0] for s in SYNTAX])
def test_syntax_error_gives_line_and_column(tmp_path, name, text, pos, message):
    cfg = tmp_path / "syntax.json"
    cfg.write_text(text)
    r = run_check(cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{cfg}:{pos}: invalid JSON" in r.stderr, r.stderr
    assert message in r.stderr, r.stderr


def test_every_problem_is_reported(tmp_path):
    cfg_dict = base()
    cfg_dict["workers"] = -1
    cfg_dict["upstreams"]["api"]["retries"] = 99
    cfg_dict["routes"][1]["upstream"] = "nope"
    cfg = tmp_path / "many.json"
    cfg.write_text(json.dumps(cfg_dict, indent=2))
    r = run_check(cfg)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.startswith(f"{cfg}:")]
    assert len(lines) == 3, r.stderr
    assert any("workers: must be an integer" in line for line in lines)
    assert any("upstreams.api.retries: must be an integer between 0 and 10" in line for line in lines)
    assert any('routes[1].upstream: unknown upstream "nope"' in line for line in lines)


def test_missing_file(tmp_path):
    cfg = tmp_path / "absent.json"
    r = run_check(cfg)
    assert r.returncode == 1
    assert f"{cfg}: cannot open the configuration file" in r.stderr


def test_invalid_environment_value_is_an_error(tmp_path):
    cfg = tmp_path / "bw.json"
    cfg.write_text(json.dumps(base()))
    r = run_check(cfg, {"RATE_LIMIT_CAPACITY": "abc"})
    assert r.returncode == 1
    assert 'environment RATE_LIMIT_CAPACITY: must be an integer between 1 and 1000000000, got "abc"' \
        in r.stderr


def test_redis_password_is_not_printed(tmp_path):
    cfg = tmp_path / "bw.json"
    cfg.write_text(json.dumps(base()))
    r = run_check(cfg, {"REDIS_URL": "redis://:s3cr3t-pw@redis.internal:6379/0"})
    assert r.returncode == 1
    assert "environment REDIS_URL: invalid URL" in r.stderr
    assert "s3cr3t-pw" not in r.stderr


def test_good_config(tmp_path):
    cfg = tmp_path / "bw.json"
    cfg.write_text(json.dumps(base(), indent=2))
    r = run_check(cfg)
    assert r.returncode == 0, r.stderr
    assert "configuration ok" in r.stdout


def test_good_config_with_valid_environment(tmp_path):
    cfg = tmp_path / "bw.json"
    cfg.write_text(json.dumps(base()))
    r = run_check(cfg, {"RATE_LIMIT_CAPACITY": "50", "CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS": "5",
                        "REDIS_URL": "redis://127.0.0.1:6379/0", "LOG_LEVEL": "debug"})
    assert r.returncode == 0, r.stderr
    assert "configuration ok" in r.stdout


def test_example_config_passes():
    r = run_check(REPO / "examples" / "breakwater.json")
    assert r.returncode == 0, r.stderr
    assert "configuration ok" in r.stdout


# ---- TLS: files are resolved against the configuration's directory ----

def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=TIMEOUT)


@pytest.fixture
def tls_files(tmp_path):
    """A self-signed certificate for key1, and an unrelated key2."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    openssl("req", "-x509", *ec, "-nodes", "-keyout", "key1.pem", "-out", "cert1.pem",
            "-days", "2", "-subj", "/CN=localhost", cwd=tmp_path)
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-out", "key2.pem", cwd=tmp_path)
    return tmp_path


def tls_config(directory, cert, key):
    cfg = base()
    cfg["listeners"].append({"address": "127.0.0.1:18443", "tls": {"cert": cert, "key": key}})
    cfg["listeners"][0], cfg["listeners"][1] = cfg["listeners"][1], cfg["listeners"][0]
    path = directory / "tls.json"
    text = json.dumps(cfg, indent=2)
    path.write_text(text)
    return path, text


def test_tls_matching_cert_and_key(tls_files):
    cfg, _ = tls_config(tls_files, "cert1.pem", "key1.pem")
    r = run_check(cfg)  # run from the repository root: relative names follow the config file
    assert r.returncode == 0, r.stderr
    assert "configuration ok" in r.stdout


def test_tls_unreadable_cert(tls_files):
    cfg, text = tls_config(tls_files, "missing.pem", "key1.pem")
    r = run_check(cfg)
    assert r.returncode == 1
    pos = line_col(text, "cert", '"missing.pem"')
    assert f"{cfg}:{pos}: listeners[0].tls.cert: cannot read" in r.stderr, r.stderr
    assert str(tls_files / "missing.pem") in r.stderr
    assert "No such file or directory" in r.stderr


def test_tls_cert_key_mismatch(tls_files):
    cfg, _ = tls_config(tls_files, "cert1.pem", "key2.pem")
    r = run_check(cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    assert str(cfg) in r.stderr
    assert "listeners[0].tls" in r.stderr, r.stderr
    assert "configuration ok" not in r.stdout
