"""Prompt expansion (`enable_prompt_expansion`) on tiny real models.

The expander is built beside the tiny Turbo as Qwen3-4B is beside Z-Image's text encoder: a
Qwen3ForCausalLM with the encoder's weights, a tied head, and another last-layer MLP. Its
rewrites are checked against transformers' own `generate`, its images against diffusers'
pipeline given the rewrite, and a job without the field against a worker without an expander.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from safetensors.torch import load_file

from builder.tiny_model import build_tiny_base, build_tiny_expander
from src.jobs.worker import Worker
from src.model.expander import STATIC_TOKENS, strip_thinking
from src.model.expander_weights import load_expander_model, same_file
from src.openai_images.routes import OpenAIImages
from src.request.parse import parse_request
from src.runtime.errors import JobError
from src.runtime.settings import Settings, SettingsError
from tests.conftest import data_uri_of, decode_data_uri, png_bytes, run_input
from tests.test_inpaint import IMAGE, MASK
from tests.tiny_controlnets import save_controlnet

JOB = {"prompt": "a red kite over dunes", "size": "256*256", "seed": 4, "num_inference_steps": 3}
EXPAND = {**JOB, "enable_prompt_expansion": True}
MAX_NEW = 24  # a short cap keeps the tiny model's random rewrites quick


@pytest.fixture(scope="module")
def expander_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_expander(tiny_model, tmp_path_factory.mktemp("expander") / "tiny-qwen3")


@pytest.fixture(scope="module")
def expanding(tiny_model: Path, expander_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    """Turbo, the base, a 2.1 ControlNet and the expander on one worker: every mode, both models."""
    root = tmp_path_factory.mktemp("expanding")
    base = build_tiny_base(tiny_model, root / "tiny-base")
    controlnet, _ = save_controlnet(tiny_model, "2.1", root / "controlnet")
    worker = Worker.start(
        Settings(
            model=str(tiny_model),
            base_model=str(base),
            controlnet_model=str(controlnet),
            depth_model="none",
            safety_checker_model="none",
            prompt_expander_model=str(expander_model),
        )
    )
    worker.expander.max_new_tokens = MAX_NEW
    return worker


def pixels(output: dict) -> np.ndarray:
    assert "error" not in output, output
    return np.asarray(decode_data_uri(output["image_url"]).convert("RGB")).astype(int)


# ------------------------------------------------------------------------------- the weights
def test_the_expander_is_the_text_encoder_but_for_the_differing_tensors(expanding, expander_model):
    encoder = expanding.generator.text_encoder
    causal = expanding.expander.model
    differing = {"layers.1.mlp.up_proj.weight", "layers.1.mlp.down_proj.weight"}
    mine = dict(encoder.named_parameters())
    for name, param in causal.model.named_parameters():
        assert (param.data_ptr() == mine[name].data_ptr()) == (name not in differing), name
    # Tied: the head is the embedding matrix, itself the encoder's.
    assert causal.lm_head.weight.data_ptr() == encoder.embed_tokens.weight.data_ptr()
    saved = load_file(expander_model / "model.safetensors")
    for name in differing:
        assert torch.equal(dict(causal.model.named_parameters())[name], saved[f"model.{name}"])
        assert not torch.equal(mine[name], saved[f"model.{name}"])
    assert not encoder.embed_tokens.weight.requires_grad  # sharing changed nothing of the encoder's


def test_files_that_are_the_encoders_own_are_not_read(tiny_model, tmp_path, monkeypatch, caplog):
    """A Qwen3 whose safetensors file is the encoder's (a link, as a baked image has): all shared, no read."""
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(tiny_model / "text_encoder" / "model.safetensors")
    shutil.copy(tiny_model / "text_encoder" / "config.json", folder / "config.json")
    assert same_file(folder / "model.safetensors", tiny_model / "text_encoder" / "model.safetensors")
    pipe = ZImagePipeline.from_pretrained(tiny_model, dtype=torch.float32, local_files_only=True)
    import src.model.expander_weights as weights

    read: list[str] = []
    real_open = weights.safe_open

    class Spy:
        """safe_open that records every tensor read (a header alone is not a tensor's bytes)."""

        def __init__(self, file, **options) -> None:
            self.file, self.inner = file, real_open(file, **options)

        def __enter__(self):
            self.reader = self.inner.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self.inner.__exit__(*exc)

        def keys(self):
            return self.reader.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.reader.get_tensor(name)

    monkeypatch.setattr(weights, "safe_open", Spy)
    with caplog.at_level(logging.INFO, logger="src.model.expander_weights"):
        causal = load_expander_model(folder, pipe.text_encoder, tiny_model / "text_encoder")
    assert read == []
    own = {p.data_ptr() for p in pipe.text_encoder.parameters()}
    assert {p.data_ptr() for p in causal.parameters()} == own
    assert "24 tensors are the text encoder's (24 by file, 0 compared), 0 loaded" in caplog.text


