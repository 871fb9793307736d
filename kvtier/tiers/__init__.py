"""Storage tiers: the host-memory tier (`cpu`) and the record tiers below it (`disk`, ...)."""
