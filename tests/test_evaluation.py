"""evaluate(): the scripted expert, resume after a kill, videos, demo starts, and a tiny LlarvaPolicy."""

import json
import math
import subprocess
import sys

import gymnasium as gym
import imageio.v2 as imageio
import mujoco
import numpy as np
import pytest
import torch

import llarva_gym  # noqa: F401
from llarva_gym import ScriptedExpert
from llarva_gym.demos import Demo, episode_path, load_demo, save_demo
from llarva_gym.evaluation import _video_frame, episode_reset_seed, evaluate, print_summary
from llarva_gym.expert import WaypointFollower
from llarva_policy import cli

RECORD_KEYS = {"index", "reset_seed", "episode_seed", "variation", "instruction", "success", "steps", "seconds",
               "parse_errors"}


class StandStill:
    """A policy that holds position; remembers every episode's first observation and counts calls."""

    name = "stand-still"

    def __init__(self, fail_at_call=None):
        self.calls, self.fail_at_call = 0, fail_at_call
        self.first_observations = []

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("simulated kill")
        for i in np.flatnonzero(episode_start):
            self.first_observations.append({key: value[i] for key, value in observation.items()})
        actions = np.zeros((len(episode_start), 8), dtype=np.float32)
        actions[:, 7] = 1.0
        return actions, state


def test_expert_succeeds_with_per_episode_records(tmp_path, capsys):
    results = evaluate("expert", "reach_target", episodes=3, episode_length=60, results_path=tmp_path / "r.json",
                       progress=False)
    assert results["summary"] == {"episodes": 3, "successes": 3, "success_rate": 1.0,
                                  "mean_steps": pytest.approx(np.mean([r["steps"] for r in results["episodes"]]))}
    assert [r["index"] for r in results["episodes"]] == [0, 1, 2]
    for record in results["episodes"]:
        assert RECORD_KEYS <= set(record) and record["success"] and 0 < record["steps"] < 60
        assert record["reset_seed"] == episode_reset_seed(0, record["index"])
        assert record["instruction"].startswith("reach the")
    assert (results["task"], results["policy"]) == ("reach_target", "expert")
    assert json.loads((tmp_path / "r.json").read_text()) == results
    print_summary(results)
    assert "3/3 succeeded (100.0%)" in capsys.readouterr().out


def test_same_episodes_with_any_number_of_envs(tmp_path):
    one = evaluate(StandStill(), "reach_target", episodes=3, episode_length=2, num_envs=1, progress=False)
    two = evaluate(StandStill(), "reach_target", episodes=3, episode_length=2, num_envs=2, progress=False)
    fields = ("index", "reset_seed", "episode_seed", "variation", "instruction", "steps")
    assert [[r[f] for f in fields] for r in one["episodes"]] == [[r[f] for f in fields] for r in two["episodes"]]
    assert len({r["episode_seed"] for r in one["episodes"]}) == 3


def test_rerun_resumes_after_a_kill_without_redoing_episodes(tmp_path):
    path = tmp_path / "results.json"
    killed = StandStill(fail_at_call=5)          # episode_length 3: calls 1-3 are episode 0, the kill is in episode 1
    with pytest.raises(KeyboardInterrupt):
        evaluate(killed, "reach_target", episodes=3, episode_length=3, results_path=path, progress=False)
    saved = json.loads(path.read_text())
    assert [r["index"] for r in saved["episodes"]] == [0]
    (tmp_path / ".results.json.tmp-999").write_text('{"episodes": [{"ind')     # a write cut off by the kill

    rerun = StandStill()
    results = evaluate(rerun, "reach_target", episodes=3, episode_length=3, results_path=path, progress=False)
    assert len(rerun.first_observations) == 2 and rerun.calls == 6            # episodes 1 and 2 only
    assert [r["index"] for r in results["episodes"]] == [0, 1, 2]
    assert results["episodes"][0] == saved["episodes"][0]
    assert json.loads(path.read_text()) == results

    again = StandStill()
    assert evaluate(again, "reach_target", episodes=3, episode_length=3, results_path=path, progress=False) == results
    assert again.calls == 0
    with pytest.raises(ValueError, match="another run.*seed: 0 there, 1 now"):
        evaluate(StandStill(), "reach_target", episodes=3, episode_length=3, results_path=path, seed=1, progress=False)


