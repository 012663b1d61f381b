"""Decoding speed of qwen3.infer.engine against transformers' `generate`, and what int8 costs.

Both run the same checkpoint folder on the same device in one process, interleaved repeat by repeat,
and every ratio compares numbers from this run. Each figure is the median of --repeats runs.

    decode tok/s      new tokens after the first, per second (batch 1 and batch 8)
    prefill tok/s     prompt tokens per second of the first forward pass
    first token       time to the first new token (prefill + one sampling step)
    int8              int8 linear layers (int8 weights, inputs per row) against float32: decode
                      speed at the checkpoint's shape and a wider one, and perplexity

    python bench/decode_bench.py                     # CPU, one thread, random seed-shape model
    python bench/decode_bench.py --device cuda
    python bench/decode_bench.py --checkpoint runs/seed --threads 2

Without --checkpoint the model has the seed shape (hidden 128, 3 layers, 4 heads, 2 KV heads,
head_dim 32, intermediate 512, vocab 8192) with random weights: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from qwen3.config import ModelConfig
from qwen3.data.tokenizer import load_tokenizer, train_tokenizer
from qwen3.infer.engine import Engine
from qwen3.infer.quantize import quantize
from qwen3.infer.sampling import SamplingParams
from qwen3.model.checkpoint import find_checkpoint, load_model, save_model
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.runtime import device_name, resolve_device, synchronize

# Public-domain text (Genesis 1:1-8, King James Version) for the perplexity comparison.
TEXT = """In the beginning God created the heaven and the earth. And the earth was without form, and
void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the
waters. And God said, Let there be light: and there was light. And God saw the light, that it was
good: and God divided the light from the darkness. And God called the light Day, and the darkness he
called Night. And the evening and the morning were the first day. And God said, Let there be a
firmament in the midst of the waters, and let it divide the waters from the waters. And God made the
firmament, and divided the waters which were under the firmament from the waters which were above
the firmament: and it was so. And God called the firmament Heaven. And the evening and the morning
were the second day."""


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def seconds(function: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    start = clock()
    function()
    synchronize(device)
    return clock() - start


def random_checkpoint(folder: Path, config: ModelConfig, dtype: torch.dtype = torch.float32) -> Path:
    torch.manual_seed(0)
    save_model(Qwen3ForCausalLM(config).to(dtype), folder, tokenizer=train_tokenizer([TEXT], vocab_size=512))
    return folder


def seed_shape_checkpoint(folder: Path) -> Path:
    return random_checkpoint(folder, ModelConfig(
        vocab_size=8192, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256))


def wide_checkpoint(folder: Path) -> Path:
    """Qwen3-0.6B's layer width (4 of its 28 layers): where int8's smaller weights start to pay."""
    return random_checkpoint(folder, ModelConfig(
        vocab_size=8192, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=256))


class Contenders:
    """Ways to generate exactly `new` tokens greedily for a batch of equal-length prompts."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, compile: bool) -> None:
        tokenizer = load_tokenizer(folder)
        self.ours = {"ours": Engine(load_model(folder, device, dtype), tokenizer)}
        if compile:
            self.ours["ours compiled"] = Engine(load_model(folder, device, dtype), tokenizer, compile=True)
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.hf_config = copy.deepcopy(self.hf.generation_config)
        self.hf_config.eos_token_id = None  # always generate the full count, as ours below
        self.hf_config.pad_token_id = 0
        self.hf_config.do_sample = False

    def run_ours(self, name: str, prompts: list[list[int]], new: int) -> None:
        params = SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=[])
        self.ours[name].generate_batch(prompts, params)

    def run_hf(self, prompts: list[list[int]], new: int) -> None:
        input_ids = torch.tensor(prompts, device=self.hf.device)
        self.hf_config.max_new_tokens = new
        with torch.inference_mode():
            self.hf.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=self.hf_config)

    def names(self) -> list[str]:
        return [*self.ours, "transformers"]

    def runner(self, name: str) -> Callable[[list[list[int]], int], None]:
        if name == "transformers":
            return self.run_hf
        return lambda prompts, new: self.run_ours(name, prompts, new)


