"""A LLARVA policy in a plain Gymnasium loop.

    python examples/gym_loop.py                               # a tiny random model, made in a temp dir
    python examples/gym_loop.py path/to/checkpoint --steps 120 --task sweep_to_dustpan

A random model writes junk rather than actions; built with on_parse_error="hold", the policy then
holds still (zero joint velocities, gripper as it is) and reports the text in `policy.last_info`.
"""

import argparse
import tempfile

import gymnasium as gym

import llarva_gym  # noqa: F401  (registers the llarva/ env ids)
from llarva_policy import LlarvaPolicy
from llarva_policy.model import make_random_llava


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="LLaVA checkpoint (default: tiny random model)")
    parser.add_argument("--task", default="reach_target")
    parser.add_argument("--steps", type=int, default=None, help="episode length (default: 120, 5 for the random model)")
    args = parser.parse_args(argv)
    random_model = args.checkpoint is None
    checkpoint = make_random_llava(tempfile.mkdtemp(), size="tiny") if random_model else args.checkpoint
    steps = args.steps or (5 if random_model else 120)

    policy = LlarvaPolicy.from_pretrained(checkpoint, on_parse_error="hold",
                                          max_new_tokens=16 if random_model else None)
    env = gym.make(f"llarva/{args.task}", max_episode_steps=steps)

    obs, info = env.reset(seed=0)
    state, episode_start = None, True
    terminated = truncated = False
    while not (terminated or truncated):
        action, state = policy.predict(obs, state=state, episode_start=episode_start)
        obs, reward, terminated, truncated, info = env.step(action)
        episode_start = False
        print(f"action {action.round(3)}  parse error: {policy.last_info[0]['parse_error'] is not None}")
    print(f"{env.unwrapped.task_description!r}: success={info['success']}")
    env.close()


if __name__ == "__main__":
    main()
