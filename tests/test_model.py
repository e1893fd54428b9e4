"""Tiny LLaVA models, the tokenizer, and loading both checkpoint layouts (CPU, a few seconds)."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaForConditionalGeneration  # noqa: E402

from llarva_policy.model import (  # noqa: E402
    IMAGE_TOKEN,
    CheckpointError,
    build_tokenizer,
    load_llava,
    make_random_llava,
    resolve_dtype,
    tiny_llava_config,
)

ANSWER = "The next action step: [0.0123, -0.0456, 0.0, 1.0, -2.3, 0.5, -0.0001, 1.0]"
TRACE_ANSWER = "The visual trace of the end effector: [[64, 12], [63, 15], [0, 127]]. " + ANSWER
QUESTION = (
    'You are a Franka robot using the joint control. The task is "sweep dirt to the smaller dustpan", and the '
    "previous five (including current) steps are [[0, 0, 0, 0, 0, 0, 0], [0.0, 0.1745, -0.0001, -2.4435, 0.0, "
    "2.618, 0.7854]]. Can you predict action of the next 1 step?"
)
PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    f"detailed, and polite answers to the user's questions. USER: {IMAGE_TOKEN}\n{QUESTION} ASSISTANT:"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_random_llava(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_llava(tiny_dir, device="cpu")


def front_image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)


# --- tokenizer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [ANSWER, TRACE_ANSWER, QUESTION, PROMPT, "Zürich -> 3.14159 ±0.5 €"])
def test_tokenizer_round_trips_text_exactly(text):
    tokenizer = build_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id  # LLaMA-style: <s> first
    if IMAGE_TOKEN not in text:
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens_image_token_and_digits():
    tokenizer = build_tokenizer()
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id not in (0, 1, 2)
    image_ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    assert image_ids == [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)]
    assert tokenizer.encode(IMAGE_TOKEN * 3 + "\nYou", add_special_tokens=False)[:3] == image_ids * 3

    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(ANSWER + " 1234567890", add_special_tokens=False))
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens and all(len(t) == 1 for t in digit_tokens), digit_tokens
    assert "".join(t for t in tokens if t.isdigit()).endswith("1234567890")

    plain = build_tokenizer(image_token=None)
    assert IMAGE_TOKEN not in plain.get_vocab() and len(plain) == len(tokenizer) - 1


def test_tokenizer_survives_save_and_load(tmp_path):
    tokenizer = build_tokenizer(corpus_texts=[PROMPT + " " + ANSWER] * 20, vocab_size=400)
    assert len(tokenizer) <= 400
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in (PROMPT, ANSWER):
        assert reloaded.encode(text) == tokenizer.encode(text)  # digit splitting and byte fallback persisted
        assert reloaded.decode(reloaded.encode(text, add_special_tokens=False)) == text


# --- random models and the transformers layout ---------------------------------------------------

def test_tiny_model_forward_with_image(tiny):
    assert tiny.layout == "transformers"
    assert tiny.num_image_tokens == 16 and tiny.image_size == 32
    assert tiny.device.type == "cpu" and tiny.dtype == torch.float32
    inputs = tiny.processor(images=front_image(), text=PROMPT, return_tensors="pt")
    assert int((inputs["input_ids"] == tiny.image_token_id).sum()) == 16
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        logits = tiny.model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], tiny.model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights(tmp_path):
    first = load_file(make_random_llava(tmp_path / "a", seed=3) / "model.safetensors")
    again = load_file(make_random_llava(tmp_path / "b", seed=3) / "model.safetensors")
    other = load_file(make_random_llava(tmp_path / "c", seed=4) / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_load_in_bfloat16(tiny_dir):
    loaded = load_llava(tiny_dir, device="cpu", dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    inputs = loaded.processor(images=front_image(), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**inputs.to(dtype=torch.bfloat16)).logits
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, torch.float32), ("bf16", torch.bfloat16), ("float16", torch.float16), (torch.float32, torch.float32),
     ("torch.bfloat16", torch.bfloat16)],
)
def test_resolve_dtype(given, expected):
    assert resolve_dtype(given, torch.device("cpu")) == expected


def test_resolve_dtype_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", torch.device("cpu"))


def test_small_config_shape():
    config = tiny_llava_config(build_tokenizer(), size="small")
    assert config.image_seq_length == 196 and config.text_config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        tiny_llava_config(build_tokenizer(), size="small", image_size=100)


def test_7b_config_has_llava_1_5_size():
    config = tiny_llava_config(build_tokenizer(), size="7b")
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    assert config.image_seq_length == 576 and config.vision_feature_layer == -2
    assert config.text_config.vocab_size == 32064
    with torch.device("meta"):  # shapes only, no memory
        model = LlavaForConditionalGeneration(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    assert num_parameters == pytest.approx(7.063e9, rel=1e-3)
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (1024, 4096)
    assert (projector.linear_2.in_features, projector.linear_2.out_features) == (4096, 4096)


# --- the original LLaVA layout -------------------------------------------------------------------

def write_original_checkpoint(loaded, plain_tokenizer, folder, clip_folder, mm_vision_tower):
    """Rewrite a transformers-layout model as the original LLaVA repository saves it.

    Llama names and mm_projector in two safetensors shards with an index, no vision tower (it goes
    to `clip_folder` as a CLIPVisionModel), a tokenizer without <image>, a config with mm_* fields.
    """
    folder.mkdir(parents=True)
    text_rows = len(plain_tokenizer)
    renamed = {}
    for key, value in loaded.model.state_dict().items():
        if key.startswith("model.vision_tower."):
            continue
        key = (key.replace("model.language_model.", "model.")
               .replace("model.multi_modal_projector.linear_1.", "model.mm_projector.0.")
               .replace("model.multi_modal_projector.linear_2.", "model.mm_projector.2."))
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            value = value[:text_rows]
        renamed[key] = value.clone().contiguous()
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: renamed[k] for k in shard_keys}, str(folder / name), metadata={"format": "pt"})
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    text = loaded.model.config.text_config
    vision = loaded.model.config.vision_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_act": "silu",
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads, "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads, "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps, "rope_theta": 10000.0, "rope_scaling": None, "vocab_size": text_rows,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": True, "pretraining_tp": 1, "initializer_range": 0.02,
        "mm_vision_tower": mm_vision_tower, "mm_hidden_size": vision.hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    plain_tokenizer.save_pretrained(folder)

    if not clip_folder.exists():
        loaded.model.model.vision_tower.save_pretrained(clip_folder)
        size = vision.image_size
        CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
            clip_folder
        )
    return folder


@pytest.fixture(scope="module")
def original_pair(tmp_path_factory):
    """The same random model in both layouts."""
    root = tmp_path_factory.mktemp("layouts")
    plain_tokenizer = build_tokenizer(image_token=None)
    transformers_dir = make_random_llava(root / "transformers", seed=1, tokenizer=build_tokenizer(image_token=None))
    transformers_model = load_llava(transformers_dir, device="cpu")
    clip_dir = root / "clip-vit-tiny"
    original_dir = write_original_checkpoint(
        transformers_model, plain_tokenizer, root / "llarva-merged", clip_dir, "openai/clip-vit-large-patch14-336"
    )
    return transformers_model, original_dir, clip_dir


def test_original_layout_gives_identical_logits(original_pair):
    transformers_model, original_dir, clip_dir = original_pair
    original_model = load_llava(original_dir, device="cpu", vision_tower=clip_dir)
    assert original_model.layout == "original"
    assert original_model.image_token_id == transformers_model.image_token_id
    assert original_model.num_image_tokens == transformers_model.num_image_tokens == 16

    image, prompt = front_image(5), PROMPT + " " + ANSWER
    inputs_t = transformers_model.processor(images=image, text=prompt, return_tensors="pt")
    inputs_o = original_model.processor(images=image, text=prompt, return_tensors="pt")
    assert torch.equal(inputs_t["input_ids"], inputs_o["input_ids"])
    assert torch.equal(inputs_t["pixel_values"], inputs_o["pixel_values"])
    with torch.no_grad():
        logits_t = transformers_model.model(**inputs_t).logits
        logits_o = original_model.model(**inputs_o).logits
    # Every column but <image>'s, whose lm_head row the conversion had to invent (the original has none).
    text_columns = original_model.image_token_id
    assert logits_o.shape == logits_t.shape
    assert torch.equal(logits_o[..., :text_columns], logits_t[..., :text_columns])


def test_original_layout_finds_tower_named_in_config(original_pair, tmp_path):
    transformers_model, original_dir, clip_dir = original_pair
    copy = tmp_path / "merged"
    shutil.copytree(original_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["mm_vision_tower"] = str(clip_dir)
    (copy / "config.json").write_text(json.dumps(config))
    loaded = load_llava(copy, device="cpu")
    assert loaded.layout == "original"
    assert loaded.tokenizer.pad_token == "<pad>"


# --- errors --------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llava(tmp_path / "nowhere", device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_llava(tmp_path, device="cpu")


def test_folder_without_weights(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*expected model\.safetensors"):
        load_llava(tmp_path / "ckpt", device="cpu")


def test_the_llarva_command_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys, monkeypatch):
    from llarva_policy import cli

    args = ["eval", "--task", "reach_target", "--checkpoint", str(tmp_path), "--episodes", "1"]
    monkeypatch.delenv("LLARVA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stopped:
        cli.console(args)
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith(f"llarva eval: error: {tmp_path / 'config.json'} is missing")
    assert "Traceback" not in message
    with pytest.raises(SystemExit) as stopped:
        cli.console(["eval", "--task", "reach_target", "--checkpoint", str(tmp_path / "nowhere"), "--episodes", "1"])
    assert stopped.value.code == 2 and "does not exist" in capsys.readouterr().err
    monkeypatch.setenv("LLARVA_TRACEBACK", "1")     # for whoever needs to see where it was raised
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        cli.console(args)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tiny_dir, tmp_path, damage):
    shutil.copytree(tiny_dir, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a valid safetensors file"):
        load_llava(tmp_path / "ckpt", device="cpu")


def test_processor_that_disagrees_with_the_model(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "ckpt")
    processor_config = tmp_path / "ckpt" / "processor_config.json"
    settings = json.loads(processor_config.read_text())
    settings["patch_size"] = 4
    processor_config.write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match="processor writes 64 image tokens .* gives 16 features"):
        load_llava(tmp_path / "ckpt", device="cpu")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        load_llava(tmp_path, device="cpu")


def test_original_layout_without_reachable_vision_tower(original_pair):
    _, original_dir, _ = original_pair
    with pytest.raises(CheckpointError, match=r"mm_vision_tower='openai/clip-vit-large-patch14-336'.*vision_tower="):
        load_llava(original_dir, device="cpu")
    with pytest.raises(CheckpointError, match="not a CLIP model folder"):
        load_llava(original_dir, device="cpu", vision_tower=original_dir / "missing")
