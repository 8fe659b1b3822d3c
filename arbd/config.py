"""Model configuration for ARB: seed constants, the ARBConfig dataclass, presets and weight counts.

Standard library only, so the planner, the launcher and `python -m arbd.config` work without torch.
Every weight count below is an exact formula of ARBConfig fields: the model is built from exactly
these fields, so the table printed here is the model that gets built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Constants from the seeds (TRUE-TERNARY-REFACTOR 14 and 19).

SHARED_VQ_SIZE = 10_000_000  # shared motif codebook rows (seed 14)
KGVQ_CODEBOOK_SIZE = 5_000_000  # KG / composite codebook rows (seed 14)
CODEBOOK_DIM = 64  # width of a codebook row; VQ output is expanded back to d_model
TRIGRAM_DIM = 7168  # d_model of arb-3b: the width the sequencer emits per byte trigram
MLA_HCA_STRIDE = 4  # HCA compressed cache keeps one latent per this many positions

# int8 log scale per row: scale = 2 ** (E / SCALE_K); E in [-128, 127] spans 2^-8 .. 2^7.94 in
# steps of 4.4%, fine enough for per-row magnitudes.
SCALE_K = 16
TRITS_PER_BYTE = 5  # base-3 packing: 3**5 = 243 <= 256, i.e. 1.6 bits per trit on disk and wire

BYTE_VOCAB = 256  # the sequencer reads raw bytes
NGRAM = 3  # bytes per trigram: the sequencer and the ByteHead work on 3 bytes at a time
# Positions per ByteHead chunk when activation checkpointing recomputes it (ARBModel._byte_logits):
# its 4 x bytehead_hidden activations per position are otherwise the largest recomputed block.
HEAD_CHUNK = 16384
N_OUTPUT_HEADS = 3  # OutputRouter picks among ByteHead, VideoHead, TalkerHead


def _env_flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in {"1", "true", "yes", "on"}


# Read once at import. TileLang training is off unless asked for (seed 19: its update path is not
# production-ready); slow tests build full-size models, so they are opt-in (seed 14).
ARB_TILELANG_TRAINING: bool = _env_flag("ARB_TILELANG_TRAINING")
ARB_RUN_SLOW_TESTS: bool = _env_flag("ARB_RUN_SLOW_TESTS")


# ---------------------------------------------------------------------------------------------
# The config. Defaults are arb-3b (like nanoGPT's GPTConfig defaults are the real model); tests
# should ask for get_preset("arb-tiny") rather than ARBConfig().


@dataclass(frozen=True)
class ARBConfig:
    # Sequencer: ternary byte embedding, then a ternary trigram projection 3*byte_embed_dim -> d_model.
    byte_embed_dim: int = 1536
    d_model: int = TRIGRAM_DIM

    # SharedVQ bridge and the KG VQ codebook. Large codebooks use candidate lookup (seed 14):
    # tables with more than vq_exact_max rows score only vq_candidates rows per query.
    codebook_dim: int = CODEBOOK_DIM
    shared_vq_size: int = SHARED_VQ_SIZE
    kgvq_size: int = KGVQ_CODEBOOK_SIZE
    vq_candidates: int = 64
    vq_exact_max: int = 65_536
    # Codebook state as four arrays (83 B per 64-trit row with usage: the 1.3 B/trit bound) or
    # one 80-byte record per row (84 B, 1.3125 B/trit; touched-row updates 1.3-1.6x faster on
    # the GPU: docs/decisions.md, "Row records for the codebooks").
    vq_state_layout: str = "arrays"

    # MLA attention (DeepSeek style low-rank Q and KV, decoupled RoPE key). 40 heads x 12 layers
    # lands on seed 14's 826.8M; 40 heads split evenly over tp = 2, 4, 8.
    n_layers: int = 12
    n_heads: int = 40
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_dim: int = 128
    qk_rope_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10_000.0
    # Caches add no weights: the HCA compressor mean-pools hca_stride KV latents (parameter-free).
    hca_stride: int = MLA_HCA_STRIDE
    kv_cache_len: int = 4096  # full-resolution KV ring buffer (positions)
    hca_cache_len: int = 4096  # compressed entries, each covering hca_stride positions

    # MoEGraph: ternary FFN experts with an ACT loop over active motif nodes.
    n_experts: int = 8
    expert_hidden: int = 3712
    moe_top_k: int = 2
    act_max_steps: int = 4
    kg_edges_per_node: int = 16  # fixed-capacity adjacency, one int32 slot each (kg_edges.py)
    kv_ledger_len: int = 4096  # bytes the ContextAttentionScheduler ledger remembers

    # Heads.
    proposal_hidden: int = 1280  # CompositeProposalHead
    router_hidden: int = 1792  # OutputRouter
    bytehead_hidden: int = 28928  # gated MLP before predicting the next trigram's 3 bytes
    video_hidden: int = 7168
    video_out: int = 640
    talker_hidden: int = 7168
    talker_out: int = 640

    norm_eps: float = 1e-6

    # Construction flags (seed 19): a component that is off is not built and holds no weights.
    use_attention: bool = True
    use_vq: bool = True
    use_graph: bool = True  # KG VQ + composite proposal, graph node projection, KV ledger
    use_moe: bool = True  # experts, MoE router, ACT halt gate
    use_output_router: bool = True
    use_video_head: bool = True
    use_talker_head: bool = True
    # Parts the seeds name outside seed 14's table (docs/decisions.md): MemGram and LTI injection
    # on the text path, and the image/video (VAE2D) and audio sidecar sequencers.
    use_memgram: bool = True
    use_lti: bool = True
    use_vision: bool = True
    use_audio: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "bool":  # annotations are strings (from __future__ import annotations)
                if not isinstance(v, bool):
                    raise ValueError(f"ARBConfig.{f.name}: expected a bool, got {v!r}")
            elif f.type == "int":
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ValueError(f"ARBConfig.{f.name}: expected a positive int, got {v!r}")
            elif f.type == "float":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    raise ValueError(f"ARBConfig.{f.name}: expected a positive float, got {v!r}")
        if self.qk_rope_dim % 2:  # RoPE rotates pairs of channels
            raise ValueError(f"ARBConfig.qk_rope_dim: expected an even int, got {self.qk_rope_dim}")
        if self.moe_top_k > self.n_experts:
            raise ValueError(f"ARBConfig.moe_top_k: expected <= n_experts ({self.n_experts}), "
                             f"got {self.moe_top_k}")
        if self.vq_state_layout not in ("arrays", "record"):
            raise ValueError(f"ARBConfig.vq_state_layout: expected 'arrays' or 'record', got "
                             f"{self.vq_state_layout!r}")
        if self.vq_candidates > self.vq_exact_max:  # candidate lookup must be cheaper than exact
            raise ValueError(
                f"ARBConfig.vq_candidates: expected <= vq_exact_max ({self.vq_exact_max}), "
                f"got {self.vq_candidates}"
            )

    def with_overrides(self, **kw: object) -> ARBConfig:
        """A copy with some fields changed; unknown names are an error, not silently ignored."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ValueError(f"unknown ARBConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------------------------------
