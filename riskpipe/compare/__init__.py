"""``riskpipe compare``: certification families side by side on one model and data set
(certified accuracy, time, memory, parallelism), rendered as a report card."""

from riskpipe.compare.card import FORMATS, render
from riskpipe.compare.runner import DEFAULT_GRID, METHODS, CompareConfig, certified_accuracy, run_compare

__all__ = ["DEFAULT_GRID", "FORMATS", "METHODS", "CompareConfig", "certified_accuracy", "render", "run_compare"]
