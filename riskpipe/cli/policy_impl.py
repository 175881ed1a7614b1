"""The bodies of the ``riskpipe policy`` subcommands, imported when one runs (their options:
riskpipe/cli/policy_cmd.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from riskpipe import json_text
from riskpipe.certify import certifier_for_policy
from riskpipe.certify.certificate import Certificate
from riskpipe.cli.common import fail
from riskpipe.ledger import LedgerError, backend_for, open_ledger, redact
from riskpipe.models import ModelError, load_model
from riskpipe.policy import PolicyError, load_policy
from riskpipe.policy.evaluate import format_value
from riskpipe.policy.lint import lint
from riskpipe.policy.loader import locate
from riskpipe.policy.replay import replay


def _load(path: str):
    try:
        return load_policy(path)
    except PolicyError as e:
        click.echo(str(e))
        sys.exit(1)


def check(files, input_dim, strict, model_spec):
    model = None
    if model_spec is not None:
        try:
            model = load_model(model_spec)
        except ModelError as e:
            fail(str(e))
        input_dim = model.input_dim
    bad = warned = False
    for path in files:
        try:
            pol = load_policy(path)
        except PolicyError as e:
            click.echo(str(e))
            bad = True
            continue
        if model is not None:
            try:
                certifier_for_policy(model, pol)
            except ValueError as e:
                where = locate(path, ("certifier",))
                click.echo(f"{where.file}:{where.line}: certifier: on model {model_spec}: {e}")
                bad = True
                continue
        warnings = lint(pol, input_dim=input_dim)
        if warnings:
            for w in warnings:
                where = locate(path, w.path)
                click.echo(f"{where.file}:{where.line}: {where.field}: warning: {w.message}")
            warned = True
        click.echo(f"{path}: ok: {pol.name} {pol.version} sha256 {pol.sha256}"
                   + (f" ({len(warnings)} warning{'s' * (len(warnings) != 1)})" if warnings else ""))
    sys.exit(1 if bad or (strict and warned) else 0)


def _read_json_records(path: str):
    """Records from a JSON file (one object or a list) or JSON lines; ledger export
    lines ({kind, record, ...}) are unwrapped and non-decision entries skipped."""
    p = Path(path)
    if not p.is_file():
        fail(f"records {path}: file not found")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        whole = json_text.loads(text)
        items = whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError:
        items = []
        for lineno, line in enumerate(json_text.jsonl_lines(text), 1):
            if not line.strip():
                continue
            try:
                items.append(json_text.loads(line))
            except json.JSONDecodeError as e:
                fail(f"records {path}:{lineno}: invalid JSON ({e.msg})")
    for obj in items:
        if isinstance(obj, dict) and "record" in obj and "kind" in obj:
            if obj["kind"] == "decision":
                yield obj["record"]
        else:
            yield obj


def _read_ledger(path: str):
    try:
        is_file_ledger = backend_for(path).backend == "sqlite"
    except LedgerError as e:
        fail(str(e))
    if is_file_ledger:
        p = Path(path)
        if not p.is_file():
            fail(f"ledger {path}: file not found")
        with open(p, "rb") as f:
            is_sqlite = f.read(16) == b"SQLite format 3\x00"
        if not is_sqlite:
            yield from _read_json_records(path)
            return
    try:
        with open_ledger(path, create=False) as led:
            for entry in led.records(kind="decision"):
                yield entry.record
    except LedgerError as e:
        fail(str(e))


def _fmt(v) -> str:
    return format_value(v)


def explain(file, record_path, record_id, as_json):
    pol = _load(file)
    records = list(_read_json_records(record_path))
    if record_id is not None:
        records = [r for r in records if isinstance(r, dict) and str(r.get("id")) == record_id]
        if not records:
            fail(f"records {record_path}: no record with id {record_id!r}")
    if not records:
        fail(f"records {record_path}: no records")
    rec = records[0]
    if not isinstance(rec, dict) or not isinstance(rec.get("certificate"), dict):
        fail(f"records {record_path}: certificate: missing (a full decision record is needed)")
    try:
        cert = Certificate.from_dict(rec["certificate"])
    except (TypeError, ValueError) as e:
        fail(f"records {record_path}: certificate: {e}")
    d = pol.evaluate(cert, upstream_risk=rec.get("upstream_risk"), context=rec.get("context"), event_id=rec.get("id"),
                     prediction=rec.get("prediction"))
    if as_json:
        click.echo(json.dumps({**d.to_dict(), "trace": list(d.trace), "id": rec.get("id")}, sort_keys=True))
        return
    rp = rec.get("policy") if isinstance(rec.get("policy"), dict) else {}
    click.echo(f"record {rec.get('id')}: recorded {rec.get('decision', '?')} (rule {rec.get('rule', '?')}) under "
               f"{rp.get('name', '?')} {rp.get('version', '?')}"
               + ("" if rp.get("sha256") in (None, pol.sha256) else " (a different policy hash)"))
    click.echo(f"policy {pol.name} {pol.version} sha256 {pol.sha256[:16]}")
    tm = pol.threat_model
    if cert.abstained:
        click.echo(f"certificate: {cert.method} {cert.mode} abstained -> not certified in the threat model")
    else:
        click.echo(f"certificate: {cert.method} {cert.mode} {cert.norm} radius {cert.radius:.4g} -> "
                   f"{d.radius_threat:.4g} in {tm.norm} vs epsilon {tm.epsilon:g}: "
                   + ("certified" if d.certified_in_threat else "NOT certified") + " in the threat model")
    click.echo("signals:")
    for name, s in d.signals.items():
        inputs = ", ".join(f"{k}={_fmt(v)}" for k, v in s.items() if k not in ("value", "flagged", "reason"))
        flag = f"  FLAGGED ({s['reason']}: policy default used)" if s.get("flagged") else ""
        click.echo(f"  {name:<17} {s['value']:.4f}  [{inputs}]{flag}")
    formula = next(p for p in d.explanation.split(". ") if p.startswith("score = "))
    click.echo(formula.rstrip("."))
    click.echo("rules (first match fires):")
    for i, step in enumerate(d.trace, 1):
        status = "FIRED" if step["matched"] else "no"
        click.echo(f"  {i}. {step['rule']}: {status}")
        for c in step["conditions"]:
            mark = "yes" if c["holds"] else "no "
            click.echo(f"       [{mark}] {c['field']} {c['op']} {_fmt(c['value'])}   (actual {_fmt(c['actual'])})")
        if not step["conditions"]:
            click.echo("       (no conditions: always matches)")
    if d.rule == "fallback":
        click.echo(f"  no rule matched: fallback {pol.fallback.decision}")
    shadow = f" (shadow mode; the rules say {d.would_be})" if d.shadow else ""
    click.echo(f"decision: {d.decision}{shadow}; reasons: {', '.join(d.reasons)}")
    rv = d.review
    click.echo(f"review: routed={_fmt(rv['routed'])} priority={rv['priority']} deadline_seconds="
               f"{_fmt(rv['deadline_seconds'])} audit_sample={_fmt(rv['audit_sample'])}")
    click.echo(f"controls: {', '.join(d.controls)}")
    if rec.get("decision") is not None and rec.get("decision") != d.decision:
        click.echo(f"note: the recorded decision was {rec['decision']}; this policy decides {d.decision}")


def diff(old, new, ledger_path, limit, as_json):
    p_old, p_new = _load(old), _load(new)
    result = replay(p_old, p_new, _read_ledger(ledger_path))
    if as_json:
        click.echo(json.dumps({"old": {"name": p_old.name, "version": p_old.version, "sha256": p_old.sha256},
                               "new": {"name": p_new.name, "version": p_new.version, "sha256": p_new.sha256},
                               **result.to_dict()}, sort_keys=True))
    else:
        _print_diff(p_old, p_new, result, limit)
    if result.records == 0:  # "0 of 0 changed" is no evidence that nothing changes (as ledger verify's EMPTY)
        click.echo(f"nothing replayed: {redact(ledger_path)} holds no decision record with a certificate"
                   + (f" ({len(result.skipped)} skipped)" if result.skipped else ""), err=True)
        sys.exit(1)


def _print_diff(p_old, p_new, result, limit: int) -> None:
    click.echo(f"policy diff: {p_old.name} {p_old.version} ({p_old.sha256[:12]}) -> "
               f"{p_new.name} {p_new.version} ({p_new.sha256[:12]})")
    click.echo(f"records replayed: {result.records}" + (f", skipped: {len(result.skipped)}" if result.skipped else ""))
    for rid, why in result.skipped[:limit]:
        click.echo(f"  skipped {rid}: {why}")
    click.echo(f"decisions changed: {len(result.changes)} of {result.records}")
    for t, n in sorted(result.transitions.items()):
        a, b = t.split(" -> ")
        if a != b:
            click.echo(f"  {t}: {n}")
    if result.threat_changes:
        click.echo("threat model differs: " + "; ".join(result.threat_changes))
    if result.certifier_changes:
        click.echo("certifier differs: " + "; ".join(result.certifier_changes)
                   + " -> replayed certificates answer the old certifier's question; re-certification needed")
    if result.recertify:
        ids = ", ".join(r["id"] for r in result.recertify[:limit])
        more = f" (+{len(result.recertify) - limit} more)" if len(result.recertify) > limit else ""
        click.echo(f"needs re-certification: {len(result.recertify)} records: {ids}{more}")
        click.echo("  (their replayed decisions are not the new policy's answer; --json gives each one's reasons)")
    if result.recorded_mismatch:
        click.echo(f"note: {len(result.recorded_mismatch)} recorded decisions differ from OLD replayed "
                   "(written under another policy or certifier)")
    if result.changes:
        click.echo("changed records:")
        for ch in result.changes[:limit]:
            o, n = ch["old"], ch["new"]
            star = "  [re-certify]" if ch["needs_recertification"] else ""
            click.echo(f"  {ch['id']}: {o['decision']} ({o['rule']}, score {o['score']:.3f}) -> "
                       f"{n['decision']} ({n['rule']}, score {n['score']:.3f}){star}")
        if len(result.changes) > limit:
            click.echo(f"  ... {len(result.changes) - limit} more (use --limit or --json)")