def test_a_fixed_variation_is_every_episodes_and_part_of_the_run(tmp_path):
    path, options = tmp_path / "results.json", dict(episodes=3, episode_length=2, progress=False)
    drawn = evaluate(StandStill(), "reach_target", **options)
    assert len({r["variation"] for r in drawn["episodes"]}) > 1
    fixed = evaluate(StandStill(), "reach_target", results_path=path, variation=4, num_envs=2, **options)
    assert [r["variation"] for r in fixed["episodes"]] == [4, 4, 4] and fixed["variation"] == 4
    assert len({r["instruction"] for r in fixed["episodes"]}) == 1
    with pytest.raises(ValueError, match="another run.*variation: 4 there, None now"):
        evaluate(StandStill(), "reach_target", results_path=path, **options)
    with pytest.raises(ValueError, match="variation: expected None"):
        evaluate(StandStill(), "reach_target", variation=20, **options)
    cli_path = tmp_path / "cli.json"
    cli.main(["eval", "--policy", "expert", "--task", "reach_target", "--episodes", "1", "--episode-length", "2",
              "--variation", "2", "--results", str(cli_path)])
    assert [r["variation"] for r in json.loads(cli_path.read_text())["episodes"]] == [2]


def test_render_quality_is_the_envs_and_part_of_the_run(tmp_path):
    path, options = tmp_path / "results.json", dict(episodes=1, episode_length=2, progress=False)
    high, fast = StandStill(), StandStill()
    results = evaluate(high, "reach_target", results_path=path, render_quality="high", **options)
    evaluate(fast, "reach_target", **options)
    assert results["render_quality"] == json.loads(path.read_text())["render_quality"] == "high"
    # The same episode seen with shadows: other pixels, the same robot.
    high_first, fast_first = high.first_observations[0], fast.first_observations[0]
    assert np.abs(high_first["front_rgb"].astype(int) - fast_first["front_rgb"].astype(int)).max() > 20
    np.testing.assert_array_equal(high_first["joint_positions"], fast_first["joint_positions"])

    with pytest.raises(ValueError, match="another run.*render_quality: 'high' there, 'fast' now"):
        evaluate(StandStill(), "reach_target", results_path=path, **options)
    # The command line passes it through.
    cli_path = tmp_path / "cli.json"
    args = ["eval", "--policy", "expert", "--task", "reach_target", "--episodes", "1", "--episode-length", "2",
            "--results", str(cli_path)]
    cli.main([*args, "--render-quality", "high"])
    assert json.loads(cli_path.read_text())["render_quality"] == "high"
    with pytest.raises(ValueError, match="render_quality: 'high' there, 'fast' now"):
        cli.main(args)

    # A results file from before render_quality was recorded is of a "fast" run.
    old = {key: value for key, value in json.loads(path.read_text()).items() if key != "render_quality"}
    path.write_text(json.dumps(old))
    again = StandStill()
    assert evaluate(again, "reach_target", results_path=path, **options)["episodes"] == old["episodes"]
    assert again.calls == 0
    with pytest.raises(ValueError, match="render_quality: 'fast' there, 'high' now"):
        evaluate(StandStill(), "reach_target", results_path=path, render_quality="high", **options)


def test_videos_have_one_frame_per_step_plus_the_first(tmp_path):
    results = evaluate("expert", "reach_target", episodes=2, episode_length=40, num_envs=2, video_dir=tmp_path / "v",
                       progress=False)
    for record in results["episodes"]:
        frames = imageio.mimread(record["video"], memtest=False)
        assert len(frames) == record["steps"] + 1
        assert frames[0].shape == (256, 256, 3)
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["episode000.mp4", "episode001.mp4"]


def test_video_frames_show_the_visual_trace_scaled_to_the_render():
    frame = np.full((256, 256, 3), 128, dtype=np.uint8)
    observation_image = np.zeros((128, 128, 3), dtype=np.uint8)
    plain = _video_frame(frame, "reach the red target")
    traced = _video_frame(frame, "reach the red target", np.array([[40, 60], [100, 100]]), observation_image)
    assert (plain[:14] != frame[:14]).any()                   # the instruction band
    assert (traced[121, 81] != frame[121, 81]).any()          # trace point (40, 60) at 2x scale
    assert (traced[201, 201] != frame[201, 201]).any()        # trace point (100, 100)
    assert (plain[121, 81] == frame[121, 81]).all()


def record_expert_demos(root, count, steps=3):
    """Short scripted-expert episodes in RLBench's layout, with the embedded simulator's start state."""
    env = gym.make("llarva/reach_target")
    expert = ScriptedExpert(env)
    for index in range(count):
        obs, info = env.reset(seed=100 + index)
        demo = Demo([env.unwrapped.rlbench_observation()],
                    random_seed={"episode_seed": info["episode_seed"], "variation": info["variation"]})
        for _ in range(steps):
            obs, *_ = env.step(expert.predict(obs)[0])
            demo._observations.append(env.unwrapped.rlbench_observation())
        save_demo(demo, episode_path(root, "reach_target", index), variation_number=info["variation"],
                  descriptions=info["descriptions"])
    env.close()


