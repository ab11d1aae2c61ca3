"""Small facts about addresses, shared by the settings and the services that bind or connect."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    if host in ('localhost', 'localhost.localdomain'):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
