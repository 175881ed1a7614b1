"""Gather the compliance report's numbers from a ledger into one JSON-ready dict.

Every section the renderers show comes from here, so the HTML, Markdown and JSON
reports always agree. Records are read defensively: a field a producer left out
counts as unknown, it never breaks the report.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from riskpipe.ledger import LedgerError, open_ledger, parse_ts, redact
from riskpipe.policy.controls import CATALOG
from riskpipe.policy.naming import policy_label

DECISIONS = ("allow", "review", "block")
VERDICTS = ("confirmed_clean", "confirmed_manipulated", "unsure")
# a verdict overrides a decision when it contradicts it; "review" decisions hand the call to the reviewer
CONTRADICTS = {("allow", "confirmed_manipulated"), ("block", "confirmed_clean")}

SCOPE_STATEMENTS = [
    ("What a certificate guarantees",
     "A certificate bounds the distance from an input to the nearest input on which the (smoothed) model "
     "changes its class, in one norm, at a stated confidence. Within that radius the prediction cannot be "
     "changed by any perturbation."),
    ("Theorem 1: a certificate is not a cleanliness check",
     "A certificate says nothing about whether the input itself is clean: adversarial inputs can be certified "
     "too. A certified decision is therefore never 'safe' on its own. The reliable signal is the absence of a "
     "certificate (abstention, or a radius below the threat model's epsilon), which the policies route to "
     "human review."),
    ("Theorem 2: norms do not transfer one to one",
     "An l_p certificate of radius r_p covers an l_q attacker only out to r_q = min(d^(1/q - 1/p), 1) * r_p, "
     "d being the input dimension. An l2 radius of r is an l_inf radius of only r / sqrt(d). Every radius in "
     "this report is converted to the threat model's norm before it is compared with epsilon."),
    ("Probabilistic guarantee",
     "Randomized-smoothing certificates hold with probability at least 1 - alpha over the sampling noise, and "
     "they describe the smoothed classifier, not the base model. About alpha of them may be wrong; alpha is "
     "stated below for every certificate family in use."),
    ("What this report cannot show",
     "The ledger records what the stage decided; it cannot show decisions that were never made (a stage that "
     "was down, events lost upstream). A truncated ledger tail is only detectable against a chain head "
     "anchored or signed earlier."),
]


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _ts(v: Any) -> datetime | None:
    try:
        return parse_ts(v) if v is not None else None
    except LedgerError:
        return None


def _iso(t: datetime | None) -> str | None:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, **dict.fromkeys(("min", "p10", "median", "p90", "max", "mean"))}
    v = sorted(values)

    def q(p: float) -> float:
        return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]

    return {"n": len(v), "min": v[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": v[-1],
            "mean": statistics.fmean(v)}


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def gather(ledger_path: str, since: Any = None, until: Any = None) -> dict:
    """All report sections for decisions with ``since <= ts < until`` (others by their own ts)."""
    with open_ledger(ledger_path, create=False) as led:
        integrity = led.verify()
        decisions = [e.record for e in led.records("decision", since, until)]
        verdicts = [e.record for e in led.records("verdict", since, until)]
        policies = [e.record for e in led.records("policy", None, until)]
        dlq = [e.record for e in led.records("dlq", since, until)]
        totals = {k: led.count(k) for k in ("decision", "verdict", "policy", "dlq")}
        examples = _examples(decisions, led.get_input)
    times = [t for t in (_ts(d.get("ts")) for d in decisions) if t]
    try:
        pkg_version = version("riskpipe")
    except PackageNotFoundError:
        pkg_version = "unknown"
    data = {
        "meta": {
            "title": "riskpipe compliance report",
            "generated_at": _iso(datetime.now(timezone.utc)),
            "riskpipe_version": pkg_version,
            "ledger": redact(ledger_path),
            "since": _iso(_ts(since)) if since is not None else None,
            "until": _iso(_ts(until)) if until is not None else None,
            "first_decision": _iso(min(times)) if times else None,
            "last_decision": _iso(max(times)) if times else None,
        },
        "integrity": {**integrity.to_dict(), "verify_command": f"riskpipe ledger verify {redact(ledger_path)} "
                      f"--expect-head {integrity.head} --expect-count {integrity.count}"},
        "scope": _scope(decisions),
        "policies": _policies(decisions, policies),
        "volumes": _volumes(decisions, verdicts, policies, dlq, totals),
        "decisions": _decisions(decisions, times),
        "abstention": _abstention(decisions),
        "radius": _radius(decisions),
        "review": _review(decisions, verdicts),
        "dlq": _dlq(dlq),
        "breakdown": _breakdown(decisions, verdicts),
        "examples": examples,
    }
    data["controls"] = _controls(data, decisions)
    return data


def _scope(decisions: list[dict]) -> dict:
    threat = Counter((_get(d, "certificate", "threat_norm"), _num(_get(d, "certificate", "threat_epsilon")))
                     for d in decisions)
    families = Counter((_get(d, "certificate", "method"), _get(d, "certificate", "mode"),
                        _get(d, "certificate", "norm"), _num(_get(d, "certificate", "sigma")),
                        _num(_get(d, "certificate", "alpha"))) for d in decisions)
    return {
        "statements": [{"title": t, "text": s} for t, s in SCOPE_STATEMENTS],
        "threat_models": [{"norm": n, "epsilon": e, "decisions": c} for (n, e), c in threat.most_common()],
        "certificate_families": [{"method": m, "mode": mo, "norm": no, "sigma": s, "alpha": a, "decisions": c}
                                 for (m, mo, no, s, a), c in families.most_common()],
        "record_scope_examples": sorted({str(d["scope"]) for d in decisions if d.get("scope")})[:3],
    }


def _policies(decisions: list[dict], policy_entries: list[dict]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for p in policy_entries:
        key = (p.get("name"), str(p.get("version")), p.get("sha256"))
        rows.setdefault(key, {"name": key[0], "version": key[1], "sha256": key[2], "shadow": p.get("shadow"),
                              "ledger_entry": _ts(p.get("ts")), "first_decision": None, "last_decision": None,
                              "decisions": 0})
    for d in decisions:
        p = d.get("policy") or {}
        key = (p.get("name"), str(p.get("version")), p.get("sha256"))
        row = rows.setdefault(key, {"name": key[0], "version": key[1], "sha256": key[2], "shadow": p.get("shadow"),
                                    "ledger_entry": None, "first_decision": None, "last_decision": None,
                                    "decisions": 0})
        row["decisions"] += 1
        if row["shadow"] is None:
            row["shadow"] = p.get("shadow")
        t = _ts(d.get("ts"))
        if t:
            row["first_decision"] = min(filter(None, [row["first_decision"], t]))
            row["last_decision"] = max(filter(None, [row["last_decision"], t]))
    out = []
    for row in rows.values():
        out.append({**row, **{k: _iso(row[k]) for k in ("ledger_entry", "first_decision", "last_decision")}})
    return sorted(out, key=lambda r: (r["first_decision"] or r["ledger_entry"] or "", str(r["name"])))


def _volumes(decisions, verdicts, policies, dlq, totals) -> dict:
    return {
        "in_period": {"decision": len(decisions), "verdict": len(verdicts), "dlq": len(dlq)},
        "ledger_totals": totals,
        "models": [{"name": n, "sha256": s, "decisions": c} for (n, s), c in
                   Counter((_get(d, "model", "name"), _get(d, "model", "sha256")) for d in decisions).most_common()],
        "workers": dict(Counter(str(d.get("worker")) for d in decisions).most_common()),
    }


def _model_name(d: dict) -> str:
    m = d.get("model")
    return str(m.get("name") if isinstance(m, dict) else m)


def _policy_name(d: dict) -> str:
    """Name, version and sha256 prefix: two policies both called ``default v1.0.0`` with
    different content are two rows, never one."""
    return policy_label(d.get("policy"))


def _group_row(name: str, sub: list[dict], verdict_of: dict) -> dict:
    n = len(sub)
    counts = Counter(d.get("decision") for d in sub)
    abst = sum(1 for d in sub if _get(d, "certificate", "abstained") is True)
    not_cert = sum(1 for d in sub if _get(d, "certificate", "abstained") is True
                   or _get(d, "certificate", "certified") is False)
    radii = [r for r in (_num(_get(d, "certificate", "radius_threat")) for d in sub) if r is not None]
    threats = sorted({f"{_get(d, 'certificate', 'threat_norm')} eps={_num(_get(d, 'certificate', 'threat_epsilon'))}"
                      for d in sub})
    verdicts = Counter(verdict_of[d.get("id")] for d in sub if d.get("id") in verdict_of)
    return {"name": name, "decisions": n, **{k: counts.get(k, 0) for k in DECISIONS},
            **{f"{k}_rate": _rate(counts.get(k, 0), n) for k in DECISIONS},
            "abstained": abst, "abstain_rate": _rate(abst, n), "not_certified_rate": _rate(not_cert, n),
            "median_radius_threat": statistics.median(radii) if radii else None, "threat_models": threats,
            "routed": sum(1 for d in sub if _get(d, "review", "routed") is True),
            "verdicts": {k: verdicts.get(k, 0) for k in VERDICTS}}


def _breakdown(decisions: list[dict], verdicts: list[dict]) -> dict:
    """Per model, per policy (name, version and sha256), and which policy decided which model's events."""
    verdict_of = {v.get("id"): v.get("verdict") for v in verdicts}

    def rows(key) -> list[dict]:
        groups: dict[str, list[dict]] = defaultdict(list)
        for d in decisions:
            groups[key(d)].append(d)
        return [_group_row(k, sub, verdict_of) for k, sub in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))]

    pairs = Counter((_model_name(d), _policy_name(d)) for d in decisions)
    return {"models": rows(_model_name), "policies": rows(_policy_name),
            "model_policy": [{"model": m, "policy": p, "decisions": c} for (m, p), c in sorted(pairs.items())]}


