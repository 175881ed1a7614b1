"""Every YAML file riskpipe reads (policy, stage config, review config) is bounded:
an alias bomb, a recursive anchor or absurd nesting is refused fast, in one line."""

import subprocess
import sys
import time

import pytest

from riskpipe import safe_yaml

# A bound on refusing a bomb, not a speed target: a correct loader refuses it in about a
# millisecond, while expanding it (9**9 leaves) takes far longer and gigabytes. 20 s
# cannot fail on a loaded machine for a correct loader and still catches an expanding one.
REFUSED_WITHIN_S = 20.0


def bomb(levels: int = 9, width: int = 9) -> str:
    """``levels`` levels of ``width`` aliases: width**levels leaves once expanded."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_limits_count_expanded_aliases_depth_and_recursion():
    assert safe_yaml.load("a: &x [1, 2]\nb: *x\nc: {d: 1}\n") == {"a": [1, 2], "b": [1, 2], "c": {"d": 1}}
    t0 = time.perf_counter()
    with pytest.raises(safe_yaml.YAMLLimitError, match="expands to more than"):
        safe_yaml.load(bomb())
    assert time.perf_counter() - t0 < REFUSED_WITHIN_S
    with pytest.raises(safe_yaml.YAMLLimitError, match="recursive alias"):
        safe_yaml.load("&a [*a]")
    with pytest.raises(safe_yaml.YAMLLimitError, match="nesting deeper than 64"):
        safe_yaml.load("[" * 100 + "]" * 100)
    # below the limits the same shapes load
    assert len(safe_yaml.load(bomb(3, 9))["a2"]) == 9
    assert safe_yaml.load("[" * 60 + "]" * 60) is not None


def test_policy_bomb_refused_with_one_line_naming_the_file(tmp_path):
    from riskpipe.policy import PolicyError, load_policy

    p = tmp_path / "bomb.yaml"
    p.write_text(bomb())
    t0 = time.perf_counter()
    with pytest.raises(PolicyError) as e:
        load_policy(p)
    assert time.perf_counter() - t0 < REFUSED_WITHIN_S
    assert str(e.value).count("\n") == 0 and str(e.value).startswith(f"{p}:")
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "policy", "check", str(p)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert str(p) in r.stderr + r.stdout and "expands to more than" in r.stderr + r.stdout


def test_stage_and_review_config_bomb_refused(tmp_path):
    from riskpipe.app.config import ConfigError, load_config
    from riskpipe.review.settings import SettingsError, load_config_file

    p = tmp_path / "riskpipe.yaml"
    p.write_text(bomb())
    for load, err in ((load_config, ConfigError), (load_config_file, SettingsError)):
        t0 = time.perf_counter()
        with pytest.raises(err, match="expands to more than") as e:
            load(str(p))
        assert time.perf_counter() - t0 < REFUSED_WITHIN_S
        assert str(e.value).startswith(f"{p}:") and "\n" not in str(e.value)
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(p)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "expands to more than" in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1


def fat_leaf(megabytes: int = 1, references: int = 1000) -> str:
    """One ``megabytes`` MB string referenced ``references`` times: few nodes, many bytes."""
    return f"leaf: &x \"{'x' * (megabytes << 20)}\"\nrefs: [" + ", ".join(["*x"] * references) + "]\n"


def test_fat_leaf_alias_bomb_is_refused_by_expanded_bytes(tmp_path):
    """1,001 nodes (far under the node limit) but a gigabyte once expanded."""
    text = fat_leaf()
    assert safe_yaml.MAX_NODES > 1001
    t0 = time.perf_counter()
    with pytest.raises(safe_yaml.YAMLLimitError, match="more than 8388608 bytes") as e:
        safe_yaml.load(text)
    assert time.perf_counter() - t0 < REFUSED_WITHIN_S and e.value.line == 2  # the list of references
    assert len(safe_yaml.load(fat_leaf(1, 4))["refs"]) == 4  # 5 MB expanded: under the limit
    p = tmp_path / "fat.yaml"
    p.write_text(text)
    for args in (["policy", "check", str(p)], ["run", "--config", str(p)]):
        r = subprocess.run([sys.executable, "-m", "riskpipe.cli", *args], capture_output=True, text=True, timeout=60)
        out = (r.stdout + r.stderr).strip()
        assert r.returncode != 0 and "Traceback" not in out and len(out.splitlines()) == 1, out
        assert str(p) in out and "bytes of text" in out


def test_a_5000_digit_integer_is_one_line_not_a_traceback(tmp_path):
    with pytest.raises(safe_yaml.YAMLLimitError, match="integer of 5000 digits") as e:
        safe_yaml.load("a: 1\nb: " + "9" * 5000 + "\n")
    assert e.value.line == 2
    assert safe_yaml.load("b: " + "9" * 30 + "\n") == {"b": int("9" * 30)}
    p = tmp_path / "riskpipe.yaml"
    p.write_text("certify_batch_size: " + "7" * 5000 + "\n")
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(p)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and f"{p}:1:" in r.stderr and "5000 digits" in r.stderr


def test_a_key_given_twice_is_refused_in_every_file_riskpipe_reads(tmp_path):
    """YAML's loaders keep the last copy of a key silently: a reviewer who reads a model's
    first ``policy:`` would approve a riskpipe.yaml the stage reads otherwise. The stage
    config and the review console's refuse it with file, line and field (as policies
    always did, now through the same check), before anything is built."""
    from riskpipe.app.config import ConfigError, load_config
    from riskpipe.review.settings import SettingsError, load_config_file

    p = tmp_path / "riskpipe.yaml"
    p.write_text("models:\n  digits:\n    spec: demo:digits\n    policy: policies/strict.yaml\n"
                 "    reference: ref.npz\n    policy: policies/default.yaml\n")
    for load, err in ((load_config, ConfigError), (load_config_file, SettingsError)):
        with pytest.raises(err) as e:
            load(str(p))
        assert str(e.value) == f"{p}:6: models.digits.policy: duplicate key (YAML keeps only the last; remove one)"
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(p)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "riskpipe.yaml:6: models.digits.policy: duplicate key" in r.stderr


@pytest.mark.parametrize("text, refused", [
    ("a: 1\nb: 2\na: 3\n", ("a", 3)),
    ("m:\n  x: 1\n  01: 2\n  1: 3\n", ("m.1", 4)),  # 01 and 1 are one key once built
    ("k: [{a: 1}, {a: 1, a: 1}]\n", ("k[1].a", 1)),  # equal values too (flow style: one line)
    ("~: 1\nnull: 2\n", ("null", 2)),
    ("x: &a {q: 1, q: 2}\ny: *a\n", ("x.q", 1)),  # once, where the anchor is
    ("base: &b {p: 1}\nuse:\n  <<: *b\n  p: 2\n", None),  # a merge key's override is no duplicate
    ("a: 1\nA: 2\n'a ': 3\n", None),
])
def test_duplicate_keys_compares_keys_as_the_loader_builds_them(text, refused):
    if refused is None:
        assert safe_yaml.load(text)
        return
    with pytest.raises(safe_yaml.DuplicateKeyError) as e:
        safe_yaml.load(text)
    assert (safe_yaml.field_path(e.value.loc), e.value.line) == refused
