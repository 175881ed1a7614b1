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


ROOT = Path(__file__).resolve().parents[1]


def load_fresh(root: Path, spec: str, extra_path: Path | None = None) -> dict:
    """Load ``spec`` in a new process with ``root`` on the path (the code as a stage would import it)."""
    probe = ("import json, sys; from riskpipe.models import load_model; m = load_model(sys.argv[1]); "
             "print(json.dumps({'sha256': m.sha256, **{k: m.meta[k] for k in "
             "('weights_sha256', 'code_sha256', 'code_packages')}}))")
    path = ":".join(str(p) for p in (root, extra_path, ROOT) if p)
    out = subprocess.run([sys.executable, "-c", probe, spec], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"})
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


def test_a_partial_factory_a_namespace_package_and_a_zip_import(tmp_path, weights):
    """functools.partial hides the user's module from the factory's __module__: the spec's
    module is hashed anyway. A namespace package is hashed from its regular package, so
    another portion elsewhere on the path (another distribution, a working directory) does not
    change the sha. A package imported from a zip has no file to read: refused."""
    body = textwrap.dedent(PACKAGE["nets.py"]).replace("def build():", "def build(scale=1.0):")
    write_package(tmp_path / "p", {**PACKAGE, "nets.py": body + "\n\nimport functools\n\nbuild_partial = "
                                   "functools.partial(build, 2.0)\n"})
    first = load_fresh(tmp_path / "p", f"userpkg.nets:build_partial@{weights}?shape=4")
    assert first["code_packages"] == ["userpkg"]
    write_package(tmp_path / "q", {**PACKAGE, "nets.py": body.replace("nn.Linear(4, 3)", "nn.Linear(4, 3, bias=True)")
                                   + "\n\nimport functools\n\nbuild_partial = functools.partial(build, 2.0)\n"})
    assert load_fresh(tmp_path / "q", f"userpkg.nets:build_partial@{weights}?shape=4")["sha256"] != first["sha256"]
    # a namespace package "acme" (no __init__.py) with the model in acme.models, plus another portion
    for d in ("ns1", "ns2"):
        (tmp_path / d / "acme").mkdir(parents=True)
    (tmp_path / "ns1" / "acme" / "models").mkdir()
    for name, text in PACKAGE.items():
        (tmp_path / "ns1" / "acme" / "models" / name).write_text(
            textwrap.dedent(text).replace("userpkg.layers", "acme.models.layers"))
    spec = f"acme.models.nets:build@{weights}?shape=4"
    alone = load_fresh(tmp_path / "ns1", spec)
    (tmp_path / "ns2" / "acme" / "other.py").write_text("X = 1\n")  # another distribution's portion
    with_other = load_fresh(tmp_path / "ns1", spec, extra_path=tmp_path / "ns2")
    assert alone["code_packages"] == ["acme.models"] and alone == with_other
    # a zip import
    import zipfile

    with zipfile.ZipFile(tmp_path / "userpkg.zip", "w") as z:
        for name in PACKAGE:
            z.write(tmp_path / "p" / "userpkg" / name, f"userpkg/{name}")
    probe = ("import sys; from riskpipe.models import load_model, ModelError\n"
             "try:\n    load_model(sys.argv[1])\nexcept ModelError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", probe, f"userpkg.nets:build@{weights}?shape=4"], capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": f"{tmp_path / 'userpkg.zip'}:{ROOT}",
                                                      "PATH": "/usr/bin:/bin"})
    assert "userpkg: has no source file, so its code cannot be identified" in out.stdout, out.stdout + out.stderr
