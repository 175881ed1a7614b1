"""The registry of certification families (riskpipe.certify.families) is the one place a
family is spelled: the policy schema, the factory, the composition root, the CLI, compare
and the conformance suite read it, and adding a family is one registry entry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from linear_family import LINEAR, LinearMargin, linear_model
from riskpipe.certify import certifier_for_policy, family
from riskpipe.certify.families import FAMILIES, Family, Param, register
from riskpipe.certify.protocol import Certifier as CertifierProtocol
from riskpipe.conformance import CertifierCheckError, check_certifier
from riskpipe.policy.schema import Certifier, certifier_section

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def linear_registered():
    """The linear family in the registry for one test, then gone."""
    register(LINEAR)
    yield LINEAR
    del FAMILIES[LINEAR.name]


def _error(section_model, **values) -> str:
    with pytest.raises(ValidationError) as e:
        section_model(**values)
    err = e.value.errors()[0]
    return f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}"


def test_the_policy_schema_is_built_from_the_registry():
    assert Certifier.model_json_schema() == certifier_section().model_json_schema()
    assert set(Certifier.model_fields) == {"method", "mode", "norm"} | {p.name for f in FAMILIES.values()
                                                                          for p in f.params}


@pytest.mark.parametrize("values, message", [
    ({"method": "smoothing"}, ": sigma: required for method smoothing"),
    ({"method": "ibp", "sigma": 0.5}, ": sigma: applies to method smoothing only, not ibp"),
    ({"method": "trees", "sampler": "sound"}, ": sampler: applies to method smoothing only, not trees"),
    ({"method": "lipschitz", "mode": "decide"}, (": mode: decide is a sequential test of randomized smoothing; "
                                                 "method lipschitz gives a deterministic radius, use mode certify")),
    ({"method": "ibp", "max_latency_ms": 5.0}, (": max_latency_ms: applies to mode decide only (certify mode has "
                                                "no early stop)")),
    ({"sigma": 0.5, "mode": "decide", "bound": "goodman"}, (": bound: applies to mode certify only (decide uses "
                                                             "Clopper-Pearson per look)")),
    ({"sigma": 0.5, "norm": "linf"}, ": norm: method smoothing certifies l2, not linf"),
    ({"method": "ibp", "norm": "l1"}, ": norm: method ibp certifies linf or l2, not l1"),
    ({"method": "cohen"}, "method: Input should be 'smoothing', 'ibp', 'lipschitz' or 'trees'"),
    ({"sigma": float("inf")}, "sigma: Input should be a finite number"),
    ({"sigma": 0.5, "grid_levels": 1 << 21}, "grid_levels: Input should be less than or equal to 1048576"),
])
def test_the_schema_checks_each_section_as_its_family_entry_says(values, message):
    """The messages are the ones the schema gave when it spelled the smoothing rules itself."""
    assert _error(Certifier, **values) == message


def test_for_method_keeps_what_the_family_takes():
    assert Certifier.for_method("ibp", sigma=0.5, n=10, norm="l2", mode="bound").model_dump(exclude_defaults=True) \
        == {"method": "ibp", "norm": "l2"}
    s = Certifier.for_method("smoothing", sigma=0.5, n=10, max_latency_ms=None)
    assert (s.sigma, s.n, s.max_latency_ms, s.certificate_norm) == (0.5, 10, None, "l2")


def test_the_registry_refuses_an_entry_that_contradicts_it():
    scope = LINEAR.scope
    with pytest.raises(ValueError, match="'ibp' is already registered"):
        register(Family("ibp", "x:Y", ("linf",), scope))
    with pytest.raises(ValueError, match="no certify mode"):
        register(Family("odd", "x:Y", ("l2",), scope, modes=("decide",)))
    with pytest.raises(ValueError, match="declares 'sigma' unlike another family"):
        register(Family("odd", "x:Y", ("l2",), scope, params=(Param("sigma", float, 1.0),)))
    with pytest.raises(ValueError, match="redeclares the section field 'norm'"):
        register(Family("odd", "x:Y", ("l2",), scope, params=(Param("norm", str, "l2"),)))
    with pytest.raises(ValueError, match="norms"):
        register(Family("odd", "x:Y", ("l3",), scope))
    assert "odd" not in FAMILIES


def test_adding_a_family_is_one_registry_entry(linear_registered):
    """A family riskpipe does not ship, registered: the schema built from the registry takes
    its section and checks its parameter, the factory builds it, it follows the protocol and
    passes the conformance suite, and its certificates carry its scope wording."""
    section_model = certifier_section()
    section = section_model(method="linear", norm="linf", min_margin=0.05)
    assert section.certificate_norm == "linf"
    assert section_model(method="linear").certificate_norm == "l2"
    assert _error(section_model, method="linear", min_margin=-1.0) == "min_margin: Input should be greater than " \
                                                                       "or equal to 0"
    assert _error(section_model, method="smoothing", sigma=0.5, min_margin=0.1) == \
        ": min_margin: applies to method linear only, not smoothing"
    assert _error(section_model, method="linear", mode="decide").startswith(": mode: decide is a sequential test")
    assert section_model.for_method("linear", sigma=0.25, min_margin=0.1).model_dump(exclude_defaults=True) == \
        {"method": "linear", "min_margin": 0.1}

    model = linear_model()
    cert = certifier_for_policy(model, section, batch_size=64, epsilon=0.1)  # knobs it does not take are dropped
    assert isinstance(cert, LinearMargin) and isinstance(cert, CertifierProtocol)
    assert (cert.norm, cert.min_margin) == ("linf", 0.05)
    X = np.random.default_rng(0).random((8, 6), dtype=np.float32)
    report = check_certifier(lambda m, **kw: family("linear")(m, **kw), model, X)
    assert report["checks"][:2] == ["protocol", "invalid_parameters"] and report["attacked"] >= 4
    c = cert.run("certify", X[:1], [0])[0]
    assert c.scope.startswith("l_inf radius to the nearest decision boundary of a linear classifier")


def test_the_suite_refuses_a_class_that_disagrees_with_its_entry(linear_registered):
    import dataclasses

    @dataclasses.dataclass
    class Certain(LinearMargin):
        modes = ("certify", "decide")

    X = np.random.default_rng(0).random((4, 6), dtype=np.float32)
    with pytest.raises(CertifierCheckError, match=r"protocol: linear: modes \('certify', 'decide'\), the registry"):
        check_certifier(lambda m, **kw: Certain(m, **kw), linear_model(), X)
    # an entry declaring a parameter the class does not take: the factory would drop the policy's value
    FAMILIES["linear"] = dataclasses.replace(LINEAR, params=(*LINEAR.params, Param("slope", float, 1.0)))
    with pytest.raises(CertifierCheckError, match="protocol: linear: the constructor does not take slope"):
        check_certifier(lambda m, **kw: LinearMargin(m, **kw), linear_model(), X)


# The registry entry is added before the rest of riskpipe loads, exactly as one more entry in
# riskpipe/certify/families.py would be; then the policy file, the composition root, the
# start-up line, `riskpipe certify`, `riskpipe compare --help` and compare's card row take it.
SCRIPT = r"""
import json, sys
from pathlib import Path

