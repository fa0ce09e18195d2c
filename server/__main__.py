"""Composition root of ``q8chat serve``: settings -> CPU placement -> HTTP server up (health 503) ->
model loaded or quantized -> engine -> service -> health 200."""

from __future__ import annotations

import logging
import sys
import threading
import time

from server.settings import Settings

log = logging.getLogger("q8chat")


def build_service(settings: Settings):
    """Load (or quantize and cache) the INT8 model and wire engine, prompter and service."""
    from prompts import load_template
    from quant.cli import parse_alpha
    from quant.smoothquant import Recipe
    from quant.store import load_int8_model
    from server.engine import Engine
    from server.serving import ChatService, Prompter

    recipe = Recipe(alpha=parse_alpha(settings.alpha), scheme=settings.scheme, calib_samples=settings.calib_samples)
    quantized = load_int8_model(settings.model, recipe, settings.cache_dir)
    tokenizer = quantized.tokenizer
    template = load_template(settings.template, tokenizer.chat_template, tokenizer.eos_token)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    generation_eos = getattr(quantized.model.generation_config, "eos_token_id", None)
    eos |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos] if generation_eos is not None else [])
    context = settings.context_length or quantized.model.config.max_position_embeddings
    engine = Engine(quantized.model, tokenizer, context, eos)
    name = settings.served_model_name or quantized.name
    log.info("model %s ready: template %s, context %d tokens, scheme %s", name, template.name, context,
             quantized.manifest["recipe"]["scheme"])
    return ChatService(engine, Prompter(tokenizer, template), name, settings.max_queue, settings.default_max_tokens)


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from server.placement import place
    placement = place(settings.socket, settings.threads)
    log.info("placement: %s", placement.describe())

    import uvicorn
    from server.app import HttpSettings, ServiceSlot, create_app

    slot = ServiceSlot()
    app = create_app(slot, HttpSettings(max_body_bytes=settings.max_body_bytes, keepalive_s=settings.keepalive_s))
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level=settings.log_level, timeout_graceful_shutdown=30))
    failed = threading.Event()

    def load() -> None:
        start = time.perf_counter()
        try:
            slot.service = build_service(settings)
        except Exception as exc:  # one clear line, then stop the server
            log.error("cannot start: %s", exc)
            log.debug("start-up failure", exc_info=exc)
            failed.set()
            server.should_exit = True
            return
        log.info("ready in %.1f s on http://%s:%d", time.perf_counter() - start, settings.host, settings.port)

    threading.Thread(target=load, name="q8chat-load", daemon=True).start()
    server.run()
    return 1 if failed.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
