"""Reports on finished runs: ``report.md`` and plots for one run, tables comparing several.

Reads what a run writes into ``runs/<name>/`` (``config.yaml``, ``metrics.jsonl``, ``results.json``)
and writes, next to them:

- ``report.md``: settings, overall / per-client / imbalance / per-round tables, links to the plots;
- ``plots/clients.png``: test metrics per client (grouped bars);
- ``plots/convergence.png``: training loss and validation metric per client and round;
- ``plots/imbalance.png``: spread of the validation metric across clients per round (only when at
  least two clients were validated in some round).

:func:`compare` puts several runs side by side (markdown, optionally ``compare.md`` and
``compare.png``); :func:`format_compare` is the same for a terminal. Every file is written through a
temporary file and a rename, so a half-written report never replaces a good one. Plots are drawn
with matplotlib's Agg canvas directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fellrec.errors import DataError, FellrecError
from fellrec.files import atomic, write_text
from fellrec.results import read_test_users, task_of

MISSING = "-"
_ABBREV = {"recall": "R", "ndcg": "N"}


@dataclass
class Run:
    """One finished run: its directory, resolved config, results and per-round records."""

    path: Path
    config: dict[str, Any]
    results: dict[str, Any]
    rounds: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return str(self.results.get("name") or self.path.name)

    @property
    def select_by(self) -> str:
        return str(self.results.get("select_by") or "recall@10")

    def client_ids(self) -> list[str]:
        """Client ids (as str) with test results, in numeric order where they are numbers."""
        return sort_ids(self.results.get("clients", {}))

    def client_name(self, cid: str) -> str:
        return str(self.results.get("client_names", {}).get(cid, cid))


# ---------------------------------------------------------------- loading


def load_run(run_dir: str | Path) -> Run:
    """Read a finished run; a missing run, an unfinished one or a malformed file raises ``DataError``."""
    path = Path(run_dir)
    if not path.is_dir():
        raise DataError(path, None, "no such run directory")
    results_path = path / "results.json"
    if not results_path.exists():
        raise DataError(results_path, None, "missing: the run is unfinished (or never started), nothing to report")
    results = _read_json(results_path)
    config = _resolved(_read_yaml(path / "config.yaml"))
    rounds = _read_rounds(path / "metrics.jsonl")
    return Run(path=path, config=config, results=results, rounds=rounds)


def _resolved(config: dict[str, Any]) -> dict[str, Any]:
    """The run's config with every key this version knows (its defaults filled in), so that runs saved
    by versions with fewer keys compare equal where they are equal; as saved when this version cannot
    read it (a key since renamed or removed)."""
    from fellrec.config import config_from_text, to_dict

    if not config:
        return config
    try:
        return to_dict(config_from_text(yaml.safe_dump(config), "config.yaml"))
    except FellrecError:
        return config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(path, err.lineno, f"not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise DataError(path, None, "expected a JSON object")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    """The run's config as a plain dict; an absent file gives ``{}`` (reports only use a few keys)."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataError(path, mark.line + 1 if mark else None, "not valid YAML") from None
    if not isinstance(data, dict):
        raise DataError(path, None, "expected a mapping of settings")
    return data


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    """The round records of ``metrics.jsonl`` (lines with a ``round`` key), sorted by round."""
    if not path.exists():
        return []
    rounds = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, number, f"not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(path, number, "expected a JSON object")
            if "round" in record:
                if not isinstance(record["round"], int):
                    raise DataError(path, number, f"round must be an integer, got {record['round']!r}")
                rounds.append(record)
    return sorted(rounds, key=lambda r: r["round"])


# ---------------------------------------------------------------- formatting


def sort_ids(ids) -> list[str]:
    """Ids as str, numbers first in numeric order, then the others alphabetically."""
    ids = [str(i) for i in ids]
    return sorted(ids, key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))


def fmt_interval(pair, digits: int = 4) -> str:
    """``[low, high]`` of an interval, or ``-``."""
    if not pair or not all(_finite(v) for v in pair):
        return MISSING
    return f"[{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def fmt(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` decimals (ints as they are); None and NaN as ``-``."""
    if value is None or isinstance(value, bool):
        return MISSING if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return MISSING if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def human_bytes(n: float | None) -> str:
    """Bytes in decimal units: ``12.3 MB`` (1 MB = 10⁶ bytes)."""
    if n is None:
        return MISSING
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_time(seconds: float | None) -> str:
    """``42.0 s``, ``3 min 05 s`` or ``2 h 07 min``."""
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def short(metric: str) -> str:
    """``recall@10`` → ``R@10``, ``ndcg@20`` → ``N@20``; other names unchanged."""
    kind, _, k = metric.partition("@")
    return f"{_ABBREV[kind]}@{k}" if k and kind in _ABBREV else metric


