"""The evaluation harness end to end on the demo model and a small subset, through the
real offline stage: counts add up against the stage's own files, large budgets really
flip predictions, the public topic gives the guided attacker nothing, and a second run
with the same seed (through the CLI) gives the same figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from riskpipe.attacks import PUBLIC_FIELDS, GuidedAttacker, PublicAttacker, PublicView, TrustedView
from riskpipe.cli.evaluate_cmd import evaluate
from riskpipe.evaluate import EvaluationError, Settings, parse_budgets, run_evaluation, write_report
from riskpipe.evaluate.harness import load_data

ROOT = Path(__file__).resolve().parents[1]
POLICY = str(ROOT / "policies" / "default.yaml")
SMALL = dict(model="demo:digits", policies=(POLICY,), data="digits", n=10, steps=4, seed=3)
BUDGETS, SHIFT = "4x", "8x"


def _strip_timing(result: dict) -> dict:
    return [{k: v for k, v in p.items() if k != "elapsed_s"} for p in result["policies"]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval")
    settings = Settings(**SMALL, budgets=parse_budgets(BUDGETS), shift_budgets=parse_budgets(SHIFT, "shift-budgets"))
    return run_evaluation(settings, work / "stage"), work


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_counts_add_up_against_the_stage_files(run):
    result, work = run
    (p,) = result["policies"]
    sink = work / "stage" / "stage-default"
    audit, decisions = _read(sink / "audit.jsonl"), _read(sink / "decisions.jsonl")
    n = result["n_inputs"]
    assert n == 10 and len(audit) == len(decisions) == n * (1 + 2)  # clean + one PGD + one norm shift
    clean = p["clean"]
    assert sum(clean["routes"]["counts"].values()) == clean["decided"] == n - clean["dead_lettered"]
    clean_ids = {r["id"] for r in audit if r["id"].startswith("clean-")}
    assert clean["routes"]["counts"]["review"] == sum(r["decision"] == "review" for r in audit if r["id"] in clean_ids)
    for a in p["attacks"]:
        routes = a["routes"]["counts"]
        assert sum(routes.values()) == a["successful"] - a["dead_lettered"]
        assert a["successful"] <= a["attempted"] <= n
        assert a["certified_wrong_class"] <= a["certified"] <= a["successful"]
        ids = {r["id"] for r in audit if r["id"].startswith(a["name"] + "-")}
        assert len(ids) == n
    pgd = next(a for a in p["attacks"] if a["kind"] == "pgd")
    assert pgd["epsilon"] == pytest.approx(4 * p["policy"]["threat_epsilon"])
    assert pgd["success_rate"] >= 0.6  # four times the policy epsilon really flips predictions
    cmp = pgd["attackers"]
    assert cmp["guided"]["attempts"] == cmp["public"]["attempts"] == cmp["attempts"] == 2
    assert cmp["guided"]["evaded"] <= cmp["guided"]["misclassified"] <= cmp["attempts"]
    shift = next(a for a in p["attacks"] if a["kind"] == "norm_shift")
    cov = shift["coverage"]
    assert shift["norm"] == "linf" and cov["cert_norm"] == "l2"
    assert cov["epsilon"] == pytest.approx(8 * 0.25 / 8)  # 8x the Theorem 2-converted epsilon
    assert cov["covered"] <= cov["naive_covered"] and cov["certificate_silent"] == (cov["covered"] == 0)


def test_the_evaluations_noise_comes_from_its_seed_not_the_environment(run):
    """An evaluation repeats from its --seed on any machine: its stage's noise key is derived
    from the seed (riskpipe.app.noise_key.seeded_noise_key), never the deployment's secret."""
    from riskpipe.app.noise_key import seeded_noise_key
    from riskpipe.ledger.chain import decision_scope
    from riskpipe.stream.pipeline import seed_for

    _, work = run
    key = seeded_noise_key(SMALL["seed"], "riskpipe evaluate").key
    audit = _read(work / "stage" / "stage-default" / "audit.jsonl")
    assert audit and all(r["certificate"]["seed"] == seed_for(key, r["id"], decision_scope("decision", r))
                     for r in audit)


def test_public_topic_gives_the_guided_attacker_nothing(run):
    _, work = run
    sink = work / "stage" / "stage-default"
    decisions = [r for r in _read(sink / "decisions.jsonl") if r["id"].startswith("clean-")]
    audit = [r for r in _read(sink / "audit.jsonl") if r["id"].startswith("clean-")]
    assert all(set(r) == set(PUBLIC_FIELDS) for r in decisions)  # nothing that locates the boundary
    view = PublicView.from_records(decisions)
    guided = GuidedAttacker(4, 1.0, seed=0)
    assert guided.choose(view) == PublicAttacker(4, seed=0).choose(view)
    assert guided.choose(TrustedView.from_records(audit))  # the trusted view is usable


