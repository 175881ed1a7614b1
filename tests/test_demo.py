"""`riskpipe demo` — the README's main command — on a small slice, end to end."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.broker


def test_demo_streams_decides_reports_and_summarises(tmp_path):
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "demo", "--out", str(tmp_path), "--clean", "40",
                        "--attacked", "8"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert re.search(r"events produced\s+57\s+\(40 clean digits, 8 PGD-attacked, 9 malformed\)", out)
    assert re.search(r"decisions\s+48\s", out)
    assert "review console on http://127.0.0.1:" in out and "(password: " in out
    for reason in ("invalid_json", "missing_field", "non_finite", "out_of_range", "oversized", "unknown_model",
                   "unsupported_cloudevent", "wrong_dtype", "wrong_shape"):
        assert f"{reason} 1" in out
    assert "certified anyway" in out and "Theorem 1" in out
    from riskpipe.ledger import Ledger

    with Ledger(str(tmp_path / "ledger.sqlite")) as led:
        assert led.count("decision") == 48 and led.count("dlq") == 9 and led.verify().ok
    html = (tmp_path / "report.html").read_text()
    assert "<img" in html and "ledger" in html.lower()
