"""Compliance reports from a ledger: HTML (one self-contained file), Markdown, JSON, optional PDF.

``write_report(ledger_path, out_path, fmt)`` is the whole API; ``data.gather`` holds the
numbers, ``plots`` the figures, ``templates/`` the layouts.
"""

from __future__ import annotations

import importlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from riskpipe.ledger import LedgerError
from riskpipe.render import class_name, entry_info, environment, model_info, record_view
from riskpipe.report.data import gather
from riskpipe.report.plots import all_figures

FORMATS = ("html", "md", "json", "pdf")


class ReportError(ValueError):
    """A report that cannot be written (names the option and the reason)."""


@lru_cache(maxsize=1)
def pdf_unavailable() -> str | None:
    """None where PDF output works, else why not. PDF needs WeasyPrint (the ``pdf`` extra;
    riskpipe does not depend on it) and the system libraries it loads on import (Pango):
    a WeasyPrint without them fails its import with OSError, which is reported, not raised."""
    try:
        importlib.import_module("weasyprint")  # its import loads Pango: OSError without it
    except ImportError:
        return "WeasyPrint is not installed (pip install 'riskpipe[pdf]')"
    except OSError as e:
        return (f"WeasyPrint cannot load its system libraries ({' '.join(str(e).split())[:200]}); install Pango "
                "(Debian: libpango-1.0-0 libpangoft2-1.0-0)")
    return None


def html_to_pdf(html: str) -> bytes:
    """The PDF of a rendered HTML report (WeasyPrint: check ``pdf_unavailable`` first),
    fetching nothing but the report's inline ``data:`` resources (``_inline_only``)."""
    import weasyprint  # optional: weasyprint is optional (PDF output)

    return weasyprint.HTML(string=html, url_fetcher=_inline_only(weasyprint)).write_pdf()


def _inline_only(weasyprint: Any) -> Any:
    """A WeasyPrint URL fetcher for ``data:`` URLs only. The report carries its figures
    inline; a ``file:``, ``http:`` or other URL in it would make the renderer read a local
    file into the PDF (an image, a ``rel=attachment`` link) or call a server. Autoescaping
    already keeps the names in the report (models, policies, event ids: the user's) from
    becoming markup; this holds even if a template let one through."""
    if hasattr(weasyprint, "URLFetcher"):  # WeasyPrint >= 66: a fetcher class with a protocol allow-list
        return weasyprint.URLFetcher(allowed_protocols=("data",))

    def fetch(url: str) -> Any:  # earlier releases: a function; what it raises is a warning, the resource left out
        if not url.lower().startswith("data:"):
            raise ValueError(f"not fetched: the report embeds data: URLs only ({url[:40]!r})")
        return weasyprint.default_url_fetcher(url)

    return fetch


def pdf_available() -> bool:
    return pdf_unavailable() is None


def render(data: dict, fmt: str, models: dict | None = None) -> str:
    """Render gathered data as ``html``, ``md`` or ``json`` text. ``models`` (the stage
    config's ``models:`` entries) name classes and features in the input examples."""
    if fmt == "json":
        slim = json.loads(json.dumps(data))
        slim["review"].pop("minutes_values", None)
        for e in slim["examples"]:
            e["input"].pop("data", None)
            e["input"].pop("tensor", None)
        return json.dumps(slim, indent=2, sort_keys=True, allow_nan=False) + "\n"

    env = environment("riskpipe.report", autoescape=fmt == "html")
    if fmt == "html":
        return env.get_template("report.html.j2").render(d=data, fig=all_figures(data),
                                                         examples=_example_views(data["examples"], models or {}))
    if fmt == "md":
        return env.get_template("report.md.j2").render(d=data)
    raise ReportError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")


def _example_views(examples: list[dict], models: dict) -> list[dict]:
    infos = {name: entry_info(entry) for name, entry in models.items()}
    out = []
    for e in examples:
        info = infos.get(e["model"]) or model_info()
        out.append({**e, "view": record_view(e, info), "prediction_name": class_name(e["prediction"], info.labels)})
    return out


def write_report(ledger_path: str | Path, out_path: str | Path, fmt: str = "html", since: Any = None,
                 until: Any = None, models: dict | None = None, verify: bool = True) -> Path:
    """Gather the ledger's evidence for [since, until) and write the report; returns the path.
    ``verify=False`` skips the walk over the whole chain (the report then says so)."""

    if fmt not in FORMATS:
        raise ReportError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "pdf" and (why := pdf_unavailable()) is not None:
        raise ReportError(f"format: pdf is not available here: {why}; use html, md or json")
    try:
        data = gather(str(ledger_path), since=since, until=until, verify=verify)
    except LedgerError as e:
        raise ReportError(str(e)) from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pdf":
        out.write_bytes(html_to_pdf(render(data, "html", models)))
    else:
        out.write_text(render(data, fmt, models), encoding="utf-8")
    return out


__all__ = ["FORMATS", "ReportError", "html_to_pdf", "render", "write_report"]
