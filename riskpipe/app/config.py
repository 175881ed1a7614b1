"""Stage configuration: a YAML file (``riskpipe run --config``) plus command-line overrides.

Keys (deploy/riskpipe.yaml is a complete example):
the Kafka connection keys of :class:`riskpipe.kafka_clients.KafkaSettings`
(bootstrap_servers, security_protocol, sasl_mechanism, sasl_plain_username,
sasl_plain_password, ssl_cafile, ssl_certfile, ssl_keyfile, ssl_password), topics {input,
decisions, review, audit, dlq}, group_id, models {name: entry}, policy, metrics_port,
ledger, batch {max_events, max_wait_ms}, plus the optional tuning keys below.

Size limits: ``max_message_bytes`` (a JSON event, default 1 MiB),
``max_binary_message_bytes`` (an event in the binary tensor form, default 16 MiB; its
JSON part still has the JSON limit) and ``max_output_bytes`` (every output record, key
and headers included, default 1 MiB = Kafka's default ``message.max.bytes``; set it
to your topics' ``max.message.bytes``). A decision whose output would be larger is
dead-lettered with reason ``output_too_large``; a dead letter drops the original
payload (then its headers) to fit (docs/records.md).

``models`` maps the model name an event carries to a spec string
(``models/signs.pt?shape=3,32,32``; TorchScript, .onnx, .skops,
``module:factory@weights`` or ``demo:NAME``) or to a mapping with these keys
(``ModelConfig``):

* ``spec`` (required): the model spec string, as above.
* ``reference``: a .npz with array ``X`` (clean inputs, the model's input shape per
  row) and optionally ``y`` (integer labels; without it the model's own predictions
  label the set). Needed by a policy that uses context risk, and by
  ``scale: standardize``. Demo models default to their built-in reference.
* ``policy``: this model's policy file (default: the stage's ``policy``).
* ``labels``: class names, one per model class, for reviewers and reports. A scikit-learn
  model fitted on named classes gives its own (``classes_``, sorted) where this is unset;
  the same names in another order are refused.
* ``scale``: tabular inputs. ``standardize`` (per-feature standard deviation of the
  reference set) or a list of positive numbers, one per feature. Smoothing noise
  and every radius are then measured in the scaled l2 norm ||delta / s||_2.
* ``feature_names``: names of the features of a tabular model, one per feature.
  Default: the reference .npz's ``feature_names`` array, when it has one.
* ``range``: declared input value range, ``[lo, hi]`` for every value or a list of
  ``[lo, hi]`` pairs, one per feature. Inputs outside it go to the DLQ
  (``out_of_range``). Without it only finiteness is checked (demo models: [0, 1];
  ``?range=lo,hi`` in the spec works too).
* ``trusted_types``: skops files only. Type names (as skops reports them) trusted on
  top of what skops trusts by default and the tree ensembles' own types
  (riskpipe.models.loader.TREE_TYPES); a file with any other type is refused, naming
  the types and this key. Trust only types whose code you have reviewed.
* ``certify_batch_size``: noise samples per model call when smoothing certifies this
  model. Default: the stage-wide ``certify_batch_size`` if set, else measured by a
  short forward-throughput probe at start-up, cached per (model sha256, device,
  torch threads) in the cache directory (riskpipe/tuning.py).

Stage-wide ``other_models`` (default none): model names that other stages serve on this
stage's input topic (each ``riskpipe init`` stage serves its own model; several of them
pointed at one inference topic read one another's events). An event naming one of them
is not this stage's: it is skipped (committed; not decided, not dead-lettered, not
counted by the DLQ guard) and counted (``riskpipe_events_total{outcome="other_model"}``,
the run summary). A model named nowhere is still an ``unknown_model`` dead letter, so a
producer's typo is never skipped.

Stage-wide ``infrastructure_timeout_s`` (default 300): a ledger or broker outage is
ridden out (consumption paused, retried with bounded exponential backoff, no offset
moved past an undecided event); one longer than this stops the stage with a non-zero
exit and nothing undecided committed.

Stage-wide ``torch_threads`` (default 1): torch's intra-op threads in the stage, and
the cap of the models' BLAS/OpenMP pools (threadpoolctl) and ONNX Runtime's intra-op
pool, set once when the pipeline is built (before the batch-size probe, whose cache is per
thread count); ``null`` leaves torch's own default (one per core). Default 1 from
bench/bench_threads.py (bench/results/threads.json), decide_batch interleaved at 1
and 2 threads on 2 shared cores: 2 threads gave 0.08x the evaluations/s of 1 on the
demo model and 0.72x on a CIFAR-sized CNN. Micro-batches of noise samples are small
work items; extra OpenMP threads spin and contend with the stage's other threads
and any other process. Raise it only on a dedicated machine after measuring there.

Stage-wide ``model_timeout_s`` (default 240, > 0): the longest one certification model
call may run (one micro-batch of events of one model; an event decided alone is a call
of its own). Python cannot interrupt a call that never returns (a model that loops or
deadlocks on one input), so a watchdog thread of the stage (riskpipe.stream.watchdog)
records the call's events as suspects in the ledger (kind ``model_timeout``), logs one
line naming the model and the positions, and exits the process with code 5 for its
supervisor to restart. After the restart an event at a suspect position is decided
alone; one that hangs alone is dead-lettered (reason ``model_timeout``, never decided)
on the restart after that, and the rest of its batch is decided as usual. The default
stays below the liveness probe's 300 s without a poll (/healthz, which allows at least
``model_timeout_s`` + 60 s), so the watchdog names the event before the probe restarts
the pod blind.

``progress_interval_s`` (default 30; 0: off): seconds between the stage's progress lines
(decided by kind, DLQ by reason, events/s, consumer lag), logged without ``-v`` as are
the start-up lines per model (riskpipe.stream.status).

``noise_key_file``: a file whose first line (at least 32 characters, not an example's
placeholder, at least 8 distinct characters) keys the seeds of the smoothing noise,
HMAC(key, event id, policy and model). The environment variable
``RISKPIPE_NOISE_KEY`` (the key itself) comes first; with neither, each stage process
draws a random key. The sender picks the event id: with a public seed function they
could try ids offline until one draws noise that overstates the radius; a key they do
not know leaves them nothing to try. Give replicas of one stage the same key so a
redelivered event is decided with the same noise anywhere; each record holds its seed,
so ``ledger replay`` recomputes a certificate without the key.

Relative paths in a config file (``policy``, ``ledger``, ``noise_key_file``,
``checkpoint.key_file``, ``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile``, each model's
``spec`` file, ``reference`` and ``policy``; the console's ``review.password_file`` and
``review.secret_key_file``) resolve against the config file's directory; paths given on the
command line resolve against the working directory.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from riskpipe import npy, safe_yaml
from riskpipe.kafka_clients import KafkaSettings, TopicName
from riskpipe.ledger import LedgerError, backend_for
from riskpipe.ledger.targets import backend_name
from riskpipe.paths import read_small_text
from riskpipe.redaction import register_secret

# Noise samples per smoothing model call: the probe's largest candidate is 4096; above
# 2^20 no model call fits in memory (riskpipe.app.compose also bounds it by the input size).
MAX_CERTIFY_BATCH_SIZE = 1 << 20

# how long a ledger or broker outage is ridden out by default (``infrastructure_timeout_s``;
# ``ledger ingest`` rides out the ledger's for as long)
INFRASTRUCTURE_TIMEOUT_S = 300.0
# how long /healthz lets the stage's loop go without a poll at the least
# (``StageConfig.liveness_stall_s``, the only source of the figure for every server of it)
LIVENESS_STALL_S = 300.0


def default_policy_path() -> str:
    """The packaged default policy (riskpipe/policies/; the checkout's policies/ links to it)."""
    return str(Path(__file__).resolve().parents[1] / "policies" / "default.yaml")


OUTPUT_KINDS = ("decisions", "review", "audit", "dlq")  # what the stage writes; Topics names each one's topic
TOPIC_ROLES = ("input", *OUTPUT_KINDS)  # what the stage reads and writes, in Topics' order


class Topics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: TopicName = "inferences"
    decisions: TopicName = "decisions"
    review: TopicName = "review"
    audit: TopicName = "audit"
    dlq: TopicName = "dlq"

    @model_validator(mode="after")
    def _distinct(self) -> Topics:
        """One topic per role: the public decisions topic shared with review, audit or the
        DLQ would publish radii and full records to whoever reads decisions (the disclosure
        control), and an output that is the input would feed the stage its own records."""
        seen: dict[str, str] = {}
        for role, topic in self.by_role.items():
            if topic in seen:
                raise ValueError(f"{role} and {seen[topic]} are both {topic!r}: each needs a topic of its own")
            seen[topic] = role
        return self

    @property
    def by_role(self) -> dict[str, str]:
        """Each role's topic, in ``TOPIC_ROLES`` order (distinct: ``_distinct``)."""
        return {role: str(getattr(self, role)) for role in TOPIC_ROLES}

    def role_of(self, topic: str) -> str | None:
        """The role of ``topic`` among the stage's topics; None for any other topic."""
        return next((role for role, t in self.by_role.items() if t == topic), None)

    @property
    def outputs(self) -> tuple[str, str, str, str]:
        """The output topics in ``OUTPUT_KINDS`` order (the offline sink's file names)."""
        return self.decisions, self.review, self.audit, self.dlq

    def of(self, kind: str) -> str:
        """The topic of output ``kind`` (one of ``OUTPUT_KINDS``)."""
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"output kind: {kind!r} is not one of {', '.join(OUTPUT_KINDS)}")
        return str(getattr(self, kind))

    @property
    def all(self) -> tuple[str, ...]:
        """The input topic and the outputs (``create_topics`` makes them, and the
        checkpoints topic: ``StageConfig.topics_to_create``)."""
        return self.input, *self.outputs


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


