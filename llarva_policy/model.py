"""LLaVA models for the LLARVA policy: tiny ones built locally, and a loader for real checkpoints.

Two checkpoint layouts exist in the wild, and `load_llava` reads both:

* transformers' layout (`LlavaForConditionalGeneration.save_pretrained`): `config.json` with
  `model_type: "llava"`, a processor config, a tokenizer with an `<image>` token. `make_random_llava`
  writes this layout, so tests exercise the same code path as a user's 7B checkpoint.
* the original LLaVA repository's layout, in which LLARVA releases its merged weights: a Llama
  causal LM config plus `mm_*` fields, Llama weight names plus `model.mm_projector.*`, the CLIP
  tower in a separate folder, and a tokenizer with no `<image>` token (the original code splices
  the image in at input id -200). It is converted on load, in memory.

The layout is told from the contents of `config.json`, never from the folder's name.

No function here ever contacts a model hub: everything is built from local files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

# The PIL image processors, named explicitly: the plain names (`LlavaImageProcessor`) need
# torchvision, which llarva does not depend on, and fall back to these with a warning. One backend
# everywhere also means training and inference resize images identically on every machine.
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"

# The CLIP tower's and the Llama's shapes for each size of tiny_llava_config; "7b" is LLaVA-1.5-7B's.
_SHAPES = {
    "tiny": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    ),
    "small": (
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, patch_size=16),
        dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8),
    ),
    "7b": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14),
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    ),
}

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the expected layout."""


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

_SYSTEM_LINES = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
)
_INSTRUCTIONS = (
    "sweep dirt to the smaller dustpan", "sweep dirt to the tall dustpan", "open the top drawer",
    "close the middle drawer", "push the maroon button", "close the red jar", "put the item in the top drawer",
    "stack 2 green blocks", "slide the block to the pink target", "turn left tap", "take the lid off the saucepan",
    "reach the red target", "pick up the cup", "place 3 of the red cups on the cup holder",
)


def _default_corpus(num_samples: int = 200, seed: int = 0) -> list[str]:
    """Representative LLARVA prompts and answers (both wordings, with and without visual trace)."""
    rng = random.Random(seed)

    def numbers(count, low, high):
        # Printed as LLARVA's annotation script prints them: str() of a list of rounded floats.
        return [round(rng.uniform(low, high), 4) for _ in range(count)]

    texts = []
    for i in range(num_samples):
        instruction = rng.choice(_INSTRUCTIONS)
        padding = [[0, 0, 0, 0, 0, 0, 0]] * rng.randint(0, 4)
        history = padding + [numbers(7, -2.9, 2.9) for _ in range(5 - len(padding))]
        action = numbers(7, -1.0, 1.0) + [float(rng.random() < 0.5)]
        trace = [[rng.randint(0, 127), rng.randint(0, 127)] for _ in range(rng.randint(1, 30))]
        if i % 2 == 0:  # the training wording
            question = (
                f'You are a Franka robot using the joint control. The task is "{instruction}", and the previous '
                f"five (including current) steps are {history}. Can you predict action of the next 1 step?"
            )
        else:  # the wording of the released inference code
            question = (
                f'You are a Franka robot using the joint control. The task is "{instruction}", and the previous '
                f"five (including current) steps is {history}, can you predict action of the next 1 step?"
            )
        answer = f"The next action step: {action}"
        if i % 3 == 0:
            question = question.replace(
                "action of the next 1 step", "the 2D visual trace of the end effector and the action of the next 1 step"
            )
            answer = f"The visual trace of the end effector: {trace}. " + answer
        texts.append(f"{_SYSTEM_LINES[i % 2]} USER: \n{question} ASSISTANT: {answer}")
    return texts


