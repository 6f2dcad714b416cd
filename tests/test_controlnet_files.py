"""CONTROLNET_MODEL: every release in every form loads to the same weights; bad ones stop the start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from huggingface_hub import constants
from safetensors.torch import save_file

from src.control.configs import CONTROL_CONFIGS, detect_version, release_config
from src.control.controlnet import load_controlnet, load_release
from src.jobs.worker import Worker
from src.model.files import ModelNotFound, SearchRoots
from src.runtime.settings import Settings
from tests.test_builder import LoopbackHub, folder_files
from tests.tiny_controlnets import save_controlnet

VERSIONS = ("1.0", "2.0", "2.1")


@pytest.fixture(scope="module")
def transformer(tiny_model: Path) -> ZImageTransformer2DModel:
    return ZImageTransformer2DModel.from_pretrained(tiny_model / "transformer")


@pytest.fixture(scope="module")
def releases(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("releases")
    return {version: save_controlnet(tiny_model, version, root / version) for version in VERSIONS}


def nowhere(tmp_path: Path) -> SearchRoots:
    return SearchRoots(
        runpod_cache=tmp_path / "rp",
        volume=tmp_path / "vol",
        baked=tmp_path / "baked",
        hf_cache=tmp_path / "hf",
    )


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_release_loads_alike_from_a_folder_a_file_and_a_folder_holding_the_file(
    version, releases, transformer, tmp_path
):
    folder, file = releases[version]
    loaded = [
        load_controlnet(str(where), transformer, torch.float32, nowhere(tmp_path)) for where in (folder, file)
    ]
    loaded.append(load_controlnet(str(file.parent), transformer, torch.float32, nowhere(tmp_path)))
    for controlnet in loaded:
        for key, value in CONTROL_CONFIGS[version].items():
            expected = release_config(version, transformer.config)[key]
            assert controlnet.config[key] == expected, (key, value)
        assert same_weights(controlnet, loaded[0])
        assert next(controlnet.parameters()).dtype == torch.float32


def test_the_version_is_told_by_the_keys(releases):
    from safetensors.torch import load_file

    for version in VERSIONS:
        assert detect_version(load_file(releases[version][1])) == version
    assert detect_version({"layers.0.attention.to_q.weight": torch.zeros(1)}) is None


def test_bf16_loads_in_bf16(releases, transformer):
    controlnet, version = load_release(releases["2.1"][1], transformer.config, torch.bfloat16)
    assert version == "2.1" and {p.dtype for p in controlnet.parameters()} == {torch.bfloat16}


def test_a_repo_id_is_found_in_the_hugging_face_cache(releases, transformer, tmp_path):
    roots = nowhere(tmp_path)
    repo = "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1"
    snapshot = (
        roots.hf_cache / "models--alibaba-pai--Z-Image-Turbo-Fun-Controlnet-Union-2.1" / "snapshots" / "abc"
    )
    snapshot.mkdir(parents=True)
    # The repo holds several files; the one named after the repo is the release.
    shutil.copy(releases["2.1"][1], snapshot / "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors")
    shutil.copy(releases["2.0"][1], snapshot / "Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite.safetensors")
    controlnet = load_controlnet(repo, transformer, torch.float32, roots)
    assert controlnet.config.add_control_noise_refiner == "control_noise_refiner"


# ----------------------------------------------------------------- downloads (ZIMAGE_ALLOW_DOWNLOAD=1)
UNION = "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union"


@pytest.fixture
def hub(releases, monkeypatch):
    """alibaba-pai's layout on a loopback Hub: several single-file releases per repo, and assets."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    release = {version: releases[version][1].read_bytes() for version in VERSIONS}
    server = LoopbackHub(
        {
            f"{UNION}-2.0": {
                "Z-Image-Turbo-Fun-Controlnet-Union-2.0.safetensors": release["2.0"],
                "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors": release["2.1"],
                "Z-Image-Turbo-Fun-Controlnet-Union-2.1-8steps.safetensors": release["2.1"],
                "asset/pose.jpg": b"jpeg",
                "README.md": b"# releases",
            },
            # A diffusers-format copy, as hlky's mirrors hold it.
            "someone/zimage-controlnet-diffusers": folder_files(releases["2.1"][0]) | {"README.md": b"#"},
        }
    )
    yield server
    server.close()


def downloading(tmp_path: Path, hub: LoopbackHub) -> SearchRoots:
    return SearchRoots(**{**nowhere(tmp_path).__dict__, "allow_download": True, "hub_endpoint": hub.url})


@pytest.mark.parametrize(
    ("setting", "version", "fetched"),
    [
        (f"{UNION}-2.0", "2.0", "Z-Image-Turbo-Fun-Controlnet-Union-2.0.safetensors"),
        (
            f"{UNION}-2.0/Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors",
            "2.1",
            "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors",
        ),
    ],
)
def test_a_download_fetches_the_one_release_asked_for(setting, version, fetched, hub, transformer, tmp_path):
    roots = downloading(tmp_path, hub)
    controlnet = load_controlnet(setting, transformer, torch.float32, roots)
    assert hub.fetched(f"{UNION}-2.0") == {fetched}
    expected = release_config(version, transformer.config)["add_control_noise_refiner"]
    assert controlnet.config.add_control_noise_refiner == expected
    # Now in the Hugging Face cache: found there without a request.
    hub.requests.clear()
    load_controlnet(setting, transformer, torch.float32, nowhere(tmp_path))
    assert hub.requests == []


