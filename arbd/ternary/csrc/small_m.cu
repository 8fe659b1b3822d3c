// Packed-ternary forward for few rows of activations: y[m, n] = scale[n] * sum_k x[m, k] * t[n, k]
// for M <= 16, read straight from the base-3 packed bytes (arbd/ternary/packing.py). Written by
// hand to get past the Triton kernel's issue-bound limit at this shape (bench/RESULTS.md, "Small-M
// packed-ternary forward"): each warp keeps its activation fragments in registers across several
// row tiles, decodes two packed bytes per 32-bit register and feeds mma.sync from registers. As it
// stands it is not faster than the Triton kernel (RESULTS, "CUDA small-M kernel"), so it is opt-in
// (ARBD_CUDA_SMALL_M=on, arbd/ternary/cuda_small_m.py).
//
// Work split. A block owns BN = WARPS * 16 * R consecutive rows of W and one of `splits` equal
// ranges of packed bytes (a whole number of 16-byte chunks). Its activations for that range are
// copied once into shared memory, already in the order the MMA fragments want. Each warp owns R
// tiles of 16 rows; per chunk a thread reads one 4-byte word of rows g and g + 8 of every tile.
//
// Fragment mapping (mma.m16n8k16, A = trits [16 rows x 16 k], B = x^T [16 k x 8 tokens]). Thread
// (g = lane / 4, q = lane % 4) holds bytes 4q .. 4q + 3 of the chunk for its rows. Digit d of
// bytes (4q, 4q + 1) is the A pair at MMA columns (2q, 2q + 1), digit d of bytes (4q + 2, 4q + 3)
// the pair at (2q + 8, 2q + 9): the five digits give five MMAs over 80 trits, and the matching
// activations are x[tok, 5 * byte + d] for the same bytes, staged so that each thread loads its
// B fragments with a few wide shared-memory reads.
//
// Split-K. The blocks of one row range form a thread-block cluster (Hopper); each leaves its
// partial sums in its own shared memory and the cluster adds them through distributed shared
// memory in a fixed order: one launch, no global workspace, a deterministic result.
#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>

namespace cg = cooperative_groups;

namespace {

// Decode constants (both 16-bit lanes), as in triton_kernels._DECODE2_ASM: BIAS (128 / 1024, whose
// last mantissa bit is worth 1), THIRD, C, -3, 1, OFS = 2 * BIAS - 1, -(BIAS + 1).
struct Bf16Consts {
  static constexpr uint32_t BIAS = 0x43004300u, THIRD = 0x3EAB3EABu, CC = 0x42AA42AAu,
                            NEG3 = 0xC040C040u, ONE = 0x3F803F80u, CADD = 0x437F437Fu,
                            CSUB = 0xC301C301u;
};
struct Fp16Consts {
  static constexpr uint32_t BIAS = 0x64006400u, THIRD = 0x35553555u, CC = 0x61556155u,
                            NEG3 = 0xC200C200u, ONE = 0x3C003C00u, CADD = 0x67FF67FFu,
                            CSUB = 0xE401E401u;
};

template <bool BF>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  if constexpr (BF) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}

