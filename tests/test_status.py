"""Output for people: `riskpipe run` logs one start-up line per model and a periodic
progress line without -v (riskpipe.stream.status)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml

from riskpipe.stream.events import make_event
from riskpipe.stream.status import Progress, progress_line

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tabular"


def _stats(decided=0, dlq=None, decisions=None, duplicates=0, lag=None):
    return SimpleNamespace(decided=decided, dlq=defaultdict(int, dlq or {}), duplicates=duplicates, lag=lag,
                           other_models=0, decisions=defaultdict(int, decisions or {}))


def test_progress_line_names_decisions_dlq_reasons_rate_and_lag():
    s = _stats(12, {"off_grid": 2, "invalid_json": 1}, {"allow": 7, "review": 5}, lag=40)
    assert progress_line(s, 3.25, 40) == ("progress: decided 12 (allow 7, review 5, block 0), DLQ 3 "
                                          "(invalid_json 1, off_grid 2), 3.2 events/s, lag 40")
    assert progress_line(_stats(), 0.0, None).endswith("DLQ 0, 0.0 events/s, lag n/a")


def test_progress_is_due_every_interval_and_rates_the_events_since_the_last_line(caplog):
    now = [0.0]
    p = Progress(10.0, clock=lambda: now[0])
    assert not p.due()
    now[0] = 10.0
    assert p.due()
    with caplog.at_level("INFO", logger="riskpipe.status"):
        p.report(_stats(20, {"wrong_shape": 5}))
        now[0] = 15.0
        assert not p.due()
        now[0] = 20.0
        p.report(_stats(45, {"wrong_shape": 5}))
    rates = [r.getMessage().split(", ")[-2] for r in caplog.records]
    assert rates == ["2.5 events/s", "2.5 events/s"]  # 25 in the first 10 s, 25 in the next 10 s
    assert not Progress(0).due() and not Progress(None).due()


def test_run_logs_a_line_per_model_and_progress_without_verbose(tmp_path):
    """Two models in different units in one stage (8x8 pixels in [0, 1]; 30 raw tabular features
    certified in standardised units): each gets its start-up line, and progress lines follow."""
    config = {"policy": str(ROOT / "policies" / "default.yaml"), "progress_interval_s": 0.05,
              "batch": {"max_events": 4, "max_wait_ms": 5},
              "models": {"digits": {"spec": "demo:digits"},
                         "cancer": {"spec": str(EXAMPLE / "model.skops"), "reference": str(EXAMPLE / "reference.npz"),
                                    "policy": str(EXAMPLE / "policy.yaml"), "scale": "standardize"}}}
    (tmp_path / "riskpipe.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(0)
    X = np.load(EXAMPLE / "reference.npz")["X"]
    events = [make_event(f"d-{i}", "digits", rng.random((1, 8, 8))) for i in range(8)]
    events += [make_event(f"c-{i}", "cancer", X[i]) for i in range(8)]
    lines = [json.dumps(e) for e in events] + ["{not json"]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, RISKPIPE_DATA_DIR=str(tmp_path / "data"))
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(tmp_path / "riskpipe.yaml"),
                        "--source", f"jsonl:{tmp_path / 'events.jsonl'}", "--sink", f"jsonl:{tmp_path / 'out'}",
                        "--no-ledger"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    models = [line.split("riskpipe.status: ", 1)[1] for line in r.stderr.splitlines()
              if "riskpipe.status: model " in line]
    assert len(models) == 2, r.stderr
    digits = next(m for m in models if m.startswith("model digits: "))
    cancer = next(m for m in models if m.startswith("model cancer: "))
    assert "spec demo:digits, sha256 " in digits and "smoothing (decide), sampler gaussian, sigma" in digits
    assert ", sigma 0.25, batch size " in digits and ", torch threads 1, policy default v" in digits
    assert f"spec {EXAMPLE / 'model.skops'}, sha256 " in cancer and "policy " in cancer
    import re

    for m in models:
        assert re.search(r"batch size \d+ \((probe|cache|config)\)", m), m
        assert re.search(r"policy \S+ v\S+ sha256 [0-9a-f]{12}$", m), m
    progress = [line for line in r.stderr.splitlines() if "riskpipe.status: progress: " in line]
    assert progress, r.stderr
    assert re.search(r"progress: decided \d+ \(allow \d+, review \d+, block \d+\), DLQ \d+.*events/s, lag n/a$",
                     progress[-1])
    assert "decided 16 events, 1 to the DLQ" in r.stderr  # the end-of-run summary stays
