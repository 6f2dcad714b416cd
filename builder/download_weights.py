"""Bake the weights into the image: fetch what the worker loads, then shrink the transformer to bf16.

    python builder/download_weights.py --dest /models \\
        --zimage-repo Tongyi-MAI/Z-Image-Turbo --zimage-revision <commit> \\
        --safety-repo Falconsai/nsfw_image_detection --safety-revision <commit> \\
        [--base-repo Tongyi-MAI/Z-Image --base-revision <commit>] \\
        [--expander-repo Qwen/Qwen3-4B --expander-revision <commit>]

Writes /models/<repo name> for each repo, where src/model/files.py looks for baked weights.
Only safetensors and the configs and tokenizer files that `from_pretrained` reads are
fetched: never pickles (.bin, .pt, .ckpt) nor other runtimes' formats (.onnx, .gguf).

Z-Image Turbo's transformer is published in fp32 (about 24.6 GB). The worker runs it in
bf16 and `from_pretrained(dtype=torch.bfloat16)` rounds every weight to bf16 at load, so
storing it already rounded (about 12.3 GB) gives the very same weights on the GPU while
the image is 12 GB smaller and a cold start reads half the bytes.

This file imports nothing from src/: the Dockerfile copies it alone before the weights
layer, so a change to the worker's code does not download 33 GB again.

The undistilled base Z-Image (`--base-repo`) is baked the same way, but the components it
may share with Turbo (text encoder, tokenizer, VAE: 8 GB) are compared on the Hub first,
file by file; the ones that are the same are not fetched again, and the base's folder links
to Turbo's (the worker then loads them once, for both models).

The prompt expander (`--expander-repo`, a Qwen3 causal LM) is baked the same way, file by file:
each of its safetensors whose Hub sha256 is that of a file of Turbo's text encoder is not
fetched but linked to that file (for Qwen/Qwen3-4B beside Z-Image-Turbo, by public hashes,
shards 1 and 2 of 3), so the worker shares those tensors without reading them
(src/model/expander_weights.py); the other files are fetched.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("download_weights")
T = TypeVar("T")

# What `ZImagePipeline.from_pretrained(use_safetensors=True)` reads: the index, each
# component's config and safetensors (with their shard index), the scheduler and tokenizer.
# Safetensors are taken from component folders only ("*/"): a single-file checkpoint at a
# repo's root is another copy of the same weights.
PIPELINE_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/*",
    "tokenizer/*",
    "*/*.safetensors",
    "*/*.safetensors.index.json",
]
# What `AutoModelForImageClassification` and `AutoImageProcessor` read (and the depth-estimation
# classes: Depth Anything's repo has the same files).
CLASSIFIER_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json"]
# A diffusers-format ControlNet (`ZImageControlNetModel.from_pretrained`); alibaba-pai's repos
# instead hold several single-file releases, of which `--controlnet-file` picks one.
CONTROLNET_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json"]
# What `AutoConfig`, `AutoTokenizer` and the expander's safetensors loading read from a causal LM.
CAUSAL_LM_PATTERNS = ["*.json", "merges.txt", "*.jinja", "*.safetensors"]
# Never fetched, even where an allow pattern such as "tokenizer/*" would match: pickles run
# code when loaded, and the other formats are not read by this worker.
NEVER = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.onnx", "*.onnx_data", "*.gguf", "*.msgpack", "*.h5"]
# Components stored in bf16 after download (the worker casts every component to bf16 at load).
BF16_COMPONENTS = ("transformer",)
# The components src/model/family.py shares between Turbo and the base when their files are
# the same (SHAREABLE there): the base's folder then links to Turbo's instead of a second copy.
SHAREABLE = ("text_encoder", "tokenizer", "vae")
WIDE_FLOATS = ("float32", "float64")


# Each repo the image can bake: --<name>-repo (a repo id, or 'none'; an unset Docker build arg,
# "", is none) and --<name>-revision (a branch, tag or commit; "" is the default branch).
REPOS = (
    ("zimage", "Tongyi-MAI/Z-Image-Turbo",
     "diffusers repo id, or 'none' to bake the checker only (Runpod cached models hold one repo)"),
    ("safety", "Falconsai/nsfw_image_detection", "image classifier repo id, or 'none' to bake no checker"),
    ("base", "none",
     "the undistilled base Z-Image repo id (Tongyi-MAI/Z-Image), or 'none' (the default) to bake "
     "no base; the components it has the same as --zimage-repo's are linked, not fetched again"),
    ("controlnet", "none",
     "Z-Image-Turbo Fun ControlNet Union repo id, or 'none' (the default) to bake no ControlNet"),
    ("depth", "none",
     "depth-estimation repo id for control_preprocess 'depth', baked only with a ControlNet"),
    ("expander", "none",
     "the prompt expander, a Qwen3 causal LM repo id (Qwen/Qwen3-4B), or 'none' (the default); "
     "its safetensors that are files of --zimage-repo's text encoder are linked, not fetched"),
    ("pose", "none", "ViTPose repo id for control_preprocess 'pose', baked only with a ControlNet"),
    ("pose-detector", "PekingU/rtdetr_r50vd_coco_o365",
     "RT-DETR person detector repo id, baked beside --pose-repo"),
)  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; an empty revision (an unset Docker build arg) means the default branch."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dest", type=Path, default=Path("/models"), help="folder that receives <repo name>/"
    )
    for name, default, about in REPOS:
        parser.add_argument(f"--{name}-repo", type=_none_if_empty, default=default, help=about)
        parser.add_argument(f"--{name}-revision", type=_revision, default=None, help="branch, tag or commit")
    parser.add_argument(
        "--controlnet-file",
        type=_revision,
        default=None,
        help="the single-file release to take from --controlnet-repo (default: <repo name>.safetensors)",
    )
    parser.add_argument(
        "--tile-controlnet",
        type=_none_if_empty,
        default="none",
        help="the Tile ControlNet for upscaling as TILE_CONTROLNET_MODEL names it, Org/Name/file.safetensors "
        "(alibaba-pai keeps Tile 2.1 beside Union 2.1), or 'none' (the default)",
    )
    parser.add_argument(
        "--tile-controlnet-revision", type=_revision, default=None, help="branch, tag or commit"
    )
    parser.add_argument(
        "--bf16-components",
        nargs="*",
        default=list(BF16_COMPONENTS),
        help="pipeline components rewritten in bf16 (none: keep the published precision)",
    )
    parser.add_argument("--retries", type=int, default=5, help="attempts per repo before giving up")
    parser.add_argument(
        "--endpoint", default=None, help="Hub address (default: HF_ENDPOINT or huggingface.co)"
    )
    args = parser.parse_args(argv)
    for name, _, _ in REPOS:
        repo = getattr(args, f"{name.replace('-', '_')}_repo")
        if repo.lower() != "none" and repo.count("/") != 1:
            parser.error(f"--{name}-repo: {repo!r} is not a repo id of the form Org/Name (or none)")
    if args.tile_controlnet.lower() != "none":
        repo, _, file = args.tile_controlnet.rpartition("/")
        if repo.count("/") != 1 or not file.endswith(".safetensors"):
            parser.error(
                f"--tile-controlnet: {args.tile_controlnet!r} is not Org/Name/file.safetensors (or none), "
                "e.g. alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1/"
                "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-8steps.safetensors"
            )
    repos = (
        args.zimage_repo,
        args.safety_repo,
        args.controlnet_repo,
        args.base_repo,
        args.expander_repo,
        args.tile_controlnet,
    )
    if all(repo.lower() == "none" for repo in repos):
        parser.error(
            "--zimage-repo and --safety-repo are both 'none': there is nothing to bake "
            "(and no --controlnet-repo, --base-repo or --expander-repo)"
        )
    turbo_name, base_name = (repo.split("/")[-1].lower() for repo in (args.zimage_repo, args.base_repo))
    if base_name != "none" and base_name == turbo_name:
        parser.error(
            f"--base-repo: {args.base_repo!r} would be baked into the same folder as --zimage-repo "
            f"{args.zimage_repo!r}: name another repo (Tongyi-MAI/Z-Image) or none"
        )
    if args.retries < 1:
        parser.error(f"--retries: {args.retries} is not allowed: use 1 or more")
    return args


def _revision(value: str) -> str | None:
    return value.strip() or None


def _none_if_empty(value: str) -> str:
    # An unset Docker build arg arrives as "": nothing to bake.
    return value.strip() or "none"


def allow_patterns(kind: str, file: str | None = None) -> list[str]:
    """The files to fetch for a `pipeline` (diffusers), `classifier` (transformers) or `controlnet` repo.

    For a ControlNet, `file` names the one single-file release to take (it must be safetensors).
    """
    patterns = {
        "pipeline": PIPELINE_PATTERNS,
        "classifier": CLASSIFIER_PATTERNS,
        "controlnet": CONTROLNET_PATTERNS,
        "causal_lm": CAUSAL_LM_PATTERNS,
    }
    if kind not in patterns:
        raise ValueError(
            f"kind: {kind!r} is not allowed: use 'pipeline', 'classifier', 'controlnet' or 'causal_lm'"
        )
    if kind == "controlnet" and file is not None:
        if not file.endswith(".safetensors") or "/" in file or ".." in file:
            raise ValueError(f"file: {file!r} is not allowed: name one .safetensors file at the repo's root")
        return [file]
    return list(patterns[kind])


def selected_files(
    names: Iterable[str], kind: str, file: str | None = None, skip: Sequence[str] = ()
) -> list[str]:
    """Which of a repo's file names `download` fetches (the filter snapshot_download applies).

    `skip` names component folders left out (those the base links to Turbo's), or single
    .safetensors files (those the expander links to Turbo's text encoder's).
    """
    from huggingface_hub.utils import filter_repo_objects

    patterns = allow_patterns(kind, file)
    ignored = _ignore_patterns(skip)
    return list(filter_repo_objects(list(names), allow_patterns=patterns, ignore_patterns=ignored))


def _ignore_patterns(skip: Sequence[str]) -> list[str]:
    return [*NEVER, *(name if name.endswith(".safetensors") else f"{name}/*" for name in skip)]


class IncompleteDownload(RuntimeError):
    """The download ended without every file it should have fetched (retried)."""


class NotAModel(RuntimeError):
    """The repo has none of the files this kind of model needs (not retried)."""


def download(
    repo_id: str,
    revision: str | None,
    dest: Path,
    kind: str,
    retries: int = 5,
    endpoint: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    file: str | None = None,
    skip: Sequence[str] = (),
) -> str:
    """Fetch the files `kind` needs into `dest`, but none under the `skip` folders; returns the
    commit they came from.

    The revision is resolved to a commit first, so every attempt fetches the same files,
    and after each attempt every file the repo lists (and the patterns select) must be on
    disk: snapshot_download returns a partly filled folder as it is when the Hub cannot be
    reached. Attempts are spaced 2, 4, 8 ... s apart (at most 60 s); a missing repo,
    revision or access is not retried, since waiting would not change the answer.
    """
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(endpoint=endpoint)

    def attempt() -> tuple[str, list[str]]:
        info = api.model_info(repo_id, revision=revision)
        wanted = selected_files((sibling.rfilename for sibling in info.siblings or []), kind, file, skip)
        _check_selection(repo_id, kind, wanted)
        snapshot_download(
            repo_id,
            revision=info.sha,
            local_dir=dest,
            allow_patterns=allow_patterns(kind, file),
            ignore_patterns=_ignore_patterns(skip),
            endpoint=endpoint,
        )
        missing = [name for name in wanted if not (dest / name).is_file()]
        if missing:
            raise IncompleteDownload(f"{len(missing)} file(s) missing after the download, e.g. {missing[0]}")
        return str(info.sha), wanted

    commit, wanted = _with_retries(repo_id, attempt, retries, sleep)
    # huggingface_hub's bookkeeping of the download; stale once files are rewritten below.
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    log.info("%s: %d files at commit %s in %s", repo_id, len(wanted), commit, dest)
    return commit


def file_ids(
    repo_id: str,
    revision: str | None,
    retries: int = 5,
    endpoint: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    kind: str = "pipeline",
) -> tuple[str, dict[str, str | None]]:
    """The commit `revision` names, and for each `kind` file `download` would fetch, what the
    Hub says its content is: the sha256 of an LFS file (the weights), else its git blob id.

    None where the Hub gave neither: such a file is never taken for the same as another.
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint)

    def attempt() -> tuple[str, dict[str, str | None]]:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
        ids = {}
        for name in selected_files(siblings, kind):
            sibling = siblings[name]
            ids[name] = sibling.lfs.sha256 if sibling.lfs else sibling.blob_id
        return str(info.sha), ids

    return _with_retries(repo_id, attempt, retries, sleep)


