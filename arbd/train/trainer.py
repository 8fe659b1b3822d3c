"""One trainer behind every launch entry point (launch/pretrain.py, launch/text.py, ...).

DeepSpeed runs the step: `deepspeed.initialize` with the config the shard plan implies, its
micro-batch / gradient-accumulation bookkeeping, float-gradient reduction and clipping, and its
CSV monitor; `TernaryOptimizer` applies the ternary update at each boundary. Works the same
under `deepspeed`, `torchrun`, `mpirun` or a plain `python` (one rank).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from arbd.data import ByteBatches, ValWindows, load_corpus
from arbd.data.modalities import ModalityBatches
from arbd.model.arb import ARBModel, check_training_backend
from arbd.parallel.mesh import Mesh
from arbd.parallel.parallelize import ParallelReducer, VotesOnOneRank, parallelize
from arbd.parallel.plan import Plan, load_plan
from arbd.parallel.sharded_kg import ShardedKGEdges
from arbd.ternary import ternary_state_bytes
from arbd.ternary.state import set_evidence_dtype
from arbd.train import checkpoint as ckpt
from arbd.train.distributed import init_distributed
from arbd.train.optim import TernaryOptimizer
from arbd.train.schedule import warmup_cosine

MEDIA = ("image", "video", "audio")
warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13 on DeepSpeed's collectives


class GarbageCollection:
    """Python's automatic collector off while training, a young-generation pass every `every`
    steps instead (0: leave Python's collector alone). An automatic full pass over the model's,
    autograd's and DeepSpeed's objects lands in a random step and stalls the host, which feeds
    the GPU (torchtitan manages collection the same way)."""

    def __init__(self, every: int = 50) -> None:
        self.every = every
        if every > 0:
            gc.disable()
            gc.collect(1)

    def step(self, step: int) -> None:
        if self.every > 0 and step % self.every == 0:
            # A full pass now and then frees cycles that outlived a young pass (objects promoted
            # to the oldest generation are never examined by gc.collect(1)).
            gc.collect(2 if step % (20 * self.every) == 0 else 1)

    def close(self) -> None:
        if self.every > 0:
            gc.enable()


class LossWatch:
    """Warns once when the train loss climbs well above where the run started: the usual sign
    that the ternary rule's evidence rate is too high for the model (TUNED_RULE took arb-small
    from 6 to 360). Not an error: such runs can come back as the schedule lowers the rate."""

    def __init__(self, rate: float, factor: float = 2.5) -> None:
        self.rate, self.factor = rate, factor
        self.first: tuple[int, float] | None = None
        self.warned = False

    def check(self, step: int, loss: float) -> str | None:
        if not math.isfinite(loss):
            return None                     # non-finite steps are skipped and counted elsewhere
        if self.first is None:
            self.first = (step, loss)
            return None
        if self.warned or loss <= self.factor * max(self.first[1], 1e-6):
            return None
        self.warned = True
        return (f"arbd: warning: train loss {loss:.4g} at step {step} is {loss / self.first[1]:.1f}x "
                f"its value at step {self.first[0]} ({self.first[1]:.4g}); if it keeps rising, the "
                f"ternary evidence rate ({self.rate:g}) is likely too high for this model: lower "
                f"it with the plan's `rule: {{evidence_rate: ...}}` (docs/decisions.md, \"The "
                f"evidence rate scales with the model\")")


def build_parser(description: str, *, lightweight_text: bool = False) -> argparse.ArgumentParser:
    import deepspeed

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--plan", default="shard_plans/cpu-2.yaml", help="shard plan YAML")
    p.add_argument("--preset", default=None, help="override the plan's model preset")
    p.add_argument("--data", default=None, help="byte file or directory (default: stdlib corpus)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-interval", type=int, default=1)
    p.add_argument("--eval-interval", type=int, default=0, help="0: evaluate only at the end")
    p.add_argument("--val-windows", type=int, default=32)
    p.add_argument("--save-interval", type=int, default=0)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--save-dir", default=None, help="checkpoints (default: <out>/checkpoints)")
    p.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (0: all)")
    p.add_argument("--resume", default=None,
                   help="checkpoint directory, a save dir, 'latest' (the pointer in --save-dir), or "
                        "'auto' (latest if --save-dir has one, else start fresh: elastic restarts)")
    p.add_argument("--async-save", action="store_true",
                   help="write checkpoint files in a background thread (the next save waits)")
    p.add_argument("--out", default="runs/pretrain", help="logs, metrics and the loss curve")
    p.add_argument("--backend", default=None, choices=["torch", "triton", "tilelang"],
                   help="ternary kernels (default: the plan's; triton on GPU)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="steps over which the ternary evidence rate ramps up (0: steps / 20, at "
                        "least 1); short runs of larger presets train more stably with more")
    p.add_argument("--gc-every", type=int, default=50,
                   help="Python garbage collection: automatic off, a young-generation pass every N "
                        "steps (0: Python's automatic collector)")
    p.add_argument("--wall-clock-breakdown", action="store_true",
                   help="DeepSpeed's forward/backward/step timers at every log interval")
    for flag in ("vq", "graph", "moe", "attention"):
        p.add_argument(f"--no-{flag}", action="store_true", default=lightweight_text)
    if lightweight_text:
        p.add_argument("--full-text-stack", action="store_true",
                       help="add VQ + KG/MoEGraph + KV attention to the byte-text stack")
    p.add_argument("--enable-output-router", action="store_true")
    for m, w in (("text", 1.0), ("code", 0.0), ("image", 0.0), ("audio", 0.0), ("video", 0.0)):
        p.add_argument(f"--{m}-weight", type=float, default=w)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed passes it
    deepspeed.add_config_arguments(p)
    return p


def model_config(args: argparse.Namespace, plan: Plan):
    """The plan's model (preset + its `model` overrides) with the modules the flags choose."""
    if getattr(args, "full_text_stack", False):
        args.no_vq = args.no_graph = args.no_moe = args.no_attention = False
    vision = args.image_weight > 0 or args.video_weight > 0
    return plan.model_config().with_overrides(
        use_vq=not args.no_vq, use_graph=not args.no_graph, use_moe=not args.no_moe,
        use_attention=not args.no_attention, use_output_router=args.enable_output_router,
        use_vision=vision, use_video_head=vision, use_audio=args.audio_weight > 0,
        use_talker_head=args.audio_weight > 0)


