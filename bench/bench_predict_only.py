"""Predict-only speed (issue 20 item 3): how close the stage runs to a scikit-learn model's own speed.

Physical limit of a model under smoothing = its best predict rate (samples/s, noise-free
batches of 256..16384, ``common.best_forward``) / mean model evaluations per decision
(the certificates' ``n_samples``). The ratio = offline decisions/s (``run_offline``: JSON
lines in and out, no ledger, the stage's own code path) / that limit.

Two models, each under smoothing (``examples/tabular/policy.yaml``, ``scale: standardize``):

* the tabular example (skops StandardScaler + MLP, 30 features);
* a 200-tree RandomForestClassifier trained here on ``make_classification`` (seeded,
  20 features, 2 classes), saved with skops (loaded through the tree allow-list).

Side by side in one run: "before" is the riskpipe of ``--base`` (a commit, extracted with
``git archive``) and "after" the working tree, each in its own subprocess on the same
config, events and seeds, interleaved over ``--rounds``. Both must produce the same
certificates (a digest of every audit record's certificate and decision is compared).
Writes bench/results/predict_only.json.

    python bench/bench_predict_only.py [--n 512] [--batch 256] [--rounds 2] [--base COMMIT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import best_forward, certificates_digest, table, write_results  # noqa: E402

BASE = "29d5893"  # main just before the predict-only speed changes
EXAMPLE = ROOT / "examples" / "tabular"


def make_forest(tmp: Path) -> Path:
    """A seeded 200-tree forest on make_classification, its config and reference set; returns the config."""
    import skops.io as sio
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    X, y = make_classification(n_samples=3000, n_features=20, n_informative=8, random_state=0)
    X = X.astype(np.float32)
    rf = RandomForestClassifier(n_estimators=200, max_depth=10, random_state=0, n_jobs=1).fit(X[:2000], y[:2000])
    sio.dump(rf, tmp / "forest.skops")
    np.savez_compressed(tmp / "forest_ref.npz", X=X[2000:], y=y[2000:].astype(np.int64),
                        feature_names=np.array([f"f{i}" for i in range(20)]))
    cfg = {"policy": str(EXAMPLE / "policy.yaml"),
           "models": {"forest": {"spec": str(tmp / "forest.skops"), "reference": str(tmp / "forest_ref.npz"),
                                 "policy": str(EXAMPLE / "policy.yaml"), "scale": "standardize"}}}
    (tmp / "forest.yaml").write_text(json.dumps(cfg))
    return tmp / "forest.yaml"


def events(reference: Path, model: str, n: int) -> list[dict]:
    """Reference rows nudged by 1 % of each feature's std (inputs the model never saw exactly)."""
    with np.load(reference) as z:
        X = z["X"][np.arange(n) % len(z["X"])]
    X = X + 0.01 * X.std(axis=0) * np.random.default_rng(0).standard_normal(X.shape).astype(np.float32)
    from riskpipe.stream.events import make_event

    return [make_event(f"{model}-{i}", model, x, upstream_risk=0.1) for i, x in enumerate(X)]


def worker(config: str, model: str, events_path: str, batch: int) -> dict:
    """One measurement in this process's riskpipe (the one on PYTHONPATH)."""
    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import load_config
    from riskpipe.app.offline import run_offline

    cfg = load_config(config, ledger=None, batch={"max_events": batch, "max_wait_ms": 50})
    pipeline = build_pipeline(cfg)
    entry = pipeline.entries[model]
    evs = [json.loads(line) for line in Path(events_path).read_text().splitlines()]
    with tempfile.TemporaryDirectory() as d:
        run_offline(evs[: batch], Path(d) / "warm", cfg, pipeline=pipeline)  # first-call costs out of the timing
        fwd_before = best_forward(entry.certified, seconds=1.0)
        t0 = time.perf_counter()
        res = run_offline(evs, Path(d) / "out", cfg, pipeline=pipeline)
        wall = time.perf_counter() - t0
        fwd_after = best_forward(entry.certified, seconds=1.0)
        audit = res.read("audit")
    assert len(audit) == len(evs), (len(audit), len(evs), res.read("dlq")[:1])
    evals = float(np.mean([r["certificate"]["n_samples"] for r in audit]))
    fwd = (fwd_before[0] + fwd_after[0]) / 2
    digest = certificates_digest(audit)
    limit = fwd / evals
    return {"decisions_per_s": len(evs) / wall, "wall_s": wall, "evals_per_decision_mean": evals,
            "best_predict_samples_per_s": fwd, "best_predict_batch": max(fwd_before, fwd_after)[1],
            "physical_limit_decisions_per_s": limit, "ratio": len(evs) / wall / limit,
            "certificates_sha256": digest}


def run_worker(tree: Path, config: Path, model: str, events_path: Path, batch: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "--worker", str(config), model, str(events_path), str(batch)],
                         env=env, cwd=tree, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"worker failed ({tree}, {model}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="events per model")
    ap.add_argument("--batch", type=int, default=256, help="micro-batch size (max_events)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--base", default=BASE, help="commit measured as 'before'")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        config, model, events_path, batch = args.worker
        print(json.dumps(worker(config, model, events_path, int(batch))))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = tmp / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        cases = {"tabular example (MLP, 30 features)": (EXAMPLE / "riskpipe.yaml", "cancer",
                                                         EXAMPLE / "reference.npz"),
                 "random forest, 200 trees (20 features)": (make_forest(tmp), "forest", tmp / "forest_ref.npz")}
        runs: dict[str, dict[str, list[dict]]] = {c: {"before": [], "after": []} for c in cases}
        for label, (config, model, ref) in cases.items():
            ev_path = tmp / f"{model}.jsonl"
            ev_path.write_text("\n".join(json.dumps(e) for e in events(ref, model, args.n)) + "\n")
            for _ in range(args.rounds):
                for variant, tree in (("before", base), ("after", ROOT)):
                    runs[label][variant].append(run_worker(tree, config, model, ev_path, args.batch))
    results, rows = {}, []
    for label, by in runs.items():
        entry = {}
        for variant, rs in by.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "certificates_sha256"}
            entry[variant] = {**med, "ratio_runs": [r["ratio"] for r in rs],
                              "certificates_sha256": sorted({r["certificates_sha256"] for r in rs})}
            rows.append((label, variant, f"{med['decisions_per_s']:.0f}", f"{med['evals_per_decision_mean']:.1f}",
                         f"{med['best_predict_samples_per_s']:.0f}", f"{med['physical_limit_decisions_per_s']:.0f}",
                         f"{med['ratio']:.3f}"))
        entry["same_certificates"] = entry["before"]["certificates_sha256"] == entry["after"]["certificates_sha256"] \
            and len(entry["after"]["certificates_sha256"]) == 1
        entry["speedup"] = entry["after"]["decisions_per_s"] / entry["before"]["decisions_per_s"]
        entry["target_ratio"] = 0.6
        entry["target_met"] = entry["after"]["ratio"] >= 0.6
        results[label] = entry
    print(table(rows, ("model", "code", "decisions/s", "evals/decision", "best predict/s", "limit decisions/s",
                       "ratio")))
    for label, e in results.items():
        print(f"{label}: speedup {e['speedup']:.2f}x, same certificates {e['same_certificates']}, "
              f"ratio {e['after']['ratio']:.3f} (target 0.6 {'met' if e['target_met'] else 'missed'})")
    path = write_results("predict_only", {"events_per_model": args.n, "batch_max_events": args.batch,
                                          "rounds": args.rounds, "base": args.base, "models": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