def build_tokenizer(
    corpus_texts: list[str] | None = None, vocab_size: int = 1024, image_token: str | None = IMAGE_TOKEN
) -> PreTrainedTokenizerFast:
    """Train a small LLaMA-style BPE tokenizer locally.

    LLaMA's conventions, so that code written against a real LLaMA tokenizer works on this one:
    `<unk>`=0, `<s>`=1 (prepended by `encode`), `</s>`=2, then the 256 byte-fallback tokens
    `<0x00>`..`<0xFF>` (so any text round-trips, even characters never seen in training), spaces as
    the `▁` prefix of the following word, and every digit its own token. `<pad>` and `image_token`
    are added at the end of the vocabulary; pass `image_token=None` for a plain text tokenizer such
    as the original LLaVA checkpoints ship. `vocab_size` is an upper bound: a small corpus learns
    fewer merges.
    """
    corpus_texts = list(corpus_texts) if corpus_texts is not None else _default_corpus()
    special_tokens = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    num_added_later = 1 + (image_token is not None)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_added_later,
        min_frequency=2,
        # Listing the byte tokens here gives them LLaMA's ids 3..258 ...
        special_tokens=special_tokens + byte_tokens,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_texts, trainer)
    # ... but they must be ordinary vocabulary entries, not added special tokens: decode would drop them.
    serialized = json.loads(tokenizer.to_str())
    serialized["added_tokens"] = [t for t in serialized["added_tokens"] if t["content"] in special_tokens]
    tokenizer = Tokenizer.from_str(json.dumps(serialized))

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        # The default cleanup rewrites " ," and " ." and would corrupt number lists on decode.
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    wrapped.add_special_tokens({"pad_token": PAD_TOKEN})
    if image_token is not None:
        wrapped.add_tokens([image_token], special_tokens=True)
    return wrapped


def _add_image_and_pad_tokens(tokenizer) -> None:
    """Give a plain LLaMA tokenizer the `<image>` placeholder and a pad token (in place)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        # LLaVA-1.5 trains with the unk token as padding; a new token only if there is none.
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


# ---------------------------------------------------------------------------------------------
# Configurations and random models
# ---------------------------------------------------------------------------------------------

def tiny_llava_config(tokenizer, *, size: str = "tiny", image_size: int | None = None) -> LlavaConfig:
    """A LLaVA-1.5-shaped config (CLIP vision tower, 2-layer GELU projector, Llama) of a given size.

    * "tiny": CPU tests. CLIP 32 px, patch 8 -> 16 image tokens; hidden 64, 2 layers each.
    * "small": trainable from scratch in minutes on one GPU. CLIP 224 px, patch 16 -> 196 image
      tokens, 4 layers of 256; Llama 4 layers of 512.
    * "7b": LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336, Vicuna-7B), about 7.06B parameters,
      for benchmarks with random weights. Its vocabulary is LLaVA's 32064 rows (or the tokenizer's
      size if larger), so memory and speed match the real model.

    The tokenizer must contain `<image>`; its size and special ids fill the text config.
    """
    if size not in _SHAPES:
        raise ValueError(f"size must be one of {tuple(_SHAPES)}, got {size!r}")
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token; build it with build_tokenizer()")
    image_size = image_size or {"tiny": 32, "small": 224, "7b": 336}[size]
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )

    vision, text = _SHAPES[size]
    # "7b" keeps LLaVA's 32064 embedding rows so that its memory and speed are the real model's.
    vocab_size = max(32064, len(tokenizer)) if size == "7b" else len(tokenizer)
    if image_size % vision["patch_size"]:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {vision['patch_size']}")

    vision_config = CLIPVisionConfig(
        **vision,
        image_size=image_size,
        projection_dim=vision["hidden_size"],
        hidden_act="quick_gelu",  # OpenAI CLIP's activation
        layer_norm_eps=1e-5,
    )
    text_config = LlamaConfig(
        **text,
        num_key_value_heads=text["num_attention_heads"],
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        **special_ids,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(image_size // vision["patch_size"]) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",  # drop CLS: LLaVA's "patch" features
        vision_feature_layer=-2,
    )


HIERARCHICAL_TOWERS = ("swin", "focalnet")   # towers whose stages merge patches; no CLS token


def tower_grid(vision_config) -> tuple[int, int]:
    """(pixels per image feature along a side, extra tokens) of a vision tower's last hidden state.

    CLIP: its patch size and one CLS token. Swin, FocalNet: the patch size doubled by each
    downsampling between stages, no CLS token.
    """
    if vision_config.model_type in HIERARCHICAL_TOWERS:
        return vision_config.patch_size * 2 ** (len(vision_config.depths) - 1), 0
    return vision_config.patch_size, 1


def _make_processor(tokenizer, vision_config, image_processor, select_strategy: str = "default") -> LlavaProcessor:
    # The processor writes (crop/patch)^2 + num_additional_image_tokens, minus 1 if the strategy is
    # "default" (CLS dropped), copies of <image>: the number of features the model scatters in.
    stride, extra_tokens = tower_grid(vision_config)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=stride,
        vision_feature_select_strategy=select_strategy,
        num_additional_image_tokens=extra_tokens,
        image_token=IMAGE_TOKEN,
    )


def _clip_image_processor(image_size: int, pad_to_square: bool) -> LlavaImageProcessorPil:
    # CLIP preprocessing (bicubic resize of the short side, centre crop, CLIP mean/std); LLaVA-1.5
    # and LLARVA first pad non-square images to a square of the mean colour.
    return LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, do_pad=pad_to_square
    )


def make_random_llava(
    out_dir, *, size: str = "tiny", seed: int = 0, tokenizer=None, image_size: int | None = None, dtype=None
) -> Path:
    """Build a randomly initialised LLaVA (seeded) with its processor and save it, transformers layout.

    The result loads with `load_llava(out_dir)` like any user checkpoint. Without `tokenizer`, the
    built-in one from `build_tokenizer()` is used; `<image>` and a pad token are added if missing.
    """
    out_dir = Path(out_dir)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    _add_image_and_pad_tokens(tokenizer)
    config = tiny_llava_config(tokenizer, size=size, image_size=image_size)

    # Seed a private RNG stream: the caller's global torch RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(resolve_dtype(dtype, torch.device("cpu")))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    image_processor = _clip_image_processor(config.vision_config.image_size, pad_to_square=True)
    processor = _make_processor(tokenizer, config.vision_config, image_processor)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadedLlava:
    """A model ready for inference (eval mode) and what is needed to feed it."""

    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    tokenizer: PreTrainedTokenizerFast
    image_token: str
    image_token_id: int
    num_image_tokens: int  # copies of image_token the processor writes for one image
    image_size: int  # the vision tower's input side, in pixels
    layout: str  # "transformers" or "original"
    path: Path

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def resolve_device(device) -> torch.device:
    """None -> CUDA if available, else CPU. Accepts strings and torch devices."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available; use device='cpu'")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> float32 on CPU, bfloat16 on a CUDA device that supports it (else float16).

    Accepts torch dtypes and the names "fp32"/"float32", "bf16"/"bfloat16", "fp16"/"float16"/"half".
    """
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch dtype")
    return _DTYPES[name]


def load_llava(path, *, device=None, dtype=None, vision_tower=None) -> LoadedLlava:
    """Load a LLaVA checkpoint folder in transformers' layout or the original LLaVA layout.

    `vision_tower`: for the original layout, a local CLIP folder (CLIPVisionModel or CLIPModel
    weights, `config.json` and `preprocessor_config.json`). Without it, the config's
    `mm_vision_tower` is used if it names an existing local folder. Ignored for transformers' layout,
    which contains its tower.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the checkpoint folder that holds config.json")
    config = _read_json(path / "config.json", what="the model config")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)

    if config.get("model_type") == "llava" and "text_config" in config:
        return _load_transformers_layout(path, device, dtype)
    if "mm_vision_tower" in config or "mm_projector_type" in config or config.get("model_type") == "llava_llama":
        return _load_original_layout(path, config, device, dtype, vision_tower)
    raise CheckpointError(
        f"{path / 'config.json'} has model_type {config.get('model_type')!r}, which is neither a transformers "
        "LLaVA checkpoint (model_type 'llava' with text_config and vision_config) nor an original LLaVA "
        "checkpoint (model_type 'llava_llama' with mm_vision_tower and mm_projector_type)"
    )


