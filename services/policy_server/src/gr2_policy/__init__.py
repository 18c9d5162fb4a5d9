"""GR-2 Serve policy server: model, engine, gRPC + REST API, episode state."""

__version__ = "0.1.0"