def test_a_language_model_of_another_shape_loads_whole(tiny_model, tmp_path, caplog):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    other = tmp_path / "other-lm"
    config = Qwen3Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, vocab_size=393, tie_word_embeddings=True,
    )  # fmt: skip
    Qwen3ForCausalLM(config).save_pretrained(other, safe_serialization=True)
    pipe = ZImagePipeline.from_pretrained(tiny_model, dtype=torch.float32, local_files_only=True)
    with caplog.at_level(logging.WARNING, logger="src.model.expander_weights"):
        causal = load_expander_model(other, pipe.text_encoder, tiny_model / "text_encoder")
    assert "loaded whole, nothing shared" in caplog.text
    assert not {p.data_ptr() for p in causal.parameters()} & {
        p.data_ptr() for p in pipe.text_encoder.parameters()
    }


# ------------------------------------------------------------------------------- the rewrite
def test_the_rewrite_is_transformers_generate(expanding):
    """Greedy: generate(do_sample=False). Sampled: generate(do_sample=True) after torch.manual_seed(seed),
    the same draws from the CPU generator the worker seeds itself (the global one is not touched)."""
    expander = expanding.expander
    ids = expander.input_ids(JOB["prompt"])
    stop = sorted(expander.stop_ids)
    common = dict(max_new_tokens=MAX_NEW, eos_token_id=stop, pad_token_id=stop[0])

    def new_tokens(out: torch.Tensor) -> list[int]:
        tokens = out[0, ids.shape[1] :].tolist()
        return tokens[: tokens.index(stop[0])] if stop[0] in tokens else tokens

    greedy = expander.model.generate(ids, do_sample=False, **common)
    assert expander.sample(ids, seed=None) == new_tokens(greedy)
    for seed in (4, 5):
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        sampled = expander.model.generate(ids, do_sample=True, temperature=0.7, top_k=20, top_p=0.8, **common)
        torch.random.set_rng_state(state)
        assert expander.sample(ids, seed=seed) == new_tokens(sampled)
    assert expander.sample(ids, seed=4) != expander.sample(ids, seed=5)


def test_a_job_is_made_from_its_rewrite_and_charged_for_it(expanding, tiny_model, caplog):
    with caplog.at_level(logging.INFO):
        output = run_input(expanding, "expand", EXPAND)
    expanded = output["expanded_prompt"]
    assert expanded == expanding.expander.expand(JOB["prompt"], JOB["seed"]).text and expanded
    assert output["cost"] == 0.0075  # 0.005 for the image + 0.0025 for the rewrite
    assert output["timings"]["expand_prompt"] > 0
    assert expanded not in caplog.text and JOB["prompt"] not in caplog.text
    pipe = ZImagePipeline.from_pretrained(tiny_model, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt=expanded,
        height=256,
        width=256,
        num_inference_steps=3,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(JOB["seed"]),
        output_type="np",
    ).images[0]
    assert np.abs(pixels(output) - (expected * 255).round().astype(int)).max() <= 2


def test_the_same_request_gives_the_same_rewrite_and_bytes_from_the_cache(expanding, monkeypatch):
    first = run_input(expanding, "first", {**EXPAND, "seed": 21})
    calls = []
    monkeypatch.setattr(expanding.expander, "sample", lambda *a: calls.append(a) or [])
    again = run_input(expanding, "retry", {**EXPAND, "seed": 21})
    assert calls == [] and again["expanded_prompt"] == first["expanded_prompt"]
    assert again["image_url"] == first["image_url"] and again["cost"] == first["cost"]


MODES = {
    "text-to-image": {},
    "image-to-image": {"image": data_uri_of(png_bytes((300, 200), (30, 160, 90))), "strength": 0.6},
    "inpainting": {"image": IMAGE, "mask": MASK, "strength": 0.9},
    "text-to-image with control": {"control_image": data_uri_of(png_bytes((256, 256), (90, 90, 90)))},
    "inpainting with control": {
        "image": IMAGE,
        "mask": MASK,
        "control_image": data_uri_of(png_bytes((256, 256), (90, 90, 90))),
    },
}


