"""The training engine: runs on every rank under the DeepSpeed launcher (or torchrun).

    deepspeed --num_gpus N --module engine.train --run-dir runs/<id> [--resume-from CKPT]

It reads the frozen ``profile.yaml`` and ``ds_config.json`` of the run directory, builds the
model, tokenizer and data, and hands the loop to transformers' Trainer (cpt) or TRL's
SFTTrainer / DPOTrainer, with the generated DeepSpeed config. Rank 0 appends events to
``events.jsonl`` (see engine.events); everything else goes to stdout/stderr, which the
supervisor keeps in ``engine.log``.

SIGTERM: every rank finishes its current step, all ranks agree to stop, a checkpoint is saved,
a ``stopped`` event is written and the process exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

from engine.events import EventWriter
from engine.profile import LoadedProfile, Profile, load_profile_data

COMPLETE_MARKER = "zerotune-complete.json"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

_stop_requested = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _stop_requested
    _stop_requested = True


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def writes_events() -> bool:
    """The first rank of each node writes its node's events.jsonl: on one node that is global
    rank 0; with several nodes, each node's run directory gets the run as that node saw it."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0


def log(msg: str) -> None:
    if writes_events():
        print(f"[zerotune] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Profile, tokenizer, model
# --------------------------------------------------------------------------------------------


def load_run_profile(run_dir: Path) -> LoadedProfile:
    from engine.profile import validate_profile

    path = run_dir / "profile.yaml"
    data, text = load_profile_data(path)
    # Checked before launch; the frozen copy holds absolute paths.
    return validate_profile(data, source=path, text=text, check_data=False, check_model=False)


def _train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _rows_text(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        for k in ("text", "prompt", "completion", "chosen", "rejected"):
            v = r.get(k)
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list):
                out.extend(m["content"] for m in v)
        for m in r.get("messages", []) or []:
            out.append(m["content"])
    return out


def build_tokenizer(p: Profile, run_dir: Path, train_rows: list[dict[str, Any]], args):
    from transformers import AutoTokenizer

    m = p.model
    source = m.tokenizer or (m.path if m.init == "pretrained" else None)
    if source is None and m.init == "scratch" and m.path and (Path(m.path) / "tokenizer.json").exists():
        source = m.path
    if source is None:
        out = run_dir / "tokenizer"
        with args.main_process_first(desc="train tokenizer"):
            if (out / "tokenizer.json").exists():
                tok = AutoTokenizer.from_pretrained(out)
            else:
                log(f"training a {m.tokenizer_vocab_size}-token byte-level BPE tokenizer on the training data")
                tok = _train_tokenizer(_rows_text(train_rows), m.tokenizer_vocab_size, out)
    else:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=m.trust_remote_code, revision=m.revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template and p.method.kind in ("sft", "dpo"):
        tok.chat_template = CHAT_TEMPLATE
    return tok


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def build_model(p: Profile, tokenizer, dtype: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    m = p.model
    attn = None if m.attn_implementation == "auto" else m.attn_implementation
    if m.init == "scratch":
        extra = dict(m.config or {})
        model_type = extra.pop("model_type", None)
        if m.path:
            config = AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code, **extra)
        else:
            config = AutoConfig.for_model(model_type, **extra)
        config.vocab_size = len(tokenizer)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, key, getattr(tokenizer, key))
        torch.manual_seed(p.seed)
        kwargs = {"attn_implementation": attn} if attn else {}
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype), **kwargs)
    else:
        kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": m.trust_remote_code}
        if attn:
            kwargs["attn_implementation"] = attn
        if m.revision:
            kwargs["revision"] = m.revision
        if p.method.adapter == "qlora":
            from transformers import BitsAndBytesConfig

            q = p.method.qlora
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=q.bits == 4, load_in_8bit=q.bits == 8,
                bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
                bnb_4bit_compute_dtype=torch_dtype(dtype),
            )
        model = AutoModelForCausalLM.from_pretrained(m.path, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def lora_config(p: Profile):
    from peft import LoraConfig

    lc = p.method.lora
    return LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=lc.target_modules,
    )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_splits(p: Profile, run_dir: Path) -> tuple[str, list[dict], list[dict], int]:
    """(format, train rows, validation rows, skipped rows): the prepared data of the run, from
    the cache the run manager filled before launch (engine.data_prep)."""
    from engine.data_prep import prepared_splits

    fmt, train, val, skipped = prepared_splits(p, run_dir.parent.parent)
    if p.training.eval_max_rows:
        val = val[: p.training.eval_max_rows]
    return fmt, train, val, skipped


