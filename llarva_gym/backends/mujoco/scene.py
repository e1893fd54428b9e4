"""Build the MuJoCo model of a task's scene and render RLBench's cameras from it.

The scene itself is data (`assets/panda_scene.xml`); a task adds its objects as an MJCF fragment.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import mujoco
import numpy as np

from llarva_gym.observation import ObservationConfig

SCENE_XML = Path(__file__).parent / "assets" / "panda_scene.xml"
TABLE_HEIGHT = 0.752   # RLBench's table top, metres above the floor
CONTROL_PERIOD = 0.05  # seconds per env step, as RLBench


@lru_cache(maxsize=1)
def franka_mesh_dir() -> Path:
    """The Franka Panda meshes that gymnasium-robotics ships (found without importing it: its
    import is slow and prints warnings)."""
    spec = importlib.util.find_spec("gymnasium_robotics")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The embedded simulator needs the Franka Panda meshes from "
                          "gymnasium-robotics: pip install 'gymnasium-robotics>=1.3,<1.5'")
    mesh_dir = Path(spec.submodule_search_locations[0]) / "envs/assets/kitchen_franka/franka_assets/meshes"
    if not (mesh_dir / "collision" / "link0.stl").exists():
        raise FileNotFoundError(f"Franka Panda meshes not found at {mesh_dir}: this gymnasium-robotics "
                                "version lays out its assets differently; install gymnasium-robotics 1.4.x")
    return mesh_dir


def scene_xml(task_xml: str, graspable: tuple[str, ...], quality: str = "fast") -> str:
    """The full MJCF text: the robot scene, the task's objects, and one (inactive) weld per graspable
    body that attaches it to the hand when grasped."""
    # "high": a 1024 px shadow map, not MuJoCo's 4096: the same shadows in a 128 px image (mean
    # pixel difference 0.04) at a quarter of the recording time on a CPU renderer.
    shadow, samples = (0, 0) if quality == "fast" else (1024, 4)
    xml = SCENE_XML.read_text()
    for key, value in {"meshdir": franka_mesh_dir(), "shadowsize": shadow, "offsamples": samples}.items():
        xml = xml.replace("{" + key + "}", str(value))
    welds = "".join(f'<weld name="grasp_{body}" body1="panda_hand" body2="{body}" active="false" '
                    f'solref="0.004 1"/>' for body in graspable)
    extra = task_xml + (f"<equality>{welds}</equality>" if welds else "")
    return xml.replace("</mujoco>", extra + "</mujoco>")


def build_model(task_xml: str, graspable: tuple[str, ...] = (), quality: str = "fast") -> mujoco.MjModel:
    return mujoco.MjModel.from_xml_string(scene_xml(task_xml, graspable, quality))


class Cameras:
    """Renders the configured RLBench cameras and reports their matrices in RLBench's conventions."""

    def __init__(self, model: mujoco.MjModel, config: ObservationConfig):
        self.model, self.config = model, config
        self._renderer: mujoco.Renderer | None = None   # made on first use: a GL context made
        # before a fork (a vector env's parent making its spaces) hangs the forked workers
        self.near = float(model.vis.map.znear * model.stat.extent)
        self.far = float(model.vis.map.zfar * model.stat.extent)

    def render(self, data: mujoco.MjData) -> dict[str, np.ndarray]:
        if self._renderer is None:
            height, width = self.config.image_size
            self._renderer = mujoco.Renderer(self.model, height=height, width=width)
        images = {}
        for camera in self.config.cameras:
            self._renderer.update_scene(data, camera)
            if self.config.rgb:
                images[f"{camera}_rgb"] = self._renderer.render()
            if self.config.depth:
                self._renderer.enable_depth_rendering()
                images[f"{camera}_depth"] = self._renderer.render().astype(np.float32)
                self._renderer.disable_depth_rendering()
            if self.config.mask:
                self._renderer.enable_segmentation_rendering()
                # (H, W, 2): object id and object type; RLBench's mask is one id per pixel.
                images[f"{camera}_mask"] = self._renderer.render()[..., 0].astype(np.int32)
                self._renderer.disable_segmentation_rendering()
        return images

    def intrinsics(self, camera: str) -> np.ndarray:
        """PyRep's convention: negative focal lengths, principal point at the image centre."""
        height, width = self.config.image_size
        fovy = np.deg2rad(self.model.cam(camera).fovy[0])
        focal = -(height / 2) / np.tan(fovy / 2)
        return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=np.float64)

    def extrinsics(self, data: mujoco.MjData, camera: str) -> np.ndarray:
        """Camera-to-world pose of PyRep's camera frame (optical axis +z). MuJoCo's camera looks
        along -z with y up; PyRep's is the same frame turned half a turn about y."""
        cam = data.cam(camera)
        rotation = cam.xmat.reshape(3, 3) @ np.diag([-1.0, 1.0, -1.0])
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = rotation, cam.xpos
        return pose

    def misc(self, data: mujoco.MjData) -> dict:
        misc = {}
        for camera in self.config.cameras:
            misc[f"{camera}_camera_extrinsics"] = self.extrinsics(data, camera)
            misc[f"{camera}_camera_intrinsics"] = self.intrinsics(camera)
            misc[f"{camera}_camera_near"] = self.near
            misc[f"{camera}_camera_far"] = self.far
        return misc

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
