"""Action latency: transformers' generate against llarva's FastGenerator, in the same run.

    python benchmarks/policy_latency_fast.py                          # GPU: LLaVA-1.5-7B shape, bf16, batch 1 and 16
    python benchmarks/policy_latency_fast.py --size tiny --device cpu # a few seconds on a CPU

The model has LLaVA-1.5-7B's architecture with random weights, built directly on the device (no
checkpoint on disk). Prompts are real LLARVA prompts (codec: instruction, five-step joint history,
one 128x128 image). Answers are forced to `--new-tokens` tokens (64) in the timed rows: EOS is
suppressed (generate: `min_new_tokens`, FastGenerator: `ignore_eos`), unconstrained, so both engines
do exactly the same work. The `+constrained` rows show the policy's real path (constrained action
answers that stop at EOS, at most `--new-tokens`); a random model rarely closes early, so they run
to about the budget. Every constrained answer is checked to parse. They run twice: one token per
decode forward (`+constrained`, `multi_token=False`), and `+constrained+multi-token`, where the
tokens the grammar forces ("," after a fourth decimal, "]" and EOS, ...) go into the forward of the
token before them (FastGenerator's default for constrained answers). Constrained rows report `sequential_steps` (decode forwards after the prefill,
`FastGenerator.last_decode_steps`) and `first_call_seconds` (the multi-token row's includes the
capture, and compile, of the wider step); the multi-token row says whether its tokens are the
one-token row's (`same_tokens_as_one_token_per_step`: they must be, up to bf16 rounding: the wider
step sums in another order).

Rows: seconds per generate call (one action per environment), actions/s = batch / seconds,
prefill seconds (a call with one new token: vision tower, projector, prompt), decode ms/token =
(seconds - prefill seconds) / (tokens - 1), and the speed-up over generate at the same batch size.
`rows_matching` compares each row's greedy tokens with generate's: identical in float32; in bf16 a
random model's near-ties can make rows part after a few tokens (the static cache sums attention
in another order).

Before timing, a tiny float32 model on the same device checks the fast path (CUDA graphs and
eager) against generate token for token, and multi-token against one-token constrained decoding
at batch 1 (`sanity_check` in the JSON). Then generate and the
uncompiled fast path run for every batch size, and the torch.compile variant last (each batch
size compiles for about a minute on 7B). A failing variant is recorded with its error and the run
goes on; CUDA-graph capture or compile failures fall back to eager with the reason printed. The
JSON (default benchmarks/results/policy_latency_fast_<size>_<device>.json) is rewritten after
every row.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from llarva_gym.files import write_json_atomic
from llarva_policy import codec
from llarva_policy.generation import FastGenerator, action_grammar_for
from llarva_policy.model import IMAGE_TOKEN, LoadedLlava, build_tokenizer, resolve_dtype, tiny_llava_config

INSTRUCTIONS = ("sweep dirt to the smaller dustpan", "reach the red target", "open the top drawer",
                "push the maroon button")


def build_model(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> LoadedLlava:
    """A random LLaVA of `size` made directly on `device` in `dtype`, with its processor."""
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    config = tiny_llava_config(tokenizer, size=size)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    vision = config.vision_config
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": vision.image_size}, do_pad=True,
                                             crop_size={"height": vision.image_size, "width": vision.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=IMAGE_TOKEN)
    return LoadedLlava(model=model, processor=processor, tokenizer=tokenizer, image_token=IMAGE_TOKEN,
                       image_token_id=config.image_token_id, num_image_tokens=config.image_seq_length,
                       image_size=vision.image_size, layout="transformers", path=Path(f"random-{size}"))


def make_inputs(loaded: LoadedLlava, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(batch):
        history = codec.format_history([rng.uniform(-2.5, 2.5, 7) for _ in range(codec.HISTORY_STEPS)])
        prompts.append(codec.build_prompt(codec.build_question(INSTRUCTIONS[i % len(INSTRUCTIONS)], history)))
    images = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(batch)]
    inputs = loaded.processor(images=images, text=prompts, padding=True, return_tensors="pt").to(loaded.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    return inputs


def timed(fn, device: torch.device, warmup: int, repeats: int):
    """(median seconds, last result) of `fn()` after `warmup` untimed calls."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def sanity_check(device: torch.device, new_tokens: int) -> dict:
    """Before timing: on a tiny float32 model on the same device, FastGenerator's greedy tokens
    (graphs where the device has them, and eager) against generate's, and constrained answers parse."""
    loaded = build_model("tiny", device, torch.float32, seed=0)
    tokenizer = loaded.tokenizer
    inputs = make_inputs(loaded, 3, seed=0)
    expected = loaded.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    expected = expected[:, inputs["input_ids"].shape[1]:]
    report = {}
    for graphs in ([True, False] if device.type == "cuda" else [False]):
        generator = FastGenerator(loaded, use_cuda_graphs=graphs)
        got = generator.generate(inputs, max_new_tokens=new_tokens)
        texts = tokenizer.batch_decode(generator.generate(inputs, max_new_tokens=64, constrained=True),
                                       skip_special_tokens=True)
        parsed = 0
        for text in texts:
            try:
                codec.parse_answer(text)
                parsed += 1
            except codec.AnswerParseError:
                pass
        report[generator.mode] = {"tokens_match_generate": bool(torch.equal(got, expected)),
                                  "constrained_parsed": f"{parsed}/{len(texts)}",
                                  "fallback_reason": generator.fallback_reason}
        single = make_inputs(loaded, 1, seed=1)
        one = generator.generate(single, max_new_tokens=64, constrained=True, multi_token=False)
        one_steps = generator.last_decode_steps
        multi = generator.generate(single, max_new_tokens=64, constrained=True, multi_token=True)
        report[generator.mode].update({"multi_token_same_tokens": bool(torch.equal(one, multi)),
                                       "multi_token_steps": f"{generator.last_decode_steps} vs {one_steps}",
                                       "fallback_reason": generator.fallback_reason})
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="7b", choices=("tiny", "small", "7b"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", default=None, choices=("off", "on", "both"),
                        help="FastGenerator variants: without torch.compile (off), with it (on), or both; "
                             "default: both on CUDA, off on CPU")
    parser.add_argument("--skip-hf", action="store_true", help="leave out transformers' generate")
    parser.add_argument("--skip-check", action="store_true",
                        help="leave out the tiny float32 check of the fast path against generate")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch; default 1 on CPU (the tiny model gains nothing from more, and "
                             "on a shared machine more threads make timings erratic), torch's default on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    dtype = resolve_dtype(args.dtype, device)
    compile_mode = args.compile or ("both" if device.type == "cuda" else "off")
    compile_options = {"off": [False], "on": [True], "both": [False, True]}[compile_mode]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    out = Path(args.out or Path(__file__).parent / "results" / f"policy_latency_fast_{args.size}_{device.type}.json")

    started = time.perf_counter()
    loaded = build_model(args.size, device, dtype, args.seed)
    tokenizer = loaded.tokenizer
    build_seconds = time.perf_counter() - started
    result = {
        "benchmark": "policy_latency_fast", "size": args.size, "device": str(device), "dtype": str(dtype),
        "new_tokens": args.new_tokens, "answer_length": "forced: EOS suppressed, unconstrained (fast+constrained "
                                                        "rows stop at EOS)",
        "repeats": args.repeats, "batch_sizes": batch_sizes, "model_build_seconds": round(build_seconds, 1),
        "parameters_billion": round(sum(p.numel() for p in loaded.model.parameters()) / 1e9, 3),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": round(os.getloadavg()[0], 2),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "rows": [], "errors": [],
    }
    gpu = result["machine"]["gpu"]
    print(f"{args.size} LLaVA, {result['parameters_billion']}B parameters, {dtype}, on {device}"
          f"{' (' + gpu + ')' if gpu else ''}; built in {build_seconds:.1f} s")

    def record(row):
        result["rows"].append(row)
        write_json_atomic(out, result, indent=2)
        shown = {k: v for k, v in row.items() if k not in ("method", "batch", "example")}
        print(f"  {row['method']:<38} batch {row['batch']:>3}: {shown}")

    def record_error(what, err):
        message = f"{what}: {type(err).__name__}: {err}"
        print(f"  FAILED {message}")
        result["errors"].append({"what": what, "error": message, "traceback": traceback.format_exc()[-3000:]})
        write_json_atomic(out, result, indent=2)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if not args.skip_check:
        try:
            result["sanity_check"] = sanity_check(device, 32)
            print(f"check (tiny float32 on {device}): {result['sanity_check']}")
        except Exception as err:   # noqa: BLE001
            record_error("sanity check", err)
        write_json_atomic(out, result, indent=2)

    new_tokens = args.new_tokens
    inputs_by_batch, hf_by_batch, fast_by_batch = {}, {}, {}

    def measure_hf(batch):
        inputs = inputs_by_batch[batch]
        prompt_tokens = int(inputs["attention_mask"].sum(dim=1).max())

        def run_hf():
            output = loaded.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id)
            return output[:, inputs["input_ids"].shape[1]:]
        seconds, tokens = timed(run_hf, device, warmup=1, repeats=args.repeats)
        hf_by_batch[batch] = (seconds, tokens)
        record({"method": "hf-generate", "batch": batch, "prompt_tokens": prompt_tokens,
                "seconds": round(seconds, 4), "actions_per_second": round(batch / seconds, 2),
                "tokens": int(tokens.shape[1])})

    def measure_fast(batch, use_compile):
        inputs = inputs_by_batch[batch]
        prompt_tokens = int(inputs["attention_mask"].sum(dim=1).max())
        name = "fast" + ("+compile" if use_compile else "")
        generator = FastGenerator(loaded, compile=use_compile)
        try:
            warm = time.perf_counter()
            generator.generate(inputs, max_new_tokens=new_tokens, ignore_eos=True)   # capture / compile
            warmup_seconds = time.perf_counter() - warm
            seconds, tokens = timed(lambda: generator.generate(inputs, max_new_tokens=new_tokens, ignore_eos=True),
                                    device, warmup=1, repeats=args.repeats)
            prefill_seconds, _ = timed(lambda: generator.generate(inputs, max_new_tokens=1), device,
                                       warmup=1, repeats=args.repeats)
            row = {"method": name, "mode": generator.mode, "fallback_reason": generator.fallback_reason,
                   "batch": batch, "prompt_tokens": prompt_tokens, "seconds": round(seconds, 4),
                   "actions_per_second": round(batch / seconds, 2), "tokens": int(tokens.shape[1]),
                   "prefill_seconds": round(prefill_seconds, 4),
                   "decode_ms_per_token": round(1000 * (seconds - prefill_seconds) / max(1, new_tokens - 1), 3),
                   "first_call_seconds": round(warmup_seconds, 2)}
            if batch in hf_by_batch:
                hf_seconds, hf_tokens = hf_by_batch[batch]
                row["speedup_vs_hf"] = round(hf_seconds / seconds, 2)
                row["rows_matching"] = f"{int((tokens == hf_tokens).all(dim=1).sum())}/{batch}"
            if use_compile and batch in fast_by_batch:
                row["rows_matching_uncompiled"] = f"{int((tokens == fast_by_batch[batch]).all(dim=1).sum())}/{batch}"
            fast_by_batch.setdefault(batch, tokens)
            if generator.fallback_reason:
                print(f"  NOTE {name}: {generator.fallback_reason}")
            record(row)

            # The policy's real path: constrained action answers that stop at EOS; one token a
            # forward, then with forced runs in the forward of the token before them.
            one_token = None
            for multi_token in (False, True):
                def run_constrained():
                    return generator.generate(inputs, max_new_tokens=new_tokens, constrained=True,
                                              multi_token=multi_token)
                first = time.perf_counter()
                run_constrained()                    # multi-token: captures (and compiles) the wider step
                first_seconds = time.perf_counter() - first
                constrained_seconds, answer_tokens = timed(run_constrained, device, warmup=1, repeats=args.repeats)
                texts = tokenizer.batch_decode(answer_tokens, skip_special_tokens=True)
                parsed = 0
                for text in texts:
                    try:
                        codec.parse_answer(text)
                        parsed += 1
                    except codec.AnswerParseError:
                        pass
                lengths = (answer_tokens != tokenizer.pad_token_id).sum(dim=1).float()
                row = {"method": name + "+constrained" + ("+multi-token" if multi_token else ""),
                       "mode": generator.mode, "batch": batch, "prompt_tokens": prompt_tokens,
                       "seconds": round(constrained_seconds, 4),
                       "actions_per_second": round(batch / constrained_seconds, 2),
                       "tokens": round(float(lengths.mean()), 1), "parsed": f"{parsed}/{batch}",
                       "sequential_steps": generator.last_decode_steps,
                       "first_call_seconds": round(first_seconds, 2),
                       "forced_prefix_tokens": len(action_grammar_for(loaded).forced_ids),
                       "example": texts[0][:120]}
                if multi_token:
                    one_seconds, one_tokens, one_steps = one_token
                    row["speedup_vs_one_token_per_step"] = round(one_seconds / constrained_seconds, 3)
                    row["steps_saved"] = one_steps - generator.last_decode_steps
                    row["same_tokens_as_one_token_per_step"] = bool(torch.equal(answer_tokens, one_tokens))
                else:
                    one_token = (constrained_seconds, answer_tokens, generator.last_decode_steps)
                record(row)
        finally:
            generator.release()
            del generator
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # Everything without torch.compile first: its compilations are the slow, riskier part.
    plan = []
    for batch in batch_sizes:
        inputs_by_batch[batch] = make_inputs(loaded, batch, seed=args.seed + batch)
        plan += [] if args.skip_hf else [(batch, "hf")]
        plan += [(batch, False)] if False in compile_options else []
    plan += [(batch, True) for batch in batch_sizes if True in compile_options]
    for batch, what in plan:
        label = "hf-generate" if what == "hf" else "fast" + ("+compile" if what else "")
        inputs = inputs_by_batch[batch]
        print(f"\n{label}, batch {batch}: prompts of up to {int(inputs['attention_mask'].sum(dim=1).max())} tokens "
              f"({loaded.num_image_tokens} image tokens), {new_tokens} new tokens")
        try:
            if what == "hf":
                measure_hf(batch)
            else:
                measure_fast(batch, what)
        except Exception as err:   # noqa: BLE001 - one failing variant must not end a GPU run
            record_error(f"{label} batch {batch}", err)

    print_table(result)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out, result, indent=2)
    print(f"\nwrote {out} ({result['total_seconds']} s in all)")
    return result


