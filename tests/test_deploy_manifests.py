"""The deployment manifests (deploy/) parse and hang together.

No container engine or cluster is available here, so this checks what can be checked offline:
every YAML parses; names referenced exist (compose services, networks, volumes, mounted files;
Kubernetes Services, ConfigMaps, selectors, Kamailio's dispatcher targets); every XIAOZHI_*
variable given to the hub is a real setting (xiaozhi/settings.py) and every one given to Rasa or
the action server is read by bot/; secrets are never literal values; the Dockerfile builds both
virtual environments from the lock files. `kubectl kustomize` and `kamailio -c` run when installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from xiaozhi.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SETTINGS = {f"XIAOZHI_{name.upper()}" for name in Settings.model_fields}
# Variables the Rasa side reads (bot/endpoints.yml, bot/actions, deploy/rasa/endpoints.yml).
RASA_SIDE = {name for path in (REPO / "bot").rglob("*") if path.suffix in (".py", ".yml")
             for name in re.findall(r"XIAOZHI_[A-Z_]+", path.read_text(encoding="utf-8"))}
RASA_ENDPOINTS_VARS = set(re.findall(r"\$\{([A-Z_]+)\}", (DEPLOY / "rasa" / "endpoints.yml").read_text()))
# Created by the operator (documented in deploy/k8s/01-config.yaml), never committed.
EXTERNAL_SECRETS = {"xiaozhi-secrets", "es-ca", "es-node-certs", "xiaozhi-tls"}
SECRET_NAMES = re.compile(r"(PASSWORD|TOKEN|SECRET|API_KEY)$")


def all_yaml() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_every_manifest_parses():
    files = all_yaml()
    assert len(files) >= 12
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        assert docs, f"{path} is empty"


# -- docker compose -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def _runs_hub(service: dict) -> bool:
    return any(str(part).endswith("bin/xiaozhi") for part in service.get("command") or [])


def _hosts(value) -> list[str]:
    """Host names in URLs of a value, after removing ${...} interpolations (they may hold '/')."""
    value = re.sub(r"\$\{[^}]*\}", "X", str(value))
    return re.findall(r"(?:https?|postgresql\+asyncpg)://(?:[^@/]*@)?([a-z0-9-]+)[:/]", value)


def test_compose_has_the_production_shape(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "es01", "es02", "es03", "rasa", "actions", "hub", "kamailio", "coturn",
                 "media-1", "media-2", "nginx"):
        assert name in services, name
    assert services["hub"]["deploy"]["replicas"] >= 2
    assert services["rasa"]["deploy"]["replicas"] >= 2
    assert services["actions"]["deploy"]["replicas"] >= 2
    assert _env(services["media-1"])["XIAOZHI_SIP_ENABLED"] == "true"
    assert _env(services["hub"])["XIAOZHI_SIP_ENABLED"] == "false"
    assert _env(services["hub"])["XIAOZHI_DATABASE_URL"].startswith("postgresql+asyncpg://")
    endpoints = yaml.safe_load((DEPLOY / "rasa" / "endpoints.yml").read_text())
    assert endpoints["tracker_store"]["dialect"] == "postgresql" and endpoints["lock_store"]["type"] == "redis"
    assert endpoints["tracker_store"]["type"] == "xiaozhi_tracker_store.CachedSQLTrackerStore"  # on PYTHONPATH: bot/rasa_runtime
    assert "deploy/rasa/endpoints.yml" in services["rasa"]["command"]


def test_compose_references_resolve(compose):
    services = compose["services"]
    networks = set(compose.get("networks") or {})
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        deps = service.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown {dep}"
        for net in service.get("networks") or []:
            assert net in networks, f"{name}: unknown network {net}"
        for mount in service.get("volumes") or []:
            source = mount.split(":", 1)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            elif not source.startswith(("/", "$")):
                assert source in volumes, f"{name}: unknown volume {source}"
        build = service.get("build")
        if isinstance(build, dict):
            dockerfile = build.get("dockerfile", "Dockerfile")
            assert (DEPLOY / build["context"] / dockerfile).exists(), f"{name}: no {dockerfile}"
        # URLs and hosts in the environment name services of this file
        for key, value in _env(service).items():
            for host in _hosts(value):
                assert host in services, f"{name}.{key} points at unknown host {host}"
            if key.endswith("_HOST") and key.startswith("RASA_"):
                assert value in services, f"{name}.{key}={value}"


def test_compose_env_names_are_real_settings_and_secrets_come_from_the_environment(compose):
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if key.startswith("XIAOZHI_"):
                allowed = SETTINGS if _runs_hub(service) else SETTINGS | RASA_SIDE
                assert key in allowed, f"{name}: {key} is not a setting (xiaozhi/settings.py) nor read by bot/"
            if SECRET_NAMES.search(key):
                assert str(value).startswith("${") and ":?" in str(value), f"{name}.{key} must come from .env"
            if key.startswith("RASA_") and name == "rasa":
                assert key in RASA_ENDPOINTS_VARS, f"rasa: {key} unused by deploy/rasa/endpoints.yml"
    text = "\n".join(line for line in (DEPLOY / "docker-compose.yml").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = {line.split("=", 1)[0] for line in (DEPLOY / "env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    assert used <= example, f"document in deploy/env.example: {sorted(used - example)}"
    assert all(not line.split("=", 1)[1] for line in (DEPLOY / "env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")), "env.example must not carry values"


def test_compose_dispatcher_targets_are_media_workers(compose):
    targets = re.findall(r"sip:([a-z0-9-]+):(\d+)", (DEPLOY / "kamailio" / "dispatcher.list").read_text())
    assert len(targets) >= 2
    for host, port in targets:
        service = compose["services"][host]
        env = _env(service)
        assert env["XIAOZHI_SIP_ENABLED"] == "true" and env["XIAOZHI_SIP_PORT"] == port


# -- Kubernetes -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return docs


def _workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def _containers(workload):
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def test_k8s_objects_are_well_formed(k8s):
    for doc in k8s:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "xiaozhi", doc["metadata"]["name"]
    for w in _workloads(k8s):
        if w["kind"] != "Job":
            labels = w["spec"]["template"]["metadata"]["labels"]
            assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), w["metadata"]["name"]


def test_k8s_has_the_production_shape(k8s):
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in k8s}
    assert by_name[("Deployment", "hub")]["spec"]["replicas"] >= 2
    assert by_name[("Deployment", "rasa")]["spec"]["replicas"] >= 2
    assert by_name[("Deployment", "actions")]["spec"]["replicas"] >= 2
    assert by_name[("StatefulSet", "media")]["spec"]["replicas"] >= 2
    assert by_name[("StatefulSet", "elasticsearch")]["spec"]["replicas"] == 3
    assert ("StatefulSet", "postgres") in by_name and ("Deployment", "redis") in by_name
    assert ("Deployment", "kamailio") in by_name and ("DaemonSet", "coturn") in by_name
    endpoints = yaml.safe_load(by_name[("ConfigMap", "rasa-endpoints")]["data"]["endpoints.yml"])
    assert endpoints["tracker_store"]["dialect"] == "postgresql" and endpoints["lock_store"]["type"] == "redis"
    assert endpoints["tracker_store"]["type"] == "xiaozhi_tracker_store.CachedSQLTrackerStore"  # on PYTHONPATH: bot/rasa_runtime


def test_k8s_references_resolve(k8s):
    services = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "Service"}
    configmaps = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "ConfigMap"}
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    generated = {g["name"] for g in kustomization.get("configMapGenerator", [])}
    for g in kustomization.get("configMapGenerator", []):
        for f in g["files"]:
            assert (DEPLOY / f).exists(), f
    assert {f"k8s/{p.name}" for p in K8S.glob("*.yaml")} == set(kustomization["resources"])
    workloads = _workloads(k8s)
    # every Service selects some workload
    for name, svc in services.items():
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= w["spec"]["template"].get("metadata", {}).get("labels", {}).items()
                   for w in workloads), name
    for w in workloads:
        wname = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        for vol in pod.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps.keys() | generated, f"{wname}: {vol}"
            if "secret" in vol:
                assert vol["secret"]["secretName"] in EXTERNAL_SECRETS, f"{wname}: {vol}"
        for c in _containers(w):
            runs_hub = any(str(part).endswith("bin/xiaozhi") for part in c.get("command") or [])
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] in configmaps, f"{wname}: {ref}"
            for env in c.get("env", []):
                key = env["name"]
                secret = env.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    assert secret["name"] in EXTERNAL_SECRETS
                    assert secret["key"] in (K8S / "01-config.yaml").read_text(), f"undocumented secret key {secret['key']}"
                elif SECRET_NAMES.search(key):
                    raise AssertionError(f"{wname}.{key}: a secret must come from a Secret, not a literal")
                if key.startswith("XIAOZHI_"):
                    allowed = SETTINGS if runs_hub else SETTINGS | RASA_SIDE
                    assert key in allowed, f"{wname}: {key} is not a setting"
                for host in re.findall(r"https?://([a-z0-9-]+)[:/]", str(env.get("value", ""))):
                    assert host in services, f"{wname}.{key} points at unknown Service {host}"
                for host in re.findall(r"@([a-z0-9-]+)[.:]", str(env.get("value", ""))):
                    assert host in services, f"{wname}.{key} points at unknown Service {host}"
                if key.endswith("_HOST") and "value" in env and key.startswith("RASA_"):
                    assert env["value"] in services
    config = configmaps["xiaozhi-config"]["data"]
    for key, value in config.items():
        if key.startswith("XIAOZHI_"):
            assert key in SETTINGS, f"xiaozhi-config: {key} is not a setting"
        assert not SECRET_NAMES.search(key), f"xiaozhi-config holds a secret: {key}"
        for host in re.findall(r"https?://([a-z0-9-]+)[:/]", str(value)):
            assert host in services, f"xiaozhi-config.{key} points at unknown Service {host}"


def test_k8s_dispatcher_targets_are_the_media_statefulset(k8s):
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in k8s}
    media = by_name[("StatefulSet", "media")]
    headless = media["spec"]["serviceName"]
    assert by_name[("Service", headless)]["spec"]["clusterIP"] == "None"
    sip_port = next(e["value"] for c in media["spec"]["template"]["spec"]["containers"] for e in c["env"]
                    if e["name"] == "XIAOZHI_SIP_PORT")
    targets = re.findall(r"sip:([a-z0-9-]+)-(\d+)\.([a-z0-9-]+)\.xiaozhi\.svc\.cluster\.local:(\d+)",
                         by_name[("ConfigMap", "kamailio")]["data"]["dispatcher.list"])
    assert [int(t[1]) for t in targets] == list(range(media["spec"]["replicas"]))
    assert all(t[0] == "media" and t[2] == headless and t[3] == sip_port for t in targets)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
def test_kustomize_builds_the_whole_deployment():
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kamailio = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kamailio")
    generated = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("kamailio-cfg-"))
    names = [v["configMap"]["name"] for v in kamailio["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert generated["metadata"]["name"] in names  # the hashed name was substituted


# -- Kamailio, coturn, Dockerfile -----------------------------------------------------------------
def test_kamailio_config_dispatches_with_failover():
    cfg = (DEPLOY / "kamailio" / "kamailio.cfg").read_text()
    assert 'loadmodule "dispatcher.so"' in cfg
    assert 'modparam("dispatcher", "list_file", "/etc/kamailio/dispatcher.list")' in cfg
    assert "ds_select_dst" in cfg and "ds_next_dst" in cfg and "record_route()" in cfg
    assert cfg.count("{") == cfg.count("}")
    routes = set(re.findall(r"route\((\w+)\)", cfg))
    defined = set(re.findall(r"^(?:route|failure_route)\[(\w+)\]", cfg, re.M))
    assert routes <= defined, routes - defined


@pytest.mark.skipif(not shutil.which("kamailio"), reason="kamailio not installed")
def test_kamailio_accepts_its_configuration(tmp_path):
    cfg = (DEPLOY / "kamailio" / "kamailio.cfg").read_text().replace("/etc/kamailio/dispatcher.list",
                                                                      str(DEPLOY / "kamailio" / "dispatcher.list"))
    (tmp_path / "k.cfg").write_text(cfg)
    out = subprocess.run(["kamailio", "-c", "-f", str(tmp_path / "k.cfg")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def test_coturn_config_uses_time_limited_credentials_and_no_literal_secret():
    conf = (DEPLOY / "coturn" / "turnserver.conf").read_text()
    assert "use-auth-secret" in conf and "static-auth-secret=" not in conf
    assert "denied-peer-ip=10.0.0.0-10.255.255.255" in conf


def test_dockerfile_builds_both_virtual_environments_from_the_locks():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "python3.11 -m venv .venv" in text and "python3.10 -m venv .venv-rasa" in text
    for lock in re.findall(r"requirements/[\w.-]+\.txt", text):
        assert (REPO / lock).exists(), lock
    assert "requirements/app.lock.txt" in text and "requirements/rasa.lock.txt" in text


# -- issue 19: Rasa and the action servers answer only their callers; no token on a command line -------
def _policy_sources(policy: dict) -> set[str]:
    return {peer["podSelector"]["matchLabels"]["app"] for rule in policy["spec"]["ingress"] for peer in rule["from"]}


def test_k8s_network_policies_restrict_rasa_to_the_hub_and_the_actions_to_rasa(k8s):
    policies = [d for d in k8s if d["kind"] == "NetworkPolicy"]
    guarded = {p["spec"]["podSelector"]["matchLabels"]["app"]: p for p in policies}
    assert set(guarded) >= {"rasa", "actions"}
    # the hub and the media workers (the hotline runs there) call Rasa; only Rasa calls the action servers
    assert _policy_sources(guarded["rasa"]) == {"hub", "media"}
    assert _policy_sources(guarded["actions"]) == {"rasa"}
    for app, policy in guarded.items():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert all(rule.get("from") for rule in policy["spec"]["ingress"]), f"{app}: a rule without 'from' admits all"
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in k8s}
    labels = {w["metadata"]["name"]: w["spec"]["template"].get("metadata", {}).get("labels", {}).get("app")
              for w in _workloads(k8s)}
    assert {"hub", "media", "rasa", "actions"} <= set(labels.values())  # the selectors name real pods
    ports = {p["spec"]["podSelector"]["matchLabels"]["app"]: p["spec"]["ingress"][0]["ports"][0]["port"] for p in policies}
    assert ports["rasa"] == by_name[("Service", "rasa")]["spec"]["ports"][0]["targetPort"]
    assert ports["actions"] == by_name[("Service", "actions")]["spec"]["ports"][0]["targetPort"]


def test_the_rasa_token_is_never_on_a_command_line(k8s, compose):
    """A command line is readable by every user of the host (ps): Rasa gets its token in the environment."""
    commands = [(w["metadata"]["name"], c) for w in _workloads(k8s) for c in _containers(w)]
    commands += [(name, s) for name, s in compose["services"].items()]
    for name, container in commands:
        parts = [container.get("command") or [], container.get("args") or []]
        command = " ".join(" ".join(map(str, p)) if isinstance(p, list) else str(p) for p in parts)
        assert "--auth-token" not in command and "RASA_TOKEN" not in command, name
    rasa = next(c for w in _workloads(k8s) if w["metadata"]["name"] == "rasa" for c in _containers(w))
    assert any(e["name"] == "XIAOZHI_RASA_TOKEN" and "secretKeyRef" in e.get("valueFrom", {}) for e in rasa["env"])
    assert _env(compose["services"]["rasa"])["XIAOZHI_RASA_TOKEN"].startswith("${XIAOZHI_RASA_TOKEN:?")
    supervisor = (REPO / "xiaozhi" / "supervisor.py").read_text()
    assert '"--auth-token"' not in supervisor
