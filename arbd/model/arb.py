"""ARBModel: every system of the seeds, assembled as plain PyTorch (no collectives).

Text path (seed 14 sections 4-7, seed 19):

    bytes -> Sequencer [B, T-2, d] -> (+ MemGram) -> (+ LTI)
          -> (+ SharedVQ bridge: norm(vq_to_trigram(motif)), motif ids)
          -> MLA layers (residual)
          -> KV ledger -> ContextAttentionScheduler -> MoEGraph (KG edges, ACT experts)
          -> CompositeProposalHead (KG VQ) ;  ByteHead (next trigram) ; OutputRouter (non-text)

Image/video enter through the VAE2D sidecar and audio through its own sequencer; their tokens
take the same MLA + MoEGraph trunk and are read by VideoHead / TalkerHead.

The VQ bridge is added to the sequencer state rather than replacing it: a single motif id out of
millions per position is a hard bottleneck for byte prediction, and the residual keeps the
sequencer's information while the motif carries what the codebook learns (docs/decisions.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from arbd.config import ARB_TILELANG_TRAINING, HEAD_CHUNK, NGRAM, ARBConfig
from arbd.model.audio import AudioSequencer
from arbd.model.composite import CompositeProposalHead
from arbd.model.heads import HEAD_NAMES, ByteHead, OutputRouter, TalkerHead, VideoHead
from arbd.model.kg_edges import KGEdges
from arbd.model.ledger import KVLedger
from arbd.model.lti import LTIInjection
from arbd.model.memgram import MemGram
from arbd.model.mla import MLA
from arbd.model.moegraph import MoEGraph
from arbd.model.recompute import maybe_recompute
from arbd.model.sequencer import Sequencer
from arbd.model.vae2d import VAE2DSequencer
from arbd.ternary import TernaryUpdateMixin, ternary_matrices
from arbd.vq import SharedVQ

# Which seed-14 area each top-level submodule's weights belong to.
AREA_OF = {
    "sequencer": "Embedding + text sequencer",
    "shared_vq": "Shared VQ + VQ bridge",
    "moegraph": "MoEGraph",
    "composite": "KG VQ + composite proposal",
    "router": "Router",
    "byte_head": "ByteHead",
    "video_head": "Video/Talker heads",
    "talker_head": "Video/Talker heads",
    "layers": "MLA attention",
    "memgram": "Sidecars (outside seed 14)",
    "lti": "Sidecars (outside seed 14)",
    "vision": "Sidecars (outside seed 14)",
    "audio": "Sidecars (outside seed 14)",
}
MODALITIES = ("text", "code", "image", "video", "audio")


def check_training_backend(backend: str) -> None:
    """Seed 19's guard: the experimental TileLang path may not train unless explicitly allowed."""
    if backend == "tilelang":
        if not ARB_TILELANG_TRAINING:
            raise ValueError("training on backend 'tilelang' is refused: its update path is "
                             "experimental; set ARB_TILELANG_TRAINING=1 to allow it, or use "
                             "backend 'torch' or 'triton'")
        raise ValueError("backend 'tilelang' is not available: TileLang is not a dependency of arbd")


@dataclass
class LossWeights:
    vq: float = 1.0          # shared VQ codebook + commitment
    composite: float = 0.1   # KG VQ codebook + commitment
    balance: float = 0.01    # MoE load balance
    ponder: float = 0.001    # ACT steps
    router: float = 0.1      # OutputRouter head choice (non-text)