# Presets: the same code at three sizes. Every component is on in all three.

PRESETS: dict[str, ARBConfig] = {
    # CPU tests in seconds: < 2M logical weights, exact VQ lookup (codebooks below vq_exact_max).
    "arb-tiny": ARBConfig(
        byte_embed_dim=32, d_model=64, codebook_dim=64, shared_vq_size=4096, kgvq_size=2048,
        vq_candidates=16, vq_exact_max=8192,
        n_layers=2, n_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_dim=16, qk_rope_dim=8,
        v_head_dim=16, kv_cache_len=64, hca_cache_len=32,
        n_experts=4, expert_hidden=128, moe_top_k=2, act_max_steps=2, kg_edges_per_node=8,
        kv_ledger_len=64, proposal_hidden=64, router_hidden=32, bytehead_hidden=128,
        video_hidden=64, video_out=32, talker_hidden=64, talker_out=32,
    ),
    # One GPU: ~150M logical weights, codebooks large enough to take the candidate lookup path.
    "arb-small": ARBConfig(
        byte_embed_dim=256, d_model=1024, codebook_dim=64, shared_vq_size=1_000_000,
        kgvq_size=500_000, vq_candidates=64, vq_exact_max=65_536,
        n_layers=8, n_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_dim=64,
        qk_rope_dim=32, v_head_dim=64, kv_cache_len=2048, hca_cache_len=1024,
        n_experts=8, expert_hidden=1024, moe_top_k=2, act_max_steps=4, kg_edges_per_node=16,
        kv_ledger_len=2048, proposal_hidden=256, router_hidden=256, bytehead_hidden=4096,
        video_hidden=1024, video_out=640, talker_hidden=1024, talker_out=640,
    ),
    "arb-3b": ARBConfig(),
}


def get_preset(name: str) -> ARBConfig:
    try:
        return PRESETS[name]  # frozen, so sharing the instance is safe
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# Logical ternary weights: one count per weight (matrix entry, codebook entry, norm gain), before
# packing; per-row int8 scales and integer KG edge weights are not counted.

# Seed 14's table for arb-3b, in the seed's order (the CLI and tests rely on these 8 names).
SEED14_TARGETS: dict[str, int] = {
    "Embedding + text sequencer": 33_500_000,
    "Shared VQ + VQ bridge": 640_900_000,
    "MoEGraph": 429_000_000,
    "KG VQ + composite proposal": 329_300_000,
    "Router": 12_900_000,
    "ByteHead": 626_900_000,
    "Video/Talker heads": 112_200_000,
    "MLA attention": 826_800_000,
}
SEED14_TOTAL = 3_012_000_000


