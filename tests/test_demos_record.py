"""Recording scripted-expert demos (real MuJoCo): RLBench's layout read back, replay of the recorded
joint velocities from the stored start state, reproducibility (runs, processes), resume after an
interruption or a hard kill, and the `llarva demos` command."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import llarva_gym  # noqa: F401  (registers the llarva/ ids)
from llarva_gym import recording
from llarva_gym.demos import episode_dirs, episodes_dir, load_demo, record_demos
from llarva_policy import cli

SIZE = 64
CAMERAS = ("front", "wrist")
EPISODE_FILES = {"front_rgb", "front_depth", "wrist_rgb", "wrist_depth", "low_dim_obs.pkl",
                 "variation_descriptions.pkl", "variation_number.pkl", recording.EPISODE_INFO}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included), by relative path: equal snapshots mean
    byte-identical datasets (pickles, PNGs, JSON) and no leftovers in one of them."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def episode_info(root, task) -> list[dict]:
    return [json.loads((d / recording.EPISODE_INFO).read_text()) for d in episode_dirs(root, task)]


@pytest.mark.parametrize("task", ["reach_target", "sweep_to_dustpan_of_size"])
def test_recorded_episodes_read_back_and_replay_to_success(tmp_path, task):
    summary = record_demos(task, 2, tmp_path, image_size=SIZE, cameras=CAMERAS, depth=True, seed=0, progress=False)
    assert summary["episodes_written"] == 2 and summary["complete"] and summary["attempts"] >= 2
    assert summary["demos_per_minute"] > 0

    dirs = episode_dirs(tmp_path, task)
    assert [d.name for d in dirs] == ["episode0", "episode1"]
    assert dirs[0].parent == tmp_path / task / "all_variations" / "episodes"
    assert [p.name for p in dirs[0].parent.iterdir() if p.name.startswith(".")] == []   # no leftovers

    env = gym.make(f"llarva/{task}", cameras=CAMERAS, image_size=SIZE, depth=True)
    try:
        for episode_dir in dirs:
            assert {p.name for p in episode_dir.iterdir()} == EPISODE_FILES
            demo = load_demo(episode_dir, cameras=CAMERAS, image_kinds=("rgb", "depth"))
            steps = len(demo)
            assert 10 < steps <= gym.spec(f"llarva/{task}").max_episode_steps + 1   # reset, then one per step
            for camera in CAMERAS:
                assert sorted(p.name for p in (episode_dir / f"{camera}_rgb").iterdir()) == sorted(f"{i}.png" for i in range(steps))
            for obs in demo:
                assert obs.front_rgb.shape == obs.wrist_rgb.shape == (SIZE, SIZE, 3)
                assert obs.front_rgb.dtype == np.uint8
                assert obs.front_depth.shape == obs.wrist_depth.shape == (SIZE, SIZE)
                assert obs.front_depth.dtype == np.float32
                assert obs.joint_positions.shape == obs.joint_velocities.shape == (7,)
                assert obs.gripper_open in (0.0, 1.0)
                assert {"front_camera_extrinsics", "wrist_camera_intrinsics"} <= set(obs.misc)
            assert 0.1 < float(np.median(demo[0].front_depth)) < 3.0   # metres: the table, seen from the front
            record = json.loads((episode_dir / recording.EPISODE_INFO).read_text())
            assert demo.random_seed == {"episode_seed": record["episode_seed"], "variation": demo.variation_number}
            assert record["variation_number"] == demo.variation_number and record["steps"] == steps - 1

            # The stored start state rebuilds the episode: same variation, descriptions, first observation.
            obs, info = env.reset(options={"demo": demo})
            assert info["variation"] == demo.variation_number
            assert info["descriptions"] == demo.variation_descriptions
            assert obs["instruction"] in demo.variation_descriptions
            np.testing.assert_array_equal(obs["joint_positions"], demo[0].joint_positions.astype(np.float32))
            np.testing.assert_array_equal(obs["front_rgb"], demo[0].front_rgb)
            np.testing.assert_array_equal(obs["wrist_rgb"], demo[0].wrist_rgb)
            np.testing.assert_allclose(obs["front_depth"], demo[0].front_depth, atol=1e-5)

            # LLARVA's labels: the action at step t is obs t+1's joint velocities and gripper state.
            for t in range(steps - 1):
                action = np.r_[demo[t + 1].joint_velocities, demo[t + 1].gripper_open]
                obs, reward, terminated, truncated, info = env.step(action)
                if terminated:
                    break
            assert info["success"] and t == steps - 2, f"replay of {episode_dir.name} ended at step {t + 1} of {steps - 1}"
            np.testing.assert_allclose(obs["joint_positions"], demo[t + 1].joint_positions, atol=1e-4)
    finally:
        env.close()


def test_same_seed_same_episodes_in_any_number_of_processes(tmp_path):
    options = dict(image_size=32, cameras=("front",), seed=3, progress=False)
    runs = {}
    for name, processes, seed in [("a", 1, 3), ("b", 1, 3), ("two_processes", 2, 3), ("other_seed", 1, 4)]:
        record_demos("reach_target", 2, tmp_path / name, **{**options, "seed": seed}, processes=processes)
        runs[name] = snapshot(tmp_path / name)
    assert len(runs["a"]) > 2 * 20 and runs["a"] == runs["b"]
    assert runs["two_processes"] == runs["a"]
    low_dim = "reach_target/all_variations/episodes/episode0/low_dim_obs.pkl"
    assert runs["other_seed"][low_dim] != runs["a"][low_dim]   # another seed: other episodes
    # Variations are drawn per episode from its seed; a fixed one is honoured.
    record_demos("reach_target", 1, tmp_path / "fixed", image_size=32, variation=5, progress=False)
    assert load_demo(episode_dirs(tmp_path / "fixed", "reach_target")[0], load_images=False).variation_number == 5


def _fail_attempt_zero(real_run_attempt, interrupt_at=None):
    """_run_attempt with attempt 0 failing (so attempt indices and episode numbers differ) and,
    optionally, Ctrl-C while recording attempt `interrupt_at`."""
    def run_attempt(index, driven=None):
        if index == 0:
            return recording.Attempt(index, recording.attempt_seed(0, 0), 0, False, "injected failure")
        if index == interrupt_at:
            raise KeyboardInterrupt
        return real_run_attempt(index, driven)
    return run_attempt


def test_interrupted_run_resumes_to_the_uninterrupted_episodes(tmp_path, monkeypatch):
    task, options = "reach_target", dict(image_size=32, cameras=("front",), seed=0, progress=False)
    real = recording._run_attempt
    monkeypatch.setattr(recording, "_run_attempt", _fail_attempt_zero(real))
    summary = record_demos(task, 3, tmp_path / "whole", **options)
    assert summary["failures"] == [{"attempt": 0, "reason": "injected failure"}] and summary["attempts"] == 4
    assert [r["attempt"] for r in episode_info(tmp_path / "whole", task)] == [1, 2, 3]

    # Interrupted after the first episode, with the debris a killed process leaves behind.
    monkeypatch.setattr(recording, "_run_attempt", _fail_attempt_zero(real, interrupt_at=2))
    with pytest.raises(KeyboardInterrupt):
        record_demos(task, 3, tmp_path / "resumed", **options)
    folder = episodes_dir(tmp_path / "resumed", task)
    assert sorted(p.name for p in folder.iterdir()) == ["episode0"]
    for debris in (".attempt2", "..attempt3.tmp-12345-0badc0de", ".episode1.tmp-12345-0badc0de"):
        (folder / debris / "front_rgb").mkdir(parents=True)
        (folder / debris / "front_rgb" / "0.png").write_bytes(b"half a png")
    assert [d.name for d in episode_dirs(tmp_path / "resumed", task)] == ["episode0"]   # debris is not an episode

    first_episode = snapshot(folder / "episode0")
    monkeypatch.setattr(recording, "_run_attempt", _fail_attempt_zero(real))
    summary = record_demos(task, 3, tmp_path / "resumed", **options)
    assert summary["episodes_written"] == 2 and summary["attempts"] == 2 and summary["failures"] == []
    assert snapshot(folder / "episode0") == first_episode
    assert snapshot(tmp_path / "resumed") == snapshot(tmp_path / "whole")   # no duplicate, no debris

    # Done already: nothing to do. More episodes: the folder grows as one longer run would.
    assert record_demos(task, 3, tmp_path / "resumed", **options)["episodes_written"] == 0
    record_demos(task, 4, tmp_path / "resumed", **options)
    assert [r["attempt"] for r in episode_info(tmp_path / "resumed", task)] == [1, 2, 3, 4]


def test_resume_refuses_a_folder_recorded_otherwise(tmp_path):
    folder = episodes_dir(tmp_path, "reach_target")
    (folder / "episode0").mkdir(parents=True)
    with pytest.raises(ValueError, match="llarva_episode.json"):
        record_demos("reach_target", 2, tmp_path, progress=False)
    settings = recording._settings("reach_target", ("front",), 128, False, None, 7, None)
    (folder / "episode0" / recording.EPISODE_INFO).write_text(json.dumps({**settings, "attempt": 0}))
    with pytest.raises(ValueError, match=r"seed: recorded 7, asked 0"):
        record_demos("reach_target", 2, tmp_path, seed=0, progress=False)
    with pytest.raises(ValueError, match="cameras"):
        record_demos("reach_target", 2, tmp_path / "new", cameras=("front", "top"), progress=False)
    with pytest.raises(ValueError, match="variation"):
        record_demos("reach_target", 2, tmp_path / "new", variation=99, progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        record_demos("juggle_plates", 2, tmp_path / "new", progress=False)


def test_render_quality_high_changes_the_images_only_and_is_checked_on_resume(tmp_path):
    task, options = "reach_target", dict(image_size=32, cameras=("front",), seed=0, progress=False)
    record_demos(task, 1, tmp_path / "fast", **options)
    record_demos(task, 1, tmp_path / "high", render_quality="high", **options)
    assert [r["render_quality"] for r in episode_info(tmp_path / "fast", task)] == ["fast"]
    assert [r["render_quality"] for r in episode_info(tmp_path / "high", task)] == ["high"]
    fast, high = (load_demo(episode_dirs(tmp_path / name, task)[0]) for name in ("fast", "high"))
    # Rendering is not physics: the same episode, step for step, seen with shadows.
    assert len(fast) == len(high) > 10
    for fast_obs, high_obs in zip(fast, high):
        np.testing.assert_array_equal(fast_obs.joint_positions, high_obs.joint_positions)
    first_png = "episode0/front_rgb/0.png"
    assert (episodes_dir(tmp_path / "fast", task) / first_png).read_bytes() != \
        (episodes_dir(tmp_path / "high", task) / first_png).read_bytes()
    assert np.abs(fast[0].front_rgb.astype(int) - high[0].front_rgb.astype(int)).max() > 20

    # A folder resumes only with the quality it was recorded with, from the API and the command line.
    with pytest.raises(ValueError, match="render_quality: recorded 'high', asked 'fast'"):
        record_demos(task, 2, tmp_path / "high", **options)
    args = ["demos", "--task", task, "--episodes", "1", "--out", str(tmp_path / "high"), "--image-size", "32"]
    with pytest.raises(ValueError, match="render_quality: recorded 'high', asked 'fast'"):
        cli.main(args)
    cli.main([*args, "--render-quality", "high"])   # the same options: nothing left to record
    with pytest.raises(SystemExit):
        cli.main([*args, "--render-quality", "ultra"])

    # Episodes recorded before render_quality was stored were rendered "fast", and resume so.
    info_path = episodes_dir(tmp_path / "fast", task) / "episode0" / recording.EPISODE_INFO
    old = {key: value for key, value in json.loads(info_path.read_text()).items() if key != "render_quality"}
    info_path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="render_quality: recorded 'fast', asked 'high'"):
        record_demos(task, 2, tmp_path / "fast", render_quality="high", **options)
    assert record_demos(task, 2, tmp_path / "fast", **options)["episodes_written"] == 1
    assert [r.get("render_quality") for r in episode_info(tmp_path / "fast", task)] == [None, "fast"]

    with pytest.raises(ValueError, match="render_quality: expected 'fast' or 'high', got 'ultra'"):
        record_demos(task, 1, tmp_path / "bad", render_quality="ultra", **options)


def test_failing_expert_stops_at_max_attempts_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(recording, "_run_attempt",
                        lambda index, driven=None: recording.Attempt(index, 0, 120, False, "no success within 120 steps"))
    with pytest.warns(RuntimeWarning, match="0 of 2 episodes"):
        summary = record_demos("reach_target", 2, tmp_path, image_size=32, max_attempts=5, progress=False)
    assert not summary["complete"] and summary["attempts"] == 5 and len(summary["failures"]) == 5
    assert [f["attempt"] for f in summary["failures"]] == [0, 1, 2, 3, 4]
    assert list(episodes_dir(tmp_path, "reach_target").iterdir()) == []


def test_llarva_demos_command_killed_then_rerun(tmp_path):
    """A hard kill (no cleanup code runs) of `llarva demos` after its first episode, then a rerun:
    the alias writes under RLBench's name, and the result is that of an uninterrupted run."""
    args = ["demos", "--task", "sweep_to_dustpan", "--episodes", "2", "--out", str(tmp_path / "cli"),
            "--image-size", "32", "--cameras", "front,wrist", "--seed", "1"]
    folder = episodes_dir(tmp_path / "cli", "sweep_to_dustpan_of_size")
    process = subprocess.Popen([sys.executable, "-m", "llarva_policy.cli", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (folder / "episode0").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (folder / "episode0").exists(), "llarva demos wrote no episode"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert [d.name for d in episode_dirs(tmp_path / "cli", "sweep_to_dustpan_of_size")] == ["episode0"]

    cli.main(args)
    assert [d.name for d in episode_dirs(tmp_path / "cli", "sweep_to_dustpan_of_size")] == ["episode0", "episode1"]
    demo = load_demo(folder / "episode1", cameras=("front", "wrist"))
    assert demo[0].wrist_rgb.shape == (32, 32, 3)
    record_demos("sweep_to_dustpan_of_size", 2, tmp_path / "whole", image_size=32, cameras=("front", "wrist"),
                 seed=1, progress=False)
    assert snapshot(tmp_path / "cli") == snapshot(tmp_path / "whole")


def test_noise_injection_perturbs_the_executed_velocities_and_keeps_the_experts_labels(tmp_path):
    """DART: the arm executes the expert's velocity plus noise, the expert corrects from where it
    finds itself, the episode still succeeds; the record keeps both the executed velocity
    (joint_velocities) and the expert's command (misc), and the same seed gives the same demo."""
    options = dict(image_size=32, cameras=("front",), seed=0, progress=False)
    record_demos("reach_target", 1, tmp_path / "clean", **options)
    summary = record_demos("reach_target", 1, tmp_path / "noisy", action_noise=0.3, **options)
    assert summary["complete"]
    clean = load_demo(episode_dirs(tmp_path / "clean", "reach_target")[0], load_images=False)
    noisy = load_demo(episode_dirs(tmp_path / "noisy", "reach_target")[0], load_images=False)
    assert episode_info(tmp_path / "noisy", "reach_target")[0]["action_noise"] == 0.3
    assert all(recording.EXPERT_ACTION_KEY not in obs.misc for obs in clean)

    commanded = np.array([obs.misc[recording.EXPERT_ACTION_KEY] for obs in noisy[1:]])
    executed = np.array([obs.joint_velocities for obs in noisy[1:]])
    moving = np.abs(commanded).max(axis=1) > 0.05
    assert moving.sum() > 5
    deviation = np.abs(executed - commanded)[moving].max(axis=1) / np.abs(commanded)[moving].max(axis=1)
    assert 0.05 < np.median(deviation) < 1.5            # noise of about 0.3 x the fastest joint's speed
    assert np.allclose(executed[~moving], commanded[~moving], atol=0.05 * 0.3 * 3 + 1e-6)
    # The path differs from the clean demo's (same scene), and still ends in the target.
    assert not np.allclose(noisy[5].joint_positions, clean[5].joint_positions, atol=1e-3)

    record_demos("reach_target", 1, tmp_path / "again", action_noise=0.3, **options)
    assert snapshot(tmp_path / "again") == snapshot(tmp_path / "noisy")
    with pytest.raises(ValueError, match=r"action_noise: recorded 0.3, asked 0.0"):
        record_demos("reach_target", 2, tmp_path / "noisy", **options)
    for bad in (-0.1, float("nan"), "0.2"):
        with pytest.raises(ValueError, match="action_noise"):
            record_demos("reach_target", 1, tmp_path / "bad", action_noise=bad, **options)
    env = gym.make("llarva/reach_target", action_mode="ee_pose", image_size=32)
    with pytest.raises(ValueError, match="action_noise.*joint_velocity"):
        recording.record_episode(env, None, 0, action_noise=0.1)
    env.close()


def test_llarva_demos_command_takes_action_noise(tmp_path):
    cli.main(["demos", "--task", "reach_target", "--episodes", "1", "--out", str(tmp_path), "--image-size", "32",
              "--action-noise", "0.2"])
    assert episode_info(tmp_path, "reach_target")[0]["action_noise"] == 0.2


class SwingTheBase:
    """A stand-in for a learned policy that has gone astray: it turns the first joint, whatever it sees."""

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        return np.array([0.8, 0, 0, 0, 0, 0, 0, 1.0], dtype=np.float32), state


def test_expert_takeover_records_the_drivers_steps_then_the_expert_recovering(tmp_path):
    """`driver`: the policy drives the first k steps (1..driver_steps, from the seed), then the
    expert finishes from where it left the arm; the driven steps are marked, and annotate makes
    samples of the expert's steps alone, with the driven ones in their history."""
    from llarva_policy.annotations import annotate

    options = dict(image_size=32, cameras=("front",), seed=0, progress=False, driver_steps=6)
    summary = record_demos("reach_target", 2, tmp_path / "takeover", driver=SwingTheBase, **options)
    assert summary["complete"]
    for folder, info in zip(episode_dirs(tmp_path / "takeover", "reach_target"),
                            episode_info(tmp_path / "takeover", "reach_target")):
        demo = load_demo(folder, load_images=False)
        driven = recording.takeover_step(info["reset_seed"], 6)
        assert 1 <= driven <= 6 and info["driver"] == repr(SwingTheBase) and info["driver_steps"] == 6
        marked = [bool(obs.misc.get(recording.POLICY_STEP_KEY)) for obs in demo]
        assert marked == [False] + [True] * driven + [False] * (len(demo) - 1 - driven)
        assert all(obs.joint_velocities[0] == pytest.approx(0.8) for obs in demo[1:driven + 1])
        # The expert turns the base back: the arm left its start pose and came back to the target.
        assert demo[driven].joint_positions[0] == pytest.approx(0.8 * 0.05 * driven, abs=1e-4)
        assert demo[len(demo) - 1].joint_positions[0] < demo[driven].joint_positions[0]
    first = load_demo(episode_dirs(tmp_path / "takeover", "reach_target")[0], load_images=False)
    driven = recording.takeover_step(episode_info(tmp_path / "takeover", "reach_target")[0]["reset_seed"], 6)
    count = annotate(tmp_path / "takeover", tmp_path / "anns.json", "reach_target")
    entries = json.loads((tmp_path / "anns.json").read_text())
    steps = sorted(int(Path(e["image"]).stem) for e in entries if "/episode0/" in e["image"])
    assert steps == list(range(driven, len(first) - 1)) and count == len(entries)
    # The first sample's history holds the driven steps (the base turned), its label the expert's.
    sample = next(e for e in entries if e["image"].endswith(f"episode0/front_rgb/{driven}.png"))
    assert f"{round(0.8 * 0.05 * driven, 4)}" in sample["conversations"][0]["value"]

    record_demos("reach_target", 2, tmp_path / "again", driver=SwingTheBase, **options)
    assert snapshot(tmp_path / "again") == snapshot(tmp_path / "takeover")
    with pytest.raises(ValueError, match=r"driver_steps: recorded 6, asked 3"):
        record_demos("reach_target", 3, tmp_path / "takeover", driver=SwingTheBase, **{**options, "driver_steps": 3})
    with pytest.raises(ValueError, match=r"driver: recorded .*SwingTheBase.*, asked None"):
        record_demos("reach_target", 3, tmp_path / "takeover", **options)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="driver_steps"):
            record_demos("reach_target", 1, tmp_path / "bad", driver=SwingTheBase, **{**options, "driver_steps": bad})
    with pytest.raises(ValueError, match="driver: expected a callable"):
        record_demos("reach_target", 1, tmp_path / "bad", driver="runs/model", **options)


class ReportsTorchThreads(SwingTheBase):
    """A driver that writes, from each recording process, how many threads torch gives it."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        import torch
        (self.folder / str(os.getpid())).write_text(str(torch.get_num_threads()))
        return super().predict(observation, state, episode_start, deterministic)


def test_a_driver_on_torch_gets_its_share_of_the_cores_in_each_recording_process(tmp_path, monkeypatch):
    # What torch would take in each spawned process if left alone (conftest sets 1 for the tests).
    monkeypatch.setenv("OMP_NUM_THREADS", str(2 * (os.cpu_count() or 1) + 1))
    (tmp_path / "threads").mkdir()
    record_demos("reach_target", 2, tmp_path / "data", image_size=32, cameras=("front",), seed=0, progress=False,
                 processes=2, driver=functools.partial(ReportsTorchThreads, tmp_path / "threads"), driver_steps=2)
    reports = [int(f.read_text()) for f in (tmp_path / "threads").iterdir()]
    assert reports and set(reports) == {max(1, (os.cpu_count() or 1) // 2)}   # not one per core each


class SteerByJoints:
    """A driver whose action depends on what it sees (joint positions; one or a batch of them), so
    that each attempt's driven steps differ: a stand-in for a learned policy with a batched predict."""

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        joints = np.asarray(observation["joint_positions"], dtype=np.float64)
        velocities = np.clip(np.sin(7.0 * joints) + 0.3, -2.0, 2.0)
        gripper = np.ones(joints.shape[:-1] + (1,))
        return np.concatenate([velocities, gripper], axis=-1).astype(np.float32), state


def test_batched_driving_then_replay_records_the_same_episodes_as_driving_in_each_process(tmp_path):
    """`driver_num_envs`: the main process drives the attempts two at a time in a vector env, the
    recording processes replay the driven actions and the expert takes over: byte for byte the
    episodes that driving in the recording process gives, with a driver that answers the same
    whatever its batch."""
    options = dict(image_size=32, cameras=("front",), seed=3, progress=False, driver=SteerByJoints, driver_steps=6)
    record_demos("reach_target", 3, tmp_path / "direct", **options)
    summary = record_demos("reach_target", 3, tmp_path / "batched", processes=2, driver_num_envs=2, **options)
    batched = snapshot(tmp_path / "batched")
    # The batched run also keeps its driven steps (the next test replays them elsewhere).
    assert batched.pop(f"reach_target/{recording.DRIVEN_STARTS_FILE}")
    assert summary["complete"] and batched == snapshot(tmp_path / "direct")
    driven = [recording.takeover_step(info["reset_seed"], 6) for info in episode_info(tmp_path / "direct", "reach_target")]
    assert len(set(driven)) > 1          # attempts of different lengths ran side by side
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="driver_num_envs"):
            record_demos("reach_target", 1, tmp_path / "bad", driver_num_envs=bad, **options)
    with pytest.raises(ValueError, match="driver_num_envs"):
        record_demos("reach_target", 1, tmp_path / "bad", image_size=32, progress=False, driver_num_envs=2)


