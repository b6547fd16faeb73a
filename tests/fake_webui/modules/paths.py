"""modules.paths: set by the test fixture to a temporary data folder."""

data_path = "."
models_path = "models"
