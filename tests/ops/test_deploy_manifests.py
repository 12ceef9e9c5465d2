"""The deployment manifests (deploy/) parse and hang together.

No container engine or cluster is available here, so this checks what can be checked offline:
every YAML parses; names referenced exist (compose services, networks, volumes, mounted files;
Kubernetes Services, ConfigMaps, selectors, Kamailio's dispatcher targets); every XIAOZHI_*
variable given to the hub is a real setting (xiaozhi/settings.py) and every one given to Rasa or
the action server is read by bot/; secrets are never literal values; the Dockerfile builds both
virtual environments from the lock files. `kubectl kustomize` and `kamailio -c` run when installed.
Every Kubernetes object is checked against the API schemas (kubernetes-validate bundles them, no cluster
needed), and our workloads for probes, security contexts, limits and disruption budgets (issue 17).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from xiaozhi.settings import Settings

REPO = Path(__file__).resolve().parent.parent.parent
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


def _kustomize() -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
def test_kustomize_builds_the_whole_deployment():
    docs = _kustomize()
    kamailio = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kamailio")
    generated = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("kamailio-cfg-"))
    names = [v["configMap"]["name"] for v in kamailio["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert generated["metadata"]["name"] in names  # the hashed name was substituted


# -- issue 17: schemas, probes, security contexts, disruption budgets, the migration Job ----------------
# The Kubernetes version whose OpenAPI schemas the manifests must satisfy (kubernetes-validate bundles them).
K8S_VERSION = "1.30.0"
# Our image's workloads: they get the full treatment (three HTTP probes, user 10001, read-only root).
OURS = {("Deployment", "hub"), ("StatefulSet", "media"), ("Deployment", "rasa"), ("Deployment", "actions")}


def _validate_schemas(docs: list[dict]) -> None:
    import kubernetes_validate

    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_k8s_manifests_satisfy_the_kubernetes_schemas(k8s):
    """Every object, as written, against the API schemas (strict: an unknown or misspelt field fails)."""
    _validate_schemas(k8s)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
def test_rendered_deployment_satisfies_the_kubernetes_schemas():
    """What `kubectl apply -k deploy/` would send: generated ConfigMaps and substituted names included."""
    _validate_schemas(_kustomize())


def test_the_schema_check_catches_a_misspelt_field(k8s):
    hub = next(d for d in k8s if d["kind"] == "Deployment" and d["metadata"]["name"] == "hub")
    broken = yaml.safe_load(yaml.safe_dump(hub))
    broken["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["periodSecond"] = 5
    with pytest.raises(AssertionError, match="periodSecond"):
        _validate_schemas([broken])


def test_our_workloads_have_probes_security_contexts_and_limits(k8s):
    workloads = {(w["kind"], w["metadata"]["name"]): w for w in _workloads(k8s)}
    assert OURS <= set(workloads)
    for key in OURS:
        pod = workloads[key]["spec"]["template"]["spec"]
        main = pod["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "httpGet" in main.get(probe, {}), f"{key}: no HTTP {probe}"
            assert main[probe]["httpGet"]["port"] in {p["containerPort"] for p in main["ports"]}, f"{key}: {probe} port"
        startup = main["startupProbe"]
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        assert budget >= (300 if key[1] == "rasa" else 60), f"{key}: startup probe allows only {budget} s"
        assert main["resources"]["requests"]["cpu"] and main["resources"]["limits"]["memory"], key
        # the hub and the media workers serve /healthz (alive) and /readyz (knowledge base loaded)
        if key[1] in ("hub", "media"):
            assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
        writes = {m["mountPath"] for m in main.get("volumeMounts", [])}
        assert "/tmp" in writes, f"{key}: nowhere to write temporary files"
        if key[1] in ("hub", "media"):
            assert {"/var/lib/xiaozhi", "/var/cache/xiaozhi"} <= writes, f"{key}: var or cache dir not writable"
    for (kind, name), w in workloads.items():
        pod = w["spec"]["template"]["spec"]
        ctx = pod.get("securityContext", {})
        assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) > 0, f"{kind}/{name}: may run as root"
        assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{kind}/{name}: no seccomp profile"
        if (kind, name) in OURS or w["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
                "registry.example.gov.cn/xiaozhi:"):
            assert ctx["runAsUser"] == 10001, f"{kind}/{name}: not the image's user"
        for c in _containers(w):
            sec = c.get("securityContext", {})
            assert sec.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}: privilege escalation"
            assert sec.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']}: capabilities kept"
            # Elasticsearch writes its keystore and config at start: the one writable root (12-elasticsearch.yaml)
            if name != "elasticsearch":
                assert sec.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}: writable root filesystem"
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])} | claims, f"{name}/{c['name']}: unknown volume"


def test_replicated_workloads_have_a_disruption_budget(k8s):
    budgets = [d for d in k8s if d["kind"] == "PodDisruptionBudget"]
    for w in _workloads(k8s):
        if w["kind"] in ("Deployment", "StatefulSet") and w["spec"].get("replicas", 1) > 1:
            labels = w["spec"]["template"]["metadata"]["labels"]
            matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            assert matching, f"{w['kind']}/{w['metadata']['name']} ({w['spec']['replicas']} replicas) has no PDB"
            budget = matching[0]["spec"]
            assert budget.get("maxUnavailable", 0) in (1, "1") or 0 < budget.get("minAvailable", 0) < w["spec"]["replicas"]


def test_the_migration_job_upgrades_and_the_hub_leaves_it_to_the_job(k8s):
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in k8s}
    job = by_name[("Job", "db-migrate")]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == [".venv/bin/xiaozhi", "db", "upgrade"]
    hub_db_url = next(e["value"] for e in by_name[("Deployment", "hub")]["spec"]["template"]["spec"]["containers"][0]["env"]
                      if e["name"] == "XIAOZHI_DATABASE_URL")
    assert next(e["value"] for e in job["env"] if e["name"] == "XIAOZHI_DATABASE_URL") == hub_db_url
    assert "XIAOZHI_DB_MIGRATE_ON_START" in SETTINGS
    for key in (("Deployment", "hub"), ("StatefulSet", "media")):
        pod = by_name[key]["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["XIAOZHI_DB_MIGRATE_ON_START"] == "false", key
        waits = [c for c in pod.get("initContainers", []) if "xiaozhi db current" in " ".join(c["command"])]
        assert waits, f"{key}: starts before the Job has migrated"


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


@pytest.mark.skipif(not (shutil.which("kamailio") and shutil.which("kamcmd") and shutil.which("setpriv")),
                    reason="kamailio/kamcmd not installed")
def test_kamailio_starts_as_a_plain_user_and_answers_the_probes_control_socket():
    """`kamailio -c` checks syntax only: this starts it, as user 10001 as in the pod, and asks what the probe asks."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kamailio-") as scratch:  # pytest's tmp_path is closed to user 10001
        _start_kamailio_and_probe(Path(scratch))


