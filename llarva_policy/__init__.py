"""The LLARVA policy: prompt/answer codec, LLaVA loading, predict(), fine-tuning.

`from llarva_policy import LlarvaPolicy` imports torch and transformers on first use only, so
that `import llarva_policy` (and `llarva_policy.codec`) stays light.
"""


def __getattr__(name):
    if name == "LlarvaPolicy":
        from llarva_policy.policy import LlarvaPolicy
        return LlarvaPolicy
    raise AttributeError(f"module 'llarva_policy' has no attribute {name!r}")


__all__ = ["LlarvaPolicy"]
