"""The one registry of certification families: everything the package knows about a family.

An entry (``Family``) carries the method name, the norms the family certifies (the first
is its native norm), the modes it runs, the parameters it takes in a policy's
``certifier`` section (with what the policy schema checks about them), the scope wording
printed with its certificates, whether the composition root measures a batch size for it,
what ``compare`` and the stage's start-up line say about it, and where its class lives.

Everything that needs the family list reads it from here: the policy schema, the factory
(``riskpipe.certify.certifier_for_policy``), the Certificate's method check and scope, the
composition root, ``compare``, ``certify --method`` and the start-up line. Nothing else
names a family or branches on a method name, so adding a family is one ``register`` call
here and a class that passes the conformance suite (``riskpipe.conformance``).

Only names, numbers and plain functions: the class is imported on first use
(``Family.load``), so reading the registry costs nothing (``riskpipe --help`` reads it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

NORMS = ("l1", "l2", "linf")
# The modes a policy may ask for; every family certifies, "decide" is a sequential test.
POLICY_MODES = ("certify", "decide")
# Fields of the certifier section that are not any one family's: a family's params may not reuse them.
SECTION_FIELDS = ("method", "mode", "norm")
# The sound-sampler grid: 2^20 levels across a value range is 16 times a 16-bit quantisation;
# the noise table grows with grid_levels * sigma / range (riskpipe.certify.normal_table bounds it).
MAX_GRID_LEVELS = 1 << 20


@dataclass(frozen=True)
class Param:
    """One field of the policy's ``certifier`` section that a family takes.

    ``type`` is int, float or str; ``choices`` are the allowed strings; ``gt``/``ge``/``lt``/``le``
    bound numbers and ``finite`` refuses inf and nan by name; a ``default`` of None makes the
    field optional. ``required``: a section of this family must set it. ``exclusive``: a section
    of another family refuses it when set away from its default. ``modes``: the policy modes it
    applies to; a section in another mode refuses it when set away from its default, saying
    ``why``. Two families that take a field of the same name declare it identically.
    """

    name: str
    type: type
    default: Any = None
    choices: tuple[str, ...] = ()
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    finite: bool = True
    required: bool = False
    exclusive: bool = False
    modes: tuple[str, ...] = ()
    why: str = ""


def _default_summary(section: Any) -> str:
    return f"{section.method} ({section.mode})"


@dataclass(frozen=True)
class Family:
    """One certification family (see the module docstring for who reads which field).

    ``factory``: ``"module:Class"``, a certifier class (``riskpipe.certify.protocol``) whose
    constructor takes the model and the section's parameters by name. ``scope(cert, norm)``:
    what a certificate of this family guarantees, ``norm`` spelled for people (``l_inf``).
    ``check(section)``: the family's own cross-field rules (ValueError naming the field).
    ``batch_probe``: thousands of model calls per input, so the composition root measures a
    batch size (``riskpipe.tuning``) before building it. ``summary(section)``: how the
    stage's start-up line names it. ``card_settings``: the section fields the ``compare``
    card shows; ``parallelism``: the card's words on how its cost spreads;
    ``compare_default``: ``compare`` runs it unless told which families to run.
    """

    name: str
    factory: str
    norms: tuple[str, ...]
    scope: Callable[[Any, str], str]
    modes: tuple[str, ...] = ("certify",)
    params: tuple[Param, ...] = ()
    check: Callable[[Any], None] | None = None
    batch_probe: bool = False
    summary: Callable[[Any], str] = _default_summary
    card_settings: tuple[str, ...] = ("norm",)
    parallelism: str = ""
    compare_default: bool = True

    def load(self) -> type:
        """The certifier class (its module imported now)."""
        module, _, name = self.factory.partition(":")
        cls: type = getattr(importlib.import_module(module), name)
        return cls

    @property
    def native_norm(self) -> str:
        return self.norms[0]


FAMILIES: dict[str, Family] = {}


def register(f: Family) -> Family:
    """Add ``f`` to the registry; ValueError when it contradicts what is there."""
    if f.name in FAMILIES:
        raise ValueError(f"method: {f.name!r} is already registered")
    if not f.norms or any(n not in NORMS for n in f.norms):
        raise ValueError(f"norms: {f.name} certifies {f.norms}, not a non-empty selection of {NORMS}")
    if "certify" not in f.modes:
        raise ValueError(f"modes: {f.name} has no certify mode; every family certifies")
    known = section_params()
    for p in f.params:
        if p.name in SECTION_FIELDS:
            raise ValueError(f"params: {f.name} redeclares the section field {p.name!r}")
        if p.name in known and known[p.name] != p:
            raise ValueError(f"params: {f.name} declares {p.name!r} unlike another family does")
        if p.modes and any(m not in POLICY_MODES for m in p.modes):
            raise ValueError(f"params: {f.name}.{p.name} applies to modes {p.modes}, not among {POLICY_MODES}")
    FAMILIES[f.name] = f
    return f


def family(method: str) -> Family:
    """The registry entry of ``method``; ValueError naming it when there is none."""
    try:
        return FAMILIES[method]
    except KeyError:
        raise ValueError(f"method: {method!r} is not one of {', '.join(FAMILIES)}") from None


def section_params(families: Mapping[str, Family] | None = None) -> dict[str, Param]:
    """Every parameter of ``families`` (the registry) by name, in registration order: the
    policy schema's family fields."""
    out: dict[str, Param] = {}
    for f in (FAMILIES if families is None else families).values():
        for p in f.params:
            out.setdefault(p.name, p)
    return out


