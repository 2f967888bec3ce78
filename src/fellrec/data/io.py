"""Reading the public file formats, with errors that name the file and the line.

Every loader reads through these functions, so every loader reports bad input the same way:
``DataError("<file>:<line>: <problem>")``, or, when the user asked to skip bad lines, a count of
what was skipped (``BadLines.summary()``). Gzip files are recognised by their magic bytes, so
``ratings.csv.gz`` and a gzip named ``.json`` both work.

CSV files are read with pandas' C parser (fast, one allocation per column); if that parser meets
anything odd (a short or long row, a non-numeric value, a blank line, a bad byte, a truncated
gzip) the file is read again line by line, which finds the exact line and either raises or skips.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fellrec.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"

# column kind -> (pandas dtype for the fast path, converter for the slow path)
_KINDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "str": ("object", str),
    "int": ("int64", int),
    "float": ("float64", float),
}


class BadLines:
    """What to do with a malformed line: raise at the first one (default) or skip and count.

    Problems that lose the rest of a file (missing file, truncated gzip, missing column) always raise.
    """

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def __call__(self, path: str | Path, line: int | None, problem: str) -> None:
        if not self.skip:
            raise DataError(path, line, problem)
        key = str(path)
        self.counts[key] += 1
        self.examples.setdefault(key, f"line {line}: {problem}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> list[str]:
        """One line per file that had skipped lines: how many, and the first problem."""
        return [f"{path}: skipped {n} bad line(s), first at {self.examples[path]}"
                for path, n in self.counts.items()]


def check_exists(path: str | Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, f"{what} not found")
    return path


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def open_binary(path: str | Path):
    """Open a plain or gzip file for reading bytes (gzip recognised by its magic bytes)."""
    path = check_exists(path)
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def iter_lines(path: str | Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` with 1-based line numbers and the newline stripped.

    A truncated or corrupt gzip stream, or bytes that are not valid ``encoding``, raise a DataError
    naming the line where reading stopped.
    """
    path = Path(path)
    lineno = 0
    with open_binary(path) as fh:
        try:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    text = raw.decode(encoding)
                except UnicodeDecodeError as err:
                    raise DataError(path, lineno, f"not valid {encoding} text ({err.reason})") from None
                yield lineno, text.rstrip("\r\n")
        except EOFError:
            raise DataError(path, lineno + 1, "truncated gzip file (ends before the end of the "
                            "compressed stream)") from None
        except (gzip.BadGzipFile, zlib.error) as err:
            raise DataError(path, lineno + 1, f"corrupt gzip data ({err})") from None


