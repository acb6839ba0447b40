// Copyright (c) ulite-monai developers. Licensed under the Apache License, Version 2.0.
//
// U-Lite's fused CPU kernels (ulite_monai/networks/cpu_kernels.py), for channels-last float32 tensors
// viewed as [N, D, H, W, C] (D == 1 in 2D):
// - the encoder tail: batch-norm affine -> 1x1 conv -> max-pool 2, forward and backward. The 1x1 conv's output only
//   ever lives in a per-thread buffer of the rows that one pooling window covers; the backward rebuilds, per window,
//   the conv output's gradient (zero but at each maximum) and multiplies it out densely for the compiled channel
//   pairs (a sparse scatter per maximum for the others);
// - the decoder entry: the skip's 1x1 conv + nearest up-sampling add, with the batch norm's statistics in the same
//   pass; backward through the batch norm into the skip's, the coarse input's and the weight's gradients in one pass;
// - the decoder tail: 1x1 conv -> exact GELU, one pass each way, the pre-activation recomputed in the backward;
// - the axial block: identity plus K taps along every axis, the input gradient being the same kernel with the
//   taps reversed, and the weight and bias gradients one more pass;
// - per-channel statistics for the batch norm;
// - for inference (forward only): a whole encoder stage (axial block with the batch norm folded in, the stacked 1x1
//   convs, max-pool, activation) and a whole decoder stage (up-sampling add, axial block, 1x1 conv, GELU, optionally
//   the network's output conv), each writing only its outputs to memory.
//
// Encoder-tail names: Ci input channels (the skip), Co output channels, R rows per pooling group (2 in 2D, 4 in
// 3D), a "window" is the 2R voxels that one pooled value is taken over, numbered j = r * 2 + dw in the order
// PyTorch's max-pool scans them (so ties and NaNs pick the same voxel).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>
#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace {

// GCC/Clang vector types (the compiler maps them onto the widest vectors the CPU has); `u` = unaligned access.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16)));
typedef float v4u __attribute__((vector_size(16), aligned(4)));

template <int N> struct Vec;
template <> struct Vec<16> { using type = v16; using unaligned = v16u; };
template <> struct Vec<8> { using type = v8; using unaligned = v8u; };
template <> struct Vec<4> { using type = v4; using unaligned = v4u; };

template <int N>
inline typename Vec<N>::type load(const float* p) { return *reinterpret_cast<const typename Vec<N>::unaligned*>(p); }
template <int N>
inline void store(float* p, typename Vec<N>::type v) { *reinterpret_cast<typename Vec<N>::unaligned*>(p) = v; }

// Two 8-wide vectors as one 16-wide one, and the halves of a 16-wide one.
inline v16 join8(v8 a, v8 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline v8 low8(v16 a) { return __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7); }
inline v8 high8(v16 a) { return __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15); }
// the sum of a vector's lanes
inline float hsum(v4 b) { return (b[0] + b[2]) + (b[1] + b[3]); }
inline float hsum(v8 a) { return hsum(__builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7)); }
inline float hsum(v16 a) { return hsum(low8(a) + high8(a)); }

// The widest vector (bytes) whose compares and selects the target runs natively. GCC lowers a compare or a select
// of a wider vector type lane by lane: on an AVX2 CPU, a 16-wide GELU (compares and selects in its exp and erf) ran
// 15 to 40 times slower than on two 8-wide halves, and the kernels as a whole 3 times slower than PyTorch's own
// operators. So the functions that compare (vexp, gelu, activate, the max-pool scans) run on halves there.
#if defined(__AVX512F__)
constexpr size_t kSelectBytes = 64;
#elif defined(__AVX__)
constexpr size_t kSelectBytes = 32;
#else
constexpr size_t kSelectBytes = 16;
#endif

// The widest vectors the kernels use: 16 floats where the CPU has 16-wide registers (AVX-512), 8 with AVX2, else 4
// (a vector type wider than the CPU's registers lives in memory between operations: on an AVX2 CPU a 1x1 conv + GELU
// over 32 channels ran at 2 GFLOP/s on one core with 16-wide vectors, the stock one at 28), and the vector width for
// C channels.
constexpr int kVW = kSelectBytes >= 64 ? 16 : (kSelectBytes >= 32 ? 8 : 4);
constexpr int vwidth(int c) { return c >= kVW ? kVW : 8; }

// Rows (voxels) per register block for kernels that keep `rows` x `nv` vector accumulators: `rows` as tuned for
// 32 16-wide registers (AVX-512); with 16 8-wide ones (AVX2), at most as many as leave 12 accumulators, the rest of
// the registers for the weights and inputs (more spilled the accumulators to the stack).
constexpr int fit_rows(int rows, int nv) {
  if (kVW == 16) return rows;
  const int fit = 12 / nv;
  return fit < 1 ? 1 : (fit < rows ? fit : rows);
}

// A vector type's halves, and the two joined back.
template <typename V> struct Halves;
template <> struct Halves<v16> {
  using H = v8;
  static v8 lo(v16 a) { return low8(a); }
  static v8 hi(v16 a) { return high8(a); }
  static v16 join(v8 a, v8 b) { return join8(a, b); }
};
template <> struct Halves<v8> {
  using H = v4;
  static v4 lo(v8 a) { return __builtin_shufflevector(a, a, 0, 1, 2, 3); }
  static v4 hi(v8 a) { return __builtin_shufflevector(a, a, 4, 5, 6, 7); }
  static v8 join(v4 a, v4 b) { return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7); }
};
// whether V's compares and selects run on its halves (see kSelectBytes)
template <typename V>
constexpr bool kSplit = sizeof(V) > kSelectBytes;

struct Geometry {
  int64_t n, d, h, w, ci, co, d2, h2, w2, rows;
  bool pool_d;
  int64_t groups() const { return n * d2 * h2; }
  // first voxel of row r of pooling group g
  int64_t row_start(int64_t g, int64_t r) const {
    const int64_t b = g / (d2 * h2), dz = (g / h2) % d2, hy = g % h2;
    const int64_t dd = pool_d ? 2 * dz + r / 2 : dz;
    return ((b * d + dd) * h + 2 * hy + r % 2) * w;
  }
};

Geometry geometry(const at::Tensor& y, int64_t co, bool pool_d) {
  TORCH_CHECK(y.dim() == 5 && y.is_contiguous() && y.scalar_type() == at::kFloat && y.device().is_cpu(),
              "encoder_tail: expected a contiguous float32 CPU tensor [N, D, H, W, C]");
  Geometry g;
  g.n = y.size(0); g.d = y.size(1); g.h = y.size(2); g.w = y.size(3); g.ci = y.size(4); g.co = co;
  g.pool_d = pool_d;
  TORCH_CHECK(g.h % 2 == 0 && g.w % 2 == 0 && (!pool_d || g.d % 2 == 0), "encoder_tail: odd spatial size");
  g.d2 = pool_d ? g.d / 2 : g.d; g.h2 = g.h / 2; g.w2 = g.w / 2; g.rows = pool_d ? 4 : 2;
  return g;
}

// While alive, the calling thread treats subnormal floats as zero, inputs and results (x86's FTZ and DAZ, ARM's FZ),
// then restores its previous mode. The kernels' GELU tails (exp(-x^2 / 2) for |x| above 13) and gradients of tiny
// values are subnormal, and each subnormal operation costs a microcode assist of about a hundred cycles: a 1x1 conv
// + GELU over [32768, 64] whose pre-activations had 10% of them beyond 13 ran 3.3 times slower (15.4 against 4.7 ms
// on one core). Values below 1.2e-38 become zero, far inside every tolerance the kernels are held to.
class FlushSubnormals {
 public:
  FlushSubnormals() {
#if defined(__SSE__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040);  // FTZ (bit 15) | DAZ (bit 6)
#elif defined(__aarch64__)
    asm volatile("mrs %0, fpcr" : "=r"(saved_));
    asm volatile("msr fpcr, %0" : : "r"(saved_ | (uint64_t(1) << 24)));  // FZ
#endif
  }
  ~FlushSubnormals() {
#if defined(__SSE__)
    _mm_setcsr(saved_);
#elif defined(__aarch64__)
    asm volatile("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;

 private:
#if defined(__aarch64__)
  uint64_t saved_ = 0;
#else
  unsigned int saved_ = 0;
#endif
};

// at::parallel_for with subnormals flushed in every chunk (FlushSubnormals); every kernel here runs through it.
template <typename F>
void parallel(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    FlushSubnormals flush;
    f(b, e);
  });
}

// Splits [0, total) into `parts` contiguous ranges and runs f(part, begin, end) for each, in parallel.
template <typename F>
void by_parts(int64_t total, int64_t parts, const F& f) {
  parallel(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) f(p, total * p / parts, total * (p + 1) / parts);
  });
}

int64_t num_parts(int64_t groups) { return std::max<int64_t>(1, std::min<int64_t>(groups, at::get_num_threads())); }

// Per-thread partial sums: `parts` blocks of n floats, each starting on its own 64-byte cache line, so that no two
// threads ever write to one line. (Packed blocks shared lines between threads: the 8-channel 1x1 conv + GELU
// backward, which adds into its per-thread bias sums on every call, ran about 4 times slower, the line going back
// and forth between the cores.)
class PartSums {
 public:
  PartSums(int64_t parts, int64_t n)
      : parts_(parts), n_(n), stride_((n + 15) / 16 * 16), buf_(static_cast<size_t>(parts * stride_ + 16), 0.f) {
    const auto addr = reinterpret_cast<uintptr_t>(buf_.data());
    base_ = buf_.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
  float* part(int64_t p) { return base_ + p * stride_; }
  // The parts added up into a new float tensor of `shape` (n elements).
  at::Tensor sum(at::IntArrayRef shape, const at::TensorOptions& opt) const {
    auto out = at::zeros(shape, opt);
    float* o = out.data_ptr<float>();
    TORCH_CHECK(out.numel() == n_, "PartSums: shape");
    for (int64_t p = 0; p < parts_; ++p)
      for (int64_t i = 0; i < n_; ++i) o[i] += base_[p * stride_ + i];
    return out;
  }

 private:
  int64_t parts_, n_, stride_;
  std::vector<float> buf_;
  float* base_ = nullptr;
};

}  // namespace

// exp(x) on a vector: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 6 (relative error
// below 2e-7), 2^n from the exponent bits.
template <typename V>
inline V vexp(V x) {
  if constexpr (kSplit<V>) {
    using S = Halves<V>;
    return S::join(vexp(S::lo(x)), vexp(S::hi(x)));
  }
  using I = decltype(x < x);
  const V zero{};
  x = x > zero + 88.0f ? zero + 88.0f : x;
  x = x < zero - 87.0f ? zero - 87.0f : x;
  const V t = x * 1.44269504f;
  const I n = __builtin_convertvector(t + (t >= zero ? zero + 0.5f : zero - 0.5f), I);
  const V nf = __builtin_convertvector(n, V);
  const V r = x - nf * 0.693145751953125f - nf * 1.4286068203094172e-06f;
  const V p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  const I bits = (n + 127) << 23;
  return p * reinterpret_cast<const V&>(bits);
}

// GELU(x) = x * Phi(x) and, if dy, its derivative Phi(x) + x * phi(x). Phi through erf by Abramowitz & Stegun
// 7.1.26 (absolute error below 1.5e-7), computed without cancellation on either side of zero.
template <typename V>
inline V gelu(V x, V* dy) {
  if constexpr (kSplit<V>) {
    using S = Halves<V>;
    typename S::H d0, d1;
    const V out = S::join(gelu(S::lo(x), dy != nullptr ? &d0 : nullptr), gelu(S::hi(x), dy != nullptr ? &d1 : nullptr));
    if (dy != nullptr) *dy = S::join(d0, d1);
    return out;
  }
  const V zero{};
  const V u = x * 0.70710678118654752f;
  const V au = u < zero ? -u : u;
  const V t = 1.0f / (1.0f + 0.3275911f * au);
  const V poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const V e = vexp(-au * au);  // exp(-x^2 / 2)
  const V tail = 0.5f * poly * e;  // 1 - Phi(|x|)
  const V cdf = u < zero ? tail : 1.0f - tail;
  if (dy != nullptr) *dy = cdf + x * e * 0.39894228040143268f;
  return x * cdf;
}