EXAMPLES_PER_MODEL = 3


def _examples(decisions: list[dict], fetch=None) -> list[dict]:
    """The first few routed or blocked decisions per model that carry their input, for
    pictures (images) or tables (tabular rows) in the HTML report. A tensor stored in
    the ledger is read through ``fetch`` and carried inline (base64) in the example."""
    from riskpipe.ledger.inputs import inline_copy

    out, seen = [], Counter()
    for d in decisions:
        inp = d.get("input")
        if not (isinstance(inp, dict) and (inp.get("data") is not None or isinstance(inp.get("tensor"), dict))):
            continue
        if not (_get(d, "review", "routed") is True or d.get("decision") == "block"):
            continue
        name = _model_name(d)
        if seen[name] >= EXAMPLES_PER_MODEL:
            continue
        seen[name] += 1
        out.append({"id": d.get("id"), "model": name, "policy": _policy_name(d), "decision": d.get("decision"),
                    "prediction": d.get("prediction"), "reasons": d.get("reasons") or [],
                    "input": inline_copy(inp, fetch)})
    return out


def _decisions(decisions: list[dict], times: list[datetime]) -> dict:
    span = (max(times) - min(times)).total_seconds() if times else 0
    bucket = "hour" if span <= 3 * 86400 else "day"
    fmt = "%Y-%m-%dT%H:00Z" if bucket == "hour" else "%Y-%m-%d"
    series: dict[str, Counter] = defaultdict(Counter)
    for d in decisions:
        t = _ts(d.get("ts"))
        if t:
            series[t.strftime(fmt)][d.get("decision")] += 1
    return {
        "totals": {k: sum(1 for d in decisions if d.get("decision") == k) for k in DECISIONS},
        "bucket": bucket,
        "series": [{"t": k, **{c: series[k].get(c, 0) for c in DECISIONS}} for k in sorted(series)],
        "by_rule": dict(Counter(str(d.get("rule")) for d in decisions).most_common()),
        "reasons": dict(Counter(r for d in decisions for r in (d.get("reasons") or [])).most_common()),
    }


