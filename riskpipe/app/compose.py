"""The composition root: everything the stage needs, built from one validated StageConfig.

    StageConfig ──► per model: load_model ─► range/scale ─► policy ─► certifier
                                          └─► context index (only if the policy uses it)
                ──► Pipeline (computes)  ──► Stage (loops) with source/sink factories,
                                              ledger and metrics

``riskpipe run`` (one worker or ``--workers N``), the offline mode, the demo, the
benchmarks and the tests all build through here, so a model is wired the same way
wherever it runs. Nothing else loads models, policies or reference sets for the stage.

Every problem found while building is a ``ConfigError`` with one line naming the key
(``models.signs.labels: 3 labels, the model has 10 classes``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from riskpipe.app.config import ConfigError, ModelConfig, StageConfig, labels_outside, read_reference
from riskpipe.app.noise_key import NoiseKey, resolve_noise_key
from riskpipe.certify import certifier_for_policy
from riskpipe.certify.certificate import MODEL_FAULT
from riskpipe.certify.families import family
from riskpipe.certify.samplers import GridError
from riskpipe.context import ContextError, ContextIndex
from riskpipe.ledger import open_ledger as open_target
from riskpipe.ledger.checkpoint import checkpointer_for
from riskpipe.ledger.targets import backend_name
from riskpipe.models import ModelError, ShapeUnknown, device_problem, load_model, load_model_for
from riskpipe.models.base import one_line, sha256_file
from riskpipe.models.loader import UntrustedTypes
from riskpipe.models.scaled import scaled_model, standardize_scale
from riskpipe.paths import atomic_write, cache_dir
from riskpipe.policy import load_policy
from riskpipe.policy.rules import uses_context
from riskpipe.stream.broker import create_topics
from riskpipe.stream.checksum import check_kafka_crc32c
from riskpipe.stream.io import EarlyJoin, JsonlSink, JsonlSource, KafkaSink, KafkaSource
from riskpipe.stream.pipeline import ModelEntry, Pipeline, certify, radius_in_threat
from riskpipe.stream.ports import Sink, Source
from riskpipe.stream.stage import Stage
from riskpipe.tuning import certify_batch_size

REFERENCE_RADII_SAMPLES = 300  # reference inputs certified once for radius percentiles
PROBE_INPUTS = 8  # reference rows (or range points) a model's output contract is checked on at start-up
# One model call of smoothing holds batch_size noisy inputs (float32) and their outputs
# (or the probe's fastest size, which it ran; the noise buffer holds a call and up to one
# piece more); a batch size that cannot fit this is a configuration error, not an
# out-of-memory crash.
MAX_CERTIFY_BATCH_BYTES = 2 << 30


def _load_policies(config: StageConfig) -> dict[str, object]:
    """Each distinct policy file loaded once with ``load_policy`` (its invariant, e.g.
    uncertified is never allowed, is checked per file)."""

    paths = {config.policy} | {m.policy for m in config.models.values() if m.policy}
    return {p: load_policy(p) for p in sorted(paths)}


# ---------------------------------------------------------------- models ----------
def _err(name: str, key: str, reason: str) -> ConfigError:
    return ConfigError(f"models.{name}.{key}: {reason}")


def _n_features(model) -> int:
    return int(np.prod(model.input_shape))


def _declared_range(name: str, mc: ModelConfig, model):
    """(lo, hi) from the entry's ``range`` (scalars, or arrays of the input shape)."""
    if mc.range is None:
        return model.value_range
    if not isinstance(mc.range[0], list):
        return (mc.range[0], mc.range[1])
    if len(mc.range) != _n_features(model):
        raise _err(name, "range", f"{len(mc.range)} [lo, hi] pairs, the model has {_n_features(model)} features")
    lo, hi = np.array(mc.range, dtype=np.float32).T
    return (lo.reshape(model.input_shape), hi.reshape(model.input_shape))


