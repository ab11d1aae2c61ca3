"""The deployment files (issue 17, docs): no cluster or container daemon runs here, so the Kubernetes manifest is
checked against the Kubernetes schema (strict: an unknown field fails), and every part that the app reads is read
by the app's own code: the front's remotes, the keys, the probe path, the systemd unit's command line, the
Dockerfile's health check."""

from __future__ import annotations

import configparser
import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from core.settings import Settings
from main import parse_args

DEPLOY = Path(__file__).resolve().parent.parent / 'deploy'
MANIFEST = DEPLOY / 'k8s' / 'llama-async-proxy.yaml'
K8S_VERSION = '1.33.0'
PUBLIC_PROBE = '/api/health'  # the one API path that answers without a key (tests/test_perimeter.py)


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d['kind'] == kind]


def containers() -> list[dict[str, Any]]:
    return [
        c
        for d in documents()
        if d['kind'] in ('StatefulSet', 'Deployment')
        for c in d['spec']['template']['spec']['containers']
    ]


def test_every_document_is_valid_kubernetes() -> None:
    docs = documents()
    assert {d['kind'] for d in docs} >= {'StatefulSet', 'Deployment', 'Service', 'Secret'}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schema_check_catches_mistakes() -> None:
    node = copy.deepcopy(by_kind('StatefulSet')[0])
    node['spec']['replicas'] = 'two'
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(node, K8S_VERSION, strict=True)
    node = copy.deepcopy(by_kind('StatefulSet')[0])
    node['spec']['template']['spec']['containers'][0]['livenessprobe'] = {}  # a typo: unknown in strict mode
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(node, K8S_VERSION, strict=True)


def test_one_node_per_gpu_host_and_the_front_lists_each_by_its_dns_name() -> None:
    node = by_kind('StatefulSet')[0]
    spec = node['spec']['template']['spec']
    anti = spec['affinity']['podAntiAffinity']['requiredDuringSchedulingIgnoredDuringExecution'][0]
    assert anti['topologyKey'] == 'kubernetes.io/hostname'
    assert spec['containers'][0]['resources']['limits']['nvidia.com/gpu'] == 1
    secret = by_kind('Secret')[0]['stringData']
    settings = Settings(remotes=json.loads(secret['remotes.json']), api_keys=[secret['api-key']])  # the app's check
    namespace = node['metadata']['namespace']
    service = node['spec']['serviceName']
    expected = [
        f'http://{node["metadata"]["name"]}-{i}.{service}.{namespace}.svc.cluster.local:8080'
        for i in range(node['spec']['replicas'])
    ]
    assert [r.url for r in settings.remotes] == expected
    assert all(r.kind == 'node' and r.api_key == secret['api-key'] for r in settings.remotes)
    headless = next(s for s in by_kind('Service') if s['metadata']['name'] == service)
    assert headless['spec']['clusterIP'] == 'None'


def test_keys_come_from_the_secret_and_probes_ask_the_public_health_path() -> None:
    secret = by_kind('Secret')[0]
    for c in containers():
        env = {e['name']: e for e in c['env']}
        ref = env['LAP_API_KEYS']['valueFrom']['secretKeyRef']
        assert ref['name'] == secret['metadata']['name'] and ref['key'] in secret['stringData']
        port = c['ports'][0]['containerPort']
        assert port == 8080
        for probe in ('livenessProbe', 'readinessProbe'):
            assert c[probe]['httpGet']['path'] == PUBLIC_PROBE


def test_the_systemd_unit_runs_a_command_line_the_app_accepts() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / 'systemd' / 'llama-async-proxy.service')
    argv = shlex.split(unit['Service']['ExecStart'])
    assert argv[0].endswith('/llama-async-proxy')
    args = parse_args(argv[1:])
    assert args.host == '0.0.0.0' and args.port == 8080 and args.ssl_certfile and args.ssl_keyfile
    assert unit['Service']['EnvironmentFile']  # the key, without which a non-loopback bind is refused
    data = re.search(r'LAP_DATA_DIR=(\S+)', unit['Service']['Environment'])
    assert data is not None and str(args.config).startswith(data.group(1))  # writable under ProtectSystem=strict


def test_the_dockerfile_health_check_asks_the_public_health_path() -> None:
    text = (DEPLOY / 'Dockerfile').read_text()
    health = re.search(r'HEALTHCHECK .*?CMD (\[.*?\])\n', text, re.S)
    assert health is not None
    cmd = json.loads(health.group(1))
    assert f"127.0.0.1:8080{PUBLIC_PROBE}'" in cmd[-1]
    assert 'ARG CMAKE_ARGS="-DGGML_RPC=ON"' in text  # nodes can lend their devices over RPC
    assert 'LAP_HOST=0.0.0.0' in text and 'LAP_API_KEYS' in text  # and the run line says a key is needed
