"""Probe (GPU): does each GEMM config finish and match float64? One subprocess per case, killed after a timeout."""
import json
import subprocess
import sys

CASES = [
    (150, 320, 70, {"BM": 64, "STAGES": 2, "TMA": True}),
    (150, 320, 70, {"BM": 64, "STAGES": 2, "TMA": True, "WS": True}),
    (4096, 4096, 256, {"BM": 128, "BT": 8, "TMA": True}),
    (4096, 4096, 256, {"BM": 128, "BT": 8, "TMA": True, "WS": True, "SPLIT": 1}),
    (4096, 4096, 256, {"BM": 128, "BT": 8, "TMA": True, "WS": True}),
    (4096, 4096, 128, {"BM": 64, "BT": 8, "TMA": True, "WS": True, "SPLIT": 1}),
    (14336, 4096, 256, {"BM": 256, "BT": 4, "TMA": True, "WS": True, "SPLIT": 1}),
]

CHILD = r"""
import sys, json, time, torch
from hf_optquant.kernels import lut_mma as LM
n, k, m, cfg = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(n + m)
codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
lut = torch.linspace(-1, 1, 16)
scales = (torch.rand(n, k // 128, generator=g) + 0.5).bfloat16().float()
p = LM.pack_mma_weight(codes, lut, scales, 128, device="cuda")
x = torch.randn(m, k, generator=g).bfloat16()
y = LM.mma_linear(x.cuda(), p, path="gemm", config=cfg)
torch.cuda.synchronize()
w = (lut.double()[codes.long()] * scales.double().repeat_interleave(128, dim=1))
ref = x.double() @ w.T
err = float((y.cpu().double() - ref).norm() / ref.norm())
t0 = time.perf_counter()
for _ in range(20):
    LM.mma_linear(x.cuda(), p, path="gemm", config=cfg)
torch.cuda.synchronize()
print(json.dumps(dict(err=err, us_eager=(time.perf_counter() - t0) / 20 * 1e6)))
"""

for case in CASES:
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], capture_output=True, text=True, timeout=60)
        out = r.stdout.strip().splitlines()[-1:] or [r.stderr.strip()[-300:]]
        print(case, "rc", r.returncode, out[0], flush=True)
    except subprocess.TimeoutExpired:
        print(case, "TIMEOUT (hang)", flush=True)
