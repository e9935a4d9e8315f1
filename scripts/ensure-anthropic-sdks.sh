#!/usr/bin/env bash
# Installs the latest official Anthropic SDKs the simulator's SDK tests run against: the Python
# `anthropic` package into <repo>/.venv (next to moto) and the TypeScript `@anthropic-ai/sdk`
# into <repo>/.sdk/node (git-ignored). Prints the versions in use.
#
# Always the latest release, never a pinned one: the tests exist to catch the next wire change
# the SDKs make (as the 2026-10-21 majors did with the API version and Bearer auth) before a user
# does, so each run asks the registries for the newest version and upgrades when there is one.
# Idempotent: when the installed versions are already the latest, nothing is installed. When a
# registry cannot be reached but an SDK is installed, that one is kept and a warning says so.
#
# The tests find the SDKs through KEYVEX_SDK_PYTHON (a Python with `anthropic` importable) and
# KEYVEX_SDK_NODE_MODULES (a node_modules holding @anthropic-ai/sdk); scripts/test.sh exports
# both, pointing at the folders this script fills.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${repo_root}/.venv"
node_dir="${repo_root}/.sdk/node"
python="${PYTHON:-python3}"

# A lock keeps two runs from installing into the same folders at once.
lock_name="$(printf %s "${repo_root}" | cksum | cut -d" " -f1)"
exec 9>"${TMPDIR:-/tmp}/keyvex-ensure-anthropic-sdks-${lock_name}.lock"
flock 9

log="$(mktemp)"
trap 'rm -f "${log}"' EXIT

# ---- Python: anthropic --------------------------------------------------------------------------
if [[ ! -x "${venv}/bin/python" ]]; then
    "${python}" -m venv "${venv}" >/dev/null
fi
py_installed() {
    "${venv}/bin/python" -c 'import importlib.metadata as m; print(m.version("anthropic"))' 2>/dev/null || true
}
py_have="$(py_installed)"
# `--upgrade` asks PyPI for the newest release and installs nothing when it is already here.
if ! "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade \
    anthropic >"${log}" 2>&1; then
    if [[ -z "${py_have}" ]]; then
        cat "${log}" >&2
        echo "ensure-anthropic-sdks: pip install of the anthropic Python SDK failed (see above)" >&2
        exit 1
    fi
    echo "ensure-anthropic-sdks: warning: could not check PyPI for a newer anthropic; keeping ${py_have}" >&2
fi

# ---- TypeScript: @anthropic-ai/sdk --------------------------------------------------------------
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "ensure-anthropic-sdks: node and npm are needed for the TypeScript SDK test (Node.js 20 or later)" >&2
    exit 1
fi
mkdir -p "${node_dir}"
node_installed() {
    node -p 'require(process.argv[1]).version' \
        "${node_dir}/node_modules/@anthropic-ai/sdk/package.json" 2>/dev/null || true
}
node_latest="$(npm view @anthropic-ai/sdk version 2>/dev/null || true)"
node_have="$(node_installed)"
if [[ -z "${node_latest}" ]]; then
    if [[ -z "${node_have}" ]]; then
        echo "ensure-anthropic-sdks: the npm registry is unreachable and @anthropic-ai/sdk is not installed" >&2
        exit 1
    fi
    echo "ensure-anthropic-sdks: warning: the npm registry is unreachable; keeping @anthropic-ai/sdk ${node_have}" >&2
elif [[ "${node_have}" != "${node_latest}" ]]; then
    if ! npm install --prefix "${node_dir}" --no-audit --no-fund --save-exact \
        "@anthropic-ai/sdk@${node_latest}" >"${log}" 2>&1; then
        cat "${log}" >&2
        echo "ensure-anthropic-sdks: npm install of @anthropic-ai/sdk@${node_latest} failed (see above)" >&2
        exit 1
    fi
fi

echo "ensure-anthropic-sdks: anthropic $(py_installed) (Python), @anthropic-ai/sdk $(node_installed) (TypeScript)" >&2
