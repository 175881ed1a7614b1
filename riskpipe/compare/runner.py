"""Run the certification families side by side and collect the report card's numbers.

For each model and method: certify a labelled subset once (native norm), convert
every radius to each requested norm with Theorem 2 (``convert_radius``), and read
certified accuracy off the epsilon grid; time single inputs for latency, measure
peak memory, and sweep batch size and model width for cost growth. The model's
strongest attack (``riskpipe.attacks.attack_model``: PGD for torch models, the tree
search for tree ensembles, score- or decision-based black-box attacks otherwise) gives
the empirical robust accuracy, an upper bound no certificate can beat.

Any model works: a family that cannot certify a model (bounds need a plain
``nn.Sequential`` torch module; scikit-learn and ONNX models have none) is reported
as unavailable for it with the reason, and the other families still run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from riskpipe import attacks
from riskpipe.app.compose import build_entry
from riskpipe.app.config import labels_outside, load_config
from riskpipe.certify import certifier_for_policy
from riskpipe.certify.families import FAMILIES, family
from riskpipe.certify.norms import check_norm, conversion_factor, convert_radius
from riskpipe.compare.defaults import DEFAULT_GRID, DEFAULT_METHODS, DEFAULT_MODELS
from riskpipe.compare.measure import peak_memory, summary_ms, timed
from riskpipe.models import check_inputs, load_model_for
from riskpipe.models.base import Model, sha256_state_dict
from riskpipe.models.demo import digits_cnn
from riskpipe.models.digits import load_split
from riskpipe.policy import load_policy
from riskpipe.policy.schema import Certifier


@dataclass
class CompareConfig:
    """What ``riskpipe compare`` runs; checked at construction."""

    models: tuple[str, ...] = DEFAULT_MODELS
    methods: tuple[str, ...] = DEFAULT_METHODS
    norms: tuple[str, ...] = ("l2", "linf")
    eps_grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_GRID))
    limit: int = 100
    n_samples: int = 1000
    n0: int = 64
    sigma: float = 0.25
    alpha: float = 0.001
    timing_inputs: int = 10
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    widths: tuple[int, ...] = (4, 8, 16, 32)
    pgd_steps: int = 10
    attack_queries: int = 1000  # black-box attacks (models without gradients or trees): model calls per input
    seed: int = 0
    device: str = "cpu"
    config: str | None = None  # a stage config: a model NAME of its models: entries is built as the stage does

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: give at least one model")
        bad = [m for m in self.methods if m not in FAMILIES]
        if bad or not self.methods:
            raise ValueError(f"methods: {bad or 'none'} not among {', '.join(FAMILIES)}")
        self.norms = tuple(check_norm(n) for n in self.norms)
        bad = [n for n in self.norms if n not in ("l2", "linf")]
        if bad or not self.norms:
            raise ValueError(f"norms: {bad or 'none'}; the card compares l2 and linf")
        for n in self.norms:
            grid = self.eps_grid.get(n)
            if not grid:
                raise ValueError(f"eps_grid: no epsilon values for norm {n}")
            if any(not (math.isfinite(e) and e >= 0) for e in grid):
                raise ValueError(f"eps_grid: values for {n} must be finite and >= 0, got {list(grid)}")
            self.eps_grid[n] = tuple(sorted(set(float(e) for e in grid)))
        for name in ("limit", "n_samples", "n0", "timing_inputs", "pgd_steps", "attack_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if any(b < 1 for b in self.batch_sizes) or any(w < 1 for w in self.widths):
            raise ValueError("batch_sizes and widths: must be >= 1")
        if not self.sigma > 0 or not 0 < self.alpha < 1:
            raise ValueError(f"sigma: must be > 0 and alpha in (0, 1), got {self.sigma}, {self.alpha}")


def certifier_section(method: str, cfg: CompareConfig, policy=None):
    """The family's certifier section in certify mode. With ``policy`` (the model's policy in
    the stage config, ``compare --config``) its own family keeps the policy's settings (sigma,
    alpha, n0, sampler and grid, bound, norm), so the card measures what the stage certifies;
    ``--n-samples`` stays the estimation budget. Otherwise the command's flags, at the
    family's native norm."""

    values = {"sigma": cfg.sigma, "alpha": cfg.alpha, "n0": cfg.n0}
    if policy is not None and policy.certifier.method == method:
        values = policy.certifier.model_dump(exclude={"method", "mode", "max_samples", "max_latency_ms"})
    return Certifier.for_method(method, **{**values, "n": cfg.n_samples, "mode": "certify"})


def _certifier(model, method: str, cfg: CompareConfig, policy=None):
    """Each family in certify mode (see ``certifier_section``); Lipschitz without an abstain threshold."""
    return certifier_for_policy(model, certifier_section(method, cfg, policy), batch_size=4096, epsilon=0.0)