class Trainer:
    def __init__(self, args: argparse.Namespace) -> None:
        import deepspeed

        self.args = args
        self.rank, self.world, self.device = init_distributed()
        plan = load_plan(args.plan)
        if args.preset:
            plan = replace(plan, preset=args.preset)
        plan.validate(self.world)
        self.plan = plan
        self.mesh = Mesh(plan.layout)
        backend = args.backend or ("triton" if self.device.type == "cuda" else plan.backend)
        check_training_backend(backend)
        self.cfg = model_config(args, plan)
        torch.manual_seed(args.seed)
        model = ARBModel(self.cfg, backend=backend, seed=args.seed, device=self.device)
        model.ternary_rule = plan.ternary_rule()
        model.ternary_micro_batches = plan.grad_accum * plan.layout.dp
        model.activation_checkpointing = plan.activation_checkpointing
        model.activation_offload = plan.activation_offload
        set_evidence_dtype(model, plan.evidence_dtype)
        # MLA heads over tp, experts over ep, codebook rows over the codebook group.
        parallelize(model, self.mesh)
        self.save_dir = Path(args.save_dir) if args.save_dir else Path(args.out) / "checkpoints"
        self.resumed = None
        self.ckpt_writer = ckpt.CheckpointWriter(async_save=getattr(args, "async_save", False))
        ckpt.arm_test_kill(model, lambda: self.optimizer.steps, self.rank)  # only with ARBD_TEST_KILL
        resume = ckpt.resolve_resume(args.resume, self.save_dir)
        if resume:
            # Verified and checked against this run before anything changes; each rank loads the
            # boxes of its tp / ep / codebook split, and the reducer below then partitions the
            # accumulators for this dp.
            self.resumed = ckpt.read_checkpoint(resume, plan=plan, config=self.cfg, seed=args.seed,
                                                model_state=model.state_dict(), save_dir=self.save_dir,
                                                placements=ckpt.placements_for(model))
            _, index, state, _, runtime = self.resumed
            model.load_state_dict(ckpt.rank_state(index, state, runtime, self.rank, self.world))
        if self.world > 1:
            # ZeRO stage >= 1: each dp rank keeps and updates the accumulators of its row block;
            # experts reduce over their expert-dp group, codebooks update on their owners.
            ParallelReducer(model, self.mesh, zero_stage=plan.zero_stage, mode=plan.evidence,
                            dtype=torch.float64 if plan.dtype == "fp64" else torch.bfloat16)
        elif plan.evidence == "votes":
            # One rank, nothing to reduce, but the plan's rule still holds: each micro-batch
            # votes on its own, as it does on every rank of a larger world.
            model.ternary_evidence_reducer = VotesOnOneRank()
        self.model = model
        self.optimizer = TernaryOptimizer(
            [p for p in model.parameters() if p.requires_grad], model, lr=1e-3,
            micro_batches=model.ternary_micro_batches,
            rate_schedule=lambda s: warmup_cosine(s, args.steps, warmup=args.warmup_steps
                                                  or max(1, args.steps // 20)))
        ds_config = plan.deepspeed_config()
        self.out = Path(args.out)
        # DeepSpeed's own timers (forward / backward / step, printed every steps_per_print).
        ds_config["wall_clock_breakdown"] = bool(args.wall_clock_breakdown)
        if args.wall_clock_breakdown:
            ds_config["steps_per_print"] = max(1, args.log_interval)
        ds_config["csv_monitor"] = {"enabled": True, "output_path": str(self.out / "monitor"),
                                    "job_name": plan.name}
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                    config=ds_config, mpu=self.mesh)
        self.dtype = plan.torch_dtype
        corpus = load_corpus(args.data)
        dp, dpr = plan.layout.dp, self.mesh.dp_index
        self.text = ByteBatches(corpus.train, plan.seq_len, plan.micro_batch, grad_accum=plan.grad_accum,
                                dp_rank=dpr, dp_size=dp, seed=args.seed)
        self.code = ByteBatches(corpus.train, plan.seq_len, plan.micro_batch, grad_accum=plan.grad_accum,
                                dp_rank=dpr, dp_size=dp, seed=args.seed + 1)
        self.media = {m: ModalityBatches(m, plan.micro_batch, grad_accum=plan.grad_accum, dp_rank=dpr,
                                         dp_size=dp, seed=args.seed)
                      for m in MEDIA if getattr(args, f"{m}_weight") > 0}
        self.val = (ValWindows(corpus.val, plan.seq_len + 1, plan.micro_batch, dp_rank=dpr, dp_size=dp,
                               max_windows=args.val_windows)
                    if corpus.val and (args.text_weight > 0 or args.code_weight > 0) else None)
        self.history: list[dict] = []
        self._a2a_seen = 0
        self.start_step = 0
        if self.resumed is not None:
            self._restore(*self.resumed)

    # -- checkpoints -------------------------------------------------------------------------
    def _loaders(self) -> dict:
        return {"text": self.text, "code": self.code, **{f"media/{m}": b for m, b in self.media.items()}}

    def _restore(self, path: Path, index: dict, _model_state: dict, float_state: dict,
                 runtime: dict) -> None:
        """The rest of a verified checkpoint: AdamW state, loaders, RNG, counters, history."""
        ckpt.load_float_state(self.engine, self.model, float_state)
        ckpt.load_ledger(self.model, runtime, index["ledger_counts"], self.rank, self.world)
        for name, loader in self._loaders().items():
            if name not in index["loaders"]:
                raise ckpt.CheckpointError(f"{path / ckpt.INDEX}: no position for loader {name!r}")
            loader.load_state_dict(index["loaders"][name])
        rngs = index["rng"]
        # Same world: each rank its own stream; another world: rank 0's for all (documented).
        ckpt.set_rng_state(rngs[self.rank] if len(rngs) == self.world else rngs[0])
        self.optimizer.steps = index["optimizer_steps"]
        for k, v in index["ternary_stats"].items():
            setattr(self.model.ternary_stats, k, v)
        for k, v in index["engine"].items():
            setattr(self.engine, k, v)
        self.history = index["history"]
        self.start_step = index["step"]
        if self.rank == 0:
            print(f"arbd: resumed from {path} at step {self.start_step}", flush=True)

    def save(self, step: int) -> Path | None:
        """Collective: every rank writes its own shard files (its ZeRO rows, ...); rank 0 writes
        the index and renames. With --async-save the files are written in the background, and
        the last step's save is waited for."""
        state = self.model.state_dict()  # this rank's pieces: nothing is gathered
        floats = ckpt.gather_float_state(self.engine, self.model)
        ledger, ledger_count = ckpt.ledger_state(self.model)
        st = self.model.ternary_stats
        meta = {"plan": self.plan, "preset": self.plan.preset, "config": self.cfg, "seed": self.args.seed,
                "world": self.world, "run_steps": self.args.steps,
                "loaders": {k: v.state_dict() for k, v in self._loaders().items()},
                "optimizer_steps": self.optimizer.steps,
                "ternary_stats": {f.name: getattr(st, f.name) for f in dataclasses.fields(st)},
                "engine": {k: getattr(self.engine, k) if hasattr(self.engine, k) else 0
                           for k in ("global_steps", "global_samples", "micro_steps")},
                "history": self.history}
        out = self.ckpt_writer.save(self.save_dir, step, model_state=state, meta=meta, float_state=floats,
                                    placements=ckpt.placements_for(self.model, state),
                                    runtime_state=ledger,
                                    rank_meta={"rng": ckpt.rng_state(), "ledger_counts": ledger_count},
                                    keep_last=self.args.keep_last, rank=self.rank, world=self.world)
        if self.ckpt_writer.async_save and step != self.args.steps:
            return out
        self.ckpt_writer.wait()
        if dist.is_initialized():
            dist.barrier()  # nobody runs ahead (or exits) while rank 0 is still renaming
        return out

    # -- one step ----------------------------------------------------------------------------
    def _micro_batch_loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        a, parts, total = self.args, {}, torch.zeros((), device=self.device)
        for name, batches, w in (("text", self.text, a.text_weight), ("code", self.code, a.code_weight)):
            if w > 0:
                x, y = next(batches)
                out = self.engine(torch.cat([x, y[:, -1:]], 1).to(self.device), dtype=self.dtype)
                total = total + w * out.loss
                parts[name] = out.losses["byte"].item()
                parts.setdefault("bpb", out.losses["bpb"].item())
        for m, batches in self.media.items():
            out = self.model.forward_media(m, next(batches).to(self.device))
            total = total + getattr(a, f"{m}_weight") * out.loss
            parts[m] = out.losses[m].item()
        return total, parts

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        parts: dict[str, float] = {}
        loss_sum = 0.0
        for _ in range(self.plan.grad_accum):
            loss, parts = self._micro_batch_loss()
            self.optimizer.record_loss(loss)
            self.engine.backward(loss)
            self.optimizer.end_micro_batch()
            self.engine.step()
            loss_sum += float(loss.detach())
        if self.plan.layout.dp > 1:   # the logged loss is the global batch's, not this rank's
            t = torch.tensor([loss_sum], dtype=torch.float64)
            dist.all_reduce(t, group=self.mesh.dp_group)
            loss_sum = float(t) / self.plan.layout.dp
        stats = self.model.ternary_stats
        rec = {"loss": loss_sum / self.plan.grad_accum, **parts,
               "step_s": time.perf_counter() - t0, "trit_flips": stats.last.get("trit_flips", 0),
               "skipped": stats.skipped_nonfinite_loss + stats.skipped_nonfinite_grad}
        rec["tokens_per_s"] = self.plan.global_batch * self.plan.seq_len / rec["step_s"]
        rec["a2a_bytes"] = self._a2a_bytes() - self._a2a_seen   # this rank, this step
        self._a2a_seen += rec["a2a_bytes"]
        return rec

    def _a2a_bytes(self) -> int:
        """Bytes this rank has sent to other ranks in all-to-alls so far: expert dispatch and
        the sharded codebooks' lookups and updates."""
        total = 0
        for m in self.model.modules():
            comm = getattr(m, "comm", None)
            if comm is not None and hasattr(comm, "lookup_bytes"):
                total += comm.lookup_bytes + comm.update_bytes
            stats = getattr(getattr(m, "dispatch", None), "stats", None)
            if isinstance(stats, dict):
                total += stats.get("bytes_sent", 0)
        return total

    @torch.no_grad()
    def evaluate(self) -> float:
        """Held-out bits per byte (next byte) over the validation windows of all dp ranks."""
        if self.val is None:
            return float("nan")
        self.model.eval()
        bits = torch.zeros(2, dtype=torch.float64)
        for x, y in self.val:
            out = self.model(torch.cat([x, y[:, -1:]], 1).to(self.device), dtype=self.dtype)
            n = out.byte_logits.shape[0] * (x.shape[1] + 1 - 3)
            bits += torch.tensor([float(out.losses["bpb"]) * n, n], dtype=torch.float64)
        self.model.train()
        dist.all_reduce(bits, group=self.mesh.dp_group)
        return float(bits[0] / bits[1])

    @torch.no_grad()
    def kg_occupancy(self) -> dict[str, float]:
        """How full the fixed-capacity KG adjacency is, over the whole graph: a growing share of
        full rows means new neighbours now evict old ones (ARBConfig.kg_edges_per_node)."""
        kg = getattr(self.model, "kg_edges", None)
        if kg is None:
            return {}
        occ = kg.occupancy()
        if isinstance(kg, ShardedKGEdges):
            dist.all_reduce(occ, group=kg.group)   # shards of one graph: sum their rows
        rows, with_edges, full, edges = occ.tolist()
        return {"kg_rows_with_edges": with_edges / rows, "kg_rows_full": full / rows,
                "kg_edges_per_used_row": edges / max(with_edges, 1.0)}

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        a = self.args
        lead = self.rank == 0
        state_bytes, weights = ternary_state_bytes(self.model)
        if lead:
            self.out.mkdir(parents=True, exist_ok=True)
            print(f"arbd: plan={self.plan.name} preset={self.plan.preset} world={self.world} "
                  f"dp={self.plan.layout.dp} zero={self.plan.zero_stage} global_batch={self.plan.global_batch} "
                  f"ternary_weights={weights:,} state={state_bytes / weights:.3f} B/weight", flush=True)
        bar = None
        if lead and not a.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=a.steps, desc="train", dynamic_ncols=True, mininterval=1.0)
        if bar is not None:
            bar.update(self.start_step)
        collector = GarbageCollection(getattr(a, "gc_every", 0))
        watch = LossWatch(self.model.ternary_rule.evidence_rate)
        for step in range(self.start_step + 1, a.steps + 1):
            rec = self.train_step()
            collector.step(step)
            rec["step"] = step
            alarm = watch.check(step, rec["loss"])
            if alarm and lead:
                print(alarm, file=sys.stderr, flush=True)
            if a.eval_interval and step % a.eval_interval == 0 and step < a.steps:
                rec["val_bpb"] = self.evaluate()
            if step == a.steps:
                rec["val_bpb"] = self.evaluate()
            if "val_bpb" in rec:
                rec.update(self.kg_occupancy())
            self._a2a_seen = self._a2a_bytes()   # evaluation traffic is not a training step's
            self.history.append(rec)
            self.engine.monitor.write_events([(f"train/{k}", v, step) for k, v in rec.items()
                                              if isinstance(v, (int, float)) and k != "step"])
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
            if lead and (step % a.log_interval == 0 or step == a.steps):
                extra = f" val_bpb={rec['val_bpb']:.4f}" if "val_bpb" in rec else ""
                print(f"step {step} loss={rec['loss']:.4f} bpb={rec.get('bpb', float('nan')):.4f} "
                      f"tokens/s={rec['tokens_per_s']:.0f} flips={rec['trit_flips']}{extra}", flush=True)
            if a.save_interval and not a.no_save and (step % a.save_interval == 0 or step == a.steps):
                self.save(step)
        collector.close()
        if bar is not None:
            bar.close()
        if lead:
            self._write_outputs()
        return self.history

    def _write_outputs(self) -> None:
        (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in self.history], [r["loss"] for r in self.history], label="train loss")
        val = [(r["step"], r["val_bpb"] * math.log(2)) for r in self.history if "val_bpb" in r]
        if val:
            ax.plot(*zip(*val), "o", label="held-out next-byte loss (nats)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.plan.name} / {self.plan.preset}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)
        print(f"wrote {self.out / 'loss.png'} and {self.out / 'history.json'}", flush=True)


# Modality entry points (launch/audio.py, vision.py, diffusion.py): their loss weights, and only
# their components (seed 19: no VQ, graph, KV attention, router or unrelated heads). "diffusion"
# trains the video generation path (VAE2D latents + VideoHead, compressed temporal windows):
# arbd has no separate diffusion network.
MODALITY_DEFAULTS = {
    "audio": dict(text_weight=0.0, audio_weight=1.0),
    "vision": dict(text_weight=0.0, image_weight=1.0),
    "diffusion": dict(text_weight=0.0, video_weight=1.0),
}


def _arm_stall_dump() -> None:
    """ARBD_STALL_DUMP_S=N: every N seconds, each rank writes all its threads' Python stacks to
    stderr. For a run that hangs (a rank waiting on a collective another never entered): the
    last dumps of the ranks show where each one waits. Off by default."""
    s = os.environ.get("ARBD_STALL_DUMP_S", "")
    if not s:
        return
    try:
        secs = float(s)
    except ValueError:
        raise SystemExit(f"arbd: ARBD_STALL_DUMP_S must be a number of seconds, got {s!r}") from None
    if secs <= 0:
        raise SystemExit(f"arbd: ARBD_STALL_DUMP_S must be > 0, got {s!r}")
    import faulthandler
    faulthandler.dump_traceback_later(secs, repeat=True, file=sys.stderr)


def main(argv: list[str] | None = None, *, description: str = "arbd pretraining",
         lightweight_text: bool = False, modality: str | None = None) -> int:
    parser = build_parser(description, lightweight_text=lightweight_text)
    if modality is not None:
        parser.set_defaults(no_vq=True, no_graph=True, no_attention=True, **MODALITY_DEFAULTS[modality])
    args = parser.parse_args(argv)
    _arm_stall_dump()
    try:
        trainer = Trainer(args)
    except ckpt.CheckpointError as e:  # a clear one-line refusal, not a traceback
        raise SystemExit(f"arbd: cannot resume: {e}") from None
    trainer.run()
    if dist.is_initialized():
        # Rank 0 writes the outputs after the last collective; tearing gloo down on the other
        # ranks while it still holds connections aborted a rank at exit (seen in CI).
        dist.barrier()
        dist.destroy_process_group()
    return 0
