"""Quantise-while-loading (issue #9): peak memory and wall time of ``from_pretrained`` with an
OptQuantConfig that needs no Fisher information, streamed (each linear weight quantised as it is
read) against the whole-model path (load everything, then ``quantize_model``).

Model: the embedded SmolLM2-135M (``hf_optquant.data.models``), materialised once as a float32
safetensors directory (``materialize``; 517 MB, in the cache).  Each measurement runs in a fresh
child process: imports first, then the peak RSS is reset (``/proc/self/clear_refs``, Linux >= 4.0)
and ``from_pretrained`` runs while a thread samples anonymous and file-backed RSS every 5 ms.
Reported: peak RSS above the RSS after imports (VmHWM), the peaks of its anonymous (private) and
file-backed (memory-mapped checkpoint) parts, ``ru_maxrss`` as the kernel reports it (the parent is
a small process, so it is the child's own high-water mark), wall time, the report's stage timings and
bits/parameter (equal between the two paths when they quantised alike).  ``--device cuda`` also
reports ``torch.cuda.max_memory_allocated``.

``dtype=float32`` loads the float32 checkpoint without a copy (transformers memory-maps it), so the
full-precision weights are file pages; ``dtype=bfloat16`` makes the loader convert, i.e. copy, each
tensor.

Usage:  python benchmarks/streaming_load.py                       # the table in RESULTS.md §9
        python benchmarks/streaming_load.py --runs nf4:bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "nf4": dict(bits=4.25, format="nf4", allocation="uniform"),
    "grid": dict(bits=3.5, format="grid", allocation="uniform"),
}
DEFAULT_RUNS = ["nf4:float32", "nf4:bfloat16", "grid:bfloat16"]

CHILD = r"""
import json, re, resource, sys, threading, time
import torch, transformers
import hf_optquant
from hf_optquant import quantizer
from hf_optquant.config import OptQuantConfig

path, stream, config, dtype, device, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
quantizer.STREAM_WHEN_POSSIBLE = stream == "1"

def status():
    text = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+) kB", text).group(1)) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

peaks = {"RssAnon": 0, "RssFile": 0}
done = False
def sample():
    while not done:
        now = status()
        for k in peaks:
            peaks[k] = max(peaks[k], now[k])
        time.sleep(0.005)

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status()
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(
    path, dtype=getattr(torch, dtype), device_map=device, quantization_config=OptQuantConfig(**json.loads(config)))
wall = time.perf_counter() - start
done = True
sampler.join()
after = status()
report = model.optquant_report
out = {"wall_s": wall, "before_kib": before, "after_kib": after, "sampled_peaks_kib": peaks,
       "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "timings": report.timings,
       "bits_per_param": report.bits_per_param, "tensors": len(report.tensors),
       "quantised_params": report.quantised_params}
if device == "cuda":
    out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    out["cuda_max_reserved"] = torch.cuda.max_memory_reserved()
print("RESULT " + json.dumps(out))
"""


def measure(path: str, stream: bool, config: dict, dtype: str, device: str, threads: int, env: dict) -> dict:
    cmd = [sys.executable, "-c", CHILD, path, "1" if stream else "0", json.dumps(config), dtype, device, str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"child failed:\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines()[::-1] if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def row(name: str, dtype: str, stream: bool, r: dict) -> str:
    mib = 1024
    b, p = r["before_kib"], r["sampled_peaks_kib"]
    t = r["timings"]
    encode = t.get("encode_s", t.get("encode_wait_s", 0.0))  # in this process / waiting for worker processes
    stages = f"fit {t['fit_s']:.1f}, encode {encode:.1f}" if "fit_s" in t else ""
    cuda = f" | {r['cuda_max_allocated'] / 2**20:.0f}" if "cuda_max_allocated" in r else ""
    return (f"| {name} | {dtype} | {'streamed' if stream else 'whole model'} | "
            f"{(r['after_kib']['VmHWM'] - b['VmRSS']) / mib:.0f} | {(p['RssAnon'] - b['RssAnon']) / mib:.0f} | "
            f"{(p['RssFile'] - b['RssFile']) / mib:.0f} | {r['ru_maxrss_kib'] / mib:.0f} | "
            f"{(r['after_kib']['VmRSS'] - b['VmRSS']) / mib:.0f} | {r['wall_s']:.1f} | {stages} | "
            f"{r['bits_per_param']:.4f}{cuda} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="config:dtype pairs, config in "
                        f"{sorted(CONFIGS)}, dtype float32 or bfloat16")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="MALLOC_MMAP_THRESHOLD_ for the children (0: glibc's default, dynamic)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from hf_optquant.data.models import DEFAULT_MODEL, materialize

    path = str(materialize(DEFAULT_MODEL).path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    print(f"model {DEFAULT_MODEL} at {path}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {args.threads}, device {args.device}, MALLOC_MMAP_THRESHOLD_="
          f"{args.mmap_threshold or 'default'}", flush=True)
    print("\n| config | load dtype | path | peak RSS - after imports, MiB | peak anon, MiB | peak file-backed, MiB | "
          "ru_maxrss, MiB | RSS after, MiB | from_pretrained s | stage s | bits/param |"
          + (" CUDA max allocated, MiB |" if args.device == "cuda" else ""))
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|" + ("---:|" if args.device == "cuda" else ""),
          flush=True)
    results = []
    for run in args.runs:
        name, _, dtype = run.partition(":")
        if name not in CONFIGS or dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--runs: {run!r} must be CONFIG:DTYPE with CONFIG in {sorted(CONFIGS)} and DTYPE "
                             "float32 or bfloat16")
        pair = {}
        for stream in (True, False):
            r = measure(path, stream, CONFIGS[name], dtype, args.device, args.threads, env)
            pair[stream] = r
            results.append({"config": name, "dtype": dtype, "streamed": stream, **r})
            print(row(name, dtype, stream, r), flush=True)
        if pair[True]["bits_per_param"] != pair[False]["bits_per_param"]:
            raise RuntimeError(f"{run}: the two paths stored different bits ({pair[True]['bits_per_param']} vs "
                               f"{pair[False]['bits_per_param']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
