"""Wrappers for libraries that cannot hold a Text space (Stable-Baselines3's vector envs)."""

import gymnasium as gym
import numpy as np
from gymnasium import spaces


def encode_instruction(text: str, max_length: int = 256) -> np.ndarray:
    data = text.encode("utf-8")
    if len(data) > max_length:
        raise ValueError(f"instruction: {len(data)} UTF-8 bytes; at most {max_length} fit")
    array = np.zeros(max_length, dtype=np.uint8)
    array[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    return array


def decode_instruction(array) -> str:
    """The text of an `EncodeInstruction` byte array (zero padded UTF-8)."""
    data = np.asarray(array, dtype=np.uint8).tobytes()
    return data.split(b"\0", 1)[0].decode("utf-8")


class EncodeInstruction(gym.ObservationWrapper):
    """`instruction` becomes a zero-padded UTF-8 byte array, `Box(0, 255, (max_length,), uint8)`."""

    def __init__(self, env: gym.Env, max_length: int = 256):
        super().__init__(env)
        self.max_length = max_length
        self.observation_space = spaces.Dict({
            **{k: v for k, v in env.observation_space.spaces.items() if k != "instruction"},
            "instruction": spaces.Box(0, 255, (max_length,), np.uint8),
        })

    def observation(self, observation):
        return {**observation, "instruction": encode_instruction(observation["instruction"], self.max_length)}
