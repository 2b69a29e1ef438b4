"""Memory estimate of a training or inference run, per device, per node and on NVMe.

Peak memory of a training rank = persistent states + the largest of the transient phases of a
step. Every term below was checked against the peak measured on CPU with real DeepSpeed
(``bench/estimate_accuracy.py``, the method in ``notes/memory-model.md``); the terms that only
exist on a GPU (CUDA context, caching-allocator fragmentation, NCCL) are a stated overhead.

Persistent (per rank, ``d`` = data-parallel world size, ``w`` = bytes of the training dtype,
``N`` = all parameters, ``Nt`` = trainable ones):

- weights: ``w*N`` (ZeRO-3: ``w*N/d`` plus the small parameters kept whole on every rank)
- fp32 master copy: stage 0 with bf16/fp16 ``4*Nt``; stages 1-3 ``4*Nt/d`` even for an fp32
  model (DeepSpeed's ZeRO optimizer always keeps one)
- Adam moments: ``8*Nt/d``
- gradients: ZeRO-3 keeps a ``w*Nt/d`` buffer for the whole run; stages 1-2 keep the ``w*Nt/d``
  partition from the first backward on, stage 0 holds ``w*Nt`` from backward to step
- DeepSpeed buffers: the reduce bucket (``reduce_bucket_size`` elements, doubled with
  ``overlap_comm``), ZeRO-3 gathered parameters (up to ``stage3_max_live_parameters``) and
  prefetch bucket, the offload staging buffers

Transient phases (the largest one sets the peak):

- end of forward: saved activations + the logits (model dtype) + their fp32 upcast
- start of backward: saved activations + two fp32 ``tokens x vocab`` gradients (HF loss), or
  the fp32 gradients of the chunked LM head (TRL's fused head: SFT and DPO)
- recompute (gradient checkpointing): layer-input checkpoints + two layers of activations
- end of backward: all gradients (stage 0: plus a flat copy for the all-reduce at d > 1)
- optimizer step: the fp64 gradient norm (8 bytes x the largest gradient piece), the flat fp32
  gradient partition, and on CPU torch's Adam temporaries

Pure Python, no torch: one estimate takes well under a millisecond.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine.model_shape import ModelShape, ParamCount, count_params

GiB = 2**30
MiB = 2**20

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# --- stated constants (not measurable on this machine, or defaults of the stack) -----------
GPU_CONTEXT_BYTES = 1 * GiB  # CUDA context + cuBLAS workspace + NCCL buffers, per GPU
GPU_FRAGMENTATION = 0.10  # caching-allocator fragmentation on top of the tensor peak
HOST_PROCESS_BYTES_GPU = 2 * GiB  # a training rank's own RSS (torch, CUDA libs, Python)
HOST_PROCESS_BYTES_CPU = 1 * GiB  # the same without the CUDA libraries
HF_SHARD_BYTES = 5 * 10**9  # safetensors shard size loaded at a time under ZeRO-3 init
DS_ALLREDUCE_BUCKET = 500_000_000  # stage-0 all-reduce flattens gradients in buckets this big
DS_SUB_GROUP_SIZE = 1_000_000_000  # ZeRO-3 optimizer sub-group (NVMe swap buffer unit)
DS_OPT_NVME_BUFFERS = 4
DS_PARAM_NVME_BUFFERS = 5
DS_PARAM_NVME_BUFFER_SIZE = 100_000_000
TRL_TOKEN_CHUNK = 4096  # TRL fused LM head: tokens per tile
TRL_VOCAB_CHUNK = 32768  # ... and vocabulary columns per tile

# --- measured on CPU (bench/estimate_accuracy.py) -------------------------------------------
CPU_RUNTIME_CACHE_BYTES = 10 * MiB  # oneDNN caches of bf16 matmuls after the first step
CPU_ADAM_TEMPS = 8  # torch's single-tensor Adam: sqrt and division temporaries, fp32
CPU_HEAD_FWD_TILES = 3.25  # fp32 tile-sized temporaries of TRL's torch fallback, forward
CPU_HEAD_BWD_TILES = 7.25  # ... and backward (the fold's temporaries: y, z, log p, p, grad, ...)
RECOMPUTE_MLP_TEMPS = 2.5  # checkpointing: MLP-wide gradient temporaries of a recomputed layer


class EstimateError(ValueError):
    """The setup is not something that can be estimated (or run)."""


@dataclass(frozen=True)
class TrainSetup:
    """What is trained, how, and on what: the inputs of a training estimate."""

    method: str = "sft"  # cpt | sft | dpo
    adapter: str = "none"  # none | lora | qlora
    lora_r: int = 16
    lora_targets: tuple[str, ...] | str = "all-linear"
    lora_dropout: float = 0.05
    dtype: str = "bf16"  # fp32 | bf16 | fp16
    zero_stage: int = 2
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu | nvme
    micro_batch: int = 1
    seq_len: int = 1024
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2
    world_size: int | None = None  # default gpus_per_node * num_nodes
    gpus_per_node: int = 1
    num_nodes: int = 1
    device: str = "gpu"  # gpu | cpu (DeepSpeed's CPU accelerator)
    # DeepSpeed knobs; None means what zerotune's DeepSpeed config generates.
    reduce_bucket_size: int | None = None  # elements; default hidden^2
    overlap_comm: bool | None = None  # default: on for stages 2-3 on GPU
    prefetch_bucket_size: int | None = None  # default 0.9 * hidden^2
    param_persistence_threshold: int | None = None  # default 10 * hidden
    max_live_parameters: int = 1_000_000_000
    pin_memory: bool | None = None  # default: on GPU
    gradient_clipping: bool = True
    loss_impl: str = "auto"  # auto | full (HF loss, cpt) | chunked (TRL fused LM head: sft, dpo)

    @property
    def ranks(self) -> int:
        return self.world_size or self.gpus_per_node * self.num_nodes

    def validate(self) -> None:
        problems = []
        if self.method not in ("cpt", "sft", "dpo"):
            problems.append(f"method must be cpt, sft or dpo, not {self.method!r}")
        if self.adapter not in ("none", "lora", "qlora"):
            problems.append(f"adapter must be none, lora or qlora, not {self.adapter!r}")
        if self.dtype not in DTYPE_BYTES:
            problems.append(f"dtype must be fp32, bf16 or fp16, not {self.dtype!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zero_stage must be 0-3, not {self.zero_stage!r}")
        for name in ("offload_optimizer", "offload_param"):
            if getattr(self, name) not in ("none", "cpu", "nvme"):
                problems.append(f"{name} must be none, cpu or nvme")
        if self.offload_param != "none" and self.zero_stage != 3:
            problems.append("parameter offload needs ZeRO stage 3")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            problems.append("optimizer offload needs ZeRO stage 1, 2 or 3")
        if self.offload_optimizer == "nvme" and self.zero_stage != 3:
            problems.append("optimizer offload to NVMe needs ZeRO stage 3")
        if self.adapter == "qlora" and self.dtype == "fp32":
            problems.append("qlora computes in bf16 or fp16")
        if self.attn_implementation not in ("eager", "sdpa", "flash_attention_2"):
            problems.append("attn_implementation must be eager, sdpa or flash_attention_2")
        if self.attn_implementation == "flash_attention_2" and self.device == "cpu":
            problems.append("flash_attention_2 needs a GPU")
        if self.device not in ("gpu", "cpu"):
            problems.append("device must be gpu or cpu")
        if self.loss_impl not in ("auto", "full", "chunked"):
            problems.append("loss_impl must be auto, full or chunked")
        for name in ("micro_batch", "seq_len", "gpus_per_node", "num_nodes", "grad_accum",
                     "lora_r"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1")
        if self.world_size is not None and self.world_size < 1:
            problems.append("world_size must be at least 1")
        if problems:
            raise EstimateError("; ".join(problems))


@dataclass
class TrainEstimate:
    """Bytes per device (the peak), per node (host RAM) and on NVMe, with the terms that make
    them up. ``device_terms`` sums to ``device_total_bytes``; ``gpu_peak_bytes`` adds the GPU
    overhead (0 when the device is the CPU)."""

    model: str
    setup: TrainSetup
    params: int
    trainable_params: int
    tokens_per_micro_batch: int
    device_terms: dict[str, int]  # persistent terms, then the transient terms of the peak phase
    persistent_bytes: int
    peak_phase: str
    phases: dict[str, int]  # phase -> device bytes at that phase (without overhead)
    device_total_bytes: int  # tensor peak per device
    overhead_bytes: int  # GPU context + fragmentation (0 on CPU)
    gpu_peak_bytes: int  # what a GPU needs: device_total_bytes + overhead_bytes
    host_terms: dict[str, int]  # per node
    host_bytes: int  # per node: max(loading peak, training)
    host_load_bytes: int
    host_train_bytes: int
    nvme_bytes: int  # per node
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["setup"] = asdict(self.setup)
        d["setup"]["world_size"] = self.setup.ranks
        if isinstance(self.setup.lora_targets, tuple):
            d["setup"]["lora_targets"] = list(self.setup.lora_targets)
        return d


# --------------------------------------------------------------------------------------------
# Linear layers (for LoRA counts and which inputs are saved)
# --------------------------------------------------------------------------------------------


def linear_modules(shape: ModelShape) -> dict[str, tuple[int, int, int]]:
    """Per layer: module name -> (in_features, out_features, copies per layer)."""
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    if shape.model_type == "gpt2":
        # c_proj names both the attention output and the MLP output projection.
        return {"c_attn": (h, 3 * h, 1), "c_proj": (h, h, 1), "c_fc": (h, i, 1),
                "mlp.c_proj": (i, h, 1)}
    mods: dict[str, tuple[int, int, int]] = {}
    if shape.fused_qkv:
        mods["qkv_proj"] = (h, q + 2 * kv, 1)
    else:
        mods.update({"q_proj": (h, q, 1), "k_proj": (h, kv, 1), "v_proj": (h, kv, 1)})
    mods["o_proj"] = (q, h, 1)
    if not shape.is_moe:  # MoE experts are fused 3-D tensors, not Linear modules
        if shape.model_type == "phi3":
            mods["gate_up_proj"] = (h, 2 * i, 1)
        else:
            mods.update({"gate_proj": (h, i, 1), "up_proj": (h, i, 1)})
        mods["down_proj"] = (i, h, 1)
    return mods


def lora_targets(shape: ModelShape, targets: tuple[str, ...] | str) -> set[str]:
    """Names of :func:`linear_modules` a LoRA target list adapts."""
    mods = linear_modules(shape)
    if targets == "all-linear":
        return set(mods)
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    chosen = set()
    for t in targets:
        t = t.split(".")[-1]
        for name in mods:
            if name.split(".")[-1] == t:
                chosen.add(name)
    return chosen


def lora_params(shape: ModelShape, r: int, targets: tuple[str, ...] | str) -> int:
    mods = linear_modules(shape)
    return shape.num_layers * sum(r * (mods[n][0] + mods[n][1]) * mods[n][2]
                                  for n in lora_targets(shape, targets))


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Activations:
    per_layer: int  # bytes saved for backward by one layer (no checkpointing)
    checkpoint_per_layer: int  # bytes kept per layer with gradient checkpointing
    head: int  # final norm, LM head input and loss tensors saved for backward
    embed: int  # saved by the embedding block (dropout mask)
    fwd_transient: int  # on top of the saved tensors at the end of the forward pass
    bwd_head: int  # on top of the saved tensors at the start of backward
    recompute: int  # on top of the checkpoints while one layer is recomputed


def _activations(shape: ModelShape, s: TrainSetup, loss_impl: str, tokens: int) -> _Activations:
    w = DTYPE_BYTES[s.dtype]
    cpu = s.device == "cpu"
    h, q, kv, i, a = (shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size,
                      shape.num_heads)
    V, T, seq = shape.vocab_size, tokens, s.seq_len
    full = s.adapter == "none"
    adapted = lora_targets(shape, s.lora_targets) if not full else set()
    lora_drop = s.lora_dropout if not full else 0.0
    mask_b = w if cpu else 1  # dropout masks: same dtype as the input on CPU, bool on GPU

    def needs_input(*names: str) -> bool:
        return full or any(n in adapted for n in names)

    def lora_saved(names: tuple[str, ...], width: int) -> int:
        """Per token: A outputs (r wide) + with LoRA dropout, each module's own dropped copy."""
        n = sum(1 for x in names if x in adapted)
        per = w * s.lora_r + (lora_drop > 0) * (w + mask_b) * width
        return n * per

    # Attention core (per token).
    padded = s.method in ("sft", "dpo") and s.micro_batch * (2 if s.method == "dpo" else 1) > 1
    kv_saved = q if (padded and kv != q) else kv  # repeat_kv when a padding mask is present
    attn_drop = shape.attn_dropout > 0
    math_sdpa = cpu and attn_drop  # CPU has no fused kernel with dropout
    eager = s.attn_implementation == "eager" or math_sdpa
    if shape.model_type == "gpt2":
        core = 3 * w * h  # the c_attn output holds q, k and v
        if eager:
            probs = w * a * seq  # softmax output
            if attn_drop:
                probs += (mask_b + w) * a * seq
            core += probs + w * h  # merged heads: a contiguous copy
        else:
            core += w * h + 4 * a  # output + logsumexp
    else:
        if eager:
            rep = q if kv != q else kv
            core = w * (q + 2 * rep) + 4 * a * seq + (w * a * seq if w < 4 else 0)
            if attn_drop:
                core += (mask_b + w) * a * seq
            core += w * q  # o_proj input: transposed contiguous copy
        else:
            core = w * (q + 2 * kv_saved) + w * q + 4 * a  # q, k, v, output, logsumexp

    if shape.model_type == "gpt2":
        ln = w * h + 8  # LayerNorm: input + mean/rstd
        attn = core + (w * h if needs_input("c_attn") else 0)
        attn += lora_saved(("c_attn",), h) + lora_saved(("c_proj",), h)
        act_new = shape.activation in ("gelu_new", "gelu_fast")
        mlp = (w * h if needs_input("c_fc") else 0) + w * i * (4 if act_new else 1)
        if not act_new or needs_input("mlp.c_proj"):
            mlp += w * i  # the activation output is the projection's input
        mlp += lora_saved(("c_fc",), h) + lora_saved(("mlp.c_proj",), i)
        drop = 2 * mask_b * h if shape.resid_dropout > 0 else 0
        per_layer = 2 * ln + attn + mlp + drop
        head_norm = w * h + 8
        embed = mask_b * h if shape.embd_dropout > 0 else 0
    else:
        norm = 4 * h + (w * h if full else 0) + 4  # HF RMSNorm: fp32 input, normalised output
        norm_count = shape.norms_per_layer
        qkv_names = ("qkv_proj",) if shape.fused_qkv else ("q_proj", "k_proj", "v_proj")
        attn = core + (w * h if needs_input(*qkv_names) else 0)
        attn += lora_saved(qkv_names, h) + lora_saved(("o_proj",), q)
        if shape.qk_norm:
            attn += 2 * (4 * q + (w * q if full else 0))
        gate_names = ("gate_up_proj",) if shape.model_type == "phi3" else ("gate_proj", "up_proj")
        dense = (w * h if needs_input(*gate_names) else 0) + 3 * w * i
        dense += w * i if needs_input("down_proj") else 0
        dense += lora_saved(gate_names, h) + lora_saved(("down_proj",), i)
        if shape.is_moe:
            k = max(shape.experts_per_token, 1)
            # router logits + routing weights, then per routed copy: gathered input, the expert
            # MLP and the weighted output.
            mlp = w * h + 4 * shape.num_experts + k * (w * h + 4 * w * i + w * h)
        else:
            mlp = dense
        per_layer = norm_count * norm + attn + mlp
        head_norm = norm
        embed = 0

    # Loss head.
    lm_head_trainable = full
    if loss_impl == "full":
        head = head_norm + (w * h if lm_head_trainable else 0) + 4 * V
        fwd_transient = (w + (4 if w < 4 else 0)) * V * T
        if shape.final_logit_softcapping:
            fwd_transient += 2 * w * V * T  # tanh(x / cap) * cap: two more logits-sized tensors
        bwd_head = 8 * V * T  # fp32 grad of log_softmax's output and of its input
    else:
        head = head_norm + w * h + 16  # reshaped hidden copy + log_z, entropy, target
        rows = min(T, TRL_TOKEN_CHUNK)
        cols = min(V, TRL_VOCAB_CHUNK)
        buf = rows * TRL_VOCAB_CHUNK * w
        fwd_transient = buf + (int(CPU_HEAD_FWD_TILES * 4 * rows * cols) if cpu else 0)
        # fp32 gradient accumulators for the hidden states and the head's weight, then either
        # the tile loop's temporaries (CPU) or the final casts to the model dtype.
        bwd_head = buf + 4 * h * T + (4 * V * h if lm_head_trainable else 0)
        casts = (w * h * T + (w * V * h if lm_head_trainable else 0)) if w < 4 else 0
        tiles = int(CPU_HEAD_BWD_TILES * 4 * rows * cols) if cpu else 0
        bwd_head += max(casts, tiles)

    per_layer_bytes = per_layer * T
    i_eff = i * max(shape.experts_per_token, 1)
    ckpt = w * h * T  # each checkpointed layer keeps its input
    return _Activations(
        per_layer=per_layer_bytes,
        checkpoint_per_layer=ckpt,
        head=head * T,
        embed=embed * T,
        fwd_transient=fwd_transient,
        bwd_head=bwd_head,
        recompute=int(per_layer_bytes + RECOMPUTE_MLP_TEMPS * w * i_eff * T),
    )


