// Touched-row ternary update: rule.apply_votes on the distinct rows idx of a TernaryMatrix, in
// place (arbd/ternary/cuda_rows.py drives it; triton_update._row_block is the Triton twin and
// rule.apply_votes the reference). Rows of at most 64 trits (the codebooks' 64).
//
// Layout. A warp updates four rows at once: eight lanes per row, lane j of a row owning columns
// 8j .. 8j + 7. So each warp-wide load or store touches four rows, which keeps many sectors in
// flight per memory request (a warp per row, tried first, ran 25% slower than the Triton kernel,
// whose blocks have the same shape: bench/RESULTS.md, "Touched-row update, round 3"). Votes (most
// of the bytes) of four consecutive touched rows are contiguous, read as 16-byte loads that skip
// the caches; trit accumulators as one 8-byte load per lane.
// - decode: the lane's eight columns lie in at most three packed bytes (8j / 5 onwards), which it
//   loads itself; digit c % 5 of byte c / 5 comes out by a multiply-shift.
// - encode: a byte's five columns 5b .. 5b + 4 span at most two lanes. The lane holding column 5b
//   writes it, adding the next lane's share (one shuffle); lane 7's last byte (columns 60 .. 64)
//   ends in column 64, which no row here has: it packs as trit 0, as pack_trits pads.
// Each warp walks groups of four rows, ROWS groups at a time with all their loads issued before
// any arithmetic. Flip and move counts gather in registers and reach global memory as one atomic
// per block.
//
// Integer arithmetic only; divisions act on magnitudes (truncation toward zero, as torch's
// rounding_mode="trunc"), so every byte equals the torch rule's.
#include <cstdint>
#include <cuda_runtime.h>

namespace {

// The matrix's buffers and the update's inputs (cuda_rows.py documents them).
struct Buffers {
  uint8_t* packed;
  int8_t *t_acc, *expo, *e_acc;
  const int64_t* idx;
  const void* votes;  // int8, int16 or int32: the kernel's V
  const int32_t* e_votes;
  int* stats;
  long long u;
  long long sp, st, se, sea;  // row strides (elements) of packed, t_acc, expo, e_acc
  int cols, nb;
  bool votes_vec, acc_vec;  // every row's votes / accumulators load eight columns at a time
};

struct Rule {
  int threshold, decay, freeze, cap, acc_max, scales, s_threshold;
  int memory_only;  // bench only: the same loads and stores, no rule (the access pattern's floor)
};

__device__ __forceinline__ int trunc_div(int a, int d) {
  int q = abs(a) / d;
  return a < 0 ? -q : q;
}

__device__ __forceinline__ int clampi(int v, int lo, int hi) { return min(max(v, lo), hi); }

// rule.apply_votes for one trit: returns its move's size; q becomes the new digit (trit + 1) and
// acc the new accumulator. The move n = trunc(acc / threshold) clamped to -1 - trit .. 1 - trit
// lies in -2 .. 2, so two comparisons stand in for the division.
__device__ __forceinline__ int settle(int& acc, int trit, int& q, const Rule& p) {
  int mag = abs(acc) >= 2 * p.threshold ? 2 : abs(acc) >= p.threshold ? 1 : 0;
  int n = clampi(acc < 0 ? -mag : mag, -1 - trit, 1 - trit);
  trit += n;
  acc -= n * p.threshold;
  if (p.cap < p.acc_max) {
    if (trit == 1 && acc > p.cap) acc = p.cap;
    else if (trit == -1 && acc < -p.cap) acc = -p.cap;
  }
  acc = clampi(acc, -p.acc_max, p.acc_max);
  q = trit + 1;
  return abs(n);
}

// acc - trunc(acc / 2**shift): the rule's accumulator decay.
__device__ __forceinline__ int decay(int a, int shift) {
  int q = abs(a) >> shift;
  return a - (a < 0 ? -q : q);
}

// rule.apply_votes for a row's scale: its accumulator ea (decayed) takes the scale votes ev and
// becomes the new accumulator; returns the exponent's move, which keeps e + move an int8.
__device__ __forceinline__ int settle_scale(int& ea, int e, int ev, const Rule& p) {
  int s = ea;
  if (p.decay > 0) s = decay(s, p.decay);
  s += ev;
  const int m = clampi(trunc_div(s, p.s_threshold), -128 - e, 127 - e);
  ea = clampi(s - m * p.s_threshold, -p.acc_max, p.acc_max);
  return m;
}

// Eight int8 values of two 32-bit words, sign-extended, and back.
__device__ __forceinline__ void unpack8(int2 w, int (&v)[8]) {
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = ((k < 4 ? w.x : w.y) << (24 - 8 * (k % 4))) >> 24;
}

__device__ __forceinline__ int2 pack8(const int (&v)[8]) {
  int2 w;
  w.x = (v[0] & 0xFF) | (v[1] & 0xFF) << 8 | (v[2] & 0xFF) << 16 | v[3] << 24;
  w.y = (v[4] & 0xFF) | (v[5] & 0xFF) << 8 | (v[6] & 0xFF) << 16 | v[7] << 24;
  return w;
}

// Eight consecutive votes (16-byte aligned for 16- and 32-bit votes, 8-byte for 8-bit), read past
// the caches: they are used once.
template <typename V>
__device__ __forceinline__ void load8(const V* p, int (&v)[8]) {
  if constexpr (sizeof(V) == 4) {
    int4 a = __ldcs(reinterpret_cast<const int4*>(p)), b = __ldcs(reinterpret_cast<const int4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else if constexpr (sizeof(V) == 2) {
    int4 a = __ldcs(reinterpret_cast<const int4*>(p));
    int w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = (w[k] << 16) >> 16;
      v[2 * k + 1] = w[k] >> 16;
    }
  } else {
    unpack8(__ldcs(reinterpret_cast<const int2*>(p)), v);
  }
}

__device__ __forceinline__ int pow3(int d) { return d == 0 ? 1 : d == 1 ? 3 : d == 2 ? 9 : d == 3 ? 27 : 81; }

// One atomic per block: warp sums, then the block's in shared memory.
__device__ __forceinline__ void add_counts(int flips, int moves, int* stats, int scales) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    flips += __shfl_xor_sync(0xffffffffu, flips, o);
    moves += __shfl_xor_sync(0xffffffffu, moves, o);
  }
  __shared__ int block_sum[2];
  if (threadIdx.x == 0) block_sum[0] = block_sum[1] = 0;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(&block_sum[0], flips);
    atomicAdd(&block_sum[1], moves);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(stats, block_sum[0]);
    if (scales) atomicAdd(stats + 1, block_sum[1]);
  }
}

