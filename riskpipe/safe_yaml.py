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


class YAMLLimitError(yaml.YAMLError):
    """The document is beyond the size or nesting limits (or recursive)."""

    def __init__(self, reason: str, line: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.line = line


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
    """``yaml.safe_load(text)`` within the limits (``YAMLLimitError`` beyond them)."""
    return construct(compose(text))
