"""The scheduler service (manifest expansion, job finalisation) and the job client."""
