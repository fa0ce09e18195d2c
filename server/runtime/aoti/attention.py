"""q8chat's C++ kernels for ``q8chat::decode_attention`` and ``q8chat::prompt_attention`` in a compiled step:
inductor CPU templates, so AOTInductor writes them into the step's library like its own kernels (a custom
operator left as a call would need AOTInductor's proxy executor, which the GIL-free container does not have).

Decode. Written as products and sums for inductor to fuse, a decode step's attention ran several loop nests a
layer, each a pass over the cache and a fork and join of the threads. Here it is one parallel region a layer,
flash-decoding's way: each task takes ``CHUNK`` cache positions of one sequence's key head, computes the
scores of the head's queries (one load of each key for all of them), their softmax weights and the weighted
values; then each query's chunks are combined, each rescaled by its maximum's distance from the largest.
Chunks start at multiples of ``CHUNK`` from position 0 and masked positions add nothing, so a sequence's
attention is the same whatever the width its batch attends (the farthest sequence's). The cache arrives from
memory, the weights having streamed through the caches since the last step: the kernel prefetches the keys
``PREFETCH`` positions ahead (into the next chunk) and the chunk's values while it scores (without, it waited
on memory and was no faster than inductor's loops), and each thread takes a contiguous run of tasks, so that
its reads run on through a head's cache (taken one by one, dynamically, the tasks scattered them and the
steps were slower). The kernel is bound by its instructions more than by the cache's bytes, so: on a BF16
cache, where the CPU has AVX512_BF16, the BF16 queries score the keys as they are, two depths a lane
(``vdpbf16ps``: each product exact in FP32, no conversions), and the values are weighted two positions a
lane, by the softmax weights rounded to BF16 as the prompt kernel rounds them; on an INT8 cache, with AVX-512,
the same pairs in INT16 (``int16_dots``); four positions' dot products are summed in one set of shuffles
(``_fold4``); the mask's row and each query's maximum are taken in vectors.

Prompt. Flash attention's way, for CPUs where ATen's flash kernel has no AMX for its BF16 products: a task
takes ``QUERY_BLOCK`` positions of a key head's queries and steps over the cache ``CHUNK`` positions at a time
(those the mask hides entirely skipped, a step's positions past the last one it lets any row see left out: a
causal mask's diagonal), with an online softmax; the products are register-tiled
micro-kernels, in BF16 pairs where the CPU has AVX512_BF16 (``bf16_products``), in FP32 elsewhere. Between them,
the rows' maxima are taken four rows at a time (``_fold4``), each row's sum of weights stays a vector until the
task ends, and BF16 weights are rounded as they are computed: one reduction per row and step and a pass over
the scores fewer.

Vectors are ATen's ``Vectorized``: the same source runs on AVX2 and AVX-512.
"""

from __future__ import annotations

import functools

import torch

from quant.kernels import cpu_flags

CHUNK = 64  # cache positions per task
PREFETCH = 32  # positions of keys read ahead: a DRAM latency's worth of scoring
QUERY_BLOCK = 16  # a prompt's query positions per task

PRELUDE = r"""
{{template.header().getvalue()}}
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

namespace {
// row[l] = the bias of mask[l * stride] for l < n; whether any of them is not masked. In vectors where the
// mask's positions are contiguous (inductor compiles without the loop vectorizer)
inline bool {{name}}_biases(const bool* mask, int64_t stride, int64_t n, float* row) {
    using Vec = at::vec::Vectorized<float>;
    constexpr int64_t VS = Vec::size();
    constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
    bool any = false;
    int64_t l = 0;
    if (stride == 1) {
        const uint8_t* bytes = reinterpret_cast<const uint8_t*>(mask);
        bool all = n > 0 && n % 8 == 0;  // every position attended (most of a long prompt's rows): zeros
        for (int64_t i = 0; all && i < n; i += 8) {
            uint64_t word;
            std::memcpy(&word, bytes + i, 8);
            all = word == 0x0101010101010101ull;
        }
        if (all) {
            for (; l + VS <= n; l += VS) Vec(0.0f).store(row + l);
            for (; l < n; ++l) row[l] = 0.0f;
            return true;
        }
        for (; l + VS <= n; l += VS) {
            const auto flags = at::vec::convert<float>(
                at::vec::convert<int32_t>(at::vec::Vectorized<uint8_t>::loadu(bytes + l, VS)));
            Vec::blendv(Vec(NEG_INF), Vec(0.0f), flags != Vec(0.0f)).store(row + l);
        }
        uint64_t seen = 0;  // the bytes' OR, eight at a time
        for (int64_t i = 0; i + 8 <= l; i += 8) {
            uint64_t word;
            std::memcpy(&word, bytes + i, 8);
            seen |= word;
        }
        any = seen != 0;
    }
    for (; l < n; ++l) {
        any |= mask[l * stride];
        row[l] = mask[l * stride] ? 0.0f : NEG_INF;
    }
    return any;
}
template <typename T>
inline bool {{name}}_biases(const T* bias, int64_t stride, int64_t n, float* row) {
    bool any = false;
    for (int64_t l = 0; l < n; ++l) {
        row[l] = static_cast<float>(bias[l * stride]);
        any |= row[l] != -std::numeric_limits<float>::infinity();
    }
    return any;
}
// n elements for a kernel's own use, left as they are: make_unique<T[]> would zero them first, a serial pass on
// one thread while the others wait; every element read is written first
template <typename T>
inline std::unique_ptr<T[]> {{name}}_scratch(int64_t n) {
    return std::unique_ptr<T[]>(new T[n]);
}
inline at::vec::Vectorized<float> {{name}}_load(const float* p) { return at::vec::Vectorized<float>::loadu(p); }
inline at::vec::Vectorized<float> {{name}}_load(const c10::BFloat16* p) {
    return at::vec::convert<float>(at::vec::Vectorized<c10::BFloat16>::loadu(p, at::vec::Vectorized<float>::size()));
}
inline at::vec::Vectorized<float> {{name}}_load(const int8_t* p) {
    return at::vec::convert<float>(
        at::vec::convert<int32_t>(at::vec::Vectorized<int8_t>::loadu(p, at::vec::Vectorized<float>::size())));
}
// a cached row's scale: an INT8 row's follows its D values (``kv_int8``); other rows hold what they mean
inline float {{name}}_scale(const int8_t* row) {
    float scale;
    std::memcpy(&scale, row + {{head_dim}}, sizeof scale);
    return scale;
}
template <typename T>
inline float {{name}}_scale(const T*) { return 1.0f; }
template <typename T>
inline void {{name}}_prefetch(const T* row) {  // a cached row: D values, and an INT8 row's scale
    constexpr int64_t bytes = {{head_dim}} * int64_t(sizeof(T)) + (std::is_same<T, int8_t>::value ? 4 : 0);
    for (int64_t byte = 0; byte < bytes; byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(row) + byte, 0, 3);
    }
    __builtin_prefetch(reinterpret_cast<const char*>(row) + bytes - 1, 0, 3);  // rows need not start a line
}
inline float {{name}}_sum(const at::vec::Vectorized<float>& x) {
    using Vec = at::vec::Vectorized<float>;
    return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x);
}
#if defined(CPU_CAPABILITY_AVX512)
template <bool MAX>
inline __m512 {{name}}_combine(__m512 a, __m512 b) { return MAX ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b); }
template <bool MAX>
inline __m256 {{name}}_combine(__m256 a, __m256 b) { return MAX ? _mm256_max_ps(a, b) : _mm256_add_ps(a, b); }
template <bool MAX>
inline __m128 {{name}}_combine(__m128 a, __m128 b) { return MAX ? _mm_max_ps(a, b) : _mm_add_ps(a, b); }
// acc + the sums of adjacent pairs of INT16 products, exact in INT32 (``vpdpwssd`` where the CPU has VNNI)
inline __m512i {{name}}_dot16(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
// 32 INT8 values as INT16
inline __m512i {{name}}_widen(const int8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// what rounds values of largest magnitude ``peak`` to INT16 (that largest to 32767); zeros stay zeros
inline float {{name}}_int16_factor(float peak) { return peak > 0.0f ? 32767.0f / peak : 0.0f; }
// 32 floats times ``factor``, rounded to nearest INT16 (in range: the caller's factor sees to it), in order
inline __m512i {{name}}_round16(const float* p, float factor) {
    const __m512 f = _mm512_set1_ps(factor);
    const __m256i low = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p), f)));
    const __m256i high = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p + 16), f)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}
#endif
// the sums (or the maxima) of four vectors at once: interleaved halves combined level by level, a few shuffles
// for all four instead of a reduction's each (a NaN need not survive a maximum: its weights carry it on)
template <bool MAX>
inline void {{name}}_fold4(const at::vec::Vectorized<float>* x, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
    const auto op = [](auto p, auto q) { return {{name}}_combine<MAX>(p, q); };
    const __m512 a = x[0], b = x[1], c = x[2], d = x[3];
    const __m512 ab = op(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a b a b a lane
    const __m512 cd = op(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 abcd = op(  // a b c d, each a 128-bit lane's
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    const __m256 half =
        op(_mm512_castps512_ps256(abcd), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    _mm_storeu_ps(out, op(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
#else
#if defined(CPU_CAPABILITY_AVX2)
    if (!MAX) {
        const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(x[0], x[1]), _mm256_hadd_ps(x[2], x[3]));
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
        return;
    }
#endif
    using Vec = at::vec::Vectorized<float>;
    for (int i = 0; i < 4; ++i) {
        out[i] = at::vec::vec_reduce_all<float>(
            [](Vec& p, Vec& q) { return MAX ? at::vec::maximum(p, q) : p + q; }, x[i]);
    }
#endif
}
}  // namespace
"""

