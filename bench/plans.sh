# Sourced by bench/run_multi_gpu.sh and bench/sync_sites.sh: the plan files their runs train.
#   plan NAME DP TP EP MICRO ACCUM   -> writes $OUT/NAME.yaml and prints its path
# ARBD_PRESET / ARBD_SEQ / ARBD_DTYPE / ARBD_BACKEND / EVIDENCE / EVIDENCE_RATE change the model and the run
# (a CPU dry run: ARBD_PRESET=arb-tiny ARBD_SEQ=32 ARBD_DTYPE=fp32 ARBD_BACKEND=torch).
plan() {
  cat > "$OUT/$1.yaml" <<PLAN
name: $1
preset: ${ARBD_PRESET:-arb-small}
layout: {dp: $2, tp: $3, ep: $4, codebook_shards: 0}
zero_stage: 1
micro_batch: $5
grad_accum: $6
seq_len: ${ARBD_SEQ:-512}
dtype: ${ARBD_DTYPE:-bf16}
backend: ${ARBD_BACKEND:-triton}
evidence: ${EVIDENCE:-summed}
PLAN
  # EVIDENCE_RATE: the rule's evidence rate (the preset's when unset)
  [ -z "${EVIDENCE_RATE:-}" ] || echo "rule: {evidence_rate: $EVIDENCE_RATE}" >> "$OUT/$1.yaml"
  echo "$OUT/$1.yaml"
}
