// Fused per-step sampling kernels of the cvqd reverse loop, compiled at run time with NVRTC (kernels/nvrtc.py).
//
// The PyTorch reference of every kernel is in cvqd/model/step.py (stages) and cvqd/model/rng.py (Philox); the
// parity tests compare them stage by stage. One reverse step is
//   logits [R, K, N] -> log_softmax + clamp -> guidance + renormalise + clamp -> truncation (threshold)
//   -> exact posterior (nine log-terms per step from a table) -> Gumbel-max over K+1 classes
// (docs/algorithm.md#posterior, #truncation, #sampling-noise).
//
// Compile-time constants (NVRTC -D): CVQD_K real classes, CVQD_THREADS block size (a multiple of 32, <= 1024).
// Layouts (all contiguous): logits [R, K, N] float32, R = 2B (conditional rows, then null rows) or B;
// log_x0 [B, K, N]; posterior [B, K+1, N]; tokens [B, N] int64 (mask id = K); table [S, 9] float32 in the
// order lq_same lq_other lq_mask ls_a ls_b ls_g tr_same tr_other tr_mask; keys [B, 2] int64 holding 32-bit
// Philox key words; step [1] int64: the loop's step index, read from device memory so one captured CUDA graph
// serves every step (cvqd_advance_step increments it at the end of a step).
//
// One block per (position n, image b): blockIdx.x = n, blockIdx.y = b. Thread j owns the class groups
// g = j + i * CVQD_THREADS (i < GPT), 4 consecutive classes 4g..4g+3 each, so one Philox call gives the noise of
// a whole group (counter = (g, n, step, 0), key = keys[b]; word w is class 4g + w, as in cvqd/model/rng.py).
// Reductions use a fixed shuffle tree, so results are deterministic run to run and eager == graph replay.

#ifndef CVQD_K
#error "define CVQD_K (number of real token classes)"
#endif
#ifndef CVQD_THREADS
#error "define CVQD_THREADS (threads per block)"
#endif

#define GROUPS ((CVQD_K + 3) / 4)
#define GPT ((GROUPS + CVQD_THREADS - 1) / CVQD_THREADS)
#define VPT (4 * GPT)
#define WARPS (CVQD_THREADS / 32)
#define LOG_ZERO (-70.0f)
#define NEG_INF (__int_as_float(0xff800000))
#define BISECT_ROUNDS 32

typedef long long i64;
typedef unsigned int u32;

// ------------------------------------------------------------------------------------------- Philox4x32-10

__device__ __forceinline__ void philox4x32_10(u32 c[4], u32 k0, u32 k1) {
  #pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
    const u32 hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
    const u32 hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
    const u32 x0 = hi1 ^ c[1] ^ k0, x2 = hi0 ^ c[3] ^ k1;
    c[0] = x0; c[1] = lo1; c[2] = x2; c[3] = lo0;
  }
}

// (2 (x >> 9) + 1) * 2^-24: exact in float32, never 0 or 1 (cvqd/model/rng.py uniform_from_bits)
__device__ __forceinline__ float uniform_from_bits(u32 x) { return (float)((x >> 9) * 2u + 1u) * 5.9604644775390625e-8f; }

__device__ __forceinline__ float gumbel(u32 x) { return -logf(-logf(uniform_from_bits(x))); }

__device__ __forceinline__ void group_words(u32 w[4], u32 group, u32 n, u32 step, const i64* keys, int b) {
  w[0] = group; w[1] = n; w[2] = step; w[3] = 0u;  // stream 0: the Gumbel noise
  philox4x32_10(w, (u32)keys[2 * b], (u32)keys[2 * b + 1]);
}

// ---------------------------------------------------------------------------------------- block reductions

__device__ __forceinline__ float warp_sum(float v) {
  #pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  #pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <bool IS_MAX>
__device__ float block_reduce(float v) {
  __shared__ float partial[32];
  __shared__ float result;
  v = IS_MAX ? warp_max(v) : warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // readers of the previous reduction's `result` are done
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < WARPS ? partial[lane] : (IS_MAX ? NEG_INF : 0.0f);
    v = IS_MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }
__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }

// argmax with the lowest index on ties (torch.argmax returns the first maximal index)
__device__ __forceinline__ void argmax_merge(float& v, int& i, float v2, int i2) {
  if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
}

__device__ int block_argmax(float v, int i) {
  __shared__ float pv[32];
  __shared__ int pi[32];
  __shared__ int result;
  #pragma unroll
  for (int o = 16; o; o >>= 1) argmax_merge(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) { pv[warp] = v; pi[warp] = i; }
  __syncthreads();
  if (warp == 0) {
    v = lane < WARPS ? pv[lane] : NEG_INF;
    i = lane < WARPS ? pi[lane] : 0x7fffffff;
    #pragma unroll
    for (int o = 16; o; o >>= 1) argmax_merge(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
    if (lane == 0) result = i;
  }
  __syncthreads();
  return result;
}

// ------------------------------------------------------------------------------------ per-thread class slots

__device__ __forceinline__ int class_of(int slot) { return 4 * (threadIdx.x + (slot >> 2) * CVQD_THREADS) + (slot & 3); }

__device__ __forceinline__ float clamp_log(float x) { return fminf(fmaxf(x, LOG_ZERO), 0.0f); }

// torch's logaddexp: equal infinities pass through, else max + log1p(exp(-|a - b|))
__device__ __forceinline__ float log_add_exp(float a, float b) {
  if (isinf(a) && a == b) return a;
  const float m = fmaxf(a, b);
  return m + log1pf(expf(-fabsf(a - b)));
}

__device__ void load_classes(const float* row, int n, int N, float v[VPT]) {  // row: [K, N]
  #pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int k = class_of(j);
    v[j] = k < CVQD_K ? row[(i64)k * N + n] : NEG_INF;
  }
}

__device__ void store_classes(float* row, int n, int N, const float v[VPT]) {
  #pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int k = class_of(j);
    if (k < CVQD_K) row[(i64)k * N + n] = v[j];
  }
}

__device__ float block_logsumexp(const float v[VPT]) {
  float m = NEG_INF;
  #pragma unroll
  for (int j = 0; j < VPT; ++j) if (class_of(j) < CVQD_K) m = fmaxf(m, v[j]);
  m = block_max(m);
  float s = 0.0f;
  #pragma unroll
  for (int j = 0; j < VPT; ++j) if (class_of(j) < CVQD_K) s += expf(v[j] - m);
  return m + logf(block_sum(s));
}

__device__ void log_softmax_clamp(float v[VPT]) {
  const float lse = block_logsumexp(v);
  #pragma unroll
  for (int j = 0; j < VPT; ++j) if (class_of(j) < CVQD_K) v[j] = clamp_log(v[j] - lse);
}

// ------------------------------------------------------------------------------------------------- stages

// Stage 1 (cvqd/model/step.py guide_logits): logits of image b -> guided, renormalised, clamped log p(x_0).
__device__ void stage_guide(const float* logits, int b, int n, int B, int N, int use_null, float scale, float g[VPT]) {
  load_classes(logits + (i64)b * CVQD_K * N, n, N, g);
  log_softmax_clamp(g);
  if (!use_null) return;
  float u[VPT];
  load_classes(logits + (i64)(B + b) * CVQD_K * N, n, N, u);
  log_softmax_clamp(u);
  #pragma unroll
  for (int j = 0; j < VPT; ++j) g[j] = class_of(j) < CVQD_K ? u[j] + scale * (g[j] - u[j]) : NEG_INF;
  log_softmax_clamp(g);
}

