"""Demos -> LLaVA conversation JSON: exact entries, label alignment, traces, the file on disk."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import llarva_gym.files
from llarva_gym.observation import Observation
from llarva_policy import annotations
from llarva_policy.annotations import annotate, end_effector_trace, episode_annotations, project_points

TASK = "sweep_to_dustpan_of_size"
PREFIX = f"{TASK}/all_variations/episodes/episode0"
QUESTION_START = ('<image>\nYou are a Franka robot using the joint control. The task is "{}", and the '
                  "previous five (including current) steps are ")
QUESTION_END = ". Can you predict action of the next 1 step?"
ZEROS = "[0, 0, 0, 0, 0, 0, 0]"

# A camera 1 m behind the world origin, looking along world +z, with RLBench's negative focal
# lengths and the principal point at the centre of a 128x128 image.
INTRINSICS = np.array([[-100.0, 0.0, 64.0], [0.0, -100.0, 64.0], [0.0, 0.0, 1.0]])
EXTRINSICS = np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -1], [0, 0, 0, 1]])
CAMERA = {"front_camera_extrinsics": EXTRINSICS, "front_camera_intrinsics": INTRINSICS,
          "front_camera_near": 0.01, "front_camera_far": 4.5}


class HandBuiltDemo(list):
    """What llarva_gym.demos.load_demo returns, as far as annotations are concerned."""

    def __init__(self, observations, descriptions, variation_number=0):
        super().__init__(observations)
        self.variation_descriptions = descriptions
        self.variation_number = variation_number


def observation(joint_positions, joint_velocities, gripper_open, position=(0.0, 0.0, 0.0)):
    return Observation(joint_positions=np.array(joint_positions, dtype=np.float64),
                       joint_velocities=np.array(joint_velocities, dtype=np.float64),
                       gripper_open=gripper_open,
                       gripper_pose=np.array([*position, 0.0, 0.0, 0.0, 1.0]),
                       misc=dict(CAMERA))


def short_demo():
    """Three steps: two labelled entries."""
    return HandBuiltDemo([
        observation([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.0] * 7, 1.0, (0.0, 0.0, 0.0)),
        observation([0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.2, -0.1, 0.0, 0.05, 0.0, 0.0, 0.123456], 1.0,
                    (-0.1, 0.0, 0.0)),
        observation([0.02, 0.1, 0.2, 0.31, 0.4, 0.5, 0.6], [0.2, -0.1, 0.0, 0.1, 0.0, 0.0, -0.5], 0.0,
                    (-0.1, 0.2, 1.0)),
    ], ["sweep dirt to the tall dustpan", "use the broom to brush the dirt into the tall dustpan"])


def long_demo():
    """Seven steps, step i at joint positions [i, -i, i/2, 0, 0, 0, 1.5] and velocities 0.01 i."""
    return HandBuiltDemo([
        observation([i, -i, 0.5 * i, 0, 0, 0, 1.5], [0.01 * i] * 7, float(i % 2)) for i in range(7)
    ], ["sweep dirt to the short dustpan"], variation_number=1)


# --- projection ----------------------------------------------------------------------------

def test_projection_with_negative_focal_lengths():
    pixels = project_points([[0, 0, 0], [0.1, 0, 0], [0, 0.2, 0], [0.1, 0.2, 1.0]], EXTRINSICS, INTRINSICS)
    # On the optical axis: the principal point. Camera +x: smaller columns; camera +y: smaller rows;
    # twice as far: half the offset.
    np.testing.assert_allclose(pixels, [[64, 64], [54, 64], [64, 44], [59, 54]])


def test_projection_of_a_camera_looking_down():
    # Camera 2 m above the origin, optical axis pointing down (world -z), camera y = world -y.
    looking_down = np.eye(4)
    looking_down[:3, :3] = np.diag([1.0, -1.0, -1.0])
    looking_down[:3, 3] = [0.0, 0.0, 2.0]
    pixels = project_points([[0, 0, 0], [0.3, 0, 0], [0, 0.3, 0]], looking_down, INTRINSICS)
    np.testing.assert_allclose(pixels, [[64, 64], [49, 64], [64, 79]])


def test_projection_rejects_points_behind_the_camera():
    with pytest.raises(ValueError, match="behind the camera"):
        project_points([[0, 0, 0], [0, 0, -2]], EXTRINSICS, INTRINSICS)


# --- visual trace ----------------------------------------------------------------------------

def test_trace_of_a_short_future_repeats_the_last_point():
    trace = end_effector_trace(short_demo(), 1, image_size=(128, 128))
    assert trace.shape == (30, 2) and trace.dtype == np.int64
    np.testing.assert_array_equal(trace[:2], [[74, 64], [69, 54]])
    np.testing.assert_array_equal(trace[2:], [[69, 54]] * 28)


def test_trace_of_a_long_future_is_subsampled_evenly_and_ends_at_the_last_step():
    # Step i sits at column 64 + i, so the columns of the trace are the steps it kept.
    demo = HandBuiltDemo([observation([0] * 7, [0] * 7, 1.0, (-0.01 * i, 0, 0)) for i in range(60)], ["x"])
    steps = end_effector_trace(demo, 0, image_size=(128, 128))[:, 0] - 64
    assert len(steps) == 30 and steps[0] == 0 and steps[-1] == 59
    assert set(np.diff(steps)) <= {2, 3}
    steps_from_40 = end_effector_trace(demo, 40, image_size=(128, 128))[:, 0] - 64
    np.testing.assert_array_equal(steps_from_40, list(range(40, 60)) + [59] * 10)
    assert len(end_effector_trace(demo, 0, image_size=(128, 128), max_points=5)) == 5


def test_trace_is_clipped_to_the_image():
    demo = HandBuiltDemo([observation([0] * 7, [0] * 7, 1.0, (x, -2.0, 0)) for x in (1.0, -1.0)], ["x"])
    np.testing.assert_array_equal(end_effector_trace(demo, 0, image_size=(100, 120))[:2],
                                  [[0, 99], [119, 99]])


def test_trace_needs_the_camera():
    demo = short_demo()
    demo[0].misc = {}
    with pytest.raises(ValueError, match="front_camera_extrinsics"):
        end_effector_trace(demo, 0, image_size=(128, 128))


# --- entries ---------------------------------------------------------------------------------

def test_entries_of_a_short_demo_whole_strings():
    entries = episode_annotations(short_demo(), PREFIX)
    assert entries == [
        {"id": 0, "image": PREFIX + "/front_rgb/0.png", "conversations": [
            {"from": "human", "value": QUESTION_START.format("sweep dirt to the tall dustpan") +
             f"[{ZEROS}, {ZEROS}, {ZEROS}, {ZEROS}, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]" + QUESTION_END},
            {"from": "gpt", "value": "The next action step: [0.2, -0.1, 0.0, 0.05, 0.0, 0.0, 0.1235, 1.0]"},
        ]},
        {"id": 1, "image": PREFIX + "/front_rgb/1.png", "conversations": [
            {"from": "human", "value": QUESTION_START.format("sweep dirt to the tall dustpan") +
             f"[{ZEROS}, {ZEROS}, {ZEROS}, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "
             "[0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]" + QUESTION_END},
            {"from": "gpt", "value": "The next action step: [0.2, -0.1, 0.0, 0.1, 0.0, 0.0, -0.5, 0.0]"},
        ]},
    ]


def test_entries_label_step_t_with_step_t_plus_1_and_keep_five_steps_of_history():
    entries = episode_annotations(long_demo(), "ep", first_id=10)
    assert [e["id"] for e in entries] == list(range(10, 16))      # six labelled steps of seven
    assert [e["image"] for e in entries] == [f"ep/front_rgb/{t}.png" for t in range(6)]
    assert entries[5]["conversations"][0]["value"] == (
        QUESTION_START.format("sweep dirt to the short dustpan") +
        "[[1.0, -1.0, 0.5, 0.0, 0.0, 0.0, 1.5], [2.0, -2.0, 1.0, 0.0, 0.0, 0.0, 1.5], "
        "[3.0, -3.0, 1.5, 0.0, 0.0, 0.0, 1.5], [4.0, -4.0, 2.0, 0.0, 0.0, 0.0, 1.5], "
        "[5.0, -5.0, 2.5, 0.0, 0.0, 0.0, 1.5]]" + QUESTION_END)
    assert entries[5]["conversations"][1]["value"] == (
        "The next action step: [0.06, 0.06, 0.06, 0.06, 0.06, 0.06, 0.06, 0.0]")
    assert entries[2]["conversations"][1]["value"] == (
        "The next action step: [0.03, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03, 1.0]")
    assert entries[2]["conversations"][0]["value"].count(ZEROS) == 2


def test_entries_with_visual_trace_whole_strings():
    entries = episode_annotations(short_demo(), PREFIX, visual_trace=True, image_size=(128, 128))
    assert entries[1]["conversations"][0]["value"].endswith(
        "Can you predict the 2D visual trace of the end effector and the action of the next 1 step?")
    assert entries[1]["conversations"][1]["value"] == (
        "The visual trace of the end effector: [[74, 64], " + ", ".join(["[69, 54]"] * 29) + "]. "
        "The next action step: [0.2, -0.1, 0.0, 0.1, 0.0, 0.0, -0.5, 0.0]")


def test_entries_with_the_released_template():
    entries = episode_annotations(short_demo(), PREFIX, template="released_inference")
    assert "steps is [[0, 0, 0, 0, 0, 0, 0], " in entries[0]["conversations"][0]["value"]


def test_entries_trace_size_from_loaded_images_or_an_error():
    demo = short_demo()
    with pytest.raises(ValueError, match="image_size"):
        episode_annotations(demo, PREFIX, visual_trace=True)
    demo[0].front_rgb = np.zeros((50, 60, 3), np.uint8)     # clips the trace to 60 columns, 50 rows
    answer = episode_annotations(demo, PREFIX, visual_trace=True)[1]["conversations"][1]["value"]
    assert answer.startswith("The visual trace of the end effector: [[59, 49], [59, 49], ")


def test_entries_noise_is_deterministic_and_leaves_labels_alone():
    clean = episode_annotations(long_demo(), "ep")
    noisy_1 = episode_annotations(long_demo(), "ep", history_noise=0.01, rng=np.random.default_rng(3))
    noisy_2 = episode_annotations(long_demo(), "ep", history_noise=0.01, rng=np.random.default_rng(3))
    assert noisy_1 == noisy_2
    assert all(n["conversations"][0]["value"] != c["conversations"][0]["value"] for n, c in zip(noisy_1, clean))
    assert [n["conversations"][1] for n in noisy_1] == [c["conversations"][1] for c in clean]
    assert noisy_1[0]["conversations"][0]["value"].count(ZEROS) == 4    # padding is never noised


def test_entries_need_a_description():
    with pytest.raises(ValueError, match="variation_descriptions"):
        episode_annotations(HandBuiltDemo(short_demo(), []), PREFIX)


# --- the annotation file ---------------------------------------------------------------------

@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """Two episodes on disk (folders and front_rgb/0.png); load_demo hands out the hand-built demos.

    Reading RLBench's pickles is llarva_gym.demos' job and has its own tests; here the episode
    folder decides which demo comes back.
    """
    demos = {"episode0": short_demo(), "episode1": long_demo()}
    root = tmp_path / "data"
    for name in ("episode1", "episode0", "not_an_episode"):
        folder = root / TASK / "all_variations" / "episodes" / name / "front_rgb"
        folder.mkdir(parents=True)
        Image.new("RGB", (128, 128)).save(folder / "0.png")
    monkeypatch.setattr(annotations, "load_demo", lambda episode_dir, **kwargs: demos[episode_dir.name])
    return root


def test_annotate_writes_every_episode_with_paths_relative_to_the_data_root(data_root, tmp_path):
    out = tmp_path / "out" / "train.json"
    count = annotate(data_root, out, TASK, shuffle=False, progress=False)
    entries = json.loads(out.read_text())
    assert count == len(entries) == 2 + 6
    assert [e["id"] for e in entries] == list(range(8))
    assert entries[:2] == episode_annotations(short_demo(), PREFIX)
    assert entries[2:] == episode_annotations(long_demo(), f"{TASK}/all_variations/episodes/episode1",
                                              first_id=2)
    assert entries[1]["image"] == f"{TASK}/all_variations/episodes/episode0/front_rgb/1.png"
    assert sorted(os.listdir(out.parent)) == ["train.json"]        # no temp file left behind


def test_annotate_shuffles_deterministically_for_a_seed(data_root, tmp_path):
    paths = {name: tmp_path / f"{name}.json" for name in ("a", "b", "c", "plain", "noisy")}
    annotate(data_root, paths["a"], TASK, seed=5, progress=False)
    annotate(data_root, paths["b"], TASK, seed=5, progress=False)
    annotate(data_root, paths["c"], TASK, seed=6, progress=False)
    annotate(data_root, paths["plain"], TASK, shuffle=False, progress=False)
    a, b, c, plain = (json.loads(paths[n].read_text()) for n in ("a", "b", "c", "plain"))
    assert a == b
    assert [e["id"] for e in a] != [e["id"] for e in c]
    assert sorted(a, key=lambda e: e["id"]) == plain
    # Noise does not change the order, and is the same for the same seed.
    annotate(data_root, paths["noisy"], TASK, seed=5, history_noise=0.01, progress=False)
    noisy = json.loads(paths["noisy"].read_text())
    assert [e["id"] for e in noisy] == [e["id"] for e in a]
    assert noisy != a
    annotate(data_root, paths["b"], TASK, seed=5, history_noise=0.01, progress=False)
    assert json.loads(paths["b"].read_text()) == noisy


def test_annotate_with_visual_trace_reads_the_image_size(data_root, tmp_path):
    out = tmp_path / "trace.json"
    annotate(data_root, out, TASK, visual_trace=True, shuffle=False, progress=False)
    entries = json.loads(out.read_text())
    assert entries[:2] == episode_annotations(short_demo(), PREFIX, visual_trace=True, image_size=(128, 128))


def test_annotate_failure_leaves_the_old_file_and_no_temp_file(data_root, tmp_path, monkeypatch):
    out = tmp_path / "train.json"
    out.write_text("old")

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(llarva_gym.files.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        annotate(data_root, out, TASK, progress=False)
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "train.json"]


def test_annotate_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_root"):
        annotate(tmp_path / "nowhere", tmp_path / "a.json", TASK)
    (tmp_path / "open_drawer").mkdir()
    with pytest.raises(FileNotFoundError, match=r"task: .*task folders in .*\['open_drawer'\]"):
        annotate(tmp_path, tmp_path / "a.json", TASK)
    (tmp_path / TASK / "all_variations" / "episodes").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no episodes"):
        annotate(tmp_path, tmp_path / "a.json", TASK)
    assert not (tmp_path / "a.json").exists()


def test_annotate_reads_demos_saved_by_llarva_gym(tmp_path):
    demos = pytest.importorskip("llarva_gym.demos")
    root = tmp_path / "data"
    for number, demo in enumerate((short_demo(), long_demo())):
        for obs in demo:
            obs.front_rgb = np.zeros((128, 128, 3), np.uint8)
        demos.save_demo(demo, root / TASK / "all_variations" / "episodes" / f"episode{number}")
    out = tmp_path / "train.json"
    assert annotate(root, out, TASK, visual_trace=True, shuffle=False, progress=False) == 8
    entries = json.loads(out.read_text())
    assert entries[:2] == episode_annotations(short_demo(), PREFIX, visual_trace=True, image_size=(128, 128))


def test_annotate_names_the_bad_episode(data_root, tmp_path, monkeypatch):
    nameless = HandBuiltDemo(short_demo(), [])
    monkeypatch.setattr(annotations, "load_demo", lambda episode_dir, **kwargs: nameless)
    with pytest.raises(ValueError, match=r"episode0: .*variation_descriptions"):
        annotate(data_root, tmp_path / "a.json", TASK, progress=False)


def test_entries_label_with_the_experts_command_when_the_demo_was_recorded_with_noise():
    """A noise-injected demo (record_demos(action_noise=...)) executed a perturbed velocity; the
    label is the expert's command stored beside it in misc, not what the arm did."""
    demo = short_demo()
    demo[1].misc["expert_joint_velocities"] = np.array([0.25, -0.125, 0.0, 0.0625, 0.0, 0.0, 0.5])
    entries = episode_annotations(demo, "ep")
    assert entries[0]["conversations"][1]["value"] == (
        "The next action step: [0.25, -0.125, 0.0, 0.0625, 0.0, 0.0, 0.5, 1.0]")
    assert entries[1]["conversations"][1]["value"] == (   # no command stored: the executed velocity
        "The next action step: [0.2, -0.1, 0.0, 0.1, 0.0, 0.0, -0.5, 0.0]")