template <typename V, int ROWS>
__global__ void __launch_bounds__(256) rows_kernel(Buffers buf, Rule p) {
  uint8_t* __restrict__ packed = buf.packed;
  int8_t* __restrict__ t_acc = buf.t_acc;
  int8_t* __restrict__ expo = buf.expo;
  int8_t* __restrict__ e_acc = buf.e_acc;
  const int64_t* __restrict__ idx = buf.idx;
  const V* __restrict__ votes = static_cast<const V*>(buf.votes);
  const int32_t* __restrict__ e_votes = buf.e_votes;
  const long long u = buf.u;
  const int cols = buf.cols, nb = buf.nb;
  const long long sp = buf.sp, st = buf.st, se = buf.se, sea = buf.sea;
  const bool votes_vec = buf.votes_vec, acc_vec = buf.acc_vec;
  const int lane = threadIdx.x & 31, grp = lane >> 3, j = lane & 7;
  const long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
  const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
  const long long groups = (u + 3) >> 2;
  const int c_first = 8 * j, b_lo = c_first / 5;
  // The byte holding column c_first + 7 runs into the next lane when it ends past it.
  const int t_end = (c_first + 7) / 5 - b_lo;
  const bool spills = 5 * (b_lo + t_end) + 4 > c_first + 7;
  // The lane writes the bytes whose first column it holds.
  auto owns = [&](int b) { return b < nb && 5 * b >= c_first && 5 * b <= c_first + 7; };
  int flips = 0, moves = 0;

  for (long long g0 = warp; g0 < groups; g0 += warps * ROWS) {
    int64_t row[ROWS];
    bool live[ROWS];
    int v[ROWS][8], a[ROWS][8], by[ROWS][3], e[ROWS], ea[ROWS], ev[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const long long r = (g0 + (long long)i * warps) * 4 + grp;
      live[i] = g0 + (long long)i * warps < groups && r < u;
      row[i] = live[i] ? (int64_t)__ldcs(reinterpret_cast<const long long*>(idx) + r) : 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) v[i][k] = 0;
      if (live[i] && !p.freeze && c_first < cols) {
        if (votes_vec) {
          load8(votes + r * cols + c_first, v[i]);
        } else {
#pragma unroll
          for (int k = 0; k < 8; ++k)
            if (c_first + k < cols) v[i][k] = votes[r * cols + c_first + k];
        }
      }
      ev[i] = live[i] && p.scales ? __ldcs(e_votes + r) : 0;
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
#pragma unroll
      for (int t = 0; t < 3; ++t)
        by[i][t] = live[i] && b_lo + t < nb ? packed[row[i] * sp + b_lo + t] : 121;
#pragma unroll
      for (int k = 0; k < 8; ++k) a[i][k] = 0;
      if (live[i] && !p.freeze && c_first < cols) {
        const int8_t* src = t_acc + row[i] * st + c_first;
        if (acc_vec) {
          unpack8(*reinterpret_cast<const int2*>(src), a[i]);
        } else {
#pragma unroll
          for (int k = 0; k < 8; ++k)
            if (c_first + k < cols) a[i][k] = src[k];
        }
      }
      e[i] = live[i] && p.scales ? expo[row[i] * se] : 0;
      ea[i] = live[i] && p.scales ? e_acc[row[i] * sea] : 0;
    }
    if (p.memory_only) {  // write back what was read: the floor of this access pattern
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        if (!live[i]) continue;
        if (c_first < cols && acc_vec) {
          int2 w = pack8(a[i]);
          w.x ^= v[i][0] & 0x01010101;  // keep the votes' loads alive
          *reinterpret_cast<int2*>(t_acc + row[i] * st + c_first) = w;
        }
#pragma unroll
        for (int t = 0; t < 3; ++t) {
          const int b = b_lo + t;
          if (owns(b)) packed[row[i] * sp + b] = by[i][t];
        }
        if (j == 0 && p.scales) {
          expo[row[i] * se] = e[i];
          e_acc[row[i] * sea] = ea[i] ^ (ev[i] & 1);
        }
      }
      continue;
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      int part[3] = {0, 0, 0};  // this lane's share of bytes b_lo .. b_lo + 2
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int c = c_first + k, t = c / 5 - b_lo, d = c % 5, p3 = pow3(d);
        int x = t == 0 ? by[i][0] : t == 1 ? by[i][1] : by[i][2];
        x = x > 242 ? 121 : x;  // bytes above 242 are not base-3 trits: decode as zeros
        const int trit = ((x * ((65535 + p3) / p3)) >> 16) % 3 - 1;
        int acc = a[i][k];
        if (!p.freeze) {  // frozen rows: accumulators zero, no votes (the rule's freeze)
          if (p.decay > 0) acc = decay(acc, p.decay);
          acc += v[i][k];
        }
        int q;
        flips += live[i] ? settle(acc, trit, q, p) : 0;
        // Columns past the row read trit 0, accumulator 0 and vote 0 (so they move nothing) and
        // pack as trit 0.
        if (c >= cols) q = 1;
        a[i][k] = acc;
        part[0] += t == 0 ? q * p3 : 0;
        part[1] += t == 1 ? q * p3 : 0;
        part[2] += t == 2 ? q * p3 : 0;
      }
      // Frozen rows were read as zero and stay zero: the rule zeroes their accumulators.
      if (live[i] && c_first < cols) {
        int8_t* dst = t_acc + row[i] * st + c_first;
        if (acc_vec) {
          *reinterpret_cast<int2*>(dst) = pack8(a[i]);
        } else {
#pragma unroll
          for (int k = 0; k < 8; ++k)
            if (c_first + k < cols) dst[k] = (int8_t)a[i][k];
        }
      }
      // Byte b_lo starts in the previous lane unless column c_first is its first: then the
      // previous lane takes this lane's share of it.
      const int head = 5 * b_lo == c_first ? 0 : part[0];
      const int from_next = __shfl_down_sync(0xffffffffu, head, 1);
      const int extra = j < 7 ? from_next : 81;  // lane 7: column 64, trit 0 (digit 1) x 3**4
      if (spills) {
        part[0] += t_end == 0 ? extra : 0;
        part[1] += t_end == 1 ? extra : 0;
        part[2] += t_end == 2 ? extra : 0;
      }
