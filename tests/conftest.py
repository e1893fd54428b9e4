import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests never reach a model hub, and render offscreen on machines with no screen.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two pytest workers share two cores: torch's intra-op threads would only fight over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def load_script(monkeypatch):
    """Import one of the repository's scripts (`benchmarks/...`, `examples/...`) by its path, as a
    module, for a test to call its `main`."""
    def load(relative_path):
        path = REPO / relative_path
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)   # a dataclass in it looks itself up there
        spec.loader.exec_module(module)
        return module
    return load