def test_annotate_in_worker_processes_writes_the_same_file(tmp_path):
    """Real recorded demos (takeover-style gaps in the ids are not involved): blocks of episodes
    annotated in 2 worker processes give exactly the file one process writes, noise included,
    and a policy-driven step is still left out with the ids counting on without a gap."""
    from llarva_gym.recording import POLICY_STEP_KEY, record_demos

    root = tmp_path / "data"
    record_demos("reach_target", 40, root, image_size=32, seed=3, progress=False)
    # Mark the first step of episode 0 as driven: its entry goes, the rest keep consecutive ids.
    episode0 = root / "reach_target" / "all_variations" / "episodes" / "episode0"
    from llarva_gym.demos import load_demo, save_demo
    demo = load_demo(episode0)
    demo[1].misc[POLICY_STEP_KEY] = True
    save_demo(demo, episode0, overwrite=True)

    options = dict(visual_trace=True, trace_points=3, history_noise=0.01, seed=7, progress=False)
    annotate(root, tmp_path / "one.json", "reach_target", processes=1, **options)
    annotate(root, tmp_path / "two.json", "reach_target", processes=2, **options)
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert one == two
    assert sorted(e["id"] for e in one) == list(range(len(one)))
    assert not any(e["image"].endswith("episode0/front_rgb/0.png") for e in one)
    assert any(e["image"].endswith("episode0/front_rgb/1.png") for e in one)
    with pytest.raises(ValueError, match="processes: expected an int >= 1"):
        annotate(root, tmp_path / "bad.json", "reach_target", processes=0)
