"""The installable wheel: ``python -m build``, installed into a fresh virtual environment,
runs ``riskpipe run`` offline with the packaged default policy and the demo model,
from a directory that is not a checkout.

torch and the other dependencies are not downloaded (no network here): the fresh
environment sees the test environment's installed distributions through a directory
of links (every distribution except riskpipe itself) named in a ``.pth`` file; pip
installs the wheel with ``--no-index --no-deps`` and ``pip check`` then fails on any
dependency the wheel declares that the environment lacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=300, env=_clean_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = out.glob("riskpipe-*.whl")
    return whl


def test_wheel_ships_policies_schemas_and_templates_once(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("default", "strict", "shadow"):
        assert f"riskpipe/policies/{f}.yaml" in names
        # one copy: the checkout's policies/ links to the packaged file
        link = ROOT / "policies" / f"{f}.yaml"
        assert link.resolve() == (ROOT / "riskpipe" / "policies" / f"{f}.yaml").resolve()
    assert (ROOT / "policies" / "README.md").is_file()
    assert any(n.startswith("riskpipe/schemas/") and n.endswith(".json") for n in names)
    assert any(n.endswith(".j2") for n in names)
    assert "riskpipe/ledger/postgres.py" in names and "riskpipe/kafka_clients.py" in names
    assert not any(n.startswith(("tests/", "bench/", "deploy/")) for n in names)


def test_wheel_runs_the_stage_offline_in_a_fresh_environment(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # the test environment's dependencies (torch included), riskpipe itself left out
    deps = tmp_path / "deps"
    deps.mkdir()
    shared = Path(sysconfig.get_paths()["purelib"])
    for entry in shared.iterdir():
        if entry.name.lower().startswith(("riskpipe", "__editable__", "_riskpipe")) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "riskpipe-test-deps.pth").write_text(str(deps) + "\n")
    env = _clean_env()
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", str(wheel)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True, timeout=300, env=env)
    assert "riskpipe" not in r.stdout, r.stdout  # every declared dependency is installed

    work = tmp_path / "elsewhere"  # not a checkout: nothing found by walking up to policies/
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import riskpipe, riskpipe.app.config as c; "
                            "print(riskpipe.__file__); print(c.default_policy_path())"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=work)
    assert where.returncode == 0, where.stderr
    module, policy = where.stdout.split()
    assert module.startswith(site) and policy.startswith(site) and Path(policy).is_file()

    from riskpipe.stream.events import make_event
    from streamkit import digits

    events = work / "events.jsonl"
    events.write_text("".join(json.dumps(make_event(f"whl-{i}", "digits", x, upstream_risk=0.1)) + "\n"
                              for i, x in enumerate(digits(6))) + "{not json\n")
    riskpipe = env_dir / "bin" / "riskpipe"
    r = subprocess.run([str(riskpipe), "run", "--source", f"jsonl:{events}", "--sink", f"jsonl:{work / 'out'}",
                        "--ledger", str(work / "ledger.db")], capture_output=True, text=True, timeout=300, env=env,
                       cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "decided 6 events, 1 to the DLQ" in r.stderr
    audit = [json.loads(x) for x in (work / "out" / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 6 and audit[0]["policy"]["name"] == "default"
    r = subprocess.run([str(riskpipe), "ledger", "verify", str(work / "ledger.db")], capture_output=True, text=True,
                       timeout=120, env=env, cwd=work)
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stdout + r.stderr