@pytest.mark.parametrize("model", ["z-image-turbo", "z-image"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_on_both_models_uses_the_rewrite(expanding, model, mode):
    fields = {**EXPAND, **MODES[mode], "model": model}
    output = run_input(expanding, mode, fields)
    price = 0.005 if model == "z-image-turbo" else 0.01
    assert output["cost"] == round(price + 0.0025, 6)
    plain = {**fields, "prompt": output["expanded_prompt"], "enable_prompt_expansion": False}
    assert run_input(expanding, "plain", plain)["image_url"] == output["image_url"]


# ------------------------------------------------------------------ without an expander, or the field
def test_a_worker_without_an_expander_refuses(worker):
    with pytest.raises(JobError, match="enable_prompt_expansion.*PROMPT_EXPANDER_MODEL=none"):
        run_input(worker, "refused", EXPAND)


@pytest.mark.parametrize("field", [{}, {"enable_prompt_expansion": False}])
def test_without_expansion_the_bytes_are_those_of_a_worker_without_an_expander(expanding, worker, field):
    output = run_input(expanding, "plain", {**JOB, **field})
    alone = run_input(worker, "alone", JOB)
    assert output["image_url"] == alone["image_url"] and "expanded_prompt" not in output
    assert output["cost"] == alone["cost"] == 0.005 and output["timings"]["expand_prompt"] == 0


def test_an_empty_rewrite_falls_back_to_the_prompt_free_of_charge(expanding, monkeypatch, caplog):
    monkeypatch.setattr(expanding.expander, "sample", lambda *a: [])
    with caplog.at_level(logging.WARNING):
        output = run_input(expanding, "empty", {**EXPAND, "seed": 99})
    assert "expanded_prompt" not in output and output["cost"] == 0.005
    assert output["image_url"] == run_input(expanding, "plain", {**JOB, "seed": 99})["image_url"]
    assert "empty reply" in caplog.text


# ------------------------------------------------------------------------------- pure rules
def test_think_blocks_are_stripped():
    assert strip_thinking("<think>\nhmm\n</think>\n\nA red kite.") == "A red kite."
    assert strip_thinking("A kite. <think>cut off by the cap") == "A kite."
    assert strip_thinking("<think></think>  ") == ""


def test_the_field_is_a_real_boolean():
    assert parse_request({"prompt": "a"}).enable_prompt_expansion is False
    with pytest.raises(JobError, match="enable_prompt_expansion"):
        parse_request({"prompt": "a", "enable_prompt_expansion": "true"})


def test_settings():
    assert Settings.from_env({}).expansion_enabled is False
    settings = Settings.from_env(
        {"PROMPT_EXPANDER_MODEL": "Qwen/Qwen3-4B", "PROMPT_EXPANSION_PRICE_USD": "0.01"}
    )
    assert settings.expansion_enabled and settings.prompt_expansion_price_usd == 0.01
    assert Settings.from_env({}).prompt_expansion_price_usd == 0.0025
    with pytest.raises(SettingsError, match="PROMPT_EXPANSION_PRICE_USD"):
        Settings.from_env({"PROMPT_EXPANSION_PRICE_USD": "-1"})


def test_the_static_cache_gives_the_dynamic_caches_tokens(expanding, monkeypatch):
    """The CUDA path's cache and loop, run eagerly on the CPU (its compile needs a GPU)."""
    expander = expanding.expander
    ids = expander.input_ids(JOB["prompt"])
    assert ids.shape[1] + expander.max_new_tokens <= STATIC_TOKENS  # so the static cache is the one used
    dynamic = expander.sample(ids, seed=7), expander.sample(ids, seed=None)
    monkeypatch.setattr(expander, "_static", True)
    monkeypatch.setattr(expander, "_compiled_step", expander._step)
    assert (expander.sample(ids, seed=7), expander.sample(ids, seed=None)) == dynamic


def test_the_openai_route_returns_the_rewrite_as_revised_prompt(expanding):
    """OpenAI's images.generate with `enable_prompt_expansion` (an extra_body field): each entry's
    `revised_prompt` is the native `expanded_prompt`, and the bytes are the native request's."""
    native = run_input(expanding, "native", {**EXPAND, "output_format": "png"})
    body = {
        "prompt": JOB["prompt"],
        "size": "256x256",
        "response_format": "b64_json",
        "seed": JOB["seed"],
        "num_inference_steps": JOB["num_inference_steps"],
        "enable_prompt_expansion": True,
    }
    job = {"id": "openai", "input": {"openai_route": "/v1/images/generations", "openai_input": body}}
    reply = asyncio.run(OpenAIImages(expanding).handle(job))
    assert [entry["revised_prompt"] for entry in reply["data"]] == [native["expanded_prompt"]]
    assert reply["data"][0]["b64_json"] == native["image_url"].split(",", 1)[1]
    assert reply["cost"] == native["cost"] == 0.0075
