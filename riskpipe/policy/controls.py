"""The control identifiers a policy may cite, read from the versioned framework mappings.

Each file in ``riskpipe/policy/frameworks/*.yaml`` maps one framework's controls (or
articles, techniques, risks) to the evidence riskpipe computes for them and the report
sections that carry it. Identifiers are exact strings; a policy citing anything else is
rejected, so a typo never reaches an audit report. Titles are short paraphrases.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

from riskpipe import safe_yaml

FRAMEWORK_KEYS = ("framework", "mapping_version", "source", "prefix", "controls")
CONTROL_KEYS = ("id", "title", "evidence", "sections")


class MappingError(ValueError):
    """A framework mapping file is malformed (names the file, field and reason)."""


@dataclass(frozen=True)
class Control:
    id: str
    short_id: str  # the id without the framework's prefix, for report tables
    title: str
    evidence: str
    sections: tuple[str, ...]
    framework: str
    mapping_version: int
    source: str


def _text(where: str, field: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MappingError(f"{where}: field {field!r} must be a non-empty string")
    return value


def _parse(name: str, text: str) -> list[Control]:
    doc = safe_yaml.load(text)
    if not isinstance(doc, dict):
        raise MappingError(f"{name}: expected a mapping at the top level")
    missing = [k for k in FRAMEWORK_KEYS if k not in doc]
    if missing or set(doc) - set(FRAMEWORK_KEYS):
        raise MappingError(f"{name}: fields must be exactly {', '.join(FRAMEWORK_KEYS)} "
                           f"(missing {missing}, unknown {sorted(set(doc) - set(FRAMEWORK_KEYS))})")
    framework = _text(name, "framework", doc["framework"])
    version = doc["mapping_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MappingError(f"{name}: field 'mapping_version' must be a positive integer")
    prefix = doc["prefix"] if isinstance(doc["prefix"], str) else None
    if prefix is None:
        raise MappingError(f"{name}: field 'prefix' must be a string (may be empty)")
    if not isinstance(doc["controls"], list) or not doc["controls"]:
        raise MappingError(f"{name}: field 'controls' must be a non-empty list")
    out = []
    for i, c in enumerate(doc["controls"]):
        where = f"{name}: controls[{i}]"
        if not isinstance(c, dict) or set(c) != set(CONTROL_KEYS):
            raise MappingError(f"{where}: fields must be exactly {', '.join(CONTROL_KEYS)}")
        cid = _text(where, "id", c["id"])
        if not cid.startswith(prefix):
            raise MappingError(f"{where}: id {cid!r} does not start with the framework prefix {prefix!r}")
        sections = c["sections"]
        if not isinstance(sections, list) or not sections or not all(isinstance(s, str) and s for s in sections):
            raise MappingError(f"{where}: field 'sections' must be a non-empty list of report section names")
        out.append(Control(cid, cid[len(prefix):], _text(where, "title", c["title"]),
                           _text(where, "evidence", c["evidence"]), tuple(sections), framework, version,
                           _text(name, "source", doc["source"])))
    return out


def load_mappings(texts: dict[str, str]) -> dict[str, Control]:
    """Controls by id from ``{file name: YAML text}``; an id in two files is an error."""
    catalog: dict[str, Control] = {}
    for name in sorted(texts):
        for c in _parse(name, texts[name]):
            if c.id in catalog:
                raise MappingError(f"{name}: control id {c.id!r} is already mapped by {catalog[c.id].framework}")
            catalog[c.id] = c
    return catalog


@lru_cache(maxsize=1)
def mapping() -> dict[str, Control]:
    """The shipped mappings (package data), read once."""
    folder = files("riskpipe.policy").joinpath("frameworks")
    return load_mappings({p.name: p.read_text(encoding="utf-8") for p in folder.iterdir()
                          if p.name.endswith(".yaml")})


def frameworks() -> list[tuple[str, int, str]]:
    """(framework, mapping_version, source) of every shipped mapping, in file order."""
    seen: dict[str, tuple[str, int, str]] = {}
    for c in mapping().values():
        seen.setdefault(c.framework, (c.framework, c.mapping_version, c.source))
    return list(seen.values())


CATALOG = {cid: c.title for cid, c in mapping().items()}


def check_control(ref: str) -> str:
    """Return ``ref`` if it is a mapped control id, else raise ValueError naming the closest."""
    if ref in CATALOG:
        return ref

    close = difflib.get_close_matches(ref, CATALOG, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else " (see policies/README.md for the list)"
    raise ValueError(f"{ref!r} is not a control id in riskpipe's framework mappings{hint}")