# each kernel's entry, its operator named in a comment (the tests look for it), and what both kernels know
ENTRY = r"""
extern "C"
{{signature}}
{
    // q8chat::{{op}}
    using Vec = at::vec::Vectorized<float>;
    constexpr int64_t VS = Vec::size();
    constexpr int64_t D = {{head_dim}};
    constexpr int64_t G = {{group}};  // query heads a key head
    constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
    const int64_t B = {{batch}};
    const int64_t KV = {{kv_heads}};
    const int64_t L = {{length}};
    const float scale = {{scale}};
    {{local_buffer}}
"""

DECODE_KERNEL = r"""
{%- if bf16_pairs %}
// BF16 pairs (vdpbf16ps, each product exact in FP32): scores from BF16 queries and keys as given; weighted values
// from the values as given, two positions a lane, and the softmax weights rounded to BF16
#define {{name}}_BF16_PAIRS
{%- endif %}
{%- if int16_dots %}
// INT16 pairs (VNNI's pair products, exact in INT32): FP32 queries and softmax weights rounded to INT16, INT8 keys
// and values widened to it
#define {{name}}_INT16_DOTS
{%- endif %}
    constexpr int64_t W = D / VS;
    constexpr int64_t CHUNK = {{chunk}};
    constexpr int64_t PREFETCH = {{prefetch}};  // positions
    constexpr int64_t PART = G * (D + 2);  // a task's G maxima, G sums of weights, G weighted values
    const int64_t chunks = (L + CHUNK - 1) / CHUNK;
    auto partials_owner = {{name}}_scratch<float>(B * KV * chunks * PART);
    float* partials = partials_owner.get();
    #pragma omp parallel num_threads({{num_threads}})
    {
        #pragma omp for schedule(static)  // a contiguous run of tasks a thread: its reads run on
        for (int64_t task = 0; task < B * KV * chunks; ++task) {
            const int64_t b = task / (KV * chunks), kv = task / chunks % KV, start = task % chunks * CHUNK;
            const int64_t n = std::min(CHUNK, L - start);
            float* part = partials + task * PART;
            float scores[G][CHUNK];
            bool any = false;
            for (int64_t g = 0; g < G; ++g) {
                if ({{mask_h}} == 0 && g > 0) {  // one row for every head
                    std::memcpy(scores[g], scores[0], n * sizeof(float));
                    continue;
                }
                const auto* bias = mask + b * {{mask_b}} + (kv * G + g) * {{mask_h}} + start * {{mask_l}};
                any = {{name}}_biases(bias, {{mask_l}}, n, scores[g]) || any;
            }
            if (!any) {  // nothing to attend: the combination skips this chunk
                for (int64_t g = 0; g < G; ++g) {
                    part[g] = NEG_INF;
                    part[G + g] = 0.0f;
                }
                continue;
            }
            float query_scale[G];  // what a head's dot products are multiplied by besides a key's scale
#ifdef {{name}}_BF16_PAIRS
            __m512bh query[G][D / 32];  // BF16 as given, two depths a lane; the scale taken on the sums
            for (int64_t g = 0; g < G; ++g) {
                query_scale[g] = 1.0f;
                for (int64_t w = 0; w < D / 32; ++w) {
                    query[g][w] = (__m512bh)_mm512_loadu_si512(q + ((b * KV + kv) * G + g) * D + w * 32);
                }
            }
#elif defined({{name}}_INT16_DOTS)
            __m512i query[G][D / 32];  // INT16 of each head's largest magnitude, two depths a lane
            for (int64_t g = 0; g < G; ++g) {
                const float* row = q + ((b * KV + kv) * G + g) * D;
                Vec peaks(0.0f);
                for (int64_t w = 0; w < W; ++w) peaks = at::vec::maximum(peaks, Vec::loadu(row + w * VS).abs());
                const float peak = _mm512_reduce_max_ps(peaks);
                query_scale[g] = scale * peak / 32767.0f;
                for (int64_t w = 0; w < D / 32; ++w) {
                    query[g][w] = {{name}}_round16(row + w * 32, {{name}}_int16_factor(peak));
                }
            }
#else
            Vec query[G][W];
            for (int64_t g = 0; g < G; ++g) {
                query_scale[g] = 1.0f;
                for (int64_t w = 0; w < W; ++w) {
                    query[g][w] = {{name}}_load(q + ((b * KV + kv) * G + g) * D + w * VS) * Vec(scale);
                }
            }
#endif
            const auto* keys = k + b * {{k_b}} + kv * {{k_h}} + start * {{k_l}};
            const auto* values = v + b * {{v_b}} + kv * {{v_h}} + start * {{v_l}};
            const int64_t ahead = L - start;  // positions of this head from here, the next chunk's included
            for (int64_t l = 0; l < PREFETCH && l < ahead; ++l) {{name}}_prefetch(keys + l * {{k_l}});
            for (int64_t l0 = 0; l0 < n; l0 += 4) {  // four positions' products summed together (_fold4)
                Vec dots[G][4];
                float key_scale[4];
                for (int64_t p = 0; p < 4; ++p) {
                    const int64_t l = l0 + p;
                    if (l >= n) {  // past the chunk: nothing added
                        for (int64_t g = 0; g < G; ++g) dots[g][p] = Vec(0.0f);
                        key_scale[p] = 0.0f;
                        continue;
                    }
                    // the cache comes from memory (the weights streamed through since the last step): ask for
                    // the keys a few positions ahead, and for the values this chunk will weigh next
                    if (l + PREFETCH < ahead) {{name}}_prefetch(keys + (l + PREFETCH) * {{k_l}});
                    {{name}}_prefetch(values + l * {{v_l}});
#ifdef {{name}}_BF16_PAIRS
                    __m512bh key[D / 32];
                    for (int64_t w = 0; w < D / 32; ++w) {
                        key[w] = (__m512bh)_mm512_loadu_si512(keys + l * {{k_l}} + w * 32);
                    }
                    key_scale[p] = scale;
                    for (int64_t g = 0; g < G; ++g) {
                        __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), query[g][0], key[0]);
                        for (int64_t w = 1; w < D / 32; ++w) dot = _mm512_dpbf16_ps(dot, query[g][w], key[w]);
                        dots[g][p] = Vec(dot);
                    }
#elif defined({{name}}_INT16_DOTS)
                    __m512i key[D / 32];
                    for (int64_t w = 0; w < D / 32; ++w) key[w] = {{name}}_widen(keys + l * {{k_l}} + w * 32);
                    key_scale[p] = {{name}}_scale(keys + l * {{k_l}});
                    for (int64_t g = 0; g < G; ++g) {
                        __m512i dot = {{name}}_dot16(_mm512_setzero_si512(), query[g][0], key[0]);
                        for (int64_t w = 1; w < D / 32; ++w) dot = {{name}}_dot16(dot, query[g][w], key[w]);
                        dots[g][p] = Vec(_mm512_cvtepi32_ps(dot));
                    }
#else
                    Vec key[W];
                    for (int64_t w = 0; w < W; ++w) {
                        key[w] = {{name}}_load(keys + l * {{k_l}} + w * VS);
                    }
                    key_scale[p] = {{name}}_scale(keys + l * {{k_l}});
                    for (int64_t g = 0; g < G; ++g) {
                        Vec dot = query[g][0] * key[0];
                        for (int64_t w = 1; w < W; ++w) {
                            dot = at::vec::fmadd(query[g][w], key[w], dot);
                        }
                        dots[g][p] = dot;
                    }
#endif
                }
                for (int64_t g = 0; g < G; ++g) {
                    float sums[4];
                    {{name}}_fold4<false>(dots[g], sums);
                    for (int64_t p = 0; p < 4 && l0 + p < n; ++p) {
                        scores[g][l0 + p] += key_scale[p] * query_scale[g] * sums[p];
                    }
                }
            }
            for (int64_t g = 0; g < G; ++g) {
                Vec peaks(NEG_INF);
                int64_t l = 0;
                for (; l + VS <= n; l += VS) peaks = at::vec::maximum(peaks, Vec::loadu(scores[g] + l));
                float peak = at::vec::vec_reduce_all<float>(
                    [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, peaks);
                for (; l < n; ++l) peak = std::max(peak, scores[g][l]);
                float total = 0.0f;
                l = 0;
                if (peak == NEG_INF) {
                    for (; l < n; ++l) scores[g][l] = 0.0f;
                } else {
                    Vec totals(0.0f);
                    for (; l + VS <= n; l += VS) {
                        const Vec weight = (Vec::loadu(scores[g] + l) - Vec(peak)).exp();
                        weight.store(scores[g] + l);
                        totals = totals + weight;
                    }
                    total = {{name}}_sum(totals);
                    for (; l < n; ++l) {
                        scores[g][l] = std::exp(scores[g][l] - peak);
                        total += scores[g][l];
                    }
                }
                part[g] = peak;
                part[G + g] = total;
            }
#if defined({{name}}_BF16_PAIRS) || defined({{name}}_INT16_DOTS)
            // the weights two positions an element (zero past the chunk's end), times two values rows interleaved
            // by unpacking, which orders the depths by 128-bit lane (a lane's 4 of the low unpack, then 4 of the
            // high); the store puts them back in order
            static_assert(CHUNK % 32 == 0, "whole conversions");
            uint32_t pairs[G][CHUNK / 2];
            for (int64_t g = 0; g < G; ++g) std::fill(scores[g] + n, scores[g] + CHUNK, 0.0f);
#ifdef {{name}}_BF16_PAIRS
            // BF16 weights, rounded to nearest even as the prompt kernel rounds them, by the values as given
            for (int64_t g = 0; g < G; ++g) {
                for (int64_t l = 0; l < n; l += 32) {
                    _mm512_storeu_si512(pairs[g] + l / 2, (__m512i)_mm512_cvtne2ps_pbh(
                        _mm512_loadu_ps(scores[g] + l + 16), _mm512_loadu_ps(scores[g] + l)));
                }
            }
            using Sum = __m512;
            const auto zero = [] { return _mm512_setzero_ps(); };
            const auto row = [](const auto* p) { return _mm512_loadu_si512(p); };
            const auto add = [](__m512 sum, __m512i a, __m512i b) {
                return _mm512_dpbf16_ps(sum, (__m512bh)a, (__m512bh)b);
            };
            const auto result = [](__m512 sum, int64_t) { return sum; };
#else
            // INT16 weights, times their rows' value scales, of each head's largest, by the INT8 values widened:
            // INT32 sums (127 * 32767 * CHUNK fits), times the weights' scale
            float value_scale[CHUNK] = {};
            for (int64_t l = 0; l < n; ++l) value_scale[l] = {{name}}_scale(values + l * {{v_l}});
            float weight_scale[G];
            for (int64_t g = 0; g < G; ++g) {
                Vec peaks(0.0f);
                for (int64_t l = 0; l < CHUNK; l += VS) {
                    const Vec weight = Vec::loadu(scores[g] + l) * Vec::loadu(value_scale + l);
                    weight.store(scores[g] + l);
                    peaks = at::vec::maximum(peaks, weight);
                }
                const float peak = _mm512_reduce_max_ps(peaks);
                weight_scale[g] = peak / 32767.0f;
                const float factor = {{name}}_int16_factor(peak);
                for (int64_t l = 0; l < CHUNK; l += 32) {
                    _mm512_storeu_si512(pairs[g] + l / 2, {{name}}_round16(scores[g] + l, factor));
                }
            }
            using Sum = __m512i;
            const auto zero = [] { return _mm512_setzero_si512(); };
            const auto row = [](const int8_t* p) { return {{name}}_widen(p); };
            const auto add = [](__m512i sum, __m512i a, __m512i b) { return {{name}}_dot16(sum, a, b); };
            const auto result = [&](__m512i sum, int64_t g) {
                return _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(weight_scale[g]));
            };
#endif
            Sum sums[G][W];
            for (int64_t g = 0; g < G; ++g) {
                for (int64_t w = 0; w < W; ++w) sums[g][w] = zero();
            }
            for (int64_t l = 0; l < n; l += 2) {
                const bool pair = l + 1 < n;  // an odd chunk's last position pairs with nothing
                __m512i rows[W];
                for (int64_t w = 0; w < D / 32; ++w) {
                    const __m512i first = row(values + l * {{v_l}} + w * 32);
                    const __m512i second = pair ? row(values + (l + 1) * {{v_l}} + w * 32) : _mm512_setzero_si512();
                    rows[2 * w] = _mm512_unpacklo_epi16(first, second);
                    rows[2 * w + 1] = _mm512_unpackhi_epi16(first, second);
                }
                for (int64_t g = 0; g < G; ++g) {
                    const __m512i weight = _mm512_set1_epi32(static_cast<int32_t>(pairs[g][l / 2]));
                    for (int64_t w = 0; w < W; ++w) sums[g][w] = add(sums[g][w], rows[w], weight);
                }
            }
            const __m512i low_order = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
            const __m512i high_order = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
            for (int64_t g = 0; g < G; ++g) {
                for (int64_t w = 0; w < D / 32; ++w) {
                    float* out = part + 2 * G + g * D + w * 32;
                    const __m512 low = result(sums[g][2 * w], g), high = result(sums[g][2 * w + 1], g);
                    _mm512_storeu_ps(out, _mm512_permutex2var_ps(low, low_order, high));
                    _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(low, high_order, high));
                }
            }
#else
            Vec acc[G][W];
            for (int64_t g = 0; g < G; ++g) {
                for (int64_t w = 0; w < W; ++w) acc[g][w] = Vec(0.0f);
            }
            for (int64_t l = 0; l < n; ++l) {
                Vec value[W];
                for (int64_t w = 0; w < W; ++w) {
                    value[w] = {{name}}_load(values + l * {{v_l}} + w * VS);
                }
                const float value_scale = {{name}}_scale(values + l * {{v_l}});
                for (int64_t g = 0; g < G; ++g) {
                    const Vec weight(scores[g][l] * value_scale);
                    for (int64_t w = 0; w < W; ++w) acc[g][w] = at::vec::fmadd(weight, value[w], acc[g][w]);
                }
            }
            for (int64_t g = 0; g < G; ++g) {
                for (int64_t w = 0; w < W; ++w) acc[g][w].store(part + 2 * G + g * D + w * VS);
            }
#endif
        }
        #pragma omp for
        for (int64_t row = 0; row < B * KV * G; ++row) {
            const int64_t b = row / (KV * G), kv = row / G % KV, g = row % G;
            const float* first = partials + (b * KV + kv) * chunks * PART;
            float peak = NEG_INF;
            for (int64_t c = 0; c < chunks; ++c) peak = std::max(peak, first[c * PART + g]);
            float total = 0.0f;
            Vec out[W];
            for (int64_t w = 0; w < W; ++w) out[w] = Vec(0.0f);
            for (int64_t c = 0; c < chunks; ++c) {
                const float* part = first + c * PART;
                if (part[g] == NEG_INF) continue;
                const float rescale = std::exp(part[g] - peak);
                total += part[G + g] * rescale;
                for (int64_t w = 0; w < W; ++w) {
                    out[w] = at::vec::fmadd(Vec(rescale), Vec::loadu(part + 2 * G + g * D + w * VS), out[w]);
                }
            }
            for (int64_t w = 0; w < W; ++w) (out[w] / Vec(total)).store(att_local + row * D + w * VS);
        }
    }
    {{stores}}
}
"""


