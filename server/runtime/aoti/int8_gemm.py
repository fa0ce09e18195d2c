"""q8chat's INT8 micro-kernels for inductor's CPU GEMM template: s8 x s8 -> s32, exact, on CPUs without AMX.

Inductor's template multiplies s8 by s8 with AMX tiles only; elsewhere it runs ``CppMicroGemmRef``, a scalar
loop. Its own VNNI micro-kernel takes u8 activations, which only the u8s8 lowering (a zero point, an extern
oneDNN call per GEMM) produces. These two take the s8 activations of q8chat's W8A8 layers as they are:

- **AVX2** (no VNNI): x86's only 8-bit multiply is ``vpmaddubsw``, u8 times s8, each adjacent pair summed into
  a saturating s16. Signed operands go through it the way llama.cpp's Q8_0 dot product does: ``|a|`` (u8)
  times ``b`` given ``a``'s sign (``vpsignb``); a product is then at most 128 * 127 and a pair's sum below
  2**15, so nothing saturates, and ``vpmaddwd`` by ones sums the pairs into s32. Exact for operands in
  [-127, 127], which q8chat's quantizers produce (``quant.int8`` clamps to +-127; -128 in both operands could
  saturate a pair by one).
- **AVX-512 VNNI**: ``vpdpbusd`` multiplies u8 by s8 and sums each four products into s32 without saturating.
  ``b`` is shifted to u8 as it is loaded (``b ^ 0x80`` is ``b + 128``) and ``a`` stays s8, so each sum is too
  large by 128 times the sum of ``a``'s row over the depth: one number per row, summed by the same instruction
  against ones once for a block of rows and all the columns, and taken off at the end. Exact for every INT8
  value. The inner loop holds nothing but the rows' accumulators, the loaded column vectors and one broadcast
  row (a block's 16 accumulators fit the 32 registers with room to spare; shifting ``a`` instead needs each
  column's sum, a ``vpdpbusd`` and a register more per column vector, and a four-row block spilled).

B comes in the VNNI4 layout that the template packs for VNNI and AMX micro-kernels ([K/4, N, 4]): one vector
load is 8 (AVX2) or 16 (AVX-512) columns by 4 depths, which one multiply-add step reduces into as many s32
lanes.
"""

from __future__ import annotations

import functools

from server.runtime.aoti.micro_gemm import register_micro_kernel

# rows, columns, depth: a few rows share each loaded column vector (prefill, batch), one row streams several.
# The template packs the weights in blocks of the blocking's columns: AVX-512's blockings take the same 32, so
# that every step's packed weights are alike and shared (``server.runtime.aoti.constants``).
AVX2_BLOCKINGS = ((4, 16, 4), (2, 32, 4), (1, 32, 4))
AVX512_VNNI_BLOCKINGS = ((8, 32, 4), (1, 32, 4))

TEMPLATE_ENTRY = r"""
{{declare_kernel}} {
    {{kernel.assert_function}}(N % {{block_n}} == 0, "N dimension must be multiple of {{block_n}}");
    {{kernel.assert_function}}(K % 4 == 0, "K dimension must be multiple of 4");
    constexpr int64_t M_BLOCK = {{block_m}};
    const int64_t M_TAIL = M % M_BLOCK;
    const int64_t M_MAIN = M - M_TAIL;
{%- if row_sums %}
    int32_t surplus[M_BLOCK];
{%- endif %}
    for (int64_t m = 0; m < M_MAIN; m += M_BLOCK) {
{%- if row_sums %}
        {{kernel_name}}_surplus<M_BLOCK>(A + m * lda, K, lda, surplus);
{%- endif %}
        for (int64_t n = 0; n < N; n += {{block_n}}) {
            {{kernel_name}}_kernel<M_BLOCK, {{block_n}}, accum>(
                A + m * lda, B + n, C + m * ldc + n, K, lda, ldb, ldc{{", surplus" if row_sums}});
        }
    }
    switch (M_TAIL) {
{%- for m_tail in range(block_m - 1, 0, -1) %}
        case {{m_tail}}:
{%- if row_sums %}
            {{kernel_name}}_surplus<{{m_tail}}>(A + M_MAIN * lda, K, lda, surplus);
{%- endif %}
            for (int64_t n = 0; n < N; n += {{block_n}}) {
                {{kernel_name}}_kernel<{{m_tail}}, {{block_n}}, accum>(
                    A + M_MAIN * lda, B + n, C + M_MAIN * ldc + n, K, lda, ldb, ldc{{", surplus" if row_sums}});
            }
            break;
{%- endfor %}
        default:
            break;
    }
}
"""

