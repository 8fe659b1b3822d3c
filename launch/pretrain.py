"""Pretraining entry point.

    deepspeed --num_gpus 8 launch/pretrain.py --plan shard_plans/<plan>.yaml
    torchrun --standalone --nproc_per_node 2 launch/pretrain.py --plan shard_plans/cpu-2.yaml
    mpirun -np 2 python launch/pretrain.py --plan shard_plans/cpu-2.yaml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from arbd.train.trainer import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(description="arbd pretraining (all modalities, full ARB stack)"))
