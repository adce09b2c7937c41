import sys, torch, time
from mlc_kernels.bench.fused_linear import fused_linear_inputs
from mlc_kernels import fused_linear_mlc_loss, mlc_loss
torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 1)
n,m,dh,d = map(int, sys.argv[1:5]); chunks = [None if c=="none" else int(c) for c in sys.argv[5].split(",")]
h,w,b = fused_linear_inputs(n,m,dh,d,torch.float32,torch.device("cpu"))
def step(c):
    for t in (h,w,b): t.grad=None
    if c == "unfused": mlc_loss(torch.nn.functional.linear(h,w,b), impl="native").backward()
    else: fused_linear_mlc_loss(h,w,b,impl="native",chunk_size=c).backward()
variants = ["unfused"] + chunks
times = {v: [] for v in variants}
for v in variants: step(v)
for r in range(int(sys.argv[7]) if len(sys.argv) > 7 else 7):
    for v in variants:
        t0 = time.perf_counter(); step(v); times[v].append(time.perf_counter() - t0)
med = {v: sorted(t)[len(t)//2] for v, t in times.items()}
mn = {v: min(t) for v, t in times.items()}
print(" ".join(f"{v}:{med[v]*1e3:.1f}ms({med[v]/med['unfused']:.2f}, min {mn[v]/mn['unfused']:.2f})" for v in variants))
