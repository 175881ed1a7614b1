"""The connection wrapper each backend provides to the store (types only).

The store, the migrations, the Merkle tree and the facts table run their SQL through it
with ``?`` placeholders; SQLite (:mod:`riskpipe.ledger.sqlite`) passes them through,
PostgreSQL (:mod:`riskpipe.ledger.postgres`) rewrites them to ``%s``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

Row = tuple[Any, ...]


class Cursor(Protocol):
    """What the store reads from a cursor (sqlite3's and psycopg's alike)."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> Sequence[Any]: ...

    def fetchmany(self, size: int) -> Sequence[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...

    def close(self) -> None: ...


class Db(Protocol):
    """A connection: ``execute``, ``executemany`` and ``close``, SQL with ``?`` placeholders."""

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def close(self) -> None: ...
