#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): a learner rank's step on CUDA, its peak memory against the
# estimate, chunked against whole log-probs, the step's speed, and the merges' speed and accuracy on a 7B
# shard in bf16. It needs Python with torch (CUDA) and transformers only, as on a machine without Ray,
# vLLM, DeepSpeed or pydantic. --dry-run: the same code, tiny, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONUNBUFFERED=1 exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
