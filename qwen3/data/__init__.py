"""Text -> tokens: the `--data` sources and their records (sources.py, records.py), the tokenizer and
its chat template (tokenizer.py), the cached token store (store.py) and its leak-free split
(split.py: by document, or by paragraph or the tail for a corpus of too few documents), the
windows training and evaluation draw (windows.py), conversations with their loss masks
(conversations.py), and the embedded corpus and conversation set (kjv.py).

It may import the foundation alone: it knows nothing of the model, training, inference or serving
(tests/test_layers.py).
"""
