"""LlarvaAgent (llarva_policy.yarr) over a STAND-IN `yarr` module tree.

YARR is not installed on the project's machines. The stand-in below exists only in this file,
only while a test runs (the `standin_yarr` fixture puts it in sys.modules and removes it after).
It follows stepjam/YARR's `yarr/agents/agent.py`: the abstract `Agent` (build, update, act, reset,
update_summaries, act_summaries, load_weights, save_weights), `ActResult(action,
observation_elements, replay_elements, info)` and the Summary classes. Observations are shaped as
YARR's RolloutGenerator hands them to `act`: torch tensors of (1, timesteps, ...), images channels
first. The policy inside is the real LlarvaPolicy on a tiny random LLaVA (CPU), or a recording
stand-in where the test is about what reaches `predict`.
"""

import importlib
import sys
import types
from abc import ABC, abstractmethod

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LogitsProcessor  # noqa: E402

from llarva_policy import LlarvaPolicy  # noqa: E402
from llarva_policy.codec import build_prompt, build_question, format_history  # noqa: E402
from llarva_policy.model import load_llava, make_random_llava  # noqa: E402

ANSWER = "The next action step: [0.5, 0, 0, 0, -1, 0, 0, 0]"      # short: forced decoding is token by token
ANSWER_ACTION = np.array([0.5, 0, 0, 0, -1, 0, 0, 0], dtype=np.float32)
GOAL = "sweep dirt to the short dustpan"


# --- the stand-in (tests only): stepjam/YARR yarr/agents/agent.py ----------------------------------
class Summary:
    def __init__(self, name, value):
        self.name, self.value = name, value


class ScalarSummary(Summary):
    pass


class ActResult:
    def __init__(self, action, observation_elements=None, replay_elements=None, info=None):
        self.action = action
        self.observation_elements = observation_elements or {}
        self.replay_elements = replay_elements or {}
        self.info = info or {}


class Agent(ABC):
    @abstractmethod
    def build(self, training, device=None): ...

    @abstractmethod
    def update(self, step, replay_sample): ...

    @abstractmethod
    def act(self, step, observation, deterministic): ...

    def reset(self):
        pass

    @abstractmethod
    def update_summaries(self): ...

    @abstractmethod
    def act_summaries(self): ...

    @abstractmethod
    def load_weights(self, savedir): ...

    @abstractmethod
    def save_weights(self, savedir): ...


@pytest.fixture
def yarr_module(monkeypatch):
    """`llarva_policy.yarr`, imported fresh against the stand-in YARR; both are removed afterwards."""
    agent_module = types.ModuleType("yarr.agents.agent", "stand-in for tests only: not the real package")
    agent_module.__dict__.update(Agent=Agent, ActResult=ActResult, Summary=Summary, ScalarSummary=ScalarSummary)
    package, agents = types.ModuleType("yarr"), types.ModuleType("yarr.agents")
    package.__path__, agents.__path__ = [], []
    package.agents, agents.agent = agents, agent_module
    for module in (package, agents, agent_module):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.delitem(sys.modules, "llarva_policy.yarr", raising=False)
    module = importlib.import_module("llarva_policy.yarr")
    yield module
    sys.modules.pop("llarva_policy.yarr", None)


class ForceAnswer(LogitsProcessor):
    """Makes greedy decoding write `answer`, then end-of-sequence (fresh per predict call)."""

    def __init__(self, tokenizer, answer):
        self.tokens, self.eos, self.prompt_length = tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id, None

    def __call__(self, input_ids, scores):
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[step] if step < len(self.tokens) else self.eos] = 0.0
        return forced


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_random_llava(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_llava(tiny_dir, device="cpu")


def yarr_observation(frames, joints, low_dim=False):
    """What YARR's RolloutGenerator passes to act: {key: tensor (1, T, ...)}, images (3, H, W)."""
    rgb = torch.tensor(np.stack([frame.transpose(2, 0, 1) for frame in frames]))[None]
    joints = np.stack(joints).astype(np.float32)
    if not low_dim:
        return {"front_rgb": rgb, "joint_positions": torch.tensor(joints)[None]}
    # RLBench's get_low_dim_data order: gripper_open, joint velocities, joint positions, forces, gripper pose
    state = np.concatenate([np.ones((len(joints), 1)), np.full((len(joints), 7), 0.5), joints,
                            np.zeros((len(joints), 7)), np.zeros((len(joints), 7))], axis=1).astype(np.float32)
    return {"front_rgb": rgb, "low_dim_state": torch.tensor(state)[None]}


def frame(value, size=32):
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0], image[0, 0, 1] = value, 255       # not symmetric: a transposed image would differ
    return image


