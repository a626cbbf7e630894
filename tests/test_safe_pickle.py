from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest

from epic.io.safe_pickle import UnsafePickleError, safe_load, safe_loads


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_admits_arrays_numbers_and_containers() -> None:
    obj = {"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, 2],
           b"raw": (1.5, None, "x"), "scalar": np.float32(2.5)}
    out = safe_loads(pickle.dumps(obj, protocol=2))
    np.testing.assert_array_equal(out["data"], obj["data"])
    assert out["labels"] == [1, 2] and out[b"raw"] == (1.5, None, "x")
    assert out["scalar"] == np.float32(2.5)


def test_refuses_code_and_runs_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _Exploit(str(marker))})
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nt.system"):
        safe_load(io.BytesIO(payload))
    assert not marker.exists()


def test_refuses_object_arrays() -> None:
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(np.array([1, "a"], dtype=object)))


def test_extra_globals_map_to_stand_ins() -> None:
    payload = pickle.dumps(_Exploit("never"))
    module = _Exploit.__reduce__(_Exploit("x"))[0].__module__
    sentinel = []
    out = safe_loads(payload, extra={(module, "system"): lambda cmd: sentinel.append(cmd) or 7})
    assert out == 7 and sentinel == ["touch never"]


class _ForgedDtype:
    """An object dtype whose pickled state claims no flags (so not 'hasobject')."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0))


class _ArrayOf:
    def __init__(self, dtype: object) -> None:
        self.dtype = dtype

    def __reduce__(self):  # type: ignore[no-untyped-def]
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"),
                (1, (2,), self.dtype, False, b"\x41" * 16))


def test_forged_object_dtype_is_refused_before_anything_reads_it() -> None:
    # reading an element of the forged array would dereference 0x4141414141414141
    with pytest.raises(UnsafePickleError, match="dtype"):
        safe_loads(pickle.dumps({"data": _ArrayOf(_ForgedDtype())}, protocol=2))


def test_structured_and_object_arrays_are_refused_plain_ones_pass() -> None:
    with pytest.raises(UnsafePickleError, match="dtype"):
        safe_loads(pickle.dumps(np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])))
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(np.array([1, "x"], dtype=object)))
    for dtype in ("u1", "i8", "f4", "f8", "c8", "?", "S3", "U2"):
        arr = np.zeros(3, dtype=dtype)
        assert np.array_equal(safe_loads(pickle.dumps(arr)), arr)
    assert safe_loads(pickle.dumps(np.float32(1.5))) == np.float32(1.5)


def test_shared_references_nested_deep_are_counted_in_linear_time() -> None:
    """2**60 paths through 60 shared lists: a small file that a reader copying each
    reference would need exabytes for. Sizing it walks each list once; it is refused."""
    import time

    nest: list[object] = []
    for _ in range(60):
        nest = [nest, nest]
    data = pickle.dumps(nest)
    assert len(data) < 1000
    start = time.perf_counter()
    with pytest.raises(UnsafePickleError, match="once every shared reference is counted"):
        safe_loads(data)
    assert time.perf_counter() - start < 1
    few: list[object] = []
    for _ in range(10):  # 2**10 paths: well within the limit, and loaded as shared
        few = [few, few]
    loaded = safe_loads(pickle.dumps(few))
    assert loaded[0] is loaded[1]
