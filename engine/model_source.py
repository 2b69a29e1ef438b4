"""What a profile's model is, learned without loading it (no torch).

The config comes from ``model.config`` (scratch), a local ``config.json``, or is unknown (hub
ids are only fetched by the engine). Module names, for checking LoRA targets, come from the
safetensors headers of a local checkpoint or, failing that, from the known layout of the
architecture.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.profile import LoadedProfile, Problem

# Linear layers (LoRA candidates) of common decoder architectures, by model_type.
LINEAR_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3", "lm_head"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"),
    "gpt2": ("c_attn", "c_proj", "c_fc", "lm_head"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "embed_out"),
}


def profile_config(lp: LoadedProfile) -> dict[str, Any] | None:
    """The model's config as a dict when it can be known offline, else None."""
    from engine.profile import model_location

    m = lp.profile.model
    base: dict[str, Any] = {}
    loc = model_location(m.path, lp.base_dir)
    if loc.kind == "local" and loc.value:
        cfg = Path(loc.value)
        cfg = cfg / "config.json" if cfg.is_dir() else cfg
        if cfg.exists():
            try:
                base = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                base = {}
    if m.init == "scratch" and m.config:
        base = {**base, **m.config}
    return base or None


def tokenizer_vocab_size(tokenizer_dir: Path) -> int | None:
    """``len(tokenizer)`` of a local tokenizer folder, read from its ``tokenizer.json`` (the
    highest token id, of the model's vocabulary and the added tokens, plus one), or None."""
    try:
        data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids = [i for i in vocab.values() if isinstance(i, int)]
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        ids = [len(vocab) - 1] if vocab else []
    else:
        ids = []
    ids += [t["id"] for t in data.get("added_tokens") or () if isinstance(t.get("id"), int)]
    return max(ids) + 1 if ids else None


def checkpoint_module_names(model_dir: Path) -> set[str] | None:
    """Dotted module-name parts of every weight in a local safetensors checkpoint."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for key in header:
            if key == "__metadata__":
                continue
            names.update(key.split(".")[:-1])
    return names


def check_profile_model(lp: LoadedProfile) -> list[Problem]:
    from engine.profile import Problem, model_location

    p = lp.profile
    problems: list[Problem] = []
    if p.method.adapter == "none":
        return problems
    targets = p.method.lora.target_modules
    if targets == "all-linear":
        return problems
    available: set[str] | None = None
    source = ""
    loc = model_location(p.model.path, lp.base_dir)
    if loc.kind == "local" and loc.value and Path(loc.value).is_dir():
        available = checkpoint_module_names(Path(loc.value))
        source = "the checkpoint's weights"
    if available is None:
        cfg = profile_config(lp) or {}
        mt = cfg.get("model_type")
        if mt in LINEAR_MODULES:
            available = set(LINEAR_MODULES[mt])
            source = f"the {mt} architecture"
        elif mt:
            lp.warnings.append(f"method.lora.target_modules: cannot check module names of model_type {mt!r} offline")
    if available is None:
        return problems
    missing = [t for t in targets if t not in available]
    if missing:
        linear = sorted(set(LINEAR_MODULES.get((profile_config(lp) or {}).get("model_type", ""), ())) & available) or sorted(available)[:12]
        problems.append(Problem(
            "method.lora.target_modules",
            f"the model has no module named {', '.join(repr(m) for m in missing)} (per {source}); "
            f"its linear layers are: {', '.join(linear)}; or use target_modules: all-linear",
        ))
    return problems
