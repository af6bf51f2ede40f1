// The whole gated network in one native call: torch.classes.manidp.CpuNetwork (docs/DESIGN.md 7.7).
//
// The engine's per-block op (block_cpu.cpp) returns to Python after every block, and each call
// pays for argument checks, tensor allocations and a fork/join of the thread pool per phase.
// On the small maps of the CIFAR networks those fixed costs are as large as the convs.  This
// class holds the network's weights once and runs stem, every block and the classifier in one
// call:
//  * batch > 1: the instances are split over the intra-op threads and each thread runs its
//    instances through the whole network alone, so no thread waits for another between blocks
//    and an instance's maps stay in that core's cache;
//  * batch 1: the threads form one OpenMP team for the whole forward and split every conv's
//    (pixel tile, row block) grid.  Every rank computes both gates itself, from the same pooled
//    sums added in the same order, so the team needs no serial step: a stride-1 block waits at
//    two barriers (after conv1 and the shortcut, after conv2), a stride-2 block at one more
//    (after repacking its input).  The pooled sums of a block's output come from conv2's
//    epilogue and from the channels conv2 does not write, not from a pass over the map.
// The convs are gconv (gconv_cpu.cpp): conv1 on the active rows, conv2 on the active rows and
// columns, the 1x1 shortcut as gconv's centre tap, all reading the weights in place.  Between
// blocks the maps stay in gconv's stride-1 plane layout (each channel's rows between a zero row
// above and below), which is conv1's input layout: only stride-2 blocks repack their input.
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <vector>

#include "manidp_cpu.h"

namespace manidp {
namespace {

constexpr int64_t kTaps = 9;
constexpr int64_t kTensorsPerBlock = 14;  // w1 b1 w2 b2 ws bs, then fc1 fc2 bias threshold per gate

using detail::GConvArgs;
using detail::PlaneGeometry;

// One block's weights (contiguous fp32, kept alive here) and raw views of its gates.
struct BlockWeights {
  int64_t cin = 0, c = 0, stride = 1;
  at::Tensor w1, b1, w2, b2, ws, bs;  // ws/bs undefined: identity shortcut
  at::Tensor gate_tensors[6];          // fc1, fc2, bias of gate 1, then of gate 2
  at::Tensor gate_transposed[4];       // fc1 and fc2 of gate 1, then of gate 2, transposed
  at::Tensor threshold1, threshold2;   // read on every call: thresholds may be changed in place
  detail::GateParams gate1, gate2;
  bool has_shortcut() const { return ws.defined(); }
};

// Sizes of one block for the current input size.  Maps are stored as planes: channel ch's pixel q
// of a map in geometry G is at ch * G.cstride + G.toff[4] + q.
struct BlockShape {
  int64_t h, w, ho, wo;
  PlaneGeometry in_act;   // the block input as stored (stride-1 planes of the input map)
  PlaneGeometry conv_in;  // conv1's and the shortcut's input: in_act, or phase planes at stride 2
  PlaneGeometry out_act;  // conv2's input planes and the block output (stride-1 planes)
  bool repacked() const { return conv_in.stride != 1; }
  int64_t hw_in() const { return h * w; }
  int64_t hw() const { return ho * wo; }
};

int64_t data_offset(const PlaneGeometry& g) { return g.toff[4]; }  // tap (1, 1) = the pixel itself

// Zeroes everything but the pixels of channels [c0, c1) of planes `buf`: the zero rows and
// slack that gconv reads as padding, whatever an earlier map of another size left there.
void zero_borders(float* buf, const PlaneGeometry& g, int64_t c0, int64_t c1) {
  const int64_t off = data_offset(g), end = off + g.ho * g.wo;
  for (int64_t ch = c0; ch < c1; ++ch) {
    float* p = buf + ch * g.cstride;
    std::fill(p, p + off, 0.f);
    std::fill(p + end, p + g.cstride, 0.f);
  }
}

// The buffers whose borders one rank has zeroed during the current instance, each with the
// geometry and channels it zeroed them for.  gconv and finish_channels write only pixels, so the
// borders stay zero until a map of another geometry goes into the buffer; a block then zeroes
// them only where the map's size changes, not in every block.
class ZeroedBorders {
 public:
  void clear() { n_ = 0; }
  // zero_borders(buf, g, c0, c1), unless this rank has done exactly that since buf last held a
  // map of another geometry.  Every rank must call it for every map written into buf.
  void ensure(float* buf, const PlaneGeometry& g, int64_t c0, int64_t c1) {
    const Entry want{buf, g.cstride, data_offset(g), g.ho * g.wo, c0, c1};
    int i = 0;
    while (i < n_ && entries_[i].buf != buf) ++i;
    if (i < n_ && entries_[i] == want) return;
    zero_borders(buf, g, c0, c1);
    if (i == n_) {
      if (n_ == kMax) return;  // untracked: zeroed again next time
      ++n_;
    }
    entries_[i] = want;
  }

