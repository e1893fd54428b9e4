"""The learned policy shipped in models/ (a train-small model): it loads through the public loader,
reads the goal from the image on scenes it never saw, and the quickstart runs it."""

import json

import imageio.v2 as imageio
import numpy as np
import pytest

import llarva_gym  # noqa: F401
from llarva_gym.demos import episode_dirs, load_demo
from llarva_gym.recording import record_demos
from llarva_policy import cli
from llarva_policy.annotations import end_effector_trace
from llarva_policy.policy import LlarvaPolicy

pytestmark = pytest.mark.skipif(not cli.LEARNED_MODEL.is_dir(), reason="models/ is not in this checkout")


def test_the_shipped_model_is_small_and_records_how_it_was_trained():
    size = sum(f.stat().st_size for f in cli.LEARNED_MODEL.rglob("*") if f.is_file())
    assert size <= 25e6
    record = json.loads((cli.LEARNED_MODEL / "llarva_train_small.json").read_text())
    assert record["finished"] and record["options"]["task"] == cli.LEARNED_TASK
    assert record["options"].get("variation") == cli.LEARNED_VARIATION


def test_the_shipped_model_heads_for_the_named_dustpan_on_held_out_scenes(tmp_path):
    """At the first step the end of its visual trace is where the demo really ended: the side of
    the dustpan the instruction names ("tall" or "short"), which the scene draws per episode (seed
    77: never seen in training, whose seed was 0)."""
    record_demos(cli.LEARNED_TASK, 4, tmp_path, seed=77, variation=cli.LEARNED_VARIATION, progress=False)
    policy = LlarvaPolicy.from_pretrained(cli.LEARNED_MODEL, device="cpu", with_visual_trace=True, constrained=True)
    errors, sides, words = [], set(), set()
    for episode in episode_dirs(tmp_path, cli.LEARNED_TASK):
        demo = load_demo(episode)
        first = demo[0]
        true_end = end_effector_trace(demo, 0, image_size=first.front_rgb.shape[:2], max_points=3)[-1]
        observation = {"front_rgb": first.front_rgb, "instruction": demo.variation_descriptions[0],
                       "joint_positions": np.asarray(first.joint_positions, dtype=np.float32)}
        policy.predict(observation, episode_start=np.array([True]))
        errors.append(float(np.linalg.norm(np.asarray(policy.last_info[0]["trace"])[-1] - true_end)))
        sides.add(true_end[0] > first.front_rgb.shape[1] / 2)
        words.update(w for w in ("tall", "short") if w in observation["instruction"].split())
    assert max(errors) < 10, errors
    assert len(sides) == 2 and len(words) == 2, "seed 77's first 4 scenes name both dustpans, on both sides"


def test_the_shipped_model_reads_the_word_the_other_word_sends_it_to_the_other_dustpan(tmp_path):
    """The same image with "tall" and "short" swapped: the trace must end on the other side. (The
    side is the word XOR where the tall dustpan stands: neither alone tells it.)"""
    record_demos(cli.LEARNED_TASK, 4, tmp_path, seed=77, variation=cli.LEARNED_VARIATION, progress=False)
    policy = LlarvaPolicy.from_pretrained(cli.LEARNED_MODEL, device="cpu", with_visual_trace=True, constrained=True)
    for episode in episode_dirs(tmp_path, cli.LEARNED_TASK):
        demo = load_demo(episode)
        first = demo[0]
        instruction = demo.variation_descriptions[0]
        swapped = instruction.replace("tall", "SHORT").replace("short", "tall").replace("SHORT", "short")
        ends = []
        for text in (instruction, swapped):
            observation = {"front_rgb": first.front_rgb, "instruction": text,
                           "joint_positions": np.asarray(first.joint_positions, dtype=np.float32)}
            policy.predict(observation, episode_start=np.array([True]))
            ends.append(np.asarray(policy.last_info[0]["trace"])[-1][0])
        middle = first.front_rgb.shape[1] / 2
        assert (ends[0] > middle) != (ends[1] > middle), (instruction, ends)


def test_quickstart_shows_the_learned_policy_after_the_expert(tmp_path):
    results = tmp_path / "results.json"
    cli.main(["quickstart", "--episodes", "1", "--episode-length", "3", "--learned-episodes", "1",
              "--results", str(results), "--video", str(tmp_path / "videos")])
    learned = json.loads((tmp_path / "learned_results.json").read_text())
    assert learned["task"] == cli.LEARNED_TASK and learned.get("variation") == cli.LEARNED_VARIATION
    assert [r["steps"] for r in learned["episodes"]] == [3] and learned["episodes"][0]["parse_errors"] == 0
    videos = sorted((tmp_path / "learned_videos").glob("*.mp4"))
    assert len(videos) == 1 and len(imageio.mimread(videos[0])) == 4     # one frame a step, plus the first


REACH_MODEL = cli.LEARNED_MODEL.parent / "reach_target_variation0"


@pytest.mark.skipif(not REACH_MODEL.is_dir(), reason="models/reach_target_variation0 is not in this checkout")
def test_the_shipped_reach_model_finds_the_target_on_held_out_scenes(tmp_path):
    """The best reach_target model (issue 9, round 25): small, its training recorded (the sixth
    DAgger round fine-tuned from its driver, round 24), and at the first step of scenes it never saw
    (demo seed 77; it was trained on seeds 0-6) its visual trace ends at the target, 35-52 px from
    where it starts."""
    size = sum(f.stat().st_size for f in REACH_MODEL.rglob("*") if f.is_file())
    assert size <= 25e6
    record = json.loads((REACH_MODEL / "llarva_train_small.json").read_text())
    options = record["options"]
    assert record["finished"] and options["task"] == "reach_target" and options["variation"] == 0
    assert options["size"] == "small-swin" and options["finetune_from"]["name"] == "r24model"
    # every takeover set's driven steps travel with it, so the next DAgger round needs no earlier model
    assert sorted(p.name for p in REACH_MODEL.glob("takeover*_driven_starts.npz")) == sorted(
        f"takeover{k or ''}_driven_starts.npz" for k in range(len(options["driver"])))

    record_demos("reach_target", 4, tmp_path, seed=77, variation=0, render_quality="high", progress=False)
    policy = LlarvaPolicy.from_pretrained(REACH_MODEL, device="cpu", with_visual_trace=True, constrained=True)
    errors, lengths = [], []
    for episode in episode_dirs(tmp_path, "reach_target"):
        demo = load_demo(episode)
        first = demo[0]
        true_trace = end_effector_trace(demo, 0, image_size=first.front_rgb.shape[:2], max_points=3)
        observation = {"front_rgb": first.front_rgb, "instruction": demo.variation_descriptions[0],
                       "joint_positions": np.asarray(first.joint_positions, dtype=np.float32)}
        policy.predict(observation, episode_start=np.array([True]))
        errors.append(float(np.linalg.norm(np.asarray(policy.last_info[0]["trace"])[-1] - true_trace[-1])))
        lengths.append(float(np.linalg.norm(true_trace[-1] - true_trace[0])))
    assert max(errors) < 6, errors
    assert min(lengths) > 20, lengths     # the target is far from the start: ending there is no accident
