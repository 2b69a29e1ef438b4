"""Device gauges of a live run: one per GPU, or CPU and RAM where there is no GPU."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import RenderResult
from textual.widget import Widget

from tui.widgets.run_format import short_bytes


def bar(fraction: float | None, width: int, style: str) -> Text:
    """A horizontal bar ``width`` cells wide; an unknown fraction is a dim dotted track."""
    width = max(1, width)
    if fraction is None:
        return Text("·" * width, style="dim")
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * width)
    return Text.assemble(("█" * full, style), ("░" * (width - full), "dim"))


def _level_style(fraction: float | None) -> str:
    if fraction is None:
        return "dim"
    return "red" if fraction >= 0.9 else "yellow" if fraction >= 0.7 else "green"


class DeviceGauges(Widget):
    """The latest device sample of each device as labelled bars.

    GPU: utilisation, memory used / total (and what the run's processes hold), power. Host:
    the run's CPU use (100% = one core, the bar spans every core) and RAM used / total with the
    run's resident memory. No sample yet is shown as such, not as zero.
    """

    DEFAULT_CSS = """
    DeviceGauges {
        height: auto;
        min-height: 2;
    }
    """

    def __init__(self, cpu_count: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.samples: list[dict[str, Any]] = []
        self.cpu_count = cpu_count

    def update_samples(self, samples: list[dict[str, Any]]) -> None:
        self.samples = sorted(samples, key=lambda s: (s.get("kind") != "gpu", str(s["device"])))
        self.refresh(layout=True)

    def get_content_height(self, container, viewport, width: int) -> int:
        gpus = sum(1 for s in self.samples if s.get("kind") == "gpu")
        return gpus * 2 if gpus else 3

    def render(self) -> RenderResult:
        width = self.size.width or 30
        if not self.samples:
            return Text("no device sample yet", style="dim")
        gpus = [s for s in self.samples if s.get("kind") == "gpu"]
        out = Text(no_wrap=True, overflow="crop")
        label_w = 5
        bar_w = max(4, width - label_w - 13)
        if gpus:
            for s in gpus:
                name = str(s["device"])[:label_w].ljust(label_w)
                util = s.get("util")
                frac = None if util is None else util / 100.0
                out.append(name, style="bold")
                out.append_text(bar(frac, bar_w, _level_style(frac)))
                out.append(f" {'N/A' if util is None else f'{util:3.0f}%'}")
                if s.get("power_w") is not None:
                    out.append(f" {s['power_w']:.0f}W")
                out.append("\n")
                used, total = s.get("mem_used"), s.get("mem_total")
                mfrac = used / total if used is not None and total else None
                out.append(" mem ".ljust(label_w))
                out.append_text(bar(mfrac, bar_w, _level_style(mfrac)))
                out.append(f" {short_bytes(used)}/{short_bytes(total)}\n")
            out.rstrip()
            return out
        host = next((s for s in self.samples if s.get("kind") != "gpu"), None)
        if host is None:
            return Text("no device sample yet", style="dim")
        cpu = host.get("util")
        cores = self.cpu_count or 1
        frac = None if cpu is None else cpu / (100.0 * cores)
        out.append("CPU".ljust(label_w), style="bold")
        out.append_text(bar(frac, bar_w, _level_style(frac)))
        out.append(f" {'N/A' if cpu is None else f'{cpu:4.0f}%'}")
        out.append(f"/{cores * 100}%\n" if self.cpu_count else "\n")
        used, total = host.get("mem_used"), host.get("mem_total")
        mfrac = used / total if used is not None and total else None
        out.append("RAM".ljust(label_w), style="bold")
        out.append_text(bar(mfrac, bar_w, _level_style(mfrac)))
        out.append(f" {short_bytes(used)}/{short_bytes(total)}")
        if host.get("proc_mem") is not None:
            out.append(f"\n{'':<{label_w}}run {short_bytes(host['proc_mem'])}", style="dim")
        return out
