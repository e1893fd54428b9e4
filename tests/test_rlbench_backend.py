"""backend='rlbench' over STAND-IN `rlbench` and `pyrep` modules.

CoppeliaSim, PyRep and RLBench cannot be installed on the project's machines. The stand-ins below
exist only in this file, only while a test runs (put in sys.modules by the `standin` fixture and
removed after). They follow the public API of RLBench 1.2 and PyRep, read from stepjam/RLBench and
stepjam/PyRep: module paths, class names, constructor signatures, the Observation's fields, the
exceptions, CameraConfig's image_size as PyRep's [x, y] resolution, depth in metres only when
`depth_in_meters=True`, masks decoded into float handles, Demo.restore_state, reset_to_demo
reading misc['variation_index']. Their "simulator" is a few lines of arithmetic.

So these tests check our side of the contract (what we send RLBench, what we make of its
answers), not that the backend runs in CoppeliaSim: it has not been run there.
"""

import subprocess
import sys
import textwrap
import types

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import llarva_gym
from llarva_gym.backends.rlbench import INSTALL_HELP
from llarva_gym.demos import Demo as LlarvaDemo, load_demo, save_demo
from llarva_gym.observation import Observation as LlarvaObservation
from llarva_gym.registration import TASKS

HOME = np.array([0.0, 0.17, 0.0, -0.87, 0.0, 1.05, 0.79])    # inside the Panda's limits
CAMERA_NAMES = ("left_shoulder", "right_shoulder", "overhead", "wrist", "front")
DEPTH_METRES, NEAR, FAR = 1.25, 0.01, 4.5
OBSERVATION_FIELDS = ([f"{c}_{k}" for c in CAMERA_NAMES for k in ("rgb", "depth", "mask", "point_cloud")]
                      + ["joint_velocities", "joint_positions", "joint_forces", "gripper_open", "gripper_pose",
                         "gripper_matrix", "gripper_joint_positions", "gripper_touch_forces",
                         "task_low_dim_state", "misc"])


# --- the stand-ins (tests only) ------------------------------------------------------------------
class InvalidActionError(Exception):           # rlbench.backend.exceptions
    pass


class TaskEnvironmentError(Exception):         # rlbench.backend.exceptions
    pass


class IKError(Exception):                      # pyrep.errors
    pass


class ConfigurationPathError(Exception):       # pyrep.errors
    pass


class CameraConfig:                            # rlbench.observation_config
    def __init__(self, rgb=True, rgb_noise=None, depth=True, depth_noise=None, point_cloud=True, mask=True,
                 image_size=(128, 128), render_mode=None, masks_as_one_channel=True, depth_in_meters=False):
        self.rgb, self.depth, self.point_cloud, self.mask = rgb, depth, point_cloud, mask
        self.image_size, self.masks_as_one_channel, self.depth_in_meters = image_size, masks_as_one_channel, depth_in_meters


class ObservationConfig:                       # rlbench.observation_config
    def __init__(self, left_shoulder_camera=None, right_shoulder_camera=None, overhead_camera=None,
                 wrist_camera=None, front_camera=None, joint_velocities=True, joint_velocities_noise=None,
                 joint_positions=True, joint_positions_noise=None, joint_forces=True, joint_forces_noise=None,
                 gripper_open=True, gripper_pose=True, gripper_matrix=False, gripper_joint_positions=False,
                 gripper_touch_forces=False, wrist_camera_matrix=False, record_gripper_closing=False,
                 task_low_dim_state=False):
        for name, camera in (("left_shoulder", left_shoulder_camera), ("right_shoulder", right_shoulder_camera),
                             ("overhead", overhead_camera), ("wrist", wrist_camera), ("front", front_camera)):
            setattr(self, f"{name}_camera", CameraConfig() if camera is None else camera)
        self.joint_velocities, self.joint_positions, self.joint_forces = joint_velocities, joint_positions, joint_forces
        self.gripper_open, self.gripper_pose, self.gripper_matrix = gripper_open, gripper_pose, gripper_matrix
        self.gripper_joint_positions, self.gripper_touch_forces = gripper_joint_positions, gripper_touch_forces
        self.task_low_dim_state = task_low_dim_state


