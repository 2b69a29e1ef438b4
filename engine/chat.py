"""Interactive terminal chat with a run's model: streamed tokens, the tokenizer's chat template.

Each line typed is a user turn; the reply streams to stdout as it is generated
(``TextIteratorStreamer`` fed by ``generate`` in a thread). ``/reset`` forgets the
conversation, ``/exit`` (or end of input) leaves. Prompts and notes go to stderr, so piping
stdin in and stdout out gives one reply a line.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass
class ChatSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    system: str | None = None
    max_context: int | None = None  # tokens; older turns are dropped to fit


def fit_context(settings: ChatSettings, model) -> ChatSettings:
    """Cap ``settings.max_context`` so the prompt plus a full reply fit the model's positions."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions:
        settings.max_context = max(positions - settings.max_new_tokens, 8)
    return settings


def load_chat_model(run_dir, settings: ChatSettings | None = None, *,
                    checkpoint: int | None = None):
    """(model, tokenizer, source, settings) to chat with a run's model, in the dtype it trained in.

    Raises ``engine.run_model.ModelNotFound`` when the run has no model (e.g. it failed).
    """
    from pathlib import Path

    from engine.export import training_dtype
    from engine.run_model import load_run_model

    run_dir = Path(run_dir)
    model, tok, src = load_run_model(run_dir, training_dtype(run_dir), checkpoint=checkpoint)
    return model, tok, src, fit_context(settings or ChatSettings(), model)


def _context_ids(tokenizer, messages: list[dict[str, str]], max_context: int | None):
    """Token ids of the conversation with the generation prompt, oldest turns dropped to fit."""
    msgs = list(messages)
    while True:
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        n = ids["input_ids"].shape[1]
        first_turn = 1 if msgs and msgs[0]["role"] == "system" else 0
        if max_context is None or n <= max_context or len(msgs) - first_turn <= 1:
            return ids
        del msgs[first_turn : first_turn + 2]  # the oldest user/assistant pair


def reply(model, tokenizer, messages: list[dict[str, str]], s: ChatSettings,
          on_text: Callable[[str], None], stop: threading.Event | None = None) -> str:
    """Generate the assistant's next message, calling ``on_text`` with each new piece.

    Setting ``stop`` ends generation after the current token (the reply so far is returned).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    enc = _context_ids(tokenizer, messages, s.max_context)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs: dict[str, Any] = dict(**enc, max_new_tokens=s.max_new_tokens, streamer=streamer,
                                  pad_token_id=tokenizer.pad_token_id)
    end = tokenizer.convert_tokens_to_ids("<|end|>") if "<|end|>" in tokenizer.get_vocab() else None
    if end is not None:
        kwargs["eos_token_id"] = [tokenizer.eos_token_id, end]
    if s.temperature > 0:
        kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop is not None:

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **_: Any):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        kwargs["stopping_criteria"] = StoppingCriteriaList([_Stop()])
    error: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as exc:  # surfaced in the caller's thread
            error.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    pieces: list[str] = []
    for piece in streamer:
        pieces.append(piece)
        on_text(piece)
    thread.join()
    if error:
        raise error[0]
    return "".join(pieces).strip()


def chat_loop(model, tokenizer, lines: Iterable[str], out: TextIO, s: ChatSettings,
              note: Callable[[str], None] | None = None, interactive: bool = False) -> int:
    """Run the conversation over input ``lines``; returns the number of replies."""
    note = note or (lambda m: print(m, file=sys.stderr, flush=True))
    base = [{"role": "system", "content": s.system}] if s.system else []
    messages = list(base)
    replies = 0
    if interactive:
        note("chat: type a message; /reset starts over, /exit leaves")
    for raw in lines:
        text = raw.rstrip("\n")
        if not text.strip():
            continue
        cmd = text.strip()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            messages = list(base)
            note("(conversation reset)")
            continue
        messages.append({"role": "user", "content": text})

        def emit(piece: str) -> None:
            out.write(piece)
            out.flush()

        answer = reply(model, tokenizer, messages, s, emit)
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": answer})
        replies += 1
    return replies


def stdin_lines(interactive: bool, prompt: str = "you> ") -> Iterable[str]:
    """Lines of stdin; on a terminal, with a prompt on stderr before each."""
    while True:
        if interactive:
            print(prompt, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line
