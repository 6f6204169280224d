"""Online serving: an OpenAI-compatible HTTP server on the engine (`twinfer serve`) and a client that replays a
trace against any OpenAI-compatible endpoint (`twinfer bench serve`)."""
