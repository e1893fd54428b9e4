"""The Franka Panda in the embedded scene: joint state, inverse kinematics and grasping.

The arm is moved kinematically: each env step interpolates the joints to their target over the
physics sub-steps (RLBench's joint controllers reach their targets within a step), so objects feel
the arm's motion through contacts while the recorded joint velocities are exactly the commanded
ones. A graspable object is attached to the hand by a weld when the gripper closes on it and
released when it opens, as RLBench attaches grasped objects.
"""

from __future__ import annotations

import mujoco
import numpy as np

from llarva_gym.action_modes import JOINT_LOWER, JOINT_UPPER  # Franka's published limits

# RLBench's initial arm configuration (0, 10, 0, -50, 0, 70, 45 degrees).
HOME = np.array([0.0, 0.1745, 0.0, -0.8727, 0.0, 1.2217, 0.7854])
FINGER_OPEN = 0.04
FINGER_ON_OBJECT = 0.012


def quat_xyzw_to_mat(quat_xyzw: np.ndarray) -> np.ndarray:
    mat = np.zeros(9)
    mujoco.mju_quat2Mat(mat, np.roll(np.asarray(quat_xyzw, dtype=np.float64), 1))
    return mat.reshape(3, 3)


def mat_to_quat_xyzw(mat: np.ndarray) -> np.ndarray:
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.asarray(mat, dtype=np.float64).reshape(9))
    if quat[0] < 0:   # one of the two equal quaternions, so that poses compare bit for bit
        quat = -quat
    return np.roll(quat, -1)


