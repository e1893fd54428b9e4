"""LlarvaPolicy.predict latency: seconds per action and actions per second, at batch 1 and batch N.

    python benchmarks/policy_latency.py --size tiny --device cpu --batch-sizes 1,4 --answer-tokens 16
    python benchmarks/policy_latency.py --size 7b --device cuda --dtype bf16 --method both   # LLaVA-1.5-7B shape
    python benchmarks/policy_latency.py --checkpoint checkpoints/llarva-sweep --batch-sizes 1,16

This times the whole policy step an evaluation pays for: LLARVA prompts built by the codec (a
128x128 image, an instruction, a five-step joint history), CLIP preprocessing, one batched
generation call, parsing. `--size` builds random weights in memory (for 7b directly on the GPU in
the requested dtype: no 28 GB float32 copy on the CPU); `--checkpoint` loads a real one. Random
weights write junk of any length, so every answer is made exactly `--answer-tokens` long: end of
sequence is suppressed and `max_new_tokens` is that length (the policy holds on the unparsable
answers, which costs nothing). `--method` chooses generation's engine: transformers' `generate`
("hf"), llarva's fast decoder ("fast"), or both in one run; compare timings within one run only.

Each row: a warm-up, then `--repeats` timed calls (CUDA synchronised before and after); the
median is reported, with the preprocessing part (images and tokens, on the CPU) on its own. The
table is printed and the JSON written to benchmarks/results/policy_latency_<size>_<device>.json.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForImageTextToText, LlavaProcessor, LogitsProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from llarva_gym.action_modes import JOINT_LOWER, JOINT_UPPER
from llarva_gym.files import write_json_atomic
from llarva_policy.generation import generate_text
from llarva_policy.model import (IMAGE_TOKEN, LoadedLlava, build_tokenizer, resolve_device, resolve_dtype,
                                 tiny_llava_config)
from llarva_policy.policy import LlarvaPolicy

RESULTS = Path(__file__).parent / "results"
INSTRUCTIONS = ("sweep dirt to the smaller dustpan", "reach the red target", "open the top drawer",
                "push the maroon button")


class FixedLength(LogitsProcessor):
    """Suppresses end of sequence, so every answer runs to max_new_tokens; counts decoding steps."""

    def __init__(self, eos_token_id: int):
        self.eos_token_id, self.steps = eos_token_id, 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        scores = scores.clone()
        scores[:, self.eos_token_id] = float("-inf")
        return scores


def random_llava(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedLlava:
    """A random LLaVA of `size` built directly on `device` in `dtype`, with its processor."""
    tokenizer = build_tokenizer()
    config = tiny_llava_config(tokenizer, size=size)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()
    vision = config.vision_config
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": vision.image_size}, do_pad=True,
                                             crop_size={"height": vision.image_size, "width": vision.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=IMAGE_TOKEN)
    return LoadedLlava(model=model, processor=processor, tokenizer=tokenizer, image_token=IMAGE_TOKEN,
                       image_token_id=config.image_token_id, num_image_tokens=config.image_seq_length,
                       image_size=vision.image_size, layout="transformers", path=Path(f"random-{size}"))


def observations(batch: int, seed: int) -> dict:
    """A vector env's batch of observations: random 128x128 images and joint positions."""
    rng = np.random.default_rng(seed)
    return {"front_rgb": rng.integers(0, 256, (batch, 128, 128, 3), dtype=np.uint8),
            "joint_positions": rng.uniform(JOINT_LOWER, JOINT_UPPER, (batch, 7)).astype(np.float32),
            "gripper_open": np.ones((batch, 1), dtype=np.float32),
            "instruction": tuple(INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch))}