def shared_components(turbo: dict[str, str | None], base: dict[str, str | None]) -> list[str]:
    """The SHAREABLE components whose files (names and contents, per `file_ids`) are all the same."""
    shared = []
    for component in SHAREABLE:
        ours, theirs = (
            {name: id_ for name, id_ in ids.items() if name.startswith(f"{component}/")}
            for ids in (turbo, base)
        )
        if ours and ours == theirs and None not in ours.values():
            shared.append(component)
    return shared


def same_weights(lm: dict[str, str | None], turbo: dict[str, str | None]) -> dict[str, str]:
    """Each of the expander's safetensors with the sha256 of a file of Turbo's text encoder: that file."""
    encoder = {
        id_: name
        for name, id_ in turbo.items()
        if name.startswith("text_encoder/") and name.endswith(".safetensors") and id_
    }
    return {
        name: encoder[id_] for name, id_ in lm.items() if name.endswith(".safetensors") and id_ in encoder
    }


def link_file(link: Path, target: Path) -> None:
    """Make `link` a relative symlink to the file `target` (both under /models)."""
    if link.is_symlink() or link.exists():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def link_component(link: Path, target: Path) -> None:
    """Make `link` a relative symlink to `target` (both under /models: the link survives a move)."""
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)  # a copy left by an earlier run
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def _with_retries(repo_id: str, attempt: Callable[[], T], retries: int, sleep: Callable[[float], None]) -> T:
    """`attempt()`, tried up to `retries` times 2, 4, 8 ... s apart (at most 60 s), except for
    the answers waiting would not change: a missing repo, revision or access, not a model."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    for number in range(1, retries + 1):
        try:
            return attempt()
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, NotAModel):
            raise
        except Exception as err:  # network, rate limit, Hub outage, disk: any may pass on a retry
            if number == retries:
                raise
            delay = min(2.0**number, 60.0)
            log.warning(
                "%s: attempt %d of %d failed (%s); retrying in %.0f s", repo_id, number, retries, err, delay
            )
            sleep(delay)
    raise ValueError(f"retries: {retries} is not allowed: use 1 or more")


def _check_selection(repo_id: str, kind: str, wanted: list[str]) -> None:
    """Patterns that match nothing download nothing, silently: fail the build here instead."""
    if kind == "controlnet":
        if not any(name.endswith(".safetensors") for name in wanted):
            raise NotAModel(
                f"{repo_id}: no such safetensors ControlNet release (or diffusers folder) to fetch"
            )
        return
    index = "model_index.json" if kind == "pipeline" else "config.json"
    if index not in wanted or not any(name.endswith(".safetensors") for name in wanted):
        what = "a diffusers pipeline" if kind == "pipeline" else "a transformers model"
        raise NotAModel(
            f"{repo_id}: no {index} and safetensors weights to fetch; is it {what} in safetensors?"
        )


def convert_to_bf16(component: Path) -> int:
    """Rewrite a model folder's fp32 safetensors as bf16 in place; returns the bytes saved.

    Shards keep their names, so the index's weight map stays valid; its total size and the
    config's dtype are updated. Tensors the model class keeps in fp32 (`_keep_in_fp32_modules`,
    which `from_pretrained` would also leave in fp32) and non-float tensors are left as they are.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    keep = _keep_in_fp32(component)
    before = after = 0
    for shard in sorted(component.glob("*.safetensors")):
        tensors = {}
        # One shard in memory at a time (the real ones are a few GB each).
        with safe_open(shard, framework="pt") as reader:
            metadata = reader.metadata()
            for name in reader.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = reader.get_tensor(name)
                before += tensor.nbytes
                if str(tensor.dtype).removeprefix("torch.") in WIDE_FLOATS and not _kept(name, keep):
                    tensor = tensor.to(torch.bfloat16)
                after += tensor.nbytes
                tensors[name] = tensor.contiguous()
        # Write beside, then rename: an interrupted build never leaves a half-written shard.
        # (A symlink into a Hugging Face cache is replaced by the file; the blob is untouched.)
        partial = shard.with_name(shard.name + ".partial")
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, shard)
        del tensors
    _update_index(component, after)
    _update_config_dtype(component)
    log.info("%s: %.2f GB -> %.2f GB", component, before / 1e9, after / 1e9)
    return before - after


