"""A checkpoint's visual trace and action on the demos' own states: its training scenes against new ones.

    python benchmarks/trace_on_demo_states.py --checkpoint models/reach_target_variation0 \
        --sets training_scenes=runs/dag/reach_target/data held_out_scenes=runs/heldout --episodes 12

Every `--every`-th step of the first `--episodes` episodes of each demo folder (`record_demos`'
layout) is asked as the annotations ask it (the demo's own image and joint history), greedy:
1. free, constrained as `llarva eval` decodes: where the trace it writes ends, against the end of
   the demo's own trace (`end_effector_trace`, what the annotations teach), in pixels of the front
   image; and the action it writes after that trace;
2. with the demo's true trace forced as the answer's beginning, the action it writes after it.
Each action's seven joint velocities are compared with the expert's (the label): the ratio of
their norms and their cosine. Binned by the tip's distance to the goal as `takeover_coverage.py`
bins them. A folder recorded with the training's demo seed holds scenes the model was trained on;
one recorded with another seed (the same variation, rendering and DART noise) holds new ones: the
gap between the two is what the model memorised rather than read from the image, and (2) against
(1) says whether the action depends on the trace being right. Prints a table and writes JSON
(default benchmarks/results/trace_on_demo_states_<task>.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from llarva_gym.demos import episode_dirs, load_demo
from llarva_gym.files import write_json_atomic
from llarva_policy import codec
from llarva_policy.annotations import episode_annotations
from llarva_policy.generation import generate_text
from llarva_policy.model import load_llava

sys.path.insert(0, str(Path(__file__).resolve().parent))
from first_step_trace import trace_points_of  # noqa: E402
from takeover_coverage import BINS, GOALS, bin_index, checkpoint_on_sets_parser, parse_sets  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCH = 16


def trace_prefix(answer: str) -> str:
    """The answer up to `The next action step:`, the trace included. Not further: the tokenizer writes
    " [-" as one token, so a prefix ending in " [" would keep the first velocity from being negative."""
    return answer[:answer.index(codec.ANSWER_PREFIX) + len(codec.TRAINING.action_prefix.rstrip())]


def continued(prefix: str, generated: str) -> str:
    """The answer a forced `prefix` and the text generated after it make (the decoder drops the space
    the first generated token carries)."""
    return f"{prefix} {generated.strip()}"


def against_label(action: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """(speed ratio, cosine) of an action's joint velocities against the label's."""
    a, b = action[:codec.NUM_JOINTS], label[:codec.NUM_JOINTS]
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.linalg.norm(a) / max(np.linalg.norm(b), 1e-9)), float(a @ b / norms) if norms > 0 else 0.0


def greedy(loaded, prompts: list[str], images: list[np.ndarray], constrained: bool) -> list[str]:
    inputs = loaded.processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return generate_text(loaded, inputs, max_new_tokens=128, constrained=constrained, visual_trace=constrained)


def set_measures(loaded, root: Path, task: str, episodes: int, every: int, points: int) -> dict:
    """Trace end errors and both actions' fit at every `every`-th step of one folder's first episodes, by bin."""
    folders = episode_dirs(root, task)
    if not folders:
        raise FileNotFoundError(f"--sets: no {task} episodes under {root}; expected a record_demos folder "
                                f"(<root>/{task}/all_variations/episodes/episode<N>/)")
    samples = []     # (bin, question, answer, image)
    for folder in folders[:episodes]:
        demo = load_demo(folder)
        for entry in episode_annotations(demo, demo.variation_descriptions[0], visual_trace=True,
                                         trace_points=points):
            t = int(entry["id"])
            if t % every:
                continue
            distance = float(np.linalg.norm(np.asarray(demo[t].gripper_pose[:3]) - GOALS[task](demo[t])))
            samples.append((bin_index(distance), *(turn["value"] for turn in entry["conversations"]),
                            demo[t].front_rgb))
    found = [{"trace_px": [], "own": [], "true": [], "unparsed": 0} for _ in BINS]
    for start in range(0, len(samples), BATCH):
        chunk = samples[start:start + BATCH]
        prompts = [codec.build_prompt(question) for _, question, _, _ in chunk]
        images = [image for *_, image in chunk]
        free = greedy(loaded, prompts, images, constrained=True)
        forced = [trace_prefix(answer) for _, _, answer, _ in chunk]
        after_true = greedy(loaded, [p + " " + f for p, f in zip(prompts, forced)], images, constrained=False)
        for (b, _, answer, _), own_text, prefix, rest in zip(chunk, free, forced, after_true):
            label = codec.parse_answer(answer, expect_trace=True)
            own = codec.parse_answer(own_text.strip(), expect_trace=True)    # constrained: always well formed
            found[b]["trace_px"].append(float(np.linalg.norm(label.trace[-1] - own.trace[-1])))
            found[b]["own"].append(against_label(own.action, label.action))
            try:
                found[b]["true"].append(against_label(codec.parse_answer(continued(prefix, rest), expect_trace=True).action,
                                                      label.action))
            except codec.AnswerParseError:      # unconstrained after the forced trace: counted, not guessed
                found[b]["unparsed"] += 1

    def fit(pairs):
        if not pairs:
            return None
        ratios, cosines = np.asarray(pairs).T
        return {"median_speed_ratio": round(float(np.median(ratios)), 3), "median_cosine": round(float(np.median(cosines)), 3)}

    rows = []
    for span, f in zip(BINS, found):
        errors = np.asarray(f["trace_px"])
        rows.append({"to_goal_m": span, "samples": len(errors),
                     "median_end_error_px": round(float(np.median(errors)), 2) if len(errors) else None,
                     "share_within_1_px": round(float(np.mean(errors <= 1.0)), 3) if len(errors) else None,
                     "share_over_10_px": round(float(np.mean(errors > 10.0)), 3) if len(errors) else None,
                     "action_after_own_trace": fit(f["own"]), "action_after_true_trace": fit(f["true"]),
                     "unparsed_after_true_trace": f["unparsed"]})
    return {"root": str(root), "episodes": min(episodes, len(folders)), "bins": rows}


def main(argv=None) -> dict:
    parser = checkpoint_on_sets_parser(__doc__.split("\n")[0], episodes=12)
    args = parser.parse_args(argv)

    sets = parse_sets(args.sets)     # every folder checked
    checkpoint = Path(args.checkpoint)
    points = trace_points_of(checkpoint, args.trace_points)
    loaded = load_llava(checkpoint, device=args.device, dtype=torch.float32)
    loaded.model.eval()
    loaded.tokenizer.padding_side = "left"      # generation continues each row at its end
    out = Path(args.out or RESULTS_DIR / f"trace_on_demo_states_{args.task}.json")
    record = {"task": args.task, "checkpoint": str(checkpoint), "episodes": args.episodes, "every": args.every,
              "trace_points": points, "decoding": "greedy; free: constrained; after the true trace: unconstrained",
              "sets": {}}
    for name, root in sets.items():
        record["sets"][name] = set_measures(loaded, root, args.task, args.episodes, args.every, points)
        write_json_atomic(out, record)
    print(f"{'set':16} {'to goal (m)':12} {'samples':>7} {'trace px':>8} {'<=1 px':>6} "
          f"{'own trace: speed, cos':>22} {'true trace: speed, cos':>23}")
    for name, result in record["sets"].items():
        for row in result["bins"]:
            if not row["samples"]:
                continue
            low, high = row["to_goal_m"]
            span = f"{low:.2f}-{'inf' if high is None else f'{high:.2f}'}"
            own, true = row["action_after_own_trace"], row["action_after_true_trace"] or {}
            print(f"{name:16} {span:12} {row['samples']:>7} {row['median_end_error_px']:>8} "
                  f"{row['share_within_1_px']:>6} {own['median_speed_ratio']:>13}, {own['median_cosine']:>6} "
                  f"{true.get('median_speed_ratio', '-'):>14}, {true.get('median_cosine', '-'):>6}")
    print(f"(trace px: the end of the policy's trace against the demo's own, px of the front image; speed, cos: "
          f"the action's joint velocities against the expert's, medians)\nwrote {out}")
    return record


if __name__ == "__main__":
    main()
