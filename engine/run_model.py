"""A run's trained model: where it is on disk and how to load it as one plain HF model.

A run leaves either a full model in ``model/``, or a LoRA adapter there (plus ``model/merged/``
when ``method.merge_adapter``). Checkpoints are ``checkpoints/checkpoint-N/``: a full model or
an adapter saved by the Trainer, and, under ZeRO-3 without gathered weights, only DeepSpeed's
partitioned shards (``global_stepN/``), which are consolidated with ``zero_to_fp32``.

Inference, evaluation, chat and export all load through :func:`load_run_model`. Torch and
transformers are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelNotFound(Exception):
    """The run has no model to load (not finished, or the checkpoint is missing)."""


@dataclass
class ModelSource:
    """What was found: a directory and how its weights are stored."""

    path: Path
    kind: str  # "full" | "adapter" | "zero"  (zero: partitioned DeepSpeed shards only)
    tokenizer_dir: Path


def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("pytorch_model*.bin"))


def _is_adapter(d: Path) -> bool:
    return (d / "adapter_config.json").exists()


def checkpoint_dirs(run_dir: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for c in (run_dir / "checkpoints").glob("checkpoint-*"):
        tail = c.name.rsplit("-", 1)[-1]
        if tail.isdigit():
            out[int(tail)] = c
    return out


def find_model(run_dir: Path, checkpoint: int | None = None, *, prefer_merged: bool = True) -> ModelSource:
    """The model of a run (final, or checkpoint ``N``); raise ModelNotFound with what exists."""
    run_dir = Path(run_dir)
    tok_dir = run_dir / "model"
    if checkpoint is None:
        model_dir = run_dir / "model"
        if prefer_merged and (model_dir / "merged" / "config.json").exists():
            return ModelSource(model_dir / "merged", "full", model_dir / "merged")
        if _is_adapter(model_dir):
            return ModelSource(model_dir, "adapter", model_dir)
        if (model_dir / "config.json").exists() and _has_weights(model_dir):
            return ModelSource(model_dir, "full", model_dir)
        have = sorted(checkpoint_dirs(run_dir))
        hint = f"; checkpoints: {', '.join(map(str, have))} (use --checkpoint N)" if have else ""
        raise ModelNotFound(f"run has no final model in {model_dir}{hint}")
    ckpts = checkpoint_dirs(run_dir)
    if checkpoint not in ckpts:
        have = ", ".join(map(str, sorted(ckpts))) or "none"
        raise ModelNotFound(f"no checkpoint {checkpoint} in {run_dir / 'checkpoints'} (have: {have})")
    c = ckpts[checkpoint]
    tok = c if (c / "tokenizer_config.json").exists() else tok_dir
    if _is_adapter(c):
        return ModelSource(c, "adapter", tok)
    if (c / "config.json").exists() and _has_weights(c):
        return ModelSource(c, "full", tok)
    if any(c.glob("global_step*")) and (c / "config.json").exists():
        return ModelSource(c, "zero", tok)
    raise ModelNotFound(f"checkpoint {c} holds neither model weights nor DeepSpeed shards")


def load_tokenizer(path: Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    if not tok.chat_template:
        from engine.train import CHAT_TEMPLATE

        tok.chat_template = CHAT_TEMPLATE
    return tok


def _run_profile(run_dir: Path):
    from engine.train import load_run_profile

    return load_run_profile(run_dir).profile


def load_base_model(run_dir: Path, tokenizer, dtype: str):
    """The run's starting model (the same random init for init: scratch, seeded as in training)."""
    from engine.train import build_model

    p = _run_profile(run_dir)
    return build_model(p, tokenizer, dtype)


def zero_state_dict(ckpt: Path) -> dict[str, Any]:
    """Consolidate a ZeRO checkpoint's partitioned shards into one fp32 state dict."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tags = sorted(ckpt.glob("global_step*"), key=lambda p: int("".join(ch for ch in p.name if ch.isdigit()) or 0))
    tag = tags[-1].name if tags else None
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)


def load_run_model(run_dir: Path, dtype: str = "fp32", *, checkpoint: int | None = None,
                   model_dir: Path | None = None, merge: bool = True, padding_side: str = "left"):
    """(model, tokenizer, source) ready for ``generate``: adapters merged into their base."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.train import torch_dtype

    if model_dir is not None:
        src = ModelSource(Path(model_dir), "adapter" if _is_adapter(Path(model_dir)) else "full", Path(model_dir))
    else:
        src = find_model(Path(run_dir), checkpoint)
    tok = load_tokenizer(src.tokenizer_dir, padding_side)
    td = torch_dtype(dtype)
    if src.kind == "full":
        model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=td)
    elif src.kind == "adapter":
        from peft import PeftModel

        base = load_base_model(Path(run_dir), tok, dtype)
        model = PeftModel.from_pretrained(base, str(src.path))
        if merge:
            model = model.merge_and_unload()
    else:
        config = AutoConfig.from_pretrained(str(src.path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=td)
        state = zero_state_dict(src.path)
        model.load_state_dict({k: v.to(td) for k, v in state.items()}, strict=False, assign=True)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise ModelNotFound(f"the ZeRO checkpoint {src.path} lacks {len(missing)} parameters "
                                f"(e.g. {missing[0]})")
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, src


def describe(src: ModelSource) -> str:
    return json.dumps({"path": str(src.path), "kind": src.kind})
