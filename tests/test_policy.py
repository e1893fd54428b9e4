"""LlarvaPolicy on tiny random LLaVA models (CPU): prompts, history, batching, parsing, SB3 and LeRobot use."""

import gymnasium as gym
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LogitsProcessor  # noqa: E402

import llarva_gym  # noqa: E402,F401
from llarva_gym import EncodeInstruction, make_vec  # noqa: E402
from llarva_policy import LlarvaPolicy  # noqa: E402
from llarva_policy.codec import AnswerParseError, build_prompt, build_question, format_history  # noqa: E402
from llarva_policy.model import CheckpointError, build_tokenizer, load_llava, make_random_llava  # noqa: E402

ANSWER = "The next action step: [0.0123, -0.0456, 0.0, 1.0, -2.1, 0.5, -0.0001, 0.0]"
ANSWER_ACTION = np.array([0.0123, -0.0456, 0.0, 1.0, -2.1, 0.5, -0.0001, 0.0], dtype=np.float32)
# Joint 0 at 3.5 rad/s is beyond the Panda's 2.175 limit, the gripper beyond 1: both are clipped.
WILD_ANSWER = "The next action step: [3.5, 0.25, -0.5, 0.0, 0.0, 0.0, -9.0, 1.7]"
WILD_ACTION = np.array([2.175, 0.25, -0.5, 0.0, 0.0, 0.0, -2.61, 1.0], dtype=np.float32)
TRACE = [[64, 12], [63, 15], [0, 127]]
TRACE_ANSWER = f"The visual trace of the end effector: {TRACE}. " + ANSWER


class ForceAnswers(LogitsProcessor):
    """Makes greedy decoding write `answers[row]` token by token, then end-of-sequence.

    Made fresh for each predict() call: it counts generated tokens from the first call's length.
    """

    def __init__(self, tokenizer, answers):
        self.rows = [tokenizer.encode(answer, add_special_tokens=False) for answer in answers]
        self.eos = tokenizer.eos_token_id
        self.prompt_length = None

    def __call__(self, input_ids, scores):
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        for row, tokens in enumerate(self.rows):
            forced[row, tokens[step] if step < len(tokens) else self.eos] = 0.0
        return forced