def _read_json(file: Path, what: str) -> dict:
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing: a checkpoint folder needs {file.name} ({what}); "
            "expected transformers' save_pretrained layout or the original LLaVA layout"
        )
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); the file may be truncated") from err


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint (one file or the shards listed by an index), checked readable."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            files = [folder / single]
            break
        if (folder / index).is_file():
            shard_names = sorted(set(_read_json(folder / index, what="the shard index")["weight_map"].values()))
            files = [folder / name for name in shard_names]
            break
    else:
        raise CheckpointError(
            f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json with its shards, "
            "pytorch_model.bin or pytorch_model.bin.index.json with its shards"
        )
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in the shard index of {folder})")
        if file.suffix == ".safetensors":
            _check_safetensors(file)
    return files


def _check_safetensors(file: Path) -> None:
    # Reading the header is cheap and catches truncated downloads before the loader fails obscurely.
    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{file} is not a valid safetensors file ({err}); it may be truncated or corrupt: re-download or re-save it"
        ) from err


def _read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state_dict = {}
    for file in files:
        if file.suffix == ".safetensors":
            state_dict.update(load_safetensors_file(str(file)))
        else:
            try:
                # weights_only: a pickle from the internet must not run code.
                state_dict.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
            except Exception as err:
                raise CheckpointError(f"{file} could not be read as PyTorch weights ({err})") from err
    return state_dict


