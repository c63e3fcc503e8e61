"""Quantise with the CLI, then publish the checkpoint, its report and a model card on the Hub.

    python examples/push_to_hub.py --out DIR                                  # dry run: writes DIR/README.md
    python examples/push_to_hub.py --out DIR --repo-id you/smollm2-optquant   # uploads (needs HF_TOKEN)
    python examples/push_to_hub.py --out DIR --repo-id you/x --endpoint http://localhost:8080   # any Hub server

Steps: ``hf-optquant quantize MODEL --eval --out DIR`` (checkpoint + optquant_report.{md,json} +
figures/) -> reload DIR with ``from_pretrained`` -> ``hf_optquant.hub.push_to_hub`` (checkpoint,
tokenizer, model card with the measured KL) -> upload the report files -> download the repo
again and check that it reloads to identical logits.  Without ``--repo-id`` nothing leaves the
machine: the model card is written to DIR/README.md instead.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, local directory or Hub id")
    parser.add_argument("--out", required=True, help="directory for the quantised checkpoint")
    parser.add_argument("--repo-id", default=None, help="Hub repository to create/update (omit for a dry run)")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: huggingface.co or $HF_ENDPOINT)")
    parser.add_argument("--token", default=os.environ.get("HF_TOKEN"), help="Hub token (default: $HF_TOKEN)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--download-dir", default=None, help="cache for the check download (default: HF cache)")
    parser.add_argument("--bits", default="4.0")
    parser.add_argument("--format", default="grid")
    parser.add_argument("--allocation", default="fisher")
    parser.add_argument("--calibration-tokens", default="2048")
    parser.add_argument("--eval-tokens", default="2048")
    parser.add_argument("--seq-len", default="256")
    parser.add_argument("--max-layers", default=None, help="keep the first N decoder layers (smoke runs)")
    return parser.parse_args(argv)


def quantize(args: argparse.Namespace) -> None:
    """The same as typing ``hf-optquant quantize ...`` in a shell."""
    from hf_optquant.cli import main as cli

    argv = ["quantize", args.model, "--out", args.out, "--overwrite", "--eval", "--bits", args.bits,
            "--format", args.format, "--allocation", args.allocation, "--calibration-tokens", args.calibration_tokens,
            "--eval-tokens", args.eval_tokens, "--seq-len", args.seq_len]
    if args.max_layers:
        argv += ["--max-layers", args.max_layers]
    if cli(argv) != 0:
        raise SystemExit("quantisation failed (see the message above)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_optquant import hub
    from hf_optquant.hub import push_to_hub
    from hf_optquant.report import load_report

    quantize(args)
    model = AutoModelForCausalLM.from_pretrained(args.out)  # import hf_optquant registered "optquant"
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    bundle = load_report(args.out)
    evaluation = next((e for e in bundle.evaluations if e.checkpoint), None)
    if args.repo_id is None:
        card = hub.model_card(model, "your-name/your-model-optquant", evaluation=evaluation, report=bundle.report)
        card.save(str(Path(args.out) / "README.md"))
        print(f"dry run: model card written to {Path(args.out) / 'README.md'}; pass --repo-id to upload")
        return 0
    out = Path(args.out)
    report_files = {str(p.relative_to(out)): p for pattern in ("optquant_report.*", "figures/*")
                    for p in sorted(out.glob(pattern)) if p.is_file()}
    info = push_to_hub(model, args.repo_id, tokenizer=tokenizer, evaluation=evaluation, report=bundle.report,
                       token=args.token, endpoint=args.endpoint, private=args.private or None,
                       extra_files=report_files)
    print(f"pushed {args.repo_id} in one commit (checkpoint, tokenizer, model card, "
          f"{len(report_files)} report files): {info.commit_url}")
    check_download(args, model, tokenizer)
    return 0


def check_download(args: argparse.Namespace, model, tokenizer) -> None:
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM

    local = snapshot_download(args.repo_id, endpoint=args.endpoint, token=args.token, cache_dir=args.download_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(local)
    ids = tokenizer("It was a dark and stormy night.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        same = torch.equal(model(ids).logits, reloaded(ids).logits)
    print(f"downloaded {args.repo_id} to {local}: logits identical to the local checkpoint: {same}")
    if not same:
        raise SystemExit("the downloaded model differs from the uploaded one")


if __name__ == "__main__":
    raise SystemExit(main())
