#!/usr/bin/env bash
# Builds the reference venv at tests/reference/.venv (Python 3.11).
# Needs network access to PyPI only. Takes a few minutes (torch pulls ~2.8 GB of CUDA wheels).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3.11}"
if [ ! -x "$here/.venv/bin/python" ]; then
  "$py" -m venv "$here/.venv"
fi
"$here/.venv/bin/python" -m pip install --upgrade --quiet pip
"$here/.venv/bin/python" -m pip install -r "$here/requirements.txt"
"$here/.venv/bin/python" - <<'PY'
import torch, transformers, tokenizers, sentencepiece, PIL, numpy, safetensors
print("ok: torch", torch.__version__, "transformers", transformers.__version__,
      "tokenizers", tokenizers.__version__, "numpy", numpy.__version__)
PY