// The five trit planes of a word of four packed bytes B0..B3: lo[d] = (digit d of B0, of B1) and
// hi[d] = (digit d of B2, of B3), each as two 16-bit floats in {-1, 0, 1}. Exact for every byte
// 0..242 (checked for all of them in tests/test_cuda_small_m.py); bytes 243..255 give finite junk.
template <bool BF>
__device__ __forceinline__ void decode_word(uint32_t w, uint32_t (&lo)[5], uint32_t (&hi)[5]) {
  using C = typename std::conditional<BF, Bf16Consts, Fp16Consts>::type;
  const uint32_t l = __byte_perm(w, 0, 0x4140), h = __byte_perm(w, 0, 0x4342);
  // q // 3 = (q * 171) >> 9 per 16-bit lane (no carry between lanes: 255 * 171 < 2**16).
  const uint32_t ql = ((l * 171u) >> 9) & 0x007F007Fu, qh = ((h * 171u) >> 9) & 0x007F007Fu;
  lo[0] = fma2<BF>((l - 3u * ql) | C::BIAS, C::ONE, C::CSUB);
  hi[0] = fma2<BF>((h - 3u * qh) | C::BIAS, C::ONE, C::CSUB);
  uint32_t ul = ql | C::BIAS, uh = qh | C::BIAS;  // BIAS + quotient, as floats
#pragma unroll
  for (int d = 1; d < 4; ++d) {
    const uint32_t nl = fma2<BF>(ul, C::THIRD, C::CC), nh = fma2<BF>(uh, C::THIRD, C::CC);
    lo[d] = fma2<BF>(fma2<BF>(nl, C::NEG3, ul), C::ONE, C::CADD);
    hi[d] = fma2<BF>(fma2<BF>(nh, C::NEG3, uh), C::ONE, C::CADD);
    ul = nl;
    uh = nh;
  }
  lo[4] = fma2<BF>(ul, C::ONE, C::CSUB);
  hi[4] = fma2<BF>(uh, C::ONE, C::CSUB);
}

// A float sum as the output's 16-bit pattern (bf16 or fp16, round to nearest).
template <bool BF>
__device__ __forceinline__ uint16_t to_16bit(float v) {
  return BF ? __bfloat16_as_ushort(__float2bfloat16(v)) : __half_as_ushort(__float2half(v));
}

template <bool BF>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (BF) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Shared memory: the block's packed rows (copies of the 16-byte-aligned blocks that cover each
// row's range, row stride `row_words`), then its activations in fragment order.
__host__ __device__ constexpr int padded_row_words(int chunks) {
  // (chunks + 1) 16-byte blocks cover a row's 16 * chunks bytes at any alignment; their count is
  // made odd so that the row stride is 4 mod 8 words: rows g = 0..7 then start 4 * odd banks
  // apart, and the 32 lanes' word loads hit 32 different banks.
  return 4 * ((chunks + 1) | 1);
}

// Words per row of the region that holds the weight copies, and afterwards the partial sums.
__host__ __device__ constexpr int weight_words(int chunks) {
  return padded_row_words(chunks) > 16 ? padded_row_words(chunks) : 16;
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src));
}

