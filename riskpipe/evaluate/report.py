"""Write an evaluation as JSON, Markdown and HTML (jinja2 templates, matplotlib figures).

The HTML report is one self-contained file (figures embedded as base64 PNG); the
Markdown report references the same figures written next to it as PNG files, so both
paste into a compliance report unchanged. Every table cell comes from the JSON result.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from riskpipe.evaluate import plots
from riskpipe.evaluate.harness import Settings, model_entry
from riskpipe.paths import remove_stale
from riskpipe.render import b64, class_name, entry_info, environment, input_view, pct

FORMATS = ("html", "md", "json")
STAGE_DIR = "stage"  # under --out: the stage's outputs, one stage-POLICY directory per policy
_FIGURE = re.compile(r"figures/[a-z0-9][a-z0-9._-]*\.png")  # figures/POLICY-KIND.png, figures/comparison.png
_STAGE_FILE = re.compile(rf"{STAGE_DIR}/stage-[a-z0-9][a-z0-9._-]*/[^/]+")


def report_file(rel: str) -> bool:
    """Whether ``rel`` (a path under --out, with ``/``) is a file ``write_report`` writes."""
    return rel in {f"evaluation.{f}" for f in FORMATS} or _FIGURE.fullmatch(rel) is not None


def own_file(rel: str) -> bool:
    """Whether ``rel`` is a file ``riskpipe evaluate`` writes under --out: the report's, or the stage's."""
    return report_file(rel) or _STAGE_FILE.fullmatch(rel) is not None


def _of(k: int, n: int) -> str:
    return f"{k}/{n}" + (f" ({100 * k / n:.0f}%)" if n else "")


def tables(result: dict) -> dict:
    """Rows for the report tables, formatted once for every output format."""
    overview, attacks, attackers, shift = [], [], [], []
    for s in result["policies"]:
        p, c = s["policy"], s["clean"]
        name = f"{p['name']} v{p['version']}" + (" (shadow)" if p["shadow"] else "")
        # a scaled tabular model's epsilon and budgets are of x / s: say so where the number is printed
        unit = f" of x / s, s = {p['scale']}" if p.get("scale") else ""
        threat = f"{p['threat_norm']} eps={p['threat_epsilon']:g}{unit}"
        overview.append({
            "policy": name, "threat": threat,
            "certifier": p["certifier"] + (f" sigma={p['sigma']:g} alpha={p['alpha']:g}" if p.get("sigma") else ""),
            "n": c["n"], "accuracy": pct(c["accuracy"]), "certified": pct(c["certified_fraction"]),
            "review": pct(c["review_rate"]), "block": pct(c["block_rate"]),
            "would_review": pct(c["routes"].get("would_be", {}).get("fractions", {}).get("review")),
            "elapsed": f"{s['elapsed_s']:.0f} s",
        })
        for a in s["attacks"]:
            r = a["routes"]
            row = {
                "policy": name, "attack": (p.get("attack") or "PGD") if a["kind"] == "pgd" else
                f"norm shift ({p.get('attack') or 'PGD'})",
                "budget": f"{a['norm']} {a['epsilon']:.4g}{unit} ({a['budget']})",
                "success": _of(a["successful"], a["attempted"]),
                "allow": pct(r["fractions"]["allow"]), "review": pct(r["fractions"]["review"]),
                "block": pct(r["fractions"]["block"]),
                "would_allow": pct(r.get("would_be", {}).get("fractions", {}).get("allow")),
                "certified": f"{a['certified']} ({a['certified_wrong_class']} wrong class)",
            }
            attacks.append(row)
            if a.get("attackers"):
                g, pub = a["attackers"]["guided"], a["attackers"]["public"]
                attackers.append({
                    "policy": name, "budget": row["budget"], "attempts": a["attackers"]["attempts"],
                    "public": _of(pub["evaded"], pub["attempts"]), "guided": _of(g["evaded"], g["attempts"]),
                    "gain": "n/a" if a["attackers"]["gain"] is None else f"{100 * a['attackers']['gain']:+.1f} pts",
                    "skipped": a["attackers"]["guided_skipped_out_of_reach"],
                })
            if a.get("coverage"):
                cv = a["coverage"]
                shift.append({
                    "policy": name, "budget": f"{cv['attack_norm']} {cv['epsilon']:.4g}{unit}",
                    "needed": f"{cv['cert_norm']} >= {cv['needed_cert_radius']:.3g}{unit}",
                    "naive": _of(cv["naive_covered"], c["n"]), "covered": _of(cv["covered"], c["n"]),
                    "silent": "yes" if cv["certificate_silent"] else "no",
                    "success": row["success"],
                    "misread": f"{cv['successful_on_misread']} ({cv['successful_on_misread_allowed']} allowed)",
                })
    return {"overview": overview, "attacks": attacks, "attackers": attackers, "norm_shift": shift}


_SPAN = re.compile(r"``(.+?)``|`(.+?)`|\*(.+?)\*")  # code (either spelling) or emphasis, as DEFINITIONS writes them


def definition_items(text: str) -> list[list[tuple[str, str]]]:
    """The definitions (``metrics.DEFINITIONS``: a Markdown list, items continued on indented
    lines) as one entry per item, each a list of ``(kind, text)`` spans, kind ``text``,
    ``em`` or ``code``, for the templates to mark up. Printed whole, the Markdown report's
    escaping (``md_escape``: a line break is a space) ran the items together on one line,
    with the code spans' backticks escaped."""
    items: list[str] = []
    for line in text.splitlines():
        if line.startswith("* ") or not items:
            items.append(line.removeprefix("* ").strip())
        elif line.strip():
            items[-1] += " " + line.strip()
    out = []
    for item in filter(None, items):
        spans, at = [], 0
        for m in _SPAN.finditer(item):
            if m.start() > at:
                spans.append(("text", item[at:m.start()]))
            code = m.group(1) or m.group(2)
            spans.append(("code", code) if code else ("em", m.group(3)))
            at = m.end()
        if at < len(item):
            spans.append(("text", item[at:]))
        out.append(spans)
    return out


