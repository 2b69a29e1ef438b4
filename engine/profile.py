"""The run profile: one YAML file that describes one run completely and replays it.

The pydantic schema below *is* the profile format: the CLI's ``--set`` overrides and the
wizard's fields are its field paths. Loading collects every problem at once (schema errors,
impossible combinations, data that does not fit the method) and reports each with the file,
line, YAML path, what was expected and, for unknown keys, the closest known key.

What depends on the hardware (QLoRA or kernel injection without a GPU, more GPUs than the
machine has) is not checked here but at launch (``engine.preflight``), so a profile written on
a laptop for a GPU server still validates. Pure Python: importing this never loads torch.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.problems import Problem, ProfileError

# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    path: str | None = Field(
        None,
        description="Local Hugging Face model directory, hub id, or (init: scratch) a config "
        "directory. Catalog short names (llama-3.1-8b) are for estimates only.",
    )
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained", description="pretrained: load the weights; scratch: random init from a config"
    )
    config: dict[str, Any] | None = Field(
        None,
        description="init: scratch only: Hugging Face config fields, with model_type "
        "(e.g. llama, gpt2). Overrides fields of the config found at path.",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer directory or hub id; default: the model path. For init: scratch "
        "without one, a byte-level BPE tokenizer is trained on the training data.",
    )
    tokenizer_vocab_size: int = Field(
        2048, ge=256, description="Vocabulary of the tokenizer trained for init: scratch"
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Training precision; auto: bf16 on GPUs that support it, else fp32"
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code (only for sources you trust)"
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")


class PrepSpec(Section):
    normalize: bool = Field(True, description="Unicode NFC and whitespace normalisation")
    min_chars: int = Field(0, ge=0, description="Drop rows shorter than this many characters")
    max_chars: int | None = Field(None, ge=1, description="Drop rows longer than this")
    dedup: bool = Field(False, description="Drop exact duplicate rows")
    near_dedup: bool = Field(False, description="Drop near-duplicates (MinHash/LSH)")
    near_dedup_threshold: float = Field(0.85, gt=0, le=1)
    scrub_pii: bool = Field(False, description="Replace e-mails, keys, card numbers... by placeholders")
    blocklist: str | None = Field(None, description="File of words/phrases; rows containing one are dropped")
    min_tokens: int = Field(0, ge=0, description="Drop rows with fewer tokens (model's tokenizer)")
    max_tokens: int | None = Field(None, ge=1, description="Drop rows with more tokens than this")
    label_column: str | None = Field(
        None, description="Column with a class label: reported as label balance; the validation "
        "split is stratified by it",
    )


class DataSpec(Section):
    train: str | list[str] = Field(..., description="Training data file(s) or folder")
    validation: str | None = Field(None, description="Held-out data file; default: split from train")
    format: Literal["auto", "text", "prompt_completion", "messages", "preference"] = Field(
        "auto", description="Row shape; auto detects it from the columns"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map the expected column names to yours, e.g. {prompt: question, completion: answer}",
    )
    validation_split: float = Field(0.1, ge=0.0, lt=0.9, description="Share held out for evaluation")
    max_seq_len: int = Field(1024, ge=8, description="Tokens per training sequence")
    packing: bool = Field(True, description="cpt: concatenate documents into full sequences")
    on_bad_rows: Literal["fail", "skip"] = Field(
        "fail", description="fail: stop before training at the first bad row; skip: count and report"
    )
    text_split: Literal["file", "blank_lines"] = Field(
        "file", description=".txt/.md files: one document per file, or documents separated by blank lines"
    )
    prep: PrepSpec = Field(default_factory=PrepSpec)


class LoraSpec(Section):
    r: int = Field(16, ge=1, description="Adapter rank")
    alpha: int = Field(32, ge=1, description="Scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear"
    )


class QloraSpec(Section):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class DpoSpec(Section):
    beta: float = Field(0.1, gt=0.0, description="Strength of the KL penalty to the reference model")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"


class MethodSpec(Section):
    kind: Literal["cpt", "sft", "dpo"] = Field(
        ..., description="cpt: continued pre-training; sft: supervised fine-tuning; dpo: preferences"
    )
    adapter: Literal["none", "lora", "qlora"] = Field("none", description="Train all weights or an adapter")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    qlora: QloraSpec = Field(default_factory=QloraSpec)
    dpo: DpoSpec = Field(default_factory=DpoSpec)
    merge_adapter: bool = Field(False, description="Also save a merged full model after LoRA training")


class TrainingSpec(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (unless max_steps)")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per device per forward pass")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1.0e-8, gt=0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it")
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% slower")
    eval_every: int = Field(100, ge=1, description="Evaluate every N steps (and at the end)")
    save_every: int = Field(200, ge=1, description="Checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk")
    log_every: int = Field(1, ge=1, description="Step events every N steps")
    eval_max_rows: int | None = Field(None, ge=1, description="Cap on held-out rows evaluated")
    eval_on_start: bool = Field(True, description="Evaluate once before training: the starting point")


class DeepSpeedSpec(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="What ZeRO partitions across devices")
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = Field(None, description="Local NVMe folder for nvme offload")
    overlap_comm: bool | None = Field(None, description="Default: on for stages 2-3 on GPU")
    reduce_bucket_size: int | None = Field(None, ge=1, description="Default: hidden_size^2")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Raw DeepSpeed keys, merged last (expert use)"
    )


class ResourcesSpec(Section):
    launcher: Literal["deepspeed", "torchrun"] = "deepspeed"
    num_nodes: int = Field(1, ge=1)
    gpus_per_node: int | Literal["auto"] = Field(
        "auto", description="Ranks per node; auto: every GPU found (1 rank on a CPU-only machine)"
    )
    hostfile: str | None = Field(None, description="DeepSpeed hostfile (multi-node)")
    master_addr: str | None = Field(None, description="Address of node 0 (multi-node)")
    master_port: int | Literal["auto"] = "auto"
    no_ssh: bool = Field(False, description="Start each node's launcher yourself (no pdsh/ssh)")
    gpu_memory_gb: float | Literal["auto"] = Field("auto", description="For the estimate; auto: detected")
    host_memory_gb: float | Literal["auto"] = "auto"
    device: Literal["auto", "gpu", "cpu"] = Field("auto", description="cpu forces the CPU accelerator")

    @field_validator("gpus_per_node")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1, or auto")
        return v


class InferenceSpec(Section):
    mode: Literal["none", "deepspeed", "zero"] = Field(
        "none",
        description="deepspeed: DeepSpeed-Inference (fast, whole model in GPU memory); "
        "zero: ZeRO-Inference (weights offloaded, runs models larger than GPU memory)",
    )
    prompts: str | None = Field(None, description="JSONL file of {prompt: ...} rows")
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(4, ge=1)
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    tensor_parallel: int = Field(1, ge=1)
    kernel_inject: bool = Field(True, description="Fused kernels where architecture and GPU allow")
    offload: Literal["cpu", "nvme"] = "cpu"


class EvaluationSpec(Section):
    baseline: bool = Field(False, description="Also evaluate the base model on the held-out split")


class Profile(Section):
    name: str = Field(..., min_length=1, max_length=80, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    seed: int = Field(42, ge=0)
    model: ModelSpec
    data: DataSpec
    method: MethodSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def content_hash(self) -> str:
        """Hash of the fully resolved profile (key order independent)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# YAML I/O with line numbers
