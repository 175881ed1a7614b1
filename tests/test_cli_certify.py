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


@pytest.mark.parametrize("line,expected", [
    ('{"inputs": [1]}', "inputs: expected a non-empty list of tensor objects"),
    ('{"inputs": {"a": 1}}', "inputs: expected a non-empty list of tensor objects"),
    ('{"inputs": [{"shape": [1]}]}', "inputs[0].data: required field is missing"),
    ('{"inputs": [{"data": "x", "shape": [1, 1]}]}', "inputs[0].data: expected an array of numbers"),
    ('{"inputs": [{"data": [1, 2], "shape": "ab"}]}', "inputs[0].shape: expected a list of integers"),
    ('{"inputs": [{"data": [1, 2], "shape": [1, true]}]}', "inputs[0].shape: expected a list of integers"),
    ('{"inputs": [{"data": [1, 2], "shape": [3]}]}', "inputs[0].shape: cannot reshape"),
    ('{"inputs": [{"data": [1, 2]}]}', "inputs[0].shape: required field is missing"),
    ('{"inputs": [{"data": [1, 2], "shape": [2]}]}', "inputs[0].shape: [2]: expected [batch, *input shape]"),
    ('{"data": {"a": 1}}', "data: expected an array of numbers"),
    ('{"other": 1}', "neither 'inputs' nor 'data'"),
    ('"text"', "value: expected an array of numbers"),
    ("[" + "9" * 400 + "]", "value: expected an array of numbers"),
    ('{"data": [0.1], "data": [0.9]}', "the member name 'data' appears twice"),
    ("[" * 100_000, "invalid JSON (nested too deeply)"),
])
def test_a_malformed_json_input_line_is_one_line_naming_line_and_field(tmp_path, capsys, line, expected):
    """`certify --input` and `ledger replay --input` read inputs through read_inputs: each of
    these used to end in a traceback (AttributeError, KeyError, TypeError, OverflowError) or
    to take the last of two ``data`` members."""
    from riskpipe.cli.common import read_inputs

    good = json.dumps({"data": np.zeros((1, 8, 8)).tolist()})
    f = tmp_path / "in.jsonl"
    f.write_text(good + "\n" + line + "\n")
    with pytest.raises(SystemExit) as exc:
        read_inputs(str(f))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"riskpipe: error: input {f}:2: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1
    f.write_text(good + "\n" + json.dumps({"inputs": [{"data": [0.5] * 128, "shape": [2, 1, 8, 8]}]}) + "\n")
    assert read_inputs(str(f)).shape == (3, 1, 8, 8)  # an event's tensor is a batch: [2, *input shape]


@pytest.mark.parametrize("args,expected", [
    (["--sigma", "-1"], "riskpipe: error: --sigma: Input should be greater than 0"),  # was "sigma: ..."
    (["--method", "trees", "--norm", "l7"], "riskpipe: error: --norm: 'l7' is not one of l1, l2, linf"),  # norm: norm:
    (["--model", "usermodels:short_of_memory_model?shape=4", "--sampler", "sound"],  # was "(certifier.grid_step)"
     "declare the grid step (--grid-step) for the sound sampler"),
])
def test_option_errors_name_the_option(tmp_path, args, expected):
    """certify's options were named as the policy's fields (`sigma:`, `norm: norm:`,
    `certifier.grid_step`), which this command has none of."""
    from click.testing import CliRunner

    from riskpipe.cli import cli

    np.save(tmp_path / "x.npy", np.zeros((1, 4) if "shape=4" in " ".join(args) else (1, 1, 8, 8), np.float32))
    r = CliRunner().invoke(cli, ["certify", "--input", str(tmp_path / "x.npy"), *args])
    assert r.exit_code == 2 and "Traceback" not in r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("riskpipe: error: ") and expected in line, line
