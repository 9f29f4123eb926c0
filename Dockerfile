# The engine as a container: `run` (the daemon) over /app/mailboxes.d, the store in /data.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MAILINTEGRATION_DATA_DIR=/data

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/mailintegration mailintegration \
    && mkdir -p /data /app/mailboxes.d \
    && chown mailintegration:mailintegration /data

WORKDIR /app
# The dependencies exactly as locked, every file checked against its hash (refresh the lock
# with scripts/lock.sh); then the engine itself, built with the locked setuptools.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY engine ./engine
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf /root/.cache \
    && cd / && python -m engine.precompile
COPY scripts/entrypoint.sh /usr/local/bin/mailintegration-entrypoint
COPY demo ./demo

USER mailintegration
VOLUME ["/data"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

# `run` starts after `config validate` has reported every mailbox file (see the script).
ENTRYPOINT ["mailintegration-entrypoint"]
CMD ["run", "--config-dir", "/app/mailboxes.d", "--http-host", "0.0.0.0", "--http-port", "8080", "--log-format", "json"]
