"""Commands on users' models, not the demo: ``compare --model --data`` on a 3x32x32
TorchScript CNN and on a tabular skops model (families that cannot certify a model are
reported unavailable with the reason; models without gradients get the black-box attack),
and the black-box attack itself."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from riskpipe.blackbox import random_search
from riskpipe.cli import cli
from riskpipe.models import load_model
from usermodels import image_model, stage_ledger, tabular_model

pytestmark = pytest.mark.slow  # trains a small CNN, runs the stage and evaluations: tens of seconds each


@pytest.fixture(scope="module")
def signs(tmp_path_factory, one_thread):
    return image_model(tmp_path_factory.mktemp("signs"))


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    return tabular_model(tmp_path_factory.mktemp("wine"))


def _compare(tmp_path, spec, data, *extra):
    r = CliRunner().invoke(cli, ["compare", "--model", spec, "--data", str(data), "--limit", "8",
                                 "--n-samples", "100", "--methods", "smoothing,ibp,lipschitz",
                                 "--out", str(tmp_path), "--format", "json,md", *extra])
    assert r.exit_code == 0, r.output
    return json.loads((tmp_path / "compare.json").read_text()), (tmp_path / "compare.md").read_text()


def test_compare_on_a_torchscript_cnn(signs, tmp_path):
    result, md = _compare(tmp_path, signs.spec, signs.data, "--eps-grid", "l2=0,0.5,2;linf=0,0.02,0.1")
    (m,) = result["models"]
    assert m["input_dim"] == 3 * 32 * 32 and m["clean_accuracy"] == 1.0
    assert m["attack"].startswith("PGD")
    runs = {r["method"]: r for r in m["methods"]}
    assert runs["smoothing"]["unavailable"] is None and runs["smoothing"]["evaluations_per_input"] > 100
    for method in ("ibp", "lipschitz"):  # a scripted CNN has no nn.Sequential to propagate bounds through
        assert "nn.Sequential" in runs[method]["unavailable"]
        assert runs[method]["certified_accuracy"]["l2"] == [None, None, None]
        assert f"**{method} is unavailable for {signs.spec}:**" in md
    # the attack is an upper bound of clean accuracy and falls with the budget
    acc = m["pgd_accuracy"]["linf"]
    assert acc[0] == 1.0 and acc[2] < acc[0]
    assert result["sweeps"]["smoothing"]["batch"] and not result["sweeps"]["ibp"]["batch"]


def test_compare_on_a_skops_model_uses_the_black_box_attack(wine, tmp_path):
    spec = wine.spec  # raw units, no declared range: inputs are only checked for finiteness
    result, md = _compare(tmp_path, spec, wine.data, "--sigma", "5", "--eps-grid", "l2=0,5,50;linf=0,2,20")
    (m,) = result["models"]
    assert m["input_dim"] == 13 and m["clean_accuracy"] > 0.8
    assert m["attack"].startswith("PGD on NES gradient estimates (score-based, black-box)")
    runs = {r["method"]: r for r in m["methods"]}
    assert runs["smoothing"]["unavailable"] is None
    assert "needs a torch model" in runs["ibp"]["unavailable"] and "torch model" in runs["lipschitz"]["unavailable"]
    acc = m["pgd_accuracy"]["l2"]
    assert acc[0] == m["clean_accuracy"] and acc[2] < acc[0]  # a large budget does find class changes
    assert "PGD on NES gradient estimates (score-based, black-box), 10 steps x 99 queries (upper bound)" in md


def test_compare_a_config_entry_in_its_scaled_norm(tmp_path):
    """--config: the tabular example's entry (scale: standardize) is certified as the stage does,
    with its policy's certifier settings (sigma 0.25), not the command's --sigma."""
    result, md = _compare(tmp_path, "cancer", "examples/tabular/reference.npz", "--config",
                          "examples/tabular/riskpipe.yaml", "--eps-grid", "l2=0,0.25,4;linf=0,0.05,1", "--sigma", "5")
    (m,) = result["models"]
    assert m["scale"] == "standardize(reference)" and m["input_dim"] == 30 and m["clean_accuracy"] > 0.8
    smooth = next(r for r in m["methods"] if r["method"] == "smoothing")
    assert smooth["settings"] == ("sigma 0.25, alpha 0.001, n0 100, n 100, sampler gaussian, bound cp "
                                  "(from policy tabular-breast-cancer v1.1.0)")
    assert "cancer smoothing: sigma 0.25, alpha 0.001, n0 100, n 100" in md
    # sigma 0.25 in standardized units certifies most rows at the policy's epsilon 0.25 (sigma 5 would not)
    assert smooth["certified_accuracy"]["l2"][1] > 0.5
    assert "**cancer is certified in the scaled norm** ||delta / s||_2 (s: standardize(reference))" in md


def test_random_search_finds_only_genuine_examples_inside_the_budget(wine):
    model = load_model(wine.spec)
    d = np.load(wine.data)
    X, y = d["X"], d["y"]
    for norm, eps in (("l2", 40.0), ("linf", 15.0)):
        adv = random_search(model.predict, X, y, eps, norm, queries=50, value_range=(0.0, 2000.0), seed=3)
        again = random_search(model.predict, X, y, eps, norm, queries=50, value_range=(0.0, 2000.0), seed=3)
        np.testing.assert_array_equal(adv, again)  # seeded
        changed = np.any(adv != X, axis=1)
        assert changed.any()
        assert np.all(model.predict(adv[changed]) != y[changed])  # every reported example fools the model
        delta = (adv - X).astype(np.float64)
        size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        assert np.all(size <= eps * (1 + 1e-5)) and adv.min() >= 0
    with pytest.raises(ValueError, match="norm"):
        random_search(model.predict, X, y, 1.0, "l1")


# ---- evaluate on the examples' models, each entry as its stage config declares it ----------------

def _evaluate(tmp_path, example: str, model: str, *extra, with_output: bool = False):
    root = f"examples/{example}"
    r = CliRunner().invoke(cli, ["evaluate", "--config", f"{root}/riskpipe.yaml", "--model", model,
                                 "--data", f"{root}/reference.npz", "--policy", f"{root}/policy.yaml",
                                 "--n", "8", "--budgets", "8x", "--shift-budgets", "1x", "--attempts", "2",
                                 "--out", str(tmp_path), "--format", "json,md,html", *extra])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "evaluation.json").read_text()), (tmp_path / "evaluation.md").read_text()
    return (*result, r.output) if with_output else result


def test_evaluate_a_torchscript_image_model_with_pgd(tmp_path, one_thread):
    result, md = _evaluate(tmp_path, "image", "shapes", "--steps", "5")
    (s,) = result["policies"]
    assert result["input_dim"] == 3 * 32 * 32 and s["policy"]["attack"] == "PGD (5 steps, gradients)"
    assert s["clean"]["n"] == 8 and s["clean"]["accuracy"] > 0.5
    pgd = next(a for a in s["attacks"] if a["kind"] == "pgd")
    assert pgd["epsilon"] == pytest.approx(8 * 0.25) and pgd["successful"] >= 1  # 8x epsilon breaks this CNN
    assert "attack PGD (5 steps, gradients)" in md and "--config examples/image/riskpipe.yaml" in md
    assert s["policy"]["scale"] is None and "x / s" not in md  # input units: no scaled norm to name
    html = (tmp_path / "evaluation.html").read_text()
    assert s["examples"] and html.count('class="input-image"') == 2 * len(s["examples"])
    assert any(f"model now says {n} (class {i})" in html for i,
               n in enumerate(["circle", "square", "triangle", "cross"]))


def test_evaluate_a_scaled_skops_model_with_the_black_box_attack(tmp_path):
    result, md, out = _evaluate(tmp_path, "tabular", "cancer", "--queries", "100", with_output=True)
    (s,) = result["policies"]
    assert result["input_dim"] == 30 and s["policy"]["attack"].startswith("PGD on NES gradient estimates")
    # the progress line names the attack that runs, not PGD with gradients (the model has none)
    assert "attacking pgd" not in out and re.search(
        r"riskpipe evaluate: tabular-breast-cancer: pgd-l2-[0-9.]+: PGD on NES gradient estimates \(score-based, "
        r"black-box\), 20 steps x 5 queries, l2 epsilon [0-9.]+", out), out
    assert s["clean"]["accuracy"] > 0.8
    pgd = next(a for a in s["attacks"] if a["kind"] == "pgd")
    assert pgd["attempted"] >= 6 and pgd["successful"] >= 1  # 8x epsilon in the standardized norm
    assert "attack PGD on NES gradient estimates (score-based, black-box)" in md
    # the successful adversarial rows beside the clean ones, as tables named by the skops file's features
    html = (tmp_path / "evaluation.html").read_text()
    assert 1 <= len(s["examples"]) <= 3 and html.count('class="input-table"') == 2 * len(s["examples"])
    assert "<td>mean radius</td>" in html
    assert any(f"model now says {n} (class {i})" in html for i, n in enumerate(["malignant", "benign"]))
    # epsilon and budgets are of x / s (the scaled norm): "l2 eps=0.5" alone read as raw units
    eps = s["policy"]["threat_epsilon"]
    assert s["policy"]["scale"] == "standardize(reference)"
    assert f"| l2 eps={eps:g} of x / s, s = standardize(reference) |" in md
    assert f"| l2 {8 * eps:.4g} of x / s, s = standardize(reference) (8x) |" in md and "of x / s" in html


def test_evaluate_names_a_model_missing_from_the_config(tmp_path):
    r = CliRunner().invoke(cli, ["evaluate", "--config", "examples/tabular/riskpipe.yaml", "--model", "nope",
                                 "--policy", "examples/tabular/policy.yaml", "--out", str(tmp_path)])
    assert r.exit_code != 0
    assert "model: 'nope' is not a model of examples/tabular/riskpipe.yaml (known: cancer)" in r.output


# ---- ledger replay of records the stage wrote for the examples' models ----------------------------

def _replay(*args):
    r = CliRunner().invoke(cli, ["ledger", "replay", *args, "--json"])
    return r.exit_code, (json.loads(r.output) if r.output.startswith("{") else r.output)


def test_replay_a_torchscript_image_model(tmp_path, one_thread):
    ledger, inputs = stage_ledger(tmp_path, "image", "shapes")
    code, res = _replay("image-1", "--ledger", str(ledger), "--input", str(inputs))
    assert code == 0 and res["ok"] and res["input_match"]
    checks = {c["name"]: c for c in res["checks"]}
    assert checks["radius"]["match"] and checks["model.sha256"]["match"]
    code, res = _replay("image-1", "--ledger", str(ledger), "--input", str(inputs), "--config",
                        "examples/image/riskpipe.yaml")
    assert code == 0 and {c["name"]: c["match"] for c in res["checks"]}["policy.sha256"]
    changed = np.load(inputs)[1:2].copy()
    changed[0, 0, 5, 5] += 0.01
    np.save(tmp_path / "changed.npy", changed)
    code, res = _replay("image-1", "--ledger", str(ledger), "--input", str(tmp_path / "changed.npy"))
    assert code == 1 and not res["input_match"]


def test_replay_a_scaled_skops_model_needs_and_uses_its_config(tmp_path):
    ledger, inputs = stage_ledger(tmp_path, "tabular", "cancer")
    code, res = _replay("tabular-2", "--ledger", str(ledger), "--input", str(inputs), "--config",
                        "examples/tabular/riskpipe.yaml")
    assert code == 0 and res["ok"], res
    assert all(c["match"] for c in res["checks"]) and len(res["checks"]) == 8
    # from the record's spec alone the scale is unknown: refused with the reason, never a false match
    code, out = _replay("tabular-2", "--ledger", str(ledger), "--input", str(inputs))
    assert code == 2 and "certificate.extra.scale: the certificate holds in a scaled norm" in out


def test_evaluate_a_skops_spec_with_a_reference_for_context(wine, tmp_path):
    """--model SPEC --reference: the default policy uses context risk, so the model needs its reference set."""
    args = ["evaluate", "--model", wine.spec, "--data", str(wine.data), "--policy", "policies/default.yaml",
            "--n", "8", "--budgets", "400x", "--shift-budgets", "1x", "--attempts", "2", "--queries", "50",
            "--out", str(tmp_path), "--format", "json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0 and "reference" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, [*args, "--reference", str(wine.data)])
    assert r.exit_code == 0, r.output
    (s,) = json.loads((tmp_path / "evaluation.json").read_text())["policies"]
    assert s["policy"]["attack"].startswith("PGD on NES gradient estimates") and s["clean"]["accuracy"] > 0.8
    pgd = next(a for a in s["attacks"] if a["kind"] == "pgd")
    assert pgd["epsilon"] == pytest.approx(100.0) and pgd["successful"] >= 1  # 100 raw units change the wine class


@pytest.mark.parametrize("attack", ["hop_skip_jump", "nes_pgd"])
def test_black_box_attacks_find_only_genuine_examples_and_beat_random_search(demo_model, digits_test, attack):
    """HopSkipJump (labels only) and PGD on NES estimates (scores only) on the demo network
    seen as a black box, at the query budget random search gets: seeded, every example
    inside the budget and genuine, and far more found than random search in l2."""
    from riskpipe import blackbox

    X, y = digits_test[0][:60], digits_test[1][:60]
    ok = demo_model.predict(X) == y
    X, y = X[ok], y[ok]

    def scores(batch):
        with torch.no_grad():
            return demo_model.module(torch.as_tensor(batch)).numpy()

    kw = {"value_range": (0.0, 1.0), "seed": 3}
    for norm, eps in (("l2", 1.0), ("linf", 0.1)):
        if attack == "hop_skip_jump":
            run = lambda: blackbox.hop_skip_jump(demo_model.predict, X, y, eps, norm, queries=400, **kw)  # noqa: E731
        else:
            run = lambda: blackbox.nes_pgd(scores, X, y, eps, norm, steps=10, samples=19, **kw)  # noqa: E731
        adv = run()
        np.testing.assert_array_equal(adv, run())  # seeded
        delta = (adv - X).reshape(len(X), -1).astype(np.float64)
        size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        assert np.all(size <= eps * (1 + 1e-5)) and adv.min() >= 0 and adv.max() <= 1
        fooled = (demo_model.predict(adv) != y).sum()
        rs = (demo_model.predict(random_search(demo_model.predict, X, y, eps, norm, queries=400, **kw)) != y).sum()
        if norm == "l2":
            assert fooled >= 3 * max(rs, 5), (attack, fooled, rs)  # measured: 51 and 51 against 6 of 57
        else:
            assert fooled >= 1


def test_evaluate_and_replay_the_fraud_forest_with_the_trees_certificate(tmp_path):
    """evaluate attacks the tree ensemble with the tree search (named so) and sends the
    results through the stage under the trees policy; replay recomputes a trees
    certificate from the ledger through the config."""
    result, md = _evaluate(tmp_path, "fraud", "fraud", "--budgets", "1x,8x")
    (s,) = result["policies"]
    assert s["policy"]["certifier"] == "trees" and s["policy"]["attack"].startswith("tree leaf-region search")
    assert "attack tree leaf-region search" in md
    big = next(a for a in s["attacks"] if a["kind"] == "pgd" and a["epsilon"] == pytest.approx(0.8))
    assert big["successful"] >= 1  # 8x epsilon in standardized l_inf changes some decisions
    (tmp_path / "replay").mkdir()
    ledger, inputs = stage_ledger(tmp_path / "replay", "fraud", "fraud")
    code, res = _replay("fraud-1", "--ledger", str(ledger), "--input", str(inputs), "--config",
                        "examples/fraud/riskpipe.yaml")
    assert code == 0 and res["ok"], res
    assert res["parameters"]["eps_max"] > 0 and all(c["match"] for c in res["checks"])
