"""The `rlbench` backend: `RLBenchEnv` over real RLBench + PyRep + CoppeliaSim (optional).

    env = gym.make("llarva/sweep_to_dustpan", backend="rlbench")

Written against RLBench's public API (stepjam/RLBench 1.2, whose action modes and observation
config the PerAct fork that LLARVA evaluated with shares) and tested with stand-in modules that
follow that API (tests/test_rlbench_backend.py). It was NOT run against CoppeliaSim on the
project's machines: CoppeliaSim 4.1, PyRep and RLBench cannot be installed there. docs/rlbench.md
is the install guide.

What maps to what:
- action modes: `joint_velocity` -> `MoveArmThenGripper(JointVelocity(), Discrete())` (LLARVA's);
  `joint_position` -> `JointPosition(absolute_mode=True)`; `ee_pose` ->
  `EndEffectorPoseViaIK(absolute_mode=True)`. IK rather than planning: our `ee_pose` action is one
  control step to a nearby pose, which is what RLBench's IK mode does; planning mode plans a
  collision-free path to a far key pose over many simulator steps (seconds each), a different
  action. Our gripper_open (>= 0.5 open) is sent to `Discrete` as exactly 1.0 or 0.0, because
  `Discrete` reads 0.5 itself as closed.
- observations: RLBench's `ObservationConfig` with only our cameras on, at our image size, depth
  in metres (`depth_in_meters=True`), masks as one channel of object handles, no point clouds.
- refused actions: RLBench's `InvalidActionError` and PyRep's `IKError` and
  `ConfigurationPathError` become a refused step (`info["invalid_action"]`, not terminated), as
  DESIGN.md asks and as LLARVA's own evaluation env catches them.
- episode seeds: RLBench draws each layout from numpy's global generator, so `reset` seeds it from
  the episode's seed. CoppeliaSim's physics is not bit-for-bit repeatable across machines, so
  DESIGN.md's bit-identical determinism holds on the embedded backend only.
- demos: a demo RLBench recorded resets with `task.reset_to_demo`, which restores the numpy
  random state the demo stored (`random_seed`).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
from PIL import Image

from llarva_gym.observation import CAMERAS, IMAGE_KINDS, LOW_DIM_FIELDS, Observation, ObservationConfig

INSTALL_HELP = (
    "backend='rlbench' needs CoppeliaSim 4.1, PyRep and RLBench, which are not on PyPI. Install "
    "CoppeliaSim 4.1 and set COPPELIASIM_ROOT, LD_LIBRARY_PATH=$COPPELIASIM_ROOT and "
    "QT_QPA_PLATFORM_PLUGIN_PATH=$COPPELIASIM_ROOT, then `pip install git+https://github.com/stepjam/PyRep` "
    "and `pip install git+https://github.com/stepjam/RLBench`; see the README section "
    "'Real RLBench backend' and docs/rlbench.md. The default backend='mujoco' needs none of this."
)


def import_rlbench() -> SimpleNamespace:
    """The parts of RLBench and PyRep this backend uses, or an ImportError that says how to install them.

    Imported here, on first use, never by `import llarva_gym`: importing PyRep loads CoppeliaSim.
    """
    try:
        import pyrep.errors as pyrep_errors
        from rlbench.action_modes.action_mode import MoveArmThenGripper
        from rlbench.action_modes.arm_action_modes import EndEffectorPoseViaIK, JointPosition, JointVelocity
        from rlbench.action_modes.gripper_action_modes import Discrete
        from rlbench.demo import Demo
        from rlbench.environment import Environment
        from rlbench.observation_config import CameraConfig, ObservationConfig as RLBenchObservationConfig
        try:
            from rlbench.backend.exceptions import InvalidActionError
        except ImportError:    # RLBench before 1.1 defined it next to TaskEnvironment
            from rlbench.task_environment import InvalidActionError
        try:
            from rlbench.utils import name_to_task_class
        except ImportError:    # the PerAct fork LLARVA used names it so
            from rlbench.backend.utils import task_file_to_task_class as name_to_task_class
    except Exception as error:  # noqa: BLE001  PyRep raises its own errors (no COPPELIASIM_ROOT, no library)
        raise ImportError(f"{INSTALL_HELP} (import failed: {type(error).__name__}: {error})") from None
    # Actions RLBench refuses. IKError is in PyRep's errors from 4.1.0.3 on.
    refusals = tuple(cls for cls in (InvalidActionError, getattr(pyrep_errors, "IKError", None),
                                     pyrep_errors.ConfigurationPathError) if cls is not None)
    return SimpleNamespace(
        Environment=Environment, CameraConfig=CameraConfig, ObservationConfig=RLBenchObservationConfig,
        MoveArmThenGripper=MoveArmThenGripper, JointVelocity=JointVelocity, JointPosition=JointPosition,
        EndEffectorPoseViaIK=EndEffectorPoseViaIK, Discrete=Discrete, Demo=Demo,
        name_to_task_class=name_to_task_class, refusals=refusals)


def make_action_mode(api: SimpleNamespace, action_mode: str):
    """RLBench's action mode for one of ours (see the module docstring for the choices)."""
    arms = {
        "joint_velocity": lambda: api.JointVelocity(),
        "joint_position": lambda: api.JointPosition(absolute_mode=True),
        "ee_pose": lambda: api.EndEffectorPoseViaIK(absolute_mode=True),
    }
    if action_mode not in arms:
        raise ValueError(f"action_mode: unknown action mode {action_mode!r}; expected one of {tuple(arms)}")
    return api.MoveArmThenGripper(arm_action_mode=arms[action_mode](), gripper_action_mode=api.Discrete())


