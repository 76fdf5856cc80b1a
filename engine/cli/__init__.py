"""What a person runs: the `studio-engine` command, the demo, diagram rendering and the tiny
model writer. Only `engine.__main__` and the console script import this package."""
