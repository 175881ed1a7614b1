"""RFC 9162 Merkle math (riskpipe.ledger.merkle): known answers and exhaustive proofs.

The known answers are the RFC 6962 / Certificate Transparency reference tree of eight
leaves (the vectors published with transparency-dev/merkle and
google/certificate-transparency): leaves, roots for sizes 1..8, audit paths and
consistency proofs.
"""

from __future__ import annotations

import hashlib

import pytest

from riskpipe.ledger import merkle
from riskpipe.ledger.merkle import ProofError

LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                       "606162636465666768696a6b6c6d6e6f")]
ROOTS = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
# (0-based leaf index, tree size, audit path)
INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (0, 1, []),
]
CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
HASHES = [merkle.leaf_hash(d) for d in LEAVES]


def test_empty_tree_and_hash_prefixes() -> None:
    assert merkle.mth([]) == hashlib.sha256(b"").digest() == merkle.EMPTY_ROOT
    assert merkle.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert merkle.node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()


@pytest.mark.parametrize("size", range(1, 9))
def test_known_roots(size: int) -> None:
    assert merkle.mth(HASHES[:size]) == ROOTS[size - 1]
    f = merkle.Frontier()
    for h in HASHES[:size]:
        f.push(h)
    assert f.root() == ROOTS[size - 1]


@pytest.mark.parametrize("index,size,path", INCLUSION)
def test_known_inclusion_proofs(index: int, size: int, path: list[str]) -> None:
    proof = merkle.inclusion_proof(index, size, merkle.list_subtree(HASHES[:size]))
    assert [p.hex() for p in proof] == path
    merkle.verify_inclusion(index, size, HASHES[index], proof, ROOTS[size - 1])


@pytest.mark.parametrize("old,new,path", CONSISTENCY)
def test_known_consistency_proofs(old: int, new: int, path: list[str]) -> None:
    proof = merkle.consistency_proof(old, new, merkle.list_subtree(HASHES[:new]))
    assert [p.hex() for p in proof] == path
    merkle.verify_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], proof)


def _tree(n: int) -> list[bytes]:
    return [merkle.leaf_hash(b"leaf %d" % i) for i in range(n)]


def _flip(proof: list[bytes], i: int) -> list[bytes]:
    bad = list(proof)
    bad[i] = bytes([bad[i][0] ^ 8]) + bad[i][1:]
    return bad


def test_every_inclusion_proof_up_to_64() -> None:
    leaves = _tree(64)
    for size in range(1, 65):
        sub = merkle.list_subtree(leaves[:size])
        root = sub(0, size)
        assert len(merkle.edge_nodes(size)) == bin(size).count("1")
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, sub)
            assert len(proof) <= (size - 1).bit_length()
            merkle.verify_inclusion(index, size, leaves[index], proof, root)
            with pytest.raises(ProofError):  # another leaf at this index
                merkle.verify_inclusion(index, size, leaves[(index + 1) % 64], proof, root)
            with pytest.raises(ProofError):  # wrong index or size
                merkle.verify_inclusion(index ^ 1 if size > 1 else 1, size if size > 1 else 1, leaves[index], proof,
                                        root)
            with pytest.raises(ProofError):
                merkle.verify_inclusion(index, size * 2, leaves[index], proof, root)
            for i in range(len(proof)):
                with pytest.raises(ProofError):
                    merkle.verify_inclusion(index, size, leaves[index], _flip(proof, i), root)
            with pytest.raises(ProofError):  # trailing hash
                merkle.verify_inclusion(index, size, leaves[index], proof + [root], root)
            if proof:
                with pytest.raises(ProofError):  # a hash removed
                    merkle.verify_inclusion(index, size, leaves[index], proof[:-1], root)


def test_every_consistency_proof_up_to_64() -> None:
    leaves = _tree(64)
    sub = merkle.list_subtree(leaves)
    roots = [sub(0, n) for n in range(65)]
    for new in range(1, 65):
        for old in range(0, new + 1):
            proof = merkle.consistency_proof(old, new, sub)
            merkle.verify_consistency(old, new, roots[old], roots[new], proof)
            if old in (0, new):
                assert proof == []
                continue
            with pytest.raises(ProofError):  # a different old tree
                merkle.verify_consistency(old, new, roots[old - 1], roots[new], proof)
            with pytest.raises(ProofError):
                merkle.verify_consistency(old, new, roots[old], roots[new - 1], proof)
            with pytest.raises(ProofError):  # swapped roots
                merkle.verify_consistency(old, new, roots[new], roots[old], proof)
            with pytest.raises(ProofError):
                merkle.verify_consistency(old, new, roots[old], roots[new], [])
            for i in range(len(proof)):
                with pytest.raises(ProofError):
                    merkle.verify_consistency(old, new, roots[old], roots[new], _flip(proof, i))
            with pytest.raises(ProofError):
                merkle.verify_consistency(old, new, roots[old], roots[new], proof + [roots[new]])
            with pytest.raises(ProofError):
                merkle.verify_consistency(old, new, roots[old], roots[new], proof[:-1])


def test_consistency_refuses_a_smaller_tree_and_forked_equal_sizes() -> None:
    leaves = _tree(8)
    sub = merkle.list_subtree(leaves)
    with pytest.raises(ProofError):
        merkle.verify_consistency(5, 3, sub(0, 5), sub(0, 3), [])
    with pytest.raises(ProofError):
        merkle.verify_consistency(4, 4, sub(0, 4), sub(0, 3), [])


def test_a_size_zero_tree_has_only_the_empty_root() -> None:
    """No proof is asked from the empty tree (every tree extends it), so its root is all that
    can be wrong: a signed size 0 with another root was accepted as consistent with any tree."""
    sub = merkle.list_subtree(_tree(8))
    merkle.verify_consistency(0, 8, merkle.EMPTY_ROOT, sub(0, 8), [])
    merkle.verify_consistency(0, 0, merkle.EMPTY_ROOT, merkle.EMPTY_ROOT, [])
    for other in (bytes(32), sub(0, 8)):
        with pytest.raises(ProofError, match="empty tree's root"):
            merkle.verify_consistency(0, 8, other, sub(0, 8), [])
        with pytest.raises(ProofError, match="empty tree's root"):
            merkle.verify_consistency(0, 0, other, other, [])


def test_frontier_completes_each_node_once() -> None:
    leaves = _tree(64)
    sub = merkle.list_subtree(leaves)
    f = merkle.Frontier()
    nodes = {}
    for h in leaves:
        for level, index, node in f.push(h):
            assert (level, index) not in nodes
            nodes[(level, index)] = node
        size = f.size
        assert f.root() == sub(0, size)
        g = merkle.Frontier(size, [nodes[k] for k in merkle.edge_nodes(size)])
        assert g.root() == f.root()
    assert len(nodes) == 127
    for (level, index), node in nodes.items():
        assert node == sub(index << level, (index + 1) << level)
