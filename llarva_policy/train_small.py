"""`llarva train-small`: a LLaVA-architecture LLARVA policy trained from random initialisation.

No pre-trained LLARVA or LLaVA weights can be downloaded, so this recipe makes the whole pipeline
prove itself on what it can produce itself, in one call that fits a few minutes of one GPU:

    from llarva_policy.train_small import train_small
    summary = train_small("reach_target", "runs/train_small/reach_target", demos=1000, processes=12)

1. demos: `record_demos(task, demos, <out>/data, seed=demo_seed)`, the scripted expert on the
   embedded simulator, RLBench's on-disk layout (resumes where it stopped);
2. annotations: `annotate(<out>/data, <out>/annotations.json, task, seed=seed)`, LLARVA's JSON;
   in a DAgger round (`driver`), with the samples of expert-takeover demos driven by earlier
   rounds' models (`<out>/takeover`, `<out>/takeover1`, ...) added;
3. tokenizer: `build_tokenizer(corpus_texts=...)`, a LLaMA-style BPE trained on the annotation
   conversations themselves (every digit its own token, as LLaMA's);
4. model: LLaVA-1.5's architecture (CLIP ViT, two-layer GELU projector, Llama) from
   `tiny_llava_config`, resized to `SHAPES[size]` and randomly initialised with `seed`;
   128 px images in 16 px patches: 64 image tokens, the stored front images unresized
   (`small-swin`: a Swin tower in the ViT's place, the same 64 tokens);
5. training: every weight, the vision tower included, on the answer tokens (the loss of
   `llarva finetune`: the action and its `</s>`), AdamW with warm-up and a cosine schedule, bf16
   autocast on CUDA, a wall-clock budget (`train_seconds`); the checkpoint (transformers' layout,
   bf16) is rewritten every `checkpoint_seconds`, so a run cut short still leaves a model;
6. evaluation: `evaluate` (what `llarva eval` runs) with `LlarvaPolicy(constrained=True)`, greedy
   decoding that can only write a well-formed action, on `eval_episodes` episodes from
   `eval_seed`, and the scripted expert on the same episodes for comparison.

Why not `finetune(full=True)`: that is LLaVA's recipe for a pre-trained CLIP tower, which it keeps
frozen, and it reads and preprocesses every sample from disk through the transformers Trainer. A
randomly initialised tower has to learn, and a budget of minutes needs the data on the GPU: here
every conversation is tokenized once (the same ids and labels as `finetune.tokenize_conversation`,
checked by the tests) and every image is kept on the device as uint8 and normalised there (the
same numbers as the CLIP image processor, checked on every run).

What `out` holds: `data/` (demos), `annotations.json`, `model/` (the checkpoint, which
`LlarvaPolicy.from_pretrained` and `llarva eval --checkpoint` load), `eval/` (results, the
expert's results, one video per episode) and `summary.json` (options, sizes, training log, success
rates). `export`, if given, receives the few files worth keeping as they are made (the model as
one tar, the summary, both results files, one rollout video): a device run writes them straight
into its output folder, so a run stopped by a time limit still returns what it had.

DAgger: with `driver` models, expert-takeover demos from the states they reach join the data
(`<out>/takeover*`); `train_dagger_rounds` runs a training and rounds of DAgger after it, each
round driven by and going on from the one before, as one run (`llarva train-small --dagger-rounds`).

Reproducibility: demos, annotations, tokenizer, initialisation, data order and evaluation episodes
are functions of the seeds. With `max_steps=None` the learning-rate schedule runs on the clock
to fill `train_seconds`, and the steps made are recorded in the summary; pass them back as
`max_steps` to repeat a run on the step schedule. On CUDA, deterministic kernels are asked for where PyTorch has them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import multiprocessing
import os
import re
import shutil
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from llarva_gym.files import write_json_atomic
from llarva_policy import codec
from llarva_policy.finetune import IGNORE_INDEX, conversation_turns, load_annotations
from llarva_policy.model import (
    HIERARCHICAL_TOWERS,
    _clip_image_processor,
    _make_processor,
    build_tokenizer,
    resolve_device,
    tiny_llava_config,
    tower_grid,
)

IMAGE_SIZE = 128   # the stored front_rgb images; the CLIP tower takes them as they are

# Shapes of the vision tower and of the Llama, per size. "small": 6.86M parameters, 13.8 MB
# in bf16, trained in minutes on one GPU; "toy": CPU tests and dry runs.
SHAPES = {
    "small": (
        dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3, patch_size=16),
        dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6, num_attention_heads=4),
    ),
    # "small" with 8 px patches: 256 image tokens instead of 64, so that a small object (reach's
    # sphere is 5-9 px across) spans several patches and its size, the front image's depth cue,
    # is seen by more than one token.
    "small-patch8": (
        dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3, patch_size=8),
        dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6, num_attention_heads=4),
    ),
    # A Swin tower (Liu et al. 2021) in the CLIP ViT's place: 4 px patches attending within shifted
    # 8x8 windows, merged twice into the same 64 image tokens of 192. A from-scratch ViT's 16 px
    # patches localise reach's 5-9 px sphere poorly; with the same recipe and data this tower took
    # reach from 23/100 to 36/100 (examples/train_small_log.md, round 18). Still LLaVA: tower,
    # two-layer projector, Llama.
    "small-swin": (
        dict(model_type="swin", embed_dim=48, depths=[2, 2, 2], num_heads=[3, 6, 12], window_size=8, patch_size=4),
        dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6, num_attention_heads=4),
    ),
    # The Swin stopped after two stages: 16x16 = 256 image tokens of 96, 8 px each, for what
    # round 18 still misses near the target (it brakes a few cm early, reading "arrived" from the
    # image: examples/train_small_log.md, round 18). Not yet trained on the device.
    "small-swin-256": (
        dict(model_type="swin", embed_dim=48, depths=[2, 4], num_heads=[3, 6], window_size=8, patch_size=4),
        dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6, num_attention_heads=4),
    ),
    # A FocalNet tower (Yang et al. 2022; transformers' `FocalNetModel`) in the Swin's place: the
    # same stages and 64 image tokens of 192, but each token gathers its neighbours through
    # depthwise convolutions (focal modulation) instead of window attention, and the patches are cut
    # by overlapping convolutions (a 7x7 stem, 3x3 between stages). The conv BC baseline read reach's
    # sphere where the Swin's regression did not (88 against 59 of 100): this is the LLaVA tower
    # closest to it (benchmarks/tower_probe.py compares them). Not yet trained on the device.
    "small-focal": (
        dict(model_type="focalnet", embed_dim=48, depths=[2, 2, 2], focal_levels=[2, 2, 2],
             focal_windows=[3, 3, 3], patch_size=4, use_conv_embed=True),
        dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6, num_attention_heads=4),
    ),
    # ~19M parameters: a wider, deeper tower and Llama, for runs that have the time.
    "medium": (
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, patch_size=16),
        dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6),
    ),
    "toy": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=32),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    ),
}
TOKENIZER_CORPUS = 4000    # demo conversations the tokenizer learns from (the file is shuffled: a fair sample)
SUMMARY_FILE = "summary.json"
MODEL_DIR = "model"
TRAINING_FILE = "llarva_train_small.json"   # in the model folder: how it was trained, and whether it finished
STATE_FILE = "training_state.pt"     # an unfinished training: weights (fp32), optimizer, step, data order
DATA_CACHE_FILE = "training_set.pt"  # the tokenized samples and their images, reused by a rerun
TAKEOVER_DIR = "takeover"            # expert-takeover demos driven by an earlier round's model (DAgger)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def small_llava_config(tokenizer, size: str = "small"):
    """LLaVA-1.5's architecture at one of `SHAPES`' sizes, for 128 px images.

    Built by `tiny_llava_config` and resized. One change from LLaVA-1.5: the image features are
    the tower's last layer (`vision_feature_layer=-1`), not the second to last: LLaVA skips the
    last layer of a CLIP trained for contrastive matching; a tower trained from scratch for this
    task has no such layer to skip.
    """
    if size not in SHAPES:
        raise ValueError(f"size: expected one of {sorted(SHAPES)}, got {size!r}")
    vision, text = SHAPES[size]
    config = tiny_llava_config(tokenizer, size="small", image_size=IMAGE_SIZE)
    config.text_config.update({**text, "num_key_value_heads": text["num_attention_heads"],
                               "head_dim": text["hidden_size"] // text["num_attention_heads"]})
    config.vision_feature_layer = -1
    if vision.get("model_type") in HIERARCHICAL_TOWERS:
        config.vision_config = vision_tower_config(size)
        config.vision_feature_select_strategy = "full"  # no CLS token to drop
    else:
        config.vision_config.update({**vision, "projection_dim": vision["hidden_size"]})
    stride, _ = tower_grid(config.vision_config)
    config.image_seq_length = (IMAGE_SIZE // stride) ** 2
    return config


def vision_tower_config(size: str):
    """The transformers config of `SHAPES[size]`'s vision tower, for 128 px images."""
    from transformers import CLIPVisionConfig, FocalNetConfig, SwinConfig

    vision = dict(SHAPES[size][0])
    model_type = vision.pop("model_type", "clip_vision_model")
    if model_type == "swin":
        return SwinConfig(image_size=IMAGE_SIZE, num_channels=3, drop_path_rate=0.0, **vision)
    if model_type == "focalnet":
        # FocalNetConfig has no `hidden_size` (its last stage's width), which LLaVA's projector
        # reads; stored in config.json as an extra field, it loads back with the config.
        width = vision["embed_dim"] * 2 ** (len(vision["depths"]) - 1)
        return FocalNetConfig(image_size=IMAGE_SIZE, num_channels=3, drop_path_rate=0.0, hidden_size=width, **vision)
    return CLIPVisionConfig(image_size=IMAGE_SIZE, num_channels=3, projection_dim=vision["hidden_size"],
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, **vision)


def build_model(tokenizer, size: str = "small", seed: int = 0):
    """(model, processor): a randomly initialised LLaVA (float32) and its processor."""
    from transformers import LlavaForConditionalGeneration

    config = small_llava_config(tokenizer, size)
    # A private RNG stream: the caller's global torch RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    image_processor = _clip_image_processor(IMAGE_SIZE, pad_to_square=True)
    processor = _make_processor(tokenizer, config.vision_config, image_processor,
                                config.vision_feature_select_strategy)
    return model, processor


def save_checkpoint(model, processor, folder: Path, info: dict, extra_files: dict | None = None) -> Path:
    """Write the model (bf16) and processor in transformers' layout, replacing `folder` atomically.
    `extra_files` ({name: path}): files copied in beside them."""
    folder = Path(folder)
    temp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    half = copy.deepcopy(model).to(torch.bfloat16)
    half.config.use_cache = True
    half.config.get_text_config().use_cache = True
    half.save_pretrained(temp)
    processor.save_pretrained(temp)
    (temp / TRAINING_FILE).write_text(json.dumps(info, indent=1) + "\n")
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, temp / name)
    if folder.exists():
        os.rename(folder, old)
    os.rename(temp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _training_info(folder: Path, field: str = "init_from") -> dict:
    """The llarva_train_small.json of a train-small model folder, or an error naming `field`."""
    info_path = Path(folder) / TRAINING_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{field}: {folder} has no {TRAINING_FILE}; expected a train-small model folder "
                                f"(the unpacked train_small_<task>_model.tar)")
    return json.loads(info_path.read_text())


