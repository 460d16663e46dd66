#!/usr/bin/env bash
# Create (once) the separate virtualenv in which MLServer runs for tests/test_mlserver_compat.py.
#
# MLServer 1.7.1 and its runtime pull in their own pins (fastapi<0.116, pandas, opentelemetry,
# gevent, ...), so it lives in $REPO/.venvs/mlserver (override with BASTION_MLSERVER_VENV), never in
# Bastion's own environment. mlserver 1.7.1 supports Python >=3.9,<3.13; the system python3 is used
# unless BASTION_MLSERVER_PYTHON names another interpreter.
#
# Idempotent: when the venv already runs `mlserver --help` and imports mlserver_sklearn at 1.7.1,
# nothing is installed. Prints one line saying what it did; exits non-zero on failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BASTION_MLSERVER_VENV:-$REPO/.venvs/mlserver}"
PYTHON="${BASTION_MLSERVER_PYTHON:-python3}"
MLSERVER_VERSION="1.7.1"

venv_works() {
    [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/mlserver" ] || return 1
    "$VENV/bin/mlserver" --help >/dev/null 2>&1 || return 1
    "$VENV/bin/python" - "$MLSERVER_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
import mlserver_sklearn, sklearn, joblib  # noqa: F401
want = sys.argv[1]
sys.exit(0 if version("mlserver") == want and version("mlserver-sklearn") == want else 1)
EOF
}

if venv_works; then
    echo "setup-mlserver: $VENV already has a working mlserver $MLSERVER_VERSION; nothing to do"
    exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if (3, 9) <= sys.version_info[:2] < (3, 13) else 1)'; then
    echo "setup-mlserver: $PYTHON is $("$PYTHON" -V 2>&1); mlserver $MLSERVER_VERSION needs Python >=3.9,<3.13" \
         "(set BASTION_MLSERVER_PYTHON)" >&2
    exit 1
fi

# A half-built venv from an interrupted run is rebuilt from scratch.
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"

# The set of versions this was tested with (Python 3.11, Linux x86_64). Constraints, not
# requirements: they only fix the versions of what mlserver and mlserver-sklearn pull in.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat >"$CONSTRAINTS" <<'EOF'
aiofiles==25.1.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiokafka==0.14.0
aiosignal==1.4.0
annotated-types==0.8.0
anyio==4.16.0
asgiref==3.13.0
async-timeout==5.0.1
attrs==26.1.0
brotli==1.2.1
certifi==2026.10.18
click==8.5.1
cloudpickle==3.1.2
fastapi==0.115.14
frozenlist==1.8.0
gevent==26.9.0
geventhttpclient==2.6.1
googleapis-common-protos==1.76.0
greenlet==3.3.2
grpcio==1.85.1
h11==0.16.0
idna==3.20
importlib_resources==6.5.2
joblib==1.6.0
ml_dtypes==0.5.4
multidict==7.2.1
narwhals==2.28.0
numpy==2.4.6
opentelemetry-api==1.45.2
opentelemetry-exporter-otlp-common==0.66b2
opentelemetry-exporter-otlp-proto-common==1.45.2
opentelemetry-exporter-otlp-proto-grpc==1.45.2
opentelemetry-instrumentation==0.66b2
opentelemetry-instrumentation-asgi==0.66b2
opentelemetry-instrumentation-fastapi==0.66b2
opentelemetry-instrumentation-grpc==0.66b2
opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2
opentelemetry-semantic-conventions==0.66b2
opentelemetry-util-http==0.66b2
orjson==3.13.0
packaging==26.3
pandas==3.1.1
prometheus_client==0.26.0
propcache==0.5.4
protobuf==6.33.6
py-grpc-prometheus==0.8.0
pydantic==2.14.3
pydantic-settings==2.16.3
pydantic_core==2.50.4
python-dateutil==4.0.0
python-dotenv==1.2.4
python-multipart==0.0.34
python-rapidjson==1.25
scikit-learn==1.9.1
scipy==1.17.1
starlette==0.46.2
starlette_exporter==0.24.0
threadpoolctl==3.8.0
tritonclient==2.73.0
typing-inspection==0.4.5
typing_extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
uvicorn==0.54.0
uvloop==0.23.0
wrapt==2.5.2
yarl==1.25.1
zope.event==6.2
zope.interface==8.7
EOF

export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install --progress-bar off -c "$CONSTRAINTS" \
    "mlserver==$MLSERVER_VERSION" "mlserver-sklearn==$MLSERVER_VERSION" scikit-learn joblib

if ! venv_works; then
    echo "setup-mlserver: installed into $VENV but 'mlserver --help' or 'import mlserver_sklearn' fails" >&2
    exit 1
fi
echo "setup-mlserver: installed mlserver $MLSERVER_VERSION + mlserver-sklearn into $VENV ($("$VENV/bin/python" -V 2>&1))"
