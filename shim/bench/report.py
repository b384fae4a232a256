"""Showing the results: results.json, a rich table on the terminal, PNG charts.

Charts (matplotlib, Agg backend, imported only here): one ``<figure>.png`` per figure with
samples (median bars, min–max whiskers, one bar per subject), ``density_steps.png`` (the
slowest exec as containers were added) and ``summary.png`` (vm ÷ process per figure).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shim.bench.stats import SUBJECT_LABELS, Figure, Results

COLORS = {"vm": "#4c72b0", "process": "#55a868", "runc": "#c44e52", "oci": "#8172b2", "floor": "#8c8c8c"}


def fmt(value: float | None, unit: str) -> str:
    """A value with its unit, as many digits as are worth reading."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "containers":
        return f"{value:.0f}"
    a = abs(value)
    digits = 0 if a >= 100 else 1 if a >= 10 else 2
    return f"{value:.{digits}f} {unit}"


def fmt_range(lo: float, hi: float, unit: str) -> str:
    """``[min – max]`` with the unit once (seconds keep theirs: ms and s may mix)."""
    if unit in ("s", "containers"):
        return f"[{fmt(lo, unit)} – {fmt(hi, unit)}]"
    return f"[{fmt(lo, unit).rsplit(' ', 1)[0]} – {fmt(hi, unit)}]"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}x" if value < 100 else f"{value:.0f}x"


def write_json(results: Results, path: Path) -> Path:
    path.write_text(json.dumps(results.to_dict(), indent=2) + "\n")
    return path


def headline(results: Results) -> str:
    """One line: accel, CPU, kernels, runs — what every figure depends on."""
    h = results.meta.get("host", {})
    accel = h.get("accel", {})
    return (
        f"accel {str(accel.get('kind', '?')).upper()} ({accel.get('reason', '?')}); "
        f"{h.get('cpus', '?')} x {h.get('cpu_model', '?')}; host kernel "
        f"{h.get('host_kernel', '?')}, guest kernel {h.get('guest_kernel') or '?'}; "
        f"{results.meta.get('runs', '?')} runs"
    )


def short_headline(results: Results) -> str:
    """The chart subtitle: accel, CPU, kernels, runs, without the accel's reason."""
    h = results.meta.get("host", {})
    return (
        f"{str(h.get('accel', {}).get('kind', '?')).upper()} · {h.get('cpus', '?')} x "
        f"{h.get('cpu_model', '?')} · host {h.get('host_kernel', '?')} · guest "
        f"{h.get('guest_kernel') or '?'} · {results.meta.get('runs', '?')} runs"
    )


