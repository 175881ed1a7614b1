"""The smoothing noise is keyed by a secret (riskpipe.app.noise_key).

The sender picks the event id. While the seed was sha256(id, policy), anyone could
compute the noise an event would draw and try ids offline until one overstated its
radius. Now the seed is HMAC-SHA256(key, id, policy): without the key it cannot be
computed. The key comes from ``RISKPIPE_NOISE_KEY``, else the config's
``noise_key_file``, else it is random per process. Each record holds its seed, so
``ledger replay`` recomputes a certificate without the key. Shown on the tabular
example's skops pipeline, not the demo."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from riskpipe.app.config import ConfigError, StageConfig, load_config
from riskpipe.app.noise_key import NOISE_KEY_ENV, resolve_noise_key, seeded_noise_key
from riskpipe.cli import cli
from riskpipe.ledger import Ledger
from riskpipe.ledger.chain import decision_scope
from riskpipe.redaction import redact
from riskpipe.stream.events import make_event
from riskpipe.stream.pipeline import seed_for

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tabular"
SCOPE = f"{'p' * 64}/{'m' * 64}/cancer"  # riskpipe.ledger.chain.decision_scope: policy sha/model sha/name
N = 4


def public_seed(event_id: str, policy_sha: str) -> int:
    """The seed function before: a function of what the sender knows."""
    return int.from_bytes(hashlib.sha256(f"{event_id}\x00{policy_sha}".encode()).digest()[:8], "big") >> 1


def test_a_seed_cannot_be_computed_without_the_key():
    ids = [f"evt-{i}" for i in range(500)]
    one = [seed_for(b"k" * 32, i, SCOPE) for i in ids]
    assert one == [seed_for(b"k" * 32, i, SCOPE) for i in ids]  # one key: the same noise again
    other = [seed_for(b"j" * 32, i, SCOPE) for i in ids]
    assert all(a != b for a, b in zip(one, other, strict=True))
    assert not set(one) & {public_seed(i, "p" * 64) for i in ids}
    assert len(set(one)) == len(ids) and all(0 <= s < 2**63 for s in one)  # a torch.Generator seed
    for other_scope in (SCOPE.replace("p", "q"), SCOPE.replace("m", "n"), SCOPE.replace("cancer", "wine")):
        assert seed_for(b"k" * 32, "evt-1", other_scope) != one[1]  # the policy and the model are part of it


def test_the_key_comes_from_the_environment_then_the_file_then_chance(tmp_path):
    key_file = tmp_path / "noise.key"
    key_file.write_text("file-noise-key-0123456789abcdef-0123\n")
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text("noise_key_file: noise.key\n")  # relative to the config file
    config = load_config(str(cfg))
    assert config.noise_key_file == str(key_file)
    env_key = resolve_noise_key(config, {NOISE_KEY_ENV: "env-noise-key-0123456789abcdef-0123"})
    assert env_key.key == b"env-noise-key-0123456789abcdef-0123" and env_key.source == NOISE_KEY_ENV
    from_file = resolve_noise_key(config, {})
    assert from_file.key == b"file-noise-key-0123456789abcdef-0123" and str(key_file) in from_file.source
    assert redact("x file-noise-key-0123456789abcdef-0123 y") == "x *** y"  # masked from now on
    assert "0123456789abcdef" not in repr(from_file)
    a, b = resolve_noise_key(StageConfig(), {}), resolve_noise_key(StageConfig(), {})
    assert a.key != b.key and len(a.key) == 32 and a.source == "a random key of this process"
    assert seeded_noise_key(3, "riskpipe evaluate") == seeded_noise_key(3, "riskpipe evaluate")
    assert seeded_noise_key(3, "riskpipe evaluate").key != seeded_noise_key(4, "riskpipe evaluate").key


PLACEHOLDER = "the noise key is an example's placeholder (change-me...): make one with `openssl rand -hex 32`"


@pytest.mark.parametrize("env,content,message", [
    ({NOISE_KEY_ENV: "short"}, None, "RISKPIPE_NOISE_KEY: the noise key must be at least 32 characters, has 5"),
    ({NOISE_KEY_ENV: ""}, None, "RISKPIPE_NOISE_KEY: the noise key must be at least 32 characters, has 0"),
    ({NOISE_KEY_ENV: " " * 40}, None, "RISKPIPE_NOISE_KEY: the noise key must be at least 32 characters, has 0"),
    ({NOISE_KEY_ENV: "a" * 40}, None, "RISKPIPE_NOISE_KEY: the noise key has 1 distinct characters, fewer than 8: "
                                      "make one with `openssl rand -hex 32`"),
    ({}, "change-me-to-64-random-hex-characters-from-openssl-rand-hex-32\n", "noise_key_file {path}: " + PLACEHOLDER),
    ({}, "too-short-key\n", "noise_key_file {path}: the noise key must be at least 32 characters, has 13"),
    ({}, "\n\n", "noise_key_file {path}: file is empty"),
    ({}, None, "noise_key_file {path}: cannot read (No such file or directory)"),
])
def test_a_bad_key_is_refused_naming_where_it_came_from(tmp_path, env, content, message):
    path = tmp_path / "noise.key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as e:
        resolve_noise_key(StageConfig(noise_key_file=str(path)), env)
    assert str(e.value) == message.format(path=path)
    assert "too-short-key" not in str(e.value)


def test_one_key_written_three_ways_is_one_key(tmp_path):
    """A key file with a byte-order mark and CRLF, and the variable with kubectl's trailing newline."""
    key = "0f3a9c2e7b1d4f6a8c0e2b4d6f8a1c3e"
    (tmp_path / "k").write_bytes(("\ufeff" + key + "\r\n").encode("utf-8"))
    by_file = resolve_noise_key(StageConfig(noise_key_file=str(tmp_path / "k")), {})
    by_env = resolve_noise_key(StageConfig(), {NOISE_KEY_ENV: key + "\n"})
    assert by_file.key == by_env.key == key.encode()


