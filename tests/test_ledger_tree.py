"""The ledger's RFC 9162 Merkle tree on SQLite and PostgreSQL: the same root as the
reference computation over the leaf bytes, proofs for every index and earlier size,
tree tampering caught by ``verify``, and the tree built for a ledger written without it."""

from __future__ import annotations

import sqlite3

import pytest

from ledger_records import as_superuser, decision_record
from riskpipe.ledger import LedgerError, canonical_json, merkle, open_ledger
from riskpipe.ledger.chain import LedgerUnavailable
from riskpipe.ledger.tree import leaf_bytes


def fill(target, sizes):
    """Batches of the given sizes (appends continue the tree across transactions)."""
    i = 0
    with open_ledger(target) as led:
        for n in sizes:
            led.append_many([decision_record(k) for k in range(i, i + n)])
            i += n
    return i


def reference_leaves(led):
    return [merkle.leaf_hash(leaf_bytes(e.kind, e.entry_id, canonical_json(e.record))) for e in led.records()]


def test_tree_matches_the_reference_and_proves_every_leaf(target):
    n = fill(target, [1, 2, 5, 16, 13])  # 37 rows in five transactions
    with open_ledger(target) as led:
        leaves = reference_leaves(led)
        sub = merkle.list_subtree(leaves)
        assert led.tree_head() == (n, sub(0, n).hex())
        res = led.verify()
        assert res.ok and res.root == sub(0, n).hex()
        for size in range(1, n + 1):
            root = led.tree_root(size)
            assert root == sub(0, size)
            for index in range(size):
                proof = led.inclusion_proof(index, size)
                merkle.verify_inclusion(index, size, leaves[index], proof, root)
            for old in range(0, size + 1):
                merkle.verify_consistency(old, size, sub(0, old), root, led.consistency_proof(old, size))
        data, entry = led.leaf_at(4)
        assert merkle.leaf_hash(data) == leaves[4] and entry.seq == 5
        with pytest.raises(LedgerError, match="only 37 leaves"):
            led.inclusion_proof(0, 38)


def test_duplicates_do_not_enter_the_tree(target):
    fill(target, [4])
    with open_ledger(target) as led:
        assert led.append_many([decision_record(k) for k in range(2, 7)]) == 3
        assert led.tree_head()[0] == 7 and led.verify().ok


def superuser(target, *statements):
    as_superuser(target, statements, tables=("tree_nodes",))


@pytest.mark.parametrize("case, first_bad, reason", [
    ("node", 6, "stored Merkle tree node (level 1, index 2)"),  # the node over leaves 4, 5 (rows 5, 6)
    ("leaf", 3, "stored Merkle tree node (level 0, index 2)"),
    ("missing", 8, "stored Merkle tree node (level 3, index 0)"),
    ("extra", 11, "nodes beyond row 10"),
    ("moved", 6, "stored Merkle tree node (level 1, index 2)"),  # (5, 1) stored as (5, 7): same hash order
    ("resplit", 4, "stored Merkle tree node (level 0, index 3)"),  # the joined hash text unchanged
    ("merged", 4, "stored Merkle tree node (level 0, index 3)"),  # (3, 1) folded into (3, 0) as "h;3,1,h"
    ("state", 10, "tree state root"),
    ("size", 10, "tree state says 9 leaves"),
])
def test_tree_tampering_is_detected(target, case, first_bad, reason):
    fill(target, [10])
    statements = {
        "node": ["UPDATE tree_nodes SET hash = '" + "ab" * 32 + "' WHERE last = 5 AND level = 1"],
        "leaf": ["UPDATE tree_nodes SET hash = '" + "cd" * 32 + "' WHERE last = 2 AND level = 0"],
        "missing": ["DELETE FROM tree_nodes WHERE last = 7 AND level = 3"],
        "extra": ["INSERT INTO tree_nodes (last, level, hash) VALUES (10, 0, '" + "ef" * 32 + "')"],
        "moved": ["UPDATE tree_nodes SET level = 7 WHERE last = 5 AND level = 1"],
        "resplit": ["UPDATE tree_nodes SET hash = hash || (SELECT substr(n.hash, 1, 1) FROM tree_nodes n "
                    "WHERE n.last = 3 AND n.level = 1) WHERE last = 3 AND level = 0",
                    "UPDATE tree_nodes SET hash = substr(hash, 2) WHERE last = 3 AND level = 1"],
        "merged": ["UPDATE tree_nodes SET hash = hash || ';3,1,' || (SELECT n.hash FROM tree_nodes n "
                   "WHERE n.last = 3 AND n.level = 1) WHERE last = 3 AND level = 0",
                   "DELETE FROM tree_nodes WHERE last = 3 AND level = 1"],
        "state": ["UPDATE tree_state SET root = '" + "01" * 32 + "'"],
        "size": ["UPDATE tree_state SET size = 9"],
    }[case]
    superuser(target, *statements)
    with open_ledger(target) as led:
        res = led.verify()
    assert not res.ok and res.first_bad_seq == first_bad and reason in res.reason, res


def test_appends_refuse_a_tree_out_of_step_with_the_chain(target):
    fill(target, [3])
    superuser(target, "UPDATE tree_state SET size = 2, edge = substr(edge, 1, 64)")
    with open_ledger(target) as led, pytest.raises(LedgerUnavailable,
                                                   match="Merkle tree has 2 leaves but the chain 3 rows"):
        led.append(decision_record(50))
    with open_ledger(target) as led:
        assert led.count() == 3 and led.head_and_count()[1] == 3  # nothing written: the append failed closed


def test_schema_2_ledger_gets_its_tree(tmp_path):
    """A ledger written by the riskpipe before the tree (schema 2) is migrated in place."""
    from riskpipe.ledger import sqlite as sqlite_backend
    from riskpipe.ledger.chain import entry_hash

    path = tmp_path / "v2.db"
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for version, stmts in sqlite_backend.STEPS[:2]:
        for s in stmts:
            db.execute(s)
        db.execute("INSERT INTO schema_version VALUES (?, 'x')", (version,))
    prev = "0" * 64
    for i in range(1, 12):
        rec = decision_record(i)
        text = canonical_json(rec)
        h = entry_hash(prev, "decision", rec["id"], text)
        db.execute("INSERT INTO entries VALUES (?,?,?,?,?,?,?)", (i, "decision", rec["id"], rec["ts"], text, prev, h))
        prev = h
    db.execute("UPDATE chain_state SET count = 11, head = ?", (prev,))
    db.close()
    with open_ledger(str(path)) as led:
        assert led.schema_version == 8  # 3: the tree, 4: decision identity, 5: stored inputs, 6: facts, 7-8: groups
        leaves = reference_leaves(led)
        assert led.tree_head() == (11, merkle.mth(leaves).hex()) and led.verify().ok
        led.append(decision_record(40))
        assert led.tree_head() == (12, merkle.mth(reference_leaves(led)).hex()) and led.verify().ok


def test_a_node_stored_twice_is_detected(target):
    """Without its primary key a table could hold a key twice and miss another while the
    hashes still read in the same order; verify names the node either way."""
    if not str(target).startswith("postgresql://"):
        pytest.skip("SQLite cannot drop a table's primary key")
    fill(target, [10])
    superuser(target, "ALTER TABLE tree_nodes DROP CONSTRAINT tree_nodes_pkey",
              "UPDATE tree_nodes SET level = 0 WHERE last = 5 AND level = 1")
    with open_ledger(target) as led:
        res = led.verify()
    assert not res.ok and res.first_bad_seq == 6 and "Merkle tree" in res.reason, res
