"""builder/download_weights.py: options, file selection, downloads from a loopback Hub, bf16 conversion.

The Hub here is a real HTTP server on 127.0.0.1 that answers the few routes huggingface_hub
uses (model info with its files' metadata, tree listing, file resolve), so the real
`snapshot_download` and `model_info` run against it. The conversion is checked where it
matters: the converted folder, loaded by the real `ZImagePipeline.from_pretrained`, makes
exactly the images the original folder makes. The base model is baked beside Turbo with the
components they share on the Hub linked to Turbo's, never fetched twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from safetensors import safe_open
from safetensors.torch import load, save, save_file

from builder import download_weights as dw
from src.control.controlnet import load_controlnet
from src.model.family import same_files
from src.model.files import SearchRoots, missing_classifier_files, missing_pipeline_files
from tests.tiny_controlnets import build_tiny_depth, save_controlnet, save_tile_controlnet

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Files a real repo may hold besides what the worker loads: none of them may be fetched.
NOT_FETCHED = {
    "README.md": b"# card",
    ".gitattributes": b"*.safetensors filter=lfs",
    "assets/showcase.jpg": b"\xff\xd8jpeg",
    "z_image_turbo_bf16.safetensors": b"a root single-file checkpoint",
    "transformer/diffusion_pytorch_model.bin": b"pickle",
    "text_encoder/pytorch_model.pt": b"pickle",
    "vae/diffusion_pytorch_model.ckpt": b"pickle",
    "tokenizer/extra.pkl": b"pickle",
    "onnx/model.onnx": b"onnx",
    "z-image-turbo-Q8_0.gguf": b"gguf",
}


# ------------------------------------------------------------------------ loopback Hub
class LoopbackHub:
    """Serves repos at one commit the way huggingface.co does, recording every request.

    `fail` holds (status, X-Error-Code) answers for the next requests: (503, "") is an
    outage, (404, "RepoNotFound") or (404, "RevisionNotFound") what the Hub says of a
    missing repo or revision.
    """

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        self.fail: list[tuple[int, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                if hub.fail:
                    status, code = hub.fail.pop(0)
                    return self.reply(status, b"{}", {"X-Error-Code": code} if code else {})
                for repo, files in hub.repos.items():
                    if answer := hub.answer(repo, files, path):
                        return self.reply(*answer)
                return self.reply(404, b"{}", {"X-Error-Code": "RepoNotFound"})

            do_HEAD = do_GET

            def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def answer(repo: str, files: dict[str, bytes], path: str) -> tuple[int, bytes, dict[str, str]] | None:
        """The three routes snapshot_download and model_info use, for one repo."""
        api = f"/api/models/{repo}"
        if path in (api, f"{api}/revision/main", f"{api}/revision/{COMMIT}"):
            # Always with what `files_metadata=True` (?blobs=true) adds: extra keys harm no other call.
            siblings = [LoopbackHub.sibling(name, body) for name, body in files.items()]
            info = {"id": repo, "sha": COMMIT, "siblings": siblings}
            return 200, json.dumps(info).encode(), {}
        if path.startswith(f"{api}/tree/{COMMIT}"):
            tree = [
                {"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}  # noqa: S324
                for name, body in files.items()
            ]
            return 200, json.dumps(tree).encode(), {}
        name = path.removeprefix(f"/{repo}/resolve/{COMMIT}/")
        if name in files:
            etag = hashlib.sha1(files[name]).hexdigest()  # noqa: S324
            return 200, files[name], {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}
        return None

    @staticmethod
    def sibling(name: str, body: bytes) -> dict:
        """A file's entry as the Hub lists it: safetensors are in LFS (sha256 of the content, and a
        git blob id of the pointer file), other files in git (blob id of the content)."""
        if not name.endswith(".safetensors"):
            return {"rfilename": name, "size": len(body), "blobId": git_blob_id(body)}
        sha256 = hashlib.sha256(body).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(body)}\n"
        lfs = {"size": len(body), "sha256": sha256, "pointerSize": len(pointer)}
        return {"rfilename": name, "size": len(body), "blobId": git_blob_id(pointer.encode()), "lfs": lfs}

    def fetched(self, repo: str) -> set[str]:
        """The files of `repo` whose bytes were asked for (GET, not HEAD)."""
        prefix = f"GET /{repo}/resolve/{COMMIT}/"
        return {line.removeprefix(prefix) for line in self.requests if line.startswith(prefix)}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def git_blob_id(body: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()  # noqa: S324 (git's own id)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


ZIMAGE, CHECKER = "Tongyi-MAI/Z-Image-Turbo", "Falconsai/nsfw_image_detection"
BASE = "Tongyi-MAI/Z-Image"


def rescaled(body: bytes, factor: float) -> bytes:
    """Other weights of the same shapes: a safetensors file with every float tensor scaled."""
    tensors = load(body)
    return save({name: t * factor if t.is_floating_point() else t for name, t in tensors.items()})


def base_files(tiny_model: Path, vae_differs: bool = True) -> dict[str, bytes]:
    """The base as published beside Turbo: its own transformer, Turbo's text encoder and tokenizer,
    and (unless told otherwise) a VAE of its own."""
    files = folder_files(tiny_model) | NOT_FETCHED
    changed = [name for name in files if name.startswith("transformer/") and name.endswith(".safetensors")]
    if vae_differs:
        changed.append("vae/diffusion_pytorch_model.safetensors")
    return files | {name: rescaled(files[name], 0.5) for name in changed}


@pytest.fixture
def hub(tiny_model: Path, never_flags: Path) -> Iterator[LoopbackHub]:
    """The published repos, each with the files a real repo carries besides the weights we use."""
    server = LoopbackHub(
        {
            ZIMAGE: folder_files(tiny_model) | NOT_FETCHED,
            CHECKER: folder_files(never_flags) | {"pytorch_model.bin": b"pickle", "onnx/model.onnx": b"onnx"},
            BASE: base_files(tiny_model),
        }
    )
    yield server
    server.close()


@pytest.fixture
def sleeps() -> list[float]:
    return []


# ----------------------------------------------------------------------- arguments
def test_arguments_default_to_the_published_repos_at_their_main_branch():
    args = dw.parse_args([])
    assert args.dest == Path("/models")
    assert (args.zimage_repo, args.zimage_revision) == ("Tongyi-MAI/Z-Image-Turbo", None)
    assert (args.safety_repo, args.safety_revision) == ("Falconsai/nsfw_image_detection", None)
    assert args.bf16_components == ["transformer"]
    assert args.retries == 5 and args.endpoint is None


def test_arguments_pin_revisions_and_treat_an_empty_one_as_unpinned():
    # The Dockerfile passes unset build args as "": that must mean "main", not a revision named "".
    args = dw.parse_args(
        ["--dest", "/tmp/m", "--zimage-revision", COMMIT, "--safety-revision", " ", "--bf16-components"]
    )
    assert args.dest == Path("/tmp/m")
    assert args.zimage_revision == COMMIT and args.safety_revision is None
    assert args.bf16_components == []
    assert dw.parse_args(["--safety-repo", "none"]).safety_repo == "none"
    assert dw.parse_args(["--zimage-repo", "none"]).zimage_repo == "none"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--zimage-repo", "Z-Image-Turbo"], "--zimage-repo: 'Z-Image-Turbo' is not a repo id"),
        (["--safety-repo", "a/b/c"], "--safety-repo: 'a/b/c' is not a repo id"),
        (["--retries", "0"], "--retries: 0 is not allowed"),
        (["--zimage-repo", "none", "--safety-repo", "None"], "both 'none': there is nothing to bake"),
        (["--base-repo", "Z-Image"], "--base-repo: 'Z-Image' is not a repo id"),
        (["--base-repo", "someone/Z-Image-Turbo"], "would be baked into the same folder as --zimage-repo"),
    ],
)
def test_bad_arguments_stop_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dw.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ file selection
def test_pipeline_selection_keeps_what_from_pretrained_reads_and_no_pickle():
    wanted = {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    }
    listing = sorted(wanted | set(NOT_FETCHED) | {"text_encoder/generation_config.json"})
    assert set(dw.selected_files(listing, "pipeline")) == wanted


def test_classifier_selection_keeps_safetensors_and_configs_only():
    listing = [
        "README.md",
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tf_model.h5",
        "flax_model.msgpack",
        "onnx/model.onnx",
        "training_args.bin",
    ]
    assert set(dw.selected_files(listing, "classifier")) == {
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    }


def test_selection_of_a_real_pipeline_folder_is_a_complete_pipeline(tiny_model, tmp_path):
    files = folder_files(tiny_model) | NOT_FETCHED
    for name in dw.selected_files(files, "pipeline"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(files[name])
    assert missing_pipeline_files(tmp_path) == []
    assert set(folder_files(tmp_path)) == set(folder_files(tiny_model))


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind: 'lora' is not allowed"):
        dw.allow_patterns("lora")


# ------------------------------------------------------------------------- download
def test_download_fetches_only_the_selected_files(hub, tiny_model, tmp_path, sleeps):
    dest = tmp_path / "Z-Image-Turbo"
    commit = dw.download(ZIMAGE, None, dest, "pipeline", endpoint=hub.url, sleep=sleeps.append)
    assert commit == COMMIT
    assert hub.fetched(ZIMAGE) == set(folder_files(tiny_model))  # nothing of NOT_FETCHED was asked for
    assert folder_files(dest) == folder_files(tiny_model)  # and huggingface_hub's .cache is gone
    assert sleeps == []


def test_download_retries_an_outage_with_backoff(hub, tmp_path, sleeps):
    hub.fail = [(503, ""), (503, "")]
    dest = tmp_path / "Z-Image-Turbo"
    dw.download(ZIMAGE, "main", dest, "pipeline", endpoint=hub.url, sleep=sleeps.append)
    assert sleeps == [2.0, 4.0]
    assert missing_pipeline_files(dest) == []


def test_download_gives_up_after_the_last_attempt(hub, tmp_path, sleeps):
    hub.fail = [(503, "")] * 3
    with pytest.raises(Exception, match="503"):
        dw.download(ZIMAGE, None, tmp_path / "z", "pipeline", 3, hub.url, sleeps.append)
    assert sleeps == [2.0, 4.0]


@pytest.mark.parametrize(
    ("code", "error"),
    [("RepoNotFound", RepositoryNotFoundError), ("RevisionNotFound", RevisionNotFoundError)],
)
def test_download_does_not_retry_a_missing_repo_or_revision(hub, tmp_path, sleeps, code, error):
    hub.fail = [(404, code)]
    with pytest.raises(error):
        dw.download(ZIMAGE, "v9", tmp_path / "z", "pipeline", endpoint=hub.url, sleep=sleeps.append)
    assert sleeps == [] and len(hub.requests) == 1


def test_download_refuses_a_repo_of_the_wrong_kind(hub, tmp_path, sleeps):
    with pytest.raises(dw.NotAModel, match="no model_index.json and safetensors weights to fetch"):
        dw.download(CHECKER, None, tmp_path / "x", "pipeline", endpoint=hub.url, sleep=sleeps.append)
    assert sleeps == [] and hub.fetched(CHECKER) == set()


# ----------------------------------------------------------------------- conversion
def shard_transformer(folder: Path) -> None:
    """Re-save the tiny transformer in several shards with an index, as the real one is published."""
    transformer = ZImageTransformer2DModel.from_pretrained(folder / "transformer")
    shutil.rmtree(folder / "transformer")
    transformer.save_pretrained(folder / "transformer", max_shard_size="400KB", safe_serialization=True)


def dtypes(component: Path) -> set[str]:
    found = set()
    for shard in component.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as reader:
            found |= {str(reader.get_tensor(name).dtype) for name in reader.keys()}  # noqa: SIM118
    return found


def generate(folder: Path) -> np.ndarray:
    pipe = ZImagePipeline.from_pretrained(
        folder, dtype=torch.bfloat16, use_safetensors=True, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt="a photo of a cat sitting on a red sofa",
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images


@pytest.fixture
def sharded_fp32(tiny_model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "original"
    shutil.copytree(tiny_model, folder)
    shard_transformer(folder)
    return folder


def test_bf16_transformer_makes_the_same_images_as_loading_fp32_in_bf16(sharded_fp32, tmp_path):
    converted = tmp_path / "converted"
    shutil.copytree(sharded_fp32, converted)
    index_before = json.loads(
        (converted / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text()
    )
    assert len(set(index_before["weight_map"].values())) > 1, "the test needs a sharded transformer"

    saved = dw.convert_to_bf16(converted / "transformer")

    assert dtypes(sharded_fp32 / "transformer") == {"torch.float32"}
    assert dtypes(converted / "transformer") == {"torch.bfloat16"}
    assert saved == index_before["metadata"]["total_size"] // 2
    assert missing_pipeline_files(converted) == []
    # bf16 rounding at load time and at conversion time is the same round-to-nearest-even,
    # so the weights, and with the same seed the pixels, are identical: no tolerance needed.
    original, halved = generate(sharded_fp32), generate(converted)
    assert original.shape == (1, 256, 256, 3)
    assert np.isfinite(original).all() and original.std() > 0.01  # a real picture, not NaN or flat
    np.testing.assert_array_equal(halved, original)


def test_conversion_rewrites_the_index_and_keeps_shard_names(sharded_fp32):
    component = sharded_fp32 / "transformer"
    index_file = component / "diffusion_pytorch_model.safetensors.index.json"
    before = json.loads(index_file.read_text())
    sizes = {p.name: p.stat().st_size for p in component.glob("*.safetensors")}

    dw.convert_to_bf16(component)

    after = json.loads(index_file.read_text())
    assert after["weight_map"] == before["weight_map"]
    assert after["metadata"]["total_size"] == before["metadata"]["total_size"] // 2
    assert {p.name for p in component.glob("*")} == set(sizes) | {index_file.name, "config.json"}
    for name, size in sizes.items():  # about half: each file also holds a small JSON header
        assert (component / name).stat().st_size < size * 0.6
    assert "dtype" not in json.loads((component / "config.json").read_text())  # diffusers configs have none


def test_conversion_sets_a_dtype_the_config_already_names(tiny_model, tmp_path):
    text_encoder = shutil.copytree(tiny_model / "text_encoder", tmp_path / "text_encoder")
    assert json.loads((text_encoder / "config.json").read_text())["dtype"] == "float32"
    dw.convert_to_bf16(text_encoder)
    assert json.loads((text_encoder / "config.json").read_text())["dtype"] == "bfloat16"
    assert dtypes(text_encoder) == {"torch.bfloat16"}


def test_conversion_leaves_fp32_modules_and_integers_alone(tmp_path):
    # WanTransformer3DModel keeps its norms in fp32 when loaded in bf16 (`_keep_in_fp32_modules`).
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    tensors = {
        "blocks.0.attn1.to_q.weight": torch.randn(4, 4),
        "blocks.0.norm2.weight": torch.randn(4),
        "blocks.0.step": torch.arange(3),
    }
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    dw.convert_to_bf16(tmp_path)
    with safe_open(tmp_path / "diffusion_pytorch_model.safetensors", framework="pt") as reader:
        assert reader.metadata() == {"format": "pt"}
        assert reader.get_tensor("blocks.0.attn1.to_q.weight").dtype == torch.bfloat16
        assert torch.equal(reader.get_tensor("blocks.0.norm2.weight"), tensors["blocks.0.norm2.weight"])
        assert torch.equal(reader.get_tensor("blocks.0.step"), tensors["blocks.0.step"])


# ------------------------------------------------------------------------------ main
def test_main_bakes_both_models_where_the_worker_looks(hub, never_flags, tmp_path):
    assert dw.main(["--dest", str(tmp_path), "--endpoint", hub.url]) == 0

    # /models/<repo name>: the folders src/model/files.py checks for baked weights.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Z-Image-Turbo", "nsfw_image_detection"]
    assert missing_pipeline_files(tmp_path / "Z-Image-Turbo") == []
    assert dtypes(tmp_path / "Z-Image-Turbo/transformer") == {"torch.bfloat16"}
    assert dtypes(tmp_path / "Z-Image-Turbo/vae") == {"torch.float32"}  # only the listed components
    assert missing_classifier_files(tmp_path / "nsfw_image_detection") == []
    assert folder_files(tmp_path / "nsfw_image_detection") == folder_files(never_flags)
    assert hub.fetched(CHECKER) == set(folder_files(never_flags))


def test_main_without_a_checker_bakes_the_pipeline_only(hub, tmp_path):
    assert dw.main(["--dest", str(tmp_path), "--endpoint", hub.url, "--safety-repo", "none"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["Z-Image-Turbo"]
    assert hub.fetched(CHECKER) == set()


def test_main_without_the_pipeline_bakes_the_checker_only(hub, never_flags, tmp_path):
    """BAKE_WEIGHTS=safety: Z-Image comes from the endpoint's cached model, which holds one repo."""
    assert dw.main(["--dest", str(tmp_path), "--endpoint", hub.url, "--zimage-repo", "none"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["nsfw_image_detection"]
    assert folder_files(tmp_path / "nsfw_image_detection") == folder_files(never_flags)
    assert hub.fetched(ZIMAGE) == set()


def test_main_bakes_one_controlnet_release_and_the_depth_model_where_the_worker_looks(tiny_model, tmp_path):
    """A ControlNet repo holds several releases: only the named one comes down, found as the worker looks."""
    repo, depth_repo = (
        "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1",
        "depth-anything/Depth-Anything-V2-Small-hf",
    )
    _, release = save_controlnet(tiny_model, "2.1", tmp_path / "made")
    depth = build_tiny_depth(tmp_path / "made" / "depth")
    files = {
        "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors": release.read_bytes(),
        "Z-Image-Turbo-Fun-Controlnet-Union-2.1-8steps.safetensors": release.read_bytes(),
        "asset/pose.jpg": b"jpeg",
    }
    server = LoopbackHub({repo: files, depth_repo: folder_files(depth) | {"pytorch_model.bin": b"pickle"}})
    try:
        args = [
            "--zimage-repo",
            "none",
            "--safety-repo",
            "none",
            "--controlnet-repo",
            repo,
            "--depth-repo",
            depth_repo,
        ]
        models = tmp_path / "models"
        assert dw.main(["--dest", str(models), "--endpoint", server.url, *args]) == 0
        assert server.fetched(repo) == {"Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors"}
        assert server.fetched(depth_repo) == set(folder_files(depth))
    finally:
        server.close()
    assert sorted(p.name for p in models.iterdir()) == [
        "Depth-Anything-V2-Small-hf",
        "Z-Image-Turbo-Fun-Controlnet-Union-2.1",
    ]
    transformer = ZImageTransformer2DModel.from_pretrained(tiny_model / "transformer")
    roots = SearchRoots(
        runpod_cache=tmp_path / "rp", volume=tmp_path / "vol", baked=models, hf_cache=tmp_path / "hf"
    )
    controlnet = load_controlnet(repo, transformer, torch.float32, roots)
    assert controlnet.config.add_control_noise_refiner == "control_noise_refiner"
    assert missing_classifier_files(models / "Depth-Anything-V2-Small-hf") == []


def test_main_bakes_the_tile_controlnet_beside_the_union_where_the_worker_looks(tiny_model, tmp_path):
    """TILE_CONTROLNET names one file of alibaba-pai's Union 2.1 repo: only it comes down, into that
    repo's folder, and TILE_CONTROLNET_MODEL (the same string) finds it there."""
    repo = "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1"
    tile_file = "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-8steps.safetensors"
    release = save_tile_controlnet(tiny_model, tmp_path / "made")
    files = {
        "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors": b"not fetched",
        tile_file: release.read_bytes(),
    }
    server = LoopbackHub({repo: files})
    setting = f"{repo}/{tile_file}"
    try:
        models = tmp_path / "models"
        args = ["--zimage-repo", "none", "--safety-repo", "none", "--tile-controlnet", setting]
        assert dw.main(["--dest", str(models), "--endpoint", server.url, *args]) == 0
        assert server.fetched(repo) == {tile_file}
    finally:
        server.close()
    transformer = ZImageTransformer2DModel.from_pretrained(tiny_model / "transformer")
    roots = SearchRoots(
        runpod_cache=tmp_path / "rp", volume=tmp_path / "vol", baked=models, hf_cache=tmp_path / "hf"
    )
    tile = load_controlnet(setting, transformer, torch.float32, roots, "TILE_CONTROLNET_MODEL")
    assert tile.config.add_control_noise_refiner == "control_noise_refiner"


def test_the_tile_controlnet_build_arg_is_a_file_of_a_repo_or_none():
    assert dw.parse_args(["--tile-controlnet", ""]).tile_controlnet == "none"
    with pytest.raises(SystemExit):
        dw.parse_args(["--tile-controlnet", "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1"])


def test_an_unset_controlnet_build_arg_bakes_no_controlnet():
    args = dw.parse_args(["--controlnet-repo", "", "--depth-repo", ""])
    assert (args.controlnet_repo, args.depth_repo, args.controlnet_file) == ("none", "none", None)
    with pytest.raises(ValueError, match="name one .safetensors file"):
        dw.allow_patterns("controlnet", "model.ckpt")


# ---------------------------------------------------------------------- the base model
def test_the_base_is_not_baked_unless_asked_and_an_unset_build_arg_means_none():
    assert (dw.parse_args([]).base_repo, dw.parse_args([]).base_revision) == ("none", None)
    args = dw.parse_args(["--base-repo", "", "--base-revision", ""])
    assert (args.base_repo, args.base_revision) == ("none", None)
    # The base alone is something to bake.
    assert (
        dw.parse_args(["--zimage-repo", "none", "--safety-repo", "none", "--base-repo", BASE]).base_repo
        == BASE
    )


def test_shared_components_are_those_whose_every_file_is_the_same():
    turbo = {"text_encoder/a.safetensors": "1", "text_encoder/config.json": "2", "vae/v.safetensors": "3"}
    assert dw.shared_components(turbo, dict(turbo)) == ["text_encoder", "vae"]
    assert dw.shared_components(turbo, turbo | {"vae/v.safetensors": "4"}) == ["text_encoder"]
    assert dw.shared_components(turbo, turbo | {"text_encoder/b.safetensors": "5"}) == ["vae"]  # a file more
    assert dw.shared_components(turbo, {}) == []
    unknown = dict.fromkeys(turbo)  # no metadata from the Hub: never taken for the same
    assert dw.shared_components(unknown, unknown) == []


def test_file_ids_are_the_lfs_sha256_or_the_git_blob_id(hub, tiny_model):
    commit, ids = dw.file_ids(ZIMAGE, None, endpoint=hub.url)
    assert commit == COMMIT
    files = folder_files(tiny_model)
    assert set(ids) == set(files)  # what `download` would fetch: nothing of NOT_FETCHED
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert ids[vae] == hashlib.sha256(files[vae]).hexdigest()
    assert ids["vae/config.json"] == git_blob_id(files["vae/config.json"])
    assert hub.fetched(ZIMAGE) == set()  # the metadata only


def test_main_bakes_the_base_beside_turbo_linking_what_they_share(hub, tiny_model, tmp_path, caplog):
    caplog.set_level("INFO", logger="download_weights")
    assert dw.main(["--dest", str(tmp_path), "--endpoint", hub.url, "--base-repo", BASE]) == 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["Z-Image", "Z-Image-Turbo", "nsfw_image_detection"]
    turbo, base = tmp_path / "Z-Image-Turbo", tmp_path / "Z-Image"
    # Text encoder and tokenizer are Turbo's: not fetched, and links to Turbo's baked folders.
    fetched = hub.fetched(BASE)
    assert fetched and not {name for name in fetched if name.startswith(("text_encoder/", "tokenizer/"))}
    for component in ("text_encoder", "tokenizer"):
        link = base / component
        assert link.is_symlink() and os.readlink(link) == f"../Z-Image-Turbo/{component}"  # relative
        assert link.resolve() == (turbo / component).resolve()
        assert same_files(turbo / component, link)  # what the worker checks before sharing
        assert f"its {component} is {ZIMAGE}'s" in caplog.text
    # Its own VAE and transformer are fetched, and its transformer is stored in bf16 too.
    assert {name for name in folder_files(tiny_model) if name.startswith(("vae/", "transformer/"))} <= fetched
    assert not (base / "vae").is_symlink() and not same_files(turbo / "vae", base / "vae")
    assert f"its vae differs from {ZIMAGE}'s: fetched" in caplog.text
    assert missing_pipeline_files(base) == []
    assert dtypes(base / "transformer") == {"torch.bfloat16"}
    assert dtypes(base / "vae") == {"torch.float32"}
    assert not set(NOT_FETCHED) & fetched


def test_a_base_with_turbos_vae_links_that_too(tiny_model, tmp_path):
    server = LoopbackHub({ZIMAGE: folder_files(tiny_model), BASE: base_files(tiny_model, vae_differs=False)})
    try:
        args = ["--safety-repo", "none", "--base-repo", BASE, "--bf16-components"]
        assert dw.main(["--dest", str(tmp_path), "--endpoint", server.url, *args]) == 0
        fetched = server.fetched(BASE)
    finally:
        server.close()
    base = tmp_path / "Z-Image"
    assert all(name.startswith(("model_index.json", "scheduler/", "transformer/")) for name in fetched)
    assert {p.name for p in base.iterdir() if p.is_symlink()} == set(dw.SHAREABLE)
    assert missing_pipeline_files(base) == []


def test_a_base_without_turbo_is_baked_whole(hub, tiny_model, tmp_path):
    args = ["--zimage-repo", "none", "--safety-repo", "none", "--base-repo", BASE]
    assert dw.main(["--dest", str(tmp_path), "--endpoint", hub.url, *args]) == 0
    base = tmp_path / "Z-Image"
    assert [p.name for p in tmp_path.iterdir()] == ["Z-Image"]
    assert not [p for p in base.iterdir() if p.is_symlink()]
    assert hub.fetched(BASE) == set(folder_files(tiny_model)) and hub.fetched(ZIMAGE) == set()
    assert missing_pipeline_files(base) == []
    assert dtypes(base / "transformer") == {"torch.bfloat16"}


# ------------------------------------------------------------------------ the prompt expander
EXPANDER = "Qwen/Qwen3-4B"


def expander_files(tiny_model: Path, tmp_path: Path) -> dict[str, bytes]:
    """The expander as Qwen3-4B is published beside Z-Image-Turbo, at toy size: shard 1 is byte for
    byte a file of Turbo's text encoder, shard 2 holds the last layer's MLP: its up and down
    projections differ, its gate projection is the encoder's (so shard 2 is compared, not linked)."""
    from builder.tiny_model import build_tiny_expander

    folder = build_tiny_expander(tiny_model, tmp_path / "tiny-qwen3")
    own = load((folder / "model.safetensors").read_bytes())
    differing = {name: own[name] for name in own if name.startswith("model.layers.1.mlp.")}
    encoder_file = (tiny_model / "text_encoder" / "model.safetensors").read_bytes()
    weight_map = {f"model.{name}": "model-00001-of-00002.safetensors" for name in load(encoder_file)}
    weight_map |= dict.fromkeys(differing, "model-00002-of-00002.safetensors")
    files = {name: body for name, body in folder_files(folder).items() if not name.endswith(".safetensors")}
    return files | {
        "model-00001-of-00002.safetensors": encoder_file,
        "model-00002-of-00002.safetensors": save(differing),
        "model.safetensors.index.json": json.dumps({"metadata": {}, "weight_map": weight_map}).encode(),
        "pytorch_model.bin": b"pickle",
    }


def test_main_bakes_only_the_expanders_differing_files_and_links_the_rest(tiny_model, tmp_path, caplog):
    from src.model.expander_weights import load_expander_model, missing_expander_files

    caplog.set_level("INFO")
    server = LoopbackHub({ZIMAGE: folder_files(tiny_model), EXPANDER: expander_files(tiny_model, tmp_path)})
    dest = tmp_path / "models"
    try:
        args = ["--safety-repo", "none", "--expander-repo", EXPANDER]
        assert dw.main(["--dest", str(dest), "--endpoint", server.url, *args]) == 0
        fetched = server.fetched(EXPANDER)
    finally:
        server.close()
    folder, turbo = dest / "Qwen3-4B", dest / "Z-Image-Turbo"
    assert "model-00002-of-00002.safetensors" in fetched and "config.json" in fetched
    assert "model-00001-of-00002.safetensors" not in fetched and "pytorch_model.bin" not in fetched
    link = folder / "model-00001-of-00002.safetensors"
    assert link.is_symlink() and os.readlink(link) == "../Z-Image-Turbo/text_encoder/model.safetensors"
    assert missing_expander_files(folder) == []
    assert (
        f"model-00002-of-00002.safetensors differs from every file of {ZIMAGE}'s text encoder" in caplog.text
    )
    # The worker then shares what the link points at without reading it, compares shard 2 and
    # loads its two differing tensors only.
    pipe = ZImagePipeline.from_pretrained(turbo, dtype=torch.float32, local_files_only=True)
    causal = load_expander_model(folder, pipe.text_encoder, turbo / "text_encoder")
    assert "22 tensors are the text encoder's (21 by file, 1 compared), 2 loaded" in caplog.text
    own = {p.data_ptr() for p in pipe.text_encoder.parameters()}
    assert len({p.data_ptr() for p in causal.parameters()} - own) == 2


def test_an_expander_without_turbo_is_baked_whole(tiny_model, tmp_path):
    files = expander_files(tiny_model, tmp_path)
    server = LoopbackHub({EXPANDER: files})
    try:
        args = ["--zimage-repo", "none", "--safety-repo", "none", "--expander-repo", EXPANDER]
        assert dw.main(["--dest", str(tmp_path / "models"), "--endpoint", server.url, *args]) == 0
        fetched = server.fetched(EXPANDER)
    finally:
        server.close()
    assert fetched == set(files) - {"pytorch_model.bin"}
    assert not [p for p in (tmp_path / "models" / "Qwen3-4B").iterdir() if p.is_symlink()]