PROMPT_KERNEL = (
    r"""
{%- if bf16_products %}
#define {{name}}_PAIRS  // BF16 products: the cache's keys and values as they are, queries and weights rounded
{%- endif %}
namespace {
constexpr int64_t {{name}}_tile(int64_t vectors) {  // vectors a micro-tile spans: a divisor of ``vectors``, <= 4
    return vectors % 4 == 0 ? 4 : vectors % 3 == 0 ? 3 : vectors % 2 == 0 ? 2 : 1;
}

// acc[r][w] += a[r][i] * b[i][w * VS ...] over i < depth: ROWS rows of ``a`` (row stride ``lda``) by NV vectors
// of ``b`` (row stride ``ldb``), added to ``c`` (row stride ``ldc``). Rows broadcast, ``b``'s vectors loaded once.
template <int64_t ROWS, int64_t NV>
inline void {{name}}_micro(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                           int64_t depth) {
    using Vec = at::vec::Vectorized<float>;
    constexpr int64_t VS = Vec::size();
    Vec acc[ROWS][NV];
    for (int64_t r = 0; r < ROWS; ++r) {
        for (int64_t w = 0; w < NV; ++w) acc[r][w] = Vec::loadu(c + r * ldc + w * VS);
    }
    for (int64_t i = 0; i < depth; ++i) {
        Vec col[NV];
        for (int64_t w = 0; w < NV; ++w) col[w] = Vec::loadu(b + i * ldb + w * VS);
        for (int64_t r = 0; r < ROWS; ++r) {
            const Vec x(a[r * lda + i]);
            for (int64_t w = 0; w < NV; ++w) acc[r][w] = at::vec::fmadd(x, col[w], acc[r][w]);
        }
    }
    for (int64_t r = 0; r < ROWS; ++r) {
        for (int64_t w = 0; w < NV; ++w) acc[r][w].store(c + r * ldc + w * VS);
    }
}

#ifdef {{name}}_PAIRS
// The same with BF16 operands, two along the depth in each 32-bit element (``a``'s broadcast, ``b``'s
// vectors of 16 such pairs): ``vdpbf16ps`` multiplies the pairs and adds both products to FP32 sums.
template <int64_t ROWS, int64_t NV>
inline void {{name}}_micro(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                           int64_t depth) {
    __m512 acc[ROWS][NV];
    for (int64_t r = 0; r < ROWS; ++r) {
        for (int64_t w = 0; w < NV; ++w) acc[r][w] = _mm512_loadu_ps(c + r * ldc + w * 16);
    }
    for (int64_t i = 0; i < depth; ++i) {
        __m512bh col[NV];
        for (int64_t w = 0; w < NV; ++w) col[w] = (__m512bh)_mm512_loadu_si512(b + i * ldb + w * 16);
        for (int64_t r = 0; r < ROWS; ++r) {
            const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda + i]));
            for (int64_t w = 0; w < NV; ++w) acc[r][w] = _mm512_dpbf16_ps(acc[r][w], x, col[w]);
        }
    }
    for (int64_t r = 0; r < ROWS; ++r) {
        for (int64_t w = 0; w < NV; ++w) _mm512_storeu_ps(c + r * ldc + w * 16, acc[r][w]);
    }
}

// 32 floats as 16 pairs of BF16, rounded to nearest even: x[2i] and x[2i + 1] in element i
inline void {{name}}_pairs(const float* x, uint32_t* out) {
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x)));
}
inline uint32_t {{name}}_pair(c10::BFloat16 low, c10::BFloat16 high) {
    return static_cast<uint32_t>(low.x) | static_cast<uint32_t>(high.x) << 16;
}
// value i of a cached row (its row's ``scale`` from ``_scale``) as a BF16 operand: a BF16 cache's as stored
inline c10::BFloat16 {{name}}_bf16(const c10::BFloat16* row, int64_t i, float) { return row[i]; }
inline c10::BFloat16 {{name}}_bf16(const int8_t* row, int64_t i, float scale) {
    return c10::BFloat16(static_cast<float>(row[i]) * scale);
}
#endif


// c[rows, cols] += a[rows, depth] @ b[depth, cols], MR rows at a time (then the rest); cols a multiple of NV
// vectors
template <int64_t MR, int64_t NV, typename T>
inline void {{name}}_gemm(const T* a, int64_t lda, const T* b, int64_t ldb, float* c, int64_t ldc,
                          int64_t rows, int64_t cols, int64_t depth) {
    constexpr int64_t VS = at::vec::Vectorized<float>::size();
    int64_t r = 0;
    for (; r + MR <= rows; r += MR) {
        for (int64_t j = 0; j < cols; j += NV * VS) {
            {{name}}_micro<MR, NV>(a + r * lda, lda, b + j, ldb, c + r * ldc + j, ldc, depth);
        }
    }
    for (; r < rows; ++r) {
        for (int64_t j = 0; j < cols; j += NV * VS) {
            {{name}}_micro<1, NV>(a + r * lda, lda, b + j, ldb, c + r * ldc + j, ldc, depth);
        }
    }
}

// the same for cols a multiple of one vector (known when the kernel runs), by ``_tile``'s micro-tile for them
template <int64_t MR, typename T>
inline void {{name}}_gemm_any(const T* a, int64_t lda, const T* b, int64_t ldb, float* c, int64_t ldc,
                              int64_t rows, int64_t cols, int64_t depth) {
    constexpr int64_t VS = at::vec::Vectorized<float>::size();
    switch ({{name}}_tile(cols / VS)) {
        case 4: return {{name}}_gemm<MR, 4>(a, lda, b, ldb, c, ldc, rows, cols, depth);
        case 3: return {{name}}_gemm<MR, 3>(a, lda, b, ldb, c, ldc, rows, cols, depth);
        case 2: return {{name}}_gemm<MR, 2>(a, lda, b, ldb, c, ldc, rows, cols, depth);
        default: return {{name}}_gemm<MR, 1>(a, lda, b, ldb, c, ldc, rows, cols, depth);
    }
}
}  // namespace
"""
    + ENTRY
    + r"""
    constexpr int64_t QB = VS == 16 ? {{query_block}} : {{query_block}} / 2;  // query positions a task
    constexpr int64_t R = G * QB;  // a task's rows: its positions' queries of each of the key head's G heads
    constexpr int64_t KC = {{chunk}};  // key positions a step
    constexpr int64_t MR = VS == 16 ? 6 : 2;  // rows a micro-tile: its accumulators fit the vector registers
    constexpr int64_t NVD = {{name}}_tile(D / VS);
#ifdef {{name}}_PAIRS
    using Op = uint32_t;  // an operand element: two BF16 along the depth of the products
    constexpr int64_t PAIR = 2;
#else
    using Op = float;  // an operand element
    constexpr int64_t PAIR = 1;
#endif
    static_assert(KC % VS == 0 && D % VS == 0 && R % 4 == 0, "blocking");
    const int64_t T = {{queries}};
    const int64_t blocks = (T + QB - 1) / QB;
    const int64_t chunks = (L + KC - 1) / KC;
    // every key head's keys (each step's transposed, [D, KC]) and values ([KC, D]) as operands, zero past the
    // cache's end (weighed by zero, they add nothing): converted once, read by all of the head's tasks
    constexpr int64_t STEP = 2 * D * KC / PAIR;  // operand elements a step of a head
    auto converted = {{name}}_scratch<Op>(B * KV * chunks * STEP);
    #pragma omp parallel num_threads({{num_threads}})
    {
#ifndef {{name}}_PAIRS
        auto staging = {{name}}_scratch<float>(KC * D);  // a step's keys before they are transposed
        float* staged = staging.get();
#endif
        #pragma omp for
        for (int64_t step = 0; step < B * KV * chunks; ++step) {
            const int64_t b = step / (KV * chunks), kv = step / chunks % KV, c0 = step % chunks * KC;
            const int64_t n = std::min(KC, L - c0);
            Op* kt = converted.get() + step * STEP;
            Op* vals = kt + STEP / 2;
            const auto* keys = k + b * {{k_b}} + kv * {{k_h}} + c0 * {{k_l}};
            const auto* values = v + b * {{v_b}} + kv * {{v_h}} + c0 * {{v_l}};
#ifdef {{name}}_PAIRS
            // keys [D / 2, KC]: each key's depths 2i and 2i + 1 together; values [KC / 2, D]: positions 2j and
            // 2j + 1 of each depth together
            for (int64_t l = 0; l < KC; ++l) {
                const auto* key = keys + l * {{k_l}};
                const float key_scale = l < n ? {{name}}_scale(key) : 0.0f;
                for (int64_t i = 0; i < D / 2; ++i) {
                    kt[i * KC + l] = l < n ? {{name}}_pair({{name}}_bf16(key, 2 * i, key_scale),
                                                           {{name}}_bf16(key, 2 * i + 1, key_scale))
                                           : 0u;
                }
            }
            for (int64_t j = 0; j < KC / 2; ++j) {
                const auto* even = values + 2 * j * {{v_l}};
                const auto* odd = even + {{v_l}};
                const float even_scale = 2 * j < n ? {{name}}_scale(even) : 0.0f;
                const float odd_scale = 2 * j + 1 < n ? {{name}}_scale(odd) : 0.0f;
                for (int64_t d = 0; d < D; ++d) {
                    const c10::BFloat16 zero(0.0f);
                    vals[j * D + d] = {{name}}_pair(2 * j < n ? {{name}}_bf16(even, d, even_scale) : zero,
                                                    2 * j + 1 < n ? {{name}}_bf16(odd, d, odd_scale) : zero);
                }
            }
#else
            for (int64_t l = 0; l < KC; ++l) {  // in FP32, the keys as they are stored first
                const float key_scale = l < n ? {{name}}_scale(keys + l * {{k_l}}) : 0.0f;
                const float value_scale = l < n ? {{name}}_scale(values + l * {{v_l}}) : 0.0f;
                for (int64_t d = 0; d < D; d += VS) {
                    const Vec key = l < n ? {{name}}_load(keys + l * {{k_l}} + d) * Vec(key_scale) : Vec(0.0f);
                    const Vec value = l < n ? {{name}}_load(values + l * {{v_l}} + d) * Vec(value_scale) : Vec(0.0f);
                    key.store(staged + l * D + d);
                    value.store(vals + l * D + d);
                }
            }
            for (int64_t l = 0; l < KC; l += 16) {  // then transposed, 16 by 16 in vectors
                for (int64_t d = 0; d < D; d += 16) {
                    at::vec::transpose_mxn<float, 16, 16>(staged + l * D + d, D, kt + d * KC + l, KC);
                }
            }
#endif
        }
        // a thread's scratch: scaled queries (and with BF16 products, the softmax weights) as operands, scores,
        // the rows' running output, maximum and sum of weights
#ifdef {{name}}_PAIRS
        auto operands = {{name}}_scratch<Op>(R * D / PAIR + R * KC / PAIR);
        Op* weights = operands.get() + R * D / PAIR;
#else
        auto operands = {{name}}_scratch<Op>(R * D);
#endif
        Op* qs = operands.get();
        auto scratch = {{name}}_scratch<float>(R * KC + R * D + R + R * VS);
        float* s = scratch.get();
        float* o = s + R * KC;
        float* peak = o + R * D;
        float* totals = peak + R;  // each row's sums of weights, a vector's lanes apart
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = B * KV * blocks - 1; task >= 0; --task) {  // the longest (last positions) first
            const int64_t b = task / (KV * blocks), kv = task / blocks % KV, t0 = task % blocks * QB;
            const int64_t n_t = std::min(QB, T - t0);
            for (int64_t r = 0; r < R; ++r) {
                const int64_t g = r / QB, t = r % QB;
#ifdef {{name}}_PAIRS
                alignas(64) float lanes[2 * VS];  // two vectors, then packed
#endif
                for (int64_t d = 0; d < D; d += VS) {
                    const auto* query = q + ((b * KV + kv) * G + g) * {{q_h}} + (t0 + t) * D;
                    const Vec x = t < n_t ? {{name}}_load(query + d) * Vec(scale) : Vec(0.0f);
#ifdef {{name}}_PAIRS
                    x.store(lanes + d % (2 * VS));
                    if (d % (2 * VS) == VS) {{name}}_pairs(lanes, qs + (r * D + d - VS) / 2);
#else
                    x.store(qs + r * D + d);
#endif
                    Vec(0.0f).store(o + r * D + d);
                }
                peak[r] = NEG_INF;
                Vec(0.0f).store(totals + r * VS);
            }
            for (int64_t c0 = 0; c0 < L; c0 += KC) {
                const int64_t n = std::min(KC, L - c0);
                bool any = false;  // whether any row attends to a position of this step
                for (int64_t r = 0; r < R; ++r) {  // the first head's rows first
                    const int64_t g = r / QB, t = r % QB;
                    float* row = s + r * KC;
                    int64_t l = 0;
                    if (g > 0 && {{mask_h}} == 0) {  // the heads share the mask: the first head's row, if any attends
                        if (!any) break;
                        std::copy(s + t * KC, s + (t + 1) * KC, row);
                        continue;
                    }
                    if (t < n_t) {
                        const auto* bias =
                            mask + b * {{mask_b}} + (kv * G + g) * {{mask_h}} + (t0 + t) * {{mask_t}} + c0 * {{mask_l}};
                        any |= {{name}}_biases(bias, {{mask_l}}, n, row);
                        l = n;
                    }
                    for (; l < KC; ++l) row[l] = NEG_INF;
                }
                if (!any) continue;
                // the step's positions up to the last one any row attends, in whole vectors (a causal mask's
                // diagonal step: the block's last position); past them every row's bias stays -inf
                int64_t width = 0;
                for (int64_t r = 0; r < ({{mask_h}} == 0 ? QB : R); ++r) {
                    const float* row = s + r * KC;
                    int64_t l = KC;
                    while (l > width && row[l - 1] == NEG_INF) --l;
                    width = std::max(width, l);
                }
                const int64_t cols = (width + VS - 1) / VS * VS;
                const Op* kt = converted.get() + ((b * KV + kv) * chunks + c0 / KC) * STEP;
                const Op* vals = kt + STEP / 2;
                {{name}}_gemm_any<MR>(qs, D / PAIR, kt, KC, s, KC, R, cols, D / PAIR);  // scores, onto the bias
                for (int64_t r0 = 0; r0 < R; r0 += 4) {  // four rows' maxima in one set of shuffles
                    Vec tops[4];
                    for (int64_t i = 0; i < 4; ++i) {
                        const float* row = s + (r0 + i) * KC;
                        Vec top(NEG_INF);
                        for (int64_t l = 0; l < cols; l += VS) top = at::vec::maximum(top, Vec::loadu(row + l));
                        tops[i] = top;
                    }
                    float heres[4];
                    {{name}}_fold4<true>(tops, heres);
                    for (int64_t i = 0; i < 4; ++i) {
                        const int64_t r = r0 + i;
                        float* row = s + r * KC;
                        const float here = heres[i];
                        if (here == NEG_INF) {  // this row attends to none of the step's positions
                            for (int64_t l = 0; l < KC; l += VS) Vec(0.0f).store(row + l);
#ifdef {{name}}_PAIRS
                            std::fill(weights + r * KC / 2, weights + (r + 1) * KC / 2, 0u);
#endif
                            continue;
                        }
                        const float now = std::max(peak[r], here);
                        // 0 at the row's first step, 1 while its maximum holds
                        const float rescale = now == peak[r] ? 1.0f : std::exp(peak[r] - now);
                        Vec sum(0.0f);
#ifdef {{name}}_PAIRS
                        for (int64_t l = 0; l < cols; l += 2 * VS) {  // past ``cols`` the bias's -inf: weight 0
                            const Vec low = (Vec::loadu(row + l) - Vec(now)).exp_u20();  // as ATen's flash kernel
                            const Vec high = (Vec::loadu(row + l + VS) - Vec(now)).exp_u20();
                            sum = sum + low + high;
                            _mm512_storeu_si512(weights + (r * KC + l) / 2,
                                                (__m512i)_mm512_cvtne2ps_pbh(high, low));
                        }
#else
                        for (int64_t l = 0; l < cols; l += VS) {
                            const Vec weight = (Vec::loadu(row + l) - Vec(now)).exp_u20();  // as ATen's flash kernel
                            weight.store(row + l);
                            sum = sum + weight;
                        }
#endif
                        (Vec::loadu(totals + r * VS) * Vec(rescale) + sum).store(totals + r * VS);
                        peak[r] = now;
                        if (rescale != 1.0f) {
                            for (int64_t d = 0; d < D; d += VS) {
                                (Vec::loadu(o + r * D + d) * Vec(rescale)).store(o + r * D + d);
                            }
                        }
                    }
                }
#ifdef {{name}}_PAIRS
                {{name}}_gemm<MR, NVD>(weights, KC / 2, vals, D, o, D, R, D, cols / 2);  // weighted values
#else
                {{name}}_gemm<MR, NVD>(s, KC, vals, D, o, D, R, D, cols);  // weighted values
#endif
            }
            for (int64_t r = 0; r < R; ++r) {
                const int64_t g = r / QB, t = r % QB;
                if (t >= n_t) continue;
                const float total = {{name}}_sum(Vec::loadu(totals + r * VS));
                const Vec inverse(total > 0.0f ? 1.0f / total : 0.0f);
                float* out = att_local + ((b * KV + kv) * G + g) * T * D + (t0 + t) * D;
                for (int64_t d = 0; d < D; d += VS) (Vec::loadu(o + r * D + d) * inverse).store(out + d);
            }
        }
    }
    {{stores}}
}
"""
)