template <bool BF, int R, int WARPS, int MT>
__global__ void __launch_bounds__(WARPS * 32)
small_m_kernel(const uint16_t* __restrict__ x, long long stride_xm, int M, int K,
               const uint8_t* __restrict__ w, long long N, int Kb, const int8_t* __restrict__ e,
               float inv_k, uint16_t* __restrict__ y, long long stride_ym, int splits, int chunks,
               int flags) {
  // flags (bench/gpu_gemm_small_m.py's phase timings only; 0 otherwise): 1 = stop after the MMAs
  // (no partial sums, no output), 2 = skip the MMA loop, 4 = skip staging x, 8 = skip loading W.
  constexpr int BN = WARPS * 16 * R;
  constexpr int THREADS = WARPS * 32;
  extern __shared__ __align__(16) uint32_t smem[];
  const int row_words = padded_row_words(chunks);
  uint32_t* wsm = smem;                                                  // [BN][row_words]
  uint16_t* xs = reinterpret_cast<uint16_t*>(smem + BN * weight_words(chunks));  // [chunks][32][MT][5][4]

  // The `splits` blocks of a row range form one cluster; sp is this block's rank in it.
  const int nb = blockIdx.x / splits, sp = blockIdx.x % splits;
  const int c0 = sp * chunks * 16;  // first packed byte (of every row) of this block's range
  const int nbytes = chunks * 16;
  const long long n_begin = (long long)nb * BN;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int row0 = warp * 16 * R;  // within the block

  // 1. Every packed byte of the block in flight at once, each warp copying its own rows: the
  //    16-byte-aligned blocks that cover a row's range, in two groups (blocks of the first half of
  //    the chunks, then the rest), so DRAM latency is paid about once per block, not per chunk.
  //    Blocks past the buffer's end are clamped to its last one; they only meet zero activations.
  const int nblk = chunks + 1, half = (chunks + 1) / 2;
  const uintptr_t last16 = (reinterpret_cast<uintptr_t>(w) + uintptr_t(N * Kb - 1)) & ~uintptr_t(15);
#pragma unroll
  for (int grp = 0; grp < 2; ++grp) {
    if (flags & 8) break;
    const int lo = grp == 0 ? 0 : half + 1, hi = grp == 0 ? half + 1 : nblk;  // block range
    // Lane l copies block lo + l % width of rows l / width, l / width + 32 / width, ...
    const int width = hi - lo, step = 32 / width;  // width <= 17 blocks (see the launch)
    const int blk = lo + lane % width;
    if (lane < step * width) {
      for (int rr = lane / width; rr < 16 * R; rr += step) {
        const long long n = min(n_begin + row0 + rr, N - 1);
        const uintptr_t a = ((reinterpret_cast<uintptr_t>(w) + uintptr_t(n * Kb + c0)) & ~uintptr_t(15)) + 16 * blk;
        cp_async16(wsm + (row0 + rr) * row_words + 4 * blk, reinterpret_cast<const void*>(min(a, last16)));
      }
    }
    asm volatile("cp.async.commit_group;");
  }

  // 2. Activations, staged while the weights are in flight: element (tok, byte b, digit d) goes to
  //    xs[((b / 16 * 32 + lane(tok % 8, b / 4 % 4)) * MT + tok / 8) * 20 + 4 d + b % 4]; zero outside
  //    x (tokens >= M, positions >= K). Eight tokens per batch, all loads before the stores.
  for (int b = threadIdx.x; b < ((flags & 4) ? 0 : nbytes); b += THREADS) {
    const long long k0 = 5LL * (c0 + b);
    uint16_t* dst = xs + ((((b >> 4) * 32 + ((b >> 2) & 3)) * MT) * 20 + (b & 3));
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      uint16_t v[8][5];
#pragma unroll
      for (int gg = 0; gg < 8; ++gg) {
        const int tok = 8 * t + gg;
        const uint16_t* src = x + (tok < M ? tok * stride_xm : 0) + k0;
#pragma unroll
        for (int d = 0; d < 5; ++d) v[gg][d] = (tok < M && k0 + d < K) ? src[d] : uint16_t(0);
      }
#pragma unroll
      for (int gg = 0; gg < 8; ++gg)
#pragma unroll
        for (int d = 0; d < 5; ++d) dst[(4 * gg * MT + t) * 20 + 4 * d] = v[gg][d];
    }
  }

  // Where each of this thread's rows starts in its copy: word offset and byte shift (in bits).
  unsigned shift[R][2];
  const uint32_t* rw[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 16 * r + g + 8 * h;
      const long long n = min(n_begin + row, N - 1);
      const unsigned mis = unsigned((reinterpret_cast<uintptr_t>(w) + uintptr_t(n * Kb + c0)) & 15);
      shift[r][h] = (mis & 3) * 8;
      rw[r][h] = wsm + row * row_words + (mis >> 2) + q;
    }

  float acc[R][MT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][t][i] = 0.f;

  asm volatile("cp.async.wait_group 1;");
  __syncthreads();
  for (int ch = 0; ch < ((flags & 2) ? 0 : chunks); ++ch) {
    if (ch == half) {  // the second group's blocks start at chunk `half`
      asm volatile("cp.async.wait_group 0;");
      __syncthreads();
    }
    uint32_t xf[MT][10];
    if constexpr (MT == 2) {
      const uint4* src = reinterpret_cast<const uint4*>(xs) + (ch * 32 + lane) * 5;
#pragma unroll
      for (int i = 0; i < 5; ++i) {
        const uint4 v = src[i];
        uint32_t* f = &xf[0][0] + 4 * i;
        f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
      }
    } else {
      const uint2* src = reinterpret_cast<const uint2*>(xs) + (ch * 32 + lane) * 5;
#pragma unroll
      for (int i = 0; i < 5; ++i) {
        const uint2 v = src[i];
        xf[0][2 * i] = v.x;
        xf[0][2 * i + 1] = v.y;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      uint32_t lo0[5], hi0[5], lo1[5], hi1[5];
      const uint32_t w0 = __funnelshift_r(rw[r][0][4 * ch], rw[r][0][4 * ch + 1], shift[r][0]);
      const uint32_t w1 = __funnelshift_r(rw[r][1][4 * ch], rw[r][1][4 * ch + 1], shift[r][1]);
      decode_word<BF>(w0, lo0, hi0);
      decode_word<BF>(w1, lo1, hi1);
#pragma unroll
      for (int d = 0; d < 5; ++d)
#pragma unroll
        for (int t = 0; t < MT; ++t)
          mma16816<BF>(acc[r][t], lo0[d], lo1[d], hi0[d], hi1[d], xf[t][2 * d], xf[t][2 * d + 1]);
    }
  }

  if (flags & 1) {
    asm volatile("cp.async.wait_group 0;");
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < MT; ++t) sum += acc[r][t][0] + acc[r][t][1] + acc[r][t][2] + acc[r][t][3];
    if (sum == 1234.5f) y[0] = 0;  // keeps the MMAs alive
    return;
  }

  // 3. Split-K through distributed shared memory: each block writes its partial sums over the
  //    weight copies, part[row][16] with slot 4 q + 2 t + i holding token 8 t + 2 q + i (a thread's
  //    values for one row are contiguous); then block sp of the cluster adds rows sp, sp + splits,
  //    ... of every block's part in rank order (deterministic), scales, casts and writes y.
  asm volatile("cp.async.wait_group 0;");
  __syncthreads();  // every warp is done reading the weight copies
  float* part = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float* dst = part + (row0 + 16 * r + g + 8 * h) * 16 + 4 * q;
      if constexpr (MT == 2) {
        *reinterpret_cast<float4*>(dst) = make_float4(acc[r][0][2 * h], acc[r][0][2 * h + 1],
                                                      acc[r][1][2 * h], acc[r][1][2 * h + 1]);
      } else {
        *reinterpret_cast<float2*>(dst) = make_float2(acc[r][0][2 * h], acc[r][0][2 * h + 1]);
      }
    }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  // Four threads per row, one float4 of slots each (slots 4 j .. 4 j + 3: tokens 2 j, 2 j + 1,
  // 8 + 2 j, 9 + 2 j).
  const int j = threadIdx.x & 3;
  for (int rr = sp + splits * (threadIdx.x >> 2); rr < BN; rr += splits * (THREADS / 4)) {
    const long long n = n_begin + rr;
    if (n >= N) break;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int b = 0; b < splits; ++b) {
      const float4 v = *reinterpret_cast<const float4*>(cluster.map_shared_rank(part + rr * 16 + 4 * j, b));
      sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
    }
    const float scale = exp2f(float(e[n]) * inv_k);
    const float vals[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = 8 * (i >> 1) + 2 * j + (i & 1);
      if (tok < M) {
        y[tok * stride_ym + n] = to_16bit<BF>(vals[i] * scale);
      }
    }
  }
  cluster.sync();  // no block may leave while another still reads its part
}

