"""Evaluate a policy on clean and attacked traffic, through the stage's own code.

For each policy: build the stage pipeline (models, certifier, context, policy) once,
attack the clean inputs with PGD at each budget in the policy's threat norm and with a
norm-shift attack in the other norm, send every sample through ``run_offline`` (the
code path the Kafka stage runs), and compute the figures in ``metrics`` from the
records the stage wrote. Nothing is decided here that the stage did not decide.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from riskpipe import json_text
from riskpipe.app.compose import build_pipeline
from riskpipe.app.config import (
    ConfigError,
    StageConfig,
    format_validation_error,
    labels_outside,
    load_config,
    read_labelled,
)
from riskpipe.app.noise_key import seeded_noise_key
from riskpipe.app.offline import run_offline
from riskpipe.attacks import ATTACK_NORMS, attack_kind
from riskpipe.certify.norms import conversion_factor
from riskpipe.evaluate import metrics
from riskpipe.evaluate.traffic import AttackSpec, SampleSet, attack_name, attacked_set, clean_set, subsample
from riskpipe.models.digits import load_split
from riskpipe.policy import load_policy

MODEL_NAME = "model"


class EvaluationError(ValueError):
    """Bad evaluation settings or data; the message names the field and the reason."""


@dataclass(frozen=True)
class Budget:
    """A budget as given: an absolute epsilon, or a multiple of a reference epsilon ("2x")."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str, what: str = "budgets") -> Budget:
        t = text.strip().lower()
        rel = t.endswith("x")
        try:
            v = float(t[:-1] if rel else t)
        except ValueError:
            raise EvaluationError(f"{what}: {text!r} is not a number or a multiple like 2x") from None
        if not np.isfinite(v) or v <= 0:
            raise EvaluationError(f"{what}: {text!r} must be > 0")
        return cls(v, rel)

    def resolve(self, reference: float) -> float:
        return self.value * reference if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value:g}x" if self.relative else f"{self.value:g}"


def parse_budgets(text: str | list[str], what: str = "budgets") -> tuple[Budget, ...]:
    parts = text.split(",") if isinstance(text, str) else list(text)
    parts = [p for p in parts if p.strip()]
    if not parts:
        raise EvaluationError(f"{what}: give at least one budget")
    return tuple(Budget.parse(p, what) for p in parts)


