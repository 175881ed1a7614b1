"""deploy/: manifests parse and agree with the stage's config, metrics and each other."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from riskpipe.app.config import StageConfig
from riskpipe.metrics import metric_names
from riskpipe.policy.loader import parse_policy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The keys the stage reads (riskpipe/app/config.py); manifests may use no others.
CONFIG_KEYS = {"bootstrap_servers", "security_protocol", "sasl_mechanism", "sasl_plain_username",
               "sasl_plain_password", "ssl_cafile", "topics", "group_id", "models", "policy",
               "metrics_port", "ledger", "batch"}
# Deployed stages must listen beyond loopback to be scraped.
DEPLOYED_KEYS = CONFIG_KEYS | {"metrics_addr"}
METRIC = re.compile(r"\briskpipe_[a-z0-9_]+")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s() -> dict[str, dict]:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in _docs(p)]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs if "metadata" in d}


def _stage_config(text: str) -> StageConfig:
    """Validate a config the way the stage does, with ${VAR} filled in."""
    data = yaml.safe_load(re.sub(r"\$\{([A-Z0-9_]+)\}", r"value-of-\1", text))
    known = set(StageConfig.model_fields)
    if "metrics_addr" not in known:  # test_deployed_stages_listen_beyond_loopback reports it
        data.pop("metrics_addr", None)
    assert set(data) <= known, f"keys the stage does not read: {set(data) - known}"
    return StageConfig(**data)


def test_sample_config_has_exactly_the_documented_keys() -> None:
    data = yaml.safe_load((DEPLOY / "riskpipe.yaml").read_text())
    assert set(data) == CONFIG_KEYS
    assert set(data["topics"]) == {"input", "decisions", "review", "audit", "dlq"}
    assert set(data["batch"]) == {"max_events", "max_wait_ms"}
    config = _stage_config((DEPLOY / "riskpipe.yaml").read_text())
    assert config.metrics_port == 9400
    assert (DEPLOY / config.policy).exists()  # relative to the config file


def test_every_manifest_parses_and_kustomization_lists_them() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        assert (K8S / name).exists(), name
    kinds = {k.split("/")[0] for k in _k8s()}
    assert {"Deployment", "ConfigMap", "Secret", "Service", "ServiceMonitor", "ScaledObject",
            "TriggerAuthentication"} <= kinds


def test_deployed_stages_listen_beyond_loopback() -> None:
    assert "metrics_addr" in StageConfig.model_fields, (
        "StageConfig needs metrics_addr: in a pod the metrics server must bind 0.0.0.0")
    assert StageConfig(metrics_addr="0.0.0.0").metrics_addr == "0.0.0.0"


def test_configmap_config_is_valid_and_uses_known_keys() -> None:
    text = _k8s()["ConfigMap/riskpipe-config"]["data"]["riskpipe.yaml"]
    assert set(yaml.safe_load(text)) <= DEPLOYED_KEYS
    config = _stage_config(text)
    assert config.sasl_plain_password == "value-of-KAFKA_SASL_PASSWORD"


def test_configmap_policy_is_the_shipped_default_and_valid() -> None:
    policy = _k8s()["ConfigMap/riskpipe-policy"]["data"]["default.yaml"]
    assert policy == (ROOT / "policies" / "default.yaml").read_text()
    assert parse_policy(policy, "riskpipe-policy/default.yaml").name == "default"


def test_deployment_is_hardened_and_wired() -> None:
    m = _k8s()
    deployment = m["Deployment/riskpipe"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = _stage_config(m["ConfigMap/riskpipe-config"]["data"]["riskpipe.yaml"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == config.metrics_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/metrics"
    # every mount has a volume; every writable path is an emptyDir
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {vm["mountPath"]: vm for vm in container["volumeMounts"]}
    assert {vm["name"] for vm in mounts.values()} <= set(volumes)
    for vm in mounts.values():
        assert vm.get("readOnly") or "emptyDir" in volumes[vm["name"]], vm
    # the ledger is the shared PostgreSQL database, its DSN from a Secret (not a per-pod file)
    assert config.ledger == "value-of-RISKPIPE_LEDGER_DSN"
    dsn = {e["name"]: e for e in container["env"]}["RISKPIPE_LEDGER_DSN"]["valueFrom"]["secretKeyRef"]
    assert dsn == {"name": "riskpipe-ledger", "key": "dsn"}
    assert m["Secret/riskpipe-ledger"]["stringData"]["dsn"].startswith("postgresql://")
    # the config file and the policy it names are mounted from the ConfigMaps
    assert "/etc/riskpipe/riskpipe.yaml" in container["args"]
    assert mounts["/etc/riskpipe/riskpipe.yaml"]["name"] == "config"
    assert volumes["config"]["configMap"]["name"] == "riskpipe-config"
    assert volumes["policy"]["configMap"]["name"] == "riskpipe-policy"
    assert config.policy == mounts["/etc/riskpipe/policy"]["mountPath"] + "/default.yaml"
    assert config.ssl_cafile.startswith(mounts["/etc/riskpipe/kafka-ca"]["mountPath"])


def test_credentials_come_from_the_secret() -> None:
    m = _k8s()
    text = m["ConfigMap/riskpipe-config"]["data"]["riskpipe.yaml"]
    (container,) = m["Deployment/riskpipe"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    for var in re.findall(r"\$\{([A-Z0-9_]+)\}", text):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in m[f"Secret/{ref['name']}"]["stringData"], var
    for ref in m["TriggerAuthentication/riskpipe-kafka"]["spec"]["secretTargetRef"]:
        assert ref["name"] == "riskpipe-kafka" and ref["key"] in m["Secret/riskpipe-kafka"]["stringData"]


def test_every_replica_keys_its_noise_with_one_secret() -> None:
    """The stage's smoothing noise key (riskpipe.app.noise_key) comes from a Secret, the
    same for every replica of the Deployment, and is long enough for the stage to start."""
    from riskpipe.app.config import ConfigError, StageConfig
    from riskpipe.app.noise_key import NOISE_KEY_ENV, resolve_noise_key

    m = _k8s()
    (container,) = m["Deployment/riskpipe"]["spec"]["template"]["spec"]["containers"]
    ref = {e["name"]: e for e in container["env"]}[NOISE_KEY_ENV]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "riskpipe-noise", "key": "key"}
    example = m["Secret/riskpipe-noise"]["stringData"]["key"]
    with pytest.raises(ConfigError, match="placeholder"):  # the example applied as it is: the stage does not start
        resolve_noise_key(StageConfig(), {NOISE_KEY_ENV: example})
    made = "9d2f4b6a8c0e1f3a5b7d9e2c4a6f8b0d1e3f5a7c9b2d4f6a8e0c2b4d6f8a1c3e"  # openssl rand -hex 32
    assert resolve_noise_key(StageConfig(), {NOISE_KEY_ENV: made}).source == NOISE_KEY_ENV


def _pod_specs(m: dict) -> dict[str, dict]:
    out = {}
    for key, doc in m.items():
        if key.startswith("Deployment/"):
            out[key] = doc["spec"]["template"]["spec"]
        elif key.startswith("CronJob/"):
            out[key] = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return out


def test_signing_key_is_mounted_only_where_checkpoints_are_made() -> None:
    m = _k8s()
    pods = _pod_specs(m)
    holders = [k for k, pod in pods.items()
               if any(v.get("secret", {}).get("secretName") == "riskpipe-ledger-signing" for v in pod["volumes"])]
    assert holders == ["CronJob/riskpipe-checkpoint"]
    pod = pods["CronJob/riskpipe-checkpoint"]
    (container,) = pod["containers"]
    mounts = {vm["name"]: vm for vm in container["volumeMounts"]}
    key_path = container["args"][container["args"].index("--key") + 1]
    assert key_path.startswith(mounts["signing"]["mountPath"] + "/") and mounts["signing"]["readOnly"]
    assert container["args"][:3] == ["ledger", "checkpoint", "$(RISKPIPE_LEDGER_DSN)"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    stage_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pods["Deployment/riskpipe"]["containers"][0]["env"]
                 if "valueFrom" in e}
    # same ledger DSN and Kafka credentials as the stage, nothing else (no noise key: it decides nothing)
    assert env == {k: v for k, v in stage_env.items() if k != "RISKPIPE_NOISE_KEY"}
    config_path = container["args"][container["args"].index("--config") + 1]
    assert mounts["config"]["mountPath"] == config_path
    topic = container["args"][container["args"].index("--topic") + 1]
    assert topic == "checkpoints"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "checkpoint-cronjob.yaml" in kustomization["resources"]
    assert "secret.example.yaml" not in kustomization["resources"]


def test_service_servicemonitor_and_scaler_agree() -> None:
    m = _k8s()
    pod_labels = m["Deployment/riskpipe"]["spec"]["template"]["metadata"]["labels"]
    service = m["Service/riskpipe"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    monitor = m["ServiceMonitor/riskpipe"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    config = _stage_config(m["ConfigMap/riskpipe-config"]["data"]["riskpipe.yaml"])
    scaled = m["ScaledObject/riskpipe"]["spec"]
    trigger = scaled["triggers"][0]
    assert scaled["scaleTargetRef"]["name"] == "riskpipe"
    assert trigger["metadata"]["topic"] == config.topics.input
    assert trigger["metadata"]["consumerGroup"] == config.group_id
    assert trigger["metadata"]["bootstrapServers"] == config.bootstrap_servers
    assert trigger["authenticationRef"]["name"] in {k.split("/")[1] for k in m
                                                   if k.startswith("TriggerAuthentication/")}
    assert scaled["minReplicaCount"] >= 1
    assert "partition" in (K8S / "keda-scaledobject.yaml").read_text()


def test_compose_is_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    config_text = compose["configs"]["riskpipe_config"]["content"].replace("$$", "$")  # compose's escape
    assert set(yaml.safe_load(config_text)) <= DEPLOYED_KEYS
    config = _stage_config(config_text)
    # one PostgreSQL ledger for every replica; the signing key only in the checkpoint service
    assert config.ledger == "value-of-RISKPIPE_LEDGER_DSN"
    assert services["postgres"]["image"].startswith("postgres:")
    for name in ("riskpipe", "checkpoint"):
        dsn = services[name]["environment"]["RISKPIPE_LEDGER_DSN"]
        assert dsn.startswith("postgresql://riskpipe:") and dsn.endswith("@postgres:5432/riskpipe"), dsn
    assert [n for n, s in services.items() if "ledger_signing_key" in s.get("secrets", [])] == ["checkpoint"]
    assert "checkpoints" in services["topics"]["command"][0]
    assert "postgres" in services["riskpipe"]["depends_on"]
    listener = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert config.bootstrap_servers in listener
    assert (ROOT / "policies" / Path(config.policy).name).exists()
    for volume in services["prometheus"]["volumes"]:
        assert (DEPLOY / volume.split(":")[0]).exists(), volume
    assert (ROOT / services["riskpipe"]["build"]["dockerfile"]).exists()
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["job_name"] == "riskpipe"
    assert job["static_configs"][0]["targets"] == [f"riskpipe:{config.metrics_port}"]
    assert prom["rule_files"] == ["riskpipe-rules.yml"]
    # the review console runs and is scraped: the RiskpipeReview* alerts read its gauges (the
    # stage's own copies of them are 0 for ever, so without this job the alerts never fired)
    review = services["review"]
    assert review["command"][:3] == ["review", "--config", "/etc/riskpipe/riskpipe.yaml"]
    port = review["command"][review["command"].index("--port") + 1]
    assert review["secrets"] == ["review_password"] and "review_password" in compose["secrets"]
    assert review["environment"]["RISKPIPE_LEDGER_DSN"] == services["riskpipe"]["environment"]["RISKPIPE_LEDGER_DSN"]
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["riskpipe-review"]["static_configs"][0]["targets"] == [f"review:{port}"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing")
def test_prometheus_example_config_checks() -> None:
    result = subprocess.run(["promtool", "check", "config",
                             str(DEPLOY / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "riskpipe-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    return exprs


def test_dashboard_queries_name_existing_metrics() -> None:
    exported = metric_names()
    exprs = _dashboard_exprs()
    assert len(exprs) >= 20
    for expr in exprs:
        used = set(METRIC.findall(expr))
        assert used, expr
        assert used <= exported, (expr, used - exported)


def test_dashboard_covers_the_issue_topics(tmp_path: Path) -> None:
    used = {m for e in _dashboard_exprs() for m in METRIC.findall(e)}
    for name in ("riskpipe_events_total", "riskpipe_decisions_total", "riskpipe_certificates_total",
                 "riskpipe_certified_radius_bucket", "riskpipe_certification_duration_seconds_bucket",
                 "riskpipe_end_to_end_latency_seconds_bucket", "riskpipe_review_backlog",
                 "riskpipe_dlq_messages_total", "riskpipe_consumer_lag_messages"):
        assert name in used, name
    # every panel query is valid PromQL once Grafana's variables are substituted
    if shutil.which("promtool"):
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:q{i}", "expr": e.replace("$__rate_interval", "1m")
             .replace('"$job"', '"riskpipe"')} for i, e in enumerate(_dashboard_exprs())
            if not e.startswith("label_values(")]}]}  # a Grafana function, not PromQL
        (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
        result = subprocess.run(["promtool", "check", "rules", str(tmp_path / "dashboard.yml")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_review_console_runs_in_k8s_is_scraped_and_starts_from_its_secrets(tmp_path, monkeypatch) -> None:
    """deploy/k8s/review.yaml: the console the RiskpipeReview* alerts read. Its Service and
    ServiceMonitor select it (and the stage's do not); every ${VAR} of the shared config and
    every secret it reads is filled from a Secret that has the key; and the console's own
    settings resolve from the mounted config and those secrets as `riskpipe review` does."""
    from riskpipe.cli.review_cmd import review
    from riskpipe.review.settings import PASSWORD_ENV, SECRET_KEY_ENV, SettingsError, resolve_settings

    m = _k8s()
    dep = m["Deployment/riskpipe-review"]
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]
    service, monitor = m["Service/riskpipe-review"], m["ServiceMonitor/riskpipe-review"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    stage_selector = m["ServiceMonitor/riskpipe"]["spec"]["selector"]["matchLabels"]
    assert not stage_selector.items() <= service["metadata"]["labels"].items()  # job riskpipe is the stage's alone
    jobs = {j["job_name"] for j in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
            ["scrape_configs"]}
    assert service["metadata"]["name"] in jobs  # the job label the operator derives, as compose's Prometheus has it
    assert dep["spec"]["replicas"] == 1  # sessions and the lockout live in the process
    args = container["args"]
    assert args[0] == "review"
    options = {o for p in review.params for o in p.opts}
    assert {a for a in args[1:] if a.startswith("--")} <= options
    # every secret the console reads comes from a Secret key that the example has
    env: dict[str, str] = {}
    for e in container["env"]:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = m[f"Secret/{ref['name']}"]["stringData"][ref["key"]]
    text = m["ConfigMap/riskpipe-config"]["data"]["riskpipe.yaml"]
    assert set(re.findall(r"\$\{([A-Z0-9_]+)\}", text)) <= set(env)
    assert {PASSWORD_ENV, SECRET_KEY_ENV} <= set(env)
    with pytest.raises(SettingsError, match="placeholder"):  # the example's session key: refused as it is
        resolve_settings(ledger=str(tmp_path / "l.db"), environ={**env, PASSWORD_ENV: "a long passphrase"})
    env[SECRET_KEY_ENV] = "3c5e7a9b1d2f4a6c8e0b2d4f6a8c1e3b5d7f9a2c4e6b8d0f1a3c5e7b9d2f4a6c"  # as the operator makes it
    # the mounted files where the config names them: the config itself and the policy directory
    mounts = {vm["mountPath"]: vm for vm in container["volumeMounts"]}
    config_path = args[args.index("--config") + 1]
    assert config_path in mounts
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    for name, body in m["ConfigMap/riskpipe-policy"]["data"].items():
        (policy_dir / name).write_text(body)
    assert "/etc/riskpipe/policy" in mounts
    config = tmp_path / "riskpipe.yaml"
    config.write_text(text.replace("/etc/riskpipe/policy", str(policy_dir)))
    env["RISKPIPE_LEDGER_DSN"] = str(tmp_path / "ledger.sqlite3")  # the DSN's form is the stage's business
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = resolve_settings(config_path=str(config), host=args[args.index("--host") + 1],
                                port=int(args[args.index("--port") + 1]), environ=env)
    assert settings.credentials.shared == env[PASSWORD_ENV] and settings.secret_key == env[SECRET_KEY_ENV].encode()
    assert settings.scope is not None and set(settings.scope.policies) == {"digits"}
    assert settings.host == "0.0.0.0" and settings.port == 8080
    assert settings.kafka is not None and settings.kafka.ssl_cafile == "/etc/riskpipe/kafka-ca/ca.crt"
    assert "/etc/riskpipe/kafka-ca" in mounts
