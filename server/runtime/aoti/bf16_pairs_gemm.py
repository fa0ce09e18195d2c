"""A micro-kernel for the weight-only layers of the decode and batch steps (BF16 activations times INT8 weights,
FP32 sums) on AVX-512 CPUs with AVX512_BF16 and without AMX (Zen 4, Cooper Lake).

Inductor's own (``CppMicroGemmFP32Vec``) converts each weight to FP32 and multiplies with one FP32 FMA a
product, and reads each row's BF16 activation as a scalar at every depth. One row is bound by reading the
weights either way; four rows (the batch step) are bound by the FMAs, 16 products an instruction. This one
converts each pair of depths of 16 columns to BF16 once (exact: an INT8 value has 8 significant bits at most)
and multiplies every row by it with ``vdpbf16ps``, 32 products an instruction. Each product is exact in FP32,
and a row's sums take the same instructions in the same order whatever rows it runs with: the batch step
computes what the one-row step does. (The sums differ from inductor's kernel and ATen's ``_weight_int8pack_mm``
in their rounding, as those differ from each other.) The instruction treats BF16 subnormals (below 1.2e-38) as
zero.

It subclasses inductor's kernel so that the template keeps its few-rows form (a thread a block of 32 columns,
the depth in blocks of 64 summed in order), and asks for the weights packed in pairs of depths (VNNI2:
``[K/2, N, 2]``), which the template does once, when the step is built.
"""

from __future__ import annotations

import functools

from quant.kernels import cpu_flags
from server.runtime.aoti.micro_gemm import inductor_micro_gemm, register_micro_kernel

# inductor's few-rows blockings for weight-only layers (``check_int8_woq_small_m_dim``): the template indexes
# the packed weights in blocks of 32 columns and 64 depths
BLOCKINGS = ((4, 32, 64), (8, 32, 64))

TEMPLATE_ENTRY = r"""
{{declare_kernel}} {
    {{kernel.assert_function}}(N % {{block_n}} == 0, "N dimension must be multiple of {{block_n}}");
    {{kernel.assert_function}}(K % 2 == 0, "K dimension must be even");
    for (int64_t m = 0; m < M; m += {{block_m}}) {
        const int64_t block_m = std::min<int64_t>(M - m, {{block_m}});
        for (int64_t n = 0; n < N; n += {{block_n}}) {
            switch (block_m) {
{%- for rows in range(block_m, 0, -1) %}
            case {{rows}}:
                {{kernel_name}}_kernel<{{rows}}, {{block_n}}, accum, prefetch>(
                    A + m * lda, B + n * 2, C + m * ldc + n, K, lda, ldb, ldc);
                break;
{%- endfor %}
            default:
                {{kernel.assert_function}}(false, "Unsupported block_m: {{block_m}}");
            }
        }
    }
}
"""

KERNEL = r"""
template <int64_t M, int64_t N, bool accum, bool prefetch>
inline void {{kernel_name}}_kernel(
    const at::BFloat16* {{restrict_keyword}} A,
    const int8_t* {{restrict_keyword}} B,
    float* {{restrict_keyword}} C,
    int64_t K,
    int64_t lda,
    int64_t ldb,
    int64_t ldc
) {
    constexpr const int COLS = N / 16;
    __m512bh va;
    __m512bh vb[COLS];
    __m512 vc[M * COLS];
    c10::ForcedUnroll<M * COLS>{}([&](auto i) {
        constexpr const int row = i / COLS;
        constexpr const int col = i % COLS;
        vc[i] = accum ? _mm512_loadu_ps(C + row * ldc + col * 16) : _mm512_setzero_ps();
    });

    auto compute = [&](auto i, int64_t k) {
        constexpr const int row = i / COLS;
        constexpr const int col = i % COLS;
        if constexpr (row == 0) {
            // VNNI2: [K / 2, N, 2]; 16 columns by 2 depths, as BF16 (exact)
            const int8_t* b = B + k * ldb + col * 32;
            const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)b)));
            const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 16))));
            vb[col] = _mm512_cvtne2ps_pbh(high, low);
            if constexpr (prefetch && col % 2 == 0) {  // the next block of depths (two columns a cache line)
                _mm_prefetch(b + {{block_k}} * ldb, _MM_HINT_T0);
            }
        }
        if constexpr (col == 0) {
            // this row's 2 depths, in every lane
            va = (__m512bh)_mm512_set1_epi32(*(const int32_t*)(A + row * lda + k));
        }
        vc[i] = _mm512_dpbf16_ps(vc[i], va, vb[col]);
    };
    for (int64_t k = 0; k < K; k += 2) {
        c10::ForcedUnroll<M * COLS>{}(compute, k);
    }

    c10::ForcedUnroll<M * COLS>{}([&](auto i) {
        constexpr const int row = i / COLS;
        constexpr const int col = i % COLS;
        _mm512_storeu_ps(C + row * ldc + col * 16, vc[i]);
    });
}
"""


@functools.cache
def register() -> type:
    """Add the micro-kernel to inductor's registry, once per process; returns its class (the registry's key).
    It ranks above inductor's FP32 kernel (an AVX-512 VNNI configuration), where it fits: few rows, a fixed
    count (a decode or batch step), a CPU with AVX512_BF16 and no AMX."""
    import torch
    from torch._inductor.cpu_vec_isa import VecAMX, VecAVX512VNNI

    micro = inductor_micro_gemm()

    def fits(config, m, n, k, alpha, num_threads, **kwargs) -> bool:
        return (
            alpha == 1
            and micro.check_int8_woq_small_m_dim(config, m, n, k, alpha, num_threads, **kwargs)
            and not isinstance(kwargs.get("vec_isa"), VecAMX)
            and "avx512_bf16" in cpu_flags()
        )

    dtypes = {
        "input_dtype": torch.bfloat16,
        "input2_dtype": torch.int8,
        "output_dtype": torch.float,
        "compute_dtype": torch.float,
    }
    # derived from inductor's FP32 kernel, so that the template keeps its few-rows form for it
    return register_micro_kernel(
        "CppMicroGemmBF16PairsInt8",
        "CppMicroGemmFP32Vec",
        (KERNEL, TEMPLATE_ENTRY),
        "VNNI2",
        VecAVX512VNNI,
        BLOCKINGS,
        dtypes,
        fits,
    )
