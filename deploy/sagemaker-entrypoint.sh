#!/bin/sh
# SageMaker entrypoint: SM_PDSERVE_<NAME>=value and SM_VLLM_<NAME>=value become
# `pdserve serve --name value` (empty value: a bare flag) after `--host 0.0.0.0 --port 8080`,
# as vLLM's sagemaker-entrypoint.sh does for SM_VLLM_*; vLLM-only options are dropped with a
# warning that names them. The translation lives in pdserve/sagemaker.py
# (`pdserve sagemaker --dry-run` prints the resulting command).
# SageMaker runs `docker run IMAGE serve`: a leading `serve` is ignored; other arguments
# are passed on after the translated ones (they win).
set -eu
exec pdserve sagemaker "$@"
