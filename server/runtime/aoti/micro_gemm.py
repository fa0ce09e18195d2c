"""How q8chat's micro-kernels join inductor's CPU GEMM template: a class whose code is q8chat's C++ (Jinja
sources rendered with the template's options), registered with the configurations it fits."""

from __future__ import annotations

from collections.abc import Callable


def inductor_micro_gemm():
    """Inductor's ``cpp_micro_gemm`` module (its micro-kernel registry), imported after the GEMM template
    machinery: imported first, it is a circular import."""
    import torch._inductor.kernel.mm  # noqa: F401  (imports the template machinery in its order)
    from torch._inductor.codegen import cpp_micro_gemm

    return cpp_micro_gemm


def register_micro_kernel(
    name: str,
    base: str,
    sources: tuple[str, ...],
    layout: str,
    isa: type,
    blockings,
    dtypes: dict,
    extra_check: Callable,
    **options,
) -> type:
    """A micro-kernel class ``name`` derived from inductor's ``base`` (a class of ``cpp_micro_gemm``), its code
    ``sources`` rendered with the register blocking, the template's common options and ``options``, asking for
    the weights in ``layout`` (a ``LayoutType`` name), registered for ``isa`` with ``blockings`` and ``dtypes``
    (``generate_gemm_config``'s) where ``extra_check`` passes. Registering a class twice is an error: callers
    register once a process."""
    micro = inductor_micro_gemm()
    from torch._inductor.codegen.cpp_template import KernelTemplate

    def codegen_define(self, kernel) -> str:
        blocking = self.register_blocking
        rendered = {
            "declare_kernel": self.get_kernel_declaration(),
            "kernel": kernel,
            "block_m": blocking.block_m,
            "block_n": blocking.block_n,
            "block_k": blocking.block_k,
            **options,
            **self.get_common_options(),
        }
        return "".join(KernelTemplate._template_from_string(source).render(rendered) for source in sources)

    def get_b_layout(self):
        return getattr(micro.LayoutType, layout)

    cls = type(name, (getattr(micro, base),), {"codegen_define": codegen_define, "get_b_layout": get_b_layout})
    configs = micro.generate_gemm_config(isa, blockings, **dtypes, extra_check=extra_check)
    return micro.register_micro_gemm(*configs)(cls)
