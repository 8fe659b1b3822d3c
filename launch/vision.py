"""Image (VAE2D + VideoHead) training: only this modality's components, over the one
trainer (arbd/train/trainer.py: MODALITY_DEFAULTS). Same arguments as launch/pretrain.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.train.trainer import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(description="arbd vision training", modality="vision"))
