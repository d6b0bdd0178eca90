"""``alcot.common.files``: atomic writes, the file checksum and the JSON-lines reader."""

import hashlib
import json

import pytest

from alcot.common.files import (
    JSONLineError,
    atomic_path,
    atomic_write,
    atomic_write_json,
    file_sha256,
    read_jsonl,
)


@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path, fsync):
    path = tmp_path / "a.csv"
    path.write_text("old\n")
    assert atomic_write(path, "x,y\r\n1,2\r\n", fsync=fsync) == path
    assert path.read_bytes() == b"x,y\r\n1,2\r\n"  # line ends kept as given
    atomic_write(path, b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_atomic_write_json_matches_json_dumps(tmp_path):
    obj = {"b": [1, 2], "a": "é"}
    atomic_write_json(tmp_path / "o.json", obj, indent=1)
    assert (tmp_path / "o.json").read_text() == json.dumps(obj, indent=1)
    atomic_write_json(tmp_path / "p.json", obj)
    assert (tmp_path / "p.json").read_text() == json.dumps(obj)


def test_file_sha256(tmp_path):
    data = bytes(range(256)) * 5000  # more than one read block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_read_jsonl_numbers_lines_and_names_the_bad_one(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n  \n[2]\n{"a": 3\n{"a": 4}\n')
    with pytest.raises(JSONLineError) as err:
        list(read_jsonl(path))
    assert err.value.lineno == 5 and isinstance(err.value.error, json.JSONDecodeError)
    assert list(read_jsonl(path, skip_bad=True)) == [(1, {"a": 1}), (4, [2]), (6, {"a": 4})]
    lines = path.read_text().splitlines()[:4]
    assert list(read_jsonl(iter(lines))) == [(1, {"a": 1}), (4, [2])]


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert [v for _, v in read_jsonl(path, skip_bad=True)] == [{"step": 1}, {"step": 2}]
