"""The memory-fit estimate against what the real llama-server reports in its load log, and its labels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.library.fit import estimate
from core.library.gguf_header import read_header
from core.library.meta import FileInfo, ModelMeta, summarise
from core.model_params import ModelParams
from tests.conftest import start_llama_server, stop_process
from tests.gguf_factory import write_tiny_gguf

MIB = 1024 * 1024


def _meta(path: Path) -> ModelMeta:
    info = FileInfo.from_header(read_header(path))
    return summarise(info.kv, info.tensors)


def _load_log(binary, model: Path, *args: str) -> str:
    server = start_llama_server(binary, model, '-lv', '4', *args)
    try:
        server.proc.terminate()
        assert server.proc.stdout is not None
        return server.proc.stdout.read()
    finally:
        stop_process(server.proc)


def _mib_sum(pattern: str, log: str) -> float:
    values = [float(v) for v in re.findall(pattern, log)]
    assert values, f'{pattern!r} not in the llama-server log:\n{log[-3000:]}'
    return sum(values)


@pytest.mark.parametrize(
    ('quant', 'ctx', 'extra', 'params'),
    [
        ('f32', 2048, (), ModelParams(ctx_size=2048)),
        # --no-repack: on an AMX CPU llama-server puts q8_0 weights in its AMX buffer, and this build dies there at
        # warm-up (SIGILL here, SIGSEGV on CI, with or without -ub/-np). The estimate models plain CPU buffers.
        (
            'q8_0',
            4096,
            ('-ub', '256', '-np', '2', '--no-repack'),
            ModelParams(ctx_size=4096, ubatch_size=256, parallel=2),
        ),
    ],
)
def test_estimate_matches_llama_server_load_log(llama_binary, tmp_path: Path, quant, ctx, extra, params):
    model = write_tiny_gguf(tmp_path / f'fit-{quant}.gguf', quant=quant, vocab_size=1024, n_layer=3)
    log = _load_log(llama_binary, model, '-c', str(ctx), *extra)
    est = estimate(_meta(model), params, ram_free=64 * 1024 * MIB, vram_free=None)

    model_mib = _mib_sum(r'model buffer size =\s+([\d.]+) MiB', log)
    assert est.weights_bytes / MIB == pytest.approx(model_mib, abs=0.006)  # the log rounds to 0.01 MiB
    kv_mib = _mib_sum(r'llama_kv_cache: size =\s+([\d.]+) MiB', log)
    assert est.kv_bytes / MIB == pytest.approx(kv_mib, abs=0.006)
    assert re.search(rf'llama_context: n_ctx\s+=\s+{ctx}\b', log) and est.ctx_size == ctx
    compute_mib = _mib_sum(r'compute buffer size =\s+([\d.]+) MiB', log)
    assert est.compute_bytes / MIB == pytest.approx(compute_mib, rel=0.15)  # an allowance, not exact
    assert est.label == 'fits' and est.n_gpu_layers == 0 and est.vram_needed_bytes == 0
    assert est.ram_needed_bytes == est.weights_bytes + est.kv_bytes + est.compute_bytes


def test_kv_cache_formula_and_defaults(tmp_path: Path):
    meta = _meta(write_tiny_gguf(tmp_path / 'm.gguf', n_layer=2, n_embd=64, n_head=4, n_head_kv=2, ctx=2048))
    base = estimate(meta, None, ram_free=10**12)
    assert base.ctx_size == 2048  # unset / 0 = the model's training context, as llama-server does
    assert base.kv_bytes == 2 * 2 * 2048 * 2 * (64 // 4) * 2  # 2 x n_layer x ctx x n_head_kv x head_dim x f16
    q8 = estimate(meta, {'ctx_size': 1000, 'cache_type_k': 'q8_0', 'cache_type_v': 'q8_0'}, ram_free=10**12)
    assert q8.ctx_size == 1000
    assert q8.kv_bytes == 2 * 2 * 1024 * 2 * 16 * 34 // 32  # ctx padded to 256; q8_0 = 34 bytes per 32


def test_gpu_split_and_labels(tmp_path: Path):
    meta = _meta(write_tiny_gguf(tmp_path / 'm.gguf', n_layer=4))
    per_layer = meta.layer_bytes[0]
    assert meta.layer_bytes == [per_layer] * 4

    half = estimate(meta, {'n_gpu_layers': 2}, ram_free=10**12, vram_free=10**12)
    assert half.n_gpu_layers == 2
    assert half.weights_gpu_bytes == 2 * per_layer  # the last two blocks; output head stays on the CPU
    assert half.kv_gpu_bytes * 2 == half.kv_bytes
    assert half.vram_needed_bytes == half.weights_gpu_bytes + half.kv_gpu_bytes + half.compute_bytes

    full = estimate(meta, {'n_gpu_layers': -1}, ram_free=10**12, vram_free=10**12)
    assert full.weights_gpu_bytes == 4 * per_layer + meta.output_bytes
    assert full.weights_cpu_bytes == meta.input_bytes  # token embeddings never leave the CPU

    need = full.vram_needed_bytes
    assert estimate(meta, {}, ram_free=10**12, vram_free=need * 2).label == 'fits'
    assert estimate(meta, {}, ram_free=10**12, vram_free=int(need * 1.05)).label == 'tight'
    assert estimate(meta, {}, ram_free=10**12, vram_free=need // 2).label == 'does not fit'
    cpu = estimate(meta, {}, ram_free=1000, vram_free=None)
    assert cpu.label == 'does not fit' and cpu.n_gpu_layers == 0 and cpu.ram_free_bytes == 1000
