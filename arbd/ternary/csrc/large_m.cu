// Packed-ternary forward for many rows of activations, y[m, n] = scale[n] * sum_k x[m, k] t[n, k],
// as one warp-specialised Hopper GEMM that decodes W in its producer (sm_90a: wgmma, TMA).
//
// Why: at large M the default path decodes W into a transient bf16 matrix and calls cuBLAS, so it
// is slower than cuBLAS by the decode (bench/RESULTS.md). Here W never exists in 16 bits outside
// shared memory: the producer warpgroup turns 2-bit trits into bf16 tiles while the two consumer
// warpgroups run wgmma on the tiles before them.
//
// W reaches the kernel as a "pair-word" copy (arbd_pairs_copy below, about 10 us at 7168 x 7168):
// int32 words P[kt][n][q], kt = k // 64, q = 0..3, word q holding trits 16q .. 16q + 15 of that
// 64-wide slice of row n as digits d = trit + 1: digit of trit 16q + 2j at bits 2j, of trit
// 16q + 2j + 1 at bits 16 + 2j (j = 0..7). Masking a shifted word with 0x00030003 and OR-ing it into
// bf16 128.0 gives the pair (128 + d0, 128 + d1); one bf16x2 subtraction of 129 gives the trits.
// Rows past N and columns past K are zero trits (digit 1).
//
// Block: 384 threads = warpgroup 0 (producer) + warpgroups 1, 2 (consumers, 64 output rows each).
// Tile BM x BN x BK = 128 x 256 x 64, STAGES deep ring of (A tile by TMA, B tile by the producer),
// both in the 128-byte-swizzled K-major layout that wgmma reads (row r's 16-byte chunk c at
// r * 128 + ((c ^ (r % 8)) * 16)). full[s] completes when the producer's 128 threads have written
// B and the TMA bytes of A have landed; empty[s] when both consumers' MMAs on it are done.
#include <cstdint>
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

namespace {

constexpr int BM = 128, BN = 256, BK = 64;
constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
constexpr int THREADS = 384;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void bar_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void bar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void bar_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// A box of x (BK columns from k, BM rows from m) into shared memory; completes bytes on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int k, int m) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(k), "r"(m)
      : "memory");
}

// Shared-memory matrix descriptor: 128-byte swizzle, K-major, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// One warpgroup MMA, D[64 x 256] += A[64 x 16] * B[16 x 256], both operands from shared memory.
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(1));
}

// Trits j = 0..3 (chunk half h = 0) or 4..7 (h = 1) of a pair word: four bf16 pairs.
template <int H>
__device__ __forceinline__ uint4 decode_half(uint32_t w) {
  uint32_t p[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t v = ((w >> (2 * (4 * H + j))) & 0x00030003u) | 0x43004300u;
    asm("sub.rn.bf16x2 %0, %1, %2;" : "=r"(p[j]) : "r"(v), "r"(0x43014301u));
  }
  return make_uint4(p[0], p[1], p[2], p[3]);
}

// Row r (0..BN-1) of a B tile from its four pair words.
__device__ __forceinline__ void write_b_row(uint8_t* tile, int r, uint4 words) {
  const uint32_t base = smem_addr(tile) + r * 128;
  const uint32_t w[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 v = h ? decode_half<1>(w[q]) : decode_half<0>(w[q]);
      const int c = 2 * q + h;
      asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(base + ((c ^ (r & 7)) << 4)), "r"(v.x),
                   "r"(v.y), "r"(v.z), "r"(v.w)
                   : "memory");
    }
  }
}

// Probe only (flags & 1): the same stores without the decode.
__device__ __forceinline__ void write_b_row_raw(uint8_t* tile, int r, uint4 words) {
  const uint32_t base = smem_addr(tile) + r * 128;
#pragma unroll
  for (int c = 0; c < 8; ++c)
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(base + ((c ^ (r & 7)) << 4)), "r"(words.x),
                 "r"(words.y), "r"(words.z), "r"(words.w)
                 : "memory");
}