class RecordingPolicy:
    """A stand-in for LlarvaPolicy: records what predict receives, answers the step count."""

    def __init__(self):
        self.calls = []

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        self.calls.append(dict(observation=observation, state=state, episode_start=episode_start,
                               deterministic=deterministic))
        steps = 1 if state is None else state + 1
        return np.r_[np.full(7, 0.01 * steps), 1.0].astype(np.float32), steps


# --- tests -----------------------------------------------------------------------------------------
def test_without_yarr_the_import_error_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "yarr", None)
    monkeypatch.delitem(sys.modules, "llarva_policy.yarr", raising=False)
    with pytest.raises(ImportError, match=r"needs YARR \(the `yarr` package\).*pip install git\+https://github.com/stepjam/YARR"):
        importlib.import_module("llarva_policy.yarr")
    sys.modules.pop("llarva_policy.yarr", None)


def test_agent_implements_yarrs_abstract_interface(yarr_module):
    agent = yarr_module.LlarvaAgent(RecordingPolicy())     # abstract methods left out would raise TypeError
    assert isinstance(agent, Agent)
    agent.build(training=False, device="cpu")
    assert agent.update_summaries() == [] and agent.act_summaries() == []
    with pytest.raises(NotImplementedError, match="llarva finetune"):
        agent.update(0, {})
    with pytest.raises(NotImplementedError, match="llarva finetune"):
        agent.build(training=True, device="cpu")


def test_act_feeds_the_newest_frame_and_keeps_history_until_reset(yarr_module):
    policy = RecordingPolicy()
    agent = yarr_module.LlarvaAgent(policy, lang_goal=GOAL)
    agent.build(training=False)
    agent.reset()
    joints = [np.full(7, 0.1), np.full(7, 0.2)]
    result = agent.act(5, yarr_observation([frame(10), frame(20)], joints), deterministic=True)
    assert isinstance(result, ActResult)
    assert result.action.dtype == np.float32 and result.action.shape == (8,)
    np.testing.assert_allclose(result.action, np.r_[np.full(7, 0.01), 1.0])
    seen = policy.calls[-1]
    np.testing.assert_array_equal(seen["observation"]["front_rgb"], frame(20))      # newest, (H, W, 3)
    np.testing.assert_array_equal(seen["observation"]["joint_positions"], joints[1].astype(np.float32))
    assert seen["observation"]["instruction"] == GOAL
    assert seen["state"] is None and seen["episode_start"] is True and seen["deterministic"] is True

    result = agent.act(6, yarr_observation([frame(20), frame(30)], joints[::-1]), deterministic=False)
    assert policy.calls[-1]["state"] == 1 and policy.calls[-1]["episode_start"] is False   # history carried
    assert policy.calls[-1]["deterministic"] is False
    np.testing.assert_allclose(result.action[:7], 0.02)
    agent.reset()
    agent.act(7, yarr_observation([frame(30), frame(40)], joints), deterministic=True)
    assert policy.calls[-1]["state"] is None and policy.calls[-1]["episode_start"] is True


def test_instruction_sources_and_joint_positions_from_low_dim_state(yarr_module):
    policy = RecordingPolicy()
    agent = yarr_module.LlarvaAgent(policy, low_dim_joint_positions=slice(8, 15))
    agent.build(training=False)
    observation = yarr_observation([frame(1), frame(2)], [np.full(7, 0.3), np.arange(7) / 10], low_dim=True)
    with pytest.raises(ValueError, match="needs the task's instruction"):
        agent.act(0, observation, True)
    agent.act(0, {**observation, "lang_goal": np.array([GOAL], dtype=object)}, True)
    assert policy.calls[-1]["observation"]["instruction"] == GOAL
    np.testing.assert_allclose(policy.calls[-1]["observation"]["joint_positions"], np.arange(7) / 10, rtol=1e-6)
    agent.set_lang_goal("reach the red target")
    agent.act(1, observation, True)
    assert policy.calls[-1]["observation"]["instruction"] == "reach the red target"
    # LLARVA's YARR fork: act(step, observation, task_goal, deterministic)
    agent.act(2, observation, "close the jar", False)
    assert policy.calls[-1]["observation"]["instruction"] == "close the jar"
    assert policy.calls[-1]["deterministic"] is False
    # without the slice, an observation with only low_dim_state is refused with the way out
    bare = yarr_module.LlarvaAgent(RecordingPolicy(), lang_goal=GOAL)
    bare.build(training=False)
    with pytest.raises(ValueError, match=r"low_dim_joint_positions=slice\(\.\.\.\)"):
        bare.act(0, observation, True)


