"""`llarva train-small` at toy scale (CPU, seconds): the recipe end to end, its data path, its budget.

The data are real: scripted-expert demos of reach_target recorded on the embedded simulator and
annotated with `annotate`.
"""

import copy
import json
import os
from pathlib import Path
import shutil
import tarfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import gymnasium as gym  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from tokenizers.pre_tokenizers import Whitespace  # noqa: E402

import llarva_gym  # noqa: E402,F401
from llarva_gym.demos import DemoFormatError, episode_dirs, load_demo  # noqa: E402
from llarva_gym.recording import record_demos  # noqa: E402
from llarva_policy import codec  # noqa: E402
from llarva_policy.annotations import annotate, episode_annotations  # noqa: E402
from llarva_policy.cli import _parser as llarva_parser  # noqa: E402
from llarva_policy.cli import main as llarva_main  # noqa: E402
from llarva_policy.finetune import (  # noqa: E402
    IGNORE_INDEX,
    conversation_turns,
    load_annotations,
    tokenize_conversation,
)
from llarva_policy.generation import generate_text  # noqa: E402
from llarva_policy.model import build_tokenizer, load_llava  # noqa: E402
from llarva_policy.policy import LlarvaPolicy  # noqa: E402
from llarva_policy.train_small import (  # noqa: E402
    MODEL_DIR,
    SHAPES,
    TRAINING_FILE,
    ImageNormalizer,
    _append_annotations,
    _first_token_ending_after,
    answer_loss,
    build_model,
    build_training_set,
    check_answer_weights,
    driver_loader,
    encode_conversations,
    episode_step,
    episode_variation,
    format_summary,
    goal_span,
    learning_rate,
    load_images,
    sample_repeats,
    save_checkpoint,
    train_model,
    train_small,
)

TASK = "reach_target"
SWEEP = "sweep_to_dustpan_of_size"     # two variations: the tall dustpan, the short one
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """Two reach_target demos and their annotation entries: (data root, entries)."""
    root = tmp_path_factory.mktemp("train_small_data")
    record_demos(TASK, 2, root / "data", seed=0, progress=False)
    annotate(root / "data", root / "annotations.json", TASK, seed=0, progress=False)
    return root / "data", load_annotations(root / "annotations.json", root / "data")


@pytest.fixture(scope="module")
def two_variations(tmp_path_factory):
    """One sweep_to_dustpan_of_size demo of each variation, laid out as a DAgger round lays out its
    demos: variation 0 in `data/`, variation 1 in `takeover/`, one annotation file whose image
    paths are relative to `data/` (`../takeover/...` for the second): (data root, entries)."""
    root = tmp_path_factory.mktemp("two_variations")
    for folder, variation in (("data", 0), ("takeover", 1)):
        record_demos(SWEEP, 1, root / folder, seed=0, variation=variation, progress=False)
        annotate(root / folder, root / f"{folder}.json", SWEEP, seed=0, progress=False)
    _append_annotations(root / "data.json", root / "data",
                        load_annotations(root / "takeover.json", root / "takeover"), root / "takeover")
    return root / "data", load_annotations(root / "data.json", root / "data")


def toy_model(entries, seed=0):
    tokenizer = build_tokenizer(corpus_texts=[codec.build_conversation_text(*conversation_turns(e)) for e in entries])
    model, processor = build_model(tokenizer, "toy", seed=seed)
    return tokenizer, model, processor


def toy_data(entries, data_root, tokenizer, model, goal_points="last"):
    return build_training_set(entries, data_root, tokenizer, num_image_tokens=model.config.image_seq_length,
                              pad_token_id=tokenizer.pad_token_id, goal_points=goal_points)


def toy_trace_data(root, goal_points):
    """The first 8 samples of one demo annotated with a 3-point trace, a toy model, their training set."""
    record_demos(TASK, 1, root / "data", seed=0, progress=False)
    annotate(root / "data", root / "annotations.json", TASK, seed=0, visual_trace=True, trace_points=3,
             progress=False)
    entries = load_annotations(root / "annotations.json", root / "data")[:8]
    tokenizer, model, processor = toy_model(entries)
    return entries, tokenizer, model, processor, toy_data(entries, root / "data", tokenizer, model, goal_points)


def test_samples_are_tokenized_as_finetune_tokenizes_them(annotated):
    data_root, entries = annotated
    tokenizer, model, processor = toy_model(entries)
    encoded = encode_conversations(entries[:6], tokenizer, num_image_tokens=model.config.image_seq_length)
    for entry, (ids, labels, goal, _) in zip(entries[:6], encoded):
        assert not goal.any()   # no visual trace, no goal tokens
        with Image.open(data_root / entry["image"]) as image:
            expected = tokenize_conversation(processor, image.convert("RGB"), *conversation_turns(entry))
        assert ids.tolist() == expected["input_ids"].tolist()
        assert labels.tolist() == expected["labels"].tolist()
        # The loss reads the answer and its </s>, nothing of the prompt.
        answer = tokenizer.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=False)
        assert answer.strip() == conversation_turns(entry)[1] + "</s>"
    # Padding or truncation the tokenizer was last called with does not leak into the samples.
    tokenizer(["a b c"] * 2, padding="max_length", truncation=True, max_length=8, padding_side="left")
    again = encode_conversations(entries[:6], tokenizer, num_image_tokens=model.config.image_seq_length)
    assert all((a == b).all() for first, second in zip(encoded, again) for a, b in zip(first, second))
    # Chunks encoded by worker processes come back whole and in order.
    in_workers = encode_conversations(entries[:6], tokenizer, num_image_tokens=model.config.image_seq_length,
                                      chunk=4, processes=2)
    assert len(in_workers) == 6
    assert all((a == b).all() for first, second in zip(encoded, in_workers) for a, b in zip(first, second))


def test_a_sample_without_its_image_token_is_named_by_its_place_in_the_file(annotated):
    _, entries = annotated
    tokenizer, model, _ = toy_model(entries)
    broken = copy.deepcopy(entries[:6])
    broken[5]["conversations"][0]["value"] = broken[5]["conversations"][0]["value"].replace("<image>\n", "")
    for processes in (1, 2):
        with pytest.raises(ValueError, match=rf"annotation entry 5 \(id {broken[5]['id']!r}\): expected one '<image>'"):
            encode_conversations(broken, tokenizer, num_image_tokens=model.config.image_seq_length, chunk=4,
                                 processes=processes)


