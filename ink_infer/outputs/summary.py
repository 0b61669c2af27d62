"""What the CLI prints from a ``RunReport``: the per-model table and the dry run's verdicts."""

from __future__ import annotations

from ink_infer.outputs.report import PARTIAL_REUSED, ModelResult, RunReport, Verdicts

TABLE = [
    ("name", "model", "s"),
    ("status", "status", "s"),
    ("windows", "windows", "d"),
    ("ms_per_window", "ms/window", ".1f"),
    ("spread", "p10-p90 ms", "s"),
    ("projected_h", "projected h", ".3f"),
    ("gpu_gib", "peak GPU GiB", ".2f"),
    ("host_gib", "peak host GiB", ".2f"),
]


def table_rows(report: RunReport) -> list[dict]:
    """One row per model. ms/window: a dry run's projected rate (the median of its warm batches), else the mean;
    status ``reused`` when every unit came from partials (``ok, k/n reused`` for some)."""
    rows = []
    for m in report.models:
        seconds = sum(f.seconds for f in m.fragments.values())
        p = m.projection
        spread = p.s_per_window_p10_p90 if p else None
        rows.append({
            "name": m.name, "status": _status(m), "windows": m.windows,
            "ms_per_window": 1000 * p.s_per_window if p else (1000 * seconds / m.windows if m.windows else None),
            "spread": f"{1000 * spread[0]:.1f}-{1000 * spread[1]:.1f}" if spread else None,
            "projected_h": p.projected_hours if p else None,
            "gpu_gib": (m.gpu_peak_gib or {}).get("reserved"), "host_gib": m.host_peak_gib,
        })  # fmt: skip
    return rows


def _status(m: ModelResult) -> str:
    reused = sum(f.partial == PARTIAL_REUSED for f in m.fragments.values())
    if m.status != "ok" or not reused:
        return m.status
    return "reused" if reused == len(m.fragments) else f"ok, {reused}/{len(m.fragments)} reused"


def format_verdicts(p: Verdicts) -> str:
    lines = [
        f"projected time, these fragments: {p.hours:.2f} h of {p.budget_hours_after_margin:.2f} h "
        f"(budget {p.budget_hours:g} h less the safety margin): {p.hours_verdict}"
    ]
    for size, v in p.hours_scaled.items():
        lines.append(f"projected time, a {size} fragment: {v.hours:.2f} h: {v.verdict}")
    gpu = "-" if p.gpu_peak_gib is None else f"{p.gpu_peak_gib:.2f} GiB"
    lines.append(f"peak GPU memory {gpu}: {p.gpu_verdict}")
    lines.append(f"peak host memory {p.host_peak_gib:.2f} GiB: {p.host_verdict}")
    if p.models_not_ok:
        lines.append(f"models that did not run: {', '.join(p.models_not_ok)}")
    return "\n".join(lines)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` is (key, header, format spec) per column."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