// One step of a max-pool scan, taking the maximum as PyTorch's max-pool does: where x > best or x is NaN, best = x
// and at = j.
template <typename V>
inline void pool_step(V x, V& best, V& at, V j) {
  if constexpr (kSplit<V>) {
    using S = Halves<V>;
    typename S::H b0 = S::lo(best), b1 = S::hi(best), a0 = S::lo(at), a1 = S::hi(at);
    pool_step(S::lo(x), b0, a0, S::lo(j));
    pool_step(S::hi(x), b1, a1, S::hi(j));
    best = S::join(b0, b1);
    at = S::join(a0, a1);
  } else {
    const auto take = (x > best) | (x != x);
    best = take ? x : best;
    at = take ? j : at;
  }
}

// pre = z (kept for the backward), then z = gelu(z), over n floats.
inline void gelu_keep(float* __restrict__ z, float* __restrict__ pre, int64_t n) {
  using V = Vec<kVW>::type;
  int64_t i = 0;
  for (; i + kVW <= n; i += kVW) {
    const V x = load<kVW>(z + i);
    store<kVW>(pre + i, x);
    store<kVW>(z + i, gelu<V>(x, nullptr));
  }
  if (i < n) {
    alignas(64) float t[kVW] = {};
    for (int64_t j = i; j < n; ++j) t[j - i] = z[j];
    store<kVW>(t, gelu<V>(load<kVW>(t), nullptr));
    for (int64_t j = i; j < n; ++j) { pre[j] = z[j]; z[j] = t[j - i]; }
  }
}

// out = g * gelu'(pre), over n floats.
inline void gelu_grad(const float* __restrict__ g, const float* __restrict__ pre, float* __restrict__ out, int64_t n) {
  using V = Vec<kVW>::type;
  int64_t i = 0;
  V d;
  for (; i + kVW <= n; i += kVW) {
    gelu<V>(load<kVW>(pre + i), &d);
    store<kVW>(out + i, load<kVW>(g + i) * d);
  }
  if (i < n) {
    alignas(64) float t[kVW] = {};
    for (int64_t j = i; j < n; ++j) t[j - i] = pre[j];
    gelu<V>(load<kVW>(t), &d);
    store<kVW>(t, d);
    for (int64_t j = i; j < n; ++j) out[j] = g[j] * t[j - i];
  }
}

// The per-group work of the forward, with the channel counts known at compile time (CI, CO > 0) so that the 1x1
// conv's accumulators stay in vector registers; CI = CO = 0 reads them from the geometry instead. With ppre, the
// pooled values go there and their GELU to pz.
template <int CI, int CO>
void forward_groups(const Geometry& g, int64_t g0, int64_t g1, const float* __restrict__ py,
                    const float* __restrict__ pa, const float* __restrict__ pb, const float* __restrict__ pw,
                    const float* __restrict__ pbias, float* __restrict__ ps, float* __restrict__ pz,
                    uint8_t* __restrict__ pi, float* __restrict__ ppre) {
  const int64_t ci = CI > 0 ? CI : g.ci, co = CO > 0 ? CO : g.co, w = g.w;
  std::vector<float> buf(g.rows * w * co);
  float* __restrict__ p = buf.data();
  for (int64_t grp = g0; grp < g1; ++grp) {
    for (int64_t r = 0; r < g.rows; ++r) {
      const int64_t v0 = g.row_start(grp, r);
      for (int64_t x = 0; x < w; ++x) {
        const float* __restrict__ yi = py + (v0 + x) * ci;
        float* __restrict__ si = ps + (v0 + x) * ci;
        float* __restrict__ out = p + (r * w + x) * co;
        if constexpr (CI > 0 && CO > 0) {
          constexpr int VO = vwidth(CO);
          using V = typename Vec<VO>::type;
          float sv[CI];
          for (int k = 0; k < CI; ++k) sv[k] = yi[k] * pa[k] + pb[k];
          for (int k = 0; k < CI; ++k) si[k] = sv[k];
          V acc[CO / VO];
          for (int v = 0; v < CO / VO; ++v) acc[v] = load<VO>(pbias + v * VO);
          for (int k = 0; k < CI; ++k) {
            const float sk = sv[k];
            const float* wk = pw + k * CO;
            for (int v = 0; v < CO / VO; ++v) acc[v] += sk * load<VO>(wk + v * VO);
          }
          for (int v = 0; v < CO / VO; ++v) store<VO>(out + v * VO, acc[v]);
        } else {
          for (int64_t k = 0; k < ci; ++k) si[k] = yi[k] * pa[k] + pb[k];
          for (int64_t c = 0; c < co; ++c) out[c] = pbias[c];
          for (int64_t k = 0; k < ci; ++k) {
            const float sk = si[k];
            const float* __restrict__ wk = pw + k * co;
            for (int64_t c = 0; c < co; ++c) out[c] += sk * wk[c];
          }
        }
      }
    }
    const int64_t o0 = grp * g.w2;
    for (int64_t x2 = 0; x2 < g.w2; ++x2) {
      float* __restrict__ zo = pz + (o0 + x2) * co;
      uint8_t* __restrict__ io = pi + (o0 + x2) * co;
      const float* first = p + (2 * x2) * co;
      if constexpr (CO > 0) {
        constexpr int VO = vwidth(CO);
        using V = typename Vec<VO>::type;
        V best[CO / VO], at[CO / VO];
        for (int v = 0; v < CO / VO; ++v) { best[v] = load<VO>(first + v * VO); at[v] = V{}; }
        for (int64_t j = 1; j < 2 * g.rows; ++j) {
          const float* pj = p + ((j / 2) * w + 2 * x2 + j % 2) * co;
          const V jv = V{} + static_cast<float>(j);
          for (int v = 0; v < CO / VO; ++v) {
            pool_step<V>(load<VO>(pj + v * VO), best[v], at[v], jv);
          }
        }
        alignas(64) float jf[CO];
        for (int v = 0; v < CO / VO; ++v) store<VO>(jf + v * VO, at[v]);
        if (ppre != nullptr) {
          float* __restrict__ po = ppre + (o0 + x2) * co;
          for (int v = 0; v < CO / VO; ++v) {
            store<VO>(po + v * VO, best[v]);
            store<VO>(zo + v * VO, gelu<V>(best[v], nullptr));
          }
        } else {
          for (int v = 0; v < CO / VO; ++v) store<VO>(zo + v * VO, best[v]);
        }
        for (int c = 0; c < CO; ++c) io[c] = static_cast<uint8_t>(jf[c]);
      } else {
        for (int64_t c = 0; c < co; ++c) { zo[c] = first[c]; io[c] = 0; }
        for (int64_t j = 1; j < 2 * g.rows; ++j) {
          const float* __restrict__ pj = p + ((j / 2) * w + 2 * x2 + j % 2) * co;
          const uint8_t jj = static_cast<uint8_t>(j);
          for (int64_t c = 0; c < co; ++c) {
            const float v = pj[c];
            const bool take = (v > zo[c]) || (v != v);
            zo[c] = take ? v : zo[c];
            io[c] = take ? jj : io[c];
          }
        }
        if (ppre != nullptr) gelu_keep(zo, ppre + (o0 + x2) * co, co);
      }
    }
  }
}

// Calls body.template operator()<CI, CO>() for the channel pairs that have compiled kernels, else <0, 0>.
template <typename F>
void dispatch_channels(int64_t ci, int64_t co, const F& body) {
  if (ci == 8 && co == 16) return body.template operator()<8, 16>();
  if (ci == 16 && co == 32) return body.template operator()<16, 32>();
  if (ci == 32 && co == 64) return body.template operator()<32, 64>();
  if (ci == 64 && co == 128) return body.template operator()<64, 128>();
  return body.template operator()<0, 0>();
}

// s = y * a + b (the skip); z = maxpool2(s @ wt + bias); idx = the window position of each maximum.
// y [N, D, H, W, Ci]; a, b [Ci]; wt [Ci, Co]; bias [Co]. Returns s, z [N, D2, H/2, W/2, Co], idx (uint8, as z) and,
// with act_gelu, z's GELU in place of z and z itself as a fourth tensor (else an empty one).
std::vector<at::Tensor> encoder_tail_forward(const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                                             const at::Tensor& wt, const at::Tensor& bias, bool pool_d,
                                             bool act_gelu) {
  const Geometry g = geometry(y, wt.size(1), pool_d);
  TORCH_CHECK(wt.is_contiguous() && wt.size(0) == g.ci && a.is_contiguous() && b.is_contiguous() &&
              bias.is_contiguous(), "encoder_tail_forward: bad parameter shapes");
  auto s = at::empty_like(y);
  auto z = at::empty({g.n, g.d2, g.h2, g.w2, g.co}, y.options());
  auto idx = at::empty({g.n, g.d2, g.h2, g.w2, g.co}, y.options().dtype(at::kByte));
  auto pre = act_gelu ? at::empty_like(z) : at::empty({0}, y.options());
  float* ppre = act_gelu ? pre.data_ptr<float>() : nullptr;
  const float *py = y.data_ptr<float>(), *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
  const float *pw = wt.data_ptr<float>(), *pbias = bias.data_ptr<float>();
  float *ps = s.data_ptr<float>(), *pz = z.data_ptr<float>();
  uint8_t* pi = idx.data_ptr<uint8_t>();
  dispatch_channels(g.ci, g.co, [&]<int CI, int CO>() {
    by_parts(g.groups(), num_parts(g.groups()), [&](int64_t, int64_t g0, int64_t g1) {
      forward_groups<CI, CO>(g, g0, g1, py, pa, pb, pw, pbias, ps, pz, pi, ppre);
    });
  });
  return {s, z, idx, pre};
}