def rank_metrics(names) -> list[str]:
    """The recall@K and ndcg@K names among ``names``: recall first, then ndcg, each by K."""
    def key(m: str):
        kind, _, k = m.partition("@")
        return (list(_ABBREV).index(kind), int(k))

    return sorted({m for m in names if m.partition("@")[0] in _ABBREV and m.partition("@")[2].isdigit()}, key=key)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A GitHub markdown table; the first ``left`` (text) columns left-aligned, the others right-aligned."""
    rule = [":---" if i < left else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Aligned columns for a terminal: the first ``left`` left-aligned, the others right-aligned."""
    cells = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row):
        cols = enumerate(zip(row, widths, strict=True))
        return "  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in cols)

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])


# ---------------------------------------------------------------- per-round values


def train_losses(run: Run) -> dict[str, list[tuple[int, float]]]:
    """Client id → [(round, training loss)] over the rounds it trained in."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in run.rounds:
        for cid, entry in (r.get("train") or {}).items():
            if isinstance(entry, dict) and _finite(entry.get("loss")):
                out.setdefault(str(cid), []).append((r["round"], float(entry["loss"])))
    return {cid: out[cid] for cid in sort_ids(out)}


def valid_values(run: Run, metric: str | None = None) -> dict[str, list[tuple[int, float]]]:
    """Client id → [(round, validation ``metric``)] (default: the run's ``select_by``)."""
    metric = metric or run.select_by
    out: dict[str, list[tuple[int, float]]] = {}
    for r in run.rounds:
        for cid, entry in (r.get("valid") or {}).items():
            if isinstance(entry, dict) and _finite(entry.get(metric)):
                out.setdefault(str(cid), []).append((r["round"], float(entry[metric])))
    return {cid: out[cid] for cid in sort_ids(out)}


def valid_spread(run: Run) -> list[dict[str, float]]:
    """Per round with ≥ 2 validated clients: round, std, min, max, max/min of the ``select_by`` metric."""
    out = []
    for r in run.rounds:
        values = [float(e[run.select_by]) for e in (r.get("valid") or {}).values()
                  if isinstance(e, dict) and _finite(e.get(run.select_by))]
        if len(values) < 2:
            continue
        mean = sum(values) / len(values)
        lo, hi = min(values), max(values)
        out.append({"round": r["round"], "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
                    "min": lo, "max": hi, "max_min": hi / lo if lo > 0 else math.nan})
    return out


def round_rows(run: Run) -> list[list[str]]:
    """Rows of the rounds table: round, clients trained, mean train loss, mean valid metric, cumulative bytes."""
    rows, total = [], 0
    for r in run.rounds:
        losses = [e["loss"] for e in (r.get("train") or {}).values() if isinstance(e, dict) and _finite(e.get("loss"))]
        valid = [e[run.select_by] for e in (r.get("valid") or {}).values()
                 if isinstance(e, dict) and _finite(e.get(run.select_by))]
        total += sum((r.get("bytes_up") or {}).values()) + sum((r.get("bytes_down") or {}).values())
        rows.append([str(r["round"]), str(len(r.get("clients") or [])), fmt(_mean(losses)), fmt(_mean(valid)),
                     human_bytes(total)])
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- report.md


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into the run directory; the path of ``report.md``."""
    run = load_run(run_dir)
    plots = run.path / "plots"
    plots.mkdir(exist_ok=True)
    images = [p for p in (plot_clients(run, plots / "clients.png"), plot_learning(run, plots / "learning.png"),
                          plot_convergence(run, plots / "convergence.png"),
                          plot_imbalance(run, plots / "imbalance.png"), plot_similarity(run, plots / "similarity.png"),
                          plot_heating(run, plots / "heating.png")) if p is not None]
    out = run.path / "report.md"
    write_text(out, render_report(run, [p.relative_to(run.path) for p in images]))
    return out


def render_report(run: Run, images: Sequence[Path] = ()) -> str:
    """The markdown text of ``report.md``; ``images`` are paths relative to the run directory."""
    parts = [f"# Run {run.name}", settings_line(run)]
    if run.results.get("warnings"):
        parts += ["## Warnings", "\n".join(f"- {w}" for w in run.results["warnings"])]
    parts += ["## Overall (test)", overall_table(run),
             "## Clients (test)", clients_table(run),
             "## Imbalance across clients (test)", imbalance_table(run),
             f"## Rounds (validation by {run.select_by})", rounds_table(run)]
    if balance_rounds(run):
        parts += ["## Dynamic balance (heating weight w_i per round; p_i in brackets)", balance_table(run)]
    if images:
        parts += ["## Plots", "\n\n".join(f"![{p.stem}]({p.as_posix()})" for p in images)]
    return "\n\n".join(parts) + "\n"


def balance_table(run: Run) -> str:
    rounds = balance_rounds(run)
    clients = sort_ids({c for r in rounds for c in r["clients"]})
    rows = []
    for r in rounds:
        cells = dict.fromkeys(clients, MISSING)
        for c, w, p in zip(r["clients"], r["w"], r["p"], strict=True):
            cells[c] = f"{fmt(w, 3)} ({fmt(p, 3)})"
        rows.append([str(r["round"]), *cells.values()])
    return markdown_table(["round", *(run.client_name(c) for c in clients)], rows)


def settings_line(run: Run) -> str:
    r, comm = run.results, run.results.get("communication") or {}
    rounds = r.get("rounds", (run.config.get("train") or {}).get("rounds"))
    items = [("algorithm", r.get("algorithm")), ("backbone", r.get("backbone")), ("dataset", r.get("dataset")),
             ("rounds", rounds), ("time", human_time(r.get("time_s"))),
             ("bytes up", human_bytes(comm.get("bytes_up"))), ("bytes down", human_bytes(comm.get("bytes_down")))]
    return " · ".join(f"{k} **{MISSING if v is None else v}**" for k, v in items)


CTR_METRICS = ("auc", "gauc", "logloss", "precision", "recall", "f1")


def overall_table(run: Run) -> str:
    overall = run.results.get("overall") or {}
    metrics = rank_metrics(overall)
    if task_of(run.results) == "ranking":
        if not metrics:
            return "_no test metrics_"
        rows = [["mean", *(fmt(overall[m]) for m in metrics)]]
        ci = (run.results.get("intervals") or {}).get("overall") or {}
        if ci:
            rows.append(["95% CI", *(fmt_interval(ci.get(m)) for m in metrics)])
            n = sum((c or {}).get("n", 0) for c in (run.results.get("clients") or {}).values())
            note = (f"\n\nMeans over {n} test users; the interval is a percentile bootstrap over the test users "
                    "(2,000 resamples).")
        else:
            note = "\n\n(no intervals: this run was made before fellrec wrote them)"
        return markdown_table(["", *(short(m) for m in metrics)], rows) + note
    ctr = [m for m in CTR_METRICS if m in overall]
    if not ctr:
        return "_no test metrics_"
    valid = run.results.get("valid") or {}
    rows = [["test", *(fmt(overall[m]) for m in ctr)], ["validation", *(fmt(valid.get(m)) for m in ctr)]]
    best = run.results.get("best_round")
    return (markdown_table(["pooled", *ctr], rows)
            + f"\n\nAt round {best}, the best by pooled validation {run.select_by}. Per round:\n\n"
            + ctr_rounds_table(run))


def ctr_rounds_table(run: Run) -> str:
    per_round = run.results.get("per_round") or {}
    rows = [[str(r), fmt(v["valid"].get("auc")), fmt(v["test"].get("auc")), fmt(v["valid"].get("gauc")),
             fmt(v["test"].get("gauc")), fmt(v["test"].get("logloss"))]
            for r, v in sorted(per_round.items(), key=lambda kv: int(kv[0]))]
    return markdown_table(["round", "valid AUC", "test AUC", "valid GAUC", "test GAUC", "test logloss"], rows)


def clients_table(run: Run) -> str:
    clients = run.results.get("clients") or {}
    if not clients:
        return "_no client was tested_"
    metrics = rank_metrics(run.results.get("overall") or next(iter(clients.values())))
    best = run.results.get("best_round") or {}
    per_client = (run.results.get("communication") or {}).get("per_client") or {}
    ci = (run.results.get("intervals") or {}).get("clients") or {}
    main = "recall@10" if "recall@10" in metrics else metrics[0]
    header = ["client", "name", "n test users", *map(short, metrics), f"{short(main)} 95% CI", "best round",
              "bytes up", "bytes down"]
    rows = []
    for cid in run.client_ids():
        c, comm = clients[cid], per_client.get(cid) or {}
        rows.append([cid, run.client_name(cid), fmt(c.get("n")), *(fmt(c.get(m)) for m in metrics),
                     fmt_interval((ci.get(cid) or {}).get(main)), fmt(best.get(cid)),
                     human_bytes(comm.get("bytes_up")), human_bytes(comm.get("bytes_down"))])
    return markdown_table(header, rows, left=2)


def imbalance_table(run: Run) -> str:
    imbalance = run.results.get("imbalance") or {}
    metrics = rank_metrics(imbalance)
    if not metrics:
        return "_no imbalance statistics (fewer than two clients tested)_"
    keys = ["std", "min", "max", "max_min_ratio", "cv", "gini"]
    header = ["metric", "std", "min", "max", "max/min", "cv", "gini"]
    return markdown_table(header, [[short(m), *(fmt(imbalance[m].get(k)) for k in keys)] for m in metrics])


def rounds_table(run: Run) -> str:
    if not run.rounds:
        return "_no round records in metrics.jsonl_"
    header = ["round", "clients trained", "mean train loss", f"mean valid {run.select_by}", "cumulative bytes"]
    return markdown_table(header, round_rows(run))


# ---------------------------------------------------------------- plots


def plot_clients(run: Run, path: Path) -> Path | None:
    """Grouped bars: one group per client, one bar per test metric (recall@K, ndcg@K)."""
    clients = run.results.get("clients") or {}
    ids = run.client_ids()
    metrics = rank_metrics({m for c in ids for m in clients[c]})
    if not metrics:
        return None
    series = {short(m): [clients[c].get(m) for c in ids] for m in metrics}
    fig, ax = _figure(max(6.0, 1.2 * len(ids) + 2))
    _grouped_bars(ax, [run.client_name(c) for c in ids], series)
    ax.set_ylabel("test metric")
    ax.set_title(f"{run.name}: test metrics per client")
    return _save(fig, path)


def plot_convergence(run: Run, path: Path) -> Path | None:
    """Left: training loss per client and round. Right: validation ``select_by`` per client and round."""
    losses, valid = train_losses(run), valid_values(run)
    if not losses and not valid:
        return None
    fig, (left, right) = _figure(12.0, ncols=2)
    _lines(left, run, losses, "training loss")
    _lines(right, run, valid, f"validation {run.select_by}")
    fig.suptitle(f"{run.name}: convergence")
    return _save(fig, path)


def learning_curve(run: Run) -> list[tuple[int, float, float]]:
    """(round, seconds since the start, mean validation ``select_by`` over the validated clients) per
    validation round."""
    out = []
    for r in run.rounds:
        values = [v.get(run.select_by) for v in (r.get("valid") or {}).values()]
        values = [v for v in values if _finite(v)]
        if values and _finite(r.get("time_s")):
            out.append((r["round"], float(r["time_s"]), float(np.mean(values))))
    return out


def plot_learning(run: Run, path: Path) -> Path | None:
    """The validation metric (mean over clients) against the round (left) and the wall time (right)."""
    curve = learning_curve(run)
    if not curve:
        return None
    fig, (left, right) = _figure(12.0, ncols=2)
    label = f"validation {run.select_by} (mean over clients)"
    left.plot([c[0] for c in curve], [c[2] for c in curve], marker="o")
    left.set(xlabel="round", ylabel=label, title="against rounds")
    left.xaxis.get_major_locator().set_params(integer=True)
    right.plot([c[1] / 60 for c in curve], [c[2] for c in curve], marker="o")
    right.set(xlabel="minutes since the start (training and validation)", ylabel=label, title="against time")
    fig.suptitle(f"{run.name}: learning curve")
    return _save(fig, path)


def plot_imbalance(run: Run, path: Path) -> Path | None:
    """Per round: std (left) and min / max (right) across clients of the validation ``select_by`` metric."""
    spread = valid_spread(run)
    if not spread:
        return None
    x = [s["round"] for s in spread]
    fig, (left, right) = _figure(12.0, ncols=2)
    left.plot(x, [s["std"] for s in spread], marker="o")
    left.set(xlabel="round", ylabel=f"std of {run.select_by}", title="std across clients")
    right.plot(x, [s["min"] for s in spread], marker="v", label="min")
    right.plot(x, [s["max"] for s in spread], marker="^", label="max")
    right.set(xlabel="round", ylabel=run.select_by, title="min and max across clients")
    right.legend()
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{run.name}: validation imbalance")
    return _save(fig, path)


def balance_rounds(run: Run) -> list[dict[str, Any]]:
    """FELLRec's per-round records (similarity, p, w), with their round number."""
    out = []
    for r in run.rounds:
        st = r.get("strategy") or {}
        if "similarity" in st and "w" in st:
            out.append({"round": r["round"], **st})
    return out


def plot_similarity(run: Run, path: Path) -> Path | None:
    """Heat maps of the clients' adapter similarity s_ij in the first and the last round (FELLRec)."""
    rounds = balance_rounds(run)
    if not rounds:
        return None
    shown = [rounds[0]] if len(rounds) == 1 else [rounds[0], rounds[-1]]
    fig, axes = _figure(6.0 * len(shown), ncols=len(shown))
    axes = [axes] if len(shown) == 1 else list(axes)
    for ax, r in zip(axes, shown, strict=True):
        labels = [run.client_name(c) for c in r["clients"]]
        image = ax.imshow(r["similarity"], vmin=min(min(row) for row in r["similarity"]), vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i, row in enumerate(r["similarity"]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.5f}", ha="center", va="center", color="white", fontsize=8)
        ax.set_title(f"round {r['round']}")
        bar = fig.colorbar(image, ax=ax, shrink=0.8)
        bar.formatter.set_useOffset(False)  # similarities near 1 differ in the 4th decimal
        bar.update_ticks()
    fig.suptitle(f"{run.name}: adapter similarity (cos + 1) / 2")
    return _save(fig, path)


def plot_heating(run: Run, path: Path) -> Path | None:
    """Each client's curriculum-heating weight w_i and loss share p_i per round (FELLRec)."""
    rounds = balance_rounds(run)
    if not rounds:
        return None
    fig, (left, right) = _figure(12.0, ncols=2)
    series_w: dict[str, list[tuple[int, float]]] = {}
    series_p: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for c, w, p in zip(r["clients"], r["w"], r["p"], strict=True):
            series_w.setdefault(c, []).append((r["round"], w))
            series_p.setdefault(c, []).append((r["round"], p))
    _lines(left, run, series_w, "heating weight w")
    _lines(right, run, series_p, "p = softmax(loss / τ)")
    fig.suptitle(f"{run.name}: curriculum heating")
    return _save(fig, path)


def _lines(ax, run: Run, series: dict[str, list[tuple[int, float]]], ylabel: str) -> None:
    many = len(series) > 12  # e.g. one client per user: thin lines and the mean, no legend
    for cid, points in series.items():
        style = {"color": "grey", "alpha": 0.15, "linewidth": 0.6} if many else {"marker": "o",
                                                                                   "label": run.client_name(cid)}
        ax.plot([p[0] for p in points], [p[1] for p in points], **style)
    if many:
        rounds = sorted({r for points in series.values() for r, _ in points})
        mean = [float(np.nanmean([v for points in series.values() for r2, v in points if r2 == r])) for r in rounds]
        ax.plot(rounds, mean, color="black", marker="o", label=f"mean of {len(series)} clients")
    ax.set(xlabel="round", ylabel=ylabel, title=ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if series:
        ax.legend(fontsize="small")


def _grouped_bars(ax, groups: Sequence[str], series: dict[str, Sequence[float | None]]) -> None:
    """One group of bars per entry of ``groups``, one bar per series (None/NaN drawn as 0 height)."""
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if _finite(v) else 0.0 for v in values], width, label=label)
    crowded = len(groups) > 6
    ax.set_xticks(range(len(groups)), groups, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)


def _figure(width: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig, path: Path) -> Path:
    return atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


# ---------------------------------------------------------------- comparing runs


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
            metric: str = "recall@10") -> tuple[str, Path | None]:
    """Markdown comparing runs: the summary table (every metric, the interval of ``metric``), the paired
    differences of every two runs on the same test users, the mean ± std of runs that differ only in
    their seed, and ``metric`` per client. With ``out_dir``, also ``compare.md`` and ``compare.png``
    there. Returns the markdown and the png path (None without ``out_dir``)."""
    runs = [load_run(d) for d in run_dirs]
    parts = [f"# Comparison of {len(runs)} runs", markdown_table(*summary_rows(runs, metric), left=3)]
    for title, table in comparison_tables(runs, metric):
        parts += [f"## {title}", markdown_table(*table[:2], left=table[2] if len(table) > 2 else 1)]
    text = "\n\n".join(parts) + "\n"
    if out_dir is None:
        return text, None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_compare(runs, out / "compare.png", metric)
    if png is not None:
        text += f"\n![compare]({png.name})\n"
    write_text(out / "compare.md", text)
    return text, png


