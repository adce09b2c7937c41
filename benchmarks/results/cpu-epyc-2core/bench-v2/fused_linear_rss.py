# Repeated peak-RSS check of the fused linear loss vs the unfused path (see NOTE.md), default allocator:
#   PYTHONPATH=. python benchmarks/results/cpu-epyc-2core/bench-v2/fused_linear_rss.py {fused|unfused} THREADS
# N=1024, m=10, d_h=4096, d=1024, fp32, auto impl; extra peak RSS above inputs and the gradients handed back.
import sys, torch
from mlc_kernels import fused_linear_mlc_loss, mlc_loss
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
fused = sys.argv[1] == "fused"
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
def inputs(n, m, dh, d):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, m, dh, generator=g).requires_grad_()
    w = (torch.randn(d, dh, generator=g) / dh**0.5).requires_grad_()
    b = torch.zeros(d).requires_grad_()
    return h, w, b
def step(h, w, b):
    for t in (h, w, b): t.grad = None
    loss = fused_linear_mlc_loss(h, w, b) if fused else mlc_loss(torch.nn.functional.linear(h, w, b))
    loss.backward()
    return sum(t.grad.numel() * t.grad.element_size() for t in (h, w, b))
step(*inputs(2, 10, 8, 4))
h, w, b = inputs(1024, 10, 4096, 1024)
open('/proc/self/clear_refs', 'w').write('5')
before = hwm()
back = step(h, w, b)
print(sys.argv[1], (hwm() - before - back) / 2**20, "MB")
