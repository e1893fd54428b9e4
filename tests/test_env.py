"""The environment contract of DESIGN.md, on the embedded MuJoCo backend."""

import hashlib
import subprocess
import sys
import textwrap
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import llarva_gym
from llarva_gym import EncodeInstruction, ScriptedExpert
from llarva_gym.registration import ALIASES, TASKS

ENV_IDS = [f"llarva/{name}" for name in TASKS] + [f"llarva/{alias}" for alias in ALIASES]
ALL_CAMERAS = ("left_shoulder", "right_shoulder", "overhead", "wrist", "front")


def run_expert(env, seed, options=None, max_steps=120):
    obs, info = env.reset(seed=seed, options=options)
    expert = ScriptedExpert(env)
    for step in range(max_steps):
        action, _ = expert.predict(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    return info, step + 1


# --- registration ------------------------------------------------------------------------------
def test_ids_are_registered_under_rlbench_names_and_aliases():
    for env_id in ("llarva/sweep_to_dustpan", "llarva/sweep_to_dustpan_of_size", "llarva/reach_target"):
        assert env_id in gym.registry
        assert gym.registry[env_id].max_episode_steps == 120


def test_module_colon_id_form_works_with_gymnasium_alone():
    code = textwrap.dedent("""
        import sys, gymnasium as gym
        assert "llarva_gym" not in sys.modules
        env = gym.make("llarva_gym:llarva/reach_target")
        obs, info = env.reset(seed=0)
        print(obs["instruction"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("reach the ")


# --- spaces and checkers ------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_gymnasium_check_env(env_id):
    env = gym.make(env_id, render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=False)
    # The action space is physical (rad/s, as RLBench's), not normalised: the one advice we ignore.
    complaints = [str(w.message) for w in caught if "symmetric and normalized" not in str(w.message)]
    assert complaints == []
    env.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sb3_check_env_with_encoded_instruction(env_id):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env
    env = EncodeInstruction(gym.make(env_id))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # SB3 recommends normalised image obs; not an error
        sb3_check_env(env, warn=True)
    obs, _ = env.reset(seed=1)
    text = llarva_gym.wrappers.decode_instruction(obs["instruction"])
    assert text == env.unwrapped.task_description


def test_observation_keys_dtypes_and_instruction():
    env = gym.make("llarva/sweep_to_dustpan", cameras=ALL_CAMERAS, depth=True, mask=True, image_size=(64, 96))
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    for camera in ALL_CAMERAS:
        assert obs[f"{camera}_rgb"].shape == (64, 96, 3) and obs[f"{camera}_rgb"].dtype == np.uint8
        assert obs[f"{camera}_depth"].shape == (64, 96) and obs[f"{camera}_depth"].dtype == np.float32
        assert obs[f"{camera}_mask"].shape == (64, 96)
    depth = obs["front_depth"]
    # metres: the table is between 1 and 3 m from the front camera
    assert 0.5 < float(np.median(depth)) < 3.5
    assert obs["joint_positions"].shape == (7,) and obs["gripper_pose"].shape == (7,)
    assert obs["gripper_open"].tolist() == [1.0]
    assert obs["instruction"] == info["descriptions"][0]
    size = ("tall", "short")[info["variation"]]
    assert info["descriptions"] == [
        f"sweep dirt to the {size} dustpan", f"sweep the dirt up into the {size} dustpan",
        f"use the broom to brush the dirt into the {size} dustpan", f"clean up the dirt with the {size} pan"]
    assert info["task"] == "sweep_to_dustpan_of_size"
    assert info["is_success"] is False and info["success"] is False
    # LeRobot's evaluator reads these through wrappers
    assert env.get_wrapper_attr("task_description") == obs["instruction"]
    assert env.get_wrapper_attr("task") == "sweep_to_dustpan_of_size"
    env.close()


def test_home_pose_is_rlbench_initial_configuration():
    env = gym.make("llarva/reach_target")
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs["joint_positions"], [0, 0.1745, 0, -0.8727, 0, 1.2217, 0.7854], atol=1e-4)
    # gripper pointing down in front of the robot, above the table
    assert obs["gripper_pose"][2] > 1.3
    env.close()


def test_reach_target_variations_name_the_target_colour():
    env = gym.make("llarva/reach_target", variation=4)
    obs, info = env.reset(seed=0)
    assert info["variation"] == 4
    assert obs["instruction"] == "reach the blue target"
    assert info["descriptions"] == ["reach the blue target", "touch the blue ball with the panda gripper",
                                    "reach the blue sphere"]
    target_rgba = env.unwrapped.backend.model.geom("target").rgba
    np.testing.assert_allclose(target_rgba[:3], (0, 0, 1))
    env.close()


# --- the scripted expert --------------------------------------------------------------------------
@pytest.mark.parametrize("variation", [0, 1])
def test_expert_sweeps_into_each_dustpan(variation):
    env = gym.make("llarva/sweep_to_dustpan", variation=variation)
    successes = [run_expert(env, seed)[0]["success"] for seed in range(3)]
    assert all(successes)
    env.close()


def test_expert_reaches_targets_of_several_colours():
    env = gym.make("llarva/reach_target")
    for seed, variation in enumerate((0, 7, 19)):
        info, _ = run_expert(env, seed, options={"variation": variation})
        assert info["success"] and info["variation"] == variation
    env.close()


def test_expert_slows_into_the_reach_target_only_within_its_brake_distance():
    env = gym.make("llarva/reach_target", variation=0)
    obs, info = env.reset(seed=1)
    target = env.unwrapped.backend.task.waypoints()[0]
    assert target.brake_distance == 0.15
    tips, expert = [obs["gripper_pose"][:3]], ScriptedExpert(env)
    for _ in range(120):
        obs, _, terminated, truncated, info = env.step(expert.predict(obs)[0])
        tips.append(obs["gripper_pose"][:3])
        if terminated or truncated:
            break
    assert info["success"]
    tips = np.array(tips)
    steps = np.linalg.norm(np.diff(tips, axis=0), axis=1)
    left = np.linalg.norm(tips[:-1] - target.position, axis=1)   # distance before each step
    cruising = left > target.brake_distance + 0.01
    # Full speed (a few steps are held back by the joints' speed limits).
    assert cruising.any() and np.median(steps[cruising]) == pytest.approx(target.speed * 0.05, rel=0.02)
    braking = left < target.brake_distance - 0.01
    assert braking.any()
    # Each step's length is the distance left times speed x period / brake distance (within IK's tolerance).
    np.testing.assert_allclose(steps[braking], left[braking] * target.speed * 0.05 / target.brake_distance,
                               rtol=0.1, atol=5e-4)
    env.close()


@pytest.mark.parametrize("mode", ["joint_position", "ee_pose"])
def test_expert_in_other_action_modes(mode):
    env = gym.make("llarva/reach_target", action_mode=mode)
    assert run_expert(env, seed=5)[0]["success"]
    env.close()


def test_success_gives_reward_and_termination_and_time_limit_truncates():
    env = gym.make("llarva/reach_target", max_episode_steps=200)
    obs, _ = env.reset(seed=2)
    expert = ScriptedExpert(env)
    rewards = []
    for _ in range(200):
        obs, reward, terminated, truncated, info = env.step(expert.predict(obs)[0])
        rewards.append(reward)
        if terminated:
            break
    assert terminated and not truncated and rewards[-1] == 1.0 and sum(rewards) == 1.0
    assert info["is_success"]
    short = gym.make("llarva/reach_target", max_episode_steps=3)
    short.reset(seed=0)
    hold = np.r_[np.zeros(7), 1.0].astype(np.float32)
    results = [short.step(hold) for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True] and not any(r[2] for r in results)


def test_doing_nothing_does_not_succeed():
    for env_id in ("llarva/reach_target", "llarva/sweep_to_dustpan"):
        env = gym.make(env_id, max_episode_steps=30)
        env.reset(seed=0)
        hold = np.r_[np.zeros(7), 1.0].astype(np.float32)
        assert not any(env.step(hold)[2] for _ in range(30))
        env.close()


def test_broom_is_attached_on_grasp_and_released_on_open():
    env = gym.make("llarva/sweep_to_dustpan", variation=0)
    obs, _ = env.reset(seed=0)
    expert, backend = ScriptedExpert(env), env.unwrapped.backend
    for _ in range(60):
        obs, *_ = env.step(expert.predict(obs)[0])
        if backend.panda.grasped:
            break
    assert backend.panda.grasped == "broom" and obs["gripper_open"][0] == 0.0
    height = backend.task.body_position("broom")[2]
    lift = np.r_[0, -0.3, 0, 0.3, 0, 0, 0, 0.0].astype(np.float32)   # joints 2 and 4 raise the hand
    for _ in range(3):
        env.step(lift)
    assert backend.task.body_position("broom")[2] > height + 0.01   # it moved with the hand
    env.step(np.r_[np.zeros(7), 1.0].astype(np.float32))
    assert backend.panda.grasped is None
    env.close()


# --- determinism ---------------------------------------------------------------------------------
def _rollout_digest(env_id, seed, steps=15):
    env = gym.make(env_id, cameras=("front", "wrist"), depth=True)
    obs, _ = env.reset(seed=seed)
    digest = hashlib.sha256()
    expert = ScriptedExpert(env)
    for _ in range(steps):
        for key in sorted(obs):
            digest.update(np.asarray(obs[key]).tobytes() if key != "instruction" else obs[key].encode())
        obs, *_ = env.step(expert.predict(obs)[0])
    env.close()
    return digest.hexdigest()


def test_same_seed_same_observations_bit_for_bit_across_processes():
    here = _rollout_digest("llarva/sweep_to_dustpan", seed=11)
    assert here == _rollout_digest("llarva/sweep_to_dustpan", seed=11)
    assert here != _rollout_digest("llarva/sweep_to_dustpan", seed=12)
    code = ("import sys; sys.path.insert(0, 'tests'); from test_env import _rollout_digest; "
            "print(_rollout_digest('llarva/sweep_to_dustpan', seed=11))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == here


def test_episode_seed_rebuilds_the_same_start():
    env = gym.make("llarva/sweep_to_dustpan")
    first, info = env.reset(seed=7)
    env.reset(seed=8)
    again, info2 = env.reset(options={"episode_seed": info["episode_seed"], "variation": info["variation"]})
    np.testing.assert_array_equal(first["front_rgb"], again["front_rgb"])
    assert info2["episode_seed"] == info["episode_seed"]
    env.close()


# --- bad input ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reach_env():
    env = gym.make("llarva/reach_target")
    env.reset(seed=0)
    yield env
    env.close()


@pytest.mark.parametrize("action, message", [
    (np.r_[np.nan, np.zeros(6), 1.0], r"action\[0\] \(joint_velocity\[0\] \(rad/s\)\) is nan; expected a finite number"),
    (np.r_[np.zeros(6), np.inf, 1.0], r"action\[6\] .* is inf"),
    (np.r_[np.zeros(7), 1.0, 0.0], r"action: shape \(9,\); expected a float array of shape \(8,\)"),
    (np.zeros((2, 8)), r"action: shape \(2, 8\)"),
    (np.array(["a"] * 8), r"action: dtype <U1 is not numeric"),
    (np.r_[3.0, np.zeros(6), 1.0], r"action\[0\] .* = 3 is out of range; expected a value in \[-2.175, 2.175\]"),
    (np.r_[np.zeros(7), 1.5], r"action\[7\] \(gripper_open\) = 1.5 is out of range; expected a value in \[0, 1\]"),
])
def test_bad_actions_get_clear_errors(reach_env, action, message):
    with pytest.raises(ValueError, match=message):
        reach_env.step(action)


def test_unknown_task_camera_backend_variation_and_mode():
    with pytest.raises(gym.error.Error, match="not_a_task.* namespace llarva"):
        gym.make("llarva/not_a_task")
    with pytest.raises(gym.error.Error, match="unknown task 'not_a_task'"):
        llarva_gym.RLBenchEnv("not_a_task")
    with pytest.raises(ValueError, match=r"cameras: unknown camera name\(s\) \['side'\]"):
        gym.make("llarva/reach_target", cameras=("front", "side"))
    with pytest.raises(ValueError, match="backend: unknown backend 'bullet'"):
        gym.make("llarva/reach_target", backend="bullet")
    with pytest.raises(ValueError, match=r"variation: expected None .* or an int in \[0, 1\]"):
        gym.make("llarva/sweep_to_dustpan", variation=2)
    with pytest.raises(ValueError, match="action_mode: unknown action mode 'torque'"):
        gym.make("llarva/reach_target", action_mode="torque")
    with pytest.raises(ValueError, match="image_size: expected an int or"):
        gym.make("llarva/reach_target", image_size=0)
    env = gym.make("llarva/reach_target")
    with pytest.raises(ValueError, match=r"options\['variation'\]: expected an int in \[0, 19\]"):
        env.reset(options={"variation": 20})
    with pytest.raises(ValueError, match="options: unknown key"):
        env.reset(options={"colour": "red"})


def test_rlbench_backend_without_rlbench_says_what_to_install():
    with pytest.raises(ImportError, match="CoppeliaSim 4.1.*PyRep.*RLBench.*README"):
        gym.make("llarva/reach_target", backend="rlbench")


def test_unreachable_ee_pose_is_refused_not_crashed():
    env = gym.make("llarva/reach_target", action_mode="ee_pose")
    obs, _ = env.reset(seed=0)
    far = np.array([0.7, 0.5, 0.6, 0, 0, 0, 1, 1], dtype=np.float32)   # inside the workspace box, out of reach
    obs2, reward, terminated, truncated, info = env.step(far)
    assert "cannot reach" in info["invalid_action"]
    np.testing.assert_array_equal(obs2["joint_positions"], obs["joint_positions"])   # nothing moved
    assert reward == 0.0 and not terminated
    with pytest.raises(ValueError, match=r"quaternion xyzw\) has zero length"):
        env.step(np.array([0.3, 0, 1.0, 0, 0, 0, 0, 1], dtype=np.float32))
    env.close()


# --- vector envs -----------------------------------------------------------------------------------
def test_async_vector_env_with_expert_and_same_step_autoreset():
    envs = llarva_gym.make_vec("llarva/reach_target", 2, max_episode_steps=60)
    obs, _ = envs.reset(seed=0)
    assert isinstance(obs["instruction"], tuple) and all(t.startswith("reach the") for t in obs["instruction"])
    expert = ScriptedExpert(envs)
    finished = 0
    for _ in range(60):
        obs, reward, terminated, truncated, info = envs.step(expert.predict(obs)[0])
        finished += int(terminated.sum())
        if finished >= 2:
            break
    assert finished >= 2
    envs.close()


def test_vector_env_workers_are_spawned_once_cuda_has_started(monkeypatch):
    """A process that has started CUDA (a policy trained here on a GPU) cannot fork workers that
    render with EGL: make_vec spawns them then, and spawned workers make the same episodes."""
    import torch

    reference = llarva_gym.make_vec("llarva/reach_target", 2, max_episode_steps=5)
    assert reference.context == "fork"
    expected, _ = reference.reset(seed=3)
    reference.close()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    envs = llarva_gym.make_vec("llarva/reach_target", 2, max_episode_steps=5)
    assert envs.context == "spawn"
    obs, _ = envs.reset(seed=3)
    np.testing.assert_array_equal(obs["front_rgb"], expected["front_rgb"])
    envs.close()
