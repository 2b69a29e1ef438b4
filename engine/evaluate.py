"""Evaluation after training, on the held-out split: did fine-tuning help?

- every method: perplexity of the held-out text (cpt: the whole text; sft: the completion given
  the prompt; dpo: the chosen answer given the prompt);
- sft: exact match, token F1 (SQuAD-style normalisation), ROUGE-L F-measure (rouge-score) and
  corpus BLEU (sacrebleu) of greedy generations against the reference completions;
- dpo: reward accuracy and mean reward margin on held-out preference pairs, from TRL's eval
  metrics when the trainer logged them, else computed against the base model as reference;
- ``evaluation.baseline: true``: the same for the base model, so base vs tuned and the
  difference are shown side by side.

The result is one ``eval`` event (numeric fields become history metrics: ``exact_match``,
``base_exact_match``, ...) with an ``evaluation`` table for ``zerotune runs show``.
Heavy imports happen inside the functions.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

from engine.events import EventWriter

TEXT_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu")
HIGHER_IS_BETTER = {"perplexity": False}

# --------------------------------------------------------------------------------------------
# Text metrics
# --------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(preds: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0


def bleu(preds: list[str], refs: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100, standard 13a tokenisation)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(preds, [refs]).score)


def text_metrics(preds: list[str], refs: list[str]) -> dict[str, float]:
    n = max(len(preds), 1)
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(preds, refs, strict=True)) / n,
        "token_f1": sum(token_f1(p, r) for p, r in zip(preds, refs, strict=True)) / n,
        "rouge_l": rouge_l(preds, refs),
        "bleu": bleu(preds, refs),
    }


# --------------------------------------------------------------------------------------------
# Held-out rows as (context, target) pairs
# --------------------------------------------------------------------------------------------


def _content(x: Any) -> str:
    if isinstance(x, list):
        return "".join(m.get("content", "") for m in x if isinstance(m, dict))
    return str(x)


def heldout_pairs(rows: list[dict[str, Any]], kind: str, tokenizer) -> list[tuple[str, str]]:
    """(context text, target text): the loss is on the target; sft generates from the context."""
    out: list[tuple[str, str]] = []
    for r in rows:
        if kind == "cpt":
            out.append(("", r["text"]))
        elif kind == "sft" and isinstance(r.get("messages"), list):
            msgs = r["messages"]
            ctx = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            out.append((ctx, msgs[-1]["content"]))
        elif kind == "sft":
            out.append((r["prompt"], r["completion"]))
        else:  # dpo: the chosen answer
            prompt = r["prompt"]
            if isinstance(prompt, list) or isinstance(r["chosen"], list):
                msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                ctx = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            else:
                ctx = prompt
            out.append((ctx, _content(r["chosen"])))
    return out


def _encode(tokenizer, ctx: str, target: str, max_len: int) -> tuple[list[int], int]:
    c = tokenizer(ctx, add_special_tokens=False)["input_ids"] if ctx else []
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (c + t)[:max_len]
    return ids, min(len(c), len(ids))


def target_logprobs(model, tokenizer, pairs: list[tuple[str, str]], max_len: int) -> list[tuple[float, int]]:
    """Per pair: (sum of log-probabilities of the target tokens, number of target tokens)."""
    import torch

    out = []
    for ctx, target in pairs:
        ids, start = _encode(tokenizer, ctx, target, max_len)
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        tgt = x[0, 1:]
        lp = logp.gather(1, tgt[:, None])[:, 0]
        first = max(start - 1, 0)
        out.append((float(lp[first:].sum()), int(len(ids) - 1 - first)))
    return out


def perplexity(model, tokenizer, pairs, max_len: int) -> float | None:
    lps = target_logprobs(model, tokenizer, pairs, max_len)
    n = sum(k for _, k in lps)
    if n == 0:
        return None
    loss = -sum(s for s, _ in lps) / n
    return math.exp(loss) if loss < 50 else float("inf")


def generate_answers(model, tokenizer, contexts: list[str], max_new_tokens: int, batch_size: int = 4) -> list[str]:
    from engine.infer import InferSettings, generate_batch

    s = InferSettings(mode="plain", max_new_tokens=max_new_tokens, batch_size=batch_size)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        outs: list[str] = []
        for i in range(0, len(contexts), batch_size):
            o, *_ = generate_batch(model, tokenizer, contexts[i : i + batch_size], s)
            outs.extend(x.strip() for x in o)
        return outs
    finally:
        tokenizer.padding_side = old_side


def dpo_rewards(policy, ref, tokenizer, rows: list[dict[str, Any]], beta: float, max_len: int) -> dict[str, float]:
    """Implicit DPO rewards beta * (log pi(y|x) - log ref(y|x)): accuracy and mean margin."""
    chosen = heldout_pairs(rows, "dpo", tokenizer)
    rejected = heldout_pairs([{**r, "chosen": r["rejected"]} for r in rows], "dpo", tokenizer)
    pc = target_logprobs(policy, tokenizer, chosen, max_len)
    pr = target_logprobs(policy, tokenizer, rejected, max_len)
    rc = target_logprobs(ref, tokenizer, chosen, max_len)
    rr = target_logprobs(ref, tokenizer, rejected, max_len)
    margins = [beta * ((a[0] - b[0]) - (c[0] - d[0])) for a, c, b, d in zip(pc, pr, rc, rr, strict=True)]
    n = max(len(margins), 1)
    return {"reward_accuracy": sum(m > 0 for m in margins) / n, "reward_margin": sum(margins) / n}


def evaluate_model(model, tokenizer, profile, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Metrics of one model on held-out rows (no DPO rewards: those need a reference)."""
    kind = profile.method.kind
    max_len = profile.data.max_seq_len
    pairs = heldout_pairs(rows, kind, tokenizer)
    out: dict[str, float] = {}
    ppl = perplexity(model, tokenizer, pairs, max_len)
    if ppl is not None:
        out["perplexity"] = ppl
    if kind == "sft" and pairs:
        longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in pairs)
        n_new = max(1, min(profile.inference.max_new_tokens, longest + 8))
        preds = generate_answers(model, tokenizer, [c for c, _ in pairs], n_new, profile.inference.batch_size)
        out.update(text_metrics(preds, [t for _, t in pairs]))
    return out


