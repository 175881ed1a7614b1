"""Where the noise of randomized smoothing comes from: ``gaussian`` (the usual float
practice) or ``sound`` (exact on a quantisation grid).

``gaussian``: float32 N(0, sigma^2) noise is added to the float input. The radius
sigma * Phi^-1(p_A) holds for real arithmetic, but the sample the model sees is the
*rounded* sum x + e, whose distribution is not the Gaussian the theorem speaks about;
Voráček & Hein (ICLR 2023) build classifiers whose certificates are wrong because of
it. Certificates made this way say so in their scope.

``sound`` (after Voráček & Hein's rounded-Gaussian sampler). Soundness argument:

1. Inputs lie on a grid ``origin + h * Z`` per coordinate (8-bit images: h = (hi -
   lo) / 255 of the model's value range); an input off the grid is refused
   (``GridError``), never snapped silently. Write an input as its integer vector a.
2. Let e ~ N(0, sigma^2 I) be real Gaussian noise and R(y) = origin + h * round((y -
   origin) / h) rounding to the grid. The base classifier f' = f o R is an ordinary
   (deterministic) classifier of real inputs, so Cohen et al.'s theorem holds for it
   exactly: if P(f'(x + e) = A) >= p > 1/2 then the smoothed f' returns A on the
   whole l2 ball of radius sigma * Phi^-1(p) around x (in the units of the value
   range) -- in particular at every grid point in that ball, which is every input
   the stage accepts.
3. For x on the grid, R(x + e) = origin + h * (a + round(e / h)): the noise the
   model sees is the integer j = round(e / h) per coordinate, with P(j) =
   Phi((j + 1/2) h / sigma) - Phi((j - 1/2) h / sigma). The sum a + j is integer
   arithmetic (exact), and origin + h * (a + j) is one fixed float per integer, so
   the model's input is a deterministic function of the lattice point: float
   rounding no longer enters the distribution.
4. j is drawn by inverse-CDF lookup: j = #{i : T_i <= u} - J for a uniform integer u
   in [0, 2^62) (torch's generator; the only assumption is that its bits are fair
   coins) against the
   integer table T_i = ceil(2^62 * Phi((i + 1/2) h / sigma)), i = -J .. J-1, computed
   exactly (``riskpipe.certify.normal_table``: equal, entry for entry, to evaluating it
   in 60-digit arithmetic), with J h >= 10 sigma; the two end bins also take the
   tails. The table has 2J = 20 sigma / h entries: at most ``MAX_TABLE_ENTRIES``, so a
   grid too fine for its sigma is refused before anything is built. This *implemented*
   distribution q is exactly specified by the table.
   Per coordinate, |q_j - p_j| < 2^-62 for each of the 2J + 1 bins, and the end
   bins carry at most the tail mass 2 Phi(-(J + 1/2) h / sigma) extra, so the
   total-variation distance between one noise vector of q and of the rounded
   Gaussian is at most  eta = d * ((2J + 1) * 2^-62 + 2 Phi(-(J + 1/2) h / sigma)).
5. Counts are exact binomials of the implemented probability q_A, and
   |q_A - p_A| <= eta for every event. So a lower confidence bound on q_A minus eta
   is a lower bound on p_A at the same level (``margin``), and a test of p_A >= tau
   is a test of q_A >= tau + eta. eta is below 1e-10 for any input the stage takes
   (d up to 10^7); it is subtracted anyway, so no step of the argument is
   approximate.

How u is drawn (``SoundSampler.draw``), without changing its law: u's top 16 bits b
come first, a quarter of one uniform 64-bit word of the generator per coordinate
(``random_(-2^63, None)``: all 64 bits). Most values of b (all but
about 2J of the 65536) leave no threshold inside [b 2^46, (b + 1) 2^46), so j is fixed
by b alone and read from a 65536-entry table. For a coordinate whose b does hold a
threshold, its low 46 bits r are drawn (uniform in [0, 2^46), independent of b) and
j is looked up for u = b 2^46 + r. u is then uniform on [0, 2^62) exactly as if all 62
bits were drawn at once, and j the same function of it; only the order in which the
generator's bits are used differs, and that order is fixed by the seed (same seed,
same noise, same certificate). r uses a power-of-two range, so torch's
``random_(0, 2^46)`` (a 64-bit word modulo 2^46) is exactly uniform.

Both samplers draw every input's noise from that input's own generator, so one
input's samples never depend on its batch-mates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, overload

import numpy as np
import torch
from scipy.stats import norm

from riskpipe.certify.normal_table import MAX_TABLE_ENTRIES, check_table, table_entries, thresholds  # noqa: F401

if TYPE_CHECKING:
    from riskpipe.models.base import Model

SAMPLERS = ("gaussian", "sound")
_BITS = 62
_Q = 1 << _BITS
_TAIL_SIGMAS = 10.0  # J h >= 10 sigma (riskpipe.certify.normal_table.TAIL_SIGMAS)
_GRID_TOLERANCE = 1e-3  # in grid steps: float inputs within this of a grid point are on it
F32_SLACK = 2.0 ** -21  # relative: a few float32 roundings of lo + k * h (store, scale, shift)
_BUCKET_BITS = 16  # inverse-CDF lookup: the top bits of u index a table of threshold counts
_LOW_BITS = _BITS - _BUCKET_BITS
_HARD = -(1 << 31)  # bucket code: a threshold lies inside the bucket (never a j: J <= 2^20)
_VALUE_TABLE_MAX = 1 << 22  # perturb: lattice floats by table lookup when the batch spans fewer points
_UINT16 = getattr(torch, "uint16", None)  # the bucket index read straight from the words (torch >= 2.3)
_SCAN = 8  # draw: rows j is folded into to find the rare hard codes by a column-wise minimum
_SCAN_MIN = 1 << 15  # ... from this many coordinates on (below, its extra calls cost more than it saves)


class GridError(ValueError):
    """An input that is not on the sound sampler's grid (names the coordinate and value)."""


