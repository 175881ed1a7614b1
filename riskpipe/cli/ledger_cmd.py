"""``riskpipe ledger``: verify, anchor, export, ingest and replay the hash-chained ledger."""

from __future__ import annotations

import click

from riskpipe.cli.common import public_key_option


def signing_key_options(required: bool, key_help: str, origin_help: str):
    """``--key`` (Ed25519 private key, PEM) and ``--origin`` (the checkpoint's origin line),
    as the commands that sign checkpoints take them; read the key with ``read_private_key``."""
    def decorate(command):
        command = click.option("--origin", default=None, help=origin_help)(command)
        return click.option("--key", "key_path", required=required, type=click.Path(dir_okay=False),
                            help=key_help)(command)
    return decorate


@click.group()
def ledger() -> None:
    """The tamper-evident ledger of decisions, verdicts, policies and dead letters."""


@ledger.command()
@click.argument("path")
@click.option("--expect-head", default=None, help="A head printed earlier by `ledger head` (anchored or signed).")
@click.option("--expect-count", type=click.IntRange(min=0), default=None, help="The row count that head was taken at.")
@public_key_option("Ed25519 public key (PEM) the checkpoints are signed with; repeatable (key rotation).")
@click.option("--checkpoints", "checkpoint_file", default=None, type=click.Path(dir_okay=False),
              help="More signed checkpoints, JSON lines as published to the checkpoints topic (needs --public-key).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(**options):
    """Recompute the hash chain and the RFC 9162 Merkle tree of PATH (a file or
    postgresql://...); exit 0 only if both are intact.

    Detects edited, deleted, inserted and reordered rows, stored tree nodes or tree
    state that do not match the rows, and a truncated tail
    (against the ledger's chain state, and against --expect-head / --expect-count
    when that was forged too). With --public-key, every signed checkpoint is checked
    and the chain must still reach each one: truncation, deletion or re-chaining up to
    the latest checkpoint's row is detected even when every hash was recomputed.
    """
    from riskpipe.cli import ledger_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    ledger_impl.verify(**options)


@ledger.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print {head, count, ts} as JSON for signing.")
def head(**options):
    """Print the chain head of PATH (hash of the last row) for signing or anchoring."""
    from riskpipe.cli import ledger_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    ledger_impl.head(**options)


@ledger.command("input")
@click.argument("path")
@click.argument("sha256")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Write the tensor to this .npy file (default: print {sha256, datatype, shape, base64} as JSON).")
def input_cmd(**options):
    """Print (or save) the input with digest SHA256 that PATH stores once for its records
    (docs/records.md, "Inputs in records"); UINT8 inputs come back as UINT8."""
    from riskpipe.cli import ledger_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    ledger_impl.input_cmd(**options)


@ledger.command()
@click.argument("path")
@signing_key_options(True, "Ed25519 private key, PEM (openssl genpkey -algorithm ed25519 -out KEY.pem).",
                     "Checkpoint origin line (default: config ledger_origin, else riskpipe/ledger/<log id>).")
@click.option("--key-name", default=None, help="Key name on the signature line (default: the origin).")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the signed note to this file.")
@click.option("--bootstrap-servers", default=None, help="Also publish the checkpoint to Kafka (HOST:PORT).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="riskpipe.yaml: ledger_origin, and Kafka connection and TLS/SASL settings for publishing.")
@click.option("--topic", default="checkpoints", show_default=True, help="Topic the checkpoint is published to.")
@click.option("--json", "as_json", is_flag=True, help="Print {origin, tree_size, root, note} as JSON.")
def checkpoint(**options):
    """Sign PATH's Merkle tree size and root as a C2SP checkpoint (signed note, Ed25519),
    store it in the ledger, print it and optionally publish it; `ledger verify
    --public-key` and `ledger consistency` check it later."""
    from riskpipe.cli import ledger_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    ledger_impl.checkpoint(**options)


@ledger.command()
@click.argument("old_path", metavar="OLD")
@click.argument("new_path", metavar="NEW")
@click.option("--ledger", "ledger_path", required=True, help="The ledger the checkpoints are of (serves the proof).")
@public_key_option("Ed25519 public key (PEM) one of which must have signed both checkpoints; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the sizes, roots and proof (hex) as JSON.")
def consistency(**options):
    """Prove that checkpoint NEW extends checkpoint OLD (files holding signed notes):
    an RFC 9162 consistency proof from the ledger, verified against both signed roots.
    Exit 0 if it verifies, 1 if not (a rewritten or forked history)."""
    from riskpipe.cli import ledger_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    ledger_impl.consistency(**options)


@ledger.command()
@click.argument("event_id")
@click.option("--ledger", "ledger_path", required=True, help="Ledger: a file or postgresql://USER@HOST/DB.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Write the receipt here (default: stdout).")
@click.option("--kind", type=click.Choice(["decision", "verdict", "policy", "dlq"]), default="decision",
              show_default=True, help="Which kind of entry EVENT_ID names.")
@click.option("--model", default=None, help="The decision of this model (when several models decided the event).")
@click.option("--policy-sha256", default=None, help="The decision under this policy (sha256 of the policy file).")
@signing_key_options(False, "Ed25519 private key: sign a checkpoint now if none covers the entry yet.",
                     "With --key: the new checkpoint's origin (default as `ledger checkpoint`).")
def receipt(**options):
    """Write the receipt of one decision: the exact leaf bytes, the record, its index, an
    RFC 9162 inclusion proof and the signed checkpoint it leads to (docs/receipts.md).
    Anyone with the public key checks it offline (`ledger verify-receipt`)."""
    from riskpipe.cli import ledger_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    ledger_impl.receipt(**options)


@ledger.command("verify-receipt")
@click.argument("receipt_path", metavar="FILE")
@public_key_option("Ed25519 public key (PEM) of the ledger's checkpoints; repeatable (key rotation).", required=True)
@click.option("--origin", default=None, help="Also require this checkpoint origin.")
@click.option("--kind", type=click.Choice(["decision", "verdict", "policy", "dlq", "any"]), default="decision",
              show_default=True, help="The ledger kind the receipt's entry must have.")
@click.option("--id", "event_id", default=None, metavar="EVENT_ID",
              help="Also require the receipt to be of this event (its record's id).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_receipt(**options):
    """Check a receipt offline: the checkpoint's signature, the record against the leaf,
    and the inclusion proof against the signed root (about log2(n) hashes). Exit 0 if it
    holds, 1 if not."""
    from riskpipe.cli import ledger_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    ledger_impl.verify_receipt(**options)


@ledger.command()
@click.argument("path")
@click.option("--out", "out_path", required=True, help="JSON lines file to write ('-' for stdout).")
@click.option("--kind", type=click.Choice(["decision", "verdict", "policy", "dlq"]), default=None,
              help="Only this kind (the subset cannot be chain-verified on its own).")
@click.option("--since", default=None, help="RFC 3339 time, inclusive.")
@click.option("--until", default=None, help="RFC 3339 time, exclusive.")
def export(**options):
    """Write entries as JSON lines: {seq, kind, entry_id, ts, record, prev_hash, hash}.

    A full export (no filters) can be re-verified by anyone with sha256 (layout in
    riskpipe/ledger.py).
    """
    from riskpipe.cli import ledger_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    ledger_impl.export(**options)


@ledger.command()
@click.option("--bootstrap-servers", default=None,
              help="Kafka bootstrap servers, HOST:PORT (or `bootstrap_servers:` in --config).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="riskpipe.yaml: Kafka connection and TLS/SASL settings (${VAR} expanded).")
@click.option("--topic", "topics", multiple=True, default=("audit",), show_default=True,
              help="Topic to consume, optionally NAME=KIND (audit=decision, review-outcomes=verdict, dlq=dlq). "
                   "Repeatable.")
@click.option("--ledger", "ledger_path", required=True,
              help="Ledger: a file or postgresql://USER@HOST/DB (created if absent).")
@click.option("--group-id", default="riskpipe-ledger", show_default=True,
              help="Consumer group shared by ingest workers.")
@click.option("--until-idle", type=click.FloatRange(min=0.1), default=None,
              help="Stop after this many seconds without messages (default: run until interrupted).")
def ingest(**options):
    """Build the ledger from the audit topic (and optionally review-outcomes and dlq)."""
    from riskpipe.cli import ledger_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    ledger_impl.ingest(**options)


@ledger.command()
@click.argument("entry_id")
@click.option("--ledger", "ledger_path", required=True, help="Ledger: a file or postgresql://USER@HOST/DB.")
@click.option("--input", "input_path", required=True, help="The original input: .npy or JSON lines (an event works).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Stage config: rebuild the record's model entry (range, scale, policy) as the stage did; "
                   "needed for certificates in a scaled norm.")
@click.option("--model", default=None, help="The decision of this model (when several models decided the event).")
@click.option("--policy-sha256", default=None, help="The decision under this policy (sha256 of the policy file).")
def replay(**options):
    """Recompute decision ENTRY_ID's certificate with its recorded seed and parameters.

    Checks the input's digest first, then compares method, predicted class,
    abstained, certified, n_samples and radius (to 1e-9). Exit 0 on a match, 1 on a
    mismatch.
    """
    from riskpipe.cli import ledger_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    ledger_impl.replay(**options)