def _certify_all(cert, X: np.ndarray, seed: int, bar=None):
    out = []
    step = cert.inputs_per_call
    for s in range(0, len(X), step):
        xb = X[s:s + step]
        out += cert.run("certify", xb, [seed + s + i for i in range(len(xb))])
        if bar is not None:
            bar.update(len(xb))
    return out


def certified_accuracy(certs, y: np.ndarray, native: str, norm: str, grid, d: int) -> list[float]:
    """Fraction of inputs certified with the right class at radius >= eps (radius in ``norm``)."""
    radius = np.array([convert_radius(c.radius, native, norm, d) for c in certs])
    good = np.array([(not c.abstained) and c.predicted_class == t for c, t in zip(certs, y)])
    return [float(np.mean(good & (radius >= e))) for e in grid]


def attack_name(model, cfg: CompareConfig) -> str:
    return attacks.attack_name(model, cfg.pgd_steps, cfg.attack_queries)


def _pgd_accuracy(model, X: np.ndarray, y: np.ndarray, norm: str, grid, cfg: CompareConfig) -> list[float]:
    """Accuracy under attack at each epsilon: the model's strongest attack (``attacks.attack_model``)."""
    out = []
    for e in grid:
        xa = attacks.attack_model(model, X, y, e, norm, steps=cfg.pgd_steps, seed=cfg.seed,
                                  queries=cfg.attack_queries)
        correct = model.predict(xa) == y
        out.append(float(np.mean(correct)))  # float64 like certified_accuracy: a float32 mean of 23/24 is lower
    return out


def unavailable(method: str, reason: str, cfg: CompareConfig) -> dict:
    """A family that cannot certify this model: every number n/a, the reason stated."""
    return {
        "method": method, "native_norm": None, "unavailable": reason, "settings": None,
        "certified_accuracy": {n: [None] * len(cfg.eps_grid[n]) for n in cfg.norms},
        "conversion_factor": dict.fromkeys(cfg.norms), "abstain_rate": None, "median_radius_native": None,
        "latency_ms": {"median": None, "p90": None, "n": 0}, "amortized_ms": None, "total_ms": None, "setup_ms": None,
        "evaluations_per_input": None, "memory": {"rss_peak_mb": None, "cuda_peak_mb": None},
        "parallelism": family(method).parallelism,
    }


def _ready_certifier(model, method: str, cfg: CompareConfig, probe: np.ndarray, policy=None):
    """(certifier, one-time setup ms, None) after one probe input, or (None, None, reason)
    when the family cannot certify ``model``."""
    try:
        cert = _certifier(model, method, cfg, policy)
        setup_ms = timed(cert.prepare, cfg.device)
        cert.run("certify", probe[:1], [cfg.seed])
    except (ValueError, TypeError) as e:  # ModelError is a ValueError: e.g. no nn.Sequential module
        return None, None, str(e)
    return cert, setup_ms, None


def _method_run(model, method: str, X, y, cfg: CompareConfig, policy=None, bar=None) -> dict:
    cert, setup_ms, reason = _ready_certifier(model, method, cfg, X, policy)
    if cert is None:
        return unavailable(method, reason, cfg)
    d = model.input_dim
    with peak_memory(cfg.device) as mem:
        t0 = time.perf_counter()
        if bar is None:
            certs = _certify_all(cert, X, cfg.seed)
        else:
            with bar(len(X), method) as b:
                certs = _certify_all(cert, X, cfg.seed, b)
        total_ms = (time.perf_counter() - t0) * 1e3
    lat = [timed(lambda i=i: cert.certify_batch(X[i:i + 1], [cfg.seed + i]), cfg.device)
           for i in range(min(cfg.timing_inputs, len(X)))]
    native = cert.norm
    return {
        "method": method, "native_norm": native, "unavailable": None,
        "settings": _settings(certifier_section(method, cfg, policy), policy),
        "certified_accuracy": {n: certified_accuracy(certs, y, native, n, cfg.eps_grid[n], d) for n in cfg.norms},
        "conversion_factor": {n: conversion_factor(native, n, d) for n in cfg.norms},
        "abstain_rate": float(np.mean([c.abstained for c in certs])),
        "median_radius_native": float(np.median([c.radius for c in certs])),
        "latency_ms": summary_ms(lat),
        "amortized_ms": total_ms / len(X),
        "total_ms": total_ms, "setup_ms": setup_ms,
        "evaluations_per_input": float(np.mean([c.n_samples for c in certs])),
        "memory": mem,
        "parallelism": family(method).parallelism,
    }


def _settings(section, policy) -> str:
    """What the card says each family ran with, and where the settings came from."""
    own = ", ".join(f"{k} {getattr(section, k)}" for k in family(section.method).card_settings
                    if getattr(section, k) is not None)
    where = (f"policy {policy.name} v{policy.version}" if policy is not None and policy.certifier.method ==
             section.method else "command-line options")
    return f"{own or 'native norm'} (from {where})"


