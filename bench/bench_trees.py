"""Benchmark (issue 20): tree-ensemble certificates and attacks that do not flatter.

1. ``trees`` certificate cost per input for a 200-tree random forest (and the fraud
   example's HistGradientBoosting), batches of 64, best of 3, beside the model's own
   predict on the same batch.
2. Attack success on the same network as TorchScript (PGD, gradients) and as ONNX
   (no gradients: PGD on NES gradient estimates from the scores at 1000 and 4000
   queries, HopSkipJump from labels only, and the old 200-query random search), side by
   side on the image example's reference images the model gets right, l2 budgets 2x and
   4x the policy's epsilon 0.25, base model (no smoothing noise).
3. The tree attack against random search on the forest, at multiples of each input's
   certified radius (no success is possible inside it).

Writes bench/results/trees.json and prints tables.

    PYTHONPATH=. python bench/bench_trees.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_results

ROOT = Path(__file__).resolve().parents[1]


def forest_certificate() -> dict:
    import skops.io as sio
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from threadpoolctl import threadpool_limits

    from riskpipe.certify import family
    from riskpipe.models import load_model
    from riskpipe.models.scaled import scaled_model, standardize_scale

    out = {}
    with threadpool_limits(limits=1), tempfile.TemporaryDirectory() as tmp:
        X, y = make_classification(4000, 20, n_informative=8, weights=[0.9], random_state=0)
        X = X.astype(np.float32)
        rf = RandomForestClassifier(200, max_depth=10, random_state=0, n_jobs=1).fit(X[:3000], y[:3000])
        sio.dump(rf, f"{tmp}/rf.skops")
        cases = {"random forest, 200 trees, depth 10, 20 features": (load_model(f"{tmp}/rf.skops"), X[3000:3064])}
        fraud = load_model(str(ROOT / "examples/fraud/model.skops"))
        ref = np.load(ROOT / "examples/fraud/reference.npz")["X"]
        s = standardize_scale(ref)
        cases["fraud example: HistGradientBoosting, 100 trees, 10 features"] = (
            scaled_model(fraud, s, "standardize(reference)"), (ref[:64] / s).astype(np.float32))
        for name, (model, Xb) in cases.items():
            cert = family("trees")(model)
            cert.run("certify", Xb[:2], [0, 1])
            best, pred = np.inf, np.inf
            for _ in range(3):
                t0 = time.perf_counter()
                certs = cert.run("certify", Xb, list(range(len(Xb))))
                best = min(best, time.perf_counter() - t0)
                t0 = time.perf_counter()
                model.predict(Xb)
                pred = min(pred, time.perf_counter() - t0)
            r = np.array([c.radius for c in certs])
            out[name] = {"nodes": int(len(model.trees.feature)), "trees": model.trees.n_trees,
                         "ms_per_input": best * 1e3 / len(Xb), "predict_ms_per_input": pred * 1e3 / len(Xb),
                         "box_evaluations": certs[0].extra["box_evaluations"], "inputs": len(Xb),
                         "abstained": int(sum(c.abstained for c in certs)), "median_radius_linf": float(np.median(r))}
        out["forest_attack"] = forest_attack(cases["random forest, 200 trees, depth 10, 20 features"][0], X[3000:3040])
    return out


def forest_attack(model, X) -> dict:
    from riskpipe.blackbox import random_search
    from riskpipe.certify import family
    from riskpipe.tree_attack import tree_attack

    certs = family("trees")(model).run("certify", X, list(range(len(X))))
    ok = [i for i, c in enumerate(certs) if not c.abstained]
    r = np.array([certs[i].radius for i in ok])
    y = np.array([certs[i].predicted_class for i in ok])
    rows = []
    for k in (1.0, 2.0, 4.0, 8.0):
        t0 = time.perf_counter()
        a = tree_attack(model.trees, model.predict, X[ok], y, r * k * (1 - 1e-6), "linf", seed=0)
        t_tree = time.perf_counter() - t0
        b = random_search(model.predict, X[ok], y, r * k * (1 - 1e-6), "linf", queries=200, seed=0)
        rows.append({"radius_multiple": k, "inputs": len(ok), "tree_attack": int((model.predict(a) != y).sum()),
                     "random_search_200": int((model.predict(b) != y).sum()),
                     "tree_attack_ms_per_input": t_tree * 1e3 / len(ok)})
    return {"rows": rows}


def cnn_attacks() -> dict:
    import torch

    from riskpipe.attacks import attack_model, pgd
    from riskpipe.blackbox import hop_skip_jump, random_search
    from riskpipe.models import load_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ts = load_model(str(ROOT / "examples/image/model.pt") + "?shape=3,32,32&range=0,1")
        torch.onnx.export(ts.module, (torch.zeros(1, 3, 32, 32),), f"{tmp}/m.onnx", input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}}, dynamo=False)
        onnx = load_model(f"{tmp}/m.onnx?range=0,1")
        ref = np.load(ROOT / "examples/image/reference.npz")
        X, y = ref["X"][:48], ref["y"][:48]
        good = (ts.predict(X) == y) & (onnx.predict(X) == y)
        X, y = X[good], y[good]
        rows = []
        for k in (2.0, 4.0):  # the policy's epsilon 0.25 times k
            eps = 0.25 * k
            runs = {
                "pgd_torchscript_20_steps": lambda: pgd(ts.module, X, y, eps, "l2", steps=20, seed=0,
                                                        value_range=(0.0, 1.0), loss="margin"),
                "nes_pgd_onnx_1000_queries": lambda: attack_model(onnx, X, y, eps, "l2", steps=20, seed=0,
                                                                  queries=1000),
                "nes_pgd_onnx_4000_queries": lambda: attack_model(onnx, X, y, eps, "l2", steps=20, seed=0,
                                                                  queries=4000),
                "hopskipjump_onnx_1000_queries": lambda: hop_skip_jump(onnx.predict, X, y, eps, "l2", queries=1000,
                                                                       value_range=(0.0, 1.0), seed=0),
                "random_search_onnx_200_queries": lambda: random_search(onnx.predict, X, y, eps, "l2", queries=200,
                                                                        value_range=(0.0, 1.0), seed=0),
            }
            row = {"epsilon_l2": eps, "inputs": int(len(X))}
            for name, run in runs.items():
                t0 = time.perf_counter()
                adv = run()
                row[name] = int((onnx.predict(adv) != y).sum())
                row[name + "_s"] = time.perf_counter() - t0
            rows.append(row)
    return {"rows": rows}


def main() -> int:
    results = {"certificate": forest_certificate(), "cnn_attacks": cnn_attacks()}
    cert = results["certificate"]
    print(table([(k, v["trees"], v["nodes"], f"{v['ms_per_input']:.2f}", f"{v['predict_ms_per_input']:.3f}",
                  v["box_evaluations"], v["abstained"], f"{v['median_radius_linf']:.3g}")
                 for k, v in cert.items() if k != "forest_attack"],
                ("model", "trees", "nodes", "cert ms/input", "predict ms/input", "box passes", "abstained",
                 "median radius")))
    print(table([(r["radius_multiple"], r["inputs"], r["tree_attack"], r["random_search_200"],
                  f"{r['tree_attack_ms_per_input']:.0f}") for r in cert["forest_attack"]["rows"]],
                ("x certified radius", "inputs", "tree attack", "random search 200", "tree attack ms/input")))
    names = [k for k in results["cnn_attacks"]["rows"][0] if k not in ("epsilon_l2", "inputs")
             and not k.endswith("_s")]
    print(table([(r["epsilon_l2"], r["inputs"], *(r[k] for k in names)) for r in results["cnn_attacks"]["rows"]],
                ("l2 epsilon", "inputs", *names)))
    print(write_results("trees", results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