def table(results: Results) -> tuple[Table, list[str]]:
    """The terminal table (one row per figure and subject) and its footnotes: why a
    figure is missing, how a density run stopped."""
    t = Table(
        title=escape("vmshim bench — medians [min – max]"), caption=escape(headline(results)), header_style="bold"
    )
    t.add_column("figure", no_wrap=True)
    t.add_column("subject", no_wrap=True)
    t.add_column("median", justify="right", no_wrap=True)
    t.add_column(escape("[min – max]"), justify="right", no_wrap=True)
    t.add_column("n", justify="right", no_wrap=True)
    t.add_column("÷ process", justify="right", no_wrap=True)
    t.add_column("÷ floor", justify="right", no_wrap=True)
    t.add_column("note")
    notes: list[str] = []

    def footnote(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    for name, fig in results.figures.items():
        first = True
        label = f"{name} ({fig.unit}{' ↑' if fig.higher_is_better else ''})"
        for subject, r in fig.ordered():
            s = r.summary
            if r.skipped:
                note = ("n/a " if r.skipped.startswith("n/a") else "not measured ") + footnote(r.skipped)
            elif r.extra.get("stopped"):
                note = footnote(f"{name} {subject}: {r.extra['stopped']}")
            elif r.extra.get("read"):
                note = f"reads {r.extra['read']}"
            elif any(k.startswith("speedup_vs_") for k in r.extra):
                key = next(k for k in r.extra if k.startswith("speedup_vs_"))
                note = f"{r.extra[key]:g}x faster than {key[len('speedup_vs_') :]}"
            else:
                note = ""
            t.add_row(
                label if first else "",
                subject,
                fmt(s.median, fig.unit) if s else "—",
                escape(fmt_range(s.min, s.max, fig.unit)) if s and s.runs > 1 else "",
                str(s.runs) if s else "",
                fmt_ratio(fig.ratio(subject, "process")),
                fmt_ratio(fig.ratio(subject, "floor")),
                escape(note),
                style="dim" if s is None else None,
            )
            first = False
        t.add_section()
    return t, [f"[{i + 1}] {text}" for i, text in enumerate(notes)]


def print_table(results: Results, console: Console | None = None) -> None:
    console = console or Console()
    t, notes = table(results)
    console.print(t)
    for line in notes:
        console.print(line, markup=False, highlight=False)


# ------------------------------------------------------------------------------------------
# charts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _set_title(f, title: str, subtitle: str) -> None:
    """Title and subtitle centred on the whole figure (not the axes, which sit right of
    the labels), the subtitle wrapped at its `` · `` separators so that no line is wider
    than the figure."""
    renderer = f.canvas.get_renderer()
    room = f.get_figwidth() * f.dpi * 0.96

    def width(line: str) -> float:
        probe = f.text(0, 0, line, fontsize=9)
        extent = probe.get_window_extent(renderer).width
        probe.remove()
        return extent

    lines: list[str] = []
    for part in subtitle.split(" · "):
        if lines and width(f"{lines[-1]} · {part}") <= room:
            lines[-1] = f"{lines[-1]} · {part}"
        else:
            lines.append(part)
    f.suptitle("\n".join([title, *lines]), fontsize=9)


def _save(f, path: Path) -> Path:
    f.tight_layout()
    f.savefig(path)
    _pyplot().close(f)
    return path


def chart_figure(fig: Figure, subtitle: str, path: Path) -> Path | None:
    """Median bars with min–max whiskers, one per measured subject; None when no subject
    has samples."""
    rows = [(s, r.summary) for s, r in fig.ordered() if r.summary is not None]
    if not rows:
        return None
    plt = _pyplot()
    f, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    xs = range(len(rows))
    medians = [s.median for _, s in rows]
    lower = [s.median - s.min for _, s in rows]
    upper = [s.max - s.median for _, s in rows]
    bars = ax.bar(
        xs, medians, color=[COLORS.get(n, "#999999") for n, _ in rows], yerr=[lower, upper], capsize=6, ecolor="#333333"
    )
    for bar, (_, s) in zip(bars, rows):
        ax.annotate(
            fmt(s.median, fig.unit),
            (bar.get_x() + bar.get_width() / 2, s.max),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(
        list(xs), [SUBJECT_LABELS.get(n, n).replace(", ", "\n").replace(" --", "\n--") for n, _ in rows], fontsize=8
    )
    ax.set_ylabel(fig.unit + (" (higher is better)" if fig.higher_is_better else ""))
    _set_title(f, fig.title, subtitle)
    ax.margins(y=0.15)
    return _save(f, path)


def chart_density(fig: Figure, subtitle: str, path: Path) -> Path | None:
    """Slowest ``exec true`` against the number of running containers, per subject."""
    series = [(s, r.extra.get("steps") or []) for s, r in fig.ordered()]
    series = [(s, steps) for s, steps in series if steps]
    if not series:
        return None
    plt = _pyplot()
    f, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for s, steps in series:
        pts = [(st["running"], st["exec_max_s"]) for st in steps if st.get("exec_max_s") is not None]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                color=COLORS.get(s, "#999999"),
                label=SUBJECT_LABELS.get(s, s),
            )
    ax.axhline(1.0, color="#999999", linestyle="--", linewidth=1)
    ax.set_xlabel("containers running")
    ax.set_ylabel("slowest exec true (s)")
    _set_title(f, "Density: exec latency as containers are added", subtitle)
    ax.legend(fontsize=8)
    return _save(f, path)


def chart_density_pss(fig: Figure, subtitle: str, path: Path) -> Path | None:
    """Host PSS per container (the steps' summed PSS ÷ containers running) against the
    number running, per subject; None when no step has a PSS."""
    series = []
    for s, r in fig.ordered():
        pts = [
            (st["running"], st["pss_total_mib"] / st["running"])
            for st in r.extra.get("steps") or []
            if st.get("pss_total_mib")
        ]
        if pts:
            series.append((s, pts))
    if not series:
        return None
    plt = _pyplot()
    f, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for s, pts in series:
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            color=COLORS.get(s, "#999999"),
            label=SUBJECT_LABELS.get(s, s),
        )
    ax.set_xlabel("containers running")
    ax.set_ylabel("host PSS per container (MiB)")
    ax.set_ylim(bottom=0)
    _set_title(f, "Density: host memory per idle container", subtitle)
    ax.legend(fontsize=8)
    return _save(f, path)


def chart_summary(results: Results, subtitle: str, path: Path) -> Path | None:
    """vm ÷ process for every figure that has both, log scale (1 = same)."""
    rows = []
    for name, fig in results.figures.items():
        r = fig.ratio("vm", "process")
        if r is not None and r > 0:
            rows.append((name, r, fig.higher_is_better))
    if not rows:
        return None
    plt = _pyplot()
    f, ax = plt.subplots(figsize=(7, 1.4 + 0.35 * len(rows)), dpi=110)
    ys = range(len(rows))
    ax.barh(list(ys), [r for _, r, _ in rows], color=COLORS["vm"], left=0)
    for y, (_, r, _) in zip(ys, rows):
        ax.annotate(fmt_ratio(r), (r, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(list(ys), [f"{n} ({'↑' if hb else '↓'} better)" for n, _, hb in rows], fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15)  # room for the ratio printed after the longest bar
    ax.axvline(1.0, color="#333333", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("vm median ÷ process median")
    _set_title(f, "VM isolation relative to process isolation", subtitle)
    return _save(f, path)


def write_charts(results: Results, out: Path) -> list[Path]:
    """Every chart that has data; returns their paths."""
    subtitle = short_headline(results)
    written = []
    for name, fig in results.figures.items():
        p = chart_figure(fig, subtitle, out / f"{name}.png")
        if p:
            written.append(p)
    if "density" in results.figures:
        for chart, name in ((chart_density, "density_steps.png"), (chart_density_pss, "density_pss.png")):
            p = chart(results.figures["density"], subtitle, out / name)
            if p:
                written.append(p)
    p = chart_summary(results, subtitle, out / "summary.png")
    if p:
        written.append(p)
    return written
