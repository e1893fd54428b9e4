"""The embedded simulator: RLBench tasks re-created on MuJoCo."""

import ctypes.util
import importlib
import os
import sys


def _choose_offscreen_gl() -> None:
    """With no screen, render offscreen: EGL (a GPU or Mesa's llvmpipe) where libEGL exists, else
    OSMesa. MuJoCo picks its OpenGL platform when imported; a user's own MUJOCO_GL wins."""
    # Mesa's software rasteriser renders a 128x128 frame as fast on the calling thread as with
    # helper threads, and without them a process that has rendered can fork safely (vector envs).
    os.environ.setdefault("LP_NUM_THREADS", "0")
    if "MUJOCO_GL" in os.environ or os.environ.get("DISPLAY"):
        return
    platform = "egl" if ctypes.util.find_library("EGL") else "osmesa"
    os.environ["MUJOCO_GL"] = platform
    os.environ.setdefault("PYOPENGL_PLATFORM", platform)
    if "mujoco" in sys.modules:
        # mujoco was imported before us and chose GLFW, which needs a screen: swap the context class.
        from mujoco.rendering.classic import gl_context
        gl_context.GLContext = importlib.import_module(f"mujoco.{platform}").GLContext


_choose_offscreen_gl()
