# Source in every call on the project's GPU machine, in the repo root, after the calls of
# ../shared/device/README.md (teacher + wheels in /tmp/site) and `offline_bundle.sh unpack`:
#   source runs/smollm2/device_env.sh && PIECE_SECONDS=540 bash runs/smollm2/all.sh
# That machine has no `lit-xdistill` console script (the repo is not pip-installed there): a wrapper in
# /root/bin calls the same entry point. Run state lives in /root/smollm2, which survives calls on a warm
# machine; `collect` copies the reportable files (no checkpoints) to the device tool's own $OUT, which is
# kept as DEVICE_OUT because the recipe uses OUT for its run folder.
export DEVICE_OUT=${DEVICE_OUT:-$OUT}
eval "$(bash /root/xdistill-env.sh)"
export PYTHONPATH=$PWD:$PYTHONPATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OUT=${OUT_RUN:-/root/smollm2}
ln -sfn "$PWD/kernels" /tmp/site/xdistill_kernels
mkdir -p /root/bin
printf '#!/bin/sh\nexec python3 -m lit_xdistill.cli "$@"\n' > /root/bin/lit-xdistill  # -m: Lightning re-launches ranks by module name
chmod +x /root/bin/lit-xdistill
export PATH=/root/bin:$PATH

# collect: the run's reports, plots and TensorBoard events as one tarball (the device returns <= 8 files)
collect() {
  (cd "$OUT" && tar czf "$DEVICE_OUT/smollm2-results.tgz" --ignore-failed-read \
     $(ls -d summary.json plots eval/*.md eval/*.json eval/*.png eval/tasks/*/*.json tb 2>/dev/null) *.env.yaml 2>/dev/null) || true
}
