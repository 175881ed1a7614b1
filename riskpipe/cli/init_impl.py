"""The body of ``riskpipe init``, imported when the command runs (its options: riskpipe/cli/init_cmd.py)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import tempfile
import textwrap
import time
from pathlib import Path

import click
import numpy as np
import yaml

from riskpipe import safe_yaml
from riskpipe.app.compose import build_pipeline
from riskpipe.app.config import ConfigError, default_policy_path, load_config, read_reference, reference_feature_names
from riskpipe.app.noise_key import seeded_noise_key
from riskpipe.app.offline import run_offline
from riskpipe.cli.common import fail
from riskpipe.decisions import DECISIONS
from riskpipe.models import ModelError, load_model_for
from riskpipe.models.loader import relative_spec
from riskpipe.models.scaled import scaled_model, standardize_scale
from riskpipe.policy import PolicyError, load_policy
from riskpipe.stream.events import make_event
from riskpipe.stream.infra import InfrastructureUnavailable
from riskpipe.survey import SurveyError, check_reference, propose, propose_sampler, quantisation_grid, survey

HEADER = "# Written by `riskpipe init`; edit freely, then `riskpipe policy check {policy}`.\n"


# Below these the survey's percentiles and the sigma sweep rest on too few inputs to trust.
MIN_REFERENCE_ROWS = 300


MIN_PER_CLASS = 20


class TrialError(ValueError):
    """The trial decided none of its inputs: the written config cannot serve this model."""


def _model_name(spec: str) -> str:
    base = spec.split("?", 1)[0]
    stem = base[5:] if base.startswith("demo:") else Path(base.split("@", 1)[-1] if ":" in base else base).stem
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return name or "model"


def _load(spec: str, X):
    """The model, its input shape from the reference set when the file does not record it (a plain
    TorchScript file); returns (model, spec as written to the config)."""

    model = load_model_for(spec, X.shape[1:])
    return model, model.spec


def _config_path(value: str, out: Path) -> str:
    """A file path as the config reads it: relative to the config's directory (README: paths
    in the config are relative to it), so the config, its model and its reference set move
    together."""

    return os.path.relpath(Path(value).resolve(), out.resolve())


def _declared_range(model, X, tabular: bool):
    """[lo, hi] to declare for image-like inputs that lie in [0, 1] or [0, 255] (inputs outside
    go to the DLQ as out_of_range); None for tabular inputs or a model that declares its own."""
    if tabular or model.value_range is not None or X.min() < 0:
        return None
    for hi in (1.0, 255.0):
        if X.max() <= hi:
            return [0.0, hi]
    return None


RANGE_MARGIN = 0.5  # the written range: the reference's [min, max] widened by half its span on each side


def _reference_range(X, tabular: bool) -> list:
    """The range to declare when the model and the data suggest none: the reference
    set's [min, max] widened by RANGE_MARGIN x (max - min) on each side (a value the
    reference never varies gets max(|value| / 2, 1)). Per feature for a tabular model,
    one pair over all values otherwise. Inputs outside it go to the DLQ (out_of_range);
    inputs inside it but far from every reference input are the support signal's."""

    flat = X.reshape(len(X), -1) if tabular else X.reshape(-1, 1)  # per feature, or one column of all values
    flat = flat.astype(np.float64)
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    span = hi - lo
    margin = np.where(span > 0, RANGE_MARGIN * span, np.maximum(np.abs(hi) / 2, 1.0))
    pairs = [_outward(a, b, x, z) for a, b, x, z in zip(lo - margin, hi + margin, lo, hi)]
    return pairs if tabular else pairs[0]


def _outward(a: float, b: float, lo: float, hi: float) -> list:
    """[a, b] written with the fewest significant digits (6 at least) that still hold every
    reference value [lo, hi]: 6 digits of a feature like 1.7e9 + seconds round it to 1.7e9."""
    for digits in range(6, 18):
        ra, rb = float(f"{a:.{digits}g}"), float(f"{b:.{digits}g}")
        if ra <= lo and rb >= hi and ra < rb:
            return [ra, rb]
    return [float(a), float(b)]