# --------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)
_Dumper.add_representer(tuple, lambda d, v: d.represent_list(list(v)))


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each YAML key path (and list index) to its 1-based line number."""
    index: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*prefix, str(key_node.value))
                index[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                key = (*prefix, str(i))
                index[key] = item.start_mark.line + 1
                walk(item, key)

    if root is not None:
        walk(root, ())
    return index


def _locate(index: dict[tuple[str, ...], int], path: tuple[str, ...]) -> int | None:
    for n in range(len(path), 0, -1):
        if path[:n] in index:
            return index[path[:n]]
    return None


# --------------------------------------------------------------------------------------------
# Overrides (--set key.path=value)
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected key.path=value, e.g. training.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                node[k] = nxt
            node = nxt
        node[keys[-1]] = value
    return data


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedProfile:
    """A validated profile plus where it came from (for resolving relative paths)."""

    profile: Profile
    source: Path | None
    base_dir: Path
    warnings: list[str] = field(default_factory=list)

    def resolve_path(self, value: str | None) -> Path | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()


def _describe_type_error(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    got = err.get("input")
    got_s = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required, but missing"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '?')}, got {got_s}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected a whole number, got {got_s}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {got_s}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {got_s}"
    if kind in ("string_type",):
        return f"expected text, got {got_s}"
    if kind in ("dict_type", "model_type"):
        return f"expected a mapping of keys, got {got_s}"
    if kind.startswith("greater_than") or kind.startswith("less_than"):
        return f"{err.get('msg', 'out of range').lower()}, got {got_s}"
    if kind == "string_pattern_mismatch":
        return f"expected letters, digits, '.', '_' or '-' (no spaces), got {got_s}"
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    return f"{msg}, got {got_s}"


def _fields_at(path: tuple[str | int, ...]) -> list[str]:
    """Known keys of the section at ``path`` (for 'did you mean')."""
    model: type[BaseModel] | None = Profile
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model else []


def _schema_problems(exc: ValidationError, index: dict, file: str | None) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors():
        loc = tuple(err["loc"])
        # Union members report one error each ("int" and "literal['auto']"): keep the first.
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("int", "str", "float", "list"))))
        path = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            known = _fields_at(loc[:-1])
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else (
                f"; known keys here: {', '.join(known)}" if known else ""
            )
            message = f"unknown key{hint}"
        else:
            message = _describe_type_error(err)
        if (path, message) in seen or (path, "dup") in seen:
            continue
        seen.add((path, "dup"))
        seen.add((path, message))
        problems.append(
            Problem(path, message, file, _locate(index, tuple(str(p) for p in loc)))
        )
    return problems


def _combination_problems(p: Profile, lp: LoadedProfile) -> list[Problem]:
    """Impossible combinations, each with the reason."""
    out: list[Problem] = []
    ds, m, d = p.deepspeed, p.method, p.data
    if ds.offload_param != "none" and ds.zero_stage != 3:
        out.append(Problem(
            "deepspeed.offload_param",
            f"offload_param: {ds.offload_param} needs zero_stage 3 (parameters are only partitioned, "
            "and so only offloadable, at ZeRO-3); set deepspeed.zero_stage: 3 or offload_param: none",
        ))
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        out.append(Problem(
            "deepspeed.offload_optimizer",
            "optimizer offload needs ZeRO stage 1, 2 or 3 (stage 0 keeps no partitioned optimizer "
            "state to offload); set deepspeed.zero_stage: 2",
        ))
    if "nvme" in (ds.offload_optimizer, ds.offload_param) and not ds.nvme_path:
        out.append(Problem("deepspeed.nvme_path", "nvme offload needs nvme_path: a folder on a local NVMe disk"))
    if ds.offload_optimizer == "nvme" and ds.zero_stage != 3:
        out.append(Problem(
            "deepspeed.offload_optimizer",
            "optimizer offload to nvme needs zero_stage 3 (ZeRO-Infinity); use cpu at stage 1-2",
        ))
    if m.kind == "dpo" and d.format not in ("auto", "preference"):
        out.append(Problem("data.format", f"dpo trains on preference data (prompt/chosen/rejected), not {d.format}"))
    if m.kind == "cpt" and d.format in ("preference",):
        out.append(Problem("data.format", "cpt trains on raw text; preference data is for dpo"))
    if m.adapter == "qlora" and ds.zero_stage == 3:
        out.append(Problem(
            "method.adapter",
            "qlora with ZeRO-3 is not supported here (4-bit base weights cannot be partitioned by "
            "ZeRO-3 in this setup); use zero_stage 2 or adapter: lora",
        ))
    if m.adapter == "qlora" and (p.model.dtype == "fp32"):
        out.append(Problem("model.dtype", "qlora computes in bf16 or fp16; set model.dtype: bf16 (or auto)"))
    if p.model.init == "scratch" and m.adapter != "none":
        lp.warnings.append("method.adapter: an adapter on a randomly initialised model learns little; "
                           "this is only useful to try the pipeline")
    if p.model.init == "scratch":
        if not p.model.config and not p.model.path:
            out.append(Problem("model.config", "init: scratch needs model.config (with model_type) or model.path to a config"))
        elif p.model.config and "model_type" not in p.model.config and not p.model.path:
            out.append(Problem("model.config", "needs model_type (e.g. llama, gpt2) to know which architecture to build"))
    elif not p.model.path:
        out.append(Problem("model.path", "init: pretrained needs model.path: a local model directory or a hub id"))
    if p.resources.num_nodes > 1 and not p.resources.hostfile and not p.resources.master_addr:
        out.append(Problem(
            "resources.hostfile",
            "num_nodes > 1 needs a hostfile (one 'host slots=N' line per node) or master_addr with no_ssh",
        ))
    if p.inference.mode != "none" and not p.inference.prompts:
        out.append(Problem("inference.prompts", f"inference mode {p.inference.mode} needs a prompts file"))
    if p.inference.mode == "zero" and p.inference.offload == "nvme" and not ds.nvme_path:
        out.append(Problem("deepspeed.nvme_path", "ZeRO-Inference with nvme offload needs deepspeed.nvme_path"))
    # Batch sizes in overrides would silently disagree with the Trainer: keep one source.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in ds.overrides:
            out.append(Problem(
                f"deepspeed.overrides.{key}",
                "set batch sizes through training.micro_batch_size and training.grad_accum",
            ))
    return out


def _path_problems(p: Profile, lp: LoadedProfile) -> list[Problem]:
    out: list[Problem] = []
    trains = p.data.train if isinstance(p.data.train, list) else [p.data.train]
    from engine.data_formats import is_hub_name

    for i, t in enumerate(trains):
        if is_hub_name(t):
            continue  # a hub dataset: read at preparation time (needs network)
        path = lp.resolve_path(t)
        key = "data.train" if isinstance(p.data.train, str) else f"data.train.{i}"
        if path is not None and not path.exists():
            out.append(Problem(key, f"file not found: {path}"))
    for key, value in (
        ("data.validation", None if is_hub_name(p.data.validation or "") else p.data.validation),
        ("inference.prompts", p.inference.prompts),
        ("resources.hostfile", p.resources.hostfile),
        ("data.prep.blocklist", p.data.prep.blocklist),
    ):
        path = lp.resolve_path(value)
        if path is not None and not path.exists():
            out.append(Problem(key, f"file not found: {path}"))
    mp = model_location(p.model.path, lp.base_dir)
    if mp.kind == "missing":
        out.append(Problem("model.path", f"folder not found: {mp.value}"))
    tk = model_location(p.model.tokenizer, lp.base_dir)
    if tk.kind == "missing":
        out.append(Problem("model.tokenizer", f"folder not found: {tk.value}"))
    return out


@dataclass
class ModelLocation:
    kind: Literal["local", "hub", "missing", "none"]
    value: str | None


def model_location(value: str | None, base_dir: Path) -> ModelLocation:
    """Tell a local directory from a hub id: explicit ./, ../, / or ~ or an existing folder is local."""
    if not value:
        return ModelLocation("none", None)
    explicit = value.startswith(("./", "../", "/", "~")) or value in (".", "..")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else (base_dir / p)
    if p.exists():
        return ModelLocation("local", str(p.resolve()))
    if explicit:
        return ModelLocation("missing", str(p.resolve()))
    return ModelLocation("hub", value)


def load_profile_data(path: str | Path) -> tuple[dict[str, Any], str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError([Problem("", "profile file not found", str(path))], str(path)) from None
    except UnicodeDecodeError as exc:
        raise ProfileError([Problem("", f"not UTF-8 text ({exc.reason} at byte {exc.start})", str(path))], str(path)) from None
    except IsADirectoryError:
        raise ProfileError([Problem("", "is a folder, expected a YAML file", str(path))], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ProfileError([Problem("", f"not valid YAML: {reason}", str(path), line)], str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError([Problem("", f"expected a mapping of sections at the top, got {type(data).__name__}", str(path), 1)], str(path))
    return data, text


def validate_profile(
    data: dict[str, Any],
    *,
    source: Path | None = None,
    text: str | None = None,
    check_data: bool = True,
    check_model: bool = True,
) -> LoadedProfile:
    """Validate a raw profile mapping; raise ProfileError listing every problem."""
    file = str(source) if source else None
    index = _line_index(text) if text else {}
    base_dir = source.parent.resolve() if source else Path.cwd()
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(_schema_problems(exc, index, file), file) from None
    lp = LoadedProfile(profile, source, base_dir)
    problems = _combination_problems(profile, lp) + _path_problems(profile, lp)
    if check_data and not any(pr.path.startswith("data.train") for pr in problems):
        from engine import data_formats

        problems += data_formats.check_profile_data(lp)
    if check_model and not problems:
        from engine import model_source

        problems += model_source.check_profile_model(lp)
    for pr in problems:
        pr.file = pr.file or file
        if pr.line is None and pr.path:
            pr.line = _locate(index, tuple(pr.path.split(".")))
    if problems:
        raise ProfileError(problems, file)
    return lp


def load_profile(
    path: str | Path, overrides: list[str] | None = None, *, check_data: bool = True,
    check_model: bool = True,
) -> LoadedProfile:
    """Load, override and validate a profile file."""
    path = Path(path)
    data, text = load_profile_data(path)
    if overrides:
        try:
            data = apply_overrides(data, overrides)
        except ValueError as exc:
            raise ProfileError([Problem("", str(exc), str(path))], str(path)) from None
    return validate_profile(data, source=path, text=text, check_data=check_data, check_model=check_model)


def resolved_paths(lp: LoadedProfile) -> Profile:
    """A copy of the profile whose local paths are absolute (for freezing into a run)."""
    p = lp.profile.model_copy(deep=True)
    from engine.data_formats import is_hub_name

    d = p.data

    def local(value: str) -> str:
        return value if is_hub_name(value) else str(lp.resolve_path(value))

    d.train = [local(x) for x in d.train] if isinstance(d.train, list) else local(d.train)
    if d.validation:
        d.validation = local(d.validation)
    if d.prep.blocklist:
        d.prep.blocklist = str(lp.resolve_path(d.prep.blocklist))
    if p.inference.prompts:
        p.inference.prompts = str(lp.resolve_path(p.inference.prompts))
    if p.resources.hostfile:
        p.resources.hostfile = str(lp.resolve_path(p.resources.hostfile))
    if p.deepspeed.nvme_path:
        p.deepspeed.nvme_path = str(lp.resolve_path(p.deepspeed.nvme_path))
    for attr in ("path", "tokenizer"):
        loc = model_location(getattr(p.model, attr), lp.base_dir)
        if loc.kind == "local":
            setattr(p.model, attr, loc.value)
    return p