def test_the_first_token_ending_after_a_character_matches_the_offsets(annotated):
    """The lookup that labels the answer and the goal agrees, at every character of a sample,
    with reading every token's offsets; also for characters no token holds (a word-level
    tokenizer that drops the spaces), where it falls back to the offsets."""
    _, entries = annotated
    tokenizer, _, _ = toy_model(entries)
    text = codec.build_conversation_text(*conversation_turns(entries[0]))
    words = Tokenizer(WordLevel({"[UNK]": 0, "pick": 1, "up": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    for encoding, text in ((tokenizer.backend_tokenizer.encode(text), text),
                           (words.encode("pick  up the  cup"), "pick  up the  cup")):
        ends = [end for _, end in encoding.offsets]
        for char in range(len(text)):
            expected = next((i for i, end in enumerate(ends) if end > char), len(ends))
            assert _first_token_ending_after(encoding, char) == expected, (text[char], char)
    assert words.encode("pick  up").char_to_token(4) is None   # the fallback was taken


def test_images_are_the_files_in_order_and_a_bad_one_is_named(annotated, tmp_path):
    data_root, entries = annotated
    paths = [data_root / entry["image"] for entry in entries[:10]]
    expected = []
    for path in paths:
        with Image.open(path) as image:
            expected.append(np.asarray(image.convert("RGB")))
    # 600 paths make three blocks, so two worker processes decode most of them.
    many = [paths[(i * 7) % 10] for i in range(600)]
    many_expected = np.stack([expected[(i * 7) % 10] for i in range(600)])
    for processes in (1, 2):
        images = load_images(many, processes=processes)
        assert images.dtype == np.uint8 and (images == many_expected).all()
    assert (load_images(paths) == np.stack(expected)).all()
    Image.new("RGB", (20, 20)).save(tmp_path / "other.png")
    (tmp_path / "cut.png").write_bytes(paths[0].read_bytes()[:100])
    for processes in (1, 2):    # the bad file falls in a worker's block
        with pytest.raises(ValueError, match="one size for all front images.*other.png"):
            load_images(many[:500] + [tmp_path / "other.png"] + many[500:], processes=processes)
        with pytest.raises(DemoFormatError, match="cut.png: not a readable PNG"):
            load_images(many[:500] + [tmp_path / "cut.png"] + many[500:], processes=processes)
    with pytest.raises(ValueError, match="no image paths"):
        load_images([])


def test_image_decoding_benchmark_decodes_the_same_images_both_ways(tmp_path, load_script):
    """benchmarks/image_decoding.py: threads (the old way) and worker processes on one list; the
    processes' ratio is against the threads' row of the same run."""
    benchmark = load_script("benchmarks/image_decoding.py")
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "episode0" / "front_rgb").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / "data" / "episode0" / "front_rgb" / f"{i}.png")
    out = tmp_path / "decoding.json"
    result = benchmark.main(["--demos", str(tmp_path / "data"), "--repeat", "50", "--processes", "2",
                             "--out", str(out)])
    assert json.loads(out.read_text()) == result
    threads, processes = result["rows"]
    assert (threads["mode"], processes["mode"]) == (f"threads {min(16, os.cpu_count())}", "processes 2")
    assert threads["images"] == processes["images"] == 600
    assert processes["speedup_vs_threads"] == round(threads["seconds"] / processes["seconds"], 2)
    with pytest.raises(SystemExit):
        benchmark.main(["--out", str(out)])    # neither a dataset nor a recording asked for


def test_images_are_normalised_as_the_clip_processor_does(annotated):
    data_root, entries = annotated
    tokenizer, model, processor = toy_model(entries)
    data = toy_data(entries[:5], data_root, tokenizer, model)
    assert data.images.dtype == torch.uint8 and data.images.shape == (5, 3, 128, 128)
    normalize = ImageNormalizer(processor.image_processor, CPU)
    normalize.check(processor.image_processor, data.images)        # raises if they differ
    with Image.open(data_root / entries[0]["image"]) as image:
        expected = processor.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
    assert torch.allclose(normalize(data.images[:1]), expected, atol=1e-5)
    with pytest.raises(ValueError, match="128x128"):
        normalize.check(processor.image_processor, data.images[:, :, :64, :64])


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    assert learning_rate(0, 100, peak=1e-3, warmup=10) == pytest.approx(1e-4)
    assert learning_rate(9, 100, peak=1e-3, warmup=10) == pytest.approx(1e-3)
    assert learning_rate(55, 100, peak=1e-3, warmup=10) == pytest.approx(0.55e-3)
    assert learning_rate(100, 100, peak=1e-3, warmup=10) == pytest.approx(1e-4)
    assert learning_rate(50, None, peak=1e-3, warmup=10, progress=0.5) == pytest.approx(0.55e-3)


def test_training_stops_at_the_time_budget_and_is_reproducible(annotated):
    data_root, entries = annotated
    tokenizer, model, processor = toy_model(entries)
    data = toy_data(entries, data_root, tokenizer, model)
    normalize = ImageNormalizer(processor.image_processor, CPU)
    log = train_model(model, data, normalize, device=CPU, batch_size=4, max_steps=10 ** 6, train_seconds=1.0,
                      progress=False)
    assert log["stopped_by"] == "time" and 1 <= log["steps"] < 10 ** 6
    assert log["seconds"] < 1.0 + 5.0     # the budget, plus at most the step under way when it ran out
    assert log["history"][-1]["step"] == log["steps"] and log["final_loss"] is not None   # the last step is logged

    # Without max_steps, the cosine runs on the clock: warm-up, then down to a tenth of the peak
    # by the end of the budget; the steps made are recorded to repeat the run.
    _, model, _ = toy_model(entries)
    log = train_model(model, data, normalize, device=CPU, batch_size=4, train_seconds=2.0, warmup_steps=2,
                      lr=1e-3, log_every=1, progress=False)
    assert log["max_steps_chosen"] == "clock" and log["stopped_by"] == "time"
    assert log["max_steps"] == log["steps"] >= 4
    rates = [entry["lr"] for entry in log["history"]]
    assert rates[:2] == pytest.approx([0.5e-3, 1e-3]) and rates[-1] < 0.3e-3
    assert all(later <= earlier + 1e-12 for earlier, later in zip(rates[1:], rates[2:]))

    # A step count passed back repeats the schedule on the steps, with the warm-up asked for (a
    # run on the clock warmed up for all of it), then the cosine towards a tenth of the peak.
    _, model, _ = toy_model(entries)
    repeat = train_model(model, data, normalize, device=CPU, batch_size=4, max_steps=8, warmup_steps=4,
                         lr=1e-3, log_every=1, progress=False)
    assert repeat["warmup_steps"] == 4 and repeat["stopped_by"] == "steps"
    repeated = [entry["lr"] for entry in repeat["history"]]
    assert repeated[:4] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])
    assert all(later < earlier for earlier, later in zip(repeated[4:], repeated[5:])) and repeated[-1] < 0.3e-3

    # The same seeds give the same weights.
    weights = []
    for _ in range(2):
        _, model, _ = toy_model(entries, seed=3)
        train_model(model, data, normalize, device=CPU, batch_size=4, max_steps=3, seed=5, progress=False)
        weights.append({name: p.detach().clone() for name, p in model.named_parameters()})
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not torch.equal(weights[0]["lm_head.weight"], toy_model(entries, seed=3)[1].lm_head.weight)


def test_a_resumed_training_continues_as_if_it_had_never_stopped(annotated):
    """The state handed to `on_checkpoint` (weights, optimizer, step, data order) resumes a run:
    3 steps, then 3 more from that state, end where 6 steps in one go end, bit for bit (CPU)."""
    data_root, entries = annotated
    tokenizer, model, processor = toy_model(entries)
    data = toy_data(entries, data_root, tokenizer, model)
    normalize = ImageNormalizer(processor.image_processor, CPU)
    common = dict(device=CPU, batch_size=4, max_steps=6, warmup_steps=2, seed=1, progress=False)
    train_model(model, data, normalize, **common)
    straight = {name: p.detach().clone() for name, p in model.named_parameters()}

    states = []
    _, model, _ = toy_model(entries)
    train_model(model, data, normalize, checkpoint_seconds=0.0, on_checkpoint=lambda m, log, state: states.append(state),
                **common)
    at_three = next(state for state in states if state["step"] == 3)
    _, model, _ = toy_model(entries, seed=9)       # other weights: resuming replaces them
    log = train_model(model, data, normalize, resume=at_three, **common)
    assert log["steps"] == 6 and log["sittings"] == 2 and log["stopped_by"] == "steps"
    assert [entry["step"] for entry in log["history"]][-1] == 6
    assert all(torch.equal(p, straight[name]) for name, p in model.named_parameters())


def test_a_run_stopped_by_its_budget_continues_when_rerun(tmp_path):
    """`run_seconds` ends this run's training early, unfinished: the state stays in `out`, no
    evaluation runs; the rerun reuses the tokenized data (rebuilding a damaged cache), continues
    the clock where it stopped, finishes, evaluates and removes the state. `early_weight` draws
    the first steps more often."""
    out = tmp_path / "run"
    common = dict(size="toy", demos=2, batch_size=4, train_seconds=11.0, eval_episodes=1, eval_num_envs=1,
                  eval_episode_length=2, expert_baseline=False, early_steps=3, early_weight=4, progress=False)
    first = train_small(TASK, out, run_seconds=1.0, eval_reserve_seconds=0.0, **common)
    assert first["training"]["stopped_by"] == "stop_seconds" and "eval" not in first
    assert 10.0 <= first["training"]["seconds"] < 11.0
    assert (out / "training_state.pt").is_file() and (out / "training_set.pt").is_file()
    info = json.loads((out / MODEL_DIR / TRAINING_FILE).read_text())
    assert info["finished"] is False and info["options"]["early_weight"] == 4
    assert "variation_weights" not in info["options"]     # recorded only when given
    entries = load_annotations(out / "annotations.json", out / "data")
    early = sum(episode_step(entry) < 3 for entry in entries)
    assert early == 6 and first["training"]["samples_per_epoch"] == len(entries) + 3 * early

    (out / "training_set.pt").write_bytes(b"not a torch file")
    second = train_small(TASK, out, **common)
    training = second["training"]
    assert training["sittings"] == 2 and training["stopped_by"] == "time" and training["steps"] > first["training"]["steps"]
    assert training["seconds"] >= 11.0 and training["max_steps"] == training["steps"]
    assert second["eval"]["episodes"] == 1 and second["eval"]["parse_errors"] == 0
    assert not (out / "training_state.pt").exists()
    assert json.loads((out / MODEL_DIR / TRAINING_FILE).read_text())["finished"] is True
    with pytest.raises(ValueError, match="expected its image at"):
        episode_step({"id": 3, "image": "episode0/front_rgb/last.png"})


def test_a_returned_checkpoint_continues_the_training_on_a_fresh_machine(tmp_path):
    """The model folder a call returns (weights and log, no optimizer state) continues its
    schedule in a fresh `out`, as on a fresh machine: from the step and the seconds where it
    paused, from its weights (the loss goes on from where it was, not from a new model's), and
    the first call's log kept. A folder from another command, or a finished one, is refused."""
    common = dict(size="toy", demos=2, batch_size=4, train_seconds=11.0, eval_episodes=0, progress=False)
    first = train_small(TASK, tmp_path / "call1", run_seconds=1.0, eval_reserve_seconds=0.0, **common)
    assert first["training"]["stopped_by"] == "stop_seconds"
    returned = tmp_path / "returned"
    shutil.copytree(tmp_path / "call1" / MODEL_DIR, returned)

    second = train_small(TASK, tmp_path / "call2", init_from=returned, **common)
    data_stage, training, before = second["stages"]["data"], second["training"], first["training"]
    assert data_stage["resumed_from"] == "weights" and data_stage["resumed_at_step"] == before["steps"]
    assert training["sittings"] == 2 and training["stopped_by"] == "time" and training["steps"] > before["steps"]
    assert training["seconds"] >= 11.0 and training["history"][:len(before["history"])] == before["history"]
    resumed = training["history"][len(before["history"])]
    # The loss goes on near where it paused, not from a new model's (about the first logged one).
    assert abs(resumed["loss"] - before["history"][-1]["loss"]) < abs(resumed["loss"] - before["history"][0]["loss"])
    assert json.loads((tmp_path / "call2" / MODEL_DIR / TRAINING_FILE).read_text())["finished"] is True

    with pytest.raises(ValueError, match=r"other options \(batch_size\)"):
        train_small(TASK, tmp_path / "call3", init_from=returned, **{**common, "batch_size": 2})
    with pytest.raises(ValueError, match="has finished its training"):
        train_small(TASK, tmp_path / "call3", init_from=tmp_path / "call2" / MODEL_DIR, **common)
    with pytest.raises(FileNotFoundError, match="expected a train-small model folder"):
        train_small(TASK, tmp_path / "call4", init_from=tmp_path / "nowhere", **common)
    assert not (tmp_path / "call4" / "data").exists()      # refused before any demo is recorded