def measure(contenders: Contenders, batch: int, prompt_tokens: int, new_tokens: int, repeats: int,
            device: torch.device, vocab: int, clock: Callable[[], float]) -> dict[str, dict[str, float]]:
    """First-token time from 1-token runs, decode rate from the rest of `new_tokens`-token runs."""
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(10, vocab, (batch, prompt_tokens), generator=generator).tolist()
    results: dict[str, dict[str, list[float]]] = {n: {"first": [], "total": []} for n in contenders.names()}
    for name in contenders.names():  # warm-up (and compilation)
        contenders.runner(name)(prompts, new_tokens)
    for _ in range(repeats):  # interleaved, so a slow spell of a shared machine hits everyone
        for name in contenders.names():
            run = contenders.runner(name)
            results[name]["first"].append(seconds(lambda: run(prompts, 1), device, clock))
            results[name]["total"].append(seconds(lambda: run(prompts, new_tokens), device, clock))
    summary = {}
    for name, times in results.items():
        first, total = statistics.median(times["first"]), statistics.median(times["total"])
        summary[name] = {"first_token_ms": first * 1e3, "prefill_tok_s": batch * prompt_tokens / first,
                         "decode_tok_s": batch * (new_tokens - 1) / (total - first)}
    return summary


def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(ids[None, :-1]).float()
    return math.exp(torch.nn.functional.cross_entropy(logits[0], ids[1:]).item())


def int8_comparison(folder: Path, label: str, repeats: int, new_tokens: int,
                    clock: Callable[[], float]) -> None:
    """Decode speed and perplexity of int8 (int8 weights, inputs per row) against float32."""
    tokenizer = load_tokenizer(folder)
    models = {"float32": load_model(folder, "cpu"), "int8": quantize(load_model(folder, "cpu"), "int8")}
    engines = {name: Engine(model, tokenizer) for name, model in models.items()}
    context = models["float32"].config.max_position_embeddings
    ids = torch.tensor((tokenizer.encode(TEXT) * context)[:context])
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, stop_token_ids=[])
    prompt = ids[:16].tolist()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():  # warm-up
        engine.generate(prompt, params)
    for _ in range(repeats):
        for name, engine in engines.items():
            times[name].append(seconds(lambda: engine.generate(prompt, params), torch.device("cpu"), clock))
    speed = {name: new_tokens / statistics.median(values) for name, values in times.items()}
    ppl = {name: perplexity(model, ids) for name, model in models.items()}
    print(f"  {label:34} {speed['float32']:9.0f} {speed['int8']:9.0f} ({speed['int8'] / speed['float32']:4.2f}x)"
          f"   {ppl['float32']:10.3f} {ppl['int8']:10.3f} ({100 * (ppl['int8'] / ppl['float32'] - 1):+.2f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint or run folder (default: random seed-shape model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 comparison")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time: on a CPU shared with other jobs "
                             "CPU time estimates an idle machine's speed better (use with --threads 1)")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as scratch:
        folder = (find_checkpoint(args.checkpoint) if args.checkpoint
                  else seed_shape_checkpoint(Path(scratch) / "seed-shape"))
        config = load_model(folder, "meta").config
        print(f"checkpoint {args.checkpoint or 'random seed shape'}: hidden {config.hidden_size}, "
              f"{config.num_hidden_layers} layers, vocab {config.vocab_size}, context "
              f"{config.max_position_embeddings}")
        print(f"device {device} ({device_name(device)}), "
              f"dtype {args.dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"torch.set_num_threads({args.threads}) of {torch.get_num_interop_threads()} interop; "
              f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new, median of {args.repeats}, "
              f"{args.clock} clock")
        contenders = Contenders(folder, device, dtype, compile=not args.no_compile)
        for batch in (1, 8):
            summary = measure(contenders, batch, args.prompt_tokens, args.new_tokens, args.repeats,
                              device, config.vocab_size, clock)
            baseline = summary["transformers"]
            print(f"\nbatch {batch}:{'':18}decode tok/s   prefill tok/s   first token ms")
            for name, row in summary.items():
                ratio = row["decode_tok_s"] / baseline["decode_tok_s"]
                print(f"  {name:22} {row['decode_tok_s']:10.0f} ({ratio:4.2f}x) {row['prefill_tok_s']:11.0f}"
                      f" {row['first_token_ms']:12.2f}")
        if not args.no_int8:
            print(f"\nint8 (int8 weights, inputs per row) against float32 on CPU, batch 1, {args.new_tokens} "
                  f"new tokens:\n  {'':34} float32 tok/s  int8 tok/s     perplexity float32 / int8 "
                  f"on {config.max_position_embeddings} tokens of Genesis 1")
            int8_comparison(folder, args.checkpoint or "random seed shape", args.repeats, args.new_tokens, clock)
            int8_comparison(wide_checkpoint(Path(scratch) / "wide"), "random, hidden 1024, 4 layers",
                            args.repeats, args.new_tokens, clock)


if __name__ == "__main__":
    main()
