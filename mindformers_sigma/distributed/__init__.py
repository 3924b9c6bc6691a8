"""Training over several processes: each rank's place in the dp x mp x ep mesh, its process groups,
and the collectives the parallel layers call (explicit, the same code on CPU workers and Ascend)."""
