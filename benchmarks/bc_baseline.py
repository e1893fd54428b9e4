"""A conventional behaviour-cloning baseline on train-small's demos: how far does a model built for
visuomotor control get on a task, from the same front image, joint history and labels?

    python benchmarks/bc_baseline.py --task reach_target --variation 0 --demos 1500 --train-seconds 1800 \
        --episodes 100 --seed 1 --render-quality high --action-noise 0.3

Not a LLARVA policy: a small CNN whose feature maps become keypoints through a spatial soft-argmax
(Levine et al. 2016's visuomotor policy), concatenated with the five-step joint history of
LLARVA's prompt (zeros before the episode's first step, as there) and mapped by an MLP to the seven
joint velocities; the label of step t is what `annotate` writes (the expert's command stored with
step t + 1), the loss MSE on velocities scaled per joint. Demos as `llarva train-small` records
them (demo seed 0, `--action-noise` DART), evaluation as `llarva eval` runs it (same episodes for a
seed, same rendering), the scripted expert on the same episodes. Where this reaches the aim and the
LLaVA model does not, the limit is how the LLaVA model reads the image or writes its answers; where
it does not either, the limit is what the front camera and the demos give.
Prints a table and writes JSON (default benchmarks/results/bc_baseline_<task>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from llarva_gym.action_modes import VELOCITY_LIMIT
from llarva_gym.demos import episode_dirs, load_demo
from llarva_gym.evaluation import evaluate
from llarva_gym.files import write_json_atomic
from llarva_gym.recording import EXPERT_ACTION_KEY, POLICY_STEP_KEY, record_demos
from llarva_gym.registration import resolve_task
from llarva_policy.codec import HISTORY_STEPS
from llarva_policy.policy import _advance_history

RESULTS_DIR = Path(__file__).resolve().parent / "results"
JOINTS = 7
VISION_TOWERS = {"vit": "small", "swin": "small-swin", "swin256": "small-swin-256", "focal": "small-focal"}   # --vision -> train-small's size


def demo_samples(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One demo's labelled steps: images (uint8 CHW), joint histories (5, 7), expert velocities (7,)."""
    demo = load_demo(folder)
    positions = np.stack([np.asarray(o.joint_positions, dtype=np.float32) for o in demo])
    images, histories, labels = [], [], []
    for t in range(len(demo) - 1):
        label = demo[t + 1]
        if (label.misc or {}).get(POLICY_STEP_KEY):
            continue
        history = np.zeros((HISTORY_STEPS, JOINTS), np.float32)
        steps = positions[max(0, t - HISTORY_STEPS + 1):t + 1]
        history[HISTORY_STEPS - len(steps):] = steps
        images.append(np.asarray(demo[t].front_rgb, dtype=np.uint8).transpose(2, 0, 1))
        histories.append(history)
        labels.append(np.asarray((label.misc or {}).get(EXPERT_ACTION_KEY, label.joint_velocities),
                                 dtype=np.float32)[:JOINTS])
    return np.stack(images), np.stack(histories), np.stack(labels)


def load_samples(data_root: Path, task: str, processes: int = 1) -> dict:
    """Every labelled step of the demos (`demo_samples`), in episode order, read by `processes` workers."""
    folders = episode_dirs(data_root, task)
    with ProcessPoolExecutor(processes) if processes > 1 else contextlib.nullcontext() as pool:
        demos = (pool.map(demo_samples, folders, chunksize=8) if pool else map(demo_samples, folders))
        parts = list(tqdm(demos, total=len(folders), desc="loading demos", unit="episode", mininterval=10))
    return {name: torch.from_numpy(np.concatenate([part[i] for part in parts]))
            for i, name in enumerate(("images", "histories", "labels"))}


