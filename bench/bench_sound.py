"""Cost of the sound smoothing sampler next to the default (gaussian) one, in one run.

For the demo digits model (inputs on its 1/16 grid) and a CIFAR-sized CNN (3x32x32,
~603k parameters, random weights, inputs on the 8-bit grid), interleaving the two
samplers ``--reps`` times and keeping the best of each:
* noise cost per evaluation: drawing the noise and forming the model's inputs, no model;
* cost per evaluation in certify mode (n0 + n samples per input, model included);
* decisions/s of decide mode (epsilon 0.25, budget ``--budget``) on a set of inputs.

Then, through the stage (``run_offline`` under each example's own policy, no ledger),
the code at ``--before`` (default c0b0297, exported with ``git archive`` into a temp
directory) and this tree side by side, each in its own process, alternating ``--reps``
times (best of each kept): for the demo (sampler sound on its 1/16 grid) and the image
example (its policy: sound, 8-bit grid), with the sound and the gaussian sampler,
* the share of stage wall time spent drawing noise and forming the model's inputs
  (the sampler's draw + perturb, timed around each call, on whichever thread; target for
  sound: at most 15%),
* the share of it on the stage thread (``noise_stage_thread_share``): its own draws, plus
  its waits for the helper thread where the noise of the next model call is drawn ahead
  (Smoothing._overlaps); the rest overlaps the model's forward pass and costs no stage
  time. On code without the helper thread the two shares are equal,
* evaluations/s (sum of the certificates' n_samples over the stage's wall time).
Prints tables and writes bench/results/sound.json with the ratios sound / gaussian and
after / before.

    python bench/bench_sound.py [--reps 3] [--events 48] [--before c0b0297]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import table, write_results  # noqa: E402
from riskpipe.certify import family  # noqa: E402
from riskpipe.models import load_model  # noqa: E402
from riskpipe.models.base import Model, sha256_state_dict  # noqa: E402
from riskpipe.models.digits import load_split  # noqa: E402
from synthetic import cifar_cnn  # noqa: E402

SIGMA, ALPHA, EPS = 0.25, 0.001, 0.25
TARGET_NOISE_SHARE = 0.15  # issue 21 item 1: the sound sampler's draw + perturb, share of stage wall time


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
            "certified": int(sum(c.certified for c in dec)),
            "mean_radius_certify": float(np.mean([c.radius for c in certs]))}


STAGE_CASES = [  # (label, config file or None for the defaults, model name, grid levels for sound)
    ("demo digits 1x8x8", None, "digits", 16),
    ("image example 3x32x32", HERE.parent / "examples" / "image" / "riskpipe.yaml", "shapes", 255),
]


def timed(fn, clock: list):
    """``fn`` adding its time to ``clock[0]``, and to ``clock[1]`` when on the main (stage) thread."""
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            dt = time.perf_counter() - t0
            clock[0] += dt
            if threading.current_thread() is threading.main_thread():
                clock[1] += dt
    return wrapper


_WAITS: dict[str, list] = {}  # "clock": the clock the stage thread's waits go to now


def timed_ahead(clock: list) -> None:
    """Where the tree draws noise ahead on a helper thread (smoothing._ahead), the time the
    stage thread waits for each next call's noise, added to ``clock[2]`` from now on."""
    from riskpipe.certify import smoothing

    _WAITS["clock"] = clock
    ahead = getattr(smoothing, "_ahead", None)
    if ahead is None or getattr(ahead, "timed", False):
        return

    def waited(items, pool):
        it = ahead(items, pool)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    _WAITS["clock"][2] += time.perf_counter() - t0
                yield item
        finally:
            it.close()

    waited.timed = True  # type: ignore[attr-defined]
    smoothing._ahead = waited


def stage_measure(events: int) -> dict:
    """In this process (whatever riskpipe PYTHONPATH gives): per case and sampler, the
    stage's wall time, the time inside the sampler's draw + perturb, and evaluations."""
    from bench_models import inputs
    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import load_config
    from riskpipe.app.offline import run_offline
    from riskpipe.certify.samplers import make_sampler
    from riskpipe.stream.events import make_event

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, model, levels in STAGE_CASES:
            config = load_config(str(path) if path else None, ledger=None,
                                 batch={"max_events": 32, "max_wait_ms": 50})
            pipeline = build_pipeline(config)
            cert = pipeline.entries[model].certifier
            X = inputs(model, events)
            evs = [make_event(f"{model}-{i}", model, x, upstream_risk=0.1) for i, x in enumerate(X)]
            for sampler in ("gaussian", "sound"):
                cert.sampler, cert.noise = sampler, make_sampler(sampler, cert.sigma, cert.model, grid_levels=levels)
                clock = [0.0, 0.0, 0.0]  # draw + perturb: anywhere, on the stage thread; the stage's wait
                cert.noise.draw = timed(cert.noise.draw, clock)
                cert.noise.perturb = timed(cert.noise.perturb, clock)
                timed_ahead(clock)
                run_offline(evs[:4], Path(tmp) / f"warm-{model}-{sampler}", config, pipeline=pipeline)
                clock[:] = [0.0, 0.0, 0.0]
                t0 = time.perf_counter()
                res = run_offline(evs, Path(tmp) / f"{model}-{sampler}", config, pipeline=pipeline)
                wall = time.perf_counter() - t0
                audit = res.read("audit")
                assert len(audit) == events and all(r["certificate"]["sampler"] == sampler for r in audit), label
                evals = sum(r["certificate"]["n_samples"] for r in audit)
                out.setdefault(label, {})[sampler] = {
                    "wall_s": wall, "noise_s": clock[0], "noise_share_of_stage": clock[0] / wall,
                    # what the noise costs the stage thread: its own draws, and its waits for the
                    # helper thread's where noise is drawn ahead (the rest overlaps the model)
                    "noise_stage_thread_s": clock[1] + clock[2],
                    "noise_stage_thread_share": (clock[1] + clock[2]) / wall,
                    "evals": evals, "evals_per_s": evals / wall, "decisions_per_s": events / wall}
    return out