def test_finetune_from_starts_a_new_schedule_from_a_finished_models_weights(tmp_path):
    """`finetune_from` (a DAgger round that goes on from the model it improves): the training
    starts from the finished model's weights (its first loss is near the base's last, far below a
    new model's first), on a schedule of its own (step 0, warm-up again), and the base's identity
    (a hash of its weights, not its path) is among the options. Unfinished folders, another size
    and another tokenizer are refused."""
    common = dict(size="toy", demos=2, batch_size=4, eval_episodes=0, progress=False)
    base = train_small(TASK, tmp_path / "base", train_seconds=11.0, **common)
    base_folder = tmp_path / "base" / MODEL_DIR
    moved = tmp_path / "elsewhere" / "base_model"
    shutil.copytree(base_folder, moved)

    tuned = train_small(TASK, tmp_path / "tuned", finetune_from=moved, max_steps=2, **common)
    assert tuned["stages"]["data"]["resumed_from"] == "finetune_from"
    history, before = tuned["training"]["history"], base["training"]["history"]
    assert history[0]["step"] == 2 and tuned["training"]["steps"] == 2
    assert abs(history[0]["loss"] - before[-1]["loss"]) < 0.5 * (before[0]["loss"] - before[-1]["loss"])
    fresh = train_small(TASK, tmp_path / "fresh", max_steps=2, **common)
    assert fresh["training"]["history"][0]["loss"] > history[0]["loss"] + 0.5 * (before[0]["loss"] - before[-1]["loss"])
    identity = tuned["options"]["finetune_from"]
    assert identity["name"] == "base_model" and len(identity["weights_sha256"]) == 16
    assert train_small(TASK, tmp_path / "tuned2", finetune_from=base_folder, max_steps=2,
                       **common)["options"]["finetune_from"]["weights_sha256"] == identity["weights_sha256"]

    unfinished = train_small(TASK, tmp_path / "paused", train_seconds=11.0, run_seconds=1.0, eval_reserve_seconds=0.0,
                             **common)
    assert unfinished["training"]["stopped_by"] == "stop_seconds"
    with pytest.raises(ValueError, match="has not finished its training; continue it with init_from"):
        train_small(TASK, tmp_path / "bad1", finetune_from=tmp_path / "paused" / MODEL_DIR, max_steps=2, **common)
    with pytest.raises(ValueError, match="is a 'toy' model of 'reach_target'; expected a 'small' model"):
        train_small(TASK, tmp_path / "bad2", finetune_from=moved, max_steps=2, **{**common, "size": "small"})
    assert not (tmp_path / "bad2" / "data").exists()      # refused before any demo is recorded
    with pytest.raises(ValueError, match="tokenizer is not the one this run builds"):
        train_small(TASK, tmp_path / "bad3", finetune_from=moved, max_steps=2, visual_trace=True, trace_points=3,
                    **common)


