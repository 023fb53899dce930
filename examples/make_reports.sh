#!/usr/bin/env bash
# Regenerate every report under reports/ from the examples (never edit reports by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
python examples/npu_story.py
python examples/bf16_moe.py
