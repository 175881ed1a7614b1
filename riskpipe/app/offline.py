"""Offline mode: the same stage over JSON-lines files, for batch use and users without Kafka.

``run_offline(source_path, sink_dir, config)`` reads one event per line and writes
``sink_dir/{decisions,review,audit,dlq}.jsonl`` (file names follow the configured topic
names) through exactly the code path the Kafka stage uses.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from riskpipe.app.compose import build_stage
from riskpipe.app.config import Topics
from riskpipe.json_text import jsonl_lines
from riskpipe.stream.io import fresh_outputs
from riskpipe.stream.stage import Stats


@dataclass
class OfflineResult:
    stats: Stats
    sink_dir: Path
    topics: Topics = field(default_factory=Topics)

    def read(self, kind: str) -> list[dict]:
        """Records written to ``kind`` (decisions, review, audit or dlq), from the file
        named after that output's configured topic."""
        p = self.sink_dir / f"{self.topics.of(kind)}.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in jsonl_lines(p.read_text(encoding="utf-8")) if line.strip()]


def run_offline(source: str | Iterable[dict], sink_dir: str | Path, config, *, pipeline=None, ledger=None,
                metrics=None, checkpoint: str | None = None, on_batch=None) -> OfflineResult:
    """Decide every event of ``source`` (a JSON-lines path, or an iterable of event
    dicts) and write the outputs under ``sink_dir``."""

    sink_dir = Path(sink_dir)
    tmp = None
    if not isinstance(source, str | Path):
        tmp = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8")
        for ev in source:
            tmp.write(json.dumps(ev) + "\n")
        tmp.close()
        source = tmp.name
    if checkpoint is None:  # resuming keeps earlier outputs; a fresh run replaces them
        fresh_outputs(sink_dir, config.topics.outputs)
    try:
        stage = build_stage(config, source=f"jsonl:{source}", sink=f"jsonl:{sink_dir}", checkpoint=checkpoint,
                            pipeline=pipeline, ledger=ledger, metrics=metrics, on_batch=on_batch)
        stats = stage.run()
    finally:
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)
    return OfflineResult(stats, sink_dir, config.topics)