class SpatialSoftArgmax(nn.Module):
    """(B, C, H, W) feature maps -> (B, 2C): each channel's expected (x, y) in [-1, 1]."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        weights = torch.softmax(features.reshape(b, c, h * w), dim=-1).reshape(b, c, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=features.device)
        ys = torch.linspace(-1.0, 1.0, h, device=features.device)
        return torch.cat([(weights.sum(2) * xs).sum(-1), (weights.sum(3) * ys).sum(-1)], dim=1)


class PatchTokens(nn.Module):
    """A train-small vision tower (`SHAPES[size]`, randomly initialised; "small": a 4-layer CLIP ViT
    with 16 px patches, "small-swin": a Swin with 4 px patches), its image tokens as the LLaVA
    model takes them (`vision_feature_layer=-1`, CLIP's CLS left out) each reduced to 16 numbers:
    what the language model gets to see of the image, here read by an MLP instead."""

    def __init__(self, size: str = "small"):
        super().__init__()
        from transformers import AutoModel
        from llarva_policy.model import HIERARCHICAL_TOWERS, tower_grid
        from llarva_policy.train_small import IMAGE_SIZE, vision_tower_config

        config = vision_tower_config(size)
        self.tower = AutoModel.from_config(config)
        self.drop_first = config.model_type not in HIERARCHICAL_TOWERS
        stride, _ = tower_grid(config)
        self.reduce = nn.Linear(config.hidden_size, 16)
        self.features = (IMAGE_SIZE // stride) ** 2 * 16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.tower(pixel_values=images, output_hidden_states=True).hidden_states[-1]
        return self.reduce(tokens[:, 1:] if self.drop_first else tokens).flatten(1)


def vision_module(vision: str = "cnn", keypoints: int = 32) -> tuple[nn.Module, int]:
    """(module, features per image): `vision="cnn"`: a CNN and a spatial soft-argmax (`keypoints`
    keypoints); "vit", "swin", ...: `PatchTokens` of train-small's tower `VISION_TOWERS[vision]`.
    The module takes images scaled to [-0.5, 0.5]."""
    if vision == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, keypoints, 3, padding=1), SpatialSoftArgmax()), 2 * keypoints
    if vision in VISION_TOWERS:
        tokens = PatchTokens(VISION_TOWERS[vision])
        return tokens, tokens.features
    raise ValueError(f"vision: expected 'cnn' or one of {sorted(VISION_TOWERS)}, got {vision!r}")


class VisuomotorPolicy(nn.Module):
    """`vision_module(vision)` and the joint history into an MLP to the seven joint velocities."""

    def __init__(self, vision: str = "cnn", keypoints: int = 32, hidden: int = 256):
        super().__init__()
        self.vision, features = vision_module(vision, keypoints)
        self.head = nn.Sequential(nn.Linear(features + HISTORY_STEPS * JOINTS, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, JOINTS))
        self.register_buffer("label_scale", torch.ones(JOINTS))

    def forward(self, images: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        """Velocities divided by `label_scale` (multiply by it for rad/s)."""
        features = self.vision(images.float() / 255.0 - 0.5)
        return self.head(torch.cat([features, histories.flatten(1)], dim=1))


def train(model: VisuomotorPolicy, data: dict, *, seconds: float, batch_size: int, lr: float, seed: int) -> dict:
    """AdamW, cosine decay on the clock; returns the log."""
    device = model.label_scale.device
    model.label_scale.copy_(data["labels"].std(0).clamp_min(1e-3).to(device))
    targets = (data["labels"].to(device) / model.label_scale)
    images, histories = data["images"].to(device), data["histories"].to(device)   # uint8 images: 5 GB for 3,000 demos
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    n, step, history, started = len(targets), 0, [], time.perf_counter()
    order, position = torch.randperm(n, generator=generator), 0
    bar = tqdm(desc="train", unit="step", mininterval=10)
    while (elapsed := time.perf_counter() - started) < seconds:
        if position + batch_size > n:
            order, position = torch.randperm(n, generator=generator), 0
        rows = order[position:position + batch_size].to(device)
        position += batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / seconds)))
        loss = nn.functional.mse_loss(model(images[rows], histories[rows]), targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0:
            history.append({"step": step, "seconds": round(elapsed, 1), "loss": round(loss.item(), 5)})
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update(1)
    bar.close()
    model.eval()
    return {"steps": step, "epochs": round(step * batch_size / n, 2), "seconds": round(time.perf_counter() - started, 1),
            "samples": n, "batch_size": batch_size, "lr": lr, "final_loss": history[-1]["loss"] if history else None,
            "history": history}


class BaselinePolicy:
    """Stable-Baselines3's `predict` around the model, keeping the joint history as `LlarvaPolicy` does.
    A regression can leave the Panda's velocity limits, which the env refuses: such a velocity is
    clipped to its limit, and counted (`clipped`)."""

    def __init__(self, model: VisuomotorPolicy):
        self.model, self.clipped = model, 0

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        images = np.asarray(observation["front_rgb"])
        single = images.ndim == 3
        images = images[None] if single else images
        positions = np.asarray(observation["joint_positions"], dtype=np.float32).reshape(len(images), JOINTS)
        state = _advance_history(state, episode_start, positions)
        device = self.model.label_scale.device
        with torch.no_grad():
            scaled = self.model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device),
                                torch.from_numpy(np.nan_to_num(state, nan=0.0)).to(device))
        velocities = (scaled * self.model.label_scale).cpu().numpy()
        self.clipped += int(np.sum(np.abs(velocities) > VELOCITY_LIMIT))
        velocities = np.clip(velocities, -VELOCITY_LIMIT, VELOCITY_LIMIT)
        actions = np.concatenate([velocities, np.ones((len(images), 1), np.float32)], axis=1)
        return (actions[0] if single else actions), state


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="reach_target")
    parser.add_argument("--variation", type=int, default=0)
    parser.add_argument("--demos", type=int, default=1500)
    parser.add_argument("--data", default=None, help="demo folder to record into or reuse (default: a temp folder)")
    parser.add_argument("--action-noise", type=float, default=0.3, help="DART noise of the demos (train-small's: 0.3)")
    parser.add_argument("--render-quality", default="high", choices=("fast", "high"))
    parser.add_argument("--vision", default="cnn", choices=("cnn", *VISION_TOWERS),
                        help="cnn: CNN + spatial soft-argmax; vit, swin, swin256, focal: train-small's tower of "
                             "--size small, small-swin, small-swin-256 or small-focal, its image tokens to the MLP")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--train-seconds", type=float, default=1800.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1, help="evaluation seed (llarva eval's --seed)")
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if there is one, else cpu)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    task = resolve_task(args.task)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS_DIR / f"bc_baseline_{task}.json"
    data_root = Path(args.data) if args.data else out.with_suffix("") / "data"
    report = {"benchmark": "bc_baseline", "task": task, "vision": args.vision, "variation": args.variation,
              "demos": args.demos,
              "demo_seed": 0, "action_noise": args.action_noise, "render_quality": args.render_quality,
              "eval_seed": args.seed, "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "cpu_threads": torch.get_num_threads()}

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    model = VisuomotorPolicy(args.vision).to(device)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    # The trained weights are kept: an evaluation cut short reruns without training again.
    weights = out.with_suffix(".pt")
    previous = json.loads(out.read_text()) if out.is_file() else {}
    same_run = all(previous.get(key) == report[key] for key in ("task", "vision", "variation", "demos",
                                                                 "action_noise", "render_quality"))
    if weights.is_file() and "training" in previous and same_run:
        model.load_state_dict(torch.load(weights, weights_only=True, map_location=device))
        model.eval()
        report["training"] = previous["training"]
    else:
        recorded = record_demos(task, args.demos, data_root, image_size=128, cameras=("front",),
                                processes=args.processes, seed=0, variation=args.variation,
                                render_quality=args.render_quality, action_noise=args.action_noise)
        report["recording_seconds"] = recorded["seconds"]
        data = load_samples(data_root, task, args.processes)
        report["training"] = train(model, data, seconds=args.train_seconds, batch_size=args.batch_size, lr=args.lr,
                                   seed=0)
        del data
        # Episodes of another model's evaluation would be resumed as this one's.
        out.with_name(f"{out.stem}_baseline_episodes.json").unlink(missing_ok=True)
        torch.save(model.state_dict(), weights.with_name(f".{weights.name}.tmp"))
        weights.with_name(f".{weights.name}.tmp").replace(weights)
    write_json_atomic(out, report)

    common = dict(episodes=args.episodes, seed=args.seed, num_envs=args.num_envs, render_quality=args.render_quality,
                  variation=args.variation)
    baseline = BaselinePolicy(model)
    for name, policy in (("baseline", baseline), ("expert", "expert")):
        results = evaluate(policy, task, results_path=out.with_name(f"{out.stem}_{name}_episodes.json"), **common)
        report[name] = results["summary"]
        write_json_atomic(out, report)
    report["baseline"]["clipped_velocities"] = baseline.clipped
    write_json_atomic(out, report)

    print(f"\n{task}, variation {args.variation}, {report['training']['samples']} samples, "
          f"{report['training']['steps']} steps in {report['training']['seconds']} s")
    print(f"{'policy':<10} {'successes':>10} {'rate':>6}")
    for name in ("baseline", "expert"):
        summary = report[name]
        print(f"{name:<10} {summary['successes']:>6}/{summary['episodes']:<3} {summary['success_rate']:>6.2f}")
    print(json.dumps({name: report[name]["success_rate"] for name in ("baseline", "expert")}))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
