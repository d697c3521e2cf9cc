"""Documents as pandas DataFrames: one row per module and snapshot (an analysis or a series), per run (a
comparison), per point (a sweep), or per adapter (a survey of several). pandas loads only here, on use.

    frame = rankscope.to_frame(rankscope.analyze("run_dir/"))
    frame.groupby("kind")["k95"].median()
"""

from __future__ import annotations

import io
import sys
from typing import TYPE_CHECKING, Any

from rankscope.constants import ANALYSIS_SCHEMA, COMPARE_SCHEMA, SWEEP_SCHEMA
from rankscope.errors import RankscopeError
from rankscope.io.atomic import write_to_path

if TYPE_CHECKING:  # pragma: no cover
    import pandas

# Both views' measures of one module, in the order the columns take.
MODULE_COLUMNS = ("step", "layer", "kind", "name", "rank", "scale", "format", "top10_share", "effective_rank",
                  "effective_rank_ratio", "gini", "k90", "k95", "k99", "k95_over_r", "stable_rank",
                  "stable_rank_over_r", "spectral_effective_rank", "spectral_effective_rank_over_r", "error")
SURVEY_COLUMNS = ("path", "format", "modules", "ranks", "scales", "top10_share", "effective_rank_ratio",
                  "k95_over_r", "stable_rank_over_r", "spectral_effective_rank_over_r", "verdict", "error")


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise RankscopeError("DataFrames need pandas: expected it installed (pip install pandas)") from None
    return pandas


def _ratio(value: Any, rank: Any) -> float | None:
    return value / rank if isinstance(value, (int, float)) and rank else None


def module_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per module and snapshot of an analysis document, with :data:`MODULE_COLUMNS`."""
    rows = []
    for snapshot in document["snapshots"]:
        for m in snapshot["modules"]:
            k = m.get("energy_rank") or {}
            r = m.get("rank")
            rows.append({"step": snapshot.get("step"), "layer": m.get("layer"), "kind": m.get("kind"),
                         "name": m.get("name"), "rank": r, "scale": m.get("scale"),
                         "format": snapshot.get("format") or document.get("format"),
                         "top10_share": m.get("top10_share"), "effective_rank": m.get("effective_rank"),
                         "effective_rank_ratio": _ratio(m.get("effective_rank"), r), "gini": m.get("gini"),
                         "k90": k.get("0.9"), "k95": k.get("0.95"), "k99": k.get("0.99"),
                         "k95_over_r": _ratio(k.get("0.95"), r), "stable_rank": m.get("stable_rank"),
                         "stable_rank_over_r": _ratio(m.get("stable_rank"), r),
                         "spectral_effective_rank": m.get("spectral_effective_rank"),
                         "spectral_effective_rank_over_r": _ratio(m.get("spectral_effective_rank"), r),
                         "error": m.get("error")})
    return rows


def survey_row(path: str, document: dict[str, Any] | None, error: str | None = None) -> dict[str, Any]:
    """One adapter of a survey (``rankscope analyze A B C --table``): its last snapshot's medians in both views
    and its verdict, or the error that stopped it."""
    if document is None:
        return {**dict.fromkeys(SURVEY_COLUMNS), "path": path, "error": error}
    snapshot = document["snapshots"][-1]
    s = snapshot["summary"]
    median = lambda key: (s.get(key) or {}).get("median")  # noqa: E731
    return {"path": path, "format": document.get("format"), "modules": s["modules"],
            "ranks": " ".join(map(str, s["ranks"])), "scales": " ".join(f"{x:g}" for x in s["scales"]),
            "top10_share": median("top10_share"), "effective_rank_ratio": median("effective_rank_ratio"),
            "k95_over_r": median("energy_rank_ratio"), "stable_rank_over_r": median("stable_rank_ratio"),
            "spectral_effective_rank_over_r": median("spectral_effective_rank_ratio"),
            "verdict": s["verdict"]["sentence"], "error": "; ".join(s["errors"]) or None}


def to_frame(document: dict[str, Any] | list[dict[str, Any]]) -> "pandas.DataFrame":
    """A DataFrame of an analysis (one row per module and snapshot: ``step``, ``layer``, ``kind``, ``rank``,
    ``format`` and a column per measure of both views), a comparison (one row per run), a sweep (one row per
    point), or a list of survey rows (:func:`survey_row`)."""
    pandas = _pandas()
    if isinstance(document, list):
        frame = pandas.DataFrame(document, columns=list(SURVEY_COLUMNS))
        frame["modules"] = frame["modules"].astype("Int64")  # a failed input's row has none
        return frame
    schema = document.get("schema") if isinstance(document, dict) else None
    if schema == ANALYSIS_SCHEMA:
        return pandas.DataFrame(module_rows(document), columns=list(MODULE_COLUMNS))
    if schema == COMPARE_SCHEMA:
        keys = ("effective_rank_ratio", "top10_share", "gini", "energy_rank_ratio", "stable_rank_ratio",
                "spectral_effective_rank_ratio")
        return pandas.DataFrame([{"label": run["label"], "modules": run["modules"],
                                  **{key: (run.get(key) or {}).get("median") for key in keys}}
                                 for run in document["runs"]])
    if schema == SWEEP_SCHEMA:
        return pandas.DataFrame(document["points"], columns=["order", "fraction", "seed", "value", "params_kept",
                                                             "energy"])
    raise RankscopeError(f"to_frame: a document with schema {schema!r}: expected an analysis, a comparison, a sweep "
                         "(rankscope/analysis-v1, compare-v1, sweep-v1) or a list of survey rows")


def write_table(rows: list[dict[str, Any]], target: str) -> None:
    """A survey as CSV (``-``: stdout, as CSV) or Parquet (``.parquet``, where pyarrow is installed)."""
    frame = to_frame(rows)
    if target.endswith(".parquet"):
        buffer = io.BytesIO()
        try:
            frame.to_parquet(buffer, index=False)
        except ImportError:
            raise RankscopeError("--table FILE.parquet needs pyarrow: expected it installed (pip install pyarrow), "
                                 "or a .csv file") from None
        write_to_path(target, buffer.getvalue(), "--table")
    elif target == "-":
        sys.stdout.write(frame.to_csv(index=False))
        sys.stdout.flush()
    else:
        write_to_path(target, frame.to_csv(index=False).encode("utf-8"), "--table")


__all__ = ["to_frame", "module_rows", "survey_row", "write_table", "MODULE_COLUMNS", "SURVEY_COLUMNS"]
