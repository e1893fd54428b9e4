"""The `llarva` command. Each subcommand imports only what it needs, so `llarva demos` and
`llarva eval --policy expert` never load torch."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

COMMANDS = {
    "demos": "record scripted-expert demos in RLBench's on-disk layout",
    "annotate": "turn demos into LLARVA's instruction-tuning JSON",
    "finetune": "LoRA instruction tuning of a LLaVA checkpoint (transformers Trainer, DeepSpeed)",
    "merge-lora": "merge a LoRA adapter into its base model and save a full checkpoint",
    "eval": "evaluate a policy on an embedded (or real RLBench) task",
    "quickstart": "the main job on the embedded simulator: the scripted expert, then the shipped learned policy, "
                  "success rates and rollout videos",
    "train-small": "demos, annotations, a small LLaVA trained from scratch, evaluation: the whole pipeline",
}

# The learned policy the quickstart shows: a train-small model trained from random weights on 1,500
# demos of both variations (models/README.md says how; benchmarks/results/train_small/*round9* how it did).
LEARNED_MODEL = Path(__file__).resolve().parent.parent / "models" / "sweep_to_dustpan_of_size"
LEARNED_TASK, LEARNED_VARIATION = "sweep_to_dustpan_of_size", None    # None: drawn per episode


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"llarva {command}", description=COMMANDS[command])
    if command == "demos":
        p.add_argument("--task", required=True, help="RLBench task name or alias, comma separated for several")
        p.add_argument("--episodes", type=int, required=True, help="successful episodes per task")
        p.add_argument("--out", required=True, help="dataset root (RLBench layout)")
        p.add_argument("--image-size", type=int, default=128)
        p.add_argument("--cameras", type=_csv, default=("front",), help="e.g. front,wrist")
        p.add_argument("--depth", action="store_true", help="also write depth images")
        p.add_argument("--variation", type=int, default=None, help="one variation (default: all, drawn per episode)")
        p.add_argument("--processes", type=int, default=1)
        p.add_argument("--seed", type=int, default=0, help="episode i uses seed (seed, i): reproducible")
        p.add_argument("--render-quality", default="fast", choices=("fast", "high"),
                       help="fast: no shadows (default); high: shadows and multisampling, much slower on CPU")
        p.add_argument("--action-noise", type=float, default=0.0,
                       help="DART noise injection: sigma of the noise on the executed joint velocities, as a "
                            "fraction of the expert's fastest joint speed (labels stay the expert's)")
        p.add_argument("--driver", default=None, metavar="CHECKPOINT",
                       help="expert takeover: this LLARVA checkpoint drives the first steps of each episode "
                            "(1..--driver-steps), then the expert finishes from where it left the arm")
        p.add_argument("--driver-steps", type=int, default=30, help="the most steps the --driver takes")
        p.add_argument("--driver-num-envs", type=int, default=None, metavar="N",
                       help="drive N episodes at a time in this process, one batched answer per step (for a "
                            "--driver on a GPU); the recording processes replay the driven steps (default: "
                            "each recording process runs the driver itself)")
        p.add_argument("--driver-visual-trace", action=argparse.BooleanOptionalAction, default=None,
                       help="whether the --driver answers with a visual trace (default: as its "
                            "llarva_train_small.json says it was trained, else without)")
    elif command == "annotate":
        p.add_argument("--data", required=True, help="dataset root holding <task>/all_variations/episodes")
        p.add_argument("--out", required=True, help="annotation JSON to write")
        p.add_argument("--task", required=True)
        p.add_argument("--visual-trace", action="store_true")
        p.add_argument("--trace-points", type=int, default=30, help="points in each visual trace")
        p.add_argument("--history-noise", type=float, default=0.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--template", default="training", help="training | released_inference")
        p.add_argument("--processes", type=int, default=1, help="worker processes annotating blocks of episodes")
    elif command == "finetune":
        p.add_argument("--model", required=True, help="LLaVA checkpoint (transformers or original layout)")
        p.add_argument("--data", required=True, help="annotation JSON")
        p.add_argument("--images", required=True, help="folder the annotation image paths are relative to")
        p.add_argument("--output", required=True)
        p.add_argument("--vision-tower", default=None, help="CLIP folder for original-layout checkpoints")
        p.add_argument("--lora-r", type=int, default=128)
        p.add_argument("--lora-alpha", type=int, default=256)
        p.add_argument("--lora-dropout", type=float, default=0.05)
        p.add_argument("--full", action="store_true", help="tune every language-model weight instead of LoRA")
        p.add_argument("--lr", type=float, default=2e-4)
        p.add_argument("--projector-lr", type=float, default=2e-5)
        p.add_argument("--epochs", type=float, default=1.0)
        p.add_argument("--max-steps", type=int, default=-1)
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--grad-accum", type=int, default=1)
        p.add_argument("--max-length", type=int, default=2048)
        p.add_argument("--deepspeed", default=None, help="zero2 | zero3 | path to a DeepSpeed JSON")
        p.add_argument("--bf16", action="store_true")
        p.add_argument("--gradient-checkpointing", action="store_true")
        p.add_argument("--save-steps", type=int, default=500)
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
        p.add_argument("--seed", type=int, default=0)
    elif command == "merge-lora":
        p.add_argument("--adapter", required=True)
        p.add_argument("--output", required=True)
    elif command in ("eval", "quickstart"):
        default_task = "sweep_to_dustpan" if command == "quickstart" else None
        p.add_argument("--task", required=default_task is None, default=default_task)
        p.add_argument("--checkpoint", default=None, help="LlarvaPolicy checkpoint; omit for --policy expert")
        p.add_argument("--policy", default="llarva" if command == "eval" else "expert", choices=("llarva", "expert"))
        p.add_argument("--episodes", type=int, default=10 if command == "eval" else 4)
        p.add_argument("--episode-length", type=int, default=None, help="default: the task's limit (120 for most, as LLARVA)")
        p.add_argument("--num-envs", type=int, default=1)
        p.add_argument("--demos", default=None, help="start episodes from these stored demos (dataset root)")
        p.add_argument("--video", default=None if command == "eval" else "outputs/quickstart/videos")
        p.add_argument("--results", default=None if command == "eval" else "outputs/quickstart/results.json")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default=None)
        p.add_argument("--dtype", default=None)
        p.add_argument("--visual-trace", action=argparse.BooleanOptionalAction, default=None,
                       help="whether the checkpoint answers with a visual trace first (default: as its "
                            "llarva_train_small.json says; without one, no)")
        p.add_argument("--template", default="training")
        p.add_argument("--constrained", action="store_true",
                       help="constrain decoding to the answer format, so every answer parses")
        if command == "eval":
            p.add_argument("--on-parse-error", default="raise", metavar="{raise,hold}",
                           help="an answer that does not parse: stop the evaluation (raise; the finished "
                                "episodes stay in --results) or hold the arm still for that step and go on "
                                "(hold; counted in each episode's parse_errors)")
        p.add_argument("--render-quality", default="fast", choices=("fast", "high"),
                       help="the env's rendering; use the one the policy's training demos were recorded with")
        p.add_argument("--variation", type=int, default=None,
                       help="every episode of this one variation (default: drawn per episode)")
        if command == "quickstart":
            p.add_argument("--learned-episodes", type=int, default=2,
                           help=f"episodes of the shipped learned policy on {LEARNED_TASK} (both variations), "
                                f"after the expert's (0: skip)")
    elif command == "train-small":
        p.add_argument("--task", required=True, help="RLBench task name or alias")
        p.add_argument("--out", required=True, help="run folder: demos, annotations, model/, eval/, summary.json")
        p.add_argument("--demos", type=int, default=100, help="scripted-expert demos to record and train on")
        p.add_argument("--size", default="small",
                       choices=("small", "small-patch8", "small-swin", "small-swin-256", "small-focal", "medium",
                                "toy"),
                       help="model size (small-patch8: 8 px patches, 256 image tokens; small-swin: a Swin vision "
                            "tower, 4 px patches merged to 64 image tokens; small-swin-256: the same Swin stopped "
                            "after two stages, 256 image tokens; small-focal: a FocalNet tower, convolutions in the "
                            "Swin's place, 64 image tokens; toy: tests only)")
        p.add_argument("--demo-seed", type=int, default=0, help="seed of the demos (llarva demos --seed)")
        p.add_argument("--seed", type=int, default=0, help="annotation order, initialisation and data order")
        p.add_argument("--variation", type=int, default=None,
                       help="demos and evaluation episodes of this one variation only (a diagnostic)")
        p.add_argument("--processes", type=int, default=1,
                       help="processes recording and annotating demos (and, when 8 or more, tokenizing them)")
        p.add_argument("--train-seconds", type=_seconds_or_fit, default=300.0,
                       help="wall-clock budget of the training (over all the runs that continue it), or "
                            "'fit': what --run-seconds leaves, finished in this run")
        p.add_argument("--run-seconds", type=float, default=None,
                       help="budget of this run: training stops early enough to leave --eval-reserve-seconds "
                            "(unfinished, it continues when rerun into the same --out)")
        p.add_argument("--eval-reserve-seconds", type=float, default=150.0)
        p.add_argument("--max-steps", type=int, default=None,
                       help="training steps (default: as many as fit in the budget, recorded in summary.json)")
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--warmup-steps", type=int, default=200)
        p.add_argument("--weight-decay", type=float, default=0.01)
        p.add_argument("--checkpoint-seconds", type=float, default=60.0)
        p.add_argument("--eval-episodes", type=int, default=25, help="0: no evaluation (run llarva eval later)")
        p.add_argument("--eval-num-envs", type=int, default=8)
        p.add_argument("--eval-seed", type=int, default=0, help="llarva eval --seed: the evaluation episodes")
        p.add_argument("--eval-episode-length", type=int, default=None, help="default: the task's limit")
        p.add_argument("--no-expert-baseline", dest="expert_baseline", action="store_false",
                       help="skip evaluating the scripted expert on the same episodes")
        p.add_argument("--visual-trace", action="store_true",
                       help="answers hold LLARVA's visual trace (the end effector's future path) before the action")
        p.add_argument("--trace-points", type=int, default=10, help="points in each visual trace")
        p.add_argument("--history-noise", type=float, default=0.0,
                       help="sigma (rad) of the noise on the joint history in the training text (LLARVA: 0.01)")
        p.add_argument("--goal-weight", type=float, default=1.0,
                       help="loss weight of the visual trace's goal (--goal-points), with --visual-trace")
        p.add_argument("--goal-points", default="last", choices=("last", "future"),
                       help="the points --goal-weight weights: the last, or all but the first (the ones "
                            "teacher forcing does not give away: see train_small.goal_span)")
        p.add_argument("--answer-weights", type=_kind_weights, default=None, metavar="KIND=W,...",
                       help="loss weights of the answer tokens by what they write, the others 1 (e.g. "
                            "sign=3,decimal1=3,decimal3=0.1,decimal4=0.1); kinds: "
                            "other, trace_digit, sign, integer_digit, decimal1-4, gripper")
        p.add_argument("--action-noise", type=float, default=0.0,
                       help="DART noise injection in the demos (see llarva demos --action-noise)")
        p.add_argument("--early-steps", type=int, default=5, help="see --early-weight")
        p.add_argument("--early-weight", type=int, default=1,
                       help="draw the first --early-steps steps of every episode this many times per epoch")
        p.add_argument("--variation-weights", type=_positive_ints, default=None, metavar="W0,W1,...",
                       help="draw the samples of variation v W_v times per epoch, one weight per variation "
                            "(e.g. 3,1): where only word and image together decide the target "
                            "(sweep_to_dustpan_of_size), uneven draws let the image alone predict it, "
                            "so that a model trained from scratch starts to learn")
        p.add_argument("--driver", default=None, metavar="MODEL", action="append",
                       help="a DAgger round: an earlier round's model folder drives the first steps of "
                            "--takeover-demos more episodes, the expert finishes them; train on both sets. "
                            "Repeat it to aggregate rounds, oldest first (each drives --takeover-demos); "
                            "an earlier one may be given by its driven steps instead (a checkpoint's "
                            "takeover*_driven_starts.npz), replayed without its model")
        p.add_argument("--takeover-demos", type=int, default=0, help="expert-takeover demos driven by each --driver")
        p.add_argument("--takeover-steps", type=int, default=30, help="the most steps --driver takes in each")
        p.add_argument("--takeover-weight", type=int, default=1,
                       help="draw every takeover sample this many times per epoch (they are few beside the demos)")
        p.add_argument("--takeover-num-envs", type=int, default=None, metavar="N",
                       help="takeover episodes driven at a time, batched in the main process (default: 32 on "
                            "CUDA; 0: the driver runs in each recording process)")
        p.add_argument("--init-from", default=None, metavar="MODEL",
                       help="an unfinished model folder of this same command (a device call's returned checkpoint): "
                            "where OUT holds no training state (a fresh machine), continue its schedule from its "
                            "weights, with fresh optimizer moments")
        p.add_argument("--finetune-from", default=None, metavar="MODEL",
                       help="a finished model folder of this task and --size (trained on the same demos): start "
                            "from its weights, with a schedule of its own (a DAgger round that goes on from "
                            "its --driver instead of training from scratch)")
        p.add_argument("--dagger-from", default=None, metavar="MODEL",
                       help="the next DAgger round after the one that trained MODEL: its takeover sets replayed "
                            "from the driven steps the folder carries, MODEL driving a new one, the training "
                            "starting from MODEL's weights (sets --driver and --finetune-from)")
        p.add_argument("--dagger-rounds", type=int, default=0, metavar="N",
                       help="after the training, DAgger rounds up to round N, each driven by and going on from "
                            "the one before (--takeover-demos each), as one run that a rerun continues; with "
                            "--dagger-from MODEL, the rounds after MODEL's (train_small.train_dagger_rounds)")
        p.add_argument("--dagger-seconds", type=float, default=210.0, help="training seconds of each DAgger round")
        p.add_argument("--dagger-lr", type=float, default=3e-4, help="peak learning rate of each DAgger round")
        p.add_argument("--compile", action="store_true", help="torch.compile the model (faster on a GPU)")
        p.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                       help="without PyTorch's deterministic kernels (faster on a GPU; runs agree less closely)")
        p.add_argument("--render-quality", default="fast", choices=("fast", "high"),
                       help="rendering of the demos and the evaluation (high: shadows)")
        p.add_argument("--device", default=None)
        p.add_argument("--export", default=None,
                       help="folder for the files worth keeping (model tar, summary, results, one video), "
                            "written as they are made")
    return p


def _run(command: str, args: argparse.Namespace) -> None:
    if command == "demos":
        from llarva_gym.demos import record_demos
        driver = None
        if args.driver:
            from llarva_policy.train_small import driver_loader
            driver = driver_loader(args.driver, args.driver_visual_trace)
        for task in _csv(args.task):
            record_demos(task, args.episodes, args.out, image_size=args.image_size, cameras=args.cameras,
                         depth=args.depth, processes=args.processes, variation=args.variation, seed=args.seed,
                         render_quality=args.render_quality, action_noise=args.action_noise, driver=driver,
                         driver_steps=args.driver_steps, driver_num_envs=args.driver_num_envs,
                         driver_name=str(Path(args.driver).resolve()) if args.driver else None)
    elif command == "annotate":
        from llarva_policy.annotations import annotate
        count = annotate(args.data, args.out, args.task, visual_trace=args.visual_trace,
                         trace_points=args.trace_points, history_noise=args.history_noise, seed=args.seed,
                         template=args.template, processes=args.processes)
        print(f"wrote {count} annotations to {args.out}")
    elif command == "finetune":
        from llarva_policy.finetune import finetune
        options = {k: v for k, v in vars(args).items()}
        finetune(**options)
    elif command == "merge-lora":
        from llarva_policy.finetune import merge_lora
        merge_lora(args.adapter, args.output)
    elif command == "train-small":
        from llarva_policy.train_small import next_dagger_drivers, train_dagger_rounds, train_small
        options = vars(args)
        dagger_from = options.pop("dagger_from")
        rounds, round_seconds, round_lr = (options.pop(k) for k in ("dagger_rounds", "dagger_seconds", "dagger_lr"))
        if rounds:
            train_dagger_rounds(rounds=rounds, round_seconds=round_seconds, round_lr=round_lr, dagger_from=dagger_from,
                                **options)
        else:
            if dagger_from is not None:
                if options["driver"] or options["finetune_from"]:
                    raise ValueError("dagger_from: sets --driver and --finetune-from itself; give neither with it")
                options.update(driver=next_dagger_drivers(dagger_from), finetune_from=dagger_from)
            train_small(**options)
    else:
        from llarva_gym.evaluation import evaluate, print_summary
        from llarva_policy.codec import AnswerParseError     # no torch: the expert's evaluation stays light
        if args.policy == "expert":
            policy = "expert"
        else:
            if not args.checkpoint:
                raise SystemExit("llarva eval: --checkpoint PATH is required unless --policy expert")
            from llarva_policy.policy import LlarvaPolicy
            policy = LlarvaPolicy.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype,
                                                  with_visual_trace=args.visual_trace, template=args.template,
                                                  constrained=args.constrained,
                                                  on_parse_error=getattr(args, "on_parse_error", "raise"))
        try:
            results = evaluate(policy, args.task, episodes=args.episodes, episode_length=args.episode_length,
                               num_envs=args.num_envs, demos=args.demos, video_dir=args.video,
                               results_path=args.results, seed=args.seed, render_quality=args.render_quality,
                               variation=args.variation)
        except AnswerParseError as error:
            kept = (f"the finished episodes are kept in {args.results} (a rerun goes on from them)" if args.results
                    else "without --results the finished episodes were not kept")
            raise ValueError(f"{error}\n{kept}; to go on past such answers: --on-parse-error hold (the arm holds "
                             f"still for that step) or --constrained (decoding kept to the answer's form)") from None
        print_summary(results)
        if command == "quickstart" and args.learned_episodes:
            _quickstart_learned(args)


def _quickstart_learned(args) -> None:
    """The quickstart's second part: the learned policy shipped in models/, videos with its visual trace."""
    from llarva_gym.evaluation import evaluate, print_summary
    if not LEARNED_MODEL.is_dir():     # an installed wheel carries no models/ folder
        print(f"\n(no learned policy at {LEARNED_MODEL}: run from a clone of the repository to see one)")
        return
    from llarva_policy.policy import LlarvaPolicy
    print(f"\nA learned policy: {LEARNED_MODEL.name} (trained from random weights by `llarva train-small`), "
          f"{args.learned_episodes} episodes of {LEARNED_TASK} (the variation drawn per episode)")
    policy = LlarvaPolicy.from_pretrained(LEARNED_MODEL, device=args.device, with_visual_trace=True, constrained=True)
    out = Path(args.results).parent if args.results else Path("outputs/quickstart")
    results = evaluate(policy, LEARNED_TASK, episodes=args.learned_episodes, num_envs=min(2, args.learned_episodes),
                       episode_length=args.episode_length, video_dir=out / "learned_videos",
                       results_path=out / "learned_results.json", seed=args.seed, variation=LEARNED_VARIATION)
    print_summary(results)


