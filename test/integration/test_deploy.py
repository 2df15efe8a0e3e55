"""deploy/: the files operators use are checked against the code they describe.

- Prometheus rules: `promtool check rules`, `promtool test rules` (the rule unit tests), a test
  case for every alert, and no upstream name written into any rule.
- Containerfile: the runtime stage installs exactly the Debian packages of the shared libraries
  the built binary links (its NEEDED entries, resolved by the dynamic loader and mapped to their
  package with dpkg -S), and the build stage needs no test package.
- Kubernetes and compose: every resource listed exists and parses, names and ports agree between
  the manifests, and the compose stack mounts the rules and scrapes the admin port it publishes.
No container runtime or cluster is needed: these are static checks plus the binary itself.
"""

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

import harness

DEPLOY = harness.REPO / "deploy"
RULES = DEPLOY / "prometheus" / "breakwater-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "breakwater-rules.test.yml"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"

# Part of every Debian base image: never installed by the Containerfile.
BASE_IMAGE_PACKAGES = {"libc6"}
# Runtimes a sanitizer build links and a release build does not.
SANITIZER_LIBS = re.compile(r"^lib(asan|ubsan|lsan|tsan)\.so")


def promtool():
    p = shutil.which("promtool")
    if not p:
        pytest.fail("promtool not found (Debian package prometheus)")
    return p


# ---- Prometheus rules -------------------------------------------------------------------------

def test_promtool_check_rules():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests_pass():
    r = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=str(RULE_TESTS.parent),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def alerts():
    doc = yaml.safe_load(RULES.read_text())
    return [rule for g in doc["groups"] for rule in g["rules"] if "alert" in rule]


def test_every_alert_has_a_rule_test():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    text = json.dumps(tests)
    names = [a["alert"] for a in alerts()]
    assert len(names) >= 10
    untested = []
    for name in names:
        # A firing ALERTS sample or an alert_rule_test with expected alerts names it exactly.
        if ('alertname=\\"%s\\"' % name) not in text and not any(
                t.get("alertname") == name and t.get("exp_alerts")
                for case in tests for t in case.get("alert_rule_test", [])):
            untested.append(name)
    assert not untested, "alerts without a promtool test case: %s" % untested


def test_no_upstream_name_in_the_rules():
    text = RULES.read_text()
    assert not re.search(r'upstream\s*=~?\s*"', text), "an upstream is matched by name"
    assert '"upstream"' not in text, "an upstream label is written by a rule"
    crit = [a for a in alerts() if a["alert"] == "BreakwaterCriticalUpstreamBreakerOpen"][0]
    assert "breakwater_upstream_critical" in crit["expr"]


def test_the_critical_gauge_the_rules_join_on_is_exported(upstream, breakwater_factory):
    cfg = harness.base_config(upstream, upstreams={
        "api": {"critical": True},
        "images": {"servers": [upstream.address]}})
    bw = breakwater_factory(cfg)
    m = harness.scrape(bw)
    assert harness.metric_sum(m, "breakwater_upstream_critical", upstream="api") == 1
    assert harness.metric_sum(m, "breakwater_upstream_critical", upstream="images") == 0


# ---- Containerfile ----------------------------------------------------------------------------

def stages(text):
    """The Containerfile's stages, as lists of logical lines (continuations joined)."""
    logical, cur = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        logical.append(cur + line)
        cur = ""
    out = []
    for line in logical:
        if line.startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def apt_packages(stage):
    pkgs = set()
    for line in stage:
        m = re.search(r"apt-get install\s+(.*?)(&&|$)", line)
        if m:
            pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
    return pkgs


def needed_packages(binary):
    """Debian packages of the shared libraries the binary links directly."""
    dyn = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn.stdout)
    assert needed, dyn.stdout
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    where = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
    pkgs = {}
    for soname in needed:
        if SANITIZER_LIBS.match(soname):
            continue
        path = where.get(soname)
        assert path, "%s is not resolved by the loader:\n%s" % (soname, ldd)
        candidates = [path, os.path.realpath(path)]
        # Merged /usr: dpkg may record /lib/... for a file reached through /usr/lib/..., or back.
        candidates += [p.replace("/usr/lib/", "/lib/", 1) for p in candidates if p.startswith("/usr/lib/")]
        candidates += [p.replace("/lib/", "/usr/lib/", 1) for p in candidates if p.startswith("/lib/")]
        for c in candidates:
            r = subprocess.run(["dpkg", "-S", c], capture_output=True, text=True)
            if r.returncode == 0:
                pkgs[soname] = r.stdout.split(":")[0].strip()
                break
        else:
            pytest.fail("no Debian package owns %s (%s)" % (soname, path))
    return pkgs