def test_a_download_of_a_diffusers_repo_fetches_its_config_and_weights(hub, releases, transformer, tmp_path):
    repo = "someone/zimage-controlnet-diffusers"
    controlnet = load_controlnet(repo, transformer, torch.float32, downloading(tmp_path, hub))
    assert hub.fetched(repo) == set(folder_files(releases["2.1"][0])) and "README.md" not in hub.fetched(repo)
    assert controlnet.config.control_in_dim == CONTROL_CONFIGS["2.1"]["control_in_dim"]


def test_a_release_the_repo_does_not_hold_is_named_in_the_error(hub, transformer, tmp_path):
    setting = f"{UNION}-2.0/Z-Image-Turbo-Fun-Controlnet-Union-9.9.safetensors"
    with pytest.raises(ModelNotFound) as caught:
        load_controlnet(setting, transformer, torch.float32, downloading(tmp_path, hub))
    message = str(caught.value)
    assert message.startswith(f"CONTROLNET_MODEL: no complete model for '{UNION}-2.0'"), message
    assert "missing Z-Image-Turbo-Fun-Controlnet-Union-9.9.safetensors" in message
    assert hub.fetched(f"{UNION}-2.0") == set()


def test_a_folder_of_several_releases_asks_for_the_file(releases, transformer, tmp_path):
    for version in ("2.0", "2.1"):
        shutil.copy(releases[version][1], tmp_path / releases[version][1].name)
    with pytest.raises(ModelNotFound) as caught:
        load_controlnet(str(tmp_path), transformer, torch.float32, nowhere(tmp_path))
    assert "holds several releases" in str(caught.value) and "Union-2.0.safetensors" in str(caught.value)


def test_missing_weights_say_where_they_were_looked_for(transformer, tmp_path):
    with pytest.raises(ModelNotFound) as caught:
        load_controlnet(str(tmp_path / "cn.safetensors"), transformer, torch.float32, nowhere(tmp_path))
    assert str(caught.value).startswith(f"CONTROLNET_MODEL: no file at {tmp_path / 'cn.safetensors'}")
    with pytest.raises(ModelNotFound) as caught:
        load_controlnet(
            "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union", transformer, torch.float32, nowhere(tmp_path)
        )
    message = str(caught.value)
    assert message.startswith(
        "CONTROLNET_MODEL: no complete model for 'alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union'"
    )
    assert str(tmp_path / "baked" / "Z-Image-Turbo-Fun-Controlnet-Union") in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFound, match="incomplete, missing config.json and"):
        load_controlnet(str(empty), transformer, torch.float32, nowhere(tmp_path))


def test_corrupt_or_foreign_weights_stop_the_start(releases, transformer, tmp_path):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(releases["2.1"][1].read_bytes()[:1000])
    with pytest.raises(ModelNotFound, match="is there but cannot be loaded"):
        load_controlnet(str(truncated), transformer, torch.float32)
    foreign = tmp_path / "lora.safetensors"
    save_file({"layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 32)}, foreign)
    with pytest.raises(ModelNotFound, match="is not a Z-Image-Turbo Fun ControlNet release"):
        load_controlnet(str(foreign), transformer, torch.float32)
    wider = {**transformer.config, "dim": 64}  # a release for another model than ZIMAGE_MODEL
    with pytest.raises(ModelNotFound, match="looks like release 2.1 but its tensors do not fit"):
        load_release(releases["2.1"][1], wider, torch.float32)
    folder = tmp_path / "folder"
    shutil.copytree(releases["2.1"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_heads": 4, "n_kv_heads": 4}))
    with pytest.raises(ModelNotFound, match="does not fit ZIMAGE_MODEL's transformer: n_heads"):
        load_controlnet(str(folder), transformer, torch.float32)


def test_a_missing_depth_model_stops_the_start_and_none_skips_it(tiny_model, releases, tmp_path):
    settings = Settings(
        model=str(tiny_model),
        safety_checker_model="none",
        controlnet_model=str(releases["1.0"][1]),
        depth_model=str(tmp_path / "no-depth"),
    )
    with pytest.raises(ModelNotFound) as caught:
        Worker.start(settings, nowhere(tmp_path))
    assert str(caught.value).startswith(f"DEPTH_MODEL: no complete model for '{tmp_path / 'no-depth'}'")
    # Without a ControlNet the depth model is never looked for.
    plain = Worker.start(Settings(model=str(tiny_model), safety_checker_model="none", depth_model="/nowhere"))
    assert plain.depth is None and set(plain.generator.refusals) == {
        "text-to-image with control",
        "inpainting with control",
    }
