import json
import subprocess
import sys

import numpy as np
import pytest


def riskpipe(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "riskpipe.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=240)


def test_data_and_certify_decide(tmp_path):
    x, y = tmp_path / "X.npy", tmp_path / "y.npy"
    r = riskpipe("data", "digits", "--split", "test", "--out", str(x), "--labels", str(y))
    assert r.returncode == 0, r.stderr
    X = np.load(x)
    assert X.shape == (540, 1, 8, 8) and X.dtype == np.float32
    np.save(tmp_path / "few.npy", X[:4])
    out = tmp_path / "c.jsonl"
    r = riskpipe("certify", "--input", str(tmp_path / "few.npy"), "--mode", "decide", "--max-samples", "2000",
                 "--output", str(out))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert len(lines) == 4
    assert {"method", "norm", "radius", "abstained", "predicted_class", "p_lower", "sigma", "alpha", "n_samples",
            "elapsed_ms", "seed", "epsilon", "certified", "scope"} <= set(lines[0])
    assert [c["seed"] for c in lines] == [0, 1, 2, 3]


def test_certify_jsonl_input_and_modes(tmp_path):
    X = np.random.default_rng(0).uniform(0, 1, (2, 1, 8, 8)).astype(np.float32)
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(json.dumps({"data": x.tolist()}) for x in X) + "\n")
    for mode in ("certify", "predict"):
        r = riskpipe("certify", "--input", str(f), "--mode", mode, "--n", "200", "--n0", "20")
        assert r.returncode == 0, r.stderr
        assert len(r.stdout.strip().splitlines()) == 2


@pytest.mark.parametrize("make,expected", [
    (lambda p: np.save(p, np.zeros((2, 3, 3), np.float32)), "expects (1, 8, 8)"),
    (lambda p: np.save(p, np.full((1, 1, 8, 8), np.nan, np.float32)), "NaN or inf"),
    (lambda p: np.save(p, np.full((1, 1, 8, 8), 3.0, np.float32)), "values must lie in [0, 1]"),
    (lambda p: p.write_bytes(b"\x93NUMPY garbage"), "not a readable .npy file"),
])
def test_cli_errors_are_one_line(tmp_path, make, expected):
    p = tmp_path / "bad.npy"
    make(p)
    r = riskpipe("certify", "--input", str(p))
    assert r.returncode != 0
    assert expected in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_unknown_model_and_missing_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    r = riskpipe("certify", "--input", str(tmp_path / "x.npy"), "--model", "demo:unknown")
    assert r.returncode != 0 and "unknown demo model" in r.stderr and "Traceback" not in r.stderr
    r = riskpipe("certify", "--input", str(tmp_path / "missing.npy"))
    assert r.returncode != 0 and "file not found" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    r = riskpipe("certify", "--input", str(bad))
    assert r.returncode != 0 and "invalid JSON" in r.stderr and ":1:" in r.stderr
