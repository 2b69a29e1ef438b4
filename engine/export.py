"""Export a run's model as a standard Hugging Face directory (safetensors + tokenizer).

From the final model or a checkpoint; a ZeRO-3 checkpoint that holds only partitioned shards
is consolidated with DeepSpeed's ``zero_to_fp32``; a LoRA adapter is merged into its base
(``merge_lora``) so that the result loads with ``AutoModelForCausalLM.from_pretrained`` and
needs no PEFT. Without ``merge_lora`` an adapter run exports the adapter itself (PEFT format).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from engine.run_model import find_model

EXPORT_MARKER = "zerotune-export.json"


class ExportError(Exception):
    """The export cannot be made (bad output folder, nothing to export)."""


def training_dtype(run_dir: Path) -> str:
    launch = Path(run_dir) / "launch.json"
    if launch.exists():
        dtype = json.loads(launch.read_text()).get("dtype")
        if dtype in ("fp32", "bf16", "fp16"):
            return dtype
    return "fp32"


def export_model(run_dir: Path, out: Path, *, merge_lora: bool = False, dtype: str | None = None,
                 checkpoint: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the export into ``out``; return what was exported (source, kind, dtype, files)."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another --out or remove it")
    dtype = dtype or training_dtype(run_dir)
    src = find_model(run_dir, checkpoint, prefer_merged=True)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"run_dir": str(run_dir), "checkpoint": checkpoint, "source": str(src.path),
                            "source_kind": src.kind, "dtype": dtype, "t": time.time()}
    if src.kind == "adapter" and not merge_lora:
        from engine.run_model import load_tokenizer

        for f in src.path.iterdir():
            if f.name.startswith("adapter_") or f.name == "README.md":
                shutil.copy2(f, out / f.name)
        load_tokenizer(src.tokenizer_dir, "right").save_pretrained(out)
        info["kind"] = "adapter"
        info["note"] = "a LoRA adapter (loads with PEFT on its base model); --merge-lora gives a standalone model"
    else:
        from engine.run_model import load_run_model

        model, tok, _ = load_run_model(run_dir, dtype, checkpoint=checkpoint, padding_side="right")
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        info["kind"] = "merged" if src.kind == "adapter" else "full"
        info["num_params"] = sum(p.numel() for p in model.parameters())
    info["files"] = sorted(f.name for f in out.iterdir())
    (out / EXPORT_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return info
