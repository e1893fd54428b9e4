"""Does a policy do better when it replans less often? `llarva eval` with each answer held R steps.

    python benchmarks/replan_every.py --task reach_target --checkpoint runs/reach/model --variation 0 \
        --visual-trace --render-quality high --episodes 100 --seed 1 --num-envs 20 --replan-every 1,2,4

A from-scratch reach_target policy aims better at its first step than later on (round 16: the
aimed depth along the camera's ray is off by a median 4 cm at step 0 and 6-8 cm from step 8 on).
Here each answer's action is executed for R control steps before the next is generated (the joint
history in the prompt still advances every step, so each prompt is the one `llarva eval` would
build), on the same episodes for every R: if fewer, older answers do better, committing to a plan
(LLARVA's "action of the next K steps", action chunks) is the thing to train. R=1 is `llarva eval`
itself, the baseline of the same run. Each R's episodes go to their own results file (resumable, as `llarva eval --results`);
prints a table and writes JSON (default benchmarks/results/replan_every_<task>.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from llarva_gym.evaluation import evaluate
from llarva_gym.files import write_json_atomic
from llarva_policy import LlarvaPolicy

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class HeldAnswers:
    """`policy`'s actions, each generated for an env every `replan_every` steps and held in between."""

    def __init__(self, policy: LlarvaPolicy, replan_every: int):
        if isinstance(replan_every, bool) or not isinstance(replan_every, int) or replan_every < 1:
            raise ValueError(f"replan_every: expected an int >= 1 (1: an answer every step), got {replan_every!r}")
        self.policy, self.replan_every = policy, replan_every
        self.held, self.age, self.last_info, self.answers = None, None, [], 0

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        # Every env's history advances by this step, answered or not.
        _, next_state = self.policy.build_prompts(observation, state, episode_start, deterministic)
        n = len(next_state)
        if self.held is None or len(self.held) != n:
            self.held, self.age = np.zeros((n, 8), dtype=np.float32), np.full(n, self.replan_every)
        starts = np.zeros(n, bool) if episode_start is None else np.asarray(episode_start, bool).reshape(n)
        self.age[starts] = self.replan_every
        due = np.flatnonzero(self.age >= self.replan_every)
        self.last_info = [{} for _ in range(n)]
        if len(due):
            observed = {key: np.asarray(value)[due] for key, value in observation.items()}
            actions, _ = self.policy.predict(observed, state=None if state is None else np.asarray(state)[due],
                                             episode_start=starts[due], deterministic=deterministic)
            self.held[due] = actions
            self.age[due] = 0
            for i, info in zip(due, self.policy.last_info):
                self.last_info[i] = info
            self.answers += len(due)
        self.age += 1
        return self.held.copy(), next_state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--replan-every", default="1,2,4", help="comma-separated R values; 1 is llarva eval")
    parser.add_argument("--episodes", type=int, default=25)
    parser.add_argument("--episode-length", type=int, default=None, help="steps per episode (default: the task's)")
    parser.add_argument("--seed", type=int, default=0, help="llarva eval's --seed: the same episodes for every R")
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--variation", type=int, default=None)
    parser.add_argument("--visual-trace", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the checkpoint answers with a visual trace (default: as it was trained)")
    parser.add_argument("--render-quality", default="fast", choices=("fast", "high"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", default=None, help="the JSON; each R's episodes beside it")
    args = parser.parse_args(argv)
    try:
        repeats = [int(r) for r in args.replan_every.split(",")]
    except ValueError:
        raise SystemExit(f"--replan-every: expected comma-separated ints such as 1,2,4, got {args.replan_every!r}")

    policy = LlarvaPolicy.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype, constrained=True,
                                          with_visual_trace=args.visual_trace)
    out = Path(args.out or RESULTS_DIR / f"replan_every_{args.task}.json")
    record = {"task": args.task, "checkpoint": str(args.checkpoint), "seed": args.seed, "variation": args.variation,
              "render_quality": args.render_quality, "episodes": args.episodes,
              "episode_length": args.episode_length, "runs": []}
    for repeat in repeats:
        held = HeldAnswers(policy, repeat)
        started = time.perf_counter()
        results = evaluate(held, args.task, episodes=args.episodes, episode_length=args.episode_length,
                           num_envs=args.num_envs, seed=args.seed,
                           results_path=out.with_name(f"{out.stem}_every{repeat}.json"),
                           render_quality=args.render_quality, variation=args.variation)
        summary = results["summary"]
        record["runs"].append({"replan_every": repeat, **summary, "answers": held.answers,
                               "seconds": round(time.perf_counter() - started, 1),
                               "succeeded": sorted(e["index"] for e in results["episodes"] if e["success"])})
        write_json_atomic(out, record)

    baseline = next((run for run in record["runs"] if run["replan_every"] == 1), None)
    print(f"{'replan every':>12} {'successes':>10} {'rate':>6} {'vs R=1':>7} {'mean steps':>10} {'answers':>8}")
    for run in record["runs"]:
        ratio = (f"{run['success_rate'] / baseline['success_rate']:.2f}"
                 if baseline and baseline["success_rate"] else "n/a")
        print(f"{run['replan_every']:>12} {run['successes']:>5}/{run['episodes']:<4} {run['success_rate']:>6.2f} "
              f"{ratio:>7} {run['mean_steps']:>10.1f} {run['answers']:>8}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