def _batch_sweep(model, method: str, X, cfg: CompareConfig, policy=None) -> list[dict]:
    cert, _, _ = _ready_certifier(model, method, cfg, X, policy)  # the one-time cost is reported separately
    if cert is None:
        return []
    rows = []
    for b in cfg.batch_sizes:
        xb = np.resize(X, (b,) + X.shape[1:])
        ms = timed(lambda: cert.certify_batch(xb, list(range(b))), cfg.device)
        rows.append({"batch_size": b, "ms_per_input": ms / b})
    return rows


def _width_sweep(method: str, cfg: CompareConfig) -> list[dict]:
    """Cost per input on the demo CNN family (``digits_cnn(width)``, seeded random weights:
    cost does not depend on the weights) on demo digits, whatever the user's model."""

    rows = []
    X = load_split("test")[0]
    xb = X[:16]
    for w in cfg.widths:
        torch.manual_seed(cfg.seed)
        module = digits_cnn(w).eval().to(cfg.device)
        m = Model(spec=f"digits_cnn(width={w})", input_shape=tuple(X.shape[1:]), num_classes=10,
                  sha256=sha256_state_dict(module), module=module, device=cfg.device)
        try:
            cert = _certifier(m, method, cfg)
        except ValueError:  # a family that cannot certify this CNN (trees) has no width sweep
            return []
        setup = timed(cert.prepare, cfg.device)
        with peak_memory(cfg.device) as mem:
            ms = timed(lambda: cert.certify_batch(xb, list(range(len(xb)))), cfg.device)
        fwd = timed(lambda: m.predict(xb), cfg.device, repeat=3)
        rows.append({"width": w, "params": int(sum(p.numel() for p in module.parameters())),
                     "ms_per_input": ms / len(xb), "forward_ms_per_input": fwd / len(xb), "setup_ms": setup,
                     "memory": mem})
    return rows


def _certified_view(spec: str, X: np.ndarray, cfg: CompareConfig):
    """(model, inputs, scale description) as certified: a model entry of ``cfg.config``
    (NAME) is built as the stage builds it (declared range, ``scale``: inputs go to
    z = x / s and every radius is in the scaled norm); anything else is a spec."""

    if cfg.config:
        config = load_config(cfg.config, device=cfg.device)
        if spec in config.models:
            entry = build_entry(spec, config.models[spec], load_policy(config.model_policy(spec)), device=cfg.device)
            return entry.certified, entry.to_certified(check_inputs(X, entry.model)), entry.scale_desc, entry.policy
    model = load_model_for(spec, X.shape[1:], device=cfg.device)
    return model, check_inputs(X, model), None, None


def run_compare(cfg: CompareConfig, X: np.ndarray | None = None, y: np.ndarray | None = None,
                log=lambda msg: None, bar=None, data_name: str = "user data") -> dict:
    """Everything the report card shows, as plain data (JSON-serialisable). ``bar(total, desc)``
    (the CLI's terminal progress bar) counts the inputs each family certifies."""

    t_start = time.perf_counter()
    if X is None:
        X, y = load_split("test")
        data_name = "demo digits, test split"
    X, y = np.asarray(X)[: cfg.limit], np.asarray(y)[: cfg.limit]
    models: list[dict[str, Any]] = []
    first: tuple[Any, np.ndarray, Any] | None = None  # (model, its inputs, its policy)
    for spec in cfg.models:
        log(f"model {spec}")
        model, Xc, scale, policy = _certified_view(spec, X, cfg)
        if why := labels_outside(y, model.num_classes):  # out of range: an IndexError, negative: miscounted
            raise ValueError(f"data {data_name}: {why} of {spec}")
        first = first or (model, Xc, policy)
        with torch.no_grad():
            clean = float(np.mean(model.predict(Xc) == y))
        runs = []
        for method in cfg.methods:
            log(f"  {method}")
            runs.append(_method_run(model, method, Xc, y, cfg, policy, bar))
        pgd_acc = {n: _pgd_accuracy(model, Xc, y, n, cfg.eps_grid[n], cfg) for n in cfg.norms}
        models.append({"spec": spec, "sha256": model.sha256, "input_dim": model.input_dim, "scale": scale,
                       "clean_accuracy": clean, "pgd_accuracy": pgd_acc, "attack": attack_name(model, cfg),
                       "methods": runs})
    if first is None:
        raise ValueError("models: give at least one model to compare")
    first_model, Xf, first_policy = first
    log("cost sweeps")
    sweeps = {m: {"batch": _batch_sweep(first_model, m, Xf, cfg, first_policy), "width": _width_sweep(m, cfg)}
              for m in cfg.methods}
    fwd = timed(lambda: first_model.predict(Xf), cfg.device, repeat=3) / len(Xf)
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "data": {"name": data_name, "n": int(len(X)), "input_dim": int(np.prod(X.shape[1:]))},
        "models": models,
        "sweeps": {"model": cfg.models[0], "forward_ms_per_input": fwd, **sweeps},
        "environment": {"device": cfg.device, "torch": torch.__version__, "threads": torch.get_num_threads()},
        "total_s": time.perf_counter() - t_start,
    }
