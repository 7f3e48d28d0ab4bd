-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d): one database per store.
-- The owner is the image's POSTGRES_USER, whose password comes from the environment (POSTGRES_PASSWORD).
CREATE DATABASE mlflow;       -- MLflow runs and the model registry
CREATE DATABASE mlflow_auth;  -- MLflow's basic-auth users and permissions (its own alembic history)
CREATE DATABASE prefect;      -- Prefect's flow runs, deployments and events