def export(ref: str, into: Path) -> Path:
    """The package ``riskpipe`` as it was at ``ref``, in ``into`` (for PYTHONPATH)."""
    root = HERE.parent
    tar = subprocess.run(["git", "-C", str(root), "archive", ref, "riskpipe"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    return into


def stage_side_by_side(before: str, reps: int, events: int) -> dict:
    """Before (``before``) and after (this tree) alternating in fresh processes, best of each."""
    best: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": export(before, Path(tmp)), "after": HERE.parent}
        for _ in range(reps):
            for code, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": str(tree)}
                run = subprocess.run([sys.executable, __file__, "--stage-child", str(events)], env=env,
                                     capture_output=True, text=True, check=True)
                for label, by in json.loads(run.stdout.splitlines()[-1]).items():
                    for sampler, r in by.items():
                        b = best.setdefault(code, {}).setdefault(label, {}).setdefault(sampler, r)
                        for k in ("noise_share_of_stage", "noise_s", "wall_s", "noise_stage_thread_s",
                                  "noise_stage_thread_share"):
                            if k in r:
                                b[k] = min(b.get(k, r[k]), r[k])
                        for k in ("evals_per_s", "decisions_per_s"):
                            b[k] = max(b[k], r[k])
    out = {"before_ref": before, "events": events, "reps": reps, "target_sound_noise_share": TARGET_NOISE_SHARE,
           "code": best, "ratios": {}}
    for label in best["after"]:
        a, b = best["after"][label], best["before"][label]
        out["ratios"][label] = {
            "sound_over_gaussian_evals_per_s": {c: best[c][label]["sound"]["evals_per_s"]
                                                / best[c][label]["gaussian"]["evals_per_s"] for c in best},
            "sound_evals_per_s_after_over_before": a["sound"]["evals_per_s"] / b["sound"]["evals_per_s"],
            "sound_noise_share": {c: best[c][label]["sound"]["noise_share_of_stage"] for c in best},
            "gaussian_noise_share": {c: best[c][label]["gaussian"]["noise_share_of_stage"] for c in best},
            "sound_noise_stage_thread_share": {c: best[c][label]["sound"].get("noise_stage_thread_share")
                                               for c in best},
            "sound_noise_share_target_met": a["sound"]["noise_share_of_stage"] <= TARGET_NOISE_SHARE,
            "sound_noise_stage_thread_share_target_met":
                a["sound"]["noise_stage_thread_share"] <= TARGET_NOISE_SHARE}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=32)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=48, help="events per model through the stage")
    ap.add_argument("--before", default="c0b0297", help="git ref of the code to compare against")
    ap.add_argument("--stage-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage_child:
        print(json.dumps(stage_measure(args.stage_child)))
        return
    stage = stage_side_by_side(args.before, args.reps, args.events)
    srows = [(label, code, sampler, f"{r['noise_share_of_stage']:.1%}",
              f"{r['noise_stage_thread_share']:.1%}" if "noise_stage_thread_share" in r else "",
              f"{r['evals_per_s']:.0f}", f"{r['decisions_per_s']:.1f}")
             for code in ("before", "after") for label, by in stage["code"][code].items() for sampler, r in by.items()]
    print(table(srows, ("model", "code", "sampler", "noise share of stage", "on the stage thread", "evals/s",
                        "decisions/s")))
    for label, r in stage["ratios"].items():
        print(f"{label}: sound/gaussian evals/s before {r['sound_over_gaussian_evals_per_s']['before']:.2f}x, "
              f"after {r['sound_over_gaussian_evals_per_s']['after']:.2f}x; sound after/before "
              f"{r['sound_evals_per_s_after_over_before']:.2f}x; sound noise share before "
              f"{r['sound_noise_share']['before']:.1%}, after {r['sound_noise_share']['after']:.1%} (target "
              f"{TARGET_NOISE_SHARE:.0%}: {'met' if r['sound_noise_share_target_met'] else 'MISSED'}); on the stage "
              f"thread after {r['sound_noise_stage_thread_share']['after']:.1%} "
              f"({'met' if r['sound_noise_stage_thread_share_target_met'] else 'MISSED'})")
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
                                   "inputs": args.inputs, "n": args.n, "budget": args.budget, "models": out,
                                   "stage": stage})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
