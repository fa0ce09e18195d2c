"""The ``q8chat`` command: serve | quantize | eval | bench."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from server.__main__ import main as serve
        return serve(argv[1:])

    from bench.llamacpp import LlamaCppUnavailable
    from bench.speed import add_bench_parser
    from quant.cli import USER_ERRORS, add_eval_parser, add_quantize_parser

    parser = argparse.ArgumentParser(prog="q8chat", description="SmoothQuant INT8 chat models served on one CPU socket.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="OpenAI-compatible chat server (q8chat serve --help)")
    add_quantize_parser(commands)
    add_eval_parser(commands)
    add_bench_parser(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request; the bench polls /health
    try:
        return args.run(args)
    except (*USER_ERRORS, LlamaCppUnavailable) as exc:
        print(f"q8chat {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
