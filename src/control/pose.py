"""control_preprocess "pose": people found, their body skeletons drawn as an OpenPose map.

Two transformers models, both safetensors, loaded at start beside the ControlNet (as DEPTH_MODEL is)
and run on the GPU thread:

1. POSE_DETECTOR_MODEL, an RT-DETR object detector (RTDetrForObjectDetection), finds the people:
   the boxes of its `person` label scoring at least DETECTION_THRESHOLD.
2. POSE_MODEL, a ViTPose (VitPoseForPoseEstimation), finds the 17 COCO body keypoints in each box.

The map is what the Fun ControlNet Union's pose mode was trained on (OpenPose's body model, as
controlnet_aux draws it): 18 points (COCO's 17 reordered, plus the neck, the midpoint of the
shoulders), 17 limbs as ellipses in OpenPose's colours at 60 %, then the points as discs, on black,
at the fitted size. A keypoint scoring under KEYPOINT_THRESHOLD is left out with its limbs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src.runtime.errors import JobError

DETECTION_THRESHOLD = 0.5
KEYPOINT_THRESHOLD = 0.3
# OpenPose's 18 body points, each as its COCO keypoint (None: the neck, made from the shoulders).
# OpenPose: nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow, l-wrist, r-hip, r-knee,
# r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear. COCO: nose, l-eye, r-eye, l-ear,
# r-ear, l-shoulder, r-shoulder, l-elbow, r-elbow, l-wrist, r-wrist, l-hip, r-hip, l-knee, r-knee,
# l-ankle, r-ankle.
OPENPOSE_FROM_COCO = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
COCO_SHOULDERS = (5, 6)
# OpenPose's limbs (pairs of the points above, from 0) and colours, as controlnet_aux's draw_bodypose.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
STICK_WIDTH, POINT_RADIUS, LIMB_SHADE = 4, 4, 0.6

Point = tuple[float, float] | None


def openpose_points(keypoints: np.ndarray, scores: np.ndarray) -> list[Point]:
    """COCO's 17 (x, y) keypoints and their scores -> OpenPose's 18 points; None where not found."""
    found = [
        (float(x), float(y)) if score >= KEYPOINT_THRESHOLD else None
        for (x, y), score in zip(keypoints, scores, strict=True)
    ]
    left, right = (found[i] for i in COCO_SHOULDERS)
    neck = ((left[0] + right[0]) / 2, (left[1] + right[1]) / 2) if left and right else None
    return [neck if coco is None else found[coco] for coco in OPENPOSE_FROM_COCO]


def draw_bodies(people: list[list[Point]], width: int, height: int) -> Image.Image:
    """Every person's skeleton on one black RGB map of (width, height): limbs first, then points."""
    import cv2  # only workers that serve control load OpenCV

    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for points in people:
        for (a, b), colour in zip(LIMBS, COLOURS, strict=False):
            if points[a] is None or points[b] is None:
                continue
            (xa, ya), (xb, yb) = points[a], points[b]
            length = math.hypot(xa - xb, ya - yb)
            angle = math.degrees(math.atan2(ya - yb, xa - xb))
            centre = (int((xa + xb) / 2), int((ya + yb) / 2))
            polygon = cv2.ellipse2Poly(centre, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(c * LIMB_SHADE) for c in colour])
    for points in people:
        for point, colour in zip(points, COLOURS, strict=True):
            if point is not None:
                cv2.circle(canvas, (int(point[0]), int(point[1])), POINT_RADIUS, colour, thickness=-1)
    return Image.fromarray(canvas)


