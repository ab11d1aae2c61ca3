"""One transcript entry of the chat playground, drawn from the plain dict the page keeps in tab storage."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from nicegui import context, ui
from nicegui.elements.markdown import prepare_content

from ui.layout import notify

EXTRAS = ['fenced-code-blocks', 'tables']  # fenced blocks get NiceGUI's codehilite (pygments) colours

# Entry statuses (kept as text: entries live in `app.storage.tab` as JSON).
STREAMING, DONE, STOPPED, ERROR = 'streaming', 'done', 'stopped', 'error'


def new_entry(role: str, content: str = '', model: str | None = None) -> dict[str, Any]:
    return {
        'id': uuid.uuid4().hex,
        'role': role,
        'content': content,
        'reasoning': '',
        'model': model,
        'status': STREAMING if role == 'assistant' else DONE,
        'error': None,
        'stats': '',
    }


class ChatMessage:
    """A bubble (reasoning collapsed above the answer, an error or "stopped" line) and, below it, the reply's
    figures and a Copy button. `render()` redraws from `entry`, changing only what changed, so a streaming
    reply can call it often."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry
        user = entry['role'] == 'user'
        with ui.column().classes('w-full gap-0 ' + ('items-end' if user else 'items-start')) as self.root:
            name = 'You' if user else (entry.get('model') or 'Assistant')
            self.bubble = ui.chat_message(name=name, sent=user).classes('max-w-full')
            # One child: Quasar draws each child of a chat message as a bubble of its own.
            with self.bubble, ui.column().classes('gap-1 min-w-0'):
                if user:
                    ui.label(entry['content']).classes('whitespace-pre-wrap break-words')
                else:
                    self.bubble.mark('chat-reply')
                    self.reasoning = ui.expansion('Reasoning', icon='psychology', value=False)
                    self.reasoning.classes('w-full text-sm lap-muted').props('dense').mark('chat-reasoning')
                    with self.reasoning:
                        self.reasoning_text = ui.markdown(extras=EXTRAS)
                    self.body = ui.markdown(extras=EXTRAS).classes('w-full overflow-x-auto')
                    with ui.row().classes('items-center gap-1 text-red-600') as self.error:
                        ui.icon('error_outline')
                        self.error_text = ui.label().classes('whitespace-pre-wrap break-words').mark('chat-error')
                    with ui.row().classes('items-center gap-1 lap-muted text-sm') as self.stopped:
                        ui.icon('stop_circle')
                        ui.label('Stopped').mark('chat-stopped')
            with ui.row().classes('items-center gap-1 px-2'):
                if not user:  # the reply's figures: its usage and timings, or what the page measured
                    self.stats = ui.label().classes('text-xs lap-muted').mark('chat-stats')
                ui.button(icon='content_copy', on_click=self.copy).props(
                    'flat dense round size=sm aria-label="Copy message"'
                ).tooltip('Copy').mark('chat-copy')
        if not user:
            self.render()

    @staticmethod
    async def prerender(*texts: str) -> float:
        """Render the markdown in a thread, into NiceGUI's cache, so that `render()` on the loop finds it done: a
        long reply takes tens of ms to render, every redraw. Returns the seconds it took."""
        t0 = time.perf_counter()
        extras = ' '.join(EXTRAS)
        for text in texts:
            if text:
                await asyncio.to_thread(prepare_content, text, extras)
        return time.perf_counter() - t0

    def render(self) -> None:
        e = self.entry
        if e['role'] == 'user' or self.root.is_deleted:  # a reply stopped by New chat ends after its bubble went
            return
        reasoning, content, status = e.get('reasoning') or '', e.get('content') or '', e.get('status')
        self.reasoning.set_visibility(bool(reasoning))
        if reasoning and self.reasoning_text.content != reasoning:
            self.reasoning_text.set_content(reasoning)
        if status == STREAMING and not content:
            content = '*thinking…*' if reasoning else '…'
        if self.body.content != content:
            self.body.set_content(content)
        self.body.set_visibility(bool(content))
        self.error.set_visibility(status == ERROR)
        if status == ERROR:
            self.error_text.set_text(e.get('error') or 'failed')
        self.stopped.set_visibility(status == STOPPED)
        if self.stats.text != (e.get('stats') or ''):
            self.stats.set_text(e.get('stats') or '')

    def copy(self) -> None:
        ui.clipboard.write(self.entry.get('content') or '')
        notify(context.client, 'Copied', type='positive', timeout=1000)
