"""A ``module:factory@weights`` model's sha256 covers its code, not only its weights
(riskpipe.models.code_digest): two models whose code differs never share one, so the
decisions of one are never taken for the other's (decision identity, receipts, reports,
replay). Shown on a user's own package and a single-file module, not the demo."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from riskpipe.models import ModelError, load_model

PACKAGE = {
    "__init__.py": "",
    "layers.py": """
        import torch
        from torch import nn

        class Scale(nn.Module):
            def forward(self, x):
                return x * 1.0
        """,
    "nets.py": """
        from torch import nn
        from userpkg.layers import Scale

        def build():
            return nn.Sequential(nn.Flatten(), Scale(), nn.Linear(4, 3))
        """,
}


def write_package(root: Path, files: dict[str, str]) -> None:
    (root / "userpkg").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / "userpkg" / name).write_text(textwrap.dedent(text))


def load_fresh(root: Path, spec: str) -> dict:
    """Load ``spec`` in a new process with ``root`` on the path (the code as a stage would import it)."""
    probe = ("import json, sys; from riskpipe.models import load_model; m = load_model(sys.argv[1]); "
             "print(json.dumps({'sha256': m.sha256, **{k: m.meta[k] for k in "
             "('weights_sha256', 'code_sha256', 'code_packages')}}))")
    out = subprocess.run([sys.executable, "-c", probe, spec], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": f"{root}:{Path(__file__).resolve().parents[1]}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.fixture
def weights(tmp_path) -> Path:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Identity(), torch.nn.Linear(4, 3))
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    return path


def test_a_change_to_the_users_code_changes_the_models_sha256(tmp_path, weights):
    spec = f"userpkg.nets:build@{weights}?shape=4"
    write_package(tmp_path / "a", PACKAGE)
    write_package(tmp_path / "b", {**PACKAGE, "layers.py": PACKAGE["layers.py"].replace("x * 1.0", "x * 2.0")})
    write_package(tmp_path / "c", {**PACKAGE, "notes.py": "# a module the model never imports\n"})
    a, again, b, c = (load_fresh(tmp_path / d, spec) for d in ("a", "a", "b", "c"))
    assert a == again  # the same files: the same sha256 in every process
    assert a["code_packages"] == ["userpkg"]
    assert a["weights_sha256"] == b["weights_sha256"] and a["sha256"] != b["sha256"]  # a layer's forward changed
    assert a["sha256"] != c["sha256"]  # a file of the package changed: its code is no longer the same


def test_a_single_file_factory_and_a_factory_without_source(tmp_path, weights, monkeypatch):
    (tmp_path / "onefile.py").write_text("from torch import nn\n\ndef build():\n"
                                         "    return nn.Sequential(nn.Flatten(), nn.Identity(), nn.Linear(4, 3))\n")
    first = load_fresh(tmp_path, f"onefile:build@{weights}?shape=4")
    assert first["code_packages"] == ["onefile"]
    source = (tmp_path / "onefile.py").read_text()
    (tmp_path / "onefile.py").write_text(source.replace("nn.Flatten(), ", "nn.Flatten(),"))
    assert load_fresh(tmp_path, f"onefile:build@{weights}?shape=4")["sha256"] != first["sha256"]
    # a factory whose module has no file to read (built at run time) is refused, not hashed as "no code"
    import types

    mod = types.ModuleType("nosource")
    exec("from torch import nn\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Identity(), nn.Linear(4, 3))\n",
         mod.__dict__)
    monkeypatch.setitem(sys.modules, "nosource", mod)
    with pytest.raises(ModelError, match=r"nosource: has no source file, so its code cannot be identified"):
        load_model(f"nosource:build@{weights}?shape=4")


def test_the_factory_models_predictions_are_its_codes(tmp_path, weights):
    """The sha256 changes with exactly what changes the model's outputs."""
    write_package(tmp_path / "b", {**PACKAGE, "layers.py": PACKAGE["layers.py"].replace("x * 1.0", "x * 2.0")})
    sys.path.insert(0, str(tmp_path / "b"))
    try:
        m = load_model(f"userpkg.nets:build@{weights}?shape=4")
        x = np.ones((1, 4), np.float32)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Identity(), torch.nn.Linear(4, 3))
        net.load_state_dict(torch.load(weights, weights_only=True))
        with torch.no_grad():
            assert torch.allclose(m.module(torch.from_numpy(x)), net(torch.from_numpy(2 * x)))
    finally:
        sys.path.remove(str(tmp_path / "b"))
        for name in [n for n in sys.modules if n == "userpkg" or n.startswith("userpkg.")]:
            del sys.modules[name]
