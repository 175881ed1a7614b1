"""Stage configuration: a YAML file (``riskpipe run --config``) plus command-line overrides.

Keys (deploy/riskpipe.yaml is a complete example):
the Kafka connection keys of :class:`riskpipe.kafka_clients.KafkaSettings`
(bootstrap_servers, security_protocol, sasl_mechanism, sasl_plain_username,
sasl_plain_password, ssl_cafile, ssl_certfile, ssl_keyfile, ssl_password), topics {input, decisions, review, audit, dlq},
group_id, models {name: spec}, policy, metrics_port, ledger, batch {max_events,
max_wait_ms}, plus the optional tuning keys below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import os

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from riskpipe.kafka_clients import KafkaSettings


def default_policy_path() -> str:
    here = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
    if here.exists():
        return str(here)
    return str(Path(__file__).resolve().parents[1] / "policies" / "default.yaml")


class Topics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = "inferences"
    decisions: str = "decisions"
    review: str = "review"
    audit: str = "audit"
    dlq: str = "dlq"


class Batch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_events: int = Field(256, ge=1, le=100_000)
    max_wait_ms: int = Field(50, ge=0, le=60_000)


class Guard(BaseModel):
    """Stop the stage when a misconfiguration would send all traffic to the DLQ
    (per partition, like Sentry Arroyo's DLQ limit)."""

    model_config = ConfigDict(extra="forbid")
    max_invalid_ratio: float = Field(0.9, gt=0, le=1)
    max_consecutive_invalid: int = Field(1000, ge=1)
    window: int = Field(1000, ge=10)


class StageConfig(KafkaSettings):
    """The whole ``riskpipe.yaml``: Kafka connection keys (inherited) plus the stage's own."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    topics: Topics = Topics()
    group_id: str = "riskpipe"
    models: dict[str, str] = {"digits": "demo:digits"}
    policy: str = Field(default_factory=default_policy_path)
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"  # 0.0.0.0 inside a pod, so Prometheus and probes reach it
    ledger: str | None = None
    batch: Batch = Batch()
    guard: Guard = Guard()
    device: str = "cpu"
    max_message_bytes: int = Field(1 << 20, ge=1024)  # a JSON event
    max_binary_message_bytes: int = Field(16 << 20, ge=1024)  # an event in the binary tensor form
    review_include_input: bool = True
    create_topics: bool = False
    session_timeout_ms: int = Field(10_000, ge=1000)
    heartbeat_interval_ms: int = Field(3_000, ge=100)
    worker_id: str | None = None
    review: dict[str, Any] | None = None  # read by `riskpipe review` (credentials), ignored by the stage

    @field_validator("models")
    @classmethod
    def _models(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one model must be registered")
        return v

    @property
    def largest_message_bytes(self) -> int:
        """The largest input the stage accepts (fetch and request sizes follow it)."""
        return max(self.max_message_bytes, self.max_binary_message_bytes)

    def kafka(self) -> KafkaSettings:
        """The settings every Kafka client of this process is built from (riskpipe.kafka_clients)."""
        return KafkaSettings(**{k: getattr(self, k) for k in KafkaSettings.model_fields})


class ConfigError(ValueError):
    pass


def _expand(value: Any) -> Any:
    """``${VAR}`` in string values from the environment (Kubernetes injects secrets that way)."""
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def read_config_file(path: str) -> dict[str, Any]:
    """The YAML mapping in ``path`` with ``${VAR}`` expanded; ConfigError names the file
    and the reason. Shared by the stage and the review console (one riskpipe.yaml serves both)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return _expand(data)


def load_config(path: str | None = None, **overrides: Any) -> StageConfig:
    """Config from ``path`` (YAML) with ``overrides`` (None values ignored) on top."""
    data: dict[str, Any] = read_config_file(path) if path else {}
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    try:
        return StageConfig(**data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")  # a model-level check names its fields itself
        raise ConfigError(f"{path or 'config'}: {field + ': ' if field else ''}{msg}") from None
