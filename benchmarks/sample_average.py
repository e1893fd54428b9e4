"""Does averaging several sampled answers act better than the greedy one? A decoding probe.

    python benchmarks/sample_average.py --checkpoint models/reach_target_variation0 --task reach_target \
        --variation 0 --seed 4 --episodes 25 --samples 4 --baseline RESULTS.json

Greedy decoding writes each joint velocity's most likely digits; near reach_target's target the
model is unsure of the sign and first decimal (examples/train_small_log.md, "Which part of the
answer is not fitted"), and the most likely digits of a small velocity are often `0.0`. Here every
step samples `--samples` constrained answers per env at `--temperature`, parses each with the codec
`predict` uses, and acts on the mean of their actions (the first sample's trace is kept for the
video): the action is then the model's expected command rather than its mode, with the answer's
grammar unchanged. `llarva eval`'s episodes (same seeds and rendering), so `--baseline` (a greedy
`llarva eval` results file of the same episodes) is compared episode by episode. A probe, not a
policy option: prints a table and writes JSON (default benchmarks/results/sample_average_<task>.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from llarva_gym.evaluation import evaluate
from llarva_gym.files import write_json_atomic
from llarva_policy.codec import format_answer, parse_answer
from llarva_policy.generation import ActionLogitsProcessor, action_grammar_for
from llarva_policy.policy import LlarvaPolicy

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class SampleToken(LogitsProcessor):
    """Draws the next token from the (already grammar-masked) scores and leaves only it allowed, so
    that `generate`'s greedy step takes the draw; seeded, so a run repeats."""

    def __init__(self, temperature: float, generator: torch.Generator):
        self.temperature, self.generator = temperature, generator

    def __call__(self, input_ids, scores):
        probabilities = torch.softmax(scores.float() / self.temperature, dim=-1)
        drawn = torch.multinomial(probabilities, 1, generator=self.generator)
        only = torch.full_like(scores, -float("inf"))
        return only.scatter(1, drawn, 0.0)


class SampleAveragePolicy(LlarvaPolicy):
    """`LlarvaPolicy` whose answer per env is the mean action of `samples` sampled answers."""

    def __init__(self, *args, samples: int = 4, temperature: float = 1.0, sample_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.samples, self.temperature = samples, temperature
        self.generator = torch.Generator().manual_seed(sample_seed)

    def _generate(self, images, prompts):
        loaded, k = self.loaded, self.samples
        inputs = loaded.processor(images=list(np.repeat(images, k, axis=0)), text=[p for p in prompts for _ in range(k)],
                                  padding=True, return_tensors="pt").to(loaded.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        grammar = action_grammar_for(loaded, self.template, visual_trace=self.with_visual_trace)
        processors = LogitsProcessorList([
            ActionLogitsProcessor(grammar, inputs["input_ids"].shape[1], self.max_new_tokens),
            SampleToken(self.temperature, self.generator)])
        output = loaded.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                       logits_processor=processors, pad_token_id=loaded.tokenizer.pad_token_id,
                                       eos_token_id=loaded.tokenizer.eos_token_id)
        texts = loaded.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        self.last_samples = texts     # env i's are texts[i * samples:(i + 1) * samples]
        answers = []
        for i in range(len(prompts)):
            parsed = [parse_answer(t, expect_trace=self.with_visual_trace, template=self.template)
                      for t in texts[i * k:(i + 1) * k]]
            action = np.mean([p.action for p in parsed], axis=0)
            answers.append(format_answer(action, parsed[0].trace, template=self.template))
        return answers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--task", default="reach_target")
    parser.add_argument("--variation", type=int, default=0)
    parser.add_argument("--render-quality", default="high", choices=("fast", "high"))
    parser.add_argument("--seed", type=int, default=4, help="evaluation seed (llarva eval's --seed)")
    parser.add_argument("--episodes", type=int, default=25)
    parser.add_argument("--num-envs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--baseline", default=None, help="a greedy `llarva eval` results file of the same episodes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.samples < 1 or not args.temperature > 0:
        parser.error("--samples: expected an int >= 1; --temperature: expected a number > 0")

    out = Path(args.out or RESULTS_DIR / f"sample_average_{args.task}.json")
    loaded = LlarvaPolicy.from_pretrained(args.checkpoint, device="cpu").loaded
    policy = SampleAveragePolicy(loaded, with_visual_trace=True, constrained=True, samples=args.samples,
                                 temperature=args.temperature, name=f"sample_average:{Path(args.checkpoint).name}")
    results = evaluate(policy, args.task, episodes=args.episodes, num_envs=args.num_envs, seed=args.seed,
                       render_quality=args.render_quality, variation=args.variation,
                       results_path=out.with_name(out.stem + "_episodes.json"))
    ours = {e["index"]: bool(e["success"]) for e in results["episodes"]}
    report = {"options": vars(args), "successes": sum(ours.values()), "episodes": len(ours),
              "mean_steps": float(np.mean([e["steps"] for e in results["episodes"]]))}
    print(f"{'decoding':<28} {'successes':>10} {'mean steps':>11}")
    print(f"{f'mean of {args.samples} samples, T={args.temperature:g}':<28} {report['successes']:>7}/{len(ours):<2} "
          f"{report['mean_steps']:>11.1f}")
    if args.baseline:
        greedy_episodes = [e for e in json.loads(Path(args.baseline).read_text())["episodes"] if e["index"] in ours]
        greedy = {e["index"]: bool(e["success"]) for e in greedy_episodes}
        report["greedy"] = {"file": args.baseline, "successes": sum(greedy.values()), "episodes": len(greedy),
                            "mean_steps": float(np.mean([e["steps"] for e in greedy_episodes])),
                            "gained": sorted(e for e in ours if ours[e] and not greedy.get(e)),
                            "lost": sorted(e for e in ours if greedy.get(e) and not ours[e])}
        g = report["greedy"]
        print(f"{'greedy (baseline file)':<28} {g['successes']:>7}/{g['episodes']:<2} {g['mean_steps']:>11.1f}")
        print(f"gained: {g['gained']}  lost: {g['lost']}")
    write_json_atomic(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
