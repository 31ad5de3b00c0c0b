// Decode attention on the CPU over a KV cache in host memory (see kernels/cpu_attention.py).
//
// Plain C++ with a C ABI, loaded through ctypes: no torch headers, so it builds in about a
// second and needs only a C++ compiler. One task per (sequence, KV head), spread over the
// cores with OpenMP; a task reads its keys once (scores for all query heads of the group),
// runs an fp32 softmax over the (rep, T) score rows (they stay in L1/L2), then reads its
// values once. Cache elements (fp16 / bf16 / fp32) are converted to fp32 in registers
// (F16C / AVX-512 when the compiler targets them, a scalar loop otherwise). A 4/8-bit packed
// cache (kernels/quant: per group of elements a float16 scale, a float16 minimum, the codes) is
// dequantized a row at a time into an L1-resident fp32 row, with the same float32 values as
// kernels/quant's PyTorch and Triton paths (code * scale is exact in fp32, so fused or not).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

enum Dtype : int { F32 = 0, F16 = 1, BF16 = 2 };

inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);                  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);          // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;                                              // +-0
  } else {                                                    // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <int DT>
inline float load1(const void* p, int64_t i) {
  if constexpr (DT == F32) {
    return static_cast<const float*>(p)[i];
  } else {
    uint16_t x = static_cast<const uint16_t*>(p)[i];
    if constexpr (DT == F16) return half_to_float(x);
    uint32_t bits = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
}

#if defined(__AVX512F__)
constexpr int W = 16;
using vf = __m512;
const char* kIsa = "avx512";
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vf x) { return _mm512_reduce_add_ps(x); }
template <int DT>
inline vf vload_dt(const void* p, int64_t i) {
  if constexpr (DT == F32) {
    return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (DT == F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
constexpr int W = 8;
using vf = __m256;
const char* kIsa = "avx2";
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf x) { _mm256_storeu_ps(p, x); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
template <int DT>
inline vf vload_dt(const void* p, int64_t i) {
  if constexpr (DT == F32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (DT == F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}
#else
constexpr int W = 1;  // portable: the compiler may still vectorise these loops
using vf = float;
const char* kIsa = "scalar";
inline vf vzero() { return 0.0f; }
inline vf vset1(float x) { return x; }
inline vf vload(const float* p) { return *p; }
inline void vstore(float* p, vf x) { *p = x; }
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
inline float vsum(vf x) { return x; }
template <int DT>
inline vf vload_dt(const void* p, int64_t i) { return load1<DT>(p, i); }
#endif

constexpr int kMaxGroup = 4;  // query heads handled per sweep over a key/value row (registers)

// s[i] = q_i . k for NR query rows (stride D) against one cached key row.
template <int DT, int NR>
inline void dot_rows(const float* q, int64_t D, const void* kr, float* s) {
  vf acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = vzero();
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    vf k = vload_dt<DT>(kr, d);
    for (int i = 0; i < NR; ++i) acc[i] = vfma(vload(q + i * D + d), k, acc[i]);
  }
  for (int i = 0; i < NR; ++i) s[i] = vsum(acc[i]);
  for (; d < D; ++d) {
    float k = load1<DT>(kr, d);
    for (int i = 0; i < NR; ++i) s[i] += q[i * D + d] * k;
  }
}

// o_i += p_i * v for NR output rows (stride D) and one cached value row.
template <int DT, int NR>
inline void axpy_rows(const float* p, const void* vr, int64_t D, float* o) {
  vf w[NR];
  for (int i = 0; i < NR; ++i) w[i] = vset1(p[i]);
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    vf v = vload_dt<DT>(vr, d);
    for (int i = 0; i < NR; ++i) vstore(o + i * D + d, vfma(w[i], v, vload(o + i * D + d)));
  }
  for (; d < D; ++d) {
    float v = load1<DT>(vr, d);
    for (int i = 0; i < NR; ++i) o[i * D + d] += p[i] * v;
  }
}

template <int DT>
inline void dot_group(int nr, const float* q, int64_t D, const void* kr, float* s) {
  switch (nr) {
    case 1: dot_rows<DT, 1>(q, D, kr, s); break;
    case 2: dot_rows<DT, 2>(q, D, kr, s); break;
    case 3: dot_rows<DT, 3>(q, D, kr, s); break;
    default: dot_rows<DT, 4>(q, D, kr, s); break;
  }
}

template <int DT>
inline void axpy_group(int nr, const float* p, const void* vr, int64_t D, float* o) {
  switch (nr) {
    case 1: axpy_rows<DT, 1>(p, vr, D, o); break;
    case 2: axpy_rows<DT, 2>(p, vr, D, o); break;
    case 3: axpy_rows<DT, 3>(p, vr, D, o); break;
    default: axpy_rows<DT, 4>(p, vr, D, o); break;
  }
}

// Where a task's cached rows come from: `row(t, buf)` points at token t's D elements, in
// format DT. A dense cache is read in place; a packed one is dequantized into buf (D floats).
template <int DT_>
struct DenseRows {
  static constexpr int DT = DT_;
  const char* base;
  int64_t stride;  // elements between tokens
  const void* row(int64_t t, float*) const { return base + t * stride * (DT == F32 ? 4 : 2); }
};

template <int BITS>
struct PackedRows {
  static constexpr int DT = F32;
  const char* base;
  int64_t stride;  // bytes between tokens
  int64_t D, gs;   // elements per row, per group
  const void* row(int64_t t, float* buf) const {
    const uint8_t* rec = reinterpret_cast<const uint8_t*>(base + t * stride);
    const int64_t rec_bytes = 4 + gs * BITS / 8, half = gs / 2;
    for (int64_t g0 = 0; g0 < D; g0 += gs, rec += rec_bytes) {
      uint16_t sb, mb;
      std::memcpy(&sb, rec, 2);
      std::memcpy(&mb, rec + 2, 2);
      const float scale = half_to_float(sb), mn = half_to_float(mb);
      const uint8_t* c = rec + 4;
      float* o = buf + g0;
      if (g0 + gs <= D) {  // a whole group: branch-free, vectorisable
        if constexpr (BITS == 4) {
          for (int64_t i = 0; i < half; ++i) {  // byte i holds elements i (low nibble) and i + gs/2
            o[i] = float(c[i] & 15) * scale + mn;
            o[i + half] = float(c[i] >> 4) * scale + mn;
          }
        } else {
          for (int64_t i = 0; i < gs; ++i) o[i] = float(c[i]) * scale + mn;
        }
      } else {  // the last, partial group: its padding codes are never read
        for (int64_t i = 0; i < D - g0; ++i) {
          const int code = BITS == 8 ? c[i] : (i < half ? c[i] & 15 : c[i - half] >> 4);
          o[i] = float(code) * scale + mn;
        }
      }
    }
    return buf;
  }
};

// One (sequence, KV head): q/out are its rep query rows (rep x D, fp32); scores is scratch
// (T x rep, token-major so pass 2 reads one small contiguous group per token). With `idx`, the
// j-th of T entries is cached token idx[j] (-1: none), for a list of selected tokens (HiP).
// With `probs`, probs[t] = the attention token t received, summed over the rep query rows (H2O).
template <class KRows, class VRows>
void attend_task(const float* q, const KRows& keys, const VRows& vals, const uint8_t* valid, const int32_t* idx,
                 int64_t T, int64_t D, int64_t rep, float* scores, float* mx, float* sum, float* row, float* out,
                 float* probs = nullptr) {
  auto token = [&](int64_t j) -> int64_t {
    const int64_t t = idx ? int64_t(idx[j]) : j;
    return (t < 0 || (valid && !valid[t])) ? -1 : t;  // padded slots are never read: they may hold anything
  };
  for (int64_t j = 0; j < T; ++j) {
    float* st = scores + j * rep;
    const int64_t t = token(j);
    if (t < 0) {
      for (int64_t r = 0; r < rep; ++r) st[r] = -INFINITY;
      continue;
    }
    const void* kr = keys.row(t, row);
    for (int64_t r0 = 0; r0 < rep; r0 += kMaxGroup) {
      int nr = int(rep - r0 < kMaxGroup ? rep - r0 : kMaxGroup);
      dot_group<KRows::DT>(nr, q + r0 * D, D, kr, st + r0);
    }
  }
  // Softmax in fp32; probabilities stay unnormalised until the end (one scale per output).
  for (int64_t r = 0; r < rep; ++r) mx[r] = -INFINITY;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < rep; ++r) mx[r] = std::fmax(mx[r], scores[t * rep + r]);
  for (int64_t r = 0; r < rep; ++r) sum[r] = 0.0f;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < rep; ++r) {  // exp(-inf) = 0 for padding; a row with no key at all gives 0
      float p = mx[r] == -INFINITY ? 0.0f : std::exp(scores[t * rep + r] - mx[r]);
      scores[t * rep + r] = p;
      sum[r] += p;
    }
  for (int64_t i = 0; i < rep * D; ++i) out[i] = 0.0f;
  for (int64_t j = 0; j < T; ++j) {
    const int64_t t = token(j);
    if (t < 0) continue;
    const void* vr = vals.row(t, row);
    for (int64_t r0 = 0; r0 < rep; r0 += kMaxGroup) {
      int nr = int(rep - r0 < kMaxGroup ? rep - r0 : kMaxGroup);
      axpy_group<VRows::DT>(nr, scores + j * rep + r0, vr, D, out + r0 * D);
    }
  }
  for (int64_t r = 0; r < rep; ++r) {
    sum[r] = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f;  // from here on: the normaliser
    for (int64_t d = 0; d < D; ++d) out[r * D + d] *= sum[r];
  }
  if (probs) {
    for (int64_t t = 0; t < T; ++t) {
      float p = 0.0f;
      for (int64_t r = 0; r < rep; ++r) p += scores[t * rep + r] * sum[r];
      probs[t] = p;
    }
  }
}

// rows(b, h) -> (keys, values) row sources of sequence b, KV head h.
// valid: (B, T) bytes (valid_sh = 0) or (B, Hkv, T); probs: null or contiguous (B, Hkv, T).
template <class Rows>
void run(const float* q, const Rows& rows, const uint8_t* valid, float* out, int64_t B, int64_t Hq, int64_t Hkv,
         int64_t T, int64_t D, int64_t valid_sb, int nthreads, int64_t valid_sh = 0, float* probs = nullptr) {
  const int64_t rep = Hq / Hkv, tasks = B * Hkv;
  // Waking a thread costs microseconds (milliseconds on a busy host): give each at least ~64K
  // cached values, and run small calls on the calling thread alone.
  const int64_t by_work = 2 * tasks * T * D / (int64_t(1) << 16);
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>({int64_t(nthreads), tasks, by_work})));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores(static_cast<size_t>(T * rep)), mx(static_cast<size_t>(rep)),
        sum(static_cast<size_t>(rep)), row(static_cast<size_t>(D));
    // Dynamic: tasks are equal, but a core also serving DMA or other work should not hold
    // back the whole call.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const auto kv = rows(b, h);
      attend_task(q + (b * Hq + h * rep) * D, kv.first, kv.second,
                  valid ? valid + b * valid_sb + h * valid_sh : nullptr, nullptr, T, D, rep, scores.data(), mx.data(),
                  sum.data(), row.data(), out + (b * Hq + h * rep) * D, probs ? probs + task * T : nullptr);
    }
  }
}