def weights_only_resume(folder: Path, options: dict, tokenizer) -> dict:
    """An unfinished checkpoint folder as a `train_model` resume: weights, step, clock, no optimizer.

    A training longer than one device call keeps its full state (with the optimizer's moments,
    about 80 MB for `small`) only on the machine that ran it; when the next call finds a fresh
    machine, that state is gone, but the checkpoint every call returns (14 MB) still holds the
    weights and the training log. From them the schedule continues where it paused (step, seconds,
    learning rate) with fresh AdamW moments and a fresh data order: close to an unbroken run, not
    the same. The folder must come from the same command (the same options and tokenizer).
    """
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    info = _training_info(folder)
    saved = info.get("options", {})
    if saved != options:
        differ = sorted(k for k in set(saved) | set(options) if saved.get(k) != options.get(k))
        raise ValueError(f"init_from: {folder} was trained with other options ({', '.join(differ)}); "
                         f"expected the same train-small command")
    if info.get("finished"):
        raise ValueError(f"init_from: {folder} has finished its training; evaluate it with llarva eval")
    if PreTrainedTokenizerFast.from_pretrained(folder).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"init_from: {folder}'s tokenizer is not the one this run builds from its annotations")
    log = info["training"]
    warmup_ended_at = log.get("warmup_ended_at")
    if warmup_ended_at is None:   # checkpoints from before it was logged: the logged step where warm-up ended
        warmup_ended_at = next((e["seconds"] for e in log["history"] if e["step"] >= log["warmup_steps"]), None)
    weights = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).state_dict()
    return {"model": weights, "optimizer": None, "log": log, "step": log["steps"], "seconds": log["seconds"],
            "warmup_ended_at": warmup_ended_at, "order": None, "permutation": None, "position": None}


def finetune_base_id(folder, task: str, size: str) -> dict:
    """What identifies a `finetune_from` folder among a run's options: its name and a hash of its
    weights (not its path, which differs from machine to machine); an error unless it is a finished
    train-small model of `task` and `size`."""
    info = _training_info(folder, "finetune_from")
    saved = info.get("options", {})
    if not info.get("finished"):
        raise ValueError(f"finetune_from: {folder} has not finished its training; continue it with init_from")
    if saved.get("task") != task or saved.get("size") != size:
        raise ValueError(f"finetune_from: {folder} is a {saved.get('size')!r} model of {saved.get('task')!r}; "
                         f"expected a {size!r} model of {task!r}")
    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"finetune_from: {folder} has no model.safetensors; expected a train-small model folder")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return {"name": Path(folder).resolve().name, "weights_sha256": digest}


def load_finetune_base(model, folder, tokenizer) -> None:
    """Put the weights of the finished model at `folder` into `model` (built for this run)."""
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    if PreTrainedTokenizerFast.from_pretrained(folder).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"finetune_from: {folder}'s tokenizer is not the one this run builds from its annotations "
                         f"(it was trained on other demos)")
    base = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    model.load_state_dict(base.state_dict())


