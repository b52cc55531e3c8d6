#!/usr/bin/env bash
# bench/score_feedback.sh -- run pymta-feedback parse over the shared bounce corpus and score it
# with the corpus's own score.py (recall, precision, complaint, autoreply, hard, reason), then
# print the per-reason confusion (truth x predicted; LIST=1 also lists every disagreeing file).
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
CORPUS="${CORPUS:-$HERE/../../shared/corpus/bounces}"
[ -f "$CORPUS/truth.jsonl" ] || { echo "error: corpus not found at $CORPUS" >&2; exit 2; }
OUT="$(mktemp "${TMPDIR:-/tmp}/pymta-feedback-pred.XXXXXX")"  # parallel runs must not share it
trap 'rm -f "$OUT"' EXIT
cd "$CORPUS"
cut -d'"' -f4 truth.jsonl | xargs python3 -m pymta.feedback.cli parse > "$OUT"
python3 score.py "$OUT" --by-source
echo
python3 "$HERE/feedback_confusion.py" truth.jsonl "$OUT" ${LIST:+--list}
