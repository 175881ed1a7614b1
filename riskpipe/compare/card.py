"""Render the comparison as a report card: HTML (plots embedded), Markdown, JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

from riskpipe.paths import remove_stale
from riskpipe.render import data_uri, environment, png, pyplot

FORMATS = ("html", "md", "json")
_FIGURE = re.compile(r"compare-[a-z0-9_]+\.png")  # the Markdown card's plots, beside it

THEOREM2 = ("Radii of different norms are compared only after the Theorem 2 conversion: an l_p certificate "
            "of radius r covers an l_q attacker out to r_q = min(d^(1/q - 1/p), 1) * r (d = input dimension). "
            "Smoothing and Lipschitz certify l2 radii, IBP and trees certify l_inf; an l_inf radius r is an l2 radius "
            "r "
            "(the l2 ball lies in the l_inf box) and an l2 radius r is an l_inf radius r / sqrt(d).")
SCOPE = ("A certificate bounds the distance to the nearest class-changing input; it says nothing about whether "
         "the input is clean (adversarial inputs can be certified too). Smoothing certifies the smoothed "
         "classifier at level alpha; IBP, Lipschitz and trees are deterministic bounds on the model as deployed "
         "(trees: exact for one tree, conservative for ensembles).")


def report_file(rel: str) -> bool:
    """Whether ``rel`` (a path under --out, with ``/``) is a file ``render`` writes."""
    return rel in {f"compare.{f}" for f in FORMATS} or _FIGURE.fullmatch(rel) is not None


def plots(result: dict) -> dict[str, bytes]:
    """PNG bytes per plot name."""
    plt = pyplot()
    cfg = result["config"]
    out = {}
    norms = cfg["norms"]
    fig, axes = plt.subplots(1, len(norms), figsize=(5.5 * len(norms), 4), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        grid = cfg["eps_grid"][norm]
        for m in result["models"]:
            for run in m["methods"]:
                if run.get("unavailable"):
                    continue
                ax.plot(grid, run["certified_accuracy"][norm], marker="o",
                        label=f"{m['spec']} · {run['method']}")
            ax.plot(grid, m["pgd_accuracy"][norm], linestyle=":", color="grey")
        ax.set_xlabel(f"epsilon ({norm}, after Theorem 2 conversion)")
        ax.set_ylabel("certified accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    out["certified_accuracy"] = png(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for method, sw in result["sweeps"].items():
        if not isinstance(sw, dict):
            continue
        a1.plot([r["batch_size"] for r in sw["batch"]], [r["ms_per_input"] for r in sw["batch"]], marker="o",
                label=method)
        a2.plot([r["params"] for r in sw["width"]], [r["ms_per_input"] for r in sw["width"]], marker="o",
                label=method)
    for ax, xl in ((a1, "batch size (inputs per call)"), (a2, "parameters (demo CNN width sweep)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("ms per input")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out["cost"] = png(fig)
    return out


def render(result: dict, out_dir: str | Path, formats=FORMATS) -> dict[str, Path]:
    """Write the card in each format to ``out_dir``; returns the paths written. The files of
    an earlier card there that this one does not write again are removed (``remove_stale``)."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"format: {bad} not among {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    figures: list[Path] = []  # the Markdown card's plots
    ctx = {"r": result, "theorem2": THEOREM2, "scope": SCOPE}
    if "json" in formats:
        p = out / "compare.json"
        p.write_text(json.dumps({**result, "notes": {"theorem2": THEOREM2, "scope": SCOPE}}, indent=2,
                                sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
        written["json"] = p
    if "html" in formats or "md" in formats:
        pngs = plots(result)
        if "html" in formats:
            imgs = {k: data_uri(v) for k, v in pngs.items()}
            p = out / "compare.html"
            p.write_text(environment("riskpipe.compare").get_template("card.html.j2").render(**ctx, img=imgs),
                         encoding="utf-8")
            written["html"] = p
        if "md" in formats:
            imgs = {}
            for k, v in pngs.items():
                (out / f"compare-{k}.png").write_bytes(v)
                imgs[k] = f"compare-{k}.png"
                figures.append(out / imgs[k])
            p = out / "compare.md"
            template = environment("riskpipe.compare", autoescape=False).get_template("card.md.j2")
            p.write_text(template.render(**ctx, img=imgs), encoding="utf-8")
            written["md"] = p
    remove_stale(out, [*written.values(), *figures], report_file)
    return written
