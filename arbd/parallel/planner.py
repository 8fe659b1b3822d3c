"""`arbd-plan`: check a shard plan against the model, the world and the GPU; print what one rank
holds and what each collective moves per step; write the DeepSpeed JSON.

    arbd-plan shard_plans/node-8gpu.yaml [--world 8] [--gpu-mem-gib 80] [--write-ds-config ds.json]

Sizes come from the model itself, built on the meta device (shapes only, no init), split the way
the plan lays it out: tensor parallel splits MLA's wq_b / wkv_b rows and wo columns by heads,
expert parallel keeps n_experts / ep experts per rank, the two codebooks (and the KG edges that
live with the shared codebook's rows) are row-sharded over the codebook group, and ZeRO stage
>= 1 keeps 1/dp of the dense matrices' int8 accumulators per rank.

The peak is not a sum of the table: it is the largest of three moments of a step, each with the
state that is alive then (see `estimate_peak`). The activation model counts, per position, the
tensors autograd saves for backward in each block (`activation_bytes`); it is written from the
code of arbd/model, not fitted to a measurement. bench/plan_memory.py compares it with the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from arbd.config import HEAD_CHUNK, NGRAM, ARBConfig, get_preset
from arbd.parallel.plan import Plan, load_plan

GiB = 2**30
EVIDENCE_B = 4         # float32 dL/dW (or int32 votes) per dense weight, backward -> update
# Update transient per weight of the matrix being updated (besides its evidence): the rule's
# stochastic rounding hashes every entry's bits and position in int64 (arbd/hashing.mix32 on
# int64 tensors: `pos`, the bits, and two mixer temporaries alive at once = 32 B), plus the
# float32 scaled evidence x (4 B), the unpacked trits (1 B) and the int16 votes (2 B).
UPDATE_B = 39
# The text path's blocks in forward order; matrices outside them get no evidence on text.
TEXT_BLOCKS = ("sequencer", "memgram", "lti", "shared_vq", "layers", "moegraph", "byte_head", "composite")


def training_config(plan: Plan | str, all_modalities: bool = False) -> ARBConfig:
    """What launch/pretrain.py builds by default: the text stack, no vision/audio sidecars.
    A plan brings its preset and its `model` overrides; a string is a bare preset."""
    cfg = get_preset(plan) if isinstance(plan, str) else plan.model_config()
    if all_modalities:
        return cfg
    return cfg.with_overrides(use_output_router=False, use_vision=False, use_video_head=False,
                              use_audio=False, use_talker_head=False)


# -- the model's inventory on the meta device ---------------------------------------------------
@dataclass
class Mat:
    name: str
    rows: int            # rows held by this rank (after tp / ep / codebook sharding)
    cols: int
    kind: str            # dense | sparse (row evidence: embedding tables) | codebook | gain
    block: str           # text block it belongs to, or "" (no evidence on the text path)

    @property
    def n(self) -> int:
        return self.rows * self.cols


@dataclass
class Inventory:
    mats: list[Mat]
    codebook_row_bytes: int      # persistent bytes per codebook row (TernaryVQCodebook.state_bytes)
    codebook_rows: int           # rows of both codebooks held by this rank
    kg_edge_bytes: int           # this rank's share of the KG adjacency
    other_buffer_bytes: int
    float_params: int


def _block_of(name: str) -> str:
    top = name.split(".")[0]
    if top == "layers":
        return "layers." + name.split(".")[1]
    return top if top in TEXT_BLOCKS else ""


def inventory(cfg: ARBConfig, tp: int = 1, ep: int = 1, cb: int = 1) -> Inventory:
    """Per-rank matrices and buffers of the model for a layout (tp, ep, codebook shards cb)."""
    from arbd.model.arb import ARBModel
    from arbd.ternary import ternary_matrices
    from arbd.vq.codebook import TernaryVQCodebook

    model = ARBModel(cfg, device="meta")
    sparse = {id(m.weight) for _, m in model.named_modules() if getattr(m, "sparse", False)}
    codebooks = [m for _, m in model.named_modules() if isinstance(m, TernaryVQCodebook)]
    cb_ids = {id(c.matrix) for c in codebooks}
    local_experts = cfg.n_experts // ep
    mats, seen = [], set()
    for name, m in ternary_matrices(model):
        seen.update(id(b) for b in m.buffers())
        rows, cols = m.rows, m.cols
        parts = name.split(".")
        if parts[0] == "moegraph" and parts[1] == "experts" and int(parts[2]) >= local_experts:
            continue                                   # another ep rank's expert
        if parts[0] == "layers" and parts[2] in ("wq_b", "wkv_b"):
            rows //= tp                                # column parallel: heads split the outputs
        if parts[0] == "layers" and parts[2] == "wo":
            cols //= tp                                # row parallel: heads split the inputs
        if id(m) in cb_ids:
            kind, rows = "codebook", -(-rows // cb)
        elif id(m) in sparse:
            kind = "sparse"
        elif cols < 8:
            kind = "gain"                              # never ZeRO-partitioned (zero.py)
        else:
            kind = "dense"
        mats.append(Mat(name, rows, cols, kind, _block_of(name)))
    row_bytes = codebooks[0].state_bytes() // codebooks[0].num_codes if codebooks else 0
    for c in codebooks:
        seen.add(id(c.usage))
    kg = other = 0
    for name, b in model.named_buffers():
        if id(b) in seen:
            continue
        nbytes = b.numel() * b.element_size()
        if name.startswith("kg_edges."):
            kg += -(-nbytes // cb)
        else:
            other += nbytes
    return Inventory(mats, row_bytes, sum(m.rows for m in mats if m.kind == "codebook"), kg, other,
                     sum(p.numel() for p in model.parameters()))


# -- activations --------------------------------------------------------------------------------
def _norm(dim: int, s: int) -> int:
    """A TernaryRMSNorm in 16 bits runs the fused kernels on the GPU (ops.rms_norm), which save x
    (s) and 1 / rms per position (4 B); the torch formula (float32 runs) saves x.float() (4 B),
    the rsqrt (4 B) and the normalised y (s)."""
    return s * dim + 4 if s == 2 else (4 + s) * dim + 4


def activation_bytes(cfg: ARBConfig, micro_batch: int, seq_len: int, s: int, tp: int = 1,
                     act_steps: float | None = None, ep: int = 1) -> dict[str, int]:
    """Bytes autograd keeps for backward after one micro-batch forward, per text block.

    N = micro_batch * (seq_len - 1) positions (the trainer feeds seq_len + 1 bytes, the sequencer
    emits one position per trigram). s = bytes per activation element (2 for bf16, 4 for fp32).
    Counted per block: each TernaryLinear saves its input, each norm what `_norm` says, SDPA its
    q, k, v, output and log-sum-exp; a tensor saved by two ops is counted once. `act_steps` is the
    mean number of ACT steps a position runs (worst case, the default: act_max_steps).
    """
    N = micro_batch * (seq_len + 1 - (NGRAM - 1))
    d, c, E = cfg.d_model, cfg.codebook_dim, cfg.byte_embed_dim
    a = float(cfg.act_max_steps if act_steps is None else act_steps)
    out: dict[str, float] = {}
    out["sequencer"] = N * NGRAM * E * s                          # trigram concat, saved by project
    if cfg.use_memgram:
        m, orders = max(16, d // 64), 3
        # out's input, the two norms, the gate's concat input, g * v (v kept)
        out["memgram"] = N * (orders * m * s + 2 * _norm(d, s) + 2 * d * s + d * s)
    if cfg.use_lti:
        r, k = max(16, d // 16), 4
        # norm, down's input, the float32 filter input and chunk copy, up's input
        out["lti"] = N * (_norm(d, s) + d * s + 2 * 4 * r + k * r * s)
    if cfg.use_vq:
        # proj_in's input; the codebook's float32 x, q and the two differences; bridge and norm
        out["shared_vq"] = N * (d * s + c * (s + 16) + c * s + _norm(d, s))
    if cfg.use_attention:
        hl = cfg.n_heads // tp
        qh, vd = cfg.qk_nope_dim + cfg.qk_rope_dim, cfg.v_head_dim
        per = (_norm(d, s) + d * s                                # attn_norm, wq_a / wkv_a input
               + _norm(cfg.q_lora_rank, s) + cfg.q_lora_rank * s   # q_norm, wq_b input
               + _norm(cfg.kv_lora_rank, s) + cfg.kv_lora_rank * s  # kv_norm, wkv_b input
               + cfg.qk_rope_dim * s                              # roped key
               + hl * (2 * qh * s + (cfg.qk_nope_dim + vd) * s    # q, k, wkv_b output (v is a view)
                       + 2 * vd * s + 4))                         # attention output, wo input, lse
        for i in range(cfg.n_layers):
            out[f"layers.{i}"] = N * per
    g = moegraph_parts(cfg, micro_batch, N, s, ep)
    if g:
        out["moegraph"] = g["scheduler"] + g["graph"] + a * g["act_step"] + g["rest"]
    hb = byte_head_parts(cfg, N, s)
    out["byte_head"] = hb["head"] + hb["logits"]
    if cfg.use_graph:
        P = cfg.proposal_hidden
        out["composite"] = N * (2 * P * s + c * (s + 16) + c * s)
    return {k: int(v) for k, v in out.items()}


def moegraph_parts(cfg: ARBConfig, micro_batch: int, N: int, s: int, ep: int = 1) -> dict[str, float]:
    """MoEGraph's saved bytes by part: the scheduler, the graph message, one ACT step over all N
    positions, and the rest (out_norm; the grouped path's stacked expert weights)."""
    d, c = cfg.d_model, cfg.codebook_dim
    parts = {"scheduler": 0.0, "graph": 0.0, "act_step": 0.0, "rest": 0.0}
    if cfg.use_graph:
        L = cfg.kv_ledger_len
        # scheduler (ledger.ledger_attention): q, out and the row log-sum-exp per position, the
        # ledger keys per sequence; graph message: decoded neighbour rows, agg
        parts["scheduler"] = N * (2 * d * s + 4) + micro_batch * L * d * s
        parts["graph"] = N * ((cfg.kg_edges_per_node + 1) * c * s + c * s + 4 * (cfg.kg_edges_per_node + 1))
    if cfg.use_moe:
        k, H = cfg.moe_top_k, cfg.expert_hidden
        parts["act_step"] = N * (d * s + _norm(d, s) + d * s      # gathered x, expert_norm, router input
                                 + k * (2 * d * s + 2 * H * s)    # x[rows], relu^2 output, down out
                                 + d * s + 8 * cfg.n_experts)     # x + dispatch, router float/softmax
        parts["rest"] = N * _norm(d, s)                           # out_norm
        if s == 2:   # 16-bit on the GPU: the grouped path keeps the stacked up and down weights
            parts["rest"] += 2 * (cfg.n_experts // ep) * d * H * s  # of this rank's experts
    return parts if cfg.use_graph or cfg.use_moe else {}


def byte_head_parts(cfg: ARBConfig, N: int, s: int) -> dict[str, float]:
    """The ByteHead's gated MLP (x, gate, up, their product, the residual) and its logits with
    the float32 copies the loss makes (kept outside the head's recomputation)."""
    d, H = cfg.d_model, cfg.bytehead_hidden
    return {"head": N * (2 * d * s + 4 * H * s), "logits": N * (3 * 256 * s + 3 * 256 * 4)}


def checkpointed_bytes(acts: dict[str, int], cfg: ARBConfig, micro_batch: int, N: int, s: int,
                       ep: int = 1, act_steps: float | None = None, head_chunk: int | None = None,
                       offload: bool = False) -> int:
    """Activations under checkpointing (ARBModel._maybe_checkpoint): every MLA layer, MemGram,
    LTI, the ByteHead (in chunks of `head_chunk` positions) and MoEGraph (its scheduler and each
    ACT step apart; the whole block at ep > 1) keep only their inputs (N x d each), plus, during
    backward, the largest recomputed block. Counted as if every position ran every ACT step.
    With `offload` the regions' inputs wait in host memory, and only the one being recomputed
    is back on the GPU (recompute.HostInputs)."""
    d, head_chunk = cfg.d_model, head_chunk or HEAD_CHUNK
    a = float(cfg.act_max_steps if act_steps is None else act_steps)
    ck = [k for k in acts if k.startswith("layers.") or k in ("memgram", "lti")]
    kept = sum(v for k, v in acts.items() if k not in ck + ["moegraph", "byte_head"])
    inputs = len(ck) * N * d * s
    blocks = [acts[k] for k in ck]
    hb = byte_head_parts(cfg, N, s)
    kept += hb["logits"]
    inputs += N * d * s
    blocks.append(hb["head"] * min(N, head_chunk) / N)
    if "moegraph" in acts:
        if ep == 1:
            g = moegraph_parts(cfg, micro_batch, N, s, ep)
            kept += g["graph"] + g["rest"]
            inputs += N * d * s * (1 + a)    # scheduler and step inputs
            blocks += [g["scheduler"], g["act_step"]]
        else:
            inputs += N * d * s
            blocks.append(acts["moegraph"])
    kept += N * d * s if offload else inputs
    return int(kept + max(blocks))


# -- the estimate -------------------------------------------------------------------------------
@dataclass
class Estimate:
    rows: dict[str, int]               # the memory table (bytes per rank)
    peak: int                          # estimated peak bytes per rank
    phase: str                         # which moment sets the peak
    phases: dict[str, int]
    comm: dict[str, int]               # bytes sent per rank per step, per collective
    info: dict[str, float] = field(default_factory=dict)


def estimate(plan: Plan, world: int | None = None, *, act_steps: float | None = None,
             checkpointing: bool | None = None, all_modalities: bool = False,
             backend: str | None = None) -> Estimate:
    lay = plan.layout
    world = lay.world if world is None else world
    cb = lay.cb or world
    cfg = training_config(plan, all_modalities)
    inv = inventory(cfg, lay.tp, lay.ep, cb)
    s = 2 if plan.dtype == "bf16" else 4
    dp, zero = lay.dp, plan.zero_stage
    part = dp if (zero >= 1 and dp > 1) else 1
    N = plan.micro_batch * (plan.seq_len - 1)

    dense = [m for m in inv.mats if m.kind in ("dense", "sparse", "gain")]
    packed = sum(m.rows * (-(-m.cols // 5) + 1) for m in dense)
    accum = sum((m.n + m.rows) / (part if m.kind == "dense" else 1) for m in dense)
    live = [m for m in inv.mats if m.block and m.kind in ("dense", "gain")]
    # bf16 evidence (plan.evidence_dtype) halves what is held between micro-batches; votes
    # (int32) stay 4 B.
    ev_b = 2 if plan.evidence_dtype == "bf16" and plan.evidence == "summed" else EVIDENCE_B
    evidence = ev_b * sum(m.n for m in live)
    # Row evidence of tables: every touched row per micro-batch, float32 (codebooks: one chosen
    # row per position and codebook; MemGram: orders x hashes rows per position).
    n_cb = sum(1 for m in inv.mats if m.kind == "codebook")
    sparse_ev = 4 * plan.grad_accum * N * (n_cb * cfg.codebook_dim + 6 * max(16, cfg.d_model // 64))
    # Float parameters (logit_scale): param in the run dtype, fp32 grad, fp32 master + Adam moments.
    fp = inv.float_params
    floats = fp * (s + 4 + (4 if s == 2 else 0)) + 8 * fp // (dp if zero >= 1 else 1)
    acts = activation_bytes(cfg, plan.micro_batch, plan.seq_len, s, lay.tp, act_steps, lay.ep)
    act_full = sum(acts.values())
    act_ck = checkpointed_bytes(acts, cfg, plan.micro_batch, N, s, lay.ep, act_steps,
                                offload=plan.activation_offload)
    if checkpointing is None:
        checkpointing = plan.activation_checkpointing
    act = act_ck if checkpointing else act_full
    # Communication buffers alive at the evidence exchange (arbd/ternary/zero.py, dp.py):
    # ZeRO >= 1 concatenates every matrix's evidence in the wire dtype, receives dp blocks of its
    # own rows and sums them in float32; stage 0 all-reduces one float32 -> wire copy of it all.
    wire = 1 if plan.evidence == "votes" else 2
    n_live = sum(m.n for m in live)
    if dp == 1:
        comm_buf = 0
    elif part > 1:
        comm_buf = int(wire * n_live * 2 + 4 * n_live / dp)
    else:
        comm_buf = (4 + wire) * n_live
    if lay.ep > 1:
        comm_buf += 2 * N * cfg.moe_top_k * cfg.d_model * s        # dispatch send + receive
    persistent = int(packed + accum) + inv.codebook_rows * inv.codebook_row_bytes + inv.kg_edge_bytes \
        + inv.other_buffer_bytes + floats

    # Three moments of a step, each with what is alive then.
    big = max((m.n for m in live), default=0)
    torch_decode = s * big if (backend or plan.backend) == "torch" else 0
    # (1) a later micro-batch: the whole step's evidence so far, this micro-batch's activations,
    #     then backward adding the largest matrix's float32 weight gradient before the in-place add.
    later = persistent + evidence + sparse_ev + act + 4 * big + torch_decode
    # (2) the first micro-batch's backward, block by block in reverse: finished blocks hold their
    #     evidence, blocks still to come their activations; the first add_grad clones (8 B/weight).
    order = [b for b in TEXT_BLOCKS if b != "layers"]
    if cfg.use_attention:
        i = order.index("moegraph")
        order[i:i] = [f"layers.{j}" for j in range(cfg.n_layers)]
    ev_of = {b: ev_b * sum(m.n for m in live if m.block == b) for b in order}
    big_of = {b: max((m.n for m in live if m.block == b), default=0) for b in order}
    first, done, acts_left = 0, 0, act
    grads = 2 * N * cfg.d_model * s                     # gradients of the residual stream in flight
    for b in reversed(order):
        held = 0 if checkpointing else acts.get(b, 0)
        # the ByteHead's hidden gradients, per chunk when it is recomputed in chunks
        head_rows = min(N, HEAD_CHUNK) if checkpointing else N
        inflight = grads + (3 * head_rows * cfg.bytehead_hidden * s if b == "byte_head" else 0)
        # start of the block's backward: its activations still held; end: its evidence added
        # (the first add_grad clones, so the weight gradient exists twice for a moment).
        first = max(first, persistent + done + acts_left + inflight,
                    persistent + done + acts_left - held + ev_of[b] + 4 * big_of[b]
                    + (s * big_of[b] if torch_decode else 0))
        acts_left -= held
        done += ev_of[b]
    first = max(first, persistent + act)
    if plan.grad_accum == 1:
        later = 0
    # (3) the update: exchange buffers first, then matrix by matrix (model order), each freeing
    #     its evidence when done while the rule's temporaries for it are alive.
    upd = persistent + evidence + sparse_ev + comm_buf
    left = evidence
    for m in live:
        upd = max(upd, persistent + left + UPDATE_B * m.n // part)
        left -= ev_b * m.n
    phases = {"first micro-batch backward": first, "later micro-batch": later, "update": upd}
    phase = max(phases, key=phases.get)
    rows = {
        "packed ternary weights (trits + int8 exponent)": packed,
        f"int8 accumulators ({'1/%d per rank, ZeRO-%d' % (dp, zero) if part > 1 else 'whole'})": int(accum),
        f"codebook shards ({inv.codebook_rows:,} rows x {inv.codebook_row_bytes} B)":
            inv.codebook_rows * inv.codebook_row_bytes,
        "KG edges (with the shared VQ rows)": inv.kg_edge_bytes,
        "other buffers": inv.other_buffer_bytes,
        f"float params + Adam ({fp} params)": floats,
        f"float evidence ({'bf16' if ev_b == 2 else 'fp32'} dL/dW, transient)": evidence + sparse_ev,
        "activations, no checkpointing": act_full,
        ("activations, with checkpointing and offload" if plan.activation_offload
         else "activations, with checkpointing"): act_ck,
        "communication buffers": comm_buf,
    }
    comm = communication(plan, cfg, inv, world, N, s)
    info = {"positions_per_micro_batch": N, "dense_weights_with_evidence": n_live,
            "largest_matrix": big, "persistent": persistent}
    if plan.activation_offload:   # host RAM the offloaded inputs take (pinned, per rank)
        info["pinned_host_offload"] = checkpointed_bytes(
            acts, cfg, plan.micro_batch, N, s, lay.ep, act_steps) - act_ck
    return Estimate(rows, phases[phase], phase, phases, comm, info)


def communication(plan: Plan, cfg: ARBConfig, inv: Inventory, world: int, N: int, s: int) -> dict[str, int]:
    """Bytes each rank sends per optimizer step (ring / pairwise algorithms), per collective."""
    lay, acc = plan.layout, plan.grad_accum
    dp, tp, ep, cb = lay.dp, lay.tp, lay.ep, lay.cb or world
    live = [m for m in inv.mats if m.block and m.kind in ("dense", "gain")]
    n, rows = sum(m.n for m in live), sum(m.rows for m in live)
    wire = 1 if plan.evidence == "votes" else 2
    out: dict[str, int] = {}
    f = (dp - 1) / dp
    if plan.zero_stage >= 1:
        out["dp evidence reduce-scatter (all_to_all)"] = int(f * (wire * n + (rows if wire == 1 else 0)))
        out["dp packed-trit all-gather"] = int(f * (n / 5 + rows))
    else:
        out["dp evidence all-reduce"] = int(2 * f * wire * n)
    out["dp float-gradient all-reduce (DeepSpeed)"] = int(2 * f * 4 * inv.float_params)
    layers = cfg.n_layers if cfg.use_attention else 0
    # Megatron MLA: forward all-reduce of wo's output, backward of the latents' gradient.
    out["tp all-reduce of MLA output"] = int(2 * (tp - 1) / tp * acc * layers * N * s
                                             * (cfg.d_model + cfg.q_lora_rank + cfg.kv_lora_rank))
    # Tokens to their experts and back, forward and backward, each ACT step (worst case).
    out["ep all-to-all (MoEGraph dispatch)"] = int((ep - 1) / ep * 4 * acc * cfg.act_max_steps * N
                                                   * cfg.moe_top_k * cfg.d_model * s) if cfg.use_moe else 0
    # Fetch strategy: per query C candidate ids out (4 B) and 14 B of packed row back; the update
    # sends each query's float evidence (264 B) to the row's owner. Two codebooks per position.
    n_cb = sum(1 for m in inv.mats if m.kind == "codebook")
    out["codebook all-to-all (lookup + update)"] = int((cb - 1) / cb * acc * N * n_cb
                                                       * (cfg.vq_candidates * 18 + 264))
    return out


# -- validation, preflight, DeepSpeed JSON ----------------------------------------------------
class PlanError(ValueError):
    """A plan that cannot run: the message names the field and a fix."""


def check(plan: Plan, world: int | None, gpu_mem_gib: float, est: Estimate | None = None) -> Estimate:
    """Validate the plan for `world` ranks and the GPU; return the estimate or raise PlanError."""
    try:
        plan.validate(plan.layout.world if world is None else world)
    except ValueError as e:
        raise PlanError(str(e)) from None
    est = est or estimate(plan, world)
    if est.peak > gpu_mem_gib * GiB:
        raise PlanError(
            f"plan {plan.name}: estimated peak {est.peak / GiB:.1f} GiB per rank ({est.phase}) is over "
            f"the GPU's {gpu_mem_gib:g} GiB: lower micro_batch (now {plan.micro_batch}) or seq_len "
            f"(now {plan.seq_len}), raise layout.tp / layout.ep / zero_stage, or use a larger GPU")
    return est


def preflight(plan: Plan, world_size: int, data_path: str | os.PathLike | None,
              env: dict | None = None) -> None:
    """Checks made before any rank starts work; raises PlanError with a clear message."""
    env = os.environ if env is None else env
    if data_path is not None and not Path(data_path).exists():
        raise PlanError(f"data path {data_path} does not exist: pass --data with an existing file or "
                        "folder of bytes, or leave --data out to train on the built-in corpus")
    try:
        plan.validate(world_size)
    except ValueError as e:
        raise PlanError(f"plan {plan.name} does not fit {world_size} rank(s): {e}") from None
    if env.get("SLURM_JOB_ID"):
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        tasks = int(env.get("SLURM_NTASKS") or world_size)
        # Either one task per rank (srun / mpirun per rank) or one launcher task per node
        # (launch/slurm/pretrain.sbatch runs torchrun once per node).
        if tasks not in (world_size, nodes) or world_size % nodes:
            raise PlanError(
                f"Slurm allocation ({nodes} node(s), {tasks} task(s)) does not match plan {plan.name}, "
                f"which needs {plan.layout.world} ranks (dp {plan.layout.dp} x tp {plan.layout.tp}): "
                f"resubmit with --nodes x --ntasks-per-node = {plan.layout.world}, or pick a plan "
                "whose layout multiplies to the allocation")


def write_ds_config(plan: Plan, path: str | os.PathLike, monitor_dir: str | None = None) -> dict:
    cfg = plan.deepspeed_config(monitor_dir=monitor_dir or f"runs/{plan.name}/monitor")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


# -- printing -----------------------------------------------------------------------------------
def _fmt(b: float) -> str:
    return f"{b / GiB:10.3f} GiB" if b >= 2**20 or b == 0 else f"{b / 1024:10.1f} KiB"


def format_report(plan: Plan, world: int, est: Estimate, gpu_mem_gib: float) -> str:
    lay = plan.layout
    preset = plan.preset + (f" with {plan.model}" if plan.model else "")
    lines = [f"plan {plan.name}: preset {preset}, world {world} = dp {lay.dp} x tp {lay.tp} "
             f"(ep {lay.ep} inside dp, codebook shards {lay.cb or world}), ZeRO-{plan.zero_stage}, "
             f"micro {plan.micro_batch} x accum {plan.grad_accum} x seq {plan.seq_len}, {plan.dtype}, "
             f"ternary evidence rate {plan.ternary_rule().evidence_rate:g}",
             "", f"{'memory per rank':<58}{'bytes':>14}", "-" * 72]
    lines += [f"{k:<58}{_fmt(v)}" for k, v in est.rows.items()]
    lines += ["-" * 72]
    lines += [f"{'peak at ' + k:<58}{_fmt(v)}" for k, v in est.phases.items()]
    lines += [f"{'ESTIMATED PEAK (' + est.phase + ')':<58}{_fmt(est.peak)}  of {gpu_mem_gib:g} GiB "
              f"({100 * est.peak / (gpu_mem_gib * GiB):.0f}%)"]
    if "pinned_host_offload" in est.info:
        lines += [f"{'pinned host memory (offloaded checkpoint inputs)':<58}"
                  f"{_fmt(est.info['pinned_host_offload'])}"]
    lines += ["",
              f"{'communication per rank per step':<58}{'bytes sent':>14}", "-" * 72]
    lines += [f"{k:<58}{_fmt(v)}" for k, v in est.comm.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="arbd-plan", description=__doc__.split("\n")[0])
    p.add_argument("plan", help="shard plan YAML (shard_plans/*.yaml)")
    p.add_argument("--world", type=int, default=None, help="ranks (default: the plan's dp x tp)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--write-ds-config", metavar="PATH", help="write the DeepSpeed JSON here")
    p.add_argument("--monitor-dir", default=None, help="csv_monitor output (default runs/<plan>/monitor)")
    p.add_argument("--act-steps", type=float, default=None,
                   help="mean ACT steps per position for the activation estimate (default: the maximum)")
    p.add_argument("--checkpointing", action="store_true", help="peak with activation checkpointing")
    p.add_argument("--data", default=None, help="with --preflight: the data path to check")
    p.add_argument("--preflight", action="store_true",
                   help="also run the launch checks (data path, Slurm allocation)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    a = p.parse_args(argv)
    try:
        plan = load_plan(a.plan)
        world = plan.layout.world if a.world is None else a.world
        if a.preflight:
            preflight(plan, world, a.data)
        try:
            plan.validate(world)
        except ValueError as e:
            raise PlanError(str(e)) from None
        est = estimate(plan, world, act_steps=a.act_steps,
                       checkpointing=a.checkpointing or plan.activation_checkpointing)
        report = (json.dumps({"plan": plan.name, "world": world, "peak": est.peak, "phase": est.phase,
                              "phases": est.phases, "rows": est.rows, "comm": est.comm,
                              "info": est.info}, indent=1) if a.json
                  else format_report(plan, world, est, a.gpu_mem_gib))
        print(report)
        check(plan, world, a.gpu_mem_gib, est)
        if a.write_ds_config:
            write_ds_config(plan, a.write_ds_config, a.monitor_dir)
            print(f"wrote {a.write_ds_config}")
    except (PlanError, ValueError, FileNotFoundError) as e:
        print(f"arbd-plan: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
