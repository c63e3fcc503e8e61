"""lm-evaluation-harness integration, fully offline.

A tiny random-init Llama is quantised (INT4, uniform allocation) and saved; a custom lm-eval
multiple-choice task reads a local jsonl file.  Each entry point (the ``python -m
hf_optquant.eval.harness`` command line in a fresh interpreter, and the Python helper with a
loaded model or a directory) must give per-choice log-likelihoods equal to ones computed here
directly with torch from the reloaded quantised model, and must differ from the unquantised
model's, so the harness demonstrably ran our QuantLinear modules.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

pytest.importorskip("lm_eval")

import hf_optquant  # noqa: E402,F401  (registers "optquant" with transformers)
from hf_optquant.config import OptQuantConfig  # noqa: E402
from hf_optquant.eval import harness  # noqa: E402
from hf_optquant.nn import QuantLinear  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = "optquant_tiny_mc"
REPO = Path(__file__).resolve().parents[1]
ROWS = [{"question": f"Q{i}: {i} plus one is", "choices": [str(i + 1), str(i + 2), "a blue sky"], "answer": i % 3}
        for i in range(8)]
ATOL = 1e-4  # lm-eval scores in float32, the reference in float64; a wrong position or weight moves it by >> 1e-2


@dataclass(frozen=True)
class Bundle:
    fp_dir: str
    q_dir: str
    task_dir: str


def _byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per byte (no merges), so tokenisation is the same whether split or joined."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def _tiny_llama() -> transformers.LlamaForCausalLM:
    # a large init range makes the next-token distributions peaked, so log-likelihoods differ clearly
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.3))


def _write_task(root: Path) -> str:
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    task_dir = root / "tasks"
    task_dir.mkdir()
    (task_dir / "tiny.yaml").write_text("\n".join([
        f"task: {TASK}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
        f"  cache_dir: {root / 'datasets-cache'}", "test_split: test", "output_type: multiple_choice",
        'doc_to_text: "{{question}}"', 'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{answer}}"',
        "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true", ""]))
    return str(task_dir)




@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    fp_dir, q_dir = str(root / "fp"), str(root / "q")
    _tiny_llama().save_pretrained(fp_dir)
    _byte_tokenizer().save_pretrained(fp_dir)
    config = OptQuantConfig(bits=4.0, format="int", allocation="uniform")
    transformers.AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config).save_pretrained(q_dir)
    _byte_tokenizer().save_pretrained(q_dir)
    return Bundle(fp_dir, q_dir, _write_task(root))


def _load(path: str) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _reference(model, tokenizer) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, is-greedy) of " " + choice after the question, computed directly in float64."""
    out = []
    for row in ROWS:
        context = tokenizer.encode(row["question"], add_special_tokens=False)
        scores = []
        for choice in row["choices"]:
            full = tokenizer.encode(row["question"] + " " + choice, add_special_tokens=False)
            assert full[:len(context)] == context
            with torch.no_grad():
                logp = model(torch.tensor([full[:-1]])).logits[0].double().log_softmax(-1)
            target = torch.tensor(full[len(context):])
            rows = logp[len(context) - 1:]
            scores.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
        out.append(scores)
    return out


def _accuracy(reference) -> float:
    picks = [max(range(len(s)), key=lambda j: s[j][0]) for s in reference]
    return sum(p == row["answer"] for p, row in zip(picks, ROWS)) / len(ROWS)


@pytest.fixture(scope="module")
def expected(bundle):
    """Reference scores of the reloaded quantised model, and of the unquantised one for contrast."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundle.q_dir)
    quantised = _load(bundle.q_dir)
    assert sum(isinstance(m, QuantLinear) for m in quantised.modules()) == 14
    ref_q, ref_fp = _reference(quantised, tokenizer), _reference(_load(bundle.fp_dir), tokenizer)
    gap = max(abs(a[0] - b[0]) for x, y in zip(ref_q, ref_fp) for a, b in zip(x, y))
    assert gap > 50 * ATOL, "quantisation must change the scores visibly, or the contrast proves nothing"
    return ref_q, ref_fp


def _scores(samples) -> list[list[tuple[float, bool]]]:
    """lm-eval's per-sample output (in-process tuples or jsonl strings) as floats/bools, by doc_id."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in ordered] == list(range(len(ROWS)))
    return [[(float(ll), str(g) == "True") for ll, g in s["filtered_resps"]] for s in ordered]


