"""Byte-text training: the lightweight stack by default (no VQ, graph, MoE or KV attention);
--full-text-stack adds VQ + KG/MoEGraph + KV attention (seed 19)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.train.trainer import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(description="arbd byte-text training", lightweight_text=True))
