"""The report as one self-contained HTML page: what a lab manager opens in a browser, offline. No script, no
font, nothing fetched (a Content-Security-Policy says so to the browser); the charts are inline SVG
(histod.daemon.charts). Everything that comes from the data (file names, reasons, reviewers' names and notes)
is escaped.

Sections: the window and its counts; the model in use; files over time by label; the distribution of
p(malignant) with the decision threshold; latency; failures by reason; files waiting for a move; agreement
between the model and the reviewers (matrix, Cohen's kappa, the disagreements)."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html import escape
from typing import TYPE_CHECKING, Any

from histod import LABELS, __version__
from histod.daemon.charts import Series, bars, hbars
from histod.db.queries import percentile

if TYPE_CHECKING:
    from histod.daemon.reports import ReportData
    from histod.db.windows import WindowRow

COLORS = {"Benign": "#4c86b0", "Malignant": "#c44e52", "failed": "#9a9a9a"}
P_BINS = 20
LATENCY_EDGES_MS = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
DISAGREEMENTS_SHOWN = 200


@dataclass
class Bucket:
    start: datetime
    end: datetime
    total: int = 0
    classified: int = 0
    failed: int = 0
    duplicates: int = 0
    by_label: dict[str, int] = field(default_factory=dict)
    p: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)

    @property
    def mean_p(self) -> float | None:
        return statistics.fmean(self.p) if self.p else None

    @property
    def latency_p50_ms(self) -> float | None:
        return percentile(self.latency, 50)

    @property
    def latency_p95_ms(self) -> float | None:
        return percentile(self.latency, 95)


def bucket_width(since: datetime, until: datetime) -> timedelta:
    """5 minutes for a window of up to 3 hours, an hour up to 8 days, else a day."""
    span = until - since
    if span <= timedelta(hours=3):
        return timedelta(minutes=5)
    return timedelta(hours=1) if span <= timedelta(days=8) else timedelta(days=1)


def buckets(rows: Sequence[WindowRow], since: datetime, until: datetime) -> list[Bucket]:
    """The window's rows counted in consecutive buckets of :func:`bucket_width`, aligned to it (UTC)."""
    width = bucket_width(since, until)
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    start = epoch + width * ((since - epoch) // width)
    out: list[Bucket] = []
    while start < until:
        out.append(Bucket(start, start + width))
        start += width
    for r in rows:
        i = (r.received_at - out[0].start) // width if out else -1
        if not 0 <= i < len(out):
            continue
        b = out[i]
        b.total += 1
        b.latency.append(r.latency_ms)
        if r.duplicate_of is not None:
            b.duplicates += 1
        if r.status == "classified":
            b.classified += 1
            if r.label is not None:
                b.by_label[r.label] = b.by_label.get(r.label, 0) + 1
            if r.p_malignant is not None:
                b.p.append(r.p_malignant)
        elif r.status == "failed":
            b.failed += 1
    return out


def _bucket_label(b: Bucket, width: timedelta) -> str:
    if width < timedelta(hours=1):
        return f"{b.start:%H:%M}"
    return f"{b.start:%m-%d %H:00}" if width < timedelta(days=1) else f"{b.start:%Y-%m-%d}"


# --- sections ---------------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    return escape(str(value))


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def _overview(data: ReportData) -> str:
    s = data.summary
    cards = [
        ("images", s.total),
        ("Benign", s.by_label.get("Benign", 0)),
        ("Malignant", s.by_label.get("Malignant", 0)),
        ("failed", s.failed),
        ("duplicates", s.duplicates),
        ("waiting for a move", s.moves_waiting),
    ]
    html = '<div class="cards">' + "".join(
        f'<div class="card"><div class="n">{n:,}</div><div>{escape(k)}</div></div>' for k, n in cards
    )
    html += "</div>"
    rows = [
        ("p(malignant)", f"mean {_fmt(s.mean_p, '.3f')}, median {_fmt(s.median_p, '.3f')}"),
        ("latency", f"p50 {_fmt(s.latency_p50_ms, '.1f', ' ms')}, p95 {_fmt(s.latency_p95_ms, '.1f', ' ms')}"),
        ("throughput", _fmt(s.throughput_per_s, ".1f", " images/s")),
    ]
    return html + _table(("", ""), rows, "kv")


def _models(data: ReportData) -> str:
    if not data.models and data.model_sha256 is None:
        return "<p>No model classified a file in this window.</p>"
    rows: list[tuple[Any, ...]] = [
        (
            m.sha256[:12] + (" (served)" if m.sha256 == data.model_sha256 else ""),
            m.run_id,
            m.engine,
            m.threshold,
            m.registered_at,
            m.files,
        )
        for m in data.models
    ]
    if data.model_sha256 is not None and all(m.sha256 != data.model_sha256 for m in data.models):
        rows.append((data.model_sha256[:12] + " (served)", "–", "–", None, None, 0))
    note = '<p class="small">Full sha256: ' + ", ".join(escape(m.sha256) for m in data.models) + "</p>"
    return _table(("model sha256", "run", "engine", "threshold", "registered (UTC)", "files"), rows) + note


def _over_time(data: ReportData) -> str:
    s = data.summary
    width = bucket_width(s.period_start, s.period_end)
    found = buckets(data.rows, s.period_start, s.period_end)
    unit = {timedelta(minutes=5): "5 minutes", timedelta(hours=1): "hour", timedelta(days=1): "day"}[width]
    series = [Series(label, COLORS[label], [b.by_label.get(label, 0) for b in found]) for label in LABELS]
    series.append(Series("failed", COLORS["failed"], [b.failed for b in found]))
    chart = bars([_bucket_label(b, width) for b in found], series, label=f"files per {unit}", unit="files")
    return f"<h2>Files per {unit} (UTC) by label</h2>{_legend()}{chart}"


def _legend() -> str:
    return (
        '<p class="legend">'
        + "".join(f'<span><i style="background:{c}"></i>{escape(k)}</span>' for k, c in COLORS.items())
        + "</p>"
    )


def _p_distribution(data: ReportData) -> str:
    classified = [r for r in data.rows if r.status == "classified" and r.p_malignant is not None]
    if not classified:
        return "<h2>p(malignant)</h2><p>No classified image in this window.</p>"
    counts = {label: [0] * P_BINS for label in LABELS}
    for r in classified:
        assert r.p_malignant is not None
        i = min(P_BINS - 1, int(r.p_malignant * P_BINS))
        counts.setdefault(r.label or "", [0] * P_BINS)[i] += 1
    thresholds = [r.threshold for r in classified if r.threshold is not None]
    threshold = statistics.mode(thresholds) if thresholds else None
    edges = [f"{i / P_BINS:.2f}" for i in range(P_BINS)]
    series = [Series(label, COLORS[label], counts[label]) for label in LABELS]
    marker = None if threshold is None else (threshold * P_BINS, f"threshold {threshold:.3f}")
    chart = bars(edges, series, label="p(malignant) distribution", unit="images", marker=marker, edges=True)
    return f"<h2>p(malignant), by the label given</h2>{chart}"


def _latency(data: ReportData) -> str:
    values = [r.latency_ms for r in data.rows]
    if not values:
        return "<h2>Latency</h2><p>No file in this window.</p>"
    names = [f"<{_ms(LATENCY_EDGES_MS[0])}"]
    names += [f"{_ms(a)}–{_ms(b)}" for a, b in itertools.pairwise(LATENCY_EDGES_MS)]
    names.append(f"≥{_ms(LATENCY_EDGES_MS[-1])}")
    counts = [0] * len(names)
    for v in values:
        counts[sum(1 for edge in LATENCY_EDGES_MS if v >= edge)] += 1
    s = data.summary
    caption = f"p50 {_fmt(s.latency_p50_ms, '.1f', ' ms')}, p95 {_fmt(s.latency_p95_ms, '.1f', ' ms')}"
    chart = bars(names, [Series("files", "#6a8f5a", counts)], label="latency", unit="files")
    return f"<h2>Latency, arrival to row (ms)</h2><p>{escape(caption)}</p>{chart}"


def _ms(value: int) -> str:
    """``500``, ``1k``, ``10k`` (ms): short enough for the axis."""
    return f"{value // 1000}k" if value >= 1000 and value % 1000 == 0 else str(value)


def _failures(data: ReportData) -> str:
    s = data.summary
    html = "<h2>Failures by reason</h2>"
    if not s.by_reason:
        html += "<p>No file failed in this window.</p>"
    else:
        items = sorted(s.by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
        html += hbars(items, label="failures by reason")
    if s.moves_waiting or s.moves_gone_by_reason:
        rows = [(reason, n, "waiting for a move") for reason, n in s.moves_waiting_by_reason.items()]
        rows += [(reason, n, "gone before the move") for reason, n in s.moves_gone_by_reason.items()]
        html += "<h3>Files not moved</h3>" + _table(("reason", "files", ""), rows)
    return html


def _reviews(data: ReportData) -> str:
    a = data.agreement
    html = "<h2>Review agreement: model and pathologists</h2>"
    if not a.reviewed:
        return html + "<p>None of this window's classifications has been reviewed yet (`histod audit review`).</p>"
    kappa = "–" if a.kappa is None else f"{a.kappa:.3f}"
    share = "–" if a.agreement is None else f"{a.agreement:.1%}"
    html += (
        f"<p>{a.reviewed} classifications reviewed (the latest review of each counts): the reviewer agreed with "
        f"the model on <b>{share}</b>; Cohen's kappa <b>{kappa}</b> (1: full agreement, 0: what chance "
        "gives).</p>"
    )
    matrix = [(f"reviewer {LABELS[i]}", *a.matrix[i]) for i in range(len(LABELS))]
    html += _table(("", *(f"model {label}" for label in LABELS)), matrix, "matrix")
    if not a.disagreements:
        return html + "<p>No disagreement.</p>"
    shown = a.disagreements[:DISAGREEMENTS_SHOWN]
    rows = [
        (d.result_id, d.received_at, d.name, d.model_label, d.p_malignant, d.reviewer_label, d.reviewer, d.note)
        for d in shown
    ]
    html += f"<h3>Disagreements ({len(a.disagreements)})</h3>"
    html += _table(("result", "received (UTC)", "file", "model", "p", "reviewer's call", "reviewer", "note"), rows)
    if len(a.disagreements) > len(shown):
        html += f"<p>… and {len(a.disagreements) - len(shown)} more (`histod report --format json`).</p>"
    return html


STYLE = """
body{font-family:sans-serif;margin:2em auto;max-width:900px;color:#222;padding:0 1em}
h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{padding:.25em .7em;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}table.kv td:first-child{color:#555}table.matrix td{text-align:right}
.cards{display:flex;flex-wrap:wrap;gap:.6em;margin:1em 0}.card{border:1px solid #ddd;border-radius:6px;
padding:.5em .9em;min-width:7em}.card .n{font-size:1.6em;font-weight:bold}.small,.meta{color:#666;font-size:.85em}
.legend span{margin-right:1.2em}.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;
vertical-align:middle}svg{display:block;margin:.4em 0}
"""


def render(data: ReportData) -> str:
    """The page, as one string (UTF-8 when written)."""
    s = data.summary
    span = s.period_end - s.period_start
    meta = [
        f"{s.period_start:%Y-%m-%d %H:%M:%S} – {s.period_end:%Y-%m-%d %H:%M:%S} UTC ({_span(span)})",
        f"generated {data.generated_at:%Y-%m-%d %H:%M:%S} UTC by histod {__version__}",
    ]
    if data.host:
        meta.append(f"host {data.host}")
    if data.report_id is not None:
        meta.append(f"report {data.report_id} in the audit trail")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>histod report {s.period_start:%Y-%m-%d %H:%M} – {s.period_end:%Y-%m-%d %H:%M} UTC</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>histod report</h1>",
        '<p class="meta">' + " · ".join(escape(m) for m in meta) + "</p>",
        _overview(data),
        "<h2>Model in use</h2>",
        _models(data),
        _over_time(data),
        _p_distribution(data),
        _latency(data),
        _failures(data),
        _reviews(data),
        '<p class="small">Counts are of the files received in the window, from the audit database; reviews as '
        "recorded when the report was made. A research tool, not a medical device: every result needs a "
        "pathologist's review.</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _span(span: timedelta) -> str:
    hours = span.total_seconds() / 3600
    return (
        f"{hours * 60:.0f} minutes" if hours < 1 else f"{hours:.1f} hours" if hours < 48 else f"{hours / 24:.1f} days"
    )
