// Packed-ternary forward for many rows of activations, y[m, n] = scale[n] * sum_k x[m, k] t[n, k],
// as one persistent warp-specialised Hopper GEMM that decodes W in registers (sm_90a: wgmma, TMA).
//
// Why: at large M the default path decodes W into a transient bf16 matrix and calls cuBLAS, so it is
// slower than cuBLAS by the decode (bench/RESULTS.md). Here W never exists in 16 bits outside
// registers. The product is computed transposed, y^T = W x^T: W's rows are wgmma's M side, taken
// from registers, and x is the B operand, copied by TMA into shared memory. A first version that
// decoded W into shared memory in a producer warpgroup ran at 0.68x cuBLAS: the producer's stores
// and decode were the bottleneck (RESULTS, "Large-M fused forward").
//
// W reaches the kernel as "fragment words" (arbd_frags_copy below): 2 bits per trit, laid out so
// that each consumer thread finds the 32 trits it needs for one 64-wide K slice in 8 bytes.
// F[nt][kt][c][h] (uint32): block tile nt of 128 rows, K slice kt, consumer thread c = 128 cw + 32 w
// + 4 g + q (warpgroup cw, warp w, lane 4 g + q), h = 0 / 1 for W row 64 cw + 16 w + g (+ 8). Pair
// j = 2 s + e (s = 0..3 the k16 step, e = 0..1) holds trits k = 64 kt + 16 s + 2 q + 8 e and k + 1 as
// digits trit + 1 at bits 2 j and 16 + 2 j: exactly mma.m16n8k16's A fragment order. Masking a
// shifted word with 0x00030003 and OR-ing it into bf16 128.0 gives (128 + d0, 128 + d1); one bf16x2
// subtraction of 129 gives the trits. Rows past N and columns past K are zero trits (digit 1).
//
// Block: 384 threads. Warpgroup 0 is the producer (one thread issues, per stage, the TMA copy of a
// 256-token x tile and a 2 KB bulk copy of the fragment words); warpgroups 1 and 2 each own 64 W
// rows of a 128 x 256 output tile, decode their fragments and issue wgmma while the previous
// stage's MMAs run. The grid is persistent (one block per SM walking the tiles), so the producer
// fills the next tile's stages while the consumers write the last tile out through shared memory.
#include <cstdint>
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

namespace {

constexpr int BN = 128;                 // W rows per tile: 2 consumer warpgroups x 64
constexpr int BM = 256;                 // tokens per tile (wgmma's N)
constexpr int BK = 64;                  // K per stage: 128 bytes of bf16, one swizzle row
constexpr int X_BYTES = BM * BK * 2;    // 32 KB
constexpr int F_BYTES = 256 * 8;        // 8 bytes of fragment words per consumer thread
constexpr int E_HALF = BM * 128;        // one consumer's output tile: 256 tokens x 64 W rows, bf16
constexpr int E_BYTES = 2 * E_HALF;
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

__device__ __forceinline__ void bar_arrive_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
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

// A box of y (64 columns from n, BM rows from m) out of shared memory; clipped at y's edges.
__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int n, int m) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.tile.bulk_group [%0, {%2, %3}], [%1];" ::"l"(map),
               "r"(smem_addr(src)), "r"(n), "r"(m)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

// Shared-memory matrix descriptor: 128-byte swizzle, K-major, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }

// One warpgroup MMA, D[64 x 256] += A[64 x 16] * B[16 x 256]: A (W's trits, bf16) from registers in
// the mma.m16n8k16 fragment order per warp, B (x) from shared memory.
__device__ __forceinline__ void wgmma_rs(float (&d)[128], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
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
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db), "r"(1));
}

// Pair j of a fragment word as two bf16 trits.
__device__ __forceinline__ uint32_t trit_pair(uint32_t w, int j) {
  const uint32_t v = ((w >> (2 * j)) & 0x00030003u) | 0x43004300u;
  uint32_t r;
  asm("sub.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(v), "r"(0x43014301u));
  return r;
}

// Waits until at most N wgmma groups are pending, then "reads" the A registers of the groups it
// waited for, in stores whose predicate is never true (`never` is 0 at run time, which the compiler
// cannot know). wgmma reads A asynchronously, and nothing else tells the register allocator that
// these registers are busy until the wait: without a later use it reuses them at once, and the
// MMAs in flight read whatever lands there (seen: rel err 1e23 from two K slices on).
template <int N>
__device__ __forceinline__ void wgmma_wait_keep(const uint32_t (&a)[16], uint32_t sink, int never) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %18, 0;\n"
      "wgmma.wait_group.sync.aligned %16;\n"
      "@p st.shared.v4.b32 [%17], {%0, %1, %2, %3};\n"
      "@p st.shared.v4.b32 [%17], {%4, %5, %6, %7};\n"
      "@p st.shared.v4.b32 [%17], {%8, %9, %10, %11};\n"
      "@p st.shared.v4.b32 [%17], {%12, %13, %14, %15};\n"
      "}\n" ::"r"(a[0]),
      "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(a[4]), "r"(a[5]), "r"(a[6]), "r"(a[7]), "r"(a[8]), "r"(a[9]),
      "r"(a[10]), "r"(a[11]), "r"(a[12]), "r"(a[13]), "r"(a[14]), "r"(a[15]), "n"(N), "r"(sink), "r"(never)
      : "memory");
}