def print_table(result: dict) -> None:
    print(f"\n{'method':<38} {'mode':<20} {'batch':>5} {'prompt':>6} {'tokens':>6} {'steps':>5} {'s/call':>8} "
          f"{'actions/s':>9} {'prefill s':>9} {'ms/token':>8} {'vs hf':>6} {'vs 1-tok':>8} {'same tokens':>11}")
    for row in result["rows"]:
        def cell(key, fmt):
            value = row.get(key)
            return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(
                value if value is not None else "")
        match = row.get("rows_matching") or row.get("parsed", "")
        if "parsed" in row:
            match = f"parsed {match}"
        print(f"{row['method']:<38} {row.get('mode', 'hf'):<20} {row['batch']:>5} {row['prompt_tokens']:>6} "
              f"{cell('tokens', ''):>6} {cell('sequential_steps', ''):>5} {cell('seconds', '.3f'):>8} "
              f"{cell('actions_per_second', '.2f'):>9} "
              f"{cell('prefill_seconds', '.3f'):>9} {cell('decode_ms_per_token', '.2f'):>8} "
              f"{cell('speedup_vs_hf', '.2f'):>6} {cell('speedup_vs_one_token_per_step', '.2f'):>8} {match:>11}")
    for error in result["errors"]:
        print(f"ERROR {error['error']}")


if __name__ == "__main__":
    main()