class PoseEstimator:
    """POSE_DETECTOR_MODEL and POSE_MODEL on the device: a picture in, its OpenPose map out."""

    def __init__(self, detector, detector_processor, pose, pose_processor, device: torch.device) -> None:
        self.detector, self.detector_processor = detector, detector_processor
        self.pose, self.pose_processor = pose, pose_processor
        self.device = device
        labels = {name.lower(): int(i) for i, name in detector.config.id2label.items()}
        if "person" not in labels:
            raise ValueError(
                f"the detector has no 'person' label (it has {', '.join(sorted(labels)[:5])}, ...)"
            )
        self.person = labels["person"]

    @classmethod
    def load(
        cls, pose_folder: Path, detector_folder: Path, device: torch.device, dtype: torch.dtype
    ) -> PoseEstimator:
        from transformers import RTDetrForObjectDetection, VitPoseForPoseEstimation

        from src.model.files import ModelNotFound, load_vision_model

        turn_off = "POSE_MODEL=none to turn control_preprocess 'pose' off"
        parts = {
            name: load_vision_model(model_class, folder, device, dtype, name, turn_off)
            for name, model_class, folder in (
                ("POSE_MODEL", VitPoseForPoseEstimation, pose_folder),
                ("POSE_DETECTOR_MODEL", RTDetrForObjectDetection, detector_folder),
            )
        }
        try:
            return cls(*parts["POSE_DETECTOR_MODEL"], *parts["POSE_MODEL"], device)
        except ValueError as err:
            raise ModelNotFound(
                f"POSE_DETECTOR_MODEL: {detector_folder}: {err}; use a COCO detector"
            ) from None

    @torch.inference_mode()
    def __call__(self, picture: Image.Image) -> Image.Image:
        boxes = self.people(picture)
        if len(boxes) == 0:
            raise JobError(
                "control_image: no person found in the picture, so there is no pose to draw: send a picture "
                "with people in it, or a pose map made elsewhere with control_preprocess 'none'"
            )
        # 2. Keypoints in each box: ViTPose's top-down crop of the box, its heatmaps back to the picture.
        pixels, centres, scales = self.crops(picture, boxes)
        extra = {}
        if getattr(self.pose.config.backbone_config, "num_experts", 1) > 1:  # ViTPose++: COCO's expert
            extra["dataset_index"] = torch.zeros(len(boxes), dtype=torch.long, device=self.device)
        dtype = next(self.pose.parameters()).dtype
        heatmaps = (
            self.pose(pixel_values=pixels.to(self.device, dtype), **extra).heatmaps.float().cpu().numpy()
        )
        people = [
            openpose_points(*keypoints_from_heatmaps(maps, centre, scale))
            for maps, centre, scale in zip(heatmaps, centres, scales, strict=True)
        ]
        # 3. The skeletons, drawn at the fitted size.
        return draw_bodies(people, picture.width, picture.height)

    def crops(self, picture: Image.Image, boxes: np.ndarray) -> tuple[torch.Tensor, list, list]:
        """Each box cropped as ViTPose's processor does (padded 1.25x to its input's aspect, warped to its
        input size, normalised), with OpenCV: the processor's own warp needs SciPy, which the worker lacks."""
        import cv2
        from transformers.models.vitpose.image_processing_pil_vitpose import (
            box_to_center_and_scale,
            get_warp_matrix,
        )

        processor = self.pose_processor
        height, width = processor.size["height"], processor.size["width"]
        image = np.asarray(picture.convert("RGB"))
        mean, std = np.array(processor.image_mean), np.array(processor.image_std)
        crops, centres, scales = [], [], []
        for x0, y0, x1, y1 in boxes:
            centre, scale = box_to_center_and_scale(
                [x0, y0, x1 - x0, y1 - y0], image_width=width, image_height=height
            )
            warp = get_warp_matrix(0, centre * 2.0, np.array([width, height]) - 1.0, scale * 200.0)
            crop = cv2.warpAffine(image, warp, (width, height), flags=cv2.INTER_LINEAR)
            crops.append(((crop * processor.rescale_factor - mean) / std).transpose(2, 0, 1))
            centres.append(centre)
            scales.append(scale)
        return torch.from_numpy(np.stack(crops).astype(np.float32)), centres, scales

    def people(self, picture: Image.Image) -> np.ndarray:
        """1. The person boxes (x0, y0, x1, y1, in pixels) scoring DETECTION_THRESHOLD or more."""
        dtype = next(self.detector.parameters()).dtype
        pixels = self.detector_processor(images=picture, return_tensors="pt")["pixel_values"]
        outputs = self.detector(pixel_values=pixels.to(self.device, dtype))
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        found = self.detector_processor.post_process_object_detection(
            outputs, threshold=DETECTION_THRESHOLD, target_sizes=[(picture.height, picture.width)]
        )[0]
        return found["boxes"][found["labels"] == self.person].cpu().numpy()


def keypoints_from_heatmaps(
    heatmaps: np.ndarray, centre: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One person's (17, h, w) heatmaps -> 17 (x, y) in the picture and their scores.

    Each peak, moved a quarter cell towards its higher neighbour (the classic sub-cell step; the
    processor's DARK refinement needs SciPy), mapped back through the box as the processor does.
    """
    from transformers.models.vitpose.image_processing_pil_vitpose import transform_preds

    count, height, width = heatmaps.shape
    flat = heatmaps.reshape(count, -1)
    peaks, scores = flat.argmax(axis=1), flat.max(axis=1)
    coords = np.stack([peaks % width, peaks // width], axis=1).astype(np.float32)
    for k, (x, y) in enumerate(coords.astype(int)):
        if 0 < x < width - 1:
            coords[k, 0] += 0.25 * np.sign(heatmaps[k, y, x + 1] - heatmaps[k, y, x - 1])
        if 0 < y < height - 1:
            coords[k, 1] += 0.25 * np.sign(heatmaps[k, y + 1, x] - heatmaps[k, y - 1, x])
    return transform_preds(coords, centre, scale, [height, width]), scores


def no_pose_model() -> JobError:
    return JobError(
        "control_preprocess: 'pose' is not available on this worker (POSE_MODEL=none): send a pose map made "
        "elsewhere with 'none', or use 'canny' or 'depth'"
    )
