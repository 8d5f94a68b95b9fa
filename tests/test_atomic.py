"""kse.atomic: flushed to disk before and after the rename, no leftovers of killed writers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kse.atomic as atomic
from kse.atomic import atomic_path, remove_stale_temporaries, write_text


def test_the_file_is_flushed_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "m.txt"
    write_text(target, "hello")
    assert target.read_text() == "hello"
    file_ino, folder_ino = target.stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", file_ino), ("replace", file_ino), ("fsync", folder_ino)]


def test_a_failed_fsync_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m.txt"
    target.write_text("old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device"):
        write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.txt"]


_KILLED_WRITER = """
import os, sys
sys.path.insert(0, {src!r})
from kse.atomic import atomic_path
with atomic_path({target!r}) as tmp:
    tmp.write_text("half")
    os._exit(9)  # killed during the final write: no clean-up runs
"""


def test_a_killed_writer_leaves_nothing_after_the_next_write(tmp_path):
    target = tmp_path / "model.kse"
    src = str(Path(atomic.__file__).parent.parent)
    subprocess.run([sys.executable, "-c", _KILLED_WRITER.format(src=src, target=str(target))], check=False)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".model.kse.") and leftovers[0].endswith(".tmp")
    write_text(target, "whole")
    assert [p.name for p in tmp_path.iterdir()] == ["model.kse"] and target.read_text() == "whole"


def test_a_running_writers_temporary_file_is_kept(tmp_path):
    target = tmp_path / "model.kse"
    with atomic_path(target) as outer:  # this process is still writing it
        outer.write_text("outer")
        write_text(target, "inner")
        assert outer.exists()
        other = tmp_path / "notes.txt"  # and another target's leftovers are not this write's business
        stale_other = tmp_path / f".notes.txt.{atomic._HOST}-999999999.abcdefgh.tmp"
        stale_other.write_text("x")
        assert remove_stale_temporaries(target) == []
        assert stale_other.exists() and not other.exists()
    assert target.read_text() == "outer"
    foreign_host = tmp_path / ".model.kse.00000000-999999999.abcdefgh.tmp"  # another machine's writer
    foreign_host.write_text("x")
    write_text(target, "again")
    assert foreign_host.exists()