def _abstention(decisions: list[dict]) -> dict:
    n = len(decisions)
    abst = sum(1 for d in decisions if _get(d, "certificate", "abstained") is True)
    not_cert = sum(1 for d in decisions if _get(d, "certificate", "abstained") is True
                   or _get(d, "certificate", "certified") is False)
    by_method = {}
    for m in sorted({str(_get(d, "certificate", "method")) for d in decisions}):
        sub = [d for d in decisions if str(_get(d, "certificate", "method")) == m]
        k = sum(1 for d in sub if _get(d, "certificate", "abstained") is True)
        by_method[m] = {"decisions": len(sub), "abstained": k, "rate": _rate(k, len(sub))}
    return {"decisions": n, "abstained": abst, "rate": _rate(abst, n), "not_certified": not_cert,
            "not_certified_rate": _rate(not_cert, n), "by_method": by_method}


def _radius(decisions: list[dict]) -> dict:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for d in decisions:
        r = _num(_get(d, "certificate", "radius_threat"))
        if r is not None:
            groups[(_get(d, "certificate", "threat_norm"), _num(_get(d, "certificate", "threat_epsilon")))].append(r)
    out = []
    for (norm, eps), vals in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        below = sum(1 for v in vals if eps is not None and v < eps)
        out.append({"norm": norm, "epsilon": eps, "quantiles": _quantiles(vals), "below_epsilon": below,
                    "below_epsilon_rate": _rate(below, len(vals)), "zero": sum(1 for v in vals if v == 0.0),
                    "values": vals})
    return {"groups": out}


