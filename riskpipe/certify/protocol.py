"""What every certification family offers, so no caller branches on a method name.

``Certifier`` is the one protocol (the factory returns it; the conformance suite checks
every member is there and agrees with the family's registry entry); ``CertifierBase``
gives the defaults a family may keep. A family declares ``method``, the ``norm`` its radii are in and the ``modes`` it
supports; ``run(mode, X, seeds, epsilon)`` reaches the mode's batch method and
refuses a mode the family does not have, naming it. ``prepare()`` does one-time
work (e.g. Lipschitz constants) so that timings can report it apart, and
``classify`` gives the classes of the classifier the certificates speak about (the
model, or the smoothed classifier), ``admissible`` moves a perturbed input to one the
certifier accepts (the conformance suite's attack uses both); ``check_inputs`` refuses
inputs the certifier cannot speak about (e.g. off the sound sampler's grid) before any
work is done; ``inputs_per_call`` is how many inputs a caller should hand over at once
(a smoothing input costs thousands of model evaluations, a bound input one pass);
``noise_sigma`` is the scale of the Gaussian noise the classifier of ``classify``
averages over (None: it is the model itself), so an attack can aim at that classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeAlias, runtime_checkable

import numpy as np

from riskpipe.certify.certificate import Certificate

if TYPE_CHECKING:
    import torch
    from numpy.typing import ArrayLike

    from riskpipe.models.base import Model

    Batch: TypeAlias = ArrayLike | torch.Tensor  # inputs (B, *input_shape): an array, a tensor or nested lists

# A "bound" certificate is what certify mode returns for a deterministic family.
_ALIASES = {"bound": "certify"}


@runtime_checkable
class Certifier(Protocol):
    """Every member a caller may use; a family class has them all (``CertifierBase``)."""

    @property
    def method(self) -> str: ...

    @property
    def norm(self) -> str: ...

    @property
    def modes(self) -> tuple[str, ...]: ...

    @property
    def inputs_per_call(self) -> int: ...

    @property
    def noise_sigma(self) -> float | None: ...

    def run(self, mode: str, X: Batch, seeds: Sequence[int], epsilon: float | None = None) -> list[Certificate]: ...

    def certify_batch(self, X: Batch, seeds: Sequence[int]) -> list[Certificate]: ...

    def prepare(self) -> None: ...

    def check_inputs(self, X: Batch) -> None: ...

    def classify(self, X: Batch, seeds: Sequence[int]) -> list[int | None]: ...

    def admissible(self, x: np.ndarray, x_adv: np.ndarray) -> np.ndarray: ...


# The protocol's members by name (the conformance suite names a missing one).
MEMBERS: tuple[str, ...] = tuple(n for n in vars(Certifier) if not n.startswith("_"))


class CertifierBase:
    """The defaults of ``Certifier``; a family sets its class variables (they agree with its
    registry entry) and writes ``certify_batch`` and the batch method of each other mode."""

    method: ClassVar[str]
    modes: ClassVar[tuple[str, ...]]
    inputs_per_call: ClassVar[int] = 512
    norm: str
    model: Model
    # the mode methods a family has (``modes``), reached through ``run``
    certify_batch: Callable[[Batch, Sequence[int]], list[Certificate]]
    decide_batch: Callable[[Batch, Sequence[int], float], list[Certificate]]

    def run(self, mode: str, X: Batch, seeds: Sequence[int], epsilon: float | None = None) -> list[Certificate]:
        """Certificates for ``X`` in ``mode`` (one of ``modes``); ``epsilon`` is the
        decide-mode target radius in the certificate's norm."""
        mode = _ALIASES.get(mode, mode)
        if mode not in self.modes:
            raise ValueError(f"mode: {self.method} supports {', '.join(self.modes)}, not {mode!r}")
        if mode == "decide":
            if epsilon is None:
                raise ValueError("epsilon: decide mode needs a target radius")
            return self.decide_batch(X, seeds, float(epsilon))
        batch: Callable[[Batch, Sequence[int]], list[Certificate]] = getattr(self, f"{mode}_batch")
        return batch(X, seeds)

    @property
    def noise_sigma(self) -> float | None:
        """The scale of the Gaussian noise ``classify`` averages over (None: the model itself)."""
        return None

    def prepare(self) -> None:
        """One-time work before the first input (none by default)."""

    def check_inputs(self, X: Batch) -> None:
        """Raise ValueError for inputs this certifier cannot certify (all valid inputs by default)."""

    def classify(self, X: Batch, seeds: Sequence[int]) -> list[int | None]:
        """The classes of the classifier the certificates speak about (here: the model itself)."""
        return [int(c) for c in self.model.predict(np.asarray(X, dtype=np.float32))]

    def admissible(self, x: np.ndarray, x_adv: np.ndarray) -> np.ndarray:
        """``x_adv`` moved to an input this certifier takes, no farther from ``x`` in any norm."""
        return x_adv
