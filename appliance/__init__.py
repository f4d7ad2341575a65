"""rackboot appliance: configuration, composition root, events, boot profiles, CLI."""