def test_episodes_start_from_stored_demos(tmp_path):
    record_expert_demos(tmp_path / "demos", 2)
    policy = StandStill()
    results = evaluate(policy, "reach_target", episodes=2, episode_length=2, num_envs=2, demos=tmp_path / "demos",
                       progress=False)
    by_index = {r["index"]: r for r in results["episodes"]}
    assert len(policy.first_observations) == 2          # env i ran episode i, both from the first step
    for index in (0, 1):
        record = by_index[index]
        demo = load_demo(record["demo"])
        assert record["demo"].endswith(f"episode{index}")
        assert record["variation"] == demo.variation_number and record["instruction"] == demo.variation_descriptions[0]
        first = policy.first_observations[index]
        assert first["instruction"] == record["instruction"]
        np.testing.assert_array_equal(first["front_rgb"], demo[0].front_rgb)
        np.testing.assert_allclose(first["joint_positions"], demo[0].joint_positions, atol=1e-6)
    assert not np.array_equal(policy.first_observations[0]["front_rgb"], policy.first_observations[1]["front_rgb"])
    with pytest.raises(ValueError, match="holds 2 reach_target episode"):
        evaluate(StandStill(), "reach_target", episodes=3, demos=tmp_path / "demos", progress=False)


def test_tiny_llarva_policy_runs_to_completion(tmp_path):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # a tiny model is faster on one thread; OpenMP threads spin on a shared machine
    try:
        run_tiny_llarva_policy(tmp_path)
    finally:
        torch.set_num_threads(threads)


def run_tiny_llarva_policy(tmp_path):
    from llarva_policy import LlarvaPolicy
    from llarva_policy.model import make_random_llava
    policy = LlarvaPolicy.from_pretrained(make_random_llava(tmp_path / "tiny"), device="cpu", on_parse_error="hold",
                                          max_new_tokens=6)
    results = evaluate(policy, "reach_target", episodes=2, episode_length=3, num_envs=2, results_path=tmp_path / "r.json",
                       video_dir=tmp_path / "v", progress=False)
    assert results["policy"] == f"llarva:{(tmp_path / 'tiny').name}"
    assert [(r["steps"], r["success"], r["parse_errors"]) for r in results["episodes"]] == [(3, False, 3)] * 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        evaluate("expert", "no_such_task", episodes=1)
    with pytest.raises(ValueError, match="policy"):
        evaluate("random", "reach_target", episodes=1)
    with pytest.raises(ValueError, match="episodes"):
        evaluate("expert", "reach_target", episodes=-1)
    with pytest.raises(ValueError, match="render_quality: expected 'fast' or 'high', got 'ultra'"):
        evaluate("expert", "reach_target", episodes=1, render_quality="ultra")


