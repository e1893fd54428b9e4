"""RLBenchEnv: an RLBench task as a Gymnasium environment, with the instruction in every observation."""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llarva_gym.action_modes import (JOINT_LOWER, JOINT_UPPER, VELOCITY_LIMIT, action_space,
                                     check_mode, validate_action)
from llarva_gym.observation import ObservationConfig

BACKENDS = ("mujoco", "rlbench")
# Gymnasium's Text space admits letters and digits only by default; instructions have spaces and
# punctuation ("reach the red target", "clean up the dirt with the tall pan").
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + string.punctuation + " "
INSTRUCTION_MAX_LENGTH = 256


def make_backend(name: str, task: str, obs_config: ObservationConfig, action_mode: str):
    if name == "mujoco":
        from llarva_gym.backends.mujoco.backend import MujocoBackend
        return MujocoBackend(task, obs_config, action_mode)
    if name == "rlbench":
        from llarva_gym.backends.rlbench import RLBenchBackend
        return RLBenchBackend(task, obs_config, action_mode)
    raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS}")


class RLBenchEnv(gym.Env):
    """One RLBench task. Observation keys follow RLBench (`front_rgb`, `joint_positions`, ...)
    plus `instruction`; reward 1.0 and termination on the task's success condition."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, task: str, backend: str = "mujoco", variation: int | None = None,
                 cameras=("front",), image_size=128, depth: bool = False, mask: bool = False,
                 action_mode: str = "joint_velocity", render_mode: str | None = None,
                 render_size=(256, 256), render_quality: str = "fast"):
        from llarva_gym.registration import TASKS
        if task not in TASKS:
            raise gym.error.Error(f"task: unknown task {task!r}; known tasks: {sorted(TASKS)}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode: expected None or 'rgb_array', got {render_mode!r}")
        self.obs_config = ObservationConfig(cameras=cameras, image_size=image_size, depth=depth,
                                            mask=mask, render_quality=render_quality)
        self.action_mode = check_mode(action_mode)
        self.variation_count = TASKS[task]
        if variation is not None and not (isinstance(variation, (int, np.integer))
                                          and 0 <= variation < self.variation_count):
            raise ValueError(f"variation: expected None (a random one per reset) or an int in "
                             f"[0, {self.variation_count - 1}] for {task}, got {variation!r}")
        self.task = task   # LeRobot's evaluator reads env.task and env.task_description
        self.fixed_variation = variation
        self.render_mode, self.render_size = render_mode, tuple(render_size)
        self.backend = make_backend(backend, task, self.obs_config, self.action_mode)
        self.variation_count = self.backend.variation_count   # real RLBench's own count wins

        self.observation_space = self._make_observation_space()
        self.action_space = action_space(self.action_mode)
        self.variation, self.descriptions, self.task_description = 0, [], ""
        self.episode_seed: int | None = None
        self._expert = None

    def _make_observation_space(self) -> spaces.Dict:
        height, width = self.obs_config.image_size
        fields: dict[str, spaces.Space] = {}
        for camera in self.obs_config.cameras:
            if self.obs_config.rgb:
                fields[f"{camera}_rgb"] = spaces.Box(0, 255, (height, width, 3), np.uint8)
            if self.obs_config.depth:
                fields[f"{camera}_depth"] = spaces.Box(0, 10, (height, width), np.float32)   # metres
            if self.obs_config.mask:
                fields[f"{camera}_mask"] = spaces.Box(-1, 2**31 - 1, (height, width), np.int32)
        fields["joint_positions"] = spaces.Box(JOINT_LOWER.astype(np.float32), JOINT_UPPER.astype(np.float32), dtype=np.float32)
        fields["joint_velocities"] = spaces.Box(-VELOCITY_LIMIT.astype(np.float32), VELOCITY_LIMIT.astype(np.float32), dtype=np.float32)
        fields["gripper_open"] = spaces.Box(0.0, 1.0, (1,), np.float32)
        # xyz within the scene (metres), then a unit quaternion xyzw
        fields["gripper_pose"] = spaces.Box(np.array([-3, -3, 0, -1, -1, -1, -1], np.float32),
                                            np.array([3, 3, 3, 1, 1, 1, 1], np.float32), dtype=np.float32)
        fields["instruction"] = spaces.Text(INSTRUCTION_MAX_LENGTH, charset=INSTRUCTION_CHARSET)
        return spaces.Dict(fields)

    # --- Gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """`options`: `variation` (int) for this episode; `episode_seed` (int) or `demo` (a Demo
        read from disk) to start from the exact initial state of a recorded episode."""
        super().reset(seed=seed)
        options = dict(options or {})
        demo = options.pop("demo", None)
        if demo is not None and not _is_embedded_demo(demo) and hasattr(self.backend, "reset_to_demo"):
            return self._reset_to_recorded_demo(demo, options)
        if demo is not None:
            options.update(_demo_start(demo))
        unknown = set(options) - {"variation", "episode_seed"}
        if unknown:
            raise ValueError(f"options: unknown key(s) {sorted(unknown)}; expected 'variation', 'episode_seed' or 'demo'")
        variation = options.get("variation", self.fixed_variation)
        if variation is None:
            variation = int(self.np_random.integers(self.variation_count))
        if not (isinstance(variation, (int, np.integer)) and 0 <= variation < self.variation_count):
            raise ValueError(f"options['variation']: expected an int in [0, {self.variation_count - 1}], got {variation!r}")
        # Each episode's layout comes from its own seed, so any episode can be rebuilt exactly.
        episode_seed = options.get("episode_seed")
        if episode_seed is None:
            episode_seed = int(self.np_random.integers(2**31))
        self.variation, self.episode_seed = int(variation), int(episode_seed)
        self.descriptions = self.backend.reset(self.variation, np.random.default_rng(self.episode_seed))
        self.task_description = self.descriptions[0]   # LLARVA trains and evaluates on the first
        self._expert = None
        if demo is not None:
            self._check_demo_layout(demo)
        return self._observation(), self._info(success=False)

    def _check_demo_layout(self, demo):
        """The episode seed of a demo recorded before the reset began to redraw placements the arm
        cannot reach (DESIGN-NOTES) may give another layout now: say so rather than start elsewhere."""
        recorded = getattr(demo[0], "task_low_dim_state", None) if len(demo) else None
        task = getattr(self.backend, "task", None)
        if recorded is None or task is None:
            return
        recorded, now = np.asarray(recorded, dtype=np.float64), task.low_dim_state()
        if recorded.shape != now.shape or not np.allclose(recorded, now, atol=1e-6):
            raise ValueError(f"options['demo']: its episode_seed {self.episode_seed} now starts another layout "
                             f"(task_low_dim_state {np.round(now, 4).tolist()}, the demo's "
                             f"{np.round(recorded, 4).tolist()}): it was recorded by an earlier version of the "
                             "task, whose reset kept placements the arm cannot reach; record the demos again")

    def _reset_to_recorded_demo(self, demo, options):
        """A demo real RLBench recorded: its backend (backend='rlbench') restores the demo's own start."""
        if options:
            raise ValueError(f"options: {sorted(options)} cannot be combined with a demo recorded by real "
                             "RLBench; the demo fixes its own variation and layout")
        variation = _demo_variation(demo)
        if not 0 <= variation < self.variation_count:
            raise ValueError(f"options['demo']: variation {variation} is not in [0, {self.variation_count - 1}]")
        self.variation, self.episode_seed = variation, None
        self.descriptions = self.backend.reset_to_demo(demo, variation)
        self.task_description = self.descriptions[0]
        self._expert = None
        return self._observation(), self._info(success=False)

    def step(self, action):
        action = validate_action(self.action_mode, action)
        refused = self.backend.apply_action(action)
        success = False if refused else self.backend.success()
        info = self._info(success)
        if refused:
            info["invalid_action"] = refused
        return self._observation(), float(success), success, False, info

    def render(self):
        if self.render_mode == "rgb_array":
            return self.backend.render(self.render_size)
        return None

    def close(self):
        if getattr(self, "backend", None) is not None:
            self.backend.close()
            self.backend = None

    # --- helpers -------------------------------------------------------------------------------
    def _observation(self) -> dict[str, Any]:
        obs = self.backend.observation()
        obs["instruction"] = self.task_description
        return obs

    def _info(self, success: bool) -> dict[str, Any]:
        return {"success": success, "is_success": success, "variation": self.variation,
                "descriptions": list(self.descriptions), "task": self.task,
                "episode_seed": self.episode_seed}

    def rlbench_observation(self):
        """The full RLBench `Observation` of the current step (all fields, camera matrices in misc)."""
        return self.backend.rlbench_observation()

    def expert_action(self) -> np.ndarray:
        """The scripted expert's next action in this env's action mode (privileged state)."""
        from llarva_gym.expert import WaypointFollower
        if self._expert is None:
            self._expert = WaypointFollower(self.backend)
        return self._expert.next_action(self.action_mode)


