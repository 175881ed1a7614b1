"""Figures of an evaluation, computed from the stage's own records (pure: no I/O).

See ``DEFINITIONS`` (stated in every report).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from riskpipe.attacks import GuidedAttacker, PublicAttacker, PublicView, TrustedView, norm_shift_coverage
from riskpipe.decisions import DECISIONS
from riskpipe.evaluate.traffic import SampleSet, row_of

DEFINITIONS = """\
* an attack *attempt* is the attacked copy of a clean input the base model got right;
* it is *successful* when the base model's prediction on it differs from the label
  (the prediction the deployed model would serve);
* *routes* of successful adversarial examples: the stage's decision on them
  (allow / review / block); for a shadow policy the decision it would have enforced
  (``would_be``) is reported too;
* *certified* (Theorem 1): the stage's certificate on the adversarial input holds at
  the policy's threat epsilon; *certified wrong*: it certifies a class other than the
  label, i.e. the certificate vouches for the attacker's class;
* an attempt *evades* when it is successful and the stage allows it (for the attacker
  comparison, which counts evasions per attempt for the same number of attempts).
"""


def is_certified(record: Mapping) -> bool:
    """Whether the record's certificate holds at the policy's threat epsilon."""
    c = record["certificate"]
    if c.get("abstained"):
        return False
    if c.get("certified") is not None:
        return bool(c["certified"])
    eps = c.get("threat_epsilon")
    return eps is not None and float(c.get("radius_threat") or 0.0) >= float(eps)


def _fraction(k: int, n: int) -> float | None:
    return k / n if n else None


def _routes(records: Sequence[Mapping], key: str = "decision") -> dict[str, int]:
    counts = Counter(r.get(key) for r in records)
    return {d: int(counts.get(d, 0)) for d in DECISIONS}


def _route_block(records: Sequence[Mapping]) -> dict:
    n = len(records)
    routes = _routes(records)
    out = {"counts": routes, "fractions": {d: _fraction(k, n) for d, k in routes.items()}}
    if any(r.get("would_be") for r in records):
        would = _routes(records, "would_be")
        out["would_be"] = {"counts": would, "fractions": {d: _fraction(k, n) for d, k in would.items()}}
    return out


def clean_metrics(s: SampleSet, records: Mapping[str, Mapping], dlq_ids: set[str]) -> dict:
    """Reviewer workload on clean traffic: how much of it the policy sends to review or blocks."""
    recs = [records[i] for i in s.ids if i in records]
    routes = _route_block(recs)
    n = len(s.ids)
    return {
        "n": n,
        "decided": len(recs),
        "dead_lettered": sum(i in dlq_ids for i in s.ids),
        "accuracy": float(np.mean(s.pred == s.y)) if n else None,
        "certified": sum(is_certified(r) for r in recs),
        "certified_fraction": _fraction(sum(is_certified(r) for r in recs), len(recs)),
        "routes": routes,
        "review_rate": routes["fractions"]["review"],
        "block_rate": routes["fractions"]["block"],
    }


def attack_metrics(clean: SampleSet, adv: SampleSet, records: Mapping[str, Mapping], dlq_ids: set[str]) -> dict:
    """What the policy did with the successful adversarial examples of one attack."""
    attempted = [i for i in range(len(adv.ids)) if clean.pred[i] == clean.y[i]]
    successful = [i for i in attempted if adv.pred[i] != adv.y[i]]
    recs = [records[adv.ids[i]] for i in successful if adv.ids[i] in records]
    certified = [r for r, i in zip(recs, successful) if is_certified(r)]
    wrong = [r for r in certified if r["certificate"].get("predicted_class") not in (None, int(adv.y[row_of(r["id"])]))]
    smoothed_wrong = sum(
        1 for i in attempted
        if adv.ids[i] in records
        and records[adv.ids[i]]["certificate"].get("predicted_class") not in (None, int(adv.y[i]))
    )
    spec = adv.spec
    return {
        "name": adv.name,
        "kind": spec.kind,
        "norm": spec.norm,
        "epsilon": spec.epsilon,
        "budget": spec.label or f"{spec.epsilon:g}",
        "n": len(adv.ids),
        "attempted": len(attempted),
        "successful": len(successful),
        "success_rate": _fraction(len(successful), len(attempted)),
        "smoothed_successful": smoothed_wrong,
        "dead_lettered": sum(adv.ids[i] in dlq_ids for i in successful),
        "routes": _route_block(recs),
        "certified": len(certified),
        "certified_wrong_class": len(wrong),
        "certified_fraction": _fraction(len(certified), len(recs)),
    }


def attacker_comparison(clean: SampleSet, adv: SampleSet, clean_audit: Sequence[Mapping],
                        clean_public: Sequence[Mapping], records: Mapping[str, Mapping], attempts: int,
                        seed: int, margin: float = 0.0) -> dict:
    """Guided (audit topic) versus public-only (decisions topic) attacker at one budget.

    Each attacker picks ``attempts`` clean inputs from what it can see; an attempt
    *evades* when the adversarial copy is misclassified and the stage allows it.
    """
    trusted, public = TrustedView.from_records(clean_audit), PublicView.from_records(clean_public)
    guided = GuidedAttacker(attempts, adv.spec.epsilon, seed, margin)
    chosen = {"guided": guided.choose(trusted), "public": PublicAttacker(attempts, seed).choose(public)}

    def outcome(ids: list[str]) -> dict:
        evaded = 0
        misclassified = 0
        for cid in ids:
            i = row_of(cid)
            r = records.get(adv.ids[i])
            wrong = adv.pred[i] != adv.y[i] and clean.pred[i] == clean.y[i]
            misclassified += bool(wrong)
            evaded += bool(wrong and r is not None and r["decision"] == "allow")
        return {"attempts": len(ids), "misclassified": misclassified, "evaded": evaded,
                "evasion_rate": _fraction(evaded, len(ids))}

    g, p = outcome(chosen["guided"]), outcome(chosen["public"])
    skipped = sum(1 for e in trusted.entries if not e.abstained and e.radius_threat >= adv.spec.epsilon)
    gain = None if g["evasion_rate"] is None or p["evasion_rate"] is None else g["evasion_rate"] - p["evasion_rate"]
    return {"attempts": attempts, "guided": g, "public": p, "guided_skipped_out_of_reach": skipped,
            "gain": gain}


def coverage_metrics(clean_audit: Sequence[Mapping], clean: SampleSet, adv: SampleSet,
                     records: Mapping[str, Mapping]) -> dict:
    """Norm shift: which clean certificates cover the attack by Theorem 2, which only look like they do."""
    by_id = {r["id"]: r for r in clean_audit}
    certs = [by_id[i]["certificate"] for i in clean.ids if i in by_id]
    if not certs:
        return {}
    cert_norm = certs[0]["norm"]
    radii = np.array([c["radius"] for c in certs], dtype=np.float64)
    cov = norm_shift_coverage(radii, cert_norm, adv.spec.norm, adv.spec.epsilon, int(np.prod(clean.X.shape[1:])))
    rows = [i for i, c in enumerate(clean.ids) if c in by_id]
    success = np.array([clean.pred[i] == clean.y[i] and adv.pred[i] != adv.y[i] for i in rows])
    misread = cov.naive_covered & ~cov.covered
    allowed = np.array([records.get(adv.ids[i], {}).get("decision") == "allow" for i in rows])
    return {
        **cov.summary(),
        "covered": int(cov.covered.sum()),
        "naive_covered": int(cov.naive_covered.sum()),
        "successful_on_misread": int((success & misread).sum()),
        "successful_on_misread_allowed": int((success & misread & allowed).sum()),
        "successful_on_covered": int((success & cov.covered).sum()),
    }
