"""LLARVA instruction tuning: LoRA (peft) on a LLaVA checkpoint with the transformers Trainer.

The recipe is LLaVA-1.5's LoRA recipe, as LLARVA used it on RLBench:

* LoRA on every linear layer of the language model (q, k, v, o, gate, up, down), nowhere else;
  the projector fully trainable at its own learning rate (`projector_lr`); the vision tower
  frozen. `full=True` tunes every language-model weight instead (for small models trained from
  scratch).
* Each annotation entry becomes `codec.build_conversation_text(question, answer)`; the loss is on
  the answer and its closing `</s>` only (`codec.answer_span`), every other label is -100.
* Cosine schedule without warm-up, bf16 and gradient checkpointing on request, DeepSpeed ZeRO-2/3
  through the presets shipped in `deepspeed_configs/`.

What `output` holds, and how a run survives being killed:

* `llarva_finetune.json`, written first: the options and the base model's path. It claims the
  folder: a second run into it without `resume=True` is refused rather than mixed in. When the run
  ends it gets `"finished": true` and the training report.
* `checkpoint-N/` every `save_steps` steps (and at the end): adapter or model, optimizer,
  scheduler, RNG states, Trainer state. transformers 5.24's Trainer writes these folders in place
  (some 4.x releases wrote `tmp-checkpoint-N` and renamed it; 5.24 does not), so a kill can leave a
  half-written one. We write `llarva_checkpoint_complete.json` into a checkpoint once every
  process has finished it, resume only from checkpoints that have it, delete unfinished ones
  when resuming, and rotate checkpoints ourselves so the last complete one is never deleted first.
* At the end: the adapter in peft's layout (`adapter_config.json`, `adapter_model.safetensors`;
  the projector is saved with it), or with `full=True` a whole transformers-layout checkpoint that
  `load_llava` reads; the processor and tokenizer; `training_report.json`.

`merge_lora(adapter, output)` folds an adapter into its base and saves a checkpoint that
`load_llava` and `LlarvaPolicy.from_pretrained` load.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from llarva_gym.files import write_json_atomic
from llarva_policy import codec
from llarva_policy.model import load_llava

RUN_FILE = "llarva_finetune.json"
REPORT_FILE = "training_report.json"
CHECKPOINT_COMPLETE = "llarva_checkpoint_complete.json"
CHECKPOINT_PREFIX = "checkpoint"   # the Trainer's folder names: checkpoint-<global step>
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")

PROJECTOR = "multi_modal_projector"
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# peft full-matches a string target against each module's qualified name. Naming the language
# model's layers keeps LoRA off the CLIP tower (it has q_proj/k_proj/v_proj too) and off lm_head.
LORA_TARGET_REGEX = (r".*\blanguage_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(LORA_TARGET_MODULES) + ")")

DEEPSPEED_PRESETS = ("zero2", "zero3")
IGNORE_INDEX = -100   # label of every token the loss skips (PyTorch's cross-entropy default)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    """Every option of `finetune`; those up to `seed` are the flags of `llarva finetune`, with its defaults.

    LoRA r=128, alpha=256, dropout 0.05, the projector at 2e-5 and the cosine schedule without
    warm-up are LLARVA's RLBench recipe. LLARVA also used lr 1e-4 (2e-4 here is LLaVA-1.5's LoRA
    default), 4 epochs, 16 samples per GPU on 8 GPUs, bf16 and gradient checkpointing.
    """

    model: str                        # LLaVA checkpoint folder (transformers or original layout)
    data: str                         # annotation JSON (llarva_policy.annotations.annotate)
    images: str                       # folder the annotation image paths are relative to
    output: str                       # run folder: checkpoints, then the adapter (or model)
    vision_tower: str | None = None   # CLIP folder, for original-layout checkpoints
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    full: bool = False                # tune every language-model weight (and the projector) instead of LoRA
    lr: float = 2e-4
    projector_lr: float = 2e-5
    epochs: float = 1.0
    max_steps: int = -1               # > 0 overrides epochs
    batch_size: int = 4               # per device
    grad_accum: int = 1
    max_length: int = 2048            # tokens per sample, image tokens included
    deepspeed: str | None = None      # "zero2", "zero3" or a DeepSpeed JSON file
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 500
    resume: bool = False
    seed: int = 0
    # Not on the command line (yet):
    template: str = "training"        # codec template of the system line (the questions are in the data)
    keep_checkpoints: int | None = 2  # complete checkpoints kept; None keeps all
    logging_steps: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"        # a TrainingArguments optimizer name, e.g. "adamw_torch_fused"
    attn_implementation: str | None = None   # "sdpa", "eager", "flash_attention_2"; None keeps the model's
    num_workers: int | None = None    # DataLoader workers; None: 4 with CUDA, else 0
    report_to: str | None = None      # None: "tensorboard" if installed, else "none"
    progress: bool = True

    def check(self) -> None:
        """Raise ValueError naming the first option that cannot work."""
        positive_ints = ("lora_r", "batch_size", "grad_accum", "max_length", "save_steps", "logging_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("lr", "projector_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a learning rate > 0, got {value!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {self.lora_dropout!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha: expected a number > 0, got {self.lora_alpha!r}")
        if self.max_steps <= 0 and not self.epochs > 0:
            raise ValueError(f"epochs: expected > 0 when max_steps is not set, got {self.epochs!r}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints: expected None (keep all) or >= 1, got {self.keep_checkpoints!r}")
        codec.get_template(self.template)


def _config_from(config: FinetuneConfig | None, options: dict) -> FinetuneConfig:
    known = {field.name for field in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"finetune: unknown option(s) {unknown}; the options are {sorted(known)}")
    if config is None:
        missing = [name for name in ("model", "data", "images", "output") if options.get(name) is None]
        if missing:
            raise TypeError(f"finetune: missing required option(s) {missing}")
        return FinetuneConfig(**options)
    return dataclasses.replace(config, **options)


# ---------------------------------------------------------------------------------------------
# Data: annotation entries -> token ids, labels and pixels
# ---------------------------------------------------------------------------------------------

def conversation_turns(entry: dict) -> tuple[str, str]:
    """(question, answer) of one LLARVA annotation entry."""
    turns = entry["conversations"]
    return turns[0]["value"], turns[1]["value"]


def load_annotations(data, images) -> list[dict]:
    """Read and check an annotation JSON: a list of `{"id", "image", "conversations"}` entries whose
    conversation is one human turn holding `<image>` once and one gpt turn, and whose image file
    exists under `images`. Errors name the file, the entry and the field."""
    data, images = Path(data), Path(images)
    if not data.is_file():
        raise FileNotFoundError(f"data: annotation file {data} does not exist (write it with `llarva annotate`)")
    if not images.is_dir():
        raise FileNotFoundError(f"images: {images} is not a folder; it should be the root the annotation's "
                                f"image paths are relative to (the demos' data root)")
    try:
        entries = json.loads(data.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"data: {data} is not valid JSON ({err})") from err
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"data: {data} should hold a non-empty JSON list of annotation entries")
    expected = ('{"id": ..., "image": "<episode>/front_rgb/<i>.png", "conversations": '
                '[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}')
    for index, entry in enumerate(entries):
        where = f"{data}: entry {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is a {type(entry).__name__}; expected {expected}")
        where += f" (id {entry.get('id')!r})"
        turns = entry.get("conversations")
        if not isinstance(entry.get("image"), str) or not (
                isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, dict) for t in turns)
                and [t.get("from") for t in turns] == ["human", "gpt"]
                and all(isinstance(t.get("value"), str) for t in turns)):
            raise ValueError(f"{where}: expected {expected}")
        if turns[0]["value"].count(codec.IMAGE_TOKEN) != 1:
            raise ValueError(f"{where}: the human turn should hold {codec.IMAGE_TOKEN!r} exactly once")
        if not (images / entry["image"]).is_file():
            raise FileNotFoundError(f"{where}: image {images / entry['image']} does not exist "
                                    f"(is images={str(images)!r} the demos' data root?)")
    return entries


def tokenize_conversation(processor, image, question: str, answer: str, *,
                          template: str | codec.Template = codec.TRAINING) -> dict[str, torch.Tensor]:
    """One training sample: `input_ids`, `attention_mask`, `labels` (1-D) and `pixel_values` (3, H, W).

    The labels are the input ids on the answer and its closing `</s>`, -100 elsewhere (the system
    line, the question, the image tokens). Tokens are matched to the answer's characters through
    the tokenizer's offsets. The processor writes `<image>` as many times as the image has
    features before tokenizing, so its offsets count characters of that longer text; the answer
    ends the text, so it lies the same distance from the end in both.
    """
    text = codec.build_conversation_text(question, answer, template=template)
    answer_start, answer_end = codec.answer_span(question, answer, template=template)
    assert answer_end == len(text), "codec: the answer must close the conversation text"
    encoded = processor(images=image, text=text, return_offsets_mapping=True, return_tensors="pt")
    input_ids = encoded["input_ids"][0]
    offsets = encoded["offset_mapping"][0]
    expanded_length = int(offsets[:, 1].max())
    answer_start_expanded = expanded_length - (len(text) - answer_start)
    # A token belongs to the answer if it reaches into it ("▁The" may start on the space before).
    in_answer = offsets[:, 1] > answer_start_expanded
    labels = torch.where(in_answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    eos = processor.tokenizer.eos_token_id
    if not in_answer.any() or int(input_ids[-1]) != eos or int(labels[-1]) != eos:
        raise ValueError(f"the tokenizer did not end the sample with its end-of-sequence token {eos}: the "
                         f"template's end_of_answer must be the tokenizer's eos token; text ends {text[-40:]!r}")
    return {
        "input_ids": input_ids,
        "attention_mask": encoded["attention_mask"][0],
        "labels": labels,
        "pixel_values": encoded["pixel_values"][0],
    }


class ConversationDataset(torch.utils.data.Dataset):
    """Annotation entries as training samples; images are read and processed when a sample is drawn."""

    def __init__(self, entries: Sequence[dict], images, processor, *,
                 template: str | codec.Template = codec.TRAINING):
        self.entries = list(entries)
        self.images = Path(images)
        self.processor = processor
        self.template = codec.get_template(template)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.entries[index]
        question, answer = conversation_turns(entry)
        with Image.open(self.images / entry["image"]) as image:
            image = image.convert("RGB")
        return tokenize_conversation(self.processor, image, question, answer, template=self.template)


@dataclass
class PadCollator:
    """Pads a list of samples on the right (ids with the pad token, labels with -100) and stacks the pixels."""

    pad_token_id: int

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(sample["input_ids"]) for sample in samples)

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.stack([F.pad(s[key], (0, longest - len(s[key])), value=value) for s in samples])

        return {
            "input_ids": padded("input_ids", self.pad_token_id),
            "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE_INDEX),
            "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
        }


def sample_lengths(entries: Sequence[dict], tokenizer, num_image_tokens: int, *,
                   template: str | codec.Template = codec.TRAINING, image_token: str = codec.IMAGE_TOKEN,
                   chunk: int = 4096) -> list[int]:
    """Token count of every sample as the processor will write it, from the text alone (fast)."""
    texts = [codec.build_conversation_text(*conversation_turns(e), template=template) for e in entries]
    lengths = []
    for start in range(0, len(texts), chunk):
        batch = texts[start:start + chunk]
        for ids, text in zip(tokenizer(batch)["input_ids"], batch):
            lengths.append(len(ids) + text.count(image_token) * (num_image_tokens - 1))
    return lengths


def check_lengths(entries, lengths: Sequence[int], max_length: int, data) -> None:
    """Every sample must fit: the answer is at the end, so truncating would cut exactly what is trained on."""
    too_long = [(length, entry.get("id")) for length, entry in zip(lengths, entries) if length > max_length]
    if too_long:
        longest, entry_id = max(too_long, key=lambda pair: pair[0])
        raise ValueError(
            f"max_length={max_length}: {len(too_long)} of {len(entries)} samples in {data} are longer (the longest, "
            f"id {entry_id!r}, has {longest} tokens, image tokens included). Truncating them would cut off the "
            f"answer, the only part the loss reads; raise max_length to at least {max(lengths)}")


# ---------------------------------------------------------------------------------------------
# Model: what trains and at which learning rate
# ---------------------------------------------------------------------------------------------

def prepare_for_training(model, *, full: bool = False, lora_r: int = 128, lora_alpha: int = 256,
                         lora_dropout: float = 0.05, trainable_dtype: torch.dtype | None = torch.float32):
    """Freeze what LLaVA's recipe freezes and return the model to train.

    LoRA (default): a peft model with adapters on the language model's q/k/v/o/gate/up/down and a
    trainable copy of the projector (`modules_to_save`, so it is saved with the adapter).
    `full=True`: the model itself with the whole language model (embeddings and lm_head included)
    and the projector trainable. The vision tower is frozen either way. Trainable weights are cast
    to `trainable_dtype` (float32: the optimizer then updates full-precision weights while the
    frozen base may stay in bf16 and autocast does the mixed-precision compute); None leaves them.
    """
    model.requires_grad_(False)
    if full:
        for module in (model.model.language_model, model.lm_head, getattr(model.model, PROJECTOR)):
            module.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                          target_modules=LORA_TARGET_REGEX, modules_to_save=[PROJECTOR])
        with warnings.catch_warnings():   # peft 0.21 asks transformers 5 a deprecated question; not ours
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora)
    if trainable_dtype is not None:
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dtype != trainable_dtype:
                parameter.data = parameter.data.to(trainable_dtype)
    return model


def parameter_groups(model, *, lr: float, projector_lr: float, weight_decay: float = 0.0,
                     decay_names: set[str] | None = None) -> list[dict]:
    """Optimizer groups of the trainable weights: the projector at `projector_lr`, the rest at `lr`
    (LLaVA's mm_projector_lr); weight decay only on `decay_names` (all if None)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            key = (PROJECTOR in name, decay_names is None or name in decay_names)
            groups.setdefault(key, []).append(parameter)
    return [{"params": params, "lr": projector_lr if is_projector else lr,
             "weight_decay": weight_decay if decays else 0.0}
            for (is_projector, decays), params in sorted(groups.items())]


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder in `output`, oldest first."""
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def is_complete_checkpoint(folder: Path) -> bool:
    return (Path(folder) / CHECKPOINT_COMPLETE).is_file()


def last_complete_checkpoint(output) -> Path | None:
    """The newest checkpoint that was finished (has the completion file), or None."""
    complete = [folder for _, folder in _checkpoints(Path(output)) if is_complete_checkpoint(folder)]
    return complete[-1] if complete else None


def _rotate_checkpoints(output: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` complete checkpoints, and unfinished ones older than the newest."""
    checkpoints = _checkpoints(output)
    complete = [folder for _, folder in checkpoints if is_complete_checkpoint(folder)]
    doomed = complete[:-keep] if keep else []
    if complete:
        newest = int(_CHECKPOINT_NAME.match(complete[-1].name).group(1))
        doomed += [folder for step, folder in checkpoints if step < newest and not is_complete_checkpoint(folder)]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)


