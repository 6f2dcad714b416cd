"""control_preprocess "pose" on tiny real ViTPose and RT-DETR models, through the worker.

The detector and the pose model are the real transformers classes with random weights, loaded from
disk as the worker loads them. Their outputs are rigged at the model boundary (a forward hook that
replaces what the module returns): the detector finds one person at a known box, the pose model puts
each keypoint's heatmap peak at a known cell. So the keypoints are known in advance, and the drawn
map is compared with the expected OpenPose drawing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.vitpose.image_processing_pil_vitpose import box_to_center_and_scale, transform_preds

from builder import download_weights as dw
from src.control.pose import COLOURS, LIMB_SHADE, PoseEstimator, draw_bodies
from src.jobs.worker import Worker
from src.model.files import SearchRoots, missing_classifier_files, resolve_model
from src.request.parse import parse_request
from src.runtime.errors import JobError
from src.runtime.settings import Settings
from tests.conftest import handle_job
from tests.test_builder import LoopbackHub, folder_files
from tests.test_control import JOB, pixels, png_uri, releases, shapes  # noqa: F401
from tests.tiny_pose import HEATMAP, POSE_INPUT, build_tiny_detector, build_tiny_vitpose

SIDE = 256
# The rigged person: a box of 96x128 (3:4, ViTPose's own aspect: no padding to fit) at (80, 64).
BOX = (80.0, 64.0, 176.0, 192.0)
# COCO's 17 keypoints as heatmap cells (column, row) of the 12x16 heatmap; the left ear scores low.
COCO_CELLS = {
    "nose": (6, 2), "l_eye": (7, 1), "r_eye": (5, 1), "l_ear": (8, 2), "r_ear": (4, 2),
    "l_shoulder": (8, 4), "r_shoulder": (3, 4), "l_elbow": (9, 7), "r_elbow": (2, 7),
    "l_wrist": (9, 9), "r_wrist": (2, 9), "l_hip": (7, 9), "r_hip": (4, 9),
    "l_knee": (7, 12), "r_knee": (4, 12), "l_ankle": (7, 14), "r_ankle": (4, 14),
}  # fmt: skip
LOW = {"l_ear"}
OPENPOSE_ORDER = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "r_hip",
    "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip


@pytest.fixture(scope="module")
def pose_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pose")
    return build_tiny_vitpose(root / "vitpose"), build_tiny_detector(root / "rtdetr")


@pytest.fixture(scope="module")
def worker_pose(tiny_model, releases, pose_models) -> Worker:  # noqa: F811
    settings = Settings(
        model=str(tiny_model),
        safety_checker_model="none",
        controlnet_model=str(releases["2.1"][1]),
        depth_model="none",
        pose_model=str(pose_models[0]),
        pose_detector_model=str(pose_models[1]),
    )
    return Worker.start(settings)


@contextmanager
def rigged(worker: Worker, person: bool = True) -> Iterator[set[int]]:
    """The detector finds one person at BOX (or nobody); the keypoints peak at COCO_CELLS.
    Yields the threads the two models ran on."""
    threads: set[int] = set()

    def detect(module, args, output):
        threads.add(threading.get_ident())
        logits = torch.full_like(output.logits, -10.0)
        boxes = output.pred_boxes.clone()
        if person:
            logits[:, 0, 0] = 10.0  # query 0: a person
            x0, y0, x1, y1 = (v / SIDE for v in BOX)
            boxes[:, 0] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        output.logits, output.pred_boxes = logits, boxes
        return output

    def keypoints(module, args, output):
        threads.add(threading.get_ident())
        heatmaps = torch.zeros_like(output.heatmaps)
        for k, (name, (column, row)) in enumerate(COCO_CELLS.items()):
            heatmaps[:, k, row, column] = 0.1 if name in LOW else 1.0
        output.heatmaps = heatmaps
        return output

    handles = [
        worker.pose.detector.register_forward_hook(detect),
        worker.pose.pose.register_forward_hook(keypoints),
    ]
    try:
        yield threads
    finally:
        for handle in handles:
            handle.remove()


def expected_points() -> list[tuple[float, float] | None]:
    """The keypoints in the picture: ViTPose's box-to-heatmap mapping of each cell (transformers' own)."""
    x0, y0, x1, y1 = BOX
    center, scale = box_to_center_and_scale((x0, y0, x1 - x0, y1 - y0), POSE_INPUT[1], POSE_INPUT[0])
    cells = np.array(list(COCO_CELLS.values()), dtype=np.float32)
    coco = dict(zip(COCO_CELLS, transform_preds(cells, center, scale, list(HEATMAP)), strict=True))
    neck = (coco["l_shoulder"] + coco["r_shoulder"]) / 2
    points = {**{name: tuple(map(float, xy)) for name, xy in coco.items()}, "neck": tuple(map(float, neck))}
    return [None if name in LOW else points[name] for name in OPENPOSE_ORDER]


def test_the_drawn_map_is_the_expected_openpose_drawing(worker_pose):
    picture = Image.fromarray(shapes(SIDE, SIDE))
    with rigged(worker_pose) as threads:
        drawn = worker_pose.gpu.call(lambda: worker_pose.pose(picture))
    assert threads == {worker_pose.gpu.call(threading.get_ident)}  # both models ran on the GPU thread
    points = expected_points()
    assert points[1] == ((points[2][0] + points[5][0]) / 2, (points[2][1] + points[5][1]) / 2)  # the neck
    expected = draw_bodies([points], SIDE, SIDE)
    assert drawn.size == (SIDE, SIDE) and drawn.mode == "RGB"
    assert np.array_equal(np.asarray(drawn), np.asarray(expected))
    array = np.asarray(drawn)
    assert tuple(array[2, 2]) == (0, 0, 0) and (array.sum(axis=2) == 0).mean() > 0.8  # on black
    nose = tuple(int(v) for v in points[0])
    assert tuple(array[nose[1], nose[0]]) == COLOURS[0]  # the nose's disc: OpenPose red
    # The limb from the neck to the right shoulder, half way along it: red at 60 %.
    (xa, ya), (xb, yb) = points[1], points[2]
    middle = array[int((ya + yb) / 2), int((xa + xb) / 2 - 3)]
    assert tuple(middle) == tuple(int(c * LIMB_SHADE) for c in COLOURS[0])
    # The low-scoring left ear is left out: neither its disc nor its limb colour appears.
    for colour in (COLOURS[17], tuple(int(c * LIMB_SHADE) for c in COLOURS[16])):
        assert not (array == colour).all(axis=2).any()


def test_a_pose_job_uses_the_map(worker_pose):
    with rigged(worker_pose):
        posed = run(worker_pose, control_preprocess="pose")
    assert posed["timings"]["preprocess_control"] > 0
    assert not np.array_equal(pixels(posed), pixels(run(worker_pose)))
    # The same job with the expected drawing sent as a ready map gives the same bytes.
    ready = np.asarray(draw_bodies([expected_points()], SIDE, SIDE))
    assert np.array_equal(pixels(run(worker_pose, control_image=png_uri(ready))), pixels(posed))


def test_nobody_in_the_picture_fails_naming_control_image(worker_pose):
    with rigged(worker_pose, person=False):
        output = handle_job(worker_pose, {"id": "nobody", "input": {**JOB, "control_preprocess": "pose"}})
    assert set(output) == {"error"}
    assert output["error"].startswith("control_image: no person found in the picture"), output
    assert "error" not in run(worker_pose)  # and the worker serves on


def test_a_worker_without_a_pose_model_refuses_naming_control_preprocess(tiny_model, releases):  # noqa: F811
    worker = Worker.start(
        Settings(
            model=str(tiny_model),
            safety_checker_model="none",
            controlnet_model=str(releases["1.0"][0]),
            depth_model="none",
        )
    )
    assert worker.pose is None
    output = handle_job(worker, {"id": "no-pose", "input": {**JOB, "control_preprocess": "pose"}})
    assert output["error"].startswith(
        "control_preprocess: 'pose' is not available on this worker (POSE_MODEL=none)"
    )


def run(worker: Worker, **fields) -> dict:
    output = handle_job(worker, {"id": "pose", "input": {**JOB, "num_inference_steps": 1, **fields}})
    assert "error" not in output, output
    return output


def test_pose_settings_and_request():
    assert Settings.from_env({}).pose_model == "none" and not Settings.from_env({}).pose_enabled
    env = {"CONTROLNET_MODEL": "/cn", "POSE_MODEL": " /models/vitpose ", "POSE_DETECTOR_MODEL": "/models/det"}
    settings = Settings.from_env(env)
    assert (settings.pose_model, settings.pose_detector_model) == ("/models/vitpose", "/models/det")
    assert settings.pose_enabled
    assert (
        Settings.from_env({"CONTROLNET_MODEL": "/cn"}).pose_detector_model == "PekingU/rtdetr_r50vd_coco_o365"
    )
    assert not Settings.from_env({"POSE_MODEL": "/models/vitpose"}).pose_enabled  # only beside a ControlNet
    assert parse_request({**JOB, "control_preprocess": "pose"}).control_preprocess == "pose"
    with pytest.raises(JobError) as caught:
        parse_request({"prompt": "a", "control_preprocess": "pose"})
    assert str(caught.value).startswith("control_preprocess: only applies with 'control_image'")


def test_the_builder_bakes_the_pose_models_beside_a_controlnet_and_the_worker_finds_them_offline(
    tiny_model,
    releases,  # noqa: F811
    pose_models,
    tmp_path,
):
    repo, pose_repo, detector_repo = (
        "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1",
        "usyd-community/vitpose-base-simple",
        "PekingU/rtdetr_r50vd_coco_o365",
    )
    vitpose, detector = (folder_files(folder) for folder in pose_models)
    server = LoopbackHub(
        {
            repo: {"Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors": releases["2.1"][1].read_bytes()},
            pose_repo: vitpose | {"pytorch_model.bin": b"pickle"},
            detector_repo: detector | {"pytorch_model.bin": b"pickle"},
        }
    )
    models = tmp_path / "models"
    try:
        args = ["--zimage-repo", "none", "--safety-repo", "none", "--controlnet-repo", repo]
        assert (
            dw.main(["--dest", str(models), "--endpoint", server.url, *args, "--pose-repo", pose_repo]) == 0
        )
        assert server.fetched(pose_repo) == set(vitpose) and server.fetched(detector_repo) == set(detector)
    finally:
        server.close()
    assert dw.parse_args([]).pose_repo == "none"  # not baked unless asked (the Dockerfile asks)
    roots = SearchRoots(
        runpod_cache=tmp_path / "rp", volume=tmp_path / "vol", baked=models, hf_cache=tmp_path / "hf"
    )
    found = [
        resolve_model(name, missing_classifier_files, "POSE_MODEL", roots)
        for name in (pose_repo, detector_repo)
    ]
    assert [folder.name for folder in found] == ["vitpose-base-simple", "rtdetr_r50vd_coco_o365"]
    assert PoseEstimator.load(*found, torch.device("cpu"), torch.float32).person == 0
