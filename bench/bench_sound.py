"""Cost of the sound smoothing sampler next to the default (gaussian) one, in one run.

For the demo digits model (inputs on its 1/16 grid) and a CIFAR-sized CNN (3x32x32,
~603k parameters, random weights, inputs on the 8-bit grid), interleaving the two
samplers ``--reps`` times and keeping the best of each:
* noise cost per evaluation: drawing the noise and forming the model's inputs, no model;
* cost per evaluation in certify mode (n0 + n samples per input, model included);
* decisions/s of decide mode (epsilon 0.25, budget ``--budget``) on a set of inputs.
Prints a table and writes bench/results/sound.json with the ratios sound / gaussian.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import table, write_results  # noqa: E402
from synthetic import cifar_cnn  # noqa: E402

from riskpipe.certify import family  # noqa: E402
from riskpipe.models import load_model  # noqa: E402
from riskpipe.models.base import Model, sha256_state_dict  # noqa: E402
from riskpipe.models.digits import load_split  # noqa: E402

SIGMA, ALPHA, EPS = 0.25, 0.001, 0.25


def cases(n_inputs: int):
    digits = load_model("demo:digits")
    X, _ = load_split("test")
    yield "demo digits 1x8x8", digits, X[:n_inputs], 16, 2048
    module = cifar_cnn()
    cnn = Model(spec="cifar_cnn", input_shape=(3, 32, 32), num_classes=10, sha256=sha256_state_dict(module),
                module=module, value_range=(0.0, 1.0))
    Xc = np.random.default_rng(0).integers(0, 256, (n_inputs, 3, 32, 32)).astype(np.float32) / 255
    yield "CIFAR-sized CNN 3x32x32", cnn, Xc, 255, 512


def noise_ms_per_eval(s, x: np.ndarray, samples: int) -> float:
    """Wall time per sample of drawing noise and forming the model input (no model call)."""
    base = s.noise.prepare(torch.from_numpy(x[None])).expand((samples,) + tuple(x.shape))
    buf = s.noise.new_buffer(samples, tuple(x.shape), "cpu")
    gen = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(3):  # the first call builds the sampler's lookup tables
        t0 = time.perf_counter()
        s.noise.draw(buf, gen)
        s.noise.perturb(base, buf)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3 / samples


def run(s, X):
    noise = noise_ms_per_eval(s, X[0], s.batch_size)
    t0 = time.perf_counter()
    certs = s.run("certify", X[:4], list(range(4)))
    certify_s = time.perf_counter() - t0
    evals = sum(c.n_samples for c in certs)
    t0 = time.perf_counter()
    dec = s.run("decide", X, list(range(len(X))), EPS)
    decide_s = time.perf_counter() - t0
    return {"noise_us_per_eval": noise * 1e3, "certify_us_per_eval": certify_s * 1e6 / evals,
            "decisions_per_s": len(X) / decide_s, "decide_evals_per_s": sum(c.n_samples for c in dec) / decide_s,
            "certified": int(sum(c.certified for c in dec)), "mean_radius_certify": float(np.mean([c.radius for c in certs]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=32)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=10_000)
    args = ap.parse_args()
    out, rows = {}, []
    for name, model, X, levels, batch in cases(args.inputs):
        best: dict[str, dict] = {}
        certifiers = {sampler: family("smoothing")(model, sigma=SIGMA, alpha=ALPHA, n0=64, n=args.n,
                                                   max_samples=args.budget, batch_size=batch, sampler=sampler,
                                                   grid_levels=levels) for sampler in ("gaussian", "sound")}
        for _ in range(args.reps):  # interleaved: both samplers see the same machine load
            for sampler in ("gaussian", "sound"):
                r = run(certifiers[sampler], X)
                b = best.setdefault(sampler, r)
                for k in ("noise_us_per_eval", "certify_us_per_eval"):
                    b[k] = min(b[k], r[k])
                for k in ("decisions_per_s", "decide_evals_per_s"):
                    b[k] = max(b[k], r[k])
        g, s = best["gaussian"], best["sound"]
        ratios = {"noise_cost": s["noise_us_per_eval"] / g["noise_us_per_eval"],
                  "certify_cost_per_eval": s["certify_us_per_eval"] / g["certify_us_per_eval"],
                  "decide_evals_per_s": s["decide_evals_per_s"] / g["decide_evals_per_s"],
                  "decisions_per_s": s["decisions_per_s"] / g["decisions_per_s"]}
        out[name] = {"grid_levels": levels, "batch_size": batch, "gaussian": g, "sound": s,
                     "ratio_sound_over_gaussian": ratios}
        for sampler in ("gaussian", "sound"):
            r = best[sampler]
            rows.append((name, sampler, f"{r['noise_us_per_eval']:.2f}", f"{r['certify_us_per_eval']:.1f}",
                         f"{r['decide_evals_per_s']:.0f}", f"{r['decisions_per_s']:.1f}", r["certified"],
                         f"{r['mean_radius_certify']:.3f}"))
        rows.append((name, "sound/gaussian", f"{ratios['noise_cost']:.2f}x", f"{ratios['certify_cost_per_eval']:.2f}x",
                     f"{ratios['decide_evals_per_s']:.2f}x", f"{ratios['decisions_per_s']:.2f}x", "", ""))
    print(table(rows, ("model", "sampler", "noise us/eval", "certify us/eval", "decide evals/s", "decisions/s",
                       "certified", "mean radius")))
    path = write_results("sound", {"sigma": SIGMA, "alpha": ALPHA, "epsilon": EPS, "reps": args.reps,
                                   "inputs": args.inputs, "n": args.n, "budget": args.budget, "models": out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
