"""Configuration and command-line values that used to fail open, stall or end in a
traceback (found probing the CLI as a new user and as an attacker who controls files):
each is now refused in one line naming the option, key or file and the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from riskpipe.app.config import ConfigError, StageConfig, Topics, load_config
from riskpipe.cli import cli

ROOT = Path(__file__).resolve().parents[1]
POLICY = str(ROOT / "policies" / "default.yaml")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("topics,message", [
    ({"decisions": "x", "review": "x"}, "review and decisions are both 'x'"),
    ({"decisions": "x", "audit": "x"}, "audit and decisions are both 'x'"),
    ({"dlq": "decisions"}, "dlq and decisions are both 'decisions'"),
    ({"input": "audit"}, "audit and input are both 'audit'"),
])
def test_each_topic_role_has_its_own_topic(tmp_path, topics, message):
    """The public decisions topic shared with review or audit published full records,
    radii included, to whoever reads decisions: the disclosure control off by config."""
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text("topics:\n" + "".join(f"  {k}: {v}\n" for k, v in topics.items()))
    with pytest.raises(ConfigError, match=f"topics: .*{message}: each needs a topic of its own"):
        load_config(str(cfg))
    assert Topics().all == ("inferences", "decisions", "review", "audit", "dlq")  # the defaults differ


@pytest.mark.parametrize("yaml_text,role", [
    ("checkpoint:\n  key_file: k.pem\n  topic: inferences\n", "input"),
    ("topics:\n  dlq: dead\ncheckpoint:\n  key_file: k.pem\n  topic: dead\n", "dlq"),
    ("checkpoint:\n  key_file: k.pem\n  topic: decisions\n", "decisions"),
])
def test_the_checkpoints_topic_is_none_of_the_stage_topics(tmp_path, yaml_text, role):
    """A checkpoints topic that is the input fed the stage its own signed notes (a dead letter
    each, until the DLQ guard stopped it); one that is an output mixed notes into records."""
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=f"checkpoint.topic: .* is the {role} topic .*a topic of their own"):
        load_config(str(cfg))
    cfg.write_text("checkpoint:\n  key_file: k.pem\n  topic: signed-checkpoints\n")
    assert load_config(str(cfg)).checkpoints_topic() == "signed-checkpoints"


@pytest.mark.parametrize("args,option", [
    (["--sink", "out_typo/"], "--sink"), (["--source", "bogus:x"], "--source"), (["--source", "jsonl:"], "--source"),
])
def test_run_refuses_an_endpoint_that_is_neither_a_file_nor_kafka(args, option):
    """An unknown form fell back to Kafka: the stage waited on a broker for 300 s (or
    published to one on 127.0.0.1:9092) instead of writing the files asked for."""
    r = run("run", *args, "--no-ledger", "--no-metrics-server")
    assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output
    assert "neither jsonl:PATH nor kafka" in r.output


def test_json_files_with_huge_integers_are_one_line_errors(tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text('{"data": [' + "1" * 5000 + "]}\n")
    for args in (["certify", "--input", big, "--n", "10", "--n0", "10"],
                 ["policy", "explain", POLICY, "--record", big]):
        r = run(*args)
        assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.output
        assert "4300 digits" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("bound", ["--since=0001-01-01T00:00:00+23:59", "--until=9999-12-31T23:59:59-23:59"])
def test_a_time_bound_out_of_range_in_utc_is_one_line(tmp_path, bound):
    from riskpipe.ledger import Ledger

    with Ledger(str(tmp_path / "l.sqlite")):
        pass
    r = run("ledger", "export", tmp_path / "l.sqlite", "--out", tmp_path / "e.jsonl", bound)
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.output
    assert "is out of range once in UTC (years 1 to 9999)" in r.output


@pytest.mark.parametrize("command", ["init", "evaluate", "certify", "compare", "report"])
def test_a_negative_seed_is_refused_by_every_command(command):
    r = run(command, "--seed", "-1")  # the option is checked before anything runs
    assert r.exit_code == 2 and "Invalid value for '--seed'" in r.output and "-1 is not in the range x>=0" in r.output


def test_torch_threads_is_bounded():
    with pytest.raises(ValueError, match="torch_threads"):
        StageConfig(torch_threads=100_000)
    assert StageConfig(torch_threads=8).torch_threads == 8


def test_data_writes_where_it_says(tmp_path):
    out = tmp_path / "d.txt"
    r = run("data", "digits", "--split", "test", "--out", out)
    assert r.exit_code == 0 and f"to {out}" in r.output
    assert np.load(out).shape[1:] == (1, 8, 8) and not (tmp_path / "d.txt.npy").exists()
    r = run("data", "digits", "--split", "test", "--out", tmp_path)  # a directory: one line
    assert r.exit_code == 2 and "cannot write" in r.output


@pytest.mark.parametrize("X,y,message", [
    (lambda X: X.astype(np.float64) * 1e300, None, "beyond float32's range"),
    (lambda X: (X * 255).astype(np.int64), None, "rows hold values outside the model's input range"),
    (lambda X: X, lambda y: np.where(y == 3, 99, y), "y holds labels outside the model's classes [0, 10)"),
])
def test_a_reference_set_not_made_of_the_models_inputs_is_refused(tmp_path, digits_test, X, y, message):
    """A reference set in other units (0..255 for a [0, 1] model) was accepted, and then no
    input was ever out_of_support: every event was close to nothing, and so was every
    reference row; values beyond float32 were blamed on the model's output."""
    from riskpipe.app.compose import build_pipeline

    Xt, yt = digits_test
    path = tmp_path / "ref.npz"
    np.savez(path, X=X(Xt[:300]), y=(y or (lambda v: v))(yt[:300]))
    config = load_config(None, references={"digits": str(path)})
    with pytest.raises(ConfigError, match=rf"models.digits.reference: .*ref.npz: .*{message[:30]}"):
        build_pipeline(config)


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "big"])
def test_policy_and_config_files_must_be_small_regular_files(tmp_path, target):
    """/dev/zero as a policy was read until memory ran out; a FIFO blocked the command."""
    if target == "fifo":
        path = tmp_path / "p.yaml"
        os.mkfifo(path)
    elif target == "big":
        path = tmp_path / "p.yaml"
        path.write_bytes(b"#" * (17 << 20))
    else:
        path = Path(target)
    code = f"from riskpipe.cli import cli; cli(['policy', 'check', {str(path)!r}])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert ("not a regular file" if target != "big" else "larger than 16 MiB") in r.stdout + r.stderr
    code = f"from riskpipe.cli import cli; cli(['run', '--config', {str(path)!r}, '--source', 'jsonl:/dev/null'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "cannot read (" in r.stderr


def test_a_ledger_path_naming_another_applications_database_is_refused_untouched(tmp_path):
    """``run --ledger app.db`` added the ledger's tables to another application's SQLite file."""
    import sqlite3

    from riskpipe.ledger import Ledger, LedgerError

    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=r"app.db: another SQLite database \(tables customers\), not a ledger"):
        Ledger(str(path))
    assert path.read_bytes() == before  # not switched to WAL, no table added
    with Ledger(str(tmp_path / "new.db")) as led:  # a new file, and an existing ledger, open as before
        led.append({"id": "e1"})
    with Ledger(str(tmp_path / "new.db")) as led:
        assert led.count() == 1


