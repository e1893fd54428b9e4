"""Stable-Baselines3's evaluate_policy with a LLARVA policy.

    python examples/sb3_evaluate_policy.py                    # a tiny random model, made in a temp dir
    python examples/sb3_evaluate_policy.py path/to/checkpoint --episodes 10

SB3's vector envs cannot hold a Text space, so `EncodeInstruction` turns the instruction into a
zero-padded byte array; `LlarvaPolicy.predict` reads either form. SB3 passes the policy's `state`
(the joint-position history) back in and flags episode starts, which clear it.
"""

import argparse
import tempfile

import gymnasium as gym
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

import llarva_gym  # noqa: F401  (registers the llarva/ env ids)
from llarva_gym import EncodeInstruction
from llarva_policy import LlarvaPolicy
from llarva_policy.model import make_random_llava


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="LLaVA checkpoint (default: tiny random model)")
    parser.add_argument("--task", default="reach_target")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="episode length (default: 120, 3 for the random model)")
    args = parser.parse_args(argv)
    random_model = args.checkpoint is None
    checkpoint = make_random_llava(tempfile.mkdtemp(), size="tiny") if random_model else args.checkpoint

    policy = LlarvaPolicy.from_pretrained(checkpoint, on_parse_error="hold",
                                          max_new_tokens=16 if random_model else None)
    env = Monitor(EncodeInstruction(gym.make(f"llarva/{args.task}",
                                             max_episode_steps=args.steps or (3 if random_model else 120))))
    # Reward is 1.0 on the step that succeeds, so the mean episode reward is the success rate.
    mean_reward, std_reward = evaluate_policy(policy, env, n_eval_episodes=args.episodes)
    print(f"success rate over {args.episodes} episodes: {mean_reward:.2f} (std {std_reward:.2f})")
    env.close()


if __name__ == "__main__":
    main()