// The per-group work of the backward's first pass (see encoder_tail_backward); CI, CO as in forward_groups, WIN
// the voxels of a pooling window (4 in 2D, 8 in 3D; only used with CI, CO > 0). The skip s = y * a + b is
// recomputed per window (reading it back cost a full-resolution pass); with ppre, pgz is the gradient of the GELU
// of the pooled values ppre.
template <int CI, int CO, int WIN>
void backward_groups(const Geometry& g, int64_t g0, int64_t g1, const float* __restrict__ pgz,
                     const uint8_t* __restrict__ pi, const float* __restrict__ py, const float* __restrict__ pa,
                     const float* __restrict__ pb, const float* __restrict__ ppre, const float* __restrict__ pgs,
                     const float* __restrict__ pw, const float* __restrict__ pm, float* __restrict__ pgy,
                     float* __restrict__ aw, float* __restrict__ ab, float* __restrict__ ag,
                     float* __restrict__ agx) {
  const int64_t ci = CI > 0 ? CI : g.ci, co = CO > 0 ? CO : g.co, win = 2 * g.rows;
  std::vector<float> local_buf(win * ci), skip_buf(win * ci), gz_buf(co + 16);
  float* __restrict__ local = local_buf.data();
  float* __restrict__ sw = skip_buf.data();  // the window's skip values, [win][ci]
  int64_t vox[8];
  constexpr int VWS = vwidth(CI);
  constexpr int NVS = CI > 0 ? CI / VWS : 1;
  using VS = typename Vec<VWS>::type;
  VS sum_g[NVS], sum_gx[NVS], mean_v[NVS];
  for (int u = 0; u < NVS; ++u) {
    sum_g[u] = VS{};
    sum_gx[u] = VS{};
    mean_v[u] = CI > 0 ? load<VWS>(pm + u * VWS) : VS{};
  }
  for (int64_t grp = g0; grp < g1; ++grp) {
    int64_t starts[4];
    for (int64_t r = 0; r < g.rows; ++r) starts[r] = g.row_start(grp, r);
    const int64_t o0 = grp * g.w2;
    for (int64_t x2 = 0; x2 < g.w2; ++x2) {
      for (int64_t j = 0; j < win; ++j) vox[j] = starts[j / 2] + 2 * x2 + j % 2;
      const float* __restrict__ gzo = pgz + (o0 + x2) * co;
      if (ppre != nullptr) {
        gelu_grad(gzo, ppre + (o0 + x2) * co, gz_buf.data(), co);
        gzo = gz_buf.data();
      }
      const uint8_t* __restrict__ io = pi + (o0 + x2) * co;
      for (int64_t c = 0; c < co; ++c) ab[c] += gzo[c];
      if constexpr (CI > 0) {
        for (int j = 0; j < WIN; ++j)
          for (int u = 0; u < NVS; ++u)
            store<VWS>(sw + j * CI + u * VWS,
                       load<VWS>(py + vox[j] * CI + u * VWS) * load<VWS>(pa + u * VWS) + load<VWS>(pb + u * VWS));
      } else {
        for (int64_t j = 0; j < win; ++j)
          for (int64_t k = 0; k < ci; ++k) sw[j * ci + k] = py[vox[j] * ci + k] * pa[k] + pb[k];
      }
      if constexpr (CI > 0 && CO > 0) {
        // dense: gp[j][c] is the window's gradient of the 1x1 conv output (zero but at each maximum), then
        // local = gp @ weight and aw += gp^T @ s, with register accumulators (a sparse scatter into `local`
        // chained every channel through a store and a load, 4x slower)
        constexpr int VW = vwidth(CI);
        constexpr int NV = CI / VW;
        using V = typename Vec<VW>::type;
        alignas(64) float gp[WIN][CO > 0 ? CO : 1];
        for (int j = 0; j < WIN; ++j)
          for (int c = 0; c < CO; ++c) gp[j][c] = 0.f;
        for (int c = 0; c < CO; ++c) gp[io[c]][c] = gzo[c];
        // one accumulator per window voxel: independent chains of fused multiply-adds
        V acc[WIN][NV];
        for (int j = 0; j < WIN; ++j)
          for (int v = 0; v < NV; ++v) acc[j][v] = V{};
        for (int c = 0; c < CO; ++c) {
          const float* wc = pw + c * CI;
          V wv[NV];
          for (int v = 0; v < NV; ++v) wv[v] = load<VW>(wc + v * VW);
          for (int j = 0; j < WIN; ++j)
            for (int v = 0; v < NV; ++v) acc[j][v] += gp[j][c] * wv[v];
        }
        for (int j = 0; j < WIN; ++j)
          for (int v = 0; v < NV; ++v) store<VW>(local + j * CI + v * VW, acc[j][v]);
        // aw += gp^T @ s: each output channel's gradient sits at one window voxel, so one FMA row per channel (the
        // dense product spent WIN times as many FMAs on zeros)
        for (int c = 0; c < CO; ++c) {
          float* awc = aw + c * CI;
          const float gc = gzo[c];
          const float* sj = sw + io[c] * CI;
          for (int v = 0; v < NV; ++v) store<VW>(awc + v * VW, load<VW>(awc + v * VW) + gc * load<VW>(sj + v * VW));
        }
      } else {
        std::memset(local, 0, sizeof(float) * win * ci);
        for (int64_t c = 0; c < co; ++c) {
          const float gc = gzo[c];
          if (gc == 0.f) continue;
          const int64_t j = io[c];
          const float* __restrict__ wc = pw + c * ci;
          const float* __restrict__ sj = sw + j * ci;
          float* __restrict__ lj = local + j * ci;
          float* __restrict__ awc = aw + c * ci;
          for (int64_t k = 0; k < ci; ++k) {
            lj[k] += gc * wc[k];
            awc[k] += gc * sj[k];
          }
        }
      }
      for (int64_t j = 0; j < win; ++j) {
        float* __restrict__ lj = local + j * ci;
        const int64_t v = vox[j];
        const float* __restrict__ yv = py + v * ci;
        float* __restrict__ out = pgy + v * ci;
        const float* __restrict__ sk = pgs != nullptr ? pgs + v * ci : nullptr;
        if constexpr (CI > 0) {
          for (int u = 0; u < NVS; ++u) {
            VS gv = load<VWS>(lj + u * VWS);
            if (sk != nullptr) gv += load<VWS>(sk + u * VWS);
            store<VWS>(out + u * VWS, gv);
            sum_g[u] += gv;
            sum_gx[u] += gv * (load<VWS>(yv + u * VWS) - mean_v[u]);
          }
        } else {
          for (int64_t k = 0; k < ci; ++k) {
            const float gv = lj[k] + (sk != nullptr ? sk[k] : 0.f);
            out[k] = gv;
            ag[k] += gv;
            agx[k] += gv * (yv[k] - pm[k]);
          }
        }
      }
    }
  }
  if constexpr (CI > 0) {
    for (int u = 0; u < NVS; ++u) {
      store<VWS>(ag + u * VWS, load<VWS>(ag + u * VWS) + sum_g[u]);
      store<VWS>(agx + u * VWS, load<VWS>(agx + u * VWS) + sum_gx[u]);
    }
  }
}

// gy = gy * scale + y * coef + shift, per channel, in place over [m, CI] (the backward's second pass).
template <int CI>
void second_pass(float* __restrict__ pgy, const float* __restrict__ py, int64_t m, const float* scale,
                 const float* coef, const float* shift) {
  constexpr int VW = vwidth(CI);
  using V = typename Vec<VW>::type;
  parallel(0, m, 2048, [&](int64_t v0, int64_t v1) {
    V sc[CI / VW], co[CI / VW], sh[CI / VW];
    for (int u = 0; u < CI / VW; ++u) {
      sc[u] = load<VW>(scale + u * VW); co[u] = load<VW>(coef + u * VW); sh[u] = load<VW>(shift + u * VW);
    }
    for (int64_t v = v0; v < v1; ++v)
      for (int u = 0; u < CI / VW; ++u) {
        float* o = pgy + v * CI + u * VW;
        store<VW>(o, load<VW>(o) * sc[u] + load<VW>(py + v * CI + u * VW) * co[u] + sh[u]);
      }
  });
}

// Backward of encoder_tail_forward followed by batch norm's backward.
// gz: gradient of z, or with a non-empty pre (encoder_tail_forward's fourth output) of gelu(pre); gskip: gradient
// reaching s from elsewhere (the decoder), or an empty tensor; weight [Co, Ci]; a, b as in encoder_tail_forward.
// With batch statistics (training), gy = a * (gs - sum(gs) / M - (y - mean) * invstd^2 * sum(gs * (y - mean)) / M),
// else gy = a * gs. Returns gy, grad of weight [Co, Ci], grad of bias [Co], sum(gs) [Ci], sum(gs * (y - mean)) [Ci].
std::vector<at::Tensor> encoder_tail_backward(const at::Tensor& gz, const at::Tensor& idx, const at::Tensor& y,
                                              const at::Tensor& pre, const at::Tensor& gskip,
                                              const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                                              const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats,
                                              bool pool_d) {
  const Geometry g = geometry(y, weight.size(0), pool_d);
  TORCH_CHECK(gz.is_contiguous() && idx.is_contiguous() && weight.is_contiguous() && weight.size(1) == g.ci &&
              gz.numel() == idx.numel() && a.is_contiguous() && b.is_contiguous() && a.numel() == g.ci &&
              b.numel() == g.ci, "encoder_tail_backward: bad shapes");
  const bool has_pre = pre.defined() && pre.numel() > 0;
  TORCH_CHECK(!has_pre || (pre.is_contiguous() && pre.numel() == gz.numel()), "encoder_tail_backward: pre");
  const bool has_skip = gskip.defined() && gskip.numel() > 0;
  TORCH_CHECK(!has_skip || (gskip.is_contiguous() && gskip.numel() == y.numel()), "encoder_tail_backward: gskip");
  const int64_t ci = g.ci, co = g.co, w = g.w, win = 2 * g.rows;
  const int64_t parts = num_parts(g.groups());
  auto gy = at::empty_like(y);
  PartSums acc_w(parts, co * ci), acc_b(parts, co), acc_g(parts, ci), acc_gx(parts, ci);
  const float *pgz = gz.data_ptr<float>(), *py = y.data_ptr<float>(), *pb = b.data_ptr<float>();
  const float *pw = weight.data_ptr<float>(), *pm = mean.data_ptr<float>();
  const float* ppre = has_pre ? pre.data_ptr<float>() : nullptr;
  const float* pa = a.data_ptr<float>();
  const float* pgs = has_skip ? gskip.data_ptr<float>() : nullptr;
  const uint8_t* pi = idx.data_ptr<uint8_t>();
  float* pgy = gy.data_ptr<float>();
  dispatch_channels(ci, co, [&]<int CI, int CO>() {
    by_parts(g.groups(), parts, [&](int64_t part, int64_t g0, int64_t g1) {
      if (g.pool_d)
        backward_groups<CI, CO, 8>(g, g0, g1, pgz, pi, py, pa, pb, ppre, pgs, pw, pm, pgy, acc_w.part(part),
                                   acc_b.part(part), acc_g.part(part), acc_gx.part(part));
      else
        backward_groups<CI, CO, 4>(g, g0, g1, pgz, pi, py, pa, pb, ppre, pgs, pw, pm, pgy, acc_w.part(part),
                                   acc_b.part(part), acc_g.part(part), acc_gx.part(part));
    });
  });
  auto gw = acc_w.sum({co, ci}, y.options());
  auto gb = acc_b.sum({co}, y.options());
  auto sg = acc_g.sum({ci}, y.options());
  auto sgx = acc_gx.sum({ci}, y.options());
  const float *psg = sg.data_ptr<float>(), *psgx = sgx.data_ptr<float>();
  // second pass, in place: gy = a * gs + coef * (y - mean) + shift
  const int64_t m = y.numel() / ci;
  std::vector<float> scale(ci), coef(ci), shift(ci);
  const float* pinv = invstd.data_ptr<float>();
  for (int64_t k = 0; k < ci; ++k) {
    scale[k] = pa[k];
    coef[k] = batch_stats ? -pa[k] * pinv[k] * pinv[k] * psgx[k] / static_cast<float>(m) : 0.f;
    shift[k] = batch_stats ? -pa[k] * psg[k] / static_cast<float>(m) : 0.f;
  }
  for (int64_t k = 0; k < ci; ++k) shift[k] -= coef[k] * pm[k];
  dispatch_channels(ci, co, [&]<int CI, int CO>() {
    if constexpr (CI > 0) {
      second_pass<CI>(pgy, py, m, scale.data(), coef.data(), shift.data());
    } else {
      parallel(0, m, 2048, [&](int64_t v0, int64_t v1) {
        for (int64_t v = v0; v < v1; ++v) {
          float* out = pgy + v * ci;
          const float* yv = py + v * ci;
          for (int64_t k = 0; k < ci; ++k) out[k] = out[k] * scale[k] + coef[k] * yv[k] + shift[k];
        }
      });
    }
  });
  return {gy, gw, gb, sg, sgx};
}

// Two per-channel sums over the M rows of an [M, C] layout: add(i, f1, f2) adds row i's two quantities into the float
// accumulators f1, f2 [C]; float over runs of 64 rows, double beyond and across threads. Returns the two totals.
template <typename Add>
std::pair<std::vector<double>, std::vector<double>> channel_sums(int64_t m, int64_t c, const Add& add) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(m / 256 + 1, at::get_num_threads()));
  const int64_t stride = c + 16;  // a gap of two cache lines: no two threads write to one line (PartSums)
  std::vector<double> s1(parts * stride, 0.0), s2(parts * stride, 0.0);
  by_parts(m, parts, [&](int64_t part, int64_t r0, int64_t r1) {
    std::vector<float> f1(c), f2(c);
    double* d1 = s1.data() + part * stride;
    double* d2 = s2.data() + part * stride;
    for (int64_t r = r0; r < r1; r += 64) {
      const int64_t e = std::min(r1, r + 64);
      std::fill(f1.begin(), f1.end(), 0.f);
      std::fill(f2.begin(), f2.end(), 0.f);
      for (int64_t i = r; i < e; ++i) add(i, f1.data(), f2.data());
      for (int64_t k = 0; k < c; ++k) { d1[k] += f1[k]; d2[k] += f2[k]; }
    }
  });
  std::vector<double> t1(c, 0.0), t2(c, 0.0);
  for (int64_t p = 0; p < parts; ++p)
    for (int64_t k = 0; k < c; ++k) { t1[k] += s1[p * stride + k]; t2[k] += s2[p * stride + k]; }
  return {t1, t2};
}

// Per-channel mean and biased variance of a [M, C] matrix (a channels-last tensor's memory), in one pass: sums of
// x - x[0] and of its square (shifted by the first row, so a large mean does not cancel the variance).
std::vector<at::Tensor> channel_stats(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(0) > 0,
              "channel_stats: expected a contiguous float32 [M, C] matrix");
  const int64_t m = x.size(0), c = x.size(1);
  const float* px = x.data_ptr<float>();
  const std::vector<float> shift(px, px + c);
  const auto sums = channel_sums(m, c, [&](int64_t i, float* f1, float* f2) {
    const float* row = px + i * c;
    for (int64_t k = 0; k < c; ++k) {
      const float v = row[k] - shift[k];
      f1[k] += v;
      f2[k] += v * v;
    }
  });
  auto mean = at::empty({c}, x.options());
  auto var = at::empty({c}, x.options());
  for (int64_t k = 0; k < c; ++k) {
    const double mu = sums.first[k] / m;
    mean.data_ptr<float>()[k] = static_cast<float>(mu + shift[k]);
    var.data_ptr<float>()[k] = static_cast<float>(std::max(0.0, sums.second[k] / m - mu * mu));
  }
  return {mean, var};
}