def format_compare(runs: Sequence[Run | str | Path], metric: str = "recall@10") -> str:
    """The comparison as plain aligned text for a terminal (the same tables as ``compare``)."""
    runs = [r if isinstance(r, Run) else load_run(r) for r in runs]
    parts = [text_table(*summary_rows(runs, metric), left=3)]
    for title, table in comparison_tables(runs, metric):
        parts.append(f"{title}\n" + text_table(*table[:2], left=table[2] if len(table) > 2 else 1))
    return "\n\n".join(parts)


def comparison_tables(runs: Sequence[Run], metric: str) -> list[tuple[str, tuple]]:
    """(title, (header, rows[, left])) of the tables after the summary."""
    out = []
    if all(task_of(r.results) == "ctr" for r in runs):
        return out  # FedPA's metrics are pooled over users: no per-user or per-client tables
    paired = paired_rows(runs, [metric, *(["ndcg@10"] if metric != "ndcg@10" else [])])
    if paired[1]:
        out.append(("Paired differences on the same test users (A − B, 95% bootstrap CI; * = the interval "
                    "excludes 0)", (*paired, 2)))
    seeds = seed_rows(runs, metric)
    if seeds[1]:
        out.append(("Over seeds (runs that differ only in their seed: mean ± std)", (*seeds, 1)))
    by_seed = seed_paired_rows(runs, [metric, *(["ndcg@10"] if metric != "ndcg@10" else [])])
    if by_seed[1]:
        out.append(("Paired differences over seeds (A − B of the users' seed-averaged values, 95% bootstrap "
                    "CI over users; * = the interval excludes 0; then each seed's difference, min to max, and "
                    "the 95% Student-t interval of their mean over the seeds)", (*by_seed, 3)))
    balance = seed_balance_rows(runs, metric)
    if balance[1]:
        out.append((f"Spread of {metric} across clients, paired over seeds (A − B of each seed's std, minimum "
                     "and Gini across clients; the mean, each seed's, and the 95% Student-t interval over the "
                     "seeds; * = the interval excludes 0)", (*balance, 3)))
    out.append((f"{metric} per client (test)", client_rows(runs, metric)))
    return out