#pragma unroll
      for (int t = 0; t < 3; ++t) {
        const int b = b_lo + t;
        if (live[i] && owns(b)) packed[row[i] * sp + b] = (uint8_t)part[t];
      }
      if (p.scales && live[i]) {
        int s = ea[i];
        const int m = settle_scale(s, e[i], ev[i], p);
        if (j == 0) {
          expo[row[i] * se] = (int8_t)(e[i] + m);
          e_acc[row[i] * sea] = (int8_t)s;
          moves += abs(m);
        }
      }
    }
  }
  add_counts(flips, moves, buf.stats, p.scales);
}

template <typename V>
int launch(int rows, int blocks, cudaStream_t stream, const Buffers& buf, const Rule& p) {
  switch (rows) {
    case 1: rows_kernel<V, 1><<<blocks, 256, 0, stream>>>(buf, p); break;
    case 2: rows_kernel<V, 2><<<blocks, 256, 0, stream>>>(buf, p); break;
    case 4: rows_kernel<V, 4><<<blocks, 256, 0, stream>>>(buf, p); break;
    default: return -2;
  }
  return (int)cudaGetLastError();
}


// ---------------------------------------------------------------------------------------------
// Rows of 64 trits kept as row records (arbd/ternary/state.row_records: t_acc in bytes 0..63,
// packed trits 64..76, exponent 77, e_acc 78, record stride a multiple of 16): one lane per row.
// Every column index is then a compile-time constant, so decoding is a multiply-shift per digit
// and packing a multiply-add, where the four-rows-per-warp kernel above spends most of its
// instructions on lane-dependent byte and digit positions (ncu: 228 M instructions for 1 M rows
// against 42 M for its loads and stores alone).
//
// Memory. A warp takes 32 consecutive touched rows (a tile): their votes are one contiguous block
// and each record five contiguous 16-byte words, so consecutive lanes copy consecutive words into
// shared memory with cp.async (each lane reading its own row instead touched 32 rows per warp-wide
// load, and ran at 37-41% of copy bandwidth where a coalesced pass over the same bytes ran at 59%:
// bench/RESULTS.md, "Touched-row update, round 5"). Vote rows are padded by one 16-byte word in
// shared memory, so a lane's 16-byte reads of its own row's votes have no bank conflicts (its
// 4-byte reads of its record have up to four-way ones: a record's 16-byte words cannot be padded
// to an odd stride in words). Each warp double-buffers:
// the next tile's copies are in flight while it computes this one. The records go back the way
// they came.
//
// Code size. The rule runs over a record in shared memory one chunk of 20 columns at a time, in a
// loop that is not unrolled. Unrolled over 64 columns (6,600 instructions with the compiler's
// copies for each rule branch) it stalled on instruction fetch: ncu counted 2.5 cycles per issued
// instruction waiting for one, 0.35 once rolled ("round 6").
struct RecordArgs {
  uint8_t* rec;  // record of row 0
  long long stride;
  const int64_t* idx;
  const void* votes;  // [u, 64] of the kernel's V
  const int32_t* e_votes;
  int* stats;
  long long u;
};

