"""The device layout: mesh, per-parameter layouts, op strategies, strategy files and the planner."""
