"""A LeRobot-style rollout: `policy.reset()` per rollout, `policy.select_action(batch)` per step,
over a vector env, success read from `is_success` as LeRobot's evaluator does.

    python examples/lerobot_style_loop.py                      # a tiny random model, made in a temp dir
    python examples/lerobot_style_loop.py path/to/checkpoint --num-envs 4

`select_action` keeps the joint-position history itself (one row per env); `reset()` clears it.
As in LeRobot, a rollout runs until every env has finished its episode once; what an env does
after that (the vector env has already started its next episode) is ignored.
"""

import argparse
import tempfile

import numpy as np

import llarva_gym
from llarva_policy import LlarvaPolicy
from llarva_policy.model import make_random_llava


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="LLaVA checkpoint (default: tiny random model)")
    parser.add_argument("--task", default="reach_target")
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="episode length (default: 120, 3 for the random model)")
    args = parser.parse_args(argv)
    random_model = args.checkpoint is None
    checkpoint = make_random_llava(tempfile.mkdtemp(), size="tiny") if random_model else args.checkpoint

    policy = LlarvaPolicy.from_pretrained(checkpoint, on_parse_error="hold",
                                          max_new_tokens=16 if random_model else None)
    envs = llarva_gym.make_vec(f"llarva/{args.task}", args.num_envs,
                               max_episode_steps=args.steps or (3 if random_model else 120))

    policy.reset()
    observation, info = envs.reset(seed=0)
    done = np.zeros(args.num_envs, dtype=bool)
    success = np.zeros(args.num_envs, dtype=bool)
    while not done.all():
        action = policy.select_action(observation)                   # (num_envs, 8)
        observation, reward, terminated, truncated, info = envs.step(action)
        # Same-step autoreset: an env that just finished reports its last info under "final_info".
        finished = (terminated | truncated) & ~done
        if finished.any():
            success[finished] = info["final_info"]["is_success"][finished]
        done |= finished
    print(f"successes: {success.tolist()}  ({success.mean():.0%})")
    envs.close()


if __name__ == "__main__":
    main()
