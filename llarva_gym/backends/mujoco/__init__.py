"""The embedded simulator: RLBench tasks re-created on MuJoCo."""

import ctypes.util
import os

# MuJoCo picks its OpenGL platform when it is imported. With no screen, render offscreen: EGL
# (GPU or Mesa's llvmpipe) where libEGL exists, else OSMesa. A user's own MUJOCO_GL wins.
if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "egl" if ctypes.util.find_library("EGL") else "osmesa"
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