def test_a_dagger_round_continued_on_a_fresh_machine_replays_its_takeover_instead_of_driving(tmp_path):
    """The checkpoint of a DAgger round holds its takeover set's driven steps; a call that
    continues it in a fresh `out` (`init_from`, a fresh machine) replays them: the same takeover
    episodes, byte for byte, without driving a single attempt."""
    from llarva_gym.recording import DRIVEN_STARTS_FILE

    common = dict(size="toy", demos=2, batch_size=4, visual_trace=True, trace_points=3, eval_episodes=0,
                  progress=False)
    train_small(TASK, tmp_path / "round1", max_steps=2, **common)
    dagger = dict(driver=str(tmp_path / "round1" / MODEL_DIR), takeover_demos=2, takeover_steps=3,
                  takeover_num_envs=2, train_seconds=11.0, **common)
    first = train_small(TASK, tmp_path / "call1", run_seconds=1.0, eval_reserve_seconds=0.0, **dagger)
    assert first["training"]["stopped_by"] == "stop_seconds"
    assert first["stages"]["takeover"]["driving_seconds"] > 0 and first["stages"]["takeover"]["replayed"] == 0
    returned = tmp_path / "returned"
    shutil.copytree(tmp_path / "call1" / MODEL_DIR, returned)
    assert (returned / f"takeover_{DRIVEN_STARTS_FILE}").is_file()

    second = train_small(TASK, tmp_path / "call2", init_from=returned, **dagger)
    takeover = second["stages"]["takeover"]
    assert takeover["driving_seconds"] is None and takeover["replayed"] == takeover["episodes"] + takeover["failures"]
    assert second["stages"]["data"]["resumed_from"] == "weights"

    def files(root):
        return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}
    assert files(tmp_path / "call2" / "takeover") == files(tmp_path / "call1" / "takeover")

    # A later round needs only the driven steps of an earlier driver, in that driver's place: the
    # same takeover set, replayed, where the driver model is not at hand.
    steps_only = returned / f"takeover_{DRIVEN_STARTS_FILE}"
    shutil.rmtree(tmp_path / "round1" / MODEL_DIR)
    third = train_small(TASK, tmp_path / "call3", **{**dagger, "driver": str(steps_only), "max_steps": 1})
    takeover = third["stages"]["takeover"]
    assert takeover["driving_seconds"] is None and takeover["replayed"] == takeover["episodes"] + takeover["failures"]
    assert files(tmp_path / "call3" / "takeover") == files(tmp_path / "call1" / "takeover")
    # In another place (the k-th driver's episodes have demo seed demo_seed + 1 + k) they cannot
    # replay, and there is no model to drive the attempts: the error says so.
    with pytest.warns(RuntimeWarning, match="recorded with other settings"), \
            pytest.raises(ValueError, match=r"holds .* driven steps, not a model, and this run needs attempts"):
        train_small(TASK, tmp_path / "call4", **{**dagger, "driver": [str(steps_only)] * 2, "max_steps": 1})
    (tmp_path / "damaged.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="damaged.npz: not a readable driven-starts file"):
        train_small(TASK, tmp_path / "call5", **{**dagger, "driver": str(tmp_path / "damaged.npz")})
    assert not (tmp_path / "call5").exists()          # refused before any demo is recorded

    # takeover_weight: the takeover set's samples (and only they) are drawn that many times per epoch.
    from llarva_policy.train_small import is_takeover_sample, sample_repeats
    entries = load_annotations(tmp_path / "call1" / "annotations.json", tmp_path / "call1" / "data")
    takeover = json.loads((tmp_path / "call1" / "takeover_annotations.json").read_text())
    marked = [is_takeover_sample(entry) for entry in entries]
    assert sum(marked) == len(takeover) > 0 and not any(marked[:len(entries) - len(takeover)])
    repeats = sample_repeats(entries, tmp_path / "call1" / "data", takeover_weight=3)
    assert repeats.tolist() == [3 if m else 1 for m in marked]
    with pytest.raises(ValueError, match="takeover_weight: weights the takeover demos, so it needs a driver"):
        train_small(TASK, tmp_path / "call3", takeover_weight=3, max_steps=2, **common)


def test_dagger_from_runs_the_next_round_from_the_last_checkpoint_alone(tmp_path):
    """`--dagger-from MODEL`: MODEL's takeover sets come back from the driven steps it carries, in
    their places, MODEL drives one more, and the training starts from MODEL's weights; no earlier
    model is needed (the tokenizer learns from the demos' conversations alone, so every round
    builds MODEL's, with however few demos). A folder without the driven steps of every set it was
    trained on is refused."""
    from llarva_gym.recording import DRIVEN_STARTS_FILE
    from llarva_policy.train_small import next_dagger_drivers

    common = dict(size="toy", demos=2, batch_size=4, visual_trace=True, trace_points=3, eval_episodes=0,
                  progress=False)
    train_small(TASK, tmp_path / "round1", max_steps=2, **common)
    first = tmp_path / "round1" / MODEL_DIR
    train_small(TASK, tmp_path / "round2", driver=str(first), takeover_demos=2, takeover_steps=3, takeover_num_envs=2,
                max_steps=1, finetune_from=str(first), **common)
    model = tmp_path / "model2"
    shutil.copytree(tmp_path / "round2" / MODEL_DIR, model)
    shutil.rmtree(tmp_path / "round1")                     # the first round's model is gone
    assert next_dagger_drivers(model) == [str(model / f"takeover_{DRIVEN_STARTS_FILE}"), str(model)]

    out = tmp_path / "round3"
    llarva_main(["train-small", "--task", TASK, "--out", str(out), "--size", "toy", "--demos", "2", "--batch-size", "4",
                 "--visual-trace", "--trace-points", "3", "--eval-episodes", "0", "--max-steps", "1",
                 "--takeover-demos", "2", "--takeover-steps", "3", "--takeover-num-envs", "2",
                 "--dagger-from", str(model)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["driver"] == next_dagger_drivers(model)
    assert summary["options"]["finetune_from"]["name"] == "model2"
    replayed, driven = summary["stages"]["takeover"], summary["stages"]["takeover1"]
    assert replayed["driving_seconds"] is None and replayed["replayed"] == replayed["episodes"] + replayed["failures"]
    assert driven["driving_seconds"] > 0 and driven["replayed"] == 0
    assert sorted(f.name for f in (out / MODEL_DIR).glob("takeover*.npz")) == [
        f"takeover1_{DRIVEN_STARTS_FILE}", f"takeover_{DRIVEN_STARTS_FILE}"]     # the round after it can follow

    with pytest.raises(ValueError, match="dagger_from: sets --driver and --finetune-from itself"):
        llarva_main(["train-small", "--task", TASK, "--out", str(tmp_path / "bad"), "--dagger-from", str(model),
                     "--driver", str(model)])
    (model / f"takeover_{DRIVEN_STARTS_FILE}").unlink()
    with pytest.raises(FileNotFoundError, match=r"trained on 1 takeover set\(s\) but lacks the driven steps of "
                                                r"\['takeover_driven_starts.npz'\]"):
        next_dagger_drivers(model)
    with pytest.raises(FileNotFoundError, match="is not a train-small model folder"):
        next_dagger_drivers(tmp_path / "nothing")
    assert not (tmp_path / "bad").exists()



def test_dagger_rounds_run_the_chain_as_one_run_that_a_rerun_continues(tmp_path):
    """`--dagger-rounds N`: a training from random weights, then rounds 1..N, each driven by and
    going on from the one before, kept as <out>/rounds/round<k>. A call cut short by its budget is
    continued by the same command, a larger N extends the chain, the same N changes nothing, and a
    fresh out starts after a carried round. Other options into the same out are refused."""
    from llarva_gym.recording import DRIVEN_STARTS_FILE
    from llarva_policy.train_small import ROUNDS_DIR, TRAINING_FILE, dagger_round, train_dagger_rounds

    common = dict(size="toy", demos=2, batch_size=4, visual_trace=True, trace_points=3, eval_episodes=0,
                  progress=False, takeover_demos=2, takeover_steps=3, takeover_num_envs=2, takeover_weight=2)
    # Round 0 trains 10.5 s: a sitting lasts at least 10 s (sitting_seconds), so a tiny budget pauses it.
    chain = dict(round_seconds=1.0, round_lr=1e-4, train_seconds=10.5, **common)
    out, export = tmp_path / "chain", tmp_path / "export"
    export.mkdir()

    def options(k, root=out):
        return json.loads((root / ROUNDS_DIR / f"round{k}" / TRAINING_FILE).read_text())["options"]

    # A budget spent before round 0's training ends: paused, nothing kept; the rerun goes on.
    paused = train_dagger_rounds(TASK, out, rounds=2, run_seconds=1.0, export=export, **chain)
    assert paused["training"]["stopped_by"] == "stop_seconds" and paused["rounds"] == []
    # Round 0 finished with less than ROUND_START_SECONDS left: round 1 is left to the next call.
    budget = train_dagger_rounds(TASK, out, rounds=2, run_seconds=60.0, export=export, **chain)
    assert budget["training"]["stopped_by"] == "time" and [r["round"] for r in budget["rounds"]] == [0]
    summary = train_dagger_rounds(TASK, out, rounds=2, export=export, **chain)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert summary["training"]["sittings"] == 1 and summary["options"]["lr"] == 1e-4
    assert [dagger_round(out / ROUNDS_DIR / f"round{k}") for k in range(3)] == [0, 1, 2]
    assert "driver" not in options(0) and options(0)["lr"] == 1e-3 and options(0)["train_seconds"] == 10.5
    round0 = json.loads((out / ROUNDS_DIR / "round0" / TRAINING_FILE).read_text())["training"]
    assert round0["sittings"] == 2 and round0["stopped_by"] == "time"     # the paused call's training, continued
    round1 = str(out / ROUNDS_DIR / "round1")
    assert options(2)["driver"] == [f"{round1}/takeover_{DRIVEN_STARTS_FILE}", round1]
    assert options(2)["finetune_from"]["name"] == "round1" and options(2)["takeover_weight"] == 2
    assert (options(2)["train_seconds"], options(2)["lr"]) == (1.0, 1e-4)
    assert summary["stages"]["takeover1"]["driver"] == round1            # round 1 drove round 2's new set
    assert sorted(f.name for f in export.glob("*_model.tar")) == [f"train_small_{TASK}_model.tar",
                                                                   f"train_small_{TASK}_round2_model.tar"]

    # The same command again: every round kept, the last one's model reused, nothing trained.
    weights = (out / ROUNDS_DIR / "round2" / "model.safetensors").read_bytes()
    again = train_dagger_rounds(TASK, out, rounds=2, export=export, **chain)
    assert again["rounds"] == summary["rounds"] and "reused" in again["stages"]["training"]
    # A larger N from the CLI extends it: round 3 goes on from round 2.
    llarva_main(["train-small", "--task", TASK, "--out", str(out), "--size", "toy", "--demos", "2", "--batch-size", "4",
                 "--visual-trace", "--trace-points", "3", "--eval-episodes", "0", "--train-seconds", "10.5",
                 "--takeover-demos", "2", "--takeover-steps", "3", "--takeover-num-envs", "2", "--takeover-weight", "2",
                 "--dagger-rounds", "3", "--dagger-seconds", "1", "--dagger-lr", "1e-4"])
    assert dagger_round(out / ROUNDS_DIR / "round3") == 3 and options(3)["finetune_from"]["name"] == "round2"
    assert (out / ROUNDS_DIR / "round2" / "model.safetensors").read_bytes() == weights
    with pytest.raises(ValueError, match=r"holds the rounds of a chain with other options \(round_lr\)"):
        train_dagger_rounds(TASK, out, rounds=3, **{**chain, "round_lr": 2e-4})
    with pytest.raises(ValueError, match="holds round 3 already; expected rounds >= 3"):
        train_dagger_rounds(TASK, out, rounds=2, **chain)

    # A fresh machine: round 1 carried, the chain goes on after it in a new out; the round in a
    # fresh process, as on CUDA (where forked EGL workers cannot follow a process that started CUDA).
    carried = tmp_path / "carried" / "round1"
    shutil.copytree(out / ROUNDS_DIR / "round1", carried)
    fresh = train_dagger_rounds(TASK, tmp_path / "fresh", rounds=2, dagger_from=carried, isolate_rounds=True, **chain)
    assert [r["round"] for r in fresh["rounds"]] == [2] and fresh["rounds"][0]["from"] == str(carried)
    assert options(2, tmp_path / "fresh")["finetune_from"] == options(2)["finetune_from"]   # same name, same weights
    assert fresh["stages"]["takeover"]["replayed"] > 0                  # round 0's set from round 1's driven steps

    for bad, message in ((dict(dagger_from=out / ROUNDS_DIR / "round3"), "is round 3; rounds=3 asks for none after it"),
                         (dict(driver=round1), "driver: the rounds of a chain set their drivers"),
                         (dict(init_from=round1), "init_from: a chain continues a paused round from the state in out"),
                         (dict(takeover_demos=0), "takeover_demos: expected an int >= 1"),
                         (dict(train_seconds=None), "train_seconds: expected round 0's seconds")):
        with pytest.raises(ValueError, match=message):
            train_dagger_rounds(TASK, tmp_path / "bad", rounds=3, **{**chain, **bad})
    with pytest.raises(ValueError, match="rounds: expected an int >= 1"):
        train_dagger_rounds(TASK, tmp_path / "bad", rounds=0, **chain)
    assert not (tmp_path / "bad").exists()


def test_the_evaluation_reserve_is_kept_only_where_the_training_can_finish():
    from llarva_policy.train_small import PAUSE_MARGIN_SECONDS, sitting_seconds

    # 300 s of training left in a call with 500 s: train 400, keep 100 for the evaluation.
    assert sitting_seconds(500.0, 100.0, 300.0, evaluates=True) == 400.0
    # 450 s left: it could finish but the evaluation would not fit: pause at 400, finish in the next call.
    assert sitting_seconds(500.0, 100.0, 450.0, evaluates=True) == 400.0
    # 700 s left: this call cannot finish it: train to the budget's end, less the margin for the state.
    assert sitting_seconds(500.0, 100.0, 700.0, evaluates=True) == 500.0 - PAUSE_MARGIN_SECONDS
    assert sitting_seconds(500.0, 100.0, 300.0, evaluates=False) == 500.0 - PAUSE_MARGIN_SECONDS
    assert sitting_seconds(500.0, 5.0, 700.0, evaluates=True) == 495.0   # a reserve below the margin stays
    assert sitting_seconds(500.0, 100.0, None, evaluates=True) == 400.0   # a step schedule: not known on the clock
    assert sitting_seconds(20.0, 100.0, 300.0, evaluates=True) == 10.0    # at least 10 s a sitting


def test_a_training_fitted_to_the_run_finishes_in_it(tmp_path):
    """`train_seconds=None`: the training takes what `run_seconds` leaves after the demos and
    the reserve, and finishes (the schedule ends with it): no state is left, the evaluation runs."""
    with pytest.raises(ValueError, match="needs run_seconds"):
        train_small(TASK, tmp_path / "bad", train_seconds=None, progress=False)
    out = tmp_path / "run"
    summary = train_small(TASK, out, size="toy", demos=2, batch_size=4, train_seconds=None, run_seconds=40.0,
                          eval_reserve_seconds=25.0, eval_episodes=1, eval_num_envs=1, eval_episode_length=2,
                          expert_baseline=False, progress=False)
    training = summary["training"]
    assert training["stopped_by"] == "time" and training["sittings"] == 1
    assert 10.0 <= training["seconds"] < 40.0 - 25.0 + 1.0
    assert summary["eval"]["episodes"] == 1 and not (out / "training_state.pt").exists()


def test_a_dagger_round_trains_on_demos_and_takeover_demos_driven_by_the_last_model(tmp_path):
    """`driver` + `takeover_demos`: the earlier round's model drives the first steps of more
    episodes (another demo seed), the expert finishes them; their samples join the annotation
    file the training reads (images relative to the data root), the driven steps left out."""
    from llarva_gym import recording

    common = dict(size="toy", demos=2, batch_size=4, max_steps=2, visual_trace=True, trace_points=3, eval_episodes=0,
                  progress=False)
    first = tmp_path / "round1"
    train_small(TASK, first, **common)
    out = tmp_path / "round2"
    summary = train_small(TASK, out, driver=str(first / MODEL_DIR), takeover_demos=2, takeover_steps=3, **common)
    assert summary["options"]["driver"] == str(first / MODEL_DIR) and summary["stages"]["takeover"]["episodes"] == 2
    takeover = episode_dirs(out / "takeover", TASK)
    infos = [json.loads((folder / recording.EPISODE_INFO).read_text()) for folder in takeover]
    assert all(info["driver"] == str((first / MODEL_DIR).resolve()) and info["seed"] == 1 for info in infos)
    entries = load_annotations(out / "annotations.json", out / "data")
    extra = [e for e in entries if e["image"].startswith("../takeover/")]
    assert len(extra) == summary["stages"]["takeover"]["samples"] > 0
    assert len(entries) == summary["stages"]["annotations"]["samples"] == len(extra) + sum(
        len(load_demo(folder, load_images=False)) - 1 for folder in episode_dirs(out / "data", TASK))
    assert len({e["id"] for e in entries}) == len(entries)
    driven = {folder.name: recording.takeover_step(info["reset_seed"], 3) for folder, info in zip(takeover, infos)}
    for entry in extra:       # no sample of a step the driver took
        assert episode_step(entry) >= driven[Path(entry["image"]).parts[-3]]
    assert summary["training"]["steps"] == 2
    # The driver answered as it was trained: with a visual trace (its llarva_train_small.json says so).
    assert driver_loader(first / MODEL_DIR).keywords["with_visual_trace"] is True
    assert driver_loader(first / MODEL_DIR, visual_trace=False).keywords["with_visual_trace"] is False

    # The next round into the same `out`, DAgger's aggregation: this round's model added to the
    # list drives its own takeover demos (batched, two at a time in this process), the first
    # driver's are reused as they are, and the model trains on all three sets.
    previous = {path: path.read_bytes() for path in (out / "takeover").rglob("*") if path.is_file()}
    shutil.copytree(out / MODEL_DIR, tmp_path / "round2_model")
    summary = train_small(TASK, out, driver=[str(first / MODEL_DIR), str(tmp_path / "round2_model")],
                          takeover_demos=2, takeover_steps=3, takeover_num_envs=2, **common)
    assert summary["options"]["driver"] == [str(first / MODEL_DIR), str(tmp_path / "round2_model")]
    assert {path: path.read_bytes() for path in (out / "takeover").rglob("*") if path.is_file()} == previous
    assert summary["stages"]["takeover1"]["driven_at_a_time"] == 2
    infos = [json.loads((folder / recording.EPISODE_INFO).read_text()) for folder in episode_dirs(out / "takeover1", TASK)]
    assert len(infos) == 2 and all(info["seed"] == 2 and info["driver"] == str((tmp_path / "round2_model").resolve())
                                   for info in infos)
    entries = load_annotations(out / "annotations.json", out / "data")
    assert sum(e["image"].startswith("../takeover1/") for e in entries) == summary["stages"]["takeover1"]["samples"] > 0
    assert sum(e["image"].startswith("../takeover/") for e in entries) == len(extra)

    # The command line: --driver repeats, oldest first, into the same list.
    from llarva_policy import cli
    args = cli._parser("train-small").parse_args(["--task", TASK, "--out", "o", "--driver", "r8", "--driver", "r10",
                                                  "--takeover-demos", "2", "--takeover-num-envs", "0"])
    assert args.driver == ["r8", "r10"] and args.takeover_num_envs == 0

    with pytest.raises(ValueError, match="driver and takeover_demos go together"):
        train_small(TASK, tmp_path / "bad", takeover_demos=2, **common)
    with pytest.raises(ValueError, match="takeover_num_envs"):
        train_small(TASK, tmp_path / "bad", driver=str(first / MODEL_DIR), takeover_demos=2, takeover_num_envs=-1,
                    **common)
    with pytest.raises(FileNotFoundError, match="driver: .* is not a model folder"):
        train_small(TASK, tmp_path / "bad", driver=str(tmp_path / "nowhere"), takeover_demos=2, **common)


def test_a_step_schedule_fitted_to_the_run_is_paused_not_cut(tmp_path):
    """`train_seconds=None` with `max_steps` (a repeat of an earlier run's schedule): a run that
    runs out of time before the last step leaves the training unfinished, to continue, rather
    than calling a model whose learning rate never decayed finished and evaluating it."""
    out = tmp_path / "run"
    summary = train_small(TASK, out, size="toy", demos=2, batch_size=4, train_seconds=None, max_steps=10 ** 6,
                          run_seconds=1.0, eval_reserve_seconds=0.0, eval_episodes=1, eval_num_envs=1,
                          eval_episode_length=2, expert_baseline=False, progress=False)
    training = summary["training"]
    assert training["stopped_by"] == "stop_seconds" and training["max_steps"] == 10 ** 6
    assert 0 < training["steps"] < 10 ** 6 and "eval" not in summary
    assert (out / "training_state.pt").is_file()
    assert "paused at step" in format_summary(summary)


@pytest.mark.slow
def test_a_trained_model_writes_back_the_answers_it_was_trained_on(annotated, tmp_path):
    """Training text and inference prompts agree: a model trained to memorise four samples answers
    them exactly, from prompts built by the processor and decoded by the policy's generator."""
    data_root, entries = annotated
    entries = entries[:4]
    tokenizer, model, processor = toy_model(entries)
    data = toy_data(entries, data_root, tokenizer, model)
    log = train_model(model, data, ImageNormalizer(processor.image_processor, CPU), device=CPU, batch_size=4,
                      lr=5e-3, warmup_steps=10, max_steps=200, progress=False)
    assert log["history"][-1]["answer_token_accuracy"] == 1.0
    save_checkpoint(model, processor, tmp_path / "model", {})
    loaded = load_llava(tmp_path / "model", device="cpu")
    loaded.tokenizer.padding_side = "left"
    for entry in entries:
        question, answer = conversation_turns(entry)
        with Image.open(data_root / entry["image"]) as image:
            inputs = loaded.processor(images=[image.convert("RGB")], text=[codec.build_prompt(question)],
                                      return_tensors="pt")
        assert generate_text(loaded, inputs, max_new_tokens=80, constrained=True) == [answer]


@pytest.mark.parametrize("size, tokens, tower", [("small-patch8", 256, "CLIPVisionModel"),
                                                  ("small-swin", 64, "SwinModel"),
                                                  ("small-swin-256", 256, "SwinModel"),
                                                  ("small-focal", 64, "FocalNetModel")])
def test_other_tower_shapes_write_their_image_tokens_and_load_back(annotated, tmp_path, size, tokens, tower):
    data_root, entries = annotated
    tokenizer = build_tokenizer(corpus_texts=[codec.build_conversation_text(*conversation_turns(e)) for e in entries])
    assert build_model(tokenizer, "small")[0].config.image_seq_length == 64
    model, processor = build_model(tokenizer, size)
    assert model.config.image_seq_length == tokens
    save_checkpoint(model, processor, tmp_path / "model", {})
    loaded = load_llava(tmp_path / "model", device="cpu")   # checks the processor against the tower
    assert loaded.num_image_tokens == tokens and type(loaded.model.model.vision_tower).__name__ == tower
    image_token = loaded.tokenizer.convert_tokens_to_ids(codec.IMAGE_TOKEN)
    question, _ = conversation_turns(entries[0])
    with Image.open(data_root / entries[0]["image"]) as image:
        inputs = loaded.processor(images=[image.convert("RGB")], text=[codec.build_prompt(question)],
                                  return_tensors="pt")
    assert int((inputs["input_ids"] == image_token).sum()) == tokens
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    # Each image token sees its own part of the image: changing the top-left 8x8 pixels changes
    # the first token's features more than the last's (the Swin's windows, the ViT's patches,
    # the FocalNet's convolutions).
    pixels = inputs["pixel_values"].clone()
    pixels[..., :8, :8] += 1.0
    with torch.no_grad():
        before = loaded.model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        after = loaded.model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    change = (after - before).norm(dim=-1)
    assert change.shape == (tokens,) and change[0] > 10 * change[-1]


def test_recipe_end_to_end_at_toy_scale(tmp_path):
    out, export = tmp_path / "run", tmp_path / "export"
    llarva_main(["train-small", "--task", TASK, "--out", str(out), "--export", str(export), "--size", "toy",
                 "--demos", "2", "--max-steps", "3", "--batch-size", "8", "--eval-episodes", "1",
                 "--eval-num-envs", "1", "--eval-episode-length", "3"])

    assert sorted(p.name for p in export.iterdir()) == [
        f"train_small_{TASK}.json", f"train_small_{TASK}_eval.json", f"train_small_{TASK}_expert.json",
        f"train_small_{TASK}_model.tar", f"train_small_{TASK}_rollout.mp4"]
    summary = json.loads((export / f"train_small_{TASK}.json").read_text())
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["options"]["demos"] == 2 and summary["training"]["steps"] == 3
    assert summary["training"]["stopped_by"] == "steps" and summary["model"]["image_tokens"] == 16
    assert summary["eval"]["episodes"] == 1 and summary["eval"]["parse_errors"] == 0
    assert summary["expert"]["episodes"] == 1
    # The data stage says where its time went (built, not read from a cache, on a first run).
    assert {"tokenizer_and_model", "tokenize", "pad", "images", "pack", "cache_write", "rest"} == set(
        summary["stages"]["data"]["seconds"])
    assert all(seconds >= 0 for seconds in summary["stages"]["data"]["seconds"].values())
    results = json.loads((export / f"train_small_{TASK}_eval.json").read_text())
    expert = json.loads((export / f"train_small_{TASK}_expert.json").read_text())
    assert [r["reset_seed"] for r in results["episodes"]] == [r["reset_seed"] for r in expert["episodes"]]
    with tarfile.open(export / f"train_small_{TASK}_model.tar") as tar:
        assert f"train_small_{TASK}_model/config.json" in tar.getnames()

    # The tokenizer was trained on the annotation text: the one built from it, not the built-in one.
    model_dir = out / MODEL_DIR
    saved = load_llava(model_dir, device="cpu").tokenizer
    entries = load_annotations(out / "annotations.json", out / "data")
    texts = [codec.build_conversation_text(*conversation_turns(e)) for e in entries]
    assert saved.get_vocab() == build_tokenizer(corpus_texts=texts).get_vocab()
    assert saved.get_vocab() != build_tokenizer().get_vocab()
    # Saved in bf16, in transformers' layout; LlarvaPolicy loads it and acts.
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    policy = LlarvaPolicy.from_pretrained(model_dir, device="cpu", constrained=True)
    env = gym.make(f"llarva/{TASK}")
    observation, _ = env.reset(seed=0)
    action, _ = policy.predict(observation)
    env.close()
    assert action.shape == (8,) and np.isfinite(action).all() and policy.last_info[0]["parse_error"] is None

    # A rerun keeps the finished model and continues the evaluation: one more episode, run in a
    # fresh process (as after training on a GPU, where a forked env worker could not render).
    info = json.loads((model_dir / TRAINING_FILE).read_text())
    assert info["finished"] is True
    rerun = train_small(TASK, out, size="toy", demos=2, max_steps=3, batch_size=8, eval_episodes=2,
                        eval_num_envs=1, eval_episode_length=3, expert_baseline=False, isolate_evaluation=True,
                        export=export, progress=False)
    assert "reused" in rerun["stages"]["training"]
    assert rerun["eval"]["episodes"] == 2 and rerun["eval"]["parse_errors"] == 0
    rerun_results = json.loads((export / f"train_small_{TASK}_eval.json").read_text())
    assert [r["index"] for r in rerun_results["episodes"]] == [0, 1]
    assert rerun_results["episodes"][0] == results["episodes"][0]     # kept, not run again


def test_recipe_with_visual_trace_and_history_noise(tmp_path):
    """LLARVA's visual trace (here 3 points) before the action and noise on the joint history:
    the annotations carry both, the trained model answers with a trace that parses, and
    `eval_episodes=0` leaves the evaluation to `llarva eval`."""
    out, export = tmp_path / "run", tmp_path / "export"
    summary = train_small(TASK, out, size="toy", demos=2, max_steps=2, batch_size=8, eval_episodes=0,
                          visual_trace=True, trace_points=3, history_noise=0.01, export=export, progress=False)
    assert summary["options"]["visual_trace"] is True and summary["options"]["trace_points"] == 3
    assert "eval" not in summary and "expert" not in summary
    assert sorted(p.name for p in export.iterdir()) == [f"train_small_{TASK}.json", f"train_small_{TASK}_model.tar"]

    entries = load_annotations(out / "annotations.json", out / "data")
    clean_history = "[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], ["
    for entry in entries:
        question, answer = conversation_turns(entry)
        parsed = codec.parse_answer(answer, expect_trace=True)
        assert parsed.trace.shape == (3, 2)
    # Noise: the same step of the same demo, annotated without noise, reads differently.
    first_steps = [conversation_turns(e)[0] for e in entries if clean_history in conversation_turns(e)[0]]
    assert first_steps
    demo = load_demo(episode_dirs(out / "data", TASK)[0], load_images=False)
    exact = codec.format_history([demo[0].joint_positions])
    assert all(exact not in question for question in first_steps)

    policy = LlarvaPolicy.from_pretrained(out / MODEL_DIR, device="cpu", constrained=True, with_visual_trace=True)
    env = gym.make(f"llarva/{TASK}")
    observation, _ = env.reset(seed=0)
    action, _ = policy.predict(observation)
    env.close()
    assert action.shape == (8,) and policy.last_info[0]["parse_error"] is None
    assert policy.last_info[0]["trace"] is not None


def test_recipe_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="render_quality"):
        train_small(TASK, tmp_path, render_quality="best", progress=False)
    with pytest.raises(ValueError, match="eval_episodes"):
        train_small(TASK, tmp_path, eval_episodes=-1, progress=False)
    with pytest.raises(ValueError, match="trace_points"):
        train_small(TASK, tmp_path, trace_points=0, progress=False)
    with pytest.raises(ValueError, match="early_weight"):
        train_small(TASK, tmp_path, early_weight=0, progress=False)


@pytest.mark.parametrize("goal_points", ["last", "future"])
def test_goal_tokens_are_the_trace_points_asked_for_and_weight_the_loss(tmp_path, goal_points):
    """`goal_span` finds the trace's last point (or every point after the first) in the answer;
    the goal mask marks exactly the label positions that predict its tokens; `goal_weight`
    changes the training loss only."""
    action_only = "The next action step: [0.1, -0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]"
    assert goal_span(action_only) is None and goal_span(action_only, "future") is None
    answer = codec.format_answer(np.r_[np.full(7, 0.25), 1.0], np.array([[10, 20], [30, 40], [57, 61]]))
    start, end = goal_span(answer)
    assert answer[start:end] == "[57, 61]"
    start, end = goal_span(answer, "future")
    assert answer[start:end] == "[30, 40], [57, 61]"
    one_point = codec.format_answer(np.r_[np.full(7, 0.25), 1.0], np.array([[10, 20]]))
    assert goal_span(one_point, "future") is None and goal_span(one_point) is not None
    with pytest.raises(ValueError, match="goal_points"):
        goal_span(answer, "first")

    root = tmp_path
    entries, tokenizer, model, _, data = toy_trace_data(root, goal_points)
    for row, entry in enumerate(entries):
        answer = conversation_turns(entry)[1]
        start, end = goal_span(answer, goal_points)
        goal = data.goal[row].numpy()
        # Position i predicts token i + 1: the goal's tokens are those that overlap the last point
        # (a token may reach past it, as "]]." does).
        decoded = tokenizer.decode(data.input_ids[row, 1:][torch.from_numpy(goal[:-1])].tolist()).replace(" ", "")
        point = answer[start:end].replace(" ", "")
        assert point in decoded and len(decoded) <= len(point) + 3
        assert (data.labels[row][torch.from_numpy(goal)] != IGNORE_INDEX).all()   # goal tokens are labelled

    normalize = ImageNormalizer(build_model(tokenizer, "toy")[1].image_processor, CPU)
    with torch.no_grad():
        args = (model, data.input_ids, data.labels, normalize(data.images), data.goal)
        plain, mean, _ = answer_loss(*args, goal_weight=1.0)
        weighted, mean_again, _ = answer_loss(*args, goal_weight=10.0)
    assert plain == mean and torch.allclose(mean, mean_again)
    assert not torch.allclose(weighted, mean)


def test_answer_weights_weigh_the_tokens_by_what_they_write(tmp_path):
    """Every labelled answer token has the kind it writes (seven integer digits and seven first
    decimals per action, a sign for each negative velocity); `answer_weights` turns the mean over
    tokens into the mean weighted by kind (and times the goal's weight), the logged mean unchanged."""
    entries, tokenizer, model, processor, data = toy_trace_data(tmp_path, "future")
    code = {name: i for i, name in enumerate(codec.ANSWER_KINDS)}
    unread = build_training_set(entries, tmp_path / "data", tokenizer, num_image_tokens=model.config.image_seq_length,
                                pad_token_id=tokenizer.pad_token_id, kinds=False)
    assert not unread.kind.any() and (unread.input_ids == data.input_ids).all()     # kinds only when asked for
    for row, entry in enumerate(entries):
        action = codec.parse_answer(conversation_turns(entry)[1], expect_trace=True).action
        kind = data.kind[row]
        labelled = data.labels[row, 1:] != IGNORE_INDEX
        assert (kind[:-1][~labelled] == 0).all() and kind[-1] == 0     # only labelled positions have a kind
        written = kind[:-1][labelled].tolist()
        assert written.count(code["integer_digit"]) == written.count(code["decimal1"]) == 7
        assert written.count(code["sign"]) == int(np.signbit(action[:7]).sum())     # -0.0 written too
        assert written.count(code["trace_digit"]) >= 6 and code["gripper"] in written

    normalize = ImageNormalizer(processor.image_processor, CPU)
    args = (model, data.input_ids, data.labels, normalize(data.images))
    with torch.no_grad():
        mean = answer_loss(*args)[1]
        # the mean cross-entropy of each kind's tokens alone, and how many there are
        alone, counts = {}, {}
        for name in codec.ANSWER_KINDS:
            one_hot = torch.tensor([float(other == name) for other in codec.ANSWER_KINDS])
            counts[name] = int((data.kind[:, :-1][data.labels[:, 1:] != IGNORE_INDEX] == code[name]).sum())
            if counts[name]:
                alone[name] = answer_loss(*args, kind=data.kind, kind_weights=one_hot)[0]
        weights = {"sign": 3.0, "decimal1": 3.0, "decimal3": 0.1, "decimal4": 0.0}
        table = torch.tensor([weights.get(name, 1.0) for name in codec.ANSWER_KINDS])
        weighted, mean_again, _ = answer_loss(*args, kind=data.kind, kind_weights=table)
        with_goal = answer_loss(*args, data.goal, 10.0, data.kind, table)[0]
    total = sum(counts.values())
    assert total == int((data.labels[:, 1:] != IGNORE_INDEX).sum())
    assert float(mean) == pytest.approx(sum(counts[k] * float(alone[k]) for k in alone) / total, rel=1e-4)
    expected = (sum(weights.get(k, 1.0) * counts[k] * float(alone[k]) for k in alone)
                / sum(weights.get(k, 1.0) * counts[k] for k in alone))
    assert float(weighted) == pytest.approx(expected, rel=1e-4) and torch.allclose(mean, mean_again)
    assert abs(float(weighted) - float(mean)) > 1e-3 and abs(float(with_goal) - float(weighted)) > 1e-4


def test_answer_weights_name_known_kinds_and_weights_of_zero_or_more(tmp_path):
    assert check_answer_weights(None) is None and check_answer_weights({"sign": 1}) is None
    assert check_answer_weights({"decimal4": 0, "sign": 3}) == {"sign": 3.0, "decimal4": 0.0}
    for bad, field in (({"digit": 2}, "unknown kind 'digit'"), ({"sign": -1}, "sign=-1"),
                       ({"sign": float("nan")}, "sign=nan"), ({"sign": "3"}, "sign='3'"), ([("sign", 3)], "expected a mapping"),
                       ({k: 0 for k in codec.ANSWER_KINDS}, "every kind weighs 0")):
        with pytest.raises(ValueError, match=f"answer_weights: .*{field}" if "=" not in field else field):
            check_answer_weights(bad)
    with pytest.raises(ValueError, match="answer_weights: unknown kind"):
        train_small(TASK, tmp_path, answer_weights={"decimal5": 0.0}, progress=False)
    # Recorded among the options (a model trained with other weights is trained again, not reused).
    common = dict(size="toy", demos=1, batch_size=4, max_steps=2, visual_trace=True, trace_points=3, eval_episodes=0,
                  progress=False)
    first = train_small(TASK, tmp_path / "run", answer_weights={"sign": 3, "decimal4": 0.1}, **common)
    assert first["options"]["answer_weights"] == first["training"]["answer_weights"] == {"sign": 3.0, "decimal4": 0.1}
    again = train_small(TASK, tmp_path / "run", answer_weights={"sign": 3, "decimal4": 0.1}, **common)
    assert again["stages"]["training"].get("reused")
    other = train_small(TASK, tmp_path / "run", answer_weights={"sign": 2}, **common)
    assert not other["stages"]["training"].get("reused") and other["training"]["answer_weights"] == {"sign": 2.0}
    parser = llarva_parser("train-small")
    parsed = parser.parse_args(["--task", TASK, "--out", str(tmp_path), "--answer-weights", "sign=3, decimal4=0.1"])
    assert parsed.answer_weights == {"sign": 3.0, "decimal4": 0.1}
    with pytest.raises(SystemExit):
        parser.parse_args(["--task", TASK, "--out", str(tmp_path), "--answer-weights", "sign:3"])


def test_one_variation_must_be_one_of_the_tasks(tmp_path):
    with pytest.raises(ValueError, match="variation: expected None"):
        train_small(TASK, tmp_path, variation=99, eval_episodes=0, progress=False)


def test_goal_weight_needs_a_trace_and_a_positive_number(tmp_path):
    with pytest.raises(ValueError, match="goal_weight.*visual_trace"):
        train_small(TASK, tmp_path, goal_weight=5.0, progress=False)
    with pytest.raises(ValueError, match="goal_weight"):
        train_small(TASK, tmp_path, visual_trace=True, goal_weight=float("nan"), progress=False)
    with pytest.raises(ValueError, match="goal_points"):
        train_small(TASK, tmp_path, visual_trace=True, goal_weight=5.0, goal_points="middle", progress=False)


def test_first_step_trace_benchmark_scores_a_checkpoint_on_held_out_scenes(tmp_path, load_script):
    """benchmarks/first_step_trace.py: a toy checkpoint's step-0 trace against the demos' own, on
    scenes recorded with another seed; the trace length comes from the checkpoint's record."""
    benchmark = load_script("benchmarks/first_step_trace.py")

    # One variation (the diagnostic where the image alone decides): demos and scenes of it only.
    summary = train_small(TASK, tmp_path / "run", size="toy", demos=2, batch_size=4, max_steps=2, visual_trace=True,
                          trace_points=3, eval_episodes=0, variation=1, progress=False)
    assert summary["options"]["variation"] == 1
    assert [load_demo(e).variation_number for e in episode_dirs(tmp_path / "run" / "data", TASK)] == [1, 1]
    out = tmp_path / "trace.json"
    report = benchmark.main(["--task", TASK, "--checkpoint", str(tmp_path / "run" / MODEL_DIR), "--scenes", "2",
                             "--variation", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["trace_points"] == 3 and len(report["rows"]) == 2
    assert [row["variation"] for row in report["rows"]] == [1, 1]
    for row in report["rows"]:
        assert len(row["true_trace"]) == 3 and row["true_end"] == row["true_trace"][-1]
        assert row["error_px"] == pytest.approx(np.hypot(*np.subtract(row["true_end"], row["predicted_end"])), abs=0.06)
    summary = report["summary"]
    assert summary["scenes"] == 2 and summary["within_10_px"] <= 2
    assert summary["median_error_px"] == pytest.approx(np.median([row["error_px"] for row in report["rows"]]), abs=0.06)


def test_sample_average_acts_on_the_mean_of_its_sampled_answers(tmp_path, load_script):
    """benchmarks/sample_average.py: each env's action is the mean of its sampled answers' actions
    (each one well-formed under the grammar), a seed repeats the draws, and sampling near zero
    temperature writes the greedy answer."""
    probe = load_script("benchmarks/sample_average.py")
    train_small(TASK, tmp_path / "run", size="toy", demos=1, batch_size=4, max_steps=2, visual_trace=True,
                trace_points=3, eval_episodes=0, progress=False)
    loaded = load_llava(tmp_path / "run" / MODEL_DIR, device="cpu", dtype=torch.float32)
    env = gym.make(f"llarva/{TASK}")
    obs, _ = env.reset(seed=0)
    env.close()

    def policy(**options):
        return probe.SampleAveragePolicy(loaded, with_visual_trace=True, constrained=True, **options)

    sampling = policy(samples=3, temperature=1.0, sample_seed=5)
    action, _ = sampling.predict(obs)
    sampled = [codec.parse_answer(text, expect_trace=True) for text in sampling.last_samples]
    assert len(sampled) == 3
    mean = np.clip(np.mean([s.action for s in sampled], axis=0), sampling.action_low, sampling.action_high)
    np.testing.assert_allclose(action, mean, atol=1e-4)
    np.testing.assert_array_equal(sampling.last_info[0]["trace"], sampled[0].trace)
    again = policy(samples=3, temperature=1.0, sample_seed=5)
    np.testing.assert_array_equal(again.predict(obs)[0], action)

    greedy = LlarvaPolicy(loaded, with_visual_trace=True, constrained=True)
    greedy_action, _ = greedy.predict(obs)
    cold = policy(samples=2, temperature=1e-4)
    np.testing.assert_allclose(cold.predict(obs)[0], greedy_action, atol=1e-6)
    # (the toy model's trace tokens tie to within 1e-4 in places, so the answers are compared from the action on)
    action_text = greedy.last_info[0]["text"]
    assert [text[text.index("step:"):] for text in cold.last_samples] == [action_text[action_text.index("step:"):]] * 2


def test_samples_are_drawn_by_their_variations_weight_times_the_early_weight(two_variations, tmp_path):
    """`variation_weights[v]` per sample of variation v (read from its episode's
    variation_number.pkl, takeover episodes included), times `early_weight` for its early steps."""
    data_root, entries = two_variations
    taken_over = [entry["image"].startswith("../takeover/") for entry in entries]
    expected_variations = [int(t) for t in taken_over]
    counts = [expected_variations.count(0), expected_variations.count(1)]
    assert min(counts) > 3
    cache = {}
    assert [episode_variation(entry, data_root, cache) for entry in entries] == expected_variations
    assert len(cache) == 2          # one read per episode folder

    steps = [episode_step(entry) for entry in entries]
    assert sorted(step for step in steps if step < 3) == [0, 0, 1, 1, 2, 2]
    repeats = sample_repeats(entries, data_root, early_steps=3, early_weight=4, variation_weights=(3, 1))
    assert repeats.tolist() == [(4 if step < 3 else 1) * (3, 1)[v] for step, v in zip(steps, expected_variations)]
    assert sorted(set(repeats.tolist())) == [1, 3, 4, 12]
    assert int(repeats.sum()) == 3 * (counts[0] + 3 * 3) + (counts[1] + 3 * 3)
    assert sample_repeats(entries, data_root, variation_weights=[1, 5]).tolist() == [
        (1, 5)[v] for v in expected_variations]
    assert sample_repeats(entries, data_root, early_steps=3, early_weight=4).tolist() == [
        4 if step < 3 else 1 for step in steps]
    assert sample_repeats(entries, data_root, early_steps=3, early_weight=1) is None   # every sample once

    with pytest.raises(ValueError, match=r"variation_weights: 1 weights .* variation\(s\) \[1\]"):
        sample_repeats(entries, data_root, variation_weights=(3,))
    with pytest.raises(ValueError, match="expected its image at .*episode<M>"):
        episode_variation({"id": 7, "image": "front_rgb/3.png"}, data_root)
    (tmp_path / "episode0" / "front_rgb").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="variation_number.pkl"):
        episode_variation({"id": 7, "image": "episode0/front_rgb/3.png"}, tmp_path)


def test_variation_weights_are_checked(tmp_path):
    for weights in ((3,), (3, 1, 1), (3, 0), (3, -1), (3, 1.5), (True, 1), "3,1", 3):
        with pytest.raises(ValueError, match=r"variation_weights \(--variation-weights\): expected 2 positive ints"):
            train_small(SWEEP, tmp_path / "run", variation_weights=weights, eval_episodes=0, progress=False)
    with pytest.raises(ValueError, match="variation_weights: .* cannot go with variation=0"):
        train_small(SWEEP, tmp_path / "run", variation=0, variation_weights=(3, 1), eval_episodes=0, progress=False)
    with pytest.raises(ValueError, match=r"--variation-weights\): expected 2 positive ints"):
        llarva_main(["train-small", "--task", SWEEP, "--out", str(tmp_path / "run"), "--variation-weights", "3,1,1"])
    assert not (tmp_path / "run").exists()        # checked before anything is recorded


def test_cli_reads_variation_weights_as_ints(capsys):
    parser = llarva_parser("train-small")
    required = ["--task", SWEEP, "--out", "run"]
    assert parser.parse_args(required + ["--variation-weights", "3,1"]).variation_weights == (3, 1)
    assert parser.parse_args(required + ["--variation-weights", " 2, 7 ,1"]).variation_weights == (2, 7, 1)
    assert parser.parse_args(required).variation_weights is None
    for bad in ("3,0", "3,,1", "3;1", "", "-1,2", "1.5,1", "3,x", "3,1,"):
        with pytest.raises(SystemExit):
            parser.parse_args(required + [f"--variation-weights={bad}"])
        assert "argument --variation-weights: expected comma-separated positive integers" in capsys.readouterr().err


def test_cli_offers_every_model_size():
    size = next(a for a in llarva_parser("train-small")._actions if a.dest == "size")
    assert set(size.choices) == set(SHAPES) and size.default in SHAPES


def test_a_run_with_variation_weights_draws_and_records_them(tmp_path):
    """train_small draws each sample `sample_repeats` times per epoch and records the weights in its
    options; the same run through the CLI ("3,1") matches them and reuses the finished model."""
    out = tmp_path / "run"
    summary = train_small(SWEEP, out, size="toy", demos=2, batch_size=4, max_steps=1, eval_episodes=0,
                          early_steps=3, early_weight=2, variation_weights=(3, 1), progress=False)
    assert summary["options"]["variation_weights"] == [3, 1]
    episodes = [load_demo(folder, load_images=False) for folder in episode_dirs(out / "data", SWEEP)]
    assert sorted(demo.variation_number for demo in episodes) == [0, 1]      # seed 0: one of each
    # Each episode of n steps gives n - 1 samples, of which 3 early (drawn twice), all times its weight.
    expected = sum((3, 1)[demo.variation_number] * (len(demo) - 1 + 3) for demo in episodes)
    assert summary["training"]["samples_per_epoch"] == expected
    assert summary["training"]["samples"] == sum(len(demo) - 1 for demo in episodes)
    info = json.loads((out / MODEL_DIR / TRAINING_FILE).read_text())
    assert info["finished"] is True and info["options"]["variation_weights"] == [3, 1]

    llarva_main(["train-small", "--task", SWEEP, "--out", str(out), "--size", "toy", "--demos", "2",
                 "--batch-size", "4", "--max-steps", "1", "--eval-episodes", "0", "--early-steps", "3",
                 "--early-weight", "2", "--variation-weights", "3,1"])
    rerun = json.loads((out / "summary.json").read_text())
    assert "reused" in rerun["stages"]["training"] and rerun["options"] == summary["options"]


def test_takeover_coverage_counts_the_samples_annotate_makes_and_asks_the_policy_at_them(tmp_path, load_script):
    """benchmarks/takeover_coverage.py: a set's samples are the expert's steps, the takeover
    episodes' driven steps left out, as the training's annotations have them; with a checkpoint
    the policy is asked at each of them (every step from the fifth, within --ask-within)."""
    common = dict(size="toy", demos=2, batch_size=4, max_steps=2, visual_trace=True, trace_points=3, eval_episodes=0,
                  progress=False)
    train_small(TASK, tmp_path / "round1", **common)
    out = tmp_path / "round2"
    summary = train_small(TASK, out, driver=str(tmp_path / "round1" / MODEL_DIR), takeover_demos=2, takeover_steps=3,
                          **common)
    coverage = load_script("benchmarks/takeover_coverage.py")
    result = coverage.main(["--task", TASK, "--sets", f"demos={out / 'data'}", f"takeover={out / 'takeover'}",
                            "--checkpoint", str(out / MODEL_DIR), "--visual-trace", "--ask-every", "1",
                            "--ask-within", "10", "--out", str(tmp_path / "coverage.json")])
    demos, takeover = result["sets"]["demos"], result["sets"]["takeover"]
    stages = summary["stages"]
    assert takeover["steps"] == stages["takeover"]["samples"] > 0
    assert demos["steps"] + takeover["steps"] == stages["annotations"]["samples"]
    assert all(sum(s["step_share"]) == pytest.approx(1.0, abs=0.01) for s in (demos, takeover))
    lengths = [len(load_demo(folder, load_images=False)) for folder in episode_dirs(out / "data", TASK)]
    assert sum(a["samples"] for a in demos["asked"]) == sum(max(0, n - 1 - codec.HISTORY_STEPS) for n in lengths)
    assert all(-1.0 <= a["median_cosine"] <= 1.0 and a["median_speed_ratio"] >= 0
               for a in demos["asked"] if a["samples"])
    assert json.loads((tmp_path / "coverage.json").read_text())["sets"]["demos"]["steps"] == demos["steps"]
    with pytest.raises(FileNotFoundError, match="nowhere.* no such folder"):
        coverage.main(["--task", TASK, "--sets", f"empty={tmp_path / 'nowhere'}", "--out", str(tmp_path / "x.json")])


def test_answer_token_loss_splits_the_training_loss_by_what_each_token_writes(tmp_path, load_script):
    """benchmarks/answer_token_loss.py: every answer token gets one kind (seven integer digits and
    seven first decimals per action, the trace's digits, the gripper's number), and the tokens'
    losses average to the loss the model reports for that sample."""
    train_small(TASK, tmp_path / "run", size="toy", demos=1, batch_size=4, max_steps=2, visual_trace=True,
                trace_points=3, eval_episodes=0, progress=False)
    script = load_script("benchmarks/answer_token_loss.py")
    loaded = load_llava(tmp_path / "run" / MODEL_DIR, device="cpu", dtype=torch.float32)
    demo = load_demo(episode_dirs(tmp_path / "run" / "data", TASK)[0])
    entry = episode_annotations(demo, "", visual_trace=True, trace_points=3)[6]
    question, answer = (turn["value"] for turn in entry["conversations"])
    losses = script.token_losses(loaded.model, loaded.processor, demo[6].front_rgb, question, answer)
    sample = tokenize_conversation(loaded.processor, demo[6].front_rgb, question, answer)
    with torch.no_grad():
        reported = loaded.model(input_ids=sample["input_ids"][None], attention_mask=sample["attention_mask"][None],
                                pixel_values=sample["pixel_values"][None], labels=sample["labels"][None]).loss
    assert len(losses) == int((sample["labels"] != -100).sum())
    assert np.mean([loss for _, loss in losses]) == pytest.approx(float(reported), rel=1e-4)
    counted = {kind: sum(k == kind for k, _ in losses) for kind in script.KINDS}
    assert counted["integer_digit"] == counted["decimal1"] == 7 and counted["trace_digit"] >= 6
    # The training set's kinds (read from the tokenizer's offsets before the image is expanded) are
    # the benchmark's (read from the processor's, after): train-small weighs what this measures.
    (_, labels, _, kind), = encode_conversations([entry], loaded.processor.tokenizer,
                                                 num_image_tokens=loaded.model.config.image_seq_length)
    assert [codec.ANSWER_KINDS[code] for code in kind[:-1][labels[1:] != IGNORE_INDEX]] == [k for k, _ in losses]

    result = script.main(["--task", TASK, "--checkpoint", str(tmp_path / "run" / MODEL_DIR), "--sets",
                          f"demos={tmp_path / 'run' / 'data'}", "--every", "1", "--out", str(tmp_path / "tl.json")])
    bins = result["sets"]["demos"]["bins"]
    assert sum(row["samples"] for row in bins) == len(demo) - 1
    velocities = np.abs([codec.parse_answer(e["conversations"][1]["value"], expect_trace=True).action[:7]
                         for e in episode_annotations(demo, "", visual_trace=True, trace_points=3)])
    shares = [(row["samples"], row["label_share_under_0.1"]) for row in bins if row["samples"]]
    assert sum(n * share for n, share in shares) / len(velocities) == pytest.approx((velocities < 0.1).mean(), abs=0.01)
    assert json.loads((tmp_path / "tl.json").read_text())["sets"]["demos"]["bins"] == bins

    # benchmarks/trace_on_demo_states.py: every other annotated step, its trace's end and both actions.
    states = load_script("benchmarks/trace_on_demo_states.py")
    prefix = states.trace_prefix(answer)
    assert prefix == answer[:answer.index("step: [") + len("step:")]
    assert states.continued(prefix, answer[len(prefix):]) == answer == states.continued(prefix, answer[len(prefix) + 1:])
    assert states.against_label(np.r_[np.full(7, 0.2), 1.0], np.r_[np.full(7, 0.1), 0.0]) == pytest.approx((2.0, 1.0))
    report = states.main(["--task", TASK, "--checkpoint", str(tmp_path / "run" / MODEL_DIR), "--sets",
                          f"scenes={tmp_path / 'run' / 'data'}", "--out", str(tmp_path / "ts.json")])
    rows = report["sets"]["scenes"]["bins"]
    assert report["trace_points"] == 3 and sum(row["samples"] for row in rows) == (len(demo) - 1 + 1) // 2
    for row in (row for row in rows if row["samples"]):
        assert row["median_end_error_px"] >= 0 and 0 <= row["share_within_1_px"] <= 1
        assert -1 <= row["action_after_own_trace"]["median_cosine"] <= 1
        assert 0 <= row["unparsed_after_true_trace"] <= row["samples"]
        assert (row["action_after_true_trace"] is None) == (row["unparsed_after_true_trace"] == row["samples"])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        states.main(["--checkpoint", str(tmp_path / "run" / MODEL_DIR), "--sets", f"x={tmp_path / 'nowhere'}"])

