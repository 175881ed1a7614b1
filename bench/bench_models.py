"""Models benchmark (issue 12): the demo model and the two examples through the stage.

For each of ``demo:digits`` (policies/default.yaml), the image example (TorchScript CNN,
3x32x32) and the tabular example (skops MLP, 30 features, ``scale: standardize``), each
under the policy its config names, measured side by side in one run and written to
bench/results/models.json:

* decisions/s offline: the stage's own code path (``run_offline``, JSON lines in and
  out, no ledger) over N events, wall time of the whole run;
* p50 / p99 batch latency: wall time per micro-batch (``--batch`` events at most);
* model evaluations per decision: the certificates' ``n_samples`` (mean, median, p90);
* evaluations/s inside certification (sum of ``n_samples`` / time inside the
  certifier) divided by the model's best raw forward throughput (noise-free batches of
  256..16384, measured just before and just after the stage run, mean of the two, as
  the machine is shared): how close certification runs to the model's own speed.

Inputs the models never saw: digits of the test split, freshly drawn shape images
(another seed than the example's), tabular reference rows nudged by 1 % of each
feature's std. Context indexes and reference radii are built before timing.

    python bench/bench_models.py [--n 256] [--batch 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_forward, table, write_results
from riskpipe.app.compose import build_pipeline
from riskpipe.app.config import load_config
from riskpipe.app.offline import run_offline
from riskpipe.stream.events import make_event

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _image_build():
    spec = importlib.util.spec_from_file_location("image_build", EXAMPLES / "image" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def inputs(model: str, n: int) -> np.ndarray:
    if model == "digits":
        from riskpipe.models.digits import load_split

        X = load_split("test")[0]
        return X[np.arange(n) % len(X)]
    if model == "shapes":
        return _image_build().make_images(n, seed=2024)[0]
    with np.load(EXAMPLES / "tabular" / "reference.npz") as z:
        X = z["X"][np.arange(n) % len(z["X"])]
    return X + 0.01 * X.std(axis=0) * np.random.default_rng(0).standard_normal(X.shape).astype(np.float32)


CASES = [  # (label, config file or None for the defaults, model name)
    ("demo digits 1x8x8", None, "digits"),
    ("image example 3x32x32", EXAMPLES / "image" / "riskpipe.yaml", "shapes"),
    ("tabular example 30", EXAMPLES / "tabular" / "riskpipe.yaml", "cancer"),
]


def measure(label: str, config_path: Path | None, model: str, n: int, batch: int, tmp: Path) -> dict:
    config = load_config(str(config_path) if config_path else None, ledger=None,
                         batch={"max_events": batch, "max_wait_ms": 50})
    t0 = time.perf_counter()
    pipeline = build_pipeline(config)  # models, certifiers, context index, reference radii (cached)
    build_s = time.perf_counter() - t0
    entry = pipeline.entries[model]
    X = inputs(model, n)
    events = [make_event(f"{model}-{i}", model, x, upstream_risk=0.1) for i, x in enumerate(X)]
    batches: list[tuple[int, float, float]] = []
    fwd_before = best_forward(entry.certified, seconds=1.0)
    c0 = pipeline.certify_seconds
    t0 = time.perf_counter()
    res = run_offline(events, tmp / model, config, pipeline=pipeline,
                      on_batch=lambda k, s, c: batches.append((k, s, c)))
    wall = time.perf_counter() - t0
    certify_s = pipeline.certify_seconds - c0
    audit = res.read("audit")
    assert res.stats.decided == n == len(audit), (res.stats, n)
    evals = np.array([r["certificate"]["n_samples"] for r in audit], dtype=np.float64)
    lat = np.array([s for _, s, _ in batches]) * 1000
    fwd_after = best_forward(entry.certified, seconds=1.0)
    fwd, fwd_bs = (fwd_before[0] + fwd_after[0]) / 2, max(fwd_before, fwd_after)[1]
    evals_per_s = evals.sum() / certify_s
    decisions = {d: sum(r["decision"] == d for r in audit) for d in ("allow", "review", "block")}
    return {
        "label": label, "model": model, "spec": entry.model.spec, "policy": entry.policy.name,
        "input_shape": list(entry.model.input_shape), "events": n, "batch_max_events": batch,
        "build_pipeline_s": build_s, "wall_s": wall, "decisions_per_s": n / wall,
        "batches": len(lat), "batch_latency_ms_p50": float(np.percentile(lat, 50)),
        "batch_latency_ms_p99": float(np.percentile(lat, 99)),
        "evals_per_decision_mean": float(evals.mean()), "evals_per_decision_median": float(np.median(evals)),
        "evals_per_decision_p90": float(np.percentile(evals, 90)),
        "certify_seconds": certify_s, "certify_share_of_wall": certify_s / wall,
        "evals_per_s_in_certification": float(evals_per_s), "best_forward_samples_per_s": fwd,
        "best_forward_batch_size": fwd_bs, "best_forward_before_after": [fwd_before[0], fwd_after[0]],
        "certification_vs_forward": float(evals_per_s / fwd),
        "decisions": decisions,
        "certified": sum(bool(r["certificate"]["certified"]) for r in audit),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="events per model")
    ap.add_argument("--batch", type=int, default=32, help="micro-batch size (max_events)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(label, path, model, args.n, args.batch, Path(tmp)) for label, path, model in CASES]
    rows = [(r["label"], f"{r['decisions_per_s']:.1f}", f"{r['batch_latency_ms_p50']:.0f}",
             f"{r['batch_latency_ms_p99']:.0f}",
             f"{r['evals_per_decision_mean']:.0f} / {r['evals_per_decision_median']:.0f}",
             f"{r['evals_per_s_in_certification']:.0f}", f"{r['best_forward_samples_per_s']:.0f}",
             f"{r['certification_vs_forward']:.2f}", f"{r['certified']}/{r['events']}") for r in results]
    print(table(rows, ("model", "decisions/s", "batch p50 ms", "batch p99 ms", "evals/decision mean / median",
                       "evals/s certifying", "best forward/s", "ratio", "certified")))
    path = write_results("models", {"events_per_model": args.n, "batch_max_events": args.batch, "models": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