@dataclass
class GaussianSampler:
    """Float Gaussian noise added to the float input (not floating-point sound)."""

    sigma: float
    name: str = "gaussian"
    margin: float = 0.0  # no correction: this sampler makes no floating-point claim
    on_grid: ClassVar[bool] = False  # takes any (finite) input: nothing for ``prepare`` to check

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def new_buffer(self, n: int, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        return torch.empty((n,) + shape, device=device)

    def draw(self, out: torch.Tensor, gen: torch.Generator) -> None:
        out.normal_(0.0, self.sigma, generator=gen)

    def perturb(self, base: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        noise += base
        return noise

    def admissible(self, x: np.ndarray, x_adv: np.ndarray) -> np.ndarray:
        return x_adv

    def describe(self) -> dict[str, Any]:
        return {"sampler": self.name}


@lru_cache(maxsize=32)
def _table(sigma_over_h: float) -> tuple[np.ndarray, int, float]:
    """(thresholds T_i as int64, J, per-coordinate TV bound) for noise sigma / h grid steps."""

    J = table_entries(sigma_over_h, _TAIL_SIGMAS) // 2
    tail = 2 * float(norm.sf((J + 0.5) / sigma_over_h))
    return thresholds(sigma_over_h, J, _BITS), J, (2 * J + 1) / _Q + tail


@dataclass
class SoundSampler:
    """Discretised Gaussian noise on the input grid, drawn from uniform integers (see the
    module docstring for why the certificate then holds in floating point)."""

    sigma: float
    value_range: tuple[Any, Any] | None  # the model's: (lo, hi) scalars, per-feature arrays, or None
    input_dim: int
    grid_levels: int = 255
    grid_step: float | None = None
    name: str = "sound"
    step: float = field(init=False)
    origin: float = field(init=False)
    on_grid: ClassVar[bool] = True  # inputs must lie on the grid: ``prepare`` checks them

    def __post_init__(self) -> None:
        scalar = self.value_range is not None and all(np.ndim(v) == 0 for v in self.value_range)
        if scalar and self.value_range is not None:
            lo, hi = (float(v) for v in self.value_range)
        else:
            lo, hi = -math.inf, math.inf
        check_grid(self.grid_levels, self.grid_step)
        if self.grid_step is not None:
            self.step = float(self.grid_step)
        else:
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("grid_step: the model's value range is undeclared, per feature or unbounded; "
                                 "declare the grid step (certifier.grid_step) for the sound sampler")
            self.step = (hi - lo) / int(self.grid_levels)
        self.origin = lo if math.isfinite(lo) else 0.0
        check_table(self.sigma, self.step, _TAIL_SIGMAS)
        self._thresholds, self.J, tv = _table(self.sigma / self.step)
        self.margin = self.input_dim * tv
        self._device_tables: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._value_tables: dict[str, tuple[int, torch.Tensor]] = {}  # device -> (first k, floats of k..)
        self._hard_share = 0.0  # share of the 2^16 buckets that hold a threshold (set with the tables)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs' integer grid coordinates (int64); GridError for an input off the grid."""
        xd = x.double()
        z = (xd - self.origin) / self.step
        a = torch.round(z)
        slack = float32_slack(xd.abs(), self.origin) / self.step
        off = (z - a).abs() > torch.clamp(slack, min=_GRID_TOLERANCE)
        if bool(off.any()):
            idx = torch.nonzero(off)[0].tolist()
            raise GridError(f"input: coordinate {idx[1:]} of input {idx[0]} is {float(x[tuple(idx)]):.9g}, not on "
                            f"the sound sampler's grid {self.origin:g} + k * {self.step:.9g}")
        fits = a.numel() == 0 or float(a.abs().max()) + self.J < 2 ** 31  # a + j stays an int32
        return a.to(torch.int32 if fits else torch.int64)

    def new_buffer(self, n: int, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        return torch.empty((n,) + shape, dtype=torch.int32, device=device)

    def admissible(self, x: np.ndarray, x_adv: np.ndarray) -> np.ndarray:
        """The grid point of ``x_adv`` rounded towards ``x`` per coordinate (no farther in any norm)."""
        a = np.round((np.asarray(x, np.float64) - self.origin) / self.step)
        k = a + np.trunc((np.asarray(x_adv, np.float64) - self.origin) / self.step - a)
        return (self.origin + self.step * k).astype(np.float32)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(thresholds, j at each bucket's first u, whether a threshold lies inside the bucket,
        and per bucket as int32 its j or ``_HARD`` where a threshold lies inside)."""
        key = str(device)
        if key not in self._device_tables:
            t = self._thresholds
            width = 1 << (_BITS - _BUCKET_BITS)
            starts = np.arange(1 << _BUCKET_BITS, dtype=np.int64) * width
            first = np.searchsorted(t, starts, side="right")  # thresholds <= each bucket's first u
            last = np.searchsorted(t, starts + (width - 1), side="right")  # ... <= its last u
            code = np.where(last != first, _HARD, first - self.J).astype(np.int32)
            self._hard_share = float(np.mean(last != first))
            t_t, first_t, inside_t, code_t = (torch.from_numpy(a).to(device)
                                              for a in (t, first - self.J, last != first, code))
            self._device_tables[key] = t_t, first_t, inside_t, code_t
        return self._device_tables[key]

    def draw(self, out: torch.Tensor, gen: torch.Generator) -> None:
        """Integer noise j into ``out`` (int32) by inverse-CDF lookup of uniform 62-bit u,
        drawn top 16 bits first and the low 46 bits only where they matter (module docstring).
        The bucket codes are gathered straight into ``out``; the hard ones are then redrawn in
        ascending position order, so the generator's bits go where they always went."""
        table, _first, _inside, code = self._tables(out.device)
        flat = out.view(-1)
        n = flat.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=out.device).random_(-(1 << 63), None,
                                                                                     generator=gen)
        bucket = torch.empty(n, dtype=torch.int32, device=out.device)
        if _UINT16 is not None:  # torch >= 2.3: the 16-bit words unsigned, in one pass
            bucket.copy_(words.view(_UINT16)[:n])
        else:
            bucket.copy_(words.view(torch.int16)[:n]).bitwise_and_((1 << _BUCKET_BITS) - 1)
        torch.index_select(code, 0, bucket, out=flat)
        hard = self._hard_positions(flat)
        if hard.numel():
            u = torch.empty(hard.numel(), dtype=torch.int64, device=out.device).random_(0, 1 << _LOW_BITS,
                                                                                         generator=gen)
            u |= bucket.index_select(0, hard).to(torch.int64) << _LOW_BITS
            flat.index_copy_(0, hard, torch.searchsorted(table, u, right=True, out_int32=True).sub_(self.J))

    def _hard_positions(self, j: torch.Tensor) -> torch.Tensor:
        """Ascending positions of ``_HARD`` (the int32 minimum) in the flat int32 ``j``. Where
        hard buckets are rare (under 1% of coordinates on the 8-bit grid at sigma 0.25), j is
        folded into ``_SCAN`` rows and only the columns whose minimum is ``_HARD`` (one
        vectorised reduction) are searched: a compare and ``nonzero`` over every coordinate
        cost more than the gather that made j."""
        n = j.numel()
        if self._hard_share * _SCAN > 0.25 or n < _SCAN_MIN:  # common, or too few for the fold to pay
            return torch.nonzero(j == _HARD).squeeze(1)
        cols = n // _SCAN
        hit = torch.nonzero(j[: cols * _SCAN].view(_SCAN, cols).amin(0) == _HARD).squeeze(1)
        cand = (hit + torch.arange(0, cols * _SCAN, cols, device=j.device).unsqueeze(1)).view(-1)
        found = cand[j.index_select(0, cand) == _HARD]  # ascending: row r holds r * cols .. (r + 1) * cols - 1
        if cols * _SCAN == n:
            return found
        return torch.cat([found, torch.nonzero(j[cols * _SCAN:] == _HARD).squeeze(1).add_(cols * _SCAN)])

    def lookup(self, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """j = #{thresholds <= u} - J for u in [0, 2^62). Most buckets (top 16 bits of u) hold
        no threshold, so j is the bucket's count, one gather; for u in the few buckets that
        hold one (about 2J of the 65536), an exact binary search of the whole table."""
        table, first, inside, _ = self._tables(u.device)
        flat = u.reshape(-1)
        bucket = flat >> (_BITS - _BUCKET_BITS)
        hard = inside.index_select(0, bucket)
        exact = torch.searchsorted(table, flat[hard], right=True) - self.J if bool(hard.any()) else None
        j = first.index_select(0, bucket) if out is None else torch.index_select(first, 0, bucket, out=out.view(-1))
        if exact is not None:
            j[hard] = exact
        return j.view(u.shape)

    def perturb(self, base: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """origin + step * (a + j): integer sum, then one fixed float per lattice point
        (float32 of the float64 expression), read from a table of the lattice points the
        batch spans when they are few, computed per coordinate otherwise: the same floats."""
        k = noise.add_(base) if base.dtype == noise.dtype else noise.to(base.dtype).add_(base)
        if k.numel() == 0:
            return k.to(torch.float32)
        lo, hi = (int(v) for v in torch.aminmax(k))
        have = self._value_tables.get(str(k.device))
        if have is None or not have[0] <= lo <= hi < have[0] + len(have[1]):
            lo, hi = (lo, hi) if have is None else (min(lo, have[0]), max(hi, have[0] + len(have[1]) - 1))
            if hi - lo >= _VALUE_TABLE_MAX:
                return self._lattice_floats(k)
            have = lo, self._lattice_floats(torch.arange(lo, hi + 1, dtype=torch.int64, device=k.device))
            self._value_tables[str(k.device)] = have
        return have[1].index_select(0, k.sub_(have[0]).view(-1)).view(k.shape)

    def _lattice_floats(self, k: torch.Tensor) -> torch.Tensor:
        return k.to(torch.float64).mul_(self.step).add_(self.origin).to(torch.float32)

    def describe(self) -> dict[str, Any]:
        return {"sampler": self.name, "grid_step": self.step, "grid_origin": self.origin, "tv_margin": self.margin}


@overload
def float32_slack(magnitude: torch.Tensor, origin: float) -> torch.Tensor: ...
@overload
def float32_slack(magnitude: np.ndarray | float, origin: float) -> np.ndarray: ...
def float32_slack(magnitude: torch.Tensor | np.ndarray | float, origin: float) -> torch.Tensor | np.ndarray:
    """How far a float32 value of ``magnitude`` may lie from the grid point it stands for,
    in input units: its float32 representation and the arithmetic that made it (lo + (hi -
    lo) * v / 255 for a UINT8 tensor). The sampler takes inputs within this (or 1e-3 grid
    steps) of a grid point, and ``riskpipe init`` calls a reference set quantised only
    when every value lies within this of its grid (``riskpipe.survey.quantisation_grid``)."""
    if isinstance(magnitude, torch.Tensor):
        return magnitude.clamp(min=abs(origin)) * F32_SLACK
    slack: np.ndarray = np.maximum(magnitude, abs(origin)) * F32_SLACK
    return slack


def check_grid(grid_levels: int, grid_step: float | None) -> None:
    if isinstance(grid_levels, bool) or not isinstance(grid_levels, int) or grid_levels < 1:
        raise ValueError(f"grid_levels: must be an integer >= 1, got {grid_levels!r}")
    if grid_step is not None and not (math.isfinite(grid_step) and grid_step > 0):
        raise ValueError(f"grid_step: must be a finite number > 0, got {grid_step}")


Sampler = GaussianSampler | SoundSampler


def make_sampler(name: str, sigma: float, model: Model, grid_levels: int = 255, grid_step: float | None = None
                 ) -> Sampler:
    """The sampler ``name``; grid parameters are checked whatever the sampler, so a wrong one
    never waits silently for the day the sampler changes."""
    check_grid(grid_levels, grid_step)
    if name == "gaussian":
        return GaussianSampler(sigma)
    if name == "sound":
        return SoundSampler(sigma, model.value_range, int(model.input_dim), grid_levels, grid_step)
    raise ValueError(f"sampler: {name!r} is not one of {', '.join(SAMPLERS)}")