def ctr_summary_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "algorithm", *CTR_METRICS[:3], "valid auc", "round", "bytes up+down", "time"]
    rows = []
    for r in runs:
        res = r.results
        overall, valid, comm = res.get("overall") or {}, res.get("valid") or {}, res.get("communication") or {}
        rows.append([r.name, str(res.get("algorithm") or MISSING), *(fmt(overall.get(m)) for m in CTR_METRICS[:3]),
                     fmt(valid.get("auc")), str(res.get("best_round", MISSING)),
                     human_bytes(_sum_known(comm.get("bytes_up"), comm.get("bytes_down"))),
                     human_time(res.get("time_s"))])
    return header, rows


def summary_rows(runs: Sequence[Run], metric: str = "recall@10") -> tuple[list[str], list[list[str]]]:
    """One row per run: name, algorithm, backbone, overall metrics, the interval of ``metric``, its spread
    across clients, bytes, time (FedPA's runs: the pooled test metrics and validation AUC at the selected
    round)."""
    if runs and all(task_of(r.results) == "ctr" for r in runs):
        return ctr_summary_rows(runs)
    metrics = rank_metrics({m for r in runs for m in r.results.get("overall") or {}})
    header = ["run", "algorithm", "backbone", "users", *map(short, metrics), f"{short(metric)} 95% CI",
              f"std {short(metric)}", f"max/min {short(metric)}", "bytes up+down", "time"]
    rows = []
    for r in runs:
        res, imb = r.results, (r.results.get("imbalance") or {}).get(metric) or {}
        comm = res.get("communication") or {}
        moved = _sum_known(comm.get("bytes_up"), comm.get("bytes_down"))
        users = sum((c or {}).get("n", 0) for c in (res.get("clients") or {}).values())
        ci = ((res.get("intervals") or {}).get("overall") or {}).get(metric)
        rows.append([r.name, str(res.get("algorithm") or MISSING), str(res.get("backbone") or MISSING),
                     str(users or MISSING), *(fmt((res.get("overall") or {}).get(m)) for m in metrics),
                     fmt_interval(ci), fmt(imb.get("std")), fmt(imb.get("max_min_ratio")), human_bytes(moved),
                     human_time(res.get("time_s"))])
    return header, rows


