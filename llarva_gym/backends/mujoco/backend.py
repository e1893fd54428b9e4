"""The MuJoCo backend behind `RLBenchEnv`: one task's scene, its robot, cameras and episode logic."""

from __future__ import annotations

import mujoco
import numpy as np

from llarva_gym.action_modes import JOINT_LOWER, JOINT_UPPER
from llarva_gym.backends.mujoco.robot import Panda, quat_xyzw_to_mat
from llarva_gym.backends.mujoco.scene import CONTROL_PERIOD, Cameras, build_model
from llarva_gym.backends.mujoco.tasks import TASKS
from llarva_gym.expert import reaches_every_waypoint
from llarva_gym.observation import Observation, ObservationConfig

MAX_RESET_ATTEMPTS = 40   # RLBench's TaskEnvironment draws a placement up to 40 times


class MujocoBackend:
    name = "mujoco"

    def __init__(self, task_name: str, obs_config: ObservationConfig, action_mode: str):
        task_class = TASKS[task_name]
        self.model = build_model(task_class.xml, task_class.graspable, obs_config.render_quality)
        self.data = mujoco.MjData(self.model)
        self.panda = Panda(self.model, self.data)
        self.task = task_class(self.model, self.data, self.panda)
        self.cameras = Cameras(self.model, obs_config)
        self.obs_config, self.action_mode = obs_config, action_mode
        self.substeps = round(CONTROL_PERIOD / self.model.opt.timestep)
        self.variation_count = task_class.variation_count
        self._viewer_renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        self._images: dict[str, np.ndarray] | None = None   # the current step's frames, once rendered

    def reset(self, variation: int, rng: np.random.Generator) -> list[str]:
        """Place the task's objects, drawing again (from the same `rng`) while the expert cannot
        reach every waypoint of the placement, as RLBench's reset does."""
        for _ in range(MAX_RESET_ATTEMPTS):
            self._place(variation, rng)
            if reaches_every_waypoint(self, self.task.max_episode_steps):
                return self.task.descriptions(variation)
        raise RuntimeError(f"{self.task.name}: none of {MAX_RESET_ATTEMPTS} placements drawn for variation "
                           f"{variation} has waypoints the arm can reach; the task's spawn boundary or "
                           "waypoints are wrong")

    def _place(self, variation: int, rng: np.random.Generator) -> None:
        self._images = None
        mujoco.mj_resetData(self.model, self.data)
        self.panda.reset()
        self.task.init_episode(variation, rng)
        mujoco.mj_forward(self.model, self.data)
        # Let resting objects settle onto the table before the first observation.
        for _ in range(self.substeps):
            mujoco.mj_step(self.model, self.data)
        mujoco.mj_forward(self.model, self.data)
        self.panda.joint_velocities = np.zeros(7)

    def apply_action(self, action: np.ndarray) -> str | None:
        """Run one control period. Returns why the action was refused, or None."""
        self._images = None
        current = self.panda.joint_positions
        if self.action_mode == "joint_velocity":
            target = np.clip(current + action[:7] * CONTROL_PERIOD, JOINT_LOWER, JOINT_UPPER)
        elif self.action_mode == "joint_position":
            target = action[:7]
        else:
            target, solved = self.panda.solve_ik(action[:3], quat_xyzw_to_mat(action[3:7]), current)
            if not solved:
                return (f"ee_pose: the arm cannot reach position {np.round(action[:3], 4).tolist()} "
                        f"with quaternion {np.round(action[3:7], 4).tolist()} (no inverse-kinematics solution)")
        self.panda.move(target, action[7], self.substeps, CONTROL_PERIOD, self.task.graspable)
        return None

    def success(self) -> bool:
        return self.task.success()

    def observation(self) -> dict[str, np.ndarray]:
        obs = dict(self._render())
        obs["joint_positions"] = self.panda.joint_positions.astype(np.float32)
        obs["joint_velocities"] = self.panda.joint_velocities.astype(np.float32)
        obs["gripper_open"] = np.array([self.panda.gripper_open], dtype=np.float32)
        obs["gripper_pose"] = self.panda.gripper_pose().astype(np.float32)
        return obs

    def _render(self) -> dict[str, np.ndarray]:
        if self._images is None:
            self._images = self.cameras.render(self.data)
        return self._images

    def rlbench_observation(self) -> Observation:
        """The full RLBench record of the current step (for demos), in float64 as RLBench's."""
        panda = self.panda
        return Observation(
            **self._render(),
            joint_velocities=panda.joint_velocities.copy(),
            joint_positions=panda.joint_positions,
            joint_forces=np.zeros(7),
            gripper_open=float(panda.gripper_open),
            gripper_pose=panda.gripper_pose(),
            gripper_matrix=panda.gripper_matrix(),
            gripper_joint_positions=panda.gripper_joint_positions(),
            gripper_touch_forces=np.zeros(6),
            task_low_dim_state=self.task.low_dim_state(),
            ignore_collisions=np.array(1.0),
            misc=self.cameras.misc(self.data),
        )

    def render(self, size: tuple[int, int], camera: str = "front") -> np.ndarray:
        if size not in self._viewer_renderers:
            self._viewer_renderers[size] = mujoco.Renderer(self.model, height=size[0], width=size[1])
        renderer = self._viewer_renderers[size]
        renderer.update_scene(self.data, camera)
        return renderer.render()

    def close(self):
        self.cameras.close()
        for renderer in self._viewer_renderers.values():
            renderer.close()
        self._viewer_renderers.clear()
