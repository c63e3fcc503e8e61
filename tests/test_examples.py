"""Every script in examples/ runs end to end, offline, on the embedded SmolLM2-135M with short settings.

``--max-layers 1`` keeps one decoder layer of the real model (real weights, tokenizer and
vocabulary; 7 linear weights to quantise), so each example takes seconds.  The numbers such
a truncated model gives are not representative; the tests check that the examples run, that
what they print is consistent, and the few computations they do themselves.
"""

from __future__ import annotations

import math
import re
import runpy
from pathlib import Path

import pytest

from hf_optquant.data.models import DEFAULT_MODEL, OFFLINE_MODELS
from hf_optquant.report import load_report

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHORT = ["--max-layers", "1", "--calibration-tokens", "64"]

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not OFFLINE_MODELS[DEFAULT_MODEL].is_installed(),
                       reason=f"the embedded model needs: {OFFLINE_MODELS[DEFAULT_MODEL].install_command}"),
]




def _example(name: str) -> dict:
    """The example's module namespace, loaded without running its ``__main__`` block."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}")


def test_every_example_has_a_test():
    tested = {"quantize_and_evaluate", "push_to_hub", "lm_eval_offline", "compare_with_nf4"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_quantize_and_evaluate_prints_bits_kl_and_writes_the_report(tmp_path, capsys):
    _example("quantize_and_evaluate")["main"]([*SHORT, "--format", "int", "--bits", "4", "--eval-tokens", "128",
                                               "--seq-len", "64", "--report", str(tmp_path)])
    out = capsys.readouterr().out
    bits = float(re.search(r"stored bits/param \(quantised tensors, all-inclusive\): ([\d.]+)", out).group(1))
    kl = float(re.search(r"KL\(ref \|\| quantised\): ([\d.]+)", out).group(1))
    assert 3.0 < bits <= 4.0 and math.isfinite(kl) and kl > 0
    assert len(re.findall(r"^(q|k|v|o|gate|up|down)_proj +1 ", out, re.M)) == 7
    bundle = load_report(tmp_path)
    assert f"{bundle.report.bits_per_param:.3f}" == f"{bits:.3f}" and len(bundle.report.tensors) == 7
    assert (tmp_path / "figures" / "kl_vs_bits.png").is_file()


def test_push_to_hub_uploads_checkpoint_report_and_card_and_downloads_identical_logits(tmp_path, capsys):
    example = _example("push_to_hub")
    argv = ["--out", str(tmp_path / "q"), *SHORT, "--format", "int", "--bits", "4", "--eval-tokens", "128",
            "--seq-len", "64", "--download-dir", str(tmp_path / "dl")]
    from hub_server import FakeHub

    repo = "user/smollm2-optquant"
    with FakeHub() as hub:
        assert example["main"]([*argv, "--repo-id", repo, "--endpoint", hub.endpoint, "--token", "hf_test"]) == 0
        files = dict(hub.repos[repo].files)
    out = capsys.readouterr().out
    assert "logits identical to the local checkpoint: True" in out
    assert {"model.safetensors", "config.json", "README.md", "optquant_report.md", "optquant_report.json",
            "figures/bits_per_tensor.png", "figures/kl_vs_bits.png"} <= set(files)
    card = files["README.md"].decode()
    report = load_report(tmp_path / "q").report
    assert f"Stored bits/parameter: **{report.bits_per_param:.3f}**" in card  # model_card_summary's section
    measured = next(e for e in load_report(tmp_path / "q").evaluations if e.checkpoint)
    assert f"{measured.kl:.4f}" in card


def test_lm_eval_scores_the_quantised_checkpoint_and_the_original_on_a_local_task(tmp_path, capsys):
    example = _example("lm_eval_offline")
    argv = ["--out", str(tmp_path / "q"), *SHORT, "--format", "int", "--allocation", "uniform", "--bits", "4",
            "--limit", "3"]
    assert example["main"](argv) == 0
    out = capsys.readouterr().out
    if out.strip().startswith("skipped:"):
        pytest.skip(out.strip())
    rows = {m: (float(a), float(b)) for m, a, b in re.findall(r"^(\w+) +([\d.]+) +([\d.]+)$", out, re.M)}
    assert set(rows) == set(example["METRICS"])
    for original, quantised in [rows["byte_perplexity"]]:
        assert 1 < original < 256 and 1 < quantised < 256
    for column in (0, 1):  # lm-eval derives both from the same log-likelihood: bits/byte = log2(byte perplexity)
        assert rows["bits_per_byte"][column] == pytest.approx(math.log2(rows["byte_perplexity"][column]), abs=2e-4)
    assert "python -m hf_optquant.eval.harness --model hf --model_args pretrained=" in out


def test_compare_with_nf4_measures_both_and_interpolates_the_bits_at_equal_kl(capsys):
    example = _example("compare_with_nf4")
    result = example["main"]([*SHORT, "--grid-bits", "3.5", "4.25", "--eval-tokens", "128", "--seq-len", "64"])
    nf4, *grid = result["results"]
    assert nf4.config.format == "nf4" and nf4.evaluation.bits_per_param == 4.25
    assert [r.config.bits for r in grid] == [3.5, 4.25]
    assert all(r.evaluation.bits_per_param <= r.config.bits for r in grid)
    assert grid[0].evaluation.kl > grid[1].evaluation.kl > 0
    assert "stored b/p" in capsys.readouterr().out
    bits_at_kl = example["bits_at_kl"]  # log-KL linear in bits: closed form at the midpoint
    assert bits_at_kl([(3.0, math.exp(-1)), (4.0, math.exp(-2))], math.exp(-1.5)) == pytest.approx(3.5, abs=1e-12)
    assert bits_at_kl([(3.0, 0.2), (4.0, 0.1)], 0.5) is None
