"""Shared bits of the benchmarks: JSON results under bench/results/, machine facts."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

from riskpipe.timestamps import rfc3339_seconds

RESULTS = Path(__file__).resolve().parent / "results"
# one public noise key for every stage a benchmark runs, in-process or as a subprocess
# (inherited), so certificates repeat across rounds, runs and code versions and their
# digests can be compared (a deployed stage keeps its key secret: riskpipe.app.noise_key)
os.environ.setdefault("RISKPIPE_NOISE_KEY", "riskpipe-benchmarks-public-noise-key-0")


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
            "load_avg_1m": os.getloadavg()[0]}


def write_results(name: str, results: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "when": rfc3339_seconds(), "machine": machine(),
               **results}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def table(rows: list[tuple], headers: tuple) -> str:
    cols = list(zip(headers, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(str(c) for c in r)) for r in rows]
    return "\n".join(lines)


def peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def forward_rates(model, batch: int, seconds: float) -> tuple[float, float]:
    """Samples/s of model.predict_torch on noise-free batches of ``batch``: by the wall clock
    and by this process's CPU time (less moved by other processes on a shared machine)."""
    import torch

    x = torch.rand((batch,) + model.input_shape)
    for _ in range(3):
        model.predict_torch(x)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        model.predict_torch(x)
        n += batch
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def best_forward(model, batch_sizes=(256, 1024, 4096, 16384), seconds: float = 1.5) -> tuple[float, int]:
    """Best raw samples/s of model.predict_torch over batch sizes (noise-free inputs), and that batch size."""
    return max((forward_rates(model, bs, seconds)[0], bs) for bs in batch_sizes)

CERTIFICATE_KEYS = ("radius", "certified", "predicted_class", "n_samples", "p_lower", "reason")


def certificates_digest(audit: list[dict]) -> str:
    """sha256 over every audit record's id, decision and certificate (what a seed decides;
    not its timing), in id order: equal digests, same certificates."""
    rows = sorted(([r["id"], r["decision"], {k: r["certificate"].get(k) for k in CERTIFICATE_KEYS}] for r in audit),
                  key=lambda row: row[0])
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
