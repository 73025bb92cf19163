# Sourced by examples/fashion_mnist/quickstart.sh and scripts/test.sh (not run on its own):
# installs what is missing, once, on a Debian/Ubuntu machine.
#
#   setup_system_packages [test] Graphviz (caffe-alex draw) and dataset-fashion-mnist, via apt-get;
#                                with `test`, also chromium and chromium-driver (the browser tests
#                                of draw's HTML page)
#   setup_python [EXTRAS]        this interpreter when it already has the project (or a virtual
#                                environment is active), else .venv at the repository root, which
#                                it activates; torch==2.13.0 (CPU) first unless torch is there,
#                                then `pip install -e ".[EXTRAS]"` when the project or an extra's
#                                packages are missing
# Expects to run from the repository root. `step` prints a timed heading when the caller has one.

FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}

_setup_say() {
    if declare -F step >/dev/null; then step "$*"; else printf '== %s\n' "$*"; fi
}

setup_system_packages() {
    local packages="graphviz dataset-fashion-mnist" have_browser=yes
    if [ "${1:-}" = test ]; then
        packages="$packages chromium chromium-driver"
        command -v chromedriver >/dev/null || have_browser=""
    fi
    if [ -f "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ] && command -v dot >/dev/null \
        && [ -n "$have_browser" ]; then
        return 0
    fi
    if ! command -v apt-get >/dev/null; then
        echo "setup: install $packages yourself (no apt-get here)" >&2
        return 0
    fi
    _setup_say "apt-get install $packages"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    $sudo apt-get update -qq
    # shellcheck disable=SC2086  # the package names are separate words
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $packages >/dev/null
}

# The modules that show an extra is installed (besides the project itself).
_setup_probe() {
    case "$1" in
        test) echo "caffe_alex, torch, pytest, pytest_timeout, cv2, graphviz, onnxruntime, plyvel, ruff, tensorboard, selenium, yaml, skimage, six" ;;
        "") echo "caffe_alex, torch, matplotlib, lmdb, cv2, graphviz" ;;
        *) echo "caffe_alex, torch" ;;
    esac
}

setup_python() {
    local extras=${1:-} probe
    probe=$(_setup_probe "$extras")
    if [ -z "${VIRTUAL_ENV:-}" ] && ! python3 -c "import $probe" 2>/dev/null; then
        if [ ! -x .venv/bin/python ]; then
            _setup_say "python3 -m venv .venv"
            python3 -m venv .venv
        fi
        # shellcheck disable=SC1091
        source .venv/bin/activate
    fi
    if ! python -c "import torch" 2>/dev/null; then
        _setup_say "pip install torch==2.13.0 (the CPU build; install your CUDA build first for a GPU)"
        python -m pip install --quiet "torch==2.13.0"
    fi
    if ! python -c "import $probe" 2>/dev/null; then
        local target="."
        [ -n "$extras" ] && target=".[$extras]"
        _setup_say "pip install -e \"$target\""
        python -m pip install --quiet -e "$target"
    fi
}
