"""The chat screen: a real tiny SFT run's model answers in the TUI as it does when called directly.

One finished run is made per module (about 20 s on CPU); Pilot drives the screen and the
reference reply is greedy ``generate`` on the same chat-template prompt, computed here.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from textual.widgets import Input

from tests.conftest import tiny_profile
from tests.test_train import check_completed_run, run_profile
from tests.test_tui_imports import heavy_after
from tests.test_tui_runs import RunsTestApp, build_fixture_workspace, wait_for
from tui.screens.chat import ChatScreen
from tui.screens.run_detail import RunDetailScreen

PROMPT = "what is xss"
NEW_TOKENS = 8
LOAD_TIMEOUT = 180.0  # other test processes share the two cores


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> tuple[Path, str, Path]:
    tmp = tmp_path_factory.mktemp("chat")
    profile = tiny_profile(tmp, "sft", data_rows=40,
                           training={"max_steps": 4, "eval_every": 4, "save_every": 4})
    ws, r = run_profile(tmp, profile)
    run, _ = check_completed_run(ws, r)
    return ws, run["id"], Path(run["run_dir"])


@pytest.fixture(scope="module")
def reference(sft_run) -> str:
    """Greedy reply of the run's model to PROMPT as the only user turn, decoded as text."""
    import torch

    from engine.run_model import load_run_model

    _, _, run_dir = sft_run
    model, tok, _ = load_run_model(run_dir, "fp32")
    enc = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    eos = [tok.eos_token_id]
    if "<|end|>" in tok.get_vocab():  # the end of a turn in zerotune's chat template
        eos.append(tok.convert_tokens_to_ids("<|end|>"))
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=eos)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


async def loaded(pilot, app) -> ChatScreen:
    screen = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen,
                            what="the chat screen")
    await wait_for(pilot, lambda: screen.model is not None or screen.error, LOAD_TIMEOUT,
                   what="the model to load")
    assert screen.error is None, screen.error
    return screen


async def send(pilot, screen: ChatScreen, text: str) -> None:
    box = screen.query_one("#chat-input", Input)
    assert not box.disabled and box.has_focus
    await pilot.press(*("space" if c == " " else c for c in text))
    assert box.value == text
    await pilot.press("enter")


async def replied(pilot, screen: ChatScreen) -> str:
    await wait_for(pilot, lambda: not screen.streaming, LOAD_TIMEOUT, what="the reply")
    role, text = screen.transcript[-1]
    assert role == "assistant"
    return text


@pytest.mark.asyncio
async def test_reply_streams_in_and_equals_greedy_generate(sft_run, reference) -> None:
    ws, run_id, _ = sft_run
    assert reference, "the tiny model's greedy reply is empty; pick another prompt"
    app = RunsTestApp(lambda: ChatScreen(ws, run_id, max_new_tokens=NEW_TOKENS))
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await loaded(pilot, app)
        assert run_id in str(screen.query_one("#chat-status").render())
        # Hold generation back to see the state while a reply is under way.
        screen._generating.acquire()
        try:
            await send(pilot, screen, PROMPT)
            await pilot.pause()
            assert screen.streaming and screen.query_one("#chat-input", Input).disabled
            assert screen.transcript == [("user", PROMPT), ("assistant", "")]
        finally:
            screen._generating.release()
        assert await replied(pilot, screen) == reference
        assert screen.messages[-1] == {"role": "assistant", "content": reference}
        assert not screen.query_one("#chat-input", Input).disabled
        # A second turn carries the first as context; ctrl+r clears it all.
        await send(pilot, screen, "and csrf")
        await replied(pilot, screen)
        assert [r for r, _ in screen.transcript] == ["user", "assistant"] * 2
        assert len(screen.messages) == 4
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert screen.transcript == [] and screen.messages == []
        # After a reset the same prompt gets the same answer as a fresh conversation.
        await send(pilot, screen, PROMPT)
        assert await replied(pilot, screen) == reference


@pytest.mark.asyncio
async def test_reset_while_a_reply_streams_drops_it(sft_run, reference) -> None:
    ws, run_id, _ = sft_run
    app = RunsTestApp(lambda: ChatScreen(ws, run_id, max_new_tokens=NEW_TOKENS))
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await loaded(pilot, app)
        screen._generating.acquire()
        try:
            await send(pilot, screen, "hello")
            await pilot.pause()
            assert screen.streaming
            await pilot.press("ctrl+r")
            await pilot.pause()
            assert screen.transcript == [] and not screen.streaming
            assert not screen.query_one("#chat-input", Input).disabled
        finally:
            screen._generating.release()
        # The stopped reply's tokens never reach the new conversation.
        await wait_for(pilot, lambda: not [w for w in screen.workers if not w.is_finished],
                       LOAD_TIMEOUT, what="the stopped reply to end")
        await pilot.pause()
        assert screen.transcript == [] and screen.messages == []
        await send(pilot, screen, PROMPT)
        assert await replied(pilot, screen) == reference
        assert screen.transcript == [("user", PROMPT), ("assistant", reference)]