template <bool BF, int R, int WARPS, int MT>
int launch(const void* x, long long sxm, int M, int K, const void* w, long long N, int Kb,
           const void* e, float inv_k, void* y, long long sym, int splits, int chunks, int flags,
           cudaStream_t stream) {
  constexpr int BN = WARPS * 16 * R;
  const long long blocks = (N + BN - 1) / BN * splits;
  const size_t smem = size_t(BN) * weight_words(chunks) * 4 + size_t(chunks) * 32 * MT * 20 * 2;
  auto kernel = small_m_kernel<BF, R, WARPS, MT>;
  static size_t allowed = 48 * 1024;  // per instantiation: raise the limits once, as needed
  static bool non_portable = false;
  if (smem > allowed) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return int(err);
    allowed = smem;
  }
  if (splits > 8 && !non_portable) {  // clusters of 9..16 blocks are Hopper-only
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return int(err);
    non_portable = true;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(blocks));
  cfg.blockDim = dim3(WARPS * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(splits);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, static_cast<const uint16_t*>(x), sxm, M, K,
                                       static_cast<const uint8_t*>(w), N, Kb, static_cast<const int8_t*>(e),
                                       inv_k, static_cast<uint16_t*>(y), sym, splits, chunks, flags);
  return int(err != cudaSuccess ? err : cudaGetLastError());
}

