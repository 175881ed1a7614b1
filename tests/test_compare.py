"""The comparison report card: numbers that must hold, all three formats, CLI errors."""

import itertools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from riskpipe.certify import Certificate
from riskpipe.cli.compare_cmd import compare
from riskpipe.cli.compare_impl import parse_grid
from riskpipe.compare import CompareConfig, certified_accuracy, render, run_compare


@pytest.fixture(scope="module")
def result():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = CompareConfig(models=("demo:digits-ibp",), limit=24, n_samples=100, n0=16, timing_inputs=2,
                            batch_sizes=(1, 4), widths=(4, 8), pgd_steps=5)
        yield run_compare(cfg)
    finally:
        torch.set_num_threads(n)


def test_certified_accuracy_is_sound_and_monotone(result):
    m = result["models"][0]
    for run in m["methods"]:
        for norm, acc in run["certified_accuracy"].items():
            assert all(0 <= a <= 1 for a in acc)
            assert all(a >= b for a, b in itertools.pairwise(acc))  # non-increasing in epsilon
            if run["method"] != "smoothing":  # deterministic bounds on this model: PGD cannot beat them
                assert all(c <= p + 1e-12 for c, p in zip(acc, m["pgd_accuracy"][norm]))
                assert acc[0] <= m["clean_accuracy"]
    ibp = next(r for r in m["methods"] if r["method"] == "ibp")
    assert ibp["certified_accuracy"]["linf"][3] > 0.3  # eps = 0.1: the IBP-trained demo certifies something
    assert ibp["conversion_factor"] == {"l2": 1.0, "linf": 1.0}
    smooth = next(r for r in m["methods"] if r["method"] == "smoothing")
    assert smooth["conversion_factor"]["linf"] == pytest.approx(1 / 8)
    assert smooth["evaluations_per_input"] == 116
    for run in m["methods"]:
        assert run["latency_ms"]["n"] == 2 and run["latency_ms"]["p90"] >= run["latency_ms"]["median"] > 0
    assert [r["batch_size"] for r in result["sweeps"]["ibp"]["batch"]] == [1, 4]
    assert [r["width"] for r in result["sweeps"]["lipschitz"]["width"]] == [4, 8]


def test_theorem2_conversion_in_certified_accuracy():
    certs = [Certificate(method="smoothing", norm="l2", radius=0.8, abstained=False, predicted_class=1)]
    y = np.array([1])
    assert certified_accuracy(certs, y, "l2", "linf", [0.1, 0.1001], 64) == [1.0, 0.0]  # 0.8 / sqrt(64)
    assert certified_accuracy(certs, np.array([2]), "l2", "l2", [0.0], 64) == [0.0]  # wrong class never counts


def test_card_in_three_formats(result, tmp_path):
    written = render(result, tmp_path)
    html = written["html"].read_text()
    assert html.count("data:image/png;base64,") == 2 and "Theorem 2" in html
    md = written["md"].read_text()
    assert "Theorem 2" in md and (tmp_path / "compare-certified_accuracy.png").stat().st_size > 1000
    data = json.loads(written["json"].read_text())
    assert data["models"][0]["spec"] == "demo:digits-ibp" and "theorem2" in data["notes"]


def test_grid_parsing():
    assert parse_grid("0,0.5", ("l2", "linf")) == {"l2": (0.0, 0.5), "linf": (0.0, 0.5)}
    assert parse_grid("linf=0,0.1", ("l2", "linf"))["linf"] == (0.0, 0.1)


