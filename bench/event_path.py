"""Which riskpipe files one event passes through, measured: the figure docs/architecture.md
states. Prints each file with the functions of it that ran and writes
bench/results/event_path.json.

The stage is built by the composition root from the default config (``demo:digits``
under ``policies/default.yaml``: smoothing in decide mode, context and support signals,
a SQLite ledger, the stage's metrics), over the JSON-lines source and sink: they live in
``riskpipe/stream/io.py`` beside ``KafkaSource`` and ``KafkaSink`` and are called at the
same points (poll, send, flush, commit), so the file count is the Kafka stage's. One
event is decided first untraced (first-use work), then the second is traced from the
poll to the offset commit, on the stage's thread and on the committer's writer thread.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

import riskpipe
from riskpipe.app.compose import build_stage, open_ledger
from riskpipe.app.config import load_config
from riskpipe.metrics import StageMetrics
from riskpipe.models.digits import load_split
from riskpipe.stream.events import make_event

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "event_path.json"
PACKAGE = str(Path(riskpipe.__file__).resolve().parent)


def measure() -> dict[str, list[str]]:
    tmp = Path(tempfile.mkdtemp(prefix="riskpipe-event-path-"))
    X, _ = load_split("test")
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps(make_event(f"e{i}", "digits", X[i], upstream_risk=0.1)) + "\n"
                           for i in range(2)), encoding="utf-8")
    config = load_config(None, ledger=str(tmp / "ledger.sqlite"), batch={"max_events": 1, "max_wait_ms": 0})
    ledger = open_ledger(config)
    stage = build_stage(config, source=f"jsonl:{src}", sink=f"jsonl:{tmp / 'out'}", ledger=ledger,
                        metrics=StageMetrics())
    seen: dict[str, set[str]] = defaultdict(set)
    recording = threading.Event()

    def profile(frame, event, arg):
        if event == "call" and recording.is_set() and frame.f_code.co_filename.startswith(PACKAGE):
            rel = Path(frame.f_code.co_filename).resolve().relative_to(Path(PACKAGE).parent)
            seen[rel.as_posix()].add(frame.f_code.co_name)

    threading.setprofile(profile)  # the committer's writer thread starts with the first batch
    sys.setprofile(profile)
    try:
        stage._recover()  # opens the source and sink, records the policy
        stage.observer.started(stage.pipeline)
        for traced in (False, True):
            if traced:
                recording.set()
            stage.batcher.poll(stage.source)
            stage.process_batch(stage.batcher.take())  # handle, guard, ledger, send, flush, commit, observe
            recording.clear()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
        stage._close()
        stage.committer.close()
        ledger.close()
    decided = (tmp / "out" / f"{config.topics.decisions}.jsonl").read_text(encoding="utf-8").count("\n")
    if decided != 2:
        raise SystemExit(f"expected 2 decisions, found {decided}: the traced path is not the decision path")
    return {f: sorted(names) for f, names in sorted(seen.items())}


def main() -> int:
    files = measure()
    per_package: dict[str, int] = defaultdict(int)
    for f in files:
        parts = f.split("/")
        per_package[parts[1] if len(parts) > 2 else parts[1].removesuffix(".py")] += 1
    result = {"files": len(files), "per_package": dict(sorted(per_package.items())), "functions": files}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for f, names in files.items():
        print(f"{f}: {', '.join(n for n in names if not n.startswith('<'))}")
    print(f"one event passes through {len(files)} files: "
          + ", ".join(f"{k} {v}" for k, v in sorted(per_package.items(), key=lambda kv: -kv[1])))
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
