#!/usr/bin/env bash
# Does a signature predict recovery? The study of issue #22 on the planted-facts testbed (issue #21):
# SmolLM2-135M-Instruct with N fictitious people's facts planted, unlearned with 8 methods x 3 strengths
# (24 models: ga, grad_diff, dpo, npo, simnpo, rmu, cb, wt_dist at 0.5x, 1x, 2x of each method's knob,
# full or LoRA as each method's reference trains), every signature and attack measured per model,
# each attack's recovery predicted leave-one-method-out. Offline; resumable (rerun the same command).
#
#   bash benchmarks/study_smollm2.sh                  # the study (OUT=outputs/study_smollm2)
#   STUDY_DRY_RUN=1 bash benchmarks/study_smollm2.sh  # the same commands on a tiny 8-layer model, demo
#                                                     # data, tiny sizes: checks every method and step
#
# Expected time on an idle 2-core CPU machine: about 2.5 hours (2 to 3.5), estimated from the demo's
# per-step timings on SmolLM2 (README: 14.3 minutes for the base and 2 models): per unlearned model
# about 1-1.5 min unlearning (the demo's 20-40 steps; dpo and npo run a frozen reference too), 20 s
# capture, 15 s params, 20 s of analyze, 40 s Lipschitz, 70 s tuned lens, 1-1.5 min of attacks
# (int8 and int4 in groups of 32, relearning on unrelated text and on held-out facts, one ablation setting, each
# evaluated on ATTACK_SAMPLES texts and questions; the base's evaluations are computed once), then
# planting (issue #21's budget) and under a minute for OUT/study/. `--skip tuned-lens` saves about a
# quarter. The dry run took 11 minutes on the shared 2-core machine (see benchmarks/RESULTS.md).
#
# Record in benchmarks/RESULTS.md: the command, the wall time (/usr/bin/time's line below), and
# OUT/study/prediction.csv (the rows of the signatures) with OUT/study/prediction.png; state the finding
# in the README's study section, whatever it is.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

OUT=${OUT:-outputs/study_smollm2}
FACTS=${FACTS:-200}                    # fictitious people in the testbed (issue #21's `datasets create --facts`)
METHODS=${METHODS:-ga,grad_diff,dpo,npo,simnpo,rmu,cb,wt_dist}
STRENGTHS=${STRENGTHS:-0.5,1,2}
ATTACK_SAMPLES=${ATTACK_SAMPLES:-40}   # held-out texts and questions per attack evaluation
MAX_SAMPLES=${MAX_SAMPLES:-64}         # texts per split (and questions) captured and analysed
TIME="/usr/bin/time -f %e_s_wall_%M_KB_peak"
[ -x /usr/bin/time ] || TIME=""

if [ "${STUDY_DRY_RUN:-0}" = "1" ]; then
  OUT=${OUT%/}_dry_run
  mkdir -p "$OUT"
  python3 -c "from unlearn_lens.testing import save_tiny_model; save_tiny_model('gpt_neox', '$OUT/base', layers=8)"
  unlearn-lens datasets create --demo --outdir "$OUT/data"
  BASE="$OUT/base"
  SIZES=(--unlearn-steps 2 --max-samples 8 --max-length 32 --batch-size 4 --attack-samples 8
         --lipschitz-samples 2 --tuned-lens-steps 2 --tuned-lens-tokens 32)
else
  mkdir -p "$OUT"
  [ -d "$OUT/models/smollm2" ] || unlearn-lens models demo --out "$OUT/models/smollm2"
  [ -f "$OUT/data/manifest.json" ] || unlearn-lens datasets create --facts "$FACTS" --seed 0 --outdir "$OUT/data"
  unlearn-lens plant --model "$OUT/models/smollm2" --data "$OUT/data" --outdir "$OUT/planted"
  BASE="$OUT/planted/model"
  SIZES=(--max-samples "$MAX_SAMPLES" --attack-samples "$ATTACK_SAMPLES")
fi

$TIME unlearn-lens study --model "$BASE" --data "$OUT/data" --outdir "$OUT/study" \
  --methods "$METHODS" --strengths "$STRENGTHS" "${SIZES[@]}" "$@"

python3 - "$OUT/study/study/prediction.csv" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["predictors"] == "signatures"]
print(f"\n{'target':<40} {'n':>3} {'R2 [95% CI]':>24} {'Spearman':>8} {'Holm p':>7}  beats behaviour / mean")
for r in rows:
    if r["note"]:
        print(f"{r['target']:<40} {r['n_models']:>3}  {r['note']}")
        continue
    f = lambda k: float(r[k]) if r[k] not in ("", "nan") else float("nan")
    print(f"{r['target']:<40} {r['n_models']:>3} {f('r2'):>8.2f} [{f('r2_low'):.2f}, {f('r2_high'):.2f}]"
          f" {f('spearman'):>8.2f} {f('spearman_p_holm'):>7.2g}  {r['beats_behaviour']} / {r['beats_mean']}")
EOF
