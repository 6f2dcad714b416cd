"""What prompt expansion costs: the worker's own rewrite loop (src/model/expander.py) timed.

    .venv/bin/python benchmarks/cost/expansion.py [--size tiny|full] [--machine NAME] [--out FILE]

- tiny: the tests' expander (builder/tiny_model.build_tiny_expander), loaded the worker's way,
  sharing the tiny Turbo's text encoder; on the CPU.
- full: Qwen/Qwen3-4B's architecture (its config.json's shapes) with random bf16 weights, built
  on the device, so no download is needed: decoding speed does not depend on the weights. Meant
  for a GPU (benchmarks/gpu.sh); on a CPU it needs about 8 GB of memory and minutes.

Each rewrite is forced to exactly --tokens new tokens (the end of the turn is not a stop here)
after a prompt of --prompt-tokens tokens (the system prompt and a short caller prompt are about
300 with Qwen3's tokenizer). Rows: eager decoding with the dynamic KV cache and, on CUDA, the
worker's static cache with the compiled step. Figures are medians of --repeats runs after a
warm-up. Prints a markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# The cyclic GC paused while torch and diffusers import (as handler.py does): it would walk their
# half a million new objects again and again, about a fifth of the import time.
gc.disable()
import torch  # noqa: E402
from transformers import Qwen3Config  # noqa: E402

from benchmarks import results_file  # noqa: E402
from benchmarks.full_size import full_size_expander  # noqa: E402
from builder.tiny_model import build_tiny_expander, build_tiny_zimage, tiny_tokenizer  # noqa: E402
from src.model.expander import PromptExpander  # noqa: E402
from src.model.expander_weights import assemble_causal_lm, load_expander_model  # noqa: E402

gc.enable()


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def tiny_expander(folder: Path, device: torch.device) -> PromptExpander:
    from diffusers import ZImagePipeline

    turbo = build_tiny_zimage(folder / "tiny-zimage")
    lm = build_tiny_expander(turbo, folder / "tiny-qwen3")
    encoder = ZImagePipeline.from_pretrained(turbo, dtype=torch.float32).text_encoder.to(device)
    model = load_expander_model(lm, encoder, turbo / "text_encoder")
    return PromptExpander(model, tiny_tokenizer(), "tiny", compile_decoding=True)


def expander_over(encoder: torch.nn.Module, tokenizer: object, seed: int = 0) -> PromptExpander:
    """An expander that is `encoder` but for a random last-layer MLP (up and down projections), as
    Qwen3-4B is to Z-Image's encoder, sharing every other tensor: what the worker builds at start
    (src/model/expander_weights.py), without a file. For the GPU benchmark's modes section."""
    config = Qwen3Config(**{**encoder.config.to_dict(), "tie_word_embeddings": True})
    state = dict(encoder.named_parameters())
    last = config.num_hidden_layers - 1
    generator = torch.Generator(encoder.device).manual_seed(seed)
    for name in (f"layers.{last}.mlp.up_proj.weight", f"layers.{last}.mlp.down_proj.weight"):
        own = state[name]
        noise = torch.randn(own.shape, generator=generator, device=own.device, dtype=own.dtype) * 0.02
        state[name] = torch.nn.Parameter(noise, requires_grad=False)
    model = assemble_causal_lm(config, encoder, state, encoder.dtype)
    return PromptExpander(model, tokenizer, "random expander", compile_decoding=True)


def time_rewrites(
    expander: PromptExpander, prompt_tokens: int, tokens: int, repeats: int
) -> dict[str, float]:
    """Median prefill ms, ms per new token and ms for the whole rewrite (the expander is left as it was)."""
    stop_ids, max_new_tokens = expander.stop_ids, expander.max_new_tokens
    try:
        return _time_rewrites(expander, prompt_tokens, tokens, repeats)
    finally:
        expander.stop_ids, expander.max_new_tokens = stop_ids, max_new_tokens


def _time_rewrites(
    expander: PromptExpander, prompt_tokens: int, tokens: int, repeats: int
) -> dict[str, float]:
    expander.stop_ids = set()  # exactly `tokens` new tokens every time
    expander.max_new_tokens = tokens
    vocab = expander.model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(expander.device)
    sync = torch.cuda.synchronize if expander.device.type == "cuda" else (lambda: None)

    def timed(n_new: int) -> float:
        expander.max_new_tokens = n_new
        sync()
        start = time.perf_counter()
        produced = expander.sample(ids, seed=1)
        sync()
        assert len(produced) == n_new
        return (time.perf_counter() - start) * 1000

    for _ in range(2 if expander.device.type == "cuda" else 1):  # allocator, kernels; CUDA: compile, graphs
        timed(tokens)
    prefill = statistics.median(timed(1) for _ in range(repeats))
    whole = statistics.median(timed(tokens) for _ in range(repeats))
    per_token = (whole - prefill) / (tokens - 1)
    return {"prefill_ms": prefill, "ms_per_token": per_token, "rewrite_ms": whole}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per rewrite (default 200)")
    parser.add_argument("--prompt-tokens", type=int, default=300, help="prompt length (default 300)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (default 5)")
    parser.add_argument("--machine", help="how the results name the machine (default: detected)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "expansion.md")
    args = parser.parse_args()

    load = results_file.load_average()
    device, dtype = device_and_dtype()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder:
        expander = (
            tiny_expander(Path(folder), device)
            if args.size == "tiny"
            else PromptExpander(
                full_size_expander(device, dtype),
                tiny_tokenizer(),
                "Qwen3-4B (random)",
                compile_decoding=True,
            )
        )
        ways = [("eager, dynamic KV cache", False)]
        if device.type == "cuda":
            ways.append(("static KV cache, compiled step (CUDA graphs)", True))
        rows = []
        for label, static in ways:
            expander._static = static
            figures = time_rewrites(expander, args.prompt_tokens, args.tokens, args.repeats)
            rows.append((label, figures))

    host = args.machine or (torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    facts = [
        f"{args.size} model, {str(dtype).removeprefix('torch.')}, a {args.prompt_tokens}-token prompt, "
        f"{args.tokens} new tokens, median of {args.repeats} runs"
    ]
    table = [
        {
            "decoding": label,
            "prefill (ms)": f"{f['prefill_ms']:.1f}",
            "ms per new token": f"{f['ms_per_token']:.2f}",
            "tokens per second": f"{1000 / f['ms_per_token']:.0f}",
            f"{args.tokens}-token rewrite (ms)": f"{f['rewrite_ms']:.0f}",
        }
        for label, f in rows
    ]
    lines = results_file.header(
        "Prompt expansion: the worker's own rewrite loop", facts, load_at_start=load, host=host
    )
    print(results_file.write(args.out, lines + results_file.table(table)))


if __name__ == "__main__":
    main()