@dataclass
class ARBOutput:
    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    byte_logits: torch.Tensor | None = None     # [B, T-2, 3, 256]
    motif_ids: torch.Tensor | None = None       # [B, T-2]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class ARBModel(TernaryUpdateMixin, nn.Module):
    def __init__(self, cfg: ARBConfig, backend: str = "torch", seed: int = 0,
                 device: torch.device | str | None = None,
                 loss_weights: LossWeights | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.loss_weights = loss_weights or LossWeights()
        if device is not None and torch.device(device).type == "meta":
            with torch.device("meta"):  # shapes only (e.g. counting arb-3b): no init work at all
                self._build(cfg, backend, seed, device)
        else:
            # Random init draws from CPU generators; parts built without `device` move after.
            self._build(cfg, backend, seed, device)
            if device is not None:
                self.to(device)

    def _build(self, cfg: ARBConfig, backend: str, seed: int, device) -> None:
        g = torch.Generator().manual_seed(seed)
        kw = dict(backend=backend, generator=g, device=device)
        self.sequencer = Sequencer(cfg, backend=backend, generator=g)
        self.memgram = MemGram(cfg, **kw) if cfg.use_memgram else None
        self.lti = LTIInjection(cfg, **kw) if cfg.use_lti else None
        self.shared_vq = SharedVQ(cfg, generator=g, device=device) if cfg.use_vq else None
        self.layers = (nn.ModuleList(MLA(cfg, i, backend, generator=g, device=device)
                                     for i in range(cfg.n_layers)) if cfg.use_attention else None)
        self.moegraph = MoEGraph(cfg, backend, g) if (cfg.use_moe or cfg.use_graph) else None
        # KG edges need motif ids, so they exist only with both the graph and the shared VQ.
        self.kg_edges = (KGEdges(cfg.shared_vq_size, cfg.kg_edges_per_node, device=device)
                         if cfg.use_graph and cfg.use_vq else None)
        self.composite = CompositeProposalHead(cfg, **kw) if cfg.use_graph else None
        self.router = OutputRouter(cfg, backend, g) if cfg.use_output_router else None
        self.byte_head = ByteHead(cfg, backend, g)
        self.video_head = VideoHead(cfg, backend, g) if cfg.use_video_head else None
        self.talker_head = TalkerHead(cfg, backend, g) if cfg.use_talker_head else None
        self.vision = VAE2DSequencer(cfg, **kw) if cfg.use_vision else None
        self.audio = AudioSequencer(cfg, **kw) if cfg.use_audio else None
        self.ledger = KVLedger(cfg.kv_ledger_len)
        # The one float parameter: a learned log-temperature of the byte logits. Ternary heads
        # move their logit scale only in 2^(1/16) steps; this lets calibration move smoothly,
        # and gives DeepSpeed's optimizer, clipping and ZeRO a real float parameter to drive.
        self.logit_scale = nn.Parameter(torch.zeros(1, device=device))

    # -- shared trunk ------------------------------------------------------------------------
    # Activation checkpointing (plan field `activation_checkpointing`): each MLA layer, MemGram,
    # LTI, the ByteHead (in chunks of positions) and MoEGraph (its scheduler and each ACT step on
    # their own, or the whole block under expert parallelism) keep only their inputs and run their
    # forward again in backward. Safe here because nothing they read changes within a step (KG
    # edges and codebook rows move at the update, the ledger view is an argument), their forwards
    # change no state, and every rank recomputes at the same point of its backward, so the
    # collectives inside (tp, ep, codebook group) stay matched. The VQ blocks are not recomputed:
    # their forward records codebook usage.
    activation_checkpointing: bool = False
    activation_offload: bool = False   # the regions' kept inputs wait in host memory (recompute.py)
    head_chunk_positions: int = HEAD_CHUNK   # positions per recomputed ByteHead chunk

    def _recomputing(self) -> bool:
        return self.activation_checkpointing and self.training

    def _maybe_checkpoint(self, fn, *args):
        return maybe_recompute(self._recomputing(), fn, *args, offload=self.activation_offload)

    def _byte_logits(self, h: torch.Tensor) -> torch.Tensor:
        """ByteHead logits [B, T', 3, 256]; recomputed in chunks of at most head_chunk_positions
        positions (the head works position by position, so the batch is flattened first)."""
        n = self.head_chunk_positions
        if not self._recomputing() or h.shape[0] * h.shape[1] <= n:
            return self._maybe_checkpoint(self.byte_head, h)
        flat = h.reshape(-1, h.shape[-1])
        out = torch.cat([self._maybe_checkpoint(self.byte_head, c) for c in flat.split(n)])
        return out.reshape(*h.shape[:-1], *out.shape[1:])

    def _trunk(self, h: torch.Tensor, motif_ids: torch.Tensor | None,
               losses: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.layers is not None:
            for layer in self.layers:
                h = h + self._maybe_checkpoint(layer, h)
        if self.moegraph is not None:
            mg = self.moegraph
            codebook = self.shared_vq.codebook if self.shared_vq is not None else None
            # Step by step where the experts run locally; under expert parallelism the whole
            # block, so that every rank re-runs its all-to-alls in forward order (decisions.md).
            mg.recompute_steps = self._recomputing() and not mg.expert_parallel
            mg.offload_inputs = self.activation_offload
            h, aux = maybe_recompute(self._recomputing() and not mg.recompute_steps, mg, h,
                                     motif_ids, codebook, self.kg_edges, self.ledger.view(),
                                     offload=self.activation_offload)
            if "balance" in aux:
                losses["balance"] = aux["balance"]
                losses["ponder"] = aux["ponder"]
        return h

    def _total(self, losses: dict[str, torch.Tensor], main: str) -> torch.Tensor:
        w = self.loss_weights
        scale = {"vq": w.vq, "composite": w.composite, "balance": w.balance, "ponder": w.ponder,
                 "router": w.router}
        return sum(v.float() * scale.get(k, 1.0) for k, v in losses.items() if k != "bpb") \
            if losses else torch.zeros(())

    # -- text --------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> ARBOutput:
        """Bytes [B, T] -> next-trigram logits at every position, and the training losses.

        Position i sees bytes <= i+2 and predicts bytes i+3, i+4, i+5 (each where it exists).
        """
        if ids.dim() != 2 or ids.shape[1] < NGRAM + 1:
            raise ValueError(f"ARBModel expects bytes [B, T] with T >= {NGRAM + 1}, got {tuple(ids.shape)}")
        losses: dict[str, torch.Tensor] = {}
        h = self.sequencer(ids, dtype)
        if self.memgram is not None:
            h = self._maybe_checkpoint(self.memgram, ids, h)
        if self.lti is not None:
            h = self._maybe_checkpoint(self.lti, h)
        motif_ids = None
        if self.shared_vq is not None:
            vq = self.shared_vq(h)
            h = h + vq.hidden
            motif_ids = vq.ids
            losses["vq"] = vq.loss
        if self.training:
            # Training batches are unrelated windows: a batch's ledger starts from its own
            # bytes, never from another micro-batch's predictions (which would also make the
            # result depend on how micro-batches are spread over ranks).
            self.ledger.reset()
        self.ledger.seed(ids)
        h = self._trunk(h, motif_ids, losses)
        logits = self._byte_logits(h) * self.logit_scale.exp().to(h.dtype)
        t = ids.shape[1]
        terms = [F.cross_entropy(logits[:, :t - NGRAM - j, j].reshape(-1, logits.shape[-1]).float(),
                                 ids[:, NGRAM + j:].reshape(-1)) for j in range(NGRAM)]
        losses["byte"] = sum(terms) / NGRAM
        losses["bpb"] = terms[0].detach() / torch.log(torch.tensor(2.0))
        if self.composite is not None:
            comp = self.composite(h)
            losses["composite"] = comp.loss
        if self.training and self.kg_edges is not None:
            # Observed after the step's update (KGEdges.on_ternary_step), not now: forwards
            # of one step all read the graph of the step's start, in any layout.
            self.kg_edges.stage(motif_ids[:, :-1], motif_ids[:, 1:])
        # The ledger remembers what the model predicted (seed 14): the newest predictions.
        pred = logits[:, :, 0].argmax(-1)
        self.ledger.append(pred[:, -min(pred.shape[1], self.ledger.length):])
        return ARBOutput(self._total(losses, "byte"), losses, logits, motif_ids)

    # -- other modalities --------------------------------------------------------------------
    def forward_media(self, kind: str, data: torch.Tensor) -> ARBOutput:
        """Images [B, C, H, W], video [B, F, C, H, W] or audio [B, S]: next-token latent regression."""
        if kind not in ("image", "video", "audio"):
            raise ValueError(f"forward_media kind must be image, video or audio, got {kind!r}")
        losses: dict[str, torch.Tensor] = {}
        if kind == "audio":
            if self.audio is None or self.talker_head is None:
                raise ValueError("audio needs use_audio and use_talker_head")
            h = self.audio(data)
            target, head, label = self.audio.frame_targets(data), self.talker_head, 2
        else:
            if self.vision is None or self.video_head is None:
                raise ValueError(f"{kind} needs use_vision and use_video_head")
            h = self.vision(data)
            target, head, label = self._vision_targets(data), self.video_head, 1
            losses["vae"] = self.vision.loss(data)["loss"]
        h = self._trunk(h, None, losses)
        pred = head(h[:, :-1])
        losses[kind] = F.mse_loss(pred.float(), target[:, :pred.shape[1]].float())
        if self.router is not None:
            route = self.router(h)
            losses["router"] = F.cross_entropy(route.reshape(-1, len(HEAD_NAMES)).float(),
                                               torch.full((route.shape[0] * route.shape[1],), label,
                                                          device=route.device))
        return ARBOutput(self._total(losses, kind), losses, extras={"prediction": pred})

    @torch.no_grad()
    def _vision_targets(self, data: torch.Tensor) -> torch.Tensor:
        """Next-token targets: the VAE mean of the next patch token, RMS-normalised per token.

        The VAE trains at the same time, so its raw means drift in scale; regressing a
        normalised target keeps the VideoHead loss bounded while the encoder moves."""
        if data.dim() == 4:
            mu = self.vision.encode(data)[0][:, 1:]
        else:
            b, f = data.shape[:2]
            mu = self.vision.encode(data.flatten(0, 1))[0].unflatten(0, (b, f))   # [B, F, N, L]
            mu = mu[:, ::self.vision.temporal_stride].flatten(1, 2)[:, 1:]       # window starts
        return mu * torch.rsqrt(mu.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(mu.dtype)

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_bytes: int, *, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample bytes after `prompt` [B, T >= 4]; the ledger is seeded with the prompt."""
        was = self.training
        self.eval()
        self.ledger.reset()
        self.ledger.seed(prompt)
        out = prompt
        window = max(self.cfg.kv_cache_len, NGRAM + 1)
        for _ in range(max_new_bytes):
            logits = self(out[:, -window:]).byte_logits[:, -1, 0].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
            out = torch.cat([out, nxt], 1)
        self.train(was)
        return out


def area_weights(model: ARBModel) -> dict[str, int]:
    """Logical ternary weights per seed-14 area, counted from the built modules' matrices."""
    counts: dict[str, int] = {}
    for name, m in ternary_matrices(model):
        area = AREA_OF[name.split(".")[0]]
        counts[area] = counts.get(area, 0) + m.rows * m.cols
    return counts
