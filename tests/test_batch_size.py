"""The certification batch size comes from the model's measured forward throughput.

The probe's own tests run on simulated time: ``TimedModel`` advances a ``SimClock`` by
its known forward cost and the probe reads that clock, so rates, choices and budget
stops are exact on any machine, however loaded."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from riskpipe.certify.batch_size import BatchSizeProbe, probe, probe_clock
from riskpipe.tuning import BatchSizeChoice, cache_path, certify_batch_size
from synthetic import policy_without_context


@dataclass
class SimClock:
    """Simulated seconds: only ``advance`` moves it."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class TimedModel:
    """A model whose forward pass takes ``cost(batch size)`` simulated seconds on ``clock``."""

    cost: object
    clock: SimClock = field(default_factory=SimClock)
    input_shape: tuple = (3, 32, 32)
    value_range: tuple = (0.0, 1.0)
    device: str = "cpu"
    spec: str = "timed"
    sha256: str = "t" * 64
    calls: int = 0

    def predict_torch(self, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        self.calls += 1
        assert x.shape[1:] == self.input_shape and x.dtype == torch.float32
        self.clock.advance(self.cost(len(x)))
        return torch.zeros(len(x), dtype=torch.int64)


def peaked(b: int) -> float:
    # fastest at 256 (4 µs/sample); 7 µs/sample at 512 and below 256 (above half the peak
    # rate, so not "falling"), 20 µs/sample beyond (below half: the probe stops after two)
    per = 4e-6 if b == 256 else (7e-6 if b <= 512 else 20e-6)
    return b * per


def test_probe_picks_the_fastest_size_and_stops_past_the_peak() -> None:
    m = TimedModel(peaked)
    p = probe(m, budget_s=3.0, min_time_s=0.02, clock=m.clock)
    assert p.best == 256
    assert p.rates[256] > 1.5 * p.rates[128] and p.rates[256] > 1.5 * p.rates[512]
    assert p.rates[2048] < 0.5 * p.best_rate
    assert p.rates == pytest.approx({b: b / peaked(b) for b in (64, 128, 256, 512, 1024, 2048)})
    assert 4096 not in p.rates and "fell below half" in p.notes[-1]  # stopped past the peak


def test_best_is_the_smallest_within_tolerance() -> None:
    p = BatchSizeProbe({64: 100.0, 128: 190.0, 256: 200.0, 512: 199.0}, tolerance=0.9)
    assert p.best == 128 and p.best_rate == 200.0
    assert BatchSizeProbe({64: 100.0, 128: 190.0, 256: 200.0}, tolerance=1.0).best == 256


def test_probe_keeps_to_its_budget() -> None:
    slow = TimedModel(lambda b: 0.1 + b * 2e-4)  # 64: 0.11 s per call; 4096: 0.9 s
    p = probe(slow, budget_s=0.8, min_time_s=0.0, clock=slow.clock)
    assert p.elapsed_s == slow.clock.now <= 0.8
    assert 64 in p.rates and 4096 not in p.rates
    assert "budget" in p.notes[-1]


def test_probe_draws_inputs_in_any_declared_range() -> None:
    seen = []
    m = TimedModel(lambda b: 0.0, input_shape=(2,))
    m.predict_torch = lambda x, scratch=False: seen.append(x) or torch.zeros(len(x), dtype=torch.int64)
    for declared in (None, (np.array([10.0, -5.0]), np.array([11.0, -4.0]))):
        m.value_range = declared
        seen.clear()
        probe(m, candidates=(64,), budget_s=1.0)
        assert all(torch.isfinite(x).all() for x in seen)
    centre = seen[0].mean(dim=0)
    assert abs(float(centre[0]) - 10.5) < 0.2 and abs(float(centre[1]) + 4.5) < 0.2


def test_probe_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="candidates"):
        probe(TimedModel(peaked), candidates=[0, 64])
    with pytest.raises(ValueError, match="budget_s"):
        probe(TimedModel(peaked), budget_s=0)


