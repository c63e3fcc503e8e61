"""The ``hf-optquant`` command line and the report module, on a tiny random-init Llama.

Every number the CLI prints or stores is checked against an independent computation: stored
bits against the bytes of the reloaded buffers, relative errors and rms against float64 sums over
the decoded weights, KL and perplexity against a float64 full-vocabulary computation from the
two models' logits, Fisher shares against the stored Fisher sums.  User errors must give one line
on stderr and exit status 2.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import hf_optquant  # noqa: F401  (registers "optquant" with transformers)
from hf_optquant import cli
from hf_optquant.data.text import load_text
from hf_optquant.eval import text_to_sequences
from hf_optquant.nn import QuantLinear
from hf_optquant.quantize import QuantizationReport, TensorReport
from hf_optquant.report import (
    REPORT_JSON,
    REPORT_MD,
    Evaluation,
    ReportBundle,
    describe_format,
    load_report,
    model_card_summary,
    report_from_json,
    report_to_json,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SEQ, EVAL_TOKENS = 32, 512
QUANTIZE = ["--bits", "4", "--format", "int", "--allocation", "fisher", "--calibration-tokens", "256",
            "--seq-len", str(SEQ), "--eval", "--eval-tokens", str(EVAL_TOKENS), "--top-k", "0", "--sweep", "3",
            "--quiet"]


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])




@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 2-layer Llama with peaked next-token distributions (large init), saved with a byte tokenizer."""
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.2,
    )).save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantised(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "ckpt"
    assert cli.main(["quantize", str(tiny), "--out", str(out), *QUANTIZE]) == 0
    return out


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before (e.g. save_pretrained progress bars)
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _quant_modules(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _float64_kl_and_ppl(reference, model, ids: torch.Tensor) -> tuple[float, float]:
    """Mean over sequences of the per-token KL(p_ref || p_q) over the whole vocabulary, and perplexity."""
    with torch.no_grad():
        ref = torch.log_softmax(reference(ids).logits[:, :-1].double(), -1)
        q = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
    kl = (ref.exp() * (ref - q)).sum(-1).mean(-1).mean()
    nll = -q.gather(-1, ids[:, 1:, None]).mean()
    return float(kl), math.exp(float(nll))


# ---- quantize ---------------------------------------------------------------------------------------
def test_quantize_saves_a_reloadable_checkpoint_whose_bits_and_errors_match_the_report(tiny, quantised):
    model = transformers.AutoModelForCausalLM.from_pretrained(quantised)
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    modules = _quant_modules(model)
    bundle = load_report(quantised)
    assert len(modules) == 14 and {t.name for t in bundle.report.tensors} == set(modules)
    for t in bundle.report.tensors:
        module = modules[t.name]
        stored = sum(8 * b.numel() * b.element_size() for b in module.encoded_tensors().values())
        assert t.bits == stored
        w = original.get_submodule(t.name).weight.detach().double()
        decoded = module.dequantize(torch.float64, "cpu")
        assert t.relative_error == pytest.approx(float((decoded - w).square().sum() / w.square().sum()), rel=1e-6)
        assert t.rms == pytest.approx(float(w.square().mean().sqrt()), rel=1e-6)
    total = sum(t.bits for t in bundle.report.tensors) / sum(m.out_features * m.in_features for m in modules.values())
    assert bundle.report.bits_per_param == pytest.approx(total, rel=1e-12) and total <= 4.0
    assert len({t.bits_per_element for t in bundle.report.tensors}) > 1, "Fisher allocation should vary widths"
    assert bundle.source["model"] == str(tiny.resolve()) and bundle.command.startswith("hf-optquant quantize")


def test_quantize_writes_markdown_and_png_figures(quantised):
    markdown = (quantised / REPORT_MD).read_text()
    for name in ("bits_per_tensor", "error_per_tensor", "kl_vs_bits"):
        path = quantised / "figures" / f"{name}.png"
        assert f"figures/{name}.png" in markdown
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    report = load_report(quantised).report
    assert f"| stored bits/parameter, quantised tensors | {report.bits_per_param:.3f} |" in markdown
    assert markdown.count("| `model.layers.") == 14  # the per-tensor table


def test_quantize_eval_and_sweep_match_an_independent_float64_kl(tiny, quantised):
    evaluations = load_report(quantised).evaluations
    (checkpoint,) = [e for e in evaluations if e.checkpoint]
    (sweep,) = [e for e in evaluations if not e.checkpoint]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    ids = text_to_sequences(tokenizer, load_text("evaluation"), SEQ, EVAL_TOKENS)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    model = transformers.AutoModelForCausalLM.from_pretrained(quantised)
    kl, ppl = _float64_kl_and_ppl(reference, model, ids)
    assert checkpoint.k is None and checkpoint.tokens == ids.shape[0] * (SEQ - 1)
    assert checkpoint.kl == pytest.approx(kl, rel=1e-4) and kl > 1e-4
    assert checkpoint.perplexity == pytest.approx(ppl, rel=1e-5)
    _, ref_ppl = _float64_kl_and_ppl(reference, reference, ids)
    assert checkpoint.reference_perplexity == pytest.approx(ref_ppl, rel=1e-5)
    assert sweep.target_bits == 3.0 and sweep.bits_per_param <= 3.0 < checkpoint.bits_per_param
    assert sweep.kl > checkpoint.kl  # fewer bits, more divergence


# ---- inspect ------------------------------------------------------------------------------------------
def test_inspect_reports_stored_bits_decoded_rms_and_fisher_shares(quantised, capsys):
    code, out, _ = _run(capsys, "inspect", quantised, "--json")
    assert code == 0
    data = json.loads(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(quantised)
    modules = _quant_modules(model)
    raw = json.loads((quantised / REPORT_JSON).read_text())
    sums = raw["fisher"]["sums"]
    assert {r["name"] for r in data["tensors"]} == set(modules)
    for row in data["tensors"]:
        module = modules[row["name"]]
        assert row["bits"] == module.nbits
        decoded = module.dequantize(torch.float64, "cpu")
        assert row["rms"] == pytest.approx(float(decoded.square().mean().sqrt()), rel=1e-9)
        assert row["fisher_share"] == pytest.approx(sums[row["name"]] / sum(sums.values()), rel=1e-9)
    tensors = load_file(quantised / "model.safetensors")
    other = [t for k, t in tensors.items() if "weight__" not in k]
    params = sum(m.in_features * m.out_features for m in modules.values()) + sum(t.numel() for t in other)
    bits = sum(m.nbits for m in modules.values()) + sum(8 * t.numel() * t.element_size() for t in other)
    assert data["model_bits_per_param"] == pytest.approx(bits / params, rel=1e-12)
    code, table, _ = _run(capsys, "inspect", quantised, "--sort", "bits")
    assert code == 0 and "model.layers.1.mlp.up_proj" in table and "stored bits/parameter" in table


def test_inspect_works_without_the_report_and_ignores_a_corrupt_one(quantised, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(quantised, copy)
    (copy / REPORT_JSON).write_text('{"report_version": 1, "tensors": [')
    code, out, err = _run(capsys, "inspect", copy, "--json", "--no-decode")
    assert code == 0 and "ignoring" in err and "not valid JSON" in err
    rows = json.loads(out)["tensors"]
    assert all(r["fisher_share"] is None and r["rms"] is None for r in rows)
    (copy / REPORT_JSON).unlink()
    code, out, err = _run(capsys, "inspect", copy, "--json")
    assert code == 0 and err == "" and len(json.loads(out)["tensors"]) == 14


def _flip_byte(path: Path, key: str, index: int = 3) -> None:
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        start, _ = json.loads(f.read(n))[key]["data_offsets"]
        f.seek(8 + n + start + index)
        byte = f.read(1)[0]
        f.seek(8 + n + start + index)
        f.write(bytes([byte ^ 0x40]))


def test_inspect_rejects_corrupted_bytes_with_one_line(quantised, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(quantised, copy)
    key = "model.layers.0.mlp.down_proj.weight__codes"
    _flip_byte(copy / "model.safetensors", key)
    code, out, err = _run(capsys, "inspect", copy)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and f"checksum mismatch for encoded tensor {key}" in err


# ---- eval ------------------------------------------------------------------------------------------------
def test_eval_reproduces_the_quantize_time_measurement_and_updates_the_report(quantised, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(quantised, copy)
    before = [e for e in load_report(copy).evaluations if e.checkpoint][0]
    code, out, _ = _run(capsys, "eval", copy, "--eval-tokens", EVAL_TOKENS, "--seq-len", SEQ, "--top-k", "0",
                        "--json", "--quiet")
    assert code == 0
    result = json.loads(out)
    assert result["kl"] == pytest.approx(before.kl, rel=1e-6)
    assert result["perplexity"] == pytest.approx(before.perplexity, rel=1e-9)
    after = load_report(copy).evaluations
    assert sum(e.checkpoint for e in after) == 1 and len(after) == 2  # replaced, not duplicated


# ---- compare -----------------------------------------------------------------------------------------------
def test_compare_restores_weights_between_configs_and_reports_unrealisable_ones(tiny, tmp_path, capsys):
    common = ["--eval-tokens", "256", "--seq-len", SEQ, "--allocations", "uniform", "--quiet", "--json"]
    code, out, _ = _run(capsys, "compare", tiny, "--formats", "int", "nf4", "--bits", "3.5", "4.25", *common,
                        "--out", tmp_path / "cmp")
    assert code == 0
    rows = {(r["format"], r["target_bits"]): r for r in json.loads(out)}
    assert rows[("nf4", 3.5)]["error"] and "nf4" in rows[("nf4", 3.5)]["error"]
    assert rows[("nf4", 4.25)]["bits_per_param"] == 4.25 and rows[("int", 3.5)]["bits_per_param"] <= 3.5
    assert rows[("int", 3.5)]["kl"] > rows[("int", 4.25)]["kl"] > 0
    code, out, _ = _run(capsys, "compare", tiny, "--formats", "nf4", "--bits", "4.25", *common)
    alone = json.loads(out)[0]
    assert alone["kl"] == rows[("nf4", 4.25)]["kl"] and alone["perplexity"] == rows[("nf4", 4.25)]["perplexity"]
    written = {p.name for p in (tmp_path / "cmp").rglob("*")}
    assert {cli.COMPARE_MD, cli.COMPARE_JSON, "kl_vs_bits.png"} <= written


# ---- user errors --------------------------------------------------------------------------------------------
def _bad_type_dir(tmp_path: Path, model_type: str) -> Path:
    path = tmp_path / model_type
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


@pytest.mark.parametrize("case,message", [
    ("no-such-model", "is neither an existing directory"),
    ("missing-dir", "is neither an existing directory"),
    ("bits", "OptQuantConfig.bits"),
    ("unknown-type", "model type 'nonsense' is unknown to transformers"),
    ("not-causal", "model type 'vit' has no causal-LM class"),
    ("not-empty", "is not empty; pass --overwrite"),
    ("inspect-fp", "has no 'optquant' metadata"),
    ("eval-no-reference", "pass --reference MODEL"),
    ("no-tokenizer", "no usable tokenizer"),
])
def test_user_errors_print_one_sentence_and_exit_2(case, message, tiny, tmp_path, capsys):
    out = str(tmp_path / "out")
    if case == "no-tokenizer":
        bare = tmp_path / "bare"
        transformers.AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(bare)
    argv = {
        "no-such-model": ["quantize", "no such model!", "--out", out],
        "missing-dir": ["quantize", "./does/not/exist", "--out", out],
        "bits": ["quantize", tiny, "--bits", "0.5", "--out", out],
        "unknown-type": ["quantize", _bad_type_dir(tmp_path, "nonsense"), "--out", out],
        "not-causal": ["quantize", _bad_type_dir(tmp_path, "vit"), "--out", out],
        "not-empty": ["quantize", tiny, "--out", tiny],
        "inspect-fp": ["inspect", tiny],
        "eval-no-reference": ["eval", tiny],
        "no-tokenizer": ["quantize", tmp_path / "bare", "--allocation", "fisher", "--out", out, "--quiet"],
    }[case]
    code, stdout, err = _run(capsys, *argv)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith(f"hf-optquant {argv[0]}: error:") and message in err, err


def test_an_unreachable_hub_id_is_a_clear_error(monkeypatch, tmp_path, capsys):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    code, _, err = _run(capsys, "quantize", "someone/some-model", "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1
    assert "could not get 'someone/some-model' from the Hugging Face Hub (We couldn't connect" in err
    assert "smollm2-135m-instruct" in err  # says what to use instead


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_asking_for_a_gpu_without_one_is_a_clear_error(tiny, tmp_path, capsys):
    code, _, err = _run(capsys, "quantize", tiny, "--device", "cuda", "--out", tmp_path / "o")
    assert code == 2 and "no CUDA GPU is visible" in err and "--device cpu" in err


def test_missing_triton_on_a_gpu_is_a_warning_with_the_install_command(monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.warns(UserWarning, match=r"pip install 'hf-optquant\[triton\]'"):
        assert cli.check_device("cuda") == "cuda"


def test_console_script_is_declared_and_fails_cleanly_in_a_fresh_interpreter(tmp_path):
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1]
    assert re.match(r'\s*hf-optquant\s*=\s*"hf_optquant\.cli:main"\s*$', scripts, re.M)
    proc = subprocess.run([sys.executable, "-m", "hf_optquant.cli", "inspect", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"hf-optquant inspect: error: {tmp_path} has no .safetensors "
                                                    "files: it is not a saved hf-optquant checkpoint")


# ---- report module ----------------------------------------------------------------------------------------
def _report(fisher: bool = True) -> QuantizationReport:
    fmt = {"kind": "tensor_format", "element": {"kind": "int", "bits": 4.0, "symmetric": False},
           "scaling": {"kind": "scaling", "granularity": "block", "block_size": 64, "statistic": "absmax",
                       "scale_format": "bf16", "multiplier": 1.0}, "sparse": None, "rotation": None}
    tensors = [TensorReport(f"model.layers.{i}.self_attn.{p}", (64, 32), 4.25, 64 * 32 * 4 + 32 * 16, 4.25,
                            0.01 * (i + 1), 0.02, (1e-3 * (i + 2)) if fisher else None, fmt)
               for i in range(3) for p in ("q_proj", "v_proj")]
    return QuantizationReport({"format": "int", "allocation": "uniform", "bits": 4.25}, tensors, 1000 * 32, 1000,
                              {"tokens": 128, "mode": "sampled"} if fisher else None)


def test_report_json_round_trips_and_corruption_is_a_value_error_naming_the_field():
    evaluation = Evaluation("int/uniform", 4.25, 0.05, math.nan, 12.0, 11.0, 31, None, 4.25, True)
    bundle = ReportBundle(_report(), (evaluation,), {"model": "x", "max_layers": None}, "hf-optquant quantize x")
    data = json.loads(json.dumps(report_to_json(bundle), allow_nan=False))  # strict JSON: NaN stored as null
    back = report_from_json(data)
    assert back.report.tensors == bundle.report.tensors and back.source == bundle.source
    assert back.evaluations[0].kl == 0.05 and math.isnan(back.evaluations[0].kl_stderr)
    assert back.report.model_bits_per_param == pytest.approx(bundle.report.model_bits_per_param, rel=1e-15)
    broken = [("report_version", 7, "report_version"), ("tensors", [], "tensors"),
              ("other_bits", -1, "other_bits"), ("evaluations", [{"label": "x"}], "evaluation lacks")]
    for key, value, message in broken:
        with pytest.raises(ValueError, match=message):
            report_from_json({**data, key: value})
    bad_tensor = dict(data["tensors"][0], bits="many")
    with pytest.raises(ValueError, match="bits must be a number"):
        report_from_json({**data, "tensors": [bad_tensor]})


def test_model_card_summary_states_bits_per_projection_and_measured_quality():
    report = _report()
    text = model_card_summary(report, kl=0.1234, ppl=45.678)
    assert f"**{report.bits_per_param:.3f}**" in text and "format `int`" in text
    assert "KL(reference ‖ quantised) = 0.1234 nats/token" in text and "perplexity = 45.678" in text
    assert "| q_proj | 3 | 6,144 | 4.250 |" in text and "| v_proj | 3 |" in text
    assert "128 calibration tokens" in text
    shares = {1e-3 * (i + 2) for i in range(3)}
    assert f"{100 * sum(shares) / (2 * sum(shares)):.1f}%" in text  # q_proj holds half the Fisher information
    plain = model_card_summary(_report(fisher=False))
    assert "Measured" not in plain and "–" in plain
    with pytest.raises(ValueError, match="kl must be finite"):
        model_card_summary(report, kl=math.nan)


def test_describe_format_names_element_scaling_outliers_and_rotation():
    spec = {"element": {"kind": "cube_root", "distribution": "student_t", "bits": 3, "df": 5.0},
            "scaling": {"granularity": "channel", "statistic": "rms", "scale_format": "bf16"},
            "sparse": {"fraction": 0.01, "value_format": "bf16"}, "rotation": {"block_size": 128}}
    assert describe_format(spec) == "cube-root student_t(df=5) 3b, per-channel rms bf16, 1% bf16 outliers, hadamard-128"
    assert describe_format({"element": {"kind": "lookup", "name": "nf4"},
                            "scaling": {"granularity": "block", "block_size": 64, "statistic": "absmax",
                                        "scale_format": "bf16"}}) == "nf4, block-64 absmax bf16"
