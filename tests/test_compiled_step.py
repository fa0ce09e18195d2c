"""Where compiled steps are kept, the static scheme compiled, and what a start does when a step cannot be built."""

import ctypes
import os
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from quant import kernels
from quant.smoothquant import Recipe
from server.runtime.aoti import steps as compiled_step
from server.runtime.aoti.steps import package_paths, prune_stale, source_digest
from server.runtime.compact import attention_mask, new_kv_caches
from server.runtime.decoders import StaticDecoder, make_decoder
from server.runtime.static_llama import StaticLlama
from tests.harness import quantized_tiny, tiny_checkpoint, tiny_llama, tiny_mpt


def test_a_step_is_keyed_by_context_length_kv_type_kernel_and_thread_count(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    bf16 = {"decode": "bf16", "prefill": "bf16"}
    first = package_paths(tmp_path, checkpoint, 256, bf16)
    assert set(first) == {"decode", "prefill"} and first["decode"].parent == tmp_path / "compiled"
    assert package_paths(tmp_path, checkpoint, 256, bf16) == first
    assert package_paths(tmp_path, checkpoint, 512, bf16)["decode"] != first["decode"]
    assert package_paths(tmp_path, checkpoint, 256, bf16, torch.float32)["decode"] != first["decode"]
    mixed = package_paths(tmp_path, checkpoint, 256, {**bf16, "prefill": "u8s8"})  # each step by its own kernel
    assert mixed["decode"] == first["decode"] and mixed["prefill"] != first["prefill"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert package_paths(tmp_path, checkpoint, 256, bf16)["decode"] != first["decode"]
    finally:
        torch.set_num_threads(threads)
    # a prompt step's weight-only layers follow oneDNN's cap (quant.kernels.bf16_prompt_gemm)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = package_paths(tmp_path, checkpoint, 256, bf16)
    assert (capped["prefill"] != first["prefill"]) == kernels.bf16_prompt_gemm(onednn_cap="")


@torch.no_grad()
@pytest.mark.parametrize("copy_limit", [kernels.PACKED_COPY_BYTES, -1], ids=["small-model", "large-model"])
def test_the_static_scheme_compiles_to_the_eager_logits(tmp_path, tokenizer, monkeypatch, copy_limit):
    """SmoothQuant's per-tensor static scheme (Q8-Chat's), both steps compiled, with a fallback layer
    (weight-only, as is the default recipe's head): prefill and teacher-forced decode logits are the eager
    compact model's, up to the rounding of fused kernels. Unless a BF16 GEMM is this CPU's choice for it
    (``bf16_prompt_gemm``), the prefill step does not convert the fallback layer's weights to BF16 for ATen's
    ``mm``. A model whose weight-only layers outweigh ``PACKED_COPY_BYTES`` has both steps read them as
    stored, by ATen's kernels: no template packs a copy of them; on AVX-512 VNNI CPUs without AMX its prompt
    step multiplies W8A8 with the decode step's micro-kernel rather than oneDNN's (``default_kernels``)."""
    monkeypatch.setattr(kernels, "PACKED_COPY_BYTES", copy_limit)
    model = tiny_llama(len(tokenizer))
    quantized_tiny(model, Recipe(alpha=None, scheme="static"))
    fallback = model.model.layers[0].mlp.down_proj
    fallback.scheme, fallback.input_scale = "weight_only", None
    weight_only_bytes = fallback.weight.nbytes + model.lm_head.weight.nbytes
    packages = {step: tmp_path / "compiled" / step for step in ("decode", "prefill")}
    compiled = make_decoder(lambda: model, model.config, 64, packages)
    assert compiled.description.startswith("compiled decode step and prefill step")
    decode, prefill = compiled._steps["decode"], compiled._steps["prefill"]
    assert "extern:mm" not in prefill.gemms or kernels.bf16_prompt_gemm(weight_only_bytes)
    stored = not kernels.packed_copies(weight_only_bytes)
    assert decode.gemms.get("extern:_weight_int8pack_mm", 0) == (2 if stored else 0)  # the fallback, the head
    if stored:
        assert prefill.gemms.get("extern:_weight_int8pack_mm", 0) + prefill.gemms.get("extern:mm", 0) == 2
    if kernels.default_kernels()["prefill"] == "s8s8" and not kernels.amx_int8():
        assert not any("qlinear" in kind for kind in prefill.gemms), prefill.gemms
    names = prefill.spans[0].container.constant_names()
    assert len({original for _, original in names}) < len(names)  # inductor gives some the same original name
    assert set(prefill.spans[0].constants) == {name for name, _ in names}  # each handed out
    net = StaticLlama(model, 64).eval()
    eager = StaticDecoder(64, new_kv_caches(model.config, 64), eager={"decode": net, "prefill": net})
    prompt = torch.randint(0, 2000, (20,), generator=torch.Generator().manual_seed(7)).tolist()

    def logits(decoder):
        return torch.stack(
            [decoder.forward(prompt, 0)] + [decoder.forward([token], 20 + i) for i, token in enumerate(prompt[:8])]
        )

    expected, got = logits(eager), logits(compiled)
    assert (got - expected).abs().max() < 0.1 * expected.std()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@torch.no_grad()
def test_a_large_models_steps_compile_a_span_of_layers_at_a_time(tmp_path, tokenizer, monkeypatch):
    """A step whose weights exceed ``SPAN_BYTES`` is built as spans of layers, each its own library, and run
    one after another: here three of one layer each. Prefill and decode logits are the eager compact
    model's, and a restart loads the spans it built. An MPT: its first span embeds with the table its last
    span's head reads (``test_static_llama`` cuts both families eagerly)."""
    model = tiny_mpt(len(tokenizer), layers=3)
    quantized_tiny(model)
    eager = make_decoder(lambda: model, model.config, 64, None)
    net = eager._steps["decode"]
    monkeypatch.setattr(compiled_step, "SPAN_BYTES", compiled_step.weight_bytes(net) // 3 + 1)
    assert compiled_step.layer_spans(net) == [range(0, 1), range(1, 2), range(2, 3)]
    packages = {step: tmp_path / "compiled" / step for step in ("decode", "prefill")}
    compiled = make_decoder(lambda: model, model.config, 64, packages)
    assert compiled.description.startswith("compiled decode step and prefill step")
    assert [len(step.spans) for step in compiled._steps.values()] == [3, 3]
    prompt = torch.randint(0, 2000, (20,), generator=torch.Generator().manual_seed(7)).tolist()

    def logits(decoder):
        return torch.stack(
            [decoder.forward(prompt, 0)] + [decoder.forward([token], 20 + i) for i, token in enumerate(prompt[:8])]
        )

    expected = logits(eager)
    for decoder in compiled, make_decoder(lambda: None, model.config, 64, packages):  # built, then loaded
        got = logits(decoder)
        assert (got - expected).abs().max() < 0.1 * expected.std()
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


@torch.no_grad()
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8], ids=["bf16-kv", "int8-kv"])
def test_the_batched_decode_step_compiles_to_what_each_sequence_computes_alone(tmp_path, tokenizer, kv_dtype):
    """Three slots, one idle: the compiled batched step's logits for each running sequence are those of its
    own compiled decode step (each slot's prompt prefilled on its region of the shared caches), and the eager
    compact model's."""
    model = tiny_llama(len(tokenizer))
    quantized_tiny(model)
    kernels = dict.fromkeys(compiled_step.STEPS, "s8s8")
    paths = package_paths(tmp_path, tmp_path, 64, kernels, kv_dtype, slots=3)
    assert set(paths) == {"decode", "prefill", "batch"}
    decoder = make_decoder(lambda: model, model.config, 64, paths, kernels, kv_dtype, slots=3)
    assert decoder.description.startswith("compiled decode step and prefill step and batch step")
    eager = make_decoder(lambda: model, model.config, 64, None, kernels, kv_dtype)
    prompts = [torch.randint(0, 2000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 17)]
    for slot, prompt in zip((0, 2), prompts, strict=True):
        decoder.forward(prompt, 0, slot)
    snapshots = [decoder.snapshot(len(prompt), slot)[0] for slot, prompt in zip((0, 2), prompts, strict=True)]
    batched = decoder.decode([5, 6], [9, 17], [0, 2])
    for slot, prompt, kept, token, row in zip((0, 2), prompts, snapshots, (5, 6), batched, strict=True):
        decoder.restore(kept, len(prompt), slot)
        alone = decoder.forward([token], len(prompt), slot)
        assert (row - alone).abs().max() < 0.05 * alone.std()
        eager.forward(prompt, 0)
        assert (alone - eager.forward([token], len(prompt))).abs().max() < 0.05 * alone.std()


@torch.no_grad()
def test_a_compiled_step_runs_to_its_end_while_another_thread_holds_the_gil(tmp_path, tokenizer):
    """The server's event loop holds the GIL while it streams: a step on the batcher's thread must not wait for
    it midway. Here another thread takes the GIL as the step lets it go, and keeps it for two seconds (a C call
    through ``PyDLL``, which does not release it): by then the step has written its token's values to the last
    layer's cache, the last thing it writes."""
    model = tiny_llama(len(tokenizer))
    quantized_tiny(model)
    kernels = dict.fromkeys(compiled_step.STEPS, "s8s8")
    paths = package_paths(tmp_path, tmp_path, 64, kernels, torch.bfloat16)
    make_decoder(lambda: model, model.config, 64, paths, kernels, torch.bfloat16)  # builds the steps
    container = compiled_step.load(paths["decode"]).spans[0].container
    caches = new_kv_caches(model.config, 64, torch.bfloat16)
    inputs = [torch.tensor([[8]]), torch.tensor([3]), attention_mask(64, 3, 1, compiled=True), *caches]
    row = caches[-1][0, 0, 3]
    address, size = row.data_ptr(), row.nbytes
    before = ctypes.string_at(address, size)  # string_at keeps the GIL (torch's reads may let it go)
    stepping, seen = [], {}

    def hold() -> None:  # waits for the GIL while the main thread runs Python, gets it where the step begins
        while not stepping:
            pass
        ctypes.PyDLL(None).usleep(2_000_000)
        seen["written"] = ctypes.string_at(address, size) != before

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # no thread is made to let the GIL go before it does so itself
    try:
        holder = threading.Thread(target=hold)
        holder.start()
        stepping.append(True)
        container.run(inputs)
    finally:
        sys.setswitchinterval(switch)
    holder.join()
    assert ctypes.string_at(address, size) != before  # the step writes there
    assert seen["written"]  # and had done so while the other thread held the GIL


@pytest.mark.e2e
def test_a_machine_without_a_cpp_compiler_serves_eagerly_and_does_not_retry_at_the_next_start(
    start_server, tokenizer, tmp_path
):
    checkpoint = tiny_checkpoint(tokenizer, tmp_path / "tiny")
    env = {"Q8CHAT_COMPILE": "true", "Q8CHAT_CACHE_DIR": str(tmp_path / "cache"), "CXX": "/nonexistent/c++"}
    first = start_server("--model", str(checkpoint), env=env)
    for step in ("decode", "prefill"):  # inductor may find out while lowering (LoweringException) or after
        assert re.search(rf"not using a compiled {step} step \(InductorError: .*InvalidCxxCompiler", first.log())
    assert "eager compact model, static bfloat16 KV cache of " in first.log()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert httpx.post(first.base_url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    first.stop()

    again = start_server("--model", str(checkpoint), env=env)
    log = again.log()
    assert log.count("it failed before (InductorError: ") == 2 and "InvalidCxxCompiler" in log
    assert "compiling the" not in log
    assert httpx.post(again.base_url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_steps_built_by_other_code_are_removed_once_unused_for_a_day(tmp_path):
    compiled = tmp_path / "compiled"
    compiled.mkdir()
    now = time.time()

    def step(name: str, source: str | None, loaded_hours_ago: float) -> Path:
        path = compiled / name
        path.mkdir()
        (path / "constants.blob").write_bytes(b"\0" * 1000)
        stamp = path / "source.sha256" if source else path
        if source:
            stamp.write_text(source)
        os.utime(stamp, (now - loaded_hours_ago * 3600,) * 2)
        return path

    current = step("decode-current", source_digest(), 48)
    recent = step("prefill-older-code-but-in-use", "0" * 64, 2)
    old = step("decode-older-code", "0" * 64, 25)
    unstamped = step("prefill-before-stamps", None, 30)
    package = compiled / "decode-format-before-directories.pt2"
    package.write_bytes(b"\0" * 500)
    os.utime(package, (now - 90000,) * 2)
    failed = compiled / "decode-x.failed"
    failed.write_text("InductorError: ...")
    assert prune_stale(compiled, now) == (3, 1000 + 64 + 1000 + 500)  # blobs, a stamp, the package
    assert current.is_dir() and recent.is_dir() and failed.is_file()
    assert not old.exists() and not unstamped.exists() and not package.exists()


@pytest.fixture
def tiny_int8(tokenizer):
    model = tiny_llama(len(tokenizer))
    quantized_tiny(model)
    return model


def test_a_step_slower_than_eager_is_not_served_nor_built_again(tiny_int8, tmp_path, monkeypatch, caplog):
    """The guard at build time: a compiled step that runs slower than the eager one it replaces is marked,
    and the server runs that step eagerly, now and at later starts."""
    load = compiled_step.load

    def slow_load(path, shared=None):
        step = load(path, shared)
        call = step.__call__

        class Slow:  # the step as it is, and 50 ms slower per call
            gemms, kernel = step.gemms, step.kernel

            def __call__(self, *args):
                time.sleep(0.05)
                return call(*args)

        return Slow()

    monkeypatch.setattr(compiled_step, "load", slow_load)
    packages = {"decode": tmp_path / "compiled" / "decode"}
    decoder = make_decoder(lambda: tiny_int8, tiny_int8.config, 64, packages)
    assert decoder.description.startswith("eager compact model")
    marker = tmp_path / "compiled" / "decode.slower"
    assert "it ran slower than eager: compiled" in marker.read_text()
    caplog.clear()
    again = make_decoder(lambda: tiny_int8, tiny_int8.config, 64, packages)
    assert again.description.startswith("eager compact model")
    assert "ran slower than eager before" in caplog.text and "compiling the" not in caplog.text


def test_a_step_that_builds_but_does_not_load_is_marked_failed(tiny_int8, tmp_path, monkeypatch, caplog):
    def broken(path, shared=None):
        raise RuntimeError("AOTInductor create: no such symbol")

    monkeypatch.setattr(compiled_step, "load", broken)
    packages = {"decode": tmp_path / "compiled" / "decode"}
    assert make_decoder(lambda: tiny_int8, tiny_int8.config, 64, packages).description.startswith("eager")
    assert "no such symbol" in (tmp_path / "compiled" / "decode.failed").read_text()
    caplog.clear()
    make_decoder(lambda: tiny_int8, tiny_int8.config, 64, packages)
    assert "it failed before (RuntimeError: AOTInductor create: no such symbol)" in caplog.text
    assert "compiling the" not in caplog.text


def test_a_step_too_big_to_build_in_memory_is_served_eagerly_and_retried_later(
    tiny_int8, tmp_path, monkeypatch, caplog
):
    """Building a 7B step needs several times its weights: with too little memory the server says so and
    decodes eagerly instead of being killed mid-build; a later start with memory to spare builds it."""

    weights = sum(t.nbytes for t in tiny_int8.state_dict().values())
    monkeypatch.setattr(compiled_step, "available_memory", lambda: compiled_step.BUILD_MEMORY_SPARE + weights)
    packages = {"decode": tmp_path / "compiled" / "decode"}
    assert make_decoder(lambda: tiny_int8, tiny_int8.config, 64, packages).description.startswith("eager")
    assert re.search(r"not using a compiled decode step \(MemoryError: building it needs about [\d.]+ GB", caplog.text)
    assert not list((tmp_path / "compiled").glob("decode*"))
    monkeypatch.setattr(compiled_step, "available_memory", lambda: None)  # unknown: the build is tried
    assert make_decoder(lambda: tiny_int8, tiny_int8.config, 64, packages).description.startswith("compiled")


def test_compact_models_share_the_models_int8_weights_and_export_them_as_parameters(tiny_int8):
    """Inductor clones every buffer of an exported step, and fusing q/k/v and gate/up copied their weights:
    at 7B each was another copy of the weights during a build. Now the model's layers become views of the
    fused weights, compact models of several kernels hold one copy, and the weights are parameters."""

    def storages(*modules) -> dict[int, int]:  # of the INT8 weights (scales are fused by copying: small)
        return {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for module in modules
            for t in module.state_dict().values()
            if t.dtype == torch.int8
        }

    nets = [StaticLlama(tiny_int8, 64, kernel) for kernel in ("s8s8", "bf16")]
    assert storages(tiny_int8, *nets) == storages(tiny_int8)
    example, dynamic = compiled_step._example(nets[0], "decode", torch.bfloat16, 1)
    program = compiled_step.export_step(nets[0], example, dynamic)
    assert not program.graph_signature.buffers
    weights = [p for p in program.parameters() if p.dtype == torch.int8]
    assert weights and {p.untyped_storage().data_ptr() for p in weights} <= set(storages(tiny_int8))