# --------------------------------------------------------------------------------------------
# Training estimate
# --------------------------------------------------------------------------------------------


def _pinned(nbytes: float, pin: bool) -> int:
    """Pinned host tensors come from torch's caching host allocator: rounded up to a power of 2."""
    n = int(nbytes)
    if not pin or n <= 0:
        return n
    return 1 << (n - 1).bit_length()


def _resolve(shape: ModelShape, s: TrainSetup) -> TrainSetup:
    h = shape.hidden_size
    changes: dict[str, Any] = {}
    if s.reduce_bucket_size is None:
        changes["reduce_bucket_size"] = h * h
    if s.overlap_comm is None:
        changes["overlap_comm"] = s.device == "gpu" and s.zero_stage >= 2
    if s.prefetch_bucket_size is None:
        changes["prefetch_bucket_size"] = int(0.9 * h * h)
    if s.param_persistence_threshold is None:
        changes["param_persistence_threshold"] = 10 * h
    if s.pin_memory is None:
        changes["pin_memory"] = s.device == "gpu"
    if s.loss_impl == "auto":
        changes["loss_impl"] = "full" if s.method == "cpt" else "chunked"
    return replace(s, **changes) if changes else s


def _small_params(shape: ModelShape, threshold: int) -> int:
    """Parameters ZeRO-3 keeps whole on every rank (tensors at or below the threshold)."""
    h = shape.hidden_size
    norm = 2 * h if shape.norm == "layernorm" else h
    per_layer = shape.norms_per_layer * norm if norm <= threshold else 0
    if shape.model_type == "gpt2":  # biases of c_attn, c_proj, c_fc, mlp.c_proj
        per_layer += sum(x for x in (3 * h, h, shape.intermediate_size, h) if x <= threshold)
    elif shape.qkv_bias:
        per_layer += sum(x for x in (shape.q_dim, shape.kv_dim, shape.kv_dim) if x <= threshold)
    return shape.num_layers * per_layer + (norm if norm <= threshold else 0)