template <bool BF, int R, int WARPS>
int launch_mt(int M, const void* x, long long sxm, int K, const void* w, long long N, int Kb,
              const void* e, float inv_k, void* y, long long sym, int splits, int chunks, int flags,
              cudaStream_t s) {
  if (M <= 8) return launch<BF, R, WARPS, 1>(x, sxm, M, K, w, N, Kb, e, inv_k, y, sym, splits, chunks, flags, s);
  return launch<BF, R, WARPS, 2>(x, sxm, M, K, w, N, Kb, e, inv_k, y, sym, splits, chunks, flags, s);
}

template <bool BF>
int launch_shape(int R, int warps, int M, const void* x, long long sxm, int K, const void* w,
                 long long N, int Kb, const void* e, float inv_k, void* y, long long sym,
                 int splits, int chunks, int flags, cudaStream_t s) {
#define ARBD_SHAPE(RR, WW)                                                                        \
  if (R == RR && warps == WW)                                                                     \
    return launch_mt<BF, RR, WW>(M, x, sxm, K, w, N, Kb, e, inv_k, y, sym, splits, chunks, flags, s);
  ARBD_SHAPE(1, 8) ARBD_SHAPE(2, 4) ARBD_SHAPE(2, 8) ARBD_SHAPE(4, 4) ARBD_SHAPE(4, 8)
#undef ARBD_SHAPE
  return -1;
}

// ---------------------------------------------------------------------------------------------
// The same product from a tile-major copy of W (tiled_kernel). small_m_kernel above spends its
// time in phases that do not overlap (all loads, then all decoding, then the cluster sums; RESULTS,
// "CUDA small-M kernel"). Re-ordering W's bytes once, for as long as W does not change, removes the
// reasons for those phases:
//  - Layout (cuda_small_m.tile_major). W is cut into tiles of 16 rows and super-blocks of 80 trits
//    (k = 80 J .. 80 J + 79). Lane (g, q) of a warp owns, in super-block J, the 20 trits
//    k = 80 J + 16 s + 4 q + i (s = 0..4, i = 0..3) of rows g and g + 8; byte i of its 32-bit word
//    for a row holds digit s = trit (80 J + 16 s + 4 q + i) + 1. Two super-blocks of both rows make
//    one 16-byte load per lane, and a warp's 32 loads are 512 contiguous bytes.
//  - The MMA's k column c (pair q = (c % 8) / 2, element i = c % 2 + 2 (c / 8)) in step s is trit
//    80 J + 16 s + 4 q + i, so decode_word's planes are the A registers as they come, and the B
//    registers (x^T) for token g are x[g, 80 J + 16 s + 4 q .. + 3]: one 8-byte load from x as it
//    is, no staging, and the four lanes of a token read one 32-byte sector. (A first version with
//    k = 80 J + 20 q + 4 s + i spread each load over four sectors: about 0.3 us slower at M = 16.)
//  - No phases: each warp streams its weights with loads D super-block pairs ahead of the decode,
//    and the warps of a block that split K add their sums once through shared memory at the end.
template <int MT>
__device__ __forceinline__ void load_x(uint2 (&xf)[MT][5], const uint16_t* const (&xr)[MT],
                                       const bool (&live)[MT], int k0, int K) {
  // k0 = 80 J + 4 q: this lane's first trit in the super-block; step s reads k0 + 16 s .. + 3.
  if (k0 + 68 <= K) {
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int s = 0; s < 5; ++s)
        xf[t][s] = live[t] ? __ldg(reinterpret_cast<const uint2*>(xr[t] + k0 + 16 * s)) : make_uint2(0u, 0u);
  } else {  // the row's tail: positions past K read as zero (W is zero there, x may be anything)
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int s = 0; s < 5; ++s) {
        uint32_t v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int k = k0 + 16 * s + i;
          v[i] = (live[t] && k < K) ? uint32_t(xr[t][k]) : 0u;
        }
        xf[t][s] = make_uint2(v[0] | (v[1] << 16), v[2] | (v[3] << 16));
      }
  }
}

