// The driver shared by the linears over a GGUF's own weight blocks (q4_linear.cpp, q8_linear.cpp):
// weights packed in tiles of 16 output rows (one int32 lane each) by 32-weight blocks of a fixed
// byte size, activations quantized per 32 values (act_blocks.h). Each kernel supplies its tile
// tile struct (Tile::run<MB>, Tile::kBlockBytes); this checks the shapes, walks the tiles in parallel, passes up to kMaxRowsPerPass
// activation rows per walk over a tile, and writes the outputs (plus bias) in x's dtype.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstring>
#include <string>

#include "act_blocks.h"
#include "common.h"
#include "vec16.h"

namespace xllm {

constexpr int64_t kTileRows = 16;      // output rows per tile (one int32 lane each)
constexpr int kMaxRowsPerPass = 4;     // activation rows per pass over a tile's weights (8 measured no faster)

// Tile::run<MB>(weights, blocks, activations, m0, K, acc) fills acc[0..MB) with lane i = output row i
// of the tile for activation rows m0..m0+MB; Tile::kBlockBytes is one tile's 32-weight block.
template <typename Tile>
inline void run_tile(int mb, const uint8_t* w, int64_t blocks, const QuantizedRows& a, int64_t m0, int64_t K,
                     __m512* acc) {
  static_assert(kMaxRowsPerPass == 4, "run_tile dispatches 1..4 rows");
  switch (mb) {
    case 1: Tile::template run<1>(w, blocks, a, m0, K, acc); break;
    case 2: Tile::template run<2>(w, blocks, a, m0, K, acc); break;
    case 3: Tile::template run<3>(w, blocks, a, m0, K, acc); break;
    default: Tile::template run<4>(w, blocks, a, m0, K, acc); break;
  }
}

template <typename T, typename Tile>
void run_tiles(const at::Tensor& x, const at::Tensor& packed, int64_t N, const c10::optional<at::Tensor>& bias,
               at::Tensor& y) {
  constexpr int64_t block_bytes = Tile::kBlockBytes;
  const int64_t M = x.size(0), K = x.size(1), blocks = K / 32, tiles = packed.size(0);
  const QuantizedRows a = quantize_activations(x.data_ptr<T>(), M, K);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    __m512 acc[kMaxRowsPerPass];
    alignas(64) float lanes[kTileRows];
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* w = wp + t * blocks * block_bytes;
      const int64_t n0 = t * kTileRows, rows = std::min(kTileRows, N - n0);
      // Later passes over the tile (a few KB) read it from L1/L2, not memory.
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerPass) {
        const int mb = static_cast<int>(std::min<int64_t>(kMaxRowsPerPass, M - m0));
        run_tile<Tile>(mb, w, blocks, a, m0, K, acc);
        for (int m = 0; m < mb; ++m) {
          _mm512_store_ps(lanes, acc[m]);
          T* out = yp + (m0 + m) * N + n0;
          for (int64_t i = 0; i < rows; ++i) out[i] = from_f32<T>(bp ? lanes[i] + bp[n0 + i] : lanes[i]);
        }
      }
    }
  });
}

// y = x @ W^T (+ bias) for x [M, K] bf16 or fp32 and W packed as [ceil(N/16), K/32, block_bytes] uint8
// (`layout` names the packing for the error messages, e.g. "kernels/q4_pack.py").
template <typename Tile>
at::Tensor tiled_block_linear(const char* name, const char* layout, const at::Tensor& x, const at::Tensor& packed,
                              int64_t out_features, const c10::optional<at::Tensor>& bias) {
  constexpr int64_t block_bytes = Tile::kBlockBytes;
  const std::string who(name);
  TORCH_CHECK(x.dim() == 2, who, ": x must be 2-D");
  const int64_t K = x.size(1), N = out_features;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(2) == block_bytes,
              who, ": packed weights must be contiguous uint8 [tiles, K/32, ", block_bytes, "] (", layout, ")");
  TORCH_CHECK(K % 32 == 0 && packed.size(1) * 32 == K, who, ": K must be 32 x the packed blocks");
  TORCH_CHECK(N > 0 && (N + kTileRows - 1) / kTileRows == packed.size(0), who, ": out_features does not fit the tiles");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N, who, ": bias must be fp32 [N]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              who, ": activations must be bf16 or fp32");
  auto xc = x.contiguous();
  auto y = at::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0) return y;
  if (x.scalar_type() == at::kBFloat16) {
    run_tiles<c10::BFloat16, Tile>(xc, packed, N, bias, y);
  } else {
    run_tiles<float, Tile>(xc, packed, N, bias, y);
  }
  return y;
}

}  // namespace xllm