def iter_json(path: str | Path, bad: BadLines, encoding: str = "utf-8") -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for a file of one JSON object per line; blank lines are ignored."""
    for lineno, text in iter_lines(path, encoding):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            bad(path, lineno, f"malformed JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(obj, dict):
            bad(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield lineno, obj


def read_csv(
    path: str | Path,
    columns: dict[str, str],
    *,
    bad: BadLines,
    sep: str = ",",
    names: list[str] | None = None,
    encoding: str = "utf-8",
    quotes: bool = True,
) -> pd.DataFrame:
    """Read the given columns of a delimited text file into a DataFrame, plus ``_line`` (1-based).

    ``columns`` maps a column name to its kind: ``"str"``, ``"int"`` or ``"float"``; a ``?`` after
    the kind (``"str?"``, ``"float?"``) lets the field be empty ("" or NaN). With ``names``
    the file has no header and ``names`` names its fields in order; otherwise the first line is
    the header and every name in ``columns`` must be in it. ``sep`` may be more than one character
    (MovieLens-1M's ``::``). With ``quotes`` quoted fields follow the usual CSV rules (a quoted
    field spanning several lines is not supported); without, a ``"`` is an ordinary character, as
    in the tab- and pipe-separated MovieLens files.
    """
    path = check_exists(path)
    quoting = csv.QUOTE_MINIMAL if quotes else csv.QUOTE_NONE
    header = _read_header(path, sep, names, encoding, quoting)
    optional = {c for c, k in columns.items() if k.endswith("?")}
    columns = {c: k.rstrip("?") for c, k in columns.items()}
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(path, None if names else 1,
                        f"missing column(s) {', '.join(map(repr, missing))}; the header has {header}")
    first_data_line = 1 if names else 2
    try:
        frame = _read_fast(path, columns, header, sep, names, encoding, quoting)
    except (ValueError, pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError, EOFError,
            OSError, zlib.error):
        frame = None
    required = [c for c in columns if c not in optional]
    if frame is None or frame[required].isna().to_numpy().any():
        frame = _read_slow(path, columns, header, sep, first_data_line, bad, encoding, quoting, optional)
        return _fill_optional(frame, columns, optional)
    frame = _fill_optional(frame, columns, optional)
    frame["_line"] = np.arange(len(frame), dtype=np.int64) + first_data_line
    return frame


def _fill_optional(frame: pd.DataFrame, columns: dict[str, str], optional: set[str]) -> pd.DataFrame:
    for c in optional:
        if columns[c] == "str":
            frame[c] = frame[c].fillna("")
    return frame


def _read_header(path: Path, sep: str, names: list[str] | None, encoding: str, quoting: int) -> list[str]:
    if names is not None:
        return list(names)
    for _, text in iter_lines(path, encoding):
        return _split(text, sep, quoting)
    raise DataError(path, 1, "empty file (expected a header line)")


def _split(text: str, sep: str, quoting: int) -> list[str]:
    if len(sep) == 1:
        return next(csv.reader([text], delimiter=sep, quoting=quoting))
    return text.split(sep)


def _read_fast(path, columns, header, sep, names, encoding, quoting) -> pd.DataFrame:
    dtypes = {c: _KINDS[k][0] for c, k in columns.items()}
    with open_binary(path) as fh:
        source = fh
        if len(sep) > 1:  # the C parser takes one-character separators only
            source = io.BytesIO(fh.read().replace(sep.encode(encoding), b"\x1f"))
            sep = "\x1f"
        # All columns are read (with usecols the C parser drops extra fields silently); a row with
        # too many fields is then a ParserError, or on the first row a ParserWarning made an error.
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                source, sep=sep, header=None if names else 0, names=names, index_col=False,
                dtype=dtypes, encoding=encoding, keep_default_na=False, na_values=[""],
                skip_blank_lines=False, engine="c", quoting=quoting,
            )
    return frame[list(columns)].copy()


def _read_slow(path, columns, header, sep, first_data_line, bad, encoding, quoting, optional) -> pd.DataFrame:
    index = {c: header.index(c) for c in columns}
    convert = {c: _KINDS[k][1] for c, k in columns.items()}
    values: dict[str, list] = {c: [] for c in columns}
    lines: list[int] = []
    for lineno, text in iter_lines(path, encoding):
        if lineno < first_data_line or not text.strip():
            continue
        fields = _split(text, sep, quoting)
        if len(fields) != len(header):
            bad(path, lineno, f"expected {len(header)} fields, got {len(fields)}")
            continue
        row = {}
        for c, i in index.items():
            try:
                if fields[i] == "" and c in optional:
                    row[c] = "" if columns[c] == "str" else np.nan
                    continue
                if fields[i] == "":
                    raise ValueError
                row[c] = convert[c](fields[i])
            except ValueError:
                kind = columns[c]
                what = "empty" if fields[i] == "" else f"not {'a number' if kind != 'str' else 'text'}"
                bad(path, lineno, f"column {c!r}: {fields[i]!r} is {what}")
                break
        else:
            for c in columns:
                values[c].append(row[c])
            lines.append(lineno)
    frame = pd.DataFrame({c: pd.Series(v, dtype=_KINDS[columns[c]][0]) for c, v in values.items()})
    frame["_line"] = np.asarray(lines, dtype=np.int64)
    return frame


def require(obj: dict, key: str, path: str | Path, line: int, bad: BadLines) -> Any:
    """``obj[key]`` or, if it is absent or null, a bad line (returns None when skipping)."""
    value = obj.get(key)
    if value is None:
        bad(path, line, f"missing key {key!r}")
    return value


def as_number(value: Any, key: str, path: str | Path, line: int, bad: BadLines) -> float | None:
    """A JSON value that must be a number (a numeric string is accepted); None after a skipped line."""
    if isinstance(value, bool):
        bad(path, line, f"{key!r}: {value!r} is not a number")
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        bad(path, line, f"{key!r}: {value!r} is not a number")
        return None
    if not np.isfinite(number):
        bad(path, line, f"{key!r}: {value!r} is not a finite number")
        return None
    return number


def interaction_frame(users: list, items: list, timestamps: list[float], ratings: list[float],
                      lines: list[int], seconds_per_unit: float = 1.0) -> pd.DataFrame:
    """The raw interactions table a loader hands to ``Dataset.from_raw``, from per-line lists."""
    return pd.DataFrame({
        "user_id": pd.Series(users, dtype=object),
        "item_id": pd.Series(items, dtype=object),
        "timestamp": np.asarray(timestamps, dtype=np.float64) * seconds_per_unit,
        "rating": np.asarray(ratings, dtype=np.float64),
        "_line": np.asarray(lines, dtype=np.int64),
    })


def drop_unknown(frame: pd.DataFrame, column: str, known: pd.Series | pd.Index, path: str | Path,
                 bad: BadLines, what: str = "item") -> pd.DataFrame:
    """Rows whose ``column`` is not in ``known`` are bad lines ("unknown item ..."); returns the rest.

    ``frame`` must carry the ``_line`` column that ``read_csv`` adds (or the loader's own).
    """
    ok = frame[column].isin(known).to_numpy()
    for row in frame.loc[~ok, [column, "_line"]].itertuples(index=False):
        bad(path, int(row[1]), f"unknown {what} {row[0]!r} (not in the {what} file)")
    return frame.loc[ok]
