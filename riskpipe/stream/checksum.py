"""Which CRC-32C implementation kafka-python uses for record batches.

kafka-python checksums every produced and fetched record batch with CRC-32C. It
uses the ``crc32c`` C extension when it can import it and otherwise falls back to
a pure-Python loop (6–9 MB/s, holding the GIL in the sender thread), which halved
the stage's broker throughput in measurements (issue 15). The extension is a
dependency; this module says at start-up which implementation is active, so a
broken install is visible in the log and in ``riskpipe_kafka_crc32c_info``.
"""

from __future__ import annotations

import logging

import crc32c
from kafka.record import util

log = logging.getLogger("riskpipe.stream")

PURE_PYTHON = "pure-python"


def implementation_of(fn) -> str:
    """Name the CRC-32C function ``fn``: ``crc32c-hardware``, ``crc32c-software``
    (the C extension without SSE4.2/ARMv8 CRC instructions) or ``pure-python``."""
    module = getattr(fn, "__module__", None) or ""
    if module.split(".")[0] != "crc32c":
        return PURE_PYTHON

    return "crc32c-hardware" if getattr(crc32c, "hardware_based", False) else "crc32c-software"


def active_function():
    """The function kafka-python's record batches call (bound as a default argument
    of ``calc_crc32c`` at import time, so this reads what is really in use)."""

    defaults = getattr(util.calc_crc32c, "__defaults__", None) or ()
    return defaults[0] if defaults else getattr(util, "_crc32c", util.calc_crc32c)


def check_kafka_crc32c(metrics=None, fn=None) -> str:
    """Log (and export, with ``metrics``) the active implementation; warn loudly when
    it is the pure-Python fallback. Returns the implementation name."""
    impl = implementation_of(fn if fn is not None else active_function())
    if impl == PURE_PYTHON:
        log.warning("kafka-python is computing CRC-32C in pure Python (6-9 MB/s, holds the GIL): "
                    "broker throughput will be about half; install the 'crc32c' package "
                    "(a riskpipe dependency) in this environment")
    else:
        log.info("kafka-python CRC-32C implementation: %s", impl)
    if metrics is not None:
        metrics.set_kafka_crc32c(impl)
    return impl