__device__ __forceinline__ int sbyte(int w, int pos) { return (w << (24 - 8 * pos)) >> 24; }

// rule.apply_votes on the 5 * NB trits of NB packed bytes (`packed`, low byte first), the last
// PAD of them padding past the row's end (no accumulator; packed as trit 0, as pack_trits pads):
// acc holds the other columns' accumulators four to a word, v their votes. Returns the new bytes;
// acc is updated in place.
template <int NB, int PAD>
__device__ __forceinline__ int rule_bytes(int* acc, int packed, const int* v, const Rule& p,
                                          int& flips) {
  constexpr int C = 5 * NB - PAD;
  int out[(C + 3) / 4];
#pragma unroll
  for (int k = 0; k < (C + 3) / 4; ++k) out[k] = 0;
  int bytes = 0;
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    int x = (packed >> (8 * b)) & 0xFF;
    x = x > 242 ? 121 : x;  // bytes above 242 are not base-3 trits: decode as zeros
    int q_sum = 0;
#pragma unroll
    for (int d = 0, p3 = 1; d < 5; ++d, p3 *= 3) {
      const int c = 5 * b + d;
      if (c >= C) {
        q_sum += p3;
        continue;
      }
      const int rest = (x * 171) >> 9;  // x / 3 for x < 256
      const int trit = x - 3 * rest - 1;
      x = rest;
      int a = sbyte(acc[c >> 2], c & 3);
      if (p.decay > 0) a = decay(a, p.decay);
      a += v[c];
      int q;
      flips += settle(a, trit, q, p);
      q_sum += q * p3;
      out[c >> 2] |= (a & 0xFF) << (8 * (c & 3));
    }
    bytes |= q_sum << (8 * b);
  }
