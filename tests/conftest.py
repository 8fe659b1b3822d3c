"""Process-wide test setup.

Triton fixes at @triton.jit time (the first import of a kernel module) whether its kernels are
compiled or interpreted, and pytest imports every test module while collecting, in file order.
So the choice is made here, before any test module is imported: CPU runs interpret the kernels;
GPU runs say TRITON_INTERPRET=0 (bench/run_gpu.sh does) to compile them.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
