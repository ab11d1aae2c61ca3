"""The UI asks for the API key once per browser when api_keys is set."""

from __future__ import annotations

import pytest
from nicegui.testing import User

KEY = 'ui-key-1'


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('LAP_API_KEYS', KEY)


async def test_pages_redirect_to_login_until_a_valid_key(keyed: None, user: User) -> None:
    await user.open('/settings')
    await user.should_see('API key')
    await user.should_not_see('Settings')
    user.find('api-key').type('wrong')
    user.find('sign-in').click()
    await user.should_see('not one of the configured api_keys')
    # (NiceGUI's simulated browser keeps no session cookie between pages, so the remembered key is not
    # checked here.)


async def test_no_login_without_keys(user: User) -> None:
    await user.open('/')
    await user.should_see('Dashboard')
    await user.should_not_see('API key')
