"""``riskpipe review`` as a user runs it: a real process that prints its address, serves
the login page, keeps the queue behind it, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

from test_review_records import seed_ledger

CLI = [sys.executable, "-c", "from riskpipe.cli import main; main()"]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_review_command_serves_and_stops_on_interrupt(tmp_path):
    ledger = tmp_path / "ledger.sqlite3"
    seed_ledger(ledger)
    secret = tmp_path / "review-password"
    secret.write_text("a long passphrase\n")
    env = {k: v for k, v in os.environ.items() if k != "RISKPIPE_REVIEW_PASSWORD"}
    proc = subprocess.Popen(CLI + ["review", "--ledger", str(ledger), "--password-file", str(secret), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        m = re.match(r"riskpipe review: console at (http://127\.0\.0\.1:\d+/) \(login with the shared password\)",
                     first)
        assert m, first + proc.stderr.read() if proc.poll() is not None else first
        assert proc.stdout.readline().strip().endswith("5 decision(s), 1 verdict(s)")
        url = m.group(1)
        with urllib.request.urlopen(url + "login", timeout=10) as r:
            assert r.status == 200 and "Reviewer login" in r.read().decode()
        opener = urllib.request.build_opener(NoRedirect)
        try:
            opener.open(url, timeout=10)
            raise AssertionError("the queue answered without a login")
        except urllib.error.HTTPError as e:
            assert e.code == 302 and e.headers["Location"].startswith("/login")
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_a_console_beyond_loopback_warns_of_plain_http():
    """The console speaks plain HTTP: on another address than loopback, reviewers'
    passwords and cookies would cross the network in clear text, which it now says at
    start-up (the address is the operator's choice: a TLS proxy may sit on that host)."""
    from riskpipe.cli.review_impl import plain_http_warning

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert plain_http_warning(host) is None, host
    for host in ("0.0.0.0", "::", "192.0.2.7", "review.example.org"):
        warning = plain_http_warning(host)
        assert warning is not None and f"listening on {host} over plain HTTP" in warning and "TLS" in warning


def test_a_port_in_use_is_one_line_with_the_reason(tmp_path):
    """werkzeug's own bind printed `Address already in use` and a hint to stderr, then exited:
    the console's line said `cannot listen on 127.0.0.1:PORT (1)`, its exit code for a reason."""
    import socket

    from click.testing import CliRunner

    from riskpipe.cli import cli

    ledger = tmp_path / "ledger.sqlite3"
    seed_ledger(ledger)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(cli, ["review", "--ledger", str(ledger), "--port", str(port)],
                               env={"RISKPIPE_REVIEW_PASSWORD": "a long passphrase"})
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [
        f"riskpipe: error: review console: cannot listen on 127.0.0.1:{port} (Address already in use)"]


def test_only_a_broker_error_is_reported_as_an_unreachable_broker(tmp_path, monkeypatch):
    """Any exception while the console started was reported as `--bootstrap-servers None:
    cannot reach the broker (...)`, a fault of the console's own (here an AttributeError)
    included, with no broker configured at all. Now a broker error is one line naming the
    servers, and anything else is not blamed on a broker."""
    from click.testing import CliRunner
    from kafka.errors import KafkaConnectionError

    from riskpipe.cli import cli, review_impl

    ledger = tmp_path / "ledger.sqlite3"
    seed_ledger(ledger)
    env = {"RISKPIPE_REVIEW_PASSWORD": "a long passphrase"}
    for raised, servers in ((AttributeError("'NoneType' object has no attribute 'x'"), []),
                            (KafkaConnectionError("connection refused"), ["--bootstrap-servers", "127.0.0.1:1"])):
        def console(settings, raised=raised):
            raise raised

        monkeypatch.setattr(review_impl, "ConsoleServer", console)
        r = CliRunner().invoke(cli, ["review", "--ledger", str(ledger), "--port", "0", *servers], env=env)
        if isinstance(raised, AttributeError):
            assert r.exception is raised and "cannot reach the broker" not in r.output, r.output
        else:
            assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
                "riskpipe: error: --bootstrap-servers 127.0.0.1:1: cannot reach the broker "
                "(KafkaConnectionError: connection refused)"], r.stderr
