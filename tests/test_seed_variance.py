"""Seed variety (`seed_variance`) on the real pipelines with the tiny random model.

The worker's pixels are checked against diffusers' own pipelines called with E' (the prompt's
embeddings with the noise API.md defines, computed here from that text, not by the worker's module)
and a step-end callback that hands back the clean E where the rule says.
"""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from src.jobs.worker import Worker
from src.model.seed_variance import with_seed_variance
from src.openai_images.routes import OpenAIImages
from src.request.parse import parse_request
from src.request.seed_variance import SeedVariance
from src.runtime.errors import JobError
from tests.conftest import data_uri_of, decode_data_uri, handle_job, png_bytes
from tests.test_openai_images import Gateway

PROMPT = "a lighthouse on a rocky coast at dusk, detailed"
JOB = {"prompt": PROMPT, "size": "256*256", "num_inference_steps": 2, "seed": 21}
VARIED = {"strength": 1.5, "fraction": 0.5, "until": 1.0}


def output(worker: Worker, **fields) -> dict:
    result = handle_job(worker, {"id": "seed-variance", "input": {**JOB, **fields}})
    assert "error" not in result, result
    return result


def pixels(uri: str) -> np.ndarray:
    return np.asarray(decode_data_uri(uri).convert("RGB")).astype(int)


def images(result: dict) -> list[np.ndarray]:
    return [pixels(entry["image_url"]) for entry in result.get("images", [result])]


def noisy(clean: torch.Tensor, seed: int, strength: float, fraction: float) -> torch.Tensor:
    """API.md's E', written out from the contract."""
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(clean.shape, generator=g)
    chosen = torch.rand(clean.shape, generator=g) < fraction
    e = clean.float()
    return (e + torch.where(chosen, noise * strength * e.std(), torch.zeros(()))).to(clean.dtype)


def diffusers_pixels(
    pipe, clean: torch.Tensor, varied: torch.Tensor, until: float, **arguments
) -> np.ndarray:
    """diffusers' own call with prompt_embeds=[E'], switched to [E] for the steps i with i/n >= until."""

    def switch(pipeline, step, timestep, tensors):
        return {} if (step + 1) / pipeline.num_timesteps < until else {"prompt_embeds": [clean]}

    result = pipe(
        prompt_embeds=[varied],
        height=256,
        width=256,
        num_inference_steps=arguments.pop("num_inference_steps", JOB["num_inference_steps"]),
        guidance_scale=0.0,
        generator=[torch.Generator("cpu").manual_seed(arguments.pop("seed", JOB["seed"]))],
        output_type="np",
        callback_on_step_end=switch,
        **arguments,
    ).images
    return (result[0] * 255).round().astype(int)


def fed(worker: Worker, **fields) -> tuple[dict, list[list[torch.Tensor]]]:
    """A job's output, and the prompt embeddings the transformer received at each step (one per image)."""
    steps: list[list[torch.Tensor]] = []

    def record(module, args, kwargs):
        steps.append([tensor.clone() for tensor in args[2]])

    hook = worker.generator.text_to_image.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        return output(worker, **fields), steps
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def plain(worker: Worker) -> dict:
    """JOB without the field: what every "off" setting must give, byte for byte."""
    return output(worker)


@pytest.fixture(scope="module")
def clean(worker: Worker) -> torch.Tensor:
    """E: the prompt's embeddings as the worker's encoder (and its cache) has them."""
    return worker.generator.prompts.embed(PROMPT)


# ------------------------------------------------------------------ the request field
@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({}, "seed_variance.strength: required; send a number from 0.0 to 4.0"),
        (
            {"strength": 4.5},
            "seed_variance.strength: 4.5 (a number) is not allowed: it must be a number from 0.0",
        ),
        ({"strength": -0.1}, "seed_variance.strength: -0.1 (a number) is not allowed"),
        ({"strength": "1"}, "seed_variance.strength: '1' is not allowed"),
        ({"strength": True}, "seed_variance.strength: true (a boolean) is not allowed"),
        ({"strength": 1, "fraction": 1.5}, "seed_variance.fraction: 1.5 (a number) is not allowed"),
        (
            {"strength": 1, "until": -1},
            "seed_variance.until: -1 is not allowed: it must be a number from 0.0",
        ),
        ({"strength": 1, "until": float("nan")}, "seed_variance.until: nan (a number) is not allowed"),
        (
            {"strength": 1, "steps": 2},
            "seed_variance.steps: unknown field; allowed fields: strength, fraction",
        ),
        (0.5, 'seed_variance: 0.5 (a number) is not allowed: it must be an object {"strength"'),
    ],
)
def test_each_refusal_names_the_key(value, says):
    with pytest.raises(JobError) as caught:
        parse_request({"prompt": PROMPT, "seed_variance": value})
    assert str(caught.value).startswith(says), str(caught.value)