// ------------------------------------------------------------------------------ 1x1 conv + GELU (decoder tail)

// The backward of a square 1x1 conv over P voxels whose output gradients are gh [P][C]: the input gradients
// gh[p] @ w (w [C, C], row c the weights of output channel c) stored at out(p), and gw += gh^T @ x (x(p) the voxels'
// inputs), P independent FMA chains per vector, the rows of gw passing through memory once per call.
template <int C, int P, class In, class Out>
inline void pointwise_backward(const float (*gh)[C], const float* __restrict__ w, const In& x, const Out& out,
                               float* __restrict__ gw) {
  constexpr int VW = vwidth(C);
  constexpr int NV = C / VW;
  using V = typename Vec<VW>::type;
  V gx[P][NV];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) gx[p][v] = V{};
  for (int c = 0; c < C; ++c) {
    V wc[NV], acc[NV];
    for (int v = 0; v < NV; ++v) { wc[v] = load<VW>(w + c * C + v * VW); acc[v] = load<VW>(gw + c * C + v * VW); }
    for (int p = 0; p < P; ++p) {
      const float ghc = gh[p][c];
      const float* xp = x(p);
      for (int v = 0; v < NV; ++v) {
        gx[p][v] += ghc * wc[v];
        acc[v] += ghc * load<VW>(xp + v * VW);
      }
    }
    for (int v = 0; v < NV; ++v) store<VW>(gw + c * C + v * VW, acc[v]);
  }
  for (int p = 0; p < P; ++p) {
    float* op = out(p);
    for (int v = 0; v < NV; ++v) store<VW>(op + v * VW, gx[p][v]);
  }
}

// A 1x1 conv of HO <= 8 output channels after the decoder tail (the network's output conv), for the P rows of one
// pw_gelu_rows call: w [HO][C], bias [HO]; g, out the rows' head gradients and outputs [P][HO]; gw [HO][C], gb [HO]
// the calling thread's gradient accumulators.
struct HeadRows {
  const float* w;
  const float* bias;
  int64_t ho;
  const float* g;
  float* out;
  float* gw;
  float* gb;
};

// out = gelu(x @ w^T + bias) over rows of [M, C] (C = CI = CO), P rows at a time for independent FMA chains; with
// G (backward), recomputes the pre-activation and returns gx = (g * gelu') @ w, accumulating gw, gb. With HEAD the
// rows go on through the head (hd): the forward writes only its outputs, and the backward starts from its gradients
// (g = hd.g @ hd.w, and the head's own gradients from the recomputed GELU).
template <int C, int P, bool BACKWARD, bool HEAD = false>
inline void pw_gelu_rows(const float* __restrict__ x, const float* __restrict__ wt, const float* __restrict__ w,
                         const float* __restrict__ bias, const float* __restrict__ g, float* __restrict__ out,
                         float* __restrict__ gw, float* __restrict__ gb, const HeadRows& hd = HeadRows{}) {
  constexpr int VW = vwidth(C);
  constexpr int NV = C / VW;
  using V = typename Vec<VW>::type;
  alignas(64) float act[HEAD && BACKWARD ? P : 1][C];  // with HEAD (backward), the GELU's outputs
  alignas(64) float gact[HEAD && BACKWARD ? P : 1][C];  // with HEAD (backward), the gradients reaching them
  if constexpr (HEAD && BACKWARD) {
    for (int p = 0; p < P; ++p) {
      V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = V{};
      for (int64_t j = 0; j < hd.ho; ++j) {
        const float gj = hd.g[p * hd.ho + j];
        for (int v = 0; v < NV; ++v) acc[v] += gj * load<VW>(hd.w + j * C + v * VW);
      }
      for (int v = 0; v < NV; ++v) store<VW>(&gact[p][v * VW], acc[v]);
    }
    for (int64_t j = 0; j < hd.ho; ++j) {
      float sum = 0.f;
      for (int p = 0; p < P; ++p) sum += hd.g[p * hd.ho + j];
      hd.gb[j] += sum;
    }
    g = &gact[0][0];
  }
  V h[P][NV];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) h[p][v] = load<VW>(bias + v * VW);
  for (int k = 0; k < C; ++k) {
    V wk[NV];
    for (int v = 0; v < NV; ++v) wk[v] = load<VW>(wt + k * C + v * VW);
    for (int p = 0; p < P; ++p) {
      const float xk = x[p * C + k];
      for (int v = 0; v < NV; ++v) h[p][v] += xk * wk[v];
    }
  }
  if constexpr (C == 8 && P % 2 == 0 && kVW == 16) {
    // 8 channels on 16-wide registers: the GELU on two rows at a time in one 16-wide vector (its cost is per
    // vector, whatever the width; rows p and p + 1 are adjacent in x, g, out and gh)
    if constexpr (!BACKWARD && HEAD) {
      for (int p = 0; p < P; p += 2) {
        const v16 o = gelu<v16>(join8(h[p][0], h[p + 1][0]), nullptr);
        for (int64_t j = 0; j < hd.ho; ++j) {
          const v8 wj = load<8>(hd.w + j * C);
          const v16 prod = o * join8(wj, wj);
          hd.out[p * hd.ho + j] = hsum(low8(prod)) + hd.bias[j];
          hd.out[(p + 1) * hd.ho + j] = hsum(high8(prod)) + hd.bias[j];
        }
      }
    } else if constexpr (!BACKWARD) {
      for (int p = 0; p < P; p += 2) store<16>(out + p * C, gelu<v16>(join8(h[p][0], h[p + 1][0]), nullptr));
    } else {
      alignas(64) float gh[P][C];
      v8 gbv = load<8>(gb);
      for (int p = 0; p < P; p += 2) {
        v16 d;
        const v16 o = gelu<v16>(join8(h[p][0], h[p + 1][0]), &d);
        if constexpr (HEAD) store<16>(&act[p][0], o);
        const v16 ghv = load<16>(g + p * C) * d;
        store<16>(&gh[p][0], ghv);
        gbv += low8(ghv) + high8(ghv);
      }
      store<8>(gb, gbv);
      pointwise_backward<C, P>(gh, w, [&](int p) { return x + p * C; }, [&](int p) { return out + p * C; }, gw);
    }
  } else if constexpr (!BACKWARD && HEAD) {
    // the head's outputs as dot products of each row's GELU with the head's rows (lane sums of independent chains)
    for (int p = 0; p < P; ++p) {
      V o[NV];
      for (int v = 0; v < NV; ++v) o[v] = gelu<V>(h[p][v], nullptr);
      for (int64_t j = 0; j < hd.ho; ++j) {
        V acc = o[0] * load<VW>(hd.w + j * C);
        for (int v = 1; v < NV; ++v) acc += o[v] * load<VW>(hd.w + j * C + v * VW);
        hd.out[p * hd.ho + j] = hsum(acc) + hd.bias[j];
      }
    }
  } else if constexpr (!BACKWARD) {
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < NV; ++v) store<VW>(out + p * C + v * VW, gelu<V>(h[p][v], nullptr));
  } else {
    alignas(64) float gh[P][C];
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < NV; ++v) {
        V d;
        const V o = gelu<V>(h[p][v], &d);
        if constexpr (HEAD) store<VW>(&act[p][v * VW], o);
        const V ghv = load<VW>(g + p * C + v * VW) * d;
        store<VW>(&gh[p][v * VW], ghv);
        store<VW>(gb + v * VW, load<VW>(gb + v * VW) + ghv);
      }
    pointwise_backward<C, P>(gh, w, [&](int p) { return x + p * C; }, [&](int p) { return out + p * C; }, gw);
  }
  if constexpr (HEAD && BACKWARD) {
    for (int64_t j = 0; j < hd.ho; ++j) {
      V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = load<VW>(hd.gw + j * C + v * VW);
      for (int p = 0; p < P; ++p) {
        const float gj = hd.g[p * hd.ho + j];
        for (int v = 0; v < NV; ++v) acc[v] += gj * load<VW>(&act[p][v * VW]);
      }
      for (int v = 0; v < NV; ++v) store<VW>(hd.gw + j * C + v * VW, acc[v]);
    }
  }
}

// Rows per pw_gelu_rows call (its accumulators: rows x C / vector width vectors): 4 with 32 16-wide registers; with
// 16 8-wide ones (AVX2), fewer for wide rows, whose accumulators would not fit (one core, [M, C] rows, forward /
// backward: 64 channels 9.2 / 22.3 ms with 4 rows, 5.6-6.4 / 20.4-23.8 with 1, 7.3 / 20.9 with 2; 32 channels
// 9.6 / 21.2 with 4, 8.4 / 17.1 with 2)
constexpr int pw_rows(int c, bool backward) {
  if (kVW == 16 || c <= 16) return 4;
  return c >= 64 && !backward ? 1 : 2;
}

// The head's data for pw_gelu_all: head (as HeadRows, g and out for all M rows) and its per-thread accumulators.
struct Head {
  HeadRows rows;
  PartSums* acc_w;
  PartSums* acc_b;
};

// pw_gelu_rows over all M rows, in parallel; with head, through the head (out: its outputs in the forward, gx in the
// backward, as without; g: the head's gradients are in head->rows.g).
template <int C, bool BACKWARD>
void pw_gelu_all(int64_t m, const float* x, const float* wt, const float* w, const float* bias, const float* g,
                 float* out, PartSums* acc_w, PartSums* acc_b, int64_t parts, const Head* head = nullptr) {
  by_parts(m, parts, [&](int64_t part, int64_t r0, int64_t r1) {
    float* gw = BACKWARD ? acc_w->part(part) : nullptr;
    float* gb = BACKWARD ? acc_b->part(part) : nullptr;
    HeadRows hd{};
    if (head != nullptr) {
      hd = head->rows;
      hd.gw = BACKWARD ? head->acc_w->part(part) : nullptr;
      hd.gb = BACKWARD ? head->acc_b->part(part) : nullptr;
    }
    const auto rows = [&]<int P>(int64_t r) {
      const float* gr = BACKWARD && head == nullptr ? g + r * C : nullptr;
      float* o = BACKWARD || head == nullptr ? out + r * C : nullptr;
      if (head == nullptr) return pw_gelu_rows<C, P, BACKWARD>(x + r * C, wt, w, bias, gr, o, gw, gb);
      HeadRows at = hd;
      if (BACKWARD) at.g = hd.g + r * hd.ho; else at.out = hd.out + r * hd.ho;
      pw_gelu_rows<C, P, BACKWARD, true>(x + r * C, wt, w, bias, gr, o, gw, gb, at);
    };
    int64_t r = r0;
    constexpr int PR = pw_rows(C, BACKWARD);
    for (; r + PR <= r1; r += PR) rows.template operator()<PR>(r);
    for (; r < r1; ++r) rows.template operator()<1>(r);
  });
}

// Calls body.template operator()<C>() for the channel counts with compiled kernels (the decoder tail and the axial
// block); false for the others.
template <typename F>
bool dispatch_channel_count(int64_t c, const F& body) {
  if (c == 8) { body.template operator()<8>(); return true; }
  if (c == 16) { body.template operator()<16>(); return true; }
  if (c == 32) { body.template operator()<32>(); return true; }
  if (c == 64) { body.template operator()<64>(); return true; }
  return false;
}

// gelu(x @ weight^T + bias) for x [M, C], weight [C, C] (C in 8, 16, 32, 64); with a head (head_w [HO, C], HO <= 8,
// head_b [HO]; empty tensors: none), that GELU's head_w 1x1 conv [M, HO] instead.
at::Tensor pw_gelu_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& head_w, const at::Tensor& head_b) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && weight.is_contiguous() &&
              weight.size(0) == x.size(1) && weight.size(1) == x.size(1) && bias.is_contiguous(),
              "pw_gelu_forward: expected x [M, C] and a square weight [C, C]");
  const int64_t m = x.size(0), c = x.size(1);
  const bool has_head = head_w.defined() && head_w.numel() > 0;
  at::Tensor out;
  Head head{};
  if (has_head) {
    TORCH_CHECK(head_w.dim() == 2 && head_w.is_contiguous() && head_w.size(1) == c && head_w.size(0) <= 8 &&
                head_b.is_contiguous() && head_b.numel() == head_w.size(0),
                "pw_gelu_forward: the head must be [HO <= 8, C] with a [HO] bias");
    out = at::empty({m, head_w.size(0)}, x.options());
    head.rows = HeadRows{head_w.data_ptr<float>(), head_b.data_ptr<float>(), head_w.size(0), nullptr,
                         out.data_ptr<float>(), nullptr, nullptr};
  } else {
    out = at::empty_like(x);
  }
  auto wt = weight.t().contiguous();
  const bool ok = dispatch_channel_count(c, [&]<int C>() {
    pw_gelu_all<C, false>(m, x.data_ptr<float>(), wt.data_ptr<float>(), weight.data_ptr<float>(),
                          bias.data_ptr<float>(), nullptr, has_head ? nullptr : out.data_ptr<float>(), nullptr,
                          nullptr, num_parts(m / 256 + 1), has_head ? &head : nullptr);
  });
  TORCH_CHECK(ok, "pw_gelu_forward: channels must be 8, 16, 32 or 64");
  return out;
}

