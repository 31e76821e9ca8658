#!/usr/bin/env bash
# Install xrai into a Colab or Kaggle runtime (or any Python) WITHOUT replacing the runtime's torch, from a
# shell (a terminal, or a `!` line). The notebooks do not use it: their install cell runs pip itself (from
# an attached wheelhouse, or from GitHub), so it also works with Kaggle's Internet off.
#
#   bash colab_setup.sh                                                     # from a checkout
#   curl -fsSLO https://raw.githubusercontent.com/x-rai/x-rai/main/colab_setup.sh && bash colab_setup.sh
#
# From a bare session it clones the repository (or pulls it when the clone is already there); run
# from inside a checkout, it installs that checkout and leaves git alone. The installed torch,
# torchvision and torchaudio are pinned through a pip constraints file, so the CUDA build the
# runtime ships with stays. Kaggle needs "Internet on" (Settings) for the clone and the install.
#
# Environment (all optional):
#   XRAI_SRC      an existing checkout to install; skips clone and pull
#   XRAI_DIR      where to clone (default: /tmp/x-rai; the install copies the package, so the clone
#                 is not needed afterwards and stays out of Kaggle's /kaggle/working output)
#   XRAI_REPO     owner/name on GitHub (default: x-rai/x-rai)
#   XRAI_GIT_URL  clone URL (default: https://github.com/$XRAI_REPO.git)
#   XRAI_BRANCH   branch to clone (default: main)
#   XRAI_PYTHON   the Python to install into (default: python3; the notebooks pass their kernel's)
set -euo pipefail

REPO="${XRAI_REPO:-x-rai/x-rai}"
GIT_URL="${XRAI_GIT_URL:-https://github.com/${REPO}.git}"
BRANCH="${XRAI_BRANCH:-main}"
PY="${XRAI_PYTHON:-python3}"

say() { printf 'colab_setup: %s\n' "$*"; }
die() { printf 'colab_setup: error: %s\n' "$*" >&2; exit 1; }

is_checkout() { [[ -f "$1/pyproject.toml" && -f "$1/xrai/__init__.py" ]]; }

# ---- where the source comes from ----------------------------------------------------------------
here=""
if [[ -n "${BASH_SOURCE[0]:-}" && -f "${BASH_SOURCE[0]}" ]]; then
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fi
if [[ -n "${XRAI_SRC:-}" ]]; then
    is_checkout "$XRAI_SRC" || die "XRAI_SRC=$XRAI_SRC is not an x-rai checkout (no pyproject.toml and xrai/)"
    src="$XRAI_SRC"
    say "installing the checkout in $src (XRAI_SRC)"
elif [[ -n "$here" ]] && is_checkout "$here"; then
    src="$here"
    say "installing the checkout this script lives in: $src"
else
    command -v git >/dev/null || die "git is not installed; install it or set XRAI_SRC to a checkout"
    src="${XRAI_DIR:-/tmp/x-rai}"
    if [[ -d "$src/.git" ]]; then
        say "updating $src from $GIT_URL"
        git -C "$src" pull --ff-only --quiet || die "git pull in $src failed; remove $src and run again"
    else
        say "cloning $GIT_URL ($BRANCH) into $src"
        git clone --quiet --depth 1 --branch "$BRANCH" "$GIT_URL" "$src" \
            || die "cannot clone $GIT_URL; check the network (Kaggle: Settings > Internet on)"
    fi
    is_checkout "$src" || die "$src does not hold the x-rai package"
fi

# ---- keep the runtime's torch -------------------------------------------------------------------
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null \
    || die "$PY is not Python >= 3.10 (set XRAI_PYTHON to one)"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# importlib.metadata rather than `pip freeze | grep`: freeze prints "torch @ file://..." for some
# installs, which a version pin would miss.
"$PY" - >"$constraints" <<'EOF'
from importlib import metadata

for name in ("torch", "torchvision", "torchaudio"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
EOF
if [[ -s "$constraints" ]]; then
    say "keeping $(tr '\n' ' ' <"$constraints")"
else
    say "no torch in $PY yet: pip will install it"
fi
torch_before="$(grep '^torch==' "$constraints" || true)"

# ---- install ------------------------------------------------------------------------------------
# Not editable: a kernel that is already running imports a regular install at once, whereas an
# editable one needs its .pth file read at start-up (a runtime restart).
"$PY" -m pip install --quiet --disable-pip-version-check -c "$constraints" "$src" \
    || die "pip install of $src failed (see pip's message above)"

torch_after="$("$PY" -c 'from importlib import metadata; print("torch==" + metadata.version("torch"))')"
if [[ -n "$torch_before" && "$torch_before" != "$torch_after" ]]; then
    die "torch changed from $torch_before to $torch_after; restart the runtime and report this"
fi

# ---- widgets ------------------------------------------------------------------------------------
# ipywidgets comes with the package's requirements. Core widgets need no front-end extension in
# JupyterLab, Kaggle or VS Code; in Colab, xrai.widgets turns on Colab's widget manager itself when a
# widget is first shown, because that is a call inside the kernel, which a shell script cannot make.
versions="$("$PY" -c 'import ipywidgets, xrai; print(f"xrai {xrai.__version__}, ipywidgets {ipywidgets.__version__}")')" \
    || die "xrai does not import after the install"
say "installed $versions; kept $torch_after"