class MustNotDrive:
    """A driver factory for a run that should replay every attempt from a saved file."""

    def __call__(self):
        raise AssertionError("the driver was made, but every attempt's driven steps were saved")


def test_saved_driven_starts_are_replayed_elsewhere_without_the_driver(tmp_path):
    """A batched run keeps its driven steps in <out>/<task>/driven_starts.npz; another folder that
    gets that file (another machine, with the file carried there) records the same episodes byte
    for byte without making the driver. A file from other settings is not used (a warning); a
    damaged one is an error that says to remove it."""
    options = dict(image_size=32, cameras=("front",), seed=3, progress=False, driver_steps=6, driver_num_envs=2,
                   driver_name="steer")
    first = record_demos("reach_target", 3, tmp_path / "driven", driver=SteerByJoints, **options)
    saved = recording.driven_starts_path(tmp_path / "driven", "reach_target")
    assert saved.is_file() and first["driving_seconds"] > 0 and "replayed_from_file" not in first
    starts = recording.load_driven_starts(saved, recording._settings(
        "reach_target", ("front",), 32, False, None, 3, None, "fast", 0.0, "steer", 6))
    assert len(starts) >= 3 and all(1 <= len(s.actions) <= 6 for s in starts.values())

    copy = recording.driven_starts_path(tmp_path / "replayed", "reach_target")
    copy.parent.mkdir(parents=True)
    copy.write_bytes(saved.read_bytes())
    again = record_demos("reach_target", 3, tmp_path / "replayed", driver=MustNotDrive(), **options)
    assert again["replayed_from_file"] == again["attempts"] and "driving_seconds" not in again
    assert snapshot(tmp_path / "replayed") == snapshot(tmp_path / "driven")

    # Other settings (another driver): not replayed, driven again, with a warning naming the setting.
    other = recording.driven_starts_path(tmp_path / "other", "reach_target")
    other.parent.mkdir(parents=True)
    other.write_bytes(saved.read_bytes())
    with pytest.warns(RuntimeWarning, match=r"recorded with other settings \(driver: 'steer'\)"):
        summary = record_demos("reach_target", 1, tmp_path / "other", driver=SteerByJoints,
                               **{**options, "driver_name": "another"})
    assert summary["driving_seconds"] > 0 and "replayed_from_file" not in summary

    damaged = recording.driven_starts_path(tmp_path / "damaged", "reach_target")
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(saved.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"driven_starts.npz: not a readable driven-starts file .* remove it"):
        record_demos("reach_target", 1, tmp_path / "damaged", driver=SteerByJoints, **options)