class _Pair(list):
    """A [lo, hi] pair, written on one line."""


def _dumper():
    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Pair, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    return Dumper


def _scalar_range(model, declared):
    """(lo, hi) the stage will check inputs against, when it is one pair of scalars."""

    rng = declared or model.value_range
    if rng is None or any(np.ndim(v) != 0 for v in rng):
        return None
    return float(rng[0]), float(rng[1])


def policy_version(policy: dict, today=None) -> str:
    """``YYYY.MM.DD+`` the first 8 hex digits of the sha256 of the policy's content (without
    its version): two policies init writes for different models, or on different days, never
    share a version, and the same content written the same day keeps it."""

    content = {**policy, "metadata": {k: v for k, v in policy["metadata"].items() if k != "version"}}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{(today or datetime.date.today()):%Y.%m.%d}+{digest}"


def _stage_identity(name: str, out: Path) -> dict:
    """A consumer group, topic names and a ledger path of this stage's own, so two stages
    written by ``init`` never take each other's traffic: named after the model and a
    digest of the config's directory (stable when init is re-run in the same place)."""

    stage = f"{name}-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]}"
    return {"group_id": f"riskpipe-{stage}",
            "topics": {t: f"riskpipe.{stage}.{suffix}" for t, suffix in
                       (("input", "inferences"), ("decisions", "decisions"), ("review", "review"), ("audit", "audit"),
                        ("dlq", "dlq"))},
            "ledger": "ledger.sqlite"}


def _policy(base: dict, name: str, spec: str, proposal, sampler, dim: int, tabular: bool) -> dict:
    pol = {**base}
    pol["metadata"] = {**base["metadata"], "name": name[:63],
                       "description": f"Written by riskpipe init for {spec}."}
    unit = "standardized units, ||delta / s||_2 with s the per-feature std of the reference set" if tabular \
        else "input units"
    pol["threat_model"] = {"norm": "l2", "epsilon": proposal.epsilon,
                           "description": f"l2-bounded perturbations of the {dim}-value input in {unit}."}
    pol["certifier"] = {**base["certifier"], "sigma": proposal.sigma, "sampler": sampler.sampler}
    if sampler.grid_levels is not None:
        pol["certifier"]["grid_levels"] = sampler.grid_levels
    pol["metadata"] = {"name": pol["metadata"]["name"], "version": policy_version(pol),
                       **{k: v for k, v in pol["metadata"].items() if k not in ("name", "version")}}
    return pol


def _certified_in_threat(c: dict) -> bool:
    """decide mode: the certificate's own answer at epsilon; certify mode: radius vs epsilon."""
    if c.get("certified") is not None:
        return bool(c["certified"])
    return not c["abstained"] and c["radius_threat"] >= c["threat_epsilon"]


TRIAL_OUTAGE_S = 30.0


