// Kernel benchmark: forward_begin + forward_step + forward_end of the CUDA backend over one whole
// sequence (world 1), timed with CUDA events; prints TFLOP/s and writes JSON (-J file).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "attn/cuda/cuda_check.hpp"
#include "ringattn/backend.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/spec.hpp"

namespace {

constexpr int kInitThreads = 256;
constexpr int kInitBlocks = 4096;
constexpr int kDefaultIters = 5;
constexpr int kDefaultWarmup = 1;
constexpr double kMsPerSecond = 1e3;
constexpr double kFlopsPerTflop = 1e12;

// Approximately standard-normal values from a hash (sum of 4 uniforms, rescaled), rounded to bf16.
__global__ void init_normal_bf16(uint16_t* dst, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32) * 40503u;
    float sum = 0.f;
    for (int r = 0; r < 4; ++r) {
      h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
      sum += static_cast<float>(h & 0xFFFFFF) / static_cast<float>(0x1000000);
    }
    const float x = (sum - 2.f) * 1.7320508f;  // variance of a sum of 4 uniforms is 1/3
    const uint32_t bits = __float_as_uint(x);
    dst[i] = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
}

struct Result {
  int64_t seq;
  int head_dim;
  bool causal;
  double ms;
  double tflops;
};

std::vector<int64_t> parse_list(const char* text) {
  std::vector<int64_t> v;
  std::string s(text);
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t comma = s.find(',', pos);
    const std::string item = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (!item.empty()) v.push_back(ringattn::parse_size(item, "--list"));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> seqs = {4096, 8192, 16384, 32768, 65536};
  std::vector<int64_t> dims = {64, 128};
  int heads = 32, iters = kDefaultIters, warmup = kDefaultWarmup;
  std::string json_path;
  bool bhsd = false;  // -L bhsd: q, k, v, out stored (batch, heads, seq, head_dim), viewed as (B, S, H, D)
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "-s") seqs = parse_list(next());
    else if (a == "-d") dims = parse_list(next());
    else if (a == "-H") heads = std::atoi(next());
    else if (a == "-n") iters = std::atoi(next());
    else if (a == "-w") warmup = std::atoi(next());
    else if (a == "-J") json_path = next();
    else if (a == "-L") bhsd = std::string(next()) == "bhsd";
    else {
      std::fprintf(stderr, "usage: %s [-s 4K,16K] [-d 64,128] [-H 32] [-n iters] [-w warmup] [-J out.json] [-L bshd|bhsd]\n", argv[0]);
      return 2;
    }
  }
  // Label of the kernel under test: RINGATTN_FWD_KERNEL (mma | wgmma, unset = the default choice)
  // and, for mma, RINGATTN_FWD_VARIANT (tile variant).
  const char* variant_env = std::getenv("RINGATTN_FWD_VARIANT");
  const char* kernel_env = std::getenv("RINGATTN_FWD_KERNEL");
  const char* sm90_env = std::getenv("RINGATTN_SM90_VARIANT");
  std::string variant = std::string(kernel_env ? kernel_env : "default") +
                              (variant_env ? std::string("-v") + variant_env : "") +
                              (sm90_env ? std::string("-s") + sm90_env : "");
  if (const char* sections = std::getenv("RINGATTN_FWD_SECTION_HEADS")) variant += std::string("-sec") + sections;
  if (bhsd) variant += "-bhsd";
  cudaDeviceProp prop{};
  RINGATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# kernel_bench: %s, %d SMs, bf16, batch 1, %d heads, kernel %s, median of %d after %d warm-up\n",
              prop.name, prop.multiProcessorCount, heads, variant.c_str(), iters, warmup);
  std::printf("# %8s %5s %7s %10s %9s\n", "tokens", "hdim", "causal", "ms", "TFLOP/s");
  std::vector<Result> results;
  for (int64_t d : dims) {
    for (int64_t s : seqs) {
      ringattn::AttentionSpec spec;
      spec.seq_len = s;
      spec.heads = heads;
      spec.kv_heads = heads;
      spec.head_dim = static_cast<int>(d);
      spec.dtype = ringattn::DType::kBF16;
      auto backend = ringattn::make_cuda_backend();
      const int64_t n = s * heads * d;
      std::vector<void*> bufs(4);
      for (void*& b : bufs) b = backend->allocate(n * sizeof(uint16_t));
      float* lse = static_cast<float*>(backend->allocate(s * heads * sizeof(float)));
      auto* stream = static_cast<cudaStream_t>(backend->stream());
      for (int t = 0; t < 3; ++t) {
        init_normal_bf16<<<kInitBlocks, kInitThreads, 0, stream>>>(static_cast<uint16_t*>(bufs[t]), n, 977u * (t + 1));
        RINGATTN_CUDA_CHECK_LAUNCH("init_normal_bf16");
      }
      auto view = [&](void* p) {
        ringattn::TensorView v = ringattn::make_view(p, ringattn::DType::kBF16, ringattn::Device::kCuda, {1, s, heads, d});
        if (bhsd) v.stride = {heads * s * d, d, s * d, 1};  // each head's rows contiguous, as torch's (B, H, S, D)
        return v;
      };
      const ringattn::TensorView lse_view = ringattn::make_view(lse, ringattn::DType::kF32, ringattn::Device::kCuda, {1, heads, s});
      const ringattn::ChunkPositions pos = ringattn::chunk_positions(ringattn::Layout::kContiguous, s, 0, 1);
      for (bool causal : {false, true}) {
        spec.mask.causal = causal;
        backend->prepare(spec, s, s);
        std::vector<double> times;
        for (int it = 0; it < warmup + iters; ++it) {
          backend->reset_marks();
          backend->mark();
          backend->forward_begin(view(bufs[0]), pos);
          backend->forward_step(view(bufs[1]), view(bufs[2]), pos);
          backend->forward_end(view(bufs[3]), lse_view);
          backend->mark();
          const std::vector<double> ms = backend->synchronize_and_read_marks();
          if (it >= warmup) times.push_back(ms[1]);
        }
        std::sort(times.begin(), times.end());
        const double ms = times[times.size() / 2];
        const double tflops = ringattn::forward_flops(spec) / (ms / kMsPerSecond) / kFlopsPerTflop;
        results.push_back({s, static_cast<int>(d), causal, ms, tflops});
        std::printf("  %8lld %5lld %7s %10.3f %9.1f\n", static_cast<long long>(s), static_cast<long long>(d),
                    causal ? "yes" : "no", ms, tflops);
        std::fflush(stdout);
      }
    }
  }
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << "[\n";
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      out << "  {\"impl\": \"ringattn\", \"variant\": \"" << variant << "\", \"device\": \"" << prop.name
          << "\", \"S\": " << r.seq << ", \"H\": " << heads << ", \"D\": " << r.head_dim
          << ", \"causal\": " << (r.causal ? "true" : "false") << ", \"fwd_ms\": " << r.ms
          << ", \"fwd_tflops\": " << r.tflops << "}" << (i + 1 < results.size() ? ",\n" : "\n");
    }
    out << "]\n";
  }
  return 0;
}