// One task per (sequence, query head) over its own list of L cached tokens (B, Hq, L int32).
template <int DT>
void run_list(const float* q, const char* k, const char* v, const int32_t* tokens, float* out,
              int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t D,
              int64_t ksb, int64_t ksh, int64_t kst, int64_t vsb, int64_t vsh, int64_t vst,
              int64_t tsb, int64_t tsh, int nthreads) {
  constexpr int64_t es = DT == F32 ? 4 : 2;
  const int64_t group = Hq / Hkv, tasks = B * Hq;
  const int64_t by_work = 2 * tasks * L * D / (int64_t(1) << 16);
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>({int64_t(nthreads), tasks, by_work})));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores(static_cast<size_t>(L)), mx(1), sum(1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / Hq, h = task % Hq, kvh = h / group;
      const DenseRows<DT> keys{k + (b * ksb + kvh * ksh) * es, kst}, vals{v + (b * vsb + kvh * vsh) * es, vst};
      attend_task(q + task * D, keys, vals, nullptr, tokens + b * tsb + h * tsh, L, D, 1, scores.data(), mx.data(),
                  sum.data(), nullptr, out + task * D);
    }
  }
}

// score * decay rounded to float before the step's attention is added, as PyTorch's mul_ then
// add_ do (a fused multiply-add would round once and could flip which slot is evicted).
inline float decayed(float score, float decay) {
  volatile float scaled = score * decay;
  return scaled;
}