template <int STAGES>
__global__ void __launch_bounds__(THREADS, 1)
    large_m_kernel(const __grid_constant__ CUtensorMap x_map, const uint4* __restrict__ pairs,
                   const uint16_t* __restrict__ scale_table, const int8_t* __restrict__ exponent,
                   uint16_t* __restrict__ y, long long ldy, int M, int N, int n_pad, int k_tiles, int flags) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // The swizzle needs 1024-byte-aligned tiles.
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* sa = smem;
  uint8_t* sb = smem + STAGES * A_BYTES;
  float* s_scale = reinterpret_cast<float*>(sb + STAGES * B_BYTES);
  uint64_t* full = reinterpret_cast<uint64_t*>(s_scale + BN);
  uint64_t* empty = full + STAGES;

  const int n_tiles = (N + BN - 1) / BN;
  const int m0 = (blockIdx.x / n_tiles) * BM;
  const int n0 = (blockIdx.x % n_tiles) * BN;
  const int wg = threadIdx.x / 128;
  const int t = threadIdx.x % 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      bar_init(&full[s], 128);
      bar_init(&empty[s], 2);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // Producer: thread t writes rows t and t + 128 of every B tile; thread 0 also issues A's copy.
    const uint4* src = pairs + n0 + t;
    uint4 next0 = src[0], next1 = src[128];
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int s = kt % STAGES;
      if (kt >= STAGES) bar_wait(&empty[s], ((kt / STAGES) - 1) & 1);
      if (t == 0) {
        bar_expect_bytes(&full[s], A_BYTES);
        tma_load(sa + s * A_BYTES, &x_map, &full[s], kt * BK, m0);
      }
      const uint4 cur0 = next0, cur1 = next1;
      if (kt + 1 < k_tiles) {
        const uint4* nx = src + static_cast<long long>(kt + 1) * n_pad;
        next0 = nx[0];
        next1 = nx[128];
      }
      if (flags & 2) {
        // probe: no B stores at all
      } else if (flags & 1) {
        write_b_row_raw(sb + s * B_BYTES, t, cur0);  // probe: store without decoding
        write_b_row_raw(sb + s * B_BYTES, t + 128, cur1);
      } else {
        write_b_row(sb + s * B_BYTES, t, cur0);
        write_b_row(sb + s * B_BYTES, t + 128, cur1);
      }
      // The tensor cores read these bytes through the async proxy.
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      bar_arrive(&full[s]);
    }
  } else {
    const int c = threadIdx.x - 128;  // 0..255: this thread's column for the scale table
    {
      const int n = n0 + c;
      s_scale[c] = n < N ? __uint_as_float(static_cast<uint32_t>(scale_table[exponent[n] + 128]) << 16) : 0.f;
    }
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int s = kt % STAGES;
      bar_wait(&full[s], (kt / STAGES) & 1);
      const uint32_t a = smem_addr(sa + s * A_BYTES) + (wg - 1) * 64 * 128;
      const uint32_t b = smem_addr(sb + s * B_BYTES);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) wgmma_m64n256k16(acc, sw128_desc(a + kk * 32), sw128_desc(b + kk * 32));
      wgmma_commit();
      wgmma_wait<1>();  // the previous stage's MMAs are done: hand its slot back
      if (kt > 0 && t == 0) bar_arrive(&empty[(kt - 1) % STAGES]);
    }
    wgmma_wait<0>();
    asm volatile("bar.sync 1, 256;" ::: "memory");  // s_scale written by both consumers

    // Accumulator layout of m64nNk16: register 4j + i of thread (warp w, lane l) is row
    // 16w + l/4 (+8 for i >= 2), column 8j + 2(l%4) (+1 for odd i).
    if (flags & 4) {  // probe: no output (keep the sums live so the MMAs stay)
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < 128; ++i) sum += acc[i];
      if (sum == 1.2345f) y[0] = 0;
      return;
    }
    const int w = t / 32, l = t % 32;
    const int row = m0 + (wg - 1) * 64 + w * 16 + l / 4;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = 8 * j + 2 * (l % 4);
      const int n = n0 + col;
      if (n >= N) continue;
      const float s0 = s_scale[col], s1 = s_scale[col + 1];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row + 8 * h;
        if (r >= M) continue;
        uint32_t packed;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(acc[4 * j + 2 * h + 1] * s1), "f"(acc[4 * j + 2 * h] * s0));
        *reinterpret_cast<uint32_t*>(y + r * ldy + n) = packed;  // N is even: n + 1 < N too
      }
    }
  }
}