def test_defaults_and_null():
    assert parse_request({"prompt": PROMPT, "seed_variance": {"strength": 2}}).seed_variance == SeedVariance(
        strength=2.0, fraction=0.5, until=0.2
    )
    assert parse_request({"prompt": PROMPT, "seed_variance": None}).seed_variance is None


def test_the_noisy_embeddings_are_used_while_i_over_n_is_below_until():
    setting = SeedVariance(strength=1.0, until=0.3)
    clean = torch.arange(40.0).reshape(5, 8)
    call = {"prompt_embeds": [clean], "negative_prompt_embeds": None, "num_images_per_prompt": 2}
    call["callback_on_step_end"] = lambda pipeline, step, timestep, tensors: {"progress": step}
    varied = with_seed_variance(setting, call, [3, 4])
    assert varied["num_images_per_prompt"] == 1 and len(varied["prompt_embeds"]) == 2
    assert not torch.equal(varied["prompt_embeds"][0], varied["prompt_embeds"][1])
    pipeline = SimpleNamespace(num_timesteps=10)
    switched = [
        "prompt_embeds" in varied["callback_on_step_end"](pipeline, step, None, {}) for step in range(10)
    ]
    # Steps 0, 1, 2 (i/n < 0.3) run on E'; the callback after step 2 hands back E for step 3 on.
    assert switched == [False, False] + [True] * 8
    assert varied["callback_on_step_end"](pipeline, 5, None, {})["progress"] == 5  # progress kept
    for off in (
        None,
        SeedVariance(strength=0.0),
        SeedVariance(strength=1, fraction=0),
        SeedVariance(strength=1, until=0),
    ):
        assert with_seed_variance(off, call, [3, 4]) is call


# ----------------------------------------------------------------- on the tiny model
@pytest.mark.parametrize(
    "setting",
    [{"strength": 0.0}, {"strength": 2.0, "fraction": 0.0}, {"strength": 2.0, "until": 0.0}],
)
def test_off_is_the_bytes_of_a_request_without_the_field(worker, plain, setting):
    assert output(worker, seed_variance=setting)["image_url"] == plain["image_url"]


def test_until_1_is_diffusers_with_the_noisy_embeddings(worker, clean, plain):
    result, steps = fed(worker, seed_variance=VARIED)
    varied = noisy(clean, JOB["seed"], VARIED["strength"], VARIED["fraction"])
    assert len(steps) == 2 and all(torch.equal(step[0], varied) for step in steps)  # E', exactly
    expected = diffusers_pixels(worker.generator.text_to_image, clean, varied, until=1.0)
    assert np.abs(images(result)[0] - expected).max() <= 2
    assert np.abs(images(result)[0] - images(plain)[0]).max() > 10  # it does change the picture


def test_the_clean_embeddings_come_back_at_the_step_the_rule_names(worker, clean):
    # 4 steps, until 0.4: steps 0 and 1 on E' (0/4, 1/4 < 0.4), steps 2 and 3 on E.
    setting = {"strength": 2.0, "fraction": 1.0, "until": 0.4}
    result, steps = fed(worker, num_inference_steps=4, seed_variance=setting)
    varied = noisy(clean, JOB["seed"], 2.0, 1.0)
    assert [torch.equal(step[0], varied) for step in steps] == [True, True, False, False]
    assert all(torch.equal(step[0], clean) for step in steps[2:])
    pipe = worker.generator.text_to_image
    expected = diffusers_pixels(pipe, clean, varied, until=0.4, num_inference_steps=4)
    assert np.abs(images(result)[0] - expected).max() <= 2


def test_off_feeds_the_clean_embeddings(worker, clean):
    _, steps = fed(worker, seed_variance={"strength": 2.0, "until": 0.0})
    assert len(steps) == 2 and all(torch.equal(step[0], clean) for step in steps)


def test_image_i_is_the_single_request_with_seed_plus_i_and_repeats(worker, clean):
    setting = {"strength": 2.0, "until": 0.5}
    batch, steps = fed(worker, num_images=2, seed_variance=setting)
    # Each image its own E', from its own seed; the clean E for both from step 1 of 2.
    assert [len(step) for step in steps] == [2, 2]
    assert torch.equal(steps[0][1], noisy(clean, JOB["seed"] + 1, 2.0, 0.5))
    assert not torch.equal(steps[0][0], steps[0][1])
    assert all(torch.equal(embeds, clean) for embeds in steps[1])
    single = output(worker, seed=JOB["seed"] + 1, seed_variance=setting)
    first, second = images(batch)
    assert np.abs(second - images(single)[0]).max() <= 2
    assert output(worker, num_images=2, seed_variance=setting)["images"] == batch["images"]


