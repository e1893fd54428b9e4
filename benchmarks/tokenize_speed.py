"""Tokenizing the training set (train-small's data stage): one process against worker processes,
same samples, same run.

    python benchmarks/tokenize_speed.py --record 40 --samples 20000               # this machine
    python benchmarks/tokenize_speed.py --record 200 --samples 144000 --processes 4,8,14   # GPU host

Records reach_target demos, annotates them as the recipe does (the visual trace, 3 points, the
kinds' lookup that `--answer-weights` needs), trains the tokenizer on them as `train_small` does,
then tokenizes the annotation entries repeated to `--samples` (a DAgger round's 144k: the text is
what costs, not which scene it is) with `encode_conversations(processes=N)`. Every mode must give
the same arrays. The ratio is against the one-process row of the same run; the workers' time
includes starting them. Prints a table and writes JSON (default
benchmarks/results/tokenize_speed.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from llarva_gym.files import write_json_atomic


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=int, default=40, help="reach_target demos to record and annotate")
    parser.add_argument("--samples", type=int, default=20000, help="annotation entries to tokenize (repeated)")
    parser.add_argument("--processes", default=None, help="comma separated (default: 2 and the core count)")
    parser.add_argument("--no-kinds", dest="kinds", action="store_false", help="skip the answer kinds' lookup")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.record < 1 or args.samples < 1:
        parser.error("--record and --samples: expected ints >= 1")
    # Imported here, not at the top: the workers' forkserver imports this script as its main module.
    from llarva_gym.recording import record_demos
    from llarva_policy import codec
    from llarva_policy.annotations import annotate
    from llarva_policy.finetune import conversation_turns, load_annotations
    from llarva_policy.model import build_tokenizer
    from llarva_policy.train_small import IMAGE_SIZE, TOKENIZER_CORPUS, encode_conversations

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as temp:
        root, annotations = Path(temp) / "data", Path(temp) / "annotations.json"
        record_demos("reach_target", args.record, root, image_size=IMAGE_SIZE, cameras=("front",),
                     processes=min(14, cores), variation=0, progress=False)
        annotate(root, annotations, "reach_target", visual_trace=True, trace_points=3, progress=False)
        entries = load_annotations(annotations, root)
    tokenizer = build_tokenizer(corpus_texts=[codec.build_conversation_text(*conversation_turns(e))
                                              for e in entries[:TOKENIZER_CORPUS]])
    samples = (entries * -(-args.samples // len(entries)))[:args.samples]
    counts = [int(n) for n in args.processes.split(",")] if args.processes else sorted({2, min(16, cores)})
    rows, reference = [], None
    for n in [1] + counts:
        clock = time.perf_counter()
        encoded = encode_conversations(samples, tokenizer, num_image_tokens=64, goal_points="future",
                                       kinds=args.kinds, processes=n)
        seconds = time.perf_counter() - clock
        if reference is None:
            reference = encoded
        elif len(encoded) != len(reference) or not all(
                np.array_equal(a, b) for mine, theirs in zip(encoded, reference) for a, b in zip(mine, theirs)):
            raise SystemExit(f"processes {n}: the encoded samples differ from one process's")
        rows.append({"processes": n, "samples": len(samples), "seconds": round(seconds, 3),
                     "us_per_sample": round(1e6 * seconds / len(samples), 1)})
    for row in rows:
        row["speedup_vs_one_process"] = round(rows[0]["seconds"] / row["seconds"], 2)

    print(f"{len(samples)} samples ({len(entries)} distinct, kinds {'on' if args.kinds else 'off'}), {cores} CPUs")
    print(f"{'processes':>9} {'seconds':>8} {'us/sample':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['processes']:>9} {r['seconds']:>8.2f} {r['us_per_sample']:>10.1f} {r['speedup_vs_one_process']:>7.2f}x")
    result = {"benchmark": "tokenize_speed", "samples": len(samples), "distinct": len(entries), "kinds": args.kinds,
              "rows": rows, "machine": {"cpus": cores, "platform": platform.platform(),
                                        "python": platform.python_version()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out or Path(__file__).parent / "results" / "tokenize_speed.json")
    write_json_atomic(out, result, indent=2)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
