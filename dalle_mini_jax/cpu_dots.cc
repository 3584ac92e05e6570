// Few-row dense products on the CPU, on all cores: the decode step's dots.
//
// y_i[m, n] = sum_k x[m, k] * W_i[n, k]   for each weight W_i [N_i, K] (f32 or bf16),
// x [M, K] f32, y_i [M, N_i] f32; M is small (2 rows for one guided image, 18 for a
// 3x3 grid). One XLA FFI call takes several weights that share x (q, k and v).
//
// Why a kernel of our own (see cpu_dots.py for the measurements): a decode step reads
// every decoder weight once for a handful of rows, so it is bound by memory bandwidth,
// and one core of this kind of machine reads about half of what all of them read
// together. XLA:CPU runs each such dot on one thread; cut into one part per core the
// parts overlap only some of the time. Here every call splits its rows of W over a
// small pool of threads that spin between calls, so all cores stream weights for the
// whole of every dot.
//
// Built at run time by cpu_dots.py with the machine's compiler (-O3 -march=native);
// GCC/Clang vector extensions as wide as the machine's registers (kVecBytes), so the
// same source vectorises for AVX-512, AVX2, SSE or NEON.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <unistd.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector is one register of the machine: 64 bytes with AVX-512, 32 with AVX/AVX2,
// 16 otherwise (SSE, NEON). Wider than the registers, GCC splits every vector op
// through memory: with 64-byte vectors on an AVX2 machine (AMD EPYC, Zen 3) one guided
// image's products read 10-13 GB/s on both cores, with 32-byte ones 25-26
// (`benchmarks/cpu_dots_rate.py`, the two builds alternating).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
constexpr int kLanes = kVecBytes / 4;  // floats per vector
constexpr int kRegisters = kVecBytes == 64 ? 32 : 16;  // vector registers (x86-64; NEON has 32, fewer is safe)
constexpr int kRows = 4;  // rows of W multiplied together (4 streams of W in flight)
// Rows of x per pass over a block of W: kRows * chunk accumulators, chunk rows of x and
// one of W in registers (6 with 32 registers, 3 with 16).
constexpr int kMaxChunk = (kRegisters - 1) / (kRows + 1);

typedef float vf __attribute__((vector_size(kVecBytes)));
typedef float vf_u __attribute__((vector_size(kVecBytes), aligned(4)));
typedef uint16_t vh_u __attribute__((vector_size(kVecBytes / 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(kVecBytes)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }

inline vf load(const uint16_t* p) {  // bfloat16 bits -> float32: the bits are the top half
#if defined(__AVX2__) && !defined(__AVX512F__)
  // GCC 12 widens the generic way below in 4 shuffles (two 128-bit halves and an insert);
  // vpmovzxwd does it in one. bf16 products (2 rows of x) on the AVX2 machine, the two
  // alternating twice: 13.4 / 11.4 GB/s that way, 16.9 / 14.1 this way
  // (`benchmarks/cpu_dots_rate.py --dtype bfloat16 --rows 2`); the same bits.
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vf>(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)));
#else
  vu wide = __builtin_convertvector(*reinterpret_cast<const vh_u*>(p), vu) << 16;
  vf out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
#endif
}

inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) {
  uint32_t b = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

template <typename T>
constexpr int kLineItems = 64 / sizeof(T);  // weights per cache line

inline float sum_lanes(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// y[m, n] for rows n in [n, n + R) of W and rows m in [m0, m0 + C) of x; with `ahead`,
// each row's cache lines of the next block, R rows on, are prefetched as this block
// reads its own (see rows_block).
template <typename T, int R, int C>
void block(const T* w, const float* x, float* y, int64_t N, int64_t K, int64_t n, int64_t m0, bool ahead) {
  vf acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = vf{};
  const T* rows[R];
  for (int i = 0; i < R; ++i) rows[i] = w + (n + i) * K;
  const int64_t k16 = K - K % kLanes;
  for (int64_t k = 0; k < k16; k += kLanes) {
    vf xv[C];
    for (int c = 0; c < C; ++c) xv[c] = load(x + (m0 + c) * K + k);
    const bool line = ahead && k % kLineItems<T> == 0;  // once per cache line
    for (int i = 0; i < R; ++i) {
      if (line) __builtin_prefetch(rows[i] + R * K + k, 0, 3);
      vf wv = load(rows[i] + k);
      for (int c = 0; c < C; ++c) acc[i][c] += wv * xv[c];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) {
      float s = sum_lanes(acc[i][c]);
      for (int64_t k = k16; k < K; ++k) s += scalar(rows[i][k]) * x[(m0 + c) * K + k];
      y[(m0 + c) * N + n + i] = s;
    }
}

// `block` for the C rows of x at m0 (C <= kMaxChunk, a compile-time width each).
template <typename T, int R, int C = kMaxChunk>
void pass(const T* w, const float* x, float* y, int64_t N, int64_t K, int64_t n, int64_t m0, int64_t c, bool ahead) {
  if constexpr (C > 1)
    if (c < C) return pass<T, R, C - 1>(w, x, y, N, K, n, m0, c, ahead);
  block<T, R, C>(w, x, y, N, K, n, m0, ahead);
}

// Rows [n, n + R) of W by all M rows of x: passes of kMaxChunk rows, the later ones
// finding this block of W in cache. The first pass prefetches the next block when it
// lies in this thread's range (`ahead`). Why: each row is a stream of its own, only
// K * sizeof(T) bytes long (4 KiB in f32, 2 in bf16 for DALL-E Mini), and the
// hardware's stream prefetchers start each one cold; prefetched a block ahead, each
// row's first lines are on their way before it starts. Without and with, in one process
// (`benchmarks/cpu_dots_ab.py 3c6f434 14ac667 --rounds 20`, the AVX2 machine,
// 2026-12-04): time with / without, bf16 0.864 (2 rows of x) and 0.884 (18 rows); f32
// 0.999 and 0.986, within the noise. (`cpu_dots_rate.py`, one kernel per process, had
// shown f32 gaining too, 1.24 -> 1.11 of the plain read in six runs each: the machine's
// read moves more than that between processes.) Neither a prefetch 1 KiB ahead within
// the row (`cpu_dots_rate.py`), nor two blocks ahead or across the chunk's end
// (`cpu_dots_ab.py`) did better.
template <typename T, int R>
void rows_block(const T* w, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t n, bool ahead) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxChunk)
    pass<T, R>(w, x, y, N, K, n, m0, std::min<int64_t>(kMaxChunk, M - m0), ahead && m0 == 0);
}

template <typename T>
void rows_range(const T* w, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) rows_block<T, kRows>(w, x, y, M, N, K, n, n + 2 * kRows <= n1);
  for (; n < n1; ++n) rows_block<T, 1>(w, x, y, M, N, K, n, false);
}

struct Weight {
  const void* data;
  bool bf16;
  float* y;
  int64_t n;  // rows of W (outputs)
};

// How long an idle worker watches for the next job before sleeping, and how many of
// its first checks spin without yielding the core.
constexpr auto kSpin = std::chrono::microseconds(1000);
constexpr int kPureSpins = 64;

constexpr int64_t kChunk = 8 * kRows;  // rows per unit of work (32 f32 rows of 1024: 128 KiB of W)

// Chunk c of all the weights' rows, taken as one run of rows [c * kChunk, ...).
void chunk(const std::vector<Weight>& ws, const float* x, int64_t M, int64_t K, int64_t c) {
  const int64_t lo = c * kChunk, hi = lo + kChunk;
  int64_t base = 0;
  for (const Weight& w : ws) {
    const int64_t n0 = std::max<int64_t>(lo - base, 0), n1 = std::min<int64_t>(hi - base, w.n);
    if (n0 < n1) {
      if (w.bf16)
        rows_range(static_cast<const uint16_t*>(w.data), x, w.y, M, w.n, K, n0, n1);
      else
        rows_range(static_cast<const float*>(w.data), x, w.y, M, w.n, K, n0, n1);
    }
    base += w.n;
    if (base >= hi) break;
  }
}

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// What the workers may read ahead of a job (into their caches): the last rows of its
// last weight, the chunks they take first (workers claim chunks from the back).
struct Ahead {
  const char* data = nullptr;  // the last weight's first byte; nullptr: nothing to read
  int64_t rows = 0;            // the job's chunks cover rows [0, rows) of all its weights
  int64_t last_rows = 0;       // rows of the last weight (the last of those rows)
  int64_t row_bytes = 0;
};

// Bytes a worker reads ahead of a job at most: half its core's L2 (the job's own
// stream passes through the rest).
int64_t ahead_bytes() {
  static const int64_t bytes = [] {
    long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return int64_t(l2 > 0 ? l2 / 2 : 256 * 1024);
  }();
  return bytes;
}