// One stage of a consumer: decode 8 bytes of fragment words into a, issue the four k16 MMAs.
__device__ __forceinline__ void mma_stage(float (&acc)[128], uint32_t (&a)[16], uint32_t w0, uint32_t w1,
                                          uint32_t x_tile) {
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    a[4 * s + 0] = trit_pair(w0, 2 * s);
    a[4 * s + 1] = trit_pair(w1, 2 * s);
    a[4 * s + 2] = trit_pair(w0, 2 * s + 1);
    a[4 * s + 3] = trit_pair(w1, 2 * s + 1);
  }
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < 4; ++s)
    wgmma_rs(acc, a[4 * s], a[4 * s + 1], a[4 * s + 2], a[4 * s + 3], sw128_desc(x_tile + 32 * s));
  wgmma_commit();
}

// Fragment words from base-3 rows (packed [N, kb], row stride ld). A unit is one 128-row tile by
// UNIT_SLICES = 5 K slices: 320 trits, exactly 64 bytes of every row, so no byte is shared between
// units. A unit is made in four pieces of 32 rows, one warp each: rows 32 a .. 32 a + 31 of a tile
// are exactly the rows of consumer threads 64 a .. 64 a + 63. A warp turns each (row, 16-byte
// chunk) into five words of 2-bit digits in K order in shared memory, then picks each consumer
// thread's 8 bytes per K slice out of two rows, a warp's stores contiguous.
constexpr int UNIT_SLICES = 5;
constexpr int UNIT_BYTES = UNIT_SLICES * BK / 5;  // 64 bytes of each row
constexpr int NAT_WORDS = UNIT_SLICES * 4;        // 20 words (320 digits) per row; a pitch of 20
                                                  // words keeps both passes free of bank conflicts
constexpr int PIECE_ROWS = 32;
constexpr int PIECE_WORDS = PIECE_ROWS * NAT_WORDS;

// The byte -> five 2-bit digits table (codes[b] bits 2 e, 2 e + 1 = digit e of b).
__device__ __forceinline__ void fill_codes(uint32_t* codes, int tid, int nthreads) {
  for (int b = tid; b < 256; b += nthreads) {
    uint32_t v = b, code = 0;
    for (int e = 0; e < 5; ++e, v /= 3) code |= (v % 3) << (2 * e);
    codes[b] = code;
  }
}

// Lane q's fragment word for one K slice of a row, from the row's 64 digits in order (v: 16 per
// word). Group s holds q's digits 2q, 2q+1 at bits 4q and 2q+8, 2q+9 at bits 16 + 4q; gathered at
// bits 4 s and 16 + 4 s, one swap of 2-bit fields (d(2q+1) with d(2q+8)) gives the pair order.
__device__ __forceinline__ uint32_t fragment_word(const uint4 v, int q) {
  const int sh = 4 * q;
  const uint32_t y = ((v.x >> sh) & 0x000F000Fu) | (((v.y >> sh) & 0x000F000Fu) << 4) |
                     (((v.z >> sh) & 0x000F000Fu) << 8) | (((v.w >> sh) & 0x000F000Fu) << 12);
  const uint32_t t = ((y >> 14) ^ y) & 0x0000CCCCu;
  return y ^ t ^ (t << 14);
}

