"""`riskpipe demo` — the README's main command — on a small slice, end to end."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.broker

DOCS = Path(__file__).resolve().parents[1] / "docs" / "records.md"
# reasons no producer can cause in the demo: off_grid needs a policy with the sound
# sampler (the demo's is Gaussian); internal_error is a fault of the stage, not the input;
# model_timeout needs a model that never returns on an input (the demo's always does)
NOT_FROM_PRODUCERS = {"off_grid", "internal_error", "model_timeout"}


def producer_reasons() -> set[str]:
    """Every dead-letter reason code in docs/records.md a producer can cause."""
    section = DOCS.read_text().split("## Dead letter", 1)[1].split("\n## ", 1)[0]
    codes = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))
    assert len(codes) >= 18 and codes >= NOT_FROM_PRODUCERS, codes
    return codes - NOT_FROM_PRODUCERS


def test_demo_streams_decides_reports_and_summarises(tmp_path):
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "demo", "--out", str(tmp_path), "--clean", "40",
                        "--attacked", "8"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert re.search(r"events produced\s+66\s+\(40 clean digits, 8 PGD-attacked, 18 malformed\)", out)
    assert re.search(r"decisions\s+48\s", out)
    assert "review console on http://127.0.0.1:" in out and "(password: " in out
    dead = dict(item.rsplit(" ", 1) for item in re.search(r"dead letters\s+(.*)", out).group(1).split(", "))
    assert dead == {reason: "1" for reason in producer_reasons()}, dead
    assert "certified anyway" in out and "Theorem 1" in out
    from riskpipe.ledger import Ledger

    with Ledger(str(tmp_path / "ledger.sqlite")) as led:
        assert led.count("decision") == 48 and led.count("dlq") == 18 and led.verify().ok
    html = (tmp_path / "report.html").read_text()
    assert "<img" in html and "ledger" in html.lower()