// A pool of T - 1 workers that help the calling thread through a job's chunks.
//
// The caller takes chunks from the front, the workers from the back (one atomic pair),
// so the caller never waits for a worker that the OS has not scheduled yet: it does
// the work itself (with 2 cores, XLA's own threads compete with ours). After a job the
// workers keep watching for the next one for kSpin (the next dot of a decode step
// follows within microseconds), yielding the core to any other runnable thread, then
// sleep: an idle pipeline costs no CPU.
//
// Reading ahead: between two products of a decode step XLA runs small ops (norms,
// attention, sampling) for tens of microseconds on one core while the memory is idle.
// The pool learns which job follows which (keyed by the first weight's address: a
// decode loop multiplies the same buffers in the same order every step) and, while
// waiting, each worker prefetches into its L2 the rows of the predicted next job that
// it will take first. A wrong guess costs only the prefetch (which never faults).
//
// One job at a time: concurrent calls (XLA may start independent dots together) take
// turns, each using every thread.
class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int t = 1; t < threads_; ++t) std::thread([this, t] { Work(t); }).detach();
  }
  int threads() const { return threads_; }

  // Calls f(c) for c in [0, chunks), on this thread and the workers; returns when all
  // are done and no worker touches f any more. `key` names the job (for learning
  // which job follows it), `self` what may be read ahead of it.
  template <typename F>
  void Run(const F& f, int64_t chunks, const void* key, const Ahead& self) {
    std::lock_guard<std::mutex> one_job(submit_);
    job_ = [](const void* fn, int64_t c) { (*static_cast<const F*>(fn))(c); };
    fn_ = &f;
    chunks_ = chunks;
    ends_.store(uint64_t(chunks) << 32);  // front 0, back `chunks`
    done_.store(0);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1);  // odd: a job is open
    }
    if (sleepers_.load()) cv_.notify_all();
    Help(true);
    while (done_.load() < chunks_) relax();
    generation_.fetch_add(1);  // even: closed; a worker that joins now leaves at once
    while (active_.load()) relax();
    Learn(key, self);
  }

 private:
  // Takes the next chunk from the front (the caller) or the back (workers).
  bool Claim(bool front, int64_t* c) {
    uint64_t e = ends_.load();
    for (;;) {
      const uint64_t lo = e & 0xffffffffu, hi = e >> 32;
      if (lo >= hi) return false;
      if (ends_.compare_exchange_weak(e, front ? e + 1 : e - (uint64_t(1) << 32))) {
        *c = int64_t(front ? lo : hi - 1);
        return true;
      }
    }
  }

  void Help(bool front) {
    for (int64_t c; Claim(front, &c);) {
      job_(fn_, c);
      done_.fetch_add(1);
    }
  }

  // Called by the caller, one job at a time: `self` follows the previous job; publish
  // what is known to follow this one.
  void Learn(const void* key, const Ahead& self) {
    if (previous_ != nullptr) {
      if (follows_.size() > 4096) follows_.clear();  // many models in one process: start over
      follows_[previous_] = self;
    }
    previous_ = key;
    auto it = follows_.find(key);
    std::lock_guard<std::mutex> lock(ahead_mu_);
    ahead_ = it == follows_.end() ? Ahead{} : it->second;
    ahead_seq_.fetch_add(1);
  }

  // Worker `index`'s share of the predicted job's tail into its cache, until a job
  // opens or the budget is spent.
  void ReadAhead(int index) {
    const uint64_t closed = generation_.load();
    if (closed % 2) return;  // a job is open already: join it
    Ahead a;
    {
      std::lock_guard<std::mutex> lock(ahead_mu_);
      a = ahead_;
    }
    if (a.data == nullptr) return;
    const int64_t chunks = (a.rows + kChunk - 1) / kChunk, base = a.rows - a.last_rows;
    int64_t budget = ahead_bytes(), lines = 0;
    for (int64_t c = chunks - index; c >= 0 && budget > 0; c -= threads_ - 1) {
      const int64_t r0 = std::max(c * kChunk, base), r1 = std::min(c * kChunk + kChunk, a.rows);
      if (r0 >= r1) break;  // before the last weight
      const char* p = a.data + (r0 - base) * a.row_bytes;
      const char* end = a.data + (r1 - base) * a.row_bytes;
      for (; p < end; p += 64) {
        __builtin_prefetch(p, 0, 2);
        if (++lines % 16 == 0 && generation_.load() != closed) return;
      }
      budget -= (r1 - r0) * a.row_bytes;
    }
  }

  void Work(int index) {
    uint64_t seen = 0, ahead_seen = 0;
    for (;;) {
      uint64_t g = generation_.load();
      auto since = std::chrono::steady_clock::now();
      for (int i = 1; g == seen || g % 2 == 0; ++i) {
        const uint64_t predicted = ahead_seq_.load();
        if (predicted != ahead_seen) {
          ahead_seen = predicted;
          ReadAhead(index);
          since = std::chrono::steady_clock::now();
        } else if (i < kPureSpins) {
          relax();
        } else {
          std::this_thread::yield();  // let XLA's threads have this core
          if (std::chrono::steady_clock::now() - since > kSpin) {
            std::unique_lock<std::mutex> lock(mu_);
            sleepers_.fetch_add(1);
            cv_.wait(lock, [&] {
              const uint64_t now = generation_.load();
              return now != seen && now % 2 == 1;
            });
            sleepers_.fetch_sub(1);
          }
        }
        g = generation_.load();
      }
      seen = g;
      active_.fetch_add(1);
      if (generation_.load() == g) Help(false);  // still open: the caller waits for active_
      active_.fetch_sub(1);
    }
  }

  const int threads_;
  std::mutex submit_, mu_, ahead_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0}, ends_{0}, ahead_seq_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> active_{0}, sleepers_{0};
  int64_t chunks_ = 0;
  void (*job_)(const void*, int64_t) = nullptr;
  const void* fn_ = nullptr;
  // Learned under submit_: the job that followed each job, and the last job's key.
  std::unordered_map<const void*, Ahead> follows_;
  const void* previous_ = nullptr;
  Ahead ahead_;  // under ahead_mu_: what follows the last job
};

