"""One YAML reader for every file riskpipe loads (policies, the stage config, the
review console's config): safe-loader semantics with bounded time and memory.

A YAML alias is a reference: nine levels of nine aliases (a "billion laughs" bomb)
compose into a few dozen nodes, but every consumer that walks the constructed data
(validation, JSON conversion, duplicate-key checks) visits 9**9 of them. So the
composed node graph is measured *before* anything is constructed: the number of
nodes it expands to (each alias counted as often as it is referenced), the bytes of
scalar text it expands to (a 1 MB "fat leaf" referenced a thousand times is a
thousand nodes but a gigabyte) and its depth, in one pass over the distinct nodes
(memoised), refusing beyond the limits. Recursive anchors (a node containing itself)
are refused too, and so is an integer too long to be a number any riskpipe file
means (Python refuses to convert one of more than 4,300 digits, with a traceback).

A key given twice in one mapping is refused as well (``duplicate_keys``): YAML's loaders
keep the last copy silently, so a reviewer who reads the first ``policy:`` of a model in
riskpipe.yaml would approve a file the stage reads otherwise.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_NODES = 100_000  # expanded nodes; the largest shipped policy has a few hundred
MAX_BYTES = 8 << 20  # expanded scalar text; the largest shipped policy has a few KB
MAX_DEPTH = 64
MAX_INT_DIGITS = 100  # 2^64 has 20 digits
_INT_TAG = "tag:yaml.org,2002:int"

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def explain(e: yaml.YAMLError) -> tuple[int, str]:
    """(line, reason) of a YAML error in the parser's words without its marks (``in
    "<unicode string>", line 8, column 1``): what it was doing, then what it found, e.g.
    "expected a single document in the stream, but found another document" at the line
    of the second document."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        words = ", ".join(p for p in (e.context, e.problem) if p) or str(e)
        return (mark.line + 1 if mark else 1), " ".join(words.split())
    return 1, " ".join(str(e).split())


class YAMLLimitError(yaml.YAMLError):
    """The document is refused before anything is built from it: beyond the size or
    nesting limits, recursive, or (``DuplicateKeyError``) with a key given twice."""

    def __init__(self, reason: str, line: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.line = line


class DuplicateKeyError(YAMLLimitError):
    """A key given twice in one mapping (the first such key: ``loc`` its path, ``line`` its second line)."""

    def __init__(self, loc: tuple[str | int, ...], line: int):
        super().__init__(f"{field_path(loc)}: {DUPLICATE}", line)
        self.loc = loc


DUPLICATE = "duplicate key (YAML keeps only the last; remove one)"


def field_path(loc: tuple[str | int, ...], top: str = "(top level)") -> str:
    """``models.digits.policy``, ``rules[2].when``: a key's path as the error messages write it."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or top


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _scalar_bytes(node: yaml.Node) -> int:
    """The scalar's text size (0 for collections); an over-long integer is refused here."""
    if not isinstance(node, yaml.ScalarNode):
        return 0
    text = node.value
    if node.tag == _INT_TAG and len(text) > MAX_INT_DIGITS:
        raise YAMLLimitError(f"integer of {len(text)} digits (more than {MAX_INT_DIGITS}); refused",
                             node.start_mark.line + 1)
    return len(text)


def check_limits(root: yaml.Node | None, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH,
                 max_bytes: int = MAX_BYTES) -> None:
    """Raise ``YAMLLimitError`` if ``root`` expands to more than ``max_nodes`` nodes or
    ``max_bytes`` bytes of scalar text, nests deeper than ``max_depth``, or contains
    itself. Time: O(distinct nodes)."""
    if root is None:
        return
    size: dict[int, int] = {}   # id(node) -> expanded node count
    nbytes: dict[int, int] = {}  # id(node) -> expanded scalar text
    depth: dict[int, int] = {}  # id(node) -> expanded depth
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            nbytes[key] = _scalar_bytes(node) + sum(nbytes[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            line = node.start_mark.line + 1
            if size[key] > max_nodes:
                raise YAMLLimitError(f"document expands to more than {max_nodes} nodes "
                                     "(aliases referencing aliases?); refused", line)
            if nbytes[key] > max_bytes:
                raise YAMLLimitError(f"document expands to more than {max_bytes} bytes of text "
                                     "(a large value referenced by many aliases?); refused", line)
            if depth[key] > max_depth:
                raise YAMLLimitError(f"nesting deeper than {max_depth} levels; refused", line)
            continue
        if key in size:
            continue
        if key in on_path:
            raise YAMLLimitError("recursive alias (a node that contains itself); refused", node.start_mark.line + 1)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)


def _key(node: yaml.Node, builder: yaml.constructor.SafeConstructor) -> Any:
    """A mapping key as the loader builds it (``1`` and ``01``, ``yes`` and ``true`` are one
    key); a fresh object, equal to no other key, for a key that is not a scalar (YAML
    allows them; riskpipe's files never use them)."""
    if not isinstance(node, yaml.ScalarNode):
        return object()
    try:
        value = builder.construct_object(node)
        hash(value)
        return value
    except (yaml.YAMLError, TypeError, ValueError):  # e.g. a merge key (<<), which only merging builds
        return (node.tag, node.value)


def duplicate_keys(root: yaml.Node | None) -> list[tuple[tuple[str | int, ...], int]]:
    """(path, line) of every key given twice in one mapping of a ``compose``-checked tree,
    in document order (the line is the repeated key's). A node reached again through an
    alias is looked at once."""
    out: list[tuple[tuple[str | int, ...], int]] = []
    builder = yaml.constructor.SafeConstructor()  # scalar keys only: no alias, nothing kept but this call's keys
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())] if root is not None else []
    while stack:
        node, loc = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        children: list[tuple[yaml.Node, tuple[str | int, ...]]] = []
        if isinstance(node, yaml.MappingNode):
            keys: set[Any] = set()
            for k, v in node.value:
                key = _key(k, builder)
                name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                if key in keys:
                    out.append((loc + (name,), k.start_mark.line + 1))
                keys.add(key)
                children.append((v, loc + (name,)))
        elif isinstance(node, yaml.SequenceNode):
            children = [(v, loc + (i,)) for i, v in enumerate(node.value)]
        stack.extend(reversed(children))
    return out


def compose(text: str, loader_cls=LOADER) -> yaml.Node | None:
    """The checked node tree of the single document in ``text``."""
    loader = loader_cls(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise YAMLLimitError(f"nesting deeper than {MAX_DEPTH} levels; refused") from None
        check_limits(root)
        return root
    finally:
        loader.dispose()


def construct(root: yaml.Node | None, loader_cls=LOADER) -> Any:
    """Python data from a node tree that ``compose`` has checked."""
    if root is None:
        return None
    loader = loader_cls("")
    try:
        return loader.construct_document(root)
    finally:
        loader.dispose()


def load(text: str) -> Any:
    """``yaml.safe_load(text)`` within the limits (``YAMLLimitError`` beyond them) and
    with every key once per mapping (``DuplicateKeyError`` for the first one given twice)."""
    root = compose(text)
    if dups := duplicate_keys(root):
        raise DuplicateKeyError(*dups[0])
    return construct(root)
