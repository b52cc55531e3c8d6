"""Administration: command-line tools, control socket, accounting."""
