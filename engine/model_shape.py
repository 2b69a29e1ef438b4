"""The shape of a causal language model, read from a Hugging Face ``config.json``.

A :class:`ModelShape` holds what the memory estimator needs (sizes, layer kinds, dropout,
dtype), and :func:`count_params` counts the parameters exactly, per architecture, the way the
same config instantiated by transformers (5.x layout) would have them. Models are named by a
local directory or ``config.json``, a catalog short name shipped with zerotune
(``llama-3.1-8b``, ``qwen2.5-0.5b``, ``gpt2``; see ``engine/catalog/``) or a hub id, fetched with
``huggingface_hub`` when there is network.

Pure Python: importing this module never imports torch or transformers.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

CATALOG_DIR = Path(__file__).with_name("catalog")

# Catalog short name -> hub id of the published model whose config.json the entry copies.
CATALOG_HUB_IDS: dict[str, str] = {
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "mistral-7b-v0.3": "mistralai/Mistral-7B-v0.3",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-14b": "Qwen/Qwen2.5-14B",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-27b": "google/gemma-2-27b",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3-medium": "microsoft/Phi-3-medium-4k-instruct",
    "phi-4": "microsoft/phi-4",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}

# Families whose parameter count is exact. Others are counted as a Llama-like decoder and
# flagged ``exact=False``.
EXACT_FAMILIES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2",
)

_DTYPES = {
    "float32": "fp32", "fp32": "fp32", "float": "fp32",
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "fp16": "fp16", "half": "fp16",
}


class ModelShapeError(ValueError):
    """The model could not be found or its config is not a causal LM we understand."""


@dataclass(frozen=True)
class ModelShape:
    """Everything about a model's architecture that memory and FLOPs depend on."""

    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int = 0  # 0: dense MLP
    experts_per_token: int = 0
    norm: str = "rmsnorm"  # rmsnorm | layernorm (layernorm has a bias)
    norms_per_layer: int = 2
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    mlp: str = "gated"  # gated (SwiGLU/GeGLU: gate, up, down) | plain (fc, proj)
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False  # one projection for q, k, v (GPT-2, Phi-3)
    learned_positions: int = 0  # rows of a learned position embedding (GPT-2), 0 for RoPE
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    embd_dropout: float = 0.0
    final_logit_softcapping: float | None = None
    torch_dtype: str = "bf16"  # fp32 | bf16 | fp16, the dtype the checkpoint is stored in
    name: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def exact(self) -> bool:
        """Whether :func:`count_params` is known to match transformers exactly."""
        return self.model_type in EXACT_FAMILIES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ParamCount:
    """Parameter count of a model, broken down (tied weights counted once)."""

    embeddings: int  # token embeddings (+ learned positions)
    attention: int  # all layers: q, k, v, o (+ biases, q/k norms)
    mlp: int  # all layers: dense MLP, or every expert of an MoE layer
    router: int  # MoE gates
    norms: int  # per-layer norms + the final norm
    lm_head: int  # 0 when tied to the embeddings
    per_layer: int  # one transformer block
    largest_tensor: int  # the largest single parameter tensor
    largest_module: int  # the largest module whose parameters ZeRO-3 gathers at once
    active: int  # parameters touched per token (MoE: experts_per_token experts)
    exact: bool = True
    by_layer_kind: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.mlp + self.router + self.norms + self.lm_head

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        return d


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    return default


