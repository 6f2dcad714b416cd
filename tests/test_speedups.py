"""`ZImageGenerator.accelerate` gives the ControlNet the transformer's attention backend and fp8 treatment.

Both are CUDA-only. Here the device check is pointed at "cuda" on the CPU modules: diffusers'
`set_attention_backend` only checks that a backend's package is installed and sets it on each
attention processor, so the choice is real; fp8 needs torchao and float8 tensor cores, absent
here, so what shows is that it was tried on both modules, and which layers it would take.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from src.model.pipeline import ATTENTION_BACKENDS, ZImageGenerator, load_pipeline, not_shared_linears
from tests.tiny_controlnets import tiny_controlnet


@pytest.fixture
def generator(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> ZImageGenerator:
    """A fresh generator with a 2.1 ControlNet, as Worker.start builds it, that believes it is on CUDA."""
    # set_attention_backend also sets diffusers' process-wide default: put it back after the test.
    registry = _AttentionBackendRegistry
    monkeypatch.setattr(registry, "_active_backend", registry._active_backend)
    pipe = load_pipeline(tiny_model, torch.float32)
    made = ZImageGenerator(pipe, torch.device("cpu"), tiny_controlnet(tiny_model, "2.1"))
    monkeypatch.setattr(made, "device", torch.device("cuda"))
    return made


def backends(module: torch.nn.Module) -> set[str | None]:
    processors = [m.processor for m in module.modules() if getattr(m, "processor", None) is not None]
    assert processors
    return {getattr(p._attention_backend, "value", p._attention_backend) for p in processors}


def test_the_controlnet_gets_the_transformers_attention_backend_and_fp8(generator, caplog):
    transformer, controlnet = generator.text_to_image.transformer, generator.controlnet
    own_blocks = controlnet.control_layers
    assert backends(transformer) == backends(own_blocks) == {None}  # diffusers' default before
    with caplog.at_level(logging.INFO, logger="src.model.pipeline"):
        generator.accelerate("fp8", compile_blocks=False)
    chosen = backends(transformer)
    # The first of the list this machine has (flash-attn 2 and 3 are not installed here).
    assert len(chosen) == 1 and chosen <= set(ATTENTION_BACKENDS)
    assert backends(controlnet) == backends(own_blocks) == chosen
    assert "fp8 requested for the transformer" in caplog.text
    assert "fp8 requested for the ControlNet" in caplog.text


def test_fp8_on_the_controlnet_takes_its_own_linears_not_the_shared_ones(generator):
    transformer, controlnet = generator.text_to_image.transformer, generator.controlnet
    takes = not_shared_linears(transformer)
    linears = {name: m for name, m in controlnet.named_modules() if isinstance(m, torch.nn.Linear)}
    taken = {name for name, module in linears.items() if takes(module, name)}
    # from_transformer handed it the transformer's embedders and refiners: those are quantized once.
    assert any(name.startswith(("noise_refiner.", "all_x_embedder.")) for name in linears)
    assert taken == {name for name in linears if name.startswith("control_")}
    assert not any(takes(m, name) for name, m in transformer.named_modules())


def test_without_cuda_nothing_changes(tiny_model, caplog):
    pipe = load_pipeline(tiny_model, torch.float32)
    plain = ZImageGenerator(pipe, torch.device("cpu"), tiny_controlnet(tiny_model, "2.1"))
    with caplog.at_level(logging.WARNING, logger="src.model.pipeline"):
        plain.accelerate("fp8", compile_blocks=False)
    assert backends(plain.text_to_image.transformer) == backends(plain.controlnet) == {None}
    assert "need a CUDA GPU" in caplog.text


def test_compile_asked_on_a_cpu_warms_up_one_size_not_every_preset(tiny_model, monkeypatch):
    """ZIMAGE_COMPILE=1 compiles nothing without CUDA, so the start's warm-up is the plain one: a
    warm-up over every preset size would be seconds of nothing (the compiled one is in
    tests/test_lora_compile.py and tests/test_acceleration.py)."""
    from src.jobs.worker import Worker
    from src.runtime.settings import Settings

    sizes = []
    generate = ZImageGenerator.generate

    def noting(self, request, *args, **kwargs):
        sizes.append(request.size)
        return generate(self, request, *args, **kwargs)

    monkeypatch.setattr(ZImageGenerator, "generate", noting)
    worker = Worker.start(Settings(model=str(tiny_model), safety_checker_model="none", compile=True))
    assert not worker.generator.compiled
    assert sizes == ["512*512"]
