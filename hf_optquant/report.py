"""Human-readable quantisation reports: markdown, PNG figures, a JSON record, a model-card summary.

Why a separate module: the numbers a user needs to judge a quantised checkpoint (bits per
tensor, where the error went, what it cost in KL) are all in :class:`QuantizationReport`, but
scattered over hundreds of tensors.  This module turns one report (plus any measured
evaluations) into files written next to the checkpoint::

    DIR/optquant_report.json          everything, machine-readable (re-read by ``hf-optquant inspect/eval``)
    DIR/optquant_report.md            summary, per-projection table, figures, per-tensor table
    DIR/figures/bits_per_tensor.png   stored bits/parameter of each tensor across layers
    DIR/figures/error_per_tensor.png  relative squared error and share of the predicted KL per tensor
    DIR/figures/kl_vs_bits.png        measured KL against stored bits/parameter (when evaluated)

and into :func:`model_card_summary`, the markdown section :mod:`hf_optquant.hub` puts in the
model card.  Figures need matplotlib; without it the markdown says so and everything else is
still written.  The JSON is plain data (never pickle) and is validated when read back.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .quantize import QuantizationReport, TensorReport

__all__ = [
    "REPORT_JSON",
    "REPORT_MD",
    "FIGURES_DIR",
    "Evaluation",
    "ReportBundle",
    "describe_format",
    "fisher_shares",
    "kl_proxy_shares",
    "layer_index",
    "projection",
    "model_card_summary",
    "report_to_json",
    "report_from_json",
    "load_report",
    "write_report",
    "render_markdown",
    "plot_kl_vs_bits",
]

REPORT_JSON = "optquant_report.json"
REPORT_MD = "optquant_report.md"
FIGURES_DIR = "figures"
REPORT_VERSION = 1
_LAYER_RE = re.compile(r"\.(\d+)\.")


# ---- data ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One measured point: KL and perplexity of a quantised model against its reference.

    ``checkpoint`` is True when the saved model itself was measured, False for extra points
    (other budgets, fake-quantised) measured to draw the KL-vs-bits curve."""

    label: str
    bits_per_param: float
    kl: float
    kl_stderr: float
    perplexity: float
    reference_perplexity: float
    tokens: int
    k: int | None
    target_bits: float | None = None
    checkpoint: bool = False

    @classmethod
    def from_result(cls, result: Any, label: str, bits_per_param: float, target_bits: float | None = None,
                    checkpoint: bool = False) -> Evaluation:
        """From an :class:`~hf_optquant.eval.EvalResult`."""
        return cls(label, float(bits_per_param), float(result.kl), float(result.kl_stderr), float(result.perplexity),
                   float(result.reference_perplexity), int(result.tokens), result.k, target_bits, checkpoint)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        if not isinstance(data, Mapping):
            raise ValueError(f"an evaluation must be an object, got {type(data).__name__}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"evaluation lacks {missing}")
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        if values["kl_stderr"] is None:  # NaN (a single sequence) is stored as null: JSON has no NaN
            values["kl_stderr"] = math.nan
        for name in ("bits_per_param", "kl", "kl_stderr", "perplexity", "reference_perplexity"):
            _number(f"evaluation.{name}", values[name], allow_nan=name == "kl_stderr")
        if not isinstance(values["label"], str):
            raise ValueError("evaluation.label must be a string")
        if isinstance(values["tokens"], bool) or not isinstance(values["tokens"], int) or values["tokens"] < 0:
            raise ValueError("evaluation.tokens must be a non-negative integer")
        if values.get("target_bits") is not None:
            _number("evaluation.target_bits", values["target_bits"])
        if not isinstance(values.get("checkpoint", False), bool):
            raise ValueError("evaluation.checkpoint must be true or false")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if math.isnan(self.kl_stderr):
            data["kl_stderr"] = None
        return data


@dataclasses.dataclass(frozen=True)
class ReportBundle:
    """What ``optquant_report.json`` holds: the report, measured evaluations and provenance."""

    report: QuantizationReport
    evaluations: tuple[Evaluation, ...] = ()
    source: dict[str, Any] | None = None  # how the reference model is found again (see hf_optquant.cli)
    command: str | None = None  # the command line that produced the checkpoint


# ---- small helpers -----------------------------------------------------------------------------
def layer_index(name: str) -> int | None:
    """Decoder-layer number in a module name (``model.layers.7.mlp.up_proj`` -> 7), if any."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def projection(name: str) -> str:
    """The module's role, i.e. the last name component (``q_proj``, ``down_proj``, ``c_attn``...)."""
    return name.rsplit(".", 1)[-1]


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def _number(where: str, value: Any, allow_nan: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if not (math.isfinite(value) or (allow_nan and math.isnan(value))):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return float(value)


def describe_format(spec: Mapping[str, Any]) -> str:
    """A short description of a TensorFormat spec dict: ``int4 asym, block-64 absmax bf16``."""
    element = spec.get("element") or {}
    parts = [_describe_element(element), _describe_scaling(spec.get("scaling") or {})]
    sparse = spec.get("sparse")
    if sparse:
        parts.append(f"{100 * float(sparse.get('fraction', 0)):.2g}% {sparse.get('value_format', '')} outliers")
    rotation = spec.get("rotation")
    if rotation:
        parts.append(f"hadamard-{rotation.get('block_size')}")
    return ", ".join(p for p in parts if p)


def _describe_element(e: Mapping[str, Any]) -> str:
    kind = e.get("kind", "?")
    if kind == "int":
        bits = float(e.get("bits", 0))
        return f"int{bits:.3g}" + ("" if e.get("symmetric") else " asym")
    if kind == "fp":
        return f"fp E{e.get('exponent_bits')}M{e.get('mantissa_bits')}"
    if kind == "lookup":
        return str(e.get("name", "lookup"))
    if kind == "cube_root":
        df = f"(df={float(e['df']):g})" if e.get("distribution") == "student_t" and "df" in e else ""
        return f"cube-root {e.get('distribution')}{df} {e.get('bits')}b"
    if kind == "lloyd_max":
        return f"lloyd-max {e.get('bits')}b"
    if kind == "grid":
        return "grid + rANS"
    return str(kind)


def _describe_scaling(s: Mapping[str, Any]) -> str:
    granularity = s.get("granularity")
    if not granularity:
        return ""
    where = f"block-{s.get('block_size')}" if granularity == "block" else f"per-{granularity}"
    return f"{where} {s.get('statistic')} {s.get('scale_format')}"


def fisher_shares(report: QuantizationReport) -> dict[str, float] | None:
    """Each tensor's share of the total Fisher information (sum of diagonal Fisher), if known."""
    totals = {t.name: t.fisher_mean * t.numel for t in report.tensors if t.fisher_mean is not None}
    if len(totals) != len(report.tensors):
        return None
    whole = sum(totals.values())
    return {n: (v / whole if whole > 0 else 0.0) for n, v in totals.items()}


def kl_proxy_shares(report: QuantizationReport) -> dict[str, float] | None:
    """Each tensor's share of the second-order KL estimate 1/2 sum F_i * SSE_i, if Fisher is known."""
    proxies = {t.name: t.kl_proxy for t in report.tensors}
    if any(v is None for v in proxies.values()):
        return None
    whole = sum(proxies.values())
    return {n: (v / whole if whole > 0 else 0.0) for n, v in proxies.items()}


def _kl_proxy_total(report: QuantizationReport) -> float | None:
    proxies = [t.kl_proxy for t in report.tensors]
    return None if any(p is None for p in proxies) else float(sum(proxies))


def _by_projection(report: QuantizationReport) -> dict[str, list[TensorReport]]:
    groups: dict[str, list[TensorReport]] = collections.defaultdict(list)
    for t in report.tensors:
        groups[projection(t.name)].append(t)
    return dict(sorted(groups.items()))


def _formats_in_use(report: QuantizationReport) -> str:
    counts = collections.Counter(describe_format(t.format) for t in report.tensors)
    if len(counts) > 3:  # e.g. one integer width per tensor under Fisher allocation
        widths = [t.bits_per_element for t in report.tensors]
        return f"{len(counts)} variants at {min(widths):.2f}-{max(widths):.2f} stored bits/parameter"
    return "; ".join(f"{desc} ({n})" if len(counts) > 1 else desc for desc, n in counts.most_common())


def _kl(value: float) -> str:
    """KL in nats/token: fixed 4 decimals as in benchmarks/RESULTS.md, scientific when tiny."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"


# ---- JSON ------------------------------------------------------------------------------------
def report_to_json(bundle: ReportBundle) -> dict[str, Any]:
    """The JSON document of ``optquant_report.json`` (round-trips through :func:`report_from_json`)."""
    report = bundle.report
    data = report.to_dict()
    data.update(report_version=REPORT_VERSION, other_bits=report.other_bits, other_params=report.other_params,
                evaluations=[e.to_dict() for e in bundle.evaluations], source=bundle.source,
                command=bundle.command)
    return _json_safe(data)


def _json_safe(value: Any) -> Any:
    """NaN/inf become null: JSON has no such numbers (the reader maps null back to NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _tensor_from_dict(data: Any) -> TensorReport:
    if not isinstance(data, Mapping):
        raise ValueError("each tensors entry must be an object")
    fields = [f.name for f in dataclasses.fields(TensorReport)]
    missing = [f for f in fields if f not in data]
    if missing:
        raise ValueError(f"tensor entry {data.get('name')!r} lacks {missing}")
    shape = data["shape"]
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise ValueError(f"tensor {data['name']!r}: shape must be a list of non-negative ints")
    for name in ("target_bits", "bits", "bits_per_element"):
        _number(f"tensor {data['name']!r} {name}", data[name])
    data = {**data, **{k: math.nan for k in ("relative_error", "rms") if data[k] is None}}
    for name in ("relative_error", "rms"):
        _number(f"tensor {data['name']!r} {name}", data[name], allow_nan=True)
    if data["fisher_mean"] is not None:
        _number(f"tensor {data['name']!r} fisher_mean", data["fisher_mean"])
    if not isinstance(data["format"], Mapping):
        raise ValueError(f"tensor {data['name']!r}: format must be an object")
    return TensorReport(**{**{f: data[f] for f in fields}, "shape": tuple(shape)})


def report_from_json(data: Any) -> ReportBundle:
    """Validate and rebuild a :class:`ReportBundle`; raises ValueError naming what is wrong."""
    if not isinstance(data, Mapping):
        raise ValueError("the report must be a JSON object")
    if data.get("report_version") != REPORT_VERSION:
        raise ValueError(f"report_version {data.get('report_version')!r} is not supported (expected {REPORT_VERSION})")
    for key in ("config", "tensors", "other_bits", "other_params"):
        if key not in data:
            raise ValueError(f"the report lacks {key!r}")
    if not isinstance(data["tensors"], list) or not data["tensors"]:
        raise ValueError("the report's 'tensors' must be a non-empty list")
    for key in ("other_bits", "other_params"):
        if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 0:
            raise ValueError(f"the report's {key!r} must be a non-negative integer")
    if not isinstance(data["config"], Mapping):
        raise ValueError("the report's 'config' must be an object")
    tensors = [_tensor_from_dict(t) for t in data["tensors"]]
    if data.get("fisher") is not None and not isinstance(data["fisher"], Mapping):
        raise ValueError("the report's 'fisher' must be an object or null")
    extra = {}
    timings = data.get("timings")
    if isinstance(timings, Mapping) and "timings" in {f.name for f in dataclasses.fields(QuantizationReport)}:
        extra["timings"] = dict(timings)
    report = QuantizationReport(dict(data["config"]), tensors, data["other_bits"], data["other_params"],
                                data.get("fisher"), **extra)
    evaluations = data.get("evaluations") or []
    if not isinstance(evaluations, list):
        raise ValueError("the report's 'evaluations' must be a list")
    source = data.get("source")
    if source is not None and not isinstance(source, Mapping):
        raise ValueError("the report's 'source' must be an object")
    return ReportBundle(report, tuple(Evaluation.from_dict(e) for e in evaluations),
                        dict(source) if source else None, data.get("command"))


def load_report(path: str | Path) -> ReportBundle:
    """Read ``optquant_report.json`` (a file, or the checkpoint directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the report is corrupt") from None
    try:
        return report_from_json(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a valid hf-optquant report: {err}") from None


# ---- markdown ------------------------------------------------------------------------------------
def _summary_rows(bundle: ReportBundle) -> list[tuple[str, str]]:
    report, config = bundle.report, bundle.report.config
    stored = sum(t.bits for t in report.tensors)
    rows = [("format", f"`{config.get('format')}`: {_formats_in_use(report)}"),
            ("allocation", f"`{config.get('allocation')}`, target {float(config.get('bits', 0)):.2f} bits/parameter"),
            ("quantised tensors", f"{len(report.tensors)} ({report.quantised_params:,} parameters)"),
            ("stored bits/parameter, quantised tensors", f"{report.bits_per_param:.3f}"),
            ("stored bits/parameter, whole model", f"{report.model_bits_per_param:.3f}"),
            ("quantised weights", f"{stored / 8e6:.2f} MB")]
    if report.fisher:
        rows.append(("Fisher information", f"{report.fisher.get('tokens')} calibration tokens, "
                                           f"{report.fisher.get('mode')} mode"))
    timings = getattr(report, "timings", None)
    seconds = {k[:-2]: v for k, v in (timings or {}).items() if k.endswith("_s") and isinstance(v, (int, float))}
    if seconds:
        rows.append(("time (s)", ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in seconds.items())))
    proxy = _kl_proxy_total(report)
    if proxy is not None:
        rows.append(("second-order KL estimate ½ Σ F̄·SSE", f"{_kl(proxy)} nats/token"))
    for e in bundle.evaluations:
        if e.checkpoint:
            rows.append(("KL(reference ‖ quantised), measured", _kl_text(e)))
            rows.append(("perplexity (reference)", f"{e.perplexity:.3f} ({e.reference_perplexity:.3f})"))
    return rows


def _kl_text(e: Evaluation) -> str:
    k = "full vocabulary" if e.k is None else f"top-{e.k} + tail"
    return f"{_kl(e.kl)} ± {_kl(e.kl_stderr)} nats/token over {e.tokens:,} tokens ({k})"


def _projection_table(report: QuantizationReport) -> list[str]:
    shares = fisher_shares(report)
    kl_shares = kl_proxy_shares(report)
    lines = ["| projection | tensors | parameters | bits/param mean | min | max | mean rel. sq. error | Fisher share "
             "| predicted-KL share |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, tensors in _by_projection(report).items():
        params = sum(t.numel for t in tensors)
        bits = [t.bits_per_element for t in tensors]
        mean_bits = sum(t.bits for t in tensors) / max(1, params)
        error = sum(t.relative_error for t in tensors) / len(tensors)
        fisher = _percent(sum(shares[t.name] for t in tensors)) if shares else "–"
        kl = _percent(sum(kl_shares[t.name] for t in tensors)) if kl_shares else "–"
        lines.append(f"| {kind} | {len(tensors)} | {params:,} | {mean_bits:.3f} | {min(bits):.3f} | {max(bits):.3f} "
                     f"| {error:.5f} | {fisher} | {kl} |")
    return lines


def _tensor_table(report: QuantizationReport) -> list[str]:
    shares = fisher_shares(report) or {}
    lines = ["| tensor | shape | format | target b/p | stored b/p | rms | rel. sq. error | Fisher share |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for t in report.tensors:
        share = _percent(shares[t.name]) if t.name in shares else "–"
        lines.append(f"| `{t.name}` | {'×'.join(map(str, t.shape))} | {describe_format(t.format)} | "
                     f"{t.target_bits:.3f} | {t.bits_per_element:.3f} | {t.rms:.4g} | {t.relative_error:.5f} "
                     f"| {share} |")
    return lines


def _evaluation_table(evaluations: Sequence[Evaluation]) -> list[str]:
    lines = ["| label | stored b/p | KL (nats/token) | perplexity | reference | tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    for e in sorted(evaluations, key=lambda e: (e.label, e.bits_per_param)):
        mark = " (this checkpoint)" if e.checkpoint else ""
        lines.append(f"| {e.label}{mark} | {e.bits_per_param:.3f} | {_kl(e.kl)} ± {_kl(e.kl_stderr)} | "
                     f"{e.perplexity:.3f} | {e.reference_perplexity:.3f} | {e.tokens:,} |")
    return lines


def render_markdown(bundle: ReportBundle, figures: Mapping[str, str] | None = None,
                    figure_note: str | None = None) -> str:
    """The report as markdown; ``figures`` maps figure keys to paths relative to the markdown file."""
    figures = figures or {}
    model = (bundle.source or {}).get("model", "the model")
    out = [f"# hf-optquant report: {model}", ""]
    if bundle.command:
        out += [f"Produced by `{bundle.command}`.", ""]
    out += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in _summary_rows(bundle)], "",
            "Bits are **stored** bits (codes, scales, tables, outliers, stream offsets) over the parameters "
            "they encode; the whole-model figure counts every unquantised parameter at its stored width.", ""]
    if figure_note:
        out += [f"*{figure_note}*", ""]
    out += ["## Bits per tensor across layers", ""]
    if "bits" in figures:
        out += [f"![bits per tensor]({figures['bits']})", ""]
    out += _projection_table(bundle.report) + [""]
    if bundle.evaluations:
        out += ["## KL divergence against bits/parameter", ""]
        if "kl" in figures:
            out += [f"![KL vs bits]({figures['kl']})", ""]
        out += _evaluation_table(bundle.evaluations) + [""]
    out += ["## Error per tensor", ""]
    if "error" in figures:
        out += [f"![error per tensor]({figures['error']})", ""]
    out += ["Relative squared error = ‖Ŵ − W‖² / ‖W‖² (Fisher-weighted when the fit was). Predicted-KL share = "
            "each tensor's part of ½ Σ F̄ᵢ·SSEᵢ, the second-order estimate of the KL divergence.", "",
            "<details><summary>Every tensor</summary>", "", *_tensor_table(bundle.report), "", "</details>", ""]
    return "\n".join(out)


def model_card_summary(report: QuantizationReport, kl: float | None = None, ppl: float | None = None) -> str:
    """A short markdown section for a model card: configuration, per-projection bits and errors,
    and (when given) the measured KL divergence and perplexity."""
    config = report.config
    lines = [f"Quantised with hf-optquant: format `{config.get('format')}` ({_formats_in_use(report)}), "
             f"allocation `{config.get('allocation')}` at a target of {float(config.get('bits', 0)):.2f} "
             f"bits/parameter.", ""]
    if report.fisher:
        lines += [f"Fisher information was estimated on {report.fisher.get('tokens')} calibration tokens "
                  f"({report.fisher.get('mode')} mode).", ""]
    lines += [f"Stored bits/parameter: **{report.bits_per_param:.3f}** over the {len(report.tensors)} quantised "
              f"tensors ({report.quantised_params:,} parameters), {report.model_bits_per_param:.3f} over the whole "
              "model (everything stored is counted).", ""]
    if kl is not None or ppl is not None:
        measured = []
        if kl is not None:
            measured.append(f"KL(reference ‖ quantised) = {_kl(_number('kl', kl))} nats/token")
        if ppl is not None:
            measured.append(f"perplexity = {_number('ppl', ppl):.3f}")
        lines += ["Measured: " + ", ".join(measured) + ".", ""]
    lines += _projection_table(report)
    lines += ["", f"Per-tensor details: `{REPORT_MD}` and `{FIGURES_DIR}/` (written by `hf-optquant quantize`)."]
    return "\n".join(lines) + "\n"


# ---- figures ----------------------------------------------------------------------------------------
def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    return Figure(figsize=(width, height), dpi=110)


def _positions(tensors: Sequence[TensorReport]) -> dict[str, float]:
    """x position of each tensor: its layer index; tensors outside numbered layers go after the last."""
    layers = [layer_index(t.name) for t in tensors]
    top = max((i for i in layers if i is not None), default=-1)
    extra = iter(range(top + 1, top + 1 + len(tensors)))
    return {t.name: float(i) if i is not None else float(next(extra)) for t, i in zip(tensors, layers)}


def _per_projection_lines(ax, report: QuantizationReport, values: Mapping[str, float]) -> None:
    x = _positions(report.tensors)
    for kind, tensors in _by_projection(report).items():
        pts = sorted((x[t.name], values[t.name]) for t in tensors if t.name in values)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linewidth=1, label=kind)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=4)


def plot_bits_per_tensor(report: QuantizationReport, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    _per_projection_lines(ax, report, {t.name: t.bits_per_element for t in report.tensors})
    ax.axhline(report.bits_per_param, color="k", linestyle="--", linewidth=1,
               label=f"mean {report.bits_per_param:.3f}")
    ax.legend(fontsize=7, ncol=4)
    ax.set_ylabel("stored bits / parameter")
    ax.set_title(f"{report.config.get('format')} / {report.config.get('allocation')}: bits per tensor")
    fig.tight_layout()
    fig.savefig(path)


def plot_error_per_tensor(report: QuantizationReport, path: Path) -> None:
    shares = kl_proxy_shares(report)
    fig = _figure(8.0, 7.0 if shares else 4.5)
    ax = fig.add_subplot(2 if shares else 1, 1, 1)
    errors = {t.name: t.relative_error for t in report.tensors if t.relative_error > 0}
    _per_projection_lines(ax, report, errors)
    if errors:
        ax.set_yscale("log")
    ax.set_ylabel("relative squared error")
    ax.set_title("error per tensor")
    if shares:
        ax2 = fig.add_subplot(2, 1, 2)
        _per_projection_lines(ax2, report, {n: 100 * v for n, v in shares.items()})
        ax2.set_ylabel("% of predicted KL (½ F̄·SSE)")
    fig.tight_layout()
    fig.savefig(path)


def plot_kl_vs_bits(evaluations: Iterable[Evaluation], path: Path, title: str = "KL vs bits/parameter",
                    proxy: tuple[float, float] | None = None) -> None:
    """Measured KL against stored bits/parameter, one line per label; ``proxy`` = (bits, second-order
    estimate) is drawn as a separate hollow marker so the estimate can be compared with the measurement."""
    groups: dict[str, list[Evaluation]] = collections.defaultdict(list)
    for e in evaluations:
        groups[e.label].append(e)
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    for label, points in sorted(groups.items()):
        points = sorted(points, key=lambda e: e.bits_per_param)
        ax.errorbar([e.bits_per_param for e in points], [e.kl for e in points],
                    yerr=[0.0 if math.isnan(e.kl_stderr) else e.kl_stderr for e in points],
                    marker="o", capsize=2, label=label)
        for e in points:
            if e.checkpoint:
                ax.plot([e.bits_per_param], [e.kl], marker="*", markersize=14, color="k", linestyle="none")
    if proxy is not None and proxy[1] > 0:
        ax.plot([proxy[0]], [proxy[1]], marker="o", markerfacecolor="none", color="gray", linestyle="none",
                label="second-order estimate ½ Σ F̄·SSE")
    if any(e.kl > 0 for v in groups.values() for e in v):
        ax.set_yscale("log")
    ax.set_xlabel("stored bits / parameter (quantised tensors)")
    ax.set_ylabel("KL(reference ‖ quantised), nats/token")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _write_figures(bundle: ReportBundle, out_dir: Path) -> tuple[dict[str, str], str | None]:
    """Figures (relative paths) and a note when they could not be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}, "Figures skipped: matplotlib is not installed (pip install matplotlib)."
    figures_dir = out_dir / FIGURES_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    report = bundle.report
    plot_bits_per_tensor(report, figures_dir / "bits_per_tensor.png")
    plot_error_per_tensor(report, figures_dir / "error_per_tensor.png")
    figures = {"bits": f"{FIGURES_DIR}/bits_per_tensor.png", "error": f"{FIGURES_DIR}/error_per_tensor.png"}
    if bundle.evaluations:
        proxy = _kl_proxy_total(report)
        plot_kl_vs_bits(bundle.evaluations, figures_dir / "kl_vs_bits.png",
                        proxy=None if proxy is None else (report.bits_per_param, proxy))
        figures["kl"] = f"{FIGURES_DIR}/kl_vs_bits.png"
    return figures, None


def write_report(bundle: ReportBundle | QuantizationReport, out_dir: str | Path) -> dict[str, Path]:
    """Write the JSON, markdown and figures into ``out_dir``; returns ``{kind: path}`` of what was written."""
    if isinstance(bundle, QuantizationReport):
        bundle = ReportBundle(bundle)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / REPORT_JSON
    json_path.write_text(json.dumps(report_to_json(bundle), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    figures, note = _write_figures(bundle, out)
    md_path = out / REPORT_MD
    md_path.write_text(render_markdown(bundle, figures, note), encoding="utf-8")
    return {"json": json_path, "markdown": md_path, **{k: out / v for k, v in figures.items()}}