class ModelConfig(BaseModel):
    """One ``models:`` entry (keys in the module docstring). Checks that need only the
    file system happen here; checks that need the loaded model (labels vs classes,
    scale and range vs features, reference shape) happen where the model is built
    (riskpipe.app.compose), with the same ``models.NAME.KEY: reason`` messages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str = Field(min_length=1)
    reference: str | None = None
    policy: str | None = None
    labels: list[str] | None = None
    scale: Any = None
    feature_names: list[str] | None = None
    range: Any = None
    certify_batch_size: int | None = Field(None, ge=1, le=MAX_CERTIFY_BATCH_SIZE)
    trusted_types: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _names_from_reference(cls, data: Any) -> Any:
        """``feature_names`` default to the reference set's own ``feature_names`` array."""
        if isinstance(data, dict) and data.get("feature_names") is None and isinstance(data.get("reference"), str):
            names = reference_feature_names(data["reference"])
            if names is not None:
                data = {**data, "feature_names": names}
        return data

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str | None) -> str | None:
        if v is not None:
            read_reference(v)  # raises ValueError with the reason
        return v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"{v}: policy file not found")
        return v

    @field_validator("labels", "feature_names")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("must list at least one name")
            if len(set(v)) != len(v):
                raise ValueError("names must be unique")
        return v

    @field_validator("scale", mode="before")
    @classmethod
    def _scale(cls, v: Any, info: ValidationInfo) -> Any:
        if v == "standardize" and info.data.get("reference") is None:
            raise ValueError("'standardize' needs a reference set (the reference key)")
        if v is None or v == "standardize":
            return v
        if not isinstance(v, list) or not v or not all(_is_number(x) for x in v):
            raise ValueError("must be 'standardize' or a non-empty list of numbers, one per feature")
        if not all(0 < x < float("inf") for x in v):
            raise ValueError("every scale must be a finite number > 0")
        return [float(x) for x in v]

    @field_validator("range", mode="before")
    @classmethod
    def _range(cls, v: Any) -> Any:
        if v is None:
            return v
        is_pair = isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v)
        pairs = [v] if is_pair else v
        if not isinstance(pairs, list) or not pairs or not all(
                isinstance(p, list) and len(p) == 2 and all(_is_number(x) for x in p) for p in pairs):
            raise ValueError("must be [lo, hi] or a list of [lo, hi] pairs, one per feature")
        if not all(_finite32(x) for p in pairs for x in p):
            raise ValueError("every lo and hi must be a finite number (within float32, where inputs are checked); "
                             "leave range out to check finiteness only")
        if not all(p[0] < p[1] for p in pairs):
            raise ValueError("need lo < hi in every pair")
        out = [[float(a), float(b)] for a, b in pairs]
        return out[0] if is_pair else out


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _finite32(x: float) -> bool:
    """``x`` is finite and stays finite as a float32 (inputs and ranges are compared there)."""
    return math.isfinite(x) and abs(x) <= float(np.finfo(np.float32).max)