// Gradients of pw_gelu_forward (g: of its output, the head's with a head): gx [M, C], gweight [C, C], gbias [C], and
// with a head its gweight [HO, C] and gbias [HO] (else empty tensors).
std::vector<at::Tensor> pw_gelu_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& bias, const at::Tensor& head_w) {
  const bool has_head = head_w.defined() && head_w.numel() > 0;
  const int64_t m = x.size(0), c = x.size(1);
  TORCH_CHECK(g.is_contiguous() && x.is_contiguous() && g.dim() == 2 && g.size(0) == m &&
              g.size(1) == (has_head ? head_w.size(0) : c), "pw_gelu_backward: shapes");
  const int64_t parts = num_parts(m / 256 + 1);
  auto gx = at::empty_like(x);
  auto wt = weight.t().contiguous();
  const int64_t ho = has_head ? head_w.size(0) : 0;
  PartSums acc_w(parts, c * c), acc_b(parts, c), acc_hw(parts, std::max<int64_t>(1, ho * c)),
      acc_hb(parts, std::max<int64_t>(1, ho));
  Head head{};
  if (has_head) {
    TORCH_CHECK(head_w.is_contiguous() && head_w.dim() == 2 && head_w.size(1) == c && ho <= 8,
                "pw_gelu_backward: the head must be [HO <= 8, C]");
    head = Head{HeadRows{head_w.data_ptr<float>(), nullptr, ho, g.data_ptr<float>(), nullptr, nullptr, nullptr},
                &acc_hw, &acc_hb};
  }
  const bool ok = dispatch_channel_count(c, [&]<int C>() {
    pw_gelu_all<C, true>(m, x.data_ptr<float>(), wt.data_ptr<float>(), weight.data_ptr<float>(),
                         bias.data_ptr<float>(), has_head ? nullptr : g.data_ptr<float>(), gx.data_ptr<float>(),
                         &acc_w, &acc_b, parts, has_head ? &head : nullptr);
  });
  TORCH_CHECK(ok, "pw_gelu_backward: channels must be 8, 16, 32 or 64");
  if (!has_head) return {gx, acc_w.sum({c, c}, x.options()), acc_b.sum({c}, x.options()), at::Tensor(), at::Tensor()};
  return {gx, acc_w.sum({c, c}, x.options()), acc_b.sum({c}, x.options()), acc_hw.sum({ho, c}, x.options()),
          acc_hb.sum({ho}, x.options())};
}

// ---------------------------------------------------------------------------------- axial depthwise convolution

// The axial block: out = x + bias + sum over axes a and taps t of w[a][t] * x shifted by (t - K/2) * dilation along
// a, zero outside (U-Lite's identity plus one K-tap depthwise conv per axis). The axes are (D,) H, W of
// [N, D, H, W, C]; w [A, K, C]. Voxel by voxel with the channels in vector registers; the rows that the D and H taps
// read stay in the CPU caches while a row is computed. The block's input comes from a source:
// - PlainSource: a contiguous [N, D, H, W, C] tensor;
// - UpAddSource: skip + nearest_upsample_x2(lo), computed on the fly (the fused decoder's input), with skip
//   [N, D, H, W, C] and lo [N, D / 2, H / 2, W / 2, C] (D and lo's D are 1 in 2D).
template <int C>
struct AxialTaps {
  static constexpr int VW = vwidth(C);
  static constexpr int NV = C / VW;
  using V = typename Vec<VW>::type;
  int64_t d, h, wd, k, dil, half;
  bool three_d;
  std::vector<V> wv;
  V bv[NV];
  AxialTaps(const float* w, const float* bias, int64_t d_, int64_t h_, int64_t wd_, int64_t k_, int64_t dil_,
            bool three_d_)
      : d(d_), h(h_), wd(wd_), k(k_), dil(dil_), half(k_ / 2), three_d(three_d_), wv((three_d_ ? 3 : 2) * k_ * NV) {
    for (int64_t i = 0; i < (three_d ? 3 : 2) * k; ++i)
      for (int v = 0; v < NV; ++v) wv[i * NV + v] = load<VW>(w + i * C + v * VW);
    for (int v = 0; v < NV; ++v) bv[v] = load<VW>(bias + v * VW);
  }
};

// PS: the floats from one voxel to the next, C or (a block of C channels of a wider tensor) that tensor's channels
template <int C, int PS = C>
struct PlainSource {
  static constexpr int VW = AxialTaps<C>::VW;
  static constexpr int STRIDE = PS;
  using V = typename AxialTaps<C>::V;
  using Row = const float*;
  const float* x;
  int64_t d, h, wd;
  Row row(int64_t b, int64_t z, int64_t y) const { return x + ((b * d + z) * h + y) * wd * PS; }
  V at(Row r, int64_t xi, int v) const { return load<VW>(r + xi * PS + v * VW); }
};

template <int C>
struct UpAddSource {
  static constexpr int VW = AxialTaps<C>::VW;
  static constexpr int STRIDE = C;
  using V = typename AxialTaps<C>::V;
  struct Row { const float* s; const float* l; };
  const float* skip;
  const float* lo;
  int64_t d, h, wd, ld, lh, lw;  // lo's sizes
  bool three_d;
  Row row(int64_t b, int64_t z, int64_t y) const {
    const int64_t lz = three_d ? z / 2 : z;
    return {skip + ((b * d + z) * h + y) * wd * C, lo + ((b * ld + lz) * lh + y / 2) * lw * C};
  }
  V at(Row r, int64_t xi, int v) const {
    return load<VW>(r.s + xi * C + v * VW) + load<VW>(r.l + (xi >> 1) * C + v * VW);
  }
};

// One row (b, z, y) of the axial block over `src`, into dst [W, C] (voxels Src::STRIDE floats apart).
template <int C, class Src>
inline void axial_row(const AxialTaps<C>& tp, const Src& src, int64_t b, int64_t z, int64_t y,
                      float* __restrict__ dst) {
  constexpr int VW = AxialTaps<C>::VW, NV = AxialTaps<C>::NV;
  using V = typename AxialTaps<C>::V;
  const int64_t k = tp.k, half = tp.half, dil = tp.dil, wd = tp.wd;
  // taps along D then H: the source row (rows outside the volume are skipped)
  typename Src::Row rows[32];
  const V* taps_w[32];
  int64_t ntap = 0;
  if (tp.three_d) {
    for (int64_t t = 0; t < k; ++t) {
      const int64_t zz = z + (t - half) * dil;
      if (zz < 0 || zz >= tp.d) continue;
      rows[ntap] = src.row(b, zz, y);
      taps_w[ntap++] = &tp.wv[(0 * k + t) * NV];
    }
  }
  const int64_t ah = tp.three_d ? 1 : 0;
  for (int64_t t = 0; t < k; ++t) {
    const int64_t yy = y + (t - half) * dil;
    if (yy < 0 || yy >= tp.h) continue;
    rows[ntap] = src.row(b, z, yy);
    taps_w[ntap++] = &tp.wv[(ah * k + t) * NV];
  }
  const V* ww = &tp.wv[(ah + 1) * k * NV];
  const typename Src::Row xr = src.row(b, z, y);
  const int64_t reach = half * dil;
  // PV neighbouring voxels at a time: each voxel's sum is one chain of dependent FMAs, so several voxels keep the
  // FMA units busy; INTERIOR: every W tap is inside the row
  auto voxels = [&]<int PV, bool INTERIOR>(int64_t x0) {
    V acc[PV][NV];
    for (int p = 0; p < PV; ++p)
      for (int v = 0; v < NV; ++v) acc[p][v] = src.at(xr, x0 + p, v) + tp.bv[v];
    for (int64_t j = 0; j < ntap; ++j)
      for (int v = 0; v < NV; ++v) {
        const V wj = taps_w[j][v];
        for (int p = 0; p < PV; ++p) acc[p][v] += wj * src.at(rows[j], x0 + p, v);
      }
    for (int64_t t = 0; t < k; ++t) {
      const int64_t s = (t - half) * dil;
      for (int v = 0; v < NV; ++v) {
        const V wt = ww[t * NV + v];
        for (int p = 0; p < PV; ++p) {
          if constexpr (!INTERIOR) {
            if (x0 + p + s < 0 || x0 + p + s >= wd) continue;
          }
          acc[p][v] += wt * src.at(xr, x0 + p + s, v);
        }
      }
    }
    for (int p = 0; p < PV; ++p)
      for (int v = 0; v < NV; ++v) store<VW>(dst + (x0 + p) * Src::STRIDE + v * VW, acc[p][v]);
  };
  constexpr int PV = NV >= 4 ? 1 : 4 / NV;
  const int64_t lo = std::min(reach, wd), hi = std::max(lo, wd - reach);
  int64_t xi = 0;
  for (; xi < lo; ++xi) voxels.template operator()<1, false>(xi);
  for (; xi + PV <= hi; xi += PV) voxels.template operator()<PV, true>(xi);
  for (; xi < wd; ++xi) voxels.template operator()<1, false>(xi);
}

// Runs work(b, z, y) over every row (b, z, y) of [N, D, H] in parallel: in tiles of t rows along H, each swept
// through all of D, so that the rows a D tap reads (the same H rows of the neighbouring planes) are still in the
// CPU caches (a plain row order streams each row from memory once per D tap). make() gives each parallel chunk its
// own worker (with its own buffers).
template <typename Make>
void by_tiles(int64_t n, int64_t d, int64_t h, int64_t t, const Make& make) {
  const int64_t tiles = (h + t - 1) / t;
  parallel(0, n * tiles, 1, [&](int64_t u0, int64_t u1) {
    auto work = make();
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / tiles, y0 = (u % tiles) * t, y1 = std::min(h, y0 + t);
      for (int64_t z = 0; z < d; ++z)
        for (int64_t y = y0; y < y1; ++y) work(b, z, y);
    }
  });
}

// Tile height for by_tiles: at most max_t rows, fewer while there would be under 4 tiles per thread.
int64_t tile_rows(int64_t n, int64_t h, int64_t max_t) {
  int64_t t = max_t;
  while (t > 1 && n * ((h + t - 1) / t) < 4 * at::get_num_threads()) t /= 2;
  return t;
}


// sum over i < count of a[i * PS .. ] * b[i * PS .. ] per channel (C of them), four partial sums for independent FMA
// chains
template <int C, int PS = C>
inline void dot_rows(const float* __restrict__ a, const float* __restrict__ b, int64_t count, float* __restrict__ acc) {
  if constexpr (C == 8 && PS == 8 && kVW == 16) {
    // 8 channels on 16-wide registers: two voxels per 16-wide vector (half the loads and FMAs of 8-wide ones), folded at the end
    v16 s[4] = {};
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
      for (int u = 0; u < 4; ++u) s[u] += load<16>(a + (i + 2 * u) * 8) * load<16>(b + (i + 2 * u) * 8);
    v8 rest{};
    for (; i < count; ++i) rest += load<8>(a + i * 8) * load<8>(b + i * 8);
    const v16 t = (s[0] + s[1]) + (s[2] + s[3]);
    store<8>(acc, load<8>(acc) + ((low8(t) + high8(t)) + rest));
    return;
  }
  constexpr int VW = vwidth(C);
  constexpr int NV = C / VW;
  using V = typename Vec<VW>::type;
  V s[4][NV];
  for (int u = 0; u < 4; ++u)
    for (int v = 0; v < NV; ++v) s[u][v] = V{};
  int64_t i = 0;
  for (; i + 4 <= count; i += 4)
    for (int u = 0; u < 4; ++u)
      for (int v = 0; v < NV; ++v)
        s[u][v] += load<VW>(a + (i + u) * PS + v * VW) * load<VW>(b + (i + u) * PS + v * VW);
  for (; i < count; ++i)
    for (int v = 0; v < NV; ++v) s[0][v] += load<VW>(a + i * PS + v * VW) * load<VW>(b + i * PS + v * VW);
  for (int v = 0; v < NV; ++v) store<VW>(acc + v * VW, load<VW>(acc + v * VW) + ((s[0][v] + s[1][v]) + (s[2][v] + s[3][v])));
}