class Observation:                             # rlbench.backend.observation: every field required
    def __init__(self, **fields):
        assert sorted(fields) == sorted(OBSERVATION_FIELDS), "RLBench's Observation takes exactly its fields"
        self.__dict__.update(fields)


class Demo:                                    # rlbench.demo
    def __init__(self, observations, random_seed=None, num_reset_attempts=None):
        self._observations, self.random_seed, self.num_reset_attempts = observations, random_seed, num_reset_attempts

    def __len__(self):
        return len(self._observations)

    def __getitem__(self, i):
        return self._observations[i]

    def restore_state(self):
        np.random.set_state(self.random_seed)


class JointVelocity:                           # rlbench.action_modes.arm_action_modes
    pass


class JointPosition:
    def __init__(self, absolute_mode: bool = True):
        self._absolute_mode = absolute_mode


class EndEffectorPoseViaIK:
    def __init__(self, absolute_mode: bool = True, frame: str = "world", collision_checking: bool = False):
        self._absolute_mode, self._frame, self._collision_checking = absolute_mode, frame, collision_checking


class EndEffectorPoseViaPlanning(EndEffectorPoseViaIK):
    pass


class Discrete:                                # rlbench.action_modes.gripper_action_modes
    def __init__(self, attach_grasped_objects: bool = True, detach_before_open: bool = True):
        self._attach_grasped_objects, self._detach_before_open = attach_grasped_objects, detach_before_open


class MoveArmThenGripper:                      # rlbench.action_modes.action_mode
    def __init__(self, arm_action_mode, gripper_action_mode):
        self.arm_action_mode, self.gripper_action_mode = arm_action_mode, gripper_action_mode


class InvalidTaskName(Exception):              # rlbench.utils
    pass


def name_to_task_class(task_file: str):        # rlbench.utils
    name = task_file.replace(".py", "")
    if name not in TASKS:
        raise InvalidTaskName(f"The task file '{name}' does not exist or cannot be compiled.")
    return type("".join(w[0].upper() + w[1:] for w in name.split("_")), (), {"task_name": name, "variations": TASKS[name]})


