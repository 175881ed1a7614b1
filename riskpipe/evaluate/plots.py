"""Figures of an evaluation (matplotlib, Agg backend), as PNG bytes.

One figure per question a compliance reviewer asks: where do successful adversarial
examples go, how many carry a certificate, what does a certificate-guided attacker
gain, and where does an l2 certificate stop covering an l_inf attacker.
"""

from __future__ import annotations

from riskpipe.decisions import DECISIONS
from riskpipe.render import png, pyplot

plt = pyplot()

COLORS = {"allow": "#c0392b", "review": "#f39c12", "block": "#2c3e50"}


def _png(fig) -> bytes:
    fig.tight_layout()
    return png(fig, dpi=120)


def _finish(fig, ax, summary: dict, title: str) -> bytes:
    """Title (prefixed by the policy name), legend below the axes, PNG."""
    ax.set_title(f"{summary['policy']['name']}: {title}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    return _png(fig)


def _label(a: dict) -> str:
    return f"{a['norm']} {a['epsilon']:.3g}"


def routes(summary: dict) -> bytes:
    """Stacked bars: share of clean traffic and of successful adversarial examples per route."""
    clean = summary["clean"]["routes"]["fractions"]
    attacks = [a for a in summary["attacks"]]
    labels = ["clean\n(all)"] + [("attack " if a["kind"] == "pgd" else "shift ") + _label(a) for a in attacks]
    rows = [clean] + [a["routes"]["fractions"] for a in attacks]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 3.6))
    bottom = [0.0] * len(rows)
    for d in DECISIONS:
        vals = [(r.get(d) or 0.0) for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, color=COLORS[d], label=d)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction")
    ax.set_title(f"{summary['policy']['name']}: decisions on clean traffic and on successful attacks", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    return _png(fig)


def success(summary: dict) -> bytes:
    """Attack success rate, allowed fraction and certified fraction against the PGD budget."""
    pgd = [a for a in summary["attacks"] if a["kind"] == "pgd"]
    eps = [a["epsilon"] for a in pgd]
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    ax.plot(eps, [a["success_rate"] or 0 for a in pgd], "o-", label="attack success rate")
    per_attempt = [max(1, a["attempted"]) for a in pgd]
    ax.plot(eps, [a["routes"]["counts"]["allow"] / n for a, n in zip(pgd, per_attempt)], "s-",
            color=COLORS["allow"], label="successful and allowed")
    ax.plot(eps, [a["certified"] / n for a, n in zip(pgd, per_attempt)], "^--", color="#27ae60",
            label="successful and certified (Thm 1)")
    ax.axvline(summary["policy"]["threat_epsilon"], color="grey", ls=":", label="policy epsilon")
    ax.set_xlabel(f"{summary['policy'].get('attack', 'PGD')} budget ({summary['policy']['threat_norm']})")
    ax.set_ylabel("fraction of attempts")
    ax.set_ylim(-0.02, 1.02)
    return _finish(fig, ax, summary, "attack outcome by budget")


def attackers(summary: dict) -> bytes:
    """Evasion rate per attempt: certificate-guided versus public-only attacker."""
    pgd = [a for a in summary["attacks"] if a["kind"] == "pgd" and a.get("attackers")]
    x = range(len(pgd))
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    ax.bar([i - 0.2 for i in x], [a["attackers"]["public"]["evasion_rate"] or 0 for a in pgd], 0.4,
           label="public-only (decisions topic)", color="#7f8c8d")
    ax.bar([i + 0.2 for i in x], [a["attackers"]["guided"]["evasion_rate"] or 0 for a in pgd], 0.4,
           label="guided (audit topic radii)", color="#8e44ad")
    ax.set_xticks(list(x), [_label(a) for a in pgd], fontsize=8)
    ax.set_ylabel("misclassified and allowed / attempt")
    ax.set_ylim(0, 1)
    return _finish(fig, ax, summary, "what the radii give an attacker")


def norm_shift(summary: dict) -> bytes:
    """Per norm-shift budget: inputs covered by Theorem 2, inputs a naive reading calls covered, attack success."""
    sh = [a for a in summary["attacks"] if a["kind"] == "norm_shift" and a.get("coverage")]
    x = range(len(sh))
    n = max(1, summary["clean"]["n"])
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    ax.bar([i - 0.27 for i in x], [a["coverage"]["naive_covered"] / n for a in sh], 0.27,
           label="'covered' read naively (r >= eps)", color="#bdc3c7")
    ax.bar(list(x), [a["coverage"]["covered"] / n for a in sh], 0.27, label="covered (Theorem 2)", color="#27ae60")
    ax.bar([i + 0.27 for i in x], [a["success_rate"] or 0 for a in sh], 0.27, label="attack success rate",
           color=COLORS["allow"])
    ax.set_xticks(list(x), [_label(a) for a in sh], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of inputs")
    return _finish(fig, ax, summary, f"norm shift against a {sh[0]['coverage']['cert_norm'] if sh else ''} certificate")


def comparison(summaries: list[dict]) -> bytes:
    """Across policies: reviewer workload on clean traffic against evasions at each PGD budget."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for s in summaries:
        pgd = [a for a in s["attacks"] if a["kind"] == "pgd"]
        allowed = [a["routes"]["counts"]["allow"] / max(1, a["attempted"]) for a in pgd]
        ax.plot([a["epsilon"] / s["policy"]["threat_epsilon"] for a in pgd], allowed, "o-",
                label=f"{s['policy']['name']} (clean review {100 * (s['clean']['review_rate'] or 0):.0f}%)")
    ax.set_xlabel("attack budget / policy epsilon (attack: see the report)")
    ax.set_ylabel("misclassified and allowed / attempt")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Policies compared: evasions against reviewer workload", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


FIGURES = {"routes": routes, "success": success, "attackers": attackers, "norm_shift": norm_shift}
