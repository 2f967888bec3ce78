"""KuaiRand (Kuaishou short-video logs with randomly exposed videos; Gao et al., CIKM 2022), as the
user downloads a release (Pure, 1K or 27K, recognised from the file names; ``path`` is its ``data``
folder or the folder above it).

Interactions are every log row in file order (the two standard logs, then the random one, with a
note on how many came from it; 27K's parts in order), rating ``is_click`` (0: shown, not clicked),
timestamp ``time_ms / 1000``. Users keep every ``user_features`` column; items the basic video
features left-joined with the statistic ones. Videos have no titles: each is named by its id (one
note). A row whose video or user is missing from the feature files is a bad line. Files and
columns: docs/DATA.md; -27K (322 M rows) needs tens of GB of RAM.
"""

from __future__ import annotations

import re
import warnings
import zlib
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd

from fellrec.data import io
from fellrec.data.io import BadLines
from fellrec.data.tables import Dataset
from fellrec.errors import ConfigError, DataError

VERSIONS = ("pure", "1k", "27k")
_STANDARD_LOGS = ("log_standard_4_08_to_4_21", "log_standard_4_22_to_5_08")
_RANDOM_LOG = "log_random_4_22_to_5_08"
_LOG_COLUMNS = {"user_id": "int", "video_id": "int", "time_ms": "float", "is_click": "float"}
_PART = re.compile(r"_part(\d+)\.csv$")


def load_kuairand(path: Path, *, meta: Path | None = None, bad: BadLines | None = None) -> Dataset:
    """A KuaiRand-Pure / -1K / -27K data folder: logs, user features, video features."""
    if meta is not None:
        raise ConfigError("data.meta: the kuairand format reads every file from its folder; leave it unset")
    bad = bad or BadLines()
    folder = _data_folder(io.check_exists(path, "KuaiRand folder"))
    version = _version(folder)
    users = _read_tables(_files(folder, f"user_features_{version}"), "user_id", bad)
    items = _items(folder, version, bad)
    standard = [f for stem in _STANDARD_LOGS for f in _files(folder, f"{stem}_{version}")]
    random = _files(folder, f"{_RANDOM_LOG}_{version}")
    logs = [_read_log(f, items["item_id"], users["user_id"], bad) for f in [*standard, *random]]
    n_random = sum(len(frame) for frame in logs[len(standard):])
    inter = pd.concat(logs, ignore_index=True)
    ds = Dataset.from_raw(f"kuairand-{version}", inter, items, users, source=str(folder))
    ds.notes.append(f"{n_random} of {len(inter)} interactions come from the random-exposure log "
                    f"({', '.join(f.name for f in random)})")
    return ds


def _data_folder(path: Path) -> Path:
    """``path`` itself if it holds the logs, else its ``data`` subfolder (the release folder's layout)."""
    if not any(path.glob("log_*.csv")) and (path / "data").is_dir():
        return path / "data"
    return path


def _version(folder: Path) -> str:
    """``pure``, ``1k`` or ``27k``, from which ``log_standard_4_08_to_4_21_<v>`` file is present."""
    found = [v for v in VERSIONS if _parts(folder, f"{_STANDARD_LOGS[0]}_{v}")]
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(folder, None, "no KuaiRand log found (expected log_standard_4_08_to_4_21_<v>.csv "
                        f"with <v> one of {', '.join(VERSIONS)})")
    raise DataError(folder, None, f"holds logs of several KuaiRand releases ({', '.join(found)}); "
                    "keep one release per folder")


def _parts(folder: Path, stem: str) -> list[Path]:
    """``<stem>.csv``, or ``<stem>_part1.csv``, ``_part2``, ... in part order; [] if neither exists."""
    single = folder / f"{stem}.csv"
    if single.exists():
        return [single]
    parts = [p for p in folder.glob(f"{stem}_part*.csv") if _PART.search(p.name)]
    return sorted(parts, key=lambda p: int(_PART.search(p.name).group(1)))


def _files(folder: Path, stem: str) -> list[Path]:
    parts = _parts(folder, stem)
    if not parts:
        raise DataError(folder / f"{stem}.csv", None, "file not found")
    return parts


def _items(folder: Path, version: str, bad: BadLines) -> pd.DataFrame:
    """Basic video features left-joined with the statistic ones; ``video_id`` -> ``item_id``, no title."""
    basic = _read_tables(_files(folder, f"video_features_basic_{version}"), "video_id", bad)
    stats = _read_tables(_files(folder, f"video_features_statistic_{version}"), "video_id", bad)
    stats = stats.drop_duplicates("video_id", keep="first")
    items = basic.merge(stats, on="video_id", how="left", sort=False, suffixes=("", "_statistic"))
    return items.rename(columns={"video_id": "item_id"})


def _read_log(path: Path, videos: pd.Series, users: pd.Series, bad: BadLines) -> pd.DataFrame:
    """One log file as user_id, item_id, timestamp (seconds), rating (is_click), _line."""
    log = io.read_csv(path, _LOG_COLUMNS, bad=bad)
    log = log.rename(columns={"video_id": "item_id"})
    log = io.drop_unknown(log, "item_id", videos, path, bad)
    log = io.drop_unknown(log, "user_id", users, path, bad, what="user")
    return pd.DataFrame({
        "user_id": log["user_id"].to_numpy(),
        "item_id": log["item_id"].to_numpy(),
        "timestamp": log["time_ms"].to_numpy(dtype=np.float64) / 1000.0,
        "rating": log["is_click"].to_numpy(dtype=np.float64),
        "_line": log["_line"].to_numpy(),
    })


def _read_tables(paths: list[Path], key: str, bad: BadLines) -> pd.DataFrame:
    frames = [_read_table(p, key, bad) for p in paths]
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _read_table(path: Path, key: str, bad: BadLines) -> pd.DataFrame:
    """Every column of a feature CSV, ``key`` as int64, in file order.

    The whole file is read once with pandas' type inference. If that read fails or the key column is
    not clean integers, ``io.read_csv`` reads the key column to find the bad lines (it raises, or
    skips and counts), and the lines it kept are parsed again with every column.
    """
    table = _read_all(path)
    if table is not None and key in table and pd.api.types.is_integer_dtype(table[key]):
        return table
    keys = io.read_csv(path, {key: "int"}, bad=bad)
    keep = set(keys["_line"].tolist())
    text = StringIO()
    for lineno, line in io.iter_lines(path):
        if lineno == 1 or lineno in keep:
            text.write(line + "\n")
    text.seek(0)
    try:
        table = pd.read_csv(text, keep_default_na=False, na_values=[""], low_memory=False)
    except (ValueError, pd.errors.ParserError) as err:
        raise DataError(path, None, f"cannot parse the feature table ({err})") from None
    table[key] = keys[key].to_numpy()
    return table


def _read_all(path: Path) -> pd.DataFrame | None:
    """The file as pandas reads it, or None if pandas meets anything odd (left to io.read_csv to name).

    ``index_col=False`` with ParserWarning as an error: otherwise a first data row with one field too
    many would silently become the row index and shift every column.
    """
    try:
        with io.open_binary(path) as fh, warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(fh, index_col=False, keep_default_na=False, na_values=[""],
                               skip_blank_lines=False, low_memory=False, engine="c")
    except (ValueError, pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError, EOFError,
            OSError, zlib.error):
        return None
