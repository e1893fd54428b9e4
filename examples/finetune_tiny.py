"""Fine-tune a LLARVA policy end to end on CPU, with a tiny random LLaVA, in about a minute.

    demos (scripted expert) -> annotations (LLARVA's JSON) -> LoRA fine-tuning -> merge -> LlarvaPolicy

The same calls with a real LLaVA-1.5-7B checkpoint, hundreds of demos and a GPU are the real
recipe (or the command line: `llarva demos`, `llarva annotate`, `llarva finetune`, `llarva
merge-lora`, `llarva eval`). A tiny model trained for a few steps does not write valid actions
yet: the policy is built with on_parse_error="hold", so it holds still and says why.

    python examples/finetune_tiny.py [--out FOLDER] [--episodes 2] [--steps 30]
"""

import argparse
import tempfile
from pathlib import Path

import gymnasium as gym

import llarva_gym  # noqa: F401  (registers the llarva/ environments)
from llarva_gym.demos import record_demos
from llarva_policy.annotations import annotate
from llarva_policy.finetune import finetune, merge_lora
from llarva_policy.model import make_random_llava
from llarva_policy.policy import LlarvaPolicy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="a new folder for everything (default: a temporary one)")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of fine-tuning")
    args = parser.parse_args()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="llarva-finetune-tiny-"))
    print(f"working in {work}")

    # 1. Demos in RLBench's layout, recorded by the scripted expert.
    summary = record_demos("reach_target", args.episodes, work / "demos", progress=False)
    task = summary["task"]

    # 2. LLARVA's instruction-tuning JSON: one question/answer per step, image paths relative to the demos.
    count = annotate(work / "demos", work / "train.json", task, progress=False)
    print(f"{summary['episodes']} demos -> {count} training samples")

    # 3. LoRA on a tiny random LLaVA (a real run starts from a LLaVA-1.5 checkpoint folder instead).
    base = make_random_llava(work / "base", size="tiny")
    finetune(model=str(base), data=str(work / "train.json"), images=str(work / "demos"), output=str(work / "lora"),
             max_steps=args.steps, batch_size=8, lora_r=16, lora_alpha=32, lr=2e-3, projector_lr=2e-3,
             save_steps=max(args.steps // 2, 1))

    # 4. Fold the adapter into the base: a plain transformers checkpoint.
    merged = merge_lora(work / "lora", work / "merged")
    print(f"merged checkpoint: {merged}")

    # 5. The policy, in a Gymnasium loop.
    policy = LlarvaPolicy.from_pretrained(merged, device="cpu", on_parse_error="hold", max_new_tokens=48)
    env = gym.make("llarva/reach_target")
    observation, info = env.reset(seed=0)
    state = None
    for step in range(3):
        action, state = policy.predict(observation, state=state, episode_start=[step == 0])
        observation, reward, terminated, truncated, info = env.step(action)
        answer = policy.last_info[0]
        print(f"step {step}: generated {answer['text'][:60]!r}... "
              f"{'parse error, holding still' if answer['parse_error'] else 'action ' + str(action.round(3))}")
    env.close()


if __name__ == "__main__":
    main()