def time_row(policy: LlarvaPolicy, batch: int, answer_tokens: int, warmup: int, repeats: int) -> dict:
    loaded, cuda = policy.loaded, policy.loaded.device.type == "cuda"
    rng_seed = 1000 + batch
    state = None
    for step in range(5):          # five steps of history, as in the middle of an episode
        _, state = policy.build_prompts(observations(batch, rng_seed + step), state)
    obs = observations(batch, rng_seed + 5)
    prompts, _ = policy.build_prompts(obs, state)

    def sync():
        if cuda:
            torch.cuda.synchronize(loaded.device)

    def clock(fn) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return times

    fixed = FixedLength(loaded.tokenizer.eos_token_id)
    policy.logits_processor = [fixed]
    step_times = clock(lambda: policy.predict(obs, state))
    steps_per_call = fixed.steps // (warmup + repeats)
    preprocess_times = clock(lambda: loaded.processor(images=list(obs["front_rgb"]), text=prompts, padding=True,
                                                      return_tensors="pt"))
    prompt_tokens = loaded.processor(images=list(obs["front_rgb"][:1]), text=prompts[:1],
                                     return_tensors="pt")["input_ids"].shape[1]
    seconds = statistics.median(step_times)
    return {"method": policy.generation_method, "batch": batch, "prompt_tokens": int(prompt_tokens),
            "answer_tokens": steps_per_call, "seconds_per_step": round(seconds, 5),
            "seconds_per_action": round(seconds / batch, 5), "actions_per_second": round(batch / seconds, 3),
            "new_tokens_per_second": round(batch * answer_tokens / seconds, 1),
            "preprocess_seconds": round(statistics.median(preprocess_times), 5),
            "min_seconds": round(min(step_times), 5), "max_seconds": round(max(step_times), 5)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="a LLaVA checkpoint folder (either layout)")
    source.add_argument("--size", choices=("tiny", "small", "7b"), default=None,
                        help="random weights of this shape (default: 7b on CUDA, tiny on CPU)")
    parser.add_argument("--vision-tower", default=None, help="CLIP folder for an original-layout checkpoint")
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--answer-tokens", type=int, default=64, help="new tokens in every answer")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--method", choices=("hf", "fast", "both"), default="hf")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    methods = ["hf", "fast"] if args.method == "both" else [args.method]
    if "method" not in inspect.signature(generate_text).parameters and methods != ["hf"]:
        raise SystemExit("this llarva_policy.generation has no method switch: use --method hf")

    started = time.perf_counter()
    if args.checkpoint:
        policy = LlarvaPolicy.from_pretrained(args.checkpoint, device=device, dtype=dtype,
                                              vision_tower=args.vision_tower, on_parse_error="hold")
        label = Path(args.checkpoint).name
    else:
        size = args.size or ("7b" if device.type == "cuda" else "tiny")
        policy = LlarvaPolicy(random_llava(size, device, dtype), on_parse_error="hold")
        label = size
    load_seconds = time.perf_counter() - started
    policy.max_new_tokens = args.answer_tokens

    report = {
        "benchmark": "policy_latency", "model": label, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "answer_tokens": args.answer_tokens, "repeats": args.repeats, "warmup": args.warmup,
        "load_seconds": round(load_seconds, 2),
        "parameters_billion": round(sum(p.numel() for p in policy.loaded.model.parameters()) / 1e9, 3),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "rows": [],
    }
    out = Path(args.out) if args.out else RESULTS / f"policy_latency_{label}_{device.type}.json"
    print(f"{label} on {device} ({report['dtype']}, {report['parameters_billion']}B parameters), "
          f"{args.answer_tokens} new tokens per answer, median of {args.repeats}")
    header = f"{'method':>6} {'batch':>5} {'prompt':>6} {'s/step':>8} {'s/action':>9} {'actions/s':>9} {'tokens/s':>9} {'prep s':>7}"
    print(header)
    for method in methods:
        policy.generation_method = method
        for batch in batch_sizes:
            row = time_row(policy, batch, args.answer_tokens, args.warmup, args.repeats)
            report["rows"].append(row)
            print(f"{method:>6} {batch:>5} {row['prompt_tokens']:>6} {row['seconds_per_step']:>8.4f} "
                  f"{row['seconds_per_action']:>9.4f} {row['actions_per_second']:>9.2f} "
                  f"{row['new_tokens_per_second']:>9.1f} {row['preprocess_seconds']:>7.4f}")
            write_json_atomic(out, report, indent=2)   # after every row: a GPU run that dies keeps what it measured
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
