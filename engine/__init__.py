"""studio-engine: an event-sourced lifecycle engine for llama-server."""
