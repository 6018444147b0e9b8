"""The shared training harness: config, loop, checkpoints, tracking. Tasks live in sibling packages."""