def _assert_matches(got, expected) -> None:
    ref_q, ref_fp = expected
    assert len(got) == len(ref_q)
    for scores, want in zip(got, ref_q):
        assert [g for _, g in scores] == [g for _, g in want]
        for (ll, _), (ref, _) in zip(scores, want):
            assert abs(ll - ref) < ATOL, (ll, ref)
    assert max(abs(a[0] - b[0]) for x, y in zip(got, ref_fp) for a, b in zip(x, y)) > 50 * ATOL


def test_command_line_evaluates_a_saved_directory_in_a_fresh_interpreter(bundle, expected, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "hf_optquant.eval.harness", "--model", "hf", "--model_args",
           f"pretrained={bundle.q_dir},dtype=float32", "--tasks", TASK, "--include_path", bundle.task_dir,
           "--device", "cpu", "--batch_size", "1", "--log_samples", "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    (samples_file,) = glob.glob(str(out / "*" / f"samples_{TASK}_*.jsonl"))
    with open(samples_file) as f:
        _assert_matches(_scores([json.loads(line) for line in f]), expected)
    with open(results_file) as f:
        results = json.load(f)
    assert results["results"][TASK]["acc,none"] == pytest.approx(_accuracy(expected[0]), abs=1e-12)
    assert results["config"]["model_args"]["pretrained"] == bundle.q_dir


def _counting_hooks(model) -> dict[str, int]:
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            calls[name] = 0
            module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def test_helper_evaluates_a_loaded_quantised_model(bundle, expected):
    model = _load(bundle.q_dir)
    calls = _counting_hooks(model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundle.q_dir)
    result = harness.simple_evaluate(model, [TASK], tokenizer=tokenizer, include_path=bundle.task_dir,
                                     include_defaults=False, log_samples=True)
    # every QuantLinear ran for every document (lm-eval shares one forward between the 1-token choices)
    assert len(calls) == 14 and min(calls.values()) >= 2 * len(ROWS)
    _assert_matches(_scores(result["samples"][TASK]), expected)
    assert result["results"][TASK]["acc,none"] == pytest.approx(_accuracy(expected[0]), abs=1e-12)


def test_helper_evaluates_a_saved_directory(bundle, expected, monkeypatch):
    calls = []
    forward = QuantLinear.forward
    monkeypatch.setattr(QuantLinear, "forward", lambda self, x: calls.append(1) or forward(self, x))
    result = harness.simple_evaluate(Path(bundle.q_dir), TASK, include_path=bundle.task_dir,
                                     include_defaults=False, log_samples=True, model_args={"dtype": "float32"})
    assert len(calls) >= 14 * 2 * len(ROWS)
    _assert_matches(_scores(result["samples"][TASK]), expected)
    assert result["results"][TASK]["acc,none"] == pytest.approx(_accuracy(expected[0]), abs=1e-12)


@pytest.mark.parametrize("case,message", [
    ("no_tasks", "tasks must be a non-empty list"),
    ("empty_task", "tasks must be a non-empty list"),
    ("not_a_model", "model must be a saved model directory .* got int"),
    ("missing_dir", "is not a directory"),
    ("no_tokenizer", "tokenizer is required"),
    ("model_args_with_object", "model_args only applies"),
    ("bad_include_path", "include_path must be a directory"),
])
def test_bad_arguments_are_value_errors_naming_the_field(case, message, bundle, tmp_path):
    model = bundle.q_dir
    kwargs: dict = {"include_path": bundle.task_dir, "include_defaults": False}
    tasks: object = [TASK]
    if case == "no_tasks":
        tasks = []
    elif case == "empty_task":
        tasks = [""]
    elif case == "not_a_model":
        model = 123
    elif case == "missing_dir":
        model = str(tmp_path / "nowhere")
    elif case in ("no_tokenizer", "model_args_with_object"):
        model = _tiny_llama()
        if case == "model_args_with_object":
            kwargs.update(tokenizer=_byte_tokenizer(), model_args={"dtype": "float32"})
    else:
        kwargs["include_path"] = str(tmp_path / "no-tasks-here")
    with pytest.raises(ValueError, match=message):
        harness.simple_evaluate(model, tasks, **kwargs)
