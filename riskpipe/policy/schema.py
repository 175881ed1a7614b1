"""The policy schema (pydantic v2, frozen, strict): a loaded Policy is always valid.

Field-by-field documentation lives in ``policies/README.md``. Cross-field checks that
need the whole policy (rule ids, the never-allow-uncertified invariant) run in
``Policy``'s after-validator and raise ``SemanticProblems`` carrying field paths, which
the loader maps to file lines.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, create_model, model_validator

from riskpipe.certify.families import (
    DEFAULT_METHOD,
    FAMILIES,
    POLICY_MODES,
    SECTION_FIELDS,
    Family,
    Param,
    section_params,
)
from riskpipe.certify.norms import check_norm, conversion_factor
from riskpipe.policy.controls import check_control
from riskpipe.policy.evaluate import evaluate
from riskpipe.policy.fields import check_condition
from riskpipe.policy.rules import analyse, describe_facts

if TYPE_CHECKING:
    from riskpipe.certify.certificate import Certificate
    from riskpipe.policy.evaluate import Decision

SECRET_FIELDS = ("radius", "radius_threat", "p_lower", "p_upper", "probabilities", "score", "signals",
                 "certificate", "context", "explanation", "upstream_risk", "input", "prediction")
PUBLIC_FIELDS = ("id", "ts", "event_ts", "decision", "policy_version", "policy_name", "model_name", "rule",
                 "reasons", "controls", "shadow")
DEFAULT_PUBLIC = ("id", "ts", "decision", "policy_version")


class SemanticProblems(Exception):
    """Cross-field problems: a list of (path tuple, reason)."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        super().__init__("; ".join(r for _, r in problems))
        self.problems = problems


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


Ident = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
ReasonCode = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
ControlRef = Annotated[str, AfterValidator(check_control)]
Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


class Metadata(_Frozen):
    name: Ident
    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")]
    owner: Annotated[str, Field(min_length=1, max_length=200)]
    description: str = ""


class ThreatModel(_Frozen):
    norm: Annotated[str, AfterValidator(check_norm)]
    epsilon: Positive
    description: str = ""


class CertifierSection(_Frozen):
    """The policy's ``certifier`` section: ``method``, ``mode``, ``norm`` and the parameters of
    the families in the registry (``riskpipe.certify.families``), checked as each family's
    entry says. ``Certifier`` is this model with the registry's fields, built by
    ``certifier_section``; family parameters are attributes named as in the registry."""

    families: ClassVar[Mapping[str, Family]]

    if TYPE_CHECKING:  # the fields are the registry's (certifier_section)
        method: str
        mode: str
        norm: str | None

        def __getattr__(self, name: str) -> Any: ...

    @model_validator(mode="after")
    def _method_params(self) -> CertifierSection:
        fam = self.families[self.method]
        own = {p.name for p in fam.params}
        for p in fam.params:
            if p.required and getattr(self, p.name) is None:
                raise ValueError(f"{p.name}: required for method {self.method}")
        for other in self.families.values():
            for p in other.params:
                if p.exclusive and p.name not in own and getattr(self, p.name) != p.default:
                    raise ValueError(f"{p.name}: applies to method {other.name} only, not {self.method}")
        if self.mode not in fam.modes:  # every family certifies (families.register): this is decide
            raise ValueError(f"mode: decide is a sequential test of randomized smoothing; method {self.method} "
                             "gives a deterministic radius, use mode certify")
        if fam.check is not None:
            fam.check(self)
        for p in section_params(self.families).values():
            if p.modes and self.mode not in p.modes and getattr(self, p.name) != p.default:
                raise ValueError(f"{p.name}: applies to mode {' or '.join(p.modes)} only ({p.why})")
        if self.norm is not None and self.norm not in fam.norms:
            raise ValueError(f"norm: method {self.method} certifies {' or '.join(fam.norms)}, not {self.norm}")
        return self

    @property
    def certificate_norm(self) -> str:
        """The norm of the certificates: the policy's ``norm``, else the family's native norm."""
        return self.norm or self.families[self.method].native_norm

    @classmethod
    def for_method(cls, method: str, **values: Any) -> CertifierSection:
        """A section for ``method`` from options that may belong to other methods (command-line
        flags, a recorded certificate): keeps the fields this method takes, drops None, and
        validates the rest. A recorded ``mode: bound`` is certify mode of a deterministic family."""
        fam = cls.families.get(method)
        takes = set(SECTION_FIELDS) | {p.name for p in (fam.params if fam else ())}
        keep = {k: v for k, v in values.items() if k in takes and v is not None}
        if keep.get("mode") == "bound":
            keep["mode"] = "certify"
        return cls(**{**keep, "method": method})


def _annotation(p: Param) -> Any:
    """The pydantic type of a registry parameter."""
    if p.choices:
        t: Any = Literal[p.choices]
    else:
        bounds = {k: getattr(p, k) for k in ("gt", "ge", "lt", "le") if getattr(p, k) is not None}
        if p.type is float and p.finite:
            bounds["allow_inf_nan"] = False
        t = Annotated[p.type, Field(**bounds)] if bounds else p.type
    return t if p.default is not None else t | None