# ---- smoothing -----------------------------------------------------------------------------
def _smoothing_scope(c: Any, norm: str) -> str:
    what = (f"{norm} radius of the Gaussian-smoothed classifier (sigma={c.sigma:g}), "
            f"holds with probability >= {1 - c.alpha:g} over the noise (alpha={c.alpha:g})")
    if c.mode == "decide" and c.epsilon is not None:
        what += f"; decides radius >= epsilon={c.epsilon:g} at that level"
    what += "; it covers the smoothed classifier, not the base model"
    if c.sampler == "sound":
        grid = c.extra.get("grid_step")
        return what + ("; sampler sound: inputs on a quantisation grid"
                       + (f" of step {grid:.6g}" if isinstance(grid, (int, float)) else "")
                       + ", noise a discretised Gaussian drawn from uniform integers, so it is floating-point "
                       "sound for inputs and perturbations on that grid")
    return what + ("; sampler gaussian: float Gaussian noise added in floating point, so the radius holds in "
                   "real arithmetic and is not floating-point sound (Voráček & Hein 2023)")


def _smoothing_check(section: Any) -> None:
    if section.sampler == "sound" and section.grid_step is not None:
        # numpy: loaded only when a sound grid is declared (riskpipe --help reads this module)
        from riskpipe.certify.normal_table import check_table  # lazy: numpy off the CLI start-up path

        check_table(section.sigma, section.grid_step)  # with grid_levels it also needs the model's range


def _smoothing_summary(c: Any) -> str:
    grid = f" grid_levels {c.grid_levels}" if c.sampler == "sound" and c.grid_levels else ""
    return f"smoothing ({c.mode}), sampler {c.sampler}{grid}, sigma {c.sigma:g}"


MAX_SAMPLES = 10**9  # noise samples per input: hours of model calls on any model


