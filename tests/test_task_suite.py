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