def certifier_section(families: Mapping[str, Family] = FAMILIES) -> type[CertifierSection]:
    """The certifier-section model of ``families`` (the registry as it is now, by default):
    ``method`` one of their names, then every family parameter as an optional field."""
    fields: dict[str, Any] = {
        "method": (Literal[tuple(families)], DEFAULT_METHOD),
        "mode": (Literal[POLICY_MODES], "certify"),
        "norm": (Annotated[str, AfterValidator(check_norm)] | None, None),
    }
    for p in section_params(families).values():
        fields[p.name] = (_annotation(p), p.default)
    model = create_model("Certifier", __base__=CertifierSection, __module__=__name__, **fields)
    model.families = dict(families)
    return model


if TYPE_CHECKING:
    Certifier = CertifierSection
else:
    Certifier = certifier_section()


class CertificateRiskSignal(_Frozen):
    function: Literal["exponential", "linear"] = "exponential"
    half_life: Positive = 1.0
    zero_at: Positive = 2.0


class UpstreamRiskSignal(_Frozen):
    default: Unit


class ContextRiskSignal(_Frozen):
    enabled: bool = True
    ratio_weight: Unit = 0.5
    default: Unit = 0.5


class SupportRiskSignal(_Frozen):
    """Distance to the reference set's support (policy.signals.support_risk); off unless enabled."""
    enabled: bool = False
    quantile: Annotated[float, Field(ge=0.5, le=1.0, allow_inf_nan=False)] = 0.99
    factor: Annotated[float, Field(ge=1.0, le=1e6, allow_inf_nan=False)] = 2.0
    default: Unit = 1.0


class Signals(_Frozen):
    certificate_risk: CertificateRiskSignal = CertificateRiskSignal()
    upstream_risk: UpstreamRiskSignal
    context_risk: ContextRiskSignal = ContextRiskSignal()
    support_risk: SupportRiskSignal = SupportRiskSignal()


MIN_WEIGHT, MAX_WEIGHT = 1e-6, 1e6  # a score weight is 0 or in this range (Score._bounded)


class Weights(_Frozen):
    certificate_risk: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0
    upstream_risk: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0
    context_risk: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0


class Score(_Frozen):
    combiner: Literal["weighted_mean", "max", "noisy_or"]
    weights: Weights = Weights()

    @model_validator(mode="after")
    def _bounded(self) -> Score:
        w = self.weights.model_dump()
        if sum(w.values()) <= 0:
            raise ValueError("weights: at least one weight must be > 0")
        odd = [k for k, v in w.items() if v != 0 and not MIN_WEIGHT <= v <= MAX_WEIGHT]
        if odd:  # 1e308 made the weighted mean inf / inf; 1e-320 loses the score to rounding
            raise ValueError(f"weights: each is 0 or in [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}] (they are relative: "
                             f"scale them), not {', '.join(f'{k} {w[k]:g}' for k in odd)}")
        if self.combiner != "weighted_mean":
            over = [k for k, v in w.items() if v > 1.0]
            if over:
                raise ValueError(f"weights: {self.combiner} needs every weight in [0, 1] to stay bounded "
                                 f"({', '.join(over)} > 1)")
        return self


class Condition(_Frozen):
    field: str
    op: Literal["eq", "ne", "lt", "le", "gt", "ge"]
    value: bool | float

    @model_validator(mode="after")
    def _typed(self) -> Condition:
        check_condition(self.field, self.op, self.value)
        return self


