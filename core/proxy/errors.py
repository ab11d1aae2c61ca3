"""The one error shape every proxy answer uses: `{"error": {"message", "type", "code"}}`."""

from __future__ import annotations

import json
from typing import Any


class ProxyError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code if code is not None else status
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return {'error': {'message': self.message, 'type': self.type, 'code': self.code}}

    def body(self) -> bytes:
        return json.dumps(self.payload()).encode()


def bad_request(message: str, code: str = 'invalid_request') -> ProxyError:
    return ProxyError(400, message, 'invalid_request_error', code)


def not_found(message: str, code: str = 'model_not_found') -> ProxyError:
    return ProxyError(404, message, 'invalid_request_error', code)


def unavailable(message: str, code: str = 'model_unavailable') -> ProxyError:
    return ProxyError(503, message, 'unavailable_error', code)


def bad_gateway(message: str, code: str = 'upstream_error') -> ProxyError:
    return ProxyError(502, message, 'upstream_error', code)
