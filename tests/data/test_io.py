"""The shared readers: exact line numbers in errors, skip mode, gzip handling, fast and slow paths."""

import gzip

import numpy as np
import pytest

from fellrec.data import io as io_module
from fellrec.data.io import BadLines, iter_json, iter_lines, read_csv
from fellrec.errors import DataError

COLS = {"user": "int", "item": "str", "ts": "float"}


def write(path, text, gz=False):
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_read_csv_good_file_gives_typed_columns_and_line_numbers(tmp_path):
    f = write(tmp_path / "r.csv", "user,item,ts,extra\n1,a,10,x\n2,\"b,c\",11.5,y\n")
    frame = read_csv(f, COLS, bad=BadLines())
    assert frame["user"].tolist() == [1, 2]
    assert frame["item"].tolist() == ["a", "b,c"]
    assert frame["ts"].tolist() == [10.0, 11.5]
    assert frame["_line"].tolist() == [2, 3]
    assert "extra" not in frame


def test_read_csv_gzip_is_detected_by_content_not_name(tmp_path):
    f = write(tmp_path / "r.csv", "user,item,ts\n1,a,10\n", gz=True)
    assert read_csv(f, COLS, bad=BadLines())["item"].tolist() == ["a"]


@pytest.mark.parametrize(
    ("body", "line", "problem"),
    [
        ("1,a,10\n2,b\n3,c,12\n", 3, "expected 3 fields, got 2"),
        ("1,a,10\n2,b,11,9\n", 3, "expected 3 fields, got 4"),
        ("1,a,10,9\n2,b,11\n", 2, "expected 3 fields, got 4"),
        ("1,a,10\n2,b,yesterday\n", 3, r"column 'ts': 'yesterday' is not a number"),
        ("1,a,10\nx,b,11\n", 3, r"column 'user': 'x' is not a number"),
        ("1,a,10\n2,,11\n", 3, r"column 'item': '' is empty"),
    ],
)
def test_read_csv_bad_line_is_named(tmp_path, body, line, problem):
    f = write(tmp_path / "r.csv", "user,item,ts\n" + body)
    with pytest.raises(DataError, match=rf"r\.csv:{line}: {problem}"):
        read_csv(f, COLS, bad=BadLines())


def test_read_csv_skip_mode_keeps_good_rows_and_counts(tmp_path):
    f = write(tmp_path / "r.csv", "user,item,ts\n1,a,10\n2,b\n\n3,c,zz\n4,d,13\n")
    bad = BadLines(skip=True)
    frame = read_csv(f, COLS, bad=bad)
    assert frame["user"].tolist() == [1, 4]
    assert frame["_line"].tolist() == [2, 6]  # the blank line 4 is ignored, not an error
    assert bad.total == 2
    assert "line 3: expected 3 fields, got 2" in bad.summary()[0]


def test_read_csv_missing_column_names_header(tmp_path):
    f = write(tmp_path / "r.csv", "user,item,time\n1,a,10\n")
    with pytest.raises(DataError, match=r"r\.csv:1: missing column\(s\) 'ts'"):
        read_csv(f, COLS, bad=BadLines(skip=True))


def test_read_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        read_csv(tmp_path / "nope.csv", COLS, bad=BadLines())


def test_read_csv_multichar_separator_without_header(tmp_path):
    f = write(tmp_path / "r.dat", "1::a::10\n2::b: c::11\n")
    frame = read_csv(f, COLS, sep="::", names=["user", "item", "ts"], quotes=False, bad=BadLines())
    assert frame["item"].tolist() == ["a", "b: c"]
    assert frame["_line"].tolist() == [1, 2]


def test_read_csv_optional_column_may_be_empty(tmp_path):
    f = write(tmp_path / "r.csv", "user,item,ts\n1,,10\n")
    frame = read_csv(f, {"user": "int", "item": "str?", "ts": "float"}, bad=BadLines())
    assert frame["item"].tolist() == [""]


def test_truncated_gzip_names_the_line_where_it_stops(tmp_path):
    full = tmp_path / "full.gz"
    write(full, "".join(f"{i},x,{i}\n" for i in range(5000)), gz=True)
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(full.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"cut\.csv\.gz:\d+: truncated gzip file"):
        list(iter_lines(cut))
    with pytest.raises(DataError, match="truncated gzip"):  # skip mode cannot recover lost lines
        read_csv(cut, COLS, names=["user", "item", "ts"], bad=BadLines(skip=True))


def test_bad_encoding_is_named(tmp_path):
    f = tmp_path / "r.csv"
    f.write_bytes(b"user,item,ts\n1,caf\xe9,10\n")
    with pytest.raises(DataError, match=r"r\.csv:2: not valid utf-8 text"):
        read_csv(f, COLS, bad=BadLines())


def test_iter_json_malformed_line_and_skip(tmp_path):
    f = write(tmp_path / "r.json", '{"a": 1}\n{"a": 2\n[1, 2]\n\n{"a": 3}\n')
    with pytest.raises(DataError, match=r"r\.json:2: malformed JSON"):
        list(iter_json(f, BadLines()))
    bad = BadLines(skip=True)
    got = [(line, obj["a"]) for line, obj in iter_json(f, bad)]
    assert got == [(1, 1), (5, 3)]
    assert bad.total == 2


def test_good_files_take_the_fast_path(tmp_path, monkeypatch):
    def no_slow_path(*args):
        raise AssertionError("the line-by-line reader was used for a well-formed file")

    monkeypatch.setattr(io_module, "_read_slow", no_slow_path)
    f = write(tmp_path / "r.csv", "user,item,ts,extra\n1,a,10,x\n2,b,11,y\n", gz=True)
    assert read_csv(f, COLS, bad=BadLines())["user"].tolist() == [1, 2]
    f = write(tmp_path / "r.dat", "1::a::10\n2::b::11\n")
    frame = read_csv(f, COLS, sep="::", names=["user", "item", "ts"], bad=BadLines())
    assert frame["ts"].tolist() == [10, 11]
    f = write(tmp_path / "o.csv", "user,item,ts\n1,,10\n")
    frame = read_csv(f, {"user": "int", "item": "str?", "ts": "float"}, bad=BadLines())
    assert frame["item"].tolist() == [""]


def test_fast_and_slow_paths_agree(tmp_path):
    rng = np.random.default_rng(0)
    rows = [f"{u},i{i},{t}" for u, i, t in zip(rng.integers(0, 50, 300), rng.integers(0, 80, 300),
                                               rng.random(300) * 1e9, strict=True)]
    good = write(tmp_path / "good.csv", "user,item,ts\n" + "\n".join(rows) + "\n")
    fast = read_csv(good, COLS, bad=BadLines())
    bad_file = write(tmp_path / "bad.csv", "user,item,ts\n" + "\n".join(rows) + "\nnot,a\n")
    slow = read_csv(bad_file, COLS, bad=BadLines(skip=True))  # the bad last line forces the slow path
    for col in ("user", "item", "ts", "_line"):
        assert fast[col].tolist() == slow[col].tolist()