def _keep_in_fp32(component: Path) -> list[str]:
    """The model class's `_keep_in_fp32_modules`, found from its config (diffusers or transformers)."""
    config = json.loads((component / "config.json").read_text())
    names = [config.get("_class_name"), *(config.get("architectures") or [])]
    for library in ("diffusers", "transformers"):
        module = importlib.import_module(library)
        for name in filter(None, names):
            model_class = getattr(module, name, None)
            if model_class is not None:
                keep = getattr(model_class, "_keep_in_fp32_modules", None) or []
                return [*keep, *(getattr(model_class, "_keep_in_fp32_modules_strict", None) or [])]
    return []


def _kept(tensor_name: str, keep: list[str]) -> bool:
    # The same test diffusers applies when loading: a module name among the dotted parts.
    return any(module in tensor_name.split(".") for module in keep)


def _update_index(component: Path, total_size: int) -> None:
    for index_file in component.glob("*.safetensors.index.json"):
        index = json.loads(index_file.read_text())
        index.setdefault("metadata", {})["total_size"] = total_size
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _update_config_dtype(component: Path) -> None:
    """Only keys already there: diffusers configs carry none, transformers ones `dtype`/`torch_dtype`."""
    config_file = component / "config.json"
    config = json.loads(config_file.read_text())
    keys = [key for key in ("torch_dtype", "dtype") if key in config]
    if keys:
        config.update(dict.fromkeys(keys, "bfloat16"))
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def repo_folder(dest: Path, repo_id: str) -> Path:
    """/models/<repo name>: the path src/model/files.py checks for baked weights."""
    return dest / repo_id.split("/")[-1]