def force(policy, *answers):
    processor = ForceAnswers(policy.loaded.tokenizer, answers)
    policy.logits_processor = [processor]
    policy.max_new_tokens = max(map(len, processor.rows)) + 1    # room for the answer and </s>


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread, and OpenMP threads spin (burning CPU) on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_random_llava(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_llava(tiny_dir, device="cpu")


@pytest.fixture
def policy(loaded):
    """A random model writes junk: hold on it, and keep answers short."""
    return LlarvaPolicy(loaded, on_parse_error="hold", max_new_tokens=6)


@pytest.fixture(scope="module")
def env():
    env = gym.make("llarva/reach_target")
    yield env
    env.close()


def fake_observation(joints, instruction="reach the red target", gripper=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return {"front_rgb": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
            "joint_positions": np.asarray(joints, dtype=np.float32),
            "gripper_open": np.array([gripper], dtype=np.float32), "instruction": instruction}


def stack(observations):
    keys = set.intersection(*(set(o) for o in observations))
    return {key: (tuple(o[key] for o in observations) if key == "instruction"
                  else np.stack([o[key] for o in observations])) for key in keys}


def expected_prompt(instruction, steps, visual_trace=False):
    return build_prompt(build_question(instruction, format_history(steps), visual_trace=visual_trace))


# --- actions -----------------------------------------------------------------------------------------

def test_forced_answer_gives_exactly_that_action(policy, env):
    obs, _ = env.reset(seed=0)
    force(policy, ANSWER)
    action, state = policy.predict(obs, episode_start=True)
    assert action.dtype == np.float32 and action.shape == (8,)
    np.testing.assert_array_equal(action, ANSWER_ACTION)
    assert policy.last_info[0]["text"] == ANSWER and policy.last_info[0]["parse_error"] is None
    assert state.shape == (1, 5, 7)
    env.step(action)   # the env accepts it


def test_batch_gets_one_answer_per_row_and_actions_are_clipped(policy):
    envs = make_vec("llarva/reach_target", 2, asynchronous=False)
    try:
        obs, _ = envs.reset(seed=1)
        assert isinstance(obs["instruction"], tuple)
        force(policy, WILD_ANSWER, ANSWER)
        actions, state = policy.predict(obs, episode_start=np.ones(2, dtype=bool))
        assert actions.shape == (2, 8) and actions.dtype == np.float32
        np.testing.assert_array_equal(actions[0], WILD_ACTION)
        np.testing.assert_array_equal(actions[1], ANSWER_ACTION)
        assert state.shape == (2, 5, 7)
        envs.step(actions)
    finally:
        envs.close()


def test_random_model_actions_are_valid_for_single_and_batched_observations(policy, env):
    obs, _ = env.reset(seed=2)
    action, _ = policy.predict(obs)
    assert env.action_space.contains(action)
    batch = stack([obs, fake_observation(obs["joint_positions"], gripper=0.0, seed=3)])
    actions, _ = policy.predict(batch)
    assert actions.shape == (2, 8) and all(env.action_space.contains(a) for a in actions)
    assert [info["text"] for info in policy.last_info] != ["", ""]


def test_visual_trace_is_asked_for_and_reported(loaded):
    policy = LlarvaPolicy(loaded, with_visual_trace=True, max_new_tokens=60)
    obs = fake_observation(np.zeros(7) + 0.1)
    force(policy, TRACE_ANSWER)
    action, _ = policy.predict(obs)
    np.testing.assert_array_equal(action, ANSWER_ACTION)
    info = policy.last_info[0]
    assert "Can you predict the 2D visual trace of the end effector and the action of the next 1 step?" in info["prompt"]
    np.testing.assert_array_equal(info["trace"], TRACE)


@pytest.mark.parametrize("method", ["hf", "fast"])
def test_constrained_visual_trace_answers_from_a_random_model_always_parse(loaded, method):
    policy = LlarvaPolicy(loaded, with_visual_trace=True, constrained=True, on_parse_error="raise",
                          max_new_tokens=160, generation_method=method)
    obs = stack([fake_observation(np.full(7, 0.1 * i), instruction, seed=i)
                 for i, instruction in enumerate(["reach the red target", "sweep dirt to the dustpan", "open it"])])
    state = None
    for step in range(2):
        actions, state = policy.predict(obs, state=state, episode_start=step == 0)   # raises if one does not parse
        assert actions.shape == (3, 8) and np.isfinite(actions).all()
        for info in policy.last_info:
            assert info["parse_error"] is None
            assert info["text"].startswith("The visual trace of the end effector: [[")
            assert info["trace"].ndim == 2 and info["trace"].shape[1] == 2 and (info["trace"] >= 0).all()


# --- malformed answers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("junk", ["The next action step: [0.1, 0.2]", "sweep sweep sweep", ANSWER + " and more"])
def test_malformed_answer_raises_with_the_text(loaded, junk):
    policy = LlarvaPolicy(loaded, on_parse_error="raise", max_new_tokens=40)
    force(policy, junk)
    with pytest.raises(AnswerParseError) as caught:
        policy.predict(fake_observation(np.zeros(7)))
    assert junk[:20] in str(caught.value) and caught.value.text == junk
    assert policy.last_info[0]["text"] == junk


def test_malformed_answer_holds_position_and_gripper(policy):
    obs = [fake_observation(np.zeros(7), gripper=0.0), fake_observation(np.zeros(7), gripper=1.0, seed=1)]
    force(policy, "sweep sweep", ANSWER)
    actions, _ = policy.predict(stack(obs))
    np.testing.assert_array_equal(actions[0], np.zeros(8))                 # closed gripper stays closed
    np.testing.assert_array_equal(actions[1], ANSWER_ACTION)               # the other env is unaffected
    assert "no 'The next action step: [...]'" in policy.last_info[0]["parse_error"]
    assert policy.last_info[0]["text"] == "sweep sweep" and policy.last_info[1]["parse_error"] is None
    force(policy, "junk")
    action, _ = policy.predict(fake_observation(np.zeros(7), gripper=1.0))
    np.testing.assert_array_equal(action, [0, 0, 0, 0, 0, 0, 0, 1])       # open gripper stays open


def test_bad_arguments_and_observations(loaded, policy):
    with pytest.raises(ValueError, match="on_parse_error"):
        LlarvaPolicy(loaded, on_parse_error="ignore")
    with pytest.raises(ValueError, match="history_noise"):
        LlarvaPolicy(loaded, history_noise=-1)
    obs = fake_observation(np.zeros(7))
    with pytest.raises(ValueError, match=r"missing \['joint_positions'\]"):
        policy.predict({k: v for k, v in obs.items() if k != "joint_positions"})
    with pytest.raises(ValueError, match="front_rgb"):
        policy.predict({**obs, "front_rgb": obs["front_rgb"].astype(np.float32)})
    with pytest.raises(ValueError, match="state"):
        policy.predict(obs, state=np.zeros((2, 5, 7)))
    with pytest.raises(ValueError, match="instruction"):
        policy.predict({**stack([obs, obs]), "instruction": ("only one",)})


# --- history and prompts ------------------------------------------------------------------------------

def test_history_follows_the_five_step_rule_across_episode_starts(policy):
    joints = [np.full(7, 0.1 * (t + 1)) for t in range(8)]
    instructions = ("reach the red target", "reach the blue target")
    state = None
    for t in range(8):
        batch = stack([fake_observation(joints[t], instructions[0]),
                       fake_observation(-joints[t], instructions[1])])
        # env 0 starts at t=0 only; env 1 starts again at t=6
        prompts, state = policy.build_prompts(batch, state, episode_start=[t == 0, t in (0, 6)])
        assert prompts[0] == expected_prompt(instructions[0], joints[max(0, t - 4):t + 1])
        env1_start = 6 if t >= 6 else 0
        assert prompts[1] == expected_prompt(instructions[1], [-j for j in joints[max(env1_start, t - 4):t + 1]])
    # the exact text of a padded history, written out
    prompts, _ = policy.build_prompts(fake_observation(np.arange(7) / 10), episode_start=True)
    zeros = "[0, 0, 0, 0, 0, 0, 0]"
    assert f"steps are [{zeros}, {zeros}, {zeros}, {zeros}, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]." in prompts[0]


def test_predict_threads_state_and_leaves_the_callers_state_alone(policy):
    first = fake_observation(np.full(7, 0.5))
    _, state = policy.predict(first, episode_start=True)
    kept = state.copy()
    prompts, _ = policy.build_prompts(fake_observation(np.full(7, 0.7)), state)
    _, new_state = policy.predict(fake_observation(np.full(7, 0.7)), state)
    np.testing.assert_array_equal(state, kept)
    assert policy.last_info[0]["prompt"] == prompts[0] == expected_prompt(
        "reach the red target", [np.full(7, 0.5), np.full(7, 0.7)])
    assert new_state.shape == (1, 5, 7)


def test_encoded_instructions_read_like_strings(policy):
    env = EncodeInstruction(gym.make("llarva/reach_target"))
    obs, _ = env.reset(seed=0)
    assert obs["instruction"].dtype == np.uint8
    prompts, _ = policy.build_prompts(obs)
    assert f'The task is "{env.unwrapped.task_description}"' in prompts[0]
    batch = {**stack([obs, obs]), "instruction": np.stack([obs["instruction"]] * 2)}
    assert len(set(policy.build_prompts(batch)[0])) == 1
    env.close()


def test_history_noise_only_when_not_deterministic(loaded):
    policy = LlarvaPolicy(loaded, history_noise=0.01, seed=0)
    obs = fake_observation(np.full(7, 0.25))
    clean = expected_prompt("reach the red target", [np.full(7, 0.25)])
    assert policy.build_prompts(obs)[0][0] == clean
    noisy = policy.build_prompts(obs, deterministic=False)[0][0]
    again = LlarvaPolicy(loaded, history_noise=0.01, seed=0).build_prompts(obs, deterministic=False)[0][0]
    assert noisy != clean and noisy == again


# --- Stable-Baselines3 and LeRobot ----------------------------------------------------------------------

def test_stable_baselines3_evaluate_policy(policy):
    from stable_baselines3.common.evaluation import evaluate_policy
    env = EncodeInstruction(gym.make("llarva/reach_target", max_episode_steps=3))
    rewards, lengths = evaluate_policy(policy, env, n_eval_episodes=2, return_episode_rewards=True, warn=False)
    assert lengths == [3, 3] and rewards == [0.0, 0.0]
    # The last prompt is step 3 of the second episode: SB3's episode_start cleared the first one's steps.
    assert policy.last_info[0]["prompt"].count("[0, 0, 0, 0, 0, 0, 0]") == 2
    env.close()


def test_lerobot_style_select_action_keeps_its_own_history(policy, env):
    obs, _ = env.reset(seed=4)
    policy.reset()
    for step in range(3):
        action = policy.select_action(obs)
        assert action.shape == (8,)
        assert policy.last_info[0]["prompt"].count("[0, 0, 0, 0, 0, 0, 0]") == 4 - step
        obs, *_ = env.step(action)
    policy.reset()
    policy.select_action(obs)
    assert policy.last_info[0]["prompt"].count("[0, 0, 0, 0, 0, 0, 0]") == 4


# --- checkpoints, dtypes, devices ---------------------------------------------------------------------

def test_both_checkpoint_layouts_drive_predict(tmp_path):
    from test_model import write_original_checkpoint   # tests/test_model.py's converter to the original layout
    transformers_dir = make_random_llava(tmp_path / "transformers", seed=1, tokenizer=build_tokenizer(image_token=None))
    transformers_policy = LlarvaPolicy.from_pretrained(transformers_dir, device="cpu", on_parse_error="hold",
                                                       max_new_tokens=12)
    original_dir = write_original_checkpoint(transformers_policy.loaded, build_tokenizer(image_token=None),
                                             tmp_path / "merged", tmp_path / "clip", "openai/clip-vit-large-patch14-336")
    original_policy = LlarvaPolicy.from_pretrained(original_dir, device="cpu", vision_tower=tmp_path / "clip",
                                                   on_parse_error="hold", max_new_tokens=12)
    assert (transformers_policy.loaded.layout, original_policy.loaded.layout) == ("transformers", "original")
    obs = stack([fake_observation(np.full(7, 0.3)), fake_observation(np.full(7, -0.3), "reach the blue target", seed=5)])
    texts = {}
    for policy in (transformers_policy, original_policy):
        policy.predict(obs)
        texts[policy.loaded.layout] = [info["text"] for info in policy.last_info]
        force(policy, ANSWER, WILD_ANSWER)
        actions, _ = policy.predict(obs)
        np.testing.assert_array_equal(actions, np.stack([ANSWER_ACTION, WILD_ACTION]))
    assert texts["transformers"] == texts["original"]     # same weights, same greedy answers


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_on_cpu(tiny_dir, dtype):
    policy = LlarvaPolicy.from_pretrained(tiny_dir, device="cpu", dtype=dtype, max_new_tokens=60)
    assert policy.loaded.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    force(policy, ANSWER)
    action, _ = policy.predict(fake_observation(np.zeros(7)))
    np.testing.assert_array_equal(action, ANSWER_ACTION)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_on_cuda(tiny_dir):
    policy = LlarvaPolicy.from_pretrained(tiny_dir, device="cuda", on_parse_error="hold", max_new_tokens=60)
    assert policy.loaded.device.type == "cuda" and policy.loaded.dtype in (torch.bfloat16, torch.float16)
    obs = stack([fake_observation(np.zeros(7)), fake_observation(np.ones(7) * 0.1, seed=1)])
    actions, _ = policy.predict(obs)   # method "auto": the fast decoder on CUDA
    assert actions.shape == (2, 8)
    force(policy, ANSWER, WILD_ANSWER)
    actions, _ = policy.predict(obs)   # a logits processor: transformers' generate
    np.testing.assert_array_equal(actions, np.stack([ANSWER_ACTION, WILD_ACTION]))


def test_missing_or_broken_checkpoint_gives_a_clear_error(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlarvaPolicy.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        LlarvaPolicy.from_pretrained(tmp_path / "empty", device="cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in tiny_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])      # a truncated download
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LlarvaPolicy.from_pretrained(broken, device="cpu")


def test_a_train_small_checkpoint_is_asked_as_it_was_trained(tiny_dir, tmp_path, monkeypatch):
    """A model trained to write a visual trace first writes nonsense numbers when asked for the action
    alone: from_pretrained reads train-small's record instead of defaulting to no trace."""
    import json
    import shutil

    from llarva_policy.cli import main
    from llarva_policy.train_small import TRAINING_FILE

    assert LlarvaPolicy.from_pretrained(tiny_dir, device="cpu").with_visual_trace is False   # no record
    traced = tmp_path / "traced"
    shutil.copytree(tiny_dir, traced)
    (traced / TRAINING_FILE).write_text(json.dumps({"options": {"visual_trace": True, "trace_points": 3}}))
    assert LlarvaPolicy.from_pretrained(traced, device="cpu").with_visual_trace is True
    assert LlarvaPolicy.from_pretrained(traced, device="cpu", with_visual_trace=False).with_visual_trace is False
    made = []
    real = LlarvaPolicy.from_pretrained.__func__
    monkeypatch.setattr(LlarvaPolicy, "from_pretrained",
                        classmethod(lambda cls, *a, **k: made.append(real(cls, *a, **k)) or made[-1]))
    for flag, expected in (([], True), (["--no-visual-trace"], False)):
        results = tmp_path / f"results{len(made)}.json"
        main(["eval", "--task", "reach_target", "--checkpoint", str(traced), "--constrained", "--episodes", "1",
              "--episode-length", "2", "--device", "cpu", "--results", str(results), *flag])
        assert made[-1].with_visual_trace is expected
        assert json.loads(results.read_text())["summary"]["episodes"] == 1
    monkeypatch.undo()
    (traced / TRAINING_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{TRAINING_FILE}: not a train-small record.*with_visual_trace"):
        LlarvaPolicy.from_pretrained(traced, device="cpu")



def test_eval_stops_on_a_malformed_answer_or_holds_and_counts_it(tiny_dir, tmp_path, capsys):
    """`llarva eval` of an unconstrained random model: by default the first answer that does not parse
    ends the run with the text, where the finished episodes are, and how to go on; with
    `--on-parse-error hold` every episode runs to its end and the unparsed steps are counted."""
    import json

    from llarva_policy.cli import console

    args = ["eval", "--task", "reach_target", "--checkpoint", str(tiny_dir), "--episodes", "2",
            "--episode-length", "3", "--device", "cpu", "--variation", "0"]
    stopped = tmp_path / "stopped.json"
    with pytest.raises(SystemExit) as exit_info:
        console([*args, "--results", str(stopped)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "expected 'The next action step:" in error and "got '" in error
    assert f"the finished episodes are kept in {stopped}" in error and "--on-parse-error hold" in error
    held = tmp_path / "held.json"
    console([*args, "--results", str(held), "--on-parse-error", "hold"])
    episodes = json.loads(held.read_text())["episodes"]
    assert [episode["steps"] for episode in episodes] == [3, 3]
    assert all(1 <= episode["parse_errors"] <= 3 for episode in episodes)
    with pytest.raises(SystemExit):
        console([*args, "--on-parse-error", "ignore"])
    assert "on_parse_error: expected one of ('raise', 'hold'), got 'ignore'" in capsys.readouterr().err

# --- examples and the latency benchmark run as written ---------------------------------------------

@pytest.mark.parametrize("script, expected", [
    ("examples/gym_loop.py", "success=False"),
    ("examples/sb3_evaluate_policy.py", "success rate over 2 episodes: 0.00"),
    ("examples/lerobot_style_loop.py", "successes: [False, False]"),
])
def test_examples_run_on_a_tiny_random_model(script, expected, capsys, load_script):
    load_script(script).main([])
    assert expected in capsys.readouterr().out


def test_latency_benchmark_runs_on_cpu(tmp_path, load_script):
    import json
    benchmark = load_script("benchmarks/policy_latency.py")
    out = tmp_path / "latency.json"
    report = benchmark.main(["--size", "tiny", "--device", "cpu", "--batch-sizes", "1,2", "--answer-tokens", "5",
                             "--repeats", "1", "--warmup", "1", "--method", "both", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert [(row["method"], row["batch"]) for row in report["rows"]] == [("hf", 1), ("hf", 2), ("fast", 1), ("fast", 2)]
    for row in report["rows"]:
        assert row["answer_tokens"] == 5          # end of sequence suppressed: every answer is exactly 5 tokens
        assert row["actions_per_second"] == pytest.approx(row["batch"] / row["seconds_per_step"], rel=1e-2)