def cpt_dataset(rows: list[dict], tokenizer, max_len: int, packing: bool):
    """Token blocks for continued pre-training: each document ends with EOS; with packing, the
    documents are concatenated and cut into blocks of ``max_len`` (the one remainder is
    dropped), without packing each document is one row truncated to ``max_len``.

    Built with one batched tokenizer call and numpy rather than ``Dataset.map``, whose
    fingerprinting and Arrow round trips cost more than the tokenization itself."""
    import numpy as np
    from datasets import Dataset

    eos = tokenizer.eos_token_id
    texts = [r["text"] for r in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    if not packing:
        docs = [[*x, eos][:max_len] for x in ids]
        return Dataset.from_dict({"input_ids": docs, "labels": [list(x) for x in docs]})
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.full(int(lengths.sum()), eos, dtype=np.int32)  # the EOS after each document stays
    offset = 0
    for x, n in zip(ids, lengths.tolist(), strict=True):
        flat[offset:offset + n - 1] = x
        offset += n
    blocks = flat[: (len(flat) // max_len) * max_len].reshape(-1, max_len)
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks.copy()})


def sft_rows(rows: list[dict], fmt: str) -> list[dict]:
    if fmt == "prompt_completion":
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    # Chat: the last assistant turn is the completion; loss only on it.
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


def dpo_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if isinstance(r["chosen"], list):
            out.append({"prompt": r["prompt"] if isinstance(r["prompt"], list) else
                        ([{"role": "user", "content": r["prompt"]}] if r["prompt"] else []),
                        "chosen": r["chosen"], "rejected": r["rejected"]})
        else:
            out.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
    return out


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


# Warnings found before training starts; the callback emits them right after the start event.
pending_warnings: list[str] = []


def make_callback(events: EventWriter | None, run_dir: Path, info: dict[str, Any]):
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class ZerotuneCallback(TrainerCallback):
        def __init__(self):
            self.t0 = time.time()
            self.last_t = self.t0
            self.last_tokens = 0
            self.last_step = 0
            self.best_eval: float | None = None
            self.last_eval: float | None = None
            self.last_eval_step = -1
            self.step_t0 = 0.0
            self.compute_s = 0.0  # time inside steps, summed: throughput excludes evals and saves
            self.interval_compute_s = 0.0
            self.last_loss: float | None = None
            self.stopped = False
            self.started = False

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last_t = time.time()
            self.last_step = state.global_step
            self.last_tokens = state.num_input_tokens_seen or 0
            if events and not self.started:
                events.emit("start", total_steps=state.max_steps, start_step=state.global_step, **info)
                for message in pending_warnings:
                    events.emit("warning", message=message)
            self.started = True

        def on_step_begin(self, args, state, control, **kw):
            self.step_t0 = time.time()

        def on_step_end(self, args, state, control, **kw):
            spent = time.time() - self.step_t0
            self.compute_s += spent
            self.interval_compute_s += spent
            stop = _stop_requested
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                flag = torch.tensor([1 if stop else 0], dtype=torch.int32, device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop and not self.stopped:
                self.stopped = True
                log(f"stop requested: saving a checkpoint at step {state.global_step}")
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if not events or not logs or "loss" not in logs:
                return
            now = time.time()
            dt = max(self.interval_compute_s, 1e-9)
            self.interval_compute_s = 0.0
            tokens = state.num_input_tokens_seen or 0
            steps = state.global_step - self.last_step
            world = max(args.world_size, 1)
            samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * world
            self.last_loss = float(logs["loss"])
            events.emit(
                "step", step=state.global_step, total_steps=state.max_steps,
                epoch=logs.get("epoch", state.epoch), loss=self.last_loss,
                lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                tokens_per_s=(tokens - self.last_tokens) / dt if tokens else None,
                samples_per_s=samples / dt, tokens_seen=tokens or None, elapsed=now - self.t0,
            )
            self.last_t, self.last_tokens, self.last_step = now, tokens, state.global_step

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if not metrics or "eval_loss" not in metrics:
                return
            loss = float(metrics["eval_loss"])
            self.last_eval = loss
            self.last_eval_step = state.global_step
            self.best_eval = loss if self.best_eval is None else min(self.best_eval, loss)
            if events:
                extra = {k: float(v) for k, v in metrics.items()
                         if k.startswith("eval_") and k != "eval_loss" and isinstance(v, (int, float))
                         and not k.endswith(("_runtime", "_per_second"))}
                # A DPO loss is no language-model loss: its exp() is no perplexity.
                ppl = _ppl(loss) if info.get("method") != "dpo" else None
                events.emit("eval", step=state.global_step, eval_loss=loss, perplexity=ppl, **extra)

        def on_save(self, args, state, control, **kw):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero:
                marker = {"step": state.global_step, "world_size": args.world_size,
                          "zero_stage": info.get("zero_stage"), "t": time.time()}
                (path / COMPLETE_MARKER).write_text(json.dumps(marker))
                if events:
                    events.emit("checkpoint", step=state.global_step, path=str(path))

    return ZerotuneCallback()


def _ppl(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 50 else float("inf")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def training_arguments(p: Profile, run_dir: Path, ds_config: dict, dtype: str, device: str,
                       has_eval: bool):
    from transformers import TrainingArguments

    t = p.training
    common: dict[str, Any] = dict(
        output_dir=str(run_dir / "checkpoints"),
        deepspeed=ds_config,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1],
        adam_epsilon=t.adam_eps,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        logging_steps=t.log_every,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_on_start=has_eval and t.eval_on_start,
        eval_steps=t.eval_every,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=t.keep_checkpoints,
        gradient_checkpointing=t.gradient_checkpointing,
        seed=p.seed,
        data_seed=p.seed,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu=device == "cpu",
        report_to=[],
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        save_only_model=False,
    )
    if t.gradient_checkpointing:
        common["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    kind = p.method.kind
    if kind == "sft":
        from trl import SFTConfig

        return SFTConfig(max_length=p.data.max_seq_len, packing=False, completion_only_loss=True,
                         dataset_num_proc=None, **common)
    if kind == "dpo":
        from trl import DPOConfig

        return DPOConfig(max_length=p.data.max_seq_len, beta=p.method.dpo.beta,
                         loss_type=[p.method.dpo.loss_type], **common)
    return TrainingArguments(**common)


def run(run_dir: Path, resume_from: str | None) -> int:
    lp = load_run_profile(run_dir)
    p = lp.profile
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    launch = json.loads((run_dir / "launch.json").read_text()) if (run_dir / "launch.json").exists() else {}
    device = launch.get("device", "cpu" if os.environ.get("DS_ACCELERATOR") == "cpu" else "gpu")
    dtype = launch.get("dtype") or ("bf16" if ds_config.get("bf16", {}).get("enabled") else
                                    "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32")
    events = EventWriter(run_dir / "events.jsonl") if writes_events() else None
    try:
        return _run(p, run_dir, ds_config, device, dtype, events, resume_from)
    except BaseException as exc:  # record why, then let the launcher see the failure
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        kind, reason = classify_error(exc)
        traceback.print_exc()
        EventWriter(run_dir / "events.jsonl").emit(
            "error", kind=kind, reason=reason, rank=global_rank(),
            step=None,
        )
        return 1


def classify_error(exc: BaseException) -> tuple[str, str]:
    from engine.data_formats import DataError

    text = f"{type(exc).__name__}: {exc}"
    first = text.splitlines()[0][:300]
    if isinstance(exc, DataError):
        return "bad_data", f"bad data at {exc!s}"[:500]
    if isinstance(exc, MemoryError):
        return "host_oom", "out of host memory (MemoryError)"
    if "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        return "oom", f"out of GPU memory: {first}"
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return "timeout", f"collective timeout: {first}"
    if isinstance(exc, KeyboardInterrupt):
        return "engine", "interrupted"
    return "engine", first


def _run(p: Profile, run_dir: Path, ds_config: dict, device: str, dtype: str,
         events: EventWriter | None, resume_from: str | None) -> int:
    import torch
    import transformers
    from transformers import Trainer, set_seed

    transformers.logging.set_verbosity_warning()
    t_start = time.time()
    set_seed(p.seed)
    fmt, train_rows, val_rows, skipped = load_splits(p, run_dir)
    if skipped:
        pending_warnings.append(f"skipped {skipped} bad data row(s) (data.on_bad_rows: skip)")
    args = training_arguments(p, run_dir, ds_config, dtype, device, has_eval=bool(val_rows))
    tokenizer = build_tokenizer(p, run_dir, train_rows, args)
    model = build_model(p, tokenizer, dtype)
    if p.training.gradient_checkpointing:
        model.config.use_cache = False
    num_params = sum(x.numel() for x in model.parameters())
    peft_config = lora_config(p) if p.method.adapter in ("lora", "qlora") else None
    info = {
        "world_size": args.world_size, "method": p.method.kind, "adapter": p.method.adapter,
        "zero_stage": p.deepspeed.zero_stage, "model": p.model.path or (p.model.config or {}).get("model_type"),
        "data_format": fmt, "train_rows": len(train_rows), "eval_rows": len(val_rows),
        "num_params": num_params, "ds_config": ds_config, "resumed_from": resume_from,
        "dtype": dtype, "device": device, "torch_threads": torch.get_num_threads(),
        "rank": global_rank(), "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")) or 0),
    }
    callback = make_callback(events, run_dir, info)
    kind = p.method.kind
    log(f"{kind} on {fmt} data: {len(train_rows)} train / {len(val_rows)} eval rows, "
        f"{num_params / 1e6:.2f}M params, world size {args.world_size}, ZeRO-{p.deepspeed.zero_stage}")
    if kind == "cpt":
        from transformers import DataCollatorForSeq2Seq, default_data_collator

        with args.main_process_first(desc="tokenize"):
            train_ds = cpt_dataset(train_rows, tokenizer, p.data.max_seq_len, p.data.packing)
            eval_ds = cpt_dataset(val_rows, tokenizer, p.data.max_seq_len, p.data.packing) if val_rows else None
        if len(train_ds) == 0:
            raise ValueError(f"the training data makes no full sequence of {p.data.max_seq_len} tokens; "
                             "lower data.max_seq_len or add data")
        if eval_ds is not None and len(eval_ds) == 0:
            eval_ds = None
            args.eval_strategy = transformers.IntervalStrategy.NO
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer,
                          # Labels are built with the data. The usual LM collator would mask every
                          # pad-id token, and pad is often eos: documents would never learn to end.
                          data_collator=default_data_collator if p.data.packing else
                          DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
                          callbacks=[callback])
    else:
        from datasets import Dataset

        if kind == "sft":
            from trl import SFTTrainer

            train_ds = Dataset.from_list(sft_rows(train_rows, fmt))
            eval_ds = Dataset.from_list(sft_rows(val_rows, fmt)) if val_rows else None
            trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[callback])
        else:
            from trl import DPOTrainer

            train_ds = Dataset.from_list(dpo_rows(train_rows))
            eval_ds = Dataset.from_list(dpo_rows(val_rows)) if val_rows else None
            # Full fine-tuning needs an explicit frozen copy of the starting model as reference
            # (with an adapter, the reference is the base model with the adapter disabled).
            ref_model = build_model(p, tokenizer, dtype) if peft_config is None else None
            trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[callback])
    if kind != "cpt":
        eval_ds = _report_dropped(trainer, len(train_rows), len(val_rows), p.data.max_seq_len)
    info["trainable_params"] = sum(x.numel() for x in trainer.model.parameters() if x.requires_grad)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # The million objects of torch, transformers and DeepSpeed's modules live as long as the
    # rank: keep them out of the collector, so that the gc.collect() the Trainer runs before
    # training (and every later full collection) does not walk them again (0.3-0.4 s each).
    gc.freeze()
    result = trainer.train(resume_from_checkpoint=resume_from)
    state = trainer.state
    if callback.stopped:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if events:
            events.emit("stopped", step=state.global_step, checkpoint=str(ckpt) if ckpt.exists() else None)
        return 0
    if eval_ds is not None and callback.last_eval_step != state.global_step:
        trainer.evaluate()
    model_dir = run_dir / "model"
    trainer.save_model(str(model_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(model_dir)
        if p.method.merge_adapter and peft_config is not None:
            merge_adapter(p, model_dir, tokenizer, dtype)
    # Held-out metrics of the saved model (and the base model with evaluation.baseline), then
    # the profile's inference stage; both are collective: every rank calls them.
    from engine.evaluate import evaluate_after_training
    from engine.infer import run_inference_stage

    if p.deepspeed.zero_stage == 3:
        # The Trainer registered its ZeRO-3 config globally, so every later from_pretrained
        # would build partitioned placeholders; evaluation loads plain models from model/.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    evaluation = evaluate_after_training(trainer, p, run_dir, val_rows, events)
    inference = run_inference_stage(p, run_dir, events)
    tokens = state.num_input_tokens_seen or 0
    train_time = callback.compute_s or result.metrics.get("train_runtime") or (time.time() - t_start)
    summary = {
        "steps": state.global_step, "final_loss": callback.last_loss,
        "final_eval_loss": callback.last_eval, "best_eval_loss": callback.best_eval,
        "perplexity": _ppl(callback.last_eval) if kind != "dpo" else None,
        "tokens_per_s": tokens / train_time if tokens and train_time else None,
        "train_time": train_time, "wall_time": time.time() - t_start, "model_dir": str(model_dir),
        "evaluation": {k: v for k, v in evaluation.items() if isinstance(v, (int, float))} or None,
        "inference": {k: v for k, v in inference.items() if isinstance(v, (int, float, str))} or None,
    }
    if events:
        events.emit("done", summary=summary)
    log("done: " + json.dumps(summary))
    return 0


def _report_dropped(trainer, n_train: int, n_eval: int, max_len: int):
    """TRL drops rows whose prompt leaves no completion token within max_length: say so."""
    import transformers

    kept = len(trainer.train_dataset)
    if kept < n_train:
        msg = (f"{n_train - kept} of {n_train} training rows were dropped: their prompt fills "
               f"data.max_seq_len ({max_len} tokens) and leaves no answer token to learn; "
               "raise data.max_seq_len or shorten the prompts")
        log(msg)
        pending_warnings.append(msg)
    if kept == 0:
        raise ValueError(f"no training row fits in data.max_seq_len ({max_len} tokens); raise it")
    eval_ds = trainer.eval_dataset
    if eval_ds is not None and len(eval_ds) == 0:
        msg = "every held-out row was dropped (too long for data.max_seq_len): evaluation is off"
        log(msg)
        pending_warnings.append(msg)
        trainer.eval_dataset = None
        trainer.args.eval_strategy = transformers.IntervalStrategy.NO
        trainer.args.eval_on_start = False
        return None
    return eval_ds


def merge_adapter(p: Profile, model_dir: Path, tokenizer, dtype: str) -> None:
    from peft import PeftModel

    base = build_model(p, tokenizer, dtype)
    merged = PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()
    merged.save_pretrained(model_dir / "merged", safe_serialization=True)
    tokenizer.save_pretrained(model_dir / "merged")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine.train", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run(args.run_dir.resolve(), args.resume_from)


if __name__ == "__main__":
    from engine.events import end_rank

    end_rank(main())
