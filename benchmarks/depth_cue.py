"""How well the front image fixes reach_target's depth, with and without shadows, same scenes, same run.

    python benchmarks/depth_cue.py --scenes 300

The target's distance from the front camera (its depth) shows in the fast renderer's 128 px image
only as the sphere's size; `render_quality="high"` also draws its shadow on the table, a second
view of where it is. For each scene (reach_target, variation 0, the evaluation's reset seeds) and
each renderer, the target is found by rendering the scene twice, with the target in place and moved
out of sight: pixels that change and are the target's red are the sphere, pixels that only get
darker are its shadow. A quadratic least-squares regression, scored by 5-fold cross-validation,
predicts the depth from the sphere's image position and size ("fast") and from those plus the
shadow's image position ("high", on scenes where the shadow is in view). Reported: the residual's
standard deviation and the share of scenes where the depth comes within the sphere's radius
(2.5 cm). Not a policy: what a reader of exact pixel counts could do, an upper bound of sorts.
Prints a table and writes JSON (default benchmarks/results/depth_cue_reach_target.json).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np

import llarva_gym  # noqa: F401  (registers the llarva/ ids)
from llarva_gym.evaluation import episode_reset_seed
from llarva_gym.files import write_json_atomic

SPHERE_RADIUS = 0.025
OUT_OF_SIGHT = np.array([0.0, 0.0, -5.0])   # below the floor
MIN_SHADOW_PX = 8   # fewer: a shadow mostly out of view or hidden, its centroid no measure of it


def target_pixels(env) -> tuple[np.ndarray, np.ndarray]:
    """(sphere mask, shadow mask) of the target in the front image of the scene `env` is in."""
    backend = env.unwrapped.backend
    task = backend.task
    with_target = backend.cameras.render(backend.data)["front_rgb"].astype(np.int16)
    position = task.body_position("target").copy()
    task.set_mocap("target", OUT_OF_SIGHT)
    mujoco.mj_forward(backend.model, backend.data)
    without = backend.cameras.render(backend.data)["front_rgb"].astype(np.int16)
    task.set_mocap("target", position)
    mujoco.mj_forward(backend.model, backend.data)
    changed = np.abs(with_target - without).sum(-1) > 24
    red = (with_target[..., 0] > 2 * with_target[..., 1] + 20) & (with_target[..., 0] > 2 * with_target[..., 2] + 20)
    sphere = changed & red
    # The high renderer's multisampling blends the sphere's rim into the background: darker, not
    # red, and not shadow. Two pixels around the sphere are left out.
    near_sphere = sphere.copy()
    for _ in range(2):
        near_sphere = near_sphere | np.roll(near_sphere, 1, 0) | np.roll(near_sphere, -1, 0)
        near_sphere = near_sphere | np.roll(near_sphere, 1, 1) | np.roll(near_sphere, -1, 1)
    shadow = changed & ~near_sphere & ((with_target - without).sum(-1) < 0)
    return sphere, shadow


def centroid(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.mean(), rows.mean()]) / mask.shape[0]


def quadratic(features: np.ndarray) -> np.ndarray:
    columns = [np.ones(len(features))] + list(features.T)
    columns += [features[:, i] * features[:, j] for i, j in itertools.combinations_with_replacement(
        range(features.shape[1]), 2)]
    return np.stack(columns, 1)


def cross_validated_residuals(features: np.ndarray, depth: np.ndarray, folds: int = 5) -> np.ndarray:
    design, residuals = quadratic(features), np.empty_like(depth)
    for fold in range(folds):
        test = np.arange(len(depth)) % folds == fold
        weights, *_ = np.linalg.lstsq(design[~test], depth[~test], rcond=None)
        residuals[test] = depth[test] - design[test] @ weights
    return residuals


def measure(quality: str, scenes: int, seed: int) -> list[dict]:
    env = gym.make("llarva/reach_target", variation=0, render_quality=quality)
    rows = []
    for index in range(scenes):
        env.reset(seed=episode_reset_seed(seed, index))
        backend = env.unwrapped.backend
        camera = backend.cameras.misc(backend.data)["front_camera_extrinsics"][:3, 3]
        sphere, shadow = target_pixels(env)
        rows.append({"depth_m": float(np.linalg.norm(backend.task.body_position("target") - camera)),
                     "sphere_px": int(sphere.sum()), "shadow_px": int(shadow.sum()),
                     "sphere_uv": centroid(sphere).tolist() if sphere.any() else None,
                     "shadow_uv": centroid(shadow).tolist() if shadow.sum() >= MIN_SHADOW_PX else None})
    env.close()
    return rows


def score(name: str, rows: list[dict], use_shadow: bool) -> dict:
    kept = [r for r in rows if r["sphere_uv"] is not None and (r["shadow_uv"] is not None or not use_shadow)]
    features = np.array([r["sphere_uv"] + [np.sqrt(r["sphere_px"])] + (r["shadow_uv"] if use_shadow else [])
                         for r in kept])
    residuals = cross_validated_residuals(features, np.array([r["depth_m"] for r in kept]))
    return {"cue": name, "scenes": len(kept), "of": len(rows), "depth_sd_m": round(float(residuals.std()), 4),
            "within_radius": round(float(np.mean(np.abs(residuals) < SPHERE_RADIUS)), 3)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1, help="llarva eval's --seed: its episodes' scenes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.scenes < 10:
        parser.error("--scenes: at least 10 (5-fold cross-validation of a 6-to-21-term regression)")

    fast, high = measure("fast", args.scenes, args.seed), measure("high", args.scenes, args.seed)
    spread = float(np.std([r["depth_m"] for r in fast]))
    results = [score("fast: sphere position and size", fast, use_shadow=False),
               score("high: sphere position and size", high, use_shadow=False),
               score("high: and the shadow's position", high, use_shadow=True)]
    print(f"reach_target, {args.scenes} scenes: the target's depth spreads {100 * spread:.1f} cm (standard deviation)")
    print(f"{'cue':<36} {'scenes':>7} {'depth sd (cm)':>14} {'within 2.5 cm':>14}")
    for r in results:
        print(f"{r['cue']:<36} {r['scenes']:>7} {100 * r['depth_sd_m']:>14.2f} {r['within_radius']:>14.1%}")
    report = {"benchmark": "depth_cue", "task": "reach_target", "variation": 0, "seed": args.seed,
              "scenes": args.scenes, "depth_spread_sd_m": round(spread, 4), "results": results,
              "rows": {"fast": fast, "high": high},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out or Path(__file__).parent / "results" / "depth_cue_reach_target.json")
    write_json_atomic(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