 private:
  struct Entry {
    const float* buf;
    int64_t cstride, off, pixels, c0, c1;
    bool operator==(const Entry& o) const {
      return buf == o.buf && cstride == o.cstride && off == o.off && pixels == o.pixels && c0 == o.c0 && c1 == o.c1;
    }
  };
  static constexpr int kMax = 4;
  Entry entries_[kMax] = {};
  int n_ = 0;
};

// The threads that run one instance together: this thread's rank and the team size.
struct Team {
  int64_t rank = 0, size = 1;
  bool leader() const { return rank == 0; }
  int64_t begin(int64_t n) const { return n * rank / size; }
  int64_t end(int64_t n) const { return n * (rank + 1) / size; }
  void barrier() const {
#ifdef _OPENMP
    if (size > 1) {
#pragma omp barrier
    }
#endif
  }
};

// The four large buffers of a run (two block outputs, phase planes, conv2's input planes), carved
// from one 64-byte aligned allocation.  Each starts at a different offset within a 4 KiB page:
// a conv streams loads from one while storing into another, and two streams at the same page
// offset make the CPU take loads for stores to the same address (4K aliasing), which slowed
// whole forwards by up to 2x depending on where malloc happened to put the buffers.
class Arena {
 public:
  static constexpr int kBuffers = 4;
  float* operator[](int i) const { return base_ + offset_[i]; }
  // Makes buffer i hold at least sizes[i] floats (contents are not kept when it grows).
  void reserve(const int64_t (&sizes)[kBuffers]) {
    int64_t offset[kBuffers], end = 0;
    for (int i = 0; i < kBuffers; ++i) {
      offset[i] = (end + kPage - 1) / kPage * kPage + i * kSkew;
      end = offset[i] + sizes[i];
    }
    if (end > capacity_) {
      memory_.reset(static_cast<float*>(std::aligned_alloc(64, ((end * 4 + 63) / 64) * 64)));
      TORCH_CHECK(memory_, "manidp.CpuNetwork: out of memory for a ", end * 4, "-byte workspace");
      base_ = memory_.get();
      capacity_ = end;
    }
    std::copy(offset, offset + kBuffers, offset_);
  }

