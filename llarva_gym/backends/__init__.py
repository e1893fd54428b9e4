"""Simulator backends: `mujoco` (embedded, default) and `rlbench` (real RLBench, optional)."""
