"""kvtier_controller: a fleet of kvtier instances as one cache, over REST (see kvtier.fleet.messages)."""
