"""Chat playground: pick a model (loaded on demand, with its progress), send messages through the proxy's own path
and watch the reply stream in with live figures; Stop cancels the generation upstream.

The transcript, the model and the settings live in `app.storage.tab[STORE_KEY]` (per browser tab, kept across
reloads and navigation) as plain JSON, and the page redraws from it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nicegui import app, background_tasks, context, ui

from core.playground import ChatTurn, chat_stream
from core.supervisor import ModelState
from core.supervisor.errors import SupervisorError
from ui.components.chat_message import DONE, ERROR, STOPPED, STREAMING, ChatMessage, new_entry
from ui.format import ms, rate
from ui.layout import empty, live, notify, page

if TYPE_CHECKING:
    from core.system import System

log = logging.getLogger(__name__)

STORE_KEY = 'chat'
DEFAULT_SETTINGS: dict[str, Any] = {'system': '', 'temperature': 0.8, 'top_p': 0.95, 'max_tokens': 1024}
BOUNDS: dict[str, tuple[float, float]] = {'temperature': (0, 2), 'top_p': (0, 1), 'max_tokens': (1, 131072)}
DRAW_EVERY_S = 0.1  # markdown is rendered on the server: redraw a fast stream ~10x a second, not per token
SAVE_EVERY_S = 1.0  # a reload mid-stream keeps what had arrived up to a second before
STATE_WORDS = {
    ModelState.READY: 'ready',
    ModelState.STOPPED: 'stopped',
    ModelState.STARTING: 'starting…',
    ModelState.RESTARTING: 'restarting…',
    ModelState.STOPPING: 'stopping…',
    ModelState.FAILED: 'failed',
}
LOADING = (ModelState.STARTING, ModelState.RESTARTING)


def register(system: System) -> None:
    @page(system, '/chat', 'Chat')
    async def chat() -> None:
        await ChatPage(system).build()


def context_messages(entries: list[dict[str, Any]], system_prompt: str) -> list[dict[str, str]]:
    """The conversation as the model sees it: an exchange whose reply failed (or is empty) is left out, a stopped
    reply counts with what it had said."""
    out = [{'role': 'system', 'content': system_prompt}] if system_prompt.strip() else []
    asked: dict[str, Any] | None = None
    for entry in entries:
        if entry['role'] == 'user':
            asked = entry
        elif asked is not None and entry['status'] in (DONE, STOPPED) and entry.get('content'):
            out += [{'role': 'user', 'content': asked['content']}, {'role': 'assistant', 'content': entry['content']}]
            asked = None
        else:
            asked = None
    return out


def live_figures(turn: ChatTurn, sent_at: float, now: float) -> str:
    """TTFT from the request to the first content or reasoning token; speed over the tokens since then."""
    if turn.first_token_at is None:
        return f'waiting for the first token… {ms(now - sent_at)}'
    speed = (turn.tokens - 1) / (now - turn.first_token_at) if turn.tokens > 1 and now > turn.first_token_at else None
    return f'TTFT {ms(turn.first_token_at - sent_at)} · {rate(speed)} · {turn.tokens} tokens'


def final_figures(turn: ChatTurn | None, sent_at: float | None, now: float, status: str) -> str:
    """The reply's own figures (usage, timings) when it completed; what was measured here when it was stopped."""
    if turn is None:
        return 'stopped before the request was sent' if status == STOPPED else ''
    parts = ['stopped'] if status == STOPPED else ([f'finish: {turn.finish_reason}'] if turn.finish_reason else [])
    if turn.usage:
        parts.append(
            f'{turn.usage.get("prompt_tokens")} prompt / {turn.usage.get("completion_tokens")} completion tokens'
        )
    elif turn.tokens:
        parts.append(f'{turn.tokens} tokens')
    if sent_at is not None and turn.first_token_at is not None:
        parts.append(f'TTFT {ms(turn.first_token_at - sent_at)}')
    t = turn.timings
    if t.get('predicted_per_second'):
        parts.append(f'{rate(t["predicted_per_second"])} generation')
    elif turn.first_token_at is not None and turn.tokens > 1 and now > turn.first_token_at:
        parts.append(rate((turn.tokens - 1) / (now - turn.first_token_at)))
    if t.get('prompt_ms') is not None:
        parts.append(f'{t["prompt_ms"]:.0f} ms prompt')
    return ' · '.join(parts)