def _convert(folder: Path, components: Iterable[str]) -> bool:
    """Rewrite each listed component of a baked pipeline in bf16; False (logged) if one is missing."""
    for component in components:
        if not (folder / component / "config.json").is_file():
            log.error("%s: no component %r to convert (is it a diffusers pipeline?)", folder, component)
            return False
        convert_to_bf16(folder / component)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)

    # 1. The pipeline, then its transformer (and any other listed component) in bf16.
    turbo, turbo_commit = repo_folder(args.dest, args.zimage_repo), None
    if args.zimage_repo.lower() != "none":
        turbo_commit = download(
            args.zimage_repo, args.zimage_revision, turbo, "pipeline", args.retries, args.endpoint
        )
        if not _convert(turbo, args.bf16_components):
            return 1

    # 2. The base model, like Turbo, but what it has the same as Turbo is linked, not fetched.
    if args.base_repo.lower() != "none":
        base, revision, shared = repo_folder(args.dest, args.base_repo), args.base_revision, []
        if turbo_commit is not None:
            _, turbo_ids = file_ids(args.zimage_repo, turbo_commit, args.retries, args.endpoint)
            revision, base_ids = file_ids(args.base_repo, args.base_revision, args.retries, args.endpoint)
            shared = shared_components(turbo_ids, base_ids)
            for component in (c for c in SHAREABLE if c not in shared):
                log.info("%s: its %s differs from %s's: fetched", args.base_repo, component, args.zimage_repo)
        download(args.base_repo, revision, base, "pipeline", args.retries, args.endpoint, skip=shared)
        for component in shared:
            link_component(base / component, turbo / component)
            log.info(
                "%s: its %s is %s's (same files on the Hub): %s links to %s",
                args.base_repo,
                component,
                args.zimage_repo,
                base / component,
                turbo / component,
            )
        # A shared component was converted (or not) with Turbo's: the link already shows the result.
        if not _convert(base, [c for c in args.bf16_components if c not in shared]):
            return 1

    # 3. The prompt expander: its files that are Turbo's text encoder's are links to them.
    if args.expander_repo.lower() != "none":
        _bake_expander(args, turbo, turbo_commit)

    # 4. The safety checker, as published (0.2 GB: not worth a conversion).
    if args.safety_repo.lower() != "none":
        checker = repo_folder(args.dest, args.safety_repo)
        download(args.safety_repo, args.safety_revision, checker, "classifier", args.retries, args.endpoint)

    # 5. The ControlNet (one release file, as published: bf16), and the depth and pose models beside it.
    if args.controlnet_repo.lower() != "none":
        name = args.controlnet_repo.split("/")[-1]
        file = args.controlnet_file or f"{name}.safetensors"
        folder = repo_folder(args.dest, args.controlnet_repo)
        download(
            args.controlnet_repo,
            args.controlnet_revision,
            folder,
            "controlnet",
            args.retries,
            args.endpoint,
            file=file,
        )
        if args.depth_repo.lower() != "none":
            depth = repo_folder(args.dest, args.depth_repo)
            download(args.depth_repo, args.depth_revision, depth, "classifier", args.retries, args.endpoint)
        # The pose estimator and its person detector (both config, processor config, safetensors).
        if args.pose_repo.lower() != "none":
            for repo, revision in (
                (args.pose_repo, args.pose_revision),
                (args.pose_detector_repo, args.pose_detector_revision),
            ):
                folder = repo_folder(args.dest, repo)
                download(repo, revision, folder, "classifier", args.retries, args.endpoint)

    # 6. The Tile ControlNet for upscaling: one release file, into its repo's folder (beside the
    #    Union release when both come from alibaba-pai's Union 2.1 repo), where the worker looks.
    if args.tile_controlnet.lower() != "none":
        repo, _, file = args.tile_controlnet.rpartition("/")
        folder = repo_folder(args.dest, repo)
        download(
            repo, args.tile_controlnet_revision, folder, "controlnet", args.retries, args.endpoint, file=file
        )
    return 0


