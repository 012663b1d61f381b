"""What each weight width costs in quality: held-out perplexity of ours and of llama.cpp, width by width.

A trained checkpoint's perplexity on held-out text (the embedded King James Bible's last book, which
the training split leaves out) in ours float32, bfloat16, int8 and int4 and in llama.cpp's f32,
bf16, q8_0 and q4_0 exports of the same checkpoint (q4_0 by `llama-quantize` from the f32 export).
Both score the same way, llama-perplexity's: chunks of the model's context, each scoring its second
half. Each width is printed with its change against its own implementation's full-precision figure.

    python bench/quantized_perplexity.py --checkpoint runs/seed [--paragraphs 200]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import torch
from llamacpp_bench import gguf_file, llama_cpp_binaries

from qwen3.data.sources import kjv_books
from qwen3.data.tokenizer import load_tokenizer
from qwen3.infer.quantize import chunked_perplexity, quantize
from qwen3.model.checkpoint import find_checkpoint, load_model

OURS = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "int8": (torch.float32, "int8"),
        "int4": (torch.float32, "int4")}
THEIRS = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0", "int4": "q4_0"}


def llama_perplexity(binaries: Path, model: Path, text: Path, context: int) -> float:
    """llama-perplexity's final estimate. One thread, --no-repack and up to five runs, as in
    tests/test_export.py: its asynchronous log sometimes loses the output, and its AMX kernels crash on
    tiny q8_0 matrices."""
    for _ in range(5):
        completed = subprocess.run([str(binaries / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c",
                                    str(context), "-b", str(context), "-t", "1", "--no-repack"],
                                   capture_output=True, text=True)
        found = re.search(r"Final estimate: PPL = ([\d.]+)", completed.stderr + completed.stdout)
        if found is not None:
            return float(found.group(1))
    raise SystemExit(f"llama-perplexity printed no estimate in 5 runs:\n{completed.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint or run folder")
    parser.add_argument("--paragraphs", type=int, default=200, help="held-out paragraphs to score")
    args = parser.parse_args()
    folder = find_checkpoint(args.checkpoint)
    binaries = llama_cpp_binaries()
    text = "\n\n".join(kjv_books()[-1].split("\n\n")[:args.paragraphs])
    ids = load_tokenizer(folder).encode(text)
    context = min(load_model(folder, "meta").config.max_position_embeddings, 512)
    print(f"{folder}: {len(ids):,} held-out tokens in chunks of {context}, each scoring its second half")
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "text.txt").write_text(text, encoding="utf-8")
        rows = {}
        for width, (dtype, kind) in OURS.items():
            model = load_model(folder, dtype=dtype)
            rows[width] = [chunked_perplexity(quantize(model, kind) if kind else model, ids, context)]
            gguf = gguf_file(binaries, folder, THEIRS[width], Path(scratch))
            rows[width].append(llama_perplexity(binaries, gguf, Path(scratch) / "text.txt", context))
    ours_full, theirs_full = rows["float32"]
    print(f"\n  {'ours':10}{'perplexity':>12}{'vs float32':>12}    {'llama.cpp':10}{'perplexity':>12}{'vs f32':>10}")
    for width, (ours, theirs) in rows.items():
        print(f"  {width:10}{ours:12.3f}{100 * (ours / ours_full - 1):+11.2f}%    {THEIRS[width]:10}{theirs:12.3f}"
              f"{100 * (theirs / theirs_full - 1):+9.2f}%")


if __name__ == "__main__":
    main()
