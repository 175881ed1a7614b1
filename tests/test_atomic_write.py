"""riskpipe.paths.atomic_write: readers see the old file or the whole new one, never a part."""

from __future__ import annotations

import os
import stat

import pytest

from riskpipe.paths import atomic_write
from riskpipe.stream.io import JsonlSource


def test_the_new_file_replaces_the_old_one_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "cache.bin"
    path.write_bytes(b"old")
    with atomic_write(path) as f:
        f.write(b"new ")
        assert path.read_bytes() == b"old"  # not visible until the write is complete
        f.write(b"content")
    assert path.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["cache.bin"]


def test_an_error_while_writing_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "choice.json"
    path.write_text("{}")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_write(path, "w") as f:
        f.write('{"batch_size": ')
        raise RuntimeError("interrupted")
    assert path.read_text() == "{}"
    assert os.listdir(tmp_path) == ["choice.json"]


def test_the_file_gets_the_permissions_open_would_give_it(tmp_path):
    plain, atomic = tmp_path / "plain", tmp_path / "atomic"
    plain.write_bytes(b"x")
    with atomic_write(atomic) as f:
        f.write(b"x")
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_only_write_modes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_write(tmp_path / "f", "ab"):
        pass


def test_a_jsonl_source_resumes_after_its_checkpoint(tmp_path):
    data, checkpoint = tmp_path / "events.jsonl", tmp_path / "offset"
    data.write_text("".join(f'{{"n": {i}}}\n' for i in range(5)))
    first = JsonlSource(str(data), str(checkpoint))
    first.commit(first.poll(3, 0))
    first.close()
    assert checkpoint.read_text() == "3"
    again = JsonlSource(str(data), str(checkpoint))
    assert [m.offset for m in again.poll(10, 0)] == [3, 4]
    again.close()