def _is_embedded_demo(demo) -> bool:
    start = getattr(demo, "random_seed", None)
    return isinstance(start, dict) and "episode_seed" in start


def _demo_variation(demo) -> int:
    """The variation of a demo: `variation_number` (load_demo's), else RLBench's misc['variation_index']."""
    if getattr(demo, "variation_number", None) is not None:
        return int(demo.variation_number)
    misc = (getattr(demo[0], "misc", None) or {}) if len(demo) else {}
    if "variation_index" not in misc:
        raise ValueError("options['demo']: the demo's variation is unknown (no variation_number, no "
                         "misc['variation_index'] in its first observation); read it with load_demo")
    return int(misc["variation_index"])


def _demo_start(demo) -> dict[str, int]:
    """A recorded demo's start: ours store {'episode_seed', 'variation'} in `random_seed`."""
    start = getattr(demo, "random_seed", None)
    if not isinstance(start, dict) or "episode_seed" not in start:
        raise ValueError("options['demo']: this demo has no embedded-simulator start state "
                         "(random_seed must be a dict with 'episode_seed' and 'variation'; demos "
                         "recorded by real RLBench reset only with backend='rlbench')")
    variation = start.get("variation", getattr(demo, "variation_number", None))
    if variation is None:
        raise ValueError("options['demo']: the demo's start state has no 'variation' and the demo no "
                         "variation_number; expected random_seed={'episode_seed': int, 'variation': int}")
    return {"episode_seed": int(start["episode_seed"]), "variation": int(variation)}
