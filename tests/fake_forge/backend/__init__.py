"""Stand-in for Forge's `backend/` package (operations, memory management, patchers), reduced to what training meets."""
