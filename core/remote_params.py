"""Settings for other machines: a remote (`RemoteParams`, in `Settings.remotes`) is another OpenAI-compatible
server (`kind: openai`) or another instance of this app (`kind: node`); its `api_key` is a secret like `api_keys`
(shown as `***`). `RpcServerParams` (`Settings.rpc_server`): this machine's llama.cpp RPC worker."""

from __future__ import annotations

import ipaddress
import re
import ssl
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

REDACTED = '***'
NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$')
RemoteKind = Literal['openai', 'node']
NODE_CHECK_S, OPENAI_CHECK_S = 5.0, 30.0
RPC_EXPOSED = (
    'an RPC worker on an interface other than loopback needs the app to require API keys: the RPC protocol has no '
    'authentication of its own'
)


class RemoteParams(BaseModel):
    model_config = ConfigDict(extra='forbid')

    name: str = Field(description='Short name: shown as the owner of its models and in the activity')
    url: str = Field(description='Base URL, e.g. http://10.0.0.5:8080 or https://api.example.com/v1')
    kind: RemoteKind = Field(
        'openai', description='openai: any OpenAI-compatible server; node: another Llama Async Proxy (its admin key)'
    )
    api_key: str | None = Field(None, description='Sent upstream as a bearer token; never shown back', repr=False)
    models: list[str] | None = Field(
        None, description="Its models; empty = read from its /v1/models (a node's: /api/models) and refreshed"
    )
    prefix: str | None = Field(None, description='Listed as prefix/model, e.g. "gpu-box"; empty = its own names')
    aliases: dict[str, str] = Field(default_factory=dict, description='More names: alias -> its model name')
    ca_file: str | None = Field(None, description='PEM file of the CA that signed its HTTPS certificate (self-signed)')
    connect_timeout: float = Field(5.0, gt=0, le=120, description='Seconds to connect before it counts as down')
    response_timeout: float = Field(
        600.0, gt=0, le=86400, description='Seconds it may take to start answering (prompt processing included)'
    )
    check_interval: float | None = Field(
        None, ge=0.2, le=3600, description='Seconds between checks and model refreshes; empty: 5 for a node, 30 else'
    )

    @field_validator('name')
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError('letters, digits, ".", "_" and "-" only (at most 64), starting with a letter or digit')
        return v

    @field_validator('url')
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v.strip())
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            raise ValueError('an http:// or https:// URL with a host, e.g. http://10.0.0.5:8080')
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError('no query, fragment or user:password in the URL (the key goes in api_key)')
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as e:
            raise ValueError(f'bad port: {e}') from None
        return v.strip().rstrip('/')

    @field_validator('api_key')
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v == REDACTED:
            raise ValueError(f'{REDACTED!r} stands for the key in an export; it cannot be the key itself')
        if v and not all(33 <= ord(c) < 127 for c in v):  # it goes in a header line as it is
            raise ValueError('letters, digits and punctuation only (no spaces, line breaks or other characters)')
        return v or None

    @field_validator('ca_file')
    @classmethod
    def _ca(cls, v: str | None) -> str | None:
        if not v:
            return None
        try:
            ssl.create_default_context(cafile=v)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f'cannot load it as a PEM certificate: {e}') from None
        return v

    @field_validator('prefix')
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        v = (v or '').strip().strip('/')
        if v and not NAME.match(v):
            raise ValueError('letters, digits, ".", "_" and "-" only')
        return v or None

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def interval(self) -> float:
        """A node's figures are shown live, so it is read more often than an OpenAI server's model list."""
        if self.check_interval is not None:
            return self.check_interval
        return NODE_CHECK_S if self.kind == 'node' else OPENAI_CHECK_S

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == 'https'

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ''

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == 'https' else 80)

    @property
    def root_path(self) -> str:
        """The path before `/v1` on that server: '' for http://h:8080 and http://h:8080/v1, '/openai' for
        https://h/openai/v1."""
        path = urlsplit(self.url).path.rstrip('/')
        return path[: -len('/v1')] if path.endswith('/v1') else path

    @property
    def base(self) -> str:
        """The URL without a trailing /v1: `base + '/v1/models'`, a node's `base + '/api/models'`."""
        return self.url[: -len('/v1')] if self.url.endswith('/v1') else self.url

    def listed_name(self, own: str) -> str:
        return f'{self.prefix}/{own}' if self.prefix else own


class RpcServerParams(BaseModel):
    model_config = ConfigDict(extra='forbid')

    enabled: bool = Field(False, description='Run an RPC worker, lending this machine to models loaded elsewhere')
    host: str = Field(
        '127.0.0.1',
        min_length=1,
        description='IPv4 address of the interface it binds (0.0.0.0: all); another than loopback needs api_keys',
    )
    port: int = Field(50052, ge=1, le=65535, description='Its TCP port')
    threads: int | None = Field(None, ge=1, description='CPU threads for its CPU device')
    devices: list[str] = Field(default_factory=list, description='Devices it lends (e.g. CUDA0); empty = all')
    cache: bool = Field(False, description='Cache tensors on local disk (rpc-server -c)')

    @field_validator('host')
    @classmethod
    def _ipv4(cls, host: str) -> str:
        # rpc-server binds with inet_addr(): a name (even localhost) or an IPv6 address fails to bind there.
        if host == 'localhost':
            return '127.0.0.1'
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError('an IPv4 address of this machine, e.g. 127.0.0.1 or 0.0.0.0 (no names)') from None

    def argv(self, binary: Path | str) -> list[str]:
        argv = [str(binary), '--host', self.host, '--port', str(self.port)]
        if self.threads:
            argv += ['--threads', str(self.threads)]
        if self.devices:
            argv += ['--device', ','.join(self.devices)]
        if self.cache:
            argv.append('--cache')
        return argv
