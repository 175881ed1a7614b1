"""Option types the command modules share (light: click only, so ``--help`` stays cheap)."""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloat(click.ParamType):
    """A finite float above ``low`` (at least ``low`` with ``closed``): click's FloatRange
    lets nan through (every comparison with it is false) and inf."""

    name = "float"

    def __init__(self, low: float, *, closed: bool) -> None:
        self.low, self.closed = low, closed

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x) or x < self.low or (x == self.low and not self.closed):
            self.fail(f"{value} is not a finite number {'>=' if self.closed else '>'} {self.low:g}", param, ctx)
        return x


class Endpoint(click.ParamType):
    """``--source`` / ``--sink``: ``jsonl:PATH`` (a file or a directory of JSON lines) or
    ``kafka`` (the config's broker, as when the option is not given). Anything else is
    refused: an unknown form fell back to Kafka, so a typo waited on a broker (or, with one
    on 127.0.0.1:9092, published there) instead of writing the intended files."""

    name = "jsonl:PATH|kafka"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | None:
        if value == "kafka":
            return None
        if isinstance(value, str) and value.startswith("jsonl:") and value[len("jsonl:"):].strip():
            return value
        self.fail(f"{value!r} is neither jsonl:PATH nor kafka", param, ctx)