#pragma unroll
  for (int k = 0; k < (C + 3) / 4; ++k) acc[k] = out[k];
  return bytes;
}

// A record's last word (packed byte 12, exponent, scale accumulator, padding) after the rule:
// byte 12 becomes b12 and the row scale takes its scale votes ev.
__device__ __forceinline__ int scale_word(int w, int b12, int ev, const Rule& p, int& moves) {
  int e = sbyte(w, 1), ea = sbyte(w, 2);
  if (p.scales) {
    const int m = settle_scale(ea, e, ev, p);
    e += m;
    moves += abs(m);
  }
  return b12 | (e & 0xFF) << 8 | (ea & 0xFF) << 16 | (w & 0xFF000000);
}

// N votes (a multiple of 4) from shared memory at q, aligned for 4 * sizeof(V) bytes.
template <typename V, int N>
__device__ __forceinline__ void load_votes_shared(const char* q, int* v) {
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    if constexpr (sizeof(V) == 4) {
      const int4 w = reinterpret_cast<const int4*>(q)[i];
      v[4 * i] = w.x; v[4 * i + 1] = w.y; v[4 * i + 2] = w.z; v[4 * i + 3] = w.w;
    } else if constexpr (sizeof(V) == 2) {
      const int2 w = reinterpret_cast<const int2*>(q)[i];
      v[4 * i] = (w.x << 16) >> 16; v[4 * i + 1] = w.x >> 16;
      v[4 * i + 2] = (w.y << 16) >> 16; v[4 * i + 3] = w.y >> 16;
    } else {
      const int w = reinterpret_cast<const int*>(q)[i];
#pragma unroll
      for (int d = 0; d < 4; ++d) v[4 * i + d] = sbyte(w, d);
    }
  }
}

// rule.apply_votes on one record in shared memory (rec: its 20 words; votes: its row's votes;
// ev: its scale votes), in place: three chunks of 20 columns (five accumulator words and one word
// of packed bytes each), then columns 60..63 with the padding column 64 (packed byte 12) and the
// row scale (the record's last word). memory_only keeps the loads and stores but skips the rule
// (bench/gpu_update.py's floor).
template <typename V>
__device__ __forceinline__ void update_record(int* rec, const char* votes, int ev, const Rule& p,
                                              int& flips, int& moves) {
  if (p.memory_only) {
    int fold = ev;
#pragma unroll
    for (int k = 0; k < 4 * (int)sizeof(V); ++k) {
      const int4 w = reinterpret_cast<const int4*>(votes)[k];
      fold ^= w.x ^ w.y ^ w.z ^ w.w;
    }
    rec[0] ^= fold & 1;
    return;
  }
#pragma unroll 1
  for (int k = 0; k < 3; ++k) {
    int acc[5], v[20];
#pragma unroll
    for (int j = 0; j < 5; ++j) acc[j] = rec[5 * k + j];
    load_votes_shared<V, 20>(votes + 20 * k * (int)sizeof(V), v);
    rec[16 + k] = rule_bytes<4, 0>(acc, rec[16 + k], v, p, flips);
#pragma unroll
    for (int j = 0; j < 5; ++j) rec[5 * k + j] = acc[j];
  }
  int acc = rec[15], v[4];
  load_votes_shared<V, 4>(votes + 60 * (int)sizeof(V), v);
  const int w = rec[19];
  const int b12 = rule_bytes<1, 1>(&acc, w & 0xFF, v, p, flips);
  rec[15] = acc;
  rec[19] = scale_word(w, b12, ev, p, moves);
}