def _trial(config_path: Path, name: str, X, n: int, seed: int) -> str:
    """Decide ``n`` reference inputs with the written config, offline; a one-line summary."""

    idx = np.random.default_rng(seed).permutation(len(X))[:n]
    events = [make_event(f"init-trial-{i}", name, X[i], upstream_risk=0.0) for i in idx]
    t0 = time.perf_counter()
    # a trial leaves no ledger rows, and waits at most TRIAL_OUTAGE_S for memory (riskpipe.stream.infra)
    config = load_config(str(config_path)).model_copy(update={"ledger": None,
                                                              "infrastructure_timeout_s": TRIAL_OUTAGE_S})
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = build_pipeline(config, noise_key=seeded_noise_key(seed, "riskpipe init"))
        res = run_offline(events, tmp, config, pipeline=pipeline)
        audit = res.read("audit")
        dead = res.read("dlq") if not audit else []
    if not audit:
        first = dead[0]["headers"] if dead else {}
        raise TrialError(f"trial: 0 of {len(events)} reference inputs decided with {config_path}; "
                         f"dead-lettered {_counts(res.stats.dlq)}"
                         + (f" (first: {first.get('__riskpipe.errors.reason')}: "
                            f"{first.get('__riskpipe.errors.message')})" if first else ""))
    decisions = {d: sum(r["decision"] == d for r in audit) for d in DECISIONS}
    certified = sum(_certified_in_threat(r["certificate"]) for r in audit)
    dlq = f"; dead-lettered {_counts(res.stats.dlq)}" if res.stats.dlq else ""
    return (f"trial: {len(audit)} of {len(events)} reference inputs decided with {config_path} in "
            f"{time.perf_counter() - t0:.1f} s (upstream risk 0): allow {decisions['allow']}, review "
            f"{decisions['review']}, block {decisions['block']}; certified in the threat model "
            f"{certified}/{len(audit)}{dlq}")


def _counts(by_reason: dict) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items()))


def reference_warnings(n_rows: int, class_counts: dict) -> list[str]:
    """What makes a reference set too small to base sigma and epsilon on."""
    out = []
    if n_rows < MIN_REFERENCE_ROWS:
        out.append(f"the reference set has {n_rows} rows, below {MIN_REFERENCE_ROWS}: the distance percentiles "
                   f"and the noise sweep rest on few inputs; add held-out rows")
    small = {c: k for c, k in sorted(class_counts.items()) if k < MIN_PER_CLASS}
    if small:
        out.append(f"classes with fewer than {MIN_PER_CLASS} reference rows: "
                   + ", ".join(f"{c}: {k}" for c, k in small.items())
                   + "; their nearest-other-class distances and context are unreliable")
    return out


