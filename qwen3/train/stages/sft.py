"""Chat fine-tuning (SFT): the assistant's replies of conversations, learned with a loss mask.

`qwen3 sft DIR` is `qwen3 train --preset sft --init-from DIR`, so resume, DDP, evaluation,
checkpoints and metrics are the loop's, as for pretraining. The conversations (`--data` files in
any format of data/conversations.py: reasoning, tools, tool calls and their results included, or
without `--data` the embedded set of data/kjv.py) are rendered with the checkpoint's chat
template, split by conversation into training and held-out, and packed into rows of seq_len + 1
tokens with their loss masks. The loop draws shuffled rows (`PackedRows`); the loss counts only the
replies' tokens (targets of -100 elsewhere). Evaluation scores the held-out rows the same way:
assistant-token loss, accuracy, perplexity, and bits per byte of the reply text.

The row length is config.seq_len, else chosen (`row_length`): the longest conversation rounded up
to a multiple of SEQ_LEN_MULTIPLE, at most the model's context or SEQ_LEN_CAP (`longest_sequence`);
a conversation longer than the row is dropped and counted. The embedded set keeps rows of
EMBEDDED_SEQ_LEN + 1, those its measurements were made with. The samples continue the first user
turns of held-out conversations (the embedded set's fixed questions for the embedded set).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from qwen3.config import SEQ_LEN_MULTIPLE, TrainConfig
from qwen3.data.conversations import Conversation, Packed, Rendered, held_out, pack, pad_id, read_conversations, render
from qwen3.data.kjv import CHAT_PROMPTS, kjv_chat
from qwen3.data.tokenizer import Tokenizer, load_tokenizer
from qwen3.errors import UserError, log
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.runtime import Distributed
from qwen3.train.metrics import EvalResult, score_packed
from qwen3.train.parallel import BatchLayout
from qwen3.train.samples import SAMPLE_PROMPTS
from qwen3.train.stages.base import Stage, drawn, longest_sequence

EMBEDDED = "builtin:kjv-chat"
EMBEDDED_SEQ_LEN = 256  # the embedded set's rows: 257 tokens, as on the seed's model (context 256)


class ChatFineTuning(Stage):
    """The packed training and held-out conversations, and the tokenizer that rendered them."""

    name = "sft"
    chat = True

    def __init__(self, tokenizer: Tokenizer, train: Packed, val: Packed, sources: list[str], rows: str,
                 prompts: list[str]) -> None:
        self.tokenizer = tokenizer
        self.train = train
        self.val = val
        self.sources = sources
        self.seq_len = train.rows.shape[1] - 1
        self.rows = rows  # the row length and why
        self.prompts = prompts

    @classmethod
    def prepare(cls, config: TrainConfig, tokenizer: str, context: int, progress: bool = False,
                training: bool = True) -> ChatFineTuning:
        """Rendered, split and packed conversations (the same whether training or scoring)."""
        if not tokenizer:
            raise UserError("chat fine-tuning starts from a checkpoint: qwen3 sft DIR "
                            "(or qwen3 train --preset sft --init-from DIR)")
        loaded = load_tokenizer(tokenizer)
        training_set, held = split_conversations(config.data, config.val_fraction)
        if not held or not training_set:
            raise UserError(f"{len(training_set) + len(held)} conversation(s) split into {len(training_set)} for "
                            f"training and {len(held)} held out (val_fraction {config.val_fraction}): both need some")
        rendered = [[render(loaded, c.messages, c.tools) for c in part] for part in (training_set, held)]
        seq_len, why = row_length(config, context, rendered[0] + rendered[1])
        train, val = (pack(part, seq_len + 1, pad_id(loaded)) for part in rendered)
        prompts = list(CHAT_PROMPTS) if not config.data else first_user_turns(held)
        stage = cls(loaded, train, val, list(config.data) or [EMBEDDED], f"rows of {seq_len + 1:,} tokens: {why}",
                    prompts)
        if not stage.train.conversations or not stage.val.conversations:
            raise UserError(f"every {'training' if not stage.train.conversations else 'held-out'} conversation "
                            f"is longer than seq_len + 1 = {seq_len + 1} tokens: raise seq_len")
        log(stage.describe())
        return stage

    def batches(self, layout: BatchLayout, seed: int, processes: Distributed, model: Qwen3ForCausalLM,
                autocast: contextlib.AbstractContextManager) -> PackedRows:
        return PackedRows(self.train, layout.rows, seed, processes.rank, processes.world_size)

    def evaluate(self, model: Qwen3ForCausalLM, batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager, rank: int = 0, world_size: int = 1) -> EvalResult:
        """Assistant-token loss, accuracy and perplexity of the held-out conversations."""
        return score_packed(model, self.val, batch_size, device, autocast, rank, world_size)

    def sample_prompts(self) -> list[str]:
        return list(self.prompts)

    @property
    def eval_tokens(self) -> int:
        """Every held-out row, padding included."""
        rows, row_tokens = self.val.rows.shape
        return rows * (row_tokens - 1)

    @property
    def summary(self) -> dict[str, Any]:
        return {"sources": self.sources, "row_tokens": self.train.rows.shape[1], "choices": self.choices,
                **{f"{name}_{key}": value for name, packed in (("train", self.train), ("val", self.val))
                   for key, value in (("conversations", packed.conversations), ("rows", len(packed.rows)),
                                      ("learned_tokens", int(packed.learned.sum())),
                                      ("dropped_too_long", packed.too_long))}}

    @property
    def scored_on(self) -> str:
        return f"held-out conversations, the replies' tokens, rows of {self.val.rows.shape[1]}"

    @property
    def choices(self) -> list[str]:
        return [self.rows]

    def describe(self) -> str:
        dropped = self.train.too_long + self.val.too_long
        return (f"conversations from {', '.join(self.sources)}: {self.train.conversations:,} training "
                f"in {len(self.train.rows):,} rows of {self.train.rows.shape[1]} tokens, "
                f"{self.val.conversations:,} held out; {dropped:,} longer than a row dropped")


def row_length(config: TrainConfig, context: int, rendered: list[Rendered]) -> tuple[int, str]:
    """The row's seq_len (a row holds seq_len + 1 tokens) and why: config.seq_len; for the embedded
    set EMBEDDED_SEQ_LEN; else the longest conversation rounded up to SEQ_LEN_MULTIPLE, within
    `longest_sequence` (longer conversations are then dropped)."""
    if config.seq_len:
        return config.seq_len, f"seq_len {config.seq_len:,} as set"
    longest, bound = longest_sequence(config, context)
    if not config.data:
        if EMBEDDED_SEQ_LEN <= longest:
            return EMBEDDED_SEQ_LEN, "the embedded set's rows"
        return longest, f"the embedded set's rows, shortened to {bound}"
    tokens = max(len(conversation.ids) for conversation in rendered)
    wanted = -(-(tokens - 1) // SEQ_LEN_MULTIPLE) * SEQ_LEN_MULTIPLE  # a conversation of n tokens predicts n - 1
    why = f"the longest conversation is {tokens:,} tokens"
    if wanted <= longest:
        return wanted, f"{why}, rounded up to a multiple of {SEQ_LEN_MULTIPLE}"
    dropped = sum(len(conversation.ids) > longest + 1 for conversation in rendered)
    return longest, f"{why}; {bound}, so {dropped:,} longer conversation(s) are dropped"


def first_user_turns(conversations: list[Conversation]) -> list[str]:
    """The first user message of each of the first conversations that have one: sample prompts."""
    turns = (next((m["content"] for m in c.messages if m["role"] == "user"), None) for c in conversations)
    return [turn for turn in turns if turn is not None][:SAMPLE_PROMPTS]


def split_conversations(sources: list[str], val_fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    """(training, held-out) conversations of the `--data` files, or of the embedded set."""
    if not sources:
        embedded_training, embedded_held = kjv_chat()
        return ([Conversation(messages) for _, messages in embedded_training],
                [Conversation(messages) for _, messages in embedded_held])
    training: list[Conversation] = []
    held: list[Conversation] = []
    for source in sources:
        for conversation in read_conversations(source):
            (held if held_out(conversation, val_fraction) else training).append(conversation)
    return training, held


class PackedRows:
    """An endless stream of (x, y) batches of packed rows, shuffled anew every epoch.

    Step s takes the global rows s * B * W ... (s + 1) * B * W - 1 of the epochs' permutations (B rows
    a process, W processes) and rank r its B of them, so the stream does not depend on how many
    processes share it; the step count alone resumes it."""

    def __init__(self, packed: Packed, rows: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.x = torch.from_numpy(packed.rows[:, :-1].copy())
        self.y = torch.from_numpy(packed.targets())
        self.rows, self.seed, self.rank, self.world_size = rows, seed, rank, world_size
        self.steps = 0

    def __iter__(self) -> PackedRows:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.tensor([row for _, row in drawn(self.seed, len(self.x), self.rows, self.steps, self.rank,
                                                         self.world_size)])
        self.steps += 1
        return self.x[indices], self.y[indices]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.steps = state["seed"], state["steps"]
