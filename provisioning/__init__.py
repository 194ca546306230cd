"""keyfleet fleet side: the provisioning service, factory station and operator CLI."""
