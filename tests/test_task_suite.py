"""Every embedded task, whatever its file: checker, descriptions, expert sample, do-nothing fails."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import llarva_gym
from llarva_gym import ScriptedExpert
from llarva_gym.backends.mujoco.tasks import TASKS

TASK_NAMES = sorted(TASKS)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_check_env(task):
    env = gym.make(f"llarva/{task}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    complaints = [str(w.message) for w in caught if "symmetric and normalized" not in str(w.message)]
    assert complaints == []
    env.close()


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_variation_has_descriptions_and_the_instruction_is_one(task):
    env = gym.make(f"llarva/{task}")
    count = llarva_gym.TASKS[task]
    for variation in sorted({0, count // 2, count - 1}):
        obs, info = env.reset(seed=variation, options={"variation": variation})
        assert info["descriptions"] and all(isinstance(d, str) and d for d in info["descriptions"])
        assert obs["instruction"] in info["descriptions"]
    env.close()


@pytest.mark.parametrize("task", TASK_NAMES)
def test_expert_succeeds_on_a_sample(task):
    env = gym.make(f"llarva/{task}")
    count = llarva_gym.TASKS[task]
    for episode in range(2):
        obs, info = env.reset(seed=100 + episode, options={"variation": (episode * 7) % count})
        expert = ScriptedExpert(env)
        for _ in range(env.spec.max_episode_steps):
            obs, reward, terminated, truncated, info = env.step(expert.predict(obs)[0])
            if terminated or truncated:
                break
        assert info["success"], f"{task}: expert failed on seed {100 + episode}"
    env.close()


@pytest.mark.parametrize("task", TASK_NAMES)
def test_doing_nothing_does_not_succeed(task):
    env = gym.make(f"llarva/{task}", max_episode_steps=20)
    env.reset(seed=0)
    hold = np.r_[np.zeros(7), 1.0].astype(np.float32)
    assert not any(env.step(hold)[2] for _ in range(20))
    env.close()


@pytest.mark.parametrize("task", TASK_NAMES)
def test_demos_and_eval_commands_work(task, tmp_path):
    from llarva_gym.demos import load_demo, episode_dirs
    from llarva_policy.cli import main

    main(["demos", "--task", task, "--episodes", "1", "--out", str(tmp_path / "data"), "--image-size", "32"])
    [episode] = episode_dirs(tmp_path / "data", task)
    demo = load_demo(episode)
    assert len(demo) > 1 and demo[0].front_rgb.shape == (32, 32, 3)
    results = tmp_path / "results.json"
    main(["eval", "--task", task, "--policy", "expert", "--episodes", "1", "--results", str(results)])
    import json
    record = json.loads(results.read_text())
    assert record["summary"]["episodes"] == 1 and record["summary"]["successes"] == 1


def _first_draw(backend, variation, episode_seed):
    """The placement the task draws first from an episode seed, before any reachability check."""
    backend._place(variation, np.random.default_rng(episode_seed))
    return backend.task.low_dim_state().copy()


def test_reset_draws_again_a_placement_whose_waypoints_the_arm_cannot_reach():
    from llarva_gym.expert import reaches_every_waypoint

    env = gym.make("llarva/reach_target")
    backend = env.unwrapped.backend
    # Episode seed 164 first draws a target at the far top corner of the spawn box (x 0.40,
    # z 1.14): the expert's arm stops about 3 cm short of it, so no demonstration of it exists.
    unreachable = _first_draw(backend, 0, 164)
    assert not reaches_every_waypoint(backend, 120)
    obs, info = env.reset(options={"episode_seed": 164, "variation": 0})
    target = backend.task.low_dim_state()
    assert not np.allclose(target, unreachable)
    assert reaches_every_waypoint(backend, 120)
    expert = ScriptedExpert(env)
    for _ in range(env.spec.max_episode_steps):
        obs, reward, terminated, truncated, info = env.step(expert.predict(obs)[0])
        if terminated or truncated:
            break
    assert info["success"]
    # A reachable first draw is the episode, as before the check existed: recorded seeds keep their layouts.
    reachable = _first_draw(backend, 0, 165)
    env.reset(options={"episode_seed": 165, "variation": 0})
    np.testing.assert_array_equal(backend.task.low_dim_state(), reachable)
    # A demo recorded from seed 164's first draw (before the check) cannot start where it did: a clear error.
    from llarva_gym.demos import Demo

    _first_draw(backend, 0, 164)
    old_demo = Demo([backend.rlbench_observation()], random_seed={"episode_seed": 164, "variation": 0})
    with pytest.raises(ValueError, match="episode_seed 164 now starts another layout.*record the demos again"):
        env.reset(options={"demo": old_demo})
    env.reset(options={"episode_seed": 164, "variation": 0})
    current = Demo([backend.rlbench_observation()], random_seed={"episode_seed": 164, "variation": 0})
    env.reset(options={"demo": current})
    np.testing.assert_array_equal(backend.task.low_dim_state(), target)
    env.close()


def test_a_task_whose_placements_are_all_out_of_reach_says_so(monkeypatch):
    from llarva_gym.backends.mujoco.tasks import reach_target

    monkeypatch.setattr(reach_target, "SPAWN_LOW", (1.5, -0.3, 0.8))
    monkeypatch.setattr(reach_target, "SPAWN_HIGH", (1.9, 0.3, 1.2))
    env = gym.make("llarva/reach_target")
    with pytest.raises(RuntimeError, match="reach_target: none of 40 placements .* variation 3"):
        env.reset(seed=0, options={"variation": 3})
    env.close()


@pytest.mark.parametrize("task", ["sweep_to_dustpan_of_size", "open_drawer"])
def test_the_expert_plan_run_without_stepping_is_the_joint_path_of_its_episode(task):
    """The reset check's premise: the arm follows the expert's joint targets whatever it touches."""
    from llarva_gym.expert import WaypointFollower

    env = gym.make(f"llarva/{task}")
    obs, _ = env.reset(seed=3)
    backend = env.unwrapped.backend
    plan = WaypointFollower(backend)
    q, gripper, planned = backend.panda.joint_positions, backend.panda.gripper_open, []
    while not plan.done and len(planned) < env.spec.max_episode_steps:
        q, gripper = plan.next_joint_target(q, gripper)
        planned.append(q)
    assert plan.done
    expert = ScriptedExpert(env)
    for step, planned_q in enumerate(planned):
        obs, reward, terminated, truncated, info = env.step(expert.predict(obs)[0])
        np.testing.assert_allclose(obs["joint_positions"], planned_q, atol=1e-4, err_msg=f"{task}: step {step}")
        if terminated:
            break
    assert info["success"]
    env.close()
