"""The client's resources; each mirrors a URL prefix (`client.jobs` <-> `/jobs`)."""

from opsd_client.resources.evals import AsyncEvals, Evals
from opsd_client.resources.jobs import AsyncJobs, Jobs

__all__ = ["AsyncEvals", "AsyncJobs", "Evals", "Jobs"]
