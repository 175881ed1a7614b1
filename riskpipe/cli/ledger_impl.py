"""The bodies of the ``riskpipe ledger`` subcommands, imported when one runs (their options:
riskpipe/cli/ledger_cmd.py), and ledger ingest's consumer."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import numpy as np
from kafka import OffsetAndMetadata
from kafka.errors import CommitFailedError, KafkaError

from riskpipe import json_text, kafka_clients
from riskpipe.app.config import INFRASTRUCTURE_TIMEOUT_S, ConfigError, load_config
from riskpipe.cli.common import fail, read_inputs, read_public_keys, working
from riskpipe.decisions import DECISIONS
from riskpipe.ledger import KINDS, LedgerError, canonical_json, dlq_record, merkle, open_ledger, policy_record
from riskpipe.ledger.anchors import Checkpoint
from riskpipe.ledger.chain import prepare_entries, time_window
from riskpipe.ledger.checkpoint import load_private_key, make_checkpoint, publish, read_checkpoint_file, verify_ledger
from riskpipe.ledger.receipt import find_decisions, make_receipt, refuse_repeated_names
from riskpipe.ledger.receipt import verify_receipt as check
from riskpipe.models import ModelError
from riskpipe.paths import read_small_text, read_text
from riskpipe.redaction import redact
from riskpipe.report.replay import ReplayError, stage_entry
from riskpipe.report.replay import replay as do_replay
from riskpipe.stream.infra import LEDGER, InfrastructureUnavailable, Outage, describe, infrastructure_component
from riskpipe.timestamps import from_epoch, rfc3339_micros, rfc3339_seconds

# which ledger kind a topic's messages become (``--topic NAME=KIND`` overrides)
TOPIC_KINDS = {"audit": "decision", "review-outcomes": "verdict", "dlq": "dlq"}


def kafka_settings(config_path: str | None, bootstrap_servers: str | None):
    """Kafka connection and security settings from ``--config`` (riskpipe.yaml, ``${VAR}``
    expanded) with ``--bootstrap-servers`` on top; a bad file fails with one line."""
    try:
        config = load_config(config_path, bootstrap_servers=bootstrap_servers)
    except ConfigError as e:
        fail(str(e))
    if bootstrap_servers is None and "bootstrap_servers" not in config.model_fields_set:
        fail("--bootstrap-servers: required (or `bootstrap_servers:` in --config)")
    return config.kafka()


def read_private_key(path: str):
    """The signing key ``--key`` names; one line and exit 2 when it cannot be read."""
    try:
        return load_private_key(path)
    except LedgerError as e:
        fail(str(e))


def _open(path: str, must_exist: bool = True):
    """The ledger PATH names (a file, sqlite:///PATH or postgresql://...); one-line errors."""

    try:
        return open_ledger(path, create=not must_exist)
    except LedgerError as e:
        fail(str(e))


def verify(path, expect_head, expect_count, public_keys, checkpoint_file, as_json):
    if checkpoint_file and not public_keys:
        fail("--checkpoints: needs --public-key to check the signatures")
    keys = read_public_keys(public_keys)
    try:
        external = read_checkpoint_file(checkpoint_file) if checkpoint_file else []
    except LedgerError as e:
        fail(str(e))
    with _open(path) as led:
        try:
            if keys and (expect_head or expect_count is not None):
                fail("--public-key: use either signed checkpoints or --expect-head/--expect-count")
            with working(f"verifying {led.count():,} rows of {redact(path)}"):
                res = verify_ledger(led, keys, external) if keys else led.verify(expect_head=expect_head,
                                                                                expect_count=expect_count)
        except LedgerError as e:
            fail(str(e))
    empty = res.ok and res.count == 0
    if empty:  # nothing was verified: never "ok"
        res = dataclasses.replace(res, ok=False, reason=f"empty: {path} holds no rows, so nothing was verified (a "
                                                        "copy of a WAL-mode SQLite ledger made without its -wal file "
                                                        "looks like this)")
    if as_json:
        click.echo(json.dumps(res.to_dict(), sort_keys=True))
    elif res.ok:
        click.echo(f"ok: {res.count} rows, head {res.head}, Merkle root {res.root}"
                   + (f" ({res.reason})" if res.reason else ""))
        if res.checkpoint:
            cp = res.checkpoint
            what = (f"origin {cp['origin']}, tree size {cp['tree_size']}, root {cp['root']}" if cp["kind"] == "c2sp"
                    else f"row {cp['tree_size']}, head {cp['head']}, {cp['ts']}")
            click.echo(f"  signed checkpoint matched: {what}, key {cp['key']} "
                       f"(latest of {cp['verified']} verified checkpoint(s))")
    elif empty:
        click.echo(f"EMPTY: {res.reason}")
    elif res.unsigned:
        click.echo(f"UNSIGNED: {res.reason} ({res.count} rows, head {res.head})")
    elif res.first_bad_seq is None:  # a checkpoint failed before any row was checked against it
        click.echo(f"TAMPERED: {res.reason}")
        click.echo(f"  the rows were not checked: every checkpoint must hold first ({res.count} rows, head {res.head})")
    else:
        click.echo(f"TAMPERED: first bad row {res.first_bad_seq}: {res.reason}")
        if res.count >= res.first_bad_seq:  # found past the chain (a checkpoint, the tree, the chain state)
            click.echo(f"  the hash chain links all {res.count} rows (head {res.head}); the fault is the one above")
        else:
            click.echo(f"  {res.count} rows check out before it; last good head {res.head}")
    sys.exit(0 if res.ok else 1)


def head(path, as_json):
    with _open(path) as led:
        h, n = led.head_and_count()
    if as_json:
        ts = rfc3339_seconds()
        click.echo(json.dumps({"head": h, "count": n, "ts": ts,
                               "ledger": str(led.path.resolve()) if led.path else str(led)}, sort_keys=True))
    else:
        click.echo(h)


def _origin(origin: str | None, config_path: str | None) -> str | None:
    """``--origin``, else ``ledger_origin`` from ``--config``, else None (the ledger's default)."""
    if origin is not None or not config_path:
        return origin

    try:
        return load_config(config_path).ledger_origin
    except ConfigError as e:
        fail(str(e))


def input_cmd(path, sha256, out_path):
    with _open(path) as led:
        stored = led.get_input(sha256.lower())
    if stored is None:
        fail(f"ledger {led}: no stored input with sha256 {sha256}")
    try:
        a = stored.array()
    except ValueError as e:
        fail(str(e))
    if out_path:
        np.save(out_path, a)
        click.echo(f"wrote {stored.datatype} {list(a.shape)} to {out_path}", err=True)
    else:
        click.echo(json.dumps({"sha256": stored.sha256, "datatype": stored.datatype, "shape": list(a.shape),
                               "byte_order": "little", "base64": base64.b64encode(stored.data).decode("ascii")}))


def checkpoint(path, key_path, origin, key_name, out_path, bootstrap_servers, config_path, topic, as_json):
    key = read_private_key(key_path)
    origin = _origin(origin, config_path)
    kafka = None
    if bootstrap_servers or (config_path and _sets_bootstrap(config_path)):
        kafka = kafka_settings(config_path, bootstrap_servers)
    with _open(path) as led:
        try:
            cp = make_checkpoint(led, key, origin, key_name)
        except LedgerError as e:
            fail(str(e))
    if out_path:
        Path(out_path).write_text(cp.note, encoding="utf-8")
    if kafka is not None:
        try:
            publish(kafka, topic, cp)
        except Exception as e:  # noqa: BLE001 - broker failures are user-facing; the checkpoint is stored already
            fail(f"checkpoint stored, but publishing to {topic} on {kafka.bootstrap_servers} failed: "
                 f"{type(e).__name__}: {e}")
    if as_json:
        click.echo(json.dumps({"origin": cp.origin, "tree_size": cp.tree_size, "root": cp.root.hex(), "note": cp.note},
                              sort_keys=True))
    else:
        click.echo(cp.note, nl=False)
        if kafka is not None:
            click.echo(f"published to {topic}", err=True)


def _sets_bootstrap(config_path: str) -> bool:
    """Whether --config names a broker (then the checkpoint is published there)."""

    try:
        return "bootstrap_servers" in load_config(config_path).model_fields_set
    except ConfigError as e:
        fail(str(e))


def _outcome(problem: str | None, as_json: bool, failed: str, fields: dict, ok_line: Callable[[], str]) -> NoReturn:
    """A check's outcome: JSON (``ok``, ``reason`` and ``fields``), or ``ok_line()`` when it
    holds and ``FAILED: problem`` when not; exit 0 if it holds, 1 if not."""
    if as_json:
        click.echo(json.dumps({"ok": problem is None, "reason": problem, **fields}, sort_keys=True))
    elif problem is None:
        click.echo(ok_line())
    else:
        click.echo(f"{failed}: {problem}")
    sys.exit(0 if problem is None else 1)


def _read_note(path: str, keys, what: str):
    try:  # exactly as written: a CRLF copy is not the signed note
        text = read_text(path, what, LedgerError)
        return Checkpoint.from_note(text, keys or None, f"{what} {path}")
    except LedgerError as e:
        fail(str(e))


def consistency(old_path, new_path, ledger_path, public_keys, as_json):
    keys = read_public_keys(public_keys)
    old, new = _read_note(old_path, keys, "OLD"), _read_note(new_path, keys, "NEW")
    if old.origin != new.origin:
        fail(f"OLD is a checkpoint of {old.origin!r}, NEW of {new.origin!r}: not the same log")
    problem, proof = None, []
    if new.tree_size < old.tree_size:
        problem = f"NEW (tree size {new.tree_size}) is smaller than OLD (tree size {old.tree_size})"
    else:
        with _open(ledger_path) as led:
            try:
                proof = led.consistency_proof(old.tree_size, new.tree_size)
            except LedgerError as e:
                problem = str(e)
        if problem is None:
            try:
                merkle.verify_consistency(old.tree_size, new.tree_size, old.root, new.root, proof)
            except merkle.ProofError as e:
                problem = str(e)
    _outcome(problem, as_json, "INCONSISTENT",
             {"old_size": old.tree_size, "new_size": new.tree_size, "old_root": old.root.hex(),
              "new_root": new.root.hex(), "proof": [p.hex() for p in proof], "signatures_checked": bool(keys)},
             lambda: f"consistent: tree size {old.tree_size} -> {new.tree_size} of {new.origin}, proof of "
                     f"{len(proof)} hashes" + ("" if keys else " (signatures not checked: give --public-key)"))


def _one_decision(led, event_id, kind, model, policy_sha256, ledger_path):
    """The one entry of ``kind`` for ``event_id`` (``find_decisions``), narrowed by --model and
    --policy-sha256; fails naming them when none or several stages' entries match."""
    found = find_decisions(led, event_id, kind, model, policy_sha256)
    if not found:
        fail(f"ledger {redact(ledger_path)}: no {kind} for {event_id!r}"
             + (" with the given --model/--policy-sha256" if model or policy_sha256 else ""))
    if len(found) > 1:
        which = "; ".join(f"model {(e.record.get('model') or {}).get('name')!r} policy sha256 "
                          f"{(e.record.get('policy') or {}).get('sha256')}" for e in found[:10])
        fail(f"{event_id!r}: {len(found)} {kind} entries ({which}): choose one with --model and --policy-sha256")
    return found[0]


def receipt(event_id, ledger_path, out_path, kind, model, policy_sha256, key_path, origin):
    with _open(ledger_path) as led:
        try:
            entry = _one_decision(led, event_id, kind, model, policy_sha256, ledger_path)
            if entry.seq is None:  # written by a writer whose rows await sequencing
                led.integrate()
                entry = find_decisions(led, event_id, kind, model, policy_sha256)[0]
            if entry.seq is None:
                fail(f"ledger {ledger_path}: {entry.entry_id!r} is stored but not yet sequenced into the tree "
                     "(another process holds the integrator lease); try again in a moment")
            note = led.latest_note(min_size=entry.seq)
            if note is None and key_path:
                note = make_checkpoint(led, read_private_key(key_path), origin).note
            if note is None:
                fail(f"ledger {ledger_path}: no signed checkpoint covers row {entry.seq} yet: run `riskpipe ledger "
                     "checkpoint` (or pass --key), or wait for the stage's next one")
            text = json.dumps(make_receipt(led, entry.seq, note), sort_keys=True, ensure_ascii=False, indent=1) + "\n"
        except LedgerError as e:
            fail(str(e))
    if out_path:
        Path(out_path).write_text(text, encoding="utf-8")
        click.echo(f"receipt for {kind} {entry.entry_id} (row {entry.seq}) against tree size "
                   f"{json.loads(text)['tree_size']} written to {out_path}", err=True)
    else:
        click.echo(text, nl=False)


def verify_receipt(receipt_path, public_keys, origin, kind, event_id, as_json):
    keys = read_public_keys(public_keys)
    try:
        text = read_small_text(receipt_path)
        rec = json_text.loads(text)
    except OSError as e:
        fail(f"{receipt_path}: cannot read ({e.strerror})")
    except UnicodeDecodeError:
        fail(f"{receipt_path}: not UTF-8 text")
    except json.JSONDecodeError as e:
        fail(f"{receipt_path}: not JSON ({e.msg} at line {e.lineno})")
    try:
        refuse_repeated_names(text, rec)  # a name given twice: INVALID (exit 1), not unreadable
        proved = check(rec, keys, origin, None if kind == "any" else kind, event_id)
        problem = None
    except LedgerError as e:
        proved, problem = None, str(e)
    cp = proved and proved.checkpoint
    _outcome(problem, as_json, "INVALID",
             {"origin": cp and cp.origin, "tree_size": cp and cp.tree_size,
              "index": rec.get("index") if isinstance(rec, dict) else None,
              "kind": proved and proved.kind, "entry_id": proved and proved.entry_id,
              "event_id": proved and proved.event_id},
             lambda: f"ok: {proved.kind} {proved.event_id!r}"
                     + (f" (entry id {proved.entry_id!r})" if proved.entry_id != proved.event_id else "")
                     + f", leaf {rec['index']} of {cp.origin} at tree size "
                     f"{cp.tree_size}, signed checkpoint verified")


def export(path, out_path, kind, since, until):
    try:
        time_window(since, until)  # before the file is made: a bad period writes nothing
    except LedgerError as bad:
        fail(str(bad))
    n = 0
    with _open(path) as led:
        out = sys.stdout if out_path == "-" else open(out_path, "w", encoding="utf-8")
        try:
            for e in led.records(kind=kind, since=since, until=until):
                out.write(canonical_json(e.to_dict()) + "\n")
                n += 1
        except LedgerError as e:
            fail(str(e))
        finally:
            if out is not sys.stdout:
                out.close()
    if out_path != "-":
        click.echo(f"wrote {n} entries to {out_path}", err=True)


def _topic_kinds(topics: tuple[str, ...]) -> dict[str, str]:
    mapping = {}
    for t in topics:
        name, _, kind = t.partition("=")
        try:
            kafka_clients.check_topic(name)
        except ValueError as e:
            fail(f"--topic {t}: {e}")
        kind = kind or TOPIC_KINDS.get(name, "decision")
        if kind not in KINDS:
            fail(f"--topic {t}: kind {kind!r} is not one of {', '.join(KINDS)}")
        mapping[name] = kind
    return mapping


def _header(msg, name: str) -> str | None:
    for k, v in msg.headers or []:
        if k == name:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return None


def _unreadable(text: bytes, record: Any) -> tuple[str, str] | None:
    """(dead-letter reason, why) for a parsed record the ledger cannot take, else None. A
    name given twice (a verdict with two ``verdict`` members, say) is refused as the stage
    refuses it in an event: readers differ on which copy counts."""
    if not isinstance(record, dict):
        return "not_an_object", "not a JSON object"
    if (why := json_text.repeated_name(text, record)) is not None:
        return "duplicate_key", why
    if not isinstance(record.get("id"), str) or not record["id"]:
        return "missing_field", "missing field 'id'"
    return None


def message_entries(msg, kind: str) -> list[tuple[str, dict, str | None]]:
    """Ledger entries for one Kafka message. Audit records also yield a ``policy`` entry the
    first time a policy (name, version, sha256) is seen; unreadable messages become a ``dlq``
    entry (reason and digest, never the payload) so the gap is on record."""

    ts = rfc3339_micros(from_epoch((msg.timestamp or 0) / 1000))
    where = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
    if kind == "dlq":
        return [_dlq_entry(msg, ts, where)]
    unreadable: tuple[str, str] | None
    try:
        record = json_text.loads(msg.value)
    except (TypeError, ValueError) as e:
        record, unreadable = None, ("invalid_json", str(e))
    else:
        unreadable = _unreadable(msg.value, record)
        if unreadable is None and kind == "decision" and record.get("decision") not in DECISIONS:
            # an audit record always names its decision: one that does not would be counted as none
            unreadable = ("missing_field", f"decision: {str(record.get('decision'))[:40]!r} is not one of "
                                           f"{', '.join(DECISIONS)}")
    out: list[tuple[str, dict, str | None]] = []
    if unreadable is None:
        pol = record.get("policy")
        if kind == "decision" and isinstance(pol, dict) and {"name", "version", "sha256"} <= pol.keys():
            prec, peid = policy_record(str(pol["name"]), str(pol["version"]), str(pol["sha256"]),
                                       record.get("ts") or ts, event="first_seen", shadow=pol.get("shadow"))
            out.append(("policy", prec, peid))
        out.append((kind, record, None))
        try:  # what the ledger would refuse (an id with a line break, a ts that is no time) refuses here,
            prepare_entries(out)  # one message, not the whole batch and every restart after it
        except LedgerError as e:
            out, unreadable = [], ("bad_record", str(e))
    if unreadable is not None:
        rec, eid = dlq_record(unreadable[0], msg.value or b"", ts, message=f"ledger ingest: {_short(unreadable[1])}",
                              **where)
        return [("dlq", rec, eid)]
    return out


REASON_CODE = re.compile(r"[a-z][a-z0-9_]{0,62}")


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _is_topic(name: str) -> bool:
    try:
        kafka_clients.check_topic(name)
    except ValueError:
        return False
    return True


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.isascii() and text.isdigit() and len(text) <= 19 else None


def _dlq_entry(msg, ts: str, where: dict[str, Any]) -> tuple[str, dict, str | None]:
    """The ``dlq`` entry of a dead letter the stage published. Its headers are read, never
    trusted: a reason that is no reason code is ``unknown`` (a line break and a heading in
    one forged a section of the Markdown report), a source that is no topic, partition and
    offset is the message's own position, and the raw header text is kept in the message."""
    raw_reason = _header(msg, "__riskpipe.errors.reason")
    reason = raw_reason if raw_reason is not None and REASON_CODE.fullmatch(raw_reason) else "unknown"
    topic = _header(msg, "__riskpipe.errors.topic")
    partition = _int_or_none(_header(msg, "__riskpipe.errors.partition"))
    offset = _int_or_none(_header(msg, "__riskpipe.errors.offset"))
    if topic is None or not _is_topic(topic):
        topic, partition, offset = where["topic"], where["partition"], where["offset"]
    message = _header(msg, "__riskpipe.errors.message")
    if reason != raw_reason and raw_reason is not None:
        message = f"reason header {raw_reason!r}; {message}"
    omitted = _header(msg, "__riskpipe.errors.payload") == "omitted"  # left out to fit max_output_bytes
    rec, eid = dlq_record(reason, msg.value or b"", ts, topic=topic, partition=partition, offset=offset,
                          message=_short(message) if message is not None else None,
                          digest={"sha256": _header(msg, "__riskpipe.errors.payload_sha256"),
                                  "size": _int_or_none(_header(msg, "__riskpipe.errors.payload_bytes"))}
                          if omitted else None)
    return ("dlq", rec, eid)


def _ledger_call(call: Callable[[], Any], what: str, timeout_s: float, echo) -> Any:
    """``call()``, retried with the stage's backoff while it fails because the ledger is
    unavailable (PostgreSQL down or restarting, a SQLite file locked by another writer):
    infrastructure, never the messages'. Past ``timeout_s``: one line, exit 4 (the
    offsets of what was not written stay uncommitted). A LedgerError of the data or
    the target: one line, exit 2."""
    outage: Outage | None = None
    while True:
        try:
            return call()
        except Exception as e:
            if infrastructure_component(e) != LEDGER:
                if isinstance(e, LedgerError):
                    fail(f"ledger ingest: {e}")
                raise
            now = time.monotonic()
            outage = outage or Outage(LEDGER, now)
            waited = now - outage.since
            if waited > timeout_s:
                fail(f"ledger ingest: {InfrastructureUnavailable(LEDGER, waited, timeout_s, e)}", code=4)
            delay = outage.next_delay(timeout_s - waited)
            echo(f"ledger ingest: ledger unavailable {what} ({describe(e)}); "
                 f"retry {outage.retries} in {delay:.2f} s ({waited:.1f} s of {timeout_s:g} s)", err=True)
            time.sleep(delay)


def ingest_topics(kafka, topic_kinds: dict[str, str], ledger_path: str, group_id: str,
                  until_idle: float | None = None, max_records: int = 500, echo=click.echo,
                  ledger_timeout_s: float = INFRASTRUCTURE_TIMEOUT_S) -> dict:
    """Consume the topics into the ledger. Offsets are committed only after the ledger
    transaction, so a crash re-delivers and the idempotent append drops the copies;
    several workers in one group share partitions and one ledger file.
    An unavailable ledger (at open or at a write) is waited for (``_ledger_call``) up to
    ``ledger_timeout_s``, by default the stage's ``infrastructure_timeout_s``; a
    commit refused because the group rebalanced meanwhile is skipped (the rows are
    written: whoever reads the messages again appends nothing new).
    ``kafka``: :class:`riskpipe.kafka_clients.KafkaSettings`."""

    stats: dict[str, Any] = {"messages": 0, "written": 0, "unreadable": 0, "commits_refused": 0}
    led = _ledger_call(lambda: open_ledger(ledger_path), "at open", ledger_timeout_s, echo)
    try:
        consumer = kafka_clients.consumer(
            kafka, *topic_kinds, group_id=group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=10_000 if until_idle is None else 2000,
            heartbeat_interval_ms=3000 if until_idle is None else 600, client_id=f"riskpipe-ledger-{group_id}",
        )
    except BaseException:
        led.close()
        raise
    last_data = time.monotonic()
    try:
        while until_idle is None or time.monotonic() - last_data < until_idle:
            batch = consumer.poll(timeout_ms=200, max_records=max_records)
            if not batch:
                continue
            last_data = time.monotonic()
            entries, offsets = [], {}
            for tp, msgs in batch.items():
                for m in msgs:
                    got = message_entries(m, topic_kinds[tp.topic])
                    stats["unreadable"] += sum(1 for k, _, _ in got if k == "dlq" and topic_kinds[tp.topic] != "dlq")
                    entries.extend(got)
                    offsets[tp] = OffsetAndMetadata(m.offset + 1, None, -1)
                    stats["messages"] += 1
            stats["written"] += _ledger_call(lambda: led.append_entries(entries), "at a write", ledger_timeout_s,
                                             echo)
            try:
                consumer.commit(offsets)
            except CommitFailedError as e:
                stats["commits_refused"] += 1
                echo(f"ledger ingest: offsets not committed, the group rebalanced ({_short(str(e), 120)}); the "
                     "messages are in the ledger, their next reader appends nothing new", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close(autocommit=False)
        try:
            stats["head"], stats["count"] = led.head(), led.count()
        except Exception as e:  # the ledger went away at the end: the summary says so, never a traceback
            if infrastructure_component(e) is None:
                raise
            stats["head"], stats["count"] = "unknown (ledger unavailable)", "?"
        finally:
            led.close()
    return stats


def ingest(bootstrap_servers, config_path, topics, ledger_path, group_id, until_idle):
    kafka = kafka_settings(config_path, bootstrap_servers)
    try:
        stats = ingest_topics(kafka, _topic_kinds(topics), ledger_path, group_id, until_idle)
    except Exception as e:  # broker and network failures are user-facing
        if isinstance(e, (KafkaError, OSError)):
            fail(f"--bootstrap-servers {kafka.bootstrap_servers}: {type(e).__name__}: {e}")
        raise
    click.echo(f"ingested {stats['messages']} messages, {stats['written']} new ledger rows, "
               f"{stats['unreadable']} unreadable (recorded as dlq); ledger {redact(ledger_path)}: "
               f"{stats['count']} rows, head {stats['head']}")


def replay(entry_id, ledger_path, input_path, device, as_json, config_path, model=None, policy_sha256=None):
    with _open(ledger_path) as led:
        record = _one_decision(led, entry_id, "decision", model, policy_sha256, ledger_path).record
    X = read_inputs(input_path)
    try:
        entry = stage_entry(config_path, record, device) if config_path else None
        res = do_replay(record, X, device=device, entry=entry)
    except (ReplayError, ModelError, ValueError) as e:
        fail(f"replay {entry_id}: {e}")
    if as_json:
        click.echo(json.dumps(res.to_dict(), sort_keys=True, default=str))
        sys.exit(0 if res.ok else 1)
    if not res.input_match:
        click.echo(f"MISMATCH input: recorded sha256 {res.recorded_digest}; {input_path} has "
                   f"{', '.join(d[:16] + '…' for d in res.input_digests[:5])}"
                   f"{' …' if len(res.input_digests) > 5 else ''}")
        click.echo("  (digest = sha256 of the input as float32, C order); certificate not recomputed")
        sys.exit(1)
    click.echo(f"input sha256 {res.recorded_digest}: match")
    params = ", ".join(f"{k}={v}" for k, v in res.parameters.items())
    click.echo(f"recomputed with {params}")
    for c in res.checks:
        click.echo(f"  {'match   ' if c.match else 'MISMATCH'} {c.name}: recorded {c.recorded!r}, replayed "
                   f"{c.replayed!r}")
    click.echo("replay: match" if res.ok else "replay: MISMATCH")
    sys.exit(0 if res.ok else 1)
