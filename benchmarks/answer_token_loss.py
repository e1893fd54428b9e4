"""Which tokens of its answer a checkpoint cannot predict: its loss per kind of token, by distance to the goal.

    python benchmarks/answer_token_loss.py --task reach_target --checkpoint models/reach_target_variation0 \
        --sets demos=runs/dag/reach_target/data takeover=runs/dag/reach_target/takeover --episodes 40

`train-small` reports one loss, the mean over the answer's tokens. This splits it by what each token
writes: the visual trace's digits, and for each of the seven joint velocities its sign, its integer
digit and its first to fourth decimal (the gripper's number apart), and the rest (the fixed words,
brackets, commas, `</s>`). A kind near log(10) = 2.30 nats is a uniform guess over ten digits: the
model has learned nothing of it, and greedy decoding writes an arbitrary digit there. The samples
are the ones `annotate` makes from each demo folder (`record_demos`' layout; a takeover episode's
driven steps are history, not samples), every `--every`-th step of the first `--episodes`
episodes, each asked with its recorded image and tokenized as `llarva finetune` tokenizes it
(`tokenize_conversation`), binned by the tip's distance to the goal as `takeover_coverage.py` bins
them; beside it, how small the labels' joint velocities are there. The mean is unweighted
(train-small weights the trace's future points, `--goal-weight`). Prints a table and writes JSON
(default benchmarks/results/answer_token_loss_<task>.json).
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
from llarva_policy.finetune import IGNORE_INDEX, tokenize_conversation
from llarva_policy.model import load_llava

sys.path.insert(0, str(Path(__file__).resolve().parent))
from takeover_coverage import BINS, GOALS, bin_index, checkpoint_on_sets_parser, parse_sets  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The kinds in the order the table shows them ("other" last); what they are: codec.answer_character_kinds.
KINDS = codec.ANSWER_KINDS[1:] + codec.ANSWER_KINDS[:1]


def token_losses(model, processor, image, question: str, answer: str) -> list[tuple[str, float]]:
    """(kind, cross-entropy in nats) of every answer token, teacher-forced, in order; `</s>` is "other".
    A token spanning several kinds (", -") takes the first that is not "other"."""
    sample = tokenize_conversation(processor, image, question, answer)
    text = codec.build_conversation_text(question, answer)
    answer_start, _ = codec.answer_span(question, answer)
    # The offsets of the text as the processor expands it (one <image> per image feature), as
    # tokenize_conversation finds the answer: it ends the text, so it lies as far from the end.
    offsets = processor(images=image, text=text, return_offsets_mapping=True, return_tensors="pt")["offset_mapping"][0]
    expanded_answer_start = int(offsets[:, 1].max()) - (len(text) - answer_start)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=sample["input_ids"][None].to(device),
                       attention_mask=sample["attention_mask"][None].to(device),
                       pixel_values=sample["pixel_values"][None].to(device, model.dtype)).logits[0, :-1].float()
    targets = sample["labels"][1:].to(device)
    losses = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    kinds = codec.answer_character_kinds(answer)
    result = []
    for position in torch.nonzero(targets != IGNORE_INDEX).flatten().tolist():
        first, last = (int(x) - expanded_answer_start for x in offsets[position + 1])
        covered = [kinds[i] for i in range(max(first, 0), min(last, len(answer)))]
        result.append((next((k for k in covered if k != "other"), "other"), float(losses[position])))
    return result


def set_losses(model, processor, root, task: str, episodes: int, every: int, trace_points: int) -> dict:
    """Mean loss per kind and distance bin over the samples of one demo folder."""
    goal_of = GOALS[task]
    folders = episode_dirs(root, task)
    if not folders:
        raise FileNotFoundError(f"--sets: no {task} episodes under {root}; expected a record_demos folder "
                                f"(<root>/{task}/all_variations/episodes/episode<N>/)")
    collected = [{kind: [] for kind in KINDS} for _ in BINS]
    samples = [0] * len(BINS)
    labels = [[] for _ in BINS]      # the joint velocities the answers write
    for folder in folders[:episodes]:
        demo = load_demo(folder)
        for entry in episode_annotations(demo, "", visual_trace=True, trace_points=trace_points):
            t = entry["id"]
            if t % every:
                continue
            distance = float(np.linalg.norm(np.asarray(demo[t].gripper_pose[:3]) - goal_of(demo[t])))
            question, answer = entry["conversations"][0]["value"], entry["conversations"][1]["value"]
            b = bin_index(distance)
            samples[b] += 1
            labels[b].append(codec.parse_answer(answer, expect_trace=True).action[:codec.NUM_JOINTS])
            for kind, loss in token_losses(model, processor, demo[t].front_rgb, question, answer):
                collected[b][kind].append(loss)
    rows = []
    for (low, high), count, losses, velocities in zip(BINS, samples, collected, labels):
        every_token = [x for kind in KINDS for x in losses[kind]]
        speeds = np.abs(np.asarray(velocities, dtype=np.float64))
        rows.append({"to_goal_m": [low, high], "samples": count,
                     # how much of each velocity the first decimal alone can say
                     "label_median_abs": np.round(np.median(speeds, axis=0), 3).tolist() if count else None,
                     "label_share_under_0.1": round(float((speeds < 0.1).mean()), 3) if count else None,
                     "answer_loss": round(float(np.mean(every_token)), 4) if every_token else None,
                     "kinds": {kind: {"tokens": len(losses[kind]),
                                      "loss": round(float(np.mean(losses[kind])), 4) if losses[kind] else None}
                               for kind in KINDS}})
    return {"root": str(root), "episodes": min(episodes, len(folders)), "bins": rows}


def main(argv=None) -> dict:
    parser = checkpoint_on_sets_parser(__doc__.split("\n")[0], episodes=40)
    args = parser.parse_args(argv)

    sets = parse_sets(args.sets)     # every folder checked
    loaded = load_llava(args.checkpoint, device=args.device, dtype=torch.float32)
    loaded.model.eval()
    record = {"task": args.task, "checkpoint": str(args.checkpoint), "episodes": args.episodes, "every": args.every,
              "uniform_digit_loss": round(float(np.log(10)), 4), "sets": {}}
    out = Path(args.out or RESULTS_DIR / f"answer_token_loss_{args.task}.json")
    for name, root in sets.items():
        record["sets"][name] = set_losses(loaded.model, loaded.processor, root, args.task, args.episodes, args.every,
                                            args.trace_points)
        write_json_atomic(out, record)
    shown = ("trace_digit", "sign", "integer_digit", "decimal1", "decimal2", "decimal3", "decimal4", "other")
    print(f"{'set':12} {'to goal (m)':12} {'samples':>7} {'<0.1':>5} {'all':>6} "
          + " ".join(f"{k[:9]:>9}" for k in shown))
    for name, result in record["sets"].items():
        for row in result["bins"]:
            low, high = row["to_goal_m"]
            span = f"{low:.2f}-{'inf' if high is None else f'{high:.2f}'}"
            cells = [row["kinds"][k]["loss"] for k in shown]
            under = row["label_share_under_0.1"]
            print(f"{name:12} {span:12} {row['samples']:>7} {'-' if under is None else f'{under:.2f}':>5} "
                  f"{row['answer_loss'] or float('nan'):>6.3f} "
                  + " ".join(f"{'-' if c is None else f'{c:.3f}':>9}" for c in cells))
    print(f"(mean cross-entropy per answer token, nats; a uniform digit is {np.log(10):.3f}; <0.1: the share of the "
          f"labels' joint velocities under 0.1 rad/s, which the first decimal alone does not resolve)")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