import numpy as np
import torch

from riskpipe.certify.families import register
from linear_family import LINEAR, linear_model

assert "riskpipe.policy.schema" not in sys.modules, "the schema must be built after the registration"
register(LINEAR)

from click.testing import CliRunner

from riskpipe.app.compose import build_entry
from riskpipe.app.config import ModelConfig
from riskpipe.cli import cli
from riskpipe.compare.runner import CompareConfig, _method_run
from riskpipe.policy import PolicyError
from riskpipe.policy.loader import parse_policy
from riskpipe.stream.status import model_line

tmp, policy_text = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
out = {}
model = linear_model()
torch.jit.script(model.module).save(str(tmp / "lin.pt"))
spec = f"{tmp / 'lin.pt'}?shape=6&range=0,1"
X = np.random.default_rng(1).random((40, 6), dtype=np.float32)
y = model.predict(X)
np.savez(tmp / "ref.npz", X=X, y=y)
np.save(tmp / "x.npy", X[:5])
start, end = policy_text.index("certifier:\n"), policy_text.index("signals:\n")
text = policy_text[:start] + "certifier:\n  method: linear\n  norm: linf\n  min_margin: 0.01\n" + policy_text[end:]
policy = parse_policy(text, "linear.yaml")
entry = build_entry("lin", ModelConfig(spec=spec, reference=str(tmp / "ref.npz")), policy)
out["entry"] = [type(entry.certifier).__name__, entry.certifier.norm, entry.certifier.min_margin,
                entry.batch_size_source, entry.context is not None]
