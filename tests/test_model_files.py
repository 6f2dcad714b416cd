"""src/model/files.py: every place a model may be, in order, and the message when none has it.

Each place is a temporary folder (`SearchRoots`); the Hugging Face caches are built in the
real cache layout (blobs, snapshots/<commit>/ of symlinks, refs/main), holding the tiny
pipeline that tests/conftest.py builds with the real diffusers classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

from src.model.files import (
    HOW_TO_FIX,
    ModelNotFound,
    SearchRoots,
    missing_classifier_files,
    missing_pipeline_files,
    resolve_model,
)
from tests.test_builder import COMMIT, LoopbackHub, folder_files

REPO = "Tongyi-MAI/Z-Image-Turbo"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def roots(tmp_path: Path) -> SearchRoots:
    return SearchRoots(
        runpod_cache=tmp_path / "runpod-volume/huggingface-cache/hub",
        volume=tmp_path / "runpod-volume",
        baked=tmp_path / "models",
        hf_cache=tmp_path / "hf-home/hub",
    )


def resolve(setting: str, roots: SearchRoots) -> Path:
    return resolve_model(setting, missing_pipeline_files, "ZIMAGE_MODEL", roots)


def copy_model(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def cache_snapshot(cache: Path, source: Path, commit: str = COMMIT, ref: bool = True) -> Path:
    """`source` as huggingface_hub stores it: blobs by hash, a snapshot of relative symlinks, refs/main."""
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def age(folder: Path, seconds: int) -> None:
    """Make a snapshot folder look older, so 'newest first' has an order to follow."""
    stat = folder.stat()
    os.utime(folder, (stat.st_atime - seconds, stat.st_mtime - seconds))


# --------------------------------------------------------------------------- the order
def test_each_place_in_order(tiny_model, roots):
    """With the model in all five places, each is used only while every earlier one is gone."""
    places = [
        cache_snapshot(roots.runpod_cache, tiny_model),
        copy_model(tiny_model, roots.volume / "models/Z-Image-Turbo"),
        copy_model(tiny_model, roots.volume / REPO),
        copy_model(tiny_model, roots.baked / "Z-Image-Turbo"),
        cache_snapshot(roots.hf_cache, tiny_model),
    ]
    for place in places:
        assert resolve(REPO, roots) == place
        shutil.rmtree(place)
    with pytest.raises(ModelNotFound):
        resolve(REPO, roots)


def test_a_folder_setting_is_used_as_it_is_and_nothing_else_is_searched(tiny_model, roots, tmp_path):
    copy_model(tiny_model, roots.baked / "Z-Image-Turbo")
    assert resolve(str(tiny_model), roots) == tiny_model
    with pytest.raises(ModelNotFound) as error:
        resolve(str(tmp_path / "nowhere"), roots)
    nowhere = tmp_path / "nowhere"
    assert str(error.value) == (
        f"ZIMAGE_MODEL: no complete model for {str(nowhere)!r}. "
        f"Looked in: the folder named by the setting ({nowhere}): not there. "
        + HOW_TO_FIX.format(name="ZIMAGE_MODEL")
    )


def test_a_relative_folder_setting_is_a_folder_not_a_repo_id(tiny_model, roots, tmp_path, monkeypatch):
    copy_model(tiny_model, tmp_path / "work/weights/zimage")
    monkeypatch.chdir(tmp_path / "work")
    assert resolve("./weights/zimage", roots) == Path("weights/zimage")
    assert resolve("weights/zimage", roots) == Path(
        "weights/zimage"
    )  # an existing folder, though Org/Name-like


# ------------------------------------------------------------------ Hugging Face caches
def test_runpod_cache_follows_refs_main(tiny_model, roots):
    main = cache_snapshot(roots.runpod_cache, tiny_model, COMMIT)
    newer = cache_snapshot(roots.runpod_cache, tiny_model, OTHER_COMMIT, ref=False)
    age(main, 3600)
    assert newer.stat().st_mtime > main.stat().st_mtime
    assert resolve(REPO, roots) == main


def test_runpod_cache_without_refs_main_uses_the_newest_complete_snapshot(tiny_model, roots):
    older = cache_snapshot(roots.runpod_cache, tiny_model, COMMIT, ref=False)
    newer = cache_snapshot(roots.runpod_cache, tiny_model, OTHER_COMMIT, ref=False)
    age(older, 3600)
    assert resolve(REPO, roots) == newer
    (newer / "vae/diffusion_pytorch_model.safetensors").unlink()
    assert resolve(REPO, roots) == older


def test_a_cache_entry_whose_blob_is_gone_is_incomplete(tiny_model, roots):
    snapshot = cache_snapshot(roots.runpod_cache, tiny_model)
    (
        snapshot / "transformer/diffusion_pytorch_model.safetensors"
    ).resolve().unlink()  # a dangling symlink now
    baked = copy_model(tiny_model, roots.baked / "Z-Image-Turbo")
    assert resolve(REPO, roots) == baked


def test_the_default_hugging_face_cache_is_huggingface_hubs_own(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    snapshot = cache_snapshot(tmp_path / "hf", tiny_model)
    roots = SearchRoots(runpod_cache=tmp_path / "a", volume=tmp_path / "b", baked=tmp_path / "c")
    assert resolve(REPO, roots) == snapshot


# -------------------------------------------------------------------- incomplete folders
def test_an_incomplete_place_is_reported_and_the_next_one_is_used(tiny_model, roots):
    volume = copy_model(tiny_model, roots.volume / "models/Z-Image-Turbo")
    (volume / "model_index.json").unlink()
    baked = copy_model(tiny_model, roots.baked / "Z-Image-Turbo")
    assert resolve(REPO, roots) == baked
    assert missing_pipeline_files(volume) == ["model_index.json"]


@pytest.mark.parametrize(
    ("remove", "missing"),
    [
        ("model_index.json", ["model_index.json"]),
        ("vae/diffusion_pytorch_model.safetensors", ["vae/*.safetensors"]),
        ("transformer/config.json", ["transformer/config.json"]),
        ("tokenizer/tokenizer_config.json", ["tokenizer/tokenizer_config.json"]),
        ("scheduler/scheduler_config.json", ["scheduler/scheduler_config.json"]),
        ("text_encoder", ["text_encoder/*.safetensors", "text_encoder/config.json"]),
    ],
)
def test_what_an_incomplete_pipeline_lacks(tiny_model, tmp_path, remove, missing):
    folder = copy_model(tiny_model, tmp_path / "m")
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert missing_pipeline_files(folder) == missing


def test_a_sharded_component_needs_every_shard_its_index_names(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m")
    transformer = folder / "transformer"
    weights = transformer / "diffusion_pytorch_model.safetensors"
    shards = [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ]
    weights.rename(transformer / shards[0])
    index = {"metadata": {"total_size": 1}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert missing_pipeline_files(folder) == [f"transformer/{shards[1]}"]
    (transformer / shards[1]).write_bytes(b"")
    assert missing_pipeline_files(folder) == []


def test_an_optional_component_saved_as_null_is_not_required(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"siglip": [None, None]}))
    assert missing_pipeline_files(folder) == []


def test_an_unreadable_model_index_is_reported(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m")
    (folder / "model_index.json").write_text("{not json")
    assert missing_pipeline_files(folder) == ["a readable model_index.json"]


def test_what_an_incomplete_classifier_lacks(never_flags, tmp_path, roots):
    assert missing_classifier_files(never_flags) == []
    folder = copy_model(never_flags, roots.baked / "nsfw_image_detection")
    (folder / "preprocessor_config.json").unlink()
    (folder / "model.safetensors").unlink()
    assert missing_classifier_files(folder) == ["preprocessor_config.json", "*.safetensors"]
    with pytest.raises(ModelNotFound, match="missing preprocessor_config.json, \\*.safetensors"):
        resolve_model(
            "Falconsai/nsfw_image_detection", missing_classifier_files, "SAFETY_CHECKER_MODEL", roots
        )


# ---------------------------------------------------------------------- the message
def test_the_message_lists_every_place_and_how_to_fix_it(tiny_model, roots):
    incomplete = copy_model(tiny_model, roots.baked / "Z-Image-Turbo")
    (incomplete / "transformer/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFound) as error:
        resolve(REPO, roots)
    message = str(error.value)
    assert message.startswith("ZIMAGE_MODEL: no complete model for 'Tongyi-MAI/Z-Image-Turbo'. Looked in: ")
    for place in [
        f"Runpod cached models ({roots.runpod_cache / 'models--Tongyi-MAI--Z-Image-Turbo'}): not there",
        f"network volume ({roots.volume / 'models/Z-Image-Turbo'}): not there",
        f"network volume ({roots.volume / REPO}): not there",
        f"weights baked into the image ({incomplete}): incomplete, missing transformer/*.safetensors",
        f"Hugging Face cache ({roots.hf_cache / 'models--Tongyi-MAI--Z-Image-Turbo'}): not there",
        "download from Hugging Face: off (set ZIMAGE_ALLOW_DOWNLOAD=1 to allow it)",
    ]:
        assert place in message
    assert message.endswith(HOW_TO_FIX.format(name="ZIMAGE_MODEL"))
    assert "docker build" in message and "cached model" in message and "network volume" in message


# ----------------------------------------------------------------------- downloads
@pytest.fixture
def hub(tiny_model):
    server = LoopbackHub({REPO: folder_files(tiny_model) | {"transformer/diffusion_pytorch_model.bin": b"x"}})
    yield server
    server.close()


def test_a_download_is_the_last_resort_and_skips_pickles(tiny_model, roots, hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    allowed = SearchRoots(**{**roots.__dict__, "allow_download": True, "hub_endpoint": hub.url})
    folder = resolve(REPO, allowed)
    assert folder == roots.hf_cache / "models--Tongyi-MAI--Z-Image-Turbo/snapshots" / COMMIT
    assert hub.fetched(REPO) == set(folder_files(tiny_model))
    assert resolve(REPO, roots) == folder  # now cached: found without downloading


def test_no_download_while_hf_hub_offline_and_the_message_says_why(roots, hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    allowed = SearchRoots(**{**roots.__dict__, "allow_download": True, "hub_endpoint": hub.url})
    with pytest.raises(ModelNotFound, match="ZIMAGE_ALLOW_DOWNLOAD=1 but HF_HUB_OFFLINE=1 forbids it"):
        resolve(REPO, allowed)
    assert hub.requests == []


def test_a_failed_download_is_reported(roots, hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.fail = [(404, "RepoNotFound")]
    allowed = SearchRoots(**{**roots.__dict__, "allow_download": True, "hub_endpoint": hub.url})
    with pytest.raises(
        ModelNotFound, match=r"download from Hugging Face: failed \(RepositoryNotFoundError\)"
    ):
        resolve(REPO, allowed)


def test_the_runtime_download_skips_what_the_image_build_skips():
    from builder.download_weights import NEVER
    from src.model.files import NOT_NEEDED

    assert sorted(NOT_NEEDED) == sorted(NEVER)
