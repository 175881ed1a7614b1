"""The ``facts`` table: what the report and the review queue group, filter and sort by,
one row per decision and dead letter, written in the same transaction as its ledger row.

Why: the compliance report and the review queue used to parse every record in Python,
so their cost grew with the ledger (31 s for a report at 100,000 rows). With these
columns they are SQL aggregates and indexed lookups on either backend; only the records
they show (review items, examples, verdicts) are read whole.

The table is derived data: every column is a pure function of the record
(:func:`facts_of`) and the rows are append-only like ``entries`` (triggers, which stop
accidents, not someone with write access to the database). The hash chain, not this
table, is the evidence: ``riskpipe ledger verify`` checks the chain; the report states
that its figures are read from this table, and checks that it holds one row per
decision and dead letter in the ledger (a deleted or added row shows), and when it
verifies it recomputes every facts row, group and hourly count from the records
(:func:`recheck`), so an edit of these tables (which their triggers do not stop for the
database's owner; ``fact_groups`` has none) shows as a failed integrity check.

Schema 7 (SQLite; 8 on PostgreSQL) adds what keeps the report's cost flat as the ledger
grows: ``p_lower`` (the certificate's lower bound on p_A, so the report no longer parses
records for it), and ``gid``, an integer code for the row's *group* -- its values of
:data:`GROUP_COLUMNS`, the columns the report counts by and the queue filters on -- listed
once in ``fact_groups``. ``fact_counts`` holds, per group and hour, how many rows there
are, the first row's seq and the time span, kept up to date in the append transaction, so
the report's counts read a few rows per group and hour instead of every row. The
report checks that ``fact_counts`` adds up to the facts rows.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson

from riskpipe.ledger.chain import LedgerError, parse_ts, ts_epoch
from riskpipe.ledger.conn import Db, Row
from riskpipe.policy.naming import policy_label

KINDS = ("decision", "dlq")
NO_PRIORITY = 2**62  # sorts after every priority a record can carry (in the ``priority`` column)
NO_DEADLINE = 1e300  # sorts after every deadline (in the ``due`` column; ``deadline`` stays NULL)

# (column, SQL type) in insert order; "REAL" is a double on both backends once mapped.
# Schema 6's columns: its migration step creates exactly these (schema 7 adds the rest).
COLUMNS_V6: tuple[tuple[str, str], ...] = (
    ("seq", "INT"), ("kind", "TEXT"), ("entry_id", "TEXT"),
    ("t", "REAL"), ("hour", "TEXT"), ("day", "TEXT"),
    ("decision", "TEXT"), ("model", "TEXT"), ("model_sha", "TEXT"), ("model_label", "TEXT"),
    ("policy", "TEXT"), ("policy_version", "TEXT"), ("policy_sha", "TEXT"), ("policy_shadow", "INTEGER"),
    ("policy_label", "TEXT"),
    ("method", "TEXT"), ("mode", "TEXT"), ("norm", "TEXT"), ("sigma", "REAL"), ("alpha", "REAL"),
    ("threat_norm", "TEXT"), ("threat_eps", "REAL"), ("radius_threat", "REAL"),
    ("abstained", "INTEGER"), ("not_certified", "INTEGER"),
    ("routed", "INTEGER"), ("audit", "INTEGER"), ("needs_review", "INTEGER"), ("review_ok", "INTEGER"),
    ("priority", "BIG"), ("priority_label", "TEXT"), ("deadline", "REAL"), ("due", "REAL"),
    ("rule", "TEXT"), ("worker", "TEXT"), ("has_input", "INTEGER"), ("scope_key", "TEXT"),
    ("reasons", "TEXT"), ("controls", "TEXT"), ("dlq_reason", "TEXT"), ("dlq_source", "TEXT"),
)
COLUMNS = (*COLUMNS_V6, ("p_lower", "REAL"), ("gid", "BIG"))
NAMES = tuple(c for c, _ in COLUMNS)
_INSERT = f"INSERT INTO facts ({', '.join(NAMES)}) VALUES ({','.join('?' * len(NAMES))})"
_INSERT_V6 = f"INSERT INTO facts ({', '.join(NAMES[:len(COLUMNS_V6)])}) VALUES ({','.join('?' * len(COLUMNS_V6))})"

# What the report counts decisions and dead letters by, and the queue filters on: each
# distinct combination of these values is one group (a few per model, policy and worker,
# however many rows), coded by ``gid``.
GROUP_COLUMNS = (
    "kind", "decision", "model", "model_sha", "model_label", "policy", "policy_version", "policy_sha", "policy_label",
    "policy_shadow", "method", "mode", "norm", "sigma", "alpha", "threat_norm", "threat_eps", "rule", "worker",
    "reasons", "controls", "priority_label", "abstained", "not_certified", "routed", "audit", "needs_review",
    "review_ok", "has_input", "scope_key", "dlq_reason", "dlq_source",
)
NO_HOUR = -2**62  # fact_counts.h of the rows without a time
# (gid, hour) -> [rows, first seq, first t, last t]: what fact_counts holds, as a batch adds to it
Counts = dict[tuple[int, int], list[Any]]
_TYPES = dict(COLUMNS)
_AT = {c: i for i, c in enumerate(NAMES)}
_GROUP_AT = [_AT[c] for c in GROUP_COLUMNS]
_GROUP_OF: Callable[[Row], Row] = operator.itemgetter(*_GROUP_AT)  # a facts row's GROUP_COLUMNS values
_INSERT_GROUP = (f"INSERT INTO fact_groups (gid, gkey, {', '.join(GROUP_COLUMNS)}) "
                 f"VALUES ({','.join('?' * (len(GROUP_COLUMNS) + 2))})")
_ADD_COUNTS = (  # with the VALUES rows in place of {values}
    "INSERT INTO fact_counts (gid, h, n, first_seq, t0, t1) VALUES {values} ON CONFLICT (gid, h) DO UPDATE SET "
    "n = fact_counts.n + excluded.n, "
    "first_seq = CASE WHEN excluded.first_seq < fact_counts.first_seq THEN excluded.first_seq "
    "ELSE fact_counts.first_seq END, "
    "t0 = CASE WHEN excluded.t0 < fact_counts.t0 THEN excluded.t0 ELSE fact_counts.t0 END, "
    "t1 = CASE WHEN excluded.t1 > fact_counts.t1 THEN excluded.t1 ELSE fact_counts.t1 END")


def v8_statements() -> list[str | Callable[[Db], None]]:
    """Schema 8: a group's queue items through an index that leads with the group *and* the
    queue's two flags, so the planner takes it over ``facts_queue`` (whose two flags alone
    it otherwise prefers, walking the whole queue for a rare group)."""
    return [
        "DROP INDEX facts_queue_gid",
        "CREATE INDEX facts_queue_group ON facts (gid, needs_review, review_ok, priority, due, seq) "
        "WHERE needs_review = 1 AND review_ok = 1",
    ]


def _sql_types(int_type: str, real_type: str) -> dict[str, str]:
    return {"INT": f"{int_type} PRIMARY KEY", "BIG": int_type, "REAL": real_type, "INTEGER": "INTEGER", "TEXT": "TEXT"}


def table_statements(int_type: str, real_type: str) -> list[str]:
    """Schema 6: the table and the indexes the report and the queue read through."""
    types = _sql_types(int_type, real_type)
    cols = ",\n            ".join(f"{c} {types[t]}" for c, t in COLUMNS_V6)
    return [
        f"CREATE TABLE facts (\n            {cols})",
        "CREATE INDEX facts_kind_t ON facts (kind, t)",
        "CREATE INDEX facts_entry_id ON facts (entry_id)",
        # the queue's order (priority 1 first, no priority last, then deadline, none last, then arrival)
        "CREATE INDEX facts_queue ON facts (needs_review, review_ok, priority, due, seq)",
        "CREATE INDEX facts_radius ON facts (threat_norm, threat_eps, radius_threat)",
    ]


def v7_statements(int_type: str, real_type: str, number_at: Callable[[str], str], unlock: list[str],
                  lock: list[str]) -> list[str | Callable[[Db], None]]:
    """Schema 7: ``p_lower`` and ``gid`` on the facts rows, ``fact_groups`` and
    ``fact_counts``, filled for the rows a ledger already holds (``number_at``: the
    backend's SQL for a numeric record field; ``unlock``/``lock``: its statements that
    lift and restore the facts table's refusal of updates around the backfill), and the
    indexes the report and the queue read through."""
    types = _sql_types(int_type, real_type)
    group_cols = ",\n            ".join(f"{c} {types[_TYPES[c]] if c != 'kind' else 'TEXT NOT NULL'}"
                                        for c in GROUP_COLUMNS)
    return [
        f"ALTER TABLE facts ADD COLUMN p_lower {real_type}",
        f"ALTER TABLE facts ADD COLUMN gid {int_type}",
        f"""CREATE TABLE fact_groups (
            gid  {int_type} PRIMARY KEY,
            gkey TEXT NOT NULL UNIQUE,
            {group_cols})""",
        f"""CREATE TABLE fact_counts (
            gid       {int_type} NOT NULL,
            h         {int_type} NOT NULL,
            n         {int_type} NOT NULL,
            first_seq {int_type} NOT NULL,
            t0        {real_type},
            t1        {real_type},
            PRIMARY KEY (gid, h))""",
        *unlock,
        f"UPDATE facts SET p_lower = (SELECT {number_at('certificate.p_lower')} FROM entries e WHERE e.seq = "
        "facts.seq) "
        "WHERE kind = 'decision'",
        build_groups,
        *lock,
        "DROP INDEX facts_kind_t",
        "DROP INDEX facts_radius",
        # the report's window: its counts outside whole hours, and its distributions, from the index alone
        "CREATE INDEX facts_window ON facts (kind, t, gid, radius_threat, p_lower)",
        # a group's rows in chain order (the report's examples) and its queue items in queue order
        # (a filtered or scoped queue page reads each group's range)
        "CREATE INDEX facts_gid ON facts (gid, seq, t)",
        # (schema 8 replaces it with facts_queue_group)
        "CREATE INDEX facts_queue_gid ON facts (gid, priority, due, seq) WHERE needs_review = 1 AND review_ok = 1",
        # queue items by deadline: the console notes each breach once, looking only at deadlines passed since
        "CREATE INDEX facts_queue_deadline ON facts (deadline) WHERE needs_review = 1 AND review_ok = 1",
    ]


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _epoch(v: Any) -> float | None:
    try:
        if v.__class__ is str:
            return ts_epoch(v)  # a record's ts: parsed once already as the append checked it
        return parse_ts(v).timestamp() if v is not None else None
    except LedgerError:
        return None


def _bool(v: Any) -> int:
    return 1 if v is True else 0


def _deadline(review: Any) -> tuple[float | None, int]:
    """(deadline as epoch seconds or None, whether the console can show the item: the
    checks of ``riskpipe.review.queue.check_decision_record``)."""
    if not isinstance(review, dict):
        return None, 0
    t = _epoch(review.get("deadline"))
    prio = review.get("priority")
    ok = (prio is None or (isinstance(prio, int) and not isinstance(prio, bool))) and (
        review.get("deadline") is None or t is not None)
    return t, int(ok)


def facts_of(seq: int, kind: str, entry_id: str, record: dict[str, Any]) -> Row | None:
    """The facts row of one ledger row (None for kinds the report reads whole); its
    ``gid`` is None until :func:`insert` gives it the group's code. Built as one tuple
    in :data:`NAMES` order (it runs per decision on the ledger writer thread, where
    every microsecond of Python holds the GIL the stage's certification needs)."""
    if kind not in KINDS:
        return None

    t = _epoch(record.get("ts"))
    hour, day = _hour_day(hour_of(t)) if t is not None else (None, None)
    if kind == "dlq":
        return (seq, kind, entry_id, t, hour, day, *_DLQ_NONE,
                str(record.get("reason")), str(_get(record, "source", "topic") or _get(record, "source", "file")),
                None, None)
    get = record.get
    cert, review, model, policy = get("certificate"), get("review"), get("model"), get("policy")
    # each sub-object or {} (what _get does per lookup, once per object: the rows are written per decision)
    c = cert if isinstance(cert, dict) else _NO_OBJECT
    r = review if isinstance(review, dict) else _NO_OBJECT
    m = model if isinstance(model, dict) else _NO_OBJECT
    p = policy if isinstance(policy, dict) else _NO_OBJECT
    abstained = c.get("abstained") is True
    prio = r.get("priority")
    shadow = p.get("shadow")
    deadline, review_ok = _deadline(review)
    inp = get("input")
    scope = get("scope")
    return (
        seq, kind, entry_id, t, hour, day,
        _text(get("decision")),
        _text(m.get("name")), _text(m.get("sha256")), str(model.get("name") if isinstance(model, dict) else model),
        _text(p.get("name")), str(p.get("version")), _text(p.get("sha256")),
        int(shadow) if isinstance(shadow, bool) else None, policy_label(policy),
        _text(c.get("method")), _text(c.get("mode")), _text(c.get("norm")), _num(c.get("sigma")),
        _num(c.get("alpha")), _text(c.get("threat_norm")), _num(c.get("threat_epsilon")), _num(c.get("radius_threat")),
        int(abstained), int(abstained or c.get("certified") is False),
        _bool(r.get("routed")), _bool(r.get("audit_sample")),
        int(isinstance(review, dict) and bool(review.get("routed") or review.get("audit_sample"))),
        review_ok, _priority_key(prio) if review_ok else NO_PRIORITY, str(prio),
        deadline, NO_DEADLINE if deadline is None else deadline,
        str(get("rule")), str(get("worker")),
        int(isinstance(inp, dict) and (inp.get("data") is not None or isinstance(inp.get("tensor"), dict))),
        _scope_key(scope if type(scope) is str else str(scope)) if scope else None,
        _list_text(get("reasons")), _list_text(get("controls")),
        None, None,  # dlq_reason, dlq_source
        _num(c.get("p_lower")), None,  # p_lower, gid
    )


assert NAMES[-1] == "gid"  # insert sets it by replacing the last value
_DLQ_NONE = (None,) * (_AT["dlq_reason"] - _AT["day"] - 1)  # a dead letter's columns from decision to dlq_source
_NO_OBJECT: dict[str, Any] = {}


@lru_cache(maxsize=256)
def _scope_key(scope: str) -> str:
    """``scope_key``: a short digest of the record's scope text (the same text on most rows)."""
    return hashlib.sha256(scope.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@lru_cache(maxsize=4096)
def _hour_day(h: int) -> tuple[str, str]:
    """The ``hour`` and ``day`` texts of hour number ``h`` (``hour_of``): one strftime
    pair per hour rather than per row."""
    when = datetime.fromtimestamp(h * 3600, UTC)
    return when.strftime("%Y-%m-%dT%H:00Z"), when.strftime("%Y-%m-%d")


def _priority_key(prio: Any) -> int:
    """The queue's sort key: the priority (clamped into 64 bits), NO_PRIORITY when none."""
    if prio is None or isinstance(prio, bool) or not isinstance(prio, int):
        return NO_PRIORITY
    return max(-NO_PRIORITY, min(NO_PRIORITY - 1, prio))


def _list_text(v: Any) -> str:
    """A list field as canonical JSON text (``[]`` when absent), grouped on in SQL and
    expanded in Python: the distinct combinations are few (so a list of texts is
    encoded once per combination)."""
    if not isinstance(v, (list, tuple)):
        return "[]"
    if all(type(x) is str for x in v):
        return _texts_json(tuple(v))
    return json.dumps(list(v), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


@lru_cache(maxsize=4096)
def _texts_json(v: tuple[str, ...]) -> str:
    return json.dumps(list(v), separators=(",", ":"), ensure_ascii=False)


def insert(db: Db, rows: list[tuple[int, str, str, dict[str, Any]]]) -> None:
    """Insert the facts of ``(seq, kind, entry_id, record)`` rows (inside the append),
    with their group codes, and add them to ``fact_counts``."""
    facts = [f for f in (facts_of(*r) for r in rows) if f is not None]
    if not facts:
        return
    by_group: dict[Row, list[int]] = {}  # each group's rows: its 32 values hashed once per row
    for i, f in enumerate(facts):
        by_group.setdefault(_GROUP_OF(f), []).append(i)
    gids = group_ids(db, set(by_group))
    counts: Counts = {}
    seq_at, t_at = _AT["seq"], _AT["t"]
    for g, rows_of in by_group.items():
        gid = gids[g]
        for i in rows_of:
            f = facts[i] = facts[i][:-1] + (gid,)  # gid is the last column
            count_row(counts, gid, f[seq_at], f[t_at])
    db.executemany(_INSERT, facts)
    _add_counts(db, counts)


def group_key(values: Row) -> str:
    """``fact_groups.gkey``: the group's values (GROUP_COLUMNS order) as one text, hashed."""
    text = json.dumps(list(values), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def group_ids(db: Db, groups: set[Row]) -> dict[Row, int]:
    """The ``gid`` of each group (its GROUP_COLUMNS values); groups not yet listed in
    ``fact_groups`` are added (inside the append lock: one writer numbers them)."""
    keys = {group_key(g): g for g in groups}
    out: dict[Row, int] = {}
    texts = sorted(keys)
    for i in range(0, len(texts), 500):
        chunk = texts[i:i + 500]
        for gid, gkey in db.execute(f"SELECT gid, gkey FROM fact_groups WHERE gkey IN ({','.join('?' * len(chunk))})",
                                    tuple(chunk)).fetchall():
            out[keys[gkey]] = gid
    new = [k for k in texts if keys[k] not in out]
    if new:
        top = int(db.execute("SELECT COALESCE(MAX(gid), 0) FROM fact_groups").fetchone()[0])
        rows = []
        for k in new:
            top += 1
            out[keys[k]] = top
            rows.append((top, k, *keys[k]))
        db.executemany(_INSERT_GROUP, rows)
    return out


def hour_of(t: float | None) -> int:
    """``fact_counts.h``: the hour a row's time falls in (``t // 3600``, exact for floats),
    NO_HOUR without a time."""
    return NO_HOUR if t is None else int(t // 3600)


def count_row(counts: dict[tuple[Any, int], list[Any]], gid: Any, seq: int, t: float | None) -> None:
    """Add a row to ``counts`` (``(gid, hour) -> [rows, first seq, first t, last t]``; the
    group may be named by its values instead of its gid, as ``recheck`` does)."""
    key = (gid, hour_of(t))
    c = counts.get(key)
    if c is None:
        counts[key] = [1, seq, t, t]
        return
    c[0] += 1
    c[1] = min(c[1], seq)
    if t is not None:
        c[2], c[3] = min(c[2], t), max(c[3], t)


def _add_counts(db: Db, counts: Counts) -> None:
    """Add ``counts`` to ``fact_counts``: one statement per 500 (gid, hour) pairs, not one
    per pair (psycopg's pipelined executemany costs ~0.1 ms of Python per statement; the
    pairs are distinct, so no row is updated twice by one statement)."""
    rows = [(gid, h, *c) for (gid, h), c in sorted(counts.items())]
    for i in range(0, len(rows), 500):
        chunk = rows[i:i + 500]
        db.execute(_ADD_COUNTS.format(values=",".join(["(?,?,?,?,?,?)"] * len(chunk))),
                   tuple(v for row in chunk for v in row))


def _record(text: str | bytes) -> Any:
    """A stored record's dict: orjson reads canonical JSON as the standard library does,
    which decides what orjson refuses (an integer beyond 64 bits)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def recheck(q: Any, most: int = 5) -> list[str]:
    """What the derived tables say that the records do not: every facts row, its group
    (``fact_groups``: values and key) and ``fact_counts`` recomputed from the records of a
    read snapshot ``q`` (``Ledger.snapshot``) and compared; at most ``most`` problems
    named, [] when they are exactly the records'. The hash chain proves the records, not
    these tables, so the report runs this when it verifies: one edited ``fact_groups``
    row (no trigger stops a database owner) turned every review of its group into an
    allow in the report's figures while it said "verified". Costs a JSON parse and a
    :func:`facts_of` per row, like the chain walk it goes with."""
    problems: list[str] = []

    def problem(text: str) -> None:
        if len(problems) < most:
            problems.append(text)

    groups: dict[int, Row] = {}
    for gid, gkey, *values in q(f"SELECT gid, gkey, {', '.join(GROUP_COLUMNS)} FROM fact_groups", ()):
        groups[gid] = tuple(values)
        if group_key(groups[gid]) != gkey:
            problem(f"fact_groups row {gid}: its gkey is not the hash of its values")
    want: dict[tuple[Row, int], list[Any]] = {}
    seq_at, t_at = _AT["seq"], _AT["t"]
    stored_cols = ", ".join(f"f.{c}" for c in NAMES)
    sql = (f"SELECT e.seq, e.kind, e.entry_id, e.record, {stored_cols} FROM entries e LEFT JOIN facts f "
           "ON f.seq = e.seq WHERE e.kind IN ('decision', 'dlq') AND e.seq IS NOT NULL ORDER BY e.seq")
    for rows in q.stream(sql, ()):
        for seq, kind, entry_id, text, *stored in rows:
            row = facts_of(seq, kind, entry_id, _record(text))
            assert row is not None  # decision and dlq rows have facts
            group = _GROUP_OF(row)
            if stored[seq_at] is None:
                problem(f"row {seq}: no facts row")
            elif tuple(stored[:-1]) != row[:-1]:
                column = next(c for c, a, b in zip(NAMES, stored, row) if a != b)
                problem(f"row {seq}: its facts row differs from its record ({column})")
            elif groups.get(stored[-1]) != group:
                problem(f"row {seq}: its group (fact_groups row {stored[-1]}) differs from its record's")
            count_row(want, group, seq, row[t_at])
    have: dict[tuple[Row, int], list[Any]] = {}
    for gid, h, n, first, t0, t1 in q("SELECT gid, h, n, first_seq, t0, t1 FROM fact_counts", ()):
        key = (groups.get(gid, ()), h)
        if key in have:  # two groups with one set of values: a forged duplicate
            problem(f"fact_counts: group {gid} repeats another group's values")
        have[key] = [n, first, t0, t1]
    for key in sorted(set(want) | set(have), key=repr):
        if want.get(key) != have.get(key):
            got, need = have.get(key, [0])[0], want.get(key, [0])[0]
            problem(f"fact_counts: hour {key[1]} of a {key[0][0] if key[0] else '(missing)'} group holds "
                    f"{got} rows ({have.get(key)}), its records give {need} ({want.get(key)})")
    return problems


def build_existing(db: Db) -> None:
    """Migration step 6: the facts of the rows an older ledger already holds (schema 6's
    columns; step 7 adds the rest as it does for every schema-6 ledger)."""
    n = len(COLUMNS_V6)
    last = 0
    while True:  # pages by seq: bounded memory on a large ledger
        rows = db.execute("SELECT seq, kind, entry_id, record FROM entries WHERE seq > ? AND kind IN ('decision', "
                          "'dlq') "
                          "ORDER BY seq LIMIT 5000", (last,)).fetchall()
        if not rows:
            return
        facts = (facts_of(seq, kind, eid, json.loads(text)) for seq, kind, eid, text in rows)
        db.executemany(_INSERT_V6, [f[:n] for f in facts if f is not None])
        last = rows[-1][0]


def build_groups(db: Db) -> None:
    """Migration step 7: the group codes and hourly counts of the facts rows a schema-6
    ledger holds, from their columns (no record is parsed)."""
    cols = ", ".join(("seq", "t", *GROUP_COLUMNS))
    gids: dict[Row, int] = {}
    counts: Counts = {}
    last = 0
    while True:  # pages by seq: bounded memory on a large ledger
        rows = db.execute(f"SELECT {cols} FROM facts WHERE seq > ? ORDER BY seq LIMIT 20000", (last,)).fetchall()
        if not rows:
            break
        new = {tuple(r[2:]) for r in rows} - gids.keys()
        if new:
            gids.update(group_ids(db, new))
        coded = [(gids[tuple(r[2:])], r[0], r[1]) for r in rows]
        db.executemany("UPDATE facts SET gid = ? WHERE seq = ?", [(gid, seq) for gid, seq, _ in coded])
        for gid, seq, t in coded:
            count_row(counts, gid, seq, t)
        last = rows[-1][0]
    _add_counts(db, counts)
