"""Registry: the system of record (settings, object storage, tenants, base models)."""
