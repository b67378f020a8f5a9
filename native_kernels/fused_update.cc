// Fused 8-bit optimizer update for the CPU: decode -> rule -> block absmax ->
// encode, one block of the parameter at a time, as an XLA FFI custom call.
//
// The optimizer's rule is not written here: native_kernels/fused.py
// translates the same jax function that the XLA path and the Pallas kernels
// run (optax_paged/rules.py) into C++ and compiles this file with it
// (OPTAX_PAGED_RULE names the generated header, which defines K, SIGNED,
// NUM_HPARAMS and call_rule). So adding an optimizer never touches this file.
//
// Per block of `block_size` elements: each moment's codes are decoded into a
// float32 buffer (code book gather times the block's old scale), the rule
// runs over the block (a plain elementwise loop the compiler vectorizes),
// then each new moment's block maximum is taken and the block is encoded with
// the exact cell table of optax_paged/codebooks.py (the XLA path's
// `encode_normalized_lut`), so codes equal the XLA path's wherever the new
// moments round the same. Blocks are independent; XLA's intra-op thread pool
// takes chunks of them.
//
// Buffers (row-major, any rank): hparams f32[NUM_HPARAMS], grad (f32, bf16 or
// f16), per moment: code book f32[256], cell table i32[16384], codes u8 (the
// parameter's shape), scales f32[num_blocks]. Results: direction (grad's
// dtype), new codes and new scales (aliased to the old ones by the caller).

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define OPTAX_PAGED_X86 1
#endif
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float from_bits(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

// Gradient / direction element types.
struct BF16 { uint16_t bits; };
using F16 = _Float16;

template <typename T> inline float load_f32(const T* p, int64_t i) { return float(p[i]); }
template <> inline float load_f32<BF16>(const BF16* p, int64_t i) {
  return from_bits(uint32_t(p[i].bits) << 16);
}
template <typename T> inline T store_f32(float x) { return T(x); }
// Round to nearest even, as XLA converts float32 to bfloat16; NaN stays a
// (quiet) NaN. Branch-free, so that the rule's loop vectorizes.
template <> inline BF16 store_f32<BF16>(float x) {
  uint32_t b = to_bits(x);
  uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  uint32_t nan = (b >> 16) | 0x40u;
  return BF16{uint16_t((b & 0x7fffffffu) > 0x7f800000u ? nan : rounded)};
}

// jax.lax semantics for the generated rule code.
// NaN propagates; -0 < +0 (IEEE maximum/minimum, as XLA's).
inline float xmax(float a, float b) {
  return a != a ? a : (b != b ? b : (a > b ? a : (b > a ? b : (std::signbit(a) ? b : a))));
}
inline float xmin(float a, float b) {
  return a != a ? a : (b != b ? b : (a < b ? a : (b < a ? b : (std::signbit(a) ? a : b))));
}
// x * 0 keeps NaN and the sign of zero, and gives 0 for a denormal that the
// compares saw as zero (with denormals treated as zero, as XLA runs).
inline float xsign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x * 0.0f); }

}  // namespace

#include OPTAX_PAGED_RULE

namespace {

constexpr int kNumCells = 16384;  // codebooks.NUM_CELLS
constexpr int kMaxBlock = 4096;   // quantization.MAX_BLOCK_SIZE

// Index of the nearest code of the normalized value with float32 bits `bits`
// (quantization._encode_with_cells with carry_code).
template <bool kSigned>
inline int32_t encode_bits(int32_t bits, const int32_t* carry) {
  if (kSigned) {
    int32_t mag = bits & 0x7fffffff;
    int32_t cell = std::min(mag >> 16, kNumCells - 1);
    int32_t t = (carry[cell] + (mag & 0xffff)) >> 17;
    int32_t neg = bits >> 31;  // 0 or -1
    t -= (t >> 7) & neg;       // no -1.0: t <= 127 for negative values
    return 127 + ((t ^ neg) - neg);
  }
  bits &= ~(bits >> 31);  // negative values (and -0.0) to zero, on the bits
  int32_t cell = std::min(bits >> 16, kNumCells - 1);
  return (carry[cell] + (bits & 0xffff)) >> 17;
}

// codes[i] = nearest code of (x[i] * shrink) * inv (quantization.normalize).
template <bool kSigned>
void encode_block(const float* __restrict__ x, int64_t len, float shrink, float inv,
                  const int32_t* __restrict__ carry, uint8_t* __restrict__ out) {
  int64_t i = 0;
#if defined(__AVX512F__) && !defined(OPTAX_PAGED_SCALAR)
  // Compilers do not vectorize this loop by themselves (a bitcast feeding a
  // gather index); written out, it is ~4x faster than the scalar loop.
  const __m512 vs = _mm512_set1_ps(shrink), vi = _mm512_set1_ps(inv);
  const __m512i low16 = _mm512_set1_epi32(0xffff), last = _mm512_set1_epi32(kNumCells - 1);
  for (; i + 16 <= len; i += 16) {
    __m512i bits = _mm512_castps_si512(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vs), vi));
    __m512i t;
    if (kSigned) {
      __m512i mag = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
      __m512i cell = _mm512_min_epi32(_mm512_srli_epi32(mag, 16), last);
      t = _mm512_srai_epi32(
          _mm512_add_epi32(_mm512_i32gather_epi32(cell, carry, 4), _mm512_and_si512(mag, low16)), 17);
      __m512i neg = _mm512_srai_epi32(bits, 31);
      t = _mm512_sub_epi32(t, _mm512_and_si512(_mm512_srli_epi32(t, 7), neg));
      t = _mm512_add_epi32(_mm512_set1_epi32(127), _mm512_sub_epi32(_mm512_xor_si512(t, neg), neg));
    } else {
      bits = _mm512_max_epi32(bits, _mm512_setzero_si512());
      __m512i cell = _mm512_min_epi32(_mm512_srli_epi32(bits, 16), last);
      t = _mm512_srai_epi32(
          _mm512_add_epi32(_mm512_i32gather_epi32(cell, carry, 4), _mm512_and_si512(bits, low16)), 17);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(t));
  }