class When(_Frozen):
    all: Annotated[tuple[Condition, ...], Field(min_length=1)] | None = None
    any: Annotated[tuple[Condition, ...], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _non_empty(self) -> When:
        if self.all is None and self.any is None:
            raise ValueError("give 'all' and/or 'any' (leave out 'when' for a rule that always matches)")
        return self


class Rule(_Frozen):
    id: Ident
    description: str = ""
    when: When | None = None
    decision: Literal["allow", "review", "block"]
    reasons: Annotated[tuple[ReasonCode, ...], Field(min_length=1)]
    controls: tuple[ControlRef, ...] = ()


class Fallback(_Frozen):
    decision: Literal["review", "block"] = "review"
    reasons: Annotated[tuple[ReasonCode, ...], Field(min_length=1)] = ("no_rule_matched",)
    controls: tuple[ControlRef, ...] = ()


# a review deadline is the decision's time plus this: a year beyond 9999 (1e12 s) made every
# record of the band an internal_error dead letter instead of a decision
MAX_DEADLINE_SECONDS = 10 * 366 * 86_400  # ten years


class Band(_Frozen):
    min_score: Unit
    priority: Annotated[int, Field(ge=1, le=9)]
    deadline_seconds: Annotated[int, Field(ge=1, le=MAX_DEADLINE_SECONDS)] | None = None


class Review(_Frozen):
    bands: Annotated[tuple[Band, ...], Field(min_length=1)]
    audit_fraction: Unit = 0.0
    route_blocked: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> Review:
        if min(b.min_score for b in self.bands) != 0.0:
            raise ValueError("bands: one band needs min_score 0 so that every score gets a priority")
        scores = [b.min_score for b in self.bands]
        if len(set(scores)) != len(scores):
            raise ValueError("bands: min_score values must be distinct")
        ordered = sorted(self.bands, key=lambda b: -b.min_score)
        for hi, lo in itertools.pairwise(ordered):
            if hi.priority > lo.priority:
                raise ValueError(f"bands: a higher score must not get a less urgent priority (min_score "
                                 f"{hi.min_score:g} has priority {hi.priority}, {lo.min_score:g} has {lo.priority})")
        return self

    def band(self, score: float) -> Band:
        return max((b for b in self.bands if score >= b.min_score), key=lambda b: b.min_score)


def _public_field(name: str) -> str:
    if name in SECRET_FIELDS:
        raise ValueError(f"{name!r} may go only to trusted consumers: radii, probabilities, scores, signals, "
                         "certificate and context fields locate the decision boundary")
    if name not in PUBLIC_FIELDS:
        raise ValueError(f"{name!r} is not one of {', '.join(PUBLIC_FIELDS)}")
    return name


class Disclosure(_Frozen):
    public_fields: tuple[Annotated[str, AfterValidator(_public_field)], ...] = DEFAULT_PUBLIC

    @model_validator(mode="after")
    def _has_id(self) -> Disclosure:
        for need in ("id", "decision"):
            if need not in self.public_fields:
                raise ValueError(f"public_fields: must include {need!r}")
        return self


class Controls(_Frozen):
    always: tuple[ControlRef, ...] = ()
    when_routed: tuple[ControlRef, ...] = ()


class Policy(_Frozen):
    """A validated, immutable risk policy. Build it with ``load_policy``."""

    apiVersion: Literal["riskpipe/v1"]
    kind: Literal["RiskPolicy"]
    metadata: Metadata
    shadow: bool = False
    threat_model: ThreatModel
    certifier: Certifier
    signals: Signals
    score: Score
    rules: Annotated[tuple[Rule, ...], Field(min_length=1)]
    fallback: Fallback = Fallback()
    review: Review
    disclosure: Disclosure = Disclosure()
    controls: Controls = Controls()

    _sha256: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _whole_policy(self) -> Policy:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if rule.id in seen:
                problems.append((("rules", i, "id"), f"duplicate rule id {rule.id!r} (also rules[{seen[rule.id]}])"))
            seen.setdefault(rule.id, i)
        if not self.shadow:
            for i, facts in sorted(analyse(self).invariant_witness.items()):
                problems.append((("rules", i, "decision"), (
                    f"rule {self.rules[i].id!r} could allow an uncertified sample (abstained or radius below "
                    f"epsilon in the threat norm), e.g. {describe_facts(facts)}; add {{field: certified_in_threat, "
                    "op: eq, value: true} to its 'all' conditions or route uncertified samples to review/block "
                    "in an earlier rule (only a policy with shadow: true may allow them)")))
        w = self.score.weights
        if not self.signals.context_risk.enabled and w.certificate_risk == 0 and w.upstream_risk == 0:
            # a disabled signal takes no part in the score: with no weighted signal left, every
            # score was 0, the lowest risk, and no score rule (high-score review) ever fired
            problems.append((("score",), "weights: every signal with a weight > 0 is disabled (context_risk), so "
                             "every score would be 0, the lowest risk; give certificate_risk or upstream_risk a "
                             "weight > 0"))
        if problems:
            raise SemanticProblems(problems)
        return self

    def model_post_init(self, context: Any) -> None:
        self._sha256 = hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    # ---- identity ----------------------------------------------------------------------
    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)

    @cached_property
    def sha256(self) -> str:
        # cached_property: a plain attribute after the first read (private attributes go
        # through pydantic's __getattr__, ~20 µs, and every record reads this several times)
        return self._sha256

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> str:
        return self.metadata.version

    # ---- threat model ------------------------------------------------------------------
    def certificate_epsilon(self, cert_norm: str, input_dim: int) -> float:
        """The radius, in the certificate's norm, that covers the threat model: by
        Theorem 2 an l_p radius r covers an l_q attacker out to f * r, so the
        certificate needs r >= epsilon / f (f = conversion_factor(p, q, d))."""
        f = conversion_factor(cert_norm, self.threat_model.norm, int(input_dim))
        return float(self.threat_model.epsilon / f)

    # ---- decisions ---------------------------------------------------------------------
    def evaluate(self, certificate: Certificate | dict[str, Any], upstream_risk: Any = None, context: Any = None,
                 event_id: str | None = None, prediction: Any = None) -> Decision:
        return evaluate(self, certificate, upstream_risk=upstream_risk, context=context, event_id=event_id,
                        prediction=prediction)

    def public_view(self, record: dict[str, Any]) -> dict[str, Any]:
        """The fields of a full decision record that ``disclosure`` lets out publicly."""
        getters = {
            "policy_version": lambda r: (r.get("policy") or {}).get("version"),
            "policy_name": lambda r: (r.get("policy") or {}).get("name"),
            "model_name": lambda r: (r.get("model") or {}).get("name"),
        }
        return {f: getters[f](record) if f in getters else record.get(f) for f in self.disclosure.public_fields}