def test_a_key_given_where_its_path_belongs_is_never_printed(tmp_path):
    """``noise_key_file: ${VAR}`` with the key itself in VAR: the error that the file cannot
    be read names the setting, and the key is masked."""
    key = "5b8d1f3a7c9e2b4d6f8a0c2e4b6d8f1a"
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(_config(tmp_path).read_text()),
                                   "noise_key_file": "${RP_NOISE}"}))
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(cfg), "--source",
                        f"jsonl:{_events(tmp_path)}", "--sink", f"jsonl:{tmp_path / 'out'}", "--no-metrics-server"],
                       capture_output=True, text=True, timeout=240,
                       env={**{k: v for k, v in os.environ.items() if k != NOISE_KEY_ENV}, "RP_NOISE": key})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "noise_key_file" in r.stderr and "cannot read" in r.stderr
    assert key not in r.stdout + r.stderr and key[:16] not in r.stdout + r.stderr


def _events(tmp: Path) -> Path:
    X = np.load(EXAMPLE / "reference.npz")["X"][:N].astype(np.float32)
    np.save(tmp / "inputs.npy", X)
    path = tmp / "events.jsonl"
    path.write_text("".join(json.dumps(make_event(f"tab-{i}", "cancer", x, upstream_risk=0.1)) + "\n"
                            for i, x in enumerate(X)))
    return path


def _config(tmp: Path, **extra) -> Path:
    """The tabular example's config with absolute paths (so it can live elsewhere) and ``extra``."""
    data = yaml.safe_load((EXAMPLE / "riskpipe.yaml").read_text())
    data["policy"] = str(EXAMPLE / data["policy"])
    for m in data["models"].values():
        for key in ("spec", "reference", "policy"):
            m[key] = str(EXAMPLE / m[key])
    path = tmp / "riskpipe.yaml"
    path.write_text(yaml.safe_dump({**data, **extra}))
    return path


def _stage(tmp: Path, config: Path, *, env: dict[str, str | None]) -> tuple[subprocess.CompletedProcess, dict]:
    """``riskpipe run --config`` offline over the N events, as a user runs it; (run, seed by id)."""
    tmp.mkdir(exist_ok=True)
    events = _events(tmp)
    ledger = tmp / "ledger.db"
    full = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(config), "--source",
                        f"jsonl:{events}", "--sink", f"jsonl:{tmp / 'out'}", "--ledger", str(ledger),
                        "--no-metrics-server", "-v"], capture_output=True, text=True, timeout=240, env=full)
    assert r.returncode == 0 and f"decided {N} events" in r.stdout + r.stderr, r.stderr[-3000:]
    with Ledger(str(ledger)) as led:
        seeds = {e.entry_id: e.record["certificate"]["seed"] for e in led.records("decision")}
    assert len(seeds) == N
    return r, seeds