// weight gradients: gw[a][t] += sum over voxels of g * x shifted as in the forward; gb += sum of g. g and x hold PS
// channels per voxel (gw [A, K, PS], gb [PS]); each row's PS channels go as PS / C blocks of C.
template <int C, int PS = C>
void axial_weight_grad_rows(const float* __restrict__ g, const float* __restrict__ x, float* __restrict__ gw,
                            float* __restrict__ gb, int64_t d, int64_t h, int64_t wd, int64_t k, int64_t dil,
                            bool three_d, int64_t r0, int64_t r1, const float* ones) {
  const int64_t half = k / 2, row_len = wd * PS;
  const int64_t ah = three_d ? 1 : 0;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t hy = row % h, dz = (row / h) % d, b = row / (h * d);
    for (int64_t c0 = 0; c0 < PS; c0 += C) {
      const float* gr = g + row * row_len + c0;
      const float* xc = x + c0;
      const float* xr = xc + row * row_len;
      float* gwc = gw + c0;
      dot_rows<C, PS>(gr, ones, wd, gb + c0);
      if (three_d)
        for (int64_t t = 0; t < k; ++t) {
          const int64_t z = dz + (t - half) * dil;
          if (z >= 0 && z < d) dot_rows<C, PS>(gr, xc + ((b * d + z) * h + hy) * row_len, wd, gwc + (0 * k + t) * PS);
        }
      for (int64_t t = 0; t < k; ++t) {
        const int64_t y = hy + (t - half) * dil;
        if (y >= 0 && y < h) dot_rows<C, PS>(gr, xc + ((b * d + dz) * h + y) * row_len, wd, gwc + (ah * k + t) * PS);
      }
      for (int64_t t = 0; t < k; ++t) {
        const int64_t s = (t - half) * dil;  // out[xi] reads x[xi + s]
        const int64_t lo = std::max<int64_t>(0, -s), hi = std::min<int64_t>(wd, wd - s);
        if (hi > lo) dot_rows<C, PS>(gr + lo * PS, xr + (lo + s) * PS, hi - lo, gwc + ((ah + 1) * k + t) * PS);
      }
    }
  }
}

// Calls body.template operator()<C, PS>() for the axial block's channel counts: C = PS for the compiled counts
// (dispatch_channel_count), blocks of C = 64 for 128, 256 and 512 channels; false for the others.
template <typename F>
bool dispatch_axial_channels(int64_t c, const F& body) {
  if (c == 128) { body.template operator()<64, 128>(); return true; }
  if (c == 256) { body.template operator()<64, 256>(); return true; }
  if (c == 512) { body.template operator()<64, 512>(); return true; }
  return dispatch_channel_count(c, [&]<int C>() { body.template operator()<C, C>(); });
}


// x [N, D, H, W, C]; w [A, K, C] (A = 3: D, H, W taps; A = 2: H, W); bias [C]. Also the input gradient, called
// with the gradient as x, the taps reversed and a zero bias.
at::Tensor axial_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t dil) {
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous() && x.scalar_type() == at::kFloat && w.dim() == 3 &&
              w.is_contiguous() && w.size(2) == x.size(4) && bias.is_contiguous() && bias.numel() == x.size(4),
              "axial_forward: expected x [N, D, H, W, C], w [A, K, C], bias [C]");
  const bool three_d = w.size(0) == 3;
  const int64_t n = x.size(0), d = x.size(1), h = x.size(2), wd = x.size(3), k = w.size(1);
  TORCH_CHECK(k % 2 == 1 && 2 * k <= 32, "axial_forward: odd kernel of at most 15 taps");
  auto out = at::empty_like(x);
  const bool ok = dispatch_axial_channels(x.size(4), [&]<int C, int PS>() {
    // PS / C blocks of C channels, each with its taps
    std::vector<AxialTaps<C>> tp;
    std::vector<PlainSource<C, PS>> src;
    const auto wb = w.view({w.size(0), k, PS / C, C}).transpose(1, 2).contiguous();  // [A, blocks, K, C]
    for (int64_t c0 = 0; c0 < PS; c0 += C) {
      const auto wc = wb.select(1, c0 / C).contiguous();
      tp.emplace_back(wc.data_ptr<float>(), bias.data_ptr<float>() + c0, d, h, wd, k, dil, three_d);
      src.push_back({x.data_ptr<float>() + c0, d, h, wd});
    }
    float* po = out.data_ptr<float>();
    by_tiles(n, d, h, tile_rows(n, h, 8), [&]() {
      return [&](int64_t b, int64_t z, int64_t y) {
        for (int64_t j = 0; j < PS / C; ++j)
          axial_row<C>(tp[j], src[j], b, z, y, po + ((b * d + z) * h + y) * wd * PS + j * C);
      };
    });
  });
  TORCH_CHECK(ok, "axial_forward: channels must be 8, 16, 32, 64, 128, 256 or 512");
  return out;
}

// Gradients of the axial weights [A, K, C] and of the (summed) bias [C], from the output gradient g and input x.
std::vector<at::Tensor> axial_weight_grad(const at::Tensor& g, const at::Tensor& x, int64_t a_count, int64_t k,
                                          int64_t dil) {
  TORCH_CHECK(g.is_contiguous() && x.is_contiguous() && g.sizes() == x.sizes() && x.dim() == 5,
              "axial_weight_grad: shapes");
  const int64_t d = x.size(1), h = x.size(2), wd = x.size(3), c = x.size(4);
  const int64_t rows = x.size(0) * d * h;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
  PartSums acc_w(parts, a_count * k * c), acc_b(parts, c);
  std::vector<float> ones(wd * c, 1.f);
  const bool ok = dispatch_axial_channels(c, [&]<int C, int PS>() {
    by_parts(rows, parts, [&](int64_t part, int64_t r0, int64_t r1) {
      axial_weight_grad_rows<C, PS>(g.data_ptr<float>(), x.data_ptr<float>(), acc_w.part(part), acc_b.part(part), d,
                                    h, wd, k, dil, a_count == 3, r0, r1, ones.data());
    });
  });
  TORCH_CHECK(ok, "axial_weight_grad: channels must be 8, 16, 32, 64, 128, 256 or 512");
  return {acc_w.sum({a_count, k, c}, x.options()), acc_b.sum({c}, x.options())};
}

// ------------------------------------------------------------------------- inference: fused encoder and decoder

// Activations of the fused inference stages: 0 none, 1 exact GELU, 2 ReLU.
template <typename V>
inline V activate(V x, int act) {
  if (act == 1) return gelu<V>(x, nullptr);
  if constexpr (kSplit<V>) {
    using S = Halves<V>;
    if (act == 2) return S::join(activate(S::lo(x), act), activate(S::hi(x), act));
  }
  if (act == 2) return x > V{} ? x : V{};
  return x;
}

// An inference encoder stage, one pooling group (b, dz, hy) per call (by_tiles): the axial block (batch norm folded
// into its taps) of the 2 (2D) or 4 (3D) rows one pooling window covers into a per-worker buffer, then per voxel the
// 1x1 conv y = a @ wt + bias with wt [C, 3C]: columns [0, 2C) are the stage's output, max-pooled over each 2x2(x2)
// window and activated, columns [2C, 3C) the next decoder's projection of this skip, stored at full resolution.
// Only the pooled output and the projected skip reach memory.
template <int C>
struct EncoderStage {
  const AxialTaps<C>& tp;
  const PlainSource<C>& src;
  const float* wt;
  const float* pbias;
  int act;
  float* skip;
  float* pooled;
  std::vector<float> abuf, ybuf;  // per worker: the axial block's rows [R, W, C], the 1x1 conv's pooled part [R, W, 2C]

  void operator()(int64_t b, int64_t dz, int64_t hy);
};

template <int C>
void EncoderStage<C>::operator()(int64_t b, int64_t dz, int64_t hy) {
  constexpr int VW = AxialTaps<C>::VW;
  using V = typename AxialTaps<C>::V;
  constexpr int CO = 3 * C, NO = CO / VW, NP = 2 * C / VW;  // vectors: all outputs, pooled outputs
  // output vectors per pass over the inputs (all of them with 32 16-wide registers; with 16 8-wide ones (AVX2),
  // blocks of 6: the 64-channel stage's 24 output vectors spilled its accumulators, at half the FLOP rate of the
  // 32-channel one) and voxels at a time (independent FMA chains), the accumulators kept in registers
  constexpr int NC = kVW == 16 || NO % 6 != 0 ? NO : 6;
  constexpr int P = kVW == 16 ? (NO >= 12 ? 1 : (NO >= 6 ? 2 : 4)) : fit_rows(4, NC);
  const int64_t d = tp.d, h = tp.h, wd = tp.wd;
  const bool pool_d = tp.three_d;
  const int64_t d2 = pool_d ? d / 2 : d, h2 = h / 2, w2 = wd / 2, rows = pool_d ? 4 : 2;
  V bias[NO];
  for (int v = 0; v < NO; ++v) bias[v] = load<VW>(pbias + v * VW);
  const int64_t grp = (b * d2 + dz) * h2 + hy;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t z = pool_d ? 2 * dz + r / 2 : dz, y = 2 * hy + r % 2;
    float* a = abuf.data() + r * wd * C;
    axial_row<C>(tp, src, b, z, y, a);
    float* yr = ybuf.data() + r * wd * 2 * C;
    float* sr = skip + ((b * d + z) * h + y) * wd * C;
    // PP voxels at a time (compile-time counts, so the accumulators stay in registers)
    auto block = [&]<int PP>(int64_t x0) {
      for (int v0 = 0; v0 < NO; v0 += NC) {
        V acc[PP][NC];
        for (int p = 0; p < PP; ++p)
          for (int v = 0; v < NC; ++v) acc[p][v] = bias[v0 + v];
        for (int c = 0; c < C; ++c) {
          const float* wc = wt + c * CO + v0 * VW;
          for (int v = 0; v < NC; ++v) {
            const V wv = load<VW>(wc + v * VW);
            for (int p = 0; p < PP; ++p) acc[p][v] += a[(x0 + p) * C + c] * wv;
          }
        }
        for (int p = 0; p < PP; ++p)
          for (int v = 0; v < NC; ++v) {
            const int o = v0 + v;
            if (o < NP) store<VW>(yr + (x0 + p) * 2 * C + o * VW, acc[p][v]);
            else store<VW>(sr + (x0 + p) * C + (o - NP) * VW, acc[p][v]);
          }
      }
    };
    int64_t x0 = 0;
    for (; x0 + P <= wd; x0 += P) block.template operator()<P>(x0);
    for (; x0 < wd; ++x0) block.template operator()<1>(x0);
  }
  float* out = pooled + grp * w2 * 2 * C;
  for (int64_t x2 = 0; x2 < w2; ++x2) {
    for (int v = 0; v < NP; ++v) {
      V best = load<VW>(ybuf.data() + (2 * x2) * 2 * C + v * VW);
      for (int64_t j = 1; j < 2 * rows; ++j) {
        V unused{};
        pool_step<V>(load<VW>(ybuf.data() + ((j / 2) * wd + 2 * x2 + j % 2) * 2 * C + v * VW), best, unused, V{});
      }
      store<VW>(out + x2 * 2 * C + v * VW, activate<V>(best, act));
    }
  }
}

