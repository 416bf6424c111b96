-- The farm database's schema as release 1 (commit 26245bd) created it with Base.metadata.create_all,
-- frozen: tests/registry/test_migrations.py builds a release-1 database from it and upgrades it.

CREATE TABLE tenants (
	id VARCHAR(63) NOT NULL, 
	created_at DATETIME NOT NULL, 
	images_per_hour INTEGER, 
	PRIMARY KEY (id)
);

CREATE TABLE api_keys (
	id VARCHAR(12) NOT NULL, 
	tenant_id VARCHAR(63) NOT NULL, 
	salt BLOB NOT NULL, 
	digest BLOB NOT NULL, 
	created_at DATETIME NOT NULL, 
	revoked_at DATETIME, 
	PRIMARY KEY (id), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
);

CREATE INDEX ix_api_keys_tenant_id ON api_keys (tenant_id);

CREATE TABLE files (
	id VARCHAR(40) NOT NULL, 
	tenant_id VARCHAR(63) NOT NULL, 
	filename VARCHAR(255) NOT NULL, 
	purpose VARCHAR(32) NOT NULL, 
	bytes INTEGER NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	object_key VARCHAR(512) NOT NULL, 
	images INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
);

CREATE INDEX ix_files_tenant_id ON files (tenant_id);

CREATE TABLE fine_tuning_jobs (
	id VARCHAR(40) NOT NULL, 
	tenant_id VARCHAR(63) NOT NULL, 
	brand VARCHAR(63) NOT NULL, 
	training_file VARCHAR(40) NOT NULL, 
	base_model VARCHAR(255) NOT NULL, 
	spec TEXT NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	adapter_version INTEGER, 
	error TEXT, 
	idempotency_key VARCHAR(255), 
	attempts INTEGER NOT NULL, 
	cancel_requested BOOLEAN NOT NULL, 
	worker_pid INTEGER, 
	PRIMARY KEY (id), 
	UNIQUE (tenant_id, idempotency_key), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
);

CREATE INDEX ix_fine_tuning_jobs_status ON fine_tuning_jobs (status);

CREATE INDEX ix_fine_tuning_jobs_tenant_id ON fine_tuning_jobs (tenant_id);

CREATE TABLE renders (
	id VARCHAR(32) NOT NULL, 
	tenant_id VARCHAR(63) NOT NULL, 
	created_at DATETIME NOT NULL, 
	images INTEGER NOT NULL, 
	base_model VARCHAR(255) NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
);

CREATE INDEX ix_renders_created_at ON renders (created_at);

CREATE INDEX ix_renders_tenant_id ON renders (tenant_id);

CREATE TABLE fine_tuning_job_events (
	id INTEGER NOT NULL, 
	job_id VARCHAR(40) NOT NULL, 
	created_at DATETIME NOT NULL, 
	level VARCHAR(8) NOT NULL, 
	message TEXT NOT NULL, 
	step INTEGER, 
	loss FLOAT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES fine_tuning_jobs (id)
);

CREATE INDEX ix_fine_tuning_job_events_job_id ON fine_tuning_job_events (job_id);