// Piece a of unit (nt, kg) by the 32 lanes of one warp. codes filled; nat: PIECE_WORDS words of
// shared memory owned by this warp. Lane l takes chunk l % 4 of rows l / 4 + 8 i (i = 0..3), all
// four chunks' loads issued before any is used (the latency of memory is the cost here).
__device__ void convert_piece(const uint8_t* __restrict__ packed, long long ld, int kb, int N, int K, int k_tiles,
                              uint32_t* __restrict__ out, int nt, int kg, int a, const uint32_t* codes, uint32_t* nat,
                              int lane) {
  const int ch = lane % 4, b0 = kg * UNIT_BYTES + ch * 16, t0 = 5 * b0;  // the chunk's first byte and trit
  // A chunk's 16 bytes come as five aligned words, shifted into place, when those 20 bytes lie
  // inside packed and the chunk inside its row; byte by byte otherwise (rows' ends, odd views).
  const uintptr_t lo = reinterpret_cast<uintptr_t>(packed), hi = lo + (N - 1) * ld + kb;
  uint32_t raw[4][5];
  bool fast[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int n = nt * BN + PIECE_ROWS * a + lane / 4 + 8 * i;
    const uintptr_t at = lo + n * ld + b0, base = at & ~uintptr_t(3);
    fast[i] = n < N && b0 + 16 <= kb && base >= lo && base + 20 <= hi;
    if (fast[i]) {
#pragma unroll
      for (int j = 0; j < 5; ++j) raw[i][j] = reinterpret_cast<const uint32_t*>(base)[j];
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int rr = lane / 4 + 8 * i, n = nt * BN + PIECE_ROWS * a + rr;
    uint32_t w[4];  // the chunk's bytes, little-endian
    if (fast[i]) {
      const int sh = 8 * static_cast<int>((lo + n * ld + b0) & 3);
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = __funnelshift_r(raw[i][j], raw[i][j + 1], sh);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = 0x79797979u;  // 121: five digits 1, trit 0
      if (n < N) {
        const uint8_t* src = packed + n * ld + b0;
#pragma unroll
        for (int j = 0; j < 16; ++j)
          if (b0 + j < kb)
            w[j / 4] = (w[j / 4] & ~(0xFFu << (8 * (j % 4)))) | (static_cast<uint32_t>(src[j]) << (8 * (j % 4)));
      }
    }
    uint32_t wd[5];
    uint64_t acc = 0;
    int bits = 0, wi = 0;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      acc |= static_cast<uint64_t>(codes[(w[j / 4] >> (8 * (j % 4))) & 0xFFu]) << bits;
      bits += 10;
      if (bits >= 32) {
        wd[wi++] = static_cast<uint32_t>(acc);
        acc >>= 32;
        bits -= 32;
      }
    }
    if (n >= N) {
#pragma unroll
      for (int j = 0; j < 5; ++j) wd[j] = 0x55555555u;
    } else if (t0 + 80 > K) {  // digits past K (a last byte's spare digits) become trit 0
#pragma unroll
      for (int j = 0; j < 5; ++j) {
        const int valid = K - t0 - 16 * j;
        if (valid <= 0) {
          wd[j] = 0x55555555u;
        } else if (valid < 16) {
          const uint32_t keep = (1u << (2 * valid)) - 1;
          wd[j] = (wd[j] & keep) | (0x55555555u & ~keep);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 5; ++j) nat[rr * NAT_WORDS + ch * 5 + j] = wd[j];
  }
  __syncwarp();
  const int slices = min(UNIT_SLICES, k_tiles - kg * UNIT_SLICES);
#pragma unroll 1
  for (int item = lane; item < slices * 64; item += 32) {
    const int kl = item / 64, c = 64 * a + item % 64;
    const int rr = 16 * ((c % 64) / 32) + (c % 32) / 4, q = c % 4;  // rows rr, rr + 8 of the piece
    const uint4 upper = *reinterpret_cast<const uint4*>(nat + rr * NAT_WORDS + 4 * kl);
    const uint4 lower = *reinterpret_cast<const uint4*>(nat + (rr + 8) * NAT_WORDS + 4 * kl);
    *reinterpret_cast<uint2*>(out + ((static_cast<long long>(nt) * k_tiles + kg * UNIT_SLICES + kl) * 256 + c) * 2) =
        make_uint2(fragment_word(upper, q), fragment_word(lower, q));
  }
}

__global__ void __launch_bounds__(128) frags_kernel(const uint8_t* __restrict__ packed, long long ld, int kb,
                                                    int N, int K, int k_tiles, uint32_t* __restrict__ out) {
  __shared__ __align__(16) uint32_t smem[256 + 4 * PIECE_WORDS];
  fill_codes(smem, threadIdx.x, 128);
  __syncthreads();
  const int warp = threadIdx.x / 32;
  convert_piece(packed, ld, kb, N, K, k_tiles, out, blockIdx.x, blockIdx.y, warp, smem, smem + 256 + warp * PIECE_WORDS,
                threadIdx.x % 32);
}

template <int STAGES>
__global__ void __launch_bounds__(THREADS, 1)
    large_m_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap y_map,
                   const uint32_t* __restrict__ frags, const uint16_t* __restrict__ scale_table,
                   const int8_t* __restrict__ exponent, int M, int N, int k_tiles, int flags) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // The swizzle needs 1024-byte-aligned tiles.
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* sx = smem;
  uint8_t* sf = sx + STAGES * X_BYTES;
  uint8_t* se = sf + STAGES * F_BYTES;
  uint64_t* full = reinterpret_cast<uint64_t*>(se + E_BYTES);
  uint64_t* empty = full + STAGES;

  const int n_tiles = (N + BN - 1) / BN;
  const int tiles = n_tiles * ((M + BM - 1) / BM);

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      bar_init(&full[s], 1);
      bar_init(&empty[s], 2);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x != 0) return;
    int it = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int m0 = (tile / n_tiles) * BM, nt = tile % n_tiles;
      for (int kt = 0; kt < k_tiles; ++kt, ++it) {
        const int s = it % STAGES;
        if (it >= STAGES) bar_wait(&empty[s], ((it / STAGES) - 1) & 1);
        bar_arrive_expect(&full[s], X_BYTES + F_BYTES);
        tma_load(sx + s * X_BYTES, &x_map, &full[s], kt * BK, m0);
        bulk_load(sf + s * F_BYTES, frags + (static_cast<long long>(nt) * k_tiles + kt) * (F_BYTES / 4), F_BYTES,
                  &full[s]);
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int c = threadIdx.x - 128;  // consumer thread 0..255
  const int t = c % 128, w = t / 32, l = t % 32, g = l / 4;
  const int r0 = (c / 128) * 64 + 16 * w + g;  // this thread's W rows in the tile: r0, r0 + 8
  const int never = flags & 0x100;  // 0: see wgmma_wait_keep
  const uint32_t sink = smem_addr(se);
  int it = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int m0 = (tile / n_tiles) * BM, n0 = (tile % n_tiles) * BN;
    // The row scales, loaded now (two dependent loads) and used after the K loop.
    const int na = n0 + r0, nb = na + 8;
    const float sa = na < N ? __uint_as_float(static_cast<uint32_t>(scale_table[exponent[na] + 128]) << 16) : 0.f;
    const float sb = nb < N ? __uint_as_float(static_cast<uint32_t>(scale_table[exponent[nb] + 128]) << 16) : 0.f;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    // Two register sets for W's fragments, alternating: one stage's MMAs read theirs while the
    // next stage decodes into the other.
    uint32_t a0[16], a1[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) a0[i] = a1[i] = 0;
    auto stage = [&](uint32_t(&a)[16], const uint32_t(&a_prev)[16], int kt) {
      const int s = it % STAGES;
      bar_wait(&full[s], (it / STAGES) & 1);
      uint32_t w0, w1;
      asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(w0), "=r"(w1) : "r"(smem_addr(sf + s * F_BYTES + 8 * c)));
      mma_stage(acc, a, w0, w1, smem_addr(sx + s * X_BYTES));
      wgmma_wait_keep<1>(a_prev, sink, never);  // the previous stage's MMAs are done: hand its slot back
      if (kt > 0 && t == 0) bar_arrive(&empty[(it - 1) % STAGES]);
      ++it;
    };
    for (int kt = 0; kt < k_tiles; kt += 2) {
      stage(a0, a1, kt);
      if (kt + 1 < k_tiles) stage(a1, a0, kt + 1);
    }
    wgmma_wait_keep<0>(a0, sink, never);
    wgmma_wait_keep<0>(a1, sink, never);
    if (t == 0) bar_arrive(&empty[(it - 1) % STAGES]);
    if (flags & 4) continue;  // probe: no output

    // Out through shared memory: each consumer writes its 64 W rows x 256 tokens transposed, as
    // y's 128-byte-swizzled box, with stmatrix, and one thread hands the box to TMA, which
    // writes it while the next tile's MMAs run. The box must have been read out first.
    uint8_t* e_half = se + (c / 128) * E_HALF;
    if (t == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    asm volatile("bar.sync %0, 128;" ::"r"(2 + c / 128) : "memory");
    // Accumulator 4 j + i: W row r0 (+8 for i >= 2), token 8 j + 2 q (+1 for odd i). Each 8 x 8
    // block (8 tokens, 8 W rows) is one stmatrix matrix; lane L gives the address of token row L % 8
    // of matrix L / 8 (j + (L / 8) / 2, upper W rows if L / 8 is odd).
    const int lt = l % 8, lm = l / 8;
#pragma unroll
    for (int j = 0; j < BM / 8; j += 2) {
      uint32_t v[4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int jj = j + mi / 2, hi = mi % 2;
        const float sc = hi ? sb : sa;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;"
            : "=r"(v[mi])
            : "f"(acc[4 * jj + 2 * hi + 1] * sc), "f"(acc[4 * jj + 2 * hi] * sc));
      }
      const int tok = 8 * (j + lm / 2) + lt, chunk = 2 * w + lm % 2;
      asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(
                       smem_addr(e_half + tok * 128 + ((chunk ^ (tok & 7)) << 4))),
                   "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
                   : "memory");
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // TMA reads what stmatrix wrote
    asm volatile("bar.sync %0, 128;" ::"r"(2 + c / 128) : "memory");
    if (t == 0) tma_store(&y_map, e_half, n0 + 64 * (c / 128), m0);
  }
  if (t == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");  // stores done before exit
}