@pytest.mark.parametrize("field,value,message", [
    ("alpha", 0.9, "certifier.alpha: input should be less than 0.5"),
    ("max_samples", 10**18, "certifier.max_samples: input should be less than or equal to 1000000000"),
])
def test_a_certifier_that_could_not_certify_or_would_never_finish_is_refused(field, value, message):
    """alpha 0.9 (a statement less likely than not) and 1e18 samples (a stage stalled on every
    event) passed ``policy check``."""
    from riskpipe.policy import PolicyError, parse_policy

    text = Path(POLICY).read_text()
    old = {"alpha": "alpha: 0.001", "max_samples": "max_samples: 10000"}[field]
    assert old in text, old
    with pytest.raises(PolicyError, match=message):
        parse_policy(text.replace(old, f"{field}: {value}"), "p.yaml")


@pytest.mark.parametrize("spec", ["demo:digits?range=1,0", "demo:digits?range=0,nan", "demo:digits?shape=1,4,4"])
def test_a_demo_model_refuses_options_it_would_ignore(spec):
    from riskpipe.models import ModelError, load_model

    with pytest.raises(ModelError, match=r"a demo model takes only \?sigma="):
        load_model(spec)


def test_an_out_path_or_a_ledger_that_is_not_what_it_should_be_is_named_at_once(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run("init", "--model", "demo:digits", "--reference", tmp_path / "missing.npz", "--out", tmp_path / "afile")
    assert r.exit_code == 2 and "--out" in r.output and "exists and is not a directory" in r.output
    r = run("ledger", "verify", tmp_path)
    assert r.exit_code != 0 and "not a file" in r.output and "file not found" not in r.output


@pytest.mark.parametrize("text,line,reason", [
    ("torch_threads: 1\n---\ntorch_threads: 2\n", 2, "expected a single document in the stream, but found another"),
    ("topics:\n  input: a\n decisions: b\n", 3, "while parsing a block mapping, did not find expected key"),
])
def test_invalid_yaml_in_a_config_names_the_line_and_what_the_parser_found(tmp_path, text, line, reason):
    """A second document was shown as 'but found another document' (policies) or with the
    parser's marks on '<unicode string>' (configs); the stage reads one document only."""
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg))
    assert str(e.value).startswith(f"{cfg}:{line}: invalid YAML ({reason}") and "unicode string" not in str(e.value)
