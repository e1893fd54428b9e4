"""Which vision tower, trained from scratch, reads where reach_target's target is? A probe of the
tower alone: each one regresses the target's position from the front image of a freshly reset
scene, and is scored on scenes it has not seen, the error split along the front camera's ray
(depth) and across it.

    python benchmarks/tower_probe.py --scenes 3000 --held-out 500 --steps 600 --towers cnn,vit,swin,focal

Why: train-small's reach misses are depth misreads (examples/train_small_log.md), and the
behaviour-cloning baseline on the same demos reached 88/100 with a CNN and a spatial soft-argmax
where the same regression on the Swin tower reached 59. Which tower a LLaVA model should carry is
a question about the image alone, and this asks it at a cost the project's CPU can pay: one image
per scene, no demos, no language model, every tower the same number of steps on the same images.
The readout is `bc_baseline.py`'s (`cnn`: 32 soft-argmax keypoints; a train-small tower: each of
its image tokens, as LLaVA's projector receives them, reduced to 16 numbers), then an MLP to the
standardised x, y, z. A proxy: in the LLaVA model a Llama reads the tokens, not an MLP.

Scenes: `gym.make("llarva/reach_target", variation=--variation)` reset with seeds 0..scenes-1
(training) and 10**6.. (held out), the front image at 128 px. Prints a table and writes JSON
(default benchmarks/results/tower_probe_<task>.json), a tower at a time: a rerun skips the towers
it has (with the same settings) and trains the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llarva_gym  # noqa: E402,F401
from bc_baseline import vision_module  # noqa: E402
from llarva_gym.files import write_json_atomic  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HELD_OUT_SEED = 10 ** 6
TOWERS = ("cnn", "vit", "swin", "swin256", "focal")


def render_scenes(seeds, variation: int, render_quality: str) -> dict:
    """Front images (uint8 CHW), the target's position and the front camera's position of each reset seed."""
    env = gym.make("llarva/reach_target", variation=variation, render_quality=render_quality)
    images, targets, cameras = [], [], []
    for seed in tqdm(seeds, desc="rendering scenes", unit="scene", mininterval=10):
        observation, _ = env.reset(seed=int(seed))
        backend = env.unwrapped.backend
        images.append(np.asarray(observation["front_rgb"], dtype=np.uint8).transpose(2, 0, 1))
        targets.append(np.asarray(env.unwrapped.rlbench_observation().task_low_dim_state[:3], dtype=np.float32))
        cameras.append(backend.cameras.misc(backend.data)["front_camera_extrinsics"][:3, 3].astype(np.float32))
    env.close()
    return {"images": torch.from_numpy(np.stack(images)), "targets": torch.from_numpy(np.stack(targets)),
            "cameras": torch.from_numpy(np.stack(cameras))}


class TargetProbe(nn.Module):
    """A vision module of `bc_baseline.py` and an MLP to the target's standardised x, y, z."""

    def __init__(self, tower: str, hidden: int = 256):
        super().__init__()
        self.vision, features = vision_module(tower)
        self.head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 3))
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("scale", torch.ones(3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The target's position in metres."""
        return self.head(self.vision(images.float() / 255.0 - 0.5)) * self.scale + self.mean


@torch.no_grad()
def errors(model: TargetProbe, scenes: dict, batch_size: int = 100) -> dict:
    """Median and 90th-percentile error (cm) of the predicted position, and of its parts along the
    camera's ray to the target (depth, signed: positive beyond it) and across it."""
    model.eval()
    predicted = torch.cat([model(scenes["images"][i:i + batch_size]) for i in range(0, len(scenes["images"]),
                                                                                      batch_size)])
    model.train()
    offset = (predicted - scenes["targets"]).double()
    ray = scenes["targets"].double() - scenes["cameras"].double()
    ray = ray / ray.norm(dim=1, keepdim=True)
    depth = (offset * ray).sum(1)
    lateral = (offset - depth[:, None] * ray).norm(dim=1)
    centimetres = {"error": offset.norm(dim=1), "depth": depth.abs(), "lateral": lateral}
    report = {f"{name}_cm_median": round(float(values.median()) * 100, 2) for name, values in centimetres.items()}
    report.update({f"{name}_cm_p90": round(float(values.quantile(0.9)) * 100, 2) for name, values in centimetres.items()})
    report["within_2cm"] = round(float((offset.norm(dim=1) < 0.02).double().mean()), 3)
    return report


def train_probe(tower: str, train: dict, held_out: dict, *, steps: int, batch_size: int, lr: float, seed: int,
                evaluations: int = 4) -> dict:
    """AdamW on the mean squared standardised error, a short warm-up then cosine decay over `steps`;
    held-out (and training-scene) errors at `evaluations` points along the way."""
    torch.manual_seed(seed)
    model = TargetProbe(tower)
    model.mean.copy_(train["targets"].mean(0))
    model.scale.copy_(train["targets"].std(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    n, warmup = len(train["targets"]), min(50, steps // 10)
    seen = {name: value[:len(held_out["targets"])] for name, value in train.items()}   # memorised or read?
    order, position, curve, started, losses = torch.randperm(n, generator=generator), 0, [], time.perf_counter(), []
    checkpoints = {round(steps * (k + 1) / evaluations) for k in range(evaluations)}
    for step in tqdm(range(1, steps + 1), desc=f"training {tower}", unit="step", mininterval=10):
        if position + batch_size > n:
            order, position = torch.randperm(n, generator=generator), 0
        rows = order[position:position + batch_size]
        position += batch_size
        progress = (step - warmup) / max(1, steps - warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * (step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * progress)))
        loss = nn.functional.mse_loss((model(train["images"][rows]) - model.mean) / model.scale,
                                      (train["targets"][rows] - model.mean) / model.scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step in checkpoints:
            curve.append({"step": step, "epochs": round(step * batch_size / n, 2),
                          "seconds": round(time.perf_counter() - started, 1),
                          "loss": round(float(np.mean(losses[-50:])), 4),
                          "held_out": errors(model, held_out), "training_scenes": errors(model, seen)})
    return {"tower": tower, "parameters": sum(p.numel() for p in model.parameters()), "steps": steps,
            "seconds": round(time.perf_counter() - started, 1), "final": curve[-1], "curve": curve}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--towers", default="cnn,vit,swin,focal",
                        help=f"comma-separated, of {', '.join(TOWERS)} (bc_baseline.py's --vision)")
    parser.add_argument("--variation", type=int, default=0)
    parser.add_argument("--render-quality", default="high", choices=("fast", "high"))
    parser.add_argument("--scenes", type=int, default=3000, help="training scenes (train-small's reach demos: 3,000)")
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    towers = [name.strip() for name in args.towers.split(",") if name.strip()]
    unknown = [name for name in towers if name not in TOWERS]
    if unknown or not towers:
        parser.error(f"--towers: expected comma-separated names of {', '.join(TOWERS)}, got {args.towers!r}")
    for name in ("scenes", "held_out", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS_DIR / "tower_probe_reach_target.json"
    settings = {key: getattr(args, key) for key in ("variation", "render_quality", "scenes", "held_out", "steps",
                                                    "batch_size", "lr", "seed")}
    previous = json.loads(out.read_text()) if out.is_file() else {}
    report = {"benchmark": "tower_probe", "task": "reach_target", **settings,
              "held_out_seeds": f"{HELD_OUT_SEED}..{HELD_OUT_SEED + args.held_out - 1}",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "cpu_threads": torch.get_num_threads(), "device": "cpu",
              "towers": previous.get("towers", {}) if all(previous.get(k) == v for k, v in settings.items()) else {}}
    todo = [name for name in towers if name not in report["towers"]]
    if todo:
        train = render_scenes(range(args.scenes), args.variation, args.render_quality)
        held_out = render_scenes(range(HELD_OUT_SEED, HELD_OUT_SEED + args.held_out), args.variation,
                                 args.render_quality)
        for name in todo:
            report["towers"][name] = train_probe(name, train, held_out, steps=args.steps,
                                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed)
            write_json_atomic(out, report)
    write_json_atomic(out, report)

    print(f"\nreach_target, variation {args.variation}: {args.scenes} training scenes, {args.held_out} held out, "
          f"{args.steps} steps of {args.batch_size}")
    print(f"{'tower':<8} {'params':>9} {'seconds':>8} {'error cm':>9} {'depth cm':>9} {'lateral':>8} "
          f"{'<2 cm':>6} {'training scenes cm':>19}")
    for name in towers:
        result = report["towers"][name]
        final = result["final"]
        held = final["held_out"]
        print(f"{name:<8} {result['parameters']:>9} {result['seconds']:>8} {held['error_cm_median']:>9} "
              f"{held['depth_cm_median']:>9} {held['lateral_cm_median']:>8} {held['within_2cm']:>6} "
              f"{final['training_scenes']['error_cm_median']:>19}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
