"""The demo: five fixed prompts continued by a trained model, and the runs the seed's entry points
use (`python train_qwen3.py [demo|interactive]`, `python serve_qwen3.py`).

`run_demo` continues DEMO_PROMPTS, which suit the default King James corpus, with DEMO_PARAMS.
`default_chat_run` is the run the seed's chat and server talk to.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from qwen3.infer.engine import load_engine
from qwen3.infer.sampling import DEMO_PARAMS, SamplingParams
from qwen3.model.checkpoint import CHECKPOINT_NAMES

DEFAULT_RUN = Path("runs/seed")
FINE_TUNED_RUN = Path("runs/seed-sft")  # what `qwen3 sft runs/seed` writes
DEMO_PROMPTS = [
    "In the beginning",
    "And the LORD said unto Moses,",
    "The LORD is my shepherd;",
    "Blessed are the",
    "And it came to pass, when",
]


def default_chat_run() -> Path:
    """The run the seed's chat and server talk to: the chat fine-tuned one when `qwen3 sft runs/seed`
    made it (a chat is what it was trained for), else runs/seed. The demo prompts, plain text
    continuation, stay with runs/seed."""
    fine_tuned = any((FINE_TUNED_RUN / name / "config.json").is_file() for name in CHECKPOINT_NAMES)
    return FINE_TUNED_RUN if fine_tuned else DEFAULT_RUN


def run_demo(path: str | Path = DEFAULT_RUN, params: SamplingParams | None = None, *,
             device: str = "auto", quantize: str | None = None, compile: bool = False,
             output_stream: TextIO = sys.stdout) -> None:
    """Continue each of DEMO_PROMPTS with the checkpoint (a run folder means its best/) and print them."""
    params = (params or DEMO_PARAMS).validate()
    engine = load_engine(path, device, quantize, compile)
    for number, prompt in enumerate(DEMO_PROMPTS, 1):
        output_stream.write(f"\n[{number}/{len(DEMO_PROMPTS)}] {prompt}")
        output_stream.flush()
        for piece in engine.stream(prompt, params):
            output_stream.write(piece)
            output_stream.flush()
        output_stream.write("\n")
    output_stream.flush()