// Stage 2 (truncate_threshold, method "bisect"): keep p >= p*, p* the smallest value whose larger mass < rate.
__device__ void stage_truncate(float g[VPT], float rate) {
  if (rate >= 1.0f) return;
  float p[VPT];
  float top = 0.0f, total = 0.0f;
  #pragma unroll
  for (int j = 0; j < VPT; ++j) {
    p[j] = class_of(j) < CVQD_K ? expf(g[j]) : 0.0f;
    top = fmaxf(top, p[j]);
    total += p[j];
  }
  top = block_max(top);
  total = block_sum(total);
  int lo = 0, hi = __float_as_int(top);  // S(lo) >= rate > S(hi); positive floats order like their bits
  for (int r = 0; r < BISECT_ROUNDS; ++r) {
    const int mid = lo + (hi - lo) / 2;
    const float v = __int_as_float(mid);
    float part = 0.0f;
    #pragma unroll
    for (int j = 0; j < VPT; ++j) part += p[j] > v ? p[j] : 0.0f;
    if (block_sum(part) < rate) hi = mid; else lo = mid;  // the sum is the same in every thread: no divergence
  }
  const float threshold = total < rate ? 0.0f : __int_as_float(hi);
  #pragma unroll
  for (int j = 0; j < VPT; ++j) if (class_of(j) < CVQD_K && !(p[j] >= threshold)) g[j] = LOG_ZERO;
}

// Stage 3 (schedule.posterior_from_terms): g <- log p(x_s = k | x_t) for real k; returns the [MASK] entry.
__device__ float stage_posterior(float g[VPT], i64 xt, const float c[9]) {
  const bool is_mask = xt == CVQD_K;
  #pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int k = class_of(j);
    if (k < CVQD_K) g[j] -= is_mask ? c[2] : (k == xt ? c[0] : c[1]);  // log p(x0) - log q(x_t | x0)
  }
  const float z = block_logsumexp(g);
  #pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int k = class_of(j);
    if (k >= CVQD_K) continue;
    const float m = log_add_exp(c[3] + (g[j] - z), c[4]);
    const float tr = is_mask ? c[8] : (k == xt ? c[6] : c[7]);
    g[j] = clamp_log(m + tr + z);
  }
  return clamp_log(c[5] + (is_mask ? 0.0f : NEG_INF) + z);
}

// Stage 4: Gumbel-max over the K+1 classes with Philox noise; returns the sampled class.
__device__ int stage_sample(const float g[VPT], float log_mask, int b, int n, u32 step, const i64* keys) {
  float best = NEG_INF;
  int best_k = 0x7fffffff;
  #pragma unroll
  for (int i = 0; i < GPT; ++i) {
    const int group = threadIdx.x + i * CVQD_THREADS;
    if (4 * group >= CVQD_K) continue;
    u32 w[4];
    group_words(w, (u32)group, (u32)n, step, keys, b);
    #pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int k = 4 * group + q;
      if (k < CVQD_K) argmax_merge(best, best_k, g[4 * i + q] + gumbel(w[q]), k);
    }
  }
  if (threadIdx.x == 0) {  // the [MASK] class K: word K % 4 of group K / 4
    u32 w[4];
    group_words(w, (u32)(CVQD_K / 4), (u32)n, step, keys, b);
    argmax_merge(best, best_k, log_mask + gumbel(w[CVQD_K % 4]), CVQD_K);
  }
  return block_argmax(best, best_k);
}

__device__ __forceinline__ void load_terms(float c[9], const float* table, const i64* step) {
  const float* row = table + (*step) * 9;
  #pragma unroll
  for (int i = 0; i < 9; ++i) c[i] = row[i];
}

// ------------------------------------------------------------------------------------------------ kernels

