"""Synthetic full records in the exact shapes of docs/records.md, for ledger and report tests."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta

from riskpipe.ledger import Ledger, dlq_record, policy_record
from riskpipe.timestamps import rfc3339_micros as rfc3339

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
POLICY = {"name": "default", "version": "3", "sha256": hashlib.sha256(b"default-policy-v3").hexdigest(),
          "shadow": False}
POLICY_V4 = {"name": "default", "version": "4", "sha256": hashlib.sha256(b"default-policy-v4").hexdigest(),
             "shadow": False}
MODEL = {"name": "digits", "spec": "demo:digits", "sha256": hashlib.sha256(b"digits-weights").hexdigest()}
CONTROLS = ["GOVERN 1.4", "MEASURE 2.7", "MANAGE 1.3", "ISO/IEC 27001:2022 A.8.15", "ISO/IEC 27001:2022 A.5.33"]
SCOPE = ("l2 radius of the Gaussian-smoothed classifier (sigma=0.25), holds with probability >= 0.999 over the noise; "
         "a certificate says nothing about whether the input is clean (adversarial inputs can be certified too)")


def decision_record(i: int, *, t: datetime | None = None, radius: float = 0.6, abstained: bool = False,
                    decision: str | None = None, policy: dict = POLICY, epsilon: float = 0.25,
                    audit_sample: bool = False, worker: str = "w1") -> dict:
    """One full decision record; radius is l2, converted to the l2 threat norm (factor 1)."""
    t = t or T0 + timedelta(minutes=i)
    radius = 0.0 if abstained else radius
    certified = not abstained and radius >= epsilon
    if decision is None:
        decision = "allow" if certified else "review"
    routed = decision == "review" or audit_sample
    cert = {
        "method": "smoothing", "mode": "decide", "norm": "l2", "radius": radius, "abstained": abstained,
        "predicted_class": None if abstained else i % 10, "p_lower": 0.93 if not abstained else 0.41,
        "p_upper": None, "sigma": 0.25, "alpha": 0.001, "n_samples": 2000, "elapsed_ms": 12.5,
        "seed": 1000 + i, "epsilon": epsilon, "certified": certified,
        "reason": None if certified else ("abstained" if abstained else "below_epsilon"),
        "bound": None, "input_dim": 64, "extra": {"max_samples": 20000, "looks": 2},
        "scope": SCOPE, "radius_threat": radius, "threat_norm": "l2", "threat_epsilon": epsilon,
    }
    eid = f"evt-{i:05d}"
    return {
        "id": eid, "ts": rfc3339(t), "event_ts": rfc3339(t - timedelta(milliseconds=40)),
        "model": dict(MODEL), "policy": dict(policy), "certificate": cert,
        "context": {"nearest_other_class_distance": 2.1, "radius_to_distance_ratio": radius / 2.1,
                    "radius_percentile": 0.5, "reference": "digits-train"},
        "signals": {"certificate_risk": {"value": 0.0 if certified else 1.0, "radius_threat": radius,
                                         "flagged": not certified},
                    "upstream_risk": {"value": 0.1, "flagged": False},
                    "context_risk": {"value": 0.2, "flagged": False}},
        "score": 0.1 if certified else 0.7, "decision": decision,
        "rule": ("certified-allow" if decision == "allow"
                 else "uncertified-review" if decision == "review" else "high-risk-block"),
        "reasons": [] if certified else ["no_certificate"], "controls": list(CONTROLS),
        "review": {"routed": routed, "priority": 1 if abstained else (2 if routed else None),
                   "deadline": rfc3339(t + timedelta(hours=4)) if routed else None, "audit_sample": audit_sample},
        "explanation": "score = max(signals); rule fired on certificate risk", "scope": SCOPE,
        "input": {"sha256": hashlib.sha256(eid.encode()).hexdigest(), "shape": [1, 8, 8], "datatype": "FP32"},
        "prediction": i % 10, "upstream_risk": 0.1,
        "source": {"topic": "inferences", "partition": 0, "offset": i}, "worker": worker,
    }


def verdict_record(decision: dict, verdict: str, minutes_later: float, reviewer: str = "alice") -> dict:
    t = datetime.fromisoformat(decision["ts"]) + timedelta(minutes=minutes_later)
    return {"id": decision["id"], "verdict": verdict, "note": "checked by hand", "reviewer": reviewer,
            "ts": rfc3339(t), "decision_ts": decision["ts"], "decision": decision["decision"],
            "policy_version": decision["policy"]["version"]}


def build_ledger(path, n: int = 60, seed: int = 0) -> dict:
    """A ledger with decisions of every kind, verdicts, two policy versions and DLQ entries.

    Returns the counts a test can check the report against.
    """
    rng = random.Random(seed)
    decisions, verdicts, dlq = [], [], []
    for i in range(n):
        u = rng.random()
        policy = POLICY if i < n // 2 else POLICY_V4
        t = T0 + timedelta(hours=i * 2)  # spans several days
        if u < 0.15:
            d = decision_record(i, t=t, abstained=True, policy=policy)
        elif u < 0.30:
            d = decision_record(i, t=t, radius=round(rng.uniform(0.01, 0.24), 4), policy=policy)
        elif u < 0.38:
            d = decision_record(i, t=t, radius=round(rng.uniform(0.3, 1.0), 4), decision="block", policy=policy)
        else:
            d = decision_record(i, t=t, radius=round(rng.uniform(0.26, 1.5), 4), policy=policy,
                                audit_sample=rng.random() < 0.1)
        decisions.append(d)
    for d in decisions:
        if d["review"]["routed"] or d["decision"] == "block":
            verdict = rng.choice(["confirmed_clean", "confirmed_manipulated", "unsure"])
            verdicts.append(verdict_record(d, verdict, minutes_later=rng.uniform(5, 300)))
    reasons = ["invalid_json", "wrong_shape", "wrong_shape", "non_finite", "missing_field"]
    for k, reason in enumerate(reasons):
        dlq.append(dlq_record(reason, b"payload-%d" % k, rfc3339(T0 + timedelta(hours=k * 5)), topic="inferences",
                              partition=0, offset=10_000 + k, message=f"{reason} at offset {10_000 + k}"))
    with Ledger(path) as led:
        for pol, t in ((POLICY, T0), (POLICY_V4, T0 + timedelta(hours=n))):
            rec, eid = policy_record(pol["name"], pol["version"], pol["sha256"], rfc3339(t))
            led.append(rec, "policy", eid)
        led.append_many(decisions, "decision")
        led.append_many(verdicts, "verdict")
        led.append_entries(("dlq", rec, eid) for rec, eid in dlq)
    return {"decisions": decisions, "verdicts": verdicts, "dlq": [r for r, _ in dlq]}


def as_superuser(target, statements, tables=("entries",)) -> None:
    """Run SQL with full database rights, the append-only triggers out of the way: on
    PostgreSQL for this session (``session_replication_role = replica``), on SQLite by
    dropping the update and delete triggers of ``tables``."""
    import sqlite3

    if str(target).startswith("postgresql://"):
        import psycopg

        with psycopg.connect(str(target), autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")
            for s in statements:
                conn.execute(s)
        return
    db = sqlite3.connect(str(target), isolation_level=None)
    for table in tables:
        db.execute(f"DROP TRIGGER {table}_no_update")
        db.execute(f"DROP TRIGGER {table}_no_delete")
    for s in statements:
        db.execute(s)
    db.close()


def forge_tree(target) -> None:
    """Rebuild the Merkle tree from the rows as they are now, as a forger with full
    database rights would after editing or cutting rows (triggers bypassed)."""
    import sqlite3

    from riskpipe.ledger.tree import build_existing

    if str(target).startswith("postgresql://"):
        import psycopg

        from riskpipe.ledger.postgres import _Conn

        with psycopg.connect(str(target), autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")
            db = _Conn(conn)
            with conn.transaction():
                db.execute("DELETE FROM tree_nodes")
                db.execute("DELETE FROM tree_state")
                build_existing(db)
        return
    db = sqlite3.connect(str(target), isolation_level=None)
    db.execute("DROP TRIGGER IF EXISTS tree_nodes_no_delete")
    db.execute("DELETE FROM tree_nodes")
    db.execute("DELETE FROM tree_state")
    build_existing(db)
    db.close()