// Inference encoder stage: x [N, D, H, W, C] (C in 8, 16, 32, 64), taps [A, K, C] and tap_bias [C] of the axial
// block with batch norm folded in, wt [C, 3C] and bias [3C] of the stacked 1x1 convs. Returns
// (act(maxpool2(y[..., :2C])) [N, D2, H/2, W/2, 2C], y[..., 2C:] [N, D, H, W, C]); D2 = D / 2 in 3D (A = 3), D in 2D.
std::vector<at::Tensor> infer_encoder(const at::Tensor& x, const at::Tensor& taps, const at::Tensor& tap_bias,
                                      int64_t dil, const at::Tensor& wt, const at::Tensor& bias, int64_t act) {
  TORCH_CHECK(x.dim() == 5 && x.is_contiguous() && x.scalar_type() == at::kFloat && taps.dim() == 3 &&
              taps.is_contiguous() && taps.size(2) == x.size(4) && tap_bias.is_contiguous() &&
              tap_bias.numel() == x.size(4) && wt.is_contiguous() && wt.size(0) == x.size(4) &&
              wt.size(1) == 3 * x.size(4) && bias.is_contiguous() && bias.numel() == wt.size(1),
              "infer_encoder: expected x [N, D, H, W, C], taps [A, K, C], tap_bias [C], wt [C, 3C], bias [3C]");
  const bool three_d = taps.size(0) == 3;
  const int64_t n = x.size(0), d = x.size(1), h = x.size(2), wd = x.size(3), c = x.size(4), k = taps.size(1);
  TORCH_CHECK(k % 2 == 1 && 2 * k <= 32, "infer_encoder: odd kernel of at most 15 taps");
  TORCH_CHECK(h % 2 == 0 && wd % 2 == 0 && (!three_d || d % 2 == 0), "infer_encoder: odd spatial size");
  const int64_t d2 = three_d ? d / 2 : d;
  auto pooled = at::empty({n, d2, h / 2, wd / 2, 2 * c}, x.options());
  auto skip = at::empty({n, d, h, wd, c}, x.options());
  const bool ok = dispatch_channel_count(c, [&]<int C>() {
    const AxialTaps<C> tp(taps.data_ptr<float>(), tap_bias.data_ptr<float>(), d, h, wd, k, dil, three_d);
    const PlainSource<C> src{x.data_ptr<float>(), d, h, wd};
    // pooling groups (b, dz, hy) in tiles along H swept through D (by_tiles)
    by_tiles(n, d2, h / 2, tile_rows(n, h / 2, 4), [&]() {
      const int64_t rows = three_d ? 4 : 2;
      return EncoderStage<C>{tp, src, wt.data_ptr<float>(), bias.data_ptr<float>(), static_cast<int>(act),
                             skip.data_ptr<float>(), pooled.data_ptr<float>(), std::vector<float>(rows * wd * C),
                             std::vector<float>(rows * wd * 2 * C)};
    });
  });
  TORCH_CHECK(ok, "infer_encoder: channels must be 8, 16, 32 or 64");
  return {pooled, skip};
}

// Calls body.template operator()<HV>() for HV = hv in 1..4 (vectors of 8 head outputs).
template <typename F>
void dispatch_head(int64_t hv, const F& body) {
  if (hv == 1) return body.template operator()<1>();
  if (hv == 2) return body.template operator()<2>();
  if (hv == 3) return body.template operator()<3>();
  return body.template operator()<4>();
}

// An inference decoder stage, one row (b, z, y) per call (by_tiles): the axial block over skip + up(lo) into a row
// buffer, then per voxel gelu(a @ w2t + b2), and, with a head (the network's output 1x1 conv, hwt [C, HP] zero-padded
// to HP = 8 * hv columns), out = that @ hwt + hb with only the first `hout` channels stored.
template <int C>
struct DecoderStage {
  const AxialTaps<C>& tp;
  const UpAddSource<C>& src;
  const float* w2t;
  const float* b2;
  const float* hwt;
  const float* hb;
  int64_t hout, hv;
  float* out;
  std::vector<float> abuf, gbuf;  // per worker: the axial block's row [W, C], the GELU's row (with a head)

  void operator()(int64_t b, int64_t z, int64_t y);
};

template <int C>
void DecoderStage<C>::operator()(int64_t b, int64_t z, int64_t y) {
  const int64_t d = tp.d, h = tp.h, wd = tp.wd;
  const int64_t row = (b * d + z) * h + y;
  axial_row<C>(tp, src, b, z, y, abuf.data());
  float* g = hwt != nullptr ? gbuf.data() : out + row * wd * C;
  constexpr int PG = fit_rows(C <= 16 ? 8 : 4, C / vwidth(C));  // voxels at a time, as in the head below
  int64_t xi = 0;
  for (; xi + PG <= wd; xi += PG)
    pw_gelu_rows<C, PG, false>(abuf.data() + xi * C, w2t, w2t, b2, nullptr, g + xi * C, nullptr, nullptr);
  for (; xi < wd; ++xi)
    pw_gelu_rows<C, 1, false>(abuf.data() + xi * C, w2t, w2t, b2, nullptr, g + xi * C, nullptr, nullptr);
  if (hwt == nullptr) return;
  float* orow = out + row * wd * hout;
  dispatch_head(hv, [&]<int HV>() {
    // PH voxels at a time: independent FMA chains (one voxel's C-long chain alone waits on each FMA's latency)
    auto block = [&]<int PH>(int64_t x0) {
      v8 acc[PH][HV];
      for (int p = 0; p < PH; ++p)
        for (int v = 0; v < HV; ++v) acc[p][v] = load<8>(hb + v * 8);
      for (int c = 0; c < C; ++c)
        for (int v = 0; v < HV; ++v) {
          const v8 wv = load<8>(hwt + (c * HV + v) * 8);
          for (int p = 0; p < PH; ++p) acc[p][v] += g[(x0 + p) * C + c] * wv;
        }
      for (int p = 0; p < PH; ++p) {
        alignas(64) float tmp[HV * 8];
        for (int v = 0; v < HV; ++v) store<8>(tmp + v * 8, acc[p][v]);
        for (int64_t o = 0; o < hout; ++o) orow[(x0 + p) * hout + o] = tmp[o];  // a few floats: no memcpy call
      }
    };
    constexpr int PH = fit_rows(HV <= 2 ? 8 : 4, HV);
    int64_t x0 = 0;
    for (; x0 + PH <= wd; x0 += PH) block.template operator()<PH>(x0);
    for (; x0 < wd; ++x0) block.template operator()<1>(x0);
  });
}

// Inference decoder stage: skip [N, D, H, W, C] (C in 8, 16, 32, 64; already projected by the encoder), lo
// [N, D', H / 2, W / 2, C] (the projected coarse input; D' = D / 2 in 3D, 1 in 2D), taps [A, K, C] and tap_bias [C] of
// the axial block, w2t [C, C] (transposed) and b2 [C] of the 1x1 conv before the GELU; optionally the head
// hwt [C, HP] (HP a multiple of 8, at most 32), hb [HP] and its true output count hout. Returns
// gelu(pw2(axial(skip + up(lo)))) [N, D, H, W, C], or the head's output [N, D, H, W, hout].
at::Tensor infer_decoder(const at::Tensor& skip, const at::Tensor& lo, const at::Tensor& taps,
                         const at::Tensor& tap_bias, int64_t dil, const at::Tensor& w2t, const at::Tensor& b2,
                         const c10::optional<at::Tensor>& hwt, const c10::optional<at::Tensor>& hb, int64_t hout) {
  TORCH_CHECK(skip.dim() == 5 && skip.is_contiguous() && skip.scalar_type() == at::kFloat && lo.dim() == 5 &&
              lo.is_contiguous() && lo.scalar_type() == at::kFloat && lo.size(4) == skip.size(4) &&
              taps.dim() == 3 && taps.is_contiguous() && taps.size(2) == skip.size(4) && tap_bias.is_contiguous() &&
              tap_bias.numel() == skip.size(4) && w2t.is_contiguous() && w2t.size(0) == skip.size(4) &&
              w2t.size(1) == skip.size(4) && b2.is_contiguous() && b2.numel() == skip.size(4),
              "infer_decoder: expected skip [N, D, H, W, C], lo [N, D', H/2, W/2, C], taps [A, K, C], tap_bias [C], "
              "w2t [C, C], b2 [C]");
  const bool three_d = taps.size(0) == 3;
  const int64_t n = skip.size(0), d = skip.size(1), h = skip.size(2), wd = skip.size(3), c = skip.size(4);
  const int64_t k = taps.size(1);
  TORCH_CHECK(k % 2 == 1 && 2 * k <= 32, "infer_decoder: odd kernel of at most 15 taps");
  TORCH_CHECK(lo.size(0) == n && lo.size(1) == (three_d ? d / 2 : 1) && lo.size(2) == h / 2 && lo.size(3) == wd / 2 &&
              h % 2 == 0 && wd % 2 == 0 && (!three_d || d % 2 == 0), "infer_decoder: lo must be skip's size halved");
  const bool head = hwt.has_value();
  int64_t hv = 0;
  if (head) {
    TORCH_CHECK(hb.has_value() && hwt->is_contiguous() && hwt->size(0) == c && hwt->size(1) % 8 == 0 &&
                hwt->size(1) <= 32 && hout >= 1 && hout <= hwt->size(1) && hb->is_contiguous() &&
                hb->numel() == hwt->size(1), "infer_decoder: head weights [C, HP], HP a multiple of 8 up to 32");
    hv = hwt->size(1) / 8;
  }
  auto out = at::empty({n, d, h, wd, head ? hout : c}, skip.options());
  const bool ok = dispatch_channel_count(c, [&]<int C>() {
    const AxialTaps<C> tp(taps.data_ptr<float>(), tap_bias.data_ptr<float>(), d, h, wd, k, dil, three_d);
    const UpAddSource<C> src{skip.data_ptr<float>(), lo.data_ptr<float>(), d, h, wd, lo.size(1), h / 2, wd / 2,
                             three_d};
    by_tiles(n, d, h, tile_rows(n, h, 8), [&]() {
      return DecoderStage<C>{tp, src, w2t.data_ptr<float>(), b2.data_ptr<float>(),
                             head ? hwt->data_ptr<float>() : nullptr, head ? hb->data_ptr<float>() : nullptr, hout,
                             hv, out.data_ptr<float>(), std::vector<float>(wd * c),
                             std::vector<float>(head ? wd * c : 0)};
    });
  });
  TORCH_CHECK(ok, "infer_decoder: channels must be 8, 16, 32 or 64");
  return out;
}


// ------------------------------------------------------------------------------- decoder entry (training)

// A decoder's input up to its batch norm: y = skip @ w^T + nearest_upsample_x2(lo), with skip [N, D, H, W, C], lo
// [N, D', H / 2, W / 2, C] (the coarse input through its half of the decoder's 1x1 conv, bias included; D' = D / 2
// in 3D, 1 in 2D) and w [C, C] the skip's half of that conv. The forward writes y and takes y's per-channel
// statistics in the same pass; the backward turns the batch norm's output gradient into y's on the fly and
// multiplies it out into the gradients of skip, lo and w in one pass (a second, read-only pass takes the sums the
// batch norm's backward needs).

struct EntryGeometry {
  int64_t n, d, h, wd, ld;  // skip's sizes and lo's depth
  bool three_d;
  // lo's row under skip's row (b, z, y)
  int64_t lo_row(int64_t b, int64_t z, int64_t y) const {
    return ((b * ld + (three_d ? z / 2 : 0)) * (h / 2) + y / 2) * (wd / 2);
  }
};

// P voxels of one row from voxel x0: y = lo (up-sampled) + skip @ wt, stored, and y - shift added into the
// statistics' float accumulators.
template <int C, int P>
inline void entry_forward_block(const float* __restrict__ s, const float* __restrict__ lrow, int64_t x0,
                                const float* __restrict__ wt, float* __restrict__ y,
                                typename Vec<vwidth(C)>::type* f1, typename Vec<vwidth(C)>::type* f2,
                                const typename Vec<vwidth(C)>::type* shift) {
  constexpr int VW = vwidth(C);
  constexpr int NV = C / VW;
  using V = typename Vec<VW>::type;
  V h[P][NV];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) h[p][v] = load<VW>(lrow + ((x0 + p) >> 1) * C + v * VW);
  for (int k = 0; k < C; ++k) {
    V wk[NV];
    for (int v = 0; v < NV; ++v) wk[v] = load<VW>(wt + k * C + v * VW);
    for (int p = 0; p < P; ++p) {
      const float sk = s[p * C + k];
      for (int v = 0; v < NV; ++v) h[p][v] += sk * wk[v];
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) {
      store<VW>(y + p * C + v * VW, h[p][v]);
      const V dv = h[p][v] - shift[v];
      f1[v] += dv;
      f2[v] += dv * dv;
    }
}

