"""The worker side of the service: the Celery app and task, the job runner that reports engine
events into the store, leases and heartbeats, the expired-lease reaper, and artifact publishing.

`worker.queue` is light (no torch) so the API can import it to enqueue jobs.
"""