def _finish(model, processor, tokenizer, layout: str, path: Path) -> LoadedLlava:
    model.eval()
    config = model.config
    image_token = processor.image_token
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_token_id != config.image_token_id:
        raise CheckpointError(
            f"{path}: the tokenizer's {image_token!r} has id {image_token_id} but config.json says image_token_index "
            f"{config.image_token_id}"
        )
    # The placeholders the processor writes for one image must match the features the tower makes,
    # or every forward pass fails with a count mismatch deep inside the model: check once, here.
    vision = config.vision_config
    stride, extra_tokens = tower_grid(vision)
    num_features = (vision.image_size // stride) ** 2 + extra_tokens * (config.vision_feature_select_strategy == "full")
    probe = processor(images=Image.new("RGB", (vision.image_size, vision.image_size)), text=image_token)
    num_image_tokens = probe["input_ids"][0].count(image_token_id)
    if num_image_tokens != num_features:
        raise CheckpointError(
            f"{path}: the processor writes {num_image_tokens} image tokens per image but the vision tower gives "
            f"{num_features} features; check patch_size, num_additional_image_tokens and "
            "vision_feature_select_strategy in processor_config.json and crop_size in preprocessor_config.json"
        )
    return LoadedLlava(
        model=model, processor=processor, tokenizer=tokenizer, image_token=image_token, image_token_id=image_token_id,
        num_image_tokens=num_image_tokens, image_size=vision.image_size, layout=layout, path=path,
    )


def _load_transformers_layout(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedLlava:
    _weight_files(path)  # clear errors for missing or corrupt weights before transformers tries
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=str(device))
    try:
        # The PIL backend whether or not torchvision is installed (see the import of LlavaImageProcessorPil).
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        # The tokenizer passed in too: otherwise from_pretrained hands image_processor to the tokenizer's
        # init_kwargs, and processor.save_pretrained then fails ("LlavaImageProcessorPil is not JSON serializable").
        processor = LlavaProcessor.from_pretrained(path, image_processor=image_processor,
                                                   tokenizer=AutoTokenizer.from_pretrained(path))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"could not load the processor from {path} ({err}); a transformers LLaVA checkpoint needs "
            "processor_config.json, preprocessor_config.json and the tokenizer files (LlavaProcessor.save_pretrained)"
        ) from err
    return _finish(model, processor, processor.tokenizer, "transformers", path)


# Original LLaVA weight names -> LlavaForConditionalGeneration's.
_ORIGINAL_KEY_PREFIXES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
# Fields of the original config that describe its Llama; everything else there is LLaVA's.
_LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
)
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def _find_vision_tower(path: Path, config: dict, vision_tower) -> Path:
    if vision_tower is not None:
        tower = Path(vision_tower).expanduser()
        if not (tower / "config.json").is_file():
            raise CheckpointError(
                f"vision_tower={str(vision_tower)!r} is not a CLIP model folder (no config.json in it); pass a local "
                "folder holding a CLIPVisionModel or CLIPModel: config.json, weights and preprocessor_config.json"
            )
        return tower
    named = config.get("mm_vision_tower")
    candidates = [Path(named).expanduser(), path / named] if named else []
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(
        f"{path / 'config.json'} is an original LLaVA checkpoint whose vision tower mm_vision_tower={named!r} is not a "
        "local folder, and nothing is ever downloaded. Pass vision_tower='/path/to/clip' (for LLaVA-1.5: a copy of "
        "openai/clip-vit-large-patch14-336 with config.json, weights and preprocessor_config.json)"
    )