def _resolve_deepspeed(deepspeed: str | None) -> str | None:
    """The DeepSpeed JSON path for a preset name or a file; a clear error if DeepSpeed is missing."""
    if deepspeed is None:
        return None
    if deepspeed in DEEPSPEED_PRESETS:
        path = Path(str(resources.files("llarva_policy") / "deepspeed_configs" / f"{deepspeed}.json"))
    else:
        path = Path(deepspeed).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"deepspeed: {deepspeed!r} is neither a preset ({', '.join(DEEPSPEED_PRESETS)}) "
                                    f"nor an existing DeepSpeed JSON file")
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError(f"deepspeed={deepspeed!r} needs DeepSpeed, which is not installed: "
                          f"pip install 'llarva[deepspeed]'")
    return str(path)


def _zero_stage(deepspeed_json: str) -> int | None:
    try:
        return json.loads(Path(deepspeed_json).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"deepspeed: {deepspeed_json} is not a readable DeepSpeed JSON file ({err})") from err


# ---------------------------------------------------------------------------------------------
# The Trainer, adapted
# ---------------------------------------------------------------------------------------------

def _trainer_classes():
    """LlarvaTrainer and TrainingProgress, built on first use so importing this module stays light."""
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback

    class LlarvaTrainer(Trainer):
        """The Trainer with LLaVA's projector learning rate, complete-marked checkpoints and throughput counters."""

        def __init__(self, *args, projector_lr: float, keep_checkpoints: int | None, **kwargs):
            super().__init__(*args, **kwargs)
            self.projector_lr = projector_lr
            self.keep_checkpoints = keep_checkpoints
            # Counted on this process, for this session (skipped batches of a resume are not counted).
            self.samples_seen = 0
            self.tokens_seen = 0          # non-padding tokens
            self._last_log = (time.perf_counter(), 0)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                groups = parameter_groups(opt_model, lr=self.args.learning_rate, projector_lr=self.projector_lr,
                                          weight_decay=self.args.weight_decay,
                                          decay_names=set(self.get_decay_parameter_names(opt_model)))
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.samples_seen += int(inputs["input_ids"].shape[0])
            self.tokens_seen += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

        def log(self, logs, start_time=None):
            if "loss" in logs:   # a training log: add throughput since the last one (estimated for all processes)
                now = time.perf_counter()
                last_time, last_tokens = self._last_log
                if now > last_time:
                    new_tokens = (self.tokens_seen - last_tokens) * self.args.world_size
                    logs["tokens_per_second"] = new_tokens / (now - last_time)
                self._last_log = (now, self.tokens_seen)
            super().log(logs, start_time)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            # Every process has written its part (RNG state, DeepSpeed shards) before the mark.
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                folder = Path(self._get_output_dir(trial)) / f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
                write_json_atomic(folder / CHECKPOINT_COMPLETE, {"global_step": self.state.global_step})
                _rotate_checkpoints(Path(self.args.output_dir), self.keep_checkpoints)

    class TrainingProgress(ProgressCallback):
        """The Trainer's tqdm bar with loss, learning rate and tokens/s beside it, instead of a dict printed per log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                postfix = {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0):.2e}"}
                if "tokens_per_second" in logs:
                    postfix["tok/s"] = f"{logs['tokens_per_second']:,.0f}"
                self.training_bar.set_postfix(postfix, refresh=False)

    return LlarvaTrainer, TrainingProgress


# ---------------------------------------------------------------------------------------------
# finetune
# ---------------------------------------------------------------------------------------------

def _existing_run(output: Path) -> list[str]:
    """What in `output` shows it already holds a run (empty if nothing)."""
    if not output.is_dir():
        return []
    markers = [name for name in (RUN_FILE, "adapter_config.json", "config.json") if (output / name).exists()]
    return markers + [folder.name for _, folder in _checkpoints(output)]


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_memory_allocated"
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"


def finetune(config: FinetuneConfig | None = None, /, *, callbacks: Sequence | None = None, **options) -> dict:
    """Instruction-tune a LLaVA checkpoint on LLARVA annotations; returns the training report.

    Call with keyword options (those of `FinetuneConfig`) or a `FinetuneConfig` (options given
    as well override its fields). `callbacks`: extra transformers `TrainerCallback`s. See the
    module docstring for what `output` holds. `resume=True` continues from the last complete
    checkpoint in `output` (weights, optimizer, scheduler, RNG and data order restored); without
    it, an `output` that already holds a run is refused.

    Runs under `torchrun` / `deepspeed` launchers as well: each process calls `finetune` with the
    same options; only the main process writes the run files.
    """
    config = _config_from(config, options)
    config.check()
    output = Path(config.output).expanduser().resolve()
    model_path = Path(config.model).expanduser().resolve()
    deepspeed = _resolve_deepspeed(config.deepspeed)

    # --- the output folder: a new run or a resumed one (read-only checks, on every process) ---
    resume_from = None
    if config.resume:
        resume_from = last_complete_checkpoint(output)
        if resume_from is None:
            found = [folder.name for _, folder in _checkpoints(output)]
            raise FileNotFoundError(
                f"resume: no complete checkpoint in {output} (checkpoint folders: {found or 'none'}; complete ones "
                f"hold {CHECKPOINT_COMPLETE}). The run stopped before its first save (save_steps={config.save_steps}) "
                f"or the folder is wrong; start again without resume")
        previous = json.loads((output / RUN_FILE).read_text()) if (output / RUN_FILE).is_file() else {}
        changed = {key: (old, getattr(config, key)) for key, old in previous.get("options", {}).items()
                   if key not in ("resume", "output", "model", "data", "images", "vision_tower")
                   and hasattr(config, key) and old != getattr(config, key)}
        if changed:
            warnings.warn(f"resume: options differ from the run being resumed (old, new): {changed}", stacklevel=2)
    elif existing := _existing_run(output):
        raise FileExistsError(
            f"output: {output} already holds a fine-tuning run ({', '.join(existing[:4])}); pass resume=True "
            f"(--resume) to continue it from its last checkpoint, or choose an empty folder")

    # --- data ---
    entries = load_annotations(config.data, config.images)

    # --- model (loaded before TrainingArguments: with ZeRO-3 configured, from_pretrained would refuse
    # load_llava's device_map; DeepSpeed partitions the loaded model when the Trainer starts) ---
    from transformers import TrainingArguments, set_seed

    set_seed(config.seed)    # LoRA's initialisation draws from the global RNG
    # The frozen base may stay in bf16; weights that train are float32 (see prepare_for_training),
    # except under DeepSpeed, which keeps its own float32 master copy.
    base_dtype = torch.bfloat16 if config.bf16 and (not config.full or deepspeed) else torch.float32
    cuda = torch.cuda.is_available()
    # Straight onto this process's GPU, except under ZeRO-3, which partitions the model from CPU memory.
    on_gpu = cuda and not (deepspeed and _zero_stage(deepspeed) == 3)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if on_gpu else "cpu"
    loaded = load_llava(model_path, device=device, dtype=base_dtype, vision_tower=config.vision_tower)
    lengths = sample_lengths(entries, loaded.tokenizer, loaded.num_image_tokens, template=config.template,
                             image_token=loaded.image_token)
    check_lengths(entries, lengths, config.max_length, config.data)
    if config.attn_implementation is not None:
        loaded.model.set_attn_implementation(config.attn_implementation)
    loaded.model.config.use_cache = False
    loaded.model.config.get_text_config().use_cache = False
    model = prepare_for_training(loaded.model, full=config.full, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                                 lora_dropout=config.lora_dropout,
                                 trainable_dtype=None if deepspeed else torch.float32)
    model.train()
    if not config.full:   # merge_lora finds the base through this as well
        model.peft_config["default"].base_model_name_or_path = str(model_path)

    report_to = config.report_to or ("tensorboard" if importlib.util.find_spec("tensorboard") else "none")
    num_workers = config.num_workers if config.num_workers is not None else (4 if cuda else 0)
    args = TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        deepspeed=deepspeed,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=None,           # we rotate (only complete checkpoints count)
        logging_steps=config.logging_steps,
        report_to=report_to,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=num_workers,
        dataloader_persistent_workers=num_workers > 0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,     # pixel_values and labels are not in forward's named arguments for peft
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        disable_tqdm=not config.progress,
        # Without CUDA, accelerate runs several processes (torchrun) as data parallel only when told
        # it is on CPU; otherwise each process would train alone.
        use_cpu=not cuda,
    )
    state = args.distributed_state
    is_main = args.process_index == 0

    # --- claim the folder (main process), after every process has done its checks ---
    state.wait_for_everyone()
    if is_main:
        if resume_from is not None:
            for step, folder in _checkpoints(output):
                if step > int(_CHECKPOINT_NAME.match(resume_from.name).group(1)) or not is_complete_checkpoint(folder):
                    print(f"removing {folder}: an unfinished checkpoint (the run was stopped while writing it)")
                    shutil.rmtree(folder, ignore_errors=True)
        trainable, total = count_parameters(model)
        write_json_atomic(output / RUN_FILE, {
            "base_model": str(model_path),
            "vision_tower": str(Path(config.vision_tower).resolve()) if config.vision_tower else None,
            "mode": "full" if config.full else "lora",
            "options": dataclasses.asdict(config),
            "num_samples": len(entries),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "finished": False,
        })
    state.wait_for_everyone()

    LlarvaTrainer, TrainingProgress = _trainer_classes()
    trainer = LlarvaTrainer(
        model=model,
        args=args,
        train_dataset=ConversationDataset(entries, config.images, loaded.processor, template=config.template),
        data_collator=PadCollator(loaded.tokenizer.pad_token_id),
        processing_class=loaded.processor,
        callbacks=list(callbacks or []),
        projector_lr=config.projector_lr,
        keep_checkpoints=config.keep_checkpoints,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    if config.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TrainingProgress())
    else:
        trainer.remove_callback(PrinterCallback)   # quiet: the logs stay in trainer_state.json

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.perf_counter() - started

    # --- final save: adapter (or model) and processor; the run file last, as the mark of a finished run ---
    trainer.save_model(str(output))
    counts = trainer.accelerator.reduce(
        torch.tensor([trainer.samples_seen, trainer.tokens_seen], device=args.device), reduction="sum")
    samples, tokens = (int(x) for x in counts.tolist())
    peak_gb, peak_kind = _peak_memory(args.device)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    report = {
        "output": str(output),
        "global_step": trainer.state.global_step,
        "steps_this_run": trainer.state.global_step - (int(resume_from.name.split("-")[-1]) if resume_from else 0),
        "samples": samples,
        "non_pad_tokens": tokens,
        "runtime_s": round(runtime, 3),
        "samples_per_second": round(samples / runtime, 3),
        "tokens_per_second": round(tokens / runtime, 1),
        "peak_memory_gb": round(peak_gb, 3),
        "peak_memory_kind": peak_kind,
        "final_loss": losses[-1] if losses else None,
        "world_size": args.world_size,
        "device": str(args.device),
    }
    if is_main:
        loaded.processor.save_pretrained(str(output))
        write_json_atomic(output / REPORT_FILE, report)
        run = json.loads((output / RUN_FILE).read_text())
        write_json_atomic(output / RUN_FILE, {**run, "finished": True, "report": report})
        if config.progress:
            print(format_report(report))
    state.wait_for_everyone()
    return report


def format_report(report: dict) -> str:
    loss = report["final_loss"]
    rows = [
        ("steps", f"{report['global_step']} ({report['steps_this_run']} this run)"),
        ("samples/s", f"{report['samples_per_second']:.2f}"),
        ("tokens/s (non-pad)", f"{report['tokens_per_second']:,.0f}"),
        (f"peak memory ({report['peak_memory_kind']})", f"{report['peak_memory_gb']:.2f} GB"),
        ("final loss", "n/a" if loss is None else f"{loss:.4f}"),
        ("output", report["output"]),
    ]
    width = max(len(name) for name, _ in rows)
    return "training report\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


# ---------------------------------------------------------------------------------------------
# merge_lora
# ---------------------------------------------------------------------------------------------

def _saved_dtype(model_path: Path) -> str:
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "float32"
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def merge_lora(adapter, output, *, base_model=None, vision_tower=None, device=None, dtype=None,
               overwrite: bool = False) -> Path:
    """Fold a LoRA adapter (a `finetune` output or one of its checkpoints) into its base model and
    save a transformers-layout checkpoint (model, processor, tokenizer) in `output`.

    The base is `base_model` if given, else the one `llarva_finetune.json` names, else the
    adapter's `base_model_name_or_path`. `dtype` defaults to the base checkpoint's saved dtype.
    Written to a temporary sibling folder and renamed: `output` is either absent or complete. An
    existing non-empty `output` is refused unless `overwrite=True`.
    """
    from peft import PeftModel

    adapter = Path(adapter).expanduser().resolve()
    output = Path(output).expanduser().resolve()
    run_file = adapter / RUN_FILE if (adapter / RUN_FILE).is_file() else adapter.parent / RUN_FILE
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    if not (adapter / "adapter_config.json").is_file():
        if run.get("mode") == "full" or (adapter / "config.json").is_file():
            raise ValueError(f"adapter: {adapter} is a full checkpoint (a finetune run with full=True), not a LoRA "
                             f"adapter; it loads as it is with load_llava / LlarvaPolicy.from_pretrained")
        raise FileNotFoundError(f"adapter: no adapter_config.json in {adapter}; expected a finetune output folder "
                                f"or one of its checkpoint-N folders (peft's adapter layout)")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise FileExistsError(f"output: {output} exists and is not empty; pass overwrite=True to replace it")

    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    base = base_model or run.get("base_model") or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"adapter: {adapter} does not name its base model (no {RUN_FILE}, no "
                         f"base_model_name_or_path); pass base_model=")
    base = Path(base).expanduser()
    vision_tower = vision_tower or run.get("vision_tower")
    loaded = load_llava(base, device=device, dtype=dtype or _saved_dtype(base), vision_tower=vision_tower)
    with warnings.catch_warnings():   # see prepare_for_training
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        merged = PeftModel.from_pretrained(loaded.model, str(adapter)).merge_and_unload()
    merged.eval()

    output.parent.mkdir(parents=True, exist_ok=True)
    unique = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp = output.parent / f".{output.name}.tmp-{unique}"
    try:
        merged.save_pretrained(temp)
        loaded.processor.save_pretrained(temp)
        write_json_atomic(temp / "llarva_merge.json", {"base_model": str(base), "adapter": str(adapter),
                                                       "dtype": str(merged.dtype).removeprefix("torch.")})
        if output.exists():
            old = output.parent / f".{output.name}.old-{unique}"
            os.rename(output, old)
            os.rename(temp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temp, output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return output