template <bool BF, int R, int WN, int WK, int MT, int D, int FL>
__global__ void __launch_bounds__(WN * WK * 32, 1)
tiled_kernel(const uint16_t* __restrict__ x, long long stride_xm, int M, int K,
             const uint4* __restrict__ wt, int P, int tiles, long long N, const int8_t* __restrict__ e,
             float inv_k, uint16_t* __restrict__ y, long long stride_ym) {
  // A block: WN groups of R row tiles (BN rows) x WK ranges of super-block pairs; warp (wn, wk).
  // FL (probe variants, for bench/gpu_gemm_small_m.py's attribution only; their output is not the
  // product): 1 = no MMAs (the decoded planes are folded into the sums by XOR), 2 = no decode (the
  // raw words go to the MMAs as A). FL & 4 is not a probe: it prefetches W into L2 (below).
  constexpr int BN = WN * R * 16, THREADS = WN * WK * 32, PAD = 17;  // PAD: conflict-free sums
  __shared__ float part[WK * BN * PAD];
  // Programmatic dependent launch (when launched with it; no-ops otherwise): the next kernel in the
  // stream may start as soon as every block of this one has, and this one may start its W loads
  // while the kernel before it finishes. Only W is read before griddepcontrol.wait below; W is the
  // tile-major copy, which torch ops write, and they never let a dependent start early.
  asm volatile("griddepcontrol.launch_dependents;");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int wn = warp % WN, wk = warp / WN;
  const int tile0 = (blockIdx.x * WN + wn) * R;
  const int p0 = int((long long)wk * P / WK), p1 = int((long long)(wk + 1) * P / WK);

  const uint4* src[R];
#pragma unroll
  for (int r = 0; r < R; ++r) src[r] = wt + (long long)min(tile0 + r, tiles - 1) * P * 32 + lane;
  const uint16_t* xr[MT];
  bool live[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    live[t] = g + 8 * t < M;
    xr[t] = x + (live[t] ? (g + 8 * t) * stride_xm : 0);
  }
  float acc[R][MT][4] = {};

  // Loads D pairs ahead: buf[i] holds pair p + i while pair p is decoded.
  uint4 buf[D][R];
#pragma unroll
  for (int i = 0; i < D; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) buf[i][r] = p0 + i < p1 ? __ldcs(src[r] + (long long)(p0 + i) * 32) : make_uint4(0, 0, 0, 0);
  if constexpr (FL & 4) {
    // The rest of this warp's W range towards L2 in one bulk request per tile, while the previous
    // kernel may still run: later loads then wait for L2, not DRAM.
    if (lane == 0 && p1 > p0 + D)
#pragma unroll
      for (int r = 0; r < R; ++r)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src[r] + (long long)(p0 + D) * 32),
                     "r"(unsigned(p1 - p0 - D) * 512u) : "memory");
  }
  asm volatile("griddepcontrol.wait;" ::: "memory");  // x and y: after the previous kernel is done

  for (int p = p0; p < p1; p += D) {
#pragma unroll
    for (int i = 0; i < D; ++i) {
      if (p + i >= p1) break;  // warp-uniform
      uint4 v[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        v[r] = buf[i][r];
        if (p + i + D < p1) buf[i][r] = __ldcs(src[r] + (long long)(p + i + D) * 32);
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        uint2 xf[MT][5];
        load_x<MT>(xf, xr, live, 80 * (2 * (p + i) + u) + 4 * q, K);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          uint32_t lg[5], hg[5], l8[5], h8[5];
          if constexpr (FL & 2) {
#pragma unroll
            for (int s = 0; s < 5; ++s) {
              lg[s] = (u ? v[r].z : v[r].x) + s; hg[s] = lg[s] ^ 7u;
              l8[s] = (u ? v[r].w : v[r].y) + s; h8[s] = l8[s] ^ 7u;
            }
          } else {
            decode_word<BF>(u ? v[r].z : v[r].x, lg, hg);  // row g
            decode_word<BF>(u ? v[r].w : v[r].y, l8, h8);  // row g + 8
          }
#pragma unroll
          for (int s = 0; s < 5; ++s)
#pragma unroll
            for (int t = 0; t < MT; ++t) {
              if constexpr (FL & 1) {
                acc[r][t][0] = __uint_as_float(__float_as_uint(acc[r][t][0]) ^ lg[s] ^ l8[s] ^ xf[t][s].x);
                acc[r][t][1] = __uint_as_float(__float_as_uint(acc[r][t][1]) ^ hg[s] ^ h8[s] ^ xf[t][s].y);
              } else {
                mma16816<BF>(acc[r][t], lg[s], l8[s], hg[s], h8[s], xf[t][s].x, xf[t][s].y);
              }
            }
        }
      }
    }
  }

  // C fragment: acc[r][t] = rows (g, g, g + 8, g + 8) x tokens (8 t + 2 q, + 1, 8 t + 2 q, + 1).
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = (wn * R + r) * 16 + g + 8 * (i >> 1), tok = 8 * t + 2 * q + (i & 1);
        part[(wk * BN + row) * PAD + tok] = acc[r][t][i];
      }
  __syncthreads();
  const long long n0 = (long long)blockIdx.x * BN;
  // Sum the WK partials in a fixed order (deterministic), scale, cast; consecutive threads write
  // consecutive n of one token's output row.
  for (int idx = threadIdx.x; idx < BN * M; idx += THREADS) {
    const int tok = idx / BN, row = idx % BN;
    const long long n = n0 + row;
    if (n >= N) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WK; ++w) sum += part[(w * BN + row) * PAD + tok];
    y[tok * stride_ym + n] = to_16bit<BF>(sum * exp2f(float(e[n]) * inv_k));
  }
}