#endif
  for (; i < len; ++i) {
    float y = (x[i] * shrink) * inv;
    int32_t bits;
    std::memcpy(&bits, &y, 4);
    out[i] = uint8_t(encode_bits<kSigned>(bits, carry));
  }
}

// out[i] = code_book[codes[i]] * scale (quantization.decode_exact).
void decode_block(const uint8_t* __restrict__ codes, int64_t len, const float* __restrict__ book,
                  float scale, float* __restrict__ out) {
  int64_t i = 0;
#if defined(__AVX512F__) && !defined(OPTAX_PAGED_SCALAR)
  const __m512 vs = _mm512_set1_ps(scale);
  for (; i + 16 <= len; i += 16) {
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_i32gather_ps(idx, book, 4), vs));
  }
#endif
  for (; i < len; ++i) out[i] = book[codes[i]] * scale;
}

// Largest magnitude of a block of finite values, on the bits (non-negative
// floats order like their bits), which vectorizes without -ffast-math.
float block_absmax(const float* x, int64_t len) {
  typedef int32_t __attribute__((may_alias)) aliased_int32;
  const aliased_int32* __restrict__ xb = reinterpret_cast<const aliased_int32*>(x);
  int32_t m = 0;
  for (int64_t i = 0; i < len; ++i) {
    int32_t v = xb[i] & 0x7fffffff;
    m = v > m ? v : m;
  }
  return from_bits(uint32_t(m));
}

struct Args {
  const float* hparams;
  const void* grad;
  void* direction;
  int64_t size;
  int64_t block_size;
  const float* books[K];
  const int32_t* carries[K];
  const uint8_t* codes[K];
  const float* scales[K];
  uint8_t* new_codes[K];
  float* new_scales[K];
};

template <typename G>
void run_blocks(const Args& a, int64_t first, int64_t last) {
  std::unique_ptr<float[]> buffers(new float[2 * K * kMaxBlock]);
  float* old[K];
  float* fresh[K];
  for (int k = 0; k < K; ++k) {
    old[k] = buffers.get() + 2 * k * kMaxBlock;
    fresh[k] = old[k] + kMaxBlock;
  }
  const G* grad = static_cast<const G*>(a.grad);
  G* direction = static_cast<G*>(a.direction);
  for (int64_t b = first; b < last; ++b) {
    const int64_t base = b * a.block_size;
    const int64_t len = std::min(a.block_size, a.size - base);
    for (int k = 0; k < K; ++k) decode_block(a.codes[k] + base, len, a.books[k], a.scales[k][b], old[k]);
    call_rule<G>(a.hparams, grad + base, direction + base, old, fresh, len);
    for (int k = 0; k < K; ++k) {
      const float scale = block_absmax(fresh[k], len);
      a.new_scales[k][b] = scale;
      // Scales above 2**126 have a subnormal reciprocal (flushed to zero):
      // shrink values and scale by 2**-64 first, exactly (normalize()).
      const float shrink = scale > 0x1p126f ? 0x1p-64f : 1.0f;
      const float shrunk = scale * shrink;
      const float inv = shrunk > 0.0f ? 1.0f / shrunk : 0.0f;
      if (SIGNED[k]) {
        encode_block<true>(fresh[k], len, shrink, inv, a.carries[k], a.new_codes[k] + base);
      } else {
        encode_block<false>(fresh[k], len, shrink, inv, a.carries[k], a.new_codes[k] + base);
      }
    }
  }
}

enum class GradType { kF32, kBF16, kF16 };

// Work shared by the calling thread and the pool's: chunks of blocks taken in
// turn. Held by shared_ptr, since a pool task may start after the call has
// returned (it then finds no chunk left).
struct Work {
  Args args;
  GradType type;
  int64_t num_blocks;
  int64_t blocks_per_chunk;
  int64_t num_chunks;
  unsigned int csr;  // the caller's floating-point mode (XLA flushes denormals)
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
};

