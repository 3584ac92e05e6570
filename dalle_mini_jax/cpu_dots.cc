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
// GCC/Clang vector extensions, so the same source vectorises for AVX-512, AVX2 or NEON.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;     // floats per vector (64 bytes: 1 AVX-512 register, 2 AVX2, 4 NEON)
constexpr int kRows = 4;       // rows of W multiplied together (4 streams of W in flight)
constexpr int kMaxChunk = 6;   // rows of x per pass over a block of W (registers: kRows * chunk accumulators)
constexpr int kPrefetch = 256; // elements of W ahead to prefetch (1 KiB of f32)

typedef float vf __attribute__((vector_size(64)));
typedef float vf_u __attribute__((vector_size(64), aligned(4)));
typedef uint16_t vh_u __attribute__((vector_size(32), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(64)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }

inline vf load(const uint16_t* p) {  // bfloat16 bits -> float32: the bits are the top half
  vu wide = __builtin_convertvector(*reinterpret_cast<const vh_u*>(p), vu) << 16;
  vf out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) {
  uint32_t b = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

inline float sum_lanes(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// y[m, n] for rows n in [n, n + R) of W and rows m in [m0, m0 + C) of x.
template <typename T, int R, int C>
void block(const T* w, const float* x, float* y, int64_t N, int64_t K, int64_t n, int64_t m0, bool prefetch) {
  vf acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = vf{};
  const T* rows[R];
  for (int i = 0; i < R; ++i) rows[i] = w + (n + i) * K;
  const int64_t k16 = K - K % kLanes;
  for (int64_t k = 0; k < k16; k += kLanes) {
    if (prefetch)
      for (int i = 0; i < R; ++i) __builtin_prefetch(rows[i] + k + kPrefetch);
    vf xv[C];
    for (int c = 0; c < C; ++c) xv[c] = load(x + (m0 + c) * K + k);
    for (int i = 0; i < R; ++i) {
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

template <typename T, int R>
void rows_block(const T* w, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t n) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxChunk) {
    const bool first = m0 == 0;  // later passes find this block of W in cache
    switch (std::min<int64_t>(kMaxChunk, M - m0)) {
      case 1: block<T, R, 1>(w, x, y, N, K, n, m0, first); break;
      case 2: block<T, R, 2>(w, x, y, N, K, n, m0, first); break;
      case 3: block<T, R, 3>(w, x, y, N, K, n, m0, first); break;
      case 4: block<T, R, 4>(w, x, y, N, K, n, m0, first); break;
      case 5: block<T, R, 5>(w, x, y, N, K, n, m0, first); break;
      default: block<T, R, kMaxChunk>(w, x, y, N, K, n, m0, first); break;
    }
  }
}

template <typename T>
void rows_range(const T* w, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) rows_block<T, kRows>(w, x, y, M, N, K, n);
  for (; n < n1; ++n) rows_block<T, 1>(w, x, y, M, N, K, n);
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

// A pool of T - 1 workers that help the calling thread through a job's chunks.
//
// Chunks are taken from a shared counter, so the caller never waits for a worker that
// the OS has not scheduled yet: it does the work itself (with 2 cores, XLA's own
// threads compete with ours). After a job the workers keep watching for the next one
// for kSpin (the next dot of a decode step follows within microseconds), yielding
// the core to any other runnable thread, then sleep: an idle pipeline costs no CPU.
// One job at a time: concurrent calls (XLA may start independent dots together) take
// turns, each using every thread.
class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int t = 1; t < threads_; ++t) std::thread([this] { Work(); }).detach();
  }
  int threads() const { return threads_; }

  // Calls f(c) for c in [0, chunks), on this thread and the workers; returns when all
  // are done and no worker touches f any more.
  template <typename F>
  void Run(const F& f, int64_t chunks) {
    std::lock_guard<std::mutex> one_job(submit_);
    job_ = [](const void* fn, int64_t c) { (*static_cast<const F*>(fn))(c); };
    fn_ = &f;
    chunks_ = chunks;
    next_.store(0);
    done_.store(0);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1);  // odd: a job is open
    }
    if (sleepers_.load()) cv_.notify_all();
    Help();
    while (done_.load() < chunks_) relax();
    generation_.fetch_add(1);  // even: closed; a worker that joins now leaves at once
    while (active_.load()) relax();
  }

 private:
  void Help() {
    for (int64_t c; (c = next_.fetch_add(1)) < chunks_;) {
      job_(fn_, c);
      done_.fetch_add(1);
    }
  }

  void Work() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = generation_.load();
      const auto since = std::chrono::steady_clock::now();
      for (int i = 1; g == seen || g % 2 == 0; ++i) {
        if (i < kPureSpins) {
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
      if (generation_.load() == g) Help();  // still open: the caller waits for active_
      active_.fetch_sub(1);
    }
  }

  const int threads_;
  std::mutex submit_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<int> active_{0}, sleepers_{0};
  int64_t chunks_ = 0;
  void (*job_)(const void*, int64_t) = nullptr;
  const void* fn_ = nullptr;
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

ffi::Error RowsDot(ffi::AnyBuffer x, ffi::RemainingArgs weights, ffi::RemainingRets outs, int64_t threads) {
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
    const auto dt = w->element_type();
    if ((dt != ffi::DataType::F32 && dt != ffi::DataType::BF16) || w->dimensions().size() != 2 ||
        w->dimensions()[1] != K)
      return ffi::Error::InvalidArgument("cpu_dots: weights must be float32 or bfloat16 [N, K]");
    const int64_t N = w->dimensions()[0];
    if ((*y)->element_type() != ffi::DataType::F32 || (*y)->element_count() != size_t(M * N))
      return ffi::Error::InvalidArgument("cpu_dots: results must be float32 [M, N]");
    ws.push_back(Weight{w->untyped_data(), dt == ffi::DataType::BF16, static_cast<float*>((*y)->untyped_data()), N});
  }
  const float* xs = static_cast<const float*>(x.untyped_data());
  int64_t rows = 0;
  for (const Weight& w : ws) rows += w.n;
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  auto f = [&](int64_t c) { chunk(ws, xs, M, K, c); };
  if (threads <= 1 || chunks == 1) {
    for (int64_t c = 0; c < chunks; ++c) f(c);
  } else {
    pool(int(threads))->Run(f, chunks);
  }
  return ffi::Error::Success();
}

// ---- Attention of one query per row over a decode cache --------------------------------

typedef int32_t vi __attribute__((vector_size(64)));

inline float sum16(vf v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
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
    const float sj = sum16(acc);
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
    pool(int(threads))->Run(f, B * H);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmjRowsDot, RowsDot,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("threads"));
