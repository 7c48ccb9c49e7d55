#!/usr/bin/env python3
"""An independent check of `signpost audit prove|consistency --json` output.

Implements the verification algorithms of RFC 9162 section 2.1.3.2 (inclusion) and 2.1.4.2
(consistency) from the RFC's text, with hashlib only, so the Rust prover and verifier are held
to the standard rather than to each other.

Usage: rfc9162.py inclusion|consistency < the command's JSON. Exits 0 if the proof verifies,
1 (with the reason on stderr) if it does not.
"""

import hashlib
import json
import sys


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def verify_inclusion(leaf: bytes, index: int, size: int, root: bytes, path: list) -> None:
    """RFC 9162 2.1.3.2."""
    if index >= size:
        raise ValueError(f"leaf {index} is not in a tree of {size}")
    fn, sn = index, size - 1
    r = leaf_hash(leaf)
    for p in path:
        if sn == 0:
            raise ValueError("the path is longer than the tree is deep")
        if fn & 1 == 1 or fn == sn:
            r = node_hash(p, r)
            if fn & 1 == 0:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("the path is shorter than the tree is deep")
    if r != root:
        raise ValueError("the path leads to another root")


def verify_consistency(first: int, second: int, first_hash: bytes, second_hash: bytes, path: list) -> None:
    """RFC 9162 2.1.4.2."""
    if first > second:
        raise ValueError("the tree went backwards")
    if first == second:
        if path or first_hash != second_hash:
            raise ValueError("two different trees of one size")
        return
    if first == 0:
        return
    path = list(path)
    if first & (first - 1) == 0:
        # A power of two: the old root is the first node of the proof.
        path.insert(0, first_hash)
    if not path:
        raise ValueError("an empty proof")
    fn, sn = first - 1, second - 1
    while fn & 1 == 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ValueError("the proof is longer than the tree is deep")
        if fn & 1 == 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if fn & 1 == 0:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("the proof is shorter than the tree is deep")
    if fr != first_hash:
        raise ValueError("the proof does not lead to the old root")
    if sr != second_hash:
        raise ValueError("the proof does not lead to the new root")


def main() -> int:
    kind = sys.argv[1]
    doc = json.load(sys.stdin)
    hashes = [bytes.fromhex(h) for h in doc["hashes"]]
    try:
        if kind == "inclusion":
            verify_inclusion(
                bytes.fromhex(doc["leaf"]),
                doc["index"],
                doc["tree_size"],
                bytes.fromhex(doc["root_hash"]),
                hashes,
            )
        elif kind == "consistency":
            verify_consistency(
                doc["old_size"],
                doc["new_size"],
                bytes.fromhex(doc["old_root"]),
                bytes.fromhex(doc["new_root"]),
                hashes,
            )
        else:
            print(f"unknown proof kind {kind}", file=sys.stderr)
            return 2
    except ValueError as e:
        print(f"does not verify: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