// One pool per process, never destroyed (its detached workers outlive static
// destructors); a forked child, which has no workers, makes its own.
Pool* pool(int threads) {
  static std::mutex mu;
  static Pool* current = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (current == nullptr || owner != getpid() || current->threads() != threads) {
    current = new Pool(threads);  // an earlier pool of another size is left idle (asleep)
    owner = getpid();
  }
  return current;
}

// y_i = x W_i^T for all the weights, split over `threads` threads.
void run_rows(const std::vector<Weight>& ws, const float* x, int64_t M, int64_t K, int64_t threads) {
  int64_t rows = 0;
  for (const Weight& w : ws) rows += w.n;
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  auto f = [&](int64_t c) { chunk(ws, x, M, K, c); };
  if (threads <= 1 || chunks == 1) {
    for (int64_t c = 0; c < chunks; ++c) f(c);
    return;
  }
  const Weight& last = ws.back();
  const Ahead self{static_cast<const char*>(last.data), rows, last.n, K * (last.bf16 ? 2 : 4)};
  pool(int(threads))->Run(f, chunks, ws.front().data, self);
}

// ---- An optional LayerNorm of x before its products, and of the result after ---------
//
// The decode step's pre-norms (before q/k/v, the cross-attention's q, the GLU, and the
// GLU's mid-norm before its last product) run here instead of as ~5 small XLA ops
// each (~14 us a norm, 48 of them a DALL-E Mini step); so do the post-norms after the
// attention's output products and the residual adds after them and the GLU (`rows_dot`'s
// `post=` and `residual=`), another ~5 and 1 XLA ops each.

// y[m] = (x[m] - mean) / sqrt(var + eps) * scale + bias over K, for each of M rows, as
// `transformer.layer_norm` (float32); `g` (scale) may be null. y may be x.
void layer_norm_rows(const float* x, float* y, int64_t M, int64_t K, const float* b, const float* g, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float* ym = y + m * K;
    float mean = 0.f, var = 0.f;
    for (int64_t k = 0; k < K; ++k) mean += xm[k];
    mean /= float(K);
    for (int64_t k = 0; k < K; ++k) var += (xm[k] - mean) * (xm[k] - mean);
    const float inv = 1.0f / std::sqrt(var / float(K) + eps);
    for (int64_t k = 0; k < K; ++k) ym[k] = (xm[k] - mean) * inv * (g ? g[k] : 1.0f) + b[k];
  }
}

// A norm's weights: bias [K] f32 (empty: no norm) and scale [K] or [0] f32; false if
// they are neither.
bool norm_weights(ffi::AnyBuffer bias, ffi::AnyBuffer scale, int64_t K, const float*& b, const float*& g) {
  b = g = nullptr;
  if (bias.element_count() == 0) return true;
  if (bias.element_type() != ffi::DataType::F32 || bias.element_count() != size_t(K) ||
      scale.element_type() != ffi::DataType::F32 || (scale.element_count() != 0 && scale.element_count() != size_t(K)))
    return false;
  b = static_cast<const float*>(bias.untyped_data());
  if (scale.element_count()) g = static_cast<const float*>(scale.untyped_data());
  return true;
}

