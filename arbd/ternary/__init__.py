"""Ternary core: packing, state, layers, the update rule and its backends."""
from arbd.ternary.layers import TernaryEmbeddingTable, TernaryLinear, TernaryRMSNorm, decoded_weight
from arbd.ternary.packing import decode, pack_trits, unpack_trits
from arbd.ternary.rule import TernaryRule
from arbd.ternary.state import TernaryMatrix
from arbd.ternary.update import (TernaryUpdateMixin, UpdateStats, apply_ternary_update,
                                 clear_evidence, ternary_matrices, ternary_state_bytes)

__all__ = [
    "TernaryEmbeddingTable", "TernaryLinear", "TernaryRMSNorm", "decoded_weight", "decode",
    "pack_trits", "unpack_trits", "TernaryRule", "TernaryMatrix", "TernaryUpdateMixin",
    "UpdateStats", "apply_ternary_update", "clear_evidence", "ternary_matrices", "ternary_state_bytes",
]
