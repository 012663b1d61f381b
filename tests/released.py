"""A released-style Qwen3 folder, built offline: what most users bring from the Hub.

    tokenizer   Qwen's byte-level BPE (151,643 tokens, the same ranks as Qwen2 and Qwen3), read from
                the qwen.tiktoken file that the dashscope wheel ships (the Makefile installs it
                without its dependencies; it is read, never imported), merges derived from the ranks
                as BPE would apply them; the released added tokens (<|endoftext|> 151643 ...
                </think> 151668) and chat template (thinking and tools), from ../shared/fixtures/
    model       transformers' Qwen3ForCausalLM with random weights, 151,936 rows (the released
                padding), 40,960 positions, rope_theta 1e6, saved in bfloat16
    generation  generation_config.json with eos [151645, 151643] and the released sampling
                (temperature 0.6, top_k 20, top_p 0.95)

The fixtures are reference data kept outside the project: where they (or the wheel) are missing,
`released_folder` says why and the tests that need it skip.
"""

from __future__ import annotations

import base64
import json
import os
from importlib import metadata
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

from qwen3.data.tokenizer import QWEN_PRETOKENIZE_REGEX, Tokenizer

FIXTURES = Path(os.environ.get("QWEN3_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
VOCAB_SIZE = 151936
CONTEXT = 40960
# Added tokens that the released tokenizer does not treat as special (decoding keeps them).
TEXT_TOKENS = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                     "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def missing() -> str | None:
    """Why a released-style folder cannot be built here, or None."""
    for name, what in (("qwen3-chat-template.jinja", "chat template"), ("qwen3-special-tokens.json", "special tokens")):
        if not (FIXTURES / name).is_file():
            return f"no released Qwen3 {what} in {FIXTURES}"
    try:
        metadata.distribution("dashscope")
    except metadata.PackageNotFoundError:
        return "the dashscope wheel (Qwen's tiktoken ranks) is not installed: make setup installs it"
    return None


def released_template() -> str:
    return (FIXTURES / "qwen3-chat-template.jinja").read_text(encoding="utf-8")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character map that byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return {byte: chr(byte) if byte in printable else chr(next(extra)) for byte in range(256)}


def qwen_ranks() -> dict[bytes, int]:
    file = metadata.distribution("dashscope").locate_file("dashscope/resources/qwen.tiktoken")
    ranks = {}
    for line in Path(str(file)).read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes] | None:
    """The two parts BPE joins last to make `token`: its bytes merged by rank, lowest first, with
    merges below the token's own rank only."""
    parts = [bytes([byte]) for byte in token]
    limit = ranks[token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), index) for index, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, index = min(pairs)
        if rank >= limit:
            return None
        parts[index:index + 2] = [parts[index] + parts[index + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def qwen_tokenizer() -> tokenizers.Tokenizer:
    """Qwen's BPE with the released added tokens, as a `tokenizers` backend."""
    ranks = qwen_ranks()
    alphabet = byte_alphabet()

    def text(piece: bytes) -> str:
        return "".join(alphabet[byte] for byte in piece)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1 and (pair := last_merge(ranks, token)) is not None:
            merges.append((text(pair[0]), text(pair[1])))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    added = json.loads((FIXTURES / "qwen3-special-tokens.json").read_text(encoding="utf-8"))["added_tokens"]
    for content, token_id in sorted(added.items(), key=lambda item: item[1]):
        token = tokenizers.AddedToken(content, special=content not in TEXT_TOKENS, normalized=False)
        backend.add_tokens([token]) if content in TEXT_TOKENS else backend.add_special_tokens([token])
        assert backend.token_to_id(content) == token_id, (content, token_id)
    return backend


def write_released_folder(folder: Path, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                          head_dim: int = 16, intermediate_size: int = 128, seed: int = 0) -> Path:
    """A released-style Qwen3 folder at `folder` (random weights of the given width). Where the
    fixtures are missing it says so, and writes nothing."""
    if reason := missing():
        raise SystemExit(f"cannot build a released-style folder: {reason} (set QWEN3_FIXTURES to the folder "
                         "holding qwen3-chat-template.jinja and qwen3-special-tokens.json)")
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=CONTEXT, rope_theta=1e6,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    Tokenizer(qwen_tokenizer(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
              chat_template=released_template(), model_max_length=131072).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n", encoding="utf-8")
    return folder
