"""Stand-in `modules` package of the webui; `calls` records what was done, in order."""

calls: list[str] = []
