"""Identity and secrets (issue 19 item 7): one redaction function for every output, DSN
handling (keyword DSNs, ``${VAR}`` only, unset variables named), and every CLI command
that takes a DSN run against real PostgreSQL with its output grepped for the password."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from riskpipe.redaction import redact

PASSWORD = "Hunter2@p4ss:w0rd"  # an "@" and a ":" in it: the old regex left "p4ss:w0rd" in clear
ENCODED = "Hunter2%40p4ss%3Aw0rd"
FRAGMENTS = (PASSWORD, ENCODED, "p4ss:w0rd", "p4ss%3Aw0rd", "Hunter2")


def test_redact_masks_every_form_of_a_password() -> None:
    cases = {
        "postgresql://alice:s3cret@db:5432/x": "postgresql://alice:***@db:5432/x",
        "postgresql://alice:p@ss@db/x": "postgresql://alice:***@db/x",  # was alice:***@ss@db
        "postgres://:onlypass@db/x": "postgres://:***@db/x",
        "host=db dbname=x password=s3cret user=u": "host=db dbname=x password=*** user=u",
        "host=db password='a b\\'c' dbname=x": "host=db password=*** dbname=x",
        "postgresql://db/x?sslmode=require&password=s3cret&user=u": "postgresql://db/x?sslmode=require&password=***&user=u",
        "sasl_plain_password: s3cret": "sasl_plain_password: ***",
    }
    for text, want in cases.items():
        assert redact(text) == want, text
    for harmless in ("ledger /tmp/l.sqlite", "user@example.com wrote", "http://example.com/a@b", "passed: 3"):
        assert redact(harmless) == harmless


def test_a_registered_secret_is_masked_anywhere() -> None:
    from riskpipe.redaction import register_secret

    register_secret("zq-registered-9931")
    assert redact("error near 'zq-registered-9931' and zq%2Dregistered") == "error near '***' and zq%2Dregistered"


def test_only_braced_variables_are_expanded_and_an_unset_one_is_named(tmp_path, monkeypatch) -> None:
    from riskpipe.app.config import ConfigError, load_config

    monkeypatch.setenv("RP_TEST_LEDGER", str(tmp_path / "l.sqlite"))
    monkeypatch.setenv("HOME", "/should/not/appear")
    monkeypatch.delenv("RP_TEST_UNSET", raising=False)
    ok = tmp_path / "ok.yaml"
    ok.write_text('ledger: "${RP_TEST_LEDGER}"\nsasl_plain_password: "pa$HOME$$x"\n')
    cfg = load_config(str(ok))
    assert cfg.ledger == str(tmp_path / "l.sqlite") and cfg.sasl_plain_password == "pa$HOME$$x"
    bad = tmp_path / "bad.yaml"
    bad.write_text('ledger: "postgresql://u:${RP_TEST_UNSET}@db/x"\n')
    with pytest.raises(ConfigError, match=r"bad.yaml: ledger: environment variable RP_TEST_UNSET is not set"):
        load_config(str(bad))
    bad.write_text('topics:\n  audit: "${RP_TEST_UNSET}"\n')
    with pytest.raises(ConfigError, match=r"topics.audit: environment variable RP_TEST_UNSET"):
        load_config(str(bad))


def test_a_keyword_dsn_that_does_not_parse_is_refused_never_a_file(tmp_path, monkeypatch) -> None:
    """A password holding a space, unquoted: the string stopped parsing as pairs after
    ``password=``, so it was taken for a SQLite file name (``run`` and ``ingest`` created a
    file named after it, password included, instead of using PostgreSQL), and the error
    of ``ledger verify`` printed the part of the password after the space."""
    from riskpipe.ledger import LedgerError, open_ledger

    monkeypatch.chdir(tmp_path)
    dsn = "host=127.0.0.1 port=1 dbname=x user=u password=hunter2 Tr0ub4dor"
    with pytest.raises(LedgerError, match=r"keyword DSN .* does not parse") as e:
        open_ledger(dsn)
    assert "hunter2" not in str(e.value) and "Tr0ub4dor" not in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # no file made
    r = _cli("ledger", "verify", dsn, cwd=tmp_path)
    assert r.returncode == 2 and "does not parse" in r.stderr
    assert "Tr0ub4dor" not in r.stdout + r.stderr and "hunter2" not in r.stdout + r.stderr
    assert not list(tmp_path.iterdir())
    assert redact("some text Tr0ub4dor") == "some text ***"  # the tail is masked wherever it appears now
    for not_dsn in ("ledger.db", str(tmp_path / "my file.db")):  # file names stay file names
        with open_ledger(not_dsn) as led:
            assert led.backend == "sqlite"


def test_a_private_key_given_where_a_path_belongs_is_never_printed(tmp_path) -> None:
    """``checkpoint.key_file: ${SIGNING_KEY}`` with the variable holding the PEM itself (or
    ``--key "$(cat key.pem)"``): the error line printed the whole private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()).decode()
    body = pem.splitlines()[1]
    (tmp_path / "ev.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text("checkpoint:\n  key_file: ${RP_TEST_SIGNING_KEY}\n  every_records: 10\n")
    r = _cli("run", "--config", str(tmp_path / "c.yaml"), "--source", f"jsonl:{tmp_path / 'ev.jsonl'}",
             "--sink", f"jsonl:{tmp_path / 'out'}", "--ledger", str(tmp_path / "l.db"),
             env={"RP_TEST_SIGNING_KEY": pem})
    assert r.returncode == 2 and "key_file" in r.stderr and "key material" in r.stderr, r.stderr
    assert body not in r.stdout + r.stderr and body[:16] not in r.stdout + r.stderr
    assert body not in redact(f"error: {pem.replace(chr(10), ' ')}: cannot read")
    assert body not in redact(f"cut short: {pem[:60]}")


def test_keyword_dsns_open_postgresql_or_are_refused(postgres, pg_url, tmp_path) -> None:
    from riskpipe.ledger import LedgerError, backend_for, open_ledger

    dbname = pg_url.rsplit("/", 1)[1]
    kw = f"host=127.0.0.1 port={postgres.port} user=postgres dbname={dbname} password='{PASSWORD}'"
    with open_ledger(kw) as led:
        assert led.backend == "postgresql" and led.append({"id": "k", "ts": "2026-01-01T00:00:00Z"})
        assert PASSWORD not in str(led) and PASSWORD not in repr(led)
    with pytest.raises(LedgerError, match="not a PostgreSQL keyword DSN") as e:
        backend_for(f"host=db dbname=x pasword={PASSWORD}")
    assert PASSWORD not in str(e.value)
    with pytest.raises(LedgerError, match=r"unexpanded \$\{VAR\}"):
        backend_for("${RISKPIPE_LEDGER_DSN}")  # an unset variable never becomes a local file
    assert not (tmp_path / "${RISKPIPE_LEDGER_DSN}").exists()


def _cli(*args, env=None, timeout=240, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "riskpipe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


def _leaks(text: str) -> list[str]:
    return [f for f in FRAGMENTS if f in text]


def test_no_command_prints_the_dsn_password(postgres, pg_url, tmp_path) -> None:
    """Every CLI command that takes a DSN, with a password, against real PostgreSQL:
    success and error paths, stdout, stderr and log lines hold no part of the password."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from riskpipe.app.config import default_policy_path
    from riskpipe.stream.broker import EmbeddedBroker
    from streamkit import produce, valid_events

    dbname = pg_url.rsplit("/", 1)[1]
    url = f"postgresql://postgres:{ENCODED}@127.0.0.1:{postgres.port}/{dbname}"
    keyword = f"host=127.0.0.1 port={postgres.port} user=postgres dbname={dbname} password='{PASSWORD}'"
    dead = f"postgresql://postgres:{ENCODED}@127.0.0.1:1/{dbname}"  # nothing listens: the error path
    events = valid_events("s", 4)
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "input.jsonl").write_text(json.dumps(events[0]) + "\n")
    key = tmp_path / "key.pem"
    key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text('ledger: "${RP_SECRET_DSN}"\n')
    env = {"RP_SECRET_DSN": url, "RISKPIPE_REVIEW_PASSWORD": "review-passphrase-1"}
    policy = default_policy_path()

    runs: list[tuple[str, subprocess.CompletedProcess]] = []

    def run(*args, ok=True, **kw):
        r = _cli(*args, env=env, **kw)
        runs.append((" ".join(args), r))
        assert (r.returncode == 0) == ok, (args, r.returncode, redact(r.stderr[-2000:]))
        assert "Traceback" not in r.stderr, args
        return r

    run("run", "--source", f"jsonl:{tmp_path / 'events.jsonl'}", "--sink", f"jsonl:{tmp_path / 'out'}",
        "--ledger", url, "-vv")
    run("run", "--config", str(cfg), "--source", f"jsonl:{tmp_path / 'events.jsonl'}",
        "--sink", f"jsonl:{tmp_path / 'out2'}", "-vv")
    for target in (url, keyword):
        run("ledger", "verify", target)
        run("ledger", "verify", target, "--json")
        run("ledger", "head", target, "--json")
        run("ledger", "export", target, "--out", "-")
        run("ledger", "input", target, "0" * 64, ok=False)
        run("ledger", "replay", "s-0", "--ledger", target, "--input", str(tmp_path / "input.jsonl"))
        run("ledger", "replay", "no-such-id", "--ledger", target, "--input", str(tmp_path / "input.jsonl"), ok=False)
        run("report", "--ledger", target, "--format", "md", "--out", str(tmp_path / "report.md"))
        run("policy", "diff", policy, policy, "--ledger", target)
    run("ledger", "checkpoint", url, "--key", str(key))
    for args in (("ledger", "verify", dead), ("ledger", "head", dead), ("report", "--ledger", dead),
                 ("ledger", "replay", "s-0", "--ledger", dead, "--input", str(tmp_path / "input.jsonl")),
                 ("run", "--source", f"jsonl:{tmp_path / 'events.jsonl'}", "--sink", f"jsonl:{tmp_path / 'o3'}",
                  "--ledger", dead)):
        run(*args, ok=False)
    with EmbeddedBroker() as b:
        b.create_topics(["audit"], partitions=1)
        produce(b.bootstrap, [(json.dumps({"id": "x", "decision": "review"}).encode(), [])], topic="audit")
        run("ledger", "ingest", "--bootstrap-servers", b.bootstrap, "--ledger", url, "--until-idle", "2")
    for target in (url, keyword):  # the review console prints its ledger at start
        p = subprocess.Popen([sys.executable, "-m", "riskpipe.cli", "review", "--ledger", target],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
        try:
            deadline = time.monotonic() + 60
            lines = []
            while time.monotonic() < deadline:
                line = p.stdout.readline()
                lines.append(line)
                if "Ctrl-C stops" in line or not line:
                    break
        finally:
            p.terminate()
            out, err = p.communicate(timeout=30)
        text = "".join(lines) + out + err
        assert "ledger " in text and "decision(s)" in text, redact(text)
        runs.append(("review", subprocess.CompletedProcess(p.args, p.returncode, text, "")))
    leaked = {cmd: _leaks(r.stdout + r.stderr) for cmd, r in runs if _leaks(r.stdout + r.stderr)}
    assert not leaked, leaked
    assert len(runs) >= 28
    # the runs did reach the database (not a silent local file): the rows are there
    from riskpipe.ledger import open_ledger

    with open_ledger(url) as led:
        assert led.count("decision") == 4 + 1 and led.verify().ok  # the stage runs, then the ingested record


def test_kafka_passwords_from_the_config_are_masked() -> None:
    from riskpipe.kafka_clients import KafkaSettings

    KafkaSettings(bootstrap_servers="b:9093", security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                  sasl_plain_username="stage", sasl_plain_password="kafka-Pa55-word")
    assert redact("auth failed for stage/kafka-Pa55-word") == "auth failed for stage/***"


def test_a_keyword_dsn_in_a_config_file_is_a_dsn_not_a_file_named_after_it(tmp_path) -> None:
    """``ledger: 'host=... password=...'`` in a config file was resolved against the file's
    directory like a path, so it became a SQLite file named after the DSN, password
    included, and the shared ledger never got the decisions."""
    from riskpipe.app.config import load_config
    from riskpipe.ledger.targets import backend_name

    dsn = "host=127.0.0.1 port=1 dbname=x user=u password=hunter2secret"
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text(f"ledger: '{dsn}'\n")
    config = load_config(str(cfg))
    assert config.ledger == dsn and backend_name(config.ledger) == "postgresql"
    cfg.write_text("ledger: ledger.sqlite\n")  # a file: still relative to the config file
    assert load_config(str(cfg)).ledger == str(tmp_path / "ledger.sqlite")


def test_a_url_password_with_an_unencoded_at_is_refused_and_never_printed() -> None:
    """libpq ends a URL's password at its first "@" and takes the rest for the host, so
    ``alice:p@ss@w0rd@host`` printed "ss@w0rd" in its "cannot resolve host" error."""
    from riskpipe.ledger import LedgerError
    from riskpipe.ledger.targets import backend_name

    with pytest.raises(LedgerError) as e:
        backend_name("postgresql://alice:pa55@w0rd-x@127.0.0.1:1/db")
    assert "percent-encode it as %40" in str(e.value)
    for piece in ("pa55@w0rd-x", "w0rd-x", "pa55"):
        assert piece not in redact(f"{e.value}; failed to resolve host 'w0rd-x@127.0.0.1'"), piece
    assert backend_name(f"postgresql://alice:{ENCODED}@127.0.0.1:1/db") == "postgresql"


def test_a_url_that_urlsplit_refuses_is_one_line_without_the_password(tmp_path) -> None:
    """An unencoded '[' or ']' in a URL's password ("Invalid IPv6 URL" from urlsplit) printed
    a traceback from `ledger verify`, `report` and the rest; now every command that parses
    a ledger target refuses it in one line, the password masked."""
    from riskpipe.ledger import LedgerError
    from riskpipe.ledger.targets import backend_name

    secret = "Zq9[Wxv77"
    url = f"postgresql://u:{secret}@127.0.0.1:1/db"
    with pytest.raises(LedgerError) as e:
        backend_name(url)
    assert "not a valid URL" in str(e.value) and secret not in redact(str(e.value))
    for args in (["ledger", "verify", url], ["report", "--ledger", url], ["ledger", "receipt", "x", "--ledger", url],
                 ["run", "--ledger", url, "--source", f"jsonl:{tmp_path / 'in.jsonl'}", "--sink",
                  f"jsonl:{tmp_path / 'out'}"]):
        r = subprocess.run([sys.executable, "-m", "riskpipe.cli", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "not a valid URL" in r.stderr, (args, r.stderr[-2000:])
        assert secret not in r.stdout + r.stderr and "Wxv77" not in r.stdout + r.stderr, args
