// CPU AdamW over host buffers in one pass: the compiled half of kernels/cpu_adam.py (maths, limits and the
// reasons for this design are in that file's docstring; the split master and the 8-bit codes are defined in
// kernels/host_formats.py). Three layouts of the optimizer state, one entry point each:
//   horizon_cpu_adamw_step             fp32 master, fp32 moments (+ an optional bf16 copy of the weights)
//   horizon_cpu_adamw_step_split       master as bf16 high half + int16 low half, fp32 moments
//   horizon_cpu_adamw_step_split_8bit  split master, blockwise 8-bit moments with fp32 block scales
//
// Plain C ABI on raw pointers, no torch or pybind11 headers: it compiles in about a second, and ctypes drops
// the GIL for the whole call. The Python side checks every argument before calling in; nothing here does.
//
// Per element (fp32; scalars precomputed in double by the caller, as torch does, then rounded to fp32):
//   g  = grad · grad_scale
//   m  = β1·m + (1-β1)·g
//   v  = β2·v + ((1-β2)·g)·g
//   p  = p · (1 - lr·wd)
//   p  = p - (step_size·m) / (sqrt(v) / bias_correction2_sqrt + eps)
//   out_bf16 = round_to_nearest_even(p)              (bit-identical to torch's float -> bfloat16 cast)
// The products are grouped as torch's addcmul_ and addcdiv_ group them, and the build uses -ffp-contract=off so
// no multiply-add is fused: the roundings are exactly the ones written above. (Torch's vectorised add_/addcmul_
// do fuse, so the torch path differs from this one in the last bit of some elements.)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>

namespace {

struct Hyper {
    float grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, bias_correction2_sqrt, eps;
};

inline float bf16_bits_to_float(uint16_t bits) {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// c10::BFloat16's round_to_nearest_even: add 0x7FFF plus the lowest kept bit, truncate; NaN -> 0x7FC0.
inline uint16_t float_to_bf16_rne(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}

inline float load_grad(const float* grad, int64_t i) { return grad[i]; }
inline float load_grad(const uint16_t* grad, int64_t i) { return bf16_bits_to_float(grad[i]); }

// The AdamW update of one element, shared by every layout: m, v and p in, m, v and p out.
inline void adamw_element(float g, float& m, float& v, float& p, const Hyper& h) {
    g = g * h.grad_scale;
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * g * g;
    p = p * h.decay;
    float denom = std::sqrt(v) / h.bias_correction2_sqrt + h.eps;
    p = p - h.step_size * m / denom;
}

// One thread's contiguous slice [begin, end). WriteBf16 is a template flag, not a branch in the loop, so
// both loops vectorise to straight-line code.
template <typename Grad, bool WriteBf16>
void adamw_slice(float* __restrict master, const Grad* __restrict grad, float* __restrict exp_avg,
                 float* __restrict exp_avg_sq, uint16_t* __restrict out_bf16, int64_t begin, int64_t end,
                 const Hyper h) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
        float m = exp_avg[i], v = exp_avg_sq[i], p = master[i];
        adamw_element(load_grad(grad, i), m, v, p, h);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        master[i] = p;
        if (WriteBf16) out_bf16[i] = float_to_bf16_rne(p);
    }
}

// The split master (kernels/host_formats.py): bits = (hi << 16) + lo, hi = (bits + 0x8000) >> 16.
inline float join_master(uint16_t hi, int16_t lo) {
    uint32_t u = (static_cast<uint32_t>(hi) << 16) + static_cast<uint32_t>(static_cast<int32_t>(lo));
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline void split_master(float p, uint16_t* hi, int16_t* lo) {
    uint32_t u;
    std::memcpy(&u, &p, sizeof u);
    uint32_t top = (u + 0x8000u) >> 16;
    *hi = static_cast<uint16_t>(top);
    *lo = static_cast<int16_t>(static_cast<int32_t>(u - (top << 16)));
}

template <typename Grad>
void adamw_split_slice(uint16_t* __restrict hi, int16_t* __restrict lo, const Grad* __restrict grad,
                       float* __restrict exp_avg, float* __restrict exp_avg_sq, int64_t begin, int64_t end,
                       const Hyper h) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
        float m = exp_avg[i], v = exp_avg_sq[i], p = join_master(hi[i], lo[i]);
        adamw_element(load_grad(grad, i), m, v, p, h);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        split_master(p, hi + i, lo + i);
    }
}

// 8-bit codes (kernels/host_formats.py): r = |x| * (1/scale); k = ((bits(r) + u) >> 20) - 8 * (127 - top),
// u in [0, 2^20) a hash of (element index, step, moment, seed): stochastic rounding, reproducible.
constexpr int64_t kQBlock = 256;

inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    return x ^ (x >> 16);
}

inline uint32_t rounding_offset(uint32_t mixed_index, uint32_t step_salt) {
    return mix32(mixed_index + step_salt * 0x9E3779B1u) >> 12;
}

inline uint8_t encode_exp_avg(float x, float inv_scale, uint32_t u) {
    float r = std::fabs(x) * inv_scale;
    uint32_t bits, sign;
    std::memcpy(&bits, &r, sizeof bits);
    std::memcpy(&sign, &x, sizeof sign);
    // selects by masks, not ?: (which gcc 12 leaves as control flow): the encoding loop must vectorise
    int32_t k = std::min(static_cast<int32_t>((bits + u) >> 20) - 8 * (127 - 15), 127);
    int32_t below = static_cast<int32_t>(r >= 0x1p-15f) << 3;       // the nearer of 0 and the smallest code
    int32_t small = -static_cast<int32_t>(k < 8);
    k = (below & small) | (k & ~small);
    return static_cast<uint8_t>(k | static_cast<int32_t>((sign >> 31) << 7));
}

inline uint8_t encode_exp_avg_sq(float x, float inv_scale, uint32_t u) {
    float r = x * inv_scale;
    uint32_t bits;
    std::memcpy(&bits, &r, sizeof bits);
    int32_t k = std::min(static_cast<int32_t>((bits + u) >> 20) - 8 * (127 - 31), 255);
    int32_t below = static_cast<int32_t>(r > 0.0f) << 3;            // never 0 for a positive v
    int32_t small = -static_cast<int32_t>(k < 8);
    k = (below & small) | (k & ~small);
    return static_cast<uint8_t>(k);
}

// One block: decode, update, find the new block maxima, encode. m and v stay in fp32 on the stack in between.
template <typename Grad>
void adamw_8bit_block(uint16_t* __restrict hi, int16_t* __restrict lo, const Grad* __restrict grad,
                      uint8_t* __restrict exp_avg_q, float* __restrict exp_avg_scale, uint8_t* __restrict exp_avg_sq_q,
                      float* __restrict exp_avg_sq_scale, const float* __restrict m_codes,
                      const float* __restrict v_codes, int64_t block, int64_t n, uint32_t step,
                      uint32_t seed, int64_t first_index, const Hyper h) {
    const int64_t begin = block * kQBlock, len = (n - begin < kQBlock) ? n - begin : kQBlock;
    const float m_scale = exp_avg_scale[block], v_scale = exp_avg_sq_scale[block];
    float m_new[kQBlock], v_new[kQBlock], m_max = 0.0f, v_max = 0.0f;
#pragma omp simd reduction(max : m_max, v_max)
    for (int64_t j = 0; j < len; ++j) {
        const int64_t i = begin + j;
        float m = m_codes[exp_avg_q[i]] * m_scale, v = v_codes[exp_avg_sq_q[i]] * v_scale;
        float p = join_master(hi[i], lo[i]);
        adamw_element(load_grad(grad, i), m, v, p, h);
        split_master(p, hi + i, lo + i);
        m_new[j] = m;
        v_new[j] = v;
        m_max = std::fabs(m) > m_max ? std::fabs(m) : m_max;
        v_max = v > v_max ? v : v_max;
    }
    const float m_inv = m_max > 0.0f ? 1.0f / m_max : 0.0f, v_inv = v_max > 0.0f ? 1.0f / v_max : 0.0f;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
        const int64_t i = begin + j;
        const uint32_t mixed = mix32(static_cast<uint32_t>(first_index + i) + seed * 0x632BE5ABu);
        exp_avg_q[i] = encode_exp_avg(m_new[j], m_inv, rounding_offset(mixed, 2 * step));
        exp_avg_sq_q[i] = encode_exp_avg_sq(v_new[j], v_inv, rounding_offset(mixed, 2 * step + 1));
    }
    exp_avg_scale[block] = m_max;
    exp_avg_sq_scale[block] = v_max;
}

// Thread t of nt gets units [units * t / nt, units * (t + 1) / nt) of `unit` elements each, so slices start on
// unit boundaries: 64 elements (a 64-byte line of every buffer) or one quantization block.
template <typename Body>
void parallel_units(int64_t n, int64_t unit, int num_threads, Body body) {
    int64_t units = (n + unit - 1) / unit;
    int threads = static_cast<int>(units < num_threads ? (units > 0 ? units : 1) : num_threads);
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        body(units * t / nt, units * (t + 1) / nt);
    }
}