def mla_layer_weights(cfg: ARBConfig) -> int:
    d, h, q, kv = cfg.d_model, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    return (
        d * q + q  # wq_a + q RMSNorm gain
        + q * h * (cfg.qk_nope_dim + cfg.qk_rope_dim)  # wq_b
        + d * (kv + cfg.qk_rope_dim) + kv  # wkv_a (latent + shared RoPE key) + kv RMSNorm gain
        + kv * h * (cfg.qk_nope_dim + cfg.v_head_dim)  # wkv_b
        + h * cfg.v_head_dim * d  # wo
        + d  # attention-block RMSNorm gain
    )


def logical_ternary_weights(cfg: ARBConfig) -> dict[str, int]:
    """Per-area counts; an area switched off by a flag counts 0 (every key is always present)."""
    d, c = cfg.d_model, cfg.codebook_dim
    # experts, router, halt gate, and two norm gains (pre-expert and output)
    moe = cfg.n_experts * 2 * d * cfg.expert_hidden + d * cfg.n_experts + d + 2 * d
    graph = c * d + BYTE_VOCAB * d  # active-node projection, ledger byte embedding
    proposal = d * cfg.proposal_hidden + cfg.proposal_hidden * c + d  # two matrices + halt gate
    video = d * cfg.video_hidden + cfg.video_hidden * cfg.video_out
    talker = d * cfg.talker_hidden + cfg.talker_hidden * cfg.talker_out
    router = d * cfg.router_hidden + cfg.router_hidden * N_OUTPUT_HEADS
    return {
        "Embedding + text sequencer": (BYTE_VOCAB + NGRAM * d) * cfg.byte_embed_dim,
        "Shared VQ + VQ bridge": cfg.use_vq * (d * c + cfg.shared_vq_size * c + c * d + d),
        "MoEGraph": cfg.use_moe * moe + cfg.use_graph * graph,
        "KG VQ + composite proposal": cfg.use_graph * (proposal + cfg.kgvq_size * c),
        "Router": cfg.use_output_router * router,
        "ByteHead": 3 * d * cfg.bytehead_hidden + d * NGRAM * BYTE_VOCAB,  # gate, up, down; out
        "Video/Talker heads": cfg.use_video_head * video + cfg.use_talker_head * talker,
        "MLA attention": cfg.use_attention * cfg.n_layers * mla_layer_weights(cfg),
    }


def total_logical_ternary_weights(cfg: ARBConfig) -> int:
    return sum(logical_ternary_weights(cfg).values())


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _dev(n: int, target: int) -> str:
    return f"{100 * (n - target) / target:+.2f}"


def format_table(cfg: ARBConfig, compare: bool = True) -> str:
    """Per-area counts, exact and in millions; with compare, seed 14's target and the deviation."""
    counts = logical_ternary_weights(cfg)
    total = sum(counts.values())
    t = SEED14_TARGETS
    rows = [("Area", "Exact", "Weights", "Seed 14", "Dev %")]
    rows += [(a, f"{n:,}", _m(n), _m(t[a]), _dev(n, t[a])) for a, n in counts.items()]
    rows.append(("TOTAL", f"{total:,}", f"{_m(total)} ({total / 1e9:.3f}B)",
                 f"{SEED14_TOTAL / 1e9:.3f}B", _dev(total, SEED14_TOTAL)))
    ncol = 5 if compare else 3
    w = [max(len(r[i]) for r in rows) for i in range(ncol)]
    lines = ["  ".join([r[0].ljust(w[0])] + [r[i].rjust(w[i]) for i in range(1, ncol)]) for r in rows]
    rule = "-" * len(lines[0])
    return "\n".join([lines[0], rule, *lines[1:-1], rule, lines[-1]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m arbd.config",
                                description="Print a preset's logical ternary weight breakdown.")
    p.add_argument("preset", nargs="?", default="arb-3b", choices=list(PRESETS))
    p.add_argument("--json", action="store_true", help="config, per-area counts and total as JSON")
    args = p.parse_args(argv)
    cfg = get_preset(args.preset)
    if args.json:
        counts = logical_ternary_weights(cfg)
        out = {"preset": args.preset, "config": dataclasses.asdict(cfg),
               "logical_ternary_weights": counts, "total": sum(counts.values())}
        print(json.dumps(out, indent=2))
    else:  # seed 14's targets describe arb-3b only; other presets print their counts alone
        print(f"{args.preset}: logical ternary weights")
        print(format_table(cfg, compare=args.preset == "arb-3b"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