class TaskEnvironment:                         # rlbench.task_environment (returned by Environment.get_task)
    def __init__(self, env, task_class):
        self._env, self._task_class = env, task_class
        self._variation_number, self._reset_called = 0, False
        self.step_args, self.reset_to_demo_args = [], []
        self.refuse_next, self.succeed_at_step = None, None

    def variation_count(self) -> int:
        return self._task_class.variations

    def set_variation(self, v: int) -> None:
        if v >= self.variation_count():
            raise TaskEnvironmentError(f"Requested variation {v}, but there are only {self.variation_count()} variations.")
        self._variation_number = v

    def descriptions(self):
        return [f"stand-in task {self._task_class.task_name} variation {self._variation_number} text {i}" for i in range(3)]

    def reset(self, demo=None):
        # The layout comes from numpy's global generator, as RLBench's SpawnBoundary draws it.
        self.layout = np.random.uniform(-0.3, 0.3, size=3)
        self.joints, self.pose, self.gripper, self.steps = HOME.copy(), np.r_[0.3, 0.0, 1.2, 0, 0, 0, 1.0], 1.0, 0
        self._reset_called = True
        return self.descriptions(), self.get_observation()

    def reset_to_demo(self, demo):
        self.reset_to_demo_args.append(demo)
        demo.restore_state()
        self.set_variation(demo._observations[0].misc["variation_index"])
        return self.reset(demo)

    def step(self, action):
        assert self._reset_called, "Call 'reset' before calling 'step' on a task."
        self.step_args.append(np.array(action))
        if np.shape(action) != (8,):
            raise InvalidActionError(f"Expected the action shape to be: (8,), but was shape: {np.shape(action)}")
        if self.refuse_next is not None:
            error, self.refuse_next = self.refuse_next, None
            raise error
        arm = self._env._action_mode.arm_action_mode
        if isinstance(arm, JointVelocity):
            self.joints = self.joints + np.asarray(action[:7]) * 0.05
        elif isinstance(arm, JointPosition):
            self.joints = np.asarray(action[:7], dtype=float)
        else:
            assert np.isclose(np.linalg.norm(action[3:7]), 1.0), "Action contained non unit quaternion!"
            self.pose = np.asarray(action[:7], dtype=float)
        self.gripper = float(action[7] > 0.5)           # Discrete: > 0.5 open
        self.steps += 1
        success = self.succeed_at_step is not None and self.steps >= self.succeed_at_step
        return self.get_observation(), float(success), success

    def get_observation(self):
        config, fields = self._env._obs_config, {"misc": {"variation_index": self._variation_number}}
        for index, camera in enumerate(CAMERA_NAMES):
            cam = getattr(config, f"{camera}_camera")
            width, height = cam.image_size              # PyRep resolution [x, y]
            fields[f"{camera}_rgb"] = (np.full((height, width, 3), 10 * index + self.steps, np.uint8)
                                       if cam.rgb else None)
            depth = np.full((height, width), DEPTH_METRES, np.float32)
            fields[f"{camera}_depth"] = (depth if cam.depth_in_meters else (depth - NEAR) / (FAR - NEAR)) if cam.depth else None
            fields[f"{camera}_mask"] = np.full((height, width), 40.0 + index) if cam.mask else None   # float handles
            fields[f"{camera}_point_cloud"] = np.zeros((height, width, 3)) if cam.point_cloud else None
            if cam.rgb or cam.depth or cam.point_cloud:    # RLBench removes cameras nothing asks of
                fields["misc"].update({f"{camera}_camera_extrinsics": np.eye(4) * (index + 1),
                                       f"{camera}_camera_intrinsics": np.eye(3),
                                       f"{camera}_camera_near": NEAR, f"{camera}_camera_far": FAR})
        fields.update(
            joint_velocities=np.full(7, 0.01) if config.joint_velocities else None,
            joint_positions=self.joints.copy() if config.joint_positions else None,
            joint_forces=np.zeros(7) if config.joint_forces else None,
            gripper_open=self.gripper if config.gripper_open else None,
            gripper_pose=self.pose.copy() if config.gripper_pose else None,
            gripper_matrix=np.eye(4) if config.gripper_matrix else None,
            gripper_joint_positions=np.full(2, 0.04 * self.gripper) if config.gripper_joint_positions else None,
            gripper_touch_forces=np.zeros(6) if config.gripper_touch_forces else None,
            task_low_dim_state=self.layout.copy() if config.task_low_dim_state else None)
        return Observation(**fields)


class Environment:                             # rlbench.environment
    instances: list = []

    def __init__(self, action_mode, dataset_root="", obs_config=None, headless=False, static_positions=False,
                 robot_setup="panda", randomize_every=None, frequency=1, visual_randomization_config=None,
                 dynamics_randomization_config=None, attach_grasped_objects=True, shaped_rewards=False):
        self._action_mode, self._obs_config, self._headless = action_mode, obs_config or ObservationConfig(), headless
        self._pyrep, self.shutdowns, self.tasks = None, 0, []
        Environment.instances.append(self)

    def launch(self):
        if self._pyrep is not None:
            raise RuntimeError("Already called launch!")
        self._pyrep = "launched"

    def get_task(self, task_class):
        if self._pyrep is None:
            self.launch()
        self.tasks.append(TaskEnvironment(self, task_class))
        return self.tasks[-1]

    def shutdown(self):
        self.shutdowns += 1
        self._pyrep = None


def _module(name, **attributes):
    module = types.ModuleType(name, "stand-in for tests only: not the real package")
    module.__dict__.update(attributes)
    if name in ("pyrep", "rlbench", "rlbench.action_modes", "rlbench.backend"):
        module.__path__ = []     # a package
    return module