def reference_feature_names(path: str) -> list[str] | None:
    """The ``feature_names`` array of a reference .npz as strings; None when it has none
    (or cannot be read: ``read_reference`` reports that)."""

    try:
        with npy.load_npz(path) as z:
            if "feature_names" not in z.files:
                return None
            names = z["feature_names"]
    except (OSError, ValueError, EOFError):
        return None
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise ValueError(f"{path}: feature_names must be a 1-D array of strings, not {names.dtype} {names.shape}")
    return [str(n) for n in names]


def read_reference(path: str):
    """``(X, y or None)`` from a reference .npz; ValueError with the reason."""

    try:
        with npy.load_npz(path) as z:
            if "X" not in z.files:
                raise ValueError(f"{path}: no array 'X' (clean inputs) in the .npz")
            X, y = z["X"], (z["y"] if "y" in z.files else None)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError) as e:
        if str(e).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: not a readable .npz of plain arrays ({e})") from None
    if X.ndim < 2 or len(X) == 0 or X.dtype.kind not in "fiu" or not np.isfinite(X).all():
        raise ValueError(f"{path}: X must be a non-empty numeric (N, ...) array of finite values")
    if y is not None and (y.shape != (len(X),) or y.dtype.kind not in "iu"):
        raise ValueError(f"{path}: y must hold {len(X)} integer labels")
    return X, y


