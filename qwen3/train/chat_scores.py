"""What chat fine-tuning changes, measured on the embedded set's held-out conversations (verses no
training conversation used):

* the assistant-token loss (nats per reply token, the end-of-turn token included);
* the share of greedy replies that end with the end-of-turn token before `max_new_tokens`;
* the book task's accuracy (the reply is exactly the book's name) against the majority-class
  baseline (always answering the most frequent book of the held-out questions).

It generates with the inference engine (as the training samples do, the one edge from the
training layer down to inference): bench/sft_before_after.py prints it for two checkpoints.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qwen3.data.conversations import end_of_turn, render_and_pack
from qwen3.data.kjv import kjv_chat
from qwen3.infer.engine import load_engine
from qwen3.infer.sampling import SamplingParams
from qwen3.train.metrics import score_packed

GENERATION_BATCH = 64


@dataclass
class ChatScores:
    reply_loss: float         # nats per assistant token of the held-out conversations
    end_of_turn_share: float  # replies closed by the end-of-turn token within max_new_tokens
    book_accuracy: float      # book questions answered with exactly the book's name
    book_baseline: float      # the share of the most frequent book among those questions
    replies: int              # held-out conversations generated for

    def row(self) -> list[str]:
        return [f"{self.reply_loss:.3f}", f"{self.end_of_turn_share:.1%}", f"{self.book_accuracy:.1%}",
                f"{self.book_baseline:.1%}"]


def score_chat(path: str | Path, device: str = "cpu", max_new_tokens: int = 48,
               limit: int | None = None) -> ChatScores:
    """The held-out scores of a checkpoint (or a run folder's best/); `limit` takes the first
    conversations of the held-out list only."""
    engine = load_engine(path, device=device)
    tokenizer, model = engine.tokenizer, engine.model
    held = kjv_chat()[1][:limit]
    packed = render_and_pack(tokenizer, [messages for _, messages in held], engine.max_context)
    loss = score_packed(model, packed, 16, model.model.embed_tokens.weight.device).loss
    closing = tokenizer.token_to_id(end_of_turn(tokenizer))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=[closing])
    prompts = [tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True) for _, messages in held]
    completions = []
    for start in range(0, len(prompts), GENERATION_BATCH):
        completions += engine.generate_batch(prompts[start:start + GENERATION_BATCH], params)
    ended = sum(completion.finish_reason == "stop" for completion in completions)
    books = [(messages[-1]["content"], completion.text.strip())
             for (task, messages), completion in zip(held, completions) if task == "book"]
    right = sum(answer == reply for answer, reply in books)
    majority = Counter(answer for answer, _ in books).most_common(1)[0][1] if books else 0
    return ChatScores(loss, ended / len(completions), right / max(len(books), 1),
                      majority / max(len(books), 1), len(completions))
