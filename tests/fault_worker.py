"""`handler.py` as deployed, with a GPU fault injected for one prompt.

A job whose prompt is FAULT_PROMPT raises, from inside the transformer's forward pass, the
error that a crashed CUDA kernel raises (`torch.AcceleratorError`); every other job runs
normally. tests/test_job_loop.py runs this file in place of `python handler.py`.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import handler  # noqa: E402
from src.model.pipeline import ZImageGenerator  # noqa: E402

FAULT_PROMPT = "inject a CUDA fault"
_generate = ZImageGenerator.generate


def generate(self, request, *args, **kwargs):
    if request.prompt != FAULT_PROMPT:
        return _generate(self, request, *args, **kwargs)

    def crash(*_: object) -> None:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    hook = self.text_to_image.transformer.register_forward_pre_hook(crash)
    try:
        return _generate(self, request, *args, **kwargs)
    finally:
        hook.remove()


if __name__ == "__main__":
    ZImageGenerator.generate = generate
    handler.main()
