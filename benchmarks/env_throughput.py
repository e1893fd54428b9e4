"""Env steps per second (reset excluded) for the embedded simulator.

Single env pinned to one core; 2 async vector envs (one worker per core). Two sensor settings:
the front 128x128 RGB camera alone, and all five cameras with depth.

    python benchmarks/env_throughput.py [--steps 300] [--tasks reach_target,sweep_to_dustpan_of_size]
"""

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

import llarva_gym
from llarva_gym.files import write_json_atomic

ALL_CAMERAS = ("front", "left_shoulder", "right_shoulder", "overhead", "wrist")
SETTINGS = {"front_rgb": {"cameras": ("front",)}, "5cams_rgb_depth": {"cameras": ALL_CAMERAS, "depth": True}}


def actions(space, count, seed=0):
    """Small random joint velocities: the arm moves, as it does under a policy."""
    rng = np.random.default_rng(seed)
    low, high = space.low, space.high
    middle = (low + high) / 2
    return (middle + (high - low) / 2 * 0.1 * rng.uniform(-1, 1, size=(count, *low.shape))).astype(np.float32)


def single_env(task, kwargs, steps):
    env = llarva_gym.RLBenchEnv(task, **kwargs)
    env.reset(seed=0)
    batch = actions(env.action_space, steps)
    for action in batch[:10]:   # warm-up: first render makes the GL context
        env.step(action)
    start = time.perf_counter()
    for action in batch:
        env.step(action)
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def vector_env(task, kwargs, steps, num_envs=2):
    envs = llarva_gym.make_vec(f"llarva/{task}", num_envs, max_episode_steps=10**6, **kwargs)
    envs.reset(seed=0)
    batch = actions(envs.single_action_space, steps * num_envs).reshape(steps, num_envs, -1)
    for action in batch[:10]:
        envs.step(action)
    start = time.perf_counter()
    for action in batch:
        envs.step(action)
    elapsed = time.perf_counter() - start
    envs.close()
    return steps * num_envs / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tasks", default=",".join(llarva_gym.TASKS))
    parser.add_argument("--out", default="benchmarks/results/env_throughput.json")
    args = parser.parse_args()

    rows = []
    cores = sorted(os.sched_getaffinity(0))
    for task in args.tasks.split(","):
        for setting, kwargs in SETTINGS.items():
            os.sched_setaffinity(0, {cores[0]})   # "one core": the single env gets one
            single = single_env(task, kwargs, args.steps)
            os.sched_setaffinity(0, set(cores))
            vector = vector_env(task, kwargs, args.steps // 2)
            rows.append({"task": task, "sensors": setting, "single_env_steps_per_s": round(single, 1),
                         "vector2_steps_per_s": round(vector, 1)})
            print(f"{task:28s} {setting:16s} single {single:7.1f} steps/s   2 async envs {vector:7.1f} steps/s", flush=True)

    print("\n| task | sensors | 1 env, 1 core (steps/s) | 2 async envs (steps/s) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['sensors']} | {row['single_env_steps_per_s']} | {row['vector2_steps_per_s']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpus": len(cores), "platform": platform.platform(),
                          "mujoco_gl": os.environ.get("MUJOCO_GL")},
              "image_size": [128, 128], "steps": args.steps, "rows": rows}
    write_json_atomic(out, report, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