def test_module_does_not_import_torch():
    code = "import sys, llarva_gym.evaluation; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_closed_loop_drift_benchmark_asks_the_expert_along_the_policys_rollout(tmp_path, load_script):
    """benchmarks/closed_loop_drift.py: a checkpoint drives; at each state it reaches, the expert's
    command from there and the tip's distance to its waypoint are recorded."""
    from llarva_policy.model import make_random_llava

    benchmark = load_script("benchmarks/closed_loop_drift.py")
    checkpoint = make_random_llava(tmp_path / "tiny", size="tiny", seed=0)
    out = tmp_path / "drift.json"
    benchmark.main(["--task", "reach_target", "--checkpoint", str(checkpoint), "--episodes", "1", "--steps", "4",
                    "--variation", "3", "--seed", "5", "--render-quality", "high", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["render_quality"] == "high"
    [episode] = record["episodes"]
    assert [row["step"] for row in episode["steps"]] == [0, 1, 2, 3]
    assert all(-1 <= row["cosine"] <= 1 for row in episode["steps"])

    # Step 0 against the same episode started here: the expert's first command and the distance.
    env = gym.make("llarva/reach_target", variation=3)
    obs, _ = env.reset(seed=episode_reset_seed(5, 0))
    target = env.unwrapped.backend.task.waypoints()[0].position
    first = episode["steps"][0]
    assert first["tip_to_waypoint_m"] == pytest.approx(np.linalg.norm(obs["gripper_pose"][:3] - target), abs=1e-4)
    assert first["expert_speed"] == pytest.approx(np.linalg.norm(env.unwrapped.expert_action()[:7]), abs=1e-4)
    assert episode["closest_m"] == min(row["tip_to_waypoint_m"] for row in episode["steps"])
    # The offset from the target split along the front camera's ray (the camera as MuJoCo places it).
    backend = env.unwrapped.backend
    camera = backend.data.cam_xpos[mujoco.mj_name2id(backend.model, mujoco.mjtObj.mjOBJ_CAMERA, "front")]
    ray = (target - camera) / np.linalg.norm(target - camera)
    offset = obs["gripper_pose"][:3] - target
    assert first["depth_m"] == pytest.approx(offset @ ray, abs=1e-4)
    assert episode["goal_depth_m"] == pytest.approx(np.linalg.norm(target - camera), abs=1e-4)
    assert first["lateral_m"] == pytest.approx(np.linalg.norm(offset - (offset @ ray) * ray), abs=1e-4)
    # The expert's first step heads straight for the target: its aim lies on the camera's ray at the target's depth.
    assert abs(first["expert_aim_depth_error_m"]) < 0.03 and first["expert_aim_miss_m"] < 0.01
    assert record["first_step_aim"]["expert"]["median_abs_depth_error_m"] == abs(first["expert_aim_depth_error_m"])
    # The start pose's hand is off the waypoint's (pointing down) by more than one step's turn, so the
    # expert's first command turns it at the expert's most, while the tip goes at the waypoint's speed.
    from llarva_gym.backends.mujoco.robot import rotation_error
    from llarva_gym.expert import MAX_TURN_RATE

    hand = backend.panda.gripper_matrix()[:3, :3]
    waypoint = backend.task.waypoints()[0]
    assert first["orientation_error_rad"] == pytest.approx(np.linalg.norm(rotation_error(hand, waypoint.rotation)),
                                                           abs=1e-3) and first["orientation_error_rad"] > 0.1
    assert first["expert_turn_rate"] == pytest.approx(MAX_TURN_RATE, rel=0.02)
    assert first["expert_tip_speed"] == pytest.approx(waypoint.speed, rel=0.02)
    assert sum(band["steps"] for band in record["by_distance"]) == 4
    objects = episode["closest_to_objects_m"]
    assert sorted(objects) == ["distractor0", "distractor1", "target"]
    assert objects["target"] == pytest.approx(episode["closest_m"], abs=1e-4)   # reach's one waypoint is the target
    for name in ("distractor0", "distractor1"):   # the closest over the rollout: at most where it started
        start = np.linalg.norm(obs["gripper_pose"][:3] - backend.task.body_position(name))
        assert 0 < objects[name] <= start + 1e-4
    env.close()


def test_closed_loop_drift_oracle_orientation_keeps_the_tip_motion_and_turns_the_hand(load_script):
    from llarva_gym.action_modes import VELOCITY_LIMIT
    from llarva_gym.backends.mujoco.robot import rotation_error
    from llarva_gym.backends.mujoco.scene import CONTROL_PERIOD
    from llarva_gym.expert import MAX_TURN_RATE

    benchmark = load_script("benchmarks/closed_loop_drift.py")
    env = gym.make("llarva/reach_target", variation=0)
    env.reset(seed=4)
    panda = env.unwrapped.backend.panda
    down = env.unwrapped.backend.task.waypoints()[0].rotation
    for _ in range(10):     # on the way to the target, the hand pointing down
        env.step(env.unwrapped.expert_action())
    velocity = np.array([0.1, -0.1, 0.05, 0.2, -0.1, 0.1, 0.2])
    for turn_steps, limited in ((1, False), (4, True)):   # the hand turned off by 0.02 rad, then 0.16 more
        for _ in range(turn_steps):
            env.step(np.array([0, 0, 0, 0, 0, 0.4 * turn_steps, 0, 1], dtype=np.float32))
        q = panda.joint_positions
        _, hand = panda.forward_kinematics(q)
        before = np.linalg.norm(rotation_error(hand, down))
        fixed = benchmark.turning_toward(panda, q, velocity, down)
        tip, turned_hand = panda.forward_kinematics(q + fixed * CONTROL_PERIOD)
        after = np.linalg.norm(rotation_error(turned_hand, down))
        assert np.all(np.abs(fixed) <= VELOCITY_LIMIT * 0.95 + 1e-9)
        if not limited:     # a small turn within the joints' limits: the policy's tip motion, the hand turned back
            wanted_tip, _ = panda.forward_kinematics(q + velocity * CONTROL_PERIOD)
            np.testing.assert_allclose(tip, wanted_tip, atol=2e-4)
            assert before < MAX_TURN_RATE * CONTROL_PERIOD and after < 2e-3
        else:               # a large one: a step's turn at most, slowed to the joints' limits
            assert before > MAX_TURN_RATE * CONTROL_PERIOD
            assert before - MAX_TURN_RATE * CONTROL_PERIOD - 1e-3 < after < before - 0.01
    env.close()


def test_replan_every_holds_each_answer_and_still_advances_the_history(tmp_path, load_script):
    """benchmarks/replan_every.py: with R=3 the policy answers at steps 0, 3, 6, the action is held
    in between, and each answer's prompt is the one llarva eval builds (the history of every step)."""
    from llarva_policy import LlarvaPolicy
    from llarva_policy.model import make_random_llava

    benchmark = load_script("benchmarks/replan_every.py")
    checkpoint = make_random_llava(tmp_path / "tiny", size="tiny", seed=0)
    policy = LlarvaPolicy.from_pretrained(checkpoint, constrained=True)
    with pytest.raises(ValueError, match="replan_every: expected an int >= 1"):
        benchmark.HeldAnswers(policy, 0)
    held = benchmark.HeldAnswers(policy, 3)
    env = gym.make("llarva/reach_target", variation=0)
    obs, _ = env.reset(seed=3)
    state = reference_state = None
    answered, actions = [], []
    for step in range(7):
        batch = {key: np.asarray(value)[None] for key, value in obs.items()}
        start = np.array([step == 0])
        reference_prompts, reference_state = policy.build_prompts(batch, reference_state, start)
        action, state = held.predict(batch, state, start)
        np.testing.assert_array_equal(state, reference_state)
        answered.append(bool(held.last_info[0]))
        if answered[-1]:
            assert held.last_info[0]["prompt"] == reference_prompts[0]
        actions.append(action[0].copy())
        obs, *_ = env.step(action[0])
    env.close()
    assert answered == [True, False, False, True, False, False, True] and held.answers == 3
    assert all(np.array_equal(actions[i], actions[0]) for i in (1, 2))
    assert all(np.array_equal(actions[i], actions[3]) for i in (4, 5))

    out = tmp_path / "replan.json"
    benchmark.main(["--task", "reach_target", "--checkpoint", str(checkpoint), "--episodes", "1",
                    "--episode-length", "4", "--variation", "0", "--num-envs", "1", "--replan-every", "1,2",
                    "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [(run["replan_every"], run["episodes"], run["answers"]) for run in runs] == [(1, 1, 4), (2, 1, 2)]
    assert (tmp_path / "replan_every1.json").is_file() and (tmp_path / "replan_every2.json").is_file()
    with pytest.raises(SystemExit, match="--replan-every: expected comma-separated ints"):
        benchmark.main(["--task", "reach_target", "--checkpoint", str(checkpoint), "--replan-every", "1,two"])


def test_closed_loop_drift_training_scenes_are_the_demos_scenes(tmp_path, load_script):
    """--training-scenes starts episode k where `llarva demos --seed S` started attempt k."""
    from llarva_gym.demos import episode_dirs, load_demo
    from llarva_gym.recording import record_demos
    from llarva_policy.model import make_random_llava

    record_demos("reach_target", 1, tmp_path / "demos", image_size=32, variation=3, seed=7, progress=False)
    demo = load_demo(episode_dirs(tmp_path / "demos", "reach_target")[0], load_images=False)
    end = demo[-1].gripper_pose[:3]   # the expert ends inside the target (2.5 cm radius)

    benchmark = load_script("benchmarks/closed_loop_drift.py")
    checkpoint = make_random_llava(tmp_path / "tiny", size="tiny", seed=0)
    for scenes, close in ((["--training-scenes"], True), ([], False)):
        out = tmp_path / f"drift{len(scenes)}.json"
        benchmark.main(["--task", "reach_target", "--checkpoint", str(checkpoint), "--episodes", "1", "--steps", "1",
                        "--variation", "3", "--seed", "7", *scenes, "--out", str(out)])
        [episode] = json.loads(out.read_text())["episodes"]
        assert (np.linalg.norm(np.array(episode["goal_m"]) - end) < 0.026) == close


def test_closed_loop_drift_aim_is_where_the_heading_meets_the_cameras_ray(load_script):
    benchmark = load_script("benchmarks/closed_loop_drift.py")
    aim = benchmark.aim
    camera, goal, tip = np.array([1.0, 0.0, 1.5]), np.array([0.3, 0.1, 1.0]), np.array([0.2, -0.3, 1.3])
    ray = (goal - camera) / np.linalg.norm(goal - camera)
    beyond = goal + 0.1 * ray   # heading for a point 10 cm beyond the goal, on the ray
    assert aim(tip, 0.01 * (beyond - tip), camera, ray, goal) == pytest.approx({"depth_error_m": 0.1, "miss_m": 0.0},
                                                                                abs=1e-4)
    aside = goal + 0.05 * np.cross(ray, [0.0, 0.0, 1.0]) / np.linalg.norm(np.cross(ray, [0.0, 0.0, 1.0]))
    assert aim(tip, aside - tip, camera, ray, goal)["miss_m"] > 0.01   # a point off the ray: no depth explains it
    assert aim(tip, tip - goal, camera, ray, goal) == {"depth_error_m": None, "miss_m": None}   # moving away
    assert aim(tip, np.zeros(3), camera, ray, goal) == {"depth_error_m": None, "miss_m": None}   # standing still

    # Over episodes: a policy that reads depth aims with slope 1, one that aims at one depth with slope 0.
    def episode(goal_depth, error):
        return {"goal_depth_m": goal_depth, "steps": [{"policy_aim_depth_error_m": error, "policy_aim_miss_m": 0.01,
                                                       "expert_aim_depth_error_m": 0.0, "expert_aim_miss_m": 0.0}]}
    depths = [1.0, 1.1, 1.2, 1.3]
    reads = benchmark.first_step_aim([episode(d, 0.02) for d in depths])
    assert reads["policy"]["slope_aimed_vs_true_depth"] == pytest.approx(1.0)
    assert reads["policy"]["median_abs_depth_error_m"] == pytest.approx(0.02)
    one_depth = benchmark.first_step_aim([episode(d, 1.15 - d) for d in depths])
    assert one_depth["policy"]["slope_aimed_vs_true_depth"] == pytest.approx(0.0, abs=1e-9)
    assert one_depth["policy"]["correlation_aimed_vs_true_depth"] is None   # undefined, not NaN in the JSON


def test_depth_cue_benchmark_finds_the_target_and_its_shadow(tmp_path, load_script):
    """benchmarks/depth_cue.py: the target's pixels are found by moving it out of sight; only the
    high renderer draws a shadow; the regression from the sphere's size explains some of the depth."""
    benchmark = load_script("benchmarks/depth_cue.py")
    out = tmp_path / "depth_cue.json"
    report = benchmark.main(["--scenes", "12", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    fast, high = report["rows"]["fast"], report["rows"]["high"]
    assert [r["depth_m"] for r in fast] == [r["depth_m"] for r in high]       # the same scenes both ways
    assert all(r["sphere_px"] >= 10 for r in fast + high)
    assert all(r["shadow_uv"] is None for r in fast) and sum(r["shadow_uv"] is not None for r in high) >= 6
    # the shadow falls away from the light, below the sphere in the image
    assert all(r["shadow_uv"][1] > r["sphere_uv"][1] for r in high if r["shadow_uv"] is not None)
    cues = [r["cue"] for r in report["results"]]
    assert cues == ["fast: sphere position and size", "high: sphere position and size",
                    "high: and the shadow's position"]
    with pytest.raises(SystemExit):
        benchmark.main(["--scenes", "3", "--out", str(out)])


def test_bc_baseline_learns_from_the_labels_annotate_writes_and_runs_llarva_evals_episodes(tmp_path, load_script):
    """benchmarks/bc_baseline.py: its samples are annotate's (the same steps, the same expert labels
    and joint history), its policy keeps the history as LlarvaPolicy does, and a run writes the
    baseline's and the expert's results on the same episodes."""
    from llarva_gym.recording import record_demos
    from llarva_policy import codec
    from llarva_policy.annotations import annotate

    benchmark = load_script("benchmarks/bc_baseline.py")
    data = tmp_path / "data"
    record_demos("reach_target", 2, data, image_size=32, seed=0, variation=0, action_noise=0.3, progress=False)
    samples = benchmark.load_samples(data, "reach_target")
    in_workers = benchmark.load_samples(data, "reach_target", processes=2)
    assert all(torch.equal(samples[name], in_workers[name]) for name in samples)
    annotate(data, tmp_path / "a.json", "reach_target", shuffle=False, progress=False)
    entries = json.loads((tmp_path / "a.json").read_text())
    assert len(entries) == len(samples["labels"]) > 10
    for entry, label, history in zip(entries, samples["labels"], samples["histories"]):
        answer = codec.parse_answer(entry["conversations"][1]["value"])
        np.testing.assert_allclose(answer.action[:7], label.numpy(), atol=6e-5)
        written = codec.format_history([row for row in history.numpy().astype(np.float64) if np.any(row)])
        assert written in entry["conversations"][0]["value"]
    assert not samples["histories"][0][:-1].any()          # the first step: only the current pose

    model = benchmark.VisuomotorPolicy()
    policy = benchmark.BaselinePolicy(model.eval())
    obs = {"front_rgb": np.zeros((2, 32, 32, 3), np.uint8), "joint_positions": np.ones((2, 7), np.float32)}
    action, state = policy.predict(obs, None, np.array([True, True]))
    assert action.shape == (2, 8) and np.all(action[:, 7] == 1.0) and np.isnan(state[:, :-1]).all()
    _, state = policy.predict({**obs, "joint_positions": np.full((2, 7), 2.0, np.float32)}, state,
                              np.array([False, True]))
    assert state[0, -2, 0] == 1.0 and np.isnan(state[1, -2, 0]) and np.all(state[:, -1] == 2.0)
    model.label_scale.fill_(1e4)        # velocities beyond the Panda's limits: clipped to them, counted
    action, _ = policy.predict(obs, None, np.array([True, True]))
    assert np.all(np.abs(action[:, :7]) <= benchmark.VELOCITY_LIMIT) and policy.clipped > 0

    # The tower variants: train-small's vision towers, their 64 image tokens to the MLP.
    for vision, tokens in (("vit", 64), ("swin", 64), ("swin256", 256), ("focal", 64)):
        tower = benchmark.VisuomotorPolicy(vision).eval()
        assert tower.vision.features == tokens * 16
        with torch.no_grad():
            assert tower(torch.zeros(2, 3, 128, 128, dtype=torch.uint8), torch.zeros(2, 5, 7)).shape == (2, 7)
    with pytest.raises(ValueError, match="vision: expected 'cnn' or one of"):
        benchmark.VisuomotorPolicy("resnet")

    out = tmp_path / "bc.json"
    benchmark.main(["--demos", "2", "--data", str(tmp_path / "run"), "--train-seconds", "2", "--episodes", "1",
                    "--render-quality", "fast", "--num-envs", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["training"]["steps"] > 0 and report["expert"]["episodes"] == report["baseline"]["episodes"] == 1
    assert report["expert"]["successes"] == 1
    assert (tmp_path / "bc_baseline_episodes.json").is_file() and (tmp_path / "bc_expert_episodes.json").is_file()
    # Run again: the kept weights are evaluated, not trained anew.
    assert (tmp_path / "bc.pt").is_file()
    benchmark.main(["--demos", "2", "--data", str(tmp_path / "run"), "--train-seconds", "2", "--episodes", "1",
                    "--render-quality", "fast", "--num-envs", "1", "--out", str(out)])
    again = json.loads(out.read_text())
    assert again["training"] == report["training"] and "recording_seconds" not in again

    # closed_loop_drift.py takes the kept weights as a checkpoint: the regression's rollout, the
    # expert asked along it, as for a LLaVA checkpoint.
    drift = load_script("benchmarks/closed_loop_drift.py")
    drift.main(["--task", "reach_target", "--checkpoint", str(tmp_path / "bc.pt"), "--episodes", "1", "--steps", "2",
                "--out", str(tmp_path / "drift.json")])
    steps = json.loads((tmp_path / "drift.json").read_text())["episodes"][0]["steps"]
    assert len(steps) == 2 and steps[0]["cosine"] is not None and steps[0]["policy_speed"] > 0
    (tmp_path / "bc.json").unlink()
    with pytest.raises(FileNotFoundError, match="needs its bc_baseline.py report bc.json"):
        drift.main(["--task", "reach_target", "--checkpoint", str(tmp_path / "bc.pt"), "--episodes", "1"])


def test_tower_probe_scores_each_tower_on_held_out_scenes_along_and_across_the_ray(tmp_path, load_script):
    """benchmarks/tower_probe.py: the scenes are reach_target's resets (the target where the env
    puts it), the error splits into depth along the camera's ray and the part across it, and a
    run writes each tower's curve, a rerun keeping the towers it has."""
    benchmark = load_script("benchmarks/tower_probe.py")
    scenes = benchmark.render_scenes([3, 4], variation=0, render_quality="fast")
    env = gym.make("llarva/reach_target", variation=0, render_quality="fast")
    env.reset(seed=4)
    assert np.allclose(scenes["targets"][1].numpy(), env.unwrapped.rlbench_observation().task_low_dim_state[:3])
    assert scenes["images"].shape == (2, 3, 128, 128) and scenes["images"].dtype == torch.uint8
    assert not torch.equal(scenes["images"][0], scenes["images"][1])
    env.close()

    class Offset(torch.nn.Module):      # predicts each target moved 3 cm beyond it along the ray, 4 cm across
        def forward(self, images):
            ray = scenes["targets"] - scenes["cameras"]
            ray = ray / ray.norm(dim=1, keepdim=True)
            across = torch.linalg.cross(ray, torch.tensor([[0.0, 0.0, 1.0]]).expand_as(ray))
            across = across / across.norm(dim=1, keepdim=True)
            return (scenes["targets"] + 0.03 * ray + 0.04 * across)[:len(images)]

    scored = benchmark.errors(Offset(), scenes)
    assert scored["depth_cm_median"] == pytest.approx(3.0, abs=1e-3)
    assert scored["lateral_cm_median"] == pytest.approx(4.0, abs=1e-3)
    assert scored["error_cm_median"] == pytest.approx(5.0, abs=1e-3) and scored["within_2cm"] == 0.0

    out = tmp_path / "probe.json"
    common = ["--scenes", "6", "--held-out", "3", "--steps", "4", "--batch-size", "3", "--render-quality", "fast",
              "--out", str(out)]
    benchmark.main(["--towers", "cnn", *common])
    report = json.loads(out.read_text())
    cnn = report["towers"]["cnn"]
    assert cnn["steps"] == 4 and [point["step"] for point in cnn["curve"]] == [1, 2, 3, 4]
    assert cnn["final"]["held_out"]["error_cm_median"] > 0 and math.isfinite(cnn["curve"][-1]["loss"])
    benchmark.main(["--towers", "cnn,focal", *common])
    again = json.loads(out.read_text())
    assert again["towers"]["cnn"] == cnn and again["towers"]["focal"]["parameters"] > cnn["parameters"]
    with pytest.raises(SystemExit):
        benchmark.main(["--towers", "cnn,resnet", *common])


def test_history_probe_asks_the_policy_with_a_still_and_an_expert_history(tmp_path, load_script):
    """benchmarks/history_probe.py: the `still` history is five copies of the current pose, the
    `expert` one the poses the expert's command would have left; a run records every history's speed."""
    from llarva_gym.backends.mujoco.scene import CONTROL_PERIOD
    from llarva_policy.policy import _advance_history

    probe = load_script("benchmarks/history_probe.py")
    q, velocity = np.linspace(-1, 1, 7).astype(np.float32), np.full(7, 0.5)
    shown = {name: _advance_history(state.astype(np.float32), np.array([False]), q[None])[0]
             for name, state in probe.other_histories(q, velocity).items()}
    assert np.all(shown["still"] == q)
    np.testing.assert_allclose(np.diff(shown["expert"], axis=0) / CONTROL_PERIOD, np.full((4, 7), 0.5), atol=1e-4)
    np.testing.assert_allclose(shown["expert"][-1], q)

    bc_baseline = load_script("benchmarks/bc_baseline.py")
    torch.manual_seed(0)
    torch.save(bc_baseline.VisuomotorPolicy("cnn").state_dict(), tmp_path / "bc.pt")
    (tmp_path / "bc.json").write_text(json.dumps({"vision": "cnn"}))
    record = probe.main(["--task", "reach_target", "--checkpoint", str(tmp_path / "bc.pt"), "--episodes", "1",
                         "--steps", "3", "--out", str(tmp_path / "probe.json")])
    steps = record["episodes"][0]["steps"]
    assert len(steps) == 3 and all(row["policy_speed"][name] > 0 for row in steps for name in probe.HISTORIES)
    env = gym.make("llarva/reach_target")
    env.reset(seed=episode_reset_seed(1, 0))
    command = WaypointFollower(env.unwrapped.backend).next_action("joint_velocity")[:7]
    env.close()
    assert steps[0]["expert_speed"] == pytest.approx(np.linalg.norm(command), abs=1e-4)
    assert sum(row["steps"] for row in record["summary"]) == 3
    assert json.loads((tmp_path / "probe.json").read_text())["summary"] == record["summary"]

    # --drive expert: the expert moves the arm (the policy, asked all the same, does not): after a
    # step the tip is where the expert's command took it, whatever the policy answered.
    record = probe.main(["--task", "reach_target", "--checkpoint", str(tmp_path / "bc.pt"), "--episodes", "1",
                         "--steps", "2", "--drive", "expert", "--out", str(tmp_path / "expert.json")])
    env = gym.make("llarva/reach_target")
    env.reset(seed=episode_reset_seed(1, 0))
    expert = WaypointFollower(env.unwrapped.backend)
    goal = expert.waypoints[-1].position
    obs, *_ = env.step(expert.next_action("joint_velocity"))
    env.close()
    assert record["drive"] == "expert"
    assert record["episodes"][0]["steps"][1]["to_goal_m"] == pytest.approx(
        np.linalg.norm(obs["gripper_pose"][:3] - goal), abs=1e-4)


def test_history_probe_measures_where_the_visual_trace_starts_and_ends(tmp_path, load_script):
    """With a checkpoint that writes a visual trace, history_probe.py records how far its first point
    lies from the tip and its last from the goal, in the front camera's pixels."""
    from llarva_policy import LlarvaPolicy
    from llarva_policy.annotations import project_points
    from llarva_policy.model import make_random_llava

    probe = load_script("benchmarks/history_probe.py")
    checkpoint = make_random_llava(tmp_path / "tiny", size="tiny", seed=0)
    policy = LlarvaPolicy.from_pretrained(checkpoint, constrained=True, with_visual_trace=True)
    env = gym.make("llarva/reach_target")
    obs, _ = env.reset(seed=0)
    backend = env.unwrapped.backend
    goal = WaypointFollower(backend).waypoints[-1].position
    policy.predict(obs, episode_start=np.array([True]))
    errors = probe.trace_errors(policy, backend, obs["gripper_pose"][:3], goal)
    misc = backend.cameras.misc(backend.data)
    tip_px, goal_px = project_points(np.stack([obs["gripper_pose"][:3], goal]), misc["front_camera_extrinsics"],
                                     misc["front_camera_intrinsics"])
    trace = np.asarray(policy.last_info[0]["trace"], dtype=np.float64)
    assert errors["trace_start_error_px"] == pytest.approx(np.linalg.norm(trace[0] - tip_px), abs=0.01)
    assert errors["trace_end_error_px"] == pytest.approx(np.linalg.norm(trace[-1] - goal_px), abs=0.01)
    assert errors["trace_length_px"] == pytest.approx(np.linalg.norm(trace[-1] - trace[0]), abs=0.01)
    assert errors["tip_to_goal_px"] == pytest.approx(np.linalg.norm(goal_px - tip_px), abs=0.01)
    env.close()

    record = probe.main(["--task", "reach_target", "--checkpoint", str(checkpoint), "--visual-trace",
                         "--episodes", "1", "--steps", "2", "--out", str(tmp_path / "probe.json")])
    assert all("trace_end_error_px" in row for row in record["episodes"][0]["steps"])
    assert all("median_trace_end_error_px" in row for row in record["summary"])
