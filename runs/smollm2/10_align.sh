#!/usr/bin/env bash
# Stage I (alignment) in pieces of at most CHUNK_SECONDS: each call resumes from ckpt/align/last.ckpt.
# Exit 0: finished and exported to $OUT/align/student; exit 75: run again.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
fit_chunk align
