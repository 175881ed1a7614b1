"""The ledger's RFC 9162 Merkle tree in SQL, next to the hash chain (schema 3).

Leaf ``i`` (0-based) is row ``seq = i + 1``; its bytes are :func:`leaf_bytes`. Tables:

* ``tree_nodes (last, level, hash)``: every complete subtree, written once when its
  last leaf is appended (about 2 per row). The subtree at ``level`` covering leaves
  ``[j * 2**level, (j + 1) * 2**level)`` has ``last = (j + 1) * 2**level - 1``; rows sort
  by ``(last, level)`` in the order appends create them, so ``verify`` streams them
  side by side with the entries. Any range the RFC's proofs ask for is at most
  log2(n) lookups, for any tree size up to the current one (nodes never change).
* ``tree_state (size, root, edge)``: updated in the same transaction as every append,
  like ``chain_state``; ``edge`` is the right edge (compact range) the next append
  continues from, so an append reads one row, not the tree.

Hashes are stored as 64 lowercase hex characters, like the chain's.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Iterator

from riskpipe.ledger import merkle
from riskpipe.ledger.chain import LedgerError, LedgerUnavailable
from riskpipe.ledger.conn import Db, Row

_BATCH = 2000  # rows per INSERT batch while building the tree of an existing ledger


def leaf_bytes(kind: str, entry_id: str, canonical_record: str) -> bytes:
    """The bytes a row contributes as a Merkle leaf: ``kind \\n entry_id \\n record``
    (UTF-8; neither kind nor entry id may contain a newline, canonical JSON has none)."""
    return f"{kind}\n{entry_id}\n{canonical_record}".encode()


def split_leaf(data: bytes) -> tuple[str, str, str]:
    """(kind, entry_id, canonical record text) of leaf bytes; ValueError if malformed."""
    kind, entry_id, record = data.decode("utf-8").split("\n", 2)
    return kind, entry_id, record


def node_last(level: int, index: int) -> int:
    return ((index + 1) << level) - 1


def tree_tables(int_type: str) -> list[str]:
    """Schema 3's tables (``int_type``: INTEGER on SQLite, BIGINT on PostgreSQL)."""
    return [
        f"""CREATE TABLE tree_nodes (
            last  {int_type} NOT NULL,
            level INTEGER NOT NULL,
            hash  TEXT NOT NULL,
            PRIMARY KEY (last, level))""",
        f"""CREATE TABLE tree_state (
            id      INTEGER PRIMARY KEY CHECK (id = 1),
            size    {int_type} NOT NULL,
            root    TEXT NOT NULL,
            edge    TEXT NOT NULL,
            log_id  TEXT NOT NULL)""",
        f"""CREATE TABLE signed_notes (
            id        {'INTEGER PRIMARY KEY' if int_type == 'INTEGER' else 'BIGSERIAL PRIMARY KEY'},
            tree_size {int_type} NOT NULL,
            root      TEXT NOT NULL,
            note      TEXT NOT NULL)""",
    ]


def build_existing(db: Db) -> None:
    """Migration step: the tree over the rows an older ledger already holds."""
    frontier = merkle.Frontier()
    pending: list[tuple[int, int, str]] = []
    last_seq = 0
    while True:  # pages by seq: bounded memory on a large ledger
        rows = db.execute("SELECT seq, kind, entry_id, record FROM entries WHERE seq > ? ORDER BY seq LIMIT 5000",
                          (last_seq,)).fetchall()
        if not rows:
            break
        for seq, kind, eid, text in rows:
            if seq != frontier.size + 1:
                raise LedgerError(f"cannot build the Merkle tree: row {frontier.size + 1} is missing (next is {seq}); "
                                  "run `riskpipe ledger verify` on the previous riskpipe")
            pending.extend(_node_rows(frontier.push(merkle.leaf_hash(leaf_bytes(kind, eid, text)))))
            last_seq = seq
        if len(pending) >= _BATCH:
            db.executemany("INSERT INTO tree_nodes (last, level, hash) VALUES (?,?,?)", pending)
            pending = []
    if pending:
        db.executemany("INSERT INTO tree_nodes (last, level, hash) VALUES (?,?,?)", pending)
    db.execute("INSERT INTO tree_state (id, size, root, edge, log_id) VALUES (1, ?, ?, ?, ?)",
               (frontier.size, frontier.root().hex(), _edge_text(frontier), secrets.token_hex(8)))


