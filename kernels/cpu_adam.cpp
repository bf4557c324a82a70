// CPU AdamW over host buffers in one pass: the compiled half of kernels/cpu_adam.py (maths, limits and the
// reasons for this design are in that file's docstring).
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

// One thread's contiguous slice [begin, end). WriteBf16 is a template flag, not a branch in the loop, so
// both loops vectorise to straight-line code.
template <typename Grad, bool WriteBf16>
void adamw_slice(float* __restrict master, const Grad* __restrict grad, float* __restrict exp_avg,
                 float* __restrict exp_avg_sq, uint16_t* __restrict out_bf16, int64_t begin, int64_t end,
                 const Hyper h) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
        float g = load_grad(grad, i) * h.grad_scale;
        float m = h.beta1 * exp_avg[i] + h.one_minus_beta1 * g;
        float v = h.beta2 * exp_avg_sq[i] + h.one_minus_beta2 * g * g;
        float p = master[i] * h.decay;
        float denom = std::sqrt(v) / h.bias_correction2_sqrt + h.eps;
        p = p - h.step_size * m / denom;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        master[i] = p;
        if (WriteBf16) out_bf16[i] = float_to_bf16_rne(p);
    }
}

template <typename Grad>
void adamw_parallel(float* master, const Grad* grad, float* exp_avg, float* exp_avg_sq, uint16_t* out_bf16,
                    int64_t n, const Hyper h, int num_threads) {
    // Slices start on multiples of 64 elements (a 64-byte line of the bf16 output, four of the fp32 buffers)
    // so no two threads write the same cache line.
    constexpr int64_t kAlign = 64;
    int64_t blocks = (n + kAlign - 1) / kAlign;
    int threads = static_cast<int>(blocks < num_threads ? (blocks > 0 ? blocks : 1) : num_threads);
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t begin = blocks * t / nt * kAlign;
        int64_t end = blocks * (t + 1) / nt * kAlign;
        if (end > n) end = n;
        if (begin < end) {
            if (out_bf16)
                adamw_slice<Grad, true>(master, grad, exp_avg, exp_avg_sq, out_bf16, begin, end, h);
            else
                adamw_slice<Grad, false>(master, grad, exp_avg, exp_avg_sq, nullptr, begin, end, h);
        }
    }
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

}  // extern "C"
