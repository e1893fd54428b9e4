"""Scripted-expert success over seeded episodes, every variation covered (episode i runs variation
i mod count). Issue target: at least 48 of 50 per task.

    python benchmarks/expert_success.py [--episodes 50] [--tasks reach_target,sweep_to_dustpan_of_size]
"""

import argparse
import time
from pathlib import Path

import gymnasium as gym
from tqdm import tqdm

import llarva_gym
from llarva_gym import ScriptedExpert
from llarva_gym.files import write_json_atomic


def run_task(task, episodes, seed):
    env = gym.make(f"llarva/{task}")
    expert = ScriptedExpert(env)
    count = llarva_gym.TASKS[task]
    successes, steps, start = 0, 0, time.perf_counter()
    failed = []
    for episode in tqdm(range(episodes), desc=task, leave=False):
        obs, info = env.reset(seed=seed + episode, options={"variation": episode % count})
        for _ in range(env.spec.max_episode_steps):
            obs, reward, terminated, truncated, info = env.step(expert.predict(obs)[0])
            steps += 1
            if terminated or truncated:
                break
        successes += bool(info["success"])
        if not info["success"]:
            failed.append({"seed": seed + episode, "variation": episode % count})
    env.close()
    elapsed = time.perf_counter() - start
    return {"task": task, "episodes": episodes, "successes": successes, "variations": count,
            "failed": failed, "steps_per_s_with_expert": round(steps / elapsed, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--tasks", default=",".join(llarva_gym.TASKS))
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/expert_success.json")
    args = parser.parse_args()
    rows = [run_task(task, args.episodes, args.seed) for task in args.tasks.split(",")]
    print("\n| task | variations | expert successes | steps/s (with expert planning) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['variations']} | {row['successes']}/{row['episodes']} | {row['steps_per_s_with_expert']} |")
    out = Path(args.out)
    write_json_atomic(out, {"seed": args.seed, "rows": rows}, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