def _node_rows(done: list[tuple[int, int, bytes]]) -> list[tuple[int, int, str]]:
    return [(node_last(level, index), level, h.hex()) for level, index, h in done]


def _edge_text(frontier: merkle.Frontier) -> str:
    return "".join(h.hex() for h in frontier.edge)


def read_state(db: Db) -> tuple[int, str, merkle.Frontier]:
    """(size, root hex, frontier) from ``tree_state``; LedgerUnavailable (an infrastructure
    fault: no record is to blame) if it is missing or torn."""
    row = db.execute("SELECT size, root, edge FROM tree_state WHERE id = 1").fetchone()
    if row is None:
        raise LedgerUnavailable("ledger: tree_state row is missing (tampered)")
    size, root, edge = row
    try:
        frontier = merkle.Frontier(size, [bytes.fromhex(edge[i:i + 64]) for i in range(0, len(edge), 64)])
    except ValueError as e:
        raise LedgerUnavailable(f"ledger: tree_state is damaged ({e})") from None
    return size, root, frontier


def append_leaves(db: Db, leaves: Iterable[bytes], expect_size: int) -> tuple[int, str]:
    """Add the leaf hashes of rows just inserted (rows ``expect_size + 1 ...``); returns
    the new (size, root hex). Runs inside the backend's write transaction."""
    size, _, frontier = read_state(db)
    if size != expect_size:  # not this record's fault: the stage pauses as for an unavailable ledger
        raise LedgerUnavailable(f"ledger: the Merkle tree has {size} leaves but the chain {expect_size} rows "
                                "(tampered, or written by a riskpipe without the tree); appends refused until "
                                "`riskpipe ledger verify` is clean")
    nodes: list[tuple[int, int, str]] = []
    for h in leaves:
        nodes.extend(_node_rows(frontier.push(h)))
    db.executemany("INSERT INTO tree_nodes (last, level, hash) VALUES (?,?,?)", nodes)
    root = frontier.root().hex()
    db.execute("UPDATE tree_state SET size = ?, root = ?, edge = ? WHERE id = 1",
               (frontier.size, root, _edge_text(frontier)))
    return frontier.size, root


def subtree_reader(db: Db, size: int) -> merkle.Subtree:
    """``subtree(lo, hi)`` over stored nodes (for ``hi <= size``), memoised per call site."""
    memo: dict[tuple[int, int], bytes] = {}

    def node(level: int, index: int) -> bytes:
        row = db.execute("SELECT hash FROM tree_nodes WHERE last = ? AND level = ?",
                         (node_last(level, index), level)).fetchone()
        if row is None:
            raise LedgerError(f"ledger: Merkle tree node (level {level}, index {index}) is missing (tampered)")
        return bytes.fromhex(row[0])

    def subtree(lo: int, hi: int) -> bytes:
        if not 0 <= lo < hi <= size:
            raise LedgerError(f"ledger: no subtree [{lo}, {hi}) in a tree of size {size}")
        key = (lo, hi)
        if key not in memo:
            parts = [node(level, index) for level, index in merkle.complete_subtrees(lo, hi)]
            h = parts[-1]
            for p in reversed(parts[:-1]):
                h = merkle.node_hash(p, h)
            memo[key] = h
        return memo[key]

    return subtree