@pytest.mark.asyncio
async def test_detail_t_opens_the_chat_and_escape_comes_back(sft_run, reference) -> None:
    ws, run_id, _ = sft_run
    app = RunsTestApp(lambda: RunDetailScreen(ws, run_id))
    async with app.run_test(size=(120, 40)) as pilot:
        detail = await wait_for(pilot, lambda: isinstance(app.screen, RunDetailScreen)
                                and app.screen.loads and app.screen)
        assert detail.detail.has_model
        await pilot.press("t")
        screen = await loaded(pilot, app)
        assert screen.run_id == run_id
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is detail, what="back to the detail")


@pytest.mark.asyncio
async def test_a_run_without_a_model_says_so(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ids = build_fixture_workspace(ws)  # recorded runs, none of which left a model
    app = RunsTestApp(lambda: RunDetailScreen(ws, ids["failed"]))
    async with app.run_test(size=(120, 40)) as pilot:
        detail = await wait_for(pilot, lambda: isinstance(app.screen, RunDetailScreen)
                                and app.screen.loads and app.screen)
        assert not detail.detail.has_model
        assert detail.check_action("chat", ()) is False  # no Chat key in the footer
        await pilot.press("t")
        await pilot.pause()
        assert app.screen is detail
        # Opened directly, the chat screen explains instead of loading anything.
        app.push_screen(ChatScreen(ws, ids["failed"]))
        screen = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen)
                                and app.screen.error and app.screen)
        assert "has no model to chat with" in screen.error and "failed" in screen.error
        assert "run has no final model" in screen.error
        assert screen.query_one("#chat-input", Input).disabled
        status = str(screen.query_one("#chat-status").render())
        assert "has no model to chat with" in status
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is detail, what="back to the detail")
        # An unknown run id is a message too.
        app.push_screen(ChatScreen(ws, "nosuchrun"))
        screen = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen)
                                and app.screen.error and app.screen)
        assert "nosuchrun" in screen.error


@pytest.mark.asyncio
async def test_a_model_that_fails_to_load_says_so(tmp_path: Path, sft_run) -> None:
    import shutil

    ws, run_id, run_dir = sft_run
    # A copy of the run whose weights are corrupt: the same history row points elsewhere.
    broken = tmp_path / "broken-run"
    shutil.copytree(run_dir, broken)
    for f in (broken / "model").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    screen = ChatScreen(ws, run_id)
    screen._run_dir = lambda: (broken, "completed")  # type: ignore[method-assign]
    app = RunsTestApp(lambda: screen)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: screen.error, LOAD_TIMEOUT, what="the load to fail")
        assert screen.error.startswith(f"the model of run {run_id} failed to load")
        assert screen.model is None and screen.query_one("#chat-input", Input).disabled


def test_importing_the_chat_screen_loads_nothing_heavy() -> None:
    assert heavy_after("import tui.screens.chat") == []


def test_stop_ends_a_reply_early(sft_run) -> None:
    """engine.chat.reply stops after the current token once ``stop`` is set."""
    from engine.chat import ChatSettings, load_chat_model, reply

    _, _, run_dir = sft_run
    model, tok, _, settings = load_chat_model(run_dir, ChatSettings(max_new_tokens=NEW_TOKENS))
    stop = threading.Event()
    stop.set()
    pieces: list[str] = []
    text = reply(model, tok, [{"role": "user", "content": PROMPT}], settings, pieces.append,
                 stop=stop)
    assert text == "".join(pieces).strip()
    ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
    assert len(ids) <= 2  # one generated token (text may re-tokenize a little differently)




def test_a_newer_partial_reply_replaces_a_queued_older_one() -> None:
    older, newer = ChatScreen.TokenArrived(3, "Cross"), ChatScreen.TokenArrived(3, "Cross-site")
    assert older.can_replace(newer)
    assert not older.can_replace(ChatScreen.TokenArrived(4, "A"))
    assert not older.can_replace(ChatScreen.ReplyDone(3, "Cross-site", 0.1))