def _reference(name: str, mc: ModelConfig, model):
    """(path, X shaped like the input, y) of the model's reference set, or None."""
    path = mc.reference or model.default_reference
    if path is None:
        return None
    try:
        X, y = read_reference(path)
    except ValueError as e:
        raise _err(name, "reference", str(e)) from None
    if X.shape[1:] != tuple(model.input_shape) and X[0].size == _n_features(model):
        X = X.reshape((len(X),) + tuple(model.input_shape))
    if X.shape[1:] != tuple(model.input_shape):
        raise _err(name, "reference", f"{path}: X rows have shape {list(X.shape[1:])}, "
                                      f"the model expects {list(model.input_shape)}")
    with np.errstate(over="ignore"):  # beyond float32's range: refused below, not a warning
        X32 = X.astype(np.float32)
    if not np.isfinite(X32).all():
        raise _err(name, "reference", f"{path}: X holds values beyond float32's range (the model's inputs are float32)")
    if (why := _outside_inputs(model, X32, y)) is not None:
        raise _err(name, "reference", f"{path}: {why}")
    return path, X32, y


def _outside_inputs(model, X: np.ndarray, y) -> str | None:
    """Why the reference set is not made of the model's inputs, or None. Rows outside the
    model's input range (another unit: 0..255 for a [0, 1] model) would be far from every
    event, so the support and context signals, measured against them, would say nothing
    (an input far out was no longer ``out_of_support``); a label outside the model's
    classes names no class."""
    if model.value_range is not None:
        lo, hi = (np.broadcast_to(np.asarray(v, dtype=np.float32), X.shape[1:]) for v in model.value_range)
        out = np.less(X, lo) | np.greater(X, hi)
        if out.any():
            return (f"{int(out.any(axis=tuple(range(1, X.ndim))).sum())} of {len(X)} rows hold values outside the "
                    f"model's input range (declared range, or the model's own); give the reference set in the "
                    f"model's units (X from {float(X.min()):g} to {float(X.max()):g})")
    return None if y is None else labels_outside(y, model.num_classes)


def _scale(name: str, mc: ModelConfig, reference):
    """(s as a flat array, description) or (None, None)."""
    if mc.scale is None:
        return None, None

    if mc.scale == "standardize":
        return standardize_scale(reference[1]), "standardize(reference)"
    return np.asarray(mc.scale, dtype=np.float64), "configured"


def _probe_inputs(model, reference) -> np.ndarray:
    """Inputs to check the model's output contract on at start-up: the first reference
    rows, else the low end, middle and high end of the declared range, else 0 and 1."""
    if reference is not None:
        return reference[1][:PROBE_INPUTS]
    shape = tuple(model.input_shape)
    if model.value_range is not None:
        lo, hi = (np.broadcast_to(np.asarray(v, dtype=np.float32), shape) for v in model.value_range)
        if np.isfinite(lo).all() and np.isfinite(hi).all():
            return np.stack([lo, (lo + hi) / 2, hi])
    return np.stack([np.zeros(shape, np.float32), np.ones(shape, np.float32)])


def _labels(name: str, mc: ModelConfig, model) -> list[str] | None:
    """The class names reviewers and reports show. A model that names its classes
    (scikit-learn's ``classes_``: ``meta['class_names']``) gives them where the entry has
    no ``labels``; ``labels`` that are those names in another order are refused, since
    class i is the model's i-th class and a reviewer would read ``legit`` for ``fraud``."""
    names = model.meta.get("class_names")
    if mc.labels is None:
        return None if names is None else list(names)
    if names is not None and list(mc.labels) != list(names) and \
            sorted(v.casefold() for v in mc.labels) == sorted(v.casefold() for v in names):
        raise _err(name, "labels", f"{list(mc.labels)} name the model's classes in another order: class i is its "
                                   f"classes_[i], {list(names)} (scikit-learn sorts them); write them in that order")
    return list(mc.labels)


def _admissible_probe(entry: ModelEntry, X: np.ndarray) -> np.ndarray | None:
    """The first start-up probe input the entry's certifier takes (in its space), for
    ``Pipeline.healthy`` until the stage has certified an input of its own; None if none."""
    for x in entry.to_certified(np.asarray(X, dtype=np.float32)):
        try:
            entry.certifier.check_inputs(x[None])
        except GridError:
            continue
        return x[None].copy()  # not a view: it would keep the whole reference set alive
    return None


def _check_forward(name: str, model, reference) -> None:
    """A model that raises, or whose output is not finite (N, C) logits, stops the start-up
    with one line naming it (riskpipe.models.output)."""

    try:
        model.check_forward(_probe_inputs(model, reference))
    except ModelError as e:
        raise _err(name, "spec", str(e)) from None