def _start_kamailio_and_probe(tmp_path: Path) -> None:
    import os
    import socket
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctl = f"unixs:{tmp_path}/kamailio_ctl"
    cfg = (DEPLOY / "kamailio" / "kamailio.cfg").read_text()
    assert 'modparam("ctl", "binrpc", "unixs:/tmp/kamailio_ctl")' in cfg
    # A copy beside the config: user 10001 may not be able to read the checkout (a clone in a 0700 directory).
    (tmp_path / "dispatcher.list").write_text((DEPLOY / "kamailio" / "dispatcher.list").read_text())
    cfg = (cfg.replace("/etc/kamailio/dispatcher.list", str(tmp_path / "dispatcher.list"))
              .replace("listen=udp:0.0.0.0:5060", f"listen=udp:127.0.0.1:{port}")
              .replace("unixs:/tmp/kamailio_ctl", ctl))
    (tmp_path / "k.cfg").write_text(cfg)
    os.chmod(tmp_path, 0o777)
    as_user = ["setpriv", "--reuid", "10001", "--regid", "10001", "--clear-groups"] if os.geteuid() == 0 else []
    probe = next(d for d in yaml.safe_load_all((K8S / "41-kamailio.yaml").read_text()) if d["kind"] == "Deployment")
    command = probe["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["command"]
    command = [ctl if part.startswith("unixs:") else part for part in command]
    proc = subprocess.Popen([*as_user, "kamailio", "-DD", "-E", "-f", str(tmp_path / "k.cfg")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            out = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 or proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert proc.poll() is None, f"kamailio exited: {proc.stdout.read()[-2000:]}"
        assert out.returncode == 0 and "uptime" in out.stdout, out.stdout + out.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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


def test_the_image_carries_the_rasa_model_the_rasa_deployment_loads(k8s):
    # The Rasa pods run `rasa run --model <cache>/rasa-models`: nothing trains at run time, so the image
    # must (xiaozhi prepare trains it into the cache dir the image sets; `kb index` alone did not).
    text = (DEPLOY / "Dockerfile").read_text()
    cache = re.search(r"XIAOZHI_CACHE_DIR=(\S+)", text).group(1)
    assert re.search(r"^RUN \.venv/bin/xiaozhi prepare$", text, re.M)
    rasa = next(d for d in k8s if d["kind"] == "Deployment" and d["metadata"]["name"] == "rasa")
    command = rasa["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--model") + 1] == f"{cache}/rasa-models"


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
