"""The LLARVA policy: prompt/answer codec, LLaVA loading, predict(), fine-tuning."""