@pytest.mark.parametrize("processes", [1, 2])
def test_saved_driven_starts_that_do_not_replay_here_are_driven_again(tmp_path, processes):
    """A saved file whose states this machine's simulator does not reach (here: its joint positions
    nudged, as another machine's last digits would differ) is dropped with a warning and the
    attempts driven again: the same episodes as driving them in the first place, not a stopped run."""
    options = dict(image_size=32, cameras=("front",), seed=3, progress=False, driver=SteerByJoints, driver_steps=6,
                   driver_num_envs=2, driver_name="steer")
    record_demos("reach_target", 3, tmp_path / "driven", **options)
    saved = recording.driven_starts_path(tmp_path / "driven", "reach_target")
    with np.load(saved) as stored:
        arrays = dict(stored)
    arrays["joint_positions"] = arrays["joint_positions"] + 0.01
    elsewhere = recording.driven_starts_path(tmp_path / "elsewhere", "reach_target")
    elsewhere.parent.mkdir(parents=True)
    np.savez(elsewhere, **arrays)
    with pytest.warns(RuntimeWarning, match="do not replay here"):
        summary = record_demos("reach_target", 3, tmp_path / "elsewhere", processes=processes, **options)
    assert summary["complete"] and "replayed_from_file" not in summary and summary["driving_seconds"] > 0
    episodes = {name: data for name, data in snapshot(tmp_path / "elsewhere").items() if "episode" in name}
    assert episodes == {name: data for name, data in snapshot(tmp_path / "driven").items() if "episode" in name}
    # The file now holds the steps driven here, which replay.
    assert record_demos("reach_target", 3, tmp_path / "again", **options)
    again = recording.driven_starts_path(tmp_path / "again", "reach_target")
    again.write_bytes(elsewhere.read_bytes())
    shutil.rmtree(tmp_path / "again" / "reach_target" / "all_variations")
    assert record_demos("reach_target", 3, tmp_path / "again", **{**options, "driver": MustNotDrive()})[
        "replayed_from_file"] >= 3


