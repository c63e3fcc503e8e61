"""The dedicated fuzz run (issue #9): >= 10**5 mutated inputs over three targets: the
bitstream / tensor decoder, the checkpoint loader (with its metadata and spec parsers) and the
``OptQuantConfig`` parser (dicts, JSON text, ``config.json`` through ``from_pretrained``).

It runs the hypothesis properties of ``tests/test_coding_fuzz.py`` and
``tests/test_fuzz_checkpoint.py`` (the same strategies and oracles as the bounded CI subset,
see those modules' docstrings) with large example counts, in one process, and reports for each
property how many inputs ran, what happened to them (rejected with a ValueError naming the
file/tensor/field; accepted and verified: bitwise-identical logits or weights, fields kept
exactly, ...), the wall time, inputs/s and the slowest single input.  Any crash (an exception
other than ValueError), hang (an input over 60 s) or silent wrong result fails the property;
the failing input is shrunk and printed by hypothesis and the script exits non-zero.  With
``--out`` the JSON is rewritten after every property, so an interrupted run keeps what it did.

    nice -n 10 python benchmarks/fuzz.py --out benchmarks/out/fuzz.json     # ~1.07 * 10**5 inputs
    nice -n 10 python benchmarks/fuzz.py --scale 0.01                        # a quick smoke run
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

# property -> (target, test module, test function, example count, what is mutated)
PROPERTIES = {
    "stream": ("decoder", "test_coding_fuzz", "test_mutated_streams_are_detected", 12_000,
               "entropy-coded stream tensors: bit flips, writes, truncation, extension, header fields, dropped/"
               "added/swapped/re-typed/reshaped tensors -> stream_from_tensors + decode_symbols"),
    "forged": ("decoder", "test_coding_fuzz", "test_forged_crc_streams_fail_cleanly", 12_000,
               "the same byte mutations with the CRC32 recomputed (forged) -> the rANS decoder on garbage"),
    "decode": ("decoder", "test_fuzz_checkpoint", "test_decoding_mutated_tensors_raises_or_returns_finite_weights",
               12_000, "TensorFormat.decode on mutated encoded tensors of 6 formats (bytes, dtype, shape, missing)"),
    "file": ("checkpoint", "test_fuzz_checkpoint", "test_mutated_checkpoint_files_are_rejected_or_load_identically",
             18_000, "model.safetensors bytes: bit flips (length, header, tensor data), writes, splices, "
             "truncation, extension -> from_pretrained + forward"),
    "metadata": ("checkpoint", "test_fuzz_checkpoint", "test_mutated_metadata_is_rejected_unless_unchanged", 10_000,
                 "optquant metadata JSON: types, missing/unknown keys, spec kinds, shapes, huge numbers, versions, "
                 "renames/swaps; unsealed and re-sealed (forged CRC) -> from_pretrained + forward"),
    "swap": ("checkpoint", "test_fuzz_checkpoint", "test_swapped_buffers_are_rejected_or_load_identically", 4_000,
             "buffers re-typed, reshaped, swapped, dropped, renamed, duplicated -> from_pretrained + forward"),
    "spec": ("checkpoint", "test_fuzz_checkpoint", "test_mutated_spec_dicts_are_rejected_or_round_trip", 6_000,
             "spec_from_dict (the metadata's format specs) on mutated TensorFormat dicts"),
    "config": ("config", "test_fuzz_checkpoint", "test_config_dicts_are_validated_by_field", 18_000,
               "OptQuantConfig.from_dict on random field subsets/types/ranges, unknown and odd keys"),
    "config_json": ("config", "test_fuzz_checkpoint", "test_mutated_config_json_is_rejected_or_kept_exactly",
                    12_000, "byte edits of a config's JSON text -> json.loads -> OptQuantConfig.from_dict"),
    "config_file": ("config", "test_fuzz_checkpoint", "test_mutated_quantization_config_in_config_json", 3_000,
                    "config.json quantization_config fields set/dropped/added -> from_pretrained + forward"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every example count")
    parser.add_argument("--only", nargs="*", choices=sorted(PROPERTIES), help="run only these properties")
    parser.add_argument("--out", default=None, help="write the results as JSON here (after every property)")
    args = parser.parse_args()
    counts = {k: max(1, int(round(p[3] * args.scale))) for k, p in PROPERTIES.items()
              if not args.only or k in args.only}
    os.environ["HF_OPTQUANT_CKPT_FUZZ"] = json.dumps(counts)  # read when the test modules are imported

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import importlib

    import fuzz_support

    summary = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU "
               f"cores, torch {torch.__version__}, transformers {transformers.__version__}, 1 thread",
               "command": " ".join(["python", *sys.argv]), "code": _code_version(), "time_limit_s":
               fuzz_support.TIME_LIMIT_S, "properties": {}}
    failed = False
    for name, count in counts.items():
        target, module, function, _, what = PROPERTIES[name]
        test = getattr(importlib.import_module(module), function)
        start = time.perf_counter()
        error = None
        try:
            test()
        except Exception as err:  # noqa: BLE001 - report and go on with the other properties
            error = "".join(traceback.format_exception_only(type(err), err)).strip()
            traceback.print_exc()
            failed = True
        seconds = time.perf_counter() - start
        outcomes = {outcome: n for (prop, outcome), n in sorted(fuzz_support.OUTCOMES.items()) if prop == name}
        inputs = sum(outcomes.values())
        slowest = fuzz_support.DURATIONS[name]
        summary["properties"][name] = {
            "target": target, "requested": count, "inputs": inputs, "outcomes": outcomes, "seconds": round(seconds, 1),
            "inputs_per_s": round(inputs / seconds, 1), "slowest_input_s": round(slowest, 3), "failure": error,
            "what": what}
        print(f"{target:10s} {name:11s} {inputs:7d} inputs {seconds:7.1f} s {inputs / seconds:7.1f}/s "
              f"slowest {slowest:.3f} s  {'FAILED: ' + error if error else 'ok'}  {outcomes}", flush=True)
        _summarise(summary, failed)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=1)
    for target, row in summary["targets"].items():
        print(f"{target:10s} {row['inputs']:7d} inputs {row['seconds']:7.1f} s slowest {row['slowest_input_s']} s")
    print(f"total {summary['total_inputs']} inputs, "
          f"{'FAILURES' if failed else 'no crash, hang or silent wrong result'}")
    return 1 if failed else 0


def _summarise(summary: dict, failed: bool) -> None:
    """Per-target totals of the properties run so far."""
    targets: dict[str, dict] = {}
    for row in summary["properties"].values():
        t = targets.setdefault(row["target"], {"inputs": 0, "seconds": 0.0, "slowest_input_s": 0.0})
        t["inputs"] += row["inputs"]
        t["seconds"] = round(t["seconds"] + row["seconds"], 1)
        t["slowest_input_s"] = max(t["slowest_input_s"], row["slowest_input_s"])
    summary["targets"] = targets
    summary["total_inputs"] = sum(t["inputs"] for t in targets.values())
    summary["failures"] = failed


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
