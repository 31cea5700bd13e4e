#!/usr/bin/env bash
# Rebuilds the checkpoint shipped in voxsearch/encoders/pretrained/phantom-nano from scratch with the
# project's own commands (about 35 minutes on a 2-core CPU, 28 of them training). The seeds fix the archive and the run; series
# ids (and so the data order) also depend on the catalog's de-identification salt: give ingest a --salt-file
# to repeat a run exactly.
# Usage: scripts/train_packaged_model.sh WORKDIR
set -euo pipefail
work="${1:?usage: $0 WORKDIR}"
mkdir -p "$work"
voxsearch synth --n 3000 --seed 0 --size small --dicom-share 0.1 --split-shares 0.7 0.1 0.2 --out "$work/archive"
voxsearch ingest "$work/archive" --out "$work/catalog"
voxsearch train clip --catalog "$work/catalog" --out "$work/run" --preset quick
voxsearch train export "$work/run/model" --out "$work/phantom-nano"
python "$(dirname "$0")/packaged_model_card.py" "$work/run" "$work/phantom-nano"
