"""Atomic writes: no torn files, no temporary left behind, no planted link followed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from epic.io.files import replace_atomically


def test_replace_atomically_writes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    replace_atomically(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")

    def boom(f: object) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(target, boom)
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_links_planted_at_predictable_names_are_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "elsewhere.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("metrics.json.tmp", "checkpoint.pt.tmp", ".metrics.json.tmp"):
        (out / name).symlink_to(victim)
    replace_atomically(out / "metrics.json", lambda f: f.write(b"{}"))
    replace_atomically(out / "checkpoint.pt", lambda f: f.write(b"state"))
    assert victim.read_bytes() == b"precious"
    assert (out / "metrics.json").read_bytes() == b"{}"


def test_written_files_get_the_usual_permissions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    old = os.umask(0o022)
    try:
        replace_atomically(tmp_path / "a.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