out["line"] = model_line(entry, 1)
for name, bad in [("negative", text.replace("min_margin: 0.01", "min_margin: -1.0")),
                  ("other", policy_text.replace("  sigma: 0.25\n", "  sigma: 0.25\n  min_margin: 0.5\n"))]:
    try:
        parse_policy(bad, f"{name}.yaml")
        out[name] = "accepted"
    except PolicyError as e:
        out[name] = str(e)
r = CliRunner().invoke(cli, ["certify", "--method", "linear", "--norm", "linf", "--model", spec,
                             "--input", str(tmp / "x.npy"), "--output", str(tmp / "certs.jsonl")])
out["cli"] = [r.exit_code, r.output, [json.loads(line) for line in (tmp / "certs.jsonl").read_text().splitlines()]
              if r.exit_code == 0 else []]
out["compare_help"] = CliRunner().invoke(cli, ["compare", "--help"]).output
cfg = CompareConfig(models=(spec,), methods=("linear",), limit=20, timing_inputs=2, batch_sizes=(1,), widths=(4,),
                    pgd_steps=2)
row = _method_run(model, "linear", X[:20], y[:20], cfg)
out["compare"] = [row["unavailable"], row["native_norm"], row["settings"], row["parallelism"]]
print(json.dumps(out))
"""


def test_a_new_entry_reaches_the_policy_file_the_stage_the_cli_and_compare(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(ROOT / "policies" / "default.yaml")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["entry"] == ["LinearMargin", "linf", 0.01, None, True]  # no batch probe; context radii certified
    assert ", linear (certify), batch size n/a," in out["line"]
    assert out["negative"] == "negative.yaml:20: certifier.min_margin: input should be greater than or equal to 0"
    assert re.fullmatch(r"other\.yaml:\d+: certifier: min_margin: applies to method linear only, not smoothing",
                        out["other"]), out["other"]
    code, output, certs = out["cli"]
    assert code == 0, output
    assert len(certs) == 5 and {c["method"] for c in certs} == {"linear"} and certs[0]["norm"] == "linf"
    assert certs[0]["scope"].startswith("l_inf radius to the nearest decision boundary of a linear classifier")
    assert "smoothing, ibp, lipschitz, trees, linear" in " ".join(out["compare_help"].split())
    assert out["compare"] == [None, "l2", "native norm (from command-line options)",
                              "One matrix product per batch, parallel over inputs."]


NAMES = "|".join(FAMILIES)
NAME_COMPARED = re.compile(rf"""(==|!=|\bin)\s*\(?["']({NAMES})["']|["']({NAMES})["']\s*(==|!=)""")


def test_no_module_but_the_registry_branches_on_a_method_name():
    """``x.method == "smoothing"``, ``m != "trees"`` or ``family("ibp")`` in the package is a
    family spelled outside the registry (``kind == "trees"`` in attacks.py is the attack
    kind, not a family, and has no method on its line; ``request.method == "GET"`` is HTTP)."""
    found = []
    for path in sorted((ROOT / "riskpipe").rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            branch = NAME_COMPARED.search(line) and re.search("method", line, re.IGNORECASE)
            if branch or re.search(r"""\bfamily\(["']""", line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