template <typename V>
struct RecordTile {
  static constexpr int kVoteWords = 64 * (int)sizeof(V) / 16;  // 16-byte words of a row's votes
  int4 votes[32 * (kVoteWords + 1)];
  int4 rec[32 * 5];
};

constexpr int kRecordWarps = 2;  // two warps of two int32 tiles each: 45 KB of shared memory

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
               :: "r"((unsigned)__cvta_generic_to_shared(smem)), "l"(gmem));
}

// Issue the copies of tile r0 (n rows; lane l holds row r0 + l's id) into t, as one group.
template <typename V>
__device__ __forceinline__ void fetch_tile(RecordTile<V>& t, const RecordArgs& a, long long r0,
                                           int n, long long id, int lane) {
  constexpr int VW = RecordTile<V>::kVoteWords;
  const int4* votes = static_cast<const int4*>(a.votes) + r0 * VW;
#pragma unroll
  for (int k = 0; k < VW; ++k) {
    const int j = 32 * k + lane;  // word j of the tile's votes: row j / VW, word j % VW
    if (j < n * VW) cp_async16(&t.votes[(j / VW) * (VW + 1) + j % VW], votes + j);
  }
#pragma unroll
  for (int k = 0; k < 5; ++k) {
    const int j = 32 * k + lane;  // word j of the tile's records: record j / 5, word j % 5
    const long long row = __shfl_sync(0xffffffffu, id, j / 5);
    if (j / 5 < n) cp_async16(&t.rec[j], a.rec + row * a.stride + 16 * (j % 5));
  }
  asm volatile("cp.async.commit_group;\n" ::);
}