def estimate_training(shape: ModelShape, setup: TrainSetup,
                      counts: ParamCount | None = None) -> TrainEstimate:
    """Memory of one training rank (and its node) for ``setup`` on a model of ``shape``."""
    setup.validate()
    s = _resolve(shape, setup)
    pc = counts or count_params(shape)
    w = DTYPE_BYTES[s.dtype]
    d = s.ranks
    gpu = s.device == "gpu"
    stage = s.zero_stage
    N = pc.total
    notes: list[str] = []

    if s.adapter == "none":
        Nt = N
        largest = pc.largest_tensor
    else:
        Nt = lora_params(shape, s.lora_r, s.lora_targets)
        if Nt == 0:
            raise EstimateError("the LoRA targets match no linear layer of this model")
        mods = linear_modules(shape)
        largest = max(s.lora_r * max(mods[n][0], mods[n][1])
                      for n in lora_targets(shape, s.lora_targets))
    N_all = N + (Nt if s.adapter != "none" else 0)

    # Weights. QLoRA stores the base linear weights in 4 bits (+ fp32 absmax per 64 weights,
    # itself quantised with double quantisation: ~4.13 bits); the rest stays in w.
    if s.adapter == "qlora":
        linear_w = pc.attention + pc.mlp - _bias_params(shape)
        base_bytes = linear_w * 4.127 / 8 + (N - linear_w) * w
        weight_bytes = base_bytes + Nt * w
    else:
        weight_bytes = N_all * w

    tokens = s.micro_batch * s.seq_len * (2 if s.method == "dpo" else 1)
    act = _activations(shape, s, s.loss_impl, tokens)
    L = shape.num_layers

    persistent: dict[str, int] = {}
    host: dict[str, int] = {}  # per rank (multiplied by local ranks later)
    nvme_rank = 0
    offload_opt = s.offload_optimizer != "none"
    offload_par = s.offload_param != "none"
    pin = bool(s.pin_memory)

    # --- weights
    if stage == 3:
        small = min(_small_params(shape, s.param_persistence_threshold), N)
        part = weight_bytes / d + small * w * (1 - 1 / d)
        if offload_par:
            if s.offload_param == "cpu":
                host["offloaded weights (16-bit partition)"] = _pinned(weight_bytes / d, pin)
            else:
                nvme_rank += int(weight_bytes / d)
                host["NVMe parameter swap buffers"] = _pinned(
                    DS_PARAM_NVME_BUFFERS * DS_PARAM_NVME_BUFFER_SIZE * w, pin)
            persistent["weights (small params kept on every rank)"] = int(small * w)
        else:
            persistent[f"weights ({s.dtype}, ZeRO-3 partition)"] = int(part)
    else:
        persistent[f"weights ({s.dtype})"] = int(weight_bytes)
    if s.method == "dpo" and s.adapter == "none":
        ref = weight_bytes / d if stage == 3 else weight_bytes
        persistent["reference model weights (DPO)"] = int(ref)

    # --- optimizer states
    part_n = Nt / d if stage > 0 else Nt  # trainable parameters whose states this rank holds
    # Stage 0 keeps an fp32 master copy only under bf16/fp16; the ZeRO optimizer always does.
    master = 4 * part_n if (stage > 0 or w < 4) else 0
    moments = 8 * part_n
    if offload_opt:
        if s.offload_optimizer == "cpu":
            host["fp32 master weights (offloaded)"] = _pinned(master, pin)
            host["Adam moments (offloaded)"] = 2 * _pinned(moments / 2, pin)
            host["fp32 gradient partition (offloaded)"] = _pinned(4 * part_n, pin)
            if stage < 3:
                host["16-bit staging copy of the partition"] = _pinned(w * part_n, pin)
                host["host gradient staging buffer (largest param)"] = _pinned(w * largest, pin)
        else:
            nvme_rank += int(master + moments + 4 * part_n)
            sub = min(DS_SUB_GROUP_SIZE, part_n)
            host["NVMe optimizer swap buffers"] = DS_OPT_NVME_BUFFERS * _pinned(4 * sub, pin)
            host["fp32 gradient partition (host)"] = _pinned(4 * sub, pin)
    else:
        if master:
            persistent["fp32 master weights"] = int(master)
        persistent["Adam moments (fp32 m, v)"] = int(moments)

    # --- gradients and DeepSpeed buffers
    gathered = 0  # ZeRO-3 parameters gathered for forward/backward, released before the step
    bucket = 0
    if stage >= 1:
        bucket = s.reduce_bucket_size * w * (2 if s.overlap_comm else 1)
        persistent["reduce bucket" + (" x2 (overlap_comm)" if s.overlap_comm else "")] = bucket
    grads_bwd = 0  # gradients that exist from backward to step (not in persistent)
    if stage == 3:
        persistent["gradient partition buffer (ZeRO-3)"] = int(w * Nt / d)
        if d > 1 or offload_par:
            # Gathered copies stay live until their reuse (stage3_max_reuse_distance is large):
            # up to stage3_max_live_parameters whole parameters, plus the prefetch bucket.
            gathered = int(min(N_all - small, s.max_live_parameters) * w
                           + s.prefetch_bucket_size * w)
    elif stage in (1, 2):
        g_part = Nt / d if (stage == 2 or d == 1) else Nt
        if offload_opt:
            persistent["gradient staging buffer (largest param)"] = int(w * largest)
        else:
            grads_bwd = int(w * g_part)
    else:
        grads_bwd = int(w * Nt)

    if not gpu and w == 2:
        persistent["CPU runtime caches (oneDNN)"] = CPU_RUNTIME_CACHE_BYTES

    if not gpu:  # on the CPU accelerator the "host" is the device: offloaded states add up
        persistent.update({k: int(v) for k, v in host.items()})
        host = {}
    persistent = {k: v for k, v in persistent.items() if v}
    base = sum(persistent.values())

    # --- transient phases (device bytes on top of `base`)
    saved_full = L * act.per_layer + act.head + act.embed
    ckpt = L * act.checkpoint_per_layer + act.head + act.embed
    saved = ckpt if s.gradient_checkpointing else saved_full
    live = "ZeRO-3 gathered parameters (live + prefetch)"
    phases: dict[str, dict[str, int]] = {}
    phases["end of forward"] = {live: gathered, "activations (saved for backward)": saved,
                                "logits / LM head tiles (forward)": act.fwd_transient}
    phases["start of backward"] = {live: gathered, "activations (saved for backward)": saved,
                                   "loss gradients (LM head backward)": act.bwd_head}
    if s.gradient_checkpointing:
        # Layers are recomputed last to first; the peak is at the first layer, when stage 0 holds
        # every gradient but the first layer's and the input embeddings'.
        grads_then = grads_bwd
        if stage == 0 and s.adapter == "none":
            later = pc.per_layer + (pc.embeddings if not shape.tie_word_embeddings
                                    else shape.learned_positions * shape.hidden_size)
            grads_then = max(0, grads_bwd - w * later)
        phases["recompute (checkpointing)"] = {
            live: gathered,
            "activation checkpoints": L * act.checkpoint_per_layer,
            "recomputed layer activations": act.recompute,
            "gradients": grads_then,
        }
    end_bwd = {"gradients": grads_bwd}
    if stage == 0 and d > 1:
        end_bwd["all-reduce flat gradient copy"] = int(w * min(Nt, DS_ALLREDUCE_BUCKET))
    phases["end of backward"] = end_bwd

    # Optimizer step.
    piece = largest if stage == 0 or d == 1 else min(largest, math.ceil(Nt / d))
    norm64 = 8 * piece if s.gradient_clipping or stage > 0 else 0
    step: dict[str, int] = {}
    if offload_opt:
        step["gradients"] = 0
    elif stage == 0:
        if w < 4:  # DeepSpeed's BF16/FP16 optimizer: fp32 gradient accumulators
            step["gradients"] = grads_bwd
            step["fp32 gradients (flat)"] = 4 * Nt
        else:
            step["gradients"] = grads_bwd
        temps = CPU_ADAM_TEMPS * largest if not gpu else 0
        step["fp64 grad norm / Adam temporaries"] = max(norm64, temps)
    else:
        n_part = Nt / d
        if stage == 3:
            flat_phase = (w if w < 4 else 0) + 4  # 16-bit flat copy, then fp32
            adam_phase = 4 + (CPU_ADAM_TEMPS if not gpu else 0)
        else:
            flat_phase = w + w + (4 if w < 4 else 0)  # partition + flat copy (+ fp32 copy)
            adam_phase = 4 + (CPU_ADAM_TEMPS if not gpu else 0)
        flat = int(n_part * max(flat_phase, adam_phase))
        norm_phase = int(n_part * w * (stage != 3)) + norm64
        if flat >= norm_phase:
            step["flat fp32 gradient partition + Adam"] = flat
        else:
            step["gradients"] = int(n_part * w * (stage != 3))
            step["fp64 grad norm"] = norm64
    phases["optimizer step"] = step

    totals = {name: base + sum(v.values()) for name, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    device_total = totals[peak_phase]
    device_terms = dict(persistent)
    for k, v in phases[peak_phase].items():
        if v:
            device_terms[k] = device_terms.get(k, 0) + v

    overhead = int(GPU_CONTEXT_BYTES + GPU_FRAGMENTATION * device_total) if gpu else 0
    if gpu:
        notes.append(f"GPU overhead = {GPU_CONTEXT_BYTES // GiB} GiB (CUDA context, cuBLAS, NCCL)"
                     f" + {GPU_FRAGMENTATION:.0%} allocator fragmentation: stated, not measured")
    if s.loss_impl == "chunked":
        notes.append("SFT/DPO use TRL's fused LM head: logits are computed in tiles, never whole")
    if s.adapter == "qlora":
        notes.append("QLoRA: base linear weights in 4 bits (NF4 + double-quantised scales)")

    # --- host RAM per node
    local = max(1, min(s.gpus_per_node, d))
    proc = HOST_PROCESS_BYTES_GPU if gpu else HOST_PROCESS_BYTES_CPU
    host_terms: dict[str, int] = {}
    host_terms["process baseline (torch, Python) x ranks"] = proc * local
    for k, v in host.items():
        if v:
            host_terms[k + " x ranks"] = int(v) * local
    if not gpu:
        host_terms["training ranks' memory (CPU device) x ranks"] = device_total * local
    host_train = sum(host_terms.values())
    # Loading: every local rank materialises the checkpoint in host RAM before moving it to its
    # device (ZeRO-3: one shard at a time through zero.Init).
    models = 2 if (s.method == "dpo" and s.adapter == "none") else 1
    if stage == 3:
        per_rank_load = min(weight_bytes, HF_SHARD_BYTES) + weight_bytes / d
    else:
        per_rank_load = weight_bytes
    host_load = int(proc * local + models * per_rank_load * local)
    host_total = max(host_train, host_load)
    host_terms_out = dict(host_terms)
    host_terms_out["checkpoint loading peak (before training)"] = host_load
    nvme = int(nvme_rank * local)

    return TrainEstimate(
        model=shape.name or shape.model_type,
        setup=setup,
        params=N,
        trainable_params=Nt,
        tokens_per_micro_batch=tokens,
        device_terms=device_terms,
        persistent_bytes=base,
        peak_phase=peak_phase,
        phases=totals,
        device_total_bytes=device_total,
        overhead_bytes=overhead,
        gpu_peak_bytes=device_total + overhead,
        host_terms=host_terms_out,
        host_bytes=host_total,
        host_load_bytes=host_load,
        host_train_bytes=host_train,
        nvme_bytes=nvme,
        notes=notes,
    )


def _bias_params(shape: ModelShape) -> int:
    pc = count_params(shape)
    weights_only = 0
    for (fin, fout, n) in linear_modules(shape).values():
        weights_only += fin * fout * n
    if shape.is_moe:
        weights_only += shape.num_experts * 3 * shape.hidden_size * shape.intermediate_size
    return max(0, pc.attention + pc.mlp - shape.num_layers * weights_only)


# --------------------------------------------------------------------------------------------
# Inference estimate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceSetup:
    """A generation run: DeepSpeed-Inference (``deepspeed``) or ZeRO-Inference (``zero``)."""

    mode: str = "deepspeed"  # deepspeed | zero
    dtype: str = "bf16"
    batch_size: int = 4
    prompt_len: int = 512
    max_new_tokens: int = 128
    tensor_parallel: int = 1
    offload: str = "cpu"  # ZeRO-Inference: where the weights live (cpu | nvme)
    gpus_per_node: int = 1
    kernel_inject: bool = True


@dataclass
class InferenceEstimate:
    model: str
    setup: InferenceSetup
    device_terms: dict[str, int]
    device_total_bytes: int
    overhead_bytes: int
    gpu_peak_bytes: int
    host_terms: dict[str, int]
    host_bytes: int
    nvme_bytes: int
    kv_cache_bytes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["setup"] = asdict(self.setup)
        return d


def kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, dtype: str = "bf16") -> int:
    """2 (k and v) x layers x batch x tokens x kv heads x head dim x bytes."""
    return (2 * shape.num_layers * batch * tokens * shape.num_kv_heads * shape.head_dim
            * DTYPE_BYTES[dtype])


