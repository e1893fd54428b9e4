"""Fine-tuning on a tiny LLaVA: labels, LoRA placement, training, saving, merging, resuming (CPU, seconds).

The data are real: two scripted-expert demos of reach_target recorded on the embedded simulator,
annotated with `annotate`, read back from disk.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import gymnasium as gym  # noqa: E402
from peft import PeftModel  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import llarva_gym  # noqa: E402,F401
from llarva_gym.demos import Demo, save_demo  # noqa: E402
from llarva_gym.expert import ScriptedExpert  # noqa: E402
from llarva_policy import codec  # noqa: E402
from llarva_policy.annotations import annotate  # noqa: E402
from llarva_policy.finetune import (  # noqa: E402
    CHECKPOINT_COMPLETE,
    LORA_TARGET_MODULES,
    REPORT_FILE,
    RUN_FILE,
    ConversationDataset,
    FinetuneConfig,
    PadCollator,
    check_lengths,
    conversation_turns,
    finetune,
    last_complete_checkpoint,
    load_annotations,
    merge_lora,
    parameter_groups,
    prepare_for_training,
    sample_lengths,
    tokenize_conversation,
)
from llarva_policy.model import load_llava, make_random_llava  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK = "reach_target"
# Small and fast: tiny model, LoRA r=8, a high learning rate so a few steps visibly lower the loss.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")   # peft asks it
FAST = dict(lora_r=8, lora_alpha=16, lr=2e-3, projector_lr=2e-3, batch_size=4, progress=False, report_to="none")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The machine's cores are shared; OpenMP threads spinning against other processes make a tiny
    # model's step 20x slower. One thread is also what makes CPU results bit-reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def record_demo(env, root: Path, episode: int, steps: int = 24) -> None:
    obs, info = env.reset(options={"episode_seed": episode, "variation": episode})
    expert = ScriptedExpert(env)
    observations = [env.unwrapped.rlbench_observation()]
    for _ in range(steps):
        obs, _, terminated, _, info = env.step(expert.predict(obs)[0])
        observations.append(env.unwrapped.rlbench_observation())
        if terminated:
            break
    save_demo(Demo(observations, random_seed={"episode_seed": episode, "variation": episode}),
              root / TASK / "all_variations" / "episodes" / f"episode{episode}",
              variation_number=episode, descriptions=info["descriptions"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two real demos (about 25 steps each) and their annotation JSON: (annotation file, images root)."""
    root = tmp_path_factory.mktemp("demos")
    env = gym.make(f"llarva/{TASK}")
    try:
        for episode in range(2):
            record_demo(env, root, episode)
    finally:
        env.close()
    annotation_file = root / "train.json"
    count = annotate(root, annotation_file, TASK, progress=False)
    assert count >= 40
    return annotation_file, root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_random_llava(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_llava(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def fixed_batch(data, tiny):
    """The first eight samples, padded: the batch whose loss must fall."""
    annotation_file, images = data
    dataset = ConversationDataset(load_annotations(annotation_file, images), images, tiny.processor)
    return PadCollator(tiny.tokenizer.pad_token_id)([dataset[i] for i in range(8)])


def batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


# --- labels ----------------------------------------------------------------------------------------

def test_exactly_the_answer_tokens_are_labelled(data, tiny):
    annotation_file, images = data
    entries = load_annotations(annotation_file, images)
    dataset = ConversationDataset(entries, images, tiny.processor)
    for index in (0, 1, len(entries) - 1):
        question, answer = conversation_turns(entries[index])
        sample = dataset[index]
        ids, labels = sample["input_ids"], sample["labels"]
        labelled = (labels != -100).nonzero().flatten()
        first = int(labelled[0])
        # One contiguous run to the end; the labels are the ids there.
        assert labelled.tolist() == list(range(first, len(ids)))
        assert torch.equal(labels[first:], ids[first:])
        # It decodes to the answer and its </s> ...
        assert tiny.tokenizer.decode(ids[first:]) == answer + "</s>"
        assert int(ids[-1]) == tiny.tokenizer.eos_token_id
        # ... and what precedes it is exactly the generation prompt, image tokens included, as
        # LlarvaPolicy feeds it: the model learns the answer where predict will ask for it.
        with Image.open(images / entries[index]["image"]) as image:
            prompt = tiny.processor(images=image.convert("RGB"), text=codec.build_prompt(question),
                                    return_tensors="pt")
        assert torch.equal(ids[:first], prompt["input_ids"][0])
        assert int((ids == tiny.image_token_id).sum()) == tiny.num_image_tokens == 16
        assert not (labels == tiny.image_token_id).any()
        assert torch.equal(sample["pixel_values"], prompt["pixel_values"][0])


def test_labels_with_a_trace_answer_and_the_released_template(tiny):
    image = Image.fromarray(np.zeros((128, 128, 3), np.uint8))
    history = codec.format_history([[0.1, -0.2, 0.3, -2.0, 0.0, 2.1, 0.7]] * 3)
    question = codec.build_question("reach the red target", history, visual_trace=True,
                                    template="released_inference")
    answer = codec.format_answer([0.01, -0.5, 0, 0, 0, 0, 1.25, 0.0], np.array([[64, 12], [0, 127]]),
                                 template="released_inference")
    sample = tokenize_conversation(tiny.processor, image, question, answer, template="released_inference")
    first = int((sample["labels"] != -100).nonzero()[0])
    assert tiny.tokenizer.decode(sample["input_ids"][first:]) == answer + "</s>"
    assert tiny.tokenizer.decode(sample["input_ids"][:first]).endswith("ASSISTANT:")


def test_collator_pads_on_the_right(data, tiny):
    annotation_file, images = data
    entries = load_annotations(annotation_file, images)
    dataset = ConversationDataset(entries, images, tiny.processor)
    samples = sorted((dataset[i] for i in range(6)), key=lambda s: len(s["input_ids"]))
    short, long = samples[0], samples[-1]
    assert len(short["input_ids"]) < len(long["input_ids"])
    batch = PadCollator(tiny.tokenizer.pad_token_id)([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(long["input_ids"]))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(batch["input_ids"][0, :n], short["input_ids"])
    assert (batch["input_ids"][0, n:] == tiny.tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n:] == -100).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert batch["attention_mask"][0, :n].all() and batch["attention_mask"][1].all()


def test_lengths_are_known_before_training_and_too_long_is_an_error(data, tiny):
    annotation_file, images = data
    entries = load_annotations(annotation_file, images)
    lengths = sample_lengths(entries, tiny.tokenizer, tiny.num_image_tokens)
    dataset = ConversationDataset(entries, images, tiny.processor)
    assert lengths[:5] == [len(dataset[i]["input_ids"]) for i in range(5)]
    check_lengths(entries, lengths, max(lengths), annotation_file)   # exactly fits
    too_long = sum(length > max(lengths) - 1 for length in lengths)
    with pytest.raises(ValueError, match=rf"max_length={max(lengths) - 1}: {too_long} of {len(entries)} samples .* "
                                         rf"raise max_length to at least {max(lengths)}"):
        check_lengths(entries, lengths, max(lengths) - 1, annotation_file)


def test_bad_annotations_are_named(data, tmp_path):
    annotation_file, images = data
    entries = json.loads(annotation_file.read_text())
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([entries[0], {**entries[1], "image": "nowhere/0.png"}]))
    with pytest.raises(FileNotFoundError, match=r"entry 1 \(id .*\): image .*nowhere/0\.png does not exist"):
        load_annotations(broken, images)
    swapped = {**entries[0], "conversations": entries[0]["conversations"][::-1]}
    broken.write_text(json.dumps([swapped]))
    with pytest.raises(ValueError, match=r"entry 0 .* expected \{\"id\""):
        load_annotations(broken, images)
    with pytest.raises(FileNotFoundError, match="annotation file"):
        load_annotations(tmp_path / "missing.json", images)


# --- what trains ---------------------------------------------------------------------------------

def test_lora_goes_on_the_language_model_only(tiny_dir):
    model = prepare_for_training(load_llava(tiny_dir, device="cpu").model, lora_r=4, lora_alpha=8)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    lora = [name for name in trainable if "lora_" in name]
    others = [name for name in trainable if "lora_" not in name]
    # 2 layers x 7 projections x (A, B)
    assert len(lora) == 2 * len(LORA_TARGET_MODULES) * 2
    assert all(".language_model.layers." in name for name in lora)
    assert {name.split(".")[-4] for name in lora} == set(LORA_TARGET_MODULES)   # ...q_proj.lora_A.default.weight
    # The projector is trainable as a whole (a saved copy), nothing else is.
    assert others and all("multi_modal_projector" in name for name in others)
    assert not any("vision_tower" in name or "lm_head" in name for name in trainable)
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if p.requires_grad)

    groups = parameter_groups(model, lr=1e-3, projector_lr=1e-5)
    by_lr = {group["lr"]: sum(p.numel() for p in group["params"]) for group in groups}
    projector = sum(p.numel() for name, p in model.named_parameters() if name in others)
    assert by_lr[1e-5] == projector and by_lr[1e-3] == sum(
        p.numel() for name, p in model.named_parameters() if name in lora)