template <typename Grad>
void adamw_parallel(float* master, const Grad* grad, float* exp_avg, float* exp_avg_sq, uint16_t* out_bf16,
                    int64_t n, const Hyper h, int num_threads) {
    constexpr int64_t kAlign = 64;
    parallel_units(n, kAlign, num_threads, [&](int64_t first, int64_t last) {
        int64_t begin = first * kAlign, end = last * kAlign < n ? last * kAlign : n;
        if (begin >= end) return;
        if (out_bf16)
            adamw_slice<Grad, true>(master, grad, exp_avg, exp_avg_sq, out_bf16, begin, end, h);
        else
            adamw_slice<Grad, false>(master, grad, exp_avg, exp_avg_sq, nullptr, begin, end, h);
    });
}

}  // namespace

extern "C" {

// grad_is_bf16: grad points at uint16 bf16 bits, else at fp32. out_bf16 may be null.
void horizon_cpu_adamw_step(float* master, const void* grad, int grad_is_bf16, float* exp_avg, float* exp_avg_sq,
                            uint16_t* out_bf16, int64_t n, float grad_scale, float beta1, float one_minus_beta1,
                            float beta2, float one_minus_beta2, float decay, float step_size,
                            float bias_correction2_sqrt, float eps, int num_threads) {
    const Hyper h{grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size,
                  bias_correction2_sqrt, eps};
    if (grad_is_bf16)
        adamw_parallel(master, static_cast<const uint16_t*>(grad), exp_avg, exp_avg_sq, out_bf16, n, h, num_threads);
    else
        adamw_parallel(master, static_cast<const float*>(grad), exp_avg, exp_avg_sq, out_bf16, n, h, num_threads);
}

void horizon_cpu_adamw_step_split(uint16_t* hi, int16_t* lo, const void* grad, int grad_is_bf16, float* exp_avg,
                                  float* exp_avg_sq, int64_t n, float grad_scale, float beta1,
                                  float one_minus_beta1, float beta2, float one_minus_beta2, float decay,
                                  float step_size, float bias_correction2_sqrt, float eps, int num_threads) {
    const Hyper h{grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size,
                  bias_correction2_sqrt, eps};
    constexpr int64_t kAlign = 64;
    parallel_units(n, kAlign, num_threads, [&](int64_t first, int64_t last) {
        int64_t begin = first * kAlign, end = last * kAlign < n ? last * kAlign : n;
        if (begin >= end) return;
        if (grad_is_bf16)
            adamw_split_slice(hi, lo, static_cast<const uint16_t*>(grad), exp_avg, exp_avg_sq, begin, end, h);
        else
            adamw_split_slice(hi, lo, static_cast<const float*>(grad), exp_avg, exp_avg_sq, begin, end, h);
    });
}

// m_codes, v_codes: the fp32[256] code tables of kernels/host_formats.py (passed in, so both paths share them).
// first_index: the index of hi[0] in its whole buffer, so that a slice (one process's shard of a layer) rounds
// exactly as the whole buffer does.
void horizon_cpu_adamw_step_split_8bit(uint16_t* hi, int16_t* lo, const void* grad, int grad_is_bf16,
                                       uint8_t* exp_avg_q, float* exp_avg_scale, uint8_t* exp_avg_sq_q,
                                       float* exp_avg_sq_scale, const float* m_codes, const float* v_codes,
                                       int64_t n, int64_t step, int64_t seed, int64_t first_index,
                                       float grad_scale, float beta1, float one_minus_beta1, float beta2,
                                       float one_minus_beta2, float decay, float step_size,
                                       float bias_correction2_sqrt, float eps, int num_threads) {
    const Hyper h{grad_scale, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size,
                  bias_correction2_sqrt, eps};
    parallel_units(n, kQBlock, num_threads, [&](int64_t first, int64_t last) {
        for (int64_t b = first; b < last; ++b) {
            if (grad_is_bf16)
                adamw_8bit_block(hi, lo, static_cast<const uint16_t*>(grad), exp_avg_q, exp_avg_scale,
                                 exp_avg_sq_q, exp_avg_sq_scale, m_codes, v_codes, b, n,
                                 static_cast<uint32_t>(step), static_cast<uint32_t>(seed), first_index, h);
            else
                adamw_8bit_block(hi, lo, static_cast<const float*>(grad), exp_avg_q, exp_avg_scale,
                                 exp_avg_sq_q, exp_avg_sq_scale, m_codes, v_codes, b, n,
                                 static_cast<uint32_t>(step), static_cast<uint32_t>(seed), first_index, h);
        }
    });
}

}  // extern "C"