 private:
  static constexpr int64_t kPage = 1024;  // floats: 4 KiB
  static constexpr int64_t kSkew = 80;    // floats: 320 bytes, five cache lines
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> memory_;
  float* base_ = nullptr;
  int64_t capacity_ = 0, offset_[kBuffers] = {};
};

// Allocator of 64-byte aligned arrays.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
};
using AlignedFloats = std::vector<float, Aligned64<float>>;

// Both gates of the current block as one rank computes them.  Every rank of a team computes the
// same gates from the same pooled sums, so each needs its own copy of what they write (the same
// values written to shared arrays by two threads would be a data race).  The arrays are 64-byte
// aligned, so the gate's vectorised sums (detail::matvec) take the same path, and so the same
// rounding, on every rank: the ranks then agree bit for bit on the active sets, which they
// must, as they split the convs by them.
struct GateState {
  AlignedFloats pooled_in, pooled_mid, g1, g2, hidden, s1, bias1, s2, bias2;
  AlignedFloats in_sums;  // the sums of the block input's channels, from which pooled_in is divided
  std::vector<int32_t> idx1, idx2, pos;
  std::vector<int32_t> rest;  // the channels conv2 does not write (finish_channels), ascending
  int32_t k1 = 0, k2 = 0, n_rest = 0;
  std::vector<float> pool_row;  // the ImageNet stem's max-pool: one output row of every channel
  // Where the sums of the map the next gate 1 reads are (Workspace): the library stem's row slots
  // (kStemRows), the gconv stem's tile slots (kStemTiles), or a block's conv2 tile slots and the
  // sums of the channels finish_channels wrote (kBlock, with this state's k1, k2 and pos).
  enum class OutSums { kStemRows, kStemTiles, kBlock } out_sums = OutSums::kStemRows;
  int64_t stem_rows = 0;           // rows of the library stem's slots
  int64_t tiles1 = 0, tiles2 = 0;  // tiles of conv1's and of conv2's (or the gconv stem's) slots
};

// Scratch memory of one instance run (shared by a team), reused across calls: fresh multi-MB
// buffers on every call would cost page faults.
struct Workspace {
  Arena arena;  // act 0, act 1, phase planes, conv2's input planes
  float* act(int i) const { return arena[i]; }
  float* in_planes() const { return arena[2]; }
  float* mid_planes() const { return arena[3]; }
  std::vector<GateState> ranks;  // one per team member
  std::vector<ZeroedBorders> zeroed;  // one per team member
  // Pooled sums.  The convs' go to one slot per (pixel tile, row) (detail::gconv_team), shared
  // by the ranks: conv1's for gate 2, conv2's (or the gconv stem's, by channel) for the next
  // gate 1.  finish_channels writes its channels' sums to rest_sums, by channel.  The library
  // stem's go to stem_sums, one slot per (output row, channel) after a max-pool (the ranks
  // share its rows), else one per channel.  Every slot is written by one rank and the slots are
  // added in a fixed order, so the sums do not depend on the team's size.
  AlignedFloats conv1_tiles, conv2_tiles, rest_sums, stem_sums;
  // Per conv of the forward (the stem, then conv1, shortcut and conv2 of each block), one chunk
  // counter per rank (detail::gconv_team); zero before the forward.
  std::unique_ptr<detail::ChunkCounter[]> queues;
  int64_t n_queues = 0;
  detail::ChunkCounter* queue(int64_t i, int64_t team) { return queues.get() + i * team; }
  void reset_queues(int64_t n) {
    if (n > n_queues) {
      queues.reset(new detail::ChunkCounter[n]);
      n_queues = n;
    }
    for (int64_t i = 0; i < n; ++i) queues[i].taken.store(0, std::memory_order_relaxed);
  }
};

template <typename T, typename A>
void grow(std::vector<T, A>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

// Sum over the tiles, in tile order, of row `row` of slots of `m` rows.
float tile_sum(const float* slots, int64_t tiles, int64_t m, int64_t row) {
  float acc = 0.f;
  for (int64_t t = 0; t < tiles; ++t) acc += slots[t * m + row];
  return acc;
}

// dst[ch] = mean over the map of channel ch, ch < c, of the map of hw pixels whose sums G says
// where to find, each added in a fixed order: every rank that calls this gets the same bits, and
// the same whichever rank computed which chunk.  The sums themselves go to sums_dst, if given.
void pooled_means(const Workspace& W, const GateState& G, int64_t c, int64_t hw, float* dst,
                  float* sums_dst = nullptr) {
  const float n = static_cast<float>(hw);
  for (int64_t ch = 0; ch < c; ++ch) {
    float acc = 0.f;
    switch (G.out_sums) {
      case GateState::OutSums::kStemRows:
        acc = tile_sum(W.stem_sums.data(), G.stem_rows, c, ch);
        break;
      case GateState::OutSums::kStemTiles:
        acc = tile_sum(W.conv2_tiles.data(), G.tiles2, c, ch);
        break;
      case GateState::OutSums::kBlock:
        acc = G.k1 > 0 && G.pos[ch] >= 0 ? tile_sum(W.conv2_tiles.data(), G.tiles2, G.k2, G.pos[ch]) : W.rest_sums[ch];
        break;
    }
    dst[ch] = acc / n;
    if (sums_dst) sums_dst[ch] = acc;
  }
}

at::Tensor owned(const at::Tensor& t) { return t.detach().to(at::kFloat).contiguous(); }

class CpuNetwork : public torch::CustomClassHolder {
 public:
  // stem: (stride, padding, maxpool); blocks: kTensorsPerBlock tensors per block (ws and bs
  // empty for an identity shortcut); strides: one per block.
  CpuNetwork(const at::Tensor& stem_w, const at::Tensor& stem_b, std::vector<int64_t> stem,
             std::vector<at::Tensor> blocks, std::vector<int64_t> strides, const at::Tensor& fc_w,
             const at::Tensor& fc_b, double clamp_max) {
    TORCH_CHECK(detail::gconv_available(), "manidp.CpuNetwork needs the gconv kernel (a CPU with AVX-512F or "
                "AVX2 + FMA, and MANIDP_GCONV_ISA not off); got ISA '", detail::gconv_isa_name(), "'");
    TORCH_CHECK(stem.size() == 3, "manidp.CpuNetwork: stem must be (stride, padding, maxpool); got ", stem.size(),
                " values");
    TORCH_CHECK(!strides.empty(), "manidp.CpuNetwork: the network needs at least one block");
    TORCH_CHECK(blocks.size() == strides.size() * kTensorsPerBlock, "manidp.CpuNetwork: expected ",
                kTensorsPerBlock, " tensors per block for ", strides.size(), " blocks; got ", blocks.size());
    detail::check_tensor("CpuNetwork", "stem weight", stem_w, {-1, -1, -1, -1}, "(C0, Cin, k, k)");
    stem_w_ = owned(stem_w);
    stem_b_ = owned(stem_b);
    stem_stride_ = stem[0];
    stem_padding_ = stem[1];
    stem_maxpool_ = stem[2] != 0;
    // The CIFAR stem (3x3, stride 1, padding 1) is a gconv like the blocks' convs; the library
    // conv costs more in call overhead than this small conv's arithmetic.
    gconv_stem_ = stem_w_.size(2) == 3 && stem_w_.size(3) == 3 && stem_stride_ == 1 && stem_padding_ == 1 &&
                  !stem_maxpool_;
    int64_t cin = stem_w_.size(0);
    for (size_t b = 0; b < strides.size(); ++b) {
      blocks_.push_back(make_block(&blocks[b * kTensorsPerBlock], cin, strides[b], clamp_max));
      cin = blocks_.back().c;
    }
    detail::check_tensor("CpuNetwork", "fc weight", fc_w, {-1, cin}, "(classes, C)");
    fc_w_ = owned(fc_w);
    fc_b_ = owned(fc_b);
    detail::check_tensor("CpuNetwork", "fc bias", fc_b_, {fc_w_.size(0)}, "(classes,)");
    rows_.resize(std::max<int64_t>(cin, 1));
    std::iota(rows_.begin(), rows_.end(), 0);
    for (const auto& B : blocks_) grow_rows(B.c);
    grow_rows(stem_w_.size(0));
  }

  // Logits (N, classes) and the active counts (N, 2 * blocks) int32 of x (N, Cin, H, W).
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x) {
    const at::NoGradGuard no_grad;  // inference only: weights are held detached
    detail::check_tensor("CpuNetwork.forward", "x", x, {-1, stem_w_.size(1), -1, -1}, "(N, Cin, H, W)");
    TORCH_CHECK(x.size(0) >= 1, "manidp.CpuNetwork.forward: x must hold at least one image; got shape ", x.sizes());
    // gconv_stem_: the stem runs per instance; with a max-pool, the team pools the library conv's
    // output (h0, channels-last) straight into the first block's planes.
    const at::Tensor h0 = gconv_stem_ ? x.contiguous() : stem(x);
    const int64_t n = h0.size(0);
    const StemMap sm{h0.size(2), h0.size(3)};
    const std::vector<BlockShape> shapes =
        stem_maxpool_ ? block_shapes(conv_out_size(sm.h, 3, 2, 1), conv_out_size(sm.w, 3, 2, 1))  // the max-pool
                      : block_shapes(sm.h, sm.w);
    const std::vector<detail::GateParams> gates = current_gates();
    at::Tensor logits = at::empty({n, fc_w_.size(0)}, x.options());
    at::Tensor counts = at::empty({n, 2 * static_cast<int64_t>(blocks_.size())}, x.options().dtype(at::kInt));
    const int64_t threads = at::get_num_threads();
    const int64_t in_size = h0.size(1) * h0.size(2) * h0.size(3);
    auto run = [&](int64_t i, Workspace& W, const Team& T) {
      run_instance(h0.data_ptr<float>() + i * in_size, sm, shapes, gates, W, T,
                   logits.data_ptr<float>() + i * fc_w_.size(0), counts.data_ptr<int32_t>() + i * counts.size(1));
    };
    if (n == 1 && threads > 1) {
      Lease lease(*this, shapes, threads);
      lease.get().reset_queues(queue_count() * threads);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
      run(0, lease.get(), Team{omp_get_thread_num(), omp_get_num_threads()});
#else
      run(0, lease.get(), Team{});
#endif
    } else {
      at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
        Lease lease(*this, shapes, 1);
        for (int64_t i = i0; i < i1; ++i) {
          lease.get().reset_queues(queue_count());
          run(i, lease.get(), Team{});
        }
      });
    }
    return {logits, counts};
  }

 private:
  // A workspace taken from the pool for one run and given back afterwards.
  class Lease {
   public:
    Lease(CpuNetwork& net, const std::vector<BlockShape>& shapes, int64_t team) : net_(net) {
      {
        std::lock_guard<std::mutex> lock(net_.mutex_);
        if (!net_.pool_.empty()) {
          ws_ = std::move(net_.pool_.back());
          net_.pool_.pop_back();
        }
      }
      if (!ws_) ws_ = std::make_unique<Workspace>();
      net_.size_workspace(*ws_, shapes, team);
    }
    ~Lease() {
      std::lock_guard<std::mutex> lock(net_.mutex_);
      net_.pool_.push_back(std::move(ws_));
    }
    Workspace& get() { return *ws_; }

   private:
    CpuNetwork& net_;
    std::unique_ptr<Workspace> ws_;
  };

  BlockWeights make_block(const at::Tensor* t, int64_t cin, int64_t stride, double clamp_max) {
    const char* op = "CpuNetwork";
    TORCH_CHECK(stride == 1 || stride == 2, "manidp.CpuNetwork: block stride must be 1 or 2; got ", stride);
    BlockWeights B;
    B.cin = cin;
    B.stride = stride;
    detail::check_tensor(op, "w1", t[0], {-1, cin, 3, 3}, "(C, Cin, 3, 3)");
    B.c = t[0].size(0);
    detail::check_tensor(op, "b1", t[1], {B.c}, "(C,)");
    detail::check_tensor(op, "w2", t[2], {B.c, B.c, 3, 3}, "(C, C, 3, 3)");
    detail::check_tensor(op, "b2", t[3], {B.c}, "(C,)");
    B.w1 = owned(t[0]);
    B.b1 = owned(t[1]);
    B.w2 = owned(t[2]);
    B.b2 = owned(t[3]);
    if (t[4].numel() > 0) {
      detail::check_tensor(op, "ws", t[4], {B.c, cin, 1, 1}, "(C, Cin, 1, 1)");
      detail::check_tensor(op, "bs", t[5], {B.c}, "(C,)");
      B.ws = owned(t[4]);
      B.bs = owned(t[5]);
    } else {
      TORCH_CHECK(stride == 1 && cin == B.c, "manidp.CpuNetwork: a block without a shortcut conv needs stride 1 "
                  "and Cin == C; got stride ", stride, ", Cin ", cin, ", C ", B.c);
    }
    for (int i = 0; i < 3; ++i) {
      B.gate_tensors[i] = owned(t[6 + i]);
      B.gate_tensors[3 + i] = owned(t[10 + i]);
    }
    B.threshold1 = t[9].detach();
    B.threshold2 = t[13].detach();
    B.gate1 = detail::gate_params(op, "gate1", B.gate_tensors[0], B.gate_tensors[1], B.gate_tensors[2],
                                  B.threshold1, clamp_max, cin, B.c);
    B.gate2 = detail::gate_params(op, "gate2", B.gate_tensors[3], B.gate_tensors[4], B.gate_tensors[5],
                                  B.threshold2, clamp_max, B.c, B.c);
    // Every rank computes both gates on the forward's critical path (batch 1).
    const int fc[4] = {0, 1, 3, 4};
    for (int i = 0; i < 4; ++i) B.gate_transposed[i] = B.gate_tensors[fc[i]].t().contiguous();
    B.gate1.fc1t = B.gate_transposed[0].data_ptr<float>();
    B.gate1.fc2t = B.gate_transposed[1].data_ptr<float>();
    B.gate2.fc1t = B.gate_transposed[2].data_ptr<float>();
    B.gate2.fc2t = B.gate_transposed[3].data_ptr<float>();
    return B;
  }

  void grow_rows(int64_t c) {
    if (static_cast<int64_t>(rows_.size()) >= c) return;
    rows_.resize(c);
    std::iota(rows_.begin(), rows_.end(), 0);
  }

  // The dense stem's conv on the whole batch (library conv).  With a max-pool (the large
  // ImageNet stem, which runs much faster channels-last) its output stays channels-last: the team
  // max-pools it, applies ReLU and packs it in one pass (pool_relu_pack).  Otherwise ReLU here.
  at::Tensor stem(const at::Tensor& x) const {
    at::Tensor in = stem_maxpool_ ? x.contiguous(at::MemoryFormat::ChannelsLast) : x.contiguous();
    at::Tensor y = at::conv2d(in, stem_w_, stem_b_, {stem_stride_, stem_stride_}, {stem_padding_, stem_padding_});
    if (stem_maxpool_) return y.contiguous(at::MemoryFormat::ChannelsLast);
    return at::relu_(y).contiguous();
  }

  // The chunk counters of one forward: the stem, then conv1, the shortcut and conv2 per block.
  int64_t queue_count() const { return 1 + 3 * static_cast<int64_t>(blocks_.size()); }

  // The stem's output map before the max-pool (h, w).
  struct StemMap {
    int64_t h = 0, w = 0;
  };

  std::vector<BlockShape> block_shapes(int64_t h, int64_t w) const {
    std::vector<BlockShape> shapes;
    for (const auto& B : blocks_) {
      BlockShape s;
      s.h = h;
      s.w = w;
      s.ho = conv_out_size(h, 3, B.stride, 1);
      s.wo = conv_out_size(w, 3, B.stride, 1);
      TORCH_CHECK(s.ho >= 1 && s.wo >= 1, "manidp.CpuNetwork.forward: the input is too small for block ",
                  shapes.size(), " (map ", h, "x", w, ")");
      s.in_act = detail::plane_geometry(h, w, 1);
      s.conv_in = B.stride == 1 ? s.in_act : detail::plane_geometry(h, w, B.stride);
      s.out_act = detail::plane_geometry(s.ho, s.wo, 1);
      shapes.push_back(s);
      h = s.ho;
      w = s.wo;
    }
    return shapes;
  }

  void size_workspace(Workspace& W, const std::vector<BlockShape>& shapes, int64_t team) const {
    int64_t sizes[Arena::kBuffers] = {};
    for (size_t b = 0; b < blocks_.size(); ++b) {
      const BlockWeights& B = blocks_[b];
      const BlockShape& s = shapes[b];
      for (int i : {0, 1}) sizes[i] = std::max({sizes[i], B.c * s.out_act.cstride, B.cin * s.in_act.cstride});
      if (s.repacked()) sizes[2] = std::max(sizes[2], B.cin * s.conv_in.cstride);
      if (b == 0 && gconv_stem_) sizes[2] = std::max(sizes[2], stem_w_.size(1) * s.in_act.cstride);
      sizes[3] = std::max(sizes[3], B.c * s.out_act.cstride);
    }
    W.arena.reserve(sizes);
    int64_t widest = 1, hidden = 1;  // channels of the widest map; the widest gate hidden layer
    for (const auto& B : blocks_) {
      widest = std::max({widest, B.cin, B.c});
      hidden = std::max({hidden, B.gate1.hidden, B.gate2.hidden});
    }
    grow(W.stem_sums, stem_maxpool_ ? shapes.front().in_act.h * stem_w_.size(0) : widest);
    // Tile slots: a pixel tile holds at least one 8-float vector (detail::gconv_tiles).
    auto slots = [](int64_t hw, int64_t rows) { return (hw + 7) / 8 * rows; };
    int64_t tile_slots = gconv_stem_ ? slots(shapes.front().in_act.h * shapes.front().in_act.w, stem_w_.size(0)) : 0;
    for (size_t b = 0; b < blocks_.size(); ++b) tile_slots = std::max(tile_slots, slots(shapes[b].hw(), blocks_[b].c));
    grow(W.conv1_tiles, tile_slots);
    grow(W.conv2_tiles, tile_slots);
    grow(W.rest_sums, widest);
    grow(W.ranks, team);
    grow(W.zeroed, team);
    for (int64_t r = 0; r < team; ++r) {
      GateState& G = W.ranks[r];
      for (auto* v : {&G.pooled_in, &G.in_sums, &G.pooled_mid, &G.g1, &G.g2, &G.s1, &G.bias1, &G.s2, &G.bias2})
        grow(*v, widest);
      grow(G.hidden, hidden);
      if (stem_maxpool_) grow(G.pool_row, stem_w_.size(0) * shapes.front().in_act.w);
      for (auto* v : {&G.idx1, &G.idx2, &G.pos, &G.rest}) grow(*v, widest);
    }
  }

  // Gate 1 and gate 2 of every block with the thresholds as they are now.
  std::vector<detail::GateParams> current_gates() const {
    std::vector<detail::GateParams> gates;
    for (const auto& B : blocks_) {
      gates.push_back(B.gate1);
      gates.back().threshold = *B.threshold1.data_ptr<float>();
      gates.push_back(B.gate2);
      gates.back().threshold = *B.threshold2.data_ptr<float>();
    }
    return gates;
  }

  // One instance: the stem output in planes (x is the instance's input with gconv_stem_, its
  // stem conv output (sm.h, sm.w, C0) channels-last with a max-pool, else its stem output
  // (C0, H0, W0)), every block, the classifier.  The stem output's sums, for the first gate 1,
  // go to the gconv stem's tile slots, or to W.stem_sums.
  void run_instance(const float* x, const StemMap& sm, const std::vector<BlockShape>& shapes,
                    const std::vector<detail::GateParams>& gates, Workspace& W, const Team& T, float* logits,
                    int32_t* counts) const {
    const PlaneGeometry& g0 = shapes.front().in_act;
    const int64_t c0 = blocks_.front().cin, hw0 = g0.h * g0.w;
    GateState& G = W.ranks[T.rank];
    float* sums = W.stem_sums.data();
    G.out_sums = GateState::OutSums::kStemRows;
    G.stem_rows = stem_maxpool_ ? g0.h : 1;
    W.zeroed[T.rank].clear();  // the arena may have moved since the last instance
    const float* in = W.act(1);
    if (gconv_stem_) {
      const int64_t cin = stem_w_.size(1);
      detail::pack_planes(g0, x + T.begin(cin) * hw0, hw0, T.end(cin) - T.begin(cin),
                          W.in_planes() + T.begin(cin) * g0.cstride);
      W.zeroed[T.rank].ensure(W.act(1), g0, T.begin(c0), T.end(c0));
      // Every rank's share of the stem reads every input channel, packed by all ranks.
      T.barrier();
      const GConvArgs stem = stem_args(g0, W);
      detail::gconv_team(stem, W.queue(0, T.size), T.size, T.rank, W.conv2_tiles.data());  // rows are channels
      G.out_sums = GateState::OutSums::kStemTiles;
      G.tiles2 = detail::gconv_tiles(stem);
    } else if (stem_maxpool_) {
      W.zeroed[T.rank].ensure(W.act(1), g0, T.begin(c0), T.end(c0));
      detail::pool_relu_pack(x, sm.h, sm.w, c0, g0, T.begin(g0.h), T.end(g0.h), W.act(1), sums,
                             G.pool_row.data());
    } else {
      const int64_t j0 = T.begin(c0), j1 = T.end(c0);
      detail::pack_planes(g0, x + j0 * hw0, hw0, j1 - j0, W.act(1) + j0 * g0.cstride);
      for (int64_t ch = j0; ch < j1; ++ch) sums[ch] = detail::sum(x + ch * hw0, hw0);
    }
    // The first block reads the stem output planes and the sums of every rank.
    T.barrier();
    // A block with an identity shortcut writes its output over its input (run_block); the
    // others write the other activation buffer.
    int cur = 1;
    for (size_t b = 0; b < blocks_.size(); ++b) {
      if (blocks_[b].has_shortcut()) cur = 1 - cur;
      float* out = W.act(cur);
      run_block(blocks_[b], gates[2 * b], gates[2 * b + 1], shapes[b], in, out, W, T, counts + 2 * b, 1 + 3 * b);
      in = out;
    }
    // The last block's barrier made every rank's sums complete; the end of the team's parallel
    // region is the barrier after the head.
    if (T.leader()) head(shapes.back().out_act, W, logits);
  }

  // The classifier on the mean-pooled output of the last block.
  void head(const PlaneGeometry& g, Workspace& W, float* logits) const {
    const int64_t c = fc_w_.size(1), classes = fc_w_.size(0);
    float* pooled = W.ranks[0].pooled_in.data();
    pooled_means(W, W.ranks[0], c, g.ho * g.wo, pooled);
    detail::matvec(fc_w_.data_ptr<float>(), pooled, classes, c, logits);
    const float* bias = fc_b_.data_ptr<float>();
    for (int64_t k = 0; k < classes; ++k) logits[k] += bias[k];
  }

  // One gated block (docs/DESIGN.md 3.2) of one instance: x (Cin, H, W) -> out (C, Ho, Wo).
  // On entry the sums of x are where every rank's GateState says (pooled_means); on return, those
  // of out.  The convs take their chunks from the counters W.queue(q), W.queue(q + 1) and
  // W.queue(q + 2) (one per rank each).  With an identity shortcut, out may be x itself
  // (run_instance): the channels gate 2 closes then stay as they are (finish_channels), and conv2
  // writes the others over the residual it reads.
  //
  // Which barrier orders each read of data another rank wrote after that write:
  //  * x and its sums: written by every rank before the barrier that ended the previous block
  //    (or the stem); read here by gate 1, the repack, conv1, the shortcut and (identity
  //    shortcut) conv2 and finish_channels as the residual.  Nothing in this block writes them
  //    before barrier 1.  When out is x, conv2 and finish_channels write x after barrier 1, when
  //    conv1, its last reader at other pixels, is done; each pixel a rank writes there is one it
  //    alone reads, as that output's residual, just before.
  //  * out, conv2's input planes and the phase planes: their last readers (the previous block,
  //    or an earlier one for the phase planes, or the stem) finished before the barrier that
  //    ended the previous block, so this block may write them at once.  Each rank zeroes the
  //    borders of its channels of out and of conv2's input planes while other ranks' conv1 and
  //    shortcut write pixels: disjoint floats (gconv's masked stores write only pixels), so no
  //    barrier between them.
  //  * phase planes (stride 2): packed by channel, read by every rank's conv1 and shortcut:
  //    barrier 0.
  //  * conv1's planes, conv1's sums, the shortcut in out, the borders of both: written before
  //    barrier 1, read after it by gate 2, conv2 (input with its padding, residual) and
  //    finish_channels (residual).  conv1's sums and planes are written again only in the next
  //    block, after barrier 2.
  //  * out and its sums (conv2's tile slots, W.rest_sums): written after barrier 1 (when every
  //    rank has read the sums of x for gate 1), read after barrier 2 by the next block or the
  //    head.
  void run_block(const BlockWeights& B, const detail::GateParams& g1, const detail::GateParams& g2,
                 const BlockShape& s, const float* x, float* out, Workspace& W, const Team& T, int32_t* counts,
                 int64_t q) const {
    GateState& G = W.ranks[T.rank];
    gate1(B, g1, s, W, G, T, counts);
    W.zeroed[T.rank].ensure(W.mid_planes(), s.out_act, T.begin(B.c), T.end(B.c));
    W.zeroed[T.rank].ensure(out, s.out_act, T.begin(B.c), T.end(B.c));
    const float* conv_in = x;
    if (s.repacked()) {
      const int64_t j0 = T.begin(B.cin), j1 = T.end(B.cin);
      const int64_t in_cs = s.in_act.cstride;
      detail::pack_planes(s.conv_in, x + j0 * in_cs + data_offset(s.in_act), in_cs, j1 - j0,
                          W.in_planes() + j0 * s.conv_in.cstride);
      // Barrier 0: every rank's share of conv1 and of the shortcut reads every channel of the
      // phase planes.
      T.barrier();
      conv_in = W.in_planes();
    }
    // conv1 on the active rows into conv2's planes, and the 1x1 shortcut into out.
    if (G.k1 > 0) {
      const GConvArgs conv1 = conv1_args(B, s, G, W, conv_in);
      detail::gconv_team(conv1, W.queue(q, T.size), T.size, T.rank, W.conv1_tiles.data());
      G.tiles1 = detail::gconv_tiles(conv1);
    }
    if (B.has_shortcut())
      detail::gconv_team(shortcut_args(B, s, conv_in, out), W.queue(q + 1, T.size), T.size, T.rank, nullptr);
    // Barrier 1: gate 2 reads every rank's conv1 sums; conv2 reads conv1's planes and
    // finish_channels and conv2 the shortcut's output in out, all written by every rank.
    T.barrier();
    gate2(B, g2, s, W, G, T, counts);
    // conv2 on the active rows and columns, added to the shortcut; the other channels.  Their
    // sums go to conv2's tile slots and to W.rest_sums (pooled_means).
    const float* res = B.has_shortcut() ? out : x;
    if (G.k1 > 0 && G.k2 > 0) {
      const GConvArgs conv2 = conv2_args(B, s, G, W, out, res);
      detail::gconv_team(conv2, W.queue(q + 2, T.size), T.size, T.rank, W.conv2_tiles.data());
      G.tiles2 = detail::gconv_tiles(conv2);
    }
    finish_channels(s, G, out, res, out == x, T.begin(G.n_rest), T.end(G.n_rest), W.rest_sums.data());
    G.out_sums = GateState::OutSums::kBlock;
    // Barrier 2: the next block (or the head) reads out and the sums of every rank.
    T.barrier();
  }

  // Gate 1 on this rank, from the sums of x (where G says they are).
  void gate1(const BlockWeights& B, const detail::GateParams& gate, const BlockShape& s, const Workspace& W,
             GateState& G, const Team& T, int32_t* counts) const {
    pooled_means(W, G, B.cin, s.hw_in(), G.pooled_in.data(), G.in_sums.data());
    G.k1 = detail::gate_one(gate, G.pooled_in.data(), G.g1.data(), G.idx1.data(), G.hidden.data());
    if (T.leader()) counts[0] = G.k1;
    const float* b1 = B.b1.data_ptr<float>();
    for (int32_t j = 0; j < G.k1; ++j) {
      G.s1[j] = G.g1[G.idx1[j]];
      G.bias1[j] = b1[G.idx1[j]];
    }
  }

  // Gate 2 on this rank, from conv1's tile slots, added in tile order.
  void gate2(const BlockWeights& B, const detail::GateParams& gate, const BlockShape& s, Workspace& W, GateState& G,
             const Team& T, int32_t* counts) const {
    std::fill(G.pooled_mid.begin(), G.pooled_mid.begin() + B.c, 0.f);
    const float inv = 1.f / static_cast<float>(s.hw());
    for (int32_t j = 0; j < G.k1; ++j) G.pooled_mid[G.idx1[j]] = tile_sum(W.conv1_tiles.data(), G.tiles1, G.k1, j) * inv;
    G.k2 = detail::gate_one(gate, G.pooled_mid.data(), G.g2.data(), G.idx2.data(), G.hidden.data());
    if (T.leader()) counts[1] = G.k2;
    std::fill(G.pos.begin(), G.pos.begin() + B.c, -1);
    const float* b2 = B.b2.data_ptr<float>();
    for (int32_t k = 0; k < G.k2; ++k) {
      const int32_t ch = G.idx2[k];
      G.pos[ch] = k;
      G.s2[k] = G.g2[ch];
      G.bias2[k] = b2[ch];
    }
    G.n_rest = 0;
    for (int32_t ch = 0; ch < B.c; ++ch)
      if (G.pos[ch] < 0 || G.k1 == 0) G.rest[G.n_rest++] = ch;
  }

  // The stem: relu(W0 x + b0) from the input planes into the first block's input planes.
  GConvArgs stem_args(const PlaneGeometry& g, Workspace& W) const {
    GConvArgs c;
    c.in = W.in_planes();
    c.geom = g;
    c.nch = stem_w_.size(1);
    c.weight = stem_w_.data_ptr<float>();
    c.ldw = stem_w_.size(1) * kTaps;
    c.rows = rows_.data();
    c.m = stem_w_.size(0);
    c.bias = stem_b_.data_ptr<float>();
    c.out = W.act(1);
    c.out_chan_stride = g.cstride;
    c.out_offset = data_offset(g);
    return c;
  }

  // conv1: relu(g1 * (W1[A1] x + b1)) written to the pixels of conv2's input planes.
  GConvArgs conv1_args(const BlockWeights& B, const BlockShape& s, const GateState& G, const Workspace& W,
                       const float* in) const {
    GConvArgs c;
    c.in = in;
    c.geom = s.conv_in;
    c.nch = B.cin;
    c.weight = B.w1.data_ptr<float>();
    c.ldw = B.cin * kTaps;
    c.rows = G.idx1.data();
    c.m = G.k1;
    c.bias = G.bias1.data();
    c.scale = G.s1.data();
    c.out = W.mid_planes();
    c.out_chan_stride = s.out_act.cstride;
    c.out_offset = data_offset(s.out_act);
    return c;
  }

  // The 1x1 shortcut conv (every channel, no ReLU): the centre tap of the block's input planes.
  GConvArgs shortcut_args(const BlockWeights& B, const BlockShape& s, const float* in, float* out) const {
    GConvArgs c;
    c.in = in;
    c.geom = s.conv_in;
    c.nch = B.cin;
    c.weight = B.ws.data_ptr<float>();
    c.ldw = B.cin;
    c.rows = rows_.data();
    c.m = B.c;
    c.bias = B.bs.data_ptr<float>();
    c.out = out;
    c.out_chan_stride = s.out_act.cstride;
    c.out_offset = data_offset(s.out_act);
    c.taps = 1;
    c.relu = false;
    return c;
  }

  // conv2: out[A2] = relu(res[A2] + g2 * (W2[A2, A1] a + b2)).
  GConvArgs conv2_args(const BlockWeights& B, const BlockShape& s, const GateState& G, const Workspace& W, float* out,
                       const float* res) const {
    GConvArgs c;
    c.in = W.mid_planes();
    c.geom = s.out_act;
    c.nch = G.k1;
    c.weight = B.w2.data_ptr<float>();
    c.ldw = B.c * kTaps;
    c.rows = G.idx2.data();
    c.cols = G.idx1.data();
    c.m = G.k2;
    c.bias = G.bias2.data();
    c.scale = G.s2.data();
    c.out = out;
    c.residual = res;
    c.out_chans = G.idx2.data();
    c.out_chan_stride = s.out_act.cstride;
    c.out_offset = data_offset(s.out_act);
    return c;
  }

  // Entries [i0, i1) of G.rest, the channels conv2 did not write: relu(res) where gate 2 is
  // closed, and relu(res + g2 * b2) where it is open but conv2 had no input channel (k1 == 0);
  // their sums go to sums[ch].  The ranks split this list, not the channel range, so that each
  // gets as many of these channels as the other whichever channels the gate closed.  In place
  // (out is the block input and res) where nothing is added, the channel is already relu(res),
  // since every block input is a ReLU's output, and its sum is the input's, which gate 1 pooled.
  void finish_channels(const BlockShape& s, const GateState& G, float* out, const float* res, bool in_place,
                       int64_t i0, int64_t i1, float* sums) const {
    const int64_t hw = s.hw(), cs = s.out_act.cstride, off = data_offset(s.out_act);
    for (int64_t i = i0; i < i1; ++i) {
      const int32_t ch = G.rest[i], k = G.pos[ch];
      const float add = k >= 0 ? G.s2[k] * G.bias2[k] : 0.f;
      if (in_place && add == 0.f) {
        sums[ch] = G.in_sums[ch];
        continue;
      }
      float* o = out + ch * cs + off;
      const float* r = res + ch * cs + off;
      for (int64_t i = 0; i < hw; ++i) {
        const float v = r[i] + add;
        o[i] = v < 0.f ? 0.f : v;  // NaN passes through, as torch.relu
      }
      sums[ch] = detail::sum(o, hw);
    }
  }

  at::Tensor stem_w_, stem_b_, fc_w_, fc_b_;
  int64_t stem_stride_ = 1, stem_padding_ = 1;
  bool stem_maxpool_ = false, gconv_stem_ = false;
  std::vector<BlockWeights> blocks_;
  std::vector<int32_t> rows_;  // 0, 1, 2, ...: the shortcut conv's rows
  std::mutex mutex_;
  std::vector<std::unique_ptr<Workspace>> pool_;
};

}  // namespace

void register_cpu_network(torch::Library& m) {
  m.class_<CpuNetwork>("CpuNetwork")
      .def(torch::init<at::Tensor, at::Tensor, std::vector<int64_t>, std::vector<at::Tensor>, std::vector<int64_t>,
                       at::Tensor, at::Tensor, double>())
      .def("forward", &CpuNetwork::forward);
}

}  // namespace manidp
