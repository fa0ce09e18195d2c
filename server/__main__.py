"""Composition root of ``q8chat serve``: settings -> CPU placement -> HTTP server up (health 503) ->
model loaded or quantized -> engine -> service -> health 200."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from server.settings import Settings

log = logging.getLogger("q8chat")
ENGINE_STOP_S = 30.0  # after the HTTP server stopped: the longest a cancelled job takes to leave (one step)


def build_service(settings: Settings, metrics, placement):
    """Find (or quantize and cache) the INT8 checkpoint and wire decoder, engine, prompter and service. Its
    weights are read only if a step has to be compiled or run eagerly."""
    from prompts import load_template
    from quant.checkpoint import load_checkpoint, read_checkpoint_info, stored_weight_bytes
    from quant.families import context_window, family_of
    from quant.kernels import kernels_by_step
    from quant.smoothquant import Recipe
    from quant.store import int8_checkpoint
    from server.engine.engine import Engine
    from server.engine.grammar import Grammars
    from server.engine.prefix_cache import PrefixCache
    from server.runtime.aoti.steps import package_paths
    from server.runtime.compact import kv_dtype_for
    from server.runtime.decoders import make_decoder
    from server.runtime.placement import cpu_isa
    from server.service.prompter import Prompter
    from server.service.serving import ChatService

    recipe = Recipe(
        alpha=None if settings.alpha == "auto" else settings.alpha,
        scheme=settings.scheme,
        calib_samples=settings.calib_samples,
    )
    checkpoint = read_checkpoint_info(int8_checkpoint(settings.model, recipe, settings.cache_dir))
    log.info("INT8 checkpoint %s", checkpoint.path)

    def eager_model():
        log.info("loading the INT8 weights of %s", checkpoint.path)
        return load_checkpoint(checkpoint.path).model

    tokenizer, config = checkpoint.tokenizer, checkpoint.config
    family = family_of(config.model_type)
    template = load_template(settings.template, tokenizer.chat_template, tokenizer.eos_token, family.chat_format)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(config, "eos_token_id", None)  # what the model's generation config defaults to
    eos |= set(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
    context = settings.context_length or context_window(config)
    weights = stored_weight_bytes(checkpoint.path)
    kernels = kernels_by_step(settings.int8_kernel, weights)
    kv_dtype = kv_dtype_for(settings.kv_cache_dtype, config, settings.max_batch, settings.compile)
    packages = (
        package_paths(settings.cache_dir, checkpoint.path, context, kernels, kv_dtype, settings.max_batch)
        if settings.compile
        else None
    )
    decoder = make_decoder(eager_model, config, context, packages, kernels, kv_dtype, settings.max_batch)
    kept = PrefixCache(int(settings.kv_cache_mb * 2**20)) if settings.kv_cache_mb else None
    engine = Engine(decoder, tokenizer, context, eos, kept)
    name = settings.served_model_name or checkpoint.name
    log.info(
        "serving %s on %s; ISA %s; weights %.1f MB, INT8 %s (%d layers with BF16 activations); template %s; "
        "context %d tokens; %s",
        name,
        placement.describe(),
        cpu_isa(),
        weights / 1e6,
        checkpoint.manifest["recipe"]["scheme"],
        len(checkpoint.manifest["fallback"]),
        template.name,
        context,
        decoder.description,
    )
    return ChatService(
        engine,
        Prompter(tokenizer, template),
        name,
        settings.max_queue,
        settings.default_max_tokens,
        metrics,
        heartbeat_s=settings.keepalive_s,
        grammars=Grammars(tokenizer, config.vocab_size),
        prefill_chunk=settings.prefill_chunk,
    )


def return_freed_memory() -> None:
    """Hand the heap freed by loading back to the OS. With both steps compiled, the eager model's weights
    (copies of what the compiled steps hold) are garbage once the service is built, but glibc keeps freed heap
    mapped: 180 MB of the default model's resident memory until ``malloc_trim``. What is left lives as long as
    the server: frozen out of the garbage collector's reach, so that a collection while decoding does not walk
    every object that torch, transformers and the model made (a few % of a small model's decode time)."""
    import gc

    from server.runtime import heap

    heap.release_garbage()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    try:
        settings = Settings.from_args(sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:  # a bad flag fails here, before anything starts
        problems: dict[str, list[str]] = {}
        for error in exc.errors():
            problems.setdefault("--" + str(error["loc"][0]).replace("_", "-"), []).append(error["msg"])
        problems = "; ".join(f"{flag}: {', or '.join(messages)}" for flag, messages in problems.items())
        print(f"q8chat serve: error: {problems}", file=sys.stderr)
        return 2
    # inductor's kernel cache lives with our checkpoints (and in the Docker volume); set before torch loads
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(settings.cache_dir).expanduser() / "inductor"))
    from server.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)

    from server.runtime.placement import place

    placement = place(settings.socket, settings.threads)
    log.info("placement: %s", placement.describe())

    import uvicorn

    from server.http.app import HttpSettings, ServiceSlot, create_app
    from server.http.wire import JsonErrorsH11Protocol

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: waiting requests get 503 at once; the running generation may finish
        within the grace period. A SIGTERM shutdown is a success (exit 0): uvicorn would re-raise it."""

        def handle_exit(self, sig, frame) -> None:
            if slot.service is not None:
                asyncio.get_event_loop().call_soon_threadsafe(slot.service.queue.close)
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals.remove(sig)

    slot = ServiceSlot()
    app = create_app(
        slot,
        HttpSettings(
            max_body_bytes=settings.max_body_bytes,
            body_timeout_s=settings.body_timeout_s,
            api_keys=tuple(settings.api_key),
            cors_origins=tuple(settings.cors_origins),
        ),
    )
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            loop="uvloop",
            http=JsonErrorsH11Protocol,
            timeout_graceful_shutdown=settings.shutdown_grace_s,
        )
    )
    failed = threading.Event()

    def load() -> None:
        start = time.perf_counter()
        try:
            slot.service = build_service(settings, slot.metrics, placement)
            return_freed_memory()
        except Exception as exc:  # one clear line, then stop the server
            log.error("cannot start: %s", exc)
            log.debug("start-up failure", exc_info=exc)
            failed.set()
            server.should_exit = True
            return
        slot.metrics.model_load_seconds.set(time.perf_counter() - start)
        log.info("ready in %.1f s on http://%s:%d", time.perf_counter() - start, settings.host, settings.port)

    loader = threading.Thread(target=load, name="q8chat-load", daemon=True)
    loader.start()
    server.run()
    # the interpreter's exit under a thread that runs torch aborts ("terminate called without an active
    # exception"): the engine's thread is stopped first, and one that cannot be is left with os._exit
    if loader.is_alive():
        leave_now("stopped while loading the model")  # nothing the loader writes is used unfinished
    if slot.service is not None and not slot.service.close(ENGINE_STOP_S):
        leave_now(f"the engine was still computing {ENGINE_STOP_S:.0f} s after the server stopped")
    return 1 if failed.is_set() else 0


def leave_now(reason: str) -> None:
    """Exit at once (status 0: a shutdown that was asked for), past the threads still computing."""
    log.info("%s: leaving without waiting for it", reason)
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