template <bool BF, int R, int WN, int WK, int D, int FL>
int launch_tiled(int M, const void* x, long long sxm, int K, const void* wt, int P, int tiles, long long N,
                 const void* e, float inv_k, void* y, long long sym, int pdl, cudaStream_t stream) {
  const unsigned blocks = unsigned((tiles + WN * R - 1) / (WN * R));
  const auto* xp = static_cast<const uint16_t*>(x);
  const auto* wp = static_cast<const uint4*>(wt);
  const auto* ep = static_cast<const int8_t*>(e);
  auto* yp = static_cast<uint16_t*>(y);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(WN * WK * 32);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t err = M <= 8
      ? cudaLaunchKernelEx(&cfg, tiled_kernel<BF, R, WN, WK, 1, D, FL>, xp, sxm, M, K, wp, P, tiles, N, ep, inv_k, yp, sym)
      : cudaLaunchKernelEx(&cfg, tiled_kernel<BF, R, WN, WK, 2, D, FL>, xp, sxm, M, K, wp, P, tiles, N, ep, inv_k, yp, sym);
  return int(err != cudaSuccess ? err : cudaGetLastError());
}

// (R, WN, WK, D, FL) compiled in, in the order arbd_tiled_m's `variant` indexes them.
#define ARBD_TILED_VARIANTS(X) \
  X(2, 1, 8, 2, 4) X(2, 1, 8, 2, 0) X(2, 2, 8, 2, 4) X(1, 2, 8, 2, 4) X(4, 1, 8, 2, 4) \
  X(2, 1, 8, 2, 5) X(2, 1, 8, 2, 6) X(2, 1, 8, 2, 7)

