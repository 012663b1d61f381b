"""The Qwen3 decoder and what travels with it: the model (decoder.py), its KV cache (kv_cache.py),
the sliced cross-entropy and the model-plus-loss module a training step calls (loss.py), checkpoint
folders in the Hugging Face format (checkpoint.py) and LoRA adapters merged into them (lora.py).

It may import the foundation alone (config, runtime, errors, atomic): the data, training, inference
and serving layers are built on it, never the other way round (tests/test_layers.py).
"""
