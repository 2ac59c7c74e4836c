"""The digest algorithm named per part (SPEC.md §4.5, format 1.1): xxh3-128 for new parts,
sha256-128 for 1.0 parts (golden files), values checked with their own part's algorithm, and
the differ comparing digests only of one algorithm."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import xxhash

from steptrace.differ import diff
from steptrace.tracefmt import TraceReader, TraceWriter, digest
from steptrace.tracefmt.errors import TraceCorruptError, TraceFormatError, TraceUsageError
from steptrace.tracefmt.payload import DEFAULT_DIGEST, SHA256_128, XXH3_128

GOLDEN = Path(__file__).parent / "golden"


def test_digest_algorithms_match_their_reference_definitions():
    data = np.arange(1000, dtype=np.float32).tobytes()
    assert digest(b"", XXH3_128).hex() == "99aa06d3014798d86001c324468d497f"  # XXH3_128 of "" (xxHash test vector)
    assert digest(data, XXH3_128) == xxhash.xxh3_128(data).digest() == xxhash.xxh3_128_intdigest(data).to_bytes(16, "big")
    assert digest(data, SHA256_128) == hashlib.sha256(data).digest()[:16] == digest(data)
    with pytest.raises(TraceFormatError, match="unknown to this steptrace"):
        digest(data, "md5")


def _write(path: Path, algorithm: str | None, *, values: bool, bump: float = 0.0) -> Path:
    opts = {} if algorithm is None else {"digest": algorithm}
    with TraceWriter(path, **opts) as w:
        for step in range(3):
            w.add_logits("s", step, np.array([0.0, 2.0, 1.0], np.float32))
            w.add_tensor("s", step, "x", np.arange(64, dtype=np.float32) + step + bump, values=values)
            w.add_tensor("s", step, "b", np.array([True, False]), values=values)
    return path


def test_new_parts_name_xxh3_and_their_values_verify(tmp_path):
    p = _write(tmp_path / "t.trace", None, values=True)
    status = json.loads(next((p / "parts").glob("*.json")).read_text())
    assert status["digest"] == DEFAULT_DIGEST == XXH3_128
    r = TraceReader(p)
    assert [part.digest for part in r.parts] == [XXH3_128]
    assert json.loads((p / "steptrace.json").read_text())["version"] == "1.2"
    row = r.tensors(step=1, name="x").to_pylist()[0]
    assert row["digest"] == xxhash.xxh3_128_digest((np.arange(64, dtype=np.float32) + 1).tobytes())
    np.testing.assert_array_equal(r.tensor("s", 1, "x"), np.arange(64, dtype=np.float32) + 1)  # verified


def test_sha256_parts_still_write_read_and_verify(tmp_path):
    p = _write(tmp_path / "t.trace", SHA256_128, values=True)
    r = TraceReader(p)
    assert [part.digest for part in r.parts] == [SHA256_128]
    row = r.tensors(step=2, name="x").to_pylist()[0]
    assert row["digest"] == hashlib.sha256((np.arange(64, dtype=np.float32) + 2).tobytes()).digest()[:16]
    np.testing.assert_array_equal(r.tensor("s", 2, "x"), np.arange(64, dtype=np.float32) + 2)
    with pytest.raises(TraceUsageError, match="digest 'crc32' is unknown"):
        TraceWriter(tmp_path / "u.trace", digest="crc32")


def test_golden_1_0_parts_use_sha256_and_verify():
    r = TraceReader(GOLDEN / "v1-basic")
    assert {part.digest for part in r.parts} == {SHA256_128}
    assert r.tensor("utt-b", 1, "encoder.out").shape == (3, 4)  # checked against its SHA-256 digest


def test_a_part_naming_an_unknown_algorithm_is_unreadable_not_damaged(tmp_path):
    p = _write(tmp_path / "t.trace", None, values=True)
    status_path = next((p / "parts").glob("*.json"))
    status = json.loads(status_path.read_text())
    status_path.write_text(json.dumps({**status, "digest": "blake9-128"}))
    r = TraceReader(p)
    assert r.tensors().num_rows == 6  # rows still read
    with pytest.raises(TraceFormatError, match="unknown to this steptrace"):
        r.tensor("s", 0, "x")
    assert r.tensor("s", 0, "x", verify=False).size == 64


def test_a_value_not_matching_its_xxh3_digest_is_reported_damaged(tmp_path):
    r = TraceReader(_write(tmp_path / "t.trace", None, values=True))
    row = r.tensors(step=0, name="x").to_pylist()[0]
    other = r.tensors(step=1, name="x").to_pylist()[0]["digest"]  # another tensor's digest
    assert r.tensor_at(0, 0, dtype="float32", shape=row["shape"], digest=row["digest"]).size == 64
    with pytest.raises(TraceCorruptError, match="do not match their digest"):
        r.tensor_at(0, 0, dtype="float32", shape=row["shape"], digest=other)


def test_differ_compares_digests_of_one_algorithm_only(tmp_path):
    """Identical statistics-only tensors: two xxh3 traces are bit-exact by digest; an xxh3 and a
    sha256 trace are not called bit-exact (their digests cannot be compared), nor different."""
    a = _write(tmp_path / "a.trace", None, values=False)
    b = _write(tmp_path / "b.trace", None, values=False)
    s = _write(tmp_path / "s.trace", SHA256_128, values=False)
    same = diff(a, [b]).worst.tensors
    assert same["bitexact"] == same["compared"] == 6 and same["by_basis"].get("digest") == 6
    mixed = diff(a, [s])
    assert mixed.worst.tensors["bitexact"] == 0 and mixed.worst.tensors["beyond"] == 0
    assert mixed.worst.tensors["by_basis"].get("stats") == 6 and mixed.verdict == "equivalent"


def test_differ_finds_bit_exact_values_across_algorithms(tmp_path):
    a = _write(tmp_path / "a.trace", None, values=True)
    s = _write(tmp_path / "s.trace", SHA256_128, values=True)
    t = diff(a, [s]).worst.tensors
    assert t["bitexact"] == t["compared"] == 6 and t["by_basis"].get("values") == 6
    changed = _write(tmp_path / "c.trace", SHA256_128, values=True, bump=1e-3)
    assert diff(a, [changed]).worst.tensors["bitexact"] == 3  # the bool tensor of each step only
