"""The sound sampler's fast noise path (issue 21 item 1): the bucket table agrees with the
exact lookup, draws follow the table's law and repeat under a seed, and the lattice floats
are the float64 expression's whatever path forms them."""

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from riskpipe.certify.samplers import _BUCKET_BITS, _HARD, _LOW_BITS, _SCAN_MIN, SoundSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def _sampler(sigma=0.25, levels=255, d=3072):
    return SoundSampler(sigma, (0.0, 1.0), d, levels)


@pytest.mark.parametrize("sigma,levels", [(0.25, 255), (0.5, 16), (0.12, 65535)])
def test_bucket_codes_are_the_exact_lookup_at_both_ends_of_every_bucket(sigma, levels):
    s = _sampler(sigma, levels)
    code = s._tables("cpu")[3]
    b = torch.arange(1 << _BUCKET_BITS, dtype=torch.int64)
    lo, hi = s.lookup(b << _LOW_BITS), s.lookup(((b + 1) << _LOW_BITS) - 1)
    easy = code != _HARD
    assert torch.equal(code[easy].long(), lo[easy]) and torch.equal(lo[easy], hi[easy])
    assert bool((lo[~easy] != hi[~easy]).all())  # a bucket is hard only when a threshold lies inside it


def test_draws_follow_the_tables_law_and_repeat_under_a_seed():
    s = _sampler()
    buf = s.new_buffer(1_000_003, (), "cpu")  # not a multiple of 4: the last 64-bit word is cut
    s.draw(buf, torch.Generator().manual_seed(7))
    t = s._thresholds.astype(object)
    q = np.diff(np.concatenate([[0], t, [1 << 62]])).astype(float) / 2.0 ** 62
    counts = np.bincount(buf.numpy() + s.J, minlength=2 * s.J + 1)
    assert counts.sum() == len(buf) and len(counts) == 2 * s.J + 1  # every j within [-J, J]
    big = q * len(buf) > 20
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(q[big], q[~big].sum()) * len(buf)
    assert chi2.sf(((obs - exp) ** 2 / exp).sum(), len(obs) - 1) > 1e-4
    again = s.new_buffer(1_000_003, (), "cpu")
    s.draw(again, torch.Generator().manual_seed(7))
    assert torch.equal(buf, again)


def test_lattice_floats_are_the_float64_expression_on_every_path():
    s = SoundSampler(0.25, (-1.0, 1.0), 4, 255)
    k = torch.randint(-3000, 3000, (50_000,), generator=torch.Generator().manual_seed(0))
    want = (k.double() * s.step + s.origin).float()
    a = s.prepare(want[:0].reshape(0, 4))
    assert a.dtype == torch.int32  # grid coordinates of ordinary inputs are int32
    assert torch.equal(s.perturb(k.int(), torch.zeros(len(k), dtype=torch.int32)), want)  # table path
    assert torch.equal(s.perturb(k[::7].int(), torch.zeros(len(k[::7]), dtype=torch.int32)), want[::7])  # cached
    wide = torch.tensor([0, 1 << 23, -(1 << 22)])
    assert torch.equal(s.perturb(wide.int(), torch.zeros(3, dtype=torch.int32)),
                       (wide.double() * s.step + s.origin).float())  # too wide for a table
    far = SoundSampler(1e-10, None, 2, grid_step=1e-12)
    x = torch.tensor([[1.0, 3.0]])
    a = far.prepare(x)
    assert a.dtype == torch.int64  # coordinates past int32: the sum stays exact in int64
    noise = torch.tensor([[5, -7]], dtype=torch.int32)
    assert torch.equal(far.perturb(a, noise.clone()), ((a + noise).double() * far.step + far.origin).float())


def _reference_draw(s: SoundSampler, n: int, seed: int) -> np.ndarray:
    """The module docstring's draw, written plainly: the bucket b of every coordinate from a
    quarter of a 64-bit word, then the low 46 bits of the coordinates whose bucket holds a
    threshold, in position order, and j = #{T_i <= u} - J."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None, generator=gen)
    b = words.numpy().view(np.uint16)[:n].astype(np.int64)
    t = s._thresholds
    hard = np.flatnonzero(np.searchsorted(t, b << _LOW_BITS, side="right")
                          != np.searchsorted(t, ((b + 1) << _LOW_BITS) - 1, side="right"))
    u = b << _LOW_BITS
    if len(hard):
        u[hard] |= torch.empty(len(hard), dtype=torch.int64).random_(0, 1 << _LOW_BITS, generator=gen).numpy()
    return np.searchsorted(t, u, side="right") - s.J


@pytest.mark.parametrize("sigma,levels", [(0.25, 255), (0.5, 16), (0.12, 65535)])
@pytest.mark.parametrize("shape", [(128, 3, 32, 32), (48, 3, 32, 32), (4099, 9), (5, 13), (7,), (0, 4)])
def test_draw_is_the_plain_reference_bit_for_bit(sigma, levels, shape):
    """The fast draw (codes gathered in place, hard codes found by column minima or, where
    they are common, by a full compare) uses the generator's bits exactly as the plain
    reference does: same seed, same j, whatever the shape (cut words, ragged columns)."""
    s = _sampler(sigma, levels)
    out = s.new_buffer(shape[0], shape[1:], "cpu")
    s.draw(out, torch.Generator().manual_seed(11))
    want = _reference_draw(s, out.numel(), 11)
    assert np.array_equal(out.numpy().reshape(-1), want)
    if out.numel() >= 3072:
        assert (want != np.searchsorted(s._thresholds, 0) - s.J).any()  # not a degenerate draw


def test_hard_positions_on_both_paths():
    for sigma, levels in [(0.25, 255), (0.12, 65535)]:  # rare hard buckets (column minima) and common ones
        s = _sampler(sigma, levels)
        s._tables("cpu")
        for n in (0, 1, 7, 9, 1000, _SCAN_MIN, _SCAN_MIN + 7, 3 * _SCAN_MIN + 1):
            j = torch.randint(-5, 5, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
            j[torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n // 3]] = _HARD
            j[-1:] = _HARD  # the last coordinate, in the ragged tail when n % 8 != 0
            assert torch.equal(s._hard_positions(j), torch.nonzero(j == _HARD).squeeze(1)), (sigma, n)
