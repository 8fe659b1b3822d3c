"""Shard plans: a YAML file that says how a run is laid out, and the DeepSpeed config it implies.

    name: cpu-2
    preset: arb-tiny
    layout: {dp: 2, tp: 1, ep: 1, codebook_shards: 0}   # 0 = the whole world
    zero_stage: 1
    micro_batch: 4
    grad_accum: 2
    seq_len: 64
    dtype: fp32            # fp32 | bf16 (bf16 on GPU)
    backend: torch         # torch | triton
    evidence: summed       # data-parallel ternary evidence: summed | votes
    evidence_dtype: fp32   # dense evidence summed over a step's micro-batches: fp32 | bf16
    activation_checkpointing: false   # recompute MLA layers and MoEGraph in backward
    activation_offload: false         # with checkpointing on CUDA: kept inputs wait in host memory
    model: {kg_edges_per_node: 32}    # optional: ARBConfig fields that differ from the preset
    rule: {evidence_rate: 1.5}        # optional: TernaryRule fields that differ from the preset's

Every error names the field and a fix. The planner (memory table, communication volume,
`arbd-plan`) is arbd/parallel/planner.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from arbd.config import PRESETS, ARBConfig, get_preset
from arbd.parallel.mesh import Layout
from arbd.ternary import state as ternary_state
from arbd.ternary.rule import TUNED_RULE, TernaryRule, preset_rule

DTYPES = ("fp32", "bf16", "fp64")   # fp64: CPU reference runs (equivalence tests)
EVIDENCE_MODES = ("summed", "votes")
EVIDENCE_DTYPES = tuple(ternary_state.EVIDENCE_DTYPES)   # names set_evidence_dtype takes


@dataclass(frozen=True)
class Plan:
    name: str
    preset: str
    layout: Layout
    zero_stage: int = 0
    micro_batch: int = 1
    grad_accum: int = 1
    seq_len: int = 64
    dtype: str = "fp32"
    backend: str = "torch"
    evidence: str = "summed"
    evidence_dtype: str = "fp32"   # bf16 halves the float evidence a step holds (planner)
    activation_checkpointing: bool = False   # MLA layers and MoEGraph recompute in backward
    activation_offload: bool = False   # the recomputed regions' inputs in pinned host memory
    model: dict = field(default_factory=dict)   # ARBConfig overrides on top of the preset
    rule: dict = field(default_factory=dict)    # TernaryRule overrides on top of preset_rule()

    # The launcher's modality flags (--no-vq, --image-weight, ...) decide these; a plan that
    # also set them would be silently overruled, so it may not.
    LAUNCH_FLAG_FIELDS = ("use_vq", "use_graph", "use_moe", "use_attention", "use_output_router",
                          "use_vision", "use_video_head", "use_audio", "use_talker_head")

    def model_config(self) -> ARBConfig:
        """The preset with this plan's `model` overrides applied."""
        if not isinstance(self.model, dict):
            raise ValueError(f"plan {self.name}: model must be a mapping of ARBConfig fields, "
                             f"got {self.model!r}")
        flags = sorted(set(self.model) & set(self.LAUNCH_FLAG_FIELDS))
        if flags:
            raise ValueError(f"plan {self.name}: model may not set {flags}; the launcher's flags "
                             "(--no-vq, --no-graph, --no-moe, --no-attention, --*-weight) choose "
                             "the modules")
        try:   # ARBConfig checks names, types and ranges
            return get_preset(self.preset).with_overrides(**self.model)
        except ValueError as e:
            raise ValueError(f"plan {self.name}: model: {e}") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The activation dtype this plan trains in."""
        return {"bf16": torch.bfloat16, "fp64": torch.float64}.get(self.dtype, torch.float32)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.layout.dp

    def ternary_rule(self) -> TernaryRule:
        """The preset's rule (rule.preset_rule) with this plan's `rule` overrides: the
        trainer's update rule."""
        if not isinstance(self.rule, dict):
            raise ValueError(f"plan {self.name}: rule must be a mapping of TernaryRule fields, "
                             f"got {self.rule!r}")
        names = {f.name for f in dataclasses.fields(TernaryRule)} - {"salt"}   # the update sets salt
        unknown = sorted(set(self.rule) - names)
        if unknown:
            raise ValueError(f"plan {self.name}: rule: unknown TernaryRule field(s) {unknown}; "
                             f"valid fields: {sorted(names)}")
        for k, v in self.rule.items():
            want = type(getattr(TUNED_RULE, k))
            accepted = (int, float) if want is float else want   # YAML writes 2.0 as 2
            if isinstance(v, bool) != (want is bool) or not isinstance(v, accepted):
                raise ValueError(f"plan {self.name}: rule.{k} must be {want.__name__} like "
                                 f"TUNED_RULE's {getattr(TUNED_RULE, k)!r}, got {v!r}")
        try:   # TernaryRule checks the ranges
            return dataclasses.replace(preset_rule(self.preset), **self.rule)
        except ValueError as e:
            raise ValueError(f"plan {self.name}: rule: {e}") from None

    def validate(self, world_size: int | None = None) -> None:
        cfg = self.model_config()
        self.ternary_rule()
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"plan {self.name}: zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage == 3:
            raise ValueError(f"plan {self.name}: zero_stage 3 is not supported (DeepSpeed refuses "
                             "ZeRO-3 with its MoE layers and the ternary state is partitioned "
                             "from stage 1 already); use zero_stage 1 or 2")
        for name in ("micro_batch", "grad_accum", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"plan {self.name}: {name} must be a positive int, got {v!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"plan {self.name}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"plan {self.name}: activation_checkpointing must be true or false, "
                             f"got {self.activation_checkpointing!r}")
        if not isinstance(self.activation_offload, bool):
            raise ValueError(f"plan {self.name}: activation_offload must be true or false, "
                             f"got {self.activation_offload!r}")
        if self.activation_offload and not self.activation_checkpointing:
            raise ValueError(f"plan {self.name}: activation_offload moves the inputs that "
                             "activation checkpointing keeps; set activation_checkpointing: true "
                             "or drop activation_offload")
        if self.evidence not in EVIDENCE_MODES:
            raise ValueError(f"plan {self.name}: evidence must be one of {EVIDENCE_MODES}, "
                             f"got {self.evidence!r}")
        if self.evidence_dtype not in EVIDENCE_DTYPES:
            raise ValueError(f"plan {self.name}: evidence_dtype must be one of {EVIDENCE_DTYPES}, "
                             f"got {self.evidence_dtype!r}")
        if cfg.n_heads % self.layout.tp:
            raise ValueError(f"plan {self.name}: layout.tp = {self.layout.tp} must divide the "
                             f"{cfg.n_heads} attention heads of {self.preset}")
        if cfg.n_experts % self.layout.ep:
            raise ValueError(f"plan {self.name}: layout.ep = {self.layout.ep} must divide the "
                             f"{cfg.n_experts} experts of {self.preset}")
        if world_size is not None:
            self.layout.validate(world_size)

    def deepspeed_config(self, monitor_dir: str | None = None) -> dict[str, Any]:
        """The DeepSpeed JSON this plan implies (batch sizes consistent by construction);
        with `monitor_dir`, DeepSpeed's CSV monitor writes the training scalars there."""
        cfg = {
            "train_batch_size": self.global_batch,
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,   # our optimizer also runs the ternary update
            "bf16": {"enabled": self.dtype == "bf16"},
            "wall_clock_breakdown": False,
            "steps_per_print": 10**9,                 # we log ourselves
        }
        if monitor_dir is not None:
            cfg["csv_monitor"] = {"enabled": True, "output_path": str(monitor_dir), "job_name": self.name}
        return cfg


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file; errors name the file and the field."""
    p = Path(path)
    if not p.is_file():
        shipped = sorted(x.stem for x in (Path(__file__).resolve().parents[2] / "shard_plans").glob("*.yaml"))
        raise FileNotFoundError(f"shard plan {p} not found; shipped plans: {shipped}")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: a plan must be a YAML mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(Plan)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{p}: unknown plan field(s) {unknown}; known: {sorted(known)}")
    lay = raw.pop("layout", {}) or {}
    lay_known = {"dp", "tp", "ep", "codebook_shards"}
    if set(lay) - lay_known:
        raise ValueError(f"{p}: unknown layout field(s) {sorted(set(lay) - lay_known)}; known: {sorted(lay_known)}")
    layout = Layout(dp=lay.get("dp", 1), tp=lay.get("tp", 1), ep=lay.get("ep", 1),
                    cb=lay.get("codebook_shards", 0))
    if raw.get("preset") not in PRESETS:
        raise ValueError(f"{p}: preset must be one of {sorted(PRESETS)}, got {raw.get('preset')!r}")
    for key in ("model", "rule"):
        if key in raw and raw[key] is None:   # `model:` with nothing under it
            raw[key] = {}
    plan = Plan(name=raw.pop("name", p.stem), layout=layout, **raw)
    plan.validate()
    return plan
