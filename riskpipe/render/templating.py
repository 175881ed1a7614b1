"""One Jinja environment factory, with the number filters every riskpipe document uses."""

from __future__ import annotations

import re
from typing import Any

import jinja2


def fmt(value: Any, spec: int | str = 4) -> str:
    """A value for a human: ``n/a`` for None, yes/no for booleans, floats to ``spec``
    significant digits (an int) or through a ``str.format`` template (``"{:.1f}"``)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return spec.format(value) if isinstance(spec, str) else f"{value:.{spec}g}"
    if isinstance(value, int) and isinstance(spec, str):
        return spec.format(value)
    return str(value)


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal; ``n/a`` for None."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


# what would let a printed value change a Markdown document's structure: a line break (a new
# heading or section), a table cell's bar, HTML (a comment hides the rest of the page), a code
# span's backtick, a link's brackets, and the escape character itself
_MD_ESCAPES = str.maketrans({"\\": "\\\\", "`": "\\`", "|": "\\|", "<": "&lt;", ">": "&gt;", "[": "\\[",
                             "]": "\\]"})
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def md_escape(value: Any) -> Any:
    """Every value a Markdown template prints (``finalize``): text from the ledger (a reason a
    dead letter arrived with, a model or policy name, a label) is shown as text. A reason
    holding a new line, a heading and ``<!--`` forged a "Ledger integrity: intact" section in
    the Markdown report and hid the real one."""
    if not isinstance(value, str):
        return value
    return _BREAKS.sub(" ", value).translate(_MD_ESCAPES)


def environment(package: str, folder: str = "templates", *, autoescape: bool = True) -> jinja2.Environment:
    """Templates from ``package``'s ``folder``: undefined names fail loudly, HTML (``.html``,
    ``.html.j2``) is autoescaped unless ``autoescape`` is off (Markdown), and the
    ``fmt``/``num``/``pct`` filters are there."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(package, folder), undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(["html", "html.j2"], default_for_string=False) if autoescape else False,
        finalize=None if autoescape else md_escape, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, num=fmt, pct=pct)
    return env
