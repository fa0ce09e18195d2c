"""An INT8 micro-kernel for inductor's CPU GEMM template on AVX2 CPUs: s8 x s8 -> s32, exact.

Without VNNI, x86's only 8-bit multiply is ``vpmaddubsw``: u8 times s8, each adjacent pair summed into a
saturating s16. Signed operands go through it the way llama.cpp's Q8_0 dot product does: ``|a|`` (u8)
times ``b`` given ``a``'s sign (``vpsignb``); a product is then at most 128 * 127 and a pair's sum below
2**15, so nothing saturates, and ``vpmaddwd`` by ones sums the pairs into s32. That is exact for operands
in [-127, 127], which q8chat's quantizers produce (``quant.int8`` clamps to +-127; -128 in both operands
could saturate a pair by one). Inductor itself has no vectorised INT8 micro-kernel for AVX2: there its
template runs ``CppMicroGemmRef``, a scalar loop.

B comes in the VNNI4 layout that the template packs for VNNI and AMX micro-kernels ([K/4, N, 4]): a 256-bit
load is 8 columns by 4 depths, which is what one ``vpmaddubsw`` + ``vpmaddwd`` pair reduces into 8 s32 lanes.
"""

from __future__ import annotations

import functools

# rows, columns, depth: a few rows share each loaded column vector (prefill), one row streams 4 of them (decode)
BLOCKINGS = ((4, 16, 4), (2, 32, 4), (1, 32, 4))

TEMPLATE_ENTRY = r"""
{{declare_kernel}} {
    {{kernel.assert_function}}(N % {{block_n}} == 0, "N dimension must be multiple of {{block_n}}");
    {{kernel.assert_function}}(K % 4 == 0, "K dimension must be multiple of 4");
    constexpr int64_t M_BLOCK = {{block_m}};
    const int64_t M_TAIL = M % M_BLOCK;
    const int64_t M_MAIN = M - M_TAIL;
    for (int64_t m = 0; m < M_MAIN; m += M_BLOCK) {
        for (int64_t n = 0; n < N; n += {{block_n}}) {
            {{kernel_name}}_kernel<M_BLOCK, {{block_n}}, accum>(A + m * lda, B + n, C + m * ldc + n, K, lda, ldb, ldc);
        }
    }
    switch (M_TAIL) {
{%- for m_tail in range(block_m - 1, 0, -1) %}
        case {{m_tail}}:
            for (int64_t n = 0; n < N; n += {{block_n}}) {
                {{kernel_name}}_kernel<{{m_tail}}, {{block_n}}, accum>(
                    A + M_MAIN * lda, B + n, C + M_MAIN * ldc + n, K, lda, ldb, ldc);
            }
            break;
{%- endfor %}
        default:
            break;
    }
}
"""

TEMPLATE_KERNEL = r"""
template <int64_t M, int64_t N, bool accum>
inline void {{kernel_name}}_kernel(
    const int8_t* {{restrict_keyword}} A,
    const int8_t* {{restrict_keyword}} B,
    int32_t* {{restrict_keyword}} C,
    int64_t K,
    int64_t lda,
    int64_t ldb,
    int64_t ldc
) {
    constexpr const int COLS = N / 8;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i va, va_abs;
    __m256i vb[COLS];
    __m256i vc[M * COLS];
    c10::ForcedUnroll<M * COLS>{}([&](auto i) { vc[i] = _mm256_setzero_si256(); });

    auto compute = [&](auto i, int64_t k) {
        constexpr const int row = i / COLS;
        constexpr const int col = i % COLS;
        if constexpr (col == 0) {
            // 4 depths of this row, in every lane; their magnitudes as u8
            va = _mm256_set1_epi32(*(const int32_t*)(A + row * lda + k));
            va_abs = _mm256_sign_epi8(va, va);
        }
        if constexpr (row == 0) {
            // VNNI4: [K / 4, N, 4]
            vb[col] = _mm256_loadu_si256((const __m256i*)(B + k * ldb + col * 32));
        }
        const __m256i pairs = _mm256_maddubs_epi16(va_abs, _mm256_sign_epi8(vb[col], va));
        vc[i] = _mm256_add_epi32(vc[i], _mm256_madd_epi16(pairs, ones));
    };
    for (int64_t k = 0; k < K; k += 4) {
        c10::ForcedUnroll<M * COLS>{}(compute, k);
    }

    auto store_c = [&](auto i) {
        constexpr const int row = i / COLS;
        constexpr const int col = i % COLS;
        if constexpr (accum) {
            vc[i] = _mm256_add_epi32(vc[i], _mm256_loadu_si256((const __m256i*)(C + row * ldc + col * 8)));
        }
        _mm256_storeu_si256((__m256i*)(C + row * ldc + col * 8), vc[i]);
    };
    c10::ForcedUnroll<M * COLS>{}(store_c);
}
"""


@functools.cache
def register() -> type:
    """Add the micro-kernel to inductor's registry, once per process (registering twice is an error);
    returns its class, the registry's key."""
    import torch._inductor.kernel.mm  # noqa: F401  (imports the template machinery in its order)
    from torch._inductor.codegen import cpp_micro_gemm as micro
    from torch._inductor.codegen.cpp_template import KernelTemplate
    from torch._inductor.cpu_vec_isa import VecAVX2

    def fits(config, m, n, k, *args, dynamic_M=False, **kwargs) -> bool:
        one_row = m == 1 and not dynamic_M  # the decode step's GEMVs
        return k % 4 == 0 and (config.register_blocking.block_m == 1) == one_row

    class CppMicroGemmAVX2Int8(micro.CppMicroGemm):
        def codegen_define(self, kernel) -> str:
            options = {
                "declare_kernel": self.get_kernel_declaration(),
                "kernel": kernel,
                "block_m": self.register_blocking.block_m,
                "block_n": self.register_blocking.block_n,
                **self.get_common_options(),
            }
            return "".join(
                KernelTemplate._template_from_string(source).render(options)
                for source in (TEMPLATE_KERNEL, TEMPLATE_ENTRY)
            )

        def get_b_layout(self):
            return micro.LayoutType.VNNI4

    micro.register_micro_gemm(
        *micro.generate_gemm_config(
            VecAVX2,
            BLOCKINGS,
            input_dtype=torch.int8,
            input2_dtype=torch.int8,
            output_dtype=torch.int32,
            compute_dtype=torch.int32,
            extra_check=fits,
        )
    )(CppMicroGemmAVX2Int8)
    return CppMicroGemmAVX2Int8
