"""GGUF export: the file's metadata, tokenizer and tensors read back with `gguf`, bad input, and (marked
slow) the real llama.cpp running the export token for token like qwen3 generate."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from qwen3 import cli
from qwen3.config import preset
from qwen3.data.sources import kjv_books
from qwen3.data.tokenizer import load_tokenizer, train_tokenizer
from qwen3.infer.engine import load_engine
from qwen3.infer.export import export_gguf
from qwen3.infer.quantize import chunked_perplexity
from qwen3.infer.sampling import SamplingParams
from qwen3.model.checkpoint import load_model, save_model
from qwen3.model.decoder import Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["In the beginning", "And God said, Let there be light", "Süßes Öl, café — naïve «ça»"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(kjv_books()[:3], vocab_size=512)


def odd_checkpoint(folder: Path, tokenizer) -> Path:
    """A transformers-written Qwen3 of an odd shape: head_dim != hidden / heads, one KV head,
    an untied head, rope theta 5e5."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
        rope_theta=5e5, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # larger than the 0.02 init, so greedy decoding has clear winners
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    config = dataclasses.replace(preset("tiny")[0], vocab_size=tokenizer.vocab_size,
                                 eos_token_id=tokenizer.eos_token_id)
    return save_model(Qwen3ForCausalLM(config), tmp_path_factory.mktemp("tiny") / "model", tokenizer=tokenizer)


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}, reader


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_export_writes_the_qwen3_architecture_and_our_tokenizer(tmp_path, tokenizer, kind):
    folder = odd_checkpoint(tmp_path / "odd", tokenizer)
    out = export_gguf(folder, tmp_path / "odd.gguf", kind)
    values, reader = fields(out)
    assert values["general.architecture"] == "qwen3"
    assert values["qwen3.attention.key_length"] == values["qwen3.attention.value_length"] == 32
    assert (values["qwen3.embedding_length"], values["qwen3.block_count"], values["qwen3.context_length"]) == (64, 2, 128)
    assert (values["qwen3.attention.head_count"], values["qwen3.attention.head_count_kv"]) == (4, 1)
    assert values["qwen3.rope.freq_base"] == 5e5
    assert values["tokenizer.ggml.model"] == "gpt2" and values["tokenizer.ggml.pre"] == "qwen2"
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    assert values["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert values["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert "im_start" in values["tokenizer.chat_template"]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 2 * 11  # embedding, final norm, untied output; 11 per layer
    weights = dict(load_model(folder).state_dict())
    expected = weights["model.layers.1.mlp.down_proj.weight"].numpy()
    stored = gguf.quants.dequantize(tensors["blk.1.ffn_down.weight"].data, tensors["blk.1.ffn_down.weight"].tensor_type)
    tolerance = {"f32": 0, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}[kind]
    np.testing.assert_allclose(stored.reshape(expected.shape), expected, atol=tolerance * np.abs(expected).max())
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_a_tied_model_has_no_separate_output_matrix(tmp_path, tiny):
    out = export_gguf(tiny, tmp_path / "tiny.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names


def test_the_cli_writes_gguf_and_an_ollama_modelfile(tmp_path, tiny, capsys):
    out = tmp_path / "tiny.gguf"
    cli.main(["export", str(tiny), "--gguf", str(out), "--type", "q8_0"])
    assert "wrote" in capsys.readouterr().out
    modelfile = (tmp_path / "tiny.Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "<|im_start|>{{ .Role }}" in modelfile


def run_cli(*argv: str) -> tuple[int, str]:
    completed = subprocess.run([sys.executable, "-m", "qwen3", *argv], capture_output=True, text=True, timeout=120)
    return completed.returncode, completed.stderr


def test_bad_input_is_a_one_line_error_and_nothing_is_overwritten(tmp_path, tiny):
    code, err = run_cli("export", str(tmp_path), "--gguf", str(tmp_path / "x.gguf"))
    assert code == 2 and "not a checkpoint folder" in err and "Traceback" not in err
    existing = tmp_path / "kept.gguf"
    existing.write_bytes(b"precious")
    code, err = run_cli("export", str(tiny), "--gguf", str(existing))
    assert code == 2 and "exists; pass --force" in err and existing.read_bytes() == b"precious"
    code, err = run_cli("export", str(tiny), "--gguf", str(tmp_path / "y.gguf"), "--type", "q4_k")
    assert code == 2 and "invalid choice" in err


def test_a_failed_export_leaves_the_old_file_and_no_temporary(tmp_path, tiny, monkeypatch):
    import qwen3.infer.export

    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")

    def broken(tensor, kind):
        raise OSError("disk full")

    monkeypatch.setattr(qwen3.infer.export, "convert", broken)
    with pytest.raises(OSError):
        export_gguf(tiny, out, "f16", force=True)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


# ------------------------------------------------------------------------------------------------
# The real llama.cpp (built once by scripts/build-llama-cpp.sh, cached outside the clone)


@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    completed = subprocess.run([str(ROOT / "scripts" / "build-llama-cpp.sh")], capture_output=True, text=True,
                               timeout=5400)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return Path(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run trained for 150 steps on the embedded corpus: greedy text that means something."""
    folder = tmp_path_factory.mktemp("trained")
    cli.main(["train", "--preset", "tiny", "--out", str(folder / "run"), "--max-steps", "150",
              "--set", f"cache_dir={folder / 'cache'}", "--set", "device=cpu", "--set", "dtype=float32",
              "--set", "eval_interval=150"])
    return folder / "run" / "best"


def run_llama_tool(command: list[str], complete: Callable[[subprocess.CompletedProcess], bool]):
    """Run a llama.cpp tool until its output is complete. Its output goes through llama.cpp's
    asynchronous log, whose writer thread is not flushed at exit: when the tool's compute threads
    hold every core the writer falls behind and the output is lost (exit code 0, nothing after
    start-up; 15 runs of 50 on two cores with the default threads). The tools that compute run with
    one thread (`-t 1`, 1 run of 200 lost) and a lost run is repeated, up to five times."""
    for _ in range(5):
        completed = subprocess.run(command, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
        assert completed.returncode == 0, completed.stderr[-3000:]
        if complete(completed):
            return completed
    raise AssertionError(f"{Path(command[0]).name} printed no complete output in 5 runs: {completed.stderr[-2000:]!r}")


def llama_greedy(binaries: Path, model: Path, prompt: str, tokens: int) -> str:
    """llama-completion's greedy continuation of `prompt`, computed exactly: float32 KV cache and no
    flash attention (whose CPU kernel rounds K and V to float16), so that near-ties of a random model
    fall the same way. A random model may emit single bytes that are not UTF-8 on their own: decoded
    with replacement characters, as our tokenizer decodes them."""
    completed = run_llama_tool(
        [str(binaries / "llama-completion"), "-m", str(model), "-p", prompt, "-n", str(tokens), "-t", "1", "-no-cnv",
         "--temp", "0", "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--simple-io", "--no-display-prompt"],
        lambda done: done.stdout.endswith(b"\n\n"))  # the blank line it always prints last
    text = completed.stdout.decode("utf-8", errors="replace").removesuffix("\n\n")
    return text.removesuffix(" [end of text]\n")  # printed when an end-of-generation token came


def ours_greedy(checkpoint: Path, prompt: str, tokens: int, round_to: torch.dtype | None = None) -> str:
    """Our greedy continuation of `prompt`, the stopping token left out."""
    engine = load_engine(checkpoint, device="cpu")
    if round_to is not None:  # the weights as the export stored them
        with torch.no_grad():
            for parameter in engine.model.parameters():
                if parameter.ndim == 2:
                    parameter.copy_(parameter.to(round_to).float())
    completion = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=tokens))
    generated = completion.token_ids[:-1] if completion.finish_reason == "stop" else completion.token_ids
    return engine.tokenizer.decode(generated)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "f16"])
@pytest.mark.parametrize("which", ["trained", "odd"])
def test_llama_cpp_generates_what_we_generate(llama_cpp, trained, tokenizer, tmp_path, kind, which):
    checkpoint = trained if which == "trained" else odd_checkpoint(tmp_path / "odd", tokenizer)
    model = export_gguf(checkpoint, tmp_path / f"{which}.gguf", kind)
    for prompt in PROMPTS:
        theirs = llama_greedy(llama_cpp, model, prompt, 24)
        ours = ours_greedy(checkpoint, prompt, 24, torch.float16 if kind == "f16" else None)
        assert theirs == ours, (prompt, theirs, ours)


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_we_do(llama_cpp, trained, tmp_path):
    model = export_gguf(trained, tmp_path / "trained.gguf", "f32")
    tokenizer = load_tokenizer(trained)
    for text in [*PROMPTS, "Numbers 3:14 and 1234567, tabs\tand\n\nnewlines", "<|im_start|>user\nHi<|im_end|>"]:
        completed = run_llama_tool([str(llama_cpp / "llama-tokenize"), "-m", str(model), "-p", text, "--ids",
                                    "--log-disable"], lambda done: done.stdout.strip().startswith(b"["))
        ids = completed.stdout.decode().strip().splitlines()[-1]
        assert [int(i) for i in re.findall(r"\d+", ids)] == tokenizer.encode(text)


@pytest.mark.slow
@pytest.mark.parametrize("kind,tolerance", [("f32", 0.001), ("q8_0", 0.01)])
def test_llama_cpp_perplexity_matches_ours(llama_cpp, trained, tmp_path, kind, tolerance):
    model = export_gguf(trained, tmp_path / "trained.gguf", kind)
    text = "\n\n".join(kjv_books()[-1].split("\n\n")[:40])  # held-out text (the last book)
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    final = re.compile(rb"Final estimate: PPL = ([\d.]+)")
    # --no-repack: on CPUs with AMX, llama.cpp's repacked AMX int8 kernels crash (SIGSEGV) on this
    # model's q8_0 matrices; the plain CPU kernels compute the same perplexity.
    command = [str(llama_cpp / "llama-perplexity"), "-m", str(model), "-f", str(tmp_path / "text.txt"), "-c", "64",
               "-b", "64", "-t", "1", "--no-repack"]
    completed = run_llama_tool(command, lambda done: final.search(done.stderr + done.stdout))
    theirs = float(final.search(completed.stderr + completed.stdout).group(1))
    ours = chunked_perplexity(load_model(trained), load_tokenizer(trained).encode(text), 64)
    assert abs(theirs / ours - 1) < tolerance, (theirs, ours)