def test_with_guidance_the_negative_prompt_s_embeddings_are_never_changed(worker, clean):
    # The base model's way (guidance with a negative prompt), on Turbo's weights: one E' per image,
    # then the negative prompt's E for each image, as diffusers concatenates them.
    negative = worker.generator.prompts.embed("blurry")
    fields = {"guidance_scale": 2.0, "negative_prompt": "blurry", "num_images": 2}
    _, steps = fed(worker, **fields, seed_variance={"strength": 1.0, "until": 1.0})
    varied = [noisy(clean, JOB["seed"] + i, 1.0, 0.5) for i in range(2)]
    for step in steps:
        assert [torch.equal(a, b) for a, b in zip(step, [*varied, negative, negative], strict=True)] == [
            True
        ] * 4


def test_the_prompt_cache_keeps_the_clean_embeddings_and_encodes_once(worker, monkeypatch):
    prompts = worker.generator.prompts
    encoder = prompts.pipe.encode_prompt
    calls = []
    monkeypatch.setattr(prompts.pipe, "encode_prompt", lambda **kw: calls.append(1) or encoder(**kw))
    prompt = "a fresh prompt for the cache check"
    output(worker, prompt=prompt, num_inference_steps=4, seed_variance={"strength": 3.0, "until": 0.5})
    cached = prompts._cache[prompt].clone()
    monkeypatch.undo()
    prompts._cache.pop(prompt)
    assert calls == [1]  # one encode for the whole job, the switch back included
    assert torch.equal(cached, prompts.embed(prompt))  # E, not E'


def test_image_to_image_counts_the_steps_it_runs(worker, clean):
    # strength 0.5 of 4 steps runs 2: until 0.5 puts E' on the first of those only.
    source = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(source).save(buffer, format="PNG")
    setting = {"strength": 2.0, "fraction": 1.0, "until": 0.5}
    fields = {"image": data_uri_of(buffer.getvalue()), "strength": 0.5, "num_inference_steps": 4}
    result, steps = fed(worker, **fields, seed_variance=setting)
    varied = noisy(clean, JOB["seed"], 2.0, 1.0)
    assert [torch.equal(step[0], varied) for step in steps] == [True, False]
    pipe = worker.generator.pipelines["image-to-image"]
    picture = [Image.fromarray(source)]
    expected = diffusers_pixels(
        pipe, clean, varied, until=0.5, image=picture, strength=0.5, num_inference_steps=4
    )
    assert np.abs(images(result)[0] - expected).max() <= 2
    assert np.abs(images(result)[0] - images(output(worker, **fields))[0]).max() > 10


def test_inpainting_switches_within_the_steps_it_runs(worker, clean):
    source = data_uri_of(png_bytes((256, 256), (40, 160, 90)))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 192))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    fields = {
        "image": source,
        "mask": data_uri_of(buffer.getvalue()),
        "strength": 0.5,
        "num_inference_steps": 4,
    }
    _, steps = fed(worker, **fields, seed_variance={"strength": 2.0, "until": 0.5})
    assert [torch.equal(step[0], noisy(clean, JOB["seed"], 2.0, 0.5)) for step in steps] == [True, False]
    assert torch.equal(steps[1][0], clean)


# ---------------------------------------------------------------------- the edges
def test_the_openai_sdk_sends_it_through_extra_body(worker):
    def run_job(job_input: dict) -> dict:
        result = asyncio.run(OpenAIImages(worker).handle({"id": "openai", "input": job_input}))
        return result if "error" in result else {"output": result}

    gateway = Gateway(run_job)
    try:
        client = gateway.client()
        extra = {"seed": JOB["seed"], "num_inference_steps": 2, "seed_variance": VARIED}
        reply = client.images.generate(
            prompt=PROMPT, size="256x256", response_format="b64_json", extra_body=extra
        )
        native = output(worker, seed_variance=VARIED)
        assert reply.data[0].b64_json == native["image_url"].split(",", 1)[1]
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt=PROMPT, extra_body={"seed_variance": {"strength": 9}})
        assert caught.value.body["param"] == "seed_variance.strength", caught.value.body
    finally:
        gateway.close()


def test_a_multipart_form_carries_it_in_brackets():
    from starlette.datastructures import Headers

    from src.lb.forms import form_body

    boundary = "sv-boundary"
    parts = [("prompt", "x"), ("seed_variance[strength]", "0.75"), ("seed_variance[until]", "1")]
    body = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in parts
    )
    headers = Headers({"content-type": f"multipart/form-data; boundary={boundary}"})
    parsed = asyncio.run(form_body(headers, (body + f"--{boundary}--\r\n").encode()))
    assert parsed["seed_variance"] == {"strength": 0.75, "until": 1.0}
    assert parse_request(parsed).seed_variance == SeedVariance(strength=0.75, until=1.0)