# ---------------------------------------------------------------------------------------------
# Data: every sample tokenized once, every image on the device
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainingSet:
    """All samples, ready to slice into batches (rows right-padded)."""

    input_ids: torch.Tensor   # (S, L) int64, padded with the pad token
    labels: torch.Tensor      # (S, L) int64, IGNORE_INDEX outside the answers
    lengths: torch.Tensor     # (S,) tokens of each sample, image tokens included
    images: torch.Tensor      # (S, 3, H, W) uint8
    goal: torch.Tensor        # (S, L) bool: the answer tokens of the visual trace's goal (`goal_span`)
    kind: torch.Tensor        # (S, L) uint8: what each answer token writes, an index into codec.ANSWER_KINDS (0s unless asked)

    def __len__(self) -> int:
        return len(self.lengths)

    def to(self, device) -> "TrainingSet":
        return TrainingSet(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


# A point of a visual trace, "[column, row]"; the action's list of decimals never matches.
_TRACE_POINT = re.compile(r"\[\d+, \d+\]")


GOAL_POINTS = ("last", "future")


def goal_span(answer: str, goal_points: str = "last") -> tuple[int, int] | None:
    """Where, in `answer`, the visual trace's goal is written (None without a trace), the
    characters that `goal_weight` weights in the loss.

    `goal_points="last"`: the trace's last point, where the episode ends (the target reached, the
    dustpan the dirt went into). `"future"`: every point after the first (the first is the
    current position, which the image shows). Why "future": the loss is taken with the true
    answer as the input (teacher forcing), and a point whose earlier points are given is mostly
    their extrapolation: on reach_target demos with 10 points the last one is within about 1 px
    of the line through the two before it, so weighting it teaches extrapolation, not where the
    goal is. The points that the image and the instruction alone can tell are the first future
    ones; with few trace points (3-4) they lie far along the path and carry the decision.
    """
    if goal_points not in GOAL_POINTS:
        raise ValueError(f"goal_points: expected one of {GOAL_POINTS}, got {goal_points!r}")
    points = list(_TRACE_POINT.finditer(answer))
    if not points or (goal_points == "future" and len(points) < 2):
        return None
    first = points[-1] if goal_points == "last" else points[1]
    return first.start(), points[-1].end()


def encode_conversations(entries, tokenizer, *, num_image_tokens: int, image_token: str = codec.IMAGE_TOKEN,
                         template=codec.TRAINING, goal_points: str = "last", kinds: bool = True,
                         chunk: int = 2048, processes: int = 1
                         ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(input_ids, labels, goal, kind) of every annotation entry; ids and labels as
    `finetune.tokenize_conversation` makes them, goal the answer tokens of `goal_span` (bool), kind
    what each answer token writes (`codec.answer_character_kinds`; a token spanning several kinds,
    as ", -" does, takes the first that is not "other"), as an index into `codec.ANSWER_KINDS`.
    Both are aligned with the labels' shift: position i holds the goal and kind of token i + 1.
    `kinds=False`: all kinds 0 ("other"), skipping their lookup (reading the answer tokens' offsets
    added about a sixth to tokenizing a large set).

    The conversation text is tokenized with its one `<image>`, which then becomes
    `num_image_tokens` copies (the processor writes them into the text; `<image>` is an added
    token, so the text around it tokenizes the same either way). Labels are the ids of the tokens
    that reach into the answer span, `IGNORE_INDEX` elsewhere.

    `processes` > 1: chunks of `chunk` entries go to that many worker processes (from a
    forkserver, as `load_images`'s), with the same result. Only worth it on many cores: the work
    around the Rust tokenizer is Python, one core's, but a worker's start costs about 3 s (it
    imports torch) and `encode_batch` already uses every core (benchmarks/tokenize_speed.py).
    """
    template = codec.get_template(template)
    # The Rust tokenizer itself, without the transformers wrapper's padded batch arrays (most of
    # the time on a large set), as JSON: each worker builds its own.
    encode = functools.partial(_encode_chunk, backend=tokenizer.backend_tokenizer.to_str(),
                               image_id=tokenizer.convert_tokens_to_ids(image_token), eos=tokenizer.eos_token_id,
                               image_token=image_token, num_image_tokens=num_image_tokens, template=template,
                               goal_points=goal_points, kinds=kinds)
    starts = range(0, len(entries), chunk)
    blocks = [entries[begin:begin + chunk] for begin in starts]
    parallel = processes > 1 and len(blocks) > 1
    # One Rust thread per worker: the workers are the parallelism.
    pool = ProcessPoolExecutor(min(processes, len(blocks)), mp_context=multiprocessing.get_context("forkserver"),
                               initializer=_one_tokenizer_thread) \
        if parallel else contextlib.nullcontext()
    encoded = []
    with pool:
        for lengths, *columns in (pool.map if parallel else map)(encode, blocks, starts):
            ends = np.cumsum(lengths)[:-1]
            encoded.extend(zip(*(np.split(column, ends) for column in columns)))
    return encoded


def _one_tokenizer_thread() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_chunk(entries, begin: int, *, backend: str, image_id: int, eos: int, image_token: str,
                  num_image_tokens: int, template, goal_points: str, kinds: bool):
    """`encode_conversations` of `entries`, the annotation's entries from index `begin` on."""
    # A copy, so that no padding or truncation left set on the wrapper's one applies.
    backend = Tokenizer.from_str(backend)
    backend.no_padding()
    backend.no_truncation()
    texts, answer_starts, goals, answer_kinds = [], [], [], []
    for entry in entries:
        question, answer = conversation_turns(entry)
        texts.append(codec.build_conversation_text(question, answer, template=template))
        answer_starts.append(codec.answer_span(question, answer, template=template)[0])
        answer_kinds.append(_character_kind_codes(answer, template) if kinds else None)
        goal = goal_span(answer, goal_points)
        goals.append((-1, -1) if goal is None else (answer_starts[-1] + goal[0], answer_starts[-1] + goal[1]))
    encoded = []
    for index, encoding in enumerate(backend.encode_batch(texts)):
        ids = np.array(encoding.ids, dtype=np.int64)
        labels = ids.copy()
        labels[:_first_token_ending_after(encoding, answer_starts[index])] = IGNORE_INDEX
        where = np.flatnonzero(ids == image_id)
        if len(where) != 1 or ids[-1] != eos or labels[-1] != eos:
            raise ValueError(f"annotation entry {begin + index} (id {entries[index].get('id')!r}): "
                             f"expected one {image_token!r} in the question and the text to end with the "
                             f"tokenizer's end-of-sequence token; text ends {texts[index][-40:]!r}")
        # A label is the next token: position i is weighted when the token at i + 1 overlaps the goal.
        start, end = goals[index]
        goal = np.zeros(len(ids), dtype=bool)
        if end > start:
            first, last = _first_token_ending_after(encoding, start), _first_token_ending_after(encoding, end - 1)
            goal[max(first - 1, 0):last] = True
        kind = (_token_kinds(encoding, answer_starts[index], answer_kinds[index], labels) if kinds
                else np.zeros(len(ids), dtype=np.uint8))
        k = where[0]
        ids = np.concatenate([ids[:k], np.full(num_image_tokens, image_id), ids[k + 1:]])
        labels = np.concatenate([labels[:k], np.full(num_image_tokens, IGNORE_INDEX), labels[k + 1:]])
        goal = np.concatenate([goal[:k], np.zeros(num_image_tokens, dtype=bool), goal[k + 1:]])
        kind = np.concatenate([kind[:k], np.zeros(num_image_tokens, dtype=np.uint8), kind[k + 1:]])
        encoded.append((ids, labels, goal, kind))
    # As one array per column: a worker's chunk then comes back as five arrays, not 8,000 (unpickling
    # those, one chunk at a time in the caller, made 14 workers only 1.4 times as fast as one).
    return (np.array([len(ids) for ids, *_ in encoded]),
            *(np.concatenate(column) for column in zip(*encoded)))


_KIND_CODE = {name: code for code, name in enumerate(codec.ANSWER_KINDS)}   # "other" is 0


def _character_kind_codes(answer: str, template) -> np.ndarray:
    """`codec.answer_character_kinds` as codes, with "other" (0) for the `</s>` after the answer."""
    kinds = codec.answer_character_kinds(answer, template=template)
    return np.array([_KIND_CODE[k] for k in kinds] + [0] * len(template.end_of_answer), dtype=np.uint8)


def _token_kinds(encoding, answer_start: int, character_codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(tokens,) uint8: at position i, the kind code of token i + 1 when that token is labelled."""
    kind = np.zeros(len(labels), dtype=np.uint8)
    labelled = np.flatnonzero(labels != IGNORE_INDEX)
    if len(labelled) == 0:
        return kind
    first = int(labelled[0])
    # Where each character's kind, or the next non-"other" one, is: a token takes the first kind
    # that is not "other" among its characters.
    codes = np.append(character_codes, 0)
    nonzero = np.flatnonzero(codes)
    next_nonzero = np.full(len(codes), len(codes))
    following = np.searchsorted(nonzero, np.arange(len(codes)))
    inside = following < len(nonzero)
    next_nonzero[inside] = nonzero[following[inside]]
    spans = np.array(encoding.offsets[first:], dtype=np.int64).reshape(-1, 2) - answer_start
    starts = np.clip(spans[:, 0], 0, len(codes) - 1)
    ends = np.clip(spans[:, 1], 0, len(codes))
    at = next_nonzero[starts]
    token_codes = np.where(at < ends, codes[np.minimum(at, len(codes) - 1)], 0).astype(np.uint8)
    kind[first - 1:len(labels) - 1] = token_codes
    return kind


def _first_token_ending_after(encoding, char: int) -> int:
    """Index of the first token of `encoding` whose text ends after character `char` (its length
    if none does). The token holding the character, when there is one: a lookup instead of
    reading every token's offsets (converting those was a third of tokenizing a large set)."""
    token = encoding.char_to_token(char)
    if token is not None:
        return token
    ends = [end for _, end in encoding.offsets]
    return next((i for i, end in enumerate(ends) if end > char), len(ends))


def load_images(paths, *, processes: int | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB images, in the order of `paths`, decoded by `processes` worker
    processes (default: one per core, at most 16; 1 decodes here).

    Processes, not threads: PIL holds the GIL while it decodes a small PNG, so 16 threads on
    the 16-core GPU host decoded 98k images in 61 s, one core's speed. The workers come from a
    forkserver, not a fork of this process (it runs torch's and CUDA's threads by now), and each
    decodes a contiguous block; the workers import `llarva_gym.demos` (and, as any spawned
    process, the main module: a script calling this needs the `if __name__ == "__main__":` guard)."""
    from llarva_gym.demos import read_rgb_image, read_rgb_images

    paths = [str(path) for path in paths]
    if not paths:
        raise ValueError("images: no image paths given")
    processes = processes or min(16, os.cpu_count() or 1)
    shape = read_rgb_image(paths[0]).shape
    images = np.empty((len(paths), *shape), np.uint8)
    # Blocks big enough that starting the workers is paid back, small enough to spread evenly.
    block = max(256, -(-len(paths) // (4 * processes)))
    starts = range(0, len(paths), block)
    blocks = [paths[start:start + block] for start in starts]
    parallel = processes > 1 and len(blocks) > 1
    forkserver = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(processes, mp_context=forkserver) if parallel else contextlib.nullcontext() as pool:
        decoded = (pool.map if parallel else map)(read_rgb_images, blocks, [shape] * len(blocks))
        for start, pixels in zip(starts, decoded):
            images[start:start + len(pixels)] = pixels
    return images


def build_training_set(entries, images_root, tokenizer, *, num_image_tokens: int, template=codec.TRAINING,
                       pad_token_id: int, goal_points: str = "last", kinds: bool = True,
                       processes: int = 1, timings: dict | None = None) -> TrainingSet:
    """All `entries` tokenized (by `processes` worker processes) and padded, with their images
    (`kinds`: see `encode_conversations`); `timings`, if given, receives the seconds each part took
    ("tokenize", "pad", "images", "pack")."""
    timings = {} if timings is None else timings
    clock = time.perf_counter()
    encoded = encode_conversations(entries, tokenizer, num_image_tokens=num_image_tokens, template=template,
                                   goal_points=goal_points, kinds=kinds, processes=processes)
    timings["tokenize"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    lengths = [len(ids) for ids, *_ in encoded]
    input_ids = np.full((len(encoded), max(lengths)), pad_token_id, dtype=np.int64)
    labels = np.full((len(encoded), max(lengths)), IGNORE_INDEX, dtype=np.int64)
    goal = np.zeros((len(encoded), max(lengths)), dtype=bool)
    kind = np.zeros((len(encoded), max(lengths)), dtype=np.uint8)
    for row, (ids, row_labels, row_goal, row_kind) in enumerate(encoded):
        input_ids[row, :len(ids)] = ids
        labels[row, :len(ids)] = row_labels
        goal[row, :len(ids)] = row_goal
        kind[row, :len(ids)] = row_kind
    timings["pad"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    images = load_images([Path(images_root) / entry["image"] for entry in entries])
    timings["images"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    data = TrainingSet(torch.from_numpy(input_ids), torch.from_numpy(labels), torch.tensor(lengths),
                       torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(goal),
                       torch.from_numpy(kind))
    timings["pack"] = round(time.perf_counter() - clock, 2)
    return data


class ImageNormalizer:
    """uint8 images -> CLIP pixel values on the device: the image processor's arithmetic.

    Valid only when the images already have the tower's size (no resize, no crop, no padding);
    `check` compares with the processor itself and raises if they differ.
    """

    def __init__(self, image_processor, device):
        self.scale = float(image_processor.rescale_factor)
        self.mean = torch.tensor(image_processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() * self.scale - self.mean) / self.std

    def check(self, image_processor, images: torch.Tensor) -> None:
        expected = image_processor(images=list(images.permute(0, 2, 3, 1).cpu().numpy()),
                                   return_tensors="pt")["pixel_values"]
        got = self(images.to(self.mean.device)).cpu()
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-4):
            raise ValueError(f"images: normalising on the device does not reproduce the CLIP image processor "
                             f"(shapes {tuple(got.shape)} and {tuple(expected.shape)}); the stored images must be "
                             f"{IMAGE_SIZE}x{IMAGE_SIZE} (record demos with image_size={IMAGE_SIZE})")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def learning_rate(step: int, total: int | None, *, peak: float, warmup: int, final_fraction: float = 0.1,
                  progress: float | None = None) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from `peak` down to `final_fraction * peak`.

    The cosine follows `(step - warmup) / (total - warmup)`, or `progress` (0 to 1) if given: a
    run on a clock passes the fraction of its time budget spent since the warm-up.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, max(0.0, progress))
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_loss(model, input_ids, labels, pixel_values, goal=None, goal_weight: float = 1.0,
                kind=None, kind_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(training loss, mean cross-entropy, token accuracy) on the answer tokens.

    The training loss is the cross-entropy averaged with weight `goal_weight` on the tokens of
    `goal` (bool, as `labels`) and 1 elsewhere, times `kind_weights[kind]` (`kind`: uint8 as
    `labels`, `TrainingSet.kind`; `kind_weights`: one weight per `codec.ANSWER_KINDS`); the mean
    cross-entropy, unweighted, is what the log reports. Right-padded rows need no attention mask under causal attention (no real token sees
    a pad), so attention runs its fused causal kernel; the LM head runs on the answer positions only.
    """
    hidden = model.model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    targets = targets[keep]
    per_token = F.cross_entropy(logits, targets, reduction="none")
    mean = per_token.mean()
    loss = mean
    weights = None
    if goal is not None and goal_weight != 1.0:
        weights = 1.0 + (goal_weight - 1.0) * goal[:, :-1][keep].float()
    if kind is not None and kind_weights is not None:
        by_kind = kind_weights[kind[:, :-1][keep].long()]
        weights = by_kind if weights is None else weights * by_kind
    if weights is not None:
        loss = (per_token * weights).sum() / weights.sum()
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return loss, mean, accuracy


def _optimizer(model, lr: float, weight_decay: float, device: torch.device):
    # Weight decay on matrices only (not on norms, biases, embeddings of positions or classes).
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 and "embed" not in name else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def train_model(model, data: TrainingSet, normalize: ImageNormalizer, *, device: torch.device, batch_size: int = 128,
                lr: float = 1e-3, warmup_steps: int = 200, weight_decay: float = 0.01, max_steps: int | None = None,
                train_seconds: float = 300.0, stop_seconds: float | None = None, seed: int = 0,
                bf16: bool | None = None, checkpoint_seconds: float = 60.0, on_checkpoint=None, log_every: int = 25,
                goal_weight: float = 1.0, answer_weights: dict[str, float] | None = None,
                repeats: torch.Tensor | None = None, compile: bool = False,
                resume: dict | None = None, progress: bool = True) -> dict:
    """Train every weight of `model` on `data` (on `device`); returns the training log.

    Stops after `max_steps`, or when `train_seconds` of training have passed. With `max_steps=None`
    the cosine schedule runs on the clock, ending with `train_seconds`: a step count guessed from
    an early speed would be wrong whenever the machine's load changes (other runs starting or
    ending beside this one). The steps made are recorded as `max_steps`; passing that back
    repeats the run on the step schedule.

    A training longer than one sitting (a device call has 10 minutes): `stop_seconds` ends this
    call's share early (`stopped_by="stop_seconds"`, not finished), and `resume`, the last
    `state` given to `on_checkpoint`, continues exactly there: weights, optimizer, step, the
    clock's seconds, the data order. `on_checkpoint(model, log, state)` is called every
    `checkpoint_seconds` and at the end.

    `goal_weight`: the loss weight of `data.goal`'s tokens; `answer_weights`: {kind: weight} for
    kinds of `codec.ANSWER_KINDS` (the others 1), the loss weight of the tokens that write them
    (`data.kind`), times the goal's. `repeats` (S,) ints: how many times
    each sample is drawn per epoch (1 for all if None). `compile`: `torch.compile` the LLaVA
    forward (`model.model`, in place: the checkpoint's names do not change), every batch padded
    to the data's full width so that one graph serves them all.
    """
    bf16 = device.type == "cuda" if bf16 is None else bf16
    if resume is not None:
        model.load_state_dict(resume["model"])
    model.to(device).train()
    model.requires_grad_(True)
    model.config.get_text_config().use_cache = False
    if compile and getattr(model.model, "_compiled_call_impl", None) is None:
        model.model.compile(dynamic=False)
    optimizer = _optimizer(model, lr, weight_decay, device)
    kind_weights = None if not answer_weights else torch.tensor(
        [float(answer_weights.get(name, 1.0)) for name in codec.ANSWER_KINDS], device=device)
    pool = torch.arange(len(data)) if repeats is None else torch.repeat_interleave(torch.arange(len(data)), repeats.cpu())
    if len(pool) < batch_size:
        batch_size = len(pool)
    order = torch.Generator().manual_seed(seed)   # data order: a function of the seed alone

    on_clock = max_steps is None
    total = max_steps if max_steps is not None else 10 ** 9
    # A given step count keeps the warm-up asked for (a repeat of a run on the clock must warm up
    # as it did), unless that would be more than half of the steps.
    warmup = warmup_steps if on_clock else min(warmup_steps, max(1, total // 2))
    if resume is None:
        log = {"max_steps": None if on_clock else total, "max_steps_chosen": "clock" if on_clock else "given",
               "batch_size": batch_size, "lr": lr, "warmup_steps": warmup, "weight_decay": weight_decay,
               "bf16": bf16, "goal_weight": goal_weight, **({"answer_weights": answer_weights} if answer_weights else {}),
               "samples": len(data), "samples_per_epoch": len(pool),
               "compile": compile, "steps": 0, "epochs": 0.0, "seconds": 0.0, "stopped_by": None, "sittings": 1,
               "history": []}
        step, spent_before, warmup_ended_at = 0, 0.0, None
        permutation, position = torch.randperm(len(pool), generator=order), 0
    else:
        log = {**resume["log"], "stopped_by": None, "sittings": resume["log"].get("sittings", 1) + 1}
        step, spent_before, warmup_ended_at = resume["step"], resume["seconds"], resume["warmup_ended_at"]
        if resume["optimizer"] is not None:
            optimizer.load_state_dict(resume["optimizer"])
        if resume["order"] is not None:
            order.set_state(resume["order"])
            permutation, position = resume["permutation"], resume["position"]
        else:   # weights only (`weights_only_resume`): a new order, from the seed and the step
            order.manual_seed(seed + step)
            permutation, position = torch.randperm(len(pool), generator=order), 0
    # `started` is where the clock's zero lies: a resumed run continues the seconds already spent.
    started = time.perf_counter() - spent_before
    stop_at = train_seconds if stop_seconds is None else min(train_seconds, spent_before + stop_seconds)
    last_checkpoint = time.perf_counter()
    bar = tqdm(total=None if on_clock else total, initial=step, desc="train-small", unit="step",
               disable=not progress, dynamic_ncols=True)
    lengths = data.lengths.cpu()    # batch lengths read on the CPU: no wait for the GPU
    loss = mean_loss = accuracy = None

    def elapsed() -> float:
        return time.perf_counter() - started

    def log_entry() -> dict:
        entry = {"step": step, "seconds": round(elapsed(), 2), "lr": optimizer.param_groups[0]["lr"],
                 "loss": round(mean_loss.item(), 5), "answer_token_accuracy": round(accuracy.item(), 4)}
        log["history"].append(entry)
        return entry

    def state() -> dict:
        log.update(steps=step, epochs=round(step * batch_size / len(pool), 3), seconds=round(elapsed(), 2),
                   warmup_ended_at=warmup_ended_at)
        return {"model": _cpu_copy(model.state_dict()),
                "optimizer": _cpu_copy(optimizer.state_dict()), "log": copy.deepcopy(log), "step": step,
                "seconds": elapsed(), "warmup_ended_at": warmup_ended_at, "order": order.get_state(),
                "permutation": permutation, "position": position}

    try:
        while step < total:
            if elapsed() >= stop_at:
                log["stopped_by"] = "time" if stop_at >= train_seconds else "stop_seconds"
                break
            if position + batch_size > len(pool):            # a new epoch: a new order (last partial batch dropped)
                permutation, position = torch.randperm(len(pool), generator=order), 0
            rows = pool[permutation[position:position + batch_size]]
            position += batch_size
            length = data.input_ids.shape[1] if compile else int(lengths[rows].max())
            index = rows.to(device)
            input_ids = data.input_ids[index, :length]
            labels = data.labels[index, :length]
            goal = data.goal[index, :length]
            kind = data.kind[index, :length] if kind_weights is not None else None
            pixel_values = normalize(data.images[index])

            clock = None
            if on_clock and step >= warmup:
                warmup_ended_at = warmup_ended_at if warmup_ended_at is not None else elapsed()
                clock = (elapsed() - warmup_ended_at) / max(1e-9, train_seconds - warmup_ended_at)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, peak=lr, warmup=warmup, progress=clock)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, mean_loss, accuracy = answer_loss(model, input_ids, labels, pixel_values, goal, goal_weight,
                                                        kind, kind_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1

            if step % log_every == 0 or step == total:   # reading the loss waits for the GPU: not every step
                entry = log_entry()
                bar.set_postfix(loss=f"{entry['loss']:.4f}", acc=f"{entry['answer_token_accuracy']:.3f}",
                                refresh=False)
            bar.update(1)
            if on_checkpoint is not None and time.perf_counter() - last_checkpoint >= checkpoint_seconds:
                on_checkpoint(model, log, state())
                last_checkpoint = time.perf_counter()
        else:
            log["stopped_by"] = "steps"
    finally:
        bar.close()
    if mean_loss is not None and (not log["history"] or log["history"][-1]["step"] != step):
        log_entry()      # stopped by time between two log entries
    final = state()
    log.update(final_loss=log["history"][-1]["loss"] if log["history"] else None)
    if on_clock and log["stopped_by"] != "stop_seconds":
        log["max_steps"] = step
    final["log"] = copy.deepcopy(log)
    model.eval()
    if on_checkpoint is not None:
        on_checkpoint(model, log, final)
    return log


def _cpu_copy(value):
    """A copy of nested dicts/lists of tensors, the tensors on the CPU (the optimizer's state is
    updated in place: a snapshot must not share its tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return value


class _Deterministic:
    """Deterministic kernels where PyTorch has them (warn elsewhere), restored on exit."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __enter__(self):
        if not self.enabled:
            self.previous = None
            return
        self.previous = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    def __exit__(self, *exc):
        if self.previous is None:
            return
        enabled, warn_only, benchmark = self.previous
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

def _tar_folder(folder: Path, tar_path: Path) -> Path:
    temp = tar_path.with_name(f".{tar_path.name}.tmp-{os.getpid()}")
    with tarfile.open(temp, "w") as tar:
        tar.add(folder, arcname=tar_path.name.removesuffix(".tar"))
    os.replace(temp, tar_path)
    return tar_path


def _folder_megabytes(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6, 3)


def _atomic_torch_save(content, path: Path) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(content, temp)
    os.replace(temp, path)


def episode_step(entry: dict) -> int:
    """The step of an annotation entry within its episode: its image is `.../front_rgb/<step>.png`."""
    stem = Path(entry.get("image", "")).stem
    if not stem.isdigit():
        raise ValueError(f"annotation entry {entry.get('id')!r}: expected its image at .../<step>.png "
                         f"(RLBench's layout), got {entry.get('image')!r}")
    return int(stem)


_EPISODE_FOLDER = re.compile(r"episode\d+")


def episode_variation(entry: dict, data_root, cache: dict | None = None) -> int:
    """The variation of an annotation entry's episode: its folder's `variation_number.pkl`
    (RLBench's layout: the image at `<episode folder>/front_rgb/<step>.png`, relative to
    `data_root`, as are takeover entries' `../takeover/...`). `cache` (a dict, episode folder ->
    variation, shared between calls) reads each episode's file once."""
    from llarva_gym.demos import load_variation_number

    image = Path(entry.get("image", ""))
    if not _EPISODE_FOLDER.fullmatch(image.parent.parent.name):
        raise ValueError(f"annotation entry {entry.get('id')!r}: expected its image at "
                         f".../episode<M>/front_rgb/<step>.png (RLBench's layout), got {entry.get('image')!r}")
    folder = os.path.normpath(Path(data_root) / image.parent.parent)
    if cache is not None and folder in cache:
        return cache[folder]
    variation = load_variation_number(folder)
    if cache is not None:
        cache[folder] = variation
    return variation


def sample_repeats(entries, data_root, early_steps: int = 5, early_weight: int = 1,
                   variation_weights: Sequence[int] | None = None, takeover_weight: int = 1) -> torch.Tensor | None:
    """How many times each sample is drawn per epoch (`train_model`'s `repeats`): `early_weight`
    for the first `early_steps` steps of an episode, times `variation_weights[v]` for a sample of
    variation v (`episode_variation`), times `takeover_weight` for a sample of a takeover set
    (`is_takeover_sample`); None when every sample would be drawn once."""
    if early_weight == 1 and variation_weights is None and takeover_weight == 1:
        return None
    repeats = torch.ones(len(entries), dtype=torch.long)
    if early_weight != 1:
        steps = torch.tensor([episode_step(entry) for entry in entries], dtype=torch.long)
        repeats = torch.where(steps < early_steps, early_weight, 1).long()
    if takeover_weight != 1:
        repeats = repeats * torch.tensor([takeover_weight if is_takeover_sample(e) else 1 for e in entries],
                                         dtype=torch.long)
    if variation_weights is not None:
        cache: dict = {}
        variations = [episode_variation(entry, data_root, cache) for entry in entries]
        unweighted = sorted({v for v in variations if not 0 <= v < len(variation_weights)})
        if unweighted:
            raise ValueError(f"variation_weights: {len(variation_weights)} weights (variations 0.."
                             f"{len(variation_weights) - 1}), but the demos hold variation(s) {unweighted}")
        repeats = repeats * torch.tensor([variation_weights[v] for v in variations], dtype=torch.long)
    return repeats


def is_takeover_sample(entry: dict) -> bool:
    """Whether an annotation entry comes from a takeover set: `_append_annotations` gives those
    images paths from the demos' folder up into `<out>/takeover*`."""
    parts = Path(entry.get("image", "")).parts
    return len(parts) > 1 and parts[0] == ".." and parts[1].startswith(TAKEOVER_DIR)


def _check_variation_weights(variation_weights, task: str, variation) -> tuple[int, ...] | None:
    """`variation_weights` as ints: one positive int per variation of `task`, and not with `variation`."""
    from llarva_gym.registration import TASKS

    if variation_weights is None:
        return None
    if variation is not None:
        raise ValueError(f"variation_weights: weights the samples of each variation, so it cannot go with "
                         f"variation={variation!r} (demos of that one variation only)")
    count = TASKS[task]
    weights = tuple(variation_weights) if isinstance(variation_weights, (list, tuple)) else None
    if (weights is None or len(weights) != count
            or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 1 for w in weights)):
        raise ValueError(f"variation_weights (--variation-weights): expected {count} positive ints, one per "
                         f"variation of {task} (e.g. 3,1 for a task of two), got {variation_weights!r}")
    return tuple(int(w) for w in weights)


def check_answer_weights(answer_weights) -> dict[str, float] | None:
    """`answer_weights` as {kind: float}, in `codec.ANSWER_KINDS`' order, without the kinds left at 1
    (None when none is left): a clear error for an unknown kind or a weight that is not a finite
    number >= 0, or for all of them 0."""
    if answer_weights is None:
        return None
    expected = (f"a mapping of kinds among {list(codec.ANSWER_KINDS)} to finite weights >= 0 "
                f"(e.g. {{'sign': 3, 'decimal4': 0.1}})")
    if not isinstance(answer_weights, dict):
        raise ValueError(f"answer_weights: expected {expected}, got {answer_weights!r}")
    for kind, weight in answer_weights.items():
        if kind not in codec.ANSWER_KINDS:
            raise ValueError(f"answer_weights: unknown kind {kind!r}; expected {expected}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"answer_weights: {kind}={weight!r}; expected {expected}")
    if all(answer_weights.get(kind, 1.0) == 0 for kind in codec.ANSWER_KINDS):
        raise ValueError(f"answer_weights: every kind weighs 0, so nothing would be learned; expected {expected}")
    weights = {kind: float(answer_weights[kind]) for kind in codec.ANSWER_KINDS
               if kind in answer_weights and answer_weights[kind] != 1}
    return weights or None


def _cached_training_set(cache: Path, annotations_path: Path, entries, data_root, tokenizer,
                         num_image_tokens: int, goal_points: str, kinds: bool, processes: int,
                         timings: dict) -> TrainingSet:
    """`build_training_set`, stored in `cache` and reused while the annotations file, the
    tokenizer, `goal_points` and `kinds` are the same (a resumed run on the same machine skips a minute
    of tokenizing). `timings` receives the seconds of each part."""
    clock = time.perf_counter()
    digest = hashlib.sha256(annotations_path.read_bytes())
    digest.update(json.dumps([num_image_tokens, goal_points, kinds, sorted(tokenizer.get_vocab().items()),
                              list(TrainingSet.__dataclass_fields__)]).encode())
    key = digest.hexdigest()
    if cache.is_file():
        try:
            stored = torch.load(cache, weights_only=True)
            if stored.get("key") == key:
                timings["cache_read"] = round(time.perf_counter() - clock, 2)
                return TrainingSet(*(stored[name] for name in TrainingSet.__dataclass_fields__))
        except Exception:    # a cache that cannot be read is rebuilt, not an error
            pass
    data = build_training_set(entries, data_root, tokenizer, num_image_tokens=num_image_tokens,
                              pad_token_id=tokenizer.pad_token_id, goal_points=goal_points, kinds=kinds,
                              processes=processes, timings=timings)
    clock = time.perf_counter()
    _atomic_torch_save({"key": key, **{name: getattr(data, name) for name in TrainingSet.__dataclass_fields__}},
                       cache)
    timings["cache_write"] = round(time.perf_counter() - clock, 2)
    return data


def driver_loader(checkpoint, visual_trace: bool | None = None, default_visual_trace: bool = False):
    """A picklable callable that loads `checkpoint` as a constrained `LlarvaPolicy`, for
    `record_demos(driver=...)` (each recording process loads its own). `visual_trace=None`: the
    checkpoint answers as it was trained (its llarva_train_small.json), else `default_visual_trace`."""
    from llarva_policy.policy import LlarvaPolicy, trained_with_visual_trace

    if visual_trace is None:
        visual_trace = (trained_with_visual_trace(checkpoint) if (Path(checkpoint) / TRAINING_FILE).is_file()
                        else default_visual_trace)
    return functools.partial(LlarvaPolicy.from_pretrained, str(checkpoint), constrained=True,
                             with_visual_trace=visual_trace)


def takeover_folder(out: Path, k: int) -> Path:
    """Where the takeover demos of the k-th driver go: `<out>/takeover`, `<out>/takeover1`, ..."""
    return Path(out) / (TAKEOVER_DIR if k == 0 else f"{TAKEOVER_DIR}{k}")


def is_driven_steps(driver) -> bool:
    """Whether a `driver` entry is a driven-starts file (`*.npz`) rather than a model folder."""
    return Path(driver).suffix == ".npz"


def next_dagger_drivers(model) -> list[str]:
    """The `driver` list of the DAgger round after the one that trained `model` (a train-small model
    folder): each of its takeover sets by the driven steps the folder carries, in the place it had,
    then `model` itself, which drives a new set. With `finetune_from=model` this is the next round
    of the chain in examples/train_small_log.md, needing no earlier model."""
    from llarva_gym.recording import DRIVEN_STARTS_FILE

    folder = Path(model)
    if not (folder / "config.json").is_file() or not (folder / TRAINING_FILE).is_file():
        raise FileNotFoundError(f"dagger_from: {folder} is not a train-small model folder (expected config.json and "
                                f"{TRAINING_FILE}, as in <out>/model or models/reach_target_variation0)")
    earlier = json.loads((folder / TRAINING_FILE).read_text()).get("options", {}).get("driver") or []
    earlier = [earlier] if isinstance(earlier, str) else earlier       # one driver is recorded as given
    files = [folder / f"{takeover_folder('', k).name}_{DRIVEN_STARTS_FILE}" for k in range(len(earlier))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"dagger_from: {folder} was trained on {len(earlier)} takeover set(s) but lacks the "
                                f"driven steps of {missing}; give the drivers with --driver instead")
    return [str(f) for f in files] + [str(folder)]


def _replayed_driver(path: str, name: str):
    """The `make_driver` of a takeover set given by its driven steps alone: called only where they
    do not cover the attempts this run needs."""
    raise ValueError(f"driver: {path} holds {name}'s driven steps, not a model, and this run needs attempts they do "
                     f"not cover (or they were recorded with other settings: a warning above names them; the k-th "
                     f"driver's seed is demo_seed + 1 + k, so give the drivers in the order they were first given); "
                     f"give {name}'s model folder instead")


def _record_takeover(task, root: Path, driver, episodes: int, steps: int, *, demo_seed: int, variation,
                     render_quality: str, action_noise: float, processes: int, num_envs: int | None, seed: int,
                     visual_trace: bool, trace_points: int, history_noise: float, progress: bool) -> dict:
    """Expert-takeover demos driven by `driver` into `root`, and their annotation entries.
    `num_envs`: drive them that many at a time in this process (batched; on the GPU if there is
    one), else (None) in each recording process. A `driver` that is a driven-starts file replays
    its attempts (copied to where `record_demos` looks) under the driver name it was saved with."""
    from llarva_gym.recording import driven_starts_path, driven_starts_settings, record_demos
    from llarva_policy.annotations import annotate

    if is_driven_steps(driver):
        name = driven_starts_settings(driver)["driver"]
        saved = driven_starts_path(root, task)
        if not saved.is_file():
            saved.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(driver, saved)
        make_driver = functools.partial(_replayed_driver, str(driver), name)
        num_envs = num_envs or 1     # batched: only the main process would make the driver, and only if needed
    else:
        name, make_driver = str(Path(driver).resolve()), driver_loader(driver, default_visual_trace=visual_trace)
    with _decoder_not_compiled():     # the recording processes inherit it
        recorded = record_demos(task, episodes, root, image_size=IMAGE_SIZE, cameras=("front",), processes=processes,
                                seed=demo_seed, variation=variation, render_quality=render_quality,
                                action_noise=action_noise, driver=make_driver, driver_steps=steps,
                                driver_name=name, driver_num_envs=num_envs, progress=progress)
    annotations = root.with_name(f"{root.name}_annotations.json")
    annotate(root, annotations, task, seed=seed, visual_trace=visual_trace, trace_points=trace_points,
             history_noise=history_noise, processes=processes, progress=progress)
    return {"episodes": recorded["episodes"], "seconds": recorded["seconds"], "failures": len(recorded["failures"]),
            "driving_seconds": recorded.get("driving_seconds"), "replayed": recorded.get("replayed_from_file", 0),
            "annotations": load_annotations(annotations, root)}


def _append_annotations(path: Path, root: Path, extra: list[dict], extra_root: Path) -> None:
    """Add `extra` (image paths relative to `extra_root`) to the annotation file at `path` (relative
    to `root`), with ids after its own: one file, so everything after it is unchanged."""
    entries = json.loads(path.read_text())
    next_id = max(entry["id"] for entry in entries) + 1
    entries += [{**entry, "id": next_id + i, "image": os.path.relpath(extra_root / entry["image"], root)}
                for i, entry in enumerate(extra)]
    write_json_atomic(path, entries)


PAUSE_MARGIN_SECONDS = 15.0   # a paused sitting's last checkpoint: the state with the optimizer, the export


def sitting_seconds(run_left: float, eval_reserve: float, remaining: float | None, *, evaluates: bool) -> float:
    """How long this call's training may run, `run_left` being what the run's budget leaves now and
    `remaining` the training seconds still to do (None: not known on the clock). The evaluation's
    reserve is kept only where the training may finish in this call; a sitting that pauses anyway
    trains to the budget's end, less a margin for saving its state (a reserve there was device time
    lost in every call of a training that spans several)."""
    if evaluates and (remaining is None or remaining < run_left):
        return max(10.0, run_left - eval_reserve)
    return max(10.0, run_left - min(eval_reserve, PAUSE_MARGIN_SECONDS))


def train_small(task: str, out, *, demos: int = 100, size: str = "small", demo_seed: int = 0, seed: int = 0,
                variation: int | None = None, processes: int = 1, train_seconds: float | None = 300.0, run_seconds: float | None = None,
                eval_reserve_seconds: float = 150.0, max_steps: int | None = None, batch_size: int = 128,
                lr: float = 1e-3, warmup_steps: int = 200, weight_decay: float = 0.01,
                checkpoint_seconds: float = 60.0, eval_episodes: int = 25, eval_num_envs: int = 8,
                eval_seed: int = 0, eval_episode_length: int | None = None, expert_baseline: bool = True,
                visual_trace: bool = False, trace_points: int = 10, history_noise: float = 0.0,
                goal_weight: float = 1.0, goal_points: str = "last", action_noise: float = 0.0, early_steps: int = 5, early_weight: int = 1,
                takeover_weight: int = 1, answer_weights: dict[str, float] | None = None,
                variation_weights: Sequence[int] | None = None,
                compile: bool = False, deterministic: bool = True, render_quality: str = "fast", device=None,
                driver=None, takeover_demos: int = 0, takeover_steps: int = 30, takeover_num_envs: int | None = None,
                init_from=None, finetune_from=None, export=None, isolate_evaluation: bool | None = None,
                progress: bool = True) -> dict:
    """Record demos, annotate, train a small LLaVA from scratch, evaluate it and the expert; returns the summary.

    See the module docstring for the steps and what `out` and `export` receive. Training stops
    after `max_steps` or `train_seconds` of training. `run_seconds` is a budget for this call (a
    device call has 10 minutes): training stops early enough to leave `eval_reserve_seconds` where
    it may finish in this call (`sitting_seconds`), and if it has not finished, the call ends there,
    leaving `training_state.pt` in `out`.
    `train_seconds=None` (needs `run_seconds`): the training takes what this call leaves and
    finishes in it (the cosine schedule ends with it); with `max_steps` as well, it runs all
    `max_steps` steps, and a call that runs out first leaves it unfinished, to continue.
    Rerunning into the same `out` continues the demos, continues an unfinished training (same
    options) where it stopped, keeps a finished model and continues the evaluations.
    `init_from`: an unfinished model folder of the same command (a call's returned checkpoint),
    continued where no `training_state.pt` is (a fresh machine): `weights_only_resume`. A DAgger
    round's checkpoint also holds its takeover sets' driven steps (`takeover*_driven_starts.npz`),
    which such a call replays instead of driving the attempts again.
    `finetune_from`: a finished model folder of this task and `size` whose tokenizer is the one this
    run builds (the same demos first): the training starts from its weights with a fresh optimizer
    and a schedule of its own (`train_seconds`, warm-up and all), on this run's data. With the
    earlier model as `driver`, that is a DAgger round that goes on from the model it improves,
    instead of a new one from scratch; its identity (a hash of its weights) is among the options.
    `eval_episodes=0` skips both evaluations (run `llarva eval` on the model folder later).

    `visual_trace`: the answers also hold the end effector's future path in the image
    (`trace_points` points), LLARVA's visual trace, written before the action; `history_noise`:
    sigma (radians) of the noise on the joint history in the training text, as LLARVA's 0.01;
    `goal_weight`: the loss weight of the trace's goal (`goal_span`), 1 = plain mean; `goal_points`:
    which points are the goal, "last" or "future" (all but the first: see `goal_span`);
    `answer_weights`: {kind: weight >= 0} for kinds of `codec.ANSWER_KINDS`, the others 1: the
    loss weight of the answer tokens that write that kind (e.g. a joint velocity's sign, its
    third decimal), times `goal_weight`; the text stays LLARVA's, only what the loss counts changes;
    `action_noise`: DART's noise injection in the demos (`record_demos`); `variation`: demos and
    evaluation episodes of that one variation only (a diagnostic: the instruction then says
    nothing the image does not);
    `early_weight`: the first `early_steps` steps of every episode are drawn `early_weight` times
    per epoch (an episode's first steps are where the image alone says where to go: the history
    still holds the start pose); `variation_weights` (one positive int per variation of the task):
    every sample of variation v is drawn `variation_weights[v]` times per epoch (times
    `early_weight` for an early step). Where only the instruction and the image together say where
    to go (sweep_to_dustpan_of_size: the side is the size word XOR the side the tall dustpan is
    on), even draws leave each alone useless and a model trained from scratch learns neither;
    uneven ones let the image predict the side most of the time, and the word then learns to flip it;
    `compile`: `torch.compile` the model (`train_model`);
    `deterministic`: PyTorch's deterministic kernels (off: faster on CUDA, runs agree less closely);
    `render_quality`: the env's rendering for the demos and the evaluation ("high": shadows);
    `takeover_weight`: every sample of the takeover sets is drawn that many times per epoch (times
    the other weights): a few hundred takeover demos are otherwise a few percent of the samples.
    `driver`, `takeover_demos`, `takeover_steps`: a DAgger round. `driver` (an earlier round's
    model folder) drives the first 1..`takeover_steps` steps of `takeover_demos` more episodes
    (demo seed `demo_seed + 1`, in `<out>/takeover`), the expert finishes each from where it finds
    the arm (`record_demos(driver=...)`), and the model is trained from scratch on both sets.
    A list of model folders (the earlier rounds', oldest first) aggregates them, as DAgger does:
    the k-th drives `takeover_demos` episodes of demo seed `demo_seed + 1 + k` into
    `<out>/takeover` (k = 0), `<out>/takeover1`, ...; so a round that adds the last model to the
    list, into the same `out`, reuses the takeover demos of the ones before. An entry may also be
    a driven-starts file (`*.npz`: a checkpoint's `takeover*_driven_starts.npz`) in the place its
    driver had: its takeover set is replayed without the driver model (the expert still finishes
    each episode), so a later round needs only the last model: `next_dagger_drivers(model)` is the
    list for the round after `model`'s (`llarva train-small --dagger-from`). `takeover_num_envs`:
    how many takeover episodes the driver drives at a time, batched in this process (None: 32 on
    CUDA, where one batched answer costs about what one costs; 0: in each recording process, one
    answer at a time);
    `isolate_evaluation`: run each evaluation in a fresh process (default: when this process has
    started CUDA; see the evaluation step).
    """
    from llarva_gym.recording import DRIVEN_STARTS_FILE, driven_starts_path, driven_starts_settings, record_demos
    from llarva_gym.registration import resolve_task
    from llarva_policy.annotations import annotate

    started = time.perf_counter()
    # cuBLAS is deterministic only with this workspace setting, read when CUDA starts (not yet, here).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    task = resolve_task(task)
    if size not in SHAPES:
        raise ValueError(f"size: expected one of {sorted(SHAPES)}, got {size!r}")
    for name, value in (("demos", demos), ("batch_size", batch_size), ("eval_num_envs", eval_num_envs),
                        ("processes", processes), ("trace_points", trace_points)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps: expected None (fill train_seconds) or an int >= 1, got {max_steps!r}")
    if isinstance(eval_episodes, bool) or not isinstance(eval_episodes, int) or eval_episodes < 0:
        raise ValueError(f"eval_episodes: expected an int >= 0 (0: no evaluation), got {eval_episodes!r}")
    if render_quality not in ("fast", "high"):
        raise ValueError(f"render_quality: expected 'fast' or 'high', got {render_quality!r}")
    if visual_trace is False and goal_weight != 1.0:
        raise ValueError(f"goal_weight: weights points of the visual trace, so it needs visual_trace=True "
                         f"(got goal_weight={goal_weight!r} without a trace)")
    if not (isinstance(goal_weight, (int, float)) and math.isfinite(goal_weight) and goal_weight > 0):
        raise ValueError(f"goal_weight: expected a finite number > 0 (1: plain mean), got {goal_weight!r}")
    if goal_points not in GOAL_POINTS:
        raise ValueError(f"goal_points: expected one of {GOAL_POINTS}, got {goal_points!r}")
    for name, value in (("early_steps", early_steps), ("early_weight", early_weight),
                        ("takeover_weight", takeover_weight)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    variation_weights = _check_variation_weights(variation_weights, task, variation)
    answer_weights = check_answer_weights(answer_weights)
    if isinstance(takeover_demos, bool) or not isinstance(takeover_demos, int) or takeover_demos < 0:
        raise ValueError(f"takeover_demos: expected an int >= 0 (0: no takeover demos), got {takeover_demos!r}")
    drivers = [] if driver is None else [driver] if isinstance(driver, (str, os.PathLike)) else list(driver)
    if bool(drivers) != (takeover_demos > 0):
        raise ValueError(f"driver and takeover_demos go together: the model(s) that drive the takeover demos and how "
                         f"many to record (got driver={driver!r}, takeover_demos={takeover_demos!r})")
    for folder in drivers:
        if isinstance(folder, (str, os.PathLike)) and is_driven_steps(folder) and Path(folder).is_file():
            driven_starts_settings(folder)["driver"]        # a readable file that names its driver
        elif not (isinstance(folder, (str, os.PathLike)) and (Path(folder) / "config.json").is_file()):
            raise FileNotFoundError(f"driver: {folder} is not a model folder (no config.json) nor a driven-starts "
                                    f"file (.npz); expected an earlier round's <out>/model, or the driven steps its "
                                    f"takeover set was recorded from (a checkpoint's takeover*_{DRIVEN_STARTS_FILE})")
    if takeover_num_envs is not None and (isinstance(takeover_num_envs, bool) or not isinstance(takeover_num_envs, int)
                                          or takeover_num_envs < 0):
        raise ValueError(f"takeover_num_envs: expected None (32 on CUDA, else 0), 0 (drive in the recording "
                         f"processes) or an int >= 1, got {takeover_num_envs!r}")
    if train_seconds is None and run_seconds is None:
        raise ValueError("train_seconds=None (train for what this run leaves) needs run_seconds, the run's budget")
    if train_seconds is not None and not train_seconds > 0:
        raise ValueError(f"train_seconds: expected a number > 0 or None, got {train_seconds!r}")
    out = Path(out).expanduser().resolve()
    export = Path(export).expanduser().resolve() if export is not None else None
    device = resolve_device(device)
    data_root, annotations_path, model_dir = out / "data", out / "annotations.json", out / MODEL_DIR
    # What the trained model depends on (a finished model trained with other options is not reused).
    # (`run_seconds` is not among them: it says where this run stops, a rerun continues the training.)
    options = {"task": task, "demos": demos, "size": size, "demo_seed": demo_seed, "seed": seed,
               "train_seconds": train_seconds, "max_steps": max_steps,
               "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "weight_decay": weight_decay,
               "visual_trace": bool(visual_trace), "trace_points": trace_points if visual_trace else None,
               "history_noise": history_noise, "render_quality": render_quality}
    # Options added later, recorded only when used: a model trained before they existed still matches.
    options.update({k: v for k, v in (("goal_weight", goal_weight), ("action_noise", action_noise)) if v})
    if variation is not None:
        options["variation"] = variation
    if goal_weight == 1.0:
        options.pop("goal_weight", None)
    elif goal_points != "last":
        options["goal_points"] = goal_points
    if early_weight != 1:
        options.update(early_steps=early_steps, early_weight=early_weight)
    if takeover_weight != 1:
        if not drivers:
            raise ValueError(f"takeover_weight: weights the takeover demos, so it needs a driver and takeover_demos "
                             f"(got takeover_weight={takeover_weight!r} without them)")
        options["takeover_weight"] = takeover_weight
    if variation_weights is not None:
        options["variation_weights"] = list(variation_weights)   # a list: compared with the JSON record
    if answer_weights:
        options["answer_weights"] = answer_weights
    if drivers:   # one driver: a str, as rounds before driver lists recorded it
        options.update(driver=str(drivers[0]) if len(drivers) == 1 else [str(d) for d in drivers],
                       takeover_demos=takeover_demos, takeover_steps=takeover_steps)
    options.update({k: v for k, v in (("compile", compile), ("deterministic", deterministic)) if v != (k == "deterministic")})
    summary = {"task": task, "options": options,
               "evaluation": {"episodes": eval_episodes, "seed": eval_seed, "episode_length": eval_episode_length,
                              "num_envs": eval_num_envs, "render_quality": render_quality,
                              "decoding": "greedy, constrained" + (", visual trace" if visual_trace else "")},
               "device": str(device), "torch": torch.__version__, "stages": {}}

    def save_summary():
        summary["seconds"] = round(time.perf_counter() - started, 2)
        write_json_atomic(out / SUMMARY_FILE, summary)
        if export is not None:
            write_json_atomic(export / f"train_small_{task}.json", summary)

    def stage(name: str, **facts):
        summary["stages"][name] = {**facts, "at_seconds": round(time.perf_counter() - started, 2)}
        save_summary()
        if progress:
            tqdm.write(f"train-small {task}: {name} {json.dumps(facts, default=str)[:300]}")

    if init_from is not None:
        _training_info(init_from)    # a wrong path fails now, not after minutes of demos
    if finetune_from is not None:    # likewise
        options["finetune_from"] = finetune_base_id(finetune_from, task, size)
    # 1-2. demos and annotations
    recorded = record_demos(task, demos, data_root, image_size=IMAGE_SIZE, cameras=("front",), processes=processes,
                            seed=demo_seed, variation=variation, render_quality=render_quality, action_noise=action_noise,
                            progress=progress)
    stage("demos", episodes=recorded["episodes"], seconds=recorded["seconds"], failures=len(recorded["failures"]))
    clock = time.perf_counter()
    annotate(data_root, annotations_path, task, seed=seed, visual_trace=visual_trace, trace_points=trace_points,
             history_noise=history_noise, processes=processes, progress=progress)
    annotate_seconds = round(time.perf_counter() - clock, 2)
    if takeover_num_envs is None:
        takeover_num_envs = 32 if device.type == "cuda" else 0
    # The takeover sets' driven steps travel in the checkpoint: a call continuing it on a fresh
    # machine (`init_from`) replays them instead of driving the attempts again (`record_demos`).
    driven_starts = {}
    for k, folder in enumerate(drivers):
        root = takeover_folder(out, k)
        saved = driven_starts_path(root, task)
        carried = None if init_from is None else Path(init_from) / f"{root.name}_{DRIVEN_STARTS_FILE}"
        if carried is not None and carried.is_file() and not saved.is_file():
            saved.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(carried, saved)
        takeover = _record_takeover(task, root, folder, takeover_demos, takeover_steps, demo_seed=demo_seed + 1 + k,
                                    variation=variation, render_quality=render_quality, action_noise=action_noise,
                                    processes=processes, num_envs=takeover_num_envs or None, seed=seed,
                                    visual_trace=visual_trace, trace_points=trace_points,
                                    history_noise=history_noise, progress=progress)
        _append_annotations(annotations_path, data_root, takeover["annotations"], root)
        if saved.is_file():
            driven_starts[f"{root.name}_{DRIVEN_STARTS_FILE}"] = saved
        stage(root.name, driver=str(folder), episodes=takeover["episodes"], seconds=takeover["seconds"],
              driving_seconds=takeover["driving_seconds"], replayed=takeover["replayed"], failures=takeover["failures"],
              samples=len(takeover["annotations"]), driven_at_a_time=takeover_num_envs)
    entries = load_annotations(annotations_path, data_root)
    stage("annotations", samples=len(entries), annotate_seconds=annotate_seconds)

    # 3-5. tokenizer, model, training (skipped if a finished model trained with these options is there)
    finished = model_dir / TRAINING_FILE
    previous = json.loads(finished.read_text()) if finished.is_file() else {}
    if previous.get("finished") and previous.get("options") == options:
        summary["training"] = previous["training"]
        stage("training", reused=str(model_dir))
    else:
        # Seconds of each part of this stage, in the summary: it is a quarter of a device call.
        timings, clock = {}, time.perf_counter()
        # From the demos' conversations alone: every DAgger round after this one builds the same tokenizer,
        # which going on from this model's weights needs (the takeover sets come after the demos').
        corpus = [entry for entry in entries if not is_takeover_sample(entry)][:TOKENIZER_CORPUS]
        texts = [codec.build_conversation_text(*conversation_turns(e)) for e in corpus]
        tokenizer = build_tokenizer(corpus_texts=texts)
        model, processor = build_model(tokenizer, size, seed)
        num_image_tokens = model.config.image_seq_length
        timings["tokenizer_and_model"] = round(time.perf_counter() - clock, 2)
        # Tokenizing in worker processes pays only on many cores (benchmarks/results/tokenize_speed_*.json:
        # 0.7 times one process's speed with 2 on a 2-core machine; 1.25 and 1.42 times with 8 and 14 on
        # the GPU host, measured before the workers' chunks came back as whole arrays, which cut the
        # caller's share by three quarters on the CPU).
        data = _cached_training_set(out / DATA_CACHE_FILE, annotations_path, entries, data_root, tokenizer,
                                    num_image_tokens, goal_points, bool(answer_weights),
                                    processes if processes >= 8 else 1, timings)
        clock = time.perf_counter()
        normalize = ImageNormalizer(processor.image_processor, device)
        normalize.check(processor.image_processor, data.images[:4])
        parameters = sum(p.numel() for p in model.parameters())
        summary["model"] = {"size": size, "parameters": parameters, "vocab_size": len(tokenizer),
                            "image_tokens": num_image_tokens, "vision": SHAPES[size][0], "text": SHAPES[size][1],
                            "tokens_per_sample_mean": round(float(data.lengths.float().mean()), 1),
                            "tokens_per_sample_max": int(data.lengths.max())}
        repeats = sample_repeats(entries, data_root, early_steps, early_weight, variation_weights, takeover_weight)
        # A run stopped by its budget left its state: continue it if it was trained with these options.
        state_path = out / STATE_FILE
        resume = torch.load(state_path, weights_only=True) if state_path.is_file() else None
        if resume is not None and resume.pop("options", None) != options:
            resume = None
        resumed_from = "state" if resume is not None else None
        if resume is None and init_from is not None:
            resume, resumed_from = weights_only_resume(init_from, options, tokenizer), "weights"
        if resume is None and finetune_from is not None:
            load_finetune_base(model, finetune_from, tokenizer)
            resumed_from = "finetune_from"
        # CUDA starts here, after the demo workers (which render with EGL) are done.
        summary["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        timings["rest"] = round(time.perf_counter() - clock, 2)
        stage("data", samples=len(data), device=str(device), parameters=parameters,
              resumed_at_step=resume["step"] if resume else None, resumed_from=resumed_from, seconds=timings)

        def on_checkpoint(model, log, state):
            info = {"options": options, "finished": log["stopped_by"] in ("time", "steps"), "training": log}
            save_checkpoint(model, processor, model_dir, info, extra_files=driven_starts)
            if info["finished"]:
                state_path.unlink(missing_ok=True)
            else:
                _atomic_torch_save({**state, "options": options}, state_path)
            summary["training"] = log
            summary["model"]["megabytes"] = _folder_megabytes(model_dir)
            if export is not None:
                _tar_folder(model_dir, export / f"train_small_{task}_model.tar")
            save_summary()

        stop_seconds = None
        if run_seconds is not None:
            # With a step count as well the clock may not be what ends the training: keep the reserve.
            remaining = (None if train_seconds is None or max_steps is not None
                         else train_seconds - (resume["seconds"] if resume else 0.0))
            stop_seconds = sitting_seconds(run_seconds - (time.perf_counter() - started), eval_reserve_seconds,
                                           remaining, evaluates=eval_episodes > 0)
        budget = train_seconds
        if budget is None and max_steps is not None:
            # A step schedule (a repeat of an earlier run) must run to its last step: cut on the
            # clock, its learning rate would never have decayed. The run's budget only pauses it.
            budget = math.inf
        elif budget is None:     # what this run leaves, and finish in it
            budget, stop_seconds = stop_seconds + (resume["seconds"] if resume else 0.0), None
        data = data.to(device)
        with _Deterministic(enabled=deterministic):
            log = train_model(model, data, normalize, device=device, batch_size=batch_size, lr=lr,
                              warmup_steps=warmup_steps, weight_decay=weight_decay, max_steps=max_steps,
                              train_seconds=budget, stop_seconds=stop_seconds, seed=seed,
                              checkpoint_seconds=checkpoint_seconds, on_checkpoint=on_checkpoint,
                              goal_weight=goal_weight, answer_weights=answer_weights, repeats=repeats,
                              compile=compile, resume=resume,
                              progress=progress)
        del model, data, resume
        if device.type == "cuda":
            torch.cuda.empty_cache()
        stage("training", steps=log["steps"], epochs=log["epochs"], seconds=log["seconds"],
              final_loss=log["final_loss"], stopped_by=log["stopped_by"], sittings=log["sittings"])
        if log["stopped_by"] == "stop_seconds":
            # Not finished: no evaluation of a half-trained model; the next run into `out` continues.
            save_summary()
            if progress:
                print(format_summary(summary))
            return summary

    if eval_episodes == 0:
        save_summary()
        if progress:
            print(format_summary(summary))
        return summary

    # 6. evaluation: the trained policy, then the scripted expert on the same episodes. The env
    # workers are forked; a process forked after CUDA has started cannot make an EGL context, so
    # once this process has used CUDA, each evaluation runs in a fresh process, and the policy is
    # loaded there only after the workers exist (LazyPolicy).
    eval_dir = out / "eval"
    isolate = torch.cuda.is_initialized() if isolate_evaluation is None else isolate_evaluation
    common = dict(task=task, episodes=eval_episodes, episode_length=eval_episode_length, num_envs=eval_num_envs,
                  seed=eval_seed, render_quality=render_quality, variation=variation, progress=progress)
    results_path = (export or eval_dir) / f"train_small_{task}_eval.json"
    # Videos need ffmpeg (imageio-ffmpeg); a machine without it (the lent GPU host) skips them and
    # a rollout video is made afterwards with `llarva eval --video`.
    can_write_video = importlib.util.find_spec("imageio_ffmpeg") is not None
    results = _run(_evaluate, isolate, checkpoint=str(model_dir), device=str(device), name=f"train-small:{task}",
                   visual_trace=visual_trace,
                   video_dir=str(eval_dir / "videos") if can_write_video else None,
                   results_path=str(results_path), **common)
    summary["eval"] = {**results["summary"], "parse_errors": sum(r["parse_errors"] for r in results["episodes"]),
                       "results": str(results_path)}
    videos = [r for r in results["episodes"] if r.get("video")]
    if export is not None and videos:
        shown = next((r for r in videos if r["success"]), videos[0])
        shutil.copyfile(shown["video"], export / f"train_small_{task}_rollout.mp4")
        summary["eval"]["video_shown"] = {"index": shown["index"], "success": shown["success"]}
    stage("eval", **results["summary"])
    if expert_baseline:
        expert_path = (export or eval_dir) / f"train_small_{task}_expert.json"
        expert = _run(_evaluate, isolate, checkpoint=None, results_path=str(expert_path), **common)
        summary["expert"] = {**expert["summary"], "results": str(expert_path)}
        stage("expert", **expert["summary"])
    save_summary()
    if progress:
        print(format_summary(summary))
    return summary



ROUNDS_DIR = "rounds"          # in `out`: each finished round of a DAgger chain, round<k>/
ROUNDS_FILE = "rounds.json"    # in `out`/rounds: the chain's options and what each round did
# A round drives its takeover attempts and tokenizes its data before it trains, 1-2 minutes on the
# H200 (rounds 23-25), which a call's budget does not stop: with less left, a call ends before it.
ROUND_START_SECONDS = 120.0
# Arguments that say where and how fast a chain runs, not what it trains: a rerun may change them.
_CHAIN_RUN_ONLY = ("processes", "progress", "device", "export", "run_seconds", "eval_reserve_seconds",
                   "checkpoint_seconds", "eval_episodes", "eval_num_envs", "eval_seed", "eval_episode_length",
                   "expert_baseline", "isolate_evaluation", "takeover_num_envs")


def dagger_round(model) -> int:
    """The DAgger round a train-small model folder is: the number of takeover sets it was trained
    on (0: demos alone). The shipped reach_target model is round 6."""
    drivers = _training_info(model, "dagger_from").get("options", {}).get("driver") or []
    return 1 if isinstance(drivers, str) else len(drivers)


def train_dagger_rounds(task: str, out, *, rounds: int, round_seconds: float = 210.0, round_lr: float = 3e-4,
                        dagger_from=None, run_seconds: float | None = None, export=None, eval_episodes: int = 25,
                        isolate_rounds: bool | None = None, progress: bool = True, **options) -> dict:
    """A training and the DAgger rounds after it, up to round `rounds`, as one run a rerun continues.

    Round 0 is `train_small(task, out, **options)` from random weights. Round k (1..`rounds`) is
    the round after round k-1, as `llarva train-small --dagger-from` runs it: round k-1 drives
    `takeover_demos` more episodes (demo seed `demo_seed` + k), every earlier round's set is
    replayed in its place, and the training goes on from round k-1's weights for `round_seconds`
    at `round_lr` (`train_seconds`, `lr` and `max_steps` in `options` are round 0's). The shipped
    reach_target model is round 6 of such a chain (examples/train_small_log.md, rounds 18-25).

    Each finished round is copied to `<out>/rounds/round<k>` (with its sets' driven steps) and
    recorded in `<out>/rounds/rounds.json`. A rerun into the same `out` with the same options
    starts after the last round kept (a larger `rounds` extends the chain); `dagger_from`, a
    finished round's folder (`rounds/round<k>` carried to a fresh machine), starts after that
    round instead. `run_seconds` is the budget of this call, shared by its rounds: a round it cuts
    short is continued by the rerun, as `train_small` continues a training, and no round after the
    call's first starts with less than `ROUND_START_SECONDS` left. Only the last round is
    evaluated. `export` receives `train_small`'s files and, as each round is kept, that round as
    `train_small_<task>_round<k>_model.tar` (the one before is then removed from `export`, not
    from `out`: a device call returns at most 8 files). Returns the last round's summary with
    `rounds`, the record of every round kept. `isolate_rounds`: run each round in a fresh process
    (default: on CUDA).
    """
    from llarva_gym.registration import resolve_task

    started = time.perf_counter()
    task = resolve_task(task)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds: expected an int >= 1 (the DAgger rounds after the first training), got {rounds!r}")
    for name, value in (("round_seconds", round_seconds), ("round_lr", round_lr)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    for name in ("driver", "finetune_from"):
        if options.get(name) is not None:
            raise ValueError(f"{name}: the rounds of a chain set their drivers and weights themselves; to start "
                             f"after a finished round, give it as dagger_from")
    if options.get("init_from") is not None:
        raise ValueError("init_from: a chain continues a paused round from the state in out; on a fresh machine it "
                         "starts again the round after the last one kept, given as dagger_from")
    if "train_seconds" in options and options["train_seconds"] is None:
        raise ValueError("train_seconds: expected round 0's seconds; None (train for what the call leaves) would "
                         "leave nothing for the rounds after it")
    takeover = {name: options.pop(name) for name in ("takeover_demos", "takeover_weight") if name in options}
    if isinstance(takeover.get("takeover_demos"), bool) or not (isinstance(takeover.get("takeover_demos"), int)
                                                               and takeover["takeover_demos"] >= 1):
        raise ValueError(f"takeover_demos: expected an int >= 1, the episodes each round's model drives, got "
                         f"{takeover.get('takeover_demos')!r}")
    out = Path(out).expanduser().resolve()
    export = Path(export).expanduser().resolve() if export is not None else None
    chain_dir, record_path = out / ROUNDS_DIR, out / ROUNDS_DIR / ROUNDS_FILE
    # train_small's defaults filled in: the same chain asked from Python and from the CLI compares equal.
    defaults = {name: parameter.default for name, parameter in inspect.signature(train_small).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    recipe = {**defaults, "task": task, "round_seconds": round_seconds, "round_lr": round_lr, **options, **takeover}
    recipe = json.loads(json.dumps({k: v for k, v in recipe.items() if k not in _CHAIN_RUN_ONLY}, default=str))
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"options": recipe, "rounds": []}
    if record["options"] != recipe:
        differ = sorted(k for k in set(record["options"]) | set(recipe) if record["options"].get(k) != recipe.get(k))
        raise ValueError(f"out: {out} holds the rounds of a chain with other options ({', '.join(differ)}); "
                         f"give another out, or the same options")
    done = {entry["round"]: entry for entry in record["rounds"]}
    if max(done, default=0) > rounds:
        raise ValueError(f"rounds: {out} holds round {max(done)} already; expected rounds >= {max(done)}")

    # Where to start: after the last round kept here, or after dagger_from's round if that is later.
    first = max(done) + 1 if done else 0
    previous = chain_dir / f"round{first - 1}" if done else None
    if dagger_from is not None:
        start = dagger_round(dagger_from)
        if start >= rounds:
            raise ValueError(f"dagger_from: {dagger_from} is round {start}; rounds={rounds} asks for none after it")
        if start + 1 > first:
            first, previous = start + 1, Path(dagger_from).resolve()
    if first > rounds:     # every round kept: rerun the last (its model is reused) to finish its evaluation
        first, previous = rounds, done[rounds]["from"] and Path(done[rounds]["from"])

    # A round records its takeover demos in forked workers that render with EGL, which a process that
    # has started CUDA cannot do: on CUDA each round runs in a fresh process, as each ran by hand before.
    if isolate_rounds is None:
        isolate_rounds = resolve_device(options.get("device")).type == "cuda"
    summary = {}
    for k in range(first, rounds + 1):
        call = dict(options)
        if k > 0:
            call.update(takeover, driver=next_dagger_drivers(previous), finetune_from=str(previous),
                        train_seconds=round_seconds, lr=round_lr, max_steps=None)
        left = None if run_seconds is None else run_seconds - (time.perf_counter() - started)
        if left is not None and (left <= 0 or (k > first and left < ROUND_START_SECONDS)):
            break           # too little of this call's budget to reach this round's training: the rerun starts it
        summary = _run(train_small, isolate_rounds, task=task, out=out, run_seconds=left, export=export,
                       progress=progress, eval_episodes=eval_episodes if k == rounds else 0, **call)
        if summary["training"]["stopped_by"] == "stop_seconds":
            break           # paused by this call's budget: the rerun continues this round
        kept = chain_dir / f"round{k}"
        if k not in done:
            temp = chain_dir / f".round{k}.tmp-{os.getpid()}"
            shutil.rmtree(temp, ignore_errors=True)
            shutil.copytree(out / MODEL_DIR, temp)
            shutil.rmtree(kept, ignore_errors=True)     # a copy left unrecorded by an interrupted run
            os.replace(temp, kept)
            training = summary["training"]
            done[k] = {"round": k, "from": str(previous) if previous else None, "folder": str(kept),
                       "samples": training["samples"], "steps": training["steps"], "seconds": training["seconds"],
                       "final_loss": training.get("final_loss")}
            record["rounds"] = [done[j] for j in sorted(done)]
            write_json_atomic(record_path, record)
            if export is not None:
                _tar_folder(kept, export / f"train_small_{task}_round{k}_model.tar")
                (export / f"train_small_{task}_round{k - 1}_model.tar").unlink(missing_ok=True)
        previous = kept
    if progress:
        for entry in record["rounds"]:
            print(f"  round {entry['round']:<3} {entry['samples']} samples, {entry['steps']} steps in "
                  f"{entry['seconds']} s, final loss {entry['final_loss']}: {entry['folder']}")
    return {**summary, "rounds": record["rounds"]}


class LazyPolicy:
    """A `LlarvaPolicy` (constrained decoding) loaded at its first `predict`, so that `evaluate`
    forks its env workers before this process starts CUDA."""

    def __init__(self, checkpoint, device=None, name: str | None = None, visual_trace: bool = False):
        self.checkpoint, self.device, self.name, self.visual_trace = checkpoint, device, name, visual_trace
        self.policy = None

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        if self.policy is None:
            from llarva_policy.policy import LlarvaPolicy
            self.policy = LlarvaPolicy.from_pretrained(self.checkpoint, device=self.device, constrained=True,
                                                       with_visual_trace=self.visual_trace)
        return self.policy.predict(observation, state=state, episode_start=episode_start, deterministic=deterministic)

    @property
    def last_info(self) -> list[dict]:
        return self.policy.last_info if self.policy is not None else []


def _evaluate(checkpoint, task, *, device=None, name=None, visual_trace: bool = False, **options) -> dict:
    """`evaluate` for a checkpoint (LazyPolicy) or, with `checkpoint=None`, the scripted expert,
    the fast decoder not compiled (`_decoder_not_compiled`)."""
    from llarva_gym.evaluation import evaluate

    policy = "expert" if checkpoint is None else LazyPolicy(checkpoint, device, name, visual_trace)
    with _decoder_not_compiled():
        return evaluate(policy, task, **options)


@contextlib.contextmanager
def _decoder_not_compiled():
    """The fast decoder without `torch.compile` (LLARVA_FAST_COMPILE=0) unless the caller set it:
    it compiles again for each batch size and cache length, which costs more than it saves for
    a model this small, whose decode step CUDA graphs already make cheap."""
    from llarva_policy.generation import COMPILE_ENV

    previous = os.environ.get(COMPILE_ENV)
    os.environ[COMPILE_ENV] = previous if previous is not None else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[COMPILE_ENV]


def _run(function, in_fresh_process: bool, **kwargs):
    """`function(**kwargs)`, here or in a fresh ("spawn") process."""
    if not in_fresh_process:
        return function(**kwargs)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, **kwargs).result()


def format_summary(summary: dict) -> str:
    def rate(part):
        return f"{part['successes']}/{part['episodes']} ({100 * part['success_rate']:.0f}%)" if part else "n/a"

    training = summary.get("training") or {}
    model = summary.get("model") or {}
    rows = [("task", summary["task"]),
            ("model", f"{model.get('parameters', 'n/a')} parameters, {model.get('megabytes', 'n/a')} MB"),
            ("training", f"{training.get('steps')} steps, {training.get('epochs')} epochs, "
                         f"{training.get('seconds')} s, final loss {training.get('final_loss')}"),
            ("trained policy", rate(summary.get("eval"))),
            ("scripted expert", rate(summary.get("expert")))]
    if training.get("stopped_by") == "stop_seconds":
        of = f" of {training['max_steps']}" if training.get("max_steps") else ""
        rows.append(("unfinished", f"paused at step {training.get('steps')}{of} by the run's budget: "
                                   "run the same command again to continue"))
    width = max(len(name) for name, _ in rows)
    return "train-small\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
