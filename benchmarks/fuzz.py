"""The dedicated fuzz run: >= 10**5 mutated inputs over the checkpoint loader, the metadata,
config and spec parsers, and the tensor decoder.

It runs the hypothesis properties of ``tests/test_fuzz_checkpoint.py`` (the same strategies and
oracles as the bounded CI subset, see that module's docstring) with large example counts, in
one process, and reports for each property how many inputs ran, what happened to them
(rejected with a ValueError naming the file/tensor/field, loaded with bitwise-identical
logits, ...), the wall time and the slowest single input.  Any crash (an exception other than
ValueError), hang (an input over 60 s) or silent wrong result fails the property; the failing
input is shrunk and printed by hypothesis and the script exits non-zero.

    nice python benchmarks/fuzz.py --out benchmarks/out/fuzz.json          # ~10**5 inputs
    nice python benchmarks/fuzz.py --scale 0.01                             # a quick smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

COUNTS = {"file": 24_000, "metadata": 16_000, "swap": 6_000, "config": 20_000, "spec": 20_000, "decode": 20_000}
PROPERTIES = {
    "file": "test_mutated_checkpoint_files_are_rejected_or_load_identically",
    "metadata": "test_mutated_metadata_is_rejected_unless_unchanged",
    "swap": "test_swapped_buffers_are_rejected_or_load_identically",
    "config": "test_config_dicts_are_validated_by_field",
    "spec": "test_mutated_spec_dicts_are_rejected_or_round_trip",
    "decode": "test_decoding_mutated_tensors_raises_or_returns_finite_weights",
}
DESCRIPTIONS = {
    "file": "model.safetensors bytes: bit flips (length, header, tensor data), writes, splices, truncation, "
            "extension -> from_pretrained + forward",
    "metadata": "optquant metadata JSON: types, missing/unknown keys, spec kinds, shapes, huge numbers, versions, "
                "renames/swaps; unsealed and re-sealed (forged CRC) -> from_pretrained + forward",
    "swap": "buffers re-typed, reshaped, swapped, dropped, renamed, duplicated -> from_pretrained + forward",
    "config": "OptQuantConfig.from_dict on random field subsets/types/ranges and unknown keys",
    "spec": "spec_from_dict on mutated TensorFormat dicts",
    "decode": "TensorFormat.decode on mutated encoded tensors (bytes, dtype, shape, missing)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every example count")
    parser.add_argument("--only", nargs="*", choices=sorted(COUNTS), help="run only these properties")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    counts = {k: max(1, int(round(v * args.scale))) for k, v in COUNTS.items() if not args.only or k in args.only}
    os.environ["HF_OPTQUANT_CKPT_FUZZ"] = json.dumps(counts)  # read when the test module is imported

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import test_fuzz_checkpoint as fuzz

    results, failed = {}, False
    for name, count in counts.items():
        start = time.perf_counter()
        error = None
        try:
            getattr(fuzz, PROPERTIES[name])()
        except Exception as err:  # noqa: BLE001 - report and go on with the other properties
            error = "".join(traceback.format_exception_only(type(err), err)).strip()
            traceback.print_exc()
            failed = True
        seconds = time.perf_counter() - start
        outcomes = {outcome: n for (prop, outcome), n in sorted(fuzz.OUTCOMES.items()) if prop == name}
        results[name] = {"requested": count, "inputs": sum(outcomes.values()), "outcomes": outcomes,
                         "seconds": round(seconds, 1), "slowest_input_s": round(fuzz.DURATIONS[name], 3),
                         "failure": error, "what": DESCRIPTIONS[name]}
        print(f"{name:9s} {results[name]['inputs']:7d} inputs  {seconds:8.1f} s  slowest {fuzz.DURATIONS[name]:.3f} s  "
              f"{'FAILED: ' + error if error else 'ok'}  {outcomes}", flush=True)
    total = sum(r["inputs"] for r in results.values())
    code = _code_version()
    summary = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU "
               f"cores, torch {torch.__version__}, transformers {transformers.__version__}, 1 thread",
               "command": " ".join(["python", *sys.argv]), "code": code, "total_inputs": total, "failures": failed,
               "properties": results}
    print(f"total {total} inputs, {'FAILURES' if failed else 'no crash, hang or silent wrong result'}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if failed else 0


def _code_version() -> str:
    """The commit, plus a hash of uncommitted changes to the package (the tree may be mid-edit)."""
    import hashlib
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "hf_optquant"], cwd=root, capture_output=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (f" + uncommitted hf_optquant changes {hashlib.sha1(diff).hexdigest()[:10]}" if diff else "")


if __name__ == "__main__":
    sys.exit(main())