def test_without_a_key_each_stage_draws_noise_no_sender_can_compute_and_replay_still_matches(tmp_path):
    config = _config(tmp_path)
    first, seeds = _stage(tmp_path / "a", config, env={NOISE_KEY_ENV: None})
    _, again = _stage(tmp_path / "b", config, env={NOISE_KEY_ENV: None})
    assert "noise seeds: HMAC-SHA256 keyed by a random key of this process" in first.stderr
    policy_sha = json.loads((tmp_path / "a" / "out" / "audit.jsonl").read_text().splitlines()[0])["policy"]["sha256"]
    assert all(seeds[i] != again[i] and seeds[i] != public_seed(i, policy_sha) for i in seeds)
    # the record holds the seed: an auditor recomputes the certificate without the stage's key
    r = CliRunner().invoke(cli, ["ledger", "replay", "tab-2", "--ledger", str(tmp_path / "a" / "ledger.db"),
                                 "--input", str(tmp_path / "a" / "inputs.npy"), "--config", str(config), "--json"])
    res = json.loads(r.output)
    assert r.exit_code == 0 and res["ok"] and all(c["match"] for c in res["checks"]), res


def test_one_key_file_gives_every_process_the_same_noise_and_is_never_printed(tmp_path):
    secret = "noise-key-from-a-file-never-printed-7f3a"
    (tmp_path / "noise.key").write_text(secret + "\n")
    config = _config(tmp_path, noise_key_file=str(tmp_path / "noise.key"))
    first, seeds = _stage(tmp_path / "a", config, env={NOISE_KEY_ENV: None})
    second, again = _stage(tmp_path / "b", config, env={NOISE_KEY_ENV: None})
    assert seeds == again  # replicas and restarts with one key redecide an event identically
    assert seeds == {i: seed_for(secret.encode(), i, _scope(tmp_path / "a")) for i in seeds}
    assert f"noise seeds: HMAC-SHA256 keyed by noise_key_file {tmp_path / 'noise.key'}" in first.stderr
    for r in (first, second):
        assert secret not in r.stdout + r.stderr
    env_secret = "noise-key-from-the-environment-4c1d9e"
    third, by_env = _stage(tmp_path / "c", config, env={NOISE_KEY_ENV: env_secret})  # the environment comes first
    assert by_env == {i: seed_for(env_secret.encode(), i, _scope(tmp_path / "a")) for i in seeds}
    assert env_secret not in third.stdout + third.stderr and "keyed by RISKPIPE_NOISE_KEY" in third.stderr


def _scope(tmp: Path) -> str:
    return decision_scope("decision", json.loads((tmp / "out" / "audit.jsonl").read_text().splitlines()[0]))


def test_a_bad_key_file_stops_the_stage_before_it_starts_in_one_line(tmp_path):
    (tmp_path / "noise.key").write_text("short\n")
    config = _config(tmp_path, noise_key_file="noise.key")
    events = _events(tmp_path)
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(config), "--source",
                        f"jsonl:{events}", "--sink", f"jsonl:{tmp_path / 'out'}", "--no-metrics-server"],
                       capture_output=True, text=True, timeout=240,
                       env={k: v for k, v in os.environ.items() if k != NOISE_KEY_ENV})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"noise_key_file {tmp_path / 'noise.key'}: the noise key must be at least 32 characters, has 5" \
        in r.stderr + r.stdout
    assert not (tmp_path / "out" / "decisions.jsonl").exists() or not (tmp_path / "out" / "decisions.jsonl").read_text()


def test_a_path_built_from_a_variable_stays_readable_in_errors(tmp_path, monkeypatch):
    """Only a whole ${VAR} naming no file is masked in a *_file setting: a directory from
    the environment (``${APP_DIR}/noise.key``) is no secret, and masking it hid which file
    the error was about."""
    monkeypatch.setenv("RP_APP_DIR", str(tmp_path))
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text("noise_key_file: ${RP_APP_DIR}/missing.key\n")
    with pytest.raises(ConfigError) as e:
        resolve_noise_key(load_config(str(cfg)), {})
    assert f"noise_key_file {tmp_path}/missing.key: cannot read" in redact(str(e.value))
