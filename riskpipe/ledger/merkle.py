"""RFC 9162 Merkle tree math: hashes, proofs and their verification (pure, hashlib only).

Hashes (RFC 9162 §2.1.1)::

    leaf_hash(d)    = SHA-256(0x00 || d)
    node_hash(l, r) = SHA-256(0x01 || l || r)
    MTH({})         = SHA-256()                     # the empty tree
    MTH(D[n])       = node_hash(MTH(D[0:k]), MTH(D[k:n])), k the largest power of 2 < n

Proofs are built over a ``subtree(lo, hi) -> MTH(D[lo:hi])`` callable, so a caller can
serve them from stored nodes: every range the RFC's recursion asks for starts at a
multiple of a power of two and splits into at most log2(n) complete subtrees
(:func:`complete_subtrees`). Verification follows §2.1.3.2 (inclusion) and §2.1.4.2
(consistency) step by step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

Subtree = Callable[[int, int], bytes]


class ProofError(ValueError):
    """A proof that does not verify (the message says which check failed)."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def complete_subtrees(lo: int, hi: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` as the complete subtrees the RFC's MTH splits it into, left to right,
    each as (level, index): the subtree covering leaves [index * 2**level, (index + 1) * 2**level)."""
    out = []
    while lo < hi:
        size = hi - lo
        level = size.bit_length() - 1 if size & (size - 1) == 0 else split_point(size).bit_length() - 1
        while lo % (1 << level):  # not aligned: a smaller subtree first (never happens in RFC recursion)
            level -= 1
        out.append((level, lo >> level))
        lo += 1 << level
    return out


def mth(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes held in memory (tests, small trees)."""
    return list_subtree(leaf_hashes)(0, len(leaf_hashes))


def list_subtree(leaf_hashes: Sequence[bytes]) -> Subtree:
    """A ``subtree`` callable over a list of leaf hashes, memoised."""
    memo: dict[tuple[int, int], bytes] = {}

    def subtree(lo: int, hi: int) -> bytes:
        if hi - lo == 0:
            return EMPTY_ROOT
        if hi - lo == 1:
            return leaf_hashes[lo]
        key = (lo, hi)
        if key not in memo:
            k = split_point(hi - lo)
            memo[key] = node_hash(subtree(lo, lo + k), subtree(lo + k, hi))
        return memo[key]

    return subtree


def inclusion_proof(index: int, size: int, subtree: Subtree) -> list[bytes]:
    """PATH(m, D[n]) (RFC 9162 §2.1.3.1): the audit path of leaf ``index`` in a tree of ``size``."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    path: list[bytes] = []
    lo, hi, m = 0, size, index
    while hi - lo > 1:  # iterative PATH: collect the siblings top-down, return them bottom-up
        k = split_point(hi - lo)
        if m < k:
            path.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree(lo, lo + k))
            lo, m = lo + k, m - k
    return path[::-1]


def consistency_proof(old_size: int, new_size: int, subtree: Subtree) -> list[bytes]:
    """PROOF(m, D[n]) (RFC 9162 §2.1.4.1), empty when m == n or m == 0."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return []
    out: list[bytes] = []

    def subproof(m: int, lo: int, hi: int, complete: bool) -> None:  # SUBPROOF(m, D[lo:hi], b)
        n = hi - lo
        if m == n:
            if not complete:
                out.append(subtree(lo, hi))
            return
        k = split_point(n)
        if m <= k:
            subproof(m, lo, lo + k, complete)
            out.append(subtree(lo + k, hi))
        else:
            subproof(m - k, lo + k, hi, False)
            out.append(subtree(lo, lo + k))

    subproof(old_size, 0, new_size, True)
    return out


def _check_hash(name: str, h: bytes) -> None:
    if not isinstance(h, (bytes, bytearray)) or len(h) != HASH_SIZE:
        raise ProofError(f"{name}: not a {HASH_SIZE}-byte hash")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2 steps 1-6: the root the audit path leads to from ``leaf`` (its hash)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    _check_hash("leaf hash", leaf)
    fn, sn, r = index, size - 1, leaf
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
        if sn == 0:
            raise ProofError(f"inclusion proof too long ({len(proof)} hashes)")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"inclusion proof too short ({len(proof)} hashes)")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Raise ProofError unless ``proof`` shows leaf hash ``leaf`` at ``index`` under ``root``."""
    _check_hash("root", root)
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise ProofError(f"inclusion proof for leaf {index} does not lead to the root of tree size {size}")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> None:
    """RFC 9162 §2.1.4.2: raise ProofError unless ``proof`` shows that the tree of
    ``new_size`` with ``new_root`` extends the tree of ``old_size`` with ``old_root``."""
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
    if old_size < 0 or new_size < old_size:
        raise ProofError(f"tree size {new_size} is smaller than the earlier size {old_size}")
    if old_size == 0 and old_root != EMPTY_ROOT:
        # every tree extends the empty one, so no proof is asked of it; but the empty tree has
        # one root, and a signed size 0 with another is a statement about no tree at all
        raise ProofError(f"the empty tree's root is {EMPTY_ROOT.hex()}, not {old_root.hex()}")
    if old_size == new_size:
        if proof:
            raise ProofError("equal tree sizes need an empty proof")
        if old_root != new_root:
            raise ProofError(f"two different roots for tree size {new_size}")
        return
    if old_size == 0:
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError("empty consistency proof")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # step 1: a power of two — the old root is the first node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1  # step 2
    while fn & 1:  # step 3
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]  # step 4
    for c in path[1:]:  # step 5
        if sn == 0:
            raise ProofError(f"consistency proof too long ({len(proof)} hashes)")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:  # step 6
        raise ProofError(f"consistency proof too short ({len(proof)} hashes)")
    if fr != old_root:
        raise ProofError(f"consistency proof does not lead to the root of tree size {old_size}")
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the root of tree size {new_size}")


class Frontier:
    """The right edge of a growing tree (its compact range from 0): one complete subtree
    per set bit of the size. ``push`` appends a leaf hash and returns the nodes it
    completes as (level, index, hash), leaf first; ``root()`` folds the edge into MTH."""

    def __init__(self, size: int = 0, edge: Iterable[bytes] = ()) -> None:
        self.size = size
        self.edge = list(edge)  # largest subtree first
        if len(self.edge) != bin(size).count("1"):
            raise ValueError(f"a tree of size {size} has {bin(size).count('1')} edge nodes, got {len(self.edge)}")

    def push(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        index, h, level = self.size, leaf, 0
        done = [(0, index, h)]
        while index >> level & 1:
            h = node_hash(self.edge.pop(), h)
            level += 1
            done.append((level, index >> level, h))
        self.edge.append(h)
        self.size += 1
        return done

    def root(self) -> bytes:
        if not self.edge:
            return EMPTY_ROOT
        r = self.edge[-1]
        for h in reversed(self.edge[:-1]):
            r = node_hash(h, r)
        return r


def edge_nodes(size: int) -> list[tuple[int, int]]:
    """(level, index) of the complete subtrees on the right edge of a tree of ``size``."""
    return complete_subtrees(0, size) if size else []
