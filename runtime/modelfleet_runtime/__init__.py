"""modelfleet runtime: the OIP v2 serving server, engine builds, and the `modelfleet` command."""
