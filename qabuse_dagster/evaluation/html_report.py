"""The backtest report as a self-contained HTML page: tables and inline PNG plots."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sklearn.metrics import precision_recall_curve

from qabuse_dagster.evaluation.closed_loop import (
    CLOSED_LOOP_COLUMNS,
    ClosedLoopReport,
    closed_loop_rows,
    closed_loop_summary,
)
from qabuse_dagster.evaluation.detection import IncidentOutcome
from qabuse_dagster.evaluation.report import (
    KIND_TABLE_COLUMNS,
    BacktestReport,
    format_metric,
    kind_table_rows,
)

__all__ = ["write_html"]


def write_html(
    reports: BacktestReport | Sequence[BacktestReport],
    path: Path,
    closed_loop: ClosedLoopReport | None = None,
) -> Path:
    """Write a self-contained HTML page: tables and inline PNG plots, detectors side by side.

    The page holds the per-kind table, the per-incident table, the look-alike rows, a
    precision-recall curve over keys, time to detect per kind, one score timeline per
    incident and detector, and with ``closed_loop`` the twin rerun with qabuse
    mitigating: legitimate users' queue wait without and with it.
    """
    group = [reports] if isinstance(reports, BacktestReport) else list(reports)
    if not group:
        raise ValueError("write_html needs at least one report")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>qabuse backtest</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}.row{display:flex;gap:1em;"
        "flex-wrap:wrap}img{max-width:100%}</style></head><body>",
        "<h1>qabuse backtest: " + html.escape(" vs ".join(r.detector for r in group)) + "</h1>",
        _html_table(
            ["detector", "trained until", "evaluated until", "threshold", "train rows", "rows"],
            [
                [
                    r.detector,
                    r.train_until.isoformat(),
                    r.eval_end.isoformat(),
                    f"{r.threshold:.4f}",
                    r.train_rows,
                    r.eval_rows,
                ]
                for r in group
            ],
        ),
        "<h2>Per kind</h2>",
        _html_table(KIND_TABLE_COLUMNS, kind_table_rows(group)),
        "<h2>Incidents</h2>",
        _html_table(
            ["incident", "kind"] + [f"{r.detector}: time to detect (s)" for r in group],
            [
                [o.incident_id, o.kind]
                + [
                    format_metric(_outcome(r, o.incident_id).time_to_detect_s, "missed")
                    for r in group
                ]
                for o in group[0].incidents
            ],
        ),
        "<h2>Plots</h2><div class='row'>",
        _img(_pr_curve_png(group), "precision-recall over keys"),
        _img(_time_to_detect_png(group), "time to detect per kind"),
        "</div>",
    ]
    if closed_loop is not None:
        parts += [
            "<h2>Closed loop: the twin with and without qabuse mitigating</h2>",
            f"<p>{html.escape(closed_loop_summary(closed_loop))}</p>",
            _html_table(CLOSED_LOOP_COLUMNS, closed_loop_rows(closed_loop)),
            _img(_legit_wait_png(closed_loop), "legitimate queue wait"),
        ]
    for outcome in group[0].incidents:
        parts.append(f"<h3>Incident {html.escape(outcome.incident_id)}</h3><div class='row'>")
        parts.extend(
            _img(_timeline_png(r, outcome.incident_id), f"{r.detector} scores") for r in group
        )
        parts.append("</div>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _outcome(report: BacktestReport, incident_id: str) -> IncidentOutcome:
    return next(o for o in report.incidents if o.incident_id == incident_id)


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{encoded}'>"


def _figure():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=90)
    return plt, fig, ax


def _png(plt: Any, fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _pr_curve_png(reports: Sequence[BacktestReport]) -> bytes:
    plt, fig, ax = _figure()
    for r in reports:
        positives = {k for keys in r.incident_keys.values() for k in keys}
        by_key = r.scored.groupby("api_key_id")["score"].max()
        truth = by_key.index.isin(list(positives))
        if truth.any() and not truth.all():
            precision, recall, _ = precision_recall_curve(truth, by_key.to_numpy())
            ax.step(
                recall,
                precision,
                where="post",
                label=f"{r.detector} (AP {format_metric(r.overall.pr_auc)})",
            )
    ax.set_xlabel("recall (incident keys)")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.05)
    ax.set_title("Precision-recall over keys ranked by max score")
    ax.legend(loc="lower left", fontsize=8)
    return _png(plt, fig)


def _time_to_detect_png(reports: Sequence[BacktestReport]) -> bytes:
    plt, fig, ax = _figure()
    kinds = sorted({o.kind for r in reports for o in r.incidents})
    width = 0.8 / max(len(reports), 1)
    for i, r in enumerate(reports):
        for j, kind in enumerate(kinds):
            ttd = [o.time_to_detect_s for o in r.incidents if o.kind == kind and o.detected]
            xs = [j + (i - (len(reports) - 1) / 2) * width] * len(ttd)
            ax.scatter(
                xs,
                [t / 60 for t in ttd if t is not None],
                label=r.detector if j == 0 else None,
                color=f"C{i}",
            )
    ax.set_xticks(range(len(kinds)), kinds, rotation=20, fontsize=8)
    ax.set_ylabel("time to detect (min)")
    ax.set_title("Time to detect per kind (detected incidents)")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def _timeline_png(report: BacktestReport, incident_id: str) -> bytes:
    plt, fig, ax = _figure()
    start, end = report.incident_windows[incident_id]
    keys = report.incident_keys[incident_id]
    lo, hi = start - timedelta(hours=2), end + timedelta(hours=1)
    window = report.scored[
        (report.scored["event_timestamp"] >= lo) & (report.scored["event_timestamp"] <= hi)
    ]
    benign = window[~window["api_key_id"].isin(keys)]
    if not benign.empty:
        envelope = benign.groupby("event_timestamp")["score"].max()
        ax.plot(envelope.index, envelope.to_numpy(), lw=0.8, color="grey", label="max benign key")
    for key in keys:
        rows = window[window["api_key_id"] == key]
        ax.plot(rows["event_timestamp"], rows["score"], lw=1.2, label=f"incident key {key[:8]}")
    ax.axhline(report.threshold, color="black", ls="--", lw=1, label="threshold")
    ax.axvspan(start, end, color="crimson", alpha=0.1, label="incident")
    first = _outcome(report, incident_id).first_alert
    if first is not None:
        ax.axvline(first, color="crimson", lw=1, label="first alert")
    ax.set_title(f"{report.detector}: {incident_id}", fontsize=9)
    ax.set_ylabel("score (higher = more anomalous)")
    ax.legend(fontsize=6, loc="upper left")
    fig.autofmt_xdate()
    return _png(plt, fig)


def _legit_wait_png(report: ClosedLoopReport) -> bytes:
    plt, fig, ax = _figure()
    scopes = [("all", report.legit_wait_without, report.legit_wait_with)] + [
        (i.kind, i.legit_wait_without, i.legit_wait_with) for i in report.incidents
    ]
    xs = range(len(scopes))
    ax.bar([x - 0.2 for x in xs], [w.p95_s or 0.0 for _, w, _ in scopes], 0.4, label="without")
    ax.bar([x + 0.2 for x in xs], [w.p95_s or 0.0 for _, _, w in scopes], 0.4, label="with qabuse")
    ax.set_xticks(list(xs), [name for name, _, _ in scopes], rotation=20, fontsize=8)
    ax.set_ylabel("p95 queue wait (s)")
    ax.set_title("Legitimate users' queue wait during each incident")
    ax.legend(fontsize=8)
    return _png(plt, fig)