register(Family(
    "smoothing", "riskpipe.certify.smoothing:Smoothing", ("l2",), _smoothing_scope,
    modes=("certify", "predict", "decide"),
    params=(
        Param("sigma", float, gt=0.0, required=True, exclusive=True),
        # below 0.5: a statement that holds with probability 1 - alpha must be more likely than not
        Param("alpha", float, 0.001, gt=0.0, lt=0.5, finite=False),  # its bounds refuse inf; nan fails them
        # at most MAX_SAMPLES per input: 1e18 stalled the stage on every event
        Param("n0", int, 100, ge=1, le=MAX_SAMPLES),
        Param("n", int, 100_000, ge=1, le=MAX_SAMPLES),
        Param("max_samples", int, 100_000, ge=1, le=MAX_SAMPLES),
        Param("bound", str, "cp", choices=("cp", "bonferroni", "goodman"), modes=("certify",),
              why="decide uses Clopper-Pearson per look"),
        Param("sampler", str, "gaussian", choices=("gaussian", "sound"), exclusive=True),
        Param("grid_levels", int, 255, ge=1, le=MAX_GRID_LEVELS),
        Param("grid_step", float, gt=0.0, exclusive=True),
        Param("max_latency_ms", float, gt=0.0, modes=("decide",), why="certify mode has no early stop"),
    ),
    check=_smoothing_check, batch_probe=True, summary=_smoothing_summary,
    card_settings=("sigma", "alpha", "n0", "n", "sampler", "bound"),
    parallelism="Monte Carlo samples are independent: the n samples of one input split over any number of "
                "workers or devices (counts add up), so latency falls with workers; cost grows linearly in n.",
))


# ---- interval bound propagation --------------------------------------------------------------
def _ibp_scope(c: Any, norm: str) -> str:
    return (f"{norm} radius from interval bound propagation: a deterministic bound, "
            "exact arithmetic aside, for the model as deployed inside its value range; no sampler")


register(Family(
    "ibp", "riskpipe.certify.bounds:IntervalBounds", ("linf", "l2"), _ibp_scope,
    parallelism="One bound pass costs about two forward passes (centre and radius) and parallelises over inputs "
                "like a forward pass; the radius search runs its bisection passes one after the other. Memory "
                "grows with width (two activation tensors per layer, plus K x hidden margin rows per input).",
))


# ---- global Lipschitz bound ------------------------------------------------------------------
def _lipschitz_scope(c: Any, norm: str) -> str:
    return f"{norm} radius from a global Lipschitz bound: a deterministic bound for the model as deployed; no sampler"


register(Family(
    "lipschitz", "riskpipe.certify.lipschitz:GlobalLipschitz", ("l2",), _lipschitz_scope,
    parallelism="The constant is computed once per model version (per affine group, its Gram matrix solved "
                "exactly up to 2,048 inputs, a Hoelder bound beyond); after that each certificate is one forward "
                "pass, parallel over inputs, with no extra memory.",
))


# ---- tree ensembles --------------------------------------------------------------------------
def _trees_scope(c: Any, norm: str) -> str:
    return (f"{norm} radius from the leaves of every tree reachable from the l_inf box (inside the value range): "
            "a deterministic bound for the tree ensemble as deployed, exact for a single tree and conservative "
            "for an ensemble (each tree bounded on its own), up to a relative rounding allowance of 1e-6 per "
            f"threshold and a search tolerance of {c.extra.get('rel_tol', 1e-9):g} relative; no sampler")


register(Family(
    "trees", "riskpipe.certify.trees:TreeBounds", ("linf", "l2"), _trees_scope,
    parallelism="Reachable leaves are one boolean pass per tree depth over (inputs x nodes), vectorised over "
                "inputs; the radius search bisects each input's sorted threshold breakpoints (about log2 of "
                "twice the node count passes, one after the other). Memory grows with inputs x nodes; no model "
                "evaluations beyond one predict.",
    # the default compare models are torch networks, which the tree certificate cannot speak about
    compare_default=False,
))

# The family a policy or ``certify --method`` gets when it names none.
DEFAULT_METHOD = "smoothing"

__all__ = ["DEFAULT_METHOD", "FAMILIES", "MAX_GRID_LEVELS", "NORMS", "POLICY_MODES", "Family", "Param", "family",
           "register", "section_params"]