STANDIN_MODULES = {
    "pyrep": dict(),
    "pyrep.errors": dict(IKError=IKError, ConfigurationPathError=ConfigurationPathError),
    "rlbench": dict(),
    "rlbench.environment": dict(Environment=Environment),
    "rlbench.observation_config": dict(ObservationConfig=ObservationConfig, CameraConfig=CameraConfig),
    "rlbench.action_modes": dict(),
    "rlbench.action_modes.action_mode": dict(MoveArmThenGripper=MoveArmThenGripper),
    "rlbench.action_modes.arm_action_modes": dict(JointVelocity=JointVelocity, JointPosition=JointPosition,
                                                  EndEffectorPoseViaIK=EndEffectorPoseViaIK,
                                                  EndEffectorPoseViaPlanning=EndEffectorPoseViaPlanning),
    "rlbench.action_modes.gripper_action_modes": dict(Discrete=Discrete),
    "rlbench.backend": dict(),
    "rlbench.backend.exceptions": dict(InvalidActionError=InvalidActionError, TaskEnvironmentError=TaskEnvironmentError),
    "rlbench.backend.observation": dict(Observation=Observation),
    "rlbench.demo": dict(Demo=Demo),
    "rlbench.utils": dict(name_to_task_class=name_to_task_class, InvalidTaskName=InvalidTaskName),
}


@pytest.fixture
def standin(monkeypatch):
    """Puts the stand-in rlbench/pyrep modules in sys.modules for one test; monkeypatch removes them."""
    modules = {name: _module(name, **attributes) for name, attributes in STANDIN_MODULES.items()}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    Environment.instances.clear()
    yield
    Environment.instances.clear()


def make(**kwargs):
    return gym.make("llarva/reach_target", backend="rlbench", **kwargs)


def sim_of(env):
    """The stand-in Environment and TaskEnvironment behind a gym env."""
    simulator = env.unwrapped.backend.env
    return simulator, simulator.tasks[-1]


# --- without RLBench -----------------------------------------------------------------------------
def test_without_rlbench_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyrep", None)      # None in sys.modules: "import pyrep" fails
    monkeypatch.setitem(sys.modules, "rlbench", None)
    with pytest.raises(ImportError, match="CoppeliaSim 4.1.*PyRep.*RLBench.*README") as raised:
        make()
    message = str(raised.value)
    for needed in ("COPPELIASIM_ROOT", "LD_LIBRARY_PATH", "QT_QPA_PLATFORM_PLUGIN_PATH",
                   "pip install git+https://github.com/stepjam/PyRep", "pip install git+https://github.com/stepjam/RLBench",
                   "docs/rlbench.md", "backend='mujoco'"):
        assert needed in message
    assert message.startswith(INSTALL_HELP)


def test_pyrep_failing_at_import_is_reported_as_the_install_error(tmp_path, monkeypatch):
    # PyRep raises its own error (not ImportError) when COPPELIASIM_ROOT is unset.
    package = tmp_path / "pyrep"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('COPPELIASIM_ROOT not defined. See installation instructions.')\n")
    (package / "errors.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pyrep", raising=False)
    monkeypatch.delitem(sys.modules, "pyrep.errors", raising=False)
    with pytest.raises(ImportError, match=r"CoppeliaSim 4\.1.*\(import failed: RuntimeError: COPPELIASIM_ROOT not defined"):
        make()