def test_full_mode_tunes_the_language_model_and_projector(tiny_dir):
    model = prepare_for_training(load_llava(tiny_dir, device="cpu").model, full=True)
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith("model.vision_tower.")), name


# --- a run: train, save, reload, merge ---------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(data, tiny_dir, tmp_path_factory):
    annotation_file, images = data
    output = tmp_path_factory.mktemp("run") / "out"
    report = finetune(model=str(tiny_dir), data=str(annotation_file), images=str(images), output=str(output),
                      max_steps=8, save_steps=4, **FAST)
    return output, report


def test_run_writes_adapter_processor_and_report(lora_run, tiny_dir):
    output, report = lora_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "processor_config.json",
                 "tokenizer.json", RUN_FILE, REPORT_FILE):
        assert (output / name).is_file(), name
    run = json.loads((output / RUN_FILE).read_text())
    assert run["finished"] and run["mode"] == "lora" and run["base_model"] == str(Path(tiny_dir).resolve())
    assert run["options"]["lora_r"] == 8 and run["report"] == report
    assert json.loads((output / REPORT_FILE).read_text()) == report
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == run["base_model"]
    assert report["global_step"] == report["steps_this_run"] == 8
    assert report["samples"] == 8 * 4
    assert report["non_pad_tokens"] > 8 * 4 * 100 and report["tokens_per_second"] > 0
    assert report["peak_memory_gb"] > 0 and report["peak_memory_kind"] == "cpu_max_rss"
    assert np.isfinite(report["final_loss"])
    # Checkpoints: complete-marked, the last two kept.
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert all((p / CHECKPOINT_COMPLETE).is_file() for p in output.glob("checkpoint-*"))
    assert last_complete_checkpoint(output).name == "checkpoint-8"
    # The projector travels with the adapter.
    assert any("multi_modal_projector" in key for key in load_file(output / "adapter_model.safetensors"))


