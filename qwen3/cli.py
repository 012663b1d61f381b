"""The `qwen3` command line: prepare, train, eval, generate, chat, serve.

Each command parses its flags here and calls into the module that does the work; heavy imports
happen inside the command so `qwen3 --help` is instant. A `UserError` is printed as one line on
stderr with exit code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys

from qwen3.errors import UserError


def cmd_prepare(args: argparse.Namespace) -> None:
    raise UserError("prepare is not available yet")


def cmd_train(args: argparse.Namespace) -> None:
    raise UserError("train is not available yet")


def cmd_eval(args: argparse.Namespace) -> None:
    raise UserError("eval is not available yet")


def cmd_generate(args: argparse.Namespace) -> None:
    raise UserError("generate is not available yet")


def cmd_chat(args: argparse.Namespace) -> None:
    raise UserError("chat is not available yet")


def cmd_serve(args: argparse.Namespace) -> None:
    raise UserError("serve is not available yet")


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
    train.add_argument("--optimizer", choices=["muon", "adamw"])
    train.add_argument("--compile", action="store_true", default=None, help="use torch.compile")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any model or train config field (repeatable)")
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on validation data")
    evaluate.add_argument("dir", metavar="DIR", help="checkpoint folder or run folder")
    evaluate.add_argument("--data", action="append", default=None, metavar="SRC")
    evaluate.set_defaults(handler=cmd_eval)

    generate = commands.add_parser("generate", help="continue a prompt")
    generate.add_argument("dir", metavar="DIR", help="checkpoint folder or run folder")
    add_sampling_arguments(generate)
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="interactive chat")
    chat.add_argument("dir", metavar="DIR", help="checkpoint folder or run folder")
    add_sampling_arguments(chat)
    chat.set_defaults(handler=cmd_chat)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP API and web chat page")
    serve.add_argument("dir", metavar="DIR", help="checkpoint folder or run folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API")
    serve.add_argument("--max-batch", type=int, default=16, metavar="N",
                       help="most sequences decoded together")
    serve.set_defaults(handler=cmd_serve)
    return parser


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 disables")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P")
    parser.add_argument("--min-p", type=float, default=0.0, metavar="P")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT")
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as error:
        print(f"qwen3 {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