unsigned int float_mode() {
#ifdef OPTAX_PAGED_X86
  return _mm_getcsr();
#else
  return 0;
#endif
}

void set_float_mode(unsigned int mode) {
#ifdef OPTAX_PAGED_X86
  _mm_setcsr(mode);
#else
  (void)mode;
#endif
}

void work_on(Work& w) {
  const unsigned int saved = float_mode();
  set_float_mode(w.csr);
  for (;;) {
    const int64_t c = w.next.fetch_add(1);
    if (c >= w.num_chunks) break;
    const int64_t first = c * w.blocks_per_chunk;
    const int64_t last = std::min(first + w.blocks_per_chunk, w.num_blocks);
    switch (w.type) {
      case GradType::kF32: run_blocks<float>(w.args, first, last); break;
      case GradType::kBF16: run_blocks<BF16>(w.args, first, last); break;
      case GradType::kF16: run_blocks<F16>(w.args, first, last); break;
    }
    w.finished.fetch_add(1, std::memory_order_release);
  }
  set_float_mode(saved);
}

// Lets the kernel back a large fresh output with huge pages (fewer page
// faults); advisory only.
void advise_huge_pages(void* data, size_t bytes) {
#ifdef MADV_HUGEPAGE  // Linux only
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

ffi::Error FusedUpdateImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hparams, ffi::AnyBuffer grad,
                           ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> direction,
                           ffi::RemainingRets results, int64_t block_size) {
  if (block_size < 1 || block_size > kMaxBlock) {
    return ffi::Error::InvalidArgument("block_size out of range");
  }
  if (hparams.element_count() != NUM_HPARAMS || rest.size() != 4 * K || results.size() != 2 * K) {
    return ffi::Error::InvalidArgument("wrong number of operands for this rule");
  }
  auto work = std::make_shared<Work>();
  Args& a = work->args;
  a.hparams = hparams.typed_data();
  a.grad = grad.untyped_data();
  a.direction = direction->untyped_data();
  a.size = static_cast<int64_t>(grad.element_count());
  a.block_size = block_size;
  work->num_blocks = (a.size + block_size - 1) / block_size;
  for (int k = 0; k < K; ++k) {
    auto book = rest.get<ffi::AnyBuffer>(k);
    auto carry = rest.get<ffi::AnyBuffer>(K + k);
    auto codes = rest.get<ffi::AnyBuffer>(2 * K + k);
    auto scales = rest.get<ffi::AnyBuffer>(3 * K + k);
    auto new_codes = results.get<ffi::AnyBuffer>(k);
    auto new_scales = results.get<ffi::AnyBuffer>(K + k);
    if (!book.has_value() || !carry.has_value() || !codes.has_value() || !scales.has_value() ||
        !new_codes.has_value() || !new_scales.has_value()) {
      return ffi::Error::InvalidArgument("missing operand");
    }
    if (book->element_count() != 256 || carry->element_count() != kNumCells ||
        codes->element_count() != grad.element_count() ||
        scales->element_count() != static_cast<size_t>(work->num_blocks) ||
        (*new_codes)->element_count() != grad.element_count() ||
        (*new_scales)->element_count() != static_cast<size_t>(work->num_blocks)) {
      return ffi::Error::InvalidArgument("operand sizes do not match the gradient and block size");
    }
    a.books[k] = book->typed_data<float>();
    a.carries[k] = carry->typed_data<int32_t>();
    a.codes[k] = codes->typed_data<uint8_t>();
    a.scales[k] = scales->typed_data<float>();
    a.new_codes[k] = (*new_codes)->typed_data<uint8_t>();
    a.new_scales[k] = (*new_scales)->typed_data<float>();
  }
  switch (grad.element_type()) {
    case ffi::DataType::F32: work->type = GradType::kF32; break;
    case ffi::DataType::BF16: work->type = GradType::kBF16; break;
    case ffi::DataType::F16: work->type = GradType::kF16; break;
    default: return ffi::Error::InvalidArgument("gradient dtype must be float32, bfloat16 or float16");
  }
  if (direction->element_type() != grad.element_type()) {
    return ffi::Error::InvalidArgument("direction dtype must be the gradient's");
  }
  if (work->num_blocks == 0) return ffi::Error::Success();
  advise_huge_pages(a.direction, direction->size_bytes());
  // Chunks of ~64K elements: large enough to amortize a task, small enough
  // to balance two threads.
  work->blocks_per_chunk = std::max<int64_t>(1, 65536 / block_size);
  work->num_chunks = (work->num_blocks + work->blocks_per_chunk - 1) / work->blocks_per_chunk;
  work->csr = float_mode();
  // The calling thread works too, so one task fewer than the pool's threads.
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, work->num_chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work_on(*work); });
  work_on(*work);
  while (work->finished.load(std::memory_order_acquire) < work->num_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxPagedFusedUpdate, FusedUpdateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .RemainingRets()
                                  .Attr<int64_t>("block_size"));
