"""Chat playground: pick a model, send messages through the proxy's own path and watch the reply stream in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import ui

from core.playground import chat_stream
from ui.layout import page

if TYPE_CHECKING:
    from core.system import System


def register(system: System) -> None:
    @page(system, '/chat', 'Chat')
    def chat() -> None:
        models = [e.id for e in system.library.models() if not e.error and 'chat' in e.capabilities]
        if not models:
            ui.label('No chat-capable model found (a chat model has a chat template in its GGUF).').classes(
                'text-gray-600'
            )
            return
        history: list[dict[str, Any]] = []
        with ui.row().classes('items-center gap-4 w-full'):
            model = ui.select(models, value=models[0], label='Model').classes('min-w-[260px]').mark('chat-model')
            max_tokens = ui.number('Max tokens', value=256, min=1, max=32768).classes('w-32')
            temperature = ui.number('Temperature', value=0.8, min=0, max=2, step=0.1).classes('w-32')
            ui.button('New chat', on_click=lambda: (history.clear(), transcript.clear())).props('outline')
        transcript = ui.column().classes('w-full gap-2')
        stats = ui.label().classes('text-xs text-gray-500').mark('chat-stats')
        with ui.row().classes('w-full items-end gap-2'):
            prompt = ui.textarea(placeholder='Message').props('autogrow').classes('flex-grow').mark('chat-input')
            send = ui.button('Send', icon='send').mark('chat-send')

        async def on_send() -> None:
            text = (prompt.value or '').strip()
            if not text:
                return
            prompt.value = ''
            history.append({'role': 'user', 'content': text})
            with transcript:
                ui.chat_message(text, name='You', sent=True)
                reply = ui.chat_message(name=model.value, text_html=False).mark('chat-reply')
                with reply:
                    body = ui.markdown('…')
            send.disable()
            body_params = {
                'model': model.value,
                'messages': history,
                'max_tokens': int(max_tokens.value or 256),
                'temperature': float(temperature.value or 0),
            }
            turn = None
            try:
                async for turn in chat_stream(system.proxy.handle_v1, body_params):
                    body.set_content(turn.content or ('*thinking…*' if turn.reasoning else '…'))
            finally:
                send.enable()
            if turn is None:
                return
            if turn.error:
                body.set_content(f'**Error:** {turn.error}')
                history.pop()
                return
            history.append({'role': 'assistant', 'content': turn.content})
            t = turn.timings
            parts = [f'finish: {turn.finish_reason}'] if turn.finish_reason else []
            if turn.usage:
                parts.append(
                    f'{turn.usage.get("prompt_tokens")} prompt / {turn.usage.get("completion_tokens")} '
                    'completion tokens'
                )
            if t.get('predicted_per_second'):
                parts.append(f'{t["predicted_per_second"]:.1f} tok/s generation')
            if t.get('prompt_ms') is not None:
                parts.append(f'{t["prompt_ms"]:.0f} ms prompt')
            stats.set_text(' · '.join(parts))

        send.on_click(on_send)