def test_a_replay_that_leaves_the_driven_states_stops_the_run(tmp_path, monkeypatch):
    """The recording process checks the joint positions at each replayed step: a mismatch (an env
    made otherwise) is an error that names the step, not a quietly failed attempt."""
    real_drive = recording.drive_attempts

    def drive_elsewhere(*args, **kwargs):
        driven = real_drive(*args, **kwargs)
        for start in driven.values():
            start.joint_positions[-1] += 0.01
        return driven

    monkeypatch.setattr(recording, "drive_attempts", drive_elsewhere)
    with pytest.raises(recording.ReplayDivergedError, match=r"at step \d+ the joint positions"):
        record_demos("reach_target", 1, tmp_path / "data", image_size=32, seed=0, progress=False,
                     driver=SteerByJoints, driver_steps=4, driver_num_envs=1)
    assert episode_dirs(tmp_path / "data", "reach_target") == []


@pytest.mark.parametrize("batched", [False, True])
def test_llarva_demos_command_takes_a_checkpoint_as_driver(tmp_path, batched):
    """A LLARVA checkpoint (random weights, constrained answers) drives the first steps in two
    spawned recording processes, each loading its own copy; or (`--driver-num-envs 2`) in the
    main process, two episodes per batched answer, the recording processes replaying its steps."""
    from llarva_policy.model import make_random_llava

    checkpoint = make_random_llava(tmp_path / "tiny", size="tiny", seed=0)
    cli.main(["demos", "--task", "reach_target", "--episodes", "2", "--out", str(tmp_path / "data"),
              "--image-size", "32", "--processes", "2", "--driver", str(checkpoint), "--driver-steps", "2"]
             + (["--driver-num-envs", "2"] if batched else []))
    infos = episode_info(tmp_path / "data", "reach_target")
    assert len(infos) == 2 and all(info["driver"] == str(Path(checkpoint).resolve()) for info in infos)
    for folder, info in zip(episode_dirs(tmp_path / "data", "reach_target"), infos):
        demo = load_demo(folder, load_images=False)
        driven = recording.takeover_step(info["reset_seed"], 2)
        assert [bool(obs.misc.get(recording.POLICY_STEP_KEY)) for obs in demo[1:driven + 2]] == [True] * driven + [False]


def test_takeover_throughput_benchmark_compares_both_modes_on_the_same_attempts(tmp_path, load_script):
    """benchmarks/takeover_throughput.py: the driver in each recording process, then batched, the
    same takeover demos asked of both; the batched row's ratio is against the first row."""
    from llarva_policy.model import make_random_llava

    benchmark = load_script("benchmarks/takeover_throughput.py")
    checkpoint = make_random_llava(tmp_path / "tiny", size="tiny", seed=0)
    out = tmp_path / "throughput.json"
    result = benchmark.main(["--checkpoint", str(checkpoint), "--episodes", "2", "--processes", "2",
                             "--num-envs", "2", "--driver-steps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    processes, batched = result["rows"]
    assert (processes["mode"], batched["mode"]) == ("processes", "batched 2")
    assert processes["episodes"] == batched["episodes"] == 2
    assert processes["driving_seconds"] is None and 0 < batched["driving_seconds"] < batched["seconds"]
    assert batched["speedup_vs_processes"] == round(processes["seconds"] / batched["seconds"], 2)
