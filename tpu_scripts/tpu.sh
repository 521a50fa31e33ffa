#!/usr/bin/env bash
# Cloud TPU VMs and pod slices for jaxaccel: create, install, run a recipe on every worker,
# stream its log, delete. Every subcommand takes --dry-run, which prints each command
# (gcloud and local) instead of running it.
#
#   tpu_scripts/tpu.sh create  --name NAME --zone ZONE --type v5litepod-8 [--version V] [--project P] [--spot]
#   tpu_scripts/tpu.sh setup   --name NAME --zone ZONE       # jax[tpu] + a jaxaccel wheel built from this checkout
#   tpu_scripts/tpu.sh run     --name NAME --zone ZONE --recipe recipes/x.py [--detach] [-- ARGS...]
#   tpu_scripts/tpu.sh logs    --name NAME --zone ZONE [--worker 0]
#   tpu_scripts/tpu.sh delete  --name NAME --zone ZONE
#
# NAME / ZONE / PROJECT default to $TPU_NAME / $TPU_ZONE / $TPU_PROJECT. A recipe runs on all
# workers at once; it calls jaxaccel.distributed.initialize(), which finds the other workers
# by itself on TPU VMs, and builds its mesh over every chip of the slice.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC2088  # the tilde is expanded on each worker, not here
LOG='~/jaxaccel-run.log'

usage() {
  sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

die() {
  echo "tpu.sh: $*" >&2
  exit 2
}

# Print a command with shell quoting where needed (copy-pastable), then run it unless dry.
run() {
  local out="" arg key
  for arg in "$@"; do
    key=""
    if [[ "$arg" =~ ^(--[a-z-]+=)(.*)$ ]]; then key="${BASH_REMATCH[1]}" arg="${BASH_REMATCH[2]}"; fi
    if [[ ! "$arg" =~ ^[A-Za-z0-9_./:=@,+*~-]+$ ]]; then arg="'${arg//\'/\'\\\'\'}'"; fi
    out+="$key$arg "
  done
  echo "+ ${out% }"
  if [[ "$DRY" != 1 ]]; then "$@"; fi
}

[[ $# -ge 1 ]] || usage
CMD="$1"
shift
case "$CMD" in
  create|setup|run|logs|delete) ;;
  -h|--help) usage 0 ;;
  *) die "unknown command '$CMD': use create, setup, run, logs or delete" ;;
esac
NAME="${TPU_NAME:-}" ZONE="${TPU_ZONE:-}" PROJECT="${TPU_PROJECT:-}" TYPE="" VERSION="" SPOT=0
RECIPE="" DETACH=0 WORKER=0 DRY=0 ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:-}"; shift 2 ;;
    --zone) ZONE="${2:-}"; shift 2 ;;
    --project) PROJECT="${2:-}"; shift 2 ;;
    --type) TYPE="${2:-}"; shift 2 ;;
    --version) VERSION="${2:-}"; shift 2 ;;
    --recipe) RECIPE="${2:-}"; shift 2 ;;
    --worker) WORKER="${2:-}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; ARGS=("$@"); break ;;
    *) die "unknown option '$1' for '$CMD' (see --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name (or \$TPU_NAME) is required: the TPU VM's name"
[[ -n "$ZONE" ]] || die "--zone (or \$TPU_ZONE) is required, e.g. us-central2-b"
if [[ "$DRY" != 1 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) or use --dry-run"
fi

TPU=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
if [[ -n "$PROJECT" ]]; then WHERE+=("--project=$PROJECT"); fi

case "$CMD" in
  create)
    [[ -n "$TYPE" ]] || die "create needs --type, e.g. v5litepod-8 (one host) or v4-32 (a pod slice)"
    EXTRA=()
    if [[ "$SPOT" == 1 ]]; then EXTRA+=(--spot); fi
    run "${TPU[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$TYPE" \
      "--version=${VERSION:-tpu-ubuntu2204-base}" "${EXTRA[@]+"${EXTRA[@]}"}"
    ;;
  setup)
    DIST="$ROOT/dist"
    run python3 -m pip wheel --no-deps --wheel-dir "$DIST" "$ROOT"
    run "${TPU[@]}" scp "$DIST"/jaxaccel-*.whl "$NAME:" "${WHERE[@]}" --worker=all
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
      "--command=python3 -m pip install -U 'jax[tpu]' ~/jaxaccel-*.whl && python3 -c 'import jax; print(jax.device_count())'"
    ;;
  run)
    [[ -n "$RECIPE" ]] || die "run needs --recipe FILE.py (e.g. recipes/finetune_tiny.py)"
    [[ "$DRY" == 1 || -f "$RECIPE" ]] || die "recipe $RECIPE not found"
    SCRIPT="$(basename "$RECIPE")"
    QUOTED=""
    for a in "${ARGS[@]+"${ARGS[@]}"}"; do QUOTED+=" $(printf '%q' "$a")"; done
    # attached: every worker's output streams here (and to its log); detached: only to the log
    REMOTE="python3 ~/$SCRIPT$QUOTED 2>&1 | tee $LOG"
    if [[ "$DETACH" == 1 ]]; then REMOTE="nohup python3 ~/$SCRIPT$QUOTED > $LOG 2>&1 &"; fi
    run "${TPU[@]}" scp "$RECIPE" "$NAME:" "${WHERE[@]}" --worker=all
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all "--command=$REMOTE"
    ;;
  logs)
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" "--worker=$WORKER" "--command=tail -n +1 -F $LOG"
    ;;
  delete)
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    ;;
esac