template <bool BF>
int launch_tiled_variant(int variant, int M, const void* x, long long sxm, int K, const void* wt, int P,
                         int tiles, long long N, const void* e, float inv_k, void* y, long long sym,
                         int pdl, cudaStream_t s) {
  int i = 0;
#define ARBD_TILED_CASE(R, WN, WK, D, FL) \
  if (variant == i++) return launch_tiled<BF, R, WN, WK, D, FL>(M, x, sxm, K, wt, P, tiles, N, e, inv_k, y, sym, pdl, s);
  ARBD_TILED_VARIANTS(ARBD_TILED_CASE)
#undef ARBD_TILED_CASE
  return -1;
}

}  // namespace

extern "C" {

// Row-tile shapes compiled in: (R, warps) pairs, as launch_shape lists them.
int arbd_small_m_shapes(int* out, int cap) {
  const int shapes[] = {1, 8, 2, 4, 2, 8, 4, 4, 4, 8};
  const int n = int(sizeof(shapes) / sizeof(int));
  for (int i = 0; i < n && i < cap; ++i) out[i] = shapes[i];
  return n / 2;
}

// y [M, N] (row stride sym) = x [M, K] (row stride sxm) @ W.T for W given as packed [N, Kb] uint8
// (contiguous) and int8 exponents e [N]; splits (1..16, the cluster size) blocks per row range,
// each over `chunks` (1..16) 16-byte chunks of every row. flags: 0 (phase switches for timing, see
// the kernel). Returns 0, a cudaError_t, or -1 for a shape or split that is not supported.
int arbd_small_m(int bf16, int R, int warps, int M, const void* x, long long sxm, int K,
                 const void* w, long long N, int Kb, const void* e, float inv_k, void* y,
                 long long sym, int splits, int chunks, int flags, void* stream) {
  if (M < 1 || M > 16 || splits < 1 || splits > 16 || chunks < 1 || chunks > 16) return -1;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return bf16 ? launch_shape<true>(R, warps, M, x, sxm, K, w, N, Kb, e, inv_k, y, sym, splits, chunks, flags, s)
              : launch_shape<false>(R, warps, M, x, sxm, K, w, N, Kb, e, inv_k, y, sym, splits, chunks, flags, s);
}

// The tiled variants compiled in: 5 ints (R, WN, WK, D, FL) each, in variant order.
int arbd_tiled_m_variants(int* out, int cap) {
  int n = 0;
#define ARBD_TILED_LIST(R, WN, WK, D, FL) \
  if (n + 5 <= cap) { out[n] = R; out[n + 1] = WN; out[n + 2] = WK; out[n + 3] = D; out[n + 4] = FL; } n += 5;
  ARBD_TILED_VARIANTS(ARBD_TILED_LIST)
#undef ARBD_TILED_LIST
  return n / 5;
}

// y [M, N] = x [M, K] @ W.T with W as its tile-major copy wt [tiles, P, 32] x 16 bytes
// (cuda_small_m.tile_major) and int8 exponents e [N]. x must be 8-byte aligned with a row stride
// that is a multiple of 4 elements. pdl: launch with programmatic dependent launch (see the kernel).
// Returns 0, a cudaError_t, or -1 for an unknown variant or M.
int arbd_tiled_m(int bf16, int variant, int M, const void* x, long long sxm, int K, const void* wt,
                 int P, int tiles, long long N, const void* e, float inv_k, void* y, long long sym,
                 int pdl, void* stream) {
  if (M < 1 || M > 16) return -1;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return bf16 ? launch_tiled_variant<true>(variant, M, x, sxm, K, wt, P, tiles, N, e, inv_k, y, sym, pdl, s)
              : launch_tiled_variant<false>(variant, M, x, sxm, K, wt, P, tiles, N, e, inv_k, y, sym, pdl, s);
}

}  // extern "C"