// x [M, K] normalized over K (`layer_norm_rows`) into a thread-local buffer, or x itself
// when `bias` is empty.
ffi::Error normalize(const float*& x, int64_t M, int64_t K, ffi::AnyBuffer bias, ffi::AnyBuffer scale, float eps) {
  const float *b, *g;
  if (!norm_weights(bias, scale, K, b, g))
    return ffi::Error::InvalidArgument("cpu_dots: the norm's bias and scale must be float32 [K] (scale may be [0])");
  if (!b) return ffi::Error::Success();
  thread_local std::vector<float> buf;
  buf.resize(M * K);
  layer_norm_rows(x, buf.data(), M, K, b, g, eps);
  x = buf.data();
  return ffi::Error::Success();
}

// Appends weight `w` ([N, K] f32 or bf16) to `ws`, its products going to `y`.
ffi::Error take_weight(const ffi::AnyBuffer& w, int64_t K, float* y, std::vector<Weight>& ws) {
  const auto dt = w.element_type();
  if ((dt != ffi::DataType::F32 && dt != ffi::DataType::BF16) || w.dimensions().size() != 2 || w.dimensions()[1] != K)
    return ffi::Error::InvalidArgument("cpu_dots: weights must be float32 or bfloat16 [N, K]");
  ws.push_back(Weight{w.untyped_data(), dt == ffi::DataType::BF16, y, w.dimensions()[0]});
  return ffi::Error::Success();
}

