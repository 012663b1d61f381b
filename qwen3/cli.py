"""The `qwen3` command line: prepare, train, sft, eval, compare, generate, chat, serve, export.

Each command parses its flags here and calls into the module that does the work; heavy imports
happen inside the command so `qwen3 --help` is instant. A `UserError` is printed as one line on
stderr with exit code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from qwen3.errors import UserError


def cmd_prepare(args: argparse.Namespace) -> None:
    from qwen3.config import TrainConfig
    from qwen3.data.store import prepare

    defaults = TrainConfig()
    data = prepare(args.data, tokenizer=args.tokenizer or "",
                   vocab_size=args.vocab_size or defaults.tokenizer_vocab_size,
                   val_fraction=defaults.val_fraction, cache_dir=defaults.cache_dir)
    print(f"sources:        {', '.join(data.sources)}")
    print(f"documents:      {data.documents:,} ({data.train_documents:,} train, {data.val_documents:,} validation)")
    print(f"bytes:          {data.bytes:,} ({data.train_bytes:,} train, {data.val_bytes:,} validation)")
    print(f"tokens:         {data.tokens:,} ({len(data.train_tokens):,} train, {len(data.val_tokens):,} validation)")
    print(f"bytes/token:    {data.bytes_per_token:.3f} (vocabulary {data.tokenizer.vocab_size:,}, "
          f"stored as {data.train_tokens.dtype.name})")
    print(f"tokenizer:      {data.tokenizer_path} ({'trained now' if data.tokenizer_trained else 'reused'})")
    print(f"token store:    {data.store_dir} ({'reused from the cache' if data.reused else 'built now'})")


def cmd_train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from qwen3.config import apply_overrides, load_toml, parse_set_arguments, resolve
    from qwen3.train.loop import train
    from qwen3.train.start import init_checkpoint, resume_configs

    # The dedicated flags win over --set, which wins over the TOML file, which wins over the preset
    # (or, with --resume, over the resumed run's saved configs).
    flags = {name: value for name, value in (
        ("data", args.data), ("out_dir", args.out), ("max_steps", args.max_steps),
        ("optimizer", args.optimizer), ("compile", args.compile), ("lora_rank", getattr(args, "lora_rank", None)),
        ("lora_alpha", getattr(args, "lora_alpha", None)), ("lora_targets", getattr(args, "lora_targets", None)),
        ("reward", getattr(args, "reward", None)), ("group_size", getattr(args, "group_size", None)),
        ("thinking", getattr(args, "thinking", None)), ("dpo_beta", getattr(args, "beta", None)))
        if value is not None}
    if args.resume and args.init_from:
        raise UserError("--init-from starts a new run; --resume continues one: give one of them")
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UserError("--out cannot differ from --resume: a resumed run continues in its own folder")
        overrides = {**(load_toml(args.config) if args.config else {}),
                     **parse_set_arguments(args.set), **flags}
        model_config, train_config = resume_configs(args.resume, overrides)
        result = train(model_config, train_config, resume=True)
    else:
        model = None
        if args.init_from:
            folder, model = init_checkpoint(args.init_from)
            flags["init_from"] = str(folder)
        model_config, train_config = resolve(args.preset, args.config, args.set, model=model)
        model_config, train_config = apply_overrides(model_config, train_config, flags)
        result = train(model_config, train_config)
    if result.interrupted:
        sys.exit(130)
    if not is_main_process():  # under torchrun, rank 0 reports
        return
    if result.final_eval is not None:
        print(f"step {result.step}: validation {result.final_eval.summary()}")
    best = f" (validation {result.best_summary})" if result.best_summary else ""
    print(f"best checkpoint: {result.out_dir / 'best'}{best}")


def cmd_stage(args: argparse.Namespace) -> None:
    """`qwen3 sft|rl|dpo DIR` is `qwen3 train --preset sft|rl|dpo --init-from DIR`, with the output
    beside DIR by default (DIR-sft, DIR-rl, DIR-dpo)."""
    args.preset, args.init_from, args.resume, args.optimizer = args.command, args.dir, None, None
    args.out = args.out or f"{str(args.dir).rstrip('/')}-{args.command}"
    cmd_train(args)


def cmd_eval(args: argparse.Namespace) -> None:
    from qwen3.train.evaluate import evaluate_checkpoint

    result, info = evaluate_checkpoint(args.dir, args.data)
    print(f"checkpoint:   {info['checkpoint']}")
    print(f"data:         {', '.join(info['sources'])} ({info['split']})")
    for label, value in result.report():
        print(f"{label + ':':<14}{value}")


def cmd_compare(args: argparse.Namespace) -> None:
    from qwen3.train.compare import compare, table

    summaries, _ = compare(args.runs, args.out)
    print(table(summaries))
    print(f"wrote {args.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from qwen3.infer.engine import load_engine
    from qwen3.infer.sampling import SamplingParams

    SamplingParams.resolve(vars(args))  # a bad setting is refused before the model loads
    engine = load_engine(args.dir, device=args.device, quantize=args.quantize, compile=args.compile, dtype=args.dtype)
    params = SamplingParams.resolve(vars(args), engine.sampling_defaults)
    for piece in engine.stream(args.prompt, params):  # the generated text alone, as it comes
        sys.stdout.write(piece)
        sys.stdout.flush()
    if sys.stdout.isatty():
        sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from qwen3.infer.chat import run_chat

    run_chat(args.dir, vars(args), device=args.device, quantize=args.quantize, compile=args.compile,
             thinking=False if args.no_think else None, dtype=args.dtype)


def cmd_serve(args: argparse.Namespace) -> None:
    from qwen3.server.app import serve

    serve(args.dir, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          device=args.device, max_seq_len=args.max_seq_len, chat_max_tokens=args.default_max_tokens,
          compile=args.compile, dtype=args.dtype, quantize=args.quantize)


def cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from qwen3.data.tokenizer import SPECIAL_TOKENS
    from qwen3.infer.export import export_gguf, write_modelfile

    out = export_gguf(args.dir, args.gguf, args.type, force=args.force)
    modelfile = write_modelfile(Path(out), [token for token in SPECIAL_TOKENS if token != "<|im_start|>"])
    print(f"wrote {out} ({Path(out).stat().st_size / 1e6:,.1f} MB, {args.type}) and {modelfile}")
    print(f"  llama.cpp: llama-cli -m {out} -cnv    Ollama: ollama create NAME -f {modelfile}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen3", description="Train, evaluate, chat with and serve a Qwen3 model built from scratch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser("prepare", help="train a tokenizer and build the token store")
    prepare.add_argument("--data", action="append", default=[], metavar="SRC",
                         help="a .txt/.jsonl/.json/.parquet file, a folder, or hf:NAME (repeatable); "
                              "default: the embedded King James Bible")
    tokenizer_choice = prepare.add_mutually_exclusive_group()
    tokenizer_choice.add_argument("--tokenizer", metavar="PATH",
                                  help="use this tokenizer.json or model folder instead of training one")
    tokenizer_choice.add_argument("--vocab-size", type=int, metavar="N", help="vocabulary size to train")
    prepare.set_defaults(handler=cmd_prepare)

    train = commands.add_parser("train", help="train a model")
    train.add_argument("--preset", default="seed", help="named configuration (seed, tiny, qwen3-0.6b)")
    train.add_argument("--config", metavar="FILE.toml", help="TOML file with [model] and [train] tables")
    train.add_argument("--data", action="append", default=None, metavar="SRC", help="training text (repeatable)")
    train.add_argument("--out", metavar="DIR", help="run folder")
    train.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from DIR/last")
    train.add_argument("--init-from", metavar="DIR",
                       help="start from this checkpoint's weights and tokenizer (any Hugging Face Qwen3 "
                            "folder; a run folder means its best/): fresh optimizer and schedule")
    train.add_argument("--optimizer", choices=["muon", "adamw"])
    add_run_options(train, "any model or train config field")
    train.set_defaults(handler=cmd_train)

    sft = add_stage_command(commands, "sft", "chat fine-tuning: the loss on the assistant's replies",
                            "conversations: .jsonl/.json/.parquet with messages, ShareGPT conversations or "
                            "prompt/completion (repeatable); default: the embedded set built from the corpus")
    rl = add_stage_command(commands, "rl", "reinforcement learning with verifiable rewards (GRPO)",
                           "prompts: .jsonl/.json/.parquet records with 'messages' ending with a user turn, their "
                           "other fields for the reward (repeatable); default: the embedded book task")
    rl.add_argument("--reward", metavar="NAME|MODULE:FUNCTION",
                    help="a built-in reward (book, math) or reward(completion, record) -> float of yours")
    rl.add_argument("--group-size", type=int, metavar="G", help="completions sampled per prompt (default 8)")
    rl.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                    help="render prompts with thinking on or off (templates that have it; default: the template's)")
    dpo = add_stage_command(commands, "dpo", "direct preference optimization on chosen/rejected pairs",
                            "pairs in TRL's preference format: prompt, chosen, rejected (repeatable); "
                            "default: the embedded book pairs")
    dpo.add_argument("--beta", type=float, metavar="B", help="DPO's beta: how far from the reference (default 0.1)")
    for command in (sft, rl, dpo):
        command.set_defaults(handler=cmd_stage)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on validation data")
    evaluate.add_argument("dir", metavar="DIR", help="checkpoint folder or run folder")
    evaluate.add_argument("--data", action="append", default=None, metavar="SRC")
    evaluate.set_defaults(handler=cmd_eval)

    compare = commands.add_parser("compare", help="runs side by side: validation curves (PNG) and final metrics")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run folders (those still training too)")
    compare.add_argument("--out", default="compare.png", metavar="FILE.png",
                         help="the figure to write (default: compare.png here)")
    compare.set_defaults(handler=cmd_compare)

    generate = commands.add_parser("generate", help="continue a prompt")
    generate.add_argument("dir", metavar="DIR", help="checkpoint folder or run folder")
    add_sampling_arguments(generate)
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="interactive chat")
    chat.add_argument("dir", metavar="DIR", help="checkpoint folder or run folder")
    add_sampling_arguments(chat)
    chat.add_argument("--no-think", action="store_true",
                      help="start with thinking off (the chat template's enable_thinking=false; /think turns it on)")
    chat.set_defaults(handler=cmd_chat)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP API and web chat page")
    serve.add_argument("dir", metavar="DIR", help="checkpoint folder or run folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API")
    serve.add_argument("--max-batch", type=int, default=16, metavar="N",
                       help="most sequences decoded together (each has a KV-cache slot of --max-seq-len)")
    serve.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                       help="positions (prompt + reply) per sequence; default: the model's context, or the largest "
                            "power of two whose slots fit half the free memory")
    serve.add_argument("--default-max-tokens", type=int, default=1024, metavar="N",
                       help="reply length of a chat request without max_tokens (at most what the context leaves)")
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step (CUDA graphs on a GPU)")
    add_quantize_argument(serve)
    add_device_arguments(serve)
    serve.set_defaults(handler=cmd_serve)

    export = commands.add_parser("export", help="write a checkpoint as GGUF for llama.cpp, Ollama, LM Studio")
    export.add_argument("dir", metavar="DIR", help="checkpoint folder or run folder")
    export.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write")
    export.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                        help="weight type (norm gains stay f32)")
    export.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    export.set_defaults(handler=cmd_export)
    return parser


def add_stage_command(commands: Any, name: str, summary: str, data_help: str) -> argparse.ArgumentParser:
    """A training stage that starts from a checkpoint: `qwen3 NAME DIR` with its data and the options
    every such stage shares."""
    parser = commands.add_parser(name, help=summary)
    parser.add_argument("dir", metavar="DIR", help="checkpoint or run folder to start from")
    parser.add_argument("--data", action="append", default=None, metavar="FILE", help=data_help)
    parser.add_argument("--out", metavar="DIR", help=f"run folder (default: DIR-{name})")
    parser.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps")
    parser.add_argument("--lora-rank", type=int, metavar="R", help="train LoRA adapters of rank R (0: every weight)")
    parser.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA scale numerator (default 16)")
    parser.add_argument("--lora-targets", metavar="NAMES",
                        help="comma-separated projections to adapt (default: q,k,v,o,gate,up,down _proj)")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file with a [train] table")
    add_run_options(parser, "any train config field")
    return parser


def add_run_options(parser: argparse.ArgumentParser, settable: str) -> None:
    """The options every training command shares: compilation and `--set` overrides of `settable`."""
    parser.add_argument("--compile", action="store_true", default=None, help="use torch.compile")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override {settable} (repeatable)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    model = "default: the model's generation_config.json, else"
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    parser.add_argument("--temperature", type=float, metavar="T", help=f"0 is greedy ({model} 0.8)")
    parser.add_argument("--top-k", type=int, metavar="K", help=f"0 disables ({model} 0)")
    parser.add_argument("--top-p", type=float, metavar="P", help=f"{model} 1.0")
    parser.add_argument("--min-p", type=float, metavar="P", help=f"{model} 0.0")
    parser.add_argument("--repetition-penalty", type=float, metavar="R", help=f"{model} 1.0")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT")
    add_quantize_argument(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    add_device_arguments(parser)


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="CPU inference with int8 or int4 linear layers (docs/generation.md)")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Where inference runs and in which dtype its weights are held."""
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the weights' dtype; auto: a 16-bit checkpoint in bfloat16 where the device "
                             "multiplies it natively, else float32")


def is_main_process() -> bool:
    """False in the processes torchrun starts beside rank 0."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as error:
        # Under torchrun every process meets the same user error (the checks are the same on all,
        # or rank 0's outcome is shared): rank 0 says it, every process exits with code 2.
        if is_main_process():
            print(f"qwen3 {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