def test_containerfile_runtime_packages_are_exactly_what_the_binary_links():
    binary = harness.binary_path()
    by_lib = needed_packages(binary)
    want = set(by_lib.values()) - BASE_IMAGE_PACKAGES
    build, runtime = stages(CONTAINERFILE.read_text())
    have = apt_packages(runtime)
    missing, extra = sorted(want - have), sorted(have - want)
    assert not missing and not extra, (
        "runtime stage of %s: add %s, remove %s (the binary links: %s)"
        % (CONTAINERFILE.name, missing, extra,
           ", ".join("%s from %s" % kv for kv in sorted(by_lib.items()))))


def test_containerfile_build_stage_needs_no_test_package():
    build, runtime = stages(CONTAINERFILE.read_text())
    pkgs = apt_packages(build)
    assert not {p for p in pkgs if "cmocka" in p or p.startswith("python3-pytest")}, pkgs
    setup = [l for l in build if "meson setup" in l]
    assert setup and "-Dtests=disabled" in setup[0]
    # The runtime stage carries the binary and nothing to build with.
    assert not {p for p in apt_packages(runtime) if p.endswith("-dev")}


# ---- Kubernetes and compose -------------------------------------------------------------------

def k8s_docs():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = {}
    for res in kust["resources"]:
        path = K8S / res
        assert path.is_file(), "%s listed in kustomization.yaml does not exist" % res
        for d in yaml.safe_load_all(path.read_text()):
            if d:
                docs[(d["kind"], d["metadata"]["name"])] = d
    return docs


def test_kubernetes_manifests_agree():
    docs = k8s_docs()
    dep = docs[("Deployment", "breakwater")]
    pod = dep["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    cm = docs[("ConfigMap", "breakwater")]
    conf = json.loads(cm["data"]["breakwater.json"])
    assert int(conf["admin"]["address"].rsplit(":", 1)[1]) == ports["admin"]
    # HPA scales this Deployment, on a resource the pod requests.
    hpa = docs[("HorizontalPodAutoscaler", "breakwater")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    for m in hpa["spec"]["metrics"]:
        assert m["resource"]["name"] in container["resources"]["requests"]
    # ServiceMonitor -> admin Service -> the pods' admin port.
    sm = docs[("ServiceMonitor", "breakwater")]
    svc = [d for (k, _), d in docs.items() if k == "Service"
           and all(d["metadata"]["labels"].get(lk) == lv
                   for lk, lv in sm["spec"]["selector"]["matchLabels"].items())]
    assert len(svc) == 1, "the ServiceMonitor must select exactly one Service"
    svc = svc[0]
    assert all(pod["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports
        assert svc_ports[ep["port"]]["targetPort"] in ports
        assert ep["path"] == "/metrics"
    # The traffic Service still does not expose the admin port.
    traffic = docs[("Service", "breakwater")]
    assert "admin" not in {p["targetPort"] for p in traffic["spec"]["ports"]}
    # Probes use the admin port and the documented paths.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}


def test_compose_stack_agrees_with_its_configuration():
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    conf = json.loads((COMPOSE / "breakwater.json").read_text())
    bw = compose["services"]["breakwater"]
    admin_port = conf["admin"]["address"].rsplit(":", 1)[1]
    assert any(p.endswith(":" + admin_port) for p in bw["ports"])
    prom = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    targets = [t for sc in prom["scrape_configs"] for s in sc["static_configs"] for t in s["targets"]]
    assert "breakwater:%s" % admin_port in targets
    # The rules Prometheus loads are the tested file, and nothing in them names "demo".
    vols = compose["services"]["prometheus"]["volumes"]
    assert any(v.startswith("../prometheus/breakwater-rules.yml:") for v in vols)
    assert "demo" not in RULES.read_text()
    assert any(u.get("critical") for u in conf["upstreams"].values())
    assert bw["build"]["dockerfile"] == "deploy/container/Containerfile"