def bf16_products(k_dtype: torch.dtype, v_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the prompt kernel multiplies in BF16, two products an FP32 lane (``vdpbf16ps``): where inductor
    writes AVX-512 code for a CPU with AVX512_BF16, on a BF16 or INT8 cache (a head's depths in whole vectors
    of 32). BF16 keys and values are used as stored, INT8 ones times their scales rounded to BF16; the scaled
    queries and the softmax weights are rounded to BF16, as ATen's BF16 flash kernel rounds them (which also
    rounds its output). Twice the products an instruction: the 512-token prompt's attention took 1.0 ms a
    layer against 1.4 in FP32 (Zen 5, 2 threads)."""
    bf16 = k_dtype == v_dtype and k_dtype in (torch.bfloat16, torch.int8)
    return bf16 and head_dim % 32 == 0 and _avx512_code() and "avx512_bf16" in cpu_flags()


def int16_dots(q_dtype: torch.dtype, k_dtype: torch.dtype, v_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the decode kernel attends an INT8 cache in INT16 pairs (VNNI's ``vpdpwssd``, or AVX-512BW's
    ``vpmaddwd``): where inductor writes AVX-512 code, for FP32 queries and a head's depths in whole vectors of 32.
    Each head's scaled query and each task's softmax weights (times their values' scales) are rounded to INT16
    of their largest magnitude, the INT8 keys and values widened to INT16, and the products summed exactly in
    INT32: a quarter of the FP32 path's conversions and half its multiplications, so that the kernel reads the
    cache's half of BF16's bytes about as fast as it computes."""
    int8 = k_dtype == v_dtype == torch.int8 and q_dtype == torch.float32
    return int8 and head_dim % 32 == 0 and _avx512_code()


