"""Router: HTTP, validation, queueing and continuous batching. Imports no torch."""