@pytest.mark.parametrize("args, message", [
    (["--methods", "ibp,magic"], "methods"),
    (["--format", "pdf"], "--format"),
    (["--norms", "l1"], "norms"),
    (["--eps-grid", "linf=-1"], "eps_grid"),
    (["--data", "missing.npz"], "--data"),
    (["--limit", "0"], "limit"),
    (["--eps-grid", "l3=0,1"], "'l3' is not one of --norms l2, linf"),  # was silently ignored
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    res = CliRunner().invoke(compare, args + ["--out", str(tmp_path)])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("y, message", [
    ([10, 11, 0], "data {path}: y holds labels outside the model's classes [0, 10) (labels from 0 to 11) of demo"),
    ([-1, 0, 1], "data {path}: y holds labels outside the model's classes [0, 10) (labels from -1 to 1) of demo"),
    ([0.5, 1.5, 2.5], "--data {path}: y must hold 3 integer labels"),  # was truncated to 0, 1, 2
    ([[0], [1], [2]], "--data {path}: y must hold 3 integer labels"),
])
def test_data_labels_are_checked_against_the_model(tmp_path, y, message):
    """Labels past the model's classes were an IndexError traceback; negative, float or 2-D labels
    gave a card of made-up accuracies."""
    from riskpipe.models.digits import load_split

    X, _ = load_split("test")
    path = tmp_path / "d.npz"
    np.savez(path, X=X[:3], y=np.asarray(y))
    res = CliRunner().invoke(compare, ["--model", "demo:digits", "--methods", "smoothing", "--data", str(path),
                                       "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert message.format(path=path) in res.output


@pytest.mark.parametrize("make, says", [
    (lambda d: d.joinpath("card").write_text("mine\n"), "{out}: exists and is not a directory"),
    (lambda d: d.joinpath("notes").write_text("mine\n"), "{out}: cannot be made: {d}/notes is not a directory"),
    (lambda d: (d / "card").mkdir() or (d / "card" / "notes.txt").write_text("mine\n"),
     "{out}: holds files that are not an earlier riskpipe compare card (notes.txt)"),
])
def test_out_is_checked_before_the_certification(tmp_path, monkeypatch, make, says):
    """``--out FILE`` failed with "File exists" only once every family had certified every
    input (minutes); a directory holding someone else's files got the card written among
    them. Both are one line naming the path and the reason, before any certification."""
    from riskpipe.cli import compare_impl

    def never(*args, **kwargs):
        raise AssertionError("the certification ran before --out was checked")

    monkeypatch.setattr(compare_impl, "run_compare", never)
    make(tmp_path)
    out = tmp_path / ("notes/card" if "cannot be made" in says else "card")
    res = CliRunner().invoke(compare, ["--model", "demo:digits-ibp", "--methods", "ibp", "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("riskpipe: error: --out " + says.format(out=out, d=tmp_path))
    assert not (tmp_path / "card" / "compare.json").exists()


def test_a_rerun_replaces_the_earlier_card_whole(result, tmp_path, monkeypatch):
    """A directory holding an earlier card takes a new one, which replaces it: the files the
    new one does not write (another format's, its plots) are removed, so the directory
    never holds two runs' cards side by side."""
    from riskpipe.cli import compare_impl

    monkeypatch.setattr(compare_impl, "run_compare", lambda *a, **k: result)
    out = tmp_path / "card"
    args = ["--model", "demo:digits-ibp", "--methods", "ibp", "--out", str(out)]
    assert CliRunner().invoke(compare, args).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare-certified_accuracy.png", "compare-cost.png",
                                                       "compare.html", "compare.json", "compare.md"]
    res = CliRunner().invoke(compare, [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in out.iterdir()] == ["compare.json"]


def test_your_model_without_data_is_told_of_data(tmp_path):
    """Without --data the inputs are the demo digits; on a model of other inputs the line said
    only `inputs: shape (1, 8, 8) per input, model ... expects (4,)`, not what to give instead."""
    res = CliRunner().invoke(compare, ["--model", "usermodels:short_of_memory_model?shape=4", "--methods", "smoothing",
                                       "--limit", "2", "--out", str(tmp_path / "card")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].endswith(
        "expects (4,); without --data the inputs are the demo digits: give your model's with --data DATA.npz")