class ChatPage:
    def __init__(self, system: System) -> None:
        self.system = system
        self.client = context.client
        self.model: str | None = None
        self.settings = dict(DEFAULT_SETTINGS)
        self.messages: list[dict[str, Any]] = []
        self.store: Any = None  # app.storage.tab, once the socket is connected
        self.task: asyncio.Task[None] | None = None
        self.quiet = False  # values set by the page itself, not picked by the user
        self.saved_at = 0.0

    # ---- building ------------------------------------------------------------------------------------------
    async def build(self) -> None:
        with ui.element('div').classes('w-full grid grid-cols-1 lg:grid-cols-[minmax(0,1fr)_320px] gap-4'):
            with ui.column().classes('w-full gap-3 min-w-0'):
                self._conversation()
            with ui.card().classes('w-full gap-2 self-start'):
                self._settings()
        # Until the tab's stored state is drawn, an edit would be overwritten by it.
        for element in (self.input, self.send_button, self.system_prompt, *self.numbers.values()):
            element.disable()
        self.refresh_models()
        live(self.system, ['models'], self.refresh_models, every_ms=200)  # states, and files a rescan finds
        self.client.on_delete(self.abandon)
        try:
            await self.client.connected(timeout=30)
        except TimeoutError:
            return
        self.store = app.storage.tab  # only once connected: it is keyed by the browser tab
        self.restore()
        for element in (self.input, self.send_button, self.system_prompt, *self.numbers.values()):
            element.enable()

    def _conversation(self) -> None:
        with ui.row().classes('items-center gap-3 w-full'):
            self.picker = ui.select({}, label='Model', on_change=self.on_pick).classes('min-w-[260px] flex-grow')
            self.picker.mark('chat-model')
            ui.button('New chat', icon='add_comment', on_click=self.new_chat).props('outline').mark('chat-new')
        with ui.row().classes('w-full items-center gap-3 no-wrap') as self.load_row:
            self.load_label = ui.label().classes('text-sm lap-muted whitespace-nowrap')
            self.load_bar = ui.linear_progress(value=0, show_value=False).classes('flex-grow').mark('chat-load')
        self.no_models = empty('No chat-capable model found (a chat model has a chat template in its GGUF).')
        self.transcript = ui.column().classes('w-full gap-3').mark('chat-transcript')
        self.live_stats = ui.label().classes('text-xs lap-muted').mark('chat-live-stats')
        with ui.row().classes('w-full items-end gap-2 no-wrap'):
            self.input = ui.textarea(placeholder='Message').props('autogrow outlined dense').classes('flex-grow')
            self.input.mark('chat-input')
            # `exact` first: with Shift held it ends the modifier chain before `prevent`, so a newline goes in.
            self.input.on('keydown.enter.exact.prevent', self.send)
            self.send_button = ui.button('Send', icon='send', on_click=self.send).mark('chat-send')
            self.stop_button = ui.button('Stop', icon='stop', color='negative', on_click=self.stop).mark('chat-stop')
            self.stop_button.set_visibility(False)
        ui.label('Enter sends · Shift+Enter adds a line').classes('text-xs lap-muted')

    def _settings(self) -> None:
        ui.label('Settings').classes('font-semibold')
        self.system_prompt = ui.textarea('System prompt', on_change=self.on_settings).props('autogrow outlined')
        self.system_prompt.classes('w-full').mark('chat-system')
        self.numbers: dict[str, ui.number] = {}
        for key, label, step, precision in (
            ('temperature', 'Temperature', 0.05, 2),
            ('top_p', 'Top P', 0.05, 2),
            ('max_tokens', 'Max tokens', 1, 0),
        ):
            low, high = BOUNDS[key]
            number = ui.number(
                label,
                min=low,
                max=high,
                step=step,
                precision=precision,
                validation={f'{low:g} to {high:g}': _within(low, high)},
                on_change=self.on_settings,
            )
            self.numbers[key] = number.props('outlined dense').classes('w-full').mark(f'chat-{key.replace("_", "-")}')
        ui.label('Empty: the model’s own default.').classes('text-xs lap-muted')

    # ---- state ---------------------------------------------------------------------------------------------
    def restore(self) -> None:
        state = json.loads(json.dumps(self.store.get(STORE_KEY) or {}))  # plain copies, not storage's observables
        self.settings = {**DEFAULT_SETTINGS, **(state.get('settings') or {})}
        self.model = state.get('model') or self.model
        self.messages = list(state.get('messages') or [])
        for entry in self.messages:
            if entry.get('status') == STREAMING:  # its page went away mid-reply, which stopped it
                entry['status'] = STOPPED
        with self.silent():
            self.system_prompt.set_value(self.settings['system'])
            for key, number in self.numbers.items():
                number.value = self.settings.get(key)
            if self.model in self.picker.options:
                self.picker.set_value(self.model)
        with self.transcript:
            for entry in self.messages:
                ChatMessage(entry)

    def save(self) -> None:
        if self.store is None:
            return
        self.saved_at = time.monotonic()
        if self.client.is_deleted:
            # A reply ending after its tab moved on: a newer page may own the transcript now, so only our
            # entries are updated in it.
            ours = {m.get('id'): m for m in self.messages}
            state = json.loads(json.dumps(self.store.get(STORE_KEY) or {}))
            if state.get('messages'):
                state['messages'] = [dict(ours.get(m.get('id')) or m) for m in state['messages']]
                self.store[STORE_KEY] = state
            return
        self.store[STORE_KEY] = {
            'model': self.model,
            'settings': dict(self.settings),
            'messages': [dict(m) for m in self.messages],
        }

    def silent(self) -> _Silent:
        return _Silent(self)

    # ---- models --------------------------------------------------------------------------------------------
    def refresh_models(self) -> None:
        """Each chat-capable, usable model with its state; the load bar for the chosen one while it starts."""
        scheduler = self.system.scheduler
        entries = [e for e in self.system.library.models() if not e.error and 'chat' in e.capabilities]
        status = {e.id: scheduler.describe(e.id) for e in entries}
        options = {mid: f'{mid} · {STATE_WORDS.get(d["status"], d["status"])}' for mid, d in status.items()}
        if options != self.picker.options:
            value = next((v for v in (self.picker.value, self.model) if v in options), next(iter(options), None))
            with self.silent():
                self.picker.set_options(options, value=value)
            self.model = value
        self.no_models.set_visibility(not options)
        chosen = status.get(self.picker.value) if self.picker.value else None
        loading = chosen is not None and chosen['status'] in LOADING
        self.load_row.set_visibility(loading)
        if chosen is not None and loading:
            progress = chosen.get('progress')
            self.load_label.set_text(f'Loading {self.picker.value}…')
            if isinstance(progress, (int, float)):
                self.load_label.set_text(f'Loading {self.picker.value}… {progress:.0%}')
                self.load_bar.props(remove='indeterminate')
                self.load_bar.set_value(float(progress))
            else:
                self.load_bar.props('indeterminate')

    def on_pick(self) -> None:
        if self.quiet or not self.picker.value:
            return
        self.model = self.picker.value
        self.save()
        if self.system.scheduler.describe(self.model)['status'] in (ModelState.STOPPED, ModelState.FAILED):
            background_tasks.create(self.load(self.model), name=f'chat load {self.model}')

    async def load(self, model: str) -> None:
        try:
            await self.system.scheduler.load(model)
        except SupervisorError as e:
            notify(self.client, f'{model} failed to load: {e.message}', type='negative', multi_line=True)
        else:
            notify(self.client, f'{model} is ready', type='positive')

    def on_settings(self) -> None:
        if self.quiet:
            return
        self.settings['system'] = self.system_prompt.value or ''
        for key, number in self.numbers.items():
            self.settings[key] = number.value
        self.save()

    def request_params(self) -> dict[str, Any]:
        """The sampling settings as typed; an empty field leaves the model's default."""
        params: dict[str, Any] = {}
        for key in BOUNDS:
            value = self.settings.get(key)
            if isinstance(value, (int, float)):
                params[key] = int(value) if key == 'max_tokens' else float(value)
        return params

    def out_of_range(self) -> list[str]:
        """Settings outside their bounds: sent as they are they would be refused or changed, so nothing is sent."""
        bad = []
        for key, (low, high) in BOUNDS.items():
            value = self.settings.get(key)
            if isinstance(value, (int, float)) and not low <= value <= high:
                bad.append(f'{key.replace("_", " ")} must be {low:g} to {high:g}')
        return bad

    # ---- sending -------------------------------------------------------------------------------------------
    @property
    def streaming(self) -> bool:
        return self.task is not None and not self.task.done()

    def send(self) -> None:
        text = (self.input.value or '').strip()
        if self.streaming or not text:
            return
        model = self.picker.value
        if not model:
            notify(self.client, 'Pick a model first', type='warning')
            return
        if bad := self.out_of_range():
            notify(self.client, f'Not sent: {"; ".join(bad)}', type='warning')
            return
        messages = [*context_messages(self.messages, self.settings['system']), {'role': 'user', 'content': text}]
        asked, reply = new_entry('user', text), new_entry('assistant', model=model)
        self.messages += [asked, reply]
        self.input.set_value('')
        with self.transcript:
            ChatMessage(asked)
            view = ChatMessage(reply)
        self.save()
        self.live_stats.set_text('')
        self.busy(True)
        body = {'model': model, 'messages': messages, **self.request_params()}
        self.task = background_tasks.create(self.reply(view, body), name='chat reply')

    def stop(self) -> None:
        if self.streaming:
            assert self.task is not None
            self.task.cancel()  # the stream's iterator closes, which disconnects the request: llama-server stops

    def abandon(self) -> None:
        self.stop()  # the tab is gone: no one reads the rest of the reply

    def busy(self, on: bool) -> None:
        self.send_button.set_visibility(not on)
        self.stop_button.set_visibility(on)

    async def reply(self, view: ChatMessage, body: dict[str, Any]) -> None:
        entry, model = view.entry, body['model']
        turn: ChatTurn | None = None
        sent_at: float | None = None
        outcome = DONE
        try:
            if self.system.scheduler.describe(model)['status'] != ModelState.READY:
                entry['stats'] = f'loading {model}…'
                view.render()
                try:
                    await self.system.scheduler.load(model)  # the bar follows it through `models` events
                except SupervisorError as e:
                    entry['error'] = f'{model} failed to load: {e.message}'
                    outcome = ERROR
                    return
                entry['stats'] = ''
            sent_at = time.perf_counter()
            drawn = 0.0
            async for turn in chat_stream(self.system.proxy.handle_v1, body):
                now = time.perf_counter()
                if now >= drawn:
                    took = await view.prerender(turn.content, turn.reasoning)
                    drawn = now + max(DRAW_EVERY_S, 4 * took)  # a long reply redraws less often, not slower
                    self.show(view, turn, sent_at, time.perf_counter())
            if turn is not None and turn.error:
                entry['error'], outcome = turn.error, ERROR
            elif turn is None:
                entry['error'], outcome = 'no answer', ERROR
        except asyncio.CancelledError:
            outcome = STOPPED  # Stop (or the tab went away): our own task, so the cancel ends here
        except Exception as e:
            log.exception('chat reply failed')
            entry['error'], outcome = f'{type(e).__name__}: {e}', ERROR
        finally:
            self.finish(view, turn, sent_at, outcome)

    def show(self, view: ChatMessage, turn: ChatTurn, sent_at: float, now: float) -> None:
        view.entry['content'], view.entry['reasoning'] = turn.content, turn.reasoning
        view.render()
        self.live_stats.set_text(live_figures(turn, sent_at, now))
        if time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            self.save()

    def finish(self, view: ChatMessage, turn: ChatTurn | None, sent_at: float | None, outcome: str) -> None:
        entry = view.entry
        now = time.perf_counter()
        if turn is not None:
            entry['content'], entry['reasoning'] = turn.content, turn.reasoning
        entry['status'] = outcome
        entry['stats'] = '' if outcome == ERROR and turn is None else final_figures(turn, sent_at, now, outcome)
        view.render()
        self.live_stats.set_text('')  # the reply's own figures are under it now
        self.busy(False)
        self.save()
        if outcome == ERROR:
            notify(self.client, f'Chat failed: {entry["error"]}', type='negative', multi_line=True)

    def new_chat(self) -> None:
        self.stop()
        self.messages = []
        self.transcript.clear()
        self.live_stats.set_text('')
        self.save()


def _within(low: float, high: float) -> Callable[[float | None], bool]:
    return lambda value: value is None or low <= value <= high


class _Silent:
    """`with page.silent():` values the page sets itself do not count as the user's picks or edits."""

    def __init__(self, owner: ChatPage) -> None:
        self.owner = owner

    def __enter__(self) -> None:
        self.owner.quiet = True

    def __exit__(self, *exc: object) -> None:
        self.owner.quiet = False