def test_probe_on_a_cifar_sized_torchscript_cnn(tmp_path, one_thread) -> None:
    from riskpipe.models import load_model
    from synthetic import cifar_cnn, save_torchscript

    model = load_model(save_torchscript(cifar_cnn(), tmp_path / "cnn.pt", (3, 32, 32)))
    p = probe(model, candidates=(8, 16), budget_s=0.5, min_time_s=0.0)
    assert p.best in (8, 16) and all(r > 0 for r in p.rates.values())


def test_choice_is_probed_once_then_cached_per_model_device_and_threads(tmp_path) -> None:
    m = TimedModel(peaked)
    first = certify_batch_size(m, cache_dir=tmp_path, budget_s=3.0, clock=m.clock)
    assert first.source == "probe" and first.size == 256
    path = cache_path(m, tmp_path)
    assert json.loads(path.read_text())["batch_size"] == 256
    assert f"-cpu-t{torch.get_num_threads()}-c2.json" in path.name and path.name.startswith("t" * 32)
    calls = m.calls
    again = certify_batch_size(m, cache_dir=tmp_path, clock=m.clock)
    assert (again.size, again.source, m.calls) == (256, "cache", calls)  # no model call
    other = TimedModel(peaked, sha256="u" * 64)
    assert cache_path(other, tmp_path) != path


def test_configured_size_wins_without_a_probe(tmp_path) -> None:
    m = TimedModel(peaked)
    c = certify_batch_size(m, configured=700, cache_dir=tmp_path)
    assert (c.size, c.source, m.calls) == (700, "config", 0)
    assert not cache_path(m, tmp_path).exists()


def test_unreadable_cache_is_probed_again(tmp_path) -> None:
    m = TimedModel(peaked)
    path = cache_path(m, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert certify_batch_size(m, cache_dir=tmp_path, budget_s=3.0, clock=m.clock).source == "probe"
    assert json.loads(path.read_text())["batch_size"] == 256


def test_tabular_sklearn_model_is_probed(tmp_path) -> None:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    from riskpipe.models.base import Model

    X, y = load_breast_cancer(return_X_y=True)
    clf = LogisticRegression(max_iter=200).fit(X[:, :5], y)
    model = Model(spec="sklearn", input_shape=(5,), num_classes=2, sha256="s" * 64,
                  value_range=(float(X[:, :5].min()), float(X[:, :5].max())),
                  _predict_fn=lambda a: clf.predict(a.astype(np.float64)))
    c = certify_batch_size(model, cache_dir=tmp_path, budget_s=0.5)
    assert c.source == "probe" and c.size in c.rates


def test_forward_batch_is_the_fastest_measured_size_never_below_the_chosen_one() -> None:
    rates = {64: 1000.0, 128: 2950.0, 256: 2000.0, 512: 3000.0}
    assert BatchSizeChoice(128, "probe", rates).forward == 512  # 128: the smallest within 3 % of the fastest
    assert BatchSizeChoice(256, "cache", {64: 1000.0, 128: 3000.0, 256: 2990.0}).forward == 256
    assert BatchSizeChoice(700, "config").forward is None  # a configured size caps every call


# ---- wired into the composition root, the config, the CLI and the metrics -----------------
@pytest.fixture(scope="module")
def cnn_spec(tmp_path_factory):
    from synthetic import cifar_cnn, save_torchscript

    return save_torchscript(cifar_cnn(), tmp_path_factory.mktemp("cnn") / "cnn.pt", (3, 32, 32)) + "&range=0,1"


def _config(tmp_path, models: dict, **top):
    """A stage config file with these ``models:`` entries (and top-level keys), loaded."""
    import yaml

    from riskpipe.app.config import load_config

    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"policy": policy_without_context(tmp_path), "models": models, **top}))
    return load_config(str(path))


