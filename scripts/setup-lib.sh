# Helpers of scripts/setup.sh (sourced; tests/ops/test_setup_disk.py runs them with a fake df).
# The caller sets ROOT (the checkout) and LOG (the setup log) before using them.

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Run a noisy step with its output in var/setup.log; on failure show the end of it and stop.
quiet() {
  local what=$1; shift
  local start=0
  [[ -e $LOG ]] && start=$(wc -l <"$LOG")  # a fresh checkout has no log yet
  if ! "$@" >>"$LOG" 2>&1; then
    tail -n 25 "$LOG" >&2
    # A full disk looks like a network failure to pip ("could not install packages"): say which it was.
    if tail -n +"$((start + 1))" "$LOG" | grep -q -E 'No space left on device|Errno 28'; then
      die "$what: the disk is full ($(free_space_mb "$ROOT") MB free at $ROOT; a fresh setup needs about $((NEED_MB / 1024)) GB) (full log: $LOG)"
    fi
    die "$what (full log: $LOG)"
  fi
}

# Free megabytes on the filesystem holding $1 (its nearest existing parent).
free_space_mb() {
  local dir=$1
  while [[ ! -d $dir ]]; do dir=$(dirname "$dir"); done
  df -Pm "$dir" | awk 'NR == 2 { print $4 }'
}

# What a fresh setup writes (measured on a clean clone): .venv 2.9 GB, .venv-rasa 2.7 GB, the model and
# index cache 0.6 GB, the Rasa model and pip's downloads besides. Refuse to start a step that cannot
# finish, with the reason, rather than fail half-way through a pip install.
NEED_MB=8192
CACHE_DIR=${XIAOZHI_CACHE_DIR:-$HOME/.cache/xiaozhi}
need_space() {  # $1 = MB this step needs, $2 = what for
  local dir free
  for dir in "$ROOT" "$CACHE_DIR"; do
    free=$(free_space_mb "$dir")
    if ((free < $1)); then
      die "not enough free disk for $2: $free MB free at $dir, about $1 MB needed; free some space and run this again"
    fi
  done
}
