"""The ``q8chat`` command: serve | quantize | eval | bench. Each subcommand's module is imported only when that
subcommand runs: ``q8chat serve`` loads no quantization or benchmark code, and ``q8chat --help`` no torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name: (module, the function that adds its arguments to a parser, one-line help); serve has its own parser
SUBCOMMANDS = {
    "quantize": ("quant.cli", "configure_quantize", "SmoothQuant a float model into an INT8 checkpoint"),
    "eval": ("quant.cli", "configure_eval", "perplexity and LAMBADA accuracy of float vs INT8 variants"),
    "bench": ("bench.speed", "configure_bench", "decode speed and time to first token, float vs INT8, as ratios"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from server.__main__ import main as serve

        return serve(argv[1:])

    parser = argparse.ArgumentParser(
        prog="q8chat", description="SmoothQuant INT8 chat models served on one CPU socket."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="OpenAI-compatible chat server (q8chat serve --help)")
    module = None
    for name, (module_name, configure, help_text) in SUBCOMMANDS.items():
        subparser = commands.add_parser(name, help=help_text)
        if argv[:1] == [name]:
            module = importlib.import_module(module_name)
            getattr(module, configure)(subparser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request; the bench polls /health
    try:
        return args.run(args)
    except module.USER_ERRORS as exc:
        print(f"q8chat {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