// A packed slot cache's rows with each sequence's newest tokens exact (offload_engine/kv/recent.py's
// ExactRing): slot i holds position pos[i]; one within `ring` of `newest` is read from the ring
// (ring rows by position mod ring, in format RDT), any other is dequantized from its record.
template <int BITS, int RDT>
struct RingPackedRows {
  static constexpr int DT = F32;
  PackedRows<BITS> packed;
  const char* ring;
  const int64_t* pos;
  int64_t size, newest;
  const void* row(int64_t slot, float* buf) const {
    const int64_t p = pos[slot];
    if (p < 0 || p <= newest - size) return packed.row(slot, buf);
    const char* r = ring + (p % size) * packed.D * (RDT == F32 ? 4 : 2);
    for (int64_t i = 0; i < packed.D; ++i) buf[i] = load1<RDT>(r, i);
    return buf;
  }
};

// One H2O decode item over a CPU-attended slot cache, laid out as kernels/cpu_decode_job.py's
// H2OJob, with offload_engine/kv/h2o.py's rule. Per (sequence, KV head): the new token goes into
// the first free slot (slot 0 if none is free), the KV head's query heads attend the occupied
// slots among the first `used` = min(C, t + 1), each slot's score is scaled by `decay` and grows
// by the attention it got (not with `sinks`, whose scores are fixed), and above the budget the lowest-scoring occupied
// slot older than the recent window (ties: the earliest position) is freed. A host function too.
// A packed cache (bits 4 or 8) takes the new token's records as given (encoded where q/k/v were
// computed) and keeps its exact keys and values in the ring, which attention reads instead.
struct H2OJob {
  const void* qkv;        // (B, Hq + 2 Hkv, D) contiguous, compute dtype: q (already scaled), k, v
  void* k_home;           // (B, Hkv, >= C, row) with byte strides ksb, ksh, kst
  void* v_home;
  int64_t* position;      // (B, Hkv, C) contiguous: the position each slot holds, -1 when free
  float* score;           // (B, Hkv, C) contiguous: accumulated attention
  float* out;             // (B, Hq, D) contiguous fp32
  const uint8_t* records; // packed: (B, 2, Hkv, record) contiguous, the new keys' then values' records
  void* ring_k;           // packed: (B, Hkv, ring, D) contiguous, compute dtype
  void* ring_v;
  int64_t B, Hq, Hkv, D, C, t, budget, recent;
  int64_t ksb, ksh, kst, vsb, vsh, vst;
  int64_t record, ring, group_size;  // packed: bytes of a token's record, ring slots, elements per group
  int32_t dtype, nthreads, sinks, bits;
  float decay;            // the scores are scaled by it before the step's attention is added
  int32_t rc;             // 0, or 1 for a bad dtype, bits or group size
};