def _avx512_code() -> bool:
    """Whether inductor writes AVX-512 code on this CPU (the kernels' 512-bit paths compile)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa()).startswith("avx512")


@functools.cache
def register() -> None:
    """Lower ``q8chat::decode_attention`` and ``q8chat::prompt_attention`` to the kernels in every step compiled
    in this process (once)."""
    import torch._inductor.kernel.mm  # noqa: F401  (imports the template machinery in its order)
    from torch._inductor import ir
    from torch._inductor.codegen.cpp_gemm_template import gen_2d_view_of_epilogue_buf
    from torch._inductor.codegen.cpp_template import CppTemplate
    from torch._inductor.codegen.cpp_utils import cexpr_index
    from torch._inductor.lowering import register_lowering
    from torch._inductor.utils import parallel_num_threads
    from torch._inductor.virtualized import V

    from server.runtime import attention_op  # noqa: F401  (defines the operators)

    class AttentionTemplate(CppTemplate):
        def __init__(self, input_nodes, layout, scale: float, op: str, kernel_source: str) -> None:
            super().__init__("q8chat_attention", input_nodes, layout, parallel_num_threads())
            self.scale, self.op, self.kernel_source = scale, op, kernel_source

        def render(  # type: ignore[override]
            self,
            kernel,
            template_buffer_node=None,
            flag_template_buffer_has_other_users=None,
            epilogue_nodes=None,
            **kwargs,
        ) -> str:
            q, k, v, mask = self.input_nodes
            att = template_buffer_node if template_buffer_node is not None else self.output_node
            outputs, aliases = {"att": att}, {}
            if epilogue_nodes:  # pointwise ops on the attention (a smoothing, a quantization) fused in
                out, reindexers = gen_2d_view_of_epilogue_buf(
                    epilogue_nodes[-1], att, epilogue_nodes, [], [None] * len(epilogue_nodes)
                )
                if flag_template_buffer_has_other_users:
                    outputs["out"] = out
                else:
                    outputs, aliases = {"out": out}, {att.get_name(): "out"}
            inputs = {"q": q, "k": k, "v": v, "mask": mask}
            signature = kernel.def_kernel(inputs=inputs, outputs=outputs, aliases=aliases)
            stores = []
            if epilogue_nodes:  # the kernel writes a local buffer, and the epilogue reads it
                kernel.define_buffer("att_local", att.get_size(), torch.float)  # what ``store_output`` reads
                # allocated here: inductor's allocation names a prompt's length by the graph's symbol, not the
                # kernel's
                numel = cexpr_index(kernel.rename_indexing(att.get_numel()))
                owner = f"auto att_owner = {kernel.kernel_name}_scratch<float>({numel});"
                local_buffer = f"{owner} float* att_local = att_owner.get();"
                local = kernel.local_buffers["att_local"]
                if flag_template_buffer_has_other_users:
                    stores.append(kernel.store_output(att, local))
                stores.append(kernel.store_output(out, local, att, epilogue_nodes, reindexers=reindexers))
            else:  # straight into the output (contiguous, as the lowering lays it out)
                local_buffer = "float* att_local = att;"

            def stride(node, dim: int) -> str:  # 0 along a broadcast dimension
                broadcast = V.graph.sizevars.statically_known_equals(node.get_size()[dim], 1)
                return "0" if broadcast else kernel.stride(node, dim)

            batch, heads, head_dim = (int(q.get_size()[dim]) for dim in (0, 1, 3))
            kv_heads = int(k.get_size()[1])
            return self._template_from_string(PRELUDE + self.kernel_source).render(
                template=self,
                op=self.op,
                name=kernel.kernel_name,
                signature=signature,
                local_buffer=local_buffer,
                stores="\n".join(stores),
                head_dim=head_dim,
                group=heads // kv_heads,
                chunk=CHUNK,
                prefetch=PREFETCH,
                query_block=QUERY_BLOCK,
                batch=batch,
                kv_heads=kv_heads,
                queries=kernel.size(q, 2),
                length=kernel.size(k, 2),
                scale=repr(float(self.scale)),
                num_threads=self.num_threads,
                bf16_products=bf16_products(k.get_dtype(), v.get_dtype(), head_dim),
                bf16_pairs=q.get_dtype() == k.get_dtype() == torch.bfloat16
                and bf16_products(k.get_dtype(), v.get_dtype(), head_dim),
                int16_dots=int16_dots(q.get_dtype(), k.get_dtype(), v.get_dtype(), head_dim),
                q_h=kernel.stride(q, 1),
                mask_b=stride(mask, 0),
                mask_h=stride(mask, 1),
                mask_t=stride(mask, 2),
                mask_l=kernel.stride(mask, 3),
                k_b=kernel.stride(k, 0),
                k_h=kernel.stride(k, 1),
                k_l=kernel.stride(k, 2),
                v_b=kernel.stride(v, 0),
                v_h=kernel.stride(v, 1),
                v_l=kernel.stride(v, 2),
            )

    def lowering(op: str, kernel_source: str):
        def from_start(x):  # the kernel reads an input from its buffer's start: a view that starts inside, copied
            offset = x.get_layout().offset if isinstance(x, ir.ReinterpretView) else 0
            return x if V.graph.sizevars.statically_known_equals(offset, 0) else ir.ExternKernel.copy_input(x)

        def lower(q, k, v, mask, scale):
            q = from_start(ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(q)))
            k, v, mask = (
                from_start(ir.ExternKernel.require_stride1(ir.ExternKernel.realize_input(x))) for x in (k, v, mask)
            )
            if v.get_name() == k.get_name():  # views of one buffer: the kernel's signature would name it once
                v = ir.ExternKernel.copy_input(v)
            size = list(q.get_size())
            layout = ir.FixedLayout(q.get_device(), torch.float32, size, ir.FlexibleLayout.contiguous_strides(size))
            choices: list = []
            template = AttentionTemplate([q, k, v, mask], layout, scale, op, kernel_source)
            error = template.maybe_append_choice(choices)
            if error is not None:
                raise error
            return choices[0].output_node()

        return lower

    for op, source in (("decode_attention", ENTRY + DECODE_KERNEL), ("prompt_attention", PROMPT_KERNEL)):
        register_lowering(getattr(torch.ops.q8chat, op).default, type_promotion_kind=None)(lowering(op, source))