ffi::Error RowsDot(ffi::AnyBuffer x, ffi::AnyBuffer norm_bias, ffi::AnyBuffer norm_scale, ffi::AnyBuffer post_bias,
                   ffi::AnyBuffer post_scale, ffi::AnyBuffer residual, ffi::RemainingArgs weights,
                   ffi::RemainingRets outs, float eps, int64_t threads) {
  if (x.element_type() != ffi::DataType::F32 || x.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("cpu_dots: x must be float32 [M, K]");
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  if (weights.size() != outs.size() || weights.size() == 0)
    return ffi::Error::InvalidArgument("cpu_dots: one result per weight");
  std::vector<Weight> ws;
  for (size_t i = 0; i < weights.size(); ++i) {
    auto w = weights.get<ffi::AnyBuffer>(i);
    auto y = outs.get<ffi::AnyBuffer>(i);
    if (!w.has_value() || !y.has_value()) return ffi::Error::InvalidArgument("cpu_dots: bad operand");
    if (ffi::Error e = take_weight(*w, K, static_cast<float*>((*y)->untyped_data()), ws); e.failure()) return e;
    if ((*y)->element_type() != ffi::DataType::F32 || (*y)->element_count() != size_t(M * ws.back().n))
      return ffi::Error::InvalidArgument("cpu_dots: results must be float32 [M, N]");
  }
  // The epilogue: y = residual + post_norm(y), for one weight only.
  const int64_t N = ws.front().n;
  const float *pb, *pg;
  if (!norm_weights(post_bias, post_scale, N, pb, pg))
    return ffi::Error::InvalidArgument("cpu_dots: the post-norm's bias and scale must be float32 [N] (scale may be [0])");
  const bool add = residual.element_count() != 0;
  if ((pb || add) && ws.size() != 1)
    return ffi::Error::InvalidArgument("cpu_dots: a post-norm or a residual takes one weight");
  if (add && (residual.element_type() != ffi::DataType::F32 || residual.element_count() != size_t(M * N)))
    return ffi::Error::InvalidArgument("cpu_dots: the residual must be float32 [M, N]");
  const float* xs = static_cast<const float*>(x.untyped_data());
  if (ffi::Error e = normalize(xs, M, K, norm_bias, norm_scale, eps); e.failure()) return e;
  run_rows(ws, xs, M, K, threads);
  float* y = ws.front().y;
  if (pb) layer_norm_rows(y, y, M, N, pb, pg, eps);
  if (add) {
    const float* r = static_cast<const float*>(residual.untyped_data());
    for (int64_t i = 0; i < M * N; ++i) y[i] += r[i];
  }
  return ffi::Error::Success();
}

// ---- The GLU of a decode step: gelu(x Wg^T) * (x Wv^T) -------------------------------

// erf(x) for float32: Eigen's rational approximation (what XLA:CPU uses), |error| <
// 5e-7 on [-4, 4], +-1 beyond.
inline vf erf(vf x) {
  const vf hi = vf{} + 4.0f, lo = vf{} - 4.0f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vf x2 = x * x;
  vf p = vf{} - 2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  vf q = vf{} - 1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

inline vf gelu_times(vf g, vf v) { return 0.5f * g * (1.0f + erf(g * 0.707106781f)) * v; }  // g / sqrt(2)

// out [M, N] = gelu(x Wg^T) * (x Wv^T), gelu exact (erf); Wg, Wv [N, K] f32 or bf16.
// One job for both products (the pool splits their rows together), then the GLU on
// the caller: XLA:CPU spent ~60 us a layer on this small elementwise step.
ffi::Error GeluGlu(ffi::AnyBuffer x, ffi::AnyBuffer norm_bias, ffi::AnyBuffer norm_scale, ffi::AnyBuffer wg,
                   ffi::AnyBuffer wv, ffi::Result<ffi::AnyBuffer> out, float eps, int64_t threads) {
  if (x.element_type() != ffi::DataType::F32 || x.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("cpu_dots glu: x must be float32 [M, K]");
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  std::vector<Weight> ws;
  for (const ffi::AnyBuffer* w : {&wg, &wv})
    if (ffi::Error e = take_weight(*w, K, nullptr, ws); e.failure()) return e;
  if (ws[0].n != ws[1].n) return ffi::Error::InvalidArgument("cpu_dots glu: gate and value must be [N, K] alike");
  const int64_t N = ws[0].n, size = M * N;
  if (out->element_type() != ffi::DataType::F32 || out->element_count() != size_t(size))
    return ffi::Error::InvalidArgument("cpu_dots glu: the result must be float32 [M, N]");
  thread_local std::vector<float> scratch;
  scratch.resize(2 * size);
  ws[0].y = scratch.data();
  ws[1].y = scratch.data() + size;
  const float* xs = static_cast<const float*>(x.untyped_data());
  if (ffi::Error e = normalize(xs, M, K, norm_bias, norm_scale, eps); e.failure()) return e;
  run_rows(ws, xs, M, K, threads);
  float* o = static_cast<float*>(out->untyped_data());
  const float* g = ws[0].y;
  const float* v = ws[1].y;
  int64_t i = 0;
  for (; i + kLanes <= size; i += kLanes) {
    const vf y = gelu_times(load(g + i), load(v + i));
    std::memcpy(o + i, &y, sizeof(y));
  }
  if (i < size) {  // the last few, as one zero-padded vector: the same maths as the rest
    vf gi{}, vi{};
    std::memcpy(&gi, g + i, (size - i) * sizeof(float));
    std::memcpy(&vi, v + i, (size - i) * sizeof(float));
    const vf y = gelu_times(gi, vi);
    std::memcpy(o + i, &y, (size - i) * sizeof(float));
  }
  return ffi::Error::Success();
}

// ---- Attention of one query per row over a decode cache --------------------------------

typedef int32_t vi __attribute__((vector_size(kVecBytes)));

// The lanes' sum as a tree: lane i + lane i + half, halving (16 lanes: the order of the
// shuffles this replaced, so AVX-512 results are unchanged).
inline float sum_tree(vf v) {
  float a[kLanes];
  std::memcpy(a, &v, sizeof(a));
  for (int half = kLanes / 2; half > 0; half /= 2)
    for (int i = 0; i < half; ++i) a[i] += a[i + half];
  return a[0];
}

// exp(x) for x <= 0 (scores minus their maximum): 2^n * p(r), |r| <= ln2 / 2, p of
// degree 6 (relative error ~2e-7, like XLA:CPU's own).
inline vf exp_neg(vf x) {
  const vf lo = vf{} - 87.0f;
  x = x < lo ? lo : x;
  const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504f + magic) - magic;
  vf r = x - n * 0.693145752f - n * 1.42860677e-6f;
  vf p = vf{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

inline float round_bf16(float f) {  // to the nearest bfloat16, ties to even (finite f)
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  b = (b + 0x7fff + ((b >> 16) & 1)) & 0xffff0000u;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

constexpr int64_t kMaxHead = 256;  // head size (K) the kernel takes, in floats

// out[D] = sum_j softmax_j(scale * q . k_j) v_j over the valid j < n; k, v rows [S, D].
template <typename T>
void attend_row(const float* q, const T* k, const T* v, const uint8_t* valid, int64_t n, int64_t D,
                bool round_weights, float* out, float* w, int32_t* idx) {
  const float scale = 1.0f / std::sqrt(float(D));
  const int64_t V = D / kLanes;
  vf qv[kMaxHead / kLanes];
  for (int64_t i = 0; i < V; ++i) qv[i] = load(q + i * kLanes) * scale;
  float top = -INFINITY;
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (valid && !valid[j]) continue;
    const T* kj = k + j * D;
    vf acc = vf{};
    for (int64_t i = 0; i < V; ++i) acc += qv[i] * load(kj + i * kLanes);
    const float sj = sum_tree(acc);
    w[m] = sj;
    idx[m++] = int32_t(j);
    top = std::max(top, sj);
  }
  for (int64_t i = 0; i < m; i += kLanes) {  // w's tail past m is scratch
    vf x;
    std::memcpy(&x, w + i, sizeof(x));
    x = exp_neg(x - top);
    std::memcpy(w + i, &x, sizeof(x));
  }
  float total = 0.f;
  for (int64_t i = 0; i < m; ++i) total += w[i];
  vf acc[kMaxHead / kLanes];
  for (int64_t i = 0; i < V; ++i) acc[i] = vf{};
  for (int64_t i = 0; i < m; ++i) {
    const float p = round_weights ? round_bf16(w[i] / total) : w[i] / total;
    const T* vj = v + idx[i] * D;
    for (int64_t c = 0; c < V; ++c) acc[c] += p * load(vj + c * kLanes);
  }
  for (int64_t i = 0; i < V; ++i) std::memcpy(out + i * kLanes, &acc[i], sizeof(vf));
}

bool is_float(ffi::DataType t) { return t == ffi::DataType::F32; }
bool is_bf16(ffi::DataType t) { return t == ffi::DataType::BF16 || t == ffi::DataType::U16; }

// q [B, H, D] f32; k, v [B, H, S, D] f32 or bf16 (or bf16 bits as u16); valid [Bv, S]
// bool (Bv = B or 1); n: int32 scalar, only positions < n are read -> out [B, H, D] f32.
ffi::Error Attend(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer valid,
                  ffi::Buffer<ffi::S32> length, ffi::Result<ffi::AnyBuffer> out, int64_t threads) {
  auto qd = q.dimensions(), kd = k.dimensions(), md = valid.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] || kd[3] != qd[2] ||
      v.dimensions().size() != 4 || !std::equal(kd.begin(), kd.end(), v.dimensions().begin()) ||
      md.size() != 2 || (md[0] != 1 && md[0] != kd[0]) || md[1] != kd[2] || !is_float(q.element_type()) ||
      k.element_type() != v.element_type() || !(is_float(k.element_type()) || is_bf16(k.element_type())) ||
      valid.element_type() != ffi::DataType::PRED || qd[2] % kLanes || qd[2] > kMaxHead)
    return ffi::Error::InvalidArgument("cpu_dots attend: q [B, H, D] f32, k/v [B, H, S, D], valid [B or 1, S] bool");
  const int64_t B = kd[0], H = kd[1], S = kd[2], D = kd[3];
  const int64_t n = std::clamp<int64_t>(length.typed_data()[0], 0, S);
  const bool bf16 = is_bf16(k.element_type());
  const float* qs = static_cast<const float*>(q.untyped_data());
  const uint8_t* ok = static_cast<const uint8_t*>(valid.untyped_data());
  float* os = static_cast<float*>(out->untyped_data());
  auto f = [&](int64_t c) {  // one row (b, h)
    thread_local std::vector<float> w;
    thread_local std::vector<int32_t> idx;
    if (int64_t(w.size()) < S + kLanes) w.resize(S + kLanes), idx.resize(S);
    const int64_t b = c / H, at = c * S * D;
    const uint8_t* mask = ok + (md[0] == 1 ? 0 : b * S);
    if (bf16)
      attend_row(qs + c * D, static_cast<const uint16_t*>(k.untyped_data()) + at,
                 static_cast<const uint16_t*>(v.untyped_data()) + at, mask, n, D, true, os + c * D, w.data(),
                 idx.data());
    else
      attend_row(qs + c * D, static_cast<const float*>(k.untyped_data()) + at,
                 static_cast<const float*>(v.untyped_data()) + at, mask, n, D, false, os + c * D, w.data(), idx.data());
  };
  if (threads <= 1) {
    for (int64_t c = 0; c < B * H; ++c) f(c);
  } else {
    pool(int(threads))->Run(f, B * H, k.untyped_data(), Ahead{});
  }
  return ffi::Error::Success();
}

// ---- Rows of a token table left on the host (a memory map of the checkpoint) ----------
//
// `sampling.HostTable`: a decode step reads one row of the decoder's token table per
// image. A Python callback (`jax.pure_callback`) cost ~1.2 ms a step of DALL-E Mini;
// this reads the registered table's rows directly. Rows are rounded to the model's
// dtype and widened to float32, as `transformer.host_rows` does.

enum Kind : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };  // a table's dtype, the dtype rows are rounded to

struct Table {
  const void* data;  // [rows, dim] of `src`, kept alive by the registering process
  int64_t rows, dim;
  Kind src, round;
};

std::mutex tables_mu;
std::unordered_map<int32_t, Table> tables;

inline float widen(const void* data, Kind src, int64_t i) {
  switch (src) {
    case kBF16: return scalar(static_cast<const uint16_t*>(data)[i]);
#ifdef __FLT16_MAX__
    case kF16: return float(static_cast<const _Float16*>(data)[i]);
#endif
    default: return static_cast<const float*>(data)[i];
  }
}

inline float round_to(float f, Kind round) {  // to the nearest of `round`, ties to even
  switch (round) {
    case kBF16: return std::isnan(f) ? f : round_bf16(f);
#ifdef __FLT16_MAX__
    case kF16: return float(_Float16(f));
#endif
    default: return f;
  }
}

ffi::Error TableRows(ffi::Buffer<ffi::S32> key, ffi::Buffer<ffi::S32> ids, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  Table t;
  {
    std::lock_guard<std::mutex> lock(tables_mu);
    auto it = tables.find(key.typed_data()[0]);
    if (it == tables.end())
      return ffi::Error::InvalidArgument("cpu_dots table rows: no host table registered under key " +
                                         std::to_string(key.typed_data()[0]));
    t = it->second;
  }
  const int64_t B = ids.element_count();
  if (out->element_count() != size_t(B * t.dim))
    return ffi::Error::InvalidArgument("cpu_dots table rows: the result must be float32 [B, dim]");
  float* o = out->typed_data();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = ids.typed_data()[b];
    if (row < 0 || row >= t.rows)
      return ffi::Error::InvalidArgument("cpu_dots table rows: token id " + std::to_string(row) +
                                         " outside the table's " + std::to_string(t.rows) + " rows");
    for (int64_t j = 0; j < t.dim; ++j) o[b * t.dim + j] = round_to(widen(t.data, t.src, row * t.dim + j), t.round);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmjAttend, Attend,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("threads"));

// Lets TableRows read `data` ([rows, dim] of dtype `src`) under `key`, rounded to
// `round`. Returns 0 (nothing registered) for a dtype this build cannot convert.
// The width of the kernel's vectors in bytes (64, 32 or 16: what it was compiled for).
extern "C" int DmjVectorBytes() { return kVecBytes; }

extern "C" int DmjTableRegister(int32_t key, const void* data, int64_t rows, int64_t dim, int32_t src,
                                int32_t round) {
#ifndef __FLT16_MAX__
  if (src == kF16 || round == kF16) return 0;
#endif
  if (src < kF32 || src > kF16 || round < kF32 || round > kF16) return 0;
  std::lock_guard<std::mutex> lock(tables_mu);
  tables[key] = Table{data, rows, dim, Kind(src), Kind(round)};
  return 1;
}

extern "C" void DmjTableUnregister(int32_t key) {
  std::lock_guard<std::mutex> lock(tables_mu);
  tables.erase(key);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmjTableRows, TableRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmjGeluGlu, GeluGlu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // norm_bias
                                  .Arg<ffi::AnyBuffer>()  // norm_scale
                                  .Arg<ffi::AnyBuffer>()  // gate
                                  .Arg<ffi::AnyBuffer>()  // value
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmjRowsDot, RowsDot,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // norm_bias
                                  .Arg<ffi::AnyBuffer>()  // norm_scale
                                  .Arg<ffi::AnyBuffer>()  // post_bias
                                  .Arg<ffi::AnyBuffer>()  // post_scale
                                  .Arg<ffi::AnyBuffer>()  // residual
                                  .RemainingArgs()        // the weights
                                  .RemainingRets()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("threads"));