template <typename V>
__global__ void __launch_bounds__(32 * kRecordWarps) record64_kernel(RecordArgs a, Rule p) {
  constexpr int VW = RecordTile<V>::kVoteWords;
  __shared__ RecordTile<V> tiles[kRecordWarps][2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long step = 32LL * gridDim.x * kRecordWarps;
  const long long* ids = reinterpret_cast<const long long*>(a.idx);
  int flips = 0, moves = 0;
  // What a lane knows of a tile before its copies land: rows, its row's id and scale votes.
  auto head = [&](long long r0, int& n, long long& id, int& ev) {
    n = r0 < a.u ? (int)min(32LL, a.u - r0) : 0;
    id = lane < n ? __ldcs(ids + r0 + lane) : 0;
    ev = p.scales && lane < n ? __ldcs(a.e_votes + r0 + lane) : 0;
  };
  long long r0 = 32 * (blockIdx.x * (long long)kRecordWarps + warp);
  int n0, n1, ev0, ev1, buf = 0;
  long long id0, id1;
  head(r0, n0, id0, ev0);
  if (n0 > 0) fetch_tile(tiles[warp][0], a, r0, n0, id0, lane);
  head(r0 + step, n1, id1, ev1);
  for (; r0 < a.u; r0 += step) {
    // The next tile's copies go out first (an empty group past the end keeps the count even),
    // then the ids of the one after, so no copy waits for an id.
    if (n1 > 0) fetch_tile(tiles[warp][buf ^ 1], a, r0 + step, n1, id1, lane);
    else asm volatile("cp.async.commit_group;\n" ::);
    int n2, ev2;
    long long id2;
    head(r0 + 2 * step, n2, id2, ev2);
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    __syncwarp();
    RecordTile<V>& t = tiles[warp][buf];
    if (lane < n0)
      update_record<V>(reinterpret_cast<int*>(t.rec + 5 * lane),
                       reinterpret_cast<const char*>(t.votes + lane * (VW + 1)), ev0, p, flips,
                       moves);
    __syncwarp();
#pragma unroll
    for (int k = 0; k < 5; ++k) {
      const int j = 32 * k + lane;
      const long long row = __shfl_sync(0xffffffffu, id0, j / 5);
      if (j / 5 < n0) *reinterpret_cast<int4*>(a.rec + row * a.stride + 16 * (j % 5)) = t.rec[j];
    }
    __syncwarp();  // this buffer takes the tile after next only once every lane has stored
    buf ^= 1;
    n0 = n1; id0 = id1; ev0 = ev1;
    n1 = n2; id1 = id2; ev1 = ev2;
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  add_counts(flips, moves, a.stats, p.scales);
}

}  // namespace

// vote_bytes: 1, 2 or 4 (int8, int16, int32 votes; scale votes are int32); rows: groups of four
// rows in flight per warp (1, 2 or 4); blocks of 256 threads; votes_vec / acc_vec: whether every
// row's votes / accumulators may be read eight columns at a time (cuda_rows.py decides);
// memory_only: bench/gpu_update.py's floor (the loads and stores without the rule). Returns a
// cudaError_t, or -1 / -2 for a bad vote width or row count, -3 for rows wider than 64 columns.
extern "C" int arbd_rows_update(int vote_bytes, int rows, int blocks, void* packed, void* t_acc,
                                void* expo, void* e_acc, const void* idx, const void* votes,
                                const void* e_votes, void* stats, long long u, long long sp,
                                long long st, long long se, long long sea, int cols, int nb,
                                int threshold, int decay, int freeze, int cap, int acc_max,
                                int scales, int s_threshold, int votes_vec, int acc_vec,
                                int memory_only, void* stream) {
  if (cols < 1 || cols > 64 || nb != (cols + 4) / 5) return -3;
  Buffers buf{(uint8_t*)packed, (int8_t*)t_acc, (int8_t*)expo, (int8_t*)e_acc, (const int64_t*)idx,
              votes, (const int32_t*)e_votes, (int*)stats, u, sp, st, se, sea, cols, nb,
              votes_vec != 0, acc_vec != 0};
  Rule p{threshold, decay, freeze, cap, acc_max, scales, s_threshold, memory_only};
  cudaStream_t s = (cudaStream_t)stream;
  switch (vote_bytes) {
    case 4: return launch<int32_t>(rows, blocks, s, buf, p);
    case 2: return launch<int16_t>(rows, blocks, s, buf, p);
    case 1: return launch<int8_t>(rows, blocks, s, buf, p);
    default: return -1;
  }
}

// The record kernel (64-trit row records); arguments as arbd_rows_update's, with rec the record
// of row 0 and stride its size in bytes (a multiple of 16); blocks of 32 * kRecordWarps threads.
template <typename V>
int launch_record(int blocks, cudaStream_t s, const RecordArgs& a, const Rule& p) {
  // 45 KB of shared memory a block: ask for the largest carveout, so that the blocks a launch
  // asks for (2 per SM by default, up to 5) fit (once per vote width: each instance of the
  // template has its own flag)
  static bool carved = false;
  if (!carved) {
    cudaFuncSetAttribute(record64_kernel<V>, cudaFuncAttributePreferredSharedMemoryCarveout,
                         cudaSharedmemCarveoutMaxShared);
    carved = true;
  }
  record64_kernel<V><<<blocks, 32 * kRecordWarps, 0, s>>>(a, p);
  return (int)cudaGetLastError();
}

extern "C" int arbd_rows_record64(int vote_bytes, int blocks, void* rec,
                                  long long stride, const void* idx, const void* votes,
                                  const void* e_votes, void* stats, long long u, int threshold,
                                  int decay, int cap, int acc_max, int scales, int s_threshold,
                                  int memory_only, void* stream) {
  if (stride % 16 != 0 || stride < 80) return -3;
  RecordArgs a{(uint8_t*)rec, stride, (const int64_t*)idx, votes, (const int32_t*)e_votes,
               (int*)stats, u};
  Rule p{threshold, decay, 0, cap, acc_max, scales, s_threshold, memory_only};
  cudaStream_t s = (cudaStream_t)stream;
  switch (vote_bytes) {
    case 4: return launch_record<int32_t>(blocks, s, a, p);
    case 2: return launch_record<int16_t>(blocks, s, a, p);
    case 1: return launch_record<int8_t>(blocks, s, a, p);
    default: return -1;
  }
}