def _bake_expander(args: argparse.Namespace, turbo: Path, turbo_commit: str | None) -> None:
    folder, revision, linked = repo_folder(args.dest, args.expander_repo), args.expander_revision, {}
    # A text encoder rewritten in bf16 is no longer the Hub's file: nothing is linked to it then.
    if turbo_commit is not None and "text_encoder" not in args.bf16_components:
        _, turbo_ids = file_ids(args.zimage_repo, turbo_commit, args.retries, args.endpoint)
        revision, lm_ids = file_ids(
            args.expander_repo, args.expander_revision, args.retries, args.endpoint, kind="causal_lm"
        )
        linked = same_weights(lm_ids, turbo_ids)
        for name in sorted(n for n in lm_ids if n.endswith(".safetensors") and n not in linked):
            # The fact the worker's sharing rests on, checked at build: which weights differ.
            log.info(
                "%s: %s differs from every file of %s's text encoder: fetched",
                args.expander_repo,
                name,
                args.zimage_repo,
            )
    download(
        args.expander_repo, revision, folder, "causal_lm", args.retries, args.endpoint, skip=list(linked)
    )
    for name, target in linked.items():
        link_file(folder / name, turbo / target)
        log.info(
            "%s: %s is %s's %s (same sha256 on the Hub): linked",
            args.expander_repo,
            name,
            args.zimage_repo,
            target,
        )
    if not linked:
        log.info("%s: no file is %s's text encoder's: fetched whole", args.expander_repo, args.zimage_repo)


if __name__ == "__main__":
    sys.exit(main())
