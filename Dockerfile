# The MHPO server (API + dashboard). The project installs from its own metadata: the default
# install is exactly what serving needs (no torch, no transformers); training is the `train`
# extra. tests/server/test_image.py builds this environment in a fresh venv and serves from it.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mhpo ./mhpo
COPY server ./server
COPY dashboard ./dashboard
COPY migrations ./migrations

RUN pip install --no-cache-dir . \
 && useradd --create-home mhpo

USER mhpo
EXPOSE 8765
CMD ["sh", "-c", "mhpo db upgrade && exec mhpo serve --host 0.0.0.0 --port 8765 --insecure-public"]
