"""Step 5, Inference: generate from the trained model with DeepSpeed-Inference (kernel
injection, tensor parallel) or ZeRO-Inference (weights offloaded to CPU or NVMe), each with its
memory estimate; the prompts file and generation settings."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.message import Message
from textual.widgets import DataTable, Label, RadioSet
from textual.worker import get_current_worker

from tui.screens.wizard.base import StepScroll, WizardStep, problems_box, set_radio
from tui.screens.wizard.memory import gib
from tui.widgets.wizard_toggle import Choice
from tui.widgets.wizard_field import Field, choices

MODES = {
    "none": ("None", "no generation after training"),
    "deepspeed": ("DeepSpeed-Inference",
                  "fused kernels and tensor parallelism: lowest latency, whole model in GPU memory"),
    "zero": ("ZeRO-Inference",
             "weights on CPU or NVMe, streamed per layer: models larger than GPU memory, slow"),
}


class InferenceEstimated(Message):
    def __init__(self, seq: int, rows: dict[str, Any], error: str | None) -> None:
        super().__init__()
        self.seq = seq
        self.rows = rows
        self.error = error


class InferenceStep(WizardStep):
    step_id = "inference"
    title = "Inference"
    summary = "Optional generation after training, and what each way costs in memory."
    owns = ("inference",)

    def __init__(self) -> None:
        super().__init__()
        self._seq = 0

    def compose(self) -> ComposeResult:
        with StepScroll():
            with RadioSet(id="inf-mode", compact=True):
                for key, (title, line) in MODES.items():
                    t = Text(title, style="bold")
                    t.append(f"  {line}", style="dim")
                    yield Choice(t, id=f"mode-{key}")
            yield DataTable(id="inf-table", cursor_type="none", show_cursor=False)
            yield Field("inference.prompts", "Prompts file", wide=True,
                        placeholder="e.g. data/prompts.jsonl")
            yield Field("inference.tensor_parallel", "Tensor parallel", classes="ds",
                        help="GPUs that share one copy of the model (DeepSpeed-Inference)")
            yield Field("inference.kernel_inject", "Kernel injection", kind="bool", classes="ds")
            yield Field("inference.offload", "Offload to", kind="select",
                        options=choices(["cpu", "nvme"]), classes="zero",
                        help="Where ZeRO-Inference keeps the weights (nvme: deepspeed.nvme_path)")
            yield Field("inference.max_new_tokens", "Max new tokens", classes="gen",
                        help="Tokens generated per prompt at most")
            yield Field("inference.batch_size", "Batch size", classes="gen",
                        help="Prompts generated together")
            yield Field("inference.temperature", "Temperature", classes="gen")
            yield Field("inference.top_p", "Top-p", classes="gen",
                        help="Nucleus sampling: keep the most likely tokens up to this mass")
            yield problems_box()
            yield Label("", id="inf-note", classes="info dim")

    def on_mount(self) -> None:
        t = self.query_one("#inf-table", DataTable)
        for key, label in (("mode", "Mode"), ("device", "per GPU"), ("kv", "KV cache"),
                           ("host", "host"), ("nvme", "NVMe")):
            t.add_column(label, key=key)

    def after_load(self) -> None:
        set_radio(self.query_one("#inf-mode", RadioSet), f"mode-{self.draft.value('inference.mode')}")
        self.show_parts()

    def on_enter(self) -> None:
        super().on_enter()
        self.show_parts()
        self.refresh_estimates()

    def show_parts(self) -> None:
        mode = self.draft.value("inference.mode")
        for f in self.query(".ds"):
            f.display = mode == "deepspeed"
        for f in self.query(".zero"):
            f.display = mode == "zero"
        for f in self.query(".gen"):
            f.display = mode != "none"
        self.query_one("Field").display = mode != "none"  # the prompts file

    @on(RadioSet.Changed, "#inf-mode")
    def _mode_changed(self, event: RadioSet.Changed) -> None:
        event.stop()
        mode = (event.pressed.id or "").removeprefix("mode-")
        self.draft.put("inference.mode", mode)
        self.show_parts()
        self.refresh_errors()
        self.refresh_estimates()
        self.wizard.draft_changed("inference.mode")

    def after_edit(self, path: str) -> None:
        self.refresh_estimates()

    def refresh_estimates(self) -> None:
        self._seq += 1
        w = self.wizard
        note = self.query_one("#inf-note", Label)
        if not w.estimator_available:
            note.update("Estimator not available.")
            return
        if w.shape is None:
            note.update("Estimates need the model's shape (step 2).")
            self.query_one("#inf-table", DataTable).clear()
            return
        from engine.estimate import InferenceSetup

        d = self.draft
        mem_step = w.step("memory")
        hw, _ = mem_step.hardware()  # type: ignore[attr-defined]
        dtype = d.value("model.dtype")
        on_gpu = hw is not None and hw.device == "gpu"
        if dtype == "auto":
            dtype = "bf16" if on_gpu else "fp32"

        def num(path: str, default: int) -> int:
            v = d.value(path)
            return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else default

        base = InferenceSetup(
            mode="deepspeed", dtype=dtype, batch_size=num("inference.batch_size", 4),
            prompt_len=num("data.max_seq_len", 1024),
            max_new_tokens=num("inference.max_new_tokens", 128),
            tensor_parallel=num("inference.tensor_parallel", 1),
            offload=str(d.value("inference.offload")),
            gpus_per_node=hw.gpus_per_node if (hw is not None and hw.gpus_per_node) else 1,
            kernel_inject=bool(d.value("inference.kernel_inject")),
        )
        note.update("" if on_gpu else "No GPU in the plan: inference would run without fused "
                    "kernels; the figures are for a GPU.")
        self._estimate(self._seq, w.shape, base)

    @work(thread=True, exclusive=True, exit_on_error=False, group="inference-estimate")
    def _estimate(self, seq: int, shape: Any, base: Any) -> None:
        from engine.estimate import estimate_inference

        rows: dict[str, Any] = {}
        error = None
        try:
            rows["deepspeed"] = estimate_inference(shape, base)
            for off in ("cpu", "nvme"):
                rows[f"zero-{off}"] = estimate_inference(shape, replace(base, mode="zero",
                                                                        offload=off))
        except Exception as exc:  # shown in the note, never raised
            error = f"no estimate: {exc}"
        if not get_current_worker().is_cancelled:
            self.post_message(InferenceEstimated(seq, rows, error))

    @on(InferenceEstimated)
    def _estimated(self, event: InferenceEstimated) -> None:
        event.stop()
        if event.seq != self._seq:
            return
        table = self.query_one("#inf-table", DataTable)
        table.clear()
        if event.error:
            self.query_one("#inf-note", Label).update(event.error)
            return
        mode = self.draft.value("inference.mode")
        offload = self.draft.value("inference.offload")
        labels = {"deepspeed": "DeepSpeed-Inference", "zero-cpu": "ZeRO-Inference, CPU",
                  "zero-nvme": "ZeRO-Inference, NVMe"}
        for key, est in event.rows.items():
            chosen = key == mode or key == f"{mode}-{offload}"
            style = "bold" if chosen else ""
            table.add_row(*[Text(c, style=style) for c in (
                ("* " if chosen else "  ") + labels[key], gib(est.gpu_peak_bytes),
                gib(est.kv_cache_bytes), gib(est.host_bytes),
                gib(est.nvme_bytes) if est.nvme_bytes else "-")])
