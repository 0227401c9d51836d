"""The service's process-level parts: settings from the environment and the `opsd` service commands.

`opsd_service.settings` resolves every knob (home directory, database, broker, artifacts, leases)
once; `opsd_service.cli` mounts `opsd up | api | worker | migrate | keys` on the top-level command.
"""
