"""Training speed of `llarva train-small`'s step: samples/s and steps/s per setting.

The step is `train_small.train_model`'s (forward through the whole LLaVA, the answer loss, backward,
clipping, fused AdamW) on synthetic batches of the real shape: 64 image tokens plus text up to
`--seq` tokens in all (train-small's samples: 552-581), the last 150 labelled, random 128 px images.
Speed does not depend on the tokens' values, so no demos are needed.

    python benchmarks/train_small_speed.py --configs bs=128,det=1 bs=128 bs=128,compile=1 bs=512,compile=1

keys: bs (batch size), det (1: train-small's deterministic kernels), compile (1: `compile_model`,
batches padded to one length), size (a `train_small.SHAPES` key). Prints a table and writes JSON
(after each setting, atomically) to benchmarks/results/ or --out. Baseline: the first setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from llarva_gym.files import write_json_atomic
from llarva_policy import train_small
from llarva_policy.model import build_tokenizer, resolve_device

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ANSWER_TOKENS = 150


def parse_setting(text: str) -> dict:
    setting = {"bs": 128, "det": 0, "compile": 0, "size": "small"}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in setting:
            raise ValueError(f"--configs: unknown key {key!r} in {text!r}; expected one of {sorted(setting)}")
        setting[key] = value if key == "size" else int(value)
    return setting


def synthetic_set(tokenizer, samples: int, seq: int, image_tokens: int, seed: int) -> train_small.TrainingSet:
    generator = torch.Generator().manual_seed(seed)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids and i != image_id])
    lengths = torch.randint(seq - 30, seq + 1, (samples,), generator=generator)
    ids = ordinary[torch.randint(len(ordinary), (samples, seq), generator=generator)]
    ids[:, 2:2 + image_tokens] = image_id
    labels = torch.full_like(ids, -100)
    goal = torch.zeros_like(ids, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        labels[row, length - ANSWER_TOKENS:length] = ids[row, length - ANSWER_TOKENS:length]
        ids[row, length:] = tokenizer.pad_token_id
        goal[row, length - 20:length - 15] = True
    images = torch.randint(0, 256, (samples, 3, train_small.IMAGE_SIZE, train_small.IMAGE_SIZE), dtype=torch.uint8,
                           generator=generator)
    return train_small.TrainingSet(ids, labels, lengths, images, goal, torch.zeros_like(ids, dtype=torch.uint8))


def measure(setting: dict, tokenizer, device, steps: int, seq: int) -> dict:
    model, processor = train_small.build_model(tokenizer, setting["size"], seed=0)
    data = synthetic_set(tokenizer, max(4 * setting["bs"], 512), seq, model.config.image_seq_length, 0).to(device)
    normalize = train_small.ImageNormalizer(processor.image_processor, device)
    row = {**setting, "parameters": sum(p.numel() for p in model.parameters()), "seq": seq}
    # Two runs: a few warm-up steps (compilation, CUDA start), then the measured ones.
    with train_small._Deterministic(enabled=bool(setting["det"])):
        started = time.perf_counter()
        train_small.train_model(model, data, normalize, device=device, batch_size=setting["bs"], max_steps=3,
                                compile=bool(setting["compile"]), goal_weight=10.0, progress=False)
        row["first_steps_seconds"] = round(time.perf_counter() - started, 2)
        log = train_small.train_model(model, data, normalize, device=device, batch_size=setting["bs"],
                                      max_steps=steps, compile=bool(setting["compile"]), goal_weight=10.0,
                                      progress=False)
    row.update(steps=log["steps"], seconds=log["seconds"], steps_per_second=round(log["steps"] / log["seconds"], 2),
               samples_per_second=round(log["steps"] * setting["bs"] / log["seconds"], 1))
    if device.type == "cuda":
        row["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["bs=128,det=1", "bs=128", "bs=128,compile=1"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq", type=int, default=581, help="tokens per sample, image tokens included")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    settings = [parse_setting(text) for text in args.configs]
    device = resolve_device(args.device)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    corpus = [f"USER: <image>\nmove {i} to [{i % 97}, {i % 89}] -0.{i:04d}, 1.{i % 7:03d}" for i in range(400)]
    tokenizer = build_tokenizer(corpus_texts=corpus)
    out = Path(args.out) if args.out else RESULTS_DIR / f"train_small_speed_{device.type}.json"
    report = {"benchmark": "train_small_speed", "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "steps": args.steps, "rows": []}
    for setting in settings:
        try:
            row = measure(setting, tokenizer, device, args.steps, args.seq)
        except torch.OutOfMemoryError:
            row = {**setting, "error": "oom"}
        baseline = report["rows"][0] if report["rows"] else row
        if "samples_per_second" in row and "samples_per_second" in baseline:
            row["samples_ratio_vs_first"] = round(row["samples_per_second"] / baseline["samples_per_second"], 2)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json_atomic(out, report)
    print(f"\n{'setting':<32} {'steps/s':>8} {'samples/s':>10} {'vs first':>9}")
    for row in report["rows"]:
        name = ",".join(f"{k}={row[k]}" for k in ("bs", "det", "compile", "size"))
        print(f"{name:<32} {row.get('steps_per_second', 'oom'):>8} {row.get('samples_per_second', ''):>10} "
              f"{row.get('samples_ratio_vs_first', ''):>9}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