def test_composition_root_takes_model_then_stage_value_else_the_probe(tmp_path, monkeypatch, cnn_spec) -> None:
    import riskpipe.certify.batch_size as bs
    from riskpipe.app.compose import build_pipeline

    monkeypatch.setenv("RISKPIPE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(tmp_path, {"cnn": {"spec": cnn_spec, "certify_batch_size": 96}, "other": cnn_spec},
                  certify_batch_size=200)
    p = build_pipeline(cfg)
    assert (p.entries["cnn"].certifier.batch_size, p.entries["cnn"].batch_size_source) == (96, "config")
    assert (p.entries["other"].certifier.batch_size, p.entries["other"].batch_size_source) == (200, "config")
    # nothing configured: the probe's answer (a fixed measurement here) is what the certifier gets
    monkeypatch.setattr(bs, "probe", lambda model, **kw: BatchSizeProbe({64: 1000.0, 128: 3000.0, 256: 2000.0}))
    p = build_pipeline(_config(tmp_path, {"cnn": cnn_spec}))
    assert (p.entries["cnn"].certifier.batch_size, p.entries["cnn"].batch_size_source) == (128, "probe")
    monkeypatch.setattr(bs, "probe", lambda model, **kw: BatchSizeProbe({64: 1000.0, 128: 2950.0, 256: 3000.0}))
    monkeypatch.setenv("RISKPIPE_CACHE_DIR", str(tmp_path / "cache2"))
    c = build_pipeline(_config(tmp_path, {"cnn": cnn_spec})).entries["cnn"].certifier
    assert (c.batch_size, c.forward_batch, c.forward_size) == (128, 256, 256)  # calls at the fastest size


def test_probe_result_reaches_the_certifier_and_is_reused(tmp_path, monkeypatch, cnn_spec, one_thread) -> None:
    import riskpipe.certify.batch_size as bs
    from riskpipe.app.compose import build_pipeline

    monkeypatch.setenv("RISKPIPE_CACHE_DIR", str(tmp_path / "cache"))
    real = bs.probe
    monkeypatch.setattr(bs, "probe", lambda model, **kw: real(model, candidates=(8, 16), budget_s=0.3))
    cfg = _config(tmp_path, {"cnn": cnn_spec})
    first = build_pipeline(cfg).entries["cnn"]
    assert first.batch_size_source == "probe" and first.certifier.batch_size in (8, 16)
    again = build_pipeline(cfg).entries["cnn"]
    assert (again.batch_size_source, again.certifier.batch_size) == ("cache", first.certifier.batch_size)
    assert len(list((tmp_path / "cache" / "batch_size").glob("*.json"))) == 1


def test_chosen_size_is_exported_per_model(tmp_path, cnn_spec) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from riskpipe.app.compose import build_stage
    from riskpipe.metrics import StageMetrics, expose

    m = StageMetrics()
    cfg = _config(tmp_path, {"cnn": {"spec": cnn_spec, "certify_batch_size": 320}})
    build_stage(cfg, source=f"jsonl:{tmp_path / 'none.jsonl'}", sink=f"jsonl:{tmp_path}", metrics=m)
    got = {tuple(sorted(s.labels.items())): s.value
           for f in text_string_to_metric_families(expose(m.registry).decode()) for s in f.samples
           if s.name == "riskpipe_certify_batch_size"}
    assert got == {(("model", "cnn"), ("source", "config")): 320.0}


def test_cli_flag_overrides_every_model_and_is_logged(tmp_path, cnn_spec) -> None:
    import subprocess
    import sys

    from riskpipe.stream.events import make_event

    rng = np.random.default_rng(0)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(make_event(f"c{i}", "cnn", rng.random((3, 32, 32)).round(2))) + "\n"
                           for i in range(2)))
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(f"policy: {policy_without_context(tmp_path)}\n"
                   f"models:\n  cnn:\n    spec: '{cnn_spec}'\n    certify_batch_size: 999\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(cfg), "--no-ledger", "-v",
                        "--source", f"jsonl:{src}", "--sink", f"jsonl:{out}", "--certify-batch-size", "128"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model cnn: certification batch size 128 (config)" in r.stderr
    recs = [json.loads(s) for s in (out / "audit.jsonl").read_text().splitlines()]
    assert [rec["certificate"]["extra"]["batch_size"] for rec in recs] == [128, 128]


def test_the_probe_times_by_cpu_time_where_the_work_is_the_process_s_own(monkeypatch) -> None:
    """One torch thread on the CPU (the stage's default): the process's CPU time, which other
    processes on the machine do not move; more threads or another device: the wall clock."""
    m = TimedModel(peaked)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert probe_clock(m) is time.process_time
    m.device = "cuda:0"
    assert probe_clock(m) is time.perf_counter
    m.device = "cpu"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert probe_clock(m) is time.perf_counter