def test_llarva_gym_and_mujoco_envs_never_import_rlbench():
    script = textwrap.dedent("""
        import sys
        import gymnasium as gym
        import llarva_gym
        env = gym.make("llarva/reach_target")
        env.reset(seed=0)
        env.step(env.action_space.sample())
        env.close()
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("rlbench", "pyrep", "yarr")))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


# --- construction: action modes, observation config ------------------------------------------------
@pytest.mark.parametrize("mode, arm_class, absolute", [("joint_velocity", JointVelocity, None),
                                                       ("joint_position", JointPosition, True),
                                                       ("ee_pose", EndEffectorPoseViaIK, True)])
def test_each_action_mode_builds_rlbench_action_mode(standin, mode, arm_class, absolute):
    env = make(action_mode=mode)
    simulator, task = sim_of(env)
    action_mode = simulator._action_mode
    assert isinstance(action_mode, MoveArmThenGripper)
    assert type(action_mode.arm_action_mode) is arm_class            # IK, not planning, for ee_pose
    if absolute is not None:
        assert action_mode.arm_action_mode._absolute_mode is absolute
    assert isinstance(action_mode.gripper_action_mode, Discrete)
    assert simulator._headless is True and simulator._pyrep == "launched"
    assert task._task_class.__name__ == "ReachTarget"
    assert env.unwrapped.backend.variation_count == 20
    env.close()


def test_observation_config_enables_only_our_cameras_at_our_size(standin):
    env = make(cameras=("front", "wrist"), image_size=(96, 128), depth=True, mask=True)
    config = sim_of(env)[0]._obs_config
    for camera in CAMERA_NAMES:
        cam = getattr(config, f"{camera}_camera")
        on = camera in ("front", "wrist")
        assert (cam.rgb, cam.depth, cam.mask) == (on, on, on), camera
        assert cam.point_cloud is False
        assert cam.image_size == (128, 96)           # PyRep's [x, y]: width first
        assert cam.depth_in_meters is True and cam.masks_as_one_channel is True
    assert config.joint_positions and config.joint_velocities and config.gripper_open and config.gripper_pose

    obs, info = env.reset(seed=0)
    assert obs["front_rgb"].shape == (96, 128, 3) and obs["front_rgb"].dtype == np.uint8
    assert obs["wrist_depth"].dtype == np.float32 and np.allclose(obs["wrist_depth"], DEPTH_METRES)   # metres
    assert obs["front_mask"].dtype == np.int32 and (obs["front_mask"] == 44).all()   # front is camera 4
    assert (obs["wrist_mask"] == 43).all()
    assert not any(key.startswith(("left_shoulder", "right_shoulder", "overhead")) for key in obs)
    assert env.observation_space.contains(obs)
    env.close()


# --- actions in, observations out ----------------------------------------------------------------
def test_joint_velocity_actions_reach_task_step_and_come_back_as_joint_positions(standin):
    env = make()
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs["joint_positions"], HOME.astype(np.float32))
    task = sim_of(env)[1]
    velocity = np.array([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7])

    obs, reward, terminated, truncated, info = env.step(np.r_[velocity, 0.5].astype(np.float32))
    sent = task.step_args[-1]
    assert sent.shape == (8,)
    np.testing.assert_allclose(sent[:7], velocity, rtol=1e-6)
    assert sent[7] == 1.0                  # ours: 0.5 is open; RLBench's Discrete would read 0.5 as closed
    np.testing.assert_allclose(obs["joint_positions"], (HOME + velocity * 0.05).astype(np.float32), rtol=1e-6)
    assert obs["gripper_open"].dtype == np.float32 and obs["gripper_open"].shape == (1,) and obs["gripper_open"][0] == 1.0
    assert obs["gripper_pose"].shape == (7,) and obs["joint_velocities"].shape == (7,)

    obs, *_ = env.step(np.r_[np.zeros(7), 0.49].astype(np.float32))
    assert task.step_args[-1][7] == 0.0 and obs["gripper_open"][0] == 0.0
    assert not terminated and "invalid_action" not in info
    env.close()


def test_ee_pose_actions_are_sent_as_xyz_and_unit_quaternion_xyzw(standin):
    env = make(action_mode="ee_pose")
    env.reset(seed=0)
    obs, *_ = env.step(np.array([0.25, 0.1, 1.1, 0.0, 0.0, 0.5, 0.5, 1.0], dtype=np.float32))
    sent = sim_of(env)[1].step_args[-1]
    half = np.sqrt(0.5)
    np.testing.assert_allclose(sent, [0.25, 0.1, 1.1, 0.0, 0.0, half, half, 1.0], rtol=1e-6)
    np.testing.assert_allclose(obs["gripper_pose"], sent[:7].astype(np.float32))
    env.close()


def test_rlbench_observation_is_a_copy_in_llarva_observation(standin):
    env = make(depth=True)
    env.reset(seed=0)
    env.step(np.r_[np.full(7, 0.1), 1.0].astype(np.float32))
    ours = env.unwrapped.rlbench_observation()
    theirs = sim_of(env)[1].get_observation()
    assert isinstance(ours, LlarvaObservation)
    for name in OBSERVATION_FIELDS[:-1]:
        mine, real = getattr(ours, name), getattr(theirs, name)
        assert (mine is None) == (real is None), name
        if real is not None:
            np.testing.assert_array_equal(mine, real, err_msg=name)
    assert ours.gripper_open == 1.0 and ours.gripper_matrix.shape == (4, 4)
    assert ours.misc["variation_index"] == env.unwrapped.variation
    np.testing.assert_array_equal(ours.misc["front_camera_extrinsics"], np.eye(4) * 5)
    assert "wrist_camera_extrinsics" not in ours.misc          # a camera we did not ask for
    np.testing.assert_array_equal(ours.task_low_dim_state, sim_of(env)[1].layout)
    # a copy: changing it leaves the backend's observation alone
    ours.joint_positions[:] = 99.0
    ours.misc["front_camera_extrinsics"][:] = 0.0
    fresh = env.unwrapped.rlbench_observation()
    assert not np.any(fresh.joint_positions == 99.0) and fresh.misc["front_camera_extrinsics"][0, 0] == 5.0
    env.close()


# --- refused actions, success, instructions, seeds -------------------------------------------------
@pytest.mark.parametrize("error_class", [InvalidActionError, IKError, ConfigurationPathError])
def test_rlbench_refusals_become_invalid_action_and_do_not_end_the_episode(standin, error_class):
    env = make(action_mode="ee_pose")
    before, _ = env.reset(seed=0)
    task = sim_of(env)[1]
    task.refuse_next = error_class("A path could not be found.")
    obs, reward, terminated, truncated, info = env.step(np.array([0.7, 0.5, 1.6, 0, 0, 0, 1, 1], dtype=np.float32))
    assert info["invalid_action"].startswith("ee_pose: RLBench refused the action")
    assert f"{error_class.__name__}: A path could not be found." in info["invalid_action"]
    assert reward == 0.0 and not terminated and not truncated and not info["success"]
    for key in before:
        assert np.array_equal(obs[key], before[key]), key   # the scene is as it was
    obs, reward, terminated, truncated, info = env.step(np.array([0.3, 0.0, 1.2, 0, 0, 0, 1, 1], dtype=np.float32))
    assert "invalid_action" not in info                      # the episode goes on
    env.close()


def test_other_simulator_errors_are_not_swallowed(standin):
    env = make()
    env.reset(seed=0)
    sim_of(env)[1].refuse_next = RuntimeError("CoppeliaSim crashed")
    with pytest.raises(RuntimeError, match="CoppeliaSim crashed"):
        env.step(np.zeros(8, dtype=np.float32))
    env.close()


def test_success_gives_reward_one_and_terminates(standin):
    env = make()
    env.reset(seed=0)
    sim_of(env)[1].succeed_at_step = 2
    *_, reward, terminated, truncated, info = env.step(np.zeros(8, dtype=np.float32))
    assert (reward, terminated, info["success"]) == (0.0, False, False)
    *_, reward, terminated, truncated, info = env.step(np.zeros(8, dtype=np.float32))
    assert (reward, terminated, info["success"], info["is_success"]) == (1.0, True, True, True)
    env.close()


def test_descriptions_become_the_instruction_and_the_variation_is_set(standin):
    env = make()
    obs, info = env.reset(seed=0, options={"variation": 7})
    task = sim_of(env)[1]
    assert task._variation_number == 7 and info["variation"] == 7
    assert info["descriptions"] == task.descriptions()
    assert obs["instruction"] == task.descriptions()[0] == env.unwrapped.task_description
    obs, _, _, _, info = env.step(np.zeros(8, dtype=np.float32))
    assert obs["instruction"] == task.descriptions()[0]
    env.close()


def test_episode_seed_seeds_rlbench_numpy_layout(standin):
    env = make()
    layouts = []
    for seed in (3, 3, 4):
        env.reset(seed=seed)
        layouts.append(sim_of(env)[1].layout.copy())
    assert np.array_equal(layouts[0], layouts[1]) and not np.array_equal(layouts[0], layouts[2])
    _, info = env.reset(seed=3)
    again, _ = env.reset(options={"episode_seed": info["episode_seed"], "variation": info["variation"]})
    assert np.array_equal(sim_of(env)[1].layout, layouts[0])
    env.close()


@pytest.mark.filterwarnings("ignore:.*symmetric and normalized")   # physical units on purpose (DESIGN.md)
def test_gymnasium_check_env_passes(standin):
    env = make(depth=True, mask=True, render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


# --- real RLBench demos ----------------------------------------------------------------------------
def rlbench_recorded_demo(tmp_path, variation=4, seed=7):
    """A demo as real RLBench writes it (numpy RandomState tuple in random_seed), saved and read back."""
    observations = [LlarvaObservation(front_rgb=np.zeros((16, 16, 3), np.uint8), joint_positions=HOME.copy(),
                                      gripper_open=1.0, misc={}) for _ in range(3)]
    demo = LlarvaDemo(observations, random_seed=np.random.RandomState(seed).get_state())
    episode = save_demo(demo, tmp_path / "reach_target" / "all_variations" / "episodes" / "episode0",
                        variation_number=variation, descriptions=["reach the stand-in target"])
    return load_demo(episode)


def test_reset_with_a_real_rlbench_demo_goes_to_reset_to_demo(standin, tmp_path):
    demo = rlbench_recorded_demo(tmp_path, variation=4, seed=7)
    env = make()
    obs, info = env.reset(seed=0, options={"demo": demo})
    task = sim_of(env)[1]
    sent = task.reset_to_demo_args[-1]
    assert isinstance(sent, Demo)                            # RLBench's own Demo class
    assert sent.random_seed[0] == "MT19937" and np.array_equal(sent.random_seed[1], demo.random_seed[1])
    assert sent._observations[0].misc["variation_index"] == 4
    assert demo[0].misc == {}                                # the caller's demo is left as it was
    # RLBench restored the demo's numpy state before placing objects: the recorded layout comes back.
    np.testing.assert_array_equal(task.layout, np.random.RandomState(7).uniform(-0.3, 0.3, size=3))
    assert info["variation"] == 4 and info["episode_seed"] is None
    assert obs["instruction"] == task.descriptions()[0] and "variation 4" in obs["instruction"]
    env.close()


def test_demo_reset_errors_and_embedded_demos_on_the_rlbench_backend(standin, tmp_path):
    env = make()
    demo = rlbench_recorded_demo(tmp_path)
    with pytest.raises(ValueError, match="cannot be combined with a demo recorded by real RLBench"):
        env.reset(options={"demo": demo, "variation": 1})
    seedless = LlarvaDemo(list(demo), random_seed=None)
    seedless.variation_number = 1
    with pytest.raises(ValueError, match="RandomState state tuple"):
        env.reset(options={"demo": seedless})
    unknown = LlarvaDemo(list(demo), random_seed=demo.random_seed)
    with pytest.raises(ValueError, match="variation is unknown"):
        env.reset(options={"demo": unknown})
    # a demo of the embedded simulator carries an episode seed: it seeds RLBench's layout instead
    embedded = LlarvaDemo(list(demo), random_seed={"episode_seed": 3, "variation": 2})
    _, info = env.reset(options={"demo": embedded})
    assert info["variation"] == 2 and info["episode_seed"] == 3 and not sim_of(env)[1].reset_to_demo_args
    env.close()


def test_mujoco_backend_still_refuses_real_rlbench_demos(tmp_path):
    env = gym.make("llarva/reach_target")
    with pytest.raises(ValueError, match="reset only with backend='rlbench'"):
        env.reset(options={"demo": rlbench_recorded_demo(tmp_path)})
    env.close()


# --- render and close ------------------------------------------------------------------------------
def test_render_resizes_the_front_camera_and_close_shuts_down_once(standin):
    env = make(cameras=("wrist", "front"), render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert (frame == 40).all()                       # front is camera 4: its stand-in pixels are 40
    simulator = sim_of(env)[0]
    env.close()
    env.close()
    assert simulator.shutdowns == 1


def test_a_task_rlbench_does_not_know_shuts_the_simulator_down(standin):
    def unknown(name):
        raise InvalidTaskName(f"The task file '{name}' does not exist or cannot be compiled.")
    sys.modules["rlbench.utils"].name_to_task_class = unknown
    with pytest.raises(InvalidTaskName):
        llarva_gym.RLBenchEnv("reach_target", backend="rlbench")
    assert Environment.instances[-1].shutdowns == 1
