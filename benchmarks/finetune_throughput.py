"""Fine-tuning throughput: tokens/s, samples/s and peak memory of LLARVA's LoRA step, per setting.

The model is a random LLaVA of the chosen size (`7b` is LLaVA-1.5-7B's architecture, built directly
in bf16 on the GPU), made trainable exactly as `llarva finetune` does (`prepare_for_training`:
LoRA on every linear layer of the language model, projector trainable, vision tower frozen; LoRA
weights in float32 under bf16 autocast) with the same optimizer groups. Batches are synthetic but
of the real shape: one image (its tokens in the sequence) plus text up to `--seq-len` tokens, the
last `--answer-len` labelled. The step is forward, backward, gradient clipping at 1.0, optimizer
step: what the Trainer does between two batches, without its data loading.

Several settings in one run, each a comma-separated list of overrides of the flags:

    python benchmarks/finetune_throughput.py --size 7b --steps 10 --configs \\
        bs=4 bs=8 bs=8,gc=1 bs=16,gc=1 bs=16,gc=1,optim=adamw_torch_fused bs=8,attn=flash_attention_2

keys: bs (batch size), seq (sequence length), gc (gradient checkpointing 0/1), optim (adamw_torch,
adamw_torch_fused), attn (sdpa, eager, flash_attention_2), r (LoRA rank), dropout (LoRA dropout),
compile (0/1: torch.compile each decoder layer), lora_dtype (fp32, bf16). A setting that runs out
of memory is reported as "oom" and the next one runs. Prints a table and writes JSON (after each
setting, atomically) to benchmarks/results/ or --out.

Reference (reference/llarva-format.md, H100, 7B, LoRA r=128, batch 4, 800 tokens): 5,060 tokens/s,
56 GB. Target: >= 10,000 tokens/s at <= 60 GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from llarva_gym.files import write_json_atomic
from llarva_policy.finetune import parameter_groups, prepare_for_training
from llarva_policy.model import build_tokenizer, tiny_llava_config

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ATTENTION = ("sdpa", "eager", "flash_attention_2")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


@dataclasses.dataclass
class Setting:
    batch_size: int = 4
    seq_len: int = 800
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    attn: str = "sdpa"
    lora_r: int = 128
    lora_dropout: float = 0.05
    compile: bool = False
    lora_dtype: str = "fp32"

    def label(self) -> str:
        parts = [f"bs={self.batch_size}", f"seq={self.seq_len}", f"r={self.lora_r}", self.attn, self.optim]
        if self.gradient_checkpointing:
            parts.append("gc")
        if self.compile:
            parts.append("compile")
        if self.lora_dropout != 0.05:
            parts.append(f"dropout={self.lora_dropout:g}")
        if self.lora_dtype != "fp32":
            parts.append(f"lora_{self.lora_dtype}")
        return ",".join(parts)


def _flag(value: str) -> bool:
    return value in ("1", "true")


_KEYS = {"bs": ("batch_size", int), "seq": ("seq_len", int), "gc": ("gradient_checkpointing", _flag),
         "optim": ("optim", str), "attn": ("attn", str), "r": ("lora_r", int), "dropout": ("lora_dropout", float),
         "compile": ("compile", _flag), "lora_dtype": ("lora_dtype", str)}


def parse_setting(text: str, base: Setting) -> Setting:
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in _KEYS or not value:
            raise SystemExit(f"--configs: {item!r} is not key=value with key one of {sorted(_KEYS)}")
        field, convert = _KEYS[key]
        overrides[field] = convert(value.lower() if key in ("gc", "compile") else value)
    setting = dataclasses.replace(base, **overrides)
    if setting.attn not in ATTENTION:
        raise SystemExit(f"attn: expected one of {ATTENTION}, got {setting.attn!r}")
    if setting.optim not in OPTIMIZERS:
        raise SystemExit(f"optim: expected one of {OPTIMIZERS}, got {setting.optim!r}")
    if setting.lora_dtype not in ("fp32", "bf16"):
        raise SystemExit(f"lora_dtype: expected fp32 or bf16, got {setting.lora_dtype!r}")
    return setting


def build_model(size: str, setting: Setting, device: torch.device, dtype: torch.dtype):
    """A random LLaVA of `size`, built in `dtype` on `device` (no CPU copy of the 7B weights)."""
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config(build_tokenizer(), size=size)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=setting.attn)
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False
    trainable_dtype = torch.float32 if setting.lora_dtype == "fp32" else torch.bfloat16
    model = prepare_for_training(model, lora_r=setting.lora_r, lora_alpha=2 * setting.lora_r,
                                 lora_dropout=setting.lora_dropout, trainable_dtype=trainable_dtype)
    if setting.gradient_checkpointing:
        model.base_model.model.activation_checkpointing_enable()
    if setting.compile:
        for layer in model.base_model.model.model.language_model.layers:
            layer.compile()
    return model, config


def synthetic_batch(config, setting: Setting, answer_len: int, device: torch.device, dtype: torch.dtype,
                    generator: torch.Generator) -> dict:
    """`batch_size` rows of `seq_len` tokens: <s>, the image's tokens, random text; the last `answer_len` labelled."""
    num_image_tokens = config.image_seq_length
    num_text = setting.seq_len - 1 - num_image_tokens
    if num_text < answer_len + 1:
        raise SystemExit(f"seq_len {setting.seq_len} leaves no room for text after {num_image_tokens} image tokens "
                         f"and a {answer_len}-token answer")
    vocab = config.text_config.vocab_size
    text = torch.randint(3, vocab, (setting.batch_size, num_text), generator=generator)
    text[text == config.image_token_index] = 3
    input_ids = torch.cat([
        torch.full((setting.batch_size, 1), config.text_config.bos_token_id),
        torch.full((setting.batch_size, num_image_tokens), config.image_token_index),
        text,
    ], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer_len:] = input_ids[:, -answer_len:]
    side = config.vision_config.image_size
    pixel_values = torch.randn(setting.batch_size, 3, side, side, generator=generator)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device), "pixel_values": pixel_values.to(device, dtype)}


