"""Step 3, Method: continued pre-training, supervised fine-tuning or preference optimisation;
full weights, LoRA or QLoRA with their settings; what each needs from the data."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.widgets import Label, RadioSet, Static

from engine.data_formats import FORMAT_COLUMNS, METHOD_FORMATS, detect_format
from engine.profile import Problem
from tui.screens.wizard.base import StepScroll, WizardStep, problems_box, set_radio
from tui.widgets.wizard_toggle import Choice
from tui.widgets.wizard_field import Field, choices

METHODS = {
    "cpt": ("Continued pre-training (CPT)",
            "teach the model a domain's language from raw text; needs text"),
    "sft": ("Supervised fine-tuning (SFT)",
            "teach it to answer like your examples; needs prompt/completion or chat messages"),
    "dpo": ("Preference optimisation (DPO)",
            "prefer good answers over bad ones; needs prompt, chosen and rejected"),
}
ADAPTERS = {
    "none": ("Full", "train every weight: best quality, most memory"),
    "lora": ("LoRA", "train small adapter matrices: a fraction of the memory, near-full quality"),
    "qlora": ("QLoRA", "LoRA on a 4-bit base model: least memory; needs an NVIDIA GPU"),
}


def radio_label(title: str, line: str) -> Text:
    t = Text(title, style="bold")
    t.append(f"  {line}", style="dim")
    return t


class MethodStep(WizardStep):
    step_id = "method"
    title = "Method"
    summary = "How to train: CPT, SFT or DPO; all weights, LoRA or QLoRA."
    owns = ("method",)

    def compose(self) -> ComposeResult:
        with StepScroll():
            yield Label("Method", classes="section-title")
            with RadioSet(id="method-kind", compact=True):
                for key, (title, line) in METHODS.items():
                    yield Choice(radio_label(title, line), id=f"kind-{key}")
            yield Static("", id="method-data", classes="info")
            yield Label("Weights", classes="section-title")
            with RadioSet(id="method-adapter", compact=True):
                for key, (title, line) in ADAPTERS.items():
                    yield Choice(radio_label(title, line), id=f"adapter-{key}")
            yield Field("method.lora.r", "LoRA rank r", classes="lora")
            yield Field("method.lora.alpha", "LoRA alpha", classes="lora")
            yield Field("method.lora.dropout", "LoRA dropout", classes="lora",
                        help="Dropout on the adapter's input during training")
            yield Field("method.lora.target_modules", "Target modules", classes="lora",
                        placeholder="all-linear or [q_proj, v_proj]")
            yield Field("method.merge_adapter", "Merge adapter", kind="bool", classes="lora")
            yield Field("method.qlora.bits", "QLoRA bits", kind="select",
                        options=choices([4, 8]), classes="qlora",
                        help="Bits per base weight (4: NF4/FP4, 8: int8)")
            yield Field("method.qlora.quant_type", "QLoRA quant type", kind="select",
                        options=choices(["nf4", "fp4"]), classes="qlora",
                        help="nf4 suits normally distributed weights (the usual choice)")
            yield Field("method.dpo.beta", "DPO beta", classes="dpo")
            yield Field("method.dpo.loss_type", "DPO loss", kind="select",
                        options=choices(["sigmoid", "ipo", "hinge", "robust"]), classes="dpo",
                        help="sigmoid: the DPO paper's loss; ipo/hinge/robust: variants")
            yield problems_box()

    def after_load(self) -> None:
        set_radio(self.query_one("#method-kind", RadioSet), f"kind-{self.draft.value('method.kind')}")
        set_radio(self.query_one("#method-adapter", RadioSet),
                  f"adapter-{self.draft.value('method.adapter')}")
        self.show_parts()

    def on_enter(self) -> None:
        # The method may have followed the data since the last visit.
        self.after_load()
        super().on_enter()

    def show_parts(self) -> None:
        kind = self.draft.value("method.kind")
        adapter = self.draft.value("method.adapter")
        for f in self.query(".lora"):
            f.display = adapter in ("lora", "qlora")
        for f in self.query(".qlora"):
            f.display = adapter == "qlora"
        for f in self.query(".dpo"):
            f.display = kind == "dpo"
        self.show_data_fit()

    def data_format(self) -> str | None:
        fmt = self.draft.value("data.format")
        if fmt and fmt != "auto":
            return str(fmt)
        cols = self.wizard.data_columns
        if not cols:
            return None
        mapping = self.draft.get("data.columns", {})
        present = set(cols) | ({k for k in mapping} if isinstance(mapping, dict) else set())
        return detect_format(present)

    def show_data_fit(self) -> None:
        kind = str(self.draft.value("method.kind"))
        fmt = self.data_format()
        need = " or ".join("/".join(FORMAT_COLUMNS[f]) for f in METHOD_FORMATS[kind])
        t = Text()
        t.append(f"{kind} reads columns {need}. ", style="")
        if fmt is None:
            t.append("Your data's shape is not known yet (step 1).", style="dim")
        elif fmt in METHOD_FORMATS[kind]:
            t.append(f"Your data is {fmt}: it fits.", style="green")
        else:
            t.append(f"Your data is {fmt}: it does not fit.", style="bold red")
        self.query_one("#method-data", Static).update(t)

    @on(RadioSet.Changed, "#method-kind")
    def _kind_changed(self, event: RadioSet.Changed) -> None:
        event.stop()
        kind = (event.pressed.id or "").removeprefix("kind-")
        self.draft.put("method.kind", kind)
        self._edited("method.kind")

    @on(RadioSet.Changed, "#method-adapter")
    def _adapter_changed(self, event: RadioSet.Changed) -> None:
        event.stop()
        adapter = (event.pressed.id or "").removeprefix("adapter-")
        self.draft.put("method.adapter", adapter)
        self._edited("method.adapter")

    def _edited(self, path: str) -> None:
        self.show_parts()
        self.refresh_errors()
        self.wizard.draft_changed(path)

    def extra_problems(self) -> list[Problem]:
        kind = str(self.draft.value("method.kind"))
        fmt = self.data_format()
        if fmt is not None and fmt not in METHOD_FORMATS.get(kind, ()):
            need = " or ".join(METHOD_FORMATS[kind])
            return [Problem("method.kind", f"{kind} needs {need} data; the training data is "
                            f"{fmt} (choose another method or other data in step 1)")]
        return []