template <int STAGES>
int launch(const CUtensorMap& x_map, const CUtensorMap& y_map, const void* frags, const void* table,
           const void* exponent, int M, int N, int k_tiles, int sms, int flags, cudaStream_t stream) {
  const int smem = STAGES * (X_BYTES + F_BYTES) + E_BYTES + 2 * STAGES * 8 + 1024;
  cudaError_t err = cudaFuncSetAttribute(large_m_kernel<STAGES>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int tiles = ((M + BM - 1) / BM) * ((N + BN - 1) / BN);
  large_m_kernel<STAGES><<<tiles < sms ? tiles : sms, THREADS, smem, stream>>>(
      x_map, y_map, static_cast<const uint32_t*>(frags), static_cast<const uint16_t*>(table),
      static_cast<const int8_t*>(exponent), M, N, k_tiles, flags);
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

// A 2-D bf16 tensor map over [rows, cols] (row stride ld elements) with box_cols x box_rows boxes
// and the 128-byte swizzle.
bool bf16_map(CUtensorMap* map, const void* base, int rows, int cols, long long ld, int box_cols, int box_rows) {
  auto encode = encode_fn();
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, elem,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

extern "C" {

// Fragment words of W (packed [N, kb] base-3 rows, row stride ld) for K columns: rows padded to
// n_pad (a multiple of 128), K to k_tiles * 64; out holds n_pad / 128 * k_tiles * 2048 bytes.
int arbd_frags_copy(const void* packed, long long ld, int kb, int N, int K, int n_pad, int k_tiles, void* out,
                    void* stream) {
  if (n_pad % BN || n_pad < N || k_tiles * BK < K || kb * 5 < K) return -1;
  const dim3 grid(n_pad / BN, (k_tiles + UNIT_SLICES - 1) / UNIT_SLICES);
  frags_kernel<<<grid, 128, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<const uint8_t*>(packed), ld, kb, N,
                                                                    K, k_tiles, static_cast<uint32_t*>(out));
  return cudaGetLastError();
}

// y [M, N] bf16 (row stride ldy) = x [M, K] bf16 (row stride ldx) @ W.T, W as the fragment words of
// arbd_frags_copy and scales table[exponent[n] + 128] (bf16). x and y 16-byte aligned, K, ldx and
// ldy multiples of 8. sms: the persistent grid's size. flags: 0; the bench's probe sets 4 (no
// output: wrong results); 0x100 must stay clear (wgmma_wait_keep).
// Returns 0, a cudaError_t, -1 for unsupported arguments, -2 if the driver has no tensor maps.
int arbd_large_m(const void* x, long long ldx, int M, int K, const void* frags, int N, const void* table,
                 const void* exponent, void* y, long long ldy, int stages, int sms, int flags, void* stream) {
  if (M < 1 || N < 1 || K < 8 || K % 8 || ldx % 8 || ldy % 8 || sms < 1 ||
      reinterpret_cast<uintptr_t>(x) % 16 || reinterpret_cast<uintptr_t>(y) % 16)
    return -1;
  if (encode_fn() == nullptr) return -2;
  CUtensorMap x_map, y_map;
  if (!bf16_map(&x_map, x, M, K, ldx, BK, BM) || !bf16_map(&y_map, y, M, N, ldy, 64, BM)) return -1;
  const int k_tiles = (K + BK - 1) / BK;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (stages) {
    case 3: return launch<3>(x_map, y_map, frags, table, exponent, M, N, k_tiles, sms, flags, s);
    case 4: return launch<4>(x_map, y_map, frags, table, exponent, M, N, k_tiles, sms, flags, s);
    default: return -1;
  }
}

}  // extern "C"
