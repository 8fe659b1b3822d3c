"""Ternary VQ codebooks: exact and sign-hash candidate lookup, touched-row learning."""
from arbd.vq.bridge import KGVQ, SharedVQ, SharedVQOutput
from arbd.vq.codebook import PlacedTernaryMatrix, TernaryVQCodebook, VQOutput
from arbd.vq.hashing import CellLayout, SignHash

__all__ = ["CellLayout", "KGVQ", "PlacedTernaryMatrix", "SharedVQ", "SharedVQOutput", "SignHash",
           "TernaryVQCodebook", "VQOutput"]
