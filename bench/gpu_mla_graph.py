"""How much of one arb-small MLA layer's time is the host's (issue 10): eager against a CUDA graph
replay of the same no-grad forward, and the eager forward + backward.

    python3 bench/gpu_mla_graph.py

Prints enqueue ms (host wall time of 20 calls without a synchronisation, per call) and GPU ms
(CUDA events around the same calls) for each, the kernels of one forward, and whether the replay
equals the eager output bit for bit. Where enqueue ~ GPU, the host sets the pace; the replay's
GPU time is what the layer costs without it. A probe for graph capture of the fixed-shape trunk,
which the model does not do yet.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbd.model.mla import MLA  # noqa: E402
from arbd.parallel import planner  # noqa: E402


def per_call(fn, n: int = 20) -> tuple[float, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    s.record()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3
    e.record()
    torch.cuda.synchronize()
    return host, s.elapsed_time(e) / n


def main() -> None:
    cfg = planner.training_config("arb-small")
    layer = MLA(cfg, 0, "triton", generator=torch.Generator().manual_seed(0), device="cuda")
    x = torch.randn(32, 1023, cfg.d_model, device="cuda", dtype=torch.bfloat16)

    def forward():
        with torch.no_grad():
            return layer(x)

    print("eager no-grad forward: enqueue %.3f ms, GPU %.3f ms per call" % per_call(forward))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    print("kernels per forward:", sum(e.count for e in prof.key_averages() if str(e.device_type).endswith("CUDA")))
    side = torch.cuda.Stream()   # warm up on a side stream, as graph capture asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = forward()
    ref = forward()
    graph.replay()
    torch.cuda.synchronize()
    print("replay equals eager:", torch.equal(y, ref))
    print("graph replay: enqueue %.3f ms, GPU %.3f ms per call" % per_call(graph.replay))
    xr = x.clone().requires_grad_()
    gy = torch.randn_like(x)
    print("eager forward + backward: enqueue %.3f ms, GPU %.3f ms per call"
          % per_call(lambda: layer(xr).backward(gy)))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        layer(xr).backward(gy)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]
    busy = sum(getattr(e, "self_device_time_total", 0) for e in kernels) / 1e3
    print(f"forward + backward: {sum(e.count for e in kernels)} kernels, {busy:.3f} ms of kernel time "
          "(the floor without the host)")


if __name__ == "__main__":
    main()
