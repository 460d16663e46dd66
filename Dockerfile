# Bastion sidecar, CPU image (onnxruntime). Build: docker build -t bastion:cpu .
# The install step is scripts/install.sh, the same script CI runs (a test checks they agree).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/bastion
COPY pyproject.toml README.md ./
COPY bastion ./bastion
COPY proxy ./proxy
COPY detectors ./detectors
COPY transforms ./transforms
COPY protos ./protos
COPY scripts ./scripts
RUN scripts/install.sh --runtime \
    && useradd --system --uid 10001 --no-create-home bastion

USER 10001
# 8000: KServe v2 REST (when http_listen is set); 8001: gRPC (Open Inference Protocol +
# grpc.health.v1); 8002: admin HTTP (/metrics, /readyz).
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import sys,urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8002/healthz', timeout=2).status != 200)"
ENTRYPOINT ["bastion"]
CMD ["serve", "-c", "/etc/bastion/bastion.yaml"]
