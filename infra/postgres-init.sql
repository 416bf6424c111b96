-- The MLflow server's own database next to brandfarm's (docker-compose.yml mounts this).
CREATE DATABASE mlflow OWNER brandfarm;
