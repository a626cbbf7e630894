from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest

from epic.safe_pickle import UnsafePickleError, safe_load, safe_loads


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