def _load_original_layout(path: Path, config: dict, device, dtype, vision_tower) -> LoadedLlava:
    config_file = path / "config.json"
    projector_type = config.get("mm_projector_type", "linear")
    if projector_type != "mlp2x_gelu":
        raise CheckpointError(
            f"{config_file}: mm_projector_type {projector_type!r} is not supported; only LLaVA-1.5's 'mlp2x_gelu'"
        )
    if config.get("mm_use_im_start_end"):
        raise CheckpointError(f"{config_file}: mm_use_im_start_end=true (image start/end tokens) is not supported")
    select_feature = config.get("mm_vision_select_feature", "patch")
    if select_feature not in _SELECT_FEATURE:
        raise CheckpointError(
            f"{config_file}: mm_vision_select_feature {select_feature!r} is not 'patch' or 'cls_patch'"
        )

    tower = _find_vision_tower(path, config, vision_tower)
    vision_config = CLIPVisionConfig.from_pretrained(tower)  # also reads a full CLIPModel's vision part
    if config.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise CheckpointError(
            f"{config_file} has mm_hidden_size {config['mm_hidden_size']} but the vision tower at {tower} has hidden "
            f"size {vision_config.hidden_size}: wrong vision_tower folder"
        )

    text_config = _llama_config_from_original(config)
    # Handing over the config keeps AutoTokenizer from parsing config.json, whose model_type it does not know.
    tokenizer = AutoTokenizer.from_pretrained(path, config=text_config)
    _add_image_and_pad_tokens(tokenizer)

    state_dict = _original_state_dict(path)
    if not any(key.startswith("model.vision_tower.") for key in state_dict):
        # LLaVA releases leave the (frozen) CLIP tower out of the checkpoint.
        state_dict.update(_clip_vision_state_dict(tower))
    # Rows for the tokens just added (<image>, maybe <pad>): the mean of the trained rows. The
    # <image> row of the embedding is never read (image features replace it); its lm_head row
    # gives an average logit, so greedy decoding does not emit it.
    vocab_size = max(len(tokenizer), state_dict["model.language_model.embed_tokens.weight"].shape[0])
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in state_dict:
            state_dict[key] = _append_mean_rows(state_dict[key], vocab_size)
    text_config.vocab_size = vocab_size
    text_config.pad_token_id = tokenizer.pad_token_id

    llava_config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=_SELECT_FEATURE[select_feature],
    )
    # from_pretrained with a state dict (rather than the constructor) builds on the meta device and
    # fills the weights once: no 7B random initialisation, and the requested dtype and device.
    model = LlavaForConditionalGeneration.from_pretrained(
        None, config=llava_config, state_dict=state_dict, dtype=dtype, device_map=str(device)
    )
    del state_dict
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    image_processor = _image_processor_from_clip_folder(tower, pad_to_square=config.get("image_aspect_ratio") == "pad")
    processor = _make_processor(tokenizer, vision_config, image_processor, _SELECT_FEATURE[select_feature])
    return _finish(model, processor, tokenizer, "original", path)


def _llama_config_from_original(config: dict) -> LlamaConfig:
    llama_fields = {field: config[field] for field in _LLAMA_FIELDS if field in config}
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters (the old names warn).
    rope_scaling = dict(llama_fields.pop("rope_scaling", None) or {})
    rope_type = rope_scaling.pop("rope_type", rope_scaling.pop("type", "default"))
    rope_parameters = {**rope_scaling, "rope_type": rope_type, "rope_theta": llama_fields.pop("rope_theta", 10000.0)}
    return LlamaConfig(**llama_fields, rope_parameters=rope_parameters)


def _original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under LlavaForConditionalGeneration's names."""
    state_dict = {}
    unknown = []
    for key, tensor in _read_state_dict(_weight_files(path)).items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer that old transformers versions saved
            continue
        new_key = next((new + key[len(old):] for old, new in _ORIGINAL_KEY_PREFIXES if key.startswith(old)), None)
        if new_key is None:
            unknown.append(key)
        else:
            state_dict[new_key] = tensor
    if unknown:
        raise CheckpointError(
            f"{path}: weights {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not part of a LLaVA-1.5 "
            "model (expected Llama names, model.mm_projector.{0,2}.* and model.vision_tower.vision_tower.*)"
        )
    return state_dict


# Parts of a full CLIPModel (or CLIPVisionModelWithProjection) folder that LLaVA does not use.
_CLIP_UNUSED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def _clip_vision_state_dict(tower: Path) -> dict[str, torch.Tensor]:
    # Keys stay as the folder has them ("vision_model.encoder..." from older transformers or OpenAI's
    # CLIPModel, "encoder..." from transformers 5): from_pretrained's own renaming maps both.
    return {
        f"model.vision_tower.{key}": tensor
        for key, tensor in _read_state_dict(_weight_files(tower)).items()
        if not key.startswith(_CLIP_UNUSED_PREFIXES)
    }


def _append_mean_rows(weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    missing = num_rows - weight.shape[0]
    if missing <= 0:
        return weight
    mean_row = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean_row.expand(missing, -1)], dim=0)


# What LLaVA's image pipeline takes from the CLIP folder's preprocessor_config.json.
_IMAGE_PROCESSOR_FIELDS = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb",
)


def _image_processor_from_clip_folder(tower: Path, pad_to_square: bool) -> LlavaImageProcessorPil:
    settings = _read_json(tower / "preprocessor_config.json", what="the CLIP image processor settings")
    return LlavaImageProcessorPil(
        **{field: settings[field] for field in _IMAGE_PROCESSOR_FIELDS if field in settings}, do_pad=pad_to_square
    )