template <int DT, int BITS>
void h2o_job(H2OJob& j) {
  constexpr int64_t es = DT == F32 ? 4 : 2;
  const int64_t rep = j.Hq / j.Hkv, tasks = j.B * j.Hkv, used = std::min(j.C, j.t + 1), row = j.Hq + 2 * j.Hkv;
  const int64_t stored = BITS ? j.record : j.D * es;  // bytes of one token in a home
  const char* src = static_cast<const char*>(j.qkv);
  char *kh = static_cast<char*>(j.k_home), *vh = static_cast<char*>(j.v_home);
  const int64_t by_work = 2 * tasks * used * j.D / (int64_t(1) << 16);
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>({int64_t(j.nthreads), tasks, by_work})));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> q(static_cast<size_t>(rep * j.D)), scores(static_cast<size_t>(used * rep)),
        mx(static_cast<size_t>(rep)), sum(static_cast<size_t>(rep)), probs(static_cast<size_t>(used)),
        buf(static_cast<size_t>(j.D));
    std::vector<uint8_t> valid(static_cast<size_t>(used));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / j.Hkv, h = task % j.Hkv;
      const char* r = src + b * row * j.D * es;
      const char *k_new = r + (j.Hq + h) * j.D * es, *v_new = r + (j.Hq + j.Hkv + h) * j.D * es;
      char *k_rows = kh + b * j.ksb + h * j.ksh, *v_rows = vh + b * j.vsb + h * j.vsh;
      int64_t* pos = j.position + task * j.C;
      float* sc = j.score + task * j.C;
      int64_t slot = 0;
      while (slot < j.C && pos[slot] >= 0) ++slot;
      if (slot == j.C) slot = 0;
      if constexpr (BITS == 0) {
        std::memcpy(k_rows + slot * j.kst, k_new, stored);
        std::memcpy(v_rows + slot * j.vst, v_new, stored);
      } else {
        std::memcpy(k_rows + slot * j.kst, j.records + ((b * 2) * j.Hkv + h) * stored, stored);
        std::memcpy(v_rows + slot * j.vst, j.records + ((b * 2 + 1) * j.Hkv + h) * stored, stored);
        const int64_t at = (task * j.ring + j.t % j.ring) * j.D * es;
        std::memcpy(static_cast<char*>(j.ring_k) + at, k_new, j.D * es);
        std::memcpy(static_cast<char*>(j.ring_v) + at, v_new, j.D * es);
      }
      pos[slot] = j.t;
      sc[slot] = j.sinks ? -float(j.t) : 0.0f;
      const char* qr = r + h * rep * j.D * es;
      for (int64_t i = 0; i < rep * j.D; ++i) q[i] = load1<DT>(qr, i);
      for (int64_t i = 0; i < used; ++i) valid[i] = pos[i] >= 0;
      float* out = j.out + (b * j.Hq + h * rep) * j.D;
      if constexpr (BITS == 0) {
        const DenseRows<DT> keys{k_rows, j.kst / es}, vals{v_rows, j.vst / es};
        attend_task(q.data(), keys, vals, valid.data(), nullptr, used, j.D, rep, scores.data(), mx.data(),
                    sum.data(), buf.data(), out, probs.data());
      } else {
        const int64_t ring_at = task * j.ring * j.D * es;
        const RingPackedRows<BITS, DT> keys{{k_rows, j.kst, j.D, j.group_size},
                                            static_cast<const char*>(j.ring_k) + ring_at, pos, j.ring, j.t};
        const RingPackedRows<BITS, DT> vals{{v_rows, j.vst, j.D, j.group_size},
                                            static_cast<const char*>(j.ring_v) + ring_at, pos, j.ring, j.t};
        attend_task(q.data(), keys, vals, valid.data(), nullptr, used, j.D, rep, scores.data(), mx.data(),
                    sum.data(), buf.data(), out, probs.data());
      }
      if (!j.sinks)
        for (int64_t i = 0; i < used; ++i) sc[i] = decayed(sc[i], j.decay) + probs[i];
      int64_t occupied = 0, victim = -1;
      for (int64_t i = 0; i < j.C; ++i) occupied += pos[i] >= 0;
      if (occupied <= j.budget) continue;
      for (int64_t i = 0; i < j.C; ++i)
        if (pos[i] >= 0 && pos[i] < j.t + 1 - j.recent &&
            (victim < 0 || sc[i] < sc[victim] || (sc[i] == sc[victim] && pos[i] < pos[victim])))
          victim = i;
      if (victim >= 0) {
        pos[victim] = -1;
        sc[victim] = 0.0f;
      }
    }
  }
}

