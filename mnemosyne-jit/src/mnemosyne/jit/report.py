"""``mnemo report``: a job's recoveries as a table, a one-line summary, and a timeline picture.

Everything comes from the job's event log (:func:`mnemosyne.core.events.read_events`),
cut into incidents by :mod:`mnemosyne.jit.summary`. The timeline has one panel per
recovery: a *critical path* row (detect, replace, repair, transfer, resume back to back,
as the summary times them), an ``abort`` row (the survivors' blocked collectives
raising, in parallel with ``replace``), and one row per rank with the phases it logged.

Two picture formats: a self-contained HTML page with inline SVG (no script, no network;
pure Python) and a PNG (matplotlib, ``pip install 'mnemosyne-jit[report]'``).

Nothing here imports torch: the module is safe to import from the ``mnemo`` parser.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mnemosyne.core.errors import ConfigError, MissingDependencyError
from mnemosyne.core.events import Event, EventKind, read_events
from mnemosyne.jit.summary import Incident, incidents

__all__ = [
    "CRITICAL_PATH",
    "PHASE_COLORS",
    "Bar",
    "Panel",
    "load_events",
    "one_line",
    "panels",
    "table",
    "write_html",
    "write_png",
]

#: Phases of a recovery's critical path, in the order they happen.
CRITICAL_PATH = ("detect", "replace", "repair", "transfer", "resume")
#: Colour of each phase in the pictures.
PHASE_COLORS = {
    "detect": "#d62728",
    "abort": "#7f7f7f",
    "replace": "#ff7f0e",
    "repair": "#1f77b4",
    "agree": "#8c564b",
    "transfer": "#2ca02c",
    "resume": "#9467bd",
}
# Per-rank phases drawn on the rank rows (the others, e.g. ``ckpt``, are not part of a recovery).
_RANK_PHASES = ("abort", "repair", "agree", "transfer", "resume")


def load_events(paths: Sequence[str | os.PathLike[str]]) -> list[Event]:
    """Read and merge event logs (one per node in a multi-node job), in time order.

    Raises:
        ConfigError: A file does not exist.
    """
    events: list[Event] = []
    for p in paths:
        if not Path(p).is_file():
            msg = f"no event log at {p}"
            raise ConfigError(msg)
        events += read_events(p, strict=False)  # a crash may leave a torn last line
    return sorted(events, key=lambda e: e.ts)


def _fault_text(inc: Incident) -> str:
    if inc.faults:
        parts = []
        for f in inc.faults:
            where = f" ({f['phase']})" if f.get("phase") else ""
            at = f" @ step {f['step']}" if f.get("step") is not None else ""
            parts.append(f"{f['kind']} rank {f['rank']}{at}{where}")
        return ", ".join(parts)
    return ", ".join(f"{d['cause']} rank {d['rank']}" for d in inc.detections) or "?"


def _ranks_text(inc: Incident) -> str:
    ranks = sorted({int(d["rank"]) for d in inc.detections if d.get("rank") is not None})
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def one_line(inc: Incident) -> str:
    """The summary line of one recovery.

    Example: ``recovered rank 2 (kill) in 0.41 s: detect 0.02, replace 0.09, repair 0.15,
    transfer 0.10, resume 0.05; 1 step redone``.
    """
    causes = ", ".join(sorted({str(d["cause"]) for d in inc.detections}))
    phases = ", ".join(f"{name} {inc.phases_s.get(name, 0.0):.2f}" for name in CRITICAL_PATH)
    steps = f"{inc.steps_redone} step{'' if inc.steps_redone == 1 else 's'} redone"
    if not inc.complete:
        return f"recovery of {_ranks_text(inc)} ({causes}) unfinished (the log ends before every rank resumed)"
    return f"recovered {_ranks_text(inc)} ({causes}) in {inc.total_s:.2f} s: {phases}; {steps}"


def table(incs: Sequence[Incident]) -> str:
    """A plain-text table of the recoveries, durations in seconds."""
    cols = ["#", "fault", "detect", "abort", "replace", "repair", "transfer", "resume", "total", "redone"]
    rows = [[str(i), _fault_text(inc), *(f"{inc.phases_s.get(n, 0.0):.3f}" for n in
                                         ("detect", "abort", "replace", "repair", "transfer", "resume")),
             f"{inc.total_s:.3f}" if inc.complete else "unfinished", str(inc.steps_redone)]
            for i, inc in enumerate(incs, 1)]
    widths = [max(len(c), *(len(r[j]) for r in rows)) if rows else len(c) for j, c in enumerate(cols)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if j == 1 else v.rjust(w) for j, (v, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([fmt(cols), "  ".join("-" * w for w in widths), *map(fmt, rows)])


@dataclass
class Bar:
    """One bar of a timeline: ``phase`` from ``start`` to ``end`` seconds after the fault."""

    row: str
    phase: str
    start: float
    end: float


@dataclass
class Panel:
    """One recovery's timeline."""

    title: str
    rows: list[str] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    span: float = 0.0


