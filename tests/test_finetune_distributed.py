"""Data-parallel fine-tuning: two processes under torchrun (gloo, CPU) on the tiny model."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402

from llarva_policy.finetune import RUN_FILE, last_complete_checkpoint  # noqa: E402
from llarva_policy.model import load_llava, make_random_llava  # noqa: E402

# The demos and annotations of the single-process tests.
from test_finetune import FAST, data  # noqa: E402,F401  (data is a fixture)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")   # peft asks it
TORCHRUN = Path(sys.executable).with_name("torchrun")

# What each process runs: finetune with the options given, then a record of what it saw.
DRIVER = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback
    from llarva_policy.finetune import finetune

    torch.set_num_threads(1)

    class Fingerprint(TrainerCallback):
        # The sum of every trainable weight after the last step: equal on all ranks if DDP kept them in step.
        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.value = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)

    fingerprint = Fingerprint()
    report = finetune(callbacks=[fingerprint], **json.loads(sys.argv[1]))
    record = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
              "report": report, "fingerprint": fingerprint.value}
    with open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w") as handle:
        json.dump(record, handle)
""")


@pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"torchrun is not next to the interpreter ({TORCHRUN})")
def test_two_processes_train_one_adapter(data, tmp_path):  # noqa: F811
    annotation_file, images = data
    tiny_dir = make_random_llava(tmp_path / "tiny", size="tiny", seed=0)
    output, records = tmp_path / "out", tmp_path / "records"
    records.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    options = dict(model=str(tiny_dir), data=str(annotation_file), images=str(images), output=str(output),
                   max_steps=3, save_steps=2, **{**FAST, "batch_size": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Its own process group, so that a hang is cleaned up whole (torchrun and both workers).
    process = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(driver), json.dumps(options), str(records)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("torchrun did not finish within 180 s")
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]

    ranks = [json.loads((records / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert ranks[0]["fingerprint"] == pytest.approx(ranks[1]["fingerprint"], rel=1e-6, abs=1e-6)
    report = ranks[0]["report"]
    assert report["world_size"] == 2 and report["global_step"] == 3
    assert report["samples"] == 3 * 2 * 2   # steps x per-device batch x processes

    # One run folder, written once: the adapter loads onto the base.
    run = json.loads((output / RUN_FILE).read_text())
    assert run["finished"] and run["report"]["world_size"] == 2
    assert last_complete_checkpoint(output).name == "checkpoint-3"
    assert (output / "checkpoint-3" / "rng_state_1.pth").is_file()   # each process's RNG is saved
    tuned = PeftModel.from_pretrained(load_llava(tiny_dir, device="cpu").model, str(output))
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in tuned.named_parameters())
