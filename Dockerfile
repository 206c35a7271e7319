# generations: the HTTP job service as a container image.
#   docker build -t generations .
#   docker run -e DATABASE_URL=postgresql://USER:PASSWORD@HOST:5432/DB -p 127.0.0.1:8000:8000 generations
# docker stop sends SIGKILL after 10 s and a Dockerfile cannot change that: the default SHUTDOWN_GRACE_SECONDS
# (8) ends before, so running jobs are handed back; with a longer grace, give --stop-timeout above it.
FROM python:3.13-slim

# No .pyc files written at run time (the code is root-owned, read-only to the app user),
# and logs reach `docker logs` at once instead of sitting in a buffer.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8000

# A fixed UID, so that file ownership and Kubernetes' runAsUser/runAsNonRoot are predictable.
# --no-log-init: a large UID would otherwise bloat /var/log/lastlog and faillog.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-log-init --no-create-home --home-dir /nonexistent app

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY app.py schema.sql openapi.json ./

USER 10001:10001
EXPOSE 8000

# Python rather than curl, which the slim image does not have; urlopen raises on any non-2xx answer.
# /health does not touch the database, so a database outage does not get the container restarted;
# the start period covers the app's wait (up to 30 s) for a database that is still starting.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2)"]

# Exec form: python is PID 1 and receives SIGTERM itself, so it can hand running jobs back before exiting.
CMD ["python", "app.py"]
