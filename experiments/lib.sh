# Shell helpers of the experiment scripts (sourced; they set KSE and read OUT and the array FT).

# KSE, the kse command unless the caller sets it: the project's virtual environment's (make venv)
# when there is one, else kse on the PATH.
if [ -z "${KSE:-}" ]; then
  KSE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/kse
  [ -x "$KSE" ] || KSE=kse
fi
command -v "$KSE" > /dev/null || { echo "no kse command ($KSE): run make venv first, or set KSE" >&2; exit 2; }

# finetune DIR START [flags...]: `kse finetune` of $OUT/START.kse into $OUT/DIR with the
# recipe $FT and the flags, its printout in $OUT/DIR.log; skipped once $OUT/DIR/model.kse
# exists, resumed from its last epoch when $OUT/DIR/last.ckpt does (the printout then appended
# to the log, which keeps the earlier epochs').
finetune() {
  local dir=$1 start=$2; shift 2
  [ -f "$OUT/$dir/model.kse" ] && return
  local resume=()
  if [ -f "$OUT/$dir/last.ckpt" ]; then resume=(--resume); else : > "$OUT/$dir.log"; fi
  $KSE finetune --checkpoint "$OUT/$start.kse" --out "$OUT/$dir" "${FT[@]}" "$@" "${resume[@]}" >> "$OUT/$dir.log" 2>&1
}
