"""The KV cache of incremental decoding: a slot per sequence, allocated once, and what attention may see.

Kept apart from the model (model.py), which calls it from every attention layer, because how keys
are stored, numbered and masked is a subject of its own: the slots and their views, the two paths
of a forward pass (rows at one length, rows at different lengths), and the host and device copies
of the lengths that keep a compiled step free of host syncs. Shapes as in model.py: B rows, T new
tokens, S keys, K key/value heads, D head_dim.
"""

from __future__ import annotations

import copy

import torch

from qwen3.config import ModelConfig


class KVCache:
    """Preallocated keys and values for incremental decoding, one slot per sequence.

    keys[l] and values[l] are (slots, K, max_len, D), allocated once. Slot i holds positions
    0 .. lengths[i] - 1 of its sequence in its first columns: a token's column is its position, so
    sequences of different lengths share a cache with no padding to mask, and a sequence that joins
    or leaves a running batch moves no other one (what the server's scheduler relies on).

    `cache.slots(start, stop)` is a view: a cache of those slots that shares this one's memory, so a
    forward pass through it reads and writes those slots only (a prompt's prefill into a free slot,
    a decode step over the running ones). A forward pass takes one of two paths:
      * every row at the same length (one prompt, equal prompts, a prefill into empty slots): the
        new keys go in by slicing, the rotary tables are sliced, and no mask is built; a prefill
        from empty attends over its own keys with SDPA's causal kernel;
      * rows at different lengths: each row's new keys are scattered to its own columns, the rotary
        angles gathered at its positions, and the mask (key column <= query position) built from
        the lengths over `width` columns, the longest row's or, in a view for a compiled step with
        a static width, a power of two of them: CUDA graphs record one graph per shape.
    `lengths` lives on the device, so a step reads it without a host sync; `filled` holds the same
    numbers on the host, for the shapes. The model keeps both up to date, except in a view made by
    `for_compiled_step`: there the caller does the host half (`prepare` before, `count` after),
    Python that a compiled graph cannot run.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.filled = [0] * batch_size  # the host's copy of `lengths`, shared by every view
        self.config = config
        self.max_len = max_len
        self.start, self.stop = 0, batch_size  # the slots this view runs
        self.planned = False  # True: prepare and count are the caller's (see for_compiled_step)
        self.static_width = False
        self.past: int | None = 0  # set by prepare: the rows' common length, None when they differ
        self.width = 0  # set by prepare: the columns attention reads

    @staticmethod
    def bytes_needed(config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
        """What keys and values of `batch_size` slots of `max_len` positions take."""
        per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        return per_position * batch_size * max_len * dtype.itemsize

    @property
    def nbytes(self) -> int:
        """The memory of every slot's keys and values (views share it)."""
        return sum(tensor.nbytes for tensor in self.keys + self.values)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def batch_size(self) -> int:
        return self.stop - self.start

    @property
    def length(self) -> int:
        """The longest row's cached positions."""
        return max(self.filled[self.start:self.stop])

    def slots(self, start: int, stop: int) -> KVCache:
        """The slots start .. stop - 1 of this view, as a cache that shares this one's memory."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"slots {start}..{stop - 1} are not within the {self.batch_size} of this cache")
        view = copy.copy(self)
        view.start, view.stop = self.start + start, self.start + stop
        return view

    def for_compiled_step(self, static_width: bool) -> KVCache:
        """This view as a compiled decode step takes it: its caller calls `prepare` before the step
        and `count` after. With `static_width`, attention reads a power of two of columns (at least
        256, at most max_len) rather than the longest row's, which changes at every step."""
        view = copy.copy(self)
        view.planned, view.static_width = True, static_width
        return view

    def reset(self) -> None:
        """Empty this view's slots (what they held stays, never read, until overwritten)."""
        self.lengths[self.start:self.stop] = 0
        self.filled[self.start:self.stop] = [0] * self.batch_size

    def prepare(self, new_tokens: int) -> None:
        """Plan a forward pass of `new_tokens` per row from the host lengths: `past`, the length all
        rows share (None when they differ, or the width is static), and `width`."""
        filled = self.filled[self.start:self.stop]
        longest = max(filled)
        end = longest + new_tokens
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.past = longest if min(filled) == longest and not self.static_width else None
        self.width = min(max(256, 1 << (end - 1).bit_length()), self.max_len) if self.static_width else end

    def positions_and_mask(self, new_tokens: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the model needs for its next `new_tokens` per row: position ids (B, T), None when
        all rows start at `past`; and the mask of the keys each query sees, (B, 1, T, width), or
        (1, 1, T, past + T) for a chunk after equal rows, or None (a prefill from empty, one token)."""
        if self.past is not None:
            return None, build_attention_mask(None, new_tokens, self.past, self.device)
        columns = self.columns(new_tokens)
        mask = torch.arange(self.width, device=self.device)[None, None, None, :] <= columns[:, None, :, None]
        # A row that has run past the context (a finished one decoding on with its batch) keeps
        # the last position of the rotary tables.
        return columns.clamp(max=self.config.max_position_embeddings - 1), mask

    def columns(self, new_tokens: int) -> torch.Tensor:
        """(B, T): the columns, which are the positions, of each row's next tokens."""
        return self.lengths[self.start:self.stop, None] + torch.arange(new_tokens, device=self.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at each row's next columns; return the keys and values to attend
        over, (B, K, S, D)."""
        keys, values = self.keys[layer], self.values[layer]
        # The whole cache is taken as it is: under torch.compile its batch size is then the input's,
        # where a slice would leave it a size of its own (one more symbol to pass and guard).
        rows = slice(None) if self.batch_size == keys.shape[0] else slice(self.start, self.stop)
        if self.past is not None:
            end = self.past + k.shape[2]
            keys[rows, :, self.past:end] = k
            values[rows, :, self.past:end] = v
            if self.past == 0:
                return k, v  # a prefill from empty: its own keys, for SDPA's causal kernel
            return keys[rows, :, :end], values[rows, :, :end]
        columns = self.columns(k.shape[2])
        row_ids = torch.arange(self.start, self.stop, device=self.device)[:, None]
        # keys[row, :, column] takes the (K, D) of that row's token: indexed by (B, T), it is (B, T, K, D).
        keys[row_ids, :, columns] = k.transpose(1, 2)
        values[row_ids, :, columns] = v.transpose(1, 2)
        return keys[rows, :, :self.width], values[rows, :, :self.width]

    def advance(self, steps: int) -> None:
        """Count `steps` more positions in every row (the model calls it after its layers)."""
        self.lengths[self.start:self.stop] += steps
        if not self.planned:
            self.count(steps)

    def count(self, steps: int) -> None:
        """The host half of `advance`."""
        for slot in range(self.start, self.stop):
            self.filled[slot] += steps

    def mark_static(self) -> None:
        """Tell torch.compile that these tensors keep their addresses, so that CUDA graphs update
        them in place instead of refusing a graph that mutates its inputs."""
        import torch._dynamo  # not at the top: importing it takes seconds, and only compiling needs it

        for tensor in (*self.keys, *self.values, self.lengths):
            torch._dynamo.mark_static_address(tensor)

    def copy_slot(self, target: int, source_cache: KVCache, source: int) -> None:
        """Copy the sequence in slot `source` of `source_cache` (this cache or another) into slot
        `target` of this one; slots are numbered within each view."""
        target, source = self.start + target, source_cache.start + source
        length = source_cache.filled[source]
        for layer in range(len(self.keys)):
            self.keys[layer][target, :, :length] = source_cache.keys[layer][source, :, :length]
            self.values[layer][target, :, :length] = source_cache.values[layer][source, :, :length]
        self.lengths[target] = length
        self.filled[target] = length


def build_attention_mask(attention_mask: torch.Tensor | None, T: int, past: int,
                         device: torch.device) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S) of which keys each new query may see, or None for plain causal.

    attention_mask (B, S) marks real tokens with 1 and padding with 0 over all S = past + T
    positions. None is returned when the fused causal path suffices (no padding, no cache offset).
    """
    if attention_mask is None and (past == 0 or T == 1):
        return None
    S = past + T
    # query at cache index past + i sees keys 0 .. past + i
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
    if attention_mask is None:
        return causal
    if attention_mask.shape[-1] != S:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {S}")
    mask = causal & attention_mask.bool()[:, None, None, :]
    # A fully padded query row would softmax over nothing (NaN); let it see itself instead.
    diagonal = torch.arange(S, device=device)[None, :] == torch.arange(past, S, device=device)[:, None]
    return mask | diagonal[None, None]