def test_same_seed_same_figures_through_the_cli_and_reports(run, tmp_path):
    result, _ = run
    out = tmp_path / "report"
    args = ["--model", SMALL["model"], "--policy", POLICY, "--n", "10", "--steps", "4", "--seed", "3",
            "--budgets", BUDGETS, "--shift-budgets", SHIFT, "--out", str(out), "--format", "json,md,html"]
    res = CliRunner().invoke(evaluate, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    again = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    assert _strip_timing(again) == _strip_timing(json.loads(json.dumps(result)))
    md = (out / "evaluation.md").read_text(encoding="utf-8")
    assert "| default v1.2.0 | PGD (4 steps, gradients) | l2 1 (4x) |" in md and "(figures/default-routes.png)" in md
    assert (out / "figures" / "default-routes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the definitions, one list item each (printed whole, the Markdown escaping ran them into one line)
    definitions = md.split("## Definitions and scope\n\n")[1].split("\n\n")[0].splitlines()
    assert len(definitions) == 5 and all(line.startswith("* ") for line in definitions), definitions
    assert "(`would_be`)" in definitions[2] and "*certified wrong*" in definitions[3] and "\\`" not in md
    html = (out / "evaluation.html").read_text(encoding="utf-8")
    items = html.split('<ul class="definitions" id="definitions">')[1].split("</ul>")[0]
    assert items.count("<li>") == 5 and "<code>would_be</code>" in items and "*" not in items
    examples = result["policies"][0]["examples"]  # 4x epsilon succeeds: adversarial inputs beside clean ones
    assert 1 <= len(examples) <= 3 and all(e["adversarial_prediction"] != e["label"] for e in examples)
    assert html.count("data:image/png;base64,") == 4 + 2 * len(examples)
    assert html.count('class="input-image"') == 2 * len(examples)
    written = write_report(result, tmp_path / "json-only", ("json",))
    assert [p.name for p in written] == ["evaluation.json"]


@pytest.mark.parametrize("args,message", [
    (["--policy", "nope.yaml"], "policy nope.yaml: file not found"),
    (["--policy", POLICY, "--budgets", "big"], "budgets: 'big' is not a number or a multiple like 2x"),
    (["--policy", POLICY, "--shift-budgets", "-1"], "shift-budgets: '-1' must be > 0"),
    (["--policy", POLICY, "--data", "x.csv"], "data: 'x.csv' is neither 'digits' nor an .npz file"),
    (["--policy", POLICY, "--attempts", "0"], "attempts: must be >= 1"),
    (["--policy", POLICY, "--upstream-risk", "2"], "upstream_risk: must lie in [0, 1], got 2.0"),
])
def test_bad_input_gives_one_line_errors(args, message):
    res = CliRunner().invoke(evaluate, args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_same_policy_twice_is_refused():
    res = CliRunner().invoke(evaluate, ["--policy", POLICY, "--policy", POLICY])
    assert res.exit_code == 2 and "two policies are named 'default'" in res.output


def test_format_is_checked():
    res = CliRunner().invoke(evaluate, ["--policy", POLICY, "--format", "pdf"])
    assert res.exit_code == 2 and "'pdf' is not one of html, md, json" in res.output


def test_npz_data_is_checked(tmp_path):
    import numpy as np

    p = tmp_path / "d.npz"
    np.savez(p, X=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(EvaluationError, match="missing array 'y'"):
        load_data(str(p))
    np.savez(p, X=np.zeros((3, 1, 8, 8), np.float32), y=np.zeros(3, np.int64))
    X, y = load_data(str(p))
    assert X.shape == (3, 1, 8, 8) and y.tolist() == [0, 0, 0]


def test_bad_policy_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: riskpipe/v1\nkind: RiskPolicy\nthreat_model: {norm: l7, epsilon: 1}\n",
                   encoding="utf-8")
    res = CliRunner().invoke(evaluate, ["--policy", str(bad), "--n", "5"])
    assert res.exit_code == 2 and "riskpipe: error:" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("y, X_nan, message", [
    ([0.5, 1.5, 2.5], False, "y must hold 3 integer labels"),  # was cast to 0, 1, 2: accuracy on made-up labels
    ([[0], [1], [2]], False, "y must hold 3 integer labels"),  # was a TypeError traceback in the stage
    ([0, 1, 2], True, "of finite values"),
])
def test_npz_data_labels_and_values_are_checked(tmp_path, y, X_nan, message):
    import numpy as np

    X = np.zeros((3, 1, 8, 8), np.float32)
    if X_nan:
        X[1, 0, 2, 2] = np.nan
    np.savez(tmp_path / "d.npz", X=X, y=np.asarray(y))
    with pytest.raises(EvaluationError, match=message):
        load_data(str(tmp_path / "d.npz"))


@pytest.mark.parametrize("labels", [[10, 11], [-1, 0]])
def test_labels_outside_the_models_classes_are_one_line(tmp_path, labels):
    """Label 10 of a 10-class model was an IndexError traceback; -1 was evaluated (never 'correct')."""
    import numpy as np

    from riskpipe.models.digits import load_split

    X, _ = load_split("test")
    np.savez(tmp_path / "d.npz", X=X[:2], y=np.asarray(labels))
    res = CliRunner().invoke(evaluate, ["--policy", POLICY, "--data", str(tmp_path / "d.npz"), "--n", "2",
                                        "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    why = f"y holds labels outside the model's classes [0, 10) (labels from {min(labels)} to {max(labels)})"
    assert f"d.npz: {why}" in res.output


@pytest.mark.parametrize("make, says", [
    (lambda d: d.joinpath("report").write_text("mine\n"), "{out}: exists and is not a directory"),
    (lambda d: d.joinpath("notes").write_text("mine\n"), "{out}: cannot be made: {d}/notes is not a directory"),
    (lambda d: (d / "report" / "figures").mkdir(parents=True) or (d / "report" / "figures" / "mine.svg")
     .write_text("<svg/>\n"), "{out}: holds files that are not an earlier riskpipe evaluate report (figures/mine.svg)"),
])
def test_out_is_checked_before_the_evaluation(tmp_path, monkeypatch, make, says):
    """A regular file given as --out failed as '<file>/stage: Not a directory' once the model
    and data were loaded, and a directory holding someone else's files (their figures/)
    got the report and its figures written among them. Each is one line naming --out and
    the reason, before the evaluation runs; the files there are left as they were."""
    from riskpipe.cli import evaluate_impl

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran before --out was checked")

    monkeypatch.setattr(evaluate_impl, "run_evaluation", never)
    make(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / ("notes/report" if "cannot be made" in says else "report")
    res = CliRunner().invoke(evaluate, ["--policy", POLICY, "--n", "2", "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("riskpipe: error: --out " + says.format(out=out, d=tmp_path))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_rerun_replaces_the_earlier_report_whole(run, tmp_path, monkeypatch):
    """Re-running into the same --out gives a fresh report: the earlier report's files the
    new run does not write again (another policy's figures, a format not asked for) are
    removed rather than left beside it as if they were this run's; the stage's outputs stay."""
    from riskpipe.cli import evaluate_impl

    result, _ = run
    monkeypatch.setattr(evaluate_impl, "run_evaluation", lambda settings, workdir, progress=None: result)
    out = tmp_path / "report"
    write_report(result, out, ("json", "md", "html"))
    (out / "figures" / "strict-routes.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a policy of an earlier run
    (out / "stage" / "stage-default").mkdir(parents=True)
    (out / "stage" / "stage-default" / "audit.jsonl").write_text("{}\n")
    res = CliRunner().invoke(evaluate, ["--policy", POLICY, "--out", str(out), "--format", "md"])
    assert res.exit_code == 0, res.output
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["default-attackers.png", "default-norm_shift.png", "default-routes.png", "default-success.png"]
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.md", "figures", "stage"]
    assert (out / "stage" / "stage-default" / "audit.jsonl").exists()
    res = CliRunner().invoke(evaluate, ["--policy", POLICY, "--out", str(out), "--format", "json"])
    assert res.exit_code == 0 and sorted(p.name for p in out.iterdir()) == ["evaluation.json", "figures", "stage"]
    assert list((out / "figures").iterdir()) == []


def test_a_model_without_its_reference_set_is_told_of_evaluates_own_option(tmp_path):
    """A --model spec (no --config) under a policy that uses context risk: the stage's message
    asked for `models.model.reference or --reference model=PATH`, a config key and `riskpipe
    run`'s syntax; evaluate's --reference takes the file alone."""
    import numpy as np

    X = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=X, y=X[:, 1:4].argmax(1))
    res = CliRunner().invoke(evaluate, ["--model", "usermodels:short_of_memory_model?shape=4", "--policy", POLICY,
                                        "--data", str(tmp_path / "d.npz"), "--n", "3", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == (
        f"riskpipe: error: --reference: policy default ({POLICY}) uses context risk; give the model's reference "
        "set (.npz with X and y) with --reference FILE")
