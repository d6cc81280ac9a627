"""3D parallelism: the dp x pp x tp topology (every process group) and the memory/throughput planner."""