// y [N, D, H, W, C], and with stats its per-channel mean and biased variance (sums of y - y[0] and of its square,
// float over runs of 64 voxels, double beyond). skip, lo as above; wt [C, C] = w^T (C in 8, 16, 32, 64).
std::vector<at::Tensor> decoder_entry_forward(const at::Tensor& skip, const at::Tensor& lo, const at::Tensor& wt,
                                              bool stats) {
  TORCH_CHECK(skip.dim() == 5 && skip.is_contiguous() && skip.scalar_type() == at::kFloat && lo.dim() == 5 &&
              lo.is_contiguous() && lo.scalar_type() == at::kFloat && lo.size(4) == skip.size(4) &&
              wt.is_contiguous() && wt.size(0) == skip.size(4) && wt.size(1) == skip.size(4),
              "decoder_entry_forward: expected skip [N, D, H, W, C], lo [N, D', H/2, W/2, C], wt [C, C]");
  const int64_t n = skip.size(0), d = skip.size(1), h = skip.size(2), wd = skip.size(3), c = skip.size(4);
  TORCH_CHECK(lo.size(0) == n && (d == 1 ? lo.size(1) == 1 : 2 * lo.size(1) == d) && 2 * lo.size(2) == h &&
              2 * lo.size(3) == wd, "decoder_entry_forward: lo must be skip's size halved (its depth 1 in 2D)");
  const EntryGeometry eg{n, d, h, wd, lo.size(1), d > 1};
  auto y = at::empty_like(skip);
  const int64_t rows = n * d * h;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
  const int64_t stride = c + 16;  // a gap of two cache lines between the threads' sums (PartSums)
  std::vector<double> s1(parts * stride, 0.0), s2(parts * stride, 0.0);
  std::vector<float> shift(c, 0.f);
  const float *ps = skip.data_ptr<float>(), *pl = lo.data_ptr<float>(), *pwt = wt.data_ptr<float>();
  float* py = y.data_ptr<float>();
  if (stats) {  // the first voxel's y, the shift of the sums
    for (int64_t o = 0; o < c; ++o) {
      float v = pl[o];
      for (int64_t k = 0; k < c; ++k) v += ps[k] * pwt[k * c + o];
      shift[o] = v;
    }
  }
  const bool ok = dispatch_channel_count(c, [&]<int C>() {
    constexpr int VW = vwidth(C);
    constexpr int NV = C / VW;
    using V = typename Vec<VW>::type;
    by_parts(rows, parts, [&](int64_t part, int64_t r0, int64_t r1) {
      V sh[NV];
      for (int v = 0; v < NV; ++v) sh[v] = load<VW>(shift.data() + v * VW);
      double* d1 = s1.data() + part * stride;
      double* d2 = s2.data() + part * stride;
      alignas(64) float t1[C], t2[C];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (d * h), z = (r / h) % d, yy = r % h;
        const float* srow = ps + r * wd * C;
        const float* lrow = pl + eg.lo_row(b, z, yy) * C;
        float* yrow = py + r * wd * C;
        for (int64_t x0 = 0; x0 < wd; x0 += 64) {
          const int64_t x1 = std::min(wd, x0 + 64);
          V f1[NV], f2[NV];
          for (int v = 0; v < NV; ++v) { f1[v] = V{}; f2[v] = V{}; }
          int64_t x = x0;
          for (; x + 4 <= x1; x += 4)
            entry_forward_block<C, 4>(srow + x * C, lrow, x, pwt, yrow + x * C, f1, f2, sh);
          for (; x < x1; ++x) entry_forward_block<C, 1>(srow + x * C, lrow, x, pwt, yrow + x * C, f1, f2, sh);
          if (stats) {
            for (int v = 0; v < NV; ++v) { store<VW>(t1 + v * VW, f1[v]); store<VW>(t2 + v * VW, f2[v]); }
            for (int k = 0; k < C; ++k) { d1[k] += t1[k]; d2[k] += t2[k]; }
          }
        }
      }
    });
  });
  TORCH_CHECK(ok, "decoder_entry_forward: channels must be 8, 16, 32 or 64");
  auto mean = at::empty({c}, skip.options());
  auto var = at::empty({c}, skip.options());
  const int64_t m = rows * wd;
  for (int64_t k = 0; k < c; ++k) {
    double a = 0.0, b = 0.0;
    for (int64_t p = 0; p < parts; ++p) { a += s1[p * stride + k]; b += s2[p * stride + k]; }
    const double mu = a / m;
    mean.data_ptr<float>()[k] = static_cast<float>(mu + shift[k]);
    var.data_ptr<float>()[k] = static_cast<float>(std::max(0.0, b / m - mu * mu));
  }
  return {y, mean, var};
}

// Per-channel sum(g) and sum(g * (y - mean)) of two [M, C] matrices, in one read of each (channel_sums): what a
// batch norm's backward needs of its output gradient g and input y.
std::vector<at::Tensor> channel_grad_sums(const at::Tensor& g, const at::Tensor& y, const at::Tensor& mean) {
  TORCH_CHECK(g.dim() == 2 && g.is_contiguous() && y.is_contiguous() && g.sizes() == y.sizes() &&
              g.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat && mean.is_contiguous() &&
              mean.numel() == g.size(1), "channel_grad_sums: expected g, y [M, C] and mean [C]");
  const int64_t m = g.size(0), c = g.size(1);
  const float *pg = g.data_ptr<float>(), *py = y.data_ptr<float>(), *pm = mean.data_ptr<float>();
  const auto sums = channel_sums(m, c, [&](int64_t i, float* f1, float* f2) {
    const float* gr = pg + i * c;
    const float* yr = py + i * c;
    for (int64_t k = 0; k < c; ++k) {
      f1[k] += gr[k];
      f2[k] += gr[k] * (yr[k] - pm[k]);
    }
  });
  auto sg = at::empty({c}, g.options());
  auto sgx = at::empty({c}, g.options());
  for (int64_t k = 0; k < c; ++k) {
    sg.data_ptr<float>()[k] = static_cast<float>(sums.first[k]);
    sgx.data_ptr<float>()[k] = static_cast<float>(sums.second[k]);
  }
  return {sg, sgx};
}

// Four voxels (pointers vg, vy, vs, vo) of the backward: gy = g * scale + y * coef + shift (the batch norm's
// backward), added into glo; gskip = gy @ w stored; gw += gy^T skip.
template <int C>
inline void entry_backward_four(const float* const* vg, const float* const* vy, const float* const* vs,
                                float* const* vo, const float* __restrict__ w, const typename Vec<vwidth(C)>::type* sc,
                                const typename Vec<vwidth(C)>::type* co,
                                const typename Vec<vwidth(C)>::type* sh,
                                typename Vec<vwidth(C)>::type* glo, float* __restrict__ gw) {
  constexpr int VW = vwidth(C);
  constexpr int NV = C / VW;
  constexpr int P = 4;
  using V = typename Vec<VW>::type;
  alignas(64) float gh[P][C];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) {
      const V gyv = load<VW>(vg[p] + v * VW) * sc[v] + load<VW>(vy[p] + v * VW) * co[v] + sh[v];
      store<VW>(&gh[p][v * VW], gyv);
      glo[v] += gyv;
    }
  pointwise_backward<C, P>(gh, w, [&](int p) { return vs[p]; }, [&](int p) { return vo[p]; }, gw);
}

// Backward of decoder_entry_forward through the batch norm: g the gradient of the batch norm's output, y the entry's
// output, skip its input, w [C, C] the skip's weight, gy = g * scale + y * coef + shift per channel. Returns
// gskip [N, D, H, W, C], glo (lo's shape) and gw [C, C]. One coarse voxel (its 4 or 8 fine voxels) at a time.
std::vector<at::Tensor> decoder_entry_backward(const at::Tensor& g, const at::Tensor& y, const at::Tensor& skip,
                                               const at::Tensor& w, const at::Tensor& scale, const at::Tensor& coef,
                                               const at::Tensor& shift, int64_t lo_d) {
  TORCH_CHECK(g.dim() == 5 && g.is_contiguous() && y.is_contiguous() && skip.is_contiguous() &&
              g.sizes() == y.sizes() && g.sizes() == skip.sizes() && g.scalar_type() == at::kFloat &&
              w.is_contiguous() && w.size(0) == g.size(4) && w.size(1) == g.size(4) && scale.is_contiguous() &&
              coef.is_contiguous() && shift.is_contiguous(), "decoder_entry_backward: bad shapes");
  const int64_t n = g.size(0), d = g.size(1), h = g.size(2), wd = g.size(3), c = g.size(4);
  TORCH_CHECK(h % 2 == 0 && wd % 2 == 0 && (d == 1 ? lo_d == 1 : 2 * lo_d == d),
              "decoder_entry_backward: even sizes, lo's depth half the skip's (1 in 2D)");
  const bool three_d = d > 1;
  const int64_t h2 = h / 2, w2 = wd / 2;
  const int64_t coarse_rows = n * lo_d * h2;
  const int64_t parts = num_parts(coarse_rows);
  auto gskip = at::empty_like(g);
  auto glo = at::empty({n, lo_d, h2, w2, c}, g.options());
  PartSums acc_w(parts, c * c);
  const float *pg = g.data_ptr<float>(), *py = y.data_ptr<float>(), *ps = skip.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  float *po = gskip.data_ptr<float>(), *pl = glo.data_ptr<float>();
  const bool ok = dispatch_channel_count(c, [&]<int C>() {
    constexpr int VW = vwidth(C);
    constexpr int NV = C / VW;
    using V = typename Vec<VW>::type;
    V sc[NV], co[NV], sh[NV];
    for (int v = 0; v < NV; ++v) {
      sc[v] = load<VW>(scale.data_ptr<float>() + v * VW);
      co[v] = load<VW>(coef.data_ptr<float>() + v * VW);
      sh[v] = load<VW>(shift.data_ptr<float>() + v * VW);
    }
    by_parts(coarse_rows, parts, [&](int64_t part, int64_t q0, int64_t q1) {
      float* gw = acc_w.part(part);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b = q / (lo_d * h2), lz = (q / h2) % lo_d, ly = q % h2;
        const int64_t zs = three_d ? 2 : 1;
        // the fine rows under coarse row q: (z, y) for z in the 1 or 2 planes, y in 2 rows
        int64_t fine[4];
        for (int64_t dz = 0; dz < zs; ++dz)
          for (int64_t dy = 0; dy < 2; ++dy)
            fine[dz * 2 + dy] = ((b * d + (three_d ? 2 * lz + dz : 0)) * h + 2 * ly + dy) * wd * C;
        float* lrow = pl + q * w2 * C;
        for (int64_t lx = 0; lx < w2; ++lx) {
          V glv[NV];
          for (int v = 0; v < NV; ++v) glv[v] = V{};
          for (int64_t dz = 0; dz < zs; ++dz) {
            const int64_t o0 = fine[dz * 2] + 2 * lx * C, o1 = fine[dz * 2 + 1] + 2 * lx * C;
            const float* vg[4] = {pg + o0, pg + o0 + C, pg + o1, pg + o1 + C};
            const float* vy[4] = {py + o0, py + o0 + C, py + o1, py + o1 + C};
            const float* vs[4] = {ps + o0, ps + o0 + C, ps + o1, ps + o1 + C};
            float* vo[4] = {po + o0, po + o0 + C, po + o1, po + o1 + C};
            entry_backward_four<C>(vg, vy, vs, vo, pw, sc, co, sh, glv, gw);
          }
          for (int v = 0; v < NV; ++v) store<VW>(lrow + lx * C + v * VW, glv[v]);
        }
      }
    });
  });
  TORCH_CHECK(ok, "decoder_entry_backward: channels must be 8, 16, 32 or 64");
  return {gskip, glo, acc_w.sum({c, c}, g.options())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("encoder_tail_forward", &encoder_tail_forward, "U-Lite encoder tail forward (CPU)");
  m.def("pw_gelu_forward", &pw_gelu_forward, "gelu(1x1 conv) over [M, C] rows (CPU)");
  m.def("pw_gelu_backward", &pw_gelu_backward, "gradients of pw_gelu_forward (CPU)");
  m.def("axial_forward", &axial_forward, "U-Lite axial depthwise block (identity + K taps per axis) (CPU)");
  m.def("axial_weight_grad", &axial_weight_grad, "weight and bias gradients of axial_forward (CPU)");
  m.def("channel_stats", &channel_stats, "per-channel mean and biased variance of [M, C] (CPU)");
  m.def("encoder_tail_backward", &encoder_tail_backward, "U-Lite encoder tail backward (CPU)");
  m.def("infer_encoder", &infer_encoder, "U-Lite inference encoder stage: axial block, 1x1 convs, max-pool (CPU)");
  m.def("decoder_entry_forward", &decoder_entry_forward, "U-Lite decoder entry: skip 1x1 conv + up-add (CPU)");
  m.def("decoder_entry_backward", &decoder_entry_backward, "U-Lite decoder entry backward through its batch norm");
  m.def("channel_grad_sums", &channel_grad_sums, "per-channel sum(g) and sum(g * (y - mean)) (CPU)");
  m.def("infer_decoder", &infer_decoder, "U-Lite inference decoder stage: up-add, axial block, 1x1 conv, GELU (CPU)");
}
