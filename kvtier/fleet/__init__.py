"""Joining a fleet: what an instance (a CacheEngine, kvtier_server) runs to register with
kvtier_controller, report its keys and take its commands (see kvtier.fleet.messages)."""