def _test_set(run: Run) -> tuple:
    """What fixes a run's test users and their targets: the data and the split."""
    split = run.config.get("split") or {}
    return (json.dumps(run.config.get("data"), sort_keys=True), split.get("method"), str(split.get("ratios")),
            json.dumps((run.config.get("eval") or {}).get("max_test_samples")))


def paired_rows(runs: Sequence[Run], metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Every two runs with per-user test results (test_users.csv) on the same test set: A − B of each
    metric over the users both tested, with its bootstrap interval. Two runs of the same seed group, or
    of two seed groups that ``seed_paired_rows`` pairs, are left to that table."""
    from fellrec.stats import paired_difference

    groups = seed_groups(runs)
    group_of = {id(r): i for i, g in enumerate(groups) for r in g}
    paired_groups = {frozenset((id(ga), id(gb))) for ga, gb, _ in seed_pairs(groups)}
    per_user = {id(r): read_test_users(r.path) for r in runs}
    header = ["A", "B", "users"]
    for m in metrics:
        header += [f"{short(m)} A − B", "95% CI", ""]
    rows = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            ua, ub = per_user[id(a)], per_user[id(b)]
            if id(a) in group_of and id(b) in group_of:
                ga, gb = groups[group_of[id(a)]], groups[group_of[id(b)]]
                if ga is gb or frozenset((id(ga), id(gb))) in paired_groups:
                    continue
            if ua is None or ub is None or _test_set(a) != _test_set(b):
                continue
            cells, n = [], 0
            for m in metrics:
                if m not in ua or m not in ub:
                    cells += [MISSING, MISSING, ""]
                    continue
                d = paired_difference(ua[m], ub[m])
                n = max(n, d.n)
                cells += [f"{d.mean:+.4f}", fmt_interval((d.low, d.high)), "*" if d.significant else ""]
            rows.append([a.name, b.name, str(n), *cells])
    return header, rows


def seed_groups(runs: Sequence[Run]) -> list[list[Run]]:
    """The groups of two or more runs whose configs differ only in ``name`` and ``seed``."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        cfg = {k: v for k, v in r.config.items() if k not in ("name", "seed")}
        groups.setdefault(json.dumps(cfg, sort_keys=True, default=str), []).append(r)
    return [g for g in groups.values() if len(g) > 1]


def seed_pairs(groups: Sequence[Sequence[Run]]) -> list[tuple[Sequence[Run], Sequence[Run], list]]:
    """(A, B, seeds): every two seed groups on the same test set with two or more seeds in common."""
    out = []
    for i, ga in enumerate(groups):
        for gb in groups[i + 1:]:
            seeds = sorted({r.config.get("seed") for r in ga} & {r.config.get("seed") for r in gb}, key=str)
            if _test_set(ga[0]) == _test_set(gb[0]) and len(seeds) >= 2:
                out.append((ga, gb, seeds))
    return out


def seed_paired_rows(runs: Sequence[Run], metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Every two seed groups on the same test set, over the seeds both ran (paired seed by seed)."""
    from fellrec.stats import over_seeds, paired_over_seeds

    header = ["A", "B", "seeds", "users"]
    for m in metrics:
        header += [f"{short(m)} A − B", "95% CI", "", "seeds", "t CI over seeds", ""]
    rows = []
    groups = seed_groups(runs)
    per_user = {id(r): read_test_users(r.path) for g in groups for r in g}
    for ga, gb, seeds in seed_pairs(groups):
        a = {r.config.get("seed"): per_user[id(r)] for r in ga}
        b = {r.config.get("seed"): per_user[id(r)] for r in gb}
        if any(a[s] is None or b[s] is None for s in seeds):
            continue
        cells, n = [], 0
        for m in metrics:
            if any(m not in a[s] or m not in b[s] for s in seeds):
                cells += [MISSING, MISSING, "", MISSING, MISSING, ""]
                continue
            d, each = paired_over_seeds([a[s][m] for s in seeds], [b[s][m] for s in seeds])
            n = max(n, d.n)
            low, high = over_seeds(each)
            cells += [f"{d.mean:+.4f}", fmt_interval((d.low, d.high)), "*" if d.significant else "",
                      f"{min(each):+.4f} to {max(each):+.4f}", fmt_interval((low, high)),
                      "*" if low > 0 or high < 0 else ""]
        rows.append([_group_name(ga), _group_name(gb), str(len(seeds)), str(n), *cells])
    return header, rows


BALANCE = (("std", "std"), ("min", "min"), ("gini", "Gini"))


def seed_balance_rows(runs: Sequence[Run], metric: str = "recall@10") -> tuple[list[str], list[list[str]]]:
    """Every two seed groups on the same test set: A − B of the spread of ``metric`` across clients (std,
    the weakest client, Gini), seed by seed over the seeds both ran, with the Student-t interval of the
    mean difference over the seeds. A pair where a seed lacks a value is left out."""
    from fellrec.stats import over_seeds

    header = ["A", "B", "seeds"]
    for _, label in BALANCE:
        header += [f"{label} A − B", "seeds", "t CI over seeds", ""]
    rows = []
    for ga, gb, seeds in seed_pairs(seed_groups(runs)):
        spread = [{r.config.get("seed"): ((r.results.get("imbalance") or {}).get(metric) or {}) for r in g}
                  for g in (ga, gb)]
        cells = []
        for key, _ in BALANCE:
            values = [(spread[0][s].get(key), spread[1][s].get(key)) for s in seeds]
            if any(not (_finite(a) and _finite(b)) for a, b in values):
                cells = []
                break
            each = [float(a) - float(b) for a, b in values]
            low, high = over_seeds(each)
            cells += [f"{np.mean(each):+.4f}", f"{min(each):+.4f} to {max(each):+.4f}", fmt_interval((low, high)),
                      "*" if low > 0 or high < 0 else ""]
        if cells:
            rows.append([_group_name(ga), _group_name(gb), str(len(seeds)), *cells])
    return header, rows


def _group_name(group: Sequence[Run]) -> str:
    """A seed group's name: its runs' names with the seed's own digits replaced by *."""
    names = [r.name.replace(str(r.config.get("seed")), "*") for r in group]
    return names[0] if len(set(names)) == 1 else f"{group[0].name} (+{len(group) - 1})"


def seed_rows(runs: Sequence[Run], metric: str = "recall@10") -> tuple[list[str], list[list[str]]]:
    """One row per group of runs whose configs differ only in ``name`` and ``seed``: mean ± std of each
    overall metric over the group's seeds, and of the spread of ``metric`` across clients."""
    from fellrec.stats import across_seeds

    groups = seed_groups(runs)
    metrics = rank_metrics({m for g in groups for r in g for m in r.results.get("overall") or {}})
    spread = ("std", "min", "max_min_ratio", "gini")
    header = ["runs", "algorithm", "seeds", *map(short, metrics),
              *(f"{s.replace('max_min_ratio', 'max/min')} {short(metric)}" for s in spread)]
    rows = []
    for g in groups:
        cells = []
        values = [[(r.results.get("overall") or {}).get(m) for r in g] for m in metrics]
        values += [[((r.results.get("imbalance") or {}).get(metric) or {}).get(s) for r in g] for s in spread]
        for v in values:
            mean, std = across_seeds(v)
            cells.append(f"{mean:.4f} ± {std:.4f}" if np.isfinite(mean) else MISSING)
        seeds = ", ".join(str(r.config.get("seed")) for r in g)
        rows.append([_group_name(g), str(g[0].results.get("algorithm") or MISSING), seeds, *cells])
    return header, rows


def client_rows(runs: Sequence[Run], metric: str = "recall@10") -> tuple[list[str], list[list[str]]]:
    """Rows = clients (then ``overall``), columns = runs; cells = the test ``metric``."""
    ids = sort_ids({c for r in runs for c in r.client_ids()})
    header = ["client", *(r.name for r in runs)]
    rows = [[_client_label(runs, c), *(fmt(((r.results.get("clients") or {}).get(c) or {}).get(metric))
                                       for r in runs)] for c in ids]
    rows.append(["overall", *(fmt((r.results.get("overall") or {}).get(metric)) for r in runs)])
    return header, rows


def plot_compare(runs: Sequence[Run], path: Path, metric: str = "recall@10") -> Path | None:
    """Grouped bars: per client (and overall) the test ``metric`` of each run."""
    ids = sort_ids({c for r in runs for c in r.client_ids()})
    groups = [_client_label(runs, c) for c in ids] + ["overall"]
    series = {r.name: [((r.results.get("clients") or {}).get(c) or {}).get(metric) for c in ids]
              + [(r.results.get("overall") or {}).get(metric)] for r in runs}
    fig, ax = _figure(max(6.0, 0.6 * len(groups) * max(1, len(runs)) + 2))
    _grouped_bars(ax, groups, series)
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{metric} per client")
    return _save(fig, path)


def _client_label(runs: Sequence[Run], cid: str) -> str:
    """``name`` from the first run that names client ``cid`` (the id when none does)."""
    for r in runs:
        if cid in (r.results.get("client_names") or {}):
            return r.client_name(cid)
    return cid


def _sum_known(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None