def shape_from_config(config: dict[str, Any], name: str = "") -> ModelShape:
    """Build a :class:`ModelShape` from the contents of a Hugging Face ``config.json``."""
    if not isinstance(config, dict):
        raise ModelShapeError("a model config must be a JSON object")
    cfg = dict(config)
    # Multimodal wrappers keep the language model under text_config.
    if "text_config" in cfg and "hidden_size" not in cfg and isinstance(cfg["text_config"], dict):
        outer = cfg
        cfg = {**cfg["text_config"]}
        cfg.setdefault("torch_dtype", outer.get("torch_dtype") or outer.get("dtype"))
    model_type = str(cfg.get("model_type", "")).lower()
    archs = cfg.get("architectures") or []
    architecture = archs[0] if archs else ""
    if not model_type:
        raise ModelShapeError("config has no model_type; is this a transformers config.json?")

    dtype = _DTYPES.get(str(_get(cfg, "torch_dtype", "dtype", default="float32")), "fp32")

    if model_type == "gpt2":
        hidden = int(cfg.get("n_embd", 768))
        heads = int(cfg.get("n_head", 12))
        inner = cfg.get("n_inner")
        return ModelShape(
            model_type=model_type,
            architecture=architecture or "GPT2LMHeadModel",
            vocab_size=int(cfg.get("vocab_size", 50257)),
            hidden_size=hidden,
            intermediate_size=int(inner) if inner else 4 * hidden,
            num_layers=int(cfg.get("n_layer", 12)),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=int(cfg.get("n_positions", 1024)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            norm="layernorm",
            mlp="plain",
            activation=str(cfg.get("activation_function", "gelu_new")),
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            fused_qkv=True,
            learned_positions=int(cfg.get("n_positions", 1024)),
            attn_dropout=float(cfg.get("attn_pdrop", 0.1)),
            resid_dropout=float(cfg.get("resid_pdrop", 0.1)),
            embd_dropout=float(cfg.get("embd_pdrop", 0.1)),
            torch_dtype=dtype,
            name=name,
        )

    try:
        hidden = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
        heads = int(_get(cfg, "num_attention_heads", "n_head"))
        layers = int(_get(cfg, "num_hidden_layers", "n_layer"))
        vocab = int(cfg["vocab_size"])
    except (TypeError, KeyError) as exc:
        raise ModelShapeError(
            f"config of model_type {model_type!r} lacks hidden_size, num_attention_heads, "
            "num_hidden_layers or vocab_size"
        ) from exc
    kv_heads = int(_get(cfg, "num_key_value_heads", default=heads))
    head_dim = int(_get(cfg, "head_dim", default=hidden // heads))
    inter = int(_get(cfg, "intermediate_size", "n_inner", default=4 * hidden))

    defaults_tied = model_type in ("gemma", "gemma2")
    tied = bool(cfg.get("tie_word_embeddings", defaults_tied))
    num_experts = int(_get(cfg, "num_local_experts", "num_experts", default=0) or 0)
    experts_per_token = int(_get(cfg, "num_experts_per_tok", default=0) or 0)

    qkv_bias = bool(cfg.get("attention_bias", False))
    o_bias = bool(cfg.get("attention_bias", False))
    if model_type == "qwen2":  # q/k/v carry a bias, o does not (fixed in the modeling code)
        qkv_bias, o_bias = True, False
    if model_type in ("mistral", "mixtral", "phi3"):  # no bias switch in these families
        qkv_bias = o_bias = False
    norms_per_layer = 4 if model_type == "gemma2" else 2
    activation = str(_get(cfg, "hidden_activation", "hidden_act", default="silu"))
    softcap = cfg.get("final_logit_softcapping") if model_type == "gemma2" else None

    return ModelShape(
        model_type=model_type,
        architecture=architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(_get(cfg, "max_position_embeddings", default=2048)),
        tie_word_embeddings=tied,
        num_experts=num_experts if num_experts > 1 else 0,
        experts_per_token=experts_per_token if num_experts > 1 else 0,
        norm="rmsnorm",
        norms_per_layer=norms_per_layer,
        qk_norm=model_type == "qwen3",
        mlp="gated",
        activation=activation,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
        fused_qkv=model_type == "phi3",
        attn_dropout=float(_get(cfg, "attention_dropout", default=0.0)),
        resid_dropout=float(_get(cfg, "resid_pdrop", default=0.0)),
        embd_dropout=float(_get(cfg, "embd_pdrop", default=0.0)),
        final_logit_softcapping=float(softcap) if softcap else None,
        torch_dtype=dtype,
        name=name,
    )


def count_params(shape: ModelShape) -> ParamCount:
    """Count parameters exactly as transformers would instantiate ``shape``'s config."""
    h, v, L = shape.hidden_size, shape.vocab_size, shape.num_layers
    inter = shape.intermediate_size
    q, kv = shape.q_dim, shape.kv_dim

    embeddings = v * h + shape.learned_positions * h
    norm_size = 2 * h if shape.norm == "layernorm" else h

    attn = h * q + 2 * h * kv + q * h
    if shape.qkv_bias:
        attn += q + 2 * kv
    if shape.o_bias:
        attn += h
    if shape.qk_norm:
        attn += 2 * shape.head_dim

    mats = 3 if shape.mlp == "gated" else 2
    one_mlp = mats * h * inter
    if shape.mlp_bias:
        one_mlp += (2 * inter + h) if shape.mlp == "gated" else (inter + h)
    experts = max(shape.num_experts, 1)
    mlp = experts * one_mlp
    router = shape.num_experts * h if shape.is_moe else 0
    norms_layer = shape.norms_per_layer * norm_size

    per_layer = attn + mlp + router + norms_layer
    lm_head = 0 if shape.tie_word_embeddings else v * h

    # Largest single tensor (the fp64 grad-norm buffer and the stage-0 flat copy scale with it).
    tensors = [v * h, h * q, h * kv, inter * h]
    if shape.fused_qkv:
        tensors.append(h * (q + 2 * kv))
    if shape.mlp == "gated" and shape.model_type == "phi3":
        tensors.append(2 * inter * h)
    if shape.is_moe:  # transformers 5 stores each layer's experts as fused 3-D tensors
        tensors.append(shape.num_experts * 2 * inter * h)
    largest_tensor = max(tensors)
    largest_module = max(v * h, attn, one_mlp * experts)

    active_mlp = one_mlp * (shape.experts_per_token if shape.is_moe else 1)
    active = embeddings + lm_head + L * (attn + active_mlp + router + norms_layer) + norm_size

    return ParamCount(
        embeddings=embeddings,
        attention=L * attn,
        mlp=L * mlp,
        router=L * router,
        norms=L * norms_layer + norm_size,
        lm_head=lm_head,
        per_layer=per_layer,
        largest_tensor=largest_tensor,
        largest_module=largest_module,
        active=active,
        exact=shape.exact,
        by_layer_kind={"attention": attn, "mlp": mlp, "router": router, "norms": norms_layer},
    )


# --- loading -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def catalog_names() -> tuple[str, ...]:
    """Short names of the configs shipped in ``engine/catalog``."""
    return tuple(sorted(p.stem for p in CATALOG_DIR.glob("*.json")))


@lru_cache(maxsize=64)
def _catalog_config(name: str) -> str:
    return (CATALOG_DIR / f"{name}.json").read_text(encoding="utf-8")


def catalog_config(name: str) -> dict[str, Any]:
    """The ``config.json`` contents of a catalog entry (a fresh dict each call)."""
    return json.loads(_catalog_config(name))


def _catalog_lookup(name: str) -> str | None:
    key = name.strip().lower()
    if key in catalog_names():
        return key
    for short, hub_id in CATALOG_HUB_IDS.items():
        if hub_id.lower() == key and short in catalog_names():
            return short
    return None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelShapeError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise ModelShapeError(f"cannot read {path}: {exc.strerror}") from exc


def _fetch_hub_config(repo_id: str) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise ModelShapeError("huggingface_hub is not installed; pass a local path") from exc
    try:
        path = hf_hub_download(repo_id, "config.json", token=os.environ.get("HF_TOKEN"))
    except Exception as exc:  # network, auth, missing repo: one clear sentence
        reason = type(exc).__name__
        raise ModelShapeError(
            f"could not fetch config.json of {repo_id!r} from the Hugging Face hub ({reason}). "
            "Offline? Pass a local directory or config.json, or a catalog name: "
            + ", ".join(catalog_names())
        ) from exc
    return _read_config_file(Path(path))


def load_model_config(name_or_path: str) -> tuple[dict[str, Any], str]:
    """Resolve a model name to its config dict and a display name."""
    if not name_or_path or not str(name_or_path).strip():
        raise ModelShapeError("no model given")
    name_or_path = str(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelShapeError(f"{path} has no config.json")
        return _read_config_file(cfg_path), path.name
    if path.is_file():
        return _read_config_file(path), path.parent.name if path.name == "config.json" else path.stem
    short = _catalog_lookup(name_or_path)
    if short:
        return catalog_config(short), short
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".json")
    if "/" in name_or_path and not looks_local and name_or_path.count("/") == 1:
        return _fetch_hub_config(name_or_path), name_or_path
    hint = difflib.get_close_matches(name_or_path.lower(), catalog_names(), n=1)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    raise ModelShapeError(
        f"unknown model {name_or_path!r}: not a local path, a catalog name or a hub id "
        f"(org/name).{did_you_mean} Catalog: {', '.join(catalog_names())}"
    )


def load_model_shape(name_or_path: str) -> ModelShape:
    """A :class:`ModelShape` for a local dir/config.json, a catalog name or a hub id."""
    cfg, name = load_model_config(name_or_path)
    return shape_from_config(cfg, name=name)