def panels(events: Sequence[Event], incs: Sequence[Incident] | None = None) -> list[Panel]:
    """The timeline of every recovery (times relative to its first fault)."""
    incs = incidents(list(events)) if incs is None else incs
    out: list[Panel] = []
    for i, inc in enumerate(incs, 1):
        t0 = inc.start_ts
        p = Panel(f"recovery {i}: {_fault_text(inc)}; {inc.total_s:.3f} s to resumed training, "
                  f"{inc.steps_redone} step{'' if inc.steps_redone == 1 else 's'} redone")
        p.rows = ["critical path", "abort"]
        t = 0.0
        for name in CRITICAL_PATH:
            d = inc.phases_s.get(name, 0.0)
            p.bars.append(Bar("critical path", name, t, t + d))
            t += d
        detect = inc.phases_s.get("detect", 0.0)
        p.bars.append(Bar("abort", "abort", detect, detect + inc.phases_s.get("abort", 0.0)))
        t_end = t0 + inc.total_s
        epochs = set(inc.epochs)
        ranks: set[int] = set()
        for e in events:
            if e.kind != EventKind.PHASE or e.rank < 0 or e.name not in _RANK_PHASES or e.duration_s is None:
                continue
            if not (t0 - 1e-3 <= e.ts <= t_end + 1e-3) or (e.name != "abort" and e.epoch not in epochs):
                continue
            ranks.add(e.rank)
            p.bars.append(Bar(f"rank {e.rank}", e.name, max(0.0, e.ts - e.duration_s - t0), e.ts - t0))
        p.rows += [f"rank {r}" for r in sorted(ranks)]
        p.span = max([inc.total_s, *(b.end for b in p.bars)])
        out.append(p)
    return out


# ---------------------------------------------------------------- HTML (inline SVG)
_LABEL_W, _BAR_H, _ROW_H, _PLOT_W, _TOP = 120, 16, 22, 760, 40


def _svg(panel: Panel) -> str:
    height = _TOP + _ROW_H * len(panel.rows) + 30
    width = _LABEL_W + _PLOT_W + 20
    scale = _PLOT_W / (panel.span or 1.0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<text x="4" y="16" font-weight="bold">{html.escape(panel.title)}</text>']
    for j, row in enumerate(panel.rows):
        y = _TOP + j * _ROW_H
        parts.append(f'<text x="4" y="{y + 12}">{html.escape(row)}</text>')
    for b in panel.bars:
        y = _TOP + panel.rows.index(b.row) * _ROW_H
        x = _LABEL_W + b.start * scale
        w = max(1.0, (b.end - b.start) * scale)  # a zero-length phase still shows
        color = PHASE_COLORS.get(b.phase, "#17becf")
        parts.append(f'<rect class="bar" data-row="{html.escape(b.row)}" data-phase="{b.phase}" '
                     f'data-start="{b.start:.6f}" data-end="{b.end:.6f}" x="{x:.2f}" y="{y}" width="{w:.2f}" '
                     f'height="{_BAR_H}" fill="{color}"><title>{html.escape(b.row)}: {b.phase} '
                     f'{(b.end - b.start) * 1000:.1f} ms (at {b.start * 1000:.1f} ms)</title></rect>')
    axis_y = _TOP + _ROW_H * len(panel.rows) + 4
    parts.append(f'<line x1="{_LABEL_W}" y1="{axis_y}" x2="{_LABEL_W + _PLOT_W}" y2="{axis_y}" stroke="#333"/>')
    for k in range(6):
        x = _LABEL_W + _PLOT_W * k / 5
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">'
                     f'{panel.span * k / 5 * 1000:.0f} ms</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_html(path: str | os.PathLike[str], events: Sequence[Event], title: str = "mnemo report") -> None:
    """Write the recoveries' table and timelines as one self-contained HTML page (inline SVG)."""
    incs = incidents(list(events))
    legend = " ".join(f'<span style="background:{c};color:#fff;padding:1px 6px">{n}</span>'
                      for n, c in PHASE_COLORS.items())
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>{len(incs)} recover{'y' if len(incs) == 1 else 'ies'}; times in seconds, from the event log.</p>",
            f"<pre>{html.escape(table(incs))}</pre>", f"<p>{legend}</p>"]
    body += [f"<figure>{_svg(p)}</figure>" for p in panels(events, incs)]
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    Path(path).write_text(page, encoding="utf-8")


# ---------------------------------------------------------------- PNG (matplotlib)
def write_png(path: str | os.PathLike[str], events: Sequence[Event], title: str = "mnemo report") -> None:
    """Write the recoveries' timelines as a PNG.

    Raises:
        MissingDependencyError: matplotlib is not installed.
        ConfigError: The log holds no recovery.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        what = "matplotlib (for PNG timelines; or write .html)"
        raise MissingDependencyError(what, "pip install 'mnemosyne-jit[report]'") from exc
    ps = panels(events)
    if not ps:
        msg = "no recovery in the event log: nothing to draw"
        raise ConfigError(msg)
    heights = [len(p.rows) + 1.5 for p in ps]
    fig, axes = plt.subplots(len(ps), 1, figsize=(10, 0.35 * sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, p in zip(axes[:, 0], ps, strict=True):
        for b in p.bars:
            y = len(p.rows) - 1 - p.rows.index(b.row)
            width = max(b.end - b.start, p.span / 800)
            ax.broken_barh([(b.start * 1000, width * 1000)], (y - 0.35, 0.7),
                           facecolors=PHASE_COLORS.get(b.phase, "#17becf"))
        ax.set_yticks(range(len(p.rows)), list(reversed(p.rows)))
        ax.set_xlim(0, p.span * 1000 * 1.02 or 1.0)
        ax.set_xlabel("ms after the fault")
        ax.set_title(p.title, fontsize=9, loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLORS.values()]
    fig.legend(handles, list(PHASE_COLORS), loc="upper right", ncol=len(PHASE_COLORS), fontsize=8)
    fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