KERNEL_SIGNATURE = r"""
template <int64_t M, int64_t N, bool accum>
inline void {{kernel_name}}_kernel(
    const int8_t* {{restrict_keyword}} A,
    const int8_t* {{restrict_keyword}} B,
    int32_t* {{restrict_keyword}} C,
    int64_t K,
    int64_t lda,
    int64_t ldb,
    int64_t ldc
{%- if row_sums %},
    const int32_t* {{restrict_keyword}} surplus  // of each row: see _surplus
{%- endif %}
)"""

AVX2_KERNEL = (
    KERNEL_SIGNATURE
    + r""" {
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
)

AVX512_VNNI_KERNEL = (
    r"""
// what shifting b adds to each of M rows' sums: 128 times the row's sum over the depth, once for all columns
template <int64_t M>
inline void {{kernel_name}}_surplus(const int8_t* {{restrict_keyword}} A, int64_t K, int64_t lda, int32_t* surplus) {
    const __m512i ones = _mm512_set1_epi8(1);
    c10::ForcedUnroll<M>{}([&](auto row) {
        __m512i sum = _mm512_setzero_si512();
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
            sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512((const __m512i*)(A + row * lda + k)));
        }
        if (k < K) {
            const __mmask64 tail = (1ULL << (K - k)) - 1;  // K - k < 64
            sum = _mm512_dpbusd_epi32(sum, ones, _mm512_maskz_loadu_epi8(tail, A + row * lda + k));
        }
        surplus[row] = _mm512_reduce_add_epi32(sum) * 128;
    });
}

"""
    + KERNEL_SIGNATURE
    + r""" {
    constexpr const int COLS = N / 16;
    const __m512i shift = _mm512_set1_epi8((char)0x80);
    __m512i va;
    __m512i vb[COLS];
    __m512i vc[M * COLS];
    c10::ForcedUnroll<M * COLS>{}([&](auto i) { vc[i] = _mm512_setzero_si512(); });

    auto compute = [&](auto i, int64_t k) {
        constexpr const int row = i / COLS;
        constexpr const int col = i % COLS;
        if constexpr (col == 0) {
            // 4 depths of this row, in every lane (s8)
            va = _mm512_set1_epi32(*(const int32_t*)(A + row * lda + k));
        }
        if constexpr (row == 0) {
            // VNNI4: [K / 4, N, 4], plus 128: u8
            vb[col] = _mm512_xor_si512(_mm512_loadu_si512((const __m512i*)(B + k * ldb + col * 64)), shift);
        }
        vc[i] = _mm512_dpbusd_epi32(vc[i], vb[col], va);
    };
    for (int64_t k = 0; k < K; k += 4) {
        c10::ForcedUnroll<M * COLS>{}(compute, k);
    }

    auto store_c = [&](auto i) {
        constexpr const int row = i / COLS;
        constexpr const int col = i % COLS;
        vc[i] = _mm512_sub_epi32(vc[i], _mm512_set1_epi32(surplus[row]));
        if constexpr (accum) {
            vc[i] = _mm512_add_epi32(vc[i], _mm512_loadu_si512((const __m512i*)(C + row * ldc + col * 16)));
        }
        _mm512_storeu_si512((__m512i*)(C + row * ldc + col * 16), vc[i]);
    };
    c10::ForcedUnroll<M * COLS>{}(store_c);
}
"""
)


def fits(config, m, n, k, *args, dynamic_M=False, **kwargs) -> bool:
    """A one-row blocking for one row (the decode step's GEMVs), the others for more rows or a symbolic count."""
    one_row = m == 1 and not dynamic_M
    return k % 4 == 0 and (config.register_blocking.block_m == 1) == one_row


@functools.cache
def register() -> dict[str, type]:
    """Add the micro-kernels to inductor's registry, once per process (registering twice is an error);
    returns their classes (the registry's keys) by the ISA they run on."""
    import torch
    from torch._inductor.cpu_vec_isa import VecAVX2, VecAVX512VNNI

    dtypes = {
        "input_dtype": torch.int8,
        "input2_dtype": torch.int8,
        "output_dtype": torch.int32,
        "compute_dtype": torch.int32,
    }

    def micro_kernel(name: str, kernel_source: str, isa, blockings, row_sums: bool) -> type:
        sources = (kernel_source, TEMPLATE_ENTRY)
        return register_micro_kernel(
            name, "CppMicroGemm", sources, "VNNI4", isa, blockings, dtypes, fits, row_sums=row_sums
        )

    return {
        "avx2": micro_kernel("CppMicroGemmAVX2Int8", AVX2_KERNEL, VecAVX2, AVX2_BLOCKINGS, row_sums=False),
        "avx512_vnni": micro_kernel(
            "CppMicroGemmAVX512VNNIInt8", AVX512_VNNI_KERNEL, VecAVX512VNNI, AVX512_VNNI_BLOCKINGS, row_sums=True
        ),
    }
