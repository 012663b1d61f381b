"""The tokenizer: train a byte-level BPE on the corpus, or load an existing tokenizer.json / model folder.

The seed borrowed a tokenizer from a hub; this module trains one on the user's own text with the
Hugging Face `tokenizers` library, shaped like Qwen's (NFC, Qwen2/3 pre-tokenization regex, byte-level
BPE, the special tokens <|endoftext|>, <|im_start|>, <|im_end|>). `Tokenizer` wraps either a trained
or a loaded backend with what the rest of the project needs: ids of the special tokens, the tokens
that stop generation, and a Qwen-style chat template. `save_pretrained` writes the files
`transformers.AutoTokenizer.from_pretrained` reads, so a checkpoint folder is a complete HF folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from qwen3.errors import UserError, read_json_object

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# The pre-tokenization regex of Qwen2 and Qwen3 (as in their tokenizer.json): contractions, runs of
# letters with at most one leading non-letter, single digits, punctuation runs, newlines, spaces.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's chat format with thinking and tool calls (chat_template.jinja says how it renders); a
# conversation of plain messages is plain ChatML: <|im_start|>role\ncontent<|im_end|>\n per message.
CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text(encoding="utf-8")

DEFAULT_MODEL_MAX_LENGTH = 32768


@dataclass(eq=False)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token roles and chat template of a model folder."""

    backend: tokenizers.Tokenizer
    eos_token: str
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH

    def __post_init__(self) -> None:
        if self.backend.token_to_id(self.eos_token) is None:
            raise UserError(f"the end-of-text token {self.eos_token!r} is not in the tokenizer's vocabulary")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return self.backend.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.backend.token_to_id(self.pad_token)

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: eos, then <|im_end|> and <|endoftext|> where the vocabulary has them."""
        ids = [self.eos_token_id]
        for token in (IM_END, ENDOFTEXT):
            token_id = self.backend.token_to_id(token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; nothing is added, and special-token strings become their single ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once, in parallel over the CPU cores (Rust threads).

        The "fast" variant skips computing character offsets, which doubles throughput."""
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render `messages` ({"role", "content"} dicts) with the chat template, as transformers does;
        `variables` reach the template too (e.g. enable_thinking=False for a real Qwen3 template)."""
        if not self.chat_template:
            raise UserError("this tokenizer has no chat template (tokenizer_config.json has no chat_template)")
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                eos_token=self.eos_token, bos_token=self.bos_token or "", **variables)
        except jinja2.TemplateError as error:
            raise UserError(f"the chat template failed to render: {error}") from error

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        roles = {"eos_token": self.eos_token, "bos_token": self.bos_token,
                 "pad_token": self.pad_token, "unk_token": self.unk_token}
        added_tokens = {
            str(token_id): {
                "content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
            for token_id, token in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **roles,
            "added_tokens_decoder": added_tokens,
            "chat_template": self.chat_template,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,
        }
        _write_json(directory / "tokenizer_config.json", config)
        _write_json(directory / "special_tokens_map.json",
                    {role: token for role, token in roles.items() if token is not None})


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` ids (special tokens included) on `texts`."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise UserError(f"vocab size must be at least {minimum} (256 bytes + special tokens), got {vocab_size}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with _serial_tokenizers():
        backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, chat_template=CHAT_TEMPLATE)


@contextlib.contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """Run the `tokenizers` library on one thread inside the block (it reads TOKENIZERS_PARALLELISM
    at each parallel step), then restore the setting.

    BPE training counts symbol pairs with a parallel reduce that holds a full pair map (each pair
    with the set of words it occurs in) per thread, so its peak grew with the cores: 367 MB on one
    thread, 435 MB on 2, 566 MB on 16 threads for the 64 MB sample of bench/data_bench.py. One
    thread gives the same merges for the same CPU time (~25 s for that sample), so training, a
    one-off cached step, is slower only where there are many idle cores; encoding stays parallel.
    """
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json file, or a folder holding tokenizer.json (+ tokenizer_config.json).

    Without a tokenizer_config.json the tokenizer is taken to be one of ours: <|endoftext|> ends a
    document and the Qwen chat template applies when <|im_start|> is in the vocabulary.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer not found: {path}")
    tokenizer_file = path / "tokenizer.json" if path.is_dir() else path
    if not tokenizer_file.is_file():
        raise UserError(f"no tokenizer.json in {path}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # the Rust library raises a bare Exception for any malformed file
        raise UserError(f"{tokenizer_file} is not a valid tokenizer.json: {error}") from error

    config_file = tokenizer_file.parent / "tokenizer_config.json"
    if not config_file.is_file():
        has_chat_tokens = backend.token_to_id(IM_START) is not None
        return Tokenizer(backend, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                         chat_template=CHAT_TEMPLATE if has_chat_tokens else None)
    config = read_json_object(config_file)
    chat_template = config.get("chat_template")
    # Newer transformers versions write the template to its own file.
    template_file = tokenizer_file.parent / "chat_template.jinja"
    if chat_template is None and template_file.is_file():
        chat_template = template_file.read_text(encoding="utf-8")
    eos_token = _token_content(config.get("eos_token")) or ENDOFTEXT
    return Tokenizer(
        backend, eos_token=eos_token, bos_token=_token_content(config.get("bos_token")),
        pad_token=_token_content(config.get("pad_token")), unk_token=_token_content(config.get("unk_token")),
        chat_template=chat_template,
        model_max_length=int(config.get("model_max_length") or DEFAULT_MODEL_MAX_LENGTH))


def _token_content(value: str | dict | None) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    return value.get("content") if isinstance(value, dict) else value


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    # Compiled once per template (compiling costs ~100x a render). The same environment transformers uses, so both render a template identically.
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=False)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(source)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