def figures(result: dict) -> dict[str, bytes]:
    """PNG bytes by file stem: one set per policy plus the cross-policy comparison."""
    out = {}
    for s in result["policies"]:
        for kind, fn in plots.FIGURES.items():
            out[f"{s['policy']['name']}-{kind}"] = fn(s)
    if len(result["policies"]) > 1:
        out["comparison"] = plots.comparison(result["policies"])
    return out


def render_markdown(result: dict, figure_dir: str | None = "figures", figure_names=()) -> str:
    template = environment("riskpipe.evaluate", autoescape=False).get_template("evaluation.md.j2")
    return template.render(r=result, t=tables(result), figure_dir=figure_dir, figure_names=list(figure_names),
                           definitions=definition_items(result["definitions"]))


def example_views(result: dict) -> dict[str, list[dict]]:
    """Per policy, its adversarial examples drawn beside their clean inputs (riskpipe.render),
    with class names from the evaluated model entry's labels."""

    settings = result["settings"]
    entry = model_entry(Settings(model=settings["model"], config=settings.get("config"))) \
        if settings.get("config") else {"spec": settings["model"]}
    info = entry_info(entry)
    out = {}
    for s in result["policies"]:
        out[s["policy"]["name"]] = [
            {**e, "clean_view": input_view(e["clean"], e["shape"], info),
             "adversarial_view": input_view(e["adversarial"], e["shape"], info),
             "label_name": class_name(e["label"], info.labels),
             "adversarial_name": class_name(e["adversarial_prediction"], info.labels)}
            for e in s.get("examples", [])]
    return out


def render_html(result: dict, figs: dict[str, bytes]) -> str:
    embedded = {k: b64(v) for k, v in figs.items()}
    return environment("riskpipe.evaluate").get_template("evaluation.html.j2").render(
        r=result, t=tables(result), figures=embedded, examples=example_views(result),
        definitions=definition_items(result["definitions"]))


def write_report(result: dict, out_dir: str | Path, formats=FORMATS) -> list[Path]:
    """Write ``evaluation.{json,md,html}`` (and ``figures/*.png`` for Markdown) under
    ``out_dir``; the files of an earlier report there that this one does not write again
    are removed (``remove_stale``), so the directory never mixes two runs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "json" in formats:
        p = out / "evaluation.json"
        p.write_text(json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
        written.append(p)
    figs = figures(result) if ("html" in formats or "md" in formats) else {}
    if "md" in formats:
        fig_dir = out / "figures"
        fig_dir.mkdir(exist_ok=True)
        for name, png in figs.items():
            (fig_dir / f"{name}.png").write_bytes(png)
            written.append(fig_dir / f"{name}.png")
        p = out / "evaluation.md"
        p.write_text(render_markdown(result, "figures", figs), encoding="utf-8")
        written.append(p)
    if "html" in formats:
        p = out / "evaluation.html"
        p.write_text(render_html(result, figs), encoding="utf-8")
        written.append(p)
    remove_stale(out, written, report_file)
    return written
