"""Step 4, Memory and parallelism: the hardware, every ZeRO stage x offload option with its
memory per GPU, host RAM and NVMe and whether it fits, the recommendation, and the batch knobs
next to it so the numbers move as they change. Estimates come from ``engine.planner`` in a
worker on every change."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Static
from textual.worker import get_current_worker

from engine.profile import Problem
from tui.screens.wizard.base import WizardStep, problems_box
from tui.widgets.wizard_field import Field, choices

GiB = 2**30
PLAN_FIELDS = ("resources", "deepspeed", "training.micro_batch_size", "training.grad_accum",
               "training.gradient_checkpointing", "model", "method", "data.max_seq_len")


def gib(n: float | int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.1f}"


def offload_label(opt: str, par: str) -> str:
    if opt == "none" and par == "none":
        return "-"
    if opt == par:
        return f"optim+param {opt}"
    parts = []
    if opt != "none":
        parts.append(f"optim {opt}")
    if par != "none":
        parts.append(f"param {par}")
    return ", ".join(parts)


@dataclass
class PlanInput:
    """What one estimate refresh needs, taken on the UI thread."""

    seq: int
    profile: Any  # engine.profile.Profile
    base_dir: Any
    hardware: Any  # engine.planner.Hardware
    shape: Any  # engine.model_shape.ModelShape
    started: float


class PlanReady(Message):
    def __init__(self, seq: int, plan: Any = None, error: str | None = None,
                 started: float = 0.0) -> None:
        super().__init__()
        self.seq = seq
        self.plan = plan
        self.error = error
        self.started = started


def compute_plan(inp: PlanInput) -> Any:
    """Every ZeRO option for the draft on the given hardware (engine.planner.plan)."""
    from engine.dsconfig import Placement
    from engine.estimate import setup_from_profile
    from engine.planner import plan
    from engine.profile import LoadedProfile

    hw = inp.hardware
    p = inp.profile
    dtype = p.model.dtype
    if dtype == "auto":
        dtype = "bf16" if hw.device == "gpu" else "fp32"
    ranks = hw.gpus_per_node if hw.device == "gpu" else (
        p.resources.gpus_per_node if isinstance(p.resources.gpus_per_node, int) else 1)
    placement = Placement(hw.device, ranks, hw.num_nodes, dtype)
    setup = setup_from_profile(LoadedProfile(p, None, inp.base_dir), placement)
    return plan(inp.shape, setup, hw)


class MemoryStep(WizardStep):
    step_id = "memory"
    title = "Memory"
    summary = "Hardware, ZeRO stage and offload: what fits, and what is fastest."
    owns = ("resources", "deepspeed", "training.micro_batch_size", "training.grad_accum",
            "training.gradient_checkpointing")

    def __init__(self) -> None:
        super().__init__()
        self.plan: Any = None
        self.plan_error: str | None = None
        self._seq = 0
        self.refresh_count = 0
        self.last_refresh_at = 0.0
        self.last_latency = 0.0
        self._rows: list[Any] = []

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("", id="mem-hardware", classes="info")
            with Grid(id="mem-fields"):
                yield Field("resources.num_nodes", "Nodes", show_help=False)
                yield Field("resources.gpus_per_node", "GPUs per node", show_help=False)
                yield Field("resources.gpu_memory_gb", "GPU memory GiB", show_help=False,
                            help="Memory per GPU for the estimate; auto: detected")
                yield Field("resources.host_memory_gb", "Host RAM GiB", show_help=False,
                            help="RAM per node for the estimate; auto: detected")
                yield Field("resources.device", "Device", kind="select", show_help=False,
                            options=choices(["auto", "gpu", "cpu"]))
                yield Field("deepspeed.nvme_path", "NVMe path", show_help=False)
                yield Field("training.micro_batch_size", "Micro-batch", show_help=False)
                yield Field("training.grad_accum", "Grad accumulation", show_help=False)
                yield Field("training.gradient_checkpointing", "Grad checkpointing",
                            kind="bool", show_help=False)
                yield Field("resources.hostfile", "Hostfile", show_help=False, id="mem-hostfile")
            yield problems_box()
            with Horizontal(id="mem-rec-row"):
                yield Static("", id="mem-recommend", classes="recommend")
                yield Button("Use it", id="mem-use", compact=True)
            yield DataTable(id="mem-table", cursor_type="row", zebra_stripes=False)
            yield Static("", id="mem-note", classes="info dim")

    def on_mount(self) -> None:
        self.set_columns("gpu")

    def set_columns(self, device: str) -> None:
        table = self.query_one("#mem-table", DataTable)
        if getattr(table, "_device", None) == device:
            return
        table._device = device  # type: ignore[attr-defined]
        table.clear(columns=True)
        per = "per GPU" if device == "gpu" else "per rank"
        for key, label in (("mark", " "), ("zero", "ZeRO"), ("offload", "Offload"),
                           ("device", per), ("host", "host/node"), ("nvme", "NVMe"),
                           ("time", "s/step"), ("fits", "fits")):
            table.add_column(label, key=key)

    # --- inputs -------------------------------------------------------------------------------

    def after_load(self) -> None:
        self.update_visibility()

    def on_enter(self) -> None:
        super().on_enter()
        self.update_visibility()
        self.refresh_plan()

    def after_edit(self, path: str) -> None:
        self.update_visibility()
        self.refresh_plan()

    def update_visibility(self) -> None:
        multi = self.draft.value("resources.num_nodes")
        self.query_one("#mem-hostfile").display = isinstance(multi, int) and multi > 1

    def hardware(self) -> tuple[Any, str | None]:
        """The hardware to plan for: the fields, falling back on what was detected here."""
        from engine.planner import Hardware

        detected = self.wizard.detected_hardware
        d = self.draft
        device = d.value("resources.device")
        gpus = d.value("resources.gpus_per_node")
        gpu_mem = d.value("resources.gpu_memory_gb")
        host = d.value("resources.host_memory_gb")
        nodes = d.value("resources.num_nodes")
        if not isinstance(nodes, int) or nodes < 1:
            return None, "set the number of nodes"
        det_gpus = detected.gpus_per_node if detected else 0
        if device == "cpu":
            use_gpu = False
        elif device == "gpu":
            use_gpu = True
        else:
            use_gpu = det_gpus > 0 or not isinstance(gpu_mem, str)
        if use_gpu:
            n = gpus if isinstance(gpus, int) else max(det_gpus, 1)
            if isinstance(gpu_mem, (int, float)) and not isinstance(gpu_mem, bool):
                mem = int(gpu_mem * GiB)
            elif detected and detected.gpu_mem_bytes:
                mem = detected.gpu_mem_bytes
            else:
                return None, "no GPU detected here: set GPU memory GiB to plan for a GPU machine"
        else:
            n, mem = 0, 0
        if isinstance(host, (int, float)) and not isinstance(host, bool):
            host_bytes = int(host * GiB)
        else:
            host_bytes = detected.host_mem_bytes if detected else 0
        nvme = self.wizard.nvme_free_bytes(d.get("deepspeed.nvme_path"))
        name = detected.gpu_name if (detected and use_gpu and det_gpus) else ""
        declared = not (device == "auto" and gpus == "auto" and gpu_mem == "auto"
                        and host == "auto")
        return Hardware(gpus_per_node=n, gpu_mem_bytes=mem, num_nodes=nodes,
                        host_mem_bytes=host_bytes, nvme_free_bytes=nvme, gpu_name=name,
                        source="declared" if declared else "detected"), None

    def planning_profile(self) -> tuple[Any, str | None]:
        """The draft as a Profile for the estimate (data paths need not exist yet)."""
        from pydantic import ValidationError

        from engine.profile import Profile

        data = copy.deepcopy(self.draft.for_target())
        data.setdefault("data", {}).setdefault("train", "")
        data["name"] = data.get("name") or "draft"
        try:
            return Profile.model_validate(data), None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            return None, f"fix {where} to see estimates"

    def refresh_plan(self) -> None:
        """Start an estimate for the current draft (replacing any still running)."""
        self._seq += 1
        started = time.perf_counter()
        w = self.wizard
        self.show_hardware_line()
        if not w.estimator_available:
            return self.show_plan_error(
                "Estimator not available (engine.planner could not be imported).")
        if w.shape_pending:
            return self.show_plan_error("reading the model's config ...", dim=True)
        if w.shape is None:
            return self.show_plan_error(
                f"Needs the model's shape: {w.shape_error or 'choose a model in step 2'}.")
        profile, err = self.planning_profile()
        if profile is None:
            return self.show_plan_error(err or "")
        hw, err = self.hardware()
        if hw is None:
            return self.show_plan_error(err or "")
        inp = PlanInput(self._seq, profile, self.draft.source_dir, hw, w.shape, started)
        self._plan_worker(inp)

    @work(thread=True, exclusive=True, exit_on_error=False, group="estimate")
    def _plan_worker(self, inp: PlanInput) -> None:
        try:
            result = compute_plan(inp)
        except Exception as exc:  # an estimate that cannot be made is shown, never raised
            msg = PlanReady(inp.seq, error=f"no estimate: {exc}", started=inp.started)
        else:
            msg = PlanReady(inp.seq, plan=result, started=inp.started)
        if not get_current_worker().is_cancelled:
            self.post_message(msg)

    # --- showing the plan ---------------------------------------------------------------------

    def show_hardware_line(self) -> None:
        det = self.wizard.detected_hardware
        out = self.query_one("#mem-hardware", Static)
        if det is None:
            out.update("detecting this machine ...")
            return
        if det.gpus_per_node:
            here = (f"{det.gpus_per_node} x {det.gpu_name or 'GPU'} "
                    f"({gib(det.gpu_mem_bytes)} GiB each)")
        else:
            here = "no GPU (training runs on the CPU)"
        out.update(f"This machine: {here}, {gib(det.host_mem_bytes)} GiB RAM. "
                   "Plan for another machine by setting the fields.")

    def show_plan_error(self, message: str, dim: bool = False) -> None:
        self.plan = None
        self.plan_error = None if dim else message
        table = self.query_one("#mem-table", DataTable)
        table.clear()
        self._rows = []
        self.query_one("#mem-recommend", Static).update(
            Text(message, style="dim" if dim else "yellow"))
        self.query_one("#mem-use", Button).display = False
        self.query_one("#mem-note", Static).update("")

    @on(PlanReady)
    def _plan_ready(self, event: PlanReady) -> None:
        event.stop()
        if event.seq != self._seq:
            return  # a newer change is on its way
        if event.error:
            self.show_plan_error(event.error)
        else:
            self.show_plan(event.plan)
        self.refresh_count += 1
        self.last_refresh_at = time.perf_counter()
        self.last_latency = self.last_refresh_at - event.started
        self.refresh_errors()

    def current_option(self) -> tuple[int, str, str]:
        d = self.draft
        return (int(d.value("deepspeed.zero_stage")), str(d.value("deepspeed.offload_optimizer")),
                str(d.value("deepspeed.offload_param")))

    def show_plan(self, plan: Any) -> None:
        self.plan = plan
        self.plan_error = None
        hw = plan.hardware
        self.set_columns(hw.device)
        table = self.query_one("#mem-table", DataTable)
        current = self.current_option()
        rec = plan.recommended
        cursor = table.cursor_row
        table.clear()
        self._rows = list(plan.rows)
        for r in plan.rows:
            est = r.estimate
            need = est.gpu_peak_bytes if est.setup.device == "gpu" else est.device_total_bytes
            option = (r.zero_stage, r.offload_optimizer, r.offload_param)
            is_rec = r is rec
            style = "bold green" if is_rec else ("" if r.fits else "dim")
            fits = "best" if is_rec else ("yes" if r.fits else "no")
            cells = [
                "*" if option == current else " ",
                str(r.zero_stage),
                offload_label(r.offload_optimizer, r.offload_param),
                gib(need),
                gib(est.host_bytes),
                gib(est.nvme_bytes) if est.nvme_bytes else "-",
                f"{r.step_seconds:.2f}" if r.step_seconds < 100 else f"{r.step_seconds:.0f}",
                fits,
            ]
            table.add_row(*[Text(c, style=style if i else "bold") for i, c in enumerate(cells)],
                          key=f"{r.zero_stage}-{r.offload_optimizer}-{r.offload_param}")
        if 0 <= cursor < len(self._rows):
            table.move_cursor(row=cursor, animate=False)
        rec_text = Text()
        if rec is not None:
            rec_text.append(f"Recommended: {rec.label}. ", style="bold green")
        rec_text.append(plan.why)
        if rec is not None and plan.max_micro_batch:
            rec_text.append(f" Largest micro-batch with it: {plan.max_micro_batch}.")
        self.query_one("#mem-recommend", Static).update(rec_text)
        self.query_one("#mem-use", Button).display = rec is not None and (
            rec.zero_stage, rec.offload_optimizer, rec.offload_param) != current
        cur_row = next((r for r in plan.rows if (r.zero_stage, r.offload_optimizer,
                                                 r.offload_param) == current), None)
        note = ""
        if cur_row is None:
            note = "Your choice (*) is not among the options for this hardware."
        elif not cur_row.fits:
            note = f"Your choice (*) does not fit: {cur_row.why_not}."
        else:
            note = "* your choice; Enter on a row picks it. GiB; time per optimizer step is rough."
        if not self.draft.get("deepspeed.nvme_path") and any(
                "nvme" in (r.offload_optimizer, r.offload_param) for r in plan.rows):
            note += " NVMe rows need an NVMe path."
        self.query_one("#mem-note", Static).update(note)

    # --- picking an option --------------------------------------------------------------------

    def apply_option(self, stage: int, opt: str, par: str) -> None:
        d = self.draft
        d.put("deepspeed.zero_stage", stage)
        d.put("deepspeed.offload_optimizer", opt)
        d.put("deepspeed.offload_param", par)
        if self.plan is not None:
            self.show_plan(self.plan)
        self.refresh_errors()
        self.wizard.draft_changed("deepspeed.zero_stage")

    @on(DataTable.RowSelected, "#mem-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if 0 <= event.cursor_row < len(self._rows):
            r = self._rows[event.cursor_row]
            self.apply_option(r.zero_stage, r.offload_optimizer, r.offload_param)

    @on(Button.Pressed, "#mem-use")
    def _use_recommended(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_use_recommended()

    def action_use_recommended(self) -> None:
        rec = self.plan.recommended if self.plan is not None else None
        if rec is not None:
            self.apply_option(rec.zero_stage, rec.offload_optimizer, rec.offload_param)

    def extra_problems(self) -> list[Problem]:
        out = []
        if self.plan is not None:
            cur = self.current_option()
            row = next((r for r in self.plan.rows if (r.zero_stage, r.offload_optimizer,
                                                     r.offload_param) == cur), None)
            if row is None and self.plan.hardware.device == "cpu" and "nvme" in cur[1:]:
                out.append(Problem("deepspeed.offload_optimizer",
                                   "NVMe offload needs a GPU (DeepSpeed's async I/O); pick a "
                                   "row of the table"))
        return out
