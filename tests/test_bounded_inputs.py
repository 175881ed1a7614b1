"""Bounded inputs and one-line start-up errors (issue 19 item 8): the sound sampler's table
is exact and bounded, ``scale: standardize`` needs O(d) memory, array headers are checked
before anything is allocated, the certification batch size is bounded, and every start-up
failure is one line naming the file or field and the reason (never a traceback)."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from numpy.lib import format as npformat

from riskpipe.certify import normal_table
from riskpipe.certify.samplers import _table

GB160 = (40_000_000_000,)  # float32: 160 GB


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "riskpipe.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _one_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    out = (r.stdout + r.stderr).strip()
    assert r.returncode != 0 and "Traceback" not in out, out
    assert len(out.splitlines()) == 1, out
    for n in needles:
        assert n in out, (n, out)
    return out


# ---- the sound sampler's table ------------------------------------------------------------
@pytest.mark.parametrize("s", [0.25 * 255, 0.5 * 255, 412.37, 0.25 * 4096])
def test_table_equals_the_60_digit_formula_entry_for_entry(s):
    J = normal_table.table_entries(s) // 2
    table = normal_table.thresholds(s, J, 62)
    assert len(table) == 2 * J and bool(np.all(np.diff(table) >= 0))
    picks = range(-J, J) if J <= 700 else np.random.default_rng(1).choice(np.arange(-J, J), 700, replace=False)
    for i in picks:
        assert table[int(i) + J] == normal_table.direct(int(i), s, 62), i


def test_table_for_65280_levels_is_exact_at_the_tails_centre_and_a_sample():
    """The grid ``init`` suggests for UINT8 data: 326,400 entries (tens of seconds the old way;
    bench/bench_sound_table.py times both and compares every entry)."""
    s = 0.25 * 65280
    thresholds, J, tv = _table(s)
    assert len(thresholds) == 2 * J == 326_400 and 0 < tv < 1e-12
    rng = np.random.default_rng(2)
    picks = list(rng.choice(np.arange(-J, J), 300, replace=False)) + [-J, -J + 1, -1, 0, J - 2, J - 1]
    for i in picks:
        assert thresholds[int(i) + J] == normal_table.direct(int(i), s, 62), i


def test_mirror_entries_are_exact():
    """The lower half comes from the upper one by Phi(-y) = 1 - Phi(y)."""
    s = 1234.5
    J = normal_table.table_entries(s) // 2
    t = normal_table.thresholds(s, J, 62)
    for i in (-J, -J + 17, -1000, -1, 0, 999, J - 1):
        assert t[i + J] == normal_table.direct(i, s, 62)


def test_a_grid_whose_table_is_too_large_is_refused_everywhere(tmp_path):
    from riskpipe.certify.samplers import SoundSampler
    from streamkit import policy_with

    with pytest.raises(ValueError, match="noise table of 5000000000 entries"):
        SoundSampler(0.25, (0.0, 1.0), 4, grid_step=1e-9)
    with pytest.raises(ValueError, match="at most 2097152"):
        SoundSampler(0.25, (0.0, 1.0), 4, grid_levels=1_000_000)
    SoundSampler(0.25, (0.0, 1.0), 4, grid_levels=65_280)  # what init suggests for UINT8: accepted
    base = {"method": "smoothing", "mode": "decide", "sigma": 0.25, "sampler": "sound"}
    (tmp_path / "a").mkdir()
    tiny = policy_with(tmp_path / "a", certifier={**base, "grid_step": 1e-9})
    _one_line(_cli("policy", "check", tiny), tiny, "certifier", "noise table")
    (tmp_path / "b").mkdir()
    many = policy_with(tmp_path / "b", certifier={**base, "grid_levels": 10_000_000})
    _one_line(_cli("policy", "check", many), many, "grid_levels", "1048576")
    (tmp_path / "c").mkdir()
    fine = policy_with(tmp_path / "c", certifier={**base, "grid_levels": 1_000_000})
    # without a model the step is unknown; with one (range [0, 1]) the table is known and refused
    _one_line(_cli("policy", "check", fine, "--model", "demo:digits"), fine, "noise table")


# ---- scale: standardize in O(d) ---------------------------------------------------------------
def test_standardize_scale_is_chunked_and_exact():
    from riskpipe.models.scaled import standardize_scale

    X = np.random.default_rng(0).normal(5, 3, (1000, 7)).astype(np.float32)
    X[:, 2] = 4.0  # constant: scale 1
    want = X.astype(np.float64).std(axis=0)
    want[2] = 1.0
    np.testing.assert_allclose(standardize_scale(X, chunk=97), want, rtol=1e-12)


def test_scaled_model_holds_no_d_by_d_matrix_and_bounds_still_certify():
    from riskpipe.certify import family
    from riskpipe.models.base import Model, sha256_state_dict
    from riskpipe.models.scaled import scaled_model

    d = 40_000  # a diagonal nn.Linear would hold 1.6e9 weights (6.4 GB)
    net = torch.nn.Sequential(torch.nn.Linear(d, 2))
    model = Model(spec="test:wide", input_shape=(d,), num_classes=2, sha256=sha256_state_dict(net), module=net.eval())
    s = np.linspace(0.5, 2.0, d)
    g = scaled_model(model, s, "test")
    held = sum(t.numel() for t in g.module.state_dict().values())
    assert held <= 4 * d, held
    x = np.random.default_rng(0).normal(size=(3, d)).astype(np.float32)
    z = (x / s).astype(np.float32)
    np.testing.assert_array_equal(g.predict(z), model.predict(x))
    for method in ("ibp", "lipschitz"):
        certs = family(method)(g).run("certify", z, [0, 1, 2])
        assert len(certs) == 3 and all(c.reason != "model_fault" for c in certs)


# ---- array headers ---------------------------------------------------------------------------
def _fake_npy(shape) -> bytes:
    b = io.BytesIO()
    npformat.write_array_header_1_0(b, {"descr": "<f4", "fortran_order": False, "shape": shape})
    b.write(b"\0" * 64)
    return b.getvalue()


def _run_with_reference(tmp_path, reference):
    """``riskpipe run`` of the demo model with ``reference`` (no events: it fails at start-up or not)."""
    (tmp_path / "events.jsonl").write_text("")
    return _cli("run", "--model", "digits=demo:digits", "--reference", f"digits={reference}", "--source",
                f"jsonl:{tmp_path / 'events.jsonl'}", "--sink", f"jsonl:{tmp_path / 'out'}", "--no-ledger",
                "--certify-batch-size", "64", "--no-metrics-server")


def test_a_160_gb_npy_header_is_refused_before_allocating(tmp_path):
    from riskpipe import npy

    big = tmp_path / "big.npz"
    with zipfile.ZipFile(big, "w") as z:
        z.writestr("X.npy", _fake_npy(GB160))
    with pytest.raises(ValueError, match=r"header declares shape .40000000000,. of float32 = 160 GB"):
        npy.check_file(big)
    lying = tmp_path / "lying.npy"  # small declared shape, but not what the file holds
    lying.write_bytes(_fake_npy((1000,)))
    with pytest.raises(ValueError, match="but the file holds 64 bytes"):
        npy.check_file(lying)
    ok = tmp_path / "ok.npz"
    np.savez(ok, X=np.zeros((2, 3), np.float32), y=np.arange(2))
    npy.check_file(ok)
    _one_line(_run_with_reference(tmp_path, big), "models.digits.reference", str(big), "160 GB")
    (tmp_path / "x.npy").write_bytes(_fake_npy(GB160))
    _one_line(_cli("certify", "--input", str(tmp_path / "x.npy")), str(tmp_path / "x.npy"), "160 GB")


def test_a_single_npy_where_an_npz_is_read_is_one_line(tmp_path):
    """A reference, context or data file must be an .npz of named arrays: a plain .npy
    (np.save instead of np.savez) was a TypeError traceback (``with`` on an ndarray) in
    init, the stage's reference and compare --data."""
    from riskpipe import npy

    ref = tmp_path / "ref.npy"
    np.save(ref, np.zeros((20, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"ref.npy: a single .npy array, not an .npz archive of named arrays"):
        npy.load_npz(ref)
    _one_line(_run_with_reference(tmp_path, ref), "models.digits.reference", str(ref), "not an .npz archive")
    _one_line(_cli("init", "--model", "demo:digits", "--reference", str(ref), "--out", str(tmp_path / "init")),
              str(ref), "not an .npz archive")


# ---- batch size ---------------------------------------------------------------------------
def test_a_billion_certify_batch_size_is_one_line(tmp_path):
    (tmp_path / "events.jsonl").write_text("")
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text("certify_batch_size: 1000000000\n")
    _one_line(_cli("run", "--config", str(cfg)), str(cfg), "certify_batch_size")
    from synthetic import cifar_cnn, policy_without_context, save_torchscript

    cnn = save_torchscript(cifar_cnn(), tmp_path / "cnn.pt", (3, 32, 32))
    r = _cli("run", "--model", f"cnn={cnn}", "--policy", policy_without_context(tmp_path), "--certify-batch-size",
             "1000000", "--source", f"jsonl:{tmp_path / 'events.jsonl'}", "--sink", f"jsonl:{tmp_path / 'out'}",
             "--no-ledger", "--no-metrics-server")
    _one_line(r, "models.cnn", "certify_batch_size", "11.4 GiB", "at most 174762")


# ---- reference radii off the sound grid -----------------------------------------------------------
def test_reference_off_the_sound_grid_is_one_line(tmp_path):
    from streamkit import policy_with

    pol = policy_with(tmp_path, certifier={"method": "smoothing", "mode": "decide", "sigma": 0.25,
                                           "max_samples": 200, "sampler": "sound", "grid_levels": 255})
    ref = tmp_path / "ref.npz"
    X = np.full((4, 64), 0.5001, np.float32)  # 0.5001 * 255 = 127.53: off the 1/255 grid
    np.savez(ref, X=X, y=np.arange(4) % 10)
    (tmp_path / "events.jsonl").write_text("")
    r = _cli("run", "--model", "digits=demo:digits", "--reference", f"digits={ref}", "--policy", pol, "--source",
             f"jsonl:{tmp_path / 'events.jsonl'}", "--sink", f"jsonl:{tmp_path / 'out'}", "--no-ledger",
             "--certify-batch-size", "64", "--no-metrics-server")
    _one_line(r, "models.digits.reference", str(ref), "not on the sound sampler's grid")