// The fused step. x_out may alias x_t: every thread reads x_t[b, n] before the first barrier and only thread 0
// writes it, after the last one.
extern "C" __global__ void __launch_bounds__(CVQD_THREADS)
cvqd_sample_step(const float* __restrict__ logits, const i64* x_t, i64* x_out, const float* __restrict__ table,
                 const i64* __restrict__ step, const i64* __restrict__ keys, int B, int N, int use_null,
                 float guidance, float truncation) {
  const int n = blockIdx.x, b = blockIdx.y;
  const i64 xt = x_t[(i64)b * N + n];
  float c[9];
  load_terms(c, table, step);
  float g[VPT];
  stage_guide(logits, b, n, B, N, use_null, guidance, g);
  stage_truncate(g, truncation);
  const float log_mask = stage_posterior(g, xt, c);
  const int k = stage_sample(g, log_mask, b, n, (u32)(*step), keys);
  if (threadIdx.x == 0) x_out[(i64)b * N + n] = k;
}

// step[0] += 1, at the end of every step (one thread; keeps the step index on the device for graph replay).
extern "C" __global__ void cvqd_advance_step(i64* step) {
  if (threadIdx.x == 0 && blockIdx.x == 0) step[0] += 1;
}

// ---------------------------------------------- single stages, for the parity tests against cvqd/model/step.py

extern "C" __global__ void __launch_bounds__(CVQD_THREADS)
cvqd_guide(const float* __restrict__ logits, float* __restrict__ out, int B, int N, int use_null, float guidance) {
  const int n = blockIdx.x, b = blockIdx.y;
  float g[VPT];
  stage_guide(logits, b, n, B, N, use_null, guidance, g);
  store_classes(out + (i64)b * CVQD_K * N, n, N, g);
}

extern "C" __global__ void __launch_bounds__(CVQD_THREADS)
cvqd_truncate(const float* __restrict__ log_x0, float* __restrict__ out, int N, float truncation) {
  const int n = blockIdx.x, b = blockIdx.y;
  float g[VPT];
  load_classes(log_x0 + (i64)b * CVQD_K * N, n, N, g);
  stage_truncate(g, truncation);
  store_classes(out + (i64)b * CVQD_K * N, n, N, g);
}

extern "C" __global__ void __launch_bounds__(CVQD_THREADS)
cvqd_posterior(const float* __restrict__ log_x0, const i64* __restrict__ x_t, const float* __restrict__ table,
               const i64* __restrict__ step, float* __restrict__ out, int N) {  // out: [B, K+1, N]
  const int n = blockIdx.x, b = blockIdx.y;
  float c[9];
  load_terms(c, table, step);
  float g[VPT];
  load_classes(log_x0 + (i64)b * CVQD_K * N, n, N, g);
  const float log_mask = stage_posterior(g, x_t[(i64)b * N + n], c);
  float* row = out + (i64)b * (CVQD_K + 1) * N;
  store_classes(row, n, N, g);
  if (threadIdx.x == 0) row[(i64)CVQD_K * N + n] = log_mask;
}

extern "C" __global__ void __launch_bounds__(CVQD_THREADS)
cvqd_gumbel_argmax(const float* __restrict__ log_post, const i64* __restrict__ step, const i64* __restrict__ keys,
                   i64* __restrict__ out, int N) {  // log_post: [B, K+1, N]
  const int n = blockIdx.x, b = blockIdx.y;
  const float* row = log_post + (i64)b * (CVQD_K + 1) * N;
  float g[VPT];
  load_classes(row, n, N, g);
  const int k = stage_sample(g, row[(i64)CVQD_K * N + n], b, n, (u32)(*step), keys);
  if (threadIdx.x == 0) out[(i64)b * N + n] = k;
}

// Raw Philox words of the Gumbel stream: out [B, C, N] uint32 (cvqd/model/rng.py gumbel_bits).
extern "C" __global__ void cvqd_philox_bits(const i64* __restrict__ keys, const i64* __restrict__ step,
                                            u32* __restrict__ out, int C, int N) {
  const int n = blockIdx.x, b = blockIdx.y;
  for (int group = threadIdx.x; 4 * group < C; group += blockDim.x) {
    u32 w[4];
    group_words(w, (u32)group, (u32)n, (u32)(*step), keys, b);
    for (int q = 0; q < 4 && 4 * group + q < C; ++q) out[((i64)b * C + 4 * group + q) * N + n] = w[q];
  }
}