def _review(decisions: list[dict], verdicts: list[dict]) -> dict:
    n = len(decisions)
    routed = [d for d in decisions if _get(d, "review", "routed") is True]
    audit = [d for d in decisions if _get(d, "review", "audit_sample") is True]
    by_id = {d.get("id"): d for d in decisions}
    counts = Counter(v.get("verdict") for v in verdicts)
    overrides, eligible, minutes, late = [], 0, [], 0
    for v in verdicts:
        dec = by_id.get(v.get("id"))
        decision = v.get("decision") or (dec or {}).get("decision")
        if decision in ("allow", "block"):
            eligible += 1
            if (decision, v.get("verdict")) in CONTRADICTS:
                overrides.append({"id": v.get("id"), "decision": decision, "verdict": v.get("verdict"),
                                  "reviewer": v.get("reviewer"), "ts": v.get("ts")})
        t_v, t_d = _ts(v.get("ts")), _ts(v.get("decision_ts") or (dec or {}).get("ts"))
        if t_v and t_d:
            minutes.append((t_v - t_d).total_seconds() / 60)
        deadline = _ts(_get(dec, "review", "deadline"))
        if t_v and deadline and t_v > deadline:
            late += 1
    reviewed = {v.get("id") for v in verdicts}
    return {
        "routed": len(routed), "routed_rate": _rate(len(routed), n),
        "by_priority": dict(Counter(str(_get(d, "review", "priority")) for d in routed).most_common()),
        "audit_samples": len(audit), "audit_rate": _rate(len(audit), n),
        "verdicts": {k: counts.get(k, 0) for k in VERDICTS}, "verdicts_total": len(verdicts),
        "reviewers": dict(Counter(str(v.get("reviewer")) for v in verdicts).most_common()),
        "overrides": len(overrides), "override_eligible": eligible, "override_rate": _rate(len(overrides), eligible),
        "override_definition": "a verdict contradicts the decision: allow then confirmed_manipulated, or block then "
                               "confirmed_clean (review decisions leave the call to the reviewer and never count)",
        "override_examples": overrides[:10],
        "minutes_to_review": _quantiles(minutes), "minutes_values": minutes,
        "deadline_missed": late,
        "pending": sum(1 for d in routed if d.get("id") not in reviewed),
    }


