"""load_policy: YAML file -> validated Policy, or PolicyError with one line per problem.

The file is read with ``yaml.safe_load`` semantics: composed into a node tree with the
safe loader (size and nesting bounded by ``riskpipe.safe_yaml``: an alias bomb is
refused in milliseconds), then constructed from that tree, so that every problem's field
path maps back to the line it came from: ``file:line: field: reason``.
"""

from __future__ import annotations

import datetime
import difflib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from riskpipe import safe_yaml
from riskpipe.paths import read_small_text
from riskpipe.policy.schema import Policy, SemanticProblems

# safe_load semantics (SafeLoader constructors), libyaml's parser when available,
# aliases and nesting bounded (riskpipe.safe_yaml)
_LOADER = safe_yaml.LOADER
Loc = tuple[str | int, ...]  # a field's path: keys and list indexes


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.reason}"


class PolicyError(ValueError):
    """A policy that cannot be loaded. ``str()`` is one line per problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def field_path(loc: Loc) -> str:
    return safe_yaml.field_path(loc, "(policy)")


def _line(root: yaml.Node | None, loc: Loc) -> int:
    """Line of the field at ``loc``: its key when it exists, else the key of the
    deepest enclosing field that does (e.g. the section a required field is missing from)."""
    if root is None:
        return 1
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            hit = [(k, v) for k, v in node.value if k.value == part]
            if not hit:
                return line
            key, node = hit[-1]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _allowed_keys(loc: Loc) -> list[str]:
    """Field names the schema allows at the mapping that contains ``loc[-1]``."""
    model: Any = Policy
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _unwrap(model.model_fields[part].annotation)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _unwrap(tp: Any) -> Any:
    while True:
        args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = args[0]
        elif origin is not None and args:
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            tp = models[0] if models else args[0]
            if models:
                return tp
        else:
            return tp


def _reason(err: ErrorDetails) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(err["loc"])
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        return "unknown field" + (f"; did you mean {close[0]!r}?" if close else
                                  (f" (allowed: {', '.join(allowed)})" if allowed else ""))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind == "string_type" and err["loc"] and err["loc"][-1] == "version":
        msg += " (quote it, e.g. \"1.0\", or YAML reads a number or a date)"
    msg = " ".join(msg.split())
    loc = err["loc"]
    if loc and isinstance(loc[-1], str) and msg.startswith(f"{loc[-1]}: "):
        msg = msg[len(loc[-1]) + 2:]  # the field is already named in front
    return msg[:1].lower() + msg[1:]


def _yaml_data(text: str, name: str, loader_cls: type[yaml.SafeLoader] = _LOADER) -> tuple[Any, yaml.Node | None]:
    try:
        root = safe_yaml.compose(text, loader_cls)
        data = safe_yaml.construct(root, loader_cls)
    except safe_yaml.YAMLLimitError as e:
        raise PolicyError([Problem(name, e.line, "(yaml)", e.reason)]) from None
    except yaml.YAMLError as e:
        if isinstance(e, yaml.MarkedYAMLError) and loader_cls is not yaml.SafeLoader:
            return _yaml_data(text, name, yaml.SafeLoader)  # report with the pure parser: same words on every machine
        line, reason = safe_yaml.explain(e)
        raise PolicyError([Problem(name, line, "(yaml)", reason)]) from None
    dups = safe_yaml.duplicate_keys(root)
    if dups:
        raise PolicyError([Problem(name, line, field_path(loc), safe_yaml.DUPLICATE) for loc, line in dups])
    return data, root


def _json_value(value: Any) -> Any:
    """What JSON cannot carry, for validation: a YAML timestamp (an unquoted ``2024-01-01``)
    is no string (str() wrote ``2024-01-01 10:00`` back as "2024-01-01 10:00:00"), anything
    else its text."""
    if isinstance(value, datetime.date):
        return {"timestamp": value.isoformat()}
    return str(value)


def _foreign(data: Any, loc: Loc = ()) -> tuple[Loc, str] | None:
    """(path, type) of the first value that JSON has no form for and a date is not: YAML's
    ``!!binary`` (bytes) and ``!!set``. str() wrote them as "b'...'" and "{'a'}", which a
    text field (owner, description) took as written."""
    if isinstance(data, dict):
        for k, v in data.items():
            if (hit := _foreign(v, (*loc, str(k)))) is not None:
                return hit
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            if (hit := _foreign(v, (*loc, i))) is not None:
                return hit
    elif not (data is None or isinstance(data, (str, int, float, datetime.date))):
        return loc, type(data).__name__
    return None


def parse_policy(text: str, name: str = "<policy>") -> Policy:
    """Validate policy YAML ``text``; ``name`` is used in error lines."""
    data, root = _yaml_data(text, name)
    if data is None:
        raise PolicyError([Problem(name, 1, "(policy)", "empty file; expected a RiskPolicy mapping")])
    if not isinstance(data, dict):
        raise PolicyError([Problem(name, 1, "(policy)", f"expected a mapping at the top, got {type(data).__name__}")])
    if (hit := _foreign(data)) is not None:
        loc, kind = hit
        raise PolicyError([Problem(name, _line(root, loc), field_path(loc),
                                   f"a YAML {'!!binary' if kind == 'bytes' else '!!' + kind} value ({kind}) is no "
                                   "policy value; write it as plain text, a number or a list")])
    try:
        blob = json.dumps(data, default=_json_value, allow_nan=True)
        return Policy.model_validate_json(blob)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        locs = [tuple(err["loc"]) for err in errors]
        # a container error (e.g. "too short") caused by a bad item says nothing new
        errors = [err for err in errors if not any(len(o) > len(err["loc"]) and o[:len(err["loc"])] == tuple(err["loc"])
                                                   for o in locs)]
        problems = [Problem(name, _line(root, err["loc"]), field_path(err["loc"]), _reason(err)) for err in errors]
    except SemanticProblems as e:
        problems = [Problem(name, _line(root, loc), field_path(loc), reason) for loc, reason in e.problems]
    problems.sort(key=lambda p: p.line)
    raise PolicyError(problems)


def locate(path: str | Path, loc: Loc) -> Problem:
    """A Problem pointing at field ``loc`` of the policy file at ``path`` (reason empty)."""
    _, root = _yaml_data(Path(path).read_text(encoding="utf-8"), str(path))
    return Problem(str(path), _line(root, loc), field_path(loc), "")


def load_policy(path: str | Path) -> Policy:
    try:
        text = read_small_text(path)
    except FileNotFoundError:
        raise PolicyError([Problem(str(path), 0, "(file)", "file not found")]) from None
    except UnicodeDecodeError:
        raise PolicyError([Problem(str(path), 0, "(file)", "not UTF-8 text")]) from None
    except OSError as e:
        raise PolicyError([Problem(str(path), 0, "(file)", e.strerror or type(e).__name__)]) from None
    return parse_policy(text, str(path))