def init(spec, reference, out_dir, name, trial, seed, force):
    name = name or _model_name(spec)
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):  # short enough for the topic names made of it
        fail(f"--name {name[:100]!r}: use at most 64 lower-case letters, digits, '.', '_' and '-'")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # before the survey's minutes, not after
        fail(f"--out {out}: exists and is not a directory")
    config_path, policy_path = out / "riskpipe.yaml", out / "policy.yaml"
    for p in (config_path, policy_path):
        if p.exists() and not force:
            fail(f"{p}: exists; pass --force to overwrite")
    try:
        X, y = read_reference(reference)
        feature_names = reference_feature_names(reference)
        model, spec = _load(spec, X)
        X, y = check_reference(X, y, tuple(model.input_shape), model.num_classes, source=reference)
    except (ValueError, ModelError) as e:  # SurveyError and read_reference's errors are ValueErrors
        fail(str(e))
    tabular = len(model.input_shape) == 1
    certified, Z = model, X
    if tabular:
        s = standardize_scale(X)
        certified = scaled_model(model, s, "standardize(reference)")
        Z = X / s.astype(np.float32)
    base = safe_yaml.load(Path(default_policy_path()).read_text(encoding="utf-8"))
    try:
        sv = survey(certified.predict, X, Z, y, model.num_classes, seed=seed)
    except (SurveyError, ModelError) as e:  # ModelFault: the model's output broke its contract (NaN, ...)
        fail(f"{e} (surveying {reference})" if isinstance(e, ModelError) else str(e))
    proposal = propose(sv, base["certifier"]["alpha"], base["certifier"]["max_samples"], scaled=tabular)
    declared = _declared_range(model, X, tabular)
    value_range = None if tabular else _scalar_range(model, declared)
    grid = quantisation_grid(X, *value_range) if value_range else None
    sampler = propose_sampler(grid, X.size, value_range, tabular)

    click.echo(f"model {spec}: input shape {list(model.input_shape)}, {model.num_classes} classes"
               f"{', tabular: scale standardize (per-feature std of the reference set)' if tabular else ''}")
    click.echo(f"reference {reference}: {sv.n_reference} inputs, class counts {sv.class_counts}, values in "
               f"[{sv.value_min:.4g}, {sv.value_max:.4g}], clean accuracy {sv.clean_accuracy:.3f}")
    for w in reference_warnings(sv.n_reference, sv.class_counts):
        click.echo(f"warning: {w}", err=True)
    for d in sv.distances.values():
        click.echo(f"  nearest other-class input ({d.norm}{', scaled' if tabular else ''}): p5 {d.p5:.4g}, "
                   f"p25 {d.p25:.4g}, median {d.median:.4g} (over {d.n} inputs)")
    click.echo(f"  noisy accuracy on {sv.sweep_inputs} inputs ({sv.sweep_seconds:.1f} s): "
               + ", ".join(f"sigma {p.sigma:g}: {p.accuracy:.3f}" for p in sv.sweep))
    reasons = proposal.reasons + sampler.reasons
    for r in reasons:
        click.echo(f"chose {r}")
    for r in proposal.notes:
        click.echo(f"note: {r}")

    out.mkdir(parents=True, exist_ok=True)
    policy = _policy(base, name, spec, proposal, sampler, model.input_dim, tabular)
    comments = "".join(f"# {line}\n" for r in reasons + proposal.notes for line in _wrap(r))
    policy_path.write_text(HEADER.format(policy=policy_path) + comments
                           + yaml.safe_dump(policy, sort_keys=False, allow_unicode=True), encoding="utf-8")
    try:
        load_policy(str(policy_path))
    except PolicyError as e:
        fail(f"the written policy does not pass policy check (a bug in init): {e}")
    entry = {"spec": relative_spec(spec, out), "reference": _config_path(reference, out), "policy": "policy.yaml"}
    if tabular:
        entry["scale"] = "standardize"
    written_range = declared or (None if model.value_range is not None else _reference_range(X, tabular))
    if written_range:
        entry["range"] = ([_Pair(p) for p in written_range] if isinstance(written_range[0], list)
                          else _Pair(written_range))
    if feature_names is not None:
        entry["feature_names"] = feature_names
    config = {"bootstrap_servers": "127.0.0.1:9092", "create_topics": True, **_stage_identity(name, out),
              "policy": "policy.yaml", "models": {name: entry}}
    config_path.write_text(HEADER.format(policy=policy_path)
                           + "# Events name the model `" + name + "`. Add `labels: [...]` (class names) under it.\n"
                           + "# create_topics suits the embedded broker (`riskpipe broker`); drop it for your Kafka.\n"
                           + "# group_id, topics and ledger are this stage's own (the ledger file next to this "
                             "config);\n"
                           + "# point topics.input at your inference topic, ledger at a shared postgresql:// DSN.\n"
                           + yaml.dump(config, Dumper=_dumper(), sort_keys=False), encoding="utf-8")
    click.echo(f"wrote {policy_path} (policy check passes) and {config_path}"
               + (f"; declared input range {declared}" if declared else "")
               + ("" if declared or not written_range else
                  f"; declared input range: the reference's [min, max] widened by {RANGE_MARGIN:g} x its span on "
                  f"each side{', per feature' if tabular else ''} (outside it: DLQ out_of_range)"))
    if trial:
        try:
            click.echo(_trial(config_path, name, X, trial, seed))
        except TrialError as e:
            fail(f"{e}; the config and policy are written, but the stage would dead-letter this model's inputs")
        except (ConfigError, PolicyError, ValueError) as e:
            fail(f"the written config does not run: {e}")
        except InfrastructureUnavailable as e:
            fail(f"trial: {e}; the config and policy are written", code=4)
    click.echo(f"next: riskpipe run --config {config_path} --bootstrap-servers HOST:PORT   "
               f"(or --source jsonl:EVENTS --sink jsonl:OUT)")


def _wrap(text: str, width: int = 96) -> list[str]:
    return textwrap.wrap(text, width)
