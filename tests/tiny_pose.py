"""A tiny real ViTPose and a tiny real RT-DETR person detector, built by the tests (random weights).

Both are the transformers classes the worker loads (VitPoseForPoseEstimation, RTDetrForObjectDetection),
saved with save_pretrained as safetensors with their image processors, as the Hub's repos hold them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrImageProcessor,
    RTDetrResNetConfig,
    VitPoseBackboneConfig,
    VitPoseConfig,
    VitPoseForPoseEstimation,
    VitPoseImageProcessor,
)

# ViTPose's input (height, width), 3:4 as the real ones' 256x192; its heatmaps are a quarter of it.
POSE_INPUT = (64, 48)
HEATMAP = (16, 12)


def build_tiny_vitpose(path: Path) -> Path:
    torch.manual_seed(0)
    backbone = VitPoseBackboneConfig(
        image_size=list(POSE_INPUT),
        patch_size=[16, 16],
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        out_indices=[1],
    )
    config = VitPoseConfig(backbone_config=backbone, use_simple_decoder=True, num_labels=17)
    VitPoseForPoseEstimation(config).eval().save_pretrained(path, safe_serialization=True)
    VitPoseImageProcessor(size={"height": POSE_INPUT[0], "width": POSE_INPUT[1]}).save_pretrained(path)
    return path


def build_tiny_detector(path: Path) -> Path:
    """RT-DETR on a 4-stage ResNet of 8 channels, 10 queries, labels person and cat."""
    torch.manual_seed(0)
    config = RTDetrConfig(
        backbone_config=RTDetrResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 8, 8, 8],
            depths=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"],
        ),
        use_pretrained_backbone=False,
        encoder_in_channels=[8, 8, 8],
        encoder_hidden_dim=16,
        decoder_in_channels=[16, 16, 16],
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=10,
        num_labels=2,
        id2label={0: "person", 1: "cat"},
        label2id={"person": 0, "cat": 1},
    )
    RTDetrForObjectDetection(config).eval().save_pretrained(path, safe_serialization=True)
    RTDetrImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    return path
