"""Samples during training: a few fixed prompts continued by the model being trained, so the
progress output shows what it has learned so far.

At every evaluation step that is a multiple of `sample_interval` (and at the last step), each of
`sample_prompts` (empty: the stage's own, `Stage.sample_prompts`: SAMPLE_PROMPTS openings of the
user's held-out documents, `openings`, or first user turns of held-out conversations; fixed ones
for the embedded data) is continued for SAMPLE_TOKENS
tokens twice: greedily, and sampled with the demo's settings (`DEMO_PARAMS`) from a generator
seeded with the run's `seed` plus the prompt's index. Two runs of one configuration so show the
same text, and the samples of two steps differ only by what the model learned in between. They
are written above the progress bar and to metrics.jsonl as {"step", "tokens", "samples":
[{"prompt", "greedy", "sampled"}], "elapsed_s"}.

For a chat stage (fine-tuning) a prompt is the user message of a one-turn conversation, rendered
with the checkpoint's chat template and its generation prompt, as the fine-tuning data renders the
prompt of a reply (data/conversations.py); the reply ends at the end of its turn. Elsewhere the
prompt is plain text the model continues.

Generation is the inference engine's (infer/engine.py: training may import the inference layer,
the one downward edge of the house that is not a lower layer's) on the model in eval mode, which
goes back to training mode afterwards. It draws nothing from torch's global RNG (greedy rows take
the argmax, every row's noise comes from its own seeded generator), so the training stream, and an
exact resume, are the same with samples or without. Under DDP only rank 0 samples (the model's own
forward: nothing collective); the other ranks go on to the checkpoint's collectives and wait there.
"""

from __future__ import annotations

import dataclasses

from qwen3.data.tokenizer import Tokenizer
from qwen3.infer.engine import Engine
from qwen3.infer.sampling import DEMO_PARAMS, SamplingParams
from qwen3.model.decoder import Qwen3ForCausalLM

SAMPLE_TOKENS = 32  # new tokens per sample: a line of text, a few milliseconds a token
SAMPLE_PROMPTS = 3  # prompts a stage takes from its held-out data
OPENING_WORDS = 5   # words of a held-out line that make its prompt


def sample_due(step: int, sample_interval: int, max_steps: int) -> bool:
    """Whether the evaluation at `step` shows samples."""
    return sample_interval > 0 and (step % sample_interval == 0 or step == max_steps)


def openings(texts: list[str], count: int = SAMPLE_PROMPTS, words: int = OPENING_WORDS) -> list[str]:
    """Up to `count` distinct prompts from the starts of held-out texts: the first `words` words of
    each text's first line with words, then of their second lines, and so on (so one long held-out
    text still gives several)."""
    lines = [[line.split()[:words] for line in text.splitlines() if line.split()] for text in texts]
    prompts: list[str] = []
    for depth in range(max(map(len, lines), default=0)):
        for text_lines in lines:
            prompt = " ".join(text_lines[depth]) if depth < len(text_lines) else ""
            if prompt and prompt not in prompts:
                prompts.append(prompt)
            if len(prompts) == count:
                return prompts
    return prompts


def generate_samples(model: Qwen3ForCausalLM, tokenizer: Tokenizer, prompts: list[str], seed: int,
                     chat: bool = False) -> list[dict[str, str]]:
    """Each prompt continued greedily and sampled (seeded); `chat`: rendered as a user turn.
    The model's training mode is restored."""
    # Prompt i's rows draw from seed + i: the same noise for every prompt would make the samples
    # of an untrained model (near-equal distributions whatever the prompt) the same text. The greedy
    # row is seeded too: in a batch that also samples, the sampler draws noise for every row (and
    # would take an unseeded row's from the global RNG), though a greedy row ignores it.
    params = [row for index in range(len(prompts)) for row in (
        SamplingParams(max_new_tokens=SAMPLE_TOKENS, temperature=0.0, seed=seed + index),
        dataclasses.replace(DEMO_PARAMS, max_new_tokens=SAMPLE_TOKENS, seed=seed + index))]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
                if chat else text for text in prompts]
    was_training = model.training
    try:
        engine = Engine(model, tokenizer)
        completions = engine.generate_batch([text for text in rendered for _ in (0, 1)], params)
    finally:
        model.train(was_training)
    return [{"prompt": text, "greedy": greedy.text, "sampled": sampled.text}
            for text, greedy, sampled in zip(prompts, completions[::2], completions[1::2])]


def format_samples(step: int, samples: list[dict[str, str]]) -> str:
    """The samples as log lines: each prompt, then its two continuations (newlines shown as \\n)."""
    def line(text: str) -> str:
        return text.strip().replace("\n", "\\n")

    lines = [f"step {step} samples:"]
    for sample in samples:
        lines += [f"  {line(sample['prompt'])}", f"     greedy: {line(sample['greedy'])}",
                  f"    sampled: {line(sample['sampled'])}"]
    return "\n".join(lines)
