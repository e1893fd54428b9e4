import os

# Tests never reach a model hub, and render offscreen on machines with no screen.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two pytest workers share two cores: torch's intra-op threads would only fight over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
