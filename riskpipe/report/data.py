"""Gather the compliance report's numbers from a ledger into one JSON-ready dict.

Every section the renderers show comes from here, so the HTML, Markdown and JSON
reports always agree. Records are read defensively: a field a producer left out
counts as unknown, it never breaks the report.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from riskpipe.decisions import DECISIONS
from riskpipe.ledger import LedgerError, open_ledger, parse_ts, redact
from riskpipe.ledger.anchors import Checkpoint
from riskpipe.ledger.chain import decision_scope, time_window
from riskpipe.ledger.facts import GROUP_COLUMNS, KINDS, NO_HOUR, count_row, recheck
from riskpipe.ledger.inputs import inline_copy
from riskpipe.policy.controls import frameworks, mapping
from riskpipe.policy.naming import model_name, policy_label
from riskpipe.review.queue import OVERRIDES as CONTRADICTS  # one definition of an override, the console's
from riskpipe.review.queue import VERDICT_COVERS  # what a verdict covers, as the console's queue reads it
from riskpipe.timestamps import from_epoch, rfc3339_seconds

VERDICTS = ("confirmed_clean", "confirmed_manipulated", "unsure")

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


def _ts(v: Any) -> datetime | None:
    try:
        return parse_ts(v) if v is not None else None
    except LedgerError:
        return None


def _iso(t: datetime | None) -> str | None:
    return rfc3339_seconds(t) if t else None


def _quantiles(values: list[float] | np.ndarray, mean: bool = True) -> dict:
    """Quantiles (and the mean unless ``mean=False``: the certified radius's mean is no quality measure)."""
    if not len(values):
        return {"n": 0, **dict.fromkeys(("min", "p10", "median", "p90", "max", *(("mean",) if mean else ())))}
    v = np.sort(values).tolist() if isinstance(values, np.ndarray) else sorted(values)

    def q(p: float) -> float:
        return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]

    return {"n": len(v), "min": v[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": v[-1],
            **({"mean": statistics.fmean(v)} if mean else {})}


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def gather(ledger_path: str, since: Any = None, until: Any = None, verify: bool = True) -> dict:
    """All report sections for decisions with ``since <= ts < until`` (others by their own ts).

    Decisions and dead letters are read from the ledger's ``facts`` tables
    (:mod:`riskpipe.ledger.facts`). Counts come from ``fact_counts`` (per group and hour,
    kept by the appends) for the window's whole hours and from the facts rows of the
    partial hours at its edges, so they cost what the groups and hours cost, not the rows.
    The exact distributions (radii, p_A lower bounds, the ages of the items waiting for
    review) need one number per decision: they are streamed from one index of the facts
    table into arrays. Only verdicts, policy entries and the example records the report
    shows are read whole. ``verify`` walks the whole chain first (the same walk as
    ``riskpipe ledger verify``; its time grows with the ledger)."""
    time_window(since, until)  # a period that is no period is refused before anything is read
    with open_ledger(ledger_path, create=False) as led:
        integrity = _integrity(led, ledger_path, verify)
        verdicts = [e.record for e in led.records("verdict", since, until)]
        policies = [e.record for e in led.records("policy", None, until)]
        totals = {k: led.count(k) for k in ("decision", "verdict", "policy", "dlq")}
        with led.snapshot() as q:
            f = _Facts(q, since, until)
            first, last = f.rows("SELECT MIN(t), MAX(t)")[0]
            bucket = "hour" if first is None or last - first <= 3 * 86400 else "day"
            hours = f.hour_counts()
            g = _Groups(f, hours, bucket, _BY)
            dlq = _Groups(f, hours, bucket, ("dlq_reason", "dlq_source"), kind="dlq")
            numbers = f.numbers()
            radii = _Radii(f, numbers)
            looked_up = f.lookup(verdicts)
            data = {
                "scope": _scope(g, f),
                "policies": _policies(g, policies),
                "volumes": _volumes(g, dlq, verdicts, totals),
                "decisions": _decisions(g, bucket),
                "abstention": _abstention(g),
                "certificates": _certificates(g, _by(f, numbers, "p_lower", lambda grp: grp["model_label"])),
                "radius": _radius(radii),
                "review": _review(g, verdicts, looked_up, _Backlog(f, hours, numbers),
                                  _ts(until) if until is not None else _from_epoch(last)),
                "dlq": _dlq(dlq),
                "breakdown": _breakdown(g, radii, verdicts, looked_up),
                "examples": _examples(f, led.get_input),
            }
            integrity.update(_facts_check(f, totals, verify))
    try:
        pkg_version = version("riskpipe")
    except PackageNotFoundError:
        pkg_version = "unknown"
    data = {
        "meta": {
            "title": "riskpipe compliance report",
            "generated_at": rfc3339_seconds(),
            "riskpipe_version": pkg_version,
            "ledger": redact(ledger_path),
            "since": _iso(_ts(since)) if since is not None else None,
            "until": _iso(_ts(until)) if until is not None else None,
            "first_decision": _iso(_from_epoch(first)),
            "last_decision": _iso(_from_epoch(last)),
            "figures_from": "the ledger's facts table (one row per decision and dead letter, written with it)",
        },
        "integrity": integrity,
        **data,
    }
    data["controls"] = _controls(data, g.expand("controls"))
    data["frameworks"] = [{"framework": f, "mapping_version": v, "source": s} for f, v, s in frameworks()]
    return data


def _integrity(led, ledger_path: str, verify: bool) -> dict:
    """The chain and tree recomputed, and checked against the largest stored checkpoint
    too: a ledger cut below it (rows, chain state and tree made to match) verified as
    intact while its own ``signed_notes`` said it had held more. The note's signature
    needs the public key (``ledger verify --public-key``), which a report does not take:
    a note forged in the database can only make this fail, never pass."""
    if verify:
        note = led.latest_note()
        try:
            stored = [Checkpoint.from_note(note, where="the largest stored checkpoint")] if note else []
        except LedgerError as e:
            head, count = led.head_and_count()
            result = {"ok": False, "count": count, "head": head, "first_bad_seq": None, "reason": str(e)}
        else:
            result = led.verify(checkpoints=stored).to_dict()
    else:
        head, count = led.head_and_count()
        result = {"ok": None, "count": count, "head": head, "first_bad_seq": None,
                  "reason": "not verified in this report (--no-verify): run the command below"}
    return {**result, "verified": verify, "verify_command": f"riskpipe ledger verify {redact(ledger_path)} "
            f"--expect-head {result['head']} --expect-count {result['count']}"}


def _facts_check(f: _Facts, totals: dict, verify: bool) -> dict:
    """The facts table holds one row per decision and dead letter in the ledger, and the
    hourly counts add up to its rows; when the report verifies, every facts row, group and
    hourly count is also recomputed from the records (``facts.recheck``)."""
    counted: Counter[str] = Counter()
    for gid, n in f.q("SELECT gid, SUM(n) FROM fact_counts GROUP BY gid"):
        counted[f.groups[gid]["kind"] if gid in f.groups else "(no group)"] += n
    bad = [f"{k}: {f.kind_counts.get(k, 0)} facts rows for {totals[k]} ledger rows" for k in KINDS
           if f.kind_counts.get(k, 0) != totals[k]]
    bad += [f"{k}: fact_counts adds up to {counted.get(k, 0)} rows, the facts table holds {f.kind_counts.get(k, 0)}"
            for k in (*KINDS, "(no group)") if counted.get(k, 0) != f.kind_counts.get(k, 0)]
    if not bad and verify:
        bad = recheck(f.q)
    if not bad:
        return {"facts_ok": True, "facts_rechecked": verify}
    return {"facts_ok": False, "ok": False, "reason": "facts table does not match the ledger (" + "; ".join(bad) + ")"}


def _from_epoch(t: float | None) -> datetime | None:
    return from_epoch(t) if t is not None else None


def _ceil_hour(t: float) -> int:
    h = int(t // 3600)
    return h if h * 3600 >= t else h + 1


def _split_window(lo: float | None, hi: float | None) -> tuple[tuple[int | None, int | None] | None,
                                                                list[tuple[float, float]]]:
    """The window ``[lo, hi)`` (epoch seconds; None: unbounded) as its whole hours
    ``(first, end)`` (hour numbers as ``facts.hour_of`` counts them, end exclusive, None:
    unbounded; None when it holds no whole hour) and the partial hours at its edges, as
    ``[(a, b)]`` time ranges."""
    lo_h = None if lo is None else _ceil_hour(lo)
    hi_h = None if hi is None else int(hi // 3600)
    if lo is not None and hi is not None and lo_h is not None and hi_h is not None and lo_h >= hi_h:
        return None, [(lo, hi)] if lo < hi else []
    edges: list[tuple[float, float]] = []
    if lo is not None and lo_h is not None and lo < lo_h * 3600:
        edges.append((lo, lo_h * 3600))
    if hi is not None and hi_h is not None and hi_h * 3600 < hi:
        edges.append((hi_h * 3600, hi))
    return (lo_h, hi_h), edges


def _hour_names(h: int) -> tuple[str | None, str | None]:
    """The (hour, day) bucket names of hour ``h``."""
    if h == NO_HOUR:
        return None, None
    when = from_epoch(h * 3600)
    return when.strftime("%Y-%m-%dT%H:00Z"), when.strftime("%Y-%m-%d")


# one decision's numbers, as the report's single scan of the window reads them (inf: NULL)
_ROW = np.dtype([("gid", np.int64), ("seq", np.int64), ("t", np.float64), ("radius_threat", np.float64),
                 ("p_lower", np.float64)])


class _Facts:
    """SQL over the ``facts`` rows of one kind inside the report's time window, and the
    groups they are counted by (``fact_groups``: a few per model, policy and worker)."""

    def __init__(self, q, since: Any, until: Any) -> None:
        self.q = q
        self.lo, self.hi = (b.timestamp() if b is not None else None for b in time_window(since, until))
        self.bounds = [b for b, v in (("t >= ?", self.lo), ("t < ?", self.hi)) if v is not None]
        self.bound_params = tuple(v for v in (self.lo, self.hi) if v is not None)
        self.kind_counts = {k: q("SELECT COUNT(*) FROM facts WHERE kind = ?", (k,))[0][0] for k in KINDS}
        self.groups = {r[0]: dict(zip(GROUP_COLUMNS, r[1:]))
                       for r in q(f"SELECT gid, {', '.join(GROUP_COLUMNS)} FROM fact_groups")}

    def where(self, *conds: str, alias: str = "") -> str:
        return " WHERE " + " AND ".join((f"{alias}kind = ?", *(alias + b for b in self.bounds), *conds))

    def rows(self, select: str, *conds: str, params: tuple = (), tail: str = "", kind: str = "decision") -> list:
        return self.q(f"{select} FROM facts{self.where(*conds)} {tail}", (kind, *self.bound_params, *params))

    def gids(self, kind: str = "decision", **values: Any) -> list[int]:
        """The groups of ``kind`` whose columns have these values."""
        return sorted(gid for gid, grp in self.groups.items()
                      if grp["kind"] == kind and all(grp[c] == v for c, v in values.items()))

    def hour_counts(self) -> dict[tuple[int, int], list]:
        """``(gid, hour) -> [rows, first seq, first t, last t]`` in the window: the whole
        hours from ``fact_counts``, the partial hours at the window's edges counted from
        their facts rows (through the index on kind and time)."""
        whole, edges = _split_window(self.lo, self.hi)
        counts: dict[tuple[int, int], list] = {}
        if whole is not None:
            conds, params = [], []
            for cond, v in (("h <> ?", NO_HOUR if self.bounds else None), ("h >= ?", whole[0]), ("h < ?", whole[1])):
                if v is not None:
                    conds.append(cond)
                    params.append(v)
            sql = "SELECT gid, h, n, first_seq, t0, t1 FROM fact_counts" + (
                " WHERE " + " AND ".join(conds) if conds else "")
            counts = {(gid, h): [n, first, t0, t1] for gid, h, n, first, t0, t1 in self.q(sql, params)}
        for kind in KINDS:
            for a, b in edges:
                for chunk in self.q.stream("SELECT gid, seq, t FROM facts WHERE kind = ? AND t >= ? AND t < ?",
                                           (kind, a, b)):
                    for gid, seq, t in chunk:
                        count_row(counts, gid, seq, t)
        return counts

    def numbers(self) -> np.ndarray:
        """``(gid, seq, t, radius_threat, p_lower)`` of every decision in the window, from
        one index of the facts table, streamed into one structured array (NULL as +inf,
        which no record holds: canonical JSON has no infinity)."""
        inf = float("inf")
        chunks = [np.array(chunk, _ROW) for chunk in self.q.stream(
            "SELECT COALESCE(gid, 0), seq, COALESCE(t, ?), COALESCE(radius_threat, ?), COALESCE(p_lower, ?) FROM facts"
            + self.where(), (inf, inf, inf, "decision", *self.bound_params))]
        return np.concatenate(chunks) if chunks else np.zeros(0, _ROW)

    def lookup(self, verdicts: list[dict]) -> list[dict | None]:
        """Facts of the decision each verdict is on, in the window (None where it is not):
        the decision of the verdict's scope (``ledger.chain.decision_scope``: its model and
        policy), or for an older verdict that names none, the latest decision of its id."""
        ids = sorted({str(v["id"]) for v in verdicts if isinstance(v.get("id"), str)})
        found: dict[str, dict[str, dict]] = {}  # id -> scope -> facts, in chain order
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = self.q("SELECT f.entry_id, f.decision, e.ts, f.deadline, f.routed, f.model_label, f.policy_label, "
                          "f.reasons, e.scope "
                          "FROM facts f JOIN entries e ON e.seq = f.seq"
                          + self.where(f"f.entry_id IN ({','.join('?' * len(chunk))})", alias="f.")
                          + " ORDER BY f.seq",
                          ("decision", *self.bound_params, *chunk))
            for eid, decision, ts, deadline, routed, model, policy, reasons, scope in rows:
                found.setdefault(eid, {})[scope] = {
                    "decision": decision, "ts": ts, "deadline": deadline, "routed": routed, "model": model,
                    "policy": policy, "reasons": json.loads(reasons or "[]")}
        out: list[dict | None] = []
        for v in verdicts:
            of_id = found.get(str(v.get("id"))) or {}
            scope = decision_scope("verdict", v)
            out.append(of_id.get(scope) if scope else (list(of_id.values())[-1] if of_id else None))
        return out

    def first_rows(self, gid: int, limit: int) -> list[int]:
        """The seqs of the first ``limit`` rows of group ``gid`` in the window (its index)."""
        conds = " AND ".join(("gid = ?", *self.bounds))  # no kind term: the planner takes the group's index
        return [r[0] for r in self.q(f"SELECT seq FROM facts WHERE {conds} ORDER BY seq LIMIT {int(limit)}",
                                     (gid, *self.bound_params))]

    def records_at(self, seqs: list[int]) -> list[dict]:
        """The ledger records of these rows, in chain order."""
        out = []
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            out += self.q(f"SELECT seq, record FROM entries WHERE seq IN ({','.join('?' * len(chunk))})", tuple(chunk))
        return [json.loads(text) for _, text in sorted(out)]


# what the sections count decisions by (the report's grouping; fact_groups holds a finer one)
_BY = ("decision", "model", "model_sha", "model_label", "policy", "policy_version", "policy_sha", "policy_label",
       "policy_shadow", "method", "mode", "norm", "sigma", "alpha", "threat_norm", "threat_eps", "rule", "worker",
       "reasons", "controls", "priority_label", "abstained", "not_certified", "routed", "audit", "scope_key")


def _min(a, b):
    return b if a is None else a if b is None else min(a, b)


def _max(a, b):
    return b if a is None else a if b is None else max(a, b)


class _Groups:
    """The window's rows of one kind grouped by ``columns`` and the time bucket, summed
    over the hourly counts: rows, first row and time span per group. Sections sum over these."""

    def __init__(self, f: _Facts, hours: dict, bucket: str, columns: tuple[str, ...], kind: str = "decision") -> None:
        names: dict[int, tuple] = {}
        acc: dict[tuple, list] = {}
        for (gid, h), (n, first, t0, t1) in hours.items():
            grp = f.groups.get(gid)
            if grp is None or grp["kind"] != kind:
                continue
            if h not in names:
                names[h] = _hour_names(h)
            key = (*(grp[c] for c in columns), names[h][0 if bucket == "hour" else 1])
            a = acc.get(key)
            if a is None:
                acc[key] = [n, first, t0, t1]
            else:
                a[0], a[1], a[2], a[3] = a[0] + n, min(a[1], first), _min(a[2], t0), _max(a[3], t1)
        self.rows = [dict(zip((*columns, "bucket", "n", "first", "t0", "t1"), (*k, *v))) for k, v in acc.items()]

    def count(self, *keys: str, where=None) -> list[tuple]:
        """``(values..., n)`` per distinct value, most common first, ties in order of first row."""
        acc: dict[tuple, list] = {}
        for r in self.rows:
            if where is None or where(r):
                k = tuple(r[c] for c in keys)
                a = acc.setdefault(k, [0, r["first"]])
                a[0] += r["n"]
                a[1] = min(a[1], r["first"])
        return [(*k, n) for k, (n, _) in sorted(acc.items(), key=lambda kv: (-kv[1][0], kv[1][1]))]

    def total(self, flag: str | None = None, where=None) -> int:
        return sum(r["n"] for r in self.rows if (flag is None or r[flag]) and (where is None or where(r)))

    def expand(self, column: str, where=None) -> Counter:
        """Counts of the items of a JSON-list column (reasons, controls)."""
        out: Counter = Counter()
        for r in sorted(self.rows, key=lambda r: r["first"]):
            if where is None or where(r):
                for item in json.loads(r[column]):
                    out[item] += r["n"]
        return out


def _lookup(f: _Facts, rows: np.ndarray, fill) -> np.ndarray:
    """An array indexed by gid (every gid of the groups and of the rows), filled with ``fill``."""
    size = max(max(f.groups, default=0), int(rows["gid"].max()) if len(rows) else 0) + 1
    return np.full(size, fill)


def _by(f: _Facts, rows: np.ndarray, field: str, key) -> dict[Any, tuple[np.ndarray, int]]:
    """``key(group) -> (its sorted values of field, first seq)`` over the rows (of
    :meth:`_Facts.numbers`) where the field is not NULL, in order of first appearance."""
    values = rows[field]
    have = np.isfinite(values)
    if not have.any():
        return {}
    values, gids, seqs = values[have], rows["gid"][have], rows["seq"][have]
    order = np.argsort(values, kind="stable")
    values, gids, seqs = values[order], gids[order], seqs[order]
    keys: dict[Any, int] = {}
    code = _lookup(f, rows, -1)
    for gid, grp in f.groups.items():
        code[gid] = keys.setdefault(key(grp), len(keys))
    codes = code[gids]
    out = []
    for k, c in keys.items():
        mine = codes == c
        if mine.any():
            out.append((int(seqs[mine].min()), k, values[mine]))
    return {k: (v, first) for first, k, v in sorted(out, key=lambda x: x[0])}


def _median(v: np.ndarray) -> float | None:
    """``statistics.median`` of sorted values."""
    n = len(v)
    if not n:
        return None
    i = n // 2
    return float(v[i]) if n % 2 else (float(v[i - 1]) + float(v[i])) / 2


class _Radii:
    """The radii in the threat norm of the window's decisions (one float each), for exact
    quantiles, medians and the histogram."""

    def __init__(self, f: _Facts, rows: np.ndarray) -> None:
        self.by = {"threat": _by(f, rows, "radius_threat", lambda g: (g["threat_norm"], g["threat_eps"])),
                   "model_label": _by(f, rows, "radius_threat", lambda g: g["model_label"]),
                   "policy_label": _by(f, rows, "radius_threat", lambda g: g["policy_label"])}

    def groups(self) -> list[tuple[tuple, np.ndarray]]:
        """Per threat model, most radii first, ties in order of first appearance."""
        return [(k, v) for k, (v, _) in sorted(self.by["threat"].items(), key=lambda kv: (-len(kv[1][0]), kv[1][1]))]

    def median(self, column: str, name: str) -> float | None:
        vals = self.by[column].get(name)
        return _median(vals[0]) if vals is not None else None


class _Backlog:
    """The window's routed decisions without a verdict: how many, by reason, and their
    ages. The routed ones are counted by group and hour; those with a verdict (read from
    the verdicts' side) are taken off."""

    def __init__(self, f: _Facts, hours: dict, rows: np.ndarray) -> None:
        self.f, self.rows = f, rows
        self.routed = f.gids(routed=1)
        n: Counter = Counter()
        first: dict[int, int] = {}
        for (gid, _h), (k, seq, _, _) in hours.items():
            if gid in self.routed:
                n[gid] += k
                first[gid] = min(first.get(gid, seq), seq)
        # each decision once, and only by a verdict on it (as the console's queue counts it,
        # VERDICT_COVERS): joined on the id alone, one stage's verdict took another stage's
        # waiting decision of the same event off, and a decision with two verdicts counted twice
        self.done = f.q("SELECT DISTINCT f.seq, f.gid, f.t FROM entries v CROSS JOIN facts f"
                        + f.where("f.routed = 1", "v.kind = 'verdict'", "f.entry_id = v.entry_id", VERDICT_COVERS,
                                  alias="f."),
                        ("decision", *f.bound_params))
        self.waiting = sum(n.values()) - len(self.done)
        done_seqs: dict[int, set] = defaultdict(set)
        for seq, gid, _ in self.done:
            done_seqs[gid].add(seq)
        reasons: dict[str, list] = {}  # reason -> [waiting, first waiting seq, place in that row's reasons]
        for gid in sorted(n):
            left = n[gid] - len(done_seqs[gid])
            if left <= 0:
                continue
            at = first[gid]
            if at in done_seqs[gid]:  # the group's first row has a verdict: its first waiting one is a few rows on
                at = next(s for s in f.first_rows(gid, len(done_seqs[gid]) + 1) if s not in done_seqs[gid])
            for place, r in enumerate(json.loads(f.groups[gid]["reasons"]) or [NO_REASON]):
                a = reasons.get(r)
                if a is None or (at, place) < (a[1], a[2]):
                    reasons[r] = [left + (a[0] if a else 0), at, place]
                else:
                    a[0] += left
        self.by_reason = {r: a[0] for r, a in sorted(reasons.items(), key=lambda kv: (-kv[1][0], kv[1][1], kv[1][2]))}

    def ages(self, as_of: datetime | None) -> np.ndarray:
        """Hours from each waiting decision (with a time) to ``as_of``."""
        if as_of is None:
            return np.zeros(0)
        routed = _lookup(self.f, self.rows, False)
        routed[self.routed] = True
        t = self.rows["t"][routed[self.rows["gid"]]]
        t = np.sort(t[np.isfinite(t)])
        done = np.sort(np.array([t for _, _, t in self.done if t is not None], dtype=np.float64))
        if len(done):  # take one equal value off per decision with a verdict
            nth = np.arange(len(done)) - np.searchsorted(done, done, "left")
            t = np.delete(t, np.searchsorted(t, done, "left") + nth)
        return (as_of.timestamp() - t) / 3600


def _histogram(vals: np.ndarray) -> dict:
    counts, edges = np.histogram(vals, bins=min(40, max(5, len(vals) // 3)))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _scope(g: _Groups, f: _Facts) -> dict:
    firsts = sorted(first for *_, first in ((k, min(r["first"] for r in g.rows if r["scope_key"] == k))
                                            for k in {r["scope_key"] for r in g.rows} if k is not None))[:100]
    scopes = {str(rec.get("scope")) for rec in f.records_at(firsts)}
    return {
        "statements": [{"title": t, "text": s} for t, s in SCOPE_STATEMENTS],
        "threat_models": [{"norm": n, "epsilon": e, "decisions": c} for n, e,
                          c in g.count("threat_norm", "threat_eps")],
        "certificate_families": [{"method": m, "mode": mo, "norm": no, "sigma": s, "alpha": a, "decisions": c}
                                 for m, mo, no, s, a, c in g.count("method", "mode", "norm", "sigma", "alpha")],
        "record_scope_examples": sorted(scopes)[:3],
    }


def _policies(g: _Groups, policy_entries: list[dict]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for p in policy_entries:
        key = (p.get("name"), str(p.get("version")), p.get("sha256"))
        rows.setdefault(key, {"name": key[0], "version": key[1], "sha256": key[2], "shadow": p.get("shadow"),
                              "ledger_entry": _ts(p.get("ts")), "first_decision": None, "last_decision": None,
                              "decisions": 0})
    for r in sorted(g.rows, key=lambda r: r["first"]):
        key = (r["policy"], r["policy_version"], r["policy_sha"])
        row = rows.setdefault(key, {"name": key[0], "version": key[1], "sha256": key[2], "shadow": None,
                                    "ledger_entry": None, "first_decision": None, "last_decision": None,
                                    "decisions": 0})
        row["decisions"] += r["n"]
        if row["shadow"] is None and r["policy_shadow"] is not None:
            row["shadow"] = bool(r["policy_shadow"])
        for t in (_from_epoch(r["t0"]), _from_epoch(r["t1"])):
            if t:
                row["first_decision"] = min(filter(None, [row["first_decision"], t]))
                row["last_decision"] = max(filter(None, [row["last_decision"], t]))
    out = []
    for row in rows.values():
        out.append({**row, **{k: _iso(row[k]) for k in ("ledger_entry", "first_decision", "last_decision")}})
    return sorted(out, key=lambda r: (r["first_decision"] or r["ledger_entry"] or "", str(r["name"])))


def _volumes(g: _Groups, dlq: _Groups, verdicts: list[dict], totals: dict) -> dict:
    return {
        "in_period": {"decision": g.total(), "verdict": len(verdicts), "dlq": dlq.total()},
        "ledger_totals": totals,
        "models": [{"name": n, "sha256": s, "decisions": c} for n, s, c in g.count("model", "model_sha")],
        "workers": {w: c for w, c in g.count("worker")},
    }


def _group_rows(g: _Groups, radii: _Radii, column: str, verdicts: list[dict],
                looked_up: list[dict | None]) -> list[dict]:
    verdict_counts: dict[str, Counter] = defaultdict(Counter)
    for v, dec in zip(verdicts, looked_up, strict=True):
        if dec is not None:
            verdict_counts[dec["model" if column == "model_label" else "policy"]][v.get("verdict")] += 1
    out = []
    for name, n in g.count(column):
        def mine(r, name=name):
            return r[column] == name

        by = {k: g.total(where=lambda r, k=k: mine(r) and r["decision"] == k) for k in DECISIONS}
        abst, not_cert = g.total("abstained", mine), g.total("not_certified", mine)
        verdict_of = verdict_counts.get(name, Counter())
        out.append({"name": name, "decisions": n, **by, **{f"{k}_rate": _rate(by[k], n) for k in DECISIONS},
                    "abstained": abst, "abstain_rate": _rate(abst, n), "not_certified_rate": _rate(not_cert, n),
                    "median_radius_threat": radii.median(column, name),
                    "threat_models": sorted({f"{r['threat_norm']} eps={r['threat_eps']}" for r in g.rows if mine(r)}),
                    "routed": g.total("routed", mine),
                    "verdicts": {k: verdict_of.get(k, 0) for k in VERDICTS}})
    return sorted(out, key=lambda r: (-r["decisions"], r["name"]))


def _breakdown(g: _Groups, radii: _Radii, verdicts: list[dict], looked_up: list[dict | None]) -> dict:
    """Per model, per policy (name, version and sha256), and which policy decided which model's events."""
    pairs = sorted(g.count("model_label", "policy_label"))
    return {"models": _group_rows(g, radii, "model_label", verdicts, looked_up),
            "policies": _group_rows(g, radii, "policy_label", verdicts, looked_up),
            "model_policy": [{"model": m, "policy": p, "decisions": c} for m, p, c in pairs]}


EXAMPLES_PER_MODEL = 3


def _examples(f: _Facts, fetch=None) -> list[dict]:
    """The first few routed or blocked decisions per model that carry their input, for
    pictures (images) or tables (tabular rows) in the HTML report. A tensor stored in
    the ledger is read through ``fetch`` and carried inline (base64) in the example."""

    by_model: dict[str, list[int]] = defaultdict(list)
    for gid in f.gids(has_input=1):
        grp = f.groups[gid]
        if grp["routed"] == 1 or grp["decision"] == "block":
            by_model[grp["model_label"]] += f.first_rows(gid, EXAMPLES_PER_MODEL)
    seqs = [s for firsts in by_model.values() for s in sorted(firsts)[:EXAMPLES_PER_MODEL]]
    out = []
    for d in f.records_at(sorted(seqs)):
        inp = d["input"]
        out.append({"id": d.get("id"), "model": model_name(d), "policy": _policy_name(d),
                    "decision": d.get("decision"),
                    "prediction": d.get("prediction"), "reasons": d.get("reasons") or [],
                    "input": inline_copy(inp, fetch)})
    return out


def _policy_name(d: dict) -> str:
    """Name, version and sha256 prefix: two policies both called ``default v1.0.0`` with
    different content are two rows, never one."""
    return policy_label(d.get("policy"))


def _decisions(g: _Groups, bucket: str) -> dict:
    series: dict[str, Counter] = defaultdict(Counter)
    for t, decision, n in g.count("bucket", "decision"):
        if t is not None:
            series[t][decision] += n
    totals = {d: n for d, n in g.count("decision")}
    return {
        "totals": {k: totals.get(k, 0) for k in DECISIONS},
        "bucket": bucket,
        "series": [{"t": k, **{c: series[k].get(c, 0) for c in DECISIONS}} for k in sorted(series)],
        "by_rule": {r: c for r, c in g.count("rule")},
        "reasons": dict(g.expand("reasons").most_common()),
    }


def _abstention(g: _Groups) -> dict:
    n, abst, not_cert = g.total(), g.total("abstained"), g.total("not_certified")
    by_method = {}
    for m in sorted({str(r["method"]) for r in g.rows}):
        def mine(r, m=m):
            return str(r["method"]) == m

        c, k = g.total(where=mine), g.total("abstained", mine)
        by_method[m] = {"decisions": c, "abstained": k, "rate": _rate(k, c)}
    return {"decisions": n, "abstained": abst, "rate": _rate(abst, n), "not_certified": not_cert,
            "not_certified_rate": _rate(not_cert, n), "by_method": by_method}


def _radius(radii: _Radii) -> dict:
    out = []
    for (norm, eps), vals in radii.groups():
        below = int(np.count_nonzero(vals < eps)) if eps is not None else 0
        out.append({"norm": norm, "epsilon": eps, "quantiles": _quantiles(vals, mean=False), "below_epsilon": below,
                    "below_epsilon_rate": _rate(below, len(vals)), "zero": int(np.count_nonzero(vals == 0.0)),
                    "histogram": _histogram(vals)})
    return {"groups": out}


FALSE_CERTIFICATES = (
    "Each certificate holds with probability at least 1 - alpha over the certifier's sampling noise, so the "
    "expected number of false certificates among the certified decisions below is at most the sum of their "
    "alphas (linearity of expectation: no independence between decisions is assumed). Deterministic families "
    "(interval bounds, Lipschitz, tree ensembles) carry no alpha and contribute 0. The figure bounds wrong "
    "certificates, not wrong decisions: a certificate is not a cleanliness check (Theorem 1).")
RADIUS_NOTE = (
    "The mean certified radius is not reported: a trivial classifier can have an arbitrarily large one (Sun, Mao, "
    "Mueller, Vechev), so this report shows the certified fraction at the policy's epsilon and the distribution "
    "of the lower bound on p_A instead; radius quantiles are secondary.")


def _certified_rows(g: _Groups, *keys: str) -> list[dict]:
    """Certified fraction at epsilon, abstention and model-fault rates per value of ``keys``."""
    out = []
    for *vals, n in g.count(*keys):
        def mine(r, vals=vals):
            return all(r[k] == v for k, v in zip(keys, vals))

        certified = n - g.total("not_certified", mine)
        abst = g.total("abstained", mine)
        faults = g.expand("reasons", mine).get("model_fault", 0)
        out.append({**dict(zip(keys, vals)), "decisions": n, "certified": certified,
                    "certified_rate": _rate(certified, n), "abstained": abst, "abstain_rate": _rate(abst, n),
                    "model_faults": faults, "model_fault_rate": _rate(faults, n)})
    return out


def _alpha_sums(g: _Groups, *keys: str) -> list[dict]:
    """Sum of alpha over certified decisions per value of ``keys`` (those without alpha: 0)."""
    acc: dict[tuple, dict] = {}
    for r in sorted(g.rows, key=lambda r: r["first"]):
        if r["not_certified"]:
            continue
        a = acc.setdefault(tuple(r[k] for k in keys), {"certified": 0, "alpha_sum": 0.0, "without_alpha": 0})
        a["certified"] += r["n"]
        if r["alpha"] is None:
            a["without_alpha"] += r["n"]
        else:
            a["alpha_sum"] += r["alpha"] * r["n"]
    return [{**dict(zip(keys, k)), **v} for k, v in sorted(acc.items(), key=lambda kv: tuple(map(str, kv[0])))]


def _certificates(g: _Groups, p_lower: dict[str, tuple]) -> dict:
    """The statistics that do not flatter: certified fraction at epsilon, abstention and
    model faults per model and policy, the p_A lower-bound distribution, and the stream's
    bound on false certificates (sum of alpha per model and period)."""
    total = _alpha_sums(g)
    return {
        "by_model": _certified_rows(g, "model_label"), "by_policy": _certified_rows(g, "policy_label"),
        "by_model_policy": _certified_rows(g, "model_label", "policy_label"),
        "p_lower": [{"model": m, "quantiles": _quantiles(v, mean=False), "histogram": _histogram(v)}
                    for m, (v, _) in sorted(p_lower.items())],
        "false_certificates": {
            "bound": total[0]["alpha_sum"] if total else 0.0,
            "certified": total[0]["certified"] if total else 0,
            "without_alpha": total[0]["without_alpha"] if total else 0,
            "by_model": _alpha_sums(g, "model_label"),
            "by_model_period": _alpha_sums(g, "model_label", "bucket"),
            "without_alpha_by_method": {m: c for m, c in g.count("method", where=lambda r: not r["not_certified"]
                                                                  and r["alpha"] is None)},
            "meaning": FALSE_CERTIFICATES,
        },
        "radius_note": RADIUS_NOTE,
    }


def _p50_p95(values: list[float] | np.ndarray) -> dict:
    if not len(values):
        return {"n": 0, "p50": None, "p95": None, "max": None}
    v = np.sort(values).tolist() if isinstance(values, np.ndarray) else sorted(values)
    return {"n": len(v), "p50": v[min(len(v) - 1, int(round(0.5 * (len(v) - 1))))],
            "p95": v[min(len(v) - 1, int(round(0.95 * (len(v) - 1))))], "max": v[-1]}


NO_REASON = "(no reason)"


def _review(g: _Groups, verdicts: list[dict], looked_up: list[dict | None], backlog: _Backlog,
            as_of: datetime | None) -> dict:
    """``as_of``: the end of the period (``until``, else the last decision), so the
    backlog's age is reproducible; the console's gauge has the age as of now."""
    n, routed, audit = g.total(), g.total("routed"), g.total("audit")
    counts = Counter(v.get("verdict") for v in verdicts)
    overrides, eligible, minutes, late = [], 0, [], 0
    by_reason: dict[str, dict] = defaultdict(lambda: {"minutes": [], "eligible": 0, "overrides": 0, "verdicts": 0})
    for v, dec in zip(verdicts, looked_up, strict=True):
        reasons = (dec or {}).get("reasons") or [NO_REASON]
        decision = v.get("decision") or (dec or {}).get("decision")
        overridden = (decision, v.get("verdict")) in CONTRADICTS
        for reason in reasons:
            by_reason[reason]["verdicts"] += 1
            by_reason[reason]["eligible"] += decision in ("allow", "block")
            by_reason[reason]["overrides"] += overridden
        if decision in ("allow", "block"):
            eligible += 1
            if overridden:
                overrides.append({"id": v.get("id"), "decision": decision, "verdict": v.get("verdict"),
                                  "reviewer": v.get("reviewer"), "ts": v.get("ts")})
        t_v, t_d = _ts(v.get("ts")), _ts(v.get("decision_ts") or (dec or {}).get("ts"))
        if t_v and t_d:
            minutes.append((t_v - t_d).total_seconds() / 60)
            for reason in reasons:
                by_reason[reason]["minutes"].append(minutes[-1])
        deadline = (dec or {}).get("deadline")
        if t_v and deadline is not None and t_v.timestamp() > deadline:
            late += 1
    # decisions (one per verdict now; an older unscoped verdict counts once per id) routed and reviewed
    reviewed_routed = len({(v.get("id"), decision_scope("verdict", v))
                           for v, dec in zip(verdicts, looked_up, strict=True) if (dec or {}).get("routed")})
    return {
        "routed": routed, "routed_rate": _rate(routed, n),
        "by_priority": {p: c for p, c in g.count("priority_label", where=lambda r: r["routed"])},
        "audit_samples": audit, "audit_rate": _rate(audit, n),
        "verdicts": {k: counts.get(k, 0) for k in VERDICTS}, "verdicts_total": len(verdicts),
        "reviewers": dict(Counter(str(v.get("reviewer")) for v in verdicts).most_common()),
        "overrides": len(overrides), "override_eligible": eligible, "override_rate": _rate(len(overrides), eligible),
        "override_definition": "a verdict contradicts the decision: allow then confirmed_manipulated, or block then "
                               "confirmed_clean (review decisions leave the call to the reviewer and never count)",
        "override_examples": overrides[:10],
        "minutes_to_review": _quantiles(minutes), "minutes_values": minutes,
        "by_reason": [{"reason": r, "verdicts": b["verdicts"], "minutes_to_verdict": _p50_p95(b["minutes"]),
                       "overrides": b["overrides"], "override_eligible": b["eligible"],
                       "override_rate": _rate(b["overrides"], b["eligible"])}
                      for r, b in sorted(by_reason.items(), key=lambda kv: (-kv[1]["verdicts"], kv[0]))],
        "backlog": {"waiting": backlog.waiting, "as_of": _iso(as_of), "age_hours": _p50_p95(backlog.ages(as_of)),
                    "by_reason": backlog.by_reason},
        "deadline_missed": late,
        "pending": routed - reviewed_routed,
        "agreement": _agreement([v for v in verdicts if v.get("double_review") == "sample"]),
        # an override given by two reviewers: a four-eyes pair, or a double-review sample's
        "four_eyes_overrides": sum(1 for v in verdicts if v.get("double_review") in ("four_eyes", "sample")
                                   and (v.get("decision"), v.get("verdict")) in CONTRADICTS
                                   and v.get("verdict") in (v.get("first_verdict"), v.get("second_verdict"))),
    }


def _agreement(pairs: list[dict]) -> dict:
    """Agreement of two independent reviewers on the double-review sample: observed
    agreement and Cohen's kappa (agreement beyond what the reviewers' verdict rates give by chance)."""
    n = len(pairs)
    # the pair is the first two reviews: a third reviewer's verdict settles a disagreement, not the sample
    seconds = [v.get("second_verdict", v.get("verdict")) for v in pairs]
    agree = sum(1 for v, s in zip(pairs, seconds, strict=True) if s == v.get("first_verdict"))
    first, second = Counter(v.get("first_verdict") for v in pairs), Counter(seconds)
    chance = sum(first[k] * second[k] for k in VERDICTS) / (n * n) if n else None
    kappa = None
    if n and chance is not None and chance < 1:
        kappa = (agree / n - chance) / (1 - chance)
    return {"pairs": n, "agree": agree, "rate": _rate(agree, n), "cohen_kappa": kappa,
            "definition": "items drawn by event id (review.double_review_fraction) judged by two reviewers, the "
                          "second without seeing the first verdict"}


def _dlq(g: _Groups) -> dict:
    return {"total": g.total(), "by_reason": {v: c for v, c in g.count("dlq_reason")},
            "by_source_topic": {v: c for v, c in g.count("dlq_source")}}


def _controls(data: dict, cited: Counter) -> list[dict]:
    have = {
        "policies": bool(data["policies"]), "volumes": data["volumes"]["in_period"]["decision"] > 0,
        "decisions": data["volumes"]["in_period"]["decision"] > 0, "scope": True,
        "abstention": data["abstention"]["decisions"] > 0, "radius": bool(data["radius"]["groups"]),
        "review": data["review"]["routed"] > 0 or data["review"]["verdicts_total"] > 0,
        "dlq": True, "integrity": True, "breakdown": bool(data["breakdown"]["models"]),
    }
    rows = []
    for c in mapping().values():
        present = [s for s in c.sections if have.get(s)]
        rows.append({
            "framework": c.framework, "mapping_version": c.mapping_version,
            "id": c.short_id, "full_id": c.id, "name": c.title, "evidence": c.evidence,
            "sections": list(c.sections),
            "status": ("ledger not verified in this report"
                       if "integrity" in c.sections and data["integrity"]["ok"] is None
                       else "ledger verification FAILED" if "integrity" in c.sections and not data["integrity"]["ok"]
                       else "evidence in this report" if present else "no entries in this period"),
            "cited_by_decisions": cited.get(c.id, 0),
        })
    return rows
