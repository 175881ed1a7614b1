"""The stage freezes its start-up heap (models, torch, reference sets) out of the
cyclic collector before its loop, and that changes no output. Run on a user's
3x32x32 TorchScript CNN, not the digits demo."""

import gc
import json

import numpy as np
import pytest

import riskpipe.stream.stage as stage_mod
from riskpipe.app.config import load_config
from riskpipe.app.offline import run_offline
from riskpipe.stream.events import make_event
from usermodels import cheap_image_pipeline


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return cheap_image_pipeline(tmp_path_factory.mktemp("cnn"))


def _outputs(out_dir):
    """Decisions and review records, less what depends on the clock or the machine's speed."""
    out = []
    for topic in ("decisions", "review"):
        for line in (out_dir / f"{topic}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rec.pop("ts", None)
            cert = rec.get("certificate", {})
            cert.pop("elapsed_ms", None)
            cert.get("extra", {}).pop("batch_size", None)  # the forward batch the tuner picked: speed, not result
            rec.get("review", {}).pop("deadline", None)
            out.append(json.dumps(rec, sort_keys=True))
    return out


def test_run_freezes_the_startup_heap_and_outputs_are_unchanged(tmp_path, cnn, monkeypatch):
    rng = np.random.default_rng(0)
    evs = [make_event(f"g-{i}", "cnn", rng.random((3, 32, 32), dtype=np.float32), upstream_risk=0.1)
           for i in range(6)]
    src = tmp_path / "events.jsonl"  # one source file: records name it
    src.write_text("".join(json.dumps(e) + "\n" for e in evs))
    cfg = load_config(None, batch={"max_events": 4, "max_wait_ms": 10})

    gc.unfreeze()
    with monkeypatch.context() as m:
        m.setattr(stage_mod, "_freeze_startup_heap", lambda: None)
        run_offline(str(src), tmp_path / "plain", cfg, pipeline=cnn)
    assert gc.get_freeze_count() == 0
    tracked = len(gc.get_objects())
    run_offline(str(src), tmp_path / "frozen", cfg, pipeline=cnn)
    # the model, torch and numpy existed before the loop: most of what was tracked is frozen now
    assert gc.get_freeze_count() > tracked // 2
    plain, frozen = _outputs(tmp_path / "plain"), _outputs(tmp_path / "frozen")
    assert len(plain) > len(evs) and plain == frozen  # every decision, and review records
