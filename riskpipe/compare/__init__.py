"""``riskpipe compare``: certification families side by side on one model and data set
(certified accuracy, time, memory, parallelism), rendered as a report card.

Names load on first use (PEP 562), so ``riskpipe.compare.defaults`` can be read
without importing torch and matplotlib."""

import importlib

_EXPORTS = {
    "DEFAULT_GRID": "riskpipe.compare.defaults",
    "DEFAULT_METHODS": "riskpipe.compare.defaults",
    "FORMATS": "riskpipe.compare.card",
    "render": "riskpipe.compare.card",
    "CompareConfig": "riskpipe.compare.runner",
    "certified_accuracy": "riskpipe.compare.runner",
    "run_compare": "riskpipe.compare.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