def _dlq(dlq: list[dict]) -> dict:
    return {"total": len(dlq), "by_reason": dict(Counter(str(d.get("reason")) for d in dlq).most_common()),
            "by_source_topic": dict(Counter(str(_get(d, "source", "topic") or _get(d, "source", "file"))
                                            for d in dlq).most_common())}


# control id -> (evidence in this report, report sections that carry it)
EVIDENCE = {
    "GOVERN 1.4": ("Versioned policies with sha256 hashes; every decision names the policy it ran under.", ["policies"]),
    "GOVERN 1.5": ("This periodic report; alerting rules are evidenced by the deployment (Prometheus).", ["volumes", "decisions"]),
    "GOVERN 3.2": ("Review routing rules and the reviewer identity on each verdict.", ["review"]),
    "MAP 3.5": ("Review queue volumes, audit sampling rate, deadlines met and missed.", ["review"]),
    "MEASURE 2.4": ("Production volumes and decisions over time.", ["volumes", "decisions"]),
    "MEASURE 2.5": ("Scope and limitations statements; abstention rate; radius distribution against epsilon.", ["scope", "abstention", "radius"]),
    "MEASURE 2.7": ("A robustness certificate per inference, with its threat model and confidence.", ["scope", "radius"]),
    "MEASURE 2.8": ("Hash-chained ledger, per-decision explanations and scope, this report.", ["integrity", "scope"]),
    "MEASURE 3.1": ("Abstention rate and radius drift in the threat norm over the period.", ["abstention", "radius"]),
    "MANAGE 1.3": ("Allow / review / block responses per rule.", ["decisions"]),
    "MANAGE 2.4": ("Block decisions and shadow-mode policies.", ["decisions", "policies"]),
    "MANAGE 4.1": ("Reviewer verdicts, override rate, policy change entries.", ["review", "policies"]),
    "MANAGE 4.3": ("Dead-letter counts by reason; blocked decisions.", ["dlq", "decisions"]),
    "ISO/IEC 27001:2022 A.5.28": ("Ledger export and certificate replay (`riskpipe ledger export`, `riskpipe ledger replay`).", ["integrity"]),
    "ISO/IEC 27001:2022 A.5.33": ("Hash-chained, append-only ledger and its verification result.", ["integrity"]),
    "ISO/IEC 27001:2022 A.8.15": ("Every decision, verdict, policy change and dead letter is a ledger entry.", ["volumes", "dlq"]),
    "ISO/IEC 27001:2022 A.8.16": ("Monitoring of decisions, abstention and review; Prometheus metrics and alerts in deployment.", ["decisions", "abstention", "review"]),
}


def _controls(data: dict, decisions: list[dict]) -> list[dict]:
    cited = Counter(c for d in decisions for c in (d.get("controls") or []))
    have = {
        "policies": bool(data["policies"]), "volumes": data["volumes"]["in_period"]["decision"] > 0,
        "decisions": data["volumes"]["in_period"]["decision"] > 0, "scope": True,
        "abstention": data["abstention"]["decisions"] > 0, "radius": bool(data["radius"]["groups"]),
        "review": data["review"]["routed"] > 0 or data["review"]["verdicts_total"] > 0,
        "dlq": True, "integrity": True,
    }
    rows = []
    for cid, name in CATALOG.items():
        evidence, sections = EVIDENCE[cid]
        present = [s for s in sections if have.get(s)]
        rows.append({
            "framework": "ISO/IEC 27001:2022 Annex A" if cid.startswith("ISO") else "NIST AI RMF 1.0",
            "id": cid.replace("ISO/IEC 27001:2022 ", ""), "full_id": cid, "name": name, "evidence": evidence,
            "sections": sections,
            "status": ("ledger verification FAILED" if "integrity" in sections and not data["integrity"]["ok"]
                       else "evidence in this report" if present else "no entries in this period"),
            "cited_by_decisions": cited.get(cid, 0),
        })
    return rows
