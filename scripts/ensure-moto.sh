#!/usr/bin/env bash
# Installs the moto server (local DynamoDB/SQS emulator used by the integration tests) into
# <repo>/.venv. Idempotent and quiet on success: a second run only checks the installed version.
set -euo pipefail

MOTO_VERSION="5.2.5" # the version the DynamoDB and SQS tests were verified against
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${repo_root}/.venv"
python="${PYTHON:-python3}"

installed_version() {
    "${venv}/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null || true
}

if [[ -x "${venv}/bin/moto_server" && "$(installed_version)" == "${MOTO_VERSION}" ]]; then
    exit 0
fi

# A lock keeps two test binaries (or CI steps) from installing into the same venv at once.
lock_name="$(printf %s "${repo_root}" | cksum | cut -d" " -f1)"
exec 9>"${TMPDIR:-/tmp}/keyvex-ensure-moto-${lock_name}.lock"
flock 9
if [[ -x "${venv}/bin/moto_server" && "$(installed_version)" == "${MOTO_VERSION}" ]]; then
    exit 0
fi

if [[ ! -x "${venv}/bin/python" ]]; then
    "${python}" -m venv "${venv}" >/dev/null
fi
log="$(mktemp)"
if ! "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check \
    "moto[server]==${MOTO_VERSION}" >"${log}" 2>&1; then
    cat "${log}" >&2
    rm -f "${log}"
    echo "ensure-moto: pip install of moto[server]==${MOTO_VERSION} failed (see above)" >&2
    exit 1
fi
rm -f "${log}"