def peak_memory_gb(device: torch.device) -> tuple[float, float | None]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None   # process peak RSS, not per setting


def run_setting(size: str, setting: Setting, *, steps: int, warmup: int, answer_len: int,
                device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    if setting.attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return {"status": "skipped: flash_attn is not installed"}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    model, config = build_model(size, setting, device, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, lr=1e-4, projector_lr=2e-5), lr=1e-4,
                                  fused=setting.optim == "adamw_torch_fused")
    batch = synthetic_batch(config, setting, answer_len, device, dtype, torch.Generator().manual_seed(seed))
    model.train()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> float:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = float(loss)   # waits for the last step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    peak, reserved = peak_memory_gb(device)
    tokens = setting.batch_size * setting.seq_len * steps
    return {
        "status": "ok",
        "tokens_per_second": tokens / elapsed,
        "samples_per_second": setting.batch_size * steps / elapsed,
        "step_time_s": elapsed / steps,
        "peak_memory_gb": peak,
        "peak_reserved_gb": reserved,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "final_loss": loss,
    }


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_table(rows: list[dict]) -> str:
    header = f"{'setting':<58} {'status':<8} {'tokens/s':>10} {'samples/s':>10} {'step s':>8} {'peak GB':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["status"] == "ok":
            lines.append(f"{row['setting']:<58} {'ok':<8} {row['tokens_per_second']:>10,.0f} "
                         f"{row['samples_per_second']:>10.2f} {row['step_time_s']:>8.3f} {row['peak_memory_gb']:>8.1f}")
        else:
            lines.append(f"{row['setting']:<58} {row['status']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small", "7b"), default="tiny")
    parser.add_argument("--seq-len", type=int, default=800, help="tokens per sample, image tokens included")
    parser.add_argument("--answer-len", type=int, default=64, help="labelled tokens at the end of each sample")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels, compile)")
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn", choices=ATTENTION, default="sdpa")
    parser.add_argument("--optim", choices=OPTIMIZERS, default="adamw_torch")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--lora-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--configs", nargs="*", default=None, metavar="KEY=VALUE,...",
                        help="settings to run, each overriding the flags above (see the module docstring)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/finetune_throughput-...)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    base = Setting(batch_size=args.batch_size, seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
                   optim=args.optim, attn=args.attn, lora_r=args.lora_r, lora_dropout=args.lora_dropout,
                   compile=args.compile, lora_dtype=args.lora_dtype)
    settings = [parse_setting(text, base) for text in args.configs] if args.configs else [base]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RESULTS_DIR / f"finetune_throughput-{args.size}-{stamp}.json"

    import transformers
    import peft
    header = {
        "benchmark": "finetune_throughput", "size": args.size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."), "steps": args.steps, "warmup": args.warmup,
        "answer_len": args.answer_len, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "command": " ".join(sys.argv), "time": stamp,
        "reference": "H100, 7b, LoRA r=128, batch 4, seq 800: 5,060 tokens/s, 56 GB; target >= 10,000 tokens/s "
                     "at <= 60 GB",
    }
    print(f"finetune throughput: {args.size} on {header['device_name']} ({header['dtype']}), "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    rows = []
    for setting in settings:
        row = {"setting": setting.label(), **dataclasses.asdict(setting)}
        try:
            row.update(run_setting(args.size, setting, steps=args.steps, warmup=args.warmup,
                                   answer_len=args.answer_len, device=device, dtype=dtype, seed=args.seed))
        except torch.OutOfMemoryError:
            row["status"] = "oom"
        except Exception as error:   # report and go on with the next setting
            row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        _free(device)
        rows.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        write_json_atomic(out, {**header, "results": rows})
    print()
    print(format_table(rows))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