def test_training_lowers_the_loss_and_the_adapter_reloads(lora_run, tiny_dir, fixed_batch):
    output, _ = lora_run
    base = load_llava(tiny_dir, device="cpu").model
    before = batch_loss(base, fixed_batch)
    tuned = PeftModel.from_pretrained(load_llava(tiny_dir, device="cpu").model, str(output))
    after = batch_loss(tuned, fixed_batch)
    assert after < before - 0.1, (before, after)


def test_merge_gives_the_adapter_model_logits(lora_run, tiny_dir, fixed_batch, tmp_path):
    output, _ = lora_run
    tuned = PeftModel.from_pretrained(load_llava(tiny_dir, device="cpu").model, str(output)).eval()
    merged_dir = merge_lora(output, tmp_path / "merged")
    assert not list(tmp_path.glob(".merged.tmp-*"))
    merged = load_llava(merged_dir, device="cpu")
    assert merged.layout == "transformers" and merged.dtype == torch.float32
    with torch.no_grad():
        expected = tuned(**fixed_batch).logits
        got = merged.model(**fixed_batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    base = load_llava(tiny_dir, device="cpu").model.eval()
    with torch.no_grad():
        assert not torch.allclose(base(**fixed_batch).logits, got, atol=1e-3)   # the merge did something
    # An existing checkpoint is not replaced silently.
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        merge_lora(output, merged_dir)
    merge_lora(output / "checkpoint-4", merged_dir, overwrite=True)   # a checkpoint merges too
    assert json.loads((merged_dir / "llarva_merge.json").read_text())["adapter"].endswith("checkpoint-4")


def test_llarva_policy_loads_the_merge(lora_run, tmp_path):
    policy_module = pytest.importorskip("llarva_policy.policy")
    if not hasattr(policy_module, "LlarvaPolicy"):
        pytest.skip("llarva_policy.policy.LlarvaPolicy is not written yet")
    output, _ = lora_run
    merged_dir = merge_lora(output, tmp_path / "merged")
    policy = policy_module.LlarvaPolicy.from_pretrained(merged_dir, device="cpu", max_new_tokens=4,
                                                        on_parse_error="hold")
    observation = {"front_rgb": np.zeros((128, 128, 3), np.uint8), "joint_positions": np.zeros(7, np.float32),
                   "gripper_open": np.ones(1, np.float32), "instruction": "reach the red target"}
    action, _ = policy.predict(observation)
    assert action.shape == (8,)


def test_an_existing_run_is_not_overwritten(lora_run, data, tiny_dir):
    output, _ = lora_run
    annotation_file, images = data
    with pytest.raises(FileExistsError, match="already holds a fine-tuning run .* resume=True"):
        finetune(model=str(tiny_dir), data=str(annotation_file), images=str(images), output=str(output),
                 max_steps=1, **FAST)


def test_resume_needs_a_complete_checkpoint(data, tiny_dir, tmp_path):
    annotation_file, images = data
    (tmp_path / "checkpoint-2").mkdir()   # killed while writing its first checkpoint
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint .*checkpoint-2"):
        finetune(model=str(tiny_dir), data=str(annotation_file), images=str(images), output=str(tmp_path),
                 max_steps=4, resume=True, **FAST)


# --- resume ---------------------------------------------------------------------------------------

class KillAfterSave(TrainerCallback):
    """Stands in for a kill: the process dies right after checkpoint `step` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed after step {self.step}")


def trained_state(output: Path, step: int):
    """Per-step losses, adapter weights and optimizer moments of checkpoint-`step`."""
    checkpoint = output / f"checkpoint-{step}"
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    losses = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return losses, load_file(checkpoint / "adapter_model.safetensors"), optimizer


def test_resume_continues_exactly_like_an_uninterrupted_run(data, tiny_dir, tmp_path):
    annotation_file, images = data
    # lora_dropout stays on: the resumed run must also restore the RNG that draws the dropout masks.
    options = dict(model=str(tiny_dir), data=str(annotation_file), images=str(images), max_steps=6,
                   save_steps=2, keep_checkpoints=None, seed=3, **FAST)
    reference = tmp_path / "reference"
    finetune(output=str(reference), **options)

    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune(output=str(interrupted), callbacks=[KillAfterSave(4)], **options)
    assert last_complete_checkpoint(interrupted).name == "checkpoint-4"
    assert not (interrupted / "adapter_config.json").exists()
    assert not json.loads((interrupted / RUN_FILE).read_text())["finished"]
    # A later checkpoint that a kill left half-written must not be picked, and goes.
    half_written = interrupted / "checkpoint-6"
    half_written.mkdir()
    (half_written / "adapter_model.safetensors").write_bytes(b"truncated")

    report = finetune(output=str(interrupted), resume=True, **options)
    assert report["global_step"] == 6 and report["steps_this_run"] == 2 and report["samples"] == 2 * 4

    losses, weights, moments = trained_state(reference, 6)
    resumed_losses, resumed_weights, resumed_moments = trained_state(interrupted, 6)
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]
    # The loss at every step (5 and 6 after the resume) is the uninterrupted run's: same data order,
    # same dropout masks, same weights and optimizer moments.
    for step in range(1, 7):
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-5), step
    assert losses[1] != losses[5]
    assert weights.keys() == resumed_weights.keys()
    for key in weights:
        torch.testing.assert_close(resumed_weights[key], weights[key], rtol=1e-5, atol=1e-6)
    for index in moments:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(resumed_moments[index][name], moments[index][name], rtol=1e-5, atol=1e-7)


# --- full tuning through the command line ------------------------------------------------------------

def test_full_tuning_from_the_cli_gives_a_loadable_checkpoint(data, tiny_dir, tmp_path, fixed_batch, capsys):
    from llarva_policy.cli import main

    annotation_file, images = data
    output = tmp_path / "full"
    main(["finetune", "--model", str(tiny_dir), "--data", str(annotation_file), "--images", str(images),
          "--output", str(output), "--full", "--lr", "1e-3", "--projector-lr", "1e-3", "--max-steps", "3",
          "--batch-size", "4", "--save-steps", "100"])
    assert "training report" in capsys.readouterr().out
    tuned = load_llava(output, device="cpu")
    base = load_llava(tiny_dir, device="cpu")
    assert batch_loss(tuned.model, fixed_batch) < batch_loss(base.model, fixed_batch)
    tuned_weights, base_weights = tuned.model.state_dict(), base.model.state_dict()
    for key, value in base_weights.items():
        same = torch.equal(tuned_weights[key], value)
        if key.startswith("model.vision_tower."):
            assert same, f"{key}: the vision tower must stay frozen"
        elif key.endswith("layers.0.self_attn.q_proj.weight") or "multi_modal_projector" in key:
            assert not same, f"{key} did not train"
    assert json.loads((output / RUN_FILE).read_text())["mode"] == "full"
    with pytest.raises(ValueError, match="full checkpoint .* not a LoRA adapter"):
        merge_lora(output, tmp_path / "merged")


# --- options and DeepSpeed ---------------------------------------------------------------------------

def test_options_are_checked(data, tiny_dir, tmp_path):
    annotation_file, images = data
    common = dict(model=str(tiny_dir), data=str(annotation_file), images=str(images), output=str(tmp_path / "o"))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['learning_rate'\]"):
        finetune(learning_rate=1e-4, **common)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, got 0"):
        finetune(batch_size=0, **common)
    with pytest.raises(TypeError, match=r"missing required option\(s\) \['images'\]"):
        finetune(model="m", data="d", output="o")
    config = FinetuneConfig(**common, lora_dropout=1.5)
    with pytest.raises(ValueError, match="lora_dropout"):
        finetune(config)
    assert not (tmp_path / "o").exists()   # nothing written before the options are known to be good


@pytest.mark.parametrize("preset, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_presets(preset, stage):
    config = json.loads((REPO / "llarva_policy" / "deepspeed_configs" / f"{preset}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    # The Trainer fills every "auto" from TrainingArguments, so one file serves any batch size.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert config["zero_optimization"]["reduce_bucket_size"] == "auto"
    assert "optimizer" not in config and "scheduler" not in config   # ours: projector lr groups, cosine
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed")
def test_deepspeed_without_deepspeed_says_how_to_install_it(data, tiny_dir, tmp_path):
    annotation_file, images = data
    with pytest.raises(ImportError, match=r"pip install 'llarva\[deepspeed\]'"):
        finetune(model=str(tiny_dir), data=str(annotation_file), images=str(images), output=str(tmp_path / "o"),
                 deepspeed="zero3", **FAST)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        finetune(model=str(tiny_dir), data=str(annotation_file), images=str(images), output=str(tmp_path / "o"),
                 deepspeed="zero4", **FAST)


# --- the throughput benchmark ------------------------------------------------------------------------

def test_throughput_benchmark_runs_on_cpu(tmp_path, capsys, load_script):
    benchmark = load_script("benchmarks/finetune_throughput.py")
    results = tmp_path / "results.json"
    assert benchmark.main(["--size", "tiny", "--seq-len", "96", "--steps", "2", "--warmup", "1", "--lora-r", "8",
                           "--configs", "bs=2", "bs=2,gc=1,optim=adamw_torch_fused", "attn=flash_attention_2",
                           "--out", str(results)]) == 0
    assert "tokens/s" in capsys.readouterr().out
    rows = json.loads(results.read_text())["results"]
    assert [row["status"] for row in rows[:2]] == ["ok", "ok"]
    assert rows[1]["gradient_checkpointing"] is True and rows[1]["optim"] == "adamw_torch_fused"
    for row in rows[:2]:
        assert row["tokens_per_second"] > 0 and row["samples_per_second"] > 0 and row["seq_len"] == 96
        assert row["trainable_parameters"] > 0 and np.isfinite(row["final_loss"])
    if importlib.util.find_spec("flash_attn") is None:
        assert rows[2]["status"] == "skipped: flash_attn is not installed"


@pytest.mark.slow
def test_the_example_runs_end_to_end(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO / "examples" / "finetune_tiny.py"), "--out", str(tmp_path / "work"), "--steps", "4"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "training report" in completed.stdout and "step 2:" in completed.stdout
    assert (tmp_path / "work" / "merged" / "model.safetensors").is_file()