def estimate_inference(shape: ModelShape, setup: InferenceSetup,
                       counts: ParamCount | None = None) -> InferenceEstimate:
    """GPU, host and NVMe memory of a generation run."""
    if setup.mode not in ("deepspeed", "zero"):
        raise EstimateError("inference mode must be deepspeed or zero")
    if setup.dtype not in DTYPE_BYTES:
        raise EstimateError("dtype must be fp32, bf16 or fp16")
    if setup.tensor_parallel < 1 or setup.batch_size < 1 or setup.max_new_tokens < 1:
        raise EstimateError("tensor_parallel, batch_size and max_new_tokens must be at least 1")
    pc = counts or count_params(shape)
    w = DTYPE_BYTES[setup.dtype]
    b, p, n = setup.batch_size, setup.prompt_len, setup.max_new_tokens
    h, i, V = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    tp = setup.tensor_parallel if setup.mode == "deepspeed" else 1
    weights = pc.total * w
    kv_final = kv_cache_bytes(shape, b, p + n, setup.dtype) // tp
    kv_prefill = kv_cache_bytes(shape, b, p, setup.dtype) // tp
    # Prefill temporaries of one layer: the MLP's intermediate tensors and the attention output;
    # the LM head only scores the last position (fp32 upcast for sampling).
    prefill = b * p * (3 * w * i + 4 * w * h) // tp + b * V * (w + 4)
    terms: dict[str, int] = {}
    host: dict[str, int] = {}
    nvme = 0
    notes: list[str] = []
    if setup.mode == "deepspeed":
        terms[f"weights / tensor parallel {tp}"] = weights // tp
        if setup.kernel_inject:
            # Kernel injection preallocates a workspace for the attention and MLP intermediates.
            terms["inference kernel workspace"] = b * (p + n) * (4 * h + 2 * i) * w // tp
        terms["KV cache"] = max(kv_final, kv_prefill)
        terms["prefill activations"] = prefill if kv_prefill + prefill > kv_final else 0
        host["checkpoint loading (per rank)"] = weights * min(setup.gpus_per_node, tp)
    else:
        layer = pc.per_layer * w
        terms["prefetched layers (2) + embeddings"] = 2 * layer + (pc.embeddings + pc.lm_head) * w
        terms["KV cache"] = max(kv_final, kv_prefill)
        terms["prefill activations"] = prefill
        if setup.offload == "cpu":
            host["weights (pinned)"] = _pinned(weights, True)
        else:
            nvme = weights
            host["NVMe read buffers"] = DS_PARAM_NVME_BUFFERS * DS_PARAM_NVME_BUFFER_SIZE * w
        notes.append("ZeRO-Inference streams every layer from host/NVMe each step: high latency")
    terms = {k: int(v) for k, v in terms.items() if v}
    total = sum(terms.values())
    overhead = int(GPU_CONTEXT_BYTES + GPU_FRAGMENTATION * total)
    host["process baseline"] = HOST_PROCESS_BYTES_GPU
    return InferenceEstimate(
        model=shape.name or shape.model_type, setup=setup, device_terms=terms,
        device_total_bytes=total, overhead_bytes=overhead, gpu_peak_bytes=total + overhead,
        host_terms={k: int(v) for k, v in host.items()}, host_bytes=int(sum(host.values())),
        nvme_bytes=int(nvme), kv_cache_bytes=kv_final, notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------


def _loaded(profile: Any) -> Any:
    """A LoadedProfile for a Profile (paths relative to the current directory) or itself."""
    from pathlib import Path

    from engine.profile import LoadedProfile

    if isinstance(profile, LoadedProfile):
        return profile
    return LoadedProfile(profile, None, Path.cwd())


def shape_from_profile(profile: Any) -> ModelShape:
    """The model of a profile: ``model.config`` for ``init: scratch``, else ``model.path`` (a
    local directory, a catalog name or a hub id)."""
    from engine.model_shape import ModelShapeError, load_model_config, shape_from_config
    from engine.model_source import profile_config, tokenizer_vocab_size
    from engine.profile import model_location

    lp = _loaded(profile)
    m = lp.profile.model
    cfg = profile_config(lp)
    if cfg is None and m.path:
        cfg, _ = load_model_config(m.path)
    if not cfg:
        raise ModelShapeError("the profile's model has no config: set model.path or model.config")
    cfg = dict(cfg)
    if m.init == "scratch" and m.config:
        cfg.update(m.config)
        # The engine sizes a scratch model's vocabulary by its tokenizer: model.tokenizer, the
        # one in model.path, or one it trains of tokenizer_vocab_size tokens.
        source = m.tokenizer or (m.path if m.path and not m.tokenizer else None)
        loc = model_location(source, lp.base_dir)
        known = tokenizer_vocab_size(Path(loc.value)) if loc.kind == "local" and loc.value else None
        if known:
            cfg["vocab_size"] = known
        elif not m.tokenizer:
            cfg["vocab_size"] = m.tokenizer_vocab_size
    name = m.path or cfg.get("model_type", "")
    return shape_from_config(cfg, name=str(name))


def setup_from_profile(profile: Any, placement: Any = None) -> TrainSetup:
    """The :class:`TrainSetup` of a profile, with the DeepSpeed knobs read from the DeepSpeed
    config zerotune generates for it (so overrides count)."""
    from engine.dsconfig import build_ds_config, resolve_placement

    lp = _loaded(profile)
    p = lp.profile
    pl = placement or resolve_placement(lp)
    ds = build_ds_config(lp, pl)
    zero = ds.get("zero_optimization", {})
    lora = p.method.lora
    targets = lora.target_modules
    attn = p.model.attn_implementation
    if attn == "auto":
        attn = "sdpa"
    dtype = pl.dtype
    if ds.get("bf16", {}).get("enabled"):
        dtype = "bf16"
    elif ds.get("fp16", {}).get("enabled"):
        dtype = "fp16"
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none")
    offload_par = (zero.get("offload_param") or {}).get("device", "none")
    return TrainSetup(
        method=p.method.kind,
        adapter=p.method.adapter,
        lora_r=lora.r,
        lora_targets=targets if isinstance(targets, str) else tuple(targets),
        lora_dropout=lora.dropout,
        dtype=dtype,
        zero_stage=int(zero.get("stage", p.deepspeed.zero_stage)),
        offload_optimizer=offload_opt if offload_opt in ("cpu", "nvme") else "none",
        offload_param=offload_par if offload_par in ("cpu", "nvme") else "none",
        micro_batch=p.training.micro_batch_size,
        seq_len=p.data.max_seq_len,
        grad_accum=p.training.grad_accum,
        gradient_checkpointing=p.training.gradient_checkpointing,
        attn_implementation=attn,
        gpus_per_node=pl.gpus_per_node,
        num_nodes=pl.num_nodes,
        device=pl.device,
        reduce_bucket_size=zero.get("reduce_bucket_size"),
        overlap_comm=zero.get("overlap_comm"),
        prefetch_bucket_size=zero.get("stage3_prefetch_bucket_size"),
        param_persistence_threshold=zero.get("stage3_param_persistence_threshold"),
        max_live_parameters=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
        pin_memory=(zero.get("offload_optimizer") or zero.get("offload_param") or {}).get(
            "pin_memory"),
        gradient_clipping=bool(ds.get("gradient_clipping", 0)),
    )


def inference_setup_from_profile(profile: Any, placement: Any = None) -> InferenceSetup | None:
    """The :class:`InferenceSetup` of a profile's ``inference`` section (None when off)."""
    from engine.dsconfig import resolve_placement

    lp = _loaded(profile)
    inf = lp.profile.inference
    if inf.mode == "none":
        return None
    pl = placement or resolve_placement(lp)
    return InferenceSetup(
        mode=inf.mode, dtype=pl.dtype, batch_size=inf.batch_size,
        prompt_len=lp.profile.data.max_seq_len, max_new_tokens=inf.max_new_tokens,
        tensor_parallel=inf.tensor_parallel, offload=inf.offload,
        gpus_per_node=pl.gpus_per_node, kernel_inject=inf.kernel_inject,
    )


def estimate_profile(profile: Any, placement: Any = None) -> dict[str, Any]:
    """The training estimate of a profile as a dict (``gpu_peak_bytes`` per device,
    ``host_bytes`` per node, ``nvme_bytes``, the terms), plus ``inference`` when the profile
    generates. Accepts a ``Profile`` or a ``LoadedProfile``."""
    lp = _loaded(profile)
    shape = shape_from_profile(lp)
    setup = setup_from_profile(lp, placement)
    est = estimate_training(shape, setup)
    out = est.to_dict()
    out["model_shape"] = shape.to_dict()
    # Whether it fits, when the capacity is declared in the profile or visible here.
    res = lp.profile.resources
    gpu_cap = host_cap = None
    if setup.device == "gpu":
        if res.gpu_memory_gb != "auto":
            gpu_cap = int(float(res.gpu_memory_gb) * GiB)
        else:
            from engine.hardware import local_gpus

            gpus = local_gpus()
            gpu_cap = min(gpus.memory_bytes) if gpus.count else None
    if res.host_memory_gb != "auto":
        host_cap = int(float(res.host_memory_gb) * GiB)
    elif res.num_nodes == 1:
        from engine.hardware import host_memory_bytes

        host_cap = host_memory_bytes()
    out["gpu_capacity_bytes"] = gpu_cap
    out["host_capacity_bytes"] = host_cap
    problems = []
    if gpu_cap is not None and est.gpu_peak_bytes > gpu_cap:
        problems.append(f"needs {est.gpu_peak_bytes / GiB:.1f} GiB per GPU, "
                        f"has {gpu_cap / GiB:.1f}")
    if host_cap is not None and est.host_bytes > host_cap:
        problems.append(f"needs {est.host_bytes / GiB:.1f} GiB of host RAM per node, "
                        f"has {host_cap / GiB:.1f}")
    out["fits"] = None if gpu_cap is None and host_cap is None else not problems
    out["fit_problems"] = problems
    inf = inference_setup_from_profile(profile, placement)
    if inf is not None:
        out["inference"] = estimate_inference(shape, inf).to_dict()
    return out
