#!/usr/bin/env bash
# The stages of dvc.yaml as plain commands, for machines without DVC (`dvc repro` adds caching and skipping).
exec python "$(dirname "$0")/../common/run_stages.py" "$(dirname "$0")/dvc.yaml" "$@"
