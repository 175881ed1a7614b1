"""A plain TorchScript file records no input shape. README: init takes it from the reference set;
so does every other command that has inputs (certify, compare, replay) and the stage when the
model has a reference set. Without inputs the error says how to give it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from riskpipe.models import ShapeUnknown, load_model, load_model_for

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "image"


def test_load_model_for_takes_the_shape_from_the_inputs():
    with pytest.raises(ShapeUnknown, match=r"input shape unknown; add \?shape=C,H,W"):
        load_model(str(IMAGE / "model.pt"))
    m = load_model_for(str(IMAGE / "model.pt"), (3, 32, 32))
    assert m.input_shape == (3, 32, 32) and m.spec.endswith("model.pt?shape=3,32,32") and m.num_classes == 4
    # a spec that already names a shape, or a format that records one, is loaded as it is
    assert load_model_for(f"{IMAGE / 'model.pt'}?shape=3,32,32", (99,)).input_shape == (3, 32, 32)
    assert load_model_for("demo:digits", (3, 3)).input_shape == (1, 8, 8)
    with pytest.raises(ShapeUnknown):
        load_model_for(str(IMAGE / "model.pt"), ())


def test_certify_cli_needs_no_shape_option_for_torchscript(tmp_path):
    with np.load(IMAGE / "reference.npz") as z:
        np.save(tmp_path / "x.npy", z["X"][:2])
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "certify", "--model", str(IMAGE / "model.pt"),
                        "--input", str(tmp_path / "x.npy"), "--mode", "decide", "--max-samples", "200",
                        "--sigma", "0.25", "--epsilon", "0.1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and all(row["input_dim"] == 3072 for row in rows)


def test_the_stage_takes_the_shape_from_the_reference_set(tmp_path):
    import yaml

    from riskpipe.app.compose import build_entry
    from riskpipe.app.config import ConfigError, load_config
    from riskpipe.policy import load_policy

    policy = load_policy(str(IMAGE / "policy.yaml"))  # the sound sampler on [0, 1]: range declared below
    entry_cfg = {"spec": str(IMAGE / "model.pt"), "range": [0, 1], "reference": str(IMAGE / "reference.npz")}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"models": {"shapes": entry_cfg}}))
    config = load_config(str(tmp_path / "a.yaml"))
    entry = build_entry("shapes", config.models["shapes"], policy, config_batch_size=64)
    assert entry.model.input_shape == (3, 32, 32) and entry.model.spec.endswith("?shape=3,32,32")
    del entry_cfg["reference"]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"models": {"shapes": entry_cfg}}))
    with pytest.raises(ConfigError, match=r"models.shapes.spec: .*input shape unknown; add \?shape="):
        build_entry("shapes", load_config(str(tmp_path / "b.yaml")).models["shapes"], policy, config_batch_size=64)