def test_with_the_real_policy_actions_and_prompts_follow_llarva(yarr_module, loaded):
    policy = LlarvaPolicy(loaded, max_new_tokens=len(loaded.tokenizer.encode(ANSWER)) + 2)
    agent = yarr_module.LlarvaAgent(policy, lang_goal=GOAL)
    agent.build(training=False, device="cpu")
    agent.reset()
    joints = [np.full(7, 0.1 * (t + 1)) for t in range(7)]
    for t in range(2):
        policy.logits_processor = [ForceAnswer(loaded.tokenizer, ANSWER)]
        result = agent.act(t, yarr_observation([frame(t), frame(t + 1)], [joints[max(t - 1, 0)], joints[t]]), True)
        np.testing.assert_array_equal(result.action, ANSWER_ACTION)
        # the prompt holds this episode's joint positions so far, newest last (five at most: test_policy.py)
        assert result.info["prompt"] == build_prompt(build_question(GOAL, format_history(joints[:t + 1])))
        assert result.info["text"] == ANSWER and result.info["parse_error"] is None
    agent.reset()
    policy.logits_processor = [ForceAnswer(loaded.tokenizer, ANSWER)]
    result = agent.act(7, yarr_observation([frame(9)], [joints[6]]), True)
    assert result.info["prompt"] == build_prompt(build_question(GOAL, format_history([joints[6]])))


def test_weights_load_and_save_through_checkpoint_folders(yarr_module, tiny_dir, tmp_path):
    agent = yarr_module.LlarvaAgent(str(tiny_dir), lang_goal=GOAL, on_parse_error="hold", max_new_tokens=4)
    with pytest.raises(RuntimeError, match="call build"):
        agent.act(0, yarr_observation([frame(1)], [np.zeros(7)]), True)
    agent.build(training=False, device="cpu")          # loads the checkpoint
    assert isinstance(agent.policy, LlarvaPolicy) and agent.policy.on_parse_error == "hold"
    saved = tmp_path / "saved"
    agent.save_weights(str(saved))
    assert (saved / "config.json").is_file()
    other = yarr_module.LlarvaAgent(str(tiny_dir), lang_goal=GOAL, max_new_tokens=4, on_parse_error="hold")
    other.build(training=False, device="cpu")
    other.load_weights(str(saved))
    assert other.path == str(saved)
    a = agent.policy.loaded.model.state_dict()
    b = other.policy.loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = other.act(0, {**yarr_observation([frame(1)], [np.zeros(7)]),
                           "gripper_open": torch.ones(1, 1, 1)}, True)
    assert result.action.shape == (8,) and np.isfinite(result.action).all()


def test_bad_construction_is_refused_clearly(yarr_module):
    with pytest.raises(TypeError, match="checkpoint folder or a policy with predict"):
        yarr_module.LlarvaAgent(42)
    with pytest.raises(ValueError, match="already loaded"):
        yarr_module.LlarvaAgent(RecordingPolicy(), device="cpu")
    with pytest.raises(TypeError, match="low_dim_joint_positions: expected a slice"):
        yarr_module.LlarvaAgent(RecordingPolicy(), low_dim_joint_positions=(8, 15))
    agent = yarr_module.LlarvaAgent(RecordingPolicy(), lang_goal=GOAL)
    with pytest.raises(ValueError, match="no 'front_rgb'"):
        agent.act(0, {"joint_positions": torch.zeros(1, 1, 7)}, True)
    with pytest.raises(ValueError, match="expected uint8 RGB"):
        agent.act(0, {"front_rgb": torch.zeros(1, 1, 3, 8, 8), "joint_positions": torch.zeros(1, 1, 7)}, True)
