"""Step 6, Training: how long, how fast, how often to evaluate and save; each field with its
help text and inline validation."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Label

from tui.screens.wizard.base import StepScroll, WizardStep, problems_box
from tui.widgets.wizard_field import Field, choices


class TrainingStep(WizardStep):
    step_id = "training"
    title = "Training"
    summary = "Length, learning rate and schedule, evaluation and checkpoints."
    owns = ("training", "seed")

    def compose(self) -> ComposeResult:
        with StepScroll():
            yield Label("Length", classes="section-title")
            yield Field("training.epochs", "Epochs")
            yield Field("training.max_steps", "Max steps", placeholder="none: use epochs")
            yield Label("Optimiser", classes="section-title")
            yield Field("training.lr", "Learning rate")
            yield Field("training.scheduler", "Scheduler", kind="select",
                        options=choices(["cosine", "linear", "constant", "constant_with_warmup"]),
                        help="How the learning rate moves after warmup")
            yield Field("training.warmup_ratio", "Warmup ratio",
                        help="Share of the steps spent ramping the learning rate up")
            yield Field("training.weight_decay", "Weight decay",
                        help="AdamW decoupled weight decay")
            yield Field("training.max_grad_norm", "Max grad norm")
            yield Label("Evaluation and checkpoints", classes="section-title")
            yield Field("training.eval_every", "Eval every")
            yield Field("training.eval_max_rows", "Eval max rows", placeholder="all")
            yield Field("training.save_every", "Save every")
            yield Field("training.keep_checkpoints", "Keep checkpoints")
            yield Field("seed", "Seed", help="Random seed: same seed, same data order and init")
            yield problems_box()
