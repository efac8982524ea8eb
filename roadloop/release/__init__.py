"""Release: the platform's side of signed model manifests (keys, building, signing); the
manifest format itself is the edge agent's (``edge_agent.manifest``)."""