@dataclass(frozen=True)
class Settings:
    """What an evaluation run does. Budgets are in the policy's threat norm
    (``Nx`` = N times the policy's epsilon); norm-shift budgets are in the other norm
    (``Nx`` = N times the policy's epsilon converted by Theorem 2)."""

    model: str = "demo:digits"  # a spec, or the name of a model entry of ``config``
    config: str | None = None  # a stage config whose models: entry ``model`` is evaluated
    reference: str | None = None  # reference .npz for a spec (context risk)
    policies: tuple[str, ...] = ()
    data: str = "digits"
    n: int | None = 200
    budgets: tuple[Budget, ...] = parse_budgets("0.5x,1x,2x,4x")
    shift_budgets: tuple[Budget, ...] = parse_budgets("1x,2x,4x,8x", "shift-budgets")
    steps: int = 20
    queries: int = 1000  # black-box attacks (models without gradients or trees): model calls per input
    attempts: int | None = None  # per attacker; default a fifth of the inputs
    seed: int = 0
    device: str = "cpu"
    smoothed_attack: bool = True  # attack the smoothed classifier when the policy smooths
    upstream_risk: float | None = None  # sent with every event; None: events carry none

    def command(self) -> str:
        """The ``riskpipe evaluate`` command line that reproduces this run."""
        parts = ["riskpipe evaluate", f"--model {self.model}"]
        parts += [f"--config {self.config}"] if self.config else []
        parts += [f"--reference {self.reference}"] if self.reference else []
        parts += [f"--policy {p}" for p in self.policies]
        parts += [f"--data {self.data}", f"--n {self.n or 0}", f"--steps {self.steps}", f"--queries {self.queries}",
                  f"--budgets {','.join(map(str, self.budgets))}",
                  f"--shift-budgets {','.join(map(str, self.shift_budgets))}", f"--seed {self.seed}"]
        if self.attempts:
            parts.append(f"--attempts {self.attempts}")
        if not self.smoothed_attack:
            parts.append("--base-attack")
        if self.upstream_risk is not None:
            parts.append(f"--upstream-risk {self.upstream_risk:g}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["budgets"] = [str(b) for b in self.budgets]
        d["shift_budgets"] = [str(b) for b in self.shift_budgets]
        d["policies"] = list(self.policies)
        d["command"] = self.command()
        return d


def load_data(spec: str, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``digits`` (the demo data's test split) or an ``.npz`` file with arrays X and y."""
    if spec in ("digits", "demo:digits"):
        return load_split(split)
    p = Path(spec)
    if p.suffix != ".npz":
        raise EvaluationError(f"data: {spec!r} is neither 'digits' nor an .npz file with arrays X and y")
    if not p.is_file():
        raise EvaluationError(f"data: {spec}: file not found")
    try:  # finite numeric X, one integer label per row (float, 2-D or string labels were cast or crashed)
        X, y = read_labelled(spec)
    except ValueError as e:
        raise EvaluationError(f"data: {e}") from None
    return X.astype(np.float32), y.astype(np.int64)


@dataclass
class PolicyRun:
    """Sample sets and the stage's records for one policy."""

    policy: dict
    sets: list[SampleSet]
    audit: dict[str, dict]
    public: dict[str, dict]
    dlq_ids: set[str]
    elapsed_s: float
    summary: dict = field(default_factory=dict)


def _other_norm(norm: str) -> str:
    return next(n for n in ATTACK_NORMS if n != norm)


def _attack_specs(settings: Settings, threat_norm: str, eps: float, input_dim: int) -> list[AttackSpec]:
    specs = [AttackSpec("pgd", threat_norm, b.resolve(eps), str(b)) for b in settings.budgets]
    shift_norm = _other_norm(threat_norm) if threat_norm in ATTACK_NORMS else "linf"
    shift_ref = eps * conversion_factor(threat_norm, shift_norm, input_dim)
    specs += [AttackSpec("norm_shift", shift_norm, b.resolve(shift_ref), str(b)) for b in settings.shift_budgets]
    return specs


def _dlq_id(rec: dict) -> str | None:
    """The event id of a dead letter, when its value is a JSON object with an id."""

    value = rec.get("value")
    if isinstance(value, dict):
        return value.get("id")
    if isinstance(value, str):
        try:
            obj = json_text.loads(value)  # the dead-lettered payload: anyone's text
        except ValueError:
            return None
        return obj.get("id") if isinstance(obj, dict) else None
    return rec.get("id")


def model_entry(settings: Settings) -> dict:
    """The evaluated model's ``models:`` entry: the one named ``model`` in the stage config
    ``config`` (its reference, scale, range, labels), else ``model`` as a spec with
    ``reference``."""

    if settings.config:
        try:
            entries = load_config(settings.config).models
        except ConfigError as e:
            raise EvaluationError(str(e)) from None
        if settings.model not in entries:
            raise EvaluationError(f"model: {settings.model!r} is not a model of {settings.config} "
                                  f"(known: {', '.join(sorted(entries))})")
        return entries[settings.model].model_dump(exclude_none=True)
    return {"spec": settings.model, **({"reference": settings.reference} if settings.reference else {})}


def stage_config(settings: Settings, policy_path: str):
    """The stage config the evaluation runs: the model entry under ``policy_path``."""

    try:
        return StageConfig(models={MODEL_NAME: {**model_entry(settings), "policy": policy_path}}, policy=policy_path,
                           device=settings.device, review_include_input=False)
    except ValidationError as e:
        raise EvaluationError(format_validation_error("evaluate", e)) from None


def evaluate_policy(settings: Settings, policy_path: str, X: np.ndarray, y: np.ndarray, workdir: Path,
                    progress=None, attack_cache: dict | None = None) -> PolicyRun:
    """Send clean and attacked copies of (X, y) through the stage under one policy."""

    t0 = time.perf_counter()
    policy = load_policy(policy_path)
    config = stage_config(settings, policy_path)
    try:
        pipeline = build_pipeline(config, noise_key=seeded_noise_key(settings.seed, "riskpipe evaluate"))
    except ConfigError as e:
        if not settings.config and not settings.reference and str(e).startswith(f"models.{MODEL_NAME}.reference:"):
            # a spec without its reference set (a demo model has one): the stage's message names its
            # config key and `riskpipe run --reference NAME=PATH`
            raise EvaluationError(f"--reference: policy {policy.name} ({policy_path}) uses context risk; give the "
                                  "model's reference set (.npz with X and y) with --reference FILE") from None
        raise EvaluationError(str(e)) from None
    me = pipeline.entries[MODEL_NAME]
    if tuple(X.shape[1:]) != tuple(me.model.input_shape):
        raise EvaluationError(f"data: inputs of shape {X.shape[1:]} do not fit model input {me.model.input_shape}")
    if why := labels_outside(y, me.model.num_classes):
        raise EvaluationError(f"data: {settings.data}: {why}")
    tm = policy.threat_model
    cert = policy.certifier
    # attacks run where the certificate holds: on the certified model g(z) = f(s * z) at z = x / s
    # for a scaled tabular model (budgets in the scaled norm), mapped back to raw inputs for the stage
    model = me.certified
    gradients = attack_kind(model) == "pgd"
    sigma = me.certifier.noise_sigma  # the certified classifier's noise (None: the model itself)
    noise = float(sigma) if gradients and settings.smoothed_attack and sigma is not None else 0.0
    clean = clean_set(me.model, X, y)
    clean_z = SampleSet("clean", "clean", me.to_certified(X), y, clean.pred)
    sets = [clean]
    cache = attack_cache if attack_cache is not None else {}
    for spec in _attack_specs(settings, tm.norm, float(tm.epsilon), model.input_dim):
        key = (model.sha256, spec.kind, spec.norm, spec.epsilon, noise)
        if key not in cache:
            if progress:
                # the attack that actually runs (PGD needs gradients; else the tree or black-box search)
                progress(f"{policy.name}: {spec.name}: {attack_name(model, settings.steps, settings.queries)}, "
                         f"{spec.norm} epsilon {spec.epsilon:g}")
            seed = settings.seed + zlib.crc32(spec.name.encode())  # per attack, independent of the order
            cache[key] = attacked_set(model, clean_z, spec, steps=settings.steps, seed=seed, noise_sigma=noise,
                                      queries=settings.queries)
        adv = cache[key]
        # inputs this policy's certifier takes (the sound sampler's grid), no farther from the clean input
        # in any norm: what an attacker must send, since the stage dead-letters anything else (off_grid)
        Xz = me.certifier.admissible(clean_z.X, adv.X)
        pred = adv.pred if Xz is adv.X else model.predict(Xz)
        raw = Xz if me.scale is None else (Xz * me.scale).astype(np.float32)
        sets.append(SampleSet(spec.name, spec.kind, raw, adv.y, pred, attack=spec))
    events = [ev for s in sets for ev in s.events(MODEL_NAME, settings.upstream_risk)]
    if progress:
        progress(f"{policy.name}: {len(events)} events through the stage")
    sink = workdir / f"stage-{policy.name}"
    result = run_offline(events, sink, config, pipeline=pipeline)
    audit = {r["id"]: r for r in result.read("audit")}
    public = {r["id"]: r for r in result.read("decisions")}
    dlq = {i for i in (_dlq_id(r) for r in result.read("dlq")) if i}
    policy_info = {"name": policy.name, "version": str(policy.version), "sha256": policy.sha256, "path": policy_path,
                   "shadow": bool(getattr(policy, "shadow", False)), "threat_norm": tm.norm,
                   "threat_epsilon": float(tm.epsilon), "certifier": cert.method,
                   "sigma": getattr(cert, "sigma", None), "alpha": getattr(cert, "alpha", None),
                   "mode": getattr(cert, "mode", None), "attack_noise_sigma": noise,
                   "attack": attack_name(model, settings.steps, settings.queries),
                   "scale": me.scale_desc}  # radii, epsilon and budgets are of x / s (the scaled norm)
    run = PolicyRun(policy_info, sets, audit, public, dlq, time.perf_counter() - t0)
    run.summary = summarize(run, settings)
    return run


def summarize(run: PolicyRun, settings: Settings) -> dict:
    clean = run.sets[0]
    clean_audit = [run.audit[i] for i in clean.ids if i in run.audit]
    clean_public = [run.public[i] for i in clean.ids if i in run.public]
    attempts = settings.attempts or max(1, len(clean.ids) // 5)
    attacks = []
    for s in run.sets[1:]:
        m = metrics.attack_metrics(clean, s, run.audit, run.dlq_ids)
        if s.kind == "pgd":
            m["attackers"] = metrics.attacker_comparison(clean, s, clean_audit, clean_public, run.audit, attempts,
                                                         settings.seed, margin=run.policy["threat_epsilon"])
        else:
            m["coverage"] = metrics.coverage_metrics(clean_audit, clean, s, run.audit)
        attacks.append(m)
    return {
        "policy": run.policy,
        "clean": metrics.clean_metrics(clean, run.audit, run.dlq_ids),
        "attacks": attacks,
        "examples": adversarial_examples(clean, [s for s in run.sets[1:] if s.kind == "pgd"], run.audit),
        "elapsed_s": round(run.elapsed_s, 2),
    }


EXAMPLES = 3


def adversarial_examples(clean: SampleSet, attacked: list[SampleSet], audit: dict[str, dict]) -> list[dict]:
    """Up to ``EXAMPLES`` successful adversarial inputs of the largest threat-norm budget
    (allowed ones first: Theorem 1 made visible), each beside its clean input, for the
    report's pictures or tables."""
    if not attacked:
        return []
    s = max(attacked, key=lambda a: a.spec.epsilon)
    hits = [i for i in range(len(s.ids)) if clean.pred[i] == clean.y[i] and s.pred[i] != s.y[i] and s.ids[i] in audit]
    hits.sort(key=lambda i: audit[s.ids[i]].get("decision") != "allow")  # stable: allowed first, then input order
    return [{"id": s.ids[i], "attack": s.spec.name, "label": int(s.y[i]), "adversarial_prediction": int(s.pred[i]),
             "decision": audit[s.ids[i]].get("decision"),
             "certified": (audit[s.ids[i]].get("certificate") or {}).get("certified"),
             "shape": list(s.X.shape[1:]), "clean": clean.X[i].ravel().tolist(),
             "adversarial": s.X[i].ravel().tolist()} for i in hits[:EXAMPLES]]


def run_evaluation(settings: Settings, workdir: str | Path, progress=None) -> dict:
    """The whole evaluation as a JSON-ready dict: settings, scope and one summary per policy."""
    if not settings.policies:
        raise EvaluationError("policy: give at least one policy file")
    if settings.n is not None and settings.n < 1:
        raise EvaluationError(f"n: must be >= 1, got {settings.n}")
    if settings.upstream_risk is not None and not 0.0 <= settings.upstream_risk <= 1.0:
        raise EvaluationError(f"upstream_risk: must lie in [0, 1], got {settings.upstream_risk}")
    if settings.steps < 1:
        raise EvaluationError(f"steps: must be >= 1, got {settings.steps}")
    if settings.queries < 1:
        raise EvaluationError(f"queries: must be >= 1, got {settings.queries}")

    names = [load_policy(p).name for p in settings.policies]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise EvaluationError(f"policy: two policies are named {dup!r}; reports are keyed by name")
    X, y = load_data(settings.data)
    X, y = subsample(X, y, settings.n, settings.seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    runs = [evaluate_policy(settings, p, X, y, workdir, progress, cache) for p in settings.policies]
    return {
        "settings": settings.to_dict(),
        "n_inputs": int(len(X)),
        "input_dim": int(np.prod(X.shape[1:])),
        "definitions": metrics.DEFINITIONS.strip(),
        "policies": [r.summary for r in runs],
    }