def read_labelled(path: str):
    """``(X, y)`` from a labelled .npz (evaluate's and compare's --data): ``read_reference``'s
    checks (finite numeric X, one integer label per row), and y is required."""

    X, y = read_reference(path)
    if y is None:
        raise ValueError(f"{path}: missing array 'y' (one integer label per row of X)")
    return X, y


def labels_outside(y, num_classes: int) -> str | None:
    """Why labels ``y`` do not name classes of a model with ``num_classes`` outputs, or None."""

    if len(y) and (int(np.min(y)) < 0 or int(np.max(y)) >= num_classes):
        return (f"y holds labels outside the model's classes [0, {num_classes}) (labels from {int(np.min(y))} "
                f"to {int(np.max(y))})")
    return None


class Checkpoint(BaseModel):
    """Signed ledger checkpoints made by the stage (riskpipe.ledger.checkpoint): after an
    append once ``every_records`` rows or ``every_seconds`` have passed; published to
    ``topic`` when the stage writes to Kafka (null: stored in the ledger only)."""

    model_config = ConfigDict(extra="forbid")
    key_file: str
    every_records: int | None = Field(10_000, ge=1)
    every_seconds: float | None = Field(60.0, gt=0)
    topic: TopicName | None = "checkpoints"


class StageConfig(KafkaSettings):
    """The whole ``riskpipe.yaml``: Kafka connection keys (inherited) plus the stage's own."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    topics: Topics = Topics()
    group_id: str = "riskpipe"
    models: dict[str, ModelConfig] = {"digits": ModelConfig(spec="demo:digits")}  # noqa: RUF012 - pydantic copies it
    policy: str = Field(default_factory=default_policy_path)
    metrics_port: int | None = Field(None, ge=0, le=65535)  # 0: a free port
    metrics_addr: str = "127.0.0.1"  # 0.0.0.0 inside a pod, so Prometheus and probes reach it
    ledger: str | None = None  # a file path, sqlite:///PATH or postgresql://USER@HOST/DB
    # origin line of the ledger's signed checkpoints (C2SP tlog-checkpoint); None:
    # riskpipe/ledger/<the ledger's random log id>
    ledger_origin: str | None = Field(None, pattern=r"^[^\s+]+$")
    checkpoint: Checkpoint | None = None
    # a file whose first line (at least 32 characters) keys the smoothing noise seeds; the
    # environment's RISKPIPE_NOISE_KEY comes first; neither: a random key per process
    # (riskpipe.app.noise_key)
    noise_key_file: str | None = None
    batch: Batch = Batch()
    guard: Guard = Guard()
    device: str = "cpu"
    max_message_bytes: int = Field(1 << 20, ge=1024)  # a JSON event
    max_binary_message_bytes: int = Field(16 << 20, ge=1024)  # an event in the binary tensor form
    # every output (decisions, review, audit, dlq), key and headers included: Kafka's default
    # message.max.bytes; larger decision outputs are that event's dead letter (output_too_large)
    max_output_bytes: int = Field(1 << 20, ge=8192)
    certify_batch_size: int | None = Field(None, ge=1, le=MAX_CERTIFY_BATCH_SIZE)  # None: probed (riskpipe.tuning)
    # None: torch's default (see the module docstring); at most 1024 (libgomp fails to start far more)
    torch_threads: int | None = Field(1, ge=1, le=1024)
    review_include_input: bool = True
    create_topics: bool = False
    # consumer-group timing; None: 10000 / 3000, or 2000 / 500 on the embedded broker, where a
    # group forms in steps of half the session timeout (riskpipe.kafka_clients.group_timing)
    session_timeout_ms: int | None = Field(None, ge=1000)
    heartbeat_interval_ms: int | None = Field(None, ge=100)
    # how often the consumer refreshes topic metadata, so added partitions (or a topic
    # re-created after a broker lost its data) are picked up; kafka-python's default is 5 min
    metadata_max_age_ms: int = Field(30_000, ge=500)
    worker_id: str | None = None
    # a ledger or broker outage longer than this stops the stage (non-zero exit, nothing
    # undecided committed); shorter ones are ridden out (riskpipe.stream.infra)
    infrastructure_timeout_s: float = Field(INFRASTRUCTURE_TIMEOUT_S, gt=0, le=86_400)
    # the longest one certification model call may run; past it the stage records the call's
    # events as suspects and exits 5 (riskpipe.stream.watchdog)
    model_timeout_s: float = Field(240.0, gt=0, le=86_400)
    # seconds between the stage's progress lines (decided, DLQ by reason, rate, lag); 0: none
    progress_interval_s: float = Field(30.0, ge=0)
    review: dict[str, Any] | None = None  # read by `riskpipe review` (credentials), ignored by the stage
    other_models: list[str] = []  # noqa: RUF012 - pydantic copies it; models other stages serve on the input topic

    @field_validator("models", mode="before")
    @classmethod
    def _model_entries(cls, v: Any) -> Any:
        """A bare spec string is short for ``{spec: ...}``."""
        if isinstance(v, dict):
            return {k: ({"spec": e} if isinstance(e, str) else e) for k, e in v.items()}
        return v

    @field_validator("ledger")
    @classmethod
    def _ledger(cls, v: str | None) -> str | None:
        if v:
            backend_for(v)  # an unknown scheme fails here, naming the field
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        if not v:
            raise ValueError("at least one model must be registered")
        return v

    @model_validator(mode="after")
    def _other_models(self) -> StageConfig:
        """``other_models`` names models this stage does not serve, each once."""
        if len(set(self.other_models)) != len(self.other_models):
            raise ValueError("other_models: names must be unique")
        if served := sorted(set(self.other_models) & set(self.models)):
            raise ValueError(f"other_models: {', '.join(served)} is served by this stage (models); "
                             "list only models other stages decide")
        return self

    @model_validator(mode="after")
    def _checkpoint_topic(self) -> StageConfig:
        """``checkpoint.topic`` is none of the stage's topics: the input would feed the stage
        its own signed notes (each a dead letter, until the DLQ guard stops the stage), and an
        output would mix them into the decisions or the dead letters their readers parse."""
        topic = self.checkpoint.topic if self.checkpoint is not None else None
        role = self.topics.role_of(str(topic)) if topic is not None else None
        if role is not None:
            raise ValueError(f"checkpoint.topic: {topic!r} is the {role} topic (topics.{role}); "
                             "signed checkpoints need a topic of their own")
        return self

    @property
    def largest_message_bytes(self) -> int:
        """The largest input the stage accepts (fetch and request sizes follow it)."""
        return max(self.max_message_bytes, self.max_binary_message_bytes)

    @property
    def liveness_stall_s(self) -> float:
        """How long /healthz lets the loop go without a poll (riskpipe.metrics.health_app):
        the usual 300 s, and at least 60 s past ``model_timeout_s``, so a hung model call
        meets the watchdog (which names its events) before the liveness probe."""
        return max(LIVENESS_STALL_S, self.model_timeout_s + 60.0)

    def kafka(self) -> KafkaSettings:
        """The settings every Kafka client of this process is built from (riskpipe.kafka_clients)."""
        return KafkaSettings(**{k: getattr(self, k) for k in KafkaSettings.model_fields})

    def checkpoints_topic(self, sink: str | None = None) -> str | None:
        """The topic the stage publishes its signed checkpoints to: ``checkpoint.topic``,
        unless there is no ``checkpoint:`` section or topic, or ``sink`` is JSON-lines files
        (``jsonl:DIR``: the stage writes nothing to Kafka then)."""
        if self.checkpoint is None or not self.checkpoint.topic or (sink or "").startswith("jsonl:"):
            return None
        return str(self.checkpoint.topic)

    def topics_to_create(self, sink: str | None = None) -> tuple[str, ...]:
        """What ``create_topics: true`` makes at start: the input and output topics, and the
        checkpoints topic when the stage publishes to it (``checkpoints_topic``). Before, the
        checkpoints topic was left to the broker's auto-creation: refused where that is off
        (each checkpoint then stored but not published), or made with the broker's default
        partitions (Tansu: 4), where the notes of one log lose their order."""
        cp = self.checkpoints_topic(sink)
        return tuple(dict.fromkeys([*self.topics.all, *([cp] if cp else [])]))

    def model_policy(self, name: str) -> str:
        """The policy file that decides events for model ``name``."""
        return self.models[name].policy or self.policy


class ConfigError(ValueError):
    pass


_VAR = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# settings that hold a secret or the path of one (noise_key_file, checkpoint.key_file,
# review.password_file, sasl_plain_password, ...): a ${VAR} value there is masked from
# then on, so a key given where its path belongs is not printed in the error that says so
_SECRET_SETTING = re.compile(r"(?i)key|password|secret")


def _holds_secret(setting: str, written: str, value: str) -> bool:
    """Is ``value`` (a ``${VAR}`` of ``written``, the setting's text) a secret to mask? Every
    variable of a password or key setting; for the file of one (``noise_key_file``,
    ``checkpoint.key_file``, ``review.password_file``) only a whole ``${VAR}`` naming no
    file: a key given where its path belongs. A real path stays readable in errors."""
    if not _SECRET_SETTING.search(setting):
        return False
    if not setting.lower().endswith("file"):
        return True
    return _VAR.fullmatch(written) is not None and not os.path.exists(value)


def _expand(value: Any, where: str = "") -> Any:
    """``${VAR}`` in string values from the environment (Kubernetes injects secrets that
    way). Only that form is expanded (``$HOME`` or a ``$`` inside a password stays as
    written); an unset variable is a ConfigError naming it and the field."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name = m.group(1)
            if not _VAR_NAME.fullmatch(name):
                raise ConfigError(f"{where or 'value'}: ${{{name}}} is not a valid variable name")
            if name not in os.environ:
                raise ConfigError(f"{where or 'value'}: environment variable {name} is not set (used as ${{{name}}})")
            if _holds_secret(where.rsplit(".", 1)[-1], value, os.environ[name]):
                register_secret(os.environ[name])
            return os.environ[name]

        return _VAR.sub(sub, value) if "${" in value else value
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def read_config_file(path: str) -> dict[str, Any]:
    """The YAML mapping in ``path`` with ``${VAR}`` expanded; ConfigError names the file
    and the reason. Shared by the stage and the review console (one riskpipe.yaml serves both)."""

    try:
        data = safe_yaml.load(read_small_text(path)) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except safe_yaml.YAMLLimitError as e:
        raise ConfigError(f"{path}:{e.line}: {e.reason}") from None
    except yaml.YAMLError as e:
        line, reason = safe_yaml.explain(e)
        raise ConfigError(f"{path}:{line}: invalid YAML ({reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    try:
        return _expand(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _is_file_ledger(target: str) -> bool:
    """A SQLite file path (resolved against the config file's directory), not a URL or a
    keyword DSN: resolving ``host=... password=...`` as a path made it a file named after
    the DSN, password included. An unknown form is left for the ``ledger`` check to name."""
    try:
        return "://" not in target and backend_name(target) == "sqlite"
    except LedgerError:
        return False


def config_relative(p: Any, base: Path) -> Any:
    """A relative path ``p`` written in a config file, as read from the file's directory
    ``base``; anything else (absolute, empty, not a string) as it is."""
    return str(base / p) if isinstance(p, str) and p and not Path(p).is_absolute() else p


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths of a config file, resolved against the file's directory."""

    def rel(p: Any) -> Any:
        return config_relative(p, base)

    data = dict(data)
    if "policy" in data:
        data["policy"] = rel(data["policy"])
    if isinstance(data.get("ledger"), str) and _is_file_ledger(data["ledger"]):  # a file, not a DSN
        data["ledger"] = rel(data["ledger"])
    for key in ("noise_key_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if key in data:
            data[key] = rel(data[key])
    if isinstance(data.get("checkpoint"), dict) and "key_file" in data["checkpoint"]:
        data["checkpoint"] = {**data["checkpoint"], "key_file": rel(data["checkpoint"]["key_file"])}
    models = data.get("models")
    if isinstance(models, dict):
        # lazy: riskpipe.models loads torch; the review console and the report read this config without it
        from riskpipe.models.loader import resolve_spec

        out = {}
        for name, e in models.items():
            if isinstance(e, str):
                e = resolve_spec(e, base)
            elif isinstance(e, dict):
                e = dict(e)
                if isinstance(e.get("spec"), str):
                    e["spec"] = resolve_spec(e["spec"], base)
                for key in ("reference", "policy"):
                    if key in e:
                        e[key] = rel(e[key])
            out[name] = e
        data["models"] = out
    return data


def _merge_models(data: dict[str, Any], models: dict[str, str] | None, references: dict[str, str] | None) -> None:
    """``--model NAME=SPEC`` sets (or adds) an entry's spec; ``--reference NAME=PATH``
    sets the reference of a model the config or ``--model`` registers."""
    entries = data.get("models")
    if models:
        entries = {} if not isinstance(entries, dict) else dict(entries)
        for name, spec in models.items():
            old = entries.get(name)
            entries[name] = {**old, "spec": spec} if isinstance(old, dict) else {"spec": spec}
    if references:
        if entries is None:
            entries = {"digits": {"spec": "demo:digits"}}
        entries = dict(entries)
        for name, ref in references.items():
            if name not in entries:
                raise ConfigError(f"--reference {name}={ref}: no model named {name!r} "
                                  f"(known: {', '.join(sorted(entries))})")
            old = entries[name]
            entries[name] = {**old, "reference": ref} if isinstance(old, dict) else {"spec": old, "reference": ref}
    if entries is not None:
        data["models"] = entries


def format_validation_error(source: str, e: ValidationError) -> str:
    """One line: ``source: field.path: reason``."""
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")  # a model-level check names its fields itself
    return f"{source}: {field + ': ' if field else ''}{msg}"


def load_config(path: str | None = None, *, references: dict[str, str] | None = None,
                **overrides: Any) -> StageConfig:
    """Config from ``path`` (YAML) with ``overrides`` (None values ignored) on top.
    ``models`` overrides are ``{name: spec}`` (``--model``), ``references``
    ``{name: path}`` (``--reference``)."""
    data: dict[str, Any] = read_config_file(path) if path else {}
    if path:
        data = _resolve_paths(data, Path(path).resolve().parent)
    _merge_models(data, overrides.pop("models", None), references)
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
        raise ConfigError(format_validation_error(path or "config", e)) from None