def _node_keys(lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """(last, level) of the nodes leaves ``lo .. hi - 1`` complete, in (last, level) order."""
    for last in range(lo, hi):
        level = 0
        yield last, 0
        while last >> level & 1:
            level += 1
            yield last, level


class TreeCheck:
    """Rebuilds the tree from the rows as ``verify`` walks them and compares it with the
    stored nodes (``tree_nodes`` of ``db``, read range by range) and with signed roots
    (``anchors``: tree size -> root hex). The first difference is kept as ``problem``."""

    def __init__(self, db: Db, anchors: dict[int, str] | None = None, nodes_check: str | None = None) -> None:
        self.db = db
        self.anchors = anchors or {}
        self.nodes_check = nodes_check
        self.frontier = merkle.Frontier()
        self.problem: tuple[int, str] | None = None
        self.last_anchor = 0

    def add_leaves(self, first_seq: int, leaves: list[bytes]) -> None:
        """Push the leaf hashes of rows ``first_seq, first_seq + 1, ...`` and compare the
        nodes they complete (each stored with ``last`` = the index of the leaf that
        completed it) with the stored nodes of that range of ``last`` at once, and row by
        row only when those differ, to name the first node that does.

        At once (``nodes_check``, the backend's SQL): the stored hashes joined in (last,
        level) order equal the computed ones, as many nodes are stored as computed, and
        each stored key is one the range must hold (integers, ``last + 1`` a multiple of
        ``2 ** level``, a 64-character hash). Keys are unique (the primary key; ``finish``
        checks it too), so the stored keys are exactly the computed ones, each with its
        hash: no per-node text is written on either side."""
        if self.problem is not None or not leaves:
            return
        sha256 = hashlib.sha256
        edge, size, anchors = self.frontier.edge, self.frontier.size, self.anchors
        first_index = size
        nodes: list[bytes] = []  # each node completed, in (last, level) order
        keep = nodes.append
        signed_bad: tuple[int, str] | None = None
        for seq, h in enumerate(leaves, first_seq):
            keep(h)
            if size & 1:  # merkle.Frontier.push, inline
                level = 0
                while size >> level & 1:
                    h = sha256(b"\x01" + edge.pop() + h).digest()
                    level += 1
                    keep(h)
            edge.append(h)
            size += 1
            if anchors and size in anchors:
                self.frontier.size = size
                if self.frontier.root().hex() != anchors[size]:
                    first = self.last_anchor + 1
                    signed_bad = (first, f"the Merkle root of the first {seq} rows differs from the signed checkpoint "
                                         f"for tree size {seq} ({anchors[size][:12]}…): rows among {first}..{seq} "
                                         "were changed, removed or replaced")
                    break
                self.last_anchor = seq
        self.frontier.size = size
        span = (first_index, size)
        if self.nodes_check is None or tuple(self.db.execute(self.nodes_check, span).fetchone()) != (
                b"".join(nodes).hex(), len(nodes), 0):
            stored = [tuple(r) for r in self.db.execute("SELECT last, level, hash FROM tree_nodes WHERE last >= ? "
                                                        "AND last < ? ORDER BY last, level", span).fetchall()]
            expect = [(last, level, h.hex()) for (last, level), h in zip(_node_keys(first_index, size), nodes,
                                                                          strict=True)]
            if stored != expect:
                i = next(i for i, w in enumerate(expect) if i >= len(stored) or stored[i] != w)
                last, level = expect[i][0], expect[i][1]
                owner = first_seq + last - first_index  # the row whose leaf completed the node
                self.problem = (owner, f"row {owner}: stored Merkle tree node (level {level}, index "
                                       f"{last >> level}) does not match the rows (tree or row tampered)")
                return
        self.problem = signed_bad

    def finish(self, n: int, state: Row | None) -> tuple[int, str] | None:
        """After ``n`` good rows: nodes outside the rows or stored twice, the tree state, anchors
        beyond the end."""
        if self.problem is not None:
            return self.problem
        if self.db.execute("SELECT 1 FROM tree_nodes WHERE last < 0 LIMIT 1").fetchone() is not None:
            return 1, "the Merkle tree has nodes before row 1 (tampered)"
        if self.db.execute("SELECT 1 FROM tree_nodes WHERE last >= ? LIMIT 1", (n,)).fetchone() is not None:
            return n + 1, f"the Merkle tree has nodes beyond row {n} (tampered)"
        twice = self.db.execute("SELECT last, level FROM tree_nodes GROUP BY last, level HAVING count(*) > 1 "
                                "ORDER BY last, level LIMIT 1").fetchone()
        if twice is not None:  # only if the primary key was dropped; add_leaves relies on unique keys
            last, level = twice
            return last + 1, (f"row {last + 1}: the Merkle tree holds node (level {level}, index {last >> level}) "
                              "more than once (tampered)")
        if state is None:
            return n + 1, "tree_state row is missing (tampered)"
        size, root = state
        if size != n:
            return min(size, n) + 1, f"tree state says {size} leaves, the ledger has {n} rows"
        if root != self.frontier.root().hex():
            return max(n, 1), f"tree state root {root[:12]}… differs from the root of the rows"
        beyond = [s for s in self.anchors if s > n]
        if beyond:
            return n + 1, f"truncated: a signed checkpoint covers tree size {max(beyond)}, found {n} rows"
        return None

    def root(self) -> str:
        return self.frontier.root().hex()
