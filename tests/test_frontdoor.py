"""The front door on a plain FastAPI app: routes taken before the app, guards in front of everything."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from core.frontdoor import FrontDoor, Receive, Scope, Send


def answer(text: bytes, status: int = 200) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({'type': 'http.response.start', 'status': status, 'headers': [(b'content-type', b'text/plain')]})
        await send({'type': 'http.response.body', 'body': text})

    return app


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get('/page')
    def page() -> dict[str, bool]:
        return {'page': True}

    return app


async def get(app: FastAPI, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url='http://test') as c:
        return await c.get(path)


async def test_routes_and_guards() -> None:
    app, door = make_app(), FrontDoor()
    door.route('/v1/', answer(b'proxy'), prefix=True)
    door.guard(lambda scope: answer(b'no', 403) if scope['path'].endswith('/secret') else None)
    door.install(app)
    assert (await get(app, '/v1/chat/completions')).text == 'proxy'
    assert (await get(app, '/page')).json() == {'page': True}  # everything else: the app as before
    assert (await get(app, '/v1/secret')).status_code == 403  # guards cover routed requests
    assert (await get(app, '/page/secret')).status_code == 403  # and the app's own


async def test_a_second_install_replaces_the_door() -> None:
    # NiceGUI's test plugin builds a new system around the same app object for every test.
    app, first, second = make_app(), FrontDoor(), FrontDoor()
    first.route('/v1/', answer(b'first'), prefix=True)
    first.guard(lambda scope: answer(b'locked', 401))
    first.install(app)
    assert (await get(app, '/page')).status_code == 401
    second.route('/v1/', answer(b'second'), prefix=True)
    second.install(app)
    assert (await get(app, '/v1/models')).text == 'second'
    assert (await get(app, '/page')).json() == {'page': True}  # the first door's guard is gone
