"""Report figures (through riskpipe.render), as base64 PNG for inline ``<img>`` tags."""

from __future__ import annotations

from matplotlib.ticker import MaxNLocator

from riskpipe.decisions import DECISIONS
from riskpipe.render import b64, png, pyplot

plt = pyplot()

COLOURS = {"allow": "#2e7d32", "review": "#f9a825", "block": "#c62828"}


def _png(fig) -> str:
    return b64(png(fig, dpi=96))


def decisions_over_time(series: list[dict], bucket: str) -> str | None:
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 3))
    x = range(len(series))
    bottom = [0] * len(series)
    for kind in DECISIONS:
        vals = [row[kind] for row in series]
        ax.bar(x, vals, bottom=bottom, color=COLOURS[kind], label=kind, width=0.85)
        bottom = [b + v for b, v in zip(bottom, vals)]
    step = max(1, len(series) // 10)
    ax.set_xticks(list(x)[::step], [row["t"] for row in series][::step], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"decisions per {bucket}")
    ax.legend(loc="upper left", fontsize=8, ncols=3)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def histogram(hist: dict | None, xlabel: str, mark: float | None = None, mark_label: str = "") -> str | None:
    """A pre-binned histogram (``edges``, ``counts``), with an optional dashed marker line."""
    if not hist or not sum(hist["counts"]):
        return None
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.stairs(hist["counts"], hist["edges"], fill=True, color="#1565c0", alpha=0.85)
    if mark is not None:
        ax.axvline(mark, color="#c62828", linestyle="--", label=mark_label)
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("decisions")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def radius_histogram(group: dict) -> str | None:
    eps = group.get("epsilon")
    return histogram(group.get("histogram"), f"certified radius in the threat norm ({group.get('norm')}); "
                     "0 = no certificate", eps, f"epsilon = {eps:g}" if eps is not None else "")


def counts_bar(counts: dict, xlabel: str, colour: str = "#6a1b9a") -> str | None:
    if not counts:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(counts) + 1))
    names = list(counts)[::-1]
    ax.barh(names, [counts[n] for n in names], color=colour)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def review_times(minutes: list[float]) -> str | None:
    if not minutes:
        return None
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.hist(minutes, bins=min(30, max(5, len(minutes) // 2)), color="#00838f")
    ax.set_xlabel("minutes from decision to verdict")
    ax.set_ylabel("verdicts")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def all_figures(data: dict) -> dict:
    return {
        "decisions": decisions_over_time(data["decisions"]["series"], data["decisions"]["bucket"]),
        "radius": [radius_histogram(g) for g in data["radius"]["groups"]],
        "p_lower": [histogram(g["histogram"], f"lower confidence bound on p_A, model {g['model']}", 0.5,
                              "1/2: abstain at or below") for g in data["certificates"]["p_lower"]],
        "dlq": counts_bar(data["dlq"]["by_reason"], "dead letters"),
        "review_times": review_times(data["review"]["minutes_values"]),
    }