// P[kt][n][q] from base-3 rows (packed [N, kb], row stride ld): one thread per (n, kt), kt fastest, so
// a warp reads one row's bytes in order.
__global__ void pairs_kernel(const uint8_t* __restrict__ packed, long long ld, int kb, int N, int K, int n_pad,
                             int k_tiles, uint4* __restrict__ out) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<long long>(n_pad) * k_tiles) return;
  const int kt = static_cast<int>(i % k_tiles);
  const int n = static_cast<int>(i / k_tiles);
  uint32_t w[4] = {0x55555555u, 0x55555555u, 0x55555555u, 0x55555555u};  // digit 1 everywhere: trit 0
  if (n < N) {
    const uint8_t* row = packed + n * ld;
    const int k0 = kt * BK;
    int b = k0 / 5, r = k0 % 5;
    uint32_t q = b < kb ? row[b] : 0;
    for (int e = 0; e < r; ++e) q /= 3;
#pragma unroll
    for (int j = 0; j < BK; ++j) {
      const uint32_t d = k0 + j < K ? q % 3 : 1u;
      q /= 3;
      if (++r == 5) {
        r = 0;
        ++b;
        q = b < kb ? row[b] : 0;
      }
      const int word = j / 16, bit = (j % 2) * 16 + 2 * ((j % 16) / 2);
      w[word] = (w[word] & ~(3u << bit)) | (d << bit);
    }
  }
  out[static_cast<long long>(kt) * n_pad + n] = make_uint4(w[0], w[1], w[2], w[3]);
}

template <int STAGES>
int launch(const CUtensorMap& map, const void* pairs, const void* table, const void* exponent, void* y,
           long long ldy, int M, int N, int n_pad, int k_tiles, int flags, cudaStream_t stream) {
  const int smem = STAGES * (A_BYTES + B_BYTES) + BN * 4 + 2 * STAGES * 8 + 1024;
  cudaError_t err = cudaFuncSetAttribute(large_m_kernel<STAGES>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int blocks = ((M + BM - 1) / BM) * ((N + BN - 1) / BN);
  large_m_kernel<STAGES><<<blocks, THREADS, smem, stream>>>(
      map, static_cast<const uint4*>(pairs), static_cast<const uint16_t*>(table),
      static_cast<const int8_t*>(exponent), static_cast<uint16_t*>(y), ldy, M, N, n_pad, k_tiles, flags);
  return cudaGetLastError();
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (fn == nullptr) {
    cudaDriverEntryPointQueryResult found;
    void* p = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) ==
            cudaSuccess &&
        found == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }
  return fn;
}

}  // namespace

extern "C" {

// Rows padded to n_pad (a multiple of 256) and K to k_tiles * 64; out holds k_tiles * n_pad * 16 bytes.
int arbd_pairs_copy(const void* packed, long long ld, int kb, int N, int K, int n_pad, int k_tiles, void* out,
                    void* stream) {
  const long long total = static_cast<long long>(n_pad) * k_tiles;
  const int threads = 256;
  pairs_kernel<<<static_cast<unsigned>((total + threads - 1) / threads), threads, 0,
                 static_cast<cudaStream_t>(stream)>>>(static_cast<const uint8_t*>(packed), ld, kb, N, K, n_pad,
                                                      k_tiles, static_cast<uint4*>(out));
  return cudaGetLastError();
}

// y [M, N] bf16 (row stride ldy) = x [M, K] bf16 (row stride ldx, 16-byte aligned rows) @ W.T, W as
// the pair words of arbd_pairs_copy and scales table[exponent[n] + 128] (bf16). N even, K % 8 == 0.
// flags: 0; the bench's probes set 1 (B stored undecoded), 2 (no B stores), 4 (no output): wrong results.
// Returns 0, a cudaError_t, -1 for unsupported arguments, -2 if the driver has no tensor maps.
int arbd_large_m(const void* x, long long ldx, int M, int K, const void* pairs, int N, int n_pad,
                 const void* table, const void* exponent, void* y, long long ldy, int stages, int flags,
                 void* stream) {
  if (M < 1 || N < 2 || N % 2 || K < 8 || K % 8 || ldx % 8 || ldy % 2 || n_pad % BN || n_pad < N) return -1;
  auto encode = encode_fn();
  if (encode == nullptr) return -2;
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(M)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ldx) * 2};
  const cuuint32_t box[2] = {BK, BM};
  const cuuint32_t elem[2] = {1, 1};
  if (encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(x), dims, strides, box, elem,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return -1;
  const int k_tiles = (K + BK - 1) / BK;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (stages) {
    case 3: return launch<3>(map, pairs, table, exponent, y, ldy, M, N, n_pad, k_tiles, flags, s);
    case 4: return launch<4>(map, pairs, table, exponent, y, ldy, M, N, n_pad, k_tiles, flags, s);
    default: return -1;
  }
}

}  // extern "C"
