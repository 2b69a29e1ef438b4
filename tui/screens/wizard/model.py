"""Step 2, Model: a local model folder, a hub id, an entry of the offline catalog, or a model
built from a config; its shape (architecture, parameters, layers, hidden size, context)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, RadioSet, Select, Static

from engine.model_shape import CATALOG_HUB_IDS, catalog_names
from engine.profile import Problem, model_location
from tui.screens.wizard.base import StepScroll, WizardStep, problems_box, set_radio, show
from tui.widgets.wizard_toggle import Choice
from tui.widgets.wizard_field import Field, choices

SOURCES = {
    "catalog": "Catalog: a known model (weights from the hub at launch)",
    "hub": "Hub id: org/name on the Hugging Face hub",
    "local": "Local folder: a Hugging Face model directory",
    "scratch": "From scratch: random weights from a config",
}
DTYPES = {"auto": "auto (bf16 on GPU, fp32 on CPU)", "bf16": "bf16", "fp16": "fp16",
          "fp32": "fp32"}
HUB_TO_CATALOG = {v.lower(): k for k, v in CATALOG_HUB_IDS.items()}
TRUST_WARNING = ("trust_remote_code runs Python code from the model's repository on every rank "
                 "with your permissions: turn it on only for a repository you have read and trust.")


def human_params(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


class ModelStep(WizardStep):
    step_id = "model"
    title = "Model"
    summary = "The base model: from the catalog, the hub, a local folder, or built from a config."
    owns = ("model",)

    def __init__(self) -> None:
        super().__init__()
        self._kind = "catalog"

    def compose(self) -> ComposeResult:
        with StepScroll():
            with RadioSet(id="model-source", compact=True):
                for key, label in SOURCES.items():
                    yield Choice(label, id=f"src-{key}")
            with Horizontal(classes="field-row", id="model-catalog-row"):
                yield Label("Catalog entry", classes="field-label")
                yield Select([(n, n) for n in catalog_names()], prompt="(choose)",
                             compact=True, id="model-catalog", classes="field-control")
            yield Field("model.path", "Model path / hub id", wide=True, show_help=False,
                        placeholder="./models/base or org/name")
            yield Field("model.revision", "Hub revision", placeholder="main", show_help=False)
            yield Field("model.config", "Config (YAML)", wide=True, show_help=False,
                        placeholder="{model_type: llama, hidden_size: 512, ...}")
            yield Field("model.tokenizer_vocab_size", "Tokenizer vocab", show_help=False)
            yield Field("model.tokenizer", "Tokenizer", placeholder="default: the model's",
                        show_help=False)
            yield Static("", id="model-shape", classes="info")
            yield Field("model.dtype", "Precision", kind="select", show_help=False,
                        options=choices(list(DTYPES), DTYPES))
            yield Field("model.trust_remote_code", "Trust remote code", kind="bool",
                        show_help=False)
            yield Static(TRUST_WARNING, id="model-trust-warning", classes="warning")
            yield problems_box()

    # --- which source ---------------------------------------------------------------------------

    def source_kind(self) -> str:
        d = self.draft
        if d.value("model.init") == "scratch":
            return "scratch"
        path = d.get("model.path")
        if not isinstance(path, str) or not path:
            return self._kind
        if path.lower() in HUB_TO_CATALOG:
            return "catalog"
        loc = model_location(path, d.source_dir)
        if loc.kind in ("local", "missing"):
            return "local"
        return "hub"

    def after_load(self) -> None:
        self._kind = self.source_kind()
        self.show_kind()

    def show_kind(self) -> None:
        kind = self._kind
        set_radio(self.query_one("#model-source", RadioSet), f"src-{kind}")
        self.query_one("#model-catalog-row").display = kind == "catalog"
        path = self.draft.get("model.path")
        sel = self.query_one("#model-catalog", Select)
        with sel.prevent(Select.Changed):
            short = HUB_TO_CATALOG.get(str(path).lower()) if isinstance(path, str) else None
            sel.value = short if short else Select.NULL
        by_path = {f.path: f for f in self.query(Field)}
        by_path["model.path"].display = kind in ("hub", "local")
        by_path["model.revision"].display = kind in ("hub", "catalog")
        by_path["model.config"].display = kind == "scratch"
        by_path["model.tokenizer_vocab_size"].display = kind == "scratch"
        by_path["model.tokenizer"].display = kind == "scratch"
        self.update_trust()
        self.show_shape()

    def update_trust(self) -> None:
        self.query_one("#model-trust-warning").display = bool(
            self.draft.value("model.trust_remote_code"))

    @on(RadioSet.Changed, "#model-source")
    def _source_changed(self, event: RadioSet.Changed) -> None:
        event.stop()
        kind = (event.pressed.id or "src-catalog").removeprefix("src-")
        self._kind = kind
        d = self.draft
        if kind == "scratch":
            d.put("model.init", "scratch")
        else:
            if d.get("model.init") == "scratch" or d.has("model.init"):
                d.put("model.init", "pretrained")
            if kind == "catalog" and isinstance(d.get("model.path"), str) and \
                    d.get("model.path", "").lower() not in HUB_TO_CATALOG:
                d.unset("model.path")
        self.show_kind()
        self.refresh_errors()
        self.wizard.draft_changed("model.init")

    @on(Select.Changed, "#model-catalog")
    def _catalog_changed(self, event: Select.Changed) -> None:
        event.stop()
        if event.value is Select.NULL:
            return
        hub_id = CATALOG_HUB_IDS.get(str(event.value), str(event.value))
        self.draft.put("model.path", hub_id)
        if self.draft.get("model.init") == "scratch":
            self.draft.put("model.init", "pretrained")
        self.refresh_errors()
        self.wizard.draft_changed("model.path")

    def after_edit(self, path: str) -> None:
        if path == "model.trust_remote_code":
            self.update_trust()

    # --- shape ----------------------------------------------------------------------------------

    def on_enter(self) -> None:
        super().on_enter()
        self.show_shape()

    def show_shape(self) -> None:
        out = self.query_one("#model-shape", Static)
        w = self.wizard
        if w.shape_pending:
            if getattr(out, "_shown_content", None) is None:  # else keep the last shape shown
                show(out, "reading the model's config ...")
        elif w.shape_error:
            show(out, f"[red]{w.shape_error}[/]")
        elif w.shape is None:
            show(out, "[dim]choose a model to see its shape[/]")
        else:
            s, pc = w.shape, w.param_count
            lines = [
                f"[b]{s.architecture or s.model_type}[/] ({s.model_type})"
                + (f", {s.num_experts} experts, {s.experts_per_token} per token" if s.is_moe else ""),
                f"parameters {human_params(pc.total)}" + ("" if pc.exact else " (approx.)")
                + f", layers {s.num_layers}, hidden size {s.hidden_size}, heads {s.num_heads}"
                + (f"/{s.num_kv_heads} kv" if s.num_kv_heads != s.num_heads else ""),
                f"context length {s.max_position_embeddings:,}, vocabulary {s.vocab_size:,}, "
                f"stored as {s.torch_dtype}",
            ]
            show(out, "\n".join(lines))

    def extra_problems(self) -> list[Problem]:
        d = self.draft
        out = []
        if self._kind == "catalog" and not d.get("model.path"):
            out.append(Problem("model.path", "choose a catalog entry"))
        w = self.wizard
        if w.shape_error and not w.shape_pending and d.value("model.init") == "scratch":
            out.append(Problem("model.config", w.shape_error))
        return out