def make_observation_config(api: SimpleNamespace, config: ObservationConfig):
    """RLBench's ObservationConfig for ours: our cameras on, the others off (RLBench then removes them)."""
    height, width = config.image_size

    def camera(name: str):
        on = name in config.cameras
        return api.CameraConfig(rgb=on and config.rgb, depth=on and config.depth, point_cloud=False,
                                mask=on and config.mask,
                                image_size=(width, height),   # PyRep resolutions are [x, y]
                                depth_in_meters=True, masks_as_one_channel=True)

    return api.ObservationConfig(
        left_shoulder_camera=camera("left_shoulder"), right_shoulder_camera=camera("right_shoulder"),
        overhead_camera=camera("overhead"), wrist_camera=camera("wrist"), front_camera=camera("front"),
        joint_velocities=True, joint_positions=True, joint_forces=True, gripper_open=True, gripper_pose=True,
        # kept for rlbench_observation() and demos; cheap to read
        gripper_matrix=True, gripper_joint_positions=True, task_low_dim_state=True)


class RLBenchBackend:
    """One RLBench task in CoppeliaSim, with the backend interface `RLBenchEnv` drives."""

    name = "rlbench"

    def __init__(self, task_name: str, obs_config: ObservationConfig, action_mode: str, *, headless: bool = True):
        api = import_rlbench()
        self.obs_config, self.action_mode = obs_config, action_mode
        self._refusals = api.refusals
        self._demo_class = api.Demo
        self.env = api.Environment(action_mode=make_action_mode(api, action_mode),
                                   obs_config=make_observation_config(api, obs_config), headless=headless)
        self.env.launch()
        try:
            self.task = self.env.get_task(api.name_to_task_class(task_name))
            self.variation_count = int(self.task.variation_count())
        except BaseException:
            self.env.shutdown()
            raise
        self._obs = None          # RLBench's Observation of the current step
        self._success = False

    # --- episodes --------------------------------------------------------------------------------
    def reset(self, variation: int, rng: np.random.Generator) -> list[str]:
        self.task.set_variation(int(variation))
        # RLBench places objects with numpy's global generator: seed it from the episode's seed.
        np.random.seed(int(rng.integers(2**32)))
        descriptions, obs = self.task.reset()
        return self._start(descriptions, obs)

    def reset_to_demo(self, demo, variation: int) -> list[str]:
        """Start from the initial state of a demo RLBench recorded (its stored numpy random state)."""
        rlbench_demo = self._as_rlbench_demo(demo, variation)
        self.task.set_variation(int(variation))      # RLBench versions before 1.2 do not set it themselves
        descriptions, obs = self.task.reset_to_demo(rlbench_demo)
        return self._start(descriptions, obs)

    def _start(self, descriptions, obs) -> list[str]:
        self._obs, self._success = obs, False
        return [str(d) for d in descriptions]

    def _as_rlbench_demo(self, demo, variation: int):
        """An `rlbench.demo.Demo` for `task.reset_to_demo`: ours (from `load_demo`) lacks its
        `restore_state()`, and RLBench 1.2 reads the variation from the first step's misc."""
        seed = getattr(demo, "random_seed", None)
        if not (isinstance(seed, tuple) and len(seed) == 5 and seed[0] == "MT19937"):
            raise ValueError("options['demo']: backend='rlbench' resets to a demo RLBench recorded, whose "
                             "random_seed is numpy's RandomState state tuple ('MT19937', uint32[624], pos, "
                             f"has_gauss, cached_gaussian); this demo's random_seed is {type(seed).__name__}")
        observations = list(demo)
        if not observations:
            raise ValueError("options['demo']: the demo has no observations")
        first = copy.copy(observations[0])
        first.misc = {**(getattr(first, "misc", None) or {}), "variation_index": int(variation)}
        rlbench_demo = self._demo_class([first] + observations[1:], seed)
        rlbench_demo.num_reset_attempts = getattr(demo, "num_reset_attempts", None)
        return rlbench_demo

    # --- steps -----------------------------------------------------------------------------------
    def apply_action(self, action: np.ndarray) -> str | None:
        """One RLBench step. Returns why RLBench refused the action, or None."""
        command = np.array(action, dtype=np.float64)
        command[7] = 1.0 if action[7] >= 0.5 else 0.0    # ours: >= 0.5 open; Discrete: > 0.5 open
        try:
            obs, reward, _terminate = self.task.step(command)
        except self._refusals as error:
            # RLBench refuses before moving (IK or path planning failed): the scene is as it was.
            self._obs, self._success = self.task.get_observation(), False
            return f"{self.action_mode}: RLBench refused the action ({type(error).__name__}: {error})"
        # RLBench's reward is 1.0 exactly when all of the task's success conditions hold.
        self._obs, self._success = obs, float(reward) >= 1.0
        return None

    def success(self) -> bool:
        return self._success

    # --- observations ----------------------------------------------------------------------------
    def observation(self) -> dict[str, np.ndarray]:
        obs, config = self._current(), self.obs_config
        out: dict[str, np.ndarray] = {}
        for camera in config.cameras:
            if config.rgb:
                out[f"{camera}_rgb"] = np.asarray(self._image(obs, camera, "rgb"), dtype=np.uint8)
            if config.depth:
                out[f"{camera}_depth"] = np.asarray(self._image(obs, camera, "depth"), dtype=np.float32)
            if config.mask:   # RLBench decodes handles into floats
                out[f"{camera}_mask"] = np.rint(self._image(obs, camera, "mask")).astype(np.int32)
        out["joint_positions"] = np.asarray(obs.joint_positions, dtype=np.float32)
        out["joint_velocities"] = np.asarray(obs.joint_velocities, dtype=np.float32)
        out["gripper_open"] = np.array([obs.gripper_open], dtype=np.float32)
        out["gripper_pose"] = np.asarray(obs.gripper_pose, dtype=np.float32)
        return out

    def rlbench_observation(self) -> Observation:
        """A copy of RLBench's Observation of the current step as ours (same fields, misc included)."""
        obs = self._current()
        names = [f"{camera}_{kind}" for camera in CAMERAS for kind in IMAGE_KINDS] + list(LOW_DIM_FIELDS)
        fields = {name: copy.deepcopy(getattr(obs, name, None)) for name in names}
        fields["misc"] = fields["misc"] or {}
        return Observation(**fields)

    def render(self, size: tuple[int, int], camera: str | None = None) -> np.ndarray:
        """The current image of `camera` (front if rendered, else the first rgb camera), resized to (H, W)."""
        if not self.obs_config.rgb:
            raise RuntimeError("render: backend='rlbench' renders from an observation camera, and this env "
                               "renders no rgb (ObservationConfig.rgb is False)")
        camera = camera or ("front" if "front" in self.obs_config.cameras else self.obs_config.cameras[0])
        image = Image.fromarray(np.asarray(self._image(self._current(), camera, "rgb"), dtype=np.uint8))
        height, width = size
        return np.asarray(image.resize((width, height), Image.BILINEAR))

    def close(self) -> None:
        if self.env is not None:
            self.env.shutdown()
            self.env = None

    # --- helpers ---------------------------------------------------------------------------------
    def _current(self):
        if self._obs is None:
            raise RuntimeError("backend='rlbench': no observation yet; call reset() first")
        return self._obs

    @staticmethod
    def _image(obs, camera: str, kind: str) -> np.ndarray:
        image = getattr(obs, f"{camera}_{kind}", None)
        if image is None:
            raise RuntimeError(f"RLBench returned no {camera}_{kind}; the RLBench ObservationConfig this "
                               f"backend made asks for it, so the installed RLBench did not honour it")
        return image