def _seconds_or_fit(text: str) -> float | None:
    """--train-seconds: a number, or "fit" (None: what --run-seconds leaves, finished in this run)."""
    if text == "fit":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'fit', got {text!r}") from None


def _positive_ints(text: str) -> tuple[int, ...]:
    """--variation-weights: comma-separated positive integers ("3,1")."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, one per variation "
                                         f"(e.g. 3,1), got {text!r}")
    return tuple(int(part) for part in parts)


def _kind_weights(text: str) -> dict[str, float]:
    """--answer-weights: comma-separated KIND=WEIGHT ("sign=3,decimal4=0.1"); the kinds and the
    weights' range are checked by train_small (check_answer_weights)."""
    weights = {}
    for part in text.split(","):
        kind, equals, weight = part.strip().partition("=")
        try:
            weights[kind.strip()] = float(weight)
        except ValueError:
            equals = ""
        if not equals or not kind.strip():
            raise argparse.ArgumentTypeError(f"expected comma-separated KIND=WEIGHT (e.g. sign=3,decimal4=0.1), "
                                             f"got {part!r} in {text!r}")
    return weights


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        listing = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
        print(f"usage: llarva <command> [options]\n\ncommands:\n{listing}\n\n`llarva <command> --help` for options")
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"llarva: unknown command {argv[0]!r}")
        return
    command = argv[0]
    _run(command, _parser(command).parse_args(argv[1:]))


def console(argv: list[str] | None = None) -> None:
    """The `llarva` command: `main`, with bad input (a missing file, a malformed checkpoint, demo
    folder or option: the library's ValueErrors and FileNotFoundErrors, whose messages name the
    field and the expected form) reported as one line and exit status 2 instead of a traceback.
    LLARVA_TRACEBACK=1 shows the traceback too."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("LLARVA_TRACEBACK", "") not in ("", "0"):
            raise
        command = argv[0] if argv else ""
        print(f"llarva {command}: error: {error}\n(LLARVA_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    console()
