"""Build tiny random Z-Image Turbo and safety-checker folders for CPU tries and tests.

The real weights are about 33 GB and need a GPU; these folders have the same layout,
are built from the same diffusers and transformers classes, and load through the same
`from_pretrained` code, so everything but the picture quality can be tried on a laptop:

    python builder/tiny_model.py /tmp/tiny-zimage
    ZIMAGE_MODEL=/tmp/tiny-zimage SAFETY_CHECKER_MODEL=none python handler.py
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

# Qwen3's chat markup, cut down to what ZImagePipeline uses (`enable_thinking` included).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "a photo of a cat sitting on a red sofa, soft morning light",
    "a watercolor painting of mountains and a lake at sunset",
    "一只猫坐在红色沙发上，柔和的晨光",
    "portrait of an astronaut, cinematic, highly detailed, 8k",
]


def tiny_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer with Qwen's special tokens, trained on a few lines."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge) for merge in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_pipeline(seed: int = 0) -> ZImagePipeline:
    """The real ZImagePipeline classes at toy sizes; same VAE scale (8) as the real one."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=16,
        n_layers=2,
        n_refiner_layers=1,
        # One head: attention is most of a tiny model's time at 1024x1024 and above (4,096
        # tokens and more), and the tests run many jobs at those sizes.
        n_heads=1,
        n_kv_heads=1,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=32,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[1536, 512, 512],
    )
    # Both pad tokens start as torch.empty; fix them so the saved model has no NaNs.
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        # Four channels and one resnet per decoder block (none in the encoder's): full-resolution
        # convolutions are the rest of a large image's time.
        block_out_channels=[4, 4, 4, 4],
        layers_per_block=0,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        # The real VAE has mid-block attention; at toy width it would only cost memory.
        mid_block_add_attention=False,
    )
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )
    return ZImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_tiny_zimage(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    tiny_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_base(turbo: str | Path, path: str | Path, seed: int = 7) -> Path:
    """What Z-Image (base) is to Turbo, at toy size: Turbo's folder with a transformer of other
    weights (the same text encoder, tokenizer and VAE files)."""
    path = Path(path)
    shutil.copytree(turbo, path)
    shutil.rmtree(path / "transformer")
    tiny_pipeline(seed).transformer.save_pretrained(path / "transformer", safe_serialization=True)
    return path


def build_tiny_expander(turbo: str | Path, path: str | Path, seed: int = 11) -> Path:
    """What Qwen/Qwen3-4B is to Z-Image-Turbo's text encoder, at toy size: a Qwen3ForCausalLM with
    the encoder's weights, its head tied to the embeddings, and another last-layer MLP (up and
    down projections), saved with Turbo's tokenizer."""
    turbo, path = Path(turbo), Path(path)
    # B615 (no revision pinned) does not apply: a local folder the tiny Turbo was saved to.
    encoder = Qwen3Model.from_pretrained(  # nosec B615
        turbo / "text_encoder", dtype=torch.float32, use_safetensors=True, local_files_only=True
    )
    config = Qwen3Config(**{**encoder.config.to_dict(), "tie_word_embeddings": True})
    config.architectures = ["Qwen3ForCausalLM"]
    causal = Qwen3ForCausalLM(config)
    causal.model.load_state_dict(encoder.state_dict())
    torch.manual_seed(seed)
    mlp = causal.model.layers[-1].mlp
    with torch.no_grad():
        mlp.up_proj.weight.normal_(0.0, 0.5)
        mlp.down_proj.weight.normal_(0.0, 0.5)
    causal.save_pretrained(path, safe_serialization=True)
    # B615 (no revision pinned) does not apply: the tiny Turbo's local tokenizer folder.
    Qwen2Tokenizer.from_pretrained(turbo / "tokenizer").save_pretrained(path)  # nosec B615
    return path


# The brightness checker's reference channels: large and opposite, so each LayerNorm divides
# by an almost constant std and the brightness channel passes it nearly linearly.
REFERENCE = 1000.0


def build_tiny_safety_checker(
    path: str | Path,
    nsfw_bias: float = -10.0,
    *,
    mode: str = "fixed",
    labels: tuple[str, ...] = ("normal", "nsfw"),
    pivot: float = 0.5,
    slope: float = 40.0,
) -> Path:
    """A tiny real ViTForImageClassification with an image-processor config, saved to `path`.

    mode "fixed": all head weights are zero, so logits are exactly (0, nsfw_bias) for every
    image and P(nsfw) = sigmoid(nsfw_bias): -10 never flags, +10 always flags, 0 gives 0.5 exactly.
    mode "brightness": P(nsfw) = sigmoid(slope * (mean brightness - pivot)), brightness in
    [0, 1] as the checker sees the image (resized to 32x32); see `_wire_brightness`.
    `labels` become id2label (index 1 is the one the bias or brightness drives), so
    ("cat", "dog") makes a classifier the worker must refuse for lacking an `nsfw` label.
    """
    if mode not in ("fixed", "brightness"):
        raise ValueError(f"mode: {mode!r} is not allowed: use 'fixed' or 'brightness'")
    if len(labels) != 2:
        raise ValueError(f"labels: need exactly 2, got {labels!r}")
    path = Path(path)
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        if mode == "fixed":
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([0.0, nsfw_bias]))
        else:
            _wire_brightness(model, pivot, slope)
    model.save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _wire_brightness(model: ViTForImageClassification, pivot: float, slope: float) -> None:
    """Set every weight so the nsfw logit is slope * (mean brightness - pivot).

    The processor maps a pixel p in [0, 1] to 2p - 1. Hidden channel 0 of each patch token
    holds its patch's mean (b); channels 1 and 2 hold +R and -R (R = REFERENCE) in every token.
    With queries and keys zero, attention is uniform, so the CLS token takes the average of
    the value vectors; the value projection copies channel 0 (undoing the LayerNorm's scale)
    into channel 3, where the CLS token's own value is 0. The MLP adds nothing. The CLS token
    then holds m = sum(b_i) / (patches + 1) in channel 3, and the classifier reads it back.
    LayerNorm of (x, R, -R, 0, ...) over 16 channels gives 15x/16 / sqrt(R^2/8 + 15x^2/256):
    strictly increasing in x and, with |x| <= 1 << R, linear to about 1e-7.
    """
    config = model.config
    hidden, channels, side = config.hidden_size, config.num_channels, config.patch_size
    patches = (config.image_size // side) ** 2
    layer_norm_gain = (hidden - 1) / hidden / (REFERENCE / 8**0.5)  # d LayerNorm(x)_0 / dx at x = 0

    for name, param in model.named_parameters():
        # LayerNorms stay identity-scaled; everything else starts at zero.
        param.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)

    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.projection.weight[0].fill_(1.0 / (channels * side * side))
    embeddings.patch_embeddings.projection.bias[1:3].copy_(torch.tensor([REFERENCE, -REFERENCE]))
    embeddings.cls_token[0, 0, 1:3].copy_(torch.tensor([REFERENCE, -REFERENCE]))

    attention = model.vit.layers[0].attention
    attention.v_proj.weight[3, 0] = 1.0 / layer_norm_gain
    attention.o_proj.weight[3, 3] = 1.0

    # logit = k * m' + bias, where m' = m after the final LayerNorm, scaled back by 1/gain;
    # m = patches / (patches + 1) * (2 * brightness - 1).
    k = slope * (patches + 1) / (2 * patches)
    model.classifier.weight[1, 3] = k / layer_norm_gain
    model.classifier.bias[1] = slope / 2 - slope * pivot


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="folder to write the tiny Z-Image model to")
    parser.add_argument("--safety-checker", help="also write a tiny never-flagging checker here")
    args = parser.parse_args()
    print(f"tiny Z-Image model written to {build_tiny_zimage(args.path)}")
    if args.safety_checker:
        print(f"tiny safety checker written to {build_tiny_safety_checker(args.safety_checker)}")


if __name__ == "__main__":
    main()
