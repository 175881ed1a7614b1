"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019) over any base classifier.

The smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c). Every
method below samples f under Gaussian noise and turns counts into a statement
about g that holds with probability >= 1 - alpha over the noise.

Noise comes from one ``torch.Generator`` per input, seeded with that input's
seed, and is drawn in the same pieces whatever else shares the model batch, so
one input's certificate never depends on its batch-mates and an auditor can
recompute it from (input, seed, parameters). Which noise, and whether the
certificate survives floating point, is the ``sampler``'s business
(``riskpipe.certify.samplers``): its ``margin`` is subtracted from every lower
bound on p_A and added to every threshold, so the statements below hold for the
distribution the certificate names.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from riskpipe.certify.certificate import MODEL_FAULT, Certificate
from riskpipe.certify.protocol import CertifierBase
from riskpipe.certify.samplers import make_sampler
from riskpipe.certify.stats import (
    SequentialPlan,
    binomial_test_pvalue,
    clopper_pearson_lower,
    clopper_pearson_upper,
    goodman_intervals,
    radius_from_p,
    radius_two_class,
)

if TYPE_CHECKING:
    from riskpipe.certify.protocol import Batch
    from riskpipe.models.base import Model

BOUNDS = ("cp", "bonferroni", "goodman")
T = TypeVar("T")
OVERLAP_MIN = 1 << 16  # coordinates per noise piece from which drawing ahead pays (Smoothing._overlaps)
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class Smoothing(CertifierBase):
    """Randomized-smoothing certifier for ``model`` (a riskpipe ``Model``).

    ``bound``: ``cp`` is Cohen's CERTIFY (one-sided Clopper–Pearson on p_A);
    ``bonferroni`` / ``goodman`` use the seed's eq. (4) with simultaneous bounds on
    p_A and the runner-up p_B. ``batch_size`` is the size of the pieces each input's
    noise is drawn in (it shapes the noise stream, so certificates record it);
    ``forward_batch`` (default: batch_size) the rows per model call, which changes the
    speed, never a certificate; so memory stays bounded for any n. ``overlap``: whether
    the noise of the next model call is drawn on a helper thread while the model runs
    this one (``_count``); None: when it pays (``_overlaps``). ``sampler``: ``gaussian`` (float noise, not
    floating-point sound) or ``sound`` (inputs on a grid of ``grid_levels`` steps of
    the value range, or of ``grid_step``; see ``riskpipe.certify.samplers``).
    """

    model: Model
    sigma: float = 0.25
    alpha: float = 0.001
    n0: int = 100
    n: int = 100_000
    batch_size: int = 4096
    bound: str = "cp"
    max_samples: int = 100_000
    first_look: int = 48
    growth: float = 2.0
    sampler: str = "gaussian"
    grid_levels: int = 255
    grid_step: float | None = None
    max_latency_ms: float | None = None
    max_looks: int | None = None
    forward_batch: int | None = None
    overlap: bool | None = None

    method = "smoothing"
    norm = "l2"
    modes = ("certify", "predict", "decide")
    inputs_per_call = 16

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"sigma: must be > 0, got {self.sigma}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: must lie in (0, 1), got {self.alpha}")
        if self.n0 < 1 or self.n < 1 or self.batch_size < 1 or self.max_samples < 1:
            raise ValueError("n0, n, batch_size and max_samples must be >= 1")
        if self.forward_batch is not None and self.forward_batch < 1:
            raise ValueError(f"forward_batch: must be >= 1, got {self.forward_batch}")
        if self.bound not in BOUNDS:
            raise ValueError(f"bound: {self.bound!r} is not one of {BOUNDS}")
        if not (self.first_look >= 1 and self.growth > 1):
            raise ValueError(f"first_look: must be >= 1 and growth > 1, got {self.first_look}, {self.growth}")
        if self.max_latency_ms is not None and not (math.isfinite(self.max_latency_ms) and self.max_latency_ms > 0):
            raise ValueError(f"max_latency_ms: must be a finite number > 0, got {self.max_latency_ms}")
        if self.max_looks is not None and self.max_looks < 1:
            raise ValueError(f"max_looks: must be >= 1, got {self.max_looks}")
        if self.overlap not in (None, True, False):
            raise ValueError(f"overlap: must be true, false or null (when it pays), got {self.overlap!r}")
        self.noise = make_sampler(self.sampler, self.sigma, self.model, self.grid_levels, self.grid_step)
        self._plans: dict[float, SequentialPlan] = {}

    @property
    def noise_sigma(self) -> float:
        return self.sigma

    def classify(self, X: Batch, seeds: Sequence[int]) -> list[int | None]:
        """The smoothed classifier's classes (PREDICT; None where it abstains)."""
        return [c.predicted_class for c in self.predict_batch(X, seeds)]

    def admissible(self, x: np.ndarray, x_adv: np.ndarray) -> np.ndarray:
        return self.noise.admissible(x, x_adv)

    def check_inputs(self, X: Batch) -> None:
        """Raise ``GridError`` (a ValueError) for an input the sampler cannot take (off the
        sound sampler's grid; the gaussian sampler takes any input, so nothing is converted)."""
        if self.noise.on_grid:
            self.noise.prepare(torch.as_tensor(np.asarray(X, dtype=np.float32)))

    # ---- sampling core -------------------------------------------------------------
    def _prepare(self, X: Batch, seeds: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        x = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.model.device)
        if x.shape[1:] != tuple(self.model.input_shape):
            x = x.reshape((len(x),) + tuple(self.model.input_shape))
        gens = [torch.Generator(device=self.model.device).manual_seed(int(s)) for s in seeds]
        return self.noise.prepare(x), gens

    def _count(self, x: torch.Tensor, gens: list[torch.Generator],
               draws: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """(class counts (B, K) of f(x_i + noise) over ``draws[i]`` fresh samples per
        input, faults: input index -> what was wrong).

        A sample whose model output breaks the contract (riskpipe.models.output: not
        finite, not (n, C)) is counted for no class and marks its input as faulted; that
        input's certificate is a ``model_fault``, whatever its other samples said.

        Each input's draws are cut into pieces at fixed offsets (multiples of
        batch_size), each drawn whole from that input's generator, so the noise stream
        of an input is the same however the inputs are packed. The drawn rows go to the
        model in calls of exactly ``forward_size`` rows (the last call of a count may be
        shorter): a piece that does not fit waits, already drawn, for the next call. So
        the calls keep the size the model runs fastest at whatever the pieces' sizes,
        and the size changes no certificate. Adding the inputs and tallying are one
        vectorised op per model call.

        With ``overlap`` (``_overlaps``) one helper thread draws the noise of the next
        call while the model runs this one: one thread draws all the noise, each input's
        pieces in the same order from its own generator, so the certificates are the
        same either way (tested).
        """
        B, K = len(x), self.model.num_classes
        counts = torch.zeros(B * K, dtype=torch.int64, device=x.device)
        faults: dict[int, str] = {}
        ahead = self._overlaps(x, draws)
        calls = self._calls(x, gens, draws, 2 if ahead else 1)
        for owner, batch in _ahead(calls, _noise_pool()) if ahead else calls:
            out = self.model.classes(batch, scratch=True)  # a noise buffer, drawn again before its next use
            if out.any_bad:
                for i in torch.unique(owner[out.bad]).tolist():
                    faults.setdefault(i, str(out.reason))
                owner, ids = owner[~out.bad], out.values[~out.bad]
            else:
                ids = out.values
            counts += torch.bincount(owner * K + ids, minlength=B * K)
        return counts.view(B, K).cpu().numpy(), faults

    def _calls(self, x: torch.Tensor, gens: list[torch.Generator], draws: np.ndarray,
               buffers: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(owner input of each row, model inputs) of each model call of ``_count``, in order.

        With one buffer the caller is done with a call before the next is drawn (a
        generator), so it serves them all: the overflow of a call moves to its front.
        With two (drawing ahead, ``_ahead``) they take turns, so the call handed out stays
        intact while the next is drawn: ``_ahead`` asks for call k + 1 only once the
        caller is done with call k - 1, whose buffer takes the overflow of call k.
        ``perturb`` reads a call's rows and writes none past them."""
        pieces = [(i, min(self.batch_size, int(m) - o)) for i, m in enumerate(draws)
                  for o in range(0, int(m), self.batch_size)]
        total = sum(m for _, m in pieces)
        call = min(self.forward_size, total)
        cap = max(1, min(total, call + max((m for _, m in pieces), default=1) - 1))  # a call and an overflow
        shape = tuple(x.shape[1:])
        bufs = [self.noise.new_buffer(cap, shape, x.device) for _ in range(buffers)]
        rows = [np.empty(cap, dtype=np.int64) for _ in bufs]  # row -> its input
        j = fill = k = 0
        while j < len(pieces) or fill:
            buf, row = bufs[k % len(bufs)], rows[k % len(bufs)]
            while j < len(pieces) and fill < call:
                i, m = pieces[j]
                self.noise.draw(buf[fill : fill + m], gens[i])
                row[fill : fill + m] = i
                fill += m
                j += 1
            n = min(fill, call)
            owner = torch.from_numpy(row[:n].copy()).to(x.device)
            yield owner, self.noise.perturb(x.index_select(0, owner), buf[:n])
            fill -= n  # the overflow (< one piece, so < n rows; perturb left it alone) to the next buffer's front
            k += 1
            if fill:
                bufs[k % len(bufs)][:fill] = buf[n : n + fill]
                rows[k % len(bufs)][:fill] = row[n : n + fill]

    @property
    def forward_size(self) -> int:
        """Rows per model call: ``forward_batch`` if set (never below ``batch_size``), else ``batch_size``."""
        return max(self.forward_batch or self.batch_size, self.batch_size)

    def _fault(self, mode: str, elapsed_ms: float, seed: int, why: str, n_samples: int, **kw: Any) -> Certificate:
        """The certificate of an input whose noise batch met a broken model output: uncertified."""
        return self._cert(mode, elapsed_ms, seed, radius=0.0, abstained=True, predicted_class=None,
                          n_samples=n_samples, reason=MODEL_FAULT, extra={MODEL_FAULT: why}, **kw)

    @staticmethod
    def _share_ms(t0: float, batch: int) -> float:
        """elapsed_ms of each certificate of a batch: its wall time shared equally by its inputs
        (docs/records.md; one value for the whole batch)."""
        return (time.perf_counter() - t0) * 1e3 / max(batch, 1)

    def _cert(self, mode: str, elapsed_ms: float, seed: int, **kw: Any) -> Certificate:
        kw["extra"] = {**kw.get("extra", {}), **self.noise.describe()}
        return Certificate(method=self.method, norm="l2", mode=mode, sigma=self.sigma, alpha=self.alpha,
                           seed=int(seed), elapsed_ms=elapsed_ms,
                           input_dim=self.model.input_dim, bound=kw.pop("bound", None), sampler=self.sampler, **kw)

    # ---- CERTIFY ---------------------------------------------------------------------
    def certify(self, x: Batch, seed: int = 0) -> Certificate:
        return self.certify_batch(np.asarray(x)[None], [seed])[0]

    def certify_batch(self, X: Batch, seeds: Sequence[int]) -> list[Certificate]:
        """CERTIFY for each input: with probability >= 1 - alpha (over the noise) the
        smoothed classifier returns the reported class everywhere in the l2 ball of the
        reported radius; abstains when the bound on p_A is below 1/2.

        n0 selection samples pick class A; n fresh samples estimate p_A, so the
        selection costs no confidence. With ``bound`` bonferroni/goodman the radius is
        eq. (4), with p_A and every runner-up bounded simultaneously at level alpha.
        """
        t0 = time.perf_counter()
        x, gens = self._prepare(X, seeds)
        B = len(x)
        sel, faults = self._count(x, gens, np.full(B, self.n0))
        est, more = self._count(x, gens, np.full(B, self.n))
        faults = {**more, **faults}
        top = sel.argmax(axis=1)
        k_a = est[np.arange(B), top]
        p_b = np.full(B, np.nan)
        if self.bound == "cp":
            p_a = np.maximum(clopper_pearson_lower(k_a, self.n, self.alpha) - self.noise.margin, 0.0)
            radius = radius_from_p(p_a, self.sigma)
        else:
            p_a = np.empty(B)
            for i in range(B):
                p_a[i], p_b[i] = self._two_class_bounds(est[i], top[i])
            radius = radius_two_class(p_a, p_b, self.sigma)
        out = []
        share = self._share_ms(t0, B)
        for i in range(B):
            if i in faults:
                out.append(self._fault("certify", share, seeds[i], faults[i], self.n0 + self.n, bound=self.bound))
                continue
            abstain = bool(p_a[i] < 0.5 or radius[i] <= 0)
            out.append(self._cert(
                "certify", share, seeds[i], radius=0.0 if abstain else float(radius[i]), abstained=abstain,
                predicted_class=None if abstain else int(top[i]), p_lower=float(p_a[i]),
                p_upper=None if np.isnan(p_b[i]) else float(p_b[i]), n_samples=self.n0 + self.n,
                bound=self.bound, reason="p_lower_below_half" if abstain else None,
                extra={"counts_top": int(k_a[i]), "n0": self.n0, "n": self.n, "batch_size": self.batch_size}))
        return out

    def _two_class_bounds(self, counts: np.ndarray, a: int) -> tuple[float, float]:
        """Simultaneous bounds (p_A lower, max runner-up upper) at total level alpha."""
        K = len(counts)
        others = np.delete(np.arange(K), a)
        if self.bound == "goodman":
            lo, hi = goodman_intervals(counts, self.alpha)
            p_a, p_b = lo[a], hi[others].max()
        else:  # Bonferroni: alpha/2 for A, alpha/2 split over the K-1 runners-up
            n = counts.sum()
            p_a = clopper_pearson_lower(counts[a], n, self.alpha / 2)
            p_b = clopper_pearson_upper(counts[others], n, self.alpha / (2 * (K - 1))).max()
        p_a, p_b = max(p_a - self.noise.margin, 0.0), min(p_b + self.noise.margin, 1.0)
        return float(p_a), float(min(p_b, 1 - p_a))

    # ---- PREDICT ---------------------------------------------------------------------
    def predict(self, x: Batch, seed: int = 0) -> Certificate:
        return self.predict_batch(np.asarray(x)[None], [seed])[0]

    def predict_batch(self, X: Batch, seeds: Sequence[int]) -> list[Certificate]:
        """PREDICT: returns the smoothed classifier's class, or abstains; the returned
        class differs from g(x) with probability <= alpha (two-sided binomial test of
        the top two counts, scipy.stats.binomtest). No radius is claimed."""
        t0 = time.perf_counter()
        x, gens = self._prepare(X, seeds)
        counts, faults = self._count(x, gens, np.full(len(x), self.n))
        out = []
        share = self._share_ms(t0, len(counts))
        for i, c in enumerate(counts):
            if i in faults:
                out.append(self._fault("predict", share, seeds[i], faults[i], self.n))
                continue
            order = np.argsort(c)[::-1]
            k_a, k_b = int(c[order[0]]), int(c[order[1]]) if len(c) > 1 else 0
            pval = binomial_test_pvalue(k_a, k_b)
            abstain = pval > self.alpha
            out.append(self._cert("predict", share, seeds[i], radius=0.0, abstained=abstain,
                                  predicted_class=None if abstain else int(order[0]), n_samples=self.n,
                                  reason="not_significant" if abstain else None,
                                  extra={"p_value": pval, "counts_top2": [k_a, k_b]}))
        return out

    # ---- sequential decide mode --------------------------------------------------------
    def plan(self, epsilon: float) -> SequentialPlan:
        key = float(epsilon)
        if key not in self._plans:
            self._plans[key] = SequentialPlan.build(epsilon, self.sigma, self.alpha, self.max_samples,
                                                    self.first_look, self.growth, self.model.num_classes,
                                                    tau_margin=self.noise.margin)
        return self._plans[key]

    def decide(self, x: Batch, epsilon: float, seed: int = 0) -> Certificate:
        return self.decide_batch(np.asarray(x)[None], [seed], epsilon)[0]

    def decide_batch(self, X: Batch, seeds: Sequence[int], epsilon: float) -> list[Certificate]:
        """Decide, per input, whether the smoothed l2 radius is >= epsilon.

        Samples in growing looks (``SequentialPlan``) and stops each input as soon as
        its top count crosses the accept or reject threshold. ``certified`` is wrong
        with probability <= alpha (accounting in SequentialPlan's docstring), the same
        guarantee CERTIFY gives at alpha. Inputs still undecided at max_samples are
        reported not certified with reason ``budget``: that withholds a certificate,
        it never makes a wrong one. All inputs' noise goes through the model together.

        Latency budget: when ``max_latency_ms`` has passed before a look (after the
        first), the inputs still undecided stop there with reason ``deadline`` and are
        not certified, so one hard input cannot hold up its micro-batch. This spends no
        alpha: a wrong certificate needs some look r at which a count crosses accept[r],
        and SequentialPlan's union bound already covers every look of the full plan, so
        stopping earlier (by the clock or by anything else) only removes looks at which
        a certificate could have been made. The radius reported with it is the
        Clopper-Pearson bound at the last look done, inside the same union. The looks
        done are recorded as ``extra.max_looks``, so a replay stops at the same look
        (``max_looks``) and recomputes the certificate exactly without the clock.
        """
        t0 = time.perf_counter()
        plan = self.plan(epsilon)
        x, gens = self._prepare(X, seeds)
        B, K = len(x), self.model.num_classes
        counts = np.zeros((B, K), dtype=np.int64)
        done = np.zeros(B, dtype=bool)
        outcome = np.full(B, "budget", dtype=object)
        look_idx = np.full(B, len(plan.looks) - 1)
        used = np.zeros(B, dtype=np.int64)
        faults: dict[int, str] = {}
        prev = 0
        for r, n_r in enumerate(plan.looks):
            active = np.flatnonzero(~done)
            if len(active) == 0:
                break
            if r >= 1 and self._out_of_time(r, t0):
                outcome[active], look_idx[active], done[active] = "deadline", r - 1, True
                break
            draws = np.zeros(B, dtype=np.int64)
            draws[active] = n_r - prev
            got, bad = self._count(x[active], [gens[i] for i in active], draws[active])
            counts[active] += got
            used[active] = n_r
            for k, why in bad.items():  # a broken output ends that input's sampling
                faults[int(active[k])] = why
            top = counts[active].max(axis=1)
            acc, rej = top >= plan.accept[r], top <= plan.reject[r]
            acc[list(bad)] = rej[list(bad)] = False
            futile = top <= plan.futile[r]  # certificate out of reach within the budget
            outcome[active[acc]] = "certified"
            outcome[active[futile & ~acc]] = "budget"
            outcome[active[rej & ~acc]] = "below_epsilon"
            broken = np.zeros(len(active), dtype=bool)
            broken[list(bad)] = True
            finished = active[acc | rej | futile | broken]
            done[finished] = True
            look_idx[finished] = r
            prev = n_r
        tops = counts.argmax(axis=1)
        alphas = np.asarray(plan.alphas)[look_idx]
        p_lo = np.atleast_1d(clopper_pearson_lower(counts[np.arange(B), tops], used, alphas))  # one vectorised call
        p_lo = np.maximum(p_lo - self.noise.margin, 0.0)
        radii = np.atleast_1d(radius_from_p(p_lo, self.sigma))
        out = []
        share = self._share_ms(t0, B)
        for i in range(B):
            if i in faults:
                out.append(self._fault("decide", share, seeds[i], faults[i], int(used[i]), epsilon=float(epsilon),
                                       certified=False))
                continue
            r, n_i, top, radius = int(look_idx[i]), int(used[i]), int(tops[i]), float(radii[i])
            abstain = radius <= 0.0
            certified = outcome[i] == "certified"
            limit = {"max_looks": r + 1, "latency_budget_ms": self.max_latency_ms} if outcome[i] == "deadline" else {}
            out.append(self._cert(
                "decide", share, seeds[i], radius=0.0 if abstain else radius, abstained=abstain,
                predicted_class=None if abstain else top, p_lower=float(p_lo[i]), n_samples=n_i,
                epsilon=float(epsilon), certified=bool(certified), reason=None if certified else str(outcome[i]),
                extra={"looks": r + 1, "alpha_look": plan.alphas[r], "tau": plan.tau,
                       "selection": plan.selection, "max_samples": self.max_samples,
                       "first_look": self.first_look, "growth": self.growth, "batch_size": self.batch_size,
                       **limit}))
        return out

    def _out_of_time(self, look: int, t0: float) -> bool:
        """Whether look ``look`` must not start: past ``max_looks`` or ``max_latency_ms``."""
        if self.max_looks is not None and look >= self.max_looks:
            return True
        return self.max_latency_ms is not None and (time.perf_counter() - t0) * 1e3 >= self.max_latency_ms

    def _overlaps(self, x: torch.Tensor, draws: np.ndarray) -> bool:
        """``overlap``, or if None: whether drawing ahead on a helper thread pays here.

        It needs a core torch does not use (the stage's torch_threads, default 1), and
        pieces big enough that the helper spends its time in torch's kernels, which
        release the GIL, rather than in the Python around each draw: from OVERLAP_MIN
        coordinates in an input's draws of this count, capped at one piece (batch_size
        rows), on average over the inputs. Below that, each piece's few microseconds of
        Python contend for the GIL with the model call's own and the overlap costs more
        than it hides (bench/bench_physical.py measures it against ``overlap`` False side
        by side: ``ratio_overlap_off``)."""
        if self.overlap is not None:
            return self.overlap
        if len(draws) == 0 or torch.get_num_threads() >= _CORES:
            return False
        rows = float(np.mean(np.minimum(draws, self.batch_size)))
        return rows * math.prod(x.shape[1:]) >= OVERLAP_MIN


_pools: dict[int, ThreadPoolExecutor] = {}


def _noise_pool() -> ThreadPoolExecutor:
    """The process's noise-drawing thread (one per process id: a forked child gets its own,
    as the parent's thread does not exist there)."""
    pool = _pools.get(os.getpid())
    if pool is None:
        pool = _pools[os.getpid()] = ThreadPoolExecutor(1, thread_name_prefix="riskpipe-noise")
    return pool


def _ahead(items: Iterator[T], pool: ThreadPoolExecutor) -> Iterator[T]:
    """``items``, each computed on ``pool`` while the caller works on the one before.
    Nothing runs on after the caller stops early: the pending item is awaited."""
    pending = pool.submit(next, items, None)
    try:
        while (item := pending.result()) is not None:
            pending = pool.submit(next, items, None)
            yield item
    finally:
        pending.cancel() or pending.exception()