def rotation_error(current: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Axis-angle vector (world frame) that turns `current` into `target` (both 3x3)."""
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, (target @ current.T).reshape(9))
    velocity = np.zeros(3)
    mujoco.mju_quat2Vel(velocity, quat, 1.0)
    return velocity


class Panda:
    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData):
        self.model, self.data = model, data
        self.arm_qpos = np.array([model.joint(f"panda_joint{i}").qposadr[0] for i in range(1, 8)])
        self.arm_qvel = np.array([model.joint(f"panda_joint{i}").dofadr[0] for i in range(1, 8)])
        self.finger_qpos = np.array([model.joint(f"panda_finger_joint{i}").qposadr[0] for i in (1, 2)])
        self.finger_qvel = np.array([model.joint(f"panda_finger_joint{i}").dofadr[0] for i in (1, 2)])
        self.tcp = model.site("tcp").id
        self.hand = model.body("panda_hand").id
        self.grasp_region = model.geom("grasp_region").id
        self._scratch = mujoco.MjData(model)   # for IK, so the simulation state is never touched
        self._jacp, self._jacr = np.zeros((3, model.nv)), np.zeros((3, model.nv))
        self.gripper_open = 1.0
        self.grasped: str | None = None
        self.joint_velocities = np.zeros(7)

    # --- state -------------------------------------------------------------------------------
    @property
    def joint_positions(self) -> np.ndarray:
        return self.data.qpos[self.arm_qpos].copy()

    def gripper_pose(self) -> np.ndarray:
        """xyz and quaternion xyzw of the gripper tip, as RLBench's `gripper_pose`."""
        return np.concatenate([self.data.site_xpos[self.tcp], mat_to_quat_xyzw(self.data.site_xmat[self.tcp])])

    def gripper_matrix(self) -> np.ndarray:
        pose = np.eye(4)
        pose[:3, :3] = self.data.site_xmat[self.tcp].reshape(3, 3)
        pose[:3, 3] = self.data.site_xpos[self.tcp]
        return pose

    def gripper_joint_positions(self) -> np.ndarray:
        return self.data.qpos[self.finger_qpos].copy()

    def reset(self, joint_positions: np.ndarray = HOME):
        self.data.qpos[self.arm_qpos] = joint_positions
        self.data.qvel[self.arm_qvel] = 0
        self.data.qpos[self.finger_qpos] = FINGER_OPEN
        self.data.qvel[self.finger_qvel] = 0
        self.gripper_open, self.grasped = 1.0, None
        self.joint_velocities = np.zeros(7)
        for eq in range(self.model.neq):
            if self.model.eq(eq).name.startswith("grasp_"):
                self.data.eq_active[eq] = 0

    # --- kinematics --------------------------------------------------------------------------
    def forward_kinematics(self, joint_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scratch = self._scratch
        scratch.qpos[:] = self.data.qpos
        scratch.qpos[self.arm_qpos] = joint_positions
        mujoco.mj_kinematics(self.model, scratch)
        return scratch.site_xpos[self.tcp].copy(), scratch.site_xmat[self.tcp].reshape(3, 3).copy()

    def solve_ik(self, position: np.ndarray, rotation: np.ndarray, initial: np.ndarray | None = None,
                 iterations: int = 60, tolerance: tuple[float, float] = (1e-4, 1e-3)):
        """Damped least squares on the gripper tip. Returns (joint_positions, converged)."""
        model, scratch = self.model, self._scratch
        q = (self.joint_positions if initial is None else np.array(initial, dtype=np.float64)).copy()
        scratch.qpos[:] = self.data.qpos
        damping = 1e-3
        for _ in range(iterations):
            scratch.qpos[self.arm_qpos] = q
            mujoco.mj_kinematics(model, scratch)
            mujoco.mj_comPos(model, scratch)
            pos_err = position - scratch.site_xpos[self.tcp]
            rot_err = rotation_error(scratch.site_xmat[self.tcp].reshape(3, 3), rotation)
            if np.linalg.norm(pos_err) < tolerance[0] and np.linalg.norm(rot_err) < tolerance[1]:
                return q, True
            mujoco.mj_jacSite(model, scratch, self._jacp, self._jacr, self.tcp)
            jac = np.vstack([self._jacp[:, self.arm_qvel], self._jacr[:, self.arm_qvel]])
            err = np.concatenate([pos_err, rot_err])
            dq = jac.T @ np.linalg.solve(jac @ jac.T + damping * np.eye(6), err)
            q = np.clip(q + dq, JOINT_LOWER, JOINT_UPPER)
        scratch.qpos[self.arm_qpos] = q
        mujoco.mj_kinematics(model, scratch)
        pos_ok = np.linalg.norm(position - scratch.site_xpos[self.tcp]) < 1e-3
        rot_ok = np.linalg.norm(rotation_error(scratch.site_xmat[self.tcp].reshape(3, 3), rotation)) < 1e-2
        return q, bool(pos_ok and rot_ok)

    # --- motion ------------------------------------------------------------------------------
    def move(self, target: np.ndarray, gripper_open: float, substeps: int, dt: float,
             graspable: tuple[str, ...]):
        """Move the arm to `target` joint positions over one control period, operating the gripper."""
        start = self.joint_positions
        velocity = (target - start) / dt
        closing = gripper_open < 0.5 <= self.gripper_open
        opening = gripper_open >= 0.5 > self.gripper_open
        if opening and self.grasped is not None:
            self._release()
        finger_start = self.data.qpos[self.finger_qpos[0]]
        finger_goal = FINGER_OPEN if gripper_open >= 0.5 else (FINGER_ON_OBJECT if self.grasped else 0.0)
        for k in range(1, substeps + 1):
            self.data.qpos[self.arm_qpos] = start + (target - start) * k / substeps
            self.data.qvel[self.arm_qvel] = velocity
            self.data.qpos[self.finger_qpos] = finger_start + (finger_goal - finger_start) * k / substeps
            self.data.qvel[self.finger_qvel] = 0
            mujoco.mj_step(self.model, self.data)
        self.data.qpos[self.arm_qpos] = target
        self.data.qvel[self.arm_qvel] = 0
        mujoco.mj_forward(self.model, self.data)
        self.joint_velocities = velocity
        self.gripper_open = 1.0 if gripper_open >= 0.5 else 0.0
        if closing and self.grasped is None:
            self._try_grasp(graspable)

    def _try_grasp(self, graspable: tuple[str, ...]):
        for body in graspable:
            body_id = self.model.body(body).id
            for geom in range(self.model.body_geomadr[body_id], self.model.body_geomadr[body_id] + self.model.body_geomnum[body_id]):
                if mujoco.mj_geomDistance(self.model, self.data, self.grasp_region, geom, 0.01, None) <= 0:
                    self._attach(body)
                    return

    def _attach(self, body: str):
        model, data = self.model, self.data
        body_id = model.body(body).id
        # Let go of whatever held the object before (a holder weld), as RLBench reparents it.
        for eq in range(model.neq):
            if data.eq_active[eq] and body_id in (model.eq_obj1id[eq], model.eq_obj2id[eq]):
                data.eq_active[eq] = 0
        weld = model.eq(f"grasp_{body}").id
        hand_pos, hand_mat = data.xpos[self.hand], data.xmat[self.hand].reshape(3, 3)
        rel_pos = hand_mat.T @ (data.xpos[body_id] - hand_pos)
        rel_quat = np.zeros(4)
        mujoco.mju_mat2Quat(rel_quat, (hand_mat.T @ data.xmat[body_id].reshape(3, 3)).reshape(9))
        model.eq_data[weld, 3:6] = rel_pos
        model.eq_data[weld, 6:10] = rel_quat
        data.eq_active[weld] = 1
        self.grasped = body
        self.data.qpos[self.finger_qpos] = FINGER_ON_OBJECT

    def _release(self):
        self.data.eq_active[self.model.eq(f"grasp_{self.grasped}").id] = 0
        self.grasped = None
