"""What a person watching a copy sees on a terminal, drawn by rich.

rich redraws the lines in place (a Live display, a few times a second), knows the
terminal's width, and leaves no escape codes behind when it stops; it is the
ecosystem's usual choice for this, and saves hand-written cursor control. The figures
come from progress.py; this only lays them out:

    120.0 MiB / 300.0 MiB  40%  ━━━━━━━━━━━━━━━╸──────────  12.3 MiB/s  0:00:14 left
    objects 12 / 30   1 failed   2 skipped
      big.bin         ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╸────  88%   88.0/100.0 MiB
"""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from daemon.progress import View

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n: float) -> str:
    unit = 0
    while abs(n) >= 1024 and unit < len(_UNITS) - 1:
        n /= 1024
        unit += 1
    return f"{n:.0f} {_UNITS[unit]}" if unit == 0 else f"{n:.1f} {_UNITS[unit]}"


def duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def headline(v: View) -> str:
    """The figures, as one plain line: the screen's first, and the summary at the end."""
    total = size(v.bytes_total) + (" so far, listing" if v.listing else "")
    pct = f"{v.fraction:.0%}" if v.fraction is not None else "--%"
    left = f"{duration(v.seconds_left)} left" if v.seconds_left is not None else "-:--:-- left"
    return f"{size(v.bytes_done)} / {total}  {pct}  {size(v.rate)}/s  {left}"


def counts(v: View) -> str:
    out = f"objects {v.objects_done} / {v.objects_total}{'+' if v.listing else ''}"
    if v.failed:
        out += f"   {v.failed} failed"
    if v.skipped:
        out += f"   {v.skipped} skipped"
    return out


def render(v: View) -> RenderableType:
    top = Table.grid(padding=(0, 2))
    top.add_row(
        Text(headline(v)),
        ProgressBar(total=1.0, completed=v.fraction or 0.0, width=30, pulse=v.fraction is None),
    )
    lines: list[RenderableType] = [top, Text(counts(v))]
    if v.largest:
        each = Table.grid(padding=(0, 2))
        for t in v.largest:
            share = t.done / t.size if t.size else None
            label = t.name.rsplit("/", 1)[-1] or t.name
            figures = f"{size(t.done)}/{size(t.size)}" if t.size else size(t.done)
            pct = f"{share:4.0%}" if share is not None else "  --"
            bar = ProgressBar(total=1.0, completed=share or 0.0, width=30, pulse=share is None)
            each.add_row(Text("  " + label[:40]), bar, Text(pct), Text(figures))
        lines.append(each)
    return Group(*lines)


class Screen:
    """A Live display on stderr, redrawn from ``view()`` a few times a second; nothing
    at all when stderr is not a terminal (or ``enabled`` is false)."""

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self.enabled = enabled and self._console.is_terminal
        self._live: Live | None = None

    def start(self, view: View) -> None:
        if self.enabled:
            self._live = Live(
                render(view), console=self._console, refresh_per_second=4, transient=True
            )
            self._live.start()

    def show(self, view: View) -> None:
        if self._live is not None:
            self._live.update(render(view))

    def stop(self, view: View) -> None:
        """Take the live lines away and leave one plain summary line."""
        if self._live is not None:
            self._live.stop()
            self._live = None
            self._console.print(f"{headline(view)}   {counts(view)}", highlight=False)