template <int DT>
void h2o_job_of_bits(H2OJob& j) {
  if (j.bits != 0 && (j.group_size < 2 || j.group_size % 2 || j.ring < 1)) {
    j.rc = 1;
    return;
  }
  switch (j.bits) {
    case 0: h2o_job<DT, 0>(j); break;
    case 4: h2o_job<DT, 4>(j); break;
    case 8: h2o_job<DT, 8>(j); break;
    default: j.rc = 1;
  }
}

}  // namespace

extern "C" {

// H2O's decode over its slots: valid (B, Hkv, T) bytes with strides valid_sb, valid_sh (a slot
// holds a token or not, per KV head), or null; probs (B, Hkv, T) contiguous fp32, or null,
// receives the attention each slot got, summed over the KV head's query heads. q, out, k, v as
// in cpu_decode_attention below. Returns 0, or 1 for a bad dtype.
int cpu_slot_attention(const float* q, const void* k, const void* v, const uint8_t* valid, float* out, float* probs,
                       int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t D,
                       int64_t ksb, int64_t ksh, int64_t kst, int64_t vsb, int64_t vsh, int64_t vst,
                       int64_t valid_sb, int64_t valid_sh, int dtype, int nthreads) {
  auto kc = static_cast<const char*>(k), vc = static_cast<const char*>(v);
  auto go = [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    constexpr int64_t es = DT == F32 ? 4 : 2;
    auto rows = [&](int64_t b, int64_t h) {
      return std::make_pair(DenseRows<DT>{kc + (b * ksb + h * ksh) * es, kst},
                            DenseRows<DT>{vc + (b * vsb + h * vsh) * es, vst});
    };
    run(q, rows, valid, out, B, Hq, Hkv, T, D, valid_sb, nthreads, valid_sh, probs);
    return 0;
  };
  switch (dtype) {
    case F32: return go(std::integral_constant<int, F32>{});
    case F16: return go(std::integral_constant<int, F16>{});
    case BF16: return go(std::integral_constant<int, BF16>{});
    default: return 1;
  }
}

// q, out: contiguous (B, Hq, D) fp32. k, v: (B, Hkv, T, D) with unit stride along D; strides in
// elements. valid: (B, T) bytes (row stride valid_sb) or null. Returns 0, or 1 for a bad dtype.
int cpu_decode_attention(const float* q, const void* k, const void* v, const uint8_t* valid, float* out,
                         int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t D,
                         int64_t ksb, int64_t ksh, int64_t kst, int64_t vsb, int64_t vsh, int64_t vst,
                         int64_t valid_sb, int dtype, int nthreads) {
  return cpu_slot_attention(q, k, v, valid, out, nullptr, B, Hq, Hkv, T, D, ksb, ksh, kst, vsb, vsh, vst, valid_sb, 0,
                            dtype, nthreads);
}

// The same over a packed cache: k, v (B, Hkv, T, G, R) uint8 records with (G, R) contiguous per
// token, strides in bytes; bits 4 or 8, group_size elements per record. Returns 0, or 1 for bad
// bits / group size.
int cpu_packed_decode_attention(const float* q, const void* k, const void* v, const uint8_t* valid, float* out,
                                int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t D,
                                int64_t ksb, int64_t ksh, int64_t kst, int64_t vsb, int64_t vsh, int64_t vst,
                                int64_t valid_sb, int bits, int64_t group_size, int nthreads) {
  if (group_size < 2 || group_size % 2) return 1;
  auto kc = static_cast<const char*>(k), vc = static_cast<const char*>(v);
  auto go = [&](auto nbits) {
    constexpr int BITS = decltype(nbits)::value;
    auto rows = [&](int64_t b, int64_t h) {
      return std::make_pair(PackedRows<BITS>{kc + b * ksb + h * ksh, kst, D, group_size},
                            PackedRows<BITS>{vc + b * vsb + h * vsh, vst, D, group_size});
    };
    run(q, rows, valid, out, B, Hq, Hkv, T, D, valid_sb, nthreads);
    return 0;
  };
  switch (bits) {
    case 4: return go(std::integral_constant<int, 4>{});
    case 8: return go(std::integral_constant<int, 8>{});
    default: return 1;
  }
}

// Attention of one query per (sequence, query head) over its own token list: tokens (B, Hq, L)
// int32 with unit stride along L (-1: no token), strides tsb/tsh; k/v and q/out as above.
int cpu_gather_attention(const float* q, const void* k, const void* v, const int32_t* tokens, float* out,
                         int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t D,
                         int64_t ksb, int64_t ksh, int64_t kst, int64_t vsb, int64_t vsh, int64_t vst,
                         int64_t tsb, int64_t tsh, int dtype, int nthreads) {
  auto kc = static_cast<const char*>(k), vc = static_cast<const char*>(v);
  auto go = [&](auto kernel) {
    kernel(q, kc, vc, tokens, out, B, Hq, Hkv, L, D, ksb, ksh, kst, vsb, vsh, vst, tsb, tsh, nthreads);
    return 0;
  };
  switch (dtype) {
    case F32: return go(run_list<F32>);
    case F16: return go(run_list<F16>);
    case BF16: return go(run_list<BF16>);
    default: return 1;
  }
}

// One decode item of a CPU-attended cache, laid out as kernels/cpu_decode_job.py's DecodeJob:
// the new token's keys and values are written into the head-major homes at position t, then
// the new queries attend positions 0..t. cpu_decode_job has the signature of a CUDA host
// function (cuLaunchHostFunc), so the compute stream runs it in order between the copy of
// q/k/v to the host and the copy of `out` back, with no Python in between.
struct DecodeJob {
  const void* qkv;        // (B, Hq + 2 Hkv, D) contiguous, cache dtype: q (already scaled), k, v
  void* k_home;           // (B, Hkv, capacity, D) with element strides ksb, ksh, kst
  void* v_home;
  const uint8_t* valid;   // (B, t + 1) bytes with row stride valid_sb, or null
  float* out;             // (B, Hq, D) contiguous fp32
  int64_t B, Hq, Hkv, D, t;
  int64_t ksb, ksh, kst, vsb, vsh, vst, valid_sb;
  int32_t dtype, nthreads;
  int32_t rc;             // 0, or 1 for a bad dtype
};

void cpu_decode_job(void* arg) {
  DecodeJob& j = *static_cast<DecodeJob*>(arg);
  if (j.dtype != F32 && j.dtype != F16 && j.dtype != BF16) {
    j.rc = 1;
    return;
  }
  const int64_t es = j.dtype == F32 ? 4 : 2, row = j.Hq + 2 * j.Hkv;
  const char* src = static_cast<const char*>(j.qkv);
  char *kh = static_cast<char*>(j.k_home), *vh = static_cast<char*>(j.v_home);
  std::vector<float> q(static_cast<size_t>(j.B * j.Hq * j.D));
  for (int64_t b = 0; b < j.B; ++b) {
    const char* r = src + b * row * j.D * es;
    for (int64_t h = 0; h < j.Hkv; ++h) {
      std::memcpy(kh + (b * j.ksb + h * j.ksh + j.t * j.kst) * es, r + (j.Hq + h) * j.D * es, j.D * es);
      std::memcpy(vh + (b * j.vsb + h * j.vsh + j.t * j.vst) * es, r + (j.Hq + j.Hkv + h) * j.D * es, j.D * es);
    }
    float* qb = q.data() + b * j.Hq * j.D;
    for (int64_t i = 0; i < j.Hq * j.D; ++i)
      qb[i] = j.dtype == F32 ? load1<F32>(r, i) : j.dtype == F16 ? load1<F16>(r, i) : load1<BF16>(r, i);
  }
  j.rc = cpu_decode_attention(q.data(), kh, vh, j.valid, j.out, j.B, j.Hq, j.Hkv, j.t + 1, j.D, j.ksb, j.ksh, j.kst,
                              j.vsb, j.vsh, j.vst, j.valid_sb, j.dtype, j.nthreads);
}

// H2O's decode item (struct H2OJob above), a CUDA host function as cpu_decode_job.
void cpu_h2o_job(void* arg) {
  H2OJob& j = *static_cast<H2OJob*>(arg);
  switch (j.dtype) {
    case F32: h2o_job_of_bits<F32>(j); break;
    case F16: h2o_job_of_bits<F16>(j); break;
    case BF16: h2o_job_of_bits<BF16>(j); break;
    default: j.rc = 1;
  }
}

// Teacher-forced H2O over one block of n queries (kernels/h2o_scan_block.py, whose PyTorch loop is
// the reference), one task per (sequence, KV head). The K columns are the keys the block may
// attend, at ascending positions `pos`: those kept before the block, then the block's own (query
// i's token is column k0 + i). Step i keeps its column (score 0, or minus its position with
// `sinks`), writes the softmax of its rep query rows over the kept columns up to its own into
// probs (zeros elsewhere), scales the scores by `decay` and adds the rows' sum (not with
// `sinks`), and past the budget frees the lowest-scoring kept column older than the recent window (ties: the earliest
// position), offload_engine/kv/h2o.py's rule. logits, probs: (tasks, n, rep, K) contiguous fp32;
// kept (bytes), score (fp32), pos (int64): (tasks, K) contiguous, kept and score updated.
int cpu_h2o_scan_block(const float* logits, float* probs, uint8_t* kept, float* score, const int64_t* pos,
                       int64_t tasks, int64_t n, int64_t rep, int64_t K, int64_t k0, int64_t budget, int64_t recent,
                       int sinks, float decay, int nthreads) {
  if (k0 < 0 || k0 + n > K || rep < 1) return 1;
  const int64_t by_work = tasks * n * rep * K / (int64_t(1) << 16);
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>({int64_t(nthreads), tasks, by_work})));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> acc(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      uint8_t* kp = kept + task * K;
      float* sc = score + task * K;
      const int64_t* ps = pos + task * K;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = k0 + i, t = ps[c], used = c + 1;
        kp[c] = 1;
        sc[c] = sinks ? -float(t) : 0.0f;
        std::fill(acc.begin(), acc.begin() + used, 0.0f);
        for (int64_t r = 0; r < rep; ++r) {
          const float* l = logits + ((task * n + i) * rep + r) * K;
          float* p = probs + ((task * n + i) * rep + r) * K;
          float mx = -INFINITY, sum = 0.0f;
          for (int64_t j = 0; j < used; ++j)
            if (kp[j]) mx = std::fmax(mx, l[j]);
          for (int64_t j = 0; j < used; ++j) {
            p[j] = kp[j] ? std::exp(l[j] - mx) : 0.0f;
            sum += p[j];
          }
          const float inv = 1.0f / sum;  // the step's own column is kept: sum >= 1
          for (int64_t j = 0; j < used; ++j) {
            p[j] *= inv;
            acc[j] += p[j];
          }
          std::fill(p + used, p + K, 0.0f);
        }
        if (!sinks)
          for (int64_t j = 0; j < used; ++j) sc[j] = decayed(sc[j], decay) + acc[j];
        if (t + 1 <= budget) continue;  // no padding: exactly one token over the budget
        int64_t victim = -1;
        for (int64_t j = 0; j < used; ++j)  // ascending positions: the first minimum is the earliest
          if (kp[j] && ps[j] < t + 1 - recent && (victim < 0 || sc[j] < sc[victim])) victim = j;
        if (victim >= 0) {
          kp[victim] = 0;
          sc[victim] = 0.0f;
        }
      }
    }
  }
  return 0;
}

// "avx512+openmp" etc.: what this build vectorises with, for reports.
const char* cpu_decode_attention_isa() {
#ifdef _OPENMP
  static const std::string s = std::string(kIsa) + "+openmp";
  return s.c_str();
#else
  return kIsa;
#endif
}

}  // extern "C"
