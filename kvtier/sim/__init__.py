"""Model-free replay of request traces through kvtier's eviction policies: hit rates per capacity
in seconds, with no tensors (issue 17's simulator; `kvtier.sim.trace` reads the traces,
`kvtier.sim.replay` replays them)."""