# --------------------------------------------------------------------------------------------
# After training
# --------------------------------------------------------------------------------------------


def _trl_dpo_metrics(trainer) -> dict[str, float]:
    history = getattr(getattr(trainer, "state", None), "log_history", None) or []
    for entry in reversed(history):
        if "eval_rewards/accuracies" in entry:
            return {"reward_accuracy": float(entry["eval_rewards/accuracies"]),
                    "reward_margin": float(entry.get("eval_rewards/margins", float("nan")))}
    return {}


def _trainer_eval_loss(trainer) -> float | None:
    history = getattr(getattr(trainer, "state", None), "log_history", None) or []
    for entry in reversed(history):
        if "eval_loss" in entry:
            return float(entry["eval_loss"])
    return None


def comparison(tuned: dict[str, float], base: dict[str, float] | None) -> list[dict[str, Any]]:
    names = [n for n in ("perplexity", *TEXT_METRICS, "reward_accuracy", "reward_margin") if n in tuned]
    rows = []
    for n in names:
        b = base.get(n) if base else None
        t = tuned[n]
        rows.append({"name": n, "base": b, "tuned": t,
                     "delta": (t - b) if b is not None and t is not None else None,
                     "higher_is_better": HIGHER_IS_BETTER.get(n, True)})
    return rows


def evaluate_after_training(trainer, profile, run_dir: Path, eval_rows: list[dict[str, Any]],
                            events: EventWriter | None) -> dict[str, Any]:
    """Evaluate the saved model (``run_dir/model``) and, with ``evaluation.baseline``, the base
    model, on the held-out rows; emit one ``eval`` event on the process that has ``events``.

    Call on every rank after ``trainer.save_model`` (and the merge, if any): rank 0 does the
    work with plain PyTorch models, the other ranks wait at a barrier. Returns the event's
    fields on rank 0, ``{}`` elsewhere or without held-out rows.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    is_zero = not distributed or dist.get_rank() == 0
    result: dict[str, Any] = {}
    if is_zero and eval_rows:
        result = _evaluate(trainer, profile, Path(run_dir), eval_rows, events)
    if distributed:
        dist.barrier()
    return result


def _evaluate(trainer, profile, run_dir: Path, rows, events) -> dict[str, Any]:
    import torch

    from engine.export import training_dtype
    from engine.run_model import load_base_model, load_run_model

    dtype = training_dtype(run_dir)
    torch.manual_seed(profile.seed)
    tuned_model, tok, _ = load_run_model(run_dir, dtype)
    tuned = evaluate_model(tuned_model, tok, profile, rows)
    need_base = profile.evaluation.baseline or (profile.method.kind == "dpo" and not _trl_dpo_metrics(trainer))
    base: dict[str, float] | None = None
    base_model = None
    if need_base:
        base_model = load_base_model(run_dir, tok, dtype).eval()
    if profile.method.kind == "dpo":
        trl = _trl_dpo_metrics(trainer)
        tuned.update(trl or dpo_rewards(tuned_model, base_model, tok, rows, profile.method.dpo.beta,
                                        profile.data.max_seq_len))
    if profile.evaluation.baseline and base_model is not None:
        base = evaluate_model(base_model, tok, profile, rows)
        if profile.method.kind == "dpo":
            base.update({"reward_accuracy": 0.0, "reward_margin": 0.0})  # the reference itself
    table = comparison(tuned, base)
    fields: dict[str, Any] = {"step": getattr(getattr(trainer, "state", None), "global_step", None),
                              "stage": "evaluation", "heldout_rows": len(rows)}
    for row in table:
        name = "heldout_perplexity" if row["name"] == "perplexity" else row["name"]
        fields[name] = row["tuned"]
        if row["base"] is not None:
            fields[f"base_{row['name']}"] = row["base"]
    # Consumers of eval events expect eval_loss: repeat the trainer's last one (no new point).
    last = _trainer_eval_loss(trainer)
    if last is None and tuned.get("perplexity") not in (None, float("inf")):
        last = math.log(tuned["perplexity"])
    if last is not None:
        fields["eval_loss"] = last
        fields["perplexity"] = math.exp(last) if last < 50 else float("inf")
    fields["evaluation"] = table
    if events is not None:
        events.emit("eval", **fields)
    return fields
