"""Inference: sampling (sampling.py), the KV-cache decode engine (engine.py), the terminal chat
(chat.py), the demo and the seed's default runs (demo.py), and GGUF export for llama.cpp and
Ollama (export.py). A checkpoint folder is all it takes from training.

It may import the foundation, model/ and data/; never train/ or server/ (tests/test_layers.py).
"""