def _batch_size(name: str, mc: ModelConfig, model, configured: int | None):
    """The smoothing batch size (riskpipe.tuning), bounded so one model call fits in memory."""

    limit = max(1, MAX_CERTIFY_BATCH_BYTES // (4 * _n_features(model)))
    size = mc.certify_batch_size or configured
    if size is not None and size > limit:
        key = "certify_batch_size" if mc.certify_batch_size else "(stage) certify_batch_size"
        raise _err(name, key, f"{size} noisy inputs of {_n_features(model)} values per model call need "
                              f"{4 * size * _n_features(model) / 2**30:.3g} GiB; at most {limit} for this model")
    try:
        return certify_batch_size(model, size, name=name)
    except ModelError as e:
        raise _err(name, "spec", f"{e} (batch-size probe)") from None
    except Exception as e:  # noqa: BLE001 - the user's model failing at a larger batch is a start-up error
        raise _err(name, "spec", f"model {model.spec}: batch-size probe: forward pass raised "
                                 f"{type(e).__name__}: {one_line(e)}") from None


def build_entry(name: str, mc: ModelConfig, policy, device: str = "cpu",
                config_batch_size: int | None = None, policy_source: str | None = None) -> ModelEntry:
    """One model, checked against its config entry, with its policy (loaded from the file
    ``policy_source``, when known), certifier and (only when the policy uses it) context index."""

    trusted = mc.trusted_types or ()
    try:
        try:
            model = load_model(mc.spec, device=device, trusted_types=trusted)
        except ShapeUnknown:  # a plain TorchScript file: its input shape from the reference set, as init takes it
            if not mc.reference:
                raise
            try:
                shape = read_reference(mc.reference)[0].shape[1:]
            except ValueError as e:
                if isinstance(e, ModelError):
                    raise
                raise _err(name, "reference", str(e)) from None
            model = load_model_for(mc.spec, shape, device=device, trusted_types=trusted)
    except UntrustedTypes as e:
        raise _err(name, "spec", str(UntrustedTypes(e.spec, e.types, f"models.{name}.trusted_types"))) from None
    except ModelError as e:
        raise _err(name, "spec", str(e)) from None
    if mc.labels is not None and len(mc.labels) != model.num_classes:
        raise _err(name, "labels", f"{len(mc.labels)} labels, the model has {model.num_classes} classes")
    labels = _labels(name, mc, model)
    if mc.feature_names is not None and len(mc.feature_names) != _n_features(model):
        raise _err(name, "feature_names", f"{len(mc.feature_names)} names, the model has "
                                          f"{_n_features(model)} features")
    model.value_range = _declared_range(name, mc, model)
    reference = _reference(name, mc, model) if (mc.reference or mc.scale == "standardize" or uses_context(policy)) \
        else None
    _check_forward(name, model, reference)
    s, scale_desc = _scale(name, mc, reference)
    certified = model
    if s is not None:
        if len(s) != _n_features(model):
            raise _err(name, "scale", f"{len(s)} values, the model has {_n_features(model)} features")

        certified = scaled_model(model, s, scale_desc)

    batch = None
    if family(policy.certifier.method).batch_probe:  # thousands of model calls per input: size matters
        batch = _batch_size(name, mc, certified, config_batch_size)
    try:
        certifier = certifier_for_policy(certified, policy, batch_size=batch.size if batch else None,
                                         forward_batch=batch.forward if batch else None)
        certifier.prepare()  # one-time work (Lipschitz constants) now: its failure is the start-up's
    except ValueError as e:
        raise _err(name, "policy", f"{policy_source or policy.name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's model failing inside a bound family's set-up (Lipschitz
        # copies the layers to float64 and runs them): a start-up error in one line, not a dead letter per event
        raise _err(name, "policy", f"{policy_source or policy.name}: the {policy.certifier.method} certifier "
                                   f"cannot be set up for model {model.spec} ({type(e).__name__}: {one_line(e)})"
                   ) from None
    entry = ModelEntry(name=name, model=model, certified=certified, policy=policy, certifier=certifier,
                       epsilon_cert=policy.certificate_epsilon(certifier.norm, certified.input_dim),
                       scale=None if s is None else s.astype(np.float32).reshape(model.input_shape),
                       scale_desc=scale_desc, labels=labels, feature_names=mc.feature_names,
                       batch_size_source=batch.source if batch else None, policy_source=policy_source)
    entry.known_good = _admissible_probe(entry, _probe_inputs(model, reference))
    if uses_context(policy):
        if reference is None:
            raise _err(name, "reference", f"policy {policy.name} uses context risk; give the model a reference "
                                          "set (.npz with X and optionally y) under models."
                                          f"{name}.reference or --reference {name}=PATH")
        entry.context = _context_index(entry, *reference)
    return entry


# ---------------------------------------------------------------- context ---------
def _file_sha(path: str) -> str:
    return sha256_file(path)


def _context_index(entry: ModelEntry, path: str, X: np.ndarray, y):
    """Nearest-neighbour index over the (scaled) reference set in the threat norm,
    with reference radii certified once and cached by (model sha, certifier
    settings, reference file sha)."""

    Z = entry.to_certified(X)
    if y is None:  # unlabelled reference: the model's own predictions label it
        try:
            y = entry.certified.predict(Z).astype(np.int64)
        except ModelError as e:
            raise _err(entry.name, "spec", f"{e} (labelling the reference set {path})") from None
    norm = entry.policy.threat_model.norm
    settings = {"certifier": entry.policy.certifier.model_dump(mode="json"), "threat_norm": norm,
                "scale": None if entry.scale is None else entry.scale.ravel().tolist(),
                "samples": REFERENCE_RADII_SAMPLES}
    key = hashlib.sha256(json.dumps([entry.model.sha256, settings, _file_sha(path)], sort_keys=True)
                         .encode()).hexdigest()[:24]
    cache = Path(cache_dir()) / "context" / f"radii-{key}.npy"
    radii = None
    if cache.exists():
        try:
            radii = np.load(cache, allow_pickle=False)
        except (OSError, ValueError):
            radii = None  # a damaged cache is recomputed
    if radii is None:
        sample = Z[:REFERENCE_RADII_SAMPLES]
        try:
            certs = certify(entry, sample, list(range(len(sample))))
        except GridError as e:
            raise _err(entry.name, "reference", f"{path}: cannot certify the reference radii: {e}") from None
        faults = [i for i, c in enumerate(certs) if c.reason == MODEL_FAULT]
        if faults:
            raise _err(entry.name, "spec", f"model {entry.model.spec}: {certs[faults[0]].extra[MODEL_FAULT]} while "
                                           f"certifying {len(faults)} of {len(certs)} reference inputs of {path}")
        radii = np.array([radius_in_threat(entry, c) for c in certs])
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as f:
            np.save(f, radii)
    try:
        return ContextIndex.build(Z, y, norm, reference_radii=radii, name=Path(path).stem)
    except ContextError as e:
        raise _err(entry.name, "reference", f"{path}: {e}") from None


# ---------------------------------------------------------------- pipeline --------
def limit_native_threads(n: int) -> None:
    """Cap the BLAS and OpenMP thread pools the loaded models use (scikit-learn's
    OpenBLAS, XGBoost's and LightGBM's OpenMP) at ``n``, as torch_threads caps torch's:
    torch.set_num_threads does not reach them, and on a small machine their default
    (one thread per core) contends with the stage's own. Called once the models are
    loaded, so their libraries are there to be limited (threadpoolctl)."""

    threadpool_limits(limits=n)


def build_pipeline(config: StageConfig, noise_key: NoiseKey | None = None) -> Pipeline:
    """Every model of ``config`` under its own policy, ready to decide batches. The noise
    seeds are keyed by ``noise_key``, or by the key the environment or config names
    (riskpipe.app.noise_key: a random one otherwise)."""
    noise_key = noise_key or resolve_noise_key(config)
    if (why := device_problem(config.device)) is not None:  # named as the stage's key (load_model checks it too)
        raise ConfigError(f"device: {why}")
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)  # before the batch-size probe: it measures at this count
    policies = _load_policies(config)
    entries = {}
    for name, mc in config.models.items():
        path = config.model_policy(name)
        entries[name] = build_entry(name, mc, policies[path], device=config.device,
                                    config_batch_size=config.certify_batch_size,
                                    policy_source=str(Path(path).absolute()))
    if config.torch_threads is not None:
        limit_native_threads(config.torch_threads)
    return Pipeline(entries, noise_key=noise_key.key, noise_key_source=noise_key.source,
                    worker=config.worker_id or "w0", review_include_input=config.review_include_input)


# ---------------------------------------------------------------- edges -----------
def open_ledger(config: StageConfig):
    """The stage's ledger: a file, sqlite:///PATH or postgresql://... (riskpipe.ledger)."""
    if not config.ledger:
        return None

    if backend_name(config.ledger) == "postgresql":
        # a dead server fails its connection well inside the outage clock, and so does one that
        # stops answering on a live host: each answer within the lock timeout plus that
        dead = min(30.0, max(2.0, config.infrastructure_timeout_s / 2))
        return open_target(config.ledger, dead_after_s=dead, bound_answers=True)
    return open_target(config.ledger)


class CheckpointHook:
    """The committer's after-commit hook that signs ledger checkpoints (``Checkpointer``):
    after each committed batch, at each turn the stage holds nothing (``idle``: so
    ``every_seconds`` holds while no event arrives) and when it stops cleanly
    (``finish``: nothing it wrote is left unsigned)."""

    def __init__(self, signer, ledger) -> None:
        self.signer, self.ledger = signer, ledger

    def __call__(self, outcome) -> None:
        self.signer(self.ledger, len(outcome.decided) + len(outcome.dead))

    def idle(self) -> None:
        self.signer(self.ledger, 0)

    def finish(self) -> None:
        self.signer.final(self.ledger)


def checkpoint_hooks(config: StageConfig, ledger, sink: str | None = None) -> list:
    """The committer's after-commit hook that signs a ledger checkpoint every
    ``checkpoint.every_records`` records or ``every_seconds`` (config ``checkpoint:``),
    and once more when the stage stops cleanly; published to Kafka unless the sink is
    ``jsonl:``; none without that section."""
    if ledger is None or config.checkpoint is None:
        return []

    signer = checkpointer_for(config.checkpoint, config.kafka() if config.checkpoints_topic(sink) else None,
                              origin=config.ledger_origin)
    return [CheckpointHook(signer, ledger)]


def source_factory(config: StageConfig, source: str | None = None, checkpoint: str | None = None,
                   metrics=None, joined: EarlyJoin | None = None, sink: str | None = None
                   ) -> Callable[[Callable], Source]:
    """``make_source(on_revoke)``: Kafka (default) or a JSON-lines file (``jsonl:PATH``).
    ``joined``: the Kafka source is already a group member (``riskpipe.app.runner``); the
    first call takes it, a reopen after an outage makes a new one. ``sink``: the stage's,
    for the topics ``create_topics`` makes (``StageConfig.topics_to_create``)."""

    if source and source.startswith("jsonl:"):
        path = source[len("jsonl:"):]
        return lambda on_revoke: JsonlSource(path, checkpoint)

    check_kafka_crc32c(metrics)
    early = [joined] if joined is not None else []

    def make_source(on_revoke: Callable) -> Source:
        if early:
            return early.pop().take(on_revoke)
        if config.create_topics:  # after a broker restart (memory storage) topics are gone
            create_topics(config.kafka(), config.topics_to_create(sink))
        return KafkaSource(config, on_revoke=on_revoke)

    return make_source


def sink_factory(config: StageConfig, sink: str | None = None) -> Callable[[], Sink]:
    """``make_sink()``: Kafka (default) or JSON-lines files in a directory (``jsonl:DIR``)."""

    if sink and sink.startswith("jsonl:"):
        directory = sink[len("jsonl:"):]
        return lambda: JsonlSink(directory)
    return lambda: KafkaSink(config)


def build_stage(config: StageConfig, *, source: str | None = None, sink: str | None = None,
                checkpoint: str | None = None, pipeline: Pipeline | None = None, ledger=None, metrics=None,
                joined: EarlyJoin | None = None, **kw):
    """A Stage over ``source``/``sink`` (Kafka unless ``jsonl:...``). ``pipeline``
    may be passed to reuse one already built (tests, benchmarks); ``joined``: a Kafka
    source that joined its group while the pipeline was built."""

    pipeline = pipeline or build_pipeline(config)
    if metrics is not None:
        for e in pipeline.entries.values():
            if e.batch_size_source is not None:
                # a batch size is chosen only for the families that take one
                size = e.certifier.batch_size  # type: ignore[attr-defined]
                metrics.set_certify_batch_size(e.name, size, e.batch_size_source)
    kw["after_commit"] = [*checkpoint_hooks(config, ledger, sink), *(kw.get("after_commit") or [])]
    return Stage(config, pipeline, source_factory(config, source, checkpoint, metrics, joined, sink),
                 sink_factory(config, sink), ledger=ledger, metrics=metrics, **kw)
