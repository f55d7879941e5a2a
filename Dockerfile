# The MHPO server (API + dashboard). Training needs torch; serving does not, so the package
# is installed without its dependencies and then only with what `mhpo serve` imports.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mhpo ./mhpo
COPY server ./server
COPY dashboard ./dashboard
COPY migrations ./migrations

RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir \
      "numpy>=1.26" "pydantic>=2.7" "pydantic-settings>=2.3" "fastapi>=0.115" "uvicorn[standard]>=0.30" \
      "sqlalchemy>=2.0.30" "alembic>=1.13" "psycopg[binary]>=3.1" "httpx>=0.27" "dash>=2.17" "plotly>=5.22" \
      "a2wsgi>=1.10" "prometheus-client>=0.20" "platformdirs>=4" "pyyaml>=6" \
 && useradd --create-home mhpo

USER mhpo
EXPOSE 8765
CMD ["sh", "-c", "mhpo db upgrade && exec mhpo serve --host 0.0.0.0 --port 8765 --insecure-public"]
